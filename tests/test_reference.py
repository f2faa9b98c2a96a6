"""Properties of the reference semantics (hypothesis over random routings)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commkit.reference import combine_reference, dispatch_reference, layout_reference


@st.composite
def routings(draw):
    """R ranks with random routing: -1 slots, skew (repeated experts across tokens), empty ranks."""
    num_ranks = draw(st.integers(1, 4))
    experts_per_rank = draw(st.integers(1, 3))
    num_experts = num_ranks * experts_per_rank
    num_topk = draw(st.integers(1, min(4, num_experts)))
    hidden = 8 * draw(st.integers(1, 3))
    # Experts the tokens may pick: all of them, a few (heavy skew, ranks that receive nothing), or
    # a single one (all tokens on one expert); -1 marks an unused slot.
    pool = draw(
        st.one_of(
            st.just(list(range(num_experts))),
            st.lists(st.integers(0, num_experts - 1), min_size=1, max_size=2, unique=True),
        )
    )
    slot = st.one_of(st.sampled_from(pool), st.just(-1))
    xs, idxs, weights = [], [], []
    for _ in range(num_ranks):
        num_tokens = draw(st.integers(0, 9))
        rows = [draw(st.lists(slot, min_size=num_topk, max_size=num_topk)) for _ in range(num_tokens)]
        idxs.append(torch.tensor(rows, dtype=torch.int64).view(num_tokens, num_topk))
        x = draw(st.lists(st.integers(-64, 64), min_size=num_tokens * hidden, max_size=num_tokens * hidden))
        xs.append((torch.tensor(x, dtype=torch.float32) / 8).to(torch.bfloat16).view(num_tokens, hidden))
        weights.append(torch.rand(num_tokens, num_topk))
    return num_experts, xs, idxs, weights


@settings(max_examples=60, deadline=None)
@given(routings())
def test_dispatch_properties(routing) -> None:
    num_experts, xs, idxs, weights = routing
    num_ranks = len(xs)
    per_rank = num_experts // num_ranks
    got = dispatch_reference(xs, idxs, weights, num_experts)
    layouts = [layout_reference(i, num_experts, num_ranks) for i in idxs]
    for dst, d in enumerate(got):
        # Every rank receives each token that has an expert there, once.
        assert d.x.shape[0] == sum(int(lay.num_tokens_per_rank[dst]) for lay in layouts)
        # Ordered by source rank, then source token.
        keys = (d.src_rank * 10_000 + d.src_token).tolist()
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for i in range(d.x.shape[0]):
            src, t = int(d.src_rank[i]), int(d.src_token[i])
            assert torch.equal(d.x[i], xs[src][t])
            assert torch.equal(d.topk_weights[i], weights[src][t])
            for k, e in enumerate(idxs[src][t].tolist()):
                mine = e >= 0 and e // per_rank == dst
                assert int(d.topk_idx[i, k]) == (e - dst * per_rank if mine else -1)
        # Rows per local expert equal the senders' per-expert counts (once per token).
        for e in range(per_rank):
            sent = sum(int(lay.num_tokens_per_expert[dst * per_rank + e]) for lay in layouts)
            assert d.num_tokens_per_expert[e] == sent


@settings(max_examples=60, deadline=None)
@given(routings())
def test_identity_experts_return_token_times_ranks_reached(routing) -> None:
    num_experts, xs, idxs, weights = routing
    num_ranks = len(xs)
    got = dispatch_reference(xs, idxs, weights, num_experts)
    ys = combine_reference([d.x for d in got], got, [x.shape[0] for x in xs])
    for src in range(num_ranks):
        reached = layout_reference(idxs[src], num_experts, num_ranks).is_token_in_rank.sum(dim=1)  # [T]
        want = (xs[src].to(torch.float32) * reached[:, None]).to(torch.bfloat16)
        assert torch.equal(ys[src], want)


def test_alignment_rounds_up() -> None:
    idx = torch.tensor([[0, 1], [1, -1], [3, 2]])
    x = torch.ones(3, 8, dtype=torch.bfloat16)
    got = dispatch_reference([x, x], [idx, idx], [torch.rand(3, 2)] * 2, 4, expert_alignment=4)
    # rank 0 hosts experts 0, 1: expert 0 used by 2 rows, expert 1 by 4 rows (2 per source).
    assert got[0].num_tokens_per_expert == [4, 4]
    assert got[1].num_tokens_per_expert == [4, 4]
    unaligned = dispatch_reference([x, x], [idx, idx], [torch.rand(3, 2)] * 2, 4)
    assert unaligned[0].num_tokens_per_expert == [2, 4]


def test_token_routed_nowhere_combines_to_zero() -> None:
    idx = torch.tensor([[-1, -1], [0, -1]])
    x = torch.full((2, 8), 3.0, dtype=torch.bfloat16)
    got = dispatch_reference([x], [idx], [torch.ones(2, 2)], 2)
    (y,) = combine_reference([got[0].x], got, [2])
    assert torch.equal(y[0], torch.zeros(8, dtype=torch.bfloat16))
    assert torch.equal(y[1], x[1])


def test_combine_sums_in_ascending_rank_order() -> None:
    # fp32 addition is not associative: 1e8 + 1 - 1e8 depends on the order of the rows.
    big, one = 2.0**27, 1.0
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    idx = torch.tensor([[0, 1, 2]])
    got = dispatch_reference([x, x[:0], x[:0]], [idx, idx[:0], idx[:0]], [torch.ones(1, 3)] * 3, 3)
    rows = [torch.full((1, 8), v, dtype=torch.bfloat16) for v in (one, big, -big)]
    (y, _, _) = combine_reference(rows, got, [1, 0, 0])
    expected = ((torch.tensor(0.0) + one) + big) + -big  # rank 0, then 1, then 2
    assert torch.equal(y[0], torch.full((8,), float(expected)).to(torch.bfloat16))
