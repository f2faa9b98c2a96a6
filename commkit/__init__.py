"""commkit: expert-parallel dispatch/combine for mixture-of-experts layers.

``Buffer`` is the API: ``dispatch`` sends each token to the ranks that host its top-k experts,
``combine`` brings the expert outputs back summed per token. ``commkit.reference`` holds the exact
semantics as pure functions over all ranks' inputs. Importing commkit needs neither CuPy nor a GPU.
"""

from typing import TYPE_CHECKING

from commkit.errors import CommError, CommTimeoutError, ConfigError, KernelFault

if TYPE_CHECKING:
    from commkit.buffer import Buffer
    from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

# NOTE: imported on first use (PEP 562), so that ``python -m commkit --help`` does not load torch
_LAZY = {
    "Buffer": "commkit.buffer",
    "CombineOutput": "commkit.types",
    "DispatchOutput": "commkit.types",
    "EventHandle": "commkit.types",
    "Handle": "commkit.types",
    "Layout": "commkit.types",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'commkit' has no attribute {name!r}")


def _version() -> str:
    """The installed distribution's version: pyproject.toml is the one place it is written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("commkit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "Buffer",
    "CombineOutput",
    "CommError",
    "CommTimeoutError",
    "ConfigError",
    "DispatchOutput",
    "EventHandle",
    "Handle",
    "KernelFault",
    "Layout",
    "__version__",
]
