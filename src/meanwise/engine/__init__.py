"""What the simulators share: one parameter layout, populations of stacked models, one local
trainer over a registry of rules, one run loop.

Dependencies point downward: this package imports only ``meanwise.average``,
``meanwise.atomic_io``, ``meanwise.functional`` and ``meanwise.data``; ``federated`` and
``gossip`` build on it and never import each other.
"""

from meanwise.engine.layout import ParameterLayout, layer_variances
from meanwise.engine.local_training import (
    EXECUTIONS,
    ClientData,
    FlatClientData,
    LocalTrainer,
    data_on,
    draw_batches,
    stack_blocker,
    train_sequential,
    train_vectorized_stateful,
)
from meanwise.engine.loop import Checkpointable, CheckpointedLoop, LoopSettings, evaluate_models
from meanwise.engine.population import Population
from meanwise.engine.rules import RULES, LocalRule, LocalTraining, register_rule, registered_rules

__all__ = [
    "ParameterLayout",
    "layer_variances",
    "Population",
    "RULES",
    "EXECUTIONS",
    "ClientData",
    "FlatClientData",
    "LocalRule",
    "LocalTraining",
    "LocalTrainer",
    "data_on",
    "draw_batches",
    "register_rule",
    "registered_rules",
    "stack_blocker",
    "train_sequential",
    "train_vectorized_stateful",
    "Checkpointable",
    "CheckpointedLoop",
    "LoopSettings",
    "evaluate_models",
]
