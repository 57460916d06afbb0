"""Experiment `fedau`: determinism, the side-by-side sweep against separate simulators (and the
batched-matmul local training against the vmap path), FedAU's weights against 1/p_n, and the
verdict logic on hand-made results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from meanwise.data.federated_split import digits_federated
from meanwise.experiments import get
from meanwise.experiments.fedau import FedAUConfig, run
from meanwise.experiments.fedau_report import summarize, verdict
from meanwise.federated import MIFA, Bernoulli, FedAU, FedAvg, FederatedSimulator, LocalTraining
from meanwise.federated.simulator import FederatedSweep

TINY = FedAUConfig(
    seeds=1,
    datasets=("digits",),
    patterns=("bernoulli",),
    methods=("FedAU", "FedAvg-all"),
    n_clients=20,
    rounds=150,
    eval_every=50,
    final_window=1,
    hidden=8,
    server_lr_multipliers=(1.0,),
)


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = (dataclasses.asdict(r) for r in tiny_runs)
    assert a["settings"] == b["settings"]
    objectives = [[r["train_objective"] for r in x["settings"][0]["runs"]] for x in (a, c)]
    assert objectives[0] != objectives[1]
    assert [r["method"] for r in a["settings"][0]["runs"]] == ["FedAU", "FedAvg-all"]
    assert all(r["chosen"] for r in a["settings"][0]["runs"])  # one rate each: chosen


def test_fedau_weights_approach_inverse_probabilities(tiny_runs):
    # FedAvg over all clients weights client n by p_n in expectation (rare clients count
    # p_n times less); FedAU's interval means estimate 1/p_n, which undoes that.
    setting = tiny_runs[0].settings[0]
    p = torch.tensor(setting.probs, dtype=torch.float64)
    w = torch.tensor(setting.fedau_weights, dtype=torch.float64)
    seen = w > 0
    assert int(seen.sum()) >= 15
    fedau_error = float((w[seen] * p[seen] - 1).abs().median())
    fedavg_error = float((p - 1).abs().median())
    assert fedau_error < 0.35 < fedavg_error
    # a rare client's weight is large, a frequent one's near 1
    rare, frequent = int(p[seen].argmin()), int(p[seen].argmax())
    assert w[seen][rare] > 5 * w[seen][frequent]


def _digits_double():
    train, _, _ = digits_federated(12, 0.5, seed=0)
    return dataclasses.replace(train, features=train.features.double())


def _tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01}])
def test_batched_matmul_local_training_equals_the_vmap_path(options):
    # the experiments' models (Linear stacks) take train_stacked; vmap is the reference
    train = _digits_double()

    def make(vectorize):
        return FederatedSimulator(
            _tanh_mlp(),
            train,
            FedAvg(12),
            Bernoulli([0.5] * 12, seed=1),
            LocalTraining("sgd", lr=0.1, steps=4, batch_size=8, options=options),
            seed=3,
            vectorize=vectorize,
        )

    stacked, reference = make("auto"), make("vmap")
    assert stacked.stacked and not reference.stacked
    clients, steps = torch.tensor([0, 4, 7, 11]), torch.tensor([4, 1, 3, 2])
    starts = reference.x.expand(4, -1)
    torch.testing.assert_close(
        stacked.local_updates(clients, steps, starts),
        reference.local_updates(clients, steps, starts),
    )


def test_sweep_runs_equal_separate_simulators():
    # every run of the sweep is what its own simulator computes with the same seeds
    train = _digits_double()
    probs = torch.linspace(0.2, 0.9, 12)

    def aggregators():
        return [FedAU(12), FedAvg(12, "all", server_lr=2.0), MIFA(12, server_lr=0.5)]

    local = LocalTraining("sgd", lr=0.1, steps=3, batch_size=8)
    sweep = FederatedSweep(
        _tanh_mlp(), train, aggregators(), Bernoulli(probs, seed=1), local, seed=3
    )
    sweep.run(6)
    sweep.stop(2)  # a frozen run keeps its model
    frozen = sweep.xs[2].clone()
    sweep.run(12)
    assert torch.equal(sweep.xs[2], frozen)
    for r, aggregator in enumerate(aggregators()[:2]):
        alone = FederatedSimulator(
            _tanh_mlp(), train, aggregator, Bernoulli(probs, seed=1), local, seed=3
        )
        alone.run(12)
        torch.testing.assert_close(sweep.xs[r], alone.x, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(sweep.xs[0], sweep.xs[1])  # the runs do differ


def _result(accs: dict[str, float], seed: int = 0) -> dict:
    runs = [
        {
            "method": m,
            "server_lr": 1.0,
            "rounds": [10],
            "test_acc": [a],
            "train_objective": [(100 - a) / 100],
            "final_test_acc": a,
            "final_objective": (100 - a) / 100,  # better accuracy, lower objective
            "chosen": True,
        }
        for m, a in accs.items()
    ]
    setting = {
        "dataset": "digits",
        "pattern": "markov",
        "mean_participation": 0.1,
        "probs": [0.1, 0.5],
        "fedau_weights": [9.0, 2.0],
        "runs": runs,
    }
    return {"seed": seed, "rounds": 10, "n_clients": 2, "settings": [setting]}


def test_verdict_holds_when_fedau_beats_fedavg_and_is_close_to_the_references():
    accs = {
        "FedAU": 90.0,
        "FedAvg-participants": 85.0,
        "FedAvg-all": 84.0,
        "Known-p": 90.5,
        "MIFA": 89.0,
    }
    text = verdict([_result(accs)])
    assert "FedAU beats both FedAvg variants: HOLDS" in text
    assert "of Known-p and MIFA: HOLDS" in text
    assert "lower training objective than both FedAvg variants: HOLDS" in text
    assert "NOT" not in text
    assert len(summarize([_result(accs)])) == 2


def test_verdict_says_not_when_a_fedavg_variant_wins_or_fedau_is_far_behind():
    accs = {
        "FedAU": 85.0,
        "FedAvg-participants": 86.0,
        "FedAvg-all": 80.0,
        "Known-p": 90.0,
        "MIFA": 85.5,
    }
    text = verdict([_result(accs)])
    assert "FedAU beats both FedAvg variants: does NOT hold" in text
    assert "FedAvg-participants" in text.split("does NOT hold")[1]
    assert "of Known-p and MIFA: does NOT hold" in text


def test_registered():
    assert get("fedau").config_cls is FedAUConfig


def test_verdict_judges_each_fedau_variant_separately():
    accs = {
        "FedAU": 84.0,
        "FedAU-K50": 90.0,
        "FedAvg-participants": 85.0,
        "FedAvg-all": 84.5,
        "Known-p": 90.5,
        "MIFA": 89.0,
    }
    text = verdict([_result(accs)])
    assert "FedAU beats both FedAvg variants: does NOT hold" in text
    assert "FedAU-K50 beats both FedAvg variants: HOLDS" in text
