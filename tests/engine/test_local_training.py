"""Local training (meanwise.engine.local_training): the one LocalTrainer in each of its
executions (batched matmuls, vmap, sequential) against a plain per-client torch.optim loop, the
rule equations written out, the minibatch sampling rule, the rule registry, AdaHessian against
meanwise.optim.AdaHessian with the same probes, and the Population.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief
from torch import nn

from meanwise.engine import rules as engine_rules
from meanwise.engine.layout import ParameterLayout
from meanwise.engine.local_training import (
    EXECUTIONS,
    RULES,
    LocalRule,
    LocalTrainer,
    LocalTraining,
    draw_batches,
    register_rule,
    registered_rules,
    train_sequential,
    train_vectorized_stateful,
)
from meanwise.engine.population import Population
from meanwise.functional import rademacher_like
from meanwise.functional.sgd import sgd
from meanwise.optim import AdaHessian
from tests.engine._helpers import client_data as _data
from tests.engine._helpers import mlp as _mlp


def _train(model, local, execution, start, data, index, valid, steps, **kw):
    """Train the stacked start ``{name: [S, ...]}`` from zero state; the flat result [S, P]."""
    layout = ParameterLayout.of_tensors(start, batch_dims=1)
    population = Population.zeros_state(layout, layout.flatten(start, 1), local.state_slots)
    trainer = LocalTrainer(model, local, F.cross_entropy, execution=execution, **kw)
    return trainer.train(population, data, index, valid, steps).params


def _reference_loop(model, data, clients, steps, index, valid, make_opt):
    """Per client: a deep copy of the module and a torch.optim optimizer (the oracle)."""
    finals = []
    for s, n in enumerate(clients.tolist()):
        client = copy.deepcopy(model)
        opt = make_opt(client.parameters())
        for k in range(int(steps[s])):
            rows = index[k, s][valid[k, s]]
            opt.zero_grad()
            F.cross_entropy(client(data.features[rows]), data.labels[rows]).backward()
            opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in client.parameters()]))
        assert data.sizes[n] > 0
    return torch.stack(finals)


@pytest.mark.parametrize(
    "local, make_opt",
    [
        (
            LocalTraining("momentum", lr=0.1, steps=5, batch_size=8),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        ),
        (
            LocalTraining("adam", lr=0.01, steps=5, batch_size=8),
            lambda ps: torch.optim.Adam(ps, lr=0.01),
        ),
        (
            LocalTraining("sgd", lr=0.1, steps=5, batch_size=8, options={"weight_decay": 0.01}),
            lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
        ),
        # the authors' package (rectified, decoupled decay, eps inside the belief EMA)
        (
            LocalTraining(
                "adabelief", lr=0.05, steps=5, batch_size=8, options={"weight_decay": 0.01}
            ),
            lambda ps: ReferenceAdaBelief(ps, lr=0.05, weight_decay=0.01, print_change_log=False),
        ),
        (
            LocalTraining("adabelief", lr=0.05, steps=5, batch_size=8, options={"rectify": False}),
            lambda ps: ReferenceAdaBelief(ps, lr=0.05, rectify=False, print_change_log=False),
        ),
        (
            LocalTraining(
                "diffgrad", lr=0.05, steps=5, batch_size=8, options={"beta1": 0.8, "eps": 1e-6}
            ),
            lambda ps: torch_optimizer.DiffGrad(ps, lr=0.05, betas=(0.8, 0.999), eps=1e-6),
        ),
    ],
    ids=["momentum", "adam", "sgd-l2", "adabelief", "adabelief-unrectified", "diffgrad"],
)
def test_every_execution_equals_per_client_loop(local, make_opt):
    model, data = _mlp(), _data()
    clients = torch.tensor([0, 1, 2, 3])
    steps = torch.tensor([5, 1, 3, 4])  # variable step counts: masking must freeze clients
    index, valid = draw_batches(data, clients, 5, 8, torch.Generator().manual_seed(1))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    expected = _reference_loop(model, data, clients, steps, index, valid, make_opt)
    for execution in EXECUTIONS:
        got = _train(model, local, execution, start, data, index, valid, steps)
        torch.testing.assert_close(got, expected, msg=lambda m, e=execution: f"{e}: {m}")


def test_training_in_two_calls_continues_like_torch_optim():
    # momentum carried in from an earlier call and step numbers from first_step: split a
    # torch.optim.SGD run in two calls, with clients frozen by their step counts
    local = LocalTraining("momentum", lr=0.1, steps=4, batch_size=8, options={"weight_decay": 1e-3})
    model, data = _mlp(), _data()
    clients = torch.tensor([0, 1, 2, 3])
    steps = torch.tensor([4, 4, 4, 4])
    index, valid = draw_batches(data, clients, 4, 8, torch.Generator().manual_seed(2))
    start = Population.of_model(model, 4, state_slots=1)
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    expected = _reference_loop(model, data, clients, steps, index, valid, make)
    two = torch.full((4,), 2)
    for execution in EXECUTIONS:
        trainer = LocalTrainer(model, local, F.cross_entropy, execution=execution)
        half = trainer.train(start, data, index, valid, two)
        assert bool(half.state[0].ne(0).any())
        rest = trainer.train(half, data, index[2:], valid[2:], two, first_step=3)
        torch.testing.assert_close(rest.params, expected)
    # frozen clients keep parameters and state; the executions agree
    state = (torch.randn_like(start.params),)
    moving = Population(start.layout, start.params, state)
    uneven = torch.tensor([3, 0, 1, 2])
    results = [
        LocalTrainer(model, local, F.cross_entropy, execution=execution).train(
            moving, data, index, valid, uneven, first_step=2
        )
        for execution in EXECUTIONS
    ]
    for other in results[1:]:
        torch.testing.assert_close(other.params, results[0].params, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(other.state[0], results[0].state[0], rtol=1e-12, atol=1e-14)
    for result in results:
        assert torch.equal(result.params[1], start.params[1])
        assert torch.equal(result.state[0][1], state[0][1])
    with pytest.raises(ValueError, match="first_step"):
        LocalTrainer(model, local, F.cross_entropy).train(
            moving, data, index, valid, uneven, first_step=0
        )


def test_the_function_forms_are_the_trainer():
    # train_sequential (Flower client) and train_vectorized_stateful (distributed gossip)
    local = LocalTraining("momentum", lr=0.1, steps=3, batch_size=8)
    model, data = _mlp(), _data()
    clients, steps = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1, 2, 3])
    index, valid = draw_batches(data, clients, 3, 8, torch.Generator().manual_seed(4))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    layout = ParameterLayout.of_tensors(start, batch_dims=1)
    expected = _train(model, local, "sequential", start, data, index, valid, steps)
    got, buffers = train_sequential(
        model, start, {}, data, index, valid, steps, local, F.cross_entropy
    )
    assert torch.equal(layout.flatten(got, 1), expected) and buffers == [{}] * 4
    state = local.init_state(list(start.values()))
    got, new_state = train_vectorized_stateful(
        model, start, state, data, index, valid, steps, local, F.cross_entropy
    )
    torch.testing.assert_close(layout.flatten(got, 1), expected)
    assert [t.shape for t in new_state[0]] == [t.shape for t in start.values()]


def _diffgrad_by_hand(params, grad_fn, steps, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """diffGrad (Dubey et al.), the v2 rule written out: Adam's moments, the first damped by
    xi = sigmoid(|g_{t-1} - g_t|), g_0 = 0; step lr·sqrt(1-beta2^t)/(1-beta1^t)·xi·m/(sqrt(v)+eps).
    """
    m = torch.zeros_like(params)
    v = torch.zeros_like(params)
    previous = torch.zeros_like(params)
    for t in range(1, steps + 1):
        g = grad_fn(params, t - 1)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        xi = torch.sigmoid((previous - g).abs())
        step = lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t)
        params = params - step * xi * m / (v.sqrt() + eps)
        previous = g
    return params


def test_diffgrad_local_training_follows_the_equations():
    # logistic regression on one client with full batches: the gradient in closed form
    data = _data(sizes=(5, 7))
    x1, y1 = data.client(1)
    model = nn.Linear(6, 3, bias=False).double()
    start = {"weight": model.weight.detach()[None].expand(2, 3, 6)}
    local = LocalTraining("diffgrad", lr=0.05, steps=6, batch_size=8)
    index, valid = draw_batches(data, torch.tensor([0, 1]), 6, 8, torch.Generator())
    got = _train(model, local, "vmap", start, data, index, valid, torch.tensor([6, 6]))

    def gradient(w, _):
        p = torch.softmax(x1 @ w.T, -1)
        return (p - F.one_hot(y1, 3).double()).T @ x1 / len(y1)

    expected = _diffgrad_by_hand(model.weight.detach(), gradient, 6, 0.05)
    torch.testing.assert_close(got[1].view(3, 6), expected)


def test_minibatches_follow_the_sampling_rule():
    data = _data(sizes=(3, 40))
    index, valid = draw_batches(data, torch.tensor([0, 1]), 50, 8, torch.Generator())
    # client 0 (3 < 8 examples) uses all its rows each step, the rest masked out
    assert torch.equal(index[:, 0][valid[:, 0]].reshape(50, 3), torch.arange(3).expand(50, 3))
    assert int(valid[:, 0].sum()) == 50 * 3
    # client 1 draws within its own rows, all valid, roughly uniformly
    rows = index[:, 1].flatten()
    assert valid[:, 1].all() and rows.min() >= 3 and rows.max() < 43
    assert torch.bincount(rows - 3, minlength=40).min() > 0


def test_built_in_rules_bring_their_state_slots():
    # the slot counts are the state each rule's functional form returns
    assert RULES == ("sgd", "momentum", "adam", "adabelief", "diffgrad", "adahessian")
    slots = {rule: LocalTraining(rule).state_slots for rule in RULES}
    assert slots == {
        "sgd": 0, "momentum": 1, "adam": 2, "adabelief": 2, "diffgrad": 3, "adahessian": 2
    }  # fmt: skip
    assert [r for r in RULES if LocalTraining(r).needs_hessian] == ["adahessian"]
    params = [torch.ones(3, dtype=torch.float64)]
    half = [torch.full((3,), 0.5, dtype=torch.float64)]
    with pytest.raises(ValueError, match="hessian_diag"):
        LocalTraining("adahessian").apply(
            params, half, LocalTraining("adahessian").init_state(params), 1
        )
    for rule in RULES:
        local = LocalTraining(rule, lr=0.1)
        state = local.init_state(params)
        new, new_state = local.apply(params, half, state, 1, half if local.needs_hessian else None)
        assert len(new_state) == local.state_slots == len(state)
        assert not torch.equal(new[0], params[0])


def test_a_registered_rule_trains_through_every_execution(monkeypatch):
    # Nesterov momentum as a new rule: registered once (one state slot), LocalTraining takes
    # it, and vmap / batched matmuls / the sequential loop all equal torch.optim.SGD(nesterov)
    monkeypatch.setattr(engine_rules, "_REGISTRY", dict(engine_rules._REGISTRY))

    def nesterov(params, grads, state, step, lr, options):
        out = sgd(params, grads, state[0], step=step, lr=lr, **options)
        return out.params, [out.momentum_buffer]

    register_rule(LocalRule("nesterov", 1, nesterov, {"momentum": 0.9, "nesterov": True}))
    assert "nesterov" in registered_rules()
    with pytest.raises(ValueError, match="already registered"):
        register_rule(LocalRule("nesterov", 1, nesterov))
    with pytest.raises(ValueError, match="state_slots"):
        register_rule(LocalRule("bad", -1, nesterov))
    local = LocalTraining("nesterov", lr=0.1, steps=4, batch_size=8)
    model, data = _mlp(), _data()
    clients = torch.tensor([0, 1, 2, 3])
    steps = torch.tensor([4, 2, 3, 1])
    index, valid = draw_batches(data, clients, 4, 8, torch.Generator().manual_seed(3))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)  # noqa: E731
    expected = _reference_loop(model, data, clients, steps, index, valid, make)
    for execution in EXECUTIONS:
        got = _train(model, local, execution, start, data, index, valid, steps)
        torch.testing.assert_close(got, expected)


def test_an_unknown_rule_names_the_registered_ones():
    with pytest.raises(ValueError, match="rule must be one of .*'diffgrad'.*got 'lion'"):
        LocalTraining("lion")
    with pytest.raises(TypeError, match="LocalRule"):
        register_rule("sgd")


def test_the_areas_reexport_the_engines_local_training():
    import meanwise.federated

    assert meanwise.federated.LocalTraining is LocalTraining


# --- AdaHessian: the registered rule against meanwise.optim.AdaHessian ------------------------

ADAHESSIAN = {"beta1": 0.8, "beta2": 0.99, "eps": 1e-3, "weight_decay": 0.01, "hessian_power": 0.7}


def _adahessian_reference(model, data, clients, steps, index, valid, n_samples, make_probe):
    """Per client: a deep copy of the module stepped by meanwise.optim.AdaHessian (the oracle),
    its probes drawn by ``make_probe(s)``."""
    finals = []
    for s in range(clients.numel()):
        client = copy.deepcopy(model)
        opt = AdaHessian(
            client.parameters(), lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.01,
            hessian_power=0.7, n_samples=n_samples,
        )  # fmt: skip
        opt.probe = make_probe(s)
        for k in range(int(steps[s])):
            rows = index[k, s][valid[k, s]]
            opt.zero_grad()
            loss = F.cross_entropy(client(data.features[rows]), data.labels[rows])
            loss.backward(create_graph=True)
            opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in client.parameters()]))
    return torch.stack(finals)


def _conv_net() -> nn.Module:
    # a Conv1d kernel [2, 1, 3]: AdaHessian averages its diagonal over the kernel axis
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).double()


@pytest.mark.parametrize("n_samples", [1, 2])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_adahessian_sequential_equals_the_optimizer_with_the_same_generator(net, n_samples):
    # one model after the other: the trainer's generator draws what one AdaHessian optimizer
    # per client, sharing that generator in client order, draws
    model = _mlp() if net == "mlp" else _conv_net()
    data = _data()
    local = LocalTraining(
        "adahessian", lr=0.05, steps=4, batch_size=8, options={**ADAHESSIAN, "n_samples": n_samples}
    )
    clients, steps = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 2, 3, 1])
    index, valid = draw_batches(data, clients, 4, 8, torch.Generator().manual_seed(5))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    got = _train(
        model, local, "sequential", start, data, index, valid, steps,
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    shared = torch.Generator().manual_seed(11)
    expected = _adahessian_reference(
        model, data, clients, steps, index, valid, n_samples,
        lambda s: lambda p, _: rademacher_like(p, shared),
    )  # fmt: skip
    torch.testing.assert_close(got, expected)


# (the stacked execution runs Linear/activation stacks only: no conv net for it)
@pytest.mark.parametrize("execution, net", [("stacked", "mlp"), ("vmap", "mlp"), ("vmap", "conv")])
def test_adahessian_on_the_stack_equals_the_optimizer_with_the_same_probes(execution, net):
    # stacked / vmap draw one probe per parameter tensor for the whole stack [S, *shape] each
    # step; client s's optimizer is handed row s of those same draws
    model = _mlp() if net == "mlp" else _conv_net()
    data = _data()
    local = LocalTraining("adahessian", lr=0.05, steps=4, batch_size=8, options=ADAHESSIAN)
    clients, steps = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 2, 3, 1])
    index, valid = draw_batches(data, clients, 4, 8, torch.Generator().manual_seed(6))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    got = _train(
        model, local, execution, start, data, index, valid, steps,
        generator=torch.Generator().manual_seed(12),
    )  # fmt: skip
    replay = torch.Generator().manual_seed(12)
    draws = [
        [
            rademacher_like(torch.empty(4, *p.shape, dtype=p.dtype), replay)
            for p in model.parameters()
        ]
        for _ in range(4)
    ]

    def make_probe(s):
        rows = iter([z[s] for step in draws for z in step])
        return lambda p, _: next(rows)

    expected = _adahessian_reference(model, data, clients, steps, index, valid, 1, make_probe)
    torch.testing.assert_close(got, expected)


def test_adahessian_with_one_model_draws_the_same_probes_in_every_execution():
    model, data = _mlp(), _data()
    local = LocalTraining("adahessian", lr=0.05, steps=3, batch_size=8)
    index, valid = draw_batches(data, torch.tensor([1]), 3, 8, torch.Generator().manual_seed(7))
    start = {k: v.detach()[None] for k, v in model.named_parameters()}
    results = [
        _train(
            model,
            local,
            execution,
            start,
            data,
            index,
            valid,
            torch.tensor([3]),
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        for execution in EXECUTIONS
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])


def test_adahessian_options_are_checked():
    with pytest.raises(ValueError, match="n_samples"):
        LocalTraining("adahessian", options={"n_samples": 0})
    with pytest.raises(ValueError, match="update_each"):
        LocalTraining("adahessian", options={"update_each": 2})


# --- the trainer's and the population's validation ---------------------------------------------


def test_the_trainer_refuses_what_it_cannot_run_by_name():
    local = LocalTraining("momentum", lr=0.1, steps=2, batch_size=8)
    with pytest.raises(TypeError, match="execution='stacked' cannot run this model: Unflatten"):
        LocalTrainer(_conv_net(), local, F.cross_entropy, execution="stacked")
    with pytest.raises(ValueError, match="execution must be one of"):
        LocalTrainer(_mlp(), local, F.cross_entropy, execution="loop")
    data = _data()
    index, valid = draw_batches(data, torch.tensor([0, 1]), 2, 8, torch.Generator())
    trainer = LocalTrainer(_mlp(), local, F.cross_entropy)
    no_state = Population.of_model(_mlp(), 2)
    with pytest.raises(ValueError, match="0 optimizer-state slots; rule 'momentum' keeps 1"):
        trainer.train(no_state, data, index, valid, torch.tensor([2, 2]))
    population = Population.of_model(_mlp(), 2, state_slots=1)
    with pytest.raises(ValueError, match=r"steps must be \[S\]=\[2\]"):
        trainer.train(population, data, index, valid, torch.tensor([2, 2, 2]))
    with pytest.raises(ValueError, match="K >= 3 steps"):
        trainer.train(population, data, index, valid, torch.tensor([3, 2]))


def test_population_rows_views_and_precision():
    model = _mlp()
    population = Population.of_model(model, 3, state_slots=2)
    layout = population.layout
    assert population.size == 3 and population.device.type == "cpu"
    assert population.dtype == torch.float64 and len(population.state) == 2
    for name, tensor in population.parameters().items():
        assert torch.equal(tensor[2], dict(model.named_parameters())[name].detach())
    moved = population.params + torch.arange(3.0, dtype=torch.float64)[:, None]
    picked = Population(layout, moved, population.state).rows([2, 0])
    assert torch.equal(picked.params, moved[[2, 0]]) and picked.size == 2
    single = population.to(dtype=torch.float32)
    assert single.dtype == single.layout.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in single.state)
    assert population.to() is population
    with pytest.raises(ValueError, match="columns; the layout has"):
        Population(layout, torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"state\[0\] must be like params"):
        Population(layout, population.params, (torch.zeros(2, layout.numel),))
    with pytest.raises(ValueError, match="params are torch.float32; the layout is torch.float64"):
        Population(layout, population.params.float())
    with pytest.raises(ValueError, match="size must be a positive int"):
        Population.of_model(model, 0)
