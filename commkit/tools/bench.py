"""Dispatch/combine bandwidth in the style of nccl-tests, checked on every run: the sweep.

``bench_ranks`` runs on every rank: for each (shape, dtype, SM budget) it makes the input sets
(``commkit.tools.payload``: payloads that say what must arrive), times dispatch and combine over them,
every repetition checked (``commkit.tools.measure``), and the torch baseline and copy roofline beside
them, and writes one ``BenchRow`` per op (``commkit.tools.rows``: what each field counts), or a
``SkippedRow`` for a budget that cannot run here. ``bench_rank`` (a process group), ``bench_virtual``
(virtual ranks of one GPU through ``commkit.emulate``) and ``launch`` (torchrun or gloo processes) are
the ways in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

import commkit.launch
from commkit.emulate import DEFAULT_NUM_SMS
from commkit.errors import ConfigError
from commkit.nodes import Nodes
from commkit.tools.measure import (
    KERNEL_TIME_NOTE,
    Measured,
    measure_backend,
    measure_torch_ops,
    roofline_times,
)
from commkit.tools.payload import make_input_set
from commkit.tools.ranks import DistRanks, run_virtual
from commkit.tools.roofline import roofline_unavailable_reason
from commkit.tools.rows import BenchRow, SkippedRow, link_fields
from commkit.tools.shapes import MoEShape
from commkit.tools.timing import TimeStats, gbps
from commkit.tools.traffic import count_traffic

if TYPE_CHECKING:
    from commkit.tools.ranks import RankContext

TORCH_BASELINE = "torch"


@dataclass
class BenchSpec:
    """What to run. ``num_sms`` None: the Buffer's configuration (``buf.config``)."""

    shapes: list[MoEShape]
    dtypes: list[str] = field(default_factory=lambda: ["bf16"])
    num_sms: list[int | None] = field(default_factory=lambda: [None])
    backend: str = "auto"
    baseline: bool = True
    roofline: bool = True
    num_ranks_per_node: int | None = None
    reps: int = 20
    warmup: int = 3
    num_input_sets: int = 3
    skew: float = 0.0
    seed: int = 0
    progress: bool = True
    virtual: int | None = None  # N: run on N virtual ranks of one GPU (commkit.emulate)
    comm_timeout_s: float = 60.0  # the Buffers' timeout_s (device spin budget, peer waits)
    knobs: dict[str, int] = field(default_factory=dict)  # Buffer.set_knobs (the internode role split)


def bench_rank(rank: int, num_ranks: int, spec: BenchSpec) -> list[BenchRow | SkippedRow]:
    """Run on every rank (inside an initialised process group); returns the rows (same on every rank)."""

    ctx = DistRanks.current(timeout_s=spec.comm_timeout_s, num_ranks_per_node=spec.num_ranks_per_node)
    assert (ctx.rank, ctx.num_ranks) == (rank, num_ranks), ((ctx.rank, ctx.num_ranks), (rank, num_ranks))
    return bench_ranks(ctx, spec)


def with_ranks_per_node(ctx: RankContext, num_ranks_per_node: int | None) -> RankContext:
    """``ctx`` whose Buffers run on ``num_ranks_per_node`` ranks per node (the spec's; None: as made).

    A ``DistRanks`` made without one (e.g. by a caller that did not pass the spec's) takes it; one made
    with another raises, as its Buffers and the byte accounting would disagree. Virtual ranks get their
    nodes from their group (``run_virtual(num_ranks_per_node=...)``) and are returned as they are."""

    if num_ranks_per_node is None or not isinstance(ctx, DistRanks):
        return ctx
    if ctx.num_ranks_per_node is None:
        return dataclasses.replace(ctx, num_ranks_per_node=num_ranks_per_node)
    if ctx.num_ranks_per_node != num_ranks_per_node:
        raise ValueError(
            f"num_ranks_per_node: the spec has {num_ranks_per_node} ranks per node, the DistRanks "
            f"{ctx.num_ranks_per_node}; make the DistRanks with the spec's "
            "(DistRanks.current(num_ranks_per_node=...))"
        )
    return ctx


def bench_virtual(
    num_ranks: int, spec: BenchSpec, *, timeout_s: float | None = None, host_timeout_s: float | None = None,
    device: Any = None,
) -> list:  # fmt: skip
    """``bench_ranks`` on ``num_ranks`` virtual ranks of one GPU; rank 0's rows. ``timeout_s``: the
    communication timeout (default ``spec.comm_timeout_s``); ``host_timeout_s``: see ``run_virtual``."""

    # NOTE: the group's default budget must fit (residency); a Buffer passes its own on every call.
    budgets = [k for k in spec.num_sms if k is not None]
    return run_virtual(
        num_ranks, lambda ctx: bench_ranks(ctx, spec), num_sms=min(budgets, default=DEFAULT_NUM_SMS),
        timeout_s=spec.comm_timeout_s if timeout_s is None else timeout_s, host_timeout_s=host_timeout_s,
        device=device, num_ranks_per_node=spec.num_ranks_per_node,
    )[0]  # fmt: skip


VIRTUAL_TORCH_NOTE = (
    "virtual ranks: vs torch = torch ops on the same GPU doing the same work for all ranks (index_select "
    "per destination, index_add_ back; commkit.tools.torch_ops), not the torch backend (no process group)"
)
VIRTUAL_ROOFLINE_NOTE = (
    "virtual ranks: roofline = one copy kernel on ranks x num_sms blocks moving ranks x the per-rank bytes "
    "(all virtual ranks run in one launch on one GPU); roofline_gbps is per rank like gbps"
)


def bench_ranks(ctx: RankContext, spec: BenchSpec) -> list[BenchRow | SkippedRow]:
    """Run on every rank of ``ctx``; returns the rows (same on every rank)."""

    rank, num_ranks, device = ctx.rank, ctx.num_ranks, ctx.device
    ctx = with_ranks_per_node(ctx, spec.num_ranks_per_node)
    buf = ctx.make_buffer(spec.backend)
    if spec.knobs:
        buf.set_knobs(**spec.knobs)
    # NOTE: read once, after every rank has applied its knobs and before any can leave this sweep:
    # virtual ranks share one engine, and a rank that is done may set the next sweep's knobs while a
    # slower one still writes its rows (the rows then recorded the next sweep's split)
    ctx.barrier()
    knobs_in_use = buf.knobs
    # NOTE: the bytes are counted on the nodes the Buffers run on (a Buffer resolves None to
    # $LOCAL_WORLD_SIZE or all ranks, and checks that it divides them; virtual ranks: their group's).
    num_ranks_per_node = buf.num_ranks_per_node
    baseline = (
        ctx.make_buffer(TORCH_BASELINE)
        if spec.baseline and buf.backend != TORCH_BASELINE and not ctx.virtual
        else None
    )
    roofline_reason = roofline_unavailable_reason() if spec.roofline else "disabled (--no-roofline)"
    if roofline_reason is None and device.type != "cuda":
        roofline_reason = (
            "the virtual ranks are not on a CUDA device"
            if ctx.virtual
            else "the process group is not on CUDA devices"
        )

    budgets = list(spec.num_sms)
    # NOTE: the torch backend has no SM budget: every budget would run the same code (duplicate rows)
    num_sms_ignored = buf.backend == TORCH_BASELINE and len(set(budgets)) > 1
    if buf.backend == TORCH_BASELINE:
        budgets = budgets[:1]
    link = real_link(ctx, buf, device)
    configs = [(s, d, k) for s in spec.shapes for d in spec.dtypes for k in budgets]
    rows: list[BenchRow | SkippedRow] = []
    progress = _progress(rank == 0 and spec.progress, len(configs))
    for shape, dtype, num_sms in configs:
        if shape.num_experts % num_ranks:
            raise ValueError(f"{shape.name}: {shape.num_experts} experts do not split over {num_ranks} ranks")
        sets = [
            make_input_set(shape, dtype, rank, num_ranks, spec.seed * 1000 + i, spec.skew, device)
            for i in range(spec.num_input_sets)
        ]
        # NOTE: repetition i times set i % len(sets), so the timing weighs the sets it reaches equally
        # (up to one repetition); the bytes are their mean (see link_fields).
        traffics = [
            count_traffic(s.topk_idx, shape.num_experts, num_ranks_per_node, shape.hidden, dtype)
            for s in sets[: max(1, spec.reps)]
        ]
        effective_sms = num_sms if num_sms is not None else buf.config.num_sms
        try:
            d, c = measure_backend(ctx, buf, sets, shape, dtype, num_sms, spec)
        except ConfigError as exc:
            # NOTE: the residency check is deterministic, so every rank (every virtual rank: the one
            # launch raises on all of them) skips the same budget; the sweep goes on.
            rows.append(skipped_row(shape, dtype, num_ranks, ctx.virtual, buf, num_sms, effective_sms, exc))
            progress(f"{shape.name} {dtype} num_sms={effective_sms} skipped")
            continue
        base: tuple[Measured, Measured] | None = None
        if baseline is not None:
            base = measure_backend(ctx, baseline, sets, shape, dtype, None, spec)
        elif ctx.virtual and spec.baseline:
            base = ctx.once(lambda: measure_torch_ops(sets, shape, dtype, spec, device))  # noqa: B023
        num_nodes = Nodes(num_ranks, num_ranks_per_node).num_nodes
        case = {
            "shape": shape.name, "backend": buf.backend, "ranks": num_ranks, "nodes": num_nodes,
            "virtual": ctx.virtual, "tokens": shape.num_tokens, "hidden": shape.hidden,
            "experts": shape.num_experts, "topk": shape.top_k,
            "num_sms": effective_sms if buf.backend != TORCH_BASELINE else None,
            "num_sms_source": "argument" if num_sms is not None else buf.config.source,
            "num_sms_requested": effective_sms, "knobs": knobs_in_use,
            "num_sms_ignored": list(spec.num_sms) if num_sms_ignored else None,
        }  # fmt: skip
        for op, meas, base_meas in (("dispatch", d, base and base[0]), ("combine", c, base and base[1])):
            stats = TimeStats.of(meas.times_s)
            bytes_counted, link_bytes, byte_fields = link_fields(traffics, op, stats.median_s)
            bus = (
                byte_fields["rdma_bytes"]
                if num_nodes > 1
                else sum(t.figures(op)["nvl_bytes_flat"] for t in traffics) / len(traffics)
            )
            rate = gbps(link_bytes, stats.median_s)
            roofline = (
                # Virtual ranks: all ranks' bytes on all ranks' SMs, in one copy (see VIRTUAL_ROOFLINE_NOTE).
                _roofline_fields(ctx, rate, link_bytes, effective_sms, spec, device)
                if roofline_reason is None and buf.backend != TORCH_BASELINE
                else {
                    "vs_roofline": None,
                    "vs_roofline_note": roofline_reason or "the torch backend does not run on a set of SMs",
                }
            )
            rows.append(
                BenchRow(
                    **case, op=op, dtype=dtype if op == "dispatch" else "bf16", **byte_fields,
                    bytes_counted=bytes_counted, link=link, time=stats, gbps=rate, wrong=meas.wrong,
                    bus_bytes=bus, algbw_gbps=gbps(byte_fields["nvl_bytes"], stats.median_s),
                    busbw_gbps=gbps(bus, stats.median_s), **_time_fields(meas),
                    **_torch_fields(buf.backend, base_meas, stats, ctx.virtual), **roofline,
                )
            )  # fmt: skip
        progress(f"{shape.name} {dtype} num_sms={effective_sms}")
    progress(None)
    # NOTE: collective (every rank gets here); on an error the buffers are left to the process's end
    buf.close()
    if baseline is not None:
        baseline.close()
    return rows


def _time_fields(meas: Measured) -> dict[str, Any]:
    """What the row's ``time_*`` are: kernel times with the whole call's beside them, or wall times."""
    if meas.wall_times_s is not None:
        return {
            "time_wall": TimeStats.of(meas.wall_times_s),
            "time_source": "kernel",
            "time_note": KERNEL_TIME_NOTE,
        }
    return {"time_source": "wall", "time_note": meas.time_note or None}


def _torch_fields(backend: str, base: Measured | None, stats: TimeStats, virtual: bool) -> dict[str, Any]:
    """The comparison with the torch baseline (the torch backend; torch ops on virtual ranks)."""
    if backend == TORCH_BASELINE:
        return {"vs_torch": None, "vs_torch_note": "this row is the torch backend"}
    if base is None:
        return {"vs_torch": None, "vs_torch_note": "baseline disabled (--no-baseline)"}
    base_s = TimeStats.of(base.times_s).median_s
    fields: dict[str, Any] = {"vs_torch": base_s / stats.median_s, "torch_wrong": base.wrong}
    if virtual:
        fields.update(
            vs_torch_baseline="torch-ops", torch_time_median_s=base_s, vs_torch_note=VIRTUAL_TORCH_NOTE
        )
    return fields


def _roofline_fields(
    ctx: RankContext, rate: float, link_bytes: float, num_sms: int, spec: BenchSpec, device: torch.device
) -> dict[str, Any]:
    """A copy of the row's bytes on its SMs (virtual ranks: all ranks' bytes on all ranks' SMs)."""
    scale = ctx.num_ranks if ctx.virtual else 1
    copy = TimeStats.of(roofline_times(ctx, link_bytes * scale, num_sms * scale, spec, device))
    roof = gbps(link_bytes, copy.median_s)
    fields: dict[str, Any] = {"roofline_gbps": roof, "vs_roofline": rate / roof}
    if ctx.virtual:
        fields.update(
            roofline_sms=num_sms * scale,
            roofline_bytes=link_bytes * scale,
            vs_roofline_note=VIRTUAL_ROOFLINE_NOTE,
        )
    return fields


def real_link(ctx: RankContext, buf: Any, device: torch.device) -> str:
    """What carries the bytes (the ``link`` of a row): gloo on CPU processes, HBM for virtual ranks,
    NCCL under the torch backend on GPUs, else NVLink on one node and the internode transport across."""
    if ctx.virtual:
        return "hbm"
    if device.type != "cuda":
        return "gloo"
    if buf.backend == TORCH_BASELINE:
        return "nccl"
    if buf.num_ranks_per_node < buf.num_ranks:
        return "nvlink-domain" if buf.internode_transport == "nvlink-domain" else "rdma"
    return "nvlink"


def skipped_row(
    shape: MoEShape, dtype: str, num_ranks: int, virtual: bool, buf: Any, num_sms: int | None,
    effective_sms: int, exc: Exception,
) -> SkippedRow:  # fmt: skip
    """The row of a budget that cannot run here (``ConfigError``, e.g. the blocks do not all fit)."""
    return SkippedRow(
        shape=shape.name, op="dispatch+combine", backend=buf.backend, ranks=num_ranks, virtual=virtual,
        tokens=shape.num_tokens, hidden=shape.hidden, experts=shape.num_experts, topk=shape.top_k,
        dtype=dtype, num_sms=effective_sms,
        num_sms_source="argument" if num_sms is not None else buf.config.source,
        num_sms_requested=effective_sms, skipped=f"{type(exc).__name__}: {exc}",
    )  # fmt: skip


def _progress(enabled: bool, total: int) -> Callable[[str | None], None]:
    """A rich progress bar advanced once per configuration; ``None`` closes it."""
    if not enabled:
        return lambda _: None
    from rich.progress import Progress

    bar = Progress(transient=False)
    task = bar.add_task("bench", total=total)
    bar.start()

    def step(desc: str | None) -> None:
        if desc is None:
            bar.stop()
        else:
            bar.update(task, advance=1, description=desc)

    return step


# --------------------------------------------------------------------------------------- launching
def launch(fn: Callable[..., Any], num_ranks: int, *args: Any, timeout_s: float = 600.0) -> Any:
    """Run ``fn(rank, num_ranks, *args)`` on every rank and return rank 0's result.

    Under torchrun (``RANK``/``WORLD_SIZE`` set): this process is one rank; the group is NCCL when
    CUDA is there, gloo otherwise. Else ``num_ranks`` CPU processes over gloo (``commkit.launch``).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return fn(dist.get_rank(), dist.get_world_size(), *args)

    return commkit.launch.spawn_gloo(fn, num_ranks, *args, timeout_s=timeout_s)[0]


def spec_to_dict(spec: BenchSpec) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    out["shapes"] = [dataclasses.asdict(s) for s in spec.shapes]
    return out
