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

template <int kNumRanks, int kNumTopk>
__global__ void __launch_bounds__(kLayoutThreads, 1)
    layout_kernel(const int64_t* topk_idx, const int* token_offsets, int num_experts, int* num_tokens_per_rank,
                  int* num_tokens_per_expert, bool* is_token_in_rank, int* send_pos) {
    static_assert(kNumTopk >= 1 && kNumTopk <= 32, "top-k out of range");
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

    // Count per rank (registers) and per expert (shared atomics)
    int rank_counts[kNumRanks];
#pragma unroll
    for (int r = 0; r < kNumRanks; ++r)
        rank_counts[r] = 0;
    for (int t = begin; t < end; ++t) {
        const int64_t* row = topk_idx + static_cast<int64_t>(token_begin + t) * kNumTopk;
        int64_t experts[kNumTopk];
#pragma unroll
        for (int k = 0; k < kNumTopk; ++k)
            experts[k] = ptx::ld_nc_s64(row + k);
        uint32_t rank_mask = 0;
#pragma unroll
        for (int k = 0; k < kNumTopk; ++k) {
            if (experts[k] < 0)
                continue;
            bool first = true;  // a token counts once per expert even if top-k repeats it
#pragma unroll
            for (int j = 0; j < k; ++j)
                first &= experts[j] != experts[k];
            if (first)
                atomicAdd_block(&expert_counts[experts[k]], 1);
            rank_mask |= 1u << (static_cast<int>(experts[k]) / experts_per_rank);
        }
#pragma unroll
        for (int r = 0; r < kNumRanks; ++r)
            rank_counts[r] += (rank_mask >> r) & 1u;
    }

    // Scan per rank; then write positions in token order
    int rank_base[kNumRanks];
#pragma unroll
    for (int r = 0; r < kNumRanks; ++r) {
        int total;
        rank_base[r] = block_exclusive_scan<kLayoutThreads>(rank_counts[r], warp_sums, total);
        if (threadIdx.x == 0)
            num_tokens_per_rank[local_idx * kNumRanks + r] = total;
    }
    for (int t = begin; t < end; ++t) {
        const int64_t* row = topk_idx + static_cast<int64_t>(token_begin + t) * kNumTopk;
        uint32_t rank_mask = 0;
#pragma unroll
        for (int k = 0; k < kNumTopk; ++k) {
            const int64_t e = ptx::ld_nc_s64(row + k);
            if (e >= 0)
                rank_mask |= 1u << (static_cast<int>(e) / experts_per_rank);
        }
        const int64_t out = static_cast<int64_t>(token_begin + t) * kNumRanks;
#pragma unroll
        for (int r = 0; r < kNumRanks; ++r) {
            const bool in_rank = (rank_mask >> r) & 1u;
            if (is_token_in_rank != nullptr)  // dispatch does not need it
                is_token_in_rank[out + r] = in_rank;
            send_pos[out + r] = in_rank ? rank_base[r]++ : -1;
        }
    }

    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += kLayoutThreads)
        num_tokens_per_expert[static_cast<int64_t>(local_idx) * num_experts + e] = expert_counts[e];
}

}  // namespace commkit
