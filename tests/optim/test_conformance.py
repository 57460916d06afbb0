"""torch.optim conformance, after the generic checks of PyTorch's own optimizer suite.

PyTorch runs every optimizer through the same tests (``test/test_optim.py`` with
``OptimizerInfo`` in ``torch/testing/_internal/common_optimizers.py``): state_dict round trips,
deepcopy and pickling, hooks, param groups, parameters without gradients, complex parameters
against their ``view_as_real``, ``lr`` as a tensor, maximize, LR schedulers, weights_only
loading. These are our versions of those checks, run on all three classes.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from meanwise.optim import AdaBelief, AdaHessian, DiffGrad

# Each class with options that exercise its non-default paths, and the loss' backward it needs.
CASES = {
    "AdaBelief": (AdaBelief, {"lr": 0.01, "weight_decay": 0.1}),
    "AdaBelief-unrectified": (AdaBelief, {"lr": 0.01, "rectify": False, "amsgrad": True}),
    "DiffGrad": (DiffGrad, {"lr": 0.01, "weight_decay": 0.1}),
    "AdaHessian": (AdaHessian, {"lr": 0.05, "weight_decay": 0.1, "update_each": 2}),
}


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def _make(name, params, **overrides):
    cls, options = CASES[name]
    options = {**options, **overrides}
    if cls is AdaHessian:
        options.setdefault("generator", torch.Generator().manual_seed(5))
    return cls(params, **options)


_TEACHER = torch.randn(4, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def _batch(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ _TEACHER) + 0.05 * torch.randn(8, 2, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _train(model, opt, steps, start=0, sign=1.0):
    losses = []
    for t in range(start, start + steps):
        x, y = _batch(t, next(model.parameters()).dtype)
        opt.zero_grad()
        loss = sign * nn.functional.mse_loss(model(x), y)
        create_graph = isinstance(opt, AdaHessian) and opt.hessian_due
        loss.backward(create_graph=create_graph)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _full_loss(model):
    x = torch.cat([_batch(t)[0] for t in range(40)])
    y = torch.cat([_batch(t)[1] for t in range(40)])
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, rtol=0.0, atol=0.0):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


names = pytest.mark.parametrize("name", list(CASES))


@names
def test_goes_right_direction(name):
    model = _model()
    opt = _make(name, model.parameters())
    before = _full_loss(model)
    _train(model, opt, 30)
    assert _full_loss(model) < 0.9 * before


@names
def test_state_dict_round_trip_continues_identically(name):
    model, twin = _model(), _model()
    opt = _make(name, model.parameters())
    _train(model, opt, 5)
    twin.load_state_dict(model.state_dict())
    # a fresh optimizer with other constructor options: the checkpoint's group options win
    other = _make(name, twin.parameters(), lr=0.5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _train(model, opt, 6, start=5)
    _train(twin, other, 6, start=5)
    _assert_same(_params(model), _params(twin))


@names
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_optimizer_work(name, how):
    model = _model()
    opt = _make(name, model.parameters())
    _train(model, opt, 3)
    if how == "deepcopy":
        twin_model, twin_opt = copy.deepcopy((model, opt))
    elif how == "pickle":
        twin_model, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        twin_model, twin_opt = torch.load(buffer, weights_only=False)  # our own object
    assert opt.defaults.items() <= twin_opt.defaults.items()
    _train(model, opt, 4, start=3)
    _train(twin_model, twin_opt, 4, start=3)
    _assert_same(_params(model), _params(twin_model))


@names
def test_every_option_is_in_the_param_groups(name):
    opt = _make(name, _model().parameters())
    group = opt.param_groups[0]
    assert set(opt.defaults) <= set(group)
    saved = opt.state_dict()["param_groups"][0]
    assert set(opt.defaults) <= set(saved)


@names
def test_step_is_a_noop_without_gradients(name):
    model = _model()
    opt = _make(name, model.parameters())
    before = _params(model)
    opt.step()
    _assert_same(before, _params(model))
    assert len(opt.state) == 0


@names
def test_params_without_grad_are_skipped_and_get_no_state(name):
    model = _model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    opt = _make(name, model.parameters())
    before = frozen.detach().clone()
    _train(model, opt, 3)
    torch.testing.assert_close(frozen, before, rtol=0, atol=0)
    assert frozen not in opt.state
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters() if p.requires_grad)


@names
def test_step_is_a_float_tensor_as_in_torch_optim(name):
    model = _model()
    opt = _make(name, model.parameters())
    _train(model, opt, 2)
    for p in model.parameters():
        step = opt.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and float(step) == 2


@names
def test_param_groups_with_their_own_lr(name):
    model = _model()
    zero_lr = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}]
    opt = _make(name, zero_lr)
    before = _params(model)
    _train(model, opt, 3)
    after = _params(model)
    # weight decay is decoupled for AdaHessian / default AdaBelief (x lr = 0) but L2 for
    # diffGrad (added to the gradient): with lr 0 no parameter of the first group moves
    _assert_same(before[:2], after[:2])
    assert not torch.equal(before[2], after[2])


@names
def test_lr_as_a_tensor_equals_lr_as_a_float(name):
    model, twin = _model(), _model()
    lr = CASES[name][1]["lr"]
    opt = _make(name, model.parameters(), lr=lr)
    tensor_opt = _make(name, twin.parameters(), lr=torch.tensor(lr, dtype=torch.float64))
    _train(model, opt, 5)
    _train(twin, tensor_opt, 5)
    _assert_same(_params(model), _params(twin))


@names
def test_lr_scheduler_changes_the_steps(name):
    model, twin = _model(), _model()
    opt = _make(name, model.parameters())
    scheduled = _make(name, twin.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(scheduled, step_size=1, gamma=0.0)
    _train(twin, scheduled, 1)
    scheduler.step()  # lr is 0 from here
    frozen = _params(twin)
    _train(twin, scheduled, 2, start=1)
    _assert_same(frozen, _params(twin))  # decay, decoupled or L2, is scaled by lr too
    _train(model, opt, 3)
    assert not torch.equal(_params(model)[0], frozen[0])


@names
def test_maximize_equals_minimizing_the_negated_loss(name):
    model, twin = _model(), _model()
    opt = _make(name, model.parameters(), maximize=True)
    plain = _make(name, twin.parameters())
    _train(model, opt, 6, sign=-1.0)  # maximize -loss
    _train(twin, plain, 6)  # minimize loss
    _assert_same(_params(model), _params(twin), rtol=1e-12, atol=1e-14)
    assert opt.state_dict()["param_groups"][0]["maximize"] is True


@names
def test_step_hooks_and_state_dict_hooks_run(name):
    model = _model()
    opt = _make(name, model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    _train(model, opt, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd-pre", "load-post"]


@names
def test_closure_loss_is_returned(name):
    model = _model()
    opt = _make(name, model.parameters())
    x, y = _batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=isinstance(opt, AdaHessian))
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


@names
def test_add_param_group_mid_training(name):
    model = _model()
    opt = _make(name, list(model[0].parameters()))
    _train(model, opt, 2)
    opt.add_param_group({"params": list(model[2].parameters())})
    before = _params(model)
    _train(model, opt, 2, start=2)
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))
    steps = {int(opt.state[p]["step"]) for p in model[2].parameters()}
    if name == "AdaHessian":  # the new group starts on the optimizer's step count
        assert steps == {2} or steps == {1}
    else:
        assert steps == {2}


@names
def test_empty_first_param_group(name):
    model = _model()
    opt = _make(name, [{"params": []}, {"params": model.parameters()}])
    before = _full_loss(model)
    _train(model, opt, 30)
    assert _full_loss(model) < before


@names
def test_load_state_dict_with_other_groups_is_refused(name):
    model = _model()
    opt = _make(name, model.parameters())
    _train(model, opt, 1)
    other = _make(name, [{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", ["AdaBelief", "AdaBelief-unrectified", "DiffGrad"])
def test_complex_parameter_equals_its_view_as_real(name):
    """torch.optim's convention, checked as torch's own test_complex does."""
    torch.manual_seed(0)
    complex_param = torch.randn(3, 2, dtype=torch.complex128, requires_grad=True)
    real_param = torch.view_as_real(complex_param.detach()).clone().requires_grad_(True)
    opt_c = _make(name, [complex_param])
    opt_r = _make(name, [real_param])
    target = torch.randn(3, 2, dtype=torch.complex128)
    for _ in range(8):
        for opt, loss in (
            (opt_c, lambda: (complex_param - target).abs().pow(4).sum()),
            (opt_r, lambda: (torch.view_as_complex(real_param) - target).abs().pow(4).sum()),
        ):
            opt.zero_grad()
            loss().backward()
            opt.step()
        torch.testing.assert_close(torch.view_as_real(complex_param.detach()), real_param.detach())


def test_adahessian_refuses_complex_parameters():
    p = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    opt = AdaHessian([p])
    p.abs().sum().backward(create_graph=True)
    with pytest.raises(ValueError, match="complex"):
        opt.step()


def test_adahessian_update_each_must_agree_across_groups():
    model = _model()
    with pytest.raises(ValueError, match="same in every param group"):
        AdaHessian(
            [{"params": model[0].parameters(), "update_each": 2}, {"params": model[2].parameters()}]
        )


def test_adahessian_legacy_checkpoint_loads():
    """A state dict written before options moved into the groups (int steps, extra keys)."""
    model, twin = _model(), _model()
    opt = _make("AdaHessian", model.parameters())
    _train(model, opt, 3)
    legacy = copy.deepcopy(opt.state_dict())  # in memory, torch.optim would alias buffers
    generator_state = legacy["adahessian"]["generator_state"]
    legacy["adahessian"] = {
        "steps_taken": 3,
        "update_each": 2,
        "n_samples": 1,
        "generator_state": generator_state,
    }
    for group in legacy["param_groups"]:
        del group["update_each"], group["n_samples"]
    for state in legacy["state"].values():
        state["step"] = int(state["step"])
    twin.load_state_dict(model.state_dict())
    resumed = AdaHessian(twin.parameters(), lr=0.05, weight_decay=0.1)
    resumed.load_state_dict(legacy)
    assert resumed.update_each == 2 and resumed.steps_taken == 3
    _train(model, opt, 4, start=3)
    _train(twin, resumed, 4, start=3)
    _assert_same(_params(model), _params(twin))
