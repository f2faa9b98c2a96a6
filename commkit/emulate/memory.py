"""The memory of virtual ranks: R ranks' symmetric buffers carved out of one device allocation.

A peer's buffer is a region of the same allocation, so the kernels' peer stores are plain stores into
it; ``peer_bases`` holds each region's address, by rank.
"""

from __future__ import annotations

import torch

from commkit.backends import kernels_layout as kl
from commkit.backends.symmetric import SymmetricBuffers


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EmulatedBuffers(SymmetricBuffers):
    """R symmetric buffers carved out of one zeroed allocation (4 KiB aligned regions)."""

    def __init__(self, num_ranks: int, device: torch.device) -> None:
        self.num_ranks = num_ranks
        self.device = device
        self.max_channels = 0
        self.max_slot_bytes = 0
        self.peer_bases: torch.Tensor | None = None
        self._storage: torch.Tensor | None = None

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        if (
            self._storage is not None
            and num_channels <= self.max_channels
            and slot_bytes <= self.max_slot_bytes
        ):
            return
        _synchronize(self.device)  # nothing may still use the old buffers
        self.max_channels = max(num_channels, self.max_channels)
        self.max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        stride = kl.align_up(kl.total_bytes(self.max_channels, self.max_slot_bytes), 4096)
        self._storage = None
        self._storage = torch.zeros(self.num_ranks * stride, dtype=torch.uint8, device=self.device)
        base = self._storage.data_ptr()
        self.peer_bases = torch.tensor(
            [base + r * stride for r in range(self.num_ranks)], dtype=torch.int64, device=self.device
        )
        _synchronize(self.device)
