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


def pairwise_distances(vectors: Tensor, others: Tensor | None = None) -> Tensor:
    """[..., M, 2] (and [..., P, 2]) -> [..., M, P] Euclidean distances between the vectors
    (and `others`, default the vectors themselves), from the differences (not the
    |a|^2 + |b|^2 - 2ab expansion, whose cancellation is large in float32)."""
    others = vectors if others is None else others
    return torch.cdist(vectors, others, compute_mode="donot_use_mm_for_euclid_dist")


# pairs in one [G, rows, cols] block: ~2 MB in float64, small enough that the allocator reuses
# it from block to block (fresh ~60 MB pair matrices cost more in page faults than in
# arithmetic) and that it stays in cache across the block's in-place passes
_PAIR_BLOCK = 1 << 18


def _folded_angles(alpha_rows: Tensor, alpha: Tensor, smallest: float) -> tuple[Tensor, Tensor]:
    """(angles [G, R, M] clamped to [smallest, pi - smallest], d angle / d alpha_i with 0 where
    clamped). In 2-D the angle between two vectors is their directions' difference
    u = alpha_i - alpha_j folded into [0, pi], pi - |pi - |u||: atan2(|cross|, dot)."""
    u = alpha_rows[:, :, None] - alpha[:, None, :]
    slope = u.sign()
    folded = u.abs_().sub_(math.pi)  # |u| - pi
    slope.mul_(folded.sign()).neg_()  # sign(u) sign(pi - |u|)
    raw = folded.abs_().neg_().add_(math.pi)
    angles = raw.clamp(smallest, math.pi - smallest)
    slope.mul_(angles == raw)
    return angles, slope


def _row_blocks(g: int, m: int) -> list[tuple[int, int]]:
    """Row blocks [r0, r1) of the upper triangle: block r0 pairs its rows with columns r0..M-1.
    One block for a small set (each block costs a few dozen small ops); else at least 8 (the
    triangle then saves ~45 % of the pairs) of at most `_PAIR_BLOCK` pairs each."""
    if g * m * m <= 2 * _PAIR_BLOCK:
        return [(0, m)]
    rows = max(1, min(_PAIR_BLOCK // (g * m), max(32, -(-m // 8))))
    return [(r, min(r + rows, m)) for r in range(0, m, rows)]


class _GeometryGap(torch.autograd.Function):
    """wd * mean_ij |d(mine)_ij - d(truth)_ij| + wa * mean_ij |angle(mine)_ij - angle(truth)_ij|
    per set: mine, truth [G, M, 2] -> [G], with the gradient w.r.t. mine written out.

    The same values and gradients as autograd through `pairwise_distances` and
    `pairwise_angles` (a test checks it), over the upper triangle only (both terms are
    symmetric) in blocks of rows, so that no [M, M] float matrix is ever formed. Block
    [r0, r1) covers columns r0..M-1: its square [r0, r1)^2 holds both orders of its pairs, the
    rest each pair once, counted twice. The forward keeps, per pair, only the sign of the
    distance gap and the angle term's derivative w.r.t. direction i (int8, in {-1, 0, 1})."""

    @staticmethod
    def forward(ctx, mine, truth, distance_weight, angle_weight, eps):  # noqa: D102
        g, m = mine.shape[0], mine.shape[1]
        smallest = math.acos(1.0 - eps)
        alpha_p, alpha_t = (torch.atan2(v[..., 1], v[..., 0]) for v in (mine, truth))
        short_p, short_t = (v.norm(dim=-1) < eps for v in (mine, truth))
        any_short_p, any_short_t = bool(short_p.any()), bool(short_t.any())
        total = mine.new_zeros(g)
        blocks = _row_blocks(g, m)
        distance_signs, angle_slopes = [], []
        for r0, r1 in blocks:
            rows, cols = slice(r0, r1), slice(r0, m)
            # pairs in the block's square once, the others twice
            weight = mine.new_ones(m - r0)
            weight[r1 - r0 :] = 2.0
            if distance_weight:
                gap = pairwise_distances(mine[:, rows], mine[:, cols])
                gap.sub_(pairwise_distances(truth[:, rows], truth[:, cols]))
                distance_signs.append(gap.sign().to(torch.int8))
                total.add_(gap.abs_().sum(dim=1) @ weight, alpha=distance_weight)
            if angle_weight:
                angles, slope = _folded_angles(alpha_p[:, rows], alpha_p[:, cols], smallest)
                if any_short_p:  # pi/2 from everything, constant
                    degenerate = short_p[:, rows, None] | short_p[:, None, cols]
                    angles.masked_fill_(degenerate, math.pi / 2)
                    slope.masked_fill_(degenerate, 0.0)
                other, _ = _folded_angles(alpha_t[:, rows], alpha_t[:, cols], smallest)
                if any_short_t:
                    degenerate = short_t[:, rows, None] | short_t[:, None, cols]
                    other.masked_fill_(degenerate, math.pi / 2)
                gap = angles.sub_(other)
                angle_slopes.append(slope.mul_(gap.sign()).to(torch.int8))
                total.add_(gap.abs_().sum(dim=1) @ weight, alpha=angle_weight)
        ctx.save_for_backward(mine, short_p, *distance_signs, *angle_slopes)
        ctx.weights = (distance_weight, angle_weight)
        ctx.blocks = blocks
        return total / (m * m)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        mine, short_p, *saved = ctx.saved_tensors
        distance_weight, angle_weight = ctx.weights
        blocks = ctx.blocks
        distance_signs = saved[: len(blocks)] if distance_weight else []
        angle_slopes = saved[len(distance_signs) :]
        g, m = mine.shape[0], mine.shape[1]
        scale = 2.0 * grad_out / (m * m)  # [G]; 2: the full sum counts each pair twice
        grad = torch.zeros_like(mine)
        tiny = torch.finfo(mine.dtype).tiny
        grad_alpha = mine.new_zeros(g, m)
        for b, (r0, r1) in enumerate(blocks):
            rows, cols, rest = slice(r0, r1), slice(r0, m), slice(r1 - r0, None)
            if distance_weight:
                # d|d_ij - t_ij| / d m_i = sign(d_ij - t_ij) (m_i - m_j) / d_ij, and the same
                # pair gives m_j the opposite; 0 at d_ij = 0, as autograd's cdist gives
                distance = pairwise_distances(mine[:, rows], mine[:, cols])
                c = distance_signs[b].to(mine.dtype).div_(distance)
                c.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                c.mul_((distance_weight * scale)[:, None, None])
                grad[:, rows] += mine[:, rows] * c.sum(dim=-1, keepdim=True) - c @ mine[:, cols]
                # the columns past the square: their pairs with these rows, seen from j
                off = c[:, :, rest]
                grad[:, r1:] += (
                    mine[:, r1:] * off.sum(dim=1)[..., None] - off.transpose(1, 2) @ mine[:, rows]
                )
            if angle_weight:
                slope = angle_slopes[b]
                grad_alpha[:, rows] += slope.sum(dim=-1, dtype=mine.dtype)
                grad_alpha[:, r1:] -= slope[:, :, rest].sum(dim=1, dtype=mine.dtype)
        if angle_weight:
            grad_alpha.mul_((angle_weight * scale)[:, None])
            # alpha = atan2(y, x): d alpha = (-y dx + x dy) / (x^2 + y^2); 0 for short vectors
            r2 = mine.square().sum(-1).clamp(min=tiny)
            turn = torch.stack([-mine[..., 1], mine[..., 0]], dim=-1) / r2[..., None]
            grad += (grad_alpha * ~short_p)[..., None] * turn
        return grad, None, None, None, None


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
            mine = mine.reshape(len(group), -1, 2)
            truth = truth.reshape(len(group), -1, 2).detach()
            term = _GeometryGap.apply(mine, truth, distance_weight, angle_weight, _EPS)
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
