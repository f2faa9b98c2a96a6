"""Load cached cubins with CuPy (imported here, lazily: ``import commkit`` needs neither CuPy nor a GPU)."""

from __future__ import annotations

import functools
import threading
from typing import Any

from commkit.jit.compiler import KernelSpec, compile_spec

_lock = threading.Lock()


@functools.cache
def _module(cubin_path: str) -> Any:
    import cupy

    return cupy.RawModule(path=cubin_path)


def get_kernel(spec: KernelSpec) -> Any:
    """The CuPy function of one kernel instantiation (compiled on first use, then from the cache)."""
    with _lock:
        return _get_kernel(spec)


@functools.cache
def _get_kernel(spec: KernelSpec) -> Any:
    result = compile_spec(spec)
    if len(result.entries) != 1:
        raise RuntimeError(f"expected one entry function for {spec.expression()}, got {result.entries}")
    return _module(str(result.cubin_path)).get_function(result.entries[0])
