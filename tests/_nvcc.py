"""Shared helpers for the CPU compile tests (nvcc present, representative kernel matrix, NCCL headers)."""

from __future__ import annotations

import pytest

from commkit.jit import nccl
from commkit.jit.compiler import KernelSpec, nvcc_path

requires_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (CUDA toolkit not installed)")


def cached_wheel_headers(requirement: str, with_library: bool = False) -> nccl.NcclHeaders:
    """The headers of an NCCL wheel from the local wheel cache (tests reach no network): the test
    skips, saying why, when the wheel is not there."""
    try:
        return nccl.wheel_headers(requirement, with_library=with_library, offline=True)
    except nccl.NcclHeadersError as exc:
        pytest.skip(f"needs the real NCCL headers: {exc}")

RANKS = (2, 4, 8)
HIDDEN_TOPK = ((2048, 1), (4096, 4), (7168, 8))  # hidden 2048 to 7168, top-k 1 to 8
DTYPES = (0, 1, 2)  # bf16, FP8, bf16 cast to FP8 in the kernel
NODES = ((2, 2), (4, 2), (2, 4), (8, 2), (8, 4))  # (GPUs per node, nodes): 2x2, 2x4, 4x2 and real nodes
NVLINK_NET = "commkit::NvlinkDomainNet"


def representative_specs() -> dict[str, list[KernelSpec]]:
    """Kernel family -> the instantiations CI compiles."""
    return {
        # 16 and 32 ranks: the internode groups (the layout kernel's largest)
        "layout": [KernelSpec("csrc/layout.cuh", "layout_kernel", (r, k)) for r in RANKS for k in (1, 4, 8)]
        + [KernelSpec("csrc/layout.cuh", "layout_kernel", (r, 8)) for r in (16, 32)],
        "notify": [KernelSpec("csrc/notify.cuh", "notify_kernel", (r,)) for r in RANKS]
        + [KernelSpec("csrc/cached.cuh", "cached_notify_kernel", (r,)) for r in RANKS],
        "dispatch": [
            KernelSpec("csrc/dispatch.cuh", "dispatch_kernel", (r, h, k, d))
            for r in RANKS
            for (h, k) in HIDDEN_TOPK
            for d in DTYPES
        ],
        "combine": [
            KernelSpec("csrc/combine.cuh", "combine_kernel", (r, h)) for r in RANKS for (h, _) in HIDDEN_TOPK
        ],
        # Virtual nodes (G, N) on the nvlink-domain net; the GIN net is compiled by test_gin_compile.py
        "internode_dispatch": [
            KernelSpec(
                "csrc/internode_dispatch.cuh", "internode_dispatch_kernel", (NVLINK_NET, g, n, h, k, d)
            )
            for (g, n) in NODES
            for (h, k) in HIDDEN_TOPK
            for d in DTYPES
        ],
        # Role splits other than the default 4 + 4 (the knobs of commkit.backends.internode.KNOBS)
        "internode_roles": [
            KernelSpec(
                "csrc/internode_dispatch.cuh", "internode_dispatch_kernel", (NVLINK_NET, 8, 2, 7168, 8, 1, w)
            )
            for w in (1, 2, 6, 7)
        ]
        + [
            KernelSpec("csrc/internode_combine.cuh", "internode_combine_kernel", (NVLINK_NET, 8, 4, 7168, w))
            for w in (1, 2, 6, 7)
        ],
        "internode_combine": [
            KernelSpec("csrc/internode_combine.cuh", "internode_combine_kernel", (NVLINK_NET, g, n, h))
            for (g, n) in NODES
            for h in (*(h for h, _ in HIDDEN_TOPK), 12288)
        ],
    }
