"""``python -m commkit monitor -- CMD ...``: NVLink, IB and PCIe throughput while a command runs."""

from __future__ import annotations

import argparse
import subprocess
from typing import Any

from commkit.cli._common import HelpFormatter

COLUMNS = ["kind", "channel", "avg GB/s", "max GB/s", "peak GB/s", "avg util", "max util"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="sample NVLink/IB/PCIe counters while a command runs",
        description=(
            "Run CMD and sample hardware byte counters every --interval seconds: NVLink per link (NVML "
            "field values NVLINK_THROUGHPUT_DATA_TX/RX), InfiniBand ports (/sys/class/infiniband/*/ports/*/"
            "counters/port_xmit_data, port_rcv_data, in 4-byte units), PCIe (NVML). Reports GB/s per "
            "channel and utilisation against its peak (NVML link speed, the port's rate file). Counters "
            "that cannot be read are listed with the reason; the others are still sampled."
        ),
        epilog="example:\n"
        "  python -m commkit monitor --png links.png -- torchrun --nproc-per-node=8 -m commkit bench",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--sysfs-root", default="/sys", help="root of the sysfs tree (for testing)")
    parser.add_argument("--csv", metavar="PATH", help="write the time series as CSV here")
    parser.add_argument("--png", metavar="PATH", help="write the time series as PNG here")
    parser.add_argument("--json", metavar="PATH", help="write the per-channel summary as JSON here")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")
    parser.set_defaults(func=run)


def print_report(rep: Any) -> None:
    from commkit.tools import report

    def pct(value: float | None) -> str | None:
        return None if value is None else f"{value:.1%}"

    rows = [
        [s.kind, s.name, s.avg_gbps, s.max_gbps, s.peak_gbps, pct(s.avg_util), pct(s.max_util)]
        for s in rep.stats
    ]
    report.print_table("commkit monitor", COLUMNS, rows)
    for counter, reason in rep.unavailable:
        print(f"unavailable: {counter}: {reason}")


def run(args: argparse.Namespace) -> int:
    from commkit.cli._common import fail
    from commkit.tools import report
    from commkit.tools.monitor import monitor, plot_report

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        return fail("no command given: python -m commkit monitor [options] -- CMD ...")
    with monitor(args.interval, sysfs_root=args.sysfs_root) as mon:
        try:
            code = subprocess.call(cmd)
        except OSError as exc:
            code = fail(f"cannot run {cmd[0]!r}: {exc}", 127)
    rep = mon.report()
    print_report(rep)
    if args.csv:
        rep.write_csv(args.csv)
    if args.json:
        report.write_json(args.json, rep.to_dict())
    if args.png:
        msg = plot_report(rep, args.png)
        if msg:
            print(msg)
    return code
