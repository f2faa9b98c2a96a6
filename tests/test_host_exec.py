"""Host execution of the kernels (``commkit.jit.host``): the kernel cases of ``tests/gpu/``, scaled to
what 2 CPU cores run in seconds, through ``EmulatedGroup(..., device="cpu")`` against
``commkit.reference``, bit for bit.

The very sources of ``csrc/`` run (layout, notify, cached notify, dispatch, combine and the internode
kernels on virtual nodes); outputs are poisoned (0xFF bytes) before every run so that unwritten rows
show; the fiber order of each block varies with the launcher's seed. Under ThreadSanitizer and
AddressSanitizer: ``test_host_sanitizers.py``.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from kernel_cases import (
    KCase,
    bits,
    compare_dispatch,
    expected_dispatch,
    expert_outputs,
    internode_inputs,
    make_inputs,
)

import commkit
from commkit import reference
from commkit.backends import kernels_layout as kl
from commkit.backends.kernel_args import CachedNotifyArgs
from commkit.backends.launcher import HostLauncher, raw_args
from commkit.emulate import EmulatedGroup
from commkit.errors import CommTimeoutError
from commkit.fp8 import cast_to_fp8
from commkit.jit.compiler import KernelSpec
from commkit.jit.host import host_unavailable_reason

pytestmark = pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason()))
slow = pytest.mark.slow

# The GPU cases (tests/gpu/test_kernels_gpu.py) with fewer tokens, hidden and SMs
INTRA_CASES = [
    pytest.param(KCase((48, 48), hidden=256, num_topk=8, num_experts=16, num_sms=2), id="2r-bf16"),
    pytest.param(KCase((90, 17, 0, 33), hidden=256, num_topk=4, num_experts=32, skew=1.5, seed=1),
                 id="4r-skew-empty-source", marks=slow),
    pytest.param(KCase((60, 1, 77, 12, 5, 40, 64, 3), hidden=512, num_topk=6, num_experts=64, unused=0.3,
                       num_sms=2, seed=3), id="8r-unused", marks=slow),
    pytest.param(KCase((64, 64, 64, 64), hidden=256, num_topk=1, num_experts=8, empty_rank=2, seed=4),
                 id="4r-empty-rank", marks=slow),
    pytest.param(KCase((29, 57), hidden=256, num_topk=8, num_experts=16, skew=3.0, expert_alignment=32,
                       seed=5), id="2r-align32", marks=slow),
    pytest.param(KCase((20, 10, 5), hidden=128, num_topk=2, num_experts=6, unused=0.9, num_sms=1, seed=6),
                 id="3r-mostly-unused", marks=slow),
    pytest.param(KCase((33,) * 8, hidden=256, num_topk=8, num_experts=256, dtype="fp8", num_sms=1, seed=7),
                 id="8r-fp8", marks=slow),
    pytest.param(KCase((45, 100), hidden=256, num_topk=4, num_experts=64, dtype="fp8", skew=2.0, seed=8),
                 id="2r-fp8-skew", marks=slow),
    pytest.param(KCase((40, 3, 25, 9), hidden=256, num_topk=8, num_experts=128, dtype="cast", seed=9),
                 id="4r-cast", marks=slow),
    pytest.param(KCase((0, 0), hidden=256, num_topk=8, num_experts=16, seed=10),
                 id="2r-zero-tokens", marks=slow),
]  # fmt: skip


def _group(num_ranks: int, num_sms: int, *, per_node: int | None = None, seed: int = 0) -> EmulatedGroup:
    group = EmulatedGroup(
        num_ranks, num_sms=num_sms, device="cpu", num_ranks_per_node=per_node, timeout_s=60.0,
        launcher=HostLauncher(seed=seed, watchdog_s=300.0),
    )  # fmt: skip
    group.engine.poison_outputs = True
    return group


def _check_intranode(case: KCase, seed: int, worst: bool) -> None:
    xs, scales, idxs, weights = make_inputs(case)
    want = expected_dispatch(case, xs, scales, idxs, weights)
    ys = expert_outputs([w.x for w in want], case.seed)
    want_y = reference.combine_reference(ys, want, list(case.tokens))
    group = _group(case.num_ranks, case.num_sms, seed=seed)
    worst_rows = max([w.x.shape[0] for w in want] + [0]) + 3 if worst else None
    handles = None
    for _ in range(2):  # fresh, then cached through the handles
        outs = group.dispatch(
            xs, idxs, weights, case.num_experts, x_scales=scales, cast_to_fp8=case.dtype == "cast",
            handles=handles, expert_alignment=case.expert_alignment, num_worst_tokens=worst_rows,
        )  # fmt: skip
        errors = compare_dispatch(outs, want, None if not worst else [w.x.shape[0] for w in want])
        assert not errors, errors[:10]
        if worst:  # padding rows look unrouted
            for o, w in zip(outs, want, strict=True):
                assert o.x.shape[0] == worst_rows
                assert (o.topk_idx[w.x.shape[0] :] == -1).all() and (
                    o.topk_weights[w.x.shape[0] :] == 0
                ).all()
        pad = [torch.zeros(worst_rows - y.shape[0], y.shape[1], dtype=y.dtype) for y in ys] if worst else None
        x_in = ys if pad is None else [torch.cat([y, p]) for y, p in zip(ys, pad, strict=True)]
        got = group.combine(x_in, [o.handle for o in outs])
        for s, (g, w) in enumerate(zip(got, want_y, strict=True)):
            assert torch.equal(bits(g.x), bits(w)), (
                f"combine rank {s}: {(bits(g.x) != bits(w)).nonzero()[:3]}"
            )
        handles = [o.handle for o in outs]


@pytest.mark.parametrize("case", INTRA_CASES)
def test_intranode_bit_exact(case: KCase) -> None:
    _check_intranode(case, seed=case.seed, worst=False)


@pytest.mark.parametrize("seed", [0, 11, 12345])
def test_fiber_orders(seed: int) -> None:
    _check_intranode(KCase((37, 21, 0, 50), hidden=256, num_topk=4, num_experts=32, unused=0.2, seed=2),
                     seed=seed, worst=False)  # fmt: skip


@slow
@pytest.mark.parametrize("dtype", ["bf16", "fp8", "cast"])
def test_num_worst_tokens(dtype: str) -> None:
    _check_intranode(KCase((40, 0, 23), hidden=256, num_topk=4, num_experts=12, dtype=dtype, seed=13),
                     seed=1, worst=True)  # fmt: skip


@slow
def test_num_worst_tokens_too_small_traps_with_the_report() -> None:
    case = KCase((40, 40), hidden=256, num_topk=8, num_experts=16, seed=14)
    xs, _, idxs, weights = make_inputs(case)
    group = _group(2, 1)
    with pytest.raises(CommTimeoutError, match="num_worst_tokens is smaller than the rows received"):
        group.dispatch(xs, idxs, weights, case.num_experts, num_worst_tokens=5)


@pytest.mark.parametrize("num_ranks, per_node", [(2, None), (4, None), pytest.param(8, None, marks=slow),
                                                 (4, 2), pytest.param(8, 4, marks=slow)])  # fmt: skip
def test_layout_matches_reference(num_ranks: int, per_node: int | None) -> None:
    case = KCase(tuple(range(30, 30 + 7 * num_ranks, 7)), hidden=128, num_topk=4, num_experts=8 * num_ranks,
                 unused=0.2, seed=num_ranks)  # fmt: skip
    _, _, idxs, _ = make_inputs(case)
    group = _group(num_ranks, 1, per_node=per_node)
    layouts = group.get_dispatch_layout(idxs, case.num_experts)
    for r, (got, idx) in enumerate(zip(layouts, idxs, strict=True)):
        want = reference.layout_reference(idx, case.num_experts, num_ranks, per_node)
        assert torch.equal(got.num_tokens_per_rank, want.num_tokens_per_rank), r
        assert torch.equal(got.num_tokens_per_expert, want.num_tokens_per_expert), r
        assert torch.equal(got.is_token_in_rank, want.is_token_in_rank), r
        if per_node is not None:
            assert torch.equal(got.num_tokens_per_node, want.num_tokens_per_node), r
            assert torch.equal(got.is_token_in_node, want.is_token_in_node), r


# Virtual nodes: (GPUs per node, nodes, tokens per rank, hidden, top-k, experts, dtype, num_sms), the
# cases of tests/gpu/test_internode_gpu.py with fewer tokens, hidden and SMs
INTER_CASES = [
    pytest.param((2, 2, (40, 0, 61, 7), 256, 4, 16, "bf16", 2), id="2x2-bf16"),
    pytest.param((4, 2, (30, 1, 17, 28, 5, 49, 24, 3), 256, 8, 64, "bf16", 1), id="2x4-bf16", marks=slow),
    pytest.param((2, 4, (26,) * 8, 256, 8, 64, "fp8", 1), id="4x2-fp8", marks=slow),
    pytest.param((2, 4, (30, 20, 0, 15, 33, 1, 2, 3), 256, 6, 32, "cast", 1), id="4x2-cast", marks=slow),
    pytest.param((2, 2, (50, 50, 50, 50), 128, 2, 8, "bf16", 3), id="2x2-3sms", marks=slow),
]


def _check_internode(case: tuple, knobs: dict[str, int] | None = None, seed: int = 0) -> None:
    gpus, nodes, tokens, hidden, num_topk, num_experts, dtype, num_sms = case
    xs, scales, idxs, ws = internode_inputs(
        gpus, nodes, tokens, hidden, num_topk, num_experts, dtype, gpus + nodes
    )
    ref_xs, ref_scales = (
        (xs, scales) if dtype != "cast" else tuple(map(list, zip(*map(cast_to_fp8, xs), strict=True)))
    )
    want = reference.dispatch_reference(ref_xs, idxs, ws, num_experts, x_scales=ref_scales)
    ys = expert_outputs([w.x for w in want], seed=1)
    want_y = reference.combine_reference(ys, want, list(tokens), num_ranks_per_node=gpus)
    group = _group(len(tokens), num_sms, per_node=gpus, seed=seed)
    if knobs:
        group.engine.set_knobs(knobs)
    handles = None
    for _ in range(2):  # fresh, then cached through the handles
        outs = group.dispatch(xs, idxs, ws, num_experts, x_scales=scales, cast_to_fp8=dtype == "cast",
                              handles=handles)  # fmt: skip
        errors = compare_dispatch(outs, want)
        assert not errors, errors[:10]
        got = group.combine(ys, [o.handle for o in outs])
        for s, (g, w) in enumerate(zip(got, want_y, strict=True)):
            bad = (bits(g.x) != bits(w)).any(1).nonzero().flatten().tolist()
            assert not bad, f"combine rank {s}: rows {bad[:10]} differ"
        handles = [o.handle for o in outs]
    # Each token crossed the inter-node hop once per remote node: the forwarders' records per source
    # node hold exactly the per-node counts of the layout
    st = outs[0].handle.state.shared
    fwd = st.fwd_offsets.view(len(tokens), nodes + 1)
    recorded = (st.fwd_token != 2**31 - 1).to(torch.int64)
    for r in range(len(tokens)):
        n, g = divmod(r, gpus)
        for m in range(nodes):
            lay = reference.layout_reference(idxs[m * gpus + g], num_experts, len(tokens), gpus)
            lo, hi = int(fwd[r, m]), int(fwd[r, m + 1])
            assert int(recorded[lo:hi].sum()) == int(lay.num_tokens_per_node[n]), (r, m)


@pytest.mark.parametrize("case", INTER_CASES)
def test_virtual_nodes_bit_exact(case: tuple) -> None:
    _check_internode(case, seed=3)


@slow
@pytest.mark.parametrize("warps", [(1, 7), (2, 6), (6, 2), (7, 1)], ids=lambda w: f"fwd{w[0]}-red{w[1]}")
def test_virtual_nodes_role_splits(warps: tuple[int, int]) -> None:
    case = (2, 2, (40, 0, 61, 7), 256, 4, 16, "bf16", 2)
    _check_internode(case, {"internode_dispatch_forwarder_warps": warps[0],
                            "internode_combine_forwarder_warps": warps[1]}, seed=warps[0])  # fmt: skip


@slow
@pytest.mark.parametrize("seed", [1, 99])
def test_virtual_nodes_fiber_orders(seed: int) -> None:
    _check_internode((2, 2, (40, 0, 61, 7), 256, 4, 16, "bf16", 2), seed=seed)


def test_per_rank_code_through_buffer_from_backend() -> None:
    case = KCase((21, 34), hidden=256, num_topk=8, num_experts=16, num_sms=2, seed=21)
    xs, _, idxs, weights = make_inputs(case)
    want = expected_dispatch(case, xs, None, idxs, weights)
    group = _group(2, 2)

    def body(backend):  # noqa: ANN001, ANN202 - what one rank of a real group would run
        buf = commkit.Buffer.from_backend(backend)
        out = buf.dispatch(xs[backend.rank], idxs[backend.rank], weights[backend.rank], case.num_experts)
        back = buf.combine(out.x, out.handle)
        return out, back

    results = group.spawn(body)
    assert not compare_dispatch([o for o, _ in results], want)
    want_y = reference.combine_reference([w.x for w in want], want, list(case.tokens))
    for (_, back), w in zip(results, want_y, strict=True):
        assert torch.equal(bits(back.x), bits(w))


def test_a_peer_that_never_arrives_is_a_timeout_with_the_report() -> None:
    launch = _barrier_launcher(_group(2, 1))
    with pytest.raises(CommTimeoutError) as info:  # rank 0's block alone: rank 1 never arrives
        launch(0, 1, 0.3)
    assert "commkit barrier: rank 0 channel -1 role barrier peer 1: expected 1, observed 0" in str(info.value)


def _barrier_launcher(group: EmulatedGroup):  # noqa: ANN202
    """Launches of the cached notify (agreement and barrier) for ranks [rank_base, rank_base + n)."""
    group.buffers.ensure(1, 64)
    barrier = group.launcher.kernel(KernelSpec(CachedNotifyArgs.HEADER, CachedNotifyArgs.KERNEL, (2,)))

    def launch(rank_base: int, num: int, timeout_s: float) -> torch.Tensor:
        status = torch.empty(num, kl.STATUS_INTS, dtype=torch.int32)
        args = CachedNotifyArgs(
            peer_bases=group.buffers.peer_bases, rank_base=rank_base, op=kl.OP_COMBINE, num_experts=8,
            hidden=64, num_topk=0, dtype=0, num_sms=1, handle_status=None, status=status,
            timeout_ns=int(timeout_s * 1e9),
        )  # fmt: skip
        barrier.launch(num, 128, raw_args(args), seed=0, watchdog_s=60)
        return status

    return launch


def test_a_barrier_left_by_a_timeout_never_lets_a_later_one_pass_early() -> None:
    """Barriers store their epoch: rank 0's barrier that timed out, begun again with rank 1, leaves
    nothing behind that would let rank 1 pass its next barrier alone (with increments it did)."""
    launch = _barrier_launcher(_group(2, 1))
    with pytest.raises(CommTimeoutError):
        launch(0, 1, 0.2)  # rank 0 alone: rank 1 never arrives
    status = launch(0, 2, 30)  # both ranks: the barrier rank 0 began again
    assert status[:, kl.STATUS_VERDICT].tolist() == [0, 0]
    alone = "rank 1 channel -1 role barrier peer 0: expected 2, observed 1"
    with pytest.raises(CommTimeoutError, match=alone):
        launch(1, 1, 0.2)  # rank 1 alone must wait for rank 0


def test_a_peer_two_barriers_ahead_is_reported() -> None:
    group = _group(2, 1)
    launch = _barrier_launcher(group)
    launch(0, 2, 30)
    epoch = group.buffers.peer_bases  # rank 0's header: it stands for a rank that ran 5 more barriers
    header = torch.frombuffer(
        (ctypes.c_int * 2).from_address(int(epoch[0])), dtype=torch.int32
    )  # fmt: skip
    header[kl.EPOCH_OFFSET // 4] += 5
    with pytest.raises(CommTimeoutError, match="a peer ran more barriers than this rank"):
        launch(0, 2, 0.5)
