"""A model's parameters as one flat vector, and stacks of them: ``[S, P]``.

Both simulators keep their models as rows of one tensor (the federated simulator its global
model and the round's clients, the gossip simulator every node): training, aggregation,
merging and sending are then batched tensor operations, and the distributed gossip runner
sends these rows over the wire. The layout records which slice of a row is which named tensor,
so per-tensor operations (the gossip variance correction) still see every tensor on its own.

One layout for the whole library (it replaced ``federated.simulator.flatten``/``unflatten``
and ``gossip.flat``): validated (keys, shapes and widths are checked, not trusted), cached
(a frozen dataclass whose derived slices are computed once), and convertible to and from a
``dict[str, numpy.ndarray]``, the form a Flower ``ArrayRecord`` is built from and read as.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor, nn

from meanwise.average import element_variance

__all__ = ["ParameterLayout", "layer_variances"]


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
        """The layout of ``model.named_parameters()``."""
        return ParameterLayout.of_tensors(dict(model.named_parameters()), what="model")

    @staticmethod
    def of_tensors(
        tensors: Mapping[str, Tensor], what: str = "tensors", *, batch_dims: int = 0
    ) -> ParameterLayout:
        """The layout of a dict of tensors, in its key order; with ``batch_dims`` the leading
        axes (stacked models ``[S, *shape]``) are not part of the parameters' shapes."""
        if not tensors:
            raise ValueError(f"{what} has no parameters")
        if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"batch_dims must be an int >= 0; got {batch_dims!r}")
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype; got {sorted(map(str, dtypes))}")
        lead = {tuple(t.shape[:batch_dims]) for t in tensors.values()}
        short = [k for k, t in tensors.items() if t.dim() < batch_dims]
        if short or len(lead) != 1:
            raise ValueError(
                f"{what} must share their first {batch_dims} (batch) axes; got leading shapes "
                f"{sorted(lead)}" + (f" ({short[:3]} have fewer axes)" if short else "")
            )
        shapes = tuple(tuple(t.shape[batch_dims:]) for t in tensors.values())
        return ParameterLayout(tuple(tensors), shapes, dtypes.pop())

    def with_dtype(self, dtype: torch.dtype) -> ParameterLayout:
        """The same names and shapes in ``dtype`` (a model simulated in another precision)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
        return self if dtype == self.dtype else ParameterLayout(self.names, self.shapes, dtype)

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
            name: flat[..., piece].reshape((*lead, *shape))
            for name, piece, shape in zip(self.names, self._slices, self.shapes, strict=True)
        }

    def to_arrays(self, flat: Tensor) -> dict[str, np.ndarray]:
        """``flat [P]`` as named numpy arrays (copies, in layout order): what a Flower
        ``ArrayRecord`` is made from (``ArrayRecord(numpy_ndarrays=...)`` takes their values)."""
        if flat.dim() != 1:
            raise ValueError(f"flat must be one model [P]; got shape {list(flat.shape)}")
        return {
            name: tensor.detach().cpu().numpy().copy()
            for name, tensor in self.unflatten(flat).items()
        }

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Tensor:
        """The flat ``[P]`` vector (this layout's dtype) of named numpy arrays shaped as the
        parameters (e.g. a Flower ``ArrayRecord``'s ``to_numpy_ndarrays`` zipped with its
        keys); keys and shapes are checked like :meth:`flatten`'s."""
        tensors = {}
        for name, array in arrays.items():
            if not isinstance(array, np.ndarray):
                raise TypeError(f"arrays[{name!r}] is {type(array).__name__}, not numpy.ndarray")
            tensors[name] = torch.from_numpy(np.ascontiguousarray(array)).to(self.dtype)
        return self.flatten(tensors)


def layer_variances(flat: Tensor, layout: ParameterLayout) -> Tensor:
    """``[..., L]``: each tensor's unbiased variance over its elements, for flat models
    ``[..., P]`` (0 for one-element tensors, which have no spread). A gossip sender computes
    this once per push; every receiver's merge reuses it instead of recomputing it per buffer."""
    batch_dims = flat.dim() - 1
    columns = [
        element_variance(flat[..., piece], batch_dims=batch_dims)
        if template.numel() > 1
        else flat.new_zeros(flat.shape[:-1])
        for _, piece, template in layout.entries()
    ]
    return torch.stack(columns, dim=-1).to(flat.dtype)
