// The host execution runtime (runtime.h): blocks on OS threads, GPU threads as ucontext fibers,
// barriers and warp collectives with their memory-model meaning annotated for ThreadSanitizer, fiber
// switches annotated for ThreadSanitizer and AddressSanitizer, traps and faults as launch results.
//
// Built without sanitizer instrumentation (its own bookkeeping is no part of the kernels' memory
// model): with -DCOMMKIT_HOST_TSAN or -DCOMMKIT_HOST_ASAN it calls the sanitizers' fiber and
// synchronisation interfaces, which the instrumented kernel code of the same launch is checked by.
//
// NOTE: glibc's makecontext/swapcontext is the fiber facility: it needs nothing beyond the C library
// (Boost.Context would be a system package every machine must install), and it costs one
// rt_sigprocmask system call per switch, which is what bounds the speed of a host launch.
#include "host/runtime.h"

#include <sched.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(COMMKIT_HOST_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
namespace {
constexpr unsigned kTsanNoSync = 1;  // __tsan_switch_to_fiber_no_sync
}
#endif
#if defined(COMMKIT_HOST_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

namespace commkit::host {
namespace {

constexpr int kNumNamedBarriers = 16;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;  // 1024 threads per block
constexpr size_t kBlockLogBytes = 8192;
constexpr unsigned kMaxBlocks = 1024;  // OS threads of one launch

enum class FiberState : int { kRunnable, kAtBarrier, kAtWarpOp, kDone };
enum Status : int { kRunning = 0, kTrapped = 1, kFault = 2 };

struct Block;

struct Fiber {
    ucontext_t context;
    Block* block = nullptr;
    Dim3 tid{0, 1, 1};
    int index = 0, lane = 0, warp = 0;
    FiberState state = FiberState::kRunnable;
    bool started = false;
    char* stack = nullptr;
    uint32_t result = 0;  // of the warp collective this fiber waits in
    int barrier = -1;     // the named barrier it waits at
    void* tsan_fiber = nullptr;
    void* asan_fake_stack = nullptr;
    char token = 0;  // TSan: what this thread releases at a barrier and acquires when it is released
};

// A named barrier (bar.sync id, count): the phase in progress. For TSan, every arriving thread
// releases into its own token; the thread that completes the phase acquires each of them, then
// releases into each (so a released thread acquires exactly the arrivals of its phase).
struct Barrier {
    int expected = 0;  // 0: no phase in progress
    int arrived = 0;
    std::vector<int> waiting;  // NOTE: reserved for the whole block: no allocation (TSan sees new and memmove)
};

// A warp collective in progress (shuffle, vote, __syncwarp).
struct WarpCollective {
    bool active = false;
    WarpOp op = WarpOp::kSync;
    uint32_t mask = 0, arrived = 0;
    int width = kWarpSize;
    uint32_t values[kWarpSize] = {};
    int operands[kWarpSize] = {};
};

struct Launch;

struct Block {
    Launch* launch = nullptr;
    Dim3 idx{0, 0, 0};
    std::vector<Fiber> fibers;
    std::vector<WarpCollective> warps;
    Barrier barriers[kNumNamedBarriers];
    ucontext_t scheduler;
    Fiber* current = nullptr;
    int num_done = 0;
    char* stacks = nullptr;
    size_t stacks_bytes = 0;
    void* tsan_scheduler = nullptr;
    void* asan_fake_stack = nullptr;
    const void* os_stack_bottom = nullptr;
    size_t os_stack_size = 0;
    // NOTE: the block's log is a fixed buffer written byte by byte by this (uninstrumented) runtime: a
    // string appended by several fibers would reach TSan's interceptors (new, memcpy) as races
    char log[kBlockLogBytes];
    size_t log_len = 0;
    char exit_token = 0;  // TSan: every exiting thread releases, the block's thread acquires at the end
};

struct Launch {
    LaunchConfig config{};
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
    Dim3 grid{1, 1, 1}, block{1, 1, 1};
    std::atomic<int> status{kRunning};
    std::chrono::steady_clock::time_point start;
};

thread_local Block* t_block = nullptr;

Fiber* current_fiber() {
    Block* b = t_block;
    if (b == nullptr || b->current == nullptr) {
        std::fputs("commkit host execution: a device function was called outside a kernel launch\n", stderr);
        std::abort();
    }
    return b->current;
}

// Appends to the block's log (only its own OS thread writes it; merged after the launch).
void append_log(Block* b, const char* text, size_t n) {
    for (size_t i = 0; i < n && b->log_len < kBlockLogBytes - 1; ++i)
        b->log[b->log_len++] = text[i];
}

// Stops the launch with `status` (the first stop wins) and logs `why` in block `b`'s log.
void stop_launch(Block* b, int status, const std::string& why) {
    int expected = kRunning;
    b->launch->status.compare_exchange_strong(expected, status);
    append_log(b, why.data(), why.size());
}

// ---------------------------------------------------------------------------------------------------
// Fiber switches
// ---------------------------------------------------------------------------------------------------
void sync_release([[maybe_unused]] char* token) {
#if defined(COMMKIT_HOST_TSAN)
    __tsan_release(token);
#endif
}
void sync_acquire([[maybe_unused]] char* token) {
#if defined(COMMKIT_HOST_TSAN)
    __tsan_acquire(token);
#endif
}

void switch_to_fiber(Block* b, Fiber* f) {
    b->current = f;
#if defined(COMMKIT_HOST_TSAN)
    // The first entry synchronises (the fiber starts after the block's setup), later ones do not:
    // fibers of one OS thread are ordered only by the kernel's own synchronisation.
    __tsan_switch_to_fiber(f->tsan_fiber, f->started ? kTsanNoSync : 0);
#endif
    f->started = true;
#if defined(COMMKIT_HOST_ASAN)
    __sanitizer_start_switch_fiber(&b->asan_fake_stack, f->stack, b->launch->config.stack_bytes);
#endif
    swapcontext(&b->scheduler, &f->context);
#if defined(COMMKIT_HOST_ASAN)
    __sanitizer_finish_switch_fiber(b->asan_fake_stack, nullptr, nullptr);
#endif
    b->current = nullptr;
}

// Back to the block's scheduler; `final`: the fiber never runs again. NOTE: never a synchronising
// switch, not even the last one: the scheduler would pass an exited thread's history on to every
// thread it enters first afterwards (the exit token orders it before the end of the launch instead).
void switch_to_scheduler(Fiber* f, [[maybe_unused]] bool final) {
    Block* b = f->block;
#if defined(COMMKIT_HOST_TSAN)
    __tsan_switch_to_fiber(b->tsan_scheduler, kTsanNoSync);
#endif
#if defined(COMMKIT_HOST_ASAN)
    __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake_stack, b->os_stack_bottom, b->os_stack_size);
#endif
    swapcontext(&f->context, &b->scheduler);
#if defined(COMMKIT_HOST_ASAN)
    __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

void release_warp_sync_if_complete(Block* b, int warp);

[[noreturn]] void exit_fiber(Fiber* f) {
    Block* b = f->block;
    f->state = FiberState::kDone;
    ++b->num_done;
    sync_release(&b->exit_token);
    // __syncwarp waits only for the lanes of its mask that have not exited
    if (b->launch->status.load(std::memory_order_relaxed) == kRunning)
        release_warp_sync_if_complete(b, f->warp);
    switch_to_scheduler(f, true);
    std::abort();  // never resumed
}

// At every scheduling point: a stopped launch ends this fiber.
void check_stopped(Fiber* f) {
    if (f->block->launch->status.load(std::memory_order_relaxed) != kRunning)
        exit_fiber(f);
}

// Waits (other fibers run) until the barrier or collective this fiber waits in releases it.
void block_until_released(Fiber* f, FiberState state) {
    f->state = state;
    switch_to_scheduler(f, false);
    check_stopped(f);
}

void fiber_entry(unsigned hi, unsigned lo) {
    Fiber* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
    Block* b = f->block;
#if defined(COMMKIT_HOST_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &b->os_stack_bottom, &b->os_stack_size);
#endif
    check_stopped(f);
    b->launch->body(b->launch->arg);
    exit_fiber(f);
}

std::string where(const Fiber& f) {
    return "block " + std::to_string(f.block->idx.x) + " thread " + std::to_string(f.index) + " (warp " +
           std::to_string(f.warp) + " lane " + std::to_string(f.lane) + ")";
}

[[noreturn]] void fault(Fiber* f, const std::string& what) {
    stop_launch(f->block, kFault, "commkit host execution: " + where(*f) + ": " + what + "\n");
    exit_fiber(f);
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::kSync: return "__syncwarp";
        case WarpOp::kShflIdx: return "__shfl_sync";
        case WarpOp::kShflXor: return "__shfl_xor_sync";
        case WarpOp::kShflUp: return "__shfl_up_sync";
        default: return "__reduce_or_sync";
    }
}

std::string hex(uint32_t v) {
    char text[16];
    std::snprintf(text, sizeof(text), "0x%08x", v);
    return text;
}

// What every fiber of a block that cannot progress waits for (a deadlock or a watchdog report).
std::string block_state(const Block& b) {
    std::string out;
    for (int id = 0; id < kNumNamedBarriers; ++id) {
        const Barrier& bar = b.barriers[id];
        if (bar.expected == 0)
            continue;
        out += "  barrier " + std::to_string(id) + ": " + std::to_string(bar.arrived) + " of " +
               std::to_string(bar.expected) + " threads arrived (threads";
        for (size_t i = 0; i < bar.waiting.size() && i < 8; ++i)
            out += " " + std::to_string(bar.waiting[i]);
        out += bar.waiting.size() > 8 ? " ...)\n" : ")\n";
    }
    for (size_t w = 0; w < b.warps.size(); ++w) {
        const WarpCollective& c = b.warps[w];
        if (c.active)
            out += "  warp " + std::to_string(w) + ": " + op_name(c.op) + " mask " + hex(c.mask) + ", lanes " +
                   hex(c.arrived) + " arrived\n";
    }
    int exited = 0;
    for (const Fiber& f : b.fibers)
        exited += f.state == FiberState::kDone;
    out += "  " + std::to_string(exited) + " of " + std::to_string(b.fibers.size()) + " threads exited\n";
    return out;
}

// ---------------------------------------------------------------------------------------------------
// One block: its fibers on this OS thread
// ---------------------------------------------------------------------------------------------------
void run_block(Block* b) {
    Launch* launch = b->launch;
    const size_t num_fibers = b->fibers.size();
    const size_t stack_bytes = launch->config.stack_bytes;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    t_block = b;
    b->stacks_bytes = num_fibers * stack_bytes;
    void* stacks = mmap(nullptr, b->stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
    if (stacks == MAP_FAILED) {
        stop_launch(b, kFault, "commkit host execution: cannot map the fiber stacks of block " +
                                   std::to_string(b->idx.x) + "\n");
        return;
    }
    b->stacks = static_cast<char*>(stacks);
#if defined(COMMKIT_HOST_TSAN)
    b->tsan_scheduler = __tsan_get_current_fiber();
#endif
    for (size_t i = 0; i < num_fibers; ++i) {
        Fiber& f = b->fibers[i];
        f.stack = b->stacks + i * stack_bytes;
        mprotect(f.stack, page, PROT_NONE);  // a guard page: a stack overflow faults at once
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = stack_bytes;
        f.context.uc_link = nullptr;
        const auto ptr = reinterpret_cast<uintptr_t>(&f);
        makecontext(&f.context, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(ptr >> 32),
                    static_cast<unsigned>(ptr & 0xffffffffu));
#if defined(COMMKIT_HOST_TSAN)
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }

    std::vector<int> order(num_fibers);
    for (size_t i = 0; i < num_fibers; ++i)
        order[i] = static_cast<int>(i);
    std::mt19937_64 rng(launch->config.seed * 0x9e3779b97f4a7c15ull + b->idx.x);
    while (launch->status.load(std::memory_order_relaxed) == kRunning) {
        if (launch->config.seed != 0)
            std::shuffle(order.begin(), order.end(), rng);
        bool ran = false;
        for (int i : order) {
            Fiber& f = b->fibers[i];
            if (f.state != FiberState::kRunnable)
                continue;
            ran = true;
            switch_to_fiber(b, &f);
            if (launch->status.load(std::memory_order_relaxed) != kRunning)
                break;
        }
        if (static_cast<size_t>(b->num_done) == num_fibers)
            break;
        if (!ran) {  // every thread left waits at a barrier or collective that nobody else can reach
            stop_launch(b, kFault,
                        "commkit host execution: block " + std::to_string(b->idx.x) +
                            " cannot progress: a barrier or warp collective that not every required thread "
                            "reaches\n" +
                            block_state(*b));
            break;
        }
        const int64_t elapsed = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::steady_clock::now() - launch->start)
                                    .count();
        if (launch->config.watchdog_ns > 0 && elapsed > launch->config.watchdog_ns) {
            stop_launch(b, kFault,
                        "commkit host execution: block " + std::to_string(b->idx.x) + " still ran after the watchdog (" +
                            std::to_string(launch->config.watchdog_ns / 1000000) + " ms)\n" + block_state(*b));
            break;
        }
        sched_yield();  // the other blocks (OS threads) progress too
    }

    // A stopped launch: every thread left runs once more, to its next scheduling point, where it sees
    // the stop and exits (so that every thread's effects are ordered before the end of the launch)
    for (Fiber& f : b->fibers)
        if (f.state != FiberState::kDone)
            switch_to_fiber(b, &f);
    sync_acquire(&b->exit_token);  // the block's threads' effects before the launch's end (join)
#if defined(COMMKIT_HOST_TSAN)
    for (Fiber& f : b->fibers)
        __tsan_destroy_fiber(f.tsan_fiber);
#endif
#if defined(COMMKIT_HOST_ASAN)
    for (size_t i = 0; i < num_fibers; ++i)  // threads that exited mid-function keep poisoned frames
        __asan_unpoison_memory_region(b->stacks + i * stack_bytes + page, stack_bytes - page);
#endif
    munmap(b->stacks, b->stacks_bytes);
    t_block = nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// The interface of runtime.h
// ---------------------------------------------------------------------------------------------------
const Dim3& thread_idx() { return current_fiber()->tid; }
const Dim3& block_idx() { return current_fiber()->block->idx; }
const Dim3& block_dim() { return current_fiber()->block->launch->block; }
const Dim3& grid_dim() { return current_fiber()->block->launch->grid; }
int lane_id() { return current_fiber()->lane; }

void yield() {
    Fiber* f = current_fiber();
    check_stopped(f);
    switch_to_scheduler(f, false);
    check_stopped(f);
}

// TSan: the completing thread acquires every waiter's arrival, then releases into each waiter's token
// (each waiter acquires its own token when it runs again).
void complete_sync(Fiber* completer, const int* waiters, int num_waiters) {
    Block* b = completer->block;
    for (int i = 0; i < num_waiters; ++i)
        sync_acquire(&b->fibers[waiters[i]].token);
    for (int i = 0; i < num_waiters; ++i)
        sync_release(&b->fibers[waiters[i]].token);
}

void barrier_sync(int id, int num_threads) {
    Fiber* f = current_fiber();
    Block* b = f->block;
    check_stopped(f);
    const int block_threads = static_cast<int>(b->fibers.size());
    if (id < 0 || id >= kNumNamedBarriers)
        fault(f, "bar.sync: barrier id " + std::to_string(id) + " is not in [0, 16)");
    if (num_threads <= 0 || num_threads % kWarpSize != 0 || num_threads > block_threads)
        fault(f, "bar.sync " + std::to_string(id) + ": thread count " + std::to_string(num_threads) +
                     " is not a multiple of 32 in [32, " + std::to_string(block_threads) + "]");
    Barrier& bar = b->barriers[id];
    if (bar.expected == 0) {
        bar.expected = num_threads;
    } else if (bar.expected != num_threads) {
        fault(f, "bar.sync " + std::to_string(id) + ": arrives with thread count " + std::to_string(num_threads) +
                     " at a barrier whose phase in progress counts " + std::to_string(bar.expected));
    }
    sync_release(&f->token);
    ++bar.arrived;
    bar.waiting.push_back(f->index);
    if (bar.arrived < bar.expected) {
        f->barrier = id;
        block_until_released(f, FiberState::kAtBarrier);
    } else {
        // Complete: whole warps only (bar.sync is .aligned: every thread of a warp executes it)
        int lanes[kMaxWarps] = {};
        for (int i : bar.waiting)
            ++lanes[b->fibers[i].warp];
        for (size_t w = 0; w < b->warps.size(); ++w)
            if (lanes[w] != 0 && lanes[w] != kWarpSize)
                fault(f, "bar.sync " + std::to_string(id) + ": completed with " + std::to_string(lanes[w]) +
                             " of the 32 threads of warp " + std::to_string(w) +
                             " (every thread of a warp must reach it)");
        complete_sync(f, bar.waiting.data(), static_cast<int>(bar.waiting.size()));
        for (int i : bar.waiting) {
            Fiber& other = b->fibers[i];
            other.barrier = -1;
            if (&other != f)
                other.state = FiberState::kRunnable;
        }
        bar.waiting.clear();
        bar.arrived = 0;
        bar.expected = 0;
    }
    sync_acquire(&f->token);
}

namespace {

uint32_t exited_lanes(const Block& b, int warp) {
    uint32_t exited = 0;
    for (int l = 0; l < kWarpSize; ++l) {
        const size_t t = static_cast<size_t>(warp) * kWarpSize + static_cast<size_t>(l);
        if (t < b.fibers.size() && b.fibers[t].state == FiberState::kDone)
            exited |= 1u << l;
    }
    return exited;
}

// Completes warp `warp`'s collective in progress (every lane of its mask arrived; for __syncwarp,
// arrived or exited): results for every arrived lane, which run again. `completer`: the arriving
// thread that completed it (null: a lane's exit did).
void complete_warp_collective(Block* b, int warp, Fiber* completer) {
    WarpCollective& c = b->warps[warp];
    const uint32_t mask = c.mask;
    int waiters[kWarpSize];
    int num_waiters = 0;
    uint32_t reduced = 0;
    for (int l = 0; l < kWarpSize; ++l)
        if ((c.arrived >> l) & 1u) {
            reduced |= c.values[l];
            waiters[num_waiters++] = warp * kWarpSize + l;
        }
    for (int i = 0; i < num_waiters; ++i) {
        Fiber& target = b->fibers[waiters[i]];
        const int l = target.lane;
        const int segment = l / c.width * c.width;
        const int operand = c.operands[l];
        int src = l;
        switch (c.op) {  // NOTE: lane operands as the hardware reads them (the low 5 bits)
            case WarpOp::kShflIdx: src = segment + (operand & (c.width - 1)); break;
            case WarpOp::kShflXor: src = l ^ (operand & 31); src = src < segment + c.width ? src : l; break;
            case WarpOp::kShflUp: src = l - (operand & 31) >= segment ? l - (operand & 31) : l; break;
            default: break;
        }
        if (c.op == WarpOp::kReduceOr) {
            target.result = reduced;
        } else if (c.op == WarpOp::kSync) {
            target.result = 0;
        } else {
            if (((mask >> src) & 1u) == 0 || ((c.arrived >> src) & 1u) == 0)
                fault(completer != nullptr ? completer : &target, std::string(op_name(c.op)) + ": lane " + std::to_string(l) + " reads lane " +
                                     std::to_string(src) + ", which is not in mask " + hex(mask));
            target.result = c.values[src];
        }
    }
    if (c.op == WarpOp::kSync && completer != nullptr)
        complete_sync(completer, waiters, num_waiters);
    for (int i = 0; i < num_waiters; ++i)
        if (&b->fibers[waiters[i]] != completer)
            b->fibers[waiters[i]].state = FiberState::kRunnable;
    c.active = false;
    c.arrived = 0;
}

// A lane exited: a __syncwarp that waited only for it completes (CUDA: the non-exited lanes of the
// mask). NOTE: without TSan synchronisation among the waiters (the exiting thread must not look
// ordered before them): a race report rather than a hidden race, in a case no kernel has.
void release_warp_sync_if_complete(Block* b, int warp) {
    WarpCollective& c = b->warps[warp];
    if (c.active && c.op == WarpOp::kSync && c.arrived != 0 && ((c.arrived | exited_lanes(*b, warp)) & c.mask) == c.mask)
        complete_warp_collective(b, warp, nullptr);
}

}  // namespace

uint32_t warp_collective(WarpOp op, uint32_t mask, uint32_t value, int operand, int width) {
    Fiber* f = current_fiber();
    Block* b = f->block;
    check_stopped(f);
    WarpCollective& c = b->warps[f->warp];
    const int lane = f->lane;
    if (((mask >> lane) & 1u) == 0)
        fault(f, std::string(op_name(op)) + ": mask " + hex(mask) + " does not name the calling lane");
    if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
        fault(f, std::string(op_name(op)) + ": width " + std::to_string(width) + " is not a power of 2 up to 32");
    if (!c.active) {
        c.active = true;
        c.op = op;
        c.mask = mask;
        c.width = width;
        c.arrived = 0;
    } else if (c.op != op || c.mask != mask || c.width != width) {
        // NOTE: one collective per warp at a time: divergent collectives with disjoint masks (legal in
        // CUDA, used by no kernel here) are reported too
        fault(f, std::string(op_name(op)) + " (mask " + hex(mask) + ") while lanes " + hex(c.arrived) + " of warp " +
                     std::to_string(f->warp) + " wait in " + op_name(c.op) + " (mask " + hex(c.mask) +
                     "): every lane of a mask must make the same call");
    }
    c.values[lane] = value;
    c.operands[lane] = operand;
    c.arrived |= 1u << lane;
    if (op == WarpOp::kSync)
        sync_release(&f->token);
    const uint32_t present = op == WarpOp::kSync ? c.arrived | exited_lanes(*b, f->warp) : c.arrived;
    if ((present & mask) != mask)
        block_until_released(f, FiberState::kAtWarpOp);
    else
        complete_warp_collective(b, f->warp, f);
    if (op == WarpOp::kSync)
        sync_acquire(&f->token);
    return f->result;
}

void trap() {
    Fiber* f = current_fiber();
    stop_launch(f->block, kTrapped, "");
    exit_fiber(f);
}

int device_printf(const char* format, ...) {
    char text[1024];
    va_list args;
    va_start(args, format);
    const int n = std::vsnprintf(text, sizeof(text), format, args);
    va_end(args);
    if (n > 0 && t_block != nullptr)
        append_log(t_block, text, std::strlen(text));
    return n;
}

uint64_t globaltimer_ns() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
}

int launch(const LaunchConfig& config, void (*body)(void*), void* arg, char* log, size_t log_bytes) {
    auto refuse = [&](const std::string& why) {
        if (log != nullptr && log_bytes > 0)
            std::snprintf(log, log_bytes, "commkit host execution: %s\n", why.c_str());
        return static_cast<int>(kFault);
    };
    if (config.block_x == 0 || config.block_x % kWarpSize != 0 || config.block_x > kMaxWarps * kWarpSize)
        return refuse("a block of " + std::to_string(config.block_x) + " threads (expected a multiple of 32 up to 1024)");
    if (config.grid_x == 0 || config.grid_x > kMaxBlocks)
        return refuse("a grid of " + std::to_string(config.grid_x) + " blocks (expected 1 to " +
                      std::to_string(kMaxBlocks) + ": one OS thread each)");
    Launch launch;
    launch.config = config;
    launch.body = body;
    launch.arg = arg;
    launch.grid = {config.grid_x, 1, 1};
    launch.block = {config.block_x, 1, 1};
    launch.start = std::chrono::steady_clock::now();
    const unsigned num_warps = config.block_x / kWarpSize;
    std::vector<Block> blocks(config.grid_x);
    for (unsigned i = 0; i < config.grid_x; ++i) {
        Block& b = blocks[i];
        b.launch = &launch;
        b.idx = {i, 0, 0};
        b.fibers.resize(config.block_x);
        b.warps.resize(num_warps);
        for (Barrier& bar : b.barriers)
            bar.waiting.reserve(config.block_x);
        for (unsigned t = 0; t < config.block_x; ++t) {
            Fiber& f = b.fibers[t];
            f.block = &b;
            f.tid = {t, 0, 0};
            f.index = static_cast<int>(t);
            f.lane = static_cast<int>(t % kWarpSize);
            f.warp = static_cast<int>(t / kWarpSize);
        }
    }
    // NOTE: the last resort against a thread that never reaches a scheduling point (a loop without a
    // strong load, which no kernel has): past twice its watchdog the launch cannot be stopped, so the
    // process exits with a report instead of hanging
    std::mutex done_mutex;
    std::condition_variable done_cv;
    bool done = false;
    std::thread guard;
    if (config.watchdog_ns > 0) {
        guard = std::thread([&] {
            std::unique_lock<std::mutex> lock(done_mutex);
            const auto limit = launch.start + std::chrono::nanoseconds(2 * config.watchdog_ns);
            if (!done_cv.wait_until(lock, limit, [&] { return done; })) {
                std::fprintf(stderr,
                             "commkit host execution: a kernel thread ran twice its watchdog (%lld ms) without "
                             "reaching a scheduling point (a barrier, a warp collective or a strong load); "
                             "exiting the process\n",
                             static_cast<long long>(config.watchdog_ns / 1000000));
                std::_Exit(70);
            }
        });
    }
    std::vector<std::thread> threads;
    threads.reserve(config.grid_x);
    try {
        for (Block& b : blocks)
            threads.emplace_back(run_block, &b);
    } catch (const std::system_error& exc) {  // e.g. too many threads: stop the ones started
        stop_launch(&blocks[0], kFault,
                    std::string("commkit host execution: cannot start the block threads: ") + exc.what() + "\n");
    }
    for (std::thread& t : threads)
        t.join();
    {
        std::lock_guard<std::mutex> lock(done_mutex);
        done = true;
    }
    done_cv.notify_all();
    if (guard.joinable())
        guard.join();
    // The blocks' logs, in block order (and on stderr, as a GPU's printf)
    std::string text;
    for (const Block& b : blocks)
        text.append(b.log, b.log_len);
    if (!text.empty())
        std::fputs(text.c_str(), stderr);
    if (log != nullptr && log_bytes > 0) {
        const size_t n = text.size() < log_bytes - 1 ? text.size() : log_bytes - 1;
        text.copy(log, n);
        log[n] = '\0';
    }
    return launch.status.load();
}

}  // namespace commkit::host
