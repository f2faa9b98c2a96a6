"""The kernels' launch arguments, declared once: one frozen dataclass per ``__global__`` kernel of ``csrc/``.

Each field is named as the C++ parameter and stands in the C++ order; its annotation names the
parameter's C type class: ``Ptr`` (any pointer: a tensor, its data pointer, or None for a null
pointer), ``Int32`` (``int``) or ``Int64`` (``int64_t``). ``values()`` is the launch tuple in that
order with the scalar types the launchers take (``np.int32``/``np.int64``; tensors and None as they
are: ``commkit.backends.launcher.raw_args`` turns them into pointers). The engines build these, the
launchers receive them, and the host tests' stand-ins read them by name; ``tests/test_kernel_args.py``
checks every class against the signature in its header.

``HEADER``/``KERNEL``: where the kernel is defined (what ``KernelSpec`` names; the template arguments
stay with the engines, which key their JIT lookups on them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch

# The C type classes of the parameters (the annotations; the test and values() read their names)
Ptr: TypeAlias = torch.Tensor | None
Int32: TypeAlias = int
Int64: TypeAlias = int

# annotation -> the launch value of a field of that class
_LAUNCH_VALUE: dict[str, Callable[[Any], Any]] = {
    "Ptr": lambda v: v,
    "Int32": np.int32,
    "Int64": np.int64,
}


@dataclass(frozen=True)
class KernelArgs:
    """Base of the per-kernel argument classes."""

    HEADER: ClassVar[str]
    KERNEL: ClassVar[str]

    @classmethod
    def c_types(cls) -> tuple[tuple[str, str], ...]:
        """(field name, C type class: ``Ptr``, ``Int32`` or ``Int64``) in C++ order."""
        return tuple((f.name, str(f.type)) for f in dataclasses.fields(cls))

    @classmethod
    @functools.cache
    def _converters(cls) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
        """(field name, its launch value) in C++ order, read once per class (launches are per call)."""
        return tuple((name, _LAUNCH_VALUE[c_type]) for name, c_type in cls.c_types())

    def values(self) -> tuple[Any, ...]:
        """The launch tuple in C++ order: tensors/None for pointers, np.int32/np.int64 scalars."""
        return tuple(convert(getattr(self, name)) for name, convert in self._converters())


@dataclass(frozen=True)
class LayoutArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/layout.cuh"
    KERNEL: ClassVar[str] = "layout_kernel"

    topk_idx: Ptr
    token_offsets: Ptr
    num_experts: Int32
    num_tokens_per_rank: Ptr
    num_tokens_per_expert: Ptr
    is_token_in_rank: Ptr  # None: the kernel skips the writes
    send_pos: Ptr


@dataclass(frozen=True)
class NotifyArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/notify.cuh"
    KERNEL: ClassVar[str] = "notify_kernel"

    peer_bases: Ptr
    rank_base: Int32
    num_experts: Int32
    hidden: Int32
    num_topk: Int32
    dtype: Int32
    num_sms: Int32
    status: Ptr
    token_offsets: Ptr
    num_tokens_per_rank: Ptr
    num_tokens_per_expert: Ptr
    expert_alignment: Int32
    num_max_recv_rows: Int32  # -1: no bound (no num_worst_tokens)
    meta: Ptr
    timeout_ns: Int64


@dataclass(frozen=True)
class CachedNotifyArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/cached.cuh"
    KERNEL: ClassVar[str] = "cached_notify_kernel"

    peer_bases: Ptr
    rank_base: Int32
    op: Int32
    num_experts: Int32
    hidden: Int32
    num_topk: Int32
    dtype: Int32
    num_sms: Int32
    handle_status: Ptr
    status: Ptr
    timeout_ns: Int64


@dataclass(frozen=True)
class DispatchArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/dispatch.cuh"
    KERNEL: ClassVar[str] = "dispatch_kernel"

    peer_bases: Ptr
    rank_base: Int32
    num_channels: Int32
    max_channels: Int32
    num_experts: Int32
    token_offsets: Ptr
    x: Ptr
    x_scales: Ptr
    topk_idx: Ptr
    topk_weights: Ptr
    send_pos: Ptr
    meta: Ptr
    status: Ptr
    recv_row_offsets: Ptr
    out_x: Ptr
    out_x_scales: Ptr
    out_topk_idx: Ptr
    out_topk_weights: Ptr
    out_src_token: Ptr
    timeout_ns: Int64


@dataclass(frozen=True)
class CombineArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/combine.cuh"
    KERNEL: ClassVar[str] = "combine_kernel"

    peer_bases: Ptr
    rank_base: Int32
    num_channels: Int32
    max_channels: Int32
    num_experts: Int32
    token_offsets: Ptr
    x: Ptr
    recv_row_offsets: Ptr
    recv_src_token: Ptr
    meta: Ptr
    status: Ptr
    send_pos: Ptr
    out: Ptr
    timeout_ns: Int64


@dataclass(frozen=True)
class InternodeDispatchArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/internode_dispatch.cuh"
    KERNEL: ClassVar[str] = "internode_dispatch_kernel"

    net_ptr: Ptr  # the Net struct in device memory (commkit.backends.internode_net)
    peer_bases: Ptr
    rank_base: Int32
    num_channels: Int32
    num_experts: Int32
    token_offsets: Ptr
    x: Ptr
    x_scales: Ptr
    topk_idx: Ptr
    topk_weights: Ptr
    send_pos: Ptr
    node_send_pos: Ptr
    meta: Ptr
    recv_row_offsets: Ptr
    fwd_offsets: Ptr
    fwd_mask: Ptr
    fwd_token: Ptr
    out_x: Ptr
    out_x_scales: Ptr
    out_topk_idx: Ptr
    out_topk_weights: Ptr
    out_src_token: Ptr
    timeout_ns: Int64


@dataclass(frozen=True)
class InternodeCombineArgs(KernelArgs):
    HEADER: ClassVar[str] = "csrc/internode_combine.cuh"
    KERNEL: ClassVar[str] = "internode_combine_kernel"

    net_ptr: Ptr
    peer_bases: Ptr
    rank_base: Int32
    num_channels: Int32
    num_experts: Int32
    token_offsets: Ptr
    x: Ptr
    recv_row_offsets: Ptr
    recv_src_token: Ptr
    meta: Ptr
    node_send_pos: Ptr
    fwd_offsets: Ptr
    fwd_mask: Ptr
    fwd_token: Ptr
    out: Ptr
    timeout_ns: Int64


ALL: tuple[type[KernelArgs], ...] = (
    LayoutArgs,
    NotifyArgs,
    CachedNotifyArgs,
    DispatchArgs,
    CombineArgs,
    InternodeDispatchArgs,
    InternodeCombineArgs,
)
