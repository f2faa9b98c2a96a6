"""The process-group count exchange of the internode kernels (commkit/backends/count_exchange.py) gives
each rank the ``meta`` row that the notify kernel's contract defines (csrc/notify.cuh), on 2, 4 and 8
gloo processes; its barrier and node groups work; a missing peer ends in CommTimeoutError."""

from __future__ import annotations

import time

import pytest
import torch
from cases import Case, make_inputs

from commkit.backends import kernels_layout as kl
from commkit.backends.count_exchange import (
    MESSAGE_INTS,
    CallFormat,
    GroupCountExchange,
    count_message,
    meta_from_messages,
)
from commkit.backends.internode_backend import make_node_group, node_ranks, scatter_node_bases
from commkit.errors import CommTimeoutError
from commkit.launch import RankFailed, spawn_gloo
from commkit.reference import layout_reference


def expected_meta(case: Case, dst: int) -> list[int]:
    """meta of rank ``dst`` by the notify kernel's definition, from every rank's layout."""
    world = len(case.tokens)
    layouts = [layout_reference(make_inputs(case, r)[1], case.num_experts, world) for r in range(world)]
    local = case.num_experts // world
    rows = [int(lay.num_tokens_per_rank[dst]) for lay in layouts]
    offsets = [sum(rows[:s]) for s in range(world + 1)]
    experts = sum(lay.num_tokens_per_expert[dst * local : (dst + 1) * local] for lay in layouts)
    return [*offsets, *case.tokens, *(int(e) for e in experts)]


def cases_for(world: int) -> list[Case]:
    return [
        Case("uniform", (24,) * world, num_experts=4 * world, seed=1),
        Case("odd", tuple(5 + 3 * r for r in range(world)), num_experts=2 * world, unused=0.3, seed=2),
        Case("zero-tokens", (0,) + (9,) * (world - 1), num_experts=world, num_topk=1, seed=3),
        Case("skew-dup", (17,) * world, num_experts=8 * world, skew=3.0, duplicates=True, seed=4),
    ]


def test_meta_from_messages_single_process() -> None:
    """Messages built from every rank's layout give the expected meta for every destination."""
    world = 4
    for case in cases_for(world):
        layouts = [layout_reference(make_inputs(case, r)[1], case.num_experts, world) for r in range(world)]
        messages = [
            count_message(
                lay.num_tokens_per_rank.to(torch.int32), lay.num_tokens_per_expert.to(torch.int32), t
            )
            for lay, t in zip(layouts, case.tokens, strict=True)
        ]
        for dst in range(world):
            received = torch.stack([m[dst] for m in messages])
            assert received.shape == (world, MESSAGE_INTS)  # the same size whatever the call
            meta = meta_from_messages(received, case.num_experts // world, None)
            assert meta.dtype == torch.int32
            assert meta.shape == (1, kl.meta_stride(world, case.num_experts))
            assert meta[0].tolist() == expected_meta(case, dst), case.name


def test_meta_num_worst_tokens_bound() -> None:
    per_rank = [torch.tensor([3, 4], dtype=torch.int32), torch.tensor([4, 1], dtype=torch.int32)]
    per_expert = [torch.tensor([3, 0], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)]
    messages = [count_message(p, e, t) for p, e, t in zip(per_rank, per_expert, (5, 6), strict=True)]
    received = torch.stack([m[0] for m in messages])  # rank 0 receives 3 + 4 = 7 rows
    assert meta_from_messages(received, 1, 7)[0].tolist() == [0, 3, 7, 5, 6, 4]
    with pytest.raises(RuntimeError, match="num_worst_tokens=6 is smaller"):
        meta_from_messages(received, 1, 6)


def _exchange(rank: int, world: int, per_node: int) -> dict:
    import torch.distributed as dist

    ex = GroupCountExchange(None, device=torch.device("cpu"), timeout_s=30)
    metas = []
    for case in cases_for(world):
        _, topk_idx, _ = make_inputs(case, rank)
        lay = layout_reference(topk_idx, case.num_experts, world)
        fmt = CallFormat("dispatch", case.num_experts, case.hidden, case.num_topk, 0, 2)
        meta, agreement = ex.notify(
            lay.num_tokens_per_rank.to(torch.int32).view(1, -1),
            lay.num_tokens_per_expert.to(torch.int32).view(1, -1),
            case.tokens[rank],
            None,
            fmt,
        )
        assert agreement.error(agreement.host_values()) is None and bool(agreement.agree)
        ex.barrier(CallFormat("combine", case.num_experts, case.hidden, 0, 0, 2))
        metas.append(meta[0].tolist())
    # The node group: only this node's ranks made it; a sum over it counts them
    node = make_node_group(None, per_node)
    one = torch.ones(1)
    dist.all_reduce(one, group=node)
    return dict(metas=metas, node_size=int(one.item()), node_ranks=list(node_ranks(world, per_node, rank)))


@pytest.mark.parametrize(("world", "per_node"), [(2, 1), (4, 2), pytest.param(8, 4, marks=pytest.mark.slow)])
def test_group_exchange_matches_notify_contract(world: int, per_node: int) -> None:
    got = spawn_gloo(_exchange, world, per_node, timeout_s=120)
    for rank, g in enumerate(got):
        for case, meta in zip(cases_for(world), g["metas"], strict=True):
            assert meta == expected_meta(case, rank), f"{case.name}, rank {rank}"
        assert g["node_size"] == per_node
        first = rank // per_node * per_node
        assert g["node_ranks"] == list(range(first, first + per_node))


def test_scatter_node_bases() -> None:
    bases = scatter_node_bases(torch.tensor([11, 12], dtype=torch.int64), 6, 2)
    assert bases.tolist() == [0, 0, 11, 12, 0, 0]


def _one_rank_absent(rank: int, world: int) -> str:
    ex = GroupCountExchange(None, device=torch.device("cpu"), timeout_s=2)
    if rank == 1:
        time.sleep(6)  # never calls the barrier
        return "absent"
    start = time.monotonic()
    try:
        ex.barrier(CallFormat("combine", 8, 64, 0, 0, 2))
    except CommTimeoutError as exc:
        return f"{time.monotonic() - start:.1f}|{exc}"
    return "no error"


@pytest.mark.slow
def test_missing_peer_times_out() -> None:
    got = spawn_gloo(_one_rank_absent, 2, timeout_s=60, allow_failures=True)
    assert not isinstance(got[0], RankFailed), got[0]
    elapsed, message = got[0].split("|", 1)
    assert float(elapsed) < 5.0
    assert "barrier: rank 0 of 2" in message and "timeout_s=2s" in message


def _disagree(rank: int, world: int, field: str) -> list[str]:
    """Rank 2 passes another value of ``field``; every rank must raise ValueError, at the count
    exchange (a fresh dispatch) and at the barrier (a cached dispatch, a combine)."""
    import dataclasses

    ex = GroupCountExchange(None, device=torch.device("cpu"), timeout_s=30)
    fmt = CallFormat("dispatch", 4 * world, 64, 4, 0, 2)
    if rank == 2:
        fmt = dataclasses.replace(
            fmt, **{field: getattr(fmt, field) * 2 if field != "num_worst_tokens" else 8}
        )
    _, topk_idx, _ = make_inputs(Case("c", (12,) * world, num_experts=fmt.num_experts, seed=5), rank)
    lay = layout_reference(topk_idx, fmt.num_experts, world)
    errors = []
    try:
        ex.notify(lay.num_tokens_per_rank.to(torch.int32), lay.num_tokens_per_expert.to(torch.int32), 12,
                  None, fmt)  # fmt: skip
        errors.append("no error")
    except ValueError as exc:
        errors.append(str(exc))
    for op in ("cached dispatch", "combine"):
        try:
            ex.barrier(dataclasses.replace(fmt, op=op))
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    return errors


@pytest.mark.parametrize(
    "field",
    [
        "num_experts",
        "hidden",
        *(pytest.param(f, marks=pytest.mark.slow) for f in ("num_topk", "num_sms", "num_worst_tokens")),
    ],
)
def test_ranks_that_disagree_raise_on_every_rank(field: str) -> None:
    """Even num_experts (another message length in the old format) ends in ValueError on every rank,
    naming the peer (count exchange) or the field and its range (barrier), never a hang."""
    world = 4
    name = {"num_topk": "top-k"}.get(field, field)
    for rank, (exchange, cached, combine) in enumerate(spawn_gloo(_disagree, world, field, timeout_s=120)):
        peer = 0 if rank == 2 else 2
        assert exchange.startswith("dispatch: expected every rank to pass the same call (op=dispatch"), (
            exchange
        )
        assert exchange.endswith(f"from rank {peer}"), exchange
        assert cached.startswith("cached dispatch: expected every rank to pass the same call"), cached
        assert f"got {name} from " in cached and "across the ranks" in cached, cached
        assert combine.startswith("combine: expected every rank to pass the same call"), combine


def test_agreement_values_single_process() -> None:
    """The device-side facts (what a CUDA rank asserts on, and reads back to name the cause) computed by
    the same torch ops on CPU: the first peer that differs after the exchange, the first field and its
    range after the barrier; agree when every rank does."""
    from commkit.backends.count_exchange import barrier_agreement, exchange_agreement

    base = CallFormat("dispatch", 32, 7168, 8, 0, 24, 512)
    other = CallFormat("dispatch", 32, 4096, 8, 0, 24, 512)
    own = base.values()
    own_t = torch.tensor(own, dtype=torch.int32)
    per_rank, per_expert = torch.zeros(4, dtype=torch.int32), torch.zeros(32, dtype=torch.int32)
    rows = [count_message(per_rank, per_expert, 0, torch.tensor(f.values(), dtype=torch.int32))[0]
            for f in (base, base, other, other)]  # fmt: skip
    agreement = exchange_agreement(torch.stack(rows), own, own_t)
    assert not bool(agreement.agree)
    assert agreement.error(agreement.host_values()) == (
        "expected every rank to pass the same call (op=dispatch, num_experts=32, hidden=7168, top-k=8, "
        "dtype=0, num_sms=24, num_worst_tokens=512, rows fit=yes, call=0, handle=none), got (op=dispatch, "
        "num_experts=32, hidden=4096, top-k=8, dtype=0, num_sms=24, num_worst_tokens=512, rows fit=yes, "
        "call=0, handle=none) from rank 2"
    )
    same = exchange_agreement(torch.stack(rows[:2]), own, own_t)
    assert bool(same.agree) and same.error(same.host_values()) is None
    same.check()  # no error

    fmt_t = torch.tensor([*own, *(-v for v in own)], dtype=torch.int32)
    low = CallFormat("combine", 32, 7168, 0, 0, 20).values()
    low_t = torch.tensor([*low, *(-v for v in low)], dtype=torch.int32)
    reduced = torch.maximum(fmt_t, low_t)  # what all_reduce(MAX) of the two ranks gives
    agreement = barrier_agreement(reduced, own)
    assert not bool(agreement.agree)
    assert agreement.error(agreement.host_values()).endswith(  # op differs first
        "got op from dispatch to combine across the ranks"
    )
    with pytest.raises(ValueError, match="^dispatch: expected every rank"):
        agreement.check()
    same = barrier_agreement(fmt_t.clone(), own)
    assert bool(same.agree) and same.error(same.host_values()) is None
