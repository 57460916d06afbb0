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

from meanwise.symmetry.frame_protocol import (
    GRAPH_OUTPUTS,
    Frame,
    FrameSet,
    PCAFrame,
    PermutationFrame,
    is_permutation_group,
    repeat_for_frames,
)
from meanwise.symmetry.frame_protocol import POINT_OUTPUTS as OUTPUTS
from meanwise.symmetry.frames import DEFAULT_EIGENGAP_TOL, Frames, GroupSpec, pca_frames

__all__ = [
    "FrameAveraging",
    "OUTPUTS",
    "GRAPH_OUTPUTS",
    "AUTO_POINTS_PER_CALL",
    "reframe",
    "repeat_for_frames",
]

# chunk_size="auto" on the CPU: at most this many points (clouds x points per cloud) per
# backbone call. Measured here (benchmarks/frame_averaging.py, a 64-wide PointNet, one thread,
# 32 MiB L3): per frame element, one call over all F*B clouds cost 1.35x-2x a bare call once
# F*B*N passed ~65k points (the activations fall out of cache), chunks of 16k points 0.84x-0.91x,
# for 32x256, 8x2048 and 4x4096 clouds. Small inputs (n-body: 100 x 5 points) stay one call.
AUTO_POINTS_PER_CALL = 16384

# the constructor's frame options and their defaults: with a Frame object for `group` they
# belong to that object, and passing them here as well is an error rather than ignored
_FRAME_OPTIONS: dict[str, Any] = {
    "vector_inputs": (),
    "on_degenerate": "warn",
    "eigengap_tol": DEFAULT_EIGENGAP_TOL,
    "degenerate_samples": 16,
    "node_inputs": (),
    "max_elements": 64,
}


def _frame_for(group: str | Frame, options: dict[str, Any]) -> Frame:
    """The frame `group` names, built from the constructor's frame options (or `group` itself
    when it is a Frame, in which case those options must stay at their defaults)."""
    if isinstance(options["vector_inputs"], str) or isinstance(options["node_inputs"], str):
        raise TypeError("vector_inputs/node_inputs must be collections of names, not strings")
    options = {**options, "vector_inputs": tuple(options["vector_inputs"]),
               "node_inputs": tuple(options["node_inputs"])}  # fmt: skip
    given = [k for k, default in _FRAME_OPTIONS.items() if options[k] != default]
    if isinstance(group, Frame):
        if given:
            raise ValueError(f"{given} configure the frame: set them on {group!r} instead")
        return group
    if not isinstance(group, str):
        raise TypeError(
            f"group must be a group name such as 'E3' or 'Sn', or a Frame; got {type(group)}"
        )
    graph_only = ("node_inputs", "max_elements")
    if is_permutation_group(group):
        wrong = [k for k in given if k not in graph_only]
        if wrong:
            raise ValueError(f"{wrong} apply to point-cloud groups, not to group {group!r}")
        return PermutationFrame(**{k: options[k] for k in graph_only})
    wrong = [k for k in given if k in graph_only]
    if wrong:
        raise ValueError(f"{wrong} apply to group 'Sn' (graphs), not to group {group!r}")
    return PCAFrame(group, **{k: v for k, v in options.items() if k not in graph_only})


class FrameAveraging(nn.Module):
    """Wrap `backbone` so that its output is exactly invariant/equivariant under `group`.

    Build it with `FrameAveraging.for_points` (point clouds) or `FrameAveraging.for_graphs`
    (graphs), or with this constructor, which takes the options of both.

    Args:
        backbone: called as ``backbone(canonical_inputs [F·B, ...], mask=mask, **extra)`` on
            the F·B canonical inputs of a batch (``mask`` only when one is given).
        group: 'O3', 'SO3', 'E3', 'SE3' or 'O(d)'-style names (any d) for point clouds,
            'Sn' for graphs, or a `Frame` object (`PCAFrame`, `PermutationFrame` or one of
            your own; then the frame options below stay at their defaults).
        output: for point clouds 'invariant' (any output shape [F·B, ...], averaged),
            'vector' (last axis d, rotated back: velocities, forces, normals) or 'position'
            (rotated back, then the centroid added; needs a group with translations); for
            graphs 'invariant' or 'node' (per-node outputs [F·B, n, ...] permuted back).
        vector_inputs: point clouds: names of keyword inputs that are vectors [B, ..., d]
            (velocities), rotated into each frame but not centred. Other tensor inputs with a
            leading batch axis (charges, node features) are scalars: repeated per element.
        stochastic: one uniformly drawn frame element per input and forward pass while
            training (an unbiased estimate of the full average, |F| times cheaper); the full
            average in eval mode, or always with ``stochastic="always"``.
        on_degenerate, eigengap_tol, degenerate_samples: point clouds, see `pca_frames`.
        node_inputs, max_elements: graphs: names of keyword inputs that are node features
            [B, n, ...] (permuted into each order), and the cap on |F| per graph (beyond it
            orders are sampled, see `permutation_frames`).
        chunk_size: at most this many canonical inputs per backbone call; None: all F·B in
            one call; 'auto' (default): one call on accelerators, and on the CPU calls of
            about AUTO_POINTS_PER_CALL points, since an F-times larger batch can fall out of
            cache (measured up to 2x slower per element for 2048-point clouds).
        generator: random source for stochastic draws, degenerate expansion, capped frames.

    ``forward(points, mask=None, weights=None, **extra)``: ``points`` [B, N, d] or [N, d], or
    for graphs the adjacency [B, n, n] or [n, n]; ``mask`` [B, N] marks real points/nodes;
    ``weights`` [B, N] optional masses for a PCA frame. Padded points (mask False) are zeroed in
    the canonical clouds so a backbone that ignores the mask still sees consistent input. The
    output follows the input's device and dtype. The frames of the last call are kept in
    ``last_frames`` (diagnostics: ``.degenerate`` for point clouds, ``.exact`` for graphs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        group: str | Frame = "E3",
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
        options = {
            "vector_inputs": vector_inputs,
            "on_degenerate": on_degenerate,
            "eigengap_tol": eigengap_tol,
            "degenerate_samples": degenerate_samples,
            "node_inputs": node_inputs,
            "max_elements": max_elements,
        }
        frame = _frame_for(group, options)
        frame.check_output(output)
        if stochastic not in (False, True, "always"):
            raise ValueError(f"stochastic must be False, True or 'always'; got {stochastic!r}")
        if chunk_size not in (None, "auto") and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(
                f"chunk_size must be None, 'auto' or a positive int; got {chunk_size!r}"
            )
        self.backbone = backbone
        self.frame = frame
        self.output = output
        self.chunk_size = chunk_size
        self.stochastic = stochastic
        self.generator = generator
        self.last_frames: FrameSet | None = None

    @classmethod
    def for_points(
        cls,
        backbone: nn.Module,
        group: str = "E3",
        output: str = "invariant",
        *,
        vector_inputs: Iterable[str] = (),
        stochastic: bool | str = False,
        on_degenerate: str = "warn",
        eigengap_tol: float = DEFAULT_EIGENGAP_TOL,
        degenerate_samples: int = 16,
        chunk_size: int | str | None = "auto",
        generator: torch.Generator | None = None,
    ) -> FrameAveraging:
        """Frame averaging of point clouds [B, N, d] over PCA frames of O(d)/SO(d)/E(d)/SE(d)."""
        if is_permutation_group(group):
            raise ValueError(f"for_points takes a point group (E3, SO(2), ...); got {group!r}")
        frame = PCAFrame(
            group,
            vector_inputs=vector_inputs,
            on_degenerate=on_degenerate,
            eigengap_tol=eigengap_tol,
            degenerate_samples=degenerate_samples,
        )
        return cls(
            backbone, frame, output, stochastic=stochastic, chunk_size=chunk_size,
            generator=generator,
        )  # fmt: skip

    @classmethod
    def for_graphs(
        cls,
        backbone: nn.Module,
        output: str = "invariant",
        *,
        node_inputs: Iterable[str] = (),
        max_elements: int = 64,
        stochastic: bool | str = False,
        chunk_size: int | str | None = "auto",
        generator: torch.Generator | None = None,
    ) -> FrameAveraging:
        """Frame averaging of graphs (adjacency [B, n, n]) over sort frames of node permutations."""
        frame = PermutationFrame(node_inputs=node_inputs, max_elements=max_elements)
        return cls(
            backbone, frame, output, stochastic=stochastic, chunk_size=chunk_size,
            generator=generator,
        )  # fmt: skip

    @property
    def group(self) -> str:
        return self.frame.group

    def frames(
        self, x: Tensor, mask: Tensor | None = None, weights: Tensor | None = None
    ) -> FrameSet:
        """The frames forward() would use (all elements, before any stochastic draw)."""
        return self.frame.frames(x, mask, weights, self.generator)

    def _use_sample(self) -> bool:
        return self.stochastic == "always" or (self.stochastic is True and self.training)

    def forward(
        self,
        points: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        **extra: Any,
    ) -> Tensor:
        frame = self.frame
        if not isinstance(points, Tensor):
            raise TypeError(f"{frame.input_name} must be a tensor; got {type(points).__name__}")
        unbatched = points.dim() == 2
        if unbatched:
            points = points.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
            weights = None if weights is None else weights.unsqueeze(0)
            extra = {k: v.unsqueeze(0) if isinstance(v, Tensor) else v for k, v in extra.items()}
        missing = [name for name in frame.declared_inputs if name not in extra]
        if missing:
            raise ValueError(
                f"{frame.declared_kind} inputs {missing} were declared but not passed to forward"
            )
        frames = self.frames(points, mask, weights)
        if self._use_sample():
            frames = frames.sample(self.generator)
        self.last_frames = frames
        size, batch = frames.size, points.shape[0]

        canonical = frame.to_canonical(frames, points, mask).flatten(0, 1)  # [F·B, ...]
        inputs: dict[str, Any] = {}
        for name, value in extra.items():
            if name in frame.declared_inputs:
                inputs[name] = frame.input_to_canonical(frames, value).flatten(0, 1)
            elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                inputs[name] = repeat_for_frames(value, size)
            else:
                inputs[name] = value
        if mask is not None:
            inputs["mask"] = frame.mask_to_canonical(frames, mask).flatten(0, 1)
        out = self._call_backbone(canonical, inputs)
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != size * batch:
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"backbone must return a tensor with leading axis F*B = {size * batch}; got {shape}"
            )
        result = frame.pool(frames, out.reshape(size, batch, *out.shape[1:]), self.output)
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

    def extra_repr(self) -> str:
        return f"frame={self.frame!r}, output={self.output!r}, stochastic={self.stochastic!r}"


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
