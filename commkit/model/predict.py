"""Predict the time of dispatch and combine: the slowest GPU's busiest resource plus fixed latencies.

For each phase and each GPU, every resource gets a time = bytes it carries / its rate:
    nvlink_out, nvlink_in:  NVLink bytes per direction / ``nvlink_gbps``
    nic_out, nic_in:        IB bytes per direction / (``nic_gbps`` * ``nic_efficiency``)
    hbm:                    (emulated runs only) bytes read + written by all virtual ranks / ``hbm_gbps``
    sm:<role>:              bytes the role moves / (SMs of the role * per-SM GB/s of the role)
The stages overlap (rows stream through chunked buffers), so a phase takes
    latency + max over resources and GPUs,
with latency = launch + barrier(s) + pipeline fill (one chunk per stage). The resource that reaches the
maximum bounds the phase ("latency" when the fixed part is larger than every resource's time).

"Logical" bytes, the definition of DeepEP's published bandwidths (shared/peers.md):
    intranode dispatch: bytes of the rows a rank receives, its own rows included;
    intranode combine:  bytes of the rows a rank sends back (the same rows, BF16);
    internode (RDMA):   bytes of the rows a source sends towards nodes, a token counted once per
                        destination node, its own node included (DeepEP's benchmark counts it so,
                        which is why its "RDMA" figure can exceed the 50 GB/s of the NIC);
with row bytes H + 4*ceil(H/128) for FP8 and 2H for BF16. Logical GB/s = mean logical bytes per rank /
predicted time. Link utilisation is measured at the busiest GPU of the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from commkit.model.throughput import per_sm_gbps
from commkit.model.topology import Topology
from commkit.model.traffic import LinkRows, Routing, SyntheticRouting, count_link_rows, count_matrices
from commkit.model.workload import Workload

PHASES = ("dispatch", "combine")
LOGICAL_DEFINITION = {
    "intranode": "rows received (dispatch) / sent back (combine) per rank, own rows included",
    "internode": "rows crossing to each destination node, once per (token, node), own node included",
    "emulated": "rows received (dispatch) / sent back (combine) per virtual rank",
}


@dataclass(frozen=True)
class PhasePrediction:
    """One phase on the predicted cluster.

    time_us:        predicted kernel time (slowest GPU)
    latency_us:     fixed part (launch, barriers, pipeline fill)
    bound:          resource that sets the time: 'nvlink_out', 'nic_in', 'sm:forwarder', 'latency', ...
    resource_us:    time each resource needs at its busiest GPU, latency excluded
    link_bound_us:  time with unlimited SMs (latency + slowest link)
    logical_bytes:  mean logical bytes per rank (module docstring)
    logical_gbps:   logical_bytes / time
    link_bytes:     mean bytes per GPU per link class ('nvlink', 'ib', 'hbm'), one direction (the larger)
    link_util:      busiest GPU's bytes / (time * achievable rate) per link class (the NIC's rate is
                    nic_gbps * nic_efficiency)
    sms_per_role:   SMs each role gets (shares of num_sms)
    """

    phase: str
    family: str
    num_sms: int
    time_us: float
    latency_us: float
    bound: str
    resource_us: dict[str, float]
    link_bound_us: float
    logical_bytes: float
    logical_gbps: float
    link_bytes: dict[str, float]
    link_util: dict[str, float]
    sms_per_role: dict[str, float] = field(default_factory=dict)


class Model:
    """A topology, a workload and a routing, with the routing's traffic computed once.

    ``phase(name, num_sms)`` is then cheap (a few numpy reductions over [R]), which the SM-budget
    search and the plot use.
    """

    def __init__(
        self,
        topology: Topology,
        workload: Workload,
        routing: Routing | None = None,
        per_sm: Mapping[str, float | None] | None = None,
    ) -> None:
        self.topology = topology
        self.workload = workload
        self.routing = routing if routing is not None else SyntheticRouting()
        self.per_sm = per_sm_gbps(per_sm)
        num_ranks = topology.num_ranks
        if workload.num_experts % num_ranks != 0:
            raise ValueError(
                f"num_experts={workload.num_experts} must be a multiple of the EP size {num_ranks} "
                f"({topology.num_nodes} nodes x {topology.gpus_per_node} GPUs)"
            )
        if workload.num_sms > topology.sms_per_gpu:
            raise ValueError(f"num_sms={workload.num_sms} exceeds the {topology.sms_per_gpu} SMs of a GPU")
        rows_to_rank, rows_to_node = count_matrices(
            self.routing,
            workload.num_tokens,
            workload.num_experts,
            workload.num_topk,
            num_ranks,
            topology.num_nodes,
        )
        self.traffic: LinkRows = count_link_rows(rows_to_rank, rows_to_node, topology.gpus_per_node)

    @property
    def family(self) -> str:
        if self.topology.emulated:
            return "emulated"
        return "internode" if self.topology.internode else "intranode"

    def latency_us(self) -> float:
        topo = self.topology
        if self.family == "internode":
            # Two pipeline stages (IB, then NVLink), a barrier on each side
            return topo.launch_us + topo.barrier_us + topo.rdma_barrier_us + 2 * topo.chunk_us
        return topo.launch_us + topo.barrier_us + topo.chunk_us

    def _role_rows(self, phase: str) -> dict[str, np.ndarray]:
        """Rows each SM role moves per GPU ([R] each; see throughput.py for 'moves')."""
        t = self.traffic
        if self.family in ("intranode", "emulated"):
            if phase == "dispatch":
                return {"sender": t.send_rows, "receiver": t.recv_rows}
            return {"sender": t.recv_rows, "reducer": t.send_rows}
        if phase == "dispatch":
            return {"rdma_sender": t.node_rows, "forwarder": t.fwd_rows, "nvl_receiver": t.recv_rows}
        return {"nvl_sender": t.recv_rows, "forwarder": t.fwd_rows, "rdma_receiver": t.node_rows}

    def _link_rows(self, phase: str) -> dict[str, np.ndarray]:
        """Rows per GPU on each link direction; the combine reverses every direction of the dispatch."""
        t = self.traffic
        out_in = {
            "nvlink": (t.nvl_send_rows, t.nvl_recv_rows),
            "nic": (t.ib_send_rows, t.ib_recv_rows),
        }
        rows = {}
        for link, (sent, received) in out_in.items():
            if link == "nic" and self.family != "internode":
                continue
            if phase == "combine":
                sent, received = received, sent
            rows[f"{link}_out"], rows[f"{link}_in"] = sent, received
        return rows

    def phase(self, phase: str, num_sms: int | None = None) -> PhasePrediction:
        """Predict ``phase`` ('dispatch' or 'combine') with ``num_sms`` (default: the workload's)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        num_sms = self.workload.num_sms if num_sms is None else num_sms
        if num_sms < 1:
            raise ValueError(f"num_sms must be >= 1, got {num_sms}")
        topo, family = self.topology, self.family
        row_bytes = self.workload.row_bytes(phase)
        resource_us: dict[str, float] = {}
        link_bytes: dict[str, float] = {}
        link_peak: dict[str, float] = {}

        # Links: time at the busiest GPU
        rates = {"nvlink": topo.nvlink_gbps, "nic": topo.nic_effective_gbps}
        if family == "emulated":
            role_rows = self._role_rows(phase)
            # NOTE: every virtual rank's copies (a stage into the peer's buffer, then into the output) read
            # and write the one HBM: 2 bytes of traffic per byte copied, summed over all virtual ranks.
            hbm_bytes = 2 * row_bytes * float(sum(r.sum() for r in role_rows.values()))
            resource_us["hbm"] = hbm_bytes / topo.hbm_gbps * 1e-3
            link_bytes["hbm"], link_peak["hbm"] = hbm_bytes, hbm_bytes
            rates["hbm"] = topo.hbm_gbps
        else:
            for name, link_rows in self._link_rows(phase).items():
                resource_us[name] = float(link_rows.max()) * row_bytes / rates[name.split("_")[0]] * 1e-3
                link = "ib" if name.startswith("nic") else "nvlink"
                link_bytes[link] = max(link_bytes.get(link, 0.0), float(link_rows.mean()) * row_bytes)
                link_peak[link] = max(link_peak.get(link, 0.0), float(link_rows.max()) * row_bytes)
        link_bound = max(resource_us.values(), default=0.0)

        # SMs: each role's share of the budget
        key = f"{'intranode' if family == 'emulated' else family}.{phase}"
        shares = self.workload.roles(key)
        sms_per_role: dict[str, float] = {}
        sm_scale = 1.0
        if family == "emulated":
            # NOTE: the virtual ranks share the GPU's SMs; past sms_per_gpu they take turns.
            sm_scale = min(1.0, topo.sms_per_gpu / (num_sms * topo.num_ranks))
        role_rows = self._role_rows(phase)
        for group, share in shares.items():
            sms = num_sms * share * sm_scale
            sms_per_role[group] = sms
            # Roles sharing SMs add their work: seconds x GB/s summed per GPU, then the busiest GPU
            work = sum(
                role_rows[role]
                / self.per_sm[f"emulated.{phase}" if family == "emulated" else f"{key}.{role}"]
                for role in group.split("+")
            )
            resource_us[f"sm:{group}"] = float(np.max(work)) * row_bytes / sms * 1e-3

        latency = self.latency_us()
        slowest = max(resource_us, key=lambda name: resource_us[name])
        time_us = latency + resource_us[slowest]
        bound = slowest if resource_us[slowest] >= latency else "latency"
        logical_rows = self.traffic.node_rows if family == "internode" else self.traffic.recv_rows
        logical_bytes = float(logical_rows.mean()) * row_bytes
        link_util = {
            link: link_peak[link] / (time_us * 1e3 * rates["nic" if link == "ib" else link])
            for link in link_peak
        }
        return PhasePrediction(
            phase=phase,
            family=family,
            num_sms=num_sms,
            time_us=time_us,
            latency_us=latency,
            bound=bound,
            resource_us=resource_us,
            link_bound_us=latency + link_bound,
            logical_bytes=logical_bytes,
            logical_gbps=logical_bytes / (time_us * 1e3),
            link_bytes=link_bytes,
            link_util=link_util,
            sms_per_role=sms_per_role,
        )

    def predict(self, num_sms: int | None = None) -> dict[str, PhasePrediction]:
        """Both phases with ``num_sms`` (default: the workload's)."""
        return {phase: self.phase(phase, num_sms) for phase in PHASES}


def predict(
    topology: Topology,
    workload: Workload,
    routing: Routing | None = None,
    per_sm: Mapping[str, float | None] | None = None,
) -> dict[str, PhasePrediction]:
    """Predict dispatch and combine: ``{"dispatch": PhasePrediction, "combine": PhasePrediction}``."""
    return Model(topology, workload, routing, per_sm).predict()
