"""Frame averaging (Puny et al., ICLR 2022): exact symmetry for any backbone.

`pca_frames` builds the frames of point clouds for O(d)/SO(d)/E(d)/SE(d), `permutation_frames`
those of graphs for S_n; `FrameAveraging` wraps a backbone; `nbody` and `models` hold the
charged-particle simulator and the n-body models of the paper's experiment.
"""

from meanwise.symmetry.frame_averaging import OUTPUTS, FrameAveraging, repeat_for_frames
from meanwise.symmetry.frames import (
    DegenerateFrameError,
    DegenerateFrameWarning,
    Frames,
    GroupSpec,
    parse_group,
    pca_frames,
    relative_eigengaps,
)

__all__ = [
    "FrameAveraging",
    "OUTPUTS",
    "repeat_for_frames",
    "DegenerateFrameError",
    "DegenerateFrameWarning",
    "Frames",
    "GroupSpec",
    "parse_group",
    "pca_frames",
    "relative_eigengaps",
]
