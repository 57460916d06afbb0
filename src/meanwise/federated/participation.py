"""Client participation processes: who takes part in each round of federated training.

Each process owns a seeded ``torch.Generator`` (so a run never depends on the global RNG) and is
vectorized over clients: one round is a handful of tensor ops on ``[N]`` vectors, whatever N is.
``state_dict()`` captures everything, the generator state included, so a restored process draws
exactly the stream the original would have drawn.

- :class:`Bernoulli`, :class:`Markov`, :class:`Cyclic`: the three patterns of FedAU (Wang & Ji,
  NeurIPS 2023); :func:`heterogeneous_probabilities` is the paper's data-correlated p_n.
- :class:`Anarchic`: AFA's workers (Yang et al., ICML 2022) that choose when to arrive and how
  many local steps to run, and may return updates computed on stale models.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ParticipationProcess",
    "Bernoulli",
    "Markov",
    "Cyclic",
    "heterogeneous_probabilities",
    "Anarchic",
    "Arrivals",
    "validate_probabilities",
]


def validate_probabilities(probs: Tensor | Sequence[float], name: str = "probs") -> Tensor:
    """``probs`` as a float64 vector, every entry in (0, 1]; ValueError naming ``name`` otherwise.

    Zero is excluded on purpose: a client that never participates has no interval (FedAU) and
    an infinite inverse-probability weight (known participation).
    """
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D vector (one per client); got {list(p.shape)}"
        )
    bad = ~(torch.isfinite(p) & (p > 0) & (p <= 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must lie in (0, 1]; {name}[{i}] = {float(p[i])}")
    return p.clone()


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


class ParticipationProcess:
    """Base: ``sample()`` returns the round's boolean participation mask ``[N]``."""

    def __init__(self, probs: Tensor | Sequence[float], seed: int = 0) -> None:
        self.probs = validate_probabilities(probs)
        self.n_clients = int(self.probs.numel())
        self.seed = int(seed)
        self.generator = _generator(seed)
        self.round = 0

    def sample(self) -> Tensor:
        mask = self._draw()
        self.round += 1
        return mask

    def _draw(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "n_clients": self.n_clients,
            "round": self.round,
            "generator": self.generator.get_state(),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(
                f"state is for a {state.get('kind')!r} process, not {type(self).__name__!r}"
            )
        if int(state["n_clients"]) != self.n_clients:
            raise ValueError(
                f"state has n_clients={state['n_clients']}, this process has {self.n_clients}"
            )
        self.round = int(state["round"])
        self.generator.set_state(state["generator"])
        self._load_extra_state(state)


class Bernoulli(ParticipationProcess):
    """Client n participates in each round independently with probability p_n."""

    def _draw(self) -> Tensor:
        u = torch.rand(self.n_clients, generator=self.generator, dtype=torch.float64)
        return u < self.probs


def markov_rates(probs: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """(off→on probability a_n, on→off probability b_n) of FedAU's Markov pattern.

    a = rate and b = rate·(1/p − 1) give the stationary probability a/(a+b) = p. When that b
    exceeds 1 (small p), the released code uses a = rate/b and b = 1, which keeps a/(a+b) = p;
    clipping b to 1 alone would raise the stationary probability above p.
    """
    a = torch.full_like(probs, float(rate))
    b = rate * (1.0 / probs - 1.0)
    over = b > 1
    a = torch.where(over, rate / b, a)
    b = torch.where(over, torch.ones_like(b), b)
    return a, b


class Markov(ParticipationProcess):
    """Two-state Markov chain per client with stationary probability p_n (FedAU's rule).

    The chain starts from Bernoulli(p_n) (its stationary law) and advances once before each
    round's draw; the round's mask is the state after that transition.
    """

    def __init__(self, probs: Tensor | Sequence[float], rate: float = 0.05, seed: int = 0) -> None:
        super().__init__(probs, seed)
        if not 0 < rate <= 1:
            raise ValueError(f"rate must lie in (0, 1]; got {rate}")
        self.rate = float(rate)
        self.on_rate, self.off_rate = markov_rates(self.probs, self.rate)
        u = torch.rand(self.n_clients, generator=self.generator, dtype=torch.float64)
        self.state = u < self.probs

    def _draw(self) -> Tensor:
        u = torch.rand(self.n_clients, generator=self.generator, dtype=torch.float64)
        self.state = torch.where(self.state, u >= self.off_rate, u < self.on_rate)
        return self.state.clone()

    def _extra_state(self) -> dict[str, Any]:
        return {"state": self.state.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.state = state["state"].clone().bool()


class Cyclic(ParticipationProcess):
    """Each client is on for max(1, round(period·p_n)) consecutive rounds of every period.

    The phase is random per client (uniform over the period), so the clients' on-windows are
    spread over the period rather than all starting at round 0.
    """

    def __init__(self, probs: Tensor | Sequence[float], period: int = 100, seed: int = 0) -> None:
        super().__init__(probs, seed)
        if int(period) < 1:
            raise ValueError(f"period must be a positive integer; got {period}")
        self.period = int(period)
        self.on_length = torch.clamp(torch.round(self.period * self.probs), min=1).long()
        self.phase = torch.randint(0, self.period, (self.n_clients,), generator=self.generator)

    def _draw(self) -> Tensor:
        position = (self.round + self.phase) % self.period
        return position < self.on_length

    def _extra_state(self) -> dict[str, Any]:
        return {"phase": self.phase.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.phase = state["phase"].clone()


def heterogeneous_probabilities(
    label_histograms: Tensor | np.ndarray,
    seed: int = 0,
    *,
    scale: float = 0.1,
    floor: float = 0.02,
    concentration: float = 0.1,
) -> Tensor:
    """FedAU's data-correlated probabilities p_n = max(floor, scale·C·⟨π_n, d⟩).

    π_n is client n's label histogram normalised to sum 1 and d ~ Dirichlet(concentration·1_C)
    is drawn once from ``seed``: clients rich in the classes d favours participate more, so
    participation correlates with data as in the paper. Values are capped at 1 (with C > 10
    classes scale·C·⟨π_n, d⟩ can exceed 1).
    """
    h = torch.as_tensor(np.asarray(label_histograms), dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"label_histograms must be [n_clients, n_classes]; got {list(h.shape)}")
    totals = h.sum(1)
    if (h < 0).any() or (totals <= 0).any():
        raise ValueError("label_histograms must be non-negative with a positive total per client")
    pi = h / totals[:, None]
    n_classes = h.shape[1]
    d = torch.from_numpy(np.random.default_rng(seed).dirichlet([concentration] * n_classes))
    p = torch.clamp(scale * n_classes * (pi @ d), min=floor, max=1.0)
    return p


@dataclass(frozen=True)
class Arrivals:
    """One AFA round: the ``m`` workers that arrived, in arrival order.

    ``start_versions[j]`` is the global-model version worker ``workers[j]`` started from and
    ``staleness[j]`` = (current version) − start version ≤ max_staleness. ``rejected_stale``
    counts updates discarded for staleness (only with ``discard_stale=True``); ``waited_for``
    counts the workers the round waited for beyond the first m arrivals because their delay had
    reached the bound (only with the default ``discard_stale=False``), so a round may hold more
    than m arrivals.
    """

    workers: Tensor
    local_steps: Tensor
    start_versions: Tensor
    staleness: Tensor
    close_time: float
    rejected_stale: int
    waited_for: int = 0


class Anarchic:
    """Anarchic workers for AFA: arrivals at self-chosen times, K_i ∈ [1, K_max], staleness.

    An event-driven model. Worker i receives the current global model (version v) at time t,
    idles for Exponential(idle_means[i]) (it chooses when to work), runs K local steps at
    ``step_times[i]`` seconds each and arrives. The server closes a round after
    ``arrivals_per_round`` arrivals; each arriving worker then receives the new model and starts
    over, so a worker arrives at most once per round. While a worker computes, other rounds may
    close: its update is stale by (current version − v).

    The delay is bounded by ``max_staleness`` (τ) in one of two ways:

    - ``discard_stale=False`` (default): the paper's bounded-delay assumption (Yang, Zhang,
      Khanduri & Liu, ICML 2022: every delay τ_{t,i} ≤ τ). A round does not close while a
      worker that is still computing has a delay of τ versions: the server waits for it (and
      takes whatever else arrives meanwhile), so its update is accepted at delay τ and every
      worker arrives at least once every τ + 1 rounds, however slow it is.
    - ``discard_stale=True`` (opt-in): an update staler than τ is discarded on arrival (not
      counted towards the round) and its worker restarts from the current model. Not in the
      paper: a worker that is slow enough may never be accepted (starved), which biases every
      rule, AFA-CS included (its memory of that worker stays empty or frozen).

    ``local_steps``: ``"uniform"`` draws K ~ U{1..K_max} at every start; ``"per_worker"`` draws
    one K_i per worker at construction (heterogeneous but fixed, the setting where averaging raw
    deltas over-weights many-step workers); or a ``[M]`` integer tensor of fixed K_i.
    """

    def __init__(
        self,
        n_workers: int,
        arrivals_per_round: int,
        max_local_steps: int,
        *,
        local_steps: str | Tensor | Sequence[int] = "uniform",
        step_times: Tensor | Sequence[float] | None = None,
        idle_means: Tensor | Sequence[float] | None = None,
        max_staleness: int = 4,
        discard_stale: bool = False,
        seed: int = 0,
    ) -> None:
        if int(n_workers) < 1:
            raise ValueError(f"n_workers must be positive; got {n_workers}")
        if not 1 <= int(arrivals_per_round) <= int(n_workers):
            raise ValueError(
                f"arrivals_per_round must lie in [1, n_workers={n_workers}]; "
                f"got {arrivals_per_round}"
            )
        if int(max_local_steps) < 1:
            raise ValueError(f"max_local_steps must be >= 1; got {max_local_steps}")
        if int(max_staleness) < 0:
            raise ValueError(f"max_staleness must be >= 0; got {max_staleness}")
        self.n_clients = int(n_workers)
        self.arrivals_per_round = int(arrivals_per_round)
        self.max_local_steps = int(max_local_steps)
        self.max_staleness = int(max_staleness)
        if not isinstance(discard_stale, bool):
            raise TypeError(f"discard_stale must be a bool; got {type(discard_stale).__name__}")
        self.discard_stale = discard_stale
        self.step_times = self._positive_vector(step_times, "step_times", 1.0)
        self.idle_means = self._positive_vector(idle_means, "idle_means", 0.0, allow_zero=True)
        self.seed = int(seed)
        self.generator = _generator(seed)
        self.fixed_steps: Tensor | None
        if isinstance(local_steps, str):
            if local_steps not in ("uniform", "per_worker"):
                raise ValueError(
                    f"local_steps must be 'uniform', 'per_worker' or a tensor; got {local_steps!r}"
                )
            self.fixed_steps = (
                self._draw_steps(self.n_clients) if local_steps == "per_worker" else None
            )
        else:
            k = torch.as_tensor(local_steps, dtype=torch.long)
            if k.shape != (self.n_clients,):
                raise ValueError(
                    f"local_steps must have shape [{self.n_clients}]; got {list(k.shape)}"
                )
            if ((k < 1) | (k > self.max_local_steps)).any():
                raise ValueError(f"local_steps must lie in [1, max_local_steps={max_local_steps}]")
            self.fixed_steps = k.clone()
        self.round = 0
        self.version = 0
        self.now = 0.0
        self.rejected_total = 0
        # per-worker job: (arrival time, worker) in a heap; steps/start version in vectors
        self.steps = torch.zeros(self.n_clients, dtype=torch.long)
        self.start_version = torch.zeros(self.n_clients, dtype=torch.long)
        self.arrival_time = torch.zeros(self.n_clients, dtype=torch.float64)
        for i in range(self.n_clients):
            self._start(i, 0.0)
        self._heap = self._build_heap()

    def _positive_vector(self, v, name: str, default: float, allow_zero: bool = False) -> Tensor:
        if v is None:
            return torch.full((self.n_clients,), default, dtype=torch.float64)
        t = torch.as_tensor(v, dtype=torch.float64)
        if t.shape != (self.n_clients,):
            raise ValueError(f"{name} must have shape [{self.n_clients}]; got {list(t.shape)}")
        ok = torch.isfinite(t) & ((t >= 0) if allow_zero else (t > 0))
        if not ok.all():
            raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}")
        return t.clone()

    def _draw_steps(self, n: int) -> Tensor:
        return torch.randint(1, self.max_local_steps + 1, (n,), generator=self.generator)

    def _start(self, worker: int, time: float) -> None:
        k = (
            int(self.fixed_steps[worker])
            if self.fixed_steps is not None
            else int(self._draw_steps(1)[0])
        )
        # Exponential(mean) by inversion, from our own generator
        u = float(torch.rand(1, generator=self.generator, dtype=torch.float64)[0])
        idle = -float(self.idle_means[worker]) * float(np.log1p(-u))
        self.steps[worker] = k
        self.start_version[worker] = self.version
        self.arrival_time[worker] = time + idle + k * float(self.step_times[worker])

    def _build_heap(self) -> list[tuple[float, int]]:
        heap = [(float(self.arrival_time[i]), i) for i in range(self.n_clients)]
        heapq.heapify(heap)
        return heap

    def next_round(self) -> Arrivals:
        """Collect the next ``arrivals_per_round`` arrivals and close the round.

        Without ``discard_stale`` the round also waits for every worker whose delay has reached
        ``max_staleness`` (it would exceed the bound in the next round); with it, updates staler
        than ``max_staleness`` are discarded as they arrive.
        """
        arrived: list[int] = []
        rejected = 0
        waited = 0
        # the workers whose delay reaches the bound in this round (start versions do not change
        # while a round collects arrivals, so the set is fixed for the round)
        due: set[int] = set()
        if not self.discard_stale:
            reached = (self.version - self.start_version) >= self.max_staleness
            due = set(reached.nonzero().flatten().tolist())
        while len(arrived) < self.arrivals_per_round or due:
            time, worker = heapq.heappop(self._heap)
            self.now = time
            if self.version - int(self.start_version[worker]) > self.max_staleness:
                # only reachable with discard_stale: waiting keeps every delay <= max_staleness
                rejected += 1
                self._start(worker, time)
                heapq.heappush(self._heap, (float(self.arrival_time[worker]), worker))
                continue
            waited += len(arrived) >= self.arrivals_per_round
            arrived.append(worker)
            due.discard(worker)
        workers = torch.tensor(arrived, dtype=torch.long)
        result = Arrivals(
            workers=workers,
            local_steps=self.steps[workers].clone(),
            start_versions=self.start_version[workers].clone(),
            staleness=self.version - self.start_version[workers],
            close_time=self.now,
            rejected_stale=rejected,
            waited_for=waited,
        )
        self.version += 1
        self.round += 1
        self.rejected_total += rejected
        for worker in arrived:
            self._start(worker, self.now)
            heapq.heappush(self._heap, (float(self.arrival_time[worker]), worker))
        return result

    def sample(self) -> Tensor:
        """The round's participation mask (for code that only needs who arrived)."""
        mask = torch.zeros(self.n_clients, dtype=torch.bool)
        mask[self.next_round().workers] = True
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "Anarchic",
            "n_clients": self.n_clients,
            "round": self.round,
            "version": self.version,
            "now": self.now,
            "rejected_total": self.rejected_total,
            "generator": self.generator.get_state(),
            "steps": self.steps.clone(),
            "start_version": self.start_version.clone(),
            "arrival_time": self.arrival_time.clone(),
            "fixed_steps": None if self.fixed_steps is None else self.fixed_steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "Anarchic" or int(state["n_clients"]) != self.n_clients:
            raise ValueError(
                f"state is for {state.get('kind')!r} with n_clients={state.get('n_clients')}, "
                f"not Anarchic with {self.n_clients}"
            )
        self.round = int(state["round"])
        self.version = int(state["version"])
        self.now = float(state["now"])
        self.rejected_total = int(state["rejected_total"])
        self.generator.set_state(state["generator"])
        self.steps = state["steps"].clone()
        self.start_version = state["start_version"].clone()
        self.arrival_time = state["arrival_time"].clone()
        fixed = state["fixed_steps"]
        self.fixed_steps = None if fixed is None else fixed.clone()
        # heap order is a function of (arrival_time, worker): rebuilding it is exact
        self._heap = self._build_heap()
