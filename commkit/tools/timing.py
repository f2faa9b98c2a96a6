"""Repetition statistics and timers.

A measurement is a list of per-repetition times in seconds; each repetition starts after a barrier and
(on CUDA) after the L2 cache was flushed, and its time is the slowest rank's (all-reduce MAX), as a
collective ends only when its last rank does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TimeStats:
    """Seconds over repetitions."""

    median_s: float
    min_s: float
    max_s: float
    reps: int

    @classmethod
    def of(cls, times_s: Sequence[float]) -> TimeStats:
        if not times_s:
            raise ValueError("no repetitions to summarise")
        return cls(
            median_s=statistics.median(times_s), min_s=min(times_s), max_s=max(times_s), reps=len(times_s)
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def gbps(num_bytes: float, seconds: float) -> float:
    """Decimal GB/s (1e9 bytes per second), as nccl-tests and DeepEP report."""
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {seconds}")
    return num_bytes / seconds / 1e9


def tflops(flops: float, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {seconds}")
    return flops / seconds / 1e12


class L2Flusher:
    """Writes a buffer twice the L2 size so the next kernel starts with a cold cache (CUDA only)."""

    def __init__(self, device: torch.device) -> None:
        props = torch.cuda.get_device_properties(device)
        # NOTE: L2 size is not reported by every torch build; 50 MiB covers H100 (50 MB) and H200.
        l2_bytes = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        self._buf = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self._buf.zero_()


def time_collective(
    fn: Callable[[int], object],
    *,
    reps: int,
    warmup: int,
    barrier: Callable[[], None],
    max_across_ranks: Callable[[float], float],
    before: Callable[[int], None] | None = None,
    after: Callable[[int, Any], None] | None = None,
    cuda: bool = False,
) -> list[float]:
    """Time ``fn(rep)`` ``reps`` times after ``warmup`` untimed calls.

    Each repetition: ``before(rep)`` (untimed: flush L2), barrier, timed ``fn``, then
    ``after(rep, result)`` (untimed: check the output); the repetition's time is the slowest
    rank's. On CUDA the time comes from events around ``fn`` on the
    current stream, on CPU from ``time.perf_counter``.
    """
    for rep in range(warmup):
        if before is not None:
            before(rep)
        fn(rep)
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    for rep in range(reps):
        if before is not None:
            before(rep)
        if cuda:
            torch.cuda.synchronize()
        barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(rep)
            end.record()
            end.synchronize()
            local = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            out = fn(rep)
            local = time.perf_counter() - t0
        times.append(max_across_ranks(local))
        if after is not None:
            after(rep, out)
    return times
