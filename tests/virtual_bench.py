"""What the CPU tests of ``bench``/``tune`` on virtual ranks share (test_tools_virtual.py,
test_tools_sweep.py): the shape, the device and a BenchSpec small enough for the CPU stand-ins of
``tests/fake_kernels.py``. The ``profiles`` fixture they use is in conftest.py."""

from __future__ import annotations

import torch

from commkit.tools.bench import BenchSpec
from commkit.tools.shapes import get_shape

# 6 experts split over 3 virtual ranks; few tokens: the CPU stand-ins loop over rows in Python.
SHAPE = get_shape("ci-tiny").with_(num_experts=6, num_tokens=13)
CPU = torch.device("cpu")


def virtual_spec(**kw: object) -> BenchSpec:
    """A BenchSpec of SHAPE on 3 virtual ranks, 2 SMs, 2 reps after 1 warm-up, no progress output; kw:
    the fields a test sets (or overrides)."""
    base = dict(shapes=[SHAPE], num_sms=[2], reps=2, warmup=1, progress=False, virtual=3)
    return BenchSpec(**{**base, **kw})
