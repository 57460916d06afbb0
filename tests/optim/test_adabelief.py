"""AdaBelief against the authors' package (adabelief-pytorch 0.2.1) and its own equations."""

import copy
import io

import pytest
import torch
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief

from meanwise.functional import FOREACH, FUNCTIONAL, LOOP, adabelief
from meanwise.optim import AdaBelief
from tests.optim._models import assert_same_params, batches, loss_of, make

OPTION_SETS = [
    {},  # the package defaults: rectify, decoupled decay, eps 1e-16
    {"eps": 1e-8, "weight_decay": 5e-4, "weight_decouple": False, "rectify": False},  # CIFAR
    {"weight_decay": 1e-2, "fixed_decay": True, "lr": 3e-3},
    {"amsgrad": True, "rectify": False, "eps": 1e-8},
    {"amsgrad": True, "rectify": True, "weight_decay": 1e-3},  # the quirk: amsgrad inert
    {"degenerated_to_sgd": False, "betas": (0.8, 0.99)},
]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(sorted(o)) or "defaults")
def test_matches_adabelief_pytorch(kind, options, chunking):
    ours_model = make(kind)
    ref_model = copy.deepcopy(ours_model)
    ours = AdaBelief(ours_model.parameters(), **options)
    ref = ReferenceAdaBelief(ref_model.parameters(), print_change_log=False, **options)
    for batch in batches(kind, 120):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    assert_same_params(ours_model, ref_model)
    # the belief (with its eps added every step) is the same state as the package's
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(ours.state[p]["exp_avg_var"], ref.state[q]["exp_avg_var"])


def test_amsgrad_has_no_effect_while_rectified():
    a_model, b_model = make("mlp"), make("mlp")
    a = AdaBelief(a_model.parameters(), amsgrad=True, rectify=True)
    b = AdaBelief(b_model.parameters(), amsgrad=False, rectify=True)
    for batch in batches("mlp", 30):
        for model, opt in ((a_model, a), (b_model, b)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    assert_same_params(a_model, b_model, rtol=0, atol=0)


def test_equations_written_out():
    """One scalar, three steps, by hand: rectify=False, L2 decay."""
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = AdaBelief(
        [p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, weight_decouple=False, rectify=False
    )
    x, m, s = 1.0, 0.0, 0.0
    for t, g_raw in enumerate([0.5, -0.3, 0.8], start=1):
        p.grad = torch.tensor([g_raw], dtype=torch.float64)
        opt.step()
        g = g_raw + wd * x
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        m_hat, s_hat = m / (1 - b1**t), s / (1 - b2**t)
        x = x - lr * m_hat / (s_hat**0.5 + eps)
        assert p.item() == pytest.approx(x, rel=1e-12)
    assert p.grad.item() == 0.8  # the gradient is not modified


@pytest.mark.parametrize("options", [{}, {"rectify": False, "amsgrad": True}])
def test_flavours_agree_and_vmap(options):
    torch.manual_seed(0)
    n_clients = 3
    params = torch.randn(n_clients, 5, dtype=torch.float64)
    grads = [torch.randn(n_clients, 5, dtype=torch.float64) for _ in range(8)]
    kwargs = dict(
        lr=0.01, amsgrad=options.get("amsgrad", False), rectify=options.get("rectify", True)
    )

    def run(ops, client):
        p = params[client].clone()
        m, v, mx = (
            torch.zeros(5, dtype=p.dtype),
            torch.zeros(5, dtype=p.dtype),
            torch.zeros(5, dtype=p.dtype),
        )
        for t, g in enumerate(grads, start=1):
            out = adabelief([p], [g[client]], [m], [v], [mx], step=t, ops=ops, **kwargs)
            (p,), (m,), (v,) = out.params, out.exp_avg, out.exp_avg_var
            mx = out.max_exp_avg_var[0] if out.max_exp_avg_var else mx
        return p

    expected = torch.stack([run(FUNCTIONAL, c) for c in range(n_clients)])
    for ops in (FOREACH, LOOP):
        torch.testing.assert_close(torch.stack([run(ops, c) for c in range(n_clients)]), expected)

    def one_client(p, *gs):
        m, v, mx = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
        for t, g in enumerate(gs, start=1):
            out = adabelief([p], [g], [m], [v], [mx], step=t, **kwargs)
            (p,), (m,), (v,) = out.params, out.exp_avg, out.exp_avg_var
            mx = out.max_exp_avg_var[0] if out.max_exp_avg_var else mx
        return p

    torch.testing.assert_close(torch.func.vmap(one_client)(params, *grads), expected)


def _train(model, opt, data):
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


def test_state_dict_round_trip_resumes_exactly():
    data = batches("conv", 60)
    straight_model = make("conv")
    straight = AdaBelief(straight_model.parameters(), lr=3e-3, rectify=False, amsgrad=True)
    _train(straight_model, straight, data)

    first_model = make("conv")
    first = AdaBelief(first_model.parameters(), lr=3e-3, rectify=False, amsgrad=True)
    _train(first_model, first, data[:25])
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make("conv", seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed = AdaBelief(resumed_model.parameters())  # defaults differ: the groups restore them
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["amsgrad"] and not resumed.param_groups[0]["rectify"]
    _train(resumed_model, resumed, data[25:])
    assert_same_params(straight_model, resumed_model, rtol=0, atol=0)


def test_non_finite_gradient_names_the_parameter():
    model = make("mlp")
    opt = AdaBelief(model.named_parameters(), check_finite=True)
    loss_of(model, batches("mlp", 1)[0]).backward()
    model[2].bias.grad[1] = float("nan")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"non-finite gradient.*'2\.bias'"):
        opt.step()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    unnamed = AdaBelief(make("mlp").parameters(), check_finite=True)
    p = unnamed.param_groups[0]["params"][0]
    p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        unnamed.step()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaBelief(make("mlp").parameters(), **kwargs)


def test_parameters_without_gradients_keep_their_own_step():
    model = make("mlp")
    opt = AdaBelief(model.parameters(), rectify=False)
    data = batches("mlp", 4)
    loss_of(model, data[0]).backward()
    model[0].weight.grad = None  # frozen for the first step
    opt.step()
    opt.zero_grad()
    loss_of(model, data[1]).backward()
    opt.step()
    assert opt.state[model[0].weight]["step"] == 1
    assert opt.state[model[2].weight]["step"] == 2
