"""Dispatch/combine bandwidth in the style of nccl-tests, checked on every run.

Bytes (per rank: the mean over ranks, and over the input sets the timing rotates over, each set weighted
equally; "logical" bytes as in DeepEP's published figures), all counted by
``commkit.tools.traffic.count_traffic`` from each input set's routing (its docstring has the counting
rules), on the nodes the Buffers run on (``num_ranks_per_node``: ``--ranks-per-node``, else
``$LOCAL_WORLD_SIZE`` (at most all ranks), else one node; virtual ranks: ``--ranks-per-node`` makes
virtual nodes that run the internode kernels, else one node):

- dispatch NVLink bytes (``nvl_bytes``): rows this rank receives x row bytes (H x element size, plus the
  FP8 scales ceil(H/128) x 4); dispatch RDMA bytes (``rdma_bytes``): rows this rank sends to other
  nodes, counted once per destination node (the hierarchical path), x row bytes
- combine NVLink bytes: rows this rank sends back (the rows it received) x H x 2 (bf16); combine RDMA
  bytes: partials that come back to this rank from other nodes, one per (token, remote node), x H x 2

Rows of a run over several nodes (``nodes`` > 1) also carry, for the same routing: ``rdma_bytes_flat``,
the network bytes of a flat all-to-all (one row per (token, remote rank)); ``rdma_saved`` =
``rdma_bytes_flat / rdma_bytes`` (the ratio of the means; None when no token leaves its node); and
``rdma_bytes_incl_own_node`` with ``gbps_incl_own_node``: the count behind DeepEP's published internode
RDMA figures ((token, node) pairs with the own node included), to compare with peers' numbers. Rows of
one node have none of them.

GB/s (``gbps``) = the counted bytes / median time: NVLink bytes on one node, RDMA bytes across nodes
(``bytes_counted``: "nvl" or "rdma"). As nccl-tests: ``algbw_gbps`` = the logical (NVLink) bytes / median
time on any number of nodes; ``busbw_gbps`` = ``bus_bytes`` / median time, the bytes per rank that cross
the link: rows from or to the other ranks on one node (``nvl_bytes_flat`` of the traffic counts: the
rank's own rows stay), the RDMA bytes of the hierarchical path over several nodes. ``link`` names what
carries them: ``gloo`` (CPU processes), ``hbm`` (virtual ranks on one GPU), ``nvlink`` (GPUs of one
node), ``rdma`` or ``nvlink-domain`` (the kernels over several nodes), ``nccl`` (the torch backend on
GPUs). Time per
repetition = the slowest rank's, measured after a barrier, with the L2 flushed (CUDA) and the inputs
rotated over ``num_input_sets`` routings and payloads. Every repetition's output is compared with the
expected rows (``#wrong``: rows that differ in any field, plus missing or extra rows).

Payloads encode (source rank, token, column) so that each receiver knows what it must get from the
routing alone (every rank regenerates all ranks' routings from the seed, a few KiB).

Virtual ranks (``bench_virtual``, ``--virtual N``: N ranks on one GPU through ``commkit.emulate``; rows
have ``"virtual": true``): the bytes and GB/s are per rank as above, with all ranks on one node (HBM is
the link); the time per repetition is the device time of the kernel launches of the one call that serves
all ranks (``EmulatedGroup.kernel_events``: events on the communication stream around the kernels, so the
concatenation of all ranks' inputs before the launch is not counted; ``time_wall_*`` keeps the whole
call, ``time_source`` says which one ``time_*`` is: "wall" where the events are missing); ``vs_torch``
compares with torch ops doing all ranks' work on the same GPU (``commkit.tools.torch_ops``), as the torch
backend needs a process group; the copy roofline moves all ranks' bytes on all ranks' SMs
(N x num_sms blocks, as one launch runs N x num_sms blocks), expressed per rank.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from commkit.errors import ConfigError
from commkit.tools.shapes import MoEShape
from commkit.tools.timing import L2Flusher, TimeStats, gbps, time_collective
from commkit.tools.traffic import Traffic, count_traffic

if TYPE_CHECKING:
    from commkit.tools.ranks import RankContext

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
    virtual: int | None = None  # N: run on N virtual ranks of one GPU (commkit.emulate)
    comm_timeout_s: float = 60.0  # the Buffers' timeout_s (device spin budget, peer waits)
    knobs: dict[str, int] = field(default_factory=dict)  # Buffer.set_knobs (the internode role split)


# --------------------------------------------------------------------------------------- inputs
def payload_rows(
    src_rank: torch.Tensor, src_token: torch.Tensor, hidden: int, dtype: str, salt: int
) -> torch.Tensor:
    """[N, H] rows that encode (source rank, token, column); exact in bf16 and in FP8 e4m3.

    bf16: integers in [-127, 127] / 32; fp8: integers in [-7, 7] / 4 (all representable exactly).
    code = (src_rank * 7919 + src_token * 104729 + col * 31 + salt * 613) mod 255, computed as the sum
    of a per-row and a per-column residue (each < 255) so that the [N, H] temporaries are int16 (at
    DeepSeek-V3 size every checking thread builds them for ~20k rows x 7168 columns).
    """
    col = torch.arange(hidden, device=src_rank.device, dtype=torch.int64)
    row_code = ((src_rank * 7919 + src_token * 104729 + salt * 613) % 255).to(torch.int16)  # [N]
    col_code = ((col * 31) % 255).to(torch.int16)  # [H]
    code = (row_code[:, None] + col_code[None, :]) % 255  # [N, H] int16, values < 255
    if dtype == "fp8":
        # NOTE: integers / 4 are exact in bf16, then in FP8 e4m3 (|v| <= 1.75)
        return ((code % 15 - 7).to(torch.bfloat16) / 4).to(torch.float8_e4m3fn)
    return (code - 127).to(torch.bfloat16) / 32


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


CHECK_ROWS = 4096  # rows compared at once: bounds the [rows, H] temporaries of the checking threads


def count_wrong_dispatch(out: Any, exp: Expected, hidden: int, dtype: str, salt: int) -> int:
    """Rows of ``out`` that differ from the expectation in x, scales, topk_idx or weights, plus the
    difference in row count (missing or extra rows count as wrong)."""
    n_exp, n_got = exp.src_rank.numel(), int(out.x.shape[0])
    n = min(n_exp, n_got)
    got_x = out.x[:n]
    want_dtype = torch.float8_e4m3fn if dtype == "fp8" else torch.bfloat16
    if got_x.dtype != want_dtype:
        bad = torch.ones(n, dtype=torch.bool, device=got_x.device)
    else:
        parts = []
        for lo in range(0, n, CHECK_ROWS):
            hi = min(n, lo + CHECK_ROWS)
            want_x = payload_rows(exp.src_rank[lo:hi], exp.src_token[lo:hi], hidden, dtype, salt)
            parts.append((got_x[lo:hi].view(torch.uint8) != want_x.view(torch.uint8)).any(dim=1))
        bad = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=got_x.device)
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


def expected_combine(
    inputs: InputSet,
    rank: int,
    num_experts: int,
    hidden: int,
    dtype: str,
    num_ranks_per_node: int | None = None,
) -> torch.Tensor:
    """[T, H] bf16: each of this rank's tokens summed once per rank it went to, as
    ``commkit.reference.combine_reference`` sums with ``num_ranks_per_node`` G (None: one node): per
    node, float32 from +0.0 in ascending rank order, rounded to bf16; the node partials added in float32
    from +0.0 in ascending node order (one node: a single rounding)."""
    num_ranks = len(inputs.topk_idx)
    per_node = num_ranks_per_node or num_ranks
    in_rank = token_in_rank(inputs.topk_idx[rank], num_experts, num_ranks)  # [T, R]
    row = inputs.x.to(torch.bfloat16).to(torch.float32)
    total = torch.zeros_like(row)
    for first in range(0, num_ranks, per_node):
        partial = torch.zeros_like(row)
        for r in range(first, first + per_node):  # NOTE: ascending rank order, as the reference sums
            partial = partial + torch.where(in_rank[:, r : r + 1], row, torch.zeros_like(row))
        # NOTE: a node the token did not reach adds +0.0, which changes no sum that starts from +0.0
        total = total + partial.to(torch.bfloat16).to(torch.float32)
    return total.to(torch.bfloat16)


def count_wrong_combine(y: torch.Tensor, want: torch.Tensor) -> int:
    if y.shape != want.shape:
        return max(int(want.shape[0]), int(y.shape[0]))
    return int((y.view(torch.int16) != want.view(torch.int16)).any(dim=1).sum())


# --------------------------------------------------------------------------------------- bytes
def bytes_per_rank(
    topk_idx: Sequence[torch.Tensor], num_experts: int, num_ranks_per_node: int, hidden: int, dtype: str
) -> dict[str, float]:
    """Mean over ranks of the logical bytes in the module docstring (``commkit.tools.traffic`` counts)."""
    traffic = count_traffic(topk_idx, num_experts, num_ranks_per_node, hidden, dtype)
    out: dict[str, float] = {}
    for op in ("dispatch", "combine"):
        fig = traffic.figures(op)
        out[f"{op}_nvl_bytes"], out[f"{op}_rdma_bytes"] = fig["logical_bytes"], fig["ib_bytes_hier"]
    out["mean_recv_rows"] = traffic.mean("recv_rows")
    return out


def link_fields(
    traffic: Traffic | Sequence[Traffic], op: str, median_s: float
) -> tuple[str, float, dict[str, Any]]:
    """(link, its bytes, the row's byte fields) of ``op``: NVLink bytes on one node, RDMA bytes of the
    hierarchical path across nodes, where the flat all-to-all's and DeepEP's counts come too.

    Several ``Traffic`` (the input sets a timing rotates over): every byte figure is the mean over them,
    each weighted equally; ``rdma_saved`` is the ratio of the mean flat and hierarchical bytes."""
    traffics = [traffic] if isinstance(traffic, Traffic) else list(traffic)
    if not traffics:
        raise ValueError("traffic: expected the counts of at least one input set, got none")
    settings = {(t.num_ranks, t.num_ranks_per_node) for t in traffics}
    if len(settings) > 1:
        raise ValueError(f"traffic: expected counts of one (ranks, ranks per node) setting, got {settings}")
    figs = [t.figures(op) for t in traffics]
    fig = {key: sum(f[key] for f in figs) / len(figs) for key in figs[0]}
    fields: dict[str, Any] = {"nvl_bytes": fig["logical_bytes"], "rdma_bytes": fig["ib_bytes_hier"]}
    if traffics[0].num_nodes == 1:
        return "nvl", fields["nvl_bytes"], fields
    # NOTE: from the row counts (as ``Traffic.ib_saved``): one set gives exactly its ``ib_saved``
    hier = sum(sum(t.ib_rows_hier) for t in traffics)
    fields.update(
        rdma_bytes_flat=fig["ib_bytes_flat"],
        rdma_saved=sum(sum(t.ib_rows_flat) for t in traffics) / hier if hier else None,
        rdma_bytes_incl_own_node=fig["rdma_bytes_incl_own_node"],
        gbps_incl_own_node=gbps(fig["rdma_bytes_incl_own_node"], median_s),
    )
    return "rdma", fields["rdma_bytes"], fields


# --------------------------------------------------------------------------------------- rank worker
@dataclass
class Measured:
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
    spec: BenchSpec,
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
    sets: list[InputSet], shape: MoEShape, dtype: str, spec: BenchSpec, device: torch.device
) -> tuple[Measured, Measured]:
    """The torch-ops baseline of virtual ranks (``commkit.tools.torch_ops``), on one thread: dispatch
    and combine of all ranks' tokens with torch ops on the same device, checked like the kernels."""
    from commkit.tools import torch_ops

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


def _roofline_times(
    ctx: RankContext, nbytes: float, num_sms: int, spec: BenchSpec, device: torch.device
) -> list[float]:
    """Copy of ``nbytes`` on ``num_sms`` blocks: on every real rank at once (its own GPU), or for
    virtual ranks on rank 0 alone (the caller passes all ranks' bytes and SMs; one GPU)."""
    from commkit.tools.roofline import CopyRoofline

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


def bench_rank(rank: int, num_ranks: int, spec: BenchSpec) -> list[dict[str, Any]]:
    """Run on every rank (inside an initialised process group); returns the rows (same on every rank)."""
    from commkit.tools.ranks import DistRanks

    ctx = DistRanks.current(timeout_s=spec.comm_timeout_s, num_ranks_per_node=spec.num_ranks_per_node)
    assert (ctx.rank, ctx.num_ranks) == (rank, num_ranks), ((ctx.rank, ctx.num_ranks), (rank, num_ranks))
    return bench_ranks(ctx, spec)


def with_ranks_per_node(ctx: RankContext, num_ranks_per_node: int | None) -> RankContext:
    """``ctx`` whose Buffers run on ``num_ranks_per_node`` ranks per node (the spec's; None: as made).

    A ``DistRanks`` made without one (e.g. by a caller that did not pass the spec's) takes it; one made
    with another raises, as its Buffers and the byte accounting would disagree. Virtual ranks get their
    nodes from their group (``run_virtual(num_ranks_per_node=...)``) and are returned as they are."""
    from commkit.tools.ranks import DistRanks

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
    from commkit.emulate import DEFAULT_NUM_SMS
    from commkit.tools.ranks import run_virtual

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


def bench_ranks(ctx: RankContext, spec: BenchSpec) -> list[dict[str, Any]]:
    """Run on every rank of ``ctx``; returns the rows (same on every rank)."""
    from commkit.tools.roofline import roofline_unavailable_reason

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
    rows: list[dict[str, Any]] = []
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
        num_nodes = num_ranks // num_ranks_per_node
        for op, meas, base_meas in (("dispatch", d, base and base[0]), ("combine", c, base and base[1])):
            stats = TimeStats.of(meas.times_s)
            bytes_counted, link_bytes, byte_fields = link_fields(traffics, op, stats.median_s)
            row: dict[str, Any] = {
                "shape": shape.name, "op": op, "backend": buf.backend, "ranks": num_ranks, "nodes": num_nodes,
                "virtual": ctx.virtual,
                "tokens": shape.num_tokens, "hidden": shape.hidden, "experts": shape.num_experts,
                "topk": shape.top_k, "dtype": dtype if op == "dispatch" else "bf16",
                "num_sms": effective_sms if buf.backend != TORCH_BASELINE else None,
                "num_sms_source": "argument" if num_sms is not None else buf.config.source,
                "num_sms_requested": effective_sms, "knobs": knobs_in_use,
                **byte_fields, "bytes_counted": bytes_counted, "link": link,
                **{f"time_{k}": v for k, v in stats.to_dict().items()},
                "gbps": gbps(link_bytes, stats.median_s), "wrong": meas.wrong,
            }  # fmt: skip
            bus = (
                byte_fields["rdma_bytes"]
                if num_nodes > 1
                else sum(t.figures(op)["nvl_bytes_flat"] for t in traffics) / len(traffics)
            )
            row["bus_bytes"] = bus
            row["algbw_gbps"] = gbps(byte_fields["nvl_bytes"], stats.median_s)
            row["busbw_gbps"] = gbps(bus, stats.median_s)
            if num_sms_ignored:
                row["num_sms_ignored"] = [k for k in spec.num_sms]
            if meas.wall_times_s is not None:
                wall = TimeStats.of(meas.wall_times_s)
                row.update({f"time_wall_{k}": v for k, v in wall.to_dict().items() if k != "reps"})
                row["time_source"], row["time_note"] = "kernel", KERNEL_TIME_NOTE
            else:
                row["time_source"] = "wall"
                if meas.time_note:
                    row["time_note"] = meas.time_note
            if buf.backend == TORCH_BASELINE:
                row["vs_torch"], row["vs_torch_note"] = None, "this row is the torch backend"
            elif base_meas is None:
                row["vs_torch"], row["vs_torch_note"] = None, "baseline disabled (--no-baseline)"
            else:
                row["vs_torch"] = TimeStats.of(base_meas.times_s).median_s / stats.median_s
                row["torch_wrong"] = base_meas.wrong
                if ctx.virtual:
                    row["vs_torch_baseline"] = "torch-ops"
                    row["torch_time_median_s"] = TimeStats.of(base_meas.times_s).median_s
                    row["vs_torch_note"] = VIRTUAL_TORCH_NOTE
            if roofline_reason is None and buf.backend != TORCH_BASELINE:
                # Virtual ranks: all ranks' bytes on all ranks' SMs, in one copy (see VIRTUAL_ROOFLINE_NOTE).
                scale = num_ranks if ctx.virtual else 1
                copy = TimeStats.of(
                    _roofline_times(ctx, link_bytes * scale, effective_sms * scale, spec, device)
                )
                row["roofline_gbps"] = gbps(link_bytes, copy.median_s)
                row["vs_roofline"] = row["gbps"] / row["roofline_gbps"]
                if ctx.virtual:
                    row["roofline_sms"], row["roofline_bytes"] = effective_sms * scale, link_bytes * scale
                    row["vs_roofline_note"] = VIRTUAL_ROOFLINE_NOTE
            else:
                row["vs_roofline"] = None
                row["vs_roofline_note"] = roofline_reason or "the torch backend does not run on a set of SMs"
            rows.append(row)
        progress(f"{shape.name} {dtype} num_sms={effective_sms}")
    progress(None)
    # NOTE: collective (every rank gets here); on an error the buffers are left to the process's end
    buf.close()
    if baseline is not None:
        baseline.close()
    return rows


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
        transport = getattr(buf, "internode_transport", None)
        return "nvlink-domain" if transport == "nvlink-domain" else "rdma"
    return "nvlink"


def skipped_row(
    shape: MoEShape, dtype: str, num_ranks: int, virtual: bool, buf: Any, num_sms: int | None,
    effective_sms: int, exc: Exception,
) -> dict[str, Any]:  # fmt: skip
    """The row of a budget that cannot run here (``ConfigError``, e.g. the blocks do not all fit)."""
    return {
        "shape": shape.name, "op": "dispatch+combine", "backend": buf.backend, "ranks": num_ranks,
        "virtual": virtual, "tokens": shape.num_tokens, "hidden": shape.hidden, "experts": shape.num_experts,
        "topk": shape.top_k, "dtype": dtype, "num_sms": effective_sms,
        "num_sms_source": "argument" if num_sms is not None else buf.config.source,
        "num_sms_requested": effective_sms, "skipped": f"{type(exc).__name__}: {exc}",
    }  # fmt: skip


def split_skipped(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(measured rows, skipped rows) of ``bench_ranks``."""
    return [r for r in rows if "skipped" not in r], [r for r in rows if "skipped" in r]


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
    else lowest GB/s); skipped rows are left out."""
    rows = split_skipped(rows)[0]
    if not rows:
        return {}

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    has_roof = all(r.get("vs_roofline") is not None for r in rows)
    worst = min(rows, key=lambda r: r["vs_roofline"] if has_roof else r["gbps"])
    return {
        "avg_gbps": mean("gbps"),
        "avg_algbw": mean("algbw_gbps"),
        "avg_busbw": mean("busbw_gbps"),
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
