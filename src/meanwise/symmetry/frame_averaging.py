"""`FrameAveraging`: any backbone made exactly invariant or equivariant by averaging over a frame.

⟨φ⟩(X) = mean_{g ∈ F(X)} φ(g⁻¹·X) is invariant, and mean_{g ∈ F(X)} ρ(g)·Φ(g⁻¹·X) equivariant,
because F(g·X) = g·F(X) (Puny et al., ICLR 2022). All frame elements go through the backbone in
one call on a batch of F·B canonical clouds (frame-major, so the outputs view as [F, B, ...]
without a copy); a Python loop over the elements would pay the per-call overhead |F| times.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from meanwise.symmetry.frames import (
    DEFAULT_EIGENGAP_TOL,
    ON_DEGENERATE,
    Frames,
    GroupSpec,
    parse_group,
    pca_frames,
)

__all__ = ["FrameAveraging", "OUTPUTS", "reframe", "repeat_for_frames"]

OUTPUTS: tuple[str, ...] = ("invariant", "vector", "position")


def repeat_for_frames(x: Tensor, size: int) -> Tensor:
    """[B, ...] → [F·B, ...], frame-major: a per-cloud input seen by every frame element."""
    return x.unsqueeze(0).expand(size, *x.shape).reshape(size * x.shape[0], *x.shape[1:])


class FrameAveraging(nn.Module):
    """Wrap `backbone` so that its output is exactly invariant/equivariant under `group`.

    Args:
        backbone: called as ``backbone(framed_points, mask=mask, **extra)`` on a batch of
            F·B canonical clouds [F·B, N, d] (``mask`` only when one is given).
        group: 'O3', 'SO3', 'E3', 'SE3' or 'O(d)'-style names (any d).
        output: 'invariant' (any output shape [F·B, ...], averaged), 'vector' (last axis d,
            rotated back: velocities, forces, normals) or 'position' (rotated back, then the
            centroid added: predicted coordinates; needs a group with translations).
        vector_inputs: names of keyword inputs that are vectors [B, ..., d] (velocities):
            they are rotated into each frame but not centred. Other tensor inputs with a
            leading batch axis (charges, node features) are scalars: repeated per element.
        stochastic: one uniformly drawn frame element per cloud and forward pass while
            training (an unbiased estimate of the full average, |F| times cheaper); the full
            average in eval mode, or always with ``stochastic="always"``.
        on_degenerate, eigengap_tol, degenerate_samples: see `pca_frames`.

    ``forward(points, mask=None, weights=None, **extra)``: ``points`` [B, N, d] or [N, d];
    ``weights`` [B, N] optional masses for the frame; padded points (mask False) are zeroed
    in the canonical clouds so a backbone that ignores the mask still sees consistent input.
    The frame of the last call is kept in ``last_frames`` (for diagnostics: ``.degenerate``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        group: str = "E3",
        output: str = "invariant",
        *,
        vector_inputs: Iterable[str] = (),
        stochastic: bool | str = False,
        on_degenerate: str = "warn",
        eigengap_tol: float = DEFAULT_EIGENGAP_TOL,
        degenerate_samples: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not callable(backbone):
            raise TypeError(f"backbone must be callable (an nn.Module); got {type(backbone)}")
        self.spec: GroupSpec = parse_group(group)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
        if output == "position" and not self.spec.translations:
            raise ValueError(
                f"output='position' needs a group with translations (E(d)/SE(d)); got "
                f"{self.spec.name}: use output='vector' for O(d)/SO(d)"
            )
        if stochastic not in (False, True, "always"):
            raise ValueError(f"stochastic must be False, True or 'always'; got {stochastic!r}")
        if on_degenerate not in ON_DEGENERATE:
            raise ValueError(f"on_degenerate must be one of {ON_DEGENERATE}; got {on_degenerate!r}")
        if isinstance(vector_inputs, str):
            raise TypeError("vector_inputs must be a collection of names, not one string")
        self.backbone = backbone
        self.output = output
        self.vector_inputs = tuple(vector_inputs)
        self.stochastic = stochastic
        self.on_degenerate = on_degenerate
        self.eigengap_tol = eigengap_tol
        self.degenerate_samples = degenerate_samples
        self.generator = generator
        self.last_frames: Frames | None = None

    @property
    def group(self) -> str:
        return self.spec.name

    def frames(
        self, points: Tensor, mask: Tensor | None = None, weights: Tensor | None = None
    ) -> Frames:
        """The frames forward() would use (all elements, before any stochastic draw)."""
        return pca_frames(
            points,
            self.spec,
            mask=mask,
            weights=weights,
            eigengap_tol=self.eigengap_tol,
            on_degenerate=self.on_degenerate,
            degenerate_samples=self.degenerate_samples,
            generator=self.generator,
        )

    def _use_sample(self) -> bool:
        return self.stochastic == "always" or (self.stochastic is True and self.training)

    def forward(
        self,
        points: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        if not isinstance(points, Tensor):
            raise TypeError(f"points must be a tensor [B, N, d]; got {type(points).__name__}")
        unbatched = points.dim() == 2
        if unbatched:
            points = points.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
            weights = None if weights is None else weights.unsqueeze(0)
            extra = {k: v.unsqueeze(0) if isinstance(v, Tensor) else v for k, v in extra.items()}
        missing = [name for name in self.vector_inputs if name not in extra]
        if missing:
            raise ValueError(f"vector inputs {missing} were declared but not passed to forward")
        frames = self.frames(points, mask, weights)
        if self._use_sample():
            frames = frames.sample(self.generator)
        self.last_frames = frames
        size, batch = frames.size, points.shape[0]

        framed = frames.canonicalize(points, translate=True)  # [F, B, N, d]
        if mask is not None:
            framed = framed * mask.to(framed.dtype).unsqueeze(-1)
        inputs: dict[str, Any] = {}
        for name, value in extra.items():
            if name in self.vector_inputs:
                vec = frames.canonicalize(value, translate=False)
                inputs[name] = vec.reshape(size * batch, *vec.shape[2:])
            elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                inputs[name] = repeat_for_frames(value, size)
            else:
                inputs[name] = value
        if mask is not None:
            inputs["mask"] = repeat_for_frames(mask, size)
        out = self.backbone(framed.reshape(size * batch, *framed.shape[2:]), **inputs)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != size * batch:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"backbone must return a tensor with leading axis F*B = {size * batch}; got {shape}"
            )
        out = out.reshape(size, batch, *out.shape[1:])
        if self.output == "invariant":
            result = frames.average(out)
        else:
            if out.dim() < 3 or out.shape[-1] != self.spec.dim:
                raise ValueError(
                    f"output={self.output!r} needs backbone outputs [F*B, ..., d={self.spec.dim}]"
                    f"; got {[size * batch, *out.shape[2:]]}"
                )
            result = frames.restore(out, translate=self.output == "position")
        return result.squeeze(0) if unbatched else result

    def extra_repr(self) -> str:
        return (
            f"group={self.spec.name!r}, output={self.output!r}, "
            f"stochastic={self.stochastic!r}, on_degenerate={self.on_degenerate!r}"
        )


def reframe(framed: Tensor, frames: Frames, group: str | GroupSpec = "E3", **options: Any):
    """Per-layer frame averaging, the step FA-GNN takes between layers.

    ``framed`` [F, B, M, d] are M vector features per cloud in each frame element's canonical
    coordinates. They go back to global coordinates and are averaged over the frame (so they
    are exactly equivariant), then a new PCA frame of these M vectors (centred at their mean
    for E(d)/SE(d)) re-expresses them canonically. ``options`` go to `pca_frames`.

    Returns ``(new_framed [F', B, M, d], new_frames)``.
    """
    global_vectors = frames.restore(framed)
    new_frames = pca_frames(global_vectors, group, **options)
    return new_frames.canonicalize(global_vectors, translate=True), new_frames
