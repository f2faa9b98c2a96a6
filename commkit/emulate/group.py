"""``EmulatedGroup``: R virtual ranks on one GPU behind a list API (lists indexed by rank in and out).

One call packs the ranks' inputs (``rows``), orders the comm stream with the callers (``streams``) and
runs one launch of all ranks on the group's engine; ``spawn`` runs per-rank code instead
(``virtual_rank``, ``rendezvous``). The package docstring (``commkit.emulate``) says what is modelled
and how the kernel timings are recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from commkit.backends.launcher import Launcher, stream_context
from commkit.emulate.memory import EmulatedBuffers
from commkit.emulate.rendezvous import _collective, _execute, _spawn
from commkit.emulate.rows import _cat_rows
from commkit.emulate.streams import _keep_for_stream, _StreamSync
from commkit.emulate.virtual_rank import VirtualRank
from commkit.errors import ConfigError
from commkit.nodes import Nodes
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

DEFAULT_NUM_SMS = 16


@dataclass
class EmulatedState:
    """Handle.state of a virtual rank: the packed state of the whole group's call and the rank."""

    shared: object  # commkit.backends.kernels.KernelState
    rank: int


def _check_handles(handles: list[Handle], num_ranks: int) -> Any:
    """The packed state of the one dispatch call whose handles these are (rank r's at index r)."""
    for r, h in enumerate(handles):
        if not isinstance(getattr(h, "state", None), EmulatedState):
            raise ValueError(
                f"handles[{r}]: expected a handle of this EmulatedGroup's dispatch, got state "
                f"{type(getattr(h, 'state', None)).__name__}"
            )
    calls = {id(h.state.shared) for h in handles}
    if len(calls) != 1:
        raise ValueError(
            f"handles: expected the handles of one dispatch call (one per rank), got handles of "
            f"{len(calls)} different calls"
        )
    ranks = [h.state.rank for h in handles]
    if ranks != list(range(num_ranks)):
        raise ValueError(
            f"handles: expected the handles of ranks {list(range(num_ranks))} in order, got {ranks}"
        )
    return handles[0].state.shared


class EmulatedGroup:
    """R virtual ranks on one GPU. Every method takes and returns lists indexed by rank."""

    def __init__(
        self,
        num_ranks: int,
        *,
        num_sms: int = DEFAULT_NUM_SMS,
        timeout_s: float = 60.0,
        device: torch.device | str | None = None,
        num_ranks_per_node: int | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        """``device``: a CUDA device (default: the current one), or ``"cpu"`` for the host execution
        of the same kernels (``commkit.jit.host``); ``launcher``: where the kernels run
        (``commkit.backends.launcher``; default: the device's)."""
        from commkit.backends import kernels_unavailable_reason
        from commkit.backends.internode import InternodeEngine
        from commkit.backends.kernels import KernelEngine
        from commkit.jit.host import host_unavailable_reason

        self.device = (
            torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        )
        if launcher is None:
            reason = (
                host_unavailable_reason() if self.device.type == "cpu" else kernels_unavailable_reason(None)
            )
            if reason is not None:
                raise ConfigError(f"commkit.emulate needs the kernels on {self.device}: {reason}")
        self.num_ranks = num_ranks
        self.num_sms = num_sms
        self.buffers = EmulatedBuffers(num_ranks, self.device)
        # Virtual nodes: N = R / G nodes of G ranks, the inter-node hop on the nvlink-domain net
        nodes = Nodes.of(num_ranks, num_ranks_per_node)
        self.num_ranks_per_node, self.num_nodes = nodes.num_ranks_per_node, nodes.num_nodes
        self.engine: KernelEngine
        if self.num_nodes > 1:
            self.engine = InternodeEngine(
                num_ranks,
                0,
                num_ranks,
                self.buffers,
                gpus_per_node=self.num_ranks_per_node,
                timeout_s=timeout_s,
                device=self.device,
                launcher=launcher,
            )
        else:
            self.engine = KernelEngine(
                num_ranks,
                0,
                num_ranks,
                self.buffers,
                timeout_s=timeout_s,
                device=self.device,
                launcher=launcher,
            )
        self.launcher = self.engine.launcher
        self.comm_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.timeout_s = timeout_s
        # Kernel timings of the most recent call of each op (module docstring); not on CPU
        self.engine.record_kernel_events = self.device.type == "cuda"
        self.kernel_events: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = self.engine.kernel_events
        self.kernel_segments: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = (
            self.engine.kernel_segments
        )
        # Rendezvous of the per-rank threads of spawn()
        self._calls: list[Any] = [None] * num_ranks
        self._results: list[Any] = [None] * num_ranks
        self._barrier = threading.Barrier(num_ranks, action=lambda: _execute(self))
        self._failure: tuple[int, BaseException] | None = None  # first rank of spawn() that failed

    def spawn(self, fn: Callable[[VirtualRank], Any]) -> list[Any]:
        """Runs ``fn(backend)`` in one thread per virtual rank; returns the results by rank.

        ``backend`` is a ``VirtualRank`` (the ``Backend`` protocol for that rank): code written for
        one rank of a real group runs unchanged. A rank's exception is re-raised here.
        """
        return _spawn(self, fn)

    def _collective(self, rank: int, op: str, args: dict[str, Any]) -> Any:
        return _collective(self, rank, op, args)

    def _check_lists(self, **lists: list | None) -> None:
        for name, values in lists.items():
            if values is not None and len(values) != self.num_ranks:
                raise ValueError(f"{name}: expected one entry per rank ({self.num_ranks}), got {len(values)}")

    def _sync(
        self, previous_event: EventHandle | None, async_finish: bool, sync: _StreamSync | None
    ) -> _StreamSync:
        if sync is not None:
            return sync
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return _StreamSync([stream], [previous_event], [async_finish])

    def _run(self, sync: _StreamSync) -> None:
        """The comm stream waits for every rank's previous_event, or else for its current stream."""
        if self.comm_stream is None:
            return
        waited: set[int] = set()
        for stream, event in zip(sync.streams, sync.events, strict=True):
            if event is not None and event.event is not None:
                self.comm_stream.wait_event(event.event)
            elif stream is not None and stream.cuda_stream not in waited:
                waited.add(stream.cuda_stream)
                self.comm_stream.wait_stream(stream)

    def _finish(self, sync: _StreamSync, tensors: list) -> EventHandle:
        """Outputs are kept for every caller stream; a caller's stream waits for the comm stream
        unless every rank on that stream passed async_finish."""
        if self.comm_stream is None:  # the CPU: every launch finished when it returned
            return EventHandle()
        event = EventHandle.record(self.comm_stream)
        streams: dict[int, tuple[Any, bool]] = {}
        for stream, async_finish in zip(sync.streams, sync.async_finish, strict=True):
            if stream is not None:
                _, wait = streams.get(stream.cuda_stream, (stream, False))
                streams[stream.cuda_stream] = (stream, wait or not async_finish)
        for stream, wait in streams.values():
            for t in tensors:
                if t is not None:
                    t.record_stream(stream)
            if wait:
                stream.wait_stream(self.comm_stream)
        return event

    def get_dispatch_layout(
        self, topk_idxs: list[torch.Tensor], num_experts: int, *, _sync: _StreamSync | None = None
    ) -> list[Layout]:
        self._check_lists(topk_idxs=topk_idxs)
        counts = [t.shape[0] for t in topk_idxs]
        sync = self._sync(None, False, _sync)
        self._run(sync)
        with stream_context(self.comm_stream):
            per_rank, per_expert, in_rank, _, _ = self.engine.layout(
                _cat_rows(topk_idxs), counts, num_experts
            )
            in_rank_list = list(torch.split(in_rank, counts))
        self._finish(sync, [per_rank, per_expert, in_rank])
        layouts = []
        for r in range(self.num_ranks):
            in_node = None
            if self.num_nodes > 1:
                rows = in_rank_list[r]
                in_node = rows.view(rows.shape[0], self.num_nodes, self.num_ranks_per_node).any(-1)
            layouts.append(
                Layout(
                    per_rank[r].to(torch.int64),
                    per_expert[r].to(torch.int64),
                    in_rank_list[r],
                    in_node.sum(0).to(torch.int64) if in_node is not None else None,
                    in_node,
                )
            )
        return layouts

    def dispatch(
        self,
        xs: list[torch.Tensor],
        topk_idxs: list[torch.Tensor],
        topk_weights: list[torch.Tensor],
        num_experts: int,
        *,
        x_scales: list[torch.Tensor] | None = None,
        cast_to_fp8: bool = False,
        handles: list[Handle] | None = None,
        expert_alignment: int = 1,
        num_sms: int | None = None,
        num_worst_tokens: int | None = None,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
        _sync: _StreamSync | None = None,
    ) -> list[DispatchOutput]:
        """xs[r]: [T_r, H] bf16 (or float8_e4m3fn with x_scales[r] [T_r, H/128] float32);
        topk_idxs[r]: [T_r, K] int64 in [-1, E); topk_weights[r]: [T_r, K] float32.
        cast_to_fp8: bf16 in, FP8 out (rule of commkit.fp8.cast_to_fp8). handles: the previous
        dispatch's handles for the same routing (skips layout and count exchange)."""
        from commkit.backends.kernels import aligned_counts

        self._check_lists(
            xs=xs, topk_idxs=topk_idxs, topk_weights=topk_weights, x_scales=x_scales, handles=handles
        )
        counts = [x.shape[0] for x in xs]
        state = _check_handles(handles, self.num_ranks) if handles is not None else None
        if state is not None and counts != state.token_counts:
            raise ValueError(
                f"xs: expected token counts {state.token_counts} (by rank) of the handles' dispatch, "
                f"got {counts}"
            )
        num_sms = num_sms or self.num_sms
        sync = self._sync(previous_event, async_finish, _sync)
        self._run(sync)
        with stream_context(self.comm_stream):
            result = self.engine.dispatch(
                _cat_rows(xs),
                _cat_rows(x_scales) if x_scales is not None else None,
                _cat_rows(topk_idxs),
                _cat_rows(topk_weights),
                counts,
                num_experts,
                state=state,
                num_sms=num_sms,
                cast_to_fp8=cast_to_fp8,
                num_worst_tokens=num_worst_tokens,
            )
        if any(sync.async_finish):  # the comm stream may still read the caller's tensors
            _keep_for_stream([*xs, *(x_scales or []), *topk_idxs, *topk_weights], self.comm_stream)
        event = self._finish(
            sync,
            [result.x, result.x_scales, result.topk_idx, result.topk_weights, result.state.recv_src_token],
        )
        outs = []
        st = result.state
        for r in range(self.num_ranks):
            lo, hi = result.row_offsets[r], result.row_offsets[r + 1]
            handle = Handle.for_routing(
                topk_idxs[r],
                buffer_id=id(self),
                backend="kernels",
                num_experts=num_experts,
                num_recv_tokens=hi - lo,
                state=EmulatedState(st, r),
            )
            per_expert = aligned_counts(st.expert_counts[r], expert_alignment) if st.expert_counts else []
            outs.append(
                DispatchOutput(
                    x=result.x[lo:hi],
                    x_scales=result.x_scales[lo:hi] if result.x_scales is not None else None,
                    topk_idx=result.topk_idx[lo:hi],
                    topk_weights=result.topk_weights[lo:hi],
                    num_tokens_per_expert=per_expert,
                    handle=handle,
                    event=event,
                )
            )
        return outs

    def combine(
        self,
        xs: list[torch.Tensor],
        handles: list[Handle],
        *,
        num_sms: int | None = None,
        previous_event: EventHandle | None = None,
        async_finish: bool = False,
        _sync: _StreamSync | None = None,
    ) -> list[CombineOutput]:
        """xs[r]: [N_r, H] bf16 rows in the order rank r received them -> ys[s]: [T_s, H] bf16."""
        self._check_lists(xs=xs, handles=handles)
        state = _check_handles(handles, self.num_ranks)
        hidden = xs[0].shape[-1] if xs[0].dim() == 2 else None
        for r, (x, h) in enumerate(zip(xs, handles, strict=True)):
            if x.dim() != 2 or x.shape != (h.num_recv_tokens, hidden) or x.dtype != torch.bfloat16:
                raise ValueError(
                    f"xs[{r}]: expected [{h.num_recv_tokens}, H] bfloat16 with the H of xs[0] ({hidden}), "
                    f"got {tuple(x.shape)} {x.dtype}"
                )
        sync = self._sync(previous_event, async_finish, _sync)
        self._run(sync)
        with stream_context(self.comm_stream):
            out = self.engine.combine(
                _cat_rows(xs), state, handles[0].num_experts, num_sms=num_sms or self.num_sms
            )
        if any(sync.async_finish):  # the comm stream may still read the caller's tensors
            _keep_for_stream(list(xs), self.comm_stream)
        event = self._finish(sync, [out])
        return [CombineOutput(y, event) for y in torch.split(out, state.token_counts)]
