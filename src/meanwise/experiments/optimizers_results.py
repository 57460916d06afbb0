"""The typed results of experiment `optimizers`: what `optimizers.run` returns and
`optimizers_report` reads. `OptimizersResult.from_json` rebuilds a seed's result from the JSON
the runner caches and results.json holds (`to_json()`), so the report reads attributes, not
string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanwise.experiments.base import JSONRecord

__all__ = ["TrajectoryResult", "TrainingResult", "OptimizersResult"]


@dataclass
class TrajectoryResult(JSONRecord):
    """One optimizer on one synthetic function: x_0..x_T and where it ended."""

    function: str
    method: str
    x: list[float]
    final_x: float
    final_f: float


@dataclass
class TrainingResult(JSONRecord):
    """One optimizer on few-shot digits for every replicate of a runner seed.

    Lists named final_* hold one value per replicate (run seed `run_seeds[i]`), in %;
    `test_acc_curve` (at `curve_epochs`) and `train_loss_curve` (every epoch) are means over
    the replicates. `seconds` and `cpu_seconds` are the only fields that differ between
    identical runs.
    """

    method: str
    run_seeds: list[int]
    final_test_acc: list[float]
    final_test_loss: list[float]
    final_train_acc: list[float]
    curve_epochs: list[int]
    test_acc_curve: list[float]
    train_loss_curve: list[float]
    seconds: float
    cpu_seconds: float


@dataclass
class OptimizersResult(JSONRecord):
    """One runner seed of both parts; the task's setup is repeated for the report's captions."""

    seed: int
    run_seeds: list[int] = field(default_factory=list)
    num_parameters: int = 0
    epochs: int = 0
    weight_decay: float = 0.0
    per_class: int = 0
    label_noise: float = 0.0
    max_shift: int = 0
    synthetic: list[TrajectoryResult] = field(default_factory=list)
    digits: list[TrainingResult] = field(default_factory=list)
