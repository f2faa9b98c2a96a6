"""The GIN transport below the internode backend: NCCL's GPU-initiated networking (csrc/net_gin.cuh).

- ``probe.py`` + ``layout_probe.cu``: the struct layouts of the NCCL headers, from a host program
- ``layout.py``: ``GinLayout`` and the structs packed by it (GinNet, ncclDevCommRequirements)
- ``binding.py``: libnccl through ctypes (``NcclLibrary``, ``NcclError``)
- ``transport.py``: ``GinTransport``, one rank's communicator, window and device communicator

The names below are the package's face: ``commkit.backends.internode_net`` and the tests reach them as
``commkit.backends.gin.X`` (the tests' fakes replace ``GinTransport``, ``load_library`` and
``probe_layout`` here).
"""

from commkit.backends.gin.binding import NCCL_SYMBOLS, NcclError, NcclLibrary, load_library
from commkit.backends.gin.layout import (
    GIN_NET_POINTERS,
    INTER_LAYOUT_FIELDS,
    GinLayout,
    gin_net_dtype,
    pack_gin_net,
    requirements_bytes,
)
from commkit.backends.gin.probe import PROBE_SOURCE, probe_layout
from commkit.backends.gin.transport import GIN_BACKENDS, NUM_SIGNAL_KINDS, GinTransport, backend_defines

__all__ = [
    "GIN_BACKENDS",
    "GIN_NET_POINTERS",
    "INTER_LAYOUT_FIELDS",
    "NCCL_SYMBOLS",
    "NUM_SIGNAL_KINDS",
    "PROBE_SOURCE",
    "GinLayout",
    "GinTransport",
    "NcclError",
    "NcclLibrary",
    "backend_defines",
    "gin_net_dtype",
    "load_library",
    "pack_gin_net",
    "probe_layout",
    "requirements_bytes",
]
