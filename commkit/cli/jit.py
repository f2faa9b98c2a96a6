"""``python -m commkit jit warm``: compile the kernels of the GPU check ahead, in parallel, into a cache."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "jit",
        help="the JIT cache: compile the GPU check's kernels ahead (warm)",
        description="The JIT's binary cache (COMMKIT_CACHE_DIR layout, commkit/jit/compiler.py).",
    )
    sub = parser.add_subparsers(dest="jit_command", metavar="SUBCOMMAND", required=True)
    warm = sub.add_parser(
        "warm",
        help="compile every kernel instantiation the GPU check uses into a cache directory",
        description=(
            "Compile, in parallel (--workers, default os.cpu_count()), every kernel instantiation that "
            "bench/gpu_check.sh uses (commkit/jit/warm.py: check_workloads) into --out, so that the check "
            "on the GPU machine finds them all cached. A second run is all hits; a header edit misses. "
            "Prints the nvcc version here and the one of the previous warm of that cache (its warm.json); "
            "exit status 1 when an instantiation fails to compile."
        ),
    )
    warm.add_argument(
        "--out",
        type=Path,
        help="cache directory (default: $COMMKIT_CACHE_DIR, else the user cache directory's commkit, "
        "~/.cache/commkit on Linux); "
        "bench/gpu_check.sh uses ./.jit-cache",
    )
    warm.add_argument("--workers", type=int, help="parallel compiles (default: os.cpu_count())")
    warm.add_argument(
        "--steps",
        help="comma-separated steps of the check whose kernels to compile (default all: "
        "gpu_tests,nodes,bench,overlap,memcheck,stress)",
    )
    warm.add_argument(
        "--dry-run",
        action="store_true",
        help="list the instantiations and whether each is cached; compile none",
    )
    warm.add_argument("--quiet", action="store_true", help="no line per instantiation")
    warm.add_argument(
        "--gpu-tests", type=Path, help="directory of the GPU tests whose cases are read (default tests/gpu)"
    )
    warm.set_defaults(func=run_warm)


def _steps(parser_error: Any, text: str | None) -> list[str] | None:
    from commkit.jit.warm import STEPS

    if text is None:
        return None
    steps = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        parser_error(f"--steps: expected a comma-separated list of {', '.join(STEPS)}, got {text!r}")
    return steps


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_warm(args: argparse.Namespace) -> int:
    from commkit.jit import compiler
    from commkit.jit import warm as w

    def error(msg: str) -> None:
        raise SystemExit(_fail(msg))

    steps = _steps(error, args.steps)
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers: expected a positive number, got {args.workers}")
    cache = (args.out or compiler.cache_dir()).expanduser()
    if cache.exists() and not cache.is_dir():
        return _fail(f"--out: {cache} exists and is not a directory")
    if args.gpu_tests is not None and not args.gpu_tests.is_dir():
        return _fail(f"--gpu-tests: {args.gpu_tests} is not a directory")
    try:
        needed = w.check_specs(steps, args.gpu_tests)
    except (OSError, ValueError, SyntaxError) as exc:
        return _fail(f"cannot list the check's kernels: {exc}")
    here = w.nvcc_version_text()
    manifest = w.read_manifest(cache) if cache.is_dir() else None
    before = manifest.get("nvcc_version") if manifest else None
    print(f"jit: nvcc here: {w.short_version(here)}")
    print(
        f"jit: nvcc of the cache's last warm: {w.short_version(before) if manifest else 'none (not warmed)'}"
    )
    if manifest and manifest.get("commit"):
        dirty = " (with uncommitted changes)" if manifest.get("dirty") else ""
        print(f"jit: cache warmed at commit {manifest['commit']}{dirty}, {manifest.get('written', '?')}")
    if manifest and here and before and here != before:
        print("jit: the nvcc versions differ: every instantiation misses and is compiled here")
    if args.dry_run:
        return _dry_run(needed, cache)
    if here is None:
        print("jit: no nvcc here: only cached instantiations can load (found by their source key)")

    def show(spec: Any, status: str, seconds: float) -> None:
        if not args.quiet or status.startswith("FAILED"):
            print(f"  {status:4} {seconds:5.1f} s  {spec.expression()}", flush=True)

    if here is None:  # nothing can be compiled: report what is there
        missing = [s for s in needed if not w.cached(s, cache)]
        for spec in missing:
            print(f"  MISSING  {spec.expression()}")
        print(f"jit: {len(needed) - len(missing)} cached, {len(missing)} missing (no nvcc to compile them)")
        return 1 if missing else 0
    workers = args.workers or os.cpu_count() or 1
    print(f"jit: {len(needed)} instantiations into {cache}, {workers} workers", flush=True)
    report = w.warm(needed, cache, workers=workers, on_result=show)
    size_mb = w.cache_size_bytes(cache) / 1e6
    print(
        f"jit: {report.hits} hits, {report.misses} compiled, {len(report.failed)} failed, "
        f"{report.seconds:.1f} s; cache {size_mb:.1f} MB"
    )
    for spec, why in report.failed:
        print(f"jit: FAILED {spec.expression()}: {why}")
    return 1 if report.failed else 0


def _dry_run(needed: dict, cache: Path) -> int:
    from commkit.jit import warm as w

    per_step: dict[str, list[int]] = {s: [0, 0] for s in w.STEPS}
    rows = []
    for spec, users in needed.items():
        status = w.cached(spec, cache) if cache.is_dir() else False
        for step in users:
            per_step[step][0] += 1
            per_step[step][1] += bool(status)
        rows.append((status, spec, users))
    for step, (total, hit) in per_step.items():
        if total:
            print(f"jit: step {step}: {total} instantiations, {hit} cached, {total - hit} to compile")
    cached_count = sum(1 for status, _, _ in rows if status)
    print(f"jit: {len(rows)} distinct instantiations, {cached_count} cached in {cache}, "
          f"{len(rows) - cached_count} to compile")  # fmt: skip
    for status, spec, users in rows:
        mark = {True: "cached", False: "MISS", None: "?"}[status]
        print(f"  {mark:6} {spec.expression():70} {','.join(users)}")
    return 0
