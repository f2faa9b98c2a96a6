"""The ``torch`` backend: dispatch and combine on ``torch.distributed.all_to_all_single``.

It runs on gloo (CPU processes) and NCCL, and does what Megatron-Core's AlltoAll token dispatcher
does: permute the tokens by destination rank, exchange the per-rank counts, one all-to-all of the
rows, and for combine the reverse all-to-all followed by an unpermute-and-sum. It is the backend
without a GPU and the baseline the kernels are measured against.

Each row travels as bytes (``x`` row, FP8 scales, ``topk_idx`` and ``topk_weights`` packed side by
side) so that one all-to-all moves everything, whatever the dtype, on every torch.distributed backend.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    """

    send_token_idx: torch.Tensor
    rounds: list[tuple[torch.Tensor, torch.Tensor]]
    send_counts: list[int]
    recv_counts: list[int]
    layout: Layout


def compute_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> Layout:
    """Layout of a [T, K] routing (see ``commkit.types.Layout``)."""
    num_tokens = topk_idx.shape[0]
    # Unused slots (-1) scatter into a spare column E that is dropped.
    columns = torch.where(topk_idx >= 0, topk_idx, num_experts)
    uses_expert = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=topk_idx.device)
    uses_expert.scatter_(1, columns, True)
    uses_expert = uses_expert[:, :num_experts]  # [T, E]
    is_token_in_rank = uses_expert.view(num_tokens, num_ranks, num_experts // num_ranks).any(dim=2)
    return Layout(
        num_tokens_per_rank=is_token_in_rank.sum(dim=0),
        num_tokens_per_expert=uses_expert.sum(dim=0),
        is_token_in_rank=is_token_in_rank,
    )


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


class TorchBackend:
    """Dispatch/combine over a ``torch.distributed`` process group (gloo or NCCL)."""

    name = "torch"

    def __init__(self, group: dist.ProcessGroup | None, *, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"

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

    # -- layout --------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        return compute_layout(topk_idx, num_experts, self.num_ranks)

    # -- dispatch ------------------------------------------------------------------------------

    def _plan(
        self, topk_idx: torch.Tensor, num_experts: int, layout: Layout | None, row_format: tuple[int, ...]
    ) -> _TorchState:
        """Send order and count exchange for a new routing; ``row_format`` must agree on all ranks."""
        if layout is None:
            layout = compute_layout(topk_idx, num_experts, self.num_ranks)
        in_rank = layout.is_token_in_rank  # [T, R]
        # Rows ordered by destination rank, then token: nonzero of the transposed mask.
        dst_rank, send_token_idx = in_rank.t().nonzero(as_tuple=True)
        # NOTE: a token's rows come back summed in ascending rank order; its row for rank r is
        # number (ranks below r that it also went to) in that order.
        rank_order = in_rank.to(torch.int64).cumsum(dim=1) - 1  # [T, R]
        send_round = rank_order[send_token_idx, dst_rank]  # [S]
        num_rounds = int(send_round.max()) + 1 if send_round.numel() else 0
        rounds = []
        for j in range(num_rounds):
            rows = (send_round == j).nonzero(as_tuple=True)[0]
            rounds.append((rows, send_token_idx[rows]))
        send_counts = layout.num_tokens_per_rank.to(torch.int64)
        # With the counts go the row format and E: ranks that disagree would corrupt rows silently.
        send_meta = torch.tensor(row_format, dtype=torch.int64, device=send_counts.device).expand(
            self.num_ranks, -1
        )
        send = torch.cat([send_counts[:, None], send_meta], dim=1)  # [R, 1 + len(row_format)]
        recv = torch.empty_like(send)
        self._all_to_all(recv, send, None, None, "dispatch: count exchange")
        mismatch = (recv[:, 1:] != send_meta).any(dim=1).nonzero(as_tuple=True)[0].tolist()
        if mismatch:
            names = "(num_experts, hidden, top-k, x bytes per element, scales per row)"
            peer = mismatch[0]
            raise ValueError(
                f"dispatch: expected every rank to pass the same {names} = {tuple(row_format)}, "
                f"got {tuple(recv[peer, 1:].tolist())} from rank {peer}"
            )
        return _TorchState(send_token_idx, rounds, send_counts.tolist(), recv[:, 0].tolist(), layout)

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
        if previous_event is not None:
            previous_event.current_stream_wait()
        if cast_to_fp8:
            x, x_scales = cast_bf16_to_fp8(x)
        hidden, num_topk = x.shape[1], topk_idx.shape[1]
        num_scales = x_scales.shape[1] if x_scales is not None else 0
        if handle is not None:
            state = handle.state
        else:
            row_format = (num_experts, hidden, num_topk, x.element_size(), num_scales)
            state = self._plan(topk_idx, num_experts, layout, row_format)

        # Pack each sent row's bytes: x | scales | topk_idx | topk_weights.
        tok = state.send_token_idx
        parts = [_as_bytes(x[tok])]
        if x_scales is not None:
            parts.append(_as_bytes(x_scales[tok]))
        parts += [_as_bytes(topk_idx[tok]), _as_bytes(topk_weights[tok])]
        send = torch.cat(parts, dim=1)
        num_recv = sum(state.recv_counts)
        recv = torch.empty(num_recv, send.shape[1], dtype=torch.uint8, device=x.device)
        self._all_to_all(recv, send, state.recv_counts, state.send_counts, "dispatch: rows")

        # Unpack.
        widths = [p.shape[1] for p in parts]
        cols = torch.split(recv, widths, dim=1)
        recv_x = _from_bytes(cols[0], x.dtype, hidden)
        recv_scales = _from_bytes(cols[1], torch.float32, x_scales.shape[1]) if x_scales is not None else None
        recv_idx = _from_bytes(cols[-2], torch.int64, num_topk)
        recv_weights = _from_bytes(cols[-1], torch.float32, num_topk)

        # Global expert index -> local index on this rank, -1 elsewhere.
        experts_per_rank = num_experts // self.num_ranks
        local = recv_idx - self.rank * experts_per_rank
        is_local = (recv_idx >= 0) & (local >= 0) & (local < experts_per_rank)
        recv_idx = torch.where(is_local, local, torch.full_like(local, -1))

        # Received rows per local expert (once per row), rounded up to the alignment.
        uses = torch.zeros(num_recv, experts_per_rank + 1, dtype=torch.bool, device=x.device)
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
            event=self._event(x.device, async_finish),
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
        x = x[: sum(state.recv_counts)]  # rows past the received ones pad a num_worst_tokens dispatch
        hidden = x.shape[1]
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
        y = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32, device=x.device)
        for rows, tokens in state.rounds:
            y[tokens] += back[rows].to(torch.float32)
        return CombineOutput(x=y.to(torch.bfloat16), event=self._event(x.device, async_finish))

    @staticmethod
    def _event(device: torch.device, async_finish: bool) -> EventHandle:
        # The collectives above were waited for: on CPU the work is done; on CUDA mark the stream.
        if device.type == "cuda":
            return EventHandle.record()
        return EventHandle(None)
