"""An in-process Flower Grid for the strategy tests: replies become visible a number of pulls
after their push (``tick``); subclasses decide who answers what in ``push_messages``."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid


class TickingGrid(Grid):
    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, Message]] = {}  # message id -> (visible at, reply)
        self.tick = 0

    def set_run(self, run):  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - unused
        raise NotImplementedError

    def get_nodes(self):  # pragma: no cover - unused
        return []

    def pull_messages(self, message_ids):
        self.tick += 1
        ready = [i for i in message_ids if i in self.pending and self.pending[i][0] <= self.tick]
        return [self.pending.pop(i)[1] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):
        ids = list(self.push_messages(messages))
        self.tick += 10**6  # everything that will ever answer has answered
        return self.pull_messages(ids)


def to_record(x: torch.Tensor) -> ArrayRecord:
    """The tests' 6-parameter model (w [2, 2], b [2]) from a flat vector."""
    return ArrayRecord({"w": x[:4].reshape(2, 2).clone(), "b": x[4:].clone()})


def to_vector(record: ArrayRecord) -> torch.Tensor:
    state = record.to_torch_state_dict()
    return torch.cat([state["w"].reshape(-1), state["b"]])
