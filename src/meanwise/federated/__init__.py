"""Federated averaging under unknown and anarchic participation (FedAU, AFA-CD, AFA-CS).

Flower (flwr 1.42) strategies live in ``meanwise.federated.flower`` (extra ``meanwise[flower]``);
they are not imported here, so this package does not need Flower.
"""

from meanwise.engine.local_training import LocalTraining
from meanwise.federated.aggregators import (
    AFA_CD,
    AFA_CS,
    MIFA,
    Aggregator,
    FedAU,
    FedAvg,
    FedVARP,
    KnownParticipation,
    ParticipationIntervalWeights,
)
from meanwise.federated.participation import (
    Anarchic,
    Arrivals,
    Bernoulli,
    Cyclic,
    Markov,
    ParticipationProcess,
    heterogeneous_probabilities,
    validate_probabilities,
)
from meanwise.federated.simulator import FederatedSimulator, FederatedSweep

__all__ = [
    "FederatedSimulator",
    "FederatedSweep",
    "LocalTraining",
    "AFA_CD",
    "AFA_CS",
    "MIFA",
    "Aggregator",
    "FedAU",
    "FedAvg",
    "FedVARP",
    "KnownParticipation",
    "ParticipationIntervalWeights",
    "Anarchic",
    "Arrivals",
    "Bernoulli",
    "Cyclic",
    "Markov",
    "ParticipationProcess",
    "heterogeneous_probabilities",
    "validate_probabilities",
]
