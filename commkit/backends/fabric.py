"""Multi-node NVLink (MNNVL): symmetric buffers over the whole group through CUDA fabric handles, and
whether a group sits in one NVLink domain.

On an NVLink domain that spans nodes (NVL72-class systems, with IMEX), a GPU can load from and store
to another node's GPU memory. ``FabricBuffers`` allocates each rank's buffer with ``cuMemCreate``
(``CU_MEM_HANDLE_TYPE_FABRIC``), exports the 64-byte fabric handle, gathers the handles over the
process group, imports and maps every peer's buffer: ``peer_bases`` [R] then holds all ranks, and the
internode kernels run on the ``nvlink-domain`` transport (``commkit::NvlinkDomainNet``: direct
stores into the rail peers' buffers, as on virtual nodes) instead of GIN.

``choose_transport`` says whether every rank of a group shares one NVLink domain: NVML's fabric info
(cluster UUID and clique id, registration completed) and the device's fabric-handle support
(``local_fabric_domain``), gathered over the group with each rank's ``$COMMKIT_INTERNODE_TRANSPORT``,
so that every rank gets the same answer.

Binding: NVIDIA's ``cuda-bindings`` (``cuda.bindings.driver``) through ``CudaDriver``, a thin adapter
that raises ``FabricError`` naming the call and CUDA's error name; tests give ``FabricBuffers`` a
stand-in with the same methods.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commkit.backends import kernels_layout as kl
from commkit.backends.agree import describe_failed, run_agreed
from commkit.backends.symmetric import GroupBuffers
from commkit.errors import CommError, CommTimeoutError, ConfigError
from commkit.hw import nvml as nvml_mod

TRANSPORT_ENV = "COMMKIT_INTERNODE_TRANSPORT"
TRANSPORTS = ("auto", "gin", "nvlink-domain")
FABRIC_HANDLE_BYTES = 64


class FabricError(RuntimeError):
    """A CUDA driver call of the fabric buffers failed (the message names the call)."""


class CudaDriver:
    """The driver calls ``FabricBuffers`` makes, over ``cuda.bindings.driver``."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver as cu
        except ImportError as exc:
            raise FabricError(
                "cuda-bindings is not installed (pip install cuda-bindings, or commkit[cu12]/[cu13])"
            ) from exc
        self.cu = cu
        self._call("cuInit", 0)

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.cu, name)(*args)
        err, rest = result[0], result[1:]
        if err != self.cu.CUresult.CUDA_SUCCESS:
            _, text = self.cu.cuGetErrorName(err)
            raise FabricError(f"{name}: {text.decode() if isinstance(text, bytes) else text}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def _prop(self, device: int) -> Any:
        cu = self.cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
        return prop

    def fabric_supported(self, device: int) -> bool:
        attr = self.cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED
        return bool(self._call("cuDeviceGetAttribute", attr, device))

    def granularity(self, device: int) -> int:
        flag = self.cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        return int(self._call("cuMemGetAllocationGranularity", self._prop(device), flag))

    def create(self, size: int, device: int) -> Any:
        return self._call("cuMemCreate", size, self._prop(device), 0)

    def export(self, handle: Any) -> bytes:
        kind = self.cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
        exported = self._call("cuMemExportToShareableHandle", handle, kind, 0)
        return bytes(getattr(exported, "data", exported))  # a CUmemFabricHandle (64 bytes)

    def import_handle(self, raw: bytes) -> Any:
        fabric = self.cu.CUmemFabricHandle()
        fabric.data = raw
        kind = self.cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
        return self._call("cuMemImportFromShareableHandle", fabric.getPtr(), kind)

    def map(self, handle: Any, size: int, device: int, alignment: int) -> int:
        """Reserves an address range, maps ``handle`` there, gives ``device`` read/write access."""
        cu = self.cu
        va = self._call("cuMemAddressReserve", size, alignment, 0, 0)
        try:
            self._call("cuMemMap", va, size, 0, handle, 0)
            desc = cu.CUmemAccessDesc()
            desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            desc.location.id = device
            desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            self._call("cuMemSetAccess", va, size, [desc], 1)
        except FabricError:
            self._call("cuMemAddressFree", va, size)
            raise
        return int(va)

    def unmap(self, va: int, size: int) -> None:
        self._call("cuMemUnmap", va, size)
        self._call("cuMemAddressFree", va, size)

    def release(self, handle: Any) -> None:
        self._call("cuMemRelease", handle)

    def zero(self, va: int, size: int) -> None:
        self._call("cuMemsetD8", va, 0, size)
        self._call("cuCtxSynchronize")


class FabricBuffers(GroupBuffers):
    """One buffer per rank of the whole group, every rank's mapped in every rank (fabric handles).

    Sized once for ``max_num_sms`` channels, grown (all ranks together, after they agreed on the call:
    ``count_exchange``) for a larger row, like ``IpcBuffers``. Each step that can fail on one rank
    only (allocation, export, import or mapping) is agreed over the group before the next, so every
    rank raises ``CommError`` naming the ranks that failed and none is left waiting."""

    def __init__(
        self, group: dist.ProcessGroup | None, device: torch.device, *, driver: Any = None, **sizing: Any
    ) -> None:
        """``sizing``: ``GroupBuffers``' keywords (max_num_sms, timeout_s); ``driver``: the CUDA driver
        calls (a fake in the tests)."""
        super().__init__(group, device, **sizing)
        self.driver = driver if driver is not None else CudaDriver()
        self.device_index = device.index if device.index is not None else 0
        self._own_handle: Any = None
        self._mapped: list[int] = []  # every rank's buffer in this rank's address space (0: none)
        self._size = 0

    def ensure(self, num_channels: int, slot_bytes: int) -> None:
        if self._mapped and num_channels <= self.max_channels and slot_bytes <= self.max_slot_bytes:
            return
        max_channels = max(num_channels, self.max_channels, self.reserve_channels)
        max_slot_bytes = max(slot_bytes, self.max_slot_bytes)
        # NOTE: every rank reaches here in the same call (same arguments), so this is collective
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._barrier("grow")
        nbytes = kl.total_bytes(max_channels, max_slot_bytes)
        with self._on_device():
            exported = self._agreed("allocate and export", lambda: self._allocate(nbytes))
            gathered: list[Any] = [None] * self.num_ranks
            dist.all_gather_object(gathered, exported, group=self.group)
            sizes = sorted({(size, gran) for _, size, gran in gathered})
            if len(sizes) > 1:  # every rank sees the same list: all raise
                self._release()
                raise CommError(f"fabric buffers: the ranks rounded the buffer to different sizes {sizes}")
            size, gran = sizes[0]
            raws = [raw for raw, _, _ in gathered]
            self._agreed("import and map", lambda: self._map_peers(raws, size, gran))
        self.max_channels, self.max_slot_bytes = max_channels, max_slot_bytes
        self.peer_bases = torch.tensor(self._mapped, dtype=torch.int64, device=self.device)
        self._barrier("grow")

    def _on_device(self) -> Any:
        """The driver calls run in this device's (primary) context."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _allocate(self, nbytes: int) -> tuple[bytes, int, int]:
        """Releases the old buffers and makes this rank's: (fabric handle, size, granularity)."""
        self._release()
        gran = self.driver.granularity(self.device_index)
        size = -(-nbytes // gran) * gran
        handle = self.driver.create(size, self.device_index)
        self._own_handle, self._size = handle, size
        self._mapped = [0] * self.num_ranks
        self._mapped[self.rank] = self.driver.map(handle, size, self.device_index, gran)
        self.driver.zero(self._mapped[self.rank], size)
        raw = self.driver.export(handle)
        if len(raw) != FABRIC_HANDLE_BYTES:
            raise FabricError(
                f"cuMemExportToShareableHandle: {len(raw)} bytes, expected {FABRIC_HANDLE_BYTES}"
            )
        return raw, size, gran

    def _map_peers(self, handles: list[Any], size: int, alignment: int) -> None:
        for r, raw in enumerate(handles):
            if r == self.rank:
                continue
            imported = self.driver.import_handle(raw)
            try:
                self._mapped[r] = self.driver.map(imported, size, self.device_index, alignment)
            finally:
                self.driver.release(imported)  # the mapping keeps the memory

    def _agreed(self, step: str, fn: Any) -> Any:
        """Runs ``fn`` (local), then agrees with every rank on the outcome: if it failed anywhere,
        every rank releases what it made and raises ``CommError`` naming the ranks."""
        value, failed = run_agreed(self.group, fn)
        if failed:
            with contextlib.suppress(Exception):  # the agreed error below is the one to report
                self._release()
            raise CommError(f"fabric buffers: could not {step} on {describe_failed(failed)}")
        return value

    def _barrier(self, phase: str) -> None:
        try:
            work = dist.barrier(self.group, async_op=True)
            if work is not None:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - reported with the phase
            raise CommTimeoutError(
                f"fabric buffers ({phase}): not every rank reached the barrier within "
                f"timeout_s={self.timeout_s:g}s ({type(exc).__name__}: {exc})"
            ) from exc

    def close(self) -> None:
        """Collective: waits (at most ``timeout_s``) until every rank is done, then unmaps and frees.
        If a peer does not arrive, this rank's buffer stays mapped (a peer may still write into it)
        and ``CommTimeoutError`` is raised."""
        if self._own_handle is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._barrier("close")
        with self._on_device():
            self._release()

    def _release(self) -> None:
        """Unmaps every mapping and releases this rank's allocation, each step tried whatever failed
        before it; the state is reset and the first failure raised."""
        mapped, own, size = self._mapped, self._own_handle, self._size
        self._own_handle, self._mapped, self._size, self.peer_bases = None, [], 0, None
        self.max_channels = self.max_slot_bytes = 0
        steps: list[tuple[Any, tuple[Any, ...]]] = [(self.driver.unmap, (va, size)) for va in mapped if va]
        if own is not None:
            steps.append((self.driver.release, (own,)))
        first: BaseException | None = None
        for fn, args in steps:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - the others are still released
                first = first or exc
        if first is not None:
            raise first


# ------------------------------------------------------------------------------------ NVLink domain
def local_fabric_domain(device_index: int, *, nvml: Any = None, driver: Any = None) -> tuple[str | None, str]:
    """(this GPU's NVLink domain as "cluster-uuid/clique", or None; why not). Needs NVML's fabric info
    with registration completed and CUDA fabric-handle support."""
    nv = None
    try:
        nv = nvml if nvml is not None else nvml_mod.Nvml()
        info = _fabric_info(nv.nv, _nvml_handle(nv, device_index))
    except Exception as exc:  # noqa: BLE001 - no NVML, no fabric (NVML_ERROR_NOT_SUPPORTED), ...
        return None, f"no NVLink fabric info ({type(exc).__name__}: {exc})"
    finally:
        if nvml is None and nv is not None:
            nv.close()
    completed = getattr(nv.nv, "NVML_GPU_FABRIC_STATE_COMPLETED", 3)
    if info.state != completed or info.status != 0:
        return None, f"NVLink fabric registration not completed (state {info.state}, status {info.status})"
    uuid = bytes(info.clusterUuid).hex()
    if not int(uuid or "0", 16):
        return None, "no NVLink fabric cluster (cluster UUID 0)"
    try:
        drv = driver if driver is not None else CudaDriver()
        if not drv.fabric_supported(device_index):
            return None, "the device does not support CUDA fabric handles"
    except Exception as exc:  # noqa: BLE001 - any failure here is a local "no" (the caller gathers it)
        return None, f"CUDA fabric handles unavailable ({type(exc).__name__}: {exc})"
    return f"{uuid}/{info.cliqueId}", ""


def _fabric_info(module: Any, handle: Any) -> Any:
    """NVML's fabric info of ``handle`` (pynvml fills a struct passed by reference): the versioned
    call where the module has it, else the original one."""
    if hasattr(module, "nvmlDeviceGetGpuFabricInfoV") and hasattr(module, "c_nvmlGpuFabricInfoV_t"):
        info = module.c_nvmlGpuFabricInfoV_t()
        module.nvmlDeviceGetGpuFabricInfoV(handle, ctypes.byref(info))
    else:
        info = module.c_nvmlGpuFabricInfo_t()
        module.nvmlDeviceGetGpuFabricInfo(handle, ctypes.byref(info))
    return info


def _nvml_handle(nv: Any, device_index: int) -> Any:
    """NVML's handle of CUDA device ``device_index``, by PCI bus id (NVML's indices ignore
    CUDA_VISIBLE_DEVICES and CUDA's ordering); by index where torch gives no PCI location."""
    try:
        props = torch.cuda.get_device_properties(device_index)
        domain, bus, dev = (getattr(props, f"pci_{n}_id") for n in ("domain", "bus", "device"))
        bus_id = f"{domain:08X}:{bus:02X}:{dev:02X}.0"
    except Exception:  # noqa: BLE001 - no CUDA here (tests), or an older torch
        return nv.handle(device_index)
    return nv.nv.nvmlDeviceGetHandleByPciBusId(bus_id.encode())


def domains_reason(domains: list[tuple[str | None, str]]) -> str | None:
    """None when every rank's domain (``local_fabric_domain``, by rank) is one NVLink domain, else why not."""
    missing = [r for r, (d, _) in enumerate(domains) if d is None]
    if missing:
        return f"rank {missing[0]} is in no NVLink domain: {domains[missing[0]][1]}"
    names = sorted({d for d, _ in domains if d is not None})
    if len(names) > 1:
        return f"the ranks span {len(names)} NVLink domains ({', '.join(names[:3])})"
    return None


def choose_transport(group: dist.ProcessGroup | None, choice: str, domain: tuple[str | None, str]) -> str:
    """Collective, the same answer on every rank: "nvlink-domain" or "gin" from every rank's
    ``choice`` (``transport_choice``) and ``domain``. ``ConfigError`` on every rank where the ranks'
    choices differ, or where nvlink-domain is asked for and the group is not one NVLink domain."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (choice, domain), group=group)
    choices = sorted({c for c, _ in gathered})
    if len(choices) > 1:
        raise ConfigError(f"{TRANSPORT_ENV}: expected the same value on every rank, got {choices}")
    if choice == "gin":
        return "gin"
    reason = domains_reason([d for _, d in gathered])
    if reason is None:
        return "nvlink-domain"
    if choice == "nvlink-domain":
        raise ConfigError(f"{TRANSPORT_ENV}=nvlink-domain: the group is not one NVLink domain: {reason}")
    return "gin"


def transport_choice() -> str:
    """``$COMMKIT_INTERNODE_TRANSPORT``: auto (default), gin or nvlink-domain."""
    value = os.environ.get(TRANSPORT_ENV, "auto").strip().lower() or "auto"
    if value not in TRANSPORTS:
        raise ConfigError(f"{TRANSPORT_ENV}: expected one of {', '.join(TRANSPORTS)}, got {value!r}")
    return value
