"""The IMLE objective of Social-Implicit: pull the sample nearest the truth toward it.

For K sampled futures (displacements [K, T, N, 2]) the sample with the smallest summed absolute
error to the true displacements — over the whole scene, not per pedestrian — is trained with an
L1 loss plus small geometric regularisers on its T*N displacement vectors: the mean absolute
difference of their pairwise distances and of their pairwise angles to the truth's, and a
triplet term (L1 to the second-nearest sample minus L1 to the farthest).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["imle_loss", "pairwise_angles"]


def pairwise_angles(vectors: Tensor, eps: float = 1e-8) -> Tensor:
    """[M, 2] -> [M, M] angles between the vectors (acos of the clamped cosine similarity)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=eps)
    return torch.acos((unit @ unit.T).clamp(-1.0 + eps, 1.0 - eps))


def imle_loss(
    pred: Tensor,
    target: Tensor,
    *,
    distance_weight: float = 1e-4,
    angle_weight: float = 1e-4,
    triplet_weight: float = 1e-4,
) -> tuple[Tensor, int]:
    """(loss, index of the chosen sample) for pred [K, T, N, 2] and target [T, N, 2]."""
    if pred.dim() != 4 or pred.shape[1:] != target.shape or pred.shape[-1] != 2:
        raise ValueError(
            f"pred must be [K, T, N, 2] matching target [T, N, 2]; got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.shape[0] < 2:
        raise ValueError(f"pred needs K >= 2 samples; got {pred.shape[0]}")
    order = torch.argsort((pred - target).abs().sum(dim=(1, 2, 3)))
    chosen = pred[order[0]]
    loss = (chosen - target).abs().mean()
    loss = loss + triplet_weight * (
        (chosen - pred[order[1]]).abs().mean() - (chosen - pred[order[-1]]).abs().mean()
    )
    mine, truth = chosen.reshape(-1, 2), target.reshape(-1, 2)
    if distance_weight:
        loss = (
            loss
            + distance_weight * (torch.cdist(mine, mine) - torch.cdist(truth, truth)).abs().mean()
        )
    if angle_weight:
        loss = loss + angle_weight * (pairwise_angles(mine) - pairwise_angles(truth)).abs().mean()
    return loss, int(order[0])
