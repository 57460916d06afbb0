"""The small tensor vocabulary every optimizer rule is written against, in three flavours.

A rule (AdaBelief, diffGrad, AdaHessian) is written once as a sequence of calls on an ``ops``
object over *lists* of tensors, and the flavour decides how those calls execute:

- :data:`FOREACH`: in place, with ``torch._foreach_*`` kernels (one launch per op for the whole
  list). This is what the ``torch.optim`` classes use: no allocation for the state updates.
- :data:`LOOP`: in place, one tensor at a time (PyTorch's ``foreach=False``).
- :data:`FUNCTIONAL`: out of place, one tensor at a time: every call returns new tensors and
  mutates nothing, so a rule runs under ``torch.func.vmap`` / ``grad`` (the federated and gossip
  simulators run one rule on stacked clients this way).

The contract that keeps one piece of math correct in all three: a rule always uses the value an
op *returns*, never reads a list after passing it as the first argument of an updating op, and
only updates lists it owns (optimizer state, the parameters, or a temporary made by a ``new_*``
op) -- never the caller's gradients.

Updating ops (first argument is updated in the in-place flavours): ``lerp``, ``mul_scalar``,
``add_scalar``, ``addcmul``, ``addcdiv``, ``add``, ``mul``, ``maximum``, ``abs``, ``sqrt``,
``sigmoid``, ``pow_scalar``, ``assign``, ``addcdiv_sigmoid`` (which may also overwrite its
second argument). Allocating ops: ``new_sub``, ``new_add``,
``new_sqrt``, ``new_pow``.

Scalars: a rule computes its step's numbers (bias corrections, step size, decay factors) on the
host and writes the tensor math without branches on them, e.g. ``mul_scalar(params, shrink)``
with ``shrink = 1`` when there is no decay. The eager flavours skip an op whose Python scalar
leaves its tensors unchanged (multiply by 1, add 0), so that costs no pass; the fused flavour
(:mod:`meanwise.functional.fused`) receives the numbers as 0-dim tensors, so one compiled graph
serves every step. An allocating op skipped this way returns its first argument, which is why
a rule never updates what an allocating op returned from the caller's tensors.

``apply(update, tensors, coefficients, **options)`` runs a rule's tensor part
``update(*tensors, coefficients, ops=..., **options)``: the eager flavours call it; the fused
flavour calls a ``torch.compile``d copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TensorList = list[Tensor]


def _is(scalar: object, value: float) -> bool:
    """Whether ``scalar`` is a Python number equal to ``value`` (never true of a tensor)."""
    return isinstance(scalar, int | float) and scalar == value


class _Eager:
    """What the eager flavours share: running a rule's tensor part directly."""

    def apply(self, update, tensors, coefficients, **options):
        return update(*tensors, coefficients, ops=self, **options)


class ForeachInPlace(_Eager):
    """In place over lists, with PyTorch's multi-tensor (foreach) kernels."""

    name = "foreach"
    in_place = True

    @staticmethod
    def lerp(xs: TensorList, ys: Sequence[Tensor], weight: float) -> TensorList:
        torch._foreach_lerp_(xs, ys, weight)
        return xs

    @staticmethod
    def mul_scalar(xs: TensorList, scalar: float) -> TensorList:
        if not _is(scalar, 1.0):
            torch._foreach_mul_(xs, scalar)
        return xs

    @staticmethod
    def add_scalar(xs: TensorList, scalar: float) -> TensorList:
        if not _is(scalar, 0.0):
            torch._foreach_add_(xs, scalar)
        return xs

    @staticmethod
    def addcmul(xs: TensorList, a: Sequence[Tensor], b: Sequence[Tensor], value: float):
        torch._foreach_addcmul_(xs, a, b, value=value)
        return xs

    @staticmethod
    def addcdiv(xs: TensorList, a: Sequence[Tensor], b: Sequence[Tensor], value: float):
        if not _is(value, 0.0):
            torch._foreach_addcdiv_(xs, a, b, value=value)
        return xs

    @staticmethod
    def add(xs: TensorList, ys: Sequence[Tensor], alpha: float = 1.0) -> TensorList:
        if not _is(alpha, 0.0):
            torch._foreach_add_(xs, ys, alpha=alpha)
        return xs

    @staticmethod
    def addcdiv_sigmoid(
        xs: TensorList, zs: TensorList, a: Sequence[Tensor], b: Sequence[Tensor], value: float
    ) -> TensorList:
        """``xs += value * sigmoid(zs) * a / b``, with ``zs`` overwritten."""
        torch._foreach_sigmoid_(zs)
        torch._foreach_mul_(zs, a)
        torch._foreach_addcdiv_(xs, zs, b, value=value)
        return xs

    @staticmethod
    def mul(xs: TensorList, ys: Sequence[Tensor]) -> TensorList:
        torch._foreach_mul_(xs, ys)
        return xs

    @staticmethod
    def maximum(xs: TensorList, ys: Sequence[Tensor]) -> TensorList:
        torch._foreach_maximum_(xs, ys)
        return xs

    @staticmethod
    def abs(xs: TensorList) -> TensorList:
        torch._foreach_abs_(xs)
        return xs

    @staticmethod
    def sqrt(xs: TensorList) -> TensorList:
        torch._foreach_sqrt_(xs)
        return xs

    @staticmethod
    def sigmoid(xs: TensorList) -> TensorList:
        torch._foreach_sigmoid_(xs)
        return xs

    @staticmethod
    def pow_scalar(xs: TensorList, exponent: float) -> TensorList:
        torch._foreach_pow_(xs, exponent)
        return xs

    @staticmethod
    def assign(xs: TensorList, ys: Sequence[Tensor]) -> TensorList:
        torch._foreach_copy_(xs, ys)
        return xs

    @staticmethod
    def new_sub(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_sub(xs, ys))

    @staticmethod
    def new_add(xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float = 1.0) -> TensorList:
        if _is(alpha, 0.0):
            return list(xs)
        return list(torch._foreach_add(xs, ys, alpha=alpha))

    @staticmethod
    def new_sqrt(xs: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_sqrt(xs))

    @staticmethod
    def new_pow(xs: Sequence[Tensor], exponent: float) -> TensorList:
        return list(torch._foreach_pow(xs, exponent))


class LoopInPlace(_Eager):
    """In place, one tensor at a time (for lists of very differently sized tensors)."""

    name = "loop"
    in_place = True

    @staticmethod
    def lerp(xs, ys, weight):
        for x, y in zip(xs, ys, strict=True):
            x.lerp_(y, weight)
        return xs

    @staticmethod
    def mul_scalar(xs, scalar):
        if _is(scalar, 1.0):
            return xs
        for x in xs:
            x.mul_(scalar)
        return xs

    @staticmethod
    def add_scalar(xs, scalar):
        if _is(scalar, 0.0):
            return xs
        for x in xs:
            x.add_(scalar)
        return xs

    @staticmethod
    def addcmul(xs, a, b, value):
        for x, u, v in zip(xs, a, b, strict=True):
            x.addcmul_(u, v, value=value)
        return xs

    @staticmethod
    def addcdiv(xs, a, b, value):
        if _is(value, 0.0):
            return xs
        for x, u, v in zip(xs, a, b, strict=True):
            x.addcdiv_(u, v, value=value)
        return xs

    @staticmethod
    def add(xs, ys, alpha=1.0):
        if _is(alpha, 0.0):
            return xs
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=alpha)
        return xs

    @staticmethod
    def addcdiv_sigmoid(xs, zs, a, b, value):
        for x, z, u, v in zip(xs, zs, a, b, strict=True):
            x.addcdiv_(z.sigmoid_().mul_(u), v, value=value)
        return xs

    @staticmethod
    def mul(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.mul_(y)
        return xs

    @staticmethod
    def maximum(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            torch.maximum(x, y, out=x)
        return xs

    @staticmethod
    def abs(xs):
        for x in xs:
            x.abs_()
        return xs

    @staticmethod
    def sqrt(xs):
        for x in xs:
            x.sqrt_()
        return xs

    @staticmethod
    def sigmoid(xs):
        for x in xs:
            x.sigmoid_()
        return xs

    @staticmethod
    def pow_scalar(xs, exponent):
        for x in xs:
            x.pow_(exponent)
        return xs

    @staticmethod
    def assign(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)
        return xs

    @staticmethod
    def new_sub(xs, ys):
        return [x - y for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def new_add(xs, ys, alpha=1.0):
        if _is(alpha, 0.0):
            return list(xs)
        return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def new_sqrt(xs):
        return [x.sqrt() for x in xs]

    @staticmethod
    def new_pow(xs, exponent):
        return [x.pow(exponent) for x in xs]


class Functional(_Eager):
    """Out of place, one tensor at a time: pure, so it composes with torch.func transforms."""

    name = "functional"
    in_place = False

    @staticmethod
    def lerp(xs, ys, weight):
        return [torch.lerp(x, y, weight) for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def mul_scalar(xs, scalar):
        if _is(scalar, 1.0):
            return list(xs)
        return [x * scalar for x in xs]

    @staticmethod
    def add_scalar(xs, scalar):
        if _is(scalar, 0.0):
            return list(xs)
        return [x + scalar for x in xs]

    @staticmethod
    def addcmul(xs, a, b, value):
        return [torch.addcmul(x, u, v, value=value) for x, u, v in zip(xs, a, b, strict=True)]

    @staticmethod
    def addcdiv(xs, a, b, value):
        if _is(value, 0.0):
            return list(xs)
        return [torch.addcdiv(x, u, v, value=value) for x, u, v in zip(xs, a, b, strict=True)]

    @staticmethod
    def add(xs, ys, alpha=1.0):
        if _is(alpha, 0.0):
            return list(xs)
        return [torch.add(x, y, alpha=alpha) for x, y in zip(xs, ys, strict=True)]

    new_add = add

    @staticmethod
    def addcdiv_sigmoid(xs, zs, a, b, value):
        return [
            torch.addcdiv(x, torch.sigmoid(z) * u, v, value=value)
            for x, z, u, v in zip(xs, zs, a, b, strict=True)
        ]

    @staticmethod
    def mul(xs, ys):
        return [x * y for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def maximum(xs, ys):
        return [torch.maximum(x, y) for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def abs(xs):
        return [x.abs() for x in xs]

    @staticmethod
    def sqrt(xs):
        return [x.sqrt() for x in xs]

    new_sqrt = sqrt

    @staticmethod
    def sigmoid(xs):
        return [torch.sigmoid(x) for x in xs]

    @staticmethod
    def pow_scalar(xs, exponent):
        return [x.pow(exponent) for x in xs]

    new_pow = pow_scalar

    @staticmethod
    def assign(xs, ys):
        return list(ys)

    @staticmethod
    def new_sub(xs, ys):
        return [x - y for x, y in zip(xs, ys, strict=True)]


FOREACH = ForeachInPlace()
LOOP = LoopInPlace()
FUNCTIONAL = Functional()
Ops = ForeachInPlace | LoopInPlace | Functional


def resolve_ops(ops: str | Ops) -> Ops:
    """Accept an ops object or its name ("foreach", "loop", "functional", "fused")."""
    if isinstance(ops, ForeachInPlace | LoopInPlace | Functional):
        return ops
    from meanwise.functional.fused import FUSED  # it builds on this module

    table = {"foreach": FOREACH, "loop": LOOP, "functional": FUNCTIONAL, "fused": FUSED}
    if ops not in table:
        raise ValueError(f"ops must be one of {sorted(table)} or an ops object; got {ops!r}")
    return table[ops]
