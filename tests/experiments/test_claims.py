"""The verdict contract: t quantiles, intervals and statuses against scipy.stats."""

import math

import pytest
from scipy import stats

from meanwise.experiments import claims as C


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 99, 1000])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.8, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_and_cdf_match_scipy(df, p):
    assert C.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
    for t in (-3.0, -0.4, 0.0, 1.3, 6.0):
        assert C.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-10, abs=1e-14)


def _scipy_paired_interval(a, b):
    d = [x - y for x, y in zip(a, b, strict=True)]
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(0.95)
    return ci.low, ci.high, result.pvalue


def test_clear_win_is_supported():
    method = [97.9, 98.4, 98.1, 97.7, 98.3]
    baseline = [96.2, 96.5, 96.9, 96.0, 96.4]
    claim = C.paired_claim("m beats b", method, baseline, paper_effect=1.8, unit="points")
    lo, hi, p = _scipy_paired_interval(method, baseline)
    assert claim.ci95 == pytest.approx((lo, hi), rel=1e-9)
    assert p < 0.05 and claim.status == "supported"
    assert claim.effect == pytest.approx(sum(method) / 5 - sum(baseline) / 5)
    assert claim.n_seeds == 5 and claim.test == "paired t interval"


def test_clear_loss_is_contradicted():
    method = [90.1, 90.5, 89.8, 90.2]
    baseline = [92.0, 92.4, 91.9, 92.6]
    claim = C.paired_claim("m beats b", method, baseline, paper_effect=1.0)
    lo, hi, _ = _scipy_paired_interval(method, baseline)
    assert claim.ci95 == pytest.approx((lo, hi), rel=1e-9)
    assert hi < 0 and claim.status == "contradicted"


def test_within_noise_is_unresolved_and_says_how_many_seeds():
    # the old report's "does NOT hold" from a 0.08-point gap with ~1-point spreads
    method = [97.10, 98.70, 97.30]
    baseline = [97.90, 97.20, 97.76]
    claim = C.paired_claim("AdaBelief beats AdamW", method, baseline, paper_effect=0.85)
    lo, hi, p = _scipy_paired_interval(method, baseline)
    assert claim.ci95 == pytest.approx((lo, hi), rel=1e-9)
    assert p > 0.05 and lo < 0 < hi and claim.status == "unresolved"
    assert "Minimum detectable effect at 3 seeds" in claim.detail
    # the seeds-needed figure matches a power computation with scipy's noncentral t
    sd = stats.tstd([a - b for a, b in zip(method, baseline, strict=True)])
    needed = C.seeds_to_resolve(0.85, sd)
    assert f">= {needed} seeds" in claim.detail
    assert _power(0.85, sd, needed) >= 0.78  # the normal-approximation MDE is close to 80 %
    assert _power(0.85, sd, needed - 1) < 0.80 or needed == 2


def _power(effect, sd, n):
    df = n - 1
    crit = stats.t.ppf(0.975, df)
    nc = effect / (sd / math.sqrt(n))
    return 1 - stats.nct.cdf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


def test_less_direction_and_threshold():
    ratios = [1.1, 1.2, 1.15, 1.05]
    claim = C.threshold_claim(
        "as fast as FL", ratios, threshold=1.5, paper_effect=1.0, direction="less"
    )
    assert claim.status == "supported"
    ci = stats.ttest_1samp(ratios, 1.5).confidence_interval(0.95)
    assert claim.ci95 == pytest.approx((ci.low, ci.high), rel=1e-9)
    slow = C.threshold_claim(
        "as fast", [2.0, 2.2, 2.1], threshold=1.5, paper_effect=1.0, direction="less"
    )
    assert slow.status == "contradicted"


def test_bootstrap_interval_agrees_with_scipy_bootstrap():
    values = [0.3, -0.1, 0.8, 0.5, 0.2, 0.9, 0.4, 0.0]
    lo, hi = C.bootstrap_interval(values, n_resamples=20_000)
    ref = stats.bootstrap(
        (values,),
        lambda x: sum(x) / len(x),
        vectorized=False,
        n_resamples=20_000,
        method="percentile",
        random_state=0,
    )
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.03)


def test_one_seed_is_unresolved_and_contract_is_validated():
    claim = C.paired_claim("x", [1.0], [0.0], paper_effect=None)
    assert claim.status == "unresolved" and claim.n_seeds == 1
    C.validate_claim(claim.to_json())
    bad = claim.to_json() | {"status": "HOLDS"}
    with pytest.raises(ValueError, match="status"):
        C.validate_claim(bad)
    with pytest.raises(ValueError, match="ci95"):
        C.validate_claim(claim.to_json() | {"ci95": [2.0, 1.0]})
    with pytest.raises(ValueError, match="missing"):
        C.validate_claim({"claim": "x"})
    with pytest.raises(ValueError, match="pair them by seed"):
        C.paired_claim("x", [1.0, 2.0], [1.0], paper_effect=None)
    with pytest.raises(ValueError, match="finite"):
        C.paired_claim("x", [1.0, float("nan")], [1.0, 2.0], paper_effect=None)


def test_verdict_text_words_come_from_status():
    claims = [
        C.paired_claim("a", [2.0, 2.1, 2.2], [1.0, 1.0, 1.1], paper_effect=1.0),
        C.paired_claim("b", [1.0, 1.0, 1.1], [2.0, 2.1, 2.2], paper_effect=1.0),
        C.paired_claim("c", [1.0, 2.0, 0.5], [1.5, 1.0, 1.0], paper_effect=1.0),
        C.deterministic_claim("d", 0.0, holds=True, paper_effect=None, detail="exact"),
    ]
    text = C.verdict_text(claims).splitlines()
    assert [line.split(":")[0] for line in text] == [
        "SUPPORTED",
        "CONTRADICTED",
        "UNRESOLVED at this scale",
        "SUPPORTED",
    ]
