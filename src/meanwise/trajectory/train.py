"""IMLE training of Social-Implicit, with the authors' seven augmentations and exact resume.

The recipe of the paper and its released code: K = 20 samples per scene; the sample nearest the
ground truth over the whole scene is pulled toward it (`imle_loss`); the loss is averaged over
128 scenes for each SGD step (lr 1.0, StepLR(45, 0.1), 50 epochs). Each training scene first
gets one of seven augmentations, each with probability 1/7 (the authors' `TrajectoryAugmenter`):
none; a uniform jitter in +-0.1 m per time step shared by all pedestrians; swap x/y plus time
reversal; time reversal; merging 1-3 other training scenes; rotation about the origin by
k * 15 degrees, k = 1..23; a linear ramp t * inc / 20 added to both coordinates,
inc ~ U(-1, 1). Augmentations act on absolute positions (in float64) and the model's input and
target displacements are recomputed from them, as in the reference.

Batched steps. The released loop runs one scene per forward. Here (`batched=True`, the
default) all scenes of an SGD step go through one forward and one backward: the scenes are
packed side by side along the pedestrian axis (`SocialImplicit.forward_scenes`, an empty
column between scenes keeps each scene's convolutions to itself) and `imle_losses` ranks the
samples, picks the nearest and computes every loss term per scene. Its gradient is the
per-scene accumulated gradient (a test checks 1e-10 in float64); `batched=False` keeps the
per-scene path. Steps with more than `_MAX_PACKED_PEDESTRIANS` pedestrians are split into a few
packed chunks (memory), each with its own backward into the same gradient.

Every draw of a step (the augmentations, then each scene's [K, 2] noise, in scene order) is
made before its forward, in float64 whatever the model's dtype, so the batched and per-scene
paths, and float32 and float64 runs, see the same draws.

Two deliberate differences from the released loop, both about bookkeeping, not the method: the
reference steps first after 129 scenes and drops the scenes after the last full group of 128;
here every group has `accumulate` scenes and the last, partial group still makes a step (its
loss averaged over its own size). And the best checkpoint is chosen by validation best-of-K ADE
(the reference uses the validation loss with a 5% improvement threshold).

Every random draw (data order, augmentation choices, the model's noise) comes from one
`torch.Generator` whose state is checkpointed with the model, optimizer and scheduler after
every epoch, so stopping after any epoch and resuming gives bit-identical parameters.
Checkpoints are plain `torch.save` files of tensors and primitives, loadable with
`weights_only=True`, written to a temporary file and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanwise.atomic_io import atomic_torch_save
from meanwise.trajectory.data import OBS_LEN, Scene, observed_displacements
from meanwise.trajectory.evaluate import evaluate_scenes
from meanwise.trajectory.imle import imle_loss, imle_losses
from meanwise.trajectory.social_implicit import NOISE_FACTORS, ZONE_BINS, SocialImplicit

__all__ = [
    "AUGMENTATIONS",
    "SPLIT_LOSS_WEIGHTS",
    "TrainConfig",
    "TrainHistory",
    "TrainResult",
    "full_trajectory",
    "split_trajectory",
    "jitter",
    "swap_xy_reverse",
    "reverse_time",
    "merge_scenes",
    "rotate",
    "speed_ramp",
    "augment",
    "draw_step",
    "accumulate_gradients",
    "train_social_implicit",
    "load_checkpoint",
    "LAST_CHECKPOINT",
    "BEST_CHECKPOINT",
]

AUGMENTATIONS: tuple[str, ...] = (
    "none",
    "jitter",
    "swap_xy_reverse",
    "reverse_time",
    "merge",
    "rotate",
    "speed_ramp",
)
# (pairwise-distance weight, pairwise-angle weight) of each split, from the released args.json
# files (`w_norm`, `w_cos`); the triplet weight is 1e-4 everywhere.
SPLIT_LOSS_WEIGHTS: dict[str, tuple[float, float]] = {
    "eth": (1e-5, 1e-4),
    "hotel": (1e-5, 1e-5),
    "univ": (1e-5, 1e-4),
    "zara1": (1e-5, 1e-4),
    "zara2": (1e-4, 1e-4),
}
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
_CHECKPOINT_FORMAT = 1
# pedestrians per packed forward: a step of 128 ZARA1 scenes (~1,800 with merges) is one
# forward; larger ones are split so that the stage-2 shifted copies [K, 3 * 32, W] (and their
# gradients) stay ~30 MB each in float64
_MAX_PACKED_PEDESTRIANS = 2048
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --- augmentations (absolute positions [T, N, 2]) ------------------------------------------------


def _check_trajectory(traj: Tensor, name: str = "traj") -> None:
    if not isinstance(traj, Tensor) or traj.dim() != 3 or traj.shape[-1] != 2:
        shape = tuple(traj.shape) if isinstance(traj, Tensor) else type(traj).__name__
        raise ValueError(f"{name} must be a [T, N, 2] tensor of positions; got {shape}")


def full_trajectory(scene: Scene) -> Tensor:
    """[obs + pred, N, 2]: the scene's observed and future positions in one tensor."""
    return torch.cat([scene.observed, scene.future], dim=0)


def split_trajectory(traj: Tensor, obs_len: int = OBS_LEN) -> tuple[Tensor, Tensor]:
    """(observed displacements [obs, N, 2], first step 0; future displacements [pred, N, 2],
    the first measured from the last observed position) — the model's input and target."""
    _check_trajectory(traj)
    if not 1 <= obs_len < traj.shape[0]:
        raise ValueError(f"obs_len must be in [1, {traj.shape[0] - 1}]; got {obs_len}")
    steps = traj[obs_len - 1 :]
    return observed_displacements(traj[:obs_len]), steps[1:] - steps[:-1]


def jitter(traj: Tensor, generator: torch.Generator, amount: float = 0.1) -> Tensor:
    """Add one uniform offset in [-amount, amount]^2 per time step, the same for every
    pedestrian (the reference draws [T, 2] and broadcasts it over pedestrians), so the
    pedestrians' relative positions at each step are unchanged."""
    _check_trajectory(traj)
    if not amount >= 0:
        raise ValueError(f"amount must be >= 0; got {amount}")
    u = torch.rand(traj.shape[0], 1, 2, generator=generator, dtype=torch.float64)
    return traj + ((2 * u - 1) * amount).to(traj.dtype)


def swap_xy_reverse(traj: Tensor) -> Tensor:
    """Swap the x and y coordinates and reverse time (the reference's `flip(dims=[2, 3])`)."""
    _check_trajectory(traj)
    return traj.flip(0).flip(-1)


def reverse_time(traj: Tensor) -> Tensor:
    """Walk the scene backwards: the last position becomes the first."""
    _check_trajectory(traj)
    return traj.flip(0)


def merge_scenes(traj: Tensor, others: Sequence[Tensor]) -> Tensor:
    """Append the pedestrians of `others` (same length in time) after the scene's own."""
    _check_trajectory(traj)
    for i, other in enumerate(others):
        _check_trajectory(other, f"others[{i}]")
        if other.shape[0] != traj.shape[0]:
            raise ValueError(
                f"others[{i}] has {other.shape[0]} time steps; the scene has {traj.shape[0]}"
            )
    return torch.cat([traj, *[o.to(traj.dtype) for o in others]], dim=1)


def rotate(traj: Tensor, angle: float) -> Tensor:
    """Rotate every position about the origin by `angle` radians (counter-clockwise)."""
    _check_trajectory(traj)
    c, s = math.cos(angle), math.sin(angle)
    matrix = torch.tensor([[c, -s], [s, c]], dtype=traj.dtype)
    return traj @ matrix.T


def speed_ramp(traj: Tensor, increment: float) -> Tensor:
    """Add t * increment / T to both coordinates at step t = 0..T-1: every displacement grows
    by increment / T on each axis (the reference's `+ arange(0, inc, inc / 20)`)."""
    _check_trajectory(traj)
    length = traj.shape[0]
    ramp = torch.arange(length, dtype=torch.float64) * (float(increment) / length)
    return traj + ramp.to(traj.dtype)[:, None, None]


def augment(traj: Tensor, pool: Sequence[Tensor], generator: torch.Generator) -> tuple[Tensor, str]:
    """One of the seven augmentations, each with probability 1/7; returns (traj, its name).

    `pool` holds the training scenes' trajectories for `merge`, which appends 1-3 of them drawn
    uniformly with replacement (the reference draws the next scenes of a shuffled loader).
    """
    choice = min(int(torch.rand(1, generator=generator).item() * 7), 6)
    name = AUGMENTATIONS[choice]
    if name == "jitter":
        return jitter(traj, generator), name
    if name == "swap_xy_reverse":
        return swap_xy_reverse(traj), name
    if name == "reverse_time":
        return reverse_time(traj), name
    if name == "merge":
        if not pool:
            raise ValueError("pool is empty: merge needs other training scenes")
        count = int(torch.randint(1, 4, (1,), generator=generator))
        picks = torch.randint(len(pool), (count,), generator=generator).tolist()
        return merge_scenes(traj, [pool[i] for i in picks]), name
    if name == "rotate":
        k = int(torch.randint(1, 24, (1,), generator=generator))
        return rotate(traj, k * math.pi / 12), name
    if name == "speed_ramp":
        increment = 2 * torch.rand(1, generator=generator, dtype=torch.float64).item() - 1
        return speed_ramp(traj, increment), name
    return traj, name


# --- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe by default; `max_train_scenes` caps an epoch for quick runs."""

    epochs: int = 50
    samples: int = 20
    lr: float = 1.0
    lr_step_epochs: int = 45
    lr_gamma: float = 0.1
    accumulate: int = 128
    distance_weight: float = 1e-4
    angle_weight: float = 1e-4
    triplet_weight: float = 1e-4
    augment: bool = True
    noise_factors: tuple[float, ...] = NOISE_FACTORS
    bins: tuple[float, ...] = ZONE_BINS
    val_samples: int = 20
    val_seed: int = 0
    # float64 as the reference; float32 trains too (the angle term avoids acos, see imle.py)
    dtype: str = "float64"
    max_train_scenes: int = 0  # 0: every training scene every epoch
    batched: bool = True  # one forward/backward per SGD step; False: one per scene

    def __post_init__(self) -> None:
        for name in ("epochs", "samples", "lr_step_epochs", "accumulate", "val_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (IMLE ranks samples); got {self.samples}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}; got {self.dtype!r}")
        if self.max_train_scenes < 0:
            raise ValueError(f"max_train_scenes must be >= 0; got {self.max_train_scenes}")
        if len(self.noise_factors) != len(self.bins):
            raise ValueError(
                f"noise_factors needs one value per zone ({len(self.bins)}); "
                f"got {self.noise_factors}"
            )

    @classmethod
    def for_split(cls, split: str, **overrides: Any) -> TrainConfig:
        """The released settings of a leave-one-out split (loss weights, ETH's noise factors)."""
        from meanwise.trajectory.social_implicit import noise_factors_for

        distance, angle = SPLIT_LOSS_WEIGHTS.get(split, (1e-4, 1e-4))
        base: dict[str, Any] = {
            "distance_weight": distance,
            "angle_weight": angle,
            "noise_factors": noise_factors_for(split),
        }
        base.update(overrides)
        return cls(**base)

    def build_model(self) -> SocialImplicit:
        """A fresh model (initialised from torch's global generator) in this config's dtype."""
        return SocialImplicit(self.bins, self.noise_factors).to(_DTYPES[self.dtype])


@dataclass
class TrainHistory:
    """Per-epoch curves and the best epoch (0-based) on validation ADE."""

    train_loss: list[float] = field(default_factory=list)
    val_ade: list[float] = field(default_factory=list)
    val_fde: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    augmentations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AUGMENTATIONS, 0))
    best_epoch: int = -1
    best_val_ade: float = math.inf
    best_val_fde: float = math.inf
    seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)


@dataclass
class TrainResult:
    """The model with the best validation weights loaded, the last epoch's weights, and the
    history."""

    model: SocialImplicit
    last_state: dict[str, Tensor]
    history: TrainHistory


# --- checkpoints ---------------------------------------------------------------------------------


def _config_json(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint written by `train_social_implicit`, loaded with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} is not a checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a meanwise Social-Implicit training checkpoint")
    return state


# --- one SGD step's gradient ------------------------------------------------------------------


def draw_step(
    pool: Sequence[Tensor],
    indices: Sequence[int],
    config: TrainConfig,
    generator: torch.Generator,
) -> tuple[list[Tensor], Tensor, list[str]]:
    """The draws of one SGD step, scene by scene: (trajectories [20, N_s, 2] after their
    augmentation, noise [S, K, 2] float64, the augmentations' names). `pool` holds the
    training trajectories (float64) the scenes are taken from and merged with."""
    trajectories, noise, names = [], [], []
    for index in indices:
        traj, name = pool[index], "none"
        if config.augment:
            traj, name = augment(traj, pool, generator)
        trajectories.append(traj)
        names.append(name)
        noise.append(torch.randn(config.samples, 2, generator=generator, dtype=torch.float64))
    return trajectories, torch.stack(noise), names


def accumulate_gradients(
    model: SocialImplicit,
    trajectories: Sequence[Tensor],
    noise: Tensor,
    config: TrainConfig,
    divisor: float,
) -> float:
    """Add the gradient of sum over scenes of loss_s / divisor to the parameters' `.grad`;
    return the sum of the losses.

    Args:
        trajectories: the step's scenes, absolute positions [20, N_s, 2].
        noise: [S, K, 2], each scene's noise draw.
        config: the loss weights, the dtype and `batched` (one packed forward per chunk of
            scenes, or one forward per scene).
        divisor: the step's scene count (the reference averages the loss over the step).
    """
    if len(trajectories) != noise.shape[0]:
        raise ValueError(
            f"noise must have one draw per trajectory ({len(trajectories)}); got {noise.shape[0]}"
        )
    dtype = _DTYPES[config.dtype]
    weights = {
        "distance_weight": config.distance_weight,
        "angle_weight": config.angle_weight,
        "triplet_weight": config.triplet_weight,
    }
    pairs = [split_trajectory(traj.to(torch.float64)) for traj in trajectories]
    total = 0.0
    if not config.batched:
        for (observed, target), draw in zip(pairs, noise, strict=True):
            pred = model(observed.to(dtype), noise.shape[1], noise=draw)
            loss, _ = imle_loss(pred, target.to(dtype), **weights)
            # backward per scene: memory stays one scene's graph
            (loss / divisor).backward()
            total += float(loss.detach())
        return total
    chunks, current, width = [], [], 0
    for s, (observed, _) in enumerate(pairs):
        if current and width + observed.shape[1] > _MAX_PACKED_PEDESTRIANS:
            chunks.append(current)
            current, width = [], 0
        current.append(s)
        width += observed.shape[1]
    chunks.append(current)
    for chunk in chunks:
        sizes = [pairs[s][0].shape[1] for s in chunk]
        observed = torch.cat([pairs[s][0] for s in chunk], dim=1).to(dtype)
        target = torch.cat([pairs[s][1] for s in chunk], dim=1).to(dtype)
        pred = model.forward_scenes(observed, sizes, noise[chunk])
        losses, _ = imle_losses(pred, target, sizes, **weights)
        (losses.sum() / divisor).backward()
        total += float(losses.detach().sum())
    return total


# --- the training loop ---------------------------------------------------------------------------


def _validate(model: SocialImplicit, scenes: Sequence[Scene], config: TrainConfig) -> dict:
    model.eval()
    result = evaluate_scenes(
        lambda observed, k, generator: model.predict(observed, k, generator=generator),
        scenes,
        samples=config.val_samples,
        seed=config.val_seed,
    )
    model.train()
    return result


def train_social_implicit(
    train_scenes: Sequence[Scene],
    val_scenes: Sequence[Scene],
    config: TrainConfig | None = None,
    *,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    on_epoch: Callable[[int, TrainHistory], None] | None = None,
) -> TrainResult:
    """Train Social-Implicit with IMLE; resume from `checkpoint_dir/last.pt` if it exists.

    Args:
        train_scenes, val_scenes: the training and validation windows.
        config: the recipe (default: the paper's).
        seed: initial weights and every random draw of training.
        checkpoint_dir: where `last.pt` (everything needed to resume, written after every
            epoch) and `best.pt` (the best validation weights, a plain state dict) live. A
            `last.pt` from a run with another config (apart from `epochs`) or seed is an error.
        on_epoch: called after each epoch with (epoch, history), e.g. for a progress bar.

    Returns:
        The best-validation model (in eval mode), the last weights and the curves.
    """
    config = config or TrainConfig()
    if not train_scenes:
        raise ValueError("train_scenes is empty")
    if not val_scenes:
        raise ValueError("val_scenes is empty")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights, without touching the caller's generator
        model = config.build_model()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma
    )
    history = TrainHistory()
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    last_path = None if folder is None else folder / LAST_CHECKPOINT
    if last_path is not None and last_path.exists():
        state = load_checkpoint(last_path)
        saved = json.loads(state["config"])
        mine = json.loads(_config_json(config))
        saved.pop("epochs"), mine.pop("epochs")
        if saved != mine or state["seed"] != seed:
            raise ValueError(
                f"checkpoint_dir {str(folder)!r} holds a run with another config or seed "
                f"(seed {state['seed']}); use a fresh folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        best_state = state["best_model"]
        history = TrainHistory(**json.loads(state["history"]))

    # augmentations in float64 whatever the model's dtype (see the module docstring)
    pool = [full_trajectory(s).to(torch.float64) for s in train_scenes]
    started = time.perf_counter()
    seconds_before = history.seconds
    model.train()
    for epoch in range(history.epochs_run, config.epochs):
        order = torch.randperm(len(pool), generator=generator)
        if config.max_train_scenes:
            order = order[: config.max_train_scenes]
        history.lr.append(optimizer.param_groups[0]["lr"])
        total, count = 0.0, len(order)
        for start in range(0, count, config.accumulate):
            group = order[start : start + config.accumulate].tolist()
            trajectories, noise, names = draw_step(pool, group, config, generator)
            for name in names if config.augment else ():
                history.augmentations[name] += 1
            optimizer.zero_grad(set_to_none=True)
            # the sum over the group of loss / group size: the reference's averaged loss
            total += accumulate_gradients(model, trajectories, noise, config, len(group))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        history.train_loss.append(total / count)
        val = _validate(model, val_scenes, config)
        history.val_ade.append(val["ade"])
        history.val_fde.append(val["fde"])
        if val["ade"] < history.best_val_ade:
            history.best_val_ade, history.best_val_fde = val["ade"], val["fde"]
            history.best_epoch = epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if folder is not None:
                atomic_torch_save(best_state, folder / BEST_CHECKPOINT)
        history.seconds = seconds_before + time.perf_counter() - started
        if last_path is not None:
            atomic_torch_save(
                {
                    "format": _CHECKPOINT_FORMAT,
                    "config": _config_json(config),
                    "seed": seed,
                    "model": model.state_dict(),
                    "best_model": best_state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "history": json.dumps(dataclasses.asdict(history)),
                },
                last_path,
            )
        if on_epoch is not None:
            on_epoch(epoch, history)
    last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return TrainResult(model=model.eval(), last_state=last_state, history=history)
