"""Experiment `afa`: the batched simulation against FederatedSimulator, determinism, the L-BFGS
optimum against gradient descent, the predicted fixed points against their defining equation,
and the claims and protocol on real tiny results and on hand-made ones."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.engine.layout import ParameterLayout
from meanwise.experiments import get
from meanwise.experiments.afa import (
    AFAConfig,
    AFAResult,
    _aggregator,
    _simulate,
    _workers,
    base_server_lr,
    minimizer,
    objective,
    optimum,
    predicted_fixed_point,
    run,
    server_lr_at,
)
from meanwise.experiments.afa_report import claims, protocol, summarize
from meanwise.experiments.claims import validate_claim
from meanwise.federated import FederatedSimulator, LocalTraining

TINY = AFAConfig(
    seeds=2,
    n_workers=6,
    arrivals_per_round=2,
    max_local_steps=4,
    max_staleness=3,
    rounds=60,
    lr_halving=30,
    average_rounds=20,
    eval_every=20,
    final_window=1,
    speedup_arrivals=(1, 2, 4),
)


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = (dataclasses.asdict(r) for r in tiny_runs)
    assert a == b
    assert [r["excess"] for r in a["runs"]] != [r["excess"] for r in c["runs"]]
    assert [r["method"] for r in a["runs"]] == ["AFA-CD", "AFA-CS", "FedAvg"]
    assert [r["arrivals_per_round"] for r in a["speedup"]] == [1, 2, 4]
    # the speedup entry at the main m (2 here) is the main AFA-CD run itself
    main_cd = next(r for r in a["runs"] if r["method"] == "AFA-CD")
    assert a["speedup"][1]["excess"] == main_cd["excess"]
    assert all(1 <= k <= TINY.max_local_steps for k in a["local_steps"])
    # bounded delay by waiting: every worker arrived, nothing was discarded, and rounds that
    # waited hold more than m arrivals
    assert a["never_arrived"] == 0 and a["rejected_stale"] == 0
    assert sum(a["arrival_counts"]) >= TINY.rounds * TINY.arrivals_per_round


def test_training_reduces_the_excess_objective_and_it_stays_positive(tiny_runs):
    result = tiny_runs[0]
    for r in result.runs:
        assert 0 < r.excess[-1] < result.initial_excess
        assert 0 < r.tail_average_excess < result.initial_excess
    # every predicted bias is an excess objective at another point: non-negative. With every
    # worker live in the window, AFA-CS's fixed point is x* itself
    assert all(v >= -1e-9 for v in result.predicted_bias.values())
    assert result.predicted_bias["AFA-CS"] < 1e-7


def test_batched_simulation_equals_federated_simulator():
    # The oracle: the library's FederatedSimulator (autograd local training, the same
    # Anarchic arrivals and minibatch generator) for each rule, against the batched closed-form
    # engine that runs the three side by side. A constant server rate (no halving here).
    config = dataclasses.replace(TINY, rounds=12, lr_halving=100, average_rounds=4, eval_every=4)
    train, test = fedprox_synthetic(1.0, 1.0, config.n_workers, seed=3)
    torch.manual_seed(5)
    model = nn.Linear(60, 10)
    x0 = ParameterLayout.of(model).flatten({k: v.detach() for k, v in model.named_parameters()})
    specs = [(m, config.arrivals_per_round, base_server_lr(m, config)) for m in config.methods]
    runs, stats = _simulate(specs, train, test, x0, 0.0, 1.0, config, seed=3)
    for (method, m, lr), batched in zip(specs, runs, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FedAvg ignores step counts: that is its point
            sim = FederatedSimulator(
                model,
                train,
                _aggregator(method, lr, config, m),
                _workers(config, 3, m),
                LocalTraining(
                    "sgd",
                    lr=config.local_lr,
                    steps=1,
                    batch_size=config.batch_size,
                    options={"weight_decay": config.weight_decay},
                ),
                eval_every=config.rounds + 1,
                seed=3 + 2,
            )
        sim.run(config.rounds)
        assert torch.allclose(batched.x, sim.x, atol=2e-5, rtol=1e-4), method
    assert int(stats.counts.sum()) >= config.rounds * config.arrivals_per_round


def test_server_rate_schedule():
    config = dataclasses.replace(TINY, lr_halving=30)
    assert [server_lr_at(4.0, r, config) for r in (0, 29, 30, 59, 60)] == [4, 4, 2, 2, 1]


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


def _weighted_gradient(train, wd, weights, flat):
    """Σ_i w_i ∇f_i at flat, by autograd (independent of afa's closures)."""
    p = flat.clone().requires_grad_(True)
    weight, bias = p[:600].reshape(10, 60), p[600:]
    x, y = train.features.double(), train.labels
    owners = torch.repeat_interleave(torch.arange(train.n_clients), train.sizes)
    ce = F.cross_entropy(x @ weight.T + bias, y, reduction="none")
    total = (ce * weights[owners] / train.sizes.double()[owners]).sum()
    total = total + weights.sum() * 0.5 * wd * p.square().sum()
    (grad,) = torch.autograd.grad(total, p)
    return grad


def test_predicted_fixed_point_solves_its_equation():
    # the rule's expected direction Σ w_i ∇f_i(x) + frozen vanishes at the predicted point;
    # a starved worker (weight 0) and a frozen memory entry move it away from x*
    train, _ = fedprox_synthetic(1.0, 1.0, 4, seed=1)
    wd = 1e-2
    x_star = minimizer(train, wd)
    f_star = objective(train, wd, x_star)
    w = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    frozen = 0.05 * torch.randn(
        610, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    for weights, c in ((w, None), (w, frozen), (torch.ones(4, dtype=torch.float64), None)):
        x = predicted_fixed_point(train, wd, weights, c, start=x_star)
        residual = _weighted_gradient(train, wd, weights, x) + (0 if c is None else c)
        assert float(residual.norm()) < 1e-4  # L-BFGS tolerance (the gradient at x* is ~1e-1)
    uniform = predicted_fixed_point(train, wd, torch.ones(4, dtype=torch.float64))
    assert objective(train, wd, uniform) - f_star < 1e-9
    starved = predicted_fixed_point(train, wd, w, None, start=x_star)
    assert objective(train, wd, starved) - f_star > 1e-4


def test_results_round_trip_through_the_typed_records(tiny_runs):
    """The report's typed records give back the JSON the runner caches, unchanged."""
    for result in tiny_runs:
        data = json.loads(json.dumps(dataclasses.asdict(result)))
        typed = AFAResult.from_json(data)
        assert typed == result and typed.speedup and typed.speedup[0].arrivals_per_round == 1
        assert json.dumps(typed.to_json()) == json.dumps(data)


def test_claims_and_protocol_on_tiny_results(tiny_runs):
    results = [dataclasses.asdict(tiny_runs[0]), dataclasses.asdict(tiny_runs[2])]
    out = claims(results)
    names = [c.claim for c in out]
    assert len(out) == 5 and any("AFA-CS removes" in n for n in names)
    for c in out:
        validate_claim(c.to_json())
        assert c.n_seeds == 2
        lo, hi = c.ci95
        assert lo <= c.effect <= hi
        # status follows from the interval and the threshold (0.1 for convergence, else 0)
        threshold = 0.1 if "converges" in c.claim else 0.0
        expected = "supported" if hi < threshold else "contradicted" if lo > threshold else None
        assert c.status == (expected or "unresolved")
    # the CS-vs-CD effect is the paired mean log ratio of the iterate averages' excess
    cs_cd = next(c for c in out if "AFA-CS removes" in c.claim)
    pairs = [
        {r["method"]: r["tail_average_excess"] for r in res["runs"] if r["chosen"]}
        for res in results
    ]
    expected = sum(math.log(p["AFA-CS"] / p["AFA-CD"]) for p in pairs) / 2
    assert math.isclose(cs_cd.effect, expected, rel_tol=1e-9)
    table = protocol(dataclasses.asdict(TINY))
    aspects = [row[0] for row in table.rows]
    for aspect in ("model", "data", "budget", "optimizer and schedule", "seeds", "metric"):
        assert aspect in aspects
    assert any("waits" in row[2] for row in table.rows)  # the delay bound that ran
    assert len(summarize(results)) == 4


def _run(method, tail, m=4, rounds_to_target=None):
    return {
        "method": method,
        "arrivals_per_round": m,
        "server_lr": 1.0,
        "rounds": [10, 20],
        "excess": [1.0, tail],
        "test_acc": [50.0, 80.0],
        "final_excess": tail,
        "final_test_acc": 80.0,
        "tail_average_excess": tail,
        "rounds_to_target": rounds_to_target,
        "chosen": True,
    }


def _result(seed, cd, cs, fedavg, speedup_rounds):
    return {
        "seed": seed,
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


def test_claims_supported_on_hand_made_results():
    results = [
        _result(0, 0.05, 0.02, 0.08, (200, 100, 50)),
        _result(1, 0.06, 0.02, 0.09, (210, 100, 52)),
        _result(2, 0.05, 0.03, 0.07, (190, 98, 49)),
    ]
    out = {c.claim: c for c in claims(results)}
    assert all(c.status == "supported" for c in out.values()), {
        k: (c.status, c.ci95) for k, c in out.items()
    }
    speed = next(c for c in out.values() if "Speedup" in c.claim)
    assert speed.paper_effect == -1.0 and -1.1 < speed.effect < -0.9  # halving rounds per 2x m


def test_claims_contradicted_and_unresolved_on_hand_made_results():
    results = [
        _result(0, 0.5, 0.6, 0.08, (100, 100, 100)),
        _result(1, 0.5, 0.61, 0.08, (100, 100, 101)),
        _result(2, 0.52, 0.62, 0.09, (101, 100, 100)),
    ]
    out = {c.claim: c for c in claims(results)}
    cs = next(c for c in out.values() if "AFA-CS removes" in c.claim)
    assert cs.status == "contradicted"  # AFA-CS clearly above AFA-CD on every seed
    converge = [c for c in out.values() if "converges" in c.claim]
    assert all(c.status == "contradicted" for c in converge)  # 0.25-0.3 of the start
    speed = next(c for c in out.values() if "Speedup" in c.claim)
    assert speed.status == "unresolved" and "seeds would resolve" in speed.detail


def test_registered():
    experiment = get("afa")
    assert experiment.config_cls is AFAConfig
    assert experiment.claims is claims and experiment.protocol is protocol
