"""`meanwise gossip run`: gossip learning with one process per node over torch.distributed.

Registered through `meanwise.cli`'s command modules.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from meanwise.cli_args import output_file, port, positive_float, positive_int, positive_seconds

__all__ = ["add_commands"]

_RUN_HELP = """\
Runs gossip learning on the 8x8 digits with one process per node (torch.distributed, gloo):
each node trains its own model and exchanges it point-to-point with its neighbours.

On one machine (default) it starts --nodes processes on loopback. Across machines, start it
once per node with the usual environment: MASTER_ADDR and MASTER_PORT (rank 0's address),
RANK (this node, 0..N-1) and WORLD_SIZE (= --nodes); every process needs the same options.
Rank 0 prints the accuracy and, with --out FILE, saves every node's final model (a torch
file: params [N, P], per-node counters, the config). --simulate runs the same configuration
in the vectorized simulator instead (the same models, in one process).

Example: meanwise gossip run --nodes 8 --topology regular --degree 4 --ticks 300
"""


def _config(args: argparse.Namespace):
    from meanwise.gossip.distributed import GossipRunConfig

    return GossipRunConfig(
        nodes=args.nodes,
        topology=args.topology,
        degree=args.degree,
        edge_probability=args.edge_probability,
        ticks=args.ticks,
        synchronous=args.sync,
        correct_variance=args.merge == "corrected",
        beta=args.beta,
        model=args.model,
        split=args.split,
        lr=args.lr,
        batch_size=args.batch_size,
        shared_init=args.shared_init,
        seed=args.seed,
        dtype="float64" if args.float64 else "float32",
        eval_every=args.eval_every,
        timeout_s=args.timeout,
    )


def _accuracy(config, params) -> float:
    import torch
    from torch.func import functional_call

    from meanwise.engine.layout import ParameterLayout
    from meanwise.gossip.distributed import build

    run = build(config)
    layout = ParameterLayout.of(run.model)
    x, y = run.test
    with torch.no_grad():
        accs = [
            float(
                (functional_call(run.model, layout.unflatten(row), (x,)).argmax(-1) == y)
                .double()
                .mean()
            )
            for row in params
        ]
    return sum(accs) / len(accs)


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from meanwise.gossip.distributed import gather_and_save, launch_local

    config = _config(args)
    start = time.perf_counter()
    if args.simulate:
        from meanwise.gossip.distributed import simulate

        sim = simulate(config)
        for record in sim.metrics:
            print(f"tick {record['tick']}: mean test accuracy {100 * record['mean_accuracy']:.1f}%")
        summary = {"mode": "simulated", "merges": sim.merges, "trainings": sim.trainings}
        params = sim.params
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from meanwise.gossip.distributed import init_group

        torch.set_num_threads(args.threads)
        init_group(None, None, config.timeout_s)
        try:
            result = gather_and_save(config, dist.get_rank(), dist.get_world_size(), args.out)
        finally:
            dist.destroy_process_group()
        if result is None:  # not rank 0
            return 0
        summary, params = _summary(result, "distributed (env)"), result["params"]
    else:
        result = launch_local(config, port=args.port, out=args.out)
        summary, params = _summary(result, "distributed (local processes)"), result["params"]
    summary = {
        "nodes": config.nodes,
        "ticks": config.ticks,
        **summary,
        "mean_test_accuracy": _accuracy(config, params),
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(summary, indent=2))
    return 0


def _summary(result: dict, mode: str) -> dict:
    stats = result["stats"]
    received = sum(s["messages_received"] for s in stats)
    slowest = max(s["exchange_seconds"] for s in stats)
    return {
        "mode": mode,
        "merges": int(sum(s["merges"] for s in stats)),
        "trainings": int(sum(s["trainings"] for s in stats)),
        "models_exchanged": int(received),
        "exchange_models_per_s": received / slowest if slowest > 0 else float("nan"),
    }


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `gossip run` to the `meanwise` command."""
    from meanwise.gossip.distributed import TOPOLOGIES
    from meanwise.gossip.task import MODELS, SPLITS

    gossip = subparsers.add_parser("gossip", help="decentralized gossip learning")
    commands = gossip.add_subparsers(dest="gossip_command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="gossip learning, one process per node (torch.distributed)",
        description=_RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--nodes", type=positive_int, default=8, help="number of nodes (processes)")
    run.add_argument("--topology", choices=TOPOLOGIES, default="regular")
    run.add_argument("--degree", type=positive_int, default=4, help="degree of 'regular'")
    run.add_argument("--edge-probability", type=float, default=0.5, help="p of 'erdos-renyi'")
    run.add_argument("--ticks", type=positive_int, default=200)
    run.add_argument("--sync", action="store_true", help="synchronous rounds (train+merge each)")
    run.add_argument("--merge", choices=("plain", "corrected"), default="corrected")
    run.add_argument("--beta", type=float, default=0.5, help="the own model's merge weight")
    run.add_argument("--model", choices=MODELS, default="mlp")
    run.add_argument("--split", choices=SPLITS, default="iid")
    run.add_argument("--lr", type=positive_float, default=0.05)
    run.add_argument("--batch-size", type=positive_int, default=16)
    run.add_argument("--shared-init", action="store_true", help="all nodes start from one model")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--float64", action="store_true")
    run.add_argument("--eval-every", type=positive_int, default=50)
    run.add_argument(
        "--out", type=output_file, default=None, metavar="FILE", help="save the final models here"
    )
    run.add_argument("--port", type=port, default=None, help="loopback port (default: a free one)")
    run.add_argument(
        "--timeout",
        type=positive_seconds,
        default=60.0,
        help="seconds to wait for a neighbour before failing with its rank named (default 60)",
    )
    run.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    run.add_argument("--simulate", action="store_true", help="run the vectorized simulator")
    run.set_defaults(handler=_run)
