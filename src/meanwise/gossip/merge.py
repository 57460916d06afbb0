"""Gossip merge rules: plain averaging and the variance-corrected merge of Tian et al. (2024).

Plain: ``W~ = beta * W_self + (1 - beta) * mean(received)`` (beta = 0: a plain mean of the
received models). Corrected, per tensor: ``W = (W~ - mean(W~)) * sqrt((v + eps) / (Var(W~) + eps))
+ mean(W~)``, with v the mean variance of the received models (or, as an option, the
beta-weighted variance including the node's own model). Both go through ``meanwise.average``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from meanwise.average import (
    average_state_dicts,
    member_variance,
    rescale_to_variance,
    weighted_average,
)

__all__ = ["merge_weights", "plain_merge", "corrected_merge", "merge_state_dicts", "never_rescaled"]

# BatchNorm's running statistics describe activations, not weights: rescaling them is wrong.
_STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def merge_weights(n_received: int, beta: float) -> Tensor:
    """``[beta, (1-beta)/m, ..., (1-beta)/m]``: the own model first, then the m received."""
    if n_received < 1:
        raise ValueError(f"a merge needs at least one received model; got {n_received}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta (the own model's weight) must be in [0, 1); got {beta!r}")
    return torch.tensor([beta] + [(1.0 - beta) / n_received] * n_received, dtype=torch.float64)


def plain_merge(own: Tensor, received: Sequence[Tensor], beta: float = 0.5) -> Tensor:
    """``beta * own + (1 - beta) * mean(received)``."""
    return weighted_average([own, *received], merge_weights(len(received), beta))


def _target_variance(own, received, beta, include_self_variance):
    if include_self_variance:
        return member_variance([own, *received], merge_weights(len(received), beta))
    return member_variance(list(received))


def corrected_merge(
    own: Tensor,
    received: Sequence[Tensor],
    beta: float = 0.5,
    eps: float = 1e-4,
    include_self_variance: bool = False,
) -> Tensor:
    """The plain merge rescaled to the received models' mean variance (tensors of one element
    are returned as merged)."""
    merged = plain_merge(own, received, beta)
    if merged.numel() < 2:
        return merged
    target = _target_variance(own, received, beta, include_self_variance)
    return rescale_to_variance(merged, target, eps)


def never_rescaled(key: str, tensor: Tensor, rescale_biases: bool = True) -> bool:
    """Whether a state-dict entry keeps its merged value: one-element tensors, integer buffers,
    BatchNorm running statistics, and (if ``rescale_biases`` is False) biases."""
    return (
        tensor.numel() < 2
        or not tensor.is_floating_point()
        or key.endswith(_STATISTICS_SUFFIXES)
        or (not rescale_biases and key.endswith("bias"))
    )


def merge_state_dicts(
    own: Mapping[str, Tensor],
    received: Sequence[Mapping[str, Tensor]],
    beta: float = 0.5,
    *,
    correct_variance: bool = False,
    eps: float = 1e-4,
    include_self_variance: bool = False,
    rescale_biases: bool = True,
) -> dict[str, Tensor]:
    """Merge a node's state dict with the received ones (keys, shapes, dtypes validated by
    ``average_state_dicts``; integer buffers come from the node's own state)."""
    weights = merge_weights(len(received), beta)
    merged = average_state_dicts([own, *received], weights)
    if not correct_variance:
        return merged
    for key, tensor in merged.items():
        if never_rescaled(key, tensor, rescale_biases):
            continue
        target = _target_variance(own[key], [r[key] for r in received], beta, include_self_variance)
        merged[key] = rescale_to_variance(tensor, target, eps).to(tensor.dtype)
    return merged
