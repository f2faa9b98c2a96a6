"""The ``kernels`` backend: dispatch and combine with the JIT-compiled kernels of ``csrc/``.

``KernelEngine`` runs the kernels for a run of ranks of one EP group whose symmetric buffers are given
by base pointers: one rank per process (``KernelsBackend``, buffers exchanged through CUDA IPC), or all
ranks on one GPU (``commkit.emulate``, buffers carved out of one allocation). The kernels are the
same; a launch covers ``num_local`` ranks starting at ``rank_base`` with ``num_sms`` blocks each.

Per dispatch: ``layout`` kernel (counts, ``is_token_in_rank``, send positions) -> ``notify`` (call
agreement and count exchange, barrier, prefix sums) -> host reads the receive counts (skipped with
``num_worst_tokens``) -> ``dispatch``. With a handle: ``cached_notify`` (agreement and barrier) ->
``dispatch``. Per combine: ``cached_notify`` -> ``combine``. All on the communication stream; CuPy is
imported lazily.

Agreement (``csrc/notify.cuh``): every notify exchanges the call's descriptor with the peers at its
barrier (``count_exchange.KERNEL_FORMAT_NAMES``: op, the buffer's call sequence number, kept on the
device, num_experts, hidden, top-k, dtype, num_sms and the sequence number of the handle's dispatch)
and writes a ``status`` per rank. If any rank made another call, every rank's payload kernel skips
(no queue is touched, so the next call works) and fills its outputs with all bits set (NaN rows, -1
indices). The host raises ``ValueError`` naming the fields and the rank: at once on the CPU (host
execution) and where the counts are read back anyway (a fresh dispatch without ``num_worst_tokens``);
otherwise, without a host sync, at the end of the first later call into the engine that finds the
call's status copied back, after that call's kernels are launched, so that every rank still makes
every call (``check_agreement(wait=True)`` waits for it; inside a CUDA-graph capture only the
poisoned outputs tell).

Hot path: the loaded kernels and their occupancy checks (per instantiation) and the small device
tensors of offsets (per value tuple) are cached on the engine, the CuPy stream views (per CUDA
stream) on its launcher (``commkit.backends.launcher``), so a call with the shapes and counts of an
earlier call makes no host sync and no host-to-device copy (CUDA-graph capturable with
``num_worst_tokens``: warm up once, then capture).

Kernel timing (``KernelEngine.kernel_events``, on when ``record_kernel_events`` is set and the device
is CUDA, skipped while a CUDA graph is being captured): per op ("layout", "dispatch", "combine") a
pair of ``enable_timing`` events recorded on the communication stream, immediately before the first
kernel launch of the op's most recent call (the notify / barrier kernels included) and immediately
after its last one. Between them lie only kernels of the op, except that a dispatch that reads the
counts back (no handle, no ``num_worst_tokens``) leaves the GPU idle while the host reads them and
allocates the outputs: ``kernel_segments[op]`` then has one (start, end) pair per run of launches
without a host read-back in between, and their summed elapsed times exclude that gap.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from commkit.backends import kernels_layout as kl
from commkit.backends.base import WithoutKnobs
from commkit.backends.count_exchange import OPS, status_error
from commkit.backends.kernel_args import (
    CachedNotifyArgs,
    CombineArgs,
    DispatchArgs,
    KernelArgs,
    LayoutArgs,
    NotifyArgs,
)
from commkit.backends.launcher import Launcher, for_device, stream_context
from commkit.backends.shared_memory import SharedMemoryBuffers, check_one_host
from commkit.backends.symmetric import IpcBuffers, SymmetricBuffers
from commkit.errors import CommError, CommTimeoutError, ConfigError
from commkit.jit.compiler import JIT_TIMEOUT_S, KernelSpec
from commkit.types import CombineOutput, DispatchOutput, EventHandle, Handle, Layout

SPIN_S = 200e-6  # host waits poll without sleeping this long first


def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _offsets(counts: list[int]) -> list[int]:
    return [0, *itertools.accumulate(counts)]


@dataclass
class KernelState:
    """Backend-private part of a handle (tensors packed over the ranks of the launch).

    send_pos:          [sum T, R] int32, position of each token among those sent to each rank, or -1
    meta:              [num_local, 2R + 1 + L] int32 (see csrc/notify.cuh)
    token_offsets:     [num_local + 1] int32, token rows of each rank in the packed inputs
    recv_row_offsets:  [num_local] int32, received rows of each rank in the packed outputs
    recv_src_token:    [sum N_recv] int32, source token of each received row
    recv_counts:       N_recv per rank (None with num_worst_tokens: not read back)
    expert_counts:     unaligned rows per local expert, per rank (None with num_worst_tokens)
    status:            [num_local, STATUS_INTS] int32, the agreement of the dispatch (its sequence
                       number ties the handle to it; None where the host agrees: internode processes)
    """

    send_pos: torch.Tensor
    meta: torch.Tensor
    token_offsets: torch.Tensor
    token_counts: list[int]
    recv_row_offsets: torch.Tensor
    recv_src_token: torch.Tensor
    recv_counts: list[int] | None
    expert_counts: list[list[int]] | None
    num_worst_tokens: int | None
    status: torch.Tensor | None


@dataclass(frozen=True)
class CallArgs:
    """A call's descriptor as the host knows it (``csrc/common.cuh`` CallField; the sequence numbers
    live on the device). ``handle_status``: the status of the dispatch that made the handle."""

    op: int  # kernels_layout.OP_*
    num_experts: int
    hidden: int
    num_topk: int
    dtype: int
    num_sms: int
    handle_status: torch.Tensor | None = None

    def descriptor(self) -> dict[str, int]:
        """The fields the notify kernels take as they are (``NotifyArgs``, ``CachedNotifyArgs``)."""
        return {"num_experts": self.num_experts, "hidden": self.hidden, "num_topk": self.num_topk,
                "dtype": self.dtype, "num_sms": self.num_sms}  # fmt: skip

    def own(self, status_row: list[int], local_idx: int) -> tuple[int, ...]:
        """This rank's whole descriptor (``count_exchange.KERNEL_FORMAT_NAMES``); reads the handle's
        sequence number back (the error path only)."""
        handle = -1
        if self.handle_status is not None:
            handle = int(self.handle_status[local_idx, kl.STATUS_SEQ])
        return (self.op, status_row[kl.STATUS_SEQ], self.num_experts, self.hidden, self.num_topk, self.dtype,
                self.num_sms, handle)  # fmt: skip


@dataclass
class _PendingAgreement:
    """A call's status on its way to the host (pinned copy) and the event after the copy."""

    host: torch.Tensor
    event: torch.cuda.Event
    call: CallArgs
    phase: str


@dataclass
class DispatchResult:
    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    row_offsets: list[int]  # rows of each rank in the packed outputs (length num_local + 1)
    state: KernelState


class KernelEngine:
    """Launches the kernels for ranks [rank_base, rank_base + num_local) of a num_ranks-rank group."""

    max_ranks = kl.MAX_RANKS  # ranks of a group the kernels serve (one NVLink domain)

    def __init__(
        self,
        num_ranks: int,
        rank_base: int,
        num_local: int,
        buffers: SymmetricBuffers,
        *,
        timeout_s: float,
        device: torch.device,
        launcher: Launcher | None = None,
    ) -> None:
        """``launcher``: where the kernels run (``commkit.backends.launcher``; default: CuPy on a CUDA
        device, the host execution on the CPU)."""
        if not 1 <= num_ranks <= self.max_ranks:
            raise ConfigError(f"num_ranks: the kernels support 1 to {self.max_ranks} ranks, got {num_ranks}")
        self.num_ranks = num_ranks
        self.rank_base = rank_base
        self.num_local = num_local
        self.buffers = buffers
        self.timeout_s = timeout_s
        self.device = device
        self.launcher = launcher or for_device(device)
        self._num_sms_device = self.launcher.num_sms
        # Device waits are bounded in nanoseconds of %globaltimer (independent of the SM clock)
        self._timeout_ns = int(timeout_s * 1e9)
        self._offsets_cache: dict[tuple[int, ...], torch.Tensor] = {}
        # Hot-path caches (see the module docstring); one thread uses an engine at a time
        self._kernels: dict[tuple[Any, ...], Any] = {}
        self._occupancy: dict[Any, int] = {}  # kernel -> blocks per SM
        self._budget_ok: set[tuple[Any, int]] = set()  # (kernel, num_sms) that passed _check_budget
        self._pinned: dict[tuple[int, ...], torch.Tensor] = {}  # host buffers of the count read-back
        # Kernel timing (module docstring): off unless record_kernel_events
        self.record_kernel_events = False
        self.kernel_events: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self.kernel_segments: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        self._segment_start: torch.cuda.Event | None = None
        # Tests set this: outputs are filled with 0xFF bytes before the kernels run, so unwritten
        # rows show (NaN for floats, -1 for integers).
        self.poison_outputs = False
        # Agreements whose verdict has not been seen on the host yet (CUDA: see check_agreement)
        self._pending: list[_PendingAgreement] = []
        self._spare: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # checked ones, for reuse
        self._failed: BaseException | None = None  # an earlier call that left the buffers unusable
        self._loaded_anew = False  # this call loaded (maybe compiled) a kernel: see _first_wait_ns

    # ------------------------------------------------------------------ helpers
    def _kernel(
        self,
        header: str,
        name: str,
        *args: int | str,
        include_dirs: tuple[str, ...] = (),
        defines: tuple[str, ...] = (),
    ) -> Any:
        key = (header, name, *args, include_dirs, defines)
        kernel = self._kernels.get(key)
        if kernel is None:
            spec = KernelSpec(header, name, tuple(args), include_dirs, defines)
            kernel = self._kernels[key] = self.launcher.kernel(spec)
            self._loaded_anew = True
        return kernel

    def _launch(self, kernel: Any, num_blocks: int, num_threads: int, args: KernelArgs) -> None:
        if num_blocks == 0:
            return
        if self._timing is not None and self._segment_start is None:
            self._segment_start = _timing_event(torch.cuda.current_stream(self.device))
        try:
            self.launcher.launch(kernel, num_blocks, num_threads, args)
        except CommTimeoutError as exc:
            # NOTE: a kernel that trapped left queues and barriers half done (on a GPU the context is
            # lost too): no later call may run on these buffers
            self._failed = exc
            raise

    def _check_usable(self) -> None:
        """Raises if an earlier call left the buffers unusable."""
        if self._failed is not None:
            raise CommError(
                f"ranks {self.rank_base}..{self.rank_base + self.num_local - 1}: the buffers cannot be used "
                f"after an earlier call failed ({self._failed}); make a new Buffer"
            ) from self._failed
        self._loaded_anew = False

    def _check_earlier(self) -> None:
        """At the end of a call, once its kernels are launched (so that the ranks stay in step: a
        peer may see the same verdict a call later): the deferred verdicts that reached the host."""
        if self._pending:
            self.check_agreement(wait=False)

    def _first_wait_ns(self) -> int:
        """The wait budget of a call's first barrier (its notify): ``timeout_s``, plus ``JIT_TIMEOUT_S``
        when this call loaded a kernel anew. Every rank loads a format's kernels in the same call, and
        each loads all of them before its first launch, so a peer still compiling is waited for here
        and no later wait of the call counts compile time."""
        return self._timeout_ns + (int(JIT_TIMEOUT_S * 1e9) if self._loaded_anew else 0)

    def _check_budget(self, kernel: Any, num_sms: int) -> None:
        """All blocks of a launch must be resident at once (they wait for each other)."""
        key = (kernel, num_sms)  # kernels are cached for the process: keys stay unique
        if key in self._budget_ok:
            return
        self._check_num_sms(num_sms)
        per_sm = self._occupancy.get(kernel)
        if per_sm is None:
            per_sm = self._occupancy[kernel] = self._blocks_per_sm(kernel)
        capacity = per_sm * self._num_sms_device
        if self.num_local * num_sms > capacity:
            raise ConfigError(
                f"num_sms: {self.num_local} ranks x {num_sms} SMs = {self.num_local * num_sms} blocks "
                f"must be resident at once, but this GPU holds {capacity} ({per_sm} per SM x "
                f"{self._num_sms_device} SMs for {kl.NUM_THREADS}-thread blocks); "
                f"use num_sms <= {capacity // self.num_local}"
            )
        self._budget_ok.add(key)

    def _check_num_sms(self, num_sms: int) -> None:
        if not 1 <= num_sms <= self._num_sms_device:
            raise ConfigError(
                f"num_sms: expected 1 to {self._num_sms_device} (the device's SMs), got {num_sms}"
            )

    def _blocks_per_sm(self, kernel: Any) -> int:
        return self.launcher.blocks_per_sm(kernel, kl.NUM_THREADS)

    def _device_offsets(self, values: list[int]) -> torch.Tensor:
        """A cached int32 device tensor of ``values``. A miss copies from pinned memory without a
        host sync; during CUDA-graph capture a miss is an error (the graph would keep reading a
        host buffer that is reused): warm up with the same counts before capturing."""
        key = tuple(values)
        cached = self._offsets_cache.get(key)
        if cached is None:
            host = torch.tensor(values, dtype=torch.int32)
            if self.device.type == "cuda":
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        f"CUDA-graph capture: the offsets {list(values)} were not used by an earlier "
                        "call; run the call once with the same token counts (and num_worst_tokens) "
                        "before capturing it"
                    )
                host = host.pin_memory()
            if len(self._offsets_cache) > 256:
                self._offsets_cache.clear()
            cached = host.to(self.device, non_blocking=True)
            self._offsets_cache[key] = cached
        return cached

    def _read_counts(self, meta: torch.Tensor, phase: str) -> list[list[int]]:
        """``meta`` read back to the host: pinned buffer, asynchronous copy, bounded event wait."""
        if meta.device.type != "cuda":
            return meta.tolist()
        self._timing_break()  # the GPU idles while the host reads the counts
        host = self._pinned.get(tuple(meta.shape))
        if host is None:
            host = self._pinned[tuple(meta.shape)] = torch.empty(
                meta.shape, dtype=meta.dtype, pin_memory=True
            )
        stream = torch.cuda.current_stream(self.device)
        host.copy_(meta, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        try:
            self._wait(phase, event)
        except CommTimeoutError as exc:
            self._failed = exc
            raise
        return host.tolist()

    def _wait(self, phase: str, event: torch.cuda.Event) -> None:
        """Bounded host wait for ``event``: polls without sleeping for ``SPIN_S``, then sleeps
        between polls; raises ``CommTimeoutError`` naming the phase after ``timeout_s``."""
        if event.query():
            return
        start = time.monotonic()
        while not event.query():
            elapsed = time.monotonic() - start
            if elapsed > self.timeout_s:
                raise CommTimeoutError(
                    f"{phase}: the GPU work did not finish within timeout_s={self.timeout_s:g}s "
                    f"(ranks {self.rank_base}..{self.rank_base + self.num_local - 1}; a peer may not have "
                    "called the same operation)"
                )
            if elapsed > SPIN_S:
                time.sleep(50e-6)

    # ------------------------------------------------------------------ kernel timing
    def _timing_begin(self) -> None:
        self._segment_start = None
        self._timing = (
            []
            if self.record_kernel_events
            and self.device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing()
            else None
        )

    def _timing_break(self) -> None:
        if self._timing is not None and self._segment_start is not None:
            end = _timing_event(torch.cuda.current_stream(self.device))
            self._timing.append((self._segment_start, end))
            self._segment_start = None

    def _timing_end(self, op: str) -> None:
        self._timing_break()
        if self._timing:
            self.kernel_events[op] = (self._timing[0][0], self._timing[-1][1])
            self.kernel_segments[op] = self._timing
        self._timing = None

    def _poison(self, *tensors: torch.Tensor | None) -> None:
        if self.poison_outputs:
            for t in tensors:
                if t is not None and t.numel():
                    t.view(torch.uint8).fill_(0xFF)

    @staticmethod
    def _check_aligned(name: str, t: torch.Tensor | None) -> None:
        # NOTE: rows move in 16-byte words; a contiguous view with an odd storage offset would fault
        if t is not None and t.data_ptr() % 16:
            raise ConfigError(
                f"{name}: the kernels need a 16-byte aligned tensor, got address {t.data_ptr():#x}"
            )

    def _check_shapes(self, num_experts: int, hidden: int, num_topk: int, fp8: bool) -> None:
        if num_experts % self.num_ranks or num_experts > kl.MAX_EXPERTS:
            raise ConfigError(
                f"num_experts: the kernels need a multiple of the {self.num_ranks} ranks and at most "
                f"{kl.MAX_EXPERTS}, got {num_experts}"
            )
        if num_experts // self.num_ranks > kl.MAX_LOCAL_EXPERTS:
            raise ConfigError(
                f"num_experts: the kernels support at most {kl.MAX_LOCAL_EXPERTS} experts per rank, got "
                f"{num_experts} / {self.num_ranks} ranks = {num_experts // self.num_ranks}"
            )
        if hidden % 8 or (fp8 and hidden % kl.FP8_GROUP_SIZE):
            raise ConfigError(f"hidden: the kernels need H % 8 == 0 (H % 128 == 0 for FP8), got {hidden}")
        if hidden > kl.MAX_HIDDEN:
            raise ConfigError(f"hidden: the kernels support H <= {kl.MAX_HIDDEN}, got {hidden}")
        if not 1 <= num_topk <= 32:
            raise ConfigError(f"topk_idx: the kernels support 1 to 32 top-k slots (columns), got {num_topk}")

    # ------------------------------------------------------------------ agreement
    def _raise_disagreement(self, status_host: list[list[int]], call: CallArgs, phase: str) -> None:
        for local_idx, row in enumerate(status_host):
            error = status_error(row, call.own(row, local_idx))
            if error is not None:
                raise ValueError(
                    f"{OPS[call.op]}: the ranks disagree (phase '{phase}', rank {self.rank_base + local_idx} "
                    f"of {self.num_ranks}): {error}"
                )

    def _settle(self, status: torch.Tensor, call: CallArgs, phase: str) -> None:
        """The verdict of a call whose counts are not read back: on the CPU read now (raises before
        the payload kernel), on CUDA copied back without a host sync and checked later."""
        if status.device.type != "cuda":
            self._raise_disagreement(status.tolist(), call, phase)
            return
        if torch.cuda.is_current_stream_capturing():
            return  # NOTE: a graph replays the copy into one host buffer: the outputs' poison tells
        # NOTE: the pinned buffers and events of checked calls are reused (no allocation per call)
        host, event = self._spare.pop() if self._spare else (
            torch.empty(status.shape, dtype=status.dtype, pin_memory=True), torch.cuda.Event())  # fmt: skip
        host.copy_(status, non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        self._pending.append(_PendingAgreement(host, event, call, phase))
        if len(self._pending) > 256:  # bounded: wait for the oldest
            self.check_agreement(wait=True)

    def _grow_or_settle(
        self, status: torch.Tensor, call: CallArgs, phase: str, num_sms: int, slot_bytes: int
    ) -> None:
        """After the notify: grow the buffers if the call needs it, else ``_settle``. The growth is a
        collective of the ranks sized by the call, so the verdict is read first (the growth syncs the
        host anyway): ranks that disagree raise instead of entering a collective their peers skip."""
        if self.buffers.fits(num_sms, slot_bytes):
            self._settle(status, call, phase)
            return
        self._raise_disagreement(self._read_counts(status, phase), call, phase)
        self.buffers.ensure(num_sms, slot_bytes)

    def check_agreement(self, *, wait: bool = True) -> None:
        """Raises ``ValueError`` for the first earlier call whose ranks disagreed (its outputs were
        poisoned on the device). ``wait``: wait (bounded by ``timeout_s``) for every call launched so
        far; else look only at those whose status has reached the host."""
        while self._pending:
            pending = self._pending[0]
            if wait:
                self._wait(pending.phase, pending.event)
            elif not pending.event.query():
                return
            self._pending.pop(0)
            self._spare.append((pending.host, pending.event))
            self._raise_disagreement(
                pending.host.tolist(),
                pending.call,
                f"{pending.phase} (an earlier call: its outputs are poisoned)",
            )

    # ------------------------------------------------------------------ layout
    def layout(
        self, topk_idx: torch.Tensor, token_counts: list[int], num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed layout of the launch's ranks: per-rank counts [num_local, R], per-expert counts
        [num_local, E], is_token_in_rank [sum T, R], send_pos [sum T, R], token_offsets."""
        self._timing_begin()
        per_rank, per_expert, in_rank, send_pos, token_offsets = self._layout(
            topk_idx, token_counts, num_experts, with_in_rank=True
        )
        self._timing_end("layout")
        assert in_rank is not None
        return per_rank, per_expert, in_rank, send_pos, token_offsets

    def _layout(
        self, topk_idx: torch.Tensor, token_counts: list[int], num_experts: int, *, with_in_rank: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        num_tokens, num_topk = topk_idx.shape
        token_offsets = self._device_offsets(_offsets(token_counts))
        per_rank = torch.empty(self.num_local, self.num_ranks, dtype=torch.int32, device=self.device)
        per_expert = torch.empty(self.num_local, num_experts, dtype=torch.int32, device=self.device)
        in_rank = (
            torch.empty(num_tokens, self.num_ranks, dtype=torch.bool, device=self.device)
            if with_in_rank
            else None  # dispatch does not read it: the kernel skips the writes
        )
        send_pos = torch.empty(num_tokens, self.num_ranks, dtype=torch.int32, device=self.device)
        kernel = self._kernel(LayoutArgs.HEADER, LayoutArgs.KERNEL, self.num_ranks, num_topk)
        args = LayoutArgs(
            topk_idx=topk_idx,
            token_offsets=token_offsets,
            num_experts=num_experts,
            num_tokens_per_rank=per_rank,
            num_tokens_per_expert=per_expert,
            is_token_in_rank=in_rank,
            send_pos=send_pos,
        )
        self._launch(kernel, self.num_local, 512, args)
        return per_rank, per_expert, in_rank, send_pos, token_offsets

    # ------------------------------------------------------------------ dispatch
    def _dispatch_outputs(
        self, num_rows: int, hidden: int, num_topk: int, out_fp8: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, x_scales (FP8 only), topk_idx, topk_weights and src_token outputs of num_rows rows."""
        out_x = torch.empty(
            num_rows, hidden, dtype=torch.float8_e4m3fn if out_fp8 else torch.bfloat16, device=self.device
        )
        out_scales = (
            torch.empty(num_rows, hidden // kl.FP8_GROUP_SIZE, dtype=torch.float32, device=self.device)
            if out_fp8
            else None
        )
        out_idx = torch.empty(num_rows, num_topk, dtype=torch.int64, device=self.device)
        out_weights = torch.empty(num_rows, num_topk, dtype=torch.float32, device=self.device)
        out_src_token = torch.empty(num_rows, dtype=torch.int32, device=self.device)
        return out_x, out_scales, out_idx, out_weights, out_src_token

    # Steps shared with InternodeEngine.dispatch (same checks, same outputs)
    def _dispatch_format(
        self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, cast_to_fp8: bool
    ) -> tuple[int, int, int]:
        """(hidden, num_topk, dtype code) of a dispatch, its shapes and alignment checked."""
        hidden, num_topk = x.shape[1], topk_idx.shape[1]
        fp8_in = x.dtype == torch.float8_e4m3fn
        dtype_code = kl.DTYPE_FP8 if fp8_in else (kl.DTYPE_BF16_CAST_FP8 if cast_to_fp8 else kl.DTYPE_BF16)
        self._check_shapes(num_experts, hidden, num_topk, dtype_code != kl.DTYPE_BF16)
        self._check_aligned("x", x)
        return hidden, num_topk, dtype_code

    @staticmethod
    def _check_handle_tokens(state: KernelState | None, token_counts: list[int]) -> None:
        """A dispatch through a handle sends the token counts of the handle's dispatch."""
        if state is not None and list(token_counts) != state.token_counts:
            raise ValueError(
                f"x: expected the token counts {state.token_counts} (by rank) of the handle's dispatch, "
                f"got {list(token_counts)}"
            )

    @staticmethod
    def _dispatch_call(
        state: KernelState | None, num_experts: int, hidden: int, num_topk: int, dtype_code: int, num_sms: int
    ) -> CallArgs:
        """The descriptor of a dispatch (cached with a handle)."""
        op = kl.OP_DISPATCH if state is None else kl.OP_CACHED_DISPATCH
        handle_status = None if state is None else state.status
        return CallArgs(op, num_experts, hidden, num_topk, dtype_code, num_sms, handle_status)

    def _worst_outputs(
        self, num_worst_tokens: int, hidden: int, num_topk: int, out_fp8: bool
    ) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(row offsets, outputs) of num_worst_tokens rows per rank, sized before the first launch
        (nothing is read back), so that only kernels run between the timing events. The kernel writes
        the first N_recv rows of each rank; the padding rows must not look like routed rows to the
        expert code: topk_idx -1, weight 0."""
        # NOTE: x and x_scales padding rows are left unwritten (as in DeepEP): zeroing them would
        # cost a memset of num_worst_tokens rows per call.
        row_offsets = [lr * num_worst_tokens for lr in range(self.num_local + 1)]
        outs = self._dispatch_outputs(row_offsets[-1], hidden, num_topk, out_fp8)
        outs[2].fill_(-1)
        outs[3].zero_()
        return row_offsets, outs

    def _counted_outputs(
        self, recv_counts: list[int], hidden: int, num_topk: int, out_fp8: bool
    ) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(row offsets, outputs) of the read-back receive counts (poisoned where the tests ask)."""
        row_offsets = _offsets(recv_counts)
        outs = self._dispatch_outputs(row_offsets[-1], hidden, num_topk, out_fp8)
        self._poison(*outs)
        return row_offsets, outs

    def _host_counts(self, meta_host: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """(receive counts, unaligned rows per local expert) per rank from the read-back ``meta``."""
        num_ranks = self.num_ranks
        return [row[num_ranks] for row in meta_host], [row[2 * num_ranks + 1 :] for row in meta_host]

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        token_counts: list[int],
        num_experts: int,
        *,
        state: KernelState | None,
        num_sms: int,
        cast_to_fp8: bool = False,
        num_worst_tokens: int | None = None,
    ) -> DispatchResult:
        """x: [sum T, H] packed over the launch's ranks (token_counts[l] rows each)."""
        hidden, num_topk, dtype_code = self._dispatch_format(x, topk_idx, num_experts, cast_to_fp8)
        num_ranks = self.num_ranks
        self._check_handle_tokens(state, token_counts)
        self._check_usable()
        kernel = self._kernel(
            DispatchArgs.HEADER, DispatchArgs.KERNEL, num_ranks, hidden, num_topk, dtype_code
        )
        self._check_budget(kernel, num_sms)  # before growing the buffers for a budget that cannot run
        call = self._dispatch_call(state, num_experts, hidden, num_topk, dtype_code, num_sms)
        slot_bytes = max(kl.dispatch_slot_bytes(hidden, num_topk, dtype_code), kl.combine_slot_bytes(hidden))
        self.buffers.ensure_header()
        out_fp8 = dtype_code != kl.DTYPE_BF16

        self._timing_begin()
        if num_worst_tokens is not None:
            row_offsets, outs = self._worst_outputs(num_worst_tokens, hidden, num_topk, out_fp8)

        if state is None:
            per_rank, per_expert, _, send_pos, token_offsets = self._layout(
                topk_idx, token_counts, num_experts, with_in_rank=False
            )
            meta, status = self._notify(token_offsets, per_rank, per_expert, call, num_worst_tokens)
            recv_counts = expert_counts = None
        else:
            send_pos, meta, token_offsets = state.send_pos, state.meta, state.token_offsets
            recv_counts, expert_counts = state.recv_counts, state.expert_counts
            self._check_cached_worst(state, num_worst_tokens)
            status = self._cached_notify(call)

        phase = "dispatch: agreement (notify)" if state is None else "cached dispatch: agreement"
        read_back = num_worst_tokens is None and recv_counts is None
        if not read_back:
            self._grow_or_settle(status, call, phase, num_sms, slot_bytes)
        if num_worst_tokens is None:
            if recv_counts is None:
                # The verdict comes back with the counts (one read), before the outputs are sized
                stride = meta.shape[1]
                both = torch.cat([meta, status], dim=1)
                rows = self._read_counts(both, "dispatch: count exchange (notify)")
                self._raise_disagreement([row[stride:] for row in rows], call, phase)
                self.buffers.ensure(num_sms, slot_bytes)  # every rank agrees: grows on all or none
                recv_counts, expert_counts = self._host_counts([row[:stride] for row in rows])
            row_offsets, outs = self._counted_outputs(recv_counts, hidden, num_topk, out_fp8)
        out_x, out_scales, out_idx, out_weights, out_src_token = outs
        recv_row_offsets = self._device_offsets(row_offsets[:-1])

        args = DispatchArgs(
            peer_bases=self.buffers.peer_bases,
            rank_base=self.rank_base,
            num_channels=num_sms,
            max_channels=self.buffers.max_channels,
            num_experts=num_experts,
            token_offsets=token_offsets,
            x=x,
            x_scales=x_scales,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            send_pos=send_pos,
            meta=meta,
            status=status,
            recv_row_offsets=recv_row_offsets,
            out_x=out_x,
            out_x_scales=out_scales,
            out_topk_idx=out_idx,
            out_topk_weights=out_weights,
            out_src_token=out_src_token,
            timeout_ns=self._timeout_ns,
        )
        self._launch(kernel, self.num_local * num_sms, kl.NUM_THREADS, args)
        self._timing_end("dispatch")
        self._check_earlier()
        new_state = KernelState(
            send_pos=send_pos,
            meta=meta,
            token_offsets=token_offsets,
            token_counts=list(token_counts),
            recv_row_offsets=recv_row_offsets,
            recv_src_token=out_src_token,
            recv_counts=recv_counts if num_worst_tokens is None else None,
            expert_counts=expert_counts if num_worst_tokens is None else None,
            num_worst_tokens=num_worst_tokens,
            status=status,
        )
        return DispatchResult(out_x, out_scales, out_idx, out_weights, row_offsets, new_state)

    def _status(self) -> torch.Tensor:
        return torch.empty(self.num_local, kl.STATUS_INTS, dtype=torch.int32, device=self.device)

    def _notify(
        self,
        token_offsets: torch.Tensor,
        per_rank: torch.Tensor,
        per_expert: torch.Tensor,
        call: CallArgs,
        num_worst_tokens: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Agreement, count exchange and barrier (csrc/notify.cuh); returns ``meta`` [num_local, 2R + 1 + L]
        and ``status`` [num_local, STATUS_INTS]."""
        stride = kl.meta_stride(self.num_ranks, call.num_experts)
        meta = torch.empty(self.num_local, stride, dtype=torch.int32, device=self.device)
        status = self._status()
        notify = self._kernel(NotifyArgs.HEADER, NotifyArgs.KERNEL, self.num_ranks)
        args = NotifyArgs(
            peer_bases=self.buffers.peer_bases,
            rank_base=self.rank_base,
            **call.descriptor(),
            status=status,
            token_offsets=token_offsets,
            num_tokens_per_rank=per_rank,
            num_tokens_per_expert=per_expert,
            expert_alignment=1,
            num_max_recv_rows=-1 if num_worst_tokens is None else num_worst_tokens,
            meta=meta,
            timeout_ns=self._first_wait_ns(),
        )
        self._launch(notify, self.num_local, 128, args)
        return meta, status

    @staticmethod
    def _check_cached_worst(state: KernelState, num_worst_tokens: int | None) -> None:
        """A dispatch through a handle with num_worst_tokens: the outputs must hold every row."""
        if num_worst_tokens is not None:
            # NOTE: no notify runs here, so the device check of num_worst_tokens does not either:
            # the bound must be known to hold, else rows would land past the outputs.
            if state.recv_counts is not None:
                if max(state.recv_counts, default=0) > num_worst_tokens:
                    raise ValueError(
                        f"num_worst_tokens: expected at least the {max(state.recv_counts)} rows a rank "
                        f"receives with this handle, got {num_worst_tokens}"
                    )
            elif state.num_worst_tokens is None or num_worst_tokens < state.num_worst_tokens:
                raise ValueError(
                    f"num_worst_tokens: with this handle (made with num_worst_tokens="
                    f"{state.num_worst_tokens}) expected at least {state.num_worst_tokens}, "
                    f"got {num_worst_tokens}"
                )

    def _cached_notify(self, call: CallArgs) -> torch.Tensor:
        """Agreement and barrier (csrc/cached.cuh); returns ``status`` [num_local, STATUS_INTS]."""
        kernel = self._kernel(CachedNotifyArgs.HEADER, CachedNotifyArgs.KERNEL, self.num_ranks)
        status = self._status()
        args = CachedNotifyArgs(
            peer_bases=self.buffers.peer_bases,
            rank_base=self.rank_base,
            op=call.op,
            **call.descriptor(),
            handle_status=call.handle_status,
            status=status,
            timeout_ns=self._first_wait_ns(),
        )
        self._launch(kernel, self.num_local, 128, args)
        return status

    # ------------------------------------------------------------------ combine
    def combine(self, x: torch.Tensor, state: KernelState, num_experts: int, *, num_sms: int) -> torch.Tensor:
        """x: [sum N_recv, H] bf16 packed like the dispatch outputs -> [sum T, H] bf16."""
        hidden = x.shape[1]
        self._check_usable()
        self._check_shapes(num_experts, hidden, 1, False)
        self._check_aligned("x", x)
        kernel = self._kernel(CombineArgs.HEADER, CombineArgs.KERNEL, self.num_ranks, hidden)
        self._check_budget(kernel, num_sms)  # before growing the buffers for a budget that cannot run
        self.buffers.ensure_header()
        out = torch.empty(sum(state.token_counts), hidden, dtype=torch.bfloat16, device=self.device)
        self._poison(out)
        self._timing_begin()
        call = CallArgs(kl.OP_COMBINE, num_experts, hidden, 0, 0, num_sms, state.status)
        status = self._cached_notify(call)
        self._grow_or_settle(status, call, "combine: agreement", num_sms, kl.combine_slot_bytes(hidden))
        args = CombineArgs(
            peer_bases=self.buffers.peer_bases,
            rank_base=self.rank_base,
            num_channels=num_sms,
            max_channels=self.buffers.max_channels,
            num_experts=num_experts,
            token_offsets=state.token_offsets,
            x=x,
            recv_row_offsets=state.recv_row_offsets,
            recv_src_token=state.recv_src_token,
            meta=state.meta,
            status=status,
            send_pos=state.send_pos,
            out=out,
            timeout_ns=self._timeout_ns,
        )
        self._launch(kernel, self.num_local * num_sms, kl.NUM_THREADS, args)
        self._timing_end("combine")
        self._check_earlier()
        return out


def aligned_counts(counts: list[int], alignment: int) -> list[int]:
    return [-(-c // alignment) * alignment for c in counts]


class KernelsBackend(WithoutKnobs):
    """Backend protocol (``commkit.backends.base``) with the kernels, one rank per process.

    On GPUs (NCCL): the IPC buffers of the node's GPUs. On CPU processes (gloo; ``device`` cpu): the
    host execution of the same kernels over buffers in host shared memory
    (``commkit.backends.shared_memory``), one host only."""

    name = "kernels"
    device_type = "cuda"  # the device of the tensors it takes ("cpu" for the host execution)

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        *,
        timeout_s: float,
        device: torch.device | None = None,
        max_num_sms: int | None = None,
    ):
        """``max_num_sms``: the largest ``num_sms`` a call will use; the IPC buffers are sized for
        it once (None: the device's SM count, about 250 MB per rank at H = 7168; host shared
        memory grows as calls need it instead)."""
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_ranks_per_node = self.num_ranks  # one node (InternodeKernelsBackend: several)
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.device_type = self.device.type
        self.buffers: SymmetricBuffers
        if self.device.type == "cpu":
            check_one_host(group)
            self.buffers = SharedMemoryBuffers(group, timeout_s=timeout_s)
        else:
            num_sms_device = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.buffers = IpcBuffers(
                group, self.device, max_num_sms=max_num_sms or num_sms_device, timeout_s=timeout_s
            )
        self.engine = KernelEngine(
            self.num_ranks, self.rank, 1, self.buffers, timeout_s=timeout_s, device=self.device
        )
        self.comm_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # Ordering with the caller's stream (see the module docstring of commkit.types.EventHandle)
    def _begin(self, previous_event: EventHandle | None) -> torch.cuda.Stream | None:
        if self.comm_stream is None:  # the host execution: every launch finished when it returned
            return None
        caller = torch.cuda.current_stream(self.device)
        if previous_event is not None and previous_event.event is not None:
            self.comm_stream.wait_event(previous_event.event)
        else:
            self.comm_stream.wait_stream(caller)
        return caller

    def _end(
        self, caller: torch.cuda.Stream | None, async_finish: bool, inputs: list, outputs: list
    ) -> EventHandle:
        if self.comm_stream is None or caller is None:
            return EventHandle()
        event = EventHandle.record(self.comm_stream)
        for t in outputs:
            if t is not None:
                t.record_stream(caller)
        if async_finish:
            for t in inputs:
                if t is not None:
                    t.record_stream(self.comm_stream)
        else:
            caller.wait_stream(self.comm_stream)
        return event

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> Layout:
        caller = self._begin(None)
        with stream_context(self.comm_stream):
            per_rank, per_expert, in_rank, _, _ = self.engine.layout(
                topk_idx, [topk_idx.shape[0]], num_experts
            )
            layout = Layout(per_rank[0].to(torch.int64), per_expert[0].to(torch.int64), in_rank)
        self._end(
            caller, False, [topk_idx], [layout.num_tokens_per_rank, layout.num_tokens_per_expert, in_rank]
        )
        return layout

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        *,
        layout: Layout | None,
        handle: Handle | None,
        expert_alignment: int,
        num_sms: int,
        previous_event: EventHandle | None,
        async_finish: bool,
        buffer_id: int,
        cast_to_fp8: bool = False,
        num_worst_tokens: int | None = None,
    ) -> DispatchOutput:
        """``layout`` is not needed (the layout kernel also computes the send positions); with
        ``num_worst_tokens`` the outputs have that many rows (the first N_recv are valid) and
        ``num_tokens_per_expert`` is empty (nothing is read back: CUDA-graph capturable)."""
        state = handle.state if handle is not None else None
        caller = self._begin(previous_event)
        with stream_context(self.comm_stream):
            result = self.engine.dispatch(
                x,
                x_scales,
                topk_idx,
                topk_weights,
                [x.shape[0]],
                num_experts,
                state=state,
                num_sms=num_sms,
                cast_to_fp8=cast_to_fp8,
                num_worst_tokens=num_worst_tokens,
            )
        outputs = [
            result.x,
            result.x_scales,
            result.topk_idx,
            result.topk_weights,
            result.state.recv_src_token,
        ]
        event = self._end(caller, async_finish, [x, x_scales, topk_idx, topk_weights], outputs)
        st = result.state
        new_handle = Handle.for_routing(
            topk_idx,
            buffer_id=buffer_id,
            backend=self.name,
            num_experts=num_experts,
            num_recv_tokens=result.x.shape[0],
            state=st,
        )
        counts = aligned_counts(st.expert_counts[0], expert_alignment) if st.expert_counts else []
        return DispatchOutput(
            result.x, result.x_scales, result.topk_idx, result.topk_weights, counts, new_handle, event
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: Handle,
        *,
        num_sms: int,
        previous_event: EventHandle | None,
        async_finish: bool,
    ) -> CombineOutput:
        caller = self._begin(previous_event)
        with stream_context(self.comm_stream):
            out = self.engine.combine(x, handle.state, handle.num_experts, num_sms=num_sms)
        event = self._end(caller, async_finish, [x], [out])
        return CombineOutput(out, event)

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.buffers.close()
