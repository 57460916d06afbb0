"""Fisher-weighted merging of state dicts, and the search for merge coefficients.

The rule, per parameter element j (Matena & Raffel, 2022):

    θ*_j = Σ_i λ_i F̃_ij θ_ij / Σ_i λ_i F̃_ij,   F̃_i = floor(F_i)   (F ≡ 1: plain averaging)

The arithmetic follows `meanwise.average`'s weighted average Σ w x / Σ w with its dtype policy
(half precision accumulated in float32), but accumulates in place one model at a time
(`accumulate_merge`) instead of stacking the n members and n weights, so merging a tensor holds
two accumulators plus the member being added, whatever n is (tested equal to the kernel). This
module decides the elementwise weights:

- floor: ``max(F, floor)`` (the authors) or ``F + floor`` (FusionBench); with ``favor_target``
  only the target (model 0) is floored, so a donor's zero Fisher defers to the target;
- normalize: λ_i / ‖F_i‖, one global L2 norm of model i's *raw* Fisher over all merged tensors,
  so models whose Fishers differ in scale (more data, another loss) weigh alike;
- where Σ_i λ_i F̃_ij = 0 (λ = (0, 1) with an unfloored, zero donor Fisher), the element falls
  back to the λ-weighted plain average instead of 0/0: a merge never produces NaN.

Heads that differ between models (another number of classes) are not merged: name them in
``keep_target`` and the target's tensors are kept, the shared body is merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MergeOptions",
    "merge_options",
    "fisher_merge",
    "average_merge",
    "merge_tensor",
    "accumulate_merge",
    "is_finite",
    "fisher_norm",
    "validate_coefficients",
    "CoefficientSearch",
    "search_coefficients",
    "candidate_coefficients",
]

FLOOR_MODES = ("max", "add")
MISSING = ("average", "error")
PRESETS = ("authors",)


@dataclass(frozen=True)
class MergeOptions:
    """How Fishers become elementwise weights (see the module docstring)."""

    floor: float = 1e-6
    floor_mode: str = "max"
    favor_target: bool = False
    normalize: bool = False
    missing: str = "average"

    def __post_init__(self) -> None:
        if self.floor_mode not in FLOOR_MODES:
            raise ValueError(f"floor_mode must be one of {FLOOR_MODES}; got {self.floor_mode!r}")
        if self.missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}; got {self.missing!r}")
        if not (isinstance(self.floor, (int, float)) and math.isfinite(self.floor)):
            raise TypeError(f"floor must be a finite number; got {self.floor!r}")
        if self.floor < 0:
            raise ValueError(f"floor must be >= 0; got {self.floor}")

    @classmethod
    def from_preset(cls, preset: str | None, **overrides) -> MergeOptions:
        """``preset="authors"``: floor max(F, 1e-6) on the target only, normalized Fishers."""
        if preset is None:
            return cls(**overrides)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS} or None; got {preset!r}")
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(
                f"unknown merge options {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        base = {"floor": 1e-6, "floor_mode": "max", "favor_target": True, "normalize": True}
        return cls(**{**base, **overrides})


def merge_options(preset: str | None = None, **options: object) -> MergeOptions:
    """`MergeOptions` from a preset and explicit options; an option that is None is unset.

    An explicit option always wins over the preset's value (``preset="authors",
    normalize=False`` merges without normalization): nothing passed is silently ignored.
    """
    return MergeOptions.from_preset(preset, **{k: v for k, v in options.items() if v is not None})


def validate_coefficients(coefficients: Sequence[float] | Tensor | None, n: int) -> list[float]:
    """λ as a list of n finite, non-negative floats with a positive sum (default: 1/n each)."""
    if coefficients is None:
        return [1.0 / n] * n
    values = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1).tolist()
    if len(values) != n:
        raise ValueError(f"coefficients has {len(values)} entries but there are {n} models")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"coefficients must be finite and >= 0; got {values}")
    if sum(values) <= 0:
        raise ValueError(f"coefficients must not all be zero; got {values}")
    return values


def _check_fisher(fisher: Tensor, key: str, index: int, shape: torch.Size) -> Tensor:
    if not isinstance(fisher, Tensor):
        raise TypeError(f"fishers[{index}][{key!r}] is {type(fisher).__name__}, not a tensor")
    if fisher.shape != shape:
        raise ValueError(
            f"key {key!r}: fishers[{index}] has shape {list(fisher.shape)}, "
            f"the parameter has {list(shape)}"
        )
    if not fisher.is_floating_point():
        raise TypeError(f"key {key!r}: fishers[{index}] must be floating point; got {fisher.dtype}")
    if fisher.numel():
        # one pass, no temporary: NaN propagates into the min/max, inf shows in the max
        low, high = (float(v) for v in torch.aminmax(fisher))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"key {key!r}: fishers[{index}] has non-finite entries")
        if low < 0:
            raise ValueError(
                f"key {key!r}: fishers[{index}] has negative entries (a Fisher is >= 0)"
            )
    return fisher


def fisher_norm(squared_sum: float, index: int) -> float:
    """The global L2 norm from a sum of squares; a zero Fisher cannot be normalized."""
    norm = math.sqrt(squared_sum)
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError(
            f"fishers[{index}] is zero over all merged tensors, so normalize=True would divide "
            "by a zero norm; drop normalize or check that Fisher"
        )
    return norm


def _accumulation_dtype(member: torch.dtype, fisher: torch.dtype | None) -> torch.dtype:
    """float32 for half-precision members (and Fishers), else the promoted dtype: the policy
    of `meanwise.average`, so that many half-precision models do not lose the sum."""
    dtype = member if fisher is None else torch.promote_types(member, fisher)
    return torch.promote_types(dtype, torch.float32)


def accumulate_merge(
    key: str,
    count: int,
    member: Callable[[int], Tensor],
    fisher: Callable[[int], Tensor] | None,
    coefficients: Sequence[float],
    options: MergeOptions = MergeOptions(),  # noqa: B008 - frozen, never mutated
    norms: Sequence[float] | None = None,
    owned: bool = False,
) -> Tensor:
    """One key's merge, reading member i (and its Fisher) only when it is added.

    Memory: one numerator and one denominator buffer in the accumulation dtype plus the member
    and Fisher being added, whatever the number of models (`meanwise.average` would stack all
    n members and n weights first). Each product is formed in the read buffer and then added,
    in model order, without fused multiply-adds, which is what ``(w * x).sum(0) / w.sum(0)`` of
    the stacked form computes. `owned`: the tensors `member`/`fisher` return are fresh buffers
    (read from a file) that may be overwritten; otherwise they are copied first.

    Elements where Σ_i λ_i F̃_i = 0 take the λ-weighted plain average (a second pass over the
    members, for those elements only).

    The result is always finite. Finite inputs can overflow float32 in the products or the sums
    (a Fisher of 3e38 times a parameter of 10) although the merge itself, a convex combination
    of the members, cannot: such a key is merged again with float64 accumulation (re-reading
    the members; float32 inputs cannot overflow float64's products). A result that is still not
    finite (a member with NaN or inf entries, float64 members near its range) raises a
    ValueError naming the cause instead of returning NaN or inf.
    """
    first = member(0)
    if not first.is_floating_point():
        return first if owned else first.clone()  # step counters: the target's, never averaged
    args = (count, member, fisher, coefficients, options, norms, owned)
    dtype = first.dtype
    result = _accumulate(key, first, *args, wide=False)
    if is_finite(result):
        return result
    del result, first
    if dtype != torch.float64:
        result = _accumulate(key, member(0), *args, wide=True)
        if is_finite(result):
            return result
        del result
    raise ValueError(_non_finite_reason(count, member, coefficients))


def is_finite(tensor: Tensor) -> bool:
    """All entries finite, in one pass and without a temporary (NaN propagates into aminmax)."""
    if tensor.numel() == 0:
        return True
    low, high = (float(v) for v in torch.aminmax(tensor.detach()))
    return math.isfinite(low) and math.isfinite(high)


def _non_finite_reason(
    count: int, member: Callable[[int], Tensor], coefficients: Sequence[float]
) -> str:
    for i in range(count):
        if coefficients[i] and not is_finite(member(i)):
            return (
                f"the merge is not finite: models[{i}] has NaN or inf entries (refused rather "
                "than written; list the tensor under keep_target to copy the target's)"
            )
    dtype = member(0).dtype
    return f"the merge is not finite: it overflows {dtype} even with float64 accumulation"


def _accumulate(
    key: str,
    first: Tensor,
    count: int,
    member: Callable[[int], Tensor],
    fisher: Callable[[int], Tensor] | None,
    coefficients: Sequence[float],
    options: MergeOptions,
    norms: Sequence[float] | None,
    owned: bool,
    wide: bool,
) -> Tensor:
    """`accumulate_merge`'s arithmetic; `wide`: accumulate in float64."""

    def accumulation_dtype(fisher_dtype: torch.dtype | None) -> torch.dtype:
        acc = _accumulation_dtype(out_dtype, fisher_dtype)
        return torch.float64 if wide else acc

    out_dtype, shape = first.dtype, first.shape
    active = [i for i in range(count) if coefficients[i]]
    if 0 not in active:
        first = None  # not merged (λ_0 = 0): do not hold it
    numerator = denominator = None
    fisher_dtype = None
    for i in active:
        x, first = (first, None) if i == 0 else (member(i), first)
        if fisher is None:
            acc = accumulation_dtype(None)
            x = x.to(acc, copy=not owned)
            x.mul_(coefficients[i])
        else:
            f = _check_fisher(fisher(i), key, i, shape)
            fisher_dtype = f.dtype
            acc = accumulation_dtype(f.dtype)
            f = f.to(acc, copy=not owned)
            if options.floor > 0 and (not options.favor_target or i == 0):
                if options.floor_mode == "max":
                    f.clamp_min_(options.floor)
                else:
                    f.add_(options.floor)
            if norms is not None:
                f.div_(norms[i])
            f.mul_(coefficients[i])  # the member's weight λ_i F̃_i
            x = x.to(acc, copy=not owned)
            x.mul_(f)
            if denominator is None:
                denominator = f
            else:
                denominator.add_(f)
                del f
        if numerator is None:
            numerator = x
        else:
            numerator.add_(x)
        del x
    if fisher is None:
        total = torch.tensor(
            [coefficients[i] for i in active], dtype=accumulation_dtype(None)
        ).sum()
        return numerator.div_(total).to(out_dtype)
    dead = denominator == 0
    if dead.any():
        # 0/0 here: those elements take the λ-weighted plain average instead of NaN
        acc = accumulation_dtype(fisher_dtype)
        plain = torch.zeros(int(dead.sum()), dtype=acc)
        for i in active:
            plain.add_(member(i)[dead].to(acc) * coefficients[i])
        numerator[dead] = plain
        denominator[dead] = sum(coefficients[i] for i in active)
    return numerator.div_(denominator).to(out_dtype)


def merge_tensor(
    key: str,
    members: Sequence[Tensor],
    fishers: Sequence[Tensor] | None,
    coefficients: Sequence[float],
    options: MergeOptions = MergeOptions(),  # noqa: B008 - frozen, never mutated
    norms: Sequence[float] | None = None,
) -> Tensor:
    """One key's merge of in-memory tensors (fishers None: the λ-weighted average).

    The streaming checkpoint merge and `fisher_merge` both go through `accumulate_merge`, so a
    checkpoint merged tensor by tensor is bit-identical to the same merge done in memory.
    """
    return accumulate_merge(
        key,
        len(members),
        members.__getitem__,
        None if fishers is None else fishers.__getitem__,
        coefficients,
        options,
        norms,
        owned=False,
    )


def _is_kept(key: str, keep_target: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k.rstrip(".") + ".") for k in keep_target)


def _shared_keys(states: Sequence[Mapping[str, Tensor]], keep_target: Sequence[str]) -> list[str]:
    """Keys to merge; keys, shapes and dtypes must agree everywhere except `keep_target`."""
    reference = states[0]
    merged = [k for k in reference if not _is_kept(k, keep_target)]
    hint = "; if it is a task-specific head, name it in keep_target"
    for i, state in enumerate(states[1:], start=1):
        missing = [k for k in merged if k not in state]
        if missing:
            raise ValueError(f"states[{i}] lacks keys {missing[:5]} that states[0] has{hint}")
        extra = [k for k in state if k not in reference and not _is_kept(k, keep_target)]
        if extra:
            raise ValueError(f"states[{i}] has keys {extra[:5]} that states[0] lacks{hint}")
        for k in merged:
            a, b = reference[k], state[k]
            if not isinstance(b, Tensor) or not isinstance(a, Tensor):
                raise TypeError(f"key {k!r}: every state's value must be a tensor")
            if a.shape != b.shape:
                raise ValueError(
                    f"key {k!r}: states[{i}] has shape {list(b.shape)}, states[0] has "
                    f"{list(a.shape)}{hint}"
                )
            if a.dtype != b.dtype:
                raise ValueError(
                    f"key {k!r}: states[{i}] has dtype {b.dtype}, states[0] has {a.dtype}"
                )
    return merged


def _fisher_keys(
    fishers: Sequence[Mapping[str, Tensor]],
    merged: Sequence[str],
    options: MergeOptions,
    target: Mapping[str, Tensor],
) -> set[str]:
    """Keys merged with Fisher weights; the others are averaged (or rejected)."""
    merged_set = set(merged)
    for i, fisher in enumerate(fishers):
        unknown = [k for k in fisher if k not in merged_set]
        if unknown:
            raise ValueError(
                f"fishers[{i}] has keys {unknown[:5]} that are not merged parameters of the "
                "states (a Fisher of another model, or a key listed in keep_target?)"
            )
        integer = [k for k in fisher if not target[k].is_floating_point()]
        if integer:
            raise ValueError(
                f"fishers[{i}] has keys {integer[:5]} of integer tensors, which are copied from "
                "the target and never weighted"
            )
    with_fisher = set(fishers[0])
    for i, fisher in enumerate(fishers[1:], start=1):
        if set(fisher) != with_fisher:
            diff = sorted(set(fisher) ^ with_fisher)
            raise ValueError(f"fishers[{i}] and fishers[0] cover different keys: {diff[:5]}")
    if options.missing == "error":
        # integer buffers (step counters) are copied from the target, never weighted
        lacking = [k for k in merged if k not in with_fisher and target[k].is_floating_point()]
        if lacking:
            raise ValueError(
                f"keys {lacking[:5]} have no Fisher; pass missing='average' to average them"
            )
    return with_fisher


def fisher_merge(
    states: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    coefficients: Sequence[float] | Tensor | None = None,
    floor: float | None = None,
    floor_mode: str | None = None,
    favor_target: bool | None = None,
    normalize: bool | None = None,
    missing: str | None = None,
    *,
    preset: str | None = None,
    keep_target: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Merge ``states`` with elementwise weights λ_i · floor(F_i) (see the module docstring).

    Args:
        states: n state dicts; states[0] is the target (its head and integer buffers are kept).
        fishers: n dicts of diagonal Fishers (from `diagonal_fisher`), covering the same keys.
        coefficients: λ, n non-negative numbers with a positive sum (default 1/n each).
        floor, floor_mode: ``"max"``: max(F, floor) (the authors); ``"add"``: F + floor
            (FusionBench). Defaults 1e-6 and ``"max"``.
        favor_target: floor only the target's Fisher (default False).
        normalize: divide λ_i by the global L2 norm of Fisher i over all merged keys (default
            False).
        missing: keys without a Fisher (buffers, frozen parameters) are λ-averaged
            (``"average"``, the default) or rejected (``"error"``).
        preset: ``"authors"`` sets floor=1e-6, floor_mode="max", favor_target=True,
            normalize=True. An option passed explicitly (not None) overrides the preset's
            value, e.g. ``preset="authors", normalize=False``; `merge_options` tells which.
        keep_target: keys, or prefixes such as ``"classifier"``, copied from the target unmerged:
            task-specific heads, which may differ in shape or be absent in other models.

    Returns:
        The merged state dict, in the target's key order and dtypes.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence) or not states:
        raise TypeError("states must be a non-empty sequence of state dicts")
    if isinstance(fishers, Mapping) or not isinstance(fishers, Sequence):
        raise TypeError("fishers must be a sequence of dicts, one per state")
    if len(fishers) != len(states):
        raise ValueError(f"fishers has {len(fishers)} dicts but states has {len(states)}")
    if isinstance(keep_target, str):
        keep_target = (keep_target,)
    options = merge_options(
        preset,
        floor=floor,
        floor_mode=floor_mode,
        favor_target=favor_target,
        normalize=normalize,
        missing=missing,
    )
    lambdas = validate_coefficients(coefficients, len(states))
    merged_keys = _shared_keys(states, keep_target)
    with_fisher = _fisher_keys(fishers, merged_keys, options, states[0])
    norms = None
    if options.normalize:
        norms = [
            fisher_norm(sum(float(f[k].double().square().sum()) for k in with_fisher), i)
            for i, f in enumerate(fishers)
        ]
    result: dict[str, Tensor] = {}
    for key, target in states[0].items():
        if key not in merged_keys:
            result[key] = target.clone()
            continue
        members = [s[key] for s in states]
        key_fishers = [f[key] for f in fishers] if key in with_fisher else None
        result[key] = merge_tensor(key, members, key_fishers, lambdas, options, norms)
    return result


def average_merge(
    states: Sequence[Mapping[str, Tensor]],
    coefficients: Sequence[float] | Tensor | None = None,
    *,
    keep_target: Sequence[str] = (),
) -> dict[str, Tensor]:
    """The λ-weighted plain average (Fisher ≡ 1), with the same head handling as fisher_merge."""
    if isinstance(states, Mapping) or not isinstance(states, Sequence) or not states:
        raise TypeError("states must be a non-empty sequence of state dicts")
    if isinstance(keep_target, str):
        keep_target = (keep_target,)
    lambdas = validate_coefficients(coefficients, len(states))
    merged_keys = set(_shared_keys(states, keep_target))
    return {
        key: merge_tensor(key, [s[key] for s in states], None, lambdas)
        if key in merged_keys
        else target.clone()
        for key, target in states[0].items()
    }


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
