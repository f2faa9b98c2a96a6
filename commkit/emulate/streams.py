"""How the comm stream of an ``EmulatedGroup`` is ordered with the streams of its callers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from commkit.types import EventHandle


def _keep_for_stream(tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
    """Keeps the caller's tensors allocated until the work queued so far on ``stream`` ends."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)


@dataclass
class _StreamSync:
    """How the comm stream is ordered with the callers: per rank (spawn), or one entry for all."""

    streams: list[Any]  # torch.cuda.Stream of each rank's caller (None on CPU)
    events: list[EventHandle | None]  # previous_event of each rank
    async_finish: list[bool]
