"""Bench expectations against commkit.reference, wrong-row counting, bytes (averaged over the input
sets), the tune objectives, the ranks per node of DistRanks' Buffers, and end-to-end CLI runs of bench
and tune on the torch backend over gloo (2 CPU ranks; 4 ranks in 2 nodes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from commkit.__main__ import main
from commkit.launch import spawn_gloo
from commkit.reference import combine_reference, dispatch_reference
from commkit.tools.bench import with_ranks_per_node
from commkit.tools.payload import (
    count_wrong_combine,
    count_wrong_dispatch,
    expected_combine,
    expected_dispatch,
    expert_output,
    make_input_set,
    payload_rows,
)
from commkit.tools.ranks import DistRanks, VirtualRanks
from commkit.tools.rows import bytes_per_rank, link_fields
from commkit.tools.shapes import SHAPES, MoEShape, get_shape
from commkit.tools.traffic import count_traffic
from commkit.tools.tune import choose

TINY = get_shape("ci-tiny")


def _reference(dtype: str, num_ranks: int = 2):
    sets = [make_input_set(TINY, dtype, r, num_ranks, 5, 0.0, torch.device("cpu")) for r in range(num_ranks)]
    ref = dispatch_reference(
        [s.x for s in sets], sets[0].topk_idx, sets[0].topk_weights, TINY.num_experts,
        x_scales=[s.x_scales for s in sets] if dtype == "fp8" else None,
    )  # fmt: skip
    return sets, ref


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_expectation_matches_reference(dtype: str) -> None:
    sets, ref = _reference(dtype)
    for rank, s in enumerate(sets):
        exp = expected_dispatch(s, TINY.num_experts, rank)
        assert torch.equal(exp.src_rank, ref[rank].src_rank) and torch.equal(
            exp.src_token, ref[rank].src_token
        )
        assert torch.equal(exp.topk_idx, ref[rank].topk_idx)
        assert count_wrong_dispatch(ref[rank], exp, TINY.hidden, dtype, s.salt) == 0
    outs = [expert_output(r) for r in ref]
    ys = combine_reference(outs, ref, [TINY.num_tokens] * 2)
    for rank, s in enumerate(sets):
        want = expected_combine(s, rank, TINY.num_experts, TINY.hidden, dtype)
        assert count_wrong_combine(ys[rank], want) == 0


def test_wrong_rows_are_counted() -> None:
    sets, ref = _reference("bf16")
    exp = expected_dispatch(sets[0], TINY.num_experts, 0)
    got = ref[0]
    got.x[3] = payload_rows(torch.tensor([1]), torch.tensor([0]), TINY.hidden, "bf16", 99)[0]
    got.topk_weights[5, 0] += 1.0
    assert count_wrong_dispatch(got, exp, TINY.hidden, "bf16", sets[0].salt) == 2
    got.x = got.x[:-1]
    assert count_wrong_dispatch(got, exp, TINY.hidden, "bf16", sets[0].salt) == 3
    y = expected_combine(sets[0], 0, TINY.num_experts, TINY.hidden, "bf16")
    bad = y.clone()
    bad[0, 0] = bad[0, 0] + 1
    assert count_wrong_combine(bad, y) == 1


def test_bytes_split_nvlink_and_rdma() -> None:
    # 4 ranks, 2 per node, 4 experts (one per rank). Rank 0's token 0 goes to experts 1 and 2 (ranks 1, 2).
    idx = [torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([[3, -1]])]
    b = count_traffic(idx, 4, 2, hidden=128, dtype="bf16").figures("dispatch")
    # received rows: r0 1, r1 2, r2 2, r3 2 -> mean 7/4; rows to another node: r0 1 (node 1), others 0.
    assert b["logical_bytes"] == pytest.approx(7 / 4 * 256)
    assert b["ib_bytes_hier"] == b["ib_bytes_flat"] == pytest.approx(1 / 4 * 256)
    fp8 = count_traffic(idx, 4, 2, hidden=128, dtype="fp8")
    assert fp8.figures("dispatch")["logical_bytes"] == pytest.approx(7 / 4 * (128 + 4))
    assert fp8.figures("combine")["logical_bytes"] == pytest.approx(7 / 4 * 256)
    # the dict of rows.bytes_per_rank (overlap's comm bytes) is the same count
    assert bytes_per_rank(idx, 4, 2, hidden=128, dtype="fp8") == {
        "dispatch_nvl_bytes": 7 / 4 * 132, "dispatch_rdma_bytes": 1 / 4 * 132,
        "combine_nvl_bytes": 7 / 4 * 256, "combine_rdma_bytes": 1 / 4 * 256, "mean_recv_rows": 7 / 4,
    }  # fmt: skip


def test_link_fields_one_node_and_several() -> None:
    idx = [torch.tensor([[2, 3]]), torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([[3, -1]])]
    link, nbytes, fields = link_fields(count_traffic(idx, 4, 4, 128, "bf16"), "dispatch", 1e-3)
    assert (link, nbytes) == ("nvl", 7 / 4 * 256)
    assert fields == {"nvl_bytes": 7 / 4 * 256, "rdma_bytes": 0.0}  # one node: the fields as before
    link, nbytes, fields = link_fields(count_traffic(idx, 4, 2, 128, "bf16"), "combine", 1e-3)
    # rank 0's token reaches two GPUs of node 1: once hierarchically, twice flat; DeepEP also counts the
    # own node of every token (4 tokens, each reaches one node).
    assert (link, nbytes) == ("rdma", 1 / 4 * 256)
    assert fields["rdma_bytes_flat"] == 2 / 4 * 256 and fields["rdma_saved"] == 2.0
    assert fields["rdma_bytes_incl_own_node"] == 4 / 4 * 256
    assert fields["gbps_incl_own_node"] == pytest.approx(256 / 1e-3 / 1e9)


def test_link_fields_average_the_input_sets() -> None:
    # Two routings over 4 ranks in 2 nodes of 2 (one expert per rank), of different bytes: the timing
    # rotates over both evenly, so every byte figure is their mean.
    one = [torch.tensor([[2, 3]]), torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([[3, -1]])]
    two = [torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), torch.tensor([[0, 1]]), torch.tensor([[0, 3]])]
    t1, t2 = count_traffic(one, 4, 2, 128, "bf16"), count_traffic(two, 4, 2, 128, "bf16")
    for op in ("dispatch", "combine"):
        f1, f2 = t1.figures(op), t2.figures(op)
        assert f1["ib_bytes_hier"] != f2["ib_bytes_hier"]  # the case shows the difference
        link, nbytes, fields = link_fields([t1, t2], op, 1e-3)
        assert link == "rdma" and nbytes == fields["rdma_bytes"]
        assert fields["nvl_bytes"] == pytest.approx((f1["logical_bytes"] + f2["logical_bytes"]) / 2)
        assert fields["rdma_bytes"] == pytest.approx((f1["ib_bytes_hier"] + f2["ib_bytes_hier"]) / 2)
        assert fields["rdma_bytes_flat"] == pytest.approx((f1["ib_bytes_flat"] + f2["ib_bytes_flat"]) / 2)
        incl = (f1["rdma_bytes_incl_own_node"] + f2["rdma_bytes_incl_own_node"]) / 2
        assert fields["rdma_bytes_incl_own_node"] == pytest.approx(incl)
        assert fields["gbps_incl_own_node"] == pytest.approx(incl / 1e-3 / 1e9)
        assert fields["rdma_saved"] == pytest.approx(fields["rdma_bytes_flat"] / fields["rdma_bytes"])
        # one set, alone or in a list: its own figures
        assert link_fields([t1], op, 1e-3) == link_fields(t1, op, 1e-3)
        assert link_fields(t1, op, 1e-3)[2]["rdma_saved"] == t1.ib_saved
    with pytest.raises(ValueError, match="at least one input set"):
        link_fields([], "dispatch", 1e-3)
    with pytest.raises(ValueError, match="ranks per node"):
        link_fields([t1, count_traffic(one, 4, 4, 128, "bf16")], "dispatch", 1e-3)


def test_expected_combine_follows_the_nodes() -> None:
    # Top-8 over 8 ranks in 2 nodes of 4: tokens whose rows split 3 + 2 over the nodes round differently
    # in two levels than in one, so the expectation must follow the buffer's nodes.
    shape = MoEShape("t", hidden=64, num_experts=16, top_k=8, moe_intermediate=8, num_tokens=24)
    sets = [make_input_set(shape, "bf16", r, 8, 3, 0.0, torch.device("cpu")) for r in range(8)]
    ref = dispatch_reference([s.x for s in sets], sets[0].topk_idx, sets[0].topk_weights, 16)
    outs = [expert_output(r) for r in ref]
    differs = False
    for per_node in (None, 4, 2):
        ys = combine_reference(outs, ref, [shape.num_tokens] * 8, per_node)
        for rank, s in enumerate(sets):
            want = expected_combine(s, rank, 16, shape.hidden, "bf16", per_node)
            assert count_wrong_combine(ys[rank], want) == 0, (per_node, rank)
            differs |= count_wrong_combine(want, expected_combine(s, rank, 16, shape.hidden, "bf16")) > 0
    assert differs  # the case shows the difference


def test_tune_objectives() -> None:
    comm = {8: 1.00e-3, 16: 0.595e-3, 24: 0.59e-3, 32: 0.58e-3}
    fastest = choose(comm, "fastest", None, 0.03)
    assert fastest.num_sms == 16 and "within 3%" in fastest.reason
    assert choose(comm, "hide", 0.8, 0.03).num_sms == 16
    assert choose(comm, "hide", 1.5, 0.03).num_sms == 8
    none = choose(comm, "hide", 0.1, 0.03)
    assert none.num_sms == 16 and none.reason.startswith("no budget hides")
    with pytest.raises(ValueError, match="compute time"):
        choose(comm, "hide", None, 0.03)


def test_shapes_are_model_named() -> None:
    ds = SHAPES["deepseek-v3"]
    assert (ds.hidden, ds.num_experts, ds.top_k) == (7168, 256, 8)
    assert TINY.with_(num_tokens=901).num_tokens == 901


@pytest.mark.slow
def test_bench_cli_end_to_end(tmp_path: Path) -> None:
    code = main(["bench", "--ranks", "2", "--reps", "3", "--warmup", "1", "--input-sets", "2",
                 "--dtype", "bf16", "--dtype", "fp8", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = data["rows"]
    assert [(r["op"], r["dtype"]) for r in rows] == [
        ("dispatch", "bf16"), ("combine", "bf16"), ("dispatch", "fp8"), ("combine", "bf16")
    ]  # fmt: skip
    for r in rows:
        assert r["wrong"] == 0 and r["backend"] == "torch" and r["ranks"] == 2
        assert 0 < r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
        assert r["gbps"] == pytest.approx(r["nvl_bytes"] / r["time_median_s"] / 1e9)
        assert r["vs_roofline"] is None and "CUDA" in r["vs_roofline_note"]
        # the bytes counted are the NVLink class, the link that carried them is gloo (CPU processes)
        assert r["nodes"] == 1 and r["bytes_counted"] == "nvl" and r["link"] == "gloo"
        assert r["rdma_bytes"] == 0
        assert r["algbw_gbps"] == pytest.approx(r["nvl_bytes"] / r["time_median_s"] / 1e9)
        assert 0 < r["bus_bytes"] < r["nvl_bytes"]  # the rank's own rows cross no link
        assert r["busbw_gbps"] == pytest.approx(r["bus_bytes"] / r["time_median_s"] / 1e9)
        assert "rdma_bytes_flat" not in r and "rdma_saved" not in r  # single-node rows: no inter-node fields
    assert rows[2]["nvl_bytes"] < rows[0]["nvl_bytes"]  # FP8 rows are smaller
    assert data["summary"]["total_wrong"] == 0
    assert (tmp_path / "bench.tsv").read_text().splitlines()[0].startswith("shape\top")


@pytest.mark.slow
def test_bench_cli_two_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 gloo ranks in 2 nodes of 2 from --ranks-per-node alone (no $LOCAL_WORLD_SIZE: the Buffers take
    the two-level path from the bench's DistRanks): rows carry the hierarchical and the flat RDMA bytes
    of the routings, the mean over the 2 input sets timed, their ratio and DeepEP's count, in the JSON
    and the TSV."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    code = main(["bench", "--ranks", "4", "--ranks-per-node", "2", "--reps", "2", "--warmup", "1",
                 "--input-sets", "2", "--dtype", "fp8", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["op"] for r in rows] == ["dispatch", "combine"]
    # the routings the bench counted: input sets 0 and 1 (salt = seed * 1000 + i) of every rank
    traffics = [
        count_traffic(
            make_input_set(TINY, "fp8", 0, 4, salt, 0.0, torch.device("cpu")).topk_idx,
            TINY.num_experts, 2, TINY.hidden, "fp8",
        )
        for salt in (0, 1)
    ]  # fmt: skip
    for r in rows:
        figs = [t.figures(r["op"]) for t in traffics]
        assert figs[0]["ib_bytes_hier"] != figs[1]["ib_bytes_hier"]  # the sets differ: the mean shows
        mean = {key: (figs[0][key] + figs[1][key]) / 2 for key in figs[0]}
        assert r["wrong"] == 0 and r["nodes"] == 2 and r["bytes_counted"] == "rdma" and r["link"] == "gloo"
        assert r["bus_bytes"] == r["rdma_bytes"] and r["busbw_gbps"] == pytest.approx(r["gbps"])
        assert r["nvl_bytes"] == pytest.approx(mean["logical_bytes"])
        assert r["rdma_bytes"] == pytest.approx(mean["ib_bytes_hier"]) and r["rdma_bytes"] > 0
        assert r["rdma_bytes_flat"] == pytest.approx(mean["ib_bytes_flat"])
        assert r["rdma_bytes_flat"] >= r["rdma_bytes"]
        assert r["rdma_saved"] == pytest.approx(r["rdma_bytes_flat"] / r["rdma_bytes"])
        assert r["rdma_bytes_incl_own_node"] == pytest.approx(mean["rdma_bytes_incl_own_node"])
        assert r["rdma_bytes_incl_own_node"] > r["rdma_bytes"]
        assert r["gbps"] == pytest.approx(r["rdma_bytes"] / r["time_median_s"] / 1e9)
        assert r["gbps_incl_own_node"] == pytest.approx(
            r["rdma_bytes_incl_own_node"] / r["time_median_s"] / 1e9
        )
    assert rows[0]["rdma_bytes"] < rows[1]["rdma_bytes"]  # fp8 dispatch rows, bf16 combine rows
    tsv = [line.split("\t") for line in (tmp_path / "bench.tsv").read_text().splitlines()]
    head = tsv[0]
    for line, r in zip(tsv[1:], rows, strict=True):
        assert float(line[head.index("flat RDMA MB")]) == pytest.approx(r["rdma_bytes_flat"] / 1e6, abs=1e-6)
        assert float(line[head.index("RDMA saved")]) == pytest.approx(r["rdma_saved"], abs=1e-6)


def _dist_ranks_buffers(rank: int, world: int) -> dict:
    out: dict = {}
    for per_node in (2, None):
        ctx = DistRanks.current(num_ranks_per_node=per_node)
        buf, sig = ctx.make_buffer("torch"), ctx.signature()
        out[per_node] = (buf.num_ranks_per_node, type(buf._backend).__name__, sig.num_ranks_per_node)
    return out


@pytest.mark.slow
def test_dist_ranks_buffers_take_ranks_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 gloo ranks, no $LOCAL_WORLD_SIZE: a DistRanks made with 2 ranks per node makes two-level Buffers
    (and keys its profiles by 2 per node); one made without makes one-node Buffers."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for got in spawn_gloo(_dist_ranks_buffers, 4, timeout_s=120):
        assert got[2] == (2, "HierTorchBackend", 2)
        assert got[None] == (4, "TorchBackend", 4)


def test_bench_spec_ranks_per_node_reaches_dist_ranks() -> None:
    """A DistRanks made without ranks per node takes the spec's (its Buffers run on the nodes the bytes
    are counted for); one made with other ones raises; virtual ranks and a spec without stay as they are."""
    ctx = DistRanks(0, 4, torch.device("cpu"))
    assert with_ranks_per_node(ctx, 2).num_ranks_per_node == 2
    assert with_ranks_per_node(ctx, None) is ctx
    two = DistRanks(0, 4, torch.device("cpu"), num_ranks_per_node=2)
    assert with_ranks_per_node(two, 2) is two and with_ranks_per_node(two, None) is two
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        with_ranks_per_node(two, 4)
    virtual = VirtualRanks(0, 2, torch.device("cpu"), True)
    assert with_ranks_per_node(virtual, 1) is virtual


def test_tune_cli_refuses_the_torch_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The torch backend has no SM budget: a sweep over num_sms would only measure noise, and a saved
    profile would then be used by Buffer. tune says so before any rank starts and saves nothing (it used
    to save a torch profile here)."""
    monkeypatch.setenv("COMMKIT_PROFILE_DIR", str(tmp_path / "profiles"))
    for backend in (["--backend", "torch"], []):  # explicit, and auto on a machine without the kernels
        if not backend and torch.cuda.is_available():
            continue
        code = main(["tune", "--ranks", "2", "--reps", "2", "--warmup", "1", "--input-sets", "1", "--num-sms",
                     "4", "--num-sms", "8", "--out", str(tmp_path), "--no-progress", *backend])  # fmt: skip
        assert code == 1
        err = capsys.readouterr().err
        assert "no SM budget" in err and "no profile saved" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "profiles").exists()
