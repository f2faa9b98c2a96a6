"""Virtual ranks: R ranks of one EP group on one GPU, running the very same kernels.

Each rank's symmetric buffer is a region of one device allocation and one launch runs the blocks of
all ranks (grid = R x num_sms; a block's rank is ``blockIdx.x // num_sms``). The ranks wait for each
other inside the kernels, so all R x num_sms blocks must be resident at once: ``EmulatedGroup``
checks the occupancy and raises ``ConfigError`` naming the largest budget that fits.

Virtual nodes: ``EmulatedGroup(R, num_ranks_per_node=G)`` with G < R makes N = R / G nodes (2x4, 4x2,
2x2, ...) and runs the internode kernels (``commkit.backends.internode``): tokens cross the inter-node
hop once per destination node on the ``nvlink-domain`` net (direct stores, here into regions of the
same allocation) and are forwarded inside the node; combine sums inside the node before the hop back.

What it models: the kernels' protocol, ordering, bit-exact results, SM budget and the memory traffic
of R ranks. What it does not: NVLink. Peer writes go to HBM of the same GPU (about 3 TB/s shared by
all virtual ranks, instead of about 450 GB/s per GPU and direction over NVLink), system-scope
acquire/release stay on one GPU, and the R ranks share one GPU's SMs and L2.

    group = EmulatedGroup(8, num_sms=16)
    outs = group.dispatch(xs, topk_idxs, topk_weights, num_experts=256)   # lists over the ranks
    ys = group.combine([o.x for o in outs], [o.handle for o in outs])

Per-rank code (as under torchrun) runs with ``group.spawn(fn)``: ``fn(backend)`` runs in one thread per
virtual rank, ``backend`` implements the ``Backend`` protocol (``commkit.backends.base``) for that rank,
and its collective calls meet in one launch.

Kernel timings: ``group.kernel_events[op]`` (op "layout", "dispatch", "combine") is a pair of CUDA
events (``enable_timing=True``) recorded on ``group.comm_stream`` immediately before the first kernel
launch of the most recent call of that op (the notify / barrier kernel included) and immediately
after its last kernel launch: ``start.elapsed_time(end)`` covers the kernels only, not the packing of
the ranks' inputs (``torch.cat``, skipped when they are adjacent views of one buffer), the output
allocations or the ordering with the callers' streams. One exception: a dispatch without handles and
without ``num_worst_tokens`` reads the receive counts back between the notify and the dispatch
kernel, and that host round trip (GPU idle) lies between the two events; ``group.kernel_segments[op]``
lists one (start, end) pair per run of launches without a read-back in between, whose summed elapsed
times exclude it. Not recorded on CPU (the host tests' stand-ins) or while a CUDA graph is captured.

CuPy and a GPU are needed when a group is created, not when this package is imported.

The package, one idea a module:

- ``memory``: ``EmulatedBuffers``, the R ranks' symmetric buffers as regions of one allocation;
- ``rows``: the ranks' rows packed into the one tensor a launch of all ranks reads;
- ``streams``: how the group's comm stream is ordered with the callers' streams;
- ``group``: ``EmulatedGroup``, the list API (per-rank lists in, per-rank lists out);
- ``virtual_rank``: ``VirtualRank``, the ``Backend`` protocol of one rank of ``EmulatedGroup.spawn``;
- ``rendezvous``: the threads of ``spawn`` and the barrier where their collective calls meet.
"""

from __future__ import annotations

from commkit.emulate.group import DEFAULT_NUM_SMS, EmulatedGroup, EmulatedState
from commkit.emulate.memory import EmulatedBuffers
from commkit.emulate.rows import _cat_rows  # noqa: F401 - imported from here by the tests
from commkit.emulate.virtual_rank import VirtualRank

__all__ = ["DEFAULT_NUM_SMS", "EmulatedBuffers", "EmulatedGroup", "EmulatedState", "VirtualRank"]
