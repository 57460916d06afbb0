"""Fisher-weighted merging (Matena & Raffel, NeurIPS 2022), per parameter element j:

    θ*_j = Σ_i λ_i F̃_ij θ_ij / Σ_i λ_i F̃_ij,   F̃_i = floor(F_i) / (‖F_i‖ if normalize)

with the floor and normalization of `MergeOptions`. Where Σ_i λ_i F̃_ij = 0 (λ = (0, 1) with an
unfloored, zero donor Fisher) the element falls back to the λ-weighted plain average instead
of 0/0: a merge never produces NaN. A tensor without a Fisher is λ-averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from meanwise.average import RunningWeightedSum
from meanwise.merging.methods.base import (
    MergeMethod,
    TensorReads,
    accumulation_dtype,
    register_method,
)
from meanwise.merging.methods.plain_average import PlainAverage
from meanwise.merging.options import MergeOptions

__all__ = ["FisherWeighted"]


@register_method
@dataclass(frozen=True)
class FisherWeighted(MergeMethod):
    """Four buffers per tensor (numerator, denominator, the member and the Fisher being
    added), whatever n is."""

    name = "fisher"
    uses_fishers = True
    options: MergeOptions = field(default_factory=MergeOptions)

    def __post_init__(self) -> None:
        if not isinstance(self.options, MergeOptions):
            raise TypeError(f"options must be a MergeOptions; got {type(self.options).__name__}")

    @property
    def fisher_norms(self) -> bool:
        return self.options.normalize

    @property
    def fisher_required(self) -> bool:
        return self.options.missing == "error"

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        return (*MergeOptions.names(), "preset")

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> FisherWeighted:
        overrides = {k: v for k, v in parameters.items() if k != "preset"}
        return cls(MergeOptions.from_preset(parameters.get("preset"), **overrides))

    def combine(self, reads: TensorReads, wide: bool) -> Tensor:
        if reads.fisher is None:
            return PlainAverage().combine(reads, wide)
        options, active = self.options, reads.active
        total = None
        for i in active:
            x = reads.member(i)
            f = reads.fisher(i)
            acc = accumulation_dtype(reads.dtype, f.dtype, wide)
            if total is None:
                total = RunningWeightedSum(acc)
            f = f.to(acc, copy=not reads.owned)
            if options.floor > 0 and (not options.favor_target or i == 0):
                if options.floor_mode == "max":
                    f.clamp_min_(options.floor)
                else:
                    f.add_(options.floor)
            if reads.norms is not None:
                f.div_(reads.norms[i])
            f.mul_(reads.coefficients[i])  # the member's weight λ_i F̃_i
            # both are fresh buffers in `acc` now: the sum keeps them as its numerator and
            # denominator (model 0) or adds them in place
            x = x.to(acc, copy=not reads.owned)
            total.add(x, f, owned=True, dtype=acc)
            del x, f
        numerator, denominator = total.numerator, total.denominator
        dead = denominator == 0
        if dead.any():
            # 0/0 here: those elements take the λ-weighted plain average instead of NaN
            # in the numerator's dtype: with Fishers of mixed dtypes the last one's
            # accumulation dtype need not be the numerator's
            acc = numerator.dtype
            plain = torch.zeros(int(dead.sum()), dtype=acc, device=numerator.device)
            for i in active:
                plain.add_(reads.member(i)[dead].to(acc) * reads.coefficients[i])
            numerator[dead] = plain
            denominator[dead] = sum(reads.coefficients[i] for i in active)
        return total.result(reads.dtype)
