"""FedAU, AFA-CD and AFA-CS on Flower (flwr 1.42, Message API). Install ``meanwise[flower]``.

- :class:`FedAUStrategy` (:mod:`~meanwise.federated.flower_fedau`) is a
  ``flwr.serverapp.strategy.Strategy``: every round the global model goes to every connected
  node, and the nodes whose replies are kept are the round's participants, which is exactly
  the setting FedAU's online weights are for.
- :func:`run_anarchic` (:mod:`~meanwise.federated.flower_afa`) is AFA's asynchronous server
  loop for a ``ServerApp`` main function: a round closes after m arrivals, stale updates are
  used up to ``max_staleness``. It runs an :class:`AnarchicServer`, the loop's state machine
  (keep one to continue with more rounds, or to drive it round by round with ``step()``).
- :func:`local_training_client_app` (:mod:`~meanwise.federated.flower_client`) is a
  ``ClientApp`` that runs a meanwise local-training recipe on the node's data (recipe from the
  run config and the round's config) and answers both.
- :class:`NodeSlots` (:mod:`~meanwise.federated.flower_nodes`) binds node ids to client slots
  by a key the nodes report (their ``partition-id`` by default): a restarted SuperNode gets a
  new node id and takes its old slot again.

Flat vectors (:class:`ArrayCodec`): the floating-point arrays of an ``ArrayRecord`` are
concatenated in key order into one ``[P]`` vector, the layout the aggregators work in (a
:class:`~meanwise.engine.layout.ParameterLayout`, the simulators' layout).
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "meanwise.federated.flower needs Flower: pip install 'meanwise[flower]' (flwr==1.42.*)"
    ) from error

from meanwise.federated.flower_afa import (
    AnarchicResult,
    AnarchicRound,
    AnarchicServer,
    run_anarchic,
)
from meanwise.federated.flower_client import RECIPE_KEYS, local_training_client_app, recipe
from meanwise.federated.flower_codec import ArrayCodec
from meanwise.federated.flower_fedau import FedAUStrategy
from meanwise.federated.flower_nodes import NodeSlots, wait_for_nodes

__all__ = [
    "ArrayCodec",
    "FedAUStrategy",
    "NodeSlots",
    "run_anarchic",
    "AnarchicServer",
    "AnarchicRound",
    "AnarchicResult",
    "local_training_client_app",
    "recipe",
    "RECIPE_KEYS",
    "wait_for_nodes",
]
