"""Gossip simulation speed: meanwise's vectorized simulator vs a per-node loop, and the
multi-process runner's exchange throughput.

Workload (issue 4): 50 nodes on a random 8-regular graph, each with its own MLP 64-32-32-10 on
its share of the digits, one minibatch of 16 (SGD, momentum 0.9, weight decay 1e-4) per
training event, merges with beta = 0.5, plain and variance-corrected. Two schedules:

- ``async``: the paper's protocol (train every randint(8, 12) ticks; ~5 nodes train and ~5
  merge per tick), 200 ticks;
- ``sync``: synchronous rounds (every node trains and merges every tick), 20 ticks.

Candidates, interleaved (one turn each per repetition, so this shared machine's drifts hit both
alike), on the same initial models and schedule (they end with the same models):

- ``per-node loop``: :class:`meanwise.gossip.reference.PerNodeGossip`, one nn.Module and
  torch.optim.SGD per node, messages delivered one by one, ``merge_state_dicts`` per merge;
- ``vectorized``: :class:`meanwise.gossip.GossipSimulator` (stacked rows; the run planned as
  one window of dependency levels, each level's trainings one batched call (batched matmuls
  for this MLP, ``vectorize="auto"``) and its merges one batched merge, so events of many
  ticks share a call).

Then the runner's exchange step (``meanwise.gossip.distributed.measure_exchange``): 8 gloo
processes on loopback on a random 4-regular graph, each round every process sends its flat
model to its neighbours and receives theirs; reported as models delivered per second.

    python benchmarks/gossip_sim.py [--quick] [--json PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import torch

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.engine import LocalTraining
from meanwise.experiments.base import atomic_write_text
from meanwise.gossip import GossipProtocol, GossipSimulator, MergeRule, random_regular
from meanwise.gossip.distributed import measure_exchange
from meanwise.gossip.reference import PerNodeGossip
from meanwise.gossip.task import digits_model, digits_nodes

NODES, DEGREE = 50, 8
TARGET = 10.0


def bench_simulation(schedule: str, correct: bool, ticks: int, repeats: int) -> dict:
    train, _ = digits_nodes(NODES, "iid")
    local = LocalTraining(
        rule="momentum", lr=0.05, batch_size=16, options={"momentum": 0.9, "weight_decay": 1e-4}
    )
    topology = random_regular(NODES, DEGREE)
    protocol = GossipProtocol.synchronous() if schedule == "sync" else GossipProtocol()
    rule = MergeRule(correct_variance=correct)
    sim = GossipSimulator(
        digits_model("mlp"), topology, train, protocol, local, merge=rule, eval_every=10**9
    )
    start = sim.state_dict()

    def vectorized() -> torch.Tensor:
        sim.load_state_dict(start)
        sim.run(ticks)
        return sim.params

    def loop() -> torch.Tensor:
        ref = PerNodeGossip(
            digits_model("mlp"), topology, train, protocol, local, rule, start["params"]
        )
        ref.run(ticks)
        return ref.parameters()

    timings = time_interleaved({"per-node loop": loop, "vectorized": vectorized}, repeats)
    gap = float((timings.results["vectorized"] - timings.results["per-node loop"]).abs().max())
    return {
        "schedule": schedule,
        "merge": "corrected" if correct else "plain",
        "ticks": ticks,
        "wall_s": timings.wall,
        "cpu_s": timings.cpu,
        "speedup_wall": timings.wall["per-node loop"] / timings.wall["vectorized"],
        "speedup_cpu": timings.cpu["per-node loop"] / timings.cpu["vectorized"],
        "max_abs_difference": gap,
        "trainings": sim.trainings,
        "merges": sim.merges,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and ticks")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    scale = 1 if args.quick else 2
    results: dict = {
        "machine": machine_info(threads=args.threads),
        "quick": args.quick,
        "workload": {"nodes": NODES, "degree": DEGREE, "model": "MLP 64-32-32-10", "batch": 16},
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {repeats} interleaved repeats")
    print(f"{NODES} nodes, random {DEGREE}-regular, MLP 64-32-32-10, batch 16")
    print(
        f"  {'schedule':8s} {'merge':10s} {'ticks':>5s} {'loop':>9s} {'vectorized':>11s} "
        f"{'wall ratio':>10s} {'cpu ratio':>9s}  same models"
    )
    rows = []
    for schedule, ticks in (("async", 100 * scale), ("sync", 10 * scale)):
        for correct in (False, True):
            row = bench_simulation(schedule, correct, ticks, repeats)
            mark = "ok" if row["speedup_cpu"] >= TARGET else "MISSED"
            print(
                f"  {schedule:8s} {row['merge']:10s} {ticks:5d} "
                f"{row['wall_s']['per-node loop']:8.2f}s {row['wall_s']['vectorized']:10.2f}s "
                f"{row['speedup_wall']:9.1f}x {row['speedup_cpu']:8.1f}x  "
                f"(|diff| {row['max_abs_difference']:.1e}; target >= {TARGET:g}x: {mark})"
            )
            rows.append(row)
    results["simulation"] = rows
    rounds = 30 if args.quick else 100
    print(f"\nexchange step, 8 processes (gloo, loopback), random 4-regular, {rounds} rounds")
    exchange = []
    for numel in (3_000, 100_000):
        measured = measure_exchange(nodes=8, degree=4, numel=numel, rounds=rounds)
        print(
            f"  {numel:>7d} float32 per model: {measured['models_per_s']:8.0f} models/s "
            f"({measured['megabytes_per_s']:.0f} MB/s, "
            f"{measured['seconds_per_round'] * 1e3:.1f} ms per round)"
        )
        exchange.append({"numel": numel, **measured})
    results["exchange"] = exchange
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
