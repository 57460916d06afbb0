"""FedProx's Synthetic(α, β) federated classification data (Li et al., MLSys 2020).

The generator of the FedProx repository (data/synthetic_*/generate_niid.py), for any number of
users: d = 60, 10 classes, n_k = int(lognormal(4, 2)) + 50 examples; u_k ~ N(0, α),
B_k ~ N(0, β); v_k ~ N(B_k, 1)^d; Σ = diag(j^−1.2); W_k ~ N(u_k, 1)^{d×10}, b_k ~ N(u_k, 1)^10;
x ~ N(v_k, Σ); y = argmax softmax(W_kᵀx + b_k); each user's data split 90/10 into train/test.
α controls how much the local models differ, β how much the local inputs differ. (The
normals' second argument is the standard deviation, as in numpy.)
"""

from __future__ import annotations

import numpy as np
import torch

from meanwise.data.federated_split import FederatedDataset

__all__ = ["fedprox_synthetic"]


def fedprox_synthetic(
    alpha: float,
    beta: float,
    n_users: int = 30,
    *,
    dim: int = 60,
    n_classes: int = 10,
    seed: int = 0,
    train_fraction: float = 0.9,
) -> tuple[FederatedDataset, FederatedDataset]:
    """(train, test) client datasets, float32 features and int64 labels."""
    if int(n_users) < 1:
        raise ValueError(f"n_users must be positive; got {n_users}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0; got alpha={alpha}, beta={beta}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1); got {train_fraction}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, n_users).astype(int) + 50
    mean_w = rng.normal(0, alpha, n_users)
    shift = rng.normal(0, beta, n_users)
    cov_diag = np.power(np.arange(1, dim + 1, dtype=float), -1.2)
    train, test = [], []
    for k in range(n_users):
        mean_x = rng.normal(shift[k], 1, dim)
        w = rng.normal(mean_w[k], 1, (dim, n_classes))
        b = rng.normal(mean_w[k], 1, n_classes)
        # diagonal Σ: independent coordinates with standard deviations sqrt(j^−1.2)
        x = mean_x + rng.standard_normal((sizes[k], dim)) * np.sqrt(cov_diag)
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of the logits
        n_train = int(train_fraction * sizes[k])
        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
        train.append((xt[:n_train], yt[:n_train]))
        test.append((xt[n_train:], yt[n_train:]))
    return FederatedDataset.from_clients(train), FederatedDataset.from_clients(test)
