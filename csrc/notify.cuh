// Notify: exchange the counts of a dispatch with the peers, then a barrier, then prefix sums.
//
// One block per rank of the launch. Each rank writes into every peer's inbox what it will send there
// (rows, its own token count, rows per expert of that peer), then all ranks meet at a barrier, then each
// rank reads its inbox and writes `meta` (int32, meta_stride = 2R + 1 + L):
//   [0, R]          recv_rank_offset: exclusive prefix over sources of the rows received; [R] = N_recv
//   [R + 1, 2R]     num_tokens of each source rank (the combine splits them into channels)
//   [2R + 1, +L)    rows received per local expert, rounded up to expert_alignment
// num_max_recv_rows >= 0 (num_worst_tokens) bounds the rows a rank may receive: more traps.
#pragma once

#include "csrc/common.cuh"

namespace commkit {

__device__ __forceinline__ uint8_t* peer_base(const uint64_t* peer_bases, int rank) {
    return reinterpret_cast<uint8_t*>(peer_bases[rank]);
}

// The epoch the next barrier of `rank` will complete (all ranks run the same sequence of barriers).
__device__ __forceinline__ int next_barrier_epoch(const uint64_t* peer_bases, int rank) {
    return *reinterpret_cast<const int*>(peer_base(peer_bases, rank) + BufferLayout::kEpochOffset) + 1;
}

// Barrier of the ranks, run by one whole block of each rank. Every write the block made before it is
// visible to every peer after it (bar.sync, then a cumulative release per peer, then acquires).
template <int kNumRanks>
__device__ __forceinline__ void rank_barrier(const uint64_t* peer_bases, int rank, int epoch,
                                             int64_t timeout_ns) {
    // NOTE: the fence makes each thread's earlier writes (inbox entries in peers' buffers) part of
    // what the signalling threads release, without relying on bar.sync cumulativity alone.
    ptx::fence_acq_rel_sys();
    __syncthreads();
    uint8_t* own = peer_base(peer_bases, rank);
    if (threadIdx.x < kNumRanks) {
        int* signal = reinterpret_cast<int*>(peer_base(peer_bases, threadIdx.x) + BufferLayout::kSignalOffset);
        ptx::red_add_release_sys(signal + rank, 1);
        const WaitContext ctx{"barrier", rank, -1, kRoleBarrier, static_cast<int>(threadIdx.x), timeout_ns};
        const int* arrived = reinterpret_cast<const int*>(own + BufferLayout::kSignalOffset) + threadIdx.x;
        // NOTE: signals only grow; the difference is compared so that int wrap-around is harmless.
        wait_until(arrived, [epoch](int value) { return value - epoch >= 0; }, epoch, ctx);
    }
    if (threadIdx.x == 0)
        *reinterpret_cast<int*>(own + BufferLayout::kEpochOffset) = epoch;
    __syncthreads();
}

template <int kNumRanks>
__global__ void __launch_bounds__(128, 1)
    notify_kernel(const uint64_t* peer_bases, int rank_base, int num_experts, const int* token_offsets,
                  const int* num_tokens_per_rank, const int* num_tokens_per_expert, int expert_alignment,
                  int num_max_recv_rows, int* meta, int64_t timeout_ns) {
    const int local_idx = blockIdx.x;
    const int rank = rank_base + local_idx;
    const int num_local_experts = num_experts / kNumRanks;
    const int meta_stride = 2 * kNumRanks + 1 + num_local_experts;
    const int epoch = next_barrier_epoch(peer_bases, rank);
    const int parity = epoch & 1;

    // Tell every peer what it will receive from this rank
    for (int dst = 0; dst < kNumRanks; ++dst) {
        int* entry = reinterpret_cast<int*>(peer_base(peer_bases, dst) + BufferLayout::kInboxOffset) +
                     (parity * kMaxRanks + rank) * kInboxInts;
        if (threadIdx.x == 0) {
            entry[0] = num_tokens_per_rank[local_idx * kNumRanks + dst];
            entry[1] = token_offsets[local_idx + 1] - token_offsets[local_idx];
        }
        for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x)
            entry[2 + e] = num_tokens_per_expert[static_cast<int64_t>(local_idx) * num_experts +
                                                 dst * num_local_experts + e];
    }

    rank_barrier<kNumRanks>(peer_bases, rank, epoch, timeout_ns);

    // Prefix sums over the sources, in rank order
    const int* inbox = reinterpret_cast<const int*>(peer_base(peer_bases, rank) + BufferLayout::kInboxOffset) +
                       parity * kMaxRanks * kInboxInts;
    int* out = meta + static_cast<int64_t>(local_idx) * meta_stride;
    if (threadIdx.x == 0) {
        int offset = 0;
        for (int src = 0; src < kNumRanks; ++src) {
            out[src] = offset;
            offset += inbox[src * kInboxInts];
            out[kNumRanks + 1 + src] = inbox[src * kInboxInts + 1];
        }
        out[kNumRanks] = offset;
        // With num_worst_tokens the outputs hold num_max_recv_rows rows: more would write past them
        if (num_max_recv_rows >= 0 && offset > num_max_recv_rows)
            report_and_trap("dispatch: num_worst_tokens is smaller than the rows received", rank, -1,
                            kRoleReceiver, -1, num_max_recv_rows, offset);
    }
    for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
        int count = 0;
        for (int src = 0; src < kNumRanks; ++src)
            count += inbox[src * kInboxInts + 2 + e];
        out[2 * kNumRanks + 1 + e] = (count + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
}

}  // namespace commkit
