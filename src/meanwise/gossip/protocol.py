"""The gossip protocol of Tian et al. (2024): who trains, who sends to whom, who merges when.

Time runs in ticks. A node trains on one local minibatch every ``randint(8, 12)`` ticks (both
ends included, redrawn after every training) and then pushes its model to all its neighbours.
Each node collects received models in a buffer; when the buffer holds ``buffer_size`` models
(default: the node's degree; two models from the same neighbour both count, as in the authors'
simulator) the node merges them with its own model and clears the buffer.

Everything the protocol decides (training times, minibatch indices, which message lands in
which buffer slot, which node merges after which message) depends on the seed and the graph
only, never on model values. :class:`Schedule` therefore emits a plan per tick that a backend
executes: the vectorized simulator for all nodes at once, the ``torch.distributed`` runner one
node per process. Both consume the same plan, which is why they produce the same models.

Within a tick:
1. *relay phase*: nodes with a pending relay (the FL server after averaging) push their
   current model;
2. *training phase*: nodes whose timer runs out train ``local_steps`` minibatches and push.
In each phase all pushes leave at once (a sender's pushed model is its model at the start of
the delivery, before any merge of that phase); messages arrive in order of sender id, and a
receiver whose buffer fills merges at once, so later messages of the same phase start a new
buffer ("waves"). A relay node that merges pushes its merged model in the next tick's relay
phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meanwise.engine.local_training import FlatClientData, draw_batches
from meanwise.gossip.topology import Topology

__all__ = ["GossipProtocol", "Schedule", "TickPlan", "Phase", "Wave"]


@dataclass(frozen=True)
class GossipProtocol:
    """The protocol's settings (the defaults are the paper's asynchronous gossip).

    Args:
        train_interval: ``(low, high)``: ticks between two trainings of a node, drawn uniformly
            from ``low..high`` inclusive (the first training too). ``(1, 1)``: every tick.
        buffer_size: received models that trigger a merge; None: each node's degree.
        local_steps: minibatches per training event (the paper: 1).
        shared_init: every node starts from the same model (else each from its own random
            initialization, the case the paper studies).
        idle_nodes: nodes that never train (the FL server).
        relay_nodes: nodes that push their model after every merge (the FL server).
        initial_broadcast: relay nodes push their initial model in the first tick (an FL
            server sends its model to the clients before the first round).
    """

    train_interval: tuple[int, int] = (8, 12)
    buffer_size: int | None = None
    local_steps: int = 1
    shared_init: bool = False
    idle_nodes: tuple[int, ...] = ()
    relay_nodes: tuple[int, ...] = ()
    initial_broadcast: bool = False

    def __post_init__(self) -> None:
        interval = tuple(self.train_interval)
        if len(interval) != 2 or not all(isinstance(v, int) for v in interval):
            raise TypeError(f"train_interval must be two ints (low, high); got {interval!r}")
        if not 1 <= interval[0] <= interval[1]:
            raise ValueError(f"train_interval must satisfy 1 <= low <= high; got {interval}")
        if self.buffer_size is not None and (
            not isinstance(self.buffer_size, int) or self.buffer_size < 1
        ):
            raise ValueError(f"buffer_size must be None or an int >= 1; got {self.buffer_size!r}")
        if not isinstance(self.local_steps, int) or self.local_steps < 1:
            raise ValueError(f"local_steps must be an int >= 1; got {self.local_steps!r}")

    @classmethod
    def synchronous(cls, local_steps: int = 1, shared_init: bool = False) -> GossipProtocol:
        """Synchronous rounds: every tick every node trains, pushes, and merges once with the
        models of all its neighbours (buffer = degree)."""
        return cls(train_interval=(1, 1), local_steps=local_steps, shared_init=shared_init)

    @classmethod
    def federated(cls, topology: Topology, interval: int = 10) -> GossipProtocol:
        """The paper's FL baseline on a star: the centre does not train; it averages its leaves
        once it holds one model per leaf and sends the average back; the leaves adopt it (a
        buffer of one, merged with beta = 0) and train every ``interval`` ticks. The centre
        broadcasts its initial model first, so all clients start from one model, as in FL."""
        if topology.center is None:
            raise ValueError(f"the federated protocol needs a star topology; got {topology.name}")
        return cls(
            train_interval=(interval, interval),
            idle_nodes=(topology.center,),
            relay_nodes=(topology.center,),
            initial_broadcast=True,
        )

    def validate_for(self, topology: Topology) -> None:
        n = topology.n_nodes
        for name, nodes in (("idle_nodes", self.idle_nodes), ("relay_nodes", self.relay_nodes)):
            bad = [i for i in nodes if not isinstance(i, int) or not 0 <= i < n]
            if bad:
                raise ValueError(f"{name} must be node ids in [0, {n}); got {bad}")
        if len(set(self.idle_nodes)) == n:
            raise ValueError("idle_nodes covers every node: nobody would ever train")


@dataclass(frozen=True)
class Wave:
    """Messages that land in buffers, then the nodes whose buffer is now full merge.

    ``sender_pos[j]`` indexes the phase's ``senders``; message j goes to ``receivers[j]``'s
    buffer slot ``slots[j]``. ``mergers`` (sorted) merge after all of the wave's messages landed.
    """

    sender_pos: Tensor
    receivers: Tensor
    slots: Tensor
    mergers: Tensor


@dataclass(frozen=True)
class Phase:
    """``kind`` is "relay" or "train"; for "train", ``senders`` train first on the minibatches
    ``index``/``valid`` (``[local_steps, len(senders), batch]``, rows of the flat data)."""

    kind: str
    senders: Tensor
    waves: tuple[Wave, ...]
    index: Tensor | None = None
    valid: Tensor | None = None


@dataclass(frozen=True)
class TickPlan:
    tick: int
    phases: tuple[Phase, ...]


class Schedule:
    """The protocol's state machine: seeded, checkpointable, model-independent.

    Args:
        protocol: the settings.
        topology: the graph.
        data: the training nodes' data, one client per node that trains, in node order (the
            idle nodes have none).
        batch_size: minibatch size (a node with fewer examples uses all of them, see
            :func:`~meanwise.engine.local_training.draw_batches`).
        seed: seeds the timers and minibatches.
    """

    def __init__(
        self,
        protocol: GossipProtocol,
        topology: Topology,
        data: FlatClientData,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        protocol.validate_for(topology)
        n = topology.n_nodes
        self.protocol = protocol
        self.topology = topology
        self.data = data
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        self.batch_size = batch_size
        trains = torch.ones(n, dtype=torch.bool)
        trains[list(protocol.idle_nodes)] = False
        n_clients = int(data.sizes.numel())
        if n_clients != int(trains.sum()):
            raise ValueError(
                f"data has {n_clients} clients but {int(trains.sum())} nodes train "
                f"({n} nodes, {n - int(trains.sum())} idle): give one client per training node"
            )
        self.trains = trains
        # client of node i (idle nodes: -1): training nodes take the clients in node order
        self.client_of_node = torch.where(trains, torch.cumsum(trains.long(), 0) - 1, -1)
        degrees = torch.tensor(topology.degrees, dtype=torch.long)
        self.buffer_sizes = (
            degrees if protocol.buffer_size is None else torch.full((n,), protocol.buffer_size)
        )
        self.slot_base = torch.cumsum(self.buffer_sizes, 0) - self.buffer_sizes
        self._sizes: list[int] = self.buffer_sizes.tolist()  # read per push, as Python ints
        self.relays = torch.zeros(n, dtype=torch.bool)
        self.relays[list(protocol.relay_nodes)] = True
        self.generator = torch.Generator().manual_seed(int(seed))
        self.tick = 0
        self.timers = self._draw_intervals(n)
        # models in each buffer now: Python ints, read and written per message
        self._counts = [0] * n
        # relays push after a merge; with initial_broadcast also once before any merge
        self.relay_pending = (
            self.relays.clone() if protocol.initial_broadcast else torch.zeros(n, dtype=torch.bool)
        )

    @property
    def n_nodes(self) -> int:
        return self.topology.n_nodes

    @property
    def counts(self) -> Tensor:
        """``[n_nodes]``: the models in each node's buffer now."""
        return torch.tensor(self._counts, dtype=torch.long)

    @property
    def total_slots(self) -> int:
        return int(self.buffer_sizes.sum())

    def _draw_intervals(self, count: int) -> Tensor:
        low, high = self.protocol.train_interval
        return torch.randint(low, high + 1, (count,), generator=self.generator)

    def _deliver(self, senders: Tensor) -> tuple[Wave, ...]:
        """Messages from ``senders`` to all their neighbours, split into merge waves."""
        neighbours = self.topology.neighbors
        sizes = self._sizes
        counts = self._counts
        arrived: dict[int, int] = {}
        messages: list[tuple[int, int, int, int]] = []  # (wave, sender_pos, receiver, slot)
        for pos, sender in enumerate(senders.tolist()):
            for receiver in neighbours[sender]:
                position = counts[receiver] + arrived.get(receiver, 0)
                arrived[receiver] = arrived.get(receiver, 0) + 1
                wave, slot = divmod(position, sizes[receiver])
                messages.append((wave, pos, receiver, slot))
        n_waves = 1 + max((m[0] for m in messages), default=-1)
        # one tensor for all messages, its columns viewed per wave (tensor creation dominated)
        table = torch.tensor(messages, dtype=torch.long).view(-1, 4)
        waves = []
        for w in range(n_waves):
            mine = table if n_waves == 1 else table[table[:, 0] == w]
            mergers = sorted(r for r, k in arrived.items() if (w + 1) * sizes[r] <= counts[r] + k)
            waves.append(
                Wave(
                    sender_pos=mine[:, 1],
                    receivers=mine[:, 2],
                    slots=mine[:, 3],
                    mergers=torch.tensor(mergers, dtype=torch.long),
                )
            )
            if len(mergers):
                merging = waves[-1].mergers
                self.relay_pending[merging] |= self.relays[merging]
        for receiver, k in arrived.items():
            counts[receiver] = (counts[receiver] + k) % sizes[receiver]
        return tuple(waves)

    def next_tick(self) -> TickPlan:
        """Advance one tick and return what happens in it."""
        self.tick += 1
        phases = []
        relaying = self.relay_pending.nonzero().flatten()
        if relaying.numel():
            self.relay_pending[relaying] = False
            phases.append(Phase("relay", relaying, self._deliver(relaying)))
        self.timers -= 1
        firing = (self.timers <= 0) & self.trains
        trainers = firing.nonzero().flatten()
        if trainers.numel():
            index, valid = draw_batches(
                self.data,
                self.client_of_node[trainers],
                self.protocol.local_steps,
                self.batch_size,
                self.generator,
            )
            self.timers[trainers] = self._draw_intervals(trainers.numel())
            phases.append(Phase("train", trainers, self._deliver(trainers), index, valid))
        return TickPlan(self.tick, tuple(phases))

    def state_dict(self) -> dict[str, Any]:
        return {
            "tick": self.tick,
            "timers": self.timers.clone(),
            "counts": self.counts,
            "relay_pending": self.relay_pending.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.n_nodes
        for key in ("timers", "counts", "relay_pending"):
            if tuple(state[key].shape) != (n,):
                raise ValueError(
                    f"schedule state {key!r} has shape {list(state[key].shape)}; "
                    f"this topology has {n} nodes"
                )
        self.tick = int(state["tick"])
        self.timers = state["timers"].clone()
        self._counts = [int(c) for c in state["counts"].tolist()]
        self.relay_pending = state["relay_pending"].clone()
        self.generator.set_state(state["generator"])
