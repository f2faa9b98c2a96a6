"""Host-side mirror of the device constants and of the symmetric buffer layout (``csrc/common.cuh``,
``DispatchConfig``/``CombineConfig``). ``tests/test_compile.py`` compiles a host program that prints
the C++ values and checks they equal these. Pure Python: no torch, CuPy or GPU needed.
"""

from __future__ import annotations

MAX_RANKS = 8
MAX_LOCAL_EXPERTS = 512
MAX_EXPERTS = 2048
MAX_HIDDEN = 12288  # combine reducer accumulators in registers (csrc/common.cuh kMaxHidden)
NUM_THREADS = 512
NUM_SLOTS = 16
CHUNK = 4
# The call descriptor every notify exchanges (csrc/common.cuh CallField; count_exchange names them)
CALL_INTS = 8
# Per rank of a launch, what the notify's agreement writes (csrc/common.cuh StatusField)
STATUS_VERDICT, STATUS_PEER, STATUS_SEQ, STATUS_PEER_CALL = 0, 1, 2, 3
STATUS_INTS = STATUS_PEER_CALL + CALL_INTS
OP_DISPATCH, OP_CACHED_DISPATCH, OP_COMBINE = 0, 1, 2
INBOX_INTS = CALL_INTS + 2 + MAX_LOCAL_EXPERTS
FP8_GROUP_SIZE = 128

# Dispatch dtypes (template argument kDtype)
DTYPE_BF16 = 0
DTYPE_FP8 = 1
DTYPE_BF16_CAST_FP8 = 2

EPOCH_OFFSET = 0
CALL_SEQ_OFFSET = 4
SIGNAL_OFFSET = 64
INBOX_OFFSET = 128
INBOX_BYTES = 2 * MAX_RANKS * INBOX_INTS * 4


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


COUNTERS_OFFSET = align_up(INBOX_OFFSET + INBOX_BYTES, 128)


def counters_bytes(max_channels: int) -> int:
    return align_up(4 * max_channels * MAX_RANKS * 4, 128)


def ring_offset(max_channels: int) -> int:
    return COUNTERS_OFFSET + counters_bytes(max_channels)


def total_bytes(max_channels: int, max_slot_bytes: int) -> int:
    """Bytes of one rank's symmetric buffer."""
    return ring_offset(max_channels) + max_channels * MAX_RANKS * NUM_SLOTS * max_slot_bytes


def dispatch_slot_bytes(hidden: int, num_topk: int, dtype: int) -> int:
    """Bytes of one dispatch ring slot: row, scales (FP8), then [idx x K, weights x K, token, pos]."""
    out_fp8 = dtype != DTYPE_BF16
    row_bytes = hidden if out_fp8 else hidden * 2
    num_scales = hidden // FP8_GROUP_SIZE if out_fp8 else 0
    meta_offset = align_up(row_bytes, 16) + align_up(num_scales * 4, 16)
    return align_up(meta_offset + (2 * num_topk + 2) * 4, 16)


def combine_slot_bytes(hidden: int) -> int:
    """Bytes of one combine ring slot: the bf16 row, then [src_token, pad x 3]."""
    return align_up(hidden * 2, 16) + 16


def meta_stride(num_ranks: int, num_experts: int) -> int:
    """int32 per rank in the notify output: R + 1 offsets, R source token counts, L expert counts."""
    return 2 * num_ranks + 1 + num_experts // num_ranks


def warps_per_peer(num_ranks: int) -> int:
    return max(1, (NUM_THREADS // 32 // 2) // num_ranks)
