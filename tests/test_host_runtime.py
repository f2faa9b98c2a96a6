"""Host execution, its own semantics: what tests/host_kernels/runtime_cases.cuh checks of the runtime
(host/runtime.cpp) and the CUDA shim (host/cuda_shim.h, host/ptx_host.h), on the CPU.

Shuffles, votes and shared memory give what the CUDA programming guide defines; spin-waits across
blocks progress on 2 cores; a barrier or warp collective that not every required thread reaches is a
``KernelFault`` with a report (never a hang); a bounded wait that times out is a ``CommTimeoutError``
with the kernel's own report; an unbounded spin is stopped by the watchdog; the FP8 and bf16
conversions agree with torch bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from commkit.errors import CommTimeoutError, ConfigError, KernelFault
from commkit.jit.compiler import KernelSpec
from commkit.jit.host import host_unavailable_reason, load_host_kernel

pytestmark = pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason()))

CASES_DIR = str(Path(__file__).resolve().parent / "host_kernels")


def _kernel(name: str):  # noqa: ANN202
    spec = KernelSpec("runtime_cases.cuh", f"test::{name}", (), include_dirs=(CASES_DIR,))
    return load_host_kernel(spec)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_warp_collectives_and_shared_memory(seed: int) -> None:
    out = torch.full((4, 320), -1, dtype=torch.int32)
    _kernel("warp_ops_kernel").launch(4, 64, (_ptr(out),), seed=seed, watchdog_s=60)
    lane = torch.arange(64) % 32
    warp = torch.arange(64) // 32
    v = 100 * warp + lane
    for b in range(4):
        assert out[b, :64].tolist() == (100 * warp + 31 - lane).tolist()
        assert out[b, 64:128].tolist() == (100 * warp + (lane ^ 5)).tolist()
        assert out[b, 128:192].tolist() == torch.where(lane >= 3, v - 3, v).tolist()
        assert out[b, 192:256].tolist() == [0xFF] * 64
        assert out[b, 256:].tolist() == [7000 + b] * 64, "__shared__ is one copy per block"


@pytest.mark.parametrize("blocks", [2, 16])
def test_spin_waits_progress_across_blocks(blocks: int) -> None:
    flags = torch.zeros(blocks, dtype=torch.int32)
    out = torch.zeros(blocks, dtype=torch.int32)
    _kernel("chain_kernel").launch(
        blocks, 128, (_ptr(flags), _ptr(out), np.int64(30e9)), seed=5, watchdog_s=60
    )
    assert out.tolist() == list(range(1, blocks + 1))


def test_atomics_count_every_thread() -> None:
    out = torch.zeros(1, dtype=torch.int32)
    _kernel("atomic_count_kernel").launch(3, 96, (_ptr(out),), seed=2, watchdog_s=60)
    assert int(out) == 3 * 96


def test_barrier_not_every_thread_reaches_is_a_fault() -> None:
    out = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(KernelFault, match="cannot progress") as info:
        _kernel("divergent_barrier_kernel").launch(1, 128, (_ptr(out),), seed=0, watchdog_s=60)
    assert "barrier 0: 64 of 128 threads arrived" in str(info.value)
    assert "64 of 128 threads exited" in str(info.value)


def test_barrier_completed_by_half_warps_is_a_fault() -> None:
    out = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(KernelFault, match="16 of the 32 threads of warp"):
        _kernel("half_warp_barrier_kernel").launch(1, 128, (_ptr(out),), seed=0, watchdog_s=60)


def test_shuffle_a_lane_skips_is_a_fault() -> None:
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(KernelFault, match=r"warp 0: __shfl_sync mask 0xffffffff, lanes 0xffffffdf arrived"):
        _kernel("missing_lane_shuffle_kernel").launch(1, 32, (_ptr(out),), seed=0, watchdog_s=60)


def test_bounded_wait_timeout_is_a_comm_timeout_with_the_report() -> None:
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(CommTimeoutError) as info:
        _kernel("timeout_kernel").launch(2, 64, (_ptr(flag), np.int64(2e8)), seed=0, watchdog_s=60)
    assert "commkit test wait: rank 3 channel 1 role receiver peer 2: expected 42, observed 0" in str(
        info.value
    )


def test_unbounded_spin_is_stopped_by_the_watchdog() -> None:
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(KernelFault, match="watchdog"):
        _kernel("unbounded_spin_kernel").launch(1, 32, (_ptr(flag),), seed=0, watchdog_s=0.5)


def test_fp8_and_bf16_conversions_match_torch() -> None:
    # Every float16 value (finite, both signs, subnormals and the rounding ties of e4m3 and bf16
    # among them), the e4m3 range edges and values past them (saturation)
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    edges = torch.tensor(
        [448.0, 449.0, 463.9, 464.0, 465.0, 1e6, -1e6, 2.0**-6, 2.0**-9, 2.0**-10, 1e-30, -0.0]
    )
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    x = torch.cat([halves[torch.isfinite(halves)], edges, special]).contiguous()
    out8 = torch.zeros(x.numel(), dtype=torch.uint8)
    out16 = torch.zeros(x.numel(), dtype=torch.int16)
    _kernel("convert_kernel").launch(
        2, 256, (_ptr(x), _ptr(out8), _ptr(out16), np.int32(x.numel())), seed=0, watchdog_s=120
    )
    want8 = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)  # commkit.fp8's rule
    want8[-1] = 0x7F  # cvt's canonical NaN (torch keeps the sign); +-inf saturate to +-448 as clamped
    want8[-3:-1] = torch.tensor([0x7E, 0xFE], dtype=torch.uint8)
    bad = (out8 != want8).nonzero().flatten()
    assert bad.numel() == 0, [(float(x[i]), int(out8[i]), int(want8[i])) for i in bad[:5]]
    want16 = x.to(torch.bfloat16).view(torch.int16)
    want16[-1] = 0x7FFF  # cvt's canonical NaN
    bad = (out16 != want16).nonzero().flatten()
    assert bad.numel() == 0, [(float(x[i]), int(out16[i]), int(want16[i])) for i in bad[:5]]


def test_gin_is_refused_on_the_cpu() -> None:
    spec = KernelSpec("csrc/internode_gin.cuh", "internode_combine_kernel", ("commkit::GinNet", 2, 2, 128))
    with pytest.raises(ConfigError, match="GIN"):
        load_host_kernel(spec)


def test_a_sanitizer_variant_needs_its_runtime_loaded() -> None:
    spec = KernelSpec("runtime_cases.cuh", "test::atomic_count_kernel", (), include_dirs=(CASES_DIR,))
    with pytest.raises(ConfigError, match="LD_PRELOAD"):
        load_host_kernel(spec, "tsan")


def test_syncwarp_waits_for_the_lanes_that_did_not_exit_and_segments_shuffle() -> None:
    out = torch.full((64,), -7, dtype=torch.int32)
    _kernel("exited_lanes_kernel").launch(1, 64, (_ptr(out),), seed=4, watchdog_s=60)
    lane = torch.arange(16)
    segment = lane // 8 * 8
    want = (lane ^ 1) + 1000 * (segment + (lane + 2) % 8)
    assert out[:16].tolist() == want.tolist() and out[32:48].tolist() == want.tolist()
    assert out[16:32].tolist() == [-7] * 16  # exited


def test_named_barrier_of_two_warps_completes_and_orders_shared_memory() -> None:
    out = torch.zeros(128, dtype=torch.int32)
    _kernel("named_barrier_kernel").launch(1, 128, (_ptr(out),), seed=9, watchdog_s=60)
    assert (
        out[32:96].tolist() == [5] * 64 and out[:32].tolist() == [-1] * 32 and out[96:].tolist() == [-1] * 32
    )


def test_a_trap_stops_every_block() -> None:
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(CommTimeoutError) as info:  # the others would wait 60 s: the trap ends them at once
        _kernel("trap_stops_others_kernel").launch(6, 32, (_ptr(flag), np.int64(60e9)), seed=0, watchdog_s=30)
    assert "commkit test trap: rank 0 channel 0 role sender peer 1: expected 2, observed 3" in str(info.value)
    assert "never" not in str(info.value)


def test_a_block_size_the_runtime_cannot_run_is_refused() -> None:
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(KernelFault, match="a block of 48 threads"):
        _kernel("atomic_count_kernel").launch(1, 48, (_ptr(out),), seed=0, watchdog_s=60)
    with pytest.raises(ValueError, match="watchdog_s"):
        _kernel("atomic_count_kernel").launch(1, 32, (_ptr(out),), seed=0, watchdog_s=float("inf"))
