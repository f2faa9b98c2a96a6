"""Host execution builds: the cache rules of the GPU JIT (commkit/jit/host.py).

A second build is a hit; an edit of any header under ptx/, csrc/ or host/ misses; the compiler's
version is part of the key; processes that build the same kernel at once run one compiler and leave
one whole entry. The compiler is counted through a wrapper (COMMKIT_CXX) that logs each call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from commkit.jit import compiler
from commkit.jit.compiler import KernelSpec
from commkit.jit.host import compile_host, host_unavailable_reason

pytestmark = pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason()))

SPEC = KernelSpec("csrc/cached.cuh", "cached_notify_kernel", (2,))


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the sources, an empty cache and a counting compiler wrapper."""
    root = tmp_path / "root"
    for sub in ("ptx", "csrc", "host"):
        shutil.copytree(compiler.include_root() / sub, root / sub)
    calls = tmp_path / "calls.log"
    wrapper = tmp_path / "cxx"
    real = shutil.which("c++") or shutil.which("g++")
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] || echo x >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("COMMKIT_INCLUDE_ROOT", str(root))
    monkeypatch.setenv("COMMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COMMKIT_CXX", str(wrapper))
    return tmp_path


def _calls(sandbox: Path) -> int:
    log = sandbox / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.slow
def test_hit_miss_on_header_edit(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = compile_host(SPEC)
    assert first.is_file() and _calls(sandbox) == 2  # the runtime object and the kernel
    assert compile_host(SPEC) == first and _calls(sandbox) == 2  # a hit
    with (sandbox / "root" / "csrc" / "common.cuh").open("a") as f:
        f.write("// an edit\n")
    second = compile_host(SPEC)
    assert second != first and _calls(sandbox) == 4  # the runtime's key covers the sources too
    with (sandbox / "root" / "host" / "cuda_shim.h").open("a") as f:
        f.write("// an edit\n")
    third = compile_host(SPEC)
    assert third not in (first, second)
    # Another compiler version: a miss
    other = sandbox / "cxx-other"
    wrapper = sandbox / "cxx"
    other.write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && echo "another build"\nexec {wrapper} "$@"\n')
    other.chmod(0o755)
    monkeypatch.setenv("COMMKIT_CXX", str(other))
    assert compile_host(SPEC) not in (first, second, third)


@pytest.mark.slow
def test_concurrent_processes_run_one_compiler(sandbox: Path) -> None:
    code = (
        "from commkit.jit.host import compile_host\nfrom commkit.jit.compiler import KernelSpec\n"
        "print(compile_host(KernelSpec('csrc/cached.cuh', 'cached_notify_kernel', (2,))))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    paths = {p.communicate(timeout=600)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert _calls(sandbox) == 2  # one runtime object, one kernel: the lock let one process build
    entries = [p for p in (sandbox / "cache" / "host").rglob("entry.json")]
    assert len(entries) == 2
    assert not [p for p in (sandbox / "cache" / "host").rglob(".build-*")]  # no half-built entry left
