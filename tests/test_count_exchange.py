"""The process-group count exchange of the internode kernels (commkit/backends/count_exchange.py) gives
each rank the ``meta`` row that the notify kernel's contract defines (csrc/notify.cuh), on 2, 4 and 8
gloo processes; its barrier and node groups work; a missing peer ends in CommTimeoutError."""

from __future__ import annotations

import time

import pytest
import torch
from cases import Case, make_inputs

from commkit.backends import kernels_layout as kl
from commkit.backends.count_exchange import GroupCountExchange, count_message, meta_from_messages
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
            meta = meta_from_messages(received, None)
            assert meta.dtype == torch.int32
            assert meta.shape == (1, kl.meta_stride(world, case.num_experts))
            assert meta[0].tolist() == expected_meta(case, dst), case.name


def test_meta_num_worst_tokens_bound() -> None:
    received = torch.tensor([[3, 5, 3], [4, 6, 1]], dtype=torch.int32)  # 7 rows received
    assert meta_from_messages(received, 7)[0, 2] == 7
    with pytest.raises(RuntimeError, match="num_worst_tokens=6 is smaller"):
        meta_from_messages(received, 6)


def _exchange(rank: int, world: int, per_node: int) -> dict:
    import torch.distributed as dist

    ex = GroupCountExchange(None, device=torch.device("cpu"), timeout_s=30)
    metas = []
    for case in cases_for(world):
        _, topk_idx, _ = make_inputs(case, rank)
        lay = layout_reference(topk_idx, case.num_experts, world)
        meta = ex.notify(
            lay.num_tokens_per_rank.to(torch.int32).view(1, -1),
            lay.num_tokens_per_expert.to(torch.int32).view(1, -1),
            case.tokens[rank],
            None,
        )
        ex.barrier()
        metas.append(meta[0].tolist())
    # The node group: only this node's ranks made it; a sum over it counts them
    node = make_node_group(None, per_node)
    one = torch.ones(1)
    dist.all_reduce(one, group=node)
    return dict(metas=metas, node_size=int(one.item()), node_ranks=list(node_ranks(world, per_node, rank)))


@pytest.mark.parametrize(("world", "per_node"), [(2, 1), (4, 2), (8, 4)])
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
        ex.barrier()
    except CommTimeoutError as exc:
        return f"{time.monotonic() - start:.1f}|{exc}"
    return "no error"


def test_missing_peer_times_out() -> None:
    got = spawn_gloo(_one_rank_absent, 2, timeout_s=60, allow_failures=True)
    assert not isinstance(got[0], RankFailed), got[0]
    elapsed, message = got[0].split("|", 1)
    assert float(elapsed) < 5.0
    assert "barrier: rank 0 of 2" in message and "timeout_s=2s" in message
