"""Inputs and checks shared by the GPU tests, the stress loop and the benchmark of the kernels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from commkit import reference
from commkit.fp8 import cast_to_fp8


@dataclass(frozen=True)
class KCase:
    """tokens: T per rank; skew: Zipf skew of expert popularity (``commkit.routing``: the hot experts
    are a seeded permutation, the same for every source rank); unused: fraction of -1 slots;
    empty_rank: a rank whose experts no token picks."""

    tokens: tuple[int, ...]
    hidden: int = 2048
    num_topk: int = 8
    num_experts: int = 64
    dtype: str = "bf16"  # "bf16", "fp8" (FP8 input), "cast" (bf16 input cast in the kernel)
    skew: float = 0.0
    unused: float = 0.0
    empty_rank: int | None = None
    expert_alignment: int = 1
    num_sms: int = 4
    seed: int = 0

    @property
    def num_ranks(self) -> int:
        return len(self.tokens)


def make_inputs(case: KCase) -> tuple[list, list | None, list, list]:
    """CPU lists over ranks: xs, x_scales (FP8 input only), topk_idxs, topk_weights.

    The routing is ``commkit.routing.synthetic_topk`` over the allowed experts (all, or all but those
    of ``empty_rank``), with ``skew``; then a fraction ``unused`` of the slots becomes -1 (and every
    slot beyond the number of allowed experts)."""
    from commkit.routing import synthetic_topk

    xs, scales, idxs, weights = [], [], [], []
    num_ranks, num_experts = case.num_ranks, case.num_experts
    per_rank = num_experts // num_ranks
    allowed = torch.arange(num_experts)
    if case.empty_rank is not None:
        allowed = allowed[(allowed // per_rank) != case.empty_rank]
    k = min(case.num_topk, len(allowed))
    for r, num_tokens in enumerate(case.tokens):
        gen = torch.Generator().manual_seed(case.seed * 1009 + r)
        x = (torch.randn(num_tokens, case.hidden, generator=gen) * 3).to(torch.bfloat16)
        if num_tokens:
            picks, _ = synthetic_topk(
                num_tokens, len(allowed), k, skew=case.skew, seed=case.seed * 1009 + r,
                popularity_seed=case.seed,
            )  # fmt: skip
            idx = allowed[picks]
        else:
            idx = torch.empty(0, k, dtype=torch.int64)
        if k < case.num_topk:
            idx = torch.cat([idx, torch.full((num_tokens, case.num_topk - k), -1)], dim=1)
        if case.unused:
            idx = torch.where(torch.rand(num_tokens, case.num_topk, generator=gen) < case.unused, -1, idx)
        w = torch.rand(num_tokens, case.num_topk, generator=gen, dtype=torch.float32)
        if case.dtype == "fp8":
            q, s = cast_to_fp8(x)
            xs.append(q)
            scales.append(s)
        else:
            xs.append(x)
        idxs.append(idx.contiguous())
        weights.append(w)
    return xs, (scales if case.dtype == "fp8" else None), idxs, weights


def to_device(tensors: list | None, device: torch.device) -> list | None:
    return None if tensors is None else [t.to(device) for t in tensors]


def bits(t: torch.Tensor) -> torch.Tensor:
    return {
        torch.bfloat16: lambda: t.view(torch.int16),
        torch.float32: lambda: t.view(torch.int32),
        torch.float8_e4m3fn: lambda: t.view(torch.uint8),
    }.get(t.dtype, lambda: t)()


def expected_dispatch(case: KCase, xs, scales, idxs, weights) -> list:
    if case.dtype == "cast":
        pairs = [cast_to_fp8(x) for x in xs]
        xs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    return reference.dispatch_reference(
        xs, idxs, weights, case.num_experts, x_scales=scales, expert_alignment=case.expert_alignment
    )


def expert_outputs(recv_xs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Stand-in expert outputs: bf16 rows depending on the receiving rank (CPU)."""
    outs = []
    for r, x in enumerate(recv_xs):
        gen = torch.Generator().manual_seed(seed * 7 + r)
        outs.append((torch.randn(x.shape[0], x.shape[1], generator=gen) * (r + 1)).to(torch.bfloat16))
    return outs


def compare_dispatch(got: list, want: list, num_rows: list[int] | None = None) -> list[str]:
    """Differences between kernel outputs and the reference, as readable strings (empty when equal)."""
    errors = []
    for r, (g, w) in enumerate(zip(got, want, strict=True)):
        n = w.x.shape[0]
        rows = slice(0, n)
        if num_rows is None and g.x.shape[0] != n:
            errors.append(f"rank {r}: {g.x.shape[0]} rows, expected {n}")
            continue
        fields = [
            ("x", g.x, w.x),
            ("topk_idx", g.topk_idx, w.topk_idx),
            ("topk_weights", g.topk_weights, w.topk_weights),
        ]
        if w.x_scales is not None:
            fields.append(("x_scales", g.x_scales, w.x_scales))
        for name, a, b in fields:
            a = bits(a[rows].cpu())
            b = bits(b)
            if a.shape != b.shape or not torch.equal(a, b):
                bad = (a != b).nonzero()[:3].tolist() if a.shape == b.shape else "shape"
                errors.append(f"rank {r}: {name} differs at {bad}")
        if num_rows is None and g.num_tokens_per_expert != w.num_tokens_per_expert:
            errors.append(
                f"rank {r}: num_tokens_per_expert {g.num_tokens_per_expert} != {w.num_tokens_per_expert}"
            )
    return errors


def content_hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(bits(t.contiguous()).cpu().numpy().tobytes())
    return digest.hexdigest()


def internode_inputs(gpus, nodes, tokens, hidden, num_topk, num_experts, dtype, seed):  # noqa: ANN001, ANN201
    """Inputs of virtual nodes (CPU lists over ranks: xs, x_scales (FP8 input only), topk_idxs,
    topk_weights): node-limited routing (``commkit.routing.node_limited_topk``, each token's experts on
    at most 2 nodes) with a tenth of the slots -1."""
    from commkit import routing

    gen = torch.Generator().manual_seed(seed)
    xs, scales, idxs, ws = [], [], [], []
    for t in tokens:
        xs.append((torch.randn(t, hidden, generator=gen) * 4).to(torch.bfloat16))
        idx, w = routing.node_limited_topk(
            torch.rand(t, num_experts, generator=gen), num_topk, num_groups=nodes, max_groups=2
        )
        idxs.append(torch.where(torch.rand(idx.shape, generator=gen) < 0.1, -1, idx).contiguous())
        ws.append(w.contiguous())
    if dtype == "fp8":
        pairs = [cast_to_fp8(x) for x in xs]
        xs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    return xs, (scales if dtype == "fp8" else None), idxs, ws
