"""The bench's result rows: a ``BenchRow`` per (shape, op, dtype, budget) measured, a ``SkippedRow`` per
configuration that could not run, and the byte counts they carry. ``to_dict()`` is a row as the
results files (``bench.json``, ``tune.json``, the profiles' sweeps) hold it.

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
GPUs).

Virtual ranks (rows have ``"virtual": true``): the bytes and GB/s are per rank as above, with all ranks
on one node (HBM is the link); ``time_*`` is the device time of the kernel launches of the one call that
serves all ranks, ``time_wall_*`` the whole call, ``time_source`` says which one ``time_*`` is ("wall"
where the kernel events are missing); ``vs_torch`` compares with torch ops doing all ranks' work on the
same GPU (``commkit.tools.torch_ops``), as the torch backend needs a process group; the copy roofline
moves all ranks' bytes on all ranks' SMs (N x num_sms blocks, as one launch runs N x num_sms blocks),
expressed per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from commkit.tools.timing import TimeStats, gbps
from commkit.tools.traffic import Traffic, count_traffic

# NOTE: a field with a default is written only when set (not None); one without is always written.
# A field that names another in WRITTEN_WITH is written exactly when that one is (None included).
WRITTEN_WITH = "written_with"


def _optional(written_with: str | None = None) -> Any:
    return dataclasses.field(default=None, metadata={WRITTEN_WITH: written_with} if written_with else {})


def _fields_dict(row: Any) -> dict[str, Any]:
    """``row``'s fields in their order, by the rules above; ``TimeStats`` fields flattened under
    their name (``time`` -> ``time_median_s``, ...; a field's ``drop`` metadata leaves some out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        anchor = f.metadata.get(WRITTEN_WITH)
        if anchor is not None:
            if getattr(row, anchor) is None:
                continue
        elif value is None and f.default is None:
            continue
        if isinstance(value, TimeStats):
            drop = f.metadata.get("drop", ())
            out.update({f"{f.name}_{k}": v for k, v in value.to_dict().items() if k not in drop})
        else:
            out[f.name] = value
    return out


@dataclass(kw_only=True)
class BenchRow:
    """One measured (shape, op, dtype, SM budget) of one backend: the module docstring says what each
    byte and rate field counts. ``to_dict()`` writes the fields in this order."""

    shape: str
    op: str  # "dispatch" or "combine"
    backend: str
    ranks: int
    nodes: int
    virtual: bool
    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype: str  # dispatch's dtype; combine rows are bf16
    num_sms: int | None  # None: the torch backend (no SM budget)
    num_sms_source: str  # "argument", or the Buffer config's source
    num_sms_requested: int
    knobs: dict[str, int]  # Buffer.knobs in use
    nvl_bytes: float
    rdma_bytes: float
    rdma_bytes_flat: float | None = _optional()  # several nodes only, as the three below
    rdma_saved: float | None = _optional(written_with="rdma_bytes_flat")
    rdma_bytes_incl_own_node: float | None = _optional()
    gbps_incl_own_node: float | None = _optional()
    bytes_counted: str  # "nvl" or "rdma": what ``gbps`` counts
    link: str
    time: TimeStats  # written as time_median_s, time_min_s, time_max_s, time_reps
    gbps: float
    wrong: int  # summed over ranks and repetitions
    bus_bytes: float
    algbw_gbps: float
    busbw_gbps: float
    num_sms_ignored: list[int] | None = _optional()  # the budgets asked of the torch backend
    time_wall: TimeStats | None = dataclasses.field(default=None, metadata={"drop": ("reps",)})
    time_source: str  # "kernel" or "wall"
    time_note: str | None = _optional()
    vs_torch: float | None  # the baseline's median time / this one's; None with vs_torch_note
    torch_wrong: int | None = _optional()
    vs_torch_baseline: str | None = _optional()  # "torch-ops" on virtual ranks
    torch_time_median_s: float | None = _optional()
    vs_torch_note: str | None = _optional()
    roofline_gbps: float | None = _optional()
    vs_roofline: float | None  # gbps / roofline_gbps; None with vs_roofline_note
    roofline_sms: int | None = _optional()  # virtual ranks: the copy's SMs and bytes (all ranks')
    roofline_bytes: float | None = _optional()
    vs_roofline_note: str | None = _optional()

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


@dataclass(kw_only=True)
class SkippedRow:
    """A budget that cannot run here (``ConfigError``, e.g. the blocks do not all fit)."""

    shape: str
    op: str  # "dispatch+combine"
    backend: str
    ranks: int
    virtual: bool
    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype: str
    num_sms: int
    num_sms_source: str
    num_sms_requested: int
    skipped: str  # the error: "ConfigError: ..."

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)


def split_skipped(rows: Sequence[BenchRow | SkippedRow]) -> tuple[list[BenchRow], list[SkippedRow]]:
    """(measured rows, skipped rows) of ``bench_ranks``."""
    return [r for r in rows if isinstance(r, BenchRow)], [r for r in rows if isinstance(r, SkippedRow)]


def summary(rows: Sequence[BenchRow | SkippedRow]) -> dict[str, Any]:
    """Footer: averages over rows and the worst row (lowest fraction of its roofline if measured,
    else lowest GB/s); skipped rows are left out."""
    measured = split_skipped(rows)[0]
    if not measured:
        return {}

    def mean(key: str) -> float | None:
        vals = [getattr(r, key) for r in measured if getattr(r, key) is not None]
        return sum(vals) / len(vals) if vals else None

    has_roof = all(r.vs_roofline is not None for r in measured)
    worst = min(measured, key=lambda r: r.vs_roofline if has_roof and r.vs_roofline is not None else r.gbps)
    return {
        "avg_gbps": mean("gbps"),
        "avg_algbw": mean("algbw_gbps"),
        "avg_busbw": mean("busbw_gbps"),
        "avg_vs_torch": mean("vs_torch"),
        "avg_vs_roofline": mean("vs_roofline"),
        "total_wrong": sum(r.wrong for r in measured),
        "worst": worst,
        "worst_by": "vs_roofline" if has_roof else "gbps",
    }


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
