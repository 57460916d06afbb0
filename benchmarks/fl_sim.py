"""Federated simulation speed: meanwise's vectorized local training vs a per-client loop.

Workload from issue 3: every client of a round runs 10 local SGD steps (batch 32) of an MLP
60-64-10 on FedProx Synthetic(1, 1) data, for 20 and 100 clients. Candidates, interleaved (one
turn each per repetition, so this shared machine's drifts hit all alike), reported as client
updates per second and as ratios to the loop:

- ``loop``: the usual hand-written simulation -- per client, load the global weights into one
  nn.Module, a fresh torch.optim.SGD, 10 forward/backward/step iterations;
- ``meanwise sequential``: the simulator's fallback path (functional_call + autograd per client);
- ``meanwise vectorized``: ``functional_call`` + ``vmap(grad)`` over the stacked clients.

Then one whole round (local training + FedAU aggregation) with 2,500 / 5,000 / 10,000
logistic-regression clients, to check the time and memory grow linearly in the clients.
Flower's simulation (the issue's third candidate) is not installed in this environment; the
output says so instead of a number.

    python benchmarks/fl_sim.py [--quick] [--json PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.experiments.base import atomic_write_text
from meanwise.federated import FedAU, FederatedSimulator, LocalTraining
from meanwise.federated.participation import Bernoulli
from meanwise.functional.local_training import draw_batches, train_sequential, train_vectorized

STEPS, BATCH, LR = 10, 32, 0.05


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(60, 64), nn.ReLU(), nn.Linear(64, 10))


def time_interleaved(turns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of every turn, taking turns round-robin after one warm-up."""
    for turn in turns.values():
        turn()
    samples: dict[str, list[float]] = {name: [] for name in turns}
    for _ in range(repeats):
        for name, turn in turns.items():
            start = time.perf_counter()
            turn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in samples.items()}


def bench_clients(n_clients: int, repeats: int) -> dict[str, float]:
    data, _ = fedprox_synthetic(1.0, 1.0, n_users=n_clients, seed=0)
    torch.manual_seed(0)
    model = mlp()
    clients = torch.arange(n_clients)
    steps = torch.full((n_clients,), STEPS)
    index, valid = draw_batches(data, clients, STEPS, BATCH, torch.Generator().manual_seed(0))
    local = LocalTraining("sgd", lr=LR, steps=STEPS, batch_size=BATCH)
    start = {k: v.detach().expand(n_clients, *v.shape) for k, v in model.named_parameters()}
    global_state = copy.deepcopy(model.state_dict())
    worker = mlp()

    def loop() -> None:
        for s in range(n_clients):
            worker.load_state_dict(global_state)
            opt = torch.optim.SGD(worker.parameters(), lr=LR)
            for k in range(STEPS):
                rows = index[k, s][valid[k, s]]
                opt.zero_grad()
                F.cross_entropy(worker(data.features[rows]), data.labels[rows]).backward()
                opt.step()

    def sequential() -> None:
        train_sequential(model, start, {}, data, index, valid, steps, local, F.cross_entropy)

    def vectorized() -> None:
        train_vectorized(model, start, data, index, valid, steps, local, F.cross_entropy)

    turns = {"loop": loop, "meanwise sequential": sequential, "meanwise vectorized": vectorized}
    return time_interleaved(turns, repeats)


def logistic_round(n_clients: int) -> tuple[float, float]:
    """(seconds for one full round, growth of the peak RSS in MiB) with n_clients LR clients."""
    gen = torch.Generator().manual_seed(n_clients)
    sizes = torch.randint(20, 200, (n_clients,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    features = torch.randn(int(sizes.sum()), 60, generator=gen)
    labels = torch.randint(0, 10, (int(sizes.sum()),), generator=gen)
    data = FederatedDataset(features, labels, offsets)
    sim = FederatedSimulator(
        nn.Linear(60, 10),
        data,
        FedAU(n_clients),
        Bernoulli(torch.ones(n_clients)),
        LocalTraining("sgd", lr=LR, steps=STEPS, batch_size=BATCH),
        eval_every=10**9,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    sim.step()
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return seconds, grown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    results: dict = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": args.threads,
        },
        "quick": args.quick,
        "workload": {"model": "MLP 60-64-10", "local_sgd_steps": STEPS, "batch": BATCH},
        "flower": "not installed in this environment (flwr); not measured",
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {repeats} interleaved repeats")
    print("Flower: not installed in this environment, so its column is not measured")
    for n in (20, 100):
        medians = bench_clients(n, repeats)
        base = medians["loop"]
        print(f"\n{n} clients, MLP 60-64-10, {STEPS} local SGD steps, batch {BATCH}")
        print(f"  {'candidate':24s} {'round':>10s} {'per update':>11s} {'updates/s':>10s}  vs loop")
        rows = []
        for name, seconds in medians.items():
            ratio = base / seconds
            mark = (
                f"  (target >= 4x: {'ok' if ratio >= 4 else 'MISSED'})" if "vector" in name else ""
            )
            print(
                f"  {name:24s} {seconds * 1e3:8.1f}ms {seconds / n * 1e3:9.2f}ms "
                f"{n / seconds:10.0f} {ratio:7.2f}x{mark}"
            )
            rows.append({"candidate": name, "round_ms": seconds * 1e3,
                         "updates_per_s": n / seconds, "speedup_vs_loop": ratio})  # fmt: skip
        results[f"clients/{n}"] = rows
    print(f"\nlogistic regression 60->10, one round ({STEPS} steps, batch {BATCH}) + FedAU")
    print(f"  {'clients':>8s} {'round':>9s} {'per client':>11s} {'peak RSS growth':>16s}")
    rows = []
    for n in (2500, 5000, 10000):
        seconds, grown = logistic_round(n)
        mark = f"  (target < 1 s: {'ok' if seconds < 1 else 'MISSED'})" if n == 10000 else ""
        print(f"  {n:8d} {seconds:8.3f}s {seconds / n * 1e6:9.1f}us {grown:13.1f}MiB{mark}")
        rows.append({"clients": n, "round_s": seconds, "rss_growth_mib": grown})
    results["logistic_round"] = rows
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
