"""Federated averaging under unknown and anarchic participation (FedAU, AFA-CD, AFA-CS)."""

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
from meanwise.federated.simulator import FederatedSimulator
from meanwise.functional.local_training import LocalTraining

__all__ = [
    "FederatedSimulator",
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
