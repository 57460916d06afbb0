"""Experiment `fisher-merging`: determinism, the stacked trainer against separate torch loops, the
input shifts against exact pixel moves, invariants of the numbers (the WiSE-FT path ends in the
two models, plain merges are the hand-averaged weights), and the claims / protocol contract."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from meanwise.experiments import get
from meanwise.experiments.claims import validate_claim
from meanwise.experiments.fisher_merging import (
    FisherMergingConfig,
    FisherMergingResult,
    relative_error,
    run,
)
from meanwise.experiments.fisher_merging_models import (
    MLP,
    affine_shift,
    logits,
    train_copies,
)
from meanwise.experiments.fisher_merging_report import (
    claims,
    figures,
    frontier_mean,
    protocol,
    summarize,
)
from meanwise.merging import average_merge

TINY = FisherMergingConfig(
    seeds=2, hidden=8, pretrain_epochs=1, finetune_epochs=1, ensemble_sizes=(2, 3),
    grid_points=3, dirichlet_samples=2, fisher_examples=64, sampled_draws=4, lambdas=3,
    multitask_tasks=((0, 1, 2), (3, 4)),
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


def test_sampled_draws_change_no_merge(tiny_runs):
    """The sampled-Fisher check draws from its own generator: more draws change its errors only."""
    a = dataclasses.asdict(tiny_runs[0])
    b = dataclasses.asdict(run(dataclasses.replace(TINY, sampled_draws=8), 0))
    for part in ("ensembling", "robust", "multitask"):
        assert a[part] == b[part]
    assert a["sampled_fisher"] != b["sampled_fisher"]


def test_stacked_training_equals_separate_torch_loops():
    """Copy k of train_copies gets exactly the updates of its own nn.Module + torch.optim.Adam
    loop over the same batches (the loss is a sum of the copies' own mean losses)."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    inits = [MLP(6).state_dict() for _ in range(2)]
    trained = train_copies(inits, (x, y), 2, 8, 1e-2, torch.Generator().manual_seed(3))
    # replay the batch orders: per epoch one permutation per copy, in copy order
    g = torch.Generator().manual_seed(3)
    orders = [[torch.randperm(20, generator=g) for _ in range(2)] for _ in range(2)]
    for k in range(2):
        model = MLP(6)
        model.load_state_dict(inits[k])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # the reference (unfused) loop
        for epoch in range(2):
            order = orders[epoch][k]
            for start in range(0, 20, 8):
                idx = order[start : start + 8]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(trained[k][key], value, rtol=1e-5, atol=1e-6)
    # and the functional logits are the module's forward
    model.load_state_dict(trained[1])
    torch.testing.assert_close(logits(trained[1], x), model(x), rtol=1e-6, atol=1e-6)


def test_label_maps_train_each_copy_on_its_own_labels():
    torch.manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    inits = [MLP(4).state_dict() for _ in range(2)]
    mapped = train_copies(inits, (x, y), 1, 16, 1e-1, torch.Generator().manual_seed(0),
                          label_maps=[lambda t: t % 5, None])  # fmt: skip
    alone = train_copies(inits[:1], (x, y % 5), 1, 16, 1e-1, torch.Generator().manual_seed(0))
    # one full batch per epoch, so the batch order does not matter for the result
    for key in alone[0]:
        torch.testing.assert_close(mapped[0][key], alone[0][key], rtol=1e-5, atol=1e-6)


def test_affine_shift_matches_exact_pixel_moves():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    zero, zero2 = torch.zeros(3), torch.zeros(3, 2)
    torch.testing.assert_close(affine_shift(x, zero, zero2, zero, -0.5, g), x, atol=1e-5, rtol=0)
    # 90 degrees maps pixel centres onto pixel centres: an exact rot90
    rotated = affine_shift(x, torch.full((3,), 90.0), zero2, zero, -0.5, g)
    torch.testing.assert_close(rotated, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    # one pixel along x: columns move by one; the column moved in is blank (the background)
    right = affine_shift(x, zero, torch.tensor([[1.0, 0.0]] * 3), zero, -0.5, g)
    torch.testing.assert_close(right[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(right[..., -1], torch.full_like(x[..., -1], -0.5), atol=1e-5,
                               rtol=0)  # fmt: skip
    # noise only: the difference has the requested sd
    noisy = affine_shift(x.repeat(200, 1, 1, 1), torch.zeros(600), torch.zeros(600, 2),
                         torch.full((600,), 0.5), -0.5, g)  # fmt: skip
    assert (noisy - x.repeat(200, 1, 1, 1)).std().item() == pytest.approx(0.5, rel=0.03)


def test_relative_error_by_hand():
    exact = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    estimate = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0])}
    assert relative_error(estimate, exact) == pytest.approx(1 / 5)


def test_results_round_trip_through_the_typed_records(tiny_runs):
    """The report's typed records give back the JSON the runner caches, unchanged; a part that
    did not run is {} on disk, as before the records existed."""
    for result in (*tiny_runs, run(dataclasses.replace(TINY, multitask=False), 0)):
        data = json.loads(json.dumps(result.to_json()))
        assert data == json.loads(json.dumps(dataclasses.asdict(result) | _empty_parts(result)))
        typed = FisherMergingResult.from_json(data)
        assert typed == result
        assert json.dumps(typed.to_json()) == json.dumps(data)
    assert data["multitask"] == {} and typed.multitask is None


def _empty_parts(result) -> dict:
    return {part: {} for part in ("robust", "multitask") if getattr(result, part) is None}


def test_wise_ft_path_ends_in_the_two_models(tiny_runs):
    """At λ = 0 both merge rules give the pre-trained model, at λ = 1 the fine-tuned one (the
    shared setting's copy 1, scored independently in part (a))."""
    a, _, _ = tiny_runs
    shared_n2 = next(c for c in a.ensembling if c.head == "shared" and c.n_models == 2)
    fine_tuned = shared_n2.individual_test_acc[0]
    for method in ("plain", "fisher"):
        curve = a.robust.curves[method]
        assert curve["id_test"][0] == pytest.approx(a.pretrained_test_acc["shared"])
        assert curve["id_test"][-1] == pytest.approx(fine_tuned)
        mean = [sum(curve[s][i] for s in ("rotated", "translated", "noisy")) / 3 for i in range(3)]
        assert curve["shift_test"] == pytest.approx(mean)
    assert a.robust.lambdas == [0.0, 0.5, 1.0]
    for method, lam in a.robust.chosen_lambda.items():
        i = a.robust.lambdas.index(lam)
        assert a.robust.at_chosen[method]["id_test"] == a.robust.curves[method]["id_test"][i]


def test_results_are_well_formed(tiny_runs):
    a, _, _ = tiny_runs
    cells = [(c.head, c.n_models) for c in a.ensembling]
    assert cells == [("fresh", 2), ("fresh", 3), ("shared", 2), ("shared", 3)]
    for cell in a.ensembling:
        test = cell.test_acc
        assert all(0 <= v <= 100 for v in test.values())
        individual = cell.individual_test_acc
        assert test["individual (mean)"] == pytest.approx(sum(individual) / len(individual))
        assert test["individual (best)"] == max(individual)
        assert test["target (copy 1)"] == individual[0]
        for lam in cell.chosen_lambda.values():
            assert len(lam) == cell.n_models and sum(lam) == pytest.approx(1.0)
    assert cell.candidates == 2 and a.ensembling[0].candidates == 3  # Dirichlet / grid
    assert len(a.sampled_fisher) == 2
    for sampled in a.sampled_fisher.values():
        assert sampled.draws == [1, 4] and all(e > 0 for e in sampled.relative_error)
    assert len(a.multitask.confidence) == 2 and a.multitask.fisher_total[0] > 0


def test_plain_merge_is_the_hand_average_with_the_target_head():
    torch.manual_seed(0)
    states = [MLP(4).state_dict() for _ in range(3)]
    merged = average_merge(states, [0.5, 0.3, 0.2], keep_target=["head"])
    for key, value in merged.items():
        if key.startswith("head"):
            torch.testing.assert_close(value, states[0][key])
        else:
            hand = 0.5 * states[0][key] + 0.3 * states[1][key] + 0.2 * states[2][key]
            torch.testing.assert_close(value, hand)


def test_frontier_mean_by_hand():
    """Path B beats A by one point of shifted accuracy for clean levels up to 92 (58 of the 101
    levels from 88 to 95) and ties above; the λ order of the points does not matter."""
    a = frontier_mean([88, 92, 95], [64, 65, 62], 88, 95)
    b = frontier_mean([95, 88, 92], [62, 64, 66], 88, 95)
    assert b - a == pytest.approx(58 / 101)
    assert a == pytest.approx((58 * 65 + 43 * 62) / 101)
    assert frontier_mean([90, 90], [60, 61], 90, 90) == 61


def test_registered_with_quick_and_full_presets():
    experiment = get("fisher-merging")
    assert experiment.config(quick=True) == FisherMergingConfig.quick()
    assert experiment.config(quick=True).seeds >= 5
    assert experiment.config(quick=False).seeds >= 10
    with pytest.raises(ValueError, match="disjoint"):
        FisherMergingConfig(multitask_tasks=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="pretrain_fraction"):
        FisherMergingConfig(pretrain_fraction=0.9)
    with pytest.raises(ValueError, match="ensemble_sizes"):
        FisherMergingConfig(ensemble_sizes=(3, 2))


def _check_status(claim) -> None:
    lo, hi = claim.ci95
    expected = "supported" if lo > 0 else "contradicted" if hi < 0 else "unresolved"
    assert claim.status == expected, claim
    assert lo <= claim.effect <= hi


def test_claims_of_a_tiny_run_follow_the_contract(tiny_runs):
    results = [dataclasses.asdict(r) for r in tiny_runs[::2]]  # seeds 0 and 1
    found = claims(results)
    names = [c.claim for c in found]
    assert len(found) == 2 * 4 + 3  # (head, N) cells x (searched, equal λ) + WiSE-FT three
    assert any("N = 3, fresh heads, equal λ" in n for n in names)
    assert any("under input shift" in n for n in names)
    for c in found:
        validate_claim(c.to_json())
        assert c.n_seeds == 2 and c.paper_effect is None
        _check_status(c)
    # the ensembling effect is the paired Fisher − plain difference of the searched merges
    first = found[0]
    diffs = [
        next(c for c in r["ensembling"] if c["head"] == "fresh" and c["n_models"] == 2)["test_acc"]
        for r in results
    ]
    expected = sum(d["fisher (λ searched)"] - d["plain (λ searched)"] for d in diffs) / 2
    assert first.effect == pytest.approx(expected)
    assert summarize(results) and figures({}, results)[0].stem == "wise-ft-curve"


def _fake(fisher: list[float], plain: list[float]) -> list[dict]:
    """Seeds whose every Fisher arm scores `fisher[s]` and every plain arm `plain[s]`."""
    results = []
    for f, p in zip(fisher, plain, strict=True):
        test = {a: p for a in ("target (copy 1)", "individual (mean)", "output ensemble",
                               "plain (equal λ)", "plain (λ searched)")}  # fmt: skip
        test.update({"fisher (equal λ)": f, "fisher (λ searched)": f})
        curve = {
            m: {"id_test": [v, v], "shift_test": [v, v], "rotated": [v, v],
                "translated": [v, v], "noisy": [v, v], "val": [v, v], "val_nll": [1.0, 1.0]}
            for m, v in (("plain", p), ("fisher", f))
        }  # fmt: skip
        results.append({
            "seed": len(results),
            "ensembling": [{"head": "fresh", "n_models": 2, "test_acc": test,
                            "individual_test_acc": [p, p], "candidates": 51,
                            "chosen_lambda": {"plain": [0.5, 0.5], "fisher": [0.6, 0.4]}}],
            "robust": {"lambdas": [0.0, 1.0], "curves": curve,
                       "chosen_lambda": {"plain": 1.0, "fisher": 1.0},
                       "at_chosen": {m: {k: curve[m][k][1] for k in
                                         ("id_test", "shift_test", "rotated", "translated",
                                          "noisy")} for m in curve}},
        })  # fmt: skip
    return results


def test_claim_statuses_follow_the_interval():
    better = claims(_fake([91, 92, 93, 91.5], [90, 90.5, 91, 90]))
    assert [c.status for c in better] == ["supported"] * 5
    assert better[0].effect == pytest.approx(1.5)
    worse = claims(_fake([88, 88.5, 89, 88], [90, 90.5, 91, 90]))
    assert [c.status for c in worse] == ["contradicted"] * 5
    noisy = claims(_fake([91, 89, 92, 88], [90, 90, 90, 90]))
    assert all(c.status == "unresolved" for c in noisy)
    assert "Minimum detectable effect" in noisy[0].detail
    for c in better + worse + noisy:
        validate_claim(c.to_json())
        _check_status(c)
    assert claims([]) == []


def test_protocol_rows_cover_the_contract():
    table = protocol(dataclasses.asdict(FisherMergingConfig.quick()))
    aspects = [row[0] for row in table.rows]
    for needed in ("model", "data", "budget", "optimizer and schedule", "runs / seeds", "metric",
                   "merge options", "coefficients", "Fisher"):  # fmt: skip
        assert needed in aspects
    seeds_row = table.rows[aspects.index("runs / seeds")]
    assert seeds_row[2].startswith(f"{FisherMergingConfig.quick().seeds} seeds")
    assert all(cell.strip() for row in table.rows for cell in row)


def test_tiny_run_uses_no_global_random_state():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    run(dataclasses.replace(TINY, multitask=False, ensemble_sizes=(2,)), 0)
    assert torch.equal(torch.rand(1), before)
