"""Autograd for ``Buffer.dispatch`` and ``Buffer.combine`` (every backend).

``Buffer`` routes a call here when one of its differentiable inputs requires grad (and grad mode is
on); the forward is the very same backend call, so the outputs are the same bits.

What is differentiable, and what the backward does (T tokens, N rows received, H hidden, K slots):

- ``dispatch``: ``x`` [T, H] bf16 and ``topk_weights`` [T, K] float32. The backward is ONE combine
  of the received rows' gradients with the dispatch's handle (two-level over several nodes, as the
  forward combine): ``grad_x[t]`` is the sum of the gradients of token t's received copies (float32
  from +0.0 in ascending rank order, rounded to bf16, exactly ``combine``). The gradient of
  ``topk_weights[t, k]`` is the gradient of ``out.topk_weights[row, k]`` on the rank that hosts the
  slot's expert (``out.topk_idx[row, k] >= 0``); the received weights of slots whose expert lives
  elsewhere are copies without gradient. Those float32 gradients ride in the same combine as three
  extra bf16 columns per slot (``hi + mid + lo``, an exact split of a float32), and because only one
  rank sends a nonzero value per slot they come back exactly. No gradient: ``topk_idx`` (integers),
  the FP8 scales, and an FP8 pair ``x`` (its data is float8; dispatch bf16 ``x`` with
  ``cast_to_fp8=True`` to train with FP8 dispatch).
- FP8 dispatch (``cast_to_fp8=True``) with ``x`` requiring grad: ``out.x`` stays the float8 data
  (no gradient), and ``out.x_dequantized`` [N, H] float32, ``cast_from_fp8(out.x, out.x_scales)``,
  is the differentiable received rows (straight through the quantisation: d dequant(q(x)) / dx = I).
  Its gradient goes back to the bf16 ``x`` as bf16 (the backward combine). ``received_x(out)``
  returns whichever of the two a layer should compute on.
- ``combine``: ``x`` [N, H] bf16. The backward is a cached dispatch of ``grad_y`` [T, H] (rounded
  to bf16) with the same handle: every received row gets its source token's gradient. With
  ``num_worst_tokens`` the padding rows get zeros.

Cost and ordering: one combine (dispatch backward) or one cached dispatch (combine backward) per
call, with the forward's SM budget; the cached dispatch skips the layout and the count exchange. The
backward reads nothing back to the host (every size is the handle's), so it adds no host sync: on
CUDA it runs on autograd's stream, ordered after the work before it and with that stream waiting for
the communication (``async_finish=False``, a stream wait); a forward with ``async_finish``/events
behaves as before. (The ``torch`` backend on NCCL reads its per-expert counts back in every dispatch,
a cached one included, as in its forward.) Every rank must run the backward through the same calls
in the same order, as for the forward; the backward is not itself differentiable (no double
backward).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from commkit.fp8 import cast_from_fp8
from commkit.types import CombineOutput, DispatchOutput, Handle

if TYPE_CHECKING:
    from commkit.buffer import Buffer

# NOTE: a combine's backward is a cached dispatch that must pass the same num_worst_tokens as the
# dispatch that made the handle (every rank passes the same value); Handle is not ours to extend, so
# the value is kept here by handle identity, dropped when the handle is collected.
_WORST_TOKENS: dict[int, int] = {}


def remember_num_worst_tokens(handle: Handle, num_worst_tokens: int | None) -> None:
    """Record the ``num_worst_tokens`` of the dispatch that made ``handle`` (None: nothing to do)."""
    if num_worst_tokens is None:
        return
    key = id(handle)
    _WORST_TOKENS[key] = num_worst_tokens
    weakref.finalize(handle, _WORST_TOKENS.pop, key, None)


def _num_worst_tokens(handle: Handle) -> int | None:
    return _WORST_TOKENS.get(id(handle))


@dataclass
class DifferentiableDispatchOutput(DispatchOutput):
    """``DispatchOutput`` of an FP8 dispatch whose ``x`` requires grad.

    x_dequantized: [N_recv, H] float32, ``cast_from_fp8(x, x_scales)``, differentiable (see module doc)
    """

    x_dequantized: torch.Tensor | None = None


def received_x(out: DispatchOutput) -> torch.Tensor:
    """The received rows a layer computes on: ``out.x_dequantized`` of a differentiable FP8 dispatch,
    else the dequantized FP8 rows (float32 [N, H]) or ``out.x`` (bf16 [N, H])."""
    deq = getattr(out, "x_dequantized", None)
    if deq is not None:
        return deq
    if out.x_scales is not None:
        return cast_from_fp8(out.x, out.x_scales)
    return out.x


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- the float32 <-> 3 x bf16 split of the topk_weights gradients ---------------------------------


def split_f32(g: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [N, 3K] bf16 (hi | mid | lo) with hi + mid + lo == g (float32, 24 bits in
    3 x 8): each piece is the bf16 rounding of what the pieces before it left (exact residuals)."""
    hi = g.to(torch.bfloat16)
    rest = g - hi.to(torch.float32)
    mid = rest.to(torch.bfloat16)
    lo = (rest - mid.to(torch.float32)).to(torch.bfloat16)
    return torch.cat([hi, mid, lo], dim=1)


def join_f32(pieces: torch.Tensor, num_topk: int) -> torch.Tensor:
    """The inverse of ``split_f32``: [T, 3K] bf16 -> [T, K] float32."""
    hi, mid, lo = (p.to(torch.float32) for p in pieces.split(num_topk, dim=1))
    return (hi + mid) + lo


def _bf16_rows(g: torch.Tensor) -> torch.Tensor:
    """A gradient as the backends take rows: bf16, contiguous (autograd's may be expanded views)."""
    return g.to(torch.bfloat16).contiguous()


# -- dispatch --------------------------------------------------------------------------------------


@dataclass
class DispatchCall:
    """One dispatch as the backend runs it; the forward fills ``out``."""

    buffer: Buffer
    run: Any  # (x, topk_weights) -> DispatchOutput: the backend call with every other argument bound
    num_sms: int
    fp8_out: bool
    out: DispatchOutput | None = None


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, call: DispatchCall) -> Any:
        out = call.run(x, topk_weights)
        call.out = out
        ctx.call = call
        ctx.hidden = x.shape[1]
        if call.fp8_out:
            # NOTE: the float8 rows cannot carry a bf16 gradient (autograd casts a gradient to its
            # tensor's dtype): the dequantized rows are the differentiable output instead
            rows = cast_from_fp8(out.x, out.x_scales) if ctx.needs_input_grad[0] else out.x
        else:
            rows = out.x
        if not ctx.needs_input_grad[0]:
            ctx.mark_non_differentiable(rows)
        if not ctx.needs_input_grad[1]:
            ctx.mark_non_differentiable(out.topk_weights)
        return rows, out.topk_weights

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: torch.Tensor, grad_weights: torch.Tensor) -> Any:
        call: DispatchCall = ctx.call
        out = call.out
        assert out is not None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_topk = out.topk_idx.shape[1]
        # NOTE: the layout of the rows depends only on what requires grad (the same on every rank,
        # as the backend needs), never on which gradients autograd happened to materialise
        parts = []
        hidden = ctx.hidden if need_x else 0
        if need_x:
            parts.append(_bf16_rows(grad_rows))
        if need_w:
            local = out.topk_idx >= 0  # only the rank hosting a slot's expert sends its gradient
            parts.append(split_f32(torch.where(local, grad_weights.to(torch.float32), 0.0)))
        width = sum(p.shape[1] for p in parts)
        pad = -width % 8  # rows of a multiple of 16 bytes
        if pad:
            parts.append(torch.zeros(out.x.shape[0], pad, dtype=torch.bfloat16, device=out.x.device))
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        call.buffer._check_open("combine")  # the backward of a dispatch is a combine
        back = call.buffer._backend.combine(
            rows, out.handle, num_sms=call.num_sms, previous_event=None, async_finish=False
        ).x
        grad_x = back[:, :hidden] if need_x else None
        grad_w = join_f32(back[:, hidden : hidden + 3 * num_topk], num_topk) if need_w else None
        return grad_x, grad_w, None


def dispatch(call: DispatchCall, x: torch.Tensor, topk_weights: torch.Tensor) -> DispatchOutput:
    """Run ``call`` through ``_Dispatch``; the received rows and weights carry gradients."""
    rows, weights = _Dispatch.apply(x, topk_weights, call)
    out = call.out
    assert out is not None
    if call.fp8_out:
        return DifferentiableDispatchOutput(
            x=out.x,
            x_scales=out.x_scales,
            topk_idx=out.topk_idx,
            topk_weights=weights,
            num_tokens_per_expert=out.num_tokens_per_expert,
            handle=out.handle,
            event=out.event,
            x_dequantized=rows if rows.requires_grad else None,
        )
    out.x, out.topk_weights = rows, weights
    return out


# -- combine ---------------------------------------------------------------------------------------


@dataclass
class CombineCall:
    buffer: Buffer
    handle: Handle
    num_sms: int
    run: Any  # x -> CombineOutput
    out: CombineOutput | None = None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, call: CombineCall) -> torch.Tensor:
        out = call.run(x)
        call.out = out
        ctx.call = call
        return out.x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> Any:
        call: CombineCall = ctx.call
        handle = call.handle
        grad = _bf16_rows(grad_y)
        worst = _num_worst_tokens(handle)
        # The routing travels along (the backends send it with the rows); its weights are not needed.
        idx = handle.topk_idx.to(grad.device)
        weights = torch.zeros(idx.shape, dtype=torch.float32, device=grad.device)
        call.buffer._check_open("dispatch")  # the backward of a combine is a dispatch
        out = call.buffer._backend.dispatch(
            grad,
            None,
            idx,
            weights,
            handle.num_experts,
            layout=None,
            handle=handle,
            expert_alignment=1,
            num_sms=call.num_sms,
            previous_event=None,
            async_finish=False,
            buffer_id=call.buffer.id,
            cast_to_fp8=False,
            num_worst_tokens=worst,
        )
        grad_x = out.x
        if worst is not None:
            # Padding rows (past N_recv: topk_idx all -1) are not read by combine: zero gradient
            # (the kernels leave them unwritten).
            grad_x = torch.where((out.topk_idx >= 0).any(dim=1, keepdim=True), grad_x, 0.0)
        return grad_x, None


def combine(call: CombineCall, x: torch.Tensor) -> CombineOutput:
    """Run ``call`` through ``_Combine``; ``y.x`` carries the gradient to ``x``."""
    y = _Combine.apply(x, call)
    out = call.out
    assert out is not None
    out.x = y
    return out
