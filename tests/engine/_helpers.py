"""Shared test fixtures for the engine and the simulators built on it: the small MLP and the
uneven clients the local-training and simulator tests train, and the device fixture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meanwise.data.federated_split import FederatedDataset


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """``6 -> 8 -> 3`` with a Tanh: a Linear/activation stack every execution can run."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def client_data(
    sizes: tuple[int, ...] = (3, 40, 17, 9), dtype: torch.dtype = torch.float64, seed: int = 0
) -> FederatedDataset:
    """One client per size (some smaller than a batch of 8), 6 features, 3 classes."""
    gen = torch.Generator().manual_seed(seed)
    parts = [
        (torch.randn(s, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (s,), generator=gen))
        for s in sizes
    ]
    return FederatedDataset.from_clients(parts)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Each device a simulator must run on: the CPU, and CUDA where one is available."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the CUDA run of this test is skipped")
    return torch.device(request.param)
