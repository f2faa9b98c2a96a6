"""Arguments and helpers shared by the measuring subcommands.

Nothing here imports torch at module level: ``python -m commkit CMD --help`` builds the parsers without
it (torch is imported when a command runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from commkit.nodes import Nodes
from commkit.tools.shapes import SHAPES, MoEShape, get_shape


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default said once: appended as ``(default: X)`` unless the help already names its
    default, and not at all for defaults that say nothing (None, False, a flag's). Descriptions and
    epilogs: paragraphs (blank-line separated) are filled to the terminal, indented lines (examples)
    are kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(
                    textwrap.fill(" ".join(lines), width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._StoreConstAction | argparse._StoreTrueAction)
            or action.nargs == argparse.REMAINDER
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_rank_zero() -> bool:
    """True outside torchrun and on its rank 0 (the one that prints and writes)."""
    return not under_torchrun() or os.environ.get("RANK") == "0"


def add_shape_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--shape",
        action="append",
        choices=sorted(SHAPES),
        help="MoE layer shape, repeatable (default: deepseek-v3 on a GPU, ci-tiny on CPU)"
        if default is None
        else f"MoE layer shape, repeatable (default: {default})",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        metavar="T",
        help="tokens per rank (default: the shape's, ci-tiny 61, others 4096)",
    )


def shapes_from_args(args: argparse.Namespace, default: str | None = None) -> list[MoEShape]:
    shapes = [get_shape(name) for name in (args.shape or [default or default_shape()])]
    if args.tokens is not None:
        shapes = [s.with_(num_tokens=args.tokens) for s in shapes]
    return shapes


def default_shape() -> str:
    # NOTE: DeepSeek-V3 at 4096 tokens is the published reference point; on CPU over gloo it would take
    # minutes per repetition, so the CPU default is the CI shape.
    import torch

    return "deepseek-v3" if torch.cuda.is_available() else "ci-tiny"


def add_run_args(parser: argparse.ArgumentParser, *, spawn: bool = True, routing: bool = True) -> None:
    """Options of the measuring commands. ``spawn=False``: no ``--ranks`` (a command that runs only under
    torchrun or on virtual ranks); ``routing=False``: no ``--input-sets``/``--skew``/``--ranks-per-node``
    (a command that does not use them)."""
    if spawn:
        parser.add_argument(
            "--ranks", type=int, default=2, help="CPU processes to spawn over gloo (ignored under torchrun)"
        )
    if routing:
        parser.add_argument(
            "--ranks-per-node",
            type=int,
            metavar="G",
            help="ranks per node of the Buffers and of the byte counts "
            "(default: $LOCAL_WORLD_SIZE, else all)",
        )
    parser.add_argument(
        "--virtual",
        type=int,
        metavar="N",
        help="N virtual ranks on one GPU"
        + (" instead of --ranks" if spawn else "")
        + " (commkit.emulate: the kernels backend, every rank's buffer a region of one allocation, all "
        "ranks in one launch of N x num_sms blocks; needs CUDA and CuPy)",
    )
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "kernels"], help="the Buffers' backend"
    )
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    if routing:
        parser.add_argument("--input-sets", type=int, default=3, help="routings/payloads rotated over")
        parser.add_argument(
            "--skew", type=float, default=0.0, help="Zipf skew of expert popularity (0 = uniform)"
        )
    parser.add_argument("--seed", type=int, default=0, help="seed of the routings and payloads")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        metavar="S",
        help="host timeout: seconds before spawned ranks are abandoned (virtual ranks: how long a rank "
        "waits for the others at the tool's own barriers)",
    )
    parser.add_argument(
        "--comm-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="communication timeout: the Buffer's (EmulatedGroup's) timeout_s, i.e. the device spin "
        "budget and the wait for peers before CommTimeoutError",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_args_problem(args: argparse.Namespace, shapes: list[MoEShape] | None = None) -> str | None:
    """The first user mistake in the run options, as one line, or None; checked before any rank starts."""
    ints = {"reps": 1, "warmup": 0, "input_sets": 1}
    for name, low in ints.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            return f"--{name.replace('_', '-')}: expected >= {low}, got {value}"
    for name in ("timeout", "comm_timeout"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            return f"--{name.replace('_', '-')}: expected a positive number of seconds, got {value}"
    tokens = getattr(args, "tokens", None)
    if tokens is not None and tokens < 1:
        return f"--tokens: expected >= 1 tokens per rank, got {tokens}"
    bad_sms = [k for k in getattr(args, "num_sms", None) or [] if k < 1]
    if bad_sms:
        return f"--num-sms: expected budgets >= 1, got {bad_sms[0]}"
    if getattr(args, "virtual", None) is not None:
        num_ranks, what = args.virtual, "--virtual"
        if num_ranks < 1:
            return f"--virtual: expected a positive number of virtual ranks, got {num_ranks}"
    elif under_torchrun():
        num_ranks, what = int(os.environ["WORLD_SIZE"]), "the torchrun world size"
    elif hasattr(args, "ranks"):
        num_ranks, what = args.ranks, "--ranks"
        if num_ranks < 1:
            return f"--ranks: expected >= 1 ranks, got {num_ranks}"
    else:
        return None
    per_node = getattr(args, "ranks_per_node", None)
    try:
        Nodes.of(num_ranks, per_node, name="--ranks-per-node")
    except (TypeError, ValueError) as exc:
        return str(exc)
    for shape in shapes or []:
        if shape.num_experts % num_ranks:
            divisors = [r for r in range(1, shape.num_experts + 1) if shape.num_experts % r == 0][:8]
            return (
                f"{what} {num_ranks}: {shape.name} has {shape.num_experts} experts, which do not split "
                "evenly "
                f"over {num_ranks} ranks (use a divisor: {', '.join(map(str, divisors))}, ...)"
            )
    return None


def virtual_unavailable(args: argparse.Namespace) -> str | None:
    """Why ``--virtual`` cannot run here, or None."""
    n = getattr(args, "virtual", None)
    if n is None:
        return None
    if n < 1:
        return f"--virtual: expected a positive number of virtual ranks, got {n}"
    if under_torchrun():
        return "--virtual runs N ranks in this one process; do not start it under torchrun"
    if getattr(args, "backend", "auto") not in ("auto", "kernels"):
        return (
            f"--virtual runs the kernels backend; --backend {args.backend} needs a process group "
            "(use --ranks or torchrun)"
        )
    import torch

    if not torch.cuda.is_available():
        return "--virtual needs a CUDA GPU: torch.cuda.is_available() is False"
    from commkit.backends import kernels_unavailable_reason

    reason = kernels_unavailable_reason(None)
    if reason is not None:
        return f"--virtual needs the kernels: {reason}"
    return None


def resolves_to_torch(args: argparse.Namespace) -> str | None:
    """Why the run will take the torch backend (no SM budget), when that is known before any rank
    starts: ``--backend torch``, or ``auto`` where the kernels cannot run (no CUDA, no CuPy)."""
    if getattr(args, "virtual", None):
        return None
    if args.backend == "torch":
        return "--backend torch"
    if args.backend == "auto":
        from commkit.backends import kernels_unavailable_reason

        reason = kernels_unavailable_reason(None)
        if reason is not None:
            return f"--backend auto takes it here: {reason.split(':')[0]}"
    return None


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


RESULTS_ROOT = "commkit-results"


def default_out_dir(command: str, now: float | None = None) -> Path:
    """``./commkit-results/<command>-<YYYYmmdd-HHMMSS>`` (absolute): a new folder per run."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return (Path.cwd() / RESULTS_ROOT / f"{command}-{stamp}").resolve()


def results_dir(path: str | None, command: str) -> Path:
    """Where ``command`` writes: ``path`` (``--out``) or ``default_out_dir(command)``; not created."""
    return Path(path).expanduser().resolve() if path else default_out_dir(command)


def announce_results(directory: Path, command: str, files: str) -> None:
    """The first line of a command's output: where its results go."""
    print(f"commkit {command}: results go to {directory} ({files})", flush=True)


def out_dir(path: str | Path | None, command: str = "bench") -> Path:
    """``path`` (default ``default_out_dir(command)``), created."""
    base = Path(path) if path else default_out_dir(command)
    base.mkdir(parents=True, exist_ok=True)
    return base


def max_fitting_sms(virtual: int | None) -> int | None:
    """The largest SM budget whose blocks can all be resident (None without CUDA): the device's SMs
    for a real rank; for N virtual ranks, whose N x num_sms blocks of 512 threads share one GPU at one
    block per SM, its SMs // N."""
    import torch

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


def tokens_sweep(begin: int, end: int, factor: float) -> list[int]:
    """nccl-tests' -b/-e/-f over tokens per rank: begin, begin*f, ... up to end (end included when
    reached; each size a whole number of tokens, strictly increasing)."""
    if begin < 1 or end < begin:
        raise ValueError(f"expected 1 <= --min-tokens <= --max-tokens, got {begin} and {end}")
    if not factor > 1:
        raise ValueError(f"--step-factor: expected a factor > 1, got {factor}")
    sizes, size = [], float(begin)
    while round(size) <= end:
        if not sizes or round(size) > sizes[-1]:
            sizes.append(round(size))
        size *= factor
    return sizes
