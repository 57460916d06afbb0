"""What the report says about experiment `fisher-merging`: claim, the paper's findings, our
tables, figures and the verdict. Everything reads results in their JSON form (lists of dicts).
"""

from __future__ import annotations

from typing import Any

from meanwise.experiments.base import FigureSpec, Table, format_mean_std, mean_std

__all__ = ["PAPER", "CLAIM", "PUBLISHED", "summarize", "metrics", "figures", "verdict"]

JSON = dict[str, Any]

PAPER = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022"

CLAIM = (
    "Merging models by a Fisher-weighted average of their parameters is at least as good as "
    "plain (isotropic) averaging: in robust fine-tuning (WiSE-FT), in ensembling fine-tuned "
    "models, in intermediate-task transfer and in domain adaptation, Fisher merging beats plain "
    "averaging and is competitive with gradient-based transfer at a fraction of the cost. Here: "
    "MLPs fine-tuned from one pre-trained MLP on digits tasks, merged with equal weights "
    "(ensembling) and interpolated with the pre-trained model (robust fine-tuning)."
)

PUBLISHED = [
    Table(
        columns=["Setting", "the paper's protocol and finding"],
        rows=[
            [
                "Fisher",
                "exact diagonal Fisher (Σ_c p_c (∂ log p_c/∂θ)²) on 4096 training examples per "
                "model, model in inference mode",
            ],
            [
                "Merge",
                "floor max(F, 1e-6) (optionally only the target), optional normalization by the "
                "Fisher's L2 norm; shared body merged, the target's head kept",
            ],
            [
                "Coefficients",
                "chosen on 4096 held-out examples: 51-point grid for two models, Dirichlet(1) "
                "samples for more",
            ],
            [
                "Robust fine-tuning (WiSE-FT)",
                "Fisher merging of pre-trained and fine-tuned model beats plain interpolation",
            ],
            ["Ensembling (GLUE, BERT/RoBERTa)", "Fisher merging beats plain averaging"],
            [
                "Intermediate-task transfer, domain adaptation",
                "Fisher merging beats plain averaging; competitive with gradient-based transfer",
            ],
        ],
        caption="The paper's setup and qualitative findings (no numbers are quoted here; see "
        "the paper's tables). FusionBench's Fisher squares a per-batch gradient; its distance "
        "to the exact diagonal is measured by benchmarks/fisher.py.",
    )
]


def _by_name(results: list[JSON], part: str) -> dict[str, list[JSON]]:
    rows: dict[str, list[JSON]] = {}
    for result in results:
        for row in result.get(part, []):
            # the robust rows carry the chosen λ in their name; group by method
            key = row["name"].split(" at λ=")[0]
            rows.setdefault(key, []).append(row)
    return rows


def _scored_table(results: list[JSON], part: str, caption: str) -> Table:
    grouped = _by_name(results, part)
    tasks = results[0].get("tasks", [])
    columns = ["Model"] + [f"task {i + 1} {tuple(t)} (%)" for i, t in enumerate(tasks)]
    columns.append("union (%)")
    rows = []
    for name, runs in grouped.items():
        cells = [name]
        for i in range(len(tasks)):
            cells.append(format_mean_std([r["task_acc"][i] for r in runs]))
        cells.append(format_mean_std([r["union_acc"] for r in runs]))
        rows.append(cells)
    return Table(columns=columns, rows=rows, caption=caption)


def summarize(results: list[JSON]) -> list[Table]:
    """The ensembling table, the robust fine-tuning table at the chosen λ, Fisher estimates."""
    if not results:
        return []
    first = results[0]
    n = len(results)
    tables = [
        _scored_table(
            results,
            "ensembling",
            f"(a) Ensembling: one MLP ({first.get('num_parameters', '?')} parameters) per task, "
            "fine-tuned from the same pre-trained MLP, merged with equal coefficients. Test "
            f"accuracy per task (10-way argmax) and on the whole test set; mean ± std over {n} "
            "seed(s).",
        ),
        _scored_table(
            results,
            "robust",
            "(b) Robust fine-tuning: pre-trained and task-1 fine-tuned model interpolated with "
            "(1 - λ, λ); λ chosen per seed on validation union accuracy, then scored on test. "
            "Chosen λ: "
            + ", ".join(
                f"{m} {format_mean_std([r['chosen_lambda'][m] for r in results])}"
                for m in first.get("chosen_lambda", {})
            )
            + ".",
        ),
    ]
    curves = first.get("curves", {})
    if curves:
        rows = []
        for method in curves:
            target = [mean_std(r["curves"][method]["target"])[0] for r in results]
            union = [mean_std(r["curves"][method]["union"])[0] for r in results]
            rows.append([method, format_mean_std(target), format_mean_std(union)])
        tables.append(
            Table(
                columns=["Interpolation", "task 1 acc, mean over λ (%)", "union acc, mean over λ"],
                rows=rows,
                caption="(b) The interpolation curves averaged over the λ grid. These means "
                "depend on how λ parametrizes each path (the Fisher path stays near the "
                "pre-trained model for longer), so they are not a verdict: compare the "
                "trade-off panel of the figure, where both paths are drawn in accuracy space.",
            )
        )
    errors = [r.get("sampled_vs_exact_error", 0.0) for r in results]
    tables.append(
        Table(
            columns=["Fisher estimate", "relative L2 error vs exact"],
            rows=[["sampled (1 label per example)", format_mean_std(errors, 3)]],
            caption="How far the sampled Fisher of (a) is from the exact one, over all "
            "parameters of each fine-tuned model (mean over models and seeds).",
        )
    )
    return tables


def _union(results: list[JSON], part: str, name: str) -> list[float]:
    return [r["union_acc"] for r in _by_name(results, part).get(name, [])]


def metrics(results: list[JSON]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in ("ensembling", "robust"):
        for name, runs in _by_name(results, part).items():
            mean, std = mean_std([r["union_acc"] for r in runs])
            key = name.replace(" ", "_")
            out[f"{part}.{key}.union_acc.mean"] = mean
            out[f"{part}.{key}.union_acc.std"] = std
    if results:
        out["sampled_vs_exact_error.mean"] = mean_std(
            [r.get("sampled_vs_exact_error", 0.0) for r in results]
        )[0]
    return out


def _compare(label: str, fisher: list[float], plain: list[float], what: str) -> str | None:
    if not fisher or not plain:
        return None
    fm, fs = mean_std(fisher)
    pm, ps = mean_std(plain)
    delta = fm - pm
    wins = sum(f >= p for f, p in zip(fisher, plain, strict=False))
    outcome = "HOLDS here" if delta >= 0 else "does NOT hold here"
    text = (
        f"{label}: Fisher merging ≥ plain averaging {outcome} ({what}: Fisher "
        f"{format_mean_std(fisher)}% vs plain {format_mean_std(plain)}%, {delta:+.2f} points; "
        f"Fisher ≥ plain in {wins} of {len(fisher)} seeds)."
    )
    if len(fisher) > 1 and abs(delta) < max(fs, ps):
        text += " The gap is smaller than the seed-to-seed standard deviation."
    return text


def verdict(results: list[JSON]) -> str:
    """One line per comparison, each saying HOLDS / does NOT hold here, with our numbers."""
    lines = [
        _compare(
            "(a) ensembling, exact Fisher",
            _union(results, "ensembling", "Fisher merge (exact)"),
            _union(results, "ensembling", "plain average"),
            "union test accuracy",
        ),
        _compare(
            "(a) ensembling, sampled Fisher",
            _union(results, "ensembling", "Fisher merge (sampled)"),
            _union(results, "ensembling", "plain average"),
            "union test accuracy",
        ),
        _compare(
            "(b) robust fine-tuning, λ chosen on validation",
            _union(results, "robust", "Fisher"),
            _union(results, "robust", "plain"),
            "union test accuracy",
        ),
    ]
    lines = [line for line in lines if line is not None]
    if not lines:
        return "No comparable runs in these results."
    held = sum("HOLDS here" in line for line in lines)
    overall = (
        f"Overall: Fisher merging ≥ plain averaging holds here in {held} of {len(lines)} "
        "comparisons"
        + (" (all of them)." if held == len(lines) else "; where it does not, plain averaging "
           "is better here, contrary to the paper's claim.")
    )  # fmt: skip
    return "\n".join([overall, *lines])


def _draw_curves(results: list[JSON]):
    def draw(fig) -> None:
        import numpy as np

        target_ax, union_ax, tradeoff_ax = fig.subplots(1, 3)
        lambdas = results[0]["lambdas"]
        for i, method in enumerate(results[0]["curves"]):
            target = np.array([r["curves"][method]["target"] for r in results])
            union = np.array([r["curves"][method]["union"] for r in results])
            for ax, values in ((target_ax, target), (union_ax, union)):
                mean = values.mean(0)
                std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
                ax.plot(lambdas, mean, color=f"C{i}", marker="o", ms=3, label=method)
                ax.fill_between(lambdas, mean - std, mean + std, color=f"C{i}", alpha=0.2)
            tradeoff_ax.plot(union.mean(0), target.mean(0), color=f"C{i}", marker="o", ms=3,
                             label=method)  # fmt: skip
        target_ax.set(title="task 1 test accuracy", xlabel="λ (weight of the fine-tuned)",
                      ylabel="%")  # fmt: skip
        union_ax.set(title="union test accuracy", xlabel="λ", ylabel="%")
        tradeoff_ax.set(title="trade-off (λ from 0 to 1)", xlabel="union %", ylabel="task 1 %")
        target_ax.legend(fontsize=7)

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    if not results or not results[0].get("curves"):
        return []
    return [
        FigureSpec(
            "robust-curves",
            "(b) Interpolating pre-trained (λ = 0) and fine-tuned (λ = 1) weights, plainly and "
            "Fisher-weighted: test accuracy on the fine-tuning task and on all classes "
            "(band: ± one std over seeds).",
            _draw_curves(results),
            size=(12.0, 3.4),
        )
    ]
