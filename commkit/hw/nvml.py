"""NVLink and PCIe counters through nvidia-ml-py (``pynvml``), imported lazily.

Everything goes through a ``pynvml``-like module object (the real one by default), so tests hand in
a fake with the same function names and ``nvmlFieldValue_t``-shaped results: the fake sits exactly at
the pynvml boundary and every conversion below is exercised.

Counters used:

- ``NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX`` with ``scopeId = link``: cumulative payload KiB per link
- ``NVML_FI_DEV_NVLINK_GET_SPEED`` with ``scopeId = link`` (fallback
  ``NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON``): link speed in MB/s per direction
- ``NVML_FI_DEV_PCIE_COUNT_TX_BYTES/RX_BYTES``: cumulative PCIe bytes
- ``nvmlDeviceGetCurrPcieLinkGeneration/Width``: for the PCIe peak
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

NVLINK_KIB = 1024
# NOTE: usable bytes/s per lane per direction after line coding (gen1-2: 8b/10b, gen3-5: 128b/130b,
# gen6: FLIT, about 242/256 efficiency).
PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
# NVML value types (nvmlValueType_t)
_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}
_DEFAULT_MAX_LINKS = 18


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; the message says why (module missing, no driver, no device)."""


def load_pynvml() -> ModuleType:
    """Import ``pynvml`` (package nvidia-ml-py) or raise ``NvmlUnavailable`` with the fix."""
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise NvmlUnavailable(
            "nvidia-ml-py is not installed (pip install nvidia-ml-py, or commkit[cu12]/[cu13])"
        ) from exc


@dataclass
class FieldReading:
    """One decoded ``nvmlFieldValue_t``: ``value`` or, when NVML refused it, ``error``."""

    field_id: int
    scope_id: int
    value: float | None
    error: str | None = None
    timestamp_us: int | None = None


@dataclass
class NvLinkInfo:
    """Active links of one GPU and their per-direction peak in bytes/s (None: speed unreadable)."""

    links: list[int]
    peak_bytes_per_s: dict[int, float | None]
    problems: list[str] = field(default_factory=list)


class Nvml:
    """A thin, testable view of the NVML calls commkit needs."""

    def __init__(self, module: Any | None = None) -> None:
        self.nv = module if module is not None else load_pynvml()
        try:
            self.nv.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise NvmlUnavailable(f"nvmlInit failed: {self._describe(exc)}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nv.nvmlShutdown()

    # ----------------------------------------------------------------------------------- helpers
    def _describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    def _error_string(self, code: int) -> str:
        try:
            text = self.nv.nvmlErrorString(code)
            return text.decode() if isinstance(text, bytes) else str(text)
        except Exception:
            return f"NVML error {code}"

    def handle(self, index: int) -> Any:
        return self.nv.nvmlDeviceGetHandleByIndex(index)

    def device_count(self) -> int:
        return int(self.nv.nvmlDeviceGetCount())

    def device_name(self, index: int) -> str:
        name = self.nv.nvmlDeviceGetName(self.handle(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def driver_version(self) -> str:
        version = self.nv.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)

    def cuda_driver_version(self) -> str:
        """``12040`` -> ``'12.4'``."""
        version = int(self.nv.nvmlSystemGetCudaDriverVersion())
        return f"{version // 1000}.{(version % 1000) // 10}"

    def field_values(self, index: int, fields: list[tuple[int, int]]) -> list[FieldReading]:
        """Read ``(field_id, scope_id)`` pairs in one ``nvmlDeviceGetFieldValues`` call."""
        raw = self.nv.nvmlDeviceGetFieldValues(self.handle(index), fields)
        readings = []
        for (field_id, scope_id), item in zip(fields, raw, strict=True):
            ret = int(item.nvmlReturn)
            if ret != 0:
                readings.append(FieldReading(field_id, scope_id, None, self._error_string(ret)))
                continue
            attr = _VALUE_FIELDS.get(int(item.valueType))
            if attr is None:
                readings.append(FieldReading(field_id, scope_id, None, f"unknown valueType {item.valueType}"))
                continue
            readings.append(
                FieldReading(field_id, scope_id, float(getattr(item.value, attr)), None, int(item.timestamp))
            )
        return readings

    # ----------------------------------------------------------------------------------- NVLink
    def nvlink_info(self, index: int) -> NvLinkInfo:
        """Active links (``nvmlDeviceGetNvLinkState`` == 1) and their speed."""
        handle = self.handle(index)
        max_links = int(getattr(self.nv, "NVML_NVLINK_MAX_LINKS", _DEFAULT_MAX_LINKS))
        links: list[int] = []
        problems: list[str] = []
        for link in range(max_links):
            try:
                if int(self.nv.nvmlDeviceGetNvLinkState(handle, link)) == 1:
                    links.append(link)
            except Exception as exc:
                # NOTE: NOT_SUPPORTED / INVALID_ARGUMENT past the last link is how NVML says "no link".
                if link == 0:
                    problems.append(f"GPU {index}: no NVLink state ({self._describe(exc)})")
                break
        peaks: dict[int, float | None] = {}
        if links:
            speed_fields = [(self.nv.NVML_FI_DEV_NVLINK_GET_SPEED, link) for link in links]
            speed_fields.append((self.nv.NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON, 0))
            readings = self.field_values(index, speed_fields)
            common = readings[-1]
            for link, reading in zip(links, readings[:-1], strict=True):
                mbps = reading.value if reading.value else common.value
                if mbps:
                    peaks[link] = mbps * 1e6
                else:
                    peaks[link] = None
                    why = reading.error or common.error or "zero"
                    problems.append(f"GPU {index} link {link}: speed unreadable ({why})")
        return NvLinkInfo(links=links, peak_bytes_per_s=peaks, problems=problems)

    def nvlink_bytes(self, index: int, links: list[int]) -> dict[tuple[int, str], FieldReading]:
        """Cumulative payload bytes per ``(link, 'tx'|'rx')``; readings with ``error`` were refused."""
        fields: list[tuple[int, int]] = []
        keys: list[tuple[int, str]] = []
        for link in links:
            fields.append((self.nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link))
            keys.append((link, "tx"))
            fields.append((self.nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link))
            keys.append((link, "rx"))
        out = {}
        for key, reading in zip(keys, self.field_values(index, fields), strict=True):
            if reading.value is not None:
                reading.value *= NVLINK_KIB  # NOTE: the throughput counters count KiB
            out[key] = reading
        return out

    # ----------------------------------------------------------------------------------- PCIe
    def pcie_peak_bytes_per_s(self, index: int) -> float:
        handle = self.handle(index)
        gen = int(self.nv.nvmlDeviceGetCurrPcieLinkGeneration(handle))
        width = int(self.nv.nvmlDeviceGetCurrPcieLinkWidth(handle))
        if gen not in PCIE_LANE_BYTES_PER_S:
            raise ValueError(f"unknown PCIe generation {gen}")
        return PCIE_LANE_BYTES_PER_S[gen] * width

    def pcie_bytes(self, index: int) -> dict[str, FieldReading]:
        fields = [(self.nv.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 0), (self.nv.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 0)]
        tx, rx = self.field_values(index, fields)
        return {"tx": tx, "rx": rx}


def nvlink_gbps(nvml: Nvml, index: int = 0) -> float:
    """Sum of active links' peaks in GB/s per direction for GPU ``index`` (0.0 without NVLink)."""
    info = nvml.nvlink_info(index)
    return sum(p for p in info.peak_bytes_per_s.values() if p) / 1e9
