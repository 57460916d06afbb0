"""What the simulators share: one parameter layout, local training, one run loop.

Dependencies point downward: this package imports only ``meanwise.average``,
``meanwise.atomic_io``, ``meanwise.functional`` and ``meanwise.data``; ``federated`` and
``gossip`` build on it and never import each other.
"""

from meanwise.engine.layout import ParameterLayout, layer_variances
from meanwise.engine.local_training import (
    RULES,
    FlatClientData,
    LocalRule,
    LocalTraining,
    draw_batches,
    register_rule,
    registered_rules,
    stack_blocker,
    train_sequential,
    train_stacked,
    train_stacked_flat,
    train_stacked_stateful,
    train_vectorized,
    train_vectorized_stateful,
)
from meanwise.engine.loop import Checkpointable, CheckpointedLoop, LoopSettings, evaluate_models

__all__ = [
    "ParameterLayout",
    "layer_variances",
    "RULES",
    "FlatClientData",
    "LocalRule",
    "LocalTraining",
    "draw_batches",
    "register_rule",
    "registered_rules",
    "stack_blocker",
    "train_sequential",
    "train_stacked",
    "train_stacked_flat",
    "train_stacked_stateful",
    "train_vectorized",
    "train_vectorized_stateful",
    "Checkpointable",
    "CheckpointedLoop",
    "LoopSettings",
    "evaluate_models",
]
