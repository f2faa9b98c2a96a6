"""Where the per-rank code of the tools runs: ranks of a ``torch.distributed`` group, or virtual ranks.

``bench``, ``tune`` and ``overlap`` run the same per-rank function on every rank; it reaches its peers
only through a ``RankContext``:

- ``DistRanks``: this process is one rank of the initialised default group (torchrun, or the gloo
  processes of ``commkit.launch``); barrier and reductions are ``torch.distributed`` collectives. Its
  ``num_ranks_per_node`` (the tools' ``--ranks-per-node``) goes to every Buffer it makes (None: the
  Buffer's default, ``$LOCAL_WORLD_SIZE`` or all ranks).
- ``VirtualRanks``: one thread per virtual rank of a ``commkit.emulate.EmulatedGroup`` (all ranks on
  one GPU); barrier and reductions meet the other threads of the group (``threading.Barrier``), and
  the buffer is ``Buffer.from_backend(virtual_rank)``. ``run_virtual(N, fn)`` runs ``fn(ctx)`` on N
  virtual ranks.

Timing differs in one point (``collective_time``): real ranks report the slowest rank's time (a
collective ends when its last rank does); virtual ranks are served by one launch that starts when the
last thread arrives, so the shortest per-thread time is the one with the least host-side waiting
(threads leave a barrier one by one under the GIL) and is the one reported.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from commkit import Buffer, emulate
from commkit.errors import CommTimeoutError, ConfigError
from commkit.profiles import cluster_signature


@dataclass
class RankContext:
    """One rank's view of its group. ``virtual``: the ranks are threads sharing one device."""

    rank: int
    num_ranks: int
    device: torch.device
    virtual: bool = False

    def barrier(self) -> None:
        raise NotImplementedError

    def max_across(self, value: float) -> float:
        raise NotImplementedError

    def min_across(self, value: float) -> float:
        raise NotImplementedError

    def sum_across(self, value: int) -> int:
        raise NotImplementedError

    def once(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only; every rank returns its result (collective)."""
        raise NotImplementedError

    def make_buffer(self, backend: str = "auto", num_sms: int | None = None) -> Any:
        """A ``commkit.Buffer`` for this rank."""
        raise NotImplementedError

    def signature(self) -> Any:
        """The ``ClusterSignature`` tuning profiles of this group are keyed by."""
        raise NotImplementedError

    def kernel_time_s(self, op: str) -> tuple[float | None, str | None]:
        """Virtual ranks: the device time of the kernels of the latest ``op`` call ("dispatch" or
        "combine") from the group's ``kernel_events``, or (None, why not). Real ranks: (None, None)."""
        return None, None

    def collective_time(self, local_s: float) -> float:
        """A repetition's time from every rank's own measurement (see the module docstring)."""
        return self.min_across(local_s) if self.virtual else self.max_across(local_s)


@dataclass
class DistRanks(RankContext):
    """This process as one rank of a ``torch.distributed`` group (None: the default group)."""

    group: Any = None
    timeout_s: float = 60.0  # the Buffers' communication timeout (device spin budget, peer waits)
    # the Buffers' ranks per node (None: the Buffer's default, $LOCAL_WORLD_SIZE or all ranks)
    num_ranks_per_node: int | None = None

    @classmethod
    def current(
        cls, group: Any = None, *, timeout_s: float = 60.0, num_ranks_per_node: int | None = None
    ) -> DistRanks:
        """The initialised group; CUDA devices on NCCL, else CPU. ``timeout_s`` and
        ``num_ranks_per_node``: the Buffers' ones (see ``commkit.Buffer``)."""

        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        return cls(
            dist.get_rank(group),
            dist.get_world_size(group),
            device,
            False,
            group,
            timeout_s,
            num_ranks_per_node,
        )

    def barrier(self) -> None:

        dist.barrier(group=self.group)

    def _reduce(self, value: float, op: Any, dtype: torch.dtype) -> Any:

        t = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.item()

    def max_across(self, value: float) -> float:

        return float(self._reduce(value, dist.ReduceOp.MAX, torch.float64))

    def min_across(self, value: float) -> float:

        return float(self._reduce(value, dist.ReduceOp.MIN, torch.float64))

    def sum_across(self, value: int) -> int:

        return int(self._reduce(value, dist.ReduceOp.SUM, torch.int64))

    def once(self, fn: Callable[[], Any]) -> Any:

        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def make_buffer(self, backend: str = "auto", num_sms: int | None = None) -> Any:

        return Buffer(
            self.group,
            backend=backend,
            num_sms=num_sms,
            timeout_s=self.timeout_s,
            num_ranks_per_node=self.num_ranks_per_node,
        )

    def signature(self) -> Any:
        """``cluster_signature(group)``, with this context's ``num_ranks_per_node`` where it has one (the
        nodes its Buffers run on)."""

        sig = cluster_signature(self.group)
        if self.num_ranks_per_node is None:
            return sig
        return dataclasses.replace(sig, num_ranks_per_node=self.num_ranks_per_node)


class _Meeting:
    """What the threads of one ``run_virtual`` share: a barrier and one slot per rank."""

    def __init__(self, num_ranks: int, timeout_s: float) -> None:
        self.barrier = threading.Barrier(num_ranks)
        self.slots: list[Any] = [None] * num_ranks
        self.timeout_s = timeout_s

    def wait(self, rank: int, what: str) -> None:
        try:
            self.barrier.wait(timeout=self.timeout_s)
        except threading.BrokenBarrierError:
            raise CommTimeoutError(
                f"{what}: virtual rank {rank} waited {self.timeout_s:g}s for the other virtual ranks "
                "(or one of them failed)"
            ) from None


@dataclass
class VirtualRanks(RankContext):
    """One virtual rank (a thread) of an ``EmulatedGroup``; ``backend`` is its ``VirtualRank``,
    ``group`` the ``EmulatedGroup`` (shared by all ranks: its comm stream, its ``kernel_events``)."""

    backend: Any = None
    timeout_s: float = 60.0  # the Buffers' communication timeout
    meeting: _Meeting = field(default=None, repr=False)  # type: ignore[assignment]
    group: Any = field(default=None, repr=False)

    def _gather(self, value: Any, what: str) -> list[Any]:
        self.meeting.slots[self.rank] = value
        self.meeting.wait(self.rank, what)
        values = list(self.meeting.slots)
        self.meeting.wait(self.rank, what)  # nobody writes the next value before all have read
        return values

    def barrier(self) -> None:
        self.meeting.wait(self.rank, "barrier")

    def kernel_time_s(self, op: str) -> tuple[float | None, str | None]:
        # NOTE: call it after the call's outputs were waited for and before the next collective call
        # (which needs every rank, so no later launch can have replaced the events yet).
        if not hasattr(self.group, "kernel_events"):
            return None, (
                "commkit.emulate has no EmulatedGroup.kernel_events (older version): time_* is the wall "
                "time of the call"
            )
        pair = (self.group.kernel_events or {}).get(op)
        if pair is None or pair[0] is None or pair[1] is None:
            return None, f"no kernel events for {op} (not on a CUDA device): time_* is the call's wall time"
        start, end = pair
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3, None

    def max_across(self, value: float) -> float:
        return float(max(self._gather(value, "max_across")))

    def min_across(self, value: float) -> float:
        return float(min(self._gather(value, "min_across")))

    def sum_across(self, value: int) -> int:
        return int(sum(self._gather(int(value), "sum_across")))

    def once(self, fn: Callable[[], Any]) -> Any:
        result = fn() if self.rank == 0 else None
        return self._gather(result, "once")[0]

    def make_buffer(self, backend: str = "auto", num_sms: int | None = None) -> Any:

        if backend not in ("auto", "kernels"):
            raise ConfigError(
                f"backend: virtual ranks run the kernels; {backend!r} needs a process group "
                "(use torchrun or --ranks instead of --virtual)"
            )
        return Buffer.from_backend(self.backend, num_sms=num_sms, timeout_s=self.timeout_s)

    def signature(self) -> Any:
        """As ``Buffer.from_backend`` matches profiles: N ranks, in the group's (virtual) nodes."""

        per_node = getattr(self.group, "num_ranks_per_node", self.num_ranks)
        return dataclasses.replace(cluster_signature(), num_ranks=self.num_ranks, num_ranks_per_node=per_node)


def run_virtual(
    num_ranks: int,
    fn: Callable[[RankContext], Any],
    *,
    num_sms: int | None = None,
    timeout_s: float = 60.0,
    host_timeout_s: float | None = None,
    device: torch.device | str | None = None,
    num_ranks_per_node: int | None = None,
) -> list[Any]:
    """Run ``fn(ctx)`` on ``num_ranks`` virtual ranks of one GPU (``commkit.emulate``); the results by
    rank. ``num_sms``: the group's default budget (a Buffer passes its own on every call).
    ``num_ranks_per_node``: virtual nodes of that many ranks (the internode kernels; None: one node).
    ``timeout_s``: the communication timeout (``EmulatedGroup``/``Buffer`` ``timeout_s``: the device
    spin budget and the wait for the other ranks' calls); ``host_timeout_s``: how long a rank waits for
    the others at the tools' own barriers and reductions (rank 0 alone may run a baseline meanwhile;
    default: ``max(timeout_s, 1800)``)."""

    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks: expected a positive number of virtual ranks, got {num_ranks!r}")
    group = emulate.EmulatedGroup(
        num_ranks,
        num_sms=num_sms or emulate.DEFAULT_NUM_SMS,
        timeout_s=timeout_s,
        device=device,
        num_ranks_per_node=num_ranks_per_node,
    )
    meeting = _Meeting(num_ranks, host_timeout_s if host_timeout_s is not None else max(timeout_s, 1800.0))

    def body(virtual_rank: Any) -> Any:
        ctx = VirtualRanks(
            virtual_rank.rank, num_ranks, group.device, True, virtual_rank, timeout_s, meeting, group
        )
        try:
            return fn(ctx)
        except BaseException:
            meeting.barrier.abort()  # the other threads must not wait for this one
            raise

    return group.spawn(body)
