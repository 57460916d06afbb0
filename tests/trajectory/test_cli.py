"""`meanwise trajectory evaluate` on the released ETH weights: the JSON holds the expected
ADE/FDE and, at K = 1000, the AMD/AMV/KDE-NLL measured with the authors' metric code."""

from __future__ import annotations

import json

import pytest

from meanwise import cli


def test_evaluate_writes_expected_numbers(checkpoints_root, data_root, tmp_path):
    out = tmp_path / "eth.json"
    argv = [
        "trajectory", "evaluate",
        "--official-checkpoint", str(checkpoints_root / "eth"),
        "--data-dir", str(data_root),
        "--split", "eth", "--samples", "20", "--seed", "0",
        "--json", str(out),
        "--distribution-metrics", "--distribution-samples", "1000",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["scenes"], result["pedestrians"]) == (70, 181)
    assert abs(result["ade"] - 0.67) <= 0.02 and abs(result["fde"] - 1.48) <= 0.05
    # ../shared/REFERENCES.md: ETH AMD 3.06, AMV 0.127, KDE-NLL 5.03 at K = 1000 (one draw of
    # 1000 samples per scene moves these by a few percent)
    assert result["amd"] == pytest.approx(3.06, abs=0.15)
    assert result["amv"] == pytest.approx(0.127, abs=0.01)
    assert result["kde_nll"] == pytest.approx(5.03, abs=0.25)


def test_evaluate_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["trajectory", "evaluate", "--official-checkpoint", "x", "--split", "mars"])
    missing = ["trajectory", "evaluate", "--official-checkpoint", str(tmp_path), "--split", "eth"]
    assert cli.main(missing) == 1  # a ValueError, reported on stderr
    assert "no checkpoint file" in capsys.readouterr().err


def test_distribution_samples_needs_distribution_metrics(tmp_path, capsys):
    argv = ["trajectory", "evaluate", "--official-checkpoint", str(tmp_path), "--split", "eth"]
    assert cli.main([*argv, "--distribution-samples", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "meanwise: --distribution-samples needs --distribution-metrics "
        "(it sets K for AMD/AMV/KDE-NLL)"
    )


def test_evaluate_scenes_refuses_distribution_samples_alone():
    import torch

    from meanwise.trajectory.data import Scene
    from meanwise.trajectory.evaluate import evaluate_scenes

    scene = Scene(
        observed=torch.zeros(8, 2, 2, dtype=torch.float64),
        future=torch.zeros(12, 2, 2, dtype=torch.float64),
        pedestrian_ids=torch.tensor([1.0, 2.0]),
        frame_ids=torch.arange(20.0),
    )

    def still(observed, k, generator):
        return observed[-1:].expand(12, -1, -1).unsqueeze(0).expand(k, -1, -1, -1)

    with pytest.raises(ValueError, match="distribution_samples needs distribution_metrics"):
        evaluate_scenes(still, [scene], distribution_samples=1000)
    assert evaluate_scenes(still, [scene])["ade"] == 0.0  # the sampler itself is fine
