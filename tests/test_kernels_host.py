"""CPU: the host side of the kernels backend (commkit.emulate + KernelEngine) with CPU stand-ins.

The kernels cannot run here, so each launch is executed by a small torch function that follows the
kernel's documented contract (inputs, ``meta`` layout, ``send_pos``, row placement); CUDA streams and
events are replaced by no-ops. This checks the Python around the kernels: packing of the ranks'
inputs, output sizes and slices, handles, cached dispatch, ``num_worst_tokens``, expert counts and
alignment, combine packing, against ``commkit.reference``. The kernels themselves are checked by the
GPU tests and, for their protocol, by ``test_protocol_model.py``.
"""

from __future__ import annotations

import pytest
import torch
from fake_kernels import FakeKernels  # the `fake` fixture is registered in conftest.py

from commkit import reference
from commkit.backends import kernels as kmod
from commkit.fp8 import cast_to_fp8


def _inputs(tokens, hidden, num_topk, num_experts, seed, unused=0.0):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for num_tokens in tokens:
        xs.append((torch.randn(num_tokens, hidden, generator=gen) * 2).to(torch.bfloat16))
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        idx = (
            scores.topk(num_topk, dim=1).indices
            if num_tokens
            else torch.empty(0, num_topk, dtype=torch.int64)
        )
        idx = torch.where(torch.rand(num_tokens, num_topk, generator=gen) < unused, -1, idx)
        idxs.append(idx.to(torch.int64).contiguous())
        ws.append(torch.rand(num_tokens, num_topk, generator=gen))
    return xs, idxs, ws


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(
        {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float8_e4m3fn: torch.uint8}.get(
            t.dtype, t.dtype
        )
    )


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "cast"])
@pytest.mark.parametrize("worst", [False, True])
def test_emulated_group_host_logic(fake: FakeKernels, dtype: str, worst: bool) -> None:
    from commkit.emulate import EmulatedGroup

    tokens, hidden, num_topk, num_experts, align = (37, 0, 12, 5), 256, 3, 8, 4
    xs, idxs, ws = _inputs(tokens, hidden, num_topk, num_experts, seed=1, unused=0.2)
    scales = None
    if dtype == "fp8":
        pairs = [cast_to_fp8(x) for x in xs]
        xs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    ref_xs, ref_scales = (
        (xs, scales)
        if dtype != "cast"
        else ([cast_to_fp8(x)[0] for x in xs], [cast_to_fp8(x)[1] for x in xs])
    )
    want = reference.dispatch_reference(
        ref_xs, idxs, ws, num_experts, x_scales=ref_scales, expert_alignment=align
    )

    group = EmulatedGroup(4, num_sms=3, device="cpu")
    worst_rows = sum(tokens) if worst else None
    outs = None
    for round_idx in range(2):  # the second round reuses the handles
        outs = group.dispatch(
            xs,
            idxs,
            ws,
            num_experts,
            x_scales=scales,
            cast_to_fp8=dtype == "cast",
            handles=[o.handle for o in outs] if outs else None,
            expert_alignment=align,
            num_worst_tokens=worst_rows,
        )
        expected_launches = ["cached_notify_kernel"] if round_idx else ["layout_kernel", "notify_kernel"]
        assert fake.launches[-2 - (round_idx == 0) :] == [*expected_launches, "dispatch_kernel"]
        for r, (o, w) in enumerate(zip(outs, want, strict=True)):
            n = w.x.shape[0]
            assert o.x.shape[0] == (worst_rows if worst else n)
            assert torch.equal(_bits(o.x[:n]), _bits(w.x)), r
            assert torch.equal(o.topk_idx[:n], w.topk_idx), r
            assert torch.equal(_bits(o.topk_weights[:n]), _bits(w.topk_weights)), r
            if w.x_scales is not None:
                assert torch.equal(_bits(o.x_scales[:n]), _bits(w.x_scales)), r
            assert o.num_tokens_per_expert == ([] if worst else w.num_tokens_per_expert), r
            assert o.handle.num_tokens == tokens[r]

    ys = [(torch.randn(o.x.shape[0], hidden) * (r + 1)).to(torch.bfloat16) for r, o in enumerate(outs)]
    want_y = reference.combine_reference(
        [y[: w.x.shape[0]] for y, w in zip(ys, want, strict=True)], want, list(tokens)
    )
    got = group.combine(ys, [o.handle for o in outs])
    assert fake.launches[-2:] == ["cached_notify_kernel", "combine_kernel"]
    for s, (g, w) in enumerate(zip(got, want_y, strict=True)):
        assert torch.equal(_bits(g.x), _bits(w)), s


def test_layout_host_logic(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup

    xs, idxs, _ = _inputs((9, 4, 0), 64, 2, 6, seed=2)
    got = EmulatedGroup(3, num_sms=1, device="cpu").get_dispatch_layout(idxs, 6)
    for r, g in enumerate(got):
        w = reference.layout_reference(idxs[r], 6, 3)
        assert torch.equal(g.num_tokens_per_rank, w.num_tokens_per_rank)
        assert torch.equal(g.num_tokens_per_expert, w.num_tokens_per_expert)
        assert torch.equal(g.is_token_in_rank, w.is_token_in_rank)


def test_budget_and_shape_checks(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup
    from commkit.errors import ConfigError

    xs, idxs, ws = _inputs((8, 8), 64, 2, 4, seed=3)
    group = EmulatedGroup(2, num_sms=100, device="cpu")  # 200 blocks on 132 SMs x 1
    with pytest.raises(ConfigError, match=r"resident at once.*num_sms <= 66"):
        group.dispatch(xs, idxs, ws, 4)
    with pytest.raises(ConfigError, match="H % 128"):
        EmulatedGroup(2, num_sms=1, device="cpu").dispatch(xs, idxs, ws, 4, cast_to_fp8=True)
    with pytest.raises(ValueError, match="one entry per rank"):
        group.dispatch(xs[:1], idxs, ws, 4)


def test_spawn_runs_per_rank_code(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup

    tokens, hidden, num_experts = (21, 3, 0), 128, 6
    xs, idxs, ws = _inputs(tokens, hidden, 2, num_experts, seed=4)
    want = reference.dispatch_reference(xs, idxs, ws, num_experts)
    group = EmulatedGroup(3, num_sms=2, device="cpu")

    def per_rank(backend):
        r = backend.rank
        layout = backend.get_dispatch_layout(idxs[r], num_experts)
        out = backend.dispatch(
            xs[r],
            None,
            idxs[r],
            ws[r],
            num_experts,
            layout=layout,
            handle=None,
            expert_alignment=1,
            num_sms=2,
            previous_event=None,
            async_finish=False,
            buffer_id=1234,
        )
        y = backend.combine(out.x, out.handle, num_sms=2, previous_event=None, async_finish=False)
        return layout, out, y

    results = group.spawn(per_rank)
    want_y = reference.combine_reference([w.x for w in want], want, list(tokens))
    for r, (layout, out, y) in enumerate(results):
        assert torch.equal(
            layout.is_token_in_rank, reference.layout_reference(idxs[r], num_experts, 3).is_token_in_rank
        )
        assert torch.equal(_bits(out.x), _bits(want[r].x)) and out.handle.buffer_id == 1234
        assert torch.equal(_bits(y.x), _bits(want_y[r]))


def test_spawn_reports_mismatched_calls(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup

    xs, idxs, ws = _inputs((4, 4), 64, 1, 2, seed=5)
    group = EmulatedGroup(2, num_sms=1, device="cpu", timeout_s=5.0)

    def per_rank(backend):
        if backend.rank == 0:
            return backend.get_dispatch_layout(idxs[0], 2)
        raise ValueError("rank 1 fails before the collective")

    with pytest.raises(ValueError, match="rank 1 fails"):
        group.spawn(per_rank)
    # The group stays usable
    assert len(group.spawn(lambda b: b.get_dispatch_layout(idxs[b.rank], 2))) == 2


def test_kernels_backend_single_rank_glue(
    fake: FakeKernels, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        _single_rank_glue(monkeypatch)
    finally:
        dist.destroy_process_group()


def _single_rank_glue(monkeypatch: pytest.MonkeyPatch) -> None:
    from commkit.types import EventHandle

    def ensure(self, num_channels, slot_bytes):
        self.max_channels, self.max_slot_bytes = max(num_channels, self.max_channels), slot_bytes
        self.peer_bases = torch.zeros(1, dtype=torch.int64)

    monkeypatch.setattr(kmod.IpcBuffers, "ensure", ensure)
    monkeypatch.setattr(kmod.KernelsBackend, "_begin", lambda self, ev: None)
    monkeypatch.setattr(kmod.KernelsBackend, "_end", lambda self, caller, a, i, o: EventHandle(None))
    backend = kmod.KernelsBackend(None, timeout_s=5.0, device=torch.device("cpu"))
    xs, idxs, ws = _inputs((50,), 128, 4, 8, seed=6, unused=0.3)
    want = reference.dispatch_reference(xs, idxs, ws, 8, expert_alignment=8)
    kwargs = dict(
        layout=None, expert_alignment=8, num_sms=2, previous_event=None, async_finish=False, buffer_id=7
    )
    out = backend.dispatch(xs[0], None, idxs[0], ws[0], 8, handle=None, **kwargs)
    again = backend.dispatch(xs[0], None, idxs[0], ws[0], 8, handle=out.handle, **kwargs)
    for o in (out, again):
        assert torch.equal(_bits(o.x), _bits(want[0].x)) and torch.equal(o.topk_idx, want[0].topk_idx)
        assert o.num_tokens_per_expert == want[0].num_tokens_per_expert
    y = backend.combine(out.x, out.handle, num_sms=2, previous_event=None, async_finish=False)
    assert torch.equal(_bits(y.x), _bits(reference.combine_reference([want[0].x], want, [50])[0]))
    layout = backend.get_dispatch_layout(idxs[0], 8)
    assert torch.equal(
        layout.num_tokens_per_expert, reference.layout_reference(idxs[0], 8, 1).num_tokens_per_expert
    )


def test_buffer_over_virtual_ranks_runs_the_demo(fake: FakeKernels) -> None:
    """Buffer.from_backend over virtual ranks: the demo's per-rank code, with the API's checks."""
    import threading

    import commkit
    from commkit.demo import DemoConfig, run_rank, summarize
    from commkit.emulate import EmulatedGroup

    cfg = DemoConfig(ranks=3, tokens=40, hidden=128, ffn=64, experts=6, topk=2, iters=2)
    group = EmulatedGroup(cfg.ranks, num_sms=2, device="cpu")
    lineup = threading.Barrier(cfg.ranks)

    def rank_fn(virtual_rank):
        buf = commkit.Buffer.from_backend(virtual_rank, num_sms=2)
        assert buf.backend == "kernels" and buf.config.source == "argument"
        with pytest.raises(ValueError, match="num_experts: expected a multiple of the number of ranks"):
            buf.dispatch(torch.zeros(4, 128, dtype=torch.bfloat16), torch.zeros(4, 2, dtype=torch.int64),
                         torch.zeros(4, 2), 4)  # fmt: skip
        return run_rank(virtual_rank.rank, cfg.ranks, cfg, buf, lineup.wait)

    row = summarize(cfg, group.spawn(rank_fn))
    assert row["ok"] and row["backend"] == "kernels", row


def test_handles_check_token_counts(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup

    xs, idxs, ws = _inputs((6, 5), 64, 2, 4, seed=7)
    group = EmulatedGroup(2, num_sms=1, device="cpu")
    outs = group.dispatch(xs, idxs, ws, 4)
    xs2, idxs2, ws2 = _inputs((6, 4), 64, 2, 4, seed=8)
    with pytest.raises(
        ValueError, match=r"xs: expected token counts \[6, 5\] .* handles' dispatch, got \[6, 4\]"
    ):
        group.dispatch(xs2, idxs2, ws2, 4, handles=[o.handle for o in outs])
    with pytest.raises(ValueError, match=r"handles: expected the handles of ranks \[0, 1\] in order"):
        group.dispatch(xs, idxs, ws, 4, handles=[o.handle for o in reversed(outs)])


def test_adjacent_inputs_are_not_copied(fake: FakeKernels) -> None:
    from commkit.emulate import _cat_rows

    base = torch.randn(10, 16).to(torch.bfloat16)
    parts = [base[:3], base[3:3], base[3:10]]
    view = _cat_rows(parts)
    assert view.data_ptr() == base.data_ptr() and torch.equal(view, base)
    fp8 = base.to(torch.float8_e4m3fn)
    assert _cat_rows([fp8[:4], fp8[4:]]).data_ptr() == fp8.data_ptr()
    gapped = _cat_rows([base[:3], base[4:]])  # not adjacent: a copy
    assert gapped.data_ptr() != base.data_ptr() and gapped.shape == (9, 16)
    other = torch.randn(7, 16).to(torch.bfloat16)
    assert torch.equal(_cat_rows([base[:3], other]), torch.cat([base[:3], other]))


def test_offsets_are_cached_per_counts(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup

    xs, idxs, ws = _inputs((6, 5), 64, 2, 4, seed=9)
    group = EmulatedGroup(2, num_sms=1, device="cpu")
    group.dispatch(xs, idxs, ws, 4, num_worst_tokens=11)
    cached = dict(group.engine._offsets_cache)
    group.dispatch(xs, idxs, ws, 4, num_worst_tokens=11)
    assert group.engine._offsets_cache.keys() == cached.keys()
    assert all(group.engine._offsets_cache[k] is v for k, v in cached.items())
    assert group.kernel_events == {}  # not recorded on CPU


def test_spawn_checks_same_arguments(fake: FakeKernels) -> None:
    from commkit.emulate import EmulatedGroup

    xs, idxs, ws = _inputs((4, 4), 64, 1, 2, seed=10)
    group = EmulatedGroup(2, num_sms=2, device="cpu")

    def per_rank(backend):
        r = backend.rank
        try:
            backend.dispatch(xs[r], None, idxs[r], ws[r], 2, expert_alignment=1, num_sms=1 + r)
        except ValueError as exc:
            return str(exc)
        return None

    messages = group.spawn(per_rank)
    assert all(m is not None and "num_sms: expected the same value" in m and "[1, 2]" in m for m in messages)


def test_spawn_names_the_failed_rank(fake: FakeKernels) -> None:
    import threading

    from commkit.emulate import EmulatedGroup
    from commkit.errors import CommError

    xs, idxs, ws = _inputs((4, 4), 64, 1, 2, seed=11)
    group = EmulatedGroup(2, num_sms=1, device="cpu", timeout_s=30.0)
    seen: list[str] = []
    waiting = threading.Event()

    def per_rank(backend):
        if backend.rank == 1:
            waiting.wait(5.0)
            raise KeyError("boom")
        waiting.set()
        try:
            backend.get_dispatch_layout(idxs[0], 2)
        except CommError as exc:
            seen.append(str(exc))
            raise

    with pytest.raises(KeyError):
        group.spawn(per_rank)
    assert len(seen) == 1 and "virtual rank 1 failed" in seen[0] and "KeyError" in seen[0], seen
    assert "30s" not in seen[0]
