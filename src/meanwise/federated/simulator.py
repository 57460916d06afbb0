"""The federated simulator: participation → local training → aggregation, round after round.

One round: the participation process names the clients (or, for :class:`Anarchic`, the
arriving workers with their local step counts and the stale model versions they started
from); they train locally (:mod:`meanwise.engine.local_training`, vectorized when the
model allows); the aggregator turns their deltas into the new global model. The engine's
:class:`~meanwise.engine.loop.CheckpointedLoop` runs the rounds: evaluation every
``eval_every`` rounds, logged as JSON lines; a checkpoint every ``checkpoint_every`` rounds
holds everything the next round depends on (global model, aggregator memory, participation
state, the minibatch generator, stale-model history), so ``run(..., resume=True)`` continues
bit-exactly. Models are flat vectors in the engine's
:class:`~meanwise.engine.layout.ParameterLayout`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.engine.local_training import (
    LocalTrainer,
    LocalTraining,
    data_on,
    draw_batches,
    stack_blocker,
)
from meanwise.engine.loop import CheckpointedLoop, LoopSettings, evaluate_models
from meanwise.engine.population import Population
from meanwise.federated.aggregators import Aggregator
from meanwise.federated.participation import Anarchic, ParticipationProcess

__all__ = ["FederatedSimulator", "FederatedSweep", "vmap_blocker"]

# The vectorized path trains the round's clients in chunks whose gathered minibatches
# ([chunk, B, features] per local step) take about this many bytes. One [S, B, ...] tensor for
# 10^4 clients is ~80 MB: glibc serves such allocations with mmap (its threshold is 32 MB at
# most), so every local step page-faulted fresh memory, and the working set left the caches.
# Measured on this 2-core machine, 10^4 logistic-regression clients, 10 steps of batch 32:
# 6.4 s in one vmap call, 1.4 s in chunks of 2048 clients (16 MB).
CHUNK_BYTES = 16 * 2**20


def vmap_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained under vmap, or None if it can."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.training
            and module.track_running_stats
        ):
            return (
                f"module {name!r} ({type(module).__name__}) is in train mode and updates its "
                "running statistics in place, which vmap cannot batch over clients"
            )
    return None


# The AdaHessian probes' stream, apart from the minibatches' (a second generator seeded from
# the simulator's seed; an odd constant keeps the two seeds distinct)
_PROBE_SEED_OFFSET = 0x5DEECE66D


def _run_length(num_rounds: int | None, rounds: int | None, unit: str = "rounds") -> int:
    """``num_rounds``, or the deprecated ``rounds=`` keyword (with a DeprecationWarning)."""
    if rounds is not None:
        if num_rounds is not None:
            raise TypeError(f"pass num_{unit} only (rounds= is its deprecated spelling)")
        warnings.warn(
            f"run({unit}=...) is deprecated; use run(num_{unit}=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        return rounds
    if num_rounds is None:
        raise TypeError(f"run() needs num_{unit}")
    return num_rounds


def _test_on(test: tuple[Tensor, Tensor], device: torch.device, dtype: torch.dtype):
    features, labels = test
    if features.is_floating_point():
        features = features.to(device=device, dtype=dtype)
    return features.to(device), labels.to(device)


def _buffer_on(buffer: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    # integer buffers (BatchNorm's num_batches_tracked) keep their dtype
    moved = buffer.to(device=device, dtype=dtype if buffer.is_floating_point() else None)
    return moved.clone() if moved is buffer else moved


class FederatedSimulator(LoopSettings):
    """Simulate federated training of ``model`` over the clients of ``train``.

    Args:
        model: the architecture; its parameters are the initial global model. Its buffers are
            used as they are (in the vectorized path they never change).
        train: the clients' training data (flat storage).
        aggregator: a :class:`~meanwise.federated.aggregators.Aggregator` for ``n_clients``.
        participation: a participation process over the same clients (or :class:`Anarchic`).
        local: the local training recipe.
        test: ``(features, labels)`` for evaluation, or None.
        loss_fn: ``loss_fn(logits, labels, reduction="none")`` (default cross entropy).
        vectorize: ``"auto"`` (vectorized unless the model cannot be vmapped: a model with
            BatchNorm in train mode is detected up front, any other failure of the vmap call is
            caught when it happens; either way a warning says why and the sequential loop
            runs), True (vmap failures raise), ``"vmap"`` (never the batched-matmul path that
            Linear/activation stacks otherwise take, see
            :class:`~meanwise.engine.local_training.LocalTrainer`'s ``"stacked"``
            execution) or False.
        chunk_bytes: the vectorized path trains clients in chunks whose gathered minibatch per
            local step is about this large (see ``CHUNK_BYTES``); results do not depend on it.
        device, dtype: where and in which floating dtype the models, optimizer state and
            data live (the data are copied there once, unless they already are); by default
            those of ``model``'s parameters. Minibatches are drawn on the CPU, so a run draws
            the same ones on every device.
    """

    def __init__(
        self,
        model: nn.Module,
        train: FederatedDataset,
        aggregator: Aggregator,
        participation: ParticipationProcess | Anarchic,
        local: LocalTraining,
        *,
        test: tuple[Tensor, Tensor] | None = None,
        loss_fn: Callable[..., Tensor] = F.cross_entropy,
        eval_every: int = 10,
        checkpoint_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        seed: int = 0,
        vectorize: bool | str = "auto",
        chunk_bytes: int = CHUNK_BYTES,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        n = train.n_clients
        for name, other in (("aggregator", aggregator), ("participation", participation)):
            if other.n_clients != n:
                raise ValueError(f"{name} is for {other.n_clients} clients; train has {n}")
        self.loop = CheckpointedLoop(
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            checkpoint_path=checkpoint_path,
            log_path=log_path,
        )
        if vectorize not in ("auto", "vmap", True, False):
            raise ValueError(f"vectorize must be 'auto', 'vmap', True or False; got {vectorize!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int; got {chunk_bytes!r}")
        if isinstance(participation, Anarchic) and not aggregator.needs_local_steps:
            warnings.warn(
                "Anarchic workers run different step counts; this aggregator ignores them "
                "(the biased baseline of the AFA paper)",
                stacklevel=2,
            )
        start = Population.of_model(model, 1, device=device, dtype=dtype)
        self.layout = start.layout
        self.device = start.device
        self.model = model
        self.train = data_on(train, self.device, self.layout.dtype)
        self.aggregator = aggregator
        self.participation = participation
        self.local = local
        self.test = None if test is None else _test_on(test, self.device, self.layout.dtype)
        self.loss_fn = loss_fn
        self.generator = torch.Generator().manual_seed(int(seed))
        # AdaHessian's Hutchinson probes (only a rule that needs them draws from it)
        self.probe_generator = torch.Generator().manual_seed(int(seed) + _PROBE_SEED_OFFSET)
        self.x = start.params[0].clone()
        self.buffers = {
            k: _buffer_on(v.detach(), self.device, self.layout.dtype)
            for k, v in model.named_buffers()
        }
        self.round = 0
        # stale global models for anarchic workers: history[s] is the model s versions ago
        depth = participation.max_staleness + 1 if isinstance(participation, Anarchic) else 1
        self.history: list[Tensor] = [self.x.clone()]
        self.history_depth = depth
        self.vectorize = vectorize
        self.chunk_bytes = chunk_bytes
        # Linear/activation stacks on flat features train with batched matmuls ("stacked"):
        # the same rule and minibatches as vmap, without its per-operation dispatch, which
        # dominated rounds of a few small clients (fedau/afa experiments: several times faster)
        self.stacked = (
            vectorize is not False and train.features.dim() == 2 and stack_blocker(model) is None
        )
        if vectorize == "auto":
            blocker = vmap_blocker(model)
            self.vectorized = blocker is None
            if blocker is not None:
                warnings.warn(
                    f"local training falls back to a sequential per-client loop: {blocker}",
                    stacklevel=2,
                )
        else:
            self.vectorized = bool(vectorize)
        if vectorize == "vmap":
            self.stacked = False
        self._trainers: dict[str, LocalTrainer] = {}

    def _trainer(self, execution: str) -> LocalTrainer:
        if execution not in self._trainers:
            self._trainers[execution] = LocalTrainer(
                self.model, self.local, self.loss_fn, execution=execution,
                generator=self.probe_generator,
            )  # fmt: skip
        return self._trainers[execution]

    # -- one round ---------------------------------------------------------------------------

    def _participants(self) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        if isinstance(self.participation, Anarchic):
            arrivals = self.participation.next_round()
            starts = torch.stack([self.history[int(s)] for s in arrivals.staleness])
            info = {
                "mean_staleness": float(arrivals.staleness.double().mean()),
                "rejected_stale": arrivals.rejected_stale,
            }
            return arrivals.workers, arrivals.local_steps, starts, info
        mask = self.participation.sample()
        clients = mask.nonzero().flatten()
        steps = torch.full((clients.numel(),), int(self.local.steps), dtype=torch.long)
        return clients, steps, self.x.expand(clients.numel(), -1), {}

    def local_updates(self, clients: Tensor, steps: Tensor, starts: Tensor) -> Tensor:
        """The clients' trained flat parameters ``[S, P]`` from flat starting points ``starts``.

        ``starts`` may also hold R stacked runs, ``[R·S, P]`` run-major (row r·S + s is client
        ``clients[s]`` in run r): every run sees the same minibatches (one draw), as the
        side-by-side runs of :class:`FederatedSweep` need.
        """
        n = clients.numel()
        if n == 0 or starts.dim() != 2 or starts.shape[0] % n:
            raise ValueError(f"starts must be [R*S, P] for S={n} clients; got {list(starts.shape)}")
        replicas = starts.shape[0] // n
        index, valid = draw_batches(
            self.train, clients, int(steps.max()), self.local.batch_size, self.generator
        )
        if replicas > 1:
            index, valid = index.repeat(1, replicas, 1), valid.repeat(1, replicas, 1)
            steps = steps.repeat(replicas)
        probes = self.probe_generator.get_state()
        while self.vectorized:
            try:
                return self._train_chunks(starts, index, valid, steps)
            except Exception as error:
                self.probe_generator.set_state(probes)  # the redone round draws them again
                # vmap refuses some models only when it runs them (data-dependent control
                # flow, .item(), in-place updates of captured tensors, ...). The vectorized
                # call is pure, so the round can simply be redone another way.
                if self.stacked:  # a surprise in the batched-matmul path: vmap next
                    self.stacked = False
                    continue
                if self.vectorize is True or self.vectorize == "vmap":
                    raise
                self.vectorized = False
                warnings.warn(
                    "local training falls back to a sequential per-client loop: vmap could not "
                    f"run the model ({type(error).__name__}: {error})",
                    stacklevel=2,
                )
        start = Population.zeros_state(self.layout, starts, self.local.state_slots)
        trained = self._trainer("sequential").train(
            start, self.train, index, valid, steps, buffers=self.buffers
        )
        # buffers (BatchNorm statistics) are not trained: the participants' plain mean
        for key, value in self.buffers.items():
            if value.is_floating_point():
                self.buffers[key] = torch.stack([b[key] for b in trained.buffers]).mean(0)
        return trained.params

    def _train_chunks(self, starts: Tensor, index: Tensor, valid: Tensor, steps: Tensor) -> Tensor:
        row = self.train.features[:1]
        per_client = max(1, self.local.batch_size * row.numel() * row.element_size())
        chunk = max(1, self.chunk_bytes // per_client)
        out = torch.empty_like(starts)
        trainer = self._trainer("stacked" if self.stacked else "vmap")
        for lo in range(0, starts.shape[0], chunk):
            rows = slice(lo, lo + chunk)
            start = Population.zeros_state(self.layout, starts[rows], self.local.state_slots)
            trained = trainer.train(
                start, self.train, index[:, rows], valid[:, rows], steps[rows],
                buffers=self.buffers,
            )  # fmt: skip
            out[rows] = trained.params
        return out

    def step(self) -> dict[str, Any]:
        """Run one round; returns the round's record (participants, drops)."""
        clients, steps, starts, info = self._participants()
        if clients.numel():
            deltas = self.local_updates(clients, steps, starts) - starts
        else:
            deltas = self.x.new_zeros((0, self.x.numel()))
        self.x = self.aggregator.step(self.x, deltas, clients, local_steps=steps)
        self.history = [self.x.clone(), *self.history][: self.history_depth]
        self.round += 1
        return {"participants": int(clients.numel()), **info}

    # -- the loop's protocol (meanwise.engine.loop.Checkpointable) ---------------------------

    @property
    def position(self) -> int:
        return self.round

    def advance(self, until: int) -> dict[str, Any]:
        """Run rounds up to ``until``; returns the last round's record."""
        info: dict[str, Any] = {}
        while self.round < until:
            info = self.step()
        return info

    def record(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "round": self.round,
            **info,
            "dropped_nonfinite": self.aggregator.dropped_nonfinite,
            **self.evaluate(),
        }

    # -- evaluation, checkpoints ---------------------------------------------------------------

    def global_vector(self) -> Tensor:
        """The global model as a flat vector ``[P]`` in :attr:`layout` (a copy)."""
        return self.x.clone()

    def global_parameters(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.layout.unflatten(self.x).items()}

    def evaluate(self) -> dict[str, float]:
        if self.test is None:
            return {}
        losses, accuracies = evaluate_models(
            self.model, self.x[None], self.layout, self.buffers, self.test, self.loss_fn
        )
        return {"test_loss": float(losses[0]), "test_accuracy": float(accuracies[0])}

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "x": self.x.clone(),
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
            "history": [h.clone() for h in self.history],
            "aggregator": self.aggregator.state_dict(),
            "participation": self.participation.state_dict(),
            "generator": self.generator.get_state(),
            "probe_generator": self.probe_generator.get_state(),
            "metrics": list(self.loop.metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["x"].shape != self.x.shape:
            raise ValueError(
                f"checkpoint has {state['x'].numel()} parameters; the model has {self.x.numel()}"
            )
        self.round = int(state["round"])
        self.x = state["x"].clone()
        self.buffers = {k: v.clone() for k, v in state["buffers"].items()}
        self.history = [h.clone() for h in state["history"]]
        self.aggregator.load_state_dict(state["aggregator"])
        self.participation.load_state_dict(state["participation"])
        self.generator.set_state(state["generator"])
        if "probe_generator" in state:  # absent from checkpoints of meanwise <= 0.1
            self.probe_generator.set_state(state["probe_generator"])
        self.loop.metrics = list(state["metrics"])

    def run(
        self, num_rounds: int | None = None, *, resume: bool = False, rounds: int | None = None
    ) -> list[dict[str, Any]]:
        """Train until ``num_rounds`` rounds in total have run; returns the logged metrics.

        With ``resume=True`` and an existing checkpoint, continue from it (bit-exactly).
        ``rounds=`` is the deprecated spelling of ``num_rounds=``.
        """
        return self.loop.run(self, _run_length(num_rounds, rounds), resume=resume)


class FederatedSweep(FederatedSimulator):
    """Several runs that differ only in their aggregator, trained side by side.

    A method comparison or a server-rate grid usually gives every run the same initial model,
    participation stream and minibatches (a paired comparison). Here they share them by
    construction: each round draws the participants once and the minibatches once, and one
    vectorized local-training call trains every active run's participants together (R·S
    stacked models), which for small models costs little more than one run. Run r is exactly
    what a :class:`FederatedSimulator` with ``aggregators[r]`` and the same seeds computes (up to
    float rounding; tested).

    ``xs[r]`` is run r's global vector; ``stop(r)`` freezes a run (e.g. one that diverged) so it
    costs nothing from then on; ``evaluate()`` returns per-run lists. Anarchic participation
    (stale per-run model histories) is not supported.
    """

    def __init__(
        self,
        model: nn.Module,
        train: FederatedDataset,
        aggregators: list[Aggregator] | tuple[Aggregator, ...],
        participation: ParticipationProcess,
        local: LocalTraining,
        **kwargs: Any,
    ) -> None:
        if not isinstance(aggregators, list | tuple) or not aggregators:
            raise ValueError("aggregators must be a non-empty list of Aggregator (one per run)")
        if isinstance(participation, Anarchic):
            raise TypeError("FederatedSweep does not support Anarchic participation")
        if len({id(a) for a in aggregators}) != len(aggregators):
            raise ValueError("aggregators must be distinct objects (each keeps its own state)")
        super().__init__(model, train, aggregators[0], participation, local, **kwargs)
        for r, aggregator in enumerate(aggregators):
            if not isinstance(aggregator, Aggregator):
                raise TypeError(f"aggregators[{r}] is {type(aggregator).__name__}, not Aggregator")
            if aggregator.n_clients != train.n_clients:
                raise ValueError(
                    f"aggregators[{r}] is for {aggregator.n_clients} clients; "
                    f"train has {train.n_clients}"
                )
        if not self.vectorized and any(b.is_floating_point() for b in self.buffers.values()):
            raise ValueError(
                "FederatedSweep needs a vectorizable model: the sequential fallback averages "
                "buffers (BatchNorm statistics) over all runs' clients together"
            )
        self.aggregators = list(aggregators)
        self.xs = self.x.expand(len(aggregators), -1).clone()
        self.active = torch.ones(len(aggregators), dtype=torch.bool)

    @property
    def n_runs(self) -> int:
        return len(self.aggregators)

    def stop(self, run: int) -> None:
        """Freeze run ``run``: its model stays as it is and it is not trained any more."""
        if not 0 <= int(run) < self.n_runs:
            raise ValueError(f"run must lie in [0, {self.n_runs}); got {run}")
        self.active[int(run)] = False

    def step(self) -> dict[str, Any]:
        mask = self.participation.sample()
        clients = mask.nonzero().flatten()
        n = clients.numel()
        steps = torch.full((n,), int(self.local.steps), dtype=torch.long)
        runs = self.active.nonzero().flatten()
        deltas = self.x.new_zeros((runs.numel(), n, self.x.numel()))
        if n and runs.numel():
            starts = self.xs[runs].repeat_interleave(n, dim=0)  # run-major rows
            deltas = (self.local_updates(clients, steps, starts) - starts).view(len(runs), n, -1)
        for j, r in enumerate(runs.tolist()):
            self.xs[r] = self.aggregators[r].step(self.xs[r], deltas[j], clients)
        self.x = self.xs[0]
        self.round += 1
        return {"participants": n, "active_runs": int(runs.numel())}

    def _check_run(self, run: int) -> int:
        if not 0 <= int(run) < self.n_runs:
            raise ValueError(f"run must lie in [0, {self.n_runs}); got {run}")
        return int(run)

    def run_vector(self, run: int) -> Tensor:
        """Run ``run``'s global model as a flat vector ``[P]`` in :attr:`layout` (a copy)."""
        return self.xs[self._check_run(run)].clone()

    def run_parameters(self, run: int) -> dict[str, Tensor]:
        """Run ``run``'s global parameters (copies)."""
        return {
            k: v.clone() for k, v in self.layout.unflatten(self.xs[self._check_run(run)]).items()
        }

    def active_runs(self) -> list[int]:
        """The runs still trained (not stopped)."""
        return self.active.nonzero().flatten().tolist()

    def evaluate(self) -> dict[str, Any]:
        if self.test is None:
            return {}
        losses, accuracies = evaluate_models(
            self.model, self.xs, self.layout, self.buffers, self.test, self.loss_fn
        )
        return {"test_loss": losses.tolist(), "test_accuracy": accuracies.tolist()}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("aggregator")
        state["xs"] = self.xs.clone()
        state["active"] = self.active.clone()
        state["aggregators"] = [a.state_dict() for a in self.aggregators]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["xs"].shape != self.xs.shape:
            raise ValueError(
                f"checkpoint has runs x parameters {list(state['xs'].shape)}; "
                f"this sweep has {list(self.xs.shape)}"
            )
        for aggregator, saved in zip(self.aggregators, state["aggregators"], strict=True):
            aggregator.load_state_dict(saved)
        self.xs = state["xs"].clone()
        self.active = state["active"].clone()
        super().load_state_dict({**state, "aggregator": self.aggregators[0].state_dict()})
        self.x = self.xs[0]
