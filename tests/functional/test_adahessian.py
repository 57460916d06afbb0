"""The Hutchinson Hessian diagonal (meanwise.functional.estimate_hessian_diagonal) against the
exact Hessian from torch.autograd.functional.hessian: exact for a diagonal Hessian, unbiased
(within its standard error) for a small MLP's full one, the spatial averaging of a kernel,
and stacked independent models (batch_dims)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.functional import hessian

from meanwise.functional import estimate_hessian_diagonal, hutchinson_products, rademacher_like


def _mlp_loss(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=gen)
    return F.cross_entropy(torch.tanh(x @ w1.T) @ w2.T, y)


def _params():
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_()
    w2 = torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_()
    return w1, w2


def _exact_hessian(params) -> torch.Tensor:
    """The full Hessian of the MLP loss over both flattened weights, [P, P]."""
    sizes = [p.numel() for p in params]

    def flat_loss(flat):
        w1, w2 = flat.split(sizes)
        return _mlp_loss(w1.view_as(params[0]), w2.view_as(params[1]))

    return hessian(flat_loss, torch.cat([p.detach().reshape(-1) for p in params]))


def test_one_probe_is_exact_for_a_diagonal_hessian():
    # a separable quadratic sum_i a_i x_i^2 / 2: H = diag(a), and z_i (H z)_i = a_i z_i^2 = a_i
    a = torch.tensor([0.5, -2.0, 3.0, 1e-3], dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64).requires_grad_()
    (g,) = torch.autograd.grad((a * x * x).sum() / 2, [x], create_graph=True)
    (diag,) = estimate_hessian_diagonal([g], [x], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(diag, a.abs(), rtol=0, atol=1e-15)


def test_the_estimate_is_unbiased_for_an_mlp():
    # E[z * Hz] = diag(H); the mean of n probes has standard error sqrt(sum_{j != i} H_ij^2 / n)
    params = _params()
    full = _exact_hessian(params)
    n = 4000
    grads = torch.autograd.grad(_mlp_loss(*params), params, create_graph=True)
    signed = hutchinson_products(
        grads, params, n_samples=n, generator=torch.Generator().manual_seed(2)
    )
    estimate = torch.cat([s.reshape(-1) for s in signed])
    off_diagonal = (full**2).sum(1) - full.diagonal() ** 2
    error = (estimate - full.diagonal()).abs()
    assert bool((error <= 5 * (off_diagonal / n).sqrt() + 1e-12).all()), (error, off_diagonal)
    # and the diagonal is its absolute value
    grads = torch.autograd.grad(_mlp_loss(*params), params, create_graph=True)
    diag = estimate_hessian_diagonal(
        grads, params, n_samples=n, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in diag]), estimate.abs())


def test_one_probe_without_a_reduction_is_the_signed_products_absolute_value():
    # |Hz| = |z * Hz| for z = +-1: the cheaper pass gives the same diagonal
    params = _params()
    grads = torch.autograd.grad(_mlp_loss(*params), params, create_graph=True)
    signed = hutchinson_products(grads, params, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(_mlp_loss(*params), params, create_graph=True)
    diag = estimate_hessian_diagonal(grads, params, generator=torch.Generator().manual_seed(3))
    for d, s in zip(diag, signed, strict=True):
        torch.testing.assert_close(d, s.abs(), rtol=0, atol=0)


def test_reduce_sees_the_signed_products():
    params = _params()
    seen = []

    def reduce(products):
        seen.extend(products)
        return [-p for p in products]  # a sign flip survives only until the absolute value

    grads = torch.autograd.grad(_mlp_loss(*params), params, create_graph=True)
    diag = estimate_hessian_diagonal(
        grads, params, generator=torch.Generator().manual_seed(4), reduce=reduce
    )
    assert any(bool((s < 0).any()) for s in seen)  # signed, not yet |.|
    for d, s in zip(diag, seen, strict=True):
        torch.testing.assert_close(d, s.abs(), rtol=0, atol=0)


def test_a_kernel_is_averaged_over_its_spatial_axes():
    # conv weight [out, in, k]: the exact diagonal (one probe is exact for this separable loss)
    # averaged over k, one curvature per (out, in) pair; stacked models skip the batch axis
    a = torch.rand(2, 3, 5, 4, dtype=torch.float64) + 0.1  # [S=2, out=3, in=5, k=4]
    w = torch.randn(2, 3, 5, 4, dtype=torch.float64).requires_grad_()
    (g,) = torch.autograd.grad((a * w * w).sum() / 2, [w], create_graph=True)
    (diag,) = estimate_hessian_diagonal(
        [g], [w], generator=torch.Generator().manual_seed(5), batch_dims=1
    )
    assert diag.shape == (2, 3, 5, 1)
    torch.testing.assert_close(diag, a.mean(-1, keepdim=True))
    (g,) = torch.autograd.grad((a * w * w).sum() / 2, [w], create_graph=True)
    (plain,) = estimate_hessian_diagonal([g], [w], spatial=False)
    torch.testing.assert_close(plain, a)


def test_stacked_models_share_one_product():
    # two models with no shared parameter: the Hessian of their summed loss is block diagonal,
    # so the stacked estimate equals each model's own with the same probe rows
    w1, w2 = _params()
    stacked = torch.stack([w1.detach(), 2 * w1.detach()]).requires_grad_()
    loss = _mlp_loss(stacked[0], w2.detach()) + _mlp_loss(stacked[1], w2.detach())
    (g,) = torch.autograd.grad(loss, [stacked], create_graph=True)
    (together,) = estimate_hessian_diagonal(
        [g], [stacked], generator=torch.Generator().manual_seed(6), batch_dims=1
    )
    probes = rademacher_like(stacked, torch.Generator().manual_seed(6))
    for s in range(2):
        own = stacked[s].detach().requires_grad_()
        (g,) = torch.autograd.grad(_mlp_loss(own, w2.detach()), [own], create_graph=True)
        (alone,) = estimate_hessian_diagonal([g], [own], probe=lambda p, _, z=probes[s]: z)
        torch.testing.assert_close(together[s], alone)
