"""Arguments and helpers shared by the measuring subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from commkit.tools.shapes import SHAPES, MoEShape, get_shape


def add_shape_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help=f"model-named MoE shape, repeatable (default {default})",
    )
    parser.add_argument("--tokens", type=int, help="tokens per rank (overrides the shape's)")


def shapes_from_args(args: argparse.Namespace, default: str) -> list[MoEShape]:
    shapes = [get_shape(name) for name in (args.shape or [default])]
    if args.tokens is not None:
        shapes = [s.with_(num_tokens=args.tokens) for s in shapes]
    return shapes


def default_shape() -> str:
    # NOTE: DeepSeek-V3 at 4096 tokens is the published reference point; on CPU over gloo it would take
    # minutes per repetition, so the CPU default is the CI shape.
    return "deepseek-v3" if torch.cuda.is_available() else "ci-tiny"


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ranks", type=int, default=2, help="ranks to spawn over gloo on CPU (ignored under torchrun)"
    )
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        help="ranks per node of the Buffers and of the byte counts (default: $LOCAL_WORLD_SIZE or all)",
    )
    parser.add_argument(
        "--virtual",
        type=int,
        metavar="N",
        help="N virtual ranks on one GPU instead of --ranks (commkit.emulate: the kernels backend, every "
        "rank's buffer a region of one allocation, all ranks in one launch of N x num_sms blocks; "
        "needs CUDA and CuPy)",
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "kernels"])
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (default 3)")
    parser.add_argument(
        "--input-sets", type=int, default=3, help="routings/payloads rotated over (default 3)"
    )
    parser.add_argument(
        "--skew", type=float, default=0.0, help="Zipf skew of expert popularity (0 = uniform)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="host timeout: seconds before spawned ranks are abandoned (virtual ranks: how long a rank "
        "waits for the others at the tool's own barriers)",
    )
    parser.add_argument(
        "--comm-timeout",
        type=float,
        default=60.0,
        help="communication timeout: the Buffer's (EmulatedGroup's) timeout_s, i.e. the device spin "
        "budget and the wait for peers before CommTimeoutError",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def virtual_unavailable(args: argparse.Namespace) -> str | None:
    """Why ``--virtual`` cannot run here, or None."""
    n = getattr(args, "virtual", None)
    if n is None:
        return None
    if n < 1:
        return f"--virtual: expected a positive number of virtual ranks, got {n}"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "--virtual runs N ranks in this one process; do not start it under torchrun"
    if getattr(args, "backend", "auto") not in ("auto", "kernels"):
        return (
            f"--virtual runs the kernels backend; --backend {args.backend} needs a process group "
            "(use --ranks or torchrun)"
        )
    if not torch.cuda.is_available():
        return "--virtual needs a CUDA GPU: torch.cuda.is_available() is False"
    from commkit.backends import kernels_unavailable_reason

    reason = kernels_unavailable_reason(None)
    if reason is not None:
        return f"--virtual needs the kernels: {reason}"
    return None


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def out_dir(path: str | None) -> Path:
    """``path`` (default bench/results/local), created."""
    base = Path(path) if path else Path("bench") / "results" / "local"
    base.mkdir(parents=True, exist_ok=True)
    return base


def max_fitting_sms(virtual: int | None) -> int | None:
    """The largest SM budget whose blocks can all be resident (None without CUDA): the device's SMs
    for a real rank; for N virtual ranks, whose N x num_sms blocks of 512 threads share one GPU at one
    block per SM, its SMs // N."""
    if not torch.cuda.is_available():
        return None
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, sms // virtual) if virtual else sms


def default_budgets(upper: int, virtual: int | None, step: int = 4) -> list[int]:
    """``step``..``upper`` in steps of ``step``, capped at what fits (``max_fitting_sms``); the cap
    itself when it is below ``step``."""
    cap = max_fitting_sms(virtual)
    top = upper if cap is None else min(upper, cap)
    return list(range(step, top + 1, step)) or [top]
