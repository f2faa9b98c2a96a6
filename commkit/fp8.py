"""The FP8 cast of the dispatch kernel (bf16 -> e4m3 + per-128 float32 scales), in pure torch.

Rule, per row and per group of 128 consecutive elements (``H % 128 == 0``), all in float32:

    amax  = max(max(|x|) over the group, 1e-4)     # the clamp keeps the scale positive and normal
    scale = amax / 448                            # IEEE division, round to nearest even
    q     = e4m3(x / scale)                       # IEEE division, then round to nearest even to
                                                  # float8_e4m3fn, saturating to +-448

``x ~= q * scale``. The kernel (``csrc/copy.cuh``: ``cast_row_to_fp8``) computes the same with
``__fdiv_rn`` and ``cvt.rn.satfinite.e4m3x2.f32``, so both agree bit for bit on finite inputs (NaN and
infinity inputs are not supported).
"""

from __future__ import annotations

import torch

FP8_GROUP_SIZE = 128
FP8_MAX = 448.0
FP8_AMAX_MIN = 1e-4


def cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] bfloat16 (H % 128 == 0) -> (float8_e4m3fn [T, H], float32 scales [T, H // 128])."""
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"x: expected a [T, H] bfloat16 tensor, got {tuple(x.shape)} {x.dtype}")
    num_tokens, hidden = x.shape
    if hidden % FP8_GROUP_SIZE != 0:
        raise ValueError(f"x: the FP8 cast needs H % {FP8_GROUP_SIZE} == 0, got H = {hidden}")
    groups = x.to(torch.float32).view(num_tokens, hidden // FP8_GROUP_SIZE, FP8_GROUP_SIZE)
    amax = groups.abs().amax(dim=2).clamp(min=FP8_AMAX_MIN)  # [T, G]
    scales = amax / torch.tensor(FP8_MAX, dtype=torch.float32)
    scaled = (groups / scales.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn).view(num_tokens, hidden), scales


def cast_from_fp8(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse (up to rounding): float8_e4m3fn [T, H], float32 [T, H // 128] -> float32 [T, H]."""
    num_tokens, hidden = x.shape
    groups = x.to(torch.float32).view(num_tokens, hidden // FP8_GROUP_SIZE, FP8_GROUP_SIZE)
    return (groups * scales.unsqueeze(2)).view(num_tokens, hidden)
