"""CPU speed of the host-side tools that tests used to time: ``count_traffic`` at DeepSeek-V3 size
(64 ranks in 8 nodes of 8, 8192 tokens x top-8 of 256 experts, one thread) and two rounds of the
internode protocol model on 4 nodes of 2 GPUs. Prints seconds per run (best of ``--reps``); the
figures belong in benchmarks, not in timed tests (shared machines are noisy).

    python bench/cpu_speed.py [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from commkit.tools.traffic import count_traffic


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    routing = [torch.rand(8192, 256, generator=gen).topk(8, dim=1).indices for _ in range(64)]
    torch.set_num_threads(1)
    traffic_s = best_of(args.reps, lambda: count_traffic(routing, 256, 8, 7168, "fp8"))
    print(f"count_traffic  64 ranks x 8192 tokens, top-8 of 256, 1 thread: {traffic_s:.3f} s")
    # NOTE: the protocol model lives with the tests (tests/internode_model.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_internode_protocol_model import two_rounds

    model_s = best_of(args.reps, lambda: two_rounds(4, 2, 77))
    print(f"protocol model two rounds, 4 nodes x 2 GPUs (seed 77):        {model_s:.3f} s")


if __name__ == "__main__":
    main()
