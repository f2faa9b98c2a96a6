"""Per-SM throughput of each kernel role: the SM side of the model.

A role given ``s`` SMs moves ``s * per_sm_gbps[role]`` GB/s of rows; "moved" counts the rows on the
role's larger side: rows written by a copying role (one row read, written to one or more places),
rows read by a reducing role (several rows read, summed into one).

Keys are ``"<family>.<phase>.<role>"``, e.g. ``"internode.dispatch.forwarder"`` (roles in
``workload.DEFAULT_ROLE_SPLIT``), plus ``"emulated.<phase>"`` for virtual ranks on one GPU.

A tuning profile (JSON, written by ``python -m commkit tune``) overrides any subset through its
``"per_sm_gbps"`` object; ``load_profile`` says how its keys are read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# NOTE: calibration. The per-SM rates below and the NIC efficiency of the H800 preset (presets.py) are the
# only numbers fitted to published figures (shared/peers.md, DeepEP normal kernels on H800, 4096 tokens,
# hidden 7168, top-8 of 256, FP8 dispatch, BF16 combine), one figure each, solved with the model itself
# (tests/test_model_validation.py re-solves them and checks these constants):
#   intranode dispatch 13.1 GB/s/SM  <- EP8 dispatch 153 GB/s at 24 SMs (12 per role). Its NVLink bound
#                                       is about 178 GB/s logical (7/8 of the rows cross NVLink at
#                                       160 GB/s), so the model reads the kernel as SM-bound;
#   intranode combine  13.3 GB/s/SM  <- EP8 combine 158 GB/s at 24 SMs;
#   internode (all roles) 19.1 GB/s/SM <- EP16 dispatch 43 GB/s at 20 SMs (bound by the SMs that run the
#                                       IB-sending and NVLink-receiving warps together).
# The other published figures (EP32 dispatch, EP16/32/64 combine) are predictions. One figure cannot
# tell an SM-bound kernel from a link below its nominal rate, so the intranode rates may fold in NVLink
# inefficiency: they are the least certain numbers here, and a tuning profile measured on the local GPU
# should replace them.
_INTRANODE_DISPATCH_PER_SM_GBPS = 13.1
_INTRANODE_COMBINE_PER_SM_GBPS = 13.3
_INTERNODE_PER_SM_GBPS = 19.1

DEFAULT_PER_SM_GBPS: dict[str, float] = {
    "intranode.dispatch.sender": _INTRANODE_DISPATCH_PER_SM_GBPS,
    "intranode.dispatch.receiver": _INTRANODE_DISPATCH_PER_SM_GBPS,
    "intranode.combine.sender": _INTRANODE_COMBINE_PER_SM_GBPS,
    "intranode.combine.reducer": _INTRANODE_COMBINE_PER_SM_GBPS,
    "internode.dispatch.rdma_sender": _INTERNODE_PER_SM_GBPS,
    "internode.dispatch.forwarder": _INTERNODE_PER_SM_GBPS,
    "internode.dispatch.nvl_receiver": _INTERNODE_PER_SM_GBPS,
    "internode.combine.nvl_sender": _INTERNODE_PER_SM_GBPS,
    "internode.combine.forwarder": _INTERNODE_PER_SM_GBPS,
    "internode.combine.rdma_receiver": _INTERNODE_PER_SM_GBPS,
    # Virtual ranks on one GPU run the intranode kernels with HBM instead of NVLink behind them
    "emulated.dispatch": _INTRANODE_DISPATCH_PER_SM_GBPS,
    "emulated.combine": _INTRANODE_COMBINE_PER_SM_GBPS,
}


def per_sm_gbps(overrides: Mapping[str, float | None] | None = None) -> dict[str, float]:
    """The defaults with ``overrides`` applied; returns a full table keyed like ``DEFAULT_PER_SM_GBPS``.

    An override key may be a full key (``internode.dispatch.forwarder``), a prefix of keys
    (``internode.dispatch``) or a phase alone (``dispatch``: every role of that phase, which is what a
    profile measured on one GPU gives); the most specific key wins. ``None`` values are skipped (a
    profile's "not measured"); unknown keys are an error, so that a typo is not silently ignored.
    """
    table = dict(DEFAULT_PER_SM_GBPS)
    resolved: dict[str, tuple[int, float]] = {}  # key -> (specificity, value)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"per_sm_gbps[{key!r}] must be a positive number, got {value!r}")
        if key in ("dispatch", "combine"):
            matches = [k for k in table if k.split(".")[1] == key]
        else:
            matches = [k for k in table if k == key or k.startswith(key + ".")]
        if not matches:
            raise ValueError(
                f"unknown per-SM throughput key {key!r}; expected 'dispatch', 'combine', a family.phase "
                f"prefix or one of {sorted(table)}"
            )
        specificity = key.count(".")
        for match in matches:
            if match not in resolved or resolved[match][0] <= specificity:
                resolved[match] = (specificity, float(value))
    table.update({key: value for key, (_, value) in resolved.items()})
    return table


# NOTE: ``python -m commkit tune`` records, per phase, the best over budgets of logical GB/s / num_sms (the
# whole budget). In the SM-bound regime of the intranode kernel the busiest role holds half the budget and
# moves as many rows as the logical count, so a role's per-SM rate is that figure / 0.5.
PROFILE_ROLE_SHARE = 0.5


def load_profile(path: str | Path) -> dict[str, float]:
    """Read the per-SM rates of a tuning profile (JSON); returns the full table (``per_sm_gbps``).

    ``"per_sm_gbps": {"dispatch": g, "combine": g}`` as ``commkit tune`` writes it: logical GB/s per SM of
    the whole budget, turned into a role rate g / PROFILE_ROLE_SHARE for every family. Longer keys
    (``internode``, ``intranode.dispatch.sender``, ...) are role rates already and are taken as they are.
    null values (not measured) are skipped; the other keys of the profile are ignored.
    """
    try:
        data: Any = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the throughput profile {path}: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("per_sm_gbps"), dict):
        raise ValueError(f'profile {path} must be a JSON object with a "per_sm_gbps" object')
    rates = dict(data["per_sm_gbps"])
    for phase in ("dispatch", "combine"):
        value = rates.get(phase)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rates[phase] = value / PROFILE_ROLE_SHARE
    return per_sm_gbps(rates)
