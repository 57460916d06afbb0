"""The batched charged-particle simulator against a per-system reference loop and physics."""

import numpy as np
import pytest
import torch

from meanwise.symmetry.nbody import (
    coulomb_forces,
    egnn_initial_states,
    make_nbody_splits,
    simulate_charged_particles,
)


def _reference_simulation(x, v, q, steps, record_every, dt=1e-3, clip=100.0):
    """One system at a time, particle by particle, as the reference NumPy generator does."""
    x, v, q = (t.numpy().astype(np.float64) for t in (x, v, q))
    n = len(q)

    def forces(pos):
        f = np.zeros_like(pos)
        for i in range(n):
            for j in range(n):
                if i != j:
                    d = pos[i] - pos[j]
                    f[i] += q[i] * q[j] * d / np.linalg.norm(d) ** 3
        return np.clip(f, -clip, clip)

    recorded_x, recorded_v = [], []
    v = v + dt * forces(x)
    for step in range(1, steps):
        x = x + dt * v
        if step % record_every == 0:
            recorded_x.append(x.copy())
            recorded_v.append(v.copy())
        v = v + dt * forces(x)
    return np.stack(recorded_x), np.stack(recorded_v)


def _initial(systems, n=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(systems, n, 3, generator=g, dtype=torch.float64) * spread
    v = torch.randn(systems, n, 3, generator=g, dtype=torch.float64)
    v = 0.5 * v / v.norm(dim=-1, keepdim=True)
    q = torch.where(torch.rand(systems, n, generator=g) < 0.5, 1.0, -1.0).double()
    return x, v, q


def test_batched_simulation_matches_a_per_system_loop():
    x, v, q = _initial(3, seed=1)
    sim = simulate_charged_particles(
        3, steps=600, record_every=50, initial_state=(x, v, q)
    )  # 11 frames
    for s in range(3):
        ref_x, ref_v = _reference_simulation(x[s], v[s], q[s], steps=600, record_every=50)
        np.testing.assert_allclose(sim.positions[s].numpy(), ref_x, rtol=0, atol=1e-9)
        np.testing.assert_allclose(sim.velocities[s].numpy(), ref_v, rtol=0, atol=1e-9)


def test_forces_match_the_hand_written_sum_and_clip():
    x, _, q = _initial(4, seed=2)
    x[0, 1] = x[0, 0] + 1e-3  # a close encounter: the clip must act
    forces = coulomb_forces(x, q, max_force=100.0)
    for s in range(4):
        for i in range(5):
            total = sum(
                q[s, i] * q[s, j] * (x[s, i] - x[s, j]) / (x[s, i] - x[s, j]).norm() ** 3
                for j in range(5)
                if j != i
            )
            torch.testing.assert_close(forces[s, i], total.clamp(-100, 100))
    assert forces.abs().max() == 100.0


def test_momentum_is_conserved_and_energy_nearly_so_without_clipping():
    """Pair forces are antisymmetric, so semi-implicit Euler keeps Σ v exactly; being
    symplectic it keeps the energy to O(dt) without drift."""
    x, v, q = _initial(20, seed=3, spread=3.0)
    sim = simulate_charged_particles(20, steps=2002, record_every=1, initial_state=(x, v, q))
    # keep the systems whose particles never came closer than 0.25 (every step recorded): no
    # pair force exceeds 16 there, so the ±100 clip never acted
    diff = sim.positions.unsqueeze(-2) - sim.positions.unsqueeze(-3)
    closest = (diff.norm(dim=-1) + 10 * torch.eye(5, dtype=diff.dtype)).amin((1, 2, 3))
    keep = closest > 0.25
    assert keep.sum() >= 10
    sim = type(sim)(sim.positions[keep], sim.velocities[keep], sim.charges[keep])
    q = q[keep]
    momentum = sim.velocities.sum(2)  # unit masses
    torch.testing.assert_close(momentum, momentum[:, :1].expand_as(momentum), atol=1e-12, rtol=0)

    def energy(pos, vel):
        kinetic = 0.5 * vel.square().sum((-1, -2))
        diff = pos.unsqueeze(-2) - pos.unsqueeze(-3)
        dist = diff.norm(dim=-1) + torch.eye(5, dtype=pos.dtype)
        pair = q.unsqueeze(1).unsqueeze(-1) * q.unsqueeze(1).unsqueeze(-2) / dist
        potential = 0.5 * (pair * (1 - torch.eye(5, dtype=pos.dtype))).sum((-1, -2))
        return kinetic + potential

    e = energy(sim.positions, sim.velocities)
    assert ((e - e[:, :1]).abs() / e[:, :1].abs().clamp_min(0.1)).max() < 1e-2


def test_stopping_early_records_the_same_frames():
    full = simulate_charged_particles(
        6, steps=1200, record_every=100, generator=torch.Generator().manual_seed(4)
    )
    early = simulate_charged_particles(
        6, steps=1200, record_every=100, frames=4, generator=torch.Generator().manual_seed(4)
    )
    assert full.positions.shape[1] == 11 and early.positions.shape[1] == 4
    assert torch.equal(full.positions[:, :4], early.positions)
    assert torch.equal(full.velocities[:, :4], early.velocities)


def test_splits_have_the_published_distribution():
    splits = make_nbody_splits(0, {"train": 600, "test": 400})
    train, test = splits["train"], splits["test"]
    assert train.positions.shape == (600, 5, 3) and train.positions.dtype == torch.float32
    assert set(train.charges.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(train.charges.mean())) < 0.1
    # a different stream per split
    assert not torch.equal(train.positions[:400], test.positions)
    # the Linear baseline x + t v fitted on train: the paper reports test MSE .0819
    dx, vel = (train.target - train.positions).flatten(), train.velocities.flatten()
    t = (dx @ vel) / (vel @ vel)
    mse = float(((test.target - test.positions - t * test.velocities) ** 2).mean())
    assert 0.06 < mse < 0.12
    again = make_nbody_splits(0, {"train": 600, "test": 400})
    assert torch.equal(again["test"].target, test.target)


def test_initial_state_is_reflected_once_at_the_walls_as_the_reference_does():
    x, v, q = _initial(2, seed=5)
    x[0, 0, 0], v[0, 0, 0] = 6.5, 0.3  # beyond +5, moving out
    x[1, 2, 1], v[1, 2, 1] = -5.25, -0.2  # beyond -5, moving out
    # by hand: mirror at the wall, velocity component pointing inwards, nothing else changes
    x_hand, v_hand = x.clone(), v.clone()
    x_hand[0, 0, 0], v_hand[0, 0, 0] = 3.5, -0.3
    x_hand[1, 2, 1], v_hand[1, 2, 1] = -4.75, 0.2
    reflected = simulate_charged_particles(2, steps=300, record_every=100, initial_state=(x, v, q))
    by_hand = simulate_charged_particles(
        2, steps=300, record_every=100, initial_state=(x_hand, v_hand, q), initial_box=None
    )
    assert torch.equal(reflected.positions, by_hand.positions)
    assert torch.equal(reflected.velocities, by_hand.velocities)
    inside = simulate_charged_particles(
        2, steps=300, record_every=100, initial_state=(x_hand, v_hand, q)
    )
    assert torch.equal(inside.positions, by_hand.positions)  # inside the box: no change


# Read from the published charges_{train,test}_charged5_initvel1small.npy (EGNN / Frame
# Averaging repositories): the first systems' charges and the number of +1 charges
PUBLISHED_TRAIN_FIRST_3 = [[-1, 1, -1, -1, -1], [1, -1, 1, 1, 1], [1, 1, -1, -1, 1]]
PUBLISHED_TEST_FIRST_2 = [[1, 1, -1, -1, 1], [1, 1, -1, 1, -1]]
PUBLISHED_POSITIVE = {"train[:20]": 42, "test[:20]": 52}


def test_egnn_draw_replays_the_published_systems():
    states = egnn_initial_states({"train": 20, "test": 20})
    train_q, test_q = states["train"][2], states["test"][2]
    assert train_q[:3].tolist() == PUBLISHED_TRAIN_FIRST_3
    assert test_q[:2].tolist() == PUBLISHED_TEST_FIRST_2
    assert int((train_q > 0).sum()) == PUBLISHED_POSITIVE["train[:20]"]
    assert int((test_q > 0).sum()) == PUBLISHED_POSITIVE["test[:20]"]
    x, v, _ = states["train"]
    assert x.shape == v.shape == (20, 5, 3)
    torch.testing.assert_close(v.norm(dim=-1), torch.full((20, 5), 0.5, dtype=torch.float64))
    # a prefix is a prefix: fewer systems are the first ones of the same stream
    assert torch.equal(egnn_initial_states({"train": 5})["train"][0], x[:5])
    splits = make_nbody_splits(sizes={"train": 4}, draw="egnn")
    sim = simulate_charged_particles(
        4, frames=41, initial_state=tuple(t[:4] for t in states["train"])
    )
    assert torch.equal(splits["train"].target, sim.positions[:, 40].float())
    with pytest.raises(ValueError, match="must be an int in"):
        egnn_initial_states({"train": 10001})
    with pytest.raises(ValueError, match="unknown split"):
        egnn_initial_states({"holdout": 3})
    with pytest.raises(ValueError, match="draw must be"):
        make_nbody_splits(sizes={"train": 2}, draw="npy")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_systems must be a positive int"):
        simulate_charged_particles(0)
    with pytest.raises(ValueError, match="frames must be an int"):
        simulate_charged_particles(2, frames=60)
    with pytest.raises(ValueError, match="initial_state must be"):
        simulate_charged_particles(2, initial_state=_initial(3))
    with pytest.raises(ValueError, match="frame_in < frame_out"):
        make_nbody_splits(0, {"train": 2}, frame_in=5, frame_out=5)
    with pytest.raises(ValueError, match="initial_box must be > 0"):
        simulate_charged_particles(2, initial_box=0.0)
