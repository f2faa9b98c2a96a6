"""The structs the host exchanges with NCCL and the kernels, by their probed layout (``GinLayout``).

``GinNet`` (the kernel argument, ``csrc/net_gin.cuh``) is described once, as a NumPy structured dtype
with the C struct's offsets, size and alignment (:func:`gin_net_dtype`); its bytes (:func:`pack_gin_net`)
are a value of that dtype. ``ncclDevCommRequirements`` is NCCL's initializer with the GIN counts set.
Nothing here is hand-written from the headers: every offset comes from the probe (``probe.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

INTER_LAYOUT_FIELDS = (
    "num_nodes",
    "gpus_per_node",
    "max_channels",
    "nvl_slot_bytes",
    "net_slot_bytes",
    "signals_offset",
    "nvl_ring_offset",
    "net_ring_offset",
    "net_stage_offset",
)
GIN_NET_POINTERS = ("comm", "window", "base")


@dataclass(frozen=True)
class GinLayout:
    """Sizes, alignments and field offsets of the structs the host exchanges with NCCL and the kernels."""

    version_code: int
    unique_id_bytes: int
    win_coll_symmetric: int
    win_required_alignment: int
    strong_signals: bool
    net_slots: int  # kNetSlots of csrc/net.cuh
    sizes: dict[str, tuple[int, int]]  # struct -> (sizeof, alignof)
    fields: dict[str, tuple[int, int]]  # "Struct.field" -> (offsetof, sizeof)
    requirements_template: bytes  # ncclDevCommRequirements: initializer + GIN connectivity

    def size(self, name: str) -> int:
        return self.sizes[name][0]

    def align(self, name: str) -> int:
        return self.sizes[name][1]

    def offset(self, field: str) -> int:
        return self.fields[field][0]


def field_value(layout: Mapping[str, int] | Any, name: str) -> int:
    """``layout[name]`` of a mapping, else the attribute ``name`` (an ``InterLayout``), as an int."""
    return int(layout[name] if isinstance(layout, Mapping) else getattr(layout, name))


def gin_net_dtype(layout: GinLayout) -> np.dtype:
    """A NumPy structured dtype with GinNet's exact offsets, size and alignment (a CuPy kernel argument)."""
    names, formats, offsets = [], [], []
    for name in GIN_NET_POINTERS:
        offset, size = layout.fields[f"GinNet.{name}"]
        names.append(name)
        formats.append(np.uint64 if size == 8 else np.uint32)
        offsets.append(offset)
    inter_base = layout.offset("GinNet.layout")
    for name in INTER_LAYOUT_FIELDS:
        offset, size = layout.fields[f"InterLayout.{name}"]
        names.append(name)
        formats.append({4: np.int32, 8: np.int64}[size])
        offsets.append(inter_base + offset)
    dtype = np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": layout.size("GinNet")},
        align=True,
    )
    if dtype.alignment != layout.align("GinNet"):
        raise RuntimeError(f"GinNet alignment {layout.align('GinNet')} != NumPy's {dtype.alignment}")
    return dtype


def pack_gin_net(
    layout: GinLayout, *, comm: int, window: int, base: int, inter: Mapping[str, int] | Any
) -> bytes:
    """The bytes of ``commkit::GinNet`` (exact sizeof, offsets from the probe): a value of
    :func:`gin_net_dtype`, padding zeroed.

    ``inter``: the fields of InterLayout, a mapping or an object with attributes ``num_nodes``, ...,
    ``net_stage_offset`` (INTER_LAYOUT_FIELDS).
    """
    value = np.zeros((), dtype=gin_net_dtype(layout))
    for name, pointer in (("comm", comm), ("window", window), ("base", base)):
        value[name] = pointer
    for name in INTER_LAYOUT_FIELDS:
        value[name] = field_value(inter, name)
    return value.tobytes()


def requirements_bytes(layout: GinLayout, *, signal_count: int, context_count: int) -> bytes:
    """ncclDevCommRequirements with the GIN counts set (the rest: NCCL's initializer, zeros before 2.29)."""
    out = bytearray(layout.requirements_template)
    counts = {"ginSignalCount": signal_count, "ginContextCount": context_count, "ginCounterCount": 0}
    for name, value in counts.items():
        offset, size = layout.fields[f"ncclDevCommRequirements.{name}"]
        struct.pack_into({4: "<i", 8: "<q"}[size], out, offset, value)
    return bytes(out)
