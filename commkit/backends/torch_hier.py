"""The ``torch`` backend's two-level path, for a group that spans several nodes.

Ranks are grouped into nodes contiguously: with G ranks per node, node n holds ranks [n*G, (n+1)*G)
and rank r has the in-node index r % G. The path follows DeepSeek-V3's design for cross-node
all-to-all, with ``all_to_all_single`` over the whole group standing in for both links (a stage sends
rows only to the peers its link reaches and zero rows to the others):

- Dispatch, stage 1 (the network): a token bound for one or more ranks of another node n is sent
  ONCE, to its forwarder there: the rank of node n with the sender's in-node index. Destinations on
  the sender's own node skip stage 1.
- Dispatch, stage 2 (in the node): every rank forwards the rows it got in stage 1, and its own
  tokens for its own node, to each rank of its node that hosts one of the token's experts (itself
  included). Rows reach a receiver grouped by forwarder; the receiver puts them in (source rank,
  source token) order from the counts exchanged before stage 1, so the outputs equal the flat path's
  (and ``commkit.reference``'s) bit for bit.
- Combine mirrors it: each rank sends its rows back to the forwarder that sent them; the forwarder
  sums, per (source token, its node), the rows in float32 from +0.0 in ascending rank order, rounds
  to bfloat16 and sends that one partial back over the network (its own tokens' partial stays
  local); the source adds the node partials in float32 from +0.0 in ascending node order and rounds
  to bfloat16. This is ``commkit.reference.combine_reference(..., num_ranks_per_node=G)``.

Rows that cross nodes: in stage 1 a rank sends ``sum over nodes n != own of num_tokens_per_node[n]``
rows (each token once per other node it reaches); combine sends as many partials back. The handle's
``state.cross_node_send_rows`` / ``state.cross_node_recv_rows`` hold the counts of this rank.

Every call starts with the agreement of ``commkit.backends.torch_dist`` (the same fixed-size message
as the flat path's, so flat and two-level ranks of one group meet in it and disagree on
num_ranks_per_node). The helpers (the guarded all-to-all, the agreement and count exchange, row
packing and unpacking, summation rounds) are ``commkit.backends.torch_dist``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from commkit.backends.torch_dist import (
    TorchBackend,
    _as_bytes,
    compute_layout,
    node_mask,
    pack_rows,
    row_topk_idx,
    sum_rounds,
    summation_rounds,
    unpack_rows,
)
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout


@dataclass
class HierState:
    """What a cached dispatch and the combine need on this rank (node ``me // G``, in-node index ``me % G``).

    Stage 1 (across nodes), as a source:
      s1_token_idx:   [S1] int64, tokens sent, ordered by destination node, then token
      s1_send_counts: R ints, rows to each rank (non-zero only for same-index ranks of other nodes)
      s1_recv_counts: R ints, rows from each rank (likewise)
    Forward buffer F (this rank as forwarder): stage-1 rows of nodes below ours, our own tokens for our
    own node, stage-1 rows of nodes above ours; so ordered by source node, then token:
      own_token_idx:  [O] int64, this rank's tokens that reach its own node
      own_offset:     rows of F before the own tokens
    Stage 2 (in the node):
      s2_rows:        [S2] int64, rows of F sent, ordered by destination rank, then row
      s2_send_counts, s2_recv_counts: R ints (non-zero only inside this node)
      s2_rounds:      summation rounds of the returned rows over F (ascending rank order)
      recv_order:     [N_recv] int64, final row i is stage-2 received row ``recv_order[i]``
    layout:           the routing's layout (with the per-node fields)
    cross_node_send_rows, cross_node_recv_rows: rows this rank sends / receives in stage 1
    seq:              see ``torch_dist._TorchState.seq``
    """

    s1_token_idx: torch.Tensor
    s1_send_counts: list[int]
    s1_recv_counts: list[int]
    own_token_idx: torch.Tensor
    own_offset: int
    s2_rows: torch.Tensor
    s2_send_counts: list[int]
    s2_recv_counts: list[int]
    s2_rounds: list[tuple[torch.Tensor, torch.Tensor]]
    recv_order: torch.Tensor
    layout: Layout
    cross_node_send_rows: int
    cross_node_recv_rows: int
    seq: int = -1  # the call sequence number of the dispatch that planned it (``TorchState.seq``)


class HierTorchBackend(TorchBackend):
    """The ``torch`` backend for a group of several nodes (``num_ranks_per_node`` < R): two stages."""

    def __init__(self, group: dist.ProcessGroup | None, *, timeout_s: float, num_ranks_per_node: int) -> None:
        super().__init__(group, timeout_s=timeout_s, num_ranks_per_node=num_ranks_per_node)
        self.num_nodes = self.num_ranks // self.num_ranks_per_node
        self.node = self.rank // self.num_ranks_per_node
        self.local_index = self.rank % self.num_ranks_per_node

    def _node_ranks(self) -> range:
        return range(self.node * self.num_ranks_per_node, (self.node + 1) * self.num_ranks_per_node)

    # -- dispatch ------------------------------------------------------------------------------

    @staticmethod
    def _forward_buffer(recv1: torch.Tensor, own: torch.Tensor, offset: int) -> torch.Tensor:
        """F: stage-1 rows of lower nodes | own rows | stage-1 rows of higher nodes."""
        return torch.cat([recv1[:offset], own, recv1[offset:]], dim=0)

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        *,
        layout: Layout | None,
        handle: Handle | None,
        expert_alignment: int,
        num_sms: int,
        previous_event: EventHandle | None,
        async_finish: bool,
        buffer_id: int,
        cast_to_fp8: bool = False,
        num_worst_tokens: int | None = None,
    ) -> DispatchOutput:
        del num_sms  # the collective library decides its own resources
        x, x_scales = self._prepare(x, x_scales, previous_event, cast_to_fp8)
        hidden, num_topk = x.shape[1], topk_idx.shape[1]
        num_scales = x_scales.shape[1] if x_scales is not None else 0
        ranks_per_node, num_ranks = self.num_ranks_per_node, self.num_ranks
        device = x.device

        op = "cached dispatch" if handle is not None else "dispatch"
        fmt = self._format(op, num_experts, hidden, num_topk, x, handle)
        if handle is not None:
            state: HierState = handle.state
            self._agree(fmt, "cached dispatch: agreement", device)
            s1_token_idx, own_token_idx = state.s1_token_idx, state.own_token_idx
            s1_send_counts, s1_recv_counts, own_offset = (
                state.s1_send_counts,
                state.s1_recv_counts,
                state.own_offset,
            )
        else:
            if layout is None:
                layout = self.get_dispatch_layout(topk_idx, num_experts)
            in_node = node_mask(layout.is_token_in_rank, ranks_per_node)  # [T, N]
            if layout.is_token_in_node is None:
                layout = Layout(
                    layout.num_tokens_per_rank,
                    layout.num_tokens_per_expert,
                    layout.is_token_in_rank,
                    in_node.sum(dim=0),
                    in_node,
                )
            other_nodes = in_node.clone()
            other_nodes[:, self.node] = False
            # Stage-1 rows ordered by destination node, then token.
            _, s1_token_idx = other_nodes.t().nonzero(as_tuple=True)
            own_token_idx = in_node[:, self.node].nonzero(as_tuple=True)[0]
            s1_send = torch.zeros(num_ranks, dtype=torch.int64, device=device)
            forwarders = torch.arange(self.num_nodes, device=device) * ranks_per_node + self.local_index
            s1_send[forwarders] = other_nodes.sum(dim=0).to(torch.int64)
            # One agreement and count exchange: final rows per receiver, stage-1 rows per forwarder.
            counts = torch.stack([layout.num_tokens_per_rank.to(torch.int64), s1_send], dim=1)
            seq = self._seq
            recv = self._agree(fmt, "dispatch: agreement and count exchange", device, counts)
            final_counts = recv[:, 0].tolist()  # rows each source sends this rank in the end
            s1_send_counts, s1_recv_counts = s1_send.tolist(), recv[:, 1].tolist()
            own_offset = sum(s1_recv_counts[: self.node * ranks_per_node])

        # Stage 1: each token once per other node it reaches, to that node's forwarder.
        send1 = pack_rows(x, x_scales, topk_idx, topk_weights, s1_token_idx)
        recv1 = torch.empty(sum(s1_recv_counts), send1.shape[1], dtype=torch.uint8, device=device)
        self._all_to_all(recv1, send1, s1_recv_counts, s1_send_counts, "dispatch: rows across nodes")
        own = pack_rows(x, x_scales, topk_idx, topk_weights, own_token_idx)
        forward = self._forward_buffer(recv1, own, own_offset)

        if handle is None:
            # Stage-2 plan from the forwarded rows' own routing: the ranks of this node they reach.
            fwd_idx = row_topk_idx(forward, hidden * x.element_size(), num_scales, num_topk)
            in_rank = compute_layout(fwd_idx, num_experts, num_ranks).is_token_in_rank  # [F, R]
            in_local = in_rank[:, self.node * ranks_per_node : (self.node + 1) * ranks_per_node]  # [F, G]
            dst_local, s2_rows = in_local.t().nonzero(as_tuple=True)
            s2_rounds = summation_rounds(in_local, s2_rows, dst_local)
            s2_send_counts = [0] * num_ranks
            s2_recv_counts = [0] * num_ranks
            local_counts = in_local.sum(dim=0).tolist()
            # Forwarder with in-node index l sends this rank the rows of sources n*G + l, by node n.
            order = []
            base = 0
            starts = {}
            for g, dst in enumerate(self._node_ranks()):
                s2_send_counts[dst] = local_counts[g]
                s2_recv_counts[dst] = sum(final_counts[n * ranks_per_node + g] for n in range(self.num_nodes))
                for n in range(self.num_nodes):
                    starts[n * ranks_per_node + g] = base
                    base += final_counts[n * ranks_per_node + g]
            # Final order: source rank, then source token.
            for src in range(num_ranks):
                if final_counts[src]:
                    order.append(torch.arange(starts[src], starts[src] + final_counts[src], device=device))
            recv_order = torch.cat(order) if order else torch.empty(0, dtype=torch.int64, device=device)
            cross_recv = sum(s1_recv_counts)
            assert layout is not None  # made above for a new routing
            state = HierState(
                s1_token_idx=s1_token_idx,
                s1_send_counts=s1_send_counts,
                s1_recv_counts=s1_recv_counts,
                own_token_idx=own_token_idx,
                own_offset=own_offset,
                s2_rows=s2_rows,
                s2_send_counts=s2_send_counts,
                s2_recv_counts=s2_recv_counts,
                s2_rounds=s2_rounds,
                recv_order=recv_order,
                layout=layout,
                cross_node_send_rows=int(s1_token_idx.numel()),
                cross_node_recv_rows=cross_recv,
                seq=seq,
            )

        # Stage 2: every forwarded row to the ranks of this node that host one of its experts.
        send2 = forward[state.s2_rows]
        recv2 = torch.empty(sum(state.s2_recv_counts), send2.shape[1], dtype=torch.uint8, device=device)
        self._all_to_all(recv2, send2, state.s2_recv_counts, state.s2_send_counts, "dispatch: rows in node")
        recv_x, recv_scales, recv_idx, recv_weights = unpack_rows(
            recv2[state.recv_order], x.dtype, hidden, num_scales, num_topk
        )
        assert recv_x is not None
        return self._finish_dispatch(
            recv_x,
            recv_scales,
            recv_idx,
            recv_weights,
            num_experts,
            topk_idx=topk_idx,
            handle=handle,
            state=state,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            buffer_id=buffer_id,
            async_finish=async_finish,
        )

    # -- combine -------------------------------------------------------------------------------

    def combine(
        self,
        x: torch.Tensor,
        handle: Handle,
        *,
        num_sms: int,
        previous_event: EventHandle | None,
        async_finish: bool,
    ) -> CombineOutput:
        del num_sms
        if previous_event is not None:
            previous_event.current_stream_wait()
        state: HierState = handle.state
        hidden = x.shape[1]
        self._agree(self._format("combine", handle.num_experts, hidden, 0, x, handle), "combine: agreement",
                    x.device)  # fmt: skip
        num_recv = state.recv_order.numel()
        x = x[:num_recv]  # rows past the received ones pad a num_worst_tokens dispatch

        # Stage 2 back: each row to the forwarder that sent it, in the order it came.
        send2 = torch.empty_like(x)
        send2[state.recv_order] = x
        back2 = torch.empty(state.s2_rows.numel(), hidden, dtype=x.dtype, device=x.device)
        self._all_to_all(
            _as_bytes(back2), _as_bytes(send2), state.s2_send_counts, state.s2_recv_counts,
            "combine: rows in node",
        )  # fmt: skip
        # The forwarder's partial per (source token, this node): ascending rank order, bf16.
        num_forward = sum(state.s1_recv_counts) + state.own_token_idx.numel()
        partial = sum_rounds(back2, state.s2_rounds, num_forward).to(torch.bfloat16)

        # Stage 1 back: one partial per (token, node) over the network; own tokens' partial stays.
        own_end = state.own_offset + state.own_token_idx.numel()
        send1 = torch.cat([partial[: state.own_offset], partial[own_end:]], dim=0)
        back1 = torch.empty(state.s1_token_idx.numel(), hidden, dtype=torch.bfloat16, device=x.device)
        self._all_to_all(
            _as_bytes(back1), _as_bytes(send1), state.s1_send_counts, state.s1_recv_counts,
            "combine: partials across nodes",
        )  # fmt: skip

        # The source adds its node partials in ascending node order, float32 from +0.0.
        y = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32, device=x.device)
        start = 0
        for n in range(self.num_nodes):
            if n == self.node:
                y[state.own_token_idx] += partial[state.own_offset : own_end].to(torch.float32)
                continue
            count = state.s1_send_counts[n * self.num_ranks_per_node + self.local_index]
            rows = slice(start, start + count)
            y[state.s1_token_idx[rows]] += back1[rows].to(torch.float32)
            start += count
        return CombineOutput(x=y.to(torch.bfloat16), event=self._event(x.device, async_finish))
