"""What a merge method is, and the registry that names them (mergekit's pattern).

A method is a small class with one per-tensor rule, `combine`: given readers for one tensor
of every model (and, for methods that use them, of every Fisher), return the merged tensor.
Everything around the rule is `meanwise.merging.pipeline.iter_merged`'s, written once for all
methods: key, shape, dtype and Fisher checks, the Fisher norm pass, integer tensors copied from
the target, ``keep_target``, the float64 redo of an overflowing tensor and the refusal of a
non-finite one. Adding a method is one file: a subclass with a ``name`` and `combine`,
decorated with `register_method`, imported by ``methods/__init__.py``.

Rules accumulate in place, one model at a time (read member i into a fresh buffer, scale it,
add it: `meanwise.average.RunningWeightedSum`), so a tensor's merge holds a few buffers
whatever the number of models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from meanwise.average import accumulation_dtypes

__all__ = [
    "TensorReads",
    "MergeMethod",
    "register_method",
    "method_class",
    "merge_methods",
    "accumulation_dtype",
]


class TensorReads(NamedTuple):
    """One tensor of every model, read on demand (a tuple: one is made per merged tensor).

    `member(i)` / `fisher(i)` read model i's tensor (its Fisher, already checked finite and
    >= 0); `fisher` is None when this tensor has no Fisher. `active`: the models with a
    non-zero coefficient, in order (the others are never read). `owned`: what the readers
    return is a fresh buffer the rule may overwrite (a file read); otherwise the rule must copy
    first. `norms`: the global Fisher norms to divide by, or None.
    """

    key: str
    count: int
    dtype: torch.dtype
    member: Callable[[int], Tensor]
    fisher: Callable[[int], Tensor] | None
    coefficients: Sequence[float]
    active: tuple[int, ...]
    norms: Sequence[float] | None
    owned: bool


def accumulation_dtype(
    member: torch.dtype, fisher: torch.dtype | None = None, wide: bool = False
) -> torch.dtype:
    """`meanwise.average.accumulation_dtypes` (float32 for half-precision members and
    Fishers, else the promoted dtype, so that many half-precision models do not lose the sum);
    float64 when `wide` (the redo of a tensor that overflowed)."""
    if wide:
        return torch.float64
    return accumulation_dtypes(member, *([] if fisher is None else [fisher]))[0]


class MergeMethod:
    """A registered merge method: its parameters are its (frozen dataclass) fields.

    Subclasses set ``name`` (what a YAML config's ``method:`` says) and implement `combine`.
    ``uses_fishers``: the method needs one Fisher per model (and then the pipeline validates
    them); the others refuse Fishers.
    """

    name: ClassVar[str]
    uses_fishers: ClassVar[bool] = False

    def default_coefficients(self, count: int) -> list[float]:
        """λ when none are given: 1/n each (for averages only the ratios matter)."""
        return [1.0 / count] * count

    @property
    def fisher_norms(self) -> bool:
        """Whether `combine` divides by the global Fisher norms (a pass before merging)."""
        return False

    @property
    def fisher_required(self) -> bool:
        """Whether every floating tensor must have a Fisher."""
        return False

    def combine(self, reads: TensorReads, wide: bool) -> Tensor:
        """The merged tensor in ``reads.dtype``; `wide`: accumulate in float64."""
        raise NotImplementedError

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls)) if hasattr(cls, "__dataclass_fields__") else ()

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> MergeMethod:
        """The method from a config's ``parameters:`` mapping (validated by the class)."""
        unknown = sorted(set(parameters) - set(cls.parameter_names()))
        if unknown:
            raise ValueError(
                f"unknown keys {unknown} for method {cls.name}; allowed: "
                f"{sorted(cls.parameter_names())}"
            )
        return cls(**parameters)


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make `cls` available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute name (a non-empty string)")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a merge method named {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def merge_methods() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[MergeMethod]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {merge_methods()}; got {name!r}") from None
