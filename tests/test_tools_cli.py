"""Every tools subcommand has --help; GPU-only paths say what is missing and exit non-zero."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from commkit.__main__ import main

SYSFS = Path(__file__).parent / "fixtures" / "sysfs_ib"


@pytest.mark.parametrize("command", ["bench", "overlap", "tune", "monitor", "info"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"python -m commkit {command}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_overlap_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["overlap"]) != 0
    assert "overlap needs a CUDA GPU: torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_virtual_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--virtual", "8"]) != 0
    assert "CUDA GPU" in capsys.readouterr().err


def test_info_reads_sysfs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json", "--sysfs-root", str(SYSFS)]) == 0
    out = capsys.readouterr().out
    assert '"port": "mlx5_0/1"' in out and '"rate_gbit": 400.0' in out and '"torch": "usable over' in out


def test_monitor_runs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "m.csv"
    code = main(["monitor", "--interval", "0.02", "--sysfs-root", str(SYSFS), "--csv", str(csv_path), "--",
                 sys.executable, "-c", "import time; time.sleep(0.1); raise SystemExit(3)"])  # fmt: skip
    assert code == 3  # the command's exit code
    out = capsys.readouterr().out
    assert "mlx5_0/1/tx" in out and "unavailable: ib mlx5_1/1/tx" in out
    assert csv_path.read_text().startswith("t_s,mlx5_0/1/tx GB/s")


def test_monitor_needs_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["monitor"]) == 2
    assert "no command given" in capsys.readouterr().err
