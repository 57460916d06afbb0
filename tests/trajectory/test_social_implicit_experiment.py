"""Experiment `social-implicit`: a tiny synthetic run is deterministic and well formed, the
constant-velocity yardstick is exact, and the verdict reads hand-made results correctly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from meanwise.experiments import get
from meanwise.experiments.social_implicit import (
    SocialImplicitConfig,
    constant_velocity,
    run,
)
from meanwise.experiments.social_implicit_report import figures, metrics, summarize, verdict

TINY = SocialImplicitConfig(
    data="synthetic",
    synthetic_duration=150.0,
    epochs=1,
    max_train_scenes=12,
    accumulate=4,
    distribution_samples=8,
    shift_offsets=(0.0, 1.0),
    shift_scenes=3,
)


def _strip_timing(result) -> dict:
    data = dataclasses.asdict(result)
    for split in data["splits"]:
        split.pop("train_seconds")
    return data


@pytest.fixture(scope="module")
def tiny_runs():
    previous = torch.get_num_threads()
    try:
        return run(TINY, 0), run(TINY, 0)
    finally:
        torch.set_num_threads(previous)


def test_tiny_run_is_deterministic_and_well_formed(tiny_runs):
    a, b = tiny_runs
    assert _strip_timing(a) == _strip_timing(b)
    assert a.num_parameters == 5836
    (split,) = a.splits
    assert split.data == "synthetic" and split.split == "synthetic"
    assert split.released is None  # no released weights for the synthetic crowd
    assert split.epochs == 1 and split.scenes_per_epoch == 12
    assert [p.offset for p in split.shift] == [0.0, 1.0]
    for predictor in (split.trained, split.constant_velocity):
        assert set(predictor) == {"ade", "fde", "amd", "amv", "kde_nll"}
        assert all(math.isfinite(v) for v in predictor.values())
    # a constant shift moves every sample but leaves the samples' spread alone
    assert split.shift[1].amv == pytest.approx(split.shift[0].amv, rel=1e-6)
    assert split.shift[1].amd > split.shift[0].amd


def test_constant_velocity_repeats_the_last_step():
    observed = torch.zeros(8, 2, 2, dtype=torch.float64)
    observed[:, 0, 0] = torch.arange(8, dtype=torch.float64) * 0.5  # 0.5 m per step along x
    observed[:, 1, 1] = 3.0  # standing still
    pred = constant_velocity(observed, 4, torch.Generator())
    assert pred.shape == (4, 12, 2, 2)
    assert torch.allclose(pred[2, :, 0, 0], 3.5 + 0.5 * torch.arange(1, 13, dtype=torch.float64))
    assert torch.equal(pred[:, :, 1], observed[-1, 1].expand(4, 12, 2))


def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match="data"):
        SocialImplicitConfig(data="kitti")
    with pytest.raises(ValueError, match="splits"):
        SocialImplicitConfig(splits=("mars",))
    with pytest.raises(ValueError, match="shift_offsets"):
        SocialImplicitConfig(shift_offsets=(0.5, 1.0))
    with pytest.raises(ValueError, match="distribution_samples"):
        SocialImplicitConfig(distribution_samples=2)
    assert SocialImplicitConfig.full().splits == ("eth", "hotel", "univ", "zara1", "zara2")
    assert SocialImplicitConfig.quick().seeds == 1


def test_registered_and_the_report_side_handles_a_real_result(tiny_runs):
    experiment = get("social-implicit")
    assert experiment.run is run
    results = [dataclasses.asdict(tiny_runs[0])]
    tables = summarize(results)
    assert tables and all(t.rows for t in tables)
    assert "synthetic.trained.ade" in metrics(results)
    assert [f.stem for f in figures({}, results)] == ["shift-synthetic", "training"]
    assert "no published numbers" in verdict(results)


# --- the verdict on hand-made results -------------------------------------------------------------


def _split(ade, fde, *, released=None, shift=None, split="zara1", data="eth_ucy"):
    point = lambda offset, a, f, amd, amv: dict(offset=offset, ade=a, fde=f, amd=amd, amv=amv)  # noqa: E731
    return {
        "split": split, "data": data, "train_scenes": 100, "val_scenes": 10, "test_scenes": 20,
        "test_pedestrians": 50, "epochs": 3, "scenes_per_epoch": 100, "accumulate": 16,
        "best_epoch": 2,
        "train_loss": [0.3, 0.2, 0.1], "val_ade": [0.9, 0.5, 0.4], "val_fde": [1.8, 1.0, 0.8],
        "train_seconds": 1.0,
        "trained": {"ade": ade, "fde": fde, "amd": 2.0, "amv": 0.1, "kde_nll": 1.0},
        "constant_velocity": {"ade": 0.45, "fde": 0.95, "amd": 400.0, "amv": 1e-6, "kde_nll": 0.0},
        "released": released,
        "shift": [point(*p) for p in (shift or [])],
        "shift_scenes": 20,
    }  # fmt: skip


def _results(*splits):
    return [{"seed": 0, "samples": 20, "distribution_samples": 50, "splits": list(splits)}]


def test_verdict_approaches_only_within_ten_percent_of_the_published_numbers():
    close = verdict(_results(_split(0.27, 0.54)))  # published zara1 .25/.50: x1.08
    assert "approaches the published numbers" in close and "NOT" not in close.split(";")[0]
    far = verdict(_results(_split(0.30, 0.50)))  # ADE x1.20
    assert "does NOT approach" in far
    released = {"ade": 0.26, "fde": 0.51, "amd": 1.8, "amv": 0.09, "kde_nll": 1.3}
    text = verdict(_results(_split(0.40, 0.80, released=released)))
    assert "released weights give 0.260/0.510" in text
    assert "better than constant velocity" in text and "NOT better" not in text
    assert "NOT better than constant velocity" in verdict(_results(_split(0.50, 1.0)))


def test_verdict_on_the_shift_probe():
    reacts = [(0.0, 0.3, 0.6, 2.0, 0.5), (1.0, 0.33, 0.62, 8.0, 0.5)]
    text = verdict(_results(_split(0.3, 0.6, shift=reacts)))
    assert "AMD reacts to the shift more than best-of-N ADE/FDE: HOLDS here" in text
    assert "AMV does not react" in text
    dull = [(0.0, 0.3, 0.6, 2.0, 0.5), (1.0, 0.9, 1.2, 2.2, 0.5)]
    assert "does NOT hold here" in verdict(_results(_split(0.3, 0.6, shift=dull)))
    synthetic = verdict(_results(_split(0.3, 0.6, split="synthetic", data="synthetic")))
    assert "no published numbers exist" in synthetic
