"""Experiment `optimizers`: determinism, the synthetic runs against hand-written recursions,
and the verdict logic on made-up results."""

import dataclasses
import math

import pytest
import torch

from meanwise.data import F1
from meanwise.experiments import get
from meanwise.experiments.optimizers import (
    OptimizersConfig,
    SmallResNet,
    _lr_factor,
    run,
    run_synthetic,
)
from meanwise.experiments.optimizers_report import summarize, verdict

TINY = OptimizersConfig(
    seeds=1,
    functions=("F1",),
    synthetic_steps=30,
    epochs=1,
    max_batches_per_epoch=2,
    batch_size=32,
    width=4,
)


def _without_timing(result) -> dict:
    data = dataclasses.asdict(result)
    for run_ in data["digits"]:
        run_.pop("seconds")
    return data


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = tiny_runs
    assert _without_timing(a) == _without_timing(b)
    a_digits = {r["method"]: r for r in _without_timing(a)["digits"]}
    c_digits = {r["method"]: r for r in _without_timing(c)["digits"]}
    assert all(a_digits[m]["train_loss"] != c_digits[m]["train_loss"] for m in a_digits)
    assert [r.method for r in a.digits] == list(TINY.methods)


def test_results_are_well_formed(tiny_runs):
    a, _, _ = tiny_runs
    for r in a.digits:
        assert len(r.test_acc) == len(r.train_loss) == len(r.test_loss) == TINY.epochs
        assert 0.0 <= r.final_test_acc <= 100.0 and r.best_test_acc >= r.final_test_acc
        assert all(math.isfinite(v) for v in r.train_loss + r.test_loss)
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


def test_small_resnet_size_and_schedule():
    with torch.random.fork_rng(devices=[]):
        n = sum(p.numel() for p in SmallResNet(16).parameters())
    assert 20_000 <= n <= 80_000
    assert _lr_factor("cosine", 0, 100) == 1.0
    assert _lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert _lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert _lr_factor("step", 49, 100) == 1.0
    assert _lr_factor("step", 50, 100) == pytest.approx(0.1)
    assert _lr_factor("step", 75, 100) == pytest.approx(0.01)


def _digits(method, accs):
    return {"method": method, "final_test_acc": accs, "best_test_acc": accs, "seconds": 1.0}


def _fake_results(accs_per_method):
    seeds = len(next(iter(accs_per_method.values())))
    return [
        {
            "seed": s,
            "num_parameters": 1,
            "epochs": 1,
            "weight_decay": 5e-4,
            "synthetic": [],
            "digits": [_digits(m, accs[s]) for m, accs in accs_per_method.items()],
        }
        for s in range(seeds)
    ]


def test_verdict_says_when_the_ordering_holds_and_when_not():
    holds = _fake_results(
        {
            "AdaBelief": [99, 99],
            "SGD": [98, 98],
            "AdamW": [97, 97],
            "Adam": [96, 96],
            "AdaHessian": [95, 95],
        }  # fmt: skip
    )
    text = verdict(holds)
    assert "AdaBelief above SGD/AdamW/Adam: HOLDS here" in text
    assert "ranks 1 of 5" in text
    assert "AdaHessian beats Adam: does NOT hold here" in text
    fails = _fake_results({"AdaBelief": [90, 92], "SGD": [95, 95], "Adam": [80, 80]})
    text = verdict(fails)
    assert "does NOT hold here" in text and "not above SGD" in text
    table = summarize(fails)[0]
    row = {r[0]: r for r in table.rows}
    assert row["AdaBelief"][1] == "91.00 ± 1.41"
    assert row["SGD"][4] == "1" and row["AdaBelief"][3] == "+11.00"


def test_verdict_on_real_synthetic_runs():
    config = OptimizersConfig(synthetic_methods=("Adam", "diffGrad"))
    runs = [
        dataclasses.asdict(run_synthetic(f, m, config))
        for f in config.functions
        for m in config.synthetic_methods
    ]
    text = verdict([{"synthetic": runs, "digits": []}])
    lines = text.splitlines()
    assert len(lines) == 3
    # F1: Adam ends in the local minimum 0.2, diffGrad in the global one
    assert lines[0].startswith("diffGrad on F1: HOLDS here")
    assert all(("HOLDS" in line) or ("NOT" in line) or ("no difference" in line) for line in lines)


def test_registered_experiment_produces_report_parts(tiny_runs):
    experiment = get("optimizers")
    results = [dataclasses.asdict(r) for r in tiny_runs[:1]]
    tables = experiment.summarize(results)
    assert [len(t.rows) for t in tables] == [len(TINY.methods), len(TINY.synthetic_methods)]
    assert {f.stem for f in experiment.figures({}, results)} == {
        "synthetic-landscape",
        "synthetic-iterates",
        "digits-curves",
    }
    assert experiment.metrics(results)["digits.SGD.final_test_acc.std"] == 0.0


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
