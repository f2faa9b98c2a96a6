"""Packaging for commkit.

The device sources live at the top of the repository (``csrc/``, ``ptx/``, and ``host/``: their host
execution) and are shipped inside the installed package as ``commkit/csrc``, ``commkit/ptx`` and
``commkit/host`` so that the JIT finds them after a plain (non-editable) ``pip install .``.
"""

import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BUILD_COMMIT_FILE = "_build_commit.txt"  # read by commkit.tools.report.git_commit once installed


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


class build_py_with_commit(build_py):
    """Also writes ``commkit/_build_commit.txt``: the commit the package is built from (``-dirty`` with
    uncommitted changes), so that an installed commkit's results name it. Nothing when not built in git."""

    def run(self) -> None:
        super().run()
        if self.dry_run or not (HERE / ".git").exists():
            return
        try:
            commit = _git("rev-parse", "HEAD")
            dirty = _git("status", "--porcelain", "--untracked-files=no")
        except (OSError, subprocess.SubprocessError):
            return
        target = Path(self.build_lib) / "commkit" / BUILD_COMMIT_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(commit + ("-dirty" if dirty else "") + "\n")


DEVICE_SOURCES = ["*.cuh", "*.cu", "*.h", "*.hpp", "*.cpp", "*.md"]

setup(
    packages=find_packages(include=["commkit", "commkit.*"])
    + ["commkit.csrc", "commkit.ptx", "commkit.host", "commkit.host.include"],
    package_dir={"commkit.csrc": "csrc", "commkit.ptx": "ptx", "commkit.host": "host", "commkit.host.include": "host/include"},
    package_data={
        "commkit.csrc": DEVICE_SOURCES,
        "commkit.ptx": DEVICE_SOURCES,
        "commkit.host": DEVICE_SOURCES,
        "commkit.host.include": DEVICE_SOURCES,
        "commkit.backends.gin": ["layout_probe.cu"],  # the GIN struct-layout probe (probe.py compiles it)
    },
    include_package_data=False,
    cmdclass={"build_py": build_py_with_commit},
)
