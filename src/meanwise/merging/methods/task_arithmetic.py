"""Task arithmetic (Ilharco et al., ICLR 2023, "Editing models with task arithmetic"):

    θ* = θ_0 + scale · Σ_{i≥1} λ_i (θ_i − θ_0)

θ_0 (models[0]) is the pre-trained base, θ_i the fine-tuned models and θ_i − θ_0 their task
vectors; λ_i defaults to 1 (the paper's sum) and λ_0 is not used. A negative `scale` subtracts
the task vectors (the paper's forgetting by negation). Not an average: the λ are absolute.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from meanwise.average import RunningWeightedSum
from meanwise.merging.methods.base import (
    MergeMethod,
    TensorReads,
    accumulation_dtype,
    register_method,
)
from meanwise.merging.options import is_finite_number

__all__ = ["TaskArithmetic"]


@register_method
@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Three buffers per tensor (the base, the sum of task vectors and the member being
    added), whatever n is."""

    name = "task_arithmetic"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not is_finite_number(self.scale):
            raise ValueError(f"scale must be a finite number; got {self.scale!r}")

    def default_coefficients(self, count: int) -> list[float]:
        return [1.0] * count

    def combine(self, reads: TensorReads, wide: bool) -> Tensor:
        acc = accumulation_dtype(reads.dtype, None, wide)
        base = reads.member(0).to(acc, copy=not reads.owned)
        vectors = RunningWeightedSum(acc)  # Σ λ_i (θ_i − θ_0): a sum, not an average
        for i in range(1, reads.count):
            if not reads.coefficients[i]:
                continue
            x = reads.member(i).to(acc, copy=not reads.owned)
            vectors.add(x.sub_(base), reads.coefficients[i], owned=True)
            del x
        if vectors.count:
            base.add_(vectors.numerator.mul_(self.scale))
        return base.to(reads.dtype)
