"""Small dispatch/combine runs (2 virtual ranks; 2 virtual nodes x 2) for compute-sanitizer.

compute-sanitizer --tool memcheck python tests/gpu/run_small.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import KCase, compare_dispatch, expected_dispatch, make_inputs, to_device  # noqa: E402

from commkit.emulate import EmulatedGroup  # noqa: E402


def main() -> int:
    errors = []
    for case, per_node in (
        (KCase((37, 20), hidden=256, num_topk=3, num_experts=8, num_sms=2, seed=1), None),
        (KCase((11, 5), hidden=256, num_topk=2, num_experts=4, dtype="cast", num_sms=1, seed=2), None),
        # virtual nodes: 2 nodes x 2 ranks, the internode kernels
        (KCase((29, 0, 13, 40), hidden=256, num_topk=4, num_experts=8, num_sms=2, seed=3), 2),
    ):
        group = EmulatedGroup(
            case.num_ranks, num_sms=case.num_sms, timeout_s=600.0, num_ranks_per_node=per_node
        )
        xs, scales, idxs, weights = make_inputs(case)
        want = expected_dispatch(case, xs, scales, idxs, weights)
        dev = group.device
        args = (to_device(xs, dev), to_device(idxs, dev), to_device(weights, dev), case.num_experts)
        outs = group.dispatch(*args, x_scales=to_device(scales, dev), cast_to_fp8=case.dtype == "cast")
        outs = group.dispatch(*args, cast_to_fp8=case.dtype == "cast", handles=[o.handle for o in outs])
        ys = group.combine(
            [torch.ones(o.x.shape[0], case.hidden, dtype=torch.bfloat16, device=dev) for o in outs],
            [o.handle for o in outs],
        )
        torch.cuda.synchronize()
        errors += compare_dispatch(outs, want)
        errors += [f"combine {s}" for s, y in enumerate(ys) if not torch.isfinite(y.x.float()).all()]
    print("run_small:", "ok" if not errors else errors[:5])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
