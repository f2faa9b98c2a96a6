"""The model against measurements: DeepEP's published H800 figures, and commkit's own emulated runs.

Published figures (shared/peers.md; DeepEP V1 normal kernels, H800, 4096 tokens per rank, hidden 7168,
top-8 of 256 experts, node-limited to 4 nodes, FP8 dispatch, BF16 combine; DeepEP's intranode test runs
24 SMs, its internode test 20). Four of the eight figures calibrate one parameter each:
    EP8 dispatch  -> intranode dispatch per-SM rate     EP8 combine -> intranode combine per-SM rate
    EP16 dispatch -> internode per-SM rate (all roles)  EP64 dispatch -> CX7 NIC efficiency
The other four (EP32 dispatch, EP16/32/64 combine) are predictions and must land within 15%. EP32
dispatch is the most independent check (a different node count, a different bound mix); the combine
figures check the byte accounting (BF16 rows, every direction reversed) with no parameter of their own.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from commkit.model import Model, SyntheticRouting, Workload, get_preset, preset_topology
from commkit.model.emulated import load_emulated_runs, predict_emulated
from commkit.model.published import DEEPEP_H800, SETTING, PublishedFigure
from commkit.model.throughput import DEFAULT_PER_SM_GBPS, per_sm_gbps

REPO = Path(__file__).resolve().parent.parent
PRESET = get_preset("h800-dsv3")


@functools.cache
def setting_model(ep_size: int, num_sms: int) -> Model:
    """The published setting on the H800 preset (the routing's traffic is computed once per EP size)."""
    workload = Workload(
        SETTING["num_tokens"], SETTING["hidden"], SETTING["num_topk"], SETTING["num_experts"], num_sms=num_sms
    )
    routing = SyntheticRouting(max_nodes=SETTING["max_nodes"])
    return Model(preset_topology(PRESET, ep_size=ep_size), workload, routing)


def predicted_gbps(
    figure: PublishedFigure, per_sm: dict[str, float] | None = None, nic_efficiency: float | None = None
) -> float:
    model = copy.copy(setting_model(figure.ep_size, figure.num_sms))
    model.per_sm = per_sm_gbps(per_sm)
    if nic_efficiency is not None:
        model.topology = replace(model.topology, nic_efficiency=nic_efficiency)
    return model.phase(figure.phase).logical_gbps


def solve(f: Callable[[float], float], target: float, low: float, high: float) -> float:
    """x in [low, high] with f(x) = target, f increasing."""
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if f(mid) < target else (low, mid)
    return (low + high) / 2


def figure(ep_size: int, phase: str) -> PublishedFigure:
    return next(f for f in DEEPEP_H800 if f.ep_size == ep_size and f.phase == phase)


def test_calibrated_constants_are_what_their_figures_solve_to() -> None:
    """Re-solve each calibrated parameter from its figure and compare with the shipped constant, so that
    the constants stay traceable (a changed latency or byte count shows up here)."""
    solved = {
        "intranode.dispatch.sender": solve(
            lambda p: predicted_gbps(figure(8, "dispatch"), {"intranode.dispatch": p}), 153.0, 5, 60
        ),
        "intranode.combine.sender": solve(
            lambda p: predicted_gbps(figure(8, "combine"), {"intranode.combine": p}), 158.0, 5, 60
        ),
        "internode.dispatch.forwarder": solve(
            lambda p: predicted_gbps(figure(16, "dispatch"), {"internode": p}), 43.0, 5, 60
        ),
    }
    for key, value in solved.items():
        assert DEFAULT_PER_SM_GBPS[key] == pytest.approx(value, rel=0.01), key
    efficiency = solve(lambda e: predicted_gbps(figure(64, "dispatch"), nic_efficiency=e), 51.0, 0.5, 1.0)
    assert PRESET.topology.nic_efficiency == pytest.approx(efficiency, abs=0.01)


@pytest.mark.parametrize("fig", DEEPEP_H800, ids=lambda f: f"EP{f.ep_size}-{f.phase}")
def test_published_figures(fig: PublishedFigure) -> None:
    """Calibrated figures within 2% (rounding of the constants), predicted ones within 15%."""
    got = predicted_gbps(fig)
    tolerance = 0.02 if fig.calibrates else 0.15
    assert got == pytest.approx(fig.gbps, rel=tolerance), f"predicted {got:.1f} GB/s, published {fig.gbps}"


def test_published_setting_bounds() -> None:
    """What bounds each setting in the model: SMs on one node and on two, the NIC from four nodes on."""
    for ep_size, expected in ((8, "sm:"), (16, "sm:"), (32, "nic_"), (64, "nic_")):
        topology = preset_topology(PRESET, ep_size=ep_size)
        workload = Workload(4096, 7168, 8, 256, num_sms=24 if ep_size == 8 else 20)
        model = Model(topology, workload, SyntheticRouting(max_nodes=4))
        assert model.phase("dispatch").bound.startswith(expected), ep_size


def test_emulated_runs_within_20pct() -> None:
    """commkit's own kernels on virtual ranks of one GPU (bench JSON under bench/results/), with HBM as the
    link, predicted within 20%."""
    runs = load_emulated_runs(REPO / "bench" / "results")
    if not runs:
        pytest.skip(
            "no emulated kernel runs under bench/results/ (a bench.json row with virtual ranks and num_sms); "
            "run `python -m commkit bench --virtual 8` on a GPU to record some"
        )
    misses = []
    for run in runs:
        predicted = predict_emulated(run)
        if abs(predicted / run.measured_us - 1) > 0.20:
            misses.append(
                f"{run.path}: {run.phase} R={run.num_ranks} SMs={run.num_sms}: "
                f"predicted {predicted:.1f} us, measured {run.measured_us:.1f} us"
            )
    assert not misses, "\n".join(misses)
