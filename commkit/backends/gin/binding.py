"""libnccl through ctypes: the functions of ``NCCL_SYMBOLS``, each call checked.

The library is the one that ships next to the headers the device code is compiled against
(commkit/jit/nccl.py). NOTE: not nccl4py or cupy.cuda.nccl: their generated structs pin one NCCL layout
and they may load another libnccl than the headers' one, while the ncclDevComm that the library fills
must have the layout the kernel was compiled with; the library version is checked against the headers.
Every call checks its ncclResult_t and raises :class:`NcclError` naming the call and NCCL's error string.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from commkit.jit import nccl as nccl_headers

# Every libnccl function this module calls (tests/test_gin_host.py checks that the library exports them).
NCCL_SYMBOLS = (
    "ncclGetVersion",
    "ncclGetErrorString",
    "ncclGetLastError",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommFinalize",
    "ncclCommDestroy",
    "ncclMemAlloc",
    "ncclMemFree",
    "ncclCommWindowRegister",
    "ncclCommWindowDeregister",
    "ncclDevCommCreate",
    "ncclDevCommDestroy",
)


class NcclError(RuntimeError):
    """An NCCL call failed (the message names the call and NCCL's error string)."""


class NcclLibrary:
    """The NCCL functions of NCCL_SYMBOLS, each call checked (:class:`NcclError` with NCCL's error string)."""

    def __init__(self, path: Path | str) -> None:
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise NcclError(f"cannot load libnccl from {path}: {exc}") from None
        self.path = Path(path)
        missing = [name for name in NCCL_SYMBOLS if not hasattr(self.lib, name)]
        if missing:
            raise NcclError(f"{path} does not export {missing} (NCCL >= 2.28.7 needed for the GIN path)")
        self.lib.ncclGetErrorString.restype = ctypes.c_char_p
        self.lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        self.lib.ncclGetLastError.restype = ctypes.c_char_p
        self.lib.ncclGetLastError.argtypes = [ctypes.c_void_p]

    def error_string(self, result: int) -> str:
        text = self.lib.ncclGetErrorString(result)
        return text.decode(errors="replace") if text else f"ncclResult_t {result}"

    def call(self, name: str, *args: Any, comm: int | None = None) -> None:
        """``name(*args)``; raises when the ncclResult_t is not ncclSuccess."""
        if name not in NCCL_SYMBOLS:
            raise AssertionError(f"{name} is not in NCCL_SYMBOLS")
        result = getattr(self.lib, name)(*args)
        if result != 0:
            last = self.lib.ncclGetLastError(ctypes.c_void_p(comm) if comm else None)
            detail = f"; last error: {last.decode(errors='replace')}" if last else ""
            raise NcclError(f"{name} failed: {self.error_string(result)} (ncclResult_t {result}){detail}")

    def comm_init_rank(self, comm: ctypes.c_void_p, num_ranks: int, uid: ctypes.Structure, rank: int) -> None:
        """``ncclCommInitRank(&comm, num_ranks, uid, rank)``: the ncclUniqueId goes by value, so its
        ctypes type (``unique_id_type``, sized by the headers) is the function's argument type."""
        self.lib.ncclCommInitRank.argtypes = [ctypes.c_void_p, ctypes.c_int, type(uid), ctypes.c_int]
        self.call("ncclCommInitRank", ctypes.byref(comm), num_ranks, uid, rank)

    def version_code(self) -> int:
        version = ctypes.c_int(0)
        self.call("ncclGetVersion", ctypes.byref(version))
        return version.value


def load_library(headers: nccl_headers.NcclHeaders) -> NcclLibrary:
    """The libnccl of ``headers``; its version must be the headers' (the ncclDevComm layout depends on it)."""
    lib = NcclLibrary(nccl_headers.find_library(headers))
    if lib.version_code() != headers.version_code:
        raise NcclError(
            f"libnccl at {lib.path} has version code {lib.version_code()}, the headers at "
            f"{headers.include_dir} {headers.version_code}: the GIN path needs both from the same NCCL "
            "(set COMMKIT_NCCL_LIB or COMMKIT_NCCL_INCLUDE)"
        )
    return lib


def unique_id_type(num_bytes: int) -> type[ctypes.Structure]:
    """ncclUniqueId (``struct { char internal[NCCL_UNIQUE_ID_BYTES]; }``), passed by value."""
    return type("ncclUniqueId", (ctypes.Structure,), {"_fields_": [("internal", ctypes.c_char * num_bytes)]})


def aligned_host_buffer(size: int, align: int) -> tuple[Any, int]:
    """(the ctypes array that owns it, an address in it aligned to ``align`` with ``size`` bytes)."""
    raw = (ctypes.c_uint8 * (size + align))()
    address = ctypes.addressof(raw)
    return raw, (address + align - 1) // align * align
