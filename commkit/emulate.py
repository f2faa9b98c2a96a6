"""Virtual ranks: R ranks of one EP group on one GPU, running the very same kernels.

Each rank's symmetric buffer is a region of one device allocation and one launch runs the blocks of
all ranks (grid = R x num_sms; a block's rank is ``blockIdx.x // num_sms``). The ranks wait for each
other inside the kernels, so all R x num_sms blocks must be resident at once: ``EmulatedGroup``
checks the occupancy and raises ``ConfigError`` naming the largest budget that fits.

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

CuPy and a GPU are needed when a group is created, not when this module is imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from commkit.backends import kernels_layout as kl
from commkit.backends.kernels import SymmetricBuffers
from commkit.errors import CommTimeoutError, ConfigError
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

DEFAULT_NUM_SMS = 16


def _keep_for_stream(tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
    """Keeps the caller's tensors allocated until the work queued so far on ``stream`` ends."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)


def _cat_rows(xs: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows, also for float8 (concatenated as bytes)."""
    if xs[0].dtype == torch.float8_e4m3fn:
        return torch.cat([x.view(torch.uint8) for x in xs]).view(torch.float8_e4m3fn)
    return torch.cat(xs)


@dataclass
class EmulatedState:
    """Handle.state of a virtual rank: the packed state of the whole group's call and the rank."""

    shared: object  # commkit.backends.kernels.KernelState
    rank: int


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
        torch.cuda.synchronize(self.device)  # nothing may still use the old buffers
        self.max_channels = max(num_channels, self.max_channels)
        self.max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        stride = kl.align_up(kl.total_bytes(self.max_channels, self.max_slot_bytes), 4096)
        self._storage = None
        self._storage = torch.zeros(self.num_ranks * stride, dtype=torch.uint8, device=self.device)
        base = self._storage.data_ptr()
        self.peer_bases = torch.tensor(
            [base + r * stride for r in range(self.num_ranks)], dtype=torch.int64, device=self.device
        )
        torch.cuda.synchronize(self.device)


class EmulatedGroup:
    """R virtual ranks on one GPU. Every method takes and returns lists indexed by rank."""

    def __init__(
        self,
        num_ranks: int,
        *,
        num_sms: int = DEFAULT_NUM_SMS,
        timeout_s: float = 60.0,
        device: torch.device | str | None = None,
    ) -> None:
        from commkit.backends import kernels_unavailable_reason
        from commkit.backends.kernels import KernelEngine

        reason = kernels_unavailable_reason(None)
        if reason is not None:
            raise ConfigError(f"commkit.emulate needs the kernels: {reason}")
        self.num_ranks = num_ranks
        self.num_sms = num_sms
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        )
        self.buffers = EmulatedBuffers(num_ranks, self.device)
        self.engine = KernelEngine(
            num_ranks, 0, num_ranks, self.buffers, timeout_s=timeout_s, device=self.device
        )
        self.comm_stream = torch.cuda.Stream(self.device)
        self.timeout_s = timeout_s
        # Rendezvous of the per-rank threads of spawn()
        self._calls: list[Any] = [None] * num_ranks
        self._results: list[Any] = [None] * num_ranks
        self._barrier = threading.Barrier(num_ranks, action=lambda: _execute(self))

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

    def _run(self, previous_event: EventHandle | None) -> torch.cuda.Stream:
        caller = torch.cuda.current_stream(self.device)
        if previous_event is not None and previous_event.event is not None:
            self.comm_stream.wait_event(previous_event.event)
        else:
            self.comm_stream.wait_stream(caller)
        return caller

    def _finish(self, caller: torch.cuda.Stream, async_finish: bool, tensors: list) -> EventHandle:
        event = EventHandle.record(self.comm_stream)
        for t in tensors:
            if t is not None:
                t.record_stream(caller)
        if not async_finish:
            caller.wait_stream(self.comm_stream)
        return event

    def get_dispatch_layout(self, topk_idxs: list[torch.Tensor], num_experts: int) -> list[Layout]:
        self._check_lists(topk_idxs=topk_idxs)
        counts = [t.shape[0] for t in topk_idxs]
        caller = self._run(None)
        with torch.cuda.stream(self.comm_stream):
            per_rank, per_expert, in_rank, _, _ = self.engine.layout(
                torch.cat(topk_idxs), counts, num_experts
            )
            in_rank_list = list(torch.split(in_rank, counts))
        self._finish(caller, False, [per_rank, per_expert, in_rank])
        return [
            Layout(per_rank[r].to(torch.int64), per_expert[r].to(torch.int64), in_rank_list[r])
            for r in range(self.num_ranks)
        ]

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
    ) -> list[DispatchOutput]:
        """xs[r]: [T_r, H] bf16 (or float8_e4m3fn with x_scales[r] [T_r, H/128] float32);
        topk_idxs[r]: [T_r, K] int64 in [-1, E); topk_weights[r]: [T_r, K] float32.
        cast_to_fp8: bf16 in, FP8 out (rule of commkit.fp8.cast_to_fp8). handles: the previous
        dispatch's handles for the same routing (skips layout and count exchange)."""
        from commkit.backends.kernels import aligned_counts

        self._check_lists(
            xs=xs, topk_idxs=topk_idxs, topk_weights=topk_weights, x_scales=x_scales, handles=handles
        )
        if handles is not None and len({id(h.state.shared) for h in handles}) != 1:
            raise ValueError("handles: expected the handles of one dispatch call (one per rank)")
        num_sms = num_sms or self.num_sms
        counts = [x.shape[0] for x in xs]
        state = handles[0].state.shared if handles is not None else None
        caller = self._run(previous_event)
        with torch.cuda.stream(self.comm_stream):
            result = self.engine.dispatch(
                _cat_rows(xs),
                torch.cat(x_scales) if x_scales is not None else None,
                torch.cat(topk_idxs),
                torch.cat(topk_weights),
                counts,
                num_experts,
                state=state,
                num_sms=num_sms,
                cast_to_fp8=cast_to_fp8,
                num_worst_tokens=num_worst_tokens,
            )
        if async_finish:  # the comm stream still reads the caller's tensors (torch.cat above)
            _keep_for_stream([*xs, *(x_scales or []), *topk_idxs, *topk_weights], self.comm_stream)
        event = self._finish(
            caller, async_finish, [result.x, result.x_scales, result.topk_idx, result.topk_weights]
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
    ) -> list[CombineOutput]:
        """xs[r]: [N_r, H] bf16 rows in the order rank r received them -> ys[s]: [T_s, H] bf16."""
        self._check_lists(xs=xs, handles=handles)
        if len({id(h.state.shared) for h in handles}) != 1:
            raise ValueError("handles: expected the handles of one dispatch call (one per rank)")
        for r, (x, h) in enumerate(zip(xs, handles, strict=True)):
            if x.shape[0] != h.num_recv_tokens or x.dtype != torch.bfloat16:
                raise ValueError(
                    f"xs[{r}]: expected [{h.num_recv_tokens}, H] bfloat16, got {tuple(x.shape)} {x.dtype}"
                )
        state = handles[0].state.shared
        caller = self._run(previous_event)
        with torch.cuda.stream(self.comm_stream):
            out = self.engine.combine(
                torch.cat(xs), state, handles[0].num_experts, num_sms=num_sms or self.num_sms
            )
        if async_finish:  # the comm stream still reads the caller's tensors (torch.cat above)
            _keep_for_stream(list(xs), self.comm_stream)
        event = self._finish(caller, async_finish, [out])
        return [CombineOutput(y, event) for y in torch.split(out, state.token_counts)]


class VirtualRank:
    """The ``Backend`` protocol for one virtual rank of an ``EmulatedGroup`` (see ``spawn``).

    Every call is collective: it waits until all ranks made the same call, then one launch serves
    them all. Extra keyword arguments of ``dispatch`` (``cast_to_fp8``, ``num_worst_tokens``) are
    taken from rank 0.
    """

    name = "kernels"

    def __init__(self, group: EmulatedGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.num_ranks = group.num_ranks
        self.device_type = group.device.type

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        return self.group._collective(self.rank, "layout", {"topk_idx": topk_idx, "num_experts": num_experts})

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
        return self.group._collective(self.rank, "combine", {"x": x, "handle": handle, "num_sms": num_sms})


def _spawn(group: EmulatedGroup, fn: Callable[[VirtualRank], Any]) -> list[Any]:
    results: list[Any] = [None] * group.num_ranks
    failures: list[BaseException] = []  # in the order they happened: the first is the cause

    def body(rank: int) -> None:
        try:
            if group.device.type == "cuda":
                torch.cuda.set_device(group.device)
            results[rank] = fn(VirtualRank(group, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failures.append(exc)
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
    if failures:
        raise failures[0]
    return results


def _collective(group: EmulatedGroup, rank: int, op: str, args: dict[str, Any]) -> Any:
    group._calls[rank] = (op, args)
    try:
        group._barrier.wait(timeout=group.timeout_s)  # the barrier's action runs the launch
    except threading.BrokenBarrierError:
        raise CommTimeoutError(
            f"{op}: virtual rank {rank} waited {group.timeout_s:g}s for the other virtual ranks to make "
            "the same call (or one of them failed)"
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
            raise RuntimeError(f"virtual ranks made different calls: {[op for op, _ in calls]}")
        op = ops.pop()
        per_rank = [args for _, args in calls]
        first = per_rank[0]
        if op == "layout":
            results: list[Any] = group.get_dispatch_layout(
                [a["topk_idx"] for a in per_rank], first["num_experts"]
            )
        elif op == "dispatch":
            handles = [a["handle"] for a in per_rank]
            extra = {k: first[k] for k in ("cast_to_fp8", "num_worst_tokens") if k in first}
            results = group.dispatch(
                [a["x"] for a in per_rank],
                [a["topk_idx"] for a in per_rank],
                [a["topk_weights"] for a in per_rank],
                first["num_experts"],
                x_scales=[a["x_scales"] for a in per_rank] if first["x_scales"] is not None else None,
                handles=handles if handles[0] is not None else None,
                expert_alignment=first["expert_alignment"],
                num_sms=first["num_sms"],
                **extra,
            )
            for out, a in zip(results, per_rank, strict=True):
                if a["buffer_id"] is not None:
                    out.handle.buffer_id = a["buffer_id"]
        else:
            results = group.combine(
                [a["x"] for a in per_rank], [a["handle"] for a in per_rank], num_sms=first["num_sms"]
            )
        group._results = results
    except BaseException as exc:  # noqa: BLE001 - every rank raises it
        group._results = [exc] * group.num_ranks
