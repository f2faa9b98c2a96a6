"""``python -m commkit model``: table, JSON, plot and errors that name the argument."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from commkit.cli import model as model_cli


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="commkit")
    model_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["model", *argv])
    return args.func(args)


def test_default_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    argv = [
        "--preset",
        "h800-dsv3",
        "--tokens",
        "4096",
        "--hidden",
        "7168",
        "--topk",
        "8",
        "--experts",
        "256",
    ]
    assert run_cli([*argv, "--num-sms", "20", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dispatch" in text and "combine" in text and "nic_out" in text and "logical" in text
    data = json.loads(out.read_text())
    assert data["topology"]["num_ranks"] == 64
    assert set(data["phases"]) == {"dispatch", "combine"}
    dispatch = data["phases"]["dispatch"]
    assert dispatch["bound"] == "nic_out" and dispatch["time_us"] > 0
    assert dispatch["smallest_budget"]["num_sms"] is not None
    assert "once per (token, node)" in data["bytes_definition"]


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "sms.png"
    assert run_cli(["--preset", "h100-cx7", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_recorded_layout(tmp_path: Path) -> None:
    from commkit.routing import synthetic_topk_np

    path = tmp_path / "layout.npy"
    np.save(path, np.stack([synthetic_topk_np(512, 64, 4, seed=s)[0] for s in range(8)]))  # [R, T, K]
    out = tmp_path / "out.json"
    argv = ["--preset", "h100-cx7", "--experts", "64", "--topk", "4", "--tokens", "512"]
    assert run_cli([*argv, "--layout", str(path), "--json", str(out)]) == 0
    assert "8 source rank(s)" in json.loads(out.read_text())["routing"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experts", "96"], "--experts: expected a multiple of the EP size 64"),
        (["--ep-size", "4096"], "exceeds the cluster"),
        (["--num-sms", "500"], "num_sms=500"),
        (["--per-sm", "dispatchh=3"], "unknown per-SM throughput key"),
        (["--topk", "9", "--max-nodes", "1", "--experts", "64"], "--max-nodes"),
        (["--layout", "/nonexistent.npy"], "--layout: no such file"),
    ],
)
def test_errors_name_the_argument(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(argv) == 2
    assert message in capsys.readouterr().err


def test_parse_errors_name_the_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(["--tokens", "-3"])
    assert "argument --tokens: expected a positive integer, got -3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["--role-split", "internode.dispatch"])
    assert "argument --role-split: expected FAMILY.PHASE:ROLE=SHARE" in capsys.readouterr().err
