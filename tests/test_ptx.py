"""CPU: every wrapper of ptx/ptx.cuh is documented, assembles for sm_90 and emits its instruction."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from _nvcc import found_nvcc, requires_nvcc

from commkit.jit.compiler import include_root

HEADER = include_root() / "ptx" / "ptx.cuh"

# A kernel that calls every wrapper once (the test below fails when a wrapper is missing here).
USES = r"""
#include "ptx/ptx.cuh"
using namespace commkit::ptx;
__global__ void uses_every_wrapper(int* p, int4* q, int64_t* r) {
    __shared__ alignas(128) int4 smem[64];
    __shared__ uint64_t bar;
    int a = ld_acquire_sys(p) + ld_acquire_gpu(p + 1) + ld_relaxed_sys(p + 2) + ld_relaxed_gpu(p + 3);
    a += lane_id() + ld_nc_s32(p + 4) + static_cast<int>(ld_nc_s64(r)) + ld_s32_no_allocate(p + 5);
    st_release_sys(p + 6, a);
    st_release_gpu(p + 7, a);
    st_relaxed_sys(p + 8, a);
    st_relaxed_gpu(p + 9, a);
    red_add_release_sys(p + 10, 1);
    fence_acq_rel_sys();
    fence_acq_rel_gpu();
    fence_sc_sys();
    int4 v = ld_v4_no_allocate(q);
    const int4 w = ld_nc_v4_no_allocate(q + 1);
    v.x += w.x;
    st_v4_no_allocate(q + 2, v);
    st_v2_no_allocate(reinterpret_cast<int2*>(q + 3), make_int2(v.y, v.z));
    if (threadIdx.x == 0) {
        mbarrier_init(&bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        fence_proxy_async_shared();
        mbarrier_arrive_expect_tx(&bar, 1024);
        bulk_load_to_shared(smem, q + 64, 1024, &bar);
        while (!mbarrier_try_wait_parity(&bar, 0)) {
        }
        bulk_store_from_shared(q + 128, smem, 1024);
        bulk_commit_group();
        bulk_wait_group_read<0>();
        bulk_wait_group<0>();
        fence_proxy_async_global();
    }
    named_barrier_sync(1, 64);
    p[11] = cvt_e4m3x2_rn_satfinite(1.0f, -2.0f) + static_cast<int>(smem_addr(smem));
    r[1] = static_cast<int64_t>(globaltimer_ns());
    if (a == 0x7fffffff)
        trap();
}
"""


def _wrappers() -> dict[str, tuple[str, str]]:
    """name -> (comment line above it, asm instruction text) for every wrapper in the header."""
    text = HEADER.read_text()
    found = {}
    pattern = re.compile(
        r"((?://[^\n]*\n)+)(?:template <[^>]*>\n)?__device__ __forceinline__ [\w:<> ]+?\b(\w+)\("
    )
    for m in pattern.finditer(text):
        name = m.group(2)
        body = text[m.end() : text.find("\n}\n", m.end())]
        asm = re.search(r'asm(?: volatile)?\(\s*(?:"\{\\n"\s*)?(?:"\.reg[^"]*"\s*)?"([^"]+)"', body)
        found[name] = (m.group(1).strip(), asm.group(1) if asm else "")
    return found


def test_every_wrapper_is_documented_and_used() -> None:
    wrappers = _wrappers()
    assert len(wrappers) >= 30, sorted(wrappers)
    for name, (comment, _) in wrappers.items():
        assert len(comment) > 20, f"{name}: needs a comment saying what it guarantees"
        assert re.search(rf"\b{name}\b", USES), f"{name}: add it to USES so that it is assembled"


def test_no_raw_asm_outside_ptx_header() -> None:
    root = include_root() / "csrc"
    offenders = [p.name for p in root.glob("*.cuh") if re.search(r"\basm\s*(volatile\s*)?\(", p.read_text())]
    assert not offenders, f"inline PTX belongs in ptx/ptx.cuh: {offenders}"


def _uses_source(tmp_path: Path) -> Path:
    src = tmp_path / "uses.cu"
    src.write_text(USES)
    return src


@requires_nvcc
def test_wrappers_assemble_and_emit_their_instruction(tmp_path: Path) -> None:
    src = _uses_source(tmp_path)
    cmd = [found_nvcc(), "-arch=sm_90", "-std=c++17", "-I", str(include_root())]
    ptx = subprocess.run([*cmd, "-ptx", "-o", "-", str(src)], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    cubin = subprocess.run(
        [*cmd, "-cubin", "-o", str(tmp_path / "uses.cubin"), str(src)], capture_output=True, text=True
    )
    assert cubin.returncode == 0, cubin.stderr
    for name, (_, asm) in _wrappers().items():
        if not asm:
            continue  # a helper without inline PTX (e.g. smem_addr uses an intrinsic)
        mnemonic = asm.split()[0].rstrip(";")
        if "%" in mnemonic:
            continue
        assert mnemonic in ptx.stdout, f"{name}: {mnemonic} not found in the generated PTX"


@requires_nvcc
def test_wrappers_assemble_for_sm90a(tmp_path: Path) -> None:
    src = _uses_source(tmp_path)
    cmd = [found_nvcc(), "-arch=sm_90a", "-std=c++17", "-I", str(include_root()), "-cubin"]
    out = subprocess.run([*cmd, "-o", str(tmp_path / "u.cubin"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
