"""The verdict contract: each experiment states the paper's claims as data with an interval.

A claim is tested on a per-seed *effect* (the method's metric minus the baseline's, paired by
seed where both arms share seeds; or one quantity against a threshold). Its status follows from
a 95 % confidence interval for that effect, never from a difference of means alone:

- ``supported``: the interval lies wholly on the paper's side of the threshold (usually 0);
- ``contradicted``: it lies wholly on the other side;
- ``unresolved``: it straddles the threshold. ``detail`` then says the minimum detectable effect
  at this number of seeds (two-sided 5 % test, 80 % power) and how many seeds would resolve
  the paper's effect.

The report renders these records (one style per status) and writes its words from the status,
so what the page says and what ``results.json`` says can never disagree.

The Student-t quantiles are computed here (regularized incomplete beta by Lentz's continued
fraction, then bisection) rather than taken from scipy, so the tests can check them against
scipy.stats as an independent oracle.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "STATUSES",
    "Claim",
    "ProtocolRow",
    "protocol_table",
    "t_cdf",
    "t_quantile",
    "t_interval",
    "bootstrap_interval",
    "status_from_interval",
    "minimum_detectable_effect",
    "seeds_to_resolve",
    "paired_claim",
    "threshold_claim",
    "deterministic_claim",
    "validate_claim",
    "verdict_text",
]

Status = Literal["supported", "contradicted", "unresolved"]
Direction = Literal["greater", "less"]
STATUSES: tuple[str, ...] = ("supported", "contradicted", "unresolved")
_CONFIDENCE = 0.95
_POWER = 0.80


# --- Student t ---------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0; got {df}")
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t (bisection on `t_cdf`, to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --- intervals and status ----------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def t_interval(values: Sequence[float], confidence: float = _CONFIDENCE) -> tuple[float, float]:
    """Two-sided t interval for the mean of `values` (paired differences, or one arm)."""
    values = _finite(values, "values")
    if len(values) < 2:
        raise ValueError(f"a t interval needs at least 2 values; got {len(values)}")
    mean, sd = _mean_sd(values)
    half = t_quantile(0.5 + confidence / 2.0, len(values) - 1) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def bootstrap_interval(
    values: Sequence[float],
    confidence: float = _CONFIDENCE,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean (seeded, so reports are reproducible)."""
    values = _finite(values, "values")
    if len(values) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 values; got {len(values)}")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(n_resamples))
    alpha = (1.0 - confidence) / 2.0
    lo = means[max(0, math.floor(alpha * n_resamples))]
    hi = means[min(n_resamples - 1, math.ceil((1.0 - alpha) * n_resamples) - 1)]
    return lo, hi


def status_from_interval(
    ci95: tuple[float, float], threshold: float = 0.0, direction: Direction = "greater"
) -> Status:
    """Supported if the interval is wholly on the paper's side of `threshold`, contradicted if
    wholly on the other side, unresolved if it touches or straddles it."""
    lo, hi = ci95
    if direction == "greater":
        return "supported" if lo > threshold else "contradicted" if hi < threshold else "unresolved"
    if direction == "less":
        return "supported" if hi < threshold else "contradicted" if lo > threshold else "unresolved"
    raise ValueError(f"direction must be 'greater' or 'less'; got {direction!r}")


def minimum_detectable_effect(sd: float, n: int, power: float = _POWER) -> float:
    """Smallest true effect a two-sided 5 % one-sample t test detects with `power` at n seeds."""
    if n < 2 or not math.isfinite(sd):
        return float("inf")
    df = n - 1
    return (t_quantile(0.975, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def seeds_to_resolve(effect: float, sd: float, power: float = _POWER, max_n: int = 10_000) -> int:
    """Seeds needed for a true `effect` to be detected with `power` (same sd per seed)."""
    if not math.isfinite(sd) or effect == 0.0:
        return max_n
    if sd == 0.0:
        return 2
    # the detectable effect falls as n grows: bisect instead of scanning (each probe costs two
    # t quantiles by bisection; a scan to 10,000 took seconds per claim)
    if minimum_detectable_effect(sd, max_n, power) > abs(effect):
        return max_n
    lo, hi = 2, max_n
    while lo < hi:
        mid = (lo + hi) // 2
        if minimum_detectable_effect(sd, mid, power) <= abs(effect):
            hi = mid
        else:
            lo = mid + 1
    return lo


# --- the record --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and what our seeds say about it (the results.json contract)."""

    claim: str
    status: Status
    effect: float
    ci95: tuple[float, float]
    paper_effect: float | None
    n_seeds: int
    test: str
    detail: str

    def __post_init__(self) -> None:
        validate_claim(asdict(self))

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["ci95"] = list(self.ci95)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Claim:
        """The claim a results.json record holds (checked against the contract first)."""
        validate_claim(record)
        return cls(**{**record, "ci95": (record["ci95"][0], record["ci95"][1])})


def validate_claim(record: dict[str, Any]) -> None:
    """Raise ValueError naming the field unless `record` follows the claims contract."""
    expected = {"claim", "status", "effect", "ci95", "paper_effect", "n_seeds", "test", "detail"}
    keys = set(record)
    if keys != expected:
        raise ValueError(
            f"claim fields {sorted(keys)}; expected exactly {sorted(expected)} "
            f"(missing {sorted(expected - keys)}, extra {sorted(keys - expected)})"
        )
    for name in ("claim", "test", "detail"):
        if not isinstance(record[name], str) or not record[name].strip():
            raise ValueError(f"claim field {name!r} must be a non-empty string")
    if record["status"] not in STATUSES:
        raise ValueError(f"claim status must be one of {STATUSES}; got {record['status']!r}")
    if not _is_number(record["effect"]):
        raise ValueError(f"claim effect must be a finite number; got {record['effect']!r}")
    ci = record["ci95"]
    if not (isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(v) for v in ci)):
        raise ValueError(f"claim ci95 must be [lo, hi] of finite numbers; got {ci!r}")
    if ci[0] > ci[1]:
        raise ValueError(f"claim ci95 must have lo <= hi; got {ci!r}")
    if record["paper_effect"] is not None and not _is_number(record["paper_effect"]):
        raise ValueError(
            f"claim paper_effect must be a number or None; got {record['paper_effect']!r}"
        )
    n = record["n_seeds"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"claim n_seeds must be an int >= 1; got {n!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} must be finite; got {bad[:3]}")
    return out


def _fmt(x: float, unit: str) -> str:
    text = f"{x:+.3g}" if abs(x) < 100 else f"{x:+.0f}"
    return f"{text} {unit}".rstrip()


def _unresolved_detail(
    sd: float, n: int, paper_effect: float | None, observed: float, threshold: float, unit: str
) -> str:
    mde = minimum_detectable_effect(sd, n)
    target = paper_effect if paper_effect is not None else observed
    gap = abs(target - threshold)
    needed = seeds_to_resolve(gap, sd)
    which = "the paper's effect" if paper_effect is not None else "our observed effect"
    mde_text = f"{mde:.3g} {unit}".rstrip() if math.isfinite(mde) else "undefined (one seed)"
    needed_text = f">= {needed}" if needed < 10_000 else "more than 10,000"
    return (
        f"The interval includes the threshold ({threshold:g}). Minimum detectable effect at "
        f"{n} seeds (5 % two-sided, 80 % power): {mde_text}; {needed_text} seeds would resolve "
        f"{which} ({_fmt(target, unit)}) at this per-seed spread (sd {sd:.3g})."
    )


def _claim_from_values(
    claim: str,
    values: Sequence[float],
    *,
    paper_effect: float | None,
    threshold: float,
    direction: Direction,
    unit: str,
    test: str,
    detail: str,
    bootstrap: bool,
) -> Claim:
    values = _finite(values, f"effects of claim {claim!r}")
    if not values:
        raise ValueError(f"claim {claim!r} has no values")
    n = len(values)
    effect, sd = _mean_sd(values)
    if n < 2:
        return Claim(
            claim=claim,
            status="unresolved",
            effect=effect,
            ci95=(effect, effect),
            paper_effect=paper_effect,
            n_seeds=1,
            test=test + " (one seed: no interval)",
            detail=(detail + " " if detail else "")
            + "One seed gives no confidence interval, so the claim cannot be resolved; run "
            "at least 2 seeds (the full preset runs more).",
        )
    ci = bootstrap_interval(values) if bootstrap else t_interval(values)
    ci = (float(ci[0]), float(ci[1]))
    status = status_from_interval(ci, threshold, direction)
    text = detail
    if status == "unresolved":
        text = (detail + " " if detail else "") + _unresolved_detail(
            sd, n, paper_effect, effect, threshold, unit
        )
    return Claim(
        claim=claim,
        status=status,
        effect=effect,
        ci95=ci,
        paper_effect=paper_effect,
        n_seeds=n,
        test=test,
        detail=text or f"95 % interval [{ci[0]:.3g}, {ci[1]:.3g}] {unit}".rstrip(),
    )


def paired_claim(
    claim: str,
    method: Sequence[float],
    baseline: Sequence[float],
    *,
    paper_effect: float | None,
    threshold: float = 0.0,
    direction: Direction = "greater",
    unit: str = "",
    detail: str = "",
    bootstrap: bool = False,
) -> Claim:
    """A claim on `method - baseline`, paired by seed (same index = same seed).

    Supported when the 95 % interval of the mean paired difference lies beyond `threshold` in
    `direction` ("greater": the method's metric is higher; "less": lower, e.g. an error).
    `paper_effect` is the paper's difference in the same units (None if it gives none).
    """
    if len(method) != len(baseline):
        raise ValueError(
            f"paired claim {claim!r}: method has {len(method)} seeds, baseline {len(baseline)}; "
            "pair them by seed"
        )
    diffs = [float(a) - float(b) for a, b in zip(method, baseline, strict=True)]
    test = "paired bootstrap (percentile, 10,000 resamples)" if bootstrap else "paired t interval"
    return _claim_from_values(
        claim,
        diffs,
        paper_effect=paper_effect,
        threshold=threshold,
        direction=direction,
        unit=unit,
        test=test,
        detail=detail,
        bootstrap=bootstrap,
    )


def threshold_claim(
    claim: str,
    values: Sequence[float],
    *,
    threshold: float,
    paper_effect: float | None,
    direction: Direction = "greater",
    unit: str = "",
    detail: str = "",
    bootstrap: bool = False,
) -> Claim:
    """A claim on one per-seed quantity (a ratio, a gap) against `threshold`."""
    test = "bootstrap interval (percentile)" if bootstrap else "one-sample t interval"
    return _claim_from_values(
        claim,
        values,
        paper_effect=paper_effect,
        threshold=threshold,
        direction=direction,
        unit=unit,
        test=test + f" vs threshold {threshold:g}",
        detail=detail,
        bootstrap=bootstrap,
    )


def deterministic_claim(
    claim: str, effect: float, *, holds: bool, paper_effect: float | None, detail: str
) -> Claim:
    """A claim checked by a deterministic computation (no seed noise: e.g. a fixed start on a
    fixed function). Its interval is the point itself."""
    return Claim(
        claim=claim,
        status="supported" if holds else "contradicted",
        effect=float(effect),
        ci95=(float(effect), float(effect)),
        paper_effect=paper_effect,
        n_seeds=1,
        test="deterministic (no seed noise)",
        detail=detail,
    )


_STATUS_WORDS = {
    "supported": "SUPPORTED",
    "contradicted": "CONTRADICTED",
    "unresolved": "UNRESOLVED at this scale",
}


def verdict_text(claims: Sequence[Claim | dict[str, Any]]) -> str:
    """One line per claim, its words taken from the status (the report's plain-text verdict)."""
    lines = []
    for c in claims:
        record = c.to_json() if isinstance(c, Claim) else c
        lo, hi = record["ci95"]
        paper = record["paper_effect"]
        paper_text = "" if paper is None else f"; paper {paper:+.3g}"
        lines.append(
            f"{_STATUS_WORDS[record['status']]}: {record['claim']} — effect "
            f"{record['effect']:+.3g} [{lo:+.3g}, {hi:+.3g}] over {record['n_seeds']} seed(s)"
            f"{paper_text}."
        )
    return "\n".join(lines) if lines else "No claims could be tested from these results."


# --- protocol table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolRow:
    """One row of "paper protocol vs ours": why a deviation is needed, what it may change."""

    aspect: str
    paper: str
    ours: str
    why: str = field(default="same as the paper")


def protocol_table(rows: Sequence[ProtocolRow], caption: str = ""):
    """The rows as a report `Table` (aspect | paper | ours | why, and expected effect)."""
    from meanwise.experiments.base import Table

    for row in rows:
        if not isinstance(row, ProtocolRow):
            raise TypeError(f"protocol rows must be ProtocolRow; got {type(row).__name__}")
    return Table(
        columns=["aspect", "paper", "ours", "why it differs, and what it may change"],
        rows=[[r.aspect, r.paper, r.ours, r.why] for r in rows],
        caption=caption or "The paper's protocol against ours, row by row.",
    )
