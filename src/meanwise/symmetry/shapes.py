"""Synthetic shapes with analytic normals, for the normal-estimation comparison.

Spheres, ellipsoids and tori with random sizes, each sampled at N surface points with their
unit normals, in a canonical pose (centred, axis-aligned). `random_orthogonal` and `transform`
give the rotated/translated test sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ShapeBatch", "SHAPES", "sample_shapes", "random_orthogonal", "transform"]

SHAPES: tuple[str, ...] = ("sphere", "ellipsoid", "torus")


@dataclass(frozen=True)
class ShapeBatch:
    """points, normals [S, N, 3] (float32, unit normals) and the shape index [S] into SHAPES."""

    points: Tensor
    normals: Tensor
    kind: Tensor

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index) -> ShapeBatch:
        return ShapeBatch(self.points[index], self.normals[index], self.kind[index])


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)


def sample_shapes(count: int, points: int = 256, *, generator: torch.Generator) -> ShapeBatch:
    """`count` shapes cycling through SHAPES, `points` surface points each."""
    if count < 1 or points < 3:
        raise ValueError(f"count must be >= 1 and points >= 3; got {count}, {points}")
    kind = torch.arange(count) % len(SHAPES)
    g = generator
    direction = torch.randn(count, points, 3, generator=g, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    # sphere: radius r; ellipsoid: axes (a, b, c); the normal of x²/a² + ... = 1 is ∝ x/a²
    axes = _uniform((count, 1, 3), 0.4, 1.5, g)
    radius = _uniform((count, 1, 1), 0.5, 1.5, g)
    axes = torch.where((kind == 0).view(-1, 1, 1), radius.expand(-1, 1, 3), axes)
    ellipsoid_points = direction * axes
    ellipsoid_normals = ellipsoid_points / axes.square()
    # torus: major radius R around the z axis, tube radius r
    theta = _uniform((count, points), 0.0, 2 * torch.pi, g)
    phi = _uniform((count, points), 0.0, 2 * torch.pi, g)
    major = _uniform((count, 1), 0.8, 1.2, g)
    tube = _uniform((count, 1), 0.2, 0.5, g)
    ring = major + tube * phi.cos()
    torus_points = torch.stack([ring * theta.cos(), ring * theta.sin(), tube * phi.sin()], -1)
    torus_normals = torch.stack([phi.cos() * theta.cos(), phi.cos() * theta.sin(), phi.sin()], -1)
    is_torus = (kind == 2).view(-1, 1, 1)
    p = torch.where(is_torus, torus_points, ellipsoid_points)
    n = torch.where(is_torus, torus_normals, ellipsoid_normals)
    n = n / n.norm(dim=-1, keepdim=True)
    return ShapeBatch(p.float(), n.float(), kind)


def random_orthogonal(count: int, dim: int = 3, *, generator: torch.Generator) -> Tensor:
    """[count, d, d] Haar-distributed orthogonal matrices (QR of a Gaussian, sign-corrected)."""
    gauss = torch.randn(count, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def transform(points: Tensor, rotation: Tensor, shift: Tensor | None = None) -> Tensor:
    """x ↦ Q x + b for row-vector points [S, N, d], Q [S, d, d], b [S, d]."""
    out = points @ rotation.transpose(-1, -2).to(points.dtype)
    return out if shift is None else out + shift.to(points.dtype).unsqueeze(1)
