"""Topologies: the degrees, sizes and connectivity each construction promises."""

import networkx as nx
import pytest

from meanwise.gossip import (
    erdos_renyi,
    from_networkx,
    fully_connected,
    random_regular,
    ring,
    star,
    torus,
)


def test_random_regular_is_regular_connected_and_seeded():
    t = random_regular(50, 8, seed=3)
    assert t.n_nodes == 50 and set(t.degrees) == {8}
    assert nx.is_connected(t.to_networkx())
    a = t.adjacency()
    assert (a == a.T).all() and not a.diagonal().any() and a.sum().item() == 50 * 8
    assert random_regular(50, 8, seed=3) == t
    assert random_regular(50, 8, seed=4) != t


def test_ring_torus_complete_star():
    assert ring(6).neighbors[0] == (1, 5)
    t = torus(3, 4)
    assert t.n_nodes == 12 and set(t.degrees) == {4}
    assert set(fully_connected(5).degrees) == {4}
    s = star(4)
    assert s.center == 0 and s.neighbors[0] == (1, 2, 3, 4) and s.degrees[1:] == [1, 1, 1, 1]


def test_erdos_renyi_connected_or_a_clear_error():
    t = erdos_renyi(30, 0.3, seed=1)
    assert nx.is_connected(t.to_networkx())
    with pytest.raises(ValueError, match="disconnected|isolated"):
        erdos_renyi(30, 0.01, seed=1)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: random_regular(8, 8), "degree must be < n_nodes"),
        (lambda: random_regular(7, 3), "even"),
        (lambda: ring(2), "n_nodes"),
        (lambda: erdos_renyi(10, 1.5), "edge_probability"),
        (lambda: from_networkx(nx.Graph([(0, 1), (2, 3)])), "disconnected"),
        (lambda: from_networkx(nx.empty_graph(3)), "isolated"),
        (lambda: from_networkx(nx.DiGraph([(0, 1)])), "undirected"),
    ],
)
def test_bad_graphs_are_rejected_with_the_reason(build, message):
    with pytest.raises(ValueError, match=message):
        build()
