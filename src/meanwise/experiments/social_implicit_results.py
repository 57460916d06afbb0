"""The typed results of experiment `social-implicit`: what `social_implicit.run` returns and
`social_implicit_report` reads. `SocialImplicitResult.from_json` rebuilds a seed's result from
the JSON the runner caches and results.json holds (`to_json()`), so the report reads
attributes, not string keys. A predictor's metrics stay a dict keyed by metric name
("ade", "fde", "amd", ...), as `evaluate_scenes` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanwise.experiments.base import JSONRecord

__all__ = ["ShiftPoint", "SamplingPoint", "SplitResult", "SocialImplicitResult"]


@dataclass
class ShiftPoint(JSONRecord):
    """Metrics of the probed model's samples moved by `offset` metres (along the diagonal), at
    one sampling seed."""

    offset: float
    ade: float
    fde: float
    amd: float
    amv: float


@dataclass
class SamplingPoint(JSONRecord):
    """The released weights' best-of-K ADE/FDE at one probe sampling seed."""

    seed: int
    ade: float
    fde: float


@dataclass
class SplitResult(JSONRecord):
    """One split: data sizes, training curves and the metrics of each predictor on test."""

    split: str
    data: str  # "eth_ucy" or "synthetic"
    train_scenes: int
    val_scenes: int
    test_scenes: int
    test_pedestrians: int
    epochs: int
    scenes_per_epoch: int
    accumulate: int
    best_epoch: int
    train_loss: list[float]
    val_ade: list[float]
    val_fde: list[float]
    train_seconds: float
    trained: dict[str, float]
    constant_velocity: dict[str, float]
    released: dict[str, float] | None = None
    # the released weights' best-of-K ADE/FDE at each probe sampling seed
    released_sampling: list[SamplingPoint] = field(default_factory=list)
    # the shift probe: one list of points (one per offset) per sampling seed
    shift: list[list[ShiftPoint]] = field(default_factory=list)
    shift_model: str = "trained"  # "released" (the authors' weights) or "trained" (ours)
    shift_scenes: int = 0
    # the released weights' validation ADE/FDE, as each epoch of ours is validated
    released_val_ade: float | None = None
    released_val_fde: float | None = None
    # data="auto" found no ETH/UCY folder: the synthetic crowd stood in (said in the report)
    data_missing: bool = False
    dtype: str = "float64"


@dataclass
class SocialImplicitResult(JSONRecord):
    seed: int
    num_parameters: int = 0
    samples: int = 20
    distribution_samples: int = 50
    splits: list[SplitResult] = field(default_factory=list)
