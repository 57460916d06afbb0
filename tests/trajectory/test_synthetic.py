"""The social-force crowd: free walking relaxes as the Euler recursion says, collision
avoidance keeps people apart, and the output is ETH/UCY-formatted 2.5 Hz data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from meanwise.trajectory.synthetic import (
    CrowdConfig,
    simulate_crowd,
    social_force_step,
    synthetic_scenes,
)


def test_a_lone_pedestrian_relaxes_to_its_desired_speed():
    config = CrowdConfig()
    position, velocity = np.zeros((1, 2)), np.zeros((1, 2))
    goal, v0 = np.array([[100.0, 0.0]]), np.array([1.3])
    for _ in range(10):
        position, velocity = social_force_step(position, velocity, goal, v0, np.ones(1), config)
    # explicit Euler on dv/dt = (v0 - v)/tau from rest: v_n = v0 (1 - (1 - dt/tau)^n)
    expected = 1.3 * (1 - (1 - config.dt / config.relaxation_time) ** 10)
    assert velocity[0, 0] == pytest.approx(expected, rel=1e-12) and velocity[0, 1] == 0.0


def _head_on(config: CrowdConfig) -> float:
    position = np.array([[0.0, 0.0], [10.0, 0.1]])
    velocity = np.array([[1.3, 0.0], [-1.3, 0.0]])
    goal = np.array([[20.0, 0.0], [-10.0, 0.1]])
    closest = np.inf
    for _ in range(120):
        position, velocity = social_force_step(
            position, velocity, goal, np.array([1.3, 1.3]), np.array([1, 2]), config
        )
        closest = min(closest, float(np.linalg.norm(position[0] - position[1])))
    return closest


def test_repulsion_makes_two_walkers_avoid_each_other():
    config = CrowdConfig()
    assert _head_on(dataclasses.replace(config, repulsion_strength=0.0)) < 0.2
    assert _head_on(config) > 2 * config.radius


def test_simulation_is_eth_ucy_formatted_and_seeded():
    a = simulate_crowd(120.0, seed=3)
    assert np.array_equal(a, simulate_crowd(120.0, seed=3))
    assert not np.array_equal(a, simulate_crowd(120.0, seed=4))
    frames = np.unique(a[:, 0])
    assert np.all(np.diff(frames) == 10.0)  # 0.4 s apart, ids 10 apart as in ETH/UCY
    scenes = synthetic_scenes(120.0, seed=0)
    assert set(scenes) == {"train", "val", "test"} and len(scenes["train"]) > 10
    assert all(s.num_pedestrians >= 2 for s in scenes["train"])
    speeds = np.concatenate(
        [np.linalg.norm(s.future_displacements().numpy(), axis=-1).ravel() for s in scenes["train"]]
    )
    assert 0.8 < speeds.mean() / 0.4 < 1.6  # walking pace, m/s
    with pytest.raises(ValueError, match="duration"):
        simulate_crowd(0.0, seed=0)
