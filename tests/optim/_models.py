"""Small float64 models and data shared by the optimizer tests."""

import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).double()


def batches(kind: str, n_steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (8, 6) if kind == "mlp" else (8, 1, 6, 6)
    return [
        (
            torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(n_steps)
    ]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make(kind: str, seed: int = 0) -> nn.Module:
    return mlp(seed) if kind == "mlp" else convnet(seed)


def assert_same_params(a: nn.Module, b: nn.Module, rtol: float = 1e-9, atol: float = 1e-12):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
