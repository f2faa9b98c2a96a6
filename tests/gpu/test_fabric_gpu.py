"""GPU: the fabric-handle path's calls on a real driver. On a GPU outside a multi-node NVLink domain
(one H100/H200) the domain check must say why not without raising, and the driver adapter must either
work or raise FabricError naming the call; where fabric handles are supported, a world-size-1 group's
buffers are made (allocated, mapped, zeroed, exported) and freed."""

from __future__ import annotations

import pytest
import torch

from commkit.backends.fabric import CudaDriver, FabricError, local_fabric_domain

pytestmark = pytest.mark.gpu


def test_domain_check_answers_without_raising() -> None:
    domain, why = local_fabric_domain(0)
    print(f"NVLink domain of GPU 0: {domain!r} ({why})")
    assert (domain is None) == bool(why)
    # a real "no" (NVML's Not Supported, no fabric), never a misuse of the bindings
    assert "TypeError" not in why and "AttributeError" not in why, why


def test_driver_adapter_calls(tmp_path) -> None:  # noqa: ANN001
    driver = CudaDriver()
    supported = driver.fabric_supported(0)
    print(f"CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED = {supported}")
    try:
        granularity = driver.granularity(0)
    except FabricError as exc:
        assert str(exc).startswith("cuMemGetAllocationGranularity: CUDA_ERROR_")
        assert not supported
        return
    assert granularity > 0
    if not supported:
        return
    import torch.distributed as dist

    from commkit.backends.fabric import FabricBuffers

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        buf = FabricBuffers(None, torch.device("cuda", 0), max_num_sms=2, timeout_s=30.0)
        buf.ensure(2, 1024)
        (base,) = buf.peer_bases.tolist()
        assert base != 0
        buf.close()
    finally:
        dist.destroy_process_group()
