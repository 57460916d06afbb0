"""What the report says about experiment `gossip`: claim, the paper's setting, our tables,
figures and the verdict. Everything here reads results in their JSON form (lists of dicts), so
a report can be rebuilt from cached results.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from meanwise.experiments.base import FigureSpec, Table, format_mean_std, mean_std

__all__ = [
    "PAPER",
    "CLAIM",
    "PUBLISHED",
    "LAG_POINTS",
    "FAST_FACTOR",
    "summarize",
    "metrics",
    "figures",
    "verdict",
]

JSON = dict[str, Any]

PAPER = (
    "Tian, Al-Ars, Kitsak, Hofstee, Vanishing Variance Problem in Fully Decentralized "
    "Neural-Network Systems, 2024"
)

CLAIM = (
    "In gossip learning from independent random initializations, averaging m uncorrelated "
    "models shrinks each layer's weight variance to (beta^2 + (1-beta)^2/m) of the initial "
    "variance sigma^2 (sigma^2/m for a plain mean), which stalls learning: plain gossip "
    "converges much more slowly than FL and its per-layer variance collapses. Rescaling each "
    "merged tensor to the received models' variance (variance-corrected averaging) restores "
    "FL-like convergence. Here: 50 nodes, random 8-regular graph, scikit-learn digits with a "
    "small MLP (full preset: also a small CNN), IID and Dirichlet(0.5) splits."
)

#: plain gossip "lags" FL if its final accuracy is at least this many points lower, or it
#: reaches the target accuracy later (or never)
LAG_POINTS = 2.0
#: corrected gossip converges "about as fast as FL" if it reaches the target accuracy within
#: this factor of FL's ticks
FAST_FACTOR = 1.5

PUBLISHED = [
    Table(
        columns=["setting / finding", "the paper"],
        rows=[
            ["nodes, graph", "50, random 8-regular"],
            ["model, data", "LeNet-5 on MNIST"],
            ["local training", "batch 64, SGD lr 0.01, momentum 0.9, weight decay 1e-4"],
            ["protocol", "train one minibatch every randint(8, 12) ticks, push to neighbours"],
            ["merge", "beta = 0.5 (own weight), when one model per neighbour is buffered"],
            ["correction", "per tensor, eps = 1e-4 inside both variances"],
            ["FL baseline", "star with a central average"],
            [
                "finding: plain gossip",
                "converges much more slowly than FL; per-layer variance drops to about 1/m",
            ],
            ["finding: corrected gossip", "FL-like convergence"],
        ],
        caption="The paper's setup and its qualitative findings (REFERENCES.md). It reports "
        "curves on MNIST, not numbers we can compare one to one with digits.",
    )
]

_LABELS = {
    "fl": "FL (star)",
    "gossip-plain": "gossip, plain",
    "gossip-corrected": "gossip, corrected",
}


# --- helpers ---------------------------------------------------------------------------------


def _runs(results: list[JSON]) -> dict[tuple[str, str, str], list[JSON]]:
    """(model, split, method) → that cell's run of every seed."""
    out: dict[tuple[str, str, str], list[JSON]] = {}
    for result in results:
        for r in result.get("runs", []):
            out.setdefault((r["model"], r["split"], r["method"]), []).append(r)
    return out


def _cells(results: list[JSON]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((m, s) for m, s, _ in _runs(results)))


def _weight_layers(run: JSON) -> list[str]:
    return [n for n in run["layer_variance"] if n.endswith("weight")]


def _ratio(run: JSON, layer: str, where: int = -1) -> float:
    return run["layer_variance"][layer][where] / run["initial_variance"][layer]


def _final_ratio(run: JSON) -> float:
    """The weight layers' final variance / initial variance, geometric mean over layers."""
    logs = [math.log(max(_ratio(run, layer), 1e-300)) for layer in _weight_layers(run)]
    return math.exp(sum(logs) / len(logs))


def _min_ratio(run: JSON) -> float:
    """The lowest variance ratio any weight layer reached during the run."""
    return min(
        v / run["initial_variance"][layer]
        for layer in _weight_layers(run)
        for v in run["layer_variance"][layer]
    )


def _ticks_to_target(runs: list[JSON]) -> list[float]:
    return [math.inf if r["ticks_to_target"] is None else r["ticks_to_target"] for r in runs]


def _format_ticks(values: list[float]) -> str:
    if any(math.isinf(v) for v in values):
        reached = [v for v in values if not math.isinf(v)]
        return f"not reached ({len(reached)}/{len(values)} seeds reached)"
    return format_mean_std(values, digits=0)


# --- tables and metrics --------------------------------------------------------------------------


def summarize(results: list[JSON]) -> list[Table]:
    runs = _runs(results)
    first = results[0] if results else {}
    target = first.get("target_accuracy", 0.8)
    tables = []
    for model, split in _cells(results):
        rows = []
        for method in [k for m, s, k in runs if (m, s) == (model, split)]:
            cell = runs[(model, split, method)]
            predicted = cell[0]["predicted_ratio"]
            rows.append(
                [
                    _LABELS.get(method, method),
                    format_mean_std([100 * r["final_accuracy"] for r in cell], digits=1),
                    _format_ticks(_ticks_to_target(cell)),
                    format_mean_std([_final_ratio(r) for r in cell], digits=3),
                    format_mean_std([_min_ratio(r) for r in cell], digits=3),
                    "—" if predicted is None else f"{predicted:.3f}",
                    format_mean_std([r["seconds"] for r in cell], digits=1),
                ]
            )
        n = first.get("n_nodes", "?")
        tables.append(
            Table(
                columns=[
                    "method",
                    "final test acc (%)",
                    f"ticks to {100 * target:.0f}% acc",
                    "weight var / init var (end)",
                    "lowest var ratio",
                    "predicted after one merge",
                    "seconds",
                ],
                rows=rows,
                caption=f"{model}, {split} split, {n} nodes, {first.get('ticks', '?')} ticks. "
                "Accuracy: mean over the nodes (FL: the centre's global model), final = mean of "
                "the last evaluations. Variance ratio: each weight tensor's element variance "
                "over its variance at initialization, geometric mean over layers (FL: the "
                "centre, which starts from one shared model). Predicted: beta^2 + (1-beta)^2/m "
                f"for one merge of independent models; the consensus floor (the average of all "
                f"{n} independent initializations) is 1/{n} = "
                f"{1 / n if isinstance(n, int) else float('nan'):.3f}. Mean ± std over "
                f"{len(results)} seed(s).",
            )
        )
    return tables


def metrics(results: list[JSON]) -> dict[str, float]:
    """Headline numbers, flat, for scripts that read results.json."""
    out: dict[str, float] = {}
    for (model, split, method), cell in _runs(results).items():
        key = f"{model}.{split}.{method}"
        out[f"{key}.final_accuracy.mean"] = mean_std([r["final_accuracy"] for r in cell])[0]
        out[f"{key}.final_variance_ratio.mean"] = mean_std([_final_ratio(r) for r in cell])[0]
        out[f"{key}.lowest_variance_ratio.mean"] = mean_std([_min_ratio(r) for r in cell])[0]
        ticks = _ticks_to_target(cell)
        out[f"{key}.ticks_to_target.mean"] = sum(ticks) / len(ticks)
    return out


# --- verdict -------------------------------------------------------------------------------------


def _cell_verdict(runs, model: str, split: str, degree: int) -> str | None:
    need = ("fl", "gossip-plain", "gossip-corrected")
    if not all((model, split, k) in runs for k in need):
        return None
    fl, plain, fixed = (runs[(model, split, k)] for k in need)
    acc = {
        k: 100 * mean_std([r["final_accuracy"] for r in runs[(model, split, k)]])[0] for k in need
    }
    reach = {k: sum(_ticks_to_target(runs[(model, split, k)])) / len(fl) for k in need}

    def when(k: str) -> str:
        return "never" if math.isinf(reach[k]) else f"tick {reach[k]:.0f}"

    lag = acc["fl"] - acc["gossip-plain"] >= LAG_POINTS or reach["gossip-plain"] > reach["fl"]
    parts = [
        f"plain gossip lags FL: {'HOLDS' if lag else 'does NOT hold'} "
        f"(final {acc['gossip-plain']:.1f}% vs {acc['fl']:.1f}%, target reached "
        f"{when('gossip-plain')} vs {when('fl')})"
    ]
    predicted = plain[0]["predicted_ratio"]
    lowest = mean_std([_min_ratio(r) for r in plain])[0]
    collapsed = lowest <= predicted
    parts.append(
        f"plain gossip's layer variance collapses: {'HOLDS' if collapsed else 'does NOT hold'} "
        f"(lowest {lowest:.3f} of the initial, predicted {predicted:.3f} after one merge, "
        f"1/m = {1 / degree:.3f}; "
        f"corrected ends at {mean_std([_final_ratio(r) for r in fixed])[0]:.2f})"
    )
    if math.isinf(reach["fl"]):
        fast = acc["gossip-corrected"] >= acc["fl"] - LAG_POINTS
        basis = "FL never reached the target; compared on final accuracy"
    else:
        fast = reach["gossip-corrected"] <= FAST_FACTOR * reach["fl"]
        basis = (
            f"target reached {when('gossip-corrected')} vs FL {when('fl')}, "
            f"allowed ×{FAST_FACTOR:g}"
        )
    parts.append(
        f"corrected gossip converges about as fast as FL: {'HOLDS' if fast else 'does NOT hold'} "
        f"({basis}; final {acc['gossip-corrected']:.1f}% vs {acc['fl']:.1f}%)"
    )
    return f"{model}, {split}: " + "; ".join(parts) + "."


def verdict(results: list[JSON]) -> str:
    """One line per (model, split), each claim saying HOLDS / does NOT hold here."""
    runs = _runs(results)
    degree = results[0].get("degree", 8) if results else 8
    lines = [v for m, s in _cells(results) if (v := _cell_verdict(runs, m, s, degree)) is not None]
    return "\n".join(lines) if lines else "No comparable runs in these results."


# --- figures -------------------------------------------------------------------------------------


def _mean_curve(cell: list[JSON], values) -> tuple[list[int], torch.Tensor]:
    length = min(len(r["ticks"]) for r in cell)
    data = torch.tensor([values(r)[:length] for r in cell], dtype=torch.float64)
    return cell[0]["ticks"][:length], data.mean(0)


def _draw_accuracy(results: list[JSON], model: str):
    def draw(fig) -> None:
        runs = _runs(results)
        splits = [s for m, s in _cells(results) if m == model]
        axes = fig.subplots(1, len(splits), squeeze=False)[0]
        for ax, split in zip(axes, splits, strict=True):
            methods = [k for m, s, k in runs if (m, s) == (model, split)]
            for i, method in enumerate(methods):
                ticks, acc = _mean_curve(runs[(model, split, method)], lambda r: r["mean_accuracy"])
                ax.plot(ticks, 100 * acc, color=f"C{i}", label=_LABELS.get(method, method))
            ax.set(title=f"{model}, {split}", xlabel="tick", ylabel="test acc (%)", ylim=(0, 100))
        axes[0].legend(fontsize=7)

    return draw


def _draw_variance(results: list[JSON], model: str, split: str, n_nodes: int):
    def draw(fig) -> None:
        runs = _runs(results)
        methods = [k for m, s, k in runs if (m, s) == (model, split)]
        layers = _weight_layers(runs[(model, split, methods[0])][0])
        axes = fig.subplots(1, len(layers), squeeze=False)[0]
        for ax, layer in zip(axes, layers, strict=True):
            for i, method in enumerate(methods):
                cell = runs[(model, split, method)]
                ticks, var = _mean_curve(cell, lambda r, layer=layer: r["layer_variance"][layer])
                ax.semilogy(ticks, var, color=f"C{i}", label=_LABELS.get(method, method))
            gossip = [k for k in methods if k != "fl"]
            if gossip:
                run = runs[(model, split, gossip[0])][0]
                sigma2 = run["initial_variance"][layer]
                ax.axhline(
                    run["predicted_ratio"] * sigma2,
                    color="0.3",
                    ls="--",
                    lw=1,
                    label="(β² + (1−β)²/m)·σ²",
                )
                ax.axhline(sigma2 / n_nodes, color="0.6", ls=":", lw=1, label=f"σ²/{n_nodes}")
            ax.set(title=f"{layer}", xlabel="tick", ylabel="weight variance")
        axes[0].legend(fontsize=6)

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    """Accuracy vs ticks per model; per-layer weight variance vs ticks per (model, split)."""
    specs = []
    n_nodes = results[0].get("n_nodes", 50) if results else 50
    for model in dict.fromkeys(m for m, _ in _cells(results)):
        specs.append(
            FigureSpec(
                f"accuracy-{model}",
                f"{model}: test accuracy vs ticks (mean over nodes, FL: the centre; mean over "
                "seeds).",
                _draw_accuracy(results, model),
                size=(10.0, 3.2),
            )
        )
    for model, split in _cells(results):
        specs.append(
            FigureSpec(
                f"variance-{model}-{split}",
                f"{model}, {split}: each weight tensor's element variance vs ticks (mean over "
                "nodes and seeds; FL: the centre). Dashed: the variance one plain merge of "
                "independent models predicts, (β² + (1−β)²/m)·σ² with σ² the initial variance; "
                f"dotted: σ²/{n_nodes}, the variance of the average of all initial models.",
                _draw_variance(results, model, split, n_nodes),
                size=(12.0, 3.2),
            )
        )
    return specs
