"""A Flower ``ClientApp`` that runs a meanwise local-training recipe on the node's data.

It answers both server sides (:class:`~meanwise.federated.flower_fedau.FedAUStrategy` and
:func:`~meanwise.federated.flower_afa.run_anarchic`). The recipe is read per message, so a
deployment can change it without touching code: the round's config (sent by the server) wins
over the run config (``[tool.flwr.app.config]`` of the app, overridden by
``flwr run . -c 'lr=0.1'``), which wins over the ``LocalTraining`` given in code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.engine.local_training import LocalTraining, draw_batches, train_sequential

__all__ = ["local_training_client_app", "recipe", "RECIPE_KEYS"]

#: config / run-config key -> LocalTraining field
RECIPE_KEYS = {"lr": "lr", "batch-size": "batch_size", "local-steps": "steps"}


def _number(value: Any, key: str, source: str, integer: bool) -> float | int:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{source} {key!r} must be {kind}; got {value!r}")
    return int(value) if integer else float(value)


def recipe(local: LocalTraining, *sources: tuple[str, Mapping[str, Any]]) -> LocalTraining:
    """``local`` with ``lr``, ``batch-size``, ``local-steps`` from ``sources`` (later win).

    Each source is ``(name, mapping)``, the name used in errors (``"run config"``,
    ``"message config"``). Bad values raise ValueError naming the key and the source.
    """
    changes: dict[str, Any] = {}
    for source, mapping in sources:
        for key, attribute in RECIPE_KEYS.items():
            if key in mapping:
                value = _number(mapping[key], key, source, integer=attribute != "lr")
                changes[attribute] = value
    try:
        return dataclasses.replace(local, **changes)
    except ValueError as error:
        names = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        raise ValueError(f"the local recipe ({names}) is invalid: {error}") from None


def local_training_client_app(
    model_fn: Callable[[], nn.Module],
    data_fn: Callable[[Context], tuple[Tensor, Tensor]],
    local: LocalTraining | None = None,
    *,
    participate: Callable[[Context, int], bool] | None = None,
    local_steps: Callable[[Context, int], int] | None = None,
    loss_fn: Callable[..., Tensor] = F.cross_entropy,
    seed: int = 0,
    slot_key: str = "partition-id",
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    steps_key: str = "local-steps",
) -> ClientApp:
    """A ``ClientApp`` whose ``train`` runs the local recipe on the node's data.

    Args:
        model_fn: builds the architecture (its parameter names are the ArrayRecord's keys).
        data_fn: the node's ``(features, labels)`` from its ``Context`` (e.g. by
            ``context.node_config["partition-id"]``).
        local: the default recipe (rule, lr, steps, batch size; default ``LocalTraining()``).
            Per message, ``lr``, ``batch-size`` and ``local-steps`` from the run config, then
            from the round's config, replace its fields (see :func:`recipe`). Minibatches
            follow :func:`~meanwise.engine.local_training.draw_batches` with a generator
            seeded by (``seed``, partition id, round), so a batch size at least the node's
            size is full-batch gradient descent: deterministic, the same as the simulator's.
        participate: ``participate(context, server_round)``; False makes the node decline the
            round (it replies without arrays, which FedAUStrategy counts as absent).
        local_steps: ``local_steps(context, model_version)``, the K an anarchic worker
            chooses; it wins over the run config, a ``"local-steps"`` in the round's config
            wins over it.
        slot_key: the node-config entry every reply reports (a number as a metric, text in
            a ConfigRecord ``"slot"``), by which the server binds a restarted node to its old
            slot.

    Replies carry the trained arrays and metrics ``num-examples``, ``local-steps``,
    ``train-loss`` (before training) and the ``slot_key`` entry (when the node config has it).
    ``evaluate`` replies with ``loss`` and ``accuracy`` on the node's data.
    """
    default = LocalTraining() if local is None else local
    if not isinstance(default, LocalTraining):
        raise TypeError(f"local must be a LocalTraining; got {type(default).__name__}")
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
        value = context.node_config.get(slot_key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[slot_key] = value  # MetricRecord holds numbers only
        return metrics

    def reply(msg: Message, context: Context, records: dict[str, Any]) -> Message:
        # a text key (e.g. a host name) cannot be a metric: it travels in a ConfigRecord
        value = context.node_config.get(slot_key)
        if isinstance(value, str):
            records = {**records, "slot": ConfigRecord({slot_key: value})}
        return Message(RecordDict(records), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content.config_records.get(configrecord_key, ConfigRecord())
        # FedAUStrategy numbers rounds ("server-round"), run_anarchic model versions
        server_round = int(config.get("server-round", config.get("model-version", 0)))
        if participate is not None and not participate(context, server_round):
            metrics = {**base_metrics(context, 0), "declined": 1}
            return reply(msg, context, {"metrics": MetricRecord(metrics)})
        model, x, y, config = setup(msg, context)
        sources = [("run config", context.run_config)]
        if local_steps is not None and steps_key not in config:
            version = int(config.get("model-version", server_round))
            sources.append(("local_steps()", {"local-steps": local_steps(context, version)}))
        round_config = dict(config)
        if steps_key in round_config:  # the steps key may be renamed; the recipe reads this one
            round_config["local-steps"] = round_config[steps_key]
        this = recipe(default, *sources, ("message config", round_config))
        steps = int(this.steps)
        data = FederatedDataset(x, y, torch.tensor([0, len(y)]))
        partition = int(context.node_config.get("partition-id", 0))
        stream = ((int(seed) * 1_000_003 + partition) * 1_000_003 + server_round) % 2**62
        generator = torch.Generator().manual_seed(stream)
        index, valid = draw_batches(data, torch.tensor([0]), steps, this.batch_size, generator)
        params = {k: v.detach()[None] for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        model.eval()  # the loss before training, without touching BatchNorm statistics
        with torch.no_grad():
            before = float(loss_fn(model(x), y))
        model.train()
        trained, client_buffers = train_sequential(
            model, params, buffers, data, index, valid, torch.tensor([steps]), this, loss_fn
        )
        state = model.state_dict()
        for k, v in trained.items():
            state[k] = v[0]
        state.update(client_buffers[0])
        metrics = {**base_metrics(context, len(y)), steps_key: steps, "train-loss": before}
        content = {arrayrecord_key: ArrayRecord(state), "metrics": MetricRecord(metrics)}
        return reply(msg, context, content)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, x, y, _ = setup(msg, context)
        model.eval()
        with torch.no_grad():
            out = model(x)
            loss = float(loss_fn(out, y))
            accuracy = float((out.argmax(-1) == y).double().mean())
        metrics = {**base_metrics(context, len(y)), "loss": loss, "accuracy": accuracy}
        return reply(msg, context, {"metrics": MetricRecord(metrics)})

    return app
