"""Adam (Kingma & Ba, 2015) as one pure rule: torch.optim.Adam's math (L2 decay, no amsgrad)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from meanwise.functional._ops import FUNCTIONAL, Ops

__all__ = ["AdamResult", "adam"]


class AdamResult(NamedTuple):
    params: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]


def adam(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_sq: Sequence[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ops: Ops = FUNCTIONAL,
) -> AdamResult:
    """One Adam step; ``step`` is the 1-based count after this step. ``grads`` are not modified."""
    params = list(params)
    if weight_decay != 0:
        grads = ops.new_add(grads, params, alpha=weight_decay)
    exp_avg = ops.lerp(list(exp_avg), grads, 1.0 - beta1)
    exp_avg_sq = ops.mul_scalar(list(exp_avg_sq), beta2)
    exp_avg_sq = ops.addcmul(exp_avg_sq, grads, grads, 1.0 - beta2)
    # sqrt(v)/sqrt(bc2) + eps == (sqrt(v) + eps·sqrt(bc2)) / sqrt(bc2): the bias correction
    # folds into the step size, saving one pass over the denominator (as in adabelief.py).
    sqrt_bc2 = math.sqrt(1.0 - beta2**step)
    denom = ops.add_scalar(ops.new_sqrt(exp_avg_sq), eps * sqrt_bc2)
    params = ops.addcdiv(params, exp_avg, denom, -lr * sqrt_bc2 / (1.0 - beta1**step))
    return AdamResult(params, exp_avg, exp_avg_sq)
