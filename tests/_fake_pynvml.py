"""A fake ``pynvml`` module driven by a fixture: the test double sits at the pynvml function boundary."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakePynvml:
    """The pynvml calls commkit makes; ``advance()`` moves to the next recorded sample."""

    # Field ids as in pynvml / nvml.h.
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139
    NVML_FI_DEV_NVLINK_GET_SPEED = 164
    NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON = 90
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198
    NVML_NVLINK_MAX_LINKS = 18
    NVMLError = NVMLError

    def __init__(self, fixture: str = "nvml_h100_like.json", init_error: int | None = None) -> None:
        self.data = json.loads((FIXTURES / fixture).read_text())
        self.sample = 0
        self.init_error = init_error
        self.refused = {(r["field"], r["scope"]): r["code"] for r in self.data.get("refused", [])}

    def advance(self) -> None:
        self.sample = min(self.sample + 1, len(self.data["samples"]) - 1)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlErrorString(self, code: int) -> str:
        return {3: "Not Supported", 4: "Insufficient Permissions"}.get(code, f"Unknown Error {code}")

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.data["device_name"]

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.data["driver_version"]

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.data["cuda_driver_version"]

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        if link >= self.data["num_links"]:
            raise NVMLError(2)
        return 1

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: int) -> int:
        return self.data["pcie"]["gen"]

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: int) -> int:
        return self.data["pcie"]["width"]

    def _value(self, field: int, scope: int) -> int:
        s = self.data["samples"][self.sample]
        if field == self.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX:
            return s["nvlink_kib"]["tx"][scope]
        if field == self.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX:
            return s["nvlink_kib"]["rx"][scope]
        if field in (self.NVML_FI_DEV_NVLINK_GET_SPEED, self.NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON):
            return self.data["nvlink_speed_mbps"]
        if field == self.NVML_FI_DEV_PCIE_COUNT_TX_BYTES:
            return s["pcie_bytes"]["tx"]
        if field == self.NVML_FI_DEV_PCIE_COUNT_RX_BYTES:
            return s["pcie_bytes"]["rx"]
        raise KeyError(field)

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: list[Any]) -> list[Any]:
        out = []
        for item in field_ids:
            field, scope = item if isinstance(item, tuple) else (item, 0)
            code = self.refused.get((field, scope), 0)
            value = SimpleNamespace(ullVal=0 if code else self._value(field, scope))
            out.append(
                SimpleNamespace(fieldId=field, scopeId=scope, timestamp=0, latencyUsec=0, valueType=3,
                                nvmlReturn=code, value=value)
            )  # fmt: skip
        return out
