"""Routing helpers: node-limited top-k, auxiliary-loss-free balancing, synthetic routings.

Conventions (the same as dispatch): E experts are split evenly and contiguously over R ranks (rank r
hosts experts [r*L, (r+1)*L), L = E // R) and ranks are grouped into nodes contiguously (node n holds
ranks [n*G, (n+1)*G)), so node n hosts the contiguous experts [n*E/N, (n+1)*E/N). A routing is
``topk_idx`` [T, K] int64 (-1 for an unused slot) with ``topk_weights`` [T, K] float32.

Shapes: T tokens, E experts, K top-k slots, N score groups (nodes), M groups a token may reach.

The torch functions take and return tensors on the scores' device and import nothing from torch at
module level, so that ``commkit.model`` can use the numpy generator without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def _check_groups(num_experts: int, num_topk: int, num_groups: int, max_groups: int) -> None:
    if num_topk < 1 or num_topk > num_experts:
        raise ValueError(f"num_topk must be in [1, num_experts={num_experts}], got {num_topk}")
    if num_groups < 1 or num_experts % num_groups != 0:
        raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
    if not 1 <= max_groups <= num_groups:
        raise ValueError(f"max_groups must be in [1, num_groups={num_groups}], got {max_groups}")
    if max_groups * (num_experts // num_groups) < num_topk:
        raise ValueError(
            f"max_groups={max_groups} groups of {num_experts // num_groups} experts cannot hold "
            f"num_topk={num_topk} experts"
        )


def node_limited_topk(
    scores: torch.Tensor,
    num_topk: int,
    num_groups: int = 1,
    max_groups: int | None = None,
    bias: torch.Tensor | None = None,
    num_group_topk: int | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited (node-limited) top-k, as DeepSeek-V3 routes.

    Each token picks at most ``max_groups`` groups (nodes), ranked by the sum of their
    ``num_group_topk`` best selection scores (default ``num_topk // max_groups``, at least 1: 2 for
    DeepSeek-V3's K=8, M=4), then its ``num_topk`` best experts within the chosen groups.

    scores:  [T, E] affinities (e.g. sigmoid of the router logits, >= 0 when ``normalize``)
    bias:    [E] or None, added to the scores for the selection only (auxiliary-loss-free balancing)
    returns: topk_idx [T, K] int64 (ordered by selection score, best first),
             topk_weights [T, K] float32 = the unbiased scores of the chosen experts, divided by their
             sum when ``normalize``
    """
    import torch  # NOTE: torch is imported on use (module docstring: commkit.model loads no torch)

    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    num_tokens, num_experts = scores.shape
    max_groups = num_groups if max_groups is None else max_groups
    _check_groups(num_experts, num_topk, num_groups, max_groups)
    if bias is not None and tuple(bias.shape) != (num_experts,):
        raise ValueError(f"bias must be [E={num_experts}], got shape {tuple(bias.shape)}")

    choice = scores if bias is None else scores + bias
    if max_groups < num_groups:
        # Rank groups by the sum of their best selection scores, keep the best M
        group_size = num_experts // num_groups
        num_group_topk = max(1, num_topk // max_groups) if num_group_topk is None else num_group_topk
        grouped = choice.view(num_tokens, num_groups, group_size)
        group_scores = grouped.topk(min(num_group_topk, group_size), dim=-1).values.sum(-1)  # [T, N]
        group_idx = group_scores.topk(max_groups, dim=-1).indices  # [T, M]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.repeat_interleave(group_size, dim=1)  # [T, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))

    topk_idx = choice.topk(num_topk, dim=-1).indices  # [T, K]
    topk_weights = scores.gather(1, topk_idx).float()  # gate weights from the unbiased scores
    if normalize:
        topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return topk_idx.long(), topk_weights


def update_expert_bias(
    bias: torch.Tensor, num_tokens_per_expert: torch.Tensor, update_rate: float
) -> torch.Tensor:
    """One step of auxiliary-loss-free balancing (DeepSeek-V3): returns the new bias.

    An expert that received more tokens than the mean has its bias lowered by ``update_rate``, one
    that received fewer has it raised by ``update_rate``, one exactly at the mean keeps it.

    bias:                  [E] float32, added to the scores for the selection only
    num_tokens_per_expert: [E] counts of the step, e.g. ``Layout.num_tokens_per_expert``; pass the
                           sum over ranks (all-reduce) to balance the global load, a rank's own
                           counts to balance what it sends
    returns:               [E] tensor of ``bias``'s dtype and device
    """
    if bias.dim() != 1 or tuple(num_tokens_per_expert.shape) != tuple(bias.shape):
        raise ValueError(
            f"bias and num_tokens_per_expert must both be [E], got {tuple(bias.shape)} and "
            f"{tuple(num_tokens_per_expert.shape)}"
        )
    load = num_tokens_per_expert.to(device=bias.device, dtype=bias.dtype)
    return bias + update_rate * (load.mean() - load).sign()


def expert_popularity(num_experts: int, skew: float, seed: int = 0) -> np.ndarray:
    """[E] float64 selection weights summing to 1: Zipf-like, p ~ 1 / (1 + rank)^skew.

    ``skew`` 0 is uniform, 1 is classic Zipf. Which experts are hot is a permutation seeded by
    ``seed``, so the hot experts are scattered over the ranks rather than packed on rank 0.
    """
    if skew < 0:
        raise ValueError(f"skew must be >= 0, got {skew}")
    weights = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** skew
    weights = weights[np.random.default_rng(seed + 7919).permutation(num_experts)]
    return weights / weights.sum()


def synthetic_topk_np(
    num_tokens: int,
    num_experts: int,
    num_topk: int,
    *,
    skew: float = 0.0,
    num_groups: int = 1,
    max_groups: int | None = None,
    seed: int = 0,
    popularity_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic routing in numpy, deterministic from ``seed``: (topk_idx [T, K] int64, weights [T, K] f32).

    Each token draws Gumbel-perturbed log-popularity keys (``expert_popularity`` seeded by
    ``popularity_seed``, separate from ``seed`` so that every source rank, drawing its tokens with its
    own ``seed``, sees the same hot experts), so that the top-k
    without a group limit is a sample without replacement proportional to the popularity; with
    ``max_groups < num_groups`` the groups are first limited as in ``node_limited_topk`` (sum of the
    best ``max(1, K // M)`` keys). Weights are the softmax of the chosen keys.
    """
    max_groups = num_groups if max_groups is None else max_groups
    _check_groups(num_experts, num_topk, num_groups, max_groups)
    rng = np.random.default_rng(seed)
    keys = np.log(expert_popularity(num_experts, skew, popularity_seed)) + rng.gumbel(
        size=(num_tokens, num_experts)
    )
    if max_groups < num_groups:
        group_size = num_experts // num_groups
        num_group_topk = min(max(1, num_topk // max_groups), group_size)
        grouped = keys.reshape(num_tokens, num_groups, group_size)
        group_scores = np.partition(grouped, group_size - num_group_topk, axis=-1)[..., -num_group_topk:]
        group_scores = group_scores.sum(-1)  # [T, N]
        dropped = np.argpartition(-group_scores, max_groups - 1, axis=1)[:, max_groups:]  # [T, N - M]
        np.put_along_axis(grouped, dropped[:, :, None].repeat(group_size, axis=2), -np.inf, axis=1)
    topk_idx = np.argpartition(-keys, num_topk - 1, axis=1)[:, :num_topk]  # [T, K], unordered
    topk_keys = np.take_along_axis(keys, topk_idx, axis=1)
    order = np.argsort(-topk_keys, axis=1, kind="stable")
    topk_idx = np.take_along_axis(topk_idx, order, axis=1).astype(np.int64)
    topk_keys = np.take_along_axis(topk_keys, order, axis=1)
    weights = np.exp(topk_keys - topk_keys[:, :1])
    return topk_idx, (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def synthetic_topk(
    num_tokens: int, num_experts: int, num_topk: int, *, device: str | torch.device = "cpu", **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``synthetic_topk_np`` as torch tensors on ``device``: topk_idx [T, K] int64, weights [T, K] f32.

    ``options``: the keyword arguments of ``synthetic_topk_np`` (skew, num_groups, max_groups, seed,
    popularity_seed). Uniform (``skew=0``), Zipf-like skew (``skew>0``) and node-limited (``num_groups``
    = nodes, ``max_groups`` = M) routings for benchmarks and tests; the same seeds give the same routing.
    """
    import torch  # NOTE: torch is imported on use (module docstring: commkit.model loads no torch)

    topk_idx, weights = synthetic_topk_np(num_tokens, num_experts, num_topk, **options)
    return torch.from_numpy(topk_idx).to(device), torch.from_numpy(weights).to(device)
