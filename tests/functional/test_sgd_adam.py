"""The new functional rules (sgd, adam) against torch.optim in all three flavours and under vmap."""

from __future__ import annotations

import pytest
import torch

from meanwise.functional import FOREACH, FUNCTIONAL, LOOP
from meanwise.functional.adam import adam
from meanwise.functional.sgd import sgd

SHAPES = [(3, 4), (5,), ()]


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(6)]
    return params, grads


def _torch_reference(make, params, grads):
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = make(ps)
    for g in grads:
        for p, gi in zip(ps, g, strict=True):
            p.grad = gi.clone()
        opt.step()
    return [p.detach() for p in ps]


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
]


@pytest.mark.parametrize("kw", SGD_CASES)
@pytest.mark.parametrize("ops", [FUNCTIONAL, FOREACH, LOOP], ids=lambda o: o.name)
def test_sgd_matches_torch(kw, ops):
    params, grads = _problem(0)
    expected = _torch_reference(lambda ps: torch.optim.SGD(ps, **kw), params, grads)
    ps = [p.clone() for p in params]
    buf = [torch.zeros_like(p) for p in params]
    for step, g in enumerate(grads, start=1):
        ps, new_buf = sgd(ps, g, buf, step=step, ops=ops, **kw)
        buf = new_buf if new_buf is not None else buf
    for a, b in zip(ps, expected, strict=True):
        torch.testing.assert_close(a, b)


ADAM_CASES = [dict(lr=0.01), dict(lr=0.003, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)]


@pytest.mark.parametrize("kw", ADAM_CASES)
@pytest.mark.parametrize("ops", [FUNCTIONAL, FOREACH, LOOP], ids=lambda o: o.name)
def test_adam_matches_torch(kw, ops):
    params, grads = _problem(1)
    expected = _torch_reference(lambda ps: torch.optim.Adam(ps, **kw), params, grads)
    kw = dict(kw)
    beta1, beta2 = kw.pop("betas", (0.9, 0.999))
    ps = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step, g in enumerate(grads, start=1):
        ps, m, v = adam(ps, g, m, v, step=step, beta1=beta1, beta2=beta2, ops=ops, **kw)
    for a, b in zip(ps, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_rules_run_under_vmap_on_stacked_clients():
    # three clients stacked on a leading axis: vmap of the rule == the rule per client
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    z = torch.zeros_like(p)

    def one(p, g, m, v):
        return adam([p], [g], [m], [v], step=1, lr=0.1)

    got = torch.func.vmap(one)(p, g, z, z)
    for i in range(3):
        ref = adam([p[i]], [g[i]], [z[i]], [z[i]], step=1, lr=0.1)
        torch.testing.assert_close(got.params[0][i], ref.params[0])
    got = torch.func.vmap(lambda p, g, b: sgd([p], [g], [b], step=1, lr=0.1, momentum=0.9))(p, g, z)
    torch.testing.assert_close(got.params[0], p - 0.1 * g)
