"""The interface every backend implements.

``Buffer`` validates all arguments (dtypes, shapes, ranges, handle ownership) before it calls a
backend, so backends may assume well-formed inputs:

- ``x``: [T, H] bfloat16 or float8_e4m3fn, contiguous; ``x_scales``: [T, ceil(H/128)] float32 for
  FP8, else None;
- ``topk_idx``: [T, K] int64 in [-1, E); ``topk_weights``: [T, K] float32;
- ``handle``: made by this backend of this buffer for this routing, or None.

``WithoutKnobs`` gives the members that a backend without kernel knobs or an inter-node transport
has (the torch backends, the one-node kernels).
"""

from __future__ import annotations

from typing import Protocol

import torch

from commkit.errors import ConfigError
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout


class Backend(Protocol):
    name: str  # "torch" or "kernels"
    rank: int
    num_ranks: int
    num_ranks_per_node: int  # G: the nodes it runs on (R for one node)
    device_type: str  # "cpu" or "cuda": where the tensors it moves must live
    transport: str | None  # the inter-node hop of the internode kernels ("gin", "nvlink-domain"), else None

    @property
    def knobs(self) -> dict[str, int]:
        """Kernel parameters in use besides the SM budget ({} for a backend without any)."""
        ...

    def set_knobs(self, knobs: dict[str, int]) -> None:
        """Sets some of ``knobs`` (names already checked); ConfigError for a backend without any."""
        ...

    def close(self) -> None:
        """Releases its resources (collective where they are shared with peers)."""
        ...

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


class WithoutKnobs:
    """The knobs and transport of a backend that has neither."""

    name: str
    transport: str | None = None

    @property
    def knobs(self) -> dict[str, int]:
        return {}

    def set_knobs(self, knobs: dict[str, int]) -> None:
        raise ConfigError(f"knobs: the {self.name!r} backend has none, got {sorted(knobs)}")
