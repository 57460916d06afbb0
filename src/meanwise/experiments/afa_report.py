"""What the report says about experiment `afa`: the paper's claims, the paper's setting, our
tables and figures, the claims with intervals and the protocol, from results in their JSON form
(lists of dicts), read through the typed records of `afa_results`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from meanwise.experiments.afa_results import AFAResult, AFARun
from meanwise.experiments.base import FigureSpec, Table, format_mean_std, from_json, mean_std
from meanwise.experiments.claims import (
    Claim,
    ProtocolRow,
    paired_claim,
    protocol_table,
    threshold_claim,
)

__all__ = [
    "PAPER",
    "CLAIM",
    "PUBLISHED",
    "summarize",
    "metrics",
    "figures",
    "claims",
    "protocol",
]

JSON = dict[str, Any]

PAPER = (
    "Yang, Zhang, Khanduri & Liu, Anarchic Federated Learning, ICML 2022 (AFA-CD and AFA-CS; "
    "no public code from the authors)"
)

CLAIM = (
    "Workers that choose when to take part and how many local steps K_i to run (and return "
    "updates computed on models up to a bounded number of versions old) are safe with AFA: "
    "the two-sided learning rates and the step-normalized update G_i = (x_start − y_i)/(η_L "
    "K_i) make it converge under arbitrary local steps and participation, with a linear "
    "speedup in the number m of workers per round. AFA-CD (cross-device: mean of the round's "
    "arrivals) keeps a non-vanishing error term under heterogeneous data and non-uniform "
    "arrivals; AFA-CS (cross-silo: mean of every worker's latest update) does not. Here: "
    "FedProx Synthetic(1, 1), one user per worker, L2-regularised logistic regression, whose "
    "exact minimum f* gives each method's excess objective f(x) − f*; FedAvg on raw deltas "
    "(which weights a worker by its step count) as the reference."
)

PUBLISHED = [
    Table(
        columns=["claim (the paper's theorems)", "what we measure"],
        rows=[
            [
                "AFA-CD/CS converge under arbitrary K_i and participation (bounded delay)",
                "excess objective of the iterate average, as a fraction of its start",
            ],
            [
                "AFA-CS has no heterogeneity bias; AFA-CD keeps one under non-uniform arrivals",
                "excess objective of the iterate average: AFA-CS below AFA-CD, paired by seed",
            ],
            [
                "linear speedup in the number m of workers per round (η ∝ sqrt(m K))",
                "slope of log(rounds of AFA-CD to the target) against log m (linear: −1)",
            ],
        ],
        caption="The paper's results are convergence rates, not a table of numbers; no public "
        "code from the authors is known (REFERENCES.md).",
    )
]

_METHOD_ORDER = ("AFA-CD", "AFA-CS", "FedAvg")


def _typed(results: list[JSON]) -> list[AFAResult]:
    return [AFAResult.from_json(r) for r in results]


def _config(config: JSON):
    """The config that ran, typed (imported here: `afa` imports this module to register)."""
    from meanwise.experiments.afa import AFAConfig

    return from_json(AFAConfig, config)


def _chosen(results: list[AFAResult]) -> dict[str, list[AFARun]]:
    """Each method's chosen run per seed (seed order kept, so lists pair by index)."""
    out: dict[str, list[AFARun]] = {}
    for result in results:
        for r in result.runs:
            if r.chosen:
                out.setdefault(r.method, []).append(r)
    return {m: out[m] for m in _METHOD_ORDER if m in out}


def _paired(results: list[AFAResult], a: str, b: str) -> tuple[list[float], list[float]]:
    """Tail-averaged excess of methods a and b on the seeds that ran both."""
    xs, ys = [], []
    for result in results:
        chosen = {r.method: r for r in result.runs if r.chosen}
        if a in chosen and b in chosen:
            xs.append(chosen[a].tail_average_excess)
            ys.append(chosen[b].tail_average_excess)
    return xs, ys


def _logs(values: list[float]) -> list[float]:
    # an excess objective is >= 0; the floor only guards an L-BFGS f* a hair above the minimum
    return [math.log(max(v, 1e-12)) for v in values]


def _speedup(results: list[AFAResult]) -> dict[int, list[AFARun]]:
    out: dict[int, list[AFARun]] = {}
    for result in results:
        for r in result.speedup:
            out.setdefault(r.arrivals_per_round, []).append(r)
    return dict(sorted(out.items()))


def _predicted(results: list[AFAResult], method: str) -> list[float]:
    # an excess objective is >= 0: a value a hair below is the L-BFGS tolerance of f*
    return [max(r.predicted_bias[method], 0.0) for r in results if method in r.predicted_bias]


def _ratio(results: list[AFAResult], method: str) -> list[float]:
    """Tail-averaged excess / initial excess per seed (small = converged)."""
    out = []
    for result in results:
        for r in result.runs:
            if r.chosen and r.method == method:
                out.append(r.tail_average_excess / result.initial_excess)
    return out


def _rounds_to_target(runs: list[AFARun]) -> float | None:
    """Mean over seeds of the rounds to the target; None if some seed never reached it."""
    values = [r.rounds_to_target for r in runs]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _speedup_slopes(results: list[AFAResult]) -> tuple[list[float], int]:
    """Per seed, the least-squares slope of log(rounds to target) on log m, and how many runs
    never reached the target (counted as reaching it at the last round: a censored value
    that can only flatten the slope)."""
    slopes, censored = [], 0
    for result in results:
        runs = result.speedup
        if len(runs) < 2:
            continue
        xs, ys = [], []
        for r in runs:
            reached = r.rounds_to_target
            if reached is None:
                censored += 1
                reached = r.rounds[-1] if r.rounds else 1
            xs.append(math.log(r.arrivals_per_round))
            ys.append(math.log(reached))
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx > 0:
            slopes.append(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx)
    return slopes, censored


def summarize(results: list[JSON]) -> list[Table]:
    """The method comparison (measured vs predicted bias), the CD − CS gap, the speedup in m,
    and the arrivals the workers produced."""
    results = _typed(results)
    tables = []
    chosen = _chosen(results)
    if chosen:
        rows = [
            [
                method,
                format_mean_std([r.final_excess for r in runs], digits=4),
                format_mean_std([r.tail_average_excess for r in runs], digits=4),
                format_mean_std(_predicted(results, method), digits=4),
                format_mean_std(_ratio(results, method), digits=4),
                format_mean_std([r.final_test_acc for r in runs]),
                ", ".join(sorted({f"{r.server_lr:.3g}" for r in runs}, key=float)),
            ]
            for method, runs in chosen.items()
        ]
        rounds = next(iter(chosen.values()))[0].rounds
        tables.append(
            Table(
                columns=[
                    "method",
                    "last iterates: f − f*",
                    "iterate average: f − f* (measured bias)",
                    "predicted bias",
                    "iterate average / initial excess",
                    "test acc (%, per-worker mean)",
                    "server lr (base; halved on schedule)",
                ],
                rows=rows,
                caption=f"{results[0].n_workers} anarchic workers, "
                f"{rounds[-1] if rounds else '?'} rounds; last iterates = mean of the last "
                "evaluations; iterate average = f − f* at the mean of the iterates of the last "
                "averaging window (with the halved server rate this removes most of the "
                "stochastic noise and keeps the bias). Predicted bias = f − f* where the rule's "
                "expected direction vanishes: the minimizer of the objective weighted as the "
                "rule weights workers (AFA-CD: per-round arrival shares; FedAvg: shares × K_i; "
                "AFA-CS: 1 per live memory entry, 0 for a starved worker, a frozen entry as a "
                "constant), without local drift or memory lag (see afa.py). "
                f"Mean ± std over {len(results)} seed(s).",
            )
        )
    cd, cs = _paired(results, "AFA-CD", "AFA-CS")
    if cd:
        gap_measured = [a - b for a, b in zip(cd, cs, strict=True)]
        gap_predicted = [
            r.predicted_bias["AFA-CD"] - r.predicted_bias["AFA-CS"]
            for r in results
            if {"AFA-CD", "AFA-CS"} <= set(r.predicted_bias)
        ]
        wins = sum(g > 0 for g in gap_measured)
        tables.append(
            Table(
                columns=["quantity", "value"],
                rows=[
                    [
                        "AFA-CD − AFA-CS, measured (iterate average)",
                        format_mean_std(gap_measured, 4),
                    ],
                    ["AFA-CD − AFA-CS, predicted", format_mean_std(gap_predicted, 4)],
                    ["seeds where AFA-CS ends below AFA-CD", f"{wins} of {len(gap_measured)}"],
                ],
                caption="The bias AFA-CS removes, paired by seed (same data, arrivals and "
                "minibatches for both rules).",
            )
        )
    speedup = _speedup(results)
    if speedup:
        reached_all = [_rounds_to_target(runs) for runs in speedup.values()]
        base = next((v for v in reached_all if v is not None), None)
        rows = []
        for m, runs in speedup.items():
            reached = _rounds_to_target(runs)
            ratio = "" if reached is None or base is None else f"{base / reached:.2f}x"
            rows.append(
                [
                    str(m),
                    ", ".join(sorted({f"{r.server_lr:.3g}" for r in runs}, key=float)),
                    "not reached" if reached is None else f"{reached:.0f}",
                    ratio,
                    format_mean_std([r.tail_average_excess for r in runs], digits=4),
                ]
            )
        slopes, censored = _speedup_slopes(results)
        tables.append(
            Table(
                columns=[
                    "m (arrivals / round)",
                    "server lr (base)",
                    "rounds to target",
                    "speedup vs the smallest m that reached it",
                    "iterate average: f − f*",
                ],
                rows=rows,
                caption="AFA-CD with m arrivals per round, server rate scaled by sqrt(m); "
                "target: excess objective ≤ a fixed fraction of its initial value (see the "
                "config). 'not reached': some seed did not reach it within the run. Slope of "
                f"log(rounds) on log m per seed: {format_mean_std(slopes, 3)} (linear speedup: "
                f"−1; {censored} censored run(s)).",
            )
        )
    if results and results[0].arrival_counts:
        counts = torch.tensor([r.arrival_counts for r in results], dtype=torch.float64)
        per_seed_ratio = [
            float(c.max() / c.min()) if float(c.min()) > 0 else float("inf") for c in counts
        ]
        tables.append(
            Table(
                columns=["statistic", "value"],
                rows=[
                    ["arrivals of the busiest / rarest worker", format_mean_std(per_seed_ratio)],
                    [
                        "workers never accepted (starved)",
                        format_mean_std([r.never_arrived for r in results]),
                    ],
                    [
                        "rounds that waited for a worker at the delay bound",
                        format_mean_std([r.waited_rounds for r in results]),
                    ],
                    [
                        "updates discarded as too stale",
                        format_mean_std([r.rejected_stale for r in results]),
                    ],
                    [
                        "mean staleness of an arrival (versions)",
                        format_mean_std([r.mean_staleness for r in results]),
                    ],
                    [
                        "local steps K_i (first seed)",
                        " ".join(str(k) for k in results[0].local_steps),
                    ],
                ],
                caption="How anarchic the workers were (the main comparison's m).",
            )
        )
    return tables


def metrics(results: list[JSON]) -> dict[str, float]:
    results = _typed(results)
    out: dict[str, float] = {}
    for method, runs in _chosen(results).items():
        out[f"{method}.final_excess.mean"] = mean_std([r.final_excess for r in runs])[0]
        out[f"{method}.tail_average_excess.mean"] = mean_std([r.tail_average_excess for r in runs])[
            0
        ]
        out[f"{method}.final_test_acc.mean"] = mean_std([r.final_test_acc for r in runs])[0]
    for m, runs in _speedup(results).items():
        reached = _rounds_to_target(runs)
        out[f"speedup.m{m}.rounds_to_target"] = float("nan") if reached is None else reached
    return out


def claims(results: list[JSON]) -> list[Claim]:
    """The paper's claims, each with a 95 % interval over seeds (paired where both arms ran)."""
    results = _typed(results)
    out: list[Claim] = []
    chosen = _chosen(results)
    for method in ("AFA-CD", "AFA-CS"):
        ratios = _ratio(results, method)
        if ratios:
            out.append(
                threshold_claim(
                    f"{method} converges under arbitrary local steps and participation",
                    ratios,
                    threshold=0.1,
                    direction="less",
                    paper_effect=None,
                    unit="× initial excess",
                    detail=f"{method}'s iterate-average excess objective f − f* as a fraction "
                    "of the initial one, per seed; criterion: below 0.1 (the paper proves a "
                    "rate, not a number; for AFA-CD to a neighbourhood set by its bias).",
                )
            )
    # Both comparisons on the log of the excess objective: each seed draws new data, and the
    # excess levels differ several-fold between seeds while the rules' ratio is steadier, so
    # the paired difference of logs (log of the ratio) is the per-seed effect
    cd, cs = _paired(results, "AFA-CD", "AFA-CS")
    if cd:
        gaps = [
            r.predicted_bias["AFA-CD"] - r.predicted_bias["AFA-CS"]
            for r in results
            if {"AFA-CD", "AFA-CS"} <= set(r.predicted_bias)
        ]
        difference = mean_std([b - a for a, b in zip(cd, cs, strict=True)])[0]
        predicted = (
            f", predicted from the arrival weights {-mean_std(gaps)[0]:+.4g}" if gaps else ""
        )
        out.append(
            paired_claim(
                "AFA-CS removes the heterogeneity bias AFA-CD keeps under non-uniform arrivals",
                _logs(cs),
                _logs(cd),
                paper_effect=None,
                direction="less",
                unit="log(AFA-CS / AFA-CD)",
                detail="log of AFA-CS's over AFA-CD's excess objective f − f* of the iterate "
                "average (server rate halved on schedule), paired by seed: the same data, "
                f"arrivals and minibatches. Mean ratio exp(effect); mean difference "
                f"{difference:+.4g} in f − f*{predicted}.",
            )
        )
    if "AFA-CD" in chosen and "FedAvg" in chosen:
        cd_f, fedavg = _paired(results, "AFA-CD", "FedAvg")
        difference = mean_std([a - b for a, b in zip(cd_f, fedavg, strict=True)])[0]
        out.append(
            paired_claim(
                "Step-normalized AFA-CD avoids FedAvg's weighting of workers by K_i",
                _logs(cd_f),
                _logs(fedavg),
                paper_effect=None,
                direction="less",
                unit="log(AFA-CD / FedAvg)",
                detail="log of AFA-CD's over FedAvg-on-raw-deltas' excess objective of the "
                f"iterate average, paired by seed (mean difference {difference:+.4g} in "
                "f − f*). The reason the paper normalizes updates by K_i; both rules keep an "
                "arrival-frequency bias.",
            )
        )
    slopes, censored = _speedup_slopes(results)
    if slopes:
        ms = sorted(_speedup(results))
        out.append(
            threshold_claim(
                "Speedup in the number m of workers per round (linear: rounds ∝ 1/m)",
                slopes,
                threshold=0.0,
                direction="less",
                paper_effect=-1.0,
                unit="d log(rounds) / d log m",
                detail=f"Per seed, the slope of log(rounds of AFA-CD to the target) on log m "
                f"for m in {ms} (server rate ∝ sqrt(m)); supported if the slope is negative, "
                f"the paper's linear speedup is −1; {censored} run(s) never reached the target "
                "and count as reaching it at the last round.",
            )
        )
    return out


def protocol(config: JSON) -> Table:
    """The paper's protocol against ours, with the config that ran."""
    c = _config(config)
    seeds = c.seeds
    rounds = c.rounds
    rows = [
        ProtocolRow(
            "model",
            "neural networks and convex models on real-world data (the paper's experiments)",
            f"multinomial logistic regression (nn.Linear 60 → 10), L2 {c.weight_decay}",
            "convex with an exact minimum f*, so each rule's bias is measurable as f − f* "
            "(the theorems' quantity); a network's bias would hide in its non-convexity",
        ),
        ProtocolRow(
            "data",
            "real-world datasets split heterogeneously over workers",
            f"FedProx Synthetic({c.synthetic_alpha}, {c.synthetic_beta}), "
            f"{c.n_workers} workers, one user each",
            "generated offline in seconds, strongly heterogeneous (what makes AFA-CD biased)",
        ),
        ProtocolRow(
            "budget",
            "long training runs (convergence rates in T)",
            f"{rounds} rounds",
            "2 CPU cores; enough for the halved rate to reach the bias level",
        ),
        ProtocolRow(
            "optimizer and schedule",
            "local SGD at η_L, server rate η (theory: η = sqrt(mK), η_L = 1/(sqrt(T) K))",
            f"local SGD lr {c.local_lr}, batch {c.batch_size}; server "
            "rate (K_max + 1)/2 × "
            f"{list(c.server_lr_multipliers)} (FedAvg 1 ×), halved every "
            f"{c.lr_halving} rounds; iterate average over the last "
            f"{c.average_rounds} rounds",
            "with a fixed rate the noise floor is ~10× the CD-vs-CS bias; the halving and "
            "the average bring it below. A fixed η_L keeps a small local-drift term for both "
            "rules",
        ),
        ProtocolRow(
            "participation",
            "workers choose when to arrive; a round takes m arrivals; delays bounded by τ",
            f"event-driven workers, log-speed spread {c.speed_spread}, log-idle "
            f"spread {c.idle_spread}, m = {c.arrivals_per_round}, τ = "
            f"{c.max_staleness}; "
            + (
                "updates staler than τ discarded (opt-in)"
                if c.discard_stale
                else "a round waits for a worker at the bound (every worker arrives)"
            ),
            "the paper assumes bounded delays and says nothing about discarding; waiting "
            "implements the bound without starving slow workers",
        ),
        ProtocolRow(
            "local steps",
            "K_i chosen by each worker, arbitrary",
            f"K_i fixed per worker, uniform in 1..{c.max_local_steps}",
            "fixed per worker makes FedAvg's K_i weighting visible; any K_i is allowed by "
            "the theory",
        ),
        ProtocolRow(
            "seeds",
            "repetitions not recorded in REFERENCES.md",
            f"{seeds} seed(s), each new data, arrivals, initialization and minibatches",
            "claims are paired by seed with a 95 % t interval",
        ),
        ProtocolRow(
            "metric",
            "training loss / test accuracy curves",
            "excess objective f − f* of the iterate average (and test accuracy)",
            "f* is exact for the convex model, so the bias is measured, not inferred",
        ),
        ProtocolRow(
            "speedup",
            "linear speedup in m (and K) with η ∝ sqrt(mK)",
            f"AFA-CD for m in {list(c.speedup_arrivals)}, server rate ∝ sqrt(m), "
            f"rounds to {c.speedup_target} × the initial excess",
            "rounds to a target is the practical reading of the rate; K is not varied",
        ),
    ]
    return protocol_table(rows, "AFA: the paper's protocol against ours (the config that ran).")


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    """Excess objective curves of the methods and of AFA-CD for every m."""
    results = _typed(results)

    def draw(fig) -> None:
        left, right = fig.subplots(1, 2)
        for i, (method, runs) in enumerate(_chosen(results).items()):
            length = min(len(r.excess) for r in runs)
            curve = torch.tensor([r.excess[:length] for r in runs]).mean(0)
            left.semilogy(runs[0].rounds[:length], curve, color=f"C{i}", label=method)
            predicted = _predicted(results, method)
            if predicted and mean_std(predicted)[0] > 0:
                left.axhline(mean_std(predicted)[0], color=f"C{i}", ls=":", lw=1)
        left.set(title="f(x) − f* (mean over seeds; dotted: predicted bias)", xlabel="round")
        left.legend(fontsize=7)
        for i, (m, runs) in enumerate(_speedup(results).items()):
            length = min(len(r.excess) for r in runs)
            curve = torch.tensor([r.excess[:length] for r in runs]).mean(0)
            right.semilogy(runs[0].rounds[:length], curve, color=f"C{i}", label=f"m = {m}")
        right.set(title="AFA-CD, m arrivals per round", xlabel="round")
        right.legend(fontsize=7)

    if not results:
        return []
    return [FigureSpec("afa-curves", "Excess objective over rounds.", draw, size=(11.0, 3.6))]
