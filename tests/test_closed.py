"""After ``Buffer.close()`` every call raises a clear ``CommError`` naming the call, on every backend
(torch flat and two-level, the one-node kernels through the host execution on CPU processes); the
backward of a call made before the close raises it too; a second close does nothing."""

from __future__ import annotations

import pytest
from cases import Case, expert_output, make_inputs

import commkit
from commkit.jit.host import host_unavailable_reason
from commkit.launch import spawn_gloo

WORLD = 2
CASE = Case("closed", (12, 7), hidden=128, num_experts=4, seed=5)
HOST_REASON = host_unavailable_reason()
BACKENDS = [
    pytest.param("torch", WORLD, id="torch"),
    pytest.param("torch", 1, id="torch-two-level"),
    pytest.param(
        "kernels", WORLD, id="kernels-host",
        marks=pytest.mark.skipif(HOST_REASON is not None, reason=str(HOST_REASON)),
    ),
]  # fmt: skip


def _after_close(rank: int, world: int, backend: str, per_node: int) -> dict:
    buf = commkit.Buffer(backend=backend, num_ranks_per_node=per_node, timeout_s=30.0)
    x, idx, w = make_inputs(CASE, rank)
    x = x.clone().requires_grad_(True)
    out = buf.dispatch(x, idx, w, CASE.num_experts)
    buf.close()
    buf.close()  # a second close does nothing
    calls = {
        "dispatch": lambda: buf.dispatch(x.detach(), idx, w, CASE.num_experts),
        "cached dispatch": lambda: buf.dispatch(x.detach(), idx, w, CASE.num_experts, handle=out.handle),
        "combine": lambda: buf.combine(expert_output(out.x.detach(), rank), out.handle),
        "get_dispatch_layout": lambda: buf.get_dispatch_layout(idx, CASE.num_experts),
        "set_knobs": lambda: buf.set_knobs(internode_dispatch_forwarder_warps=4),
        "backward": lambda: out.x.float().sum().backward(),
    }
    got = {}
    for name, call in calls.items():
        try:
            call()
            got[name] = ("no error", "")
        except Exception as exc:  # noqa: BLE001 - the test checks it
            got[name] = (type(exc).__name__, str(exc))
    return got


@pytest.mark.parametrize("backend, per_node", BACKENDS)
def test_every_call_after_close_raises(backend: str, per_node: int) -> None:
    for rank, got in enumerate(spawn_gloo(_after_close, WORLD, backend, per_node, timeout_s=120)):
        for name, (kind, message) in got.items():
            where = f"rank {rank}, {name}: {kind}: {message}"
            assert kind == "CommError", where
            assert "this buffer was closed" in message and "make a new Buffer" in message, where
            call = {"cached dispatch": "dispatch", "backward": "combine"}.get(name, name)
            assert f"Buffer.{call}:" in message, where
