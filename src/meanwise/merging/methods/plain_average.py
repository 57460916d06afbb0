"""The λ-weighted plain average, θ* = Σ_i λ_i θ_i / Σ_i λ_i (Fisher merging with F ≡ 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meanwise.merging.methods.base import (
    MergeMethod,
    TensorReads,
    accumulation_dtype,
    register_method,
)

__all__ = ["PlainAverage", "weighted_sum"]


def weighted_sum(reads: TensorReads, acc: torch.dtype) -> Tensor:
    """Σ_i λ_i θ_i over the active models, in `acc`, in model order: each product is formed
    in the read buffer and then added (no fused multiply-add), which is what the stacked form
    ``(w * x).sum(0)`` of `meanwise.average` computes."""
    numerator = None
    for i in reads.active:
        x = reads.member(i).to(acc, copy=not reads.owned)
        x.mul_(reads.coefficients[i])
        if numerator is None:
            numerator = x
        else:
            numerator.add_(x)
        del x
    return numerator


@register_method
@dataclass(frozen=True)
class PlainAverage(MergeMethod):
    """Two buffers per tensor (the sum and the member being added), whatever n is."""

    name = "average"

    def combine(self, reads: TensorReads, wide: bool) -> Tensor:
        acc = accumulation_dtype(reads.dtype, None, wide)
        numerator = weighted_sum(reads, acc)
        total = torch.tensor([reads.coefficients[i] for i in reads.active], dtype=acc).sum()
        return numerator.div_(total).to(reads.dtype)
