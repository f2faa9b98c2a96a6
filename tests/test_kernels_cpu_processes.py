"""The kernels backend on CPU processes: ``Buffer(backend="kernels")`` over gloo runs the host execution
of the one-node kernels, one rank per process, with each rank's buffer in host shared memory mapped
by every rank (``commkit.backends.shared_memory``): the real ``KernelsBackend`` path, the notify
kernel's count exchange and barriers across processes, against ``commkit.reference`` bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_cases import KCase, bits, compare_dispatch, expected_dispatch, expert_outputs, make_inputs

import commkit
from commkit import reference
from commkit.jit.host import host_unavailable_reason
from commkit.launch import spawn_gloo

pytestmark = pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason()))


def _rank(rank: int, world: int, case: KCase, worst: int | None) -> dict:
    xs, scales, idxs, weights = make_inputs(case)
    buf = commkit.Buffer(backend="kernels", num_sms=case.num_sms, timeout_s=60.0)
    assert buf.backend == "kernels" and buf.device_type == "cpu"
    buf._backend.engine.poison_outputs = True
    want = expected_dispatch(case, xs, scales, idxs, weights)
    ys = expert_outputs([w.x for w in want], case.seed)
    want_y = reference.combine_reference(ys, want, list(case.tokens))
    errors, handle = [], None
    for _ in range(2):  # fresh, then cached through the handle
        x = xs[rank] if scales is None else (xs[rank], scales[rank])  # FP8: the (values, scales) pair
        out = buf.dispatch(x, idxs[rank], weights[rank], case.num_experts, cast_to_fp8=case.dtype == "cast",
                           handle=handle, num_worst_tokens=worst)  # fmt: skip
        errors += compare_dispatch([out], [want[rank]], None if worst is None else [want[rank].x.shape[0]])
        x_in = ys[rank]
        if worst is not None:
            x_in = torch.cat([x_in, torch.zeros(worst - x_in.shape[0], x_in.shape[1], dtype=x_in.dtype)])
        back = buf.combine(x_in, out.handle)
        if not torch.equal(bits(back.x), bits(want_y[rank])):
            errors.append(f"rank {rank}: combine differs")
        handle = out.handle
    files = sorted(Path("/dev/shm").glob("commkit-*"))
    buf.close()
    return {"errors": errors, "files": [str(f) for f in files]}


@pytest.mark.parametrize(
    "case, worst",
    [
        pytest.param(
            KCase((30, 17), hidden=256, num_topk=4, num_experts=16, num_sms=2, seed=1), None, id="2p"
        ),
        pytest.param(
            KCase((25, 0, 40, 9), hidden=256, num_topk=8, num_experts=32, dtype="cast", skew=1.0, seed=2),
            None,
            id="4p-cast",
            marks=pytest.mark.slow,
        ),  # fmt: skip
        pytest.param(
            KCase((12, 33, 20), hidden=128, num_topk=2, num_experts=6, dtype="fp8", seed=3),
            70,
            id="3p-fp8-worst",
            marks=pytest.mark.slow,
        ),  # fmt: skip
    ],
)
def test_kernels_backend_on_cpu_processes(case: KCase, worst: int | None) -> None:
    results = spawn_gloo(_rank, case.num_ranks, case, worst, timeout_s=300)
    for r, res in enumerate(results):
        assert not res["errors"], (r, res["errors"][:5])
        assert not res["files"], (
            f"rank {r}: shared-memory files left after every rank mapped them: {res['files']}"
        )


def _several_nodes(rank: int, world: int) -> str:
    try:
        commkit.Buffer(backend="kernels", num_ranks_per_node=1)
    except commkit.ConfigError as exc:
        return str(exc)
    return "no error"


def test_several_nodes_on_cpu_processes_are_refused() -> None:
    for message in spawn_gloo(_several_nodes, 2, timeout_s=120):
        assert "'kernels' cannot run here" in message


def _slow_compile(rank: int, world: int, case: KCase) -> list[str]:
    """Rank 1 takes 3 s to load each kernel (a compile); every rank's timeout_s is 1 s."""
    import time

    xs, scales, idxs, weights = make_inputs(case)
    buf = commkit.Buffer(backend="kernels", num_sms=case.num_sms, timeout_s=1.0)
    engine = buf._backend.engine
    if rank == 1:
        load = engine.launcher.kernel

        def slow(spec):  # noqa: ANN001, ANN202
            time.sleep(3.0)
            return load(spec)

        engine.launcher.kernel = slow
    want = expected_dispatch(case, xs, scales, idxs, weights)
    out = buf.dispatch(xs[rank], idxs[rank], weights[rank], case.num_experts)
    errors = compare_dispatch([out], [want[rank]])
    back = buf.combine(want[rank].x, out.handle)  # the combine kernel: loaded anew too
    want_y = reference.combine_reference([w.x for w in want], want, list(case.tokens))
    if not torch.equal(bits(back.x), bits(want_y[rank])):
        errors.append(f"rank {rank}: combine differs")
    buf.close()
    return errors


def test_a_peer_compiling_does_not_count_against_timeout_s() -> None:
    """The first barrier of a call that loaded kernels anew waits timeout_s + JIT_TIMEOUT_S."""
    case = KCase((9, 14), hidden=128, num_topk=2, num_experts=4, num_sms=1, seed=7)
    for r, errors in enumerate(spawn_gloo(_slow_compile, 2, case, timeout_s=120)):
        assert not errors, (r, errors[:5])
