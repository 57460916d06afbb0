"""The typed results of experiment `frame-averaging`: what `frame_averaging.run` returns and
`frame_averaging_report` reads. `FrameAveragingResult.from_json` rebuilds a seed's result from
the JSON the runner caches and results.json holds (`to_json()`), so the report reads
attributes, not string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanwise.experiments.base import JSONRecord

__all__ = ["NBodyRun", "NormalsRun", "FrameAveragingResult"]


@dataclass
class NBodyRun(JSONRecord):
    """One model on n-body: curves every `eval_every` epochs and the paper's selection."""

    model: str
    parameters: int
    epochs_run: int
    best_epoch: int
    best_val_mse: float
    test_mse: float  # at the best validation epoch
    eval_epochs: list[int]
    train_mse: list[float]
    val_mse: list[float]
    test_mse_curve: list[float]
    equivariance_error: float
    stopped_early: bool
    seconds: float


@dataclass
class NormalsRun(JSONRecord):
    """One normal estimator: mean unoriented angle error (degrees), aligned and rotated."""

    model: str
    aligned_error_deg: float
    rotated_error_deg: float
    equivariance_error: float
    train_loss: list[float]
    seconds: float


@dataclass
class FrameAveragingResult(JSONRecord):
    seed: int
    train_size: int = 0
    epochs_cap: int = 0
    degenerate_test_fraction: float = 0.0
    nbody: list[NBodyRun] = field(default_factory=list)
    normals: list[NormalsRun] = field(default_factory=list)
