"""The federated simulator: resume, empty rounds, non-finite clients, fallbacks, edge cases.

Local training itself (every execution against a per-client torch.optim loop) is tested in
tests/engine/test_local_training.py."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.engine.local_training import LocalTraining
from meanwise.federated.aggregators import AFACS, FedAU, FedAvg
from meanwise.federated.participation import Anarchic, Bernoulli, Markov
from meanwise.federated.simulator import FederatedSimulator, FederatedSweep
from tests.engine._helpers import client_data as _data
from tests.engine._helpers import device  # noqa: F401  (the fixture)
from tests.engine._helpers import mlp as _mlp


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
        return _simulator(path, AFACS(12, 1.0, 0.05), anarchic)

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


def _short_run(make_device=None, dtype=None, **kw):
    local = LocalTraining("adam", lr=0.02, steps=3, batch_size=8)
    g = torch.Generator().manual_seed(1)
    test = (
        torch.randn(30, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (30,), generator=g),
    )
    sim = FederatedSimulator(
        _mlp(), _data(), FedAU(4), Bernoulli(torch.full((4,), 0.7), seed=2), local, test=test,
        eval_every=2, seed=3, device=make_device, dtype=dtype, **kw,
    )  # fmt: skip
    sim.run(num_rounds=4)
    return sim


@pytest.mark.parametrize("vectorize", ["auto", "vmap", False])
def test_a_short_run_on_each_device(device, vectorize):  # noqa: F811
    # on the CPU, device= changes nothing (bit-exact); on CUDA the models, state and data live
    # there and the run is the CPU's up to float rounding (the same minibatches: drawn on CPU)
    reference = _short_run(vectorize=vectorize)
    sim = _short_run(device, vectorize=vectorize)
    assert sim.x.device.type == device.type and sim.train.features.device.type == device.type
    if device.type == "cpu":
        assert torch.equal(sim.x, reference.x) and sim.metrics == reference.metrics
    else:
        torch.testing.assert_close(sim.x.cpu(), reference.x, rtol=1e-9, atol=1e-11)
        for got, want in zip(sim.metrics, reference.metrics, strict=True):
            assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1 / 30)


def test_a_sweep_follows_the_device(device):  # noqa: F811
    local = LocalTraining("sgd", lr=0.1, steps=2, batch_size=8)
    runs = [
        FederatedSweep(
            _mlp(),
            _data(),
            [FedAvg(4), FedAU(4)],
            Bernoulli(torch.full((4,), 0.7), seed=2),
            local,
            seed=3,
            device=where,
        )  # fmt: skip
        for where in ("cpu", device)
    ]
    for sweep in runs:
        sweep.run(3)
    assert runs[1].xs.device.type == device.type
    torch.testing.assert_close(runs[1].xs.cpu(), runs[0].xs, rtol=1e-9, atol=1e-11)


def test_dtype_runs_a_float64_model_in_float32():
    single = _short_run(dtype=torch.float32)
    double = _short_run()
    assert single.x.dtype == single.layout.dtype == torch.float32
    assert single.train.features.dtype == torch.float32
    torch.testing.assert_close(single.x.double(), double.x, rtol=1e-4, atol=1e-5)


def test_run_takes_num_rounds_and_the_old_keyword_with_a_warning():
    sim = _short_run()
    with pytest.warns(DeprecationWarning, match=r"run\(rounds=...\) is deprecated"):
        sim.run(rounds=6)
    assert sim.round == 6
    with pytest.raises(TypeError, match="num_rounds only"):
        sim.run(7, rounds=7)
    sim.run(8)  # positional, as before
    assert sim.round == 8


def test_adahessian_local_training_resumes_bit_exactly(tmp_path):
    # the Hutchinson probes come from the simulator's own probe generator, which a checkpoint
    # holds: a resumed run draws the probes the straight one drew
    local = LocalTraining("adahessian", lr=0.05, steps=2, batch_size=8)

    def make(path):
        return FederatedSimulator(
            _mlp(), _data(), FedAvg(4), Bernoulli(torch.full((4,), 0.7), seed=2), local,
            checkpoint_every=2, checkpoint_path=path / "c.pt", seed=3,
        )  # fmt: skip

    straight = make(tmp_path / "a")
    straight.run(4)
    make(tmp_path / "b").run(2)
    resumed = make(tmp_path / "b")
    resumed.run(4, resume=True)
    assert torch.equal(resumed.x, straight.x)
    assert not torch.equal(straight.x, make(tmp_path / "c").x)  # it trained
