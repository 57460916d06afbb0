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
    FederatedSimulator,
    KnownParticipation,
    LocalTraining,
    Markov,
    ParticipationProcess,
    heterogeneous_probabilities,
)
from meanwise.federated.simulator import flatten, unflatten
from meanwise.functional.local_training import draw_batches

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
    "BatchedSGDSimulator",
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
def _evaluate(model: nn.Module, sim: FederatedSimulator, task: _Task) -> tuple[float, float]:
    """(test accuracy in %, training objective 1/N Σ_n f_n(x))."""
    params = unflatten(sim.x, sim.shapes)

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


# --- a faster local-training path for stacks of Linear layers ------------------------------


def _stacked_forward(module: nn.Module, params: dict[str, Tensor], x: Tensor, prefix: str = ""):
    """``module`` applied to ``x [S, B, in]`` with client-stacked ``params[name]: [S, ...]``."""
    if isinstance(module, nn.Linear):
        weight = params[f"{prefix}weight"]
        out = torch.bmm(x, weight.transpose(1, 2))
        bias = params.get(f"{prefix}bias")
        return out if bias is None else out + bias[:, None, :]
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            x = _stacked_forward(child, params, x, f"{prefix}{name}.")
        return x
    if isinstance(module, nn.ReLU | nn.Tanh):
        return module(x)
    raise TypeError(f"BatchedSGDSimulator supports Linear/ReLU/Tanh stacks; got {module}")


class BatchedSGDSimulator(FederatedSimulator):
    """`FederatedSimulator` whose local SGD on Linear/ReLU/Tanh stacks runs as batched matmuls.

    For models this small, ``vmap(grad(...))`` costs milliseconds of dispatch per local step,
    which made the grid of this experiment take minutes per setting. Stacking the clients'
    weights and differentiating the *sum* of the per-client losses gives every client's own
    gradient (the clients share no parameters) with a handful of ``bmm`` calls. Same minibatch
    draw (`draw_batches`, same generator), same masking of clients whose steps are spent, same
    result as the library's vectorized path up to float rounding (tested); participation,
    aggregation and checkpoints are the parent's. Plain SGD, optionally with L2 weight decay
    (``LocalTraining("sgd", options={"weight_decay": wd})``, the library rule's g + wd·p).
    """

    def local_updates(self, clients: Tensor, steps: Tensor, starts: Tensor) -> Tensor:
        if self.local.rule != "sgd" or set(self.local.options) - {"weight_decay"}:
            raise ValueError(
                "BatchedSGDSimulator runs plain SGD only (rule='sgd', options: weight_decay)"
            )
        decay = float(self.local.options.get("weight_decay", 0.0))
        index, valid = draw_batches(
            self.train, clients, int(steps.max()), self.local.batch_size, self.generator
        )
        current = {k: v.clone() for k, v in unflatten(starts, self.shapes).items()}
        weight = valid.to(starts.dtype)
        counts = weight.sum(-1)  # [K, S]
        for k in range(int(steps.max())):
            leaves = {n: p.requires_grad_(True) for n, p in current.items()}
            x = self.train.features.index_select(0, index[k].reshape(-1))
            y = self.train.labels.index_select(0, index[k].reshape(-1))
            logits = _stacked_forward(self.model, leaves, x.view(*index[k].shape, -1))
            per_example = self.loss_fn(logits.flatten(0, 1), y, reduction="none")
            # the sum over clients of each client's mean minibatch loss
            loss = ((per_example.view_as(weight[k]) * weight[k]).sum(-1) / counts[k]).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
            active = (k < steps).to(starts.dtype)
            with torch.no_grad():
                current = {
                    n: p.detach()
                    - self.local.lr
                    * active.view(-1, *[1] * (g.dim() - 1))
                    * (g + decay * p.detach() if decay else g)
                    for (n, p), g in zip(leaves.items(), grads, strict=True)
                }
        return flatten(current, batch_dims=1)


# --- one setting -------------------------------------------------------------------------------


def _train(
    method: str,
    server_lr: float,
    task: _Task,
    probs: Tensor,
    dataset: str,
    pattern: str,
    config: FedAUConfig,
    seed: int,
) -> tuple[MethodRun, Aggregator]:
    # Same seeds for every method and rate: identical init, participation and minibatches
    with seeded(seed):
        model = _model(dataset, config, task.in_features)
    sim = BatchedSGDSimulator(
        model,
        task.train,
        _aggregator(method, probs, server_lr, config),
        _process(pattern, probs, config, seed + 1),
        LocalTraining(
            "sgd", lr=task.local_lr, steps=config.local_steps, batch_size=config.batch_size
        ),
        eval_every=config.rounds + 1,  # we evaluate ourselves (train objective as well)
        seed=seed + 2,
    )
    rounds, accs, objectives = [], [], []
    for r in range(config.eval_every, config.rounds + 1, config.eval_every):
        sim.run(r)
        acc, objective = _evaluate(model, sim, task)
        rounds.append(r)
        accs.append(acc)
        objectives.append(objective)
        if not math.isfinite(objective):
            break  # diverged: the remaining evaluations would all be the same failure
    window = config.final_window
    diverged = not math.isfinite(objectives[-1])
    return (
        MethodRun(
            method=method,
            server_lr=server_lr,
            rounds=rounds,
            test_acc=accs,
            train_objective=[o if math.isfinite(o) else 1e30 for o in objectives],
            final_test_acc=sum(accs[-window:]) / len(accs[-window:]),
            final_objective=1e30 if diverged else sum(objectives[-window:]) / len(accs[-window:]),
        ),
        sim.aggregator,
    )


def run_setting(dataset: str, pattern: str, config: FedAUConfig, seed: int) -> SettingResult:
    """Every method on every server rate of the grid for one (dataset, pattern)."""
    task = _task(dataset, config, seed)
    probs = heterogeneous_probabilities(task.train.label_histograms(N_CLASSES), seed=seed)
    setting = SettingResult(
        dataset=dataset,
        pattern=pattern,
        mean_participation=float(probs.mean()),
        probs=probs.tolist(),
        fedau_weights=[],
    )
    for method in config.methods:
        base = base_server_lr(method, probs)
        candidates = []
        for multiplier in config.server_lr_multipliers:
            run_, aggregator = _train(
                method, base * multiplier, task, probs, dataset, pattern, config, seed
            )
            candidates.append(run_)
            if method == "FedAU" and not setting.fedau_weights:
                # the interval means (the weights FedAU would give now); the participation
                # stream is the same for every rate, so any rate's estimate is the same
                w = aggregator.weights
                mean = w.interval_sum / w.interval_count.clamp(min=1)
                setting.fedau_weights = torch.where(w.interval_count > 0, mean, 0.0).tolist()
        best = min(candidates, key=lambda c: c.final_objective)
        best.chosen = True
        setting.runs.extend(candidates)
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
