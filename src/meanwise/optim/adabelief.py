"""``AdaBelief``: a drop-in torch.optim.Optimizer for adabelief-pytorch 0.2.1."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from meanwise.functional import adabelief
from meanwise.optim._base import (
    Closure,
    FunctionalOptimizer,
    as_learning_rate,
    check_fused,
    check_hyperparameters,
)


class AdaBelief(FunctionalOptimizer):
    """AdaBelief (Zhuang et al., NeurIPS 2020): Adam with the step scaled by the *belief* in the
    gradient, the EMA of ``(g - m)^2``, instead of the EMA of ``g^2``.

    Same argument names, defaults and numbers as the authors' adabelief-pytorch 0.2.1, in every
    option combination. Unlike that package, every option lives in the param groups (so a
    ``state_dict`` round-trip restores them), the gradients are never modified, and the steps
    run as multi-tensor kernels.

    Args:
        params: parameters or param groups (``model.named_parameters()`` works too).
        lr: learning rate.
        betas: EMA coefficients of the gradient and of the belief.
        eps: added to the belief inside its EMA every step (effective ``eps / (1 - beta2)``
            after bias correction) and again to the denominator, as in the authors' code.
        weight_decay: decoupled (AdamW-style) if ``weight_decouple`` else L2 added to the
            gradient.
        amsgrad: keep the running maximum of the belief. Quirk kept from the authors' code: it
            has no effect on the parameters while ``rectify=True``.
        weight_decouple, fixed_decay: decoupled decay multiplies the weights by
            ``1 - lr * wd`` (``1 - wd`` if ``fixed_decay``).
        rectify: RAdam's variance rectification (SGD-with-momentum steps until ``rho_t >= 5``).
        degenerated_to_sgd: take those SGD steps (else no step) while not rectified.
        print_change_log: accepted for compatibility and ignored.
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
        eps: float = 1e-16,
        weight_decay: float = 0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        print_change_log: bool = True,
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
            amsgrad=amsgrad,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
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
            amsgrad = group["amsgrad"]
            keys = ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if amsgrad else ())
            self._init_state(group, params, keys)
            beta1, beta2 = group["betas"]
            self._apply_rule(
                group,
                params,
                lambda indices, states, params=params, grads=grads, keys=keys: (
                    [[params[i] for i in indices], [grads[i] for i in indices]]
                    + [[s[key] for s in states] for key in keys]
                ),
                adabelief,
                lr=as_learning_rate(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=amsgrad,
                weight_decouple=group["weight_decouple"],
                fixed_decay=group["fixed_decay"],
                rectify=group["rectify"],
                degenerated_to_sgd=group["degenerated_to_sgd"],
            )
        return loss
