"""Every argument check, and ranks whose peers die or never arrive."""

from __future__ import annotations

import os
import time

import pytest
import torch

import commkit
from commkit.launch import RankFailed, spawn_gloo

T, H, K, E = 6, 32, 2, 8


def good():
    x = torch.randn(T, H).to(torch.bfloat16)
    idx = torch.tensor([[0, 5], [1, -1], [7, 6], [-1, -1], [2, 3], [4, 0]])
    return x, idx, torch.rand(T, K)


def fp8(x: torch.Tensor):
    return x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], (x.shape[1] + 127) // 128)


def bad_calls(buf, other):
    """name -> a call that must raise."""
    x, idx, w = good()
    out = buf.dispatch(x, idx, w, E)
    other_out = other.dispatch(x, idx, w, E)
    other_routing = buf.dispatch(x, idx.flip(0).contiguous(), w, E)
    # A static routing buffer rewritten in place: caught even when values are not checked.
    unchecked = commkit.Buffer(backend="torch", timeout_s=30, check_values=False)
    static_idx = idx.clone()
    static_handle = unchecked.dispatch(x, static_idx, w, E).handle

    def rewritten_in_place():
        static_idx.copy_(idx.flip(0))
        return unchecked.dispatch(x, static_idx, w, E, handle=static_handle)

    return {
        "x dtype": lambda: buf.dispatch(x.float(), idx, w, E),
        "x dims": lambda: buf.dispatch(x.view(T, 2, H // 2), idx, w, E),
        "x contiguity": lambda: buf.dispatch(torch.randn(H, T).to(torch.bfloat16).t(), idx, w, E),
        "x hidden bytes": lambda: buf.dispatch(torch.randn(T, 12).to(torch.bfloat16), idx, w, E),
        "fp8 without scales": lambda: buf.dispatch(x.to(torch.float8_e4m3fn), idx, w, E),
        "scales shape": lambda: buf.dispatch((fp8(x)[0], torch.ones(T, 2)), idx, w, E),
        "scales dtype": lambda: buf.dispatch((fp8(x)[0], torch.ones(T, 1, dtype=torch.float64)), idx, w, E),
        "fp8 hidden bytes": lambda: buf.dispatch(fp8(torch.randn(T, 40).to(torch.bfloat16)), idx, w, E),
        "topk_idx dtype": lambda: buf.dispatch(x, idx.int(), w, E),
        "topk_idx too large": lambda: buf.dispatch(x, torch.where(idx == 7, 8, idx), w, E),
        "topk_idx below -1": lambda: buf.dispatch(x, torch.where(idx == 7, -2, idx), w, E),
        "topk_idx rows": lambda: buf.dispatch(x, idx[:-1].contiguous(), w[:-1].contiguous(), E),
        "topk_weights shape": lambda: buf.dispatch(x, idx, w[:, :1].contiguous(), E),
        "topk_weights dtype": lambda: buf.dispatch(x, idx, w.double(), E),
        "num_experts not multiple of ranks": lambda: buf.dispatch(x, idx, w, 9),
        "num_experts zero": lambda: buf.dispatch(x, idx.clamp(max=-1), w, 0),
        "expert_alignment": lambda: buf.dispatch(x, idx, w, E, expert_alignment=0),
        "num_sms per call": lambda: buf.dispatch(x, idx, w, E, num_sms=0),
        "layout of another routing": lambda: buf.dispatch(
            x, idx, w, E, layout=buf.get_dispatch_layout(idx[:2].contiguous(), E)
        ),
        "handle from another buffer": lambda: buf.combine(out.x, other_out.handle),
        "handle for another routing": lambda: buf.dispatch(x, idx, w, E, handle=other_routing.handle),
        "handle after routing rewritten in place": rewritten_in_place,
        "handle type": lambda: buf.combine(out.x, "handle"),
        "combine rows": lambda: buf.combine(out.x[:-1].contiguous(), out.handle),
        "combine dtype": lambda: buf.combine(out.x.float(), out.handle),
        "previous_event type": lambda: buf.dispatch(x, idx, w, E, previous_event=object()),
        "layout num_experts": lambda: buf.get_dispatch_layout(idx, 3),
        "buffer backend": lambda: commkit.Buffer(backend="mpi"),
        "buffer timeout": lambda: commkit.Buffer(timeout_s=0),
        "buffer timeout inf": lambda: commkit.Buffer(timeout_s=float("inf")),
        "x pair length": lambda: buf.dispatch((*fp8(x), x), idx, w, E),
        "x pair with bf16 data": lambda: buf.dispatch((x, fp8(x)[1]), idx, w, E),
        "topk_idx no slots": lambda: buf.dispatch(x, idx[:, :0].contiguous(), w[:, :0].contiguous(), E),
        "topk_idx 1-D": lambda: buf.dispatch(x, idx[:, 0].contiguous(), w, E),
        "topk_idx not a tensor": lambda: buf.dispatch(x, idx.tolist(), w, E),
        "layout type": lambda: buf.dispatch(x, idx, w, E, layout={}),
        "dispatch with another buffer's handle": lambda: buf.dispatch(x, idx, w, E, handle=other_out.handle),
        "cast_to_fp8 of fp8": lambda: buf.dispatch(fp8(x), idx, w, E, cast_to_fp8=True),
        "cast_to_fp8 hidden": lambda: buf.dispatch(x, idx, w, E, cast_to_fp8=True),
        "num_worst_tokens": lambda: buf.dispatch(x, idx, w, E, num_worst_tokens=-1),
        "num_sms type": lambda: buf.dispatch(x, idx, w, E, num_sms=2.5),
        "buffer num_sms": lambda: commkit.Buffer(num_sms=0),
        # NOTE: one node of CPU processes runs the kernels' host execution; several nodes need GPUs
        "buffer kernels without GPU": lambda: commkit.Buffer(backend="kernels", num_ranks_per_node=1),
    }


EXPECTED = {
    "x dtype": (TypeError, "x: expected dtype torch.bfloat16, got torch.float32"),
    "x dims": (ValueError, "x: expected 2 dimensions"),
    "x contiguity": (ValueError, "x: expected a contiguous tensor"),
    "x hidden bytes": (ValueError, "multiple of 16 bytes, got H=12 (24 bytes)"),
    "fp8 without scales": (TypeError, "(fp8 tensor, scales) pair"),
    "scales shape": (ValueError, "x[1] (scales): expected shape (6, 1)"),
    "scales dtype": (TypeError, "x[1] (scales): expected dtype torch.float32"),
    "fp8 hidden bytes": (ValueError, "got H=40 (40 bytes)"),
    "topk_idx dtype": (TypeError, "topk_idx: expected dtype torch.int64, got torch.int32"),
    "topk_idx too large": (ValueError, "topk_idx: expected values in [-1, 8) (-1: slot unused), got 8"),
    "topk_idx below -1": (ValueError, "got -2"),
    "topk_idx rows": (ValueError, "topk_idx: expected 6 rows, one per token of x, got 5"),
    "topk_weights shape": (ValueError, "topk_weights: expected shape (6, 2)"),
    "topk_weights dtype": (TypeError, "topk_weights: expected dtype torch.float32, got torch.float64"),
    "num_experts not multiple of ranks": (
        ValueError,
        "num_experts: expected a multiple of the number of ranks (2), got 9",
    ),
    "num_experts zero": (ValueError, "num_experts: expected an int >= 1, got 0"),
    "expert_alignment": (ValueError, "expert_alignment: expected an int >= 1, got 0"),
    "num_sms per call": (ValueError, "num_sms: expected an int >= 1, got 0"),
    "layout of another routing": (ValueError, "layout: expected is_token_in_rank of shape (6, 2)"),
    "handle from another buffer": (ValueError, "handle: expected a handle made by this Buffer"),
    "handle for another routing": (ValueError, "handle: expected a handle made for the same topk_idx"),
    "handle after routing rewritten in place": (
        ValueError,
        "handle: expected a handle made for the same topk_idx",
    ),
    "handle type": (TypeError, "handle: expected a commkit Handle from Buffer.dispatch, got str"),
    "combine rows": (ValueError, "rows (those received by the dispatch), got"),
    "combine dtype": (TypeError, "x: expected dtype torch.bfloat16, got torch.float32"),
    "previous_event type": (TypeError, "previous_event: expected a commkit EventHandle"),
    "layout num_experts": (ValueError, "num_experts: expected a multiple of the number of ranks (2), got 3"),
    "buffer backend": (ValueError, "backend: expected one of ('auto', 'torch', 'kernels'), got 'mpi'"),
    "buffer timeout": (ValueError, "timeout_s: expected a positive number of seconds up to 86400, got 0"),
    "buffer timeout inf": (ValueError, "got inf"),
    "x pair length": (
        ValueError,
        "x: expected a bf16 tensor or an (fp8 tensor, scales) pair, got a sequence of 3",
    ),
    "x pair with bf16 data": (TypeError, "x[0]: expected dtype torch.float8_e4m3fn, got torch.bfloat16"),
    "topk_idx no slots": (ValueError, "topk_idx: expected at least one top-k slot"),
    "topk_idx 1-D": (ValueError, "topk_idx: expected 2 dimensions, got shape (6,)"),
    "topk_idx not a tensor": (TypeError, "topk_idx: expected a torch.Tensor, got list"),
    "layout type": (TypeError, "layout: expected a commkit Layout from get_dispatch_layout, got dict"),
    "dispatch with another buffer's handle": (ValueError, "handle: expected a handle made by this Buffer"),
    "cast_to_fp8 of fp8": (ValueError, "cast_to_fp8: expected bf16 x (the dispatch casts it)"),
    "cast_to_fp8 hidden": (
        ValueError,
        "x: expected a hidden size that is a multiple of 128 with cast_to_fp8, got H=32",
    ),
    "num_worst_tokens": (ValueError, "num_worst_tokens: expected an int >= 0, got -1"),
    "num_sms type": (TypeError, "num_sms: expected an int, got 2.5 (float)"),
    "buffer num_sms": (ValueError, "num_sms: expected an int >= 1, got 0"),
    "buffer kernels without GPU": (commkit.ConfigError, "backend: 'kernels' cannot run here"),
}


def collect_errors(rank: int, world: int) -> dict[str, tuple[str, str]]:
    buf = commkit.Buffer(backend="torch", timeout_s=30)
    other = commkit.Buffer(backend="torch", timeout_s=30)
    found = {}
    for name, call in bad_calls(buf, other).items():
        try:
            call()
            found[name] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - the test compares the type
            found[name] = (type(err).__name__, str(err))
    return found


@pytest.fixture(scope="module")
def errors() -> list[dict[str, tuple[str, str]]]:
    return spawn_gloo(collect_errors, 2, timeout_s=120)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_error_names_argument_expectation_and_value(errors, name: str) -> None:
    cls, text = EXPECTED[name]
    for per_rank in errors:
        got_cls, message = per_rank[name]
        assert got_cls == cls.__name__, f"{name}: raised {got_cls}: {message}"
        assert text in message, f"{name}: message {message!r} lacks {text!r}"


def test_buffer_needs_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="group: expected an initialised torch.distributed process group"):
        commkit.Buffer()


TIMEOUT_S = 3.0


def peer_dies_or_hangs(rank: int, world: int, mode: str) -> tuple[str, str, float]:
    buf = commkit.Buffer(backend="torch", timeout_s=TIMEOUT_S)
    x, idx, w = good()
    out = buf.dispatch(x, idx, w, E)
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(TIMEOUT_S + 8)  # alive, never arrives
        os._exit(0)
    start = time.monotonic()
    try:
        if mode == "dies":
            time.sleep(0.5)  # let the peer go first
        buf.combine(out.x, out.handle)
        return "no error", "", time.monotonic() - start
    except Exception as err:  # noqa: BLE001
        return type(err).__name__, str(err), time.monotonic() - start


@pytest.mark.parametrize("mode", ["dies", pytest.param("hangs", marks=pytest.mark.slow)])
def test_peer_that_never_arrives_raises_within_timeout(mode: str) -> None:
    got = spawn_gloo(peer_dies_or_hangs, 2, mode, timeout_s=60, allow_failures=True)
    assert isinstance(got[1], RankFailed)
    cls, message, elapsed = got[0]
    # every call first agrees over the group (its operation, sequence and format): the wait is there
    assert "phase 'combine: agreement'" in message, message
    assert "rank 0 of 2" in message
    if mode == "hangs":
        assert cls == "CommTimeoutError", message
        assert issubclass(commkit.CommTimeoutError, TimeoutError)
        assert elapsed >= TIMEOUT_S - 0.5, f"gave up after {elapsed:.1f} s, timeout_s={TIMEOUT_S}"
    else:
        assert cls == "CommError", message
        assert "a peer may have died" in message
    assert elapsed < TIMEOUT_S + 5, f"waited {elapsed:.1f} s for a peer, timeout_s={TIMEOUT_S}"


def disagreeing_ranks(rank: int, world: int, what: str) -> tuple[str, str]:
    buf = commkit.Buffer(backend="torch", timeout_s=20)
    x, idx, w = good()
    num_experts = E
    if what == "num_experts" and rank == 1:
        num_experts, idx = 2 * E, torch.where(idx >= 0, idx * 2, -1)
    if what == "hidden" and rank == 1:
        x = torch.randn(T, 2 * H).to(torch.bfloat16)
    try:
        buf.dispatch(x, idx, w, num_experts)
        return "no error", ""
    except Exception as err:  # noqa: BLE001
        return type(err).__name__, str(err)


@pytest.mark.parametrize("what", ["num_experts", "hidden"])
def test_ranks_that_disagree_get_an_error_not_garbage(what: str) -> None:
    got = spawn_gloo(disagreeing_ranks, 2, what, timeout_s=60)
    for rank, (cls, message) in enumerate(got):
        assert cls == "ValueError", message
        assert "dispatch: the ranks disagree" in message and "expected every rank to pass the same" in message
        assert f"differs: {what}" in message
        assert f"from rank {1 - rank}" in message
