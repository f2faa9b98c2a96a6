"""CPU: commkit.fp8.cast_to_fp8 (the torch rule) equals the kernel's arithmetic bit for bit.

The kernel's cast (csrc/copy.cuh) is max/fabs, __fdiv_rn and cvt.rn.satfinite.e4m3x2.f32. Here the
same steps run on the host, compiled by nvcc, with CUDA's host implementation of the e4m3
conversion (``__nv_cvt_float2_to_fp8x2`` with ``__NV_SATFINITE``, documented as round to nearest
even), and are compared with the torch function on random and edge-case rows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
from _nvcc import requires_nvcc

from commkit.fp8 import FP8_AMAX_MIN, cast_from_fp8, cast_to_fp8
from commkit.jit.compiler import nvcc_path

HOST_CAST = r"""
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <cuda_fp8.h>
int main(int argc, char** argv) {
    FILE* in = fopen(argv[1], "rb");
    int rows, hidden;
    fread(&rows, 4, 1, in); fread(&hidden, 4, 1, in);
    std::vector<uint16_t> x(size_t(rows) * hidden);
    fread(x.data(), 2, x.size(), in); fclose(in);
    std::vector<uint8_t> q(x.size());
    std::vector<float> scales(size_t(rows) * hidden / 128);
    for (size_t g = 0; g < scales.size(); ++g) {
        float v[128], amax = 0.0f;
        for (int i = 0; i < 128; ++i) {
            uint32_t bits = uint32_t(x[g * 128 + i]) << 16;
            memcpy(&v[i], &bits, 4);
            amax = fmaxf(amax, fabsf(v[i]));
        }
        const float scale = fmaxf(amax, 1e-4f) / 448.0f;
        scales[g] = scale;
        for (int i = 0; i < 128; i += 2) {
            __nv_fp8x2_storage_t pair = __nv_cvt_float2_to_fp8x2(
                make_float2(v[i] / scale, v[i + 1] / scale), __NV_SATFINITE, __NV_E4M3);
            q[g * 128 + i] = pair & 0xff;
            q[g * 128 + i + 1] = pair >> 8;
        }
    }
    FILE* out = fopen(argv[2], "wb");
    fwrite(q.data(), 1, q.size(), out); fwrite(scales.data(), 4, scales.size(), out); fclose(out);
}
"""


def _rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(64, 1024, generator=gen) * s for s in (1e-6, 1e-3, 1.0, 1e3)]
    edge = torch.zeros(4, 1024)
    edge[1, 5] = 1e-30  # amax below the clamp
    edge[2] = torch.linspace(-448.0, 448.0, 1024)
    edge[3, ::2] = -3.0e38  # very large values
    return torch.cat([*rows, edge]).to(torch.bfloat16)


@requires_nvcc
def test_torch_rule_matches_cuda_conversion(tmp_path: Path) -> None:
    nvcc = nvcc_path()
    assert nvcc is not None
    src, exe = tmp_path / "cast.cu", tmp_path / "cast"
    src.write_text("#include <cstring>\n" + HOST_CAST)
    subprocess.run([nvcc, "-std=c++17", "-o", str(exe), str(src)], check=True, capture_output=True)
    x = _rows()
    rows, hidden = x.shape
    header = np.array([rows, hidden], dtype=np.int32).tobytes()
    (tmp_path / "in.bin").write_bytes(header + x.view(torch.int16).numpy().tobytes())
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    raw = (tmp_path / "out.bin").read_bytes()
    q_host = np.frombuffer(raw[: rows * hidden], dtype=np.uint8).reshape(rows, hidden)
    s_host = np.frombuffer(raw[rows * hidden :], dtype=np.float32).reshape(rows, hidden // 128)

    q, scales = cast_to_fp8(x)
    assert np.array_equal(scales.numpy().view(np.uint32), s_host.view(np.uint32))
    mismatch = np.argwhere(q.view(torch.uint8).numpy() != q_host)
    assert mismatch.size == 0, f"first mismatches at {mismatch[:5].tolist()}"


def test_cast_rule_properties() -> None:
    x = _rows()
    q, scales = cast_to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert scales.shape == (x.shape[0], x.shape[1] // 128)
    assert torch.all(scales >= FP8_AMAX_MIN / 448.0)
    back = cast_from_fp8(q, scales)
    ok = x[:256].float()  # the random rows
    err = (back[:256] - ok).abs().view(256, -1, 128).amax(2)
    assert torch.all(err <= scales[:256] * 16 * (1 + 1e-4))  # half the e4m3 spacing at 448 is 16
