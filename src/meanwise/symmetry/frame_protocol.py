"""What `FrameAveraging` needs of a frame, and the two frames meanwise has.

A frame is the map X ↦ F(X) ⊂ G with F(g·X) = g·F(X). `FrameAveraging` runs the same steps for
every frame: get the frames of the input batch, apply each element's g⁻¹ to the input (and to the
declared equivariant keyword inputs), call the backbone once on the F·B canonical inputs, then
apply g to the outputs and average them (equivariant outputs), or just average them (invariant
ones). A `Frame` supplies the group-specific parts of those steps; the per-batch frames it
returns (`Frames`, `PermutationFrames`) hold the elements, frame-major [F, B, ...], and can draw
one element per input (`sample`, the stochastic mode).

- `PCAFrame`: point clouds [B, N, d] under O(d)/SO(d)/E(d)/SE(d) (`pca_frames`).
- `PermutationFrame`: graphs, adjacency [B, n, n], under node permutations (`permutation_frames`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from meanwise.symmetry.frames import (
    DEFAULT_EIGENGAP_TOL,
    ON_DEGENERATE,
    Frames,
    GroupSpec,
    parse_group,
    pca_frames,
)
from meanwise.symmetry.graph_frames import PermutationFrames, permutation_frames

__all__ = [
    "Frame",
    "FrameSet",
    "PCAFrame",
    "PermutationFrame",
    "POINT_OUTPUTS",
    "GRAPH_OUTPUTS",
    "PERMUTATION_GROUPS",
    "is_permutation_group",
    "repeat_for_frames",
]

POINT_OUTPUTS: tuple[str, ...] = ("invariant", "vector", "position")
GRAPH_OUTPUTS: tuple[str, ...] = ("invariant", "node")
PERMUTATION_GROUPS: tuple[str, ...] = ("SN", "S(N)", "S_N")


def is_permutation_group(group: object) -> bool:
    """Whether `group` names the node permutations of graphs ('Sn', 'S(n)', 'S_n')."""
    return isinstance(group, str) and group.strip().upper() in PERMUTATION_GROUPS


def repeat_for_frames(x: Tensor, size: int) -> Tensor:
    """[B, ...] → [F·B, ...], frame-major: a per-input value seen by every frame element."""
    return x.unsqueeze(0).expand(size, *x.shape).reshape(size * x.shape[0], *x.shape[1:])


@runtime_checkable
class FrameSet(Protocol):
    """The frames of one batch: |F| elements per input, frame-major."""

    @property
    def size(self) -> int: ...

    def sample(self, generator: torch.Generator | None = None) -> FrameSet: ...


@runtime_checkable
class Frame(Protocol):
    """The group-specific steps of frame averaging; see the module docstring.

    Attributes:
        group: the group's name, e.g. 'E(3)' or 'Sn'.
        outputs: the output kinds `pool` accepts ('invariant' and the equivariant ones).
        input_name: what the main input is called in error messages ('points', 'adjacency').
        declared_inputs: names of keyword inputs the group acts on (velocities, node features):
            they go through `input_to_canonical`; other tensor inputs are invariant.
        declared_kind: what those inputs are, for error messages ('vector', 'node').
    """

    group: str
    outputs: tuple[str, ...]
    input_name: str
    declared_inputs: tuple[str, ...]
    declared_kind: str

    def check_output(self, output: str) -> None:
        """Raise ValueError if this frame cannot produce `output`."""
        ...

    def frames(
        self,
        x: Tensor,
        mask: Tensor | None,
        weights: Tensor | None,
        generator: torch.Generator | None,
    ) -> FrameSet:
        """The frames of a batch x [B, ...] (all elements)."""
        ...

    def to_canonical(self, frames: Any, x: Tensor, mask: Tensor | None) -> Tensor:
        """[B, ...] → [F, B, ...]: g⁻¹·x for every element g (padding zeroed where it matters)."""
        ...

    def input_to_canonical(self, frames: Any, value: Tensor) -> Tensor:
        """[B, ...] → [F, B, ...]: g⁻¹ applied to a declared keyword input."""
        ...

    def mask_to_canonical(self, frames: Any, mask: Tensor) -> Tensor:
        """[B, ...] → [F, B, ...]: the mask as each element's canonical input has it."""
        ...

    def pool(self, frames: Any, outputs: Tensor, output: str) -> Tensor:
        """[F, B, ...] → [B, ...]: mean_g g·Φ (equivariant `output`) or mean_g Φ ('invariant')."""
        ...


class PCAFrame:
    """PCA frames of point clouds [B, N, d] for O(d)/SO(d)/E(d)/SE(d); see `pca_frames`.

    Outputs: 'invariant' (any shape, averaged), 'vector' (last axis d, rotated back) or
    'position' (rotated back, then the centroid added; needs translations). `vector_inputs`
    are keyword inputs [B, ..., d] that are rotated into each frame but not centred.
    """

    outputs = POINT_OUTPUTS
    input_name = "points"
    declared_kind = "vector"

    def __init__(
        self,
        group: str | GroupSpec = "E3",
        *,
        vector_inputs: Iterable[str] = (),
        on_degenerate: str = "warn",
        eigengap_tol: float = DEFAULT_EIGENGAP_TOL,
        degenerate_samples: int = 16,
    ) -> None:
        self.spec = group if isinstance(group, GroupSpec) else parse_group(group)
        if on_degenerate not in ON_DEGENERATE:
            raise ValueError(f"on_degenerate must be one of {ON_DEGENERATE}; got {on_degenerate!r}")
        if isinstance(vector_inputs, str):
            raise TypeError("vector_inputs must be a collection of names, not a string")
        self.group = self.spec.name
        self.declared_inputs = tuple(vector_inputs)
        self.on_degenerate = on_degenerate
        self.eigengap_tol = eigengap_tol
        self.degenerate_samples = degenerate_samples

    def check_output(self, output: str) -> None:
        if output not in self.outputs:
            raise ValueError(
                f"output must be one of {self.outputs} for group {self.group!r}; got {output!r}"
            )
        if output == "position" and not self.spec.translations:
            raise ValueError(
                f"output='position' needs a group with translations (E(d)/SE(d)); got "
                f"{self.group}: use output='vector' for O(d)/SO(d)"
            )

    def frames(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Frames:
        return pca_frames(
            x,
            self.spec,
            mask=mask,
            weights=weights,
            eigengap_tol=self.eigengap_tol,
            on_degenerate=self.on_degenerate,
            degenerate_samples=self.degenerate_samples,
            generator=generator,
        )

    def to_canonical(self, frames: Frames, x: Tensor, mask: Tensor | None) -> Tensor:
        framed = frames.canonicalize(x, translate=True)  # [F, B, N, d]
        if mask is not None:
            # padded points are zeroed so a backbone that ignores the mask sees consistent input
            framed = framed * mask.to(framed.dtype).unsqueeze(-1)
        return framed

    def input_to_canonical(self, frames: Frames, value: Tensor) -> Tensor:
        return frames.canonicalize(value, translate=False)

    def mask_to_canonical(self, frames: Frames, mask: Tensor) -> Tensor:
        return mask.unsqueeze(0).expand(frames.size, *mask.shape)

    def pool(self, frames: Frames, outputs: Tensor, output: str) -> Tensor:
        if output == "invariant":
            return frames.average(outputs)
        if outputs.dim() < 3 or outputs.shape[-1] != self.spec.dim:
            raise ValueError(
                f"output={output!r} needs backbone outputs [F*B, ..., d={self.spec.dim}]; got "
                f"{[outputs.shape[0] * outputs.shape[1], *outputs.shape[2:]]}"
            )
        return frames.restore(outputs, translate=output == "position")

    def __repr__(self) -> str:
        return f"PCAFrame({self.group!r}, on_degenerate={self.on_degenerate!r})"


class PermutationFrame:
    """Sort frames of graphs (adjacency [B, n, n]) for node permutations; see
    `permutation_frames`.

    Outputs: 'invariant' (averaged) or 'node' (per-node outputs [B, n, ...], permuted back to
    the input's node order, then averaged). `node_inputs` are keyword inputs [B, n, ...]
    permuted into each element's order; `max_elements` caps |F| per graph.
    """

    group = "Sn"
    outputs = GRAPH_OUTPUTS
    input_name = "adjacency"
    declared_kind = "node"

    def __init__(self, *, node_inputs: Iterable[str] = (), max_elements: int = 64) -> None:
        if isinstance(node_inputs, str):
            raise TypeError("node_inputs must be a collection of names, not a string")
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1; got {max_elements}")
        self.declared_inputs = tuple(node_inputs)
        self.max_elements = max_elements

    def check_output(self, output: str) -> None:
        if output not in self.outputs:
            raise ValueError(
                f"output must be one of {self.outputs} for group {self.group!r}; got {output!r}"
            )

    def frames(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        weights: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PermutationFrames:
        if weights is not None:
            raise ValueError("weights are per-point masses of point clouds; graph frames take none")
        return permutation_frames(x, mask, max_elements=self.max_elements, generator=generator)

    def to_canonical(self, frames: PermutationFrames, x: Tensor, mask: Tensor | None) -> Tensor:
        return frames.canonicalize_adjacency(x)

    def input_to_canonical(self, frames: PermutationFrames, value: Tensor) -> Tensor:
        return frames.canonicalize_nodes(value)

    def mask_to_canonical(self, frames: PermutationFrames, mask: Tensor) -> Tensor:
        return frames.canonicalize_nodes(frames.mask)

    def pool(self, frames: PermutationFrames, outputs: Tensor, output: str) -> Tensor:
        if output == "invariant":
            return frames.average(outputs)
        nodes = frames.mask.shape[1]
        if outputs.dim() < 3 or outputs.shape[2] != nodes:
            raise ValueError(
                f"output='node' needs backbone outputs [F*B, n={nodes}, ...]; got "
                f"{[outputs.shape[0] * outputs.shape[1], *outputs.shape[2:]]}"
            )
        return frames.restore_nodes(outputs)

    def __repr__(self) -> str:
        return f"PermutationFrame(max_elements={self.max_elements})"
