"""The launch seam: where the engines' kernels run (``KernelEngine``, ``InternodeEngine``).

One object answers the three questions an engine asks: which kernel (``kernel(spec)``), how many of
its blocks fit on one SM (``blocks_per_sm``), and run it (``launch``). Implementations:

- ``CupyLauncher``: the cubins of ``commkit.jit`` on a CUDA device, on the current torch stream;
- ``HostLauncher``: the host execution of the same kernel sources (``commkit.jit.host``) on the CPU,
  synchronous; its ``num_sms`` is an H100's, so that the SM budget checks are the GPU's;
- the host-logic tests' stand-ins (``tests/fake_kernels.py``).

Arguments: an engine passes the kernel's parameters as its ``commkit.backends.kernel_args`` instance
(named as in C++; ``values()`` in order, each a tensor (its data pointer; None for a null pointer) or
a numpy ``int32``/``int64`` scalar of the parameter's C type); a launcher turns them into what its
device takes (``raw_args``), the tests' stand-ins read them by name. ``for_device(device)`` picks the
launcher of an engine that was given none; ``use(launcher)`` (or ``set_default``) makes it another
one: the tests' stand-ins.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from commkit.backends.kernel_args import KernelArgs
from commkit.jit.compiler import KernelSpec
from commkit.jit.host import HostBuild, load_host_kernel

HOST_NUM_SMS = 132  # what the host execution reports as the device's SMs (an H100 SXM's)


class Launcher(Protocol):
    device_type: str  # "cuda" or "cpu": the device of the tensors it takes
    num_sms: int  # SMs of the device (the largest budget a launch may use)

    def kernel(self, spec: KernelSpec) -> Any:
        """The launchable kernel of one instantiation (compiled on first use)."""
        ...

    def blocks_per_sm(self, kernel: Any, num_threads: int) -> int:
        """How many blocks of ``num_threads`` threads of ``kernel`` one SM holds at once."""
        ...

    def launch(self, kernel: Any, num_blocks: int, num_threads: int, args: KernelArgs) -> None:
        """Runs ``kernel`` on ``num_blocks`` blocks of ``num_threads`` threads with ``args``."""
        ...


def pointer(arg: torch.Tensor | None) -> np.uint64:
    """A pointer parameter: the tensor's data pointer (0 for None)."""
    return np.uint64(0 if arg is None else arg.data_ptr())


def raw_args(args: KernelArgs | tuple[Any, ...]) -> tuple[Any, ...]:
    """The launch tuple of ``args`` (a ``KernelArgs`` or its ``values()``) with every tensor (or None)
    turned into its pointer."""
    values = args.values() if isinstance(args, KernelArgs) else args
    return tuple(pointer(a) if a is None or isinstance(a, torch.Tensor) else a for a in values)


def _cupy_stream(stream: torch.cuda.Stream, device_index: int) -> Any:
    """The CuPy view of a torch stream: the CUDA stream protocol where torch has it (CuPy >= 14
    deprecates ExternalStream), else ExternalStream on the raw handle."""
    import cupy

    if hasattr(stream, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(stream.cuda_stream, device_index)


class CupyLauncher:
    """The kernels as cubins loaded by CuPy, launched on the current torch stream of ``device``."""

    device_type = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.num_sms = int(torch.cuda.get_device_properties(device).multi_processor_count)
        self._streams: dict[int, Any] = {}  # CUDA stream handle -> CuPy stream
        self._cupy_device: Any = None

    def kernel(self, spec: KernelSpec) -> Any:
        from commkit.jit.loader import get_kernel

        return get_kernel(spec)

    def blocks_per_sm(self, kernel: Any, num_threads: int) -> int:
        try:
            from cupy_backends.cuda.api import driver

            return int(driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, num_threads, 0))
        except Exception:  # noqa: BLE001 - fall back to the register file bound
            regs = max(1, int(kernel.attributes.get("num_regs", 128)))
            return max(0, min(2048 // num_threads, 65536 // (regs * num_threads)))

    def launch(self, kernel: Any, num_blocks: int, num_threads: int, args: KernelArgs) -> None:
        torch_stream = torch.cuda.current_stream(self.device)
        handle = torch_stream.cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._streams[handle] = _cupy_stream(torch_stream, self.device.index or 0)
        if self._cupy_device is None:
            import cupy

            self._cupy_device = cupy.cuda.Device(self.device.index or 0)
        with self._cupy_device:
            kernel((num_blocks,), (num_threads,), raw_args(args), stream=stream)


class HostLauncher:
    """The host execution: the same kernels compiled for the CPU and run to completion in ``launch``.

    ``build``: the variant (``plain``, ``tsan``, ``asan``) and planted faults of the mutation tests;
    ``seed``: the order of the fibers of a block (0: index order; default ``$COMMKIT_HOST_SEED``);
    ``watchdog_s``: a launch still running after this long is stopped as a ``KernelFault`` (the
    kernels' own bounded waits should have reported first: set it above their ``timeout_s``).
    """

    device_type = "cpu"
    num_sms = HOST_NUM_SMS

    def __init__(
        self, build: HostBuild | None = None, *, seed: int | None = None, watchdog_s: float = 600.0
    ) -> None:
        self.build = build or HostBuild()
        self.seed = int(os.environ.get("COMMKIT_HOST_SEED", "0")) if seed is None else seed
        self.watchdog_s = watchdog_s

    def kernel(self, spec: KernelSpec) -> Any:
        return load_host_kernel(spec, self.build.variant, self.build.defines)

    def blocks_per_sm(self, kernel: Any, num_threads: int) -> int:
        return 1  # one 512-thread block per SM, as the kernels' __launch_bounds__ ask of a GPU

    def launch(self, kernel: Any, num_blocks: int, num_threads: int, args: KernelArgs) -> None:
        kernel.launch(num_blocks, num_threads, raw_args(args), seed=self.seed, watchdog_s=self.watchdog_s)


def stream_context(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """The comm stream's context on CUDA; nothing on the CPU (the host execution is synchronous)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


_default: Launcher | None = None


def set_default(launcher: Launcher | None) -> Launcher | None:
    """Engines made from now on without a launcher of their own use ``launcher`` (None: the device's
    own again); returns the one it replaces."""
    global _default
    previous, _default = _default, launcher
    return previous


@contextlib.contextmanager
def use(launcher: Launcher) -> Iterator[Launcher]:
    """``set_default(launcher)`` for the engines made inside the ``with``."""
    previous = set_default(launcher)
    try:
        yield launcher
    finally:
        set_default(previous)


def for_device(device: torch.device) -> Launcher:
    """The launcher of an engine on ``device``: CuPy on CUDA, the host execution on the CPU (or the
    one ``set_default``/``use`` installed)."""
    if _default is not None:
        return _default
    if device.type == "cuda":
        return CupyLauncher(device)
    if device.type == "cpu":
        return HostLauncher()
    raise ValueError(f"device: expected a cuda or cpu device for the kernels, got {device}")
