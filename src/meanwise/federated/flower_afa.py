"""AFA-CD / AFA-CS (Yang et al., ICML 2022) as an asynchronous loop for a Flower ``ServerApp``.

Flower's ``Strategy.start`` waits for a whole round of replies, whereas AFA workers arrive
whenever they like with updates computed on possibly stale models; so this loop works on the
Grid's ``push_messages`` / ``pull_messages`` directly and closes a round after m arrivals.
Workers are bound to client slots by a reported key (:class:`NodeSlots`), so a restarted node
takes its old slot again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import Tensor

from meanwise.federated.aggregators import AFACD
from meanwise.federated.flower_codec import ArrayCodec
from meanwise.federated.flower_fedau import first_metrics
from meanwise.federated.flower_nodes import NodeSlots, read_reply, wait_for_nodes

__all__ = ["AnarchicServer", "AnarchicRound", "AnarchicResult", "run_anarchic"]


@dataclass
class AnarchicRound:
    """One closed AFA round: who arrived (slots and node ids), K_i, staleness, what went wrong.

    ``reasons`` names the node of every reply that was no arrival and of every time-out;
    ``refused`` is True when the aggregate was not finite and the model stayed unchanged.
    """

    round: int
    clients: list[int]
    node_ids: list[int]
    local_steps: list[int]
    staleness: list[int]
    rejected_stale: int
    failed: int
    timed_out: bool
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)  # each arrival's reply metrics
    reasons: list[str] = field(default_factory=list)
    refused: bool = False


@dataclass
class AnarchicResult:
    arrays: ArrayRecord
    node_ids: list[int | None]  # node_ids[i]: the node bound to slot i at the end
    rounds: list[AnarchicRound] = field(default_factory=list)
    slots: NodeSlots | None = None


def _reply_steps(reply: Message, key: str) -> int | None:
    for metrics in reply.content.metric_records.values():
        value = metrics.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


@dataclass
class _Arrival:
    slot: int
    node: int
    delta: Tensor  # y_i - x_start_i, against the (possibly stale) model the worker trained on
    steps: int  # K_i
    staleness: int
    metrics: dict[str, Any]


class AnarchicServer:
    """AFA's asynchronous server as a state machine over a Flower Grid.

    State: the model versions still within reach of a stale update (``versions``, the current
    one is ``version``), the messages in flight (``outstanding``: message id -> node and the
    version it carries), replies pulled but not processed yet (``inbox``: they wait for the
    next round once this one is full), and the open round's arrivals and bookkeeping (reasons,
    stale rejections, failures, its start time). Each step is one method: :meth:`send` the
    model, :meth:`pull`, :meth:`take` one reply, :meth:`close_round`; :meth:`step` runs one
    round with them and :meth:`run` the whole loop (what :func:`run_anarchic` calls). The
    arguments are :func:`run_anarchic`'s.
    """

    def __init__(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        aggregator: AFACD,
        *,
        node_ids: Sequence[int] | None = None,
        slot_key: str | None = "partition-id",
        slots: NodeSlots | None = None,
        min_nodes: int | None = None,
        max_staleness: int = 4,
        discard_stale: bool = False,
        round_timeout: float = 600.0,
        wait_for_nodes_s: float | None = 120.0,
        pull_interval: float = 0.02,
        train_config: ConfigRecord | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        steps_key: str = "local-steps",
    ) -> None:
        if not isinstance(aggregator, AFACD):
            raise TypeError(f"aggregator must be AFACD or AFACS; got {type(aggregator).__name__}")
        if int(max_staleness) < 0:
            raise ValueError(f"max_staleness must be >= 0; got {max_staleness}")
        if not isinstance(discard_stale, bool):
            raise TypeError(f"discard_stale must be a bool; got {type(discard_stale).__name__}")
        if not round_timeout > 0:
            raise ValueError(f"round_timeout must be positive; got {round_timeout}")
        n = aggregator.n_clients
        if slots is None:
            slots = NodeSlots(n, slot_key, node_ids)
        elif not isinstance(slots, NodeSlots) or slots.n_slots != n or node_ids is not None:
            raise ValueError(
                f"slots must be a NodeSlots for the aggregator's {n} workers, without node_ids"
            )
        if min_nodes is None:
            min_nodes = 0 if node_ids is not None else n
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ValueError(f"min_nodes must be an int >= 0; got {min_nodes!r}")
        self.grid = grid
        self.aggregator = aggregator
        self.slots = slots
        self.min_nodes = min_nodes
        self.wait_for_nodes_s = wait_for_nodes_s
        self.max_staleness = int(max_staleness)
        self.discard_stale = discard_stale
        self.round_timeout = round_timeout
        self.pull_interval = pull_interval
        self.base_config = dict(train_config or {})
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.steps_key = steps_key
        self.initial_arrays = initial_arrays
        self.codec = ArrayCodec(initial_arrays)
        self.record = initial_arrays  # the current model as sent
        self.version = 0
        self.versions: dict[int, Tensor] = {0: self.codec.flatten(initial_arrays)}
        self.outstanding: dict[str, tuple[int, int]] = {}  # message id -> (node id, version)
        self.inbox: list[Message] = []
        self.rounds: list[AnarchicRound] = []
        self.started = False
        self._open_round()

    def _open_round(self) -> None:
        self.arrived: list[_Arrival] = []
        self.reasons: list[str] = []
        self.rejected = 0
        self.failed = 0
        self.round_start = time.monotonic()

    # --- messages ----------------------------------------------------------------------------

    def send(self, nodes: Iterable[int]) -> None:
        """Push the current model (and its version) to ``nodes``."""
        nodes = list(nodes)
        if not nodes:
            return
        config = ConfigRecord({**self.base_config, "model-version": self.version})
        content = RecordDict({self.arrayrecord_key: self.record, self.configrecord_key: config})
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            for node in nodes
        ]
        pushed = {str(i) for i in self.grid.push_messages(messages) if i}
        for node, message in zip(nodes, messages, strict=True):
            if message.metadata.message_id in pushed:
                self.outstanding[message.metadata.message_id] = (node, self.version)
            else:  # it gets the model again at the next round close
                log(WARNING, "AFA: could not push the model to %s", self.slots.describe(node))

    def idle_nodes(self) -> list[int]:
        """Connected workers (bound, or with a key not known yet) with nothing in flight."""
        busy = {node for node, _ in self.outstanding.values()}
        return [n for n in self.slots.targets(self.grid.get_node_ids()) if n not in busy]

    def pull(self) -> bool:
        """Pull the replies that are in (only when every earlier one is processed)."""
        if self.inbox or not self.outstanding:
            return False
        self.inbox = list(self.grid.pull_messages(list(self.outstanding)))
        return bool(self.inbox)

    def _forget_replaced(self) -> None:
        # a node replaced by a restarted one will never answer: do not wait for it
        ignored = self.slots.ignored
        for mid in [m for m, (node, _) in self.outstanding.items() if node in ignored]:
            del self.outstanding[mid]

    # --- the open round ----------------------------------------------------------------------

    def due(self) -> bool:
        """Whether a worker whose model is max_staleness versions old must still arrive."""
        return not self.discard_stale and any(
            self.version - sent >= self.max_staleness for _, sent in self.outstanding.values()
        )

    def waiting(self) -> bool:
        """Whether the open round takes more replies: fewer than m arrivals, or one is due."""
        return len(self.arrived) < self.aggregator.arrivals_per_round or self.due()

    def take(self, reply: Message) -> None:
        """Process one reply: an arrival, a failure (with its reason) or a stale rejection."""
        entry = self.outstanding.pop(str(reply.metadata.reply_to_message_id), None)
        if entry is None:
            return  # given up after a time-out, or its node was replaced
        node, sent_version = entry
        slots = self.slots
        got = read_reply(node, reply, slots, self.arrayrecord_key, self.codec)
        self._forget_replaced()
        steps = _reply_steps(reply, self.steps_key) if not isinstance(got, str) else None
        if not isinstance(got, str) and any(a.slot == got[0] for a in self.arrived):
            got = f"{slots.describe(node)} arrived for a slot that already arrived"
        if isinstance(got, str) or steps is None:
            reason = (
                got
                if isinstance(got, str)
                else f"{slots.describe(node)}: no positive int metric {self.steps_key!r}"
            )
            log(WARNING, "AFA round %d: %s (no arrival)", self.version + 1, reason)
            self.reasons.append(reason)
            self.failed += 1
            return
        staleness = self.version - sent_version
        if staleness > self.max_staleness:
            self.rejected += 1
            self.send([node])  # restarts from the current model
            return
        delta = got[1] - self.versions[sent_version]
        self.arrived.append(_Arrival(got[0], node, delta, steps, staleness, first_metrics(reply)))

    def timed_out(self) -> bool:
        return time.monotonic() - self.round_start > self.round_timeout

    def give_up_awaited(self) -> None:
        """At a time-out: name the awaited nodes, and stop waiting for messages already
        max_staleness versions old (they would block every later round)."""
        slots = self.slots
        awaited = sorted({node for node, _ in self.outstanding.values()})
        names = ", ".join(slots.describe(node) for node in awaited) or "nobody"
        log(
            WARNING,
            "AFA round %d timed out after %.0f s with %d arrivals; no reply from %s",
            self.version + 1,
            self.round_timeout,
            len(self.arrived),
            names,
        )
        self.reasons.extend(f"{slots.describe(nd)} timed out: no reply yet" for nd in awaited)
        oldest = self.version - self.max_staleness
        for mid in [m for m, (_, v) in self.outstanding.items() if v <= oldest]:
            del self.outstanding[mid]

    def close_round(self, timed_out: bool) -> AnarchicRound:
        """Aggregate the arrivals into the next model version and record the round."""
        arrived = self.arrived
        x = self.versions[self.version]
        refused = False
        if arrived:
            clients = torch.tensor([a.slot for a in arrived], dtype=torch.long)
            deltas = torch.stack([a.delta for a in arrived])
            steps = torch.tensor([a.steps for a in arrived], dtype=torch.long)
            before = self.aggregator.refused_rounds
            x = self.aggregator.step(x, deltas, clients, local_steps=steps)
            refused = self.aggregator.refused_rounds > before
            if refused:
                names = ", ".join(self.slots.describe(a.node) for a in arrived)
                log(WARNING, "AFA round %d: refused the aggregate of %s (not finite); model "
                    "unchanged", self.version + 1, names)  # fmt: skip
        self.version += 1
        self.versions[self.version] = x
        for old in [v for v in self.versions if v < self.version - self.max_staleness]:
            del self.versions[old]
        self.record = self.codec.record(x, self.initial_arrays)
        closed = AnarchicRound(
            round=self.version,
            clients=[a.slot for a in arrived],
            node_ids=[a.node for a in arrived],
            local_steps=[a.steps for a in arrived],
            staleness=[a.staleness for a in arrived],
            rejected_stale=self.rejected,
            failed=self.failed,
            timed_out=timed_out and len(arrived) < self.aggregator.arrivals_per_round,
            seconds=time.monotonic() - self.round_start,
            metrics=[a.metrics for a in arrived],
            reasons=self.reasons,
            refused=refused,
        )
        self.rounds.append(closed)
        log(INFO, "AFA round %d: %d arrivals", self.version, len(arrived))
        self._open_round()
        return closed

    # --- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        """Wait for ``min_nodes`` connected nodes (once, before the first round)."""
        if not self.started and self.min_nodes:
            wait_for_nodes(self.grid, self.min_nodes, self.wait_for_nodes_s)
        self.started = True

    def step(self) -> AnarchicRound:
        """One round: the current model to every idle worker, then replies until it closes."""
        self.start()
        self.send(self.idle_nodes())
        self.round_start = time.monotonic()
        while True:
            pulled = self.pull()
            while self.inbox and self.waiting():
                self.take(self.inbox.pop(0))
            timed_out = self.timed_out()
            if not self.waiting() or timed_out:
                break
            if not pulled:
                time.sleep(self.pull_interval)
        if timed_out:
            self.give_up_awaited()
        return self.close_round(timed_out)

    def run(self, num_rounds: int) -> AnarchicResult:
        """``num_rounds`` more rounds; the result holds every round this server closed."""
        if int(num_rounds) < 1:
            raise ValueError(f"num_rounds must be >= 1; got {num_rounds}")
        self.start()
        for _ in range(int(num_rounds)):
            self.step()
        return self.result()

    def result(self) -> AnarchicResult:
        return AnarchicResult(
            arrays=self.record,
            node_ids=list(self.slots.node_of_slot),
            rounds=list(self.rounds),
            slots=self.slots,
        )


def run_anarchic(
    grid: Grid,
    initial_arrays: ArrayRecord,
    aggregator: AFACD,
    num_rounds: int,
    *,
    node_ids: Sequence[int] | None = None,
    slot_key: str | None = "partition-id",
    slots: NodeSlots | None = None,
    min_nodes: int | None = None,
    max_staleness: int = 4,
    discard_stale: bool = False,
    round_timeout: float = 600.0,
    wait_for_nodes_s: float | None = 120.0,
    pull_interval: float = 0.02,
    train_config: ConfigRecord | None = None,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    steps_key: str = "local-steps",
) -> AnarchicResult:
    """AFA-CD / AFA-CS with anarchic workers on a Flower Grid (call it from ``@app.main()``).

    Every connected worker gets the current model (with its version in the config,
    ``"model-version"``) and answers whenever it is done, with its trained arrays and the number
    of local steps K_i it chose (metric ``steps_key``). Replies are pulled as they come; a round
    closes after ``aggregator.arrivals_per_round`` (m) arrivals: the aggregator turns them into
    the new model (AFA-CD: the mean of the step-normalized updates G_i; AFA-CS: every worker's
    latest G_i), the version increases, and every connected worker without a message in flight
    (those that arrived, failed, or just connected) gets the new model. The others keep working
    on the model they have, so their updates arrive stale. Delays are bounded by
    ``max_staleness`` (τ) as the paper assumes: by default a round does not close while a
    worker whose model is τ versions old has not answered (the server waits for it, taking
    whatever else arrives meanwhile), so every worker's update is accepted. With
    ``discard_stale=True`` (opt-in, not in the paper) an update staler than τ is rejected
    instead and its worker restarts from the current model. If fewer than m arrive within
    ``round_timeout`` seconds the round closes with what arrived (the model is unchanged if
    nothing did), the awaited nodes are named in the log and the round's ``reasons``, and
    messages already τ versions old are given up (their workers get the model again).

    ``aggregator.n_clients`` is the number of worker slots M. Workers are bound to slots by
    ``slot_key`` (see :class:`NodeSlots`) or by ``node_ids`` given in advance, or continue the
    binding of an earlier phase (``slots=``, e.g. a FedAUStrategy's ``slots``); before the first
    round the loop waits for ``min_nodes`` connected nodes (default M, 0 with ``node_ids``) for
    up to ``wait_for_nodes_s`` seconds (None: for ever), then fails with a clear error.

    This is ``AnarchicServer(grid, initial_arrays, aggregator, ...).run(num_rounds)``; keep
    the :class:`AnarchicServer` to continue with more rounds or to drive it round by round.
    """
    if int(num_rounds) < 1:
        raise ValueError(f"num_rounds must be >= 1; got {num_rounds}")
    server = AnarchicServer(
        grid,
        initial_arrays,
        aggregator,
        node_ids=node_ids,
        slot_key=slot_key,
        slots=slots,
        min_nodes=min_nodes,
        max_staleness=max_staleness,
        discard_stale=discard_stale,
        round_timeout=round_timeout,
        wait_for_nodes_s=wait_for_nodes_s,
        pull_interval=pull_interval,
        train_config=train_config,
        arrayrecord_key=arrayrecord_key,
        configrecord_key=configrecord_key,
        steps_key=steps_key,
    )
    return server.run(num_rounds)
