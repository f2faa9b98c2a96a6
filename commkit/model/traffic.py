"""Rows on each path, per GPU, derived from a routing.

Everything starts from two count matrices over source ranks s (T_s tokens each):
    rows_to_rank [R, R]: tokens of s whose top-k reaches rank r (a token counts once per rank)
    rows_to_node [R, N]: tokens of s whose top-k reaches node n (once per node)
A synthetic routing gives their expected values (every source draws from the same distribution, so
both are T * P[None, :], kept as broadcast views: no R x R memory); a recorded routing gives them
exactly. Path of a row (DeepEP normal kernels): intranode, source -> destination over NVLink;
internode, source GPU (m, i) -> IB -> GPU (n, i) with the same in-node index -> NVLink -> (n, j).
Rows for the own node take the same route with a local copy instead of IB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from commkit.routing import expert_popularity, synthetic_topk_np

# Tokens sampled to estimate the hit probabilities of a synthetic routing: at most this many
# token x expert scores (~16 MB of float64), at least 1024 tokens.
_MAX_SAMPLE_SCORES = 2_000_000


@dataclass(frozen=True)
class SyntheticRouting:
    """A synthetic routing: expected counts, no tokens materialised beyond a sample.

    skew:      0 uniform, > 0 Zipf-like expert popularity (see ``commkit.routing.expert_popularity``)
    max_nodes: None for plain top-k, M for node-limited top-k (DeepSeek-V3: 4)
    seed:      seed of the sampled tokens; which experts are hot is ``popularity_seed``'s choice
    """

    skew: float = 0.0
    max_nodes: int | None = None
    seed: int = 0
    popularity_seed: int = 0

    def describe(self) -> str:
        limit = f", node-limited M={self.max_nodes}" if self.max_nodes else ""
        return f"synthetic (skew {self.skew:g}{limit})"


@dataclass(frozen=True)
class RecordedRouting:
    """A routing recorded from a run: ``topk_idx`` [T_s, K] per source rank (len R), -1 unused.

    A single array stands for every source rank (each sends the same pattern of experts).
    """

    topk_idx: Sequence[np.ndarray]
    source: str = "recorded"

    def describe(self) -> str:
        return f"{self.source} ({len(self.topk_idx)} source rank(s))"


@dataclass(frozen=True)
class CountedRouting:
    """Exact counts, e.g. from the ``Layout`` of every rank (``routing_from_layouts``).

    rows_to_rank: [R, R] tokens of source s reaching rank r (once per rank)
    rows_to_node: [R, N] tokens of source s reaching node n (once per node)
    """

    rows_to_rank: np.ndarray
    rows_to_node: np.ndarray
    source: str = "layouts"

    def describe(self) -> str:
        return f"{self.source} (exact counts of {self.rows_to_rank.shape[0]} ranks)"


Routing = SyntheticRouting | RecordedRouting | CountedRouting


def routing_from_layouts(layouts: Sequence[Any], gpus_per_node: int) -> CountedRouting:
    """Exact counts from each rank's ``commkit.types.Layout`` (one per source rank, in rank order).

    Reads ``num_tokens_per_rank`` [R] and ``is_token_in_rank`` [T, R] (torch tensors or arrays).
    """
    num_ranks = len(layouts)
    if num_ranks == 0 or num_ranks % gpus_per_node not in (0, num_ranks):
        raise ValueError(f"need one Layout per rank in whole nodes of {gpus_per_node}, got {num_ranks}")
    num_nodes = max(1, num_ranks // gpus_per_node)
    to_rank, to_node = [], []
    for layout in layouts:
        in_rank = np.asarray(layout.is_token_in_rank, dtype=bool)  # [T, R]
        if in_rank.ndim != 2 or in_rank.shape[1] != num_ranks:
            raise ValueError(f"is_token_in_rank must be [T, {num_ranks}], got shape {in_rank.shape}")
        to_rank.append(np.asarray(layout.num_tokens_per_rank, dtype=np.float64))
        to_node.append(in_rank.reshape(len(in_rank), num_nodes, -1).any(-1).sum(0).astype(np.float64))
    return CountedRouting(np.stack(to_rank), np.stack(to_node))


@dataclass(frozen=True)
class LinkRows:
    """Rows per GPU on each path of the dispatch, all [R] float64 (expected or exact counts): the load
    of each GPU's links, what the model times (``commkit.tools.traffic.Traffic`` counts the same rows
    per SOURCE rank instead, hierarchical against flat, for the tools' byte figures).

    recv_rows:     rows a rank receives, own rows included: the dispatch "logical" rows
    send_rows:     rows a rank sends, own rows included
    nvl_send_rows: rows leaving a rank over NVLink (intranode: to other ranks; internode: forwarded)
    nvl_recv_rows: rows arriving at a rank over NVLink
    node_rows:     rows a source sends towards nodes, own node included: DeepEP's "RDMA" logical rows
    ib_send_rows:  rows a source sends over its NIC (other nodes only)
    ib_recv_rows:  rows a forwarder receives over its NIC
    fwd_rows:      rows a forwarder writes into NVLink buffers, itself included (internode only)
    fwd_in_rows:   rows a forwarder takes from its RDMA buffer, own node included (internode only)
    The combine moves the same rows back: its sends are the dispatch's receives and vice versa.
    """

    recv_rows: np.ndarray
    send_rows: np.ndarray
    nvl_send_rows: np.ndarray
    nvl_recv_rows: np.ndarray
    node_rows: np.ndarray
    ib_send_rows: np.ndarray
    ib_recv_rows: np.ndarray
    fwd_rows: np.ndarray
    fwd_in_rows: np.ndarray


def _distinct_counts(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """[num_groups] number of rows of ``groups`` [S, K] (ints, -1 unused) that hold each value."""
    groups = np.sort(groups, axis=1)
    first = np.ones(groups.shape, dtype=bool)
    first[:, 1:] = groups[:, 1:] != groups[:, :-1]
    first &= groups >= 0
    return np.bincount(groups[first], minlength=num_groups).astype(np.float64)


def _poisson_fit(mass: np.ndarray, total: float) -> np.ndarray:
    """P = 1 - exp(-lam * mass) with lam such that sum(P) = total (bisection)."""

    def hits(lam: float) -> float:
        return float(-np.expm1(-lam * mass).sum())

    low, high = 0.0, 1.0
    while hits(high) < total and high < 1e15:
        high *= 2
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if hits(mid) < total else (low, mid)
    return -np.expm1(-high * mass)


def _smooth_prior(sampled: np.ndarray, mass: np.ndarray, num_samples: int) -> np.ndarray:
    """P = 1 - exp(-lam * mass^g) fitted to sampled hit rates: g by count-weighted least squares of
    log(-log(1 - p)) on log(mass), then lam so that the total matches the sample's (a 2-parameter curve
    pooled over every group, so it carries little noise)."""
    rate = np.clip(sampled, 0.5 / num_samples, 1 - 0.5 / num_samples)
    y, x = np.log(-np.log1p(-rate)), np.log(mass)
    weights = sampled * num_samples + 0.5
    exponent = 1.0
    if np.ptp(x) > 1e-9:
        x_mean, y_mean = np.average(x, weights=weights), np.average(y, weights=weights)
        slope = np.average((x - x_mean) * (y - y_mean), weights=weights)
        slope /= np.average((x - x_mean) ** 2, weights=weights)
        exponent = float(np.clip(slope, 0.25, 4.0))
    return _poisson_fit((mass / mass.max()) ** exponent, float(sampled.sum()))


def _shrink(sampled: np.ndarray, prior: np.ndarray, num_samples: int) -> np.ndarray:
    """Empirical-Bayes blend of noisy sampled probabilities with a smooth prior, per group.

    Works on the ratio z = sampled / prior: its sampling variance v = (1 - prior) / (prior * S) is known,
    the spread of the true ratios is estimated as tau2 = mean((z - 1)^2) - mean(v) (less two standard
    errors), and each group keeps
    the weight tau2 / (tau2 + v) of its own sample. A good prior (tau2 ~ 0) wins where samples are thin
    (many ranks, few hits each); a poor prior gives way where the samples are precise.
    """
    prior = np.clip(prior, 1e-12, 1.0)
    variance = (1 - prior) / (prior * num_samples)
    ratio = sampled / prior
    # NOTE: two standard errors are taken off tau2 so that noise alone (tau2 estimated > 0 by chance) does
    # not let the samples back in: at 2048 ranks that chance alone lifts the busiest rank by 8%.
    spread = (ratio - 1) ** 2
    tau2 = float(np.mean(spread) - np.mean(variance) - 2 * np.std(spread) / np.sqrt(len(spread)))
    tau2 = max(0.0, tau2)
    weight = tau2 / (tau2 + variance) if tau2 > 0 else np.zeros_like(prior)
    return np.clip(prior * (1 + weight * (ratio - 1)), 0.0, 1.0)


def _expected_hits(
    routing: SyntheticRouting, num_experts: int, num_topk: int, num_ranks: int, num_nodes: int, tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token probabilities ([R], [N]) that a synthetic routing reaches each rank and each node.

    Sampled from the routing generator itself (``_MAX_SAMPLE_SCORES`` bounds the sample). With many
    ranks a rank sees few sampled hits, and the maximum over ranks of noisy estimates is biased upwards
    (at 2048 ranks by 2x), so the samples are blended (``_shrink``) with a smooth prior fitted to them:
    P = 1 - exp(-lam * mass^g) (``_smooth_prior``), mass being the summed popularity of the rank's (node's)
    experts. A uniform routing needs no prior: every rank (node) is alike and gets the mean.
    """
    num_samples = int(min(max(1024, _MAX_SAMPLE_SCORES // num_experts), max(tokens, 1024)))
    max_nodes = routing.max_nodes if routing.max_nodes and routing.max_nodes < num_nodes else None
    topk_idx, _ = synthetic_topk_np(
        num_samples,
        num_experts,
        num_topk,
        skew=routing.skew,
        num_groups=num_nodes if max_nodes else 1,
        max_groups=max_nodes,
        seed=routing.seed,
        popularity_seed=routing.popularity_seed,
    )
    experts_per_rank = num_experts // num_ranks
    gpus_per_node = num_ranks // num_nodes
    rank_hits = _distinct_counts(topk_idx // experts_per_rank, num_ranks) / num_samples
    node_hits = _distinct_counts(topk_idx // (experts_per_rank * gpus_per_node), num_nodes) / num_samples
    if routing.skew == 0:
        return np.full(num_ranks, rank_hits.mean()), np.full(num_nodes, node_hits.mean())
    rank_mass = expert_popularity(num_experts, routing.skew, routing.popularity_seed)
    rank_mass = rank_mass.reshape(num_ranks, experts_per_rank).sum(1)
    node_mass = rank_mass.reshape(num_nodes, gpus_per_node).sum(1)
    if num_nodes > 1:
        node_hits = _shrink(node_hits, _smooth_prior(node_hits, node_mass, num_samples), num_samples)
    rank_prior = _smooth_prior(rank_hits, rank_mass, num_samples)
    return _shrink(rank_hits, rank_prior, num_samples), node_hits


def count_matrices(
    routing: Routing, num_tokens: int, num_experts: int, num_topk: int, num_ranks: int, num_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows_to_rank [R, R], rows_to_node [R, N]) of ``routing`` (see module docstring)."""
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be a multiple of the number of ranks {num_ranks}")
    if isinstance(routing, SyntheticRouting):
        rank_hits, node_hits = _expected_hits(
            routing, num_experts, num_topk, num_ranks, num_nodes, num_tokens
        )
        return (
            np.broadcast_to(num_tokens * rank_hits, (num_ranks, num_ranks)),
            np.broadcast_to(num_tokens * node_hits, (num_ranks, num_nodes)),
        )
    if isinstance(routing, CountedRouting):
        if routing.rows_to_rank.shape != (num_ranks, num_ranks) or routing.rows_to_node.shape != (
            num_ranks,
            num_nodes,
        ):
            raise ValueError(
                f"counted routing must be [R, R] and [R, N] = [{num_ranks}, {num_ranks}] and "
                f"[{num_ranks}, {num_nodes}], got {routing.rows_to_rank.shape} and "
                f"{routing.rows_to_node.shape}"
            )
        return routing.rows_to_rank.astype(np.float64), routing.rows_to_node.astype(np.float64)
    sources = list(routing.topk_idx)
    if len(sources) not in (1, num_ranks):
        raise ValueError(f"a recorded routing needs 1 or R={num_ranks} topk_idx arrays, got {len(sources)}")
    experts_per_rank = num_experts // num_ranks
    experts_per_node = num_experts // num_nodes
    to_rank, to_node = [], []
    for topk_idx in sources:
        topk_idx = np.asarray(topk_idx, dtype=np.int64)
        if topk_idx.ndim != 2 or topk_idx.max(initial=-1) >= num_experts or topk_idx.min(initial=0) < -1:
            raise ValueError(f"topk_idx must be [T, K] in [-1, {num_experts}), got shape {topk_idx.shape}")
        valid = topk_idx >= 0
        to_rank.append(_distinct_counts(np.where(valid, topk_idx // experts_per_rank, -1), num_ranks))
        to_node.append(_distinct_counts(np.where(valid, topk_idx // experts_per_node, -1), num_nodes))
    rows_to_rank, rows_to_node = np.stack(to_rank), np.stack(to_node)
    if len(sources) == 1:
        rows_to_rank = np.broadcast_to(rows_to_rank, (num_ranks, num_ranks))
        rows_to_node = np.broadcast_to(rows_to_node, (num_ranks, num_nodes))
    return rows_to_rank, rows_to_node


def count_link_rows(rows_to_rank: np.ndarray, rows_to_node: np.ndarray, gpus_per_node: int) -> LinkRows:
    """Per-GPU rows on each path from the count matrices (shapes in the module docstring)."""
    num_ranks, num_nodes = rows_to_node.shape
    g = gpus_per_node
    ranks = np.arange(num_ranks)
    own_rows = rows_to_rank[ranks, ranks]  # [R] rows a rank sends to itself
    recv_rows = rows_to_rank.sum(0)
    send_rows = rows_to_rank.sum(1)
    node_rows = rows_to_node.sum(1)
    if num_nodes == 1:
        zeros = np.zeros(num_ranks)
        return LinkRows(
            recv_rows=recv_rows,
            send_rows=send_rows,
            nvl_send_rows=send_rows - own_rows,
            nvl_recv_rows=recv_rows - own_rows,
            node_rows=node_rows,
            ib_send_rows=zeros,
            ib_recv_rows=zeros,
            fwd_rows=zeros,
            fwd_in_rows=zeros,
        )
    # Axes: source node m, source GPU i, destination node n, destination GPU j
    by_gpu = rows_to_rank.reshape(num_nodes, g, num_nodes, g).sum(0)  # [i, n, j], summed over m
    fwd_rows = by_gpu.sum(2).T.reshape(-1)  # forwarder (n, i): rows to every GPU of node n
    fwd_self = np.einsum("ini->ni", by_gpu).reshape(-1)  # forwarder (n, i) to itself: no NVLink
    to_node = rows_to_node.reshape(num_nodes, g, num_nodes)  # [m, i, n]
    own_node = to_node[np.arange(num_nodes), :, np.arange(num_nodes)].reshape(-1)  # [R] source's own node
    fwd_in = to_node.sum(0).T.reshape(-1)  # forwarder (n, i): from the GPUs (m, i) of every node m
    return LinkRows(
        recv_rows=recv_rows,
        send_rows=send_rows,
        nvl_send_rows=fwd_rows - fwd_self,
        nvl_recv_rows=recv_rows - fwd_self,  # rows of (n, j) forwarded by itself took no NVLink
        node_rows=node_rows,
        ib_send_rows=node_rows - own_node,
        ib_recv_rows=fwd_in - own_node,  # the forwarder's own rows for its node took no IB
        fwd_rows=fwd_rows,
        fwd_in_rows=fwd_in,
    )
