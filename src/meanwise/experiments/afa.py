"""Experiment `afa`: anarchic federated averaging (AFA-CD, AFA-CS) against FedAvg on raw deltas.

The setting of Yang, Zhang, Khanduri & Liu (ICML 2022), on this machine: M workers, each
holding one user of FedProx's Synthetic(1, 1) (strongly heterogeneous data), train multinomial
logistic regression (convex, so the minimum f* of the uniform objective f = 1/M Σ_i f_i is
computed exactly by full-batch L-BFGS and every method is measured by its excess objective
f(x) − f*). Workers are anarchic (`meanwise.federated.Anarchic`): each has its own fixed number
of local SGD steps K_i ~ U{1..K_max}, its own speed (seconds per step, lognormal) and its own
idle time (exponential with a lognormal mean), so arrivals are non-uniform across workers; a
round closes after m arrivals. Delays are bounded as the paper assumes: a round waits for a
worker whose update has reached `max_staleness` versions of delay, so every worker arrives
(discarding stale updates instead is the opt-in `discard_stale`, which can starve slow workers).

Methods: AFA-CD (mean of the round's step-normalized updates), AFA-CS (mean of every worker's
latest step-normalized update) and FedAvg over the round's raw deltas (which weights a worker
by K_i times its arrival frequency). Server rates: FedAvg's base is 1 and the AFA rules' base
is (K_max + 1)/2, the mean K, so that their expected steps match; every rate is halved every
`lr_halving` rounds and the model measured is the average of the iterates of the last
`average_rounds` rounds. Both remove most of the stochastic noise floor, so what stays is each
rule's fixed-point bias (at a fixed rate the noise floor was ~10× the CD-vs-CS difference).
A round that waited for a worker at the delay bound holds more than m arrivals. The speedup
part runs AFA-CD for every m in `speedup_arrivals` with the server rate scaled by
sqrt(m / m_main) (the paper's corollary takes η ∝ sqrt(m·K)) and counts the rounds until the
excess objective first falls below `speedup_target` times its initial value.

Predicted bias: each rule's expected direction vanishes where Σ_i w_i ∇f_i(x) (+ frozen
memory) = 0, i.e. at the minimizer of Σ_i w_i f_i (+ a linear term). The weights: AFA-CD the
per-round arrival shares Σ_t 1[i ∈ S_t]/|S_t|, FedAvg those times K_i, AFA-CS 1 for every
worker whose memory is live. AFA-CS is not bias-free by construction: a worker never accepted
(starved, possible only with `discard_stale`) keeps an empty memory (weight 0), and one not
accepted during the averaging window contributes its frozen memory entry, a constant vector
(a linear term). The predicted bias is f(x̂) − f* at that minimizer x̂. It leaves out the local
drift of K_i > 1 steps at a fixed η_L (a first-order correction x_w − H_w⁻¹·drift was tried and
disagreed ~10× with the iterated fixed point: the drift's Jacobian matters in the flat
directions of H, eigenvalues ~wd) and the lag of live-but-stale memory entries; the report
shows predicted against measured, so what the prediction leaves out is visible.

All runs of one seed advance together in `_simulate`: the anarchic arrivals come from
`Anarchic`, the minibatches from `draw_batches` (the simulator's generator and order), local SGD
is the closed-form softmax-regression gradient batched over every arrival of every run, and
the library's aggregators make each step; `tests/federated/test_afa_experiment.py` checks it
against `FederatedSimulator`. The report side is in `afa_report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.engine import ParameterLayout, draw_batches
from meanwise.experiments.afa_results import AFAResult, AFARun
from meanwise.experiments.base import cached_stage, seeded, torch_threads
from meanwise.experiments.fedau import client_mean
from meanwise.federated import AFACD, AFACS, Aggregator, Anarchic, FedAvg

__all__ = [
    "AFAConfig",
    "AFAResult",
    "AFARun",
    "METHODS",
    "run",
    "optimum",
    "minimizer",
    "predicted_fixed_point",
    "objective",
]

METHODS: tuple[str, ...] = ("AFA-CD", "AFA-CS", "FedAvg")
N_CLASSES = 10
DIM = 60


@dataclass(frozen=True)
class AFAConfig:
    """Settings; `quick()` runs 6 seeds in about 2.6 minutes on 2 quiet cores."""

    seeds: int = 8
    methods: tuple[str, ...] = METHODS
    n_workers: int = 20
    arrivals_per_round: int = 4
    max_local_steps: int = 10
    max_staleness: int = 10
    discard_stale: bool = False  # the paper bounds delays; discarding is not in it
    rounds: int = 2000
    lr_halving: int = 500  # server rate halved every this many rounds
    average_rounds: int = 500  # the model measured: mean of the last rounds' iterates
    batch_size: int = 16
    local_lr: float = 0.05
    weight_decay: float = 1e-3  # L2: a unique, finite minimum (the pooled data is separable)
    server_lr_multipliers: tuple[float, ...] = (1.0,)
    speed_spread: float = 1.0  # std of log(seconds per step) across workers
    idle_spread: float = 1.0  # std of log(mean idle time) across workers
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
        if not 1 <= self.average_rounds <= self.rounds:
            raise ValueError(f"average_rounds must lie in [1, rounds]; got {self.average_rounds}")
        if self.lr_halving < 1:
            raise ValueError(f"lr_halving must be >= 1; got {self.lr_halving}")
        if self.max_staleness < 0 or self.max_local_steps < 1:
            raise ValueError("max_staleness >= 0 and max_local_steps >= 1 are required")
        if not self.server_lr_multipliers or min(self.server_lr_multipliers) <= 0:
            raise ValueError("server_lr_multipliers must be a non-empty tuple of positive rates")

    @classmethod
    def quick(cls) -> AFAConfig:
        """6 seeds, 1500 rounds (rate halved at 500 and 1000), one rate: ~2.6 minutes of CPU
        on 2 cores (1000 rounds leave the last-phase noise at the size of the bias)."""
        return cls(seeds=6, rounds=1500, average_rounds=500, eval_every=25, final_window=4)

    @classmethod
    def full(cls) -> AFAConfig:
        """12 seeds, 3000 rounds (rate halved every 500), one rate (a per-arm grid would pick
        each arm's rate on the metric the claims compare): ~11 minutes of CPU on 2 cores."""
        return cls(seeds=12, rounds=3000, average_rounds=500, eval_every=50)


# --- the objective, its minimizers and the predicted fixed points --------------------------------


def _owners(train: FederatedDataset) -> Tensor:
    return torch.repeat_interleave(torch.arange(train.n_clients), train.sizes)


def _split(flat: Tensor) -> tuple[Tensor, Tensor]:
    """nn.Linear's flat parameters (weight then bias, named_parameters order) as (W, b)."""
    lead = flat.shape[:-1]
    return flat[..., : N_CLASSES * DIM].reshape(*lead, N_CLASSES, DIM), flat[..., N_CLASSES * DIM :]


def _penalty(flat: Tensor, weight_decay: float) -> float:
    # the local rule's g + wd·p is the gradient of wd/2·|p|², on weight and bias alike
    return 0.5 * weight_decay * float(flat.double().square().sum())


@torch.no_grad()
def objective(train: FederatedDataset, weight_decay: float, flat: Tensor) -> float:
    """f(x) = 1/M Σ_i (mean CE on worker i) + wd/2·|x|² at the flat parameters ``flat``."""
    weight, bias = _split(flat.double())
    loss = F.cross_entropy(
        train.features.double() @ weight.T + bias, train.labels, reduction="none"
    )
    return client_mean(train, loss) + _penalty(flat, weight_decay)


def _weighted(train: FederatedDataset, weight_decay: float, weights: Tensor):
    """Σ_i w_i f_i over (W, b) in float64 (w as given: normalize for a mean)."""
    x, y = train.features.double(), train.labels
    owners = _owners(train)
    scale = weights[owners] / train.sizes.double()[owners]

    def value(weight: Tensor, bias: Tensor) -> Tensor:
        ce = F.cross_entropy(x @ weight.T + bias, y, reduction="none")
        penalty = weight.square().sum() + bias.square().sum()
        return (ce * scale).sum() + weights.sum() * 0.5 * weight_decay * penalty

    return value


def _minimize(value, start: Tensor | None = None, iterations: int = 200) -> Tensor:
    init = torch.zeros(N_CLASSES * DIM + N_CLASSES, dtype=torch.float64)
    if start is not None:
        init = start.double()
    weight, bias = (t.clone().requires_grad_(True) for t in _split(init))
    opt = torch.optim.LBFGS(
        [weight, bias], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-10
    )

    def closure():
        opt.zero_grad()
        loss = value(weight, bias)
        loss.backward()
        return loss

    for _ in range(5):  # L-BFGS restarts until the objective stops moving
        opt.step(closure)
    return torch.cat([weight.detach().reshape(-1), bias.detach()])


def minimizer(
    train: FederatedDataset, weight_decay: float, client_weights: Tensor | None = None
) -> Tensor:
    """argmin of Σ_i w_i f_i (uniform w if None, giving x*): full-batch L-BFGS in float64
    (strongly convex, so the minimizer is unique)."""
    w = torch.ones(train.n_clients, dtype=torch.float64)
    if client_weights is not None:
        w = torch.as_tensor(client_weights, dtype=torch.float64)
    return _minimize(_weighted(train, weight_decay, w / w.sum()))


def optimum(
    train: FederatedDataset, weight_decay: float, client_weights: Tensor | None = None
) -> float:
    """The uniform objective f at the minimizer of the ``client_weights``-weighted objective
    (uniform if None: f*)."""
    return objective(train, weight_decay, minimizer(train, weight_decay, client_weights))


def predicted_fixed_point(
    train: FederatedDataset,
    weight_decay: float,
    weights: Tensor,
    frozen: Tensor | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """Where a rule's expected direction vanishes, Σ_i w_i ∇f_i(x) + frozen = 0: the
    minimizer of Σ_i w_i f_i + ⟨frozen, x⟩ (L-BFGS; ``start``, e.g. x*, warm-starts it).

    ``weights`` ``[M]`` as the rule weights workers in expectation; ``frozen`` (AFA-CS) the sum
    of the memory entries that no longer change, in the direction's units (average gradients).
    Local drift (K_i > 1 steps at η_L) is left out: see the module docstring.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    base = _weighted(train, weight_decay, w)
    if frozen is None:
        return _minimize(base, start)
    c = frozen.double()

    def value(weight: Tensor, bias: Tensor) -> Tensor:
        return base(weight, bias) + c @ torch.cat([weight.reshape(-1), bias])

    return _minimize(value, start)


# --- the batched simulation of one seed ----------------------------------------------------------


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
        discard_stale=config.discard_stale,
        seed=seed + 1,
    )


def _aggregator(method: str, server_lr: float, config: AFAConfig, arrivals: int) -> Aggregator:
    m = config.n_workers
    if method == "AFA-CD":
        return AFACD(m, server_lr, config.local_lr, arrivals)
    if method == "AFA-CS":
        return AFACS(m, server_lr, config.local_lr, arrivals)
    return FedAvg(m, "participants", server_lr=server_lr)


def base_server_lr(method: str, config: AFAConfig) -> float:
    """FedAvg 1; AFA (K_max + 1)/2, the mean K, so the expected steps match."""
    return 1.0 if method == "FedAvg" else (config.max_local_steps + 1) / 2


def server_lr_at(base: float, round_index: int, config: AFAConfig) -> float:
    """The rate of round ``round_index`` (0-based): ``base`` halved every lr_halving rounds."""
    return base * 0.5 ** (round_index // config.lr_halving)


def local_sgd(
    starts: Tensor,
    train: FederatedDataset,
    index: Tensor,
    valid: Tensor,
    steps: Tensor,
    lr: float,
    weight_decay: float,
) -> Tensor:
    """K_j steps of minibatch SGD (L2 ``weight_decay``) on softmax regression for every row.

    ``starts`` ``[L, P]`` flat nn.Linear parameters, ``index``/``valid`` ``[K, L, B]`` from
    :func:`draw_batches`, ``steps`` ``[L]``: row j stops after ``steps[j]`` steps. The loss of a
    step is the mean cross entropy over the valid rows, its gradient (softmax − one-hot)ᵀ·x̃
    with x̃ = (x, 1), so weight and bias move as one ``[L, C, D + 1]`` matrix.
    """
    n = starts.shape[0]
    weight, bias = _split(starts)
    theta = torch.cat([weight, bias[..., None]], 2)  # [L, C, D + 1]
    features = torch.cat([train.features, torch.ones_like(train.features[:, :1])], 1)
    x = features[index]  # [K, L, B, D + 1], gathered once for every step
    target = F.one_hot(train.labels[index], N_CLASSES).to(x.dtype)
    w = valid.to(x.dtype)
    w = (w / w.sum(2, keepdim=True))[..., None]
    rate = lr * (torch.arange(index.shape[0])[:, None] < steps).to(x.dtype)  # [K, L]
    for k in range(index.shape[0]):
        residual = (torch.bmm(x[k], theta.transpose(1, 2)).softmax(-1) - target[k]) * w[k]
        grad = torch.bmm(residual.transpose(1, 2), x[k]) + weight_decay * theta
        theta = theta - rate[k][:, None, None] * grad
    return torch.cat([theta[..., :DIM].reshape(n, -1), theta[..., DIM]], 1)


@dataclass
class _Run:
    method: str
    arrivals: int
    base_lr: float
    aggregator: Aggregator
    x: Tensor
    history: list[Tensor]
    tail_sum: Tensor
    tail_count: int = 0
    rounds: list[int] = field(default_factory=list)
    excess: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    reached: int | None = None
    diverged: bool = False


@dataclass
class _Arrivals:
    """What the main m's arrival process did (the bias prediction's weights)."""

    counts: Tensor
    shares: Tensor  # Σ_t 1[i ∈ S_t] / |S_t|
    last_round: Tensor  # the last round worker i arrived, -1: never
    staleness_sum: float = 0.0
    waited_rounds: int = 0
    rejected: int = 0


def _simulate(
    specs: list[tuple[str, int, float]],
    train: FederatedDataset,
    test: FederatedDataset,
    x0: Tensor,
    f_star: float,
    initial: float,
    config: AFAConfig,
    seed: int,
) -> tuple[list[_Run], _Arrivals]:
    """Every (method, m, base server rate) of one seed, side by side.

    Runs with the same m share the arrival process and the minibatches (the same generator as
    `FederatedSimulator(seed=seed + 2)`), so their differences are paired within the seed.
    """
    depth = config.max_staleness + 1
    runs = [
        _Run(
            method=method,
            arrivals=m,
            base_lr=lr,
            aggregator=_aggregator(method, lr, config, m),
            x=x0.clone(),
            history=[x0.clone()],
            tail_sum=torch.zeros_like(x0, dtype=torch.float64),
        )
        for method, m, lr in specs
    ]
    groups = sorted({r.arrivals for r in runs})
    members = {m: [r for r in runs if r.arrivals == m] for m in groups}
    processes = {m: _workers(config, seed, m) for m in groups}
    generators = {m: torch.Generator().manual_seed(seed + 2) for m in groups}
    m_main = config.arrivals_per_round
    stats = _Arrivals(
        counts=torch.zeros(config.n_workers, dtype=torch.long),
        shares=torch.zeros(config.n_workers, dtype=torch.float64),
        last_round=torch.full((config.n_workers,), -1, dtype=torch.long),
    )
    threshold = config.speedup_target * initial
    for r in range(config.rounds):
        starts, indices, valids, steps, slices = [], [], [], [], []
        for m in groups:
            arrivals = processes[m].next_round()
            workers, k = arrivals.workers, arrivals.local_steps
            if m == m_main:
                stats.counts[workers] += 1
                stats.shares[workers] += 1.0 / workers.numel()
                stats.last_round[workers] = r
                stats.staleness_sum += float(arrivals.staleness.double().mean())
                stats.waited_rounds += arrivals.waited_for > 0
                stats.rejected += arrivals.rejected_stale
            index, valid = draw_batches(
                train, workers, int(k.max()), config.batch_size, generators[m]
            )
            for run_ in members[m]:
                if run_.diverged:
                    continue
                offset = sum(s.shape[0] for s in starts)
                starts.append(torch.stack([run_.history[int(s)] for s in arrivals.staleness]))
                indices.append(index)
                valids.append(valid)
                steps.append(k)
                slices.append((run_, workers, k, slice(offset, offset + workers.numel())))
        if not starts:
            break
        # one batched local-training call for every arrival of every run; a run's rows past
        # its K_j are frozen by `steps`, so the padding's batches are never used
        start = torch.cat(starts)
        depth_k = max(i.shape[0] for i in indices)
        index = torch.zeros(depth_k, start.shape[0], config.batch_size, dtype=torch.long)
        valid = torch.ones(index.shape, dtype=torch.bool)
        for (_, _, _, rows), i, v in zip(slices, indices, valids, strict=True):
            index[: i.shape[0], rows] = i
            valid[: v.shape[0], rows] = v
        trained = local_sgd(
            start, train, index, valid, torch.cat(steps), config.local_lr, config.weight_decay
        )
        deltas = trained - start
        for run_, workers, k, rows in slices:
            run_.aggregator.server_lr = server_lr_at(run_.base_lr, r, config)
            run_.x = run_.aggregator.step(run_.x, deltas[rows], workers, local_steps=k)
            run_.history = [run_.x, *run_.history][:depth]
            if not bool(torch.isfinite(run_.x).all()):
                run_.diverged = True
            elif r >= config.rounds - config.average_rounds:
                run_.tail_sum += run_.x.double()
                run_.tail_count += 1
        if (r + 1) % config.eval_every == 0:
            _evaluate(runs, train, test, f_star, r + 1, threshold, config)
    return runs, stats


@torch.no_grad()
def _evaluate(
    runs: list[_Run],
    train: FederatedDataset,
    test: FederatedDataset,
    f_star: float,
    round_: int,
    threshold: float,
    config: AFAConfig,
) -> None:
    live = [r for r in runs if not r.diverged]
    if live:
        weight, bias = _split(torch.stack([r.x for r in live]))
        loss = F.cross_entropy(
            (train.features @ weight.transpose(1, 2) + bias[:, None]).transpose(1, 2),
            train.labels.expand(len(live), -1),
            reduction="none",
        )
        predicted = (test.features @ weight.transpose(1, 2) + bias[:, None]).argmax(-1)
    for run_ in runs:
        run_.rounds.append(round_)
        if run_.diverged:
            run_.excess.append(1e30)
            run_.test_acc.append(0.0)
            continue
        i = live.index(run_)
        e = client_mean(train, loss[i]) + _penalty(run_.x, config.weight_decay) - f_star
        run_.excess.append(e if math.isfinite(e) else 1e30)
        run_.test_acc.append(100.0 * client_mean(test, predicted[i] == test.labels))
        if run_.reached is None and e <= threshold:
            run_.reached = round_


def _as_record(run_: _Run, train: FederatedDataset, f_star: float, config: AFAConfig) -> AFARun:
    w = config.final_window
    tail = 1e30
    if not run_.diverged and run_.tail_count:
        tail = objective(train, config.weight_decay, run_.tail_sum / run_.tail_count) - f_star
    return AFARun(
        method=run_.method,
        arrivals_per_round=run_.arrivals,
        server_lr=run_.base_lr,
        rounds=run_.rounds,
        excess=run_.excess,
        test_acc=run_.test_acc,
        final_excess=sum(run_.excess[-w:]) / len(run_.excess[-w:]),
        final_test_acc=sum(run_.test_acc[-w:]) / len(run_.test_acc[-w:]),
        tail_average_excess=tail,
        rounds_to_target=run_.reached,
    )


def _predicted_bias(
    train: FederatedDataset,
    config: AFAConfig,
    stats: _Arrivals,
    steps: Tensor,
    x_star: Tensor,
    f_star: float,
    cs_memory: Tensor | None,
) -> dict[str, float]:
    """f − f* at each rule's predicted fixed point (module docstring)."""
    wd = config.weight_decay

    def bias(weights: Tensor, frozen: Tensor | None = None) -> float:
        x = predicted_fixed_point(train, wd, weights, frozen, start=x_star)
        return objective(train, wd, x) - f_star

    # AFA-CS: a worker's memory is live if it arrived in the averaging window, frozen if its
    # last arrival is older (its entry then acts as a constant), empty if it never arrived
    live = stats.last_round >= config.rounds - config.average_rounds
    frozen_rows = (stats.last_round >= 0) & ~live
    frozen = None
    if cs_memory is not None and bool(frozen_rows.any()):
        frozen = cs_memory[frozen_rows].double().sum(0)
    return {
        "AFA-CD": bias(stats.shares),
        "AFA-CS": bias(live.double(), frozen),
        "FedAvg": bias(stats.shares * steps.double()),
    }


def run(config: AFAConfig, seed: int) -> AFAResult:
    """The method comparison (each method's rate grid) and the speedup in m, one seed."""
    train, test = fedprox_synthetic(
        config.synthetic_alpha, config.synthetic_beta, config.n_workers, seed=seed
    )
    with torch_threads(config.num_threads):
        x_star = torch.tensor(
            cached_stage("optimum", lambda: {"x": minimizer(train, config.weight_decay).tolist()})[
                "x"
            ],
            dtype=torch.float64,
        )
        f_star = objective(train, config.weight_decay, x_star)
        with seeded(seed):
            model = nn.Linear(DIM, N_CLASSES)
        x0 = ParameterLayout.of(model).flatten({k: v.detach() for k, v in model.named_parameters()})
        initial = objective(train, config.weight_decay, x0) - f_star
        m_main = config.arrivals_per_round

        def compute() -> dict:
            specs = [
                (method, m_main, base_server_lr(method, config) * mult)
                for method in config.methods
                for mult in config.server_lr_multipliers
            ]

            def speedup_specs(lr: float) -> list[tuple[str, int, float]]:
                return [
                    ("AFA-CD", m, lr * math.sqrt(m / m_main))
                    for m in config.speedup_arrivals
                    if m != m_main
                ]

            with_cd = "AFA-CD" in config.methods
            # one rate: the speedup runs' rates are known now, so they share the main batch
            together = with_cd and len(config.server_lr_multipliers) == 1
            lr_cd = base_server_lr("AFA-CD", config) * config.server_lr_multipliers[0]
            extra = speedup_specs(lr_cd) if together else []
            sims, stats = _simulate(specs + extra, train, test, x0, f_star, initial, config, seed)
            records = [_as_record(s, train, f_star, config) for s in sims[: len(specs)]]
            for method in config.methods:
                mine = [r for r in records if r.method == method]
                min(mine, key=lambda r: r.tail_average_excess).chosen = True
            speedup: list[AFARun] = []
            if with_cd:
                lr = next(r.server_lr for r in records if r.method == "AFA-CD" and r.chosen)
                runs_m = sims[len(specs) :]
                if not together:
                    runs_m = _simulate(
                        speedup_specs(lr), train, test, x0, f_star, initial, config, seed
                    )[0]
                by_m = {s.arrivals: _as_record(s, train, f_star, config) for s in runs_m}
                main = next(r for r in records if r.method == "AFA-CD" and r.chosen)
                by_m[m_main] = replace(main, chosen=False)
                speedup = [by_m[m] for m in config.speedup_arrivals]
            cs = next((s for s in sims if s.method == "AFA-CS"), None)
            memory = None if cs is None else cs.aggregator.memory
            steps = _workers(config, seed, 1).fixed_steps
            return {
                "runs": [r.to_json() for r in records],
                "speedup": [r.to_json() for r in speedup],
                "counts": stats.counts.tolist(),
                "never_arrived": int((stats.counts == 0).sum()),
                "mean_staleness": stats.staleness_sum / config.rounds,
                "waited_rounds": stats.waited_rounds,
                "rejected": stats.rejected,
                "steps": steps.tolist(),
                "predicted": _predicted_bias(train, config, stats, steps, x_star, f_star, memory),
            }

        stage = cached_stage("simulate", compute)
        return AFAResult(
            seed=seed,
            n_workers=config.n_workers,
            optimum=f_star,
            initial_excess=initial,
            arrival_counts=stage["counts"],
            local_steps=stage["steps"],
            mean_staleness=stage["mean_staleness"],
            never_arrived=stage["never_arrived"],
            waited_rounds=stage["waited_rounds"],
            rejected_stale=stage["rejected"],
            predicted_bias=stage["predicted"],
            runs=[AFARun.from_json(r) for r in stage["runs"]],
            speedup=[AFARun.from_json(r) for r in stage["speedup"]],
        )


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
