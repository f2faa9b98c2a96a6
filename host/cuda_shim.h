// The CUDA language on the host, for the host execution of the commkit kernels (runtime.h): the
// qualifiers, the thread and block indices, barriers, warp collectives, atomics and the device math the
// kernels use. Included first (-include) by every host build; the kernel sources are compiled unchanged.
//
// Each definition keeps the meaning the CUDA programming guide gives it; where the host cannot, the
// difference is written next to it (csrc/README.md, "Host execution", lists them all).
#pragma once

// Standard headers first: the macros below (__noinline__, printf) must not reach them.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <type_traits>

#include "host/runtime.h"

#ifndef COMMKIT_HOST_EXECUTION
#define COMMKIT_HOST_EXECUTION 1
#endif

// ---------------------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One copy per block: a block is one OS thread (runtime.h).
#define __shared__ static thread_local

// ---------------------------------------------------------------------------------------------------
// Thread and block indices (per fiber)
// ---------------------------------------------------------------------------------------------------
#define threadIdx (::commkit::host::thread_idx())
#define blockIdx (::commkit::host::block_idx())
#define blockDim (::commkit::host::block_dim())
#define gridDim (::commkit::host::grid_dim())

// ---------------------------------------------------------------------------------------------------
// Vector types (the alignment of CUDA's)
// ---------------------------------------------------------------------------------------------------
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

// ---------------------------------------------------------------------------------------------------
// Barriers and warp collectives
// ---------------------------------------------------------------------------------------------------
// __syncthreads: barrier 0 of every thread of the block, ordering their memory accesses.
inline void __syncthreads() { ::commkit::host::barrier_sync(0, static_cast<int>(blockDim.x)); }

// __syncwarp(mask): the lanes of mask meet; memory ordering among them (bar.warp.sync).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::commkit::host::warp_collective(::commkit::host::WarpOp::kSync, mask, 0, 0, 32);
}

namespace commkit::host {
template <typename T>
inline uint32_t to_word(T value) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    uint32_t word;
    std::memcpy(&word, &value, 4);
    return word;
}
template <typename T>
inline T from_word(uint32_t word) {
    T value;
    std::memcpy(&value, &word, 4);
    return value;
}
}  // namespace commkit::host

// Shuffles exchange values, never memory ordering: the lanes of mask meet, each reads a register of
// another (width: the segment size of the shuffle, 32 in every kernel).
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    using namespace ::commkit::host;
    return from_word<T>(warp_collective(WarpOp::kShflIdx, mask, to_word(value), src_lane, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    using namespace ::commkit::host;
    return from_word<T>(warp_collective(WarpOp::kShflXor, mask, to_word(value), lane_mask, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    using namespace ::commkit::host;
    return from_word<T>(warp_collective(WarpOp::kShflUp, mask, to_word(value), static_cast<int>(delta), width));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned value) {
    using namespace ::commkit::host;
    return warp_collective(WarpOp::kReduceOr, mask, value, 0, 32);
}

// ---------------------------------------------------------------------------------------------------
// Atomics (CUDA's atomicAdd is a relaxed read-modify-write at device scope; _block at CTA scope)
// ---------------------------------------------------------------------------------------------------
inline int atomicAdd(int* address, int value) {
    return std::atomic_ref<int>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline int atomicAdd_block(int* address, int value) {
    return std::atomic_ref<int>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return std::atomic_ref<unsigned>(*address).fetch_add(value, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------------------------------
// Integer and float intrinsics (IEEE float32; the host build has no FMA contraction)
// ---------------------------------------------------------------------------------------------------
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __int_as_float(int x) { return ::commkit::host::from_word<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(::commkit::host::to_word(x)); }
// x86-64 float arithmetic is IEEE binary32 with round to nearest even (SSE, default MXCSR).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------------
// Shared-memory addresses and printf
// ---------------------------------------------------------------------------------------------------
inline size_t __cvta_generic_to_shared(const void* ptr) { return reinterpret_cast<size_t>(ptr); }

#define printf(...) ::commkit::host::device_printf(__VA_ARGS__)
