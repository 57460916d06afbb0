"""``DiffGrad``: the authors' v2 rule as a torch.optim.Optimizer (= torch-optimizer's DiffGrad)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from meanwise.functional import diffgrad
from meanwise.optim._base import (
    Closure,
    FunctionalOptimizer,
    as_learning_rate,
    check_fused,
    check_hyperparameters,
)


class DiffGrad(FunctionalOptimizer):
    """diffGrad (Dubey et al., IEEE TNNLS 2019): Adam whose first moment is damped by the
    friction ``sigmoid(|g_{t-1} - g_t|)``, so steps shrink where the gradient stops changing.

    Numerically identical to torch-optimizer 0.3.0's ``DiffGrad`` (the authors' v2 rule), but
    with multi-tensor kernels, one previous-gradient buffer updated in place (no clone per
    step), and the gradients left untouched.

    Args:
        params: parameters or param groups.
        lr, betas, eps: as in Adam (eps is added to ``sqrt(v)``; the bias corrections are in
            the step size).
        weight_decay: L2, added to the gradient before the friction is computed.
        foreach: multi-tensor kernels (None: yes, unless the group mixes devices or dtypes).
        fused: run the rule compiled with ``torch.compile`` into one loop per parameter (as
            torch.optim's ``fused=True``): compiled on the first step, once per device, dtype,
            structural option set and parameter shapes (the step's numbers, ``lr`` included,
            are 0-dim tensors: schedulers never recompile), equal to the eager rule to float
            rounding. Where nothing can be compiled it warns and runs the foreach path. Not
            with ``foreach=True``.
        differentiable: only False (the step runs under ``torch.no_grad``), as a keyword so
            code written for torch.optim gets a clear error instead of a TypeError.
        maximize: maximize the objective (step along the gradient), as in torch.optim.
        check_finite: raise ValueError naming the parameter if a gradient is nan/inf.
        state_in_float32: for float16/bfloat16 parameters, keep the state in float32 (the
            update is always computed in float32 for them); False keeps it in their dtype.

    ``lr`` may be a one-element tensor (as torch.optim accepts). Complex parameters are
    optimized as their ``torch.view_as_real`` pairs, torch.optim's convention.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        maximize: bool = False,
        check_finite: bool = False,
        state_in_float32: bool = True,
    ) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        check_fused(fused, foreach, differentiable)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            fused=fused,
            maximize=maximize,
            check_finite=check_finite,
            state_in_float32=state_in_float32,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Closure = None):
        """One step for every parameter with a gradient; returns the closure's loss."""
        loss = self._run_closure(closure)
        for group_index, group in enumerate(self.param_groups):
            params, grads = self._gradients(group_index, group)
            if not params:
                continue
            keys = ("exp_avg", "exp_avg_sq", "previous_grad")
            self._init_state(group, params, keys)
            beta1, beta2 = group["betas"]
            self._apply_rule(
                group,
                params,
                lambda indices, states, params=params, grads=grads, keys=keys: (
                    [[params[i] for i in indices], [grads[i] for i in indices]]
                    + [[s[key] for s in states] for key in keys]
                ),
                diffgrad,
                lr=as_learning_rate(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        return loss
