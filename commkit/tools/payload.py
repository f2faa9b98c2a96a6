"""What the bench sends and what must arrive: self-checking payloads and their expectation.

Payloads encode (source rank, token, column) so that each receiver knows what it must get from the
routing alone (every rank regenerates all ranks' routings from the seed, a few KiB). The expectation
follows the semantics of ``commkit.reference``; every repetition's output is compared with it
(``#wrong``: rows that differ in any field, plus missing or extra rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from commkit.nodes import Nodes
from commkit.routing import synthetic_topk
from commkit.tools.shapes import MoEShape

FP8_BLOCK = 128


# --------------------------------------------------------------------------------------- inputs
def payload_rows(
    src_rank: torch.Tensor, src_token: torch.Tensor, hidden: int, dtype: str, salt: int
) -> torch.Tensor:
    """[N, H] rows that encode (source rank, token, column); exact in bf16 and in FP8 e4m3.

    bf16: integers in [-127, 127] / 32; fp8: integers in [-7, 7] / 4 (all representable exactly).
    code = (src_rank * 7919 + src_token * 104729 + col * 31 + salt * 613) mod 255, computed as the sum
    of a per-row and a per-column residue (each < 255) so that the [N, H] temporaries are int16 (at
    DeepSeek-V3 size every checking thread builds them for ~20k rows x 7168 columns).
    """
    col = torch.arange(hidden, device=src_rank.device, dtype=torch.int64)
    row_code = ((src_rank * 7919 + src_token * 104729 + salt * 613) % 255).to(torch.int16)  # [N]
    col_code = ((col * 31) % 255).to(torch.int16)  # [H]
    code = (row_code[:, None] + col_code[None, :]) % 255  # [N, H] int16, values < 255
    if dtype == "fp8":
        # NOTE: integers / 4 are exact in bf16, then in FP8 e4m3 (|v| <= 1.75)
        return ((code % 15 - 7).to(torch.bfloat16) / 4).to(torch.float8_e4m3fn)
    return (code - 127).to(torch.bfloat16) / 32


def payload_scales(src_rank: torch.Tensor, src_token: torch.Tensor, hidden: int, salt: int) -> torch.Tensor:
    """[N, ceil(H/128)] float32 FP8 scales, also encoding (source rank, token, block)."""
    blocks = torch.arange(math.ceil(hidden / FP8_BLOCK), device=src_rank.device, dtype=torch.int64)
    code = (src_rank[:, None] * 131 + src_token[:, None] * 17 + blocks[None, :] * 7 + salt) % 97
    return 1.0 + code.to(torch.float32) / 128


@dataclass
class InputSet:
    """All ranks' routings (small) and this rank's inputs for one rotation slot."""

    topk_idx: list[torch.Tensor]  # R x [T, K] int64
    topk_weights: list[torch.Tensor]  # R x [T, K] float32
    x: torch.Tensor  # [T, H] this rank's rows
    x_scales: torch.Tensor | None
    salt: int


def make_input_set(
    shape: MoEShape, dtype: str, rank: int, num_ranks: int, salt: int, skew: float, device: torch.device
) -> InputSet:

    groups = shape.num_expert_groups if shape.num_experts % shape.num_expert_groups == 0 else 1
    idxs, weights = [], []
    for src in range(num_ranks):
        idx, w = synthetic_topk(
            shape.num_tokens,
            shape.num_experts,
            shape.top_k,
            skew=skew,
            num_groups=groups,
            max_groups=shape.topk_groups if groups > 1 else None,
            seed=salt * 100_003 + src,
        )
        idxs.append(idx.to(device))
        weights.append(w.to(device))
    ranks = torch.full((shape.num_tokens,), rank, dtype=torch.int64, device=device)
    tokens = torch.arange(shape.num_tokens, dtype=torch.int64, device=device)
    x = payload_rows(ranks, tokens, shape.hidden, dtype, salt)
    scales = payload_scales(ranks, tokens, shape.hidden, salt) if dtype == "fp8" else None
    return InputSet(idxs, weights, x, scales, salt)


# --------------------------------------------------------------------------------------- expectation
def token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: token t has an expert on rank r."""
    per_rank = num_experts // num_ranks
    dst = torch.where(topk_idx >= 0, topk_idx // per_rank, torch.full_like(topk_idx, -1))
    ranks = torch.arange(num_ranks, device=topk_idx.device)
    return (dst[:, :, None] == ranks[None, None, :]).any(dim=1)


@dataclass
class Expected:
    """What ``rank`` must receive, per the semantics in ``commkit.reference``."""

    src_rank: torch.Tensor  # [N] int64
    src_token: torch.Tensor  # [N] int64
    topk_idx: torch.Tensor  # [N, K] local expert or -1
    topk_weights: torch.Tensor  # [N, K]


def expected_dispatch(inputs: InputSet, num_experts: int, rank: int) -> Expected:
    """Rows ordered by source rank, then source token; local expert indices, -1 elsewhere."""
    num_ranks = len(inputs.topk_idx)
    per_rank = num_experts // num_ranks
    src_ranks, src_tokens, idxs, weights = [], [], [], []
    for src, (idx, w) in enumerate(zip(inputs.topk_idx, inputs.topk_weights, strict=True)):
        tokens = token_in_rank(idx, num_experts, num_ranks)[:, rank].nonzero().flatten()
        sel = idx[tokens]
        local = sel - rank * per_rank
        mine = (sel >= 0) & (local >= 0) & (local < per_rank)
        idxs.append(torch.where(mine, local, torch.full_like(local, -1)))
        weights.append(w[tokens])
        src_tokens.append(tokens)
        src_ranks.append(torch.full_like(tokens, src))
    return Expected(torch.cat(src_ranks), torch.cat(src_tokens), torch.cat(idxs), torch.cat(weights))


CHECK_ROWS = 4096  # rows compared at once: bounds the [rows, H] temporaries of the checking threads


def count_wrong_dispatch(out: Any, exp: Expected, hidden: int, dtype: str, salt: int) -> int:
    """Rows of ``out`` that differ from the expectation in x, scales, topk_idx or weights, plus the
    difference in row count (missing or extra rows count as wrong)."""
    n_exp, n_got = exp.src_rank.numel(), int(out.x.shape[0])
    n = min(n_exp, n_got)
    got_x = out.x[:n]
    want_dtype = torch.float8_e4m3fn if dtype == "fp8" else torch.bfloat16
    if got_x.dtype != want_dtype:
        bad = torch.ones(n, dtype=torch.bool, device=got_x.device)
    else:
        parts = []
        for lo in range(0, n, CHECK_ROWS):
            hi = min(n, lo + CHECK_ROWS)
            want_x = payload_rows(exp.src_rank[lo:hi], exp.src_token[lo:hi], hidden, dtype, salt)
            parts.append((got_x[lo:hi].view(torch.uint8) != want_x.view(torch.uint8)).any(dim=1))
        bad = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=got_x.device)
    if dtype == "fp8":
        want_s = payload_scales(exp.src_rank[:n], exp.src_token[:n], hidden, salt)
        if out.x_scales is None:
            bad |= True
        else:
            bad |= (out.x_scales[:n] != want_s).any(dim=1)
    bad |= (out.topk_idx[:n] != exp.topk_idx[:n]).any(dim=1)
    bad |= (out.topk_weights[:n] != exp.topk_weights[:n]).any(dim=1)
    return int(bad.sum()) + abs(n_exp - n_got)


def expert_output(out: Any) -> torch.Tensor:
    """The stand-in expert: the received rows as bf16 (FP8 values are exact in bf16, scales unused)."""
    return out.x.to(torch.bfloat16)


def expected_combine(
    inputs: InputSet,
    rank: int,
    num_experts: int,
    hidden: int,
    dtype: str,
    num_ranks_per_node: int | None = None,
) -> torch.Tensor:
    """[T, H] bf16: each of this rank's tokens summed once per rank it went to, as
    ``commkit.reference.combine_reference`` sums with ``num_ranks_per_node`` G (None: one node): per
    node, float32 from +0.0 in ascending rank order, rounded to bf16; the node partials added in float32
    from +0.0 in ascending node order (one node: a single rounding)."""
    num_ranks = len(inputs.topk_idx)
    nodes = Nodes.of(num_ranks, num_ranks_per_node)
    in_rank = token_in_rank(inputs.topk_idx[rank], num_experts, num_ranks)  # [T, R]
    row = inputs.x.to(torch.bfloat16).to(torch.float32)
    total = torch.zeros_like(row)
    for node in range(nodes.num_nodes):
        partial = torch.zeros_like(row)
        for r in nodes.ranks(node):  # NOTE: ascending rank order, as the reference sums
            partial = partial + torch.where(in_rank[:, r : r + 1], row, torch.zeros_like(row))
        # NOTE: a node the token did not reach adds +0.0, which changes no sum that starts from +0.0
        total = total + partial.to(torch.bfloat16).to(torch.float32)
    return total.to(torch.bfloat16)


def count_wrong_combine(y: torch.Tensor, want: torch.Tensor) -> int:
    if y.shape != want.shape:
        return max(int(want.shape[0]), int(y.shape[0]))
    return int((y.view(torch.int16) != want.view(torch.int16)).any(dim=1).sum())
