// Internode dispatch: each token crosses the inter-node hop once per destination node, to the rank with
// the same local index there, whose forwarder pushes it over NVLink to the local GPUs of its experts.
//
// Ranks: N nodes x G GPUs (rank = node * G + local). Grid: num_channels blocks per rank (the SM budget),
// channel c of a rank owns its token range c. Block of 16 warps, rank (n, g), channel c:
//   warps 0-3   net senders: warp w sends, for each remote node m with (index of m among the remote
//               nodes) % 4 == w, the channel's tokens bound for node m (once per token) into the net
//               queue (c, src node n) of rank (m, g), one node after the other;
//   warps 4-7   forwarder: one group; round-robin over the source nodes m = 0..N-1 (its own node m == n
//               reads this rank's x directly: same-node destinations go over NVLink only), takes up to
//               kNetChunk rows at a time and writes each into the NVLink queue (c, src local g) of every
//               GPU j of this node that hosts one of its experts; records, per (source node, position of
//               the token among those the source sends to this node), the mask of GPUs j and the source
//               token: the combine's forwarder replays them;
//   warps 8-15  NVLink receivers: group g' (8 / G warps) drains the queue (c, src local g') into the
//               outputs at row recv_row_offset + recv_rank_offset[src rank] + send_pos (as intranode).
// Queues: the NVLink hop is the intranode ring (counters kDispatchTail/Head, kChunk, kFinishedBit); the
// net hop a ring of kNetSlots slots driven by the Net's signals (kNetDispatchTail: rows put, plus
// kFinishedBit at the end; kNetDispatchHead: rows freed), published every kNetChunk rows.
// No deadlock: receivers wait only for forwarders; a forwarder waits only for receivers (NVLink space)
// and never blocks on an empty net queue (it polls them); net senders wait only for forwarders.
// Net slot: [row][scales][global expert x K][weights x K][src_token][node_pos][send_pos x G], where
// node_pos is the token's position among those its source sends to node m, send_pos[j] its position
// among those it sends to rank (m, j) (-1: none). NVLink slot: [row][scales][local expert x K]
// [weights x K][src_token][src_rank][send_pos].
#pragma once

#include "csrc/dispatch.cuh"
#include "csrc/net.cuh"

namespace commkit {

// kFwdWarps: warps of the forwarder (role split, configured and tuned from the host); the net senders
// have the other kNumRoleWarps - kFwdWarps, the NVLink receivers the second half of the block.
template <int kGpusPerNode, int kNumNodes, int kHidden, int kNumTopk, int kDtype, int kFwdWarps_ = 4>
struct InterDispatchConfig {
    static_assert(kFwdWarps_ >= 1 && kFwdWarps_ < kNumRoleWarps, "1 to 7 forwarder warps");
    using Row = DispatchConfig<kGpusPerNode, kHidden, kNumTopk, kDtype>;  // row format, scales offset
    static_assert(kNumNodes >= 2 && kNumNodes <= kMaxNodes, "2 to kMaxNodes nodes");
    static_assert(kGpusPerNode >= 1 && kGpusPerNode <= kMaxRanks, "1 to 8 GPUs per node");
    static constexpr int kNumRanks = kNumNodes * kGpusPerNode;
    static constexpr int kMetaOffset = Row::kMetaOffset;
    static constexpr int kNetSlotBytes =
        static_cast<int>(align_up(kMetaOffset + (2 * kNumTopk + 2 + kGpusPerNode) * 4, 16));
    static constexpr int kNvlSlotBytes = static_cast<int>(align_up(kMetaOffset + (2 * kNumTopk + 3) * 4, 16));
    static constexpr int kNetSendWarps = kNumRoleWarps - kFwdWarps_;
    static constexpr int kFwdWarps = kFwdWarps_;
    static constexpr int kFwdThreads = kFwdWarps * 32;
    static constexpr int kFwdBarrierId = 1;
    static constexpr int kRecvWarpsPerPeer = kNumRoleWarps / kGpusPerNode > 0 ? kNumRoleWarps / kGpusPerNode : 1;
    static constexpr int kRecvBarrierBase = 2;
    static_assert(kRecvBarrierBase + kGpusPerNode <= 16, "out of named barriers");
};

// Bit j set when one of the token's experts (one per lane < K, -1 or elsewhere: no bit) is on GPU j of
// the node whose experts start at `node_first_expert` (L experts per GPU). Whole warp.
__device__ __forceinline__ int local_gpu_mask(int64_t expert, bool valid_lane, int64_t node_first_expert,
                                              int num_local_experts, int gpus_per_node) {
    int bit = 0;
    if (valid_lane && expert >= node_first_expert &&
        expert < node_first_expert + int64_t{num_local_experts} * gpus_per_node)
        bit = 1 << static_cast<int>((expert - node_first_expert) / num_local_experts);
    return static_cast<int>(__reduce_or_sync(0xffffffffu, static_cast<unsigned>(bit)));
}

// Per-source-node state of a forwarder (shared memory, written by the group's thread 0 between barriers).
struct ForwardState {
    int consumed;   // rows forwarded (remote: net slots freed locally; own node: tokens taken)
    int available;  // rows published by the source (remote) / next token to look at (own node)
    int finished;   // the source published its end
    int done;       // every row forwarded and its head published
};

template <typename Net, int kGpusPerNode, int kNumNodes, int kHidden, int kNumTopk, int kDtype, int kFwdWarps = 4>
__global__ void __launch_bounds__(kNumThreads, 1)
    internode_dispatch_kernel(const Net* net_ptr, const uint64_t* peer_bases, int rank_base, int num_channels,
                              int num_experts, const int* token_offsets, const void* x, const float* x_scales,
                              const int64_t* topk_idx, const float* topk_weights, const int* send_pos,
                              const int* node_send_pos, const int* meta, const int* recv_row_offsets,
                              const int* fwd_offsets, int* fwd_mask, int* fwd_token, void* out_x,
                              float* out_x_scales, int64_t* out_topk_idx, float* out_topk_weights,
                              int* out_src_token, int64_t timeout_ns) {
    using Cfg = InterDispatchConfig<kGpusPerNode, kNumNodes, kHidden, kNumTopk, kDtype, kFwdWarps>;
    using Row = typename Cfg::Row;
    constexpr int kNumRanks = Cfg::kNumRanks;
    constexpr int kG = kGpusPerNode;

    const BlockRank me = block_rank(rank_base, num_channels);
    const Net& net = *net_ptr;  // in device memory: a GinNet holds NCCL's device communicator
    // NOTE: the view lives in shared memory, read where used: held in registers by every role it
    // pushed the GIN builds past the register cap (spills)
    __shared__ typename Net::View s_view;
    if (threadIdx.x == 0)
        s_view = net.at(me.rank);
    __syncthreads();
    const auto& view = s_view;
    const InterLayout& lay = net.layout;
    const int node = me.rank / kG, local = me.rank % kG;
    const int warp = threadIdx.x / 32, lane = ptx::lane_id();
    const int num_local_experts = num_experts / kNumRanks;
    uint8_t* own = peer_base(peer_bases, me.rank);
    const int token_base = token_offsets[me.local_idx];
    int token_begin, token_end;
    channel_token_range(token_offsets[me.local_idx + 1] - token_base, num_channels, me.channel, token_begin,
                        token_end);
    token_begin += token_base;
    token_end += token_base;

    __shared__ ForwardState s_src[kNumNodes];
    __shared__ int s_nvl_sent[kG];
    __shared__ int s_nvl_head[kG];

    if (warp < Cfg::kNetSendWarps) {
        // ---------------- net senders: tokens of this channel -> queue (c, node) of rank (m, local)
        const WaitContext ctx0{"dispatch", me.rank, me.channel, kRoleSender, -1, timeout_ns};
        for (int i = warp; i < kNumNodes - 1; i += Cfg::kNetSendWarps) {
            const int m = i < node ? i : i + 1;  // the i-th remote node
            WaitContext ctx = ctx0;
            ctx.peer = m * kG + local;
            int sent = 0, cached_head = 0;
            for (int t = token_begin; t < token_end; ++t) {
                const int node_pos = ptx::ld_nc_s32(node_send_pos + int64_t{t} * kNumNodes + m);
                if (node_pos < 0)
                    continue;
                if (sent - cached_head >= kNetSlots)
                    cached_head = warp_wait_signal(
                        view, kNetDispatchHead, me.channel, m, [sent](int v) { return sent - v < kNetSlots; },
                        sent - kNetSlots + 1, ctx);
                uint8_t* slot = view.send_slot(m, me.channel, sent % kNetSlots);
                const auto* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(x) +
                                                                int64_t{t} * Row::kInRowBytes);
                if constexpr (kDtype == kBf16CastFp8) {
                    cast_row_to_fp8<kHidden, 1>(slot, reinterpret_cast<float*>(slot + Row::kScalesOffset), src, 0,
                                                lane);
                } else {
                    copy_row<Row::kRowBytes / 16, 32, true>(reinterpret_cast<int4*>(slot), src, lane);
                    if constexpr (kDtype == kFp8)
                        copy_words(reinterpret_cast<float*>(slot + Row::kScalesOffset),
                                   x_scales + int64_t{t} * Row::kNumScales, Row::kNumScales, lane, 32);
                }
                int* slot_meta = reinterpret_cast<int*>(slot + Cfg::kMetaOffset);
                if (lane < kNumTopk) {
                    slot_meta[lane] = static_cast<int>(topk_idx[int64_t{t} * kNumTopk + lane]);
                    reinterpret_cast<float*>(slot_meta)[kNumTopk + lane] = topk_weights[int64_t{t} * kNumTopk + lane];
                }
                if (lane == 0) {
                    slot_meta[2 * kNumTopk] = t - token_base;
                    slot_meta[2 * kNumTopk + 1] = node_pos;
                }
                if (lane < kG)
                    slot_meta[2 * kNumTopk + 2 + lane] = send_pos[int64_t{t} * kNumRanks + m * kG + lane];
                ++sent;
                if (sent % kNetChunk == 0) {
                    __syncwarp();
                    if (lane == 0)
                        view.put_signal(m, me.channel, (sent - kNetChunk) % kNetSlots, kNetChunk, kNetDispatchTail,
                                        kNetChunk);
                }
            }
            // The rest and the end, then wait until the forwarder freed every slot
            __syncwarp();
            if (lane == 0) {
                const int rest = sent % kNetChunk;
                if (rest != 0)
                    view.put_signal(m, me.channel, (sent - rest) % kNetSlots, rest, kNetDispatchTail,
                                    rest + kFinishedBit);
                else
                    view.signal_add(m, kNetDispatchTail, me.channel, kFinishedBit);
                wait_signal(
                    view, kNetDispatchHead, me.channel, m, [sent](int v) { return v >= sent; }, sent, ctx);
            }
            __syncwarp();
        }
    } else if (warp < Cfg::kNetSendWarps + Cfg::kFwdWarps) {
        // ---------------- forwarder: source nodes' rows -> NVLink queues (c, local) of this node's GPUs
        const int tid = threadIdx.x - Cfg::kNetSendWarps * 32;  // thread in the group
        const int warp_in_group = tid / 32;
        const WaitContext ctx{"dispatch forwarder", me.rank, me.channel, kRoleSender, -1, timeout_ns};
        if (tid < kNumNodes)
            s_src[tid] = {0, tid == node ? token_begin : 0, tid == node ? 1 : 0, 0};
        if (tid < kG) {
            s_nvl_sent[tid] = 0;
            s_nvl_head[tid] = 0;
        }
        group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
        const int64_t node_first_expert = int64_t{node} * kG * num_local_experts;
        const int* my_fwd_offsets = fwd_offsets + me.local_idx * (kNumNodes + 1);

        // Forwards one row (from a net slot, or from x when `t_own` >= 0) to the GPUs of its experts.
        auto forward_row = [&](int m, const uint8_t* net_slot, int t_own) {
            const int* slot_meta = reinterpret_cast<const int*>(net_slot + Cfg::kMetaOffset);
            const bool from_x = t_own >= 0;
            // NOTE: the expert and weight are loaded again where the metadata is written (warp 0) rather
            // than kept across the copies: registers are at the 128 cap of a 512-thread block.
            auto load_expert = [&]() -> int64_t {
                return from_x ? topk_idx[int64_t{t_own} * kNumTopk + lane] : ptx::ld_s32_no_allocate(slot_meta + lane);
            };
            const int mask = local_gpu_mask(lane < kNumTopk ? load_expert() : -1, lane < kNumTopk, node_first_expert,
                                            num_local_experts, kG);
            // Loaded where used (by one thread), for the same reason
            auto src_token = [&]() {
                return from_x ? t_own - token_base : ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk);
            };
            for (int bits = mask; bits != 0; bits &= bits - 1) {
                const int j = __ffs(bits) - 1;
                // Wait for a free slot in j's queue
                if (tid == 0 && s_nvl_sent[j] - s_nvl_head[j] >= kNumSlots) {
                    WaitContext jctx = ctx;
                    jctx.peer = node * kG + j;
                    const int sent_j = s_nvl_sent[j];
                    s_nvl_head[j] = wait_until(counter_ptr(own, lay.max_channels, kDispatchHead, me.channel, j),
                                               [sent_j](int v) { return sent_j - v < kNumSlots; },
                                               sent_j - kNumSlots + 1, jctx);
                }
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                const int sent_j = s_nvl_sent[j];
                uint8_t* slot =
                    lay.nvl_slot(peer_base(peer_bases, node * kG + j), me.channel, local, sent_j % kNumSlots);
                if (from_x) {
                    const auto* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(x) +
                                                                    int64_t{t_own} * Row::kInRowBytes);
                    if constexpr (kDtype == kBf16CastFp8) {
                        cast_row_to_fp8<kHidden, Cfg::kFwdWarps>(
                            slot, reinterpret_cast<float*>(slot + Row::kScalesOffset), src, warp_in_group, lane);
                    } else {
                        copy_row<Row::kRowBytes / 16, Cfg::kFwdThreads, true>(reinterpret_cast<int4*>(slot), src, tid);
                        if constexpr (kDtype == kFp8)
                            copy_words(reinterpret_cast<float*>(slot + Row::kScalesOffset),
                                       x_scales + int64_t{t_own} * Row::kNumScales, Row::kNumScales, tid,
                                       Cfg::kFwdThreads);
                    }
                } else {
                    copy_row<Row::kRowBytes / 16, Cfg::kFwdThreads, false>(
                        reinterpret_cast<int4*>(slot), reinterpret_cast<const int4*>(net_slot), tid);
                    if constexpr (Row::kOutFp8)
                        for (int i = tid; i < Row::kNumScales; i += Cfg::kFwdThreads)
                            reinterpret_cast<int*>(slot + Row::kScalesOffset)[i] = ptx::ld_s32_no_allocate(
                                reinterpret_cast<const int*>(net_slot + Row::kScalesOffset) + i);
                }
                if (warp_in_group == 0) {
                    int* out_meta = reinterpret_cast<int*>(slot + Cfg::kMetaOffset);
                    if (lane < kNumTopk) {
                        const int64_t expert = load_expert();
                        const int64_t first = node_first_expert + int64_t{j} * num_local_experts;
                        const bool here = expert >= first && expert < first + num_local_experts;
                        out_meta[lane] = here ? static_cast<int>(expert - first) : -1;
                        reinterpret_cast<float*>(out_meta)[kNumTopk + lane] =
                            from_x ? topk_weights[int64_t{t_own} * kNumTopk + lane]
                                   : __int_as_float(ptx::ld_s32_no_allocate(slot_meta + kNumTopk + lane));
                    }
                    if (lane == 0) {
                        out_meta[2 * kNumTopk] = src_token();
                        out_meta[2 * kNumTopk + 1] = m * kG + local;
                        out_meta[2 * kNumTopk + 2] =
                            from_x ? ptx::ld_nc_s32(send_pos + int64_t{t_own} * kNumRanks + node * kG + j)
                                   : ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk + 2 + j);
                    }
                }
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                if (tid == 0) {
                    s_nvl_sent[j] = sent_j + 1;
                    if ((sent_j + 1) % kChunk == 0)
                        ptx::st_release_sys(counter_ptr(peer_base(peer_bases, node * kG + j), lay.max_channels,
                                                        kDispatchTail, me.channel, local),
                                            sent_j + 1);
                }
            }
            if (tid == 0) {
                const int node_pos = from_x ? ptx::ld_nc_s32(node_send_pos + int64_t{t_own} * kNumNodes + node)
                                            : ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk + 1);
                const int idx = my_fwd_offsets[m] + node_pos;
                // The host sizes the records (a bound with num_worst_tokens): never write past them
                if (idx >= my_fwd_offsets[m + 1])
                    report_and_trap("dispatch forwarder: records full (num_worst_tokens too small?)", me.rank,
                                    me.channel, kRoleSender, m * kG + local, my_fwd_offsets[m + 1], idx);
                fwd_mask[idx] = mask;
                fwd_token[idx] = src_token();
            }
        };

        uint64_t idle_since = ptx::globaltimer_ns();
        while (true) {
            bool any_left = false, progressed = false;
            for (int m = 0; m < kNumNodes; ++m) {
                if (tid == 0 && m != node) {
                    ForwardState& st = s_src[m];
                    if (!st.done && !st.finished && st.consumed == st.available) {
                        const int value = view.read_signal(kNetDispatchTail, me.channel, m);
                        st.available = value & kCountMask;
                        st.finished = (value & kFinishedBit) != 0;
                    }
                }
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                const ForwardState st = s_src[m];
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                if (st.done)
                    continue;
                any_left = true;
                // Up to kNetChunk rows: own node, this channel's tokens with an expert on this node (read
                // from x); remote node, the published rows of its net queue. One call site of forward_row.
                const bool own_node = m == node;
                const int rows = own_node ? kNetChunk : min(st.available - st.consumed, kNetChunk);
                int t = st.available, taken = 0;
                for (; taken < rows; ++taken) {
                    if (own_node) {
                        while (t < token_end && ptx::ld_nc_s32(node_send_pos + int64_t{t} * kNumNodes + node) < 0)
                            ++t;
                        if (t == token_end)
                            break;
                    }
                    forward_row(m, own_node ? nullptr : view.recv_slot(me.channel, m, (st.consumed + taken) % kNetSlots),
                                own_node ? t++ : -1);
                }
                const int consumed = st.consumed + taken;
                const bool done = own_node ? t == token_end : st.finished && consumed == st.available;
                progressed |= taken > 0 || done;
                // Free the slots (every kNetChunk rows, and the rest at the end)
                group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
                if (tid == 0) {
                    if (!own_node) {
                        const int publish = consumed / kNetChunk * kNetChunk - st.consumed / kNetChunk * kNetChunk +
                                            (done ? consumed % kNetChunk : 0);
                        if (publish > 0)
                            view.signal_add(m, kNetDispatchHead, me.channel, publish);
                    } else {
                        s_src[m].available = t;
                    }
                    s_src[m].consumed = consumed;
                    s_src[m].done = done;
                }
            }
            group_sync<Cfg::kFwdWarps>(Cfg::kFwdBarrierId);
            if (!any_left)
                break;
            if (progressed) {
                idle_since = ptx::globaltimer_ns();
            } else if (tid == 0 && static_cast<int64_t>(ptx::globaltimer_ns() - idle_since) > timeout_ns) {
                int m = 0;
                while (m < kNumNodes && s_src[m].done)
                    ++m;
                report_and_trap("dispatch forwarder", me.rank, me.channel, kRoleReceiver, m * kG + local,
                                s_src[m].consumed + 1, s_src[m].available);
            }
        }

        // End of every NVLink queue, then wait until each receiver freed every slot
        if (tid < kG) {
            const int j = tid;
            const int sent_j = s_nvl_sent[j];
            ptx::st_release_sys(counter_ptr(peer_base(peer_bases, node * kG + j), lay.max_channels, kDispatchTail,
                                            me.channel, local),
                                sent_j | kFinishedBit);
            WaitContext jctx = ctx;
            jctx.peer = node * kG + j;
            wait_until(counter_ptr(own, lay.max_channels, kDispatchHead, me.channel, j),
                       [sent_j](int v) { return v >= sent_j; }, sent_j, jctx);
        }
    } else {
        // ---------------- NVLink receivers: queue (c, src local = peer) -> outputs
        constexpr int kWarpsPerPeer = Cfg::kRecvWarpsPerPeer;
        const int peer = (warp - kNumRoleWarps) / kWarpsPerPeer;
        const int warp_in_group = (warp - kNumRoleWarps) % kWarpsPerPeer;
        const int barrier_id = Cfg::kRecvBarrierBase + peer;
        if (peer < kG) {
            const int meta_stride = 2 * kNumRanks + 1 + num_local_experts;
            const int* my_meta = meta + me.local_idx * meta_stride;
            const int row_base = recv_row_offsets[me.local_idx];
            const int* tail = counter_ptr(own, lay.max_channels, kDispatchTail, me.channel, peer);
            int* head = counter_ptr(peer_base(peer_bases, node * kG + peer), lay.max_channels, kDispatchHead,
                                    me.channel, local);
            const WaitContext ctx{"dispatch", me.rank, me.channel, kRoleReceiver, node * kG + peer, timeout_ns};
            drain_dispatch_queue<Row, kNumTopk, kWarpsPerPeer>(
                tail, head, [&](int idx) { return lay.nvl_slot(own, me.channel, peer, idx); },
                [&](const int* slot_meta) -> int64_t {
                    // NVLink slot metadata: [... src_token][src_rank][send_pos]
                    return row_base + my_meta[ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk + 1)] +
                           ptx::ld_s32_no_allocate(slot_meta + 2 * kNumTopk + 2);
                },
                barrier_id, warp_in_group, lane, ctx, out_x, out_x_scales, out_topk_idx, out_topk_weights,
                out_src_token);
        }
    }

    // Every peer's last write into this rank's counters and signals of this channel was observed
    __syncthreads();
    if (threadIdx.x < kG) {
        *counter_ptr(own, lay.max_channels, kDispatchTail, me.channel, threadIdx.x) = 0;
        *counter_ptr(own, lay.max_channels, kDispatchHead, me.channel, threadIdx.x) = 0;
    }
    if (threadIdx.x < kNumNodes && threadIdx.x != node) {
        view.reset_signal(kNetDispatchTail, me.channel, threadIdx.x);
        view.reset_signal(kNetDispatchHead, me.channel, threadIdx.x);
    }
}

}  // namespace commkit
