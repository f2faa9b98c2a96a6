"""Cluster-scale performance model of commkit's dispatch and combine.

Predicts, for a cluster one cannot run on, the time of each phase, bytes and utilisation per link
class, the resource that bounds each phase and the smallest SM budget that reaches a target. Pure
Python + numpy; no torch, no GPU. Quick start::

    from commkit.model import Model, Workload, SyntheticRouting, get_preset, preset_topology
    topology = preset_topology(get_preset("h800-dsv3"))                # EP64 of DeepSeek-V3's cluster
    model = Model(topology, Workload(4096, 7168, 8, 256, num_sms=20), SyntheticRouting(max_nodes=4))
    model.predict()["dispatch"].time_us

How bytes are counted ("logical" bandwidth) is written in ``commkit.model.predict``.
"""

from commkit.model.budget import BudgetAnswer, smallest_budget, smallest_layer_budget
from commkit.model.predict import PHASES, Model, PhasePrediction, predict
from commkit.model.presets import PRESETS, Preset, get_preset, preset_topology
from commkit.model.throughput import DEFAULT_PER_SM_GBPS, load_profile, per_sm_gbps
from commkit.model.topology import Topology
from commkit.model.traffic import (
    CountedRouting,
    RecordedRouting,
    Routing,
    SyntheticRouting,
    routing_from_layouts,
)
from commkit.model.workload import DEFAULT_ROLE_SPLIT, Workload, row_bytes

__all__ = [
    "DEFAULT_PER_SM_GBPS",
    "DEFAULT_ROLE_SPLIT",
    "PHASES",
    "PRESETS",
    "BudgetAnswer",
    "CountedRouting",
    "Model",
    "PhasePrediction",
    "Preset",
    "RecordedRouting",
    "Routing",
    "SyntheticRouting",
    "Topology",
    "Workload",
    "get_preset",
    "load_profile",
    "per_sm_gbps",
    "predict",
    "preset_topology",
    "routing_from_layouts",
    "row_bytes",
    "smallest_budget",
    "smallest_layer_budget",
]
