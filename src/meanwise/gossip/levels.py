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

__all__ = ["TrainGroup", "MergeGroup", "Level", "WindowPlan", "plan_window"]


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


def plan_window(
    plans: Sequence[TickPlan], n_nodes: int, slot_base: Tensor, buffer_sizes: Tensor
) -> WindowPlan:
    """Group the events of consecutive tick ``plans`` (from one :class:`Schedule`) into levels."""
    if not plans:
        raise ValueError("plan_window needs at least one tick plan")
    base = slot_base.tolist()
    sizes = buffer_sizes.tolist()
    node_level = [0] * n_nodes
    # the event that made each node's current model: None (the window's start) or a _Merge;
    # after a training the current model already is a snapshot (node_snapshot)
    node_merge: list[_Merge | None] = [None] * n_nodes
    node_snapshot = [-1] * n_nodes
    snapshot_level: list[int] = []
    storage_rows: list[int] = []
    from_storage: list[int] = []
    start_nodes: list[int] = []
    from_start: list[int] = []
    storage_snapshot: dict[int, int] = {}  # storage row -> its snapshot (made once, on demand)
    slot_content: dict[int, int] = {}  # storage row -> snapshot that landed there last
    # per level: (node, column into the window's stacked minibatches, snapshot)
    trains: dict[int, list[tuple[int, int, int]]] = {}
    # the train phases' minibatches, stacked once at the end (slicing each trainer's column
    # out one by one cost more than the rest of the planning)
    batch_index: list[Tensor] = []
    batch_valid: list[Tensor] = []
    columns = 0
    merges: dict[int, list[_Merge]] = {}
    n_trainings = n_merges = 0

    def new_snapshot(level: int) -> int:
        snapshot_level.append(level)
        return len(snapshot_level) - 1

    def current_snapshot(node: int) -> int:
        # a pushed model that is not a training's output: the node's model as it is now
        if node_snapshot[node] < 0:
            snap = new_snapshot(node_level[node])
            merged = node_merge[node]
            if merged is None:
                start_nodes.append(node)
                from_start.append(snap)
            else:
                merged.snapshot = snap
            node_snapshot[node] = snap
        return node_snapshot[node]

    def slot_snapshot(row: int) -> int:
        if row in slot_content:
            return slot_content[row]
        if row not in storage_snapshot:
            storage_snapshot[row] = new_snapshot(0)
            storage_rows.append(row)
            from_storage.append(storage_snapshot[row])
        return storage_snapshot[row]

    for plan in plans:
        for phase in plan.phases:
            senders = phase.senders.tolist()
            if phase.kind == "train":
                batch_index.append(phase.index)
                batch_valid.append(phase.valid)
                for pos, node in enumerate(senders):
                    level = node_level[node] + 1
                    snap = new_snapshot(level)
                    trains.setdefault(level, []).append((node, columns + pos, snap))
                    node_level[node], node_merge[node], node_snapshot[node] = level, None, snap
                    n_trainings += 1
                columns += len(senders)
            # every message of a phase carries the sender's model before the phase's merges
            sent = [current_snapshot(node) for node in senders]
            for wave in phase.waves:
                for pos, receiver, slot in zip(
                    wave.sender_pos.tolist(),
                    wave.receivers.tolist(),
                    wave.slots.tolist(),
                    strict=True,
                ):
                    slot_content[base[receiver] + slot] = sent[pos]
                for node in wave.mergers.tolist():
                    sources = [slot_snapshot(base[node] + s) for s in range(sizes[node])]
                    level = 1 + max(node_level[node], *(snapshot_level[s] for s in sources))
                    event = _Merge(node, sources)
                    merges.setdefault(level, []).append(event)
                    node_level[node], node_merge[node], node_snapshot[node] = level, event, -1
                    n_merges += 1

    all_index = torch.cat(batch_index, dim=1) if batch_index else None
    all_valid = torch.cat(batch_valid, dim=1) if batch_valid else None
    levels = []
    for level in range(1, 1 + max([*trains, *merges], default=0)):
        group = None
        if level in trains:
            nodes, cols, snaps = zip(*trains[level], strict=True)
            at = _long(cols)
            group = TrainGroup(
                _long(nodes),
                all_index.index_select(1, at),
                all_valid.index_select(1, at),
                _long(snaps),
            )
        by_size: dict[int, list[_Merge]] = {}
        for event in merges.get(level, []):
            by_size.setdefault(sizes[event.node], []).append(event)
        merge_groups = []
        for events in by_size.values():
            stored = [j for j, e in enumerate(events) if e.snapshot >= 0]
            merge_groups.append(
                MergeGroup(
                    nodes=_long(e.node for e in events),
                    sources=_long([s for e in events for s in e.sources]).view(len(events), -1),
                    stored=_long(stored),
                    stored_as=_long(events[j].snapshot for j in stored),
                )
            )
        levels.append(Level(group, tuple(merge_groups)))
    return WindowPlan(
        first_tick=plans[0].tick,
        last_tick=plans[-1].tick,
        n_snapshots=len(snapshot_level),
        storage_rows=_long(storage_rows),
        from_storage=_long(from_storage),
        start_nodes=_long(start_nodes),
        from_start=_long(from_start),
        levels=tuple(levels),
        slot_rows=_long(slot_content),
        slot_last=_long(slot_content.values()),
        trainings=n_trainings,
        merges=n_merges,
    )
