"""commkit.nodes: node arithmetic and the one check of ranks per node."""

from __future__ import annotations

import pytest
import torch

from commkit.nodes import Nodes


def test_arithmetic() -> None:
    nodes = Nodes.of(8, 4)
    assert nodes.num_nodes == 2
    assert [nodes.node(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [nodes.index(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert list(nodes.ranks(1)) == [4, 5, 6, 7]
    ranks = torch.arange(8)
    assert nodes.node(ranks).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert nodes.index(ranks).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_none_is_one_node() -> None:
    assert Nodes.of(6, None) == Nodes(6, 6)
    assert Nodes.of(6, None).num_nodes == 1


def test_any_in_node() -> None:
    in_rank = torch.tensor([[True, False, False, False], [False, False, False, True], [False] * 4])
    assert Nodes.of(4, 2).any_in_node(in_rank).tolist() == [[True, False], [False, True], [False, False]]
    assert Nodes.of(4, 2).by_node(in_rank).shape == (3, 2, 2)


@pytest.mark.parametrize("bad", [0, -2, 3, 5])
def test_not_a_divisor(bad: int) -> None:
    message = (
        rf"^num_ranks_per_node: expected a divisor of the 4 ranks \(nodes hold contiguous ranks\), "
        rf"got {bad}$"
    )
    with pytest.raises(ValueError, match=message):
        Nodes.of(4, bad)


def test_wrong_type_names_the_argument() -> None:
    with pytest.raises(TypeError, match="^--ranks-per-node: expected an int or None, got float$"):
        Nodes.of(4, 2.0, name="--ranks-per-node")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got bool"):
        Nodes.of(4, True)  # type: ignore[arg-type]
