"""Layers point one way: the runtime (every module of ``commkit/`` outside ``tools/`` and ``cli/``) never
imports ``commkit.tools`` or ``commkit.cli``; the tools and the CLI stand above it, and the tools never
import the CLI (the CLI parses arguments and calls the tools).

Read from the source (the AST of each file), so imports inside functions, under ``TYPE_CHECKING`` and
relative ones count as much as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "commkit"
ABOVE_THE_RUNTIME = ("tools", "cli")


def runtime_modules() -> list[Path]:
    return sorted(
        path
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in ABOVE_THE_RUNTIME
    )


def module_name(path: Path) -> str:
    parts = ("commkit", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved; ``from X
    import y`` yields ``X.y`` too, since ``y`` may be a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_the_runtime_is_found() -> None:
    names = {module_name(p) for p in runtime_modules()}
    assert {"commkit.buffer", "commkit.profiles", "commkit.backends.fabric"} <= names
    assert not any(n.startswith(("commkit.tools", "commkit.cli")) for n in names)


@pytest.mark.parametrize("above", [f"commkit.{a}" for a in ABOVE_THE_RUNTIME])
def test_runtime_does_not_import_the_layers_above(above: str) -> None:
    wrong = {  # one entry per import statement
        f"{path.relative_to(PACKAGE.parent)}:{line}": target
        for path in runtime_modules()
        for line, target in imported_modules(path)
        if target == above or target.startswith(above + ".")
    }
    lines = [f"{where} imports {what}" for where, what in wrong.items()]
    assert not wrong, f"the runtime reaches up into {above}:\n" + "\n".join(lines)


def test_tools_do_not_import_the_cli() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for path in sorted((PACKAGE / "tools").rglob("*.py"))
        for line, target in imported_modules(path)
        if target == "commkit.cli" or target.startswith("commkit.cli.")
    ]
    assert not wrong, "the tools reach up into commkit.cli:\n" + "\n".join(wrong)
