"""Predict commkit's emulated runs (virtual ranks on one GPU) recorded by ``python -m commkit bench``.

A bench JSON (``bench/results/**/bench.json``) holds ``{"meta", "spec", "rows"}``; a row is taken as an
emulated kernel run when the row, its spec or its meta marks virtual ranks (``virtual``: N or true, or
``emulated``: true) and its backend is not the torch baseline. The model's twin: the ``h100-emulated``
preset (HBM 3.0 TB/s, 132 SMs) with as many virtual ranks as the row, the row's shape, SMs and skew.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commkit.model.predict import Model
from commkit.model.presets import get_preset, preset_topology
from commkit.model.traffic import SyntheticRouting
from commkit.model.workload import Workload


@dataclass(frozen=True)
class EmulatedRun:
    """One measured row: phase, shape, SM budget and the median time in microseconds."""

    path: str
    phase: str
    num_ranks: int
    num_tokens: int
    hidden: int
    num_topk: int
    num_experts: int
    num_sms: int
    dispatch_dtype: str
    skew: float
    max_nodes: int | None
    measured_us: float


def _is_emulated(*sources: dict[str, Any]) -> bool:
    return any(bool(src.get("virtual")) or bool(src.get("emulated")) for src in sources)


def load_emulated_runs(root: str | Path) -> list[EmulatedRun]:
    """Every emulated kernel row under ``root`` (JSON files searched recursively); [] when none."""
    runs = []
    for path in sorted(Path(root).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            continue
        spec, meta = data.get("spec") or {}, data.get("meta") or {}
        for row in data["rows"]:
            if not isinstance(row, dict) or row.get("backend") == "torch" or not row.get("num_sms"):
                continue
            if not _is_emulated(row, spec, meta) or row.get("time_median_s") is None:
                continue
            # NOTE: the emulated model is the intranode one: virtual nodes (a net hop) and non-default
            # role splits are other kernels
            if int(row.get("nodes") or 1) > 1 or any(v != 4 for v in (row.get("knobs") or {}).values()):
                continue
            runs.append(
                EmulatedRun(
                    path=str(path),
                    phase=row["op"],
                    num_ranks=int(row["ranks"]),
                    num_tokens=int(row["tokens"]),
                    hidden=int(row["hidden"]),
                    num_topk=int(row["topk"]),
                    num_experts=int(row["experts"]),
                    num_sms=int(row["num_sms"]),
                    dispatch_dtype=row["dtype"] if row["op"] == "dispatch" else "bf16",
                    skew=float(spec.get("skew", 0.0)),
                    max_nodes=None,
                    measured_us=float(row["time_median_s"]) * 1e6,
                )
            )
    return runs


def predict_emulated(run: EmulatedRun, per_sm: Mapping[str, float | None] | None = None) -> float:
    """Predicted time (us) of ``run`` on the emulated preset."""
    topology = preset_topology(get_preset("h100-emulated"), ep_size=run.num_ranks)
    workload = Workload(
        run.num_tokens,
        run.hidden,
        run.num_topk,
        run.num_experts,
        num_sms=run.num_sms,
        dispatch_dtype=run.dispatch_dtype,
    )
    model = Model(topology, workload, SyntheticRouting(skew=run.skew), per_sm)
    return model.phase(run.phase).time_us
