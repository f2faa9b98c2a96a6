"""Symmetric buffers: one buffer per rank with the same layout everywhere, reached by the kernels
through the peers' base pointers. ``IpcBuffers`` allocates one per process and exchanges CUDA IPC
handles over the process group; ``commkit.emulate`` carves R of them out of one allocation. Nothing
in the kernels knows how the pointers were obtained.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commkit.backends import kernels_layout as kl
from commkit.errors import CommTimeoutError


class SymmetricBuffers:
    """One buffer per rank, same layout everywhere; ``peer_bases`` [R] uint64 on the device."""

    max_channels: int = 0
    max_slot_bytes: int = 0
    peer_bases: torch.Tensor | None = None

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        """Grow (all ranks together) so that num_channels channels of slot_bytes slots fit."""
        raise NotImplementedError

    def fits(self, num_channels: int, slot_bytes: int) -> bool:
        """Whether ``ensure(num_channels, slot_bytes)`` would not grow the buffers."""
        allocated = self.peer_bases is not None
        return allocated and num_channels <= self.max_channels and slot_bytes <= self.max_slot_bytes

    def ensure_header(self) -> None:
        """Buffers of the same size on every rank whatever its call (the agreement of a call runs in
        the header and inbox before anything grows): the smallest, unless some exist."""
        if self.peer_bases is None:
            self.ensure(1, 16)


class GroupBuffers(SymmetricBuffers):
    """Symmetric buffers of the ranks of a process group, one per process: the fields every such
    kind shares. ``max_num_sms``: channels reserved from the first allocation on."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        device: torch.device,
        *,
        max_num_sms: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.timeout_s = timeout_s
        self.reserve_channels = max_num_sms or 0


class IpcBuffers(GroupBuffers):
    """A cudaMalloc'ed buffer per rank; IPC handles exchanged over the process group.

    Sized once for ``max_num_sms`` channels (default: the device's SMs, the largest budget a call can
    use), so that a call with a larger budget than the earlier ones (e.g. a combine after a dispatch)
    never regrows the buffers mid-step; only a larger row (hidden size, top-k, FP8) regrows them, which
    synchronizes the device and re-exchanges the IPC handles (all ranks together).
    """

    _own_ptr = 0  # this rank's buffer (0: none allocated)
    _peer_ptrs: list[int] | tuple[()] = ()  # every rank's buffer as opened in this process

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        if self._own_ptr and num_channels <= self.max_channels and slot_bytes <= self.max_slot_bytes:
            return
        from cupy_backends.cuda.api import runtime  # NOTE: CuPy is optional (the kernels' extra)

        max_channels = max(num_channels, self.max_channels, self.reserve_channels)
        max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        # NOTE: every rank reaches here in the same call (same arguments), so this is collective
        torch.cuda.synchronize(self.device)
        dist.barrier(self.group)
        self._release()
        size = kl.total_bytes(max_channels, max_slot_bytes)
        with torch.cuda.device(self.device):
            ptr = runtime.malloc(size)
            runtime.memset(ptr, 0, size)
            runtime.deviceSynchronize()
            handle = runtime.ipcGetMemHandle(ptr)
            handles: list[Any] = [None] * self.num_ranks
            dist.all_gather_object(handles, handle, group=self.group)
            ptrs = [
                ptr
                if r == self.rank
                else runtime.ipcOpenMemHandle(handles[r], runtime.cudaIpcMemLazyEnablePeerAccess)
                for r in range(self.num_ranks)
            ]
        self._own_ptr, self._peer_ptrs = ptr, ptrs
        self.max_channels, self.max_slot_bytes = max_channels, max_slot_bytes
        self.peer_bases = torch.tensor(ptrs, dtype=torch.int64, device=self.device)
        dist.barrier(self.group)

    def close(self) -> None:
        """Collective: waits (at most ``timeout_s``) until every rank is done with the buffers, then
        frees them. If the peers do not arrive, this rank's buffer is leaked (a peer may still write
        into it) and ``CommTimeoutError`` is raised."""
        if not self._own_ptr:
            return
        torch.cuda.synchronize(self.device)
        try:
            if not dist.is_initialized():
                raise RuntimeError("the process group was destroyed before close()")
            work = dist.barrier(self.group, async_op=True)
            if work is not None:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - the peers may still use this rank's buffer
            self._release(free_own=False)
            raise CommTimeoutError(
                f"close: not every rank reached the barrier before freeing the IPC buffers within "
                f"timeout_s={self.timeout_s:g}s ({type(exc).__name__}: {exc}); rank {self.rank}'s "
                "buffer is leaked rather than freed under a peer"
            ) from exc
        self._release()

    def _release(self, *, free_own: bool = True) -> None:
        if not self._own_ptr:
            return
        from cupy_backends.cuda.api import runtime  # NOTE: CuPy is optional (the kernels' extra)

        for r, p in enumerate(self._peer_ptrs):
            if r != self.rank:
                runtime.ipcCloseMemHandle(p)
        if free_own:
            runtime.free(self._own_ptr)
        self._own_ptr, self._peer_ptrs, self.peer_bases = 0, (), None
        self.max_channels = self.max_slot_bytes = 0
