"""Ranks grouped into nodes: the one place that knows node arithmetic.

R ranks are grouped contiguously into N = R // G nodes of G ranks (``num_ranks_per_node``): node n
holds ranks ``[n*G, (n+1)*G)``, and rank r is in-node index ``r % G`` of node ``r // G``. Every
layer (the reference, the backends, the tools) asks a ``Nodes`` value instead of redoing the
arithmetic, and validates G one way (``Nodes.of``). Loads no torch (the CLI checks its flags with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

Rank = TypeVar("Rank", int, "torch.Tensor")  # a rank, or a tensor of ranks


@dataclass(frozen=True)
class Nodes:
    """``num_ranks`` R ranks in nodes of ``num_ranks_per_node`` G (a divisor of R)."""

    num_ranks: int
    num_ranks_per_node: int

    @classmethod
    def of(cls, num_ranks: int, num_ranks_per_node: int | None, *, name: str = "num_ranks_per_node") -> Nodes:
        """Checked: G = ``num_ranks_per_node`` (None: one node of all R ranks); ValueError naming
        ``name`` unless G is a positive divisor of R."""
        if num_ranks_per_node is None:
            return cls(num_ranks, num_ranks)
        if isinstance(num_ranks_per_node, bool) or not isinstance(num_ranks_per_node, int):
            raise TypeError(f"{name}: expected an int or None, got {type(num_ranks_per_node).__name__}")
        if num_ranks_per_node < 1 or num_ranks % num_ranks_per_node:
            raise ValueError(
                f"{name}: expected a divisor of the {num_ranks} ranks (nodes hold contiguous ranks), "
                f"got {num_ranks_per_node}"
            )
        return cls(num_ranks, num_ranks_per_node)

    @property
    def num_nodes(self) -> int:
        """N = R // G."""
        return self.num_ranks // self.num_ranks_per_node

    def node(self, rank: Rank) -> Rank:
        """The node of ``rank`` (elementwise for a tensor)."""
        return rank // self.num_ranks_per_node

    def index(self, rank: Rank) -> Rank:
        """The in-node index of ``rank`` (elementwise for a tensor)."""
        return rank % self.num_ranks_per_node

    def ranks(self, node: int) -> range:
        """The ranks of ``node``."""
        return range(node * self.num_ranks_per_node, (node + 1) * self.num_ranks_per_node)

    def by_node(self, per_rank: torch.Tensor) -> torch.Tensor:
        """A [..., R] tensor viewed as [..., N, G] (the ranks of each node)."""
        return per_rank.view(*per_rank.shape[:-1], self.num_nodes, self.num_ranks_per_node)

    def any_in_node(self, per_rank: torch.Tensor) -> torch.Tensor:
        """[..., R] bool -> [..., N] bool: true where any rank of the node is."""
        return self.by_node(per_rank).any(dim=-1)
