"""Where commkit keeps files for a user: one cache directory (the JIT's binaries, tuning profiles).

``platformdirs.user_cache_path("commkit")``: on Linux ``$XDG_CACHE_HOME/commkit``, by default
``~/.cache/commkit``. The environment variables that move one kind of file elsewhere
(``$COMMKIT_CACHE_DIR``, ``$COMMKIT_PROFILE_DIR``) are read by their owners.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs


def user_cache_dir() -> Path:
    """commkit's user cache directory (module docstring)."""
    return Path(platformdirs.user_cache_path("commkit", appauthor=False))
