"""The IMLE objective of Social-Implicit: pull the sample nearest the truth toward it.

For K sampled futures (displacements [K, T, N, 2]) the sample with the smallest summed absolute
error to the true displacements — over the whole scene, not per pedestrian — is trained with an
L1 loss plus small geometric regularisers on its T*N displacement vectors: the mean absolute
difference of their pairwise distances and of their pairwise angles to the truth's, and a
triplet term (L1 to the second-nearest sample minus L1 to the farthest).

`imle_losses` computes it for many scenes packed along the pedestrian axis at once (one loss
per scene, each exactly the one-scene loss); `imle_loss` is the one-scene case.

Angles. The reference takes acos of the cosine similarity clamped to [-1 + 1e-8, 1 - 1e-8]. In
float32 that clamp rounds to +-1, where acos' derivative is infinite (times the clamp's zero
gradient: NaN), and the first step turns the weights into NaN. Here the angle is
atan2(|cross|, dot) of the unit vectors, whose derivative is bounded in every dtype, clamped to
[acos(1 - 1e-8), pi - acos(1 - 1e-8)] = [1.414e-4, pi - 1.414e-4]: since acos is monotone that
is the reference's value, and its zero gradient inside the clamped ranges (near-parallel pairs,
common in walking data, and every vector's angle to itself). A vector shorter than 1e-8 (a
pedestrian standing still) is at pi/2 from every vector, itself included, as in the reference
(its normalised vector is 0, acos(0) = pi/2), with zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["imle_loss", "imle_losses", "pairwise_angles", "pairwise_distances"]

_EPS = 1e-8


def pairwise_angles(vectors: Tensor, eps: float = _EPS) -> Tensor:
    """[..., M, 2] -> [..., M, M] angles between the vectors: atan2 of the unit vectors' cross
    and dot products clamped to [acos(1 - eps), pi - acos(1 - eps)] (the reference's acos of
    the clamped cosine); pi/2 where either vector is shorter than `eps`."""
    norm = vectors.norm(dim=-1, keepdim=True)
    short = norm < eps
    unit = vectors / norm.clamp(min=eps)
    dot = unit @ unit.transpose(-1, -2)
    perpendicular = torch.stack([unit[..., 1], -unit[..., 0]], dim=-1)
    cross = unit @ perpendicular.transpose(-1, -2)
    degenerate = short | short.transpose(-1, -2)
    # atan2's derivative at (0, 0) is 0/0: feed it (0, 1) there, the value is replaced anyway
    dot = torch.where(degenerate, torch.ones_like(dot), dot)
    smallest = math.acos(1.0 - eps)  # the reference's cosine clamp as an angle range
    angles = torch.atan2(cross.abs(), dot).clamp(smallest, math.pi - smallest)
    return torch.where(degenerate, torch.full_like(angles, math.pi / 2), angles)


def pairwise_distances(vectors: Tensor) -> Tensor:
    """[..., M, 2] -> [..., M, M] Euclidean distances, from the differences (not the
    |a|^2 + |b|^2 - 2ab expansion, whose cancellation is large in float32)."""
    return torch.cdist(vectors, vectors, compute_mode="donot_use_mm_for_euclid_dist")


def imle_losses(
    pred: Tensor,
    target: Tensor,
    sizes: Sequence[int],
    *,
    distance_weight: float = 1e-4,
    angle_weight: float = 1e-4,
    triplet_weight: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """(losses [S], index of each scene's chosen sample [S]) for S scenes packed along the
    pedestrian axis: pred [K, T, sum(sizes), 2], target [T, sum(sizes), 2].

    Sums run per pedestrian first and then per scene, so each scene's ranking is that of its
    own errors; ties go to the lower sample index (a stable sort), which matters at the start
    of training, when the noise weight is still zero and all K samples are equal.
    """
    if pred.dim() != 4 or pred.shape[1:] != target.shape or pred.shape[-1] != 2:
        raise ValueError(
            f"pred must be [K, T, N, 2] matching target [T, N, 2]; got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.shape[0] < 2:
        raise ValueError(f"pred needs K >= 2 samples; got {pred.shape[0]}")
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1 or sum(sizes) != target.shape[1]:
        raise ValueError(
            f"sizes must be positive pedestrian counts summing to {target.shape[1]}; "
            f"got {sizes[:8]}"
        )
    k, steps, count = pred.shape[0], pred.shape[1], len(sizes)
    scene = torch.repeat_interleave(torch.arange(count), torch.tensor(sizes))
    columns = torch.arange(target.shape[1])

    def per_scene(values: Tensor) -> Tensor:  # [..., M] -> [..., S] sums over each scene
        out = values.new_zeros(*values.shape[:-1], count)
        return out.index_add_(-1, scene, values)

    error = per_scene((pred - target).abs().sum(dim=(1, 3)))  # [K, S]
    order = torch.sort(error.detach(), dim=0, stable=True).indices  # [K, S]

    def sample_of(rank: int) -> Tensor:  # [T, M, 2]: each column's scene's rank-th sample
        return pred[order[rank][scene], :, columns].transpose(0, 1)

    chosen = sample_of(0)
    elements = torch.tensor(sizes, dtype=pred.dtype) * (steps * 2)

    def l1(other: Tensor) -> Tensor:  # [S] mean absolute difference per scene
        return per_scene((chosen - other).abs().sum(dim=(0, 2))) / elements

    losses = l1(target)
    if triplet_weight:
        losses = losses + triplet_weight * (l1(sample_of(1)) - l1(sample_of(k - 1)))
    if distance_weight or angle_weight:
        geometry = losses.new_zeros(count)
        starts = torch.tensor([0, *sizes]).cumsum(0)
        # scenes of one size stack into one batch of [T * N, 2] vector sets: exact, no padding
        for n in sorted(set(sizes)):
            group = [s for s in range(count) if sizes[s] == n]
            index = (starts[group][:, None] + torch.arange(n)).reshape(-1)
            mine = chosen[:, index].view(steps, len(group), n, 2).transpose(0, 1)
            truth = target[:, index].view(steps, len(group), n, 2).transpose(0, 1)
            mine, truth = mine.reshape(len(group), -1, 2), truth.reshape(len(group), -1, 2)
            term = mine.new_zeros(len(group))
            if distance_weight:
                gap = pairwise_distances(mine) - pairwise_distances(truth)
                term = term + distance_weight * gap.abs().mean(dim=(1, 2))
            if angle_weight:
                gap = pairwise_angles(mine) - pairwise_angles(truth)
                term = term + angle_weight * gap.abs().mean(dim=(1, 2))
            geometry = geometry.index_add(0, torch.tensor(group), term)
        losses = losses + geometry
    return losses, order[0]


def imle_loss(
    pred: Tensor,
    target: Tensor,
    *,
    distance_weight: float = 1e-4,
    angle_weight: float = 1e-4,
    triplet_weight: float = 1e-4,
) -> tuple[Tensor, int]:
    """(loss, index of the chosen sample) for one scene: pred [K, T, N, 2], target [T, N, 2]."""
    if target.dim() != 3:
        raise ValueError(
            f"pred must be [K, T, N, 2] matching target [T, N, 2]; got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    losses, chosen = imle_losses(
        pred,
        target,
        [target.shape[1]],
        distance_weight=distance_weight,
        angle_weight=angle_weight,
        triplet_weight=triplet_weight,
    )
    return losses[0], int(chosen[0])
