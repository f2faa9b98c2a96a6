"""Rows and bytes a routing puts on each link: the hierarchical (internode) path against a flat all-to-all.

Input: every rank's ``topk_idx`` [T_s, K] (the same routing that dispatch gets), E experts, G ranks per
node. Ranks and nodes as in ``commkit.reference``: rank r hosts experts [r*L, (r+1)*L) with L = E // R;
node n holds ranks [n*G, (n+1)*G); the source s = (m, i) sits on node m = s // G with in-node index
i = s % G.

Counting rules (per token of source s; every count is an integer number of rows):

- A token *reaches* rank r when one of its top-k slots holds an expert of r; -1 slots are ignored and
  several slots on one rank (or one expert repeated) count once. It reaches node n when it reaches a
  rank of node n.
- Hierarchical path (DeepSeek-V3, ``commkit.backends.torch_hier``): the token crosses the network ONCE
  per REMOTE node n it reaches, to the forwarder (n, i) (the rank of node n with the sender's in-node
  index), which forwards it over NVLink to the ranks of node n that need it. Tokens for the own node
  stay on the node (the source is their forwarder).
  ``ib_rows_hier`` = remote nodes reached.
  ``nvl_rows_hier`` = over the nodes reached (own included): ranks reached there, less the forwarder
  itself when it is one of them (a row that stays on its GPU crosses no link).
- Flat all-to-all: the token goes straight to every rank it reaches.
  ``ib_rows_flat`` = remote ranks reached (ranks of other nodes);
  ``nvl_rows_flat`` = ranks of the own node reached, less the source itself.
- ``rdma_rows_incl_own_node`` = nodes reached, the own node INCLUDED: the count behind DeepEP's published
  internode "RDMA" bytes and GB/s (its tests count (token, node) pairs over all nodes), kept so that
  figures can be compared with peers' numbers; it overstates what crosses the network.
- ``recv_rows`` (per destination rank): rows it receives from every source, itself included: the
  "logical" rows of the single-node figures.
- Combine mirrors dispatch with the same counts: the hierarchical combine sends one bf16 partial per
  (token, remote node) over the network (the forwarder sums the rows of its node first) and one row per
  NVLink row back to the forwarder; a flat combine sends one row back per (token, rank).

Bytes = rows x row bytes: dispatch rows of ``commkit.model.workload.row_bytes`` (bf16: 2H; fp8: H +
4 * ceil(H/128) for the float32 scales), combine rows always bf16 (2H). Top-k indices and weights are
left out, as in DeepEP's "logical" bandwidth.

Per rank: ``recv_rows`` is per destination rank; every other count is per SOURCE rank, i.e. the traffic
of that rank's tokens (what it sends over the network in dispatch and gets back in combine; the NVLink
rows are the forwards its tokens cause, wherever the forwarder is). Means are over ranks, so the mean of
each count equals the mean per rank of the rows the rank actually moves on that link.
``ib_saved`` = flat / hierarchical network bytes (= rows), the same for dispatch and combine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from commkit.model.workload import row_bytes
from commkit.nodes import Nodes

__all__ = ["COUNTS", "Traffic", "count_traffic", "reached_ranks", "row_bytes"]

# Per-rank counts of ``Traffic`` (see the module docstring).
COUNTS = (
    "recv_rows",
    "ib_rows_hier",
    "ib_rows_flat",
    "rdma_rows_incl_own_node",
    "nvl_rows_hier",
    "nvl_rows_flat",
)


def reached_ranks(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: token t has an expert on rank r (-1 slots ignored, repeats counted once)."""
    experts_per_rank = num_experts // num_ranks
    idx = topk_idx.long()
    dst = torch.where(idx >= 0, idx // experts_per_rank, torch.full_like(idx, num_ranks))  # R: no rank
    hit = torch.zeros(idx.shape[0], num_ranks + 1, dtype=torch.bool, device=idx.device)
    return hit.scatter_(1, dst, True)[:, :num_ranks]


@dataclass(frozen=True)
class Traffic:
    """Per-rank row counts of one routing (module docstring) and their bytes: per SOURCE rank, the
    hierarchical path against a flat all-to-all (``commkit.model.traffic.LinkRows`` counts the same
    rows per GPU link instead, for the performance model).

    recv_rows:                per destination rank: rows received, own rows included
    ib_rows_hier:             per source rank: (token, remote node) pairs
    ib_rows_flat:             per source rank: (token, remote rank) pairs
    rdma_rows_incl_own_node:  per source rank: (token, node) pairs, own node included (DeepEP's count)
    nvl_rows_hier:            per source rank: rows forwarded over NVLink inside the nodes reached
    nvl_rows_flat:            per source rank: rows to the other ranks of its own node
    """

    num_ranks: int
    num_ranks_per_node: int
    hidden: int
    dtype: str
    recv_rows: tuple[int, ...]
    ib_rows_hier: tuple[int, ...]
    ib_rows_flat: tuple[int, ...]
    rdma_rows_incl_own_node: tuple[int, ...]
    nvl_rows_hier: tuple[int, ...]
    nvl_rows_flat: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return Nodes(self.num_ranks, self.num_ranks_per_node).num_nodes

    def row_bytes(self, op: str) -> int:
        """Bytes of one row of ``op``: the dispatch dtype's for "dispatch", bf16 for "combine"."""
        if op not in ("dispatch", "combine"):
            raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")
        return row_bytes(self.hidden, self.dtype if op == "dispatch" else "bf16")

    def per_rank(self, count: str) -> tuple[int, ...]:
        if count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {count!r}")
        rows: tuple[int, ...] = getattr(self, count)
        return rows

    def mean(self, count: str) -> float:
        """Mean over ranks of a per-rank count."""
        return sum(self.per_rank(count)) / self.num_ranks

    def bytes_per_rank(self, count: str, op: str) -> list[int]:
        return [n * self.row_bytes(op) for n in self.per_rank(count)]

    def mean_bytes(self, count: str, op: str) -> float:
        return self.mean(count) * self.row_bytes(op)

    @property
    def ib_saved(self) -> float | None:
        """Flat / hierarchical network bytes over all ranks; None when nothing crosses nodes."""
        hier = sum(self.ib_rows_hier)
        return sum(self.ib_rows_flat) / hier if hier else None

    @property
    def ib_saved_per_rank(self) -> list[float | None]:
        return [f / h if h else None for f, h in zip(self.ib_rows_flat, self.ib_rows_hier, strict=True)]

    def figures(self, op: str) -> dict[str, float]:
        """Mean bytes per rank of ``op`` on each path."""
        return {
            "logical_bytes": self.mean_bytes("recv_rows", op),
            "ib_bytes_hier": self.mean_bytes("ib_rows_hier", op),
            "ib_bytes_flat": self.mean_bytes("ib_rows_flat", op),
            "rdma_bytes_incl_own_node": self.mean_bytes("rdma_rows_incl_own_node", op),
            "nvl_bytes_hier": self.mean_bytes("nvl_rows_hier", op),
            "nvl_bytes_flat": self.mean_bytes("nvl_rows_flat", op),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers: the setting, mean rows, mean bytes per op, ``ib_saved``, and the per-rank rows."""
        out: dict[str, Any] = {
            "num_ranks": self.num_ranks,
            "num_ranks_per_node": self.num_ranks_per_node,
            "num_nodes": self.num_nodes,
            "hidden": self.hidden,
            "dtype": self.dtype,
        }
        out.update({count: self.mean(count) for count in COUNTS})
        for op in ("dispatch", "combine"):
            out.update({f"{op}_{k}": v for k, v in self.figures(op).items()})
        out["ib_saved"] = self.ib_saved
        out["per_rank"] = {count: list(self.per_rank(count)) for count in COUNTS}
        out["per_rank"]["ib_saved"] = self.ib_saved_per_rank
        return out


def count_traffic(
    topk_idx: Sequence[torch.Tensor],
    num_experts: int,
    num_ranks_per_node: int | None,
    hidden: int,
    dtype: str = "bf16",
) -> Traffic:
    """Counts of the routing ``topk_idx`` (one [T_s, K] integer tensor per rank, values in [-1, E)).

    ``num_ranks_per_node`` G must divide the number of ranks (None: one node); ``dtype`` is the dispatch
    dtype, "bf16" or "fp8". Vectorised over tokens: one pass of tensor ops per source rank.
    """
    num_ranks = len(topk_idx)
    if num_ranks == 0:
        raise ValueError("topk_idx: need one routing per rank, got none")
    nodes = Nodes.of(num_ranks, num_ranks_per_node)
    per_node, num_nodes = nodes.num_ranks_per_node, nodes.num_nodes
    if num_experts < 1 or num_experts % num_ranks:
        raise ValueError(
            f"num_experts: expected a positive multiple of the {num_ranks} ranks, got {num_experts}"
        )
    row_bytes(hidden, dtype)  # NOTE: validates the dtype
    to_rank, to_node = [], []
    for src, idx in enumerate(topk_idx):
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(
                f"topk_idx[{src}]: expected a [T, K] integer tensor, got {idx.dtype} {tuple(idx.shape)}"
            )
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= num_experts):
            raise ValueError(f"topk_idx[{src}]: values must be in [-1, {num_experts})")
        in_rank = reached_ranks(idx, num_experts, num_ranks)  # [T, R]
        to_rank.append(in_rank.sum(dim=0))
        to_node.append(nodes.any_in_node(in_rank).sum(dim=0))
    rows_to_rank = torch.stack(to_rank).cpu()  # [R (source), R (destination)]
    rows_to_node = torch.stack(to_node).cpu()  # [R (source), N]
    ranks = torch.arange(num_ranks)
    own_node, in_node = nodes.node(ranks), nodes.index(ranks)
    by_node = nodes.by_node(rows_to_rank)  # [s, n, j]
    own_node_rows = by_node[ranks, own_node].sum(dim=1)  # [s] (token, rank of the own node) pairs
    # [s] (token, forwarder (n, i)) pairs over every node n: rows that stay on their forwarder
    to_forwarder = by_node.gather(2, in_node.view(-1, 1, 1).expand(num_ranks, num_nodes, 1)).sum(dim=(1, 2))
    node_pairs = rows_to_node.sum(dim=1)
    rank_pairs = rows_to_rank.sum(dim=1)

    def ints(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(int(n) for n in t.tolist())

    return Traffic(
        num_ranks=num_ranks,
        num_ranks_per_node=per_node,
        hidden=hidden,
        dtype=dtype,
        recv_rows=ints(rows_to_rank.sum(dim=0)),
        ib_rows_hier=ints(node_pairs - rows_to_node[ranks, own_node]),
        ib_rows_flat=ints(rank_pairs - own_node_rows),
        rdma_rows_incl_own_node=ints(node_pairs),
        nvl_rows_hier=ints(rank_pairs - to_forwarder),
        nvl_rows_flat=ints(own_node_rows - rows_to_rank[ranks, ranks]),
    )
