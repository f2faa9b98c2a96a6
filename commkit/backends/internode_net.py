"""The inter-node hop of the internode kernels, host side: which ``Net`` they are compiled with and the
kernel argument that describes it (``csrc/net.cuh``).

``NvlinkDomain``: ``commkit::NvlinkDomainNet``, direct stores into the rail peers' symmetric buffers
(all regions of ``InterLayout`` in the buffers that the NVLink hop uses too). For virtual nodes on one
GPU (``commkit.emulate``) and nodes joined by NVLink.

``Gin``: ``commkit::GinNet`` (``csrc/net_gin.cuh``), NCCL's GPU-initiated puts. The NVLink regions
(counters, NVLink rings) stay in the load/store buffers of the node (CUDA IPC); the net ring and the
sender's staging copy live in an NCCL window (``commkit.backends.gin.GinTransport``) with the offsets
of a second ``InterLayout`` whose net regions start at 0 (the kernels reach net regions only through
the Net, so the two layouts differ in those offsets only). The transport is made when the backend is
(window for the smallest rows); a larger row grows the window (``GinTransport.grow``: device
communicator, window and buffer made again, the NCCL communicator kept), by all ranks together: the
engine has checked that they agree on the call first (``count_exchange``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from commkit.backends import internode_layout as il
from commkit.backends import kernels_layout as kl
from commkit.backends.symmetric import SymmetricBuffers


class NetProvider(Protocol):
    cpp_type: str  # the template argument Net
    header: str | None  # a header to include instead of the kernel's own (one that declares the Net)
    include_dirs: tuple[str, ...]  # extra -I directories its header needs

    @property
    def defines(self) -> tuple[str, ...] | None:
        """Extra -D options of the kernels; None until ``argument`` (or ``start``) made what decides them."""
        ...

    def argument(
        self,
        buffers: SymmetricBuffers,
        num_sms: int,
        nodes: int,
        gpus_per_node: int,
        nvl_slot: int,
        net_slot: int,
    ) -> bytes:
        """Grows the buffers (and windows) for this budget and these slots; the packed Net argument."""
        ...

    def close(self) -> None: ...


def grown_layout(
    buffers: SymmetricBuffers,
    num_sms: int,
    nodes: int,
    gpus_per_node: int,
    nvl_slot: int,
    net_slot: int,
    *,
    net_in_window: bool,
) -> il.InterLayout:
    """The InterLayout for this budget and these slots, after growing ``buffers`` until the regions
    they hold fit: all of them, or (``net_in_window``: GIN) those before the net ring."""
    while True:
        channels = max(buffers.max_channels, num_sms)
        layout = il.inter_layout(nodes, gpus_per_node, channels, nvl_slot, net_slot, staging=net_in_window)
        nbytes = layout.net_ring_offset if net_in_window else layout.total_bytes
        # NOTE: SymmetricBuffers sizes the intranode ring by a slot size; ask for one whose ring
        # covers the internode regions (they start where that ring starts).
        ring_slots = channels * kl.MAX_RANKS * kl.NUM_SLOTS
        buffers.ensure(num_sms, max(1, -(-(nbytes - kl.ring_offset(channels)) // ring_slots)))
        if buffers.max_channels == channels:
            return layout


class NvlinkDomain:
    """Every region in the load/store buffers; the argument names the peers' bases."""

    cpp_type = "commkit::NvlinkDomainNet"
    header: str | None = None  # csrc/net.cuh declares it; the kernels' headers include that
    include_dirs: tuple[str, ...] = ()
    defines: tuple[str, ...] = ()

    def argument(
        self,
        buffers: SymmetricBuffers,
        num_sms: int,
        nodes: int,
        gpus_per_node: int,
        nvl_slot: int,
        net_slot: int,
    ) -> bytes:
        layout = grown_layout(buffers, num_sms, nodes, gpus_per_node, nvl_slot, net_slot, net_in_window=False)
        bases = buffers.peer_bases
        assert bases is not None  # ensure() allocated the buffers
        return il.nvlink_domain_net(bases.data_ptr(), layout)

    def close(self) -> None:
        pass


def window_layout(layout: il.InterLayout) -> il.InterLayout:
    """``layout`` (with staging) with its net ring at window offset 0 and the staging copy after it."""
    net_bytes = layout.net_stage_offset - layout.net_ring_offset
    return dataclasses.replace(
        layout, net_ring_offset=0, net_stage_offset=net_bytes, total_bytes=2 * net_bytes
    )


class Gin:
    """NVLink regions in the node's load/store buffers, net regions in an NCCL window (GIN)."""

    cpp_type = "commkit::GinNet"
    header: str | None = "csrc/internode_gin.cuh"  # both kernels and csrc/net_gin.cuh (NCCL's device API)
    include_dirs: tuple[str, ...]  # the NCCL headers' directory
    _defines_of: Any  # the transport _defines were read from
    _defines: tuple[str, ...]

    @property
    def defines(self) -> tuple[str, ...] | None:
        """Only the GIN backends the device communicator uses are compiled in (all of them make the
        kernels spill); None until the transport exists."""
        from commkit.backends.gin import backend_defines

        if self.transport is None:
            return None
        # NOTE: read once per device communicator (it is looked up on every dispatch and combine)
        made = (self.transport, self.transport.generation)
        if self._defines_of != made:
            self._defines_of, self._defines = made, backend_defines(self.transport.backend_types)
        return self._defines

    def __init__(self, group: Any, *, num_nodes: int, gpus_per_node: int, headers: Any = None) -> None:
        from commkit.jit import nccl as nccl_headers

        self.group = group
        self.num_nodes, self.gpus_per_node = num_nodes, gpus_per_node
        self.headers = headers or nccl_headers.find_headers()
        self.include_dirs = (str(self.headers.include_dir),)
        self.transport: Any = None  # GinTransport, made by start() (or the first argument())
        self._defines_of = None
        self._defines = ()

    def prepare(self) -> None:
        """The local part of the setup (no collective): the struct layouts and the NCCL library."""
        from commkit.backends import gin

        gin.load_library(self.headers)
        gin.probe_layout(self.headers)

    def start(self, max_channels: int) -> None:
        """Makes the transport now (collective), with a window for the smallest slots: GIN is set up
        (and its backends known) before any dispatch; the first dispatch grows the window."""
        smallest = il.inter_layout(self.num_nodes, self.gpus_per_node, max_channels, 16, 16, staging=True)
        self._ensure_window(window_layout(smallest))

    def argument(
        self,
        buffers: SymmetricBuffers,
        num_sms: int,
        nodes: int,
        gpus_per_node: int,
        nvl_slot: int,
        net_slot: int,
    ) -> bytes:
        layout = grown_layout(buffers, num_sms, nodes, gpus_per_node, nvl_slot, net_slot, net_in_window=True)
        window = window_layout(layout)
        self._ensure_window(window)
        return self.transport.net_bytes(window)

    def _ensure_window(self, window: il.InterLayout) -> None:
        """(Re)creates the transport when the window is too small or has other channels (collective:
        every rank reaches here in the same call with the same layout)."""
        t = self.transport
        if t is not None and t.max_channels == window.max_channels:
            if t.buffer_bytes < window.total_bytes:
                try:
                    t.grow(window.total_bytes)  # the NCCL communicator is kept
                except BaseException:
                    # NOTE: a failed grow is agreed by every rank (GinTransport.grow), so every rank
                    # closes (collective) and the next call makes a new transport on every rank
                    self.transport = None
                    t.close()
                    raise
            return
        from commkit.backends.gin import GinTransport

        if t is not None:
            torch.cuda.synchronize()
            t.close()
            self.transport = None
        self.transport = GinTransport(
            self.group,
            num_nodes=self.num_nodes,
            gpus_per_node=self.gpus_per_node,
            max_channels=window.max_channels,
            buffer_bytes=window.total_bytes,
            headers=self.headers,
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
