"""Host execution: the kernels of ``csrc/`` compiled by the host C++ compiler and run on the CPU.

The same kernel sources as for the GPU, unchanged: ``host/cuda_shim.h`` (the CUDA language on the
host, included first) and ``host/ptx_host.h`` (every wrapper of ``ptx/ptx.cuh``, with its meaning in the
C++ memory model) are the only differences; ``host/runtime.cpp`` runs a launch (every block on an OS
thread, its threads as fibers; see ``host/runtime.h``). One instantiation becomes one shared object
whose ``commkit_host_launch`` takes the kernel's parameters as an array of pointers to their values
(as ``cuLaunchKernel`` does), loaded with ctypes.

Variants (``VARIANTS``): ``plain`` (-O2), ``tsan`` (ThreadSanitizer: the kernels' synchronisation is
checked by its happens-before analysis) and ``asan`` (AddressSanitizer + UndefinedBehaviorSanitizer).
A sanitizer variant needs its runtime loaded first in the process: run Python with the environment
of ``sanitizer_env(variant)`` (``LD_PRELOAD``), as ``tests/host_exec`` does in a subprocess.

Cache (as for the GPU, ``commkit/jit/compiler.py``): under ``COMMKIT_CACHE_DIR``/host, keyed by the
sha256 of the source, the options, the content of every file under ``ptx/``, ``csrc/`` and ``host/``
and the compiler's ``--version``; an entry is built in a temporary directory and moved into place
(``os.replace``), and one lock file per key makes concurrent processes run one compiler.

Environment: ``COMMKIT_CXX`` (default ``c++``, else ``g++``), ``COMMKIT_HOST_SEED`` (fiber order of
``HostLauncher``; default 0, index order).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commkit.errors import CommTimeoutError, ConfigError, KernelFault
from commkit.jit.compiler import (
    HEADER_SUFFIXES,
    KernelSpec,
    cache_dir,
    compile_lock,
    digest_files,
    include_dirs_digest,
    include_root,
    run_compiler,
    tool_version,
)

HOST_DIRS = ("ptx", "csrc", "host")
SOURCE_SUFFIXES = (*HEADER_SUFFIXES, ".cpp")
COMMON_OPTIONS = (
    "-std=c++20",
    "-fPIC",
    "-fvisibility=hidden",
    # NOTE: the kernels pun types through reinterpret_cast (int4 words as bf16 pairs, slots as int
    # and float arrays): defined for nvcc, undefined under the host compiler's strict aliasing
    "-fno-strict-aliasing",
    # NOTE: no FMA contraction: __fadd_rn and friends must round each operation
    "-ffp-contract=off",
    "-DCOMMKIT_HOST_EXECUTION=1",
)
VARIANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "plain": {"kernel": ("-O2",), "runtime": ("-O2",), "link": ()},
    "tsan": {
        "kernel": ("-O1", "-g", "-fsanitize=thread"),
        "runtime": ("-O2", "-g", "-DCOMMKIT_HOST_TSAN=1"),
        "link": ("-fsanitize=thread",),
    },
    "asan": {
        "kernel": ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"),
        "runtime": ("-O2", "-g", "-DCOMMKIT_HOST_ASAN=1"),
        "link": ("-fsanitize=address,undefined",),
    },
}
SANITIZER_LIBS = {"tsan": "libtsan.so", "asan": "libasan.so"}
# Fiber stacks: sanitizers need larger frames
STACK_BYTES = {"plain": 64 << 10, "tsan": 256 << 10, "asan": 256 << 10}
STATUS_OK, STATUS_TRAPPED, STATUS_FAULT = 0, 1, 2
LOG_BYTES = 1 << 16


def compiler_path() -> str | None:
    """The host C++ compiler, or None when there is none."""
    env = os.environ.get("COMMKIT_CXX")
    if env:
        return env
    return shutil.which("c++") or shutil.which("g++")


def host_unavailable_reason() -> str | None:
    """Why the host execution cannot run here (None when it can)."""
    if compiler_path() is None:
        return "no C++ compiler: install g++ (or set COMMKIT_CXX)"
    try:
        root = include_root()
    except FileNotFoundError as exc:
        return str(exc)
    if not (root / "host" / "runtime.cpp").is_file():
        return f"this commkit build has no host execution sources ({root / 'host'} is missing)"
    return None


def _sources_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for sub in HOST_DIRS:
        digest_files(digest, root / sub, root, SOURCE_SUFFIXES)
    return digest.hexdigest()


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")


def generate_source(spec: KernelSpec) -> str:
    """The translation unit of one host instantiation: its header and the launch entry."""
    return (
        f'#include "{spec.header}"\n'
        '#include "host/launch.h"\n'
        'extern "C" __attribute__((visibility("default"))) int commkit_host_launch(\n'
        "        const commkit::host::LaunchConfig* config, void* const* params, char* log,\n"
        "        size_t log_bytes) {\n"
        "    commkit::g_num_reports = 0;  // a launch reports from its first failing thread on\n"
        f"    return commkit::host::launch_kernel(&{spec.expression()}, *config, params, log, log_bytes);\n"
        "}\n"
    )


def _cached_build(kind: str, key_parts: list[str], build: Any, output_name: str) -> Path:
    """The cache entry for ``key_parts`` (built by ``build(tmp_dir) -> None`` into
    ``tmp_dir / output_name`` on a miss); one compiler per key across processes."""
    digest = hashlib.sha256()
    for part in key_parts:
        digest.update(part.encode() + b"\x01")
    key = digest.hexdigest()
    root = cache_dir() / "host"
    entry = root / key[:2] / key
    done = entry / "entry.json"
    if done.exists():
        return entry / output_name
    entry.parent.mkdir(parents=True, exist_ok=True)
    with compile_lock(entry.parent / f".{key}.lock", "host jit"):
        if done.exists():  # another process built it while this one waited
            return entry / output_name
        with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".build-{key[:8]}-") as tmp:
            tmp_dir = Path(tmp)
            build(tmp_dir)
            (tmp_dir / "entry.json").write_text(json.dumps({"kind": kind}))
            shutil.rmtree(entry, ignore_errors=True)  # a torn entry of a killed process
            os.replace(tmp_dir, entry)
            tmp_dir.mkdir()  # for TemporaryDirectory's cleanup
    return entry / output_name


def _run_compiler(cmd: list[str]) -> None:
    proc = run_compiler(cmd, "host jit")
    if proc.returncode != 0:
        raise RuntimeError(f"host compile failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")


def _runtime_object(variant: str, cxx: str, root: Path) -> Path:
    options = (*COMMON_OPTIONS, *VARIANTS[variant]["runtime"])

    def build(tmp: Path) -> None:
        _run_compiler(
            [
                cxx,
                *options,
                "-I",
                str(root),
                "-c",
                str(root / "host" / "runtime.cpp"),
                "-o",
                str(tmp / "runtime.o"),
            ]
        )

    parts = ["runtime", variant, "\0".join(options), _sources_digest(root), tool_version(cxx)]
    return _cached_build("runtime", parts, build, "runtime.o")


def compile_host(spec: KernelSpec, variant: str = "plain", defines: tuple[str, ...] = ()) -> Path:
    """The shared object of one instantiation (through the cache). ``defines``: extra ``-D`` options
    (the mutation tests' planted faults, ``-DCOMMKIT_FAULTS=<mask>``, ``csrc/common.cuh``)."""
    _check_variant(variant)
    reason = host_unavailable_reason()
    if reason is not None:
        raise ConfigError(f"host execution: {reason}")
    if "gin" in Path(spec.header).stem:
        raise ConfigError(
            f"host execution: {spec.expression()} uses NCCL's GIN (the NIC's device API): not on a CPU"
        )
    bad = [d for d in (*spec.defines, *defines) if not d.startswith("-D")]
    if bad:
        raise ValueError(f"defines: expected -DNAME[=VALUE] options, got {bad}")
    cxx = compiler_path()
    assert cxx is not None
    root = include_root().resolve()
    runtime = _runtime_object(variant, cxx, root)
    include_dirs = tuple(Path(d).resolve() for d in spec.include_dirs)
    options = (
        *COMMON_OPTIONS,
        *VARIANTS[variant]["kernel"],
        *spec.defines,
        *defines,
        "-I",
        str(root / "host" / "include"),
        "-I",
        str(root),
        *(arg for d in include_dirs for arg in ("-I", str(d))),
        "-include",
        "host/cuda_shim.h",
    )
    source = generate_source(spec)

    def build(tmp: Path) -> None:
        (tmp / "kernel.cpp").write_text(source)
        _run_compiler(
            [
                cxx,
                *options,
                "-shared",
                str(tmp / "kernel.cpp"),
                str(runtime),
                *VARIANTS[variant]["link"],
                "-lpthread",
                "-o",
                str(tmp / "kernel.so"),
            ]  # fmt: skip
        )

    parts = ["kernel", variant, source, "\0".join(options), _sources_digest(root), tool_version(cxx)]
    # NOTE: the runtime object's path holds its own key (its options), and the link options count too
    parts += [str(runtime), "\0".join(VARIANTS[variant]["link"])]
    if include_dirs:  # e.g. the kernels of the host runtime's own tests
        parts.append(include_dirs_digest(include_dirs))
    return _cached_build("kernel", parts, build, "kernel.so")


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint),
        ("block_x", ctypes.c_uint),
        ("seed", ctypes.c_uint64),
        ("watchdog_ns", ctypes.c_int64),
        ("stack_bytes", ctypes.c_size_t),
    ]


_C_TYPES = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "uint64": ctypes.c_uint64}


def sanitizer_loaded(variant: str) -> bool:
    """Whether this process runs with the sanitizer runtime of ``variant`` loaded (plain: always)."""
    lib = SANITIZER_LIBS.get(variant)
    if lib is None:
        return True
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return lib.removesuffix(".so") in maps


def sanitizer_env(variant: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that loads ``variant``'s shared objects: ``LD_PRELOAD`` of the
    sanitizer runtime (it must come first) and options that make reports visible, not fatal."""
    _check_variant(variant)
    env = dict(os.environ if base is None else base)
    lib = SANITIZER_LIBS.get(variant)
    if lib is None:
        return env
    cxx = compiler_path()
    if cxx is None:
        raise ConfigError("host execution: no C++ compiler: install g++ (or set COMMKIT_CXX)")
    path = subprocess.run(
        [cxx, f"-print-file-name={lib}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(path).is_file():
        raise ConfigError(
            f"host execution: the {variant} runtime {lib} of {cxx} was not found (got {path!r})"
        )
    env["LD_PRELOAD"] = path
    addr2line = shutil.which("addr2line")  # source lines in the reports (no llvm-symbolizer needed)
    symbolizer = f" external_symbolizer_path={addr2line}" if addr2line else ""
    if variant == "tsan":
        # NOTE: Python and torch are not instrumented: only the kernels' accesses are checked
        env.setdefault(
            "TSAN_OPTIONS", f"report_signal_unsafe=0 report_thread_leaks=0 history_size=4{symbolizer}"
        )
    else:
        env.setdefault("ASAN_OPTIONS", f"detect_leaks=0 detect_stack_use_after_return=0{symbolizer}")
        env.setdefault("UBSAN_OPTIONS", f"print_stacktrace=1{symbolizer}")
    return env


class HostKernel:
    """One loaded host instantiation; ``launch`` runs it to completion on the CPU."""

    def __init__(self, spec: KernelSpec, path: Path, variant: str) -> None:
        self.spec = spec
        self.path = path
        self.variant = variant
        self._lib = ctypes.CDLL(str(path))
        self._entry = self._lib.commkit_host_launch
        self._entry.restype = ctypes.c_int
        self._entry.argtypes = [
            ctypes.POINTER(_LaunchConfig),
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]

    def launch(
        self, num_blocks: int, num_threads: int, args: tuple[Any, ...], *, seed: int, watchdog_s: float
    ) -> None:
        """``args``: the kernel's parameters in order, as numpy scalars (``int32``, ``int64``,
        ``uint64``: pointers) of the kernel's C types. Raises ``CommTimeoutError`` with the kernel's
        report when it trapped, ``KernelFault`` when the host execution found a fault."""
        if not (0 < watchdog_s < 1e9):
            raise ValueError(f"watchdog_s: expected a number of seconds in (0, 1e9), got {watchdog_s!r}")
        values = []
        for i, arg in enumerate(args):
            ctype = _C_TYPES.get(getattr(getattr(arg, "dtype", None), "name", ""))
            if ctype is None:
                raise TypeError(
                    f"args[{i}]: expected a numpy int32, int64 or uint64 scalar, got {type(arg).__name__}"
                )
            values.append(ctype(int(arg)))
        params = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        )
        config = _LaunchConfig(
            num_blocks, num_threads, seed, int(watchdog_s * 1e9), STACK_BYTES[self.variant]
        )
        log = ctypes.create_string_buffer(LOG_BYTES)
        status = self._entry(ctypes.byref(config), params, log, LOG_BYTES)
        text = log.value.decode(errors="replace").strip()
        name = self.spec.expression()
        if status == STATUS_TRAPPED:
            raise CommTimeoutError(f"{name} (host execution) trapped:\n{text}")
        if status == STATUS_FAULT:
            raise KernelFault(f"{name} (host execution):\n{text}")
        if status != STATUS_OK:
            raise RuntimeError(f"{name} (host execution): unknown launch status {status}")


@functools.cache
def load_host_kernel(spec: KernelSpec, variant: str = "plain", defines: tuple[str, ...] = ()) -> HostKernel:
    """The loaded host kernel of ``spec`` (compiled on first use, then from the cache)."""
    if not sanitizer_loaded(variant):
        raise ConfigError(
            f"host execution: the {variant} variant needs the {SANITIZER_LIBS[variant]} runtime loaded at "
            "process start: run Python with commkit.jit.host.sanitizer_env(variant) (LD_PRELOAD)"
        )
    return HostKernel(spec, compile_host(spec, variant, defines), variant)


@dataclass(frozen=True)
class HostBuild:
    """Which host build the launcher uses: variant and planted faults (mutation tests)."""

    variant: str = "plain"
    defines: tuple[str, ...] = ()
