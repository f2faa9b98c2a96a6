"""Dispatch and combine of all ranks at once with plain torch operations on one device.

The baseline of the kernels on virtual ranks (``bench --virtual``, ``tests/gpu/bench_kernels.py``):
the same work done with torch ops on the same GPU. All ranks' tokens are concatenated (source rank,
then token); dispatch gathers, per destination rank, the rows of the tokens that go there
(``index_select``: permute by destination and copy into the destination's region in one op); combine
adds each destination's rows back onto their source tokens (``index_add_`` in float32 from +0.0, in
ascending destination order, as ``commkit.reference`` sums) and rounds to bf16.

The rows come out in the order of the semantics (by source rank, then source token), so the results
can be checked against the same expectations as the kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def destination_rows(token_in_rank: torch.Tensor) -> list[torch.Tensor]:
    """Per destination rank, the ascending indices of the tokens ([N, R] bool: token n goes to rank r)
    that go there."""
    return [torch.nonzero(token_in_rank[:, d]).squeeze(1) for d in range(token_in_rank.shape[1])]


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, rows)``, also for float8 (gathered as bytes)."""
    if x.dtype == torch.float8_e4m3fn:
        return x.view(torch.uint8).index_select(0, rows).view(torch.float8_e4m3fn)
    return x.index_select(0, rows)


def dispatch_rows(x: torch.Tensor, dst_rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rows each destination receives, in source order."""
    return [gather_rows(x, rows) for rows in dst_rows]


def combine_rows(recv: list[torch.Tensor], dst_rows: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """[num_tokens, H] bf16: each destination's rows added back onto their tokens, float32, ascending
    destination order."""
    hidden = recv[0].shape[1] if recv else 0
    device = recv[0].device if recv else dst_rows[0].device
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    for rows, r in zip(dst_rows, recv, strict=True):
        acc.index_add_(0, rows, r.float())
    return acc.to(torch.bfloat16)


def dispatch_combine(x: torch.Tensor, dst_rows: list[torch.Tensor]) -> torch.Tensor:
    """Dispatch then combine of bf16 rows (the expert being the identity)."""
    return combine_rows(dispatch_rows(x, dst_rows), dst_rows, x.shape[0])


@dataclass
class TorchOpsDispatch:
    """What one destination rank receives (the fields of a ``DispatchOutput`` that are data)."""

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor  # local expert index, -1 for other ranks' experts and unused slots
    topk_weights: torch.Tensor


def dispatch_all(
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    dst_rows: list[torch.Tensor],
    num_experts: int,
) -> list[TorchOpsDispatch]:
    """Dispatch of all ranks' tokens ([N, ...] concatenated by source rank) with torch ops: rows,
    scales, local expert indices and weights per destination rank."""
    num_ranks = len(dst_rows)
    per_rank = num_experts // num_ranks
    outs = []
    for d, rows in enumerate(dst_rows):
        idx = topk_idx.index_select(0, rows)
        local = idx - d * per_rank
        mine = (idx >= 0) & (local >= 0) & (local < per_rank)
        outs.append(
            TorchOpsDispatch(
                x=gather_rows(x, rows),
                x_scales=x_scales.index_select(0, rows) if x_scales is not None else None,
                topk_idx=torch.where(mine, local, torch.full_like(local, -1)),
                topk_weights=topk_weights.index_select(0, rows),
            )
        )
    return outs
