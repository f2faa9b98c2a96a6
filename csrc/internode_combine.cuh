// Internode combine: the mirror of internode dispatch. Expert outputs go over NVLink to the forwarding
// GPU of their source's rail, which sums each token's rows (float32) into one bf16 partial per node and
// sends it over the inter-node hop to the source, which sums the partials of its nodes.
//
// Grid as dispatch. Block of 16 warps, rank (n, j), channel c:
//   warps 0-7   NVLink senders: group g' (8 / G warps) sends to forwarder (n, g') the rows this rank
//               received from the sources (m, g'), m = 0..N-1 in this order, each source's rows of
//               channel c (source tokens in its range c: a contiguous run, found by binary search) in
//               token order, into the NVLink queue (c, src local j) of rank (n, g');
//   warps 8-11  forwarder-reducers (one group): for m = 0..N-1, the records of dispatch for source
//               (m, local) whose token is in channel c, in order: for each GPU j' of the record's mask in
//               ascending order, the next row of queue (c, j') is the token's row from j'; acc = +0.0f,
//               acc += row (float32, __fadd_rn), RNE to bf16: the node's partial, put into the net queue
//               (c, src node n) of the source (own node: a loopback);
//   warps 12-15 final reducers (one group): walk this rank's channel-c tokens in order; for each node m
//               in ascending order that the token reached, the next slot of net queue (c, m) is its
//               partial; acc = +0.0f, acc += partial, RNE to bf16 (commkit.reference's two-level rule).
// No deadlock: NVLink senders wait for forwarder-reducers, which serve the sources in the same order
// (m ascending) as the senders send; a forwarder-reducer waits for the source's final reducer, which
// needs partials of its smallest unfinished token from every node; every forwarder serves sources in
// ascending order, so the smallest source being served always progresses.
// NVLink slot: [bf16 row][src_token, src_rank, pad x 2]. Net slot: [bf16 row][src_token, pad x 3].
#pragma once

#include <cuda_bf16.h>

#include "csrc/combine.cuh"
#include "csrc/net.cuh"

namespace commkit {

// kFwdWarps: warps of the forwarder-reducers (role split, configured and tuned from the host); the
// final reducers have the other kNumRoleWarps - kFwdWarps.
template <int kGpusPerNode, int kNumNodes, int kHidden, int kFwdWarps_ = 4>
struct InterCombineConfig {
    static_assert(kFwdWarps_ >= 1 && kFwdWarps_ < kNumRoleWarps, "1 to 7 forwarder-reducer warps");
    static_assert(kNumNodes >= 2 && kNumNodes <= kMaxNodes, "2 to kMaxNodes nodes");
    static_assert(kGpusPerNode >= 1 && kGpusPerNode <= kMaxRanks, "1 to 8 GPUs per node");
    static_assert(kHidden % 8 == 0, "rows move in 16-byte words");
    static constexpr int kNumRanks = kNumNodes * kGpusPerNode;
    static constexpr int kRowBytes = kHidden * 2;
    static constexpr int kRowInt4 = kRowBytes / 16;
    static constexpr int kMetaOffset = static_cast<int>(align_up(kRowBytes, 16));
    static constexpr int kSlotBytes = kMetaOffset + 16;  // NVLink and net slots alike
    static constexpr int kSendWarpsPerPeer = kNumRoleWarps / kGpusPerNode > 0 ? kNumRoleWarps / kGpusPerNode : 1;
    static constexpr int kFwdWarps = kFwdWarps_, kFinalWarps = kNumRoleWarps - kFwdWarps_;
    static constexpr int kFwdWarp = kNumRoleWarps, kFinalWarp = kNumRoleWarps + kFwdWarps;
    static constexpr int kFwdThreads = kFwdWarps * 32, kFinalThreads = kFinalWarps * 32;
    static constexpr int kFwdBarrierId = 1 + kGpusPerNode, kFinalBarrierId = 2 + kGpusPerNode;
    static_assert(kFinalBarrierId < 16, "out of named barriers");
};

// acc[0..7] += the 8 bf16 of `word` (float32, round to nearest even).
__device__ __forceinline__ void add_bf16x8(float* acc, const int4& word) {
    const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&word);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const float2 f = __bfloat1622float2(pairs[p]);
        acc[2 * p] = __fadd_rn(acc[2 * p], f.x);
        acc[2 * p + 1] = __fadd_rn(acc[2 * p + 1], f.y);
    }
}

__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
    int4 word;
    auto* pairs = reinterpret_cast<__nv_bfloat162*>(&word);
#pragma unroll
    for (int p = 0; p < 4; ++p)
        pairs[p] = __floats2bfloat162_rn(acc[2 * p], acc[2 * p + 1]);
    return word;
}

template <typename Net, int kGpusPerNode, int kNumNodes, int kHidden, int kFwdWarps = 4>
__global__ void __launch_bounds__(kNumThreads, 1)
    internode_combine_kernel(const Net* net_ptr, const uint64_t* peer_bases, int rank_base, int num_channels, int num_experts,
                             const int* token_offsets, const void* x, const int* recv_row_offsets,
                             const int* recv_src_token, const int* meta, const int* node_send_pos,
                             const int* fwd_offsets, const int* fwd_mask, const int* fwd_token, void* out,
                             int64_t timeout_ns) {
    using Cfg = InterCombineConfig<kGpusPerNode, kNumNodes, kHidden, kFwdWarps>;
    constexpr int kNumRanks = Cfg::kNumRanks;
    constexpr int kG = kGpusPerNode;

    const BlockRank me = block_rank(rank_base, num_channels);
    const Net& net = *net_ptr;  // in device memory: a GinNet holds NCCL's device communicator
    // NOTE: the view lives in shared memory, read where used (see internode_dispatch.cuh)
    __shared__ typename Net::View s_view;
    if (threadIdx.x == 0)
        s_view = net.at(me.rank);
    __syncthreads();
    const auto& view = s_view;
    const InterLayout& lay = net.layout;
    const int node = me.rank / kG, local = me.rank % kG;
    const int warp = threadIdx.x / 32, lane = ptx::lane_id();
    const int num_local_experts = num_experts / kNumRanks;
    const int meta_stride = 2 * kNumRanks + 1 + num_local_experts;
    const int* my_meta = meta + me.local_idx * meta_stride;
    uint8_t* own = peer_base(peer_bases, me.rank);

    __shared__ int s_nvl_consumed[kG];
    __shared__ int s_nvl_available[kG];
    __shared__ int s_net_consumed[kNumNodes];
    __shared__ int s_net_available[kNumNodes];
    __shared__ int s_net_total[kNumNodes];

    if (warp < kNumRoleWarps) {
        // ---------------- NVLink senders: rows of sources (m, peer) -> queue (c, local) of rank (n, peer)
        constexpr int kWarpsPerPeer = Cfg::kSendWarpsPerPeer;
        constexpr int kThreads = kWarpsPerPeer * 32;
        const int peer = warp / kWarpsPerPeer;
        const int thread_in_group = (warp % kWarpsPerPeer) * 32 + lane;
        if (peer < kG) {
            uint8_t* dst_base = peer_base(peer_bases, node * kG + peer);
            int* tail = counter_ptr(dst_base, lay.max_channels, kCombineTail, me.channel, local);
            const int* head = counter_ptr(own, lay.max_channels, kCombineHead, me.channel, peer);
            const WaitContext ctx{"combine", me.rank, me.channel, kRoleSender, node * kG + peer, timeout_ns};
            const int row_base = recv_row_offsets[me.local_idx];
            const int* src_tokens = recv_src_token + row_base;
            int sent = 0, cached_head = 0;
            for (int m = 0; m < kNumNodes; ++m) {
                const int src = m * kG + peer;
                int token_begin, token_end;
                channel_token_range(my_meta[kNumRanks + 1 + src], num_channels, me.channel, token_begin, token_end);
                const int row_begin = lower_bound(src_tokens, my_meta[src], my_meta[src + 1], token_begin);
                const int row_end = lower_bound(src_tokens, row_begin, my_meta[src + 1], token_end);
                for (int row = row_begin; row < row_end; ++row) {
                    if (sent - cached_head >= kNumSlots)
                        cached_head = warp_wait_until(
                            head, [sent](int v) { return sent - v < kNumSlots; }, sent - kNumSlots + 1, ctx);
                    uint8_t* slot = lay.nvl_slot(dst_base, me.channel, local, sent % kNumSlots);
                    copy_row<Cfg::kRowInt4, kThreads, true>(
                        reinterpret_cast<int4*>(slot),
                        reinterpret_cast<const int4*>(static_cast<const uint8_t*>(x) +
                                                      int64_t{row_base + row} * Cfg::kRowBytes),
                        thread_in_group);
                    if (thread_in_group == 0) {
                        reinterpret_cast<int*>(slot + Cfg::kMetaOffset)[0] = src_tokens[row];
                        reinterpret_cast<int*>(slot + Cfg::kMetaOffset)[1] = src;
                    }
                    ++sent;
                    if (sent % kChunk == 0) {
                        group_sync<kWarpsPerPeer>(1 + peer);
                        if (thread_in_group == 0)
                            ptx::st_release_sys(tail, sent);
                    }
                }
            }
            group_sync<kWarpsPerPeer>(1 + peer);
            if (thread_in_group == 0) {
                if (sent % kChunk != 0)
                    ptx::st_release_sys(tail, sent);
                wait_until(head, [sent](int v) { return v >= sent; }, sent, ctx);
            }
        }
    } else if (warp < Cfg::kFinalWarp) {
        // ---------------- forwarder-reducers: node partials of the sources (m, local) -> their net queues
        const int tid = threadIdx.x - Cfg::kFwdWarp * 32;
        const WaitContext ctx0{"combine forwarder", me.rank, me.channel, kRoleReducer, -1, timeout_ns};
        if (tid < kG) {
            s_nvl_consumed[tid] = 0;
            s_nvl_available[tid] = 0;
        }
        group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
        for (int m = 0; m < kNumNodes; ++m) {
            const int src = m * kG + local;
            WaitContext ctx = ctx0;
            ctx.peer = src;
            int token_begin, token_end;
            channel_token_range(my_meta[kNumRanks + 1 + src], num_channels, me.channel, token_begin, token_end);
            const int* my_fwd = fwd_offsets + me.local_idx * (kNumNodes + 1);
            const int k_begin = lower_bound(fwd_token, my_fwd[m], my_fwd[m + 1], token_begin);
            const int k_end = lower_bound(fwd_token, k_begin, my_fwd[m + 1], token_end);
            int sent = 0, cached_head = 0;
            for (int k = k_begin; k < k_end; ++k) {
                const int mask = fwd_mask[k];
                const int src_token = fwd_token[k];
                // The next row of every queue of the mask must be there (thread 0 waits; barrier)
                if (tid == 0) {
                    for (int bits = mask; bits != 0; bits &= bits - 1) {
                        const int jj = __ffs(bits) - 1;
                        const int need = s_nvl_consumed[jj];
                        if (s_nvl_available[jj] <= need) {
                            WaitContext jctx = ctx;
                            jctx.peer = node * kG + jj;
                            s_nvl_available[jj] = wait_until(
                                counter_ptr(own, lay.max_channels, kCombineTail, me.channel, jj),
                                [need](int v) { return v > need; }, need + 1, jctx);
                        }
                    }
                    if (sent - cached_head >= kNetSlots)
                        cached_head = wait_signal(
                            view, kNetCombineHead, me.channel, m, [sent](int v) { return sent - v < kNetSlots; },
                            sent - kNetSlots + 1, ctx);
                }
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                uint8_t* dst = view.send_slot(m, me.channel, sent % kNetSlots);
                for (int w = tid; w < Cfg::kRowInt4; w += Cfg::kFwdThreads) {
                    float acc[8];
#pragma unroll
                    for (int e = 0; e < 8; ++e)
                        acc[e] = 0.0f;
                    for (int bits = mask; bits != 0; bits &= bits - 1) {
                        const int jj = __ffs(bits) - 1;
                        const uint8_t* slot = lay.nvl_slot(own, me.channel, jj, s_nvl_consumed[jj] % kNumSlots);
                        add_bf16x8(acc, ptx::ld_v4_no_allocate(reinterpret_cast<const int4*>(slot) + w));
                    }
                    ptx::st_v4_no_allocate(reinterpret_cast<int4*>(dst) + w, pack_bf16x8(acc));
                }
                if (tid == 0)
                    reinterpret_cast<int*>(dst + Cfg::kMetaOffset)[0] = src_token;
                // Check the rows' source tokens, free the NVLink slots, publish the partial
                if (tid < kG && (mask >> tid & 1)) {
                    const uint8_t* slot = lay.nvl_slot(own, me.channel, tid, s_nvl_consumed[tid] % kNumSlots);
                    const int got = ptx::ld_s32_no_allocate(reinterpret_cast<const int*>(slot + Cfg::kMetaOffset));
                    if (got != src_token)
                        report_and_trap("combine forwarder: row out of order", me.rank, me.channel, kRoleReducer,
                                        node * kG + tid, src_token, got);
                }
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                // NOTE: every thread of the group counts the partial: each one writes its words of the
                // next partial into slot `sent` (thread 0 alone counting sent every other thread's
                // words of every partial into slot 0: wrong rows, found by the host execution)
                ++sent;
                if (tid == 0) {
                    for (int bits = mask; bits != 0; bits &= bits - 1) {
                        const int jj = __ffs(bits) - 1;
                        const int consumed = ++s_nvl_consumed[jj];
                        if (consumed % kChunk == 0)
                            ptx::st_release_sys(counter_ptr(peer_base(peer_bases, node * kG + jj), lay.max_channels,
                                                            kCombineHead, me.channel, local),
                                                consumed);
                    }
                    if (sent % kNetChunk == 0)
                        view.put_signal(m, me.channel, (sent - kNetChunk) % kNetSlots, kNetChunk, kNetCombineTail,
                                        kNetChunk);
                }
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
            }
            if (tid == 0) {
                const int rest = sent % kNetChunk;
                if (rest != 0)
                    view.put_signal(m, me.channel, (sent - rest) % kNetSlots, rest, kNetCombineTail, rest);
                s_net_total[m] = sent;
            }
        }
        // Free the last NVLink slots, then wait until every source took every partial
        if (tid == 0) {
            for (int jj = 0; jj < kG; ++jj)
                if (s_nvl_consumed[jj] % kChunk != 0)
                    ptx::st_release_sys(counter_ptr(peer_base(peer_bases, node * kG + jj), lay.max_channels,
                                                    kCombineHead, me.channel, local),
                                        s_nvl_consumed[jj]);
            for (int m = 0; m < kNumNodes; ++m) {
                const int total = s_net_total[m];
                WaitContext ctx = ctx0;
                ctx.peer = m * kG + local;
                wait_signal(
                    view, kNetCombineHead, me.channel, m, [total](int v) { return v >= total; }, total, ctx);
            }
        }
    } else {
        // ---------------- final reducers: node partials of this rank's channel tokens -> out
        const int tid = threadIdx.x - Cfg::kFinalWarp * 32;
        const WaitContext ctx0{"combine", me.rank, me.channel, kRoleReducer, -1, timeout_ns};
        const int token_base = token_offsets[me.local_idx];
        int token_begin, token_end;
        channel_token_range(token_offsets[me.local_idx + 1] - token_base, num_channels, me.channel, token_begin,
                            token_end);
        if (tid < kNumNodes) {
            s_net_consumed[tid] = 0;
            s_net_available[tid] = 0;
        }
        group_sync<Cfg::kFinalWarps>(Cfg::kFinalBarrierId);
        for (int t = token_base + token_begin; t < token_base + token_end; ++t) {
            const int* in_node = node_send_pos + int64_t{t} * kNumNodes;
            if (tid == 0) {
                for (int m = 0; m < kNumNodes; ++m) {
                    const int need = s_net_consumed[m];
                    if (ptx::ld_nc_s32(in_node + m) >= 0 && s_net_available[m] <= need) {
                        WaitContext ctx = ctx0;
                        ctx.peer = m * kG + local;
                        s_net_available[m] = wait_signal(
                            view, kNetCombineTail, me.channel, m, [need](int v) { return v > need; }, need + 1, ctx);
                    }
                }
            }
            group_sync<Cfg::kFinalWarps>(Cfg::kFinalBarrierId);
            for (int w = tid; w < Cfg::kRowInt4; w += Cfg::kFinalThreads) {
                float acc[8];
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    acc[e] = 0.0f;
                for (int m = 0; m < kNumNodes; ++m) {
                    if (ptx::ld_nc_s32(in_node + m) < 0)
                        continue;
                    const uint8_t* slot = view.recv_slot(me.channel, m, s_net_consumed[m] % kNetSlots);
                    add_bf16x8(acc, ptx::ld_v4_no_allocate(reinterpret_cast<const int4*>(slot) + w));
                }
                ptx::st_v4_no_allocate(
                    reinterpret_cast<int4*>(static_cast<uint8_t*>(out) + int64_t{t} * Cfg::kRowBytes) + w,
                    pack_bf16x8(acc));
            }
            if (tid < kNumNodes && ptx::ld_nc_s32(in_node + tid) >= 0) {
                const uint8_t* slot = view.recv_slot(me.channel, tid, s_net_consumed[tid] % kNetSlots);
                const int got = ptx::ld_s32_no_allocate(reinterpret_cast<const int*>(slot + Cfg::kMetaOffset));
                if (got != t - token_base)
                    report_and_trap("combine: partial out of order", me.rank, me.channel, kRoleReducer,
                                    tid * kG + local, t - token_base, got);
            }
            group_sync<Cfg::kFinalWarps>(Cfg::kFinalBarrierId);
            if (tid == 0) {
                for (int m = 0; m < kNumNodes; ++m) {
                    if (ptx::ld_nc_s32(in_node + m) < 0)
                        continue;
                    const int consumed = ++s_net_consumed[m];
                    if (consumed % kNetChunk == 0)
                        view.signal_add(m, kNetCombineHead, me.channel, kNetChunk);
                }
            }
            group_sync<Cfg::kFinalWarps>(Cfg::kFinalBarrierId);
        }
        if (tid < kNumNodes && s_net_consumed[tid] % kNetChunk != 0)
            view.signal_add(tid, kNetCombineHead, me.channel, s_net_consumed[tid] % kNetChunk);
    }

    // Every peer's last write into this rank's counters and signals of this channel was observed
    __syncthreads();
    if (threadIdx.x < kG) {
        *counter_ptr(own, lay.max_channels, kCombineTail, me.channel, threadIdx.x) = 0;
        *counter_ptr(own, lay.max_channels, kCombineHead, me.channel, threadIdx.x) = 0;
    }
    if (threadIdx.x < kNumNodes) {
        view.reset_signal(kNetCombineTail, me.channel, threadIdx.x);
        view.reset_signal(kNetCombineHead, me.channel, threadIdx.x);
    }
}

}  // namespace commkit
