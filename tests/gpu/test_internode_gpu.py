"""GPU: the internode kernels on virtual nodes (N nodes x G ranks on one GPU, the inter-node hop on the
nvlink-domain net) against commkit.reference (node-aware combine), bit for bit.

Routing is node-limited (commkit.routing.node_limited_topk, each token's experts on at most 2 nodes)
with some -1 slots. Outputs are poisoned before every run; a stress loop repeats cached dispatches.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import bits, compare_dispatch, expert_outputs, internode_inputs

from commkit import reference
from commkit.fp8 import cast_to_fp8

pytestmark = pytest.mark.gpu

# (gpus per node, nodes, tokens per rank, hidden, top-k, experts, dtype, num_sms)
CASES = [
    (2, 2, (64, 0, 129, 7), 2048, 4, 16, "bf16", 4),
    (4, 2, (300, 1, 77, 128, 5, 999, 64, 3), 7168, 8, 64, "bf16", 8),
    (2, 4, (256,) * 8, 4096, 8, 64, "fp8", 8),
    (2, 4, (100, 200, 0, 50, 333, 1, 2, 3), 2048, 6, 32, "cast", 4),
    (4, 2, (1024,) * 8, 7168, 8, 256, "bf16", 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[0]}-H{c[3]}-K{c[4]}-{c[6]}")
def test_virtual_nodes_bit_exact(case) -> None:
    check_case(case)


@pytest.mark.parametrize("warps", [(1, 7), (2, 6), (6, 2), (7, 1)], ids=lambda w: f"fwd{w[0]}-red{w[1]}")
def test_virtual_nodes_role_splits(warps) -> None:
    # The role-split knobs: dispatch forwarder warps, combine forwarder-reducer warps
    check_case(CASES[1], {"internode_dispatch_forwarder_warps": warps[0],
                          "internode_combine_forwarder_warps": warps[1]})  # fmt: skip
    check_case(CASES[2], {"internode_dispatch_forwarder_warps": warps[1],
                          "internode_combine_forwarder_warps": warps[0]})  # fmt: skip


def check_case(case, knobs=None) -> None:  # noqa: ANN001
    from commkit.emulate import EmulatedGroup

    gpus, nodes, tokens, hidden, num_topk, num_experts, dtype, num_sms = case
    xs, scales, idxs, ws = internode_inputs(
        gpus, nodes, tokens, hidden, num_topk, num_experts, dtype, seed=gpus + nodes
    )
    ref_xs, ref_scales = (
        (xs, scales) if dtype != "cast" else tuple(map(list, zip(*map(cast_to_fp8, xs), strict=True)))
    )
    want = reference.dispatch_reference(ref_xs, idxs, ws, num_experts, x_scales=ref_scales)
    ys = expert_outputs([w.x for w in want], seed=1)
    want_y = reference.combine_reference(ys, want, list(tokens), num_ranks_per_node=gpus)

    group = EmulatedGroup(len(tokens), num_sms=num_sms, timeout_s=30.0, num_ranks_per_node=gpus)
    group.engine.poison_outputs = True
    if knobs:
        group.engine.set_knobs(knobs)
    dev = group.device
    handles = None
    for _ in range(3):  # fresh, then cached through the handles
        outs = group.dispatch(
            [x.to(dev) for x in xs],
            [i.to(dev) for i in idxs],
            [w.to(dev) for w in ws],
            num_experts,
            x_scales=[s.to(dev) for s in scales] if scales is not None else None,
            cast_to_fp8=dtype == "cast",
            handles=handles,
        )
        torch.cuda.synchronize()
        errors = compare_dispatch(outs, want)
        assert not errors, errors[:10]
        got = group.combine([y.to(dev) for y in ys], [o.handle for o in outs])
        torch.cuda.synchronize()
        for s, (g, w) in enumerate(zip(got, want_y, strict=True)):
            assert torch.equal(bits(g.x.cpu()), bits(w)), f"combine rank {s}"
        handles = [o.handle for o in outs]

    # Each token crossed the inter-node hop once per remote node: the forwarders' records per source
    # node hold exactly the per-node counts of the layout
    st = outs[0].handle.state.shared
    fwd = st.fwd_offsets.view(len(tokens), nodes + 1).cpu()
    recorded = (st.fwd_token.cpu() != 2**31 - 1).to(torch.int64)
    for r in range(len(tokens)):
        n, g = divmod(r, gpus)
        for m in range(nodes):
            src = m * gpus + g
            lay = reference.layout_reference(idxs[src], num_experts, len(tokens), gpus)
            lo, hi = int(fwd[r, m]), int(fwd[r, m + 1])
            assert int(recorded[lo:hi].sum()) == int(lay.num_tokens_per_node[n]), (r, m)


def test_virtual_nodes_stress() -> None:
    from commkit.emulate import EmulatedGroup

    gpus, nodes, tokens, hidden, num_topk, num_experts = 4, 2, (512,) * 8, 7168, 8, 256
    xs, _, idxs, ws = internode_inputs(gpus, nodes, tokens, hidden, num_topk, num_experts, "bf16", seed=11)
    group = EmulatedGroup(8, num_sms=16, timeout_s=30.0, num_ranks_per_node=gpus)
    dev = group.device
    xs, idxs, ws = [x.to(dev) for x in xs], [i.to(dev) for i in idxs], [w.to(dev) for w in ws]
    first = group.dispatch(xs, idxs, ws, num_experts)
    ys = [o.x.clone() for o in first]
    base = [y.x.clone() for y in group.combine(ys, [o.handle for o in first])]
    for _ in range(200):
        outs = group.dispatch(xs, idxs, ws, num_experts, handles=[o.handle for o in first])
        got = group.combine(ys, [o.handle for o in outs])
    torch.cuda.synchronize()
    for o, f in zip(outs, first, strict=True):
        assert torch.equal(bits(o.x), bits(f.x))
    for g, b in zip(got, base, strict=True):
        assert torch.equal(bits(g.x), bits(b))
