"""Federated simulation speed: meanwise's vectorized local training vs a per-client loop vs Flower.

Workload from issue 3: every client of a round runs 10 local SGD steps (batch 32) of an MLP
60-64-10 on FedProx Synthetic(1, 1) data, for 20 and 100 clients. Candidates, reported as client
updates per second and as ratios:

- ``loop``: the usual hand-written simulation -- per client, load the global weights into one
  nn.Module, a fresh torch.optim.SGD, 10 forward/backward/step iterations;
- ``meanwise sequential``: the simulator's fallback path (functional_call + autograd per client);
- ``meanwise vmap``: ``functional_call`` + ``vmap(grad)`` over the stacked clients;
- ``meanwise vectorized``: what the simulator runs for this model (a Linear/ReLU stack: batched
  matmuls, ``LocalTrainer(..., execution="stacked")``);
- ``Flower``: flwr 1.42's simulation (Ray backend, 2 CPUs, one actor per CPU), a ServerApp that
  sends the global model to every node each round, a ClientApp running the same 10 SGD steps
  (``meanwise.federated.flower.local_training_client_app``). Its start-up (Ray, actors, the
  first round's imports) is reported separately; its rate is the median of the later rounds.

The in-process candidates are interleaved (one turn each per repetition, so this shared
machine's drifts hit all alike). Then one whole round (local training + FedAU aggregation) with
2,500 / 5,000 / 10,000 logistic-regression clients, each size in a fresh process so its peak RSS
is its own: the first round (cold: one-time set-up included) and the second (warm).

    python benchmarks/fl_sim.py [--quick] [--json PATH] [--threads 1] [--no-flower]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.atomic_io import atomic_write_json
from meanwise.data.federated_split import FederatedDataset
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.engine import LocalTrainer, ParameterLayout, Population, draw_batches
from meanwise.federated import FedAU, FederatedSimulator, LocalTraining
from meanwise.federated.participation import Bernoulli

STEPS, BATCH, LR = 10, 32, 0.05


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(60, 64), nn.ReLU(), nn.Linear(64, 10))


def bench_clients(n_clients: int, repeats: int) -> dict[str, float]:
    data, _ = fedprox_synthetic(1.0, 1.0, n_users=n_clients, seed=0)
    torch.manual_seed(0)
    model = mlp()
    clients = torch.arange(n_clients)
    steps = torch.full((n_clients,), STEPS)
    index, valid = draw_batches(data, clients, STEPS, BATCH, torch.Generator().manual_seed(0))
    local = LocalTraining("sgd", lr=LR, steps=STEPS, batch_size=BATCH)
    layout = ParameterLayout.of(model)
    start = layout.flatten(dict(model.named_parameters())).detach().expand(n_clients, -1)
    trainers = {
        execution: LocalTrainer(model, local, F.cross_entropy, execution=execution)
        for execution in ("sequential", "vmap", "stacked")
    }

    def train(execution: str) -> torch.Tensor:
        population = Population.zeros_state(layout, start, local.state_slots)
        return trainers[execution].train(population, data, index, valid, steps).params

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
        train("sequential")

    def vmapped() -> None:
        train("vmap")

    def vectorized() -> None:
        train("stacked")

    turns = {
        "loop": loop,
        "meanwise sequential": sequential,
        "meanwise vmap": vmapped,
        "meanwise vectorized": vectorized,
    }
    return time_interleaved(turns, repeats).wall


def bench_flower(n_clients: int, rounds: int) -> dict[str, float]:
    """Flower's Ray simulation of the same workload: start-up and steady seconds per round."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from meanwise.federated.flower import local_training_client_app, wait_for_nodes

    data, _ = fedprox_synthetic(1.0, 1.0, n_users=n_clients, seed=0)
    sizes = data.sizes.tolist()

    def data_fn(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        # the node's own rows (random values, FedProx's sizes): the cost of 10 SGD steps of
        # batch 32 does not depend on the values, and no node needs the others' data
        p = int(context.node_config["partition-id"])
        gen = torch.Generator().manual_seed(p)
        return torch.randn(sizes[p], 60, generator=gen), torch.randint(0, 10, (sizes[p],))

    local = LocalTraining("sgd", lr=LR, steps=STEPS, batch_size=BATCH)
    client = local_training_client_app(mlp, data_fn, local)
    server = ServerApp()
    timings: dict[str, float] = {}
    start = time.perf_counter()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid, n_clients)
        timings["nodes_connected_s"] = time.perf_counter() - start
        arrays = ArrayRecord(mlp().state_dict())
        seconds = []
        for r in range(1, rounds + 1):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r})})
            messages = [Message(content, n, MessageType.TRAIN) for n in nodes]
            t = time.perf_counter()
            replies = list(grid.send_and_receive(messages, timeout=600))
            seconds.append(time.perf_counter() - t)
            if sum(not m.has_error() for m in replies) != n_clients:
                raise RuntimeError(f"round {r}: {len(replies)} replies of {n_clients}")
        timings["first_round_s"] = seconds[0]
        timings["round_s"] = statistics.median(seconds[1:])

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
    }
    run_simulation(server, client, num_supernodes=n_clients, backend_config=backend)
    timings["startup_s"] = timings["nodes_connected_s"] + timings["first_round_s"]
    return timings


def logistic_round(n_clients: int) -> dict[str, float]:
    """Two rounds with n_clients logistic-regression clients: seconds of the first (cold) and
    second (warm) round, and the peak RSS of the process in MiB (run it in a fresh process)."""
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
    data_mib = (features.nbytes + labels.nbytes) / 2**20
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        sim.step()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cold_s": seconds[0], "warm_s": seconds[1], "peak_rss_mib": peak, "data_mib": data_mib}


def logistic_round_subprocess(n_clients: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--logistic-clients", str(n_clients), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flower_available() -> str | None:
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError as error:
        return f"not installed ({error.name}); pip install '.[flower-sim]'"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's simulation")
    parser.add_argument("--logistic-clients", type=int, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.logistic_clients:
        print(json.dumps(logistic_round(args.logistic_clients)))
        return 0
    repeats = 3 if args.quick else 10
    flower_rounds = 3 if args.quick else 5
    flower_missing = "skipped (--no-flower)" if args.no_flower else _flower_available()
    results: dict = {
        "machine": machine_info(threads=args.threads, cpus=os.cpu_count()),
        "quick": args.quick,
        "workload": {"model": "MLP 60-64-10", "local_sgd_steps": STEPS, "batch": BATCH},
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {repeats} interleaved repeats")
    if flower_missing:
        print(f"Flower: {flower_missing}; its column is not measured")
        results["flower"] = flower_missing
    for n in (20, 100):
        medians = bench_clients(n, repeats)
        base = medians["loop"]
        print(f"\n{n} clients, MLP 60-64-10, {STEPS} local SGD steps, batch {BATCH}")
        print(f"  {'candidate':24s} {'round':>10s} {'per update':>11s} {'updates/s':>10s}  vs loop")
        rows = []
        for name, seconds in medians.items():
            ratio = base / seconds
            mark = (
                f"  (target >= 4x: {'ok' if ratio >= 4 else 'MISSED'})"
                if name == "meanwise vectorized"
                else ""
            )
            print(
                f"  {name:24s} {seconds * 1e3:8.1f}ms {seconds / n * 1e3:9.2f}ms "
                f"{n / seconds:10.0f} {ratio:7.2f}x{mark}"
            )
            rows.append({"candidate": name, "round_ms": seconds * 1e3,
                         "updates_per_s": n / seconds, "speedup_vs_loop": ratio})  # fmt: skip
        if not flower_missing:
            flower = bench_flower(n, flower_rounds)
            seconds = flower["round_s"]
            vectorized = medians["meanwise vectorized"]
            ratio = seconds / vectorized
            print(
                f"  {'Flower (Ray, 2 CPUs)':24s} {seconds * 1e3:8.1f}ms {seconds / n * 1e3:9.2f}ms "
                f"{n / seconds:10.0f} {base / seconds:7.2f}x  (vectorized is {ratio:.1f}x "
                f"Flower; target >= 20x: {'ok' if ratio >= 20 else 'MISSED'})"
            )
            print(
                f"  Flower start-up {flower['startup_s']:.1f} s (nodes connected after "
                f"{flower['nodes_connected_s']:.1f} s, first round {flower['first_round_s']:.1f} s)"
            )
            rows.append({"candidate": "Flower", "round_ms": seconds * 1e3,
                         "updates_per_s": n / seconds, "speedup_vs_loop": base / seconds,
                         "vectorized_vs_flower": ratio, **flower})  # fmt: skip
        results[f"clients/{n}"] = rows
    print(f"\nlogistic regression 60->10, one round ({STEPS} steps, batch {BATCH}) + FedAU")
    print("  (each size in a fresh process; cold = first round, with one-time set-up)")
    print(f"  {'clients':>8s} {'cold':>8s} {'warm':>8s} {'per client':>11s} {'peak RSS':>10s}")
    rows = []
    for n in (2500, 5000, 10000):
        row = logistic_round_subprocess(n, args.threads)
        warm = row["warm_s"]
        mark = f"  (target < 1 s: {'ok' if warm < 1 else 'MISSED'})" if n == 10000 else ""
        print(
            f"  {n:8d} {row['cold_s']:7.3f}s {warm:7.3f}s {warm / n * 1e6:9.1f}us "
            f"{row['peak_rss_mib']:8.0f}MiB{mark}"
        )
        rows.append({"clients": n, **row})
    growth = [(b["peak_rss_mib"] - a["peak_rss_mib"]) for a, b in zip(rows, rows[1:], strict=False)]
    print(f"  peak RSS growth per +2,500 / +5,000 clients: {growth[0]:.0f} / {growth[1]:.0f} MiB")
    results["logistic_round"] = rows
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
