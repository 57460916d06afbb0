"""Experiment `gossip` on a tiny config: the pipeline, determinism, the report's numbers, and the
claims (values, intervals against scipy, statuses, the censoring rule) and the protocol table."""

import json
import math
from dataclasses import asdict, replace

import pytest
from scipy import stats

from meanwise.experiments import gossip_report as report
from meanwise.experiments.claims import status_from_interval, validate_claim
from meanwise.experiments.gossip import GossipConfig, GossipResult, MethodRun, run
from meanwise.experiments.registry import get

TINY = replace(
    GossipConfig.quick(),
    seeds=2,
    n_nodes=10,
    degree=3,
    ticks=60,
    eval_every=10,
    final_window=2,
    target_accuracy=0.3,
)


@pytest.fixture(scope="module")
def tiny_results():
    return [json.loads(json.dumps(asdict(run(TINY, seed=s)))) for s in range(TINY.seeds)]


def test_results_round_trip_through_the_typed_records(tiny_results):
    """What the runner caches and results.json holds comes back unchanged from the typed form
    the report reads (same JSON text, key order included)."""
    for result in tiny_results:
        typed = GossipResult.from_json(result)
        assert isinstance(typed.runs[0], MethodRun)
        assert json.dumps(typed.to_json()) == json.dumps(result)
    with pytest.raises(ValueError, match=r"GossipResult.runs\[0\]: unknown key\(s\) \['typo'\]"):
        GossipResult.from_json(
            {**tiny_results[0], "runs": [{**tiny_results[0]["runs"][0], "typo": 1}]}
        )


def test_tiny_run_report_and_determinism(tiny_results):
    result = tiny_results[0]
    assert len(result["runs"]) == 2 * 3  # splits x methods
    again = asdict(run(replace(TINY, splits=("iid",)), seed=0))
    for a, b in zip(result["runs"][:3], again["runs"], strict=True):
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
    assert report._final_ratio(MethodRun.from_json(plain)) == pytest.approx(expected)
    fl = next(r for r in result["runs"] if r["method"] == "fl")
    assert fl["trainings"] == 10 * (60 // 10)  # 10 leaves, every 10 ticks
    tables = report.summarize([result])
    assert len(tables) == 2 and len(tables[0].rows) == 3
    assert set(report.metrics([result])) >= {"mlp.iid.fl.final_accuracy.mean"}
    specs = report.figures(asdict(TINY), [result])
    assert [s.stem for s in specs] == ["accuracy-mlp", "variance-mlp-iid", "variance-mlp-dirichlet"]
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    for spec in specs:
        spec.draw(Figure())


# (threshold, direction) of the five claims of a cell, in order, for a degree-3 graph
def _rules(predicted: float) -> list[tuple[float, str]]:
    return [(predicted, "less"), (predicted, "greater"), (0.0, "greater"), (1.5, "less"),
            (0.0, "less")]  # fmt: skip


def test_claims_of_a_real_tiny_run(tiny_results):
    claims = report.claims(tiny_results)
    assert len(claims) == 2 * 5  # per split: collapse, keeps, lag, fast, beats
    predicted = 0.25 + 0.25 / 3
    for i, claim in enumerate(claims):
        record = claim.to_json()
        validate_claim(record)
        assert record["n_seeds"] == 2
        threshold, direction = _rules(predicted)[i % 5]
        raw = status_from_interval(tuple(record["ci95"]), threshold, direction)
        # censoring may only turn a status into "unresolved", never flip it
        assert record["status"] in (raw, "unresolved")
        if record["status"] == "unresolved" and raw != "unresolved":
            assert "lower bound" in record["detail"] or "undefined" in record["detail"]
    # claim 1, by hand: per seed, the layer whose lowest var / init var is largest
    values = []
    for result in tiny_results:
        plain = next(
            r for r in result["runs"] if (r["split"], r["method"]) == ("iid", "gossip-plain")
        )
        values.append(
            max(
                min(v / plain["initial_variance"][n] for v in plain["layer_variance"][n])
                for n in plain["layer_variance"]
                if n.endswith("weight")
            )
        )
    assert claims[0].effect == pytest.approx(sum(values) / 2)
    half = stats.t.ppf(0.975, 1) * stats.tstd(values) / math.sqrt(2)
    assert claims[0].ci95 == pytest.approx((sum(values) / 2 - half, sum(values) / 2 + half))


# --- claims on hand-made results ----------------------------------------------------------------


def _run(split, method, reached, *, low=1.0, accuracy=0.9):
    """One run: two weight layers whose variance dips to `low` of the initial (1.0)."""
    return {
        "model": "mlp", "split": split, "method": method, "ticks": [10, 20, 30],
        "mean_accuracy": [0.1, 0.5, accuracy], "min_accuracy": [0, 0, 0],
        "max_accuracy": [1, 1, 1],
        "layer_variance": {"0.weight": [1.0, low, low], "2.weight": [1.0, 0.9 * low, low],
                           "0.bias": [0.0, 0.0, 0.0]},
        "initial_variance": {"0.weight": 1.0, "2.weight": 1.0, "0.bias": 1.0},
        "final_accuracy": accuracy, "ticks_to_target": reached, "trainings": 0, "merges": 0,
        "predicted_ratio": None if method == "fl" else 0.25 + 0.25 / 8, "seconds": 0.0,
    }  # fmt: skip


def _results(fl, plain, fixed, *, plain_low=0.02, fixed_low=0.9):
    """One result per seed: per-seed ticks to the target of each arm (None: never)."""
    return [
        {"seed": s, "n_nodes": 50, "degree": 8, "ticks": 1000, "beta": 0.5,
         "target_accuracy": 0.8,
         "runs": [_run("iid", "fl", f), _run("iid", "gossip-plain", p, low=plain_low),
                  _run("iid", "gossip-corrected", c, low=fixed_low)]}
        for s, (f, p, c) in enumerate(zip(fl, plain, fixed, strict=True))
    ]  # fmt: skip


def _by_name(claims):
    keys = ("collapses", "keeps", "more slowly than FL", "about as fast", "faster than plain")
    return {k: next(c for c in claims if k in c.claim) for k in keys}


def test_hand_made_claims_values_and_statuses():
    fl, plain, fixed = [300, 320, 280], [900, 950, 880], [400, 420, 430]
    c = _by_name(report.claims(_results(fl, plain, fixed)))
    # collapse: the layer that fell least dips to 0.02 in every seed (sd 0: the point itself)
    assert c["collapses"].effect == pytest.approx(0.02)
    assert c["collapses"].status == "supported" and c["collapses"].paper_effect == 1 / 8
    # keeps: the lowest layer of the corrected runs dips to 0.9 * 0.9
    assert c["keeps"].effect == pytest.approx(0.81) and c["keeps"].status == "supported"
    # lag: paired plain - FL, against scipy's t interval
    diffs = [p - f for p, f in zip(plain, fl, strict=True)]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert c["more slowly than FL"].effect == pytest.approx(sum(diffs) / 3)
    assert c["more slowly than FL"].ci95 == pytest.approx((lo, hi))
    assert c["more slowly than FL"].status == "supported"
    # fast: per-seed ratios 1.33, 1.31, 1.54 against 1.5 (their interval straddles it)
    ratios = [a / b for a, b in zip(fixed, fl, strict=True)]
    assert c["about as fast"].effect == pytest.approx(sum(ratios) / 3)
    lo, hi = stats.t.interval(0.95, 2, loc=sum(ratios) / 3, scale=stats.sem(ratios))
    assert c["about as fast"].status == ("unresolved" if lo < 1.5 < hi else "supported")
    assert c["faster than plain"].status == "supported"
    assert c["faster than plain"].effect == pytest.approx((sum(fixed) - sum(plain)) / 3)


def test_censored_times_never_make_a_claim_look_better_than_it_is():
    # plain never reaches the target: counted as 1000 ticks, the lag is a lower bound, so the
    # "plain lags FL" support stands (the cap works against it)
    c = _by_name(report.claims(_results([300, 320, 280], [None] * 3, [400, 420, 430])))
    assert c["more slowly than FL"].status == "supported"
    assert c["more slowly than FL"].effect == pytest.approx(1000 - 300)
    assert "lower bound" in c["more slowly than FL"].detail
    assert c["faster than plain"].status == "supported"
    # corrected misses the target in one seed: its capped ratio could only look faster than
    # the truth, so "about as fast" cannot be supported even though every ratio is < 1.5
    c = _by_name(report.claims(_results([900, 920, 880], [None] * 3, [1000, 950, None])))
    ratios = [1000 / 900, 950 / 920, 1000 / 880]
    assert max(ratios) < 1.5
    assert c["about as fast"].status == "unresolved"
    assert "cannot support" in c["about as fast"].detail
    # FL misses the target: the ratio is undefined
    c = _by_name(report.claims(_results([None, 320, 280], [900] * 3, [400] * 3)))
    assert c["about as fast"].status == "unresolved" and "undefined" in c["about as fast"].detail
    # FL misses it in one seed and plain lags by the capped numbers (raw interval > 0): FL's
    # true time is longer than the cap, so the measured lag overstates it and cannot support
    c = _by_name(report.claims(_results([None] + [300] * 4, [1000] + [900] * 4, [400] * 5)))
    diffs = [0] + [600] * 4
    lo, _ = stats.t.interval(0.95, 4, loc=480, scale=stats.sem(diffs))
    assert lo > 0 and c["more slowly than FL"].effect == pytest.approx(480)
    assert c["more slowly than FL"].status == "unresolved"
    assert "cannot support" in c["more slowly than FL"].detail
    # both arms capped in some seeds: bounded neither way
    c = _by_name(report.claims(_results([None, 300, 300], [None, None, 900], [400] * 3)))
    assert c["more slowly than FL"].status == "unresolved"
    assert "bounded neither way" in c["more slowly than FL"].detail


def test_protocol_table_names_every_aspect_with_the_config_that_ran():
    table = report.protocol(asdict(GossipConfig.quick()))
    assert table.columns[:3] == ["aspect", "paper", "ours"]
    aspects = {row[0]: row for row in table.rows}
    for aspect in (
        "model",
        "data",
        "budget",
        "local training",
        "runs / seeds",
        "metrics",
        "merge and correction",
        "FL baseline",
        "nodes, graph",
        "protocol",
    ):
        assert aspect in aspects, aspect  # fmt: skip
    assert "800 ticks" in aspects["budget"][2]
    assert "lr 0.05" in aspects["local training"][2] and "lr 0.01" in aspects["local training"][1]
    assert "4 seeds" in aspects["runs / seeds"][2]
    assert "MLP" in aspects["model"][2] and "CNN" not in aspects["model"][2]
    full = {row[0]: row for row in report.protocol(asdict(GossipConfig.full())).rows}
    assert "CNN" in full["model"][2] and "3000 ticks" in full["budget"][2]
    for row in table.rows:
        assert all(isinstance(cell, str) and cell for cell in row)


def test_registered_and_config_errors():
    experiment = get("gossip")
    assert experiment.config(quick=True) == GossipConfig.quick()
    assert experiment.claims is report.claims and experiment.protocol is report.protocol
    assert not hasattr(report, "verdict")
    with pytest.raises(ValueError, match="methods"):
        GossipConfig(methods=("gossip-magic",))
    with pytest.raises(ValueError, match="ticks"):
        GossipConfig(ticks=10, eval_every=25)
