"""``python -m commkit bench``: dispatch/combine bandwidth, nccl-tests style."""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import torch

from commkit.cli._common import (
    add_run_args,
    add_shape_args,
    default_shape,
    fail,
    out_dir,
    shapes_from_args,
    virtual_unavailable,
)

# NOTE: "RDMA MB" is the hierarchical path's network bytes; "flat RDMA MB" a flat all-to-all's for the same
# routing and "RDMA saved" their ratio (flat / hierarchical): blank on one node.
COLUMNS = [
    "shape", "op", "ranks", "nodes", "tokens", "hidden", "topk", "dtype", "num_sms", "NVL MB", "RDMA MB",
    "flat RDMA MB", "RDMA saved", "med us", "min us", "max us", "GB/s", "link", "#wrong", "vs torch",
    "vs roofline", "time",
]  # fmt: skip


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="dispatch/combine bandwidth against the torch backend and the copy roofline",
        description=(
            "Time dispatch and combine (median/min/max over repetitions, after a barrier, L2 flushed, "
            "inputs rotated), check every run, and report GB/s of logical bytes: NVLink bytes = rows "
            "received (dispatch) or sent back (combine) x row bytes; RDMA bytes = rows crossing nodes, "
            "once per destination node (the hierarchical path); over several nodes also the RDMA bytes of a "
            "flat all-to-all for the same routing (once per remote rank), their ratio ('RDMA saved'), "
            "and in the JSON the bytes and GB/s counted as DeepEP publishes them (own node included). "
            "On CPU it spawns --ranks gloo processes (torch backend); under "
            "torchrun each process is a rank. With --virtual N: N virtual ranks of the kernels on one GPU "
            "(rows marked virtual; HBM is the link; a repetition is the one launch serving all ranks); "
            "'vs torch' is then torch ops doing the same work on the same GPU (index_select per "
            "destination, index_add_ back), since the torch backend needs a process group, and "
            "'vs roofline' a copy kernel on N x num_sms SMs moving all N ranks' bytes (the SMs and bytes "
            "of the one launch). Times with --virtual: the device time of the kernel launches (events on "
            "the communication stream around them; column time = kernel), the whole call's wall time in "
            "the JSON as time_wall_*; time = wall where the emulator gives no kernel events. A budget that "
            "cannot run here (e.g. its N x num_sms blocks do not fit on the GPU) is skipped and reported."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_shape_args(parser, default_shape())
    add_run_args(parser)
    parser.add_argument(
        "--dtype", action="append", choices=["bf16", "fp8"], help="dispatch dtype (default bf16)"
    )
    parser.add_argument("--num-sms", type=int, action="append", help="SM budget(s); default: buf.config")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the torch baseline (the torch backend; torch ops on the GPU with --virtual)",
    )
    parser.add_argument(
        "--no-roofline",
        action="store_true",
        help="skip the copy roofline (on num_sms SMs; N x num_sms SMs and N ranks' bytes with --virtual)",
    )
    parser.add_argument(
        "--out", help="directory for bench.json, bench.tsv, bench.png (default bench/results/local)"
    )
    parser.set_defaults(func=run)


def table_row(r: dict[str, Any]) -> list[Any]:
    return [
        r["shape"], r["op"], r["ranks"], r["nodes"], r["tokens"], r["hidden"], r["topk"], r["dtype"],
        r["num_sms"], r["nvl_bytes"] / 1e6, r["rdma_bytes"] / 1e6,
        r["rdma_bytes_flat"] / 1e6 if "rdma_bytes_flat" in r else "", r.get("rdma_saved", ""),
        r["time_median_s"] * 1e6,
        r["time_min_s"] * 1e6, r["time_max_s"] * 1e6, r["gbps"], r["gbps_link"], r["wrong"], r["vs_torch"],
        r["vs_roofline"], r.get("time_source", "wall"),
    ]  # fmt: skip


def skipped_table_row(r: dict[str, Any]) -> list[Any]:
    return [
        r["shape"], "skipped", r["ranks"], "", r["tokens"], r["hidden"], r["topk"], r["dtype"], r["num_sms"],
        *[""] * (len(COLUMNS) - 10), r["skipped"],
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from commkit.tools import report
    from commkit.tools.bench import (
        BenchSpec,
        bench_rank,
        bench_virtual,
        launch,
        spec_to_dict,
        split_skipped,
        summary,
    )

    why = virtual_unavailable(args)
    if why:
        return fail(why)
    spec = BenchSpec(
        shapes=shapes_from_args(args, default_shape()),
        dtypes=args.dtype or ["bf16"],
        num_sms=list(args.num_sms) if args.num_sms else [None],
        backend=args.backend,
        baseline=not args.no_baseline,
        roofline=not args.no_roofline,
        num_ranks_per_node=args.ranks_per_node,
        reps=args.reps,
        warmup=args.warmup,
        num_input_sets=args.input_sets,
        skew=args.skew,
        seed=args.seed,
        progress=not args.no_progress,
        virtual=args.virtual,
        comm_timeout_s=args.comm_timeout,
    )
    started = time.time()
    if args.virtual:
        all_rows = bench_virtual(args.virtual, spec, host_timeout_s=args.timeout)
    else:
        all_rows = launch(bench_rank, args.ranks, spec, timeout_s=args.timeout)
    rows, skipped = split_skipped(all_rows)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0 if all(r["wrong"] == 0 for r in rows) else 1
    foot = summary(rows)
    footer = []
    if rows:
        footer = [
            ["average", *[""] * (COLUMNS.index("GB/s") - 1), foot["avg_gbps"], "", foot["total_wrong"],
             foot["avg_vs_torch"], foot["avg_vs_roofline"], ""],
            ["worst", *table_row(foot["worst"])[1:]],
        ]  # fmt: skip
    title = f"commkit bench ({args.virtual} virtual ranks on one GPU)" if args.virtual else "commkit bench"
    table = [table_row(r) for r in rows] + [skipped_table_row(r) for r in skipped]
    report.print_table(title, COLUMNS, table, footer=footer)
    notes = sorted(
        {str(n) for r in rows for n in (r.get("vs_torch_note"), r.get("vs_roofline_note")) if n is not None}
    )
    for note in notes:
        print(f"n/a: {note}")
    if any(r["nodes"] > 1 for r in rows):
        print(
            "rdma: RDMA MB = network bytes of the hierarchical path (a token once per remote node); flat "
            "RDMA MB = a flat all-to-all's for the same routing (once per remote rank); RDMA saved = flat / "
            "hierarchical; the JSON also has rdma_bytes_incl_own_node and gbps_incl_own_node, counted as "
            "DeepEP publishes them (own node included)"
        )
    for note in sorted({r["time_note"] for r in rows if r.get("time_note")}):
        print(f"time: {note}")
    for r in skipped:
        print(f"skipped: {r['shape']} {r['dtype']} num_sms={r['num_sms']}: {r['skipped']}")
    directory = out_dir(args.out)
    meta = run_metadata(started)
    report.write_json(
        directory / "bench.json",
        {"meta": meta, "spec": spec_to_dict(spec), "rows": rows, "skipped": skipped, "summary": foot},
    )
    report.write_tsv(directory / "bench.tsv", COLUMNS, [table_row(r) for r in rows])
    msg = plot_bench(rows, directory / "bench.png")
    print(
        f"wrote {directory / 'bench.json'}, {directory / 'bench.tsv'}"
        + (f"; {msg}" if msg else f", {directory / 'bench.png'}")
    )
    if foot.get("total_wrong"):
        print(f"error: {foot['total_wrong']} wrong rows")
        return 1
    if not rows:
        print("error: every configuration was skipped")
        return 1
    return 0


def run_metadata(started: float) -> dict[str, Any]:
    from commkit.tools import report

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    return {
        "device": device,
        "commit": report.git_commit(),
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
    }


def plot_bench(rows: list[dict[str, Any]], path: Any) -> str | None:
    """Bar chart of GB/s per row; returns a message instead when matplotlib is missing."""
    from commkit.tools.report import MATPLOTLIB_MISSING, load_pyplot

    plt = load_pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    labels = [f"{r['shape']}\n{r['op']} {r['dtype']} sms={r['num_sms']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    ax.bar(
        range(len(rows)),
        [r["gbps"] for r in rows],
        color=["C0" if r["op"] == "dispatch" else "C1" for r in rows],
    )
    for i, r in enumerate(rows):
        if r.get("roofline_gbps"):
            ax.plot([i - 0.4, i + 0.4], [r["roofline_gbps"]] * 2, color="k", lw=1)
    ax.set_xticks(range(len(rows)), labels, fontsize="x-small")
    ax.set_ylabel("GB/s (logical bytes)")
    ax.set_title(
        f"commkit bench ({rows[0]['backend']} backend; black: copy roofline)" if rows else "commkit bench"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
