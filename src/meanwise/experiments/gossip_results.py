"""The typed results of experiment `gossip`: what `gossip.run` returns and `gossip_report` reads.

`GossipResult.from_json` rebuilds a seed's result from its JSON form (the runner's cache and
results.json hold `to_json()`), so the report reads attributes, not string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanwise.experiments.base import JSONRecord

__all__ = ["GossipResult", "MethodRun"]


@dataclass
class MethodRun(JSONRecord):
    """One (model, split, method) run of one seed: curves at every evaluation and totals."""

    model: str
    split: str
    method: str
    ticks: list[int]
    mean_accuracy: list[float]
    min_accuracy: list[float]
    max_accuracy: list[float]
    layer_variance: dict[str, list[float]]
    initial_variance: dict[str, float]
    final_accuracy: float
    ticks_to_target: int | None
    trainings: int
    merges: int
    predicted_ratio: float | None  # beta^2 + (1-beta)^2/m for independent models (gossip)
    seconds: float


@dataclass
class GossipResult(JSONRecord):
    """One seed: the setting it ran and every (model, split, method) run."""

    seed: int
    n_nodes: int
    degree: int
    ticks: int
    beta: float
    target_accuracy: float
    runs: list[MethodRun] = field(default_factory=list)
