"""Merges of state dicts in memory, and the search for merge coefficients.

`merge_states` runs any registered method (`meanwise.merging.methods`) over state dicts by
wrapping them as `InMemoryCheckpoint`s and consuming `meanwise.merging.pipeline.iter_merged`,
the same path the streaming checkpoint merge takes, so a checkpoint merged tensor by tensor is
bit-identical to the same merge done here. `fisher_merge` and `average_merge` are that for the
two methods of Matena & Raffel (2022):

    θ*_j = Σ_i λ_i F̃_ij θ_ij / Σ_i λ_i F̃_ij,   F̃_i = floor(F_i)   (F ≡ 1: plain averaging)

with the Fisher options given as one `MergeOptions`. The inputs are never modified (the rules
copy what they accumulate into).

Heads that differ between models (another number of classes) are not merged: name them in
``keep_target`` and the target's tensors are kept, the shared body is merged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from meanwise.merging.checkpoints import InMemoryCheckpoint
from meanwise.merging.methods import FisherWeighted, MergeMethod, PlainAverage
from meanwise.merging.options import MergeOptions
from meanwise.merging.pipeline import iter_merged

__all__ = [
    "MergeOptions",
    "merge_states",
    "fisher_merge",
    "average_merge",
    "CoefficientSearch",
    "search_coefficients",
    "candidate_coefficients",
]


def _in_memory(states: object, role: str) -> list[InMemoryCheckpoint]:
    if isinstance(states, Mapping) or not isinstance(states, Sequence) or not states:
        raise TypeError(f"{role} must be a non-empty sequence of state dicts")
    for i, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise TypeError(f"{role}[{i}] is {type(state).__name__}, not a state dict")
    return [InMemoryCheckpoint(state, f"{role}[{i}]") for i, state in enumerate(states)]


def merge_states(
    states: Sequence[Mapping[str, Tensor]],
    method: MergeMethod,
    fishers: Sequence[Mapping[str, Tensor]] | None = None,
    coefficients: Sequence[float] | Tensor | None = None,
    *,
    keep_target: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Merge state dicts with `method` (states[0] is the target); the merged state dict in the
    target's key order and dtypes. See `iter_merged` for the arguments."""
    models = _in_memory(states, "states")
    opened = None
    if fishers is not None:
        if isinstance(fishers, Mapping) or not isinstance(fishers, Sequence):
            raise TypeError("fishers must be a sequence of dicts, one per state")
        if len(fishers) != len(states):
            raise ValueError(f"fishers has {len(fishers)} dicts but states has {len(states)}")
        opened = _in_memory(fishers, "fishers")
    return dict(iter_merged(models, opened, method, coefficients, keep_target))


def _legacy_options(options: MergeOptions | None, preset: str | None, **flat) -> MergeOptions:
    """`options`, or the deprecated flat keywords / `preset` made into one (None: unset)."""
    given = {k: v for k, v in flat.items() if v is not None}
    if not given and preset is None:
        return MergeOptions() if options is None else options
    if options is not None:
        raise TypeError(
            f"pass the Fisher options either as options= or as {sorted(given) or ['preset']}, "
            "not both"
        )
    replacement = (
        f"options=MergeOptions.from_preset({preset!r}, ...)"
        if preset
        else "options=MergeOptions(...)"
    )
    spelled = ", ".join(f"{name}=..." for name in [*sorted(given), *(["preset"] if preset else [])])
    warnings.warn(
        f"fisher_merge({spelled}) is deprecated; pass {replacement}",
        DeprecationWarning,
        stacklevel=3,
    )
    return MergeOptions.from_preset(preset, **given)


def fisher_merge(
    states: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    coefficients: Sequence[float] | Tensor | None = None,
    *,
    options: MergeOptions | None = None,
    keep_target: Sequence[str] = (),
    floor: float | None = None,
    floor_mode: str | None = None,
    favor_target: bool | None = None,
    normalize: bool | None = None,
    missing: str | None = None,
    preset: str | None = None,
) -> dict[str, Tensor]:
    """Merge ``states`` with elementwise weights λ_i · floor(F_i) (see the module docstring).

    Args:
        states: n state dicts; states[0] is the target (its head and integer buffers are kept).
        fishers: n dicts of diagonal Fishers (from `diagonal_fisher`), covering the same keys.
        coefficients: λ, n non-negative numbers with a positive sum (default 1/n each).
        options: the floor, normalization and missing-Fisher handling (`MergeOptions`; the
            authors' choice is ``MergeOptions.from_preset("authors")``).
        keep_target: keys, or prefixes such as ``"classifier"``, copied from the target unmerged:
            task-specific heads, which may differ in shape or be absent in other models.
        floor, floor_mode, favor_target, normalize, missing, preset: deprecated spellings of
            `options` (a DeprecationWarning); an option given explicitly overrides the preset's.

    Returns:
        The merged state dict, in the target's key order and dtypes.
    """
    options = _legacy_options(
        options, preset, floor=floor, floor_mode=floor_mode, favor_target=favor_target,
        normalize=normalize, missing=missing,
    )  # fmt: skip
    return merge_states(
        states, FisherWeighted(options), fishers, coefficients, keep_target=keep_target
    )


def average_merge(
    states: Sequence[Mapping[str, Tensor]],
    coefficients: Sequence[float] | Tensor | None = None,
    *,
    keep_target: Sequence[str] = (),
) -> dict[str, Tensor]:
    """The λ-weighted plain average (Fisher ≡ 1), with the same head handling as fisher_merge."""
    return merge_states(states, PlainAverage(), None, coefficients, keep_target=keep_target)


# --- coefficient search ------------------------------------------------------------------


@dataclass(frozen=True)
class CoefficientSearch:
    """Every candidate λ with its score; `best` is the highest-scoring one (first on ties)."""

    candidates: list[list[float]]
    scores: list[float]

    @property
    def best_index(self) -> int:
        return max(range(len(self.scores)), key=lambda i: self.scores[i])

    @property
    def best(self) -> list[float]:
        return self.candidates[self.best_index]

    @property
    def best_score(self) -> float:
        return self.scores[self.best_index]


def candidate_coefficients(
    num_models: int,
    grid_points: int = 51,
    num_samples: int = 50,
    generator: torch.Generator | None = None,
) -> list[list[float]]:
    """The paper's candidates: (t, 1 − t) on a `grid_points` grid for two models, otherwise
    `num_samples` draws from a flat Dirichlet (uniform on the simplex)."""
    if num_models < 1:
        raise ValueError(f"num_models must be >= 1; got {num_models}")
    if num_models == 1:
        return [[1.0]]
    if num_models == 2:
        if grid_points < 2:
            raise ValueError(f"grid_points must be >= 2; got {grid_points}")
        return [[i / (grid_points - 1), 1 - i / (grid_points - 1)] for i in range(grid_points)]
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    # Dirichlet(1, ..., 1) = normalized standard exponentials; drawn from `generator` so that
    # the candidates are reproducible without touching the global random state
    draws = -torch.rand(num_samples, num_models, generator=generator, dtype=torch.float64)
    draws = -torch.log1p(draws)
    return (draws / draws.sum(1, keepdim=True)).tolist()


def search_coefficients(
    merge: Callable[[list[float]], Mapping[str, Tensor]],
    score: Callable[[Mapping[str, Tensor]], float],
    num_models: int,
    grid_points: int = 51,
    num_samples: int = 50,
    generator: torch.Generator | None = None,
) -> CoefficientSearch:
    """Score ``merge(λ)`` for every candidate λ with a user-supplied metric (higher is better),
    on held-out data, as the paper chooses its merge coefficients.

    ``merge`` is typically ``lambda lam: fisher_merge(states, fishers, lam)``; ``score`` loads
    the merged state into a model and returns e.g. validation accuracy.
    """
    candidates = candidate_coefficients(num_models, grid_points, num_samples, generator)
    scores = []
    for lam in candidates:
        value = float(score(merge(lam)))
        if math.isnan(value):
            raise ValueError(f"score returned NaN for coefficients {lam}")
        scores.append(value)
    return CoefficientSearch(candidates, scores)
