"""Flat client storage, the Dirichlet split and FedProx's Synthetic(α, β) generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meanwise.data.federated_split import FederatedDataset, digits_federated, dirichlet_split
from meanwise.data.fedprox_synthetic import fedprox_synthetic


def test_flat_storage_and_histograms():
    parts = [(torch.zeros(2, 3), torch.tensor([0, 2])), (torch.ones(3, 3), torch.tensor([1, 1, 2]))]
    data = FederatedDataset.from_clients(parts)
    assert data.offsets.tolist() == [0, 2, 5] and data.sizes.tolist() == [2, 3]
    x, y = data.client(1)
    assert torch.equal(x, torch.ones(3, 3)) and y.tolist() == [1, 1, 2]
    assert data.label_histograms(3).tolist() == [[1, 0, 1], [0, 2, 1]]


def test_empty_client_is_rejected():
    with pytest.raises(ValueError, match="empty clients: \\[1\\]"):
        FederatedDataset(torch.zeros(2, 1), torch.zeros(2), torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="labels"):
        FederatedDataset(torch.zeros(2, 1), torch.zeros(3), torch.tensor([0, 1, 2]))


def test_dirichlet_split_is_a_partition_with_label_skew():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_split(labels, 50, alpha=0.1, seed=0)
    together = np.sort(np.concatenate(parts))
    assert np.array_equal(together, np.arange(1000))  # every example exactly once
    assert min(len(p) for p in parts) >= 1
    # small alpha: most clients are dominated by one class (a uniform split would give ~0.1)
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.median(top_share) > 0.6
    iid = dirichlet_split(labels, 10, alpha=1000.0, seed=0)
    assert max(np.bincount(labels[p], minlength=10).max() / len(p) for p in iid) < 0.2


def test_digits_federated_shapes():
    data, test_x, test_y = digits_federated(n_clients=20, alpha=0.5, seed=1)
    assert data.n_clients == 20 and data.features.shape[1] == 64
    assert test_x.shape == (len(test_y), 64) and int(data.sizes.sum()) + len(test_y) == 1797


def test_fedprox_synthetic_sizes_split_and_covariance():
    train, test = fedprox_synthetic(1.0, 1.0, n_users=30, seed=4)
    sizes = np.random.default_rng(4).lognormal(4, 2, 30).astype(int) + 50
    total = (train.sizes + test.sizes).numpy()
    assert np.array_equal(total, sizes)
    assert np.array_equal(train.sizes.numpy(), (0.9 * sizes).astype(int))
    assert train.features.shape[1] == 60 and int(train.labels.max()) <= 9
    # within a user x ~ N(v_k, diag(j^-1.2)): pooled within-user variance per coordinate
    centered = []
    for k in range(30):
        x, _ = train.client(k)
        centered.append(x.double() - x.double().mean(0))
    var = torch.cat(centered).pow(2).sum(0) / (int(train.sizes.sum()) - 30)
    expected = torch.arange(1, 61, dtype=torch.float64).pow(-1.2)
    torch.testing.assert_close(var, expected, rtol=0.1, atol=0)
    with pytest.raises(ValueError, match="n_users"):
        fedprox_synthetic(1.0, 1.0, n_users=0)
