"""Experiment `afa`: anarchic federated averaging (AFA-CD, AFA-CS) against FedAvg on raw deltas.

The setting of Yang et al. (ICML 2022), on this machine: M workers, each holding one user of
FedProx's Synthetic(1, 1) (strongly heterogeneous data), train multinomial logistic regression
(convex, so the minimum f* of the uniform objective f = 1/M Σ_i f_i is computed exactly by
full-batch L-BFGS and every method is measured by its excess objective f(x) − f*). Workers are
anarchic (`meanwise.federated.Anarchic`): each has its own fixed number of local SGD steps
K_i ~ U{1..K_max}, its own speed (seconds per step, lognormal) and its own idle time
(exponential with a lognormal mean), so arrivals are non-uniform across workers; a round closes
after m arrivals, and a worker may return an update computed on a model up to `max_staleness`
versions old.

Methods: AFA-CD (mean of the round's step-normalized updates), AFA-CS (mean of every worker's
latest step-normalized update) and FedAvg over the round's raw deltas (which weights a worker
by K_i times its arrival frequency). Server rates: FedAvg's base is 1 and the AFA rules' base is
η_L·(K_max + 1)/2 / η_L, i.e. (K_max + 1)/2, so that their expected step matches FedAvg's; each
method's rate is chosen per seed from `server_lr_multipliers` times its base by the lowest final
excess objective. The speedup part runs AFA-CD for every m in `speedup_arrivals` with the
server rate scaled by sqrt(m / m_main) (the paper's corollary takes η ∝ sqrt(m·K)) and counts
the rounds until the excess objective first falls below `speedup_target` times its initial value.

The report side is in `afa_report`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.experiments.base import cached_stage, progress, seeded, torch_threads
from meanwise.experiments.fedau import _client_mean
from meanwise.federated import (
    AFA_CD,
    AFA_CS,
    Aggregator,
    Anarchic,
    FedAvg,
    FederatedSimulator,
    LocalTraining,
)
from meanwise.federated.simulator import flatten, unflatten

__all__ = ["AFAConfig", "AFAResult", "AFARun", "METHODS", "run", "optimum"]

METHODS: tuple[str, ...] = ("AFA-CD", "AFA-CS", "FedAvg")
N_CLASSES = 10
DIM = 60


@dataclass(frozen=True)
class AFAConfig:
    """Settings; `quick()` fits in about 2.5 minutes on 2 cores for 2 seeds."""

    seeds: int = 3
    methods: tuple[str, ...] = METHODS
    n_workers: int = 20
    arrivals_per_round: int = 4
    max_local_steps: int = 10
    max_staleness: int = 10
    rounds: int = 1500
    batch_size: int = 16
    local_lr: float = 0.05
    weight_decay: float = 1e-3  # L2: a unique, finite minimum (the pooled data is separable)
    server_lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    speed_spread: float = 0.5  # std of log(seconds per step) across workers
    idle_spread: float = 0.5  # std of log(mean idle time) across workers
    speedup_arrivals: tuple[int, ...] = (1, 2, 4, 8)
    speedup_target: float = 0.1
    eval_every: int = 25
    final_window: int = 8
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    num_threads: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {self.methods}")
        if not 1 <= self.arrivals_per_round <= self.n_workers:
            raise ValueError(
                f"arrivals_per_round must lie in [1, n_workers={self.n_workers}]; "
                f"got {self.arrivals_per_round}"
            )
        if any(not 1 <= m <= self.n_workers for m in self.speedup_arrivals):
            raise ValueError(f"speedup_arrivals must lie in [1, {self.n_workers}]")
        if self.seeds < 1 or self.rounds < self.eval_every or self.eval_every < 1:
            raise ValueError("seeds >= 1 and rounds >= eval_every >= 1 are required")
        if not self.server_lr_multipliers or min(self.server_lr_multipliers) <= 0:
            raise ValueError("server_lr_multipliers must be a non-empty tuple of positive rates")

    @classmethod
    def quick(cls) -> AFAConfig:
        """600 rounds, 2 seeds, speedup for m in (1, 2, 4, 8): about 2.5 minutes on 2 cores."""
        return cls(seeds=2, rounds=600, eval_every=20, final_window=5)

    @classmethod
    def full(cls) -> AFAConfig:
        """1500 rounds, 3 seeds (about 10 minutes on 2 cores)."""
        return cls()


@dataclass
class AFARun:
    """One method (or one m of the speedup part): excess objective and test accuracy curves."""

    method: str
    arrivals_per_round: int
    server_lr: float
    rounds: list[int]
    excess: list[float]
    test_acc: list[float]
    final_excess: float
    final_test_acc: float
    tail_average_excess: float = 0.0  # f − f* at the mean of the second half's snapshots
    rounds_to_target: int | None = None  # None: never reached within the run
    chosen: bool = False


@dataclass
class AFAResult:
    seed: int
    n_workers: int
    optimum: float
    initial_excess: float
    arrival_counts: list[int]
    local_steps: list[int]
    mean_staleness: float
    predicted_bias: dict[str, float] = field(default_factory=dict)
    runs: list[AFARun] = field(default_factory=list)
    speedup: list[AFARun] = field(default_factory=list)


def _penalty(flat: torch.Tensor, weight_decay: float) -> float:
    # the local rule's g + wd·p is the gradient of wd/2·|p|², on weight and bias alike
    return 0.5 * weight_decay * float(flat.double().square().sum())


def optimum(
    train: FederatedDataset,
    weight_decay: float,
    client_weights: torch.Tensor | None = None,
    iterations: int = 200,
) -> float:
    """The uniform objective f = 1/M Σ_i (mean CE on worker i) + wd/2·|(W, b)|² at the minimizer
    of the ``client_weights``-weighted objective (uniform if None, giving f*): full-batch
    L-BFGS in float64 (strongly convex, so the minimizer is unique).

    With weights ∝ a worker's arrival frequency this is where AFA-CD's fixed point sits (up to
    staleness), with weights ∝ arrivals·K_i FedAvg-on-raw-deltas': their heterogeneity bias.
    """
    x, y = train.features.double(), train.labels
    weight = torch.zeros(N_CLASSES, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(N_CLASSES, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-10
    )
    owners = torch.repeat_interleave(torch.arange(train.n_clients), train.sizes)
    w = torch.ones(train.n_clients, dtype=torch.float64)
    if client_weights is not None:
        w = torch.as_tensor(client_weights, dtype=torch.float64)
    scale = (w / w.sum())[owners] / train.sizes.double()[owners]

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(x @ weight.T + bias, y, reduction="none") * scale).sum()
        loss = loss + 0.5 * weight_decay * (weight.square().sum() + bias.square().sum())
        loss.backward()
        return loss

    for _ in range(5):  # L-BFGS restarts until the objective stops moving
        opt.step(closure)
    with torch.no_grad():
        per_example = F.cross_entropy(x @ weight.T + bias, y, reduction="none")
        flat = torch.cat([weight.reshape(-1), bias])
    return _client_mean(train, per_example) + _penalty(flat, weight_decay)


def _workers(config: AFAConfig, seed: int, arrivals: int) -> Anarchic:
    g = torch.Generator().manual_seed(seed + 7)
    step_times = torch.exp(config.speed_spread * torch.randn(config.n_workers, generator=g))
    idle_means = torch.exp(config.idle_spread * torch.randn(config.n_workers, generator=g))
    return Anarchic(
        config.n_workers,
        arrivals,
        config.max_local_steps,
        local_steps="per_worker",
        step_times=step_times.double() * 0.2,
        idle_means=idle_means.double(),
        max_staleness=config.max_staleness,
        seed=seed + 1,
    )


def _aggregator(method: str, server_lr: float, config: AFAConfig, arrivals: int) -> Aggregator:
    m = config.n_workers
    if method == "AFA-CD":
        return AFA_CD(m, server_lr, config.local_lr, arrivals)
    if method == "AFA-CS":
        return AFA_CS(m, server_lr, config.local_lr, arrivals)
    return FedAvg(m, "participants", server_lr=server_lr)


def base_server_lr(method: str, config: AFAConfig) -> float:
    """FedAvg 1; AFA (K_max + 1)/2, the mean K, so the expected steps match."""
    return 1.0 if method == "FedAvg" else (config.max_local_steps + 1) / 2


def _train(
    method: str,
    server_lr: float,
    arrivals: int,
    train: FederatedDataset,
    test: FederatedDataset,
    f_star: float,
    config: AFAConfig,
    seed: int,
) -> tuple[AFARun, FederatedSimulator]:
    with seeded(seed):
        model = nn.Linear(DIM, N_CLASSES)
    with warnings.catch_warnings():
        # the simulator warns that FedAvg ignores step counts: that is this baseline's point
        warnings.simplefilter("ignore")
        # a Linear model: the simulator trains it with batched matmuls (train_stacked)
        sim = FederatedSimulator(
            model,
            train,
            _aggregator(method, server_lr, config, arrivals),
            _workers(config, seed, arrivals),
            LocalTraining(
                "sgd",
                lr=config.local_lr,
                steps=1,  # unused: every anarchic arrival brings its own step count
                batch_size=config.batch_size,
                options={"weight_decay": config.weight_decay},
            ),
            eval_every=config.rounds + 1,
            seed=seed + 2,
        )

    def evaluate() -> tuple[float, float]:
        params = unflatten(sim.x, sim.shapes)
        with torch.no_grad():
            logits = torch.func.functional_call(model, params, (train.features,))
            loss = F.cross_entropy(logits, train.labels, reduction="none")
            correct = torch.func.functional_call(model, params, (test.features,)).argmax(-1)
        objective = _client_mean(train, loss) + _penalty(sim.x, config.weight_decay)
        accuracy = 100.0 * _client_mean(test, correct == test.labels)
        return (objective - f_star if math.isfinite(objective) else 1e30), accuracy

    initial, _ = evaluate()
    rounds, excess, accs = [], [], []
    # Snapshots of x over the second half, averaged: the iterate average removes most of the
    # constant-rate noise floor and keeps what does not average out, the bias of the fixed point
    tail_sum, tail_count = torch.zeros_like(sim.x, dtype=torch.float64), 0
    reached = None
    for r in range(config.eval_every, config.rounds + 1, config.eval_every):
        sim.run(r)
        e, a = evaluate()
        rounds.append(r)
        excess.append(e)
        accs.append(a)
        if reached is None and e <= config.speedup_target * initial:
            reached = r
        if 2 * r > config.rounds:
            tail_sum += sim.x.double()
            tail_count += 1
        if e >= 1e30:
            break
    w = config.final_window
    tail_excess = 1e30
    if tail_count and excess[-1] < 1e30:
        final_x = sim.x
        sim.x = (tail_sum / tail_count).to(final_x.dtype)
        tail_excess = evaluate()[0]
        sim.x = final_x
    return (
        AFARun(
            method=method,
            arrivals_per_round=arrivals,
            server_lr=server_lr,
            rounds=rounds,
            excess=excess,
            test_acc=accs,
            final_excess=sum(excess[-w:]) / len(excess[-w:]),
            final_test_acc=sum(accs[-w:]) / len(accs[-w:]),
            rounds_to_target=reached,
            tail_average_excess=tail_excess,
        ),
        sim,
    )


def _arrival_statistics(config: AFAConfig, seed: int, rounds: int) -> tuple[list[int], float]:
    """Arrivals per worker over `rounds` rounds and the mean staleness (no training needed:
    the anarchic process does not depend on the model)."""
    workers = _workers(config, seed, config.arrivals_per_round)
    counts = torch.zeros(config.n_workers, dtype=torch.long)
    staleness = 0.0
    for _ in range(rounds):
        arrivals = workers.next_round()
        counts[arrivals.workers] += 1
        staleness += float(arrivals.staleness.double().mean())
    return counts.tolist(), staleness / rounds


def run(config: AFAConfig, seed: int) -> AFAResult:
    """The method comparison (each method's rate grid) and the speedup in m, one seed."""
    train, test = fedprox_synthetic(
        config.synthetic_alpha, config.synthetic_beta, config.n_workers, seed=seed
    )
    with torch_threads(config.num_threads):
        f_star = cached_stage("optimum", lambda: {"value": optimum(train, config.weight_decay)})[
            "value"
        ]
        counts, staleness = _arrival_statistics(config, seed, config.rounds)
        with seeded(seed):
            model = nn.Linear(DIM, N_CLASSES)
        x0 = flatten({k: v.detach() for k, v in model.named_parameters()})
        with torch.no_grad():
            loss = F.cross_entropy(
                torch.func.functional_call(
                    model, unflatten(x0, dict(model.named_parameters())), (train.features,)
                ),
                train.labels,
                reduction="none",
            )
        result = AFAResult(
            seed=seed,
            n_workers=config.n_workers,
            optimum=f_star,
            initial_excess=_client_mean(train, loss) + _penalty(x0, config.weight_decay) - f_star,
            arrival_counts=counts,
            local_steps=_workers(config, seed, 1).fixed_steps.tolist(),
            mean_staleness=staleness,
        )
        steps = torch.tensor(result.local_steps, dtype=torch.float64)
        arrivals = torch.tensor(counts, dtype=torch.float64)
        result.predicted_bias = cached_stage(
            "predicted-bias",
            lambda: {
                "AFA-CD": optimum(train, config.weight_decay, arrivals) - f_star,
                "AFA-CS": 0.0,
                "FedAvg": optimum(train, config.weight_decay, arrivals * steps) - f_star,
            },
        )
        m_main = config.arrivals_per_round
        chosen_lr: dict[str, float] = {}
        for method in progress(config.methods, desc=f"seed {seed} afa methods"):

            def compare(method: str = method) -> dict:
                runs = [
                    asdict(
                        _train(
                            method,
                            base_server_lr(method, config) * mult,
                            m_main,
                            train,
                            test,
                            f_star,
                            config,
                            seed,
                        )[0]
                    )
                    for mult in config.server_lr_multipliers
                ]
                min(runs, key=lambda run_: run_["final_excess"])["chosen"] = True
                return {"runs": runs}

            runs = [AFARun(**r) for r in cached_stage(f"method-{method}", compare)["runs"]]
            result.runs.extend(runs)
            chosen_lr[method] = next(r.server_lr for r in runs if r.chosen)
        if "AFA-CD" in chosen_lr:
            for m in progress(config.speedup_arrivals, desc=f"seed {seed} afa speedup"):
                lr = chosen_lr["AFA-CD"] * math.sqrt(m / m_main)
                stage = cached_stage(
                    f"speedup-m{m}",
                    lambda m=m, lr=lr: asdict(
                        _train("AFA-CD", lr, m, train, test, f_star, config, seed)[0]
                    ),
                )
                result.speedup.append(AFARun(**stage))
    return result


def _register() -> None:
    from meanwise.experiments import afa_report as report
    from meanwise.experiments.registry import register_reproduction

    register_reproduction(
        "afa",
        "Anarchic federated averaging: AFA-CD and AFA-CS vs FedAvg on raw deltas",
        AFAConfig,
        run,
        report,
    )


_register()
