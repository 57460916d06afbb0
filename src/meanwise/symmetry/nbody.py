"""The charged-particle n-body simulator of EGNN and Frame Averaging ("nbody_small").

Each system: 5 particles with charges ±1 (probability ½ each), positions ~ N(0, 1) per
coordinate, velocities in uniformly random directions with norm 0.5 (each particle's velocity
is normalised), interaction strength 1. Coulomb-like forces
F_i = Σ_j q_i q_j (x_i − x_j)/‖x_i − x_j‖³ (like charges repel), clipped per component to ±100,
integrated by semi-implicit Euler with dt = 1e-3: v += dt·F, then 5000 times {x += dt·v;
record every 100th step; recompute F; v += dt·F}, which records 49 frames (steps 100..4900).
No box during the integration: the reference reflects the *initial* state once at walls ±5
(a coordinate beyond 5 is mirrored and its velocity component turned inwards) and leaves its
per-step reflection commented out; `initial_box` does the same (it acts with probability
~6e-7 per coordinate). Task: from positions and velocities at frame 30, predict positions at
frame 40 (EGNN's "nbody_small": 3,000 / 2,000 / 2,000 systems).

The reference generator runs one system at a time in NumPy (≈ 0.2 s each); here all systems of
a split advance together as [S, n, 3] float64 tensors, so 7000 systems take seconds.
`make_nbody_splits(draw="egnn")` simulates EGNN's published systems themselves (their initial
states replayed from the generator's NumPy stream, `egnn_initial_states`); draw="seeded" draws
fresh systems of the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NBodyTrajectories",
    "NBodySplit",
    "coulomb_forces",
    "simulate_charged_particles",
    "make_nbody_splits",
    "egnn_initial_states",
    "SPLIT_SIZES",
    "EGNN_COUNTS",
]

SPLIT_SIZES: dict[str, int] = {"train": 3000, "val": 2000, "test": 2000}


@dataclass(frozen=True)
class NBodyTrajectories:
    """positions, velocities [S, T, n, 3] and charges [S, n], all float64."""

    positions: Tensor
    velocities: Tensor
    charges: Tensor


@dataclass(frozen=True)
class NBodySplit:
    """One split of the prediction task, float32: inputs at frame_in, target at frame_out."""

    positions: Tensor  # [S, n, 3]
    velocities: Tensor  # [S, n, 3]
    charges: Tensor  # [S, n]
    target: Tensor  # [S, n, 3]

    def __len__(self) -> int:
        return self.positions.shape[0]

    def __getitem__(self, index) -> NBodySplit:
        return NBodySplit(
            self.positions[index], self.velocities[index], self.charges[index], self.target[index]
        )


def coulomb_forces(positions: Tensor, charges: Tensor, max_force: float | None = None) -> Tensor:
    """F_i = Σ_{j≠i} q_i q_j (x_i − x_j)/‖x_i − x_j‖³ for [S, n, d] positions and [S, n] charges.

    Clipped per component to ±max_force when given (the generator's guard against close
    encounters, where the 1/r² force would blow up the explicit integrator).
    """
    diff = positions.unsqueeze(2) - positions.unsqueeze(1)  # x_i − x_j: [S, n, n, d]
    dist3 = diff.square().sum(-1).pow(1.5)
    n = positions.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=positions.device)
    strength = charges.unsqueeze(2) * charges.unsqueeze(1) / dist3.masked_fill(eye, 1.0)
    strength = strength.masked_fill(eye, 0.0)
    forces = (strength.unsqueeze(-1) * diff).sum(2)
    if max_force is not None:
        forces = forces.clamp(-max_force, max_force)
    return forces


def _pair_forces(x: Tensor, qq: Tensor, left: Tensor, right: Tensor, max_force: float) -> Tensor:
    """`coulomb_forces` in the simulator's layout: x [n, 3, S], qq [P, S] the pairs' q_i q_j.

    Each unordered pair once (f_ij = −f_ji), with the S systems as the contiguous axis, so
    every operation is one long vectorised loop: 12x faster than the [S, n, n, 3] form.
    """
    diff = x[left] - x[right]  # [P, 3, S]
    dist2 = (diff * diff).sum(1)
    pair = diff * (qq / (dist2 * dist2.sqrt())).unsqueeze(1)
    forces = torch.zeros_like(x)
    forces.index_add_(0, left, pair)
    forces.index_add_(0, right, pair, alpha=-1.0)
    return forces.clamp_(-max_force, max_force)


def _reflect_once(x: Tensor, v: Tensor, box: float) -> tuple[Tensor, Tensor]:
    """Mirror coordinates beyond ±box back inside and point their velocity inwards (one
    elastic bounce, as the reference applies to the initial state)."""
    over, under = x > box, x < -box
    x = torch.where(over, 2 * box - x, torch.where(under, -2 * box - x, x))
    v = torch.where(over, -v.abs(), torch.where(under, v.abs(), v))
    return x, v


def simulate_charged_particles(
    num_systems: int,
    *,
    n_particles: int = 5,
    steps: int = 5000,
    record_every: int = 100,
    dt: float = 1e-3,
    position_std: float = 1.0,
    speed: float = 0.5,
    initial_box: float | None = 5.0,
    frames: int | None = None,
    initial_state: tuple[Tensor, Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> NBodyTrajectories:
    """Simulate `num_systems` independent systems at once; see the module docstring.

    `frames` stops after recording that many frames (the task needs frames up to 40 of 49):
    the integration is causal, so the recorded frames are the same as in a full run.
    `initial_state` = (positions [S, n, 3], velocities [S, n, 3], charges [S, n]) replaces the
    random draw (for tests and for simulating given systems). `initial_box` reflects the
    initial state once at walls ±initial_box, as the reference does (None: no reflection).
    """
    for name, value in (
        ("num_systems", num_systems),
        ("n_particles", n_particles),
        ("steps", steps),
        ("record_every", record_every),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    recorded = steps // record_every - 1
    if recorded < 1:
        raise ValueError(f"steps={steps} must span at least 2 record intervals of {record_every}")
    if frames is not None:
        if not (isinstance(frames, int) and 1 <= frames <= recorded):
            raise ValueError(f"frames must be an int in [1, {recorded}]; got {frames!r}")
        recorded = frames
    if not dt > 0:
        raise ValueError(f"dt must be > 0; got {dt}")
    f64 = torch.float64
    if initial_state is None:
        charges = torch.rand(num_systems, n_particles, generator=generator) < 0.5
        charges = torch.where(charges, 1.0, -1.0).to(f64)
        x = torch.randn(num_systems, n_particles, 3, generator=generator, dtype=f64)
        x = x * position_std
        v = torch.randn(num_systems, n_particles, 3, generator=generator, dtype=f64)
        v = v * (speed / v.norm(dim=-1, keepdim=True))
    else:
        x, v, charges = (torch.as_tensor(t, dtype=f64) for t in initial_state)
        expected = [(num_systems, n_particles, 3), (num_systems, n_particles, 3),
                    (num_systems, n_particles)]  # fmt: skip
        if [tuple(t.shape) for t in (x, v, charges)] != expected:
            raise ValueError(
                f"initial_state must be (positions, velocities, charges) of shapes {expected}; "
                f"got {[list(t.shape) for t in (x, v, charges)]}"
            )
    if initial_box is not None:
        if not initial_box > 0:
            raise ValueError(f"initial_box must be > 0 or None; got {initial_box}")
        x, v = _reflect_once(x, v, float(initial_box))
    max_force = 0.1 / dt  # the reference generator's clip, 100 for dt = 1e-3
    left, right = torch.triu_indices(n_particles, n_particles, 1)
    # systems innermost: [n, 3, S]
    x, v = x.permute(1, 2, 0).contiguous(), v.permute(1, 2, 0).contiguous()
    q = charges.T.contiguous()
    qq = q[left] * q[right]
    positions = torch.empty(recorded, n_particles, 3, num_systems, dtype=f64)
    velocities = torch.empty_like(positions)
    v.add_(_pair_forces(x, qq, left, right, max_force), alpha=dt)
    frame = 0
    for step in range(1, steps):
        x.add_(v, alpha=dt)
        if step % record_every == 0:
            positions[frame] = x
            velocities[frame] = v
            frame += 1
            if frame == recorded:
                break
        v.add_(_pair_forces(x, qq, left, right, max_force), alpha=dt)
    return NBodyTrajectories(
        positions.permute(3, 0, 1, 2).contiguous(),
        velocities.permute(3, 0, 1, 2).contiguous(),
        charges,
    )


# EGNN's "nbody_small" files: generate_dataset.py --num-train 10000 --seed 43 (then 2,000
# validation and 2,000 test systems from the same NumPy stream); the experiments use the first
# 3,000 training systems
EGNN_SEED = 43
EGNN_COUNTS: dict[str, int] = {"train": 10000, "val": 2000, "test": 2000}
# what the reference draws per system from NumPy's global stream, in this order: 5 uniforms
# (np.random.choice of the charges), 3x5 normals (positions), 3x5 normals (velocities), then two
# 49x3x5 observation-noise arrays that are multiplied by a noise level of 0 but still advance it
_EGNN_NORMALS_PER_SYSTEM = 15 + 15 + 2 * 49 * 15


def egnn_initial_states(
    sizes: dict[str, int] | None = None,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """The initial states of EGNN's published nbody_small systems: {split: (positions [S, 5, 3],
    velocities [S, 5, 3] of norm 0.5, charges [S, 5])}, float64, the first `sizes[split]` of each.

    Regenerated by replaying the reference generator's draws from ``np.random.seed(43)`` (legacy
    RandomState: the same stream as the published files; the charges equal the published
    ``charges_*.npy`` everywhere). The whole stream up to the last requested split is replayed
    (the splits follow one another), which takes about a second per 10,000 systems.
    """
    import numpy as np  # only this function needs NumPy's legacy generator

    sizes = dict(EGNN_COUNTS if sizes is None else sizes)
    for name, count in sizes.items():
        if name not in EGNN_COUNTS:
            raise ValueError(f"unknown split {name!r}; EGNN's splits are {list(EGNN_COUNTS)}")
        if not (isinstance(count, int) and 0 <= count <= EGNN_COUNTS[name]):
            raise ValueError(
                f"sizes[{name!r}] must be an int in [0, {EGNN_COUNTS[name]}]; got {count!r}"
            )
    rng = np.random.RandomState(EGNN_SEED)
    last = max(list(EGNN_COUNTS).index(name) for name in sizes) if sizes else -1
    out = {}
    for name in list(EGNN_COUNTS)[: last + 1]:
        total = EGNN_COUNTS[name]
        keep = sizes.get(name, 0)
        uniforms = np.empty((keep, 5))
        normals = np.empty((keep, 30))
        # the last split needs only its first `keep` systems; earlier ones are replayed whole
        for i in range(keep if name == list(EGNN_COUNTS)[last] else total):
            u = rng.random_sample(5)
            z = rng.randn(_EGNN_NORMALS_PER_SYSTEM)
            if i < keep:
                uniforms[i], normals[i] = u, z[:30]
        if name not in sizes:
            continue
        # choice([-1, 0, 1], p=[1/2, 0, 1/2]): the cdf [.5, .5, 1] searched on the right
        charges = torch.from_numpy(np.where(uniforms < 0.5, -1.0, 1.0))
        # the reference's arrays are [3 coordinates, 5 particles]
        positions = torch.from_numpy(normals[:, :15].reshape(keep, 3, 5)).transpose(1, 2)
        velocities = torch.from_numpy(normals[:, 15:].reshape(keep, 3, 5)).transpose(1, 2)
        velocities = velocities * (0.5 / velocities.norm(dim=-1, keepdim=True))
        out[name] = (positions.contiguous(), velocities.contiguous(), charges)
    return out


def make_nbody_splits(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    *,
    draw: str = "seeded",
    frame_in: int = 30,
    frame_out: int = 40,
    **simulation: float | int,
) -> dict[str, NBodySplit]:
    """train/val/test splits (3000/2000/2000 by default).

    draw="seeded": fresh systems, each split from its own stream seeded by `seed`;
    draw="egnn": EGNN's published systems (`egnn_initial_states`; `seed` is not used),
    integrated here. Close encounters are chaotic, so rounding makes ~5 % of them end more
    than 1e-3 away from the published frame 40; the rest agree to float rounding.
    """
    if draw not in ("seeded", "egnn"):
        raise ValueError(f"draw must be 'seeded' or 'egnn'; got {draw!r}")
    if not (0 <= frame_in < frame_out):
        raise ValueError(f"need 0 <= frame_in < frame_out; got {frame_in}, {frame_out}")
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    states = egnn_initial_states(sizes) if draw == "egnn" else {}
    out = {}
    for index, (name, count) in enumerate(sizes.items()):
        if draw == "egnn":
            sim = simulate_charged_particles(
                count, initial_state=states[name], frames=frame_out + 1, **simulation
            )
        else:
            generator = torch.Generator().manual_seed(1_000_003 * seed + index)
            sim = simulate_charged_particles(
                count, generator=generator, frames=frame_out + 1, **simulation
            )
        out[name] = NBodySplit(
            positions=sim.positions[:, frame_in].float(),
            velocities=sim.velocities[:, frame_in].float(),
            charges=sim.charges.float(),
            target=sim.positions[:, frame_out].float(),
        )
    return out
