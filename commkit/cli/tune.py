"""``python -m commkit tune``: sweep the SM budget and save a profile keyed by the cluster signature."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

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
    virtual_unavailable,
)

NO_BUDGET = (
    "the torch backend has no SM budget: every num_sms runs the same code, so a sweep would measure "
    "run-to-run noise only; no profile saved (tune the kernels backend on a GPU: --backend kernels, or "
    "--virtual N)"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="sweep num_sms for this group and shapes; save a profile Buffer picks up",
        description=(
            "Sweep the SM budget (num_sms) with dispatch+combine on the current group and shapes and save "
            "the choice as a JSON profile keyed by the cluster signature (device, SMs, ranks, ranks per "
            "node, NVLink and NIC speed) in $COMMKIT_PROFILE_DIR, else the user cache directory "
            "(~/.cache/commkit/profiles on Linux). Objectives: "
            "'fastest', or 'hide' (smallest budget whose communication fits under --compute-ms or the GEMM "
            "time of an overlap JSON). With --virtual N the sweep runs on N virtual ranks of one GPU and "
            "the profile is keyed with N ranks, N per node (what Buffer.from_backend looks up); with "
            "--ranks-per-node G as well, on virtual nodes. Over several nodes the internode kernels' role "
            "split (--role-warps) is then swept at the chosen budget and saved as the profile's knobs. "
            "The torch backend has no SM budget: tune refuses it and saves nothing."
        ),
        epilog="examples:\n"
        "  torchrun --nproc-per-node=8 -m commkit tune --shape deepseek-v3\n"
        "  torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\\n"
        "      -m commkit tune --shape deepseek-v3 --num-sms 16 --num-sms 24\n"
        "  python -m commkit tune --virtual 8 --num-sms 4 --num-sms 8 --num-sms 16 --dry-run",
        formatter_class=HelpFormatter,
    )
    add_shape_args(parser)
    add_run_args(parser)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"], help="dispatch dtype")
    parser.add_argument(
        "--num-sms",
        type=int,
        action="append",
        metavar="K",
        help="candidate budgets, repeatable (default: 4..48 step 4, capped at what fits: the GPU's SMs, or "
        "its SMs // N with --virtual N, e.g. 4..16 for 8 virtual ranks on an H100). A budget that cannot "
        "run (ConfigError) is skipped and reported",
    )
    parser.add_argument(
        "--role-warps",
        type=int,
        action="append",
        metavar="W",
        help="over several nodes (internode kernels): forwarder warps (of 8) to try at the chosen budget, "
        "per op, repeatable; the best go into the profile's knobs (default: 2 4 6)",
    )
    parser.add_argument(
        "--objective", default="fastest", choices=["fastest", "hide"], help="what the chosen budget achieves"
    )
    parser.add_argument(
        "--compute-ms", type=float, metavar="MS", help="compute time to hide under (objective hide)"
    )
    parser.add_argument(
        "--overlap-json", metavar="PATH", help="take the compute time from this overlap.json (objective hide)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.03, help="budgets within this of the fastest count as fastest"
    )
    parser.add_argument(
        "--profile-dir",
        metavar="DIR",
        help="where to save the profile (default: $COMMKIT_PROFILE_DIR, else the user cache directory's "
        "commkit/profiles)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the choice, save nothing")
    parser.add_argument(
        "--out", metavar="DIR", help="directory for tune.json (default: ./commkit-results/tune-<time>)"
    )
    parser.set_defaults(func=run)


def default_candidates(virtual: int | None = None) -> list[int]:
    import torch

    from commkit.cli._common import default_budgets

    if torch.cuda.is_available():
        return default_budgets(48, virtual)
    return [8, 16, 24]


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from commkit.profiles import save_profile
    from commkit.tools import report
    from commkit.tools.bench import BenchSpec, launch
    from commkit.tools.tune import (
        TuneSpec,
        choose,
        comm_time_by_budget,
        compute_ms_from_overlap,
        make_profile,
        tune_rank,
        tune_virtual,
    )

    shapes = shapes_from_args(args)
    why = virtual_unavailable(args) or run_args_problem(args, shapes)
    if why:
        return fail(why)
    no_budget = resolves_to_torch(args)
    if no_budget:
        return fail(f"{NO_BUDGET} [{no_budget}]", 1)
    bad = [w for w in args.role_warps or [] if not 1 <= w <= 7]
    if bad:
        return fail(f"--role-warps: expected 1 to 7 forwarder warps (of 8), got {bad}")
    compute_ms = args.compute_ms
    if args.objective == "hide" and compute_ms is None:
        if not args.overlap_json:
            return fail("objective 'hide' needs --compute-ms or --overlap-json")
        with open(args.overlap_json) as fh:
            compute_ms = compute_ms_from_overlap(json.load(fh))
    spec = TuneSpec(
        bench=BenchSpec(
            shapes=shapes, dtypes=[args.dtype], backend=args.backend,
            num_ranks_per_node=args.ranks_per_node, reps=args.reps, warmup=args.warmup,
            num_input_sets=args.input_sets, skew=args.skew, seed=args.seed, progress=not args.no_progress,
            virtual=args.virtual, comm_timeout_s=args.comm_timeout,
        ),
        candidates=sorted(set(args.num_sms or default_candidates(args.virtual))),
        objective=args.objective,
        compute_ms=compute_ms,
        tolerance=args.tolerance,
        role_candidates=sorted(set(args.role_warps or [2, 4, 6])),
    )  # fmt: skip
    directory = results_dir(args.out, "tune")
    if is_rank_zero():
        announce_results(directory, "tune", "tune.json")
    started = time.time()
    if args.virtual:
        result = tune_virtual(args.virtual, spec, host_timeout_s=args.timeout)
    else:
        result = launch(tune_rank, args.ranks, spec, timeout_s=args.timeout)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    meta = report.run_metadata(started, args)
    if result["backend"] == "torch":
        rows = [r.to_dict() for r in result["rows"]]
        report.write_json(directory / "tune.json", {"meta": meta, "rows": rows, "saved": None})
        return fail(NO_BUDGET, 1)
    skipped = result.get("skipped", [])
    for r in skipped:
        print(f"skipped: num_sms={r.num_sms} ({r.shape}): {r.skipped}")
    if not result["rows"]:
        report.write_json(
            directory / "tune.json", {"meta": meta, "rows": [], "skipped": [r.to_dict() for r in skipped]}
        )
        return fail("every budget was skipped: nothing to choose from", 1)
    wrong = sum(r.wrong for r in result["rows"])
    if wrong:
        return fail(f"{wrong} wrong rows during the sweep: not saving a profile", 1)
    choice = choose(comm_time_by_budget(result["rows"]), spec.objective, compute_ms, spec.tolerance)
    profile = make_profile(result, spec, choice)
    profile.extra["meta"] = meta
    rows = [
        [k, t * 1e3, "<- chosen" if k == choice.num_sms else ""] for k, t in sorted(choice.comm_s.items())
    ]
    rows += [[r.num_sms, "", f"skipped: {r.skipped}"] for r in skipped]
    report.print_table(
        f"commkit tune ({result['backend']} backend, {profile.signature.key})",
        ["num_sms", "dispatch+combine ms", ""],
        rows,
    )
    print(f"chosen num_sms={choice.num_sms}: {profile.reason}")
    print(f"per-SM GB/s: {profile.per_sm_gbps}")
    print(f"chunk sizes: {profile.extra['chunk_sizes_note']}")
    report.write_json(directory / "tune.json", profile.to_dict())
    if args.dry_run:
        print("dry run: no profile saved")
        return 0
    path = save_profile(profile, args.profile_dir)
    print(f"saved profile {path}")
    return 0
