"""Virtual ranks: R ranks of one EP group on one GPU, running the very same kernels.

Each rank's symmetric buffer is a region of one device allocation and one launch runs the blocks of
all ranks (grid = R x num_sms; a block's rank is ``blockIdx.x // num_sms``). The ranks wait for each
other inside the kernels, so all R x num_sms blocks must be resident at once: ``EmulatedGroup``
checks the occupancy and raises ``ConfigError`` naming the largest budget that fits.

Virtual nodes: ``EmulatedGroup(R, num_ranks_per_node=G)`` with G < R makes N = R / G nodes (2x4, 4x2,
2x2, ...) and runs the internode kernels (``commkit.backends.internode``): tokens cross the inter-node
hop once per destination node on the ``nvlink-domain`` net (direct stores, here into regions of the
same allocation) and are forwarded inside the node; combine sums inside the node before the hop back.

What it models: the kernels' protocol, ordering, bit-exact results, SM budget and the memory traffic
of R ranks. What it does not: NVLink. Peer writes go to HBM of the same GPU (about 3 TB/s shared by
all virtual ranks, instead of about 450 GB/s per GPU and direction over NVLink), system-scope
acquire/release stay on one GPU, and the R ranks share one GPU's SMs and L2.

    group = EmulatedGroup(8, num_sms=16)
    outs = group.dispatch(xs, topk_idxs, topk_weights, num_experts=256)   # lists over the ranks
    ys = group.combine([o.x for o in outs], [o.handle for o in outs])

Per-rank code (as under torchrun) runs with ``group.spawn(fn)``: ``fn(backend)`` runs in one thread per
virtual rank, ``backend`` implements the ``Backend`` protocol (``commkit.backends.base``) for that rank,
and its collective calls meet in one launch.

Kernel timings: ``group.kernel_events[op]`` (op "layout", "dispatch", "combine") is a pair of CUDA
events (``enable_timing=True``) recorded on ``group.comm_stream`` immediately before the first kernel
launch of the most recent call of that op (the notify / barrier kernel included) and immediately
after its last kernel launch: ``start.elapsed_time(end)`` covers the kernels only, not the packing of
the ranks' inputs (``torch.cat``, skipped when they are adjacent views of one buffer), the output
allocations or the ordering with the callers' streams. One exception: a dispatch without handles and
without ``num_worst_tokens`` reads the receive counts back between the notify and the dispatch
kernel, and that host round trip (GPU idle) lies between the two events; ``group.kernel_segments[op]``
lists one (start, end) pair per run of launches without a read-back in between, whose summed elapsed
times exclude it. Not recorded on CPU (the host tests' stand-ins) or while a CUDA graph is captured.

CuPy and a GPU are needed when a group is created, not when this module is imported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from commkit.backends import kernels_layout as kl
from commkit.backends.launcher import Launcher, stream_context
from commkit.backends.symmetric import SymmetricBuffers
from commkit.errors import CommError, CommTimeoutError, ConfigError
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

DEFAULT_NUM_SMS = 16


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _keep_for_stream(tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
    """Keeps the caller's tensors allocated until the work queued so far on ``stream`` ends."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)


def _adjacent_view(xs: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows of ``xs`` as one tensor without a copy when they are contiguous, adjacent views of
    one storage in rank order (e.g. combine inputs that are slices of the dispatch outputs)."""
    parts = [x for x in xs if x.numel()]
    if not parts:
        return None
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for x in parts:
        if (
            not x.is_contiguous()
            or x.dtype != first.dtype
            or x.shape[1:] != first.shape[1:]
            or x.untyped_storage().data_ptr() != storage
            or x.data_ptr() != end
        ):
            return None
        end += x.numel() * x.element_size()
    rows = sum(x.shape[0] for x in xs)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _cat_rows(xs: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows (a view when the rows are already adjacent), also for float8."""
    view = _adjacent_view(xs)
    if view is not None:
        return view
    if xs[0].dtype == torch.float8_e4m3fn:
        return torch.cat([x.view(torch.uint8) for x in xs]).view(torch.float8_e4m3fn)
    return torch.cat(xs)


@dataclass
class _StreamSync:
    """How the comm stream is ordered with the callers: per rank (spawn), or one entry for all."""

    streams: list[Any]  # torch.cuda.Stream of each rank's caller (None on CPU)
    events: list[EventHandle | None]  # previous_event of each rank
    async_finish: list[bool]


def _check_same(per_rank: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        values = [a.get(name, default) for a in per_rank]
        if any(v != values[0] for v in values):
            raise ValueError(f"{name}: expected the same value on every virtual rank, got {values} (by rank)")


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


class EmulatedBuffers(SymmetricBuffers):
    """R symmetric buffers carved out of one zeroed allocation (4 KiB aligned regions)."""

    def __init__(self, num_ranks: int, device: torch.device) -> None:
        self.num_ranks = num_ranks
        self.device = device
        self.max_channels = 0
        self.max_slot_bytes = 0
        self.peer_bases: torch.Tensor | None = None
        self._storage: torch.Tensor | None = None

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        if (
            self._storage is not None
            and num_channels <= self.max_channels
            and slot_bytes <= self.max_slot_bytes
        ):
            return
        _synchronize(self.device)  # nothing may still use the old buffers
        self.max_channels = max(num_channels, self.max_channels)
        self.max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        stride = kl.align_up(kl.total_bytes(self.max_channels, self.max_slot_bytes), 4096)
        self._storage = None
        self._storage = torch.zeros(self.num_ranks * stride, dtype=torch.uint8, device=self.device)
        base = self._storage.data_ptr()
        self.peer_bases = torch.tensor(
            [base + r * stride for r in range(self.num_ranks)], dtype=torch.int64, device=self.device
        )
        _synchronize(self.device)


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
        from commkit.reference import ranks_per_node

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
        self.num_ranks_per_node = ranks_per_node(num_ranks, num_ranks_per_node)
        self.num_nodes = num_ranks // self.num_ranks_per_node
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


def _spawn(group: EmulatedGroup, fn: Callable[[VirtualRank], Any]) -> list[Any]:
    results: list[Any] = [None] * group.num_ranks
    failures: list[BaseException] = []  # in the order they happened: the first is the cause
    lock = threading.Lock()
    group._failure = None

    def body(rank: int) -> None:
        try:
            if group.device.type == "cuda":
                torch.cuda.set_device(group.device)
            results[rank] = fn(VirtualRank(group, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            with lock:
                failures.append(exc)
                if group._failure is None:
                    group._failure = (rank, exc)
            group._barrier.abort()  # the other ranks must not wait for this one forever

    threads = [
        threading.Thread(target=body, args=(r,), name=f"commkit-virtual-rank-{r}")
        for r in range(group.num_ranks)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group._barrier.reset()
    group._failure = None
    if failures:
        raise failures[0]
    return results


def _collective(group: EmulatedGroup, rank: int, op: str, args: dict[str, Any]) -> Any:
    # The caller's stream of this rank: the launch runs in whichever thread arrives last
    args["stream"] = torch.cuda.current_stream(group.device) if group.device.type == "cuda" else None
    group._calls[rank] = (op, args)
    start = time.monotonic()
    try:
        group._barrier.wait(timeout=group.timeout_s)  # the barrier's action runs the launch
    except threading.BrokenBarrierError:
        waited = time.monotonic() - start
        failure = group._failure
        if failure is not None and failure[0] != rank:
            other, exc = failure
            raise CommError(
                f"{op}: virtual rank {rank} stopped waiting after {waited:.3g}s: virtual rank {other} "
                f"failed instead of making the same call ({type(exc).__name__}: {exc})"
            ) from None
        if waited >= group.timeout_s:
            raise CommTimeoutError(
                f"{op}: virtual rank {rank} waited timeout_s={group.timeout_s:g}s for the other virtual "
                "ranks to make the same call"
            ) from None
        raise CommTimeoutError(
            f"{op}: virtual rank {rank} stopped waiting after {waited:.3g}s: another virtual rank timed out "
            f"(timeout_s={group.timeout_s:g}) or the group was aborted before all ranks made the same call"
        ) from None
    result = group._results[rank]
    if isinstance(result, BaseException):
        raise result
    return result


def _execute(group: EmulatedGroup) -> None:
    """Runs one collective call for all virtual ranks (the barrier action, in one thread)."""
    calls = list(group._calls)
    ops = {op for op, _ in calls}
    try:
        if len(ops) != 1:
            raise RuntimeError(f"virtual ranks made different calls: {[op for op, _ in calls]} (by rank)")
        op = ops.pop()
        per_rank = [args for _, args in calls]
        first = per_rank[0]
        sync = _StreamSync(
            [a["stream"] for a in per_rank],
            [a.get("previous_event") for a in per_rank],
            [bool(a.get("async_finish", False)) for a in per_rank],
        )
        _check_same(per_rank, {"num_experts": None})
        if op == "layout":
            results: list[Any] = group.get_dispatch_layout(
                [a["topk_idx"] for a in per_rank], first["num_experts"], _sync=sync
            )
        elif op == "dispatch":
            _check_same(
                per_rank,
                {"num_sms": None, "expert_alignment": 1, "cast_to_fp8": False, "num_worst_tokens": None},
            )
            if len({a["x_scales"] is None for a in per_rank}) != 1:
                raise ValueError(
                    f"x_scales: expected FP8 scales on every virtual rank or on none, got "
                    f"{['scales' if a['x_scales'] is not None else None for a in per_rank]} (by rank)"
                )
            handles = [a["handle"] for a in per_rank]
            if len({h is None for h in handles}) != 1:
                raise ValueError(
                    f"handle: expected a handle on every virtual rank or on none, got "
                    f"{['handle' if h is not None else None for h in handles]} (by rank)"
                )
            results = group.dispatch(
                [a["x"] for a in per_rank],
                [a["topk_idx"] for a in per_rank],
                [a["topk_weights"] for a in per_rank],
                first["num_experts"],
                x_scales=[a["x_scales"] for a in per_rank] if first["x_scales"] is not None else None,
                cast_to_fp8=bool(first.get("cast_to_fp8", False)),
                handles=handles if handles[0] is not None else None,
                expert_alignment=first["expert_alignment"],
                num_sms=first["num_sms"],
                num_worst_tokens=first.get("num_worst_tokens"),
                _sync=sync,
            )
            for out, a in zip(results, per_rank, strict=True):
                if a["buffer_id"] is not None:
                    out.handle.buffer_id = a["buffer_id"]
        else:
            _check_same(per_rank, {"num_sms": None})
            results = group.combine(
                [a["x"] for a in per_rank],
                [a["handle"] for a in per_rank],
                num_sms=first["num_sms"],
                _sync=sync,
            )
        group._results = results
    except BaseException as exc:  # noqa: BLE001 - every rank raises it
        group._results = [exc] * group.num_ranks
