"""Autograd through Buffer.dispatch / Buffer.combine (commkit.autograd) on gloo processes.

The chain is the bare MoE pattern without experts: ``out = dispatch(x, idx, w)``, each received row
scaled by the sum of its local slots' weights, ``y = combine(rows)``, ``loss = sum(y * R)``. So
``y[t] = sum_r bf16(x[t] * s_r[t])`` with ``s_r[t]`` the weights of token t's slots on rank r, and
analytically ``d loss / d w[t, k] = <R[t], x[t]>`` for a used slot (0 for an unused one) and
``d loss / d x[t] = R[t] * sum_k w[t, k]`` (used slots).

Tolerances: R is bf16-valued, so the backward's bf16 copy of ``grad_y`` is exact; the weight
gradients are float32 dot products made on the receiving rank and carried back exactly (3 x bf16
split), so they equal the analytic float32 dot product up to float32 summation order (rtol 1e-5).
The x gradient rounds each rank's row ``R * s_r`` to bf16 and the float32 sum to bf16, each a relative
error of at most u = 2**-8 (bf16 has 8 significant bits, round to nearest): per element
``|err| <= u * (sum_r |R s_r| + |R sum_k w|) <= 2u * |R| * sum_k w`` (weights >= 0), plus one more
``u * |R| * sum_k w`` on two nodes (the bf16 node partial). The test uses ``3u * |R| * sum_k w``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import commkit
from commkit.fp8 import cast_from_fp8, cast_to_fp8
from commkit.launch import spawn_gloo

U = 2.0**-8


def inputs(rank: int, tokens: int, hidden: int, topk: int, experts: int, seed: int = 0):
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    x = (torch.randn(tokens, hidden, generator=gen) * 2).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    idx[torch.rand(tokens, topk, generator=gen) < 0.2] = -1  # unused slots
    idx[0] = -1  # a token that goes nowhere
    if topk > 1:
        idx[1, 1] = idx[1, 0] = 0  # an expert named twice
    w = torch.rand(tokens, topk, generator=gen)
    r = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).float()  # bf16-valued
    return x, idx.contiguous(), w, r


def chain(buf, x, idx, w, r, experts, **kw):
    """loss = sum(combine(dispatch(x) * local weight sum) * R); returns (x.grad, w.grad, loss)."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    handle = kw.pop("handle", None)
    out = buf.dispatch(x, idx, w, experts, handle=handle, **kw)
    out.event.current_stream_wait()
    rows = commkit.autograd.received_x(out).float()
    scale = (out.topk_weights * (out.topk_idx >= 0)).sum(dim=1, keepdim=True)
    y = buf.combine((rows * scale).to(torch.bfloat16), out.handle, previous_event=out.event)
    loss = (y.x.float() * r).sum()
    loss.backward()
    return x.grad, w.grad, out


def run_chains(rank: int, world: int, per_node: int | None) -> dict:
    buf = commkit.Buffer(backend="torch", num_ranks_per_node=per_node)
    experts, hidden, topk = 4 * world, 128, 3
    x, idx, w, r = inputs(rank, 11 + 3 * rank, hidden, topk, experts)
    got = {}
    got["plain"] = chain(buf, x, idx, w, r, experts, async_finish=True)[:2]
    out = chain(buf, x, idx, w, r, experts)[2]
    got["cached"] = chain(buf, x, idx, w, r, experts, handle=out.handle)[:2]
    got["worst"] = chain(buf, x, idx, w, r, experts, num_worst_tokens=200)[:2]
    got["fp8"] = chain(buf, x, idx, w, r, experts, cast_to_fp8=True)[:2]
    got["fp8_worst"] = chain(buf, x, idx, w, r, experts, cast_to_fp8=True, num_worst_tokens=200)[:2]

    # The combine's backward alone: a leaf of expert rows gets its source token's gradient, which is
    # the cached dispatch of grad_y; padding rows of num_worst_tokens get zeros.
    for worst in (None, 200):
        out = buf.dispatch(x, idx, w, experts, num_worst_tokens=worst)
        rows = torch.randn(out.x.shape[0], hidden).to(torch.bfloat16).requires_grad_(True)
        buf.combine(rows, out.handle).x.float().mul(r).sum().backward()
        want = buf.dispatch(r.to(torch.bfloat16), idx, w, experts, handle=out.handle, num_worst_tokens=worst)
        valid = (out.topk_idx >= 0).any(dim=1)
        got[f"combine_grad_{worst}"] = (rows.grad, want.x, valid)

    # Perturbation (gradcheck-style) on the float path: loss2 = sum over local slots of the received
    # weights times S, summed over ranks in float64; a linear function of w, so central differences
    # are exact up to float64 rounding.
    def loss2(weights: torch.Tensor) -> torch.Tensor:
        out = buf.dispatch(x, idx, weights, experts)
        gen = torch.Generator().manual_seed(77 + rank)
        s = torch.randn(out.topk_weights.shape, generator=gen)
        local = (out.topk_idx >= 0).double()
        return (out.topk_weights.double() * s.double() * local).sum()

    wg = w.clone().requires_grad_(True)
    loss2(wg).backward()
    fd = []
    for t, k in ((2, 0), (3, 2), (5, 1)):
        vals = []
        for sign in (1, -1):
            wp = w.clone()
            if rank == 0:
                wp[t, k] += sign * 2.0**-5
            total = loss2(wp).reshape(1)
            dist.all_reduce(total)
            vals.append((float(total), float(wp[t, k])))
        (lp, wpk), (lm, wmk) = vals
        fd.append((t, k, (lp - lm) / (wpk - wmk) if rank == 0 else 0.0))
    got["perturb"] = (wg.grad, fd)

    # Every received slot's weight used, also where the expert lives elsewhere: by contract only the
    # hosting rank's gradient counts (a used slot gets 1, however many ranks the token reached).
    wl = w.clone().requires_grad_(True)
    buf.dispatch(x, idx, wl, experts).topk_weights.sum().backward()
    got["all_slots"] = wl.grad

    # No graph without grad: inputs that do not require it, or no_grad
    plain = buf.dispatch(x, idx, w, experts)
    y = buf.combine(plain.x, plain.handle)
    with torch.no_grad():
        under = buf.dispatch(x.clone().requires_grad_(True), idx, w, experts)
    got["no_graph"] = (plain.x.requires_grad, plain.topk_weights.requires_grad, y.x.requires_grad,
                       under.x.requires_grad)  # fmt: skip

    # Bad input: an FP8 pair that requires grad
    q, s = cast_to_fp8(x)
    try:
        buf.dispatch((q.requires_grad_(True), s), idx, w, experts)
        got["fp8_pair_error"] = ""
    except TypeError as err:
        got["fp8_pair_error"] = str(err)
    return got


def analytic(x, idx, w, r, fp8: bool):
    xv = cast_from_fp8(*cast_to_fp8(x)) if fp8 else x.float()
    used = idx >= 0
    gw = torch.where(used, (r * xv).sum(dim=1, keepdim=True), 0.0)
    wsum = (w * used).sum(dim=1, keepdim=True)
    return r * wsum, gw, 3 * U * r.abs() * wsum


def check(world: int, per_node: int | None, got: list[dict]) -> None:
    experts, hidden, topk = 4 * world, 128, 3
    for rank, g in enumerate(got):
        x, idx, w, r = inputs(rank, 11 + 3 * rank, hidden, topk, experts)
        for name in ("plain", "cached", "worst", "fp8", "fp8_worst"):
            gx, gw = g[name]
            want_x, want_w, tol = analytic(x, idx, w, r, name.startswith("fp8"))
            where = f"{name}, rank {rank}"
            assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32, where
            torch.testing.assert_close(gw, want_w, rtol=1e-5, atol=1e-5, msg=where)
            err = (gx.float() - want_x).abs()
            assert bool((err <= tol).all()), f"{where}: x grad off by {float((err - tol).max())}"
            assert torch.equal(gx[0], torch.zeros_like(gx[0])), where  # went nowhere
        for worst in (None, 200):
            grad, want, valid = g[f"combine_grad_{worst}"]
            assert torch.equal(grad[valid], want[valid]), (rank, worst)
            assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid])), (rank, worst)
        grad, fd = g["perturb"]
        if rank == 0:
            for t, k, value in fd:
                assert abs(grad[t, k].item() - value) < 1e-6 * max(1.0, abs(value)), (t, k, value)
        assert "x:" in g["fp8_pair_error"] and "cast_to_fp8" in g["fp8_pair_error"]
        assert torch.equal(g["all_slots"], (idx >= 0).float()), rank
        assert g["no_graph"] == (False, False, False, False)


@pytest.mark.parametrize(("world", "per_node"), [(2, None), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_dispatch_combine_gradients_are_analytic(world: int, per_node: int | None) -> None:
    got = spawn_gloo(run_chains, world, per_node, timeout_s=300)
    check(world, per_node, got)


@pytest.mark.slow
def test_moe_gradients_through_the_kernels_on_virtual_ranks() -> None:
    """The kernels backend (host execution of csrc/ on 2 virtual ranks) trains like the dense layer:
    forward and every gradient within the tolerances of tests/test_moe_layer.py."""
    from commkit.emulate import EmulatedGroup
    from commkit.jit.host import host_unavailable_reason
    from commkit.nn import MoE

    if host_unavailable_reason() is not None:
        pytest.skip(str(host_unavailable_reason()))
    world, kw = 2, dict(hidden=128, ffn_hidden=16, num_experts=4, num_topk=2, seed=2, shared_ffn_hidden=8)
    chunks = [inputs(r, 5 + r, 128, 2, 4, seed=3) for r in range(world)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        group = EmulatedGroup(world, num_sms=1, device="cpu")

        def rank_fn(backend) -> dict:  # noqa: ANN001
            buf = commkit.Buffer.from_backend(backend)
            moe = MoE(**kw, buffer=buf)
            x = chunks[backend.rank][0].clone().requires_grad_(True)
            y = moe(x)
            (y.float() * chunks[backend.rank][3]).sum().backward()
            grads = {k: p.grad.clone() for k, p in moe.named_parameters()}
            return dict(y=y.detach(), x_grad=x.grad, grads=grads, first=moe.first_expert, backend=buf.backend)

        got = group.spawn(rank_fn)
        dense = MoE(**kw)
        xs = [c[0].clone().requires_grad_(True) for c in chunks]
        ys = [dense(x) for x in xs]
        sum((y.float() * c[3]).sum() for y, c in zip(ys, chunks, strict=True)).backward()
    finally:
        torch.set_num_threads(threads)
    factor = 10 * U
    for r, g in enumerate(got):
        assert g["backend"] == "kernels"
        err = (g["y"].float() - ys[r].detach().float()).abs()
        assert float(err.max()) <= 4 * U * float(ys[r].detach().float().abs().max()), r
        _norm_close(g["x_grad"], xs[r].grad, factor, f"rank {r}: x.grad")
        for name in ("w_gate", "w_up", "w_down"):
            for i in range(2):
                e = g["first"] + i
                _norm_close(g["grads"][name][i], getattr(dense, name).grad[e], factor, f"expert {e} {name}")
    for name in ("router.weight", "shared.w_gate", "shared.w_up", "shared.w_down"):
        total = sum(g["grads"][name] for g in got)
        _norm_close(total, dict(dense.named_parameters())[name].grad, factor, name)


def _norm_close(got: torch.Tensor, want: torch.Tensor, factor: float, where: str) -> None:
    diff, scale = float((got.float() - want.float()).norm()), float(want.float().norm())
    assert diff <= factor * scale + 1e-9, f"{where}: |diff| {diff:.3g} > {factor:.3g} * |want| {scale:.3g}"
