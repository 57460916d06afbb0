"""The simulator: vectorized local training vs a plain per-client torch loop, resume, edge cases."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_optimizer
from adabelief_pytorch import AdaBelief as ReferenceAdaBelief
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.federated.aggregators import AFA_CS, FedAU, FedAvg
from meanwise.federated.participation import Anarchic, Bernoulli, Markov
from meanwise.federated.simulator import FederatedSimulator, flatten, unflatten
from meanwise.functional.local_training import (
    LocalTraining,
    draw_batches,
    train_sequential,
    train_stacked,
    train_stacked_flat,
    train_stacked_stateful,
    train_vectorized,
    train_vectorized_stateful,
)


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


def _simulator(tmp_path, aggregator, participation, *, seed=0, **kw):
    train, test = fedprox_synthetic(1.0, 1.0, n_users=12, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 16), nn.ReLU(), nn.Linear(16, 10))
    return FederatedSimulator(
        model,
        train,
        aggregator,
        participation,
        LocalTraining("sgd", lr=0.05, steps=3, batch_size=16),
        test=(test.features, test.labels),
        eval_every=5,
        checkpoint_every=10,
        checkpoint_path=tmp_path / "ckpt.pt",
        log_path=tmp_path / "log.jsonl",
        seed=seed,
        **kw,
    )


@pytest.mark.parametrize("kind", ["fedau-markov", "afa_cs-anarchic"])
def test_resume_is_bit_exact(tmp_path, kind):
    def build(path):
        if kind == "fedau-markov":
            return _simulator(path, FedAU(12, cutoff=5), Markov(torch.full((12,), 0.3), seed=1))
        anarchic = Anarchic(12, 3, 4, local_steps="per_worker", max_staleness=2, seed=1)
        return _simulator(path, AFA_CS(12, 1.0, 0.05), anarchic)

    straight = build(tmp_path / "a")
    straight.run(20)
    first = build(tmp_path / "b")
    first.run(10)
    resumed = build(tmp_path / "b")
    resumed.run(20, resume=True)
    assert resumed.round == 20
    assert torch.equal(resumed.x, straight.x)
    lines = [json.loads(s) for s in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [5, 10, 15, 20]
    assert lines[-1]["test_accuracy"] == straight.metrics[-1]["test_accuracy"]


def test_empty_round_leaves_model_unchanged(tmp_path):
    sim = _simulator(tmp_path, FedAvg(12), Bernoulli(torch.full((12,), 1e-9), seed=0))
    before = sim.x.clone()
    record = sim.step()
    assert record["participants"] == 0 and torch.equal(sim.x, before)


def test_nonfinite_client_is_dropped_and_logged(tmp_path):
    sim = _simulator(tmp_path, FedAvg(12), Bernoulli(torch.ones(12), seed=0))
    lo, hi = int(sim.train.offsets[4]), int(sim.train.offsets[5])
    sim.train.features[lo:hi] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sim.run(5)
    assert torch.isfinite(sim.x).all()
    assert sim.metrics[-1]["dropped_nonfinite"] == 5


def test_batchnorm_falls_back_with_a_message():
    data = _data(dtype=torch.float32)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="sequential.*BatchNorm1d"):
        sim = FederatedSimulator(
            model, data, FedAvg(4), Bernoulli(torch.ones(4)), LocalTraining(steps=2, batch_size=4)
        )
    assert not sim.vectorized
    sim.run(2)
    assert torch.isfinite(sim.x).all()
    # the running statistics moved away from their initial (0, 1)
    assert not torch.equal(sim.buffers["1.running_mean"], torch.zeros(8))


def test_client_count_mismatch_is_rejected():
    data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="aggregator"):
            FederatedSimulator(_mlp(), data, FedAvg(5), Bernoulli(torch.ones(4)), LocalTraining())
        with pytest.raises(ValueError, match="participation"):
            FederatedSimulator(_mlp(), data, FedAvg(4), Bernoulli(torch.ones(3)), LocalTraining())


class _DataDependentGate(nn.Module):
    """Python control flow on a tensor's value: vmap cannot batch it (no BatchNorm here)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        out = self.linear(x)
        return out if out.sum() > 0 else -out


def test_a_model_vmap_cannot_run_falls_back_with_the_reason():
    data = _data(dtype=torch.float32)

    def make(vectorize):
        torch.manual_seed(0)
        return FederatedSimulator(
            _DataDependentGate(),
            data,
            FedAvg(4),
            Bernoulli(torch.ones(4)),
            LocalTraining(steps=2, batch_size=4),
            seed=1,
            vectorize=vectorize,
        )

    sim = make("auto")
    assert sim.vectorized  # nothing to see up front: no BatchNorm
    with pytest.warns(UserWarning, match="sequential per-client loop: vmap could not run.*control"):
        sim.run(2)
    assert not sim.vectorized
    reference = make(False)
    reference.run(2)
    torch.testing.assert_close(sim.x, reference.x)  # the round was redone, not half-applied
    with pytest.raises(RuntimeError, match="control flow"):
        make(True).run(1)
