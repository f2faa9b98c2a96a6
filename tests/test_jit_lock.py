"""CPU: the JIT under concurrency (commkit/jit/compiler.py ``compile_source``): the 8 processes of a
node that miss the same kernel run one compiler (a lock per key, looked at again once held) and every
one of them loads the whole entry; a torn entry left by a killed process is rebuilt, never returned.

A stand-in nvcc (a script that logs each compile, sleeps, writes a cubin and a ptxas report) counts
the compiles exactly; the processes start together from a start file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stand_in_nvcc import compile_log, write_stand_in_nvcc

from commkit.jit import compiler

# Logs its pid; writes the cubin slowly (FAKE_NVCC_SLEEP seconds in all).
STAND_IN_BODY = """
with open(out, "wb") as f:  # written slowly: a reader of a half-written cubin would see it short
    for _ in range(10):
        f.write(b"\\xab" * 4096)
        f.flush()
        time.sleep(float(os.environ.get("FAKE_NVCC_SLEEP", "0.5")) / 10)
sys.stderr.write(
    "ptxas info    : Compiling entry function '_Z4kernv' for 'sm_90'\\n"
    "ptxas info    : Used 32 registers, used 1 barriers, 0 bytes smem\\n"
)
"""

CUBIN_BYTES = 10 * 4096
SOURCE = '#include "csrc/cached.cuh"\n// test_jit_lock\n'

WORKER = """
import json, os, sys, time
from pathlib import Path
from commkit.jit import compiler
start = Path(sys.argv[1])
(start.parent / f"ready.{os.getpid()}").touch()
while not start.exists():
    time.sleep(0.005)
r = compiler.compile_source(sys.argv[2])
print(json.dumps(dict(path=str(r.cubin_path), size=r.cubin_path.stat().st_size, hit=r.cache_hit,
                      entries=r.entries)))
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    nvcc = write_stand_in_nvcc(tmp_path / "nvcc", STAND_IN_BODY, logged="str(os.getpid())")
    log = compile_log(tmp_path, monkeypatch)
    monkeypatch.setenv("COMMKIT_NVCC", str(nvcc))
    monkeypatch.setenv("COMMKIT_CACHE_DIR", str(tmp_path / "cache"))
    compiler.tool_version.cache_clear()
    return log


def _compiles(log: Path) -> int:
    return len(log.read_text().split())


@pytest.mark.slow
def test_eight_processes_run_one_compiler(stand_in: Path, tmp_path: Path) -> None:
    start = tmp_path / "start"
    cmd = [sys.executable, "-c", WORKER, str(start), SOURCE]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(8)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready.*"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)  # every process imported and waits at the start file
    start.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert _compiles(stand_in) == 1, f"{_compiles(stand_in)} compiles for one kernel"
    assert len({r["path"] for r in results}) == 1
    assert all(r["size"] == CUBIN_BYTES and r["entries"] == ["_Z4kernv"] for r in results)
    assert sorted(r["hit"] for r in results) == [False] + [True] * 7
    cache = tmp_path / "cache"
    assert not list(cache.glob(".build-*")) and not list(cache.glob("*/.*.*.*"))  # nothing half-built left


def test_torn_entry_is_rebuilt(stand_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while it moved an entry in leaves a directory without kernel.json: the next
    compile replaces it and returns a whole cubin."""
    monkeypatch.setenv("FAKE_NVCC_SLEEP", "0")
    root = compiler.include_root().resolve()
    key = compiler.cache_key(SOURCE, compiler.DEFAULT_OPTIONS, root, os.environ["COMMKIT_NVCC"])
    torn = Path(os.environ["COMMKIT_CACHE_DIR"]) / key[:2] / key
    torn.mkdir(parents=True)
    (torn / "kernel.cubin").write_bytes(b"\xab" * 100)  # half a cubin, no kernel.json
    result = compiler.compile_source(SOURCE)
    assert not result.cache_hit and _compiles(stand_in) == 1
    assert result.cubin_path == torn / "kernel.cubin"
    assert result.cubin_path.stat().st_size == CUBIN_BYTES
    assert json.loads((torn / "kernel.json").read_text())["entries"] == ["_Z4kernv"]
    again = compiler.compile_source(SOURCE)
    assert again.cache_hit and _compiles(stand_in) == 1
