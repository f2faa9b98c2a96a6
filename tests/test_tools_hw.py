"""sysfs InfiniBand parsing, NVML conversions (through a fake pynvml) and the monitor's rates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from commkit.hw import sysfs_ib
from commkit.hw.nvml import Nvml, NvmlUnavailable, nvlink_gbps
from commkit.tools.monitor import Channel, Monitor, ib_channels, monitor, nvml_channels, plot_report
from tests._fake_pynvml import FakePynvml

SYSFS = Path(__file__).parent / "fixtures" / "sysfs_ib"


def test_parse_rate_and_state() -> None:
    assert sysfs_ib.parse_rate_gbit("400 Gb/sec (4X NDR)\n") == 400.0
    assert sysfs_ib.parse_rate_gbit("53.125 Gb/sec (1X HDR)") == 53.125
    assert sysfs_ib.parse_state("4: ACTIVE\n") == "ACTIVE"
    with pytest.raises(ValueError, match="not an IB rate"):
        sysfs_ib.parse_rate_gbit("fast")


def test_find_ports_reads_fixture_tree() -> None:
    ports = {p.name: p for p in sysfs_ib.find_ports(SYSFS)}
    assert sorted(ports) == ["mlx5_0/1", "mlx5_1/1", "mlx5_2/1"]
    ndr = ports["mlx5_0/1"]
    assert (ndr.rate_gbit, ndr.state, ndr.link_layer) == (400.0, "ACTIVE", "InfiniBand")
    assert ndr.peak_bytes_per_s == 50e9
    # The counters count 4-byte words.
    assert ndr.read_counter_bytes("tx") == 4000
    assert ndr.read_counter_bytes("rx") == 1000
    # Fastest active port: the NDR one (the 200 Gb/s port is down).
    assert sysfs_ib.nic_gbps(list(ports.values())) == 50.0


def test_unreadable_counters_say_why() -> None:
    ports = {p.name: p for p in sysfs_ib.find_ports(SYSFS)}
    with pytest.raises(sysfs_ib.CounterUnreadable, match="no such file"):
        ports["mlx5_1/1"].read_counter_bytes("tx")
    with pytest.raises(sysfs_ib.CounterUnreadable, match="not an integer"):
        ports["mlx5_2/1"].read_counter_bytes("tx")
    channels, unavailable = ib_channels(SYSFS)
    assert sorted(c.name for c in channels) == ["mlx5_0/1/rx", "mlx5_0/1/tx", "mlx5_2/1/rx"]
    reasons = dict(unavailable)
    assert "no such file" in reasons["ib mlx5_1/1/tx"]
    assert "not an integer" in reasons["ib mlx5_2/1/tx"]


def test_no_infiniband_is_reported(tmp_path: Path) -> None:
    assert sysfs_ib.find_ports(tmp_path) == []
    channels, unavailable = ib_channels(tmp_path)
    assert channels == [] and "no InfiniBand devices" in unavailable[0][1]


def test_nvml_conversions_through_fake() -> None:
    fake = FakePynvml()
    nvml = Nvml(fake)
    assert nvml.device_name(0) == "NVIDIA H100 80GB HBM3"
    assert nvml.cuda_driver_version() == "12.4"
    info = nvml.nvlink_info(0)
    assert info.links == list(range(18))
    assert info.peak_bytes_per_s[0] == 26562e6
    assert nvlink_gbps(nvml, 0) == pytest.approx(18 * 26.562)
    fake.advance()
    got = nvml.nvlink_bytes(0, [0, 17])
    assert got[(0, "tx")].value == 1953125 * 1024  # KiB -> bytes
    assert got[(0, "rx")].value == 3906250 * 1024
    assert got[(17, "rx")].value is None and got[(17, "rx")].error == "Not Supported"
    # PCIe gen5 x16: 3.938 GB/s per lane per direction after 128b/130b coding.
    assert nvml.pcie_peak_bytes_per_s(0) == pytest.approx(16 * 3.938e9)


def test_nvml_missing_library_is_unavailable() -> None:
    with pytest.raises(NvmlUnavailable, match="nvmlInit failed"):
        Nvml(FakePynvml(init_error=9))


def test_monitor_rates_from_recorded_nvml_and_sysfs(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    shutil.copytree(SYSFS, root)
    fake = FakePynvml()
    nv_channels, nv_unavailable = nvml_channels(Nvml(fake))
    ib, ib_unavailable = ib_channels(root)
    clock = iter([0.0, 1.0])
    mon = Monitor(nv_channels + ib, nv_unavailable + ib_unavailable, clock=lambda: next(clock))
    mon.sample()
    fake.advance()
    counter = root / "class/infiniband/mlx5_0/ports/1/counters/port_xmit_data"
    counter.write_text(str(1000 + 6_250_000_000) + "\n")  # 25 GB in 4-byte words
    mon.sample()
    rep = mon.report()
    stats = {s.name: s for s in rep.stats}
    assert stats["gpu0/link0/tx"].avg_gbps == pytest.approx(1953125 * 1024 / 1e9)
    assert stats["gpu0/link0/tx"].avg_util == pytest.approx(1953125 * 1024 / 26562e6)
    assert stats["gpu0/link1/tx"].avg_gbps == 0.0
    assert stats["gpu0/pcie/tx"].avg_gbps == pytest.approx(1.0)
    assert stats["mlx5_0/1/tx"].avg_gbps == pytest.approx(25.0)
    assert stats["mlx5_0/1/tx"].avg_util == pytest.approx(0.5)
    assert "gpu0/link17/rx" not in stats
    assert ("nvlink gpu0/link17/rx", "NVML: Not Supported") in rep.unavailable
    csv_path = tmp_path / "m.csv"
    rep.write_csv(csv_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("t_s,") and len(lines) == 2
    msg = plot_report(rep, tmp_path / "m.png")
    if msg is None:
        assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib" in msg


def test_counter_reset_is_not_a_rate() -> None:
    values = iter([100.0, 50.0, 150.0])
    clock = iter([0.0, 1.0, 2.0])
    mon = Monitor([Channel("ib", "x/1/tx", 10e9, lambda: next(values))], clock=lambda: next(clock))
    for _ in range(3):
        mon.sample()
    rep = mon.report()
    assert rep.gbps["x/1/tx"] == [0.0, 100 / 1e9]


def test_failing_channel_is_listed_and_others_go_on() -> None:
    def broken() -> float:
        raise PermissionError("denied")

    good = iter([0.0, 2e9, 4e9])
    with monitor(
        0.01, channels=[Channel("ib", "bad", None, broken), Channel("ib", "ok", None, lambda: next(good))]
    ) as mon:
        pass
    rep = mon.report()
    assert any(name == "bad" and "denied" in why for name, why in rep.unavailable)
    assert {s.name for s in rep.stats} == {"bad", "ok"}
