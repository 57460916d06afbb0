"""The one validation and merge path: `iter_merged`, which `fisher_merge` (in memory) and the
streaming checkpoint writer both consume.

Checked once, before the first tensor is merged, from the checkpoints' specs (no tensor read):
keys, shapes and dtypes agree across the models except under ``keep_target``; the Fishers, for
a method that uses them, cover the same merged floating tensors in every model, with the
parameters' shapes and a floating dtype. Then, key by key in the target's order, one tensor of
each model (and of each Fisher) is read when it is added: integer tensors (step counters) and
``keep_target`` tensors are the target's, the others go to the method's per-tensor rule.

The result is always finite. Finite inputs can overflow float32 in the products or the sums (a
Fisher of 3e38 times a parameter of 10) although a convex combination of them cannot: such a
tensor is merged again with float64 accumulation (re-reading the members; float32 inputs cannot
overflow float64's products). A result that is still not finite (a member with NaN or inf
entries, float64 members near its range) raises a ValueError naming the tensor and the cause,
instead of returning NaN or inf.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from meanwise.merging.checkpoints import Checkpoint, InMemoryCheckpoint, TensorSpec
from meanwise.merging.methods import MergeMethod, TensorReads

__all__ = ["iter_merged", "validate_coefficients", "fisher_norm", "is_finite", "is_kept"]

_HEAD_HINT = "; if it is a task-specific head, name it in keep_target"


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


def is_finite(tensor: Tensor) -> bool:
    """All entries finite, in one pass and without a temporary (NaN propagates into aminmax)."""
    if tensor.numel() == 0:
        return True
    low, high = (float(v) for v in torch.aminmax(tensor.detach()))
    return math.isfinite(low) and math.isfinite(high)


def fisher_norm(squared_sum: float, index: int) -> float:
    """The global L2 norm from a sum of squares; a zero Fisher cannot be normalized."""
    norm = math.sqrt(squared_sum)
    if not math.isfinite(norm):
        raise ValueError(
            f"fishers[{index}] has non-finite entries, or entries too large to square in "
            f"float64 (its norm is {norm}); normalize=True cannot divide by it"
        )
    if not norm > 0:
        raise ValueError(
            f"fishers[{index}] is zero over all merged tensors, so normalize=True would divide "
            "by a zero norm; drop normalize or check that Fisher"
        )
    return norm


def is_kept(key: str, keep_target: Sequence[str]) -> bool:
    """`key` is one of `keep_target` or below one of its prefixes (``"classifier"``)."""
    return any(key == k or key.startswith(k.rstrip(".") + ".") for k in keep_target)


def _name(role: str, i: int, checkpoint: Checkpoint) -> str:
    # a state dict in memory is named by its index; a file by its path as well
    if type(checkpoint) is InMemoryCheckpoint:
        return f"{role}[{i}]"
    return f"{role}[{i}] ({checkpoint.path})"


def _shape_error(
    key: str, name: str, shape: tuple, reference: str, expected: tuple, hint: str = ""
) -> ValueError:
    return ValueError(
        f"tensor {key!r}: {name} has shape {list(shape)}, {reference} has {list(expected)}{hint}"
    )


def _merged_keys(
    models: Sequence[Checkpoint], specs: dict[str, TensorSpec], keep_target: Sequence[str]
) -> list[str]:
    """The target's keys that are merged; the others must agree in keys, shapes and dtypes.
    `specs`: the target's, key by key."""
    keys = list(specs)
    mine = set(keys)
    merged = [k for k in keys if not is_kept(k, keep_target)] if keep_target else keys
    for i, model in enumerate(models[1:], start=1):
        name = _name("models", i, model)
        their_keys = model.keys()
        theirs = set(their_keys)
        missing = [k for k in merged if k not in theirs]
        if missing:
            raise ValueError(f"{name} lacks tensors {missing[:5]} that models[0] has{_HEAD_HINT}")
        extra = [k for k in their_keys if k not in mine and not is_kept(k, keep_target)]
        if extra:
            raise ValueError(f"{name} has tensors {extra[:5]} that models[0] lacks{_HEAD_HINT}")
        for key in merged:
            a, b = specs[key], model.spec(key)
            if a.shape != b.shape:
                raise _shape_error(key, name, b.shape, "models[0]", a.shape, _HEAD_HINT)
            if a.dtype != b.dtype:
                raise ValueError(
                    f"tensor {key!r}: {name} has dtype {b.dtype}, models[0] has {a.dtype}; "
                    "convert one of them"
                )
    return merged


def _fisher_keys(
    fishers: Sequence[Checkpoint],
    specs: dict[str, TensorSpec],
    merged: Sequence[str],
    required: bool,
) -> set[str]:
    """The merged tensors that have a Fisher in every model (the others are λ-averaged)."""
    merged_set = set(merged)
    covered = set(fishers[0].keys())
    for i, fisher in enumerate(fishers):
        name = _name("fishers", i, fisher)
        keys = fisher.keys()
        unknown = [k for k in keys if k not in merged_set]
        if unknown:
            raise ValueError(
                f"{name} has keys {unknown[:5]} that are not merged parameters of models[0] "
                "(a Fisher of another model, or a key listed in keep_target?)"
            )
        integer = [k for k in keys if not specs[k].dtype.is_floating_point]
        if integer:
            raise ValueError(
                f"{name} has keys {integer[:5]} of integer tensors, which are copied from the "
                "target and never weighted"
            )
        if set(keys) != covered:
            diff = sorted(set(keys) ^ covered)
            raise ValueError(f"fishers[{i}] and fishers[0] cover different keys: {diff[:5]}")
        for key in keys:
            spec = fisher.spec(key)
            if spec.shape != specs[key].shape:
                raise _shape_error(key, name, spec.shape, "the parameter", specs[key].shape)
            if not spec.dtype.is_floating_point:
                raise ValueError(f"tensor {key!r}: {name} must be floating point; got {spec.dtype}")
    if required:
        lacking = [k for k in merged if k not in covered and specs[k].dtype.is_floating_point]
        if lacking:
            raise ValueError(
                f"tensors {lacking[:5]} have no Fisher; pass missing='average' to average them"
            )
    return covered


def _checked_fisher(fisher: Tensor, key: str, index: int) -> Tensor:
    """A Fisher as read, refused if any entry is non-finite or negative."""
    if fisher.numel():
        # one pass, no temporary: NaN propagates into the min/max, inf shows in the max
        low, high = (float(v) for v in torch.aminmax(fisher))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"tensor {key!r}: fishers[{index}] has non-finite entries")
        if low < 0:
            raise ValueError(
                f"tensor {key!r}: fishers[{index}] has negative entries (a Fisher is >= 0)"
            )
    return fisher


def _non_finite_reason(key: str, reads: TensorReads) -> str:
    # the weighted models first; task arithmetic also reads models[0] whatever its weight
    for i in dict.fromkeys([*reads.active, *range(reads.count)]):
        if not is_finite(reads.member(i)):
            return (
                f"tensor {key!r}: the merge is not finite: models[{i}] has NaN or inf entries "
                "(refused rather than written; list the tensor under keep_target to copy the "
                "target's)"
            )
    return (
        f"tensor {key!r}: the merge is not finite: it overflows {reads.dtype} even with float64 "
        "accumulation"
    )


def iter_merged(
    models: Sequence[Checkpoint],
    fishers: Sequence[Checkpoint] | None,
    method: MergeMethod,
    coefficients: Sequence[float] | Tensor | None = None,
    keep_target: Sequence[str] = (),
) -> Iterator[tuple[str, Tensor]]:
    """Validate the inputs now, then yield ``(key, merged tensor)`` for every key of the
    target (models[0]), in its order (see the module docstring).

    Args:
        models: the checkpoints; models[0] is the target (its integer tensors and its
            `keep_target` tensors are copied).
        fishers: one Fisher checkpoint per model for a method that uses them, else None.
        method: a `MergeMethod` (`PlainAverage()`, `FisherWeighted(MergeOptions(...))`, ...).
        coefficients: λ, n non-negative numbers with a positive sum (default: the method's).
        keep_target: keys, or prefixes such as ``"classifier"``, copied from the target
            unmerged: task-specific heads, which may differ in shape or be absent elsewhere.

    The yielded tensors of a merged key are fresh; a copied key is the target's own tensor
    when the checkpoints hand out fresh buffers, otherwise a clone.
    """
    if not isinstance(method, MergeMethod):
        raise TypeError(f"method must be a MergeMethod instance; got {type(method).__name__}")
    if not models:
        raise ValueError("need at least one model to merge")
    if isinstance(keep_target, str):
        keep_target = (keep_target,)
    n = len(models)
    if method.uses_fishers and fishers is None:
        raise ValueError(f"method {method.name!r} needs one Fisher per model; got none")
    if not method.uses_fishers and fishers is not None:
        raise ValueError(f"method {method.name!r} does not use Fishers; pass fishers=None")
    if fishers is not None and len(fishers) != n:
        raise ValueError(f"{len(fishers)} Fishers for {n} models; give one per model")
    if coefficients is None:
        lambdas = method.default_coefficients(n)
    else:
        lambdas = validate_coefficients(coefficients, n)
    specs = {key: models[0].spec(key) for key in models[0].keys()}
    merged = _merged_keys(models, specs, keep_target)
    covered: set[str] = set()
    if fishers is not None:
        covered = _fisher_keys(fishers, specs, merged, method.fisher_required)
    norms = None
    if fishers is not None and method.fisher_norms:
        ordered = [k for k in specs if k in covered]  # a fixed summation order
        squares = [sum(float(f.get(k).double().square().sum()) for k in ordered) for f in fishers]
        norms = [fisher_norm(total, i) for i, total in enumerate(squares)]
    owned = all(c.owns_buffers for c in [*models, *(fishers or [])])
    return _merge_keys(models, fishers, method, lambdas, specs, set(merged), covered, norms, owned)


def _merge_keys(
    models: Sequence[Checkpoint],
    fishers: Sequence[Checkpoint] | None,
    method: MergeMethod,
    lambdas: list[float],
    specs: dict[str, TensorSpec],
    merged: set[str],
    covered: set[str],
    norms: list[float] | None,
    owned: bool,
) -> Iterator[tuple[str, Tensor]]:
    target = models[0]
    active = tuple(i for i in range(len(models)) if lambdas[i])
    for key, spec in specs.items():
        dtype = spec.dtype
        if key not in merged or not dtype.is_floating_point:
            tensor = target.get(key)
            yield key, (tensor if owned else tensor.clone())
            continue
        reads = TensorReads(
            key=key,
            count=len(models),
            dtype=dtype,
            member=lambda i, k=key: models[i].get(k),
            fisher=(
                (lambda i, k=key: _checked_fisher(fishers[i].get(k), k, i))
                if key in covered
                else None
            ),
            coefficients=lambdas,
            active=active,
            norms=norms,
            owned=owned,
        )
        yield key, _merge_one(method, reads)


def _merge_one(method: MergeMethod, reads: TensorReads) -> Tensor:
    """The method's rule; redone in float64 if it overflowed, refused if still not finite."""
    result = method.combine(reads, wide=False)
    if is_finite(result):
        return result
    del result
    if reads.dtype != torch.float64:
        result = method.combine(reads, wide=True)
        if is_finite(result):
            return result
        del result
    raise ValueError(_non_finite_reason(reads.key, reads))
