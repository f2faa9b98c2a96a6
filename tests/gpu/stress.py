"""Stress loop: dispatch/combine rounds on virtual ranks, every round checked by content hash.

Rounds go round-robin over the 8-rank cases (``--rounds`` of them, default 1000) with one round of a
2- or 4-rank case after every 4; each case has its own ``EmulatedGroup`` (outputs poisoned before every
run), kept for all its rounds. Visits of a case alternate three modes: a fresh dispatch (layout and count
exchange), a cached dispatch with the handles of the case's latest fresh dispatch, and a fresh dispatch
with ``num_worst_tokens`` (outputs padded; the valid rows are hashed). Every round's dispatch outputs
and combine outputs must hash to the hash of ``commkit.reference``'s (computed once per case); the
first round of each case is also compared field by field, for a readable report. The loop stops at
``--max-seconds`` (printing how far it got); progress every ``--progress`` rounds.

    python tests/gpu/stress.py --rounds 1000 --max-seconds 480
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_cases import (  # noqa: E402
    KCase,
    bits,
    compare_dispatch,
    content_hash,
    expected_dispatch,
    expert_outputs,
    make_inputs,
    to_device,
)

from commkit import reference  # noqa: E402
from commkit.emulate import EmulatedGroup  # noqa: E402

CASES_8 = [
    KCase((256,) * 8, hidden=1024, num_topk=8, num_experts=64, unused=0.2, num_sms=4, seed=101),
    KCase((300, 1, 77, 128, 0, 999, 64, 3), hidden=2048, num_topk=6, num_experts=64, skew=1.5, num_sms=8,
          seed=104),
    KCase((200,) * 8, hidden=2048, num_topk=8, num_experts=256, dtype="fp8", num_sms=16, seed=105),
    KCase((97, 130, 64, 5, 300, 11, 64, 250), hidden=768, num_topk=4, num_experts=32, dtype="cast",
          empty_rank=3, num_sms=5, seed=106),
]  # fmt: skip
CASES_SMALL = [
    KCase((97, 130, 0, 64), hidden=512, num_topk=4, num_experts=16, skew=1.0, num_sms=3, seed=100),
    KCase((301, 7), hidden=2048, num_topk=2, num_experts=8, dtype="fp8", num_sms=2, seed=102),
    KCase((64, 200, 33, 1), hidden=768, num_topk=3, num_experts=12, dtype="cast", unused=0.3, num_sms=6,
          seed=103),
]  # fmt: skip
MODES = ("fresh", "cached", "worst")


def dispatch_tensors(outs: list, num_rows: list[int]) -> list[torch.Tensor]:
    """The fields that are hashed, per rank: the first ``num_rows[r]`` rows (the rest is padding)."""
    tensors = []
    for o, n in zip(outs, num_rows, strict=True):
        tensors += [o.x[:n], o.topk_idx[:n].to(torch.int64), o.topk_weights[:n]]
        if o.x_scales is not None:
            tensors.append(o.x_scales[:n])
    return tensors


class Prepared:
    """One case: its group, its inputs on the device, the reference and its hash."""

    def __init__(self, case: KCase) -> None:
        self.case = case
        self.group = EmulatedGroup(case.num_ranks, num_sms=case.num_sms, timeout_s=30.0)
        self.group.engine.poison_outputs = True
        xs, scales, idxs, weights = make_inputs(case)
        self.want = expected_dispatch(case, xs, scales, idxs, weights)
        ys = expert_outputs([w.x for w in self.want], case.seed)
        self.want_y = reference.combine_reference(ys, self.want, list(case.tokens))
        dev = self.group.device
        self.xs, self.scales = to_device(xs, dev), to_device(scales, dev)
        self.idxs, self.weights = to_device(idxs, dev), to_device(weights, dev)
        self.num_rows = [w.x.shape[0] for w in self.want]
        self.worst = max(1, sum(case.tokens))
        self.ys = [y.to(dev) for y in ys]
        self.ys_worst = [
            torch.cat([y, torch.zeros(self.worst - y.shape[0], y.shape[1], dtype=y.dtype)]).to(dev)
            for y in ys
        ]
        self.want_hash = content_hash(dispatch_tensors(self.want, self.num_rows) + list(self.want_y))
        self.handles: list[Any] | None = None
        self.visits = 0
        self.checked = False

    def round(self) -> tuple[str, list[str]]:
        """One dispatch + combine in this visit's mode; (mode, errors)."""
        case, g = self.case, self.group
        mode = MODES[self.visits % len(MODES)]
        self.visits += 1
        worst = mode == "worst"
        outs = g.dispatch(
            self.xs, self.idxs, self.weights, case.num_experts, x_scales=self.scales,
            cast_to_fp8=case.dtype == "cast", expert_alignment=case.expert_alignment, num_sms=case.num_sms,
            handles=self.handles if mode == "cached" else None,
            num_worst_tokens=self.worst if worst else None,
        )  # fmt: skip
        if mode == "fresh":
            self.handles = [o.handle for o in outs]
        got_y = g.combine(self.ys_worst if worst else self.ys, [o.handle for o in outs], num_sms=case.num_sms)
        torch.cuda.synchronize()
        errors = []
        if worst:
            errors += [f"rank {r}: {o.x.shape[0]} rows, expected {self.worst}" for r, o in enumerate(outs)
                       if o.x.shape[0] != self.worst]  # fmt: skip
        else:
            errors += [
                f"rank {r}: num_tokens_per_expert {o.num_tokens_per_expert} != {w.num_tokens_per_expert}"
                for r, (o, w) in enumerate(zip(outs, self.want, strict=True))
                if o.num_tokens_per_expert != w.num_tokens_per_expert
            ]
        if errors:
            return mode, errors
        digest = content_hash(dispatch_tensors(outs, self.num_rows) + [y.x for y in got_y])
        if digest != self.want_hash or not self.checked:
            # Field by field (first round of the case, or on a mismatch): says what differs.
            errors += compare_dispatch(outs, self.want, self.num_rows if worst else None)
            errors += [
                f"combine rank {s}: differs"
                for s, (gy, wy) in enumerate(zip(got_y, self.want_y, strict=True))
                if not torch.equal(bits(gy.x.cpu()), bits(wy))
            ]  # fmt: skip
            if digest != self.want_hash and not errors:
                errors.append(f"content hash {digest[:16]} != reference {self.want_hash[:16]}")
            self.checked = True
        return mode, errors


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1000, help="rounds on 8 virtual ranks (default 1000)")
    parser.add_argument(
        "--small-every", type=int, default=4, help="a 2/4-rank round after every N 8-rank ones"
    )
    parser.add_argument("--max-seconds", type=float, default=480.0, help="stop after this long (default 480)")
    parser.add_argument("--progress", type=int, default=100, help="print progress every N rounds")
    args = parser.parse_args()
    start = time.time()
    big = [Prepared(c) for c in CASES_8]
    small = [Prepared(c) for c in CASES_SMALL]
    print(f"stress: prepared {len(big) + len(small)} cases in {time.time() - start:.1f} s", flush=True)
    start = time.time()
    failures = 0
    counts = {8: 0, "small": 0}
    modes: dict[str, int] = {m: 0 for m in MODES}
    done = 0
    stopped = False
    for i in range(args.rounds):
        schedule = [big[i % len(big)]]
        if args.small_every and (i + 1) % args.small_every == 0:
            schedule.append(small[(i // args.small_every) % len(small)])
        for p in schedule:
            mode, errors = p.round()
            modes[mode] += 1
            counts[8 if p.case.num_ranks == 8 else "small"] += 1
            if errors:
                failures += 1
                print(f"round {i} R{p.case.num_ranks} seed {p.case.seed} {mode}: {errors[:5]}", flush=True)
        done = i + 1
        elapsed = time.time() - start
        if args.progress and done % args.progress == 0:
            print(f"stress: {done}/{args.rounds} rounds, {failures} failures, {elapsed:.1f} s", flush=True)
        if elapsed > args.max_seconds and done < args.rounds:
            stopped = True
            break
    elapsed = time.time() - start
    print(
        f"stress: {counts[8]} rounds on 8 ranks + {counts['small']} on 2/4 ranks ({modes}), "
        f"{failures} failures, {elapsed:.1f} s"
        + (
            f"; STOPPED at --max-seconds {args.max_seconds:g} after {done} of {args.rounds}"
            if stopped
            else ""
        )
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
