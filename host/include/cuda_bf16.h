// The part of CUDA's <cuda_bf16.h> the commkit kernels use, for the host execution (found before the
// toolkit's header through -I, so that a host build needs no CUDA toolkit).
//
// bfloat16 -> float is exact (the 16 bits become the high half); float -> bfloat16 rounds to nearest
// even, as cvt.rn.bf16x2.f32 does; NaN becomes the canonical 0x7fff, as on the device.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return {static_cast<unsigned short>(0x7fffu)};
    const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    return {static_cast<unsigned short>((bits + rounding) >> 16)};
}

inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
