"""``VirtualRank``: the ``Backend`` protocol for one virtual rank of ``EmulatedGroup.spawn``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from commkit.errors import ConfigError
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

if TYPE_CHECKING:
    from commkit.emulate.group import EmulatedGroup


class VirtualRank:
    """The ``Backend`` protocol for one virtual rank of an ``EmulatedGroup`` (see ``spawn``).

    Every call is collective: it waits until all ranks made the same call, then one launch serves
    them all. ``num_sms``, ``expert_alignment``, ``cast_to_fp8`` and ``num_worst_tokens`` must be the
    same on every rank (else every rank raises ``ValueError``). Each rank's ``previous_event`` (or,
    without one, its current stream) is waited for, and unless it passed ``async_finish`` its current
    stream waits for the communication.
    """

    name = "kernels"

    def __init__(self, group: EmulatedGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.num_ranks = group.num_ranks
        self.num_ranks_per_node = group.num_ranks_per_node  # virtual nodes (Buffer.from_backend reads it)
        self.device_type = group.device.type
        # virtual nodes: the inter-node hop runs on the nvlink-domain net (one allocation); one node: none
        self.transport = "nvlink-domain" if group.num_ranks_per_node < group.num_ranks else None

    def close(self) -> None:
        """Nothing of its own to release: the group's buffers are the group's (its ranks share them)."""

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        return self.group._collective(self.rank, "layout", {"topk_idx": topk_idx, "num_experts": num_experts})

    def set_knobs(self, knobs: dict[str, int]) -> None:
        """The internode kernels' role split (virtual nodes; shared by the group's ranks)."""
        apply = getattr(self.group.engine, "set_knobs", None)
        if apply is None:
            raise ConfigError("knobs: one virtual node runs the intranode kernels, which have none")
        apply(knobs)

    @property
    def knobs(self) -> dict[str, int]:
        """The role split in use (virtual nodes), else {}."""
        return dict(getattr(self.group.engine, "knobs", {}))

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        *,
        layout: Layout | None = None,
        handle: Handle | None = None,
        expert_alignment: int = 1,
        num_sms: int | None = None,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
        buffer_id: int | None = None,
        **extra: Any,
    ) -> DispatchOutput:
        args = dict(
            x=x,
            x_scales=x_scales,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_experts=num_experts,
            handle=handle,
            expert_alignment=expert_alignment,
            num_sms=num_sms,
            buffer_id=buffer_id,
            previous_event=previous_event,
            async_finish=async_finish,
            **extra,
        )
        return self.group._collective(self.rank, "dispatch", args)

    def combine(
        self,
        x: torch.Tensor,
        handle: Handle,
        *,
        num_sms: int | None = None,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
    ) -> CombineOutput:
        args = dict(
            x=x, handle=handle, num_sms=num_sms, previous_event=previous_event, async_finish=async_finish
        )
        return self.group._collective(self.rank, "combine", args)
