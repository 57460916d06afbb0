"""Experiment `fedau`: FedAU against FedAvg, the known-probability oracle and MIFA.

The setting of Wang & Ji (NeurIPS 2023), scaled to this machine: N = 100 clients whose
participation probabilities are heterogeneous and correlated with their data
(p_n = max(0.02, 0.1·C·⟨π_n, d⟩), d ~ Dirichlet(0.1)), under three patterns (Bernoulli, Markov
with transition rate 0.05, cyclic with period 100), I = 5 local SGD steps of batch 16 per round.
Two datasets: the 8x8 digits split over the clients by Dirichlet(0.1) on labels (an MLP
64-32-10 instead of the paper's CNNs) and FedProx's Synthetic(1, 1) with one user per client
(multinomial logistic regression, FedProx's model for it).

Methods: FedAU (no cutoff, and with the paper's other setting, cutoff K = 50, which bounds a
weight by 50), FedAvg over participants, FedAvg over all N clients, the oracle that
knows p_n (1/N Σ_S Δ_n/p_n) and MIFA (one stored update per client). Learning rates: the local
rate is the paper's 0.1 for digits; Synthetic(1, 1)'s inputs are larger, and 0.1 made its local
steps diverge on big clients, so it uses 0.01 (FedProx's rate for it). The server rate is tuned
per method, as the paper did, on a small grid: `server_lr_multipliers` times a method's base
rate, the base being 1 except for FedAvg over all clients, whose base is N / Σ_n p_n (the inverse
of the expected participating fraction, which makes its expected step the size of the others'
instead of about ten times smaller). The rate is chosen per seed by the lowest *training*
objective 1/N Σ_n f_n(x) (the objective FedAU targets: every client counts equally) averaged over
the last evaluations; test accuracy is reported for the chosen rate only, so the selection never
sees test data.

Every method of one (dataset, pattern, seed) sees the same data split, probabilities,
participation stream, initial model and minibatches: the comparison is paired.

The report side (claim, published numbers, tables, figures, verdict) is in `fedau_report`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset, digits_federated
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.experiments.base import cached_stage, progress, seeded, torch_threads
from meanwise.federated import (
    MIFA,
    Aggregator,
    Bernoulli,
    Cyclic,
    FedAU,
    FedAvg,
    KnownParticipation,
    LocalTraining,
    Markov,
    ParticipationProcess,
    heterogeneous_probabilities,
)
from meanwise.federated.simulator import FederatedSweep, unflatten

__all__ = [
    "FedAUConfig",
    "FedAUResult",
    "SettingResult",
    "MethodRun",
    "METHODS",
    "PATTERNS",
    "DATASETS",
    "run",
    "run_setting",
]

METHODS: tuple[str, ...] = (
    "FedAU",
    "FedAU-K50",
    "FedAvg-participants",
    "FedAvg-all",
    "Known-p",
    "MIFA",
)
PATTERNS: tuple[str, ...] = ("bernoulli", "markov", "cyclic")
DATASETS: tuple[str, ...] = ("digits", "synthetic")
N_CLASSES = 10


@dataclass(frozen=True)
class FedAUConfig:
    """Settings; `quick()` is digits only with 300 rounds (about 4 minutes on 2 cores)."""

    seeds: int = 3
    datasets: tuple[str, ...] = DATASETS
    patterns: tuple[str, ...] = PATTERNS
    methods: tuple[str, ...] = METHODS
    n_clients: int = 100
    rounds: int = 1000
    local_steps: int = 5
    batch_size: int = 16
    digits_local_lr: float = 0.1
    synthetic_local_lr: float = 0.01
    server_lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    eval_every: int = 20
    final_window: int = 5  # evaluations averaged for the final numbers and the rate choice
    cutoff: int | None = None  # "FedAU"; "FedAU-K50" always uses the paper's other cutoff, 50
    markov_rate: float = 0.05
    cyclic_period: int = 100
    dirichlet_alpha: float = 0.1
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    hidden: int = 32
    num_threads: int = 1  # tiny models: more threads only add barrier waits on a busy machine

    def __post_init__(self) -> None:
        for name, values, known in (
            ("datasets", self.datasets, DATASETS),
            ("patterns", self.patterns, PATTERNS),
            ("methods", self.methods, METHODS),
        ):
            unknown = [v for v in values if v not in known]
            if unknown or not values:
                raise ValueError(f"{name} must be a non-empty subset of {known}; got {values}")
        if self.seeds < 1 or self.rounds < 1 or self.eval_every < 1 or self.final_window < 1:
            raise ValueError("seeds, rounds, eval_every and final_window must be >= 1")
        if self.rounds < self.eval_every:
            raise ValueError(f"rounds={self.rounds} must be >= eval_every={self.eval_every}")
        if not self.server_lr_multipliers or min(self.server_lr_multipliers) <= 0:
            raise ValueError("server_lr_multipliers must be a non-empty tuple of positive rates")

    @classmethod
    def quick(cls) -> FedAUConfig:
        """Digits only, 300 rounds (3 cyclic periods), 2 seeds, rate grid (1, 2, 4), the
        paper's five methods (no FedAU-K50): about 4 minutes on 2 cores. (0.5 was never chosen
        on digits; Synthetic(1, 1), FedAU-K50 and the longer runs are in `full()`.)
        """
        return cls(
            seeds=2,
            datasets=("digits",),
            methods=tuple(m for m in METHODS if m != "FedAU-K50"),
            rounds=300,
            eval_every=10,
            server_lr_multipliers=(1.0, 2.0, 4.0),
        )

    @classmethod
    def full(cls) -> FedAUConfig:
        """Both datasets, 1000 rounds, 3 seeds, all six methods (about an hour on 2 cores)."""
        return cls()


@dataclass
class MethodRun:
    """One method at one server rate: curves at every evaluation and the final-window means.

    `test_acc` is in %; `train_objective` is 1/N Σ_n (mean loss of client n).
    """

    method: str
    server_lr: float
    rounds: list[int]
    test_acc: list[float]
    train_objective: list[float]
    final_test_acc: float
    final_objective: float
    chosen: bool = False


@dataclass
class SettingResult:
    """One (dataset, pattern): every grid run, plus FedAU's weights against the true 1/p_n."""

    dataset: str
    pattern: str
    mean_participation: float
    probs: list[float]
    fedau_weights: list[float]
    runs: list[MethodRun] = field(default_factory=list)


@dataclass
class FedAUResult:
    seed: int
    rounds: int
    n_clients: int
    settings: list[SettingResult] = field(default_factory=list)


# --- data and models ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    train: FederatedDataset
    test: FederatedDataset | tuple[Tensor, Tensor]
    local_lr: float
    in_features: int


def _task(dataset: str, config: FedAUConfig, seed: int) -> _Task:
    if dataset == "digits":
        train, test_x, test_y = digits_federated(
            config.n_clients, config.dirichlet_alpha, seed=seed
        )
        return _Task(train, (test_x.float(), test_y), config.digits_local_lr, 64)
    train, test = fedprox_synthetic(
        config.synthetic_alpha, config.synthetic_beta, config.n_clients, seed=seed
    )
    return _Task(train, test, config.synthetic_local_lr, 60)


def _model(dataset: str, config: FedAUConfig, in_features: int) -> nn.Module:
    if dataset == "digits":
        return nn.Sequential(
            nn.Linear(in_features, config.hidden), nn.ReLU(), nn.Linear(config.hidden, N_CLASSES)
        )
    return nn.Linear(in_features, N_CLASSES)


def _owners(data: FederatedDataset) -> Tensor:
    return torch.repeat_interleave(torch.arange(data.n_clients), data.sizes)


@torch.no_grad()
def _client_mean(data: FederatedDataset, per_example: Tensor) -> float:
    """1/N Σ_n (mean of `per_example` over client n's rows): every client counts equally."""
    sums = torch.zeros(data.n_clients, dtype=torch.float64)
    sums.index_add_(0, _owners(data), per_example.double())
    return float((sums / data.sizes.double()).mean())


@torch.no_grad()
def _evaluate(
    model: nn.Module, x: Tensor, shapes: dict[str, Tensor], task: _Task
) -> tuple[float, float]:
    """(test accuracy in %, training objective 1/N Σ_n f_n(x)) of the flat parameters x."""
    params = unflatten(x, shapes)

    def forward(x: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (x,))

    train = task.train
    losses = F.cross_entropy(forward(train.features), train.labels, reduction="none")
    objective = _client_mean(train, losses)
    if isinstance(task.test, FederatedDataset):
        # Synthetic: per-user accuracy averaged over users, the weighting of the objective
        # (the union of test rows would be dominated by the few lognormal-large users)
        correct = forward(task.test.features).argmax(-1) == task.test.labels
        accuracy = _client_mean(task.test, correct)
    else:
        x, y = task.test
        accuracy = float((forward(x).argmax(-1) == y).double().mean())
    if not math.isfinite(objective):
        objective = math.inf  # a diverged run: never chosen, JSON-safe as a string below
    return 100.0 * accuracy, objective


def _process(pattern: str, probs: Tensor, config: FedAUConfig, seed: int) -> ParticipationProcess:
    if pattern == "bernoulli":
        return Bernoulli(probs, seed=seed)
    if pattern == "markov":
        return Markov(probs, rate=config.markov_rate, seed=seed)
    return Cyclic(probs, period=config.cyclic_period, seed=seed)


def _aggregator(method: str, probs: Tensor, server_lr: float, config: FedAUConfig) -> Aggregator:
    n = config.n_clients
    if method == "FedAU":
        return FedAU(n, cutoff=config.cutoff, server_lr=server_lr)
    if method == "FedAU-K50":
        return FedAU(n, cutoff=50, server_lr=server_lr)
    if method == "FedAvg-participants":
        return FedAvg(n, "participants", server_lr=server_lr)
    if method == "FedAvg-all":
        return FedAvg(n, "all", server_lr=server_lr)
    if method == "Known-p":
        return KnownParticipation(probs, server_lr=server_lr)
    return MIFA(n, server_lr=server_lr)


def base_server_lr(method: str, probs: Tensor) -> float:
    """1, except FedAvg over all clients: N / Σ p_n, so its expected step matches the others'."""
    if method == "FedAvg-all":
        return float(probs.numel() / probs.sum())
    return 1.0


# --- one setting -------------------------------------------------------------------------------


def run_setting(dataset: str, pattern: str, config: FedAUConfig, seed: int) -> SettingResult:
    """Every method on every server rate of the grid for one (dataset, pattern).

    All (method, rate) runs go through one :class:`FederatedSweep`: the same seeds give every
    run the same initial model, participation stream and minibatches (a paired comparison),
    and one vectorized call trains all runs' participants each round. A run whose training
    objective stops being finite is frozen there (its remaining evaluations would all be the
    same failure).
    """
    task = _task(dataset, config, seed)
    probs = heterogeneous_probabilities(task.train.label_histograms(N_CLASSES), seed=seed)
    setting = SettingResult(
        dataset=dataset,
        pattern=pattern,
        mean_participation=float(probs.mean()),
        probs=probs.tolist(),
        fedau_weights=[],
    )
    grid = [
        (method, base_server_lr(method, probs) * multiplier)
        for method in config.methods
        for multiplier in config.server_lr_multipliers
    ]
    with seeded(seed):
        model = _model(dataset, config, task.in_features)
    sweep = FederatedSweep(
        model,
        task.train,
        [_aggregator(method, probs, lr, config) for method, lr in grid],
        _process(pattern, probs, config, seed + 1),
        LocalTraining(
            "sgd", lr=task.local_lr, steps=config.local_steps, batch_size=config.batch_size
        ),
        eval_every=config.rounds + 1,  # we evaluate ourselves (train objective as well)
        seed=seed + 2,
    )
    curves: list[tuple[list[int], list[float], list[float]]] = [([], [], []) for _ in grid]
    for r in range(config.eval_every, config.rounds + 1, config.eval_every):
        sweep.run(r)
        for i in sweep.active.nonzero().flatten().tolist():
            acc, objective = _evaluate(model, sweep.xs[i], sweep.shapes, task)
            rounds, accs, objectives = curves[i]
            rounds.append(r)
            accs.append(acc)
            objectives.append(objective)
            if not math.isfinite(objective):
                sweep.stop(i)  # diverged
        if not bool(sweep.active.any()):
            break
    window = config.final_window
    for i, (method, server_lr) in enumerate(grid):
        rounds, accs, objectives = curves[i]
        diverged = not math.isfinite(objectives[-1])
        setting.runs.append(
            MethodRun(
                method=method,
                server_lr=server_lr,
                rounds=rounds,
                test_acc=accs,
                train_objective=[o if math.isfinite(o) else 1e30 for o in objectives],
                final_test_acc=sum(accs[-window:]) / len(accs[-window:]),
                final_objective=(
                    1e30 if diverged else sum(objectives[-window:]) / len(accs[-window:])
                ),
            )
        )
    for method in config.methods:
        candidates = [run_ for run_ in setting.runs if run_.method == method]
        min(candidates, key=lambda c: c.final_objective).chosen = True
    if "FedAU" in config.methods:
        # the interval means (the weights FedAU would give now); the participation stream is
        # the same for every rate, so any rate's estimate is the same
        w = sweep.aggregators[[m for m, _ in grid].index("FedAU")].weights
        mean = w.interval_sum / w.interval_count.clamp(min=1)
        setting.fedau_weights = torch.where(w.interval_count > 0, mean, 0.0).tolist()
    return setting


def run(config: FedAUConfig, seed: int) -> FedAUResult:
    """All (dataset, pattern) settings for one seed, each a resumable stage."""
    result = FedAUResult(seed=seed, rounds=config.rounds, n_clients=config.n_clients)
    settings = [(d, p) for d in config.datasets for p in config.patterns]
    with torch_threads(config.num_threads):
        for dataset, pattern in progress(settings, desc=f"seed {seed} fedau"):
            stage = cached_stage(
                f"{dataset}-{pattern}",
                lambda d=dataset, p=pattern: asdict(run_setting(d, p, config, seed)),
            )
            runs = [MethodRun(**r) for r in stage.pop("runs")]
            result.settings.append(SettingResult(**stage, runs=runs))
    return result


def _register() -> None:
    from meanwise.experiments import fedau_report as report
    from meanwise.experiments.registry import register_reproduction

    register_reproduction(
        "fedau",
        "FedAU: federated averaging under unknown, heterogeneous participation",
        FedAUConfig,
        run,
        report,
    )


_register()
