"""Permutation frames for graphs (S_n) and the FA-GIN+ID / FA-MLP backbones.

A node order is canonical when it depends only on the graph: sort the nodes by permutation-
equivariant spectral features of the Laplacian L = D − A, namely the degree and the heat-kernel
diagonals exp(−tL)_ii = Σ_k e^{−tλ_k} u_ik² at a few times t, which do not depend on how the
eigensolver picks eigenvectors within repeated eigenvalues. Nodes whose features agree within a
tolerance form blocks; the frame is every order that permutes nodes within blocks (a relabelled
graph gets the relabelled frame, so the average is exactly invariant). When the blocks allow
more than `max_elements` orders (a vertex-transitive graph: n!), that many are drawn uniformly
instead: symmetric in distribution, not exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from meanwise.average import weighted_average

__all__ = [
    "PermutationFrames",
    "permutation_frames",
    "spectral_node_features",
    "GIN",
    "AdjacencyMLP",
]

DEFAULT_TIMES: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)


def _check_adjacency(adjacency: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if not isinstance(adjacency, Tensor):
        raise TypeError(f"adjacency must be a tensor [B, n, n]; got {type(adjacency).__name__}")
    if adjacency.dim() == 2:
        adjacency = adjacency.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if adjacency.dim() != 3 or adjacency.shape[1] != adjacency.shape[2]:
        raise ValueError(f"adjacency must have shape [B, n, n]; got {list(adjacency.shape)}")
    a = adjacency.to(torch.float64)
    if not torch.isfinite(a).all() or not torch.equal(a, a.transpose(1, 2)):
        raise ValueError("adjacency must be finite and symmetric (an undirected graph)")
    batch, n, _ = a.shape
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=a.device)
    elif tuple(mask.shape) != (batch, n):
        raise ValueError(f"mask must have shape [B, n]={[batch, n]}; got {list(mask.shape)}")
    return a * (mask.unsqueeze(1) & mask.unsqueeze(2)), mask.bool()


def spectral_node_features(
    adjacency: Tensor, mask: Tensor | None = None, times: tuple[float, ...] = DEFAULT_TIMES
) -> Tensor:
    """[B, n, 1 + len(times)]: degree and heat-kernel diagonals of L = D − A (float64).

    Both are permutation-equivariant functions of the graph and basis-independent within
    repeated eigenvalues, so they are safe to sort by.
    """
    a, _ = _check_adjacency(adjacency, mask)
    degree = a.sum(-1)
    laplacian = torch.diag_embed(degree) - a
    eigenvalues, vectors = torch.linalg.eigh(laplacian)
    t = torch.tensor(times, dtype=torch.float64, device=a.device)
    decay = torch.exp(-eigenvalues.unsqueeze(-1) * t)  # [B, n(eigen), T]
    heat = torch.einsum("bik,bkt->bit", vectors.square(), decay)
    return torch.cat([degree.unsqueeze(-1), heat], -1)


@dataclass(frozen=True)
class PermutationFrames:
    """orders [F, B, n]: orders[f, b, k] is the node put at position k by element f;
    weights [F, B]: 1 for real elements, 0 for padding (graphs have different |F|);
    exact [B]: False where the frame was sampled (more than `max_elements` orders)."""

    orders: Tensor
    weights: Tensor
    exact: Tensor
    mask: Tensor

    @property
    def size(self) -> int:
        return self.orders.shape[0]

    def canonicalize_adjacency(self, adjacency: Tensor) -> Tensor:
        """[B, n, n] → [F, B, n, n]: A[order][:, order] per element."""
        a = adjacency.unsqueeze(0).expand(self.size, *adjacency.shape)
        rows = self.orders.unsqueeze(-1).expand(*self.orders.shape, adjacency.shape[-1])
        a = torch.gather(a, 2, rows)
        return torch.gather(a, 3, self.orders.unsqueeze(-2).expand_as(a))

    def canonicalize_nodes(self, features: Tensor) -> Tensor:
        """[B, n, ...] → [F, B, n, ...]: features in each element's node order."""
        x = features.unsqueeze(0).expand(self.size, *features.shape)
        index = self.orders.reshape(*self.orders.shape, *([1] * (features.dim() - 2)))
        return torch.gather(x, 2, index.expand_as(x))

    def restore_nodes(self, outputs: Tensor) -> Tensor:
        """[F, B, n, ...] node outputs → [B, n, ...]: back to the input order, averaged."""
        index = self.orders.reshape(*self.orders.shape, *([1] * (outputs.dim() - 3)))
        back = torch.zeros_like(outputs).scatter_(2, index.expand_as(outputs), outputs)
        return self.average(back)

    def sample(self, generator: torch.Generator | None = None) -> PermutationFrames:
        """One order per graph, uniform over its real elements (the stochastic mode)."""
        # drawn on the CPU (the generator's device), then indexed on the frames' device
        counts = self.weights.sum(0).long().cpu()  # [B]
        pick = (torch.rand(counts.shape, generator=generator) * counts).long()
        pick = torch.minimum(pick, counts - 1)
        device = self.orders.device
        chosen = self.orders[pick.to(device), torch.arange(len(pick), device=device)]
        weights = torch.ones(1, len(pick), device=device)
        return PermutationFrames(chosen.unsqueeze(0), weights, self.exact, self.mask)

    def average(self, values: Tensor) -> Tensor:
        """[F, B, ...] → [B, ...], weighting out the padding elements."""
        shape = (*self.weights.shape, *([1] * (values.dim() - 2)))
        weights = self.weights.to(values.dtype).reshape(shape).expand_as(values)
        return weighted_average(values, weights)


def _within_block_orders(
    order: list[int], blocks: list[tuple[int, int]], cap: int, generator: torch.Generator | None
) -> tuple[list[list[int]], bool]:
    """Every order that permutes `order` within the blocks (or `cap` uniform draws)."""

    def assemble(parts) -> list[int]:
        out = list(order)
        for (start, end), part in zip(blocks, parts, strict=True):
            out[start:end] = part
        return out

    count = math.prod(math.factorial(end - start) for start, end in blocks)
    if count <= cap:
        choices = [itertools.permutations(order[start:end]) for start, end in blocks]
        return [assemble(combo) for combo in itertools.product(*choices)], True
    draws = []
    for _ in range(cap):
        parts = []
        for start, end in blocks:
            shuffle = torch.randperm(end - start, generator=generator).tolist()
            parts.append([order[start + i] for i in shuffle])
        draws.append(assemble(parts))
    return draws, False


def permutation_frames(
    adjacency: Tensor,
    mask: Tensor | None = None,
    *,
    node_features: Tensor | None = None,
    tol: float = 1e-6,
    max_elements: int = 64,
    times: tuple[float, ...] = DEFAULT_TIMES,
    generator: torch.Generator | None = None,
) -> PermutationFrames:
    """Canonical node orders of B graphs [B, n, n] (padded nodes: mask False, placed last).

    Args:
        node_features: optional [B, n, c] invariant node attributes (atom types...) to sort by
            before the spectral features; they split blocks and shrink the frame.
        tol: features equal within `tol` (after rounding to multiples of it) are ties.
        max_elements: the cap on |F| per graph; beyond it orders are sampled.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1; got {max_elements}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol}")
    a, mask = _check_adjacency(adjacency, mask)
    features = spectral_node_features(a, mask, times)
    if node_features is not None:
        if node_features.shape[:2] != a.shape[:2]:
            raise ValueError(
                f"node_features must have shape [B, n, c] with [B, n]={list(a.shape[:2])}; "
                f"got {list(node_features.shape)}"
            )
        extra = node_features.reshape(*a.shape[:2], -1).to(torch.float64)
        features = torch.cat([extra, features], -1)
    keys = torch.round(features / tol).to(torch.int64)
    keys = torch.cat([(~mask).long().unsqueeze(-1), keys], -1)  # padding sorts last
    # the sorts and block enumeration below are a Python loop per graph: done on the CPU, the
    # resulting table moved to the adjacency's device once
    keys = keys.cpu()
    batch, n = mask.shape
    orders, exact = [], []
    for b in range(batch):
        order = torch.arange(n)
        for column in reversed(range(keys.shape[-1])):  # lexicographic: stable sorts
            order = order[torch.sort(keys[b, order, column], stable=True).indices]
        sorted_keys = keys[b, order]
        change = (sorted_keys[1:] != sorted_keys[:-1]).any(-1).nonzero().squeeze(1) + 1
        real = int(mask[b].sum())  # padded nodes stay last, in their given order
        bounds = [0, *[c for c in change.tolist() if c < real], real]
        blocks = [(s, e) for s, e in itertools.pairwise(bounds) if e - s > 1]
        graph_orders, is_exact = _within_block_orders(
            order.tolist(), blocks, max_elements, generator
        )
        orders.append(graph_orders)
        exact.append(is_exact)
    size = max(len(o) for o in orders)
    table = torch.zeros(size, batch, n, dtype=torch.long)
    weights = torch.zeros(size, batch)
    for b, graph_orders in enumerate(orders):
        table[: len(graph_orders), b] = torch.tensor(graph_orders)
        table[len(graph_orders) :, b] = table[0, b]  # padding: any valid order, weight 0
        weights[: len(graph_orders), b] = 1.0
    device = a.device
    return PermutationFrames(
        table.to(device), weights.to(device), torch.tensor(exact, device=device), mask
    )


class GIN(nn.Module):
    """Graph Isomorphism Network (sum aggregation, MLP updates), graph-level readout.

    With ``positions=True`` it is the FA-GIN+ID backbone: a one-hot of each node's position in
    the (canonical) order is appended to its features, which lets it tell apart graphs that
    1-WL (and plain GIN) cannot; frame averaging restores the invariance the positions break.
    """

    def __init__(
        self, in_features: int, hidden: int, out_features: int, layers: int = 3,
        max_nodes: int = 0, positions: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if positions and max_nodes < 1:
            raise ValueError("positions=True needs max_nodes (the one-hot length)")
        self.positions = positions
        self.max_nodes = max_nodes
        width = in_features + (max_nodes if positions else 0)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(
                nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            )
            width = hidden
        self.readout = nn.Linear(hidden, out_features)

    def forward(self, adjacency: Tensor, features: Tensor, mask: Tensor | None = None) -> Tensor:
        n = adjacency.shape[-1]
        if self.positions:
            one_hot = torch.eye(n, self.max_nodes, dtype=features.dtype, device=features.device)
            features = torch.cat([features, one_hot.expand(features.shape[0], -1, -1)], -1)
        h = features
        for layer in self.layers:
            h = layer(h + adjacency.to(h.dtype) @ h)
        if mask is not None:
            h = h * mask.unsqueeze(-1).to(h.dtype)
        return self.readout(h.sum(1))


class AdjacencyMLP(nn.Module):
    """An MLP on the flattened adjacency matrix: FA-MLP when its input is in canonical order."""

    def __init__(self, nodes: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(nodes * nodes, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
        )

    def forward(self, adjacency: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(adjacency.flatten(1))
