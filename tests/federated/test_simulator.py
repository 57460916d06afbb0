"""The simulator: vectorized local training vs a plain per-client torch loop, resume, edge cases."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meanwise.data.federated_split import FederatedDataset
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.federated.aggregators import AFA_CS, FedAU, FedAvg
from meanwise.federated.participation import Anarchic, Bernoulli, Markov
from meanwise.federated.simulator import FederatedSimulator, flatten
from meanwise.functional.local_training import (
    LocalTraining,
    draw_batches,
    train_sequential,
    train_vectorized,
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
    ],
    ids=["momentum", "adam"],
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
