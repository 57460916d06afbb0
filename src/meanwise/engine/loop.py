"""The run loop both simulators share: evaluation and checkpoint cadence, the JSON-lines log,
bit-exact resume, and the one evaluation of stacked flat models.

A simulator is a position (rounds or ticks done), a way to advance it, a record to log and a
state dict. :class:`CheckpointedLoop` drives it: it advances to the next stop (the next
evaluation, the next checkpoint or the end, whichever comes first: a simulator may run the
ticks in between as one batch, as the gossip simulator's windows do), logs a record at every
multiple of ``eval_every`` and at the end, and saves a checkpoint (atomically, loaded back with
``weights_only=True``) at every multiple of ``checkpoint_every``. On resume the log file is
rewritten from the checkpoint's records, so records of rounds run after the last checkpoint
(and lost with the process) do not appear twice. Non-finite numbers in a record are written as
JSON ``null`` (:func:`meanwise.atomic_io.append_json_line`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from meanwise.atomic_io import append_json_line, atomic_torch_save, rewrite_json_lines
from meanwise.engine.layout import ParameterLayout

__all__ = ["CheckpointedLoop", "Checkpointable", "LoopSettings", "evaluate_models"]


class Checkpointable(Protocol):
    """What :class:`CheckpointedLoop` drives."""

    @property
    def position(self) -> int: ...

    def advance(self, until: int) -> dict[str, Any]:
        """Run towards ``until`` (at most up to it); returns fields for the next record."""

    def record(self, info: dict[str, Any]) -> dict[str, Any]:
        """The record logged at the current position (``info`` from the last advance)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointedLoop:
    """Cadence, log and checkpoints of a simulation (see the module docstring).

    ``metrics`` holds the logged records (it is part of the simulator's state dict, so a
    resumed run has the records of the run it continues).
    """

    def __init__(
        self,
        *,
        eval_every: int = 10,
        checkpoint_every: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        if int(eval_every) < 1:
            raise ValueError(f"eval_every must be >= 1; got {eval_every}")
        if int(checkpoint_every) < 0:
            raise ValueError(f"checkpoint_every must be >= 0; got {checkpoint_every}")
        if checkpoint_every and checkpoint_path is None:
            raise ValueError("checkpoint_every > 0 needs a checkpoint_path")
        self.eval_every = int(eval_every)
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.log_path = None if log_path is None else Path(log_path)
        self.metrics: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.log_path is not None:
            append_json_line(self.log_path, record)

    def rewrite_log(self) -> None:
        if self.log_path is not None:
            rewrite_json_lines(self.log_path, self.metrics)

    def resume(self, load_state_dict: Callable[[dict[str, Any]], None]) -> bool:
        """Load the checkpoint if there is one (and rewrite the log from it); whether it was."""
        if self.checkpoint_path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        if not self.checkpoint_path.exists():
            return False
        load_state_dict(torch.load(self.checkpoint_path, weights_only=True))
        self.rewrite_log()
        return True

    def next_stop(self, position: int, end: int) -> int:
        """The next position at which something is logged or saved (or ``end``)."""
        stops = [end, (position // self.eval_every + 1) * self.eval_every]
        if self.checkpoint_every:
            stops.append((position // self.checkpoint_every + 1) * self.checkpoint_every)
        return min(stops)

    def run(self, sim: Checkpointable, end: int, *, resume: bool = False) -> list[dict[str, Any]]:
        """Advance ``sim`` until its position is ``end``; returns the logged records."""
        if resume:
            self.resume(sim.load_state_dict)
        while sim.position < end:
            info = sim.advance(self.next_stop(sim.position, end))
            position = sim.position
            if position % self.eval_every == 0 or position == end:
                self.log(sim.record(info))
            if self.checkpoint_every and position % self.checkpoint_every == 0:
                atomic_torch_save(sim.state_dict(), self.checkpoint_path)
        return self.metrics


class LoopSettings:
    """For a simulator that runs in ``self.loop``: the loop's settings and records as its own
    attributes (read-only), where callers always found them."""

    loop: CheckpointedLoop

    eval_every = property(lambda self: self.loop.eval_every)
    checkpoint_every = property(lambda self: self.loop.checkpoint_every)
    checkpoint_path = property(lambda self: self.loop.checkpoint_path)
    log_path = property(lambda self: self.loop.log_path)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The logged records (one per evaluation)."""
        return self.loop.metrics


@torch.no_grad()
def evaluate_models(
    model: nn.Module,
    flat: Tensor,
    layout: ParameterLayout,
    buffers: dict[str, Tensor],
    test: tuple[Tensor, Tensor],
    loss_fn: Callable[..., Tensor],
    *,
    vectorized: bool = False,
) -> tuple[Tensor, Tensor]:
    """Test loss and accuracy ``([R], [R])`` of the R flat models ``flat [R, P]``.

    Each model's loss is the mean of ``loss_fn(logits, labels, reduction="none")`` and its
    accuracy the fraction of argmax hits, with ``model`` in eval mode (restored after).
    ``vectorized`` runs all models as one ``vmap`` call (for many models; a model that vmap
    cannot run must use the loop).
    """
    if flat.dim() != 2:
        raise ValueError(f"flat must be [R, P] (R models); got shape {list(flat.shape)}")
    x, y = test

    def forward(row: Tensor) -> Tensor:
        return functional_call(model, {**layout.unflatten(row), **buffers}, (x,))

    was_training = model.training
    model.eval()
    try:
        logits = vmap(forward)(flat) if vectorized else [forward(row) for row in flat]
    finally:
        model.train(was_training)
    losses = torch.stack([loss_fn(out, y, reduction="none").mean() for out in logits])
    accuracies = torch.stack([(out.argmax(-1) == y).double().mean() for out in logits])
    return losses, accuracies
