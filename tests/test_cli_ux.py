"""What a new user meets on the command line (issue 16): the parser answers without importing the
commands (and, with a lazy package, without torch), --version, each default said once, user mistakes
caught in one line before any rank starts, the nccl-tests-style bench table (120 columns, algbw/busbw
defined, data printed as text), the token sweep, the real link, --num-sms on the torch backend warned
once, plots that say what they show, results that say what produced them and where they went,
group-readable profiles, caches under the platform's user cache directory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import time
from importlib.metadata import version as dist_version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import commkit
from commkit.__main__ import COMMANDS, command_of, main, summary
from commkit.cli import _common
from commkit.cli import bench as bench_cli
from commkit.tools import report
from commkit.tools.rows import BenchRow
from commkit.tools.timing import TimeStats

REPO = Path(__file__).resolve().parents[1]
LIST_COMMANDS = ["demo", "bench", "overlap", "tune", "monitor", "info", "model"]


def _run(*code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, timeout=120, cwd=REPO)


# --------------------------------------------------------------------------------------- parser
def test_top_level_help_imports_no_command() -> None:
    """``python -m commkit --help`` lists every command from its docstring without importing any."""
    out = _run(
        "-c",
        "import sys\nfrom commkit.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED', sorted(m for m in sys.modules\n"
        "    if m.startswith(('commkit.cli.', 'commkit.tools'))))",
    )
    assert out.returncode == 0, out.stderr
    assert "IMPORTED []" in out.stdout
    for name in LIST_COMMANDS:
        assert re.search(rf"^\s+{name}\s+\S", out.stdout, re.M), name
    assert "dispatch/combine bandwidth, nccl-tests style" in out.stdout


@pytest.mark.parametrize("command", ["bench", "tune", "overlap", "monitor", "jit", "info", "model"])
def test_command_help_does_not_import_torch(command: str) -> None:
    """A command's parser is built without torch (commkit/cli/__init__.py)."""
    out = _run(
        "-c",
        "import sys\nfrom commkit.__main__ import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)",
    )
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout, out.stdout[-300:]


def test_help_does_not_import_torch() -> None:
    out = _run("-X", "importtime", "-m", "commkit", "--help")
    assert out.returncode == 0
    # NOTE: no timing here (the machines are noisy); without torch --help takes ~0.1 s instead of ~2 s
    assert not re.search(r"\|\s+torch$", out.stderr, re.M), "python -m commkit --help imported torch"


def test_a_command_whose_module_is_missing_does_not_break_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """COMMANDS stays a name -> module dict: an entry whose module is not there yet (another engineer's
    ``train``) still lists, and the other commands run."""
    monkeypatch.setitem(COMMANDS, "notyet", "commkit.cli.notyet")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "notyet" in capsys.readouterr().out
    assert summary("commkit.cli.notyet") == ""
    assert summary("commkit.cli.tune").startswith("sweep the SM budget")
    assert command_of(["--version"]) is None and command_of(["bench", "--ranks", "2"]) == "bench"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"commkit {dist_version('commkit')}"
    assert commkit.__version__ == dist_version("commkit") == report.commkit_version()
    # the version is written once, in pyproject.toml
    assert not re.search(r"__version__\s*=\s*['\"]", (REPO / "commkit" / "__init__.py").read_text())


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[c] for c in LIST_COMMANDS] + [["jit", "warm"]])
def test_help_says_each_default_once(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(argv, capsys)
    assert "(default: None)" not in text and "(default: False)" not in text
    # one entry per option: from its "  -x/--xx" line to the next one
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for entry in entries:
        assert len(re.findall(r"\(default", entry)) <= 1, entry


def test_formatter_appends_a_default_only_where_it_says_something() -> None:
    import argparse

    parser = argparse.ArgumentParser(formatter_class=_common.HelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions")
    parser.add_argument("--named", type=int, default=3, help="widgets (default 3)")
    parser.add_argument("--none", type=int, help="nothing")
    parser.add_argument("--flag", action="store_true", help="a flag")
    text = parser.format_help()
    assert "timed repetitions (default: 20)" in text
    assert "widgets (default 3)" in text and "(default: 3)" not in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_overlap_help_offers_no_cpu_mode(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["overlap"], capsys)
    assert "--ranks " not in text and "gloo" not in text
    assert "--input-sets" not in text and "--skew" not in text  # options overlap does not use
    assert "no CPU mode" in text and "--virtual" in text and "torchrun" in text


# --------------------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--ranks", "3"], "8 experts, which do not split evenly over 3 ranks"),
        (["bench", "--ranks", "0"], "--ranks: expected >= 1"),
        (["bench", "--ranks", "4", "--ranks-per-node", "3"], "--ranks-per-node: expected a divisor"),
        (["bench", "--reps", "0"], "--reps: expected >= 1"),
        (["bench", "--tokens", "0"], "--tokens: expected >= 1"),
        (["bench", "--num-sms", "0"], "--num-sms: expected budgets >= 1"),
        (["bench", "-b", "64", "-e", "16"], "--min-tokens <= --max-tokens"),
        (["bench", "-b", "4", "-e", "16", "-f", "1"], "--step-factor"),
        (["bench", "--tokens", "8", "-b", "16"], "not both"),
        (["bench", "-e", "16"], "needs -b"),
        (["tune", "--ranks", "3"], "do not split evenly over 3 ranks"),
        (["tune", "--ranks", "0"], "--ranks: expected >= 1"),
    ],
)
def test_mistakes_are_one_line_before_any_rank(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import commkit.launch

    def no_spawn(*_: Any, **__: Any) -> None:
        raise AssertionError("ranks were spawned")

    monkeypatch.setattr(commkit.launch, "spawn_gloo", no_spawn)
    monkeypatch.delenv("RANK", raising=False)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""  # nothing announced, nothing written


def test_torchrun_world_size_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = SimpleNamespace(ranks=2, virtual=None, ranks_per_node=None)
    why = _common.run_args_problem(args, [commkit_shape("ci-tiny")])
    assert why is not None and why.startswith("the torchrun world size 3")


def commkit_shape(name: str):
    from commkit.tools.shapes import get_shape

    return get_shape(name)


# --------------------------------------------------------------------------------------- table
def test_tokens_sweep() -> None:
    assert _common.tokens_sweep(16, 64, 2) == [16, 32, 64]
    assert _common.tokens_sweep(16, 100, 2) == [16, 32, 64]
    assert _common.tokens_sweep(5, 5, 2) == [5]
    assert _common.tokens_sweep(1, 3, 1.1) == [1, 2, 3]  # whole tokens, strictly increasing
    with pytest.raises(ValueError):
        _common.tokens_sweep(0, 4, 2)
    with pytest.raises(ValueError):
        _common.tokens_sweep(4, 8, 1.0)


def test_significant_digits() -> None:
    assert report.sig(0.0227345) == "0.02273"  # a CPU row's GB/s, not 0.00
    assert report.sig(45.6) == "45.60"
    assert report.sig(2273.31) == "2273"
    assert report.sig(4546.789) == "4547"
    assert report.sig(123456.7) == "123457"
    assert report.sig(1.5e-9) == "1.500e-09"
    assert report.sig(None) == "n/a" and report.sig(7) == "7" and report.sig("x") == "x"


def test_data_is_printed_as_text_not_markup() -> None:
    from rich.console import Console

    name = "deepseek-v3[num_tokens=128]"
    lines = report.plain_table(["shape", "x"], [[name, 1.0]], left=["shape"])
    assert name in lines[1]
    console = Console(record=True, width=200)
    report.print_table(f"t [bold]{name}", ["shape"], [[name]], console=console)
    text = console.export_text()
    assert name in text and "[bold]" in text


def _row(**changes: Any) -> BenchRow:
    row = BenchRow(
        shape="qwen3-235b-a22b[num_tokens=4096]", op="dispatch", backend="kernels", ranks=64,
        nodes=8, virtual=False, tokens=4096, hidden=4096, experts=128, topk=8, dtype="fp8", num_sms=24,
        num_sms_source="argument", num_sms_requested=24, knobs={},
        nvl_bytes=987654321.0, rdma_bytes=876543210.0, rdma_bytes_flat=1e9, rdma_saved=1.23,
        bytes_counted="rdma", bus_bytes=876543210.0,
        time=TimeStats(median_s=0.0123456, min_s=0.012, max_s=0.0131, reps=20),
        time_source="wall", algbw_gbps=80.01, busbw_gbps=71.0, gbps=71.0, link="nvlink-domain",
        wrong=123456, vs_torch=12.3456, vs_roofline=0.87654, roofline_gbps=91.3,
    )  # fmt: skip
    return dataclasses.replace(row, **changes)


def test_bench_table_fits_120_columns_with_wide_rows() -> None:
    rows = [_row(), _row(op="combine", dtype="bf16", num_sms=None, link="gloo")]
    lines = report.plain_table(
        bench_cli.COLUMNS, [bench_cli.table_row(r, bench_cli.COLUMNS) for r in rows], left=bench_cli.LEFT,
        units=bench_cli.UNITS,
    )  # fmt: skip
    foot = {
        "total_wrong": 1, "avg_algbw": 1.0, "avg_busbw": 0.5, "avg_vs_torch": None, "avg_vs_roofline": 0.5,
        "worst": rows[0], "worst_by": "gbps",
    }  # fmt: skip
    lines += bench_cli.footer_lines(rows, foot)
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    head, units = lines[0], lines[1]
    for col in ("shape", "tokens", "size", "time", "algbw", "busbw", "#wrong", "vs_torch", "vs_roof", "link"):
        assert col in head.split()
    assert "(us)" in units and "(GB/s)" in units
    assert "qwen3-235b-a22b " in lines[2] and "[num_tokens" not in lines[2]  # the tokens column says it
    assert "nvlink-domain" in lines[2] and "gloo" in lines[3] and " - " in lines[3]  # no SM budget
    assert "12346" in lines[2]  # time in us, enough digits
    text = " ".join(lines)
    assert "algbw =" in text and "busbw =" in text


def test_real_link_names() -> None:
    from commkit.tools.bench import real_link

    cpu, cuda = SimpleNamespace(type="cpu"), SimpleNamespace(type="cuda")
    torch_buf = SimpleNamespace(backend="torch", num_ranks=4, num_ranks_per_node=4)
    kernels = SimpleNamespace(backend="kernels", num_ranks=8, num_ranks_per_node=4, internode_transport="gin")
    one_node = SimpleNamespace(backend="kernels", num_ranks=8, num_ranks_per_node=8)
    assert real_link(SimpleNamespace(virtual=False), torch_buf, cpu) == "gloo"  # not nvl
    assert real_link(SimpleNamespace(virtual=True), kernels, cuda) == "hbm"
    assert real_link(SimpleNamespace(virtual=False), torch_buf, cuda) == "nccl"
    assert real_link(SimpleNamespace(virtual=False), kernels, cuda) == "rdma"
    assert real_link(SimpleNamespace(virtual=False), one_node, cuda) == "nvlink"


# --------------------------------------------------------------------------------------- plots
def _captured_figure(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    plt = report.load_pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def test_bench_plot_has_a_legend_and_draws_what_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _captured_figure(monkeypatch)
    rows = [
        _row(op=op, num_sms=None, backend="torch", roofline_gbps=None, shape=f"s{i}")
        for i in range(8)
        for op in ("dispatch", "combine")
    ]
    assert bench_cli.plot_bench(rows, tmp_path / "a.png") is None
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dispatch", "combine"]
    assert "roofline" not in ax.get_title()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 16 and not any("None" in label for label in labels)
    # labels on the y axis, one bar height apart: they cannot overlap however many rows there are
    assert figures[-1].get_size_inches()[1] >= 0.4 * 16
    bench_cli.plot_bench([_row()], tmp_path / "b.png")
    legend = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert legend == ["dispatch", "copy roofline"]


def test_token_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _captured_figure(monkeypatch)
    rows = [_row(tokens=t, shape=f"deepseek-v3[num_tokens={t}]", algbw_gbps=t / 10) for t in (128, 256, 512)]
    assert bench_cli.plot_tokens(rows, tmp_path / "t.png") is None
    ax = figures[-1].axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [128, 256, 512] and "tokens" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["deepseek-v3 dispatch fp8 sms 24"]


def test_monitor_plot_without_counters_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from commkit.tools.monitor import MonitorReport, plot_report

    figures = _captured_figure(monkeypatch)
    rep = MonitorReport([0.0, 0.1], {}, [], [("nvlink", "NVML is not available")])
    assert plot_report(rep, tmp_path / "m.png") is None
    texts = " ".join(t.get_text() for t in figures[-1].axes[0].texts)
    assert "no readable counter" in texts and "NVML is not available" in texts


# --------------------------------------------------------------------------------------- results
def test_default_results_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    when = time.mktime((2025, 1, 2, 3, 4, 5, 0, 0, -1))
    assert (
        _common.default_out_dir("bench", when)
        == tmp_path.resolve() / "commkit-results" / "bench-20250102-030405"
    )
    assert _common.results_dir("x/y", "bench") == (tmp_path / "x" / "y").resolve()
    assert not (tmp_path / "commkit-results").exists()  # named, not created, until results are written


def test_run_metadata_says_what_produced_it() -> None:
    meta = report.run_metadata(time.time() - 1, command="python -m commkit bench --ranks 2")
    assert meta["commkit"] == dist_version("commkit")
    assert meta["command"] == "python -m commkit bench --ranks 2"
    assert meta["device"].startswith(("cpu (", "NVIDIA")) and meta["torch"] and meta["seconds"] >= 1
    assert meta["commit"] == report.git_commit()
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", meta["commit"] or "")
    assert report.command_line(["bench", "--shape", "a b"]) == "python -m commkit bench --shape 'a b'"
    assert report.command_line(SimpleNamespace(argv=["tune"])) == "python -m commkit tune"


def test_installed_commit_comes_from_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a checkout (a wheel install) the commit is the one setup.py wrote at build time."""
    monkeypatch.setattr(report, "git_commit_of", lambda _: None)
    fake = tmp_path / "commkit" / "tools" / "report.py"
    fake.parent.mkdir(parents=True)
    monkeypatch.setattr(report, "__file__", str(fake))
    assert report.git_commit() is None
    (tmp_path / "commkit" / report.BUILD_COMMIT_FILE).write_text("abc123\n")
    assert report.git_commit() == "abc123"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_profiles_are_written_like_any_user_file(tmp_path: Path, umask: int, mode: int) -> None:
    from commkit.profiles import ClusterSignature, Profile, find_profile, save_profile

    sig = ClusterSignature("cpu", 0, 2, 2, 0.0, 0.0)
    old = os.umask(umask)
    try:
        path = save_profile(Profile(sig, "kernels", 8, "fastest", "test"), tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode  # group-readable, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    assert find_profile(sig, backend="kernels", directory=tmp_path)[0][0] == path


def test_caches_follow_the_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from commkit.jit import compiler
    from commkit.profiles import profile_dir

    if sys.platform != "linux":
        pytest.skip("checks the XDG layout")
    monkeypatch.delenv("COMMKIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("COMMKIT_PROFILE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiler.cache_dir() == tmp_path / "xdg" / "commkit"
    assert profile_dir() == tmp_path / "xdg" / "commkit" / "profiles"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compiler.cache_dir() == Path.home() / ".cache" / "commkit"
    monkeypatch.setenv("COMMKIT_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("COMMKIT_PROFILE_DIR", str(tmp_path / "p"))
    assert compiler.cache_dir() == tmp_path / "c" and profile_dir() == tmp_path / "p"


def test_packaging_metadata() -> None:
    tomllib = pytest.importorskip("tomllib")

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert any(c == "License :: OSI Approved :: MIT License" for c in project["classifiers"])
    assert {"Homepage", "Repository", "Issues"} <= set(project["urls"])
    assert any(d.startswith("platformdirs") for d in project["dependencies"])


# --------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bench_sweep_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 gloo ranks, a token sweep, two SM budgets on the torch backend: the first line names the results
    folder, one warning, one row per size and op (not per budget), every line within 120 columns, the
    rows name gloo, the JSON says what produced it, the token plot is written."""
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "--ranks", "2", "-b", "8", "-e", "16", "--num-sms", "4", "--num-sms", "8",
                 "--reps", "2", "--warmup", "0", "--input-sets", "1", "--no-progress",
                 "--backend", "torch"])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    (folder,) = (tmp_path / "commkit-results").iterdir()
    assert lines[0] == f"commkit bench: results go to {folder} (bench.json, bench.tsv, bench.png)"
    # every line but the two that name the folder (a path is as long as it is)
    assert max(len(line) for line in lines if str(folder) not in line) <= 120, lines
    assert lines[-1].startswith("wrote bench.json, bench.tsv, bench.png")
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--num-sms ignored" in warnings[0]
    rows = [line for line in lines if line.startswith("  ci-tiny")]
    assert len(rows) == 4 and all(" gloo " in r for r in rows)
    assert [int(r.split()[4]) for r in rows] == [8, 8, 16, 16]
    data = json.loads((folder / "bench.json").read_text())
    assert [(r["tokens"], r["op"]) for r in data["rows"]] == [
        (8, "dispatch"), (8, "combine"), (16, "dispatch"), (16, "combine")
    ]  # fmt: skip
    meta = data["meta"]
    assert meta["commkit"] == dist_version("commkit") and meta["device"] and meta["torch"]
    assert meta["command"].startswith("python -m commkit bench --ranks 2 -b 8 -e 16 --num-sms 4")
    if report.load_pyplot() is not None:
        assert (folder / "bench_tokens.png").is_file() and (folder / "bench.png").is_file()
