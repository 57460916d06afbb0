"""The layout of a model's Flower ``ArrayRecord`` as one flat vector (the aggregators' layout).

The floating-point arrays are concatenated in key order into one ``[P]`` vector by the
library's one :class:`~meanwise.engine.layout.ParameterLayout` (the layout the simulators and
the gossip runner use); non-floating arrays (e.g. BatchNorm's ``num_batches_tracked``) are
passed through from the global model.
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import ArrayRecord
from torch import Tensor

from meanwise.engine.layout import ParameterLayout

__all__ = ["ArrayCodec"]


class ArrayCodec:
    """The layout of a model's ``ArrayRecord``: keys, shapes, dtypes, which arrays are averaged.

    ``flatten(record)`` checks that a record has exactly this layout (ValueError otherwise) and
    returns the flat vector of its floating arrays; ``record(flat, like)`` builds the record back,
    taking the non-floating arrays from ``like``. ``layout`` is the
    :class:`~meanwise.engine.layout.ParameterLayout` of the floating arrays; its dtype is the
    widest floating dtype of the record (a float64 model stays exact; a mixed-precision record
    is averaged in its widest dtype and cast back per array).
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
        self.dtype = max((self.dtypes[k] for k in self.floating), key=lambda d: d.itemsize)
        self.layout = ParameterLayout(
            tuple(self.floating), tuple(self.shapes[k] for k in self.floating), self.dtype
        )
        self.numel = self.layout.numel

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
        return self.layout.flatten({k: state[k].to(self.dtype) for k in self.floating})

    def record(self, flat: Tensor, like: ArrayRecord) -> ArrayRecord:
        if flat.shape != (self.numel,):
            raise ValueError(f"flat must have shape [{self.numel}]; got {list(flat.shape)}")
        state = self.state(like)
        # the layout's slices, reshaped here: ParameterLayout.unflatten cannot give a 0-dim
        # array back (reshape(*(), *()) has no arguments), and a record may hold scalars
        for k, piece, template in self.layout.entries():
            state[k] = flat[piece].reshape(template.shape).to(self.dtypes[k])
        return ArrayRecord(OrderedDict((k, state[k].contiguous()) for k in self.keys))
