"""CheckpointedLoop on a toy simulation with a closed form, and the one evaluation.

The toy: position t, a random walk x_t = x_{t-1} + N(0, 1) drawn from its own generator
(checkpointed), so a run's final value is a function of the seed and the number of steps only;
a resumed run must give the same value and the same log as a straight one.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meanwise.engine.layout import ParameterLayout
from meanwise.engine.loop import CheckpointedLoop, evaluate_models


class _Walk:
    def __init__(self, seed: int = 0, batch: int = 1) -> None:
        self.t = 0
        self.x = torch.zeros((), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch = batch  # advance at most this many steps per call (like gossip windows)
        self.calls: list[tuple[int, int]] = []
        self.loop: CheckpointedLoop | None = None  # its records are part of the state, as in
        # the simulators (a resumed run has the records of the run it continues)

    @property
    def position(self) -> int:
        return self.t

    def advance(self, until: int) -> dict[str, Any]:
        self.calls.append((self.t, until))
        stop = min(until, self.t + self.batch)
        while self.t < stop:
            self.x = self.x + torch.randn((), generator=self.generator, dtype=torch.float64)
            self.t += 1
        return {"advanced_to": self.t}

    def record(self, info: dict[str, Any]) -> dict[str, Any]:
        value = float(self.x) if self.t != 4 else math.nan  # a NaN metric: logged as null
        return {"t": self.t, **info, "x": value}

    def state_dict(self) -> dict[str, Any]:
        metrics = [] if self.loop is None else list(self.loop.metrics)
        return {"t": self.t, "x": self.x.clone(), "generator": self.generator.get_state(),
                "metrics": metrics}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.x = int(state["t"]), state["x"].clone()
        self.generator.set_state(state["generator"])
        if self.loop is not None:
            self.loop.metrics = list(state["metrics"])


def _expected(seed: int, steps: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros((), dtype=torch.float64)
    for _ in range(steps):
        x = x + torch.randn((), generator=g, dtype=torch.float64)
    return float(x)


def test_cadence_stops_and_log(tmp_path):
    walk = _Walk(batch=100)
    loop = CheckpointedLoop(eval_every=3, checkpoint_every=4, checkpoint_path=tmp_path / "c.pt",
                            log_path=tmp_path / "log.jsonl")  # fmt: skip
    records = loop.run(walk, 10)
    # advanced to each next evaluation / checkpoint / the end, never past one
    assert walk.calls == [(0, 3), (3, 4), (4, 6), (6, 8), (8, 9), (9, 10)]
    assert [r["t"] for r in records] == [3, 6, 9, 10]
    assert records[-1]["x"] == _expected(0, 10)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["t"] for r in lines] == [3, 6, 9, 10]
    assert torch.load(tmp_path / "c.pt", weights_only=True)["t"] == 8


def test_a_short_advance_is_called_again():
    walk = _Walk(batch=2)
    records = CheckpointedLoop(eval_every=5).run(walk, 7)
    assert [r["t"] for r in records] == [5, 7]
    assert walk.t == 7 and float(walk.x) == _expected(0, 7)


def test_resume_is_bit_exact_and_rewrites_the_log(tmp_path):
    def loop() -> CheckpointedLoop:
        return CheckpointedLoop(eval_every=2, checkpoint_every=3, checkpoint_path=tmp_path / "c.pt",
                                log_path=tmp_path / "log.jsonl")  # fmt: skip

    straight = CheckpointedLoop(eval_every=2).run(_Walk(seed=5), 11)
    first, first_walk = loop(), _Walk(seed=5)
    first_walk.loop = first
    first.run(first_walk, 7)  # checkpoint at 6; the record of t=7 is logged but not in it
    assert [r["t"] for r in first.metrics] == [2, 4, 6, 7]
    resumed, resumed_walk = loop(), _Walk(seed=5)
    resumed_walk.loop = resumed
    records = resumed.run(resumed_walk, 11, resume=True)
    assert resumed_walk.calls[0][0] == 6  # continued from the checkpoint
    assert float(resumed_walk.x) == _expected(5, 11)
    assert json.dumps(records) == json.dumps(straight)  # (NaN != NaN: compared as text)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["t"] for r in lines] == [2, 4, 6, 8, 10, 11]  # no duplicates of the lost t=7 run
    assert lines[1]["x"] is None  # NaN written as JSON null


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eval_every": 0}, "eval_every must be >= 1; got 0"),
        ({"checkpoint_every": -1}, "checkpoint_every must be >= 0; got -1"),
        ({"checkpoint_every": 2}, "checkpoint_every > 0 needs a checkpoint_path"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointedLoop(**kwargs)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
        CheckpointedLoop().run(_Walk(), 3, resume=True)


def test_evaluate_models_against_the_closed_form():
    # a linear classifier: loss and accuracy of each of 3 models computed by hand
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    layout = ParameterLayout.of(model)
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(3, layout.numel, generator=g, dtype=torch.float64)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    model.train()
    for vectorized in (False, True):
        losses, accuracies = evaluate_models(
            model, flat, layout, {}, (x, y), F.cross_entropy, vectorized=vectorized
        )
        assert model.training  # restored
        for r in range(3):
            w, b = layout.unflatten(flat[r]).values()
            logits = x @ w.T + b
            nll = -(logits.log_softmax(-1)[torch.arange(20), y])
            torch.testing.assert_close(losses[r], nll.mean(), rtol=1e-13, atol=0)
            hits = sum(int(logits[i].argmax() == y[i]) for i in range(20))
            assert accuracies[r].item() == hits / 20
    with pytest.raises(ValueError, match=r"flat must be \[R, P\]"):
        evaluate_models(model, flat[0], layout, {}, (x, y), F.cross_entropy)
