"""n-body models: the dense message passing against an edge-list reference, FA-GNN's exact
E(3) and permutation equivariance, per-layer reframing against a loop over frame elements."""

import pytest
import torch
from scipy.stats import ortho_group
from torch import nn

from meanwise.symmetry import pca_frames, relative_eigengaps
from meanwise.symmetry.frame_averaging import reframe
from meanwise.symmetry.models import FAGNN, GNN, GraphConv, LinearDynamics, edge_features
from meanwise.testing import assert_equivariant


def _systems(count: int, seed: int, min_gap: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count * 4, 5, 3, generator=g)
    v = 0.5 * torch.randn(count * 4, 5, 3, generator=g)
    q = torch.where(torch.rand(count * 4, 5, generator=g) < 0.5, 1.0, -1.0)
    gaps = relative_eigengaps(pca_frames(x, "E3", on_degenerate="ignore").eigenvalues).amin(1)
    keep = (gaps >= min_gap).nonzero().squeeze(1)[:count]
    assert len(keep) == count
    return x[keep], v[keep], q[keep]


def _edge_list_layer(layer: GraphConv, h, edge_attr):
    """The reference GCL: concatenate [h_i, h_j, e_ij] per edge, MLPs, scatter-sum by i."""
    batch, n, _ = h.shape
    out = []
    for b in range(batch):
        rows, cols = zip(*[(i, j) for i in range(n) for j in range(n) if i != j], strict=True)
        rows, cols = torch.tensor(rows), torch.tensor(cols)
        e = torch.stack(
            [edge_attr[b, i, j if j < i else j - 1] for i, j in zip(rows, cols, strict=True)]
        )
        m = torch.cat([h[b, rows], h[b, cols], e], 1)
        m = layer.act(layer.edge_out(layer.act(layer.edge_in(m))))
        agg = torch.zeros(n, m.shape[1]).index_add_(0, rows, m)
        out.append(h[b] + layer.node_mlp(torch.cat([h[b], agg], 1)))
    return torch.stack(out)


def test_dense_graph_conv_matches_the_edge_list_reference():
    torch.manual_seed(0)
    layer = GraphConv(12, 16, 2)
    x, _, q = _systems(3, seed=1)
    h = torch.randn(3, 5, 12)
    edges = edge_features(x, q, distances=True)
    torch.testing.assert_close(layer(h, edges), _edge_list_layer(layer, h, edges))
    # the edge features are q_i q_j and |x_i - x_j|^2 for j != i, in order
    assert edges[0, 2, 2, 0] == q[0, 2] * q[0, 3]
    torch.testing.assert_close(edges[0, 2, 0, 1], (x[0, 2] - x[0, 0]).square().sum())


def test_reframe_matches_a_loop_over_frame_elements():
    g = torch.Generator().manual_seed(2)
    cloud = torch.randn(2, 30, 3, generator=g, dtype=torch.float64) * torch.tensor([1, 2, 3.0])
    frames = pca_frames(cloud, "E3")
    framed = torch.randn(8, 2, 40, 3, generator=g, dtype=torch.float64)
    new, new_frames = reframe(framed, frames)
    global_vectors = sum(framed[f] @ frames.rotations[f].transpose(-1, -2) for f in range(8)) / 8
    expected = pca_frames(global_vectors, "E3")
    torch.testing.assert_close(new_frames.rotations, expected.rotations)
    for f in range(8):
        for b in range(2):
            centred = global_vectors[b] - global_vectors[b].mean(0)
            torch.testing.assert_close(new[f, b], centred @ expected.rotations[f, b])


@torch.no_grad()
def test_fa_gnn_is_e3_and_permutation_equivariant_in_float32():
    torch.manual_seed(3)
    # the input frames have gaps >= 0.05; a latent frame (of 100 learned vectors) can still be
    # nearly degenerate: such systems are flagged, and the bound holds for the others
    model = FAGNN(on_degenerate="ignore", eigengap_tol=0.01)
    x, v, q = _systems(64, seed=4, min_gap=0.05)
    out = model(x, v, q)
    flagged = model.degenerate
    assert flagged.sum() <= 4
    for trial in range(3):
        rotation = torch.as_tensor(ortho_group.rvs(3, random_state=trial), dtype=torch.float32)
        shift = torch.randn(3)
        moved = model(x @ rotation.T + shift, v @ rotation.T, q)
        good = ~(flagged | model.degenerate)
        expected = out[good] @ rotation.T + shift
        assert float((moved[good] - expected).norm() / expected.norm()) <= 1e-5
    particles = [(x, "node"), (v, "node"), (q, "node")]
    assert_equivariant(model, "Sn", particles, "node", tolerance=1e-5)


@torch.no_grad()
def test_plain_gnn_is_permutation_equivariant_but_not_rotation_equivariant():
    torch.manual_seed(5)
    model = GNN()
    x, v, q = _systems(16, seed=6)
    assert_equivariant(model, "Sn", [(x, "node"), (v, "node"), (q, "node")], "node")
    # the whole batch, one rotation from scipy, is off by more than 1 %
    out = model(x, v, q)
    rotation = torch.as_tensor(ortho_group.rvs(3, random_state=0), dtype=torch.float32)
    moved = model(x @ rotation.T, v @ rotation.T, q)
    assert float((moved - out @ rotation.T).norm() / out.norm()) > 1e-2
    with pytest.raises(AssertionError, match=r"not equivariant under O\(3\)"):
        assert_equivariant(model, "O3", [(x, "vector"), (v, "vector"), (q, "invariant")], "vector")


def test_linear_dynamics_closed_form_and_fa_gnn_size():
    x, v, q = _systems(4, seed=7)
    torch.testing.assert_close(LinearDynamics(0.7)(x, v, q), x + 0.7 * v)
    sizes = {
        "FA-GNN": sum(p.numel() for p in FAGNN().parameters()),
        "GNN": sum(p.numel() for p in GNN().parameters()),
    }
    # 4 layers of edge MLP (2*60+2 -> 60 -> 60) and node MLP (120 -> 60 -> 60), embedding, decoder
    per_layer = (122 * 60 + 60) + (60 * 60 + 60) + (120 * 60 + 60) + (60 * 60 + 60)
    assert sizes["FA-GNN"] == 4 * per_layer + (6 * 60 + 60) + (60 * 60 + 60) + (60 * 3 + 3)
    assert sizes["GNN"] > sizes["FA-GNN"]


def test_fa_gnn_trains():
    """A few Adam steps on one batch reduce the loss: gradients reach every parameter."""
    torch.manual_seed(8)
    model = FAGNN(hidden=12, layers=2, on_degenerate="ignore")
    x, v, q = _systems(20, seed=9)
    target = x + 0.7 * v
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(x, v, q) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="multiple of 3"):
        FAGNN(hidden=61)
    with pytest.raises(ValueError, match="layers must be >= 1"):
        FAGNN(layers=0)
    assert isinstance(GNN().layers[0], nn.Module)
