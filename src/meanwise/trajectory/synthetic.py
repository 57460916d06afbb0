"""A synthetic crowd (social-force pedestrians) in the ETH/UCY format, so the trajectory
experiment runs anywhere without the dataset.

Helbing & Molnar's social-force model: each pedestrian relaxes toward its desired velocity
(speed v0 toward its goal) with time constant tau, is pushed away from others by an exponential
repulsion A exp((2 r - d) / B) weighted by an anisotropy (people react more to what is in
front of them), and group members (groups of 1-3 sharing a goal) are pulled weakly toward their
group's centroid. Pedestrians enter on the edges of a rectangle, walk to the opposite side and
leave. The simulation steps at 0.1 s and records every 4th step: 0.4 s between frames (2.5 Hz)
and frame ids 10 apart, as in ETH/UCY, so `windows_from_annotations` applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meanwise.trajectory.data import Scene, windows_from_annotations

__all__ = ["CrowdConfig", "simulate_crowd", "synthetic_scenes", "social_force_step"]


@dataclass(frozen=True)
class CrowdConfig:
    """Social-force parameters and the scene layout (metres, seconds)."""

    width: float = 16.0
    height: float = 12.0
    spawn_rate: float = 0.6  # groups entering per second
    desired_speed: float = 1.3
    desired_speed_std: float = 0.2
    relaxation_time: float = 0.5  # tau
    repulsion_strength: float = 7.0  # A = V0/sigma = 2.1/0.3 (Helbing & Molnar), m/s^2
    repulsion_range: float = 0.3  # B, m
    radius: float = 0.3  # body radius r
    anisotropy: float = 0.5  # lambda: weight of what is behind
    group_attraction: float = 0.5  # m/s^2 per metre from the group's centroid
    dt: float = 0.1
    record_every: int = 4  # 0.4 s per frame: 2.5 Hz

    def __post_init__(self) -> None:
        for name in ("width", "height", "dt", "relaxation_time", "repulsion_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.record_every < 1:
            raise ValueError(f"record_every must be >= 1; got {self.record_every}")


def social_force_step(
    position: np.ndarray,
    velocity: np.ndarray,
    goal: np.ndarray,
    desired_speed: np.ndarray,
    group: np.ndarray,
    config: CrowdConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """One explicit Euler step for N pedestrians ([N, 2] arrays; desired_speed and group [N])."""
    to_goal = goal - position
    distance = np.linalg.norm(to_goal, axis=1, keepdims=True)
    direction = to_goal / np.maximum(distance, 1e-9)
    force = (desired_speed[:, None] * direction - velocity) / config.relaxation_time
    n = len(position)
    if n > 1:
        diff = position[:, None, :] - position[None, :, :]  # from j to i
        dist = np.linalg.norm(diff, axis=-1)
        np.fill_diagonal(dist, np.inf)
        normal = diff / np.maximum(dist, 1e-9)[..., None]
        magnitude = config.repulsion_strength * np.exp(
            (2 * config.radius - dist) / config.repulsion_range
        )
        # anisotropy: cos of the angle between i's heading and the direction toward j
        heading = velocity / np.maximum(np.linalg.norm(velocity, axis=1, keepdims=True), 1e-9)
        cos_phi = -(normal * heading[:, None, :]).sum(-1)
        weight = config.anisotropy + (1 - config.anisotropy) * (1 + cos_phi) / 2
        force += ((magnitude * weight)[..., None] * normal).sum(axis=1)
        same = (group[:, None] == group[None, :]) & ~np.eye(n, dtype=bool)
        members = same.sum(1)
        if members.any():
            centroid = (same[..., None] * position[None, :, :]).sum(1) + position
            centroid /= (members + 1)[:, None]
            force += config.group_attraction * (centroid - position) * (members > 0)[:, None]
    velocity = velocity + config.dt * force
    # people do not sprint: cap at 1.3x the desired speed
    speed = np.linalg.norm(velocity, axis=1, keepdims=True)
    cap = 1.3 * desired_speed[:, None]
    velocity = np.where(speed > cap, velocity * cap / np.maximum(speed, 1e-9), velocity)
    return position + config.dt * velocity, velocity


def simulate_crowd(duration: float, seed: int, config: CrowdConfig | None = None) -> np.ndarray:
    """Annotations [M, 4] (frame id, pedestrian id, x, y) of `duration` seconds of crowd."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0; got {duration}")
    config = config or CrowdConfig()
    rng = np.random.default_rng(seed)
    position = np.zeros((0, 2))
    velocity = np.zeros((0, 2))
    goal = np.zeros((0, 2))
    speed = np.zeros(0)
    group = np.zeros(0, dtype=np.int64)
    ids = np.zeros(0, dtype=np.int64)
    next_id, next_group = 1, 1
    rows: list[np.ndarray] = []
    steps = int(round(duration / config.dt))
    w, h = config.width, config.height
    for step in range(steps):
        if rng.random() < config.spawn_rate * config.dt:
            size = int(rng.choice([1, 1, 1, 2, 2, 3]))
            side = int(rng.integers(4))
            # enter on one edge, head for a point on the opposite edge
            u, v = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
            start, target = {
                0: ((0.0, u * h), (w, v * h)),
                1: ((w, u * h), (0.0, v * h)),
                2: ((u * w, 0.0), (v * w, h)),
                3: ((u * w, h), (v * w, 0.0)),
            }[side]
            offsets = rng.normal(scale=0.5, size=(size, 2))
            new_pos = np.asarray(start) + offsets
            new_goal = np.asarray(target) + offsets
            new_speed = np.full(size, rng.normal(config.desired_speed, config.desired_speed_std))
            heading = (new_goal - new_pos) / np.linalg.norm(new_goal - new_pos, axis=1)[:, None]
            position = np.concatenate([position, new_pos])
            velocity = np.concatenate([velocity, heading * new_speed[:, None]])
            goal = np.concatenate([goal, new_goal])
            speed = np.concatenate([speed, np.clip(new_speed, 0.5, 2.0)])
            group = np.concatenate([group, np.full(size, next_group)])
            ids = np.concatenate([ids, np.arange(next_id, next_id + size)])
            next_id, next_group = next_id + size, next_group + 1
        if len(position):
            position, velocity = social_force_step(position, velocity, goal, speed, group, config)
            arrived = np.linalg.norm(goal - position, axis=1) < 0.5
            if arrived.any():
                keep = ~arrived
                position, velocity, goal = position[keep], velocity[keep], goal[keep]
                speed, group, ids = speed[keep], group[keep], ids[keep]
        if step % config.record_every == 0 and len(position):
            frame = np.full((len(ids), 1), 10.0 * (step // config.record_every))
            rows.append(np.concatenate([frame, ids[:, None].astype(float), position], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 4))


def synthetic_scenes(
    duration: float = 600.0, seed: int = 0, config: CrowdConfig | None = None
) -> dict[str, list[Scene]]:
    """Train / val / test scenes from three independent simulations (seeds seed, +1, +2), the
    validation and test runs a fifth of the training run's duration each."""
    out = {}
    for offset, (subset, fraction) in enumerate((("train", 1.0), ("val", 0.2), ("test", 0.2))):
        annotations = simulate_crowd(duration * fraction, seed * 3 + offset, config)
        out[subset] = windows_from_annotations(annotations, source=f"synthetic-{subset}")
    return out
