"""The interface every backend implements.

``Buffer`` validates all arguments (dtypes, shapes, ranges, handle ownership) before it calls a
backend, so backends may assume well-formed inputs:

- ``x``: [T, H] bfloat16 or float8_e4m3fn, contiguous; ``x_scales``: [T, ceil(H/128)] float32 for
  FP8, else None;
- ``topk_idx``: [T, K] int64 in [-1, E); ``topk_weights``: [T, K] float32;
- ``handle``: made by this backend of this buffer for this routing, or None.
"""

from __future__ import annotations

from typing import Protocol

import torch

from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout


class Backend(Protocol):
    name: str
    rank: int
    num_ranks: int
    device_type: str  # "cpu" or "cuda": where the tensors it moves must live

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout: ...

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        *,
        layout: Layout | None,
        handle: Handle | None,
        expert_alignment: int,
        num_sms: int,
        previous_event: EventHandle | None,
        async_finish: bool,
        buffer_id: int,
        cast_to_fp8: bool = False,
        num_worst_tokens: int | None = None,
    ) -> DispatchOutput: ...

    def combine(
        self,
        x: torch.Tensor,
        handle: Handle,
        *,
        num_sms: int,
        previous_event: EventHandle | None,
        async_finish: bool,
    ) -> CombineOutput: ...
