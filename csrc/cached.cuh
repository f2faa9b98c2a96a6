// Cached notify: what a dispatch with a handle (same routing) and every combine run before the main
// kernel. The counts, positions and prefix sums come from the handle, so only the barrier remains: it
// guarantees that every peer finished its previous kernel on the shared buffers (and zeroed its
// counters) before anyone starts writing into them again.
#pragma once

#include "csrc/notify.cuh"

namespace commkit {

template <int kNumRanks>
__global__ void __launch_bounds__(128, 1)
    cached_notify_kernel(const uint64_t* peer_bases, int rank_base, int64_t timeout_ns) {
    const int rank = rank_base + static_cast<int>(blockIdx.x);
    rank_barrier<kNumRanks>(peer_bases, rank, next_barrier_epoch(peer_bases, rank), timeout_ns);
}

}  // namespace commkit
