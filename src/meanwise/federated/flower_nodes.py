"""Which Flower node holds which client slot, and why a node's reply does not count.

The aggregators keep per-client state (FedAU's participation intervals, AFA-CS's memory) in
client slots 0..N-1, but a deployment's node ids are not stable: an insecure SuperNode gets a
new random id every time it starts. :class:`NodeSlots` binds node ids to slots by a stable key
each node reports in its replies — by default the ``partition-id`` of its ``--node-config``,
which :func:`~meanwise.federated.flower_client.local_training_client_app` puts in every reply —
so a restarted node (new id, same key) takes its old slot again. A node with a key no slot has
gets a free slot while there is one; once all ``n_nodes`` slots are taken it is ignored (sent
nothing more) and logged. A node that reports no key is bound by its node id (it works, but
cannot rejoin after a restart).

Replies are attributed to the node the message was *sent to* (``reply_to_message_id``), not to
the reply's ``src_node_id``: the SuperLink's own error replies ("node unavailable", "reply
expired") carry ``src_node_id=1``, the SuperLink's id.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable, Sequence
from logging import ERROR, INFO
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from meanwise.federated.flower_codec import ArrayCodec

__all__ = ["NodeSlots", "wait_for_nodes", "reported_key", "read_reply", "attribute_replies"]

Key = Hashable


def wait_for_nodes(grid: Grid, n_nodes: int, timeout: float | None = 120.0) -> list[int]:
    """The sorted ids of the first ``n_nodes`` connected nodes, waiting up to ``timeout`` s.

    Like the ``min_available_nodes`` wait of Flower's strategies, but bounded: ``timeout=None``
    waits for ever (Flower's behaviour); otherwise, if fewer nodes are connected when it runs
    out, the failure is logged at ERROR level and raised as RuntimeError, which ends the
    ServerApp with an error (the run's status becomes failed).
    """
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes must be a positive int; got {n_nodes!r}")
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds or None; got {timeout}")
    start = time.monotonic()
    last_log = -float("inf")
    while True:
        ids = sorted(int(i) for i in grid.get_node_ids())
        if len(ids) >= n_nodes:
            return ids[:n_nodes]
        waited = time.monotonic() - start
        if timeout is not None and waited > timeout:
            message = (
                f"only {len(ids)} nodes connected within {timeout} s; min_nodes={n_nodes} "
                "needed (start more SuperNodes, or lower min_nodes)"
            )
            log(ERROR, "%s", message)
            raise RuntimeError(message)
        if waited - last_log >= 10:  # Flower logs its wait too; every 10 s is enough
            log(INFO, "Waiting for nodes to connect: %d of %d connected", len(ids), n_nodes)
            last_log = waited
        time.sleep(0.05)


def reported_key(reply: Message, name: str | None) -> Key | None:
    """The slot key ``name`` a (non-error) reply reports in a metric or config record."""
    if name is None:
        return None
    records = (*reply.content.metric_records.values(), *reply.content.config_records.values())
    for record in records:
        if name in record:
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                return None
            # 3 and 3.0 are the same partition (a MetricRecord may carry either)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return value
    return None


class NodeSlots:
    """The binding of Flower node ids to ``n_slots`` client slots by a reported key.

    Args:
        n_slots: N, the number of client slots (the aggregator's ``n_clients``).
        key: the name of the stable key nodes report (a metric or config entry of their
            replies), e.g. ``"partition-id"``; None binds every node by its node id.
        node_ids: node ids known in advance: ``node_ids[i]`` is bound to slot i (their keys are
            learned from their first replies, so they can rejoin later).
    """

    def __init__(
        self, n_slots: int, key: str | None = "partition-id", node_ids: Sequence[int] | None = None
    ) -> None:
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be a positive int; got {n_slots!r}")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"slot_key must be a non-empty str or None; got {key!r}")
        self.n_slots = n_slots
        self.key = key
        self.slot_key: list[Key | None] = [None] * n_slots
        self.node_of_slot: list[int | None] = [None] * n_slots
        self.slot_of_node: dict[int, int] = {}
        self.ignored: dict[int, str] = {}  # node id -> why it is sent nothing
        if node_ids is not None:
            ids = [int(i) for i in node_ids]
            if len(ids) != n_slots or len(set(ids)) != n_slots:
                raise ValueError(
                    f"node_ids must be {n_slots} distinct ids (one per client); got {ids}"
                )
            for slot, node in enumerate(ids):
                self.node_of_slot[slot] = node
                self.slot_of_node[node] = slot

    def slot(self, node: int) -> int | None:
        return self.slot_of_node.get(int(node))

    def _key_text(self, key: Key | None) -> str:
        if key is None or isinstance(key, tuple):
            return "by node id"
        return f"{self.key}={key}"

    def describe(self, node: int) -> str:
        """``node 123 (slot 2, partition-id=2)``: how logs and reasons name a node."""
        node = int(node)
        slot = self.slot_of_node.get(node)
        if slot is not None:
            return f"node {node} (slot {slot}, {self._key_text(self.slot_key[slot])})"
        if node in self.ignored:
            return f"node {node} ({self.ignored[node]})"
        return f"node {node} (no slot yet)"

    def targets(self, connected: Iterable[int]) -> list[int]:
        """The connected nodes to message: bound ones and those whose key is not known yet."""
        return sorted(int(n) for n in connected if int(n) not in self.ignored)

    def unreachable(self, connected: Iterable[int]) -> list[int]:
        """Slots whose bound node is not connected (or that no node holds yet)."""
        online = {int(n) for n in connected}
        return [s for s, n in enumerate(self.node_of_slot) if n is None or n not in online]

    def bind(self, node: int, key: Key | None) -> tuple[int | None, str | None]:
        """Bind ``node`` by its reported ``key``: (its slot or None if ignored, a log line).

        The log line (None when nothing changed) says what happened: a first binding, a
        rejoin (the key's slot moves to the new node id; the old id is sent nothing more), or
        an ignored node (no free slot).
        """
        node = int(node)
        if node in self.ignored:
            return None, None
        if key is None:
            key = ("node", node)
        slot = self.slot_of_node.get(node)
        if slot is not None:
            if self.slot_key[slot] is None and key not in self.slot_key:
                self.slot_key[slot] = key  # a node given in advance: learn its key
            return slot, None
        if key in self.slot_key:
            slot = self.slot_key.index(key)
            old = self.node_of_slot[slot]
            self._assign(node, slot, key)
            if old is None:
                return slot, f"node {node} bound to slot {slot} ({self._key_text(key)})"
            del self.slot_of_node[old]
            self.ignored[old] = f"replaced by node {node} in slot {slot}"
            return slot, (
                f"node {node} rejoined as slot {slot} ({self._key_text(key)}), replacing node {old}"
            )
        free = [
            s
            for s in range(self.n_slots)
            if self.slot_key[s] is None and self.node_of_slot[s] is None
        ]
        if not free:
            self.ignored[node] = (
                f"ignored: {self._key_text(key)} has no slot and all n_nodes={self.n_slots} "
                "slots are taken"
            )
            return None, f"node {node} {self.ignored[node]}"
        slot = free[0]
        self._assign(node, slot, key)
        return slot, f"node {node} bound to slot {slot} ({self._key_text(key)})"

    def _assign(self, node: int, slot: int, key: Key) -> None:
        self.node_of_slot[slot] = node
        self.slot_of_node[node] = slot
        self.slot_key[slot] = key

    def state_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "slot_key": list(self.slot_key),
            "node_of_slot": list(self.node_of_slot),
            "ignored": dict(self.ignored),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys, nodes = list(state["slot_key"]), list(state["node_of_slot"])
        if len(keys) != self.n_slots or len(nodes) != self.n_slots:
            raise ValueError(f"state is for {len(keys)} slots; this is for {self.n_slots}")
        self.slot_key = [tuple(k) if isinstance(k, list) else k for k in keys]
        self.node_of_slot = [None if n is None else int(n) for n in nodes]
        self.slot_of_node = {n: s for s, n in enumerate(self.node_of_slot) if n is not None}
        self.ignored = {int(n): str(r) for n, r in state.get("ignored", {}).items()}


def attribute_replies(
    sent: dict[str, int], replies: Iterable[Message]
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Pair each reply with the node its message was sent to; list the nodes without a reply.

    ``sent`` maps message id -> destination node id. A reply to an unknown message (or from a
    grid that assigns no message ids) falls back to its ``src_node_id``.
    """
    paired: list[tuple[int, Message]] = []
    for reply in replies:
        node = sent.get(str(reply.metadata.reply_to_message_id))
        paired.append((int(reply.metadata.src_node_id) if node is None else node, reply))
    answered = {str(r.metadata.reply_to_message_id) for _, r in paired}
    silent = sorted({node for mid, node in sent.items() if mid not in answered})
    return paired, silent


def read_reply(
    node: int, reply: Message, slots: NodeSlots, key: str, codec: ArrayCodec
) -> tuple[int, Tensor] | str:
    """(slot, flat arrays) of a usable reply, or the reason it does not count.

    Binding happens here: a reply (a decline too) that reports a key binds its node.
    """
    if reply.has_error():
        return f"{slots.describe(node)} failed: {reply.error.reason}"
    slot, note = slots.bind(node, reported_key(reply, slots.key))
    if note is not None:
        log(INFO, "%s", note)
    if slot is None:
        return slots.describe(node)
    if key not in reply.content.array_records:
        return f"{slots.describe(node)} declined (no {key!r} ArrayRecord in its reply)"
    try:
        return slot, codec.flatten(reply.content.array_records[key])
    except (ValueError, TypeError) as error:
        return f"{slots.describe(node)} sent malformed arrays: {error}"
