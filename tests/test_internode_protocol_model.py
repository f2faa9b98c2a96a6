"""CPU: the internode dispatch/combine protocol (tests/internode_model.py) under random interleavings.

Every run checks: no deadlock, dispatch outputs == dispatch_reference and combine outputs ==
combine_reference(num_ranks_per_node=G) bit for bit, the forwarder records, every counter and signal back
at 0 (two dispatch + combine rounds run back to back on one machine state), and the rows that crossed
the inter-node hop. Broken variants show that the scheduler reports deadlocks.
"""

from __future__ import annotations

import random

import pytest
import torch
from cases import bits
from internode_model import (
    INT32_MAX,
    Deadlock,
    DispatchResult,
    Machine,
    Params,
    Problem,
    Wait,
    local_gpu_mask,
    run_combine,
    run_dispatch,
    schedule,
)

from commkit.reference import combine_reference, dispatch_reference
from commkit.routing import synthetic_topk

HIDDEN = 16
POLICIES = ("uniform", "sticky", "priority")


# ---------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------


def make_problem(rng: random.Random, num_nodes: int, gpus: int, kind: str | None = None) -> Problem:
    """A random routing over num_nodes x gpus ranks: node-limited top-k (commkit.routing), or random
    top-k with unused (-1) slots and duplicated experts; token counts 0..40, some ranks empty."""
    num_ranks = num_nodes * gpus
    per_rank = rng.choice([1, 2, 3])
    num_experts = num_ranks * per_rank
    kind = kind or rng.choice(["node_limited", "random", "skewed"])
    num_topk = rng.randint(1, min(4, num_experts))
    tokens = [rng.choice([0, 1, 3, 7, 17, 25, 40]) for _ in range(num_ranks)]
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    xs, idxs, weights = [], [], []
    empty_rank = rng.randrange(num_ranks) if kind == "skewed" else None
    for num_tokens in tokens:
        # Magnitudes far apart, so that a wrong row or a wrong order shows in the sums
        scale = torch.tensor([1.0, 2.0**-8, 2.0**10])[torch.randint(0, 3, (num_tokens, 1), generator=gen)]
        xs.append((torch.randn(num_tokens, HIDDEN, generator=gen) * scale).to(torch.bfloat16))
        if kind == "node_limited":
            max_groups = rng.randint(1, num_nodes)
            k = min(num_topk, max_groups * num_experts // num_nodes)
            idx, w = synthetic_topk(
                num_tokens,
                num_experts,
                k,
                skew=rng.choice([0.0, 1.5]),
                num_groups=num_nodes,
                max_groups=max_groups,
                seed=rng.randrange(2**31),
            )
            if k < num_topk:  # pad to num_topk with unused slots
                idx = torch.cat([idx, torch.full((num_tokens, num_topk - k), -1)], dim=1)
                w = torch.cat([w, torch.zeros(num_tokens, num_topk - k)], dim=1)
        else:
            allowed = [e for e in range(num_experts) if empty_rank is None or e // per_rank != empty_rank]
            if kind == "skewed":  # low expert ids much more likely
                allowed = allowed[: max(1, len(allowed) // 3)] * 6 + allowed
            rows = []
            for _ in range(num_tokens):
                row = [rng.choice(allowed) if rng.random() > 0.2 else -1 for _ in range(num_topk)]
                if num_topk > 1 and rng.random() < 0.3:
                    row[1] = row[0]  # a duplicated expert
                rows.append(row)
            idx = torch.tensor(rows, dtype=torch.int64).reshape(num_tokens, num_topk)
            w = torch.rand(num_tokens, num_topk, generator=gen)
        idxs.append(idx)
        weights.append(w)
    return Problem(num_nodes, gpus, num_experts, xs, idxs, weights, padded_records=rng.random() < 0.5)


def expert_outputs(prob: Problem, seed: int) -> list[torch.Tensor]:
    """Rank-dependent expert outputs ([N_r, H] bf16), magnitudes far apart: the order of the sums shows."""
    gen = torch.Generator().manual_seed(seed)
    scales = (1.0, 2.0**-9, 2.0**12, -(2.0**12), 3.0)
    return [
        (torch.randn(offsets[-1], HIDDEN, generator=gen) * scales[r % 5]).to(torch.bfloat16)
        for r, offsets in enumerate(prob.recv_rank_offset)
    ]


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------


def check_dispatch(prob: Problem, got: DispatchResult) -> list:
    ref = dispatch_reference(prob.xs, prob.topk_idx, prob.topk_weights, prob.num_experts)
    for r, want in enumerate(ref):
        assert torch.equal(bits(got.x[r]), bits(want.x)), f"rank {r}: x"
        assert torch.equal(got.topk_idx[r], want.topk_idx), f"rank {r}: topk_idx"
        assert torch.equal(bits(got.topk_weights[r]), bits(want.topk_weights)), f"rank {r}: topk_weights"
        assert got.src_token[r] == want.src_token.tolist(), f"rank {r}: src_token"
        assert got.src_rank[r] == want.src_rank.tolist(), f"rank {r}: src_rank"
    # The forwarder records: per (source node m, node_pos), the GPUs of the node and the source token
    # (a padded source's unused tail keeps the host's mask 0 and token INT32_MAX)
    for r in range(prob.num_ranks):
        node, local = divmod(r, prob.gpus)
        want_mask, want_token = [], []
        for m in range(prob.num_nodes):
            src = m * prob.gpus + local
            for t, experts in enumerate(prob.experts[src]):
                if prob.node_send_pos[src][t][node] >= 0:
                    want_mask.append(local_gpu_mask(experts, node, prob.experts_per_rank, prob.gpus))
                    assert want_mask[-1] != 0
                    want_token.append(t)
            unused = prob.fwd_offsets[r][m + 1] - len(want_mask)
            want_mask += [0] * unused
            want_token += [INT32_MAX] * unused
        assert got.fwd_mask[r] == want_mask, f"rank {r}: fwd_mask"
        assert got.fwd_token[r] == want_token, f"rank {r}: fwd_token"
    return ref


def one_round(
    machine: Machine,
    prob: Problem,
    rng: random.Random,
    channels: tuple[int, int],
    policy: str,
) -> None:
    got = run_dispatch(machine, prob, channels[0], rng, policy)
    ref = check_dispatch(prob, got)
    # Each token crosses the inter-node hop once per remote node it reaches, whatever its GPUs there
    assert got.net_rows == prob.net_row_count()
    assert got.net_rows <= prob.flat_row_count()

    x_experts = expert_outputs(prob, rng.randrange(2**31))
    ys = run_combine(machine, prob, got, x_experts, channels[1], rng, policy)
    want = combine_reference(x_experts, ref, prob.num_tokens, num_ranks_per_node=prob.gpus)
    for r in range(prob.num_ranks):
        assert torch.equal(bits(ys[r]), bits(want[r])), f"rank {r}: combine"
    # The partials come back once per (token, remote node); the own node's go through the loopback
    assert machine.net_rows == prob.net_row_count()
    own = sum(counts[r // prob.gpus] for r, counts in enumerate(prob.tokens_per_node))
    assert machine.loopback_rows == own
    assert machine.all_zero()


def two_rounds(
    num_nodes: int, gpus: int, seed: int, params: Params | None = None, same_channels=True
) -> None:
    rng = random.Random(seed)
    machine = Machine(num_nodes, gpus, params or Params(net=rng.choice(["direct", "gin"])))
    for _ in range(2):  # back to back on the same counters, signals and rings
        prob = make_problem(rng, num_nodes, gpus)
        c = rng.randint(1, 4)
        channels = (c, c) if same_channels else (c, rng.randint(1, 4))
        one_round(machine, prob, rng, channels, rng.choice(POLICIES))


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


TOPOLOGIES = [(2, 2), (2, 4), (4, 2), (3, 2)]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("num_nodes", "gpus"), TOPOLOGIES)
def test_two_rounds_match_the_reference(num_nodes: int, gpus: int, seed: int) -> None:
    two_rounds(num_nodes, gpus, 1000 * num_nodes + 100 * gpus + seed)


@pytest.mark.slow
@pytest.mark.parametrize(("num_nodes", "gpus"), [*TOPOLOGIES, (6, 1), (2, 8), (5, 2)])
def test_sweep(num_nodes: int, gpus: int) -> None:
    for seed in range(20):
        two_rounds(num_nodes, gpus, 10**6 + 1000 * num_nodes + 100 * gpus + seed)


@pytest.mark.parametrize("seed", range(4))
def test_more_remote_nodes_than_net_sender_warps(seed: int) -> None:
    # 6 nodes: warp 0 sends to two remote nodes one after the other (kernel line 107)
    two_rounds(6, 1, seed)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "params",
    [
        Params(nvl_slots=4, net_slots=4, net="gin"),  # the smallest rings that work: every row wraps
        Params(nvl_slots=8, nvl_chunk=2, net_slots=8, net_chunk=2),
        Params(nvl_slots=3, nvl_chunk=1, net_slots=2, net_chunk=1, net="gin"),
    ],
    ids=["slots4", "slots8-chunk2", "chunk1"],
)
def test_small_rings(params: Params, seed: int) -> None:
    two_rounds(2, 2, seed, params)
    two_rounds(3, 2, 100 + seed, params)


@pytest.mark.parametrize("seed", range(3))
def test_combine_channels_differ_from_dispatch(seed: int) -> None:
    # The combine finds everything from the records and token ranges: its channel count is free
    two_rounds(2, 2, seed, same_channels=False)
    two_rounds(3, 2, 10 + seed, same_channels=False)


def test_empty_and_degenerate() -> None:
    rng = random.Random(5)
    machine = Machine(2, 2)
    empty = Problem(
        2,
        2,
        8,
        [torch.zeros(0, HIDDEN, dtype=torch.bfloat16)] * 4,
        [torch.zeros(0, 2, dtype=torch.int64)] * 4,
        [torch.zeros(0, 2)] * 4,
    )
    one_round(machine, empty, rng, (3, 2), "uniform")
    # every slot unused: tokens go nowhere and come back as zeros
    idle = Problem(
        2,
        2,
        8,
        [torch.ones(5, HIDDEN, dtype=torch.bfloat16)] * 4,
        [torch.full((5, 2), -1, dtype=torch.int64)] * 4,
        [torch.zeros(5, 2)] * 4,
    )
    one_round(machine, idle, rng, (4, 4), "sticky")


def test_net_hop_carries_a_token_once_per_remote_node() -> None:
    # 2 nodes x 2 GPUs, 1 expert per GPU. Every token of every rank picks both GPUs of node 1 (experts
    # 2 and 3) and expert 0: a flat all-to-all would send node 0's tokens twice to node 1.
    tokens = 9
    idx = torch.tensor([[2, 3, 0]] * tokens)
    xs = [(torch.randn(tokens, HIDDEN) * (r + 1)).to(torch.bfloat16) for r in range(4)]
    prob = Problem(2, 2, 4, xs, [idx] * 4, [torch.rand(tokens, 3) for _ in range(4)])
    machine = Machine(2, 2)
    one_round(machine, prob, random.Random(0), (2, 2), "priority")
    assert prob.net_row_count() == 2 * tokens + 2 * tokens  # node 0's ranks -> node 1, node 1's -> node 0
    assert prob.flat_row_count() == 2 * 2 * tokens + 2 * tokens
    assert prob.net_row_count() < prob.flat_row_count()


def test_scheduler_reports_a_deadlock() -> None:
    machine = Machine(2, 1)
    machine.begin("toy")

    def waits_for(mine: int, other: int):
        while machine.counter(other, 0, 0, 0) == 0:
            yield Wait(f"rank {other}'s flag", (("c", other, 0, 0, 0),))
        machine.store_counter(mine, 0, 0, 0, 1)

    with pytest.raises(Deadlock, match="every live role waits"):
        schedule(machine, {"a": waits_for(0, 1), "b": waits_for(1, 0)}, random.Random(0))


@pytest.mark.parametrize("net", ["direct", "gin"])
def test_too_small_nvlink_ring_deadlocks(net: str) -> None:
    # 2 slots with publications every 4 rows: the forwarder fills 2 slots and waits for a head that the
    # receiver can only publish after a tail the forwarder publishes at its 4th row.
    rng = random.Random(1)
    prob = make_problem(rng, 2, 2, "random")
    while max(max(c) for c in prob.tokens_per_rank) < 12:
        prob = make_problem(rng, 2, 2, "random")
    with pytest.raises(Deadlock, match="NVLink head"):
        run_dispatch(Machine(2, 2, Params(nvl_slots=2, net=net)), prob, 1, rng)


def test_too_small_net_ring_deadlocks() -> None:
    rng = random.Random(2)
    prob = make_problem(rng, 2, 2, "random")
    while prob.net_row_count() < 20:
        prob = make_problem(rng, 2, 2, "random")
    with pytest.raises(Deadlock, match="net head"):
        run_dispatch(Machine(2, 2, Params(net_slots=2)), prob, 1, rng)


def all_nodes_problem(num_nodes: int, gpus: int, tokens: int) -> Problem:
    """Every token reaches every node (expert e = its GPU's first, on every rank)."""
    num_ranks = num_nodes * gpus
    idx = torch.tensor([[n * gpus + (t % gpus) for n in range(num_nodes)] for t in range(tokens)])
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16) for _ in range(num_ranks)]
    return Problem(
        num_nodes, gpus, num_ranks, xs, [idx] * num_ranks, [torch.rand(tokens, num_nodes)] * num_ranks
    )


@pytest.mark.parametrize("seed", range(3))
def test_rotating_source_order_deadlocks(seed: int) -> None:
    # Broken combine: NVLink senders and forwarders serve the source nodes from their own node on,
    # (node + i) % N. Forwarder (0, g) fills source 0's net ring and waits for its final reducer, which
    # waits for node 1's partial of its first token; forwarder (1, g) does the same on source 1.
    rotating = Params(combine_source_order="rotating")
    prob = all_nodes_problem(2, 2, 40)
    rng = random.Random(seed)
    machine = Machine(2, 2, rotating)
    got = run_dispatch(machine, prob, 1, rng, POLICIES[seed])
    with pytest.raises(Deadlock, match="net head of node"):
        run_combine(machine, prob, got, expert_outputs(prob, seed), 1, rng, POLICIES[seed])
    # With few tokens per channel the rings never fill and the broken order goes unnoticed: the
    # deadlock above is the ring capacity, found by the scheduler, not an artefact of the model.
    small = all_nodes_problem(2, 2, 6)
    machine = Machine(2, 2, rotating)
    one_round(machine, small, rng, (1, 1), POLICIES[seed])
    # The kernel's ascending order on the first problem
    one_round(Machine(2, 2), prob, rng, (1, 1), POLICIES[seed])


def test_four_nodes() -> None:
    # its speed: bench/cpu_speed.py
    two_rounds(4, 2, 77)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("send_warps", [1, 2, 7])
def test_role_splits(send_warps: int, seed: int) -> None:
    # The role-split knob: 1 net sender warp serves every remote node one after the other; 7 leave
    # one forwarder warp (the forwarder is one actor here, whatever its warps)
    two_rounds(4, 2, 500 + seed, Params(net_send_warps=send_warps))
    two_rounds(6, 1, 600 + seed, Params(net_send_warps=send_warps, net="gin"))
