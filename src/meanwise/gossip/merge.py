"""Gossip merge rules: plain averaging and the variance-corrected merge of Tian et al. (2024).

Plain: ``W~ = beta * W_self + (1 - beta) * mean(received)`` (beta = 0: a plain mean of the
received models). Corrected, per tensor: ``W = (W~ - mean(W~)) * sqrt((v + eps) / (Var(W~) + eps))
+ mean(W~)``, with v the mean variance of the received models (or, as an option, the
beta-weighted variance including the node's own model). Both go through ``meanwise.average``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from meanwise.average import (
    average_state_dicts,
    member_variance,
    rescale_to_variance,
    weighted_average,
)
from meanwise.engine.layout import ParameterLayout, layer_variances

__all__ = [
    "merge_weights",
    "plain_merge",
    "corrected_merge",
    "merge_state_dicts",
    "merge_stacked",
    "layer_variances",  # defined in meanwise.engine.layout, re-exported for gossip users
    "MergeRule",
    "never_rescaled",
]

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


def merge_stacked(
    own: Tensor,
    received: Tensor,
    layout: ParameterLayout,
    beta: float = 0.5,
    *,
    correct_variance: bool = False,
    eps: float = 1e-4,
    include_self_variance: bool = False,
    rescale_biases: bool = True,
    received_variance: Tensor | None = None,
) -> Tensor:
    """:func:`merge_state_dicts` for k nodes at once, on flat parameter vectors.

    ``own``: ``[k, P]`` the merging nodes' models; ``received``: ``[k, m, P]`` their buffers
    (m models each); ``layout`` says which slice of P is which tensor (the correction is per
    tensor). ``received_variance``: optionally ``[k, m, L]``, the received models'
    :func:`layer_variances` (computed here if not given). The mean of the buffer, the
    beta-weighted combination with the own model and the variance targets are averages through
    :func:`~meanwise.average.weighted_average`, then one batched rescale per tensor.
    """
    if own.dim() != 2 or received.dim() != 3:
        raise ValueError(
            f"own must be [k, P] and received [k, m, P]; got {list(own.shape)}, "
            f"{list(received.shape)}"
        )
    k, m, p = received.shape
    if tuple(own.shape) != (k, p) or p != layout.numel:
        raise ValueError(
            f"own {list(own.shape)} and received {list(received.shape)} must share k and "
            f"P = layout.numel = {layout.numel}"
        )
    # weights in the models' dtype: float64 weights would promote (and copy) every member; for
    # float32 models that costs more than the whole merge and changes only the last bits.
    # beta*own + (1-beta)*mean(received) equals merge_weights' [beta, (1-beta)/m, ...] average.
    received_mean = weighted_average(received.transpose(0, 1))
    pair = torch.tensor([beta, 1.0 - beta], dtype=own.dtype)
    merged = weighted_average(torch.stack([own, received_mean]), pair).to(own.dtype)
    if not correct_variance:
        return merged
    n_layers = len(layout.names)
    if received_variance is None:
        received_variance = layer_variances(received, layout)
    elif tuple(received_variance.shape) != (k, m, n_layers):
        raise ValueError(
            f"received_variance must be [k, m, L] = {[k, m, n_layers]}; "
            f"got {list(received_variance.shape)}"
        )
    if include_self_variance:
        variances = torch.cat([layer_variances(own, layout)[:, None], received_variance], dim=1)
        weights = merge_weights(m, beta).to(variances.dtype)
        target = weighted_average(variances.transpose(0, 1), weights)  # [k, L]
    else:
        target = weighted_average(received_variance.transpose(0, 1))
    for layer, (name, piece, template) in enumerate(layout.entries()):
        if never_rescaled(name, template, rescale_biases):
            continue
        merged[:, piece] = rescale_to_variance(
            merged[:, piece], target[:, layer], eps, batch_dims=1
        )
    return merged


@dataclass(frozen=True)
class MergeRule:
    """How a node merges its buffer: ``beta`` is the own model's weight; ``correct_variance``
    switches on the rescaling of every merged tensor to the received models' variance (or,
    with ``include_self_variance``, the beta-weighted variance including the own model)."""

    beta: float = 0.5
    correct_variance: bool = False
    eps: float = 1e-4
    include_self_variance: bool = False
    rescale_biases: bool = True

    def __post_init__(self) -> None:
        merge_weights(1, self.beta)  # validates beta
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0; got {self.eps!r}")

    def predicted_variance_ratio(self, m: int) -> float:
        """Var(merged) / sigma^2 for m + 1 independent models of variance sigma^2 under the
        plain merge: beta^2 + (1 - beta)^2 / m (the paper's vanishing-variance factor)."""
        return self.beta**2 + (1.0 - self.beta) ** 2 / m

    def __call__(
        self,
        own: Tensor,
        received: Tensor,
        layout: ParameterLayout,
        received_variance: Tensor | None = None,
    ) -> Tensor:
        return merge_stacked(
            own,
            received,
            layout,
            self.beta,
            correct_variance=self.correct_variance,
            eps=self.eps,
            include_self_variance=self.include_self_variance,
            rescale_biases=self.rescale_biases,
            received_variance=received_variance,
        )
