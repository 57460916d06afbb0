"""Experiment `frame-averaging` on a tiny config: determinism, resume, report parts, claims."""

import dataclasses
import json
import math

import pytest
import torch

from meanwise.experiments import get
from meanwise.experiments.base import runner_context
from meanwise.experiments.claims import status_from_interval, validate_claim
from meanwise.experiments.frame_averaging import (
    FrameAveragingConfig,
    FrameAveragingResult,
    NormalsRun,
    equivariance_error,
    nbody_data,
    run,
    train_nbody,
)
from meanwise.experiments.frame_averaging_report import PUBLISHED_MSE, claims, protocol, summarize
from meanwise.experiments.runner import config_to_dict
from meanwise.symmetry.models import LinearDynamics

TINY = FrameAveragingConfig(
    data_draw="seeded",  # fresh systems: no replay of the 14,000-system published stream
    train_size=40,
    val_size=20,
    test_size=20,
    batch_size=20,
    epochs=3,
    eval_every=1,
    fa_hidden=6,
    gnn_hidden=8,
    layers=2,
    equivariance_systems=20,
    checkpoint_every=1,
    normal_train_shapes=6,
    normal_test_shapes=6,
    normal_points=32,
    normal_epochs=2,
    normal_batch_size=3,
    normal_width=8,
)


def _without_timing(result) -> dict:
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    for part in ("nbody", "normals"):
        for r in data.get(part, []):
            r.pop("seconds")
    data.pop("seconds", None)
    return data


@pytest.fixture(scope="module")
def tiny_runs():
    return run(TINY, 0), run(TINY, 0), run(TINY, 1)


def test_same_seed_identical_other_seed_different(tiny_runs):
    a, b, c = tiny_runs
    assert _without_timing(a) == _without_timing(b)
    fa = {r.model: r for r in a.nbody}["FA-GNN"]
    fa_other = {r.model: r for r in c.nbody}["FA-GNN"]
    assert fa.train_mse != fa_other.train_mse
    assert [r.model for r in a.nbody] == list(TINY.models)


def test_results_round_trip_through_the_typed_records(tiny_runs):
    """The report's typed records give back the JSON the runner caches, unchanged."""
    for result in tiny_runs:
        data = json.loads(json.dumps(dataclasses.asdict(result)))
        typed = FrameAveragingResult.from_json(data)
        assert typed == result and isinstance(typed.normals[0], NormalsRun)
        assert json.dumps(typed.to_json()) == json.dumps(data)


def test_results_follow_the_papers_selection_rule(tiny_runs):
    a, _, _ = tiny_runs
    for r in a.nbody:
        assert r.epochs_run == TINY.epochs and len(r.val_mse) == TINY.epochs
        best = min(range(len(r.val_mse)), key=r.val_mse.__getitem__)
        assert r.best_epoch == r.eval_epochs[best]
        assert r.test_mse == r.test_mse_curve[best] and r.best_val_mse == r.val_mse[best]
        assert all(math.isfinite(v) for v in r.train_mse + r.val_mse)
    errors = {r.model: r.equivariance_error for r in a.nbody}
    assert errors["FA-GNN"] < 1e-4 and errors["Linear"] < 1e-6 and errors["GNN"] > 1e-3
    normals = {r.model: r for r in a.normals}
    assert normals["FA-PointNet"].equivariance_error < 1e-4
    fa = normals["FA-PointNet"]
    assert abs(fa.aligned_error_deg - fa.rotated_error_deg) < 0.1


def test_equivariance_error_of_an_exactly_equivariant_model_is_rounding():
    data = nbody_data(0, 20, 20, 20, "seeded")["test"]
    error = equivariance_error(LinearDynamics(), data, torch.Generator().manual_seed(0))
    assert error < 1e-6


def test_resume_from_a_checkpoint_gives_the_uninterrupted_result(tmp_path):
    config = dataclasses.replace(TINY, epochs=4)
    with runner_context(show_progress=False, stage_dir=tmp_path / "whole"):
        whole = train_nbody("FA-GNN", config, 0)
    # an interrupted run: only the first 2 epochs finished and were checkpointed
    short = dataclasses.replace(config, epochs=2)
    with runner_context(show_progress=False, stage_dir=tmp_path / "resumed"):
        train_nbody("FA-GNN", short, 0)
        resumed = train_nbody("FA-GNN", config, 0)
    assert (tmp_path / "resumed" / "nbody-FA-GNN.pt").exists()
    assert _without_timing(resumed) == _without_timing(whole)


def test_early_stopping_counts_evaluations_without_improvement():
    config = dataclasses.replace(TINY, epochs=30, patience=1, models=("Linear",))
    r = train_nbody("Linear", config, 0)
    # Adam lr 1e-3 moves t by ~1e-3 per step: validation keeps improving or stops within 30
    assert r.epochs_run <= 30 and (r.stopped_early == (r.epochs_run < 30))


def test_registered_experiment_produces_report_parts(tiny_runs):
    experiment = get("frame-averaging")
    results = [dataclasses.asdict(r) for r in tiny_runs[:2]]
    tables = experiment.summarize(results)
    assert [len(t.rows) for t in tables] == [len(TINY.models), len(TINY.normal_models)]
    assert {f.stem for f in experiment.figures({}, results)} == {"nbody-curves", "normals"}
    metrics = experiment.metrics(results)
    assert metrics["nbody.FA-GNN.test_mse.std"] == 0.0
    quick, full = FrameAveragingConfig.quick(), FrameAveragingConfig.full()
    assert quick.epochs < full.epochs and full.train_size == 3000 and full.batch_size == 100
    assert quick.seeds >= 3 and full.seeds >= 3


def test_claims_of_a_tiny_run_validate_and_follow_their_intervals(tiny_runs):
    results = [dataclasses.asdict(r) for r in (tiny_runs[0], tiny_runs[2])]  # seeds 0 and 1
    found = get("frame-averaging").claims(results)
    names = [c.claim for c in found]
    assert names[:2] == [
        "FA-GNN has a lower n-body test MSE than GNN",
        "GNN has a lower n-body test MSE than Linear",
    ]
    assert not any("published n-body test MSE" in n for n in names)  # 40 systems: no level
    thresholds = {"MSE": 0.0, "equivariant": 1e-5, "equals": 0.5, "removes": 0.0}
    for c in found:
        validate_claim(c.to_json())
        assert c.n_seeds == 2
        threshold = next(v for k, v in thresholds.items() if k in c.claim)
        assert c.status == status_from_interval(c.ci95, threshold, "less")
    # the effect is the mean paired difference, computed here from the raw runs
    by_seed = [{r.model: r.test_mse for r in run.nbody} for run in (tiny_runs[0], tiny_runs[2])]
    expected = sum(m["FA-GNN"] - m["GNN"] for m in by_seed) / 2
    assert math.isclose(found[0].effect, expected, rel_tol=1e-12)
    assert math.isclose(found[0].paper_effect, 0.0057 - 0.0107)


def test_protocol_lists_every_aspect_with_the_config_that_ran():
    for config in (FrameAveragingConfig.quick(), FrameAveragingConfig.full()):
        table = get("frame-averaging").protocol(config_to_dict(config))
        assert table.columns[:3] == ["aspect", "paper", "ours"]
        aspects = {row[0]: row for row in table.rows}
        for aspect in ("n-body simulator", "data size", "FA-GNN", "GNN baseline", "optimizer",
                       "training budget", "runs", "metric", "normal estimation"):  # fmt: skip
            assert aspect in aspects
        assert all(cell.strip() for row in table.rows for cell in row)
        assert f"{config.train_size:,} / {config.val_size:,}" in aspects["data size"][2]
        assert f"batch {config.batch_size}" in aspects["optimizer"][2]
        assert f"at most {config.epochs} epochs" in aspects["training budget"][2]
        assert f"{config.seeds} seed(s)" in aspects["runs"][2]
    full = {r[0]: r for r in protocol(config_to_dict(FrameAveragingConfig.full())).rows}
    assert full["data size"][3] == "same as the paper"


def _fake(mse: dict[str, list[float]], normals=(5.0, 5.0, 5.0, 40.0), train_size=3000):
    """Results of len(values) seeds; normals = (FA aligned, FA rotated, plain aligned, rotated),
    each shifted by 0.1 x seed so that the per-seed spread is not zero."""
    fa_al, fa_rot, p_al, p_rot = normals
    seeds = len(next(iter(mse.values())))
    return [
        {
            "seed": s, "train_size": train_size, "epochs_cap": 1000,
            "degenerate_test_fraction": 0.1,
            "nbody": [
                {"model": m, "test_mse": v[s], "equivariance_error": 1e-7 * (1 + s),
                 "best_epoch": 9, "epochs_run": 10, "parameters": 1, "seconds": 1.0,
                 "eval_epochs": [9], "val_mse": [v[s]], "train_mse": [v[s]],
                 "best_val_mse": v[s], "test_mse_curve": [v[s]], "stopped_early": False}
                for m, v in mse.items()
            ],
            "normals": [
                {"model": "FA-PointNet", "aligned_error_deg": fa_al + 0.1 * s,
                 "rotated_error_deg": fa_rot + 0.1 * s, "equivariance_error": 1e-7,
                 "seconds": 1.0, "train_loss": [1.0]},
                {"model": "PointNet", "aligned_error_deg": p_al, "rotated_error_deg": p_rot
                 + 0.3 * s, "equivariance_error": 1.0, "seconds": 1.0, "train_loss": [1.0]},
            ],
        }
        for s in range(seeds)
    ]  # fmt: skip


# t_{0.975} with 2 degrees of freedom (scipy.stats.t.ppf(0.975, 2)), an independent constant
T975_DF2 = 4.302652729911275


def test_claims_follow_the_paired_intervals_of_hand_made_results():
    results = _fake(
        {
            "FA-GNN": [0.0050, 0.0052, 0.0051],
            "GNN": [0.0107, 0.0111, 0.0104],
            "Linear": [0.0819, 0.0820, 0.0818],
        }  # fmt: skip
    )
    found = {c.claim: c for c in claims(results)}
    fa = found["FA-GNN has a lower n-body test MSE than GNN"]
    diffs = [0.0050 - 0.0107, 0.0052 - 0.0111, 0.0051 - 0.0104]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert math.isclose(fa.effect, mean, rel_tol=1e-12)
    half = T975_DF2 * sd / math.sqrt(3)
    assert fa.ci95 == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert fa.status == "supported" and fa.n_seeds == 3
    assert found["GNN has a lower n-body test MSE than Linear"].status == "supported"
    assert found["FA-GNN is E(3)-equivariant up to float32 rounding"].status == "supported"
    level = found["FA-GNN reaches the published n-body test MSE (.0057)"]
    assert level.status == "supported" and level.paper_effect == PUBLISHED_MSE["FA-GNN"]
    assert (
        found["FA-PointNet's normal error on unseen rotations equals its aligned error"].status
        == "supported"
    )
    removes = found[
        "Frame averaging removes the plain network's degradation under unseen rotations"
    ]
    assert removes.status == "supported" and removes.effect == pytest.approx(-35.3)


def test_claims_are_contradicted_or_unresolved_when_the_numbers_say_so():
    reversed_ = claims(
        _fake(
            {"FA-GNN": [0.020, 0.021, 0.022], "GNN": [0.0107, 0.0111, 0.0104]},
            normals=(5.0, 9.0, 5.0, 5.0),
        )  # fmt: skip
    )
    found = {c.claim: c for c in reversed_}
    assert found["FA-GNN has a lower n-body test MSE than GNN"].status == "contradicted"
    assert found["FA-GNN reaches the published n-body test MSE (.0057)"].status == "contradicted"
    assert (
        found["FA-PointNet's normal error on unseen rotations equals its aligned error"].status
        == "contradicted"
    )
    assert "GNN has a lower n-body test MSE than Linear" not in found  # no Linear arm
    noisy = claims(_fake({"FA-GNN": [0.010, 0.012, 0.0105], "GNN": [0.011, 0.0105, 0.0112]}))
    within_noise = {c.claim: c for c in noisy}["FA-GNN has a lower n-body test MSE than GNN"]
    assert within_noise.status == "unresolved"
    assert "Minimum detectable effect at 3 seeds" in within_noise.detail
    one_seed = claims(_fake({"FA-GNN": [0.005], "GNN": [0.0107]}))
    assert all(c.status == "unresolved" and c.n_seeds == 1 for c in one_seed)
    small = {c.claim for c in claims(_fake({"FA-GNN": [0.04, 0.05]}, train_size=500))}
    assert "FA-GNN reaches the published n-body test MSE (.0057)" not in small
    assert claims([]) == []


def test_summary_table_ranks_models_next_to_the_paper():
    table = summarize(_fake({"FA-GNN": [0.0055], "GNN": [0.0107]}))[0]
    row = {r[0]: r for r in table.rows}
    assert row["FA-GNN"][2] == f"{PUBLISHED_MSE['FA-GNN']:.4f}" and row["FA-GNN"][3] == "1"


def test_config_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown models"):
        FrameAveragingConfig(models=("EGNN",))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        FrameAveragingConfig(epochs=0)
