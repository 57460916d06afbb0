"""IMLE training: each augmentation against what it must preserve or change, the augmentation
draw's probabilities, gradient accumulation against a hand-written SGD step, and exact resume."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from meanwise.trajectory.data import observed_displacements
from meanwise.trajectory.imle import imle_loss
from meanwise.trajectory.social_implicit import SocialImplicit
from meanwise.trajectory.synthetic import synthetic_scenes
from meanwise.trajectory.train import (
    AUGMENTATIONS,
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    TrainConfig,
    augment,
    full_trajectory,
    jitter,
    load_checkpoint,
    merge_scenes,
    reverse_time,
    rotate,
    speed_ramp,
    split_trajectory,
    swap_xy_reverse,
    train_social_implicit,
)


def _traj(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(1, n, 2, generator=g, dtype=torch.float64) * 3
    steps = torch.randn(20, n, 2, generator=g, dtype=torch.float64) * 0.3
    return start + steps.cumsum(0)


def _pairwise(traj: torch.Tensor) -> torch.Tensor:
    return torch.cdist(traj, traj)  # [T, N, N]


def _speeds(traj: torch.Tensor) -> torch.Tensor:
    return (traj[1:] - traj[:-1]).norm(dim=-1)


@pytest.fixture(scope="module")
def tiny_scenes():
    scenes = synthetic_scenes(60.0, seed=0)["train"]
    return scenes[:16], scenes[60:72]


# --- augmentations -----------------------------------------------------------------------------


def test_jitter_moves_everyone_by_the_same_bounded_offset_per_step():
    traj = _traj()
    out = jitter(traj, torch.Generator().manual_seed(1))
    offset = out - traj
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-15)
    assert offset.abs().max() <= 0.1 and offset.abs().max() > 0.01
    assert not torch.allclose(offset[0], offset[1])  # a fresh draw per step
    assert torch.allclose(_pairwise(out), _pairwise(traj), atol=1e-12)


def test_swap_xy_reverse_swaps_and_reverses_and_is_an_involution():
    traj = _traj()
    out = swap_xy_reverse(traj)
    for t in range(20):
        assert torch.equal(out[t, :, 0], traj[19 - t, :, 1])
        assert torch.equal(out[t, :, 1], traj[19 - t, :, 0])
    assert torch.equal(swap_xy_reverse(out), traj)
    assert torch.allclose(_pairwise(out), _pairwise(traj).flip(0), atol=1e-12)


def test_time_reversal_reverses_positions_and_negates_displacements():
    traj = _traj()
    out = reverse_time(traj)
    assert torch.equal(out, torch.stack([traj[19 - t] for t in range(20)]))
    steps, reversed_steps = traj[1:] - traj[:-1], out[1:] - out[:-1]
    assert torch.allclose(reversed_steps, -steps.flip(0), atol=1e-12)


def test_merge_appends_the_other_scenes_pedestrians():
    traj, a, b = _traj(3, 0), _traj(2, 1), _traj(5, 2)
    out = merge_scenes(traj, [a, b])
    assert out.shape == (20, 10, 2)
    assert torch.equal(out[:, :3], traj) and torch.equal(out[:, 3:5], a)
    assert torch.equal(out[:, 5:], b)
    with pytest.raises(ValueError, match=r"others\[0\]"):
        merge_scenes(traj, [traj[:5]])


@pytest.mark.parametrize("k", [1, 7, 12, 23])
def test_rotation_preserves_distances_and_speeds_and_turns_every_step(k):
    traj = _traj()
    angle = k * math.pi / 12
    out = rotate(traj, angle)
    assert torch.allclose(_pairwise(out), _pairwise(traj), atol=1e-12)
    assert torch.allclose(_speeds(out), _speeds(traj), atol=1e-12)
    # as complex numbers every position is multiplied by e^{i angle}
    z, w = torch.view_as_complex(traj.contiguous()), torch.view_as_complex(out.contiguous())
    turn = complex(math.cos(angle), math.sin(angle))
    assert torch.allclose(w, z * turn, atol=1e-12)
    if k == 12:
        assert torch.allclose(out, -traj, atol=1e-12)


def test_speed_ramp_adds_a_constant_to_every_displacement():
    traj = _traj()
    out = speed_ramp(traj, 0.4)
    assert torch.equal(out[0], traj[0])
    extra = (out[1:] - out[:-1]) - (traj[1:] - traj[:-1])
    assert torch.allclose(extra, torch.full_like(extra, 0.4 / 20), atol=1e-12)
    assert torch.allclose(out[-1] - traj[-1], torch.full_like(traj[-1], 0.4 * 19 / 20))


def test_augmentations_reject_bad_input():
    with pytest.raises(ValueError, match="traj must be"):
        rotate(torch.zeros(20, 2), 0.5)
    with pytest.raises(ValueError, match="amount"):
        jitter(_traj(), torch.Generator(), amount=-1.0)


def test_augment_draws_each_of_seven_with_probability_one_seventh_and_the_right_parameters():
    # one pedestrian walking along x from (1, 0): every augmentation leaves a fingerprint
    traj = torch.zeros(20, 1, 2, dtype=torch.float64)
    traj[:, 0, 0] = 1.0 + 0.1 * torch.arange(20, dtype=torch.float64)
    pool = [_traj(1, s) for s in range(5)]
    generator = torch.Generator().manual_seed(0)
    draws = 3500
    counts = dict.fromkeys(AUGMENTATIONS, 0)
    angles, merged, increments = set(), set(), []
    for _ in range(draws):
        out, name = augment(traj, pool, generator)
        counts[name] += 1
        if name == "rotate":
            k = math.atan2(float(out[0, 0, 1]), float(out[0, 0, 0])) / (math.pi / 12)
            assert k == pytest.approx(round(k), abs=1e-9)
            angles.add(round(k) % 24)
        elif name == "merge":
            merged.add(out.shape[1] - 1)
            assert torch.equal(out[:, :1], traj)
        elif name == "speed_ramp":
            increments.append(float(out[1, 0, 1] - traj[1, 0, 1]) * 20)
        elif name == "none":
            assert out is traj
    # binomial(3500, 1/7): sd = 20.7, so +-5 sd is +-104
    assert all(abs(c - draws / 7) < 104 for c in counts.values()), counts
    assert angles == set(range(1, 24))  # k = 1..23, never 0
    assert merged == {1, 2, 3}
    assert all(-1 < i < 1 for i in increments) and min(increments) < -0.8 < 0.8 < max(increments)


def test_split_trajectory_matches_the_scene_displacements(tiny_scenes):
    scene = tiny_scenes[0][0]
    observed, target = split_trajectory(full_trajectory(scene))
    assert torch.equal(observed, observed_displacements(scene.observed))
    assert torch.allclose(target, scene.future_displacements(), atol=1e-12)


# --- training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [5, 2])
def test_accumulated_sgd_steps_match_a_hand_written_loop(tiny_scenes, accumulate):
    train, val = tiny_scenes
    train = train[:5]
    config = TrainConfig(epochs=1, accumulate=accumulate, lr=0.5, augment=False)
    result = train_social_implicit(train, val[:2], config, seed=3)
    # the same draws by hand: initial weights from seed 3, then the order, then the noise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = SocialImplicit().double()
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(5, generator=generator).tolist()
    groups = [order[i : i + accumulate] for i in range(0, 5, accumulate)]
    for group in groups:
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for index in group:
            observed, target = split_trajectory(full_trajectory(train[index]))
            pred = model(observed, 20, generator=generator)
            loss, _ = imle_loss(pred, target, distance_weight=1e-4, angle_weight=1e-4)
            parts = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            for g, d in zip(grads, parts, strict=True):
                if d is not None:  # cells of zones absent from the scene get no gradient
                    g += d
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= 0.5 * g / len(group)
    for name, value in model.state_dict().items():
        assert torch.allclose(result.last_state[name], value, rtol=1e-10, atol=1e-12), name
    assert result.history.augmentations == dict.fromkeys(AUGMENTATIONS, 0)


def test_resume_is_exact_and_checkpoints_load_with_weights_only(tiny_scenes, tmp_path):
    train, val = tiny_scenes
    # StepLR every epoch so that a scheduler not restored would show up in the weights
    config = TrainConfig(epochs=4, accumulate=4, lr_step_epochs=1, lr_gamma=0.5)
    straight = train_social_implicit(train, val, config, seed=1, checkpoint_dir=tmp_path / "a")
    half = dataclasses.replace(config, epochs=2)
    train_social_implicit(train, val, half, seed=1, checkpoint_dir=tmp_path / "b")
    resumed = train_social_implicit(train, val, config, seed=1, checkpoint_dir=tmp_path / "b")
    for name, value in straight.last_state.items():
        assert torch.equal(resumed.last_state[name], value), name
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    a, b = dataclasses.asdict(straight.history), dataclasses.asdict(resumed.history)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert straight.history.lr == [1.0, 0.5, 0.25, 0.125]
    assert sum(straight.history.augmentations.values()) == 4 * len(train)
    assert straight.history.best_val_ade == min(straight.history.val_ade)
    # best.pt is a plain state dict, last.pt carries everything needed to resume
    best = torch.load(tmp_path / "a" / BEST_CHECKPOINT, weights_only=True)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(best[name], value)
    last = load_checkpoint(tmp_path / "a" / LAST_CHECKPOINT)
    assert {"model", "optimizer", "scheduler", "generator", "best_model"} <= set(last)
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(ValueError, match="another config or seed"):
        train_social_implicit(
            train, val, dataclasses.replace(config, lr=0.1), seed=1, checkpoint_dir=tmp_path / "a"
        )


def test_bad_arguments_raise_value_errors(tiny_scenes):
    train, val = tiny_scenes
    with pytest.raises(ValueError, match="samples"):
        TrainConfig(samples=1)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match="train_scenes"):
        train_social_implicit([], val)
    with pytest.raises(ValueError, match="val_scenes"):
        train_social_implicit(train, [])
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint("/nonexistent/last.pt")


def test_split_settings_follow_the_released_args():
    eth = TrainConfig.for_split("eth", epochs=3)
    assert eth.epochs == 3 and eth.noise_factors == (0.175, 1.5, 4.0, 8.0)
    assert (eth.distance_weight, eth.angle_weight) == (1e-5, 1e-4)
    hotel = TrainConfig.for_split("hotel")
    assert (hotel.distance_weight, hotel.angle_weight) == (1e-5, 1e-5)
    assert hotel.noise_factors == (0.05, 1.0, 4.0, 8.0)
