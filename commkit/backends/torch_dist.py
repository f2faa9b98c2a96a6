"""The ``torch`` backend: dispatch and combine on ``torch.distributed.all_to_all_single``.

It runs on gloo (CPU processes) and NCCL, and does what Megatron-Core's AlltoAll token dispatcher
does: permute the tokens by destination rank, exchange the per-rank counts, one all-to-all of the
rows, and for combine the reverse all-to-all followed by an unpermute-and-sum. It is the backend
without a GPU and the baseline the kernels are measured against.

This module holds the flat path, for a group on one node. A group that spans several nodes
(``num_ranks_per_node`` < R) takes the two-level path of ``commkit.backends.torch_hier``, which
reuses the helpers here (the guarded all-to-all, row packing, the count exchange, the unpacking).

Agreement: every call (a fresh dispatch, a dispatch with a handle, a combine) starts with ONE
all-to-all of one fixed size whatever the call and the path (flat or two-level), before any payload
moves: rank s tells rank d (int64 [F + 2]) its call format (``count_exchange.CallFormat`` over
``TORCH_FORMAT_NAMES``: op, the buffer's call sequence number, num_experts, hidden, top-k, the rows'
dtype on the wire, num_ranks_per_node, the sequence number of the dispatch that made the handle or -1)
and, in a fresh dispatch, the rows s sends to d and (two-level) to d as forwarder (zeros otherwise).
Every rank receives every rank's format, so every rank checks the same facts: a difference is a
``ValueError`` on every rank, naming the fields and the first rank that differs, and no payload
collective follows; the group stays usable (the next call's sequence numbers are re-agreed: every rank
continues from the largest number plus one). The handle's sequence number ties a combine or a cached
dispatch to the dispatch that planned its routing: another dispatch's handle is an error, even with
the same row count. On NCCL the message is read back (one small host sync per call).

Each row travels as bytes (``x`` row, FP8 scales, ``topk_idx`` and ``topk_weights`` packed side by
side) so that one all-to-all moves everything, whatever the dtype, on every torch.distributed backend.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from commkit.backends.base import WithoutKnobs
from commkit.backends.count_exchange import TORCH_FORMAT_NAMES, CallFormat, exchange_agreement
from commkit.errors import CommError, CommTimeoutError
from commkit.fp8 import cast_to_fp8 as cast_bf16_to_fp8
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout


@dataclass
class _TorchState:
    """What combine needs. S rows sent, ordered by destination rank, then token.

    send_token_idx: [S] int64, the token of each sent row
    rounds:         per summation round j, (rows, tokens): the sent rows that are their token's j-th
                    in ascending rank order, and those tokens (unique within a round)
    send_counts:    R ints, rows sent to each rank
    recv_counts:    R ints, rows received from each rank
    layout:         the layout of the routing
    seq:            the buffer's call sequence number of the dispatch that planned it (agreed by
                    every call that uses the handle)
    """

    send_token_idx: torch.Tensor
    rounds: list[tuple[torch.Tensor, torch.Tensor]]
    send_counts: list[int]
    recv_counts: list[int]
    layout: Layout
    seq: int = -1


def compute_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int | None = None
) -> Layout:
    """Layout of a [T, K] routing (see ``commkit.types.Layout``); G = ``num_ranks_per_node`` (None: R)."""
    num_tokens = topk_idx.shape[0]
    # Unused slots (-1) scatter into a spare column E that is dropped.
    columns = torch.where(topk_idx >= 0, topk_idx, num_experts)
    uses_expert = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=topk_idx.device)
    uses_expert.scatter_(1, columns, True)
    uses_expert = uses_expert[:, :num_experts]  # [T, E]
    is_token_in_rank = uses_expert.view(num_tokens, num_ranks, num_experts // num_ranks).any(dim=2)
    is_token_in_node = node_mask(is_token_in_rank, num_ranks_per_node or num_ranks)
    return Layout(
        num_tokens_per_rank=is_token_in_rank.sum(dim=0),
        num_tokens_per_expert=uses_expert.sum(dim=0),
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_node=is_token_in_node.sum(dim=0),
        is_token_in_node=is_token_in_node,
    )


def node_mask(is_token_in_rank: torch.Tensor, num_ranks_per_node: int) -> torch.Tensor:
    """[T, R] bool -> [T, N] bool: whether a token has a rank on each node (nodes of G contiguous ranks)."""
    num_tokens, num_ranks = is_token_in_rank.shape
    return is_token_in_rank.view(num_tokens, num_ranks // num_ranks_per_node, num_ranks_per_node).any(dim=2)


def summation_rounds(
    mask: torch.Tensor, row_token: torch.Tensor, row_dst: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rounds that add a token's rows in ascending destination order, at most once per token a round.

    mask: [T, D] bool, where each token went; row_token, row_dst: [S] int64, the token and the
    destination (a column of ``mask``) of each sent row. Round j is (rows, tokens): the rows that are
    their token's j-th in ascending destination order, and their tokens (unique within a round).
    """
    order = mask.to(torch.int64).cumsum(dim=1) - 1  # [T, D]: destinations below this one, also reached
    row_round = order[row_token, row_dst]  # [S]
    num_rounds = int(row_round.max()) + 1 if row_round.numel() else 0
    rounds = []
    for j in range(num_rounds):
        rows = (row_round == j).nonzero(as_tuple=True)[0]
        rounds.append((rows, row_token[rows]))
    return rounds


def sum_rounds(
    rows: torch.Tensor, rounds: list[tuple[torch.Tensor, torch.Tensor]], num_tokens: int
) -> torch.Tensor:
    """[S, H] returned rows -> [num_tokens, H] float32, per token its rows summed from +0.0 by round."""
    y = torch.zeros(num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
    for idx, tokens in rounds:
        y[tokens] += rows[idx].to(torch.float32)
    return y


def pack_rows(
    x: torch.Tensor | None,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    tok: torch.Tensor,
) -> torch.Tensor:
    """Rows ``tok`` of each input side by side as bytes: [S, row bytes] uint8 = x | scales | idx | weights
    (without x when it is None)."""
    parts = [_as_bytes(x[tok])] if x is not None else []
    if x_scales is not None:
        parts.append(_as_bytes(x_scales[tok]))
    parts += [_as_bytes(topk_idx[tok]), _as_bytes(topk_weights[tok])]
    return torch.cat(parts, dim=1)


def unpack_rows(
    recv: torch.Tensor, x_dtype: torch.dtype, hidden: int, num_scales: int, num_topk: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_rows``: x [N, H] (None when packed without x: ``hidden`` 0), scales
    [N, num_scales] or None, idx [N, K], weights [N, K]."""
    x_width = hidden * torch.empty(0, dtype=x_dtype).element_size()
    widths = [x_width] + ([num_scales * 4] if num_scales else []) + [num_topk * 8, num_topk * 4]
    cols = torch.split(recv, widths, dim=1)
    recv_x = _from_bytes(cols[0], x_dtype, hidden) if hidden else None
    recv_scales = _from_bytes(cols[1], torch.float32, num_scales) if num_scales else None
    recv_idx = _from_bytes(cols[-2], torch.int64, num_topk)
    recv_weights = _from_bytes(cols[-1], torch.float32, num_topk)
    return recv_x, recv_scales, recv_idx, recv_weights


def row_topk_idx(rows: torch.Tensor, x_bytes: int, num_scales: int, num_topk: int) -> torch.Tensor:
    """The ``topk_idx`` [N, K] int64 of packed rows (``pack_rows``) whose x part is ``x_bytes`` wide."""
    start = x_bytes + num_scales * 4
    return _from_bytes(rows[:, start : start + num_topk * 8], torch.int64, num_topk)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[N, C] tensor -> [N, C * element size] uint8 view (copies only if not contiguous)."""
    return t.contiguous().view(torch.uint8).view(t.shape[0], t.shape[1] * t.element_size())


def _from_bytes(col: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
    """[N, width * element size] uint8 columns -> a new [N, width] tensor of ``dtype``."""
    out = torch.empty(col.shape[0], width, dtype=dtype, device=col.device)
    out.view(torch.uint8).view(col.shape[0], col.shape[1]).copy_(col)
    return out


def _pad_rows(t: torch.Tensor, num_rows: int, value: float) -> torch.Tensor:
    """[N, C] -> [num_rows, C], rows past N filled with ``value``."""
    if t.dtype == torch.float8_e4m3fn:  # no fill kernels for float8: pad its bytes
        return _pad_rows(t.view(torch.uint8), num_rows, 0).view(t.dtype)
    out = torch.full((num_rows, t.shape[1]), value, dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


class TorchBackend(WithoutKnobs):
    """Dispatch/combine over a ``torch.distributed`` process group (gloo or NCCL), flat: for one node."""

    name = "torch"

    def __init__(
        self, group: dist.ProcessGroup | None, *, timeout_s: float, num_ranks_per_node: int | None = None
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_ranks_per_node = num_ranks_per_node or self.num_ranks
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        self._seq = 0  # this buffer's call sequence number (agreed by every call: ``_agree``)

    def close(self) -> None:
        """Nothing to release: the process group is the caller's."""

    # -- communication -------------------------------------------------------------------------

    def _all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None,
        in_splits: list[int] | None,
        phase: str,
    ) -> None:
        """One all_to_all_single whose wait is bounded by ``timeout_s``; errors name the phase."""
        try:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
            assert work is not None
            if self.device_type == "cuda":
                # NOTE: NCCL's wait orders the current stream after the collective; a host-side
                # timeout here would busy-wait. The group's own timeout (init_process_group) applies.
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except RuntimeError as err:
            where = f"rank {self.rank} of {self.num_ranks}, phase '{phase}'"
            if "timed out" in str(err).lower() or "timeout" in str(err).lower():
                raise CommTimeoutError(
                    f"{where}: peers did not arrive within {self.timeout.total_seconds():g} s ({err})"
                ) from err
            raise CommError(f"{where}: the collective failed, a peer may have died ({err})") from err

    def _agree(
        self, fmt: CallFormat, phase: str, device: torch.device, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The agreement of a call (module docstring): one all-to-all of int64 [R, F + 2], the same on
        every rank whatever it calls; ``counts`` [R, C <= 2] (a fresh dispatch) travel with it.

        Returns the [R, 2] counts received. Raises ``ValueError`` on every rank when the ranks'
        formats differ (naming the fields and the first rank that differs); the next call's sequence
        number is the largest of the group's plus one either way."""
        names = TORCH_FORMAT_NAMES
        num = len(names)
        fmt = dataclasses.replace(fmt, seq=self._seq, num_ranks_per_node=self.num_ranks_per_node)
        own = fmt.values(names)
        send = torch.zeros(self.num_ranks, num + 2, dtype=torch.int64)
        send[:, :num] = torch.tensor(own, dtype=torch.int64)
        if counts is not None:
            send[:, num : num + counts.shape[1]] = counts.to(torch.int64).cpu()
        send = send.to(device)
        recv = torch.empty_like(send)
        self._seq += 1  # NOTE: a failed exchange (a peer died or is late) leaves the group unusable anyway
        self._all_to_all(recv, send, None, None, phase)
        host = recv.cpu()  # one small read back: the counts size the payload's exchange anyway
        self._seq = int(host[:, names.index("call")].max()) + 1
        agreement = exchange_agreement(host, own, torch.tensor(own, dtype=torch.int64), names, True)
        error = agreement.error(host[:, :num].reshape(-1).tolist())
        if error is not None:
            raise ValueError(
                f"{fmt.op}: the ranks disagree (phase '{phase}', rank {self.rank} of {self.num_ranks}): "
                f"{error}"
            )
        return host[:, num:]

    @staticmethod
    def _format(
        op: str, num_experts: int, hidden: int, num_topk: int, x: torch.Tensor, handle: Handle | None
    ) -> CallFormat:
        """The call's format (the sequence number and node size are the backend's: ``_agree``)."""
        wire = int(x.dtype == torch.float8_e4m3fn)
        seq = handle.state.seq if handle is not None else -1
        return CallFormat(op, num_experts, hidden, num_topk, wire, 0, x_dtype=wire, handle=seq)

    # -- layout --------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        return compute_layout(topk_idx, num_experts, self.num_ranks, self.num_ranks_per_node)

    # -- dispatch ------------------------------------------------------------------------------

    def _plan(
        self, topk_idx: torch.Tensor, num_experts: int, layout: Layout | None, fmt: CallFormat
    ) -> _TorchState:
        """Send order, agreement and count exchange for a new routing (format ``fmt``)."""
        if layout is None:
            layout = self.get_dispatch_layout(topk_idx, num_experts)
        in_rank = layout.is_token_in_rank  # [T, R]
        # Rows ordered by destination rank, then token: nonzero of the transposed mask.
        dst_rank, send_token_idx = in_rank.t().nonzero(as_tuple=True)
        # NOTE: a token's rows come back summed in ascending rank order.
        rounds = summation_rounds(in_rank, send_token_idx, dst_rank)
        send_counts = layout.num_tokens_per_rank.to(torch.int64)
        seq = self._seq
        phase = "dispatch: agreement and count exchange"
        recv = self._agree(fmt, phase, topk_idx.device, send_counts[:, None])
        return _TorchState(send_token_idx, rounds, send_counts.tolist(), recv[:, 0].tolist(), layout, seq)

    @staticmethod
    def _prepare(
        x: torch.Tensor, x_scales: torch.Tensor | None, previous_event: EventHandle | None, cast_to_fp8: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Order after ``previous_event``; the FP8 cast of ``cast_to_fp8``."""
        if previous_event is not None:
            previous_event.current_stream_wait()
        return cast_bf16_to_fp8(x) if cast_to_fp8 else (x, x_scales)

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
        op = "cached dispatch" if handle is not None else "dispatch"
        fmt = self._format(op, num_experts, hidden, num_topk, x, handle)
        if handle is not None:
            state = handle.state
            self._agree(fmt, "cached dispatch: agreement", x.device)
        else:
            state = self._plan(topk_idx, num_experts, layout, fmt)

        # NOTE: x rows go straight into the output (one gather, no packing); the small columns
        # (scales, topk_idx, weights) travel packed in a second all-to-all.
        tok, num_recv = state.send_token_idx, sum(state.recv_counts)
        recv_x = torch.empty(num_recv, hidden, dtype=x.dtype, device=x.device)
        self._all_to_all(
            _as_bytes(recv_x), _as_bytes(x[tok]), state.recv_counts, state.send_counts, "dispatch: rows"
        )
        send = pack_rows(None, x_scales, topk_idx, topk_weights, tok)
        recv = torch.empty(num_recv, send.shape[1], dtype=torch.uint8, device=x.device)
        self._all_to_all(recv, send, state.recv_counts, state.send_counts, "dispatch: row metadata")
        _, recv_scales, recv_idx, recv_weights = unpack_rows(recv, x.dtype, 0, num_scales, num_topk)
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

    def _finish_dispatch(
        self,
        recv_x: torch.Tensor,
        recv_scales: torch.Tensor | None,
        recv_idx: torch.Tensor,
        recv_weights: torch.Tensor,
        num_experts: int,
        *,
        topk_idx: torch.Tensor,
        handle: Handle | None,
        state: Any,
        expert_alignment: int,
        num_worst_tokens: int | None,
        buffer_id: int,
        async_finish: bool,
    ) -> DispatchOutput:
        """The received rows in their final order (x [N_recv, H], scales, global topk_idx [N_recv, K],
        weights) -> ``DispatchOutput``."""
        num_recv = recv_x.shape[0]

        # Global expert index -> local index on this rank, -1 elsewhere.
        experts_per_rank = num_experts // self.num_ranks
        local = recv_idx - self.rank * experts_per_rank
        is_local = (recv_idx >= 0) & (local >= 0) & (local < experts_per_rank)
        recv_idx = torch.where(is_local, local, torch.full_like(local, -1))

        # Received rows per local expert (once per row), rounded up to the alignment.
        uses = torch.zeros(num_recv, experts_per_rank + 1, dtype=torch.bool, device=recv_x.device)
        uses.scatter_(1, torch.where(is_local, local, experts_per_rank), True)
        counts = uses[:, :experts_per_rank].sum(dim=0).tolist()
        num_tokens_per_expert = [-(-c // expert_alignment) * expert_alignment for c in counts]

        num_rows = num_recv
        if num_worst_tokens is not None:
            if num_recv > num_worst_tokens:
                raise ValueError(
                    f"num_worst_tokens: expected at least the {num_recv} rows rank {self.rank} receives, "
                    f"got {num_worst_tokens}"
                )
            num_rows = num_worst_tokens
            recv_x, recv_idx, recv_weights = (
                _pad_rows(recv_x, num_rows, 0),
                _pad_rows(recv_idx, num_rows, -1),
                _pad_rows(recv_weights, num_rows, 0),
            )
            recv_scales = _pad_rows(recv_scales, num_rows, 0) if recv_scales is not None else None
            num_tokens_per_expert = []  # the graph-capturable contract: nothing read back
        if handle is not None:
            new_handle = dataclasses.replace(handle, num_recv_tokens=num_rows)
        else:
            new_handle = Handle.for_routing(
                topk_idx,
                buffer_id=buffer_id,
                backend=self.name,
                num_experts=num_experts,
                num_recv_tokens=num_rows,
                state=state,
            )
        return DispatchOutput(
            x=recv_x,
            x_scales=recv_scales,
            topk_idx=recv_idx,
            topk_weights=recv_weights,
            num_tokens_per_expert=num_tokens_per_expert,
            handle=new_handle,
            event=self._event(recv_x.device, async_finish),
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
        state: _TorchState = handle.state
        hidden = x.shape[1]
        self._agree(self._format("combine", handle.num_experts, hidden, 0, x, handle), "combine: agreement",
                    x.device)  # fmt: skip
        x = x[: sum(state.recv_counts)]  # rows past the received ones pad a num_worst_tokens dispatch
        back = torch.empty(len(state.send_token_idx), hidden, dtype=x.dtype, device=x.device)
        self._all_to_all(
            _as_bytes(back),
            _as_bytes(x),
            state.send_counts,
            state.recv_counts,
            "combine: rows",
        )
        # Sum in float32 in ascending rank order: round j adds every token's j-th returned row, so
        # each round touches a token at most once.
        y = sum_rounds(back, state.rounds, handle.num_tokens)
        return CombineOutput(x=y.to(torch.bfloat16), event=self._event(x.device, async_finish))

    @staticmethod
    def _event(device: torch.device, async_finish: bool) -> EventHandle:
        # The collectives above were waited for: on CPU the work is done; on CUDA mark the stream.
        if device.type == "cuda":
            return EventHandle.record()
        return EventHandle(None)
