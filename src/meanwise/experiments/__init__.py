"""Reproductions of the papers' headline comparisons: one module per experiment, a registry.

Use `get(name)` / `names()`; an experiment is `run(config, seed)` plus what the report needs
(see `Experiment`). The runner in `meanwise.experiments.runner` adds seeds, caching and resume.
"""

from meanwise.experiments.base import Experiment, FigureSpec, Table
from meanwise.experiments.registry import experiments, get, names, register

__all__ = ["Experiment", "FigureSpec", "Table", "experiments", "get", "names", "register"]
