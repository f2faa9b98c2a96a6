"""Result and handle types shared by every backend.

Shapes use: T tokens on this rank, H hidden, K top-k slots, E experts, R ranks, L = E // R local
experts, N_recv rows received by this rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class EventHandle:
    """Marks the end of asynchronous communication.

    Wraps a ``torch.cuda.Event`` recorded on the stream that did the work; on CPU backends there is
    nothing to wait for and ``event`` is ``None`` (the call had finished when it returned).
    """

    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self.event = event

    @classmethod
    def record(cls, stream: torch.cuda.Stream | None = None) -> EventHandle:
        """An event recorded now on ``stream`` (default: the current CUDA stream)."""
        event = torch.cuda.Event()
        event.record(stream)
        return cls(event)

    def current_stream_wait(self) -> None:
        """Make the caller's current stream wait for the marked work (no-op on CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the marked work finished (no-op on CPU)."""
        if self.event is not None:
            self.event.synchronize()

    def __repr__(self) -> str:
        return f"EventHandle({'cpu' if self.event is None else 'cuda'})"


@dataclass(frozen=True)
class Layout:
    """Where this rank's tokens go.

    num_tokens_per_rank:   [R] int64, tokens sent to each rank (a token counts once per rank)
    num_tokens_per_expert: [E] int64, tokens whose top-k holds each expert (once per token)
    is_token_in_rank:      [T, R] bool
    num_tokens_per_node:   [N] int64, tokens sent to each node (a token counts once per node), or None
    is_token_in_node:      [T, N] bool, or None

    Nodes group ranks contiguously: with G = ``Buffer.num_ranks_per_node``, node n holds ranks
    [n*G, (n+1)*G) and N = R // G. The per-node fields are filled by the ``torch`` backend, the
    internode kernels and ``commkit.emulate``'s virtual nodes; the intranode kernels leave them None.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    num_tokens_per_node: torch.Tensor | None = None
    is_token_in_node: torch.Tensor | None = None


@dataclass
class Handle:
    """What a dispatch leaves behind for the combine (and for a cached dispatch with the same routing).

    The common fields are checked by ``Buffer`` before it hands the handle to a backend; ``state``
    belongs to the backend that made the handle.

    buffer_id:      ``id`` of the ``Buffer`` that made it (a handle is only valid there)
    backend:        name of the backend that made it
    num_tokens:     T of the dispatch
    num_experts:    E of the dispatch
    num_recv_tokens: N_recv, rows received by this rank
    topk_idx:       [T, K] a copy of the routing the handle was made for (to recognise another one)
    state:          backend-private data
    topk_idx_ptr, topk_idx_version: the caller's tensor when the handle was made (data pointer and
                    in-place version counter): the same, unwritten tensor needs no comparison
    """

    buffer_id: int
    backend: str
    num_tokens: int
    num_experts: int
    num_recv_tokens: int
    topk_idx: torch.Tensor
    state: Any = field(repr=False)
    topk_idx_ptr: int = 0
    topk_idx_version: int = -1

    @classmethod
    def for_routing(
        cls,
        topk_idx: torch.Tensor,
        *,
        buffer_id: int,
        backend: str,
        num_experts: int,
        num_recv_tokens: int,
        state: Any,
    ) -> Handle:
        """A handle that remembers ``topk_idx`` [T, K] (a copy, and the tensor's identity and version)."""
        return cls(
            buffer_id=buffer_id,
            backend=backend,
            num_tokens=topk_idx.shape[0],
            num_experts=num_experts,
            num_recv_tokens=num_recv_tokens,
            topk_idx=topk_idx.clone(),
            state=state,
            topk_idx_ptr=topk_idx.data_ptr(),
            topk_idx_version=topk_idx._version,
        )


@dataclass
class DispatchOutput:
    """Rows received by this rank, ordered by source rank, then by source token index.

    x:                     [N_recv, H] bf16, or float8_e4m3fn for FP8 dispatch
    x_scales:              [N_recv, ceil(H/128)] float32 for FP8 dispatch, else None
    topk_idx:              [N_recv, K] int64, local expert index in [0, L) or -1 (expert elsewhere/unused)
    topk_weights:          [N_recv, K] float32, the source's weights, alongside ``topk_idx``
    num_tokens_per_expert: L ints, received rows per local expert, rounded up to ``expert_alignment``
    handle:                pass to ``Buffer.combine`` (and to a dispatch with the same routing)
    event:                 marks the end of the communication (see ``async_finish``)
    """

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens_per_expert: list[int]
    handle: Handle
    event: EventHandle


@dataclass
class CombineOutput:
    """x: [T, H] bf16, per source token the float32 sum (in source-rank order) of the rows sent back."""

    x: torch.Tensor
    event: EventHandle
