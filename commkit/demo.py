"""A small MoE layer run through dispatch -> experts -> combine, checked against a dense computation.

Every rank builds the same router and experts from a seed, routes its own tokens with top-k, sends
them with ``Buffer.dispatch``, applies its local experts (weighted by the gate, as DeepEP's combine
expects), and brings the outputs back with ``Buffer.combine``. The parent (or rank 0 under torchrun)
computes the same layer densely in one process and compares.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import commkit


@dataclass(frozen=True)
class DemoConfig:
    """tokens: per rank; ffn: the experts' intermediate size."""

    ranks: int = 4
    tokens: int = 256
    hidden: int = 256
    ffn: int = 512
    experts: int = 16
    topk: int = 4
    iters: int = 5
    seed: int = 0
    backend: str = "auto"


@dataclass
class MoEWeights:
    """router [H, E], w_in [E, H, F], w_out [E, F, H], float32."""

    router: torch.Tensor
    w_in: torch.Tensor
    w_out: torch.Tensor


def make_weights(cfg: DemoConfig, device: torch.device | None = None) -> MoEWeights:
    """The same weights on every rank (drawn on the CPU from the seed, then moved to ``device``)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    scale_in, scale_out = cfg.hidden**-0.5, cfg.ffn**-0.5
    return MoEWeights(
        router=torch.randn(cfg.hidden, cfg.experts, generator=gen).to(device),
        w_in=(torch.randn(cfg.experts, cfg.hidden, cfg.ffn, generator=gen) * scale_in).to(device),
        w_out=(torch.randn(cfg.experts, cfg.ffn, cfg.hidden, generator=gen) * scale_out).to(device),
    )


def make_tokens(cfg: DemoConfig, rank: int) -> torch.Tensor:
    """[T, H] bf16 tokens of one rank."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + rank)
    return torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(torch.bfloat16)


def route(x: torch.Tensor, weights: MoEWeights, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router with top-k: x [T, H] -> topk_idx [T, K] int64, gate weights [T, K] float32."""
    probs = torch.softmax(x.float() @ weights.router, dim=-1)
    gate, idx = probs.topk(topk, dim=-1)
    return idx, gate / gate.sum(dim=-1, keepdim=True)


def expert(x: torch.Tensor, weights: MoEWeights, e: int) -> torch.Tensor:
    """One expert MLP in float32: [N, H] -> [N, H]."""
    return torch.nn.functional.gelu(x.float() @ weights.w_in[e]) @ weights.w_out[e]


def dense_layer(x: torch.Tensor, weights: MoEWeights, topk: int) -> torch.Tensor:
    """The whole layer in one process, float32: [T, H] -> [T, H]."""
    idx, gate = route(x, weights, topk)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(weights.router.shape[1]):
        rows, slots = (idx == e).nonzero(as_tuple=True)
        if rows.numel():
            out[rows] += gate[rows, slots, None] * expert(x[rows], weights, e)
    return out


def local_experts(
    recv: commkit.DispatchOutput, weights: MoEWeights, rank: int, per_rank: int
) -> torch.Tensor:
    """Apply this rank's experts to the received rows, weighted by the gate: [N_recv, H] bf16."""
    out = torch.zeros(recv.x.shape[0], recv.x.shape[1], dtype=torch.float32, device=recv.x.device)
    for local in range(per_rank):
        rows, slots = (recv.topk_idx == local).nonzero(as_tuple=True)
        if rows.numel():
            gate = recv.topk_weights[rows, slots, None]
            out[rows] += gate * expert(recv.x[rows], weights, rank * per_rank + local)
    return out.to(torch.bfloat16)


def run_rank(rank: int, world: int, cfg: DemoConfig, buf: commkit.Buffer, barrier: Callable[[], Any]) -> dict:
    """One rank of the demo: routes, dispatches, applies its experts, combines, checks its output.

    ``barrier`` lines the ranks up before each timed repetition (``torch.distributed.barrier`` for
    processes, a thread barrier for virtual ranks).
    """
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if buf.device_type == "cuda"
        else torch.device("cpu")
    )
    weights = make_weights(cfg, device)
    x = make_tokens(cfg, rank).to(device)
    topk_idx, gate = route(x, weights, cfg.topk)
    per_rank = cfg.experts // world
    times, y = [], None
    for _ in range(cfg.iters):
        barrier()
        _sync(device)
        start = time.perf_counter()
        recv = buf.dispatch(x, topk_idx, gate, cfg.experts)
        _sync(device)
        mid = time.perf_counter()
        expert_out = local_experts(recv, weights, rank, per_rank)
        _sync(device)
        resumed = time.perf_counter()
        y = buf.combine(expert_out, recv.handle).x
        _sync(device)
        times.append((mid - start) + (time.perf_counter() - resumed))
    assert y is not None
    want = dense_layer(make_tokens(cfg, rank), make_weights(cfg), cfg.topk)
    err = (y.cpu().float() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    row_bytes = cfg.hidden * 2
    moved = (recv.x.shape[0] + expert_out.shape[0]) * row_bytes  # received rows + rows sent back
    return {"err": err, "seconds": statistics.median(times), "bytes": moved, "backend": buf.backend}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(cfg: DemoConfig, results: list[dict]) -> dict:
    """The table row from every rank's result (each rank compared its output with the dense layer)."""
    worst = max(r["err"] for r in results)
    seconds = max(r["seconds"] for r in results)
    mean_bytes = statistics.mean(r["bytes"] for r in results)
    # bf16 expert outputs and a bf16 result: relative error about 2**-8 per rounding.
    ok = worst < 2e-2
    return {
        "backend": results[0]["backend"],
        "ranks": len(results),
        "tokens": cfg.tokens,
        "hidden": cfg.hidden,
        "topk": cfg.topk,
        "bytes_per_rank": mean_bytes,
        "seconds": seconds,
        "gbps": mean_bytes / seconds / 1e9,
        "max_rel_err": worst,
        "ok": ok,
    }
