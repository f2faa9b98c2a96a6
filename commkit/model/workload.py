"""What is moved: tokens, hidden size, top-k, experts, dtypes and the SM budget with its role split.

Row bytes (the unit of every byte count in the model):
- FP8 dispatch row: H bytes of e4m3 values + ceil(H/128) float32 scales = H + 4*ceil(H/128) bytes;
- BF16 row (dispatch or combine): 2*H bytes.
Top-k indices and weights (K * 12 bytes per row) travel too but are left out, as DeepEP's "logical"
bandwidth leaves them out; they are under 0.2% of an FP8 row of hidden 7168.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DTYPES = ("fp8", "bf16")

# Roles of the SMs per kernel family and phase, with the default share of the SM budget.
# A key "a+b" is a group of roles whose warps share the same SMs: the group's time is the sum of its
# roles' work.
# NOTE: the defaults follow DeepEP's normal kernels: intranode, channels of 2 SMs, one sending and one
# receiving; internode, half the SMs forward (IB -> NVLink in dispatch, NVLink -> IB in combine) and the
# other half run the IB-side and the NVLink-side warps of the channel together.
DEFAULT_ROLE_SPLIT: dict[str, dict[str, float]] = {
    "intranode.dispatch": {"sender": 0.5, "receiver": 0.5},
    "intranode.combine": {"sender": 0.5, "reducer": 0.5},
    "internode.dispatch": {"forwarder": 0.5, "rdma_sender+nvl_receiver": 0.5},
    "internode.combine": {"forwarder": 0.5, "nvl_sender+rdma_receiver": 0.5},
}


def row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one token row: ``hidden + 4 * ceil(hidden / 128)`` for fp8, ``2 * hidden`` for bf16."""
    if dtype == "fp8":
        return hidden + 4 * math.ceil(hidden / 128)
    if dtype == "bf16":
        return 2 * hidden
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


@dataclass(frozen=True)
class Workload:
    """One MoE layer's communication on every rank.

    num_tokens:     T tokens per rank
    hidden:         H
    num_topk:       K experts per token
    num_experts:    E experts in the EP group
    num_sms:        SMs given to the communication kernel on each GPU
    dispatch_dtype: 'fp8' or 'bf16'; combine is always bf16 (as in DeepEP and DeepSeek-V3)
    role_split:     {"<family>.<phase>": {role or "role+role": share of num_sms}}; every role of the
                    phase appears once; missing keys use DEFAULT_ROLE_SPLIT
    """

    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    num_sms: int = 20
    dispatch_dtype: str = "fp8"
    role_split: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "hidden", "num_topk", "num_experts", "num_sms"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be a positive int, got {value!r}")
        if self.num_topk > self.num_experts:
            raise ValueError(f"num_topk={self.num_topk} exceeds num_experts={self.num_experts}")
        if self.dispatch_dtype not in DTYPES:
            raise ValueError(f"dispatch_dtype must be one of {DTYPES}, got {self.dispatch_dtype!r}")
        for key, split in self.role_split.items():
            if key not in DEFAULT_ROLE_SPLIT:
                raise ValueError(f"role_split key must be one of {sorted(DEFAULT_ROLE_SPLIT)}, got {key!r}")
            expected = sorted(role for group in DEFAULT_ROLE_SPLIT[key] for role in group.split("+"))
            given = sorted(role for group in split for role in group.split("+"))
            if given != expected:
                raise ValueError(
                    f"role_split[{key!r}] must place each of the roles {expected} once, got {sorted(split)}"
                )
            if any(share <= 0 for share in split.values()) or abs(sum(split.values()) - 1) > 1e-6:
                raise ValueError(f"role_split[{key!r}] shares must be > 0 and sum to 1, got {split}")

    def row_bytes(self, phase: str) -> int:
        """Bytes of one row in ``phase`` ('dispatch' or 'combine')."""
        return row_bytes(self.hidden, self.dispatch_dtype if phase == "dispatch" else "bf16")

    def roles(self, key: str) -> dict[str, float]:
        """Share of the SM budget per role for ``key`` = '<intranode|internode>.<dispatch|combine>'."""
        return self.role_split.get(key, DEFAULT_ROLE_SPLIT[key])
