"""Local training (meanwise.engine.local_training): every execution (vmap, batched matmuls,
sequential, their stateful and flat forms) against a plain per-client torch.optim loop, the
rule equations written out, the minibatch sampling rule, and the rule registry.

Moved from tests/federated/test_simulator.py with the code (issue 14); assertions unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.engine import local_training as engine_local_training
from meanwise.engine.layout import ParameterLayout
from meanwise.engine.local_training import (
    RULES,
    LocalRule,
    LocalTraining,
    draw_batches,
    register_rule,
    registered_rules,
    train_sequential,
    train_stacked,
    train_stacked_flat,
    train_stacked_stateful,
    train_vectorized,
    train_vectorized_stateful,
)
from meanwise.functional.sgd import sgd


def flatten(params: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    shapes = tuple(tuple(p.shape[batch_dims:]) for p in params.values())
    layout = ParameterLayout(tuple(params), shapes, next(iter(params.values())).dtype)
    return layout.flatten(params, batch_dims)


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return ParameterLayout.of_tensors(like).unflatten(flat)


def _mlp(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(sizes=(3, 40, 17, 9), dtype=torch.float64, seed=0) -> FederatedDataset:
    gen = torch.Generator().manual_seed(seed)
    parts = [
        (torch.randn(s, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (s,), generator=gen))
        for s in sizes
    ]
    return FederatedDataset.from_clients(parts)


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
def test_vectorized_local_training_equals_per_client_loop(local, make_opt):
    model, data = _mlp(), _data()
    clients = torch.tensor([0, 1, 2, 3])
    steps = torch.tensor([5, 1, 3, 4])  # variable step counts: masking must freeze clients
    index, valid = draw_batches(data, clients, 5, 8, torch.Generator().manual_seed(1))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    got = train_vectorized(model, start, data, index, valid, steps, local, F.cross_entropy)
    expected = _reference_loop(model, data, clients, steps, index, valid, make_opt)
    torch.testing.assert_close(flatten(got, 1), expected)
    seq, _ = train_sequential(model, start, {}, data, index, valid, steps, local, F.cross_entropy)
    torch.testing.assert_close(flatten(seq, 1), expected)
    stacked = train_stacked(model, start, data, index, valid, steps, local, F.cross_entropy)
    torch.testing.assert_close(flatten(stacked, 1), expected)


def test_stateful_stacked_training_continues_like_vmap_and_like_torch_optim():
    # momentum carried in from an earlier call and step numbers from first_step: split a
    # torch.optim.SGD run in two calls, with clients frozen by their step counts
    local = LocalTraining("momentum", lr=0.1, steps=4, batch_size=8, options={"weight_decay": 1e-3})
    model, data = _mlp(), _data()
    clients = torch.tensor([0, 1, 2, 3])
    steps = torch.tensor([4, 4, 4, 4])
    index, valid = draw_batches(data, clients, 4, 8, torch.Generator().manual_seed(2))
    start = {k: v.detach().expand(4, *v.shape) for k, v in model.named_parameters()}
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3)  # noqa: E731
    expected = _reference_loop(model, data, clients, steps, index, valid, make)
    for train in (train_stacked_stateful, train_vectorized_stateful):
        state = local.init_state(list(start.values()))
        two = torch.full((4,), 2)
        half, state = train(model, start, state, data, index, valid, two, local, F.cross_entropy)
        assert any(bool(s.ne(0).any()) for s in state[0])
        rest, state = train(
            model, half, state, data, index[2:], valid[2:], two, local, F.cross_entropy,
            first_step=3,
        )  # fmt: skip
        torch.testing.assert_close(flatten(rest, 1), expected)
    # frozen clients keep parameters and state; the two executions agree
    state = [[torch.randn_like(p) for p in start.values()]]
    uneven = torch.tensor([3, 0, 1, 2])
    got = train_stacked_stateful(
        model, start, state, data, index, valid, uneven, local, F.cross_entropy, first_step=2
    )
    want = train_vectorized_stateful(
        model, start, state, data, index, valid, uneven, local, F.cross_entropy, first_step=2
    )
    for a, b in zip([*got[0].values(), *got[1][0]], [*want[0].values(), *want[1][0]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[0]["0.weight"][1], start["0.weight"][1], rtol=0, atol=0)
    # on flat rows (the gossip simulator's layout): the rule runs once on [S, P]
    like = dict(model.named_parameters())
    flat, flat_state = train_stacked_flat(
        model, flatten(start, 1), [flatten(dict(zip(like, state[0], strict=True)), 1)],
        lambda rows: unflatten(rows, like), data, index, valid, uneven, local, F.cross_entropy,
        first_step=2,
    )  # fmt: skip
    torch.testing.assert_close(flat, flatten(got[0], 1), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(
        flat_state[0], flatten(dict(zip(like, got[1][0], strict=True)), 1), rtol=1e-14, atol=1e-15
    )
    torch.testing.assert_close(got[1][0][1][1], state[0][1][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="first_step"):
        train_stacked_stateful(
            model, start, state, data, index, valid, uneven, local, F.cross_entropy, first_step=0
        )


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
    got = train_vectorized(
        model, start, data, index, valid, torch.tensor([6, 6]), local, F.cross_entropy
    )

    def gradient(w, _):
        p = torch.softmax(x1 @ w.T, -1)
        return (p - F.one_hot(y1, 3).double()).T @ x1 / len(y1)

    expected = _diffgrad_by_hand(model.weight.detach(), gradient, 6, 0.05)
    torch.testing.assert_close(got["weight"][1], expected)


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
    assert RULES == ("sgd", "momentum", "adam", "adabelief", "diffgrad")
    slots = {rule: LocalTraining(rule).state_slots for rule in RULES}
    assert slots == {"sgd": 0, "momentum": 1, "adam": 2, "adabelief": 2, "diffgrad": 3}
    params = [torch.ones(3, dtype=torch.float64)]
    for rule in RULES:
        local = LocalTraining(rule, lr=0.1)
        state = local.init_state(params)
        new, new_state = local.apply(params, [torch.full((3,), 0.5, dtype=torch.float64)], state, 1)
        assert len(new_state) == local.state_slots == len(state)
        assert not torch.equal(new[0], params[0])


def test_a_registered_rule_trains_through_every_execution(monkeypatch):
    # Nesterov momentum as a new rule: registered once (one state slot), LocalTraining takes
    # it, and vmap / batched matmuls / the sequential loop all equal torch.optim.SGD(nesterov)
    monkeypatch.setattr(engine_local_training, "_REGISTRY", dict(engine_local_training._REGISTRY))

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
    for train in (train_vectorized, train_stacked):
        got = train(model, start, data, index, valid, steps, local, F.cross_entropy)
        torch.testing.assert_close(flatten(got, 1), expected)
    seq, _ = train_sequential(model, start, {}, data, index, valid, steps, local, F.cross_entropy)
    torch.testing.assert_close(flatten(seq, 1), expected)


def test_an_unknown_rule_names_the_registered_ones():
    with pytest.raises(ValueError, match="rule must be one of .*'diffgrad'.*got 'lion'"):
        LocalTraining("lion")
    with pytest.raises(TypeError, match="LocalRule"):
        register_rule("sgd")


def test_the_old_import_paths_still_work():
    import meanwise.federated
    import meanwise.functional.local_training as old

    assert old.LocalTraining is LocalTraining is meanwise.federated.LocalTraining
    assert old.train_stacked is train_stacked
