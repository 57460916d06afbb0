"""Experiment `fedau`: determinism; LinearSweep and RateGrid against separate library
simulators (the oracle); the closed-form objective gradient against autograd; the exact optima;
FedAU's weights against 1/p_n; the claims and the protocol table on hand-made results."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meanwise.data.federated_split import digits_federated
from meanwise.data.fedprox_synthetic import fedprox_synthetic
from meanwise.experiments import fedau as fe
from meanwise.experiments import get
from meanwise.experiments.claims import validate_claim
from meanwise.experiments.fedau import FedAUConfig, FedAUResult, run
from meanwise.experiments.fedau_report import claims, protocol, summarize
from meanwise.federated import (
    Bernoulli,
    FedAvg,
    FederatedSimulator,
    LocalTraining,
    Markov,
    heterogeneous_probabilities,
)
from meanwise.federated.simulator import FederatedSweep

TINY = FedAUConfig(
    seeds=1,
    datasets=("synthetic",),
    patterns=("markov",),
    n_clients=12,
    rounds=60,
    eval_every=20,
    final_window=1,
    server_lr_multipliers=(1.0, 2.0),
    optimum_iterations=150,
    optimum_seeds=1,
)


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = (dataclasses.asdict(r) for r in tiny_runs)
    assert a == b
    assert a["settings"][0]["runs"] != c["settings"][0]["runs"]
    runs = a["settings"][0]["runs"]
    assert [(r["method"], r["multiplier"]) for r in runs[:2]] == [("FedAU", 1.0), ("FedAU", 2.0)]
    assert sum(r["chosen"] for r in runs) == len(fe.METHODS)  # one chosen rate per method
    base = fe.base_server_lr("FedAvg-all", torch.tensor(a["settings"][0]["probs"]))
    fedavg_all = [r for r in runs if r["method"] == "FedAvg-all"]
    assert [r["server_lr"] for r in fedavg_all] == pytest.approx([base, 2 * base])
    assert a["optimum"] is not None and c["optimum"] is None  # optimum_seeds=1


def test_results_round_trip_through_the_typed_records(tiny_runs):
    """The report's typed records give back the JSON the runner caches, unchanged."""
    for result in tiny_runs:
        data = json.loads(json.dumps(dataclasses.asdict(result)))
        typed = FedAUResult.from_json(data)
        assert typed == result
        assert json.dumps(typed.to_json()) == json.dumps(data)
    assert tiny_runs[2].optimum is None and FedAUResult.from_json(data).optimum is None


def test_the_exact_optimum_of_the_true_objective_is_lower(tiny_runs):
    optimum = tiny_runs[0].optimum
    uniform, weighted = optimum.uniform, optimum.participation_weighted
    # the true objective is minimized by its own minimizer, not by the p-weighted one
    assert uniform.objective < weighted.objective
    assert uniform.gradient_norm < 0.02  # from about 1 at the zero start


def test_closed_form_objective_gradient_matches_autograd():
    torch.manual_seed(0)
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 10, (30,))
    scale = torch.rand(30, dtype=torch.float64)
    params = torch.randn(10 * 6, dtype=torch.float64, requires_grad=True)
    value, grad = fe._softmax_objective(x, y, scale, params.detach())
    w, b = params[:50].view(10, 5), params[50:]
    reference = (F.cross_entropy(x @ w.T + b, y, reduction="none") * scale).sum()
    (auto,) = torch.autograd.grad(reference, params)
    assert value == pytest.approx(float(reference.detach()), rel=1e-12)
    torch.testing.assert_close(grad, auto)


def _synthetic_double(n=8):
    train, _ = fedprox_synthetic(1.0, 1.0, n, seed=0)
    return dataclasses.replace(train, features=train.features.double())


def test_linear_sweep_equals_separate_simulators():
    # every (method, rate) of the sweep is what the library's simulator with the library's
    # aggregator computes from the same seeds, Markov participation with empty rounds
    train = _synthetic_double()
    probs = (heterogeneous_probabilities(train.label_histograms(10), seed=0) * 3).clamp(max=1)
    methods, multipliers = list(fe.METHODS), [1.0, 3.0]
    rates = torch.tensor(
        [[fe.base_server_lr(m, probs) * k for k in multipliers] for m in methods],
        dtype=torch.float64,
    )
    torch.manual_seed(0)
    linear = nn.Linear(60, 10).double()
    initial = torch.cat([linear.weight.detach().reshape(-1), linear.bias.detach()])
    local = LocalTraining("sgd", lr=0.01, steps=3, batch_size=8)
    sweep = fe.LinearSweep(
        train, methods, rates, probs, Markov(probs, seed=1), local, initial, cutoff=None, seed=3
    )
    sweep.run(25)
    config = FedAUConfig(n_clients=8)
    for i, method in enumerate(methods):
        for c in range(len(multipliers)):
            aggregator = fe._rule(method, probs, config)
            aggregator.server_lr = float(rates[i, c])
            torch.manual_seed(0)
            model = nn.Linear(60, 10).double()
            alone = FederatedSimulator(
                model, train, aggregator, Markov(probs, seed=1), local, seed=3
            )
            alone.run(25)
            torch.testing.assert_close(sweep.xs[i, c], alone.x, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(sweep.xs[0, 0], sweep.xs[2, 0])  # the methods do differ


def test_linear_sweep_freezes_a_diverged_rate_only():
    train = _synthetic_double(6)
    probs = torch.full((6,), 0.7, dtype=torch.float64)
    rates = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    local = LocalTraining("sgd", lr=0.01, steps=2, batch_size=8)
    sweep = fe.LinearSweep(
        train, ["MIFA"], rates, probs, Bernoulli(probs, seed=0), local,
        torch.zeros(610, dtype=torch.float64), cutoff=None, seed=0,
    )  # fmt: skip
    sweep.run(2)
    frozen = sweep.xs[0, 1].clone()
    train_copies = sweep._local_training

    def blow_up(clients):  # the second rate's update of one client is not finite
        deltas = train_copies(clients)
        deltas[0, 1, 3] = float("nan")
        return deltas

    sweep._local_training = blow_up
    sweep.run(3)
    sweep._local_training = train_copies
    before = sweep.xs[0, 0].clone()
    sweep.run(8)
    assert sweep.diverged.tolist() == [[False, True]]
    assert torch.equal(sweep.xs[0, 1], frozen)  # frozen where it was before the bad update
    assert bool(torch.isfinite(sweep.xs).all()) and not torch.equal(sweep.xs[0, 0], before)
    assert bool(torch.isfinite(sweep.memory).all())  # MIFA never stores the bad update


def _digits_double():
    train, _, _ = digits_federated(12, 0.5, seed=0)
    return dataclasses.replace(train, features=train.features.double())


def _tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()


def test_rate_grid_on_the_mlp_equals_separate_simulators():
    train = _digits_double()
    probs = torch.linspace(0.2, 0.9, 12)
    local = LocalTraining("sgd", lr=0.1, steps=3, batch_size=8)
    size = sum(p.numel() for p in _tanh_mlp().parameters())
    grids = [fe.RateGrid(FedAvg(12, "all"), [2.0], size), fe.RateGrid(fe.FedAU(12), [0.5], size)]
    sweep = FederatedSweep(_tanh_mlp(), train, grids, Bernoulli(probs, seed=1), local, seed=3)
    sweep.run(10)
    for r, aggregator in enumerate([FedAvg(12, "all", server_lr=2.0), fe.FedAU(12, server_lr=0.5)]):
        alone = FederatedSimulator(
            _tanh_mlp(), train, aggregator, Bernoulli(probs, seed=1), local, seed=3
        )
        alone.run(10)
        torch.testing.assert_close(sweep.xs[r], alone.x, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="server_lr 1"):
        fe.RateGrid(FedAvg(12, server_lr=2.0), [1.0], size)


def test_fedau_weights_approach_inverse_probabilities():
    # FedAvg over all clients weights client n by p_n in expectation (rare clients count
    # p_n times less); FedAU's interval means estimate 1/p_n, which undoes that.
    config = dataclasses.replace(TINY, n_clients=20, rounds=300, eval_every=300, optimum_seeds=0)
    config = dataclasses.replace(config, methods=("FedAU", "FedAvg-all"), patterns=("bernoulli",))
    setting = run(config, 0).settings[0]
    p = torch.tensor(setting.probs, dtype=torch.float64)
    w = torch.tensor(setting.fedau_weights, dtype=torch.float64)
    seen = w > 0
    assert int(seen.sum()) >= 15
    assert float((w[seen] * p[seen] - 1).abs().median()) < 0.35 < float((p - 1).abs().median())
    rare, frequent = int(p[seen].argmin()), int(p[seen].argmax())
    assert w[seen][rare] > 5 * w[seen][frequent]
    assert sum(setting.participations) > 0


def test_config_needs_the_fixed_rate_and_known_names():
    with pytest.raises(ValueError, match="must contain 1.0"):
        FedAUConfig(server_lr_multipliers=(2.0, 4.0))
    with pytest.raises(ValueError, match="methods"):
        FedAUConfig(methods=("FedProx",))
    quick = FedAUConfig.quick()
    assert quick.rounds >= 1000 and quick.n_clients == 100 and "FedAU-K50" in quick.methods


# --- claims on hand-made results ----------------------------------------------------------------

_GRID = (1.0, 2.0, 4.0)


def _result(accs: dict[str, float], seed: int, chosen: float = 2.0, dataset="synthetic") -> dict:
    runs = []
    for method, acc in accs.items():
        for m in _GRID:
            a = acc if m == chosen else acc - 3.0  # the fixed-rate run (×1) is 3 points lower
            runs.append(
                {
                    "method": method,
                    "server_lr": m,
                    "multiplier": m,
                    "rounds": [10],
                    "test_acc": [a],
                    "train_objective": [(100 - a) / 100],
                    "final_test_acc": a,
                    "final_objective": (100 - a) / 100,
                    "diverged": False,
                    "chosen": m == chosen,
                }
            )
    setting = {
        "dataset": dataset,
        "pattern": "markov",
        "mean_participation": 0.1,
        "probs": [0.1, 0.5],
        "frequencies": [0.1, 0.5],
        "fedau_weights": [9.0, 2.0],
        "participations": [10, 50],
        "runs": runs,
    }
    optimum = {
        "uniform": {"objective": 0.4, "test_acc": 83.0, "gradient_norm": 1e-4},
        "participation_weighted": {"objective": 0.45, "test_acc": 81.0, "gradient_norm": 0.07},
    }
    return {"seed": seed, "rounds": 10, "n_clients": 2, "settings": [setting], "optimum": optimum}


def _by_claim(results) -> dict[str, object]:
    out = {}
    for c in claims(results):
        validate_claim(c.to_json())
        out[c.claim.split(": ", 1)[1]] = c
    return out


def test_claims_supported_when_fedau_beats_fedavg_and_is_close_to_the_references():
    results = [
        _result(
            {
                "FedAU": 80.0 + 0.3 * s,
                "FedAU-K50": 79.5 + 0.2 * s,
                "FedAvg-participants": 75.0 - 0.1 * s,
                "FedAvg-all": 75.5 + 0.1 * s,
                "Known-p": 80.2 + 0.2 * s,
                "MIFA": 80.1 - 0.2 * s,
            },
            seed=s,
        )
        for s in range(5)
    ]
    by = _by_claim(results)
    assert len(by) == 7
    premise = by[
        "premise — the known-p oracle beats FedAvg over participants (the weights matter here)"
    ]
    assert premise.status == "supported" and premise.effect == pytest.approx(5.8)
    assert premise.n_seeds == 5 and premise.paper_effect is None
    beats = by["FedAU beats FedAvg-participants"]
    assert beats.status == "supported" and beats.ci95[0] > 0
    assert by["FedAU beats FedAvg-all"].status == "supported"
    close = by["FedAU comes close to Known-p (at most 1 point lower)"]
    assert close.status == "supported" and close.ci95[0] > -1.0
    fixed = [c for k, c in by.items() if k.startswith("at the paper's fixed")][0]
    assert fixed.status == "supported"  # every method 3 points lower at ×1: same gaps
    assert "Every chosen server rate is interior" in beats.detail
    assert "2.00 ± 0.00 points" in beats.detail  # the achievable effect from the exact optima
    assert len(summarize(results)) == 3  # methods, optima, weights


def test_claims_contradicted_unresolved_and_edge_flags():
    # FedAU clearly below FedAvg-participants; noisy and level with FedAvg-all; rates at the
    # grid's top end
    noise = [1.5, -2.0, 0.5, -1.0, 1.0]
    results = [
        _result(
            {
                "FedAU": 80.0 + noise[s],
                "FedAvg-participants": 85.0 + 0.1 * s,
                "FedAvg-all": 80.0 - noise[s] * 0.5,
                "Known-p": 84.0,
            },
            seed=s,
            chosen=4.0,
        )
        for s in range(5)
    ]
    by = _by_claim(results)
    assert by["FedAU beats FedAvg-participants"].status == "contradicted"
    level = by["FedAU beats FedAvg-all"]
    assert level.status == "unresolved" and "Minimum detectable effect" in level.detail
    assert by["FedAU comes close to Known-p (at most 1 point lower)"].status == "contradicted"
    assert "EDGE CHOICE" in level.detail and "high" in level.detail
    assert "MIFA" not in " ".join(by)  # a method that did not run makes no claim


def test_secondary_setting_gets_only_the_premise_and_fedau_vs_fedavg():
    accs = {"FedAU": 96.0, "FedAvg-participants": 96.9, "FedAvg-all": 96.5, "Known-p": 96.8}
    results = [
        _result(accs | {"FedAU": 96.0 + 0.1 * s}, seed=s, dataset="digits") for s in range(3)
    ]
    by = _by_claim(results)
    assert set(by) == {
        "premise — the known-p oracle beats FedAvg over participants (the weights matter here)",
        "FedAU beats both FedAvg variants (vs the better of the two per seed)",
    }
    assert all("secondary" in c.claim for c in claims(results))


def test_protocol_table_has_every_aspect():
    table = protocol(dataclasses.asdict(FedAUConfig.quick()))
    aspects = [row[0] for row in table.rows]
    for aspect in ("model", "data", "budget", "local training", "server rate", "seeds", "metric"):
        assert aspect in aspects
    assert len(table.columns) == 4
    seeds = table.rows[aspects.index("seeds")]
    assert "3 paired seeds" in seeds[2] and "full preset runs 5" in seeds[3]


def test_registered():
    experiment = get("fedau")
    assert experiment.config_cls is FedAUConfig
    assert "ICLR 2024" in experiment.paper
