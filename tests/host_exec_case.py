"""One host-execution case in a process of its own, for the sanitizer tests (test_host_sanitizers.py):
a sanitizer runtime must be loaded at process start (LD_PRELOAD, commkit.jit.host.sanitizer_env).

    python tests/host_exec_case.py '{"variant": "tsan", "ranks": 2, "per_node": null, "faults": 0, ...}'

Runs dispatch then combine (twice: fresh, then through the handles) on virtual ranks or nodes of the
host execution, compares with commkit.reference and prints one JSON line: {"match": bool, "error": str
or null}. The sanitizer's reports go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from commkit import reference, routing
from commkit.backends.launcher import HostLauncher
from commkit.emulate import EmulatedGroup
from commkit.fp8 import cast_to_fp8
from commkit.jit.host import HostBuild


def run(spec: dict) -> dict:
    ranks, per_node = spec["ranks"], spec.get("per_node")
    tokens, hidden, topk, experts = (
        spec.get("tokens", 16),
        spec.get("hidden", 128),
        spec.get("topk", 2),
        spec.get("experts", 8),
    )
    dtype = spec.get("dtype", "bf16")
    gen = torch.Generator().manual_seed(spec.get("seed", 0))
    xs = [(torch.randn(tokens, hidden, generator=gen) * 3).to(torch.bfloat16) for _ in range(ranks)]
    nodes = ranks // (per_node or ranks)
    idxs, ws = [], []
    for _ in range(ranks):
        idx, w = routing.node_limited_topk(torch.rand(tokens, experts, generator=gen), topk, num_groups=nodes,
                                           max_groups=min(2, nodes))  # fmt: skip
        idxs.append(idx.contiguous())
        ws.append(w.contiguous())
    ref_xs, ref_scales = xs, None
    if dtype == "cast":
        pairs = [cast_to_fp8(x) for x in xs]
        ref_xs, ref_scales = [p[0] for p in pairs], [p[1] for p in pairs]
    want = reference.dispatch_reference(ref_xs, idxs, ws, experts, x_scales=ref_scales)
    ys = [
        (torch.randn(w.x.shape[0], hidden, generator=gen) * 2).to(torch.bfloat16) for w in want
    ]  # expert outputs
    want_y = reference.combine_reference(ys, want, [tokens] * ranks, num_ranks_per_node=per_node)
    build = HostBuild(
        spec["variant"], (f"-DCOMMKIT_FAULTS={spec.get('faults', 0)}",) if spec.get("faults") else ()
    )
    launcher = HostLauncher(build, seed=spec.get("fiber_seed", 1), watchdog_s=spec.get("watchdog_s", 240.0))
    group = EmulatedGroup(ranks, num_sms=spec.get("num_sms", 1), device="cpu", num_ranks_per_node=per_node,
                          timeout_s=spec.get("timeout_s", 60.0), launcher=launcher)  # fmt: skip
    group.engine.poison_outputs = True
    match, handles = True, None
    try:
        for _ in range(2):
            outs = group.dispatch(xs, idxs, ws, experts, cast_to_fp8=dtype == "cast", handles=handles)
            for o, w in zip(outs, want, strict=True):
                match &= o.x.shape == w.x.shape and torch.equal(o.x.view(torch.uint8), w.x.view(torch.uint8))
                match &= torch.equal(o.topk_idx, w.topk_idx)
            got = group.combine(ys, [o.handle for o in outs])
            match &= all(
                torch.equal(g.x.view(torch.int16), w.view(torch.int16))
                for g, w in zip(got, want_y, strict=True)
            )
            handles = [o.handle for o in outs]
    except Exception as exc:  # noqa: BLE001 - reported to the parent test
        return {"match": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"match": bool(match), "error": None}


def run_test_kernel(spec: dict) -> dict:
    """One kernel of tests/host_kernels/runtime_cases.cuh (the runtime's own checks), 4 blocks x 64."""
    import numpy as np

    from commkit.jit.compiler import KernelSpec
    from commkit.jit.host import load_host_kernel

    cases = str(Path(__file__).resolve().parent / "host_kernels")
    spec_ = KernelSpec("runtime_cases.cuh", f"test::{spec['kernel']}", (), include_dirs=(cases,))
    kernel = load_host_kernel(spec_, spec["variant"])
    data = torch.zeros(256, dtype=torch.int32)
    kernel.launch(4, 64, (np.uint64(data.data_ptr()),), seed=spec.get("fiber_seed", 0), watchdog_s=120.0)
    return {"match": True, "error": None}


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(run_test_kernel(request) if "kernel" in request else run(request)), flush=True)
