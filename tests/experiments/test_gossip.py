"""Experiment `gossip` on a tiny config: the pipeline, determinism and the report's numbers."""

import json
import math
from dataclasses import asdict, replace

import pytest

from meanwise.experiments import gossip_report as report
from meanwise.experiments.gossip import GossipConfig, run
from meanwise.experiments.registry import get

TINY = replace(
    GossipConfig.quick(), seeds=1, n_nodes=10, degree=3, ticks=60, eval_every=10, final_window=2
)


def test_tiny_run_report_and_determinism():
    result = json.loads(json.dumps(asdict(run(TINY, seed=0))))
    assert len(result["runs"]) == 2 * 3  # splits x methods
    again = asdict(run(TINY, seed=0))
    for a, b in zip(result["runs"], again["runs"], strict=True):
        assert a["mean_accuracy"] == b["mean_accuracy"]
        assert a["layer_variance"] == b["layer_variance"]
    plain = next(r for r in result["runs"] if r["method"] == "gossip-plain")
    assert plain["predicted_ratio"] == pytest.approx(0.25 + 0.25 / 3)
    # the report's variance ratio is the geometric mean over weight layers of var / init var
    layers = [n for n in plain["layer_variance"] if n.endswith("weight")]
    expected = math.exp(
        sum(math.log(plain["layer_variance"][n][-1] / plain["initial_variance"][n]) for n in layers)
        / len(layers)
    )
    assert report._final_ratio(plain) == pytest.approx(expected)
    fl = next(r for r in result["runs"] if r["method"] == "fl")
    assert fl["trainings"] == 10 * (60 // 10)  # 10 leaves, every 10 ticks
    tables = report.summarize([result])
    assert len(tables) == 2 and len(tables[0].rows) == 3
    text = report.verdict([result])
    assert text.count("HOLDS") + text.count("does NOT hold") == 6
    assert set(report.metrics([result])) >= {"mlp.iid.fl.final_accuracy.mean"}
    specs = report.figures(asdict(TINY), [result])
    assert [s.stem for s in specs] == ["accuracy-mlp", "variance-mlp-iid", "variance-mlp-dirichlet"]
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    for spec in specs:
        spec.draw(Figure())


def test_registered_and_config_errors():
    assert get("gossip").config(quick=True) == GossipConfig.quick()
    with pytest.raises(ValueError, match="methods"):
        GossipConfig(methods=("gossip-magic",))
    with pytest.raises(ValueError, match="ticks"):
        GossipConfig(ticks=10, eval_every=25)
