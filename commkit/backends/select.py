"""Which backend a ``Buffer`` runs on: ``select`` turns the requested name ("auto", "torch",
"kernels"), the group and its nodes into a backend object (``commkit.backends.base.Backend``).

The choice, in order: the internode kernels over several nodes, the one-node kernels (CUDA IPC, or
the host execution over host shared memory for CPU processes on gloo), else torch.distributed (flat
on one node, two-level over several: ``torch_hier``). "auto" takes the first that can run here and
warns when the internode kernels could not be set up (every rank then takes the torch path);
"kernels" raises ``ConfigError`` saying why they cannot run instead.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import commkit.backends
from commkit.backends import internode_backend
from commkit.backends.base import Backend
from commkit.backends.internode_backend import InternodeKernelsBackend
from commkit.backends.kernels import KernelsBackend
from commkit.backends.torch_dist import TorchBackend
from commkit.backends.torch_hier import HierTorchBackend
from commkit.errors import ConfigError
from commkit.jit.host import host_unavailable_reason


def select(
    backend: str, group: dist.ProcessGroup | None, *, timeout_s: float, num_ranks_per_node: int
) -> Backend:
    """The backend for ``backend`` (checked by the caller to be one of ``BACKENDS``) over ``group``
    with ``num_ranks_per_node`` G (a divisor of the group's ranks)."""
    # NOTE: the two checks are read through their modules: the host tests' stand-ins replace them
    reason = commkit.backends.kernels_unavailable_reason(group)
    num_ranks = dist.get_world_size(group)
    multi_node = num_ranks_per_node < num_ranks
    if reason is None and multi_node:
        reason = internode_backend.internode_unavailable_reason(num_ranks, num_ranks_per_node)
    if backend == "kernels" and reason is not None and not multi_node and dist.get_backend(group) == "gloo":
        # CPU processes: the host execution of the one-node kernels over host shared memory
        host_reason = host_unavailable_reason()
        if host_reason is not None:
            raise ConfigError(f"backend: 'kernels' cannot run here: {reason}; on the CPU: {host_reason}")
        return KernelsBackend(group, timeout_s=timeout_s, device=torch.device("cpu"))
    if backend == "kernels" and reason is not None:
        raise ConfigError(f"backend: 'kernels' cannot run here: {reason}")
    if (backend == "kernels" or (backend == "auto" and reason is None)) and multi_node:
        try:
            return InternodeKernelsBackend(group, timeout_s=timeout_s, num_ranks_per_node=num_ranks_per_node)
        except ConfigError as exc:
            if backend == "kernels":
                raise
            # NOTE: every rank raised (the backend agrees on GIN's setup): all take the torch path
            warnings.warn(f"{exc}; backend 'auto' takes the torch path", stacklevel=3)
    elif backend == "kernels" or (backend == "auto" and reason is None):
        return KernelsBackend(group, timeout_s=timeout_s)
    if multi_node:
        return HierTorchBackend(group, timeout_s=timeout_s, num_ranks_per_node=num_ranks_per_node)
    return TorchBackend(group, timeout_s=timeout_s)
