"""Deterministic routing scenarios shared by the CPU tests (every rank rebuilds its own inputs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """A routing scenario for R ranks.

    tokens: T per rank (a tuple of R values); skew: 0 uniform, larger favours low expert ids;
    unused: fraction of top-k slots set to -1; hot_expert: route every slot to this expert.
    ranks_per_node: G for node-aware runs (None: one node); empty_node: no token picks an expert of
    this node's ranks; own_node_only: every token picks experts of its own rank's node only.
    """

    name: str
    tokens: tuple[int, ...]
    hidden: int = 64
    num_topk: int = 4
    num_experts: int = 16
    fp8: bool = False
    skew: float = 0.0
    unused: float = 0.0
    hot_expert: int | None = None
    empty_rank: int | None = None  # no token picks an expert of this rank
    duplicates: bool = False  # every token names its first expert twice
    expert_alignment: int = 1
    seed: int = 0
    ranks_per_node: int | None = None
    empty_node: int | None = None
    own_node_only: bool = False


def make_inputs(case: Case, rank: int):
    """x ([T,H] bf16, or (fp8 [T,H], scales [T, ceil(H/128)])), topk_idx [T,K] int64, weights [T,K] f32."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank)
    num_tokens, num_experts, k = case.tokens[rank], case.num_experts, case.num_topk
    x = (torch.randn(num_tokens, case.hidden, generator=gen) * 4).to(torch.bfloat16)
    allowed = torch.arange(num_experts)
    if case.empty_rank is not None:
        per_rank = num_experts // len(case.tokens)
        allowed = allowed[(allowed // per_rank) != case.empty_rank]
    if case.empty_node is not None or case.own_node_only:
        ranks_per_node = case.ranks_per_node or len(case.tokens)
        per_node = num_experts // len(case.tokens) * ranks_per_node  # experts per node
        if case.empty_node is not None:
            allowed = allowed[(allowed // per_node) != case.empty_node]
        if case.own_node_only:
            allowed = allowed[(allowed // per_node) == rank // ranks_per_node]
    probs = 1.0 / (1.0 + torch.arange(len(allowed), dtype=torch.float64)) ** case.skew
    if num_tokens:
        picks = torch.multinomial(probs.expand(num_tokens, -1), k, replacement=False, generator=gen)
        topk_idx = allowed[picks]
    else:
        topk_idx = torch.empty(0, k, dtype=torch.int64)
    if case.hot_expert is not None:
        topk_idx[:] = -1
        topk_idx[:, 0] = case.hot_expert
    if case.duplicates and k > 1:
        topk_idx[:, 1] = topk_idx[:, 0]
    if case.unused:
        drop = torch.rand(num_tokens, k, generator=gen) < case.unused
        topk_idx = torch.where(drop, -1, topk_idx)
    weights = torch.rand(num_tokens, k, generator=gen, dtype=torch.float32)
    if case.fp8:
        scales = torch.rand(num_tokens, math.ceil(case.hidden / 128), generator=gen) + 0.5
        return (x.to(torch.float8_e4m3fn), scales), topk_idx.contiguous(), weights
    return x, topk_idx.contiguous(), weights


def expert_output(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """A rank-dependent stand-in for the experts: [N, H] -> [N, H] bf16.

    NOTE: ranks scale by 1, 2**30, -2**30 in turn, so that a token's rows cancel or not depending
    on the order in which the ranks' rows are added (the order is part of the semantics).
    """
    scale = (1.0, 2.0**30, -(2.0**30))[rank % 3]
    return (recv_x.to(torch.float32) * scale - 0.375).to(torch.bfloat16)


def combine_in_order(x_experts, dispatched, num_tokens, ranks) -> list[torch.Tensor]:
    """Combine summing the ranks' rows in the given order (tests that the order matters)."""
    hidden = x_experts[0].shape[1]
    sums = [torch.zeros(n, hidden) for n in num_tokens]
    for r in ranks:
        d = dispatched[r]
        for i in range(d.src_rank.shape[0]):
            src, t = int(d.src_rank[i]), int(d.src_token[i])
            sums[src][t] = sums[src][t] + x_experts[r][i].float()
    return [s.to(torch.bfloat16) for s in sums]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-for-bit comparison (tells -0.0 from +0.0, compares NaN payloads)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t
