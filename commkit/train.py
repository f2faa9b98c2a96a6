"""The training job of ``python -m commkit train``: a small MoE model on a synthetic regression task,
trained with expert parallelism over a group, then the same model trained densely in one process.

Task: tokens x [T, H] (skewed towards a few experts' router rows, so that balancing has work to do)
and targets ``tanh(x @ A) @ B`` of a fixed random teacher. Model: one ``commkit.nn.MoE`` layer
(sigmoid gating, a shared expert, auxiliary-loss-free bias balancing). Loss: the mean squared error
over all ranks' tokens (each rank's mean, averaged over ranks). Optimizer: SGD; the replicated
parameters' (router, shared expert) gradients are summed over the group, the experts' are complete
on their rank.

Each step reports the loss (over all ranks), tokens/s (all ranks' tokens over rank 0's step time:
forward, backward, the gradient all-reduce and the update) and the expert load max/mean of the step
(summed over the group). The dense run takes the same steps on the same tokens (rank by rank, so the
router sees the same shapes) and the job compares the two loss curves: they agree when every step's
losses differ by at most ``tolerance`` relative.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

import commkit
from commkit.nn import MoE
from commkit.nodes import Nodes


@dataclass(frozen=True)
class TrainConfig:
    """tokens: per rank and step; ffn: the experts' intermediate size; shared: the shared expert's
    (0: none); tolerance: the relative loss difference allowed at any step."""

    ranks: int = 4
    ranks_per_node: int | None = None
    tokens: int = 128
    hidden: int = 128
    ffn: int = 64
    shared: int = 32
    experts: int = 16
    topk: int = 2
    steps: int = 20
    lr: float = 0.3
    bias_rate: float = 0.01
    fp8: bool = False
    seed: int = 0
    backend: str = "auto"
    tolerance: float = 0.02


def check_config(cfg: TrainConfig) -> None:
    """Raises ValueError naming the option, what was expected and what came."""
    for name in ("ranks", "tokens", "hidden", "ffn", "experts", "topk", "steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.shared < 0:
        raise ValueError(f"--shared: expected >= 0, got {cfg.shared}")
    if cfg.hidden % (128 if cfg.fp8 else 8):
        raise ValueError(f"--hidden: expected a multiple of {128 if cfg.fp8 else 8}, got {cfg.hidden}")
    if cfg.topk > cfg.experts:
        raise ValueError(f"--topk: expected at most --experts ({cfg.experts}), got {cfg.topk}")
    if cfg.experts % cfg.ranks:
        raise ValueError(f"--experts: expected a multiple of --ranks ({cfg.ranks}), got {cfg.experts}")
    Nodes.of(cfg.ranks, cfg.ranks_per_node, name="--ranks-per-node")
    if not cfg.lr > 0 or not cfg.tolerance > 0 or cfg.bias_rate < 0:
        raise ValueError(
            f"--lr, --tolerance, --bias-rate: expected > 0, > 0, >= 0, got {cfg.lr}, {cfg.tolerance}, "
            f"{cfg.bias_rate}"
        )


def make_model(cfg: TrainConfig, buffer: Any = None, device: torch.device | None = None) -> MoE:
    return MoE(
        cfg.hidden, cfg.ffn, cfg.experts, cfg.topk, buffer=buffer, gating="sigmoid",
        shared_ffn_hidden=cfg.shared, bias_update_rate=cfg.bias_rate, fp8_dispatch=cfg.fp8,
        seed=cfg.seed, device=device,
    )  # fmt: skip


def batch(cfg: TrainConfig, step: int, rank: int, lean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens [T, H] bf16 and targets [T, H] float32 of step ``step`` (CPU)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 4099 + rank)
    teacher = torch.Generator().manual_seed(cfg.seed + 31337)
    a = torch.randn(cfg.hidden, cfg.hidden, generator=teacher) * cfg.hidden**-0.5
    b = torch.randn(cfg.hidden, cfg.hidden, generator=teacher) * cfg.hidden**-0.5
    x = (torch.randn(cfg.tokens, cfg.hidden, generator=gen) + lean).to(torch.bfloat16)
    return x, torch.tanh(x.float() @ a) @ b


def skew(model: MoE) -> torch.Tensor:
    """[H]: a lean of the tokens towards the first two experts' router rows (a skewed load)."""
    rows = model.router.weight[:2].detach().float().cpu().sum(dim=0)
    return 0.3 * rows / rows.norm() * model.hidden**0.5


def train_rank(
    rank: int, world: int, cfg: TrainConfig, buf: commkit.Buffer, log: Callable[[str], None] | None = None
) -> list[dict]:
    """One rank of the expert-parallel run; returns per-step records (loss over ranks, seconds, load)."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if buf.device_type == "cuda"
        else torch.device("cpu")
    )
    model = make_model(cfg, buf, device)
    lean = skew(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    records = []
    for step in range(cfg.steps):
        x, target = (t.to(device) for t in batch(cfg, step, rank, lean))
        dist.barrier(group=buf.group)
        start = time.perf_counter()
        opt.zero_grad()
        loss = (model(x).float() - target).square().mean() / world
        loss.backward()
        for p in model.replicated_parameters():
            dist.all_reduce(p.grad, group=buf.group)
        opt.step()
        load = model.update_bias()
        total = loss.detach().reshape(1)
        dist.all_reduce(total, group=buf.group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        rec = dict(
            step=step,
            loss=float(total),
            seconds=seconds,
            tokens_per_s=cfg.tokens * world / seconds,
            load_max_over_mean=float(load.max() / load.mean().clamp_min(1e-9)),
        )
        records.append(rec)
        if log is not None and rank == 0:
            log(format_step(rec))
    return records


def train_dense(cfg: TrainConfig) -> list[float]:
    """The same model and steps densely in one process (single-threaded, as the ranks): the loss curve."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(cfg)
        lean = skew(model)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        curve = []
        for step in range(cfg.steps):
            opt.zero_grad()
            loss = torch.zeros(())
            for rank in range(cfg.ranks):
                x, target = batch(cfg, step, rank, lean)
                loss = loss + (model(x).float() - target).square().mean() / cfg.ranks
            loss.backward()
            opt.step()
            model.update_bias()
            curve.append(float(loss.detach()))
        return curve
    finally:
        torch.set_num_threads(threads)


def format_step(rec: dict) -> str:
    return (
        f"step {rec['step']:4d}  loss {rec['loss']:.6f}  tokens/s {rec['tokens_per_s']:10.1f}  "
        f"load max/mean {rec['load_max_over_mean']:.3f}"
    )


def compare(cfg: TrainConfig, records: list[dict], dense: list[float]) -> dict:
    """The verdict: per-step relative differences of the loss curves against ``cfg.tolerance``."""
    diffs = [abs(r["loss"] - d) / max(abs(d), 1e-12) for r, d in zip(records, dense, strict=True)]
    worst = max(diffs)
    return dict(
        config=asdict(cfg),
        steps=records,
        dense_loss=dense,
        max_rel_diff=worst,
        loss_first=records[0]["loss"],
        loss_last=records[-1]["loss"],
        load_first=records[0]["load_max_over_mean"],
        load_last=records[-1]["load_max_over_mean"],
        ok=worst <= cfg.tolerance,
    )


def spawned_rank(rank: int, world: int, cfg: TrainConfig) -> list[dict]:
    """A gloo process of ``spawn_gloo``: prints rank 0's steps as they go."""
    buf = commkit.Buffer(backend=cfg.backend, num_ranks_per_node=cfg.ranks_per_node)
    return train_rank(rank, world, cfg, buf, log=lambda line: print(line, flush=True))
