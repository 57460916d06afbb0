"""`MergeOptions`: how Fishers become elementwise merge weights, the one way to pass them.

- floor: ``max(F, floor)`` (the authors) or ``F + floor`` (FusionBench); with ``favor_target``
  only the target (model 0) is floored, so a donor's zero Fisher defers to the target;
- normalize: λ_i / ‖F_i‖, one global L2 norm of model i's *raw* Fisher over all merged tensors,
  so models whose Fishers differ in scale (more data, another loss) weigh alike;
- missing: tensors without a Fisher (buffers, frozen parameters) are λ-averaged or refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["MergeOptions", "FLOOR_MODES", "MISSING", "PRESETS", "is_finite_number"]

FLOOR_MODES = ("max", "add")
MISSING = ("average", "error")
PRESETS = ("authors",)


def is_finite_number(value: object) -> bool:
    """A finite int or float (a bool is not a number here: ``floor: true`` is a typo)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value)


@dataclass(frozen=True)
class MergeOptions:
    """How Fishers become elementwise weights (see the module docstring)."""

    floor: float = 1e-6
    floor_mode: str = "max"
    favor_target: bool = False
    normalize: bool = False
    missing: str = "average"

    def __post_init__(self) -> None:
        if self.floor_mode not in FLOOR_MODES:
            raise ValueError(f"floor_mode must be one of {FLOOR_MODES}; got {self.floor_mode!r}")
        if self.missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}; got {self.missing!r}")
        if not is_finite_number(self.floor):
            raise TypeError(f"floor must be a finite number; got {self.floor!r}")
        if self.floor < 0:
            raise ValueError(f"floor must be >= 0; got {self.floor}")
        for flag in ("favor_target", "normalize"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be true or false; got {getattr(self, flag)!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_preset(cls, preset: str | None, **overrides) -> MergeOptions:
        """``preset="authors"``: floor max(F, 1e-6) on the target only, normalized Fishers.

        An option given in `overrides` always wins over the preset's value
        (``from_preset("authors", normalize=False)``): nothing passed is silently ignored.
        """
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown merge options {unknown}; known: {sorted(cls.names())}")
        if preset is None:
            return cls(**overrides)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS} or None; got {preset!r}")
        base = {"floor": 1e-6, "floor_mode": "max", "favor_target": True, "normalize": True}
        return cls(**{**base, **overrides})
