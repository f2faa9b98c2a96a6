"""The torch backend on 2, 4 and 8 gloo processes equals the reference bit for bit."""

from __future__ import annotations

import pytest
import torch
from cases import Case, bits, combine_in_order, expert_output, make_inputs
from dispatch_checks import (
    cached_dispatch,
    case_reference,
    check_dispatch,
    check_worst_tokens,
    dispatch_case,
    dispatch_fields,
    rescaled,
    worst_tokens_result,
)

import commkit
from commkit.launch import spawn_gloo
from commkit.reference import cast_to_fp8, combine_reference, dispatch_reference, layout_reference


def cases_for(world: int) -> list[Case]:
    odd = tuple(901 % (97 + r) + r for r in range(world))  # uneven, odd token counts
    experts = 8 * world
    return [
        Case("uniform", (64,) * world, num_experts=experts, seed=1),
        Case("odd-sizes-unused-slots", odd, hidden=72, num_topk=3, num_experts=experts, unused=0.3, seed=2),
        Case("heavy-skew", (48,) * world, num_experts=experts, skew=3.0, num_topk=6, seed=3),
        Case("empty-rank", (40,) * world, num_experts=experts, empty_rank=world - 1, seed=4),
        Case("zero-tokens", (0,) + (33,) * (world - 1), num_experts=experts, seed=5),
        Case("one-expert", (30,) * world, num_experts=experts, hot_expert=experts - 1, seed=6),
        Case("top1", (50,) * world, num_topk=1, num_experts=experts, seed=7),
        Case("fp8", (37,) * world, hidden=256, num_experts=experts, fp8=True, unused=0.2, seed=8),
        Case("fp8-odd-hidden", (21,) * world, hidden=144, num_experts=experts, fp8=True, seed=9),
        Case("aligned", (45,) * world, num_experts=experts, expert_alignment=16, seed=10),
        Case("duplicate-experts", (29,) * world, num_experts=experts, duplicates=True, unused=0.1, seed=11),
    ]


def run_cases(rank: int, world: int, cases: list[Case]) -> list[dict]:
    buf = commkit.Buffer(backend="torch", timeout_s=60)
    results = []
    for c, case in enumerate(cases):
        x, topk_idx, weights = make_inputs(case, rank)
        layout, out = dispatch_case(buf, case, c, x, topk_idx, weights)
        # Events on CPU mark work that has already finished; waiting on them is a no-op.
        out.event.current_stream_wait()
        recv_x = out.x.to(torch.bfloat16) if case.fp8 else out.x
        y = buf.combine(expert_output(recv_x, rank), out.handle, previous_event=out.event, async_finish=True)
        y.event.current_stream_wait()
        again = cached_dispatch(buf, case, x, topk_idx, weights, out.handle)
        results.append(dict(layout=layout, **dispatch_fields(out), y=y.x, cached=dispatch_fields(again)))
    return results


def check_against_reference(world: int, cases: list[Case], got: list[list[dict]]) -> None:
    order_matters = False
    for c, case in enumerate(cases):
        inputs = [make_inputs(case, r) for r in range(world)]
        fp8 = case.fp8
        idxs, weights = [inp[1] for inp in inputs], [inp[2] for inp in inputs]
        for cached in (False, True):
            xs = [rescaled(inp[0]) if cached else inp[0] for inp in inputs]
            ref = case_reference(case, inputs, xs, fp8)
            for r in range(world):
                g = got[r][c]["cached"] if cached else got[r][c]
                check_dispatch(g, ref[r], fp8, f"case {case.name}, rank {r}, cached={cached}")
        ref = dispatch_reference(
            [inp[0][0] for inp in inputs] if fp8 else [inp[0] for inp in inputs],
            idxs,
            weights,
            case.num_experts,
            x_scales=[inp[0][1] for inp in inputs] if fp8 else None,
        )
        x_experts = [expert_output(d.x.to(torch.bfloat16) if fp8 else d.x, r) for r, d in enumerate(ref)]
        ys = combine_reference(x_experts, ref, list(case.tokens))
        reversed_ys = combine_in_order(x_experts, ref, list(case.tokens), reversed(range(world)))
        order_matters |= any(not torch.equal(bits(a), bits(b)) for a, b in zip(ys, reversed_ys, strict=True))
        for r in range(world):
            g = got[r][c]
            where = f"case {case.name}, rank {r}"
            lay = layout_reference(idxs[r], case.num_experts, world)
            assert torch.equal(g["layout"].is_token_in_rank, lay.is_token_in_rank), where
            assert torch.equal(g["layout"].num_tokens_per_rank, lay.num_tokens_per_rank), where
            assert torch.equal(g["layout"].num_tokens_per_expert, lay.num_tokens_per_expert), where
            assert torch.equal(bits(g["y"]), bits(ys[r])), where
    # The payloads are such that another summation order gives other bits: the order is tested.
    # (With two ranks a token gets at most two rows, and a + b == b + a.)
    assert order_matters or world < 3


@pytest.mark.parametrize("world", [2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_torch_backend_matches_reference(world: int) -> None:
    cases = cases_for(world)
    got = spawn_gloo(run_cases, world, cases, timeout_s=300)
    check_against_reference(world, cases, got)


def cast_and_worst(rank: int, world: int, case: Case, worst: int) -> dict:
    buf = commkit.Buffer(backend="torch", timeout_s=60)
    x, topk_idx, weights = make_inputs(case, rank)
    out = buf.dispatch(x, topk_idx, weights, case.num_experts, cast_to_fp8=True, num_worst_tokens=worst)
    y = buf.combine(expert_output(out.x.to(torch.bfloat16), rank), out.handle)
    return worst_tokens_result(out, y)


def test_cast_to_fp8_and_num_worst_tokens() -> None:
    world, worst = 3, 200
    case = Case("cast", (50, 61, 7), hidden=256, num_experts=12, unused=0.2, seed=12)
    got = spawn_gloo(cast_and_worst, world, case, worst, timeout_s=120)
    inputs = [make_inputs(case, r) for r in range(world)]
    casts = [cast_to_fp8(inp[0]) for inp in inputs]
    ref = case_reference(case, inputs, casts, True)
    x_experts = [expert_output(d.x.to(torch.bfloat16), r) for r, d in enumerate(ref)]
    ys = combine_reference(x_experts, ref, list(case.tokens))
    for r in range(world):
        check_worst_tokens(got[r], ref[r], ys[r], worst, f"rank {r}")
