"""What the report says about experiment `fedau`: claim, the paper's setting, our tables,
figures and the verdict. Everything here reads results in their JSON form (lists of dicts), so
a report can be rebuilt from cached results.
"""

from __future__ import annotations

from typing import Any

import torch

from meanwise.experiments.base import FigureSpec, Table, format_mean_std, mean_std

__all__ = [
    "PAPER",
    "CLAIM",
    "PUBLISHED",
    "CLOSE_POINTS",
    "summarize",
    "metrics",
    "figures",
    "verdict",
]

JSON = dict[str, Any]

PAPER = (
    "Wang & Ji, A Lightweight Method for Tackling Unknown Participation Statistics in "
    "Federated Averaging (FedAU), NeurIPS 2023"
)

CLAIM = (
    "When clients participate with heterogeneous, unknown probabilities (correlated with their "
    "data) under Bernoulli, Markov or cyclic patterns, FedAU (weights = online mean of each "
    "client's participation intervals, an estimate of 1/p_n, O(N) memory) beats FedAvg over "
    "participants and FedAvg over all clients under every pattern, and comes close to the "
    "oracle that knows p_n and to MIFA, which stores one update per client (N times the model "
    "memory). Here: N = 100 clients, digits split by Dirichlet(0.1) with an MLP and FedProx "
    "Synthetic(1, 1) with logistic regression, instead of the paper's image datasets and CNNs."
)

#: FedAU 'comes close' to the oracle / MIFA if its accuracy is at most this many points lower
CLOSE_POINTS = 1.0

PUBLISHED = [
    Table(
        columns=["setting", "the paper's value"],
        rows=[
            ["clients N", "250"],
            ["local steps I / batch / local lr / global lr", "5 / 16 / 0.1 / 1 (tuned per method)"],
            ["data split", "Dirichlet(0.1) over labels"],
            ["participation", "p_n = max(0.02, 0.1·C·⟨π_n, d⟩), d ~ Dirichlet(0.1)"],
            ["patterns", "Bernoulli; Markov (rate 0.05); cyclic (period 100)"],
            ["datasets", "FashionMNIST, SVHN, CIFAR-10, CIFAR-100, CINIC-10 (small CNNs)"],
            [
                "finding",
                "FedAU > FedAvg (participants) and FedAvg (all) under every pattern; FedAU "
                "close to known-p and MIFA / FedVARP",
            ],
        ],
        caption="The paper's setting and finding (REFERENCES.md). Its per-dataset accuracy "
        "tables are on image CNNs we do not run, so no number of ours is comparable to them.",
    )
]

_MEMORY = {
    "FedAU": "O(N) scalars",
    "FedAU-K50": "O(N) scalars",
    "FedAvg-participants": "none",
    "FedAvg-all": "none",
    "Known-p": "needs p_n (oracle)",
    "MIFA": "N model-sized updates",
}


# --- helpers ---------------------------------------------------------------------------------


def _settings(results: list[JSON]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for result in results:
        for s in result.get("settings", []):
            seen[(s["dataset"], s["pattern"])] = None
    return list(seen)


def _chosen(results: list[JSON]) -> dict[tuple[str, str, str], list[JSON]]:
    """(dataset, pattern, method) → the chosen-rate run of every seed."""
    out: dict[tuple[str, str, str], list[JSON]] = {}
    for result in results:
        for s in result.get("settings", []):
            for r in s["runs"]:
                if r["chosen"]:
                    out.setdefault((s["dataset"], s["pattern"], r["method"]), []).append(r)
    return out


def _methods(chosen: dict[tuple[str, str, str], list[JSON]], dataset: str, pattern: str):
    return [m for (d, p, m) in chosen if d == dataset and p == pattern]


def _acc(runs: list[JSON]) -> list[float]:
    return [r["final_test_acc"] for r in runs]


def _weight_error(results: list[JSON], dataset: str, pattern: str) -> tuple[float, float]:
    """Median over clients and seeds of |ω_n·p_n − 1| (FedAU) and |1·p_n − 1| (FedAvg-all).

    FedAvg over all clients gives every participant weight 1, i.e. 1/N Σ_S Δ_n, whose
    expectation weights client n by p_n instead of 1: rare clients are under-weighted by p_n.
    """
    fedau, fedavg = [], []
    for result in results:
        for s in result.get("settings", []):
            if (s["dataset"], s["pattern"]) != (dataset, pattern) or not s["fedau_weights"]:
                continue
            p = torch.tensor(s["probs"], dtype=torch.float64)
            w = torch.tensor(s["fedau_weights"], dtype=torch.float64)
            seen = w > 0
            fedau.append((w[seen] * p[seen] - 1).abs())
            fedavg.append((p - 1).abs())
    if not fedau:
        return float("nan"), float("nan")
    return float(torch.cat(fedau).median()), float(torch.cat(fedavg).median())


# --- tables and metrics --------------------------------------------------------------------------


def summarize(results: list[JSON]) -> list[Table]:
    """One table per (dataset, pattern), and one table of FedAU's weights against 1/p_n."""
    chosen = _chosen(results)
    tables = []
    first = results[0] if results else {}
    for dataset, pattern in _settings(results):
        methods = _methods(chosen, dataset, pattern)
        means = {m: mean_std(_acc(chosen[(dataset, pattern, m)]))[0] for m in methods}
        ranking = sorted(means, key=means.get, reverse=True)
        rows = []
        for method in methods:
            runs = chosen[(dataset, pattern, method)]
            rates = sorted({f"{r['server_lr']:.3g}" for r in runs}, key=float)
            rows.append(
                [
                    method,
                    format_mean_std(_acc(runs)),
                    format_mean_std([r["final_objective"] for r in runs], digits=4),
                    str(ranking.index(method) + 1),
                    ", ".join(rates),
                    _MEMORY.get(method, ""),
                ]
            )
        tables.append(
            Table(
                columns=[
                    "method",
                    "final test acc (%)",
                    "final train objective",
                    "rank",
                    "server lr chosen",
                    "extra server memory",
                ],
                rows=rows,
                caption=f"{dataset}, {pattern} participation, N = {first.get('n_clients', '?')}, "
                f"{first.get('rounds', '?')} rounds; final = mean of the last evaluations; "
                "server rate chosen per seed from the grid by the lowest training objective "
                "1/N Σ_n f_n (never by test accuracy); mean ± std over "
                f"{len(results)} seed(s).",
            )
        )
    rows = []
    for dataset, pattern in _settings(results):
        fedau, fedavg = _weight_error(results, dataset, pattern)
        rows.append([dataset, pattern, f"{fedau:.3f}", f"{fedavg:.3f}"])
    if rows:
        tables.append(
            Table(
                columns=[
                    "dataset",
                    "pattern",
                    "FedAU median |ω_n p_n − 1|",
                    "FedAvg(all) median |p_n − 1|",
                ],
                rows=rows,
                caption="How far each rule's effective weight is from the unbiased 1/p_n at the "
                "end of training (0 = exact). FedAvg over all clients weights client n by p_n "
                "in expectation, under-weighting rare clients; FedAU's interval means estimate "
                "1/p_n (clients never seen are left out).",
            )
        )
    return tables


def metrics(results: list[JSON]) -> dict[str, float]:
    """Headline numbers, flat, for scripts that read results.json."""
    out: dict[str, float] = {}
    for (dataset, pattern, method), runs in _chosen(results).items():
        mean, std = mean_std(_acc(runs))
        out[f"{dataset}.{pattern}.{method}.final_test_acc.mean"] = mean
        out[f"{dataset}.{pattern}.{method}.final_test_acc.std"] = std
        out[f"{dataset}.{pattern}.{method}.final_objective.mean"] = mean_std(
            [r["final_objective"] for r in runs]
        )[0]
    for dataset, pattern in _settings(results):
        out[f"{dataset}.{pattern}.fedau_weight_error"] = _weight_error(results, dataset, pattern)[0]
    return out


# --- verdict -------------------------------------------------------------------------------------


def _variant_verdict(
    accs: dict[str, list[float]], objectives: dict[str, list[float]], fedau: str
) -> str:
    mean = {m: mean_std(v)[0] for m, v in accs.items()}
    parts = []
    baselines = [m for m in ("FedAvg-participants", "FedAvg-all") if m in mean]
    if baselines:
        not_beaten = [m for m in baselines if mean[m] >= mean[fedau]]
        if not_beaten:
            parts.append(
                f"{fedau} beats both FedAvg variants: does NOT hold (not above {not_beaten})"
            )
        else:
            margin = min(mean[fedau] - mean[m] for m in baselines)
            spread = max(mean_std(accs[m])[1] for m in [fedau, *baselines])
            text = f"{fedau} beats both FedAvg variants: HOLDS (by ≥ {margin:.2f} points)"
            if len(accs[fedau]) > 1 and margin < spread:
                text += ", but by less than the seed-to-seed std, so not a clear result"
            parts.append(text)
    references = [m for m in ("Known-p", "MIFA") if m in mean]
    if references:
        far = [m for m in references if mean[m] - mean[fedau] > CLOSE_POINTS]
        gaps = ", ".join(f"{m} {mean[m] - mean[fedau]:+.2f}" for m in references)
        outcome = "does NOT hold" if far else "HOLDS"
        parts.append(
            f"{fedau} within {CLOSE_POINTS:g} point of Known-p and MIFA: {outcome} "
            f"(their lead over {fedau}: {gaps})"
        )
    if baselines:
        # the objective FedAU targets, 1/N Σ_n f_n: often separates methods whose test
        # accuracy has saturated
        obj = {m: mean_std(v)[0] for m, v in objectives.items()}
        lower = all(obj[fedau] < obj[m] for m in baselines)
        values = ", ".join(f"{m} {obj[m]:.4f}" for m in [fedau, *baselines])
        parts.append(
            f"{fedau} has a lower training objective than both FedAvg variants: "
            f"{'HOLDS' if lower else 'does NOT hold'} ({values})"
        )
    return "; ".join(parts)


def _setting_verdict(chosen, dataset: str, pattern: str) -> str | None:
    methods = _methods(chosen, dataset, pattern)
    variants = [m for m in ("FedAU", "FedAU-K50") if m in methods]
    if not variants:
        return None
    accs = {m: _acc(chosen[(dataset, pattern, m)]) for m in methods}
    objectives = {m: [r["final_objective"] for r in chosen[(dataset, pattern, m)]] for m in methods}
    numbers = ", ".join(f"{m} {format_mean_std(accs[m])}%" for m in methods)
    verdicts = "; ".join(_variant_verdict(accs, objectives, v) for v in variants)
    return f"{dataset}, {pattern}: {verdicts}. ({numbers})"


def verdict(results: list[JSON]) -> str:
    """One line per (dataset, pattern), each claim saying HOLDS / does NOT hold here."""
    chosen = _chosen(results)
    lines = [
        line
        for dataset, pattern in _settings(results)
        if (line := _setting_verdict(chosen, dataset, pattern)) is not None
    ]
    return "\n".join(lines) if lines else "No comparable runs in these results."


# --- figures -------------------------------------------------------------------------------------


def _draw_curves(results: list[JSON], dataset: str):
    def draw(fig) -> None:
        chosen = _chosen(results)
        patterns = [p for d, p in _settings(results) if d == dataset]
        axes = fig.subplots(1, len(patterns), squeeze=False)[0]
        for ax, pattern in zip(axes, patterns, strict=True):
            for i, method in enumerate(_methods(chosen, dataset, pattern)):
                runs = chosen[(dataset, pattern, method)]
                length = min(len(r["test_acc"]) for r in runs)
                acc = torch.tensor([r["test_acc"][:length] for r in runs], dtype=torch.float64)
                ax.plot(runs[0]["rounds"][:length], acc.mean(0), color=f"C{i}", label=method)
            ax.set(title=f"{dataset}, {pattern}", xlabel="round", ylabel="test acc (%)")
            low = min(line.get_ydata().min() for line in ax.get_lines()) if ax.get_lines() else 0
            ax.set_ylim(max(low, 50.0), 100.0)
        axes[0].legend(fontsize=7)

    return draw


def _draw_weights(results: list[JSON]):
    def draw(fig) -> None:
        settings = [s for s in (results[0].get("settings", []) if results else [])]
        settings = [s for s in settings if s["fedau_weights"]]
        axes = fig.subplots(1, max(1, len(settings)), squeeze=False)[0]
        for ax, s in zip(axes, settings, strict=False):
            p = torch.tensor(s["probs"], dtype=torch.float64)
            w = torch.tensor(s["fedau_weights"], dtype=torch.float64)
            seen = w > 0
            ax.loglog(1 / p[seen], w[seen], ".", ms=4)
            top = float((1 / p).max())
            ax.plot([1, top], [1, top], color="0.5", ls=":", lw=1)
            ax.set(title=f"{s['dataset']}, {s['pattern']}", xlabel="1/p_n", ylabel="ω_n")

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    """Accuracy curves per dataset (one panel per pattern) and FedAU's weights vs 1/p_n."""
    specs = []
    for dataset in dict.fromkeys(d for d, _ in _settings(results)):
        specs.append(
            FigureSpec(
                f"curves-{dataset}",
                f"{dataset}: test accuracy of every method at its chosen server rate (mean "
                "over seeds).",
                _draw_curves(results, dataset),
                size=(12.0, 3.4),
            )
        )
    if results:
        specs.append(
            FigureSpec(
                "fedau-weights",
                "FedAU's weight ω_n (mean participation interval) against the true 1/p_n, "
                "first seed; dotted: ω = 1/p. Under the cyclic pattern the intervals are "
                "bimodal (1 inside the on-window, about the period outside).",
                _draw_weights(results),
                size=(14.0, 3.0),
            )
        )
    return specs
