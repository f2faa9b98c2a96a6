"""The copy roofline: a plain copy kernel on ``num_sms`` blocks (one per SM) moving the same bytes as
the communication, timed in the same run. Needs CUDA and CuPy.

The kernel is grid-stride over 16-byte vectors, unrolled x4 with all four loads issued before the
stores (so every thread has four loads in flight), with blocks of ``THREADS`` (512, the kernels' block
size) threads. ``tests/gpu/bench_kernels.py`` uses this one as well.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

THREADS = 512
_COPY_SOURCE = r"""
extern "C" __global__ void __launch_bounds__(512)
commkit_copy_roofline(const int4* __restrict__ src, int4* __restrict__ dst, unsigned long long num_vec) {
    // Grid-stride 16-byte copy, unrolled x4: the four loads are issued before the four stores.
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < num_vec; i += 4 * stride) {
        const int4 a = __ldg(src + i);
        const int4 b = __ldg(src + i + stride);
        const int4 c = __ldg(src + i + 2 * stride);
        const int4 d = __ldg(src + i + 3 * stride);
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < num_vec; i += stride)
        dst[i] = __ldg(src + i);
}
"""
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
    """Copies ``num_bytes`` (rounded up to 16) on ``num_sms`` blocks, on the current torch stream.

    The buffers and their CuPy views are made here, once; a call only launches (the caller times it).
    """

    def __init__(self, num_bytes: int, device: torch.device | str | int | None = None) -> None:
        reason = roofline_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        import cupy

        if device is None:
            device = torch.cuda.current_device()
        self.device: torch.device = (
            torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        )
        self.num_vec = max(1, -(-num_bytes // 16))
        self.num_bytes = self.num_vec * 16
        self.src = torch.zeros(self.num_bytes, dtype=torch.uint8, device=self.device)
        self.dst = torch.empty_like(self.src)
        self._args = (cupy.asarray(self.src), cupy.asarray(self.dst), cupy.uint64(self.num_vec))
        self._kernel = _get_kernel()

    def __call__(self, num_sms: int) -> None:
        import cupy

        from commkit.backends.launcher import _cupy_stream

        index: int = self.device.index if self.device.index is not None else torch.cuda.current_device()
        # NOTE: the same torch -> CuPy stream view as the kernels' launches (Stream.from_external on
        # the CUDA stream protocol with CuPy >= 14, ExternalStream before).
        stream = _cupy_stream(torch.cuda.current_stream(self.device), index)
        with cupy.cuda.Device(index), stream:
            self._kernel((num_sms,), (THREADS,), self._args)
