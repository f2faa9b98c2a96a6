"""Tables on the terminal (rich) and JSON/TSV files beside them."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


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
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col, justify="right" if col not in ("shape", "name", "channel", "kind") else "left")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    if footer:
        table.add_section()
        for row in footer:
            table.add_row(*[fmt(v) for v in row], style="bold")
    if console is None:
        console = Console()
        if not console.is_terminal:
            # NOTE: rich assumes 80 columns when writing to a pipe or file; bench rows need more.
            console = Console(width=220)
    console.print(table)


def write_json(path: str | Path, payload: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_tsv(path: str | Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)] + ["\t".join(fmt(v, 6) for v in row) for row in rows]
    Path(path).write_text("\n".join(lines) + "\n")


def git_commit(repo: str | Path | None = None) -> str | None:
    """The checkout's commit id (with ``-dirty`` when it has changes), None outside git."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parents[2]
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
