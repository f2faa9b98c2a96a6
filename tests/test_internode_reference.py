"""The node-aware reference: per-node layout counts and the two-level combine."""

from __future__ import annotations

import pytest
import torch
from cases import bits, combine_in_order
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reference import routings

from commkit.reference import combine_reference, dispatch_reference, layout_reference


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def experts_of(x_experts_seed: int, dispatched) -> list[torch.Tensor]:
    """Rank-dependent expert outputs, with magnitudes far apart so that the summation order shows."""
    gen = torch.Generator().manual_seed(x_experts_seed)
    scales = (1.0, 2.0**-9, 2.0**12, -(2.0**12))
    return [
        (torch.randn(d.x.shape, generator=gen) * scales[r % 4]).to(torch.bfloat16)
        for r, d in enumerate(dispatched)
    ]


@settings(max_examples=50, deadline=None)
@given(routings(), st.integers(0, 2**16))
def test_one_node_is_the_flat_rule(routing, seed: int) -> None:
    num_experts, xs, idxs, weights = routing
    num_ranks = len(xs)
    got = dispatch_reference(xs, idxs, weights, num_experts)
    x_experts = experts_of(seed, got)
    num_tokens = [x.shape[0] for x in xs]
    flat = combine_in_order(x_experts, got, num_tokens, range(num_ranks))  # independent of the reference
    for per_node in (None, num_ranks):
        ys = combine_reference(x_experts, got, num_tokens, per_node)
        for y, want in zip(ys, flat, strict=True):
            assert torch.equal(bits(y), bits(want))


@settings(max_examples=50, deadline=None)
@given(routings(), st.integers(0, 2**16), st.data())
def test_two_level_is_node_partials_summed_in_node_order(routing, seed: int, data) -> None:
    num_experts, xs, idxs, weights = routing
    num_ranks = len(xs)
    per_node = data.draw(st.sampled_from(divisors(num_ranks)))
    got = dispatch_reference(xs, idxs, weights, num_experts)
    x_experts = experts_of(seed, got)
    num_tokens = [x.shape[0] for x in xs]
    # Per node, the flat rule over its ranks alone is that node's bf16 partial (zero where the
    # token did not reach the node: adding +0.0 changes no sum that starts from +0.0).
    partials = [
        combine_in_order(x_experts, got, num_tokens, range(n, n + per_node))
        for n in range(0, num_ranks, per_node)
    ]
    ys = combine_reference(x_experts, got, num_tokens, per_node)
    for src in range(num_ranks):
        want = torch.zeros(num_tokens[src], xs[0].shape[1])
        for p in partials:
            want = want + p[src].float()
        assert torch.equal(bits(ys[src]), bits(want.to(torch.bfloat16)))


def test_two_nodes_differ_from_the_flat_rule() -> None:
    # 4 ranks, 2 nodes of 2, one expert per rank; rank 0's token goes to ranks 0, 1 (node 0) and 2 (node 1).
    ulp = 2.0**-7  # of bf16 at 1.0
    idx = torch.tensor([[0, 1, 2]])
    x = torch.ones(1, 8, dtype=torch.bfloat16)
    none = torch.empty(0, 3, dtype=torch.int64)
    got = dispatch_reference([x, x[:0], x[:0], x[:0]], [idx, none, none, none], [torch.ones(1, 3)] * 4, 4)
    rows = [torch.full((1, 8), v, dtype=torch.bfloat16) for v in (1.0, 0.375 * ulp, 0.375 * ulp)]
    rows.append(torch.empty(0, 8, dtype=torch.bfloat16))
    flat = combine_reference(rows, got, [1, 0, 0, 0])[0]
    two_level = combine_reference(rows, got, [1, 0, 0, 0], num_ranks_per_node=2)[0]
    # Flat: 1 + 0.75 ulp rounds up. Two-level: node 0's partial 1 + 0.375 ulp rounds to 1, then
    # 1 + node 1's 0.375 ulp rounds to 1 again.
    assert torch.equal(flat, torch.full((1, 8), 1.0 + ulp).to(torch.bfloat16))
    assert torch.equal(two_level, torch.ones(1, 8, dtype=torch.bfloat16))
    # One node per rank: every row is its own partial, the same sum here as the flat one.
    per_rank = combine_reference(rows, got, [1, 0, 0, 0], num_ranks_per_node=1)[0]
    assert torch.equal(per_rank, flat)


@settings(max_examples=60, deadline=None)
@given(routings(), st.data())
def test_per_node_layout_counts(routing, data) -> None:
    num_experts, xs, idxs, _ = routing
    num_ranks = len(xs)
    per_node = data.draw(st.sampled_from(divisors(num_ranks)))
    experts_per_node = num_experts // num_ranks * per_node
    for idx in idxs:
        lay = layout_reference(idx, num_experts, num_ranks, per_node)
        flat = layout_reference(idx, num_experts, num_ranks)
        assert torch.equal(lay.is_token_in_rank, flat.is_token_in_rank)
        assert torch.equal(lay.num_tokens_per_rank, flat.num_tokens_per_rank)
        assert flat.is_token_in_node.shape == (idx.shape[0], 1)
        assert lay.is_token_in_node.shape == (idx.shape[0], num_ranks // per_node)
        for t in range(idx.shape[0]):
            nodes = {e // experts_per_node for e in idx[t].tolist() if e >= 0}
            assert set(lay.is_token_in_node[t].nonzero().flatten().tolist()) == nodes
        # A token counts once per node, however many of the node's ranks or experts it uses.
        assert lay.num_tokens_per_node.tolist() == lay.is_token_in_node.sum(dim=0).tolist()


def test_per_node_layout_explicit() -> None:
    # 8 experts on 4 ranks (2 each), 2 nodes of 2 ranks: node 0 = experts 0-3, node 1 = experts 4-7.
    idx = torch.tensor([[0, 3], [1, -1], [4, 7], [0, 5], [-1, -1], [2, 2]])
    lay = layout_reference(idx, 8, 4, num_ranks_per_node=2)
    assert lay.is_token_in_node.tolist() == [[1, 0], [1, 0], [0, 1], [1, 1], [0, 0], [1, 0]]
    assert lay.num_tokens_per_node.tolist() == [4, 2]
    assert lay.num_tokens_per_rank.tolist() == [3, 2, 2, 1]


def test_num_ranks_per_node_must_divide() -> None:
    idx = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        layout_reference(idx, 6, 6, num_ranks_per_node=4)
    got = dispatch_reference(
        [torch.ones(1, 8, dtype=torch.bfloat16)] * 2, [idx, idx], [torch.ones(1, 2)] * 2, 2
    )
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        combine_reference([d.x for d in got], got, [1, 1], num_ranks_per_node=3)
