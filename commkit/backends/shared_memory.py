"""Symmetric buffers in host shared memory: the one-node kernels as one CPU process per rank.

The host execution of the kernels (``commkit.jit.host``) in processes joined by gloo: each rank's
buffer is a file in ``/dev/shm`` mapped by every rank of the node (what CUDA IPC is for GPUs), so that
``KernelsBackend`` runs the very kernels, the notify kernel's count exchange and barriers included,
across processes. The files are unlinked once every rank has mapped them, so nothing is left behind
if a process dies. One host only: the ranks check that they share it.

NOTE: plain ``mmap`` of files rather than ``multiprocessing.shared_memory``: Python 3.11's resource
tracker unlinks segments that a process merely attached to when it exits.
"""

from __future__ import annotations

import mmap
import os
import socket
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from commkit.backends import kernels_layout as kl
from commkit.backends.symmetric import GroupBuffers
from commkit.errors import CommTimeoutError, ConfigError

SHM_DIR = Path("/dev/shm")


def check_one_host(group: dist.ProcessGroup | None) -> None:
    """Every rank of ``group`` runs on this host (else ``ConfigError`` on every rank)."""
    hosts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) != 1:
        raise ConfigError(
            "backend: 'kernels' on CPU processes shares memory between the ranks of one host, got hosts "
            f"{hosts} (by rank)"
        )


class SharedMemoryBuffers(GroupBuffers):
    """One ``/dev/shm`` file per rank, mapped by every rank; grows as ``IpcBuffers`` does (collective)."""

    def __init__(self, group: dist.ProcessGroup | None, *, timeout_s: float = 60.0) -> None:
        super().__init__(group, torch.device("cpu"), timeout_s=timeout_s)
        self._maps: list[mmap.mmap] = []
        self._views: list[torch.Tensor] = []  # keep the mappings' exports alive while peer_bases is used

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        if self._maps and num_channels <= self.max_channels and slot_bytes <= self.max_slot_bytes:
            return
        max_channels = max(num_channels, self.max_channels)
        max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        # NOTE: every rank reaches here in the same call (same arguments), so this is collective
        dist.barrier(self.group)
        self._release()
        size = kl.total_bytes(max_channels, max_slot_bytes)
        path = SHM_DIR / f"commkit-{uuid.uuid4().hex}-r{self.rank}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)  # zero-filled
        finally:
            os.close(fd)
        paths: list[str | None] = [None] * self.num_ranks
        dist.all_gather_object(paths, str(path), group=self.group)
        for peer_path in paths:
            assert peer_path is not None
            fd = os.open(peer_path, os.O_RDWR)
            try:
                self._maps.append(mmap.mmap(fd, size))
            finally:
                os.close(fd)
        dist.barrier(self.group)  # every rank mapped every file: the names can go
        path.unlink()
        self._views = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self.peer_bases = torch.tensor([v.data_ptr() for v in self._views], dtype=torch.int64)
        self.max_channels, self.max_slot_bytes = max_channels, max_slot_bytes

    def close(self) -> None:
        """Collective: waits (at most ``timeout_s``) until every rank is done, then unmaps."""
        if not self._maps:
            return
        try:
            work = dist.barrier(self.group, async_op=True)
            if work is not None:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - the mappings stay: a peer may still write
            raise CommTimeoutError(
                f"close: not every rank reached the barrier before unmapping the shared buffers within "
                f"timeout_s={self.timeout_s:g}s ({type(exc).__name__}: {exc})"
            ) from exc
        self._release()

    def _release(self) -> None:
        self.peer_bases = None
        self._views = []  # the exports go before the mappings close
        for m in self._maps:
            m.close()
        self._maps = []
        self.max_channels = self.max_slot_bytes = 0
