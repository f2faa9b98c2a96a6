"""CPU: bench/gpu_check.sh (step selection, budgets and deadlines through --dry-run and a stand-in
command, argument handling) and bench/collect_results.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["env", "jit", "tests_kernels", "tests_backend", "tests_count", "tests_fabric", "nodes", "bench",
         "overlap", "memcheck", "stress"]  # fmt: skip
ROW = re.compile(r"^(\w+)\s+(\d+|-)\s+(\d+|-)\s+(\d+|-)\s+(.*)$")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=timeout
    )


def plan(out: str) -> dict[str, tuple[str, str, str, str]]:
    """step -> (budget, start, predicted, why) from the dry run's table."""
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if m and m.group(1) in STEPS:
            rows[m.group(1)] = m.group(2, 3, 4, 5)
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    cache = tmp_path_factory.mktemp("cache")
    return run("--dry-run", env={"COMMKIT_CACHE_DIR": str(cache)})


def test_dry_run_lists_every_step_in_order_within_the_deadline(dry_run: subprocess.CompletedProcess) -> None:
    assert dry_run.returncode == 0, dry_run.stderr
    rows = plan(dry_run.stdout)
    assert list(rows) == STEPS
    starts = [int(rows[s][1]) for s in STEPS]
    budgets = [int(rows[s][0]) for s in STEPS]
    assert starts == [sum(budgets[:i]) for i in range(len(STEPS))]  # one after the other
    assert sum(budgets) <= 465 < 480  # under 8 minutes, stress included
    assert int(rows["stress"][0]) >= 30  # stress still gets a useful slice
    assert all(int(rows[s][2]) <= int(rows[s][0]) for s in STEPS)  # predictions fit their budgets
    assert "total: " in dry_run.stdout and "of the 465 s deadline" in dry_run.stdout


def test_dry_run_lists_the_instantiations_and_their_cache_state(dry_run: subprocess.CompletedProcess) -> None:
    out = dry_run.stdout
    assert "--steps gpu_tests,nodes,bench,overlap,memcheck,stress" in out
    assert re.search(r"jit: \d+ distinct instantiations, 0 cached in .*, \d+ to compile", out)
    assert "MISS   commkit::dispatch_kernel<8, 7168, 8, 1>" in out  # the FP8 headline
    assert "tests/gpu/test_kernels_gpu.py" in out and "--virtual 8 --shape deepseek-v3" in out


@pytest.mark.slow
def test_only_and_skip_select_steps() -> None:
    out = run("--dry-run", "--only", "gpu_tests,bench")
    assert out.returncode == 0, out.stderr
    rows = plan(out.stdout)
    selected = [s for s in STEPS if rows[s][0] != "-"]
    assert selected == ["tests_kernels", "tests_backend", "tests_count", "tests_fabric", "bench"]
    assert "--steps gpu_tests,bench" in out.stdout
    out = run("--dry-run", "--skip", "stress,memcheck,env")
    rows = plan(out.stdout)
    assert [s for s in STEPS if rows[s][0] == "-"] == ["env", "memcheck", "stress"]


def test_a_short_deadline_skips_the_last_steps() -> None:
    out = run("--dry-run", "--deadline", "200", "--only", "tests_kernels,nodes,bench,stress")
    assert out.returncode == 0, out.stderr
    rows = plan(out.stdout)
    assert rows["tests_kernels"][0] == "95" and rows["nodes"][0] == "75"
    assert rows["bench"][0] == "30"  # capped at what is left
    assert rows["stress"][0] == "0" and "SKIPPED: no time" in rows["stress"][3]


def test_budget_override() -> None:
    out = run("--dry-run", "--only", "bench", env={"BUDGET_bench": "90"})
    assert plan(out.stdout)["bench"][0] == "90"
    bad = run("--dry-run", env={"BUDGET_bench": "ninety"})
    assert bad.returncode == 2 and "BUDGET_bench: expected whole seconds" in bad.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--only", "bench,tests"], "unknown step 'tests'"),
        (["--skip"], "--skip needs a value"),
        (["--deadline", "abc"], "--deadline: expected whole seconds, got 'abc'"),
        (["--deadline", "900"], "--deadline: expected 30 to 570 seconds"),
        (["--only", "env", "--skip", "env"], "no step selected"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    out = run("--dry-run", *args)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr and "usage:" in out.stderr


def test_help() -> None:
    out = run("--help")
    assert out.returncode == 0 and "--dry-run" in out.stdout


def test_dry_run_from_the_environment() -> None:
    out = run("--only", "bench", env={"DRY_RUN": "1"})
    assert out.returncode == 0 and "gpu_check dry run" in out.stdout


@pytest.mark.slow
def test_a_step_is_stopped_at_its_deadline_and_the_next_still_runs(tmp_path: Path) -> None:
    """A stand-in command that sleeps past its budget: the step is killed at the budget, recorded as a
    TIMEOUT, and the next step runs; at most 8 files come out, no folders."""
    out_dir = tmp_path / "out"
    started = time.monotonic()
    out = run(
        "--only", "bench,overlap", "--out", str(out_dir),
        env={"GPU_CHECK_TEST_CMD": "echo started; sleep 30", "BUDGET_bench": "2", "BUDGET_overlap": "1",
             "MIN_STEP": "1", "COMMKIT_CACHE_DIR": str(tmp_path / "cache")},
        timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert took < 20, took
    assert out.returncode == 2, out.stdout + out.stderr  # two failed steps
    summary = (out_dir / "summary.txt").read_text()
    assert re.search(r"^bench: TIMEOUT after 2 s", summary, re.M), summary
    assert re.search(r"^overlap: TIMEOUT after 1 s", summary, re.M), summary
    assert "failed steps: 2" in summary
    log = (out_dir / "log.txt").read_text()
    assert log.count("=== ") == 2 and "started" in log
    files = list(out_dir.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files)


def test_a_passing_step_and_a_failing_one(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    script = 'if [ "$LIMIT" = 7 ]; then echo "3 passed in 0.1s"; else echo boom; exit 4; fi'
    out = run(
        "--only", "tests_fabric,tests_count", "--out", str(out_dir),
        env={"GPU_CHECK_TEST_CMD": script, "BUDGET_tests_fabric": "7", "BUDGET_tests_count": "9",
             "MIN_STEP": "1", "COMMKIT_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    summary = (out_dir / "summary.txt").read_text()
    assert re.search(r"^tests_count: FAIL rc=4 .* boom$", summary, re.M), summary
    assert re.search(r"^tests_fabric: PASS .*3 passed in 0.1s$", summary, re.M), summary
    assert out.returncode == 1


# ------------------------------------------------------------------ collect_results.py
sys.path.insert(0, str(REPO / "bench"))
import collect_results  # noqa: E402

ENV_TXT = """date: 2030-01-02T03:04:05Z
commit: 0123456789abcdef0123456789abcdef01234567 (the JIT cache manifest)
gpu: NVIDIA H200
driver: 580.65.06
nvcc: Cuda compilation tools, release 13.0, V13.0.88
sms: 132
torch: 2.11.0+cu130 cuda 13.0
"""


def _out_dir(tmp_path: Path, env_txt: str = ENV_TXT) -> Path:
    out = tmp_path / "gpu_out"
    out.mkdir()
    (out / "env.txt").write_text(env_txt)
    (out / "summary.txt").write_text("env: PASS (5 s of 12 s)\nfailed steps: 0 (wall 400 s)\n")
    rows = [{"shape": "deepseek-v3", "op": "dispatch", "ranks": 8, "nodes": 1, "dtype": "bf16", "num_sms": 16,
             "time_median_s": 0.002, "gbps": 150.0, "vs_roofline": 0.61, "vs_d2d": 0.4, "vs_torch": 3.2,
             "wrong": 0}]  # fmt: skip
    skipped = [{"shape": "deepseek-v3", "ranks": 8, "dtype": "bf16", "num_sms": 24, "skipped": "ConfigError"}]
    (out / "bench.json").write_text(json.dumps({"rows": rows, "skipped": skipped}))
    return out


def test_collect_makes_the_dated_device_folder(tmp_path: Path) -> None:
    target = collect_results.collect(_out_dir(tmp_path), tmp_path / "results")
    assert target.name == "2030-01-02-nvidia-h200"
    meta = json.loads((target / "meta.json").read_text())
    assert (meta["device"], meta["driver"], meta["commit"]) == (
        "NVIDIA H200", "580.65.06", "0123456789abcdef0123456789abcdef01234567"
    )  # fmt: skip
    assert meta["summary"][-1].startswith("failed steps: 0")
    table = (target / "table.md").read_text()
    assert "| deepseek-v3 | dispatch | 8 | 1 | bf16 | 16 | 2.000 | 150 | 0.61 | 0.40 | 3.20 | 0 |" in table
    assert "| deepseek-v3 | skipped |" in table
    assert sorted(p.name for p in target.iterdir()) == ["bench.json", "env.txt", "meta.json", "summary.txt",
                                                         "table.md"]  # fmt: skip
    with pytest.raises(collect_results.CollectError, match="exists"):
        collect_results.collect(tmp_path / "gpu_out", tmp_path / "results")


@pytest.mark.parametrize(
    ("env_txt", "message"),
    [
        (ENV_TXT.replace("driver: 580.65.06\n", ""), "missing or unknown: driver"),
        (ENV_TXT.replace("commit: 0123", "commit: unknown (no .git) 0123"), "missing or unknown: commit"),
        (ENV_TXT.replace("gpu: NVIDIA H200", "gpu: NVIDIA-SMI has failed"), "missing or unknown: gpu"),
    ],
)
def test_collect_needs_device_driver_and_commit(tmp_path: Path, env_txt: str, message: str) -> None:
    with pytest.raises(collect_results.CollectError, match=message):
        collect_results.collect(_out_dir(tmp_path, env_txt), tmp_path / "results")


def test_collect_command_line(tmp_path: Path) -> None:
    script = str(REPO / "bench" / "collect_results.py")
    ok = subprocess.run([sys.executable, script, str(_out_dir(tmp_path)), "--dest", str(tmp_path / "r")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip().endswith("2030-01-02-nvidia-h200")
    bad = subprocess.run([sys.executable, script, str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
