"""Host mirror of the internode kernels' constants, slot formats and buffer layout (``csrc/net.cuh``,
``InterDispatchConfig``/``InterCombineConfig``), and the packing of the ``NvlinkDomainNet`` argument.
``tests/test_internode_host.py`` compiles a host program that prints the C++ values and checks them.
Pure Python: no torch, CuPy or GPU needed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from commkit.backends import kernels_layout as kl

NET_SLOTS = 16
NET_CHUNK = 4
MAX_NODES = 32
MAX_RANKS = 32  # ranks of a group: the layout kernel keeps a token's ranks in a 32-bit mask
NUM_SIGNAL_KINDS = 4


def dispatch_net_slot_bytes(hidden: int, num_topk: int, dtype: int, gpus_per_node: int) -> int:
    """Net slot: row, scales, [global expert x K, weights x K, src_token, node_pos, send_pos x G]."""
    return kl.align_up(_dispatch_meta_offset(hidden, dtype) + (2 * num_topk + 2 + gpus_per_node) * 4, 16)


def dispatch_nvl_slot_bytes(hidden: int, num_topk: int, dtype: int) -> int:
    """NVLink slot: row, scales, [local expert x K, weights x K, src_token, src_rank, send_pos]."""
    return kl.align_up(_dispatch_meta_offset(hidden, dtype) + (2 * num_topk + 3) * 4, 16)


def _dispatch_meta_offset(hidden: int, dtype: int) -> int:
    out_fp8 = dtype != kl.DTYPE_BF16
    row_bytes = hidden if out_fp8 else hidden * 2
    num_scales = hidden // kl.FP8_GROUP_SIZE if out_fp8 else 0
    return kl.align_up(row_bytes, 16) + kl.align_up(num_scales * 4, 16)


def combine_slot_bytes(hidden: int) -> int:
    """NVLink and net slots of the internode combine: bf16 row, then 16 bytes of metadata."""
    return kl.align_up(hidden * 2, 16) + 16


@dataclass(frozen=True)
class InterLayout:
    """``commkit::InterLayout``: where the internode regions lie in every rank's symmetric buffer."""

    num_nodes: int
    gpus_per_node: int
    max_channels: int
    nvl_slot_bytes: int
    net_slot_bytes: int
    signals_offset: int
    nvl_ring_offset: int
    net_ring_offset: int
    net_stage_offset: int
    total_bytes: int

    # struct InterLayout { int x5; (pad 4) int64 x4 } -> 56 bytes, 8-byte aligned
    STRUCT = struct.Struct("<5i4xqqqq")

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.num_nodes,
            self.gpus_per_node,
            self.max_channels,
            self.nvl_slot_bytes,
            self.net_slot_bytes,
            self.signals_offset,
            self.nvl_ring_offset,
            self.net_ring_offset,
            self.net_stage_offset,
        )


def inter_layout(
    num_nodes: int,
    gpus_per_node: int,
    max_channels: int,
    nvl_slot_bytes: int,
    net_slot_bytes: int,
    *,
    staging: bool,
) -> InterLayout:
    """The regions after BufferLayout's counters (they replace the intranode ring: one engine owns a
    buffer). ``staging``: the GIN sender's staging copy of the net ring."""
    if not 2 <= num_nodes <= MAX_NODES:
        raise ValueError(f"num_nodes: the internode kernels support 2 to {MAX_NODES} nodes, got {num_nodes}")
    signals = kl.ring_offset(max_channels)
    nvl_ring = kl.align_up(signals + NUM_SIGNAL_KINDS * max_channels * num_nodes * 4, 128)
    net_ring = nvl_ring + max_channels * kl.MAX_RANKS * kl.NUM_SLOTS * nvl_slot_bytes
    net_bytes = max_channels * num_nodes * NET_SLOTS * net_slot_bytes
    stage = net_ring + net_bytes
    total = stage + (net_bytes if staging else 0)
    return InterLayout(
        num_nodes,
        gpus_per_node,
        max_channels,
        nvl_slot_bytes,
        net_slot_bytes,
        signals,
        nvl_ring,
        net_ring,
        stage,
        total,
    )


def nvlink_domain_net(bases_ptr: int, layout: InterLayout) -> bytes:
    """``commkit::NvlinkDomainNet`` {const uint64_t* bases; InterLayout layout;}: 64 bytes."""
    return struct.pack("<Q", bases_ptr) + layout.pack()


NVLINK_DOMAIN_NET_BYTES = 8 + InterLayout.STRUCT.size
