"""The smallest SM budget that reaches a target, per phase and for the layer."""

from __future__ import annotations

from dataclasses import dataclass

from commkit.model.predict import PHASES, Model


@dataclass(frozen=True)
class BudgetAnswer:
    """num_sms: smallest budget meeting the target, None when no budget up to the GPU's SMs does.

    target_us: the time to reach; time_us: predicted time at ``num_sms`` (or at the largest budget).
    """

    phase: str
    target: str
    target_us: float
    num_sms: int | None
    time_us: float


def smallest_budget(
    model: Model,
    phase: str,
    *,
    within_pct: float | None = 5.0,
    compute_us: float | None = None,
    sm_step: int = 2,
) -> BudgetAnswer:
    """Smallest ``num_sms`` (a multiple of ``sm_step``) with time <= the target.

    Target: ``compute_us`` when given (the communication hides under that much compute), else
    (1 + within_pct / 100) * the link-bound time (the time with unlimited SMs).
    NOTE: time never grows with num_sms in the model (SM terms only shrink), so the first budget that
    meets the target is the smallest.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if sm_step < 1:
        raise ValueError(f"sm_step must be >= 1, got {sm_step}")
    if compute_us is not None:
        if compute_us <= 0:
            raise ValueError(f"compute_us must be > 0, got {compute_us}")
        target_us, target = compute_us, f"hidden under {compute_us:g} us of compute"
    else:
        if within_pct is None or within_pct < 0:
            raise ValueError(f"within_pct must be >= 0, got {within_pct}")
        link_bound = model.phase(phase, model.topology.sms_per_gpu).link_bound_us
        target_us, target = link_bound * (1 + within_pct / 100), f"within {within_pct:g}% of link-bound"
    budgets = list(range(sm_step, model.topology.sms_per_gpu + 1, sm_step))
    time_us = float("inf")
    for num_sms in budgets:
        time_us = model.phase(phase, num_sms).time_us
        if time_us <= target_us * (1 + 1e-12):
            return BudgetAnswer(phase, target, target_us, num_sms, time_us)
    return BudgetAnswer(phase, target, target_us, None, time_us)


def smallest_layer_budget(model: Model, **kwargs: object) -> dict[str, BudgetAnswer]:
    """``smallest_budget`` for each phase: {"dispatch": ..., "combine": ...}."""
    return {phase: smallest_budget(model, phase, **kwargs) for phase in PHASES}  # type: ignore[arg-type]
