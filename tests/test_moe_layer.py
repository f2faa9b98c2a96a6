"""``commkit.nn.MoE`` over gloo processes (the ``torch`` backend) against the dense layer in one process.

Each rank routes its own tokens; the dense layer (``MoE(buffer=None)``, same seed, all experts, a
loop over experts in float32) runs every rank's tokens chunk by chunk in one process, single-threaded
like the ranks, so the router's float32 logits and hence the selections are the same bits (checked).

Forward tolerance (per element, derived from bf16 rounding; u = 2**-8, the unit roundoff of bf16's 8
significant bits): both layers compute the experts in float32 on the same bf16 tokens; the
expert-parallel one then rounds each rank's weighted row to bf16 (``|d| <= u * |row_r|``), over two
nodes each node's partial (``<= u * |partial_n|``), and the combine's float32 sum (``<= u * |y|``);
both round the output to bf16 (``<= u * |y|`` each). With S = sum_k |w_k * expert_k(x)| >= sum_r
|row_r| (and >= sum_n |partial_n|), ``|y_ep - y_dense| <= u * (2 S + 3 |y|)`` up to float32 terms,
for which 1e-5 * (S + |y|) is added.

Gradient tolerance (norm-wise, per tensor: the input, the router, every expert's three weights, the
shared expert): the backward adds the bf16 rounding of grad_y (cached dispatch), of each rank's row
gradient and of their sum (combine), a node partial over two nodes, and both layers round the input
gradient to bf16. Each rounding perturbs the vector it rounds by at most u relative; through the same
linear backward maps, to first order and without catastrophic cancellation (random data), each adds
at most u * ||G|| to ||G_ep - G_dense||. Counting the forward roundings that reach the loss's
gradient too: ``||G_ep - G_dense|| <= 10 u ||G_dense||`` (12 u over two nodes). A broken backward
(a missing or wrong term) is off by O(||G||).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commkit
from commkit.fp8 import cast_from_fp8, cast_to_fp8
from commkit.launch import spawn_gloo
from commkit.nn import MoE, swiglu

U = 2.0**-8


def layer_kwargs(world: int, variant: str) -> dict:
    kw: dict = dict(hidden=128, ffn_hidden=32, num_experts=2 * world, num_topk=3, seed=3)
    if variant == "sigmoid-shared":
        kw.update(gating="sigmoid", shared_ffn_hidden=16, route_scale=2.5)
    if variant == "fp8-worst":
        kw.update(fp8_dispatch=True, num_worst_tokens=64 * world, num_topk=2)
    if variant == "node-limited":
        kw.update(gating="sigmoid", num_groups=2, max_groups=1, num_topk=2)  # groups: the 2 nodes
    return kw


def tokens(rank: int, n: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(n + rank, 128, generator=gen).to(torch.bfloat16)
    target = torch.randn(n + rank, 128, generator=gen)
    return x, target


def ep_rank(rank: int, world: int, per_node: int | None, variant: str, steps: int) -> dict:
    buf = commkit.Buffer(backend="torch", num_ranks_per_node=per_node)
    moe = MoE(**layer_kwargs(world, variant), buffer=buf)
    x, target = tokens(rank)
    x = x.requires_grad_(True)
    y = moe(x)
    loss = (y.float() - target).square().mean()
    loss.backward()
    got = dict(
        y=y.detach(),
        x_grad=x.grad,
        topk_idx=moe.route(x.detach())[0],
        grads={k: p.grad.clone() for k, p in moe.named_parameters()},
        experts=(moe.first_expert, moe.num_local),
    )
    # A few optimizer steps: the replicated parameters' gradients summed over ranks (data parallel)
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (moe(x.detach()).float() - target).square().mean()
        loss.backward()
        for p in moe.replicated_parameters():
            dist.all_reduce(p.grad)
        total = loss.detach().reshape(1)
        dist.all_reduce(total)
        curve.append(float(total))
        opt.step()
    got["curve"] = curve
    return got


def dense_run(world: int, variant: str, steps: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float32 logits, the same selections
    try:
        moe = MoE(**layer_kwargs(world, variant))
        chunks = [tokens(r) for r in range(world)]
        xs = [x.clone().requires_grad_(True) for x, _ in chunks]
        ys = [moe(x) for x in xs]
        sum((y.float() - t).square().mean() for y, (_, t) in zip(ys, chunks, strict=True)).backward()
        got = dict(
            ys=[y.detach() for y in ys],
            x_grads=[x.grad for x in xs],
            topk_idx=[moe.route(x)[0] for x, _ in chunks],
            grads={k: p.grad.clone() for k, p in moe.named_parameters()},
            bounds=[forward_bound(moe, x) for x, _ in chunks],
        )
        opt = torch.optim.SGD(moe.parameters(), lr=0.5)
        curve = []
        for _ in range(steps):
            opt.zero_grad()
            loss = sum((moe(x).float() - t).square().mean() for x, t in chunks)
            loss.backward()
            curve.append(float(loss.detach()))
            opt.step()
        got["curve"] = curve
        return got
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def forward_bound(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """u * (2 S + 3 |y|) + 1e-5 * (S + |y|), S = sum_k |w_k expert_k(x)| (module docstring)."""
    idx, w = moe.route(x)
    v = cast_from_fp8(*cast_to_fp8(x)) if moe.fp8_dispatch else x.float()
    s = torch.zeros(x.shape[0], moe.hidden)
    for e in range(moe.num_experts):
        rows, slots = (idx == e).nonzero(as_tuple=True)
        if rows.numel():
            out = swiglu(v[rows], moe.w_gate[e], moe.w_up[e], moe.w_down[e])
            s.index_add_(0, rows, (w[rows, slots, None] * out).abs())
    y = moe(x).float().abs()
    return U * (2 * s + 3 * y) + 1e-5 * (s + y)


def check_against_dense(world: int, per_node: int | None, variant: str, steps: int = 0) -> None:
    got = spawn_gloo(ep_rank, world, per_node, variant, steps, timeout_s=600)
    want = dense_run(world, variant, steps)
    factor = (12 if per_node is not None else 10) * U
    for r, g in enumerate(got):
        where = f"{variant}, rank {r}"
        assert torch.equal(g["topk_idx"], want["topk_idx"][r]), f"{where}: the selections differ"
        err = (g["y"].float() - want["ys"][r].float()).abs()
        bound = want["bounds"][r]
        assert bool((err <= bound).all()), (
            f"{where}: forward off by {float((err - bound).max())} over the bound"
        )
        assert_norm_close(g["x_grad"], want["x_grads"][r], factor, f"{where}: x.grad")
    # Router and shared expert: each rank's gradient covers its own tokens; they sum to the dense one.
    for name, dense_grad in want["grads"].items():
        if name.startswith(("router", "shared")):
            total = sum(g["grads"][name] for g in got)
            assert_norm_close(total, dense_grad, factor, f"{variant}: {name}.grad")
    # Every expert's weights: complete on the rank that holds it.
    for g in got:
        first, num_local = g["experts"]
        for name in ("w_gate", "w_up", "w_down"):
            for i in range(num_local):
                e = first + i
                assert_norm_close(
                    g["grads"][name][i], want["grads"][name][e], factor, f"{variant}: expert {e} {name}.grad"
                )
    if steps:
        ep_curve, dense_curve = got[0]["curve"], want["curve"]
        assert dense_curve[-1] < dense_curve[0] and ep_curve[-1] < ep_curve[0], (ep_curve, dense_curve)
        for a, b in zip(ep_curve, dense_curve, strict=True):
            assert abs(a - b) <= factor * abs(b), (ep_curve, dense_curve)


def assert_norm_close(got: torch.Tensor, want: torch.Tensor, factor: float, where: str) -> None:
    diff = float((got.float() - want.float()).norm())
    scale = float(want.float().norm())
    assert diff <= factor * scale + 1e-9, f"{where}: |diff| {diff:.3g} > {factor:.3g} * |want| {scale:.3g}"


def test_moe_matches_dense_on_two_ranks_and_trains_like_it() -> None:
    check_against_dense(2, None, "softmax", steps=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "per_node", "variant"),
    [
        (2, None, "sigmoid-shared"),
        (2, None, "fp8-worst"),
        (4, None, "softmax"),
        (4, 2, "sigmoid-shared"),
        (4, 2, "node-limited"),
        (8, None, "sigmoid-shared"),
    ],
)
def test_moe_matches_dense(world: int, per_node: int | None, variant: str) -> None:
    check_against_dense(world, per_node, variant, steps=3 if world == 4 else 0)


# -- auxiliary-loss-free balancing ---------------------------------------------------------------


def skewed_tokens(rank: int, moe: MoE, n: int = 64) -> torch.Tensor:
    """Tokens leaning towards the router rows of experts 0 and 1: a skewed load."""
    gen = torch.Generator().manual_seed(100 + rank)
    lean = moe.router.weight[:2].sum(dim=0).detach()
    return (torch.randn(n, moe.hidden, generator=gen) + 3 * lean / lean.norm() * moe.hidden**0.5 / 4).to(
        torch.bfloat16
    )


def balance_rank(rank: int, world: int, steps: int) -> list[float]:
    buf = commkit.Buffer(backend="torch")
    moe = MoE(128, 16, 4 * world, 2, buffer=buf, gating="sigmoid", bias_update_rate=0.02, seed=1)
    x = skewed_tokens(rank, moe)
    ratios = []
    for _ in range(steps):
        with torch.no_grad():
            moe(x)
        load = moe.update_bias()
        ratios.append(float(load.max() / load.mean()))
    return ratios


def test_bias_balancing_lowers_max_over_mean_load() -> None:
    steps = 30
    got = spawn_gloo(balance_rank, 2, steps, timeout_s=300)
    assert got[0] == got[1]  # the same global load on every rank
    ratios = got[0]
    assert ratios[0] > 2.0, ratios  # the data is skewed
    assert sum(ratios[-5:]) / 5 < 0.6 * ratios[0], ratios
    # The dense layer balances the same way (no group to sum over)
    dense = MoE(128, 16, 8, 2, gating="sigmoid", bias_update_rate=0.02, seed=1)
    x = torch.cat([skewed_tokens(r, dense) for r in range(2)])
    first = last = None
    for _ in range(steps):
        with torch.no_grad():
            dense(x)
        load = dense.update_bias()
        first = first or float(load.max() / load.mean())
        last = float(load.max() / load.mean())
    assert last < 0.6 * first


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(gating="relu"), "gating: expected 'softmax' or 'sigmoid', got 'relu'"),
        (dict(hidden=100), "hidden: expected a multiple of 8"),
        (dict(fp8_dispatch=True), "hidden: expected a multiple of 128 with fp8_dispatch, got 64"),
        (dict(num_topk=9), "num_topk: expected at most num_experts=8, got 9"),
        (dict(num_groups=3), "num_groups: expected a divisor of num_experts=8, got 3"),
        (dict(bias_update_rate=-1), "bias_update_rate: expected a number >= 0, got -1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    args = dict(hidden=64, ffn_hidden=16, num_experts=8, num_topk=2) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoE(**args)


def test_bad_input_and_state_dict() -> None:
    moe = MoE(64, 16, 8, 2, shared_ffn_hidden=8)
    with pytest.raises(ValueError, match=r"x: expected a last dimension of hidden=64, got shape \(3, 32\)"):
        moe(torch.zeros(3, 32))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        moe(torch.zeros(3, 64, dtype=torch.int64))
    sd = moe.state_dict()
    assert {f"experts.{e}.w_gate" for e in range(8)} <= set(sd) and "w_gate" not in sd
    assert sd["experts.5.w_down"].shape == (16, 64)
    other = MoE(64, 16, 8, 2, shared_ffn_hidden=8, seed=9)
    other.load_state_dict(sd)
    assert torch.equal(other.w_up, moe.w_up)
    del sd["experts.3.w_up"]
    with pytest.raises(RuntimeError, match="experts.3.w_up"):
        other.load_state_dict(sd)


def sharded_state(rank: int, world: int) -> tuple[list[str], bool]:
    buf = commkit.Buffer(backend="torch")
    moe = MoE(64, 16, 8, 2, buffer=buf, seed=4)
    dense = MoE(64, 16, 8, 2, seed=4)
    fresh = MoE(64, 16, 8, 2, buffer=buf, seed=5)
    fresh.load_state_dict(dense.state_dict())  # a rank loads its own experts from a dense one
    return sorted(k for k in moe.state_dict() if k.startswith("experts.")), torch.equal(
        fresh.w_gate, moe.w_gate
    )


def test_state_dict_names_global_experts() -> None:
    got = spawn_gloo(sharded_state, 2, timeout_s=120)
    for rank, (keys, loaded) in enumerate(got):
        assert keys == sorted(
            f"experts.{e}.{n}" for e in range(4 * rank, 4 * rank + 4) for n in ("w_down", "w_gate", "w_up")
        )
        assert loaded
