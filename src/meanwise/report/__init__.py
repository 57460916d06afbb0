"""The report: run experiments into `OUT/` and write `results.json`, `index.html`, figures.

`reproduce(...)` is what `meanwise reproduce` does; `rebuild(out_dir)` regenerates the page
from an existing results.json without running anything.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meanwise.experiments import registry
from meanwise.experiments.runner import run_experiment
from meanwise.report.figures import render_figures
from meanwise.report.html import INDEX_FILE, render_html, write_html
from meanwise.report.results import (
    RESULTS_FILE,
    build_entry,
    load_results,
    merge_results,
    write_results,
)

__all__ = [
    "CACHE_DIR",
    "INDEX_FILE",
    "RESULTS_FILE",
    "rebuild",
    "render_html",
    "reproduce",
]

CACHE_DIR = ".cache"


def reproduce(
    names: Sequence[str],
    out_dir: Path | str,
    *,
    quick: bool = False,
    n_seeds: int | None = None,
    fresh: bool = False,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run each named experiment over seeds 0..n-1 and merge it into the report in `out_dir`.

    The report is rewritten after each experiment, so a failure in a later one keeps the
    earlier ones. Returns the merged results document.
    """
    experiments = [registry.get(name) for name in names]  # unknown names fail before any work
    if n_seeds is not None and n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1; got {n_seeds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = load_results(out)
    for experiment in experiments:
        config = experiment.config(quick)
        seeds = list(range(n_seeds if n_seeds is not None else config.seeds))
        run = run_experiment(
            experiment,
            config,
            seeds,
            cache_dir=out / CACHE_DIR,
            fresh=fresh,
            show_progress=show_progress,
        )
        figures = render_figures(experiment, run.config, run.results, out)
        entry = build_entry(run, "quick" if quick else "full", figures)
        document = merge_results(document, {experiment.name: entry})
        write_results(out, document)
        write_html(out, document)
        if show_progress:
            cached = sum(s.cached for s in run.seeds)
            print(
                f"meanwise: {experiment.name}: {len(seeds)} seed(s), {cached} from cache, "
                f"{entry['runtime_s']:.1f} s of compute",
                file=sys.stderr,
            )
    return document


def rebuild(out_dir: Path | str) -> Path:
    """Regenerate `out_dir/index.html` from `out_dir/results.json`."""
    out = Path(out_dir)
    if not (out / RESULTS_FILE).exists():
        raise ValueError(f"no {RESULTS_FILE} in {out}; run `meanwise reproduce` first")
    return write_html(out, load_results(out))
