"""An expert-sized bf16 GEMM on the compute stream while dispatch + combine run on ``k`` SMs of a
communication stream, for a sweep of ``k`` (CUDA only).

Per ``k``: GEMM TFLOP/s alone and alongside, communication GB/s alone and alongside, and the wall time
of both together against the max (perfect overlap) and the sum (no overlap) of the two alone. The
GEMMs are queued before the communication, which is a cached dispatch (handle of an untimed warm-up
dispatch: no host wait for the counts) + combine; everything is timed with CUDA events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from commkit.emulate import DEFAULT_NUM_SMS
from commkit.errors import ConfigError
from commkit.tools.payload import expert_output, make_input_set
from commkit.tools.ranks import DistRanks, run_virtual
from commkit.tools.report import MATPLOTLIB_MISSING, load_pyplot
from commkit.tools.rows import bytes_per_rank
from commkit.tools.shapes import MoEShape
from commkit.tools.timing import gbps, tflops

if TYPE_CHECKING:
    from commkit.tools.ranks import RankContext


def overlap_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "overlap needs a CUDA GPU: torch.cuda.is_available() is False"
    return None


@dataclass
class OverlapSpec:
    shape: MoEShape
    candidates: list[int]
    backend: str = "auto"
    gemm_repeats: int = 4  # GEMMs per measurement, so that compute lasts about as long as communication
    reps: int = 10
    warmup: int = 2
    seed: int = 0
    comm_timeout_s: float = 60.0  # the Buffers' timeout_s (device spin budget, peer waits)


def overlap_point(
    k: int, gemm_alone_s: float, gemm_together_s: float, comm_alone_s: float, comm_together_s: float,
    wall_together_s: float, gemm_flops: float, comm_bytes: float,
) -> dict[str, float]:  # fmt: skip
    """The figures of one budget. ``overlap_efficiency`` = (sum - wall) / (sum - max): 1 is perfect
    overlap, 0 is none."""
    max_alone, sum_alone = max(gemm_alone_s, comm_alone_s), gemm_alone_s + comm_alone_s
    hidden = sum_alone - max_alone
    return {
        "num_sms": k,
        "gemm_alone_s": gemm_alone_s,
        "gemm_together_s": gemm_together_s,
        "comm_alone_s": comm_alone_s,
        "comm_together_s": comm_together_s,
        "wall_together_s": wall_together_s,
        "max_alone_s": max_alone,
        "sum_alone_s": sum_alone,
        "gemm_tflops_alone": tflops(gemm_flops, gemm_alone_s),
        "gemm_tflops_together": tflops(gemm_flops, gemm_together_s),
        "comm_gbps_alone": gbps(comm_bytes, comm_alone_s),
        "comm_gbps_together": gbps(comm_bytes, comm_together_s),
        "overlap_efficiency": (sum_alone - wall_together_s) / hidden if hidden > 0 else 1.0,
    }


def overlap_rank(rank: int, num_ranks: int, spec: OverlapSpec) -> dict[str, Any]:
    """On every rank of an NCCL group (one GPU per rank): the sweep; rank 0's numbers are returned."""

    return overlap_ranks(DistRanks.current(timeout_s=spec.comm_timeout_s), spec)


def overlap_virtual(
    num_ranks: int, spec: OverlapSpec, *, timeout_s: float | None = None, host_timeout_s: float | None = None
) -> dict[str, Any]:
    """``overlap_ranks`` on ``num_ranks`` virtual ranks of one GPU; rank 0's result. ``timeout_s``: the
    communication timeout (default ``spec.comm_timeout_s``)."""

    reason = overlap_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    return run_virtual(
        num_ranks, lambda ctx: overlap_ranks(ctx, spec),
        num_sms=min(spec.candidates, default=DEFAULT_NUM_SMS),
        timeout_s=spec.comm_timeout_s if timeout_s is None else timeout_s, host_timeout_s=host_timeout_s,
    )[0]  # fmt: skip


COMM_TIME_NOTE = {
    "kernel": (
        "comm time = device time from the dispatch kernels' start to the combine kernels' end "
        "(EmulatedGroup.kernel_events; the one launch serving all virtual ranks)"
    ),
    "stream": "comm time = events on the communication stream around dispatch + combine",
}


def overlap_ranks(ctx: RankContext, spec: OverlapSpec) -> dict[str, Any]:
    """On every rank of ``ctx``: the sweep; rank 0's numbers are returned.

    Per budget k, an untimed dispatch gives the handle; the timed communication is a cached dispatch
    with that handle (no count exchange, so no host wait for a read-back) and a combine. Together: the
    GEMMs are queued on the compute stream first, then dispatch + combine on the communication stream,
    both from one start event; the times come from events (GEMM end, communication end, both done).
    A budget that cannot run here (``ConfigError``, e.g. its blocks do not all fit) is skipped with the
    reason (``skipped``).

    Real ranks: every rank runs its own GEMM on its own GPU alongside its communication. Virtual ranks
    (one GPU): rank 0 runs one GEMM over the rows all virtual ranks receive (the compute of all of
    them, as the communication of all of them runs in one launch on ranks x k SMs) on the compute
    stream, while every virtual rank's dispatch/combine runs on one shared communication stream; the
    communication time is then the kernels' device time where ``EmulatedGroup.kernel_events`` exists.
    """

    reason = overlap_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    rank, num_ranks, device = ctx.rank, ctx.num_ranks, ctx.device
    if device.type != "cuda":
        raise RuntimeError(f"overlap needs CUDA devices, the ranks are on {device}")
    shape = spec.shape
    buf = ctx.make_buffer(spec.backend)
    inputs = make_input_set(shape, "bf16", rank, num_ranks, spec.seed, 0.0, device)
    layout = buf.get_dispatch_layout(inputs.topk_idx[rank], shape.num_experts)
    nbytes = bytes_per_rank(inputs.topk_idx, shape.num_experts, num_ranks, shape.hidden, "bf16")
    comm_bytes = nbytes["dispatch_nvl_bytes"] + nbytes["combine_nvl_bytes"]
    # Expert GEMM: the rows a rank receives times the fused gate+up projection [H, 2I]; on virtual ranks
    # the rows all of them receive (one GEMM on the one GPU).
    m = max(1, int(nbytes["mean_recv_rows"] * (num_ranks if ctx.virtual else 1)))
    runs_gemm = not ctx.virtual or rank == 0
    a = torch.randn(m, shape.hidden, device=device, dtype=torch.bfloat16) if runs_gemm else None
    w = (
        torch.randn(shape.hidden, 2 * shape.moe_intermediate, device=device, dtype=torch.bfloat16)
        if runs_gemm
        else None
    )
    gemm_flops = 2.0 * m * shape.hidden * 2 * shape.moe_intermediate * spec.gemm_repeats
    # NOTE: virtual ranks share one communication stream; the current stream is per thread, so every
    # rank's thread enters it, and the launch (made by whichever thread arrives last) follows it.
    comm_stream = ctx.once(lambda: torch.cuda.Stream(device)) if ctx.virtual else torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)
    handles: dict[int, Any] = {}
    sources: set[str] = set()

    def event() -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True)

    def gemm() -> None:
        assert a is not None and w is not None, "only the ranks that run the GEMM time it"
        for _ in range(spec.gemm_repeats):
            torch.matmul(a, w)

    def warm_up(k: int) -> None:
        """Untimed full dispatch (layout, count exchange) at budget k: its handle serves the timed ones."""
        with torch.cuda.stream(comm_stream):
            out = buf.dispatch(
                inputs.x, inputs.topk_idx[rank], inputs.topk_weights[rank], shape.num_experts,
                layout=layout, num_sms=k,
            )  # fmt: skip
            buf.combine(expert_output(out), out.handle, num_sms=k)
        torch.cuda.synchronize()
        handles[k] = out.handle

    def comm(k: int) -> None:
        """Cached dispatch (the handle: no count read-back, no host wait) + combine, on the current stream."""
        out = buf.dispatch(
            inputs.x, inputs.topk_idx[rank], inputs.topk_weights[rank], shape.num_experts,
            handle=handles[k], num_sms=k,
        )  # fmt: skip
        buf.combine(expert_output(out), out.handle, num_sms=k)

    def comm_time(begin: torch.cuda.Event, end: torch.cuda.Event) -> float:
        """The communication's time: the kernels' (virtual ranks, where the events exist), else the
        stream's events. Call after ``end`` completed and before the next collective call."""
        kernel_events = getattr(getattr(ctx, "group", None), "kernel_events", None) if ctx.virtual else None
        if kernel_events:
            d, c = kernel_events.get("dispatch"), kernel_events.get("combine")
            if d is not None and c is not None and d[0] is not None and c[1] is not None:
                c[1].synchronize()
                sources.add("kernel")
                return float(d[0].elapsed_time(c[1])) / 1e3
        sources.add("stream")
        return float(begin.elapsed_time(end)) / 1e3

    def comm_alone(k: int) -> float:
        torch.cuda.synchronize()
        ctx.barrier()
        begin, end = event(), event()
        with torch.cuda.stream(comm_stream):
            begin.record(comm_stream)
            comm(k)
            end.record(comm_stream)
        end.synchronize()
        local = comm_time(begin, end)
        # Real ranks: this rank's own time (rank 0's is reported); virtual: the one launch (RankContext).
        return ctx.collective_time(local) if ctx.virtual else local

    def gemm_alone() -> float:
        begin, end = event(), event()
        torch.cuda.synchronize()
        begin.record(compute_stream)
        gemm()
        end.record(compute_stream)
        end.synchronize()
        return float(begin.elapsed_time(end)) / 1e3

    def together(k: int) -> tuple[float, float, float]:
        torch.cuda.synchronize()
        ctx.barrier()
        start, gemm_end, comm_begin, comm_end, both_done = (event() for _ in range(5))
        if runs_gemm:
            start.record(compute_stream)
            comm_stream.wait_event(start)
            gemm()  # queued first: it does not wait for anything the communication does on the host
            gemm_end.record(compute_stream)
        with torch.cuda.stream(comm_stream):
            comm_begin.record(comm_stream)
            comm(k)
            comm_end.record(comm_stream)
        if not runs_gemm:  # a virtual rank other than 0: its part of the launch is done
            return (0.0, 0.0, 0.0)
        compute_stream.wait_event(comm_end)
        both_done.record(compute_stream)
        both_done.synchronize()
        return (
            float(start.elapsed_time(gemm_end)) / 1e3,
            comm_time(comm_begin, comm_end),
            float(start.elapsed_time(both_done)) / 1e3,
        )

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    if runs_gemm:
        for _ in range(spec.warmup):
            gemm_alone()
        g_alone = median([gemm_alone() for _ in range(spec.reps)])
    else:
        g_alone = 0.0
    ctx.barrier()
    points, skipped = [], []
    for k in spec.candidates:
        try:
            warm_up(k)
        except ConfigError as exc:  # the same on every rank (every virtual rank: the one launch raised)
            skipped.append({"num_sms": k, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        for _ in range(spec.warmup):
            comm_alone(k)
        c_alone = median([comm_alone(k) for _ in range(spec.reps)])
        for _ in range(spec.warmup):
            together(k)
        runs = sorted((together(k) for _ in range(spec.reps)), key=lambda r: r[2])
        if runs_gemm:
            g, c, wall = runs[len(runs) // 2]
            points.append(overlap_point(k, g_alone, g, c_alone, c, wall, gemm_flops, comm_bytes))
    comm_source = "kernel" if sources == {"kernel"} else "stream"
    result = {
        "backend": buf.backend,
        "device": torch.cuda.get_device_name(device),
        "gemm": {"m": m, "k": shape.hidden, "n": 2 * shape.moe_intermediate, "repeats": spec.gemm_repeats},
        "comm_bytes": comm_bytes,
        "comm_time_source": comm_source,
        "comm_time_note": COMM_TIME_NOTE[comm_source],
        "points": points,
        "skipped": skipped,
    }
    if ctx.virtual:
        result["virtual"], result["ranks"] = True, num_ranks
        result["note"] = (
            f"{num_ranks} virtual ranks on one GPU: communication on {num_ranks} x num_sms SMs (one launch), "
            "one GEMM over all ranks' received rows; comm_bytes and GB/s are per rank"
        )
        if comm_source != "kernel":
            result["comm_time_note"] += (
                " (EmulatedGroup.kernel_events missing or empty: includes concatenating the ranks' inputs)"
            )
    return result


def plot_overlap(result: dict[str, Any], path: Any) -> str | None:
    """Trade-off curve: GEMM TFLOP/s alongside and communication GB/s alongside against ``num_sms``."""

    plt = load_pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    pts = result["points"]
    ks = [p["num_sms"] for p in pts]
    fig, ax1 = plt.subplots(figsize=(7, 4.5))
    ax1.plot(ks, [p["gemm_tflops_together"] for p in pts], "o-", color="C0", label="GEMM TFLOP/s alongside")
    ax1.axhline(pts[0]["gemm_tflops_alone"], color="C0", ls=":", label="GEMM TFLOP/s alone")
    ax1.set_xlabel("communication SMs (num_sms)")
    ax1.set_ylabel("TFLOP/s", color="C0")
    ax2 = ax1.twinx()
    ax2.plot(ks, [p["comm_gbps_together"] for p in pts], "s-", color="C1", label="comm GB/s alongside")
    ax2.plot(ks, [p["comm_gbps_alone"] for p in pts], "s:", color="C1", label="comm GB/s alone")
    ax2.set_ylabel("GB/s", color="C1")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax1.legend(lines, labels, fontsize="small", loc="lower right")
    ax1.set_title(f"commkit overlap on {result.get('device', '?')} ({result.get('backend', '?')} backend)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
