"""The typed results of experiment `fedau`: what `fedau.run` returns and `fedau_report`
reads. `FedAUResult.from_json` rebuilds a seed's result from the JSON the runner caches and
results.json holds (`to_json()`), so the report reads attributes, not string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meanwise.experiments.base import JSONRecord

__all__ = ["MethodRun", "SettingResult", "FedAUResult", "OptimumPoint", "Optima"]


@dataclass
class MethodRun(JSONRecord):
    """One method at one server rate: curves at every evaluation and the final-window means.

    `test_acc` is in % (per-user accuracy averaged over users on Synthetic); `train_objective`
    is 1/N Σ_n (mean loss of client n). `multiplier` is the rate over the method's base;
    `diverged` runs (a non-finite update) are never chosen.
    """

    method: str
    server_lr: float
    multiplier: float
    rounds: list[int]
    test_acc: list[float]
    train_objective: list[float]
    final_test_acc: float
    final_objective: float
    diverged: bool = False
    chosen: bool = False


@dataclass
class SettingResult(JSONRecord):
    """One (dataset, pattern): every grid run, the probabilities p_n, the long-run participation
    frequencies, FedAU's final weights (to set against 1/p_n) and the participation counts."""

    dataset: str
    pattern: str
    mean_participation: float
    probs: list[float]
    frequencies: list[float]
    fedau_weights: list[float]
    participations: list[int]
    runs: list[MethodRun] = field(default_factory=list)


@dataclass
class OptimumPoint(JSONRecord):
    """A minimizer's true objective 1/N Σ f_n (float64), per-user test accuracy (%) and the
    true objective's gradient norm there (0 at the true minimizer)."""

    objective: float
    test_acc: float
    gradient_norm: float


@dataclass
class Optima(JSONRecord):
    """The exact minimizers of the true objective and of the participation-weighted one
    (where FedAvg converges), see `fedau.objective_optima`."""

    uniform: OptimumPoint
    participation_weighted: OptimumPoint


@dataclass
class FedAUResult(JSONRecord):
    """One seed. `optimum` (Synthetic, first `optimum_seeds` seeds): the exact minimizers of the
    true and of the participation-weighted objective with their true objective and per-user
    test accuracy (see `objective_optima`)."""

    seed: int
    rounds: int
    n_clients: int
    settings: list[SettingResult] = field(default_factory=list)
    optimum: Optima | None = None
