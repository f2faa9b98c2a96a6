"""Sweep the SM budget for the current group and shapes; pick a budget for one of two objectives.

- ``fastest``: the shortest dispatch + combine time; among budgets within ``tolerance`` of it the
  smallest (extra SMs that buy less than the run-to-run noise are better left to compute).
- ``hide``: the smallest budget whose dispatch + combine time fits in ``compute_ms`` (the compute it
  must hide under, given or read from an ``overlap`` JSON); when none fits, the fastest, said so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from commkit.backends.internode import DEFAULT_FORWARDER_WARPS
from commkit.emulate import DEFAULT_NUM_SMS
from commkit.profiles import ClusterSignature, Profile
from commkit.tools.bench import BenchSpec, bench_ranks
from commkit.tools.ranks import DistRanks, run_virtual
from commkit.tools.rows import BenchRow, split_skipped

if TYPE_CHECKING:
    from commkit.tools.ranks import RankContext

# NOTE: differences below 3% are within the spread seen between repetitions; do not pay SMs for them.
DEFAULT_TOLERANCE = 0.03


@dataclass
class TuneSpec:
    bench: BenchSpec
    candidates: list[int]
    objective: str = "fastest"  # or "hide"
    compute_ms: float | None = None
    role_candidates: list[int] = field(default_factory=lambda: [2, 4, 6])  # forwarder warps (several nodes)
    tolerance: float = DEFAULT_TOLERANCE
    chunk_sizes: list[int] = field(default_factory=list)


def tune_rank(rank: int, num_ranks: int, spec: TuneSpec) -> dict[str, Any]:
    """On every rank of the process group: the sweep rows, this cluster's signature and the backend name."""

    ranks = DistRanks.current(
        timeout_s=spec.bench.comm_timeout_s, num_ranks_per_node=spec.bench.num_ranks_per_node
    )
    return tune_ranks(ranks, spec)


def tune_virtual(
    num_ranks: int, spec: TuneSpec, *, timeout_s: float | None = None, host_timeout_s: float | None = None,
    device: Any = None,
) -> dict:  # fmt: skip
    """``tune_ranks`` on ``num_ranks`` virtual ranks of one GPU; rank 0's result. The signature has
    ``num_ranks = N`` and the virtual nodes' ranks per node (``spec.bench.num_ranks_per_node``, None:
    N), as ``Buffer.from_backend`` looks profiles up.
    ``timeout_s``: the communication timeout (default ``spec.bench.comm_timeout_s``)."""

    return run_virtual(
        num_ranks, lambda ctx: tune_ranks(ctx, spec), num_sms=min(spec.candidates, default=DEFAULT_NUM_SMS),
        timeout_s=spec.bench.comm_timeout_s if timeout_s is None else timeout_s,
        host_timeout_s=host_timeout_s, device=device, num_ranks_per_node=spec.bench.num_ranks_per_node,
    )[0]  # fmt: skip


def tune_ranks(ctx: RankContext, spec: TuneSpec) -> dict[str, Any]:
    """On every rank of ``ctx``: the sweep rows, the budgets skipped (``ConfigError``: e.g. their blocks
    do not all fit on the GPU; with the reason), the signature of this group and the backend name.
    Over several nodes with the kernels, also ``role_rows``: the role splits (``ROLE_KNOBS``, the
    same number of forwarder warps in dispatch and combine per run) at the budget the objective picks
    (every rank picks the same: the rows are the same everywhere)."""
    bench = BenchSpec(
        **{**spec.bench.__dict__, "num_sms": list(spec.candidates), "baseline": False, "roofline": False}
    )
    buf = ctx.make_buffer(spec.bench.backend)
    roles = buf.backend == "kernels" and buf.num_ranks_per_node < buf.num_ranks and bool(buf.knobs)
    if roles:  # the budget sweep at the default split, whatever an earlier profile says
        bench.knobs = {name: DEFAULT_FORWARDER_WARPS for name in ROLE_KNOBS.values()}
    backend = buf.backend
    buf.close()  # it only told which backend and nodes run; bench_ranks makes its own
    rows, skipped = split_skipped(bench_ranks(ctx, bench))
    result = {
        "rows": rows,
        "skipped": skipped,
        "signature": ctx.signature().to_dict(),
        "backend": backend,
    }
    if roles and rows and spec.role_candidates:
        choice = choose(comm_time_by_budget(rows), spec.objective, spec.compute_ms, spec.tolerance)
        role_rows = []
        for warps in spec.role_candidates:
            knobs = {name: warps for name in ROLE_KNOBS.values()}
            role_spec = BenchSpec(**{**bench.__dict__, "num_sms": [choice.num_sms], "knobs": knobs})
            role_rows += split_skipped(bench_ranks(ctx, role_spec))[0]
        result["role_rows"] = role_rows
    return result


# op -> the knob of its forwarder warps (commkit.backends.internode.KNOBS)
ROLE_KNOBS = {
    "dispatch": "internode_dispatch_forwarder_warps",
    "combine": "internode_combine_forwarder_warps",
}


def choose_roles(role_rows: list[BenchRow]) -> tuple[dict[str, int], str]:
    """Per op, the forwarder warps with the shortest median time summed over shapes (and dtypes).
    A split with a wrong row, or not measured on every (shape, dtype) that another was, is out."""
    knobs, reasons = {}, []
    for op, name in ROLE_KNOBS.items():
        rows = [r for r in role_rows if r.op == op]
        cases = {(r.shape, r.dtype) for r in rows}
        times: dict[int, float] = {}
        for warps in sorted({r.knobs[name] for r in rows}):
            mine = [r for r in rows if r.knobs[name] == warps]
            if all(r.wrong == 0 for r in mine) and {(r.shape, r.dtype) for r in mine} == cases:
                times[warps] = sum(r.time.median_s for r in mine)
        if times:
            best = min(times, key=lambda w: times[w])
            knobs[name] = best
            swept = ", ".join(f"{w}: {t * 1e3:.3f} ms" for w, t in sorted(times.items()))
            reasons.append(f"{op} forwarder warps {best} ({swept})")
    return knobs, "; ".join(reasons)


@dataclass
class Choice:
    num_sms: int
    reason: str
    comm_s: dict[int, float]  # budget -> summed median dispatch + combine seconds over shapes


def comm_time_by_budget(rows: list[BenchRow]) -> dict[int, float]:
    """Sum over shapes and ops of the median time per SM budget."""
    out: dict[int, float] = {}
    for r in rows:
        k = r.num_sms_requested
        out[k] = out.get(k, 0.0) + r.time.median_s
    return out


def choose(comm_s: dict[int, float], objective: str, compute_ms: float | None, tolerance: float) -> Choice:
    """Apply the objective to ``{num_sms: seconds}``."""
    if not comm_s:
        raise ValueError("no measurements to choose from")
    best_k = min(comm_s, key=lambda k: comm_s[k])
    best = comm_s[best_k]
    near = sorted(k for k, t in comm_s.items() if t <= best * (1 + tolerance))
    fastest = near[0]
    fastest_reason = (
        f"{fastest} SMs: {comm_s[fastest] * 1e3:.3f} ms dispatch+combine, within {tolerance:.0%} of the "
        f"fastest ({best_k} SMs, {best * 1e3:.3f} ms)"
    )
    if objective == "fastest":
        return Choice(fastest, fastest_reason, comm_s)
    if objective != "hide":
        raise ValueError(f"objective must be 'fastest' or 'hide', got {objective!r}")
    if compute_ms is None or compute_ms <= 0:
        raise ValueError("objective 'hide' needs a positive compute time (--compute-ms or --overlap-json)")
    hiding = sorted(k for k, t in comm_s.items() if t * 1e3 <= compute_ms)
    if hiding:
        k = hiding[0]
        return Choice(
            k,
            f"smallest budget whose dispatch+combine ({comm_s[k] * 1e3:.3f} ms, measured alone) fits under "
            f"{compute_ms:.3f} ms of compute",
            comm_s,
        )
    return Choice(
        fastest,
        f"no budget hides under {compute_ms:.3f} ms of compute; fastest instead: {fastest_reason}",
        comm_s,
    )


def per_sm_gbps(rows: list[BenchRow], backend: str) -> dict[str, float | None]:
    """GB/s per SM per op: the best over budgets of GB/s / num_sms (the linear, latency-free regime).

    None for a backend that does not run on a given number of SMs (the torch backend).
    """
    out: dict[str, float | None] = {}
    for op in ("dispatch", "combine"):
        vals = [r.gbps / r.num_sms_requested for r in rows if r.op == op]
        out[op] = None if backend == "torch" or not vals else max(vals)
    return out


def compute_ms_from_overlap(data: dict[str, Any]) -> float:
    """The GEMM time alone from an ``overlap`` JSON (median over its sweep)."""
    times = sorted(p["gemm_alone_s"] for p in data["points"])
    if not times:
        raise ValueError("overlap JSON has no points")
    return times[len(times) // 2] * 1e3


def make_profile(result: dict[str, Any], spec: TuneSpec, choice: Choice) -> Profile:
    backend = result["backend"]
    objective = "fastest" if spec.objective == "fastest" else f"hide:{spec.compute_ms:g}ms"
    role_knobs, role_reason = choose_roles(result.get("role_rows", []))
    reason = choice.reason
    if backend == "torch":
        reason += "; NOTE: the torch backend does not use num_sms, so the sweep shows run-to-run noise only"
    return Profile(
        signature=ClusterSignature.from_dict(result["signature"]),
        backend=backend,
        num_sms=choice.num_sms,
        objective=objective,
        reason=reason + (f"; role split: {role_reason}" if role_reason else ""),
        knobs=role_knobs,
        per_sm_gbps=per_sm_gbps(result["rows"], backend),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        extra={
            "chunk_sizes_note": "not swept: Buffer exposes no chunk-size parameter yet",
            "shapes": sorted({r.shape for r in result["rows"]}),
            "comm_ms_by_num_sms": {str(k): v * 1e3 for k, v in sorted(choice.comm_s.items())},
            "sweep": [r.to_dict() for r in result["rows"]],
            "skipped": [r.to_dict() for r in result.get("skipped", [])],
            "role_sweep": [r.to_dict() for r in result.get("role_rows", [])],
        },
    )
