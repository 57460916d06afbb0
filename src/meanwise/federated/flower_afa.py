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

from meanwise.federated.aggregators import AFA_CD
from meanwise.federated.flower_codec import ArrayCodec
from meanwise.federated.flower_fedau import first_metrics
from meanwise.federated.flower_nodes import NodeSlots, read_reply, wait_for_nodes

__all__ = ["AnarchicRound", "AnarchicResult", "run_anarchic"]


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


def run_anarchic(
    grid: Grid,
    initial_arrays: ArrayRecord,
    aggregator: AFA_CD,
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
    """
    if not isinstance(aggregator, AFA_CD):
        raise TypeError(f"aggregator must be AFA_CD or AFA_CS; got {type(aggregator).__name__}")
    if int(num_rounds) < 1:
        raise ValueError(f"num_rounds must be >= 1; got {num_rounds}")
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
    if min_nodes:
        wait_for_nodes(grid, min_nodes, wait_for_nodes_s)
    codec = ArrayCodec(initial_arrays)
    record = initial_arrays
    versions: dict[int, Tensor] = {0: codec.flatten(initial_arrays)}
    version = 0
    outstanding: dict[str, tuple[int, int]] = {}  # message id -> (node id, model version)
    base_config = dict(train_config or {})

    def send(nodes: Iterable[int]) -> None:
        nodes = list(nodes)
        if not nodes:
            return
        config = ConfigRecord({**base_config, "model-version": version})
        content = RecordDict({arrayrecord_key: record, configrecord_key: config})
        messages = [
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            for node in nodes
        ]
        pushed = {str(i) for i in grid.push_messages(messages) if i}
        for node, message in zip(nodes, messages, strict=True):
            if message.metadata.message_id in pushed:
                outstanding[message.metadata.message_id] = (node, version)
            else:  # it gets the model again at the next round close
                log(WARNING, "AFA: could not push the model to %s", slots.describe(node))

    def idle_nodes() -> list[int]:
        """Connected workers (bound, or with a key not known yet) with nothing in flight."""
        busy = {node for node, _ in outstanding.values()}
        return [node for node in slots.targets(grid.get_node_ids()) if node not in busy]

    def forget_replaced() -> None:
        # a node replaced by a restarted one will never answer: do not wait for it
        for mid in [m for m, (node, _) in outstanding.items() if node in slots.ignored]:
            del outstanding[mid]

    def due(current: int) -> bool:
        # a worker whose model is max_staleness versions old must arrive in this round
        return not discard_stale and any(
            current - sent >= max_staleness for _, sent in outstanding.values()
        )

    send(idle_nodes())
    result = AnarchicResult(arrays=initial_arrays, node_ids=slots.node_of_slot, slots=slots)
    arrived: list[tuple[int, int, Tensor, int, int, dict]] = []  # slot, node, Δ, K, τ, metrics
    reasons: list[str] = []
    rejected = failed = 0
    round_start = time.monotonic()
    inbox: list[Message] = []  # pulled replies not yet processed (they wait for a new round)
    while len(result.rounds) < num_rounds:
        pulled = False
        if not inbox and outstanding:
            inbox = list(grid.pull_messages(list(outstanding)))
            pulled = bool(inbox)

        while inbox and (len(arrived) < aggregator.arrivals_per_round or due(version)):
            reply = inbox.pop(0)
            entry = outstanding.pop(str(reply.metadata.reply_to_message_id), None)
            if entry is None:
                continue  # given up after a time-out, or its node was replaced
            node, sent_version = entry
            got = read_reply(node, reply, slots, arrayrecord_key, codec)
            forget_replaced()
            steps = _reply_steps(reply, steps_key) if not isinstance(got, str) else None
            if not isinstance(got, str) and any(a[0] == got[0] for a in arrived):
                got = f"{slots.describe(node)} arrived for a slot that already arrived"
            if isinstance(got, str) or steps is None:
                reason = (
                    got
                    if isinstance(got, str)
                    else (f"{slots.describe(node)}: no positive int metric {steps_key!r}")
                )
                log(WARNING, "AFA round %d: %s (no arrival)", version + 1, reason)
                reasons.append(reason)
                failed += 1
                continue
            staleness = version - sent_version
            if staleness > max_staleness:
                rejected += 1
                send([node])  # restarts from the current model
                continue
            delta = got[1] - versions[sent_version]
            arrived.append((got[0], node, delta, steps, staleness, first_metrics(reply)))
        timed_out = time.monotonic() - round_start > round_timeout
        if (len(arrived) < aggregator.arrivals_per_round or due(version)) and not timed_out:
            if not pulled:
                time.sleep(pull_interval)
            continue
        if timed_out:
            awaited = sorted({node for node, _ in outstanding.values()})
            names = ", ".join(slots.describe(node) for node in awaited) or "nobody"
            log(
                WARNING,
                "AFA round %d timed out after %.0f s with %d arrivals; no reply from %s",
                version + 1,
                round_timeout,
                len(arrived),
                names,
            )
            reasons.extend(f"{slots.describe(nd)} timed out: no reply yet" for nd in awaited)
            # a message already max_staleness versions old would block every later round
            for mid in [m for m, (_, v) in outstanding.items() if version - v >= max_staleness]:
                del outstanding[mid]
        x = versions[version]
        refused = False
        if arrived:
            clients = torch.tensor([a[0] for a in arrived], dtype=torch.long)
            deltas = torch.stack([a[2] for a in arrived])
            steps_t = torch.tensor([a[3] for a in arrived], dtype=torch.long)
            before = aggregator.refused_rounds
            x = aggregator.step(x, deltas, clients, local_steps=steps_t)
            refused = aggregator.refused_rounds > before
            if refused:
                names = ", ".join(slots.describe(a[1]) for a in arrived)
                log(WARNING, "AFA round %d: refused the aggregate of %s (not finite); model "
                    "unchanged", version + 1, names)  # fmt: skip
        version += 1
        versions[version] = x
        for old in [v for v in versions if v < version - max_staleness]:
            del versions[old]
        record = codec.record(x, initial_arrays)
        result.rounds.append(
            AnarchicRound(
                round=version,
                clients=[a[0] for a in arrived],
                node_ids=[a[1] for a in arrived],
                local_steps=[a[3] for a in arrived],
                staleness=[a[4] for a in arrived],
                rejected_stale=rejected,
                failed=failed,
                timed_out=timed_out and len(arrived) < aggregator.arrivals_per_round,
                seconds=time.monotonic() - round_start,
                metrics=[a[5] for a in arrived],
                reasons=reasons,
                refused=refused,
            )
        )
        log(INFO, "AFA round %d: %d arrivals", version, len(arrived))
        arrived, reasons, rejected, failed = [], [], 0, 0
        if len(result.rounds) < num_rounds:
            send(idle_nodes())
        round_start = time.monotonic()
    result.arrays = record
    result.node_ids = list(slots.node_of_slot)
    return result
