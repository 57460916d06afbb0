"""Federated averaging under unknown and anarchic participation (FedAU, AFA-CD, AFA-CS)."""

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

__all__ = [
    "Anarchic",
    "Arrivals",
    "Bernoulli",
    "Cyclic",
    "Markov",
    "ParticipationProcess",
    "heterogeneous_probabilities",
    "validate_probabilities",
]
