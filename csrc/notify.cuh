// Notify: agree on the call and exchange the counts of a dispatch with the peers, then a barrier,
// then prefix sums.
//
// One block per rank of the launch. Each rank writes into every peer's inbox its call descriptor
// (CallField) and what it will send there (rows, its own token count, rows per expert of that peer),
// then all ranks meet at a barrier, then each rank compares every peer's descriptor with its own
// (agree_on_call: `status`, int32 [kStatusInts] per rank), reads its inbox and writes `meta` (int32,
// meta_stride = 2R + 1 + L):
//   [0, R]          recv_rank_offset: exclusive prefix over sources of the rows received; [R] = N_recv
//   [R + 1, 2R]     num_tokens of each source rank (the combine splits them into channels)
//   [2R + 1, +L)    rows received per local expert, rounded up to expert_alignment
// num_max_recv_rows >= 0 (num_worst_tokens) bounds the rows a rank may receive: more traps. When the
// ranks disagree, meta is all zeros (the peers' counts mean nothing) and the payload kernel skips.
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
// Each rank stores the epoch it begins into its slot of every peer's signals (a store, not an
// increment: a barrier a rank began and left by a timeout leaves the same value when it is begun
// again, so it never lets a later barrier of its peers pass early).
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
        ptx::st_release_sys(signal + rank, epoch);
        const WaitContext ctx{"barrier", rank, -1, kRoleBarrier, static_cast<int>(threadIdx.x), timeout_ns};
        const int* arrived = reinterpret_cast<const int*>(own + BufferLayout::kSignalOffset) + threadIdx.x;
        // NOTE: differences, so that int wrap-around is harmless. A peer's slot holds this epoch, or
        // the next one when the peer has already left this barrier (it saw this rank's store); two or
        // more ahead, that peer ran barriers this rank did not: the rings cannot be trusted.
        const int observed = wait_until(arrived, [epoch](int value) { return value - epoch >= 0; }, epoch, ctx);
        if (observed - epoch >= 2)
            report_and_trap("barrier: a peer ran more barriers than this rank (epochs)", rank, -1, kRoleBarrier,
                            static_cast<int>(threadIdx.x), epoch, observed);
    }
    __syncthreads();
    // NOTE: after every wait of the block: a barrier left by a timeout keeps the epoch it had, so it
    // is begun again with the same value (read by the next kernel only)
    if (threadIdx.x == 0)
        *reinterpret_cast<int*>(own + BufferLayout::kEpochOffset) = epoch;
}

// The descriptor of this rank's call (CallField order). `handle_status`: the status of the dispatch
// that made the call's handle (its sequence number ties the handle to that call), nullptr without one.
struct CallDescriptor {
    int field[kCallInts];
};

__device__ __forceinline__ CallDescriptor make_call(const uint64_t* peer_bases, int rank, int local_idx, int op,
                                                    int num_experts, int hidden, int num_topk, int dtype,
                                                    int num_sms, const int* handle_status) {
    const int seq = *reinterpret_cast<const int*>(peer_base(peer_bases, rank) + BufferLayout::kCallSeqOffset);
    const int handle = handle_status == nullptr ? -1 : handle_status[local_idx * kStatusInts + kStatusSeq];
    return {{op, seq, num_experts, hidden, num_topk, dtype, num_sms, handle}};
}

__device__ __forceinline__ int* inbox_entry(const uint64_t* peer_bases, int dst, int parity, int src) {
    return reinterpret_cast<int*>(peer_base(peer_bases, dst) + BufferLayout::kInboxOffset) +
           (parity * kMaxRanks + src) * kInboxInts;
}

// Before the barrier: this rank's descriptor into every peer's inbox entry.
template <int kNumRanks>
__device__ __forceinline__ void post_call(const uint64_t* peer_bases, int rank, int parity,
                                          const CallDescriptor& call) {
    if (threadIdx.x < kNumRanks) {
        int* entry = inbox_entry(peer_bases, static_cast<int>(threadIdx.x), parity, rank);
#pragma unroll
        for (int f = 0; f < kCallInts; ++f)
            entry[f] = call.field[f];
    }
}

// After the barrier: compares every source's descriptor with this rank's and writes `status` (the
// verdict, the first source that differs and its descriptor). If not all ranks passed the same call,
// every rank finds a source that differs from it, so every rank of the group gives the same verdict.
// The next sequence number is the largest of the call's plus one on every rank, so a group whose
// numbers differed agrees again. Returns the verdict to every thread of the block.
template <int kNumRanks>
__device__ __forceinline__ int agree_on_call(const uint64_t* peer_bases, int rank, int local_idx, int parity,
                                             const CallDescriptor& call, int* status) {
    __shared__ int s_verdict;
    if (threadIdx.x == 0) {
        int* out = status + static_cast<int64_t>(local_idx) * kStatusInts;
        int verdict = kAgreed, max_seq = call.field[kCallSeq];
        out[kStatusPeer] = -1;
        for (int src = 0; src < kNumRanks; ++src) {
            const int* theirs = inbox_entry(peer_bases, rank, parity, src);
            bool same = true;
#pragma unroll
            for (int f = 0; f < kCallInts; ++f)
                same = same && theirs[f] == call.field[f];
            max_seq = max(max_seq, theirs[kCallSeq]);
            if (!same && verdict == kAgreed) {
                verdict = kDisagreed;
                out[kStatusPeer] = src;
#pragma unroll
                for (int f = 0; f < kCallInts; ++f)
                    out[kStatusPeerCall + f] = theirs[f];
            }
        }
        out[kStatusVerdict] = verdict;
        out[kStatusSeq] = call.field[kCallSeq];
        *reinterpret_cast<int*>(peer_base(peer_bases, rank) + BufferLayout::kCallSeqOffset) = max_seq + 1;
        s_verdict = verdict;
    }
    __syncthreads();
    return s_verdict;
}

template <int kNumRanks>
__global__ void __launch_bounds__(128, 1)
    notify_kernel(const uint64_t* peer_bases, int rank_base, int num_experts, int hidden, int num_topk, int dtype,
                  int num_sms, int* status, const int* token_offsets, const int* num_tokens_per_rank,
                  const int* num_tokens_per_expert, int expert_alignment, int num_max_recv_rows, int* meta,
                  int64_t timeout_ns) {
    const int local_idx = blockIdx.x;
    const int rank = rank_base + local_idx;
    const int num_local_experts = num_experts / kNumRanks;
    const int meta_stride = 2 * kNumRanks + 1 + num_local_experts;
    const int epoch = next_barrier_epoch(peer_bases, rank);
    const int parity = epoch & 1;
    const CallDescriptor call =
        make_call(peer_bases, rank, local_idx, 0, num_experts, hidden, num_topk, dtype, num_sms, nullptr);

    // Tell every peer what this rank calls and what it will receive from this rank
    post_call<kNumRanks>(peer_bases, rank, parity, call);
    for (int dst = 0; dst < kNumRanks; ++dst) {
        int* entry = inbox_entry(peer_bases, dst, parity, rank) + kInboxCounts;
        if (threadIdx.x == 0) {
            entry[0] = num_tokens_per_rank[local_idx * kNumRanks + dst];
            entry[1] = token_offsets[local_idx + 1] - token_offsets[local_idx];
        }
        // NOTE: a peer that disagrees may have fewer experts: only this rank's L entries are read
        for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x)
            entry[2 + e] = num_tokens_per_expert[static_cast<int64_t>(local_idx) * num_experts +
                                                 dst * num_local_experts + e];
    }

    rank_barrier<kNumRanks>(peer_bases, rank, epoch, timeout_ns);
    const bool agreed = agree_on_call<kNumRanks>(peer_bases, rank, local_idx, parity, call, status) == kAgreed;

    // Prefix sums over the sources, in rank order
    const int* inbox = inbox_entry(peer_bases, rank, parity, 0) + kInboxCounts;
    int* out = meta + static_cast<int64_t>(local_idx) * meta_stride;
    if (threadIdx.x == 0) {
        int offset = 0;
        for (int src = 0; src < kNumRanks; ++src) {
            out[src] = offset;
            offset += agreed ? inbox[src * kInboxInts] : 0;
            out[kNumRanks + 1 + src] = agreed ? inbox[src * kInboxInts + 1] : 0;
        }
        out[kNumRanks] = offset;
        // With num_worst_tokens the outputs hold num_max_recv_rows rows: more would write past them
        if (num_max_recv_rows >= 0 && offset > num_max_recv_rows)
            report_and_trap("dispatch: num_worst_tokens is smaller than the rows received", rank, -1,
                            kRoleReceiver, -1, num_max_recv_rows, offset);
    }
    for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
        int count = 0;
        for (int src = 0; agreed && src < kNumRanks; ++src)
            count += inbox[src * kInboxInts + 2 + e];
        out[2 * kNumRanks + 1 + e] = (count + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
}

}  // namespace commkit
