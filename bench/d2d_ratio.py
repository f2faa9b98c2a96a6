"""Add the ratio to a device-to-device copy to the rows of a ``commkit bench`` JSON (GPU; bench/gpu_check.sh).

For each row: a ``torch`` device-to-device copy (``copy_``, the whole GPU: the copy engines or
whatever the driver picks) of the bytes the row's launch moves (virtual ranks: ``roofline_bytes``, all
ranks' bytes, else ``nvl_bytes`` x ranks; one rank: ``nvl_bytes``), median of ``--reps`` timed with
CUDA events after warm-ups. Writes, per row, ``d2d_bytes``, ``d2d_time_median_s``, ``d2d_gbps`` (per rank,
like ``gbps``) and ``vs_d2d`` = gbps / d2d_gbps, and rewrites the file in place.

    python bench/d2d_ratio.py gpu_out/bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def copy_seconds(num_bytes: int, reps: int, cache: dict[int, float]) -> float:
    import torch

    if num_bytes in cache:
        return cache[num_bytes]
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    cache[num_bytes] = statistics.median(times)
    return cache[num_bytes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.bench_json.read_text())
    except (OSError, ValueError) as exc:
        print(f"d2d_ratio: cannot read {args.bench_json}: {exc}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("d2d_ratio: needs a CUDA GPU", file=sys.stderr)
        return 2
    cache: dict[int, float] = {}
    for row in data.get("rows", []):
        scale = row["ranks"] if row.get("virtual") else 1
        total = int(row.get("roofline_bytes") or row["nvl_bytes"] * scale)
        seconds = copy_seconds(max(total, 1), args.reps, cache)
        row["d2d_bytes"] = total
        row["d2d_time_median_s"] = seconds
        row["d2d_gbps"] = total / scale / seconds / 1e9
        row["vs_d2d"] = row["gbps"] / row["d2d_gbps"] if row.get("gbps") else None
        print(
            f"d2d: {row['op']:8} {row['dtype']:5} sms={row['num_sms']}: copy of {total / 1e6:.0f} MB "
            f"{seconds * 1e3:.3f} ms -> {row['d2d_gbps']:.0f} GB/s per rank; "
            f"kernels {row.get('gbps') or 0:.0f} GB/s = {row['vs_d2d'] or 0:.2f} of it"
        )
    args.bench_json.write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
