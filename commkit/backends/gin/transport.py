"""The GIN transport of one rank (csrc/net_gin.cuh): NCCL communicator, window, device communicator.

``GinTransport`` creates, over a torch.distributed process group, an NCCL communicator of the EP group
(rank = group rank = node * G + local), allocates the symmetric buffer with ``ncclMemAlloc``, registers
the whole buffer as one window (``ncclCommWindowRegister``, so InterLayout offsets are window offsets),
creates the device communicator with the GIN requirements (``4 * max_channels * num_nodes`` signals, a
context-count hint, full GIN connectivity) and copies it into device memory. ``kernel_arg`` packs the
kernel argument ``commkit::GinNet`` by value. NCCL is called through ``binding.py``, the structs are
laid out by ``layout.py`` from the probe (``probe.py``); CuPy (imported lazily) zeroes the buffer and
holds the device copy of the devComm.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import numpy as np

from commkit.backends.gin.binding import NcclError, aligned_host_buffer, load_library, unique_id_type
from commkit.backends.gin.layout import field_value, gin_net_dtype, pack_gin_net, requirements_bytes
from commkit.backends.gin.probe import probe_layout
from commkit.jit import nccl as nccl_headers

NUM_SIGNAL_KINDS = 4  # dispatch tail/head, combine tail/head (csrc/net.cuh, NetSignal)

# ncclNetDeviceType of a GIN backend -> the name in NCCL's NCCL_GIN_<NAME>_ENABLE macros
GIN_BACKENDS = {2: "PROXY", 3: "GDAKI", 4: "GPI", 5: "EFA_GDA"}


def backend_defines(backend_types: tuple[int, ...]) -> tuple[str, ...]:
    """nvcc options that compile only the GIN backends in ``backend_types`` into a kernel (NCCL's device
    code branches on the backend at run time; the others are dead code that costs registers: with all
    of them the internode kernels spill). Empty when a type is unknown (a newer NCCL): all stay in."""
    if not backend_types or any(t not in GIN_BACKENDS for t in backend_types):
        return ()
    return tuple(
        f"-DNCCL_GIN_{name}_ENABLE={int(code in backend_types)}"
        for code, name in sorted(GIN_BACKENDS.items())
    )


def _cupy_runtime() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("the GIN transport needs CuPy: pip install 'commkit[cu12]' (or [cu13])") from exc
    return cupy.cuda.runtime


class GinTransport:
    """NCCL communicator + symmetric window + GIN device communicator of one rank of the EP group.

    Collective: every rank of ``group`` constructs it with the same arguments. The current CUDA device is
    the one NCCL uses. ``buffer_bytes``: the symmetric buffer (the whole buffer is the window; an
    internode kernel's InterLayout must fit in it). ``close()`` frees everything (collectively as well).
    """

    def __init__(
        self,
        group: Any,
        *,
        num_nodes: int,
        gpus_per_node: int,
        max_channels: int,
        buffer_bytes: int,
        context_count: int = 4,
        headers: nccl_headers.NcclHeaders | None = None,
    ) -> None:
        import torch.distributed as dist

        group = group if group is not None else dist.group.WORLD  # get_global_rank needs the object
        self.group = group
        self.headers = headers or nccl_headers.find_headers()
        self.layout = probe_layout(self.headers)
        self.lib = load_library(self.headers)
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if self.num_ranks != num_nodes * gpus_per_node:
            raise ValueError(f"group of {self.num_ranks} ranks != {num_nodes} nodes x {gpus_per_node} GPUs")
        self.num_nodes, self.gpus_per_node, self.max_channels = num_nodes, gpus_per_node, max_channels
        self.signal_count = NUM_SIGNAL_KINDS * max_channels * num_nodes
        align = self.layout.win_required_alignment
        self.buffer_bytes = (buffer_bytes + align - 1) // align * align
        self._comm = ctypes.c_void_p()
        self._window = ctypes.c_void_p()
        self._buffer = ctypes.c_void_p()
        self._devcomm_host: Any = None
        self._devcomm_ptr = 0  # host ncclDevComm filled by ncclDevCommCreate (0: not created)
        self.dev_comm_device = 0  # its device copy, GinNet::comm
        self.generation = 0  # windows made after the first (grow)

        # Communicator of the group: group rank 0 makes the unique id, the group broadcasts it
        uid = unique_id_type(self.layout.unique_id_bytes)()
        if self.rank == 0:
            self.lib.call("ncclGetUniqueId", ctypes.byref(uid))
        payload: list[Any] = [bytes(uid) if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        ctypes.memmove(ctypes.byref(uid), bytes(payload[0]), self.layout.unique_id_bytes)
        self.lib.comm_init_rank(self._comm, self.num_ranks, uid, self.rank)
        try:
            self._setup(context_count)
        except BaseException:
            self.close()
            raise

    def grow(self, buffer_bytes: int) -> None:
        """A larger window (collective: every rank with the same size): the device communicator, the
        window and the buffer are made again in the order of the first setup; the NCCL communicator
        (bootstrap, connections) is kept. ``generation`` counts the windows made. The new buffer is
        allocated (a local step that can fail, e.g. out of memory) and the ranks agree on it before the
        collective steps; if it failed anywhere, every rank raises ``NcclError`` naming the ranks and
        is left without a window (``Gin`` then closes the transport and makes a new one next time)."""
        from commkit.backends.agree import describe_failed, run_agreed

        align = self.layout.win_required_alignment
        buffer_bytes = (buffer_bytes + align - 1) // align * align
        if buffer_bytes <= self.buffer_bytes:
            return
        _cupy_runtime().deviceSynchronize()  # no kernel may use the old window any more
        self._free_window()
        self.buffer_bytes = 0  # no window until the new one is made
        self.generation += 1
        _, failed = run_agreed(self.group, lambda: self._alloc_buffer(buffer_bytes))
        if failed:
            self._free_window()
            raise NcclError(
                f"GinTransport.grow: a window of {buffer_bytes} bytes could not be allocated on "
                f"{describe_failed(failed)}"
            )
        self.buffer_bytes = buffer_bytes
        self._register(self._context_hint)

    def _setup(self, context_count: int) -> None:
        self._alloc_buffer(self.buffer_bytes)
        self._register(context_count)

    def _alloc_buffer(self, buffer_bytes: int) -> None:
        """The symmetric buffer, zeroed (local)."""
        runtime = _cupy_runtime()
        self.lib.call(
            "ncclMemAlloc", ctypes.byref(self._buffer), ctypes.c_size_t(buffer_bytes), comm=self._comm.value
        )
        runtime.memset(self._buffer.value, 0, buffer_bytes)
        runtime.deviceSynchronize()

    def _register(self, context_count: int) -> None:
        """The buffer registered whole as one window, then the device communicator (collective)."""
        comm = self._comm.value
        runtime = _cupy_runtime()
        self._context_hint = context_count
        self.lib.call(
            "ncclCommWindowRegister",
            self._comm,
            self._buffer,
            ctypes.c_size_t(self.buffer_bytes),
            ctypes.byref(self._window),
            ctypes.c_int(self.layout.win_coll_symmetric),
            comm=comm,
        )
        # Device communicator with the GIN requirements (collective), then its device copy
        reqs = requirements_bytes(self.layout, signal_count=self.signal_count, context_count=context_count)
        reqs_raw, reqs_ptr = aligned_host_buffer(len(reqs), self.layout.align("ncclDevCommRequirements"))
        ctypes.memmove(reqs_ptr, reqs, len(reqs))
        size = self.layout.size("ncclDevComm")
        host, host_ptr = aligned_host_buffer(size, self.layout.align("ncclDevComm"))
        self.lib.call(
            "ncclDevCommCreate", self._comm, ctypes.c_void_p(reqs_ptr), ctypes.c_void_p(host_ptr), comm=comm
        )
        del reqs_raw
        self._devcomm_host, self._devcomm_ptr = host, host_ptr
        self.dev_comm_device = runtime.malloc(size)
        runtime.memcpy(self.dev_comm_device, self._devcomm_ptr, size, runtime.memcpyHostToDevice)
        self._check_dev_comm()

    def _dev_comm_field(self, name: str) -> int:
        if not self._devcomm_ptr:
            raise NcclError(
                f"ncclDevComm.{name}: the transport has no device communicator (closed, or a grow failed)"
            )
        offset, size = self.layout.fields[f"ncclDevComm.{name}"]
        raw = ctypes.string_at(self._devcomm_ptr + offset, size)
        return int.from_bytes(raw, "little", signed=name in ("rank", "nRanks"))

    def _check_dev_comm(self) -> None:
        rank, num_ranks = self._dev_comm_field("rank"), self._dev_comm_field("nRanks")
        if (rank, num_ranks) != (self.rank, self.num_ranks):
            raise NcclError(
                f"ncclDevCommCreate: devComm rank {rank}/{num_ranks}, expected {self.rank}/{self.num_ranks}"
            )
        if self.context_count < 1:
            raise NcclError("ncclDevCommCreate: the device communicator has no GIN context (no GIN network?)")

    @property
    def backend_types(self) -> tuple[int, ...]:
        """The GIN backends (ncclNetDeviceType) of the device communicator's connections."""
        offset, size = self.layout.fields["ncclDevComm.ginBackends"]
        count = min(self._dev_comm_field("ginBackendCount"), size)
        raw = ctypes.string_at(self._devcomm_ptr + offset, count)
        return tuple(sorted({b for b in raw if b}))

    @property
    def context_count(self) -> int:
        """ginContextCount of the device communicator (the kernels use channel % this)."""
        return self._dev_comm_field("ginContextCount")

    @property
    def buffer_ptr(self) -> int:
        """Device address of this rank's symmetric buffer (the window's local address)."""
        return int(self._buffer.value or 0)

    def net_bytes(self, inter: Mapping[str, int] | Any) -> bytes:
        """The GinNet kernel argument as bytes, for the InterLayout ``inter`` (checked against this setup)."""
        expected = {"num_nodes": self.num_nodes, "gpus_per_node": self.gpus_per_node}
        expected["max_channels"] = self.max_channels
        for name, value in expected.items():
            got = field_value(inter, name)
            if got != value:
                raise ValueError(f"InterLayout.{name} = {got}, the transport has {value}")
        stage_end = field_value(inter, "net_stage_offset") + (
            self.max_channels * self.num_nodes * self.layout.net_slots * field_value(inter, "net_slot_bytes")
        )
        if stage_end > self.buffer_bytes:
            raise ValueError(f"InterLayout needs {stage_end} bytes, the window has {self.buffer_bytes}")
        return pack_gin_net(
            self.layout,
            comm=self.dev_comm_device,
            window=int(self._window.value or 0),
            base=self.buffer_ptr,
            inter=inter,
        )

    def kernel_arg(self, inter: Mapping[str, int] | Any) -> np.void:
        """GinNet by value for a CuPy kernel launch (a structured scalar with the C struct's layout)."""
        return np.frombuffer(self.net_bytes(inter), dtype=gin_net_dtype(self.layout))[0]

    def close(self) -> None:
        """Destroy the device communicator, the window, the buffer and the communicator (collective)."""
        comm = self._comm.value
        if comm is None:
            return
        _cupy_runtime().deviceSynchronize()  # no kernel may use them any more
        self._free_window()
        self.lib.call("ncclCommFinalize", self._comm, comm=comm)
        self.lib.call("ncclCommDestroy", self._comm)
        self._comm = ctypes.c_void_p()

    def _free_window(self) -> None:
        """Destroy the device communicator, the window and the buffer (collective); the communicator stays."""
        comm = self._comm.value
        runtime = _cupy_runtime()
        if self.dev_comm_device:
            runtime.free(self.dev_comm_device)
            self.dev_comm_device = 0
        if self._devcomm_ptr:
            self.lib.call("ncclDevCommDestroy", self._comm, ctypes.c_void_p(self._devcomm_ptr), comm=comm)
            self._devcomm_ptr, self._devcomm_host = 0, None
        if self._window.value:
            self.lib.call("ncclCommWindowDeregister", self._comm, self._window, comm=comm)
            self._window = ctypes.c_void_p()
        if self._buffer.value:
            self.lib.call("ncclMemFree", self._buffer, comm=comm)
            self._buffer = ctypes.c_void_p()
