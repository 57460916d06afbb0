"""float16 / bfloat16 parameters: the update is computed in float32, the state kept in float32.

Oracles: adabelief-pytorch 0.2.1, which computes float16 parameters in float32 the same way,
and a float32 run of the same training started from the same (rounded) weights.
"""

import io

import pytest
import torch
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief
from torch import nn

from meanwise.optim import AdaBelief, AdaHessian, DiffGrad

LOW = [torch.float16, torch.bfloat16]


def _make(cls, params, **options):
    if cls is AdaHessian:
        options.setdefault("generator", torch.Generator().manual_seed(3))
        options.setdefault("lr", 0.05)
    else:
        options.setdefault("lr", 0.01)
    return cls(params, **options)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = torch.tanh(x @ torch.randn(5, 2, generator=g))
    return x, y


def _train(cls, dtype, steps=40, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    # one weight row whose gradient is exactly zero: it feeds nothing (the old fp16 NaN case)
    dead = nn.Parameter(torch.zeros(3))
    model = model.to(dtype)
    dead.data = dead.data.to(dtype)
    opt = _make(cls, list(model.parameters()) + [dead], **options)
    x, y = (t.to(dtype) for t in _data())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + 0.0 * dead.sum()
        loss.backward(create_graph=cls is AdaHessian and opt.hessian_due)
        opt.step()
        losses.append(float(loss.detach().float()))
    return model, dead, opt, losses


@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad, AdaHessian])
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_trains_like_float32(cls, dtype):
    _, dead, opt, losses = _train(cls, dtype)
    _, _, _, reference = _train(cls, torch.float32)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch.isfinite(dead).all() and (dead == 0).all()
    # the curves agree to the parameters' rounding (bf16 has 8 bits of mantissa)
    tolerance = 0.03 if dtype == torch.float16 else 0.12
    if cls is AdaHessian and dtype == torch.bfloat16:
        tolerance = 0.2  # its Hessian-vector product itself runs in bfloat16 autograd
    for ours, ref in zip(losses, reference, strict=True):
        assert abs(ours - ref) <= tolerance * ref + 1e-3
    assert losses[-1] < 0.7 * losses[0]
    for p in opt.state:
        for key, value in opt.state[p].items():
            if key != "step" and isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32, key


@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad, AdaHessian])
def test_state_in_parameter_dtype_is_an_option(cls):
    _, dead, opt, losses = _train(cls, torch.bfloat16, steps=10, state_in_float32=False)
    assert all(torch.isfinite(torch.tensor(losses))) and torch.isfinite(dead).all()
    for p in opt.state:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16


def test_float16_adabelief_equals_the_authors_package():
    torch.manual_seed(0)
    x, y = (t.half() for t in _data())
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(nn.Linear(5, 2).half())
    ours = AdaBelief(models[0].parameters(), lr=0.01, weight_decay=1e-2)
    ref = ReferenceAdaBelief(
        models[1].parameters(), lr=0.01, weight_decay=1e-2, print_change_log=False
    )
    for _ in range(25):
        for model, opt in zip(models, (ours, ref), strict=True):
            opt.zero_grad()
            nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert a.dtype == torch.float16
        # float32 arithmetic in both, rounded to float16 once per step: at most an ulp apart
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad])
def test_float32_state_survives_a_state_dict_round_trip(cls):
    model, _, opt, _ = _train(cls, torch.float16, steps=5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = _make(cls, list(model.parameters()) + [nn.Parameter(torch.zeros(3).half())])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(fresh.state[q]["exp_avg"], opt.state[p]["exp_avg"])
        assert fresh.state[q]["exp_avg"].dtype == torch.float32
