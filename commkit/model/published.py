"""Published figures the model is validated against (shared/peers.md, DeepEP V1 normal kernels on H800)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedFigure:
    """Logical GB/s of one phase (definition in predict.py) in DeepEP's test setting.

    num_sms: SMs of that setting (DeepEP's intranode test uses 24, its internode test 20)
    calibrates: the model parameter fitted to this figure, or None when the figure is a prediction
    """

    ep_size: int
    phase: str
    gbps: float
    num_sms: int
    calibrates: str | None = None


# Setting of every row: 4096 tokens per rank, hidden 7168, top-8 of 256 experts, node-limited to 4 nodes
# (internode), FP8 dispatch, BF16 combine.
SETTING = {"num_tokens": 4096, "hidden": 7168, "num_topk": 8, "num_experts": 256, "max_nodes": 4}

DEEPEP_H800: tuple[PublishedFigure, ...] = (
    PublishedFigure(8, "dispatch", 153.0, 24, calibrates="intranode.dispatch per-SM rate"),
    PublishedFigure(8, "combine", 158.0, 24, calibrates="intranode.combine per-SM rate"),
    PublishedFigure(16, "dispatch", 43.0, 20, calibrates="internode per-SM rate"),
    PublishedFigure(16, "combine", 43.0, 20),
    PublishedFigure(32, "dispatch", 58.0, 20),
    PublishedFigure(32, "combine", 57.0, 20),
    PublishedFigure(64, "dispatch", 51.0, 20, calibrates="CX7 NIC efficiency"),
    PublishedFigure(64, "combine", 50.0, 20),
)
