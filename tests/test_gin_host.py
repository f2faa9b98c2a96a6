"""CPU: the NCCL header lookup (commkit/jit/nccl.py) and the host side of the GIN transport
(commkit/backends/gin/) as far as they run without a GPU.

Checked here: version parsing and the errors for missing / too old headers; the struct-layout probe
against the headers of the installed-or-latest nvidia-nccl-cu12 and of 2.28.9; GinNet packed in Python
reads back field by field in C; the requirements carry NCCL's initializer; the libnccl of each wheel
exports every function the binding calls and reports the headers' version; NCCL errors name the call and
NCCL's error string; GinTransport fails with a clear error where there is no GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _nvcc import GIN_HEADER_SETS, build_host_program, gin_headers, requires_nvcc

from commkit.backends import gin
from commkit.backends.gin import transport as gin_transport
from commkit.jit import nccl
from commkit.launch import spawn_gloo

FIXTURES = Path(__file__).parent / "fixtures" / "nccl_h"
REPO = Path(__file__).resolve().parent.parent

INTER = {
    "num_nodes": 4,
    "gpus_per_node": 8,
    "max_channels": 24,
    "nvl_slot_bytes": 14592,
    "net_slot_bytes": 14464,
    "signals_offset": 1 << 20,
    "nvl_ring_offset": (1 << 20) + 4096,
    "net_ring_offset": 3 << 30,
    "net_stage_offset": 5 << 30,
}


# ---------------------------------------------------------------------------------------------------
# commkit/jit/nccl.py
# ---------------------------------------------------------------------------------------------------


def test_parse_version_of_fixture_headers() -> None:
    assert nccl.parse_version((FIXTURES / "2.28.9" / "nccl.h").read_text()) == (2, 28, 9)
    assert nccl.parse_version((FIXTURES / "2.27.7" / "nccl.h").read_text()) == (2, 27, 7)
    with pytest.raises(ValueError, match="NCCL_MINOR"):
        nccl.parse_version((FIXTURES / "no_version" / "nccl.h").read_text())
    # NCCL_VERSION_CODE as nccl.h computes it (the fixtures define it too)
    assert nccl.version_code((2, 28, 9)) == 22809 and nccl.version_code((2, 8, 4)) == 2804
    assert "#define NCCL_VERSION_CODE 22809" in (FIXTURES / "2.28.9" / "nccl.h").read_text()


def test_too_old_missing_and_unreadable_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(nccl.NcclHeadersError, match=r"NCCL 2\.27\.7 at .*2\.27\.7.* is older than 2\.28\.7"):
        nccl.check_headers(FIXTURES / "2.27.7", "fixture")
    with pytest.raises(nccl.NcclHeadersError, match="cannot read the NCCL version"):
        nccl.check_headers(FIXTURES / "no_version", "fixture")
    with pytest.raises(nccl.NcclHeadersError, match="no nccl.h in"):
        nccl.check_headers(tmp_path, "fixture")

    # Environment override: found, too old, pointing nowhere
    monkeypatch.setenv(nccl.ENV_INCLUDE, str(FIXTURES / "2.28.9"))
    found = nccl.find_headers()
    assert found.version == (2, 28, 9) and nccl.ENV_INCLUDE in found.origin
    monkeypatch.setenv(nccl.ENV_INCLUDE, str(FIXTURES / "2.27.7"))
    with pytest.raises(nccl.NcclHeadersError, match=rf"older than 2\.28\.7.*{nccl.ENV_INCLUDE}"):
        nccl.find_headers()
    monkeypatch.setenv(nccl.ENV_INCLUDE, str(tmp_path / "nowhere"))
    with pytest.raises(nccl.NcclHeadersError, match=rf"no nccl.h in .*nowhere \({nccl.ENV_INCLUDE}="):
        nccl.find_headers()

    # Neither the variable nor the package
    monkeypatch.delenv(nccl.ENV_INCLUDE)
    monkeypatch.setattr(nccl, "package_include_dir", lambda: None)
    with pytest.raises(nccl.NcclHeadersError, match=r"NCCL headers not found: .*nvidia-nccl-cu12>=2\.28\.7"):
        nccl.find_headers()


def test_headers_of_the_nvidia_nccl_package(tmp_path: Path) -> None:
    # The wheels' layout: site-packages/nvidia/nccl/{include,lib} (a namespace package without __init__)
    include = tmp_path / "site" / "nvidia" / "nccl" / "include"
    include.mkdir(parents=True)
    for name in ("nccl.h", "nccl_device.h"):
        (include / name).write_text((FIXTURES / "2.28.9" / name).read_text())
    code = "from commkit.jit import nccl; h = nccl.find_headers(); print(h.version, h.include_dir)"
    env = {k: v for k, v in os.environ.items() if k != nccl.ENV_INCLUDE}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO)])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == f"(2, 28, 9) {include.resolve()}"


def test_library_lookup_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(nccl.ENV_LIB, str(tmp_path / "libnccl.so.2"))
    with pytest.raises(nccl.NcclHeadersError, match=f"{nccl.ENV_LIB}=.* is not a file"):
        nccl.find_library()
    monkeypatch.delenv(nccl.ENV_LIB)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    headers = nccl.check_headers(FIXTURES / "2.28.9", "fixture")  # no lib/ next to the fixture
    with pytest.raises(nccl.NcclHeadersError, match=r"libnccl not found \(tried .*libnccl.so.2"):
        nccl.find_library(headers)
    with pytest.raises(gin.NcclError, match="cannot load libnccl from"):
        gin.NcclLibrary(tmp_path / "missing.so")
    with pytest.raises(gin.NcclError, match=r"does not export \['ncclGetVersion'"):
        gin.NcclLibrary("libc.so.6")  # loads, but is no NCCL


def test_cupy_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match=r"needs CuPy: pip install 'commkit\[cu12\]'"):
        gin_transport._cupy_runtime()


# ---------------------------------------------------------------------------------------------------
# Real NCCL headers and libraries (wheels cached by commkit.jit.nccl.wheel_headers)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=GIN_HEADER_SETS)
def headers(request: pytest.FixtureRequest) -> nccl.NcclHeaders:
    return gin_headers(request.param, with_library=True)


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="module")
def library(headers: nccl.NcclHeaders) -> gin.NcclLibrary:
    path = nccl.find_library(headers)
    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        pytest.skip(f"{path} cannot be loaded here (no driver?): {exc}")
    return gin.NcclLibrary(path)


def test_library_exports_every_symbol_and_matches_headers(headers: nccl.NcclHeaders) -> None:
    path = nccl.find_library(headers)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        pytest.skip(f"{path} cannot be loaded here (no driver?): {exc}")
    missing = [name for name in gin.NCCL_SYMBOLS if not hasattr(lib, name)]
    assert not missing, f"{path} lacks {missing}"
    assert gin.load_library(headers).version_code() == headers.version_code


def test_nccl_errors_name_the_call_and_the_reason(library: gin.NcclLibrary) -> None:
    # A NULL out-argument: refused by every NCCL version, with or without a GPU
    with pytest.raises(gin.NcclError, match=r"ncclGetUniqueId failed: invalid argument.*last error: .*NULL"):
        library.call("ncclGetUniqueId", None)
    with pytest.raises(AssertionError, match="not in NCCL_SYMBOLS"):
        library.call("ncclAllReduce")


@requires_nvcc
@pytest.mark.slow
def test_layout_probe_and_requirements(headers: nccl.NcclHeaders, probe_cache: Path) -> None:
    layout = gin.probe_layout(headers, cache=probe_cache)
    entries = list((probe_cache / "gin-layout").glob("*.json"))
    assert gin.probe_layout(headers, cache=probe_cache) == layout  # from the cache
    assert list((probe_cache / "gin-layout").glob("*.json")) == entries
    print(f"NCCL {nccl.version_str(headers.version)}: {layout.sizes}")
    assert layout.version_code == headers.version_code
    assert layout.strong_signals == (headers.version >= (2, 30, 5))
    assert layout.unique_id_bytes == 128 and layout.win_coll_symmetric == 1
    assert layout.net_slots == 16
    assert layout.size("ncclDevComm") > 0 and layout.size("ncclDevCommRequirements") > 0
    assert layout.sizes["GinNet"] == (80, 8) and layout.sizes["InterLayout"] == (56, 8)
    assert layout.fields["ncclDevComm.rank"][1] == 4
    assert layout.fields["ncclDevComm.ginContextCount"][1] in (1, 4)  # uint8_t (2.28), uint32_t (2.32)
    # The backends of the devComm's contexts (2.28: ginTypes[4]) or connections (ginNetDeviceTypes)
    assert layout.fields["ncclDevComm.ginBackendCount"][1] in (1, 4)
    assert layout.fields["ncclDevComm.ginBackends"][1] >= 4
    _check_backend_types(layout)

    reqs = gin.requirements_bytes(layout, signal_count=4 * 24 * 4, context_count=4)
    assert len(reqs) == layout.size("ncclDevCommRequirements")
    for name, value in (("ginSignalCount", 384), ("ginContextCount", 4), ("ginCounterCount", 0)):
        offset, size = layout.fields[f"ncclDevCommRequirements.{name}"]
        assert int.from_bytes(reqs[offset : offset + size], "little") == value
    if headers.version >= (2, 29, 0):  # NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER: size, magic, version first
        size, magic, version = struct.unpack_from("<QII", reqs)
        assert (size, version) == (len(reqs), headers.version_code) and magic != 0


def _check_backend_types(layout: gin.GinLayout) -> None:
    """GinTransport.backend_types reads the used entries of a devComm as NCCL would have filled it."""
    devcomm = ctypes.create_string_buffer(layout.size("ncclDevComm"))
    offset, size = layout.fields["ncclDevComm.ginBackends"]
    count_offset, count_size = layout.fields["ncclDevComm.ginBackendCount"]
    devcomm[offset : offset + 3] = bytes([3, 3, 5])  # the third entry is past the count: unused
    devcomm[count_offset : count_offset + count_size] = (2).to_bytes(count_size, "little")
    transport = gin.GinTransport.__new__(gin.GinTransport)
    transport.layout, transport._devcomm_ptr = layout, ctypes.addressof(devcomm)
    assert transport.backend_types == (3,)
    assert gin.backend_defines(transport.backend_types)[1] == "-DNCCL_GIN_GDAKI_ENABLE=1"


DECODE = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "csrc/net_gin.cuh"
int main(int argc, char** argv) {
    unsigned char bytes[sizeof(commkit::GinNet)];
    for (size_t i = 0; i < sizeof(bytes); ++i) {
        char hex[3] = {argv[1][2 * i], argv[1][2 * i + 1], 0};
        bytes[i] = (unsigned char)strtoul(hex, nullptr, 16);
    }
    commkit::GinNet net;
    memcpy(&net, bytes, sizeof(net));
    const commkit::InterLayout& l = net.layout;
    printf("%llu %llu %llu %d %d %d %d %d %lld %lld %lld %lld\n", (unsigned long long)net.comm,
           (unsigned long long)net.window, (unsigned long long)net.base, l.num_nodes, l.gpus_per_node,
           l.max_channels, l.nvl_slot_bytes, l.net_slot_bytes, (long long)l.signals_offset,
           (long long)l.nvl_ring_offset, (long long)l.net_ring_offset, (long long)l.net_stage_offset);
}
"""


@requires_nvcc
@pytest.mark.slow
def test_packed_gin_net_reads_back_in_c(headers: nccl.NcclHeaders, probe_cache: Path, tmp_path: Path) -> None:
    layout = gin.probe_layout(headers, cache=probe_cache)
    pointers = {"comm": 0x7F00_0000_1000, "window": 0x7F00_0000_2000, "base": 0x7E00_0000_0000}
    packed = gin.pack_gin_net(layout, inter=INTER, **pointers)
    assert len(packed) == layout.size("GinNet")

    arg = np.frombuffer(packed, dtype=gin.gin_net_dtype(layout))[0]
    assert arg.dtype.itemsize == 80 and arg.dtype.alignment == 8
    assert int(arg["net_stage_offset"]) == INTER["net_stage_offset"]
    assert int(arg["window"]) == pointers["window"]

    exe = build_host_program(
        tmp_path, "decode", DECODE, "--diag-suppress=177", "-I", str(headers.include_dir)
    )
    out = subprocess.run([str(exe), packed.hex()], capture_output=True, text=True, check=True)
    expected = [*pointers.values(), *(INTER[name] for name in gin.INTER_LAYOUT_FIELDS)]
    assert [int(v) for v in out.stdout.split()] == expected


@requires_nvcc
def test_transport_without_gpu_fails_clearly(headers: nccl.NcclHeaders, probe_cache: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test checks the error path without one")
    nccl.find_library(headers)  # the library next to the headers (the fixture unpacked it)
    script = textwrap.dedent(
        """
        import torch.distributed as dist
        from commkit.backends.gin import GinTransport, NcclError
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            GinTransport(dist.group.WORLD, num_nodes=1, gpus_per_node=1, max_channels=4, buffer_bytes=1 << 20)
        except NcclError as exc:
            print("NcclError:", exc)
        finally:
            dist.destroy_process_group()
        """
    )
    env = dict(os.environ, COMMKIT_NCCL_INCLUDE=str(headers.include_dir), COMMKIT_CACHE_DIR=str(probe_cache))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop(nccl.ENV_LIB, None)
    cmd = [sys.executable, "-c", script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("NcclError: ncclCommInitRank failed: "), proc.stdout + proc.stderr
    assert "cuda" in proc.stdout.lower()  # NCCL's reason: no usable CUDA driver here


class _RecordingLibrary:
    """NCCL's calls as ``GinTransport`` makes them, recorded; buffers and windows get fresh fake
    addresses, and ncclDevCommCreate fills rank, nRanks and ginContextCount as NCCL would."""

    def __init__(self, layout: gin.GinLayout, rank: int, num_ranks: int) -> None:
        self.layout, self.rank, self.num_ranks = layout, rank, num_ranks
        self.calls: list[str] = []
        self.next_address = 0x1000

    def _fresh(self) -> int:
        self.next_address += 0x1000
        return self.next_address

    def call(self, name: str, *args, comm=None) -> None:  # noqa: ANN001, ANN002
        self.calls.append(name)
        if name == "ncclMemAlloc":
            args[0]._obj.value = self._fresh()
        elif name == "ncclCommWindowRegister":
            args[3]._obj.value = self._fresh()
        elif name == "ncclDevCommCreate":
            host = args[2].value
            for field, value in (("rank", self.rank), ("nRanks", self.num_ranks), ("ginContextCount", 4)):
                offset, size = self.layout.fields[f"ncclDevComm.{field}"]
                ctypes.memmove(host + offset, value.to_bytes(size, "little"), size)


class _FakeRuntime:
    memcpyHostToDevice = 1

    def __init__(self) -> None:
        self.allocated = 0

    def malloc(self, size: int) -> int:
        self.allocated += 1
        return 0x900000 + self.allocated

    def free(self, ptr: int) -> None:
        pass

    def memset(self, ptr: int, value: int, size: int) -> None:
        pass

    def memcpy(self, dst: int, src: int, size: int, kind: int) -> None:
        pass

    def deviceSynchronize(self) -> None:
        pass


@requires_nvcc
def test_window_grows_without_a_new_communicator(
    headers: nccl.NcclHeaders, probe_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A larger window re-makes the device communicator, window and buffer in the order of the first
    setup and keeps the NCCL communicator (no ncclCommInitRank, no ncclCommDestroy until close)."""
    layout = gin.probe_layout(headers, cache=probe_cache)
    lib = _RecordingLibrary(layout, rank=1, num_ranks=4)
    monkeypatch.setattr(gin_transport, "_cupy_runtime", _FakeRuntime)
    t = _bare_transport(layout, lib, 1, 4)
    # one process: the agreement step runs the allocation and finds no failure elsewhere
    monkeypatch.setattr("commkit.backends.agree.run_agreed", lambda group, fn: (fn(), {}))
    t._setup(4)
    setup = ["ncclMemAlloc", "ncclCommWindowRegister", "ncclDevCommCreate"]
    assert lib.calls == setup
    window, buffer, dev_comm = t._window.value, t.buffer_ptr, t.dev_comm_device
    lib.calls.clear()
    t.grow(1 << 19)  # smaller: nothing to do
    assert lib.calls == [] and t.generation == 0
    t.grow((1 << 21) + 1)
    teardown = ["ncclDevCommDestroy", "ncclCommWindowDeregister", "ncclMemFree"]
    assert lib.calls == teardown + setup
    assert (
        t.generation == 1
        and t.buffer_bytes >= (1 << 21) + 1
        and t.buffer_bytes % layout.win_required_alignment == 0
    )
    assert (t._window.value, t.buffer_ptr, t.dev_comm_device) != (window, buffer, dev_comm)
    lib.calls.clear()
    t.close()
    assert lib.calls == [*teardown, "ncclCommFinalize", "ncclCommDestroy"]


def _grow_fails_on_rank_1(rank: int, world: int, headers: nccl.NcclHeaders, cache: str) -> list[str]:
    layout = gin.probe_layout(headers, cache=Path(cache))
    gin_transport._cupy_runtime = _FakeRuntime  # type: ignore[assignment]
    lib = _RecordingLibrary(layout, rank=rank, num_ranks=world)
    if rank == 1:
        original = lib.call

        def call(name: str, *args, comm=None) -> None:  # noqa: ANN001, ANN002
            if name == "ncclMemAlloc" and t.buffer_bytes == 0:  # the grow's allocation
                lib.calls.append(name)
                raise gin.NcclError("ncclMemAlloc: out of memory (fake)")
            original(name, *args, comm=comm)

        lib.call = call  # type: ignore[method-assign]
    t = _bare_transport(layout, lib, rank, world)
    t._setup(4)
    lib.calls.clear()
    try:
        t.grow(1 << 22)
    except gin.NcclError as exc:
        return [str(exc), *lib.calls, f"bytes={t.buffer_bytes}"]
    return ["no error"]


def _bare_transport(layout: gin.GinLayout, lib: _RecordingLibrary, rank: int, world: int) -> gin.GinTransport:
    t = gin.GinTransport.__new__(gin.GinTransport)
    t.layout, t.lib, t.rank, t.num_ranks, t.group = layout, lib, rank, world, None
    t.num_nodes, t.gpus_per_node, t.max_channels, t.signal_count = 2, world // 2, 8, 4 * 8 * 2
    t.buffer_bytes, t.generation = 1 << 20, 0
    t._comm, t._window, t._buffer = ctypes.c_void_p(0xC0), ctypes.c_void_p(), ctypes.c_void_p()
    t._devcomm_host, t._devcomm_ptr, t.dev_comm_device = None, 0, 0
    return t


@requires_nvcc
def test_failed_grow_is_agreed_before_any_collective_step(
    headers: nccl.NcclHeaders, probe_cache: Path
) -> None:
    """The new buffer fails to allocate on rank 1 only: both ranks raise NcclError naming rank 1, and
    neither registers a window (a collective that rank 1 would not join); both are left without one."""
    gin.probe_layout(headers, cache=probe_cache)  # compiled once here, read from the cache there
    got = spawn_gloo(_grow_fails_on_rank_1, 2, headers, str(probe_cache), timeout_s=120)
    teardown = ["ncclDevCommDestroy", "ncclCommWindowDeregister", "ncclMemFree"]
    for rank, (error, *calls) in enumerate(got):
        assert error.startswith(
            "GinTransport.grow: a window of 4194304 bytes could not be allocated on ranks [1]"
        )
        assert "(rank 1: NcclError: ncclMemAlloc: out of memory (fake))" in error
        freed = ["ncclMemFree"] if rank == 0 else []  # rank 0's new buffer is freed again
        assert calls == [*teardown, "ncclMemAlloc", *freed, "bytes=0"], (rank, calls)
