"""Where a ``Buffer``'s configuration comes from: explicit arguments, a tuning profile, or defaults.

A profile is a JSON file written by ``python -m commkit tune`` and keyed by the cluster signature
(device name, SM count, ranks, ranks per node, NVLink and NIC speed). ``resolve_config`` applies
the precedence

    explicit argument  >  profile whose signature (and backend) matches exactly  >  default

and states the source and the reason of the choice so that ``buf.config`` can show it.

Profiles live in ``$COMMKIT_PROFILE_DIR`` or, when unset, ``profiles`` in the user cache directory
(``platformdirs.user_cache_path("commkit")``: ``$XDG_CACHE_HOME/commkit``, by default
``~/.cache/commkit``, on Linux).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from commkit.errors import ConfigError
from commkit.hw import sysfs_ib
from commkit.hw.nvml import Nvml, NvmlUnavailable, nvlink_gbps
from commkit.user_dirs import user_cache_dir

# NOTE: DeepSeek-V3 gives 20 of 132 SMs of an H800 to communication (shared/peers.md); without a
# profile for this cluster that is the starting point.
DEFAULT_NUM_SMS = 20
PROFILE_FORMAT = 1
PROFILE_DIR_ENV = "COMMKIT_PROFILE_DIR"


@dataclass(frozen=True)
class ClusterSignature:
    """What a tuning result depends on. Speeds are GB/s per direction, rounded to 0.1 (0.0: none).

    device_name:        e.g. ``NVIDIA H800`` (``cpu`` without CUDA)
    num_device_sms:     SMs of one GPU (0 on CPU)
    num_ranks:          ranks of the group
    num_ranks_per_node: ranks sharing a node (NVLink domain)
    nvlink_gbps:        sum of one GPU's active NVLink links
    nic_gbps:           fastest active InfiniBand port of the node
    """

    device_name: str
    num_device_sms: int
    num_ranks: int
    num_ranks_per_node: int
    nvlink_gbps: float
    nic_gbps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "nvlink_gbps", round(float(self.nvlink_gbps), 1))
        object.__setattr__(self, "nic_gbps", round(float(self.nic_gbps), 1))

    @property
    def key(self) -> str:
        """File-name-safe key, e.g. ``nvidia-h800-132sm-16r-8pn-nvl160.0-nic50.0``."""
        device = re.sub(r"[^a-z0-9]+", "-", self.device_name.lower()).strip("-") or "unknown"
        return (
            f"{device}-{self.num_device_sms}sm-{self.num_ranks}r-{self.num_ranks_per_node}pn"
            f"-nvl{self.nvlink_gbps:.1f}-nic{self.nic_gbps:.1f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSignature:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"cluster signature lacks {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})

    def differences(self, other: ClusterSignature) -> list[str]:
        """``['num_ranks 8 != 16', ...]``: fields where ``other`` differs from ``self``."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} {theirs!r} != {mine!r}")
        return out


@dataclass
class Profile:
    """A tuning result for one cluster signature and backend.

    num_sms:     SM budget ``Buffer`` uses when no ``num_sms`` is given
    objective:   ``fastest`` or ``hide:<compute_ms>`` (smallest budget whose communication hides)
    reason:      why ``tune`` picked ``num_sms``
    knobs:       kernel parameters picked alongside (chunk sizes), name -> value
    per_sm_gbps: ``{"dispatch": GB/s per SM, "combine": ...}`` read by the performance model; values
                 are None when the backend does not run on a given number of SMs
    extra:       the sweep and anything else ``tune`` records (kept as written)
    """

    signature: ClusterSignature
    backend: str
    num_sms: int
    objective: str
    reason: str
    knobs: dict[str, int] = field(default_factory=dict)
    per_sm_gbps: dict[str, float | None] = field(default_factory=dict)
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"{self.signature.key}-{self.backend}.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "key": self.signature.key,
            "signature": self.signature.to_dict(),
            "backend": self.backend,
            "num_sms": self.num_sms,
            "objective": self.objective,
            "reason": self.reason,
            "knobs": dict(self.knobs),
            "per_sm_gbps": dict(self.per_sm_gbps),
            "created": self.created,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile format {data.get('format')!r}, expected {PROFILE_FORMAT}")
        known = {"format", "key", "signature", "backend", "num_sms", "objective", "reason", "knobs",
                 "per_sm_gbps", "created"}  # fmt: skip
        num_sms = data.get("num_sms")
        if not isinstance(num_sms, int) or num_sms < 1:
            raise ValueError(f"profile num_sms must be a positive int, got {num_sms!r}")
        return cls(
            signature=ClusterSignature.from_dict(data["signature"]),
            backend=str(data.get("backend", "")),
            num_sms=num_sms,
            objective=str(data.get("objective", "")),
            reason=str(data.get("reason", "")),
            knobs=_int_knobs(data.get("knobs", {})),
            per_sm_gbps=dict(data.get("per_sm_gbps", {})),
            created=str(data.get("created", "")),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _int_knobs(knobs: Any) -> dict[str, int]:
    """A profile's knobs: integers only (a float, a string or a bool is an error, never truncated)."""
    if not isinstance(knobs, dict):
        raise ValueError(f"profile knobs: expected an object of name -> int, got {knobs!r}")
    for name, value in knobs.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"profile knob {name!r}: expected an int, got {value!r}")
    return {str(k): v for k, v in knobs.items()}


@dataclass(frozen=True)
class BufferConfig:
    """The configuration a ``Buffer`` runs with.

    num_sms:   SMs of communication workers
    source:    'argument', 'profile:<path>' or 'default'
    reason:    why (which profile matched, or why none did)
    knobs:     further kernel parameters from the profile, as (name, value) pairs
    signature: the cluster signature profiles were matched against (None: not looked up)
    """

    num_sms: int
    source: str
    reason: str
    knobs: tuple[tuple[str, int], ...] = ()
    signature: ClusterSignature | None = None


# --------------------------------------------------------------------------------------- store
def profile_dir(directory: str | Path | None = None) -> Path:
    """``directory``, else ``$COMMKIT_PROFILE_DIR``, else ``profiles`` in ``user_cache_dir()``."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(PROFILE_DIR_ENV)
    if env:
        return Path(env)
    return user_cache_dir() / "profiles"


def save_profile(profile: Profile, directory: str | Path | None = None) -> Path:
    """Write ``<dir>/<signature key>-<backend>.json`` atomically (temporary file, then rename), with the
    permissions of any file the user creates (0666 less the umask: group-readable under the usual 022,
    not the 0600 of a ``mkstemp`` file): profiles of a cluster are shared by its users' jobs."""
    target_dir = profile_dir(directory)
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / profile.file_name
    tmp = target_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex}.json"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(profile.to_dict(), fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_profiles(directory: str | Path | None = None) -> tuple[list[tuple[Path, Profile]], list[str]]:
    """All readable profiles in the directory and, separately, why the others were skipped."""
    base = profile_dir(directory)
    loaded: list[tuple[Path, Profile]] = []
    problems: list[str] = []
    if not base.is_dir():
        return loaded, problems
    for path in sorted(base.glob("*.json")):
        try:
            loaded.append((path, Profile.from_dict(json.loads(path.read_text()))))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name}: {exc}")
    return loaded, problems


def find_profile(
    signature: ClusterSignature, *, backend: str | None = None, directory: str | Path | None = None
) -> tuple[tuple[Path, Profile] | None, str]:
    """The profile whose signature equals ``signature`` (and whose backend is ``backend`` if given).

    Only an exact match is used: an SM budget tuned for other speeds or another rank layout is not a
    safe guess. Among several exact matches the newest (``created``) wins. The string explains the
    outcome, naming the closest profile and its differing fields when none matches.
    """
    base = profile_dir(directory)
    profiles, problems = load_profiles(base)
    skipped = f"; skipped unreadable: {'; '.join(problems)}" if problems else ""
    if not profiles:
        return None, f"no profiles in {base}{skipped}"
    exact = [(p, prof) for p, prof in profiles if prof.signature == signature]
    if backend is not None:
        other_backend = [(p, prof) for p, prof in exact if prof.backend != backend]
        exact = [(p, prof) for p, prof in exact if prof.backend == backend]
        if not exact and other_backend:
            names = ", ".join(f"{p.name} (backend {prof.backend})" for p, prof in other_backend)
            return None, f"profiles for this cluster were tuned for another backend than {backend!r}: {names}"
    if exact:
        exact.sort(key=lambda item: item[1].created)
        path, prof = exact[-1]
        note = f" (newest of {len(exact)} matching)" if len(exact) > 1 else ""
        return (path, prof), f"cluster signature {signature.key} matches {path}{note}{skipped}"
    closest_path, closest = min(profiles, key=lambda item: len(signature.differences(item[1].signature)))
    diffs = ", ".join(signature.differences(closest.signature))
    return None, (
        f"no profile in {base} matches cluster signature {signature.key}; closest {closest_path.name} "
        f"differs in {diffs}{skipped}"
    )


# --------------------------------------------------------------------------------------- signature
def cluster_signature(
    group: Any = None,
    device: Any = None,
    *,
    sysfs_root: str | Path = "/sys",
    nvml_module: Any = None,
) -> ClusterSignature:
    """This process's view of the cluster; reads only local state (no collective).

    ranks: ``torch.distributed`` world size of ``group`` (1 when not initialised); ranks per node:
    ``$LOCAL_WORLD_SIZE`` (set by torchrun), else all ranks (one node, as with spawned or virtual ranks);
    device: the CUDA device (``device`` or the current one), ``cpu`` without CUDA; NVLink from NVML and
    the NIC from sysfs, 0.0 where unreadable.
    """


    num_ranks = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    num_ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", num_ranks))
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None else None
        index = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(index)
        device_name, num_sms = props.name, int(props.multi_processor_count)
        try:
            nvml = Nvml(nvml_module)
            try:
                nvl = nvlink_gbps(nvml, index)
            finally:
                nvml.close()
        except (NvmlUnavailable, Exception):
            nvl = 0.0
    else:
        device_name, num_sms, nvl = "cpu", 0, 0.0
    nic = sysfs_ib.nic_gbps(sysfs_ib.find_ports(sysfs_root))
    return ClusterSignature(device_name, num_sms, num_ranks, num_ranks_per_node, nvl, nic)


# --------------------------------------------------------------------------------------- resolve
def resolve_config(
    num_sms: int | None = None,
    *,
    signature: ClusterSignature | None = None,
    group: Any = None,
    device: Any = None,
    backend: str | None = None,
    profile_directory: str | Path | None = None,
    use_profiles: bool = True,
) -> BufferConfig:
    """Pick the SM budget: an explicit ``num_sms`` wins, then a matching profile, then the default.

    The signature is ``signature`` when given, else ``cluster_signature(group, device)`` (local reads
    only, safe to call on every rank). ``backend`` restricts profiles to those tuned with that backend.
    ``use_profiles=False`` skips the lookup (the reason says so).
    """
    if num_sms is not None:
        if int(num_sms) < 1:

            raise ConfigError(f"num_sms must be >= 1, got {num_sms}")
        return BufferConfig(num_sms=int(num_sms), source="argument", reason="num_sms given by the caller")
    default_reason = f"DeepSeek-V3's {DEFAULT_NUM_SMS} SMs (20 of 132 on H800)"
    if not use_profiles:
        return BufferConfig(
            DEFAULT_NUM_SMS, "default", f"no num_sms given and profile lookup disabled: {default_reason}"
        )
    if signature is None:
        signature = cluster_signature(group, device)
    found, why = find_profile(signature, backend=backend, directory=profile_directory)
    if found is None:
        return BufferConfig(
            DEFAULT_NUM_SMS, "default", f"no num_sms given and {why}: {default_reason}", signature=signature
        )
    path, prof = found
    return BufferConfig(
        num_sms=prof.num_sms,
        source=f"profile:{path}",
        reason=f"{why}; tuned for {prof.objective}: {prof.reason}",
        knobs=tuple(sorted(prof.knobs.items())),
        signature=signature,
    )
