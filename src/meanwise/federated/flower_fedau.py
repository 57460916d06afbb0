"""FedAU (Wang & Ji, NeurIPS 2023) as a Flower Message-API ``Strategy``.

Every round the global model goes to every connected node, and the nodes whose replies are
kept *are* the round's participants: in a deployment the server does not choose who takes part,
which is the setting FedAU is for. Its weights are estimated online from the observed
participation intervals (the same :class:`~meanwise.federated.aggregators.FedAU` object the
simulator uses). Nodes that fail, time out, decline (reply without arrays) or send malformed or
non-finite arrays count as absent, with the reason logged and kept in ``history``; a round never
crashes on them. Client slots are bound by a key the nodes report (:class:`NodeSlots`), so a
restarted node takes its old slot again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from meanwise.federated.aggregators import FedAU
from meanwise.federated.flower_codec import ArrayCodec
from meanwise.federated.flower_nodes import (
    NodeSlots,
    attribute_replies,
    read_reply,
    reported_key,
    wait_for_nodes,
)

__all__ = ["FedAUStrategy", "weighted_metrics", "first_metrics"]


def first_metrics(reply: Message) -> dict[str, Any]:
    records = list(reply.content.metric_records.values())
    return dict(records[0]) if records else {}


def weighted_metrics(
    replies: Iterable[Message], weight_key: str, skip: Iterable[str | None] = ()
) -> MetricRecord:
    """Per metric, the mean over ``replies`` that have it, weighted by ``weight_key``
    (``skip``: entries that are labels, not measurements, e.g. the slot key)."""
    skip = {weight_key, *skip}
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for reply in replies:
        if reply.has_error():
            continue
        for record in reply.content.metric_records.values():
            w = float(record.get(weight_key, 1.0))
            for k, v in record.items():
                if k not in skip and isinstance(v, int | float) and math.isfinite(v):
                    totals[k] = totals.get(k, 0.0) + w * float(v)
                    weights[k] = weights.get(k, 0.0) + w
    return MetricRecord({k: totals[k] / weights[k] for k in totals if weights[k] > 0})


def _sort_key(key: Any) -> tuple[str, Any]:
    return (type(key).__name__, key)


class FedAUStrategy(Strategy):
    """FedAU for Flower's Message API.

    Args:
        n_nodes: N, the number of client slots (FedAU's 1/N). Nodes are bound to slots by
            ``slot_key`` as they first reply; see :class:`NodeSlots`.
        node_ids: node ids bound to slots 0..N-1 in advance (then nothing is waited for).
        slot_key: the stable key nodes report in their replies (default ``"partition-id"``);
            None binds nodes by their (unstable) node ids.
        min_nodes: before the first round, wait until this many nodes are connected (like
            ``min_available_nodes`` of Flower's strategies; default N, or 0 with ``node_ids``).
            Later rounds do not wait: whoever is connected is asked.
        wait_for_nodes_s: how long that wait may take; then the ServerApp fails with an error
            naming the count (None: wait for ever, as Flower does).
        cutoff: FedAU's interval cutoff K (None: no cutoff).
        server_lr: the global step size η of x ← x + η · (1/N) Σ_S ω_n Δ_n.
        max_update_norm: clip each update's L2 norm (off by default; see the aggregators).
        evaluate: whether ``configure_evaluate`` asks the bound nodes for evaluation.
        weighted_by_key: the reply metric that weights metric averages.

    FedAU ignores ``num-examples`` when aggregating (every participant's update has weight
    ω_n / N), unlike Flower's FedAvg. ``self.aggregator`` is the :class:`FedAU` object,
    ``self.slots`` the node binding and ``self.history`` one record per round: kept slots and
    nodes, the reason for every reply that was not kept, time-outs and refusals.
    """

    def __init__(
        self,
        n_nodes: int,
        *,
        node_ids: Sequence[int] | None = None,
        slot_key: str | None = "partition-id",
        min_nodes: int | None = None,
        wait_for_nodes_s: float | None = 120.0,
        cutoff: int | None = None,
        server_lr: float = 1.0,
        max_update_norm: float | None = None,
        evaluate: bool = True,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
            raise ValueError(f"n_nodes must be a positive int; got {n_nodes!r}")
        if min_nodes is None:
            min_nodes = 0 if node_ids is not None else n_nodes
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ValueError(f"min_nodes must be an int >= 0; got {min_nodes!r}")
        self.aggregator = FedAU(
            n_nodes, cutoff=cutoff, server_lr=server_lr, max_update_norm=max_update_norm
        )
        self.n_nodes = n_nodes
        self.slots = NodeSlots(n_nodes, slot_key, node_ids)
        self.min_nodes = min_nodes
        self.wait_for_nodes_s = wait_for_nodes_s
        self.evaluate = bool(evaluate)
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.started = False
        # aggregate_train receives neither the arrays it aggregates against nor the messages
        # it answers: keep both from configure_train
        self.codec: ArrayCodec | None = None
        self.sent: tuple[int, ArrayRecord, Tensor] | None = None  # (round, record, flat)
        self.outbox: list[Message] = []
        self.unreachable: list[int] = []
        self.history: list[dict[str, Any]] = []

    @property
    def node_ids(self) -> list[int | None]:
        """``node_ids[i]``: the Flower node id now bound to client slot i (None: nobody yet)."""
        return list(self.slots.node_of_slot)

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, kind: str, nodes
    ) -> list[Message]:
        config = ConfigRecord({**dict(config), "server-round": server_round})
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.started and self.min_nodes:
            wait_for_nodes(grid, self.min_nodes, self.wait_for_nodes_s)
        self.started = True
        if self.codec is None:
            self.codec = ArrayCodec(arrays)
        self.sent = (server_round, arrays, self.codec.flatten(arrays))
        connected = [int(n) for n in grid.get_node_ids()]
        self.unreachable = self.slots.unreachable(connected)
        # the server does not choose: every node is asked, whoever answers takes part (nodes
        # whose key is not known yet too: a restarted node binds to its slot by replying)
        self.outbox = self._messages(
            server_round, arrays, config, MessageType.TRAIN, self.slots.targets(connected)
        )
        return self.outbox

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.sent is None or self.sent[0] != server_round or self.codec is None:
            raise RuntimeError(
                f"aggregate_train(server_round={server_round}) without configure_train for it"
            )
        _, sent_record, x = self.sent
        # the grid sets each message's id when it pushes it
        sent = {
            str(m.metadata.message_id): int(m.metadata.dst_node_id)
            for m in self.outbox
            if m.metadata.message_id  # a grid that sets no ids: replies name their src
        }
        paired, silent = attribute_replies(sent, replies)
        slots = self.slots

        # bound nodes first, then new ones in key order: slot numbers do not depend on the
        # order in which replies arrived
        def order(pair: tuple[int, Message]) -> tuple[int, tuple[str, Any]]:
            node, reply = pair
            if slots.slot(node) is not None:
                return 0, ("int", slots.slot(node))
            if reply.has_error():
                return 2, ("", 0)
            return 1, _sort_key(reported_key(reply, slots.key))

        paired.sort(key=order)
        reasons: list[str] = []
        kept: dict[int, tuple[int, Tensor, Message]] = {}  # slot -> (node, delta, reply)
        for node, reply in paired:
            got = read_reply(node, reply, slots, self.arrayrecord_key, self.codec)
            if isinstance(got, str):
                reasons.append(got)
            elif got[0] in kept:
                reasons.append(f"{slots.describe(node)} replied for a slot already kept")
            else:
                delta = got[1] - x
                if not bool(torch.isfinite(delta).all()):
                    reasons.append(f"{slots.describe(node)} sent non-finite arrays")
                kept[got[0]] = (node, delta, reply)
        for node in silent:
            reasons.append(f"{slots.describe(node)} timed out: no reply within the round")
        answered = {slots.slot(n) for n, _ in paired} | {slots.slot(n) for n in silent}
        for slot in self.unreachable:
            last = slots.node_of_slot[slot]
            # a slot no node has claimed yet is simply absent; a lost one is worth a line
            if last is not None and slot not in answered and slot not in kept:
                reasons.append(f"{slots.describe(last)} is not connected")
        for reason in reasons:
            log(WARNING, "FedAU round %s: %s (counted as absent)", server_round, reason)

        order = sorted(kept)
        deltas = torch.stack([kept[s][1] for s in order]) if order else x.new_zeros((0, x.numel()))
        finite = torch.isfinite(deltas).all(dim=1).tolist()
        before = (self.aggregator.dropped_nonfinite, self.aggregator.refused_rounds)
        # Aggregator.step drops non-finite updates (counted as absent), refuses an aggregate
        # that would not be finite (the round is a no-op) and, with nobody left, keeps x, while
        # still advancing every slot's absence interval.
        new_x = self.aggregator.step(x, deltas, torch.tensor(order, dtype=torch.long))
        dropped = self.aggregator.dropped_nonfinite - before[0]
        refused = self.aggregator.refused_rounds > before[1]
        used = [s for s, ok in zip(order, finite, strict=True) if ok]
        if refused:
            nodes = [slots.describe(kept[s][0]) for s in used]
            log(
                WARNING,
                "FedAU round %s: refused the aggregate of %s (not finite); model unchanged",
                server_round,
                ", ".join(nodes),
            )
        self.history.append(
            {
                "round": server_round,
                "participants": len(used),
                "absent": self.n_nodes - len(used),
                "slots": used,
                "nodes": [kept[s][0] for s in used],
                "reasons": reasons,
                "dropped_nonfinite": dropped,
                "refused": refused,
                "metrics": {kept[s][0]: first_metrics(kept[s][2]) for s in used},
            }
        )
        # training metrics of the replies that were used (not of dropped or refused ones)
        metrics = weighted_metrics(
            [] if refused else [kept[s][2] for s in used], self.weighted_by_key, [slots.key]
        )
        metrics["participants"] = 0 if refused else len(used)
        metrics["dropped-nonfinite"] = dropped
        metrics["refused"] = int(refused)
        log(INFO, "FedAU round %s: %d of %d slots took part", server_round, len(used), self.n_nodes)
        return self.codec.record(new_x, sent_record), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.evaluate:
            return []
        connected = {int(n) for n in grid.get_node_ids()}
        nodes = [n for n in self.slots.node_of_slot if n is not None and n in connected]
        return self._messages(server_round, arrays, config, MessageType.EVALUATE, nodes)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = weighted_metrics(replies, self.weighted_by_key, [self.slots.key])
        return metrics if len(metrics) else None

    def summary(self) -> None:
        w = self.aggregator.weights
        log(INFO, "\t├──> FedAU over N=%d slots (the nodes that reply take part)", self.n_nodes)
        log(INFO, "\t├──> slots bound by: %s", self.slots.key or "node id")
        log(INFO, "\t├──> interval cutoff: %s", w.cutoff)
        log(INFO, "\t└──> server rate: %s", self.aggregator.server_lr)

    def state_dict(self) -> dict[str, Any]:
        """What a restarted server needs to continue: slot binding, FedAU intervals, counters."""
        return {"slots": self.slots.state_dict(), "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "slots" in state:
            self.slots.load_state_dict(state["slots"])
        else:  # written before slots were bound by key: node ids only
            self.slots = NodeSlots(self.n_nodes, self.slots.key, state["node_ids"])
        self.started = True
        self.aggregator.load_state_dict(state["aggregator"])
