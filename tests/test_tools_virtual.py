"""CPU: ``bench``/``tune`` on virtual ranks (``--virtual``), with the kernel launches replaced by the CPU
stand-ins of ``tests/fake_kernels.py`` (``fake`` fixture) and ``EmulatedGroup(device="cpu")``.

Checks the wiring, not speed: the per-rank code runs on 3 virtual ranks end to end, every run is checked
(#wrong 0), rows are marked virtual where the performance model looks for them, the torch-ops baseline
is computed and checked, and ``tune`` keys its profile the way ``Buffer.from_backend`` looks it up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from virtual_bench import CPU, SHAPE, virtual_spec

import commkit.cli.bench as cli_bench
import commkit.tools.bench as tools_bench
from commkit import reference
from commkit.__main__ import main
from commkit.errors import ConfigError
from commkit.fp8 import cast_to_fp8
from commkit.model.emulated import load_emulated_runs
from commkit.profiles import ClusterSignature, Profile, cluster_signature, save_profile
from commkit.tools import torch_ops
from commkit.tools.bench import BenchSpec, bench_virtual
from commkit.tools.payload import token_in_rank
from commkit.tools.ranks import run_virtual
from commkit.tools.tune import (
    ROLE_KNOBS,
    TuneSpec,
    choose,
    choose_roles,
    comm_time_by_budget,
    make_profile,
    tune_virtual,
)


def _spec(**kw: object) -> BenchSpec:
    return virtual_spec(**{"dtypes": ["bf16", "fp8"], "num_input_sets": 2, **kw})


def test_bench_on_virtual_ranks(fake, profiles: Path) -> None:
    rows = bench_virtual(3, _spec(), timeout_s=30.0, device=CPU)
    assert [(r.op, r.dtype) for r in rows] == [
        ("dispatch", "bf16"), ("combine", "bf16"), ("dispatch", "fp8"), ("combine", "bf16")
    ]  # fmt: skip
    assert "dispatch_kernel" in fake.launches and "combine_kernel" in fake.launches
    for r in rows:
        assert r.virtual is True and r.ranks == 3 and r.nodes == 1 and r.backend == "kernels"
        assert r.wrong == 0, r
        assert r.num_sms == 2 and r.num_sms_source == "argument"
        assert 0 < r.time.min_s <= r.time.median_s <= r.time.max_s
        # The torch-ops baseline ran on the same device, was checked, and gives the ratio.
        assert r.vs_torch_baseline == "torch-ops" and r.torch_wrong == 0
        assert r.vs_torch == pytest.approx(r.torch_time_median_s / r.time.median_s)
        assert "torch ops on the same GPU" in r.vs_torch_note
        assert r.vs_roofline is None and "CUDA" in r.vs_roofline_note


def test_bench_virtual_default_budget_and_no_baseline(fake, profiles: Path) -> None:
    rows = bench_virtual(3, _spec(dtypes=["bf16"], num_sms=[None], baseline=False), device=CPU)
    for r in rows:
        assert r.wrong == 0 and r.num_sms == 20 and r.num_sms_source == "default"
        assert r.vs_torch is None and "disabled" in r.vs_torch_note


def test_bench_cli_virtual_writes_rows_the_model_reads(
    fake, profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench --virtual 2`` through the CLI (the GPU check bypassed, the group on CPU); the JSON's rows
    are the ones the performance model's loader of emulated runs (tests/test_model_validation.py) takes."""
    monkeypatch.setattr(cli_bench, "virtual_unavailable", lambda args: None)
    monkeypatch.setattr(
        tools_bench, "bench_virtual", functools.partial(tools_bench.bench_virtual, device=CPU)
    )
    out = tmp_path / "out"
    code = main(["bench", "--virtual", "2", "--shape", "ci-tiny", "--tokens", "13", "--reps", "2",
                 "--warmup", "1", "--input-sets", "1", "--num-sms", "2", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["spec"]["virtual"] == 2 and data["summary"]["total_wrong"] == 0
    assert all(r["virtual"] is True and r["ranks"] == 2 for r in data["rows"])
    runs = load_emulated_runs(out)
    assert sorted((run.phase, run.num_ranks, run.num_sms) for run in runs) == [
        ("combine", 2, 2), ("dispatch", 2, 2)
    ]  # fmt: skip
    by_phase = {run.phase: run.measured_us for run in runs}
    assert by_phase == {r["op"]: pytest.approx(r["time_median_s"] * 1e6) for r in data["rows"]}


def test_tune_on_virtual_ranks_keys_profile_for_from_backend(fake, profiles: Path) -> None:
    spec = TuneSpec(bench=_spec(dtypes=["bf16"]), candidates=[2, 3])
    result = tune_virtual(3, spec, device=CPU)
    assert result["backend"] == "kernels"
    assert {r.num_sms_requested for r in result["rows"]} == {2, 3}
    assert all(r.wrong == 0 and r.virtual for r in result["rows"])
    sig = ClusterSignature.from_dict(result["signature"])
    assert (sig.num_ranks, sig.num_ranks_per_node) == (3, 3)
    assert sig.device_name == cluster_signature().device_name
    choice = choose(comm_time_by_budget(result["rows"]), "fastest", None, 0.03)
    path = save_profile(make_profile(result, spec, choice), None)
    assert path.parent == profiles
    # A Buffer on 3 virtual ranks picks the profile up; on 2 it does not.
    configs = run_virtual(3, lambda ctx: ctx.make_buffer().config, device=CPU)
    assert configs[0].num_sms == choice.num_sms and configs[0].source == f"profile:{path}"
    assert run_virtual(2, lambda ctx: ctx.make_buffer().config, device=CPU)[0].source == "default"


def test_virtual_rank_context(fake) -> None:
    def per_rank(ctx):
        ctx.barrier()
        return (
            ctx.max_across(float(ctx.rank)),
            ctx.min_across(float(ctx.rank) + 1),
            ctx.sum_across(ctx.rank + 1),
            ctx.once(lambda: f"from {ctx.rank}"),
            ctx.collective_time(0.5 + ctx.rank),  # virtual: the shortest (the one launch)
            ctx.virtual,
            ctx.device,
        )

    assert run_virtual(3, per_rank, device=CPU) == [(2.0, 1.0, 6, "from 0", 0.5, True, CPU)] * 3


def test_virtual_rank_failure_does_not_hang(fake) -> None:
    def per_rank(ctx):
        if ctx.rank == 1:
            raise RuntimeError("rank 1 fails")
        ctx.barrier()
        return ctx.sum_across(1)

    with pytest.raises(RuntimeError, match="rank 1 fails"):
        run_virtual(3, per_rank, timeout_s=20.0, device=CPU)
    with pytest.raises(ConfigError, match="needs a process group"):
        run_virtual(2, lambda ctx: ctx.make_buffer("torch"), device=CPU)


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_torch_ops_match_reference(dtype: str) -> None:
    gen = torch.Generator().manual_seed(0)
    num_ranks, tokens, hidden, experts = 3, 17, 256, 6
    xs = [(torch.randn(tokens, hidden, generator=gen)).to(torch.bfloat16) for _ in range(num_ranks)]
    scales = None
    if dtype == "fp8":
        pairs = [cast_to_fp8(x) for x in xs]
        xs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    idxs = [torch.rand(tokens, experts, generator=gen).topk(2, dim=1).indices for _ in range(num_ranks)]
    idxs[0][3, 1] = -1  # an unused slot
    ws = [torch.rand(tokens, 2, generator=gen) for _ in range(num_ranks)]
    want = reference.dispatch_reference(xs, idxs, ws, experts, x_scales=scales)
    topk = torch.cat(idxs)
    dst_rows = torch_ops.destination_rows(token_in_rank(topk, experts, num_ranks))
    x_all = torch.cat([x.view(torch.uint8) for x in xs]).view(xs[0].dtype)
    got = torch_ops.dispatch_all(
        x_all, torch.cat(scales) if scales else None, topk, torch.cat(ws), dst_rows, experts
    )
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.x.view(torch.uint8), w.x.view(torch.uint8))
        assert torch.equal(g.topk_idx, w.topk_idx) and torch.equal(g.topk_weights, w.topk_weights)
        if scales:
            assert torch.equal(g.x_scales, w.x_scales)
    ys = [(torch.randn(w.x.shape[0], hidden, generator=gen)).to(torch.bfloat16) for w in want]
    want_y = reference.combine_reference(ys, want, [tokens] * num_ranks)
    got_y = torch_ops.combine_rows(ys, dst_rows, num_ranks * tokens)
    assert torch.equal(got_y.view(torch.int16), torch.cat(want_y).view(torch.int16))
    if dtype == "bf16":
        assert torch.equal(torch_ops.dispatch_combine(x_all, dst_rows), torch_ops.combine_rows(
            [g.x for g in got], dst_rows, num_ranks * tokens))  # fmt: skip


def test_virtual_option_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--virtual", "3", "--backend", "torch"]) != 0
    assert "needs a process group" in capsys.readouterr().err
    assert main(["tune", "--virtual", "0"]) != 0
    assert "positive number of virtual ranks" in capsys.readouterr().err


def test_bench_on_virtual_nodes(fake, profiles: Path) -> None:
    """--virtual 4 --ranks-per-node 2: two virtual nodes run the internode kernels, combine is checked
    against the two-level sum, and the rows count the bytes that cross nodes."""
    shape = SHAPE.with_(num_experts=8)
    rows = bench_virtual(
        4, _spec(shapes=[shape], dtypes=["bf16"], num_ranks_per_node=2), timeout_s=30.0, device=CPU
    )
    assert "internode_dispatch_kernel" in fake.launches and "internode_combine_kernel" in fake.launches
    assert "dispatch_kernel" not in fake.launches
    for r in rows:
        assert r.virtual is True and r.ranks == 4 and r.nodes == 2, r
        assert r.wrong == 0, r
        assert r.rdma_bytes > 0 and r.rdma_bytes < r.rdma_bytes_flat, r


def test_tune_sweeps_role_split_on_virtual_nodes(fake, profiles: Path) -> None:
    """tune over virtual nodes: after the budget, the forwarder warps are swept at the chosen budget
    and the best per op go into the profile's knobs, which a Buffer on those nodes applies."""
    shape = SHAPE.with_(num_experts=8)
    bench = _spec(shapes=[shape], dtypes=["bf16"], num_ranks_per_node=2)
    spec = TuneSpec(bench=bench, candidates=[2, 3], role_candidates=[2, 6])
    result = tune_virtual(4, spec, device=CPU)
    swept = {(r.op, r.knobs[ROLE_KNOBS[r.op]], r.num_sms_requested) for r in result["role_rows"]}
    choice = choose(comm_time_by_budget(result["rows"]), "fastest", None, 0.03)
    assert swept == {(op, w, choice.num_sms) for op in ("dispatch", "combine") for w in (2, 6)}, (
        [(r.op, r.num_sms, r.time.median_s) for r in result["rows"]],
        [(r.op, r.knobs, r.num_sms_requested) for r in result["role_rows"]],
        choice.num_sms,
    )
    assert all(r.wrong == 0 for r in result["role_rows"])
    compiled = {(name, targs[-1]) for _, name, targs, _ in fake.compiled if "internode" in name}
    assert {("internode_dispatch_kernel", 2), ("internode_combine_kernel", 6)} <= compiled
    profile = make_profile(result, spec, choice)
    assert set(profile.knobs) == set(ROLE_KNOBS.values()) and set(profile.knobs.values()) <= {2, 6}
    assert "role split: dispatch forwarder warps" in profile.reason
    save_profile(profile, None)
    # A Buffer on the same virtual nodes applies the knobs
    warps = run_virtual(
        4, lambda ctx: (ctx.make_buffer(), ctx.group.engine.dispatch_forwarder_warps)[1], device=CPU,
        num_ranks_per_node=2,
    )  # fmt: skip
    assert warps[0] == profile.knobs["internode_dispatch_forwarder_warps"]


def test_choose_roles_skips_wrong_and_partial_splits() -> None:
    def row(op, warps, shape, ms, wrong=0):  # noqa: ANN001, ANN202
        name = f"internode_{op}_forwarder_warps"
        return SimpleNamespace(
            op=op,
            shape=shape,
            dtype="bf16",
            knobs={name: warps},
            time=SimpleNamespace(median_s=ms / 1e3),
            wrong=wrong,
        )

    rows = [
        row("dispatch", 2, "a", 1.0, wrong=3), row("dispatch", 2, "b", 1.0),  # fastest, but wrong once
        row("dispatch", 4, "a", 3.0), row("dispatch", 4, "b", 3.0),
        row("dispatch", 6, "a", 2.0),  # fast, but not measured on shape b
        row("combine", 2, "a", 5.0), row("combine", 6, "a", 4.0),
    ]  # fmt: skip
    knobs, reason = choose_roles(rows)
    assert knobs == {"internode_dispatch_forwarder_warps": 4, "internode_combine_forwarder_warps": 6}
    assert "dispatch forwarder warps 4 (4: 6.000 ms)" in reason


def test_bench_rows_record_the_knobs_in_use(fake, profiles: Path) -> None:
    """A profile's role split is applied by the Buffer the bench makes, and the rows say so."""
    sig = dataclasses.replace(cluster_signature(), num_ranks=4, num_ranks_per_node=2)
    knobs = {"internode_dispatch_forwarder_warps": 6, "internode_combine_forwarder_warps": 2}
    save_profile(Profile(sig, "kernels", 2, "fastest", "test", knobs, {}, "2026-01-01"), None)
    shape = SHAPE.with_(num_experts=8)
    spec = _spec(shapes=[shape], dtypes=["bf16"], num_ranks_per_node=2, num_sms=[None])
    rows = bench_virtual(4, spec, timeout_s=30.0, device=CPU)
    assert rows and all(r.knobs == knobs and r.wrong == 0 for r in rows)
