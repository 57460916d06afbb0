"""Equivariance checks shared by the test suite and users: `assert_equivariant(fn, group, ...)`.

Modelled on e3nn's ``assert_equivariant``: draw random group elements, act with them on the
inputs and on the outputs of ``fn`` by the representation declared for each, and compare
``fn(g·x)`` with ``g·fn(x)``. Every tensor carries a leading batch axis B and every sample b gets
its own element g_b (so a function that mixes samples is caught as well). The error of sample b
is ``‖fn(g·x)_b − (g·fn(x))_b‖ / ‖(g·fn(x))_b‖`` (the absolute norm where the expected output is
zero); the check fails when the worst one over outputs, samples and trials exceeds the
tolerance, and its message names that error, the output, the sample and the element g.

Groups (``group`` is a name, a `Group`, or a sequence of them for their product):
- 'O3', 'SO3', 'E3', 'SE3' and 'O(d)'-style names (any d): g = (R, t) with R Haar-distributed
  in O(d) (det +1 for SO/SE) and t ~ N(0, I) for E/SE (0 for O/SO). It acts on 'vector'
  ([B, ..., d] ↦ x Rᵀ) and 'position' ([B, ..., d] ↦ x Rᵀ + t).
- 'Sn': a uniform permutation π of the n nodes. It acts on 'node' ([B, n, ...] ↦ x[:, π]) and
  'adjacency' ([B, n, n, ...] ↦ A[:, π][:, :, π]).

A representation is 'invariant' or a space-separated combination of one word of each kind:
'position', 'node', 'node position' (per-node coordinates: permuted by S_n, moved by E(d)),
'node vector', 'adjacency'. A group leaves alone what it does not act on, so ``("E3", "Sn")``
checks E(3) × S_n at once, and a point cloud is declared 'node position' for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from meanwise.symmetry.frame_protocol import is_permutation_group
from meanwise.symmetry.frames import GroupSpec, parse_group
from meanwise.symmetry.shapes import random_orthogonal

__all__ = [
    "Group",
    "EuclideanGroup",
    "PermutationGroup",
    "EquivarianceCheck",
    "REPRESENTATION_WORDS",
    "parse_representation",
    "group_from_name",
    "equivariance_error",
    "assert_equivariant",
    "DEFAULT_TOLERANCE",
]

# relative error allowed by default, by the lowest precision among the outputs: a few hundred
# roundings of float32 (the frame-averaging tests' bound) and of float64
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

# the words of a representation, by kind: at most one of each kind in a representation
NODE_WORDS: tuple[str, ...] = ("node", "adjacency")
SPACE_WORDS: tuple[str, ...] = ("vector", "position")
REPRESENTATION_WORDS: tuple[str, ...] = ("invariant", *NODE_WORDS, *SPACE_WORDS)

Input = tuple[Any, str]


def parse_representation(representation: str) -> tuple[str, ...]:
    """'node position' → ('node', 'position'); 'invariant' → (); bad names raise ValueError."""
    if not isinstance(representation, str):
        raise TypeError(f"a representation must be a string; got {type(representation)}")
    words = representation.split()
    if words == ["invariant"]:
        return ()
    node = [w for w in words if w in NODE_WORDS]
    space = [w for w in words if w in SPACE_WORDS]
    if not words or len(node) > 1 or len(space) > 1 or len(node) + len(space) != len(words):
        raise ValueError(
            f"representation must be 'invariant' or at most one of {NODE_WORDS} with at most one "
            f"of {SPACE_WORDS} (e.g. 'node position'); got {representation!r}"
        )
    return (*node, *space)


@runtime_checkable
class Group(Protocol):
    """A group `assert_equivariant` can draw elements of and act with.

    ``words``: the representation words it acts on; ``sample(batch, nodes, generator)`` draws
    one element per sample (``nodes`` is n, or None when no input has a node axis);
    ``act(element, word, x)`` applies the elements to a batched tensor of that word;
    ``describe(element, index)`` is sample ``index``'s element, for messages.
    """

    name: str
    words: tuple[str, ...]

    def sample(self, batch: int, nodes: int | None, generator: torch.Generator) -> Any: ...

    def act(self, element: Any, word: str, x: Tensor) -> Tensor: ...

    def describe(self, element: Any, index: int) -> str: ...


@dataclass(frozen=True)
class EuclideanElements:
    """B elements (R_b, t_b) of E(d): rotations [B, d, d] and translations [B, d], float64."""

    rotations: Tensor
    translations: Tensor


@dataclass(frozen=True)
class EuclideanGroup:
    """O(d), SO(d), E(d) or SE(d), from a `GroupSpec` (see `parse_group`)."""

    spec: GroupSpec
    words: tuple[str, ...] = SPACE_WORDS

    @property
    def name(self) -> str:
        return self.spec.name

    def sample(
        self, batch: int, nodes: int | None, generator: torch.Generator
    ) -> EuclideanElements:
        d = self.spec.dim
        rotations = random_orthogonal(batch, d, generator=generator)
        if self.spec.proper:
            # flipping the first axis of the improper ones keeps the draw Haar on SO(d)
            flip = torch.where(torch.linalg.det(rotations) < 0, -1.0, 1.0).to(rotations)
            signs = torch.cat([flip[:, None], torch.ones(batch, d - 1, dtype=flip.dtype)], 1)
            rotations = rotations * signs[:, None, :]
        translations = torch.zeros(batch, d, dtype=torch.float64)
        if self.spec.translations:
            translations = torch.randn(batch, d, generator=generator, dtype=torch.float64)
        return EuclideanElements(rotations, translations)

    def act(self, element: EuclideanElements, word: str, x: Tensor) -> Tensor:
        d = self.spec.dim
        if x.dim() < 2 or x.shape[-1] != d:
            raise ValueError(
                f"a {word!r} of {self.name} must have shape [B, ..., d={d}]; got {list(x.shape)}"
            )
        rotations = element.rotations.to(device=x.device, dtype=x.dtype)
        out = x.reshape(x.shape[0], -1, d) @ rotations.transpose(-1, -2)
        if word == "position":
            out = out + element.translations.to(device=x.device, dtype=x.dtype).unsqueeze(1)
        return out.reshape(x.shape)

    def describe(self, element: EuclideanElements, index: int) -> str:
        r = element.rotations[index]
        text = f"R = {_rounded(r)} (det {float(torch.linalg.det(r)):+.0f})"
        if self.spec.translations:
            text += f", t = {_rounded(element.translations[index])}"
        return text


@dataclass(frozen=True)
class PermutationGroup:
    """The permutations of n nodes, acting on node features and adjacency matrices."""

    name: str = "Sn"
    words: tuple[str, ...] = NODE_WORDS

    def sample(self, batch: int, nodes: int | None, generator: torch.Generator) -> Tensor:
        if nodes is None:
            raise ValueError("group 'Sn' needs an input declared 'node' or 'adjacency'")
        # [B, n]: row b is a uniform permutation (the argsort of i.i.d. uniforms)
        return torch.rand(batch, nodes, generator=generator).argsort(dim=1)

    def act(self, element: Tensor, word: str, x: Tensor) -> Tensor:
        axes = (1,) if word == "node" else (1, 2)
        batch, n = element.shape
        if x.dim() <= max(axes) or any(x.shape[a] != n for a in axes):
            raise ValueError(
                f"a {word!r} of S_n must have n={n} along axes {list(axes)} (after the batch "
                f"axis); got shape {list(x.shape)}"
            )
        perm = element.to(x.device)
        for axis in axes:
            index = perm.reshape(batch, *([1] * (axis - 1)), n, *([1] * (x.dim() - axis - 1)))
            x = torch.gather(x, axis, index.expand_as(x))
        return x

    def describe(self, element: Tensor, index: int) -> str:
        perm = element[index].tolist()
        shown = perm if len(perm) <= 16 else [*perm[:16], "..."]
        return f"node permutation {shown} of n={len(perm)} (new node i is old node perm[i])"


def _rounded(t: Tensor) -> list:
    return torch.round(t.double(), decimals=3).tolist()


def group_from_name(group: str | Group) -> Group:
    """'O3', 'SO(2)', 'E3', 'SE3', ... → `EuclideanGroup`; 'Sn' → `PermutationGroup`."""
    if isinstance(group, str):
        if is_permutation_group(group):
            return PermutationGroup()
        return EuclideanGroup(parse_group(group))
    if isinstance(group, Group):
        return group
    raise TypeError(f"group must be a name such as 'E3' or 'Sn', or a Group; got {type(group)}")


class _Product:
    """The groups of one check, each acting on its own words (they commute)."""

    def __init__(self, group: str | Group | Sequence[str | Group]) -> None:
        names = [group] if isinstance(group, (str, Group)) else list(group)
        if not names:
            raise ValueError("group must name at least one group")
        self.factors = [group_from_name(g) for g in names]
        owned = [w for g in self.factors for w in g.words]
        if len(owned) != len(set(owned)):
            raise ValueError(f"the groups {[g.name for g in self.factors]} act on the same words")
        self.name = " × ".join(g.name for g in self.factors)
        self.words = tuple(owned)

    def sample(self, batch: int, nodes: int | None, generator: torch.Generator) -> list:
        return [g.sample(batch, nodes, generator) for g in self.factors]

    def act(self, elements: list, words: tuple[str, ...], x: Any) -> Any:
        for g, element in zip(self.factors, elements, strict=True):
            for word in words:
                if word in g.words:
                    x = g.act(element, word, x)
        return x

    def describe(self, elements: list, index: int) -> str:
        return "; ".join(g.describe(e, index) for g, e in zip(self.factors, elements, strict=True))


@dataclass(frozen=True)
class EquivarianceCheck:
    """The worst case an equivariance check found (error <= tolerance means it passed)."""

    error: float
    tolerance: float
    group: str
    output: int
    representation: str
    trial: int
    sample: int
    element: str

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def message(self, name: str = "fn") -> str:
        verdict = "is not" if not self.passed else "is"
        return (
            f"{name} {verdict} equivariant under {self.group}: worst relative error "
            f"{self.error:.3g} (tolerance {self.tolerance:.3g}) at output {self.output} "
            f"({self.representation!r}), trial {self.trial}, sample {self.sample}, with g: "
            f"{self.element}"
        )


def _as_outputs(result: Any, count: int) -> list[Tensor]:
    outputs = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(outputs) != count:
        raise ValueError(
            f"fn returned {len(outputs)} outputs but {count} output representations were declared"
        )
    for k, out in enumerate(outputs):
        if not isinstance(out, Tensor):
            raise TypeError(f"output {k} of fn must be a tensor; got {type(out).__name__}")
    return outputs


def _real_nodes_only(out: Tensor, words: tuple[str, ...], mask: Tensor | None) -> Tensor:
    """`out` with padded nodes zeroed along its node axes (1 for 'node', 1 and 2 for
    'adjacency'), so that what a function leaves at padding does not count."""
    if mask is None or not set(words) & set(NODE_WORDS):
        return out
    keep = mask.to(device=out.device, dtype=torch.bool)
    out = out.masked_fill(~keep.reshape(*keep.shape, *([1] * (out.dim() - 2))), 0)
    if "adjacency" in words:
        out = out.masked_fill(~keep.reshape(keep.shape[0], 1, -1, *([1] * (out.dim() - 3))), 0)
    return out


def _per_sample_errors(got: Tensor, expected: Tensor) -> Tensor:
    """[B] relative errors ‖got_b − expected_b‖ / ‖expected_b‖ (absolute where that is 0)."""
    diff = (got.double() - expected.double()).reshape(got.shape[0], -1).norm(dim=1)
    scale = expected.double().reshape(expected.shape[0], -1).norm(dim=1)
    errors = torch.where(scale > 0, diff / torch.where(scale > 0, scale, 1.0), diff)
    return torch.where(torch.isfinite(errors), errors, math.inf)


def _default_tolerance(outputs: list[Tensor]) -> float:
    dtypes = [out.dtype for out in outputs if out.is_floating_point()]
    lowest = max(dtypes, key=lambda dt: torch.finfo(dt).eps) if dtypes else torch.float64
    return DEFAULT_TOLERANCE.get(lowest, 1e-5)


def equivariance_error(
    fn: Callable[..., Any],
    group: str | Group | Sequence[str | Group],
    inputs: Sequence[Input] = (),
    outputs: str | Sequence[str] = "invariant",
    *,
    keyword_inputs: Mapping[str, Input] | None = None,
    mask: Tensor | None = None,
    trials: int = 3,
    tolerance: float | None = None,
    generator: torch.Generator | None = None,
) -> EquivarianceCheck:
    """The worst per-sample equivariance error of `fn`; arguments as for `assert_equivariant`."""
    product = _Product(group)
    keyword_inputs = dict(keyword_inputs or {})
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int; got {trials!r}")
    if "mask" in keyword_inputs and mask is not None:
        raise ValueError("pass the node mask once: as mask=..., not also in keyword_inputs")
    declared = [(f"input {i}", item) for i, item in enumerate(inputs)]
    declared += [(f"keyword input {name!r}", item) for name, item in keyword_inputs.items()]
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            shape = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor [B, n]; got {shape}")
        declared.append(("mask", (mask, "node")))
    acted = []  # (where, value, words) of the inputs some factor acts on
    for where, item in declared:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str)):
            raise TypeError(f"{where} must be a (value, representation) pair; got {item!r}")
        words = parse_representation(item[1])
        if set(words) & set(product.words):
            if not isinstance(item[0], Tensor) or item[0].dim() == 0:
                raise TypeError(f"{where} is declared {item[1]!r} but is not a batched tensor")
            acted.append((where, item[0], words))
    out_words = [
        parse_representation(rep) for rep in ([outputs] if isinstance(outputs, str) else outputs)
    ]
    if not acted:
        raise ValueError(
            f"no input is declared with a representation {product.name} acts on {product.words}"
        )
    batch = acted[0][1].shape[0]
    for where, value, _ in acted:
        if value.shape[0] != batch:
            raise ValueError(f"{where} must have the leading batch axis B={batch}")
    node_sizes = {value.shape[1] for _, value, words in acted if set(words) & set(NODE_WORDS)}
    if len(node_sizes) > 1:
        raise ValueError(f"the node inputs disagree on the number of nodes: {sorted(node_sizes)}")
    nodes = node_sizes.pop() if node_sizes else None
    generator = torch.Generator().manual_seed(0) if generator is None else generator

    def call(args: list, kwargs: dict, node_mask: Tensor | None) -> list[Tensor]:
        if node_mask is not None:
            kwargs = {**kwargs, "mask": node_mask}
        with torch.no_grad():
            return _as_outputs(fn(*args, **kwargs), len(out_words))

    def moved(element: list, value: Any, representation: str) -> Any:
        return product.act(element, parse_representation(representation), value)

    reference = call(
        [value for value, _ in inputs], {k: v for k, (v, _) in keyword_inputs.items()}, mask
    )
    tolerance = _default_tolerance(reference) if tolerance is None else float(tolerance)
    worst: EquivarianceCheck | None = None
    for trial in range(trials):
        element = product.sample(batch, nodes, generator)
        moved_mask = None if mask is None else moved(element, mask, "node")
        got = call(
            [moved(element, value, rep) for value, rep in inputs],
            {k: moved(element, value, rep) for k, (value, rep) in keyword_inputs.items()},
            moved_mask,
        )
        for k, (words, out, moved_out) in enumerate(zip(out_words, reference, got, strict=True)):
            expected = product.act(element, words, out)
            if moved_out.shape != expected.shape:
                raise AssertionError(
                    f"output {k}: fn(g·x) has shape {list(moved_out.shape)} but g·fn(x) has "
                    f"{list(expected.shape)}"
                )
            errors = _per_sample_errors(
                _real_nodes_only(moved_out, words, moved_mask),
                _real_nodes_only(expected, words, moved_mask),
            )
            sample = int(errors.argmax())
            if worst is None or float(errors[sample]) > worst.error:
                worst = EquivarianceCheck(
                    error=float(errors[sample]),
                    tolerance=tolerance,
                    group=product.name,
                    output=k,
                    representation=" ".join(words) or "invariant",
                    trial=trial,
                    sample=sample,
                    element=product.describe(element, sample),
                )
    assert worst is not None
    return worst


def assert_equivariant(
    fn: Callable[..., Any],
    group: str | Group | Sequence[str | Group],
    inputs: Sequence[Input] = (),
    outputs: str | Sequence[str] = "invariant",
    *,
    keyword_inputs: Mapping[str, Input] | None = None,
    mask: Tensor | None = None,
    trials: int = 3,
    tolerance: float | None = None,
    generator: torch.Generator | None = None,
) -> EquivarianceCheck:
    """Raise AssertionError unless ``fn(g·x) = g·fn(x)`` for random group elements g.

    Args:
        fn: called as ``fn(*positional, **keyword)`` (plus ``mask=`` when a mask is given),
            under ``torch.no_grad()``; returns a tensor, or a tuple of tensors.
        group: 'O3', 'SO3', 'E3', 'SE3', 'O(d)'-style names, 'Sn', a `Group`, or a sequence
            of them (their product, e.g. ``("E3", "Sn")``).
        inputs: positional inputs as ``(value, representation)`` pairs, e.g.
            ``[(points, "position")]``; 'invariant' values may be anything and pass unchanged.
        outputs: the representation of the output, or one per output when fn returns a tuple.
        keyword_inputs: ``{name: (value, representation)}`` passed as keywords.
        mask: [B, n] bool marking real nodes (points) of padded batches, passed as ``mask=``
            and transformed as a 'node' input. Outputs with a node axis ('node ...',
            'adjacency') are compared at real nodes only.
        trials: how many batches of elements to draw (each sample gets its own element).
        tolerance: the largest per-sample relative error accepted; default by the outputs'
            lowest precision (`DEFAULT_TOLERANCE`: 1e-5 for float32, 1e-10 for float64).
        generator: random source for the group elements (default: seeded with 0, so a check
            is reproducible).

    Returns the worst case found (an `EquivarianceCheck`), when it is within the tolerance.
    """
    check = equivariance_error(
        fn, group, inputs, outputs, keyword_inputs=keyword_inputs, mask=mask, trials=trials,
        tolerance=tolerance, generator=generator,
    )  # fmt: skip
    if not check.passed:
        raise AssertionError(check.message(getattr(fn, "__name__", type(fn).__name__)))
    return check
