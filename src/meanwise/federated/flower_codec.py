"""The layout of a model's Flower ``ArrayRecord`` as one flat vector (the aggregators' layout).

The floating-point arrays are concatenated in key order into one ``[P]`` vector; non-floating
arrays (e.g. BatchNorm's ``num_batches_tracked``) are passed through from the global model.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord
from torch import Tensor

__all__ = ["ArrayCodec"]


class ArrayCodec:
    """The layout of a model's ``ArrayRecord``: keys, shapes, dtypes, which arrays are averaged.

    ``flatten(record)`` checks that a record has exactly this layout (ValueError otherwise) and
    returns the flat vector of its floating arrays; ``record(flat, like)`` builds the record back,
    taking the non-floating arrays from ``like``.
    """

    def __init__(self, arrays: ArrayRecord) -> None:
        if not isinstance(arrays, ArrayRecord):
            raise TypeError(f"arrays must be a flwr ArrayRecord; got {type(arrays).__name__}")
        state = arrays.to_torch_state_dict()
        if not state:
            raise ValueError("arrays is empty; the global model needs at least one array")
        self.keys = list(state)
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}
        self.floating = [k for k, v in state.items() if v.is_floating_point()]
        if not self.floating:
            raise ValueError("arrays has no floating-point array to aggregate")
        # the flat vector has the widest floating dtype (float64 models stay exact)
        self.dtype = max((self.dtypes[k] for k in self.floating), key=lambda d: d.itemsize)
        self.numel = sum(math.prod(self.shapes[k]) for k in self.floating)

    def state(self, arrays: ArrayRecord) -> OrderedDict[str, Tensor]:
        """``arrays`` as tensors, checked against this layout."""
        state = arrays.to_torch_state_dict()
        if list(state) != self.keys:
            raise ValueError(f"arrays has keys {list(state)}; expected {self.keys}")
        for k, v in state.items():
            if tuple(v.shape) != self.shapes[k] or v.dtype != self.dtypes[k]:
                raise ValueError(
                    f"array {k!r} is {v.dtype} {list(v.shape)}; "
                    f"expected {self.dtypes[k]} {list(self.shapes[k])}"
                )
        return state

    def flatten(self, arrays: ArrayRecord) -> Tensor:
        state = self.state(arrays)
        return torch.cat([state[k].reshape(-1).to(self.dtype) for k in self.floating])

    def record(self, flat: Tensor, like: ArrayRecord) -> ArrayRecord:
        if flat.shape != (self.numel,):
            raise ValueError(f"flat must have shape [{self.numel}]; got {list(flat.shape)}")
        state = self.state(like)
        start = 0
        for k in self.floating:
            n = math.prod(self.shapes[k])
            state[k] = flat[start : start + n].reshape(self.shapes[k]).to(self.dtypes[k])
            start += n
        return ArrayRecord(OrderedDict((k, state[k].contiguous()) for k in self.keys))
