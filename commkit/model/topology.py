"""The machine the model predicts for: nodes of GPUs joined by NVLink inside a node and a NIC per GPU.

All bandwidths are GB/s (1e9 bytes per second) per GPU and per direction, as achieved by a copy, not
the marketing bidirectional figure; latencies are microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Topology:
    """An expert-parallel group of ``num_nodes * gpus_per_node`` GPUs (ranks).

    name:             label for tables
    num_nodes:        N nodes; rank r is GPU r % G of node r // G
    gpus_per_node:    G GPUs per node, all-to-all over NVLink
    sms_per_gpu:      SMs of one GPU (the SM budget cannot exceed it)
    nvlink_gbps:      achievable NVLink GB/s per GPU per direction
    nic_gbps:         NIC line rate GB/s per GPU per direction (0 for a node without NIC)
    nic_efficiency:   fraction of the line rate an RDMA write stream achieves (headers, CRC, credits)
    hbm_gbps:         device memory GB/s for a copy (bytes read + written)
    launch_us:        kernel launch and setup seen by the caller
    barrier_us:       one notify/barrier round among the NVLink peers (counts exchange)
    rdma_barrier_us:  the same across nodes over the NIC (added for internode phases)
    chunk_us:         filling the pipeline: one chunk through each stage before they overlap
    emulated:         all ranks are virtual ranks on this one GPU; HBM carries every "link"
    """

    name: str
    num_nodes: int
    gpus_per_node: int
    sms_per_gpu: int
    nvlink_gbps: float
    nic_gbps: float
    nic_efficiency: float = 1.0
    hbm_gbps: float = 3000.0
    launch_us: float = 5.0
    barrier_us: float = 10.0
    rdma_barrier_us: float = 20.0
    chunk_us: float = 10.0
    emulated: bool = False

    def __post_init__(self) -> None:
        for field_name in ("num_nodes", "gpus_per_node", "sms_per_gpu"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology.{field_name} must be a positive int, got {value!r}")
        for field_name in ("nvlink_gbps", "hbm_gbps"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"Topology.{field_name} must be > 0, got {getattr(self, field_name)}")
        if self.num_nodes > 1 and self.nic_gbps <= 0:
            raise ValueError(f"Topology with {self.num_nodes} nodes needs nic_gbps > 0, got {self.nic_gbps}")
        if not 0 < self.nic_efficiency <= 1:
            raise ValueError(f"Topology.nic_efficiency must be in (0, 1], got {self.nic_efficiency}")

    @property
    def num_ranks(self) -> int:
        """R = N * G."""
        return self.num_nodes * self.gpus_per_node

    @property
    def internode(self) -> bool:
        return self.num_nodes > 1

    @property
    def nic_effective_gbps(self) -> float:
        return self.nic_gbps * self.nic_efficiency

    def with_ranks(self, num_ranks: int) -> Topology:
        """The same hardware with an EP group of ``num_ranks`` GPUs: one node if it fits, else whole nodes."""
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        if self.emulated or num_ranks <= self.gpus_per_node:
            return replace(self, num_nodes=1, gpus_per_node=num_ranks)
        if num_ranks % self.gpus_per_node != 0:
            raise ValueError(
                f"an EP group of {num_ranks} ranks does not fill whole nodes of {self.gpus_per_node} GPUs"
            )
        return replace(self, num_nodes=num_ranks // self.gpus_per_node)
