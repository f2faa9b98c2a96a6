"""CPU: csrc/net_gin.cuh (GinNet) compiles for sm_90 against two NCCL header sets, and the cache key
covers extra include directories.

(a) the installed nvidia.nccl package (nvidia-nccl-cu12/-cu13) when it has the GIN device API, else the
latest nvidia-nccl-cu12 wheel; (b) nvidia-nccl-cu12==2.28.9, the oldest series with GIN. The tests reach
no network: the wheels are taken from $COMMKIT_CACHE_DIR/nccl-wheels (default
~/.cache/commkit/nccl-wheels; commkit.jit.nccl.wheel_headers(..., offline=True), which unpacks only their
include directory) and a test that needs one that is not there skips, saying so.

Stack: NCCL's own device code of some GIN backends builds descriptors in local memory (measured with
nvcc 13.0 on the kernel below: 2.28.9 16 bytes, from the proxy backend; 2.32.3 136 bytes, from the EFA-GDA
and GPI backends). The build must contain every backend (NCCL picks one at run time), so those bytes are
printed, not asserted to be 0; the same kernel built with only the GDAKI backend must have 0 bytes of
stack, which shows that GinNet itself adds none. Spills must be 0 in both builds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _nvcc import GIN_HEADER_SETS, found_nvcc, gin_headers, requires_nvcc

from commkit.backends.gin import GIN_BACKENDS, backend_defines
from commkit.jit import nccl
from commkit.jit.compiler import (
    DEFAULT_OPTIONS,
    CompileResult,
    KernelSpec,
    PtxasStats,
    cache_key,
    compile_source,
    compile_spec,
    include_dirs_digest,
    include_root,
)

# NOTE: slow (nvcc over NCCL's device headers, 5-20 s a kernel): outside the fast subset
pytestmark = [requires_nvcc, pytest.mark.slow]

FIXTURES = Path(__file__).parent / "fixtures" / "nccl_h"

# Every member of GinNet::View, called the way the internode kernels call them: the writer group fills
# staging slots, one thread delivers a chunk (and a signal-only end mark), frees slots, reads and resets.
SOURCE = r"""
#include "csrc/net_gin.cuh"

namespace commkit {
__global__ void __launch_bounds__(kNumThreads, 1) gin_net_members(GinNet net, int rank, int* out) {
    const GinNet::View view = net.at(rank);
    const int channel = blockIdx.x;
    const int node = (view.node + 1) % view.layout.num_nodes;
    uint8_t* slot = view.send_slot(node, channel, threadIdx.x % kNetSlots);
    slot[threadIdx.x / kNetSlots] = static_cast<uint8_t>(threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) {
        view.put_signal(node, channel, 0, kNetChunk, kNetDispatchTail, kNetChunk);
        view.put_signal(node, channel, kNetChunk, 0, kNetDispatchTail, kFinishedBit);
        const int tail = view.read_signal(kNetDispatchTail, channel, node);
        out[channel] = tail + view.recv_slot(channel, node, tail % kNetSlots)[0];
        view.signal_add(node, kNetDispatchHead, channel, kNetChunk);
        view.reset_signal(kNetDispatchTail, channel, node);
    }
}
}  // namespace commkit

static void instantiate() { (void)reinterpret_cast<const void*>(&commkit::gin_net_members); }
"""

# Only NCCL's GDAKI backend (the macros NCCL's gin_device_common.h defaults to 1 when undefined)
GDAKI_ONLY = ("-DNCCL_GIN_PROXY_ENABLE=0", "-DNCCL_GIN_GPI_ENABLE=0", "-DNCCL_GIN_EFA_GDA_ENABLE=0")


@pytest.fixture(scope="module", params=GIN_HEADER_SETS)
def headers(request: pytest.FixtureRequest) -> nccl.NcclHeaders:
    return gin_headers(request.param)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gin-cache")


def _compile(headers: nccl.NcclHeaders, cache: Path, extra: tuple[str, ...] = ()) -> CompileResult:
    return compile_source(
        SOURCE, options=DEFAULT_OPTIONS + extra, cache=cache, include_dirs=(headers.include_dir,)
    )


def _spill_free_stats(result: CompileResult, what: str) -> PtxasStats:
    """The ptxas stats of the result's first kernel, printed after what it is (the stack is printed,
    not asserted: see the module docstring); spills must be 0."""
    stats = result.stats[result.entries[0]]
    print(
        f"{what}: {stats.registers} registers, {stats.stack_frame_bytes} bytes stack, "
        f"{stats.spill_store_bytes}/{stats.spill_load_bytes} bytes spill stores/loads"
    )
    assert stats.spill_store_bytes == 0 and stats.spill_load_bytes == 0, result.ptxas_log
    return stats


def test_gin_net_compiles_without_spills(headers: nccl.NcclHeaders, cache: Path) -> None:
    result = _compile(headers, cache)
    assert len(result.stats) == 1 and "gin_net_members" in result.entries[0], result.ptxas_log
    what = f"NCCL {nccl.version_str(headers.version)} ({headers.origin}), all GIN backends"
    stats = _spill_free_stats(result, what)
    assert stats.registers * 512 <= 65536  # one 512-thread block per SM, like dispatch/combine


def test_gin_net_itself_adds_no_stack(headers: nccl.NcclHeaders, cache: Path) -> None:
    result = _compile(headers, cache, GDAKI_ONLY)
    stats = result.stats[result.entries[0]]
    print(
        f"NCCL {nccl.version_str(headers.version)}, GDAKI backend only: {stats.registers} registers, "
        f"{stats.stack_frame_bytes} bytes stack"
    )
    assert (stats.stack_frame_bytes, stats.spill_store_bytes, stats.spill_load_bytes) == (0, 0, 0), (
        result.ptxas_log
    )


def test_strong_signals_where_the_api_has_them(headers: nccl.NcclHeaders) -> None:
    # net_gin.cuh names ncclGin_StrongSignalAdd from 2.30.5 on (before, every GIN signal is strong)
    gin_h = (headers.include_dir / "nccl_device" / "gin.h").read_text()
    assert ("ncclGin_StrongSignalAdd" in gin_h) == (headers.version >= (2, 30, 5))


def test_older_nccl_is_refused_by_the_header(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"needs the headers of NCCL >= 2\.28\.7"):
        compile_source(SOURCE, cache=tmp_path, include_dirs=(FIXTURES / "2.27.7",))


def test_cache_key_covers_extra_include_dirs(tmp_path: Path) -> None:
    nvcc = found_nvcc()
    inc = tmp_path / "nccl"
    shutil.copytree(FIXTURES / "2.28.9", inc)
    root = include_root()
    base = cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc, (inc,))
    assert cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc, (inc,)) == base
    assert cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc) != base
    assert cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc, ()) == cache_key(
        SOURCE, DEFAULT_OPTIONS, root, nvcc
    )

    (inc / "nccl.h").write_text((inc / "nccl.h").read_text() + "\n/* edited */\n")
    edited = cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc, (inc,))
    assert edited != base
    (inc / "nccl_device" / "impl").mkdir(parents=True)
    (inc / "nccl_device" / "impl" / "gin__funcs.h").write_text("/* a nested header */\n")
    nested = cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc, (inc,))
    assert nested != edited
    (inc / "notes.txt").write_text("not a header")
    assert cache_key(SOURCE, DEFAULT_OPTIONS, root, nvcc, (inc,)) == nested
    # -I order is part of the key
    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "2.27.7", other)
    assert include_dirs_digest((inc, other)) != include_dirs_digest((other, inc))


def test_header_edit_under_include_dir_rebuilds(tmp_path: Path) -> None:
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "extra.h").write_text("#define EXTRA_VALUE 1\n")
    source = '#include "extra.h"\n__global__ void k(int* p) { *p = EXTRA_VALUE; }\n'
    first = compile_source(source, cache=tmp_path / "cache", include_dirs=(inc,))
    again = compile_source(source, cache=tmp_path / "cache", include_dirs=(inc,))
    assert not first.cache_hit and again.cache_hit and again.cubin_path == first.cubin_path
    (inc / "extra.h").write_text("#define EXTRA_VALUE 2\n")
    rebuilt = compile_source(source, cache=tmp_path / "cache", include_dirs=(inc,))
    assert not rebuilt.cache_hit and rebuilt.cubin_path != first.cubin_path
    with pytest.raises(FileNotFoundError, match="include directories not found"):
        compile_source(source, cache=tmp_path / "cache", include_dirs=(tmp_path / "missing",))


# The internode kernels themselves with the GIN net, as the multi-node Buffer compiles them
# (KernelSpec with the NCCL include dir, csrc/internode_gin.cuh, and only the GIN backend the device
# communicator uses: commkit.backends.gin.backend_defines): (G, N, hidden, top-k, dtype) for dispatch,
# (G, N, hidden) for combine. No spills with any single backend. (With every backend compiled in, NCCL
# 2.32's EFA-GDA and GPI code pushed 2x2 combine over the 128-register cap: not what runs.) Stack: the
# EFA-GDA, GPI and (2.28) proxy backends keep descriptors in local memory, so it is printed; GDAKI
# builds must have none.
GIN_DISPATCH = ((2, 2, 2048, 1, 0), (4, 4, 7168, 8, 0), (8, 2, 7168, 8, 1), (8, 4, 7168, 8, 2))
GIN_COMBINE = ((2, 2, 12288), (8, 4, 7168))


def _gin_kernel_cases() -> list:
    cases = [("internode_dispatch_kernel", t) for t in GIN_DISPATCH]
    cases += [("internode_combine_kernel", t) for t in GIN_COMBINE]
    return [pytest.param(*c, id=f"{c[0].split('_')[1]}-{'-'.join(map(str, c[1]))}") for c in cases]


def _backends_of(headers: nccl.NcclHeaders) -> list[int]:
    """The GIN backends (ncclNetDeviceType) these headers have a device implementation of."""
    gin_dir = headers.include_dir / "nccl_device" / "gin"
    text = "".join(p.read_text(errors="replace") for p in gin_dir.rglob("*.h"))
    return [code for code, name in GIN_BACKENDS.items() if f"NCCL_GIN_{name}_ENABLE" in text]


@pytest.mark.parametrize(("name", "targs"), _gin_kernel_cases())
def test_gin_internode_kernels_compile_per_backend(
    headers: nccl.NcclHeaders, cache: Path, name: str, targs: tuple
) -> None:
    backends = _backends_of(headers)
    assert 3 in backends and 2 in backends, backends  # GDAKI and the proxy exist in every GIN NCCL
    for backend in backends:
        spec = KernelSpec(
            "csrc/internode_gin.cuh",
            name,
            ("commkit::GinNet", *targs),
            (str(headers.include_dir),),
            backend_defines((backend,)),
        )
        result = compile_spec(spec, cache=cache)
        what = f"NCCL {nccl.version_str(headers.version)} {GIN_BACKENDS[backend]} {name} {targs}"
        stats = _spill_free_stats(result, what)
        if backend == 3:
            assert stats.stack_frame_bytes == 0, result.ptxas_log


def test_backend_defines() -> None:
    assert backend_defines((3,)) == (
        "-DNCCL_GIN_PROXY_ENABLE=0",
        "-DNCCL_GIN_GDAKI_ENABLE=1",
        "-DNCCL_GIN_GPI_ENABLE=0",
        "-DNCCL_GIN_EFA_GDA_ENABLE=0",
    )
    assert backend_defines((2, 3)) == (
        "-DNCCL_GIN_PROXY_ENABLE=1",
        "-DNCCL_GIN_GDAKI_ENABLE=1",
        "-DNCCL_GIN_GPI_ENABLE=0",
        "-DNCCL_GIN_EFA_GDA_ENABLE=0",
    )
    assert backend_defines(()) == () and backend_defines((3, 9)) == ()  # unknown: every backend stays
