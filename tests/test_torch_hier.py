"""The torch backend's two-level path (a group told it spans several nodes) equals the node-aware
reference bit for bit, on 4 gloo processes as 2 nodes of 2 and on 8 as 2 nodes of 4."""

from __future__ import annotations

import os
import time

import pytest
import torch
from cases import Case, bits, expert_output, make_inputs
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
from commkit.launch import RankFailed, spawn_gloo
from commkit.reference import cast_to_fp8, combine_reference, layout_reference


def cases_for(world: int, per_node: int) -> list[Case]:
    odd = tuple(901 % (97 + r) + r for r in range(world))
    experts = 8 * world
    g: dict = dict(num_experts=experts, ranks_per_node=per_node)
    return [
        Case("uniform", (64,) * world, seed=1, **g),
        Case("odd-sizes-unused-slots", odd, hidden=72, num_topk=3, unused=0.3, seed=2, **g),
        Case("heavy-skew", (48,) * world, skew=3.0, num_topk=6, seed=3, **g),
        Case("empty-node", (40,) * world, empty_node=world // per_node - 1, seed=4, **g),
        Case("own-node-only", (40,) * world, own_node_only=True, seed=5, **g),
        Case("zero-tokens", (0,) + (33,) * (world - 1), seed=6, **g),
        Case("zero-token-node", (0,) * per_node + (25,) * (world - per_node), seed=7, **g),
        Case("one-expert", (30,) * world, hot_expert=experts - 1, seed=8, **g),
        Case("top8", (36,) * world, num_topk=8, seed=9, **g),
        Case("fp8", (37,) * world, hidden=256, fp8=True, unused=0.2, seed=10, **g),
        Case(
            "aligned-duplicates",
            (45,) * world,
            expert_alignment=16,
            duplicates=True,
            unused=0.1,
            seed=11,
            **g,
        ),
    ]


def cast_case(world: int, per_node: int) -> Case:
    tokens = tuple(20 + 7 * r for r in range(world))
    return Case(
        "cast", tokens, hidden=256, num_experts=4 * world, ranks_per_node=per_node, unused=0.2, seed=12
    )


def run_cases(rank: int, world: int, per_node: int, cases: list[Case]) -> dict:
    buf = commkit.Buffer(backend="torch", timeout_s=60, num_ranks_per_node=per_node)
    results = []
    for c, case in enumerate(cases):
        x, topk_idx, weights = make_inputs(case, rank)
        layout, out = dispatch_case(buf, case, c, x, topk_idx, weights)
        recv_x = out.x.to(torch.bfloat16) if case.fp8 else out.x
        y = buf.combine(expert_output(recv_x, rank), out.handle, previous_event=out.event)
        again = cached_dispatch(buf, case, x, topk_idx, weights, out.handle)
        y_again = buf.combine(expert_output(again.x.to(torch.bfloat16), rank), again.handle)
        state = out.handle.state
        results.append(
            dict(
                layout=layout,
                **dispatch_fields(out),
                y=y.x,
                cached=dispatch_fields(again),
                y_again=y_again.x,
                sent=state.cross_node_send_rows,
                received=state.cross_node_recv_rows,
            )
        )
    # cast_to_fp8 with num_worst_tokens on the two-level path.
    case = cast_case(world, per_node)
    x, topk_idx, weights = make_inputs(case, rank)
    worst = sum(case.tokens)
    out = buf.dispatch(x, topk_idx, weights, case.num_experts, cast_to_fp8=True, num_worst_tokens=worst)
    y = buf.combine(expert_output(out.x.to(torch.bfloat16), rank), out.handle)
    return dict(cases=results, worst=worst_tokens_result(out, y), backend=type(buf._backend).__name__)


def check(world: int, per_node: int, cases: list[Case], got: list[dict]) -> None:
    num_nodes = world // per_node
    assert all(g["backend"] == "HierTorchBackend" for g in got)
    two_level_matters = False
    for c, case in enumerate(cases):
        inputs = [make_inputs(case, r) for r in range(world)]
        idxs = [inp[1] for inp in inputs]
        for cached in (False, True):
            xs = [rescaled(inp[0]) if cached else inp[0] for inp in inputs]
            ref = case_reference(case, inputs, xs, case.fp8)
            for r in range(world):
                g = got[r]["cases"][c]
                where = f"case {case.name}, rank {r}, cached={cached}"
                check_dispatch(g["cached"] if cached else g, ref[r], case.fp8, where)
            x_experts = [expert_output(d.x.to(torch.bfloat16), q) for q, d in enumerate(ref)]
            ys = combine_reference(x_experts, ref, list(case.tokens), per_node)
            flat = combine_reference(x_experts, ref, list(case.tokens))
            two_level_matters |= any(not torch.equal(bits(a), bits(b)) for a, b in zip(ys, flat, strict=True))
            for r in range(world):
                y = got[r]["cases"][c]["y_again" if cached else "y"]
                assert torch.equal(bits(y), bits(ys[r])), f"case {case.name}, rank {r}, cached={cached}"
        total_sent = total_received = 0
        for r in range(world):
            g, where = got[r]["cases"][c], f"case {case.name}, rank {r}"
            lay = layout_reference(idxs[r], case.num_experts, world, per_node)
            for f in ("is_token_in_rank", "num_tokens_per_rank", "num_tokens_per_expert",
                      "is_token_in_node", "num_tokens_per_node"):  # fmt: skip
                assert torch.equal(getattr(g["layout"], f), getattr(lay, f)), f"{where}: {f}"
            # Rows crossing nodes: each token once per node it reaches other than its own.
            node = r // per_node
            want = sum(int(lay.num_tokens_per_node[n]) for n in range(num_nodes) if n != node)
            assert g["sent"] == want, where
            total_sent += g["sent"]
            total_received += g["received"]
        assert total_received == total_sent
        if case.own_node_only:
            assert total_sent == 0
        elif sum(case.tokens[per_node:]):
            assert total_sent > 0
    # The payloads are such that the flat rule gives other bits: the two-level rule is tested.
    assert two_level_matters


def check_worst(world: int, per_node: int, case: Case, got: list[dict]) -> None:
    inputs = [make_inputs(case, r) for r in range(world)]
    casts = [cast_to_fp8(inp[0]) for inp in inputs]
    ref = case_reference(case, inputs, casts, True)
    x_experts = [expert_output(d.x.to(torch.bfloat16), r) for r, d in enumerate(ref)]
    ys = combine_reference(x_experts, ref, list(case.tokens), per_node)
    for r in range(world):
        check_worst_tokens(got[r]["worst"], ref[r], ys[r], sum(case.tokens), f"worst, rank {r}")


@pytest.mark.parametrize("world,per_node", [(4, 2), pytest.param(8, 4, marks=pytest.mark.slow)])
def test_two_level_matches_node_aware_reference(world: int, per_node: int) -> None:
    cases = cases_for(world, per_node)
    got = spawn_gloo(run_cases, world, per_node, cases, timeout_s=300)
    check(world, per_node, cases, got)
    check_worst(world, per_node, cast_case(world, per_node), got)


def buffer_checks(rank: int, world: int) -> dict:
    out: dict = {}
    for bad in (3, 0, 8):
        try:
            commkit.Buffer(backend="torch", num_ranks_per_node=bad)
        except ValueError as err:
            out[bad] = str(err)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    out["env"] = commkit.Buffer(backend="torch").num_ranks_per_node
    os.environ["LOCAL_WORLD_SIZE"] = "3"
    try:
        commkit.Buffer(backend="torch")
    except ValueError as err:
        out["env-bad"] = str(err)
    del os.environ["LOCAL_WORLD_SIZE"]
    one = commkit.Buffer(backend="torch", num_ranks_per_node=world)
    out["one-node"] = (one.num_ranks_per_node, type(one._backend).__name__)
    out["default"] = commkit.Buffer(backend="torch").num_ranks_per_node
    # Ranks that disagree on the node size: every rank raises from the count exchange.
    buf = commkit.Buffer(backend="torch", num_ranks_per_node=2 if rank else 1, timeout_s=30)
    x = torch.randn(4, 64).to(torch.bfloat16)
    idx = torch.tensor([[0, 5], [1, -1], [7, 6], [2, 3]])
    try:
        buf.dispatch(x, idx, torch.rand(4, 2), 8)
    except ValueError as err:
        out["mismatch"] = str(err)
    return out


def test_num_ranks_per_node_validation() -> None:
    got = spawn_gloo(buffer_checks, 4, timeout_s=120)
    for g in got:
        for bad in (3, 0, 8):
            assert "num_ranks_per_node" in g[bad] and "divisor" in g[bad], g[bad]
        assert g["env"] == 2
        assert "LOCAL_WORLD_SIZE" in g["env-bad"]
        assert g["one-node"] == (4, "TorchBackend")
        assert g["default"] == 4
        assert "num_ranks_per_node" in g["mismatch"]


def peer_hangs(rank: int, world: int, timeout_s: float) -> tuple[str, str, float]:
    buf = commkit.Buffer(backend="torch", timeout_s=timeout_s, num_ranks_per_node=2)
    x = torch.randn(4, 64).to(torch.bfloat16)
    idx = torch.tensor([[0, 5], [1, -1], [7, 6], [2, 3]])
    out = buf.dispatch(x, idx, torch.rand(4, 2), 8)
    if rank == world - 1:
        time.sleep(timeout_s + 2)  # alive, never arrives
        os._exit(0)
    start = time.monotonic()
    try:
        buf.combine(out.x, out.handle)
        return "no error", "", time.monotonic() - start
    except Exception as err:  # noqa: BLE001
        return type(err).__name__, str(err), time.monotonic() - start


@pytest.mark.slow
def test_peer_that_never_arrives_times_out_on_the_two_level_path() -> None:
    timeout_s = 3.0
    got = spawn_gloo(peer_hangs, 4, timeout_s, timeout_s=60, allow_failures=True)
    assert isinstance(got[3], RankFailed)
    for rank in range(3):
        cls, message, elapsed = got[rank]
        assert cls == "CommTimeoutError", message
        assert f"rank {rank} of 4, phase 'combine: agreement'" in message, message
        assert timeout_s - 0.5 <= elapsed < timeout_s + 5, elapsed
