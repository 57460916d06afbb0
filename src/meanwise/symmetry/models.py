"""The n-body models of the Frame Averaging paper's table, as the authors' code builds them.

- `FAGNN`: 4 residual message-passing layers (SiLU), 60 hidden channels read as 20 3-vectors,
  fully connected graph with edge features [q_i q_j, ‖x_i − x_j‖²], inputs [x − t, v] in each of
  the 8 E(3) frame elements. Between layers the vector features are rotated back to global
  coordinates, averaged over the frame and re-framed by the PCA frame of each system's centred
  latent vectors (`reframe`); the output uses the last frame plus the input centroid.
- `GNN`: the plain baseline (EGNN paper's code): same layers, 64 hidden channels, edge feature
  q_i q_j only, inputs [x, v] in global coordinates, positions decoded directly.
- `LinearDynamics`: x̂ = x + t·v with one learned scalar t.

All take ``(positions [B, n, 3], velocities [B, n, 3], charges [B, n])`` and return predicted
positions [B, n, 3].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from meanwise.symmetry.frame_averaging import reframe
from meanwise.symmetry.frames import DEFAULT_EIGENGAP_TOL, Frames, pca_frames

__all__ = ["GraphConv", "FAGNN", "GNN", "LinearDynamics", "edge_features"]


def _neighbours(n: int, device: torch.device | None = None) -> Tensor:
    """[n, n−1]: row i lists the other nodes j ≠ i (the fully connected graph's edges)."""
    all_nodes = torch.arange(n, device=device).expand(n, n)
    keep = ~torch.eye(n, dtype=torch.bool, device=device)
    return all_nodes[keep].reshape(n, n - 1)


def edge_features(positions: Tensor, charges: Tensor, distances: bool) -> Tensor:
    """[B, n, n−1, 1 or 2]: q_i q_j, and ‖x_i − x_j‖² when `distances` (both invariant)."""
    others = _neighbours(positions.shape[1], positions.device)
    features = [(charges.unsqueeze(-1) * charges[:, others]).unsqueeze(-1)]
    if distances:
        diff = positions.unsqueeze(2) - positions[:, others]
        features.append(diff.square().sum(-1, keepdim=True))
    return torch.cat(features, -1)


class GraphConv(nn.Module):
    """The EGNN/FA code's `GCL` (recurrent) on a fully connected graph, dense.

    m_ij = φ_e([h_i, h_j, e_ij]), h_i ← h_i + φ_h([h_i, Σ_j m_ij]). The first edge layer is
    one ``nn.Linear(2C + e, H)`` as in the reference, applied as W_i h_i + W_j h_j + W_e e_ij
    so that the node projections are computed per node, not per edge (n−1 times fewer).
    ``h`` may carry leading axes ([F, B, n, C]); ``edge_attr`` [B, n, n−1, e] broadcasts.
    """

    def __init__(self, channels: int, hidden: int, edge_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.edge_in = nn.Linear(2 * channels + edge_dim, hidden)
        self.edge_out = nn.Linear(hidden, hidden)
        self.node_mlp = nn.Sequential(
            nn.Linear(hidden + channels, hidden), nn.SiLU(), nn.Linear(hidden, channels)
        )
        self.act = nn.SiLU()

    def forward(self, h: Tensor, edge_attr: Tensor) -> Tensor:
        c = self.channels
        weight = self.edge_in.weight
        others = _neighbours(h.shape[-2], h.device)
        source = h @ weight[:, :c].T  # [..., n, H]
        target = (h @ weight[:, c : 2 * c].T)[..., others, :]  # [..., n, n−1, H]
        edges = torch.nn.functional.linear(edge_attr, weight[:, 2 * c :], self.edge_in.bias)
        messages = self.act(self.edge_out(self.act(source.unsqueeze(-2) + target + edges)))
        return h + self.node_mlp(torch.cat([h, messages.sum(-2)], -1))


class FAGNN(nn.Module):
    """FA-GNN (Puny et al.): E(3)-equivariant by frame averaging inside every layer."""

    def __init__(
        self,
        hidden: int = 60,
        layers: int = 4,
        *,
        on_degenerate: str = "warn",
        eigengap_tol: float = DEFAULT_EIGENGAP_TOL,
    ) -> None:
        super().__init__()
        if hidden % 3 != 0 or hidden < 3:
            raise ValueError(f"hidden must be a positive multiple of 3 (3-vectors); got {hidden}")
        if layers < 1:
            raise ValueError(f"layers must be >= 1; got {layers}")
        self.hidden = hidden
        self.frame_options = {"on_degenerate": on_degenerate, "eigengap_tol": eigengap_tol}
        self.embedding = nn.Linear(6, hidden)
        self.layers = nn.ModuleList(GraphConv(hidden, hidden, 2) for _ in range(layers))
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))
        self.input_frames: Frames | None = None
        # [B] bool after a forward: some frame of that system (input or latent) was degenerate
        self.degenerate: Tensor | None = None

    def forward(self, positions: Tensor, velocities: Tensor, charges: Tensor) -> Tensor:
        batch, n, _ = positions.shape
        frames = pca_frames(positions, "E3", **self.frame_options)
        self.input_frames = frames
        x = frames.canonicalize(positions)
        v = frames.canonicalize(velocities, translate=False)
        h = self.embedding(torch.cat([x, v], -1))  # [F, B, n, hidden]
        edges = edge_features(positions, charges, distances=True)
        latent = frames
        degenerate = frames.degenerate
        for index, layer in enumerate(self.layers):
            h = layer(h, edges)
            if index < len(self.layers) - 1:
                vectors = h.reshape(latent.size, batch, n * self.hidden // 3, 3)
                vectors, latent = reframe(vectors, latent, "E3", **self.frame_options)
                degenerate = degenerate | latent.degenerate
                h = vectors.reshape(latent.size, batch, n, self.hidden)
        self.degenerate = degenerate
        out = latent.restore(self.decoder(h))  # rotate back with the last frame, average
        return out + frames.centroid.unsqueeze(1)


class GNN(nn.Module):
    """The plain GNN baseline: no symmetry beyond node permutations."""

    def __init__(self, hidden: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Linear(6, hidden)
        self.layers = nn.ModuleList(GraphConv(hidden, hidden, 1) for _ in range(layers))
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))

    def forward(self, positions: Tensor, velocities: Tensor, charges: Tensor) -> Tensor:
        h = self.embedding(torch.cat([positions, velocities], -1))
        edges = edge_features(positions, charges, distances=False)
        for layer in self.layers:
            h = layer(h, edges)
        return self.decoder(h)


class LinearDynamics(nn.Module):
    """x̂ = x + t·v, the published 'Linear' baseline (t starts at 0.7 as in the EGNN code)."""

    def __init__(self, time: float = 0.7) -> None:
        super().__init__()
        self.time = nn.Parameter(torch.tensor([float(time)]))

    def forward(self, positions: Tensor, velocities: Tensor, charges: Tensor) -> Tensor:
        return positions + self.time * velocities
