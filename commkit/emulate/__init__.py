"""Virtual ranks: R ranks of one EP group on one GPU (see ``commkit.emulate.group``).

The package keeps the names of the former ``commkit/emulate.py`` importable from ``commkit.emulate``.
"""

from __future__ import annotations

from commkit.emulate.group import (
    DEFAULT_NUM_SMS,
    EmulatedBuffers,
    EmulatedGroup,
    EmulatedState,
    VirtualRank,
    _cat_rows,
)

__all__ = ["DEFAULT_NUM_SMS", "EmulatedBuffers", "EmulatedGroup", "EmulatedState", "VirtualRank", "_cat_rows"]
