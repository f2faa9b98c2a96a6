"""What the gloo-process tests of ``Buffer`` (the torch backend, flat and two-level, and the kernels
backend on the nvlink-domain transport) share: the dispatch each case runs, the cached dispatch that
reuses its handle, and the checks of their outputs against ``commkit.reference``, bit for bit."""

from __future__ import annotations

import torch
from cases import Case, bits

import commkit
from commkit.reference import RankDispatch, dispatch_reference

# x as make_inputs gives it: a bf16 tensor or an (fp8 tensor, scales) pair
Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# The outputs of a dispatch that the checks compare (a rank returns them from its process).
DISPATCH_FIELDS = ("x", "x_scales", "topk_idx", "topk_weights", "num_tokens_per_expert")


def rescaled(x: Payload) -> Payload:
    """Other payload, same routing: what a cached dispatch sends."""
    if isinstance(x, tuple):
        return x[0], x[1] * 2
    return (x.to(torch.float32) * -2).to(torch.bfloat16)


def dispatch_case(
    buf: commkit.Buffer, case: Case, c: int, x: Payload, topk_idx: torch.Tensor, weights: torch.Tensor
) -> tuple[commkit.Layout, commkit.DispatchOutput]:
    """The layout of case number c and its dispatch. The cases alternate between a given layout and
    none, and between synchronous and async_finish, so that every run covers the four."""
    layout = buf.get_dispatch_layout(topk_idx, case.num_experts)
    out = buf.dispatch(
        x,
        topk_idx,
        weights,
        case.num_experts,
        layout=layout if c % 2 == 0 else None,
        expert_alignment=case.expert_alignment,
        async_finish=c % 2 == 1,
    )
    return layout, out


def cached_dispatch(
    buf: commkit.Buffer,
    case: Case,
    x: Payload,
    topk_idx: torch.Tensor,
    weights: torch.Tensor,
    handle: commkit.Handle,
) -> commkit.DispatchOutput:
    """A cached dispatch: same routing, another payload, no layout or count exchange."""
    return buf.dispatch(
        rescaled(x),
        topk_idx,
        weights,
        case.num_experts,
        handle=handle,
        expert_alignment=case.expert_alignment,
    )


def dispatch_fields(out: commkit.DispatchOutput) -> dict:
    """The fields of a dispatch's output that check_dispatch compares."""
    return {f: getattr(out, f) for f in DISPATCH_FIELDS}


def worst_tokens_result(out: commkit.DispatchOutput, y: commkit.CombineOutput) -> dict:
    """What a rank returns from a dispatch with num_worst_tokens and its combine (check_worst_tokens)."""
    return dict(x=out.x, x_scales=out.x_scales, topk_idx=out.topk_idx, topk_weights=out.topk_weights,
                counts=out.num_tokens_per_expert, y=y.x)  # fmt: skip


def case_reference(case: Case, inputs: list, xs: list, fp8: bool) -> list[RankDispatch]:
    """dispatch_reference of a case: the routing of inputs (make_inputs of every rank), the payload xs."""
    return dispatch_reference(
        [x[0] for x in xs] if fp8 else xs,
        [inp[1] for inp in inputs],
        [inp[2] for inp in inputs],
        case.num_experts,
        x_scales=[x[1] for x in xs] if fp8 else None,
        expert_alignment=case.expert_alignment,
    )


def check_dispatch(got: dict, want: RankDispatch, fp8: bool, where: str) -> None:
    assert torch.equal(bits(got["x"]), bits(want.x)), where
    if fp8:
        assert torch.equal(bits(got["x_scales"]), bits(want.x_scales)), where
    else:
        assert got["x_scales"] is None, where
    assert torch.equal(got["topk_idx"], want.topk_idx), where
    assert torch.equal(bits(got["topk_weights"]), bits(want.topk_weights)), where
    assert got["num_tokens_per_expert"] == want.num_tokens_per_expert, where


def check_worst_tokens(got: dict, want: RankDispatch, y: torch.Tensor, worst: int, where: str) -> None:
    """A rank's worst_tokens_result: worst rows, the valid ones as the reference (FP8, cast by the
    dispatch), the padding unrouted, no counts (empty by contract) and the combine's output y."""
    n = want.x.shape[0]
    assert got["x"].shape[0] == worst and got["counts"] == []
    valid = {k: v[:n] for k, v in got.items() if k not in ("counts", "y")}
    valid["num_tokens_per_expert"] = want.num_tokens_per_expert  # empty by contract, checked above
    check_dispatch(valid, want, True, where)
    assert torch.all(got["topk_idx"][n:] == -1) and torch.all(got["topk_weights"][n:] == 0)
    assert torch.equal(bits(got["y"]), bits(y)), where
