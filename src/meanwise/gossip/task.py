"""The gossip experiments' task: scikit-learn digits split over nodes, and small models.

Shared by the reproduction, the ``meanwise gossip run`` command and the benchmark, so a
distributed run and a simulated one see the same data and architecture.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from meanwise.data.digits import NUM_CLASSES, load_digits
from meanwise.data.federated_split import FederatedDataset, dirichlet_split

__all__ = ["digits_nodes", "digits_model", "MODELS", "SPLITS"]

MODELS = ("mlp", "cnn")
SPLITS = ("iid", "dirichlet")


def digits_nodes(
    n_nodes: int,
    split: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[FederatedDataset, tuple[Tensor, Tensor]]:
    """The digits training images split over ``n_nodes`` nodes and the held-out test set.

    ``split``: "iid" (a random equal partition) or "dirichlet" (per class, shares drawn from
    Dirichlet(alpha): label-skewed nodes). ``flatten``: 64 features (MLP) or ``[1, 8, 8]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes must be a positive int; got {n_nodes!r}")
    digits = load_digits(seed=seed)
    x_train, x_test = digits.train_images.to(dtype), digits.test_images.to(dtype)
    if flatten:
        x_train = x_train.reshape(len(x_train), -1)
        x_test = x_test.reshape(len(x_test), -1)
    labels = digits.train_labels
    if split == "iid":
        order = np.random.default_rng(seed).permutation(len(labels))
        parts = [np.sort(p) for p in np.array_split(order, n_nodes)]
    else:
        parts = dirichlet_split(labels.numpy(), n_nodes, alpha, seed)
    train = FederatedDataset.from_clients(
        [(x_train[torch.from_numpy(p)], labels[torch.from_numpy(p)]) for p in parts]
    )
    return train, (x_test, digits.test_labels)


def digits_model(kind: str = "mlp", hidden: int = 32) -> nn.Module:
    """A small classifier for 8x8 digits: "mlp" (64-hidden-hidden-10, ReLU) or "cnn" (two 3x3
    convolutions with 8 and 16 channels, 2x2 max-pool, a linear head): LeNet-like, scaled to
    8x8 inputs."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, NUM_CLASSES),
        )
    raise ValueError(f"kind must be one of {MODELS}; got {kind!r}")
