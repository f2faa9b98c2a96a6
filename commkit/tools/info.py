"""What this machine offers commkit: devices, links, NICs, library versions, usable backends."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from commkit.backends import fabric
from commkit.hw import sysfs_ib
from commkit.hw.nvml import Nvml, NvmlUnavailable
from commkit.jit import nccl as nccl_headers


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(sysfs_root: str | Path = "/sys", nvml_module: Any = None) -> dict[str, Any]:
    """A JSON-able description; every unreadable item carries the reason instead of a value."""

    info: dict[str, Any] = {"versions": {}, "devices": [], "ib_ports": [], "backends": {}, "problems": []}
    versions = info["versions"]
    versions["torch"] = torch.__version__
    versions["torch CUDA"] = torch.version.cuda
    cupy = next((v for v in (_version(n) for n in ("cupy", "cupy-cuda12x", "cupy-cuda13x")) if v), None)
    versions["cupy"] = cupy
    nccl: str | None = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(str(p) for p in torch.cuda.nccl.version())
        except Exception as exc:
            info["problems"].append(f"NCCL version: {exc}")
    versions["NCCL (torch)"] = nccl
    versions["nvidia-nccl"] = _version("nvidia-nccl-cu12") or _version("nvidia-nccl-cu13")
    versions["nvidia-ml-py"] = _version("nvidia-ml-py")

    try:
        nvml: Nvml | None = Nvml(nvml_module)
    except NvmlUnavailable as exc:
        nvml = None
        info["problems"].append(f"NVML: {exc}")
    if nvml is not None:
        try:
            versions["driver"] = nvml.driver_version()
            versions["CUDA driver"] = nvml.cuda_driver_version()
        except Exception as exc:
            info["problems"].append(f"driver version: {exc}")
    num_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nvml is not None and not num_devices:
        num_devices = nvml.device_count()
    for index in range(num_devices):
        dev: dict[str, Any] = {"index": index}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(index)
            dev.update(
                name=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30
            )
        if nvml is not None:
            try:
                dev.setdefault("name", nvml.device_name(index))
                link = nvml.nvlink_info(index)
                dev["nvlink_links"] = len(link.links)
                peaks = [p for p in link.peak_bytes_per_s.values() if p]
                dev["nvlink_gbps_per_link"] = peaks[0] / 1e9 if peaks else None
                dev["nvlink_gbps"] = sum(peaks) / 1e9
                info["problems"].extend(link.problems)
                dev["pcie_gbps"] = nvml.pcie_peak_bytes_per_s(index) / 1e9
            except Exception as exc:
                info["problems"].append(f"GPU {index}: {exc}")
        info["devices"].append(dev)
    if not num_devices:
        info["problems"].append("no CUDA device: torch.cuda.is_available() is False")

    ports = sysfs_ib.find_ports(sysfs_root)
    for port in ports:
        info["ib_ports"].append(
            {
                "port": port.name,
                "rate_gbit": port.rate_gbit,
                "state": port.state,
                "link_layer": port.link_layer,
            }
        )
        info["problems"].extend(port.problems)
    if not ports:
        info["problems"].append(f"no InfiniBand devices under {Path(sysfs_root) / 'class' / 'infiniband'}")
    info["backends"] = backends_status()
    if nvml is not None:
        nvml.close()
    return info


def internode_status(kernels_reason: str | None) -> str:
    """Whether a group of several nodes can run the internode kernels (GIN) here, or why not."""

    try:
        headers = nccl_headers.find_headers()
    except nccl_headers.NcclHeadersError as exc:
        return f"not usable: the inter-node hop needs NCCL's GIN device API: {exc}"
    found = f"GIN device API of NCCL {nccl_headers.version_str(headers.version)} ({headers.origin})"
    if kernels_reason is not None:
        return f"not usable: {kernels_reason} ({found} found)"
    return f"usable: {found}; up to 32 ranks, 8 per node"


def nvlink_domain_status(kernels_reason: str | None) -> str:
    """Whether this GPU is in a multi-node NVLink domain (the internode kernels' nvlink-domain
    transport; whether every rank of a group shares it is checked when a Buffer is made)."""
    if kernels_reason is not None:
        return f"not usable: {kernels_reason}"

    domain, why = fabric.local_fabric_domain(torch.cuda.current_device())
    return f"usable: this GPU is in NVLink domain {domain}" if domain else f"not usable here: {why}"


def backends_status() -> dict[str, str]:
    """Backend name -> 'usable' or why not."""

    out: dict[str, str] = {}
    if not dist.is_available():
        out["torch"] = "not usable: this torch build has no torch.distributed"
    else:
        groups = [
            name
            for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()))
            if ok
        ]
        out["torch"] = (
            f"usable over {', '.join(groups)}" if groups else "not usable: neither gloo nor NCCL built in"
        )
    try:
        from commkit.backends import kernels_unavailable_reason

        reason = kernels_unavailable_reason(None)
    except Exception as exc:  # the backends package is another engineer's; report, do not crash
        reason = f"cannot check: {exc}"
    out["kernels"] = "usable" if reason is None else f"not usable: {reason}"
    out["kernels (several nodes)"] = internode_status(reason)
    out["nvlink-domain transport"] = nvlink_domain_status(reason)
    if not torch.cuda.is_available():
        out["emulate"] = "not usable: virtual ranks need a CUDA GPU (torch.cuda.is_available() is False)"
    elif importlib.util.find_spec("commkit.emulate") is None:
        out["emulate"] = "not usable: this build has no commkit.emulate"
    else:
        out["emulate"] = "usable"
    return out
