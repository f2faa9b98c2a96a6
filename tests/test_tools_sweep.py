"""CPU: the sweep's budget caps, skipped budgets (ConfigError), kernel-event timing of virtual ranks, the
split host/communication timeouts and the int16 payload encoding (fake kernels, ``device="cpu"``)."""

from __future__ import annotations

import argparse
import functools
import json
import types
from pathlib import Path

import pytest
import torch
from virtual_bench import CPU, virtual_spec

import commkit.cli._common as common
import commkit.cli.bench as cli_bench
import commkit.emulate as emulate
from commkit.__main__ import main
from commkit.cli._common import add_run_args
from commkit.cli.tune import default_candidates
from commkit.errors import ConfigError
from commkit.tools import bench as tools_bench
from commkit.tools.bench import BenchSpec, bench_virtual
from commkit.tools.payload import payload_rows, payload_scales
from commkit.tools.ranks import run_virtual
from commkit.tools.rows import split_skipped, summary
from commkit.tools.tune import TuneSpec, tune_virtual


def _spec(**kw: object) -> BenchSpec:
    return virtual_spec(**{"dtypes": ["bf16"], "num_input_sets": 1, "baseline": False, **kw})


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_payload_int16_encoding_is_the_int64_one(dtype: str) -> None:
    """The residues summed in int16 give the same code as the int64 formula, also for token ids whose
    int64 products pass 2**31 (the int64 temporaries were what filled the memory)."""
    src_rank = torch.tensor([0, 7, 3, 1, 5])
    src_token = torch.tensor([0, 4095, 100_000, 2**20, 123_457])
    hidden, salt = 300, 2003
    col = torch.arange(hidden)
    code = (src_rank[:, None] * 7919 + src_token[:, None] * 104729 + col[None, :] * 31 + salt * 613) % 255
    if dtype == "fp8":
        want = ((code % 15 - 7).to(torch.float32) / 4).to(torch.float8_e4m3fn)
    else:
        want = ((code - 127).to(torch.float32) / 32).to(torch.bfloat16)
    got = payload_rows(src_rank, src_token, hidden, dtype, salt)
    assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert payload_scales(src_rank, src_token, 256, salt).shape == (5, 2)


def test_default_budgets_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda _: types.SimpleNamespace(multi_processor_count=132)
    )
    assert common.max_fitting_sms(8) == 16 and common.max_fitting_sms(None) == 132
    assert common.default_budgets(48, 8) == [4, 8, 12, 16]  # tune, 8 virtual ranks on an H100
    assert common.default_budgets(40, 2) == list(range(4, 41, 4))  # overlap
    assert common.default_budgets(48, None) == list(range(4, 49, 4))
    assert common.default_budgets(48, 64) == [2]  # below one step: the cap itself
    assert default_candidates(8) == [4, 8, 12, 16]


def test_budget_that_raises_config_error_is_skipped(
    fake, profiles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tools_bench.measure_backend

    def measure(ctx, buf, sets, shape, dtype, num_sms, spec):
        if num_sms == 3:  # as the residency check does: on every (virtual) rank alike
            raise ConfigError("num_sms: 3 ranks x 3 SMs = 9 blocks must be resident at once")
        return real(ctx, buf, sets, shape, dtype, num_sms, spec)

    monkeypatch.setattr(tools_bench, "measure_backend", measure)
    rows = bench_virtual(3, _spec(num_sms=[2, 3, 1]), device=CPU)
    measured, skipped = split_skipped(rows)
    assert sorted({r.num_sms for r in measured}) == [1, 2]
    assert [(r.num_sms, r.dtype) for r in skipped] == [(3, "bf16")]
    assert "ConfigError" in skipped[0].skipped and "resident at once" in skipped[0].skipped
    assert summary(rows)["total_wrong"] == 0

    # tune: the skipped budget is reported, the choice is made from the others
    result = tune_virtual(3, TuneSpec(bench=_spec(), candidates=[2, 3]), device=CPU)
    assert {r.num_sms_requested for r in result["rows"]} == {2}
    assert [r.num_sms for r in result["skipped"]] == [3]


def test_bench_cli_reports_skipped_budget(
    fake, profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tools_bench.measure_backend

    def measure(ctx, buf, sets, shape, dtype, num_sms, spec):
        if num_sms == 3:
            raise ConfigError("does not fit")
        return real(ctx, buf, sets, shape, dtype, num_sms, spec)

    monkeypatch.setattr(tools_bench, "measure_backend", measure)
    monkeypatch.setattr(cli_bench, "virtual_unavailable", lambda args: None)
    monkeypatch.setattr(
        tools_bench, "bench_virtual", functools.partial(tools_bench.bench_virtual, device=CPU)
    )
    out = tmp_path / "out"
    code = main(["bench", "--virtual", "2", "--shape", "ci-tiny", "--tokens", "13", "--reps", "2",
                 "--warmup", "1", "--input-sets", "1", "--num-sms", "2", "--num-sms", "3", "--out", str(out),
                 "--no-progress", "--no-baseline", "--comm-timeout", "7"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert [r["num_sms"] for r in data["skipped"]] == [3] and "does not fit" in data["skipped"][0]["skipped"]
    assert {r["num_sms"] for r in data["rows"]} == {2}
    assert data["spec"]["comm_timeout_s"] == 7
    out_text = capsys.readouterr().out
    assert "num_sms=3: ConfigError: does not fit" in out_text, out_text[-2000:]


class _FakeEvent:
    def __init__(self, t_ms: float) -> None:
        self.t_ms = t_ms

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.t_ms - self.t_ms


def test_virtual_rows_report_kernel_time(fake, profiles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class WithEvents(emulate.EmulatedGroup):
        @property
        def kernel_events(self):  # what the emulator records around its kernel launches
            return {
                "dispatch": (_FakeEvent(1.0), _FakeEvent(3.5)),
                "combine": (_FakeEvent(0.0), _FakeEvent(1.25)),
            }

        @kernel_events.setter
        def kernel_events(self, value) -> None:
            pass

    monkeypatch.setattr(emulate, "EmulatedGroup", WithEvents)
    rows = bench_virtual(3, _spec(), device=CPU)
    by_op = {r.op: r for r in rows}
    assert by_op["dispatch"].time.median_s == pytest.approx(2.5e-3)
    assert by_op["combine"].time.median_s == pytest.approx(1.25e-3)
    for r in rows:
        assert r.time_source == "kernel" and "kernel_events" in r.time_note
        assert r.time_wall.median_s > 0 and r.wrong == 0


def test_virtual_rows_without_kernel_events_fall_back_to_wall(fake, profiles: Path) -> None:
    """The fake kernels on CPU record no events (None) or an older emulator has no attribute: wall time."""
    for r in bench_virtual(3, _spec(), device=CPU):
        assert r.time_source == "wall" and r.time_note and "time_wall_median_s" not in r.to_dict()
        assert r.time.median_s > 0


def test_timeouts_are_split() -> None:
    parser = argparse.ArgumentParser()
    add_run_args(parser)
    args = parser.parse_args([])
    assert (args.timeout, args.comm_timeout) == (1800.0, 60.0)
    assert parser.parse_args(["--comm-timeout", "5"]).comm_timeout == 5.0


def test_virtual_ranks_get_group_and_comm_timeout(fake) -> None:
    def per_rank(ctx):
        return ctx.group.timeout_s, ctx.group.num_ranks, ctx.make_buffer().config.num_sms is not None

    assert run_virtual(2, per_rank, timeout_s=9.0, host_timeout_s=100.0, device=CPU) == [(9.0, 2, True)] * 2
