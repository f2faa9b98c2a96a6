"""GPU: the per-process ``KernelsBackend`` (CUDA IPC buffers, one rank per process) through
``commkit.Buffer(backend="kernels")`` on a world-size-1 NCCL group, against commkit.reference bit for
bit; then the ``num_worst_tokens`` dispatch without host syncs (``set_sync_debug_mode("error")``) and
under CUDA-graph capture after one warm-up call.
"""

from __future__ import annotations

import pytest
import torch

from commkit import reference

pytestmark = pytest.mark.gpu

TOKENS, HIDDEN, TOPK, EXPERTS, ALIGN, NUM_SMS = 300, 1024, 4, 8, 4, 4


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(
        {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float8_e4m3fn: torch.uint8}.get(
            t.dtype, t.dtype
        )
    )


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU inputs: x [T, H] bf16, topk_idx [T, K] int64 with unused (-1) slots and tokens that go
    nowhere, topk_weights [T, K] float32."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(TOKENS, HIDDEN, generator=gen) * 3).to(torch.bfloat16)
    idx = torch.rand(TOKENS, EXPERTS, generator=gen).topk(TOPK, dim=1).indices
    idx = torch.where(torch.rand(TOKENS, TOPK, generator=gen) < 0.25, -1, idx)
    idx[::17] = -1  # tokens that go nowhere
    w = torch.rand(TOKENS, TOPK, generator=gen)
    return x, idx.to(torch.int64).contiguous(), w


@pytest.fixture(scope="module")
def buf(nccl_world_of_one):  # noqa: ANN001, ANN201
    import commkit

    buffer = commkit.Buffer(backend="kernels", num_sms=NUM_SMS, timeout_s=30.0)
    assert buffer.backend == "kernels"
    yield buffer
    torch.cuda.synchronize()
    buffer.close()


def _check_dispatch(out, want, num_rows: int | None = None) -> None:
    n = want.x.shape[0]
    assert out.x.shape[0] == (n if num_rows is None else num_rows)
    assert torch.equal(_bits(out.x[:n].cpu()), _bits(want.x))
    assert torch.equal(out.topk_idx[:n].cpu(), want.topk_idx)
    assert torch.equal(_bits(out.topk_weights[:n].cpu()), _bits(want.topk_weights))
    if want.x_scales is not None:
        assert torch.equal(_bits(out.x_scales[:n].cpu()), _bits(want.x_scales))
    if num_rows is not None:  # padding rows: not routed
        assert bool((out.topk_idx[n:] == -1).all()) and bool((out.topk_weights[n:] == 0).all())


def test_dispatch_combine_match_the_reference(buf) -> None:
    x, idx, w = _inputs(seed=1)
    (want,) = reference.dispatch_reference([x], [idx], [w], EXPERTS, expert_alignment=ALIGN)
    out = buf.dispatch(x.cuda(), idx.cuda(), w.cuda(), EXPERTS, expert_alignment=ALIGN)
    _check_dispatch(out, want)
    assert out.num_tokens_per_expert == want.num_tokens_per_expert

    again = buf.dispatch(x.cuda(), idx.cuda(), w.cuda(), EXPERTS, handle=out.handle, expert_alignment=ALIGN)
    _check_dispatch(again, want)

    gen = torch.Generator().manual_seed(2)
    y_in = (torch.randn(want.x.shape[0], HIDDEN, generator=gen) * 2).to(torch.bfloat16)
    (want_y,) = reference.combine_reference([y_in], [want], [TOKENS])
    # a larger budget than the dispatch's: the IPC buffers were sized for the device's SMs
    channels = buf._backend.buffers.max_channels
    y = buf.combine(y_in.cuda(), out.handle, num_sms=2 * NUM_SMS)
    assert buf._backend.buffers.max_channels == channels
    assert torch.equal(_bits(y.x.cpu()), _bits(want_y))


def test_cast_to_fp8_matches_the_reference(buf) -> None:
    from commkit.fp8 import cast_to_fp8

    x, idx, w = _inputs(seed=3)
    q, s = cast_to_fp8(x)
    (want,) = reference.dispatch_reference([q], [idx], [w], EXPERTS, x_scales=[s])
    out = buf.dispatch(x.cuda(), idx.cuda(), w.cuda(), EXPERTS, cast_to_fp8=True)
    _check_dispatch(out, want)


def test_worst_tokens_dispatch_has_no_host_sync(buf) -> None:
    x, idx, w = _inputs(seed=4)
    (want,) = reference.dispatch_reference([x], [idx], [w], EXPERTS)
    args = (x.cuda(), idx.cuda(), w.cuda(), EXPERTS)
    buf.dispatch(*args, num_worst_tokens=TOKENS)  # warm-up: kernels loaded, offsets cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = buf.dispatch(*args, num_worst_tokens=TOKENS)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _check_dispatch(out, want, num_rows=TOKENS)
    assert out.num_tokens_per_expert == []


def test_worst_tokens_dispatch_in_a_cuda_graph(buf) -> None:
    x, idx, w = _inputs(seed=5)
    static_x, static_idx, static_w = x.cuda(), idx.cuda(), w.cuda()
    warm = buf.dispatch(static_x, static_idx, static_w, EXPERTS, num_worst_tokens=TOKENS)
    (want,) = reference.dispatch_reference([x], [idx], [w], EXPERTS)
    _check_dispatch(warm, want, num_rows=TOKENS)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = buf.dispatch(static_x, static_idx, static_w, EXPERTS, num_worst_tokens=TOKENS)
    torch.cuda.synchronize()

    # New inputs and a new routing (R = 1: at most T rows arrive, within num_worst_tokens)
    for seed in (6, 7):
        x2, idx2, w2 = _inputs(seed)
        static_x.copy_(x2)
        static_idx.copy_(idx2)
        static_w.copy_(w2)
        graph.replay()
        torch.cuda.synchronize()
        (want2,) = reference.dispatch_reference([x2], [idx2], [w2], EXPERTS)
        _check_dispatch(out, want2, num_rows=TOKENS)

    # The captured handle serves an eager combine (its state lives in the graph's memory)
    gen = torch.Generator().manual_seed(8)
    n = want2.x.shape[0]
    y_in = (torch.randn(TOKENS, HIDDEN, generator=gen) * 2).to(torch.bfloat16)
    (want_y,) = reference.combine_reference([y_in[:n]], [want2], [TOKENS])
    y = buf.combine(y_in.cuda(), out.handle)
    assert torch.equal(_bits(y.x.cpu()), _bits(want_y))
    del graph
