// PTX wrappers used by the commkit kernels: one __forceinline__ function per instruction.
//
// Memory-model vocabulary (PTX ISA, "Memory Consistency Model"):
//   scope .gpu : the threads of this GPU; .sys : every thread of the system, including peer GPUs that
//                reach this memory over NVLink through CUDA IPC mappings, and the host.
//   relaxed    : a strong (morally-strong) access with no ordering of other accesses.
//   acquire    : later accesses of this thread cannot move before it; pairs with a release.
//   release    : earlier accesses of this thread (and those it observed, cumulatively) cannot move
//                after it; a release/acquire pair that observes the value synchronizes.
//   weak       : a plain ld/st; ordered for others only through a later release/fence of this thread.
//
// Every instruction here is defined for sm_90 by the PTX ISA 8.x; nothing relies on behaviour the ISA
// leaves undefined. In particular ld.global.nc is used only for data no thread writes while the kernel
// runs (the caller's inputs), never for ring-buffer slots that peers fill.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "commkit kernels target sm_90 (Hopper): build with -arch=sm_90"
#endif

#if defined(COMMKIT_HOST_EXECUTION)
// Host execution (host/runtime.h): the same wrappers, name for name and signature for signature, with
// their meaning in the C++ memory model (tests/test_host_ptx.py checks that none is missing).
#include "host/ptx_host.h"
#else

namespace commkit::ptx {

// ---------------------------------------------------------------------------------------------------
// Lane and warp helpers
// ---------------------------------------------------------------------------------------------------

// The lane index of this thread in its warp (%laneid).
__device__ __forceinline__ int lane_id() {
    int lane;
    asm volatile("mov.s32 %0, %%laneid;" : "=r"(lane));
    return lane;
}

// ---------------------------------------------------------------------------------------------------
// Scoped loads: 32-bit flags and counters
// ---------------------------------------------------------------------------------------------------

// Acquire at system scope: sees every write that a peer GPU or the host released before the value read.
__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
    int value;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Acquire at GPU scope: as ld_acquire_sys for writers on this GPU only (virtual ranks share one GPU).
__device__ __forceinline__ int ld_acquire_gpu(const int* ptr) {
    int value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Relaxed at system scope: a strong load (never torn, never served from a stale L1 line), no ordering.
__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
    int value;
    asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// Relaxed at GPU scope: a strong load among the threads of this GPU, no ordering.
__device__ __forceinline__ int ld_relaxed_gpu(const int* ptr) {
    int value;
    asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

// ---------------------------------------------------------------------------------------------------
// Scoped stores and reductions: 32-bit flags and counters
// ---------------------------------------------------------------------------------------------------

// Release at system scope: every earlier write of this thread (and each write it observed, as the
// release is cumulative) is visible to a peer GPU that acquires this value.
__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Release at GPU scope: as st_release_sys for readers on this GPU only.
__device__ __forceinline__ void st_release_gpu(int* ptr, int value) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed at system scope: a strong store (visible to peers eventually, never torn), no ordering.
__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Relaxed at GPU scope: a strong store among the threads of this GPU, no ordering.
__device__ __forceinline__ void st_relaxed_gpu(int* ptr, int value) {
    asm volatile("st.relaxed.gpu.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Atomic add with release at system scope, no result: a barrier arrival that publishes earlier writes.
__device__ __forceinline__ void red_add_release_sys(int* ptr, int value) {
    asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// ---------------------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------------------

// fence.acq_rel.sys: a lightweight fence; with a later relaxed store it forms a release pattern (and
// with an earlier relaxed load an acquire pattern) at system scope.
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// fence.acq_rel.gpu: as fence_acq_rel_sys among the threads of this GPU.
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// fence.sc.sys: a sequentially consistent fence; all fence.sc are totally ordered system-wide.
__device__ __forceinline__ void fence_sc_sys() { asm volatile("fence.sc.sys;" ::: "memory"); }

// fence.proxy.async.shared::cta: orders generic-proxy accesses to shared memory with later async-proxy
// (cp.async.bulk) accesses of this thread, and async-proxy writes before it with later generic reads.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// fence.proxy.async.global: as fence_proxy_async_shared for global memory.
__device__ __forceinline__ void fence_proxy_async_global() {
    asm volatile("fence.proxy.async.global;" ::: "memory");
}

// ---------------------------------------------------------------------------------------------------
// Streaming 16-byte loads and stores (rows)
// ---------------------------------------------------------------------------------------------------

// Weak 16-byte load through L2, not allocated in L1: for ring-buffer slots that a peer filled; the
// caller orders it after the acquire of the counter that published the slot.
__device__ __forceinline__ int4 ld_v4_no_allocate(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr)
                 : "memory");
    return v;
}

// Weak 4-byte load through L2, not allocated in L1: slot metadata a peer filled (ordered like
// ld_v4_no_allocate after the acquire that published it).
__device__ __forceinline__ int ld_s32_no_allocate(const int* ptr) {
    int v;
    asm volatile("ld.global.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
    return v;
}

// Non-coherent 16-byte load through the read-only path, not allocated in L1. NOTE: defined only for
// memory that no thread writes during the kernel: used for the caller's inputs only.
__device__ __forceinline__ int4 ld_nc_v4_no_allocate(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// Non-coherent 4-byte load for read-only inputs (same restriction as ld_nc_v4_no_allocate).
__device__ __forceinline__ int ld_nc_s32(const int* ptr) {
    int v;
    asm volatile("ld.global.nc.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(ptr));
    return v;
}

// Non-coherent 8-byte load for read-only inputs (same restriction as ld_nc_v4_no_allocate).
__device__ __forceinline__ int64_t ld_nc_s64(const int64_t* ptr) {
    int64_t v;
    asm volatile("ld.global.nc.L1::no_allocate.s64 %0, [%1];" : "=l"(v) : "l"(ptr));
    return v;
}

// Weak 16-byte store, not allocated in L1: rows into a peer's ring buffer or into outputs; published
// to other threads only by a later release (or kernel completion).
__device__ __forceinline__ void st_v4_no_allocate(int4* ptr, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// Weak 8-byte store, not allocated in L1 (FP8 rows: 8 e4m3 values).
__device__ __forceinline__ void st_v2_no_allocate(int2* ptr, const int2& v) {
    asm volatile("st.global.L1::no_allocate.v2.s32 [%0], {%1, %2};" ::"l"(ptr), "r"(v.x), "r"(v.y)
                 : "memory");
}

// ---------------------------------------------------------------------------------------------------
// Hopper bulk copies (cp.async.bulk, TMA engine without a tensor map) and mbarrier
// ---------------------------------------------------------------------------------------------------

// Converts a generic pointer to shared memory into the 32-bit shared-window address PTX expects.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// mbarrier.init: sets the expected arrival count of a shared-memory barrier (phase 0 in progress).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrive_count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrive_count)
                 : "memory");
}

// fence.mbarrier_init.release.cluster: makes mbarrier.init visible to the async proxy (bulk copies).
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// mbarrier.arrive.expect_tx: one arrival that also announces `bytes` of bulk-copy traffic to wait for;
// release semantics at CTA scope.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}

// mbarrier.try_wait.parity: true once the phase with the given parity completed (all arrivals and all
// announced bytes landed); acquire at CTA scope, so the copied bytes are visible to this thread.
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// cp.async.bulk global -> shared: copies `bytes` (a multiple of 16, both addresses 16-byte aligned);
// completion is signalled as transaction bytes on `bar`.
__device__ __forceinline__ void bulk_load_to_shared(void* dst_smem, const void* src_gmem, uint32_t bytes,
                                                    uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_addr(dst_smem)),
        "l"(src_gmem), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}

// cp.async.bulk shared -> global: copies `bytes` (multiple of 16, 16-byte aligned) in the bulk group of
// this thread; the source may be reused after bulk_wait_group_read, the data is visible to other
// threads after bulk_wait_group plus a release.
__device__ __forceinline__ void bulk_store_from_shared(void* dst_gmem, const void* src_smem,
                                                       uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst_gmem),
                 "r"(smem_addr(src_smem)), "r"(bytes)
                 : "memory");
}

// cp.async.bulk.commit_group: closes the current bulk group of this thread.
__device__ __forceinline__ void bulk_commit_group() {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// cp.async.bulk.wait_group.read N: waits until at most N bulk groups still read their shared source.
template <int kNumPending>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kNumPending) : "memory");
}

// cp.async.bulk.wait_group N: waits until at most N bulk groups are incomplete (writes performed).
template <int kNumPending>
__device__ __forceinline__ void bulk_wait_group() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kNumPending) : "memory");
}

// ---------------------------------------------------------------------------------------------------
// Barriers among a subset of the block and FP8 conversion
// ---------------------------------------------------------------------------------------------------

// bar.sync with an id and a thread count: named barrier for a warp group (memory ordering at CTA scope
// among the participating threads, like __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int barrier_id, int num_threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(barrier_id), "r"(num_threads) : "memory");
}

// cvt.rn.satfinite.e4m3x2.f32: two floats to two e4m3 bytes, round to nearest even, saturating to
// +-448 (NaN stays NaN); `lo` lands in the low byte.
__device__ __forceinline__ uint16_t cvt_e4m3x2_rn_satfinite(float lo, float hi) {
    uint16_t packed;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// trap: aborts the kernel (the context becomes unusable); used after a timeout report.
__device__ __forceinline__ void trap() { asm volatile("trap;"); }

// %globaltimer: a 64-bit nanosecond clock shared by the SMs of the GPU, independent of the SM clock
// frequency (which changes with boost and power capping); the time base of the bounded spin-waits.
__device__ __forceinline__ uint64_t globaltimer_ns() {
    uint64_t ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
}

}  // namespace commkit::ptx

#endif  // COMMKIT_HOST_EXECUTION
