"""``python -m commkit info``: devices, links, NICs, versions and which backends can run here."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="devices, NVLink, IB, versions and usable backends",
        description=(
            "Show the device, SM count, NVLink links and speed, InfiniBand devices and rates, versions of "
            "torch, CuPy, NCCL and the CUDA driver, and which backends are usable here (and why not)."
        ),
    )
    parser.add_argument("--sysfs-root", default="/sys", help="root of the sysfs tree (for testing)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from commkit.tools import report
    from commkit.tools.info import collect

    info = collect(args.sysfs_root)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    report.print_table("versions", ["name", "version"], [[k, v] for k, v in info["versions"].items()])
    dev_cols = [
        "index",
        "name",
        "sms",
        "memory_gib",
        "nvlink_links",
        "nvlink_gbps_per_link",
        "nvlink_gbps",
        "pcie_gbps",
    ]
    if info["devices"]:
        report.print_table("devices", dev_cols, [[d.get(c) for c in dev_cols] for d in info["devices"]])
    if info["ib_ports"]:
        cols = ["port", "rate_gbit", "state", "link_layer"]
        report.print_table("InfiniBand ports", cols, [[p.get(c) for c in cols] for p in info["ib_ports"]])
    report.print_table("backends", ["name", "status"], [[k, v] for k, v in info["backends"].items()])
    for problem in info["problems"]:
        print(f"note: {problem}")
    return 0
