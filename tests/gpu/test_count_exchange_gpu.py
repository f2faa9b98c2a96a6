"""GPU: the process-group count exchange and barrier of the multi-node kernels on CUDA tensors over a
world-size-1 NCCL group: the same meta as on CPU, the call-format agreement computed on the device,
no host sync (``set_sync_debug_mode("error")``) and capturable in a CUDA graph after a warm-up call.
(Disagreeing ranks need several processes on several GPUs: the CPU tests cover them over gloo.)"""

from __future__ import annotations

import pytest
import torch

from commkit.backends.count_exchange import CallFormat, GroupCountExchange

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def exchange(nccl_world_of_one):  # noqa: ANN001, ANN201
    return GroupCountExchange(None, device=torch.device("cuda", 0), timeout_s=30.0)


FMT = CallFormat("dispatch", 8, 1024, 4, 0, 4, 64)


def _counts() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([5], dtype=torch.int32, device="cuda"), torch.arange(
        8, dtype=torch.int32, device="cuda"
    )


def test_exchange_and_barrier_on_cuda(exchange) -> None:
    per_rank, per_expert = _counts()
    meta, agreement = exchange.notify(per_rank, per_expert, 9, 64, FMT)
    assert meta.is_cuda and meta.cpu()[0].tolist() == [0, 5, 9, *range(8)]
    assert bool(agreement.agree) and agreement.error(agreement.host_values()) is None
    barrier = exchange.barrier(CallFormat("combine", 8, 1024, 0, 0, 4))
    assert bool(barrier.agree) and barrier.error(barrier.host_values()) is None


def test_no_host_sync(exchange) -> None:
    per_rank, per_expert = _counts()
    exchange.notify(per_rank, per_expert, 9, 64, FMT)  # warm-up: the format's device tensor
    exchange.barrier(CallFormat("cached dispatch", 8, 1024, 4, 0, 4, 64))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, agreement = exchange.notify(per_rank, per_expert, 9, 64, FMT)
        agreement.check()  # a device-side assert
        exchange.barrier(CallFormat("cached dispatch", 8, 1024, 4, 0, 4, 64)).check()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_in_a_cuda_graph(exchange) -> None:
    per_rank, per_expert = _counts()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        exchange.notify(per_rank, per_expert, 9, 64, FMT)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            meta, agreement = exchange.notify(per_rank, per_expert, 9, 64, FMT)
            agreement.check()
    graph.replay()
    torch.cuda.synchronize()
    assert meta.cpu()[0].tolist() == [0, 5, 9, *range(8)]
