"""`meanwise.testing.assert_equivariant` against functions whose symmetry is known in closed form.

Both directions: exactly equivariant functions (centred polynomials of the coordinates, pairwise
distances, message passing A·X, the cross product) pass; functions that are not (an MLP on the
coordinates or on the flattened adjacency, a pseudovector under reflections, a function that
mixes samples) raise, with a message naming the worst error, the sample and the element. The
error measure is checked against its formula with a hand-made group (x ↦ −x).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from meanwise.symmetry import parse_group
from meanwise.testing import (
    EuclideanGroup,
    PermutationGroup,
    assert_equivariant,
    equivariance_error,
    parse_representation,
)


def _points(batch: int = 4, n: int = 6, d: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, d, generator=g, dtype=dtype)


def _graphs(batch: int = 3, n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    upper = torch.triu((torch.rand(batch, n, n, generator=g) < 0.4).double(), 1)
    features = torch.randn(batch, n, 2, generator=g, dtype=torch.float64)
    return upper + upper.transpose(1, 2), features


def centred_cubic(x: torch.Tensor) -> torch.Tensor:
    """c + (x − c)(1 + ‖x − c‖²) with c the centroid: E(d)-equivariant positions."""
    c = x.mean(1, keepdim=True)
    return c + (x - c) * (1 + (x - c).square().sum(-1, keepdim=True))


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(2) - x.unsqueeze(1)).norm(dim=-1)


def mlp(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, d)).double()


# --- equivariant functions pass ------------------------------------------------------------------


@pytest.mark.parametrize("group", ["O3", "SO3", "E3", "SE3", "O(2)", "SE(5)"])
def test_closed_form_equivariant_functions_pass(group):
    spec = parse_group(group)
    x = _points(d=spec.dim)
    moved = "position" if spec.translations else "vector"
    check = assert_equivariant(centred_cubic, group, [(x, moved)], moved)
    assert check.error < 1e-12 and check.tolerance == 1e-10  # float64 default
    assert_equivariant(pairwise_distances, group, [(x, moved)], "invariant")
    # x − c is a vector (no translation) under every one of these groups
    assert_equivariant(lambda p: p - p.mean(1, keepdim=True), group, [(x, moved)], "vector")


def test_permutation_equivariant_graph_functions_pass():
    adjacency, features = _graphs()
    inputs = [(adjacency, "adjacency"), (features, "node")]
    assert_equivariant(lambda a, h: a @ h + h, "Sn", inputs, "node")
    assert_equivariant(lambda a, h: (a @ h).sum(1), "Sn", inputs, "invariant")
    assert_equivariant(lambda a, h: a @ a, "Sn", inputs, "adjacency")
    # several outputs, each with its representation
    assert_equivariant(lambda a, h: (a @ h, a @ a), "Sn", inputs, ["node", "adjacency"])


def test_product_group_acts_on_both_axes():
    x = _points(n=9)
    check = assert_equivariant(centred_cubic, ("E3", "Sn"), [(x, "node position")], "node position")
    assert check.group == "E(3) × Sn"
    assert "R = " in check.element and "node permutation" in check.element


def test_keyword_inputs_and_invariant_non_tensors_pass_through():
    x = _points()
    v = _points(seed=1)
    charges = torch.randn(4, 6, dtype=torch.float64)

    def step(points, scale, velocities, charges):
        return points + scale * velocities * charges.unsqueeze(-1)

    assert_equivariant(
        step, "E3", [(x, "position"), (0.3, "invariant")], "position",
        keyword_inputs={"velocities": (v, "vector"), "charges": (charges, "invariant")},
    )  # fmt: skip


# --- functions that are not equivariant fail -----------------------------------------------------


@pytest.mark.parametrize("group", ["O3", "SO3", "E3", "SE(2)"])
def test_an_mlp_on_coordinates_fails(group):
    spec = parse_group(group)
    x = _points(d=spec.dim)
    moved = "position" if spec.translations else "vector"
    with pytest.raises(AssertionError) as info:
        assert_equivariant(mlp(spec.dim), group, [(x, moved)], moved)
    message = str(info.value)
    assert f"not equivariant under {spec.name}" in message
    error = float(re.search(r"worst relative error (\S+)", message).group(1))
    assert error > 1e-2
    assert re.search(r"sample \d+, with g: R = \[\[", message)
    assert ("t = [" in message) == spec.translations


def test_an_mlp_on_the_flattened_adjacency_fails_under_permutations():
    adjacency, _ = _graphs()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(49, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    with pytest.raises(AssertionError, match=r"not equivariant under Sn.*node permutation \["):
        assert_equivariant(net, "Sn", [(adjacency, "adjacency")], "invariant")
    # a permutation-invariant function of the adjacency (its sorted degrees) passes
    assert_equivariant(lambda a: a.sum(-1).sort(-1).values, "Sn", [(adjacency, "adjacency")])


def test_the_cross_product_is_so3_but_not_o3_equivariant():
    u, v = _points(seed=1), _points(seed=2)
    inputs = [(u, "vector"), (v, "vector")]
    cross = torch.linalg.cross
    assert_equivariant(cross, "SO3", inputs, "vector")  # rotations: R(u × v) = Ru × Rv
    with pytest.raises(AssertionError, match=r"det -1"):  # reflections flip a pseudovector
        assert_equivariant(cross, "O3", inputs, "vector")


def test_positions_returned_as_vectors_fail_only_with_translations():
    x = _points()
    assert_equivariant(lambda p: p.clone(), "O3", [(x, "vector")], "vector")
    with pytest.raises(AssertionError, match=r"t = \["):
        assert_equivariant(lambda p: p.clone(), "E3", [(x, "position")], "vector")


def test_mixing_samples_is_caught_by_per_sample_elements():
    # equivariant under one element shared by the batch, not under one element per sample
    x = _points()
    with pytest.raises(AssertionError, match="not equivariant under O"):
        assert_equivariant(lambda p: p.flip(0), "O3", [(x, "vector")], "vector")


def test_the_worst_sample_is_the_one_reported():
    x = _points(batch=5)
    bump = torch.zeros(5, 1, 3, dtype=torch.float64)
    bump[2] = 0.5  # a constant offset breaks equivariance in sample 2 only

    check = equivariance_error(lambda p: p + bump, "SO3", [(x, "vector")], "vector")
    assert check.sample == 2 and not check.passed
    with pytest.raises(AssertionError, match="sample 2,"):
        assert_equivariant(lambda p: p + bump, "SO3", [(x, "vector")], "vector")


# --- the error measure and the tolerance ---------------------------------------------------------


class Negation:
    """Z_2 acting on vectors by x ↦ −x: one fixed element, so the error has a closed form."""

    name = "Z2"
    words = ("vector",)

    def sample(self, batch, nodes, generator):
        return None

    def act(self, element, word, x):
        return -x

    def describe(self, element, index):
        return "x ↦ −x"


def test_error_is_the_per_sample_relative_norm():
    x = _points(batch=3, n=4)
    c = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    check = equivariance_error(lambda p: p + c, Negation(), [(x, "vector")], "vector", trials=1)
    # f(−x) − (−f(x)) = 2c on each of the N points; the expected output is −(x + c)
    expected = (2 * c.norm() * math.sqrt(4) / (x + c).flatten(1).norm(dim=1)).max()
    assert check.error == pytest.approx(float(expected), rel=1e-12)
    assert check.element == "x ↦ −x" and check.group == "Z2"


def test_tolerance_decides_and_defaults_follow_the_dtype():
    x = _points()

    def almost(p):
        return p + 1e-4 * p.square()  # an even term: not O(3)-equivariant, but small

    error = equivariance_error(almost, "O3", [(x, "vector")], "vector").error
    assert 1e-6 < error < 1e-2
    assert_equivariant(almost, "O3", [(x, "vector")], "vector", tolerance=1e-2)
    with pytest.raises(AssertionError, match="tolerance 1e-06"):
        assert_equivariant(almost, "O3", [(x, "vector")], "vector", tolerance=1e-6)
    check32 = assert_equivariant(centred_cubic, "E3", [(x.float(), "position")], "position")
    assert check32.tolerance == 1e-5


def test_checks_are_reproducible_and_the_generator_is_used():
    x = _points()
    net = mlp(3)
    first = equivariance_error(net, "E3", [(x, "position")], "position")
    again = equivariance_error(net, "E3", [(x, "position")], "position")
    other = equivariance_error(
        net, "E3", [(x, "position")], "position", generator=torch.Generator().manual_seed(5)
    )
    assert first == again and other.element != first.element


# --- padded batches ------------------------------------------------------------------------------


def test_padded_nodes_are_left_out_of_the_comparison():
    x = _points(n=6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2] * 2)

    def padded_garbage(p, mask):
        # equivariant at real nodes; at padding the node's position in the array: not permuted
        index = torch.arange(p.shape[1], dtype=p.dtype).reshape(1, -1, 1).expand_as(p)
        return torch.where(mask.unsqueeze(-1), 2 * p, index)

    assert_equivariant(padded_garbage, "Sn", [(x, "node")], "node", mask=mask)
    with pytest.raises(AssertionError):  # a mask passed as a plain input is not used to compare
        assert_equivariant(
            padded_garbage, "Sn", [(x, "node")], "node", keyword_inputs={"mask": (mask, "node")}
        )
    # E(3): zeroed padding is not a translated zero, so only the masked comparison passes
    zero_padded = lambda p, mask: centred_cubic(p) * mask.unsqueeze(-1)  # noqa: E731
    assert_equivariant(
        zero_padded, ("E3", "Sn"), [(x, "node position")], "node position", mask=mask
    )
    with pytest.raises(AssertionError):
        assert_equivariant(
            zero_padded, "E3", [(x, "position")], "position",
            keyword_inputs={"mask": (mask, "invariant")},
        )  # fmt: skip


# --- the group elements --------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["O(4)", "SO(4)", "E(2)", "SE3"])
def test_euclidean_elements_are_haar_orthogonal_with_the_right_determinant(group):
    spec = parse_group(group)
    elements = EuclideanGroup(spec).sample(2000, None, torch.Generator().manual_seed(0))
    r = elements.rotations
    eye = torch.eye(spec.dim, dtype=torch.float64).expand_as(r)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye)
    dets = torch.linalg.det(r)
    if spec.proper:
        torch.testing.assert_close(dets, torch.ones_like(dets))
    else:
        assert abs(float((dets > 0).double().mean()) - 0.5) < 0.05
    # Haar: E[R] = 0, and each entry has variance 1/d
    assert r.mean(0).abs().max() < 4 / math.sqrt(2000 * spec.dim)
    torch.testing.assert_close(r.var(0), torch.full_like(r[0], 1 / spec.dim), atol=0.03, rtol=0)
    assert bool((elements.translations != 0).all()) == spec.translations


def test_permutations_are_uniform():
    perms = PermutationGroup().sample(6000, 4, torch.Generator().manual_seed(0))
    assert (perms.sort(1).values == torch.arange(4)).all()
    counts = torch.bincount(perms[:, 0], minlength=4).double()
    assert (counts - 1500).abs().max() < 5 * math.sqrt(1500)  # each node first 1/4 of the time
    assert len({tuple(p) for p in perms.tolist()}) == math.factorial(4)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_arguments_name_what_was_expected():
    x = _points()
    with pytest.raises(ValueError, match="representation must be 'invariant' or"):
        assert_equivariant(centred_cubic, "E3", [(x, "positions")], "position")
    with pytest.raises(ValueError, match="representation must be"):
        parse_representation("vector position")
    assert parse_representation("node position") == ("node", "position")
    with pytest.raises(ValueError, match="fn returned 1 outputs but 2"):
        assert_equivariant(centred_cubic, "E3", [(x, "position")], ["position", "vector"])
    with pytest.raises(ValueError, match="leading batch axis B=4"):
        assert_equivariant(
            lambda a, b: a + b[:4], "E3", [(x, "position"), (_points(batch=5), "vector")]
        )
    with pytest.raises(ValueError, match="no input is declared with a representation E"):
        assert_equivariant(centred_cubic, "E3", [(x, "node")], "node")
    with pytest.raises(ValueError, match="group must be one of"):
        assert_equivariant(centred_cubic, "U3", [(x, "position")], "position")
    with pytest.raises(TypeError, match=r"input 0 must be a \(value, representation\) pair"):
        assert_equivariant(centred_cubic, "E3", [x], "position")
    with pytest.raises(ValueError, match="must have shape \\[B, ..., d=2\\]"):
        assert_equivariant(centred_cubic, "E(2)", [(x, "position")], "position")
    with pytest.raises(ValueError, match="trials must be a positive int"):
        assert_equivariant(centred_cubic, "E3", [(x, "position")], "position", trials=0)
