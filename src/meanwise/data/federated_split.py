"""Client datasets stored flat with per-client offsets, and the Dirichlet label split.

Federated client sizes are heavy-tailed (FedProx's Synthetic draws lognormal sizes), so padding
every client to the largest would waste most of the memory. Instead all examples live in one
tensor, client n owning rows ``offsets[n]:offsets[n + 1]``; simulators draw minibatches by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["FederatedDataset", "dirichlet_split", "digits_federated"]


@dataclass(frozen=True)
class FederatedDataset:
    """``features[offsets[n]:offsets[n+1]]`` and the same rows of ``labels`` belong to client n."""

    features: Tensor
    labels: Tensor
    offsets: Tensor

    def __post_init__(self) -> None:
        offsets = self.offsets
        if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype != torch.long:
            raise ValueError("offsets must be an int64 vector [n_clients + 1]")
        if int(offsets[0]) != 0 or int(offsets[-1]) != self.features.shape[0]:
            raise ValueError(
                f"offsets must start at 0 and end at len(features)={self.features.shape[0]}"
            )
        if self.labels.shape[0] != self.features.shape[0]:
            raise ValueError(
                f"labels has {self.labels.shape[0]} rows but features has {self.features.shape[0]}"
            )
        sizes = offsets[1:] - offsets[:-1]
        if (sizes <= 0).any():
            empty = (sizes <= 0).nonzero().flatten()[:5].tolist()
            raise ValueError(f"every client needs at least one example; empty clients: {empty}")

    @property
    def n_clients(self) -> int:
        return self.offsets.numel() - 1

    @property
    def sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def client(self, n: int) -> tuple[Tensor, Tensor]:
        lo, hi = int(self.offsets[n]), int(self.offsets[n + 1])
        return self.features[lo:hi], self.labels[lo:hi]

    def label_histograms(self, n_classes: int) -> Tensor:
        """``[n_clients, n_classes]`` label counts (FedAU's participation probabilities use it)."""
        owner = torch.repeat_interleave(torch.arange(self.n_clients), self.sizes)
        flat = owner * n_classes + self.labels.long()
        counts = torch.bincount(flat, minlength=self.n_clients * n_classes)
        return counts.reshape(self.n_clients, n_classes)

    @staticmethod
    def from_clients(parts: list[tuple[Tensor, Tensor]]) -> FederatedDataset:
        """Concatenate per-client (features, labels) pairs."""
        if not parts:
            raise ValueError("parts is empty; need at least one client")
        sizes = torch.tensor([len(y) for _, y in parts], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
        return FederatedDataset(
            torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), offsets
        )


def dirichlet_split(labels: Tensor | np.ndarray, n_clients: int, alpha: float, seed: int = 0):
    """Assign examples to clients: for every class, shares ~ Dirichlet(alpha·1_N).

    Returns a list of index arrays, one per client. Small alpha leaves many clients empty, so
    each empty client then takes one example from the currently largest client: every client
    ends with at least one example while the label skew stays what the Dirichlet drew.
    """
    if int(n_clients) < 1:
        raise ValueError(f"n_clients must be positive; got {n_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive; got {alpha}")
    y = np.asarray(labels)
    if len(y) < n_clients:
        raise ValueError(f"{len(y)} examples cannot give each of n_clients={n_clients} one")
    rng = np.random.default_rng(seed)
    owners: list[list[int]] = [[] for _ in range(n_clients)]
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rng.shuffle(members)
        shares = rng.dirichlet([alpha] * n_clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for n, part in enumerate(np.split(members, cuts)):
            owners[n].extend(part.tolist())
    for n in range(n_clients):
        if not owners[n]:
            donor = max(range(n_clients), key=lambda k: len(owners[k]))
            owners[n].append(owners[donor].pop())
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in owners]


def digits_federated(
    n_clients: int = 100, alpha: float = 0.1, seed: int = 0, test_fraction: float = 0.25
) -> tuple[FederatedDataset, Tensor, Tensor]:
    """scikit-learn digits flattened to 64 features, train split over clients by Dirichlet(alpha).

    Returns (clients' training data, test features [M, 64], test labels [M]).
    """
    from meanwise.data.digits import load_digits

    split = load_digits(seed=seed, test_fraction=test_fraction)
    x = split.train_images.reshape(len(split.train_labels), -1)
    parts = dirichlet_split(split.train_labels.numpy(), n_clients, alpha, seed)
    data = FederatedDataset.from_clients(
        [(x[torch.from_numpy(i)], split.train_labels[torch.from_numpy(i)]) for i in parts]
    )
    return data, split.test_images.reshape(len(split.test_labels), -1), split.test_labels
