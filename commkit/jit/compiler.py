"""Generate a few-line source that instantiates a kernel template, compile it with nvcc, cache the cubin.

The kernels are header templates under ``csrc/`` (+ ``ptx/``); compile-time values (ranks, hidden,
top-k, dtype) are template arguments. For one instantiation this module writes::

    #include "csrc/dispatch.cuh"
    static void instantiate() {
        (void)reinterpret_cast<const void*>(&commkit::dispatch_kernel<8, 7168, 8, 0>);
    }

compiles it with ``nvcc -cubin -arch=sm_90 -Xptxas -v`` and keeps the cubin and the ptxas report in
the cache. The cache key is the sha256 of the source, the content of every file under the include
root's ``ptx/`` and ``csrc/`` (so any header edit rebuilds), the options and ``nvcc --version``, and,
when a caller passes extra include directories (``include_dirs``, e.g. the NCCL headers of the GIN path,
see ``commkit/jit/nccl.py``), the content of every header under them. An entry is written in a temporary
directory and moved into place with ``os.replace``, so concurrent processes never see half an entry.

Environment: ``COMMKIT_CACHE_DIR`` (default ``~/.cache/commkit``), ``COMMKIT_INCLUDE_ROOT`` (a
directory holding ``ptx/`` and ``csrc/``; default: the installed package or the repository),
``COMMKIT_NVCC`` (default: ``nvcc`` on PATH, else ``$CUDA_HOME/bin/nvcc``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import commkit

ARCH = "sm_90"
DEFAULT_OPTIONS = ("-std=c++17", "-O3", "-lineinfo", "--diag-suppress=177")
HEADER_DIRS = ("ptx", "csrc")
HEADER_SUFFIXES = (".cuh", ".h", ".hpp", ".cu")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel instantiation: header (relative to the include root), C++ name and template args;
    ``include_dirs``: extra ``-I`` directories its header needs (the NCCL headers of the GIN path);
    ``defines``: extra ``-D`` options (e.g. which of NCCL's GIN backends to compile in)."""

    header: str
    name: str
    template_args: tuple[int | str, ...]
    include_dirs: tuple[str, ...] = ()
    defines: tuple[str, ...] = ()

    def expression(self) -> str:
        return f"commkit::{self.name}<{', '.join(str(a) for a in self.template_args)}>"


@dataclass(frozen=True)
class PtxasStats:
    """ptxas -v figures of one entry function."""

    registers: int
    stack_frame_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int


@dataclass
class CompileResult:
    cubin_path: Path
    entries: list[str]  # mangled names of the entry functions, in ptxas order
    stats: dict[str, PtxasStats] = field(default_factory=dict)
    ptxas_log: str = ""
    cache_hit: bool = False


def generate_source(specs: list[KernelSpec]) -> str:
    """The source that instantiates ``specs`` (taking a kernel's address instantiates it)."""
    headers = sorted({s.header for s in specs})
    lines = [f'#include "{h}"' for h in headers]
    lines.append("static void instantiate() {")
    lines += [f"    (void)reinterpret_cast<const void*>(&{s.expression()});" for s in specs]
    lines.append("}")
    return "\n".join(lines) + "\n"


def include_root() -> Path:
    """The directory that holds ``ptx/`` and ``csrc/``."""
    env = os.environ.get("COMMKIT_INCLUDE_ROOT")
    candidates = [Path(env)] if env else []
    package_dir = Path(commkit.__file__).resolve().parent
    candidates += [package_dir, package_dir.parent]  # installed wheel, then repository / editable install
    for root in candidates:
        if all((root / d).is_dir() for d in HEADER_DIRS):
            return root
    raise FileNotFoundError(f"no directory with {HEADER_DIRS} among {[str(c) for c in candidates]}")


def cache_dir() -> Path:
    return Path(os.environ.get("COMMKIT_CACHE_DIR") or Path.home() / ".cache" / "commkit")


def nvcc_path() -> str | None:
    """nvcc to use, or None when there is none."""
    env = os.environ.get("COMMKIT_NVCC")
    if env:
        return env
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@functools.lru_cache(maxsize=4)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def _headers_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for sub in HEADER_DIRS:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file() and path.suffix in HEADER_SUFFIXES:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(b"\0")
                digest.update(path.read_bytes())
                digest.update(b"\0")
    return digest.hexdigest()


def include_dirs_digest(include_dirs: tuple[Path, ...]) -> str:
    """sha256 over every header file under the extra include directories (in -I order): name and content."""
    digest = hashlib.sha256()
    for index, directory in enumerate(include_dirs):
        digest.update(f"-I#{index}\0".encode())
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file() and path.suffix in HEADER_SUFFIXES:
                digest.update(str(path.relative_to(directory)).encode())
                digest.update(b"\0")
                digest.update(path.read_bytes())
                digest.update(b"\0")
    return digest.hexdigest()


def cache_key(
    source: str, options: tuple[str, ...], root: Path, nvcc: str, include_dirs: tuple[Path, ...] = ()
) -> str:
    digest = hashlib.sha256()
    parts = [source, "\0".join(options), _headers_digest(root), _nvcc_version(nvcc), ARCH]
    if include_dirs:  # NOTE: no extra part without them, so the keys of existing entries stay valid
        parts.append(include_dirs_digest(include_dirs))
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x01")
    return digest.hexdigest()


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers(.*)")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, PtxasStats]:
    """Per entry function: registers, stack frame, spills and shared memory from ``ptxas -v``."""
    stats: dict[str, PtxasStats] = {}
    current: str | None = None
    props_of: str | None = None  # the function whose properties the next stack line describes
    stack = (0, 0, 0)
    for line in log.splitlines():
        if m := _ENTRY_RE.search(line):
            current, stack = m.group(1), (0, 0, 0)
        elif m := _PROPS_RE.search(line):
            props_of = m.group(1)
        elif current and props_of == current and (m := _STACK_RE.search(line)):
            stack = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif current and (m := _REGS_RE.search(line)):
            smem = _SMEM_RE.search(m.group(2))
            stats[current] = PtxasStats(int(m.group(1)), *stack, int(smem.group(1)) if smem else 0)
            current = None
    return stats


def compile_source(
    source: str,
    *,
    options: tuple[str, ...] = DEFAULT_OPTIONS,
    root: Path | None = None,
    cache: Path | None = None,
    include_dirs: tuple[Path, ...] = (),
) -> CompileResult:
    """Compile ``source`` to a cubin for sm_90, through the on-disk cache.

    ``include_dirs``: more directories for ``-I`` (after the include root), e.g. the NCCL headers; every
    header under them is part of the cache key.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: install the CUDA toolkit, or set COMMKIT_NVCC or CUDA_HOME")
    root = (root or include_root()).resolve()
    include_dirs = tuple(Path(d).resolve() for d in include_dirs)
    missing = [str(d) for d in include_dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"include directories not found: {missing}")
    cache = cache or cache_dir()
    key = cache_key(source, options, root, nvcc, include_dirs)
    entry_dir = cache / key[:2] / key
    meta_path = entry_dir / "kernel.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return CompileResult(
            cubin_path=entry_dir / "kernel.cubin",
            entries=meta["entries"],
            stats={k: PtxasStats(**v) for k, v in meta["stats"].items()},
            ptxas_log=meta["ptxas_log"],
            cache_hit=True,
        )

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        tmp_dir = Path(tmp)
        (tmp_dir / "kernel.cu").write_text(source)
        cmd = [
            nvcc,
            "-cubin",
            f"-arch={ARCH}",
            *options,
            "-Xptxas",
            "-v",
            "-I",
            str(root),
            *(arg for d in include_dirs for arg in ("-I", str(d))),
            "-o",
            str(tmp_dir / "kernel.cubin"),
            str(tmp_dir / "kernel.cu"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
        log = proc.stdout + proc.stderr
        stats = parse_ptxas_log(log)
        meta = {"entries": list(stats), "stats": {k: vars(v) for k, v in stats.items()}, "ptxas_log": log}
        (tmp_dir / "kernel.json").write_text(json.dumps(meta, indent=1))
        # Move into place: the cubin first, the json (the completion mark) last
        staged = cache / key[:2] / f".{key}.{os.getpid()}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        os.replace(tmp_dir / "kernel.cu", staged / "kernel.cu")
        os.replace(tmp_dir / "kernel.cubin", staged / "kernel.cubin")
        os.replace(tmp_dir / "kernel.json", staged / "kernel.json")
        try:
            os.replace(staged, entry_dir)  # atomic when entry_dir does not exist
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)  # another process won the race: same content
    return CompileResult(entry_dir / "kernel.cubin", meta["entries"], stats, log, cache_hit=False)


def compile_spec(spec: KernelSpec, **kwargs: Any) -> CompileResult:
    """Compile one instantiation (through the cache); its entry is ``result.entries[0]``."""
    # NOTE: the spec's include dirs and defines are added to the caller's, never replaced by them
    if spec.include_dirs:
        given_dirs: tuple[Path, ...] = tuple(kwargs.get("include_dirs", ()))
        kwargs["include_dirs"] = given_dirs + tuple(Path(d) for d in spec.include_dirs)
    if spec.defines:
        if any(not d.startswith("-D") for d in spec.defines):
            raise ValueError(f"KernelSpec.defines: expected -DNAME[=VALUE] options, got {spec.defines}")
        given_options: tuple[str, ...] = tuple(kwargs.get("options", DEFAULT_OPTIONS))
        kwargs["options"] = given_options + spec.defines
    return compile_source(generate_source([spec]), **kwargs)
