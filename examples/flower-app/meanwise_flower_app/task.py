"""The model and the data, shared by the ServerApp, the ClientApp and the tests."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from meanwise.data.federated_split import FederatedDataset, digits_federated


def model_fn() -> nn.Module:
    """The digits MLP 64-32-10 (the same initial weights on every node: seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


@lru_cache(maxsize=4)
def federated_digits(
    num_partitions: int, alpha: float, seed: int
) -> tuple[FederatedDataset, Tensor, Tensor]:
    """The digits training split over ``num_partitions`` by Dirichlet(alpha), and the test set."""
    return digits_federated(n_clients=num_partitions, alpha=alpha, seed=seed)


def load_partition(
    partition_id: int, num_partitions: int, alpha: float, seed: int
) -> tuple[Tensor, Tensor]:
    """Partition ``partition_id``'s (features [n, 64], labels [n])."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node config partition-id must lie in [0, num-partitions={num_partitions}); "
            f"got {partition_id}"
        )
    data, _, _ = federated_digits(num_partitions, alpha, seed)
    return data.client(partition_id)
