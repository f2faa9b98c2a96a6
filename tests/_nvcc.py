"""Shared helpers for the CPU compile tests (nvcc present, host programs built against commkit's
headers, representative kernel matrix, NCCL headers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from commkit.jit import nccl
from commkit.jit.compiler import KernelSpec, include_root, nvcc_path

requires_nvcc = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (CUDA toolkit not installed)")


def found_nvcc() -> str:
    """The nvcc the compile tests run (they are marked requires_nvcc: there is one)."""
    nvcc = nvcc_path()
    assert nvcc is not None
    return nvcc


def build_host_program(tmp_path: Path, name: str, source: str, *options: str) -> Path:
    """source (a host main() that includes csrc/ headers) written to tmp_path/name.cu and built for sm_90
    into tmp_path/name, the executable returned; options: more nvcc options (include dirs, diagnostics)."""
    src, exe = tmp_path / f"{name}.cu", tmp_path / name
    src.write_text(source)
    cmd = [found_nvcc(), "-std=c++17", "-arch=sm_90", "-I", str(include_root()), *options]
    subprocess.run([*cmd, "-o", str(exe), str(src)], check=True, capture_output=True)
    return exe


def printed_values(exe: Path) -> dict[str, int]:
    """What a host program prints as lines "NAME value": the host mirror tests compare it with Python."""
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def cached_wheel_headers(requirement: str, with_library: bool = False) -> nccl.NcclHeaders:
    """The headers of an NCCL wheel from the local wheel cache (tests reach no network): the test
    skips, saying why, when the wheel is not there."""
    try:
        return nccl.wheel_headers(requirement, with_library=with_library, offline=True)
    except nccl.NcclHeadersError as exc:
        pytest.skip(f"needs the real NCCL headers: {exc}")


# The header sets the GIN tests run against (the params of their `headers` fixtures): the installed
# nvidia.nccl package when it has the GIN device API, else the latest nvidia-nccl-cu12 wheel; and the
# oldest series with GIN.
GIN_HEADER_SETS = ("installed-or-latest", "2.28.9")
OLDEST_GIN_WHEEL = "nvidia-nccl-cu12==2.28.9"


def gin_headers(which: str, with_library: bool = False) -> nccl.NcclHeaders:
    """The NCCL headers of one of GIN_HEADER_SETS (with_library: and the libnccl next to them)."""
    if which != "installed-or-latest":
        return cached_wheel_headers(OLDEST_GIN_WHEEL, with_library=with_library)
    include = nccl.package_include_dir()
    if include is not None:
        try:
            return nccl.check_headers(include, f"package nvidia.nccl at {include.parent}")
        except nccl.NcclHeadersError as exc:
            print(f"installed NCCL not usable for GIN ({exc}); using the latest nvidia-nccl-cu12 wheel")
    return cached_wheel_headers("nvidia-nccl-cu12", with_library=with_library)


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
