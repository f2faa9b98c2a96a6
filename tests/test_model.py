"""commkit.model: traffic against a token-by-token walk, physical invariants, budget search, profiles."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from commkit.model import (
    CountedRouting,
    Model,
    RecordedRouting,
    SyntheticRouting,
    Topology,
    Workload,
    get_preset,
    load_profile,
    per_sm_gbps,
    preset_topology,
    routing_from_layouts,
    row_bytes,
    smallest_budget,
)
from commkit.model.traffic import count_link_rows, count_matrices
from commkit.routing import synthetic_topk_np

H800 = get_preset("h800-dsv3").topology


def walk_tokens(topk_idx: list[np.ndarray], num_experts: int, num_nodes: int, gpus_per_node: int) -> dict:
    """Rows per GPU on each path, by following every token along DeepEP's route (the reference)."""
    num_ranks = num_nodes * gpus_per_node
    experts_per_rank = num_experts // num_ranks
    out = {
        name: np.zeros(num_ranks) for name in ("recv", "ib_send", "ib_recv", "fwd", "nvl_send", "nvl_recv")
    }
    for src, idx in enumerate(topk_idx):
        src_node, src_gpu = divmod(src, gpus_per_node)
        for token in idx:
            dst_ranks = sorted({int(e) // experts_per_rank for e in token if e >= 0})
            for node in sorted({r // gpus_per_node for r in dst_ranks}):
                forwarder = node * gpus_per_node + src_gpu  # same in-node index on the target node
                if node != src_node:
                    out["ib_send"][src] += 1
                    out["ib_recv"][forwarder] += 1
                for dst in (r for r in dst_ranks if r // gpus_per_node == node):
                    out["recv"][dst] += 1
                    if num_nodes > 1:
                        out["fwd"][forwarder] += 1
                    hop_from = forwarder if num_nodes > 1 else src
                    if dst != hop_from:
                        out["nvl_send"][hop_from] += 1
                        out["nvl_recv"][dst] += 1
    return out


@pytest.mark.parametrize(("num_nodes", "gpus_per_node"), [(1, 4), (3, 4), (2, 2)])
def test_traffic_matches_token_walk(num_nodes: int, gpus_per_node: int) -> None:
    num_ranks, num_experts = num_nodes * gpus_per_node, 24
    topk_idx = [synthetic_topk_np(57, num_experts, 3, skew=0.7, seed=src)[0] for src in range(num_ranks)]
    topk_idx[1][::5, 2] = -1  # unused slots
    rows_to_rank, rows_to_node = count_matrices(
        RecordedRouting(topk_idx), 57, num_experts, 3, num_ranks, num_nodes
    )
    traffic = count_link_rows(rows_to_rank, rows_to_node, gpus_per_node)
    want = walk_tokens(topk_idx, num_experts, num_nodes, gpus_per_node)
    np.testing.assert_array_equal(traffic.recv_rows, want["recv"])
    np.testing.assert_array_equal(traffic.nvl_send_rows, want["nvl_send"])
    np.testing.assert_array_equal(traffic.nvl_recv_rows, want["nvl_recv"])
    np.testing.assert_array_equal(traffic.ib_send_rows, want["ib_send"])
    np.testing.assert_array_equal(traffic.ib_recv_rows, want["ib_recv"])
    np.testing.assert_array_equal(traffic.fwd_rows, want["fwd"])


def test_layouts_give_the_same_counts_as_topk() -> None:
    """``routing_from_layouts`` (exact counts from each rank's Layout) equals the recorded topk_idx."""
    torch = pytest.importorskip("torch")
    from commkit.types import Layout

    num_nodes, gpus_per_node, num_experts = 2, 4, 32
    num_ranks = num_nodes * gpus_per_node
    topk_idx = [synthetic_topk_np(40, num_experts, 4, seed=s)[0] for s in range(num_ranks)]
    layouts = []
    for idx in topk_idx:
        in_rank = np.zeros((len(idx), num_ranks), dtype=bool)
        np.put_along_axis(in_rank, idx // (num_experts // num_ranks), True, axis=1)
        layouts.append(
            Layout(
                num_tokens_per_rank=torch.from_numpy(in_rank.sum(0)),
                num_tokens_per_expert=torch.from_numpy(np.bincount(idx.ravel(), minlength=num_experts)),
                is_token_in_rank=torch.from_numpy(in_rank),
            )
        )
    counted = routing_from_layouts(layouts, gpus_per_node)
    assert isinstance(counted, CountedRouting)
    topology = replace(H800, num_nodes=num_nodes, gpus_per_node=gpus_per_node)
    work = Workload(40, 1024, 4, num_experts)
    a = Model(topology, work, counted).predict()
    b = Model(topology, work, RecordedRouting(topk_idx)).predict()
    for phase in a:
        assert a[phase].time_us == pytest.approx(b[phase].time_us)


def test_row_bytes() -> None:
    assert row_bytes(7168, "fp8") == 7168 + 56 * 4
    assert row_bytes(7168, "bf16") == 2 * 7168
    assert row_bytes(100, "fp8") == 100 + 4  # a partial 128-block still has a scale
    with pytest.raises(ValueError, match="dtype"):
        row_bytes(128, "fp16")


def test_uniform_intranode_counts_are_exact_expectations() -> None:
    """Uniform top-8 of 256 over 8 ranks: P(token reaches a rank) = 1 - C(224, 8) / C(256, 8)."""
    model = Model(replace(H800, num_nodes=1), Workload(4096, 7168, 8, 256), SyntheticRouting())
    miss = np.prod([(224 - i) / (256 - i) for i in range(8)])
    expected = 8 * 4096 * (1 - miss)
    assert model.traffic.recv_rows.mean() == pytest.approx(expected, rel=0.01)
    assert model.traffic.nvl_recv_rows.mean() == pytest.approx(expected * 7 / 8, rel=0.01)


def model_for(nodes: int, **work: int) -> Model:
    topology = preset_topology(get_preset("h800-dsv3"), ep_size=8 * nodes)
    shape = {"num_tokens": 4096, "hidden": 7168, "num_topk": 8, "num_experts": 256, **work}
    return Model(topology, Workload(**shape), SyntheticRouting(max_nodes=4))


@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_time_never_grows_with_sms_and_ends_link_bound(nodes: int) -> None:
    model = model_for(nodes)
    for phase in ("dispatch", "combine"):
        times = [model.phase(phase, n).time_us for n in range(2, 133, 2)]
        assert all(b <= a + 1e-9 for a, b in zip(times, times[1:], strict=False)), phase
        last = model.phase(phase, 132)
        assert last.bound in ("nvlink_out", "nvlink_in", "nic_out", "nic_in")
        assert last.time_us == pytest.approx(last.link_bound_us)
        few = model.phase(phase, 2)
        assert few.bound.startswith("sm:") and few.time_us > 5 * last.time_us


def test_bounds_follow_the_hardware() -> None:
    """Across nodes the NIC bounds the layer at DeepSeek-V3's budget; a 4x NIC moves the bound elsewhere."""
    model = model_for(8, num_sms=20)
    assert model.phase("dispatch").bound == "nic_out"
    fast_nic = Model(replace(model.topology, nic_gbps=200.0), model.workload, model.routing)
    assert fast_nic.phase("dispatch").bound != "nic_out"
    assert fast_nic.phase("dispatch").time_us < model.phase("dispatch").time_us
    tiny = Model(model.topology, replace(model.workload, num_tokens=1, num_sms=132), model.routing)
    assert tiny.phase("dispatch").bound == "latency"


def test_link_bytes_and_utilisation() -> None:
    model = model_for(8, num_sms=132)
    p = model.phase("dispatch")
    rows = model.traffic
    assert p.link_bytes["ib"] == pytest.approx(rows.ib_send_rows.mean() * row_bytes(7168, "fp8"))
    # NIC-bound: busy all the time but the fixed latency (utilisation is of the achievable rate)
    assert p.link_util["ib"] == pytest.approx(1 - p.latency_us / p.time_us)
    assert 0 < p.link_util["nvlink"] < 1
    # Logical RDMA bytes count the own node as DeepEP does: more than the bytes that cross IB
    assert p.logical_bytes > p.link_bytes["ib"]
    c = model.phase("combine")
    assert c.logical_bytes == pytest.approx(p.logical_bytes * 2 * 7168 / row_bytes(7168, "fp8"))


def test_skew_slows_the_layer_down() -> None:
    topology = preset_topology(get_preset("h800-dsv3"), ep_size=64)
    work = Workload(4096, 7168, 8, 256, num_sms=20)
    times = [
        Model(topology, work, SyntheticRouting(skew=skew, max_nodes=4)).phase("dispatch").time_us
        for skew in (0.0, 0.5, 1.0)
    ]
    assert times[0] < times[1] < times[2]


def test_smallest_budget() -> None:
    model = model_for(2)
    answer = smallest_budget(model, "dispatch", within_pct=5)
    assert answer.num_sms is not None and answer.num_sms % 2 == 0
    assert model.phase("dispatch", answer.num_sms).time_us <= answer.target_us
    assert model.phase("dispatch", answer.num_sms - 2).time_us > answer.target_us
    link_bound = model.phase("dispatch", 132).link_bound_us
    assert answer.target_us == pytest.approx(1.05 * link_bound)
    hidden = smallest_budget(model, "combine", compute_us=3 * model.phase("combine", 132).time_us)
    assert hidden.num_sms is not None and hidden.num_sms < answer.num_sms + 40
    impossible = smallest_budget(model, "combine", compute_us=1.0)
    assert impossible.num_sms is None


def test_per_sm_overrides_and_profile(tmp_path: Path) -> None:
    table = per_sm_gbps({"dispatch": 20.0, "internode.dispatch.forwarder": 30.0, "combine": None})
    assert table["intranode.dispatch.sender"] == 20.0
    assert table["internode.dispatch.forwarder"] == 30.0  # the more specific key wins
    assert table["intranode.combine.sender"] == per_sm_gbps()["intranode.combine.sender"]
    with pytest.raises(ValueError, match="unknown per-SM throughput key"):
        per_sm_gbps({"dispatchh": 1.0})
    with pytest.raises(ValueError, match="positive"):
        per_sm_gbps({"dispatch": -1.0})
    profile = tmp_path / "profile.json"
    # tune's figure is logical GB/s per SM of the whole budget: half the budget per role -> twice the rate
    profile.write_text(json.dumps({"num_sms": 24, "per_sm_gbps": {"dispatch": 13.1, "combine": None}}))
    assert load_profile(profile)["internode.dispatch.rdma_sender"] == 26.2
    assert load_profile(profile)["intranode.combine.sender"] == per_sm_gbps()["intranode.combine.sender"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="per_sm_gbps"):
        load_profile(tmp_path / "bad.json")
    # Doubling every rate halves an SM-bound phase's SM term
    slow, fast = (
        model_for(1, num_sms=8),
        Model(
            model_for(1).topology,
            Workload(4096, 7168, 8, 256, num_sms=8),
            SyntheticRouting(),
            {"dispatch": 26.2},
        ),
    )
    assert fast.phase("dispatch").resource_us["sm:sender"] == pytest.approx(
        slow.phase("dispatch").resource_us["sm:sender"] * 13.1 / 26.2
    )


def test_role_split() -> None:
    even = model_for(2, num_sms=20)
    split = {"internode.dispatch": {"forwarder": 0.3, "rdma_sender+nvl_receiver": 0.7}}
    skewed = Model(even.topology, replace(even.workload, role_split=split), even.routing)
    assert skewed.phase("dispatch").sms_per_role["forwarder"] == pytest.approx(6.0)
    assert (
        skewed.phase("dispatch").resource_us["sm:forwarder"]
        > even.phase("dispatch").resource_us["sm:forwarder"]
    )
    with pytest.raises(ValueError, match="each of the roles"):
        Workload(16, 128, 2, 16, role_split={"internode.dispatch": {"forwarder": 1.0}})
    with pytest.raises(ValueError, match="sum to 1"):
        Workload(16, 128, 2, 16, role_split={"intranode.dispatch": {"sender": 0.5, "receiver": 0.6}})


def test_bad_shapes_are_named() -> None:
    topology = preset_topology(get_preset("h800-dsv3"), ep_size=64)
    with pytest.raises(ValueError, match="multiple of the EP size 64"):
        Model(topology, Workload(128, 128, 8, 96), SyntheticRouting())
    with pytest.raises(ValueError, match="num_sms=200"):
        Model(topology, Workload(128, 128, 8, 256, num_sms=200))
    with pytest.raises(ValueError, match="num_tokens"):
        Workload(0, 128, 8, 256)
    with pytest.raises(ValueError, match="exceeds the cluster"):
        preset_topology(get_preset("h100-cx7"), ep_size=16)
    with pytest.raises(ValueError, match="whole nodes"):
        H800.with_ranks(12)
    with pytest.raises(ValueError, match="nic_gbps"):
        Topology("x", 2, 8, 132, 160.0, 0.0)


def test_cluster_scale_prediction_runs() -> None:
    """The full DeepSeek-V3 cluster (2048 GPUs) as one EP group, skewed: finite, NIC- or NVLink-bound."""
    topology = preset_topology(get_preset("h800-dsv3"), ep_size=2048)
    model = Model(
        topology, Workload(4096, 7168, 8, 4096, num_sms=20), SyntheticRouting(skew=0.3, max_nodes=4)
    )
    for p in model.predict().values():
        assert np.isfinite(p.time_us) and p.time_us > 0
        assert set(p.link_bytes) == {"nvlink", "ib"}


def test_emulated_counts_hbm() -> None:
    topology = preset_topology(get_preset("h100-emulated"), ep_size=4)
    model = Model(topology, Workload(2048, 4096, 8, 64, num_sms=132), SyntheticRouting())
    p = model.phase("dispatch")
    assert p.family == "emulated" and "hbm" in p.resource_us and "nvlink_out" not in p.resource_us
    assert p.bound == "hbm"


def test_emulated_bench_rows_are_found(tmp_path: Path) -> None:
    """The loader behind the emulated-run check reads bench.json rows marked as virtual-rank runs only."""
    from commkit.model.emulated import load_emulated_runs, predict_emulated

    row = {"op": "dispatch", "backend": "kernel", "ranks": 8, "tokens": 4096, "hidden": 7168, "topk": 8,
           "experts": 256, "dtype": "fp8", "num_sms": 24, "time_median_s": 1.5e-3}  # fmt: skip
    baseline = {**row, "backend": "torch", "num_sms": None}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bench.json").write_text(
        json.dumps({"meta": {}, "spec": {"virtual": 8, "skew": 0.0}, "rows": [row, baseline]})
    )
    (tmp_path / "real.json").write_text(json.dumps({"meta": {}, "spec": {}, "rows": [row]}))  # not emulated
    # Virtual nodes (a net hop) and other role splits are other kernels than the model's
    nodes = {**row, "nodes": 2}
    split = {**row, "knobs": {"internode_dispatch_forwarder_warps": 2}}
    (tmp_path / "b.json").write_text(json.dumps({"meta": {}, "spec": {"virtual": 8}, "rows": [nodes, split]}))
    runs = load_emulated_runs(tmp_path)
    assert len(runs) == 1 and runs[0].measured_us == pytest.approx(1500.0)
    assert 0 < predict_emulated(runs[0]) < 1e5


@pytest.mark.parametrize(("skew", "max_nodes"), [(0.5, 4), (1.0, 4), (0.7, None)])
def test_skewed_expectations_match_a_large_sample(skew: float, max_nodes: int | None) -> None:
    """The blended estimate of a skewed routing's per-rank load (a 2048-token sample + a smooth prior)
    against 50,000 tokens of the same generator: busiest rank and busiest node within 5%."""
    num_experts, num_ranks, num_nodes = 256, 64, 8
    routing = SyntheticRouting(skew=skew, max_nodes=max_nodes, seed=11)
    rows_to_rank, rows_to_node = count_matrices(routing, 4096, num_experts, 8, num_ranks, num_nodes)
    rows_to_rank, rows_to_node = rows_to_rank / 4096, rows_to_node / 4096
    big, _ = synthetic_topk_np(
        50_000,
        num_experts,
        8,
        skew=skew,
        num_groups=num_nodes if max_nodes else 1,
        max_groups=max_nodes,
        seed=99,
    )
    truth = count_matrices(RecordedRouting([big]), 50_000, num_experts, 8, num_ranks, num_nodes)
    assert rows_to_rank[0].max() == pytest.approx(truth[0][0].max() / 50_000, rel=0.05)
    assert rows_to_node[0].max() == pytest.approx(truth[1][0].max() / 50_000, rel=0.05)
    assert rows_to_rank[0].sum() == pytest.approx(truth[0][0].sum() / 50_000, rel=0.02)


def test_tiny_skew_is_continuous_at_cluster_scale() -> None:
    """2048 ranks see ~4 sampled hits each; sampling noise must not pass for load imbalance."""
    topology = preset_topology(get_preset("h800-dsv3"), ep_size=2048)
    work = Workload(4096, 7168, 8, 4096, num_sms=20)
    flat = Model(topology, work, SyntheticRouting(max_nodes=4)).predict()
    tiny = Model(topology, work, SyntheticRouting(skew=1e-3, max_nodes=4)).predict()
    for phase in flat:
        assert tiny[phase].time_us == pytest.approx(flat[phase].time_us, rel=0.03)
