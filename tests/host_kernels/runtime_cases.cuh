// Kernels for tests/test_host_runtime.py: the host execution's own semantics (barriers, warp
// collectives, shared memory, spin-waits across blocks, traps) and the faults it must report.
#pragma once

#include <cuda_bf16.h>

#include "csrc/common.cuh"

namespace commkit::test {

// Row blockIdx.x of out[blocks][320], 64 threads: shuffles, vote and shared memory as the CUDA
// programming guide defines them (v = 100 * warp + lane):
//   [0, 64)    __shfl_sync(v, 31 - lane)          [64, 128)  __shfl_xor_sync(v, 5)
//   [128, 192) __shfl_up_sync(v, 3)               [192, 256) __reduce_or_sync(1 << (lane % 8))
//   [256, 320) the block's shared value, 7000 + blockIdx.x
__global__ void warp_ops_kernel(int* out_rows) {
    __shared__ int block_value;
    int* out = out_rows + blockIdx.x * 320;
    const int t = threadIdx.x, lane = ptx::lane_id(), warp = t / 32;
    const int v = 100 * warp + lane;
    out[t] = __shfl_sync(0xffffffffu, v, 31 - lane);
    out[64 + t] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[128 + t] = __shfl_up_sync(0xffffffffu, v, 3);
    out[192 + t] = static_cast<int>(__reduce_or_sync(0xffffffffu, 1u << (lane % 8)));
    if (t == 0)
        block_value = 7000 + static_cast<int>(blockIdx.x);
    __syncthreads();
    out[256 + t] = block_value;
}

// Block b waits for block b - 1's flag (acquire), then releases its own: a chain across all blocks,
// which progresses only if spin-waits let the other blocks run. out[b] = what block b saw + 1.
__global__ void chain_kernel(int* flags, int* out, int64_t timeout_ns) {
    const int b = blockIdx.x;
    if (threadIdx.x == 0) {
        int seen = 0;
        if (b > 0) {
            const WaitContext ctx{"chain", b, -1, kRoleReceiver, b - 1, timeout_ns};
            seen = wait_until(flags + b - 1, [](int value) { return value != 0; }, 1, ctx);
        }
        out[b] = seen + 1;
        ptx::st_release_sys(flags + b, seen + 1);
    }
}

// Every thread of every block adds 1 (a relaxed atomic): out[0] = grid x block.
__global__ void atomic_count_kernel(int* out) { atomicAdd(out, 1); }

// Faults: a barrier that threads 64.. never reach (they exit).
__global__ void divergent_barrier_kernel(int* out) {
    if (threadIdx.x < 64) {
        __syncthreads();
        out[threadIdx.x] = 1;
    }
}

// Faults: a named barrier of 64 threads completed by half warps (bar.sync is per warp).
__global__ void half_warp_barrier_kernel(int* out) {
    if (ptx::lane_id() < 16)
        ptx::named_barrier_sync(1, 64);
    out[threadIdx.x] = 1;
}

// Faults: lane 5 skips a shuffle of the whole warp.
__global__ void missing_lane_shuffle_kernel(int* out) {
    int v = static_cast<int>(threadIdx.x);
    if (ptx::lane_id() != 5)
        v = __shfl_sync(0xffffffffu, v, 0);
    out[threadIdx.x] = v;
}

// A wait for a flag nobody sets: the bounded wait reports and traps.
__global__ void timeout_kernel(int* flag, int64_t timeout_ns) {
    if (threadIdx.x == 0) {
        const WaitContext ctx{"test wait", 3, 1, kRoleReceiver, 2, timeout_ns};
        wait_until(flag, [](int value) { return value == 42; }, 42, ctx);
    }
}

// An unbounded spin (no kernel does this): only the host execution's watchdog stops it.
__global__ void unbounded_spin_kernel(int* flag) {
    if (threadIdx.x == 0)
        while (ptx::ld_acquire_sys(flag) == 0) {
        }
}

// FP8 and bf16 conversions of the host twins: out8[i] = e4m3 of in[i]; out16[i] = bf16 bits of in[i].
__global__ void convert_kernel(const float* in, uint8_t* out8, uint16_t* out16, int n) {
    for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < n;
         i += static_cast<int>(gridDim.x * blockDim.x)) {
        out8[i] = static_cast<uint8_t>(ptx::cvt_e4m3x2_rn_satfinite(in[i], 0.0f) & 0xffu);
        const __nv_bfloat162 pair = __floats2bfloat162_rn(in[i], 0.0f);
        uint16_t bits;
        memcpy(&bits, &pair.x, 2);
        out16[i] = bits;
    }
}

// A race on a GPU that only TSan can show: thread 0 writes and exits, thread 32 (another warp)
// reads with nothing in between (the TSan positive control of the host execution's annotations).
__global__ void exit_then_read_kernel(int* data) {
    if (threadIdx.x == 0)
        data[blockIdx.x] = 1;
    else if (threadIdx.x == 32)
        data[64 + blockIdx.x] = data[blockIdx.x];
}

// printf from two threads of every block (the runtime's log must not look like a race to TSan).
__global__ void printf_kernel(int* data) {
    if (threadIdx.x % 32 == 0 && threadIdx.x < 64)
        printf("printf from block %d thread %d\n", static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x));
    data[blockIdx.x * 64 + threadIdx.x] = 1;
}

// Lanes 16.. exit; lanes 0..15 meet at __syncwarp (CUDA waits for the non-exited lanes of the mask),
// then shuffle within segments of 8: out[t] = lane of (lane ^ 1) in its segment, + 1000 * (lane + 2
// within the segment, clamped), and a named barrier of the two warps' lanes 0..15 is not used.
__global__ void exited_lanes_kernel(int* out) {
    const int lane = ptx::lane_id();
    if (lane >= 16)
        return;
    __syncwarp();
    const int xored = __shfl_xor_sync(0x0000ffffu, lane, 1, 8);
    const int idx = __shfl_sync(0x0000ffffu, lane, lane + 2, 8);
    out[threadIdx.x] = xored + 1000 * idx;
}

// A named barrier of warps 1 and 2 (64 threads), completing normally while warps 0 and 3 do not use it:
// out[t] = 1 for the participants after thread 32's store before the barrier is seen by all of them.
__global__ void named_barrier_kernel(int* out) {
    __shared__ int flag;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    if (warp == 1 || warp == 2) {
        if (threadIdx.x == 32)
            flag = 5;
        ptx::named_barrier_sync(3, 64);
        out[threadIdx.x] = flag;
    } else {
        out[threadIdx.x] = -1;
    }
}

// Block 0 traps; the other blocks spin on a flag nobody sets: the trap stops them (the launch ends
// with the trap, not with their timeouts).
__global__ void trap_stops_others_kernel(int* flag, int64_t timeout_ns) {
    if (threadIdx.x != 0)
        return;
    if (blockIdx.x == 0)
        report_and_trap("test trap", 0, 0, kRoleSender, 1, 2, 3);
    const WaitContext ctx{"never", static_cast<int>(blockIdx.x), 0, kRoleReceiver, 0, timeout_ns};
    wait_until(flag, [](int value) { return value != 0; }, 1, ctx);
}

}  // namespace commkit::test
