"""GPU: the kernels (virtual ranks on one GPU) against commkit.reference, bit for bit.

Outputs are poisoned (0xFF bytes) before every run so that unwritten rows show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from kernel_cases import (
    KCase,
    bits,
    compare_dispatch,
    expected_dispatch,
    expert_outputs,
    make_inputs,
    to_device,
)

from commkit import reference

pytestmark = pytest.mark.gpu

CASES = [
    KCase((64, 64)),
    KCase((901, 17, 0, 333), hidden=4096, num_topk=4, num_experts=32, skew=1.5, seed=1),
    KCase((256,) * 8, hidden=7168, num_topk=8, num_experts=256, seed=2),
    KCase((300, 1, 77, 128, 5, 999, 64, 3), hidden=2048, num_topk=6, num_experts=64, unused=0.3, seed=3),
    KCase((512, 512, 512, 512), hidden=2048, num_topk=1, num_experts=8, empty_rank=2, seed=4),
    KCase((129, 257), hidden=7168, num_topk=8, num_experts=16, skew=3.0, expert_alignment=32, seed=5),
    KCase((200, 100, 50), hidden=1024, num_topk=2, num_experts=6, unused=0.9, num_sms=1, seed=6),
    KCase((333,) * 8, hidden=7168, num_topk=8, num_experts=256, dtype="fp8", num_sms=8, seed=7),
    KCase((45, 1000), hidden=4096, num_topk=4, num_experts=64, dtype="fp8", skew=2.0, seed=8),
    KCase((400, 3, 250, 90), hidden=2048, num_topk=8, num_experts=128, dtype="cast", seed=9),
    KCase(
        (1024, 1023, 1, 1000, 512, 0, 999, 1024),
        hidden=7168,
        num_topk=8,
        num_experts=256,
        num_sms=16,
        seed=10,
    ),
]


_EXPECTED: dict[KCase, tuple] = {}


def _group(case: KCase):
    from commkit.emulate import EmulatedGroup

    group = EmulatedGroup(case.num_ranks, num_sms=case.num_sms, timeout_s=30.0)
    group.engine.poison_outputs = True
    return group


def _run_and_check(group, case: KCase, handles=None, num_worst_tokens=None):
    device = group.device
    xs, scales, idxs, weights = make_inputs(case)
    if case not in _EXPECTED:  # the reference is slow (Python loops): once per case
        want = expected_dispatch(case, xs, scales, idxs, weights)
        ys = expert_outputs([w.x for w in want], case.seed)
        _EXPECTED[case] = (want, ys, reference.combine_reference(ys, want, list(case.tokens)))
    want, ys_expert, want_y = _EXPECTED[case]
    outs = group.dispatch(
        to_device(xs, device),
        to_device(idxs, device),
        to_device(weights, device),
        case.num_experts,
        x_scales=to_device(scales, device),
        cast_to_fp8=case.dtype == "cast",
        handles=handles,
        expert_alignment=case.expert_alignment,
        num_worst_tokens=num_worst_tokens,
    )
    torch.cuda.synchronize()
    errors = compare_dispatch(outs, want, None if num_worst_tokens is None else [w.x.shape[0] for w in want])
    assert not errors, errors[:10]

    # Combine: expert outputs computed on CPU from the reference rows, sent back by the kernels
    if num_worst_tokens is None:
        x_in = [y.to(device) for y in ys_expert]
    else:  # pad to num_worst_tokens rows
        x_in = [
            torch.cat([y, torch.zeros(num_worst_tokens - y.shape[0], y.shape[1], dtype=y.dtype)]).to(device)
            for y in ys_expert
        ]
    got_y = group.combine(x_in, [o.handle for o in outs])
    torch.cuda.synchronize()
    for s, (g, w) in enumerate(zip(got_y, want_y, strict=True)):
        assert torch.equal(bits(g.x.cpu()), bits(w)), (
            f"combine rank {s}: first diffs {(bits(g.x.cpu()) != bits(w)).nonzero()[:3].tolist()}"
        )
    return outs


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"R{c.num_ranks}-H{c.hidden}-K{c.num_topk}-{c.dtype}-s{c.seed}"
)
def test_dispatch_combine_bit_exact(case: KCase) -> None:
    group = _group(case)
    outs = _run_and_check(group, case)
    # Cached: same routing through the handles (no layout, no count exchange), twice
    for _ in range(2):
        _run_and_check(group, case, handles=[o.handle for o in outs])


def test_num_worst_tokens_no_host_sync() -> None:
    case = KCase((300, 200, 100, 50), hidden=2048, num_topk=4, num_experts=32, seed=11)
    group = _group(case)
    worst = sum(case.tokens)
    _run_and_check(group, case, num_worst_tokens=worst)  # checked; also the warm-up (JIT, buffers)
    xs, scales, idxs, weights = make_inputs(case)
    dev = group.device
    args = (to_device(xs, dev), to_device(idxs, dev), to_device(weights, dev), case.num_experts)
    torch.cuda.synchronize()
    # A full dispatch (layout and counts on the device) with num_worst_tokens: any host sync raises.
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = group.dispatch(*args, num_worst_tokens=worst)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    want = _EXPECTED[case][0]
    assert all(o.x.shape[0] == worst for o in outs)
    errors = compare_dispatch(outs, want, [w.x.shape[0] for w in want])
    assert not errors, errors[:10]


def test_layout_matches_reference() -> None:
    case = KCase((901, 0, 64, 5), num_topk=8, num_experts=64, unused=0.2, seed=12)
    group = _group(case)
    _, _, idxs, _ = make_inputs(case)
    got = group.get_dispatch_layout(to_device(idxs, group.device), case.num_experts)
    for r, g in enumerate(got):
        w = reference.layout_reference(idxs[r], case.num_experts, case.num_ranks)
        assert torch.equal(g.num_tokens_per_rank.cpu(), w.num_tokens_per_rank)
        assert torch.equal(g.num_tokens_per_expert.cpu(), w.num_tokens_per_expert)
        assert torch.equal(g.is_token_in_rank.cpu(), w.is_token_in_rank)


def test_varying_budget_between_calls() -> None:
    case = KCase((500, 400), num_sms=2, seed=13)
    group = _group(case)
    for num_sms in (2, 7, 1, 16):
        group.num_sms = num_sms
        _run_and_check(group, case)


def test_budget_that_does_not_fit_is_refused() -> None:
    from commkit.emulate import EmulatedGroup
    from commkit.errors import ConfigError

    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    group = EmulatedGroup(8, num_sms=num_sms)
    case = KCase((16,) * 8, num_sms=num_sms)
    with pytest.raises(ConfigError, match="resident at once"):
        _run_and_check(group, case)


def test_device_timeout_reports_and_traps() -> None:
    script = textwrap.dedent(
        """
        import torch
        from commkit.emulate import EmulatedGroup
        from commkit.backends.kernels import CallArgs, KernelEngine
        group = EmulatedGroup(2, num_sms=1, timeout_s=0.2)
        group.buffers.ensure(1, 4096)
        lonely = KernelEngine(2, 0, 1, group.buffers, timeout_s=0.2, device=group.device)
        lonely._cached_notify(CallArgs(2, 8, 4096, 0, 0, 1))  # rank 1 never arrives at the barrier
        torch.cuda.synchronize()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "commkit barrier: rank 0 channel -1 role barrier peer 1: expected 1, observed 0" in out, out[
        -2000:
    ]


def test_gemm_progresses_during_dispatch() -> None:
    case = KCase((4096,) * 4, hidden=7168, num_topk=8, num_experts=64, num_sms=8, seed=14)
    group = _group(case)
    group.engine.poison_outputs = False
    xs, _, idxs, weights = make_inputs(case)
    xs, idxs, weights = (to_device(v, group.device) for v in (xs, idxs, weights))
    a = torch.randn(8192, 8192, device=group.device, dtype=torch.bfloat16)
    compute = torch.cuda.Stream()

    def gemms(n: int) -> None:
        with torch.cuda.stream(compute):
            for _ in range(n):
                a @ a

    gemms(2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gemms(10)
    torch.cuda.synchronize()
    alone = time.perf_counter() - t0

    outs = group.dispatch(xs, idxs, weights, case.num_experts, async_finish=True)
    handles = [o.handle for o in outs]
    torch.cuda.synchronize()
    start, gemm_start, gemm_done, comm_done = (torch.cuda.Event(enable_timing=True) for _ in range(4))
    start.record(compute)
    group.comm_stream.wait_event(start)
    for _ in range(20):  # cached dispatches (the handles): no host wait for counts
        group.dispatch(xs, idxs, weights, case.num_experts, handles=handles, async_finish=True)
    comm_done.record(group.comm_stream)
    gemm_start.record(compute)
    gemms(10)
    gemm_done.record(compute)
    torch.cuda.synchronize()
    together = start.elapsed_time(gemm_done) / 1e3
    comm_end_s, gemm_start_s = start.elapsed_time(comm_done) / 1e3, start.elapsed_time(gemm_start) / 1e3
    # The GEMMs share the GPU with 4 x 8 communication SMs: they slow down, they do not wait
    assert together < 3 * alone + 0.05, (alone, together)
    # They overlapped in time: the GEMMs started before the communication ended (the events say when,
    # on the device; a query() after synchronize() would be true in any case).
    assert os.environ.get("COMMKIT_SKIP_OVERLAP_CHECK") or gemm_start_s < comm_end_s, (
        f"GEMMs started {gemm_start_s * 1e3:.3f} ms after the start, communication ended at "
        f"{comm_end_s * 1e3:.3f} ms: serialized"
    )


def test_spawn_per_rank_code_on_gpu() -> None:
    from commkit.emulate import EmulatedGroup

    case = KCase((77, 300, 5, 128), hidden=2048, num_topk=4, num_experts=32, seed=15)
    xs, _, idxs, weights = make_inputs(case)
    want = expected_dispatch(case, xs, None, idxs, weights)
    group = EmulatedGroup(case.num_ranks, num_sms=4, timeout_s=30.0)
    dev = group.device

    def per_rank(backend):
        r = backend.rank
        out = backend.dispatch(
            xs[r].to(dev),
            None,
            idxs[r].to(dev),
            weights[r].to(dev),
            case.num_experts,
            layout=None,
            handle=None,
            expert_alignment=1,
            num_sms=4,
            previous_event=None,
            async_finish=False,
            buffer_id=0,
        )
        torch.cuda.synchronize()
        return out

    outs = group.spawn(per_rank)
    assert not compare_dispatch(outs, want)


def test_num_worst_tokens_too_small_traps() -> None:
    script = textwrap.dedent(
        """
        import torch
        from commkit.emulate import EmulatedGroup
        group = EmulatedGroup(2, num_sms=2, timeout_s=5.0)
        dev = group.device
        xs = [torch.ones(64, 256, dtype=torch.bfloat16, device=dev) for _ in range(2)]
        idxs = [torch.zeros(64, 1, dtype=torch.int64, device=dev) for _ in range(2)]  # all to rank 0
        ws = [torch.ones(64, 1, device=dev) for _ in range(2)]
        group.dispatch(xs, idxs, ws, 2, num_worst_tokens=100)  # rank 0 receives 128 rows
        torch.cuda.synchronize()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert (
        "num_worst_tokens is smaller than the rows received" in out and "expected 100, observed 128" in out
    ), out[-2000:]
