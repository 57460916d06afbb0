"""diffGrad's synthetic functions: the closed-form values against the paper's gradients."""

import math

import pytest
import torch

from meanwise.data import F1, F2, F3, FUNCTIONS, get_function

DTYPE = torch.float64


def _interior_points(fn, per_piece: int = 7, margin: float = 1e-3) -> torch.Tensor:
    """Points strictly inside every piece (away from the breakpoints), including the tails."""
    edges = [-2.0, *fn.breakpoints, 2.0]
    points = [
        torch.linspace(lo + margin, hi - margin, per_piece, dtype=DTYPE)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    return torch.cat(points)


def _paper_gradient(name: str, x: float) -> float:
    """The gradients exactly as the diffGrad paper writes them, as scalar Python."""
    if name == "F1":
        return 2 * x + 0.6 if x <= 0 else 2 * x - 0.4
    if name == "F2":
        return -40.0 if x <= -0.9 else x * math.cos(8 * x) + math.sin(8 * x) + 3 * x**2
    if x <= -0.5:
        return 2 * x
    if x <= -0.4:
        return 1.0
    if x <= 0:
        return -7 / 8
    if x <= 0.4:
        return 7 / 8
    if x <= 0.5:
        return -1.0
    return 2 * x


@pytest.mark.parametrize("name", ["F1", "F2", "F3"])
def test_gradient_is_the_papers(name):
    fn = get_function(name)
    xs = torch.cat([_interior_points(fn), torch.tensor(fn.breakpoints, dtype=DTYPE)])
    expected = torch.tensor([_paper_gradient(name, float(x)) for x in xs], dtype=DTYPE)
    torch.testing.assert_close(fn.grad(xs), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["F1", "F2", "F3"])
def test_autograd_of_closed_form_value_equals_gradient(name):
    fn = get_function(name)
    x = _interior_points(fn).requires_grad_(True)
    (autograd,) = torch.autograd.grad(fn.value(x).sum(), x)
    torch.testing.assert_close(autograd, fn.grad(x.detach()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["F1", "F2", "F3"])
def test_central_differences_equal_gradient(name):
    fn = get_function(name)
    x = _interior_points(fn)
    h = 1e-6
    numeric = (fn.value(x + h) - fn.value(x - h)) / (2 * h)
    torch.testing.assert_close(numeric, fn.grad(x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["F1", "F2", "F3"])
def test_value_continuous_at_breakpoints(name):
    fn = get_function(name)
    for b in fn.breakpoints:
        delta = 1e-9
        left = float(fn.value(torch.tensor(b - delta, dtype=DTYPE)))
        right = float(fn.value(torch.tensor(b + delta, dtype=DTYPE)))
        at = float(fn.value(torch.tensor(b, dtype=DTYPE)))
        # |f'| <= 40 here, so a continuous f moves less than 40 * delta across the break
        assert abs(right - left) < 1e-7, (name, b, left, right)
        assert abs(at - left) < 1e-7


def test_f1_minima_as_the_paper_states():
    x = torch.tensor([-0.3, 0.2], dtype=DTYPE)
    torch.testing.assert_close(F1.value(x), torch.tensor([0.0, 0.05], dtype=DTYPE))
    torch.testing.assert_close(F1.grad(x), torch.zeros(2, dtype=DTYPE), rtol=0, atol=1e-15)
    # 0.2 is a local minimum: f rises on both sides, and stays above the global one
    near = torch.tensor([0.19, 0.21], dtype=DTYPE)
    assert bool((F1.value(near) > 0.05).all())
    assert F1.global_min_x == -0.3 and F1.global_min_value == 0.0


@pytest.mark.parametrize(("fn", "x_star"), [(F1, -0.3), (F2, -0.9), (F3, 0.0)])
def test_global_minimum_on_a_dense_grid(fn, x_star):
    grid = torch.linspace(-3.0, 3.0, 600_001, dtype=DTYPE)  # step 1e-5, contains x_star
    assert abs(float(grid[torch.argmin(fn.value(grid))]) - x_star) < 2e-5
    assert fn.global_min_x == pytest.approx(x_star)


def test_f2_smooth_local_minima_are_gradient_roots():
    for x in F2.local_min_x:
        t = torch.tensor(x, dtype=DTYPE)
        assert abs(float(F2.grad(t))) < 1e-9
        assert float(F2.value(t - 1e-3)) > float(F2.value(t)) < float(F2.value(t + 1e-3))


def test_f3_kinks():
    v = F3.value(torch.tensor([-0.5, -0.4, 0.0, 0.4, 0.5], dtype=DTYPE))
    torch.testing.assert_close(v, torch.tensor([0.25, 0.35, 0.0, 0.35, 0.25], dtype=DTYPE))


def test_vectorised_over_shapes_and_dtypes():
    x = torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)
    for fn in FUNCTIONS.values():
        assert fn.grad(x).shape == (3, 4) and fn.grad(x).dtype == torch.float32
        assert fn.value(x).shape == (3, 4) and fn.value(x).dtype == torch.float32


def test_unknown_function_names_the_known_ones():
    with pytest.raises(ValueError, match="F1"):
        get_function("F4")
