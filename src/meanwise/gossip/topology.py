"""Who talks to whom: the communication graphs of gossip learning.

networkx builds the graphs; the simulator reads them as neighbour lists and adjacency tensors.
Every constructor validates what gossip needs: a connected graph without isolated nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor

__all__ = [
    "Topology",
    "from_networkx",
    "random_regular",
    "ring",
    "torus",
    "erdos_renyi",
    "fully_connected",
    "star",
]


@dataclass(frozen=True)
class Topology:
    """An undirected communication graph on nodes ``0..n_nodes-1``.

    ``neighbors[i]`` are the nodes that node i pushes its model to (and receives from), sorted.
    ``center`` is the averaging node of a star (the federated-learning baseline), else None.
    """

    name: str
    neighbors: tuple[tuple[int, ...], ...]
    center: int | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.neighbors)

    @property
    def degrees(self) -> list[int]:
        return [len(n) for n in self.neighbors]

    def adjacency(self) -> Tensor:
        """``[n, n]`` boolean adjacency matrix (symmetric, no self-loops)."""
        a = torch.zeros(self.n_nodes, self.n_nodes, dtype=torch.bool)
        for i, neighbours in enumerate(self.neighbors):
            a[i, list(neighbours)] = True
        return a

    def to_networkx(self) -> nx.Graph:
        graph = nx.Graph()
        graph.add_nodes_from(range(self.n_nodes))
        graph.add_edges_from((i, j) for i, ns in enumerate(self.neighbors) for j in ns)
        return graph


def from_networkx(graph: nx.Graph, name: str = "graph", center: int | None = None) -> Topology:
    """Validate a networkx graph (nodes relabelled 0..n-1 in sorted order) as a topology."""
    if graph.number_of_nodes() < 2:
        raise ValueError(f"a topology needs at least 2 nodes; got {graph.number_of_nodes()}")
    if graph.is_directed():
        raise ValueError("the graph must be undirected (gossip pushes both ways)")
    graph = nx.convert_node_labels_to_integers(graph, ordering="sorted")
    isolated = sorted(nx.isolates(graph))
    if isolated:
        raise ValueError(f"nodes {isolated[:10]} have no neighbours (isolated)")
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ValueError(f"the graph is disconnected ({parts} components): models cannot mix")
    neighbors = tuple(
        tuple(sorted(j for j in graph.neighbors(i) if j != i)) for i in range(len(graph))
    )
    return Topology(name, neighbors, center)


def _check_count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def random_regular(n_nodes: int, degree: int, seed: int = 0) -> Topology:
    """A uniformly random ``degree``-regular graph (the paper: 50 nodes, degree 8), redrawn
    (with the next seed) until connected."""
    _check_count("n_nodes", n_nodes, 2)
    _check_count("degree", degree, 1)
    if degree >= n_nodes:
        raise ValueError(f"degree must be < n_nodes ({n_nodes}); got {degree}")
    if (n_nodes * degree) % 2:
        raise ValueError(f"n_nodes * degree must be even; got {n_nodes} * {degree}")
    for attempt in range(100):
        graph = nx.random_regular_graph(degree, n_nodes, seed=seed + attempt)
        if nx.is_connected(graph):
            return from_networkx(graph, f"random {degree}-regular")
    raise ValueError(f"no connected {degree}-regular graph on {n_nodes} nodes in 100 draws")


def ring(n_nodes: int) -> Topology:
    _check_count("n_nodes", n_nodes, 3)
    return from_networkx(nx.cycle_graph(n_nodes), "ring")


def torus(rows: int, cols: int) -> Topology:
    """A 2-D torus (grid with wrap-around): 4 neighbours per node when rows, cols >= 3."""
    _check_count("rows", rows, 3)
    _check_count("cols", cols, 3)
    return from_networkx(nx.grid_2d_graph(rows, cols, periodic=True), f"{rows}x{cols} torus")


def erdos_renyi(n_nodes: int, edge_probability: float, seed: int = 0) -> Topology:
    """G(n, p); a disconnected draw is an error (choose p above ln(n)/n), never silently fixed."""
    _check_count("n_nodes", n_nodes, 2)
    if not 0.0 < edge_probability <= 1.0:
        raise ValueError(f"edge_probability must be in (0, 1]; got {edge_probability!r}")
    graph = nx.gnp_random_graph(n_nodes, edge_probability, seed=seed)
    return from_networkx(graph, f"Erdos-Renyi p={edge_probability}")


def fully_connected(n_nodes: int) -> Topology:
    _check_count("n_nodes", n_nodes, 2)
    return from_networkx(nx.complete_graph(n_nodes), "fully connected")


def star(n_leaves: int) -> Topology:
    """Node 0 is the centre (the FL server), nodes 1..n_leaves its leaves."""
    _check_count("n_leaves", n_leaves, 1)
    return from_networkx(nx.star_graph(n_leaves), "star", center=0)
