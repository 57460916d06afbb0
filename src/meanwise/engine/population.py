"""S models of one architecture as rows of one tensor ``[S, P]``, with their optimizer state.

What the simulators train: the federated simulator's clients of a round (rows started from
the global model), the gossip simulator's nodes (rows that keep their momentum between
training events). A population knows its layout (which slice of a row is which named
parameter), its device and its dtype; its optimizer state is one ``[S, P]`` tensor per slot
of the local rule, laid out like the parameters, so the elementwise rules can run on the
flat rows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from meanwise.engine.layout import ParameterLayout

__all__ = ["Population"]


@dataclass(frozen=True)
class Population:
    """``params [S, P]`` in ``layout`` and ``state``: one ``[S, P]`` tensor per state slot
    (same device and dtype). Immutable: training returns a new population.

    ``buffers`` holds each model's own buffers where training changed them (the sequential
    execution updates BatchNorm statistics per model); empty while the models share the
    module's buffers (the stacked and vmap executions never change them).
    """

    layout: ParameterLayout
    params: Tensor
    state: tuple[Tensor, ...] = field(default_factory=tuple)
    buffers: tuple[dict[str, Tensor], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, ParameterLayout):
            raise TypeError(f"layout must be a ParameterLayout; got {type(self.layout).__name__}")
        if not isinstance(self.params, Tensor) or self.params.dim() != 2:
            raise ValueError(f"params must be a tensor [S, P]; got {_describe(self.params)}")
        if self.params.shape[1] != self.layout.numel:
            raise ValueError(
                f"params has {self.params.shape[1]} columns; the layout has {self.layout.numel}"
            )
        if self.params.dtype != self.layout.dtype:
            raise ValueError(f"params are {self.params.dtype}; the layout is {self.layout.dtype}")
        object.__setattr__(self, "state", tuple(self.state))
        object.__setattr__(self, "buffers", tuple(self.buffers))
        if self.buffers and len(self.buffers) != self.size:
            raise ValueError(f"buffers has {len(self.buffers)} entries for {self.size} models")
        for i, slot in enumerate(self.state):
            if not isinstance(slot, Tensor) or slot.shape != self.params.shape:
                raise ValueError(
                    f"state[{i}] must be like params {list(self.params.shape)}; "
                    f"got {_describe(slot)}"
                )
            if slot.dtype != self.params.dtype or slot.device != self.params.device:
                raise ValueError(
                    f"state[{i}] is {slot.dtype} on {slot.device}; params are "
                    f"{self.params.dtype} on {self.params.device}"
                )

    @staticmethod
    def of_model(
        model: nn.Module,
        size: int,
        *,
        state_slots: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Population:
        """``size`` copies of ``model``'s parameters (on ``device`` in ``dtype``; by default
        those of the parameters) with zero optimizer state."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        layout = ParameterLayout.of(model)
        if dtype is not None:
            layout = layout.with_dtype(dtype)
        row = layout.flatten({k: v.detach() for k, v in model.named_parameters()})
        row = row.to(device=device, dtype=layout.dtype)
        return Population.zeros_state(layout, row.expand(size, -1).clone(), state_slots)

    @staticmethod
    def zeros_state(layout: ParameterLayout, params: Tensor, state_slots: int) -> Population:
        """``params`` with ``state_slots`` zero state tensors (a round's fresh optimizer)."""
        if isinstance(state_slots, bool) or not isinstance(state_slots, int) or state_slots < 0:
            raise ValueError(f"state_slots must be an int >= 0; got {state_slots!r}")
        return Population(
            layout, params, tuple(torch.zeros_like(params) for _ in range(state_slots))
        )

    @property
    def size(self) -> int:
        """S, the number of models."""
        return int(self.params.shape[0])

    @property
    def device(self) -> torch.device:
        return self.params.device

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    def parameters(self) -> dict[str, Tensor]:
        """Each named parameter as a view ``[S, *shape]`` of :attr:`params`."""
        return self.layout.unflatten(self.params)

    def state_tensors(self) -> list[dict[str, Tensor]]:
        """Per state slot, each named parameter's state as a view ``[S, *shape]``."""
        return [self.layout.unflatten(slot) for slot in self.state]

    def rows(self, index: Tensor | Sequence[int]) -> Population:
        """The models ``index`` (copies), with their state."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
        return Population(
            self.layout,
            self.params.index_select(0, index),
            tuple(slot.index_select(0, index) for slot in self.state),
            tuple(self.buffers[i] for i in index.tolist()) if self.buffers else (),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Population:
        """This population on ``device`` in ``dtype`` (itself when nothing changes)."""
        layout = self.layout if dtype is None else self.layout.with_dtype(dtype)
        params = self.params.to(device=device, dtype=layout.dtype)
        if params is self.params:
            return self
        state = tuple(s.to(device=device, dtype=layout.dtype) for s in self.state)
        buffers = tuple(
            {k: _buffer_to(v, device, dtype) for k, v in b.items()} for b in self.buffers
        )
        return Population(layout, params, state, buffers)


def _buffer_to(buffer: Tensor, device, dtype) -> Tensor:
    # integer buffers (BatchNorm's num_batches_tracked) keep their dtype
    return buffer.to(device=device, dtype=dtype if buffer.is_floating_point() else None)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {list(value.shape)}"
    return type(value).__name__
