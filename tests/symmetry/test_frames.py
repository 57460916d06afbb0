"""PCA frames and FrameAveraging against the invariances they must have.

Oracles: random orthogonal/rotation matrices from scipy (an implementation independent of
ours), `meanwise.testing.assert_equivariant` (its own group elements and error measure are
tested in tests/test_testing.py), closed-form canonical coordinates, and symmetric point sets
(cube, regular polygon, whitened blob) whose covariance is degenerate.
"""

import warnings

import pytest
import torch
from scipy.stats import ortho_group, special_ortho_group
from torch import nn

from meanwise.symmetry import (
    DegenerateFrameError,
    DegenerateFrameWarning,
    FrameAveraging,
    parse_group,
    pca_frames,
    relative_eigengaps,
)
from meanwise.testing import assert_equivariant, equivariance_error

SIZES = (3, 17, 300, 2048)


def _orthogonal(d: int, seed: int, proper: bool, dtype=torch.float32) -> torch.Tensor:
    maker = special_ortho_group if proper else ortho_group
    q = maker.rvs(d, random_state=seed)
    if not proper and torch.det(torch.as_tensor(q)) > 0:
        q[:, 0] = -q[:, 0]  # a reflection: the case SO(d) frames must not cover
    return torch.as_tensor(q, dtype=dtype)


def _cloud(n: int, d: int, g: torch.Generator, min_gap: float = 0.05) -> torch.Tensor:
    """A random cloud whose covariance has all relative eigengaps >= min_gap (rejection)."""
    for _ in range(1000):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        x = x * torch.linspace(1.0, 2.0, d, dtype=torch.float64)  # anisotropic on average
        c = x - x.mean(0)
        gaps = relative_eigengaps(torch.linalg.eigvalsh(c.T @ c / n))
        if gaps.min() >= min_gap:
            return x.float()
    raise AssertionError("could not draw a cloud with the requested eigengap")


def _padded_batch(d: int, seed: int, sizes=SIZES):
    # fewer than d + 1 points span less than d dimensions: repeated zero eigenvalues
    sizes = tuple(max(n, d + 1) for n in sizes)
    g = torch.Generator().manual_seed(seed)
    clouds = [_cloud(n, d, g) for n in sizes]
    n_max = max(sizes)
    points = torch.zeros(len(sizes), n_max, d)
    mask = torch.zeros(len(sizes), n_max, dtype=torch.bool)
    for b, c in enumerate(clouds):
        points[b, : len(c)] = c + torch.randn(d, generator=g)  # off the origin
        mask[b, : len(c)] = True
        points[b, len(c) :] = 7.0  # padding garbage that must not matter
    return points, mask


class PointBackbone(nn.Module):
    """Deliberately not symmetric: an MLP on coordinates with a masked mean-pool context."""

    def __init__(self, d: int, out_per_point: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.point = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32))
        self.head = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, out_per_point))

    def forward(self, x, mask=None):
        h = self.point(x)
        m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
        pooled = (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
        return self.head(torch.cat([h, pooled.unsqueeze(1).expand_as(h)], -1))


class InvariantBackbone(PointBackbone):
    def forward(self, x, mask=None):
        per_point = super().forward(x, mask)
        m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
        return (per_point * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)  # [B, 4]


# --- groups and frame structure ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,dim,translations,proper",
    [("O3", 3, False, False), ("SO3", 3, False, True), ("E3", 3, True, False),
     ("SE3", 3, True, True), ("O(2)", 2, False, False), ("se(5)", 5, True, True)],
)  # fmt: skip
def test_parse_group(name, dim, translations, proper):
    spec = parse_group(name)
    assert (spec.dim, spec.translations, spec.proper) == (dim, translations, proper)


@pytest.mark.parametrize("bad", ["U3", "E", "O(0)", "SO-3", ""])
def test_parse_group_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match="group must be one of"):
        parse_group(bad)


@pytest.mark.parametrize("group,size", [("O3", 8), ("SO3", 4), ("E(2)", 4), ("SE(2)", 2),
                                        ("O(5)", 32), ("SO(4)", 8)])  # fmt: skip
def test_frame_sizes_and_elements_are_orthogonal(group, size):
    d = parse_group(group).dim
    g = torch.Generator().manual_seed(size)
    x = torch.stack([_cloud(40, d, g) for _ in range(3)]).double()
    frames = pca_frames(x, group)
    assert frames.size == size
    r = frames.rotations
    eye = torch.eye(d, dtype=r.dtype).expand_as(r)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye)
    dets = torch.linalg.det(r)
    if parse_group(group).proper:
        torch.testing.assert_close(dets, torch.ones_like(dets))
    else:
        assert (dets > 0).sum() == (dets < 0).sum()  # both cosets, equally often
    # all elements of one cloud are distinct
    flat = r[:, 0].reshape(size, -1)
    assert torch.cdist(flat, flat).add(torch.eye(size)).min() > 0.5


def test_frame_is_equivariant_as_a_set():
    """F(Q X + b) = (Q, b) F(X): the canonical clouds of both are the same set."""
    g = torch.Generator().manual_seed(0)
    x = _cloud(50, 3, g).double().unsqueeze(0)
    q = _orthogonal(3, 1, proper=False, dtype=torch.float64)
    b = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    canon = pca_frames(x, "E3").canonicalize(x)[:, 0]  # [8, N, 3]
    moved = x @ q.T + b
    canon_moved = pca_frames(moved, "E3").canonicalize(moved)[:, 0]
    distance = torch.cdist(canon.flatten(1), canon_moved.flatten(1))  # [8, 8]
    assert distance.min(1).values.max() < 1e-10
    assert distance.min(0).values.max() < 1e-10


def test_canonicalize_then_restore_is_the_identity_and_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.stack([_cloud(30, 3, g) for _ in range(2)]).double()
    frames = pca_frames(x, "E3")
    y = frames.canonicalize(x)
    # y_f = (x - t) R_f written out per element
    for f in range(frames.size):
        for b in range(2):
            expected = (x[b] - frames.centroid[b]) @ frames.rotations[f, b]
            torch.testing.assert_close(y[f, b], expected)
    torch.testing.assert_close(frames.restore(y, translate=True), x)


def test_weighted_centroid_and_integer_weights_equal_repeated_points():
    g = torch.Generator().manual_seed(2)
    x = _cloud(20, 3, g).double()
    masses = torch.randint(1, 4, (20,), generator=g).double()
    frames = pca_frames(x.unsqueeze(0), "E3", weights=masses.unsqueeze(0))
    torch.testing.assert_close(frames.centroid[0], (masses[:, None] * x).sum(0) / masses.sum())
    repeated = x.repeat_interleave(masses.long(), dim=0).unsqueeze(0)
    plain = pca_frames(repeated, "E3")
    torch.testing.assert_close(frames.eigenvalues, plain.eigenvalues)
    torch.testing.assert_close(frames.centroid, plain.centroid)


# --- FrameAveraging: invariance and equivariance -----------------------------------------------


@pytest.mark.parametrize(
    "group,output",
    [(g, o) for g in ("O3", "SO3", "E3", "SE3", "E(2)", "SO(5)")
     for o in ("invariant", "vector", "position")
     if o != "position" or parse_group(g).translations],
)  # fmt: skip
def test_fa_is_symmetric_on_batched_masked_clouds(group, output):
    """E(d) on the coordinates and S_N on the point order at once, padding included: each
    cloud gets its own (R, t) and its own permutation of all N slots (the mask moves along)."""
    spec = parse_group(group)
    d = spec.dim
    backbone = InvariantBackbone(d, 4) if output == "invariant" else PointBackbone(d, d)
    fa = FrameAveraging(backbone, group, output, on_degenerate="raise")
    points, mask = _padded_batch(d, seed=d + len(group))
    moved = "node position" if spec.translations else "node vector"
    out = output if output == "invariant" else f"node {output}"
    assert_equivariant(fa, (group, "Sn"), [(points, moved)], out, mask=mask, tolerance=1e-5)


def test_backbone_sees_all_frame_elements_in_one_call():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.sum(1)

    g = torch.Generator().manual_seed(3)
    x = torch.stack([_cloud(10, 3, g) for _ in range(5)])
    FrameAveraging(Recorder(), "E3")(x)
    assert calls == [(8 * 5, 10, 3)]


def test_vector_inputs_are_rotated_not_centred_and_scalars_pass_through():
    class Dynamics(nn.Module):
        def forward(self, x, velocities, charges):
            return x + 0.7 * velocities * charges.unsqueeze(-1) + 0.1 * x.square().sum(-1, True)

    g = torch.Generator().manual_seed(4)
    x = torch.stack([_cloud(5, 3, g) for _ in range(4)])
    v = torch.randn(4, 5, 3, generator=g)
    charges = torch.randn(4, 5, generator=g)
    fa = FrameAveraging(Dynamics(), "E3", "position", vector_inputs=["velocities"])
    assert_equivariant(
        fa, ("E3", "Sn"), [(x, "node position")], "node position",
        keyword_inputs={"velocities": (v, "node vector"), "charges": (charges, "node")},
        tolerance=1e-5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="vector inputs"):
        fa(x, charges=charges)


def test_unbatched_input():
    g = torch.Generator().manual_seed(5)
    x = _cloud(12, 3, g)
    fa = FrameAveraging(PointBackbone(3, 3), "E3", "position")
    torch.testing.assert_close(fa(x), fa(x.unsqueeze(0))[0])


# --- degenerate clouds -------------------------------------------------------------------------


def _cube() -> torch.Tensor:
    corners = torch.tensor([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
    return corners.float()


def _hexagon() -> torch.Tensor:
    angle = torch.arange(6) * (torch.pi / 3)
    return torch.stack([angle.cos(), angle.sin(), torch.zeros(6)], -1) + 0.5


def _whitened_blob(n: int = 2048, stretch=(1.0, 1.0, 1.0)) -> torch.Tensor:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / n)
    white = x @ evecs / evals.sqrt()  # covariance exactly I (to rounding)
    return (white * torch.tensor(stretch, dtype=torch.float64)).float()


@pytest.mark.parametrize(
    "name,cloud",
    [("cube", _cube()), ("hexagon", _hexagon()), ("isotropic blob", _whitened_blob()),
     ("near-isotropic blob", _whitened_blob(stretch=(1.0, 1.001, 1.002)))],
)  # fmt: skip
def test_degenerate_clouds_are_detected(name, cloud):
    gaps = relative_eigengaps(pca_frames(cloud, "E3", on_degenerate="ignore").eigenvalues)
    assert gaps.min() < 0.005, name
    with pytest.warns(DegenerateFrameWarning, match="eigengap"):
        frames = pca_frames(cloud, "E3")
    assert bool(frames.degenerate[0])
    with pytest.raises(DegenerateFrameError, match="1 of 1 clouds"):
        pca_frames(cloud, "E3", on_degenerate="raise")
    fa = FrameAveraging(PointBackbone(3, 3), "E3", "position")
    with pytest.warns(DegenerateFrameWarning):
        fa(cloud)
    assert bool(fa.last_frames.degenerate[0])


def test_good_clouds_raise_no_warning():
    points, mask = _padded_batch(3, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frames = pca_frames(points, "E3", mask=mask)
    assert not frames.degenerate.any()


def _cube_equivariance_error(on_degenerate: str, samples: int = 1) -> float:
    """The worst relative SO(3)-equivariance error of a 'vector' FA over 3 random rotations."""
    fa = FrameAveraging(
        PointBackbone(3, 3), "E3", "vector", on_degenerate=on_degenerate,
        degenerate_samples=samples, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    cube = _cube().double().unsqueeze(0)
    return equivariance_error(fa.double(), "SO3", [(cube, "vector")], "vector", trials=3).error


def test_plain_pca_frame_breaks_on_a_cube_and_expansion_restores_symmetry_on_average():
    # what the reference implementation does (no detection): symmetry lost, error O(1)
    broken = _cube_equivariance_error("ignore")
    assert broken > 0.05
    # sampling within the degenerate eigenspace: symmetric in distribution, the error of the
    # sampled average shrinks like 1/sqrt(samples)
    assert _cube_equivariance_error("expand", samples=2048) < broken / 5


def test_expansion_leaves_non_degenerate_clouds_exact():
    g = torch.Generator().manual_seed(8)
    good = _cloud(8, 3, g)
    batch = torch.stack([_cube(), good])
    fa = FrameAveraging(PointBackbone(3, 3), "E3", "position", on_degenerate="expand",
                        degenerate_samples=5)  # fmt: skip
    expanded = fa(batch)
    assert fa.last_frames.size == 8 * 5
    alone = FrameAveraging(fa.backbone, "E3", "position", on_degenerate="raise")(good)
    torch.testing.assert_close(expanded[1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", ["SO3", "SE3"])
def test_expanded_proper_frames_stay_rotations(group):
    frames = pca_frames(_cube(), group, on_degenerate="expand", degenerate_samples=7)
    dets = torch.linalg.det(frames.rotations.double())
    torch.testing.assert_close(dets, torch.ones_like(dets), atol=1e-5, rtol=0)


# --- stochastic mode ---------------------------------------------------------------------------


def test_stochastic_mode_is_unbiased():
    """Each draw is one frame element's output; the mean of many draws is the full average."""
    g = torch.Generator().manual_seed(9)
    cloud = _cloud(20, 3, g).double()
    backbone = InvariantBackbone(3, 4).double()
    full = FrameAveraging(backbone, "E3").eval()
    draws = 4000
    sampler = FrameAveraging(backbone, "E3", stochastic="always",
                             generator=torch.Generator().manual_seed(10))  # fmt: skip
    samples = sampler(cloud.expand(draws, -1, -1))  # 4000 independent draws in one call
    per_element = backbone(full.frames(cloud.unsqueeze(0)).canonicalize(cloud.unsqueeze(0))[:, 0])
    # every draw is one element's output (to rounding: batched and single eigh differ in the
    # last bits)
    distance = torch.cdist(samples, per_element)
    assert distance.min(1).values.max() < 1e-8
    counts = torch.bincount(distance.argmin(1), minlength=8).double()
    assert counts.min() > draws / 8 * 0.8  # each of the 8 elements is drawn about equally often
    expected = full(cloud)
    stderr = samples.std(0) / draws**0.5
    assert ((samples.mean(0) - expected).abs() <= 4 * stderr + 1e-12).all()
    # stochastic=True draws only while training
    train_mode = FrameAveraging(backbone, "E3", stochastic=True)
    assert train_mode.eval()(cloud).allclose(expected)
    train_mode.train()(cloud)
    assert train_mode.last_frames.size == 1


# --- gradients and errors ----------------------------------------------------------------------


def test_gradients_flow_and_the_frame_is_detached_by_default():
    g = torch.Generator().manual_seed(11)
    x = _cloud(10, 3, g).double().requires_grad_()
    frames = pca_frames(x, "E3")
    assert not frames.rotations.requires_grad and not frames.centroid.requires_grad
    differentiable = pca_frames(x, "E3", differentiable=True)
    assert differentiable.rotations.requires_grad
    fa = FrameAveraging(InvariantBackbone(3, 4).double(), "E3")
    fa(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bad_inputs_name_the_argument():
    fa = FrameAveraging(PointBackbone(3, 3), "E3", "vector")
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"points must have shape \[B, N >= 1, d=3\]"):
        fa(torch.randn(2, 5, 2))
    with pytest.raises(TypeError, match="points must be a tensor"):
        fa([[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="mask must have shape"):
        fa(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cloud 1 has no point"):
        fa(x, torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="points must be finite"):
        fa(torch.full((1, 5, 3), float("nan")))
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        pca_frames(x, "E3", weights=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="output must be one of"):
        FrameAveraging(PointBackbone(3, 3), "E3", "scalar")
    with pytest.raises(ValueError, match="needs a group with translations"):
        FrameAveraging(PointBackbone(3, 3), "O3", "position")
    with pytest.raises(ValueError, match="on_degenerate must be one of"):
        pca_frames(x, "E3", on_degenerate="silent")
    with pytest.raises(ValueError, match="needs backbone outputs"):
        FrameAveraging(InvariantBackbone(3, 4), "E3", "vector")(x)


def test_chunked_backbone_calls_give_the_same_average():
    calls = []

    class Recorder(PointBackbone):
        def forward(self, x, mask=None, charges=None):
            calls.append(x.shape[0])
            return super().forward(x, mask) * charges.unsqueeze(-1)

    points, mask = _padded_batch(3, seed=12, sizes=(5, 9, 12))
    charges = torch.randn(points.shape[:2])
    whole = FrameAveraging(Recorder(3, 3), "E3", "position", chunk_size=None)
    chunked = FrameAveraging(whole.backbone, "E3", "position", chunk_size=5)
    expected = whole(points, mask, charges=charges)
    calls.clear()
    torch.testing.assert_close(chunked(points, mask, charges=charges), expected)
    assert calls == [5, 5, 5, 5, 4]  # 8 elements x 3 clouds = 24 canonical clouds
    with pytest.raises(ValueError, match="chunk_size must be None, 'auto' or a positive int"):
        FrameAveraging(whole.backbone, "E3", chunk_size=0)


def test_auto_chunks_keep_each_call_near_the_points_budget():
    from meanwise.symmetry.frame_averaging import AUTO_POINTS_PER_CALL

    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.sum(1)

    g = torch.Generator().manual_seed(13)
    big = torch.randn(2, 4096, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0])
    out = FrameAveraging(Recorder(), "E3")(big)  # 'auto' is the default
    per_call = AUTO_POINTS_PER_CALL // 4096
    assert calls == [(per_call, 4096, 3)] * (16 // per_call)
    calls.clear()
    torch.testing.assert_close(FrameAveraging(Recorder(), "E3", chunk_size=None)(big), out)
    assert calls == [(16, 4096, 3)]
