"""Host side of the GIN transport (csrc/net_gin.cuh): NCCL communicator, window, device communicator.

``GinTransport`` creates, over a torch.distributed process group, an NCCL communicator of the EP group
(rank = group rank = node * G + local), allocates the symmetric buffer with ``ncclMemAlloc``, registers
the whole buffer as one window (``ncclCommWindowRegister``, so InterLayout offsets are window offsets),
creates the device communicator with the GIN requirements (``4 * max_channels * num_nodes`` signals, a
context-count hint, full GIN connectivity) and copies it into device memory. ``kernel_arg`` packs the
kernel argument ``commkit::GinNet`` by value.

Binding: NCCL's C API through ctypes, on the libnccl that ships next to the headers the device code is
compiled against (commkit/jit/nccl.py). NOTE: not nccl4py or cupy.cuda.nccl: their generated structs pin
one NCCL layout and they may load another libnccl than the headers' one, while the ncclDevComm that the
library fills must have the layout the kernel was compiled with; the library version is checked against
the headers. Every call checks its ncclResult_t and raises :class:`NcclError` naming the call and NCCL's
error string. CuPy (imported lazily) zeroes the buffer and holds the device copy of the devComm.

Layouts: sizes and offsets of ncclDevComm, ncclDevCommRequirements and GinNet come from a tiny host
program compiled with nvcc against the same headers (:func:`probe_layout`, cached like the cubins),
never from a hand-written mirror.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from commkit.jit import nccl as nccl_headers
from commkit.jit.compiler import cache_dir, cache_key, include_root, nvcc_path

NUM_SIGNAL_KINDS = 4  # dispatch tail/head, combine tail/head (csrc/net.cuh, NetSignal)

# Every libnccl function this module calls (tests/test_gin_host.py checks that the library exports them).
NCCL_SYMBOLS = (
    "ncclGetVersion",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclMemAlloc",
    "ncclMemFree",
    "ncclCommWindowRegister",
    "ncclCommWindowDeregister",
    "ncclDevCommCreate",
    "ncclDevCommDestroy",
)

INTER_LAYOUT_FIELDS = (
    "num_nodes",
    "gpus_per_node",
    "max_channels",
    "nvl_slot_bytes",
    "net_slot_bytes",
    "signals_offset",
    "nvl_ring_offset",
    "net_ring_offset",
    "net_stage_offset",
)
GIN_NET_POINTERS = ("comm", "window", "base")


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


class NcclError(RuntimeError):
    """An NCCL call failed (the message names the call and NCCL's error string)."""


# ---------------------------------------------------------------------------------------------------
# Struct layouts, from a host program compiled against the NCCL headers
# ---------------------------------------------------------------------------------------------------

PROBE_SOURCE = r"""
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include "csrc/net_gin.cuh"

#define FIELD(type, name) printf(#type "." #name " %zu %zu\n", offsetof(type, name), sizeof(((type*)0)->name))

using commkit::GinNet;
using commkit::InterLayout;

// The GIN backend (ncclNetDeviceType) of each connection (NCCL >= 2.29: ginNetDeviceTypes, used
// entries: ginConnectionCount) or context (2.28: ginTypes, ginContextCount): ncclDevComm.ginBackends.
template <typename T, typename = void>
struct HasNetDeviceTypes : std::false_type {};
template <typename T>
struct HasNetDeviceTypes<T, std::void_t<decltype(&T::ginNetDeviceTypes)>> : std::true_type {};
#define DEV_COMM_FIELD_AS(label, name) \
    printf("ncclDevComm." label " %zu %zu\n", offsetof(T, name), sizeof(((T*)0)->name))
template <typename T>
void print_backends() {
    if constexpr (HasNetDeviceTypes<T>::value) {
        DEV_COMM_FIELD_AS("ginBackends", ginNetDeviceTypes);
        DEV_COMM_FIELD_AS("ginBackendCount", ginConnectionCount);
    } else {
        DEV_COMM_FIELD_AS("ginBackends", ginTypes);
        DEV_COMM_FIELD_AS("ginBackendCount", ginContextCount);
    }
}

int main() {
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
    ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;  // NCCL >= 2.29: mandatory
#else
    ncclDevCommRequirements reqs;
    memset(&reqs, 0, sizeof(reqs));
#endif
#if NCCL_VERSION_CODE >= 22907
    reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;  // ginForceEnable is deprecated since 2.29.7
#else
    reqs.ginForceEnable = true;
#endif
    printf("version_code %d\n", (int)NCCL_VERSION_CODE);
    printf("unique_id_bytes %d\n", (int)NCCL_UNIQUE_ID_BYTES);
    printf("win_coll_symmetric %d\n", (int)NCCL_WIN_COLL_SYMMETRIC);
    printf("win_required_alignment %d\n", (int)NCCL_WIN_REQUIRED_ALIGNMENT);
    printf("strong_signals %d\n", (int)COMMKIT_GIN_HAS_STRONG_SIGNALS);
    printf("net_slots %d\n", commkit::kNetSlots);
    printf("sizeof.ncclDevComm %zu %zu\n", sizeof(ncclDevComm), alignof(ncclDevComm));
    printf("sizeof.ncclDevCommRequirements %zu %zu\n", sizeof(reqs), alignof(ncclDevCommRequirements));
    printf("sizeof.GinNet %zu %zu\n", sizeof(GinNet), alignof(GinNet));
    printf("sizeof.InterLayout %zu %zu\n", sizeof(InterLayout), alignof(InterLayout));
    FIELD(ncclDevComm, rank);
    FIELD(ncclDevComm, nRanks);
    FIELD(ncclDevComm, ginContextCount);
    print_backends<ncclDevComm>();
    FIELD(ncclDevCommRequirements, ginContextCount);
    FIELD(ncclDevCommRequirements, ginSignalCount);
    FIELD(ncclDevCommRequirements, ginCounterCount);
    FIELD(GinNet, comm);
    FIELD(GinNet, window);
    FIELD(GinNet, base);
    FIELD(GinNet, layout);
    FIELD(InterLayout, num_nodes);
    FIELD(InterLayout, gpus_per_node);
    FIELD(InterLayout, max_channels);
    FIELD(InterLayout, nvl_slot_bytes);
    FIELD(InterLayout, net_slot_bytes);
    FIELD(InterLayout, signals_offset);
    FIELD(InterLayout, nvl_ring_offset);
    FIELD(InterLayout, net_ring_offset);
    FIELD(InterLayout, net_stage_offset);
    printf("requirements_hex ");
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&reqs);
    for (size_t i = 0; i < sizeof(reqs); ++i)
        printf("%02x", bytes[i]);
    printf("\n");
    return 0;
}
"""


@dataclass(frozen=True)
class GinLayout:
    """Sizes, alignments and field offsets of the structs the host exchanges with NCCL and the kernels."""

    version_code: int
    unique_id_bytes: int
    win_coll_symmetric: int
    win_required_alignment: int
    strong_signals: bool
    net_slots: int  # kNetSlots of csrc/net.cuh
    sizes: dict[str, tuple[int, int]]  # struct -> (sizeof, alignof)
    fields: dict[str, tuple[int, int]]  # "Struct.field" -> (offsetof, sizeof)
    requirements_template: bytes  # ncclDevCommRequirements: initializer + GIN connectivity

    def size(self, name: str) -> int:
        return self.sizes[name][0]

    def align(self, name: str) -> int:
        return self.sizes[name][1]

    def offset(self, field: str) -> int:
        return self.fields[field][0]


def _parse_probe(out: str) -> GinLayout:
    scalars: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    fields: dict[str, tuple[int, int]] = {}
    for line in out.splitlines():
        key, *values = line.split()
        if key.startswith("sizeof."):
            sizes[key[len("sizeof.") :]] = (int(values[0]), int(values[1]))
        elif "." in key:
            fields[key] = (int(values[0]), int(values[1]))
        else:
            scalars[key] = values[0] if values else ""
    requirements = bytes.fromhex(scalars["requirements_hex"])
    if len(requirements) != sizes["ncclDevCommRequirements"][0]:
        raise RuntimeError("layout probe: requirements bytes do not match sizeof(ncclDevCommRequirements)")
    return GinLayout(
        version_code=int(scalars["version_code"]),
        unique_id_bytes=int(scalars["unique_id_bytes"]),
        win_coll_symmetric=int(scalars["win_coll_symmetric"]),
        win_required_alignment=int(scalars["win_required_alignment"]),
        strong_signals=scalars["strong_signals"] == "1",
        net_slots=int(scalars["net_slots"]),
        sizes=sizes,
        fields=fields,
        requirements_template=requirements,
    )


def probe_layout(
    headers: nccl_headers.NcclHeaders | None = None, *, cache: Path | None = None, root: Path | None = None
) -> GinLayout:
    """The struct layouts of ``headers`` (default: :func:`commkit.jit.nccl.find_headers`), cached on disk.

    The cache key covers the probe source, every header under csrc/, ptx/ and the NCCL include directory,
    and ``nvcc --version``.
    """
    headers = headers or nccl_headers.find_headers()
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: the GIN layout probe needs the CUDA toolkit (or COMMKIT_NVCC)")
    root = (root or include_root()).resolve()
    options = ("-std=c++17", "-arch=sm_90", "--diag-suppress=177")
    key = cache_key(PROBE_SOURCE, ("gin-layout-probe", *options), root, nvcc, (headers.include_dir,))
    entry = (cache or cache_dir()) / "gin-layout" / f"{key}.json"
    if entry.is_file():
        return _parse_probe(json.loads(entry.read_text())["stdout"])
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".probe-") as tmp:
        src, exe = Path(tmp) / "probe.cu", Path(tmp) / "probe"
        src.write_text(PROBE_SOURCE)
        cmd = [nvcc, *options, "-I", str(root), "-I", str(headers.include_dir), "-o", str(exe), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"GIN layout probe: nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
            )
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"GIN layout probe failed (exit {run.returncode}): {run.stderr}")
        layout = _parse_probe(run.stdout)  # validate before caching
        staged = Path(tmp) / "layout.json"
        staged.write_text(json.dumps({"stdout": run.stdout, "headers": str(headers.include_dir)}))
        os.replace(staged, entry)
    return layout


def _value(layout: Mapping[str, int] | Any, name: str) -> int:
    return int(layout[name] if isinstance(layout, Mapping) else getattr(layout, name))


def pack_gin_net(
    layout: GinLayout, *, comm: int, window: int, base: int, inter: Mapping[str, int] | Any
) -> bytes:
    """The bytes of ``commkit::GinNet`` (exact sizeof, offsets from the probe).

    ``inter``: the fields of InterLayout, a mapping or an object with attributes ``num_nodes``, ...,
    ``net_stage_offset`` (INTER_LAYOUT_FIELDS).
    """
    out = bytearray(layout.size("GinNet"))
    for name, value in (("comm", comm), ("window", window), ("base", base)):
        offset, size = layout.fields[f"GinNet.{name}"]
        struct.pack_into("<Q" if size == 8 else "<I", out, offset, value)
    inter_base = layout.offset("GinNet.layout")
    for name in INTER_LAYOUT_FIELDS:
        offset, size = layout.fields[f"InterLayout.{name}"]
        struct.pack_into({4: "<i", 8: "<q"}[size], out, inter_base + offset, _value(inter, name))
    return bytes(out)


def gin_net_dtype(layout: GinLayout) -> np.dtype:
    """A NumPy structured dtype with GinNet's exact offsets, size and alignment (a CuPy kernel argument)."""
    names, formats, offsets = [], [], []
    for name in GIN_NET_POINTERS:
        offset, size = layout.fields[f"GinNet.{name}"]
        names.append(name)
        formats.append(np.uint64 if size == 8 else np.uint32)
        offsets.append(offset)
    inter_base = layout.offset("GinNet.layout")
    for name in INTER_LAYOUT_FIELDS:
        offset, size = layout.fields[f"InterLayout.{name}"]
        names.append(name)
        formats.append({4: np.int32, 8: np.int64}[size])
        offsets.append(inter_base + offset)
    dtype = np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": layout.size("GinNet")},
        align=True,
    )
    if dtype.alignment != layout.align("GinNet"):
        raise RuntimeError(f"GinNet alignment {layout.align('GinNet')} != NumPy's {dtype.alignment}")
    return dtype


def requirements_bytes(layout: GinLayout, *, signal_count: int, context_count: int) -> bytes:
    """ncclDevCommRequirements with the GIN counts set (the rest: NCCL's initializer, zeros before 2.29)."""
    out = bytearray(layout.requirements_template)
    counts = {"ginSignalCount": signal_count, "ginContextCount": context_count, "ginCounterCount": 0}
    for name, value in counts.items():
        offset, size = layout.fields[f"ncclDevCommRequirements.{name}"]
        struct.pack_into({4: "<i", 8: "<q"}[size], out, offset, value)
    return bytes(out)


# ---------------------------------------------------------------------------------------------------
# libnccl through ctypes
# ---------------------------------------------------------------------------------------------------


class NcclLibrary:
    """The NCCL functions of NCCL_SYMBOLS, each call checked (:class:`NcclError` with NCCL's error string)."""

    def __init__(self, path: Path | str) -> None:
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NcclError(f"cannot load libnccl from {path}: {exc}") from None
        self.path = Path(path)
        missing = [name for name in NCCL_SYMBOLS if not hasattr(self.lib, name)]
        if missing:
            raise NcclError(f"{path} does not export {missing} (NCCL >= 2.28.7 needed for the GIN path)")
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        self.lib.ncclGetLastError.restype = ctypes.c_char_p
        self.lib.ncclGetLastError.argtypes = [ctypes.c_void_p]

    def error_string(self, result: int) -> str:
        text = self.lib.ncclGetErrorString(result)
        return text.decode(errors="replace") if text else f"ncclResult_t {result}"

    def call(self, name: str, *args: Any, comm: int | None = None) -> None:
        """``name(*args)``; raises when the ncclResult_t is not ncclSuccess."""
        if name not in NCCL_SYMBOLS:
            raise AssertionError(f"{name} is not in NCCL_SYMBOLS")
        result = getattr(self.lib, name)(*args)
        if result != 0:
            last = self.lib.ncclGetLastError(ctypes.c_void_p(comm) if comm else None)
            detail = f"; last error: {last.decode(errors='replace')}" if last else ""
            raise NcclError(f"{name} failed: {self.error_string(result)} (ncclResult_t {result}){detail}")

    def version_code(self) -> int:
        version = ctypes.c_int(0)
        self.call("ncclGetVersion", ctypes.byref(version))
        return version.value


def load_library(headers: nccl_headers.NcclHeaders) -> NcclLibrary:
    """The libnccl of ``headers``; its version must be the headers' (the ncclDevComm layout depends on it)."""
    lib = NcclLibrary(nccl_headers.find_library(headers))
    if lib.version_code() != headers.version_code:
        raise NcclError(
            f"libnccl at {lib.path} has version code {lib.version_code()}, the headers at "
            f"{headers.include_dir} {headers.version_code}: the GIN path needs both from the same NCCL "
            "(set COMMKIT_NCCL_LIB or COMMKIT_NCCL_INCLUDE)"
        )
    return lib


def _aligned_host_buffer(size: int, align: int) -> tuple[Any, int]:
    raw = (ctypes.c_uint8 * (size + align))()
    address = ctypes.addressof(raw)
    return raw, (address + align - 1) // align * align


def _unique_id_type(num_bytes: int) -> type[ctypes.Structure]:
    """ncclUniqueId (``struct { char internal[NCCL_UNIQUE_ID_BYTES]; }``), passed by value."""
    return type("ncclUniqueId", (ctypes.Structure,), {"_fields_": [("internal", ctypes.c_char * num_bytes)]})


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
        uid = _unique_id_type(self.layout.unique_id_bytes)()
        if self.rank == 0:
            self.lib.call("ncclGetUniqueId", ctypes.byref(uid))
        payload: list[Any] = [bytes(uid) if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        ctypes.memmove(ctypes.byref(uid), bytes(payload[0]), self.layout.unique_id_bytes)
        self.lib.lib.ncclCommInitRank.argtypes = [ctypes.c_void_p, ctypes.c_int, type(uid), ctypes.c_int]
        self.lib.call("ncclCommInitRank", ctypes.byref(self._comm), self.num_ranks, uid, self.rank)
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
        reqs_raw, reqs_ptr = _aligned_host_buffer(len(reqs), self.layout.align("ncclDevCommRequirements"))
        ctypes.memmove(reqs_ptr, reqs, len(reqs))
        size = self.layout.size("ncclDevComm")
        host, host_ptr = _aligned_host_buffer(size, self.layout.align("ncclDevComm"))
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
            if _value(inter, name) != value:
                raise ValueError(f"InterLayout.{name} = {_value(inter, name)}, the transport has {value}")
        stage_end = _value(inter, "net_stage_offset") + (
            self.max_channels * self.num_nodes * self.layout.net_slots * _value(inter, "net_slot_bytes")
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
