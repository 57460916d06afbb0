"""AdaBelief (Zhuang et al., NeurIPS 2020) as one pure update rule.

The rule follows the authors' released package (adabelief-pytorch 0.2.1) exactly, quirks
included, because users switch between the two and expect identical runs:

- ``eps`` is added to the belief ``s`` inside the EMA on every step (so its bias-corrected effect
  is ``eps / (1 - beta2)``), and again to the denominator.
- ``rectify`` is RAdam's rule: the adaptive step is used only once the length of the
  approximated SMA ``rho_t >= 5``; before that the step is SGD with momentum,
  ``m / (1 - beta1^t)``, if ``degenerated_to_sgd``, else no step.
- Quirk: with ``rectify=True`` the rectified branch reads the plain belief ``s``, so ``amsgrad``
  has no effect on the parameters (its running maximum is still maintained).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from meanwise.functional._ops import FUNCTIONAL, Ops


class AdaBeliefResult(NamedTuple):
    params: list[Tensor]
    exp_avg: list[Tensor]
    exp_avg_var: list[Tensor]
    max_exp_avg_var: list[Tensor] | None


def rectification(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """RAdam's (rho_t, step multiplier) for 1-based ``step``.

    The multiplier is ``sqrt((1 - beta2^t) r_t) / (1 - beta1^t)`` once ``rho_t >= 5`` (with r_t
    the variance rectification term) and ``1 / (1 - beta1^t)`` before that.
    """
    beta2_t = beta2**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
    bias_correction1 = 1.0 - beta1**step
    if rho_t >= 5:
        r_t = (rho_t - 4) / (rho_inf - 4) * (rho_t - 2) / rho_t * rho_inf / (rho_inf - 2)
        return rho_t, math.sqrt((1.0 - beta2_t) * r_t) / bias_correction1
    return rho_t, 1.0 / bias_correction1


class AdaBeliefCoefficients(NamedTuple):
    """The numbers of one AdaBelief step, computed on the host (the fused flavour receives
    them as 0-dim tensors, so its compiled graph serves every step)."""

    shrink: float  # decoupled decay: weights *= shrink (1: none)
    l2: float  # L2 decay: g += l2 * weights (0: none)
    ema1: float  # 1 - beta1, the first moment's EMA weight
    beta2: float
    ema2: float  # 1 - beta2
    eps: float  # added to the belief inside its EMA
    adaptive: float  # 1 on adaptive steps, 0 on RAdam's SGD steps (then the denominator is 1)
    denom_eps: float  # added to (adaptive * sqrt(second moment))
    step_size: float  # weights -= step_size * m / denominator


def adabelief_coefficients(
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
) -> AdaBeliefCoefficients:
    """The numbers of step ``step`` (1-based): every branch on the step count is taken here,
    so the tensor part (:func:`adabelief_update`) has none."""
    if weight_decouple:
        shrink, l2 = 1.0 - (weight_decay if fixed_decay else lr * weight_decay), 0.0
    else:
        shrink, l2 = 1.0, weight_decay
    ema = (shrink, l2, 1.0 - beta1, beta2, 1.0 - beta2, eps)
    if rectify:
        rho_t, multiplier = rectification(step, beta1, beta2)
        if rho_t >= 5:
            return AdaBeliefCoefficients(*ema, 1.0, eps, lr * multiplier)
        # SGD with momentum: the denominator 0 * sqrt(s) + 1 is exactly 1.
        return AdaBeliefCoefficients(*ema, 0.0, 1.0, lr * multiplier if degenerated_to_sgd else 0.0)
    # sqrt(s)/sqrt(bc2) + eps == (sqrt(s) + eps*sqrt(bc2)) / sqrt(bc2): fold the bias correction
    # into the step size and save one pass over the denominator.
    sqrt_bc2 = math.sqrt(1.0 - beta2**step)
    return AdaBeliefCoefficients(*ema, 1.0, eps * sqrt_bc2, lr * sqrt_bc2 / (1.0 - beta1**step))


def adabelief_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_var: Sequence[Tensor],
    max_exp_avg_var: Sequence[Tensor] | None,
    c: AdaBeliefCoefficients,
    *,
    amsgrad: bool,
    rectify: bool,
    decay: bool = True,
    ops: Ops,
) -> AdaBeliefResult:
    """AdaBelief's tensor part: the step's numbers ``c`` from :func:`adabelief_coefficients`.

    ``decay=False`` (weight_decay 0: ``c.shrink`` is 1 and ``c.l2`` 0 on every step) leaves the
    decay ops out, and ``rectify=False`` (``c.adaptive`` always 1) the rectification's multiply:
    the eager flavours skip those ops by their values anyway, but the fused flavour's graph
    cannot see the values, and every op left in its loop costs time on a memory-bound CPU.
    """
    params = list(params)
    if decay:
        params = ops.mul_scalar(params, c.shrink)
        grads = ops.new_add(grads, params, alpha=c.l2)
    exp_avg = ops.lerp(list(exp_avg), grads, c.ema1)
    residual = ops.new_sub(grads, exp_avg)
    exp_avg_var = ops.mul_scalar(list(exp_avg_var), c.beta2)
    exp_avg_var = ops.addcmul(exp_avg_var, residual, residual, c.ema2)
    exp_avg_var = ops.add_scalar(exp_avg_var, c.eps)
    if amsgrad:
        max_exp_avg_var = ops.maximum(list(max_exp_avg_var), exp_avg_var)
    # The rectified rule reads exp_avg_var even under amsgrad (the authors' quirk).
    second = max_exp_avg_var if amsgrad and not rectify else exp_avg_var
    denom = ops.new_sqrt(second)
    if rectify:
        denom = ops.mul_scalar(denom, c.adaptive)
    denom = ops.add_scalar(denom, c.denom_eps)
    params = ops.addcdiv(params, exp_avg, denom, -c.step_size)
    return AdaBeliefResult(params, exp_avg, exp_avg_var, max_exp_avg_var)


def adabelief(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_var: Sequence[Tensor],
    max_exp_avg_var: Sequence[Tensor] | None = None,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
    ops: Ops = FUNCTIONAL,
) -> AdaBeliefResult:
    """One AdaBelief step on lists of tensors; ``step`` is the 1-based count after this step.

    With ``ops=FUNCTIONAL`` (default) nothing is mutated and new lists are returned, so the rule
    runs under ``torch.func.vmap``. With ``FOREACH``, ``LOOP`` or ``FUSED`` the parameter and
    state lists are updated in place and returned. ``grads`` are never modified.
    """
    if amsgrad and max_exp_avg_var is None:
        raise ValueError("max_exp_avg_var is required when amsgrad=True")
    c = adabelief_coefficients(
        step, lr, beta1, beta2, eps, weight_decay, weight_decouple, fixed_decay, rectify,
        degenerated_to_sgd,
    )  # fmt: skip
    tensors = (params, grads, exp_avg, exp_avg_var, max_exp_avg_var)
    return ops.apply(
        adabelief_update, tensors, c, amsgrad=amsgrad, rectify=rectify, decay=weight_decay != 0
    )
