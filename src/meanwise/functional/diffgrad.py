"""diffGrad (Dubey et al., IEEE TNNLS 2019) as one pure update rule: the authors' v2 rule.

Adam's moments, with the first moment damped elementwise by the *friction*
``xi = sigmoid(|g_{t-1} - g_t|)`` (``g_0 = 0``): where the gradient barely changes (near an
optimum, or on a plateau) ``xi -> 1/2`` and the step halves; where it changes fast the step is
Adam's. Step: ``lr * sqrt(1 - beta2^t) / (1 - beta1^t) * xi * m / (sqrt(v) + eps)``. L2 weight
decay is added to the gradient first, so the friction sees the decayed gradient. Identical to
torch-optimizer 0.3.0's ``DiffGrad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from meanwise.functional._ops import FUNCTIONAL, Ops


class DiffGradResult(NamedTuple):
    params: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_sq: list[Tensor]
    previous_grad: list[Tensor]


class DiffGradCoefficients(NamedTuple):
    """The numbers of one diffGrad step, computed on the host (0-dim tensors when fused)."""

    l2: float  # L2 decay: g += l2 * weights (0: none)
    ema1: float  # 1 - beta1
    beta2: float
    ema2: float  # 1 - beta2
    eps: float  # added to sqrt(v)
    step_size: float  # lr * sqrt(1 - beta2^t) / (1 - beta1^t)


def diffgrad_coefficients(
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> DiffGradCoefficients:
    """The numbers of step ``step`` (1-based)."""
    step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return DiffGradCoefficients(weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size)


def diffgrad_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_sq: Sequence[Tensor],
    previous_grad: Sequence[Tensor],
    c: DiffGradCoefficients,
    *,
    decay: bool = True,
    ops: Ops,
) -> DiffGradResult:
    """diffGrad's tensor part: the step's numbers ``c`` from :func:`diffgrad_coefficients`.

    ``decay=False`` (weight_decay 0, so ``c.l2`` is 0 on every step) leaves the L2 op out of
    the fused flavour's graph (the eager flavours skip it by its value anyway).
    """
    params = list(params)
    if decay:
        grads = ops.new_add(grads, params, alpha=c.l2)
    exp_avg = ops.lerp(list(exp_avg), grads, c.ema1)
    exp_avg_sq = ops.mul_scalar(list(exp_avg_sq), c.beta2)
    exp_avg_sq = ops.addcmul(exp_avg_sq, grads, grads, c.ema2)

    # |g_{t-1} - g_t| is computed in the previous-gradient buffer, which is dead until it is
    # overwritten with this gradient at the end: no temporary for it in the in-place flavours.
    change = ops.abs(ops.add(list(previous_grad), grads, alpha=-1.0))
    denom = ops.add_scalar(ops.new_sqrt(exp_avg_sq), c.eps)
    params = ops.addcdiv_sigmoid(params, change, exp_avg, denom, -c.step_size)
    previous_grad = ops.assign(change, grads)
    return DiffGradResult(params, exp_avg, exp_avg_sq, previous_grad)


def diffgrad(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_sq: Sequence[Tensor],
    previous_grad: Sequence[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    ops: Ops = FUNCTIONAL,
) -> DiffGradResult:
    """One diffGrad step on lists of tensors; ``step`` is the 1-based count after this step.

    ``previous_grad`` holds the last (decayed) gradient; the in-place flavours overwrite that one
    buffer instead of cloning a new gradient every step. ``grads`` are never modified.
    """
    c = diffgrad_coefficients(step, lr, beta1, beta2, eps, weight_decay)
    tensors = (params, grads, exp_avg, exp_avg_sq, previous_grad)
    return ops.apply(diffgrad_update, tensors, c, decay=weight_decay != 0)
