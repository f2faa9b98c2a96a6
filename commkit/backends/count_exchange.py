"""Count exchange and barrier of the internode kernels over a process group (one rank per process).

Inside one node the notify kernel (``csrc/notify.cuh``) writes each rank's counts into its peers'
buffers, meets them at a barrier and computes ``meta``; ``cached_notify`` is that barrier alone. Across
nodes the peers' buffers cannot be loaded from or stored to, so a rank of a multi-node group exchanges
the same counts with one ``all_to_all_single`` of the process group and computes the same ``meta`` row
with torch ops (NCCL: ordered on the current stream, no host sync, CUDA-graph capturable; gloo: CPU
tensors, which is how the CPU tests run it). The barrier before a dispatch with a handle and before a
combine is an all-reduce (of the call format, below): when it completes on a rank's stream, every rank
has finished the kernels it launched before it on its stream, so its counters are zero again (the
guarantee of ``csrc/cached.cuh``).

Message of rank s to rank d (int32 [F + 2 + MAX_LOCAL_EXPERTS], the same size whatever the call):
s's call format (``CallFormat``: F fields), rows s sends to d, s's token count, rows s sends to each of
d's L experts, zeros after them. ``meta`` of rank d (int32 [2R + 1 + L], ``kernels_layout.meta_stride``):
``[0, R]`` exclusive prefix over sources of the rows received (``[R]`` = N_recv), ``[R + 1, 2R]`` the
sources' token counts, ``[2R + 1, +L)`` rows received per local expert.

Agreement: ranks that disagree on a call's format (op, num_experts, hidden, top-k, dtype, num_sms,
num_worst_tokens, the call sequence number, the sequence number of the handle's dispatch) would size
buffers, grow the GIN window (a collective) and read slots differently. The fixed-size message keeps
the all-to-all well formed whatever the ranks pass, and carries the format; the barrier's all-reduce
(MAX of ``[v, -v]``) gives every rank the largest and smallest value of each field. Every rank then
checks the same facts: on CPU tensors at once, on CUDA tensors from the ``Agreement`` the engine
reads back with the counts (a ``ValueError`` on every rank, before anything collective that depends
on the format) or, where nothing is read back, by a device-side assert. NOTE: a fresh dispatch
(all-to-all) on one rank and a cached dispatch or combine (all-reduce) on another are different
collectives: the ``op`` field tells the latter two apart only.

Every wait is bounded by ``timeout_s`` (``CommTimeoutError`` names the phase); with NCCL the host does
not wait (the stream does), and NCCL's watchdog bounds the collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from commkit.backends import kernels_layout as kl
from commkit.errors import CommError, CommTimeoutError

OPS = ("dispatch", "cached dispatch", "combine")
FORMAT_NAMES = ("op", "num_experts", "hidden", "top-k", "dtype", "num_sms", "num_worst_tokens", "rows fit",
                "call", "handle")  # fmt: skip
NUM_FORMAT = len(FORMAT_NAMES)
COUNTS_OFFSET = NUM_FORMAT  # where the counts start in a message
MESSAGE_INTS = NUM_FORMAT + 2 + kl.MAX_LOCAL_EXPERTS


@dataclass(frozen=True)
class CallFormat:
    """What every rank of a call must pass alike (combine: ``num_topk`` and ``dtype_code`` 0;
    ``num_worst_tokens`` None is -1). ``rows_fit``: the outcome of a rank's own check that depends on
    its data (a cached dispatch's rows within ``num_worst_tokens``), shared so that every rank stops
    where one does.

    The fields after ``rows_fit`` are agreed only by the callers that name them (``values(names)``;
    the internode kernels' message holds the ``FORMAT_NAMES`` ones): ``seq``, the buffer's call
    sequence number; ``num_ranks_per_node``; ``handle``, the sequence number of the dispatch that made
    the call's handle (-1: none); ``x_dtype``, the dtype of the rows on the wire (``WIRE_DTYPES``)."""

    op: str
    num_experts: int
    hidden: int
    num_topk: int
    dtype_code: int
    num_sms: int
    num_worst_tokens: int | None = None
    rows_fit: bool = True
    seq: int = 0
    num_ranks_per_node: int = 0
    handle: int = -1
    x_dtype: int = 0

    def values(self, names: tuple[str, ...] = FORMAT_NAMES) -> tuple[int, ...]:
        nwt = -1 if self.num_worst_tokens is None else self.num_worst_tokens
        every = {
            "op": OPS.index(self.op), "num_experts": self.num_experts, "hidden": self.hidden,
            "top-k": self.num_topk, "dtype": self.dtype_code, "num_sms": self.num_sms,
            "num_worst_tokens": nwt, "rows fit": int(self.rows_fit), "call": self.seq,
            "num_ranks_per_node": self.num_ranks_per_node, "handle": self.handle,
            "x dtype": self.x_dtype,
        }  # fmt: skip
        return tuple(every[n] for n in names)


# The fields the torch backends agree on before every call (one all-to-all of one fixed size): what
# sizes and reads the payload all-to-alls. num_sms does not matter there (the collective library
# decides its resources), nor num_worst_tokens (padding after the exchange, local to a rank).
TORCH_FORMAT_NAMES = ("op", "call", "num_experts", "hidden", "top-k", "x dtype", "num_ranks_per_node",
                      "handle")  # fmt: skip
WIRE_DTYPES = ("bfloat16", "float8_e4m3fn")
# The call descriptor of the one-node kernels, in the order of csrc/common.cuh CallField: every notify
# and cached notify exchanges it at its barrier, on the device (``KernelEngine``, ``status_error``).
KERNEL_FORMAT_NAMES = ("op", "call", "num_experts", "hidden", "top-k", "dtype", "num_sms", "handle")


def _shown(name: str, value: int) -> str:
    if name == "op" and 0 <= value < len(OPS):
        return OPS[value]
    if name == "num_worst_tokens" and value == -1:
        return "None"
    if name == "rows fit":
        return "yes" if value else "no"
    if name == "handle":
        return "none" if value == -1 else f"from call {value}"
    if name == "x dtype" and 0 <= value < len(WIRE_DTYPES):
        return WIRE_DTYPES[value]
    return str(value)


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else "".join(names)


def describe(values: list[int] | tuple[int, ...], names: tuple[str, ...] = FORMAT_NAMES) -> str:
    """``values`` of a CallFormat as ``name=value`` pairs (the op by name)."""
    return ", ".join(f"{n}={_shown(n, v)}" for n, v in zip(names, values, strict=True))


def disagreement(
    own: tuple[int, ...], theirs: tuple[int, ...], peer: int, names: tuple[str, ...], name_fields: bool = True
) -> str:
    """Why rank ``peer``'s call (``theirs``) is not this rank's (``own``); with ``name_fields`` each
    field that differs is listed, here and there."""
    message = (
        f"expected every rank to pass the same call ({describe(own, names)}), got "
        f"({describe(theirs, names)}) from rank {peer}"
    )
    if name_fields:
        differ = [
            f"{n} {_shown(n, mine)} here, {_shown(n, other)} on rank {peer}"
            for n, mine, other in zip(names, own, theirs, strict=True)
            if mine != other
        ]
        message += f"; differs: {'; '.join(differ)}"
    return message


def status_error(status: list[int], own: tuple[int, ...]) -> str | None:
    """The error in one rank's status row of the one-node kernels' agreement (int32
    [``kernels_layout.STATUS_INTS``], written by ``csrc/notify.cuh`` agree_on_call), None when every
    rank made the same call; ``own``: this rank's descriptor (``KERNEL_FORMAT_NAMES``)."""
    if status[kl.STATUS_VERDICT] == 0:
        return None
    theirs = tuple(status[kl.STATUS_PEER_CALL : kl.STATUS_PEER_CALL + kl.CALL_INTS])
    return disagreement(own, theirs, status[kl.STATUS_PEER], KERNEL_FORMAT_NAMES)


@dataclass
class Agreement:
    """What a rank learnt of its peers' calls. On the device only what the hot path needs: ``agree``
    (bool, True when every rank passed ``own``); ``raw`` is read back to name a disagreement: after
    the count exchange every rank's format values (int32 [R, F]), after the barrier the all-reduced
    (MAX) ``[v, -v]`` (int32 [2F]). ``names``: the fields of ``own`` (F = len(names)); with
    ``name_fields`` an exchange's error also lists each field that differs, here and on that rank."""

    kind: str  # "exchange" or "barrier"
    raw: torch.Tensor
    agree: torch.Tensor
    own: tuple[int, ...]
    names: tuple[str, ...] = FORMAT_NAMES
    name_fields: bool = False

    def error(self, host: list[int]) -> str | None:
        """The error message from ``raw`` read back (flat; None when every rank agrees)."""
        own = describe(self.own, self.names)
        num = len(self.names)
        if self.kind == "exchange":
            rows = [tuple(host[r * num : (r + 1) * num]) for r in range(len(host) // num)]
            peer = next((r for r, row in enumerate(rows) if row != self.own), None)
            if peer is None:
                return None
            return disagreement(self.own, rows[peer], peer, self.names, self.name_fields)
        hi, lo = host[:num], [-v for v in host[num:]]
        field = next((f for f in range(num) if hi[f] != lo[f]), None)
        if field is None:
            return None
        name = self.names[field]
        if name == "rows fit":
            return (
                "another rank receives more rows with this handle than num_worst_tokens holds (it "
                "raised ValueError: num_worst_tokens ...); every rank stops"
            )
        return (
            f"expected every rank to pass the same call ({own}), got {name} from {_shown(name, lo[field])} "
            f"to {_shown(name, hi[field])} across the ranks"
        )

    def host_values(self) -> list[int]:
        """``raw`` read back, flat (a host sync on CUDA)."""
        return self.raw.reshape(-1).tolist()

    def check_host(self, host: list[int]) -> None:
        error = self.error(host)
        if error is not None:
            raise ValueError(f"{self.own_op}: {error}")

    def check(self) -> None:
        """On CPU: raises ``ValueError`` now. On CUDA: a device-side assert (no host sync)."""
        if not self.raw.is_cuda:
            self.check_host(self.host_values())
            return
        torch._assert_async(
            self.agree,
            f"{self.own_op}: the ranks passed different calls (this rank: {describe(self.own, self.names)}); "
            f"{_listed([n for n in self.names if n != 'rows fit'])} must agree",
        )

    @property
    def own_op(self) -> str:
        return OPS[self.own[0]]


def count_message(
    per_rank: torch.Tensor, per_expert: torch.Tensor, num_tokens: int, fmt: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 [R, MESSAGE_INTS]: row d is what this rank tells rank d (``per_rank`` [R], ``per_expert``
    [E], ``fmt`` int32 [F] its CallFormat values, zeros if None)."""
    num_ranks = per_rank.numel()
    local = per_expert.numel() // num_ranks
    message = torch.zeros(num_ranks, MESSAGE_INTS, dtype=torch.int32, device=per_rank.device)
    if fmt is not None:
        message[:, :COUNTS_OFFSET] = fmt
    message[:, COUNTS_OFFSET] = per_rank
    message[:, COUNTS_OFFSET + 1] = num_tokens
    message[:, COUNTS_OFFSET + 2 : COUNTS_OFFSET + 2 + local] = per_expert.view(num_ranks, -1)
    return message


def meta_from_messages(
    received: torch.Tensor,
    num_local_experts: int,
    num_worst_tokens: int | None,
    agreement: Agreement | None = None,
) -> torch.Tensor:
    """int32 [1, 2R + 1 + L] from the messages received (int32 [R, MESSAGE_INTS], row s from rank s).

    ``num_worst_tokens``: more rows received than this is an error (the outputs hold that many rows):
    raised at once for CPU tensors, a device-side assert for CUDA ones (as the notify kernel traps),
    unless ``agreement`` says the ranks disagree (that is reported instead, by its own check)."""
    num_ranks = received.shape[0]
    counts = received[:, COUNTS_OFFSET : COUNTS_OFFSET + 2 + num_local_experts]
    meta = torch.empty(1, 2 * num_ranks + 1 + num_local_experts, dtype=torch.int32, device=received.device)
    meta[0, 0] = 0
    torch.cumsum(counts[:, 0], 0, dtype=torch.int32, out=meta[0, 1 : num_ranks + 1])
    meta[0, num_ranks + 1 : 2 * num_ranks + 1] = counts[:, 1]
    meta[0, 2 * num_ranks + 1 :] = counts[:, 2:].sum(0, dtype=torch.int32)
    if num_worst_tokens is not None:
        fits = meta[0, num_ranks] <= num_worst_tokens
        if agreement is not None:
            fits = fits | ~agreement.agree
        torch._assert_async(
            fits,
            f"dispatch: num_worst_tokens={num_worst_tokens} is smaller than the rows this rank receives",
        )
    return meta


def exchange_agreement(
    received: torch.Tensor,
    own: tuple[int, ...],
    own_t: torch.Tensor,
    names: tuple[str, ...] = FORMAT_NAMES,
    name_fields: bool = False,
) -> Agreement:
    """From the messages received (rank s's format in the first ``len(names)`` columns of row s): do
    all ranks' formats equal ``own`` (``own_t``: the same values as a tensor on ``received``'s device)?"""
    theirs = received[:, : len(names)]
    return Agreement("exchange", theirs, (theirs == own_t).all(), own, names, name_fields)


def barrier_agreement(reduced: torch.Tensor, own: tuple[int, ...]) -> Agreement:
    """From the all-reduced (MAX) ``[v, -v]`` = ``[max, -min]``: every field's max - min is >= 0, so
    the ranks agree iff the sum of all of them is 0."""
    return Agreement("barrier", reduced, reduced.sum(dtype=torch.int64) == 0, own)


class GroupCountExchange:
    """The notify and cached-notify steps of one rank of ``group``, over the process group."""

    def __init__(self, group: dist.ProcessGroup | None, *, device: torch.device, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.timeout_s = timeout_s
        self.device = device
        self._format_tensors: dict[tuple[int, ...], torch.Tensor] = {}

    def _format_tensor(self, own: tuple[int, ...]) -> torch.Tensor:
        """int32 [2F] ``[v, -v]`` on the device, made once per format (no copy from the host per call,
        so the calls stay capturable in a CUDA graph once a call of that format has run: as the JIT
        and the buffers' growth need anyway)."""
        t = self._format_tensors.get(own)
        if t is None:
            if len(self._format_tensors) > 64:
                self._format_tensors.clear()
            t = torch.tensor([*own, *(-v for v in own)], dtype=torch.int32).to(self.device)
            self._format_tensors[own] = t
        return t

    def notify(
        self,
        per_rank: torch.Tensor,
        per_expert: torch.Tensor,
        num_tokens: int,
        num_worst_tokens: int | None,
        fmt: CallFormat,
    ) -> tuple[torch.Tensor, Agreement]:
        """``meta`` [1, 2R + 1 + L] of this rank from its layout (``per_rank`` [R], ``per_expert`` [E]),
        and what it learnt of the peers' formats (on CPU a disagreement raises ``ValueError`` here)."""
        own = fmt.values()
        own_t = self._format_tensor(own)[:NUM_FORMAT]
        message = count_message(per_rank.reshape(-1), per_expert.reshape(-1), num_tokens, own_t)
        received = torch.empty_like(message)
        self._run("dispatch: count exchange", dist.all_to_all_single, received, message)
        agreement = exchange_agreement(received, own, own_t)
        if not received.is_cuda:
            agreement.check()  # before the bound below, whose message would hide the cause
        local = per_expert.numel() // self.num_ranks
        return meta_from_messages(received, local, num_worst_tokens, agreement), agreement

    def barrier(self, fmt: CallFormat) -> Agreement:
        """Stream-ordered barrier of the group (before a cached dispatch and before a combine) that
        also compares the ranks' formats (on CPU a disagreement raises ``ValueError`` here)."""
        own = fmt.values()
        reduced = self._format_tensor(own).clone()
        self._run("barrier", dist.all_reduce, reduced, op=dist.ReduceOp.MAX)
        agreement = barrier_agreement(reduced, own)
        if not reduced.is_cuda:
            agreement.check()
        return agreement

    def _run(self, phase: str, collective, *args: torch.Tensor, **kwargs) -> None:  # noqa: ANN001, ANN003
        try:
            work = collective(*args, group=self.group, async_op=True, **kwargs)
            if args[0].is_cuda:
                # NOTE: no timeout argument: with one, NCCL's wait blocks the host until completion
                # (a host sync per call); without, only the current stream waits
                work.wait()
            else:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            where = f"{phase}: rank {self.rank} of {self.num_ranks}"
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise CommTimeoutError(
                    f"{where} waited longer than timeout_s={self.timeout_s:g}s (a peer may not have "
                    f"called the same operation): {exc}"
                ) from exc
            raise CommError(f"{where}: {exc}") from exc
