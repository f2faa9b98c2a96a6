"""An expert-sized bf16 GEMM on the compute stream while dispatch + combine run on ``k`` SMs of a
communication stream, for a sweep of ``k`` (CUDA only).

Per ``k``: GEMM TFLOP/s alone and alongside, communication GB/s alone and alongside, and the wall time
of both together against the max (perfect overlap) and the sum (no overlap) of the two alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from commkit.tools.shapes import MoEShape
from commkit.tools.timing import gbps, tflops


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
    from commkit import Buffer
    from commkit.tools.bench import bytes_per_rank, expert_output, make_input_set

    reason = overlap_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    device = torch.device("cuda", torch.cuda.current_device())
    shape = spec.shape
    buf = Buffer(None, backend=spec.backend)
    inputs = make_input_set(shape, "bf16", rank, num_ranks, spec.seed, 0.0, device)
    layout = buf.get_dispatch_layout(inputs.topk_idx[rank], shape.num_experts)
    nbytes = bytes_per_rank(inputs.topk_idx, shape.num_experts, num_ranks, shape.hidden, "bf16")
    comm_bytes = nbytes["dispatch_nvl_bytes"] + nbytes["combine_nvl_bytes"]
    # Expert GEMM: the rows a rank receives times the fused gate+up projection [H, 2I].
    m = max(1, int(nbytes["mean_recv_rows"]))
    a = torch.randn(m, shape.hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(shape.hidden, 2 * shape.moe_intermediate, device=device, dtype=torch.bfloat16)
    gemm_flops = 2.0 * m * shape.hidden * 2 * shape.moe_intermediate * spec.gemm_repeats
    comm_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)

    def gemm() -> None:
        for _ in range(spec.gemm_repeats):
            torch.matmul(a, w)

    def comm(k: int) -> None:
        out = buf.dispatch(
            inputs.x,
            inputs.topk_idx[rank],
            inputs.topk_weights[rank],
            shape.num_experts,
            layout=layout,
            num_sms=k,
        )
        buf.combine(expert_output(out), out.handle, num_sms=k)

    def timed(fn: Any, stream: torch.cuda.Stream) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        dist.barrier()
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def median(fn: Any, stream: torch.cuda.Stream) -> float:
        for _ in range(spec.warmup):
            timed(fn, stream)
        times = sorted(timed(fn, stream) for _ in range(spec.reps))
        return times[len(times) // 2]

    def together(k: int) -> tuple[float, float, float]:
        torch.cuda.synchronize()
        dist.barrier()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record(compute_stream)
        comm_stream.wait_event(ev[0])
        with torch.cuda.stream(comm_stream):
            comm(k)
            ev[1].record(comm_stream)
        gemm()
        ev[2].record(compute_stream)
        compute_stream.wait_event(ev[1])
        ev[3].record(compute_stream)
        ev[3].synchronize()
        return (
            ev[0].elapsed_time(ev[2]) / 1e3,
            ev[0].elapsed_time(ev[1]) / 1e3,
            ev[0].elapsed_time(ev[3]) / 1e3,
        )

    gemm_alone = median(gemm, compute_stream)
    points = []
    for k in spec.candidates:
        comm_alone = median(lambda k=k: comm(k), comm_stream)
        for _ in range(spec.warmup):
            together(k)
        runs = sorted((together(k) for _ in range(spec.reps)), key=lambda r: r[2])
        g, c, wall = runs[len(runs) // 2]
        points.append(overlap_point(k, gemm_alone, g, comm_alone, c, wall, gemm_flops, comm_bytes))
    return {
        "backend": buf.backend,
        "device": torch.cuda.get_device_name(device),
        "gemm": {"m": m, "k": shape.hidden, "n": 2 * shape.moe_intermediate, "repeats": spec.gemm_repeats},
        "comm_bytes": comm_bytes,
        "points": points,
    }


def plot_overlap(result: dict[str, Any], path: Any) -> str | None:
    """Trade-off curve: GEMM TFLOP/s alongside and communication GB/s alongside against ``num_sms``."""
    from commkit.tools.report import MATPLOTLIB_MISSING, load_pyplot

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
