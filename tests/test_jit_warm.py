"""CPU: the warm step (commkit/jit/warm.py, ``python -m commkit jit warm``) and cache hits without nvcc.

Most tests run a stand-in nvcc (a script that writes a dummy cubin and a ptxas report, and logs each
compile), so that hits, misses and races are counted exactly and fast; the slow ones use the real nvcc
on a temporary copy of the include root (COMMKIT_INCLUDE_ROOT) and a temporary cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from _nvcc import requires_nvcc
from stand_in_nvcc import compile_log, write_stand_in_nvcc

from commkit.__main__ import main
from commkit.emulate import EmulatedGroup
from commkit.fp8 import cast_to_fp8
from commkit.jit import compiler
from commkit.jit import warm as w
from commkit.jit.compiler import KernelSpec, compile_spec

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = REPO / "tests" / "gpu"
SMALL = [
    KernelSpec("csrc/cached.cuh", "cached_notify_kernel", (2,)),
    KernelSpec("csrc/notify.cuh", "notify_kernel", (2,)),
]

# Logs the source it compiles; sleeps FAKE_NVCC_SLEEP seconds, writes a cubin made of the source.
FAKE_NVCC_BODY = """
time.sleep(float(os.environ.get("FAKE_NVCC_SLEEP", "0.05")))
with open(out, "wb") as f:
    f.write(open(args[-1], "rb").read() * 50)
sys.stderr.write(
    "ptxas info    : Compiling entry function '_Z4kernv' for 'sm_90'\\n"
    "ptxas info    : Function properties for _Z4kernv\\n"
    "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\\n"
    "ptxas info    : Used 32 registers, used 1 barriers, 0 bytes smem\\n"
)
"""


@pytest.fixture
def fake_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A stand-in nvcc of release 13.0 (make(release) gives another one), a log of its compiles, a
    temporary cache and include root."""

    def make(release: str) -> Path:
        return write_stand_in_nvcc(tmp_path / f"nvcc-{release}", FAKE_NVCC_BODY, "args[-1]", release)

    log = compile_log(tmp_path, monkeypatch)
    root = tmp_path / "root"
    for d in compiler.HEADER_DIRS:
        shutil.copytree(compiler.include_root() / d, root / d)
    monkeypatch.setenv("COMMKIT_NVCC", str(make("13.0")))
    monkeypatch.setenv("COMMKIT_INCLUDE_ROOT", str(root))
    monkeypatch.setenv("COMMKIT_CACHE_DIR", str(tmp_path / "cache"))

    class Fake:
        cache = tmp_path / "cache"
        include_root = root

        @staticmethod
        def compiles() -> int:
            return len(log.read_text().splitlines())

        @staticmethod
        def use(release: str) -> None:
            monkeypatch.setenv("COMMKIT_NVCC", str(make(release)))

    return Fake


# ------------------------------------------------------------------ the list of instantiations
def _load(name: str):  # noqa: ANN202
    sys.path.insert(0, str(GPU_TESTS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(GPU_TESTS))


def test_cases_are_read_from_the_gpu_tests() -> None:
    workloads = w.check_workloads()
    by_step: dict[str, list[w.Workload]] = {}
    for wl in workloads:
        by_step.setdefault(wl.step, []).append(wl)
    assert set(by_step) == set(w.STEPS)
    # The parsed cases equal what Python makes of the modules (KCase defaults, (256,) * 8, ...)
    kernels = _load("test_kernels_gpu")
    parsed = {(x.num_ranks, x.hidden, x.num_topk, x.dtype) for x in by_step["gpu_tests"]}
    for case in kernels.CASES:
        assert (case.num_ranks, case.hidden, case.num_topk, case.dtype) in parsed, case
    stress = _load("stress")
    parsed = [(x.num_ranks, x.hidden, x.num_topk, x.dtype) for x in by_step["stress"]]
    assert parsed == [
        (c.num_ranks, c.hidden, c.num_topk, c.dtype) for c in stress.CASES_8 + stress.CASES_SMALL
    ]
    internode = _load("test_internode_gpu")
    nodes = [(x.gpus_per_node, x.num_ranks, x.hidden, x.num_topk, x.dtype) for x in by_step["nodes"]]
    for g, n, _, hidden, topk, _, dtype, _ in internode.CASES:
        assert (g, g * n, hidden, topk, dtype) in nodes
    # run_small.py: its third case runs on 2 virtual nodes of 2 ranks
    assert [x.gpus_per_node for x in by_step["memcheck"]] == [None, None, 2]
    # The headline benchmark: 8 ranks, DeepSeek-V3, bf16 and FP8 input
    assert {(x.num_ranks, x.hidden, x.num_topk, x.dtype) for x in by_step["bench"]} == {
        (8, 7168, 8, "bf16"), (8, 7168, 8, "fp8")
    }  # fmt: skip


def test_a_case_added_to_a_gpu_test_is_warmed(tmp_path: Path) -> None:
    copy = tmp_path / "gpu"
    shutil.copytree(GPU_TESTS, copy)
    before = w.check_specs(["gpu_tests"], copy)
    path = copy / "test_kernels_gpu.py"
    path.write_text(
        path.read_text().replace("CASES = [", "CASES = [\n    KCase((5, 5, 5), hidden=3072, num_topk=3),", 1)
    )
    after = w.check_specs(["gpu_tests"], copy)
    added = set(after) - set(before)
    assert KernelSpec("csrc/dispatch.cuh", "dispatch_kernel", (3, 3072, 3, 0)) in added
    assert KernelSpec("csrc/combine.cuh", "combine_kernel", (3, 3072)) in added


def test_unknown_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="steps: expected some of gpu_tests"):
        w.check_specs(["gpu_tests", "benhc"])
    with pytest.raises(ValueError, match="dtype"):
        w.specs_for(w.Workload("bench", 8, 7168, 8, "fp16"))


def _run_on_fakes(fake, wl: w.Workload) -> set[KernelSpec]:  # noqa: ANN001
    """The specs the engines look up for ``wl`` (a fresh and a cached dispatch, a combine)."""
    fake.compiled.clear()
    r, h, k = wl.num_ranks, wl.hidden, wl.num_topk
    experts = r * max(1, -(-k // r))
    group = EmulatedGroup(r, num_sms=1, device="cpu", num_ranks_per_node=wl.gpus_per_node)
    if wl.gpus_per_node is not None:
        group.engine.set_knobs(
            {"internode_dispatch_forwarder_warps": wl.forwarder_warps[0],
             "internode_combine_forwarder_warps": wl.forwarder_warps[1]}
        )  # fmt: skip
    tokens = 3
    xs = [(torch.randn(tokens, h) * 2).to(torch.bfloat16) for _ in range(r)]
    scales = None
    if wl.dtype == "fp8":
        pairs = [cast_to_fp8(x) for x in xs]
        xs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    idxs = [torch.stack([(torch.arange(k) + t + s) % experts for t in range(tokens)]) for s in range(r)]
    ws = [torch.rand(tokens, k) for _ in range(r)]
    cast = wl.dtype == "cast"
    outs = group.dispatch(xs, idxs, ws, experts, x_scales=scales, cast_to_fp8=cast)
    group.dispatch(xs, idxs, ws, experts, x_scales=scales, cast_to_fp8=cast, handles=[o.handle for o in outs])
    if wl.combine:
        group.combine(
            [torch.ones(o.x.shape[0], h, dtype=torch.bfloat16) for o in outs], [o.handle for o in outs]
        )
    return {
        KernelSpec(header, name, tuple(targs), kw.get("include_dirs", ()), kw.get("defines", ()))
        for header, name, targs, kw in fake.compiled
    }


def test_specs_are_what_the_engines_look_up(fake) -> None:  # noqa: ANN001
    """Every configuration of the check, run on the host code with the launches stubbed: the engines
    ask for exactly the instantiations specs_for names (so the warm fills the keys the check reads)."""
    seen = set()
    for wl in w.check_workloads():
        shape = (
            wl.num_ranks,
            wl.hidden,
            wl.num_topk,
            wl.dtype,
            wl.gpus_per_node,
            wl.forwarder_warps,
            wl.combine,
        )
        if shape in seen:
            continue
        seen.add(shape)
        assert _run_on_fakes(fake, wl) == set(w.specs_for(wl)), wl
    assert len(seen) > 30


# ------------------------------------------------------------------ warm, hits, misses (stand-in nvcc)
def test_second_warm_is_all_hits_and_a_header_edit_misses(fake_nvcc) -> None:  # noqa: ANN001
    first = w.warm(SMALL, fake_nvcc.cache, workers=2)
    assert (first.hits, first.misses, first.failed, fake_nvcc.compiles()) == (0, 2, [], 2)
    second = w.warm(SMALL, fake_nvcc.cache, workers=2)
    assert (second.hits, second.misses, fake_nvcc.compiles()) == (2, 0, 2)
    assert all(w.cached(s, fake_nvcc.cache) for s in SMALL)
    with (fake_nvcc.include_root / "csrc" / "common.cuh").open("a") as f:
        f.write("\n// an edit\n")
    assert not any(w.cached(s, fake_nvcc.cache) for s in SMALL)
    third = w.warm(SMALL, fake_nvcc.cache, workers=2)
    assert (third.hits, third.misses, fake_nvcc.compiles()) == (0, 2, 4)
    manifest = json.loads((fake_nvcc.cache / w.MANIFEST).read_text())
    assert "release 13.0" in manifest["nvcc_version"] and manifest["specs"] == 2


def test_another_nvcc_version_misses(fake_nvcc) -> None:  # noqa: ANN001
    w.warm(SMALL, fake_nvcc.cache, workers=2)
    fake_nvcc.use("13.1")
    report = w.warm(SMALL, fake_nvcc.cache, workers=2)
    assert (report.misses, fake_nvcc.compiles()) == (2, 4)
    assert "release 13.0" in report.nvcc_manifest and "release 13.1" in report.nvcc_here


def test_a_hit_needs_no_nvcc(fake_nvcc, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    warmed = compile_spec(SMALL[0])
    assert not warmed.cache_hit
    monkeypatch.setattr(compiler, "nvcc_path", lambda: None)
    hit = compile_spec(SMALL[0])
    assert hit.cache_hit and hit.cubin_path == warmed.cubin_path and hit.entries == ["_Z4kernv"]
    assert "release 13.0" in hit.nvcc_version
    assert w.cached(SMALL[0], fake_nvcc.cache) and not w.cached(SMALL[1], fake_nvcc.cache)
    with pytest.raises(RuntimeError, match="nvcc not found and no cached build"):
        compile_spec(SMALL[1])
    # A header edit is a miss without nvcc too (the source key covers the headers)
    with (fake_nvcc.include_root / "ptx" / "ptx.cuh").open("a") as f:
        f.write("\n// an edit\n")
    with pytest.raises(RuntimeError, match="no cached build"):
        compile_spec(SMALL[0])


def test_a_hit_without_nvcc_takes_the_newest_build(fake_nvcc, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    older = compile_spec(SMALL[0])
    fake_nvcc.use("13.1")
    newer = compile_spec(SMALL[0])
    assert older.cubin_path != newer.cubin_path
    os.utime(older.cubin_path.parent / "kernel.json", (1, 1))
    monkeypatch.setattr(compiler, "nvcc_path", lambda: None)
    hit = compile_spec(SMALL[0])
    assert hit.cubin_path == newer.cubin_path and "release 13.1" in hit.nvcc_version


def test_an_old_entry_gets_its_source_key_on_a_hit(fake_nvcc, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    compile_spec(SMALL[0])
    shutil.rmtree(fake_nvcc.cache / compiler.SOURCE_INDEX)  # as an entry written before the index existed
    assert compile_spec(SMALL[0]).cache_hit
    monkeypatch.setattr(compiler, "nvcc_path", lambda: None)
    assert compile_spec(SMALL[0]).cache_hit


def _entries_whole(cache: Path) -> list[Path]:
    entries = [p.parent for p in cache.glob("??/*/kernel.json")]
    for entry in entries:
        assert sorted(p.name for p in entry.iterdir()) == ["kernel.cu", "kernel.cubin", "kernel.json"]
        assert (entry / "kernel.cubin").read_bytes() == (entry / "kernel.cu").read_bytes() * 50
        json.loads((entry / "kernel.json").read_text())
    stray = [p for p in cache.rglob(".*") if p.name != w.MANIFEST]
    assert not stray, stray
    return entries


@pytest.mark.slow
def test_parallel_workers_do_not_tear_entries(fake_nvcc, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Threads of one process and several processes compile the same instantiations at once: every
    caller gets a whole entry, one per key, and nothing half-made is left."""
    monkeypatch.setenv("FAKE_NVCC_SLEEP", "0.3")  # widen the window
    script = (
        "import sys; from commkit.jit import warm as w; from commkit.jit.compiler import KernelSpec\n"
        "specs = [KernelSpec('csrc/cached.cuh', 'cached_notify_kernel', (2,)),"
        " KernelSpec('csrc/notify.cuh', 'notify_kernel', (2,))]\n"
        "r = w.warm(specs, w.compiler.cache_dir(), workers=2); sys.exit(1 if r.failed else 0)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy()) for _ in range(3)]
    results, errors = [], []

    def same_spec() -> None:
        try:
            results.append(compile_spec(SMALL[0]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=same_spec) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert not errors, errors
    assert len({r.cubin_path for r in results}) == 1 and all(r.entries == ["_Z4kernv"] for r in results)
    assert len(_entries_whole(fake_nvcc.cache)) == 2
    assert all(w.cached(s, fake_nvcc.cache) for s in SMALL)


# ------------------------------------------------------------------ the command
class _Run:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # noqa: ANN201
    """``python -m commkit jit ARGS`` in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> _Run:
        capsys.readouterr()
        try:
            rc = main(["jit", *args])
        except SystemExit as exc:
            rc = int(exc.code or 0)
        out = capsys.readouterr()
        return _Run(rc, out.out, out.err)

    return run


def test_cli_dry_run_lists_what_is_cached(fake_nvcc, cli) -> None:  # noqa: ANN001
    w.warm([KernelSpec("csrc/layout.cuh", "layout_kernel", (8, 8))], fake_nvcc.cache, workers=1)
    out = cli("warm", "--dry-run", "--steps", "bench", "--out", str(fake_nvcc.cache))
    assert out.returncode == 0, out.stderr
    assert "jit: step bench: 6 instantiations, 1 cached, 5 to compile" in out.stdout
    assert "cached commkit::layout_kernel<8, 8>" in " ".join(out.stdout.split())
    assert "MISS   commkit::dispatch_kernel<8, 7168, 8, 1>" in out.stdout
    assert "release 13.0" in out.stdout
    assert fake_nvcc.compiles() == 1  # a dry run compiles nothing


def test_cli_warm_compiles_the_misses(fake_nvcc, cli) -> None:  # noqa: ANN001
    out = cli("warm", "--steps", "overlap", "--out", str(fake_nvcc.cache), "--workers", "2")
    assert out.returncode == 0, out.stderr
    assert "jit: 0 hits, 5 compiled, 0 failed" in out.stdout
    again = cli("warm", "--steps", "overlap", "--out", str(fake_nvcc.cache), "--quiet")
    assert "jit: 5 hits, 0 compiled, 0 failed" in again.stdout
    assert "nvcc of the cache's last warm: Cuda compilation tools, release 13.0" in again.stdout
    assert fake_nvcc.compiles() == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["warm", "--steps", "bench,nope"], "--steps: expected a comma-separated list of gpu_tests"),
        (["warm", "--workers", "0"], "--workers: expected a positive number, got 0"),
        (["warm", "--gpu-tests", "/nonexistent"], "--gpu-tests: /nonexistent is not a directory"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_cli_bad_arguments(args: list[str], message: str, cli) -> None:  # noqa: ANN001
    out = cli(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_cli_out_must_be_a_directory(tmp_path: Path, cli) -> None:  # noqa: ANN001
    (tmp_path / "file").write_text("")
    out = cli("warm", "--out", str(tmp_path / "file"), "--dry-run")
    assert out.returncode == 2 and "exists and is not a directory" in out.stderr


# ------------------------------------------------------------------ the real nvcc
@requires_nvcc
@pytest.mark.slow
def test_real_nvcc_warm_hits_and_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    for d in compiler.HEADER_DIRS:
        shutil.copytree(compiler.include_root() / d, root / d)
    monkeypatch.setenv("COMMKIT_INCLUDE_ROOT", str(root))
    cache = tmp_path / "cache"
    first = w.warm(SMALL, cache, workers=2)
    assert (first.misses, first.failed) == (2, [])
    second = w.warm(SMALL, cache, workers=2)
    assert second.hits == 2
    monkeypatch.setattr(compiler, "nvcc_path", lambda: None)
    assert compile_spec(SMALL[0], cache=cache).cache_hit  # no nvcc: found by its source key
    monkeypatch.undo()
    monkeypatch.setenv("COMMKIT_INCLUDE_ROOT", str(root))
    with (root / "csrc" / "common.cuh").open("a") as f:
        f.write("\n// an edit\n")
    third = w.warm(SMALL, cache, workers=2)
    assert (third.hits, third.misses) == (0, 2)
