"""The local update rules the engine trains with: a registry over the pure rules of
``meanwise.functional``, and :class:`LocalTraining`, the recipe a simulator hands its clients.

A rule registered once (:func:`register_rule`) brings its number of optimizer-state slots, its
step and, for a second-order rule, that it needs the Hutchinson Hessian diagonal: every
execution of :class:`~meanwise.engine.local_training.LocalTrainer` then runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import Tensor

from meanwise.functional.adabelief import adabelief
from meanwise.functional.adahessian import adahessian
from meanwise.functional.adam import adam
from meanwise.functional.diffgrad import diffgrad
from meanwise.functional.sgd import sgd

__all__ = ["LocalRule", "LocalTraining", "register_rule", "registered_rules", "RULES"]

Params: TypeAlias = list[Tensor]
State: TypeAlias = list[list[Tensor]]  # one list of tensors (like the params) per state slot


@dataclass(frozen=True)
class LocalRule:
    """A functional update rule as local training runs it.

    ``step(params, grads, state, step, lr, options)`` returns the new params and state (pure);
    ``state_slots`` is how many tensors per parameter its state holds (zeros at the start of
    every round); ``defaults`` are options the rule fills in when the recipe leaves them out.
    A rule with ``hessian=True`` takes the Hutchinson Hessian diagonal (laid out like the
    params) as a seventh argument; the executions that can draw the probes estimate it.
    """

    name: str
    state_slots: int
    step: Callable[..., tuple[Params, State]]
    defaults: dict[str, Any] = field(default_factory=dict)
    hessian: bool = False


_REGISTRY: dict[str, LocalRule] = {}


def register_rule(rule: LocalRule) -> LocalRule:
    """Make ``rule`` available to :class:`LocalTraining` under ``rule.name``."""
    if not isinstance(rule, LocalRule):
        raise TypeError(f"rule must be a LocalRule; got {type(rule).__name__}")
    if rule.name in _REGISTRY:
        raise ValueError(f"a local rule named {rule.name!r} is already registered")
    if isinstance(rule.state_slots, bool) or not isinstance(rule.state_slots, int):
        raise TypeError(f"state_slots must be an int; got {rule.state_slots!r}")
    if rule.state_slots < 0:
        raise ValueError(f"state_slots must be >= 0; got {rule.state_slots}")
    _REGISTRY[rule.name] = rule
    return rule


def registered_rules() -> tuple[str, ...]:
    """The names :class:`LocalTraining` accepts as ``rule``."""
    return tuple(_REGISTRY)


def _sgd(params, grads, state, step, lr, options):
    return sgd(params, grads, None, step=step, lr=lr, **options).params, state


def _momentum(params, grads, state, step, lr, options):
    out = sgd(params, grads, state[0], step=step, lr=lr, **options)
    return out.params, [out.momentum_buffer]


def _adam(params, grads, state, step, lr, options):
    out = adam(params, grads, *state, step=step, lr=lr, **options)
    return out.params, [out.exp_avg, out.exp_avg_sq]


def _adabelief(params, grads, state, step, lr, options):
    out = adabelief(params, grads, *state, step=step, lr=lr, **options)
    return out.params, [out.exp_avg, out.exp_avg_var]


def _diffgrad(params, grads, state, step, lr, options):
    out = diffgrad(params, grads, *state, step=step, lr=lr, **options)
    return out.params, [out.exp_avg, out.exp_avg_sq, out.previous_grad]


#: AdaHessian's options that configure the Hessian estimate, not the update
HESSIAN_OPTIONS = ("n_samples", "spatial_average")


def _adahessian(params, grads, state, step, lr, options, hessian_diag):
    rule_options = {k: v for k, v in options.items() if k not in HESSIAN_OPTIONS}
    out = adahessian(params, grads, hessian_diag, *state, step=step, lr=lr, **rule_options)
    return out.params, [out.exp_avg, out.exp_hessian_diag_sq]


for _rule in (
    LocalRule("sgd", 0, _sgd),
    LocalRule("momentum", 1, _momentum, {"momentum": 0.9}),
    LocalRule("adam", 2, _adam),
    LocalRule("adabelief", 2, _adabelief),
    LocalRule("diffgrad", 3, _diffgrad),
    LocalRule("adahessian", 2, _adahessian, hessian=True),
):
    register_rule(_rule)

#: the built-in rules (see :func:`registered_rules` for those registered since)
RULES = registered_rules()


@dataclass(frozen=True)
class LocalTraining:
    """What every client does in a round: ``steps`` steps of ``rule`` at ``lr`` on minibatches.

    ``options`` are passed to the rule (e.g. ``{"momentum": 0.9}`` for ``"momentum"``, betas for
    ``"adam"``: ``{"beta1": 0.9, "beta2": 0.999}``; for ``"adahessian"`` also ``n_samples``,
    the probes per Hessian estimate, and ``spatial_average``). The local optimizer state starts
    from zero every round, as in FedAvg.
    """

    rule: str = "sgd"
    lr: float = 0.1
    steps: int = 5
    batch_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in _REGISTRY:
            raise ValueError(f"rule must be one of {registered_rules()}; got {self.rule!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}")
        bad = {
            k: v for k, v in self.options.items() if isinstance(v, float) and not math.isfinite(v)
        }
        if bad:
            raise ValueError(f"options must be finite; got {bad}")
        if int(self.steps) < 1 or int(self.batch_size) < 1:
            raise ValueError(
                f"steps and batch_size must be positive; got {self.steps}, {self.batch_size}"
            )
        if self.options.get("amsgrad"):
            raise ValueError("amsgrad is not supported for local training")
        if self.needs_hessian:
            n = self.options.get("n_samples", 1)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"options['n_samples'] must be an int >= 1; got {n!r}")
            if "update_each" in self.options:
                raise ValueError(
                    "options['update_each'] is not supported for local training: every local "
                    "step estimates the Hessian"
                )

    @property
    def state_slots(self) -> int:
        """How many optimizer-state tensors per parameter the rule keeps."""
        return _REGISTRY[self.rule].state_slots

    @property
    def needs_hessian(self) -> bool:
        """Whether each step needs the Hutchinson Hessian diagonal (AdaHessian)."""
        return _REGISTRY[self.rule].hessian

    @property
    def hessian_samples(self) -> int:
        return int(self.options.get("n_samples", 1))

    @property
    def spatial_average(self) -> bool:
        return bool(self.options.get("spatial_average", True))

    def init_state(self, params: list[Tensor]) -> list[list[Tensor]]:
        return [[torch.zeros_like(p) for p in params] for _ in range(self.state_slots)]

    def apply(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: list[list[Tensor]],
        step: int,
        hessian_diag: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """One step of the rule (pure: returns new params and state); a rule that needs the
        Hessian diagonal gets ``hessian_diag`` (laid out like ``params``)."""
        rule = _REGISTRY[self.rule]
        options = {**rule.defaults, **self.options}
        if not rule.hessian:
            return rule.step(params, grads, state, step, self.lr, options)
        if hessian_diag is None:
            raise ValueError(f"rule {self.rule!r} needs hessian_diag (the Hessian diagonal)")
        return rule.step(params, grads, state, step, self.lr, options, hessian_diag)
