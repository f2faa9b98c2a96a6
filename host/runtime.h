// Host execution of the commkit kernels: the interface between the CUDA-language shim (cuda_shim.h,
// ptx_host.h) and the runtime that executes a launch on the CPU (runtime.cpp).
//
// Execution model. Every block of a launch lives at once on its own OS thread (the persistent kernels
// wait on each other across blocks and ranks); the threads of a block are fibers of that OS thread
// (glibc ucontext), switched at the points where a GPU thread may wait for another: barriers, warp
// collectives and every strong (scoped) load, so that spin-waits progress on any number of cores. A
// seed varies the order in which a block's runnable fibers run. Static __shared__ storage is
// thread_local, i.e. one copy per block.
//
// Memory model. The runtime itself is compiled without sanitizer instrumentation. Fibers of one OS
// thread are switched without synchronisation for ThreadSanitizer (__tsan_switch_to_fiber_no_sync),
// so TSan sees each GPU thread as a thread of its own; a barrier (bar.sync, __syncthreads,
// __syncwarp) orders the memory accesses of its participants (release on arrival, acquire on
// departure), a shuffle or vote exchanges values only, as on the GPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace commkit::host {

struct Dim3 {
    unsigned x, y, z;
};

// Per-fiber (GPU thread) identity.
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
int lane_id();

// A scheduling point (before every strong load): other fibers of the block run first.
void yield();

// bar.sync id, num_threads (num_threads = blockDim.x for __syncthreads).
void barrier_sync(int id, int num_threads);

// Warp collectives of the lanes in `mask` (every lane of `mask` must make the same call).
enum class WarpOp : int { kSync = 0, kShflIdx = 1, kShflXor = 2, kShflUp = 3, kReduceOr = 4 };
// Returns the result for this lane: shuffles give the value of the source lane (or this lane's own
// value when the source is out of range), kReduceOr the OR of every lane's value, kSync 0.
uint32_t warp_collective(WarpOp op, uint32_t mask, uint32_t value, int operand, int width);

// trap: ends the launch (every fiber of every block stops at its next scheduling point).
[[noreturn]] void trap();

// printf of a kernel: formatted into the launch's log (and to stderr).
int device_printf(const char* format, ...) __attribute__((format(printf, 1, 2)));

// The nanosecond clock of %globaltimer.
uint64_t globaltimer_ns();

// One launch: grid x block fibers run `body(arg)`. Returns 0 (completed), 1 (the kernel trapped: a
// report or a timeout) or 2 (a fault the host execution found: a barrier or warp collective that not
// every required thread reaches, a watchdog timeout); `log` receives the kernel's printf output and
// the runtime's reports.
struct LaunchConfig {
    unsigned grid_x;
    unsigned block_x;
    uint64_t seed;           // 0: fibers run in index order; else a seeded random order per pass
    int64_t watchdog_ns;     // the launch is stopped as a fault after this long (0: never)
    size_t stack_bytes;      // per fiber
};
int launch(const LaunchConfig& config, void (*body)(void*), void* arg, char* log, size_t log_bytes);

}  // namespace commkit::host
