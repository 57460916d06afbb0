"""SGD with optional momentum, Nesterov and L2 weight decay as one pure rule (torch.optim.SGD).

The federated simulators run it on stacked client parameters; the in-place flavours make it
usable over lists as well. Momentum follows PyTorch: on the first step the buffer is the
gradient itself (no dampening), afterwards ``buf = momentum·buf + (1 − dampening)·g``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from meanwise.functional._ops import FUNCTIONAL, Ops

__all__ = ["SGDResult", "sgd"]


class SGDResult(NamedTuple):
    params: list[Tensor]
    momentum_buffer: list[Tensor] | None


def sgd(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffer: Sequence[Tensor] | None = None,
    *,
    step: int,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    ops: Ops = FUNCTIONAL,
) -> SGDResult:
    """One SGD step; ``step`` is the 1-based count after this step (it decides buffer init).

    ``momentum_buffer`` is required when ``momentum != 0`` (its values are ignored at step 1,
    where PyTorch initialises the buffer with the gradient). ``grads`` are never modified.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov requires momentum > 0 and dampening = 0")
    params = list(params)
    if weight_decay != 0:
        grads = ops.new_add(grads, params, alpha=weight_decay)
    buffer = None
    direction = list(grads)
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum != 0")
        if step == 1:
            buffer = ops.assign(list(momentum_buffer), grads)
        else:
            buffer = ops.mul_scalar(list(momentum_buffer), momentum)
            buffer = ops.add(buffer, grads, alpha=1.0 - dampening)
        direction = ops.new_add(grads, buffer, alpha=momentum) if nesterov else buffer
    params = ops.add(params, direction, alpha=-lr)
    return SGDResult(params, buffer)
