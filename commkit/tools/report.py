"""Tables on the terminal (plain fixed-width text, or rich) and JSON/TSV files beside them; what produced
a result (``run_metadata``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers with ``digits`` decimals, None as ``n/a``, strings unchanged."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    footer: Sequence[Sequence[Any]] = (),
    console: Console | None = None,
) -> None:
    """A rich table; ``footer`` rows are printed after a separator."""
    # NOTE: every cell is Text, never markup: "deepseek-v3[num_tokens=128]" must print as it is
    table = Table(title=Text(title), show_lines=False)
    for col in columns:
        table.add_column(
            Text(col), justify="right" if col not in ("shape", "name", "channel", "kind") else "left"
        )
    for row in rows:
        table.add_row(*[Text(fmt(v)) for v in row])
    if footer:
        table.add_section()
        for row in footer:
            table.add_row(*[Text(fmt(v)) for v in row], style="bold")
    if console is None:
        console = Console()
        if not console.is_terminal:
            # NOTE: rich assumes 80 columns when writing to a pipe or file; bench rows need more.
            console = Console(width=220)
    console.print(table)


def sig(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits and no exponent between 1e-6 and 1e15 (``0.02273``,
    ``45.60``, ``2273``, ``123457``); None and NaN as ``n/a``, strings and ints unchanged."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    if value == 0 or math.isinf(value):
        return f"{value:.{max(0, digits - 1)}f}" if value == 0 else str(value)
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -6:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{max(0, digits - 1 - magnitude)}f}"


def plain_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    left: Sequence[str] = (),
    units: dict[str, str] | None = None,
    digits: int = 4,
) -> list[str]:
    """Fixed-width lines in the style of nccl-tests: a ``#`` header line of column names (and one of
    ``units``, e.g. ``{"time": "(us)"}``, when given), then one line per row; numbers right-aligned with
    ``digits`` significant digits, the ``left`` columns left-aligned. Cells are printed as they are (no
    markup); each column is as wide as its widest cell."""
    cells = [[sig(v, digits) if not isinstance(v, str) else v for v in row] for row in rows]
    heads = [list(columns)] + ([[units.get(c, "") for c in columns]] if units else [])
    widths = [max([len(h[i]) for h in heads] + [len(r[i]) for r in cells]) for i in range(len(columns))]

    def line(values: Sequence[str], lead: str) -> str:
        parts = [
            v.ljust(w) if col in left else v.rjust(w)
            for v, w, col in zip(values, widths, columns, strict=True)
        ]
        return (lead + " ".join(parts)).rstrip()

    return [line(h, "# ") for h in heads] + [line(r, "  ") for r in cells]


def write_json(path: str | Path, payload: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_tsv(path: str | Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)] + ["\t".join(fmt(v, 6) for v in row) for row in rows]
    Path(path).write_text("\n".join(lines) + "\n")


BUILD_COMMIT_FILE = "_build_commit.txt"  # written into the wheel by setup.py (build_py)


def git_commit(repo: str | Path | None = None) -> str | None:
    """The commit commkit runs from: the checkout's commit id (with ``-dirty`` when it has changes)
    when it runs from a git checkout (an editable install), else the commit the installed package was
    built from (``commkit/_build_commit.txt``, written by setup.py), else None (built outside git)."""
    if repo is None:
        here = git_commit_of(Path(__file__).resolve().parents[2])
        if here is not None:
            return here
        built = Path(__file__).resolve().parents[1] / BUILD_COMMIT_FILE
        try:
            return built.read_text().strip() or None
        except OSError:
            return None
    return git_commit_of(Path(repo))


def git_commit_of(cwd: Path) -> str | None:
    """``cwd``'s git commit (``-dirty`` with uncommitted changes), None when it is not in a checkout."""
    if not (cwd / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def commkit_version() -> str:
    """The installed distribution's version (package metadata, the one place it is kept)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("commkit")
    except PackageNotFoundError:
        return "0+unknown"


def device_description() -> str:
    """``NVIDIA H100 80GB HBM3 x8`` or ``cpu (x86_64, 2 cores)``."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def command_line(args: argparse.Namespace | list[str] | None = None) -> str:
    """The command as a user would type it: ``python -m commkit`` and the arguments ``main`` parsed
    (``args.argv``, or a list of them); without either, this process's ``sys.argv``."""
    argv = getattr(args, "argv", args)
    if isinstance(argv, list):
        return shlex.join(["python", "-m", "commkit", *argv])
    words = list(sys.argv)
    if words and words[0].endswith(("__main__.py", "/commkit")):
        words = ["python", "-m", "commkit", *words[1:]]
    return shlex.join(words)


def run_metadata(started: float, command: Any = None) -> dict[str, Any]:
    """What produced a result: commkit version and commit, device, host, torch, the command line (a
    string, or the parsed arguments / argument list for ``command_line``), when."""
    import torch  # NOTE: on use: the CLI imports this module to parse, which must not load torch

    return {
        "commkit": commkit_version(),
        "commit": git_commit(),
        "command": command if isinstance(command, str) else command_line(command),
        "device": device_description(),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
    }


def load_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


MATPLOTLIB_MISSING = "matplotlib is not installed (pip install matplotlib): PNG skipped"
