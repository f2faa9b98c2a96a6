"""Multi-node NVLink on the CPU (commkit/backends/fabric.py): the fabric-handle buffers over gloo
processes with a stand-in of the CUDA driver (handles exchanged, every rank's buffer mapped in every
rank, failures agreed, everything unmapped at close); the NVLink-domain check; the transport choice;
and ``Buffer(backend="kernels")`` over 2x2 processes on the nvlink-domain transport equal to the
reference bit for bit with the kernel stand-ins. The driver calls themselves (cuMemCreate with fabric
handles, IMEX) need an NVLink-domain system: not run here."""

from __future__ import annotations

import ctypes
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from cases import Case, bits, expert_output, make_inputs
from dispatch_checks import check_dispatch
from group_fake_kernels import FakeGinTransport, install_group_fakes

import commkit
from commkit.backends import fabric
from commkit.backends import internode_backend as ib
from commkit.backends.fabric import FabricBuffers, choose_transport, local_fabric_domain, transport_choice
from commkit.backends.internode_backend import internode_unavailable_reason
from commkit.launch import spawn_gloo
from commkit.reference import combine_reference, dispatch_reference
from commkit.tools import info


class FakeDriver:
    """``CudaDriver``'s methods over a dict of fake allocations; ``$FAKE_FABRIC_FAIL``: "step:rank"."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.calls: list[str] = []
        self.live_handles: set[str] = set()
        self.mapped: dict[int, tuple[str, int]] = {}  # va -> (allocation, size)
        self.next_va = 0x7F0000000000 + rank * 0x100000000

    def _fail(self, step: str) -> None:
        if os.environ.get("FAKE_FABRIC_FAIL") == f"{step}:{self.rank}":
            raise commkit.backends.fabric.FabricError(f"{step}: CUDA_ERROR_NOT_PERMITTED (fake)")

    def fabric_supported(self, device: int) -> bool:
        return True

    def granularity(self, device: int) -> int:
        return 1 << 21

    def create(self, size: int, device: int) -> str:
        self._fail("create")
        name = f"alloc{len(self.calls)}@{self.rank}"
        self.calls.append("create")
        self.live_handles.add(name)
        return name

    def export(self, handle: str) -> bytes:
        self.calls.append("export")
        return handle.encode().ljust(64, b"\0")

    def import_handle(self, raw: bytes) -> str:
        self._fail("import")
        self.calls.append("import")
        name = "imported:" + raw.rstrip(b"\0").decode()
        self.live_handles.add(name)
        return name

    def map(self, handle: str, size: int, device: int, alignment: int) -> int:
        assert size % alignment == 0
        self.calls.append("map")
        va, self.next_va = self.next_va, self.next_va + size
        self.mapped[va] = (handle.removeprefix("imported:"), size)
        return va

    def unmap(self, va: int, size: int) -> None:
        self.calls.append("unmap")
        assert self.mapped.pop(va)[1] == size

    def release(self, handle: str) -> None:
        self.calls.append("release")
        self.live_handles.remove(handle)

    def zero(self, va: int, size: int) -> None:
        self.calls.append("zero")


def _buffers(rank: int, world: int) -> dict:
    drv = FakeDriver(rank)
    buf = FabricBuffers(None, torch.device("cpu"), max_num_sms=4, timeout_s=30, driver=drv)
    buf.ensure(2, 1024)
    first = buf.peer_bases.tolist()
    owners = [drv.mapped[va][0] for va in first]
    buf.ensure(2, 1024)  # fits: nothing made again
    calls_after_fit = list(drv.calls)
    buf.ensure(2, 1 << 16)  # a larger slot: grows, all ranks together
    grown = buf.peer_bases.tolist()
    errors = []
    for step in ("create", "import"):
        os.environ["FAKE_FABRIC_FAIL"] = f"{step}:1"
        try:
            buf.ensure(2, 1 << 18)
            errors.append("no error")
        except commkit.errors.CommError as exc:
            errors.append(str(exc))
        os.environ["FAKE_FABRIC_FAIL"] = ""
        errors.append((buf.peer_bases is None, len(drv.mapped), len(drv.live_handles)))
    buf.ensure(2, 1024)  # usable again after a failure
    buf.close()
    dist.barrier()
    return dict(first=first, owners=owners, calls_after_fit=calls_after_fit, grown=grown, errors=errors,
                left=(len(drv.mapped), len(drv.live_handles)), calls=drv.calls)  # fmt: skip


def test_fabric_buffers_map_every_rank_and_agree_on_failures() -> None:
    world = 4
    got = spawn_gloo(_buffers, world, timeout_s=120)
    for g in got:
        # every rank's buffer mapped here: its own allocation at its own rank, the peers' imported
        assert len(g["first"]) == world and len(set(g["first"])) == world and all(g["first"])
        assert [o.split("@")[1] for o in g["owners"]] == [str(r) for r in range(world)]
        assert g["calls_after_fit"].count("create") == 1 and g["calls_after_fit"].count("import") == world - 1
        assert g["grown"] != g["first"]
        for k, step in enumerate(("allocate and export", "import and map")):
            message, state = g["errors"][2 * k], g["errors"][2 * k + 1]
            assert message.startswith(
                f"fabric buffers: could not {step} on ranks [1] (rank 1: FabricError: "
            ), message
            assert state == (True, 0, 0), state  # everything released on every rank
        assert g["left"] == (0, 0)  # close unmapped and released everything
        # each imported handle released right after its mapping (the mapping keeps the memory)
        assert g["calls"].count("create") + g["calls"].count("import") == g["calls"].count("release")


def _choose(rank: int, world: int, choices: list, domains: list) -> str:
    try:
        return choose_transport(None, choices[rank], tuple(domains[rank]))
    except commkit.errors.ConfigError as exc:
        return f"ConfigError: {exc}"


@pytest.mark.slow
def test_transport_choice_is_the_same_on_every_rank() -> None:
    auto, same = ["auto"] * 4, [("ab/1", "")] * 4
    assert spawn_gloo(_choose, 4, auto, same, timeout_s=60) == ["nvlink-domain"] * 4
    assert spawn_gloo(_choose, 4, ["gin"] * 4, same, timeout_s=60) == ["gin"] * 4
    split = [("ab/1", ""), ("ab/1", ""), ("cd/1", ""), ("cd/1", "")]
    assert spawn_gloo(_choose, 4, auto, split, timeout_s=60) == ["gin"] * 4
    assert set(spawn_gloo(_choose, 4, ["nvlink-domain"] * 4, split, timeout_s=60)) == {
        "ConfigError: COMMKIT_INTERNODE_TRANSPORT=nvlink-domain: the group is not one NVLink domain: the "
        "ranks span 2 NVLink domains (ab/1, cd/1)"
    }
    missing = [("ab/1", ""), (None, "no NVLink fabric info (NVMLError_NotSupported: Not Supported)")]
    assert spawn_gloo(_choose, 2, ["auto"] * 2, missing, timeout_s=60) == ["gin"] * 2
    assert set(spawn_gloo(_choose, 2, ["nvlink-domain"] * 2, missing, timeout_s=60)) == {
        "ConfigError: COMMKIT_INTERNODE_TRANSPORT=nvlink-domain: the group is not one NVLink domain: rank 1 "
        "is in no NVLink domain: no NVLink fabric info (NVMLError_NotSupported: Not Supported)"
    }
    # ranks told different things: every rank says so instead of making different collective calls
    mixed = spawn_gloo(_choose, 4, ["auto", "gin", "auto", "auto"], same, timeout_s=60)
    assert set(mixed) == {
        "ConfigError: COMMKIT_INTERNODE_TRANSPORT: expected the same value on every rank, got ['auto', 'gin']"
    }


class _FabricInfoV2(ctypes.Structure):
    """pynvml's c_nvmlGpuFabricInfo_v2_t."""

    _fields_ = [
        ("version", ctypes.c_uint),
        ("clusterUuid", ctypes.c_uint8 * 16),
        ("status", ctypes.c_int),
        ("cliqueId", ctypes.c_uint32),
        ("state", ctypes.c_uint8),
        ("healthMask", ctypes.c_uint32),
    ]


def test_local_fabric_domain_from_nvml_and_driver() -> None:
    def nvml(state: int = 3, status: int = 0, uuid: bytes = bytes(range(1, 17)), fail: bool = False):  # noqa: ANN202
        def info_v(handle, ref):  # noqa: ANN001, ANN202 - as pynvml: fills the struct passed by reference
            assert handle == "handle-0"
            if fail:
                raise RuntimeError("Not Supported")
            out = ref._obj
            assert isinstance(out, _FabricInfoV2)
            out.state, out.status, out.cliqueId = state, status, 7
            ctypes.memmove(out.clusterUuid, uuid, 16)
            return 0

        module = SimpleNamespace(nvmlDeviceGetGpuFabricInfoV=info_v, c_nvmlGpuFabricInfoV_t=_FabricInfoV2,
                                 NVML_GPU_FABRIC_STATE_COMPLETED=3)  # fmt: skip
        return SimpleNamespace(nv=module, handle=lambda index: f"handle-{index}")

    drv = FakeDriver(0)
    assert local_fabric_domain(0, nvml=nvml(), driver=drv) == (bytes(range(1, 17)).hex() + "/7", "")
    assert local_fabric_domain(0, nvml=nvml(fail=True), driver=drv)[1].startswith("no NVLink fabric info")
    assert "not completed (state 1" in local_fabric_domain(0, nvml=nvml(state=1), driver=drv)[1]
    assert "cluster UUID 0" in local_fabric_domain(0, nvml=nvml(uuid=bytes(16)), driver=drv)[1]
    drv.fabric_supported = lambda device: False  # type: ignore[method-assign]
    assert local_fabric_domain(0, nvml=nvml(), driver=drv) == (
        None,
        "the device does not support CUDA fabric handles",
    )

    def broken(device: int) -> bool:
        raise OSError("libcuda.so.1: cannot open shared object file")

    drv.fabric_supported = broken  # type: ignore[method-assign]
    assert local_fabric_domain(0, nvml=nvml(), driver=drv)[1] == (
        "CUDA fabric handles unavailable (OSError: libcuda.so.1: cannot open shared object file)"
    )


def test_transport_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMMKIT_INTERNODE_TRANSPORT", raising=False)
    assert transport_choice() == "auto"
    monkeypatch.setenv("COMMKIT_INTERNODE_TRANSPORT", "NVLink-Domain")
    assert transport_choice() == "nvlink-domain"
    monkeypatch.setenv("COMMKIT_INTERNODE_TRANSPORT", "ib")
    with pytest.raises(
        commkit.errors.ConfigError, match="COMMKIT_INTERNODE_TRANSPORT: expected one of auto, gin"
    ):
        transport_choice()


def _install_domain(rank: int, domain: tuple) -> FakeDriver:
    install_group_fakes()
    drv = FakeDriver(rank)
    fabric.CudaDriver = lambda: drv  # type: ignore[assignment,misc]
    ib.local_fabric_domain = lambda index: domain  # type: ignore[assignment]
    return drv


def _nvlink_domain_run(rank: int, world: int, per_node: int) -> dict:
    drv = _install_domain(rank, ("ab/1", ""))
    buf = commkit.Buffer(backend="kernels", timeout_s=60, num_ranks_per_node=per_node)
    backend = buf._backend
    results = []
    for case in CASES(world, per_node):
        x, topk_idx, weights = make_inputs(case, rank)
        out = buf.dispatch(x, topk_idx, weights, case.num_experts, num_sms=2)
        y = buf.combine(expert_output(out.x.to(torch.bfloat16), rank), out.handle, num_sms=2)
        fields = ("x", "x_scales", "topk_idx", "topk_weights", "num_tokens_per_expert")
        results.append(dict(**{f: getattr(out, f) for f in fields}, y=y.x))
    bases = backend.buffers.peer_bases.tolist()
    buf.close()
    assert buf.internode_transport == backend.transport
    return dict(transport=backend.transport, node_group=backend.node_group, gin=len(FakeGinTransport.made),
                results=results, bases=bases, left=(len(drv.mapped), len(drv.live_handles)))  # fmt: skip


def CASES(world: int, per_node: int) -> list[Case]:  # noqa: N802
    g: dict = dict(num_experts=4 * world, ranks_per_node=per_node)
    return [
        Case("uniform", (24,) * world, seed=1, **g),
        Case("odd", tuple(5 + 3 * r for r in range(world)), hidden=72, num_topk=3, unused=0.3, seed=2, **g),
    ]


def test_buffer_on_the_nvlink_domain_transport_equals_the_reference() -> None:
    world, per_node = 4, 2
    got = spawn_gloo(_nvlink_domain_run, world, per_node, timeout_s=300)
    for g in got:
        assert g["transport"] == "nvlink-domain" and g["node_group"] is None and g["gin"] == 0
        assert len(g["bases"]) == world and all(g["bases"])  # every rank's buffer, not only the node's
        assert g["left"] == (0, 0)
    for c, case in enumerate(CASES(world, per_node)):
        inputs = [make_inputs(case, r) for r in range(world)]
        ref = dispatch_reference([i[0] for i in inputs], [i[1] for i in inputs], [i[2] for i in inputs],
                                 case.num_experts)  # fmt: skip
        ys = combine_reference([expert_output(d.x.to(torch.bfloat16), q) for q, d in enumerate(ref)], ref,
                               list(case.tokens), per_node)  # fmt: skip
        for r in range(world):
            g = got[r]["results"][c]
            check_dispatch(g, ref[r], False, f"{case.name}, rank {r}")
            assert torch.equal(bits(g["y"]), bits(ys[r])), f"{case.name}, rank {r}"


def _forced(rank: int, world: int) -> list[str]:
    out = []
    _install_domain(rank, ("ab/1", "") if rank != 3 else (None, "no NVLink fabric info (fake)"))
    os.environ["COMMKIT_INTERNODE_TRANSPORT"] = "nvlink-domain"
    try:
        commkit.Buffer(backend="kernels", num_ranks_per_node=2)
        out.append("no error")
    except commkit.errors.ConfigError as exc:
        out.append(str(exc))
    os.environ["COMMKIT_INTERNODE_TRANSPORT"] = "auto"  # not one domain: GIN
    buf = commkit.Buffer(backend="kernels", num_ranks_per_node=2)
    out.append(buf.internode_transport)
    buf.close()
    return out


@pytest.mark.slow
def test_forced_nvlink_domain_without_one_domain_fails_on_every_rank() -> None:
    for error, transport in spawn_gloo(_forced, 4, timeout_s=120):
        assert error == (
            "COMMKIT_INTERNODE_TRANSPORT=nvlink-domain: the group is not one NVLink domain: rank 3 is in no "
            "NVLink domain: no NVLink fabric info (fake)"
        )
        assert transport == "gin"


def test_info_reports_the_nvlink_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    assert info.nvlink_domain_status("no CUDA device") == "not usable: no CUDA device"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(fabric, "local_fabric_domain", lambda index: ("ab/3", ""))
    assert info.nvlink_domain_status(None) == "usable: this GPU is in NVLink domain ab/3"
    monkeypatch.setattr(fabric, "local_fabric_domain", lambda index: (None, "no NVLink fabric info (x)"))
    assert info.nvlink_domain_status(None) == "not usable here: no NVLink fabric info (x)"


def test_a_bad_transport_value_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMKIT_INTERNODE_TRANSPORT", "infiniband")
    with pytest.raises(commkit.errors.ConfigError, match="COMMKIT_INTERNODE_TRANSPORT: expected one of"):
        internode_unavailable_reason(8, 4)
    monkeypatch.setenv("COMMKIT_INTERNODE_TRANSPORT", "nvlink-domain")
    assert internode_unavailable_reason(8, 4) is None  # no GIN headers needed
