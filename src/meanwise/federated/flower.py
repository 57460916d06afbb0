"""FedAU, AFA-CD and AFA-CS on Flower (flwr 1.42, Message API). Install ``meanwise[flower]``.

- :class:`FedAUStrategy` is a ``flwr.serverapp.strategy.Strategy``: every round it sends the
  global model to all N nodes known at the start, and the nodes that reply *are* the round's
  participants. In a deployment the server does not choose who takes part, which is exactly the
  setting FedAU is for: its weights are estimated online from the observed participation
  intervals (the same :class:`~meanwise.federated.aggregators.FedAU` and
  :class:`~meanwise.federated.aggregators.ParticipationIntervalWeights` objects the simulator
  uses). Nodes that fail, time out, decline (reply without arrays) or send malformed or
  non-finite arrays count as absent; a round never crashes on them.
- :func:`run_anarchic` is AFA's server loop for a ``ServerApp`` main function. Flower's
  ``Strategy.start`` waits for a whole round of replies, whereas AFA workers arrive whenever
  they like with updates computed on possibly stale models; so this loop works on the Grid's
  ``push_messages`` / ``pull_messages`` directly and closes a round after m arrivals.
- :func:`local_training_client_app` is a ``ClientApp`` that runs a meanwise
  :class:`~meanwise.functional.local_training.LocalTraining` recipe on the node's data and
  answers both of the above.

Flat vectors: the floating-point arrays of an ``ArrayRecord`` are concatenated in key order
into one ``[P]`` vector, the layout the aggregators work in (non-floating arrays, e.g.
BatchNorm's ``num_batches_tracked``, are passed through from the global model unchanged).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.common.logger import log
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "meanwise.federated.flower needs Flower: pip install 'meanwise[flower]' "
        "(flwr[simulation]==1.42.*)"
    ) from error

from meanwise.data.federated_split import FederatedDataset
from meanwise.federated.aggregators import AFA_CD, FedAU
from meanwise.functional.local_training import LocalTraining, draw_batches, train_sequential

__all__ = [
    "ArrayCodec",
    "FedAUStrategy",
    "run_anarchic",
    "AnarchicRound",
    "AnarchicResult",
    "local_training_client_app",
    "wait_for_nodes",
]


# --- arrays <-> flat vectors --------------------------------------------------------------------


class ArrayCodec:
    """The layout of a model's ``ArrayRecord``: keys, shapes, dtypes, which arrays are averaged.

    ``flatten(record)`` checks that a record has exactly this layout (ValueError otherwise) and
    returns the flat vector of its floating arrays; ``record(flat, like)`` builds the record back,
    taking the non-floating arrays from ``like``.
    """

    def __init__(self, arrays: ArrayRecord) -> None:
        if not isinstance(arrays, ArrayRecord):
            raise TypeError(f"arrays must be a flwr ArrayRecord; got {type(arrays).__name__}")
        state = arrays.to_torch_state_dict()
        if not state:
            raise ValueError("arrays is empty; the global model needs at least one array")
        self.keys = list(state)
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}
        self.floating = [k for k, v in state.items() if v.is_floating_point()]
        if not self.floating:
            raise ValueError("arrays has no floating-point array to aggregate")
        # the flat vector has the widest floating dtype (float64 models stay exact)
        self.dtype = max((self.dtypes[k] for k in self.floating), key=lambda d: d.itemsize)
        self.numel = sum(math.prod(self.shapes[k]) for k in self.floating)

    def state(self, arrays: ArrayRecord) -> OrderedDict[str, Tensor]:
        """``arrays`` as tensors, checked against this layout."""
        state = arrays.to_torch_state_dict()
        if list(state) != self.keys:
            raise ValueError(f"arrays has keys {list(state)}; expected {self.keys}")
        for k, v in state.items():
            if tuple(v.shape) != self.shapes[k] or v.dtype != self.dtypes[k]:
                raise ValueError(
                    f"array {k!r} is {v.dtype} {list(v.shape)}; "
                    f"expected {self.dtypes[k]} {list(self.shapes[k])}"
                )
        return state

    def flatten(self, arrays: ArrayRecord) -> Tensor:
        state = self.state(arrays)
        return torch.cat([state[k].reshape(-1).to(self.dtype) for k in self.floating])

    def record(self, flat: Tensor, like: ArrayRecord) -> ArrayRecord:
        if flat.shape != (self.numel,):
            raise ValueError(f"flat must have shape [{self.numel}]; got {list(flat.shape)}")
        state = self.state(like)
        start = 0
        for k in self.floating:
            n = math.prod(self.shapes[k])
            state[k] = flat[start : start + n].reshape(self.shapes[k]).to(self.dtypes[k])
            start += n
        return ArrayRecord(OrderedDict((k, state[k].contiguous()) for k in self.keys))


def wait_for_nodes(grid: Grid, n_nodes: int, timeout: float = 120.0) -> list[int]:
    """The sorted ids of the first ``n_nodes`` connected nodes, waiting up to ``timeout`` s.

    Nodes connect asynchronously (in Flower's simulation the list is empty at first), so the
    set N must be taken once enough nodes are there. RuntimeError if they never are.
    """
    if int(n_nodes) < 1:
        raise ValueError(f"n_nodes must be positive; got {n_nodes}")
    deadline = time.monotonic() + float(timeout)
    while True:
        ids = sorted(int(i) for i in grid.get_node_ids())
        if len(ids) >= n_nodes:
            return ids[:n_nodes]
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(ids)} of n_nodes={n_nodes} nodes connected within {timeout} s"
            )
        time.sleep(0.05)


def _node_index(node_ids: Sequence[int] | None, n_nodes: int) -> dict[int, int] | None:
    if node_ids is None:
        return None
    ids = [int(i) for i in node_ids]
    if len(ids) != n_nodes or len(set(ids)) != n_nodes:
        raise ValueError(f"node_ids must be {n_nodes} distinct ids (one per client); got {ids}")
    return {nid: i for i, nid in enumerate(ids)}


def _reply_arrays(
    reply: Message, key: str, codec: ArrayCodec, node_of: dict[int, int]
) -> tuple[int, Tensor] | str:
    """(client index, flat arrays) of a usable reply, or the reason it counts as absent."""
    node = int(reply.metadata.src_node_id)
    if node not in node_of:
        return f"node {node} is not one of the N nodes known at the start"
    if reply.has_error():
        return f"node {node} failed: {reply.error.reason}"
    if key not in reply.content.array_records:
        return f"node {node} declined (no {key!r} ArrayRecord in its reply)"
    try:
        return node_of[node], codec.flatten(reply.content.array_records[key])
    except (ValueError, TypeError) as error:
        return f"node {node} sent malformed arrays: {error}"


def _first_metrics(reply: Message) -> dict[str, Any]:
    records = list(reply.content.metric_records.values())
    return dict(records[0]) if records else {}


def _weighted_metrics(replies: Iterable[Message], weight_key: str) -> MetricRecord:
    """Per metric, the mean over the replies that have it, weighted by ``weight_key``."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for reply in replies:
        if reply.has_error():
            continue
        for record in reply.content.metric_records.values():
            w = float(record.get(weight_key, 1.0))
            for k, v in record.items():
                if k != weight_key and isinstance(v, int | float) and math.isfinite(v):
                    totals[k] = totals.get(k, 0.0) + w * float(v)
                    weights[k] = weights.get(k, 0.0) + w
    return MetricRecord({k: totals[k] / weights[k] for k in totals if weights[k] > 0})


# --- FedAU as a Flower strategy -----------------------------------------------------------------


class FedAUStrategy(Strategy):
    """FedAU (Wang & Ji, NeurIPS 2023) for Flower's Message API.

    Args:
        n_nodes: N, the number of nodes taking part in the federation. At the first round the
            strategy waits (up to ``wait_for_nodes_s``) until N nodes are connected and fixes N
            as their sorted ids, with a stable id → client index map (``node_ids[i]`` is client
            i of the aggregator). Nodes that connect later are not part of N and get no message.
        node_ids: the N node ids, if known in advance (then nothing is waited for).
        cutoff: FedAU's interval cutoff K (None: no cutoff).
        server_lr: the global step size η of x ← x + η · (1/N) Σ_S ω_n Δ_n.
        evaluate: whether ``configure_evaluate`` asks the nodes for federated evaluation.
        weighted_by_key: the reply metric used to weight metric averages.

    ``self.aggregator`` is the :class:`FedAU` object (its ``weights`` hold the intervals) and
    ``self.history`` one record per round: participants, absentees and why.
    """

    def __init__(
        self,
        n_nodes: int,
        *,
        node_ids: Sequence[int] | None = None,
        cutoff: int | None = None,
        server_lr: float = 1.0,
        evaluate: bool = True,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        wait_for_nodes_s: float = 120.0,
    ) -> None:
        if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
            raise ValueError(f"n_nodes must be a positive int; got {n_nodes!r}")
        self.aggregator = FedAU(n_nodes, cutoff=cutoff, server_lr=server_lr)
        self.n_nodes = n_nodes
        self.node_of = _node_index(node_ids, n_nodes)
        self.evaluate = bool(evaluate)
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.wait_for_nodes_s = float(wait_for_nodes_s)
        # aggregate_train does not receive the arrays it is aggregating against: keep them
        self.codec: ArrayCodec | None = None
        self.sent: tuple[int, ArrayRecord, Tensor] | None = None  # (round, record, flat)
        self.history: list[dict[str, Any]] = []

    @property
    def node_ids(self) -> list[int]:
        """``node_ids[i]``: the Flower node id of client index i (after the first round)."""
        if self.node_of is None:
            raise RuntimeError("the node set is fixed at the first configure_train")
        return sorted(self.node_of, key=self.node_of.__getitem__)

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, kind: str
    ) -> list[Message]:
        config = ConfigRecord({**dict(config), "server-round": server_round})
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            Message(content=content, dst_node_id=nid, message_type=kind) for nid in self.node_ids
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.node_of is None:
            ids = wait_for_nodes(grid, self.n_nodes, self.wait_for_nodes_s)
            self.node_of = {nid: i for i, nid in enumerate(ids)}
        if self.codec is None:
            self.codec = ArrayCodec(arrays)
        self.sent = (server_round, arrays, self.codec.flatten(arrays))
        # the server does not choose: every node is asked, whoever answers takes part
        return self._messages(server_round, arrays, config, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.sent is None or self.sent[0] != server_round or self.codec is None:
            raise RuntimeError(
                f"aggregate_train(server_round={server_round}) without configure_train for it"
            )
        _, sent_record, x = self.sent
        replies = list(replies)
        clients: list[int] = []
        seen: set[int] = set()
        updates: list[Tensor] = []
        absent: list[str] = []
        reply_metrics: dict[int, dict[str, Any]] = {}
        for reply in replies:
            got = _reply_arrays(reply, self.arrayrecord_key, self.codec, self.node_of or {})
            if isinstance(got, str):
                absent.append(got)
            elif got[0] in seen:
                absent.append(f"node {reply.metadata.src_node_id} replied twice; first kept")
            else:
                seen.add(got[0])
                clients.append(got[0])
                updates.append(got[1])
                reply_metrics[int(reply.metadata.src_node_id)] = _first_metrics(reply)
        for reason in absent:
            log(INFO, "FedAU round %s: %s (counted as absent)", server_round, reason)
        deltas = torch.stack(updates) - x if updates else x.new_zeros((0, x.numel()))
        dropped_before = self.aggregator.dropped_nonfinite
        # Aggregator.step drops non-finite updates (counted as absent) and, with nobody left,
        # keeps x, while still advancing every client's absence interval.
        new_x = self.aggregator.step(x, deltas, torch.tensor(clients, dtype=torch.long))
        dropped = self.aggregator.dropped_nonfinite - dropped_before
        participants = len(clients) - dropped
        self.history.append(
            {
                "round": server_round,
                "participants": participants,
                "absent": self.n_nodes - participants,
                "reasons": absent,
                "dropped_nonfinite": dropped,
                "metrics": reply_metrics,  # node id -> its reply's metrics
            }
        )
        metrics = _weighted_metrics(replies, self.weighted_by_key)
        metrics["participants"] = participants
        metrics["dropped-nonfinite"] = dropped
        return self.codec.record(new_x, sent_record), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.evaluate or self.node_of is None:
            return []
        return self._messages(server_round, arrays, config, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        metrics = _weighted_metrics(replies, self.weighted_by_key)
        return metrics if len(metrics) else None

    def summary(self) -> None:
        w = self.aggregator.weights
        log(INFO, "\t├──> FedAU over N=%d nodes (the nodes that reply take part)", self.n_nodes)
        log(INFO, "\t├──> interval cutoff: %s", w.cutoff)
        log(INFO, "\t└──> server rate: %s", self.aggregator.server_lr)

    def state_dict(self) -> dict[str, Any]:
        """What a restarted server needs to continue: node map, FedAU intervals, counters."""
        return {
            "node_ids": None if self.node_of is None else self.node_ids,
            "aggregator": self.aggregator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.node_of = _node_index(state["node_ids"], self.n_nodes)
        self.aggregator.load_state_dict(state["aggregator"])


# --- AFA: an asynchronous ServerApp loop --------------------------------------------------------


@dataclass
class AnarchicRound:
    """One closed AFA round: who arrived (client indices and node ids), K_i and staleness."""

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


@dataclass
class AnarchicResult:
    arrays: ArrayRecord
    node_ids: list[int]
    rounds: list[AnarchicRound] = field(default_factory=list)


def run_anarchic(
    grid: Grid,
    initial_arrays: ArrayRecord,
    aggregator: AFA_CD,
    num_rounds: int,
    *,
    node_ids: Sequence[int] | None = None,
    max_staleness: int = 4,
    discard_stale: bool = False,
    round_timeout: float = 600.0,
    wait_for_nodes_s: float = 120.0,
    pull_interval: float = 0.02,
    train_config: ConfigRecord | None = None,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    steps_key: str = "local-steps",
) -> AnarchicResult:
    """AFA-CD / AFA-CS with anarchic workers on a Flower Grid (call it from ``@app.main()``).

    Every worker gets the current model (with its version in the config, ``"model-version"``)
    and answers whenever it is done, with its trained arrays and the number of local steps K_i
    it chose (metric ``steps_key``). Replies are pulled as they come; a round closes after
    ``aggregator.arrivals_per_round`` (m) arrivals: the aggregator turns them into the new model
    (AFA-CD: the mean of the step-normalized updates G_i; AFA-CS: every worker's latest G_i),
    the version increases, and the workers that arrived get the new model. The others keep
    working on the model they have, so their updates arrive stale. Delays are bounded by
    ``max_staleness`` (τ) as the paper assumes: by default a round does not close while a
    worker whose model is τ versions old has not answered (the server waits for it, taking
    whatever else arrives meanwhile), so every worker's update is accepted. With
    ``discard_stale=True`` (opt-in, not in the paper) an update staler than τ is rejected
    instead and its worker restarts from the current model; a slow worker may then never be
    accepted. Either way an update staler than τ (possible without discarding only after a
    round timed out) is rejected, since its model version is no longer kept.
    A failed or malformed reply counts as no arrival; its worker gets the model again when the
    round closes. If fewer than m arrive within ``round_timeout`` seconds the round closes with
    what arrived (the model is unchanged if nothing did).

    ``aggregator.n_clients`` is the number of workers M; ``node_ids`` (or the first M nodes that
    connect) fixes the worker → index map.
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
    node_of = _node_index(node_ids, n) or {
        nid: i for i, nid in enumerate(wait_for_nodes(grid, n, wait_for_nodes_s))
    }
    ids = sorted(node_of, key=node_of.__getitem__)
    codec = ArrayCodec(initial_arrays)
    record = initial_arrays
    versions: dict[int, Tensor] = {0: codec.flatten(initial_arrays)}
    version = 0
    outstanding: dict[str, tuple[int, int]] = {}  # message id -> (client index, model version)
    base_config = dict(train_config or {})

    def send(clients: Iterable[int]) -> list[int]:
        clients = list(clients)
        config = ConfigRecord({**base_config, "model-version": version})
        content = RecordDict({arrayrecord_key: record, configrecord_key: config})
        messages = [
            Message(content=content, dst_node_id=ids[c], message_type=MessageType.TRAIN)
            for c in clients
        ]
        pushed = {str(i) for i in grid.push_messages(messages) if i}
        unsent = []
        for c, message in zip(clients, messages, strict=True):
            if message.metadata.message_id in pushed:
                outstanding[message.metadata.message_id] = (c, version)
            else:
                unsent.append(c)
        return unsent

    waiting = send(range(n))  # workers that need the model again at the next round close

    def due(current: int) -> bool:
        # a worker whose model is max_staleness versions old must arrive in this round
        return not discard_stale and any(
            current - sent >= max_staleness for _, sent in outstanding.values()
        )

    result = AnarchicResult(arrays=initial_arrays, node_ids=ids)
    arrived: list[tuple[int, Tensor, int, int, dict]] = []  # client, delta, K, staleness, metrics
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
                continue
            client, sent_version = entry
            got = _reply_arrays(reply, arrayrecord_key, codec, node_of)
            steps = _reply_steps(reply, steps_key) if not isinstance(got, str) else None
            if isinstance(got, str) or steps is None:
                reason = got if isinstance(got, str) else f"no positive int metric {steps_key!r}"
                log(WARNING, "AFA: node %s: %s (no arrival)", ids[client], reason)
                failed += 1
                waiting.append(client)
                continue
            staleness = version - sent_version
            if staleness > max_staleness:
                rejected += 1
                waiting.extend(send([client]))  # restarts from the current model
                continue
            delta = got[1] - versions[sent_version]
            arrived.append((client, delta, steps, staleness, _first_metrics(reply)))
        timed_out = time.monotonic() - round_start > round_timeout
        if (len(arrived) < aggregator.arrivals_per_round or due(version)) and not timed_out:
            if not pulled:
                time.sleep(pull_interval)
            continue
        if timed_out:
            log(WARNING, "AFA round %d timed out with %d arrivals", version + 1, len(arrived))
        x = versions[version]
        if arrived:
            clients = torch.tensor([a[0] for a in arrived], dtype=torch.long)
            deltas = torch.stack([a[1] for a in arrived])
            steps_t = torch.tensor([a[2] for a in arrived], dtype=torch.long)
            x = aggregator.step(x, deltas, clients, local_steps=steps_t)
        version += 1
        versions[version] = x
        for old in [v for v in versions if v < version - max_staleness]:
            del versions[old]
        record = codec.record(x, initial_arrays)
        result.rounds.append(
            AnarchicRound(
                round=version,
                clients=[a[0] for a in arrived],
                node_ids=[ids[a[0]] for a in arrived],
                local_steps=[a[2] for a in arrived],
                staleness=[a[3] for a in arrived],
                rejected_stale=rejected,
                failed=failed,
                timed_out=timed_out and len(arrived) < aggregator.arrivals_per_round,
                seconds=time.monotonic() - round_start,
                metrics=[a[4] for a in arrived],
            )
        )
        restart = [a[0] for a in arrived] + waiting
        arrived, waiting, rejected, failed = [], [], 0, 0
        if len(result.rounds) < num_rounds:
            waiting = send(restart)
        round_start = time.monotonic()
    result.arrays = record
    return result


def _reply_steps(reply: Message, key: str) -> int | None:
    for metrics in reply.content.metric_records.values():
        value = metrics.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


# --- a ClientApp running meanwise local training ------------------------------------------------


def local_training_client_app(
    model_fn: Callable[[], nn.Module],
    data_fn: Callable[[Context], tuple[Tensor, Tensor]],
    local: LocalTraining,
    *,
    participate: Callable[[Context, int], bool] | None = None,
    local_steps: Callable[[Context, int], int] | None = None,
    loss_fn: Callable[..., Tensor] = F.cross_entropy,
    seed: int = 0,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    steps_key: str = "local-steps",
) -> ClientApp:
    """A ``ClientApp`` whose ``train`` runs ``local`` on the node's data, for both server sides.

    Args:
        model_fn: builds the architecture (its parameter names are the ArrayRecord's keys).
        data_fn: the node's ``(features, labels)`` from its ``Context`` (e.g. by
            ``context.node_config["partition-id"]`` in simulation).
        local: the local recipe (rule, lr, steps, batch size). Minibatches follow
            :func:`~meanwise.functional.local_training.draw_batches` with a generator seeded by
            (``seed``, partition id, round), so a batch size at least the node's size is full-
            batch gradient descent: deterministic, the same as the simulator's.
        participate: ``participate(context, server_round)``; False makes the node decline the
            round (it replies without arrays, which FedAUStrategy counts as absent).
        local_steps: ``local_steps(context, model_version)``, the K an anarchic worker chooses
            (default ``local.steps``; a ``"local-steps"`` int in the round's config wins).

    Replies carry the trained arrays and metrics ``num-examples``, ``local-steps``,
    ``train-loss`` (before training) and ``partition-id`` (when the node config has one).
    ``evaluate`` replies with ``loss`` and ``accuracy`` on the node's data.
    """
    app = ClientApp()

    def setup(msg: Message, context: Context):
        model = model_fn()
        state = msg.content.array_records[arrayrecord_key].to_torch_state_dict()
        model.load_state_dict(state, strict=True)
        x, y = data_fn(context)
        if len(y) < 1:
            raise ValueError("data_fn returned no examples for this node")
        config = msg.content.config_records.get(configrecord_key, ConfigRecord())
        return model, x, y, config

    def base_metrics(context: Context, n: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"num-examples": n}
        if "partition-id" in context.node_config:
            metrics["partition-id"] = int(context.node_config["partition-id"])
        return metrics

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get(configrecord_key, ConfigRecord())
        # FedAUStrategy numbers rounds ("server-round"), run_anarchic model versions
        server_round = int(config.get("server-round", config.get("model-version", 0)))
        if participate is not None and not participate(context, server_round):
            return Message(RecordDict({"metrics": MetricRecord({"declined": 1})}), reply_to=msg)
        model, x, y, config = setup(msg, context)
        if steps_key in config:
            steps = int(config[steps_key])
        elif local_steps is not None:
            steps = int(local_steps(context, int(config.get("model-version", server_round))))
        else:
            steps = int(local.steps)
        if steps < 1:
            raise ValueError(f"local steps must be >= 1; got {steps}")
        data = FederatedDataset(x, y, torch.tensor([0, len(y)]))
        partition = int(context.node_config.get("partition-id", 0))
        stream = ((int(seed) * 1_000_003 + partition) * 1_000_003 + server_round) % 2**62
        generator = torch.Generator().manual_seed(stream)
        index, valid = draw_batches(data, torch.tensor([0]), steps, local.batch_size, generator)
        params = {k: v.detach()[None] for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        model.eval()  # the loss before training, without touching BatchNorm statistics
        with torch.no_grad():
            before = float(loss_fn(model(x), y))
        model.train()
        trained, client_buffers = train_sequential(
            model, params, buffers, data, index, valid, torch.tensor([steps]), local, loss_fn
        )
        state = model.state_dict()
        for k, v in trained.items():
            state[k] = v[0]
        state.update(client_buffers[0])
        metrics = {**base_metrics(context, len(y)), steps_key: steps, "train-loss": before}
        content = RecordDict(
            {arrayrecord_key: ArrayRecord(state), "metrics": MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, x, y, _ = setup(msg, context)
        model.eval()
        with torch.no_grad():
            out = model(x)
            loss = float(loss_fn(out, y))
            accuracy = float((out.argmax(-1) == y).double().mean())
        metrics = {**base_metrics(context, len(y)), "loss": loss, "accuracy": accuracy}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app
