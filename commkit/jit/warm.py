"""The kernel instantiations the GPU check uses (``bench/gpu_check.sh``), compiled ahead, in parallel.

``check_workloads()`` is the one list: per step of the check, the (ranks, hidden, top-k, dtype, nodes,
role split) configurations it runs. The GPU tests' own cases are read from their sources
(``tests/gpu/*.py``: every ``KCase(...)`` call, the virtual-node ``CASES`` list), so a case added there
is warmed without an edit here; what those files build in code (the role splits, the kernel-trap
scripts, the one-rank backend test) and the benchmark configurations are listed below.
``specs_for(workload)`` turns a configuration into the ``KernelSpec``s that ``KernelEngine`` /
``InternodeEngine`` (virtual nodes: the nvlink-domain net) look up for it, the same header, name and
template arguments, so the same cache keys (``tests/test_jit_warm.py`` checks this against the engines
with the kernel launches stubbed).

``warm(specs, cache, workers)`` compiles them with ``concurrent.futures`` threads (the work is in the
nvcc processes), each through ``compile_spec`` (an entry appears whole or not at all), and writes
``<cache>/warm.json``: the nvcc version text, the commit and whether the tree was dirty, and the keys.
``python -m commkit jit warm`` is the command (``commkit/cli/jit.py``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commkit.jit import compiler
from commkit.jit.compiler import KernelSpec

# Template values of the engines (commkit/backends/kernels_layout.py, internode.py, internode_net.py)
DTYPE_CODES = {"bf16": 0, "fp8": 1, "cast": 2}
NVLINK_NET = "commkit::NvlinkDomainNet"
DEFAULT_FORWARDER_WARPS = 4
MANIFEST = "warm.json"

# Steps of bench/gpu_check.sh that launch kernels, in the order they run
STEPS = ("gpu_tests", "nodes", "bench", "overlap", "memcheck", "stress")


@dataclass(frozen=True)
class Workload:
    """One configuration a step runs: ``num_ranks`` ranks (``gpus_per_node`` None: the intranode
    kernels; else N = num_ranks / G virtual nodes), ``hidden``, ``num_topk``, ``dtype`` ("bf16", "fp8":
    FP8 input, "cast": bf16 cast in the kernel); ``forwarder_warps``: (dispatch, combine) role split of
    the internode kernels; ``combine``: whether it reaches combine; ``source``: where it comes from."""

    step: str
    num_ranks: int
    hidden: int
    num_topk: int
    dtype: str = "bf16"
    gpus_per_node: int | None = None
    forwarder_warps: tuple[int, int] = (DEFAULT_FORWARDER_WARPS, DEFAULT_FORWARDER_WARPS)
    combine: bool = True
    source: str = ""


def specs_for(w: Workload) -> list[KernelSpec]:
    """The instantiations the engine looks up for ``w`` (layout, notify, barrier, dispatch, combine)."""
    if w.dtype not in DTYPE_CODES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_CODES)}, got {w.dtype!r}")
    r, h, k, d = w.num_ranks, w.hidden, w.num_topk, DTYPE_CODES[w.dtype]
    specs = [
        KernelSpec("csrc/layout.cuh", "layout_kernel", (r, k)),
        KernelSpec("csrc/notify.cuh", "notify_kernel", (r,)),
        KernelSpec("csrc/cached.cuh", "cached_notify_kernel", (r,)),
    ]
    if w.gpus_per_node is None:
        specs.append(KernelSpec("csrc/dispatch.cuh", "dispatch_kernel", (r, h, k, d)))
        if w.combine:
            specs.append(KernelSpec("csrc/combine.cuh", "combine_kernel", (r, h)))
        return specs
    g = w.gpus_per_node
    n = r // g
    fwd_dispatch, fwd_combine = w.forwarder_warps
    specs.append(
        KernelSpec(
            "csrc/internode_dispatch.cuh",
            "internode_dispatch_kernel",
            (NVLINK_NET, g, n, h, k, d, fwd_dispatch),
        )
    )
    if w.combine:
        specs.append(
            KernelSpec(
                "csrc/internode_combine.cuh", "internode_combine_kernel", (NVLINK_NET, g, n, h, fwd_combine)
            )
        )
    return specs


# ------------------------------------------------------------------ the GPU tests' cases, from their sources
_KCASE_DEFAULTS = {"hidden": 2048, "num_topk": 8, "dtype": "bf16"}  # tests/gpu/kernel_cases.py KCase


class _Unknown:
    """A name the case expression uses that is not a literal (e.g. the device's SM count)."""


class _Names(dict):
    def __missing__(self, key: str) -> Any:
        return _Unknown()


def _eval(node: ast.expr) -> Any:
    """A literal-ish expression of a test file (tuples, ``(256,) * 8``, calls recorded as dicts)."""

    def kcase(tokens: Any = (), **kw: Any) -> dict[str, Any]:
        return {"tokens": tokens, **kw}

    names = _Names(KCase=kcase)
    return eval(compile(ast.Expression(node), "<case>", "eval"), {"__builtins__": {}}, names)  # noqa: S307


def _kcase_workloads(path: Path, step: str) -> list[Workload]:
    """Every ``KCase(...)`` call in ``path``; ``(KCase(...), G)`` pairs (tests/gpu/run_small.py) run on
    virtual nodes of G ranks."""
    tree = ast.parse(path.read_text(), str(path))
    per_node: dict[int, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple) and len(node.elts) == 2 and _is_kcase(node.elts[0]):
            second = node.elts[1]
            if isinstance(second, ast.Constant) and isinstance(second.value, int):
                per_node[id(node.elts[0])] = second.value
    out = []
    for node in ast.walk(tree):
        if not _is_kcase(node):
            continue
        case = _eval(node)
        values = {**_KCASE_DEFAULTS, **case}
        tokens, hidden, topk, dtype = values["tokens"], values["hidden"], values["num_topk"], values["dtype"]
        if any(isinstance(v, _Unknown) for v in (tokens, hidden, topk, dtype)):
            raise ValueError(f"{path}:{node.lineno}: a KCase whose shape is not a literal")
        out.append(
            Workload(step, len(tokens), hidden, topk, dtype, gpus_per_node=per_node.get(id(node)),
                     source=f"{path.name}:{node.lineno}")
        )  # fmt: skip
    return out


def _is_kcase(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "KCase"


def _module_list(path: Path, name: str) -> list[tuple[int, Any]]:
    """The elements (line, value) of the module-level list ``name = [...]`` in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            and isinstance(node.value, ast.List)
        ):
            return [(e.lineno, _eval(e)) for e in node.value.elts]
    raise ValueError(f"{path}: no module-level list {name}")


def _internode_cases(path: Path) -> list[tuple[int, tuple]]:
    """tests/gpu/test_internode_gpu.py CASES: (gpus per node, nodes, tokens, hidden, top-k, experts,
    dtype, num_sms)."""
    return _module_list(path, "CASES")


def tests_root() -> Path:
    """The repository's ``tests/gpu`` (the check runs from a checkout; the package alone has no tests)."""
    return Path(compiler.__file__).resolve().parents[2] / "tests" / "gpu"


# ------------------------------------------------------------------ the list
def check_workloads(gpu_tests: Path | None = None, *, overlap_ranks: int = 4) -> list[Workload]:
    """What each step of bench/gpu_check.sh runs (see the module docstring)."""
    root = gpu_tests or tests_root()
    out: list[Workload] = []
    # gpu_tests: tests/gpu/test_kernels_gpu.py (its KCase calls, CASES and the tests' own), the trap
    # script of test_num_worst_tokens_too_small_traps (2 ranks, hidden 256, top-1: it traps in dispatch),
    # test_device_timeout_reports_and_traps (the 2-rank barrier, covered by the 2-rank cases) and
    # tests/gpu/test_kernels_backend_gpu.py (one rank, hidden 1024, top-4; bf16 and the cast)
    out += _kcase_workloads(root / "test_kernels_gpu.py", "gpu_tests")
    out.append(Workload("gpu_tests", 2, 256, 1, combine=False, source="test_kernels_gpu.py trap script"))
    out += [
        Workload("gpu_tests", 1, 1024, 4, dtype, source="test_kernels_backend_gpu.py")
        for dtype in ("bf16", "cast")
    ]
    # nodes: tests/gpu/test_internode_gpu.py CASES, and its role splits (test_virtual_nodes_role_splits:
    # CASES[1] with (dispatch, combine) forwarder warps (w0, w1), CASES[2] with (w1, w0))
    cases = _internode_cases(root / "test_internode_gpu.py")
    for line, (g, n, _tokens, hidden, topk, _experts, dtype, _sms) in cases:
        out.append(Workload("nodes", g * n, hidden, topk, dtype, g, source=f"test_internode_gpu.py:{line}"))
    for w0, w1 in ((1, 7), (2, 6), (6, 2), (7, 1)):
        for (line, (g, n, _t, hidden, topk, _e, dtype, _s)), warps in zip(
            cases[1:3], ((w0, w1), (w1, w0)), strict=True
        ):
            out.append(
                Workload("nodes", g * n, hidden, topk, dtype, g, warps,
                         source=f"test_internode_gpu.py:{line} role split {warps}")
            )  # fmt: skip
    # bench: 8 virtual ranks, DeepSeek-V3 (hidden 7168, top-8 of 256), bf16 and FP8 input
    out += [Workload("bench", 8, 7168, 8, dtype, source="bench deepseek-v3") for dtype in ("bf16", "fp8")]
    # overlap: DeepSeek-V3 bf16 on overlap_ranks virtual ranks (bench/gpu_check.sh: 4 x 5 = 20 SMs)
    out.append(Workload("overlap", overlap_ranks, 7168, 8, source="overlap deepseek-v3"))
    # memcheck: tests/gpu/run_small.py; stress: tests/gpu/stress.py
    out += _kcase_workloads(root / "run_small.py", "memcheck")
    out += _kcase_workloads(root / "stress.py", "stress")
    return out


def check_specs(
    steps: Iterable[str] | None = None, gpu_tests: Path | None = None
) -> dict[KernelSpec, list[str]]:
    """Each distinct instantiation the selected steps need -> the steps that need it (in STEPS order)."""
    selected = set(STEPS if steps is None else steps)
    unknown = selected - set(STEPS)
    if unknown:
        raise ValueError(f"steps: expected some of {', '.join(STEPS)}, got {', '.join(sorted(unknown))}")
    out: dict[KernelSpec, list[str]] = {}
    for w in check_workloads(gpu_tests):
        if w.step in selected:
            for spec in specs_for(w):
                users = out.setdefault(spec, [])
                if w.step not in users:
                    users.append(w.step)
    return out


# ------------------------------------------------------------------ cache status and compiling
def nvcc_version_text() -> str | None:
    nvcc = compiler.nvcc_path()
    if nvcc is None:
        return None
    try:
        return compiler.tool_version(nvcc)
    except (OSError, subprocess.CalledProcessError):
        return None


def short_version(text: str | None) -> str:
    """The release line of ``nvcc --version`` (e.g. 'Cuda compilation tools, release 13.0, V13.0.88')."""
    if not text:
        return "none"
    lines = [ln for ln in text.splitlines() if "release" in ln]
    return (lines[-1] if lines else text.strip().splitlines()[-1]).strip()


def cached(spec: KernelSpec, cache: Path) -> bool | None:
    """Whether ``spec`` is in ``cache``: by its full key with nvcc, by its source key without; None
    when that cannot be said (an include directory missing)."""
    source = compiler.generate_source([spec])
    options = compiler.DEFAULT_OPTIONS + spec.defines
    root = compiler.include_root().resolve()
    dirs = tuple(Path(d).resolve() for d in spec.include_dirs)
    if any(not d.is_dir() for d in dirs):
        return None
    nvcc = compiler.nvcc_path()
    if nvcc is None:
        return compiler.lookup_without_nvcc(source, options, root, cache, dirs) is not None
    key = compiler.cache_key(source, options, root, nvcc, dirs)
    return (cache / key[:2] / key / "kernel.json").exists()


@dataclass
class WarmReport:
    total: int
    hits: int
    misses: int
    failed: list[tuple[KernelSpec, str]]
    seconds: float
    nvcc_here: str | None
    nvcc_manifest: str | None  # the nvcc of the cache's previous warm, if any


def read_manifest(cache: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at ``repo``, or (None, None) without git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def warm(
    specs: Iterable[KernelSpec],
    cache: Path,
    *,
    workers: int | None = None,
    on_result: Callable[[KernelSpec, str, float], None] | None = None,
) -> WarmReport:
    """Compile every spec into ``cache`` (hits cost a hash), ``workers`` at a time (default
    ``os.cpu_count()``); write the manifest. ``on_result(spec, "hit" | "miss" | "FAILED: ...", s)``."""
    specs = list(dict.fromkeys(specs))
    cache.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    nvcc_here = nvcc_version_text()
    previous = read_manifest(cache)
    started = time.perf_counter()
    hits = misses = 0
    failed: list[tuple[KernelSpec, str]] = []

    def one(spec: KernelSpec) -> tuple[bool, float]:
        t0 = time.perf_counter()
        result = compiler.compile_spec(spec, cache=cache)
        return result.cache_hit, time.perf_counter() - t0

    keys: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, s): s for s in specs}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                hit, seconds = future.result()
            except Exception as exc:  # noqa: BLE001 - reported per spec, the others go on
                failed.append((spec, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)))
                if on_result:
                    on_result(spec, f"FAILED: {failed[-1][1]}", 0.0)
                continue
            hits += hit
            misses += not hit
            keys[spec.expression()] = "hit" if hit else "miss"
            if on_result:
                on_result(spec, "hit" if hit else "miss", seconds)
    seconds = time.perf_counter() - started
    commit, dirty = git_state(compiler.include_root())
    if commit is None and previous:  # a checkout without .git (the device machine): keep what was recorded
        commit, dirty = previous.get("commit"), previous.get("dirty")
    manifest = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nvcc_version": nvcc_here,
        "commit": commit,
        "dirty": dirty,
        "specs": len(specs),
        "failed": [s.expression() for s, _ in failed],
        "seconds": round(seconds, 1),
    }
    tmp = cache / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, cache / MANIFEST)
    return WarmReport(
        len(specs),
        hits,
        misses,
        failed,
        seconds,
        nvcc_here,
        previous.get("nvcc_version") if previous else None,
    )


def cache_size_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
