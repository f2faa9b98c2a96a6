"""CPU: the JIT cache reuses a cubin across processes and rebuilds when a header changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _nvcc import requires_nvcc

from commkit.jit.compiler import (
    KernelSpec,
    cache_key,
    compile_spec,
    generate_source,
    include_root,
    nvcc_path,
    parse_ptxas_log,
)

SPEC = KernelSpec("csrc/cached.cuh", "cached_notify_kernel", (4,))

CHILD = """
import json, sys
from commkit.jit.compiler import KernelSpec, compile_spec
r = compile_spec(KernelSpec("csrc/cached.cuh", "cached_notify_kernel", (4,)))
print(json.dumps({"hit": r.cache_hit, "cubin": str(r.cubin_path), "entries": r.entries}))
"""


def _compile_in_subprocess(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_generated_source_is_a_few_lines() -> None:
    source = generate_source([SPEC])
    assert source.splitlines() == [
        '#include "csrc/cached.cuh"',
        "static void instantiate() {",
        "    (void)reinterpret_cast<const void*>(&commkit::cached_notify_kernel<4>);",
        "}",
    ]


def test_parse_ptxas_log() -> None:
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for _Z1kv
    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 42 registers, used 1 barriers, 1024 bytes smem, 380 bytes cmem[0]
"""
    stats = parse_ptxas_log(log)["_Z1kv"]
    assert (stats.registers, stats.stack_frame_bytes, stats.spill_store_bytes) == (42, 0, 4)
    assert (stats.spill_load_bytes, stats.smem_bytes) == (8, 1024)


@requires_nvcc
def test_cache_key_covers_source_options_and_headers(tmp_path: Path) -> None:
    nvcc = nvcc_path()
    assert nvcc is not None
    root = tmp_path / "root"
    shutil.copytree(include_root() / "ptx", root / "ptx")
    shutil.copytree(include_root() / "csrc", root / "csrc")
    source = generate_source([SPEC])
    base = cache_key(source, ("-O3",), root, nvcc)
    assert cache_key(source, ("-O3",), root, nvcc) == base
    assert cache_key(source + " ", ("-O3",), root, nvcc) != base
    assert cache_key(source, ("-O2",), root, nvcc) != base
    with (root / "ptx" / "ptx.cuh").open("a") as f:
        f.write("\n// edited\n")
    assert cache_key(source, ("-O3",), root, nvcc) != base


@requires_nvcc
def test_cache_hit_across_processes_and_rebuild_on_header_edit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(include_root() / "ptx", root / "ptx")
    shutil.copytree(include_root() / "csrc", root / "csrc")
    env = dict(os.environ, COMMKIT_CACHE_DIR=str(tmp_path / "cache"), COMMKIT_INCLUDE_ROOT=str(root))
    repo = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)

    first = _compile_in_subprocess(env)
    second = _compile_in_subprocess(env)
    assert not first["hit"] and second["hit"]
    assert first["cubin"] == second["cubin"] and Path(first["cubin"]).is_file()
    assert len(first["entries"]) == 1 and "cached_notify_kernel" in first["entries"][0]

    # Edit a header the kernel includes only indirectly (common.cuh via notify.cuh)
    common = root / "csrc" / "common.cuh"
    common.write_text(common.read_text() + "\n// a comment is enough to rebuild\n")
    third = _compile_in_subprocess(env)
    assert not third["hit"] and third["cubin"] != first["cubin"]
    assert Path(first["cubin"]).is_file()  # old entries stay valid for the old headers

    # No temporary build directories are left behind
    leftovers = [p for p in (tmp_path / "cache").rglob(".*") if p.name.startswith((".build-", "."))]
    assert not leftovers, leftovers


@requires_nvcc
def test_compile_error_is_reported(tmp_path: Path) -> None:
    bad = KernelSpec("csrc/dispatch.cuh", "dispatch_kernel", (8, 7168, 8, 7))  # unknown dtype
    with pytest.raises(RuntimeError, match="unknown dtype"):
        compile_spec(bad, cache=tmp_path)
