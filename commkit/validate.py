"""Argument checks run by ``Buffer`` before any communication.

Every error names the argument, what was expected and what came.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from commkit.types import EventHandle, Handle

FP8_DTYPE = torch.float8_e4m3fn
FP8_BLOCK = 128  # elements of a row that share one float32 scale


def _fail(arg: str, expected: str, got: Any, cls: type[Exception] = ValueError) -> None:
    raise cls(f"{arg}: expected {expected}, got {got}")


def check_int(arg: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(arg, "an int", f"{value!r} ({type(value).__name__})", TypeError)
    if value < minimum:
        _fail(arg, f"an int >= {minimum}", value)
    return int(value)


def check_tensor(arg: str, t: Any, *, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(arg, "a torch.Tensor", type(t).__name__, TypeError)
    if t.dtype != dtype:
        _fail(arg, f"dtype {dtype}", t.dtype, TypeError)
    if t.dim() != ndim:
        _fail(arg, f"{ndim} dimensions", f"shape {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(arg, "a contiguous tensor", f"strides {t.stride()} for shape {tuple(t.shape)}")
    return t


def split_x(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [T, H] bf16, or (float8_e4m3fn [T, H], float32 scales [T, ceil(H/128)]) -> (x, scales)."""
    if isinstance(x, tuple | list):
        if len(x) != 2:
            _fail("x", "a bf16 tensor or an (fp8 tensor, scales) pair", f"a sequence of {len(x)}")
        data = check_tensor("x[0]", x[0], dtype=FP8_DTYPE, ndim=2)
        scales = check_tensor("x[1] (scales)", x[1], dtype=torch.float32, ndim=2)
        want = (data.shape[0], math.ceil(data.shape[1] / FP8_BLOCK))
        if tuple(scales.shape) != want:
            _fail("x[1] (scales)", f"shape {want} = [T, ceil(H/{FP8_BLOCK})]", tuple(scales.shape))
        if scales.device != data.device:
            _fail("x[1] (scales)", f"device {data.device}", scales.device)
    else:
        if isinstance(x, torch.Tensor) and x.dtype == FP8_DTYPE:
            _fail(
                "x", "an (fp8 tensor, scales) pair for FP8 input", "an fp8 tensor without scales", TypeError
            )
        data = check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
        scales = None
    row_bytes = data.shape[1] * data.element_size()
    if row_bytes % 16 != 0 or row_bytes == 0:
        _fail(
            "x",
            "a hidden size whose row is a non-zero multiple of 16 bytes",
            f"H={data.shape[1]} ({row_bytes} bytes)",
        )
    return data, scales


def check_num_experts(num_experts: Any, num_ranks: int) -> int:
    num_experts = check_int("num_experts", num_experts, 1)
    if num_experts % num_ranks != 0:
        _fail("num_experts", f"a multiple of the number of ranks ({num_ranks})", num_experts)
    return num_experts


def check_topk_idx(
    topk_idx: Any, num_tokens: int | None, num_experts: int, check_values: bool
) -> torch.Tensor:
    """topk_idx: [T, K] int64 with values in [-1, E). ``check_values`` reads them (a host sync on GPU)."""
    topk_idx = check_tensor("topk_idx", topk_idx, dtype=torch.int64, ndim=2)
    if topk_idx.shape[1] < 1:
        _fail("topk_idx", "at least one top-k slot (shape [T, K] with K >= 1)", tuple(topk_idx.shape))
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        _fail("topk_idx", f"{num_tokens} rows, one per token of x", topk_idx.shape[0])
    if check_values and topk_idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(topk_idx))
        if lo < -1 or hi >= num_experts:
            bad = topk_idx[(topk_idx < -1) | (topk_idx >= num_experts)][0].item()
            _fail(
                "topk_idx", f"values in [-1, {num_experts}) (-1: slot unused)", f"{bad} (range [{lo}, {hi}])"
            )
    return topk_idx


def check_topk_weights(topk_weights: Any, topk_idx: torch.Tensor) -> torch.Tensor:
    topk_weights = check_tensor("topk_weights", topk_weights, dtype=torch.float32, ndim=2)
    if topk_weights.shape != topk_idx.shape:
        _fail("topk_weights", f"shape {tuple(topk_idx.shape)} (that of topk_idx)", tuple(topk_weights.shape))
    return topk_weights


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            _fail(name, f"the device of {first_name} ({first})", device)
    return first


def check_handle(
    handle: Any,
    *,
    buffer_id: int,
    backend: str,
    num_tokens: int | None = None,
    num_experts: int | None = None,
    topk_idx: torch.Tensor | None = None,
    check_values: bool = True,
) -> Handle:
    """A handle must come from this buffer's backend; for a cached dispatch, from the same routing."""
    if not isinstance(handle, Handle):
        _fail("handle", "a commkit Handle from Buffer.dispatch", type(handle).__name__, TypeError)
    if handle.buffer_id != buffer_id:
        _fail("handle", "a handle made by this Buffer", "a handle made by another Buffer")
    if handle.backend != backend:
        _fail("handle", f"a handle of the '{backend}' backend", f"one of '{handle.backend}'")
    if num_tokens is not None and handle.num_tokens != num_tokens:
        _fail("handle", f"a handle for {num_tokens} tokens", f"one for {handle.num_tokens} (another routing)")
    if num_experts is not None and handle.num_experts != num_experts:
        _fail(
            "handle", f"a handle for {num_experts} experts", f"one for {handle.num_experts} (another routing)"
        )
    if topk_idx is not None:
        if topk_idx.shape != handle.topk_idx.shape:
            _fail("handle", "a handle made for the same topk_idx", "one made for another routing")
        # The same tensor, not written since (its version counter), is the same routing; a tensor
        # rewritten in place (a static buffer) is compared with the handle's copy whatever check_values.
        unchanged = (
            topk_idx.data_ptr() == handle.topk_idx_ptr and topk_idx._version == handle.topk_idx_version
        )
        if (check_values or not unchanged) and not torch.equal(topk_idx, handle.topk_idx):
            _fail("handle", "a handle made for the same topk_idx", "one made for another routing")
    return handle


def check_combine_x(x: Any, handle: Handle) -> torch.Tensor:
    x = check_tensor("x", x, dtype=torch.bfloat16, ndim=2)
    if x.shape[0] != handle.num_recv_tokens:
        _fail("x", f"{handle.num_recv_tokens} rows (those received by the dispatch)", x.shape[0])
    if x.shape[1] % 8 != 0 or x.shape[1] == 0:
        _fail("x", "a hidden size whose bf16 row is a non-zero multiple of 16 bytes", f"H={x.shape[1]}")
    return x


def check_event(arg: str, event: Any) -> None:
    if event is not None and not isinstance(event, EventHandle):
        _fail(arg, "a commkit EventHandle (an earlier out.event) or None", type(event).__name__, TypeError)


def check_device_type(arg: str, device: torch.device, expected: str) -> None:
    """The backend's process group moves tensors of one device type (gloo: cpu, nccl: cuda)."""
    if device.type != expected:
        _fail(arg, f"a {expected} tensor for this process group", f"a tensor on {device}")


def check_fp8_cast(x: torch.Tensor, scales: torch.Tensor | None) -> None:
    """cast_to_fp8 takes bf16 rows of whole 128-element groups."""
    if scales is not None:
        _fail("cast_to_fp8", "bf16 x (the dispatch casts it)", "x that is already an FP8 pair")
    if x.shape[1] % FP8_BLOCK:
        _fail("x", f"a hidden size that is a multiple of {FP8_BLOCK} with cast_to_fp8", f"H={x.shape[1]}")
