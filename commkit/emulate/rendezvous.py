"""The rendezvous of ``EmulatedGroup.spawn``: one thread per virtual rank, and a barrier where their
collective calls meet; the last rank to arrive runs the one launch for all (the barrier's action)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from commkit.emulate.streams import _StreamSync
from commkit.emulate.virtual_rank import VirtualRank
from commkit.errors import CommError, CommTimeoutError

if TYPE_CHECKING:
    from commkit.emulate.group import EmulatedGroup


def _check_same(per_rank: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        values = [a.get(name, default) for a in per_rank]
        if any(v != values[0] for v in values):
            raise ValueError(f"{name}: expected the same value on every virtual rank, got {values} (by rank)")


def _spawn(group: EmulatedGroup, fn: Callable[[VirtualRank], Any]) -> list[Any]:
    results: list[Any] = [None] * group.num_ranks
    failures: list[BaseException] = []  # in the order they happened: the first is the cause
    lock = threading.Lock()
    group._failure = None

    def body(rank: int) -> None:
        try:
            if group.device.type == "cuda":
                torch.cuda.set_device(group.device)
            results[rank] = fn(VirtualRank(group, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            with lock:
                failures.append(exc)
                if group._failure is None:
                    group._failure = (rank, exc)
            group._barrier.abort()  # the other ranks must not wait for this one forever

    threads = [
        threading.Thread(target=body, args=(r,), name=f"commkit-virtual-rank-{r}")
        for r in range(group.num_ranks)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group._barrier.reset()
    group._failure = None
    if failures:
        raise failures[0]
    return results


def _collective(group: EmulatedGroup, rank: int, op: str, args: dict[str, Any]) -> Any:
    # The caller's stream of this rank: the launch runs in whichever thread arrives last
    args["stream"] = torch.cuda.current_stream(group.device) if group.device.type == "cuda" else None
    group._calls[rank] = (op, args)
    start = time.monotonic()
    try:
        group._barrier.wait(timeout=group.timeout_s)  # the barrier's action runs the launch
    except threading.BrokenBarrierError:
        waited = time.monotonic() - start
        failure = group._failure
        if failure is not None and failure[0] != rank:
            other, exc = failure
            raise CommError(
                f"{op}: virtual rank {rank} stopped waiting after {waited:.3g}s: virtual rank {other} "
                f"failed instead of making the same call ({type(exc).__name__}: {exc})"
            ) from None
        if waited >= group.timeout_s:
            raise CommTimeoutError(
                f"{op}: virtual rank {rank} waited timeout_s={group.timeout_s:g}s for the other virtual "
                "ranks to make the same call"
            ) from None
        raise CommTimeoutError(
            f"{op}: virtual rank {rank} stopped waiting after {waited:.3g}s: another virtual rank timed out "
            f"(timeout_s={group.timeout_s:g}) or the group was aborted before all ranks made the same call"
        ) from None
    result = group._results[rank]
    if isinstance(result, BaseException):
        raise result
    return result


def _execute(group: EmulatedGroup) -> None:
    """Runs one collective call for all virtual ranks (the barrier action, in one thread)."""
    calls = list(group._calls)
    ops = {op for op, _ in calls}
    try:
        if len(ops) != 1:
            raise RuntimeError(f"virtual ranks made different calls: {[op for op, _ in calls]} (by rank)")
        op = ops.pop()
        per_rank = [args for _, args in calls]
        first = per_rank[0]
        sync = _StreamSync(
            [a["stream"] for a in per_rank],
            [a.get("previous_event") for a in per_rank],
            [bool(a.get("async_finish", False)) for a in per_rank],
        )
        _check_same(per_rank, {"num_experts": None})
        if op == "layout":
            results: list[Any] = group.get_dispatch_layout(
                [a["topk_idx"] for a in per_rank], first["num_experts"], _sync=sync
            )
        elif op == "dispatch":
            _check_same(
                per_rank,
                {"num_sms": None, "expert_alignment": 1, "cast_to_fp8": False, "num_worst_tokens": None},
            )
            if len({a["x_scales"] is None for a in per_rank}) != 1:
                raise ValueError(
                    f"x_scales: expected FP8 scales on every virtual rank or on none, got "
                    f"{['scales' if a['x_scales'] is not None else None for a in per_rank]} (by rank)"
                )
            handles = [a["handle"] for a in per_rank]
            if len({h is None for h in handles}) != 1:
                raise ValueError(
                    f"handle: expected a handle on every virtual rank or on none, got "
                    f"{['handle' if h is not None else None for h in handles]} (by rank)"
                )
            results = group.dispatch(
                [a["x"] for a in per_rank],
                [a["topk_idx"] for a in per_rank],
                [a["topk_weights"] for a in per_rank],
                first["num_experts"],
                x_scales=[a["x_scales"] for a in per_rank] if first["x_scales"] is not None else None,
                cast_to_fp8=bool(first.get("cast_to_fp8", False)),
                handles=handles if handles[0] is not None else None,
                expert_alignment=first["expert_alignment"],
                num_sms=first["num_sms"],
                num_worst_tokens=first.get("num_worst_tokens"),
                _sync=sync,
            )
            for out, a in zip(results, per_rank, strict=True):
                if a["buffer_id"] is not None:
                    out.handle.buffer_id = a["buffer_id"]
        else:
            _check_same(per_rank, {"num_sms": None})
            results = group.combine(
                [a["x"] for a in per_rank],
                [a["handle"] for a in per_rank],
                num_sms=first["num_sms"],
                _sync=sync,
            )
        group._results = results
    except BaseException as exc:  # noqa: BLE001 - every rank raises it
        group._results = [exc] * group.num_ranks
