"""Run a function on N CPU processes joined by a gloo process group (no GPU needed).

Used by ``python -m commkit demo``, the benchmarks on CPU and the tests. Every wait is bounded: a
process that dies, raises or hangs makes ``spawn_gloo`` raise, naming the rank.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised, died or did not finish; the message carries its traceback when there is one."""


def _dumps(obj: Any) -> bytes:
    # torch.save copies tensor data (every dtype, views included) into the bytes.
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _loads(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=False)


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    timeout_s: float,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        out = fn(rank, world_size, *args)
        payload = _dumps(("ok", out))
    except BaseException:  # noqa: BLE001 - the parent reports it
        payload = _dumps(("error", traceback.format_exc()))
    results.put((rank, payload))
    results.close()
    results.join_thread()  # flush the queue's feeder thread before the hard exit
    # NOTE: no destroy_process_group barrier: a rank that failed must not wait for the others.
    os._exit(0)


def _collect_dead(procs: list[Any], got: dict[int, Any], results: Any, allow_failures: bool) -> None:
    """Ranks that exited without a result: a failure (after draining what they may have sent)."""
    dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
    if not dead:
        return
    try:
        while True:
            rank, payload = results.get(timeout=1.0)
            status, value = _loads(payload)
            got[rank] = value if status == "ok" else RankFailed(f"rank {rank} failed:\n{value}")
    except queue.Empty:
        pass
    for r in dead:
        if r in got and not (isinstance(got[r], RankFailed) and not allow_failures):
            continue
        failure = got.get(r) or RankFailed(f"rank {r} died without a result (exit code {procs[r].exitcode})")
        if not allow_failures:
            raise failure
        got[r] = failure


def spawn_gloo(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    allow_failures: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes over gloo; return the results.

    ``fn`` must be importable (a module-level function). With ``allow_failures`` a rank's failure
    is returned as a ``RankFailed`` in its slot instead of raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="commkit-gloo-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(
                target=_worker, args=(fn, r, world_size, init_file, timeout_s, args, results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        got: dict[int, Any] = {}
        try:
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
            while len(got) < world_size:
                left = (deadline - datetime.datetime.now()).total_seconds()
                if left <= 0:
                    missing = sorted(set(range(world_size)) - set(got))
                    raise RankFailed(f"ranks {missing} did not finish within {timeout_s:g} s")
                try:
                    rank, payload = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    _collect_dead(procs, got, results, allow_failures)
                    continue
                status, value = _loads(payload)
                if status == "ok":
                    got[rank] = value
                elif allow_failures:
                    got[rank] = RankFailed(f"rank {rank} failed:\n{value}")
                else:
                    raise RankFailed(f"rank {rank} failed:\n{value}")
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return [got[r] for r in range(world_size)]
