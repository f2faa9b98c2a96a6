// Shared pieces of the commkit kernels: compile-time limits, the symmetric buffer layout, the one
// bounded spin-wait, warp-group barriers and the channel split.
#pragma once

#include <cstdint>
#include <cstdio>

#include "ptx/ptx.cuh"

// Planted faults for the host execution's mutation tests (tests/test_host_sanitizers.py): a host build
// with -DCOMMKIT_FAULTS=<mask> leaves out the synchronisation each bit names, to show that
// ThreadSanitizer or the comparison with commkit.reference catches it. 0 in every real build.
#ifndef COMMKIT_FAULTS
#define COMMKIT_FAULTS 0
#endif
#if COMMKIT_FAULTS != 0 && !defined(COMMKIT_HOST_EXECUTION)
#error "COMMKIT_FAULTS plants synchronisation faults: host execution builds only"
#endif

namespace commkit {

enum PlantedFault : int {
    kFaultNoBarrierBeforeRelease = 1,  // dispatch sender: no group barrier before it releases a chunk
    kFaultRelaxedTail = 2,             // dispatch sender: a relaxed store publishes a chunk (not a release)
    kFaultNoSyncwarpAfterWait = 4,     // warp_wait_until: no __syncwarp after lane 0's acquire
    kFaultNoBarrierBeforeZeroing = 8,  // dispatch: no block barrier before the counters are zeroed
    kFaultRowPastOutputs = 16,         // dispatch receiver: writes every row one row further (ASan's case)
};
__host__ __device__ constexpr bool planted(int fault) { return (COMMKIT_FAULTS & fault) != 0; }

// ---------------------------------------------------------------------------------------------------
// Limits and tunables
// ---------------------------------------------------------------------------------------------------

constexpr int kMaxRanks = 8;             // one NVLink node
constexpr int kMaxLocalExperts = 512;    // L = E / R, bounds the count inbox
constexpr int kMaxExperts = 2048;        // bounds the layout kernel's shared histogram
constexpr int kNumThreads = 512;         // dispatch/combine block: 16 warps
constexpr int kNumWarps = kNumThreads / 32;
constexpr int kNumRoleWarps = kNumWarps / 2;  // 8 warps send, 8 warps receive (or reduce)
constexpr int kNumSlots = 16;            // ring slots per (channel, source rank) queue
constexpr int kChunk = 4;                // rows between two tail (and head) publications
// NOTE: the combine reducer may run up to kChunk - 1 rows ahead of the head it published and needs one
// more row than the sender published, so a blocked sender must have published >= 2 * kChunk - 1 rows.
static_assert(kNumSlots >= 2 * kChunk, "ring too small for the publication chunk");
constexpr int kFinishedBit = 1 << 30;    // set in a dispatch tail when its sender has no more rows
constexpr int kCountMask = kFinishedBit - 1;
constexpr int kLayoutThreads = 512;
// NOTE: the combine reducer keeps 8 float32 accumulators per 16-byte word of its slice of a row in
// registers: hidden 12288 takes 126 of the 128 registers a 512-thread block allows, 16384 spills.
constexpr int kMaxHidden = 12288;
constexpr int kFp8GroupSize = 128;       // elements per FP8 scale
constexpr float kFp8Max = 448.0f;        // largest finite e4m3
constexpr float kFp8AmaxMin = 1e-4f;     // amax clamp so that the scale is never 0 (see commkit/fp8.py)

// x dtypes of a dispatch: bf16 rows, FP8 rows with scales, or bf16 rows cast to FP8 while sending.
enum DispatchDtype : int { kBf16 = 0, kFp8 = 1, kBf16CastFp8 = 2 };

__host__ __device__ constexpr int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------------
// Symmetric buffer layout (identical on every rank; commkit/backends/kernels_layout.py mirrors it)
//
//   [0, 64)          barrier epoch of this rank at [0], its next call sequence number at [4] (only
//                    this rank touches them)
//   [64, 128)        barrier signals: int[kMaxRanks], slot p holds the last barrier epoch rank p began
//   inbox            int[2][kMaxRanks][kInboxInts]: call descriptor and counts sent by each source,
//                    double-buffered by the parity of the barrier epoch
//   counters         int[4][max_channels][kMaxRanks]: dispatch tail/head, combine tail/head
//   ring             bytes[max_channels][kMaxRanks][kNumSlots][slot_bytes]: dispatch and combine use
//                    the same region one after the other (each kernel drains it before it returns)
// ---------------------------------------------------------------------------------------------------

// The call descriptor: what every rank of a call passes alike, in this order (the host names them:
// commkit/backends/count_exchange.py KERNEL_FORMAT_NAMES). Every notify and cached notify exchanges it
// with the peers at its barrier (csrc/notify.cuh agree_on_call); a rank whose peers differ skips the
// payload kernel, as every one of them does.
enum CallField : int {
    kCallOp = 0,       // 0 dispatch, 1 cached dispatch, 2 combine
    kCallSeq = 1,      // this buffer's call sequence number (kept on the device: kCallSeqOffset)
    kCallExperts = 2,  // num_experts
    kCallHidden = 3,
    kCallTopk = 4,     // top-k columns (combine: 0)
    kCallDtype = 5,    // DispatchDtype (combine: 0)
    kCallSms = 6,      // num_sms: the channels of the rings
    kCallHandle = 7,   // sequence number of the dispatch that made the call's handle, -1 without one
    kCallInts = 8,
};

// What agree_on_call writes per rank of the launch (int32 [kStatusInts]): the verdict, the first
// peer that differs, this call's sequence number, then that peer's descriptor.
enum StatusField : int { kStatusVerdict = 0, kStatusPeer = 1, kStatusSeq = 2, kStatusPeerCall = 3 };
constexpr int kStatusInts = kStatusPeerCall + kCallInts;
enum Verdict : int { kAgreed = 0, kDisagreed = 1 };

// One inbox entry: [call descriptor, num_tokens sent to me, num_tokens of the source, L per-expert counts].
constexpr int kInboxCounts = kCallInts;
constexpr int kInboxInts = kCallInts + 2 + kMaxLocalExperts;

struct BufferLayout {
    static constexpr int64_t kEpochOffset = 0;
    static constexpr int64_t kCallSeqOffset = 4;
    static constexpr int64_t kSignalOffset = 64;
    static constexpr int64_t kInboxOffset = 128;
    static constexpr int64_t kInboxBytes = 2LL * kMaxRanks * kInboxInts * 4;
    static constexpr int64_t kCountersOffset = align_up(kInboxOffset + kInboxBytes, 128);

    __host__ __device__ static constexpr int64_t counters_bytes(int max_channels) {
        return align_up(4LL * max_channels * kMaxRanks * 4, 128);
    }
    __host__ __device__ static constexpr int64_t ring_offset(int max_channels) {
        return kCountersOffset + counters_bytes(max_channels);
    }
    __host__ __device__ static constexpr int64_t total_bytes(int max_channels, int64_t max_slot_bytes) {
        return ring_offset(max_channels) + 1LL * max_channels * kMaxRanks * kNumSlots * max_slot_bytes;
    }
};

// Counter arrays inside the counters region.
enum CounterKind : int { kDispatchTail = 0, kDispatchHead = 1, kCombineTail = 2, kCombineHead = 3 };

// The counter of `kind` for (channel, peer) in the buffer at `base`.
__device__ __forceinline__ int* counter_ptr(uint8_t* base, int max_channels, CounterKind kind, int channel,
                                            int peer) {
    return reinterpret_cast<int*>(base + BufferLayout::kCountersOffset) +
           (static_cast<int64_t>(kind) * max_channels + channel) * kMaxRanks + peer;
}

// The ring slot `slot_idx` of the queue (channel, src_rank) in the buffer at `base`.
__device__ __forceinline__ uint8_t* slot_ptr(uint8_t* base, int max_channels, int64_t slot_bytes, int channel,
                                             int src_rank, int slot_idx) {
    return base + BufferLayout::ring_offset(max_channels) +
           ((static_cast<int64_t>(channel) * kMaxRanks + src_rank) * kNumSlots + slot_idx) * slot_bytes;
}

// ---------------------------------------------------------------------------------------------------
// The bounded spin-wait: every device wait goes through here
// ---------------------------------------------------------------------------------------------------

enum Role : int { kRoleBarrier = 0, kRoleSender = 1, kRoleReceiver = 2, kRoleReducer = 3 };

__device__ __forceinline__ const char* role_name(int role) {
    switch (role) {
        case kRoleBarrier: return "barrier";
        case kRoleSender: return "sender";
        case kRoleReceiver: return "receiver";
        default: return "reducer";
    }
}

struct WaitContext {
    const char* kernel;  // "barrier", "dispatch", "combine"
    int rank;
    int channel;
    int role;
    int peer;
    int64_t timeout_ns;  // wait budget in nanoseconds (%globaltimer)
};

// A failure report is formatted into global memory and printed with a format-only printf. NOTE:
// printf with arguments would put its argument buffer on the stack; this keeps the kernels free of
// local memory. Only the first kMaxReports failing threads print.
constexpr int kMaxReports = 64;
constexpr int kReportChars = 192;
__device__ char g_reports[kMaxReports][kReportChars];
__device__ int g_num_reports;

__device__ __forceinline__ int append_text(char* out, int pos, const char* text) {
    for (; *text != '\0' && pos < kReportChars - 2; ++text)
        out[pos++] = *text;
    return pos;
}

__device__ __forceinline__ int append_int(char* out, int pos, int value) {
    if (value < 0 && pos < kReportChars - 2)
        out[pos++] = '-';
    const unsigned magnitude = value < 0 ? 0u - static_cast<unsigned>(value) : static_cast<unsigned>(value);
    int num_digits = 1;
    for (unsigned rest = magnitude / 10; rest != 0; rest /= 10)
        ++num_digits;
    if (pos + num_digits > kReportChars - 2)
        return pos;
    unsigned rest = magnitude;
    for (int i = num_digits - 1; i >= 0; --i, rest /= 10)
        out[pos + i] = static_cast<char>('0' + rest % 10);
    return pos + num_digits;
}

// Prints "commkit <what>: rank R channel C role X peer P: expected E, observed O" and traps.
__device__ __noinline__ void report_and_trap(const char* what, int rank, int channel, int role, int peer,
                                             int expected, int observed) {
    const int idx = atomicAdd(&g_num_reports, 1);
    if (idx < kMaxReports) {
        char* out = g_reports[idx];
        int pos = append_text(out, 0, "commkit ");
        pos = append_text(out, pos, what);
        pos = append_text(out, pos, ": rank ");
        pos = append_int(out, pos, rank);
        pos = append_text(out, pos, " channel ");
        pos = append_int(out, pos, channel);
        pos = append_text(out, pos, " role ");
        pos = append_text(out, pos, role_name(role));
        pos = append_text(out, pos, " peer ");
        pos = append_int(out, pos, peer);
        pos = append_text(out, pos, ": expected ");
        pos = append_int(out, pos, expected);
        pos = append_text(out, pos, ", observed ");
        pos = append_int(out, pos, observed);
        out[pos++] = '\n';
        out[pos] = '\0';
        printf(out);
    }
    ptx::trap();
}

// Spins on an acquire load of `ptr` (system scope: the writer may be a peer GPU) until `done(value)`;
// returns that value. After ctx.timeout_ns nanoseconds it reports who waited for what and traps.
// NOTE: %globaltimer (ns), not clock64: the SM clock changes with boost and power capping, so a cycle
// budget derived from a nominal clock rate would not be the timeout_s the caller asked for.
template <typename Done>
__device__ __forceinline__ int wait_until(const int* ptr, Done done, int expected, const WaitContext& ctx) {
    const uint64_t start = ptx::globaltimer_ns();
    while (true) {
        const int value = ptx::ld_acquire_sys(ptr);
        if (done(value))
            return value;
        if (static_cast<int64_t>(ptx::globaltimer_ns() - start) > ctx.timeout_ns)
            report_and_trap(ctx.kernel, ctx.rank, ctx.channel, ctx.role, ctx.peer, expected, value);
    }
}

// Lane 0 waits and the value is broadcast to the warp. NOTE: __syncwarp orders lane 0's acquire before
// the other lanes' later loads (bar.warp.sync gives memory ordering among the participating threads).
template <typename Done>
__device__ __forceinline__ int warp_wait_until(const int* ptr, Done done, int expected, const WaitContext& ctx) {
    int value = 0;
    if (ptx::lane_id() == 0)
        value = wait_until(ptr, done, expected, ctx);
    if constexpr (!planted(kFaultNoSyncwarpAfterWait))
        __syncwarp();
    return __shfl_sync(0xffffffffu, value, 0);
}

// ---------------------------------------------------------------------------------------------------
// Warp groups
// ---------------------------------------------------------------------------------------------------

// Barrier among the kWarps warps of one group (named barrier `barrier_id`, or a warp sync for 1 warp).
template <int kWarps>
__device__ __forceinline__ void group_sync(int barrier_id) {
    if constexpr (kWarps == 1)
        __syncwarp();
    else
        ptx::named_barrier_sync(barrier_id, kWarps * 32);
}

// Warps per peer in a role: 8 role warps split over the ranks (1 for 8 ranks, 4 for 2 ranks).
template <int kNumRanks>
struct RoleSplit {
    static_assert(kNumRanks >= 1 && kNumRanks <= kMaxRanks, "1 to 8 ranks");
    static constexpr int kWarpsPerPeer = kNumRoleWarps / kNumRanks > 0 ? kNumRoleWarps / kNumRanks : 1;
    // Named barrier ids: 0 is __syncthreads; groups with one warp need none.
    static_assert(kWarpsPerPeer == 1 || 2 * kNumRanks + 1 <= 16, "out of named barriers");
};

// The tokens [begin, end) of channel `channel` of `num_channels` over `num_tokens` tokens (balanced).
__device__ __forceinline__ void channel_token_range(int num_tokens, int num_channels, int channel, int& begin,
                                                    int& end) {
    begin = static_cast<int>(static_cast<int64_t>(num_tokens) * channel / num_channels);
    end = static_cast<int>(static_cast<int64_t>(num_tokens) * (channel + 1) / num_channels);
}

// The rank this block works for and its index among the ranks of the launch: real ranks launch one
// rank's blocks (rank_base = rank), virtual ranks launch all of them (rank_base = 0).
// Fills `num_words` int32 words at `ptr` with -1 (all bits set: NaN in bf16, e4m3 and float32, -1 in
// int32 and int64), spread over the `num_blocks` blocks of a rank. What a payload kernel writes into
// its outputs when the ranks disagreed on the call (its status): nothing it returns looks like rows.
__device__ __forceinline__ void poison_words(void* ptr, int64_t num_words, int block, int num_blocks) {
    int* words = static_cast<int*>(ptr);
    for (int64_t i = static_cast<int64_t>(block) * blockDim.x + threadIdx.x; i < num_words;
         i += static_cast<int64_t>(num_blocks) * blockDim.x)
        words[i] = -1;
}

struct BlockRank {
    int local_idx;  // index among the ranks of this launch
    int rank;       // rank in the EP group
    int channel;    // block index inside the rank's budget
};

__device__ __forceinline__ BlockRank block_rank(int rank_base, int num_channels) {
    const int local_idx = static_cast<int>(blockIdx.x) / num_channels;
    return {local_idx, rank_base + local_idx, static_cast<int>(blockIdx.x) % num_channels};
}

}  // namespace commkit
