"""InfiniBand ports from sysfs: ``<root>/class/infiniband/<dev>/ports/<port>/``.

Files read (Linux ``ib_core``):

- ``rate``: e.g. ``400 Gb/sec (4X NDR)``, the link's signalling data rate; peak bytes/s = Gb/s * 1e9 / 8
- ``state``: e.g. ``4: ACTIVE``
- ``link_layer``: ``InfiniBand`` or ``Ethernet`` (RoCE)
- ``counters/port_xmit_data`` and ``counters/port_rcv_data``: data octets divided by 4 (the IBA spec
  counts in 4-byte words), so bytes = value * 4

``root`` is a parameter (default ``/sys``) so tests read fixture trees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# NOTE: the IBA PortXmitData/PortRcvData counters count 32-bit words, not bytes.
IB_DATA_COUNTER_UNIT_BYTES = 4
COUNTER_FILES = {"tx": "port_xmit_data", "rx": "port_rcv_data"}

_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")


class CounterUnreadable(OSError):
    """A counter file that exists in principle but cannot be read here; the message says why."""


def parse_rate_gbit(text: str) -> float:
    """``'400 Gb/sec (4X NDR)'`` -> 400.0 (Gb/s). Raises ``ValueError`` on anything else."""
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"not an IB rate: {text.strip()!r}")
    return float(match.group(1))


def parse_state(text: str) -> str:
    """``'4: ACTIVE'`` -> ``'ACTIVE'``."""
    return text.strip().split(":", 1)[-1].strip()


@dataclass(frozen=True)
class IbPort:
    """One port of one HCA.

    rate_gbit: signalling rate in Gb/s from ``rate`` (None when unreadable, see ``problems``)
    """

    device: str
    port: int
    path: Path
    rate_gbit: float | None
    state: str | None
    link_layer: str | None
    problems: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.device}/{self.port}"

    @property
    def peak_bytes_per_s(self) -> float | None:
        """Per direction."""
        return None if self.rate_gbit is None else self.rate_gbit * 1e9 / 8

    def read_counter_bytes(self, direction: str) -> int:
        """Cumulative bytes for ``'tx'`` or ``'rx'`` (the 4-byte-unit counter times 4)."""
        path = self.path / "counters" / COUNTER_FILES[direction]
        try:
            text = path.read_text()
        except PermissionError as exc:
            raise CounterUnreadable(f"{path}: permission denied ({exc.strerror})") from exc
        except FileNotFoundError as exc:
            raise CounterUnreadable(f"{path}: no such file (driver does not expose it)") from exc
        except OSError as exc:
            raise CounterUnreadable(f"{path}: {exc.strerror or exc}") from exc
        try:
            return int(text.strip()) * IB_DATA_COUNTER_UNIT_BYTES
        except ValueError as exc:
            raise CounterUnreadable(f"{path}: not an integer: {text.strip()!r}") from exc


def _read_optional(path: Path, problems: list[str]) -> str | None:
    try:
        return path.read_text()
    except OSError as exc:
        problems.append(f"{path}: {exc.strerror or exc}")
        return None


def find_ports(root: str | Path = "/sys") -> list[IbPort]:
    """All ports under ``<root>/class/infiniband``, sorted by device then port; [] when there is none."""
    base = Path(root) / "class" / "infiniband"
    if not base.is_dir():
        return []
    ports: list[IbPort] = []
    for dev_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        ports_dir = dev_dir / "ports"
        if not ports_dir.is_dir():
            continue
        port_dirs = sorted((p for p in ports_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for port_dir in port_dirs:
            problems: list[str] = []
            rate_text = _read_optional(port_dir / "rate", problems)
            rate: float | None = None
            if rate_text is not None:
                try:
                    rate = parse_rate_gbit(rate_text)
                except ValueError as exc:
                    problems.append(f"{port_dir / 'rate'}: {exc}")
            state_text = _read_optional(port_dir / "state", problems)
            layer_text = _read_optional(port_dir / "link_layer", problems)
            ports.append(
                IbPort(
                    device=dev_dir.name,
                    port=int(port_dir.name),
                    path=port_dir,
                    rate_gbit=rate,
                    state=None if state_text is None else parse_state(state_text),
                    link_layer=None if layer_text is None else layer_text.strip(),
                    problems=tuple(problems),
                )
            )
    return ports


def nic_gbps(ports: list[IbPort]) -> float:
    """Fastest active port's peak in GB/s per direction (0.0 when there is no active port).

    Used in the cluster signature: with one NIC per GPU (the usual layout) this is the per-GPU NIC speed.
    """
    rates = [p.peak_bytes_per_s for p in ports if p.state == "ACTIVE" and p.peak_bytes_per_s]
    return max(rates) / 1e9 if rates else 0.0
