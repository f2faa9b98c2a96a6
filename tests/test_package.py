"""Packaging: the device sources ship inside the installed package; importing needs no CuPy or GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE_DIRS = ("csrc", "ptx", "host")
SUFFIXES = {".cuh", ".cu", ".h", ".hpp", ".cpp", ".md"}


def device_sources() -> dict[str, bytes]:
    found = {}
    for d in DEVICE_DIRS:
        for f in (REPO / d).rglob("*"):
            if f.suffix in SUFFIXES:
                found[str(f.relative_to(REPO))] = f.read_bytes()
    return found


def test_non_editable_install_ships_device_sources(tmp_path: Path) -> None:
    sources = device_sources()
    assert any(name.startswith("csrc/") for name in sources), "csrc/ holds no device sources"
    assert any(name.startswith("ptx/") for name in sources), "ptx/ holds no device sources"
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name, content in sources.items():
        installed = target / "commkit" / name
        assert installed.is_file(), f"{name} is not in the installed package"
        assert installed.read_bytes() == content
    probe = Path("backends") / "gin" / "layout_probe.cu"  # the GIN layout probe's C++ source
    assert (target / "commkit" / probe).read_bytes() == (REPO / "commkit" / probe).read_bytes()
    # The installed copy (not the checkout) is the one imported from there.
    code = "import commkit, pathlib; print(pathlib.Path(commkit.__file__).parent)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == target / "commkit"


def test_import_without_cupy() -> None:
    # A None entry in sys.modules makes `import cupy` fail as if it were not installed.
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import commkit, commkit.reference\n"
        "from commkit.backends import kernels_unavailable_reason\n"
        "print(kernels_unavailable_reason())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # says why the kernels cannot run
