"""Test configuration: ``gpu`` tests run only where CUDA and CuPy are usable; the fixtures that tests
in several files share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fake_kernels import fake  # noqa: F401 - shared fixture of the host tests (tests/fake_kernels.py)

# The kernel cases (tests/gpu/kernel_cases.py) serve the GPU tests and the host execution alike
sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))


def _gpu_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("cupy") is None:
        return "needs CuPy (pip install 'commkit[cu12]' or 'commkit[cu13]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty profile directory ($COMMKIT_PROFILE_DIR) for tests that tune or look profiles up."""
    directory = tmp_path / "profiles"
    monkeypatch.setenv("COMMKIT_PROFILE_DIR", str(directory))
    return directory


@pytest.fixture(scope="module")
def nccl_world_of_one(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """GPU tests: a world-size-1 NCCL process group on GPU 0 for the module's tests."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
