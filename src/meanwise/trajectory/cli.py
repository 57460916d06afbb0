"""`meanwise trajectory evaluate`: the released Social-Implicit weights on an ETH/UCY split."""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["add_commands"]

_EVALUATE_HELP = """\
Evaluates Social-Implicit weights on the test scenes of one leave-one-out split and writes
{"ade": ..., "fde": ...} (metres; best of --samples per pedestrian, averaged over pedestrians,
the protocol of the paper's tables) to --json, plus AMD, AMV and KDE-NLL (averaged over
scenes) with --distribution-metrics. The released weights run in float64 in compatibility mode
(every pedestrian in zone 0, as in the authors' code).

Data: --data-dir, else $MEANWISE_DATA_DIR, else ../shared/data beside the repository; the
folder holds eth_ucy/<split>/test/*.txt (or is the eth_ucy folder itself).
"""


def _run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from meanwise.atomic_io import atomic_write_json
    from meanwise.trajectory.data import load_split
    from meanwise.trajectory.evaluate import evaluate_scenes
    from meanwise.trajectory.social_implicit import SocialImplicit

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = SocialImplicit.from_official_checkpoint(args.official_checkpoint)
    scenes = load_split(args.split, "test", args.data_dir)
    start = time.perf_counter()
    result = evaluate_scenes(
        lambda observed, k, generator: model.predict(observed, k, generator=generator),
        scenes,
        samples=args.samples,
        seed=args.seed,
        distribution_metrics=args.distribution_metrics,
        distribution_samples=args.distribution_samples,
    )
    result = {"split": args.split, **result, "seconds": time.perf_counter() - start}
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {number}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {number}")
    return number


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `trajectory evaluate` to the `meanwise` command."""
    from meanwise.trajectory.data import SPLITS

    trajectory = subparsers.add_parser(
        "trajectory", help="trajectory prediction: evaluate Social-Implicit weights"
    )
    commands = trajectory.add_subparsers(dest="trajectory_command", required=True)
    evaluate = commands.add_parser(
        "evaluate",
        help="ADE/FDE (and AMD/AMV/KDE-NLL) of released weights on a split's test scenes",
        description=_EVALUATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "--official-checkpoint",
        required=True,
        metavar="PATH",
        help="val_best.pth or its folder (with args.json naming the split)",
    )
    evaluate.add_argument("--data-dir", default=None, metavar="DIR")
    evaluate.add_argument("--split", required=True, choices=SPLITS)
    evaluate.add_argument("--samples", type=_positive, default=20, help="K for best-of-K")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", default=None, metavar="OUT", help="write the result here")
    evaluate.add_argument(
        "--distribution-metrics", action="store_true", help="also AMD, AMV and KDE-NLL"
    )
    evaluate.add_argument(
        "--distribution-samples",
        type=_positive,
        default=None,
        metavar="K",
        help="samples for the distribution metrics (default: --samples; the paper uses 1000)",
    )
    evaluate.add_argument(
        "--threads",
        type=_non_negative,
        default=1,
        help="torch threads (default 1; 0 keeps torch's)",
    )
    evaluate.set_defaults(handler=_run_evaluate)
