"""CPU stand-ins for the internode kernels and the GIN transport when each rank is its own process (gloo).

A launch of the internode dispatch or combine covers this process's rank only, and the kernels'
contract spans all ranks. ``GroupFakeKernels`` gathers every rank's arguments over the process group,
packs them the way a launch of all ranks would see them (``FakeKernels``' virtual-node stand-ins,
which check the contract: rows at ``meta`` offsets, forwarder records within ``fwd_offsets``), runs
that, and keeps this rank's part of the outputs. So what the host side of one rank per process computes
(the exchanged ``meta``, the forwarder sizes, the handles) is checked against the contract.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist
from fake_kernels import FakeKernels, install_fakes

from commkit.backends import internode_backend as ib
from commkit.backends import internode_net, launcher
from commkit.backends import kernel_args as ka
from commkit.backends import kernels as kmod
from commkit.types import EventHandle


def _gather(t: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every rank's ``t`` (sent as raw bytes: a tensor's own pickling is not needed here)."""
    msg = None if t is None else (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, msg)
    return [None if m is None else _tensor(*m) for m in out]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


class GroupFakeKernels(FakeKernels):
    def __init__(self) -> None:
        super().__init__()
        # (kernel, GIN transports made and windows grown so far) per launch
        self.transports_at: list[tuple[str, int]] = []

    def launch(self, kernel: tuple, num_blocks: int, num_threads: int, args: ka.KernelArgs) -> None:
        self.transports_at.append((kernel[0], len(FakeGinTransport.made) + len(FakeGinTransport.grown)))
        super().launch(kernel, num_blocks, num_threads, args)

    @staticmethod
    def _pack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if tensors[0] is None:
            return None
        return torch.cat([t for t in tensors if t is not None])

    @staticmethod
    def _packed_offsets(counts: list[int]) -> torch.Tensor:
        return torch.tensor([sum(counts[:r]) for r in range(len(counts) + 1)], dtype=torch.int32)

    @staticmethod
    def _packed_records(fwd_offsets: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        rows = _gather(fwd_offsets)
        sizes = [int(r[-1]) for r in rows]  # type: ignore[index]
        base = [sum(sizes[:r]) for r in range(len(rows))]
        packed = torch.stack([r + b for r, b in zip(rows, base, strict=True)])  # type: ignore[operator]
        return base, packed.to(torch.int32)

    def _gathered(self, a: ka.KernelArgs, *names: str) -> dict[str, torch.Tensor | None]:
        """Every rank's ``a.<name>`` packed over the ranks, by name."""
        return {name: self._pack(_gather(getattr(a, name))) for name in names}

    _OUTS = ("out_x", "out_x_scales", "out_topk_idx", "out_topk_weights", "out_src_token")

    def internode_dispatch_kernel(self, targs, blocks, a: ka.InternodeDispatchArgs):
        rank, world = dist.get_rank(), dist.get_world_size()
        assert int(a.rank_base) == rank and blocks == int(a.num_channels)  # this rank alone
        token_counts = [int(t.shape[0]) for t in _gather(a.topk_idx)]  # type: ignore[union-attr]
        out_rows = [int(t.shape[0]) for t in _gather(a.out_x)]  # type: ignore[union-attr]
        base, packed_fwd = self._packed_records(a.fwd_offsets)
        packed_outs = self._gathered(a, *self._OUTS)
        records = self._gathered(a, "fwd_mask", "fwd_token")
        inputs = self._gathered(
            a, "x", "x_scales", "topk_idx", "topk_weights", "send_pos", "node_send_pos", "meta"
        )
        packed = dataclasses.replace(
            a, rank_base=0, token_offsets=self._packed_offsets(token_counts),
            recv_row_offsets=self._packed_offsets(out_rows), fwd_offsets=packed_fwd,
            **inputs, **records, **packed_outs,
        )  # fmt: skip
        super().internode_dispatch_kernel(targs, blocks * world, packed)
        lo = sum(out_rows[:rank])
        for name in self._OUTS:
            own = getattr(a, name)
            if own is not None:
                own.copy_(getattr(packed, name)[lo : lo + own.shape[0]])
        for name in ("fwd_mask", "fwd_token"):
            own = getattr(a, name)
            own.copy_(getattr(packed, name)[base[rank] : base[rank] + own.numel()])

    def internode_combine_kernel(self, targs, blocks, a: ka.InternodeCombineArgs):
        rank, world = dist.get_rank(), dist.get_world_size()
        assert int(a.rank_base) == rank and blocks == int(a.num_channels)
        token_counts = [int(t.shape[0]) for t in _gather(a.out)]  # type: ignore[union-attr]
        rows = [int(t.shape[0]) for t in _gather(a.recv_src_token)]  # type: ignore[union-attr]
        _, packed_fwd = self._packed_records(a.fwd_offsets)
        packed = dataclasses.replace(
            a, rank_base=0, token_offsets=self._packed_offsets(token_counts),
            recv_row_offsets=self._packed_offsets(rows), fwd_offsets=packed_fwd,
            **self._gathered(a, "x", "recv_src_token", "meta", "node_send_pos", "fwd_mask", "fwd_token",
                             "out"),
        )  # fmt: skip
        super().internode_combine_kernel(targs, blocks * world, packed)
        lo = sum(token_counts[:rank])
        a.out.copy_(packed.out[lo : lo + a.out.shape[0]])


class FakeGinTransport:
    """``commkit.backends.gin.GinTransport`` without NCCL: as collective as the real one (the group's
    rank 0 broadcasts, as it does the unique id), records what was made, and packs a NvlinkDomainNet of
    the window layout (what ``FakeKernels`` decodes). ``$FAKE_GIN_FAIL_RANKS``: ranks whose setup fails."""

    made: list[tuple[int, int]] = []  # (max_channels, buffer_bytes) of every transport made here
    grown: list[int] = []  # buffer_bytes of every window grown
    closed = 0

    def __init__(self, group: Any, *, num_nodes: int, gpus_per_node: int, max_channels: int,
                 buffer_bytes: int, headers: Any = None, context_count: int = 4) -> None:  # fmt: skip
        import os

        group = group if group is not None else dist.group.WORLD
        payload: list[Any] = ["unique id"]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        failing = os.environ.get("FAKE_GIN_FAIL_RANKS", "")
        if str(dist.get_rank(group)) in failing.split(","):
            raise RuntimeError("ncclDevCommCreate: the device communicator has no GIN context (fake)")
        self.num_nodes, self.gpus_per_node = num_nodes, gpus_per_node
        self.max_channels, self.buffer_bytes = max_channels, buffer_bytes
        self.backend_types = (3,)  # GDAKI
        self.generation = 0
        FakeGinTransport.made.append((max_channels, buffer_bytes))

    def grow(self, buffer_bytes: int) -> None:
        sizes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, buffer_bytes)  # as collective as the real one
        assert len(set(sizes)) == 1, f"ranks grew their windows to different sizes: {sizes}"
        if buffer_bytes > self.buffer_bytes:
            self.buffer_bytes = buffer_bytes
            self.generation += 1
            FakeGinTransport.grown.append(buffer_bytes)

    def net_bytes(self, inter: Any) -> bytes:
        assert (inter.num_nodes, inter.gpus_per_node, inter.max_channels) == (
            self.num_nodes, self.gpus_per_node, self.max_channels
        )  # fmt: skip
        assert inter.net_ring_offset == 0 and inter.total_bytes <= self.buffer_bytes  # the window's layout
        return internode_net.il.nvlink_domain_net(0, inter)

    def close(self) -> None:
        FakeGinTransport.closed += 1


def install_group_fakes() -> GroupFakeKernels:
    """In a spawned gloo process: ``Buffer(backend="kernels", num_ranks_per_node=G)`` then builds an
    ``InternodeKernelsBackend`` on CPU tensors whose launches run in ``GroupFakeKernels``, with the real
    ``Gin`` provider over ``FakeGinTransport``. The node's IPC buffers are not made (null bases)."""
    import commkit.backends
    from commkit.backends import gin
    from commkit.jit import nccl

    fk = install_fakes(setattr, GroupFakeKernels())
    launcher.set_default(fk)  # this process's engines launch the stand-ins
    commkit.backends.kernels_unavailable_reason = lambda group=None: None  # type: ignore[assignment]
    ib.internode_unavailable_reason = lambda num_ranks, per_node: None  # type: ignore[assignment]

    def ensure(self: Any, num_channels: int, slot_bytes: int) -> None:
        self.max_channels = max(num_channels, self.max_channels, self.reserve_channels)
        self.max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        if self.peer_bases is None:
            self.peer_bases = torch.zeros(self.num_ranks, dtype=torch.int64)

    kmod.IpcBuffers.ensure = ensure  # type: ignore[method-assign]
    kmod.IpcBuffers.close = lambda self: None  # type: ignore[method-assign]
    gin.GinTransport = FakeGinTransport  # type: ignore[misc,assignment]

    def local_step(headers: Any) -> None:  # gin.load_library / probe_layout: local, may fail
        import os

        if str(dist.get_rank()) in os.environ.get("FAKE_GIN_PREPARE_FAIL_RANKS", "").split(","):
            raise RuntimeError("libnccl.so.2 next to the headers: not found (fake)")

    gin.load_library = local_step  # type: ignore[assignment]
    gin.probe_layout = local_step  # type: ignore[assignment]
    fake_headers = nccl.NcclHeaders(nccl.Path("/fake/nccl/include"), (2, 30, 5), "fake")
    nccl.find_headers = lambda min_version=nccl.MIN_VERSION: fake_headers  # type: ignore[assignment]
    ib.InternodeKernelsBackend.__init__ = functools.partialmethod(  # type: ignore[method-assign]
        ib.InternodeKernelsBackend.__init__, device=torch.device("cpu")
    )
    ib.InternodeKernelsBackend.device_type = "cpu"
    kmod.KernelsBackend._begin = lambda self, ev: None  # type: ignore[method-assign,assignment]
    kmod.KernelsBackend._end = lambda self, caller, a, i, o: EventHandle(None)  # type: ignore[method-assign]
    return fk
