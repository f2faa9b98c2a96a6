"""``python -m commkit <command>``: the command-line entry point.

Each subcommand lives in ``commkit/cli/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; a module is imported only to build its parser.
COMMANDS = {
    "demo": "commkit.cli.demo",
    "bench": "commkit.cli.bench",
    "overlap": "commkit.cli.overlap",
    "tune": "commkit.cli.tune",
    "monitor": "commkit.cli.monitor",
    "info": "commkit.cli.info",
    "model": "commkit.cli.model",
    "jit": "commkit.cli.jit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m commkit",
        description="commkit: expert-parallel dispatch/combine for MoE layers",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
