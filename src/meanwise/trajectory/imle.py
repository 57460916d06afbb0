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


def _row_blocks(g: int, m: int) -> list[tuple[int, int]]:
    """Row blocks [r0, r1) of the upper triangle: block r0 pairs its rows with columns r0..M-1.
    One block for a small set (each block costs a few dozen small ops); else at least 8 (the
    triangle then saves ~45 % of the pairs) of at most `_PAIR_BLOCK` pairs each."""
    if g * m * m <= 2 * _PAIR_BLOCK:
        return [(0, m)]
    rows = max(1, min(_PAIR_BLOCK // (g * m), max(32, -(-m // 8))))
    return [(r, min(r + rows, m)) for r in range(0, m, rows)]


def _block_distances(x: Tensor, y: Tensor, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
    """(distances, inverse distances) [G, R, C] between the vectors of rows and cols, from
    their coordinates x, y [G, M]: from the differences, so equal vectors are exactly 0 apart,
    and with the inverse 0 there (the gradient of a zero distance is 0, as autograd's cdist
    gives it). The square root as s * rsqrt(s): torch's float64 sqrt is not vectorised here
    and costs three times rsqrt."""
    s = x[:, rows, None] - x[:, None, cols]
    s.mul_(s)
    dy = y[:, rows, None] - y[:, None, cols]
    s.addcmul_(dy, dy)
    inverse = torch.rsqrt(s).nan_to_num_(posinf=0.0)
    return s.mul_(inverse), inverse


def _block_folds(alpha: Tensor, rows: slice, cols: slice) -> Tensor:
    """|pi - |alpha_i - alpha_j|| [G, R, C] for directions alpha [G, M] in (-pi, pi]: pi minus
    the angle between the vectors (in 2-D their directions' difference folded into [0, pi])."""
    return (alpha[:, rows, None] - alpha[:, None, cols]).abs_().sub_(math.pi).abs_()


class _GeometryGap(torch.autograd.Function):
    """wd * mean_ij |d(mine)_ij - d(truth)_ij| + wa * mean_ij |angle(mine)_ij - angle(truth)_ij|
    per set: mine, truth [G, M, 2] -> [G], with the gradient w.r.t. mine written out.

    The same values and gradients as autograd through `pairwise_distances` and
    `pairwise_angles` (a test checks it), over the upper triangle only (both terms are
    symmetric) in blocks of rows, so that no [M, M] float matrix is ever formed. Block
    [r0, r1) covers columns r0..M-1: its square [r0, r1)^2 holds both orders of its pairs, the
    rest each pair once, counted twice.

    The loss is a leaf of the graph (truth carries no gradient), so its gradient w.r.t. mine is
    formed in the forward, from the per-pair factors while they are in cache, and kept: [G, M, 2]
    instead of per-pair signs and a second pass over the pairs in the backward.

    Angles work on w = |pi - |u|| = pi - angle, u = alpha_i - alpha_j the directions'
    difference, so the angle gap is w(truth) - w(mine) and the reference's clamp of the angle to
    [s, pi - s] is the same clamp of w. d angle / d alpha_i = -sign(u) sign(|u| - pi), 0 where
    clamped."""

    @staticmethod
    def forward(ctx, mine, truth, distance_weight, angle_weight, eps):  # noqa: D102
        g, m = mine.shape[0], mine.shape[1]
        lo, hi = math.acos(1.0 - eps), math.pi - math.acos(1.0 - eps)
        mine, truth = mine.detach(), truth.detach()
        xp, yp = mine[..., 0].contiguous(), mine[..., 1].contiguous()
        xt, yt = truth[..., 0].contiguous(), truth[..., 1].contiguous()
        alpha_p, alpha_t = torch.atan2(yp, xp), torch.atan2(yt, xt)
        short_p, short_t = (v.norm(dim=-1) < eps for v in (mine, truth))
        any_short_p, any_short_t = bool(short_p.any()), bool(short_t.any())
        distance_sum, angle_sum = mine.new_zeros(g), mine.new_zeros(g)
        grad_distance = torch.zeros_like(mine)  # d sum_ij |gap_ij| / d mine, halved
        grad_alpha = mine.new_zeros(g, m)  # d sum_ij |angle gap_ij| / d alpha, halved
        for r0, r1 in _row_blocks(g, m):
            rows, cols, rest = slice(r0, r1), slice(r0, m), slice(r1 - r0, None)
            # pairs in the block's square once, the others twice
            weight = mine.new_ones(m - r0)
            weight[r1 - r0 :] = 2.0
            if distance_weight:
                gap, c = _block_distances(xp, yp, rows, cols)
                gap.sub_(_block_distances(xt, yt, rows, cols)[0])
                # d |d_ij - t_ij| / d m_i = sign(d_ij - t_ij) (m_i - m_j) / d_ij, and the same
                # pair gives m_j the opposite; 0 at d_ij = 0, as autograd's cdist gives
                c.mul_(gap.sign())
                distance_sum.add_(gap.abs_().sum(dim=1) @ weight)
                grad_distance[:, rows] += (
                    mine[:, rows] * c.sum(dim=-1, keepdim=True) - c @ mine[:, cols]
                )
                # the columns past the square: their pairs with these rows, seen from j
                off = c[:, :, rest]
                grad_distance[:, r1:] += (
                    mine[:, r1:] * off.sum(dim=1)[..., None] - off.transpose(1, 2) @ mine[:, rows]
                )
            if angle_weight:
                u = alpha_p[:, rows, None] - alpha_p[:, None, cols]
                t = u.abs().sub_(math.pi)
                w = t.abs()
                # u t has the sign of -d angle / d alpha_i; zeroed where the clamp holds
                slope = torch.ops.aten.hardtanh_backward(u.mul_(t), w, lo, hi)
                w.clamp_(lo, hi)
                other = _block_folds(alpha_t, rows, cols).clamp_(lo, hi)
                if any_short_p:  # pi/2 from everything, constant
                    degenerate = short_p[:, rows, None] | short_p[:, None, cols]
                    w.masked_fill_(degenerate, math.pi / 2)
                    slope.masked_fill_(degenerate, 0.0)
                if any_short_t:
                    degenerate = short_t[:, rows, None] | short_t[:, None, cols]
                    other.masked_fill_(degenerate, math.pi / 2)
                gap = w.sub_(other)  # w(mine) - w(truth) = angle(truth) - angle(mine)
                # d |angle(mine) - angle(truth)| / d alpha_i = sign(gap u t): both factors are
                # the negatives of the angles' ones (the product of values ~1 cannot underflow)
                slope.mul_(gap).sign_()
                angle_sum.add_(gap.abs_().sum(dim=1) @ weight)
                grad_alpha[:, rows] += slope.sum(dim=-1)
                grad_alpha[:, r1:] -= slope[:, :, rest].sum(dim=1)
        # 2: the full sum counts each pair twice
        scale = 2.0 / (m * m)
        grad = grad_distance.mul_(distance_weight * scale)
        if angle_weight:
            # alpha = atan2(y, x): d alpha = (-y dx + x dy) / (x^2 + y^2); 0 for short vectors
            r2 = (xp * xp + yp * yp).clamp_(min=torch.finfo(mine.dtype).tiny)
            factor = grad_alpha.mul_(~short_p).div_(r2).mul_(angle_weight * scale)
            grad += torch.stack([-yp, xp], dim=-1) * factor[..., None]
        ctx.save_for_backward(grad)
        total = distance_sum.mul_(distance_weight) + angle_sum.mul_(angle_weight)
        return total / (m * m)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None, None], None, None, None, None


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
