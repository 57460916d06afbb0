"""Run an experiment over seeds, with a per-seed cache that makes long runs resumable.

Cache layout under `cache_dir` (the CLI uses `OUT/.cache`):

    <name>/<config-hash>-seed<k>.json          a finished seed: config, runtime and result
    <name>/<config-hash>-seed<k>.stages/*.json finished stages of an unfinished seed

The hash covers the experiment name, the config (except `seeds`, which only says how many seeds
to run) and the meanwise version, so a changed config or release never reuses old numbers. An
interrupted run resumes at the first unfinished stage of the first unfinished seed; the stages
are written atomically, so a kill at any moment leaves a valid cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meanwise import __version__
from meanwise.experiments.base import (
    Experiment,
    JSONRecord,
    atomic_write_text,
    current_show_progress,
    progress,
    runner_context,
    set_aside,
)

__all__ = ["SeedRun", "ExperimentRun", "config_to_dict", "config_hash", "run_experiment"]


@dataclass
class SeedRun:
    """One seed's JSON-form result, how long it took, and whether it came from the cache."""

    seed: int
    result: dict[str, Any]
    runtime_s: float
    cached: bool


@dataclass
class ExperimentRun:
    experiment: Experiment
    config: dict[str, Any]
    config_hash: str
    seeds: list[SeedRun]

    @property
    def results(self) -> list[dict[str, Any]]:
        return [s.result for s in self.seeds]


def _to_json(value: Any, what: str) -> Any:
    """`value` (a typed result, a dataclass or plain data) as parsed JSON, so cached and fresh
    data match."""
    if isinstance(value, JSONRecord):
        value = value.to_json()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} is not JSON-serialisable: {error}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        raise TypeError(f"config must be a dataclass instance; got {type(config).__name__}")
    return _to_json(config, "config")


def config_hash(name: str, config: Any) -> str:
    """12 hex digits identifying (experiment, config without `seeds`, meanwise version)."""
    fields = {k: v for k, v in config_to_dict(config).items() if k != "seeds"}
    payload = json.dumps(
        {"experiment": name, "config": fields, "version": __version__}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _load_cached(path: Path, config: dict[str, Any], seed: int) -> SeedRun | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"a {type(record).__name__}, not an object")
        if record.get("config") != config or record.get("seed") != seed:
            return None  # a hash collision or a hand-edited file: recompute and overwrite
        return SeedRun(seed, record["result"], float(record["runtime_s"]), cached=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        set_aside(path, error)
        return None


def run_experiment(
    experiment: Experiment,
    config: Any,
    seeds: list[int],
    *,
    cache_dir: Path | None = None,
    fresh: bool = False,
    show_progress: bool = False,
) -> ExperimentRun:
    """`experiment.run(config, seed)` for each seed, reusing cached seeds unless `fresh`."""
    config_dict = config_to_dict(config)
    digest = config_hash(experiment.name, config)
    folder = None if cache_dir is None else Path(cache_dir) / experiment.name
    done: list[SeedRun] = []
    with runner_context(show_progress=show_progress, stage_dir=None):
        for seed in progress(seeds, desc=f"{experiment.name} seeds", total=len(seeds)):
            path = None if folder is None else folder / f"{digest}-seed{seed}.json"
            done.append(_run_seed(experiment, config, config_dict, digest, seed, path, fresh))
    return ExperimentRun(experiment, config_dict, digest, done)


def _run_seed(
    experiment: Experiment,
    config: Any,
    config_dict: dict[str, Any],
    digest: str,
    seed: int,
    path: Path | None,
    fresh: bool,
) -> SeedRun:
    stages = None if path is None else path.with_suffix(".stages")
    if fresh and stages is not None and stages.exists():
        shutil.rmtree(stages)
    cached = None if path is None or fresh else _load_cached(path, config_dict, seed)
    if cached is not None:
        return cached
    show = current_show_progress()
    start = time.perf_counter()
    with runner_context(show_progress=show, stage_dir=stages):
        result = _to_json(experiment.run(config, seed), f"{experiment.name} result")
    runtime = time.perf_counter() - start
    if path is not None:
        record = {
            "experiment": experiment.name,
            "config": config_dict,
            "config_hash": digest,
            "seed": seed,
            "runtime_s": runtime,
            "meanwise_version": __version__,
            "result": result,
        }
        atomic_write_text(path, json.dumps(record))
        if stages is not None and stages.exists():
            shutil.rmtree(stages)  # the seed's record supersedes its stages
    return SeedRun(seed, result, runtime, cached=False)
