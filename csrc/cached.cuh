// Cached notify: what a dispatch with a handle (same routing) and every combine run before the main
// kernel. The counts, positions and prefix sums come from the handle, so only the agreement on the call
// and the barrier remain: the barrier guarantees that every peer finished its previous kernel on the
// shared buffers (and zeroed its counters) before anyone starts writing into them again; `status`
// (csrc/notify.cuh agree_on_call) tells the payload kernel whether every rank made the same call.
#pragma once

#include "csrc/notify.cuh"

namespace commkit {

// op: 1 cached dispatch, 2 combine (CallField). handle_status: the status its dispatch's notify wrote.
template <int kNumRanks>
__global__ void __launch_bounds__(128, 1)
    cached_notify_kernel(const uint64_t* peer_bases, int rank_base, int op, int num_experts, int hidden,
                         int num_topk, int dtype, int num_sms, const int* handle_status, int* status,
                         int64_t timeout_ns) {
    const int local_idx = static_cast<int>(blockIdx.x);
    const int rank = rank_base + local_idx;
    const int epoch = next_barrier_epoch(peer_bases, rank);
    const int parity = epoch & 1;
    const CallDescriptor call =
        make_call(peer_bases, rank, local_idx, op, num_experts, hidden, num_topk, dtype, num_sms, handle_status);
    post_call<kNumRanks>(peer_bases, rank, parity, call);
    rank_barrier<kNumRanks>(peer_bases, rank, epoch, timeout_ns);
    agree_on_call<kNumRanks>(peer_bases, rank, local_idx, parity, call, status);
}

}  // namespace commkit
