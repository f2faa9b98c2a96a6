"""Host execution under ThreadSanitizer and AddressSanitizer + UndefinedBehaviorSanitizer.

Each case runs in a process of its own (``tests/host_exec_case.py``, the sanitizer runtime loaded first
through ``commkit.jit.host.sanitizer_env``). A small matrix of the kernels runs without a report and
equal to ``commkit.reference``; then the mutation tests plant known synchronisation faults in the very
kernel sources (``-DCOMMKIT_FAULTS``, ``csrc/common.cuh``) and check that ThreadSanitizer or the
comparison catches each one. No suppressions are used: Python and torch are not instrumented, so only
the kernels' own memory accesses are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from commkit.jit.host import host_unavailable_reason, sanitizer_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(host_unavailable_reason() is not None, reason=str(host_unavailable_reason())),
]

CASE_SCRIPT = Path(__file__).resolve().parent / "host_exec_case.py"
TSAN_REPORT = "WARNING: ThreadSanitizer"
ASAN_REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def run_case(spec: dict, timeout_s: float = 900.0, *, need_result: bool = True) -> tuple[dict | None, str]:
    """(the case's JSON result, None if the process stopped before it, and its stderr)."""
    proc = subprocess.run(
        [sys.executable, str(CASE_SCRIPT), json.dumps(spec)],
        env=sanitizer_env(spec["variant"]),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if need_result:
        assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return (json.loads(lines[-1]) if lines else None), proc.stderr


# Intranode 2 and 4 ranks (several warps per peer group), virtual nodes 2x2 (the internode kernels),
# the in-kernel FP8 cast
MATRIX = [
    pytest.param({"ranks": 2}, id="2r"),
    pytest.param({"ranks": 4, "tokens": 12, "experts": 16}, id="4r"),
    pytest.param({"ranks": 4, "per_node": 2, "tokens": 12}, id="2x2"),
    pytest.param({"ranks": 4, "per_node": 2, "tokens": 10, "dtype": "cast"}, id="2x2-cast"),
]


@pytest.mark.parametrize("spec", MATRIX)
def test_thread_sanitizer_finds_no_race(spec: dict) -> None:
    result, stderr = run_case({**spec, "variant": "tsan"})
    assert TSAN_REPORT not in stderr, stderr[-8000:]
    assert result == {"match": True, "error": None}, result


@pytest.mark.parametrize("spec", MATRIX)
def test_address_and_ub_sanitizers_find_nothing(spec: dict) -> None:
    result, stderr = run_case({**spec, "variant": "asan"})
    assert not any(r in stderr for r in ASAN_REPORTS), stderr[-8000:]
    assert result == {"match": True, "error": None}, result


# (fault bit of csrc/common.cuh, what it leaves out)
FAULTS = [
    pytest.param(1, id="no-group-barrier-before-release"),
    pytest.param(2, id="relaxed-store-for-a-release"),
    pytest.param(4, id="no-syncwarp-after-lane0-wait"),
    pytest.param(8, id="no-barrier-before-counters-zeroed"),
]


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_synchronisation_faults_are_caught(fault: int) -> None:
    # 4 ranks: 2 warps per peer group, so a group barrier orders more than one warp
    result, stderr = run_case({"ranks": 4, "tokens": 12, "experts": 16, "variant": "tsan", "faults": fault,
                               "timeout_s": 20.0})  # fmt: skip
    assert result is not None
    # The build ran (a compile error or a fault of the host execution would prove nothing): the
    # launch completed, possibly with wrong rows, or a bounded wait timed out
    assert result["error"] is None or result["error"].startswith("CommTimeoutError"), result
    assert TSAN_REPORT in stderr, f"ThreadSanitizer missed planted fault {fault}: {result}"


def test_thread_sanitizer_sees_a_thread_that_exited_before_another_started() -> None:
    # A positive control of the annotations: thread 0 writes and exits, thread 32 reads later with
    # nothing ordering them (a race on a GPU): an exiting thread must not look ordered before the
    # threads that start after it
    _, stderr = run_case({"variant": "tsan", "kernel": "exit_then_read_kernel"})
    assert TSAN_REPORT in stderr, stderr[-4000:]


def test_kernel_printf_from_many_threads_is_no_race() -> None:
    _, stderr = run_case({"variant": "tsan", "kernel": "printf_kernel"})
    assert TSAN_REPORT not in stderr, stderr[-6000:]
    assert stderr.count("printf from block") == 8


def test_address_sanitizer_catches_a_row_past_the_outputs() -> None:
    # The planted fault 16 writes every received row one row further: the last one lands past the
    # outputs' allocation (ASan stops the process there)
    _, stderr = run_case({"ranks": 2, "variant": "asan", "faults": 16}, need_result=False)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in stderr, stderr[-4000:]
