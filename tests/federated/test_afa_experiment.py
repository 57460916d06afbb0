"""Experiment `afa`: determinism, the L-BFGS optimum against gradient descent, the arrival
statistics, and the verdict logic on hand-made results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.experiments import get
from meanwise.experiments.afa import AFAConfig, optimum, run
from meanwise.experiments.afa_report import summarize, verdict

TINY = AFAConfig(
    seeds=1,
    methods=("AFA-CD", "AFA-CS"),
    n_workers=6,
    arrivals_per_round=2,
    max_local_steps=4,
    rounds=40,
    eval_every=20,
    final_window=1,
    server_lr_multipliers=(1.0,),
    speedup_arrivals=(1, 2),
)


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = (dataclasses.asdict(r) for r in tiny_runs)
    assert a == b
    assert [r["excess"] for r in a["runs"]] != [r["excess"] for r in c["runs"]]
    assert [r["method"] for r in a["runs"]] == ["AFA-CD", "AFA-CS"]
    assert [r["arrivals_per_round"] for r in a["speedup"]] == [1, 2]
    # every worker ran its own fixed step count in [1, K_max]
    assert all(1 <= k <= TINY.max_local_steps for k in a["local_steps"])
    assert sum(a["arrival_counts"]) == TINY.rounds * TINY.arrivals_per_round


def test_training_reduces_the_excess_objective_and_it_stays_positive(tiny_runs):
    result = tiny_runs[0]
    for r in result.runs:
        assert 0 < r.excess[-1] < result.initial_excess
        assert 0 < r.tail_average_excess < result.initial_excess
    # the bias floors are excess objectives at other minimizers: non-negative, AFA-CS's zero
    assert result.predicted_bias["AFA-CS"] == 0.0
    assert result.predicted_bias["AFA-CD"] >= -1e-9 and result.predicted_bias["FedAvg"] >= -1e-9


def test_optimum_is_below_what_gradient_descent_reaches():
    # an independent check of the L-BFGS minimum: plain full-batch gradient descent on the same
    # strongly convex objective approaches it from above and never goes below
    train, _ = fedprox_synthetic(1.0, 1.0, 4, seed=0)
    wd = 1e-2
    f_star = optimum(train, wd)
    x, y = train.features.double(), train.labels
    owners = torch.repeat_interleave(torch.arange(4), train.sizes)
    scale = 1.0 / (train.sizes.double()[owners] * 4)
    weight = torch.zeros(10, 60, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([weight, bias], lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        loss = (F.cross_entropy(x @ weight.T + bias, y, reduction="none") * scale).sum()
        loss = loss + 0.5 * wd * (weight.square().sum() + bias.square().sum())
        loss.backward()
        opt.step()
    reached = float(loss.detach())
    assert f_star <= reached + 1e-9
    assert reached - f_star < 0.05


def _run(method, final, initial_ratio=0.01, m=4, rounds_to_target=None):
    return {
        "method": method,
        "arrivals_per_round": m,
        "server_lr": 1.0,
        "rounds": [10, 20],
        "excess": [1.0, final],
        "test_acc": [50.0, 80.0],
        "final_excess": final,
        "final_test_acc": 80.0,
        "tail_average_excess": final,
        "rounds_to_target": rounds_to_target,
        "chosen": True,
    }


def _result(cd, cs, fedavg, speedup_rounds):
    return {
        "seed": 0,
        "n_workers": 4,
        "optimum": 0.1,
        "initial_excess": 2.0,
        "arrival_counts": [5, 10, 20, 5],
        "local_steps": [1, 2, 3, 4],
        "mean_staleness": 1.5,
        "predicted_bias": {"AFA-CD": 0.03, "AFA-CS": 0.0, "FedAvg": 0.05},
        "runs": [_run("AFA-CD", cd), _run("AFA-CS", cs), _run("FedAvg", fedavg)],
        "speedup": [
            _run("AFA-CD", 0.1, m=m, rounds_to_target=r)
            for m, r in zip((1, 2, 4), speedup_rounds, strict=True)
        ],
    }


def test_verdict_holds():
    text = verdict([_result(0.05, 0.02, 0.08, (200, 120, 60))])
    lines = text.splitlines()
    assert "converges" in lines[0] and "HOLDS" in lines[0]
    assert "AFA-CS removes" in lines[1] and "HOLDS" in lines[1]
    assert "Speedup" in lines[2] and "HOLDS" in lines[2]
    assert len(summarize([_result(0.05, 0.02, 0.08, (200, 120, 60))])) == 3


def test_verdict_does_not_hold():
    text = verdict([_result(0.5, 0.6, 0.08, (100, None, 60))])
    lines = text.splitlines()
    assert "does NOT hold" in lines[0]  # 0.6 / 2.0 = 0.3 of the initial excess: not converged
    assert "does NOT hold" in lines[1] and "below AFA-CD" in lines[1]
    assert "does NOT hold" in lines[2] and "not reached" in lines[2]


def test_speedup_counts_not_reached_as_infinitely_slow():
    text = verdict([_result(0.05, 0.02, 0.08, (None, None, 60))])
    assert "Speedup" in text.splitlines()[2] and "HOLDS" in text.splitlines()[2]


def test_registered():
    assert get("afa").config_cls is AFAConfig
