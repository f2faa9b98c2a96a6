"""JIT compilation of the commkit kernels: template instantiation, nvcc, an on-disk cache, CuPy loading.

``compiler`` generates and compiles sources (no GPU or CuPy needed); ``loader`` loads cubins with CuPy
and is imported only when a kernel is launched.
"""

from commkit.jit.compiler import (
    CompileResult,
    KernelSpec,
    PtxasStats,
    cache_dir,
    compile_source,
    compile_spec,
    include_root,
    nvcc_path,
    parse_ptxas_log,
)

__all__ = [
    "CompileResult",
    "KernelSpec",
    "PtxasStats",
    "cache_dir",
    "compile_source",
    "compile_spec",
    "include_root",
    "nvcc_path",
    "parse_ptxas_log",
]
