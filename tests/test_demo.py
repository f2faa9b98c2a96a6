"""The main job: ``python -m commkit demo`` on CPU processes over gloo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from commkit.demo import DemoConfig, summarize


def test_demo_runs_and_passes() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "commkit",
            "demo",
            "--ranks",
            "3",
            "--tokens",
            "64",
            "--experts",
            "6",
            "--iters",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout and "torch backend" in proc.stdout


def test_demo_rejects_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "commkit", "demo", "--ranks", "4", "--experts", "6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--experts: expected a multiple of --ranks (4), got 6" in proc.stderr


@pytest.mark.parametrize("err,ok", [(1e-3, True), (0.5, False)])
def test_summary_fails_on_large_error(err: float, ok: bool) -> None:
    rows = [{"err": err, "seconds": 0.5, "bytes": 1e6, "backend": "torch"}] * 2
    row = summarize(DemoConfig(ranks=2), rows)
    assert row["ok"] is ok
    assert row["gbps"] == pytest.approx(1e6 / 0.5 / 1e9)
