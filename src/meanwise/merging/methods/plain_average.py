"""The λ-weighted plain average, θ* = Σ_i λ_i θ_i / Σ_i λ_i (Fisher merging with F ≡ 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meanwise.average import RunningWeightedSum
from meanwise.merging.methods.base import (
    MergeMethod,
    TensorReads,
    accumulation_dtype,
    register_method,
)

__all__ = ["PlainAverage", "weighted_sum"]


def weighted_sum(reads: TensorReads, acc: torch.dtype) -> RunningWeightedSum:
    """Σ_i λ_i θ_i (and Σ_i λ_i) over the active models, in `acc`, in model order, through
    `meanwise.average.RunningWeightedSum`: each product is formed in the read buffer and then
    added (no fused multiply-add), left to right."""
    total = RunningWeightedSum(acc)
    for i in reads.active:
        total.add(reads.member(i), reads.coefficients[i], owned=reads.owned)
    return total


@register_method
@dataclass(frozen=True)
class PlainAverage(MergeMethod):
    """Two buffers per tensor (the sum and the member being added), whatever n is."""

    name = "average"

    def combine(self, reads: TensorReads, wide: bool) -> Tensor:
        acc = accumulation_dtype(reads.dtype, None, wide)
        # a λ sum that underflows in `acc` gives inf/NaN: the pipeline redoes it in float64
        return weighted_sum(reads, acc).result(reads.dtype, check_zero=False)
