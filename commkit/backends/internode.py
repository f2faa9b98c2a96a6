"""Host side of the internode kernels (``csrc/internode_dispatch.cuh``, ``csrc/internode_combine.cuh``).

``InternodeEngine`` launches them for N nodes x G GPUs (rank = node * G + local), with the inter-node
hop given by a ``commkit.backends.internode_net`` provider: ``NvlinkDomain`` (direct stores into the
rail peers' symmetric buffers; virtual nodes on one GPU, nodes joined by NVLink) or ``Gin`` (NCCL's
device API, ``csrc/net_gin.cuh``). Virtual nodes run every rank in one launch and exchange counts with
the intranode notify kernel (R <= 8); one rank per process (``internode_backend``) exchanges them over
the process group (``count_exchange``).

Extra handle state (``InterState``): ``node_send_pos`` [sum T, N] int32, the position of each token among
those its rank sends to each node (-1: none), and the forwarders' records written by dispatch and
replayed by combine: for launch rank l = (n, g) and source node m, entries
``fwd_offsets[l, m] .. fwd_offsets[l, m + 1]`` of ``fwd_mask`` (local GPUs the token went to) and
``fwd_token`` (its source token), indexed by node_pos; sized by the source's token count, the unused
tail keeps ``fwd_token`` = INT32_MAX so that combine's binary search stops before it.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from commkit.backends import internode_layout as il
from commkit.backends import kernels_layout as kl
from commkit.backends.count_exchange import Agreement, CallFormat, GroupCountExchange
from commkit.backends.internode_net import NetProvider, NvlinkDomain
from commkit.backends.kernel_args import InternodeCombineArgs, InternodeDispatchArgs
from commkit.backends.kernels import CallArgs, DispatchResult, KernelEngine, KernelState, _offsets
from commkit.backends.launcher import Launcher
from commkit.backends.symmetric import SymmetricBuffers
from commkit.errors import ConfigError

INT32_MAX = 2**31 - 1
DEFAULT_FORWARDER_WARPS = 4
# Knobs (tuning profiles' ``knobs``, ``Buffer.set_knobs``) -> engine attribute
KNOBS = {
    "internode_dispatch_forwarder_warps": "dispatch_forwarder_warps",
    "internode_combine_forwarder_warps": "combine_forwarder_warps",
}


@dataclass
class InterState(KernelState):
    node_send_pos: torch.Tensor
    fwd_offsets: torch.Tensor
    fwd_mask: torch.Tensor
    fwd_token: torch.Tensor
    seq: int = -1  # one rank per process: the call sequence number of the dispatch (the handle's tie)


def node_send_pos(send_pos: torch.Tensor, token_counts: list[int], gpus_per_node: int) -> torch.Tensor:
    """[sum T, N] int32: position of each token among those its rank sends to each node, or -1."""
    num_tokens, num_ranks = send_pos.shape
    in_node = (send_pos.view(num_tokens, num_ranks // gpus_per_node, gpus_per_node) >= 0).any(-1)
    out = torch.full(in_node.shape, -1, dtype=torch.int32, device=send_pos.device)
    for lo, hi in itertools.pairwise(_offsets(token_counts)):
        seg = in_node[lo:hi]
        pos = torch.cumsum(seg.to(torch.int32), 0, dtype=torch.int32) - 1
        out[lo:hi] = torch.where(seg, pos, -1)
    return out


def forwarder_offsets(token_counts: list[int], rank_base: int, gpus_per_node: int) -> list[list[int]]:
    """fwd_offsets rows: for launch rank l = (n, g), the start of source node m's records (m = 0..N),
    each source sized by its token count (a bound on the tokens it sends to one node)."""
    num_nodes = len(token_counts) // gpus_per_node
    rows, base = [], 0
    for lr in range(len(token_counts)):
        local = (rank_base + lr) % gpus_per_node
        row = [base]
        for m in range(num_nodes):
            row.append(row[-1] + token_counts[m * gpus_per_node + local])
        rows.append(row)
        base = row[-1]
    return rows


class InternodeEngine(KernelEngine):
    """Internode dispatch/combine for the ranks of one launch.

    Two ways to run: all R ranks in one launch (virtual nodes, ``exchange`` None: the notify kernel
    over the ranks' buffers, so R <= 8), or one rank per process (``exchange``: a
    ``GroupCountExchange`` of the process group, R <= 32; ``buffers`` then reach the ranks of this
    rank's node only). ``net``: the inter-node hop (``commkit.backends.internode_net``; default the
    nvlink-domain net over ``buffers``).
    """

    max_ranks = il.MAX_RANKS

    def __init__(
        self,
        num_ranks: int,
        rank_base: int,
        num_local: int,
        buffers: SymmetricBuffers,
        *,
        gpus_per_node: int,
        timeout_s: float,
        device: torch.device,
        exchange: GroupCountExchange | None = None,
        net: NetProvider | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        super().__init__(
            num_ranks, rank_base, num_local, buffers, timeout_s=timeout_s, device=device, launcher=launcher
        )
        if (
            gpus_per_node < 1
            or gpus_per_node > kl.MAX_RANKS
            or num_ranks % gpus_per_node
            or not 2 <= num_ranks // gpus_per_node <= il.MAX_NODES
        ):
            raise ConfigError(
                f"num_ranks_per_node: expected a divisor of the {num_ranks} ranks, at most {kl.MAX_RANKS}, "
                f"giving 2 to {il.MAX_NODES} nodes, got {gpus_per_node}"
            )
        if exchange is None and (rank_base != 0 or num_local != num_ranks or num_ranks > kl.MAX_RANKS):
            raise ConfigError(
                "InternodeEngine: without a process-group count exchange every rank runs in one launch "
                f"(virtual nodes, at most {kl.MAX_RANKS}), got ranks {rank_base}.."
                f"{rank_base + num_local - 1} of {num_ranks}"
            )
        if exchange is not None and (num_local != 1 or rank_base != exchange.rank):
            raise ConfigError(
                f"InternodeEngine: with a process-group count exchange a launch runs this process's rank "
                f"{exchange.rank} alone, got ranks {rank_base}..{rank_base + num_local - 1}"
            )
        self.gpus_per_node = gpus_per_node
        self.num_nodes = num_ranks // gpus_per_node
        self.exchange = exchange
        self._seq = 0  # one rank per process: this engine's call sequence number (agreed in the exchange)
        self.net = net or NvlinkDomain()
        # Role split inside a block (knobs, see set_knobs): warps of the dispatch forwarder (the net
        # senders get the rest of the first half) and of the combine forwarder-reducers (the final
        # reducers get the rest of the second half)
        self.dispatch_forwarder_warps = DEFAULT_FORWARDER_WARPS
        self.combine_forwarder_warps = DEFAULT_FORWARDER_WARPS
        self._net_args: dict[tuple[int, ...], tuple[torch.Tensor, Any, Any]] = {}

    def _inter_kernel(self, header: str, name: str, *args: int) -> Any:
        net = self.net
        return self._kernel(
            net.header or header,
            name,
            net.cpp_type,
            self.gpus_per_node,
            self.num_nodes,
            *args,
            include_dirs=net.include_dirs,
            defines=net.defines or (),
        )

    def _kernel_and_net(
        self, num_sms: int, hidden: int, num_topk: int | None, dtype_code: int | None, header: str, name: str
    ) -> tuple[Any, torch.Tensor]:
        """The kernel (its SM budget checked) and the Net argument (the buffers grown)."""
        kernel, defines = self._kernel_first(num_sms, hidden, num_topk, dtype_code, header, name)
        return self._net_then_kernel(kernel, defines, num_sms, hidden, num_topk, dtype_code, header, name)

    def _targs(self, hidden: int, num_topk: int | None, dtype_code: int | None) -> tuple[int, ...]:
        if num_topk is None:
            return (hidden, self.combine_forwarder_warps)
        assert dtype_code is not None
        return (hidden, num_topk, dtype_code, self.dispatch_forwarder_warps)

    def _kernel_first(
        self, num_sms: int, hidden: int, num_topk: int | None, dtype_code: int | None, header: str, name: str
    ) -> tuple[Any, tuple[str, ...] | None]:
        """The kernel with its SM budget checked, before anything collective, where the kernel's
        defines are known (GIN: once its transport exists; else None); and those defines."""
        self._check_num_sms(num_sms)
        defines = self.net.defines
        if defines is None:
            return None, None
        kernel = self._inter_kernel(header, name, *self._targs(hidden, num_topk, dtype_code))
        self._check_budget(kernel, num_sms)
        return kernel, defines

    def _net_then_kernel(
        self,
        kernel: Any,
        defines: tuple[str, ...] | None,
        num_sms: int,
        hidden: int,
        num_topk: int | None,
        dtype_code: int | None,
        header: str,
        name: str,
    ) -> tuple[Any, torch.Tensor]:
        """The Net argument (growing the buffers: collective), and the kernel looked up again if
        growing made a transport with other defines."""
        net = self._net(num_sms, hidden, num_topk, dtype_code)
        if kernel is None or self.net.defines != defines:
            kernel = self._inter_kernel(header, name, *self._targs(hidden, num_topk, dtype_code))
            self._check_budget(kernel, num_sms)
        return kernel, net

    def _slots(self, hidden: int, num_topk: int | None, dtype_code: int | None) -> tuple[int, int]:
        """(NVLink slot, net slot) bytes. Dispatch sizes the slots for its rows and for combine's (so
        that the combine after it never regrows); combine (``num_topk`` None) asks for its own rows."""
        nvl_slot = net_slot = il.combine_slot_bytes(hidden)
        if num_topk is not None:
            assert dtype_code is not None
            nvl_slot = max(nvl_slot, il.dispatch_nvl_slot_bytes(hidden, num_topk, dtype_code))
            net_slot = max(
                net_slot, il.dispatch_net_slot_bytes(hidden, num_topk, dtype_code, self.gpus_per_node)
            )
        return nvl_slot, net_slot

    def _net_key(self, num_sms: int, nvl_slot: int, net_slot: int) -> tuple[int, ...]:
        # NOTE: the argument depends only on these sizes and on the objects that growing replaces (the
        # buffers' bases tensor, the GIN transport): keyed by their ids, and the entry holds them (so an
        # id cannot be reused while it lives)
        transport = getattr(self.net, "transport", None)
        generation = getattr(transport, "generation", 0)  # a grown GIN window
        return (num_sms, nvl_slot, net_slot, id(self.buffers.peer_bases), id(transport), generation)

    def _net_cached(self, num_sms: int, hidden: int, num_topk: int | None, dtype_code: int | None) -> bool:
        """Whether the Net argument for these sizes is cached (a miss may grow buffers: collective)."""
        return self._net_key(num_sms, *self._slots(hidden, num_topk, dtype_code)) in self._net_args

    def _net(self, num_sms: int, hidden: int, num_topk: int | None, dtype_code: int | None) -> torch.Tensor:
        """Grows the buffers for the internode regions; the Net argument in device memory (hot path:
        a hit skips layout, ensure and packing)."""
        nvl_slot, net_slot = self._slots(hidden, num_topk, dtype_code)
        hit = self._net_args.get(self._net_key(num_sms, nvl_slot, net_slot))
        if hit is not None:
            return hit[0]
        raw = self.net.argument(self.buffers, num_sms, self.num_nodes, self.gpus_per_node, nvl_slot, net_slot)
        if len(self._net_args) > 16:
            self._net_args.clear()
        # NOTE: a copy in a fresh allocation (aligned for the kernel's struct loads; on the CPU too)
        arg = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device, copy=True)
        transport = getattr(self.net, "transport", None)
        self._net_args[self._net_key(num_sms, nvl_slot, net_slot)] = (arg, self.buffers.peer_bases, transport)
        return arg

    def _agree(self, agreement: Agreement, grows: bool, phase: str) -> None:
        """Every rank passed the same call: checked on the host before a step that may grow the
        buffers (collective, so ranks that disagree must not reach it), else by a device assert."""
        if grows and agreement.raw.is_cuda:
            agreement.check_host(self._read_counts(agreement.raw.reshape(1, -1), phase)[0])
        else:
            agreement.check()

    def set_knobs(self, knobs: dict[str, int]) -> None:
        """Applies the role-split knobs in ``knobs`` (``KNOBS``; others are left to other engines)."""
        for name in KNOBS:  # every value checked before any is applied
            value = knobs.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 7:
                raise ConfigError(
                    f"{name}: expected 1 to 7 warps (of the 8 of its half block), got {value!r}"
                )
        for name, attr in KNOBS.items():
            if name in knobs:
                setattr(self, attr, knobs[name])

    @property
    def knobs(self) -> dict[str, int]:
        """The role split in use (``KNOBS`` names)."""
        return {name: getattr(self, attr) for name, attr in KNOBS.items()}

    def _forwarder_rows(
        self, token_counts: list[int], meta_host: list[list[int]] | None, num_worst_tokens: int | None
    ) -> list[list[int]]:
        """fwd_offsets rows of the launch's ranks. With every rank in the launch the sources' token
        counts are known; one rank per process reads them from the exchanged counts, or, when nothing
        is read back (num_worst_tokens), bounds each source node's records by G * num_worst_tokens
        (a token forwarded to this node is a received row of at least one of its G ranks, each of
        which receives at most num_worst_tokens rows)."""
        if self.exchange is None:
            return forwarder_offsets(token_counts, self.rank_base, self.gpus_per_node)
        g, local = self.gpus_per_node, self.rank_base % self.gpus_per_node
        if meta_host is not None:
            sizes = [meta_host[0][self.num_ranks + 1 + m * g + local] for m in range(self.num_nodes)]
        else:
            assert num_worst_tokens is not None
            sizes = [g * num_worst_tokens] * self.num_nodes
        return [_offsets(sizes)]

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        token_counts: list[int],
        num_experts: int,
        *,
        state: KernelState | None,
        num_sms: int,
        cast_to_fp8: bool = False,
        num_worst_tokens: int | None = None,
    ) -> DispatchResult:
        """As ``KernelEngine.dispatch`` (same outputs, bit for bit), through the internode kernels."""
        self._check_usable()
        hidden, num_topk, dtype_code = self._dispatch_format(x, topk_idx, num_experts, cast_to_fp8)
        if state is not None and not isinstance(state, InterState):
            raise ValueError("handle: expected a handle of an internode dispatch of this group")
        self._check_handle_tokens(state, token_counts)
        g = self.gpus_per_node
        header, name = InternodeDispatchArgs.HEADER, InternodeDispatchArgs.KERNEL
        grouped = self.exchange is not None
        if grouped:  # the buffers grow after the count exchange has shown that every rank agrees
            kernel, defines = self._kernel_first(num_sms, hidden, num_topk, dtype_code, header, name)
        else:  # virtual nodes: the notify kernel works in the buffers
            kernel, net = self._kernel_and_net(num_sms, hidden, num_topk, dtype_code, header, name)
        out_fp8 = dtype_code != kl.DTYPE_BF16
        seq, self._seq = self._seq, self._seq + 1
        fmt = CallFormat("dispatch" if state is None else "cached dispatch", num_experts, hidden, num_topk,
                         dtype_code, num_sms, num_worst_tokens, seq=seq,
                         handle=-1 if state is None else state.seq)  # fmt: skip

        self._timing_begin()
        if num_worst_tokens is not None:
            row_offsets, outs = self._worst_outputs(num_worst_tokens, hidden, num_topk, out_fp8)
        agreement = status = None
        # NOTE: virtual nodes run every rank in one launch: the device agreement cannot differ there
        call = self._dispatch_call(state, num_experts, hidden, num_topk, dtype_code, num_sms)
        if state is None:
            per_rank, per_expert, _, send_pos, token_offsets = self._layout(
                topk_idx, token_counts, num_experts, with_in_rank=False
            )
            node_pos = node_send_pos(send_pos, list(token_counts), g)
            if self.exchange is None:
                meta, status = self._notify(token_offsets, per_rank, per_expert, call, num_worst_tokens)
            else:
                meta, agreement = self.exchange.notify(
                    per_rank, per_expert, token_counts[0], num_worst_tokens, fmt
                )
            recv_counts = expert_counts = None
        else:
            send_pos, meta, token_offsets, node_pos = (
                state.send_pos,
                state.meta,
                state.token_offsets,
                state.node_send_pos,
            )
            recv_counts, expert_counts = state.recv_counts, state.expert_counts
            # NOTE: the barrier first, so that every rank makes the same collective calls even when
            # this one raises; the outcome of this rank's own check travels with the barrier, so that
            # its peers stop too (before a growth this rank would not join)
            try:
                self._check_cached_worst(state, num_worst_tokens)
                rows_error = None
            except ValueError as exc:
                rows_error = exc
            if self.exchange is None:
                status = self._cached_notify(call)
            else:
                fmt = dataclasses.replace(fmt, rows_fit=rows_error is None)
                try:
                    agreement = self.exchange.barrier(fmt)
                except ValueError:
                    if rows_error is None:
                        raise
            if rows_error is not None:
                raise rows_error  # this rank's own reason
        meta_host = None
        if num_worst_tokens is None and recv_counts is None:
            if agreement is None:
                meta_host = self._read_counts(meta, "dispatch: count exchange (notify)")
            else:  # the agreement comes back with the counts (one read)
                both = torch.cat([meta.reshape(-1), agreement.raw.reshape(-1)]).view(1, -1)
                row = self._read_counts(both, "dispatch: count exchange")[0]
                agreement.check_host(row[meta.shape[1] :])
                meta_host = [row[: meta.shape[1]]]
            recv_counts, expert_counts = self._host_counts(meta_host)
        elif agreement is not None:
            grows = not self._net_cached(num_sms, hidden, num_topk, dtype_code)
            self._agree(
                agreement, grows, "dispatch: count exchange" if state is None else "dispatch: barrier"
            )
        if grouped:
            kernel, net = self._net_then_kernel(
                kernel, defines, num_sms, hidden, num_topk, dtype_code, header, name
            )
        if state is not None:  # same routing: the records have the same size
            fwd_offsets, num_records = state.fwd_offsets, state.fwd_token.numel()
        else:
            fwd_rows = self._forwarder_rows(list(token_counts), meta_host, num_worst_tokens)
            fwd_offsets = self._device_offsets([v for row in fwd_rows for v in row])
            num_records = fwd_rows[-1][-1]
        fwd_mask = torch.zeros(num_records, dtype=torch.int32, device=self.device)
        fwd_token = torch.full((num_records,), INT32_MAX, dtype=torch.int32, device=self.device)

        if num_worst_tokens is None:
            assert recv_counts is not None
            row_offsets, outs = self._counted_outputs(recv_counts, hidden, num_topk, out_fp8)
        out_x, out_scales, out_idx, out_weights, out_src_token = outs
        recv_row_offsets = self._device_offsets(row_offsets[:-1])
        args = InternodeDispatchArgs(
            net_ptr=net,
            peer_bases=self.buffers.peer_bases,
            rank_base=self.rank_base,
            num_channels=num_sms,
            num_experts=num_experts,
            token_offsets=token_offsets,
            x=x,
            x_scales=x_scales,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            send_pos=send_pos,
            node_send_pos=node_pos,
            meta=meta,
            recv_row_offsets=recv_row_offsets,
            fwd_offsets=fwd_offsets,
            fwd_mask=fwd_mask,
            fwd_token=fwd_token,
            out_x=out_x,
            out_x_scales=out_scales,
            out_topk_idx=out_idx,
            out_topk_weights=out_weights,
            out_src_token=out_src_token,
            timeout_ns=self._timeout_ns,
        )
        self._launch(kernel, self.num_local * num_sms, kl.NUM_THREADS, args)
        self._timing_end("dispatch")
        new_state = InterState(
            send_pos=send_pos,
            meta=meta,
            token_offsets=token_offsets,
            token_counts=list(token_counts),
            recv_row_offsets=recv_row_offsets,
            recv_src_token=out_src_token,
            recv_counts=recv_counts if num_worst_tokens is None else None,
            expert_counts=expert_counts if num_worst_tokens is None else None,
            num_worst_tokens=num_worst_tokens,
            node_send_pos=node_pos,
            fwd_offsets=fwd_offsets,
            fwd_mask=fwd_mask,
            fwd_token=fwd_token,
            status=status,
            seq=seq,
        )
        return DispatchResult(out_x, out_scales, out_idx, out_weights, row_offsets, new_state)

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, state: KernelState, num_experts: int, *, num_sms: int) -> torch.Tensor:
        """x: [sum N_recv, H] bf16 packed like the dispatch outputs -> [sum T, H] bf16 (two-level sum)."""
        self._check_usable()
        if not isinstance(state, InterState):
            raise ValueError("handle: expected a handle of an internode dispatch of this group")
        hidden = x.shape[1]
        self._check_shapes(num_experts, hidden, 1, False)
        self._check_aligned("x", x)
        header, name = InternodeCombineArgs.HEADER, InternodeCombineArgs.KERNEL
        if self.exchange is None:
            kernel, net = self._kernel_and_net(num_sms, hidden, None, None, header, name)
        else:  # the buffers grow (if at all) after the barrier has shown that every rank agrees
            kernel, defines = self._kernel_first(num_sms, hidden, None, None, header, name)
        out = torch.empty(sum(state.token_counts), hidden, dtype=torch.bfloat16, device=self.device)
        self._poison(out)
        self._timing_begin()
        if self.exchange is None:
            self._cached_notify(CallArgs(kl.OP_COMBINE, num_experts, hidden, 0, 0, num_sms, state.status))
        else:
            seq, self._seq = self._seq, self._seq + 1
            fmt = CallFormat("combine", num_experts, hidden, 0, 0, num_sms, seq=seq, handle=state.seq)
            agreement = self.exchange.barrier(fmt)
            self._agree(agreement, not self._net_cached(num_sms, hidden, None, None), "combine: barrier")
            kernel, net = self._net_then_kernel(kernel, defines, num_sms, hidden, None, None, header, name)
        args = InternodeCombineArgs(
            net_ptr=net,
            peer_bases=self.buffers.peer_bases,
            rank_base=self.rank_base,
            num_channels=num_sms,
            num_experts=num_experts,
            token_offsets=state.token_offsets,
            x=x,
            recv_row_offsets=state.recv_row_offsets,
            recv_src_token=state.recv_src_token,
            meta=state.meta,
            node_send_pos=state.node_send_pos,
            fwd_offsets=state.fwd_offsets,
            fwd_mask=state.fwd_mask,
            fwd_token=state.fwd_token,
            out=out,
            timeout_ns=self._timeout_ns,
        )
        self._launch(kernel, self.num_local * num_sms, kl.NUM_THREADS, args)
        self._timing_end("combine")
        return out
