"""Permutation frames for graphs: exact invariance/equivariance under relabelling, blocks from
ties, the cap, padding, and FA-GIN+ID separating graphs that 1-WL (plain GIN) cannot."""

import math

import pytest
import torch

from meanwise.symmetry import (
    GIN,
    AdjacencyMLP,
    FrameAveraging,
    permutation_frames,
    spectral_node_features,
)
from meanwise.testing import assert_equivariant


def _random_graph(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    upper = torch.triu((torch.rand(n, n, generator=g) < p).float(), 1)
    return upper + upper.T


def _relabel(adjacency: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return adjacency[perm][:, perm]


def _cycle(n: int) -> torch.Tensor:
    a = torch.zeros(n, n)
    for i in range(n):
        a[i, (i + 1) % n] = a[(i + 1) % n, i] = 1.0
    return a


def _two_triangles() -> torch.Tensor:
    a = torch.zeros(6, 6)
    a[:3, :3] = _cycle(3)
    a[3:, 3:] = _cycle(3)
    return a


def test_spectral_features_are_permutation_equivariant():
    g = torch.Generator().manual_seed(0)
    a = _random_graph(9, 0.4, g)
    perm = torch.randperm(9, generator=g)
    features = spectral_node_features(a)
    torch.testing.assert_close(spectral_node_features(_relabel(a, perm)), features[:, perm])
    # heat-kernel diagonal at t -> 0 is 1 for every node; the degree is the first feature
    torch.testing.assert_close(features[0, :, 0], a.sum(1).double())


def test_relabelled_graph_gets_the_relabelled_frame():
    g = torch.Generator().manual_seed(1)
    a = _random_graph(10, 0.3, g)
    perm = torch.randperm(10, generator=g)
    frames = permutation_frames(a, max_elements=10_000)
    moved = permutation_frames(_relabel(a, perm), max_elements=10_000)
    assert bool(frames.exact[0]) and frames.size == moved.size
    canon = {
        tuple(x.flatten().tolist()) for x in frames.canonicalize_adjacency(a.unsqueeze(0))[:, 0]
    }
    canon_moved = {
        tuple(x.flatten().tolist())
        for x in moved.canonicalize_adjacency(_relabel(a, perm).unsqueeze(0))[:, 0]
    }
    assert canon == canon_moved  # the same set of canonical adjacency matrices


def test_ties_form_blocks_and_the_cap_samples():
    # a star: the 5 leaves are interchangeable, the centre is unique -> |F| = 5! = 120
    star = torch.zeros(6, 6)
    star[0, 1:] = star[1:, 0] = 1.0
    exact = permutation_frames(star, max_elements=1000)
    assert exact.size == math.factorial(5) and bool(exact.exact[0])
    assert (exact.orders[:, 0, -1] == 0).all() or (exact.orders[:, 0, 0] == 0).all()
    capped = permutation_frames(star, max_elements=16, generator=torch.Generator().manual_seed(0))
    assert capped.size == 16 and not bool(capped.exact[0])


@pytest.mark.parametrize("output", ["invariant", "node"])
def test_fa_mlp_is_exactly_invariant_and_equivariant_on_padded_batches(output):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    sizes = (5, 7, 8)
    n = max(sizes)
    adjacency = torch.zeros(len(sizes), n, n)
    mask = torch.zeros(len(sizes), n, dtype=torch.bool)
    for b, size in enumerate(sizes):
        adjacency[b, :size, :size] = _random_graph(size, 0.5, g)
        mask[b, :size] = True
    features = torch.randn(len(sizes), n, 2, generator=g)

    class NodeBackbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = AdjacencyMLP(n, 32, n * 3)

        def forward(self, a, x, mask):
            per_node = self.mlp(a).reshape(-1, n, 3) + x.sum(-1, keepdim=True)
            return per_node * mask.unsqueeze(-1)

    class GraphBackbone(NodeBackbone):
        def forward(self, a, x, mask):
            return super().forward(a, x, mask).sum(1)

    backbone = GraphBackbone() if output == "invariant" else NodeBackbone()
    fa = FrameAveraging(backbone, "Sn", output, node_inputs=["x"], max_elements=100_000)
    fa(adjacency, mask, x=features)
    assert bool(fa.last_frames.exact.all())
    # each graph relabelled by its own permutation of all n slots (padding and mask move too);
    # exact up to the order of the average's sum
    assert_equivariant(
        fa, "Sn", [(adjacency, "adjacency")], output, keyword_inputs={"x": (features, "node")},
        mask=mask, tolerance=1e-6,
    )  # fmt: skip


def test_fa_gin_with_positions_separates_graphs_that_1wl_cannot():
    """C6 and two triangles are both 2-regular: 1-WL, hence GIN, gives them equal outputs."""
    torch.manual_seed(4)
    pair = torch.stack([_cycle(6), _two_triangles()])
    ones = torch.ones(2, 6, 1)
    gin = GIN(1, 16, 4)
    plain = gin(pair, ones)
    torch.testing.assert_close(plain[0], plain[1])
    with_ids = GIN(1, 16, 4, max_nodes=6, positions=True)
    fa = FrameAveraging(with_ids, "Sn", node_inputs=["features"], max_elements=1000)
    out = fa(pair, features=ones)
    assert bool(fa.last_frames.exact.all()) and fa.last_frames.size == math.factorial(6)
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert_equivariant(
        fa, "Sn", [(pair, "adjacency")], "invariant", keyword_inputs={"features": (ones, "node")},
        tolerance=1e-6,
    )  # fmt: skip


def test_stochastic_graph_mode_draws_real_elements():
    star = torch.zeros(1, 4, 4)
    star[0, 0, 1:] = star[0, 1:, 0] = 1.0
    fa = FrameAveraging(AdjacencyMLP(4, 8, 2), "Sn", stochastic="always",
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    fa(star.expand(50, -1, -1))
    assert fa.last_frames.size == 1
    # every drawn order keeps the centre where the full frame puts it
    full = permutation_frames(star)
    centre_position = int((full.orders[0, 0] == 0).nonzero())
    assert (fa.last_frames.orders[0, :, centre_position] == 0).all()


def test_graph_errors():
    with pytest.raises(ValueError, match="symmetric"):
        permutation_frames(torch.triu(torch.ones(4, 4), 1))
    with pytest.raises(ValueError, match=r"adjacency must have shape \[B, n, n\]"):
        permutation_frames(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="output must be one of"):
        FrameAveraging(AdjacencyMLP(4, 8, 2), "Sn", "vector")
    with pytest.raises(ValueError, match="max_elements must be >= 1"):
        permutation_frames(torch.zeros(3, 3), max_elements=0)
