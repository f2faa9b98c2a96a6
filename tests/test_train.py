"""``python -m commkit train``: expert-parallel training over gloo against dense training in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commkit.__main__ import main
from commkit.train import TrainConfig, compare, train_dense

SMALL = ["--tokens", "32", "--hidden", "64", "--ffn", "32", "--shared", "16", "--experts", "8"]


def test_train_agrees_with_dense(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.json"
    assert main(["train", "--ranks", "2", "--steps", "6", *SMALL, "--json", str(path)]) == 0
    out = capfd.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(steps) == 6 and all("loss" in s and "tokens/s" in s and "load max/mean" in s for s in steps)
    assert ": OK" in out
    verdict = json.loads(path.read_text())
    assert verdict["ok"] and verdict["max_rel_diff"] <= 0.02
    assert verdict["loss_last"] < verdict["loss_first"]
    assert len(verdict["dense_loss"]) == 6


def test_disagreeing_curves_exit_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict, and the command's exit code, when the expert-parallel curve is off."""
    cfg = TrainConfig(ranks=2, steps=3, tokens=16, hidden=64, ffn=16, shared=0, experts=4)
    dense = train_dense(cfg)
    records = [
        dict(step=i, loss=d, seconds=1.0, tokens_per_s=1.0, load_max_over_mean=1.0)
        for i, d in enumerate(dense)
    ]
    assert compare(cfg, records, dense)["ok"]
    records[1] = dict(records[1], loss=dense[1] * 1.05)
    assert not compare(cfg, records, dense)["ok"]

    import commkit.launch

    monkeypatch.setattr(commkit.launch, "spawn_gloo", lambda fn, n, cfg, **kw: [records] * n)
    args = ["train", "--ranks", "2", "--steps", "3", "--tokens", "16", "--hidden", "64", "--ffn", "16"]
    assert main([*args, "--shared", "0", "--experts", "4"]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experts", "6", "--ranks", "4"], "--experts: expected a multiple of --ranks (4), got 6"),
        (["--hidden", "60"], "--hidden: expected a multiple of 8, got 60"),
        (["--fp8", "--hidden", "64"], "--hidden: expected a multiple of 128, got 64"),
        (["--topk", "20"], "--topk: expected at most --experts (16), got 20"),
        (["--ranks-per-node", "3"], "--ranks-per-node: expected a divisor of the 4 ranks"),
    ],
)
def test_bad_options_are_named(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        main(["train", *args])


@pytest.mark.slow
def test_train_on_two_nodes_with_fp8_dispatch(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    args = [
        "--ranks",
        "4",
        "--ranks-per-node",
        "2",
        "--steps",
        "5",
        "--fp8",
        "--tokens",
        "32",
        "--hidden",
        "128",
    ]
    assert main(["train", *args, "--ffn", "32", "--json", str(path)]) == 0
    verdict = json.loads(path.read_text())
    assert verdict["ok"] and verdict["loss_last"] < verdict["loss_first"]
