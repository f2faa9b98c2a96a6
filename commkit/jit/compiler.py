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
directory and moved into place with ``os.replace``, so concurrent processes (and threads) never see
half an entry. One lock file per key (``<cache>/locks/<key>.lock``, ``filelock``) makes the
processes of a node that miss the same entry run one compiler: the others wait for it, look again and
load its entry; a torn entry (a directory without its ``kernel.json``, left by a killed process) is
replaced under the lock.

A cache hit without nvcc: the key covers ``nvcc --version``, which cannot be read without nvcc. So every
entry is also recorded under its *source key* (the same key without the compiler version) in
``<cache>/by-source/<source key>/<key>`` (a small file holding the version text of the nvcc that built
it; written on every compile and on every hit with nvcc, so older entries get one on their next hit).
Where no nvcc is found, ``compile_source`` looks the source key up there and loads the entry (the
newest, if nvccs of several versions built one); only when there is none does it raise. The result's
``nvcc_version`` says which nvcc built the cubin. With nvcc present the lookup is by the full key
only: an entry of another nvcc version is a miss and is compiled again.

Environment: ``COMMKIT_CACHE_DIR`` (default ``~/.cache/commkit``), ``COMMKIT_INCLUDE_ROOT`` (a
directory holding ``ptx/`` and ``csrc/``; default: the installed package or the repository),
``COMMKIT_NVCC`` (default: ``nvcc`` on PATH, else ``$CUDA_HOME/bin/nvcc``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
from filelock import FileLock

import commkit
from commkit.user_dirs import user_cache_dir

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
        if not self.template_args:  # a plain function (the host runtime's test kernels)
            return f"commkit::{self.name}"
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
    nvcc_version: str | None = None  # ``nvcc --version`` of the nvcc that built it, where known


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
    """The JIT's binary cache: ``$COMMKIT_CACHE_DIR``, else the user cache directory of the platform
    (``platformdirs.user_cache_path("commkit")``: ``$XDG_CACHE_HOME/commkit``, by default
    ``~/.cache/commkit``, on Linux)."""
    env = os.environ.get("COMMKIT_CACHE_DIR")
    if env:
        return Path(env)
    return user_cache_dir()


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
def tool_version(tool: str) -> str:
    """``tool --version`` (a compiler's: part of every cache key that it builds)."""
    return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout


def digest_files(digest: Any, directory: Path, relative_to: Path, suffixes: tuple[str, ...]) -> None:
    """Feeds ``digest`` every file under ``directory`` whose suffix is in ``suffixes``, in sorted path
    order: its path relative to ``relative_to``, NUL, its bytes, NUL."""
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in suffixes:
            digest.update(str(path.relative_to(relative_to)).encode() + b"\0" + path.read_bytes() + b"\0")


def _headers_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for sub in HEADER_DIRS:
        digest_files(digest, root / sub, root, HEADER_SUFFIXES)
    return digest.hexdigest()


def include_dirs_digest(include_dirs: tuple[Path, ...]) -> str:
    """sha256 over every header file under the extra include directories (in -I order): name and content."""
    digest = hashlib.sha256()
    for index, directory in enumerate(include_dirs):
        digest.update(f"-I#{index}\0".encode())
        digest_files(digest, Path(directory), Path(directory), HEADER_SUFFIXES)
    return digest.hexdigest()


def cache_key(
    source: str, options: tuple[str, ...], root: Path, nvcc: str, include_dirs: tuple[Path, ...] = ()
) -> str:
    digest = hashlib.sha256()
    parts = [source, "\0".join(options), _headers_digest(root), tool_version(nvcc), ARCH]
    if include_dirs:  # NOTE: no extra part without them, so the keys of existing entries stay valid
        parts.append(include_dirs_digest(include_dirs))
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x01")
    return digest.hexdigest()


# Bounds a compile and the wait for another process compiling the same key (``COMMKIT_JIT_TIMEOUT_S``).
# The kernels' first barrier of a call whose kernels a process loaded anew waits this much longer than
# timeout_s (``KernelEngine``): a peer compiling never trips a rank's timeout.
JIT_TIMEOUT_S = float(os.environ.get("COMMKIT_JIT_TIMEOUT_S", "300"))


def run_compiler(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    """``cmd`` run to completion within ``JIT_TIMEOUT_S`` (``RuntimeError`` naming it otherwise)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=JIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{what}: the compiler ran longer than COMMKIT_JIT_TIMEOUT_S={JIT_TIMEOUT_S:g}s: {' '.join(cmd)}"
        ) from None


@contextlib.contextmanager
def compile_lock(path: Path, what: str) -> Iterator[None]:
    """The lock of one cache key across processes, waited for at most ``JIT_TIMEOUT_S``."""
    try:
        with FileLock(str(path), timeout=JIT_TIMEOUT_S):
            yield
    except filelock.Timeout:
        raise RuntimeError(
            f"{what}: another process held the compile lock {path} longer than "
            f"COMMKIT_JIT_TIMEOUT_S={JIT_TIMEOUT_S:g}s"
        ) from None


LOCK_DIR = "locks"  # <cache>/locks/<key>.lock: one compiler per key across processes (compile_source)
SOURCE_INDEX = "by-source"  # <cache>/by-source/<source key[:2]>/<source key>/<key>: see the module docstring


def source_key(source: str, options: tuple[str, ...], root: Path, include_dirs: tuple[Path, ...] = ()) -> str:
    """The cache key without the compiler version: what a lookup without nvcc can compute."""
    digest = hashlib.sha256()
    parts = [source, "\0".join(options), _headers_digest(root), ARCH]
    if include_dirs:
        parts.append(include_dirs_digest(include_dirs))
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x01")
    return digest.hexdigest()


def _record_source_key(cache: Path, skey: str, key: str, nvcc_version: str) -> None:
    """Record entry ``key`` under its source key (atomically; best effort: a read-only cache is fine)."""
    marker = cache / SOURCE_INDEX / skey[:2] / skey / key
    if marker.exists():
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.parent / f".{key}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(nvcc_version)
        os.replace(tmp, marker)
    except OSError:
        pass


def _load_entry(entry_dir: Path, nvcc_version: str | None) -> CompileResult:
    meta = json.loads((entry_dir / "kernel.json").read_text())
    return CompileResult(
        cubin_path=entry_dir / "kernel.cubin",
        entries=meta["entries"],
        stats={k: PtxasStats(**v) for k, v in meta["stats"].items()},
        ptxas_log=meta["ptxas_log"],
        cache_hit=True,
        nvcc_version=meta.get("nvcc_version", nvcc_version),
    )


def lookup_without_nvcc(
    source: str, options: tuple[str, ...], root: Path, cache: Path, include_dirs: tuple[Path, ...] = ()
) -> CompileResult | None:
    """The cached entry of this source, options and headers built by any nvcc (the newest), or None."""
    skey = source_key(source, options, root, include_dirs)
    index = cache / SOURCE_INDEX / skey[:2] / skey
    found: list[tuple[int, Path, str]] = []
    if index.is_dir():
        for marker in index.iterdir():
            if marker.name.startswith("."):
                continue
            meta_path = cache / marker.name[:2] / marker.name / "kernel.json"
            if meta_path.exists():
                found.append((meta_path.stat().st_mtime_ns, meta_path.parent, marker.read_text()))
    if not found:
        return None
    _, entry_dir, version = max(found)
    return _load_entry(entry_dir, version)


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
    root = (root or include_root()).resolve()
    include_dirs = tuple(Path(d).resolve() for d in include_dirs)
    missing = [str(d) for d in include_dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"include directories not found: {missing}")
    cache = cache or cache_dir()
    if nvcc is None:  # a hit needs no compiler: look the entry up by its source key (module docstring)
        hit = lookup_without_nvcc(source, options, root, cache, include_dirs)
        if hit is not None:
            return hit
        raise RuntimeError(
            f"nvcc not found and no cached build of this kernel in {cache}: install the CUDA toolkit, or set "
            "COMMKIT_NVCC or CUDA_HOME (or warm the cache: python -m commkit jit warm)"
        )
    version = tool_version(nvcc)
    key = cache_key(source, options, root, nvcc, include_dirs)
    skey = source_key(source, options, root, include_dirs)
    entry_dir = cache / key[:2] / key
    meta_path = entry_dir / "kernel.json"
    if meta_path.exists():
        _record_source_key(cache, skey, key, version)
        return _load_entry(entry_dir, version)

    locks = cache / LOCK_DIR
    locks.mkdir(parents=True, exist_ok=True)
    with compile_lock(locks / f"{key}.lock", "jit"):
        if meta_path.exists():  # another process compiled it while this one waited
            _record_source_key(cache, skey, key, version)
            return _load_entry(entry_dir, version)
        return _compile_locked(nvcc, source, options, root, cache, include_dirs, key, skey, version)


def _compile_locked(
    nvcc: str,
    source: str,
    options: tuple[str, ...],
    root: Path,
    cache: Path,
    include_dirs: tuple[Path, ...],
    key: str,
    skey: str,
    version: str,
) -> CompileResult:
    """Compile the entry ``key`` (its lock held) and move it into place."""
    entry_dir = cache / key[:2] / key
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
        proc = run_compiler(cmd, "jit")
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
        log = proc.stdout + proc.stderr
        stats = parse_ptxas_log(log)
        meta = {
            "entries": list(stats),
            "stats": {k: vars(v) for k, v in stats.items()},
            "ptxas_log": log,
            "nvcc_version": version,
        }
        (tmp_dir / "kernel.json").write_text(json.dumps(meta, indent=1))
        # Move into place: the cubin first, the json (the completion mark) last
        # NOTE: the thread too: the warm step compiles in threads of one process
        staged = cache / key[:2] / f".{key}.{os.getpid()}.{threading.get_ident()}"
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        os.replace(tmp_dir / "kernel.cu", staged / "kernel.cu")
        os.replace(tmp_dir / "kernel.cubin", staged / "kernel.cubin")
        os.replace(tmp_dir / "kernel.json", staged / "kernel.json")
        shutil.rmtree(entry_dir, ignore_errors=True)  # a torn entry of a killed process (lock held)
        os.replace(staged, entry_dir)  # atomic: readers see the whole entry or none
    _record_source_key(cache, skey, key, version)
    return CompileResult(
        entry_dir / "kernel.cubin", meta["entries"], stats, log, cache_hit=False, nvcc_version=version
    )


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
