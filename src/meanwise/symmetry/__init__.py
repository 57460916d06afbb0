"""Frame averaging (Puny et al., ICLR 2022): exact symmetry for any backbone.

`pca_frames` builds the frames of point clouds for O(d)/SO(d)/E(d)/SE(d), `permutation_frames`
those of graphs for S_n; `FrameAveraging` wraps a backbone (`for_points`, `for_graphs`) and runs
one forward over the `Frame` protocol (`PCAFrame`, `PermutationFrame`); `nbody` and `models`
hold the charged-particle simulator and the n-body models of the paper's experiment.
"""

from meanwise.symmetry.frame_averaging import (
    GRAPH_OUTPUTS,
    OUTPUTS,
    FrameAveraging,
    reframe,
    repeat_for_frames,
)
from meanwise.symmetry.frame_protocol import Frame, PCAFrame, PermutationFrame
from meanwise.symmetry.frames import (
    DegenerateFrameError,
    DegenerateFrameWarning,
    Frames,
    GroupSpec,
    parse_group,
    pca_frames,
    relative_eigengaps,
)
from meanwise.symmetry.graph_frames import (
    GIN,
    AdjacencyMLP,
    PermutationFrames,
    permutation_frames,
    spectral_node_features,
)

__all__ = [
    "FrameAveraging",
    "Frame",
    "PCAFrame",
    "PermutationFrame",
    "OUTPUTS",
    "GRAPH_OUTPUTS",
    "reframe",
    "repeat_for_frames",
    "PermutationFrames",
    "permutation_frames",
    "spectral_node_features",
    "GIN",
    "AdjacencyMLP",
    "DegenerateFrameError",
    "DegenerateFrameWarning",
    "Frames",
    "GroupSpec",
    "parse_group",
    "pca_frames",
    "relative_eigengaps",
]
