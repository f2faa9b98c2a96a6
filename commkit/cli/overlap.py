"""``python -m commkit overlap``: GEMM and communication side by side for a sweep of SM budgets."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from commkit.cli._common import (
    HelpFormatter,
    add_run_args,
    announce_results,
    fail,
    is_rank_zero,
    results_dir,
    run_args_problem,
    virtual_unavailable,
)
from commkit.tools.shapes import SHAPES, get_shape

COLUMNS = [
    "num_sms", "GEMM TF/s alone", "GEMM TF/s along", "comm GB/s alone", "comm GB/s along",
    "wall ms", "max alone ms", "sum alone ms", "overlap eff",
]  # fmt: skip


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "overlap",
        help="expert GEMM alongside dispatch/combine on k SMs, for a sweep of k (CUDA GPUs only)",
        description=(
            "Run an expert-sized bf16 GEMM on the compute stream while dispatch+combine run with "
            "num_sms=k on a communication stream; report GEMM TFLOP/s and communication GB/s alone "
            "and alongside, and the combined wall time against the max and the sum of the two alone; "
            "plot the trade-off. Needs CUDA "
            "(real ranks under torchrun, or --virtual N: N virtual ranks on one GPU, whose dispatch/combine "
            "run in one launch on N x k SMs while one GEMM over all ranks' received rows runs beside it). "
            "The GEMMs are queued first; the communication is a cached dispatch (the handle of an untimed "
            "warm-up dispatch: no host wait for the counts) + combine; all times are CUDA events. With "
            "--virtual the communication time is the kernels' device time (comm_time_source in the JSON). "
            "There is no CPU mode."
        ),
        epilog="examples:\n"
        "  torchrun --nproc-per-node=8 -m commkit overlap --shape deepseek-v3\n"
        "  python -m commkit overlap --virtual 8 --num-sms 8 --num-sms 16",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--shape", default="deepseek-v3", choices=sorted(SHAPES), help="MoE layer shape"
    )
    parser.add_argument(
        "--tokens", type=int, metavar="T", help="tokens per rank (default: the shape's, 4096 for the models)"
    )
    # NOTE: no --ranks (overlap spawns no CPU processes) and no routing options (it does not use them)
    add_run_args(parser, spawn=False, routing=False)
    parser.add_argument(
        "--num-sms",
        type=int,
        action="append",
        help="budgets to sweep (default 4..40 step 4, capped at what fits: the GPU's SMs, or its SMs // N "
        "with --virtual N); a budget that cannot run (ConfigError) is skipped and reported",
    )
    parser.add_argument("--gemm-repeats", type=int, default=4, help="GEMMs per measurement")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="directory for overlap.json and overlap.png (default: ./commkit-results/overlap-<time>)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from commkit.cli._common import default_budgets
    from commkit.tools import report
    from commkit.tools.bench import launch
    from commkit.tools.overlap import (
        OverlapSpec,
        overlap_rank,
        overlap_unavailable_reason,
        overlap_virtual,
        plot_overlap,
    )

    why = run_args_problem(args) or overlap_unavailable_reason() or virtual_unavailable(args)
    if why:
        return fail(why)
    if "RANK" not in os.environ and not args.virtual:
        return fail(
            "overlap runs one process per GPU under torchrun "
            "(torchrun --nproc-per-node=N -m commkit overlap), or with --virtual"
        )
    shape = get_shape(args.shape)
    if args.tokens:
        shape = shape.with_(num_tokens=args.tokens)
    why = run_args_problem(args, [shape])
    if why:
        return fail(why)
    directory = results_dir(args.out, "overlap")
    if is_rank_zero():
        announce_results(directory, "overlap", "overlap.json, overlap.png")
    started = time.time()
    spec = OverlapSpec(
        shape=shape, candidates=sorted(set(args.num_sms or default_budgets(40, args.virtual))),
        backend=args.backend, gemm_repeats=args.gemm_repeats, reps=args.reps, warmup=args.warmup,
        seed=args.seed, comm_timeout_s=args.comm_timeout,
    )  # fmt: skip
    if args.virtual:
        result = overlap_virtual(args.virtual, spec, host_timeout_s=args.timeout)
    else:
        result = launch(overlap_rank, 1, spec, timeout_s=args.timeout)
        if dist.get_rank() != 0:
            return 0
    rows = [
        [p["num_sms"], p["gemm_tflops_alone"], p["gemm_tflops_together"], p["comm_gbps_alone"],
         p["comm_gbps_together"], p["wall_together_s"] * 1e3, p["max_alone_s"] * 1e3, p["sum_alone_s"] * 1e3,
         p["overlap_efficiency"]]
        for p in result["points"]
    ]  # fmt: skip
    rows += [[p["num_sms"], f"skipped: {p['skipped']}", *[""] * 7] for p in result.get("skipped", [])]
    report.print_table(f"commkit overlap ({shape.name})", COLUMNS, rows)
    if result.get("comm_time_note"):
        print(f"time: {result['comm_time_note']}")
    directory.mkdir(parents=True, exist_ok=True)
    result["meta"] = report.run_metadata(started, args)
    result["commit"] = result["meta"]["commit"]
    report.write_json(directory / "overlap.json", result)
    msg = plot_overlap(result, directory / "overlap.png") if result["points"] else "no points to plot"
    print(f"wrote {directory / 'overlap.json'}" + (f"; {msg}" if msg else f", {directory / 'overlap.png'}"))
    return 0 if result["points"] else fail("every budget was skipped", 1)
