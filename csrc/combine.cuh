// Combine: send each received row back to its source and sum the returned rows per token.
//
// Grid as dispatch: num_channels blocks per rank, channel c owns the token range c of each source rank
// (a source's range is computed from its token count, exchanged by the notify of the dispatch).
//   warps 0-7   senders: group g (8 / R warps) sends this rank's rows that came from rank g and whose
//               source token lies in channel c (a contiguous run, found by binary search because rows
//               are ordered by source token) into the queue (c, src = this rank) of rank g;
//   warps 8-15  reducers: walk the channel's tokens of this rank in order; for token t and each rank d
//               in ascending order that t went to, the next row of queue (c, d) is t's row from d
//               (both sides follow token order); acc = +0.0f, acc += row_d for d = 0..R-1, then RNE to
//               bf16. Each of the 8 warps owns a slice of the hidden dimension.
// Queue protocol as in dispatch (tail/head, kChunk, group barrier before each release) except that the
// reducer knows how many rows to expect, so no end marker; the sender publishes its last tail only if
// it is not already published, so that every counter's last write is one its reader waits for.
#pragma once

#include "csrc/copy.cuh"
#include "csrc/notify.cuh"

namespace commkit {

template <int kNumRanks, int kHidden>
struct CombineConfig {
    static_assert(kHidden % 8 == 0, "rows move in 16-byte words");
    static constexpr int kRowBytes = kHidden * 2;
    static constexpr int kRowInt4 = kRowBytes / 16;
    static constexpr int kMetaOffset = static_cast<int>(align_up(kRowBytes, 16));
    static constexpr int kSlotBytes = kMetaOffset + 16;  // [src_token, pad x 3]
    static constexpr int kWarpsPerPeer = RoleSplit<kNumRanks>::kWarpsPerPeer;
    static constexpr int kReduceThreads = kNumRoleWarps * 32;
    static constexpr int kReduceIters = ceil_div(kRowInt4, kReduceThreads);  // 16-byte words per lane
    static constexpr int kReduceBarrierId = 15;
    static_assert(kHidden <= kMaxHidden, "the reducer's accumulators would spill (see kMaxHidden)");
};

// First index in [lo, hi) whose value is >= key (values ascending).
__device__ __forceinline__ int lower_bound(const int* values, int lo, int hi, int key) {
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (values[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

template <int kNumRanks, int kHidden>
__global__ void __launch_bounds__(kNumThreads, 1)
    combine_kernel(const uint64_t* peer_bases, int rank_base, int num_channels, int max_channels, int num_experts,
                   const int* token_offsets, const void* x, const int* recv_row_offsets, const int* recv_src_token,
                   const int* meta, const int* status, const int* send_pos, void* out, int64_t timeout_ns) {
    using Cfg = CombineConfig<kNumRanks, kHidden>;
    constexpr int kWarpsPerPeer = Cfg::kWarpsPerPeer;
    constexpr int kGroupThreads = kWarpsPerPeer * 32;

    const BlockRank me = block_rank(rank_base, num_channels);
    const int warp = threadIdx.x / 32, lane = ptx::lane_id();
    const int num_local_experts = num_experts / kNumRanks;
    const int meta_stride = 2 * kNumRanks + 1 + num_local_experts;
    const int* my_meta = meta + me.local_idx * meta_stride;
    uint8_t* own = peer_base(peer_bases, me.rank);

    // The ranks disagreed on the call (every one of them skips: no queue is touched): poison the rows
    if (status[me.local_idx * kStatusInts + kStatusVerdict] != kAgreed) {
        const int token_begin = token_offsets[me.local_idx];
        poison_words(static_cast<int*>(out) + int64_t{token_begin} * (kHidden / 2),
                     int64_t{token_offsets[me.local_idx + 1] - token_begin} * (kHidden / 2), me.channel, num_channels);
        return;
    }

    if (warp < kNumRoleWarps) {
        // ---------------- sender: rows that came from `peer` in channel c -> queue (c, me) of `peer`
        const int peer = warp / kWarpsPerPeer;
        const int warp_in_group = warp % kWarpsPerPeer;
        const int thread_in_group = warp_in_group * 32 + lane;
        if (peer < kNumRanks) {
            const int row_base = recv_row_offsets[me.local_idx];
            int token_begin, token_end;
            channel_token_range(my_meta[kNumRanks + 1 + peer], num_channels, me.channel, token_begin, token_end);
            const int* src_tokens = recv_src_token + row_base;
            const int row_begin = lower_bound(src_tokens, my_meta[peer], my_meta[peer + 1], token_begin);
            const int row_end = lower_bound(src_tokens, row_begin, my_meta[peer + 1], token_end);

            uint8_t* dst_base = peer_base(peer_bases, peer);
            int* tail = counter_ptr(dst_base, max_channels, kCombineTail, me.channel, me.rank);
            const int* head = counter_ptr(own, max_channels, kCombineHead, me.channel, peer);
            const WaitContext ctx{"combine", me.rank, me.channel, kRoleSender, peer, timeout_ns};
            int sent = 0, cached_head = 0;
            for (int row = row_begin; row < row_end; ++row) {
                // Wait for the reducer to free the slot
                if (sent - cached_head >= kNumSlots)
                    cached_head = warp_wait_until(
                        head, [sent](int value) { return sent - value < kNumSlots; }, sent - kNumSlots + 1, ctx);
                uint8_t* slot = slot_ptr(dst_base, max_channels, Cfg::kSlotBytes, me.channel, me.rank,
                                         sent % kNumSlots);
                copy_row<Cfg::kRowInt4, kGroupThreads, true>(
                    reinterpret_cast<int4*>(slot),
                    reinterpret_cast<const int4*>(static_cast<const uint8_t*>(x) +
                                                  int64_t{row_base + row} * Cfg::kRowBytes),
                    thread_in_group);
                if (thread_in_group == 0)
                    *reinterpret_cast<int*>(slot + Cfg::kMetaOffset) = src_tokens[row];
                ++sent;
                if (sent % kChunk == 0) {
                    group_sync<kWarpsPerPeer>(1 + peer);
                    if (thread_in_group == 0)
                        ptx::st_release_sys(tail, sent);
                }
            }
            group_sync<kWarpsPerPeer>(1 + peer);
            if (thread_in_group == 0) {
                if (sent % kChunk != 0)
                    ptx::st_release_sys(tail, sent);
                wait_until(head, [sent](int value) { return value >= sent; }, sent, ctx);
            }
        }
    } else {
        // ---------------- reducers: this rank's channel tokens, rows from every rank in rank order
        const int reduce_warp = warp - kNumRoleWarps;
        const int token_base = token_offsets[me.local_idx];
        int token_begin, token_end;
        channel_token_range(token_offsets[me.local_idx + 1] - token_base, num_channels, me.channel, token_begin,
                            token_end);
        const WaitContext ctx{"combine", me.rank, me.channel, kRoleReducer, -1, timeout_ns};
        int consumed[kNumRanks], available[kNumRanks], published[kNumRanks];
#pragma unroll
        for (int d = 0; d < kNumRanks; ++d)
            consumed[d] = available[d] = published[d] = 0;

        auto publish_heads = [&]() {
            ptx::named_barrier_sync(Cfg::kReduceBarrierId, Cfg::kReduceThreads);
#pragma unroll
            for (int d = 0; d < kNumRanks; ++d) {
                if (consumed[d] != published[d] && reduce_warp == 0 && lane == d)
                    ptx::st_release_sys(
                        counter_ptr(peer_base(peer_bases, d), max_channels, kCombineHead, me.channel, me.rank),
                        consumed[d]);
                published[d] = consumed[d];
            }
        };

        for (int t = token_begin; t < token_end; ++t) {
            float acc[Cfg::kReduceIters][8];
#pragma unroll
            for (int j = 0; j < Cfg::kReduceIters; ++j)
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    acc[j][e] = 0.0f;

#pragma unroll
            for (int d = 0; d < kNumRanks; ++d) {
                if (ptx::ld_nc_s32(send_pos + int64_t{token_base + t} * kNumRanks + d) < 0)
                    continue;
                // Wait for rank d's row of this token
                if (consumed[d] == available[d]) {
                    const int target = consumed[d];
                    WaitContext peer_ctx = ctx;
                    peer_ctx.peer = d;
                    available[d] = warp_wait_until(
                        counter_ptr(own, max_channels, kCombineTail, me.channel, d),
                        [target](int value) { return value > target; }, target + 1, peer_ctx);
                }
                const uint8_t* slot = slot_ptr(own, max_channels, Cfg::kSlotBytes, me.channel, d,
                                               consumed[d] % kNumSlots);
                if (lane == 0 && reduce_warp == 0) {
                    const int src_token = ptx::ld_s32_no_allocate(reinterpret_cast<const int*>(slot + Cfg::kMetaOffset));
                    if (src_token != t)  // NOTE: cannot happen unless the handle does not match the data
                        report_and_trap("combine row order", me.rank, me.channel, kRoleReducer, d, t, src_token);
                }
                const int4* row = reinterpret_cast<const int4*>(slot);
#pragma unroll
                for (int j = 0; j < Cfg::kReduceIters; ++j) {
                    const int idx = reduce_warp * 32 + lane + j * Cfg::kReduceThreads;
                    if (idx < Cfg::kRowInt4) {
                        const int4 raw = ptx::ld_v4_no_allocate(row + idx);
                        const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
                        for (int p = 0; p < 4; ++p) {
                            const float2 f = __bfloat1622float2(pairs[p]);
                            acc[j][2 * p] = __fadd_rn(acc[j][2 * p], f.x);
                            acc[j][2 * p + 1] = __fadd_rn(acc[j][2 * p + 1], f.y);
                        }
                    }
                }
                ++consumed[d];
            }

            // Round to bf16 and store
            int4* out_row = reinterpret_cast<int4*>(static_cast<uint8_t*>(out) + int64_t{token_base + t} * Cfg::kRowBytes);
#pragma unroll
            for (int j = 0; j < Cfg::kReduceIters; ++j) {
                const int idx = reduce_warp * 32 + lane + j * Cfg::kReduceThreads;
                if (idx < Cfg::kRowInt4) {
                    int4 packed;
                    auto* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
                    for (int p = 0; p < 4; ++p)
                        pairs[p] = __floats2bfloat162_rn(acc[j][2 * p], acc[j][2 * p + 1]);
                    ptx::st_v4_no_allocate(out_row + idx, packed);
                }
            }

            // Free the slots of a chunk of tokens
            if ((t - token_begin + 1) % kChunk == 0)
                publish_heads();
        }
        publish_heads();
    }

    // Every peer's last write into this rank's counters of this channel was observed: zero them
    __syncthreads();
    if (threadIdx.x < kNumRanks) {
        *counter_ptr(own, max_channels, kCombineTail, me.channel, threadIdx.x) = 0;
        *counter_ptr(own, max_channels, kCombineHead, me.channel, threadIdx.x) = 0;
    }
}

}  // namespace commkit
