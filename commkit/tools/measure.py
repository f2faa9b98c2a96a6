"""Timing one configuration: dispatch and combine over rotated input sets, every repetition checked.

Time per repetition = the slowest rank's, measured after a barrier, with the L2 flushed (CUDA) and the
inputs rotated over the input sets. On virtual ranks (one call serves all ranks) the time is the device
time of the kernel launches where the emulator records it (``EmulatedGroup.kernel_events``), the wall
time of the whole call beside it. Also here: the torch-ops baseline of virtual ranks and the copy
roofline's times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from commkit.tools import torch_ops
from commkit.tools.payload import (
    InputSet,
    count_wrong_combine,
    count_wrong_dispatch,
    expected_combine,
    expected_dispatch,
    expert_output,
    payload_rows,
    payload_scales,
    token_in_rank,
)
from commkit.tools.roofline import CopyRoofline
from commkit.tools.shapes import MoEShape
from commkit.tools.timing import L2Flusher, time_collective

if TYPE_CHECKING:
    from commkit.tools.ranks import RankContext


class Repetitions(Protocol):
    """What a measurement reads of the sweep's ``BenchSpec``: how often it times each call."""

    reps: int
    warmup: int


@dataclass
class Measured:
    """One op's repetition times and its wrong rows (summed over ranks)."""

    times_s: list[float]  # what time_* reports: kernel times where measured (virtual ranks), else wall
    wrong: int
    wall_times_s: list[float] | None = None  # the whole call, when times_s are kernel times
    time_note: str | None = None  # why times_s are wall times on virtual ranks


KERNEL_TIME_NOTE = (
    "virtual ranks: time_* = device time of the kernel launches (EmulatedGroup.kernel_events, events on "
    "the communication stream around the kernels; excludes concatenating all ranks' inputs before the "
    "launch); time_wall_* = the whole call"
)


class _KernelTimes:
    """Collects ``ctx.kernel_time_s(op)`` once per timed repetition (None: wall times are reported)."""

    def __init__(self, ctx: RankContext, op: str) -> None:
        self.ctx, self.op = ctx, op
        self.times: list[float] | None = [] if ctx.virtual else None
        self.note: str | None = None

    def record(self) -> None:
        if self.times is None:
            return
        t, why = self.ctx.kernel_time_s(self.op)
        if t is None:
            self.times, self.note = None, why
        else:
            self.times.append(t)

    def measured(self, wall: list[float], wrong: int) -> Measured:
        if self.times is not None and len(self.times) == len(wall):
            return Measured(self.times, wrong, wall, None)
        return Measured(wall, wrong, None, self.note)


def measure_backend(
    ctx: RankContext,
    buf: Any,
    sets: list[InputSet],
    shape: MoEShape,
    dtype: str,
    num_sms: int | None,
    spec: Repetitions,
) -> tuple[Measured, Measured]:
    """Dispatch and combine times over rotated input sets; every repetition checked."""
    rank, device = ctx.rank, ctx.device
    cuda = device.type == "cuda"
    # NOTE: virtual ranks share one GPU (and its L2): one rank flushes, the barrier after it orders the rest.
    flush = L2Flusher(device) if cuda and (not ctx.virtual or rank == 0) else None
    layouts = [buf.get_dispatch_layout(s.topk_idx[rank], shape.num_experts) for s in sets]
    expects = [expected_dispatch(s, shape.num_experts, rank) for s in sets]
    # NOTE: the buffer's nodes (a Buffer over several nodes combines in two levels), not the byte accounting's
    per_node = getattr(buf, "num_ranks_per_node", None)
    combine_wants = [
        expected_combine(s, rank, shape.num_experts, shape.hidden, dtype, per_node) for s in sets
    ]

    def x_of(s: InputSet) -> Any:
        return s.x if s.x_scales is None else (s.x, s.x_scales)

    def dispatch(i: int) -> Any:
        s = sets[i % len(sets)]
        return buf.dispatch(
            x_of(s), s.topk_idx[rank], s.topk_weights[rank], shape.num_experts,
            layout=layouts[i % len(sets)], num_sms=num_sms,
        )  # fmt: skip

    def before(_: int) -> None:
        if flush is not None:
            flush()

    wrong = 0
    d_kernel, c_kernel = _KernelTimes(ctx, "dispatch"), _KernelTimes(ctx, "combine")

    def check_dispatch(i: int, out: Any) -> None:
        nonlocal wrong
        d_kernel.record()  # NOTE: before the next collective call can replace the events
        s = sets[i % len(sets)]
        wrong += count_wrong_dispatch(out, expects[i % len(sets)], shape.hidden, dtype, s.salt)

    d_times = time_collective(
        dispatch, reps=spec.reps, warmup=spec.warmup, barrier=ctx.barrier,
        max_across_ranks=ctx.collective_time, before=before, after=check_dispatch, cuda=cuda,
    )  # fmt: skip
    d_wrong = wrong

    # Combine: the handles and expert outputs come from untimed dispatches of each set.
    outs = [dispatch(i) for i in range(len(sets))]
    experts = [expert_output(o) for o in outs]
    wrong = 0

    def combine(i: int) -> Any:
        j = i % len(sets)
        return buf.combine(experts[j], outs[j].handle, num_sms=num_sms)

    def check_combine(i: int, y: Any) -> None:
        nonlocal wrong
        c_kernel.record()
        wrong += count_wrong_combine(y.x, combine_wants[i % len(sets)])

    c_times = time_collective(
        combine, reps=spec.reps, warmup=spec.warmup, barrier=ctx.barrier,
        max_across_ranks=ctx.collective_time, before=before, after=check_combine, cuda=cuda,
    )  # fmt: skip
    # NOTE: every rank counts its own wrong rows; the row reports the sum over ranks.
    return (
        d_kernel.measured(d_times, ctx.sum_across(d_wrong)),
        c_kernel.measured(c_times, ctx.sum_across(wrong)),
    )


def _no_barrier() -> None:
    pass


def _identity(value: float) -> float:
    return value


def measure_torch_ops(
    sets: list[InputSet], shape: MoEShape, dtype: str, spec: Repetitions, device: torch.device
) -> tuple[Measured, Measured]:
    """The torch-ops baseline of virtual ranks (``commkit.tools.torch_ops``), on one thread: dispatch
    and combine of all ranks' tokens with torch ops on the same device, checked like the kernels."""

    cuda = device.type == "cuda"
    flush = L2Flusher(device) if cuda else None
    num_ranks, num_tokens = len(sets[0].topk_idx), shape.num_tokens
    src_rank = torch.arange(num_ranks, device=device).repeat_interleave(num_tokens)
    src_token = torch.arange(num_tokens, device=device).repeat(num_ranks)
    prepared = []
    for s in sets:
        topk_idx, topk_weights = torch.cat(s.topk_idx), torch.cat(s.topk_weights)
        x = payload_rows(src_rank, src_token, shape.hidden, dtype, s.salt)
        scales = payload_scales(src_rank, src_token, shape.hidden, s.salt) if dtype == "fp8" else None
        dst_rows = torch_ops.destination_rows(token_in_rank(topk_idx, shape.num_experts, num_ranks))
        expects = [expected_dispatch(s, shape.num_experts, d) for d in range(num_ranks)]
        # Every rank's expected combine, from that rank's rows (``expected_combine`` reads ``x`` as its own).
        wants = [
            expected_combine(
                dataclasses.replace(s, x=x[r * num_tokens : (r + 1) * num_tokens], x_scales=None),
                r, shape.num_experts, shape.hidden, dtype,
            )
            for r in range(num_ranks)
        ]  # fmt: skip
        prepared.append((s, topk_idx, topk_weights, x, scales, dst_rows, expects, torch.cat(wants)))

    def before(_: int) -> None:
        if flush is not None:
            flush()

    def dispatch(i: int) -> Any:
        s, topk_idx, topk_weights, x, scales, dst_rows, _, _ = prepared[i % len(prepared)]
        return torch_ops.dispatch_all(x, scales, topk_idx, topk_weights, dst_rows, shape.num_experts)

    wrong = 0

    def check_dispatch(i: int, outs: Any) -> None:
        nonlocal wrong
        s, expects = prepared[i % len(prepared)][0], prepared[i % len(prepared)][6]
        wrong += sum(
            count_wrong_dispatch(o, e, shape.hidden, dtype, s.salt)
            for o, e in zip(outs, expects, strict=True)
        )

    d_times = time_collective(
        dispatch, reps=spec.reps, warmup=spec.warmup, barrier=_no_barrier, max_across_ranks=_identity,
        before=before, after=check_dispatch, cuda=cuda,
    )  # fmt: skip
    d_wrong, wrong = wrong, 0
    experts = [[expert_output(o) for o in dispatch(i)] for i in range(len(prepared))]

    def combine(i: int) -> Any:
        j = i % len(prepared)
        return torch_ops.combine_rows(experts[j], prepared[j][5], num_ranks * num_tokens)

    def check_combine(i: int, y: Any) -> None:
        nonlocal wrong
        wrong += count_wrong_combine(y, prepared[i % len(prepared)][7])

    c_times = time_collective(
        combine, reps=spec.reps, warmup=spec.warmup, barrier=_no_barrier, max_across_ranks=_identity,
        before=before, after=check_combine, cuda=cuda,
    )  # fmt: skip
    return Measured(d_times, d_wrong), Measured(c_times, wrong)


def roofline_times(
    ctx: RankContext, nbytes: float, num_sms: int, spec: Repetitions, device: torch.device
) -> list[float]:
    """Copy of ``nbytes`` on ``num_sms`` blocks: on every real rank at once (its own GPU), or for
    virtual ranks on rank 0 alone (the caller passes all ranks' bytes and SMs; one GPU)."""

    def run() -> list[float]:
        copy = CopyRoofline(int(nbytes), device)
        flush = L2Flusher(device)
        return time_collective(
            lambda _: copy(num_sms), reps=spec.reps, warmup=spec.warmup,
            barrier=_no_barrier if ctx.virtual else ctx.barrier,
            max_across_ranks=_identity if ctx.virtual else ctx.max_across,
            before=lambda _: flush(), cuda=True,
        )  # fmt: skip

    return ctx.once(run) if ctx.virtual else run()
