"""The copy roofline: a plain grid-stride copy kernel on ``num_sms`` blocks (one per SM) moving the
same bytes as the communication, timed in the same run. Needs CUDA and CuPy."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

_COPY_SOURCE = r"""
extern "C" __global__ void commkit_copy_roofline(const int4* __restrict__ src, int4* __restrict__ dst,
                                                 unsigned long long num_vec) {
    // Grid-stride 16-byte copy: with one block per SM this is what `num_sms` SMs can move.
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < num_vec;
         i += stride)
        dst[i] = src[i];
}
"""
_THREADS = 1024
_kernel: Any = None


def roofline_unavailable_reason() -> str | None:
    """Why the copy roofline cannot be measured here (None when it can)."""
    if not torch.cuda.is_available():
        return "copy roofline needs a CUDA GPU: torch.cuda.is_available() is False"
    if importlib.util.find_spec("cupy") is None:
        return "copy roofline needs CuPy (pip install 'commkit[cu12]' or 'commkit[cu13]')"
    return None


def _get_kernel() -> Any:
    global _kernel
    if _kernel is None:
        import cupy

        _kernel = cupy.RawKernel(_COPY_SOURCE, "commkit_copy_roofline")
    return _kernel


class CopyRoofline:
    """Times the copy of ``num_bytes`` (rounded up to 16) on ``num_sms`` blocks, on the current stream."""

    def __init__(self, num_bytes: int, device: torch.device) -> None:
        reason = roofline_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        num_vec = max(1, -(-num_bytes // 16))
        self.num_vec = num_vec
        self.src = torch.empty(num_vec * 16, dtype=torch.uint8, device=device)
        self.dst = torch.empty_like(self.src)

    def __call__(self, num_sms: int) -> None:
        import cupy

        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            _get_kernel()(
                (num_sms,),
                (_THREADS,),
                (cupy.asarray(self.src), cupy.asarray(self.dst), cupy.uint64(self.num_vec)),
            )
