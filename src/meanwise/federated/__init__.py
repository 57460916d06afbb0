"""Federated averaging under unknown and anarchic participation (FedAU, AFA-CD, AFA-CS).

Flower (flwr 1.42) strategies live in ``meanwise.federated.flower`` (extra ``meanwise[flower]``);
they are not imported here, so this package does not need Flower.
"""

from meanwise.engine.local_training import LocalTraining
from meanwise.federated import aggregators as _aggregators
from meanwise.federated.aggregators import (
    AFACD,
    AFACS,
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
    "AFACD",
    "AFACS",
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


def __getattr__(name: str):
    # AFA_CD / AFA_CS: the former names of AFACD / AFACS, kept with a DeprecationWarning
    if name in _aggregators._DEPRECATED_NAMES:
        return _aggregators.renamed(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
