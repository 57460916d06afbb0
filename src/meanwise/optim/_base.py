"""What the three optimizer shells share: argument checks, gathering gradients, state buckets.

The classes hold state and choose an execution flavour; the math is in ``meanwise.functional``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from meanwise.functional import FOREACH, LOOP
from meanwise.functional.fused import FUSED

Closure = Callable[[], Any] | None

# On the CPU an update is a dozen elementwise passes over the parameters; run one after the
# other over whole tensors, each pass streams every array through DRAM. Running the whole rule
# on slices of about this many elements keeps the slices in cache between passes (a poor man's
# kernel fusion) and makes the rule's temporaries small. benchmarks/optim_step.py measures it.
CPU_CHUNK_ELEMENTS = 1 << 18


def chunked(columns: list[list[Tensor]], chunk: int) -> Iterator[list[list[Tensor]]]:
    """Cut aligned lists of tensors (params, grads, state...) into bundles of ~``chunk`` elements.

    Row i of every column is one parameter's tensors. A row larger than ``chunk`` whose
    tensors are all contiguous and equally shaped is sliced into flat views; smaller rows are
    gathered until a bundle holds ``chunk`` elements (so many small tensors still go to one
    multi-tensor kernel). Views write through, so in-place rules update the real tensors.
    """
    current: list[list[Tensor]] = [[] for _ in columns]
    size = 0
    for i in range(len(columns[0])):
        row = [column[i] for column in columns]
        numel = row[0].numel()
        sliceable = numel > chunk and all(
            t.is_contiguous() and t.shape == row[0].shape for t in row
        )
        if sliceable:
            flats = [t.view(-1) for t in row]
            pieces = [[f[start : start + chunk] for f in flats] for start in range(0, numel, chunk)]
        else:
            pieces = [row]
        for piece in pieces:
            for column, tensor in zip(current, piece, strict=True):
                column.append(tensor)
            size += piece[0].numel()
            if size >= chunk:
                yield current
                current = [[] for _ in columns]
                size = 0
    if current[0]:
        yield current


def as_learning_rate(lr: Any) -> float:
    """``lr`` as a Python float: numbers, or a one-element tensor as torch.optim accepts."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element; got shape {list(lr.shape)}")
        return float(lr)
    return lr


def check_fused(fused: bool | None, foreach: bool | None, differentiable: bool) -> None:
    """torch.optim's refusals for ``fused=True`` (same messages), and ``differentiable``,
    which these optimizers do not offer (their step runs under ``torch.no_grad``)."""
    if differentiable:
        if fused:
            raise RuntimeError("`fused` does not support `differentiable`")
        raise RuntimeError(
            "differentiable=True is not supported (the step runs under torch.no_grad)"
        )
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_hyperparameters(
    lr: float | Tensor, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    """Raise ValueError naming the argument when a common hyperparameter is out of range."""
    lr = as_learning_rate(lr)
    if not isinstance(lr, float | int) or not lr >= 0.0:
        raise ValueError(f"lr must be a non-negative number; got {lr!r}")
    if (
        not isinstance(betas, tuple | list)
        or len(betas) != 2
        or not all(isinstance(b, float | int) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"betas must be a pair of numbers in [0, 1); got {betas!r}")
    if not isinstance(eps, float | int) or not eps >= 0.0:
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    if not isinstance(weight_decay, float | int) or not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be a non-negative number; got {weight_decay!r}")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def parameter_name(group: dict, group_index: int, param_index: int) -> str:
    """The user's name for a parameter when they passed named_parameters(), else its position."""
    names = group.get("param_names")
    if names is not None:
        return repr(names[param_index])
    return f"param_groups[{group_index}]['params'][{param_index}]"


class FunctionalOptimizer(Optimizer):
    """A torch.optim.Optimizer whose update is a rule from ``meanwise.functional``."""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load (group options, including constructor options such as ``lr`` or
        ``update_each``, come from the checkpoint, as in torch.optim), keeping the float32
        state of float16/bfloat16 parameters in float32 (torch would cast it to the parameter's
        dtype and lose the precision the float32 state exists for)."""
        saved_state = state_dict.get("state", {})
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for p, param_id in zip(params, saved_ids, strict=False):
            saved = saved_state.get(param_id)
            if not saved or p.dtype not in LOW_PRECISION:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor) and value.dtype == torch.float32:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    @staticmethod
    def _ops_for(group: dict, params: list[Tensor]):
        """fused=True: the compiled rule (the foreach kernels, with a warning, where nothing
        can be compiled). foreach=None picks the multi-tensor kernels unless the list mixes
        devices/dtypes, which those kernels would split anyway (benchmarks/optim_step.py
        measures both)."""
        if group.get("fused"):
            devices = {p.device for p in params}
            return FUSED if all(FUSED.usable(d) for d in devices) else FOREACH
        foreach = group.get("foreach")
        if foreach is None:
            first = params[0]
            foreach = all(p.device == first.device and p.dtype == first.dtype for p in params)
        return FOREACH if foreach else LOOP

    @staticmethod
    def _bundles(ops, columns: list[list[Tensor]]) -> Iterator[list[list[Tensor]]]:
        """The bundles the rule runs on: cache-sized chunks for in-place multi-tensor runs on
        the CPU, the whole lists otherwise (on accelerators a launch per chunk costs more)."""
        if ops is FOREACH and columns[0][0].device.type == "cpu":
            yield from chunked(columns, CPU_CHUNK_ELEMENTS)
        else:
            yield columns

    def _init_state(self, group: dict, params: list[Tensor], keys: Iterable[str]) -> None:
        """Give each parameter a step count (a float32 tensor, as torch.optim keeps it) and zero
        buffers for ``keys`` it does not have. Buffers of float16/bfloat16 parameters are
        float32 unless the group says ``state_in_float32=False``."""
        upcast = group.get("state_in_float32", True)
        for p in params:
            state = self.state[p]
            step = state.get("step")
            if not isinstance(step, Tensor):  # absent, or an int from an older checkpoint
                state["step"] = torch.tensor(float(step or 0), dtype=torch.float32)
            dtype = torch.float32 if upcast and p.dtype in LOW_PRECISION else p.dtype
            for key in keys:
                if key not in state:
                    state[key] = torch.zeros_like(
                        p, dtype=dtype, memory_format=torch.preserve_format
                    )

    def _apply_rule(
        self,
        group: dict,
        params: list[Tensor],
        columns_of: Callable[[list[int], list[dict]], list[list[Tensor]]],
        rule: Callable[..., Any],
        **hyperparameters: Any,
    ) -> None:
        """Run ``rule(*columns, step=t, ops=..., **hyperparameters)`` on ``params``: once per
        step-count bucket, on the execution bundles, then advance those parameters' steps.

        ``columns_of(indices, states)`` lists the rule's tensor arguments for the parameters
        ``params[i] for i in indices`` (params, gradients, state buffers...), one row per
        parameter; column 0 must be the parameters and column 1 the gradients (read only).
        Complex parameters run on their ``view_as_real`` (torch.optim's convention), and
        float16/bfloat16 ones on float32 copies written back after the rule (the update's
        small terms, eps = 1e-16 among them, underflow in half precision).
        """
        ops = self._ops_for(group, params)
        for step, indices in self._buckets(params).items():
            states = [self.state[params[i]] for i in indices]
            for bundle in self._bundles(ops, columns_of(indices, states)):
                computed, write_back = _computation_views(bundle)
                rule(*computed, step=step + 1, ops=ops, **hyperparameters)
                for target, source in write_back:
                    target.copy_(source)
            torch._foreach_add_([s["step"] for s in states], 1.0)

    def _gradients(
        self, group_index: int, group: dict, apply_maximize: bool = True
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters of a group that have gradients, and those gradients (negated when
        the group maximizes, unless ``apply_maximize=False``)."""
        params, grads = [], []
        for param_index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter {parameter_name(group, group_index, param_index)})"
                )
            params.append(p)
            grads.append(p.grad)
        if group.get("check_finite") and grads:
            self._check_finite(group_index, group, grads)
        if apply_maximize and group.get("maximize") and grads:
            grads = torch._foreach_neg(grads)  # new tensors: the user's .grad stays as it is
        return params, grads

    @staticmethod
    def _check_finite(group_index: int, group: dict, grads: list[Tensor]) -> None:
        # One reduction and one host sync for the whole group; locate only on failure.
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        if bool(finite):
            return
        with_grad = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        for param_index, g in zip(with_grad, grads, strict=True):
            if not bool(torch.isfinite(g).all()):
                name = parameter_name(group, group_index, param_index)
                raise ValueError(
                    f"non-finite gradient (nan or inf) in parameter {name} "
                    f"(shape {list(g.shape)}); the step was not applied"
                )

    def _buckets(self, params: list[Tensor]) -> dict[int, list[int]]:
        """Indices of ``params`` grouped by their step count.

        Parameters that missed steps (no gradient) have their own bias corrections; grouping
        keeps every call of the rule at one step count while still batching the usual case
        (all parameters stepped together) into a single call.
        """
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            buckets[int(self.state[p]["step"])].append(i)
        return buckets

    @staticmethod
    def _run_closure(closure: Closure) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def _computation_views(
    columns: list[list[Tensor]],
) -> tuple[list[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """The tensors a rule computes on, and (original, computed) pairs to copy back after it.

    Rows are parameters; column 0 the parameters, column 1 their gradients. A complex row runs
    on ``view_as_real`` views (they write through). A float16/bfloat16 row runs on float32
    copies; every column but the gradients is copied back into the original after the rule.
    """
    rows = range(len(columns[0]))
    if not any(columns[0][i].is_complex() or columns[0][i].dtype in LOW_PRECISION for i in rows):
        return columns, []
    computed: list[list[Tensor]] = [list(column) for column in columns]
    write_back: list[tuple[Tensor, Tensor]] = []
    for i in rows:
        param = columns[0][i]
        if param.is_complex():
            for column in computed:
                column[i] = torch.view_as_real(column[i])
        elif param.dtype in LOW_PRECISION:
            for c, column in enumerate(computed):
                original = column[i]
                if original.dtype in LOW_PRECISION:
                    column[i] = original.float()
                    if c != 1:
                        write_back.append((original, column[i]))
    return computed, write_back
