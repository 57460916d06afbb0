"""Reproductions of the papers' headline comparisons: one module per experiment, a registry.

Use `get(name)` / `names()`; an experiment is `run(config, seed)` plus what the report needs
(see `Experiment`). Each built-in reproduction is three modules: `<name>` (config and run),
`<name>_results` (its result dataclasses, `JSONRecord`s: the typed form of what results.json
holds) and `<name>_report` (claims, protocol, tables, figures). The runner in
`meanwise.experiments.runner` adds seeds, caching and resume.
"""

from meanwise.experiments.base import Experiment, FigureSpec, JSONRecord, Table
from meanwise.experiments.registry import experiments, get, names, register

__all__ = [
    "Experiment",
    "FigureSpec",
    "JSONRecord",
    "Table",
    "experiments",
    "get",
    "names",
    "register",
]
