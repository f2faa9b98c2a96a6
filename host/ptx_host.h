// The wrappers of ptx/ptx.cuh on the host (host execution, runtime.h): the same names and signatures,
// each PTX memory-model meaning mapped to the C++ memory model, so that ThreadSanitizer's
// happens-before analysis checks the kernels' synchronisation:
//   ld.acquire / ld.relaxed      std::atomic_ref load, memory_order_acquire / _relaxed (+ a scheduling
//                                point before it: spin-waits let the other fibers run)
//   st.release / st.relaxed      std::atomic_ref store, memory_order_release / _relaxed
//   red.release.add              std::atomic_ref fetch_add, memory_order_release
//   fence.acq_rel / fence.sc     std::atomic_thread_fence, acq_rel / seq_cst
//   weak ld / st (no_allocate)   plain loads and stores (a race if nothing orders them)
//   ld.global.nc                 plain loads (inputs nothing writes during a kernel)
// .gpu and .sys scopes are the same on the host (one process). The async proxy (cp.async.bulk,
// mbarrier transaction counts) is modelled synchronously: a bulk copy is done when it is issued.
// tests/test_host_ptx.py checks that every wrapper of ptx/ptx.cuh has its host twin here.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "host/runtime.h"

namespace commkit::ptx {

namespace detail {
template <typename T>
inline T load(const T* ptr, std::memory_order order) {
    ::commkit::host::yield();
    return std::atomic_ref<T>(*const_cast<T*>(ptr)).load(order);
}
template <typename T>
inline void store(T* ptr, T value, std::memory_order order) {
    std::atomic_ref<T>(*ptr).store(value, order);
}
template <typename T>
inline T plain_load(const T* ptr) {
    T value;
    std::memcpy(&value, ptr, sizeof(T));
    return value;
}
}  // namespace detail

// Lane and warp helpers ------------------------------------------------------------------------------
inline int lane_id() { return ::commkit::host::lane_id(); }

// Scoped loads ---------------------------------------------------------------------------------------
inline int ld_acquire_sys(const int* ptr) { return detail::load(ptr, std::memory_order_acquire); }
inline int ld_acquire_gpu(const int* ptr) { return detail::load(ptr, std::memory_order_acquire); }
inline int ld_relaxed_sys(const int* ptr) { return detail::load(ptr, std::memory_order_relaxed); }
inline int ld_relaxed_gpu(const int* ptr) { return detail::load(ptr, std::memory_order_relaxed); }

// Scoped stores and reductions -----------------------------------------------------------------------
inline void st_release_sys(int* ptr, int value) { detail::store(ptr, value, std::memory_order_release); }
inline void st_release_gpu(int* ptr, int value) { detail::store(ptr, value, std::memory_order_release); }
inline void st_relaxed_sys(int* ptr, int value) { detail::store(ptr, value, std::memory_order_relaxed); }
inline void st_relaxed_gpu(int* ptr, int value) { detail::store(ptr, value, std::memory_order_relaxed); }
inline void red_add_release_sys(int* ptr, int value) {
    std::atomic_ref<int>(*ptr).fetch_add(value, std::memory_order_release);
}

// Fences ---------------------------------------------------------------------------------------------
inline void fence_acq_rel_sys() { std::atomic_thread_fence(std::memory_order_acq_rel); }
inline void fence_acq_rel_gpu() { std::atomic_thread_fence(std::memory_order_acq_rel); }
inline void fence_sc_sys() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// The async proxy is synchronous on the host (bulk copies complete when issued): nothing to order.
inline void fence_proxy_async_shared() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void fence_proxy_async_global() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Streaming 16-byte loads and stores (weak) ----------------------------------------------------------
inline int4 ld_v4_no_allocate(const int4* ptr) { return detail::plain_load(ptr); }
inline int ld_s32_no_allocate(const int* ptr) { return detail::plain_load(ptr); }
inline int4 ld_nc_v4_no_allocate(const int4* ptr) { return detail::plain_load(ptr); }
inline int ld_nc_s32(const int* ptr) { return detail::plain_load(ptr); }
inline int64_t ld_nc_s64(const int64_t* ptr) { return detail::plain_load(ptr); }
inline void st_v4_no_allocate(int4* ptr, const int4& v) { std::memcpy(ptr, &v, sizeof(v)); }
inline void st_v2_no_allocate(int2* ptr, const int2& v) { std::memcpy(ptr, &v, sizeof(v)); }

// Bulk copies and mbarrier ---------------------------------------------------------------------------
// The shared-window address: on the host shared memory is ordinary memory (the low 32 bits).
inline uint32_t smem_addr(const void* ptr) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(ptr)); }

namespace detail {
// mbarrier word on the host: [0, 16) expected arrivals, [16, 32) pending arrivals, [32, 63) pending
// transaction bytes (signed: a copy may complete before its bytes are announced), bit 63 the phase.
struct MbarrierWord {
    uint32_t expected, pending;
    int32_t tx;
    uint32_t phase;
};
inline MbarrierWord unpack(uint64_t w) {
    const int32_t tx = static_cast<int32_t>(static_cast<uint32_t>(w >> 32) << 1) >> 1;
    return {static_cast<uint32_t>(w & 0xffffu), static_cast<uint32_t>((w >> 16) & 0xffffu), tx,
            static_cast<uint32_t>(w >> 63)};
}
inline uint64_t pack(const MbarrierWord& m) {
    return uint64_t{m.expected} | uint64_t{m.pending} << 16 |
           (uint64_t{static_cast<uint32_t>(m.tx)} & 0x7fffffffu) << 32 | uint64_t{m.phase} << 63;
}
// Applies `arrivals` arrivals and `tx` transaction bytes (negative: completed bytes); completes the
// phase when both reach 0. Release (arrivals publish the arriving thread's writes).
inline void mbarrier_update(uint64_t* bar, uint32_t arrivals, int32_t tx) {
    std::atomic_ref<uint64_t> word(*bar);
    uint64_t old = word.load(std::memory_order_relaxed);
    while (true) {
        MbarrierWord m = unpack(old);
        m.pending -= arrivals;
        m.tx += tx;
        if (m.pending == 0 && m.tx == 0) {
            m.pending = m.expected;
            m.phase ^= 1u;
        }
        if (word.compare_exchange_weak(old, pack(m), std::memory_order_acq_rel, std::memory_order_relaxed))
            return;
    }
}
}  // namespace detail

inline void mbarrier_init(uint64_t* bar, int arrive_count) {
    detail::store(bar, detail::pack({static_cast<uint32_t>(arrive_count), static_cast<uint32_t>(arrive_count), 0, 0}),
                  std::memory_order_relaxed);
}
inline void fence_mbarrier_init() { std::atomic_thread_fence(std::memory_order_release); }
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    detail::mbarrier_update(bar, 1, static_cast<int32_t>(bytes));
}
inline bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
    const uint64_t word = detail::load(bar, std::memory_order_acquire);
    return detail::unpack(word).phase != (parity & 1u);
}
inline void bulk_load_to_shared(void* dst_smem, const void* src_gmem, uint32_t bytes, uint64_t* bar) {
    std::memcpy(dst_smem, src_gmem, bytes);
    detail::mbarrier_update(bar, 0, -static_cast<int32_t>(bytes));
}
inline void bulk_store_from_shared(void* dst_gmem, const void* src_smem, uint32_t bytes) {
    std::memcpy(dst_gmem, src_smem, bytes);
}
inline void bulk_commit_group() {}
template <int kNumPending>
inline void bulk_wait_group_read() {}
template <int kNumPending>
inline void bulk_wait_group() {
    std::atomic_thread_fence(std::memory_order_release);
}

// Barriers among a subset of the block and FP8 conversion --------------------------------------------
inline void named_barrier_sync(int barrier_id, int num_threads) {
    ::commkit::host::barrier_sync(barrier_id, num_threads);
}

namespace detail {
// float32 -> e4m3 (float8_e4m3fn: bias 7, no infinities, NaN = 0x7f), round to nearest even,
// saturating to +-448; NaN gives 0x7f (the canonical NaN of cvt).
inline uint8_t e4m3_rn_satfinite(float f) {
    if (std::isnan(f))
        return 0x7f;
    const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
    const float a = std::fabs(f);
    if (a > 448.0f)
        return sign | 0x7e;
    if (a < 0.015625f) {  // below 2^-6: subnormal, multiples of 2^-9 (exact scaling, then RNE)
        const float q = std::nearbyint(a * 512.0f);
        return sign | static_cast<uint8_t>(q);  // q == 8 is the smallest normal, encoded the same
    }
    int exp2;
    const float m = std::frexp(a, &exp2);  // a = m * 2^exp2, m in [0.5, 1)
    int e = exp2 - 1;                        // a = (2m) * 2^e, 2m in [1, 2)
    float q = std::nearbyint((2.0f * m - 1.0f) * 8.0f);
    if (q == 8.0f) {
        q = 0.0f;
        ++e;
    }
    return sign | static_cast<uint8_t>(((e + 7) << 3) | static_cast<int>(q));
}
}  // namespace detail

inline uint16_t cvt_e4m3x2_rn_satfinite(float lo, float hi) {
    return static_cast<uint16_t>(detail::e4m3_rn_satfinite(lo) | detail::e4m3_rn_satfinite(hi) << 8);
}

[[noreturn]] inline void trap() { ::commkit::host::trap(); }

inline uint64_t globaltimer_ns() { return ::commkit::host::globaltimer_ns(); }

}  // namespace commkit::ptx
