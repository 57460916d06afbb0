"""How far FedAU's aggregate is from Flower's FedAvg default (weighted by num-examples).

One round from the initial model, every node present, on this app's partitions and recipe:
FedAU averages the updates with weights omega_n / N (omega_n = 1 while every node takes part
every round), FedAvg weights them by the partitions' sizes. Run from this folder:
``python fedau_vs_fedavg.py`` (no Flower process needed).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch
from meanwise_flower_app.task import federated_digits, model_fn

from meanwise.federated import Bernoulli, FedAU, FederatedSimulator, LocalTraining


def main() -> None:
    config = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())
    c = config["tool"]["flwr"]["app"]["config"]
    n = c["n-nodes"]
    data, _, _ = federated_digits(n, c["alpha"], c["data-seed"])
    local = LocalTraining("sgd", lr=c["lr"], steps=c["local-steps"], batch_size=c["batch-size"])
    sim = FederatedSimulator(
        model_fn(), data, FedAU(n), Bernoulli(torch.ones(n)), local, eval_every=10**6
    )
    x = sim.x.clone()
    steps = torch.full((n,), local.steps)
    deltas = (sim.local_updates(torch.arange(n), steps, x.expand(n, -1)) - x).double()
    sizes = data.sizes.double()
    fedau = deltas.mean(0)  # omega_n = 1 for all: (1/N) sum_n delta_n
    fedavg = (sizes[:, None] * deltas).sum(0) / sizes.sum()
    gap = float((fedau - fedavg).norm() / fedavg.norm())
    print(f"partition sizes {sizes.long().tolist()}: FedAU's and FedAvg's global updates are "
          f"{gap:.2f} apart (relative L2)")  # fmt: skip


if __name__ == "__main__":
    main()
