"""Benchmark of the kernels on virtual ranks (one GPU), against baselines measured in the same run.

Setting (DeepSeek-V3 layer): 4096 tokens per rank, hidden 7168, top-8 of 256 experts, uniform routing.
Bytes: dispatch = rows received over all ranks x bytes per row (x, plus scales for FP8); combine =
the same rows in bf16. Baselines, same bytes:
  copy     the copy roofline of ``commkit.tools.roofline`` (16-byte vectors, unrolled x4, 512 threads)
           on the same total blocks (R x num_sms)
  memcpy   device-to-device cudaMemcpy (torch copy_) on the whole GPU
  torch    dispatch by index_select + combine by index_add_ (the same work with torch ops)
Times: median of --iters after --warmup, CUDA events on the communication stream; the dispatch
timed is the cached one (layout and count exchange come from the handle), full = with them.

    python tests/gpu/bench_kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from commkit.emulate import EmulatedGroup
from commkit.tools import torch_ops
from commkit.tools.roofline import CopyRoofline

HIDDEN, TOPK, EXPERTS, TOKENS = 7168, 8, 256, 4096


def _time(fn, stream: torch.cuda.Stream, warmup: int, iters: int) -> tuple[float, float]:
    """(median, spread = max - min) in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), max(times) - min(times)


def _inputs(num_ranks: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_ranks * TOKENS, HIDDEN, device=device, generator=gen).to(torch.bfloat16)
    scores = torch.rand(num_ranks * TOKENS, EXPERTS, device=device, generator=gen)
    idx = scores.topk(TOPK, dim=1).indices.to(torch.int64).contiguous()
    weights = torch.rand(num_ranks * TOKENS, TOPK, device=device, generator=gen)
    return x, idx, weights


def bench(num_ranks: int, num_sms: int, dtype: str, warmup: int, iters: int) -> dict:
    group = EmulatedGroup(num_ranks, num_sms=num_sms, timeout_s=60.0)
    engine, device, stream = group.engine, group.device, group.comm_stream
    x, idx, weights = _inputs(num_ranks, device)
    counts = [TOKENS] * num_ranks
    x_in, scales_in, cast = x, None, False
    if dtype == "fp8":
        from commkit.fp8 import cast_to_fp8

        q, s = cast_to_fp8(x.cpu())
        x_in, scales_in = q.to(device), s.to(device)
    elif dtype == "cast":
        cast = True

    with torch.cuda.stream(stream):
        first = engine.dispatch(
            x_in, scales_in, idx, weights, counts, EXPERTS, state=None, num_sms=num_sms, cast_to_fp8=cast
        )
    torch.cuda.synchronize()
    state = first.state
    num_rows = first.x.shape[0]
    row_bytes = first.x.shape[1] * first.x.element_size() + (
        first.x_scales.shape[1] * 4 if first.x_scales is not None else 0
    )
    dispatch_bytes = num_rows * row_bytes
    combine_bytes = num_rows * HIDDEN * 2
    expert_out = torch.randn(num_rows, HIDDEN, device=device).to(torch.bfloat16)

    def run_dispatch_cached():
        with torch.cuda.stream(stream):
            engine.dispatch(
                x_in, scales_in, idx, weights, counts, EXPERTS, state=state, num_sms=num_sms, cast_to_fp8=cast
            )

    def run_dispatch_full():
        with torch.cuda.stream(stream):
            engine.dispatch(
                x_in, scales_in, idx, weights, counts, EXPERTS, state=None, num_sms=num_sms, cast_to_fp8=cast
            )

    def run_combine():
        with torch.cuda.stream(stream):
            engine.combine(expert_out, state, EXPERTS, num_sms=num_sms)

    src = torch.empty(max(dispatch_bytes, combine_bytes) // 16 + 1, 16, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy_of(num_bytes: int, blocks: int):
        copy = CopyRoofline(num_bytes, device)  # its buffers and CuPy views are made here, not timed

        def run():
            with torch.cuda.stream(stream):
                copy(blocks)

        return run

    def memcpy_of(num_bytes: int):
        a, b = src.view(-1)[:num_bytes], dst.view(-1)[:num_bytes]

        def run():
            with torch.cuda.stream(stream):
                b.copy_(a)

        return run

    # torch ops doing the same work: gather rows per destination, then scatter-add back
    src_rows = torch_ops.destination_rows(state.send_pos >= 0)  # send_pos [R*T, R]

    def run_torch():
        with torch.cuda.stream(stream):
            torch_ops.dispatch_combine(x, src_rows)

    blocks = num_ranks * num_sms
    t = {}
    t["dispatch"] = _time(run_dispatch_cached, stream, warmup, iters)
    t["dispatch_full"] = _time(run_dispatch_full, stream, warmup, iters)
    t["combine"] = _time(run_combine, stream, warmup, iters)
    t["copy_dispatch"] = _time(copy_of(dispatch_bytes, blocks), stream, warmup, iters)
    t["copy_combine"] = _time(copy_of(combine_bytes, blocks), stream, warmup, iters)
    t["memcpy_dispatch"] = _time(memcpy_of(dispatch_bytes), stream, warmup, iters)
    t["torch_dispatch_combine"] = _time(run_torch, stream, warmup, max(3, iters // 4))
    row = {
        "num_ranks": num_ranks,
        "num_sms": num_sms,
        "dtype": dtype,
        "rows": num_rows,
        "dispatch_bytes": dispatch_bytes,
        "combine_bytes": combine_bytes,
        "times_s": {k: v[0] for k, v in t.items()},
        "spread_s": {k: v[1] for k, v in t.items()},
    }
    row["dispatch_GBps"] = dispatch_bytes / t["dispatch"][0] / 1e9
    row["combine_GBps"] = combine_bytes / t["combine"][0] / 1e9
    row["dispatch_vs_copy"] = t["copy_dispatch"][0] / t["dispatch"][0]
    row["combine_vs_copy"] = t["copy_combine"][0] / t["combine"][0]
    row["dispatch_vs_memcpy"] = t["memcpy_dispatch"][0] / t["dispatch"][0]
    row["speedup_vs_torch"] = t["torch_dispatch_combine"][0] / (t["dispatch"][0] + t["combine"][0])
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    num_sms_device = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [
        (8, 8),
        (8, 16),
        (4, 24),
        (4, 32),
        (2, 24),
        (2, 32),
        (8, num_sms_device // 8),
        (2, num_sms_device // 2),
    ]
    rows = []
    header = (
        f"{'R':>2} {'SMs':>4} {'dtype':>5} {'MB':>8} {'disp us':>9} {'GB/s':>7} {'/copy':>6} {'comb us':>9} "
        f"{'GB/s':>7} {'/copy':>6} {'/memcpy':>7} {'xtorch':>6}"
    )
    print(header)
    for num_ranks, num_sms in configs:
        for dtype in ("fp8", "bf16"):
            try:
                row = bench(num_ranks, num_sms, dtype, args.warmup, args.iters)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{num_ranks:>2} {num_sms:>4} {dtype:>5} failed: {exc}")
                rows.append({"num_ranks": num_ranks, "num_sms": num_sms, "dtype": dtype, "error": str(exc)})
                continue
            rows.append(row)
            t = row["times_s"]
            print(
                f"{num_ranks:>2} {num_sms:>4} {dtype:>5} {row['dispatch_bytes'] / 1e6:8.1f} "
                f"{t['dispatch'] * 1e6:9.1f} "
                f"{row['dispatch_GBps']:7.1f} {row['dispatch_vs_copy']:6.2f} {t['combine'] * 1e6:9.1f} "
                f"{row['combine_GBps']:7.1f} {row['combine_vs_copy']:6.2f} {row['dispatch_vs_memcpy']:7.2f} "
                f"{row['speedup_vs_torch']:6.1f}"
            )
    print("# /copy: copy-kernel time / kernel time on the same blocks and bytes (target >= 0.90);")
    print("# /memcpy: cudaMemcpy D2D time / dispatch time (target >= 0.80 on the whole GPU);")
    print("# xtorch: torch-ops dispatch+combine time / kernels dispatch+combine time (target >= 3)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
