"""What every reproduction provides, so one runner and one report serve all of them.

An experiment is a function of a config dataclass and a seed that returns a result dataclass.
Everything the report needs beyond the raw results is part of the `Experiment` record: the
paper's claim and published numbers, and functions that turn our results into tables, figures
and a plain-language verdict. Those functions take the results in their JSON form (lists of
dicts), because the runner caches results as JSON and must be able to rebuild a report from the
cache without rerunning anything; they read them through typed records: each experiment's
result dataclasses are `JSONRecord`s (in `<experiment>_results.py`), whose `from_json` rebuilds
the nested dataclasses and refuses unknown or missing keys, and whose `to_json` is exactly the
JSON the runner caches (so results.json is the same with or without the typed form).

Long experiments report progress and checkpoint finer than per seed through two context-scoped
helpers, `progress` and `cached_stage`; the runner switches them on, and without a runner they
are a plain loop and a plain call, so `run(config, seed)` stays a pure function of its inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import torch

from meanwise.atomic_io import atomic_write_bytes, atomic_write_text  # re-exported

__all__ = [
    "Experiment",
    "ExperimentConfig",
    "JSONRecord",
    "from_json",
    "to_json",
    "Table",
    "FigureSpec",
    "progress",
    "current_show_progress",
    "current_stage_dir",
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


# --- typed results: the contract between an experiment and its report ---------------------------


def to_json(value: Any) -> Any:
    """`value` (a dataclass, or lists / tuples / dicts of them) as plain JSON data: dataclasses
    become dicts and tuples lists, so the result equals what `json.loads` gives back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    """Rebuild dataclass `cls` from its JSON form, nested dataclasses included.

    The field types say what to build (`list[Run]`, `dict[str, Run]`, `tuple[int, int]`,
    `Run | None`); other values are taken as they are, so `to_json(from_json(cls, data))`
    equals `data`. An unknown key, a missing field without default or a non-object where a
    dataclass is expected is a ValueError naming the path to it (`where`)."""
    return _build(cls, data, where or cls.__name__)


def _build(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}; got {value!r:.60}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} for {tp.__name__}")
        missing = [
            name
            for name, f in fields.items()
            if name not in value
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} for {tp.__name__}")
        return tp(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        kinds = [a for a in args if a is not type(None)]
        return _build(kinds[0], value, where) if len(kinds) == 1 else value
    if origin is list and args and isinstance(value, list):
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and args and isinstance(value, list):
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            raise ValueError(f"{where}: expected {len(kinds)} items; got {len(value)}")
        return tuple(
            _build(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(kinds, value, strict=True))
        )
    if origin is dict and args and isinstance(value, dict):
        return {k: _build(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    return value


class JSONRecord:
    """Mixin for an experiment's result dataclasses: `Result.from_json(data)` is what the
    report reads (attributes, checked keys) and `to_json()` the form the runner caches and
    results.json holds (`from_json` then `to_json` gives the same JSON back)."""

    @classmethod
    def from_json(cls, data: Any) -> Self:
        return from_json(cls, data)

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


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


def current_stage_dir() -> Path | None:
    """The enclosing runner's folder for this seed's stage files (None without a runner).

    Long stages keep their own checkpoints (torch files) beside the stage JSONs, so an
    interrupted seed resumes inside a stage too; the runner removes the folder once the seed
    is done."""
    return _current().stage_dir


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
