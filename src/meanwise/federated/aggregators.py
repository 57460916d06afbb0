"""Server-side aggregation rules over flat client updates, all through ``meanwise.average``.

Every aggregator sees the round's client deltas Δ_n = y_n − x as one ``[S, P]`` tensor (S
participants, P flattened parameters) with the clients' indices ``[S]``, and returns the new
global vector ``x + server_lr · direction``. Working on flat vectors keeps the memory-based
methods (MIFA, FedVARP, AFA-CS: one stored vector per client) a single ``[N, P]`` tensor.

Shared rules: a client whose update is not finite is dropped and counted as absent
(``dropped_nonfinite``, with a warning); an aggregate that would make the global model
non-finite although every update is finite (huge finite updates overflow) is refused as a
whole: the round is a no-op for the model (memories restored), counted in ``refused_rounds``
with a warning naming the clients. Participation statistics (FedAU's intervals) still record
the round: who took part was observed, only their updates were not applied.
``max_update_norm`` (off by default) clips each update's L2 norm first, the defence against
huge finite updates dragging the model far away. A round without (finite) participants leaves
the model unchanged. So the global model never becomes NaN or inf.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from meanwise.average import AverageOverflowError, weighted_average
from meanwise.federated.participation import validate_probabilities

__all__ = [
    "Aggregator",
    "FedAvg",
    "KnownParticipation",
    "MIFA",
    "FedVARP",
    "FedAU",
    "ParticipationIntervalWeights",
    "AFACD",
    "AFACS",
]


class ParticipationIntervalWeights:
    """FedAU's online weights: the mean of each client's recorded participation intervals.

    ``update(mask)`` takes the round's boolean mask ``[N]`` and returns float64 weights ``[N]``:
    for a participating client the mean of its intervals recorded so far (1.0 if none), for an
    absent client 0. Afterwards it records, as in the paper's released code: a participating
    client records (rounds absent since its last record) + 1 and resets; with ``cutoff`` K an
    absent client that reaches K rounds of absence records K and resets. O(N) memory: a sum, a
    count and an absence counter per client.
    """

    def __init__(self, n_clients: int, cutoff: int | None = None) -> None:
        if int(n_clients) < 1:
            raise ValueError(f"n_clients must be positive; got {n_clients}")
        if cutoff is not None and int(cutoff) < 1:
            raise ValueError(f"cutoff must be a positive integer or None; got {cutoff}")
        self.n_clients = int(n_clients)
        self.cutoff = None if cutoff is None else int(cutoff)
        self.absent_rounds = torch.zeros(self.n_clients, dtype=torch.long)
        self.interval_sum = torch.zeros(self.n_clients, dtype=torch.float64)
        self.interval_count = torch.zeros(self.n_clients, dtype=torch.long)

    def interval_means(self) -> Tensor:
        """``[N]`` float64: each client's mean recorded participation interval, the weight it
        would get if it participated now (0 for a client with no interval recorded yet)."""
        mean = self.interval_sum / self.interval_count.clamp(min=1)
        return torch.where(self.interval_count > 0, mean, 0.0)

    def update(self, mask: Tensor | Sequence[bool]) -> Tensor:
        m = torch.as_tensor(mask, dtype=torch.bool)
        self._to(m.device)
        if m.shape != (self.n_clients,):
            raise ValueError(
                f"mask must be a boolean vector of shape [{self.n_clients}]; got {list(m.shape)}"
            )
        counted = self.interval_count > 0
        mean = self.interval_sum / self.interval_count.clamp(min=1)
        weights = torch.where(counted, mean, torch.ones_like(mean))
        weights = torch.where(m, weights, torch.zeros_like(weights))

        self.absent_rounds = torch.where(m, self.absent_rounds, self.absent_rounds + 1)
        recorded = m.clone()
        interval = torch.where(m, self.absent_rounds + 1, self.absent_rounds)
        if self.cutoff is not None:
            recorded |= self.absent_rounds >= self.cutoff
        self.interval_sum += torch.where(recorded, interval, 0).double()
        self.interval_count += recorded.long()
        self.absent_rounds = torch.where(recorded, 0, self.absent_rounds)
        return weights

    def _to(self, device: torch.device) -> None:
        # the counters live where the masks come from (the aggregator's device), so a round
        # never mixes devices; a checkpoint loaded on the CPU moves on its first update
        if self.absent_rounds.device != device:
            self.absent_rounds = self.absent_rounds.to(device)
            self.interval_sum = self.interval_sum.to(device)
            self.interval_count = self.interval_count.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_clients": self.n_clients,
            "cutoff": self.cutoff,
            "absent_rounds": self.absent_rounds.clone(),
            "interval_sum": self.interval_sum.clone(),
            "interval_count": self.interval_count.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_clients"]) != self.n_clients or state["cutoff"] != self.cutoff:
            raise ValueError(
                f"state has n_clients={state['n_clients']}, cutoff={state['cutoff']}; "
                f"expected {self.n_clients}, {self.cutoff}"
            )
        self.absent_rounds = state["absent_rounds"].clone()
        self.interval_sum = state["interval_sum"].clone()
        self.interval_count = state["interval_count"].clone()


class Aggregator:
    """Base class: validation, the non-finite filter, the empty-round rule, checkpointing."""

    #: whether ``step`` needs ``local_steps`` (the AFA rules normalize by them)
    needs_local_steps = False
    #: earlier class names whose ``state_dict`` (``"kind"``) this class still loads
    former_kinds: tuple[str, ...] = ()

    def __init__(
        self, n_clients: int, server_lr: float = 1.0, *, max_update_norm: float | None = None
    ) -> None:
        if int(n_clients) < 1:
            raise ValueError(f"n_clients must be positive; got {n_clients}")
        if not (server_lr > 0 and torch.isfinite(torch.tensor(float(server_lr)))):
            raise ValueError(f"server_lr must be positive and finite; got {server_lr}")
        if max_update_norm is not None and not (0 < max_update_norm < float("inf")):
            raise ValueError(
                f"max_update_norm must be a positive finite number or None; got {max_update_norm}"
            )
        self.n_clients = int(n_clients)
        self.server_lr = float(server_lr)
        self.max_update_norm = None if max_update_norm is None else float(max_update_norm)
        self.dropped_nonfinite = 0
        self.refused_rounds = 0
        self.clipped_updates = 0
        self.rounds = 0

    def step(
        self,
        x: Tensor,
        deltas: Tensor,
        clients: Tensor | Sequence[int],
        *,
        local_steps: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """Return the new global vector after one round.

        Args:
            x: the global parameters ``[P]``.
            deltas: the participants' updates ``[S, P]`` (y_n − x_start), on x's device.
            clients: their indices ``[S]``, distinct, in ``[0, n_clients)``.
            local_steps: ``[S]`` local step counts (required by AFA-CD / AFA-CS).

        Devices and dtypes follow the inputs: the result has x's device and dtype; client
        indices, masks and weights are moved to x's device, and per-client state (memories,
        FedAU's interval counters) lives on it (memories in the dtype of the first updates).
        """
        if not isinstance(x, Tensor) or not isinstance(deltas, Tensor):
            raise TypeError("x and deltas must be tensors")
        if deltas.device != x.device:
            raise ValueError(f"deltas are on {deltas.device} but x is on {x.device}; need one")
        idx = torch.as_tensor(clients, dtype=torch.long, device=x.device).reshape(-1)
        if x.dim() != 1:
            raise ValueError(f"x must be the flat global vector [P]; got shape {list(x.shape)}")
        if deltas.dim() != 2 or deltas.shape[1] != x.shape[0] or deltas.shape[0] != idx.numel():
            raise ValueError(
                f"deltas must be [S={idx.numel()}, P={x.shape[0]}] (one row per client); "
                f"got {list(deltas.shape)}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_clients):
            raise ValueError(f"clients must lie in [0, n_clients={self.n_clients})")
        if idx.unique().numel() != idx.numel():
            raise ValueError("clients must be distinct within a round")
        steps = None
        if self.needs_local_steps:
            if local_steps is None:
                raise ValueError(f"{type(self).__name__} needs local_steps (one per client)")
            steps = torch.as_tensor(local_steps, dtype=torch.long, device=x.device).reshape(-1)
            if steps.numel() != idx.numel() or (steps < 1).any():
                raise ValueError("local_steps must be [S] positive integers, one per client")
        finite = torch.isfinite(deltas).all(dim=1)
        if not bool(finite.all()):
            dropped = int((~finite).sum())
            self.dropped_nonfinite += dropped
            warnings.warn(
                f"{type(self).__name__}: dropped {dropped} non-finite client update(s) "
                f"(clients {idx[~finite].tolist()}); counted as absent",
                RuntimeWarning,
                stacklevel=2,
            )
            deltas, idx = deltas[finite], idx[finite]
            steps = None if steps is None else steps[finite]
        if self.max_update_norm is not None and deltas.shape[0]:
            deltas = self._clip(deltas)
        self.rounds += 1
        saved = self._save_memory(idx)
        try:
            direction = self._direction(deltas, idx, steps)
        except AverageOverflowError:
            direction, new = False, None
        else:
            if direction is None:  # nobody (finite) took part: the model stays where it is
                return x.clone()
            new = x + self.server_lr * direction.to(x.dtype)
        if new is None or not bool(torch.isfinite(new).all()):
            self._restore_memory(idx, saved)
            self.refused_rounds += 1
            warnings.warn(
                f"{type(self).__name__}: refused round {self.rounds}: the aggregate of clients "
                f"{idx.tolist()} is not finite in {x.dtype} although their updates are; the "
                "model is unchanged (max_update_norm= bounds such updates)",
                RuntimeWarning,
                stacklevel=2,
            )
            return x.clone()
        return new

    def _clip(self, deltas: Tensor) -> Tensor:
        """Scale each row to L2 norm <= max_update_norm (norms computed overflow-safe)."""
        scale = deltas.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(deltas.dtype).tiny)
        norms = (deltas / scale).norm(dim=1, keepdim=True).double() * scale.double()
        factor = (self.max_update_norm / norms).clamp(max=1.0)
        self.clipped_updates += int((factor < 1).sum())
        return (deltas.double() * factor).to(deltas.dtype)

    def _save_memory(self, clients: Tensor) -> Tensor | None:
        """The rows a round may overwrite, to undo a refused round (memory aggregators)."""
        memory = getattr(self, "memory", None)
        if memory is None:
            return None
        if memory.device != clients.device:  # e.g. loaded from a CPU checkpoint
            self.memory = memory = memory.to(clients.device)
        return memory[clients].clone()

    def _restore_memory(self, clients: Tensor, saved: Tensor | None) -> None:
        if not hasattr(self, "memory"):
            return
        if saved is None:
            self.memory = None  # the refused round was the first: no memory yet
        else:
            self.memory[clients] = saved

    def _direction(self, deltas: Tensor, clients: Tensor, steps: Tensor | None) -> Tensor | None:
        raise NotImplementedError

    def _mask(self, clients: Tensor) -> Tensor:
        mask = torch.zeros(self.n_clients, dtype=torch.bool, device=clients.device)
        mask[clients] = True
        return mask

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": type(self).__name__,
            "n_clients": self.n_clients,
            "dropped_nonfinite": self.dropped_nonfinite,
            "refused_rounds": self.refused_rounds,
            "clipped_updates": self.clipped_updates,
            "rounds": self.rounds,
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = (type(self).__name__, *type(self).former_kinds)
        if state.get("kind") not in kinds or int(state["n_clients"]) != self.n_clients:
            raise ValueError(
                f"state is for {state.get('kind')!r} with n_clients={state.get('n_clients')}; "
                f"this is {type(self).__name__} with {self.n_clients}"
            )
        self.dropped_nonfinite = int(state["dropped_nonfinite"])
        self.refused_rounds = int(state.get("refused_rounds", 0))  # absent before 0.1.1
        self.clipped_updates = int(state.get("clipped_updates", 0))
        self.rounds = int(state["rounds"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass


class FedAvg(Aggregator):
    """Plain averaging: ``over="participants"`` (1/|S| Σ_S Δ_n) or ``"all"`` (1/N Σ_S Δ_n)."""

    def __init__(
        self,
        n_clients: int,
        over: str = "participants",
        server_lr: float = 1.0,
        *,
        max_update_norm: float | None = None,
    ):
        super().__init__(n_clients, server_lr, max_update_norm=max_update_norm)
        if over not in ("participants", "all"):
            raise ValueError(f"over must be 'participants' or 'all'; got {over!r}")
        self.over = over

    def _direction(self, deltas, clients, steps):
        if clients.numel() == 0:
            return None
        if self.over == "participants":
            return weighted_average(deltas)
        return weighted_average(deltas, denominator=self.n_clients)


class KnownParticipation(Aggregator):
    """The oracle with known probabilities: 1/N Σ_S Δ_n / p_n (unbiased for the full average)."""

    def __init__(
        self,
        probs: Tensor | Sequence[float],
        server_lr: float = 1.0,
        *,
        max_update_norm: float | None = None,
    ):
        p = validate_probabilities(probs)
        super().__init__(p.numel(), server_lr, max_update_norm=max_update_norm)
        self.probs = p

    def _direction(self, deltas, clients, steps):
        if clients.numel() == 0:
            return None
        probs = self.probs.to(clients.device)[clients]
        return weighted_average(deltas, 1.0 / probs, denominator=self.n_clients)


def _ensure_memory(aggregator: Aggregator, like: Tensor) -> Tensor:
    """The per-client memory ``[N, P]`` on ``like``'s device: allocated at the first updates
    (zeros in their dtype), moved along if the updates come from another device later (a
    checkpoint loaded on the CPU, say)."""
    memory = aggregator.memory
    if memory is None:
        memory = like.new_zeros((aggregator.n_clients, like.shape[1]))
    elif memory.shape[1] != like.shape[1]:
        raise ValueError(
            f"updates have {like.shape[1]} parameters; the memory has {memory.shape[1]}"
        )
    elif memory.device != like.device:
        memory = memory.to(like.device)
    aggregator.memory = memory
    return memory


class _Memory(Aggregator):
    """Aggregators that keep one stored vector per client (allocated on first use)."""

    def __init__(
        self, n_clients: int, server_lr: float = 1.0, *, max_update_norm: float | None = None
    ):
        super().__init__(n_clients, server_lr, max_update_norm=max_update_norm)
        self.memory: Tensor | None = None

    def _ensure_memory(self, like: Tensor) -> Tensor:
        return _ensure_memory(self, like)

    def _extra_state(self):
        return {"memory": None if self.memory is None else self.memory.clone()}

    def _load_extra_state(self, state):
        memory = state["memory"]
        self.memory = None if memory is None else memory.clone()


class MIFA(_Memory):
    """MIFA (Gu et al., 2021): average of every client's latest update, 1/N Σ_n G_n.

    Clients that have not participated yet contribute zero (the memory starts at zero).
    """

    def _direction(self, deltas, clients, steps):
        if clients.numel() == 0:
            return None
        memory = self._ensure_memory(deltas)
        memory[clients] = deltas.to(memory.dtype)
        return weighted_average(memory)


class FedVARP(_Memory):
    """FedVARP (Jhunjhunwala et al., 2022): 1/N Σ_n y_n + 1/|S| Σ_S (Δ_n − y_n), then y_S ← Δ_S.

    The stored y_n are each client's last update (zero before its first), a control variate
    that removes the variance of client sampling.
    """

    def _direction(self, deltas, clients, steps):
        if clients.numel() == 0:
            return None
        memory = self._ensure_memory(deltas)
        correction = weighted_average(deltas.to(memory.dtype) - memory[clients])
        direction = weighted_average(memory) + correction
        memory[clients] = deltas.to(memory.dtype)
        return direction


class FedAU(Aggregator):
    """FedAU (Wang & Ji, NeurIPS 2023): 1/N Σ_S ω_n Δ_n, ω_n from participation intervals."""

    def __init__(
        self,
        n_clients: int,
        cutoff: int | None = None,
        server_lr: float = 1.0,
        *,
        max_update_norm: float | None = None,
    ):
        super().__init__(n_clients, server_lr, max_update_norm=max_update_norm)
        self.weights = ParticipationIntervalWeights(n_clients, cutoff)

    def _direction(self, deltas, clients, steps):
        # The intervals advance every round, empty ones included: absence is information.
        omega = self.weights.update(self._mask(clients))
        if clients.numel() == 0:
            return None
        return weighted_average(deltas, omega[clients], denominator=self.n_clients)

    def _extra_state(self):
        return {"weights": self.weights.state_dict()}

    def _load_extra_state(self, state):
        self.weights.load_state_dict(state["weights"])


class AFACD(Aggregator):
    """AFA-CD (Yang et al., ICML 2022): x ← x − η·η_L·mean_i G_i, G_i = (x_start − y_i)/(η_L K_i).

    ``n_clients`` is the number of workers M. ``arrivals_per_round`` (m) is the round size the
    participation process delivers; the rule itself averages whatever arrived.
    """

    needs_local_steps = True
    former_kinds = ("AFA_CD",)

    def __init__(
        self,
        n_clients: int,
        server_lr: float,
        local_lr: float,
        arrivals_per_round: int = 1,
        *,
        max_update_norm: float | None = None,
    ):
        super().__init__(n_clients, server_lr, max_update_norm=max_update_norm)
        if not local_lr > 0:
            raise ValueError(f"local_lr must be positive; got {local_lr}")
        if not 1 <= int(arrivals_per_round) <= self.n_clients:
            raise ValueError(
                f"arrivals_per_round must lie in [1, {self.n_clients}]; got {arrivals_per_round}"
            )
        self.local_lr = float(local_lr)
        self.arrivals_per_round = int(arrivals_per_round)

    def normalized_updates(self, deltas: Tensor, steps: Tensor) -> Tensor:
        """G_i = (x_start − y_i) / (η_L K_i) = −Δ_i / (η_L K_i): the average local gradient."""
        return -deltas / (self.local_lr * steps.to(deltas.dtype))[:, None]

    def _direction(self, deltas, clients, steps):
        if clients.numel() == 0:
            return None
        g = weighted_average(self.normalized_updates(deltas, steps))
        return -self.local_lr * g


class AFACS(AFACD):
    """AFA-CS: x ← x − η·η_L·(1/M) Σ_{all M workers} G_i with each worker's latest G_i.

    The memory starts at zero; stale entries of workers that did not arrive are included, which
    is what removes AFA-CD's bias under non-uniform arrivals.
    """

    former_kinds = ("AFA_CS",)

    def __init__(
        self,
        n_clients: int,
        server_lr: float,
        local_lr: float,
        arrivals_per_round: int = 1,
        *,
        max_update_norm: float | None = None,
    ):
        super().__init__(
            n_clients, server_lr, local_lr, arrivals_per_round, max_update_norm=max_update_norm
        )
        self.memory: Tensor | None = None

    def _direction(self, deltas, clients, steps):
        if clients.numel() == 0:
            return None
        memory = _ensure_memory(self, deltas)
        memory[clients] = self.normalized_updates(deltas, steps).to(memory.dtype)
        return -self.local_lr * weighted_average(memory)

    _extra_state = _Memory._extra_state
    _load_extra_state = _Memory._load_extra_state


# Renamed to the CapWords class names PEP 8 asks for (the paper's "AFA-CD" / "AFA-CS");
# the old names still work, with a DeprecationWarning, through the module __getattr__ below.
_DEPRECATED_NAMES = {"AFA_CD": "AFACD", "AFA_CS": "AFACS"}


def renamed(name: str) -> type:
    """The class an old name stands for, warning at the code that used the old name (called
    directly by a module ``__getattr__``)."""
    new = _DEPRECATED_NAMES[name]
    warnings.warn(
        f"{name} is deprecated; use {new} (the same class, from meanwise.federated)",
        DeprecationWarning,
        stacklevel=3,
    )
    return globals()[new]


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED_NAMES:
        return renamed(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
