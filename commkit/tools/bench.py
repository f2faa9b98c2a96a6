"""Dispatch/combine bandwidth in the style of nccl-tests, checked on every run.

Bytes (per rank, the mean over ranks; "logical" bytes as in DeepEP's published figures):

- dispatch NVLink bytes: rows this rank receives x row bytes (H x element size, plus the FP8 scales
  ceil(H/128) x 4); dispatch RDMA bytes: rows this rank sends to other nodes, counted once per
  destination node, x row bytes
- combine NVLink bytes: rows this rank sends back (the rows it received) x H x 2 (bf16); combine RDMA
  bytes: rows that come back to this rank from other nodes, once per node, x H x 2

GB/s = the link's bytes / median time: NVLink bytes on one node, RDMA bytes across nodes. Time per
repetition = the slowest rank's, measured after a barrier, with the L2 flushed (CUDA) and the inputs
rotated over ``num_input_sets`` routings and payloads. Every repetition's output is compared with the
expected rows (``#wrong``: rows that differ in any field, plus missing or extra rows).

Payloads encode (source rank, token, column) so that each receiver knows what it must get from the
routing alone (every rank regenerates all ranks' routings from the seed, a few KiB).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from commkit.tools.shapes import MoEShape
from commkit.tools.timing import L2Flusher, TimeStats, gbps, time_collective

FP8_BLOCK = 128
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


# --------------------------------------------------------------------------------------- inputs
def payload_rows(
    src_rank: torch.Tensor, src_token: torch.Tensor, hidden: int, dtype: str, salt: int
) -> torch.Tensor:
    """[N, H] rows that encode (source rank, token, column); exact in bf16 and in FP8 e4m3.

    bf16: integers in [-127, 127] / 32; fp8: integers in [-7, 7] / 4 (all representable exactly).
    """
    col = torch.arange(hidden, device=src_rank.device, dtype=torch.int64)
    code = (src_rank[:, None] * 7919 + src_token[:, None] * 104729 + col[None, :] * 31 + salt * 613) % 255
    if dtype == "fp8":
        return ((code % 15 - 7).to(torch.float32) / 4).to(torch.float8_e4m3fn)
    return ((code - 127).to(torch.float32) / 32).to(torch.bfloat16)


def payload_scales(src_rank: torch.Tensor, src_token: torch.Tensor, hidden: int, salt: int) -> torch.Tensor:
    """[N, ceil(H/128)] float32 FP8 scales, also encoding (source rank, token, block)."""
    blocks = torch.arange(math.ceil(hidden / FP8_BLOCK), device=src_rank.device, dtype=torch.int64)
    code = (src_rank[:, None] * 131 + src_token[:, None] * 17 + blocks[None, :] * 7 + salt) % 97
    return 1.0 + code.to(torch.float32) / 128


@dataclass
class InputSet:
    """All ranks' routings (small) and this rank's inputs for one rotation slot."""

    topk_idx: list[torch.Tensor]  # R x [T, K] int64
    topk_weights: list[torch.Tensor]  # R x [T, K] float32
    x: torch.Tensor  # [T, H] this rank's rows
    x_scales: torch.Tensor | None
    salt: int


def make_input_set(
    shape: MoEShape, dtype: str, rank: int, num_ranks: int, salt: int, skew: float, device: torch.device
) -> InputSet:
    from commkit.routing import synthetic_topk

    groups = shape.num_expert_groups if shape.num_experts % shape.num_expert_groups == 0 else 1
    idxs, weights = [], []
    for src in range(num_ranks):
        idx, w = synthetic_topk(
            shape.num_tokens,
            shape.num_experts,
            shape.top_k,
            skew=skew,
            num_groups=groups,
            max_groups=shape.topk_groups if groups > 1 else None,
            seed=salt * 100_003 + src,
        )
        idxs.append(idx.to(device))
        weights.append(w.to(device))
    ranks = torch.full((shape.num_tokens,), rank, dtype=torch.int64, device=device)
    tokens = torch.arange(shape.num_tokens, dtype=torch.int64, device=device)
    x = payload_rows(ranks, tokens, shape.hidden, dtype, salt)
    scales = payload_scales(ranks, tokens, shape.hidden, salt) if dtype == "fp8" else None
    return InputSet(idxs, weights, x, scales, salt)


# --------------------------------------------------------------------------------------- expectation
def token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: token t has an expert on rank r."""
    per_rank = num_experts // num_ranks
    dst = torch.where(topk_idx >= 0, topk_idx // per_rank, torch.full_like(topk_idx, -1))
    ranks = torch.arange(num_ranks, device=topk_idx.device)
    return (dst[:, :, None] == ranks[None, None, :]).any(dim=1)


@dataclass
class Expected:
    """What ``rank`` must receive, per the semantics in ``commkit.reference``."""

    src_rank: torch.Tensor  # [N] int64
    src_token: torch.Tensor  # [N] int64
    topk_idx: torch.Tensor  # [N, K] local expert or -1
    topk_weights: torch.Tensor  # [N, K]


def expected_dispatch(inputs: InputSet, num_experts: int, rank: int) -> Expected:
    """Rows ordered by source rank, then source token; local expert indices, -1 elsewhere."""
    num_ranks = len(inputs.topk_idx)
    per_rank = num_experts // num_ranks
    src_ranks, src_tokens, idxs, weights = [], [], [], []
    for src, (idx, w) in enumerate(zip(inputs.topk_idx, inputs.topk_weights, strict=True)):
        tokens = token_in_rank(idx, num_experts, num_ranks)[:, rank].nonzero().flatten()
        sel = idx[tokens]
        local = sel - rank * per_rank
        mine = (sel >= 0) & (local >= 0) & (local < per_rank)
        idxs.append(torch.where(mine, local, torch.full_like(local, -1)))
        weights.append(w[tokens])
        src_tokens.append(tokens)
        src_ranks.append(torch.full_like(tokens, src))
    return Expected(torch.cat(src_ranks), torch.cat(src_tokens), torch.cat(idxs), torch.cat(weights))


def count_wrong_dispatch(out: Any, exp: Expected, hidden: int, dtype: str, salt: int) -> int:
    """Rows of ``out`` that differ from the expectation in x, scales, topk_idx or weights, plus the
    difference in row count (missing or extra rows count as wrong)."""
    n_exp, n_got = exp.src_rank.numel(), int(out.x.shape[0])
    n = min(n_exp, n_got)
    want_x = payload_rows(exp.src_rank[:n], exp.src_token[:n], hidden, dtype, salt)
    got_x = out.x[:n]
    bad = (
        (got_x.view(torch.uint8) != want_x.view(torch.uint8)).any(dim=1)
        if got_x.dtype == want_x.dtype
        else (torch.ones(n, dtype=torch.bool, device=got_x.device))
    )
    if dtype == "fp8":
        want_s = payload_scales(exp.src_rank[:n], exp.src_token[:n], hidden, salt)
        if out.x_scales is None:
            bad |= True
        else:
            bad |= (out.x_scales[:n] != want_s).any(dim=1)
    bad |= (out.topk_idx[:n] != exp.topk_idx[:n]).any(dim=1)
    bad |= (out.topk_weights[:n] != exp.topk_weights[:n]).any(dim=1)
    return int(bad.sum()) + abs(n_exp - n_got)


def expert_output(out: Any) -> torch.Tensor:
    """The stand-in expert: the received rows as bf16 (FP8 values are exact in bf16, scales unused)."""
    return out.x.to(torch.bfloat16)


def expected_combine(inputs: InputSet, rank: int, num_experts: int, hidden: int, dtype: str) -> torch.Tensor:
    """[T, H] bf16: each of this rank's tokens summed once per rank it went to (float32, from +0.0)."""
    num_ranks = len(inputs.topk_idx)
    in_rank = token_in_rank(inputs.topk_idx[rank], num_experts, num_ranks)  # [T, R]
    row = inputs.x.to(torch.bfloat16).to(torch.float32)
    total = torch.zeros_like(row)
    for r in range(num_ranks):  # NOTE: ascending rank order, as the reference sums
        total = total + torch.where(in_rank[:, r : r + 1], row, torch.zeros_like(row))
    return total.to(torch.bfloat16)


def count_wrong_combine(y: torch.Tensor, want: torch.Tensor) -> int:
    if y.shape != want.shape:
        return max(int(want.shape[0]), int(y.shape[0]))
    return int((y.view(torch.int16) != want.view(torch.int16)).any(dim=1).sum())


# --------------------------------------------------------------------------------------- bytes
def row_bytes(hidden: int, dtype: str) -> int:
    if dtype == "fp8":
        return hidden + math.ceil(hidden / FP8_BLOCK) * 4
    return hidden * 2


def bytes_per_rank(
    topk_idx: Sequence[torch.Tensor], num_experts: int, num_ranks_per_node: int, hidden: int, dtype: str
) -> dict[str, float]:
    """Mean over ranks of the logical bytes defined in the module docstring."""
    num_ranks = len(topk_idx)
    recv_rows = [0] * num_ranks
    rdma_rows = [0] * num_ranks  # per sender: (token, remote node) pairs
    node_of = torch.arange(num_ranks) // num_ranks_per_node
    num_nodes = int(node_of.max()) + 1
    for src, idx in enumerate(topk_idx):
        in_rank = token_in_rank(idx.cpu(), num_experts, num_ranks)  # [T, R]
        for r, n in enumerate(in_rank.sum(dim=0).tolist()):
            recv_rows[r] += int(n)
        in_node = torch.stack([in_rank[:, node_of == n].any(dim=1) for n in range(num_nodes)], dim=1)
        in_node[:, int(node_of[src])] = False
        rdma_rows[src] = int(in_node.sum())
    mean_recv = sum(recv_rows) / num_ranks
    mean_rdma = sum(rdma_rows) / num_ranks
    return {
        "dispatch_nvl_bytes": mean_recv * row_bytes(hidden, dtype),
        "dispatch_rdma_bytes": mean_rdma * row_bytes(hidden, dtype),
        "combine_nvl_bytes": mean_recv * hidden * 2,
        "combine_rdma_bytes": mean_rdma * hidden * 2,
        "mean_recv_rows": mean_recv,
    }


# --------------------------------------------------------------------------------------- rank worker
@dataclass
class Measured:
    times_s: list[float]
    wrong: int


def _collectives(group: Any, device: torch.device) -> tuple[Callable[[], None], Callable[[float], float]]:
    def barrier() -> None:
        dist.barrier(group=group)

    def max_across(value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t.item())

    return barrier, max_across


def measure_backend(
    buf: Any,
    sets: list[InputSet],
    shape: MoEShape,
    dtype: str,
    num_sms: int | None,
    spec: BenchSpec,
    device: torch.device,
) -> tuple[Measured, Measured]:
    """Dispatch and combine times over rotated input sets; every repetition checked."""
    rank, group = dist.get_rank(), buf.group
    barrier, max_across = _collectives(group, device)
    cuda = device.type == "cuda"
    flush = L2Flusher(device) if cuda else None
    layouts = [buf.get_dispatch_layout(s.topk_idx[rank], shape.num_experts) for s in sets]
    expects = [expected_dispatch(s, shape.num_experts, rank) for s in sets]
    combine_wants = [expected_combine(s, rank, shape.num_experts, shape.hidden, dtype) for s in sets]

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

    def check_dispatch(i: int, out: Any) -> None:
        nonlocal wrong
        s = sets[i % len(sets)]
        wrong += count_wrong_dispatch(out, expects[i % len(sets)], shape.hidden, dtype, s.salt)

    d_times = time_collective(
        dispatch, reps=spec.reps, warmup=spec.warmup, barrier=barrier, max_across_ranks=max_across,
        before=before, after=check_dispatch, cuda=cuda,
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
        wrong += count_wrong_combine(y.x, combine_wants[i % len(sets)])

    c_times = time_collective(
        combine, reps=spec.reps, warmup=spec.warmup, barrier=barrier, max_across_ranks=max_across,
        before=before, after=check_combine, cuda=cuda,
    )  # fmt: skip
    # NOTE: every rank counts its own wrong rows; the row reports the sum over ranks.
    totals = torch.tensor([d_wrong, wrong], dtype=torch.int64, device=device)
    dist.all_reduce(totals, group=group)
    return Measured(d_times, int(totals[0])), Measured(c_times, int(totals[1]))


def _roofline_times(nbytes: float, num_sms: int, spec: BenchSpec, device: torch.device) -> list[float]:
    from commkit.tools.roofline import CopyRoofline

    copy = CopyRoofline(int(nbytes), device)
    flush = L2Flusher(device)
    barrier, max_across = _collectives(None, device)
    return time_collective(
        lambda _: copy(num_sms), reps=spec.reps, warmup=spec.warmup, barrier=barrier,
        max_across_ranks=max_across, before=lambda _: flush(), cuda=True,
    )  # fmt: skip


def bench_rank(rank: int, num_ranks: int, spec: BenchSpec) -> list[dict[str, Any]]:
    """Run on every rank (inside an initialised process group); returns the rows (same on every rank)."""
    from commkit import Buffer
    from commkit.tools.roofline import roofline_unavailable_reason

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    num_ranks_per_node = spec.num_ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", num_ranks))
    if num_ranks % num_ranks_per_node:
        raise ValueError(f"ranks per node {num_ranks_per_node} must divide ranks {num_ranks}")
    buf = Buffer(None, backend=spec.backend)
    baseline = (
        Buffer(None, backend=TORCH_BASELINE) if spec.baseline and buf.backend != TORCH_BASELINE else None
    )
    roofline_reason = roofline_unavailable_reason() if spec.roofline else "disabled (--no-roofline)"
    if roofline_reason is None and device.type != "cuda":
        roofline_reason = "the process group is not on CUDA devices"

    configs = [(s, d, k) for s in spec.shapes for d in spec.dtypes for k in spec.num_sms]
    rows: list[dict[str, Any]] = []
    progress = _progress(rank == 0 and spec.progress, len(configs))
    for shape, dtype, num_sms in configs:
        if shape.num_experts % num_ranks:
            raise ValueError(f"{shape.name}: {shape.num_experts} experts do not split over {num_ranks} ranks")
        sets = [
            make_input_set(shape, dtype, rank, num_ranks, spec.seed * 1000 + i, spec.skew, device)
            for i in range(spec.num_input_sets)
        ]
        nbytes = bytes_per_rank(sets[0].topk_idx, shape.num_experts, num_ranks_per_node, shape.hidden, dtype)
        effective_sms = num_sms if num_sms is not None else buf.config.num_sms
        d, c = measure_backend(buf, sets, shape, dtype, num_sms, spec, device)
        base = measure_backend(baseline, sets, shape, dtype, None, spec, device) if baseline else None
        num_nodes = num_ranks // num_ranks_per_node
        for op, meas, base_meas in (("dispatch", d, base and base[0]), ("combine", c, base and base[1])):
            link = "rdma" if num_nodes > 1 else "nvl"
            link_bytes = nbytes[f"{op}_{link}_bytes"]
            stats = TimeStats.of(meas.times_s)
            row: dict[str, Any] = {
                "shape": shape.name, "op": op, "backend": buf.backend, "ranks": num_ranks, "nodes": num_nodes,
                "tokens": shape.num_tokens, "hidden": shape.hidden, "experts": shape.num_experts,
                "topk": shape.top_k, "dtype": dtype if op == "dispatch" else "bf16",
                "num_sms": effective_sms if buf.backend != TORCH_BASELINE else None,
                "num_sms_source": "argument" if num_sms is not None else buf.config.source,
                "num_sms_requested": effective_sms,
                "nvl_bytes": nbytes[f"{op}_nvl_bytes"], "rdma_bytes": nbytes[f"{op}_rdma_bytes"],
                "gbps_link": link, **{f"time_{k}": v for k, v in stats.to_dict().items()},
                "gbps": gbps(link_bytes, stats.median_s), "wrong": meas.wrong,
            }  # fmt: skip
            if buf.backend == TORCH_BASELINE:
                row["vs_torch"], row["vs_torch_note"] = None, "this row is the torch backend"
            elif base_meas is None:
                row["vs_torch"], row["vs_torch_note"] = None, "baseline disabled (--no-baseline)"
            else:
                row["vs_torch"] = TimeStats.of(base_meas.times_s).median_s / stats.median_s
                row["torch_wrong"] = base_meas.wrong
            if roofline_reason is None and buf.backend != TORCH_BASELINE:
                copy = TimeStats.of(_roofline_times(link_bytes, effective_sms, spec, device))
                row["roofline_gbps"] = gbps(link_bytes, copy.median_s)
                row["vs_roofline"] = row["gbps"] / row["roofline_gbps"]
            else:
                row["vs_roofline"] = None
                row["vs_roofline_note"] = roofline_reason or "the torch backend does not run on a set of SMs"
            rows.append(row)
        progress(f"{shape.name} {dtype} num_sms={effective_sms}")
    progress(None)
    return rows


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
    from commkit.launch import spawn_gloo

    return spawn_gloo(fn, num_ranks, *args, timeout_s=timeout_s)[0]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Footer: averages over rows and the worst row (lowest fraction of its roofline if measured,
    else lowest GB/s)."""
    if not rows:
        return {}

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    has_roof = all(r.get("vs_roofline") is not None for r in rows)
    worst = min(rows, key=lambda r: r["vs_roofline"] if has_roof else r["gbps"])
    return {
        "avg_gbps": mean("gbps"),
        "avg_vs_torch": mean("vs_torch"),
        "avg_vs_roofline": mean("vs_roofline"),
        "total_wrong": sum(r["wrong"] for r in rows),
        "worst": worst,
        "worst_by": "vs_roofline" if has_roof else "gbps",
    }


def spec_to_dict(spec: BenchSpec) -> dict[str, Any]:
    out = dataclasses.asdict(spec)
    out["shapes"] = [dataclasses.asdict(s) for s in spec.shapes]
    return out
