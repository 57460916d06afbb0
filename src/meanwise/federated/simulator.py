"""The federated simulator: participation → local training → aggregation, round after round.

One round: the participation process names the clients (or, for :class:`Anarchic`, the
arriving workers with their local step counts and the stale model versions they started
from); they train locally (:mod:`meanwise.functional.local_training`, vectorized when the
model allows); the aggregator turns their deltas into the new global model. Evaluation runs every
``eval_every`` rounds and is logged as JSON lines; a checkpoint every ``checkpoint_every``
rounds holds everything the next round depends on (global model, aggregator memory,
participation state, the minibatch generator, stale-model history), so ``run(..., resume=True)``
continues bit-exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.federated.aggregators import Aggregator
from meanwise.federated.participation import Anarchic, ParticipationProcess
from meanwise.functional.local_training import (
    LocalTraining,
    draw_batches,
    train_sequential,
    train_vectorized,
)

__all__ = ["FederatedSimulator", "vmap_blocker", "flatten", "unflatten"]


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


def flatten(params: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
    """Concatenate parameters into ``[P]`` (or ``[S, P]`` with one batch dimension)."""
    lead = next(iter(params.values())).shape[:batch_dims]
    return torch.cat([p.reshape(*lead, -1) for p in params.values()], dim=-1)


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Views of ``flat [..., P]`` shaped like ``like``'s (unbatched) parameters."""
    lead = flat.shape[:-1]
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[..., start : start + p.numel()].reshape(*lead, *p.shape)
        start += p.numel()
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FederatedSimulator:
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
        vectorize: ``"auto"`` (vmap unless the model cannot be vmapped; then a warning says why
            and the sequential loop runs), True or False.
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
    ) -> None:
        n = train.n_clients
        for name, other in (("aggregator", aggregator), ("participation", participation)):
            if other.n_clients != n:
                raise ValueError(f"{name} is for {other.n_clients} clients; train has {n}")
        if int(eval_every) < 1:
            raise ValueError(f"eval_every must be >= 1; got {eval_every}")
        if int(checkpoint_every) < 0:
            raise ValueError(f"checkpoint_every must be >= 0; got {checkpoint_every}")
        if checkpoint_every and checkpoint_path is None:
            raise ValueError("checkpoint_every > 0 needs a checkpoint_path")
        if isinstance(participation, Anarchic) and not aggregator.needs_local_steps:
            warnings.warn(
                "Anarchic workers run different step counts; this aggregator ignores them "
                "(the biased baseline of the AFA paper)",
                stacklevel=2,
            )
        self.model = model
        self.train = train
        self.aggregator = aggregator
        self.participation = participation
        self.local = local
        self.test = test
        self.loss_fn = loss_fn
        self.eval_every = int(eval_every)
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.log_path = None if log_path is None else Path(log_path)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.shapes = {k: v.detach() for k, v in model.named_parameters()}
        self.x = flatten(self.shapes).clone()
        self.buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
        self.round = 0
        # stale global models for anarchic workers: history[s] is the model s versions ago
        depth = participation.max_staleness + 1 if isinstance(participation, Anarchic) else 1
        self.history: list[Tensor] = [self.x.clone()]
        self.history_depth = depth
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
        self.metrics: list[dict[str, Any]] = []

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
        """The clients' trained flat parameters ``[S, P]`` from flat starting points ``starts``."""
        index, valid = draw_batches(
            self.train, clients, int(steps.max()), self.local.batch_size, self.generator
        )
        stacked = unflatten(starts, self.shapes)
        if self.vectorized:
            trained = train_vectorized(
                self.model, stacked, self.train, index, valid, steps, self.local, self.loss_fn
            )
        else:
            trained, client_buffers = train_sequential(
                self.model,
                stacked,
                self.buffers,
                self.train,
                index,
                valid,
                steps,
                self.local,
                self.loss_fn,
            )
            # buffers (BatchNorm statistics) are not trained: the participants' plain mean
            for key, value in self.buffers.items():
                if value.is_floating_point():
                    self.buffers[key] = torch.stack([b[key] for b in client_buffers]).mean(0)
        return flatten(trained, batch_dims=1)

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

    # -- evaluation, logging, checkpoints -----------------------------------------------------

    def global_parameters(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in unflatten(self.x, self.shapes).items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.test is None:
            return {}
        x, y = self.test
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.func.functional_call(
                self.model, {**unflatten(self.x, self.shapes), **self.buffers}, (x,)
            )
        finally:
            self.model.train(was_training)
        loss = float(self.loss_fn(out, y, reduction="none").mean())
        return {"test_loss": loss, "test_accuracy": float((out.argmax(-1) == y).double().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "x": self.x.clone(),
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
            "history": [h.clone() for h in self.history],
            "aggregator": self.aggregator.state_dict(),
            "participation": self.participation.state_dict(),
            "generator": self.generator.get_state(),
            "metrics": list(self.metrics),
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
        self.metrics = list(state["metrics"])

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _rewrite_log(self) -> None:
        # after a resume, lines written past the checkpoint would be duplicated: rewrite
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.log_path.with_suffix(self.log_path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.metrics))
        os.replace(tmp, self.log_path)

    def run(self, rounds: int, *, resume: bool = False) -> list[dict[str, Any]]:
        """Train until ``rounds`` rounds in total have run; returns the logged metrics.

        With ``resume=True`` and an existing checkpoint, continue from it (bit-exactly).
        """
        if resume:
            if self.checkpoint_path is None:
                raise ValueError("resume=True needs a checkpoint_path")
            if self.checkpoint_path.exists():
                self.load_state_dict(torch.load(self.checkpoint_path, weights_only=True))
                self._rewrite_log()
        while self.round < rounds:
            record = self.step()
            r = self.round
            if r % self.eval_every == 0 or r == rounds:
                self._log(
                    {
                        "round": r,
                        **record,
                        "dropped_nonfinite": self.aggregator.dropped_nonfinite,
                        **self.evaluate(),
                    }
                )
            if self.checkpoint_every and r % self.checkpoint_every == 0:
                _atomic_save(self.state_dict(), self.checkpoint_path)
        return self.metrics
