"""Steps that can fail on some ranks only, agreed over the group before anything collective follows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def run_agreed(group: dist.ProcessGroup | None, fn: Callable[[], Any]) -> tuple[Any, dict[int, str]]:
    """Runs ``fn`` (a local step) on this rank, then gathers every rank's outcome (collective): ``fn``'s
    value (None if it failed) and ``{rank: "Type: message"}`` of the ranks where it failed, the same
    on every rank, so that all of them can stop together."""
    failure, value = None, None
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - reported to every rank
        failure = f"{type(exc).__name__}: {exc}"
    failures: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(failures, failure, group=group)
    return value, {r: f for r, f in enumerate(failures) if f is not None}


def describe_failed(failed: dict[int, str]) -> str:
    """``ranks [1, 3] (rank 1: ...)``."""
    first = min(failed)
    return f"ranks {sorted(failed)} (rank {first}: {failed[first]})"
