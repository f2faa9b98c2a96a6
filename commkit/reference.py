"""Reference semantics of dispatch and combine: pure functions over all ranks' inputs at once.

This module is the oracle of every test; it is written to be obviously right, not fast, and shares
no code with the backends. Shapes: R ranks, E experts, L = E // R local experts, T_r tokens on rank
r, H hidden, K top-k slots, N_r rows received by rank r.

Semantics (every backend follows them bit for bit):

- Experts are split evenly and contiguously over ranks: rank r hosts experts [r*L, (r+1)*L).
- A token goes to a rank once, however many of its experts live there.
- Rank r receives rows ordered by source rank, then by source token index.
- A received row's ``topk_idx`` holds the local expert index (``e - r*L``) for slots whose expert
  lives on rank r and -1 for the others; ``topk_weights`` is the source row of weights, unchanged.
- ``num_tokens_per_expert[e]`` counts received rows that use local expert e (once per row), rounded
  up to a multiple of ``expert_alignment``.
- ``dispatch(x, ..., cast_to_fp8=True)`` dispatches ``cast_to_fp8(x)`` (``commkit.fp8``: e4m3 with a
  float32 scale per 128 elements).
- ``num_worst_tokens`` sizes the outputs for that many rows: the first N_r are those above; past
  them ``topk_idx`` is -1 and ``topk_weights`` 0, while ``x`` and ``x_scales`` are unspecified (not
  written by the kernels); ``num_tokens_per_expert`` is empty.
- Combine sends every received row back to its source token. Per token, the returned rows are summed
  in float32, starting from +0.0 and adding in ascending order of the rank that sends them back; the
  sum is rounded to bfloat16 (round to nearest even). A token that went nowhere comes back as zeros.

Nodes (``num_ranks_per_node`` = G; None means one node of all R ranks):

- Ranks are grouped into nodes contiguously: node n holds ranks [n*G, (n+1)*G); G divides R, and
  there are N = R // G nodes. Dispatch is the same whatever G.
- The layout also counts tokens per node: ``is_token_in_node[t, n]`` is whether token t has an expert
  on a rank of node n, ``num_tokens_per_node[n]`` how many tokens do (a token counts once per node).
- Combine over more than one node is two-level, as the hardware path does it: per token and per
  node n the token reached, the partial is the float32 sum from +0.0 of the rows returned by node n's
  ranks in ascending rank order, rounded to bfloat16 (it crosses the network in bf16); the source
  then sums the partials in float32 from +0.0 in ascending node order and rounds to bfloat16. With
  one node this is the rule above bit for bit (+0.0 + p == p and bf16(float32(bf16(p))) == bf16(p)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from commkit.fp8 import cast_to_fp8  # noqa: F401 - the FP8 cast of ``dispatch(cast_to_fp8=True)``
from commkit.nodes import Nodes


@dataclass
class RankDispatch:
    """What rank r receives.

    x:                     [N_r, H] (dtype of the input)
    x_scales:              [N_r, S] float32 or None
    topk_idx:              [N_r, K] int64, local expert index or -1
    topk_weights:          [N_r, K] float32
    num_tokens_per_expert: L ints
    src_rank:              [N_r] int64, the rank each row came from
    src_token:             [N_r] int64, the token index on that rank
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens_per_expert: list[int]
    src_rank: torch.Tensor
    src_token: torch.Tensor


@dataclass
class RankLayout:
    """num_tokens_per_rank [R], num_tokens_per_expert [E], is_token_in_rank [T, R] bool,
    num_tokens_per_node [N] int64, is_token_in_node [T, N] bool."""

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_tokens_per_node: torch.Tensor
    is_token_in_node: torch.Tensor


def layout_reference(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int | None = None
) -> RankLayout:
    """Layout of one rank's routing. topk_idx: [T, K] int64 in [-1, E)."""
    num_tokens = topk_idx.shape[0]
    experts_per_rank = num_experts // num_ranks
    nodes = Nodes.of(num_ranks, num_ranks_per_node)
    uses_expert = torch.zeros(num_tokens, num_experts, dtype=torch.bool)  # [T, E]
    is_token_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
    is_token_in_node = torch.zeros(num_tokens, nodes.num_nodes, dtype=torch.bool)
    for t in range(num_tokens):
        for e in topk_idx[t].tolist():
            if e >= 0:
                uses_expert[t, e] = True
                rank = e // experts_per_rank
                is_token_in_rank[t, rank] = True
                is_token_in_node[t, nodes.node(rank)] = True
    return RankLayout(
        num_tokens_per_rank=is_token_in_rank.sum(dim=0).to(torch.int64),
        num_tokens_per_expert=uses_expert.sum(dim=0).to(torch.int64),
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_node=is_token_in_node.sum(dim=0).to(torch.int64),
        is_token_in_node=is_token_in_node,
    )


def dispatch_reference(
    xs: list[torch.Tensor],
    topk_idxs: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    num_experts: int,
    *,
    x_scales: list[torch.Tensor] | None = None,
    expert_alignment: int = 1,
) -> list[RankDispatch]:
    """Dispatch over all ranks at once.

    xs[r]: [T_r, H]; topk_idxs[r]: [T_r, K] int64; topk_weights[r]: [T_r, K] float32;
    x_scales[r]: [T_r, S] float32 (FP8 input) or None. Returns what each rank receives.
    """
    num_ranks = len(xs)
    experts_per_rank = num_experts // num_ranks
    layouts = [layout_reference(topk_idxs[src], num_experts, num_ranks) for src in range(num_ranks)]
    results = []
    for dst in range(num_ranks):
        rows: list[int] = []
        srcs: list[int] = []
        for src in range(num_ranks):
            for t in range(xs[src].shape[0]):
                if layouts[src].is_token_in_rank[t, dst]:
                    srcs.append(src)
                    rows.append(t)
        src_rank = torch.tensor(srcs, dtype=torch.int64)
        src_token = torch.tensor(rows, dtype=torch.int64)
        hidden = xs[0].shape[1]
        num_topk = topk_idxs[0].shape[1]
        x = torch.empty(len(rows), hidden, dtype=xs[0].dtype)
        idx = torch.empty(len(rows), num_topk, dtype=torch.int64)
        weights = torch.empty(len(rows), num_topk, dtype=torch.float32)
        scales = None
        if x_scales is not None:
            scales = torch.empty(len(rows), x_scales[0].shape[1], dtype=torch.float32)
        for i, (src, t) in enumerate(zip(srcs, rows, strict=True)):
            x[i] = xs[src][t]
            if scales is not None and x_scales is not None:
                scales[i] = x_scales[src][t]
            weights[i] = topk_weights[src][t]
            for k, e in enumerate(topk_idxs[src][t].tolist()):
                local = e - dst * experts_per_rank
                idx[i, k] = local if e >= 0 and 0 <= local < experts_per_rank else -1
        counts = []
        for e in range(experts_per_rank):
            count = int((idx == e).any(dim=1).sum()) if len(rows) else 0
            counts.append(-(-count // expert_alignment) * expert_alignment)
        results.append(RankDispatch(x, scales, idx, weights, counts, src_rank, src_token))
    return results


def combine_reference(
    x_experts: list[torch.Tensor],
    dispatched: list[RankDispatch],
    num_tokens: list[int],
    num_ranks_per_node: int | None = None,
) -> list[torch.Tensor]:
    """Combine over all ranks at once.

    x_experts[r]: [N_r, H] bfloat16, rank r's expert outputs for the rows it received (in the order
    it received them); dispatched[r]: rank r's ``RankDispatch``; num_tokens[s]: T_s;
    num_ranks_per_node: G (None: one node). Returns ys[s]: [T_s, H] bfloat16.
    """
    num_ranks = len(x_experts)
    hidden = x_experts[0].shape[1]
    nodes = Nodes.of(num_ranks, num_ranks_per_node)
    sums = [torch.zeros(n, hidden, dtype=torch.float32) for n in num_tokens]
    for node in range(nodes.num_nodes):
        # Level 1: node ``node``'s partial of every token, its ranks in ascending order (a token
        # gets at most one row per rank), rounded to bf16; only tokens that reached the node have one.
        partials = [torch.zeros(n, hidden, dtype=torch.float32) for n in num_tokens]
        reached = [[False] * n for n in num_tokens]
        for r in nodes.ranks(node):
            got = dispatched[r]
            for i in range(got.src_rank.shape[0]):
                src, t = int(got.src_rank[i]), int(got.src_token[i])
                partials[src][t] = partials[src][t] + x_experts[r][i].to(torch.float32)
                reached[src][t] = True
        # Level 2: the source adds the partials in ascending node order (this loop's order).
        for src, n in enumerate(num_tokens):
            for t in range(n):
                if reached[src][t]:
                    sums[src][t] = sums[src][t] + partials[src][t].to(torch.bfloat16).to(torch.float32)
    return [s.to(torch.bfloat16) for s in sums]
