"""The ``kernels`` backend for a group that spans several nodes: the internode kernels, one rank per
process (``Buffer`` picks it when ``num_ranks_per_node`` < R and the kernels can run).

Per rank: a process group of its node's ranks (made with ``use_local_synchronization``, so only they
take part) over which the CUDA IPC buffers of the NVLink hop are exchanged (``NodeBuffers``: the
kernels index ``peer_bases`` by group rank and touch only their own node's entries, the others are 0);
the inter-node hop on NCCL's GIN (``commkit.backends.internode_net.Gin``: an NCCL communicator of the
group, a window, a device communicator, made with the backend). When every rank shares one NVLink
domain (multi-node NVLink), the ``nvlink-domain`` transport instead: every rank's buffer is mapped in
every rank through CUDA fabric handles (``commkit.backends.fabric.FabricBuffers``), and both hops are
direct stores (no node group, no GIN). The count exchange and barrier
over the group (``commkit.backends.count_exchange``). Same API, outputs and handles as the intranode
``KernelsBackend``; combine sums per node first (``commkit.reference``'s two-level rule).
"""

from __future__ import annotations

import dataclasses
import functools
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commkit.backends import internode_layout as il
from commkit.backends import kernels_layout as kl
from commkit.backends.agree import describe_failed, run_agreed
from commkit.backends.count_exchange import GroupCountExchange
from commkit.backends.fabric import FabricBuffers, choose_transport, local_fabric_domain, transport_choice
from commkit.backends.internode import InternodeEngine
from commkit.backends.internode_net import Gin, NetProvider, NvlinkDomain
from commkit.backends.kernels import KernelsBackend
from commkit.backends.symmetric import IpcBuffers, SymmetricBuffers
from commkit.backends.torch_dist import node_mask
from commkit.errors import CommTimeoutError, ConfigError
from commkit.types import Layout


def internode_unavailable_reason(num_ranks: int, num_ranks_per_node: int) -> str | None:
    """Why the internode kernels cannot serve R ranks in nodes of G here (None when they can); the
    CUDA/CuPy/NCCL-group conditions are ``kernels_unavailable_reason``'s."""
    g = num_ranks_per_node
    if g > kl.MAX_RANKS:
        return f"{g} ranks per node: the internode kernels reach at most {kl.MAX_RANKS} GPUs of a node"
    if num_ranks > il.MAX_RANKS or num_ranks // g > il.MAX_NODES:
        return (
            f"{num_ranks} ranks in {num_ranks // g} nodes: the internode kernels support at most "
            f"{il.MAX_RANKS} ranks and {il.MAX_NODES} nodes"
        )
    from commkit.backends.fabric import transport_choice
    from commkit.jit import nccl as nccl_headers

    # NOTE: a bad $COMMKIT_INTERNODE_TRANSPORT raises ConfigError here, whatever the backend asked for
    if transport_choice() == "nvlink-domain":
        return None  # no GIN needed (whether the ranks share an NVLink domain is checked collectively)
    try:
        nccl_headers.find_headers()
    except nccl_headers.NcclHeadersError as exc:
        return f"the inter-node hop needs NCCL's GIN device API: {exc}"
    return None


def node_ranks(num_ranks: int, num_ranks_per_node: int, rank: int) -> range:
    """Group ranks of ``rank``'s node (nodes hold contiguous ranks)."""
    first = rank // num_ranks_per_node * num_ranks_per_node
    return range(first, min(first + num_ranks_per_node, num_ranks))


def make_node_group(group: dist.ProcessGroup | None, num_ranks_per_node: int) -> dist.ProcessGroup:
    """A gloo process group of this rank's node (it exchanges IPC handles and meets at barriers);
    only the node's ranks call this (local synchronization). NOTE: gloo, not the group's backend: an
    NCCL subgroup may be split from the default group's communicator, which needs every rank of it."""
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    parent = group if group is not None else dist.group.WORLD
    assert parent is not None  # the default group is initialised
    local = node_ranks(num_ranks, num_ranks_per_node, rank)
    node = dist.new_group(
        [dist.get_global_rank(parent, r) for r in local], use_local_synchronization=True, backend="gloo"
    )
    assert node is not None  # this rank is in it
    assert dist.get_rank(node) == rank - local.start  # check_node_order made sure
    return node


def check_node_order(group: dist.ProcessGroup | None, num_ranks_per_node: int) -> None:
    """The node groups (new_group sorts ranks by global rank) index their ranks as the group does
    only if every node's group ranks have ascending global ranks; the same answer on every rank."""
    parent = group if group is not None else dist.group.WORLD
    assert parent is not None
    num_ranks = dist.get_world_size(group)
    global_ranks = [dist.get_global_rank(parent, r) for r in range(num_ranks)]
    for first in range(0, num_ranks, num_ranks_per_node):
        node = global_ranks[first : first + num_ranks_per_node]
        if node != sorted(node):
            raise ConfigError(
                f"group: expected each node's ranks in ascending global-rank order, got global ranks "
                f"{node} for group ranks {first}..{first + num_ranks_per_node - 1}"
            )


def scatter_node_bases(node_bases: torch.Tensor, num_ranks: int, first_rank: int) -> torch.Tensor:
    """``peer_bases`` [R] int64 of a rank: its node's buffers at their group ranks, 0 elsewhere."""
    bases = torch.zeros(num_ranks, dtype=torch.int64, device=node_bases.device)
    bases[first_rank : first_rank + node_bases.numel()] = node_bases
    return bases


class NodeBuffers(SymmetricBuffers):
    """The IPC buffers of a node, addressed by the group ranks of the whole (multi-node) group."""

    def __init__(self, node: SymmetricBuffers, *, num_ranks: int, first_rank: int) -> None:
        self.node = node
        self.num_ranks, self.first_rank = num_ranks, first_rank
        self._node_bases: torch.Tensor | None = None

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        self.node.ensure(num_channels, slot_bytes)
        self.max_channels, self.max_slot_bytes = self.node.max_channels, self.node.max_slot_bytes
        if self.node.peer_bases is not self._node_bases:  # allocated or regrown
            self._node_bases = self.node.peer_bases
            assert self._node_bases is not None
            self.peer_bases = scatter_node_bases(self._node_bases, self.num_ranks, self.first_rank)

    def close(self) -> None:
        close = getattr(self.node, "close", None)
        if close is not None:
            close()
        self.peer_bases = self._node_bases = None


class InternodeKernelsBackend(KernelsBackend):
    """Backend protocol (``commkit.backends.base``) with the internode kernels, one rank per process."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        *,
        timeout_s: float,
        num_ranks_per_node: int,
        device: torch.device | None = None,
        max_num_sms: int | None = None,
        net: NetProvider | None = None,
    ) -> None:
        """Collective over ``group``. The inter-node hop: ``nvlink-domain`` (direct stores into
        fabric-handle buffers, ``commkit.backends.fabric``) when every rank shares one NVLink domain,
        else GIN over ``group``, set up here (if any rank cannot, every rank raises ``ConfigError``);
        ``$COMMKIT_INTERNODE_TRANSPORT`` (auto, gin, nvlink-domain) overrides. ``net``: another GIN-like
        provider (tests)."""
        # NOTE: KernelsBackend.__init__ is not called: its IPC buffers span the whole group
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_ranks_per_node = num_ranks_per_node
        self.timeout_s = timeout_s
        reason = internode_unavailable_reason(self.num_ranks, num_ranks_per_node) if net is None else None
        if reason is not None:
            raise ConfigError(f"backend: the internode kernels cannot run here: {reason}")
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        max_channels = max_num_sms or torch.cuda.get_device_properties(self.device).multi_processor_count
        check_node_order(group, num_ranks_per_node)  # on every rank, before anything collective is made
        self.transport = "gin" if net is not None else self._choose_transport(group)
        self.node_group: dist.ProcessGroup | None = None
        self.buffers: Any
        self.net: NetProvider
        if self.transport == "nvlink-domain":
            # Every rank's buffer mapped in every rank: the NVLink hop and the inter-node hop alike
            self.net = NvlinkDomain()
            self.buffers = FabricBuffers(group, self.device, max_num_sms=max_channels, timeout_s=timeout_s)
        else:
            self.net = net or Gin(
                group, num_nodes=self.num_ranks // num_ranks_per_node, gpus_per_node=num_ranks_per_node
            )
            self._start_net(max_channels)
            local = node_ranks(self.num_ranks, num_ranks_per_node, self.rank)
            self.node_group = make_node_group(group, num_ranks_per_node)
            node_buffers = IpcBuffers(
                self.node_group, self.device, max_num_sms=max_channels, timeout_s=timeout_s
            )
            self.buffers = NodeBuffers(node_buffers, num_ranks=self.num_ranks, first_rank=local.start)
        self.engine = InternodeEngine(
            self.num_ranks,
            self.rank,
            1,
            self.buffers,
            gpus_per_node=num_ranks_per_node,
            timeout_s=timeout_s,
            device=self.device,
            exchange=GroupCountExchange(group, device=self.device, timeout_s=timeout_s),
            net=self.net,
        )
        self.comm_stream = torch.cuda.Stream(self.device)

    def _choose_transport(self, group: dist.ProcessGroup | None) -> str:
        """The inter-node hop, the same on every rank (collective): ``nvlink-domain`` when every rank
        shares one NVLink domain (multi-node NVLink) unless ``$COMMKIT_INTERNODE_TRANSPORT`` says
        gin; ``gin`` otherwise (``nvlink-domain`` asked for and not possible: ``ConfigError``)."""
        choice = transport_choice()
        domain = (None, "not asked") if choice == "gin" else local_fabric_domain(self.device.index or 0)
        return choose_transport(group, choice, domain)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        """As the intranode backend's, with the per-node fields filled."""
        layout = super().get_dispatch_layout(topk_idx, num_experts)
        in_node = node_mask(layout.is_token_in_rank, self.num_ranks_per_node)
        return dataclasses.replace(layout, num_tokens_per_node=in_node.sum(0), is_token_in_node=in_node)

    def set_knobs(self, knobs: dict[str, int]) -> None:
        """The role-split knobs of the internode kernels (``commkit.backends.internode.KNOBS``)."""
        assert isinstance(self.engine, InternodeEngine)
        self.engine.set_knobs(knobs)

    @property
    def knobs(self) -> dict[str, int]:
        assert isinstance(self.engine, InternodeEngine)
        return self.engine.knobs

    def _start_net(self, max_channels: int) -> None:
        """Sets the net up on every rank and agrees on the outcome, in two steps: the local part
        (``prepare``: headers, layouts, library), then the collective one (``start``); after a step
        that failed on any rank, every rank raises ``ConfigError`` naming the ranks. NOTE: a failure
        inside NCCL's own collectives on some ranks only can still leave the others waiting in NCCL."""
        for step in ("prepare", "start"):
            call = getattr(self.net, step, None)
            if call is None:
                continue
            args = (max_channels,) if step == "start" else ()
            _, failed = run_agreed(self.group, functools.partial(call, *args))
            if failed:
                # NOTE: where only some ranks failed, the others keep their transport (leaked): its
                # teardown is collective and the failed ranks would not take part
                raise ConfigError(
                    f"backend: the GIN transport could not be set up on {describe_failed(failed)}"
                )

    def close(self) -> None:
        """Collective: a barrier bounded by ``timeout_s``, then the net's teardown (NCCL's, not
        bounded), then the IPC buffers and the node group. If a peer does not arrive, everything is
        leaked rather than freed under it and ``CommTimeoutError`` is raised."""
        torch.cuda.synchronize(self.device)
        try:
            work = dist.barrier(self.group, async_op=True)
            if work is not None:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - a peer may still use this rank's buffers
            raise CommTimeoutError(
                f"close: not every rank reached the barrier within timeout_s={self.timeout_s:g}s "
                f"({type(exc).__name__}: {exc}); rank {self.rank}'s GIN window and IPC buffer are leaked"
            ) from exc
        try:
            self.net.close()
        finally:
            try:
                self.buffers.close()
            finally:
                if self.node_group is not None:
                    dist.destroy_process_group(self.node_group)
                    self.node_group = None
