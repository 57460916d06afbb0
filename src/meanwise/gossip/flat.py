"""A model's parameters as one flat vector, and stacks of them: ``[n_nodes, P]``.

The gossip simulator keeps every node's model as a row of one tensor (training, merging and
sending are then batched tensor operations) and the distributed runner sends these rows over
the wire; the layout records which slice of a row is which named tensor, so merges can still
treat every tensor on its own (the variance correction is per tensor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

__all__ = ["ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and dtype of a model's parameters, in ``named_parameters`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a layout needs at least one parameter")
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names but {len(self.shapes)} shapes")

    @staticmethod
    def of(model: nn.Module) -> ParameterLayout:
        params = list(model.named_parameters())
        if not params:
            raise ValueError("model has no parameters")
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype; got {sorted(map(str, dtypes))}")
        return ParameterLayout(
            tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params), dtypes.pop()
        )

    # Cached (the layout is frozen): the simulator reads these in every training and merge
    # call, and recomputing them was a visible part of a small call's fixed cost.
    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    @cached_property
    def _slices(self) -> tuple[slice, ...]:
        out, start = [], 0
        for size in self.sizes:
            out.append(slice(start, start + size))
            start += size
        return tuple(out)

    @cached_property
    def _entries(self) -> tuple[tuple[str, slice, Tensor], ...]:
        return tuple(
            (name, piece, torch.empty(shape, dtype=self.dtype, device="meta"))
            for name, piece, shape in zip(self.names, self._slices, self.shapes, strict=True)
        )

    def slices(self) -> list[slice]:
        return list(self._slices)

    def entries(self) -> Iterator[tuple[str, slice, Tensor]]:
        """(name, slice of the flat vector, a meta tensor with the parameter's shape/dtype)."""
        return iter(self._entries)

    def flatten(self, params: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """``[*batch, P]`` from a dict of ``[*batch, *shape]`` tensors (keys as the layout)."""
        if set(params) != set(self.names):
            raise ValueError(
                f"params keys {sorted(params)[:5]} do not match the layout {list(self.names)[:5]}"
            )
        lead = params[self.names[0]].shape[:batch_dims]
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            tensor = params[name]
            if tuple(tensor.shape) != (*lead, *shape):
                raise ValueError(
                    f"parameter {name!r} has shape {list(tensor.shape)}; expected {[*lead, *shape]}"
                )
            parts.append(tensor.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat [*batch, P]`` shaped as the parameters (with the batch axes)."""
        if flat.shape[-1] != self.numel:
            raise ValueError(
                f"flat has {flat.shape[-1]} entries on its last axis; need {self.numel}"
            )
        lead = flat.shape[:-1]
        return {
            name: flat[..., piece].reshape(*lead, *shape)
            for name, piece, shape in zip(self.names, self._slices, self.shapes, strict=True)
        }
