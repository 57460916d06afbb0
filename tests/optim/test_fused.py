"""fused=True: the compiled rule equals the eager one, compiles once per run, resumes, falls back.

The oracle is the eager (foreach) rule, itself checked against the authors' packages in
test_adabelief.py / test_diffgrad.py. Compilation is kept cheap: tiny float32 models, and one
graph per structural option set (AdaBelief's amsgrad x rectify, DiffGrad's one), shared by
the tests through the process-wide cache of compiled steps.
"""

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import meanwise.functional.fused as fused_module
from meanwise.functional import FOREACH, adabelief, diffgrad
from meanwise.functional.fused import FUSED
from meanwise.optim import AdaBelief, DiffGrad


def tiny(seed: int = 0, sizes=(5, 4, 3)) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))


def data(n_steps: int, in_features: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, in_features, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(n_steps)
    ]


def train(model, opt, batches, scheduler=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_close(a: nn.Module, b: nn.Module, rtol: float = 1e-6, atol: float = 1e-7):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_state(fused_opt, fused_model, eager_opt, eager_model):
    # Relative to each buffer's largest entry: near-zero entries of the belief (g - m)^2 come
    # from a cancellation that amplifies the parameters' rounding differences.
    for p, q in zip(fused_model.parameters(), eager_model.parameters(), strict=True):
        for key, value in eager_opt.state[q].items():
            atol = 1e-6 * float(value.abs().max())
            torch.testing.assert_close(fused_opt.state[p][key], value, rtol=1e-6, atol=atol)


def compilations() -> int:
    # Every graph inductor compiles passes AOT autograd once, whether it came from dynamo
    # (torch.compile) or was traced and handed over (torch._inductor.standalone_compile).
    return counters["aot_autograd"]["total"]


OPTION_NAMES = ("amsgrad", "rectify", "weight_decouple", "fixed_decay", "degenerated_to_sgd")
ADABELIEF_OPTIONS = [
    dict(zip(OPTION_NAMES, values, strict=True))
    for values in itertools.product((False, True), repeat=5)
]
# amsgrad adds a state buffer, so two more graphs to compile (~15 s): the slow run checks them.
ADABELIEF_CASES = [
    pytest.param(
        o,
        id="-".join(k for k, v in o.items() if v) or "none",
        marks=[pytest.mark.slow] if o["amsgrad"] else [],
    )
    for o in ADABELIEF_OPTIONS
]


@pytest.mark.parametrize("weight_decay", [0.0, 5e-2])
@pytest.mark.parametrize("options", ADABELIEF_CASES)
def test_adabelief_fused_equals_eager_in_every_option_combination(options, weight_decay):
    eager_model = tiny()
    fused_model = copy.deepcopy(eager_model)
    kwargs = dict(lr=1e-2, eps=1e-8, weight_decay=weight_decay, **options)
    eager = AdaBelief(eager_model.parameters(), **kwargs)
    fused = AdaBelief(fused_model.parameters(), fused=True, **kwargs)
    batches = data(12)  # rectify's SGD steps (t <= 5) and adaptive steps
    train(eager_model, eager, batches)
    train(fused_model, fused, batches)
    assert_close(fused_model, eager_model)
    assert_same_state(fused, fused_model, eager, eager_model)


@pytest.mark.parametrize("options", [{}, {"weight_decay": 1e-2, "betas": (0.8, 0.99)}])
def test_diffgrad_fused_equals_eager(options):
    eager_model = tiny()
    fused_model = copy.deepcopy(eager_model)
    eager = DiffGrad(eager_model.parameters(), lr=1e-2, **options)
    fused = DiffGrad(fused_model.parameters(), lr=1e-2, fused=True, **options)
    batches = data(12)
    train(eager_model, eager, batches)
    train(fused_model, fused, batches)
    assert_close(fused_model, eager_model)
    assert_same_state(fused, fused_model, eager, eager_model)


@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad])
def test_one_compilation_over_a_thousand_steps(cls, monkeypatch):
    # A fresh cache of compiled steps, so this run compiles its own graph (inductor's disk
    # cache keeps that cheap); the learning rate changes every step (a scheduler) and
    # AdaBelief passes from rectify's SGD steps to adaptive ones.
    monkeypatch.setattr(FUSED, "_compiled", {})
    sizes = (5, 4, 3)
    model = tiny(sizes=sizes)
    opt = cls(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    batches = data(1000, in_features=sizes[0])
    before = compilations()
    train(model, opt, batches[:1], scheduler)
    assert compilations() == before + 1
    train(model, opt, batches[1:], scheduler)
    assert compilations() == before + 1
    assert int(opt.state[model[0].weight]["step"]) == 1000
    # ...and the 1,000 compiled steps stay on the eager run.
    eager_model = tiny(sizes=sizes)
    eager = cls(eager_model.parameters(), lr=1e-2)
    train(eager_model, eager, batches, torch.optim.lr_scheduler.CosineAnnealingLR(eager, 1000))
    assert_close(model, eager_model, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad])
def test_state_dict_round_trip_with_fused(cls):
    batches = data(12)
    straight_model = tiny()
    straight = cls(straight_model.parameters(), lr=1e-2, fused=True)
    train(straight_model, straight, batches)

    def resumed(fused_after: bool):
        model = tiny()
        opt = cls(model.parameters(), lr=1e-2, fused=True)
        train(model, opt, batches[:6])
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        assert saved["param_groups"][0]["fused"] is True
        if not fused_after:  # an eager run continuing a fused one
            saved["param_groups"][0]["fused"] = False
        opt = cls(model.parameters(), lr=1e-2, fused=fused_after)
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["fused"] is fused_after
        train(model, opt, batches[6:])
        return model

    assert_close(resumed(fused_after=True), straight_model, rtol=0, atol=0)
    assert_close(resumed(fused_after=False), straight_model)


def test_load_state_dict_takes_fused_from_the_checkpoint_as_torch_adam_does():
    for cls in (torch.optim.Adam, AdaBelief):
        source = cls(tiny().parameters(), fused=True)
        target = cls(tiny().parameters())
        target.load_state_dict(source.state_dict())
        assert target.param_groups[0]["fused"] is True, cls


def test_half_precision_and_complex_parameters_run_fused_like_eager():
    torch.manual_seed(0)
    weights = [torch.randn(4, 3).half(), torch.randn(3, dtype=torch.complex64)]
    eager_params = [nn.Parameter(w.clone()) for w in weights]
    fused_params = [nn.Parameter(w.clone()) for w in weights]
    eager = AdaBelief(eager_params, lr=1e-2, eps=1e-8)
    fused = AdaBelief(fused_params, lr=1e-2, eps=1e-8, fused=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        grads = [torch.randn(w.shape, generator=g).to(w.dtype) for w in weights]
        for params, opt in ((eager_params, eager), (fused_params, fused)):
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(fused_params[1], eager_params[1], rtol=1e-6, atol=1e-7)
    # float16 weights: the float32 results agree; rounding back may differ by one fp16 step.
    torch.testing.assert_close(fused_params[0], eager_params[0], rtol=1e-3, atol=0)
    state = fused.state[fused_params[0]]["exp_avg"]
    torch.testing.assert_close(state, eager.state[eager_params[0]]["exp_avg"], rtol=1e-6, atol=0)


def test_functional_rules_take_the_fused_flavour():
    torch.manual_seed(0)
    params = [p.detach().clone() for p in tiny().parameters()]  # shapes compiled above
    grads = [torch.randn_like(p) for p in params]
    for rule, n_state in ((adabelief, 2), (diffgrad, 3)):
        eager_p, fused_p = [p.clone() for p in params], [p.clone() for p in params]
        eager_s = [[torch.zeros_like(p) for p in params] for _ in range(n_state)]
        fused_s = copy.deepcopy(eager_s)
        for step in (1, 2, 3):
            rule(eager_p, grads, *eager_s, step=step, lr=0.1, ops=FOREACH)
            out = rule(fused_p, grads, *fused_s, step=step, lr=0.1, ops=FUSED)
        assert out.params[0] is fused_p[0]  # in place, like the foreach flavour
        for a, b in zip(fused_p, eager_p, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fused": True, "foreach": True}, "`fused` and `foreach` cannot be `True` together"),
        ({"fused": True, "differentiable": True}, "`fused` does not support `differentiable`"),
        ({"differentiable": True}, "differentiable=True is not supported"),
    ],
)
@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad])
def test_unsupported_combinations_are_refused_like_torch(cls, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        cls(tiny().parameters(), **kwargs)
    if "differentiable" in kwargs and "fused" in kwargs:  # the same refusal as torch's Adam
        with pytest.raises(RuntimeError, match=match):
            torch.optim.Adam(tiny().parameters(), **kwargs)


def test_without_a_compiler_fused_warns_and_takes_the_foreach_steps(monkeypatch):
    monkeypatch.setattr(FUSED, "_unavailable", {})
    monkeypatch.setattr(
        fused_module, "compilation_unavailable", lambda device: "no C++ compiler (simulated)"
    )
    eager_model = tiny()
    fused_model = copy.deepcopy(eager_model)
    batches = data(6)
    train(eager_model, AdaBelief(eager_model.parameters(), lr=1e-2), batches)
    opt = AdaBelief(fused_model.parameters(), lr=1e-2, fused=True)
    before = compilations()
    with pytest.warns(RuntimeWarning, match=r"fused=True: no C\+\+ compiler \(simulated\); "):
        train(fused_model, opt, batches)
    assert compilations() == before
    assert_close(fused_model, eager_model, rtol=0, atol=0)  # the very same foreach steps


def test_a_failing_compilation_warns_and_takes_the_foreach_steps():
    # A real failure: inductor is pointed at a compiler that does not exist, after the
    # availability check passed, with its caches off (shapes no other test uses).
    import torch._inductor.config as inductor_config

    assert FUSED.usable(torch.device("cpu"))
    # inductor's own patch (monkeypatch's undo deletes config entries: later compiles break)
    patch = inductor_config.patch(
        {"cpp.cxx": (None, "no-such-compiler-meanwise"), "fx_graph_cache": False}
    )
    eager_model = tiny(sizes=(5, 2, 3))
    fused_model = copy.deepcopy(eager_model)
    batches = data(4)
    train(eager_model, DiffGrad(eager_model.parameters(), lr=1e-2), batches)
    opt = DiffGrad(fused_model.parameters(), lr=1e-2, fused=True)
    with patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(fused_model, opt, batches)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and messages[0].startswith("fused=True: torch.compile failed")
    assert_close(fused_model, eager_model, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", [AdaBelief, DiffGrad])
def test_fused_on_cuda_equals_eager_on_cuda(cls):
    eager_model = tiny().cuda()
    fused_model = copy.deepcopy(eager_model)
    eager = cls(eager_model.parameters(), lr=1e-2)
    fused = cls(fused_model.parameters(), lr=1e-2, fused=True)
    batches = [(x.cuda(), y.cuda()) for x, y in data(12)]
    before = compilations()
    train(eager_model, eager, batches)
    train(fused_model, fused, batches)
    assert compilations() <= before + 1  # one graph for the run (none if compiled before)
    assert_close(fused_model, eager_model)
    assert_same_state(fused, fused_model, eager, eager_model)


def test_gradients_of_another_layout_get_their_own_compiled_step(monkeypatch):
    # The compiled step has no guards of its own: a gradient with other strides than the
    # parameter (allowed when assigning .grad) must key a separate compilation, not reuse one.
    monkeypatch.setattr(FUSED, "_compiled", {})
    torch.manual_seed(0)
    weight = torch.randn(4, 6)
    eager_p, fused_p = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    eager = DiffGrad([eager_p], lr=1e-2)
    fused = DiffGrad([fused_p], lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        grad = torch.randn(4, 6, generator=g)
        if step % 2:  # the same values, transposed in memory
            grad = grad.t().contiguous().t()
        eager_p.grad, fused_p.grad = grad.clone(), grad.clone(memory_format=torch.preserve_format)
        assert fused_p.grad.stride() == grad.stride()
        eager.step()
        fused.step()
    assert len(FUSED._compiled) == 2
    torch.testing.assert_close(fused_p, eager_p, rtol=1e-6, atol=1e-7)


def test_without_standalone_compilation_fused_goes_through_torch_compile(monkeypatch):
    # torch < 2.8 has no torch._inductor.standalone_compile: the rule then runs under
    # torch.compile (dynamo), with the same numbers.
    import torch._inductor

    monkeypatch.setattr(FUSED, "_compiled", {})
    monkeypatch.delattr(torch._inductor, "standalone_compile")
    eager_model = tiny(sizes=(5, 4, 3))
    fused_model = copy.deepcopy(eager_model)
    batches = data(6)
    eager = AdaBelief(eager_model.parameters(), lr=1e-2)
    fused = AdaBelief(fused_model.parameters(), lr=1e-2, fused=True)
    train(eager_model, eager, batches)
    before = counters["stats"]["unique_graphs"]
    train(fused_model, fused, batches)
    assert counters["stats"]["unique_graphs"] == before + 1  # dynamo traced it, once
    assert_close(fused_model, eager_model)
    assert_same_state(fused, fused_model, eager, eager_model)
