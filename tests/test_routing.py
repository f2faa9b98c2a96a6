"""commkit.routing on CPU: node-limited top-k against a per-token reference, bias balancing, generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from commkit.routing import (
    expert_popularity,
    node_limited_topk,
    synthetic_topk,
    synthetic_topk_np,
    update_expert_bias,
)


def reference_node_limited(
    scores: torch.Tensor, bias: torch.Tensor | None, num_topk: int, num_groups: int, max_groups: int
) -> list[set[int]]:
    """Per token, the chosen expert set, by the DeepSeek-V3 rule written as plain loops."""
    num_tokens, num_experts = scores.shape
    group_size = num_experts // num_groups
    per_group = max(1, num_topk // max_groups)
    choice = scores if bias is None else scores + bias
    chosen = []
    for t in range(num_tokens):
        row = choice[t].tolist()
        groups = [row[g * group_size : (g + 1) * group_size] for g in range(num_groups)]
        group_score = [sum(sorted(g, reverse=True)[:per_group]) for g in groups]
        best_groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:max_groups]
        allowed = [e for g in best_groups for e in range(g * group_size, (g + 1) * group_size)]
        chosen.append(set(sorted(allowed, key=lambda e: -row[e])[:num_topk]))
    return chosen


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "num_groups", "max_groups"), [(64, 256, 8, 4), (37, 48, 6, 2)]
)
def test_node_limited_matches_reference(
    num_tokens: int, num_experts: int, num_groups: int, max_groups: int
) -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(num_tokens, num_experts, generator=generator)  # [T, E] distinct w.p. 1
    bias = 0.1 * torch.randn(num_experts, generator=generator)
    topk_idx, weights = node_limited_topk(scores, 8, num_groups, max_groups, bias=bias)
    assert topk_idx.shape == (num_tokens, 8) and topk_idx.dtype == torch.int64
    assert weights.dtype == torch.float32
    want = reference_node_limited(scores, bias, 8, num_groups, max_groups)
    for t in range(num_tokens):
        assert set(topk_idx[t].tolist()) == want[t], f"token {t}"
        nodes = {e // (num_experts // num_groups) for e in topk_idx[t].tolist()}
        assert len(nodes) <= max_groups
    # Gate weights: the unbiased scores of the chosen experts, normalised over the k
    picked = scores.gather(1, topk_idx)
    torch.testing.assert_close(weights, picked / picked.sum(1, keepdim=True))


def test_bias_changes_selection_not_weights() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias = torch.tensor([0.0, -1.0, 0.0, 0.0])
    topk_idx, weights = node_limited_topk(scores, 2, bias=bias, normalize=False)
    assert topk_idx.tolist() == [[0, 3]]  # expert 1 pushed out by its bias
    torch.testing.assert_close(weights, torch.tensor([[0.9, 0.2]]))


def test_no_limit_is_plain_topk() -> None:
    scores = torch.rand(50, 32, generator=torch.Generator().manual_seed(3))
    topk_idx, _ = node_limited_topk(scores, 4, num_groups=4, max_groups=4)
    assert torch.equal(topk_idx, scores.topk(4, dim=1).indices)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_topk": 9, "num_groups": 8, "max_groups": 1}, "cannot hold"),
        ({"num_topk": 2, "num_groups": 5, "max_groups": 2}, "must divide"),
        ({"num_topk": 2, "num_groups": 8, "max_groups": 9}, "max_groups"),
        ({"num_topk": 0}, "num_topk"),
    ],
)
def test_node_limited_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        node_limited_topk(torch.rand(4, 64), **kwargs)


def test_update_expert_bias_moves_by_u_against_the_load() -> None:
    bias = torch.zeros(4)
    counts = torch.tensor([10, 2, 6, 6])  # mean 6
    new = update_expert_bias(bias, counts, 0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[E\]"):
        update_expert_bias(bias, torch.zeros(3), 0.01)


def test_bias_balancing_evens_out_a_skewed_router() -> None:
    """Auxiliary-loss-free balancing: with a router that prefers a few experts, the bias updates cut the
    load of the busiest expert (max/mean) well down within a few hundred steps."""
    num_experts, num_tokens, num_topk = 32, 512, 4
    generator = torch.Generator().manual_seed(0)
    preference = torch.linspace(0.0, 0.5, num_experts)  # expert 31 preferred
    bias = torch.zeros(num_experts)

    def imbalance(bias: torch.Tensor) -> tuple[float, torch.Tensor]:
        scores = torch.sigmoid(torch.randn(num_tokens, num_experts, generator=generator) * 0.3 + preference)
        topk_idx, _ = node_limited_topk(scores, num_topk, num_groups=4, max_groups=2, bias=bias)
        counts = torch.bincount(topk_idx.flatten(), minlength=num_experts)
        return float(counts.max() / counts.float().mean()), counts

    before, _ = imbalance(bias)
    for _ in range(300):
        _, counts = imbalance(bias)
        bias = update_expert_bias(bias, counts, 1e-3)
    after, _ = imbalance(bias)
    assert before > 2.0
    assert after < 1.3, f"max/mean load {before:.2f} -> {after:.2f}"


def test_synthetic_is_deterministic_and_valid() -> None:
    a_idx, a_w = synthetic_topk_np(301, 64, 6, skew=0.8, num_groups=8, max_groups=3, seed=5)
    b_idx, b_w = synthetic_topk_np(301, 64, 6, skew=0.8, num_groups=8, max_groups=3, seed=5)
    c_idx, _ = synthetic_topk_np(301, 64, 6, skew=0.8, num_groups=8, max_groups=3, seed=6)
    assert np.array_equal(a_idx, b_idx) and np.array_equal(a_w, b_w)
    assert not np.array_equal(a_idx, c_idx)
    assert a_idx.shape == (301, 6) and a_idx.dtype == np.int64 and a_w.dtype == np.float32
    assert all(len(set(row)) == 6 for row in a_idx.tolist())  # distinct experts per token
    assert all(len({e // 8 for e in row}) <= 3 for row in a_idx.tolist())  # at most 3 groups
    np.testing.assert_allclose(a_w.sum(1), 1.0, rtol=1e-5)
    t_idx, t_w = synthetic_topk(301, 64, 6, skew=0.8, num_groups=8, max_groups=3, seed=5)
    assert torch.equal(t_idx, torch.from_numpy(a_idx)) and t_idx.dtype == torch.int64


def test_synthetic_uniform_and_skewed_loads() -> None:
    num_tokens, num_experts = 20_000, 64
    uniform, _ = synthetic_topk_np(num_tokens, num_experts, 4, seed=0)
    counts = np.bincount(uniform.ravel(), minlength=num_experts)
    expected = num_tokens * 4 / num_experts
    assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)  # binomial noise only

    skewed, _ = synthetic_topk_np(num_tokens, num_experts, 4, skew=1.2, seed=0, popularity_seed=3)
    counts = np.bincount(skewed.ravel(), minlength=num_experts)
    popularity = expert_popularity(num_experts, 1.2, seed=3)
    assert np.argmax(counts) == np.argmax(popularity)  # the hot expert is the popular one
    assert counts.max() > 4 * counts.mean()
    # Same hot experts whatever the token seed: a source rank's seed must not move them
    other, _ = synthetic_topk_np(num_tokens, num_experts, 4, skew=1.2, seed=9, popularity_seed=3)
    assert np.argmax(np.bincount(other.ravel(), minlength=num_experts)) == np.argmax(popularity)
