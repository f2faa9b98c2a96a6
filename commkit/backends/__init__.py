"""Backends behind ``commkit.Buffer``: ``torch`` (torch.distributed) and ``kernels`` (CuPy-loaded kernels)."""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

BACKENDS = ("auto", "torch", "kernels")


def kernels_unavailable_reason(group: dist.ProcessGroup | None = None) -> str | None:
    """Why the ``kernels`` backend cannot run here (None when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'commkit[cu12]' or 'commkit[cu13]')"
    if importlib.util.find_spec("commkit.backends.kernels") is None:
        return "this commkit build has no kernels backend"
    if dist.is_initialized():
        pg_backend = dist.get_backend(group)
        if pg_backend != "nccl":
            return f"the process group runs on '{pg_backend}', the kernels need CUDA devices (nccl)"
    return None
