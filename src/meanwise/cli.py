"""The `meanwise` command: list the reproductions, run them, rebuild the report."""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

from meanwise import __version__
from meanwise.cli_args import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    UsageError,
    output_dir,
    positive_int,
)

__all__ = ["main", "build_parser"]

# Method areas add their own commands (e.g. `meanwise merge`): each module listed here has
# `add_commands(subparsers)`, which adds parsers that set a `handler(args) -> int` default.
_COMMAND_MODULES: tuple[str, ...] = (
    "meanwise.merging.cli",
    "meanwise.trajectory.cli",
    "meanwise.gossip.cli",
)

_REPRODUCE_HELP = """\
Runs the named experiments (or all of them) over seeds 0..N-1 and writes into DIR:
  results.json   every experiment's config, per-seed results, summary and verdict
  index.html     the report (open it in a browser), figures/ its PNG figures

Existing results are merged: running one experiment keeps the other experiments' entries in
results.json and regenerates index.html from the merged file.

Resume: every finished seed is cached in DIR/.cache/<name>/<config-hash>-seed<k>.json, and
long seeds also cache their finished stages (e.g. one optimizer's training run) next to it.
Rerunning the same command with the same config reuses them, so an interrupted run continues
where it stopped and a finished one only rebuilds the report. The hash covers the config
(not the number of seeds) and the meanwise version; --fresh ignores and overwrites the cache.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so the docs and tests can inspect it)."""
    parser = OneLineParser(
        prog="meanwise",
        description="Reproduce the headline comparisons of nine averaging methods and write "
        "an HTML report.",
    )
    parser.add_argument("--version", action="version", version=f"meanwise {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the experiments (name and title)")

    reproduce = commands.add_parser(
        "reproduce",
        help="run experiments and write DIR/results.json and DIR/index.html",
        description=_REPRODUCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reproduce.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    reproduce.add_argument(
        "--quick", action="store_true", help="the quick preset (minutes) instead of the full one"
    )
    reproduce.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        metavar="N",
        help="run seeds 0..N-1 (default: the experiment's own number, 3 for optimizers)",
    )
    reproduce.add_argument(
        "--out",
        type=output_dir,
        default="reports",
        metavar="DIR",
        help="output folder (default: reports)",
    )
    reproduce.add_argument("--fresh", action="store_true", help="ignore and overwrite the cache")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")

    report = commands.add_parser(
        "report", help="rebuild DIR/index.html from DIR/results.json without running anything"
    )
    report.add_argument("--out", default="reports", metavar="DIR", help="the report folder")
    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_commands(commands)
    return parser


def _list() -> int:
    from meanwise.experiments import registry

    experiments = registry.experiments()
    width = max((len(e.name) for e in experiments), default=0)
    for experiment in experiments:
        print(f"{experiment.name:<{width}}  {experiment.title}")
    return EXIT_OK


def _reproduce(args: argparse.Namespace) -> int:
    from meanwise.experiments import registry

    known = registry.names()
    names = known if "all" in args.names else list(dict.fromkeys(args.names))
    unknown = [n for n in names if n not in known]
    if unknown:
        print(
            f"meanwise: unknown experiment(s) {', '.join(unknown)}; "
            f"known experiments: {', '.join(known)} (or 'all')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from meanwise.report import INDEX_FILE, reproduce

    reproduce(
        names,
        args.out,
        quick=args.quick,
        n_seeds=args.seeds,
        fresh=args.fresh,
        show_progress=not args.no_progress,
    )
    out = Path(args.out)
    print(f"meanwise: wrote {out / 'results.json'} and {out / INDEX_FILE}", file=sys.stderr)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from meanwise.report import rebuild

    path = rebuild(args.out)
    print(f"meanwise: wrote {path}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `meanwise` command; returns the exit status.

    0: done; 1: the work failed; 2: a usage error (a bad argument, found while parsing or
    raised as `UsageError`); 130: interrupted. Every error is one line on stderr that names
    what was wrong; ``--debug`` shows the traceback instead.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "report":
            return _report(args)
        return args.handler(args)
    except KeyboardInterrupt:
        resumable = args.command == "reproduce"
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"meanwise: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        print(f"meanwise: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED


def _one_line(error: BaseException) -> str:
    """What the user needs of an exception, on one line (never torch's advice to unpickle)."""
    if isinstance(error, pickle.UnpicklingError):
        return (
            "a checkpoint is not a weights-only file (it holds pickled Python objects, which "
            "meanwise never executes); re-save it as safetensors or a plain state dict"
        )
    if isinstance(error, OSError) and error.filename is not None:
        what = error.strerror or type(error).__name__
        return f"{error.filename}: {what}"
    if isinstance(error, ValueError | TypeError | TimeoutError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error} (rerun with --debug for the traceback)"
    return " ".join(text.split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
