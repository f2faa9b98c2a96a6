// Layout: where this rank's tokens go.
//
// One block per rank of the launch. For each token the set of destination ranks (a token goes to a
// rank once however many of its experts live there) and the experts it uses (once per expert):
//   num_tokens_per_rank   [R]     tokens sent to each rank
//   num_tokens_per_expert [E]     tokens whose top-k holds each expert
//   is_token_in_rank      [T, R]  bool (may be null: dispatch does not read it)
//   send_pos              [T, R]  position of the token among the tokens sent to that rank, or -1
// send_pos is what makes the received order (source rank, then source token index) independent of
// channel timing: the receiver writes a row from source s at recv_rank_offset[s] + send_pos.
#pragma once

#include "csrc/common.cuh"

namespace commkit {

// Exclusive prefix sum over the block; `total` receives the block-wide sum. All threads must call it.
template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int value, int* smem_warp_sums, int& total) {
    constexpr int kWarps = kThreads / 32;
    const int lane = ptx::lane_id(), warp = threadIdx.x / 32;
    int inclusive = value;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset)
            inclusive += other;
    }
    if (lane == 31)
        smem_warp_sums[warp] = inclusive;
    __syncthreads();
    int warp_base = 0;
    total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
        const int s = smem_warp_sums[w];
        warp_base += w < warp ? s : 0;
        total += s;
    }
    __syncthreads();  // smem_warp_sums is reused by the next call
    return warp_base + inclusive - value;
}

// Destination ranks of one token as a bit mask (bit r: the token goes to rank r). Also counts the
// token once per expert of its top-k in `expert_counts` when `count_experts`.
template <int kNumTopk>
__device__ __forceinline__ uint32_t token_rank_mask(const int64_t* row, int experts_per_rank, bool count_experts,
                                                    int* expert_counts) {
    int64_t experts[kNumTopk];
#pragma unroll
    for (int k = 0; k < kNumTopk; ++k)
        experts[k] = ptx::ld_nc_s64(row + k);
    uint32_t rank_mask = 0;
#pragma unroll
    for (int k = 0; k < kNumTopk; ++k) {
        if (experts[k] < 0)
            continue;
        if (count_experts) {
            bool first = true;  // a token counts once per expert even if top-k repeats it
#pragma unroll
            for (int j = 0; j < k; ++j)
                first &= experts[j] != experts[k];
            if (first)
                atomicAdd_block(&expert_counts[experts[k]], 1);
        }
        rank_mask |= 1u << (static_cast<int>(experts[k]) / experts_per_rank);
    }
    return rank_mask;
}

template <int kNumRanks, int kNumTopk>
__global__ void __launch_bounds__(kLayoutThreads, 1)
    layout_kernel(const int64_t* topk_idx, const int* token_offsets, int num_experts, int* num_tokens_per_rank,
                  int* num_tokens_per_expert, bool* is_token_in_rank, int* send_pos) {
    static_assert(kNumTopk >= 1 && kNumTopk <= 32, "top-k out of range");
    static_assert(kNumRanks >= 1 && kNumRanks <= 32, "a token's ranks are a 32-bit mask");
    // Up to 8 ranks are served in one pass over the tokens, more in groups of 4 (a pass each): the
    // per-rank counts live in registers, and that is what fits beside the scans without spills.
    constexpr int kGroup = kNumRanks <= 8 ? kNumRanks : 4;
    __shared__ int expert_counts[kMaxExperts];
    __shared__ int warp_sums[kLayoutThreads / 32];

    const int local_idx = blockIdx.x;
    const int token_begin = token_offsets[local_idx];
    const int num_tokens = token_offsets[local_idx + 1] - token_begin;
    const int experts_per_rank = num_experts / kNumRanks;
    for (int e = threadIdx.x; e < num_experts; e += kLayoutThreads)
        expert_counts[e] = 0;
    __syncthreads();

    // Each thread owns a contiguous range of tokens so that one scan orders them
    int begin, end;
    channel_token_range(num_tokens, kLayoutThreads, threadIdx.x, begin, end);

#pragma unroll 1
    for (int first_rank = 0; first_rank < kNumRanks; first_rank += kGroup) {
        // Count per rank of the group (registers); per expert (shared atomics) in the first pass
        int rank_counts[kGroup];
#pragma unroll
        for (int r = 0; r < kGroup; ++r)
            rank_counts[r] = 0;
        for (int t = begin; t < end; ++t) {
            const uint32_t rank_mask =
                token_rank_mask<kNumTopk>(topk_idx + static_cast<int64_t>(token_begin + t) * kNumTopk,
                                          experts_per_rank, first_rank == 0, expert_counts) >>
                first_rank;
#pragma unroll
            for (int r = 0; r < kGroup; ++r)
                rank_counts[r] += (rank_mask >> r) & 1u;
        }

        // Scan per rank (in place: the counts become this thread's first position); then write the
        // positions in token order
#pragma unroll
        for (int r = 0; r < kGroup; ++r) {
            int total;
            rank_counts[r] = block_exclusive_scan<kLayoutThreads>(rank_counts[r], warp_sums, total);
            if (threadIdx.x == 0 && first_rank + r < kNumRanks)
                num_tokens_per_rank[local_idx * kNumRanks + first_rank + r] = total;
        }
        for (int t = begin; t < end; ++t) {
            const uint32_t rank_mask =
                token_rank_mask<kNumTopk>(topk_idx + static_cast<int64_t>(token_begin + t) * kNumTopk,
                                          experts_per_rank, false, expert_counts) >>
                first_rank;
            const int64_t out = static_cast<int64_t>(token_begin + t) * kNumRanks + first_rank;
#pragma unroll
            for (int r = 0; r < kGroup; ++r) {
                if (first_rank + r >= kNumRanks)
                    break;
                const bool in_rank = (rank_mask >> r) & 1u;
                if (is_token_in_rank != nullptr)  // dispatch does not need it
                    is_token_in_rank[out + r] = in_rank;
                send_pos[out + r] = in_rank ? rank_counts[r]++ : -1;
            }
        }
    }

    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += kLayoutThreads)
        num_tokens_per_expert[static_cast<int64_t>(local_idx) * num_experts + e] = expert_counts[e];
}

}  // namespace commkit
