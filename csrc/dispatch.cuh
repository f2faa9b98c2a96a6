// Dispatch: send each token's row to the ranks that host its experts.
//
// Grid: num_channels blocks per rank (the SM budget; persistent, one block per SM), all ranks' blocks
// resident. Channel c of a rank owns the contiguous token range c of that rank. Block of 16 warps:
//   warps 0-7   senders: group g (8 / R warps) sends the channel's tokens for rank g into the queue
//               (c, src = this rank) of rank g's ring buffer, splitting each row over its warps;
//   warps 8-15  receivers: group g drains the queue (c, src = g) of this rank's ring buffer into the
//               outputs at row recv_row_offset + recv_rank_offset[g] + send_pos.
// Queue protocol (one producer group, one consumer group, kNumSlots slots):
//   sender:   wait head > sent - kNumSlots; write slot sent % kNumSlots; every kChunk rows: group
//             barrier, then st.release.sys tail = sent; at the end tail = sent | kFinishedBit, then wait
//             head == sent (so the consumer's last write lands before this rank zeroes its counters);
//   receiver: ld.acquire.sys tail until it exceeds consumed (or is finished); read slot; every kChunk
//             rows and at the end: group barrier, then st.release.sys head = consumed.
// Both write each counter in increasing order and observe the peer's last write before the block
// zeroes the counters it owns, so the next kernel (after the barrier of its notify) starts from zero.
#pragma once

#include "csrc/copy.cuh"
#include "csrc/notify.cuh"

namespace commkit {

template <int kNumRanks, int kHidden, int kNumTopk, int kDtype>
struct DispatchConfig {
    static_assert(kDtype == kBf16 || kDtype == kFp8 || kDtype == kBf16CastFp8, "unknown dtype");
    static_assert(kNumTopk >= 1 && kNumTopk <= 32, "top-k is copied by one warp");
    static constexpr bool kOutFp8 = kDtype != kBf16;
    static_assert(!kOutFp8 || kHidden % kFp8GroupSize == 0, "FP8 rows need hidden % 128 == 0");
    static_assert(kHidden % 8 == 0, "rows move in 16-byte words");
    static constexpr int kInRowBytes = kDtype == kFp8 ? kHidden : kHidden * 2;
    static constexpr int kRowBytes = kOutFp8 ? kHidden : kHidden * 2;
    static constexpr int kNumScales = kOutFp8 ? kHidden / kFp8GroupSize : 0;
    static constexpr int kScalesOffset = static_cast<int>(align_up(kRowBytes, 16));
    static constexpr int kMetaOffset = kScalesOffset + static_cast<int>(align_up(kNumScales * 4, 16));
    // Slot metadata (int32): [local expert idx x K][weights x K][src_token][send_pos]
    static constexpr int kSlotBytes = static_cast<int>(align_up(kMetaOffset + (2 * kNumTopk + 2) * 4, 16));
    static constexpr int kWarpsPerPeer = RoleSplit<kNumRanks>::kWarpsPerPeer;
};

// The receiving side of one dispatch queue (intranode, and the NVLink hop of internode): waits for the
// tail (or its end), copies each slot's row, scales and [local expert x K][weights x K][src_token] to the
// output row `row_of(slot_meta)`, and releases the head every kChunk rows and at the end. `slot_at(i)` is
// ring slot i. Run by the kWarps warps of one group (named barrier `barrier_id`).
template <typename Row, int kNumTopk, int kWarps, typename SlotAt, typename RowOf>
__device__ __forceinline__ void drain_dispatch_queue(const int* tail, int* head, SlotAt slot_at, RowOf row_of,
                                                     int barrier_id, int warp_in_group, int lane,
                                                     const WaitContext& ctx, void* out_x, float* out_x_scales,
                                                     int64_t* out_topk_idx, float* out_topk_weights,
                                                     int* out_src_token) {
    constexpr int kGroupThreads = kWarps * 32;
    const int thread_in_group = warp_in_group * 32 + lane;
    int consumed = 0, available = 0;
    bool finished = false;
    while (true) {
        // Wait for the sender to publish more rows (or its end)
        if (consumed == available) {
            if (finished)
                break;
            const int value = warp_wait_until(
                tail, [consumed](int v) { return (v & kCountMask) > consumed || (v & kFinishedBit) != 0; },
                consumed + 1, ctx);
            available = value & kCountMask;
            finished = (value & kFinishedBit) != 0;
            continue;
        }

        const uint8_t* slot = slot_at(consumed % kNumSlots);
        const int* slot_meta = reinterpret_cast<const int*>(slot + Row::kMetaOffset);
        const int64_t row = row_of(slot_meta) + (planted(kFaultRowPastOutputs) ? 1 : 0);
        copy_row<Row::kRowBytes / 16, kGroupThreads, false>(
            reinterpret_cast<int4*>(static_cast<uint8_t*>(out_x) + row * Row::kRowBytes),
            reinterpret_cast<const int4*>(slot), thread_in_group);
        if constexpr (Row::kOutFp8)
            for (int i = thread_in_group; i < Row::kNumScales; i += kGroupThreads)
                out_x_scales[row * Row::kNumScales + i] = __int_as_float(
                    ptx::ld_s32_no_allocate(reinterpret_cast<const int*>(slot + Row::kScalesOffset) + i));
        if (warp_in_group == 0) {
            if (lane < kNumTopk) {
                out_topk_idx[row * kNumTopk + lane] = ptx::ld_s32_no_allocate(slot_meta + lane);
                out_topk_weights[row * kNumTopk + lane] =
                    __int_as_float(ptx::ld_s32_no_allocate(slot_meta + kNumTopk + lane));
            }
            if (lane == 0)
                out_src_token[row] = ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk);
        }
        ++consumed;

        // Free a chunk of slots
        if (consumed % kChunk == 0) {
            group_sync<kWarps>(barrier_id);
            if (thread_in_group == 0)
                ptx::st_release_sys(head, consumed);
        }
    }
    if (consumed % kChunk != 0) {
        group_sync<kWarps>(barrier_id);
        if (thread_in_group == 0)
            ptx::st_release_sys(head, consumed);
    }
}

template <int kNumRanks, int kHidden, int kNumTopk, int kDtype>
__global__ void __launch_bounds__(kNumThreads, 1)
    dispatch_kernel(const uint64_t* peer_bases, int rank_base, int num_channels, int max_channels,
                    int num_experts, const int* token_offsets, const void* x, const float* x_scales,
                    const int64_t* topk_idx, const float* topk_weights, const int* send_pos, const int* meta,
                    const int* status, const int* recv_row_offsets, void* out_x, float* out_x_scales, int64_t* out_topk_idx,
                    float* out_topk_weights, int* out_src_token, int64_t timeout_ns) {
    using Cfg = DispatchConfig<kNumRanks, kHidden, kNumTopk, kDtype>;
    constexpr int kWarpsPerPeer = Cfg::kWarpsPerPeer;
    constexpr int kGroupThreads = kWarpsPerPeer * 32;

    const BlockRank me = block_rank(rank_base, num_channels);
    const int warp = threadIdx.x / 32, lane = ptx::lane_id();
    const bool is_sender = warp < kNumRoleWarps;
    const int peer = (warp % kNumRoleWarps) / kWarpsPerPeer;
    const int warp_in_group = (warp % kNumRoleWarps) % kWarpsPerPeer;
    const int thread_in_group = warp_in_group * 32 + lane;
    const int barrier_id = 1 + peer + (is_sender ? 0 : kNumRanks);
    const int num_local_experts = num_experts / kNumRanks;
    uint8_t* own = peer_base(peer_bases, me.rank);

    // The ranks disagreed on the call (every one of them skips: no queue is touched): poison the rows
    if (status[me.local_idx * kStatusInts + kStatusVerdict] != kAgreed) {
        const int row_begin = recv_row_offsets[me.local_idx];
        const int num_rows = meta[me.local_idx * (2 * kNumRanks + 1 + num_local_experts) + kNumRanks];
        constexpr int kRowWords = (Cfg::kOutFp8 ? kHidden : 2 * kHidden) / 4;
        constexpr int kScales = Cfg::kOutFp8 ? kHidden / kFp8GroupSize : 0;
        poison_words(static_cast<int*>(out_x) + int64_t{row_begin} * kRowWords, int64_t{num_rows} * kRowWords,
                     me.channel, num_channels);
        if (kScales > 0)
            poison_words(out_x_scales + int64_t{row_begin} * kScales, int64_t{num_rows} * kScales, me.channel,
                         num_channels);
        poison_words(out_topk_idx + int64_t{row_begin} * kNumTopk, int64_t{num_rows} * kNumTopk * 2, me.channel,
                     num_channels);
        poison_words(out_topk_weights + int64_t{row_begin} * kNumTopk, int64_t{num_rows} * kNumTopk, me.channel,
                     num_channels);
        poison_words(out_src_token + row_begin, num_rows, me.channel, num_channels);
        return;
    }

    if (peer < kNumRanks && is_sender) {
        // ---------------- sender: this rank's channel tokens -> queue (channel, me) of rank `peer`
        const int token_base = token_offsets[me.local_idx];
        int token_begin, token_end;
        channel_token_range(token_offsets[me.local_idx + 1] - token_base, num_channels, me.channel, token_begin,
                            token_end);
        uint8_t* dst_base = peer_base(peer_bases, peer);
        int* tail = counter_ptr(dst_base, max_channels, kDispatchTail, me.channel, me.rank);
        const int* head = counter_ptr(own, max_channels, kDispatchHead, me.channel, peer);
        const WaitContext ctx{"dispatch", me.rank, me.channel, kRoleSender, peer, timeout_ns};
        int sent = 0, cached_head = 0;
        for (int t = token_base + token_begin; t < token_base + token_end; ++t) {
            const int pos = ptx::ld_nc_s32(send_pos + static_cast<int64_t>(t) * kNumRanks + peer);
            if (pos < 0)
                continue;

            // Wait for the receiver to free the slot
            if (sent - cached_head >= kNumSlots)
                cached_head = warp_wait_until(
                    head, [sent](int value) { return sent - value < kNumSlots; }, sent - kNumSlots + 1, ctx);

            uint8_t* slot = slot_ptr(dst_base, max_channels, Cfg::kSlotBytes, me.channel, me.rank,
                                     sent % kNumSlots);
            if constexpr (kDtype == kBf16CastFp8) {
                cast_row_to_fp8<kHidden, kWarpsPerPeer>(
                    slot, reinterpret_cast<float*>(slot + Cfg::kScalesOffset),
                    reinterpret_cast<const int4*>(static_cast<const uint8_t*>(x) + int64_t{t} * Cfg::kInRowBytes),
                    warp_in_group, lane);
            } else {
                copy_row<Cfg::kRowBytes / 16, kGroupThreads, true>(
                    reinterpret_cast<int4*>(slot),
                    reinterpret_cast<const int4*>(static_cast<const uint8_t*>(x) + int64_t{t} * Cfg::kInRowBytes),
                    thread_in_group);
                if constexpr (kDtype == kFp8)
                    copy_words(reinterpret_cast<float*>(slot + Cfg::kScalesOffset),
                               x_scales + int64_t{t} * Cfg::kNumScales, Cfg::kNumScales, thread_in_group,
                               kGroupThreads);
            }
            if (warp_in_group == 0) {
                int* slot_meta = reinterpret_cast<int*>(slot + Cfg::kMetaOffset);
                if (lane < kNumTopk) {
                    // Local expert index on the destination, -1 for experts elsewhere or unused slots
                    const int64_t expert = topk_idx[int64_t{t} * kNumTopk + lane];
                    const int64_t first = int64_t{peer} * num_local_experts;
                    const bool here = expert >= first && expert < first + num_local_experts;
                    slot_meta[lane] = here ? static_cast<int>(expert - first) : -1;
                    reinterpret_cast<float*>(slot_meta)[kNumTopk + lane] = topk_weights[int64_t{t} * kNumTopk + lane];
                }
                if (lane == 0) {
                    slot_meta[2 * kNumTopk] = t - token_base;
                    slot_meta[2 * kNumTopk + 1] = pos;
                }
            }
            ++sent;

            // Publish a chunk of rows
            if (sent % kChunk == 0) {
                if constexpr (!planted(kFaultNoBarrierBeforeRelease))
                    group_sync<kWarpsPerPeer>(barrier_id);
                if (thread_in_group == 0) {
                    if constexpr (planted(kFaultRelaxedTail))
                        ptx::st_relaxed_sys(tail, sent);
                    else
                        ptx::st_release_sys(tail, sent);
                }
            }
        }

        // Publish the rest and the end, then wait until the receiver consumed everything
        group_sync<kWarpsPerPeer>(barrier_id);
        if (thread_in_group == 0) {
            ptx::st_release_sys(tail, sent | kFinishedBit);
            wait_until(head, [sent](int value) { return value >= sent; }, sent, ctx);
        }
    } else if (peer < kNumRanks) {
        // ---------------- receiver: queue (channel, src = peer) of this rank -> outputs
        const int meta_stride = 2 * kNumRanks + 1 + num_local_experts;
        const int row_base = recv_row_offsets[me.local_idx] + meta[me.local_idx * meta_stride + peer];
        const int* tail = counter_ptr(own, max_channels, kDispatchTail, me.channel, peer);
        int* head = counter_ptr(peer_base(peer_bases, peer), max_channels, kDispatchHead, me.channel, me.rank);
        const WaitContext ctx{"dispatch", me.rank, me.channel, kRoleReceiver, peer, timeout_ns};
        drain_dispatch_queue<Cfg, kNumTopk, kWarpsPerPeer>(
            tail, head, [&](int idx) { return slot_ptr(own, max_channels, Cfg::kSlotBytes, me.channel, peer, idx); },
            [&](const int* slot_meta) { return row_base + ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk + 1); },
            barrier_id, warp_in_group, lane, ctx, out_x, out_x_scales, out_topk_idx, out_topk_weights, out_src_token);
    }

    // Every peer's last write into this rank's counters of this channel was observed: zero them
    if constexpr (!planted(kFaultNoBarrierBeforeZeroing))
        __syncthreads();
    if (threadIdx.x < kNumRanks) {
        *counter_ptr(own, max_channels, kDispatchTail, me.channel, threadIdx.x) = 0;
        *counter_ptr(own, max_channels, kDispatchHead, me.channel, threadIdx.x) = 0;
    }
}

}  // namespace commkit
