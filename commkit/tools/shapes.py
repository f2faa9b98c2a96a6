"""MoE layer shapes named after real models, for benchmarks, overlap runs and tuning.

The figures are the models' published configurations (hidden size, routed experts, top-k, expert
intermediate size); ``num_tokens`` is tokens per rank per step, a benchmark choice (DeepEP's normal
kernels are measured at 4096).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer as seen by dispatch/combine.

    hidden:            H, row width of a token
    num_experts:       E, routed experts (shared experts do not take part in dispatch)
    top_k:             K, experts per token
    moe_intermediate:  I, width of one expert's up projection (sizes the expert GEMM in ``overlap``)
    num_tokens:        T, tokens per rank
    num_expert_groups: expert groups for group-limited routing (DeepSeek-V3 node-limited routing), 1 = off
    topk_groups:       groups a token may use when ``num_expert_groups > 1``
    """

    name: str
    hidden: int
    num_experts: int
    top_k: int
    moe_intermediate: int
    num_tokens: int = 4096
    num_expert_groups: int = 1
    topk_groups: int = 1

    def with_(self, **changes: int) -> MoEShape:
        """A copy with some fields changed (``num_tokens=901``); the name records the change."""
        if not changes:
            return self
        suffix = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
        return dataclasses.replace(self, name=f"{self.name}[{suffix}]", **changes)


SHAPES: dict[str, MoEShape] = {
    shape.name: shape
    for shape in (
        # DeepSeek-V3 / R1: 256 routed experts, top-8, 8 groups of which 4 may be used (node-limited).
        MoEShape(
            "deepseek-v3",
            hidden=7168,
            num_experts=256,
            top_k=8,
            moe_intermediate=2048,
            num_expert_groups=8,
            topk_groups=4,
        ),
        # DeepSeek-V2-Lite: 64 routed experts, top-6.
        MoEShape("deepseek-v2-lite", hidden=2048, num_experts=64, top_k=6, moe_intermediate=1408),
        # Qwen3-235B-A22B: 128 experts, top-8.
        MoEShape("qwen3-235b-a22b", hidden=4096, num_experts=128, top_k=8, moe_intermediate=1536),
        # Qwen3-30B-A3B: 128 experts, top-8.
        MoEShape("qwen3-30b-a3b", hidden=2048, num_experts=128, top_k=8, moe_intermediate=768),
        # Mixtral-8x7B: 8 experts, top-2, wide experts.
        MoEShape("mixtral-8x7b", hidden=4096, num_experts=8, top_k=2, moe_intermediate=14336),
        # Mixtral-8x22B: 8 experts, top-2.
        MoEShape("mixtral-8x22b", hidden=6144, num_experts=8, top_k=2, moe_intermediate=16384),
        # NOTE: not a model: a shape small enough for CPU runs over gloo in CI (odd token count on purpose).
        MoEShape("ci-tiny", hidden=256, num_experts=8, top_k=2, moe_intermediate=128, num_tokens=61),
    )
}


def get_shape(name: str) -> MoEShape:
    """The named shape; raises ``KeyError`` listing the known names."""
    try:
        return SHAPES[name]
    except KeyError:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None
