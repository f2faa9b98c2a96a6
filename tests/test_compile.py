"""CPU: every kernel of the representative matrix compiles for sm_90 without spills or local memory.

One nvcc run per kernel family (all its instantiations in one generated source), families in parallel.
The ptxas register counts are printed and written to ``ptxas_sm90.txt`` under the test's tmp dir
(``COMMKIT_PTXAS_TABLE=path`` writes them there too; the committed copy is
``bench/results/ptxas_sm90.txt``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _nvcc import build_host_program, found_nvcc, printed_values, representative_specs, requires_nvcc

from commkit.backends import kernels_layout as kl
from commkit.jit.compiler import CompileResult, compile_source, generate_source, nvcc_path

pytestmark = requires_nvcc


def _demangled_names(entries: list[str]) -> dict[str, str]:
    """Readable names (cu++filt next to nvcc, else binutils c++filt: the same Itanium mangling)."""
    nvcc = nvcc_path()
    tools = [str(Path(nvcc).parent / "cu++filt")] if nvcc else []
    tools += [t for t in (shutil.which("cu++filt"), shutil.which("c++filt")) if t]
    for tool in tools:
        if Path(tool).exists():
            proc = subprocess.run([tool], input="\n".join(entries), capture_output=True, text=True)
            if proc.returncode == 0:
                return dict(zip(entries, proc.stdout.split("\n"), strict=False))
    return {e: e for e in entries}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CompileResult]:
    cache = tmp_path_factory.mktemp("cache")
    families = representative_specs()

    def build(family: str) -> CompileResult:
        return compile_source(generate_source(families[family]), cache=cache)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(families, pool.map(build, families), strict=True))
    return results


@pytest.mark.slow
def test_every_instantiation_compiles(compiled: dict[str, CompileResult]) -> None:
    for family, specs in representative_specs().items():
        assert len(compiled[family].stats) == len(specs), (family, compiled[family].ptxas_log)


@pytest.mark.slow
def test_no_spills_no_local_memory(compiled: dict[str, CompileResult], tmp_path_factory) -> None:
    lines = [f"# ptxas -v, sm_90, {nvcc_version_line()}", "# registers  smem_bytes  kernel"]
    bad = []
    for family, result in compiled.items():
        names = _demangled_names(list(result.stats))
        for entry, stats in result.stats.items():
            lines.append(f"{stats.registers:11d}  {stats.smem_bytes:10d}  {names.get(entry, entry)}")
            if stats.spill_store_bytes or stats.spill_load_bytes or stats.stack_frame_bytes:
                bad.append((family, names.get(entry, entry), stats))
    table = "\n".join(lines) + "\n"
    print(table)
    (tmp_path_factory.mktemp("ptxas") / "ptxas_sm90.txt").write_text(table)
    if os.environ.get("COMMKIT_PTXAS_TABLE"):
        Path(os.environ["COMMKIT_PTXAS_TABLE"]).write_text(table)
    assert not bad, f"spills or local memory: {bad}"
    assert "lmem" not in "".join(r.ptxas_log for r in compiled.values())


@pytest.mark.slow
def test_registers_fit_one_block_per_sm(compiled: dict[str, CompileResult]) -> None:
    # 512 threads x registers <= 64K registers of an SM; ptxas enforces it through __launch_bounds__
    for family in ("dispatch", "combine"):
        for stats in compiled[family].stats.values():
            assert stats.registers * kl.NUM_THREADS <= 65536


def nvcc_version_line() -> str:
    out = subprocess.run([found_nvcc(), "--version"], capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    return lines[-1] if lines else "nvcc ?"


HOST_PROGRAM = r"""
#include <cstdio>
#include "csrc/dispatch.cuh"
#include "csrc/combine.cuh"
using namespace commkit;
int main() {
    printf("MAX_RANKS %d\nMAX_LOCAL_EXPERTS %d\nNUM_THREADS %d\nNUM_SLOTS %d\nCHUNK %d\nMAX_HIDDEN %d\n",
           kMaxRanks, kMaxLocalExperts, kNumThreads, kNumSlots, kChunk, kMaxHidden);
    printf("INBOX_OFFSET %lld\nINBOX_BYTES %lld\nCOUNTERS_OFFSET %lld\n",
           (long long)BufferLayout::kInboxOffset, (long long)BufferLayout::kInboxBytes,
           (long long)BufferLayout::kCountersOffset);
    printf("ring_offset_24 %lld\ntotal_24_14400 %lld\n", (long long)BufferLayout::ring_offset(24),
           (long long)BufferLayout::total_bytes(24, 14400));
    printf("dispatch_7168_8_0 %d\ndispatch_7168_8_1 %d\ndispatch_2048_1_2 %d\n",
           DispatchConfig<8, 7168, 8, 0>::kSlotBytes, DispatchConfig<8, 7168, 8, 1>::kSlotBytes,
           DispatchConfig<2, 2048, 1, 2>::kSlotBytes);
    printf("combine_7168 %d\nwarps_per_peer_2 %d\nwarps_per_peer_8 %d\n", CombineConfig<8, 7168>::kSlotBytes,
           RoleSplit<2>::kWarpsPerPeer, RoleSplit<8>::kWarpsPerPeer);
    printf("CALL_INTS %d\nSTATUS_INTS %d\nSTATUS_SEQ %d\nSTATUS_PEER_CALL %d\nCALL_SEQ_OFFSET %lld\n",
           (int)kCallInts, (int)kStatusInts, (int)kStatusSeq, (int)kStatusPeerCall,
           (long long)BufferLayout::kCallSeqOffset);
}
"""


def test_host_mirror_of_device_layout(tmp_path: Path) -> None:
    values = printed_values(build_host_program(tmp_path, "layout", HOST_PROGRAM))
    expected = {
        "MAX_RANKS": kl.MAX_RANKS,
        "MAX_LOCAL_EXPERTS": kl.MAX_LOCAL_EXPERTS,
        "NUM_THREADS": kl.NUM_THREADS,
        "NUM_SLOTS": kl.NUM_SLOTS,
        "CHUNK": kl.CHUNK,
        "MAX_HIDDEN": kl.MAX_HIDDEN,
        "INBOX_OFFSET": kl.INBOX_OFFSET,
        "INBOX_BYTES": kl.INBOX_BYTES,
        "COUNTERS_OFFSET": kl.COUNTERS_OFFSET,
        "ring_offset_24": kl.ring_offset(24),
        "total_24_14400": kl.total_bytes(24, 14400),
        "dispatch_7168_8_0": kl.dispatch_slot_bytes(7168, 8, 0),
        "dispatch_7168_8_1": kl.dispatch_slot_bytes(7168, 8, 1),
        "dispatch_2048_1_2": kl.dispatch_slot_bytes(2048, 1, 2),
        "combine_7168": kl.combine_slot_bytes(7168),
        "warps_per_peer_2": kl.warps_per_peer(2),
        "warps_per_peer_8": kl.warps_per_peer(8),
        "CALL_INTS": kl.CALL_INTS,
        "STATUS_INTS": kl.STATUS_INTS,
        "STATUS_SEQ": kl.STATUS_SEQ,
        "STATUS_PEER_CALL": kl.STATUS_PEER_CALL,
        "CALL_SEQ_OFFSET": kl.CALL_SEQ_OFFSET,
    }
    assert values == expected
