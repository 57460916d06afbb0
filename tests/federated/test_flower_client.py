"""local_training_client_app reads its recipe per message (run config, then the round's config,
over the LocalTraining given in code), checked against full-batch gradient descent written out
with autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("flwr", reason="install the flower extra: pip install '.[flower]'")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from meanwise.federated import LocalTraining  # noqa: E402
from meanwise.federated.flower import local_training_client_app, recipe  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def _data(context: Context):
    g = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (8,), generator=g
    )


def _gd_by_hand(x, y, lr, steps):
    model = _model()
    for _ in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return {k: v.detach() for k, v in model.state_dict().items()}


def _train(app, run_config, config, node_config=None):
    node_config = {"partition-id": 2} if node_config is None else node_config
    context = Context(1, 5, node_config, RecordDict(), run_config)
    content = RecordDict(
        {"arrays": ArrayRecord(_model().state_dict()), "config": ConfigRecord(config)}
    )
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
    return app(msg, context), context


@pytest.mark.parametrize(
    "run_config, config, lr, steps",
    [
        ({}, {}, 0.5, 1),  # the LocalTraining given in code
        ({"lr": 0.1, "local-steps": 3, "batch-size": 64}, {}, 0.1, 3),  # `flwr run -c 'lr=0.1'`
        ({"lr": 0.1, "local-steps": 3}, {"lr": 0.3, "local-steps": 2}, 0.3, 2),  # the round's
        ({"lr": 1, "num-server-rounds": 5}, {}, 1.0, 1),  # an int lr; unrelated keys ignored
    ],
)
def test_recipe_comes_from_run_config_then_message_config(
    server_identity, run_config, config, lr, steps
):
    app = local_training_client_app(
        _model, _data, LocalTraining("sgd", lr=0.5, steps=1, batch_size=64)
    )
    reply, context = _train(app, run_config, config)
    got = reply.content.array_records["arrays"].to_torch_state_dict()
    x, y = _data(context)
    expected = _gd_by_hand(x, y, lr, steps)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-12)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["local-steps"] == steps and metrics["partition-id"] == 2


def test_bad_recipe_values_name_the_key_and_where_they_came_from(server_identity):
    app = local_training_client_app(_model, _data, LocalTraining("sgd", lr=0.5, steps=1))
    with pytest.raises(ValueError, match="run config 'lr' must be a number; got 'fast'"):
        _train(app, {"lr": "fast"}, {})
    with pytest.raises(ValueError, match="message config 'local-steps' must be an int; got 2.5"):
        _train(app, {}, {"local-steps": 2.5})
    with pytest.raises(ValueError, match=r"local recipe \(lr=-1.0\) is invalid: lr must be"):
        recipe(LocalTraining(), ("run config", {"lr": -1}))
    with pytest.raises(TypeError, match="LocalTraining"):
        local_training_client_app(_model, _data, {"lr": 0.1})


def test_replies_report_the_slot_key_a_server_can_bind_by(server_identity):
    from meanwise.federated.flower import NodeSlots
    from meanwise.federated.flower_nodes import reported_key

    numeric = local_training_client_app(_model, _data, LocalTraining("sgd", lr=0.5, steps=1))
    reply, _ = _train(numeric, {}, {})
    assert reported_key(reply, "partition-id") == 2
    # a text key (a host name, say) travels in a ConfigRecord and binds all the same
    app = local_training_client_app(
        _model, _data, LocalTraining("sgd", lr=0.5, steps=1), slot_key="host"
    )
    reply, _ = _train(app, {}, {}, {"partition-id": 2, "host": "edge-7"})
    assert reported_key(reply, "host") == "edge-7"
    slots = NodeSlots(2, "host")
    assert slots.bind(5, reported_key(reply, "host")) == (0, "node 5 bound to slot 0 (host=edge-7)")
