"""AdaHessian against its equations on separable quadratics and against torch-optimizer."""

import copy
import io

import pytest
import torch
import torch_optimizer
from torch import nn

from meanwise.optim import AdaHessian
from tests.optim._models import assert_same_params, batches, loss_of, make


def quadratic_modules():
    torch.manual_seed(0)
    return nn.ModuleList(
        [
            nn.Linear(5, 4),
            nn.Conv1d(2, 3, 3),
            nn.Conv2d(2, 3, (3, 2)),
            nn.Conv3d(1, 2, (2, 2, 2)),
            nn.ConvTranspose2d(2, 3, 3),
        ]
    ).double()


def curvatures(modules, n_steps, seed=1):
    """Per step, a curvature a_t (mixed signs) for every parameter; plus a fixed linear term."""
    g = torch.Generator().manual_seed(seed)
    params = list(modules.parameters())
    a = [
        [torch.randn(p.shape, generator=g, dtype=p.dtype) * 2 for p in params]
        for _ in range(n_steps)
    ]
    b = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    return a, b


def quadratic_loss(params, a, b):
    # Separable: the Hessian is diag(a) exactly, so z * Hz = a for every Rademacher z.
    return sum((0.5 * ai * p * p + bi * p).sum() for p, ai, bi in zip(params, a, b, strict=True))


def by_hand(params, a_steps, b, *, lr, betas, eps, wd, power, update_each, spatial):
    """The paper's update, written out: Hutchinson is exact here, D = |a| (spatially averaged)."""
    b1, b2 = betas
    p = [q.detach().clone() for q in params]
    m = [torch.zeros_like(q) for q in p]
    v = [torch.zeros_like(q) for q in p]
    d = [None] * len(p)
    for t, a in enumerate(a_steps, start=1):
        for i in range(len(p)):
            g = a[i] * p[i] + b[i]
            if (t - 1) % update_each == 0:
                d[i] = a[i].abs()
                if spatial and p[i].dim() >= 3:
                    d[i] = d[i].mean(dim=tuple(range(2, p[i].dim())), keepdim=True)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
            denom = (v[i].sqrt() / (1 - b2**t) ** 0.5) ** power + eps
            p[i] = p[i] - lr * (m[i] / (1 - b1**t) / denom + wd * p[i])
    return p


@pytest.mark.parametrize(
    "power, update_each, n_samples, wd",
    [(1.0, 1, 1, 0.0), (0.5, 1, 1, 1e-2), (1.0, 4, 1, 0.0), (0.5, 4, 3, 1e-3)],
)
def test_matches_equations_on_separable_quadratic(power, update_each, n_samples, wd, chunking):
    modules = quadratic_modules()
    params = list(modules.parameters())
    n_steps = 101
    a_steps, b = curvatures(modules, n_steps)
    settings = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-4)
    expected = by_hand(
        params, a_steps, b, **settings, wd=wd, power=power, update_each=update_each, spatial=True
    )
    opt = AdaHessian(
        params,
        **settings,
        weight_decay=wd,
        hessian_power=power,
        update_each=update_each,
        n_samples=n_samples,
        generator=torch.Generator().manual_seed(7),
    )
    for a in a_steps:
        opt.zero_grad()
        quadratic_loss(params, a, b).backward(create_graph=opt.hessian_due)
        opt.step()
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_spatial_average_is_a_group_option():
    modules = quadratic_modules()
    params = list(modules.parameters())
    a_steps, b = curvatures(modules, 20)
    settings = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-4)
    expected = by_hand(
        params, a_steps, b, **settings, wd=0.0, power=1.0, update_each=1, spatial=False
    )
    opt = AdaHessian([{"params": params, "spatial_average": False}], **settings)
    for a in a_steps:
        opt.zero_grad()
        quadratic_loss(params, a, b).backward(create_graph=True)
        opt.step()
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_matches_torch_optimizer_adahessian(kind, chunking):
    """torch-optimizer draws its probes from the global generator: ours gets the same stream."""
    ours_model = make(kind)
    ref_model = copy.deepcopy(ours_model)
    data = batches(kind, 100)
    settings = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-4, weight_decay=1e-3, hessian_power=1.0)
    ours = AdaHessian(
        ours_model.parameters(), **settings, generator=torch.Generator().manual_seed(123)
    )
    # torch-optimizer draws one randint per entry; ours draws packed bits. Give ours the same
    # probes so the comparison is of the estimator and the update, not of the random stream.
    ours.probe = lambda p, g: torch.randint(0, 2, p.shape, generator=g, dtype=p.dtype) * 2 - 1
    ref = torch_optimizer.Adahessian(ref_model.parameters(), **settings)
    torch.manual_seed(123)
    for batch in data:
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss_of(model, batch).backward(create_graph=True)
            opt.step()
    assert_same_params(ours_model, ref_model, rtol=1e-8, atol=1e-10)


def test_hessian_schedule_and_plain_backward_in_between():
    model = make("mlp")
    opt = AdaHessian(model.parameters(), update_each=3, lr=0.01)
    due = []
    for batch in batches("mlp", 7):
        due.append(opt.hessian_due)
        opt.zero_grad()
        loss_of(model, batch).backward(create_graph=opt.hessian_due)
        opt.step()
    assert due == [True, False, False, True, False, False, True]
    state = opt.state[model[0].weight]
    assert set(state) == {"step", "exp_avg", "exp_hessian_diag_sq", "hessian_diag"}


def test_state_is_only_the_moments_when_not_delayed_and_graph_is_freed():
    model = make("conv")
    opt = AdaHessian(model.parameters())
    loss_of(model, batches("conv", 1)[0]).backward(create_graph=True)
    opt.step()
    for p in model.parameters():
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_hessian_diag_sq"}
        assert p.grad.grad_fn is None and not p.grad.requires_grad


def test_hessian_step_without_graph_is_a_clear_error():
    model = make("mlp")
    opt = AdaHessian(model.named_parameters())
    loss_of(model, batches("mlp", 1)[0]).backward()
    with pytest.raises(ValueError, match=r"create_graph=True.*'0\.weight'"):
        opt.step()


def test_closure():
    model = make("mlp")
    data = batches("mlp", 5)
    twin = copy.deepcopy(model)
    opt = AdaHessian(model.parameters(), update_each=2, generator=torch.Generator().manual_seed(3))
    twin_opt = AdaHessian(
        twin.parameters(), update_each=2, generator=torch.Generator().manual_seed(3)
    )
    for batch in data:

        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward(create_graph=opt.hessian_due)
            return loss

        returned = opt.step(closure)
        twin_opt.zero_grad()
        loss = loss_of(twin, batch)
        loss.backward(create_graph=twin_opt.hessian_due)
        twin_opt.step()
        assert returned.item() == loss.item()
    assert_same_params(model, twin, rtol=0, atol=0)


def _run(model, opt, data):
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward(create_graph=opt.hessian_due)
        opt.step()


def test_resume_in_the_middle_of_a_period_is_exact():
    data = batches("conv", 14)
    straight_model = make("conv")
    straight = AdaHessian(
        straight_model.parameters(),
        lr=0.02,
        update_each=4,
        generator=torch.Generator().manual_seed(11),
    )
    _run(straight_model, straight, data)

    model = make("conv")
    opt = AdaHessian(
        model.parameters(), lr=0.02, update_each=4, generator=torch.Generator().manual_seed(11)
    )
    _run(model, opt, data[:6])  # stops two steps into the second period
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make("conv", seed=9)
    resumed_model.load_state_dict(saved["model"])
    resumed = AdaHessian(resumed_model.parameters(), generator=torch.Generator().manual_seed(0))
    resumed.load_state_dict(saved["opt"])
    assert resumed.update_each == 4 and resumed.steps_taken == 6 and not resumed.hessian_due
    _run(resumed_model, resumed, data[6:])
    assert_same_params(straight_model, resumed_model, rtol=0, atol=0)


def test_default_generator_follows_the_global_seed():
    results = []
    for _ in range(2):
        torch.manual_seed(42)
        model = make("mlp")
        torch.manual_seed(42)
        _run(model, AdaHessian(model.parameters(), lr=0.01), batches("mlp", 3))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hessian_power": 1.5}, "hessian_power"),
        ({"update_each": 0}, "update_each"),
        ({"n_samples": 0}, "n_samples"),
        ({"lr": -0.1}, "lr"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaHessian(make("mlp").parameters(), **kwargs)


def test_rademacher_probes_are_fair_signs():
    from meanwise.functional import rademacher_like

    template = torch.empty(1000, 37, dtype=torch.float64)
    z = rademacher_like(template, torch.Generator().manual_seed(0))
    assert z.shape == template.shape and z.dtype == torch.float64
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 0.01  # 37,000 fair signs: sd of the mean is 0.005
    # every bit position of the packed bytes is used fairly, and neighbours are uncorrelated
    flat = z.reshape(-1)[: 8 * 4000].reshape(4000, 8)
    assert (flat.mean(0).abs() < 0.06).all()
    assert abs((flat[:, :-1] * flat[:, 1:]).mean().item()) < 0.03
    again = rademacher_like(template, torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    odd = rademacher_like(torch.empty(3, 5, 7), torch.Generator().manual_seed(1))
    assert odd.shape == (3, 5, 7) and odd.abs().eq(1).all()
