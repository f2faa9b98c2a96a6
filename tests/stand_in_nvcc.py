"""A stand-in nvcc for the JIT tests (test_jit_lock.py, test_jit_warm.py): a Python script that answers
``--version`` with a given release and, for a compile, appends a line to the log ``$FAKE_NVCC_LOG``;
the test's body then writes the cubin (``-o``) and a ptxas report, so that compiles are counted exactly
and take the time the test wants."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Up to the output path: args, out and the modules os, sys and time are there for the body.
_HEAD = """#!{python}
import os, sys, time
args = sys.argv[1:]
if "--version" in args:
    print("nvcc: stand-in\\nCuda compilation tools, release {release}, V{release}.0")
    sys.exit(0)
with open(os.environ["FAKE_NVCC_LOG"], "a") as log:
    log.write({logged} + "\\n")
out = args[args.index("-o") + 1]
"""


def write_stand_in_nvcc(path: Path, body: str, logged: str, release: str = "13.0") -> Path:
    """The stand-in at path (executable); logged: the Python expression (a str) it logs per compile."""
    path.write_text(_HEAD.format(python=sys.executable, release=release, logged=logged) + body)
    path.chmod(0o755)
    return path


def compile_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty log for the stand-in's compiles, named by $FAKE_NVCC_LOG."""
    log = tmp_path / "compiles.log"
    log.touch()
    monkeypatch.setenv("FAKE_NVCC_LOG", str(log))
    return log
