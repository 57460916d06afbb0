"""The typed results of experiment `fisher-merging`: what `fisher_merging.run` returns and
`fisher_merging_report` reads.

`FisherMergingResult.from_json` rebuilds a seed's result from the JSON the runner caches and
results.json holds (`to_json()`), so the report reads attributes, not string keys. Keys that are
data (an arm's name, a metric of a λ curve, a model's label) stay dict keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

from meanwise.experiments.base import JSONRecord

__all__ = [
    "EnsemblingCell",
    "SampledFisher",
    "RobustResult",
    "TaskScores",
    "MultitaskResult",
    "FisherMergingResult",
]


@dataclass
class EnsemblingCell(JSONRecord):
    """(a) one (head setting, N): the test accuracy of every arm ("fisher (λ searched)",
    "output ensemble", ...), each member's accuracy, the λ each rule chose on validation, how
    many candidates were searched and how often members disagree with copy 1 (% of test
    images)."""

    head: str
    n_models: int
    test_acc: dict[str, float]
    individual_test_acc: list[float]
    chosen_lambda: dict[str, list[float]]
    candidates: int
    disagreement: float = 0.0


@dataclass
class SampledFisher(JSONRecord):
    """The sampled Fisher against the exact one of the same model and examples: the relative
    error ‖sampled − exact‖ / ‖exact‖ for each number of label draws."""

    draws: list[int]
    relative_error: list[float]
    examples: int


@dataclass
class RobustResult(JSONRecord):
    """(b) WiSE-FT-style interpolation: the λ grid, per rule ("plain", "fisher") the curves
    over λ (keys "val", "val_nll", "id_test", each shift, "shift_test"), the λ chosen on
    validation and the test scores there."""

    lambdas: list[float]
    curves: dict[str, dict[str, list[float]]]
    chosen_lambda: dict[str, float]
    at_chosen: dict[str, dict[str, float]]


@dataclass
class TaskScores(JSONRecord):
    """One model or merge of the multi-task extra: 10-way accuracy on each class group and on
    the union."""

    task_acc: list[float]
    union_acc: float


@dataclass
class MultitaskResult(JSONRecord):
    """The multi-task extra: the class groups, every model's and merge's scores, the output
    ensemble, and per model its mean confidence on its own data (%) and its Fisher's total."""

    tasks: list[list[int]]
    scored: dict[str, TaskScores]
    output_ensemble_union_acc: float
    confidence: list[float]
    fisher_total: list[float]


#: the parts a seed may lack; results.json has always written a missing one as {}
_OPTIONAL_PARTS = ("robust", "multitask")


@dataclass
class FisherMergingResult(JSONRecord):
    """One seed of every part (`robust` / `multitask` None where that part did not run)."""

    seed: int
    num_parameters: int = 0
    ensembling: list[EnsemblingCell] = field(default_factory=list)
    pretrained_test_acc: dict[str, float] = field(default_factory=dict)  # per head setting
    # sampled vs exact Fisher of two fine-tuned models (the parameters each merge weights)
    sampled_fisher: dict[str, SampledFisher] = field(default_factory=dict)
    robust: RobustResult | None = None
    multitask: MultitaskResult | None = None  # the extra multi-task merge
    seconds: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> Self:
        if isinstance(data, dict):
            data = {k: (None if k in _OPTIONAL_PARTS and v == {} else v) for k, v in data.items()}
        return super().from_json(data)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        return {k: ({} if k in _OPTIONAL_PARTS and v is None else v) for k, v in data.items()}
