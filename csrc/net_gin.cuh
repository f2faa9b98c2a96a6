// GinNet: the Net of csrc/net.cuh on NCCL's device API (GPU-initiated networking, NCCL >= 2.28.7).
//
// Compiled against the headers of the NCCL installed at run time (commkit/jit/nccl.py finds them and
// passes their directory with -I; struct layouts differ between NCCL versions). See csrc/GIN.md.
//
// Setup (commkit/backends/gin.py): the whole symmetric buffer is registered as one NCCL window, so the
// offsets of InterLayout are window offsets; the device communicator has 4 * max_channels * num_nodes
// GIN signals (signal id = InterLayout::signal_index, ids start at 0) and is copied into device memory
// (`comm` below). NOTE: the devComm is reached through a global pointer rather than held by value:
// ncclGin keeps a reference to the ncclDevComm it is built from, and a reference into a by-value kernel
// parameter would make nvcc copy the parameter to local memory (stack) in every kernel that uses a Net.
//
// Queues and signals: rank (n, g) sends to its rail peers (m, g). The writer group of queue
// (channel, src = n) fills slots of a staging copy in its own window (InterLayout::net_stage_offset,
// indexed by the destination node), then one thread issues ONE GIN put of the chunk from the staging
// copy into the peer's net ring with a signal-add remote action on the peer's signal (kind, channel, n).
// Peers are addressed in the world team as node * G + local (NCCL's rail team is the outer factor of
// its LSA team, which spans nodes under multi-node NVLink, so its index need not be commkit's node).
// GIN context of a channel: channel % ginContextCount, on the sender AND on the receiver (each context
// has its own signal memory, so the reader must read the context the writers add to).
//
// Ordering (the contract of put_signal: a peer that sees the delta sees these slots and those of every
// earlier put_signal of this rank to it on this channel). Documented guarantees relied on:
//   * NCCL 2.28 (nccl_device/gin.h, the RemoteAction of ncclGin::put): when a signalling action is
//     used, the signal becomes visible only after the payload of this put AND the payloads of the
//     preceding puts on the same context to the same peer are settled.
//   * NCCL >= 2.30.5 (Device API - GIN, "Signals and Counters"): signals are strong or weak; a strong
//     signal implies the visibility of all preceding puts to the same peer on the same context, a weak
//     one only of the put it is attached to; the legacy ncclGin_SignalAdd is strong or weak as the host
//     asked with ncclDevCommRequirements::ginStrongSignalsRequired. We name ncclGin_StrongSignalAdd
//     explicitly there (and the host leaves ginStrongSignalsRequired at its default, true).
// Every put_signal of (channel, peer) goes through the same context (the channel fixes it) and the
// earlier ones happen before the later ones (same thread, or ordered by the writer group's barriers),
// so they are "preceding puts on this context to the same peer": the strong signal of chunk k is
// visible only after chunks 0..k landed. No flush is needed for that. (A flush only says that source
// buffers may be reused; it makes no claim about remote completion.)
// Staging reuse: a staging slot is rewritten only after the peer's head signal freed the ring slot its
// last put wrote, i.e. after that put's payload landed, so its source had been read: no flush either.
// Data written by the writer group: the group barrier makes it visible to the issuing thread
// (bar.sync is cumulative) and the put releases at device scope before the network reads the staging
// copy (the put's default alreadyReleased = thread, expected scope = device: NCCL issues the release).
#pragma once

#include <nccl.h>

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < 22807
#error "csrc/net_gin.cuh needs the headers of NCCL >= 2.28.7 (the GIN device API)"
#else

#include <nccl_device.h>

#include "csrc/net.cuh"

// ncclGin_StrongSignalAdd exists since NCCL 2.30.5; before it, every signal is strong.
#if NCCL_VERSION_CODE >= 23005
#define COMMKIT_GIN_HAS_STRONG_SIGNALS 1
#else
#define COMMKIT_GIN_HAS_STRONG_SIGNALS 0
#endif

namespace commkit {

struct GinNet {
    const ncclDevComm* comm;  // device copy of the device communicator (ncclDevCommCreate's output)
    ncclWindow_t window;      // the whole symmetric buffer of every rank (ncclCommWindowRegister)
    uint8_t* base;            // this rank's symmetric buffer (the window's local address)
    InterLayout layout;

#if COMMKIT_GIN_HAS_STRONG_SIGNALS
    using SignalAdd = ncclGin_StrongSignalAdd;
#else
    using SignalAdd = ncclGin_SignalAdd;
#endif

    struct View {
        const ncclDevComm* comm;
        ncclWindow_t window;
        uint8_t* base;
        InterLayout layout;
        int rank, node, local;

        // The GIN context of a channel (the same on every rank: ginContextCount is the same everywhere).
        __device__ __forceinline__ ncclGin gin(int channel) const {
            return ncclGin(*comm, channel % static_cast<int>(comm->ginContextCount));
        }
        __device__ __forceinline__ int peer_rank(int node_) const { return node_ * layout.gpus_per_node + local; }
        __device__ __forceinline__ ncclGinSignal_t signal_id(int kind, int channel, int node_) const {
            return static_cast<ncclGinSignal_t>(layout.signal_index(kind, channel, node_));
        }

        // Staging copy (in my window) of slot `slot` of the queue (channel, src = my node) of node_'s peer.
        __device__ __forceinline__ uint8_t* send_slot(int node_, int channel, int slot) const {
            return base + layout.net_stage_offset + layout.net_slot_offset(channel, node_, slot);
        }

        // ONE thread, after the writer group's barrier (see the ordering notes at the top of this file).
        __device__ __forceinline__ void put_signal(int node_, int channel, int first_slot, int num_slots, int kind,
                                                   int delta) const {
            const ncclGin net = gin(channel);
            const SignalAdd add{signal_id(kind, channel, node), static_cast<uint64_t>(static_cast<uint32_t>(delta))};
            if (num_slots == 0) {  // nothing to deliver (e.g. only kFinishedBit): a strong signal alone
                net.signal(ncclTeamWorld(*comm), peer_rank(node_), add);
                return;
            }
            const size_t bytes = static_cast<size_t>(num_slots) * static_cast<size_t>(layout.net_slot_bytes);
            const int64_t src = layout.net_stage_offset + layout.net_slot_offset(channel, node_, first_slot);
            const int64_t dst = layout.net_ring_offset + layout.net_slot_offset(channel, node, first_slot);
            net.put(ncclTeamWorld(*comm), peer_rank(node_), window, static_cast<size_t>(dst), window,
                    static_cast<size_t>(src), bytes, add);
        }

        // ONE thread. The signal is posted with NCCL's release (device scope by default) after this
        // thread's earlier reads of the slots it frees (and, through a group barrier, its group's).
        __device__ __forceinline__ void signal_add(int node_, int kind, int channel, int delta) const {
            const SignalAdd add{signal_id(kind, channel, node), static_cast<uint64_t>(static_cast<uint32_t>(delta))};
            gin(channel).signal(ncclTeamWorld(*comm), peer_rank(node_), add);
        }

        __device__ __forceinline__ const uint8_t* recv_slot(int channel, int src_node, int slot) const {
            return base + layout.net_ring_offset + layout.net_slot_offset(channel, src_node, slot);
        }

        // Acquire load (cuda::memory_order_acquire, system-scope atomic_ref in NCCL) of the low 32 bits.
        __device__ __forceinline__ int read_signal(int kind, int channel, int node_) const {
            return static_cast<int>(static_cast<uint32_t>(
                gin(channel).readSignal(signal_id(kind, channel, node_), 32, cuda::memory_order_acquire)));
        }

        // By the owner, after it observed the last delta anyone adds in this launch (NCCL: resetSignal
        // may not race with concurrent modifications of the signal).
        __device__ __forceinline__ void reset_signal(int kind, int channel, int node_) const {
            gin(channel).resetSignal(signal_id(kind, channel, node_));
        }
    };

    // GIN has one rank per process: `rank` must be this process's rank in the EP group (comm->rank).
    __device__ __forceinline__ View at(int rank) const {
        return {comm, window, base, layout, rank, rank / layout.gpus_per_node, rank % layout.gpus_per_node};
    }
};

}  // namespace commkit

#endif  // NCCL >= 2.28.7
