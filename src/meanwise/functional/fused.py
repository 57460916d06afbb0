"""The fused flavour of the ops: a rule's tensor part compiled with ``torch.compile``.

:data:`FUSED` runs ``update(*tensors, coefficients, ...)`` -- the same tensor part the eager
flavours run (the math lives once, in each rule's module) -- through a compiled copy. Inductor
turns each parameter's dozen elementwise ops into one loop that reads and writes every array
once, which is what torch.optim's ``fused=True`` kernels do by hand.

Nothing recompiles over a run: the step's numbers (bias corrections, step size, decay
factors, the betas and eps) arrive as 0-dim tensors, so the graph depends only on the rule's
structural options (``amsgrad``...), the tensors' shapes, dtypes and device. Each such key gets
its own compiled copy of the code (dynamo counts its recompile limit per code object, so many
models or option sets in one process never push a key back to eager).

When compilation is unavailable (no C++ compiler for the CPU backend, no Triton for CUDA,
dynamo unsupported on this Python) or fails, :data:`FUSED` warns once and runs the foreach
flavour instead: the same numbers, at the eager speed.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from meanwise.functional._ops import FOREACH, LoopInPlace

__all__ = ["FUSED", "FusedInPlace", "compilation_unavailable"]


def compilation_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device`` here, or None if it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch._dynamo does not support this Python"
    if device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            return "no C++ compiler found (inductor's CPU backend needs one, e.g. g++)"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (inductor's CUDA backend needs it)"
    return None


def _fresh_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps compiled graphs per code object."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class FusedInPlace(LoopInPlace):
    """In place, one tensor at a time, scalars possibly 0-dim tensors; ``apply`` compiles.

    The ops are written with plain tensor arithmetic (``x.add_(value * a / b)`` rather than
    ``addcdiv_``, whose ``value`` must be a Python number) in the order of the eager kernels'
    formulas, so the compiled results equal the eager ones to rounding.
    """

    name = "fused"
    in_place = True

    def __init__(self) -> None:
        self._compiled: dict[tuple, Callable] = {}
        self._unavailable: dict[torch.device, str | None] = {}

    # -- ops whose eager form needs a Python number (LoopInPlace's others take 0-dim tensors),
    # or whose plain-arithmetic form compiles to a shorter loop
    @staticmethod
    def lerp(xs, ys, weight):
        # ATen's lerp formula for weight < 0.5 (the usual EMA weights 1 - beta; for larger
        # weights the same value to rounding), without the weight >= 0.5 branch that inductor
        # otherwise computes and blends in for every element.
        for x, y in zip(xs, ys, strict=True):
            x.add_(weight * (y - x))
        return xs

    @staticmethod
    def addcdiv_sigmoid(xs, zs, a, b, value):
        # sigmoid(z) * a / b == a / ((1 + exp(-z)) * b): one division per element instead of
        # two (sigmoid's own 1 / (1 + exp(-z)) and the step's); the same to rounding.
        for x, z, u, v in zip(xs, zs, a, b, strict=True):
            x.add_(value * u / ((1.0 + torch.exp(-z)) * v))
        return xs

    @staticmethod
    def addcmul(xs, a, b, value):
        for x, u, v in zip(xs, a, b, strict=True):
            x.add_(value * u * v)
        return xs

    @staticmethod
    def addcdiv(xs, a, b, value):
        for x, u, v in zip(xs, a, b, strict=True):
            x.add_(value * u / v)
        return xs

    @staticmethod
    def add(xs, ys, alpha=1.0):
        for x, y in zip(xs, ys, strict=True):
            x.add_(y * alpha)
        return xs

    @staticmethod
    def new_add(xs, ys, alpha=1.0):
        return [x + y * alpha for x, y in zip(xs, ys, strict=True)]

    @staticmethod
    def maximum(xs, ys):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(torch.maximum(x, y))
        return xs

    def usable(self, device: torch.device) -> bool:
        """Whether kernels can be compiled for ``device``; warns (once per device) if not."""
        if device not in self._unavailable:
            self._unavailable[device] = compilation_unavailable(device)
            if self._unavailable[device] is not None:
                _warn_fallback(self._unavailable[device])
        return self._unavailable[device] is None

    # -- running a rule ---------------------------------------------------------------------
    def apply(
        self,
        update: Callable[..., Any],
        tensors: Sequence[Sequence[Tensor] | None],
        coefficients: tuple,
        **options: Any,
    ):
        """Run ``update`` compiled, once per (device, dtype) group of rows (parameter ``i`` is
        row ``i`` of every list); returns its result, the input lists updated in place."""
        columns = [list(c) if c is not None else None for c in tensors]
        rows_of: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(columns[0]):
            rows_of.setdefault((p.device, p.dtype), []).append(i)
        results = []
        for (device, dtype), rows in rows_of.items():
            part = [[c[i] for i in rows] if c is not None else None for c in columns]
            results.append(self._run(update, part, coefficients, options, device, dtype))
        if len(results) == 1:
            return results[0]
        return _merge(results, list(rows_of.values()), len(columns[0]))

    def _run(self, update, part, coefficients, options, device, dtype):
        if not self.usable(device):
            return update(*part, coefficients, ops=FOREACH, **options)
        flat = _flat(part)
        # The compiled code has no guards of its own (inductor only asserts sizes and
        # strides), so the key holds everything the graph depends on.
        columns = tuple(len(c) if c is not None else None for c in part)
        layout = tuple((t.shape, t.stride(), t.dtype) for t in flat)
        key = (update, tuple(sorted(options.items())), device, dtype, columns, layout)
        # One host-to-device copy for all the step's numbers, unbound into 0-dim tensors inside
        # the graph (one input instead of one per number).
        scalars = torch.tensor(coefficients, dtype=dtype, device=device)
        step = self._compiled.get(key)
        if step is not None:
            return step(scalars, part)
        if key in self._compiled:  # compiling this key failed before
            return update(*part, coefficients, ops=FOREACH, **options)
        try:
            step = self._compile(update, part, type(coefficients), scalars, options)
            result = step(scalars, part)  # torch.compile's path compiles on this first call
        except Exception as error:
            if not _is_compile_error(error):
                raise
            # Compilation fails before anything runs, so the step is still to be taken.
            self._compiled[key] = None
            reason = f"{type(error).__name__}: {_first_line(error)}"
            _warn_fallback(f"torch.compile failed ({reason})")
            return update(*part, coefficients, ops=FOREACH, **options)
        self._compiled[key] = step
        return result

    def _compile(self, update, part, kind, scalars, options) -> Callable:
        """``update`` compiled: a function of (scalars, tensor lists) returning its result."""
        import torch._inductor

        if not hasattr(torch._inductor, "standalone_compile"):  # torch < 2.8
            name = f"fused_{update.__name__}_{len(self._compiled)}"
            compiled = torch.compile(_fresh_copy(_run_update, name), fullgraph=True, dynamic=False)
            return lambda scalars, part: compiled(update, part, kind, scalars, options, self)
        # Traced once and handed to inductor: no dynamo frame and guards on every call (with
        # many small parameters those cost more than the kernel itself).
        from torch.fx.experimental.proxy_tensor import make_fx

        layout = [len(c) if c is not None else None for c in part]
        traced: list = []

        def flat_update(scalars, *flat):
            columns, i = [], 0
            for n in layout:
                columns.append(None if n is None else list(flat[i : i + n]))
                i += n or 0
            result = update(*columns, kind(*scalars.unbind()), ops=self, **options)
            traced.append(_result_positions(result, flat))

        flat = _flat(part)
        with torch.no_grad():
            graph = make_fx(
                torch.func.functionalize(flat_update, remove="mutations_and_views"),
                tracing_mode="fake",
            )(scalars, *flat)
        artifact = torch._inductor.standalone_compile(
            graph, [scalars, *flat], dynamic_shapes="from_example_inputs"
        )
        return _StandaloneStep(artifact, *traced[-1])


def _run_update(update, tensors, kind, scalars, options, ops):
    return update(*tensors, kind(*scalars.unbind()), ops=ops, **options)


def _flat(part: Sequence[Sequence[Tensor] | None]) -> list[Tensor]:
    return [t for column in part if column is not None for t in column]


class _StandaloneStep:
    """An inductor-compiled rule over flat inputs, and where its result's tensors sit among
    them (the rule updates its inputs in place and returns them)."""

    def __init__(self, artifact: Callable, result_type: type, positions: list) -> None:
        self.artifact, self.result_type, self.positions = artifact, result_type, positions

    def __call__(self, scalars: Tensor, part: Sequence[Sequence[Tensor] | None]):
        flat = _flat(part)
        with torch.no_grad():
            self.artifact(scalars, *flat)
        return self.result_type(
            *(None if p is None else [flat[i] for i in p] for p in self.positions)
        )


def _result_positions(result: tuple, flat: Sequence[Tensor]) -> tuple[type, list]:
    """The in-place contract: every tensor a rule returns is one of its inputs; find which."""
    index = {id(t): i for i, t in enumerate(flat)}
    positions = []
    for field in result:
        if field is None:
            positions.append(None)
            continue
        if any(id(t) not in index for t in field):
            raise _NotInPlace("an in-place rule returned a tensor that is not one of its inputs")
        positions.append([index[id(t)] for t in field])
    return type(result), positions


class _NotInPlace(RuntimeError):
    """Raised while tracing: the rule breaks the in-place contract (warn and fall back)."""


def _merge(results: list[tuple], rows: list[list[int]], n: int) -> tuple:
    """Reassemble per-group results (NamedTuples of lists or None) into the original rows."""
    fields = []
    for f in range(len(results[0])):
        if results[0][f] is None:
            fields.append(None)
            continue
        merged: list[Tensor | None] = [None] * n
        for result, indices in zip(results, rows, strict=True):
            for i, tensor in zip(indices, result[f], strict=True):
                merged[i] = tensor
        fields.append(merged)
    return type(results[0])(*fields)


def _is_compile_error(error: Exception) -> bool:
    import torch._dynamo.exc

    return isinstance(
        error, torch._dynamo.exc.BackendCompilerFailed | torch._dynamo.exc.Unsupported | _NotInPlace
    ) or type(error).__module__.startswith(("torch._inductor", "torch._dynamo"))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _warn_fallback(reason: str | None) -> None:
    warnings.warn(
        f"fused=True: {reason}; running the foreach implementation instead (the same "
        "numbers, without the fused kernels' speed)",
        RuntimeWarning,
        stacklevel=4,
    )


FUSED = FusedInPlace()
