"""Batched IMLE training against the per-scene recipe written out from the authors' code, and
the float32 angle term.

The oracle: each scene alone through `SocialImplicit.forward` and the authors' loss
transcribed here (torch.sort of the summed absolute error, nn.L1Loss means, torch.cdist, acos
of the clamped cosine similarity), gradients accumulated scene by scene and divided by the step
size, as in the released train.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import meanwise.trajectory.train as train_module
from meanwise.trajectory.imle import imle_loss, imle_losses, pairwise_angles
from meanwise.trajectory.social_implicit import SocialImplicit
from meanwise.trajectory.synthetic import synthetic_scenes
from meanwise.trajectory.train import (
    AUGMENTATIONS,
    TrainConfig,
    accumulate_gradients,
    draw_step,
    split_trajectory,
    train_social_implicit,
)

EPS = 1e-8


def authors_loss(pred, target, w_norm, w_cos, w_trip):
    """train.py's implicit_likelihood_estimation_fast_with_trip_geo for one scene (stable sort:
    ties, which only happen when all samples are equal, go to the lower index)."""

    def cdist_cosine_sim(a, b):
        a_norm = a / torch.clamp(a.norm(dim=1)[:, None], min=EPS)
        b_norm = b / torch.clamp(b.norm(dim=1)[:, None], min=EPS)
        return torch.acos(torch.clamp(a_norm @ b_norm.T, min=-1.0 + EPS, max=1.0 - EPS))

    indices = torch.sort((pred - target).abs().sum(dim=(1, 2, 3)), stable=True).indices
    best = pred[indices[0]]
    error = (best - target).abs().mean()
    trip = (best - pred[indices[1]]).abs().mean() - (best - pred[indices[-1]]).abs().mean()
    a, b = best.reshape(-1, 2), target.reshape(-1, 2)
    norm = (torch.cdist(a[None], a[None]) - torch.cdist(b[None], b[None])).abs().mean()
    cos = (cdist_cosine_sim(a, a) - cdist_cosine_sim(b, b)).abs().mean()
    return error + w_norm * norm + w_trip * trip + w_cos * cos


def _random_model(seed: int, dtype=torch.float64) -> SocialImplicit:
    """Non-zero weights everywhere (a fresh model's mixing and noise weights are zero, which
    would make every sample equal and every cell but the mixing scalars gradient-free)."""
    generator = torch.Generator().manual_seed(seed)
    model = SocialImplicit().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return model


def _pool(sizes, seed: int) -> list[torch.Tensor]:
    """Trajectories of the given sizes whose pedestrians walk at speeds of all four zones."""
    generator = torch.Generator().manual_seed(seed)
    speeds = torch.tensor([0.003, 0.05, 0.4, 1.5], dtype=torch.float64)
    out = []
    for n in sizes:
        speed = speeds[torch.randint(4, (n,), generator=generator)]
        steps = torch.randn(20, n, 2, generator=generator, dtype=torch.float64) * speed[:, None]
        start = 3 * torch.randn(1, n, 2, generator=generator, dtype=torch.float64)
        out.append(start + steps.cumsum(0))
    return out


def _oracle_gradients(model, trajectories, noise, config, divisor):
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for traj, draw in zip(trajectories, noise, strict=True):
        observed, target = split_trajectory(traj)
        pred = model(observed, noise.shape[1], noise=draw)
        loss = authors_loss(
            pred, target, config.distance_weight, config.angle_weight, config.triplet_weight
        )
        parts = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for g, d in zip(grads, parts, strict=True):
            if d is not None:
                g += d / divisor
    return grads


def _gradients(model, trajectories, noise, config, divisor):
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, trajectories, noise, config, divisor)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def step():
    """One SGD step's draws over scenes of 1..9 pedestrians, all seven augmentations drawn."""
    sizes = [1, 2, 3, 5, 9, 4, 1, 7, 2, 6, 3, 8] * 3
    pool = _pool(sizes, seed=0)
    config = TrainConfig(distance_weight=1e-2, angle_weight=2e-2, triplet_weight=3e-2)
    trajectories, noise, names = draw_step(
        pool, list(range(len(pool))), config, torch.Generator().manual_seed(4)
    )
    assert set(names) == set(AUGMENTATIONS)  # every augmentation takes part
    assert len({t.shape[1] for t in trajectories}) >= 8  # many different scene sizes
    return trajectories, noise, config


def test_batched_step_equals_the_per_scene_accumulated_step(step):
    trajectories, noise, config = step
    model = _random_model(1)
    zones = torch.cat([model.zones(split_trajectory(t)[0]) for t in trajectories])
    assert set(zones.tolist()) == {0, 1, 2, 3}  # every cell is used and gets a gradient
    expected = _oracle_gradients(model, trajectories, noise, config, len(trajectories))
    batched = _gradients(model, trajectories, noise, config, len(trajectories))
    per_scene = _gradients(
        model, trajectories, noise, dataclasses.replace(config, batched=False), len(trajectories)
    )
    for name_p, e, b, p in zip(model.state_dict(), expected, batched, per_scene, strict=True):
        assert e.abs().max() > 0, name_p
        assert torch.allclose(b, e, rtol=1e-10, atol=1e-12), name_p
        assert torch.allclose(p, e, rtol=1e-10, atol=1e-12), name_p
    # the step itself: SGD with lr 1 moves every parameter by the averaged gradient
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, trajectories, noise, config, len(trajectories))
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    for (name_p, value), e in zip(model.state_dict().items(), expected, strict=True):
        assert torch.allclose(value, before[name_p] - e, rtol=1e-10, atol=1e-12), name_p


def test_a_step_split_into_packed_chunks_gives_the_same_gradient(step, monkeypatch):
    trajectories, noise, config = step
    model = _random_model(2)
    whole = _gradients(model, trajectories, noise, config, 10.0)
    monkeypatch.setattr(train_module, "_MAX_PACKED_PEDESTRIANS", 12)
    chunked = _gradients(model, trajectories, noise, config, 10.0)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_packed_losses_equal_the_authors_loss_scene_by_scene(step):
    trajectories, noise, config = step
    model = _random_model(3)
    pairs = [split_trajectory(t) for t in trajectories]
    sizes = [o.shape[1] for o, _ in pairs]
    with torch.no_grad():
        pred = model.forward_scenes(torch.cat([o for o, _ in pairs], 1), sizes, noise)
        target = torch.cat([t for _, t in pairs], 1)
        losses, chosen = imle_losses(pred, target, sizes, distance_weight=0.1, angle_weight=0.2)
        start = 0
        for s, n in enumerate(sizes):
            alone = model(pairs[s][0], noise.shape[1], noise=noise[s])
            assert torch.allclose(pred[:, :, start : start + n], alone, rtol=0, atol=1e-12)
            expected = authors_loss(alone, pairs[s][1], 0.1, 0.2, 1e-4)
            assert losses[s].item() == pytest.approx(expected.item(), rel=1e-10)
            errors = (alone - pairs[s][1]).abs().sum(dim=(1, 2, 3))
            assert int(chosen[s]) == int(errors.argmin())
            start += n


def test_training_loop_batched_equals_per_scene(tiny_train):
    train, val = tiny_train
    config = TrainConfig(epochs=2, accumulate=6, lr=0.5)
    batched = train_social_implicit(train, val, config, seed=5)
    per_scene = train_social_implicit(
        train, val, dataclasses.replace(config, batched=False), seed=5
    )
    for name, value in batched.last_state.items():
        assert torch.allclose(per_scene.last_state[name], value, rtol=1e-9, atol=1e-12), name
    assert batched.history.augmentations == per_scene.history.augmentations
    assert batched.history.train_loss == pytest.approx(per_scene.history.train_loss, rel=1e-9)


@pytest.fixture(scope="module")
def tiny_train():
    scenes = synthetic_scenes(60.0, seed=0)
    return scenes["train"][:24], scenes["val"][:6]


# --- float32 -------------------------------------------------------------------------------------


def test_pairwise_angles_equal_acos_of_the_clamped_cosine():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(50, 2, generator=generator, dtype=torch.float64)
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    reference = torch.acos((unit @ unit.T).clamp(-1 + EPS, 1 - EPS))
    assert torch.allclose(pairwise_angles(vectors), reference, rtol=0, atol=1e-10)
    # exact cases: parallel and antiparallel are clamped as in the reference, perpendicular is
    # pi/2, a zero vector is pi/2 from everything (its normalised vector is 0)
    special = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-3.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
    angles = pairwise_angles(special.double())
    smallest = math.acos(1 - EPS)
    assert angles[0, 1] == pytest.approx(smallest, rel=1e-12)
    assert angles[0, 2] == pytest.approx(math.pi - smallest, rel=1e-12)
    assert angles[0, 3] == pytest.approx(math.pi / 2, rel=1e-15)
    assert torch.all(angles[4] == math.pi / 2) and torch.all(angles[:, 4] == math.pi / 2)


def test_float32_gradients_are_finite_on_degenerate_scenes_where_acos_gives_nan():
    # a pedestrian standing still (zero displacements) and two walking in parallel lines
    target = torch.zeros(12, 3, 2)
    target[:, 1] = torch.tensor([0.3, 0.0])
    target[:, 2] = torch.tensor([0.6, 0.0])
    pred = target + 0.01 * torch.randn(20, 12, 3, 2, generator=torch.Generator().manual_seed(0))
    pred[:, :, 0] = 0.0  # the standing pedestrian predicted exactly standing
    pred.requires_grad_(True)
    loss, _ = imle_loss(pred, target)
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    reference = authors_loss(pred, target, 1e-4, 1e-4, 1e-4)
    (reference_grad,) = torch.autograd.grad(reference, pred)
    assert torch.isnan(reference_grad).any()  # why the angle term had to change
    # and the float64 values agree with the reference's
    loss64, _ = imle_loss(pred.detach().double(), target.double())
    assert loss64.item() == pytest.approx(
        authors_loss(pred.detach().double(), target.double(), 1e-4, 1e-4, 1e-4).item(), rel=1e-12
    )


def test_float32_training_follows_float64_and_stays_finite(tiny_train):
    train, val = tiny_train
    # a standing pedestrian in a training scene: zero displacements in input and target
    still = dataclasses.replace(
        train[0],
        observed=train[0].observed.clone(),
        future=train[0].future.clone(),
    )
    still.observed[:, 0] = still.observed[0, 0]
    still.future[:, 0] = still.observed[0, 0]
    scenes = [still, *train[1:]]
    config = TrainConfig(epochs=2, accumulate=8, lr=1.0)
    double = train_social_implicit(scenes, val, config, seed=2)
    single = train_social_implicit(
        scenes, val, dataclasses.replace(config, dtype="float32"), seed=2
    )
    assert single.last_state["implicit_cells.0.feat.weight"].dtype == torch.float32
    steps = 2 * math.ceil(len(scenes) / 8)
    assert steps == 6
    for name, value in double.last_state.items():
        low = single.last_state[name]
        assert torch.isfinite(low).all(), name
        # float32 round-off (~1e-7) grown over six steps of lr 1.0
        assert torch.allclose(low.double(), value, rtol=1e-4, atol=1e-5), name
    assert single.history.train_loss == pytest.approx(double.history.train_loss, rel=1e-4)
    assert single.history.val_ade == pytest.approx(double.history.val_ade, rel=1e-4)


@pytest.mark.parametrize("block", [1 << 18, 300])  # one block; many blocks of the triangle
def test_blocked_geometry_terms_equal_autograd_through_the_pair_matrices(monkeypatch, block):
    from meanwise.trajectory import imle

    monkeypatch.setattr(imle, "_PAIR_BLOCK", block)
    generator = torch.Generator().manual_seed(0)
    mine = torch.randn(3, 60, 2, generator=generator, dtype=torch.float64)
    truth = torch.randn(3, 60, 2, generator=generator, dtype=torch.float64)
    mine[0, 7] = 0.0  # standing still, predicted and true
    truth[1, 3] = 0.0
    mine[2, 5] = mine[2, 9]  # two equal vectors: distance 0, angle clamped
    truth[2, 11] = 3.0 * truth[2, 12]  # parallel truth vectors
    mine.requires_grad_(True)
    gap = imle._GeometryGap.apply(mine, truth, 0.3, 0.7, EPS)
    distances = (imle.pairwise_distances(mine) - imle.pairwise_distances(truth)).abs()
    angles = (pairwise_angles(mine) - pairwise_angles(truth)).abs()
    expected = 0.3 * distances.mean(dim=(1, 2)) + 0.7 * angles.mean(dim=(1, 2))
    assert torch.allclose(gap, expected, rtol=1e-12, atol=0)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (ours,) = torch.autograd.grad((gap * weights).sum(), mine)
    (reference,) = torch.autograd.grad((expected * weights).sum(), mine)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("width", [1, 2, 7])
def test_column_convolutions_equal_torch_conv1d(width):
    from meanwise.trajectory import social_implicit

    generator = torch.Generator().manual_seed(width)
    rows = torch.randn(3, 4, width, generator=generator, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(5, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 5, width, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.conv1d(rows, kernel, bias, padding=1)
    reference = torch.autograd.grad((expected * weights).sum(), (rows, kernel, bias))
    for conv in (social_implicit._ThreeTap.apply, social_implicit._conv_columns):
        out = conv(rows, kernel, bias)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-13)
        grads = torch.autograd.grad((out * weights).sum(), (rows, kernel, bias))
        for ours, theirs in zip(grads, reference, strict=True):
            assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-13)
