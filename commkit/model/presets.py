"""Named clusters: hardware from shared/peers.md, with the source of every number next to it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from commkit.model.topology import Topology

# NOTE: fitted to DeepEP's internode EP64 dispatch figure (51 GB/s logical, NIC-bound in the model), see
# throughput.py; about 45.5 of the 50 GB/s line rate, in line with what RDMA-write benchmarks reach on
# NDR. The same NIC (ConnectX-7) is in every preset, so they share it.
CX7_EFFICIENCY = 0.91
CX7_GBPS = 50.0  # ConnectX-7 NDR, 400 Gb/s per GPU

# NOTE: H800 NVLink is 200 GB/s per direction on paper, 160 achieved (80%). H100/H200 NVLink4 is
# 450 GB/s per direction; the same 80% gives 360.
H100_NVLINK_GBPS = 360.0


@dataclass(frozen=True)
class Preset:
    """A cluster: its topology (all nodes), the usual SM budget and the usual EP group size.

    default_ep_size: GPUs in one EP group (None: the whole cluster). Groups run side by side; on a
                     non-blocking fabric with a NIC per GPU they do not share a link, so one group's time
                     is the prediction.
    """

    name: str
    description: str
    topology: Topology
    default_num_sms: int
    default_ep_size: int | None = None


def _hopper_nodes(name: str, num_nodes: int, nvlink_gbps: float, hbm_gbps: float) -> Topology:
    """Nodes of 8 Hopper GPUs (132 SMs each) with a ConnectX-7 NIC per GPU: every preset's hardware."""
    return Topology(
        name, num_nodes, gpus_per_node=8, sms_per_gpu=132, nvlink_gbps=nvlink_gbps, hbm_gbps=hbm_gbps,
        nic_gbps=CX7_GBPS, nic_efficiency=CX7_EFFICIENCY,
    )  # fmt: skip


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "h800-dsv3",
            "DeepSeek-V3's cluster: 256 nodes x 8 H800, NVLink 160 GB/s, one CX7 400 Gb/s NIC per GPU, 20 of "
            "132 SMs for communication, EP64 (8 nodes) per expert group as in training",
            _hopper_nodes("H800", 256, nvlink_gbps=160.0, hbm_gbps=3000.0),
            default_num_sms=20,
            default_ep_size=64,
        ),
        Preset(
            "h100-cx7",
            "H100 SXM nodes of 8, NVLink4 (360 GB/s achievable per direction), one CX7 NIC per GPU",
            # 3.35 TB/s HBM3 spec, about 3.0 measured by a copy
            _hopper_nodes("H100", 1, nvlink_gbps=H100_NVLINK_GBPS, hbm_gbps=3000.0),
            default_num_sms=24,
        ),
        Preset(
            "h200-cx7",
            "H200 SXM nodes of 8, NVLink4 (360 GB/s achievable per direction), one CX7 NIC per GPU",
            # 4.8 TB/s HBM3e spec, scaled by the H100's measured/spec ratio (0.9)
            _hopper_nodes("H200", 1, nvlink_gbps=H100_NVLINK_GBPS, hbm_gbps=4300.0),
            default_num_sms=24,
        ),
        Preset(
            "h100-emulated",
            "virtual ranks on one H100 (commkit's emulated runs): HBM carries every link",
            replace(
                _hopper_nodes("H100 (emulated)", 1, nvlink_gbps=3000.0, hbm_gbps=3000.0),
                nic_gbps=0.0,
                nic_efficiency=1.0,
                emulated=True,
            ),
            default_num_sms=24,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ValueError lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


def preset_topology(preset: Preset, ep_size: int | None = None, num_nodes: int | None = None) -> Topology:
    """The topology of one EP group of ``preset``.

    num_nodes: nodes in the cluster (default: the preset's); ep_size: GPUs in the EP group (default: the
    preset's default_ep_size, or the whole cluster), at most the cluster's GPUs.
    """
    topology = preset.topology
    if num_nodes is not None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        topology = Topology(**{**topology.__dict__, "num_nodes": num_nodes})
    cluster_gpus = topology.num_ranks
    if ep_size is None:
        ep_size = min(preset.default_ep_size or cluster_gpus, cluster_gpus)
    if ep_size > cluster_gpus and not topology.emulated:
        raise ValueError(
            f"ep_size={ep_size} exceeds the cluster's {cluster_gpus} GPUs "
            f"({topology.num_nodes} nodes x {topology.gpus_per_node})"
        )
    return topology.with_ranks(ep_size)
