"""commkit.tools.traffic: hierarchical against flat inter-node rows and bytes, by hand, against a slow
per-token count on random routings, against the reference layout's per-node counts (its speed:
bench/cpu_speed.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commkit.reference import layout_reference
from commkit.tools.traffic import COUNTS, count_traffic

H = 200  # fp8 row: 200 + 4 * ceil(200 / 128) = 208 bytes; bf16 row: 400 bytes


def idx(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).view(len(rows), -1)


def test_two_nodes_by_hand() -> None:
    # 2 nodes x 2 GPUs, one expert per rank: node 0 = ranks 0, 1; node 1 = ranks 2, 3.
    routing = [
        idx([2, 3]),  # rank 0: two GPUs of the remote node 1: once hierarchically, twice flat
        idx([0, 1]),  # rank 1: its own node only: no inter-node row
        idx([-1, 3], [-1, -1]),  # rank 2: -1 slots ignored; rank 3 is on its own node; a token to nowhere
        idx([0, 0], [1, 1], [0, 1]),  # rank 3: repeated experts count once; two GPUs of node 0 once
    ]
    t = count_traffic(routing, 4, 2, H, "bf16")
    assert t.num_nodes == 2
    assert t.ib_rows_hier == (1, 0, 0, 3)
    assert t.ib_rows_flat == (2, 0, 0, 4)
    assert t.rdma_rows_incl_own_node == (1, 1, 1, 3)  # DeepEP's count: own node included
    # NVLink, hierarchical: rows past the forwarder, the rank with the source's in-node index on each node
    # reached. Rank 0's token lands on forwarder 2, which forwards to 3; rank 1 is its own forwarder and
    # sends to 0; rank 2 sends to 3; rank 3's forwarder on node 0 is rank 1: [0, 0] -> 0 forwarded,
    # [1, 1] stays on 1, [0, 1] -> 0 forwarded.
    assert t.nvl_rows_hier == (1, 1, 1, 2)
    assert t.nvl_rows_flat == (0, 1, 1, 0)
    assert t.recv_rows == (3, 3, 1, 2)
    assert t.ib_saved == pytest.approx(6 / 4)
    assert t.ib_saved_per_rank == [2.0, None, None, pytest.approx(4 / 3)]
    assert t.mean("ib_rows_hier") == 1.0 and t.mean("ib_rows_flat") == 1.5
    d = t.figures("dispatch")
    assert d["ib_bytes_hier"] == 1.0 * 400 and d["ib_bytes_flat"] == 1.5 * 400
    assert d["rdma_bytes_incl_own_node"] == 6 / 4 * 400 and d["logical_bytes"] == 9 / 4 * 400
    fp8 = count_traffic(routing, 4, 2, H, "fp8")
    assert fp8.figures("dispatch")["ib_bytes_flat"] == 1.5 * 208
    assert fp8.figures("combine") == t.figures("combine")  # combine rows are bf16 whatever the dispatch
    assert t.bytes_per_rank("ib_rows_flat", "combine") == [800, 0, 0, 1600]


def test_own_node_only_and_one_node() -> None:
    routing = [idx([0, 1], [1, -1]), idx([0, 0])]
    t = count_traffic(routing, 4, 2, H)  # 2 ranks of 2 experts each, one node of 2
    assert t.ib_rows_hier == t.ib_rows_flat == (0, 0)
    assert t.ib_saved is None and t.ib_saved_per_rank == [None, None]
    assert t.rdma_rows_incl_own_node == (2, 1)
    assert t.nvl_rows_hier == t.nvl_rows_flat == (0, 1)
    one = count_traffic(routing, 4, None, H)
    assert one == t


def test_hierarchical_counts_nodes_flat_counts_ranks() -> None:
    # 4 nodes x 2 GPUs, one expert per rank; rank 0's token reaches all ranks: 3 remote nodes, 6 remote ranks.
    routing = [idx(list(range(8)))] + [torch.zeros(0, 8, dtype=torch.int64)] * 7
    t = count_traffic(routing, 8, 2, H)
    assert (t.ib_rows_hier[0], t.ib_rows_flat[0], t.rdma_rows_incl_own_node[0]) == (3, 6, 4)
    # 8 ranks reached; the forwarders (n, 0) hold 4 of them (rank 0 itself included): 4 NVLink rows
    assert (t.nvl_rows_hier[0], t.nvl_rows_flat[0]) == (4, 1)
    assert t.ib_saved == 2.0
    assert t.recv_rows == (1,) * 8


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="divisor"):
        count_traffic([idx([0])] * 4, 4, 3, H)
    with pytest.raises(ValueError, match="multiple"):
        count_traffic([idx([0])] * 4, 6, 2, H)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        count_traffic([idx([4])] * 4, 4, 2, H)
    with pytest.raises(ValueError, match="integer"):
        count_traffic([torch.zeros(1, 2)] * 4, 4, 2, H)
    with pytest.raises(ValueError, match="dtype"):
        count_traffic([idx([0])] * 4, 4, 2, H, "fp16")
    with pytest.raises(ValueError, match="none"):
        count_traffic([], 4, 2, H)


def slow_counts(routing: list[torch.Tensor], num_experts: int, per_node: int) -> dict[str, list[int]]:
    """The counting rules of commkit.tools.traffic, one token at a time with Python sets."""
    num_ranks = len(routing)
    per_rank = num_experts // num_ranks
    out = {name: [0] * num_ranks for name in COUNTS}
    for src, rows in enumerate(routing):
        own, index = src // per_node, src % per_node
        for experts in rows.tolist():
            ranks = {e // per_rank for e in experts if e >= 0}
            nodes = {r // per_node for r in ranks}
            for r in ranks:
                out["recv_rows"][r] += 1
            out["ib_rows_hier"][src] += len(nodes - {own})
            out["ib_rows_flat"][src] += sum(1 for r in ranks if r // per_node != own)
            out["rdma_rows_incl_own_node"][src] += len(nodes)
            out["nvl_rows_hier"][src] += sum(1 for r in ranks if r % per_node != index)
            out["nvl_rows_flat"][src] += sum(1 for r in ranks if r // per_node == own and r != src)
    return out


@st.composite
def node_routings(draw):
    """R ranks in nodes of G, random routing with -1 slots, repeated experts and empty ranks."""
    num_ranks = draw(st.integers(1, 8))
    per_node = draw(st.sampled_from([g for g in range(1, num_ranks + 1) if num_ranks % g == 0]))
    num_experts = num_ranks * draw(st.integers(1, 3))
    num_topk = draw(st.integers(1, 6))
    slot = st.integers(-1, num_experts - 1)
    routing = []
    for _ in range(num_ranks):
        num_tokens = draw(st.integers(0, 8))
        rows = draw(
            st.lists(
                st.lists(slot, min_size=num_topk, max_size=num_topk), min_size=num_tokens, max_size=num_tokens
            )
        )
        routing.append(torch.tensor(rows, dtype=torch.int64).view(num_tokens, num_topk))
    return routing, num_experts, per_node


@settings(max_examples=150, deadline=None)
@given(node_routings(), st.sampled_from(["bf16", "fp8"]))
def test_matches_a_per_token_count(case, dtype: str) -> None:
    routing, num_experts, per_node = case
    t = count_traffic(routing, num_experts, per_node, 136, dtype)
    want = slow_counts(routing, num_experts, per_node)
    for name in COUNTS:
        assert list(t.per_rank(name)) == want[name], name
    assert all(f >= h for f, h in zip(t.ib_rows_flat, t.ib_rows_hier, strict=True))
    assert all(n >= h for n, h in zip(t.rdma_rows_incl_own_node, t.ib_rows_hier, strict=True))
    assert t.figures("dispatch")["ib_bytes_hier"] == pytest.approx(
        t.mean("ib_rows_hier") * t.row_bytes("dispatch")
    )
    assert t.to_dict()["per_rank"]["ib_rows_flat"] == want["ib_rows_flat"]


@settings(max_examples=60, deadline=None)
@given(node_routings())
def test_agrees_with_the_reference_layout(case) -> None:
    routing, num_experts, per_node = case
    num_ranks = len(routing)
    t = count_traffic(routing, num_experts, per_node, 64)
    recv = [0] * num_ranks
    for src, rows in enumerate(routing):
        layout = layout_reference(rows, num_experts, num_ranks, per_node)
        own = src // per_node
        per_node_counts = layout.num_tokens_per_node.tolist()
        assert t.rdma_rows_incl_own_node[src] == sum(per_node_counts)
        assert t.ib_rows_hier[src] == sum(per_node_counts) - per_node_counts[own]
        per_rank = layout.num_tokens_per_rank.tolist()
        remote = [n for r, n in enumerate(per_rank) if r // per_node != own]
        assert t.ib_rows_flat[src] == sum(remote)
        recv = [a + b for a, b in zip(recv, per_rank, strict=True)]
    assert list(t.recv_rows) == recv


def test_deepseek_size() -> None:
    # 64 ranks (8 nodes of 8) x 8192 tokens x top-8 of 256 experts (its speed: bench/cpu_speed.py)
    gen = torch.Generator().manual_seed(0)
    routing = [torch.rand(8192, 256, generator=gen).topk(8, dim=1).indices for _ in range(64)]
    t = count_traffic(routing, 256, 8, 7168, "fp8")
    # every (token, rank) pair of a flat all-to-all crosses the network, NVLink, or stays on its source
    own_rank = sum(int((r // 4 == src).any(dim=1).sum()) for src, r in enumerate(routing))
    assert sum(t.recv_rows) == sum(t.ib_rows_flat) + sum(t.nvl_rows_flat) + own_rank
    assert t.ib_saved is not None and 1.0 < t.ib_saved < 8.0
