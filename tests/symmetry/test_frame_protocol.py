"""The Frame protocol under FrameAveraging: the for_points/for_graphs constructors build what the
old constructor builds, a frame of one's own plugs into the same forward, options that do not
apply are refused, and outputs follow the input's dtype and device."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from meanwise.symmetry import AdjacencyMLP, Frame, FrameAveraging, PCAFrame, PermutationFrame
from meanwise.testing import assert_equivariant, equivariance_error


class PointNet(nn.Module):
    """Not symmetric on its own: per-point MLP with a masked mean-pool context (device-safe)."""

    def __init__(self, d: int = 3, out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.point = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(32, out)

    def forward(self, x, mask=None, velocities=None):
        if velocities is not None:
            x = x + velocities
        h = self.point(x)
        m = torch.ones_like(x[..., 0]) if mask is None else mask.to(x.dtype)
        pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
        return self.head(torch.cat([h, pooled.unsqueeze(1).expand_as(h)], -1))


class NodeNet(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.n = n
        self.mlp = AdjacencyMLP(n, 16, 2 * n)

    def forward(self, a, x, mask=None):
        out = self.mlp(a).reshape(-1, self.n, 2) + x
        return out if mask is None else out * mask.unsqueeze(-1).to(out.dtype)


def _clouds(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # distinct eigenvalues
    points = (torch.randn(4, 12, 3, generator=g, dtype=torch.float64) * scale).to(dtype)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[1, 9:] = mask[3, 5:] = False
    velocities = torch.randn(4, 12, 3, generator=g, dtype=torch.float64).to(dtype)
    return points, mask, velocities


def _graphs(dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 7
    upper = torch.triu((torch.rand(3, n, n, generator=g) < 0.5).to(dtype), 1)
    adjacency = upper + upper.transpose(1, 2)
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[2, 5:] = False
    adjacency = adjacency * (mask.unsqueeze(1) & mask.unsqueeze(2))
    features = torch.randn(3, n, 2, generator=g, dtype=torch.float64).to(dtype)
    return adjacency, mask, features


# --- constructors ------------------------------------------------------------------------------


def test_for_points_builds_what_the_constructor_builds():
    points, mask, velocities = _clouds()
    backbone = PointNet()
    for stochastic in (False, "always"):
        old = FrameAveraging(
            backbone, "SE3", "position", vector_inputs=["velocities"], stochastic=stochastic,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        new = FrameAveraging.for_points(
            backbone, "SE3", "position", vector_inputs=["velocities"], stochastic=stochastic,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        expected = old(points, mask, velocities=velocities)
        assert torch.equal(new(points, mask, velocities=velocities), expected)
    assert isinstance(new.frame, PCAFrame) and new.group == "SE(3)"


def test_for_graphs_builds_what_the_constructor_builds():
    adjacency, mask, features = _graphs()
    backbone = NodeNet(7)
    old = FrameAveraging(backbone, "Sn", "node", node_inputs=["x"], max_elements=100)
    new = FrameAveraging.for_graphs(backbone, "node", node_inputs=["x"], max_elements=100)
    assert torch.equal(new(adjacency, mask, x=features), old(adjacency, mask, x=features))
    assert isinstance(new.frame, PermutationFrame) and new.group == "Sn"
    # frames() gives what forward averaged over, for graphs as for point clouds
    assert torch.equal(new.frames(adjacency, mask).orders, new.last_frames.orders)
    assert_equivariant(new, "Sn", [(adjacency, "adjacency")], "node",
                       keyword_inputs={"x": (features, "node")}, mask=mask)  # fmt: skip


def test_options_that_do_not_apply_are_refused():
    backbone = PointNet()
    with pytest.raises(ValueError, match=r"\['vector_inputs'\] apply to point-cloud groups"):
        FrameAveraging(backbone, "Sn", vector_inputs=["v"])
    with pytest.raises(ValueError, match=r"\['max_elements'\] apply to group 'Sn'"):
        FrameAveraging(backbone, "E3", max_elements=8)
    with pytest.raises(ValueError, match="configure the frame"):
        FrameAveraging(backbone, PCAFrame("E3"), on_degenerate="raise")
    with pytest.raises(ValueError, match="for_points takes a point group"):
        FrameAveraging.for_points(backbone, "Sn")
    with pytest.raises(ValueError, match="output must be one of"):
        FrameAveraging.for_graphs(AdjacencyMLP(4, 8, 2), "position")
    with pytest.raises(TypeError, match="group must be a group name"):
        FrameAveraging(backbone, 3)
    with pytest.raises(ValueError, match="graph frames take none"):
        FrameAveraging.for_graphs(AdjacencyMLP(4, 8, 2))(
            torch.zeros(1, 4, 4), None, torch.ones(1, 4)
        )
    with pytest.raises(TypeError, match="adjacency must be a tensor"):
        FrameAveraging.for_graphs(AdjacencyMLP(4, 8, 2))([[0.0]])


# --- a frame of one's own ----------------------------------------------------------------------


@dataclass(frozen=True)
class CentroidFrames:
    centroid: torch.Tensor  # [B, d]

    @property
    def size(self) -> int:
        return 1

    def sample(self, generator=None):
        return self


class CentroidFrame:
    """The frame of the translation group T(d): F(X) = {translation by X's centroid}."""

    group = "T(d)"
    outputs = ("invariant", "position")
    input_name = "points"
    declared_inputs = ()
    declared_kind = "vector"

    def check_output(self, output):
        if output not in self.outputs:
            raise ValueError(f"output must be one of {self.outputs}")

    def frames(self, x, mask, weights, generator):
        return CentroidFrames(x.mean(1))

    def to_canonical(self, frames, x, mask):
        return (x - frames.centroid.unsqueeze(1)).unsqueeze(0)

    def input_to_canonical(self, frames, value):
        return value.unsqueeze(0)

    def mask_to_canonical(self, frames, mask):
        return mask.unsqueeze(0)

    def pool(self, frames, outputs, output):
        mean = outputs.mean(0)
        return mean + frames.centroid.unsqueeze(1) if output == "position" else mean


class Translations:
    """T(3) for assert_equivariant: x ↦ x + t on positions."""

    name = "T(3)"
    words = ("position",)

    def sample(self, batch, nodes, generator):
        return torch.randn(batch, 3, generator=generator, dtype=torch.float64)

    def act(self, t, word, x):
        return x + t.to(x).unsqueeze(1)

    def describe(self, t, index):
        return f"t = {t[index].tolist()}"


def test_a_frame_of_ones_own_plugs_into_the_same_forward():
    assert isinstance(CentroidFrame(), Frame)
    points, _, _ = _clouds(torch.float64)
    backbone = PointNet().double()
    fa = FrameAveraging(backbone, CentroidFrame(), "position")
    assert_equivariant(fa, Translations(), [(points, "position")], "position")
    # the frame decides the symmetry: the bare backbone is not translation-equivariant, and a
    # translation frame gives no rotation equivariance
    with pytest.raises(AssertionError, match="not equivariant under T"):
        assert_equivariant(backbone, Translations(), [(points, "position")], "position")
    assert equivariance_error(fa, "E3", [(points, "position")], "position").error > 1e-2


# --- dtype and device --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_follow_the_input_dtype_and_stay_exact(dtype):
    points, mask, velocities = _clouds(dtype)
    fa = FrameAveraging.for_points(PointNet().to(dtype), "E3", "position",
                                   vector_inputs=["velocities"])  # fmt: skip
    out = fa(points, mask, velocities=velocities)
    assert out.dtype == dtype and fa.last_frames.rotations.dtype == dtype
    # the default tolerance is 1e-5 in float32 and 1e-10 in float64
    check = assert_equivariant(
        fa, ("E3", "Sn"), [(points, "node position")], "node position", mask=mask,
        keyword_inputs={"velocities": (velocities, "node vector")},
    )  # fmt: skip
    assert check.tolerance == (1e-10 if dtype == torch.float64 else 1e-5)
    adjacency, gmask, features = _graphs(dtype)
    graph_fa = FrameAveraging.for_graphs(NodeNet(7).to(dtype), "node", node_inputs=["x"])
    assert graph_fa(adjacency, gmask, x=features).dtype == dtype
    assert_equivariant(graph_fa, "Sn", [(adjacency, "adjacency")], "node",
                       keyword_inputs={"x": (features, "node")}, mask=gmask)  # fmt: skip


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: the CUDA path is not exercised"
)
def test_outputs_follow_the_input_device_on_cuda():
    cuda = torch.device("cuda")
    points, mask, velocities = _clouds()
    fa = FrameAveraging.for_points(PointNet(), "E3", "position", vector_inputs=["velocities"])
    expected = fa(points, mask, velocities=velocities)
    fa.to(cuda)
    got = fa(points.to(cuda), mask.to(cuda), velocities=velocities.to(cuda))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    assert_equivariant(
        fa, ("E3", "Sn"), [(points.to(cuda), "node position")], "node position",
        mask=mask.to(cuda), keyword_inputs={"velocities": (velocities.to(cuda), "node vector")},
    )  # fmt: skip
    adjacency, gmask, features = _graphs()
    graph_fa = FrameAveraging.for_graphs(NodeNet(7), "node", node_inputs=["x"])
    expected = graph_fa(adjacency, gmask, x=features)
    graph_fa.to(cuda)
    got = graph_fa(adjacency.to(cuda), gmask.to(cuda), x=features.to(cuda))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)
    stochastic = FrameAveraging.for_graphs(NodeNet(7).to(cuda), "node", node_inputs=["x"],
                                           stochastic="always")  # fmt: skip
    assert stochastic(adjacency.to(cuda), gmask.to(cuda), x=features.to(cuda)).is_cuda
