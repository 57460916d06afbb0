"""The ClientApp: meanwise local training on this SuperNode's partition of the digits.

Each SuperNode says which partition it holds in its node config
(``--node-config 'partition-id=0 num-partitions=3'``); that partition-id is also the key by
which the ServerApp binds a restarted node to its old slot. The recipe (lr, batch-size,
local-steps) comes from the run config and the round's config.
"""

from __future__ import annotations

from flwr.app import Context

from meanwise.federated import LocalTraining
from meanwise.federated.flower import local_training_client_app
from meanwise_flower_app.task import load_partition, model_fn


def data_fn(context: Context):
    for key in ("partition-id", "num-partitions"):
        if key not in context.node_config:
            raise ValueError(
                f"this SuperNode's --node-config has no {key!r} "
                "(start it with --node-config 'partition-id=0 num-partitions=3')"
            )
    return load_partition(
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        float(context.run_config["alpha"]),
        int(context.run_config["data-seed"]),
    )


def anarchic_steps(context: Context, version: int) -> int:
    """AFA workers choose their own step count: here local-steps + partition-id (the FedAU
    rounds send local-steps in their config, which wins, so every FedAU client runs the same)."""
    return int(context.run_config["local-steps"]) + int(context.node_config["partition-id"])


app = local_training_client_app(model_fn, data_fn, LocalTraining("sgd"), local_steps=anarchic_steps)
