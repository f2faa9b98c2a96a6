"""The NCCL headers (and library) that the GIN device code is compiled against.

The GIN path (``csrc/net_gin.cuh``) is compiled against the headers of the NCCL that runs it: the
device API is inline code over structs whose layout changes between NCCL versions. The
``nvidia-nccl-cu12`` / ``nvidia-nccl-cu13`` wheels install them as the namespace package
``nvidia.nccl`` (``include/`` with ``nccl.h`` and ``nccl_device.h``, ``lib/libnccl.so.2``).

Environment: ``COMMKIT_NCCL_INCLUDE`` (a directory holding ``nccl.h``; overrides the package),
``COMMKIT_NCCL_LIB`` (the ``libnccl.so`` to load; default: the one next to the headers).

:func:`wheel_headers` downloads an ``nvidia-nccl-cu*`` wheel with pip into
``$COMMKIT_CACHE_DIR/nccl-wheels`` (default ``~/.cache/commkit/nccl-wheels``) and unpacks its include
directory (and, on request, its library): the compile tests use it to build against other NCCL versions
than the installed one. With ``offline=True`` (what the tests pass: they reach no network) it only looks
in that cache, and raises :class:`NcclHeadersError` when the wheel is not there.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MIN_VERSION = (2, 28, 7)  # the first NCCL with the GIN device API (ncclGin)
ENV_INCLUDE = "COMMKIT_NCCL_INCLUDE"
ENV_LIB = "COMMKIT_NCCL_LIB"
LIB_NAMES = ("libnccl.so.2", "libnccl.so")

_MACRO_RE = {
    name: re.compile(rf"^\s*#\s*define\s+NCCL_{name}\s+(\d+)\b", re.M) for name in ("MAJOR", "MINOR", "PATCH")
}


class NcclHeadersError(RuntimeError):
    """The NCCL headers (or library) are missing, unreadable or older than the GIN device API."""


def version_str(version: tuple[int, int, int]) -> str:
    return ".".join(str(v) for v in version)


def version_code(version: tuple[int, int, int]) -> int:
    """NCCL_VERSION_CODE of ``version`` (nccl.h's formula: X*10000 + Y*100 + Z since 2.9)."""
    major, minor, patch = version
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) from the ``NCCL_MAJOR/MINOR/PATCH`` macros of an ``nccl.h``."""
    found = {name: rx.search(text) for name, rx in _MACRO_RE.items()}
    missing = [f"NCCL_{name}" for name, m in found.items() if m is None]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in nccl.h")
    return (int(found["MAJOR"].group(1)), int(found["MINOR"].group(1)), int(found["PATCH"].group(1)))  # type: ignore[union-attr]


@dataclass(frozen=True)
class NcclHeaders:
    """An NCCL include directory that has the GIN device API."""

    include_dir: Path
    version: tuple[int, int, int]
    origin: str  # where it was found, for messages

    @property
    def version_code(self) -> int:
        return version_code(self.version)

    def library_candidates(self) -> list[Path]:
        """The libnccl next to the headers (wheel layout: ``include/`` and ``lib/`` side by side)."""
        return [self.include_dir.parent / "lib" / name for name in LIB_NAMES]


def check_headers(
    include_dir: Path, origin: str, min_version: tuple[int, int, int] = MIN_VERSION
) -> NcclHeaders:
    """The headers in ``include_dir``, or :class:`NcclHeadersError` saying what was found there."""
    header = include_dir / "nccl.h"
    if not header.is_file():
        raise NcclHeadersError(f"no nccl.h in {include_dir} ({origin})")
    try:
        version = parse_version(header.read_text(errors="replace"))
    except ValueError as exc:
        raise NcclHeadersError(f"cannot read the NCCL version of {header} ({origin}): {exc}") from None
    if version < min_version:
        raise NcclHeadersError(
            f"NCCL {version_str(version)} at {include_dir} ({origin}) is older than "
            f"{version_str(min_version)}, the first NCCL with the GIN device API: install "
            f"nvidia-nccl-cu12>={version_str(min_version)} (or -cu13), or set {ENV_INCLUDE} to newer headers"
        )
    if not (include_dir / "nccl_device.h").is_file():
        raise NcclHeadersError(
            f"NCCL {version_str(version)} at {include_dir} ({origin}) has no nccl_device.h (the device API)"
        )
    return NcclHeaders(include_dir.resolve(), version, origin)


def package_include_dir() -> Path | None:
    """``include/`` of the installed ``nvidia.nccl`` package (the nvidia-nccl-cu12/-cu13 wheels), if any."""
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or []:
        candidate = Path(location) / "include"
        if (candidate / "nccl.h").is_file():
            return candidate
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) / "include" if locations else None


def find_headers(min_version: tuple[int, int, int] = MIN_VERSION) -> NcclHeaders:
    """The headers to compile the GIN path against: ``COMMKIT_NCCL_INCLUDE``, else the nvidia.nccl package."""
    env = os.environ.get(ENV_INCLUDE)
    if env:
        return check_headers(Path(env), f"{ENV_INCLUDE}={env}", min_version)
    include = package_include_dir()
    if include is None:
        raise NcclHeadersError(
            f"NCCL headers not found: {ENV_INCLUDE} is not set and the nvidia.nccl package is not installed "
            f"(pip install 'nvidia-nccl-cu12>={version_str(min_version)}', or -cu13)"
        )
    return check_headers(include, f"package nvidia.nccl at {include.parent}", min_version)


def find_library(headers: NcclHeaders | None = None) -> Path:
    """The libnccl to load: ``COMMKIT_NCCL_LIB``, else the one next to ``headers``, else the system's."""
    env = os.environ.get(ENV_LIB)
    if env:
        if not Path(env).is_file():
            raise NcclHeadersError(f"{ENV_LIB}={env} is not a file")
        return Path(env)
    tried = []
    if headers is not None:
        for candidate in headers.library_candidates():
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    system = ctypes.util.find_library("nccl")
    if system:
        return Path(system)
    raise NcclHeadersError(
        f"libnccl not found (tried {tried or 'no package'} and the system library path); install "
        f"nvidia-nccl-cu12>={version_str(MIN_VERSION)} (or -cu13), or set {ENV_LIB}"
    )


# ---------------------------------------------------------------------------------------------------
# Headers of a given NCCL wheel (downloaded with pip, cached)
# ---------------------------------------------------------------------------------------------------

_WHEEL_RE = re.compile(r"^(?P<dist>nvidia_nccl_cu\d+)-(?P<version>\d+(?:\.\d+)*)-.*\.whl$")
_INCLUDE_PREFIX = "nvidia/nccl/include/"
_LIB_MEMBER = "nvidia/nccl/lib/libnccl.so.2"


def wheel_cache_dir() -> Path:
    base = os.environ.get("COMMKIT_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "commkit") / "nccl-wheels"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _cached_wheels(wheels: Path, dist: str) -> list[tuple[tuple[int, ...], Path]]:
    found = []
    for path in wheels.glob("*.whl") if wheels.is_dir() else []:
        m = _WHEEL_RE.match(path.name)
        if m and m.group("dist") == dist:
            found.append((_version_tuple(m.group("version")), path))
    return sorted(found)


def _unpack(wheel: Path, dest: Path, with_library: bool) -> None:
    """Extract the include directory (and the library) of ``wheel`` into ``dest``, atomically per part."""
    with zipfile.ZipFile(wheel) as zf:
        if not (dest / "include" / "nccl.h").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest, prefix=".include-") as tmp:
                for info in zf.infolist():
                    if info.filename.startswith(_INCLUDE_PREFIX) and not info.is_dir():
                        target = Path(tmp) / "include" / info.filename[len(_INCLUDE_PREFIX) :]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(info) as src, target.open("wb") as out:
                            shutil.copyfileobj(src, out)
                with contextlib.suppress(OSError):  # another process unpacked it first: same content
                    os.replace(Path(tmp) / "include", dest / "include")
        lib = dest / "lib" / Path(_LIB_MEMBER).name
        if with_library and not lib.is_file():
            (dest / "lib").mkdir(parents=True, exist_ok=True)
            staged = lib.with_name(f".{lib.name}.{os.getpid()}")
            with zf.open(_LIB_MEMBER) as src, staged.open("wb") as out:
                shutil.copyfileobj(src, out, length=1 << 22)
            os.replace(staged, lib)


def wheel_headers(
    requirement: str = "nvidia-nccl-cu12",
    *,
    cache: Path | None = None,
    with_library: bool = False,
    timeout_s: float = 1200.0,
    offline: bool = False,
) -> NcclHeaders:
    """Headers of the NCCL wheel ``requirement`` (``nvidia-nccl-cu12`` = latest, or ``...==2.28.9``).

    A pinned version already unpacked in the cache is used without pip. Otherwise ``pip download --no-deps``
    fetches the wheel into the cache (a no-op download when the newest wheel is already there) and its
    include directory is unpacked next to it; when pip fails (offline), an unpinned requirement falls back
    to the newest wheel in the cache. ``offline``: no pip at all: the wheel (or its unpacked headers, and
    the library when asked for) must be in the cache already, else :class:`NcclHeadersError`.
    """
    name, _, pinned = requirement.partition("==")
    dist = name.strip().replace("-", "_")
    root = (cache or wheel_cache_dir()).resolve()
    wheels = root / "wheels"

    def unpacked(version: tuple[int, ...], wheel: Path | None) -> NcclHeaders:
        dest = root / f"{dist}-{'.'.join(map(str, version))}"
        if wheel is not None:
            _unpack(wheel, dest, with_library)
        return check_headers(dest / "include", f"wheel {dist}=={'.'.join(map(str, version))} in {root}")

    if pinned:
        version = _version_tuple(pinned.strip())
        dest = root / f"{dist}-{pinned.strip()}"
        lib_ok = not with_library or (dest / "lib" / Path(_LIB_MEMBER).name).is_file()
        if (dest / "include" / "nccl.h").is_file() and lib_ok:
            return unpacked(version, None)
        cached = dict(_cached_wheels(wheels, dist))
        if version in cached:
            return unpacked(version, cached[version])

    if offline:
        return _offline_headers(root, dist, pinned.strip(), with_library, unpacked)
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(wheels),
        requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        error = None if proc.returncode == 0 else (proc.stderr.strip() or proc.stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    available = _cached_wheels(wheels, dist)
    if pinned:
        match = [w for v, w in available if v == _version_tuple(pinned.strip())]
        if not match:
            raise NcclHeadersError(f"could not download {requirement} ({' '.join(cmd)}): {error}")
        return unpacked(_version_tuple(pinned.strip()), match[0])
    if not available:
        raise NcclHeadersError(f"could not download {requirement} ({' '.join(cmd)}): {error}")
    version, wheel = available[-1]  # pip fetched the newest; offline: the newest cached
    return unpacked(version, wheel)


def _offline_headers(root: Path, dist: str, pinned: str, with_library: bool, unpacked) -> NcclHeaders:  # noqa: ANN001
    """``wheel_headers`` without pip: the newest (or the pinned) version in the cache, as a wheel or as
    headers unpacked there before (with the library next to them when ``with_library``)."""
    versions: dict[tuple[int, ...], Path | None] = {}
    for path in root.glob(f"{dist}-*") if root.is_dir() else []:
        text = path.name[len(dist) + 1 :]
        lib_ok = not with_library or (path / "lib" / Path(_LIB_MEMBER).name).is_file()
        if re.fullmatch(r"\d+(?:\.\d+)*", text) and (path / "include" / "nccl.h").is_file() and lib_ok:
            versions[_version_tuple(text)] = None
    for version, wheel in _cached_wheels(root / "wheels", dist):
        versions.setdefault(version, wheel)
    if pinned:
        versions = {v: w for v, w in versions.items() if v == _version_tuple(pinned)}
    if not versions:
        wanted = f"{dist}=={pinned}" if pinned else dist
        raise NcclHeadersError(
            f"{wanted} is not in the local wheel cache {root} (offline: no download; fill the cache with "
            f"commkit.jit.nccl.wheel_headers({wanted.replace('_', '-')!r}) where a network is reachable)"
        )
    version = max(versions)
    return unpacked(version, versions[version])
