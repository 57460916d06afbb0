"""PCA frames for point sets: the finite sets F(X) ⊂ E(d) with F(g·X) = g·F(X).

A frame element is g = (R, t): R ∈ O(d) whose columns are the principal axes of the cloud with
one choice of signs, t the (weighted) centroid. Canonical coordinates are y = (x − t) R (points
as rows), and an output vector u given in canonical coordinates goes back as u Rᵀ (+ t).
Because eigenvectors are only defined up to sign, the frame enumerates all sign choices: then
the *set* of canonical clouds is exactly the same for X and for Q·X + b, whatever signs the
eigensolver returns, which is what makes the average exact rather than approximate.

The eigenvectors are only defined when the eigenvalues are distinct. Near a repeated eigenvalue
(a cube, a regular polygon, an isotropic blob) rounding in the input moves them by about
ε‖C‖/gap, so the frame of a transformed cloud is no longer the transformed frame and symmetry
is lost. `pca_frames` measures the relative eigengaps and, by `on_degenerate`, warns, raises,
or enlarges the frame with rotations sampled within each degenerate eigenspace.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor

from meanwise.average import weighted_average

__all__ = [
    "DegenerateFrameWarning",
    "DegenerateFrameError",
    "Frames",
    "GroupSpec",
    "parse_group",
    "pca_frames",
    "relative_eigengaps",
    "ON_DEGENERATE",
]

ON_DEGENERATE: tuple[str, ...] = ("warn", "raise", "expand", "ignore")

# Float32 input rounding (~6e-8 relative) moves the principal axes by about 1e-7 / gap; below a
# relative gap of 1e-2 that exceeds 1e-5, the accuracy the float32 tests ask of an average.
DEFAULT_EIGENGAP_TOL = 1e-2


class DegenerateFrameWarning(UserWarning):
    """Some clouds have (nearly) repeated covariance eigenvalues: their PCA frame is unstable."""


class DegenerateFrameError(ValueError):
    """Raised by ``on_degenerate="raise"`` for clouds with (nearly) repeated eigenvalues."""


@dataclass(frozen=True)
class GroupSpec:
    """A group name parsed: O(d)/SO(d) fix the origin, E(d)/SE(d) also translate; S/SE proper."""

    name: str
    dim: int
    translations: bool
    proper: bool


_GROUP_PATTERN = re.compile(r"^(SE|SO|E|O)\(?(\d+)\)?$")


def parse_group(group: str) -> GroupSpec:
    """'O3', 'SO3', 'E3', 'SE3', or 'O(d)'-style names for any d >= 1."""
    if not isinstance(group, str):
        raise TypeError(f"group must be a string such as 'E3' or 'SO(2)'; got {type(group)}")
    match = _GROUP_PATTERN.match(group.strip().upper())
    if match is None or int(match.group(2)) < 1:
        raise ValueError(
            f"group must be one of 'O3', 'SO3', 'E3', 'SE3' or 'O(d)', 'SO(d)', 'E(d)', 'SE(d)' "
            f"with d >= 1 (or 'Sn' for graphs); got {group!r}"
        )
    kind, dim = match.group(1), int(match.group(2))
    return GroupSpec(f"{kind}({dim})", dim, kind in ("E", "SE"), kind in ("SO", "SE"))


@lru_cache(maxsize=32)
def _sign_choices(dim: int, proper: bool) -> Tensor:
    """[2^d, d] (or the 2^(d-1) rows with product +1 when `proper`) of ±1, float64."""
    rows = [s for s in itertools.product((1.0, -1.0), repeat=dim)]
    if proper:
        rows = [s for s in rows if torch.tensor(s).prod() > 0]
    return torch.tensor(rows, dtype=torch.float64)


def relative_eigengaps(eigenvalues: Tensor) -> Tensor:
    """(λ_{k+1} − λ_k) / λ_max for ascending eigenvalues [..., d] → [..., d−1].

    Relative to the largest eigenvalue, the cloud's squared scale, so the measure does not
    change when the cloud is scaled. A cloud whose points all coincide has gaps 0.
    """
    top = eigenvalues[..., -1:].clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    return (eigenvalues[..., 1:] - eigenvalues[..., :-1]) / top


@dataclass(frozen=True)
class Frames:
    """The frames of B clouds, frame-major so that per-element results stack as [F, B, ...].

    Attributes:
        rotations: [F, B, d, d]; the columns of ``rotations[f, b]`` are cloud b's principal
            axes with sign choice f (for expanded frames, also rotated within degenerate
            eigenspaces).
        centroid: [B, d], the weighted centroid (zeros for O(d)/SO(d)).
        eigenvalues: [B, d], ascending, of the weighted covariance (float64).
        degenerate: [B] bool, clouds with a relative eigengap below the tolerance.
    """

    rotations: Tensor
    centroid: Tensor
    eigenvalues: Tensor
    degenerate: Tensor

    @property
    def size(self) -> int:
        """|F|, the number of frame elements per cloud."""
        return self.rotations.shape[0]

    @property
    def dim(self) -> int:
        return self.rotations.shape[-1]

    def _flat(self, x: Tensor, name: str) -> tuple[Tensor, tuple[int, ...]]:
        batch, d = self.centroid.shape
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor [B, ..., {d}]; got {type(x).__name__}")
        if x.dim() < 2 or x.shape[0] != batch or x.shape[-1] != d:
            raise ValueError(f"{name} must have shape [B={batch}, ..., d={d}]; got {list(x.shape)}")
        return x.reshape(batch, -1, d), tuple(x.shape[1:])

    def canonicalize(self, x: Tensor, *, translate: bool = True) -> Tensor:
        """[B, ..., d] → [F, B, ..., d]: (x − t) R_f for every frame element f.

        Vectors that are not positions (velocities, forces) pass ``translate=False``: a
        translation of the cloud does not change them.
        """
        flat, rest = self._flat(x, "x")
        rotations = self.rotations.to(flat.dtype)
        if translate:
            flat = flat - self.centroid.to(flat.dtype).unsqueeze(1)
        return torch.matmul(flat.unsqueeze(0), rotations).reshape(self.size, *x.shape[:1], *rest)

    def restore(self, y: Tensor, *, translate: bool = False) -> Tensor:
        """[F, B, ..., d] → [B, ..., d]: the average over f of y_f R_fᵀ (+ t for positions).

        This is the equivariant frame average ⟨Φ⟩(X) = mean_f ρ(g_f) Φ(g_f⁻¹ X).
        """
        if not isinstance(y, Tensor) or y.dim() < 3 or y.shape[0] != self.size:
            shape = list(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must have shape [F={self.size}, B, ..., d]; got {shape}")
        flat, rest = self._flat(y[0], "y[0]")
        stacked = y.reshape(self.size, *flat.shape)
        rotated = torch.matmul(stacked, self.rotations.to(y.dtype).transpose(-1, -2))
        # The shared kernel rather than one fused einsum over (f, i): this step measured
        # 1.5-2.2x the einsum's time (2-6 ms vs 1.4-3 ms), under 1% of the FA forward it
        # belongs to (benchmarks/frame_averaging.py), for one validated averaging path.
        out = weighted_average(rotated)
        if translate:
            out = out + self.centroid.to(out.dtype).unsqueeze(1)
        return out.reshape(y.shape[1], *rest)

    def average(self, values: Tensor) -> Tensor:
        """[F, B, ...] → [B, ...]: the invariant frame average of per-element outputs."""
        if not isinstance(values, Tensor) or values.dim() < 2 or values.shape[0] != self.size:
            shape = list(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(f"values must have shape [F={self.size}, B, ...]; got {shape}")
        return weighted_average(values)

    def sample(self, generator: torch.Generator | None = None) -> Frames:
        """One frame element per cloud, drawn uniformly: the stochastic (training) mode.

        Each draw is an unbiased estimate of the full average, since every element of F(X) is
        equally likely; the draws of different clouds are independent.
        """
        batch = self.centroid.shape[0]
        pick = torch.randint(self.size, (batch,), generator=generator)
        device = self.rotations.device
        chosen = self.rotations[pick.to(device), torch.arange(batch, device=device)]
        return replace(self, rotations=chosen.unsqueeze(0))

    def detach(self) -> Frames:
        return replace(self, rotations=self.rotations.detach(), centroid=self.centroid.detach())


def _weights(points: Tensor, mask: Tensor | None, weights: Tensor | None) -> Tensor:
    batch, n = points.shape[:2]
    w = torch.ones(batch, n, dtype=torch.float64, device=points.device)
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a tensor [B, N]; got {type(weights).__name__}")
        if tuple(weights.shape) != (batch, n):
            raise ValueError(
                f"weights must have shape [B, N]={[batch, n]}; got {list(weights.shape)}"
            )
        w = weights.to(torch.float64)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative (masses)")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool tensor [B, N]; got {type(mask).__name__}")
        if tuple(mask.shape) != (batch, n):
            raise ValueError(f"mask must have shape [B, N]={[batch, n]}; got {list(mask.shape)}")
        w = w * mask.to(torch.float64)
    empty = w.sum(1) <= 0
    if empty.any():
        index = int(empty.nonzero()[0])
        raise ValueError(
            f"cloud {index} has no point with positive weight (mask/weights); every cloud "
            "needs at least one point"
        )
    return w


def _degenerate_clusters(eigenvalues: Tensor, tol: float) -> Tensor:
    """[B, d] cluster ids: consecutive eigenvalues closer than tol (relative) share an id."""
    close = relative_eigengaps(eigenvalues) < tol
    starts = torch.cat([torch.ones_like(close[:, :1]), ~close], dim=1)
    return starts.long().cumsum(1)


def _sample_within_eigenspaces(
    clusters: Tensor, samples: int, proper: bool, generator: torch.Generator | None
) -> Tensor:
    """[K, B, d, d] block-diagonal Haar rotations: one random O(k) block per degenerate cluster.

    A Gaussian matrix with the off-block entries zeroed is block-diagonal; its QR factor is
    block-diagonal too (blocks are contiguous), and the sign correction makes each block
    Haar-distributed. Singleton clusters get 1, so a non-degenerate cloud's K samples are all the
    identity and its average is unchanged.
    """
    batch, d = clusters.shape
    clusters = clusters.cpu()  # drawn on the CPU (the generator's device), moved by the caller
    same = clusters.unsqueeze(2) == clusters.unsqueeze(1)
    gauss = torch.randn(samples, batch, d, d, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gauss * same)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    singleton = same.sum(2) == 1  # [B, d]
    eye = torch.eye(d, dtype=torch.float64)
    q = torch.where(singleton.unsqueeze(1) | singleton.unsqueeze(2), eye, q)
    if proper:
        # flip one column inside the first degenerate block where det = −1: stays in that
        # block's O(k) and makes the whole matrix a rotation
        first = torch.argmax((~singleton).long(), dim=1)  # [B]
        flip = torch.linalg.det(q) < 0  # [K, B]
        column = torch.nn.functional.one_hot(first, d).to(torch.float64)  # [B, d]
        factor = 1.0 - 2.0 * column.unsqueeze(0) * flip.unsqueeze(-1).to(torch.float64)
        q = q * factor.unsqueeze(-2)
    return q


def pca_frames(
    points: Tensor,
    group: str | GroupSpec = "E3",
    *,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    eigengap_tol: float = DEFAULT_EIGENGAP_TOL,
    on_degenerate: str = "warn",
    degenerate_samples: int = 16,
    generator: torch.Generator | None = None,
    differentiable: bool = False,
) -> Frames:
    """The PCA frames of B clouds [B, N, d] (an unbatched [N, d] cloud counts as B = 1).

    Args:
        points: [B, N, d] real tensor.
        group: 'O3' | 'SO3' | 'E3' | 'SE3' or 'O(d)'-style; E/SE centre at the centroid,
            SO/SE keep only the sign choices with det = +1 (2^(d−1) of them instead of 2^d).
        mask: [B, N] bool, False for padding (clouds of different sizes in one batch).
        weights: [B, N] non-negative per-point weights (masses) for centroid and covariance.
        eigengap_tol: a cloud is degenerate when some relative eigengap
            (λ_{k+1} − λ_k)/λ_max is below this.
        on_degenerate: 'warn' (DegenerateFrameWarning), 'raise' (DegenerateFrameError),
            'expand' (each frame element is combined with `degenerate_samples` Haar rotations
            within the degenerate eigenspaces: exact for the clouds that are not degenerate,
            symmetric in distribution for those that are, |F| grows by that factor for the
            batch) or 'ignore' (the caller checks ``Frames.degenerate``).
        generator: random source for 'expand'.
        differentiable: keep the autograd graph through centroid and eigenvectors. Off by
            default, as in the paper's code: eigenvector derivatives scale like 1/gap.

    The covariance and its eigendecomposition are computed in float64 whatever the input
    dtype; `rotations` and `centroid` come back in the input's dtype.
    """
    spec = parse_group(group) if isinstance(group, str) else group
    if on_degenerate not in ON_DEGENERATE:
        raise ValueError(f"on_degenerate must be one of {ON_DEGENERATE}; got {on_degenerate!r}")
    if not isinstance(points, Tensor):
        raise TypeError(f"points must be a tensor [B, N, d]; got {type(points).__name__}")
    if points.dim() == 2:
        points = points.unsqueeze(0)
    if points.dim() != 3 or points.shape[-1] != spec.dim or points.shape[1] == 0:
        raise ValueError(
            f"points must have shape [B, N >= 1, d={spec.dim}] for group {spec.name}; "
            f"got {list(points.shape)}"
        )
    if not points.is_floating_point():
        raise TypeError(f"points must be a floating tensor; got dtype {points.dtype}")
    if not (eigengap_tol >= 0):
        raise ValueError(f"eigengap_tol must be >= 0; got {eigengap_tol}")
    if degenerate_samples < 1:
        raise ValueError(f"degenerate_samples must be >= 1; got {degenerate_samples}")
    source = points if differentiable else points.detach()
    x = source.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("points must be finite")
    w = _weights(points, mask, weights)
    total = w.sum(1, keepdim=True)
    if spec.translations:
        centroid = (w.unsqueeze(-1) * x).sum(1) / total
    else:
        centroid = torch.zeros(x.shape[0], spec.dim, dtype=torch.float64, device=x.device)
    centred = (x - centroid.unsqueeze(1)) * w.unsqueeze(-1).sqrt()
    covariance = centred.transpose(1, 2) @ centred / total.unsqueeze(-1)
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    if spec.proper:
        # make every V a rotation, so that the sign choices with product +1 are exactly the
        # frame elements with det = +1
        flip = torch.where(torch.linalg.det(vectors.detach()) < 0, -1.0, 1.0).to(vectors)
        vectors = torch.cat([vectors[..., :-1], vectors[..., -1:] * flip[:, None, None]], -1)
    signs = _sign_choices(spec.dim, spec.proper).to(vectors.device)  # [S, d]
    degenerate = (relative_eigengaps(eigenvalues.detach()) < eigengap_tol).any(1)
    if spec.dim == 1:
        degenerate = torch.zeros_like(degenerate)
    rotations = vectors.unsqueeze(0) * signs[:, None, None, :]  # [S, B, d, d]
    if degenerate.any():
        count = int(degenerate.sum())
        message = (
            f"{count} of {len(degenerate)} clouds have a relative eigengap below "
            f"{eigengap_tol:g} (e.g. cloud {int(degenerate.nonzero()[0])}): their PCA frame "
            "is not stable, so frame averaging is not exactly symmetric for them. Pass "
            "on_degenerate='expand' to sample within the degenerate eigenspaces, or check "
            "Frames.degenerate."
        )
        if on_degenerate == "raise":
            raise DegenerateFrameError(message)
        if on_degenerate == "warn":
            warnings.warn(message, DegenerateFrameWarning, stacklevel=2)
        if on_degenerate == "expand":
            clusters = _degenerate_clusters(eigenvalues.detach(), eigengap_tol)
            singletons = torch.arange(spec.dim, device=clusters.device)
            clusters = torch.where(degenerate.unsqueeze(1), clusters, singletons)
            q = _sample_within_eigenspaces(clusters, degenerate_samples, spec.proper, generator)
            # R = V Q S: rotate within the eigenspaces, then choose signs
            rotated = vectors.unsqueeze(0) @ q.to(vectors.device)  # [K, B, d, d]
            rotations = (rotated.unsqueeze(1) * signs[None, :, None, None, :]).flatten(0, 1)
    return Frames(
        rotations=rotations.to(points.dtype),
        centroid=centroid.to(points.dtype),
        eigenvalues=eigenvalues.detach(),
        degenerate=degenerate,
    )
