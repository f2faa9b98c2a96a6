"""CPU: the host side of the internode kernels (commkit.backends.internode + virtual nodes in
commkit.emulate) with CPU stand-ins that follow the kernels' contracts (tests/fake_kernels.py), and
the host mirror of the device structs and slot formats.

The kernels' protocol is modeled by test_internode_protocol_model.py; the kernels themselves run in
the GPU tests (tests/gpu/test_internode_gpu.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _nvcc import build_host_program, printed_values, requires_nvcc
from fake_kernels import FakeKernels  # the `fake` fixture is registered in conftest.py

from commkit import Buffer, reference, routing
from commkit.backends import internode as imod
from commkit.backends import internode_layout as il
from commkit.backends import internode_net
from commkit.emulate import EmulatedGroup
from commkit.errors import ConfigError
from commkit.fp8 import cast_to_fp8
from commkit.profiles import Profile, cluster_signature, save_profile


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(
        {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float8_e4m3fn: torch.uint8}.get(
            t.dtype, t.dtype
        )
    )


def _node_limited_inputs(tokens, hidden, num_topk, num_experts, num_nodes, seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = [], [], []
    for num_tokens in tokens:
        xs.append((torch.randn(num_tokens, hidden, generator=gen) * 3).to(torch.bfloat16))
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        idx, w = routing.node_limited_topk(scores, num_topk, num_groups=num_nodes, max_groups=2)
        idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.1, -1, idx)  # some unused slots
        idxs.append(idx.to(torch.int64).contiguous())
        ws.append(w.contiguous())
    return xs, idxs, ws


@pytest.mark.parametrize(("gpus", "nodes"), [(2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("dtype", ["bf16", "fp8", "cast"])
@pytest.mark.parametrize("worst", [False, True])
def test_virtual_nodes_host_logic(fake: FakeKernels, gpus: int, nodes: int, dtype: str, worst: bool) -> None:
    num_ranks, hidden, num_topk, num_experts = gpus * nodes, 256, 4, 16
    tokens = [23, 0, 9, 31, 5, 17, 2, 11][:num_ranks]
    xs, idxs, ws = _node_limited_inputs(tokens, hidden, num_topk, num_experts, nodes, seed=gpus * 10 + nodes)
    scales = None
    if dtype == "fp8":
        pairs = [cast_to_fp8(x) for x in xs]
        xs, scales = [p[0] for p in pairs], [p[1] for p in pairs]
    ref_xs, ref_scales = (
        (xs, scales) if dtype != "cast" else tuple(map(list, zip(*map(cast_to_fp8, xs), strict=True)))
    )
    want = reference.dispatch_reference(ref_xs, idxs, ws, num_experts, x_scales=ref_scales)

    group = EmulatedGroup(num_ranks, num_sms=3, device="cpu", num_ranks_per_node=gpus)
    assert isinstance(group.engine, imod.InternodeEngine) and group.num_nodes == nodes
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
            num_worst_tokens=worst_rows,
        )
        expected = ["cached_notify_kernel"] if round_idx else ["layout_kernel", "notify_kernel"]
        assert fake.launches[-1 - len(expected) :] == [*expected, "internode_dispatch_kernel"]
        for r, (o, w) in enumerate(zip(outs, want, strict=True)):
            n = w.x.shape[0]
            assert o.x.shape[0] == (worst_rows if worst else n)
            assert torch.equal(_bits(o.x[:n]), _bits(w.x)), r
            assert torch.equal(o.topk_idx[:n], w.topk_idx), r
            assert torch.equal(_bits(o.topk_weights[:n]), _bits(w.topk_weights)), r
            if w.x_scales is not None:
                assert torch.equal(_bits(o.x_scales[:n]), _bits(w.x_scales)), r

    ys = [(torch.randn(o.x.shape[0], hidden) * (r + 1)).to(torch.bfloat16) for r, o in enumerate(outs)]
    want_y = reference.combine_reference(
        [y[: w.x.shape[0]] for y, w in zip(ys, want, strict=True)], want, tokens, num_ranks_per_node=gpus
    )
    got = group.combine(ys, [o.handle for o in outs])
    assert fake.launches[-2:] == ["cached_notify_kernel", "internode_combine_kernel"]
    for s, (g, w) in enumerate(zip(got, want_y, strict=True)):
        assert torch.equal(_bits(g.x), _bits(w)), s


def test_virtual_nodes_layout_reports_nodes(fake: FakeKernels) -> None:
    gpus, nodes, num_experts = 2, 2, 8
    _, idxs, _ = _node_limited_inputs([7, 0, 12, 3], 64, 3, num_experts, nodes, seed=3)
    got = EmulatedGroup(4, num_sms=1, device="cpu", num_ranks_per_node=gpus).get_dispatch_layout(
        idxs, num_experts
    )
    for r, g in enumerate(got):
        want = reference.layout_reference(idxs[r], num_experts, 4, gpus)
        assert torch.equal(g.is_token_in_node, want.is_token_in_node), r
        assert torch.equal(g.num_tokens_per_node, want.num_tokens_per_node), r
        assert torch.equal(g.num_tokens_per_rank, want.num_tokens_per_rank), r


def test_node_send_pos_and_forwarder_offsets() -> None:
    # 2 nodes x 2 GPUs; rank 0 has 3 tokens, rank 1 has 2
    send_pos = torch.tensor(
        [[0, -1, 0, 0], [1, 0, -1, -1], [-1, -1, -1, 1], [0, -1, -1, -1], [-1, 0, 0, -1]], dtype=torch.int32
    )
    got = imod.node_send_pos(send_pos, [3, 2], gpus_per_node=2)
    assert got.tolist() == [[0, 0], [1, -1], [-1, 1], [0, -1], [1, 0]]
    # rank l = (n, g) takes records from sources (m, g): sized by their token counts
    assert imod.forwarder_offsets([3, 2, 5, 1], 0, 2) == [[0, 3, 8], [8, 10, 11], [11, 14, 19], [19, 21, 22]]


def test_bad_topology_is_refused(fake: FakeKernels) -> None:
    with pytest.raises(ValueError, match="num_ranks_per_node"):
        EmulatedGroup(4, num_sms=1, device="cpu", num_ranks_per_node=3)


def test_inter_layout_regions_do_not_overlap() -> None:
    lay = il.inter_layout(4, 2, 20, 7424, 7488, staging=True)
    assert (
        lay.signals_offset
        < lay.nvl_ring_offset
        < lay.net_ring_offset
        < lay.net_stage_offset
        < lay.total_bytes
    )
    assert lay.nvl_ring_offset - lay.signals_offset >= il.NUM_SIGNAL_KINDS * 20 * 4 * 4
    assert lay.net_stage_offset - lay.net_ring_offset == 20 * 4 * il.NET_SLOTS * 7488
    assert lay.total_bytes - lay.net_stage_offset == 20 * 4 * il.NET_SLOTS * 7488
    no_stage = il.inter_layout(4, 2, 20, 7424, 7488, staging=False)
    assert no_stage.total_bytes == no_stage.net_stage_offset
    with pytest.raises(ValueError, match="num_nodes"):
        il.inter_layout(1, 8, 20, 7424, 7488, staging=False)


HOST_PROGRAM = r"""
#include <cstddef>
#include <cstdio>
#include "csrc/internode_dispatch.cuh"
#include "csrc/internode_combine.cuh"
using namespace commkit;
int main() {
    printf("NET_SLOTS %d\nNET_CHUNK %d\nMAX_NODES %d\n", kNetSlots, kNetChunk, kMaxNodes);
    printf("sizeof_layout %d\nsizeof_net %d\n", (int)sizeof(InterLayout), (int)sizeof(NvlinkDomainNet));
    printf("off_signals %d\noff_stage %d\noff_layout %d\n", (int)offsetof(InterLayout, signals_offset),
           (int)offsetof(InterLayout, net_stage_offset), (int)offsetof(NvlinkDomainNet, layout));
    printf("net_7168_8_0_4 %d\n", InterDispatchConfig<4, 2, 7168, 8, 0>::kNetSlotBytes);
    printf("net_7168_8_1_8 %d\n", InterDispatchConfig<8, 2, 7168, 8, 1>::kNetSlotBytes);
    printf("net_2048_1_2_2 %d\n", InterDispatchConfig<2, 4, 2048, 1, 2>::kNetSlotBytes);
    printf("nvl_7168_8_0 %d\n", InterDispatchConfig<4, 2, 7168, 8, 0>::kNvlSlotBytes);
    printf("nvl_2048_1_2 %d\n", InterDispatchConfig<2, 4, 2048, 1, 2>::kNvlSlotBytes);
    printf("combine_7168 %d\n", InterCombineConfig<4, 2, 7168>::kSlotBytes);
}
"""


@requires_nvcc
def test_host_mirror_of_internode_structs(tmp_path: Path) -> None:
    values = printed_values(build_host_program(tmp_path, "inter", HOST_PROGRAM))
    assert values == {
        "NET_SLOTS": il.NET_SLOTS,
        "NET_CHUNK": il.NET_CHUNK,
        "MAX_NODES": il.MAX_NODES,
        "sizeof_layout": il.InterLayout.STRUCT.size,
        "sizeof_net": il.NVLINK_DOMAIN_NET_BYTES,
        "off_signals": 24,
        "off_stage": 48,
        "off_layout": 8,
        "net_7168_8_0_4": il.dispatch_net_slot_bytes(7168, 8, 0, 4),
        "net_7168_8_1_8": il.dispatch_net_slot_bytes(7168, 8, 1, 8),
        "net_2048_1_2_2": il.dispatch_net_slot_bytes(2048, 1, 2, 2),
        "nvl_7168_8_0": il.dispatch_nvl_slot_bytes(7168, 8, 0),
        "nvl_2048_1_2": il.dispatch_nvl_slot_bytes(2048, 1, 2),
        "combine_7168": il.combine_slot_bytes(7168),
    }
    # The packed argument puts each field where the struct has it
    lay = il.inter_layout(2, 4, 3, 1024, 2048, staging=False)
    raw = il.nvlink_domain_net(0x1234, lay)
    assert len(raw) == values["sizeof_net"]
    assert int.from_bytes(raw[8 + 24 : 8 + 32], "little") == lay.signals_offset


def test_role_split_knobs(fake: FakeKernels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The role split reaches the kernels' template arguments, from Buffer.set_knobs or a profile."""
    xs, idxs, ws = _node_limited_inputs([9, 4, 0, 6], 64, 3, 8, 2, seed=5)

    def run(group: EmulatedGroup, **knobs: int) -> list[tuple]:
        fake.compiled.clear()

        def per_rank(rank):  # noqa: ANN001, ANN202
            buf = Buffer.from_backend(rank, num_sms=1)
            if knobs:
                buf.set_knobs(**knobs)
            out = buf.dispatch(xs[rank.rank], idxs[rank.rank], ws[rank.rank], 8)
            buf.combine(out.x, out.handle)

        group.spawn(per_rank)
        return sorted({(name, targs[-1]) for _, name, targs, _ in fake.compiled if "internode" in name})

    group = EmulatedGroup(4, num_sms=1, device="cpu", num_ranks_per_node=2)
    assert run(group) == [("internode_combine_kernel", 4), ("internode_dispatch_kernel", 4)]
    knobs = dict(internode_dispatch_forwarder_warps=2, internode_combine_forwarder_warps=6)
    assert run(group, **knobs) == [("internode_combine_kernel", 6), ("internode_dispatch_kernel", 2)]

    # A tuning profile's knobs, for this signature (4 ranks in virtual nodes of 2)
    monkeypatch.setenv("COMMKIT_PROFILE_DIR", str(tmp_path))
    sig = dataclasses.replace(cluster_signature(), num_ranks=4, num_ranks_per_node=2)
    save_profile(Profile(sig, "kernels", 1, "fastest", "test", {"internode_dispatch_forwarder_warps": 6}, {},
                         "2026-01-01"), tmp_path)  # fmt: skip
    group = EmulatedGroup(4, num_sms=1, device="cpu", num_ranks_per_node=2)
    buf = group.spawn(lambda rank: Buffer.from_backend(rank))[0]
    assert buf.config.knobs == (("internode_dispatch_forwarder_warps", 6),)
    assert group.engine.dispatch_forwarder_warps == 6 and group.engine.combine_forwarder_warps == 4

    with pytest.raises(ValueError, match=r"knobs: expected names among .*got \['chunk'\]"):
        buf.set_knobs(chunk=4)
    with pytest.raises(ConfigError, match="internode_combine_forwarder_warps: expected 1 to 7 warps"):
        buf.set_knobs(internode_combine_forwarder_warps=8)
    with pytest.raises(ConfigError, match="internode_combine_forwarder_warps: expected 1 to 7 warps"):
        buf.set_knobs(internode_dispatch_forwarder_warps=2, internode_combine_forwarder_warps=0)
    assert buf.knobs["internode_dispatch_forwarder_warps"] == 6  # nothing applied from a bad call
    one_node = EmulatedGroup(2, num_sms=1, device="cpu")
    with pytest.warns(UserWarning, match="has no knobs"):
        knobs = one_node.spawn(
            lambda rank: (
                (b := Buffer.from_backend(rank)).set_knobs(internode_dispatch_forwarder_warps=2) or b.knobs
            )
        )
    assert knobs == [{}, {}]


def test_net_argument_is_packed_once_per_state(fake: FakeKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hot path: dispatch and combine with the sizes of an earlier call reuse its Net argument; a row
    size that grows the buffers makes a new one."""
    calls = []
    real = internode_net.NvlinkDomain.argument

    def counting(self, buffers, num_sms, *rest):  # noqa: ANN001, ANN202
        calls.append(num_sms)
        return real(self, buffers, num_sms, *rest)

    monkeypatch.setattr(internode_net.NvlinkDomain, "argument", counting)
    group = EmulatedGroup(4, num_sms=1, device="cpu", num_ranks_per_node=2)
    for hidden in (64, 64, 64, 128):
        xs, idxs, ws = _node_limited_inputs([9, 4, 0, 6], hidden, 3, 8, 2, seed=5)
        outs = group.dispatch(xs, idxs, ws, 8)
        group.combine([o.x for o in outs], [o.handle for o in outs])
    # hidden 64: dispatch and combine (other slot sizes) once each; hidden 128: once each again
    assert len(calls) == 4, calls
