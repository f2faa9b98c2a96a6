// Row movement shared by dispatch and combine: unrolled 16-byte copies split over the warps of a group.
#pragma once

#include <cuda_bf16.h>

#include "csrc/common.cuh"

namespace commkit {

constexpr int kCopyUnroll = 4;  // 16-byte loads in flight per lane before the stores

// Copies kNumInt4 16-byte words from src to dst; this thread handles words first, first + kStride, ...
// (first = index of the thread in its group, kStride = threads in the group). kSrcReadOnly selects the
// non-coherent load, allowed only for inputs nobody writes while the kernel runs. kUnroll words are in
// flight per lane (4 registers each).
template <int kNumInt4, int kStride, bool kSrcReadOnly, int kUnroll = kCopyUnroll>
__device__ __forceinline__ void copy_row(int4* dst, const int4* src, int first) {
    for (int base = first; base < kNumInt4; base += kStride * kUnroll) {
        int4 values[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int idx = base + u * kStride;
            if (idx < kNumInt4)
                values[u] = kSrcReadOnly ? ptx::ld_nc_v4_no_allocate(src + idx) : ptx::ld_v4_no_allocate(src + idx);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int idx = base + u * kStride;
            if (idx < kNumInt4)
                ptx::st_v4_no_allocate(dst + idx, values[u]);
        }
    }
}

// Copies kNum 4-byte words (scales, top-k metadata), one per thread of the group.
template <typename T>
__device__ __forceinline__ void copy_words(T* dst, const T* src, int num, int first, int stride) {
    for (int i = first; i < num; i += stride)
        dst[i] = src[i];
}

// Casts a bf16 row to FP8 e4m3 with one float32 scale per 128 elements (the rule of commkit/fp8.py):
//   amax  = max(max |x| over the group, kFp8AmaxMin)
//   scale = amax / 448                  (float32 division, round to nearest even)
//   q     = e4m3_rn_satfinite(x / scale) (float32 division, then RNE to e4m3)
// 16 lanes (a half warp) hold one group of 128 = 16 x 8 elements; the whole warp runs the loop.
template <int kHidden, int kWarpsInGroup>
__device__ __forceinline__ void cast_row_to_fp8(uint8_t* dst_fp8, float* dst_scales, const int4* src_bf16,
                                                int warp_in_group, int lane) {
    static_assert(kHidden % kFp8GroupSize == 0, "FP8 cast needs hidden % 128 == 0");
    constexpr int kNumInt4 = kHidden / 8;
    for (int base = warp_in_group * 32; base < kNumInt4; base += kWarpsInGroup * 32) {
        const int idx = base + lane;  // whole half warps are in or out of range (kNumInt4 % 16 == 0)
        float values[8];
        float amax = 0.0f;
        if (idx < kNumInt4) {
            const int4 raw = ptx::ld_nc_v4_no_allocate(src_bf16 + idx);
            const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                const float2 f = __bfloat1622float2(pairs[p]);
                values[2 * p] = f.x;
                values[2 * p + 1] = f.y;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e)
                amax = fmaxf(amax, fabsf(values[e]));
        }
#pragma unroll
        for (int offset = 8; offset >= 1; offset >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        if (idx < kNumInt4) {
            const float scale = __fdiv_rn(fmaxf(amax, kFp8AmaxMin), kFp8Max);
            uint32_t packed[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t lo = ptx::cvt_e4m3x2_rn_satfinite(__fdiv_rn(values[4 * h], scale),
                                                                 __fdiv_rn(values[4 * h + 1], scale));
                const uint32_t hi = ptx::cvt_e4m3x2_rn_satfinite(__fdiv_rn(values[4 * h + 2], scale),
                                                                 __fdiv_rn(values[4 * h + 3], scale));
                packed[h] = lo | (hi << 16);
            }
            ptx::st_v2_no_allocate(reinterpret_cast<int2*>(dst_fp8) + idx,
                                   make_int2(static_cast<int>(packed[0]), static_cast<int>(packed[1])));
            if (lane % 16 == 0)
                dst_scales[idx / 16] = scale;
        }
    }
}

}  // namespace commkit
