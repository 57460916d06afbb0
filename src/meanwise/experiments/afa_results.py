"""The typed results of experiment `afa`: what `afa.run` returns and `afa_report` reads.
`AFAResult.from_json` rebuilds a seed's result from the JSON the runner caches and results.json
holds (`to_json()`), so the report reads attributes, not string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanwise.experiments.base import JSONRecord

__all__ = ["AFARun", "AFAResult"]


@dataclass
class AFARun(JSONRecord):
    """One method (or one m of the speedup part): excess objective and test accuracy curves."""

    method: str
    arrivals_per_round: int
    server_lr: float
    rounds: list[int]
    excess: list[float]
    test_acc: list[float]
    final_excess: float
    final_test_acc: float
    tail_average_excess: float = 0.0  # f − f* at the mean of the last average_rounds iterates
    rounds_to_target: int | None = None  # None: never reached within the run
    chosen: bool = False


@dataclass
class AFAResult(JSONRecord):
    seed: int
    n_workers: int
    optimum: float
    initial_excess: float
    arrival_counts: list[int]
    local_steps: list[int]
    mean_staleness: float
    never_arrived: int = 0  # workers never accepted (only possible with discard_stale)
    waited_rounds: int = 0  # rounds that waited for a worker at the delay bound
    rejected_stale: int = 0  # updates discarded for staleness (discard_stale only)
    predicted_bias: dict[str, float] = field(default_factory=dict)
    runs: list[AFARun] = field(default_factory=list)
    speedup: list[AFARun] = field(default_factory=list)
