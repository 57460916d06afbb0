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
from meanwise.symmetry.graph_frames import permutation_frames

__all__ = [
    "FrameAveraging",
    "OUTPUTS",
    "GRAPH_OUTPUTS",
    "AUTO_POINTS_PER_CALL",
    "reframe",
    "repeat_for_frames",
]

OUTPUTS: tuple[str, ...] = ("invariant", "vector", "position")

# chunk_size="auto" on the CPU: at most this many points (clouds x points per cloud) per
# backbone call. Measured here (benchmarks/frame_averaging.py, a 64-wide PointNet, one thread,
# 32 MiB L3): per frame element, one call over all F*B clouds cost 1.35x-2x a bare call once
# F*B*N passed ~65k points (the activations fall out of cache), chunks of 16k points 0.84x-0.91x,
# for 32x256, 8x2048 and 4x4096 clouds. Small inputs (n-body: 100 x 5 points) stay one call.
AUTO_POINTS_PER_CALL = 16384
GRAPH_OUTPUTS: tuple[str, ...] = ("invariant", "node")
_GRAPH_GROUPS = ("SN", "S(N)", "S_N")


def repeat_for_frames(x: Tensor, size: int) -> Tensor:
    """[B, ...] → [F·B, ...], frame-major: a per-cloud input seen by every frame element."""
    return x.unsqueeze(0).expand(size, *x.shape).reshape(size * x.shape[0], *x.shape[1:])


class FrameAveraging(nn.Module):
    """Wrap `backbone` so that its output is exactly invariant/equivariant under `group`.

    Args:
        backbone: called as ``backbone(framed_points, mask=mask, **extra)`` on a batch of
            F·B canonical clouds [F·B, N, d] (``mask`` only when one is given).
        group: 'O3', 'SO3', 'E3', 'SE3' or 'O(d)'-style names (any d), or 'Sn' for graphs:
            then ``forward(adjacency [B, n, n], mask=None, **extra)``, the backbone is called
            as ``backbone(canonical_adjacency [F·B, n, n], mask=..., **extra)`` and `output`
            is 'invariant' or 'node' (per-node outputs [F·B, n, ...] permuted back).
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
        chunk_size: at most this many canonical inputs per backbone call; None: all F·B in
            one call; 'auto' (default): one call on accelerators, and on the CPU calls of
            about AUTO_POINTS_PER_CALL points, since an F-times larger batch can fall out of
            cache (measured up to 2x slower per element for 2048-point clouds).
        node_inputs, max_elements: for 'Sn': names of keyword inputs that are node features
            [B, n, ...] (permuted into each order), and the cap on |F| per graph (beyond it
            orders are sampled, see `permutation_frames`).

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
        node_inputs: Iterable[str] = (),
        max_elements: int = 64,
        chunk_size: int | str | None = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not callable(backbone):
            raise TypeError(f"backbone must be callable (an nn.Module); got {type(backbone)}")
        self.graph = isinstance(group, str) and group.strip().upper() in _GRAPH_GROUPS
        self.spec: GroupSpec | None = None if self.graph else parse_group(group)
        allowed = GRAPH_OUTPUTS if self.graph else OUTPUTS
        if output not in allowed:
            raise ValueError(f"output must be one of {allowed} for group {group!r}; got {output!r}")
        if self.spec is not None and output == "position" and not self.spec.translations:
            raise ValueError(
                f"output='position' needs a group with translations (E(d)/SE(d)); got "
                f"{self.spec.name}: use output='vector' for O(d)/SO(d)"
            )
        if stochastic not in (False, True, "always"):
            raise ValueError(f"stochastic must be False, True or 'always'; got {stochastic!r}")
        if on_degenerate not in ON_DEGENERATE:
            raise ValueError(f"on_degenerate must be one of {ON_DEGENERATE}; got {on_degenerate!r}")
        if isinstance(vector_inputs, str) or isinstance(node_inputs, str):
            raise TypeError("vector_inputs/node_inputs must be collections of names, not strings")
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1; got {max_elements}")
        if chunk_size not in (None, "auto") and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(
                f"chunk_size must be None, 'auto' or a positive int; got {chunk_size!r}"
            )
        self.backbone = backbone
        self.output = output
        self.vector_inputs = tuple(vector_inputs)
        self.node_inputs = tuple(node_inputs)
        self.max_elements = max_elements
        self.chunk_size = chunk_size
        self.stochastic = stochastic
        self.on_degenerate = on_degenerate
        self.eigengap_tol = eigengap_tol
        self.degenerate_samples = degenerate_samples
        self.generator = generator
        self.last_frames: Frames | None = None

    @property
    def group(self) -> str:
        return "Sn" if self.spec is None else self.spec.name

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
        if self.graph:
            return self._forward_graph(points, mask, extra)
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
        out = self._call_backbone(framed.reshape(size * batch, *framed.shape[2:]), inputs)
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

    def _call_backbone(self, framed: Tensor, inputs: dict[str, Any]) -> Tensor:
        """One backbone call on all F·B canonical inputs, or calls of `chunk_size` of them."""
        total = framed.shape[0]
        chunk = self.chunk_size
        if chunk == "auto":
            per_cloud = framed.shape[1] if framed.dim() > 2 else 1
            chunk = None if framed.device.type != "cpu" else AUTO_POINTS_PER_CALL // per_cloud
            chunk = None if chunk is None else max(1, chunk)
        if chunk is None or total <= chunk:
            return self.backbone(framed, **inputs)
        outputs = []
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            part = {
                k: v[start:end] if isinstance(v, Tensor) and v.dim() and v.shape[0] == total else v
                for k, v in inputs.items()
            }
            outputs.append(self.backbone(framed[start:end], **part))
        return torch.cat(outputs)

    def _forward_graph(self, adjacency: Tensor, mask: Tensor | None, extra: dict) -> Tensor:
        unbatched = adjacency.dim() == 2
        if unbatched:
            adjacency = adjacency.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
            extra = {k: v.unsqueeze(0) if isinstance(v, Tensor) else v for k, v in extra.items()}
        missing = [name for name in self.node_inputs if name not in extra]
        if missing:
            raise ValueError(f"node inputs {missing} were declared but not passed to forward")
        frames = permutation_frames(
            adjacency, mask, max_elements=self.max_elements, generator=self.generator
        )
        if self._use_sample():
            frames = frames.sample(self.generator)
        self.last_frames = frames
        size, batch = frames.size, adjacency.shape[0]
        canonical = frames.canonicalize_adjacency(adjacency).flatten(0, 1)
        inputs: dict[str, Any] = {}
        for name, value in extra.items():
            if name in self.node_inputs:
                inputs[name] = frames.canonicalize_nodes(value).flatten(0, 1)
            elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                inputs[name] = repeat_for_frames(value, size)
            else:
                inputs[name] = value
        if mask is not None:
            inputs["mask"] = frames.canonicalize_nodes(frames.mask).flatten(0, 1)
        out = self._call_backbone(canonical, inputs)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != size * batch:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"backbone must return a tensor with leading axis F*B = {size * batch}; got {shape}"
            )
        out = out.reshape(size, batch, *out.shape[1:])
        if self.output == "invariant":
            result = frames.average(out)
        else:
            if out.dim() < 3 or out.shape[2] != adjacency.shape[1]:
                raise ValueError(
                    f"output='node' needs backbone outputs [F*B, n={adjacency.shape[1]}, ...]; "
                    f"got {[size * batch, *out.shape[2:]]}"
                )
            result = frames.restore_nodes(out)
        return result.squeeze(0) if unbatched else result

    def extra_repr(self) -> str:
        return (
            f"group={self.group!r}, output={self.output!r}, "
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
