"""``python -m commkit bench``: dispatch/combine bandwidth, nccl-tests style."""

from __future__ import annotations

import argparse
import re
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from commkit.cli._common import (
    HelpFormatter,
    add_run_args,
    add_shape_args,
    announce_results,
    fail,
    is_rank_zero,
    resolves_to_torch,
    results_dir,
    run_args_problem,
    shapes_from_args,
    tokens_sweep,
    virtual_unavailable,
    warn,
)

if TYPE_CHECKING:
    from commkit.tools.rows import BenchRow, SkippedRow

WIDTH = 120  # the default table, header and footer fit this many columns

# The default table: what nccl-tests prints (size, time, algbw, busbw, #wrong) plus the ratios.
COLUMNS = [
    "shape", "op", "dtype", "sms", "tokens", "size", "time", "algbw", "busbw", "link", "#wrong", "vs_torch",
    "vs_roof",
]  # fmt: skip
# --wide, and the TSV: every column. NOTE: "RDMA MB" is the hierarchical path's network bytes; "flat RDMA
# MB" a flat all-to-all's for the same routing and "RDMA saved" their ratio (flat / hierarchical): blank
# on one node.
WIDE_COLUMNS = [
    "shape", "op", "backend", "ranks", "nodes", "tokens", "hidden", "topk", "dtype", "sms", "size",
    "bus MB", "NVL MB", "RDMA MB", "flat RDMA MB", "RDMA saved", "time", "min us", "max us", "time source",
    "algbw", "busbw", "GB/s", "link", "#wrong", "vs_torch", "vs_roof",
]  # fmt: skip
LEFT = ("shape", "op", "dtype", "link", "backend", "time source")
UNITS = {"size": "(MB)", "time": "(us)", "algbw": "(GB/s)", "busbw": "(GB/s)", "GB/s": "(counted)"}

FOOTER = (
    "algbw = logical bytes per rank / time: rows received (dispatch) or sent back (combine) x row bytes, "
    "the rank's own rows included, as DeepEP publishes its GB/s; size = those bytes in MB (1e6, mean over "
    "ranks and input sets). busbw = bytes per rank that cross the link / time: rows from or to the other "
    "ranks on one node, the network (RDMA) bytes of the hierarchical path over several nodes. time = median "
    "over the repetitions of the slowest rank, in microseconds. #wrong = rows that differ from the expected "
    "ones, summed over ranks and repetitions (every repetition checked). vs_torch = the torch backend's "
    "time / this time; vs_roof = algbw / a copy kernel's on the same SMs. GB/s = 1e9 bytes/s; sms - = no "
    "SM budget (the torch backend)."
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="dispatch/combine bandwidth against the torch backend and the copy roofline",
        description="\n\n".join(
            (
                "Time dispatch and combine (median/min/max over repetitions, after a barrier, L2 flushed, "
                "inputs rotated), check every run, and print one nccl-tests-style row per shape, token "
                "count, dtype and SM budget: bytes per rank, time, algbw and busbw (defined in the "
                "footer), #wrong, and the ratios to the torch backend and to a copy kernel. --wide "
                "prints every column; bench.json and bench.tsv have them all, bench.png plots them.",
                "Bytes: NVLink (logical) bytes = rows received (dispatch) or sent back (combine) x row "
                "bytes; RDMA bytes = rows crossing nodes, once per destination node (the hierarchical "
                "path); over several nodes also the RDMA bytes of a flat all-to-all for the same routing "
                "(once per remote rank), their ratio ('RDMA saved'), and in the JSON the bytes and GB/s "
                "counted as DeepEP publishes them (own node included).",
                "Where it runs: on CPU it spawns --ranks gloo processes (torch backend); under torchrun "
                "each process is a rank. With --virtual N: N virtual ranks of the kernels on one GPU "
                "(link hbm; a repetition is the one launch serving all ranks); 'vs torch' is then torch "
                "ops doing the same work on the same GPU, and 'vs roof' a copy kernel on N x num_sms SMs "
                "moving all N ranks' bytes. Times with --virtual: the device time of the kernel launches "
                "(column time = kernel), the whole call's wall time in the JSON as time_wall_*. A budget "
                "that cannot run here (e.g. its N x num_sms blocks do not fit on the GPU) is skipped and "
                "reported.",
                "Token sweep (nccl-tests' -b/-e/-f, in tokens per rank): -b 128 -e 4096 -f 2 runs 128, "
                "256, ..., 4096 tokens for every shape and plots GB/s against tokens (bench_tokens.png).",
            )
        )
        + "\n\nexamples:\n"
        "  python -m commkit bench --ranks 4\n"
        "  python -m commkit bench --ranks 2 -b 16 -e 256 -f 2\n"
        "  torchrun --nproc-per-node=8 -m commkit bench --shape deepseek-v3 --num-sms 16 --num-sms 24\n"
        "  python -m commkit bench --virtual 8 --shape deepseek-v3 --num-sms 16",
        formatter_class=HelpFormatter,
    )
    add_shape_args(parser)
    sweep = parser.add_argument_group("token sweep (tokens per rank, as nccl-tests' -b/-e/-f in bytes)")
    sweep.add_argument("-b", "--min-tokens", type=int, metavar="T", help="smallest token count of the sweep")
    sweep.add_argument(
        "-e", "--max-tokens", type=int, metavar="T", help="largest token count of the sweep (default: -b)"
    )
    sweep.add_argument(
        "-f",
        "--step-factor",
        type=float,
        default=2.0,
        metavar="F",
        help="multiply the token count by F per step",
    )
    add_run_args(parser)
    parser.add_argument(
        "--dtype", action="append", choices=["bf16", "fp8"], help="dispatch dtype, repeatable (default: bf16)"
    )
    parser.add_argument(
        "--num-sms",
        type=int,
        action="append",
        metavar="K",
        help="SM budget(s) of the kernels, repeatable (default: buf.config, i.e. a tuning profile or 20); "
        "the torch backend has none",
    )
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
    parser.add_argument("--wide", action="store_true", help="print every column (wider than 120)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="directory for bench.json, bench.tsv, bench.png (default: ./commkit-results/bench-<time>)",
    )
    parser.set_defaults(func=run)


def display_shape(r: BenchRow) -> str:
    """The shape's name without a ``[num_tokens=T]`` suffix that the tokens column already says."""
    return re.sub(rf"\[num_tokens={r.tokens}\]$", "", r.shape)


def table_row(r: BenchRow, columns: list[str] = WIDE_COLUMNS) -> list[Any]:
    values = {
        "shape": display_shape(r) if columns is COLUMNS else r.shape, "op": r.op,
        "backend": r.backend, "ranks": r.ranks, "nodes": r.nodes, "tokens": r.tokens,
        "hidden": r.hidden, "topk": r.topk, "dtype": r.dtype,
        "sms": "-" if r.num_sms is None else r.num_sms, "size": r.nvl_bytes / 1e6,
        "bus MB": r.bus_bytes / 1e6, "NVL MB": r.nvl_bytes / 1e6, "RDMA MB": r.rdma_bytes / 1e6,
        "flat RDMA MB": r.rdma_bytes_flat / 1e6 if r.rdma_bytes_flat is not None else "",
        "RDMA saved": r.rdma_saved if r.rdma_bytes_flat is not None else "", "time": r.time.median_s * 1e6,
        "min us": r.time.min_s * 1e6, "max us": r.time.max_s * 1e6, "time source": r.time_source,
        "algbw": r.algbw_gbps, "busbw": r.busbw_gbps, "GB/s": r.gbps, "link": r.link, "#wrong": r.wrong,
        "vs_torch": r.vs_torch, "vs_roof": r.vs_roofline,
    }  # fmt: skip
    return [values[c] for c in columns]


def skipped_table_row(r: SkippedRow, columns: list[str]) -> list[Any]:
    values: dict[str, Any] = {c: "" for c in columns}
    values.update(shape=r.shape, op="skipped", tokens=r.tokens, dtype=r.dtype, sms=r.num_sms)
    return [values.get(c, "") for c in columns]


def wrap_comment(text: str, width: int = WIDTH) -> list[str]:
    return textwrap.wrap(
        text, width=width, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False,
        break_long_words=False,
    )  # fmt: skip


def header_lines(rows: list[BenchRow], meta: dict[str, Any], spec: Any) -> list[str]:
    """nccl-tests' header: what ran, where, how often (the constant part of every row)."""
    commit = meta.get("commit") or "unknown"
    short = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "") if commit != "unknown" else commit
    lines = wrap_comment(
        f"commkit bench {meta['commkit']} (commit {short}), {meta['started']}; {meta['device']}; "
        f"torch {meta['torch']}"
    )
    if rows:
        r = rows[0]
        where = {
            "gloo": "CPU processes over gloo",
            "hbm": "virtual ranks on one GPU",
            "nccl": "GPUs over NCCL",
        }.get(r.link, f"GPUs, link {r.link}")
        lines += wrap_comment(
            f"backend {r.backend}: {r.ranks} ranks ({where}) on {r.nodes} node{'s' if r.nodes > 1 else ''}"
        )
        lines += wrap_comment(
            f"{spec.reps} repetitions after {spec.warmup} warm-up, {spec.num_input_sets} input sets, skew "
            f"{spec.skew:g}, seed {spec.seed}"
        )
    lines += wrap_comment(f"command: {meta['command']}")
    return lines


def footer_lines(rows: list[BenchRow], foot: dict[str, Any]) -> list[str]:
    from commkit.tools.report import sig

    if not rows:
        return []
    worst = foot["worst"]
    lines = wrap_comment(
        f"#wrong total: {foot['total_wrong']}; avg algbw {sig(foot.get('avg_algbw'))} GB/s, avg busbw "
        f"{sig(foot.get('avg_busbw'))} GB/s, avg vs torch {sig(foot['avg_vs_torch'])}, avg vs roof "
        f"{sig(foot['avg_vs_roofline'])}; worst ({foot['worst_by']}): {display_shape(worst)} "
        f"{worst.op} {worst.dtype} tokens {worst.tokens} sms {worst.num_sms or '-'}"
    )
    return lines + wrap_comment(FOOTER)


def run(args: argparse.Namespace) -> int:
    if args.min_tokens is None and args.max_tokens is not None:
        return fail("-e/--max-tokens needs -b/--min-tokens")
    if args.min_tokens is not None and args.tokens is not None:
        return fail("--tokens and -b/--min-tokens: give one token count or a sweep, not both")
    try:
        shapes = shapes_from_args(args)
        if args.min_tokens is not None:
            sizes = tokens_sweep(args.min_tokens, args.max_tokens or args.min_tokens, args.step_factor)
            shapes = [s.with_(num_tokens=t) for s in shapes for t in sizes]
    except ValueError as exc:
        return fail(str(exc))
    why = virtual_unavailable(args) or run_args_problem(args, shapes)
    if why:
        return fail(why)
    num_sms = list(dict.fromkeys(args.num_sms)) if args.num_sms else [None]
    no_budget = resolves_to_torch(args) if args.num_sms and len(num_sms) > 1 else None
    directory = results_dir(args.out, "bench")
    if is_rank_zero():
        announce_results(directory, "bench", "bench.json, bench.tsv, bench.png")
    if no_budget:
        if is_rank_zero():
            warn(f"--num-sms ignored: the torch backend ({no_budget}) has no SM budget; one row per shape")
        num_sms = num_sms[:1]
    return _run(args, shapes, num_sms, directory, warned=bool(no_budget))


def _run(args: argparse.Namespace, shapes: list, num_sms: list, directory: Path, warned: bool) -> int:
    from commkit.tools import report
    from commkit.tools.bench import BenchSpec, bench_rank, bench_virtual, launch, spec_to_dict
    from commkit.tools.rows import split_skipped
    from commkit.tools.rows import summary as summarise

    spec = BenchSpec(
        shapes=shapes, dtypes=list(dict.fromkeys(args.dtype or ["bf16"])), num_sms=num_sms,
        backend=args.backend, baseline=not args.no_baseline, roofline=not args.no_roofline,
        num_ranks_per_node=args.ranks_per_node, reps=args.reps, warmup=args.warmup,
        num_input_sets=args.input_sets, skew=args.skew, seed=args.seed, progress=not args.no_progress,
        virtual=args.virtual, comm_timeout_s=args.comm_timeout,
    )  # fmt: skip
    started = time.time()
    if args.virtual:
        all_rows = bench_virtual(args.virtual, spec, host_timeout_s=args.timeout)
    else:
        all_rows = launch(bench_rank, args.ranks, spec, timeout_s=args.timeout)
    rows, skipped = split_skipped(all_rows)
    if not is_rank_zero():
        return 0 if all(r.wrong == 0 for r in rows) else 1
    if args.num_sms and not warned and any(r.num_sms_ignored for r in rows):
        warn("--num-sms ignored: the run took the torch backend, which has no SM budget (one row per shape)")
    foot = summarise(rows)
    meta = report.run_metadata(started, args)
    columns = WIDE_COLUMNS if args.wide else COLUMNS
    table = [table_row(r, columns) for r in rows] + [skipped_table_row(r, columns) for r in skipped]
    lines = header_lines(rows, meta, spec) + report.plain_table(columns, table, left=LEFT, units=UNITS)
    lines += footer_lines(rows, foot)
    notes = sorted({str(n) for r in rows for n in (r.vs_torch_note, r.vs_roofline_note) if n is not None})
    lines += [line for note in notes for line in wrap_comment(f"n/a: {note}")]
    if any(r.nodes > 1 for r in rows):
        lines += wrap_comment(
            "rdma: RDMA MB = network bytes of the hierarchical path (a token once per remote node); flat "
            "RDMA MB = a flat all-to-all's for the same routing (once per remote rank); RDMA saved = flat / "
            "hierarchical (--wide, TSV); the JSON also has rdma_bytes_incl_own_node and gbps_incl_own_node, "
            "counted as DeepEP publishes them (own node included)"
        )
    for note in sorted({r.time_note for r in rows if r.time_note}):
        lines += wrap_comment(f"time: {note}")
    for r in skipped:
        lines += wrap_comment(f"skipped: {r.shape} {r.dtype} num_sms={r.num_sms}: {r.skipped}")
    print("\n".join(lines), flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    report.write_json(
        directory / "bench.json",
        {
            "meta": meta,
            "spec": spec_to_dict(spec),
            "rows": [r.to_dict() for r in rows],
            "skipped": [r.to_dict() for r in skipped],
            "summary": {**foot, "worst": foot["worst"].to_dict()} if foot else foot,
        },
    )
    report.write_tsv(directory / "bench.tsv", WIDE_COLUMNS, [table_row(r) for r in rows])
    written = [directory / "bench.json", directory / "bench.tsv"]
    msg = plot_bench(rows, directory / "bench.png")
    if msg is None:
        written.append(directory / "bench.png")
        if len({r.tokens for r in rows}) > 1:
            plot_tokens(rows, directory / "bench_tokens.png")
            written.append(directory / "bench_tokens.png")
    print(f"wrote {', '.join(p.name for p in written)} in {directory}" + (f"; {msg}" if msg else ""))
    if foot.get("total_wrong"):
        print(f"error: {foot['total_wrong']} wrong rows")
        return 1
    if not rows:
        print("error: every configuration was skipped")
        return 1
    return 0


def _label(r: BenchRow) -> str:
    sms = f" sms {r.num_sms}" if r.num_sms is not None else ""
    return f"{r.shape} {r.op} {r.dtype}{sms}"


def plot_bench(rows: list[BenchRow], path: Any) -> str | None:
    """Horizontal bars of algbw per row (labels on the y axis never overlap), dispatch and combine in
    their colours with a legend, the copy roofline drawn (and named) only where it was measured; returns
    a message instead when matplotlib is missing or there is nothing to plot."""
    from commkit.tools.report import MATPLOTLIB_MISSING, load_pyplot

    plt = load_pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    if not rows:
        return "no measured rows: PNG skipped"
    from matplotlib.patches import Patch

    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.4 * n + 1.5)))
    colors = {"dispatch": "C0", "combine": "C1"}
    ys = list(range(n))[::-1]  # first row on top
    ax.barh(ys, [r.algbw_gbps for r in rows], color=[colors.get(r.op, "C2") for r in rows])
    handles = [Patch(color=c, label=op) for op, c in colors.items() if any(r.op == op for r in rows)]
    roof = [(y, r.roofline_gbps) for y, r in zip(ys, rows, strict=True) if r.roofline_gbps]
    for y, value in roof:
        ax.plot([value, value], [y - 0.4, y + 0.4], color="k", lw=1.5)
    if roof:
        handles.append(plt.Line2D([], [], color="k", lw=1.5, label="copy roofline"))
    ax.set_yticks(ys, [_label(r) for r in rows], fontsize="small")
    ax.set_xlabel("algbw, GB/s (logical bytes per rank / median time)")
    r0 = rows[0]
    ax.set_title(f"commkit bench: {r0.backend} backend, {r0.ranks} ranks, link {r0.link}")
    ax.legend(handles=handles, loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_tokens(rows: list[BenchRow], path: Any) -> str | None:
    """algbw against tokens per rank (log2 axis), one line per (shape, op, dtype, budget)."""
    from commkit.tools.report import MATPLOTLIB_MISSING, load_pyplot

    plt = load_pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        base = display_shape(r)
        sms = f" sms {r.num_sms}" if r.num_sms is not None else ""
        series.setdefault(f"{base} {r.op} {r.dtype}{sms}", []).append((r.tokens, r.algbw_gbps))
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("algbw, GB/s (logical bytes per rank / median time)")
    r0 = rows[0]
    ax.set_title(f"commkit bench: {r0.backend} backend, {r0.ranks} ranks, link {r0.link}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
