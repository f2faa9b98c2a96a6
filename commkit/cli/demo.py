"""``python -m commkit demo``: a small MoE layer through dispatch -> experts -> combine, checked."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import commkit
from commkit.backends import kernels_unavailable_reason
from commkit.cli._common import HelpFormatter
from commkit.demo import DemoConfig, run_rank, summarize


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a small MoE layer through dispatch/combine and check it against a dense computation",
        description=(
            "Runs a MoE layer (softmax router with top-k, experts as MLPs) through dispatch -> experts "
            "-> combine on N ranks: virtual ranks of one GPU running the kernels (commkit.emulate) "
            "when CUDA and CuPy are there, else CPU processes over gloo; under torchrun, its ranks. "
            "Exits non-zero when the result differs from a dense single-process computation."
        ),
        epilog="examples:\n"
        "  python -m commkit demo --ranks 4\n"
        "  torchrun --nproc-per-node=8 -m commkit demo --experts 64",
        formatter_class=HelpFormatter,
    )
    d = DemoConfig()
    p.add_argument("--ranks", type=int, default=d.ranks, help="ranks to spawn (ignored under torchrun)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size H (a multiple of 8)")
    p.add_argument("--ffn", type=int, default=d.ffn, help="experts' intermediate size")
    p.add_argument("--experts", type=int, default=d.experts, help="experts E (a multiple of --ranks)")
    p.add_argument("--topk", type=int, default=d.topk, help="experts per token")
    p.add_argument("--iters", type=int, default=d.iters, help="timed repetitions (median reported)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and inputs")
    p.add_argument(
        "--backend", choices=["auto", "torch", "kernels"], default=d.backend, help="Buffer backend"
    )
    p.set_defaults(func=run)


def _check_args(cfg: DemoConfig) -> None:
    for name in ("ranks", "tokens", "hidden", "ffn", "experts", "topk", "iters"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.hidden % 8:
        raise SystemExit(
            f"--hidden: expected a multiple of 8 (bf16 rows of 16-byte multiples), got {cfg.hidden}"
        )
    if cfg.topk > cfg.experts:
        raise SystemExit(f"--topk: expected <= --experts ({cfg.experts}), got {cfg.topk}")


def _spawned_rank(rank: int, world: int, cfg: DemoConfig) -> dict:
    buf = commkit.Buffer(backend=cfg.backend)
    return run_rank(rank, world, cfg, buf, dist.barrier)


def _under_torchrun(cfg: DemoConfig) -> list[dict] | None:
    """Run as one rank of torchrun; rank 0 gets every rank's result, the others None."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        res = run_rank(rank, world, cfg, commkit.Buffer(backend=cfg.backend), dist.barrier)
        gathered: list[dict | None] = [None] * world
        dist.all_gather_object(gathered, res)
        return [g for g in gathered if g is not None] if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _on_virtual_ranks(cfg: DemoConfig) -> list[dict]:
    """The kernels on ``cfg.ranks`` virtual ranks of this GPU (``commkit.emulate``)."""
    from commkit.tools.ranks import run_virtual

    def rank_fn(ctx) -> dict:
        return run_rank(ctx.rank, ctx.num_ranks, cfg, ctx.make_buffer("kernels"), ctx.barrier)

    return run_virtual(cfg.ranks, rank_fn)


def print_row(row: dict) -> None:
    table = Table(title=f"commkit demo ({row['backend']} backend)")
    for col in ("ranks", "tokens", "hidden", "top-k", "bytes/rank", "time", "GB/s", "max rel err", "result"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_row(
        str(row["ranks"]),
        str(row["tokens"]),
        str(row["hidden"]),
        str(row["topk"]),
        f"{row['bytes_per_rank'] / 1e6:.2f} MB",
        f"{row['seconds'] * 1e3:.2f} ms",
        f"{row['gbps']:.3f}",
        f"{row['max_rel_err']:.2e}",
        "OK" if row["ok"] else "FAIL",
    )
    console = Console()
    console.width = max(console.width, 120)  # rich assumes 80 columns when not on a terminal
    console.print(table)
    print("bytes/rank: rows received by dispatch + rows sent back by combine, bf16; time: dispatch + combine")


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        ranks=args.ranks,
        tokens=args.tokens,
        hidden=args.hidden,
        ffn=args.ffn,
        experts=args.experts,
        topk=args.topk,
        iters=args.iters,
        seed=args.seed,
        backend=args.backend,
    )
    _check_args(cfg)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        results = _under_torchrun(cfg)
        if results is None:
            return 0
        cfg = DemoConfig(**{**cfg.__dict__, "ranks": len(results)})
    else:
        if cfg.experts % cfg.ranks:
            raise SystemExit(f"--experts: expected a multiple of --ranks ({cfg.ranks}), got {cfg.experts}")
        reason = kernels_unavailable_reason()
        if cfg.backend == "kernels" and reason is not None:
            raise SystemExit(f"--backend kernels: cannot run here: {reason}")
        if cfg.backend != "torch" and reason is None:
            results = _on_virtual_ranks(cfg)
        else:
            from commkit.launch import spawn_gloo

            results = spawn_gloo(_spawned_rank, cfg.ranks, cfg, timeout_s=300)
    row = summarize(cfg, results)
    print_row(row)
    return 0 if row["ok"] else 1
