"""The torch backends agree on every call before any payload moves (commkit/backends/torch_dist.py,
``TorchBackend._agree``): ranks that call different things (another op, a handle on one rank only,
another hidden size or dtype, another dispatch's handle of the same row count, another call sequence
number, another num_ranks_per_node) get a ValueError on every rank that names the phase, the field
and the rank, at once (well within timeout_s), no process aborts, and the next correct call on the
group returns the reference's output. On 4 gloo processes, flat and as 2 nodes of 2; and the same
cases through the one-node kernels (``Buffer(backend="kernels")`` on CPU processes: the host execution
of csrc/notify.cuh, whose agreement runs on the device, ``KernelEngine``)."""

from __future__ import annotations

import time

import pytest
import torch
from cases import Case, bits, expert_output, make_inputs

import commkit
from commkit.backends import kernels_layout as kl
from commkit.jit.host import host_unavailable_reason
from commkit.launch import spawn_gloo
from commkit.reference import combine_reference, dispatch_reference

WORLD = 4
TIMEOUT_S = 20.0
ODD = 2  # the rank that calls something else (rank 1 in "combine-vs-dispatch" and "handle-on-one-rank")

# scenario -> (the rank that differs, the field its message must name)
SCENARIOS = {
    "combine-vs-dispatch": (1, "op"),
    "handle-on-one-rank": (1, "op"),
    "fresh-hidden": (ODD, "hidden"),
    "cached-hidden": (ODD, "hidden"),
    "cached-dtype": (ODD, "x dtype"),
    "combine-hidden": (ODD, "hidden"),
    "other-handle-same-rows": (ODD, "handle"),
    "call-sequence": (ODD, "call"),
}
# The kernels' descriptor names the dispatch dtype "dtype" (count_exchange.KERNEL_FORMAT_NAMES)
KERNEL_FIELDS = {"cached-dtype": "dtype"}


def case_for(per_node: int) -> Case:
    return Case("agree", (24, 17, 30, 9), hidden=128, num_experts=4 * WORLD, seed=3,
                ranks_per_node=per_node if per_node < WORLD else None)  # fmt: skip


def _wide(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t], dim=1)


def _scenario(name: str, buf: commkit.Buffer, rank: int, x, idx, w, num_experts: int) -> None:
    """The call of scenario ``name``: every rank calls, rank ``SCENARIOS[name][0]`` differently."""
    odd = rank == SCENARIOS[name][0]
    if name not in ("fresh-hidden", "other-handle-same-rows", "call-sequence"):
        base = buf.dispatch(x, idx, w, num_experts)
    if name == "combine-vs-dispatch":
        if odd:
            buf.combine(expert_output(base.x, rank), base.handle)
        else:
            buf.dispatch(x, idx, w, num_experts)
    elif name == "handle-on-one-rank":
        buf.dispatch(x, idx, w, num_experts, handle=base.handle if odd else None)
    elif name == "fresh-hidden":
        buf.dispatch(_wide(x) if odd else x, idx, w, num_experts)
    elif name == "cached-hidden":
        buf.dispatch(_wide(x) if odd else x, idx, w, num_experts, handle=base.handle)
    elif name == "cached-dtype":
        buf.dispatch(x, idx, w, num_experts, handle=base.handle, cast_to_fp8=odd)
    elif name == "combine-hidden":
        y = expert_output(base.x, rank)
        buf.combine(_wide(y) if odd else y, base.handle)
    elif name == "other-handle-same-rows":
        # B routes the tokens of A in reverse order: the same rows per rank, other rows
        a = buf.dispatch(x, idx, w, num_experts)
        b = buf.dispatch(x.flip(0), idx.flip(0), w.flip(0), num_experts)
        assert a.x.shape == b.x.shape
        buf.combine(expert_output(b.x, rank), a.handle if odd else b.handle)
    elif name == "call-sequence":
        if odd:  # stands in for a rank that made more calls than its peers
            if buf.backend == "kernels":  # the sequence number is kept in the rank's own buffer
                backend = buf._backend
                header = backend.buffers._views[backend.rank][: kl.CALL_SEQ_OFFSET + 4].view(torch.int32)
                header[kl.CALL_SEQ_OFFSET // 4] += 3
            else:
                buf._backend._seq += 3
        buf.dispatch(x, idx, w, num_experts)
    else:
        raise AssertionError(name)


def run_scenarios(rank: int, world: int, per_node: int, names: list[str], backend: str = "torch") -> dict:
    buf = commkit.Buffer(backend=backend, timeout_s=TIMEOUT_S, num_ranks_per_node=per_node)
    case = case_for(per_node)
    x, idx, w = make_inputs(case, rank)
    got = {}
    for name in names:
        start = time.monotonic()
        try:
            _scenario(name, buf, rank, x, idx, w, case.num_experts)
            error = ("no error", "")
        except Exception as exc:  # noqa: BLE001 - the test checks it
            error = (type(exc).__name__, str(exc))
        elapsed = time.monotonic() - start
        out = buf.dispatch(x, idx, w, case.num_experts)  # the next correct call works
        y = buf.combine(expert_output(out.x, rank), out.handle)
        again = buf.dispatch(x, idx, w, case.num_experts, handle=out.handle)
        got[name] = dict(error=error, elapsed=elapsed, x=out.x, y=y.x, again=again.x)
    return dict(got=got, backend=type(buf._backend).__name__)


def check_scenarios(per_node: int, names: list[str], results: list[dict], backend: str = "torch") -> None:
    case = case_for(per_node)
    inputs = [make_inputs(case, r) for r in range(WORLD)]
    ref = dispatch_reference([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs],
                             case.num_experts)  # fmt: skip
    ys = combine_reference([expert_output(d.x, r) for r, d in enumerate(ref)], ref, list(case.tokens),
                           per_node)  # fmt: skip
    want_backend = "TorchBackend" if per_node == WORLD else "HierTorchBackend"
    if backend == "kernels":
        want_backend = "KernelsBackend"
    for rank, result in enumerate(results):
        assert result["backend"] == want_backend
        for name in names:
            odd, field = SCENARIOS[name]
            if backend == "kernels":
                field = KERNEL_FIELDS.get(name, field)
            g = result["got"][name]
            kind, message = g["error"]
            where = f"{name}, rank {rank}: {message}"
            assert kind == "ValueError", where
            peer = odd if rank != odd else 0
            assert "the ranks disagree (phase '" in message and "agreement" in message, where
            assert f"differs: {field} " in message or f"; {field} " in message, where
            assert f" on rank {peer}" in message, where
            assert g["elapsed"] < TIMEOUT_S / 2, where  # at once: nobody waited for a peer
            assert torch.equal(bits(g["x"]), bits(ref[rank].x)), where
            assert torch.equal(bits(g["again"]), bits(ref[rank].x)), where
            assert torch.equal(bits(g["y"]), bits(ys[rank])), where


@pytest.mark.slow
@pytest.mark.parametrize("per_node", [WORLD, 2], ids=["flat", "two-level"])
def test_ranks_that_call_differently_raise_on_every_rank(per_node: int) -> None:
    names = list(SCENARIOS)
    results = spawn_gloo(run_scenarios, WORLD, per_node, names, timeout_s=180)
    check_scenarios(per_node, names, results)


@pytest.mark.slow
@pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason()))
def test_kernels_ranks_that_call_differently_raise_on_every_rank() -> None:
    """The one-node kernels' agreement on the device, one rank per process (the host execution)."""
    names = list(SCENARIOS)
    results = spawn_gloo(run_scenarios, WORLD, WORLD, names, "kernels", timeout_s=400)
    check_scenarios(WORLD, names, results, "kernels")


@pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason()))
def test_kernels_combine_against_dispatch_raises_on_every_rank() -> None:
    """The fast subset's case of the one above."""
    names = ["combine-vs-dispatch", "other-handle-same-rows"]
    results = spawn_gloo(run_scenarios, WORLD, WORLD, names, "kernels", timeout_s=200)
    check_scenarios(WORLD, names, results, "kernels")


def mixed_node_sizes(rank: int, world: int) -> dict:
    """Rank 0 builds a flat buffer (one node of 4), the others a two-level one (2 nodes of 2)."""
    case = case_for(2)
    x, idx, w = make_inputs(case, rank)
    buf = commkit.Buffer(backend="torch", timeout_s=TIMEOUT_S, num_ranks_per_node=4 if rank == 0 else 2)
    start = time.monotonic()
    try:
        buf.dispatch(x, idx, w, case.num_experts)
        error = ("no error", "")
    except Exception as exc:  # noqa: BLE001
        error = (type(exc).__name__, str(exc))
    elapsed = time.monotonic() - start
    good = commkit.Buffer(backend="torch", timeout_s=TIMEOUT_S, num_ranks_per_node=2)
    out = good.dispatch(x, idx, w, case.num_experts)
    y = good.combine(expert_output(out.x, rank), out.handle)
    return dict(error=error, elapsed=elapsed, x=out.x, y=y.x)


@pytest.mark.slow
def test_flat_and_two_level_ranks_raise_on_every_rank() -> None:
    """The flat and two-level messages have one size: gloo's size check no longer aborts a process."""
    results = spawn_gloo(mixed_node_sizes, WORLD, timeout_s=120)
    case = case_for(2)
    inputs = [make_inputs(case, r) for r in range(WORLD)]
    ref = dispatch_reference([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs],
                             case.num_experts)  # fmt: skip
    ys = combine_reference([expert_output(d.x, r) for r, d in enumerate(ref)], ref, list(case.tokens), 2)
    for rank, g in enumerate(results):
        kind, message = g["error"]
        assert kind == "ValueError", message
        mine, theirs = (4, 2) if rank == 0 else (2, 4)
        peer = 1 if rank == 0 else 0
        assert f"num_ranks_per_node {mine} here, {theirs} on rank {peer}" in message, message
        assert "phase 'dispatch: agreement and count exchange'" in message, message
        assert g["elapsed"] < TIMEOUT_S / 2
        assert torch.equal(bits(g["x"]), bits(ref[rank].x)) and torch.equal(bits(g["y"]), bits(ys[rank]))
