"""Sample NVLink, InfiniBand and PCIe byte counters while something runs.

``with monitor() as mon: ...`` samples in a background thread; afterwards ``mon.report()`` holds, per
channel (one link direction), the average and the highest GB/s between samples and the utilisation
against the channel's peak. A counter that cannot be read is listed in ``report.unavailable`` with the
reason and sampling goes on with the others.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commkit.hw import sysfs_ib
from commkit.hw.nvml import Nvml, NvmlUnavailable
from commkit.tools.report import MATPLOTLIB_MISSING, load_pyplot


@dataclass
class Channel:
    """One direction of one link: ``read()`` returns cumulative bytes."""

    kind: str  # "nvlink", "ib", "pcie"
    name: str  # "gpu0/link3/tx", "mlx5_0/1/rx", "gpu0/pcie/tx"
    peak_bytes_per_s: float | None
    read: Callable[[], float]


@dataclass
class ChannelStats:
    kind: str
    name: str
    peak_gbps: float | None
    avg_gbps: float
    max_gbps: float
    total_bytes: float

    @property
    def avg_util(self) -> float | None:
        return None if not self.peak_gbps else self.avg_gbps / self.peak_gbps

    @property
    def max_util(self) -> float | None:
        return None if not self.peak_gbps else self.max_gbps / self.peak_gbps


@dataclass
class MonitorReport:
    """``times_s[i]`` since start; ``gbps[name][i]`` the rate between sample i and i+1."""

    times_s: list[float]
    gbps: dict[str, list[float]]
    stats: list[ChannelStats]
    unavailable: list[tuple[str, str]] = field(default_factory=list)

    def write_csv(self, path: str | Path) -> None:
        """One row per interval: ``t_s`` (interval end) then one GB/s column per channel."""
        names = [s.name for s in self.stats]
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["t_s", *[f"{n} GB/s" for n in names]])
            for i, t in enumerate(self.times_s[1:]):
                writer.writerow([f"{t:.4f}", *[f"{self.gbps[n][i]:.4f}" for n in names]])

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": [
                {
                    "kind": s.kind,
                    "name": s.name,
                    "peak_gbps": s.peak_gbps,
                    "avg_gbps": s.avg_gbps,
                    "max_gbps": s.max_gbps,
                    "avg_util": s.avg_util,
                    "max_util": s.max_util,
                    "total_bytes": s.total_bytes,
                }
                for s in self.stats
            ],
            "unavailable": [{"counter": c, "reason": r} for c, r in self.unavailable],
        }


# --------------------------------------------------------------------------------------- sources
def ib_channels(root: str | Path = "/sys") -> tuple[list[Channel], list[tuple[str, str]]]:
    """A tx and an rx channel per IB port whose counters read now; the others go to ``unavailable``."""
    channels: list[Channel] = []
    unavailable: list[tuple[str, str]] = []
    ports = sysfs_ib.find_ports(root)
    if not ports:
        unavailable.append(("ib", f"no InfiniBand devices under {Path(root) / 'class' / 'infiniband'}"))
    for port in ports:
        for problem in port.problems:
            unavailable.append((f"ib {port.name} info", problem))
        for direction in ("tx", "rx"):
            name = f"{port.name}/{direction}"
            try:
                port.read_counter_bytes(direction)
            except sysfs_ib.CounterUnreadable as exc:
                unavailable.append((f"ib {name}", str(exc)))
                continue
            reader = lambda p=port, d=direction: p.read_counter_bytes(d)  # noqa: E731
            channels.append(Channel("ib", name, port.peak_bytes_per_s, reader))
    return channels, unavailable


def nvml_channels(
    nvml: Nvml, devices: list[int] | None = None
) -> tuple[list[Channel], list[tuple[str, str]]]:
    """NVLink per link and PCIe per GPU; counters NVML refuses go to ``unavailable`` with NVML's reason."""
    channels: list[Channel] = []
    unavailable: list[tuple[str, str]] = []
    indices = list(range(nvml.device_count())) if devices is None else devices
    for index in indices:
        info = nvml.nvlink_info(index)
        unavailable.extend((f"nvlink gpu{index}", p) for p in info.problems)
        if not info.links:
            unavailable.append((f"nvlink gpu{index}", "no active NVLink link"))
        first = nvml.nvlink_bytes(index, info.links) if info.links else {}
        for (link, direction), reading in first.items():
            name = f"gpu{index}/link{link}/{direction}"
            if reading.error is not None:
                unavailable.append((f"nvlink {name}", f"NVML: {reading.error}"))
                continue

            def read_link(i: int = index, lk: int = link, d: str = direction) -> float:
                value = nvml.nvlink_bytes(i, [lk])[(lk, d)]
                if value.value is None:
                    raise OSError(f"NVML: {value.error}")
                return value.value

            channels.append(Channel("nvlink", name, info.peak_bytes_per_s.get(link), read_link))
        try:
            pcie_peak: float | None = nvml.pcie_peak_bytes_per_s(index)
        except Exception as exc:
            pcie_peak = None
            unavailable.append((f"pcie gpu{index} peak", str(exc)))
        for direction, reading in nvml.pcie_bytes(index).items():
            name = f"gpu{index}/pcie/{direction}"
            if reading.error is not None:
                unavailable.append((f"pcie {name}", f"NVML: {reading.error}"))
                continue

            def read_pcie(i: int = index, d: str = direction) -> float:
                value = nvml.pcie_bytes(i)[d]
                if value.value is None:
                    raise OSError(f"NVML: {value.error}")
                return value.value

            channels.append(Channel("pcie", name, pcie_peak, read_pcie))
    return channels, unavailable


def default_channels(
    sysfs_root: str | Path = "/sys", nvml_module: Any | None = None, devices: list[int] | None = None
) -> tuple[list[Channel], list[tuple[str, str]]]:
    """IB from sysfs plus NVLink/PCIe from NVML, each part skipped (with its reason) when unavailable."""
    channels, unavailable = ib_channels(sysfs_root)
    try:
        nvml = Nvml(nvml_module)
    except NvmlUnavailable as exc:
        unavailable.append(("nvlink, pcie", str(exc)))
    else:
        nv_channels, nv_unavailable = nvml_channels(nvml, devices)
        channels += nv_channels
        unavailable += nv_unavailable
    return channels, unavailable


# --------------------------------------------------------------------------------------- sampling
class Monitor:
    """Samples ``channels`` every ``interval_s`` on a daemon thread between ``start()`` and ``stop()``."""

    def __init__(
        self,
        channels: list[Channel],
        unavailable: list[tuple[str, str]] | None = None,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.channels = list(channels)
        self.unavailable = list(unavailable or [])
        self.interval_s = interval_s
        self._clock = clock
        self._times: list[float] = []
        self._values: list[dict[str, float | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Read every channel once (public so that tests and callers can drive sampling themselves)."""
        t = self._clock()
        row: dict[str, float | None] = {}
        for ch in self.channels:
            try:
                row[ch.name] = float(ch.read())
            except Exception as exc:
                row[ch.name] = None
                reason = f"read failed during sampling: {exc}"
                if (ch.name, reason) not in self.unavailable:
                    self.unavailable.append((ch.name, reason))
        self._times.append(t)
        self._values.append(row)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> Monitor:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="commkit-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MonitorReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.report()

    def report(self) -> MonitorReport:
        return summarize(self.channels, self._times, self._values, self.unavailable)


def summarize(
    channels: list[Channel],
    times: list[float],
    values: list[dict[str, float | None]],
    unavailable: list[tuple[str, str]],
) -> MonitorReport:
    """Rates between consecutive samples; an interval with a missing or decreasing value counts 0 GB/s.

    NOTE: a decreasing counter means a reset (or a wrap of an old 32-bit IB counter); that interval's
    traffic is unknown and reported as 0 rather than as a huge negative or positive rate.
    """
    t0 = times[0] if times else 0.0
    rel = [t - t0 for t in times]
    rates: dict[str, list[float]] = {}
    stats: list[ChannelStats] = []
    for ch in channels:
        series: list[float] = []
        total = 0.0
        for i in range(1, len(times)):
            a, b = values[i - 1].get(ch.name), values[i].get(ch.name)
            dt = times[i] - times[i - 1]
            if a is None or b is None or b < a or dt <= 0:
                series.append(0.0)
                continue
            series.append((b - a) / dt / 1e9)
            total += b - a
        rates[ch.name] = series
        span = rel[-1] if rel else 0.0
        stats.append(
            ChannelStats(
                kind=ch.kind,
                name=ch.name,
                peak_gbps=None if ch.peak_bytes_per_s is None else ch.peak_bytes_per_s / 1e9,
                avg_gbps=total / span / 1e9 if span > 0 else 0.0,
                max_gbps=max(series, default=0.0),
                total_bytes=total,
            )
        )
    return MonitorReport(times_s=rel, gbps=rates, stats=stats, unavailable=list(unavailable))


@contextmanager
def monitor(
    interval_s: float = 0.1,
    *,
    sysfs_root: str | Path = "/sys",
    nvml_module: Any | None = None,
    devices: list[int] | None = None,
    channels: list[Channel] | None = None,
) -> Iterator[Monitor]:
    """Sample hardware counters while the block runs; ``mon.report()`` afterwards.

    >>> with monitor(0.05) as mon:
    ...     run_step()
    >>> print_report(mon.report())
    """
    unavailable: list[tuple[str, str]] = []
    if channels is None:
        channels, unavailable = default_channels(sysfs_root, nvml_module, devices)
    mon = Monitor(channels, unavailable, interval_s)
    mon.start()
    try:
        yield mon
    finally:
        mon.stop()


def plot_report(report: MonitorReport, path: str | Path) -> str | None:
    """PNG time series, one line per channel; returns a message instead when matplotlib is missing."""
    plt = load_pyplot()
    if plt is None:
        return MATPLOTLIB_MISSING
    fig, ax = plt.subplots(figsize=(10, 5))
    for s in report.stats:
        ax.plot(report.times_s[1:], report.gbps[s.name], label=s.name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GB/s")
    ax.set_title("commkit monitor: link throughput")
    if report.stats:
        ax.legend(fontsize="small", ncol=2)
    else:
        # NOTE: an empty axis would read as "no traffic"; say that nothing could be read, and why
        why = "\n".join(f"{counter}: {reason}" for counter, reason in report.unavailable[:8])
        ax.text(
            0.5, 0.5, "no readable counter: nothing was sampled" + (f"\n\n{why}" if why else ""),
            ha="center", va="center", transform=ax.transAxes, fontsize="small", wrap=True,
        )  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
