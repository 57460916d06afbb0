"""DiffGrad against torch-optimizer 0.3.0 (the authors' v2 rule) and its equations."""

import copy
import io
import math

import pytest
import torch
import torch_optimizer

from meanwise.functional import FOREACH, FUNCTIONAL, LOOP, diffgrad
from meanwise.optim import DiffGrad
from tests.optim._models import assert_same_params, batches, loss_of, make


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize(
    "options",
    [{}, {"lr": 1e-2, "weight_decay": 5e-4}, {"betas": (0.95, 0.99), "eps": 1e-6}],
    ids=["defaults", "decay", "betas"],
)
def test_matches_torch_optimizer(kind, options, chunking):
    ours_model = make(kind)
    ref_model = copy.deepcopy(ours_model)
    ours = DiffGrad(ours_model.parameters(), **options)
    ref = torch_optimizer.DiffGrad(ref_model.parameters(), **options)
    for batch in batches(kind, 120):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    assert_same_params(ours_model, ref_model)


def test_equations_written_out():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.1
    p = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    opt = DiffGrad([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    x, m, v, previous = 2.0, 0.0, 0.0, 0.0
    for t, g_raw in enumerate([1.0, 1.5, -0.5, 0.2], start=1):
        p.grad = torch.tensor([g_raw], dtype=torch.float64)
        opt.step()
        g = g_raw + wd * x  # L2 decay first: the friction sees the decayed gradient
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        friction = 1 / (1 + math.exp(-abs(previous - g)))
        previous = g
        x = x - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * friction * m / (math.sqrt(v) + eps)
        assert p.item() == pytest.approx(x, rel=1e-12)
        assert opt.state[p]["previous_grad"].item() == pytest.approx(g, rel=1e-15)
    assert p.grad.item() == 0.2


def test_previous_gradient_is_one_buffer_updated_in_place():
    model = make("mlp")
    opt = DiffGrad(model.parameters())
    data = batches("mlp", 3)
    loss_of(model, data[0]).backward()
    opt.step()
    buffers = [opt.state[p]["previous_grad"].data_ptr() for p in model.parameters()]
    for batch in data[1:]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    assert buffers == [opt.state[p]["previous_grad"].data_ptr() for p in model.parameters()]


def test_flavours_agree_and_vmap():
    torch.manual_seed(0)
    params = torch.randn(4, 7, dtype=torch.float64)
    grads = [torch.randn(4, 7, dtype=torch.float64) for _ in range(6)]

    def one_client(p, *gs, ops=FUNCTIONAL):
        m, v, prev = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
        for t, g in enumerate(gs, start=1):
            out = diffgrad([p], [g], [m], [v], [prev], step=t, lr=0.05, weight_decay=0.01, ops=ops)
            (p,), (m,), (v,), (prev,) = out
        return p

    expected = torch.stack(
        [one_client(params[c].clone(), *(g[c] for g in grads)) for c in range(4)]
    )
    for ops in (FOREACH, LOOP):
        got = torch.stack(
            [one_client(params[c].clone(), *(g[c] for g in grads), ops=ops) for c in range(4)]
        )
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.func.vmap(one_client)(params, *grads), expected)


def test_state_dict_round_trip_resumes_exactly():
    data = batches("mlp", 40)
    a_model = make("mlp")
    a = DiffGrad(a_model.parameters(), lr=1e-2)
    for batch in data:
        a.zero_grad()
        loss_of(a_model, batch).backward()
        a.step()
    b_model = make("mlp")
    b = DiffGrad(b_model.parameters(), lr=1e-2)
    for i, batch in enumerate(data):
        if i == 17:
            buffer = io.BytesIO()
            torch.save(b.state_dict(), buffer)
            buffer.seek(0)
            b = DiffGrad(b_model.parameters())
            b.load_state_dict(torch.load(buffer, weights_only=True))
        b.zero_grad()
        loss_of(b_model, batch).backward()
        b.step()
    assert_same_params(a_model, b_model, rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="betas"):
        DiffGrad(make("mlp").parameters(), betas=(1.5, 0.9))
    model = make("mlp")
    opt = DiffGrad(model.named_parameters(), check_finite=True)
    loss_of(model, batches("mlp", 1)[0]).backward()
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'0.weight'"):
        opt.step()
