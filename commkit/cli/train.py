"""``python -m commkit train``: train a small MoE model with expert parallelism, compare with dense."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch
import torch.distributed as dist

import commkit
from commkit.train import (
    TrainConfig,
    check_config,
    compare,
    format_step,
    spawned_rank,
    train_dense,
    train_rank,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a small MoE model through dispatch/combine and compare with dense training",
        description=(
            "Trains one commkit.nn.MoE layer (sigmoid gating, shared expert, auxiliary-loss-free bias "
            "balancing) on a synthetic regression task for --steps SGD steps with expert parallelism: "
            "CPU processes over gloo by default, one rank per process under torchrun (the kernels on "
            "GPUs). Prints per step the loss, tokens/s and the expert load max/mean, then trains the same "
            "model densely in one process and exits non-zero when the loss curves differ by more than "
            "--tolerance (relative, at any step)."
        ),
    )
    d = TrainConfig()
    p.add_argument(
        "--ranks", type=int, default=d.ranks, help="gloo processes to spawn (ignored under torchrun)"
    )
    p.add_argument("--ranks-per-node", type=int, default=None, help="G: ranks per node (default: one node)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank and step")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--ffn", type=int, default=d.ffn, help="the experts' intermediate size")
    p.add_argument(
        "--shared", type=int, default=d.shared, help="the shared expert's intermediate size (0: none)"
    )
    p.add_argument("--experts", type=int, default=d.experts)
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--bias-rate", type=float, default=d.bias_rate, help="balancing bias step (0: off)")
    p.add_argument(
        "--fp8", action="store_true", help="FP8 dispatch (cast_to_fp8; --hidden a multiple of 128)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", choices=["auto", "torch", "kernels"], default=d.backend)
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="relative loss difference allowed")
    p.add_argument("--json", metavar="PATH", help="also write the steps and the verdict as JSON")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace, ranks: int | None = None) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if ranks is not None:
        values["ranks"] = ranks
    return TrainConfig(**values)


def _under_torchrun(args: argparse.Namespace) -> tuple[TrainConfig, list[dict]] | None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        cfg = _config(args, ranks=world)
        check_config(cfg)
        buf = commkit.Buffer(backend=cfg.backend, num_ranks_per_node=cfg.ranks_per_node)
        records = train_rank(rank, world, cfg, buf, log=print)
        return (cfg, records) if rank == 0 else None
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            got = _under_torchrun(args)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        if got is None:
            return 0
        cfg, records = got
    else:
        cfg = _config(args)
        try:
            check_config(cfg)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        from commkit.launch import spawn_gloo

        print(f"expert-parallel: {cfg.ranks} gloo processes, {cfg.steps} steps", flush=True)
        records = spawn_gloo(spawned_rank, cfg.ranks, cfg, timeout_s=1800)[0]
    print(f"dense: the same model in one process, {cfg.steps} steps", flush=True)
    dense = train_dense(cfg)
    verdict = compare(cfg, records, dense)
    print(
        f"loss {verdict['loss_first']:.6f} -> {verdict['loss_last']:.6f} "
        f"(dense {dense[0]:.6f} -> {dense[-1]:.6f}); "
        f"load max/mean {verdict['load_first']:.3f} -> {verdict['load_last']:.3f}; "
        f"max relative loss difference {verdict['max_rel_diff']:.2e} (tolerance {cfg.tolerance:g}): "
        f"{'OK' if verdict['ok'] else 'FAIL'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(verdict, f, indent=2)
    return 0 if verdict["ok"] else 1


__all__ = ["format_step", "register", "run"]
