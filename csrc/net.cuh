// Scale-out transports ("nets") of the internode kernels and the layout of their buffers.
//
// Ranks form N nodes of G GPUs: rank = node * G + local. The inter-node hop joins the ranks that share
// a local index (a "rail"): rank (n, g) talks to (m, g) for every node m. A net moves ring slots along a
// rail and keeps per-(kind, channel, peer node) signals: 32-bit counters that only grow by the deltas
// peers add (plus kFinishedBit once, for a dispatch end) until their owner resets them.
//
// Concept (template parameter `Net` of internode_dispatch.cuh / internode_combine.cuh). A Net is a
// trivially copyable struct in device memory (the kernels take a `const Net*`); `net.at(rank)` gives the view of one rank (virtual ranks
// launch several ranks at once) with these device members:
//   uint8_t* send_slot(int node, int channel, int slot)
//       where the writer group writes the bytes of `slot` of queue (channel, src = my node) of node
//       `node`'s rail peer (nvlink-domain: the peer's ring itself; GIN: a staging copy in my window);
//   void put_signal(int node, int channel, int first_slot, int num_slots, int kind, int delta)
//       ONE thread, after the writer group's barrier: deliver the slots [first_slot, +num_slots) written
//       through send_slot (no wrap: first_slot + num_slots <= kNetSlots), then add `delta` to the peer's
//       signal (kind, channel, my node). A peer that reads the signal (acquire) and sees the delta also
//       sees these slots and those of every earlier put_signal of this rank to it on this channel;
//   void signal_add(int node, int kind, int channel, int delta)
//       ONE thread: add `delta` to the peer's signal (kind, channel, my node), after this thread's (and,
//       with a group barrier before it, its group's) earlier reads of the slots it frees;
//   const uint8_t* recv_slot(int channel, int src_node, int slot)     my ring, filled by put_signal;
//   int read_signal(int kind, int channel, int node)                   acquire load of my signal;
//   void reset_signal(int kind, int channel, int node)                 back to 0, by the signal's owner,
//       after it observed the last delta anyone adds to it in this launch.
// Implementations: NvlinkDomainNet below (direct stores: multi-node NVLink, and one-GPU emulation) and
// GinNet in net_gin.cuh (NCCL's device API; the same contract).
#pragma once

#include "csrc/notify.cuh"

namespace commkit {

constexpr int kNetSlots = 16;  // ring slots per (channel, source node) queue of the inter-node hop
constexpr int kNetChunk = 4;   // rows per put_signal (and per head publication)
static_assert(kNetSlots % kNetChunk == 0, "a chunk of slots must never wrap around the ring");
static_assert(kNetSlots >= 2 * kNetChunk, "ring too small for the publication chunk");
constexpr int kMaxNodes = 32;  // nodes of an EP group (DeepSeek-V3 trained with EP64: 8 nodes)

// Signal kinds of the inter-node hop (and counter kinds of the NVLink hop, see CounterKind).
enum NetSignal : int { kNetDispatchTail = 0, kNetDispatchHead = 1, kNetCombineTail = 2, kNetCombineHead = 3 };
constexpr int kNumNetSignalKinds = 4;

// Where the regions of an internode kernel live in every rank's symmetric buffer (identical on every
// rank; commkit/backends/internode_layout.py computes it and checks that it fits). Offsets in bytes from
// the buffer's base; the epoch, barrier signals, inbox and NVLink counters are BufferLayout's.
//   signals    int[4][max_channels][num_nodes]            (nvlink-domain only; GIN keeps its own)
//   nvl ring   [max_channels][kMaxRanks][kNumSlots][nvl_slot_bytes]   queues (channel, src local rank)
//   net ring   [max_channels][num_nodes][kNetSlots][net_slot_bytes]   queues (channel, src node)
//   net stage  same shape as the net ring, the GIN sender's staging copy (nvlink-domain: unused)
struct InterLayout {
    int num_nodes;
    int gpus_per_node;
    int max_channels;
    int nvl_slot_bytes;
    int net_slot_bytes;
    int64_t signals_offset;
    int64_t nvl_ring_offset;
    int64_t net_ring_offset;
    int64_t net_stage_offset;

    __device__ __forceinline__ int64_t net_slot_offset(int channel, int node, int slot) const {
        return ((static_cast<int64_t>(channel) * num_nodes + node) * kNetSlots + slot) * net_slot_bytes;
    }
    __device__ __forceinline__ int64_t signal_index(int kind, int channel, int node) const {
        return (static_cast<int64_t>(kind) * max_channels + channel) * num_nodes + node;
    }
    // NVLink ring slot of queue (channel, src local rank) in the buffer at `base`.
    __device__ __forceinline__ uint8_t* nvl_slot(uint8_t* base, int channel, int src_local, int slot) const {
        return base + nvl_ring_offset +
               ((static_cast<int64_t>(channel) * kMaxRanks + src_local) * kNumSlots + slot) * nvl_slot_bytes;
    }
};

// Direct stores into the rail peers' buffers: nodes joined by NVLink (multi-node NVLink) and virtual
// nodes on one GPU. put_signal needs no copy (send_slot is the peer's slot): a release add of the signal
// orders the group's slot stores (made visible to this thread by the group barrier) before it.
struct NvlinkDomainNet {
    const uint64_t* bases;  // symmetric buffer of every rank of the EP group, by rank
    InterLayout layout;

    struct View {
        const uint64_t* bases;
        InterLayout layout;
        int rank, node, local;

        __device__ __forceinline__ uint8_t* base_of(int node_) const {
            return reinterpret_cast<uint8_t*>(bases[node_ * layout.gpus_per_node + local]);
        }
        __device__ __forceinline__ int* signal_ptr(uint8_t* base, int kind, int channel, int node_) const {
            return reinterpret_cast<int*>(base + layout.signals_offset) + layout.signal_index(kind, channel, node_);
        }
        __device__ __forceinline__ uint8_t* send_slot(int node_, int channel, int slot) const {
            return base_of(node_) + layout.net_ring_offset + layout.net_slot_offset(channel, node, slot);
        }
        __device__ __forceinline__ void put_signal(int node_, int channel, int, int, int kind, int delta) const {
            // NOTE: the caller's group barrier made the group's slot stores visible to this thread
            // (bar.sync is cumulative); the fence + release add publishes them at system scope.
            ptx::fence_acq_rel_sys();
            ptx::red_add_release_sys(signal_ptr(base_of(node_), kind, channel, node), delta);
        }
        __device__ __forceinline__ void signal_add(int node_, int kind, int channel, int delta) const {
            ptx::red_add_release_sys(signal_ptr(base_of(node_), kind, channel, node), delta);
        }
        __device__ __forceinline__ const uint8_t* recv_slot(int channel, int src_node, int slot) const {
            return base_of(node) + layout.net_ring_offset + layout.net_slot_offset(channel, src_node, slot);
        }
        __device__ __forceinline__ const int* signal_addr(int kind, int channel, int node_) const {
            return signal_ptr(base_of(node), kind, channel, node_);
        }
        __device__ __forceinline__ int read_signal(int kind, int channel, int node_) const {
            return ptx::ld_acquire_sys(signal_addr(kind, channel, node_));
        }
        __device__ __forceinline__ void reset_signal(int kind, int channel, int node_) const {
            *signal_ptr(base_of(node), kind, channel, node_) = 0;
        }
    };

    __device__ __forceinline__ View at(int rank) const {
        return {bases, layout, rank, rank / layout.gpus_per_node, rank % layout.gpus_per_node};
    }
};

// Spins until `done(net.read_signal(kind, channel, node))`, with the budget and report of wait_until.
template <typename View, typename Done>
__device__ __forceinline__ int wait_signal(const View& net, int kind, int channel, int node, Done done, int expected,
                                           const WaitContext& ctx) {
    const uint64_t start = ptx::globaltimer_ns();
    while (true) {
        const int value = net.read_signal(kind, channel, node);
        if (done(value))
            return value;
        if (static_cast<int64_t>(ptx::globaltimer_ns() - start) > ctx.timeout_ns)
            report_and_trap(ctx.kernel, ctx.rank, ctx.channel, ctx.role, ctx.peer, expected, value);
    }
}

// Lane 0 waits as wait_signal and the value is broadcast to the warp. NOTE: the __syncwarp orders lane
// 0's acquire before the other lanes' later accesses (the shuffle alone exchanges the value, not memory
// ordering: without it the lanes' writes into a freed slot raced with the reader's earlier reads, found
// by the host execution under ThreadSanitizer).
template <typename View, typename Done>
__device__ __forceinline__ int warp_wait_signal(const View& net, int kind, int channel, int node, Done done,
                                                int expected, const WaitContext& ctx) {
    int value = 0;
    if (ptx::lane_id() == 0)
        value = wait_signal(net, kind, channel, node, done, expected, ctx);
    __syncwarp();
    return __shfl_sync(0xffffffffu, value, 0);
}

}  // namespace commkit
