"""Experiment `fisher-merging`: determinism, invariants of its numbers (λ = 0 and 1 are the two
endpoint models; the plain merge equals the hand-averaged weights), and the verdict logic."""

import dataclasses

import pytest
import torch

from meanwise.experiments import get
from meanwise.experiments.fisher_merging import FisherMergingConfig, run
from meanwise.experiments.fisher_merging_report import summarize, verdict

TINY = FisherMergingConfig(
    seeds=1, tasks=((0, 1, 2), (3, 4)), hidden=8, pretrain_epochs=1, finetune_epochs=1,
    fisher_examples=64, lambdas=3,
)  # fmt: skip


def _without_timing(result) -> dict:
    data = dataclasses.asdict(result)
    data.pop("seconds")
    return data


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = tiny_runs
    assert _without_timing(a) == _without_timing(b)
    assert _without_timing(a) != _without_timing(c)


def test_curve_endpoints_are_the_two_models(tiny_runs):
    """At λ = 0 every merge is the pre-trained model, at λ = 1 the fine-tuned one (the Fisher
    rule with coefficients (1, 0) or (0, 1) must reduce to that model exactly)."""
    a, _, _ = tiny_runs
    rows = {r.name: r for r in a.robust}
    pre, fine = rows["pre-trained (λ=0)"], rows["fine-tuned (λ=1)"]
    for method in ("plain", "Fisher"):
        curve = a.curves[method]
        assert curve["union"][0] == pytest.approx(pre.union_acc)
        assert curve["union"][-1] == pytest.approx(fine.union_acc)
        assert curve["target"][0] == pytest.approx(pre.task_acc[0])
        assert curve["target"][-1] == pytest.approx(fine.task_acc[0])
    assert a.lambdas == [0.0, 0.5, 1.0]
    assert set(a.chosen_lambda) == {"plain", "Fisher"}


def test_results_are_well_formed(tiny_runs):
    a, _, _ = tiny_runs
    names = [r.name for r in a.ensembling]
    assert names[0] == "pre-trained" and "plain average" in names
    assert "Fisher merge (exact)" in names and "Fisher merge (sampled)" in names
    for row in a.ensembling + a.robust:
        assert len(row.task_acc) == 2
        assert all(0 <= v <= 100 for v in row.task_acc + [row.union_acc])
    assert a.sampled_vs_exact_error > 0


def test_registered_with_quick_and_full_presets():
    experiment = get("fisher-merging")
    assert experiment.config(quick=True) == FisherMergingConfig.quick()
    assert experiment.config(quick=False).seeds >= 3
    with pytest.raises(ValueError, match="disjoint"):
        FisherMergingConfig(tasks=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="pretrain_fraction"):
        FisherMergingConfig(pretrain_fraction=0.9)


def _fake(union_fisher, union_plain, robust_fisher, robust_plain):
    results = []
    for seed, (uf, up, rf, rp) in enumerate(
        zip(union_fisher, union_plain, robust_fisher, robust_plain, strict=True)
    ):

        def row(name, union):
            return {"name": name, "task_acc": [union, union], "union_acc": union}

        results.append({
            "seed": seed, "num_parameters": 10, "tasks": [[0], [1]],
            "ensembling": [row("plain average", up), row("Fisher merge (exact)", uf),
                           row("Fisher merge (sampled)", uf - 1)],
            "robust": [row("plain at λ=0.50", rp), row("Fisher at λ=0.30", rf)],
            "chosen_lambda": {"plain": 0.5, "Fisher": 0.3},
            "lambdas": [0.0, 1.0],
            "curves": {m: {"target": [v, v], "union": [v, v], "val_union": [v, v]}
                       for m, v in (("plain", rp), ("Fisher", rf))},
            "sampled_vs_exact_error": 0.5,
        })  # fmt: skip
    return results


def test_verdict_says_holds_or_not_with_numbers():
    held = verdict(_fake([90, 91], [88, 89], [80, 81], [79, 80]))
    assert "(a) ensembling, exact Fisher: Fisher merging ≥ plain averaging HOLDS here" in held
    assert "Fisher 90.50 ± 0.71% vs plain 88.50 ± 0.71%, +2.00 points" in held
    assert "(b) robust fine-tuning, λ chosen on validation: Fisher merging ≥ plain averaging " \
           "HOLDS" in held  # fmt: skip
    lost = verdict(_fake([80, 81], [88, 89], [70, 90], [80, 81]))
    assert "exact Fisher: Fisher merging ≥ plain averaging does NOT hold here" in lost
    assert "smaller than the seed-to-seed standard deviation" in lost
    assert held.startswith("Overall: Fisher merging ≥ plain averaging holds here in 3 of 3")
    assert lost.startswith("Overall: Fisher merging ≥ plain averaging holds here in 0 of 3")
    assert verdict([]) == "No comparable runs in these results."


def test_summarize_groups_by_method_across_seeds():
    tables = summarize(_fake([90, 92], [88, 90], [80, 82], [79, 81]))
    ensembling = tables[0]
    rows = {r[0]: r for r in ensembling.rows}
    assert rows["Fisher merge (exact)"][-1] == "91.00 ± 1.41"
    robust = {r[0]: r for r in tables[1].rows}
    assert set(robust) == {"plain", "Fisher"}  # λ in the name does not split the rows
    assert "Fisher 0.30" in tables[1].caption


def test_tiny_run_uses_no_global_random_state():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    run(dataclasses.replace(TINY, lambdas=2), 0)
    assert torch.equal(torch.rand(1), before)
