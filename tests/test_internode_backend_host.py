"""``Buffer(backend="kernels")`` over a group told it spans several nodes builds the internode kernels
backend, one rank per gloo process; with the kernel launches replaced by CPU stand-ins of their
contract (tests/group_fake_kernels.py) its dispatch, cached dispatch, num_worst_tokens dispatch and
two-level combine equal the node-aware reference bit for bit. This checks the host side that a real
multi-node run uses (node groups, process-group count exchange and barriers, forwarder record sizes,
handles), not the kernels (tests/gpu/test_internode_gpu.py; the protocol model)."""

from __future__ import annotations

import itertools

import pytest
import torch
from cases import Case, bits, expert_output, make_inputs
from test_torch_backend import check_dispatch, rescaled

import commkit
from commkit.launch import spawn_gloo
from commkit.reference import combine_reference, dispatch_reference, layout_reference

FIELDS = ("x", "x_scales", "topk_idx", "topk_weights", "num_tokens_per_expert")


def cases_for(world: int, per_node: int) -> list[Case]:
    g: dict = dict(num_experts=4 * world, ranks_per_node=per_node)
    return [
        Case("uniform", (24,) * world, seed=1, **g),
        Case(
            "odd-unused",
            tuple(5 + 3 * r for r in range(world)),
            hidden=72,
            num_topk=3,
            unused=0.3,
            seed=2,
            **g,
        ),
        Case("empty-node", (16,) * world, empty_node=world // per_node - 1, seed=4, **g),
        Case("zero-token-node", (0,) * per_node + (11,) * (world - per_node), seed=7, **g),
        Case("fp8-aligned", (13,) * world, hidden=128, fp8=True, expert_alignment=4, seed=10, **g),
        # One source spreads its tokens over another node's GPUs: its forwarder there gets more tokens
        # than any GPU of that node receives (the G x num_worst_tokens bound of the records)
        Case("one-source", (40,) + (0,) * (world - 1), num_topk=1, empty_node=0, seed=12, **g),
    ]


def worst_rows(case: Case, world: int) -> int:
    """num_worst_tokens = the most rows any rank receives (tight)."""
    inputs = [make_inputs(case, r) for r in range(world)]
    xs = [inp[0][0] if case.fp8 else inp[0] for inp in inputs]
    ref = dispatch_reference(xs, [inp[1] for inp in inputs], [inp[2] for inp in inputs], case.num_experts)
    return max(1, max(d.x.shape[0] for d in ref))


def _run(rank: int, world: int, per_node: int) -> dict:
    from group_fake_kernels import install_group_fakes

    fk = install_group_fakes()
    buf = commkit.Buffer(backend="kernels", timeout_s=60, num_ranks_per_node=per_node)
    results = []
    for case in cases_for(world, per_node):
        x, topk_idx, weights = make_inputs(case, rank)
        kw = dict(expert_alignment=case.expert_alignment, num_sms=2)
        layout = buf.get_dispatch_layout(topk_idx, case.num_experts)
        out = buf.dispatch(x, topk_idx, weights, case.num_experts, layout=layout, **kw)
        y = buf.combine(expert_output(out.x.to(torch.bfloat16), rank), out.handle, num_sms=2)
        again = buf.dispatch(rescaled(x), topk_idx, weights, case.num_experts, handle=out.handle, **kw)
        y_again = buf.combine(expert_output(again.x.to(torch.bfloat16), rank), again.handle, num_sms=2)
        # num_worst_tokens: nothing read back; the first N_recv rows are the dispatch's
        worst = worst_rows(case, world)
        w = buf.dispatch(x, topk_idx, weights, case.num_experts, num_worst_tokens=worst, **kw)
        w_x = expert_output(w.x.to(torch.bfloat16), rank)
        y_worst = buf.combine(w_x, w.handle, num_sms=2)
        w_again = buf.dispatch(x, topk_idx, weights, case.num_experts, handle=w.handle,
                               num_worst_tokens=worst, **kw)  # fmt: skip
        results.append(
            dict(
                layout=layout,
                **{f: getattr(out, f) for f in FIELDS},
                y=y.x,
                cached={f: getattr(again, f) for f in FIELDS},
                y_again=y_again.x,
                worst={f: getattr(w, f) for f in FIELDS},
                worst_again_x=w_again.x,
                y_worst=y_worst.x,
            )
        )
    buf.close()
    from group_fake_kernels import FakeGinTransport

    compiled = {
        (h, name, tuple(kw.get("defines", ()))) for h, name, _, kw in fk.compiled if "internode" in name
    }
    return dict(
        cases=results,
        backend=type(buf._backend).__name__,
        per_node=buf.num_ranks_per_node,
        transports=(FakeGinTransport.made, FakeGinTransport.grown, FakeGinTransport.closed),
        transports_at=fk.transports_at,
        compiled=compiled,
    )


@pytest.mark.parametrize(
    ("world", "per_node"),
    [(4, 2), pytest.param(8, 4, marks=pytest.mark.slow), pytest.param(8, 2, marks=pytest.mark.slow)],
)
def test_internode_backend_host_logic(world: int, per_node: int) -> None:
    got = spawn_gloo(_run, world, per_node, timeout_s=300)
    assert all(g["backend"] == "InternodeKernelsBackend" and g["per_node"] == per_node for g in got)
    gdaki_only = ("-DNCCL_GIN_PROXY_ENABLE=0", "-DNCCL_GIN_GDAKI_ENABLE=1",
                  "-DNCCL_GIN_GPI_ENABLE=0", "-DNCCL_GIN_EFA_GDA_ENABLE=0")  # fmt: skip
    for g in got:
        # The GIN kernels, compiled for the transport's backend only
        assert {(h, d) for h, _, d in g["compiled"]} == {("csrc/internode_gin.cuh", gdaki_only)}
        # Made once, at construction (smallest window); the window grows (the communicator kept) only
        # when a dispatch's rows are larger than any before: never for a combine (dispatch sizes the
        # slots for both); closed once
        made, grown, closed = g["transports"]
        assert len(made) == 1 and made[0][0] == 132 and closed == 1, made
        assert grown and grown == sorted(set(grown)) and grown[0] > made[0][1], grown
        launches = [(k, n) for k, n in g["transports_at"] if k.startswith("internode")]
        for (kind, before), (after_kind, after) in itertools.pairwise(launches):
            if after_kind == "internode_combine_kernel":
                assert kind == "internode_dispatch_kernel" and after == before, launches
    for c, case in enumerate(cases_for(world, per_node)):
        inputs = [make_inputs(case, r) for r in range(world)]
        idxs, weights = [inp[1] for inp in inputs], [inp[2] for inp in inputs]
        for cached in (False, True):
            xs = [rescaled(inp[0]) if cached else inp[0] for inp in inputs]
            ref = dispatch_reference(
                [x[0] for x in xs] if case.fp8 else xs,
                idxs,
                weights,
                case.num_experts,
                x_scales=[x[1] for x in xs] if case.fp8 else None,
                expert_alignment=case.expert_alignment,
            )
            x_experts = [expert_output(d.x.to(torch.bfloat16), q) for q, d in enumerate(ref)]
            ys = combine_reference(x_experts, ref, list(case.tokens), per_node)
            for r in range(world):
                g, where = got[r]["cases"][c], f"case {case.name}, rank {r}, cached={cached}"
                check_dispatch(g["cached"] if cached else g, ref[r], case.fp8, where)
                assert torch.equal(bits(g["y_again" if cached else "y"]), bits(ys[r])), where
                if cached:
                    continue
                # num_worst_tokens: worst rows, the first N_recv valid, counts not read back
                wo, n = g["worst"], ref[r].x.shape[0]
                assert wo["x"].shape[0] == worst_rows(case, world) and wo["num_tokens_per_expert"] == [], (
                    where
                )
                assert torch.equal(bits(wo["x"][:n]), bits(ref[r].x)), where
                assert torch.equal(bits(g["worst_again_x"][:n]), bits(ref[r].x)), where
                assert torch.equal(wo["topk_idx"][:n], ref[r].topk_idx), where
                assert (wo["topk_idx"][n:] == -1).all() and (wo["topk_weights"][n:] == 0).all(), where
                assert torch.equal(bits(g["y_worst"]), bits(ys[r])), where
                lay = layout_reference(idxs[r], case.num_experts, world, per_node)
                for f in ("is_token_in_rank", "num_tokens_per_rank", "num_tokens_per_expert",
                          "is_token_in_node", "num_tokens_per_node"):  # fmt: skip
                    assert torch.equal(getattr(g["layout"], f), getattr(lay, f)), f"{where}: {f}"


def test_internode_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    from commkit.backends.internode_backend import internode_unavailable_reason
    from commkit.jit import nccl
    from commkit.tools.info import internode_status

    assert "at most 8 GPUs of a node" in str(internode_unavailable_reason(32, 16))
    assert "at most 32 ranks" in str(internode_unavailable_reason(64, 8))

    def missing(min_version=nccl.MIN_VERSION):  # noqa: ANN001, ANN202
        raise nccl.NcclHeadersError("no nccl.h found")

    monkeypatch.setattr(nccl, "find_headers", missing)
    assert (
        internode_unavailable_reason(16, 8)
        == "the inter-node hop needs NCCL's GIN device API: no nccl.h found"
    )
    assert internode_status(None).startswith("not usable: the inter-node hop needs NCCL's GIN device API")
    found = nccl.NcclHeaders(include_dir=nccl.Path("/x"), version=(2, 30, 5), origin="test")
    monkeypatch.setattr(nccl, "find_headers", lambda min_version=nccl.MIN_VERSION: found)
    assert internode_unavailable_reason(16, 8) is None
    assert internode_status(None).startswith("usable: GIN device API of NCCL 2.30.5 (test)")
    assert internode_status("no CUDA device").startswith("not usable: no CUDA device (GIN device API")


def _pick(rank: int, world: int) -> list[str]:
    """Without CUDA, "auto" over 2 nodes takes the two-level torch path; "kernels" says why not."""
    names = [type(commkit.Buffer(num_ranks_per_node=2)._backend).__name__]
    try:
        commkit.Buffer(backend="kernels", num_ranks_per_node=2)
    except commkit.errors.ConfigError as exc:
        names.append(str(exc))
    return names


def test_buffer_backend_choice_over_nodes() -> None:
    got = spawn_gloo(_pick, 4, timeout_s=60)
    for names in got:
        assert names[0] == "HierTorchBackend"
        assert names[1].startswith("backend: 'kernels' cannot run here: no CUDA device")


def test_gin_regions_split_between_ipc_buffers_and_window() -> None:
    """GIN: the IPC buffers hold the regions before the net ring; the window holds the net ring and
    the staging copy at offsets of its own; the NVLink offsets are the same in both layouts."""
    from commkit.backends import internode_layout as il
    from commkit.backends import kernels_layout as kl
    from commkit.backends.internode_net import grown_layout, window_layout
    from commkit.backends.symmetric import SymmetricBuffers

    class Buffers(SymmetricBuffers):
        def ensure(self, num_channels: int, slot_bytes: int) -> None:
            self.max_channels = max(num_channels, self.max_channels, 24)  # reserves 24 channels
            self.max_slot_bytes = max(slot_bytes, self.max_slot_bytes)

    for net_in_window in (False, True):
        bufs = Buffers()
        lay = grown_layout(bufs, 8, 4, 8, 14592, 14656, net_in_window=net_in_window)
        assert lay.max_channels == 24
        covered = kl.total_bytes(bufs.max_channels, bufs.max_slot_bytes)
        needed = lay.net_ring_offset if net_in_window else lay.total_bytes
        assert needed <= covered < needed + 24 * kl.MAX_RANKS * kl.NUM_SLOTS
    win = window_layout(lay)
    net_bytes = 24 * 4 * il.NET_SLOTS * 14656
    assert (win.net_ring_offset, win.net_stage_offset, win.total_bytes) == (0, net_bytes, 2 * net_bytes)
    assert (win.nvl_ring_offset, win.signals_offset) == (lay.nvl_ring_offset, lay.signals_offset)


def _gin_fails(rank: int, world: int) -> list[str]:
    """GIN cannot be set up on rank 1: "kernels" raises on every rank, "auto" falls back on every rank."""
    import os
    import warnings

    from group_fake_kernels import install_group_fakes

    install_group_fakes()
    out = []
    os.environ["FAKE_GIN_PREPARE_FAIL_RANKS"] = "2"  # the local step (library, layouts)
    try:
        commkit.Buffer(backend="kernels", num_ranks_per_node=2)
    except commkit.errors.ConfigError as exc:
        out.append(str(exc))
    os.environ["FAKE_GIN_PREPARE_FAIL_RANKS"] = ""
    os.environ["FAKE_GIN_FAIL_RANKS"] = "1"  # the collective step
    try:
        commkit.Buffer(backend="kernels", num_ranks_per_node=2)
    except commkit.errors.ConfigError as exc:
        out.append(str(exc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.append(type(commkit.Buffer(num_ranks_per_node=2)._backend).__name__)
    out.append(str(caught[0].message) if caught else "no warning")
    return out


def test_gin_setup_failure_is_agreed_by_every_rank() -> None:
    for prepare_error, error, backend, warning in spawn_gloo(_gin_fails, 4, timeout_s=60):
        assert prepare_error.startswith(
            "backend: the GIN transport could not be set up on ranks [2] (rank 2: "
        )
        assert "libnccl.so.2 next to the headers: not found (fake)" in prepare_error
        assert error.startswith("backend: the GIN transport could not be set up on ranks [1] (rank 1: ")
        assert "no GIN context (fake)" in error
        assert backend == "HierTorchBackend"
        assert warning.endswith("backend 'auto' takes the torch path") and "ranks [1]" in warning


def _disagreeing_ranks(rank: int, world: int) -> dict:
    """Rank 1 passes another hidden size (a larger row: its buffers would grow, a collective) or
    another num_experts: every rank raises ValueError before anything grows, and the group still
    works afterwards."""
    from group_fake_kernels import FakeGinTransport, install_group_fakes

    install_group_fakes()
    buf = commkit.Buffer(backend="kernels", timeout_s=60, num_ranks_per_node=2)
    case = Case("c", (16,) * world, num_experts=4 * world, ranks_per_node=2, seed=3)
    x, topk_idx, weights = make_inputs(case, rank)
    errors = []
    made_before = len(FakeGinTransport.made) + len(FakeGinTransport.grown)
    for bad in ("hidden", "num_experts"):
        xr, experts = x, case.num_experts
        if rank == 1 and bad == "hidden":
            xr = torch.cat([x, x], dim=1)
        if rank == 1 and bad == "num_experts":
            experts = 8 * world
        try:
            buf.dispatch(xr, topk_idx, weights, experts, num_sms=2)
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    grown = len(FakeGinTransport.made) + len(FakeGinTransport.grown) - made_before
    out = buf.dispatch(x, topk_idx, weights, case.num_experts, num_sms=2)
    try:  # a combine whose hidden differs on rank 1
        xe = out.x if rank != 1 else torch.cat([out.x, out.x], dim=1)
        buf.combine(xe, out.handle, num_sms=2)
        errors.append("no error")
    except ValueError as exc:
        errors.append(str(exc))
    y = buf.combine(out.x, out.handle, num_sms=2)
    buf.close()
    return dict(errors=errors, grown=grown, out=out.x, y=y.x)


def test_ranks_that_disagree_get_value_error_before_any_growth() -> None:
    world = 4
    got = spawn_gloo(_disagreeing_ranks, world, timeout_s=300)
    case = Case("c", (16,) * world, num_experts=4 * world, ranks_per_node=2, seed=3)
    inputs = [make_inputs(case, r) for r in range(world)]
    ref = dispatch_reference([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs], 16)
    ys = combine_reference([d.x for d in ref], ref, list(case.tokens), 2)
    for rank, g in enumerate(got):
        hidden, experts, combine = g["errors"]
        peer = 0 if rank == 1 else 1
        assert hidden.startswith("dispatch: expected every rank to pass the same call (op=dispatch"), hidden
        assert hidden.endswith(f"from rank {peer}") and "hidden=128" in hidden, hidden
        assert experts.startswith("dispatch: expected every rank") and experts.endswith(f"rank {peer}")
        assert combine.startswith("combine: expected every rank to pass the same call"), combine
        assert "got hidden from 64 to 128 across the ranks" in combine, combine
        assert g["grown"] == 0  # no rank grew its window for the row it alone asked for
        assert torch.equal(bits(g["out"]), bits(ref[rank].x)) and torch.equal(bits(g["y"]), bits(ys[rank]))


def _rows_do_not_fit_on_some_ranks(rank: int, world: int) -> dict:
    """A cached dispatch with a larger hidden (the buffers would grow: collective) and a
    num_worst_tokens that only some ranks' rows fit in: the ranks that fail their own check tell the
    others through the barrier, so every rank raises ValueError and none grows alone."""
    import torch.distributed as dist
    from group_fake_kernels import FakeGinTransport, install_group_fakes

    install_group_fakes()
    buf = commkit.Buffer(backend="kernels", timeout_s=20, num_ranks_per_node=2)
    case = Case("c", (16, 16, 16, 2), num_experts=4 * world, ranks_per_node=2, seed=3)
    x, topk_idx, weights = make_inputs(case, rank)
    out = buf.dispatch(x, topk_idx, weights, case.num_experts, num_sms=2)
    rows: list = [None] * world
    dist.all_gather_object(rows, out.x.shape[0])
    grown_before = len(FakeGinTransport.grown)
    try:
        buf.dispatch(torch.cat([x, x], dim=1), topk_idx, weights, case.num_experts, num_sms=2,
                     handle=out.handle, num_worst_tokens=min(rows))  # fmt: skip
        error = "no error"
    except ValueError as exc:
        error = str(exc)
    grown = len(FakeGinTransport.grown) - grown_before
    y = buf.combine(out.x, out.handle, num_sms=2)  # the group still works
    buf.close()
    return dict(rows=rows, error=error, grown=grown, y=y.x)


def test_rows_that_do_not_fit_stop_every_rank_before_growth() -> None:
    world = 4
    got = spawn_gloo(_rows_do_not_fit_on_some_ranks, world, timeout_s=300)
    case = Case("c", (16, 16, 16, 2), num_experts=4 * world, ranks_per_node=2, seed=3)
    inputs = [make_inputs(case, r) for r in range(world)]
    ref = dispatch_reference([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs], 16)
    ys = combine_reference([d.x for d in ref], ref, list(case.tokens), 2)
    rows = got[0]["rows"]
    assert len(set(rows)) > 1  # some ranks fit, some do not
    for rank, g in enumerate(got):
        if rows[rank] > min(rows):  # its own reason
            assert g["error"].startswith("num_worst_tokens: expected at least the"), g["error"]
        else:
            assert g["error"].startswith("cached dispatch: another rank receives more rows"), g["error"]
        assert g["grown"] == 0
        assert torch.equal(bits(g["y"]), bits(ys[rank]))


def _other_handle(rank: int, world: int) -> dict:
    """Two dispatches of the same rows per rank (B routes A's tokens in reverse order); rank 1 combines
    with A's handle, the others with B's: the handle is tied to its dispatch's sequence number."""
    from group_fake_kernels import install_group_fakes

    install_group_fakes()
    buf = commkit.Buffer(backend="kernels", timeout_s=60, num_ranks_per_node=2)
    case = Case("c", (16,) * world, num_experts=4 * world, ranks_per_node=2, seed=3)
    x, topk_idx, weights = make_inputs(case, rank)
    a = buf.dispatch(x, topk_idx, weights, case.num_experts, num_sms=2)
    b = buf.dispatch(x.flip(0), topk_idx.flip(0), weights.flip(0), case.num_experts, num_sms=2)
    try:
        buf.combine(b.x, a.handle if rank == 1 else b.handle, num_sms=2)
        error = "no error"
    except ValueError as exc:
        error = str(exc)
    y = buf.combine(b.x, b.handle, num_sms=2)  # the group still works
    buf.close()
    return dict(error=error, same_rows=a.x.shape == b.x.shape, y=y.x)


def test_a_combine_with_another_dispatchs_handle_raises_on_every_rank() -> None:
    world = 4
    case = Case("c", (16,) * world, num_experts=4 * world, ranks_per_node=2, seed=3)
    inputs = [make_inputs(case, r) for r in range(world)]
    ref = dispatch_reference([i[0].flip(0) for i in inputs], [i[1].flip(0) for i in inputs],
                             [i[2].flip(0) for i in inputs], 16)  # fmt: skip
    ys = combine_reference([d.x for d in ref], ref, list(case.tokens), 2)
    for rank, g in enumerate(spawn_gloo(_other_handle, world, timeout_s=300)):
        assert g["same_rows"]
        assert g["error"].startswith("combine: expected every rank to pass the same call"), g["error"]
        assert "got handle from" in g["error"], g["error"]
        assert torch.equal(bits(g["y"]), bits(ys[rank]))
