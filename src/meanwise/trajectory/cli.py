"""`meanwise trajectory evaluate` (the released Social-Implicit weights on an ETH/UCY split) and
`meanwise trajectory fetch-data` (download the split files and weights, checksummed)."""

from __future__ import annotations

import argparse
import json
import time

from meanwise.cli_args import (
    UsageError,
    non_negative_int,
    output_dir,
    output_file,
    positive_int,
    positive_seconds,
)

__all__ = ["add_commands"]

_EVALUATE_HELP = """\
Evaluates Social-Implicit weights on the test scenes of one leave-one-out split and writes
{"ade": ..., "fde": ...} (metres; best of --samples per pedestrian, averaged over pedestrians,
the protocol of the paper's tables) to --json, plus AMD, AMV and KDE-NLL (averaged over
scenes) with --distribution-metrics. The released weights run in float64 in compatibility mode
(every pedestrian in zone 0, as in the authors' code).

Data: --data-dir, else $MEANWISE_DATA_DIR, else ../shared/data beside the repository, else
where `meanwise trajectory fetch-data` puts it by default; the folder holds
eth_ucy/<split>/test/*.txt (or is the eth_ucy folder itself).
"""

_FETCH_HELP = """\
Downloads the ETH/UCY leave-one-out split files (eth, hotel, univ, zara1, zara2, raw; as
distributed in Social-STGCNN's datasets/ folder) and the SDD split files (Social-Implicit's),
and with --checkpoints the released Social-Implicit weights, from raw GitHub URLs at pinned
commits. Every file is checked against the SHA-256 table shipped with meanwise and written
atomically: a file that does not match is refused and deleted, a verified one already present
is kept, so a rerun resumes. --mirror URL fetches the same files from a base URL that serves the
data folder's layout (URL/eth_ucy/eth/test/biwi_eth.txt, ...).

Destination: --dest, else $MEANWISE_DATA_DIR, else ~/.cache/meanwise/data ($XDG_CACHE_HOME),
which `meanwise trajectory evaluate`, `meanwise reproduce social-implicit` and the tests find
without --data-dir.
"""


def _run_fetch(args: argparse.Namespace) -> int:
    import sys

    from meanwise.trajectory.fetch import fetch_data

    summary = fetch_data(
        args.dest,
        mirror=args.mirror,
        checkpoints=args.checkpoints,
        timeout=args.timeout,
        log=(lambda line: print(line, file=sys.stderr)) if args.verbose else None,
    )
    where = summary.destination.expanduser().absolute()
    print(
        f"meanwise: {summary.downloaded} file(s) downloaded and {summary.present} already "
        f"present, all SHA-256 verified, in {where}"
    )
    print(f"use it with --data-dir {where} (or export MEANWISE_DATA_DIR={where})")
    return 0


def _mirror_url(value: str) -> str:
    from meanwise.trajectory.fetch import check_mirror

    try:
        return check_mirror(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from meanwise.atomic_io import atomic_write_json
    from meanwise.trajectory.data import load_split
    from meanwise.trajectory.evaluate import evaluate_scenes
    from meanwise.trajectory.social_implicit import SocialImplicit

    if args.distribution_samples is not None and not args.distribution_metrics:
        raise UsageError(
            "--distribution-samples needs --distribution-metrics (it sets K for AMD/AMV/KDE-NLL)"
        )
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


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `trajectory evaluate` and `trajectory fetch-data` to the `meanwise` command."""
    from meanwise.trajectory.data import SPLITS

    trajectory = subparsers.add_parser(
        "trajectory",
        help="trajectory prediction: evaluate Social-Implicit weights, fetch ETH/UCY data",
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
    evaluate.add_argument("--samples", type=positive_int, default=20, help="K for best-of-K")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument(
        "--json", type=output_file, default=None, metavar="OUT", help="write the result here"
    )
    evaluate.add_argument(
        "--distribution-metrics", action="store_true", help="also AMD, AMV and KDE-NLL"
    )
    evaluate.add_argument(
        "--distribution-samples",
        type=positive_int,
        default=None,
        metavar="K",
        help="samples for the distribution metrics (default: --samples; the paper uses 1000)",
    )
    evaluate.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        help="torch threads (default 1; 0 keeps torch's)",
    )
    evaluate.set_defaults(handler=_run_evaluate)
    fetch = commands.add_parser(
        "fetch-data",
        help="download the ETH/UCY split files (and released weights), SHA-256 checked",
        description=_FETCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument(
        "--dest",
        type=output_dir,
        default=None,
        metavar="DIR",
        help="where to write (default: $MEANWISE_DATA_DIR, else ~/.cache/meanwise/data)",
    )
    fetch.add_argument(
        "--mirror",
        type=_mirror_url,
        default=None,
        metavar="URL",
        help="base URL serving the data folder's layout, instead of the upstream GitHub URLs",
    )
    fetch.add_argument(
        "--checkpoints",
        action="store_true",
        help="also the released Social-Implicit weights (social_implicit_checkpoints/)",
    )
    fetch.add_argument(
        "--timeout",
        type=positive_seconds,
        default=60.0,
        metavar="S",
        help="seconds per connection (default 60)",
    )
    fetch.add_argument("--verbose", action="store_true", help="one line per downloaded file")
    fetch.set_defaults(handler=_run_fetch)
