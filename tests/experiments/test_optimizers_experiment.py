"""Experiment `optimizers`: determinism, the synthetic runs against hand-written recursions,
the stacked replicates against separate networks, and the claims on made-up and tiny results."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from meanwise.data import F1
from meanwise.experiments import get
from meanwise.experiments.claims import validate_claim
from meanwise.experiments.optimizers import (
    OptimizersConfig,
    OptimizersResult,
    StackedResNet,
    TrainingResult,
    _lr_factor,
    build_model,
    replicate_seeds,
    run,
    run_synthetic,
)
from meanwise.experiments.optimizers_report import claims, protocol, summarize
from meanwise.experiments.runner import config_to_dict

TINY = OptimizersConfig(
    seeds=1,
    replicates=2,
    functions=("F1",),
    synthetic_steps=30,
    epochs=2,
    eval_every=1,
    max_batches_per_epoch=2,
    batch_size=16,
    width=4,
)


def _without_timing(result) -> dict:
    data = dataclasses.asdict(result)
    for run_ in data["digits"]:
        run_.pop("seconds")
        run_.pop("cpu_seconds")
    return data


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = tiny_runs
    assert _without_timing(a) == _without_timing(b)
    a_digits = {r["method"]: r for r in _without_timing(a)["digits"]}
    c_digits = {r["method"]: r for r in _without_timing(c)["digits"]}
    assert all(a_digits[m]["train_loss_curve"] != c_digits[m]["train_loss_curve"] for m in a_digits)
    assert [r.method for r in a.digits] == list(TINY.methods)
    # runner seeds own disjoint run seeds, and every method of a seed shares them (pairing)
    assert a.run_seeds == [0, 1] and c.run_seeds == [2, 3]
    assert all(r.run_seeds == a.run_seeds for r in a.digits)


def test_results_are_well_formed(tiny_runs):
    a, _, _ = tiny_runs
    for r in a.digits:
        assert len(r.final_test_acc) == len(r.final_train_acc) == TINY.replicates
        assert len(r.train_loss_curve) == TINY.epochs
        assert r.curve_epochs == [1, 2] and len(r.test_acc_curve) == 2
        # the curve's last point is the mean of the replicates' final accuracies
        assert r.test_acc_curve[-1] == pytest.approx(sum(r.final_test_acc) / TINY.replicates)
        assert all(0.0 <= v <= 100.0 for v in r.final_test_acc + r.final_train_acc)
        assert all(math.isfinite(v) for v in r.train_loss_curve + r.final_test_loss)
    assert {(r.function, r.method) for r in a.synthetic} == {
        ("F1", m) for m in TINY.synthetic_methods
    }


def test_run_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    run(dataclasses.replace(TINY, methods=("SGD",), synthetic_methods=("Adam",)), 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_plain_gradient_descent_on_f1_follows_the_closed_form():
    # x_{t+1} = x_t - 0.1 (2 x_t + 0.6) = 0.8 x_t - 0.06 while x <= 0, so
    # x_t = -0.3 - 0.7 * 0.8^t: geometric convergence to the global minimum from -1.0
    gd = dataclasses.replace(OptimizersConfig(), sgdm_momentum=0.0)
    r = run_synthetic("F1", "SGDM", gd)
    expected = [-0.3 - 0.7 * 0.8**t for t in range(301)]
    assert r.x == pytest.approx(expected, abs=1e-12)
    assert r.final_x == pytest.approx(-0.3, abs=1e-12) and r.final_f == pytest.approx(0.0)


def _adam_by_hand(grad, x0, steps, lr, beta1, beta2, eps, amsgrad=False):
    """Adam (Kingma & Ba, Algorithm 1; AMSGrad keeps max v), in Python floats."""
    x, m, v, v_max, xs = x0, 0.0, 0.0, 0.0, [x0]
    for t in range(1, steps + 1):
        g = grad(x)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = max(v_max, v) if amsgrad else v
        x -= lr * (m / (1 - beta1**t)) / (math.sqrt(v_max / (1 - beta2**t)) + eps)
        xs.append(x)
    return xs


def _f1_grad(x):
    return 2 * x + 0.6 if x <= 0 else 2 * x - 0.4


@pytest.mark.parametrize("method", ["Adam", "AMSGrad"])
def test_adam_on_f1_matches_the_hand_written_recursion(method):
    config = OptimizersConfig()
    r = run_synthetic("F1", method, config)
    expected = _adam_by_hand(
        _f1_grad, -1.0, 300, 0.1, 0.95, 0.999, 1e-8, amsgrad=method == "AMSGrad"
    )
    assert r.x == pytest.approx(expected, abs=1e-9)
    # the first bias-corrected step is lr * sign(g): from -1.0 to -0.9
    assert r.x[1] == pytest.approx(-0.9, abs=1e-7)
    # with beta1 = 0.95 Adam's momentum carries it over the kink at 0 into the local basin
    assert r.final_x == pytest.approx(0.2, abs=0.01)
    assert r.final_f == pytest.approx(0.05, abs=1e-4)
    assert r.final_f == pytest.approx(
        float(F1.value(torch.tensor(r.final_x, dtype=torch.float64))), abs=1e-12
    )


def test_diffgrad_on_f1_reaches_the_global_minimum():
    r = run_synthetic("F1", "diffGrad", OptimizersConfig())
    assert r.final_x == pytest.approx(-0.3, abs=0.01)
    assert math.isfinite(r.final_f) and r.final_f < 1e-3


def test_stacked_replicates_are_independent_networks():
    """Oracle: each replicate of the grouped network computes exactly what a network of its
    own computes, forward (train-mode BatchNorm) and backward (its own loss's gradient)."""
    config = OptimizersConfig(width=4, blocks=(1, 2))
    seeds = [5, 6, 7]
    model = build_model(config, seeds)
    singles = []
    for s in seeds:  # replicate r is initialised from its run seed alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            singles.append(StackedResNet(1, 4, (1, 2)))
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (6, 3), generator=torch.Generator().manual_seed(1))
    out = model(x)
    F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(0).sum().backward()
    for r, single in enumerate(singles):
        mine = model.replicate(r)
        assert all(
            torch.equal(p, q) for p, q in zip(mine.parameters(), single.parameters(), strict=True)
        )
        ref = single(x[:, r : r + 1])[:, 0]
        torch.testing.assert_close(out[:, r], ref, rtol=1e-5, atol=1e-5)
        F.cross_entropy(ref, y[:, r]).backward()
        for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
            grad = p.grad.view(3, *q.shape)[r]
            torch.testing.assert_close(grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_stacked_network_refuses_a_wrong_input():
    with pytest.raises(ValueError, match="input must be"):
        StackedResNet(2, 4)(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="replicates"):
        OptimizersConfig(replicates=0)
    assert replicate_seeds(OptimizersConfig(replicates=4), 2) == [8, 9, 10, 11]


def test_size_and_schedule():
    with torch.random.fork_rng(devices=[]):
        n = sum(p.numel() for p in StackedResNet(1, 16).parameters())
    assert 15_000 <= n <= 25_000
    assert _lr_factor("cosine", 0, 100) == 1.0
    assert _lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert _lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert _lr_factor("step", 49, 100) == 1.0
    assert _lr_factor("step", 50, 100) == pytest.approx(0.1)
    assert _lr_factor("step", 75, 100) == pytest.approx(0.01)


# --- claims on made-up results --------------------------------------------------------------


def _fake_results(accs_per_method: dict[str, list[float]], per_seed: int = 2) -> list[dict]:
    """Runner seeds of `per_seed` replicates each, holding the given per-run accuracies."""
    n = len(next(iter(accs_per_method.values())))
    results = []
    for seed in range(n // per_seed):
        run_seeds = list(range(seed * per_seed, (seed + 1) * per_seed))
        digits = [
            {
                "method": m,
                "run_seeds": run_seeds,
                "final_test_acc": [accs[i] for i in run_seeds],
                "final_train_acc": [100.0] * per_seed,
                "final_test_loss": [0.1] * per_seed,
                "curve_epochs": [1],
                "test_acc_curve": [sum(accs[i] for i in run_seeds) / per_seed],
                "train_loss_curve": [0.1],
                "seconds": 1.0,
                "cpu_seconds": 1.0,
            }
            for m, accs in accs_per_method.items()
        ]
        results.append(
            {
                "seed": seed,
                "run_seeds": run_seeds,
                "num_parameters": 1,
                "epochs": 1,
                "weight_decay": 5e-4,
                "per_class": 20,
                "label_noise": 0.0,
                "max_shift": 1,
                "synthetic": [],
                "digits": digits,
            }
        )
    return results


def test_claims_follow_the_paired_interval():
    noise = [0.3, -0.2, 0.1, -0.4, 0.2, 0.0]
    adam = [90.0 + e for e in [0.5, -0.5, 1.0, -1.0, 0.2, -0.2]]
    sgd = [a + 2.0 + e for a, e in zip(adam, noise, strict=True)]  # clearly above Adam
    belief = [s - 3.0 + e for s, e in zip(sgd, noise[::-1], strict=True)]  # clearly below SGD
    adamw = [b + e for b, e in zip(belief, [1.0, -1.0, 0.5, -0.5, 0.8, -0.7], strict=True)]
    results = _fake_results(
        {"SGD": sgd, "Adam": adam, "AdamW": adamw, "AdaBelief": belief, "AdaHessian": adam}
    )
    found = {c.claim: c for c in claims(results)}
    assert len(found) == 5
    for c in found.values():
        validate_claim(c.to_json())
        assert c.n_seeds == 6
    premise = next(c for c in found.values() if c.claim.startswith("Premise"))
    diffs = [s - a for s, a in zip(sgd, adam, strict=True)]
    mean = sum(diffs) / 6
    sd = (sum((d - mean) ** 2 for d in diffs) / 5) ** 0.5
    half = stats.t.ppf(0.975, 5) * sd / 6**0.5  # scipy as the independent oracle
    assert premise.effect == pytest.approx(mean)
    assert premise.ci95 == pytest.approx((mean - half, mean + half), rel=1e-6)
    assert premise.status == "supported" and premise.paper_effect == pytest.approx(1.62)
    vs_sgd = next(c for c in found.values() if c.claim.endswith("than SGD-momentum"))
    assert vs_sgd.status == "contradicted" and vs_sgd.ci95[1] < 0
    vs_adamw = next(c for c in found.values() if c.claim.endswith("than AdamW"))
    assert vs_adamw.status == "unresolved" and vs_adamw.ci95[0] < 0 < vs_adamw.ci95[1]
    assert "Minimum detectable effect" in vs_adamw.detail
    hessian = next(c for c in found.values() if c.claim.startswith("AdaHessian"))
    assert hessian.effect == 0.0 and hessian.status == "unresolved"  # identical arms
    table = summarize(results)[1]
    row = {r[0]: r for r in table.rows}
    assert row["SGD"][5] == "1" and row["Adam"][4] == "" and row["SGD"][3] == "0.100"


def test_claims_need_both_arms():
    results = _fake_results({"SGD": [90.0, 91.0], "AdaBelief": [92.0, 92.5]})
    texts = [c.claim for c in claims(results)]
    assert texts == ["AdaBelief reaches a higher test accuracy than SGD-momentum"]


def test_diffgrad_claims_on_the_real_synthetic_runs():
    config = OptimizersConfig(synthetic_methods=("Adam", "diffGrad"))
    runs = [
        dataclasses.asdict(run_synthetic(f, m, config))
        for f in config.functions
        for m in config.synthetic_methods
    ]
    found = claims([{"seed": 0, "synthetic": runs, "digits": []}])
    assert [c.test for c in found] == ["deterministic (no seed noise)"] * 3
    f1, f2, f3 = found
    # F1: Adam's momentum carries it over the kink into the local basin (f = 0.05) while
    # diffGrad stops at the global minimum (f = 0): the effect is the 0.05 gap in f
    assert f1.status == "supported" and f1.effect == pytest.approx(0.05, abs=1e-3)
    assert f2.status == "supported"
    # F3: Adam reaches the global minimum too, so "Adam gets stuck" does not happen
    assert f3.status == "contradicted" and abs(f3.effect) < 0.01
    for c in found:
        validate_claim(c.to_json())
        assert c.ci95 == (c.effect, c.effect)


def test_tiny_run_claims_and_protocol(tiny_runs):
    results = [dataclasses.asdict(r) for r in tiny_runs[:3:2]]  # runner seeds 0 and 1
    found = claims(results)
    assert len(found) == 6  # 5 paired digits claims + diffGrad on F1
    for c in found:
        validate_claim(c.to_json())
        lo, hi = c.ci95
        expected = "supported" if lo > 0 else "contradicted" if hi < 0 else "unresolved"
        assert c.status == expected and lo <= c.effect <= hi
    assert {c.n_seeds for c in found[:5]} == {4}
    table = protocol(config_to_dict(TINY))
    aspects = [row[0] for row in table.rows]
    for needed in ("data", "model", "budget", "schedule", "optimizers", "runs and statistics"):
        assert needed in aspects
    assert all(len(row) == 4 and all(cell for cell in row) for row in table.rows)
    budget = table.rows[aspects.index("budget")]
    assert "2 epochs, batch 16" in budget[2]


def test_results_round_trip_through_the_typed_records(tiny_runs):
    """The report's typed records give back the JSON the runner caches, unchanged."""
    for result in tiny_runs:
        data = json.loads(json.dumps(dataclasses.asdict(result)))
        typed = OptimizersResult.from_json(data)
        assert typed == result and isinstance(typed.digits[0], TrainingResult)
        assert json.dumps(typed.to_json()) == json.dumps(data)


def test_registered_experiment_produces_report_parts(tiny_runs):
    experiment = get("optimizers")
    results = [dataclasses.asdict(r) for r in tiny_runs[:1]]
    tables = experiment.summarize(results)
    assert [len(t.rows) for t in tables[1:]] == [len(TINY.methods), len(TINY.synthetic_methods)]
    assert "why this task" in tables[0].caption.lower()
    assert {f.stem for f in experiment.figures({}, results)} == {
        "synthetic-landscape",
        "synthetic-iterates",
        "digits-curves",
    }
    assert experiment.metrics(results)["digits.SGD.final_test_acc.std"] >= 0.0


def test_resume_from_stages_gives_the_uninterrupted_result(tmp_path, tiny_runs):
    from meanwise.experiments.base import runner_context

    config = dataclasses.replace(TINY, methods=("SGD", "AdaHessian", "AdaBelief"))
    with runner_context(show_progress=False, stage_dir=tmp_path):
        whole = run(config, 0)
    # an interrupted run: the last two stages never finished
    (tmp_path / "digits-AdaHessian.json").unlink()
    (tmp_path / "digits-AdaBelief.json").unlink()
    with runner_context(show_progress=False, stage_dir=tmp_path):
        resumed = run(config, 0)
    assert _without_timing(resumed) == _without_timing(whole)
    assert resumed.digits[0].seconds == whole.digits[0].seconds  # SGD came from its stage
    # and each method is independent of which others ran: same as in the full tiny run
    full = {r["method"]: r for r in _without_timing(tiny_runs[0])["digits"]}
    assert _without_timing(resumed)["digits"][2] == full["AdaBelief"]
