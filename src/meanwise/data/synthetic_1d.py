"""diffGrad's three synthetic non-convex 1-D functions (Dubey et al., TNNLS 2019).

The paper defines each function only by its gradient, piecewise. The gradients drive the
optimizers; the function values are needed for the plots and for judging where a run ended
(global or local minimum), so they are integrated here in closed form, with each piece's
constant chosen so that f is continuous at every breakpoint:

- F1: f = (x + 0.3)^2 for x <= 0, (x - 0.2)^2 + 0.05 for x > 0. Global minimum x = -0.3
  (f = 0), local minimum x = 0.2 (f = 0.05).
- F2: f = -40 x + c for x <= -0.9, x sin(8x)/8 - 7 cos(8x)/64 + x^3 for x > -0.9
  (from integral of x cos 8x = x sin(8x)/8 + cos(8x)/64 and integral of sin 8x = -cos(8x)/8),
  with c making the two pieces meet at -0.9. Integrated this way its lowest point is the kink
  x = -0.9 itself (f = -0.706; the gradient jumps from -40 to +1.09 there), and the smooth
  part has local minima at x = 0 (f = -7/64) and x = 0.583 (f = 0.131).
- F3: x^2 for |x| >= 0.5, the two linear ramps in between, symmetric about 0: local minima at
  x = +-0.5 (f = 0.25), maxima at +-0.4 (f = 0.35), and the global minimum at the kink x = 0.

All functions are vectorised over tensors (any shape, any floating dtype) and use `torch.where`
on precomputed pieces, so they work elementwise and under autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Synthetic1D", "F1", "F2", "F3", "FUNCTIONS", "get_function"]

_F2_BREAK = -0.9


def _f2_smooth(x: Tensor) -> Tensor:
    return x * torch.sin(8 * x) / 8 - 7 * torch.cos(8 * x) / 64 + x**3


def _f2_smooth_at_break() -> float:
    b = _F2_BREAK
    return b * math.sin(8 * b) / 8 - 7 * math.cos(8 * b) / 64 + b**3


# the left piece -40 x + c meets the smooth piece at x = -0.9
_F2_LEFT_CONSTANT = _f2_smooth_at_break() + 40 * _F2_BREAK


def _f1_grad(x: Tensor) -> Tensor:
    return torch.where(x <= 0, 2 * x + 0.6, 2 * x - 0.4)


def _f1_value(x: Tensor) -> Tensor:
    return torch.where(x <= 0, (x + 0.3) ** 2, (x - 0.2) ** 2 + 0.05)


def _f2_grad(x: Tensor) -> Tensor:
    smooth = x * torch.cos(8 * x) + torch.sin(8 * x) + 3 * x**2
    return torch.where(x <= _F2_BREAK, torch.full_like(x, -40.0), smooth)


def _f2_value(x: Tensor) -> Tensor:
    return torch.where(x <= _F2_BREAK, -40 * x + _F2_LEFT_CONSTANT, _f2_smooth(x))


def _f3_grad(x: Tensor) -> Tensor:
    out = 2 * x  # |x| > 0.5
    out = torch.where((x > -0.5) & (x <= -0.4), torch.ones_like(x), out)
    out = torch.where((x > -0.4) & (x <= 0), torch.full_like(x, -7 / 8), out)
    out = torch.where((x > 0) & (x <= 0.4), torch.full_like(x, 7 / 8), out)
    out = torch.where((x > 0.4) & (x <= 0.5), -torch.ones_like(x), out)
    return out


def _f3_value(x: Tensor) -> Tensor:
    # constants: x^2 meets x + 0.75 at -0.5 (0.25); that meets -7x/8 at -0.4 (0.35); mirrored
    out = x**2
    out = torch.where((x > -0.5) & (x <= -0.4), x + 0.75, out)
    out = torch.where((x > -0.4) & (x <= 0), -7 * x / 8, out)
    out = torch.where((x > 0) & (x <= 0.4), 7 * x / 8, out)
    out = torch.where((x > 0.4) & (x <= 0.5), -x + 0.75, out)
    return out


@dataclass(frozen=True)
class Synthetic1D:
    """One of diffGrad's test functions: its gradient, its value and where its minima are.

    `breakpoints` are the x where the gradient changes formula (the tests check continuity of f
    there); `plot_range` is the interval the paper's figures show; `global_min_x` was found by
    the closed form; smooth local minima that have no closed form are refined by bisection on
    the gradient.
    """

    name: str
    grad: Callable[[Tensor], Tensor]
    value: Callable[[Tensor], Tensor]
    breakpoints: tuple[float, ...]
    plot_range: tuple[float, float]
    global_min_x: float
    local_min_x: tuple[float, ...]

    @property
    def global_min_value(self) -> float:
        """f at the global minimum (float64)."""
        return float(self.value(torch.tensor(self.global_min_x, dtype=torch.float64)))


def _bisect_gradient_root(grad: Callable[[Tensor], Tensor], lo: float, hi: float) -> float:
    """Root of a continuous gradient with grad(lo) < 0 < grad(hi), to float64 precision."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(grad(torch.tensor(mid, dtype=torch.float64))) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


F1 = Synthetic1D(
    name="F1",
    grad=_f1_grad,
    value=_f1_value,
    breakpoints=(0.0,),
    plot_range=(-1.2, 1.0),
    global_min_x=-0.3,
    local_min_x=(0.2,),
)
F2 = Synthetic1D(
    name="F2",
    grad=_f2_grad,
    value=_f2_value,
    breakpoints=(_F2_BREAK,),
    plot_range=(-1.2, 1.2),
    # The integrated F2 is lowest at the kink x = -0.9 (f = -0.706): the gradient jumps there
    # from -40 to +1.09. Its smooth local minima are the gradient roots at 0 (f = -7/64) and
    # near 0.583 (f = 0.131); the tests confirm all three on a dense grid.
    global_min_x=_F2_BREAK,
    local_min_x=(0.0, _bisect_gradient_root(_f2_grad, 0.55, 0.65)),
)
F3 = Synthetic1D(
    name="F3",
    grad=_f3_grad,
    value=_f3_value,
    breakpoints=(-0.5, -0.4, 0.0, 0.4, 0.5),
    plot_range=(-1.2, 1.2),
    global_min_x=0.0,
    local_min_x=(-0.5, 0.5),
)

FUNCTIONS: dict[str, Synthetic1D] = {f.name: f for f in (F1, F2, F3)}


def get_function(name: str) -> Synthetic1D:
    """The function called `name` ('F1', 'F2' or 'F3')."""
    try:
        return FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown synthetic function {name!r}; expected one of {sorted(FUNCTIONS)}"
        ) from None
