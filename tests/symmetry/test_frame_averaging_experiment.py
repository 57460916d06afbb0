"""Experiment `frame-averaging` on a tiny config: determinism, resume, report parts, verdict."""

import dataclasses
import math

import pytest
import torch

from meanwise.experiments import get
from meanwise.experiments.base import runner_context
from meanwise.experiments.frame_averaging import (
    FrameAveragingConfig,
    equivariance_error,
    nbody_data,
    run,
    train_nbody,
)
from meanwise.experiments.frame_averaging_report import PUBLISHED_MSE, summarize, verdict
from meanwise.symmetry.models import LinearDynamics

TINY = FrameAveragingConfig(
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
    data = nbody_data(0, 20, 20, 20)["test"]
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
    assert "HOLDS here" in experiment.verdict(results) or "NOT" in experiment.verdict(results)
    quick, full = FrameAveragingConfig.quick(), FrameAveragingConfig.full()
    assert quick.epochs < full.epochs and full.train_size == 3000 and full.batch_size == 100


def _fake(mse: dict[str, float], normals=(5.0, 5.0, 5.0, 40.0)):
    fa_al, fa_rot, p_al, p_rot = normals
    return [
        {
            "seed": 0, "train_size": 3000, "epochs_cap": 1000, "degenerate_test_fraction": 0.1,
            "nbody": [
                {"model": m, "test_mse": v, "equivariance_error": 1e-7, "best_epoch": 9,
                 "epochs_run": 10, "parameters": 1, "seconds": 1.0, "eval_epochs": [9],
                 "val_mse": [v], "train_mse": [v]}
                for m, v in mse.items()
            ],
            "normals": [
                {"model": "FA-PointNet", "aligned_error_deg": fa_al, "rotated_error_deg": fa_rot,
                 "equivariance_error": 1e-7, "seconds": 1.0, "train_loss": [1.0]},
                {"model": "PointNet", "aligned_error_deg": p_al, "rotated_error_deg": p_rot,
                 "equivariance_error": 1.0, "seconds": 1.0, "train_loss": [1.0]},
            ],
        }
    ]  # fmt: skip


def test_verdict_says_when_the_ordering_holds_and_when_not():
    holds = verdict(_fake({"FA-GNN": 0.0055, "GNN": 0.0107, "Linear": 0.0819}))
    lines = holds.splitlines()
    assert lines[0].startswith("n-body ordering FA-GNN < GNN < Linear (paper): HOLDS here")
    assert "FA-GNN reaches the paper's level" in lines[0]
    assert lines[1].startswith("Normals under unseen rotations: HOLDS here")
    fails = verdict(_fake({"FA-GNN": 0.02, "GNN": 0.0107, "Linear": 0.0819}, (5, 9, 5, 5)))
    assert "does NOT hold here" in fails.splitlines()[0]
    assert "ours GNN < FA-GNN < Linear" in fails
    assert "does not reach" in fails
    assert fails.splitlines()[1].startswith("Normals under unseen rotations: does NOT hold")
    table = summarize(_fake({"FA-GNN": 0.0055, "GNN": 0.0107}))[0]
    row = {r[0]: r for r in table.rows}
    assert row["FA-GNN"][2] == f"{PUBLISHED_MSE['FA-GNN']:.4f}" and row["FA-GNN"][3] == "1"


def test_config_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown models"):
        FrameAveragingConfig(models=("EGNN",))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        FrameAveragingConfig(epochs=0)
