"""What every reproduction provides, so one runner and one report serve all of them.

An experiment is a function of a config dataclass and a seed that returns a result dataclass.
Everything the report needs beyond the raw results is part of the `Experiment` record: the
paper's claim and published numbers, and functions that turn our results into tables, figures
and a plain-language verdict. Those functions take the results in their JSON form (the output of
`dataclasses.asdict`, lists of dicts), because the runner caches results as JSON and must be able
to rebuild a report from the cache without rerunning anything.

Long experiments report progress and checkpoint finer than per seed through two context-scoped
helpers, `progress` and `cached_stage`; the runner switches them on, and without a runner they
are a plain loop and a plain call, so `run(config, seed)` stays a pure function of its inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from meanwise.atomic_io import atomic_write_bytes, atomic_write_text  # re-exported

__all__ = [
    "Experiment",
    "ExperimentConfig",
    "Table",
    "FigureSpec",
    "progress",
    "current_show_progress",
    "cached_stage",
    "runner_context",
    "atomic_write_text",
    "atomic_write_bytes",
    "seeded",
    "mean_std",
    "format_mean_std",
    "torch_threads",
]

T = TypeVar("T")
JSONResult = dict[str, Any]


class ExperimentConfig(Protocol):
    """A config dataclass: `quick()`/`full()` presets and a default number of seeds."""

    seeds: int

    @classmethod
    def quick(cls) -> ExperimentConfig: ...

    @classmethod
    def full(cls) -> ExperimentConfig: ...


@dataclass(frozen=True)
class Table:
    """A small table for the report: column headers and rows of already formatted cells."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"Table row {i} has {len(row)} cells; expected {len(self.columns)} "
                    f"(columns {self.columns})"
                )


@dataclass(frozen=True)
class FigureSpec:
    """One figure: a file stem (unique within the experiment), a caption and a draw function.

    `draw(figure)` receives an empty `matplotlib.figure.Figure` and fills it; the report saves
    it as PNG. Drawing into a figure given by the caller keeps experiments free of pyplot's
    global state and of backend choice.
    """

    stem: str
    caption: str
    draw: Callable[[Any], None]
    size: tuple[float, float] = (9.0, 3.2)


@dataclass(frozen=True)
class Experiment:
    """A registered reproduction and everything the report says about it.

    - `run(config, seed)` returns a dataclass (or dict) of JSON-friendly values;
    - `claim` is the paper's claim in words, `published` its numbers as tables;
    - `summarize(results)` turns our per-seed results into tables (mean +- std over seeds);
    - `metrics(results)` gives the headline numbers as a flat dict, for machines;
    - `figures(config, results)` lists figures to draw;
    - `claims(results)` states each of the paper's claims as a `claims.Claim` (status from a
      95 % interval over seeds); the report's verdict words are generated from these;
    - `protocol(config)` is the "paper protocol vs ours" table for the config that ran.
    All functions after `run` take JSON-form results (see the module docstring).
    """

    name: str
    title: str
    config_cls: type
    run: Callable[[Any, int], Any]
    claim: str
    published: Sequence[Table]
    summarize: Callable[[list[JSONResult]], list[Table]]
    claims: Callable[[list[JSONResult]], list[Any]] = field(default=lambda results: [])
    protocol: Callable[[JSONResult], Table | None] = field(default=lambda config: None)
    figures: Callable[[JSONResult, list[JSONResult]], list[FigureSpec]] = field(
        default=lambda config, results: []
    )
    metrics: Callable[[list[JSONResult]], dict[str, float]] = field(default=lambda results: {})
    paper: str = ""

    def config(self, quick: bool) -> Any:
        """The quick or full preset of this experiment's config."""
        return self.config_cls.quick() if quick else self.config_cls.full()


# --- context-scoped helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class _RunnerContext:
    show_progress: bool
    stage_dir: Path | None


_CONTEXT: contextvars.ContextVar[_RunnerContext | None] = contextvars.ContextVar(
    "meanwise_runner_context", default=None
)
_NO_RUNNER = _RunnerContext(show_progress=False, stage_dir=None)


def _current() -> _RunnerContext:
    return _CONTEXT.get() or _NO_RUNNER


@contextlib.contextmanager
def runner_context(show_progress: bool, stage_dir: Path | None) -> Iterator[None]:
    """Within this block, `progress` draws bars and `cached_stage` reads/writes `stage_dir`."""
    token = _CONTEXT.set(_RunnerContext(show_progress, stage_dir))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_show_progress() -> bool:
    """Whether the enclosing runner asked for progress bars."""
    return _current().show_progress


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """`iterable`, with a tqdm bar on stderr when a runner asked for progress."""
    if not _current().show_progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def cached_stage(key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`compute()`, or its JSON result cached by an earlier, interrupted run of the same seed.

    A stage must depend only on the config, the seed and `key` (not on other stages' random
    state), so skipping finished stages on resume gives exactly the uninterrupted result. JSON
    round-trips Python floats exactly, so cached and fresh numbers are identical.
    """
    stage_dir = _current().stage_dir
    if stage_dir is None:
        return compute()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    path = stage_dir / f"{safe}.json"
    if path.exists():
        try:
            value = json.loads(path.read_text())
            if not isinstance(value, dict) or not value:
                raise ValueError("not a non-empty object")
            return value
        except (OSError, ValueError) as error:
            set_aside(path, error)
    value = compute()
    atomic_write_text(path, json.dumps(value))
    return value


def set_aside(path: Path, error: BaseException) -> None:
    """Move a damaged cache file to ``<name>.corrupt`` (kept for inspection) and say so; the
    caller recomputes what it held."""
    target = path.with_name(path.name + ".corrupt")
    try:
        path.replace(target)
    except OSError:
        return
    print(
        f"meanwise: cache file {path} is damaged ({str(error).splitlines()[0][:120]}); moved "
        f"to {target.name} and recomputing",
        file=sys.stderr,
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's global generator for a block and restore it afterwards.

    Module initialisation draws from the global generator; forking it keeps a run reproducible
    without leaking the seed into the caller's random state. Yields a private generator with
    the same seed for everything that accepts one (data order, Hutchinson probes).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


# --- small numeric and I/O helpers -------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, var**0.5


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± std' with `digits` decimals (std omitted for a single seed)."""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run a block with `num_threads` intra-op threads (0: leave torch's choice), then restore.

    Small conv nets on CPU are dominated by per-op overhead; the thread count is part of the
    config because it can change float reduction order, hence the last bits of the results.
    """
    previous = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
