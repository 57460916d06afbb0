"""Experiment `fedau`: FedAU against FedAvg, the known-probability oracle and MIFA.

The setting of Wang & Ji (ICLR 2024), scaled to this machine: N = 100 clients whose
participation probabilities are heterogeneous and correlated with their data
(p_n = max(0.02, 0.1·C·⟨π_n, d⟩), d ~ Dirichlet(0.1)), under three patterns (Bernoulli, Markov
with transition rate 0.05, cyclic with period 100), I = 5 local SGD steps of batch 16 per round.

Headline setting: FedProx's Synthetic(1, 1), one user per client, multinomial logistic
regression (FedProx's model for it). Its clients' objectives conflict (each user labels with its
own random linear model), so *which* objective a method minimizes matters: FedAvg converges to
the participation-weighted objective Σ_n p_n f_n / Σ_n p_n, FedAU and the known-p oracle to the
true one, 1/N Σ_n f_n. Both objectives are convex here, and their exact minimizers are computed
(full-batch L-BFGS in float64) so the report can show the long-run effect that is achievable at
all. Secondary setting: the 8x8 digits split over the clients by Dirichlet(0.1) on labels, with
an MLP 64-32-10; every client can be fitted at once there, so the weights barely matter.

Methods: FedAU (no cutoff, and with the paper's other setting, cutoff K = 50, which bounds a
weight by 50), FedAvg over participants, FedAvg over all N clients, the oracle that knows p_n
(1/N Σ_S Δ_n/p_n) and MIFA (one stored update per client). Learning rates: the local rate is the
paper's 0.1 for digits; Synthetic(1, 1)'s inputs are larger, and 0.1 made its local steps
diverge on big clients, so it uses 0.01 (FedProx's rate for it). The server rate is tuned per
method, as the paper did, on a grid: `server_lr_multipliers` times a method's base rate, the
base being 1 except for FedAvg over all clients, whose base is N / Σ_n p_n (the inverse of the
expected participating fraction: its expected step then has the size of the others'; the
released code's README runs it at global rate 10 = 1 / mean p for the same reason). The rate is
chosen per seed by the lowest *training* objective 1/N Σ_n f_n(x) (the objective FedAU targets)
averaged over the last evaluations; test accuracy is reported for the chosen rate only, so the
selection never sees test data. A choice at either end of the grid is flagged in the report.
Multiplier 1 is always in the grid: it is the paper's fixed equal-step protocol (global rate 1,
FedAvg over all at 1 / mean p), reported next to the tuned one.

Rate grids run side by side. On the linear model `LinearSweep` trains every (method, rate)
at once: one batched matmul per local step for all of them, the softmax cross-entropy gradient
written out, and one weighted sum per round for all methods' aggregations (the methods differ
only in their per-participant weights; FedAU's come from the library's
`ParticipationIntervalWeights`). It computes what separate library simulators compute
(tested to float64 rounding) several times faster: these rounds are overhead-bound. The MLP
runs through the library's `FederatedSweep`, one run per (method, rate), each aggregator a
`RateGrid` over the library's aggregator.

Every method of one (dataset, pattern, seed) sees the same data split, probabilities,
participation stream, initial model and minibatches: the comparison is paired.

The report side (claims, published numbers, tables, figures, protocol) is in `fedau_report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset, digits_federated
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.engine import ParameterLayout, draw_batches
from meanwise.experiments.base import cached_stage, progress, seeded, torch_threads
from meanwise.experiments.fedau_results import FedAUResult, MethodRun, Optima, SettingResult
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
    ParticipationIntervalWeights,
    ParticipationProcess,
    heterogeneous_probabilities,
)
from meanwise.federated.participation import validate_probabilities
from meanwise.federated.simulator import FederatedSweep

__all__ = [
    "FedAUConfig",
    "FedAUResult",
    "SettingResult",
    "MethodRun",
    "RateGrid",
    "LinearSweep",
    "METHODS",
    "PATTERNS",
    "DATASETS",
    "base_server_lr",
    "client_mean",
    "client_means",
    "long_run_frequencies",
    "objective_optima",
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
DATASETS: tuple[str, ...] = ("synthetic", "digits")
N_CLASSES = 10


@dataclass(frozen=True)
class FedAUConfig:
    """Settings. `full()`: both datasets, 5 seeds; `quick()`: the headline setting only."""

    seeds: int = 5
    datasets: tuple[str, ...] = DATASETS
    patterns: tuple[str, ...] = PATTERNS
    methods: tuple[str, ...] = METHODS
    n_clients: int = 100
    rounds: int = 1000
    local_steps: int = 5
    batch_size: int = 16
    digits_local_lr: float = 0.1
    synthetic_local_lr: float = 0.01
    server_lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    eval_every: int = 50
    final_window: int = 4  # evaluations averaged for the final numbers and the rate choice
    cutoff: int | None = None  # "FedAU"; "FedAU-K50" always uses the paper's other cutoff, 50
    markov_rate: float = 0.05
    cyclic_period: int = 100
    dirichlet_alpha: float = 0.1
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    hidden: int = 32
    optimum_iterations: int = 200  # L-BFGS iterations for the exact optima (synthetic)
    optimum_seeds: int = 5  # the optima are computed for the first this many seeds
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
        if self.n_clients < 2:
            raise ValueError(f"n_clients must be >= 2; got {self.n_clients}")
        multipliers = self.server_lr_multipliers
        if not multipliers or min(multipliers) <= 0 or len(set(multipliers)) != len(multipliers):
            raise ValueError(
                f"server_lr_multipliers must be distinct positive rates; got {multipliers}"
            )
        if 1.0 not in multipliers:
            raise ValueError(
                "server_lr_multipliers must contain 1.0: it is the paper's fixed equal-step "
                f"protocol, reported next to the tuned rates; got {multipliers}"
            )
        if self.optimum_iterations < 1 or self.optimum_seeds < 0:
            raise ValueError(
                "optimum_iterations must be >= 1 and optimum_seeds >= 0; got "
                f"{self.optimum_iterations}, {self.optimum_seeds}"
            )

    @classmethod
    def quick(cls) -> FedAUConfig:
        """The headline setting (Synthetic(1, 1), N = 100, all six methods, 1000 rounds, three
        patterns, rate grid ×{0.5, ..., 32}) with 3 paired seeds instead of 5 and the exact
        optima for the first seed only, to fit the demo's budget; digits is in `full()`."""
        return cls(seeds=3, datasets=("synthetic",), optimum_seeds=1)

    @classmethod
    def full(cls) -> FedAUConfig:
        """Both datasets, N = 100, 1000 rounds, 5 seeds, all six methods."""
        return cls()


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


def _owners(data: FederatedDataset) -> Tensor:
    return torch.repeat_interleave(torch.arange(data.n_clients), data.sizes)


@torch.no_grad()
def client_means(data: FederatedDataset, per_example: Tensor) -> Tensor:
    """1/N Σ_n (mean over client n's rows) of each column of `per_example` [rows, k], float64."""
    sums = torch.zeros(data.n_clients, per_example.shape[1], dtype=torch.float64)
    sums.index_add_(0, _owners(data), per_example.double())
    return (sums / data.sizes.double()[:, None]).mean(0)


@torch.no_grad()
def client_mean(data: FederatedDataset, per_example: Tensor) -> float:
    """1/N Σ_n (mean of `per_example` over client n's rows): every client counts equally."""
    return float(client_means(data, per_example.reshape(-1, 1))[0])


@torch.no_grad()
def _evaluate(
    model: nn.Module, x: Tensor, layout: ParameterLayout, task: _Task
) -> tuple[float, float]:
    """(test accuracy in %, training objective 1/N Σ_n f_n(x)) of the flat parameters x."""
    params = layout.unflatten(x)

    def forward(features: Tensor) -> Tensor:
        return torch.func.functional_call(model, params, (features,))

    train = task.train
    losses = F.cross_entropy(forward(train.features), train.labels, reduction="none")
    objective = client_mean(train, losses)
    features, labels = task.test
    accuracy = float((forward(features).argmax(-1) == labels).double().mean())
    if not math.isfinite(objective):
        objective = math.inf  # a diverged run: never chosen, JSON-safe as 1e30 below
    return 100.0 * accuracy, objective


def _process(pattern: str, probs: Tensor, config: FedAUConfig, seed: int) -> ParticipationProcess:
    if pattern == "bernoulli":
        return Bernoulli(probs, seed=seed)
    if pattern == "markov":
        return Markov(probs, rate=config.markov_rate, seed=seed)
    return Cyclic(probs, period=config.cyclic_period, seed=seed)


def long_run_frequencies(pattern: str, probs: Tensor, config: FedAUConfig) -> Tensor:
    """The fraction of rounds client n takes part in, in the long run: p_n for Bernoulli and
    Markov (its stationary law), on-window / period for cyclic (p_n rounded to whole rounds)."""
    if pattern == "cyclic":
        on = torch.clamp(torch.round(config.cyclic_period * probs), min=1)
        return (on / config.cyclic_period).double()
    return probs.double()


def _rule(method: str, probs: Tensor, config: FedAUConfig) -> Aggregator:
    """The library's aggregator for `method` at server rate 1 (RateGrid applies the rates)."""
    n = config.n_clients
    if method == "FedAU":
        return FedAU(n, cutoff=config.cutoff)
    if method == "FedAU-K50":
        return FedAU(n, cutoff=50)
    if method == "FedAvg-participants":
        return FedAvg(n, "participants")
    if method == "FedAvg-all":
        return FedAvg(n, "all")
    if method == "Known-p":
        return KnownParticipation(probs)
    return MIFA(n)


def base_server_lr(method: str, probs: Tensor) -> float:
    """1, except FedAvg over all clients: N / Σ p_n, so its expected step matches the others'."""
    if method == "FedAvg-all":
        return float(probs.numel() / probs.sum())
    return 1.0


class RateGrid(Aggregator):
    """One aggregation rule at R server rates at once, on R models stored end to end.

    The global vector is R blocks of ``block_size`` (block r: the model trained at
    ``rates[r]``). ``rule`` (an aggregator at server rate 1) aggregates all blocks in one call,
    so it sees the round's participants once, and block r moves by ``rates[r]`` times its part
    of the direction. For rules whose per-client weights depend only on who participated
    (FedAvg, FedAU, known p, MIFA) this is exactly R separate runs.

    A block whose update is not finite has diverged at its rate: it is frozen from then on (its
    updates are zeroed before the rule sees them, so the rule never drops a client from the
    other blocks' average because of it) and ``diverged[r]`` says so.
    """

    def __init__(self, rule: Aggregator, rates: Sequence[float], block_size: int) -> None:
        if rule.server_lr != 1.0:
            raise ValueError(f"rule must have server_lr 1 (RateGrid applies rates); got {rule}")
        rates_t = torch.as_tensor(list(rates), dtype=torch.float64)
        if rates_t.dim() != 1 or rates_t.numel() < 1 or not bool((rates_t > 0).all()):
            raise ValueError(f"rates must be a non-empty list of positive rates; got {rates}")
        if int(block_size) < 1:
            raise ValueError(f"block_size must be positive; got {block_size}")
        super().__init__(rule.n_clients, server_lr=1.0)
        self.rule = rule
        self.rates = rates_t
        self.block_size = int(block_size)
        self.diverged = torch.zeros(rates_t.numel(), dtype=torch.bool)
        self._scale: Tensor | None = None  # per-coordinate rate (0 for diverged blocks)

    @property
    def n_blocks(self) -> int:
        return int(self.rates.numel())

    def step(self, x, deltas, clients, *, local_steps=None):
        size = self.n_blocks * self.block_size
        if x.shape != (size,) or deltas.dim() != 2 or deltas.shape[1] != size:
            raise ValueError(
                f"x must be [{size}] and deltas [S, {size}] ({self.n_blocks} blocks of "
                f"{self.block_size}); got {list(x.shape)} and {list(deltas.shape)}"
            )
        # rounds are overhead-bound (a few small clients): the common case costs one check
        if self._scale is None or self._scale.dtype != x.dtype:
            self._set_scale(x.dtype)
        if not bool(torch.isfinite(deltas).all()):
            blocks = deltas.view(deltas.shape[0], self.n_blocks, self.block_size)
            self.diverged |= ~torch.isfinite(blocks).all(dim=2).all(dim=0)
            self._set_scale(x.dtype)
        if bool(self.diverged.any()):
            blocks = deltas.view(deltas.shape[0], self.n_blocks, self.block_size)
            deltas = blocks.masked_fill(self.diverged[None, :, None], 0.0).view(deltas.shape)
        self.rounds += 1
        direction = self.rule.step(x.new_zeros(()).expand(size), deltas, clients,
                                   local_steps=local_steps)  # fmt: skip
        return torch.addcmul(x, direction, self._scale)

    def _set_scale(self, dtype: torch.dtype) -> None:
        rates = torch.where(self.diverged, 0.0, self.rates)
        self._scale = rates.to(dtype).repeat_interleave(self.block_size)

    def _extra_state(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "diverged": self.diverged.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
        self.diverged = state["diverged"].clone()
        self._scale = None


# --- the linear model's rate grid, trained in closed form -------------------------------------


class LinearSweep:
    """Every method at every server rate on multinomial logistic regression, side by side.

    What separate :class:`~meanwise.federated.FederatedSimulator` runs of ``nn.Linear`` with
    plain local SGD and the library's aggregators (FedAU, FedAvg, KnownParticipation, MIFA)
    compute, one run per (method, rate), with the same participation stream, the same minibatch
    draws (:func:`~meanwise.engine.local_training.draw_batches`) and the same masked mean
    loss (tested against them). Rounds of a few small clients are dominated by per-operation
    overhead, so everything that can be shared is done once per round for all runs:

    - local training: every copy is one block of one batched matmul per local step, and the
      softmax cross-entropy gradient is written out, (softmax − one-hot)ᵀ·x / batch, instead
      of going through autograd;
    - aggregation: the methods differ only in their per-participant weights (FedAU: the
      library's :class:`~meanwise.federated.ParticipationIntervalWeights` / N; FedAvg over
      participants 1/|S|; over all 1/N; known p: 1/(N p_n)), so one weighted sum gives every
      run's direction; MIFA averages its stored latest updates (zeros before a client's
      first). Run (method, rate) then moves by rate · direction.

    A block whose update is not finite has diverged at its rate: it is frozen from then on
    (``diverged``). (The library's aggregators instead drop the non-finite client and go on;
    for a rate-grid entry that has blown up, freezing it is what the experiment needs.)
    Each copy is stored as ``[weight (C x d) row-major, bias (C)]``, nn.Linear's order.
    """

    def __init__(
        self,
        train: FederatedDataset,
        methods: Sequence[str],
        rates: Tensor,
        probs: Tensor,
        participation: ParticipationProcess,
        local: LocalTraining,
        initial: Tensor,
        *,
        cutoff: int | None,
        seed: int,
    ) -> None:
        if local.rule != "sgd" or local.options:
            raise ValueError(f"LinearSweep trains with plain SGD only; got {local}")
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {methods}")
        if rates.dim() != 2 or rates.shape[0] != len(methods) or not bool((rates > 0).all()):
            raise ValueError(f"rates must be positive [methods, copies]; got {list(rates.shape)}")
        self.train = train
        self.methods = list(methods)
        self.n_clients = train.n_clients
        self.probs = validate_probabilities(probs)
        self.participation = participation
        self.local = local
        self.dim = int(train.features.shape[1])
        self.block = N_CLASSES * (self.dim + 1)
        if initial.shape != (self.block,):
            raise ValueError(f"initial must be [{self.block}]; got {list(initial.shape)}")
        self.copies = int(rates.shape[1])
        dtype = train.features.dtype
        self.rates = rates.to(dtype)
        # [methods, copies, block]: run (method, rate) is xs[method, copy]
        self.xs = initial.to(dtype).expand(len(methods), self.copies, -1).clone()
        self.diverged = torch.zeros(len(methods), self.copies, dtype=torch.bool)
        self.weights = {
            m: ParticipationIntervalWeights(self.n_clients, cutoff if m == "FedAU" else 50)
            for m in self.methods
            if m in ("FedAU", "FedAU-K50")
        }
        self.memory = (
            torch.zeros(self.n_clients, self.copies, self.block, dtype=dtype)
            if "MIFA" in self.methods
            else None
        )
        self.generator = torch.Generator().manual_seed(int(seed))
        self.round = 0

    def models(self) -> tuple[Tensor, Tensor]:
        """(weights [M, C, d], biases [M, C]) of every run (M = methods · copies)."""
        flat = self.xs.view(-1, self.block)
        weight = flat[:, : N_CLASSES * self.dim].view(-1, N_CLASSES, self.dim)
        return weight, flat[:, N_CLASSES * self.dim :]

    def _local_training(self, clients: Tensor) -> Tensor:
        """Every run trained from its global model on every participant: deltas [S, M, block]."""
        steps, batch = int(self.local.steps), int(self.local.batch_size)
        index, valid = draw_batches(self.train, clients, steps, batch, self.generator)
        weight0, bias0 = self.models()
        n, m = clients.numel(), weight0.shape[0]
        weight = weight0.reshape(1, m * N_CLASSES, self.dim).expand(n, -1, -1).clone()
        bias = bias0.reshape(1, m * N_CLASSES).expand(n, -1).clone()
        # the masked mean over each minibatch, and every step's rows gathered at once
        scale = valid.to(weight.dtype)
        scale = (scale / scale.sum(-1, keepdim=True)).view(steps, n, batch, 1, 1)
        rows = index.reshape(-1)
        features = self.train.features.index_select(0, rows).view(steps, n, batch, self.dim)
        labels = self.train.labels.index_select(0, rows).view(steps, n, batch, 1)
        target = F.one_hot(labels, N_CLASSES).to(weight.dtype).mul_(scale)  # [K, S, B, 1, C]
        for k in range(steps):
            x = features[k]
            logits = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
            # d(masked mean CE)/d logits = (softmax − one-hot) · scale
            g = torch.softmax(logits.view(n, batch, m, N_CLASSES), dim=-1).mul_(scale[k])
            g = g.sub_(target[k]).view(n, batch, m * N_CLASSES)
            weight.baddbmm_(g.transpose(1, 2), x, alpha=-self.local.lr)
            bias.sub_(g.sum(1), alpha=self.local.lr)
        trained = torch.cat(
            [weight.view(n, m, N_CLASSES * self.dim), bias.view(n, m, N_CLASSES)], dim=2
        )
        return trained - self.xs.view(1, m, self.block)

    def _client_weights(self, mask: Tensor, clients: Tensor) -> Tensor:
        """[methods, S] weights of the participants' updates (MIFA's row unused)."""
        n, size = self.n_clients, clients.numel()
        rows = []
        for method in self.methods:
            if method in self.weights:  # the intervals advance every round, empty ones too
                rows.append(self.weights[method].update(mask)[clients] / n)
            elif method == "FedAvg-participants":
                rows.append(torch.full((size,), 1.0 / max(size, 1), dtype=torch.float64))
            elif method == "Known-p":
                rows.append(1.0 / (n * self.probs[clients]))
            else:  # FedAvg-all (and MIFA's placeholder)
                rows.append(torch.full((size,), 1.0 / n, dtype=torch.float64))
        return torch.stack(rows).to(self.xs.dtype)

    def step(self) -> None:
        mask = self.participation.sample()
        clients = mask.nonzero().flatten()
        weights = self._client_weights(mask, clients)
        self.round += 1
        if clients.numel() == 0:
            return  # nobody took part: every model stays where it is
        deltas = self._local_training(clients).view(
            clients.numel(), len(self.methods), self.copies, -1
        )
        if not bool(torch.isfinite(deltas).all()):
            self.diverged |= ~torch.isfinite(deltas).all(dim=3).all(dim=0)
        if bool(self.diverged.any()):
            deltas = deltas.masked_fill(self.diverged[None, :, :, None], 0.0)
        direction = torch.einsum("ms,smcp->mcp", weights, deltas)
        if self.memory is not None:
            mifa = self.methods.index("MIFA")
            self.memory[clients] = deltas[:, mifa]
            direction[mifa] = self.memory.mean(0)
        rates = torch.where(self.diverged, 0.0, self.rates)
        self.xs.addcmul_(direction, rates[:, :, None])

    def run(self, rounds: int) -> None:
        while self.round < rounds:
            self.step()

    @torch.no_grad()
    def evaluate(self, task: _Task) -> tuple[Tensor, Tensor]:
        """(test accuracy in % [M], training objective 1/N Σ_n f_n [M]) of every copy."""
        weight, bias = self.models()
        m = weight.shape[0]

        def logits(features: Tensor) -> Tensor:
            out = torch.addmm(bias.reshape(-1), features, weight.reshape(-1, self.dim).T)
            return out.view(-1, m, N_CLASSES)

        train = self.train
        log_p = torch.log_softmax(logits(train.features), dim=-1)
        losses = -log_p.gather(2, train.labels.view(-1, 1, 1).expand(-1, m, 1)).squeeze(2)
        objective = client_means(train, losses)
        assert isinstance(task.test, FederatedDataset)
        correct = logits(task.test.features).argmax(-1) == task.test.labels[:, None]
        accuracy = 100.0 * client_means(task.test, correct)
        return accuracy, torch.where(torch.isfinite(objective), objective, math.inf)


# --- the exact optima (Synthetic: convex) -------------------------------------------------------


def _softmax_objective(x: Tensor, y: Tensor, scale: Tensor, params: Tensor) -> tuple[float, Tensor]:
    """Σ_i scale_i · CE(W x_i + b, y_i) and its gradient, written out (float64)."""
    d = x.shape[1]
    weight, bias = params[: N_CLASSES * d].view(N_CLASSES, d), params[N_CLASSES * d :]
    logits = x @ weight.T + bias
    log_p = torch.log_softmax(logits, dim=1)
    value = -(log_p.gather(1, y[:, None]).squeeze(1) * scale).sum()
    g = log_p.exp()
    g[torch.arange(y.numel()), y] -= 1.0
    g *= scale[:, None]
    return float(value), torch.cat([(g.T @ x).reshape(-1), g.sum(0)])


def _minimize(
    train: FederatedDataset, client_weights: Tensor, iterations: int
) -> tuple[Tensor, Tensor]:
    """(weight, bias) minimizing Σ_n w_n f_n / Σ_n w_n for multinomial logistic regression:
    full-batch L-BFGS (scipy's L-BFGS-B) from zero, at most `iterations`; the objective is
    convex. The result is float64."""
    from scipy.optimize import minimize  # scikit-learn's dependency

    # float32 evaluations: 3x faster here; measured on seed 0 against float64 evaluations at
    # 100-400 iterations, the same objective to ~1e-5 and per-user accuracy within the
    # ±0.3-point wobble that per-user accuracy shows between nearby minimizers anyway
    x, y = train.features.float(), train.labels
    owners = _owners(train)
    scale = (client_weights / client_weights.sum())[owners] / train.sizes.double()[owners]
    scale = scale.float()

    def fun(params):
        value, grad = _softmax_objective(x, y, scale, torch.from_numpy(params).float())
        return value, grad.double().numpy()

    size = N_CLASSES * (x.shape[1] + 1)
    out = minimize(
        fun,
        torch.zeros(size, dtype=torch.float64).numpy(),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": iterations, "maxcor": 20, "gtol": 1e-10, "ftol": 1e-15},
    )
    params = torch.from_numpy(out.x)
    d = x.shape[1]
    return params[: N_CLASSES * d].view(N_CLASSES, d), params[N_CLASSES * d :]


@torch.no_grad()
def _linear_metrics(task: _Task, weight: Tensor, bias: Tensor) -> dict[str, float]:
    train, test = task.train, task.test
    assert isinstance(test, FederatedDataset)
    owners = _owners(train)
    uniform = (1.0 / train.n_clients) / train.sizes.double()[owners]
    value, grad = _softmax_objective(
        train.features.double(), train.labels, uniform, torch.cat([weight.reshape(-1), bias])
    )
    correct = (test.features.double() @ weight.T + bias).argmax(-1) == test.labels
    return {
        "objective": value,
        "test_acc": 100.0 * client_mean(test, correct),
        "gradient_norm": float(grad.norm()),  # of the true objective: 0 at its minimizer
    }


def objective_optima(task: _Task, frequencies: Tensor, iterations: int) -> dict[str, Any]:
    """The minimizers of the true objective 1/N Σ f_n and of the participation-weighted one
    Σ q_n f_n / Σ q_n (q: participation probabilities, where FedAvg converges), each with its
    true objective value (float64), per-user test accuracy and true-objective gradient norm."""
    ones = torch.ones(task.train.n_clients, dtype=torch.float64)
    uniform = _linear_metrics(task, *_minimize(task.train, ones, iterations))
    weighted = _linear_metrics(task, *_minimize(task.train, frequencies.double(), iterations))
    return {"uniform": uniform, "participation_weighted": weighted}


# --- one setting -------------------------------------------------------------------------------


def _groups(dataset: str, config: FedAUConfig) -> list[tuple[str, list[float]]]:
    """(method, multipliers) per run: all of a method's rates in one run for the linear model,
    one run per (method, rate) for the MLP."""
    multipliers = list(config.server_lr_multipliers)
    if dataset == "synthetic":
        return [(method, multipliers) for method in config.methods]
    return [(method, [m]) for method in config.methods for m in multipliers]


Curves = list[list[tuple[list[int], list[float], list[float]]]]


def _train_linear(task, groups, probs, process, local, config, seed) -> tuple[Curves, LinearSweep]:
    with seeded(seed):
        model = nn.Linear(task.in_features, N_CLASSES)
    initial = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    rates = torch.tensor(
        [[base_server_lr(method, probs) * m for m in mults] for method, mults in groups],
        dtype=torch.float64,
    )
    sweep = LinearSweep(
        task.train,
        [method for method, _ in groups],
        rates,
        probs,
        process,
        local,
        initial,
        cutoff=config.cutoff,
        seed=seed + 2,
    )
    copies = sweep.copies
    curves: Curves = [[([], [], []) for _ in range(copies)] for _ in groups]
    for r in range(config.eval_every, config.rounds + 1, config.eval_every):
        sweep.run(r)
        accs, objectives = sweep.evaluate(task)
        for i in range(len(groups)):
            for c in range(copies):
                rounds_c, accs_c, objectives_c = curves[i][c]
                rounds_c.append(r)
                accs_c.append(float(accs[i * copies + c]))
                objectives_c.append(float(objectives[i * copies + c]))
    return curves, sweep


def _train_mlp(task, groups, probs, process, local, config, seed) -> tuple[Curves, list[RateGrid]]:
    block = task.in_features * config.hidden + config.hidden + (config.hidden + 1) * N_CLASSES
    aggregators = [
        RateGrid(
            _rule(method, probs, config), [base_server_lr(method, probs) * m for m in mults], block
        )
        for method, mults in groups
    ]
    with seeded(seed):
        model = nn.Sequential(
            nn.Linear(task.in_features, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, N_CLASSES),
        )
    sweep = FederatedSweep(
        model,
        task.train,
        aggregators,
        process,
        local,
        # no test set: the sweep logs participation; accuracy and the training objective
        # (which the simulator does not compute) are evaluated below at the same rounds
        eval_every=config.eval_every,
        seed=seed + 2,
    )
    curves: Curves = [[([], [], [])] for _ in groups]
    for r in range(config.eval_every, config.rounds + 1, config.eval_every):
        sweep.run(r)
        for i in sweep.active_runs():
            acc, objective = _evaluate(model, sweep.run_vector(i), sweep.layout, task)
            rounds_c, accs_c, objectives_c = curves[i][0]
            rounds_c.append(r)
            accs_c.append(acc)
            objectives_c.append(objective)
            if bool(aggregators[i].diverged.all()):
                sweep.stop(i)  # its remaining evaluations would all be the same failure
        if not sweep.active_runs():
            break
    return curves, aggregators


def run_setting(dataset: str, pattern: str, config: FedAUConfig, seed: int) -> SettingResult:
    """Every method on every server rate of the grid for one (dataset, pattern).

    Every run sees the same initial model, participation stream and minibatches (a paired
    comparison), and one vectorized call trains all runs' participants each round
    (:class:`LinearSweep` for the linear model, where each run holds all its method's rates,
    :class:`FederatedSweep` for the MLP, one run per (method, rate)).
    """
    task = _task(dataset, config, seed)
    probs = heterogeneous_probabilities(task.train.label_histograms(N_CLASSES), seed=seed)
    frequencies = long_run_frequencies(pattern, probs, config)
    groups = _groups(dataset, config)
    local = LocalTraining(
        "sgd", lr=task.local_lr, steps=config.local_steps, batch_size=config.batch_size
    )
    process = _process(pattern, probs, config, seed + 1)
    if dataset == "synthetic":
        curves, sweep = _train_linear(task, groups, probs, process, local, config, seed)
        rates, diverged = sweep.rates.double(), sweep.diverged
        fedau = sweep.weights.get("FedAU")
    else:
        curves, aggregators = _train_mlp(task, groups, probs, process, local, config, seed)
        rates = torch.stack([a.rates for a in aggregators])
        diverged = torch.stack([a.diverged for a in aggregators])
        methods = [m for m, _ in groups]
        fedau = aggregators[methods.index("FedAU")].rule.weights if "FedAU" in methods else None
    # participations per client over the run (the participation stream is model-free)
    replay = _process(pattern, probs, config, seed + 1)
    participations = torch.zeros(config.n_clients, dtype=torch.long)
    for _ in range(config.rounds):
        participations += replay.sample().long()
    window = config.final_window
    runs = []
    for i, (method, mults) in enumerate(groups):
        for c, multiplier in enumerate(mults):
            rounds_c, accs_c, objectives_c = curves[i][c]
            final_objective = sum(objectives_c[-window:]) / len(objectives_c[-window:])
            failed = bool(diverged[i, c]) or not math.isfinite(final_objective)
            runs.append(
                MethodRun(
                    method=method,
                    server_lr=float(rates[i, c]),
                    multiplier=float(multiplier),
                    rounds=rounds_c,
                    test_acc=accs_c,
                    train_objective=[o if math.isfinite(o) else 1e30 for o in objectives_c],
                    final_test_acc=sum(accs_c[-window:]) / len(accs_c[-window:]),
                    final_objective=1e30 if failed else final_objective,
                    diverged=failed,
                )
            )
    for method in config.methods:
        candidates = [run_ for run_ in runs if run_.method == method]
        min(candidates, key=lambda c: c.final_objective).chosen = True
    fedau_weights: list[float] = []
    if fedau is not None:
        # the interval means (the weights FedAU would give now); they depend only on the
        # participation stream, which every rate shares
        fedau_weights = fedau.interval_means().tolist()
    return SettingResult(
        dataset=dataset,
        pattern=pattern,
        mean_participation=float(probs.mean()),
        probs=probs.tolist(),
        frequencies=frequencies.tolist(),
        fedau_weights=fedau_weights,
        participations=participations.tolist(),
        runs=runs,
    )


def run(config: FedAUConfig, seed: int) -> FedAUResult:
    """All (dataset, pattern) settings for one seed, each a resumable stage."""
    result = FedAUResult(seed=seed, rounds=config.rounds, n_clients=config.n_clients)
    settings = [(d, p) for d in config.datasets for p in config.patterns]
    with torch_threads(config.num_threads):
        for dataset, pattern in progress(settings, desc=f"seed {seed} fedau"):
            stage = cached_stage(
                f"{dataset}-{pattern}",
                lambda d=dataset, p=pattern: run_setting(d, p, config, seed).to_json(),
            )
            result.settings.append(SettingResult.from_json(stage))
        if "synthetic" in config.datasets and seed < config.optimum_seeds:
            result.optimum = Optima.from_json(cached_stage("optima", lambda: _optima(config, seed)))
    return result


def _optima(config: FedAUConfig, seed: int) -> dict[str, Any]:
    task = _task("synthetic", config, seed)
    probs = heterogeneous_probabilities(task.train.label_histograms(N_CLASSES), seed=seed)
    return objective_optima(task, probs, config.optimum_iterations)


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
