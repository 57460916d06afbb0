"""The registry of reproductions: `register`, `get(name)`, `names()`.

Built-in experiments live in the modules listed in `_BUILTIN_MODULES` and register themselves on
import. They are imported lazily, on the first lookup, so that importing the registry is cheap
and one experiment with a missing optional dependency cannot break the others' import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from meanwise.experiments.base import Experiment

__all__ = ["register", "register_reproduction", "get", "names", "experiments"]

_BUILTIN_MODULES: tuple[str, ...] = (
    "meanwise.experiments.optimizers",
    "meanwise.experiments.fisher_merging",
    "meanwise.experiments.frame_averaging",
    "meanwise.experiments.fedau",
    "meanwise.experiments.afa",
    "meanwise.experiments.social_implicit",
    "meanwise.experiments.gossip",
)

_REGISTRY: dict[str, Experiment] = {}
_builtins_loaded = False


def register(experiment: Experiment, *, replace: bool = False) -> Experiment:
    """Add `experiment` under its name; a second, different one with that name is an error."""
    if not isinstance(experiment, Experiment):
        raise TypeError(f"register expects an Experiment; got {type(experiment).__name__}")
    existing = _REGISTRY.get(experiment.name)
    if existing is not None and existing is not experiment and not replace:
        raise ValueError(
            f"an experiment named {experiment.name!r} is already registered; "
            "pass replace=True to override it"
        )
    _REGISTRY[experiment.name] = experiment
    return experiment


def register_reproduction(
    name: str, title: str, config_cls: type, run: Callable, report: ModuleType
) -> Experiment:
    """Register an experiment whose report side is a module with the standard names:
    ``PAPER``, ``CLAIM``, ``PUBLISHED``, ``summarize``, ``metrics``, ``figures``, ``claims``,
    ``protocol``."""
    for needed in ("claims", "protocol"):
        if not callable(getattr(report, needed, None)):
            raise TypeError(
                f"report module {report.__name__} has no function {needed!r} (the claims "
                "contract: see meanwise.experiments.claims)"
            )
    return register(
        Experiment(
            name=name,
            title=title,
            paper=report.PAPER,
            config_cls=config_cls,
            run=run,
            claim=report.CLAIM,
            published=report.PUBLISHED,
            summarize=report.summarize,
            metrics=report.metrics,
            figures=report.figures,
            claims=report.claims,
            protocol=report.protocol,
        )
    )


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    # A builtin imported directly (`import meanwise.experiments.fedau`) registers before the
    # others; reorder so the report's order is `_BUILTIN_MODULES`, whatever was imported first.
    rank = {module: i for i, module in enumerate(_BUILTIN_MODULES)}
    ordered = sorted(
        _REGISTRY.values(), key=lambda e: rank.get(getattr(e.run, "__module__", ""), len(rank))
    )
    _REGISTRY.clear()
    _REGISTRY.update((e.name, e) for e in ordered)


def names() -> list[str]:
    """Registered experiment names: the builtins in `_BUILTIN_MODULES` order, then the others
    in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def experiments() -> list[Experiment]:
    """Registered experiments, in the order of `names()`."""
    _load_builtins()
    return list(_REGISTRY.values())


def get(name: str) -> Experiment:
    """The experiment called `name`; a ValueError lists the known names otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY) or "(none)"
        raise ValueError(f"unknown experiment {name!r}; known experiments: {known}") from None
