"""Render a prediction: a terminal table, a JSON-ready dict, and time against num_sms as a PNG."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from commkit.model.budget import BudgetAnswer
from commkit.model.predict import LOGICAL_DEFINITION, PHASES, Model, PhasePrediction

BYTES_NOTE = (
    "bytes: FP8 row = H + 4*ceil(H/128), BF16 row = 2H; logical = {definition}; "
    "link MB are per GPU (mean, busier direction); util = busiest GPU's link bytes / (time * rate)"
)


def to_dict(
    model: Model, predictions: dict[str, PhasePrediction], budgets: dict[str, BudgetAnswer]
) -> dict[str, Any]:
    """Everything a table shows, as plain JSON types."""
    topo, work = model.topology, model.workload
    return {
        "topology": {**topo.__dict__, "num_ranks": topo.num_ranks},
        "workload": {
            "num_tokens": work.num_tokens,
            "hidden": work.hidden,
            "num_topk": work.num_topk,
            "num_experts": work.num_experts,
            "num_sms": work.num_sms,
            "dispatch_dtype": work.dispatch_dtype,
            "role_split": {
                key: work.roles(key) for key in (f"{model.family}.dispatch", f"{model.family}.combine")
            }
            if model.family != "emulated"
            else {},
        },
        "routing": model.routing.describe(),
        "per_sm_gbps": model.per_sm,
        "bytes_definition": BYTES_NOTE.format(definition=LOGICAL_DEFINITION[model.family]),
        "phases": {
            phase: {
                **prediction.__dict__,
                "smallest_budget": budgets[phase].__dict__ if phase in budgets else None,
            }
            for phase, prediction in predictions.items()
        },
    }


def print_table(
    model: Model, predictions: dict[str, PhasePrediction], budgets: dict[str, BudgetAnswer]
) -> None:
    """A rich table, one row per phase, and the byte definition under it."""

    topo, work = model.topology, model.workload
    title = (
        f"{topo.name}: {topo.num_nodes} node(s) x {topo.gpus_per_node} GPUs ({model.family}), "
        f"T={work.num_tokens} H={work.hidden} top-{work.num_topk} of {work.num_experts}, "
        f"{work.dispatch_dtype} dispatch, {work.num_sms} SMs, {model.routing.describe()}"
    )
    hbm = model.family == "emulated"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = (
        "phase",
        "time us",
        "logical GB/s",
        "bound by",
        "link-bound us",
        "HBM MB" if hbm else "NVLink MB",
        "util",
        "IB MB",
        "util",
    )
    for column in (*columns, "min SMs"):
        table.add_column(column, justify="left" if column in ("phase", "bound by") else "right", no_wrap=True)
    for phase in PHASES:
        p = predictions[phase]
        cells = [phase, f"{p.time_us:.1f}", f"{p.logical_gbps:.1f}", p.bound, f"{p.link_bound_us:.1f}"]
        for link in ("hbm" if hbm else "nvlink", "ib"):
            known = link in p.link_bytes
            cells += [f"{p.link_bytes[link] / 1e6:.1f}" if known else "-"]
            cells += [f"{100 * p.link_util[link]:.0f}%" if known else "-"]
        answer = budgets.get(phase)
        cells.append("-" if answer is None else str(answer.num_sms or "none"))
        table.add_row(*cells)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(BYTES_NOTE.format(definition=LOGICAL_DEFINITION[model.family]))
    if budgets:
        console.print(f"min SMs: smallest num_sms {next(iter(budgets.values())).target}")


def plot_time_vs_sms(model: Model, path: str, sm_step: int = 2) -> None:
    """Predicted time of each phase against num_sms, with the link-bound time dashed (PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(range(sm_step, model.topology.sms_per_gpu + 1, sm_step))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    top_us, knee = 0.0, model.workload.num_sms
    for phase, color in zip(PHASES, ("tab:blue", "tab:orange"), strict=True):
        points = [model.phase(phase, n) for n in budgets]
        link_bound = points[-1].link_bound_us
        axes.plot(budgets, [p.time_us for p in points], color=color, marker=".", label=phase)
        axes.axhline(link_bound, color=color, linestyle="--", linewidth=1, label=f"{phase} link-bound")
        top_us = max(top_us, 3 * link_bound)
        # NOTE: zoom on the knee (where the SM terms stop mattering); past it the curves are flat
        knee = max(knee, next((p.num_sms for p in points if p.time_us <= 1.01 * link_bound), budgets[-1]))
    axes.axvline(
        model.workload.num_sms, color="gray", linestyle=":", label=f"num_sms={model.workload.num_sms}"
    )
    axes.set_xlim(0, min(budgets[-1], 2 * knee) + sm_step)
    axes.set_ylim(0, top_us)
    topo = model.topology
    axes.set_title(f"{topo.name} EP{topo.num_ranks}: predicted time against the SM budget")
    axes.set_xlabel("num_sms (SMs given to communication)")
    axes.set_ylabel("time (us)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
