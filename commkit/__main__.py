"""``python -m commkit <command>``: the command-line entry point.

Each subcommand lives in ``commkit/cli/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning the exit code).

Only the command being run is imported (``--help`` and ``--version`` import none): the one-line help of
the others is read from the first line of their module docstring (``python -m commkit bench``: ...),
without importing them, so that the parser answers without loading torch.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
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
    "train": "commkit.cli.train",
}


def version() -> str:
    """The installed distribution's version (package metadata)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("commkit")
    except PackageNotFoundError:
        return "0+unknown"


def summary(module_name: str) -> str:
    """The one-line help of a command: its module docstring's first line after the ``: `` (read from
    the source, not imported)."""
    try:
        spec = importlib.util.find_spec(module_name)
        with open(spec.origin, encoding="utf-8") as fh:  # type: ignore[union-attr, arg-type]
            doc = ast.get_docstring(ast.parse(fh.read())) or ""
    except (ImportError, OSError, SyntaxError, AttributeError, TypeError, ValueError):
        return ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.split(": ", 1)[1].rstrip(".") if ": " in first else first


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first argument that is not an option), None if none."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command``'s module is imported and registers its full parser, every other command
    gets a stand-in that only carries its one-line help."""
    parser = argparse.ArgumentParser(
        prog="python -m commkit",
        description="commkit: expert-parallel dispatch/combine for MoE layers",
        epilog="python -m commkit COMMAND --help describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"commkit {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary(module_name), add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    args.argv = argv  # what the results record as their command line
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
