"""A window of tick plans turned into dependency levels that batch events across ticks.

With the paper's asynchronous protocol only ~5 of 50 nodes train and ~5 merge in a tick, so
executing tick by tick makes many tiny batched calls whose fixed cost (vmap set-up, dispatch)
dominates. The schedule never depends on model values, so a window of ticks can be planned
first and its events regrouped: each node's events (train, merge) stay in order, a merge also
waits for the models in its buffer, and an event's *level* is 1 + the highest level among the
events it depends on (0: the state at the window's start). Events of one level touch different
nodes and read only lower levels, so all trains of a level run as one vectorized call and all
merges of a level (per buffer size) as one batched merge, in any order, with the same float
operations per node as tick by tick.

Messages become *snapshots*: one stored model per version that anybody receives (a training
pushes its trained model to all neighbours, a relay pushes its current model), so a later
message never overwrites one still waiting in a buffer. A merge gathers its buffer's snapshot
rows in slot order. Buffer contents from before the window come from the simulator's slot
storage; at the window's end every slot written in the window gets its last message, so the
storage (and a checkpoint) equals the tick-by-tick state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from meanwise.gossip.protocol import TickPlan

__all__ = ["TrainGroup", "MergeGroup", "Level", "WindowPlan", "WindowPlanner", "plan_window"]


def _long(values: Sequence[int]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.long)


@dataclass(frozen=True)
class TrainGroup:
    """Nodes that train at one level on ``index``/``valid`` (``[local_steps, S, batch]``);
    node ``nodes[j]``'s trained model is snapshot ``snapshots[j]`` (every trainer pushes)."""

    nodes: Tensor
    index: Tensor
    valid: Tensor
    snapshots: Tensor


@dataclass(frozen=True)
class MergeGroup:
    """Nodes with one buffer size that merge at one level: node ``nodes[j]`` merges with the
    snapshots ``sources[j]`` (``[k, m]``, slot order); merged models that are pushed later
    (relays) are stored as snapshots: ``stored`` positions into ``nodes`` -> ``stored_as``."""

    nodes: Tensor
    sources: Tensor
    stored: Tensor
    stored_as: Tensor


@dataclass(frozen=True)
class Level:
    trains: TrainGroup | None
    merges: tuple[MergeGroup, ...]


@dataclass(frozen=True)
class WindowPlan:
    """Everything ticks ``first_tick..last_tick`` do, as levels.

    Snapshots ``0..n_snapshots-1`` are filled from the slot storage (``storage_rows`` ->
    ``from_storage``: buffer contents received before the window), from the models at the
    window's start (``start_nodes`` -> ``from_start``: relays pushing a model they had then),
    and by the levels. At the end, storage row ``slot_rows[j]`` gets snapshot ``slot_last[j]``.
    """

    first_tick: int
    last_tick: int
    n_snapshots: int
    storage_rows: Tensor
    from_storage: Tensor
    start_nodes: Tensor
    from_start: Tensor
    levels: tuple[Level, ...]
    slot_rows: Tensor
    slot_last: Tensor
    trainings: int
    merges: int


class _Merge:
    __slots__ = ("node", "sources", "snapshot")

    def __init__(self, node: int, sources: list[int]) -> None:
        self.node = node
        self.sources = sources
        self.snapshot = -1  # set if a relay pushes this merged model later


class WindowPlanner:
    """The state of planning one window: feed consecutive tick plans with :meth:`add`, then
    :meth:`plan` groups their events into levels.

    What it tracks per node: the level of the event that made its current model, and that
    event (None: the window's start or a training, whose output already is a snapshot). Per
    snapshot: the level it is made at. Per storage row: the snapshot that landed there last
    (``slot_content``) or, for a row read before anything landed in the window, the snapshot
    filled from the slot storage.
    """

    def __init__(self, n_nodes: int, slot_base: Tensor, buffer_sizes: Tensor) -> None:
        self.slot_base: list[int] = slot_base.tolist()
        self.buffer_sizes: list[int] = buffer_sizes.tolist()
        self.first_tick: int | None = None
        self.last_tick: int | None = None
        self.node_level = [0] * n_nodes
        self.node_merge: list[_Merge | None] = [None] * n_nodes
        self.node_snapshot = [-1] * n_nodes  # after a training: the trained model's snapshot
        self.snapshot_level: list[int] = []
        self.storage_rows: list[int] = []
        self.from_storage: list[int] = []
        self.start_nodes: list[int] = []
        self.from_start: list[int] = []
        self.storage_snapshot: dict[int, int] = {}  # storage row -> its snapshot (on demand)
        self.slot_content: dict[int, int] = {}  # storage row -> snapshot that landed there last
        # per level: (node, column into the window's stacked minibatches, snapshot)
        self.trains: dict[int, list[tuple[int, int, int]]] = {}
        # the train phases' minibatches, stacked once in plan() (slicing each trainer's column
        # out one by one cost more than the rest of the planning)
        self.batch_index: list[Tensor] = []
        self.batch_valid: list[Tensor] = []
        self.columns = 0
        self.merges: dict[int, list[_Merge]] = {}
        self.n_trainings = 0
        self.n_merges = 0

    # --- snapshots ---------------------------------------------------------------------------

    def _new_snapshot(self, level: int) -> int:
        self.snapshot_level.append(level)
        return len(self.snapshot_level) - 1

    def _current_snapshot(self, node: int) -> int:
        # a pushed model that is not a training's output: the node's model as it is now
        snap = self.node_snapshot[node]
        if snap >= 0:  # a training's output, or already pushed once
            return snap
        snap = self._new_snapshot(self.node_level[node])
        merged = self.node_merge[node]
        if merged is None:
            self.start_nodes.append(node)
            self.from_start.append(snap)
        else:
            merged.snapshot = snap
        self.node_snapshot[node] = snap
        return snap

    def _stored_snapshot(self, row: int) -> int:
        # a buffer slot nothing landed in during the window: its content from the slot storage
        if row not in self.storage_snapshot:
            self.storage_snapshot[row] = self._new_snapshot(0)
            self.storage_rows.append(row)
            self.from_storage.append(self.storage_snapshot[row])
        return self.storage_snapshot[row]

    # --- events ------------------------------------------------------------------------------

    def add(self, plan: TickPlan) -> None:
        """Add the next tick's events (ticks in the order the schedule made them)."""
        if self.first_tick is None:
            self.first_tick = plan.tick
        self.last_tick = plan.tick
        for phase in plan.phases:
            senders = phase.senders.tolist()
            if phase.kind == "train":
                self._train(senders, phase.index, phase.valid)
            # every message of a phase carries the sender's model before the phase's merges
            sent = [self._current_snapshot(node) for node in senders]
            for wave in phase.waves:
                self._deliver(wave, sent)
                for node in wave.mergers.tolist():
                    self._merge(node)

    def _train(self, senders: list[int], index: Tensor, valid: Tensor) -> None:
        self.batch_index.append(index)
        self.batch_valid.append(valid)
        for pos, node in enumerate(senders):
            level = self.node_level[node] + 1
            snap = self._new_snapshot(level)
            self.trains.setdefault(level, []).append((node, self.columns + pos, snap))
            self.node_level[node], self.node_merge[node] = level, None
            self.node_snapshot[node] = snap
            self.n_trainings += 1
        self.columns += len(senders)

    def _deliver(self, wave, sent: list[int]) -> None:
        base, slot_content = self.slot_base, self.slot_content
        for pos, receiver, slot in zip(
            wave.sender_pos.tolist(), wave.receivers.tolist(), wave.slots.tolist(), strict=True
        ):
            slot_content[base[receiver] + slot] = sent[pos]

    def _merge(self, node: int) -> None:
        first, content, levels = self.slot_base[node], self.slot_content, self.snapshot_level
        rows = range(first, first + self.buffer_sizes[node])
        sources = [content[r] if r in content else self._stored_snapshot(r) for r in rows]
        level = 1 + max(self.node_level[node], *(levels[s] for s in sources))
        event = _Merge(node, sources)
        self.merges.setdefault(level, []).append(event)
        self.node_level[node], self.node_merge[node], self.node_snapshot[node] = level, event, -1
        self.n_merges += 1

    # --- the plan ----------------------------------------------------------------------------

    def plan(self) -> WindowPlan:
        """The window of every tick added so far, as levels."""
        if self.first_tick is None:
            raise ValueError("WindowPlanner.plan needs at least one tick plan (add one first)")
        all_index = torch.cat(self.batch_index, dim=1) if self.batch_index else None
        all_valid = torch.cat(self.batch_valid, dim=1) if self.batch_valid else None
        levels = []
        for level in range(1, 1 + max([*self.trains, *self.merges], default=0)):
            group = None
            if level in self.trains:
                group = self._train_group(self.trains[level], all_index, all_valid)
            merge_groups = self._merge_groups(self.merges.get(level, []))
            levels.append(Level(group, merge_groups))
        return WindowPlan(
            first_tick=self.first_tick,
            last_tick=self.last_tick,
            n_snapshots=len(self.snapshot_level),
            storage_rows=_long(self.storage_rows),
            from_storage=_long(self.from_storage),
            start_nodes=_long(self.start_nodes),
            from_start=_long(self.from_start),
            levels=tuple(levels),
            slot_rows=_long(self.slot_content),
            slot_last=_long(self.slot_content.values()),
            trainings=self.n_trainings,
            merges=self.n_merges,
        )

    @staticmethod
    def _train_group(
        trains: list[tuple[int, int, int]], all_index: Tensor, all_valid: Tensor
    ) -> TrainGroup:
        nodes, cols, snaps = zip(*trains, strict=True)
        at = _long(cols)
        return TrainGroup(
            _long(nodes), all_index.index_select(1, at), all_valid.index_select(1, at), _long(snaps)
        )

    def _merge_groups(self, events: list[_Merge]) -> tuple[MergeGroup, ...]:
        by_size: dict[int, list[_Merge]] = {}
        for event in events:
            by_size.setdefault(self.buffer_sizes[event.node], []).append(event)
        groups = []
        for same_size in by_size.values():
            stored = [j for j, e in enumerate(same_size) if e.snapshot >= 0]
            sources = _long([s for e in same_size for s in e.sources]).view(len(same_size), -1)
            groups.append(
                MergeGroup(
                    nodes=_long(e.node for e in same_size),
                    sources=sources,
                    stored=_long(stored),
                    stored_as=_long(same_size[j].snapshot for j in stored),
                )
            )
        return tuple(groups)


def plan_window(
    plans: Sequence[TickPlan], n_nodes: int, slot_base: Tensor, buffer_sizes: Tensor
) -> WindowPlan:
    """Group the events of consecutive tick ``plans`` (from one :class:`Schedule`) into levels
    (a :class:`WindowPlanner` fed every plan)."""
    if not plans:
        raise ValueError("plan_window needs at least one tick plan")
    planner = WindowPlanner(n_nodes, slot_base, buffer_sizes)
    for plan in plans:
        planner.add(plan)
    return planner.plan()
