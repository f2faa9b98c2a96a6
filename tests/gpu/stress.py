"""Stress loop: dispatch/combine rounds on virtual ranks with content hashes.

Each of a few cases is checked against commkit.reference once; every later round of that case must
reproduce the same content hash (dispatch outputs and combine outputs), with poisoned outputs.

    python tests/gpu/stress.py --rounds 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import (  # noqa: E402
    KCase,
    compare_dispatch,
    content_hash,
    expected_dispatch,
    expert_outputs,
    make_inputs,
    to_device,
)

from commkit import reference  # noqa: E402
from commkit.emulate import EmulatedGroup  # noqa: E402

CASES = [
    KCase((97, 130, 0, 64), hidden=512, num_topk=4, num_experts=16, skew=1.0, num_sms=3, seed=100),
    KCase((256,) * 8, hidden=1024, num_topk=8, num_experts=64, unused=0.2, num_sms=4, seed=101),
    KCase((301, 7), hidden=2048, num_topk=2, num_experts=8, dtype="fp8", num_sms=2, seed=102),
    KCase((64, 200, 33), hidden=768, num_topk=3, num_experts=9, dtype="cast", num_sms=5, seed=103),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    groups: dict[int, EmulatedGroup] = {}
    prepared = []
    for case in CASES:
        group = groups.setdefault(case.num_ranks, EmulatedGroup(case.num_ranks, num_sms=8, timeout_s=30.0))
        group.engine.poison_outputs = True
        xs, scales, idxs, weights = make_inputs(case)
        want = expected_dispatch(case, xs, scales, idxs, weights)
        ys = expert_outputs([w.x for w in want], case.seed)
        want_y = reference.combine_reference(ys, want, list(case.tokens))
        dev = group.device
        prepared.append(
            (
                case,
                group,
                to_device(xs, dev),
                to_device(scales, dev),
                to_device(idxs, dev),
                to_device(weights, dev),
                want,
                [y.to(dev) for y in ys],
                want_y,
                None,
            )
        )
    failures = 0
    start = time.time()
    for round_idx in range(args.rounds):
        i = round_idx % len(prepared)
        case, group, xs, scales, idxs, weights, want, ys, want_y, expected_hash = prepared[i]
        outs = group.dispatch(
            xs,
            idxs,
            weights,
            case.num_experts,
            x_scales=scales,
            cast_to_fp8=case.dtype == "cast",
            expert_alignment=case.expert_alignment,
            num_sms=case.num_sms,
        )
        got_y = group.combine(ys, [o.handle for o in outs], num_sms=case.num_sms)
        torch.cuda.synchronize()
        tensors = [
            t
            for o in outs
            for t in (o.x, o.topk_idx, o.topk_weights) + ((o.x_scales,) if o.x_scales is not None else ())
        ]
        digest = content_hash(tensors + [y.x for y in got_y])
        if expected_hash is None:
            errors = compare_dispatch(outs, want)
            errors += [
                f"combine rank {s}"
                for s, (g, w) in enumerate(zip(got_y, want_y, strict=True))
                if not torch.equal(g.x.cpu().view(torch.int16), w.view(torch.int16))
            ]
            if errors:
                print(f"round {round_idx} case {i}: {errors[:5]}")
                failures += 1
            prepared[i] = prepared[i][:-1] + (digest,)
        elif digest != expected_hash:
            print(f"round {round_idx} case {i}: content hash {digest[:16]} != {expected_hash[:16]}")
            failures += 1
    elapsed = time.time() - start
    print(f"stress: {args.rounds} rounds, {len(CASES)} cases, {failures} failures, {elapsed:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
