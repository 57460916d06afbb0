"""The results document, `OUT/results.json`: build an experiment's entry, merge, write.

Shape::

    {"experiments": {name: {"title", "paper", "claim", "published", "preset", "config",
                            "config_hash", "seeds", "results", "summary": {"tables",
                            "metrics"}, "claims": [{"claim", "status", "effect", "ci95",
                            "paper_effect", "n_seeds", "test", "detail"}, ...],
                            "protocol": {table}, "verdict", "figures", "runtime_s", ...}},

"claims" follows the contract of `meanwise.experiments.claims` (validated here, before
anything is written); "verdict" is plain text generated from the claims' statuses.
     "meanwise_version": "...", "created": "<ISO time of this write>"}

Every entry carries everything the HTML page shows, so the page is a function of this file
alone: running one experiment later merges its entry into the existing file (the others are
kept as they were) and the page is regenerated from the merged document.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meanwise import __version__
from meanwise.atomic_io import atomic_write_text
from meanwise.experiments import registry
from meanwise.experiments.claims import Claim, validate_claim, verdict_text
from meanwise.experiments.runner import ExperimentRun

__all__ = ["RESULTS_FILE", "build_entry", "load_results", "merge_results", "write_results"]

RESULTS_FILE = "results.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def build_entry(run: ExperimentRun, preset: str, figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The results.json entry of one experiment run (summary and verdict computed here)."""
    experiment = run.experiment
    results = run.results
    claims = [_claim_json(c, experiment.name) for c in experiment.claims(results)]
    protocol = experiment.protocol(run.config)
    return {
        "title": experiment.title,
        "paper": experiment.paper,
        "claim": experiment.claim,
        "published": [dataclasses.asdict(t) for t in experiment.published],
        "preset": preset,
        "config": run.config,
        "config_hash": run.config_hash,
        "seeds": [s.seed for s in run.seeds],
        "results": results,
        "summary": {
            "tables": [dataclasses.asdict(t) for t in experiment.summarize(results)],
            "metrics": experiment.metrics(results),
        },
        "claims": claims,
        "protocol": None if protocol is None else dataclasses.asdict(protocol),
        "verdict": verdict_text(claims),
        "figures": figures,
        "runtime_s": sum(s.runtime_s for s in run.seeds),
        "runtime_per_seed_s": [s.runtime_s for s in run.seeds],
        "cached_seeds": [s.seed for s in run.seeds if s.cached],
        "finished": _now(),
        "meanwise_version": __version__,
    }


def _claim_json(claim: Any, experiment: str) -> dict[str, Any]:
    record = claim.to_json() if isinstance(claim, Claim) else dict(claim)
    try:
        validate_claim(record)
    except ValueError as error:
        raise ValueError(f"experiment {experiment!r}: {error}") from None
    return record


def load_results(out_dir: Path) -> dict[str, Any]:
    """The existing document in `out_dir`, or an empty one; a damaged file is an error.

    Refusing to overwrite a file we cannot read keeps other experiments' results from being
    silently dropped.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return {"experiments": {}}
    try:
        document = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); move it away to start a new report"
        ) from None
    if not isinstance(document, dict) or not isinstance(document.get("experiments"), dict):
        raise ValueError(f"{path} has no 'experiments' object; move it away to start anew")
    for name, entry in document["experiments"].items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"{path}: experiments[{name!r}] is a {type(entry).__name__}, expected an "
                "object; move the file away to start anew"
            )
        for claim in entry.get("claims", []) or []:
            try:
                validate_claim(claim)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}: experiments[{name!r}]: {error}") from None
    return document


def merge_results(document: dict[str, Any], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`document` with `entries` replacing same-named experiments; registry order first."""
    merged = dict(document.get("experiments", {}))
    merged.update(entries)
    order = [n for n in registry.names() if n in merged] + [
        n for n in merged if n not in registry.names()
    ]
    return {
        "experiments": {name: merged[name] for name in order},
        "meanwise_version": __version__,
        "created": _now(),
    }


def write_results(out_dir: Path, document: dict[str, Any]) -> Path:
    """Write `out_dir/results.json` atomically."""
    path = Path(out_dir) / RESULTS_FILE
    atomic_write_text(path, json.dumps(document))
    return path
