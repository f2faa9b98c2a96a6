"""Count exchange and barrier of the internode kernels over a process group (one rank per process).

Inside one node the notify kernel (``csrc/notify.cuh``) writes each rank's counts into its peers'
buffers, meets them at a barrier and computes ``meta``; ``cached_notify`` is that barrier alone. Across
nodes the peers' buffers cannot be loaded from or stored to, so a rank of a multi-node group exchanges
the same counts with one ``all_to_all_single`` of the process group and computes the same ``meta`` row
with torch ops (NCCL: ordered on the current stream, no host sync, CUDA-graph capturable; gloo: CPU
tensors, which is how the CPU tests run it). The barrier before a dispatch with a handle and before a
combine is an all-reduce of one int32: when it completes on a rank's stream, every rank has finished
the kernels it launched before it on its stream, so its counters are zero again (the guarantee of
``csrc/cached.cuh``).

Message of rank s to rank d (int32 [2 + L]): rows s sends to d, s's token count, rows s sends to each
of d's L experts. ``meta`` of rank d (int32 [2R + 1 + L], ``kernels_layout.meta_stride``):
``[0, R]`` exclusive prefix over sources of the rows received (``[R]`` = N_recv), ``[R + 1, 2R]`` the
sources' token counts, ``[2R + 1, +L)`` rows received per local expert.

Every wait is bounded by ``timeout_s`` (``CommTimeoutError`` names the phase); with NCCL the host does
not wait (the stream does), and NCCL's watchdog bounds the collective.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from commkit.errors import CommError, CommTimeoutError


def count_message(per_rank: torch.Tensor, per_expert: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int32 [R, 2 + L]: row d is what this rank tells rank d (``per_rank`` [R], ``per_expert`` [E])."""
    num_ranks = per_rank.numel()
    message = torch.empty(
        num_ranks, 2 + per_expert.numel() // num_ranks, dtype=torch.int32, device=per_rank.device
    )
    message[:, 0] = per_rank
    message[:, 1] = num_tokens
    message[:, 2:] = per_expert.view(num_ranks, -1)
    return message


def meta_from_messages(received: torch.Tensor, num_worst_tokens: int | None) -> torch.Tensor:
    """int32 [1, 2R + 1 + L] from the messages received (int32 [R, 2 + L], row s from rank s).

    ``num_worst_tokens``: more rows received than this is an error (the outputs hold that many rows):
    raised at once for CPU tensors, a device-side assert for CUDA ones (as the notify kernel traps)."""
    num_ranks = received.shape[0]
    meta = torch.empty(
        1, 2 * num_ranks + 1 + received.shape[1] - 2, dtype=torch.int32, device=received.device
    )
    meta[0, 0] = 0
    torch.cumsum(received[:, 0], 0, dtype=torch.int32, out=meta[0, 1 : num_ranks + 1])
    meta[0, num_ranks + 1 : 2 * num_ranks + 1] = received[:, 1]
    meta[0, 2 * num_ranks + 1 :] = received[:, 2:].sum(0, dtype=torch.int32)
    if num_worst_tokens is not None:
        torch._assert_async(
            meta[0, num_ranks] <= num_worst_tokens,
            f"dispatch: num_worst_tokens={num_worst_tokens} is smaller than the rows this rank receives",
        )
    return meta


class GroupCountExchange:
    """The notify and cached-notify steps of one rank of ``group``, over the process group."""

    def __init__(self, group: dist.ProcessGroup | None, *, device: torch.device, timeout_s: float) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.timeout_s = timeout_s
        self._barrier_flag = torch.zeros(1, dtype=torch.int32, device=device)

    def notify(
        self, per_rank: torch.Tensor, per_expert: torch.Tensor, num_tokens: int, num_worst_tokens: int | None
    ) -> torch.Tensor:
        """``meta`` [1, 2R + 1 + L] of this rank from its layout (``per_rank`` [R], ``per_expert`` [E])."""
        message = count_message(per_rank.reshape(-1), per_expert.reshape(-1), num_tokens)
        received = torch.empty_like(message)
        self._run("dispatch: count exchange", dist.all_to_all_single, received, message)
        return meta_from_messages(received, num_worst_tokens)

    def barrier(self) -> None:
        """Stream-ordered barrier of the group (before a cached dispatch and before a combine)."""
        self._run("barrier", dist.all_reduce, self._barrier_flag)

    def _run(self, phase: str, collective, *args: torch.Tensor) -> None:  # noqa: ANN001
        try:
            work = collective(*args, group=self.group, async_op=True)
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
