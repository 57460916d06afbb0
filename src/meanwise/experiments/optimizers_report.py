"""What the report says about experiment `optimizers`: claim, published numbers, our tables,
figures and the verdict. Everything here reads results in their JSON form (lists of dicts), so
a report can be rebuilt from cached results.
"""

from __future__ import annotations

from typing import Any

import torch

from meanwise.data import get_function
from meanwise.experiments.base import FigureSpec, Table, format_mean_std, mean_std

__all__ = ["PAPER", "CLAIM", "PUBLISHED", "summarize", "metrics", "figures", "verdict"]

JSON = dict[str, Any]

PAPER = (
    "Zhuang et al., AdaBelief Optimizer, NeurIPS 2020; Dubey et al., diffGrad, IEEE TNNLS 2019; "
    "Yao et al., ADAHESSIAN, AAAI 2021"
)

CLAIM = (
    "AdaBelief trains CNNs to a higher test accuracy than SGD, AdamW and Adam: on CIFAR-10 "
    "ResNet-34 the authors' logged runs reach 95.44% against 94.64% (SGD), 94.59% (AdamW) and "
    "93.02% (Adam). AdaHessian beats Adam by 1.80 / 1.45 points on ResNet20 / ResNet32 "
    "CIFAR-10. On its synthetic non-convex functions, diffGrad reaches the global minimum where "
    "Adam gets stuck in a local minimum or oscillates. Here the CNN comparison runs on the 8x8 "
    "digits with a small ResNet and each method's published CIFAR recipe, and the synthetic "
    "functions with the diffGrad paper's settings."
)

PUBLISHED = [
    Table(
        columns=["Optimizer", "VGG11", "ResNet34", "DenseNet121"],
        rows=[
            ["AdaBelief", "91.41", "95.44", "95.51"],
            ["SGD", "90.11", "94.64", "94.50"],
            ["AdamW", "89.39", "94.59", "94.55"],
            ["RAdam", "89.30", "94.33", "94.81"],
            ["Adam", "88.40", "93.02", "93.35"],
        ],
        caption="CIFAR-10 test accuracy (%), the AdaBelief authors' logged runs (AdaBelief with "
        "eps 1e-8, L2 weight decay 5e-4, weight_decouple=False, rectify=False).",
    ),
    Table(
        columns=["Task", "AdaHessian minus Adam"],
        rows=[
            ["CIFAR-10, ResNet20", "+1.80 points"],
            ["CIFAR-10, ResNet32", "+1.45 points"],
            ["ImageNet", "+5.55 points"],
        ],
        caption="AdaHessian paper (abstract). The authors' CIFAR recipe: batch 256, 160 epochs, "
        "weight decay 5e-4, AdaHessian lr 0.15, SGD 0.1, Adam 1e-3, AdamW 1e-2.",
    ),
    Table(
        columns=["Function", "gradient g(x), by pieces"],
        rows=[
            ["F1", "2x + 0.6 (x <= 0); 2x - 0.4 (x > 0)"],
            ["F2", "-40 (x <= -0.9); x cos 8x + sin 8x + 3x^2 (x > -0.9)"],
            ["F3", "2x | 1 | -7/8 | 7/8 | -1 | 2x, with breaks at -0.5, -0.4, 0, 0.4, 0.5"],
        ],
        caption="diffGrad's synthetic functions, x0 = -1.0, 300 steps, lr 0.1, beta1 0.95, "
        "beta2 0.999, eps 1e-8. The paper's claim is qualitative: diffGrad reaches the global "
        "minimum where Adam gets stuck in a local minimum or oscillates.",
    ),
]


# --- helpers ---------------------------------------------------------------------------------


def _digits_by_method(results: list[JSON]) -> dict[str, list[JSON]]:
    by_method: dict[str, list[JSON]] = {}
    for result in results:
        for run in result.get("digits", []):
            by_method.setdefault(run["method"], []).append(run)
    return by_method


def _final_accs(results: list[JSON]) -> dict[str, list[float]]:
    by_method = _digits_by_method(results)
    return {m: [r["final_test_acc"] for r in runs] for m, runs in by_method.items()}


def _synthetic_runs(results: list[JSON]) -> list[JSON]:
    # The synthetic part has no randomness: every seed holds the same runs; show the first.
    return results[0].get("synthetic", []) if results else []


def _where(function: str, x: float) -> str:
    fn = get_function(function)
    if abs(x - fn.global_min_x) <= 0.05:
        return f"global minimum (x = {fn.global_min_x:g})"
    for local in fn.local_min_x:
        if abs(x - local) <= 0.05:
            return f"local minimum (x = {local:.3g})"
    return "not at a minimum"


def _gap(run: JSON) -> float:
    return run["final_f"] - get_function(run["function"]).global_min_value


# --- tables and metrics --------------------------------------------------------------------------


def summarize(results: list[JSON]) -> list[Table]:
    """Our digits table (mean ± std over seeds) and our synthetic table (deterministic)."""
    tables = []
    by_method = _digits_by_method(results)
    if by_method:
        from meanwise.experiments.optimizers import RECIPES

        accs = _final_accs(results)
        ranking = sorted(accs, key=lambda m: mean_std(accs[m])[0], reverse=True)
        adam = mean_std(accs["Adam"])[0] if "Adam" in accs else None
        rows = []
        for method, runs in by_method.items():
            finals = accs[method]
            vs_adam = "" if adam is None else f"{mean_std(finals)[0] - adam:+.2f}"
            rows.append(
                [
                    method,
                    format_mean_std(finals),
                    format_mean_std([r["best_test_acc"] for r in runs]),
                    vs_adam,
                    str(ranking.index(method) + 1),
                    f"{mean_std([r['seconds'] for r in runs])[0]:.1f}",
                    RECIPES[method].description if method in RECIPES else "",
                ]
            )
        first = results[0]
        tables.append(
            Table(
                columns=[
                    "Optimizer",
                    "final test acc (%)",
                    "best test acc (%)",
                    "vs Adam (points)",
                    "rank",
                    "seconds / run",
                    "recipe",
                ],
                rows=rows,
                caption=f"Digits 8x8, SmallResNet ({first.get('num_parameters', '?')} "
                f"parameters), {first.get('epochs', '?')} epochs, cosine schedule, weight "
                f"decay wd = {first.get('weight_decay', '?')}; final = after the last epoch; "
                f"mean ± sample std over {len(results)} seed(s) (same initial weights and batch "
                "order for every optimizer within a seed).",
            )
        )
    runs = _synthetic_runs(results)
    if runs:
        rows = [
            [
                r["function"],
                r["method"],
                f"{r['final_x']:.4f}",
                f"{r['final_f']:.4f}",
                f"{_gap(r):.4f}",
                _where(r["function"], r["final_x"]),
            ]
            for r in runs
        ]
        tables.append(
            Table(
                columns=["Function", "Optimizer", "final x", "f(final x)", "f - f_min", "ends at"],
                rows=rows,
                caption="Synthetic functions after 300 steps from x0 = -1.0 (no randomness: the "
                "same for every seed). Global minima of the integrated functions: F1 x = -0.3 "
                "(f = 0), F2 the kink x = -0.9 (f = -0.706), F3 the kink x = 0 (f = 0).",
            )
        )
    return tables


def metrics(results: list[JSON]) -> dict[str, float]:
    """Headline numbers, flat, for scripts that read results.json."""
    out: dict[str, float] = {}
    for method, finals in _final_accs(results).items():
        mean, std = mean_std(finals)
        out[f"digits.{method}.final_test_acc.mean"] = mean
        out[f"digits.{method}.final_test_acc.std"] = std
    for r in _synthetic_runs(results):
        out[f"synthetic.{r['function']}.{r['method']}.final_x"] = r["final_x"]
        out[f"synthetic.{r['function']}.{r['method']}.gap"] = _gap(r)
    return out


# --- verdict -------------------------------------------------------------------------------------


def _adabelief_verdict(accs: dict[str, list[float]]) -> str | None:
    rivals = [m for m in ("SGD", "AdamW", "Adam") if m in accs]
    if "AdaBelief" not in accs or not rivals:
        return None
    means = {m: mean_std(v)[0] for m, v in accs.items()}
    ranking = sorted(means, key=means.get, reverse=True)
    mine, mine_std = mean_std(accs["AdaBelief"])
    below = [m for m in rivals if means[m] >= mine]
    numbers = f"AdaBelief {format_mean_std(accs['AdaBelief'])}% vs " + ", ".join(
        f"{m} {format_mean_std(accs[m])}%" for m in rivals
    )
    four = [m for m in ranking if m in ("AdaBelief", *rivals)]
    order = (
        f"it ranks {ranking.index('AdaBelief') + 1} of {len(ranking)} here; order here "
        f"{' > '.join(four)} (paper: AdaBelief > SGD > AdamW > Adam)"
    )
    if below:
        return (
            f"AdaBelief above SGD/AdamW/Adam: does NOT hold here: it is not above "
            f"{', '.join(below)} ({numbers}); {order}."
        )
    text = f"AdaBelief above SGD/AdamW/Adam: HOLDS here, as in the paper ({numbers}); {order}."
    spread = max([mine_std] + [mean_std(accs[m])[1] for m in rivals])
    close = [m for m in rivals if mine - means[m] < spread]
    if close and len(accs["AdaBelief"]) > 1:
        text += (
            f" Its margin over {', '.join(close)} is smaller than the seed-to-seed standard "
            "deviation, so this ordering is not a clear result here."
        )
    return text


def _adahessian_verdict(accs: dict[str, list[float]]) -> str | None:
    if "AdaHessian" not in accs or "Adam" not in accs:
        return None
    delta = mean_std(accs["AdaHessian"])[0] - mean_std(accs["Adam"])[0]
    numbers = (
        f"AdaHessian {format_mean_std(accs['AdaHessian'])}% vs Adam "
        f"{format_mean_std(accs['Adam'])}%, {delta:+.2f} points; "
        "paper: +1.80 / +1.45 on ResNet20 / ResNet32 CIFAR-10"
    )
    outcome = "HOLDS here" if delta > 0 else "does NOT hold here"
    text = f"AdaHessian beats Adam: {outcome} ({numbers})."
    spread = max(mean_std(accs["AdaHessian"])[1], mean_std(accs["Adam"])[1])
    if abs(delta) < spread:
        text += (
            " The gap is smaller than the seed-to-seed standard deviation, so it is not a clear "
            "result here."
        )
    return text


def _diffgrad_verdicts(runs: list[JSON]) -> list[str]:
    by_key = {(r["function"], r["method"]): r for r in runs}
    lines = []
    for function in dict.fromkeys(r["function"] for r in runs):
        d, a = by_key.get((function, "diffGrad")), by_key.get((function, "Adam"))
        if d is None or a is None:
            continue
        gd, ga = _gap(d), _gap(a)
        numbers = (
            f"diffGrad ends at x = {d['final_x']:.3f} (f - f_min = {gd:.4f}, "
            f"{_where(function, d['final_x'])}), Adam at x = {a['final_x']:.3f} "
            f"(f - f_min = {ga:.4f}, {_where(function, a['final_x'])})"
        )
        both_there = all(_where(function, r["final_x"]).startswith("global") for r in (d, a))
        if both_there:
            closer = "diffGrad" if gd < ga else "Adam"
            outcome = (
                "no difference to show here, both reach the global minimum "
                f"({closer} marginally closer)"
            )
        elif abs(gd - ga) <= 1e-3:
            outcome = "a tie, both end equally far from the global minimum"
        elif gd < ga:
            outcome = "HOLDS here, diffGrad ends closer to the global minimum than Adam"
        else:
            outcome = "does NOT hold here, Adam ends closer to the global minimum than diffGrad"
        lines.append(f"diffGrad on {function}: {outcome}: {numbers}.")
    return lines


def verdict(results: list[JSON]) -> str:
    """One line per claim, each saying HOLDS / does NOT hold here, with our numbers."""
    accs = _final_accs(results)
    lines = [
        line for line in (_adabelief_verdict(accs), _adahessian_verdict(accs)) if line is not None
    ]
    lines += _diffgrad_verdicts(_synthetic_runs(results))
    return "\n".join(lines) if lines else "No comparable runs in these results."


# --- figures -------------------------------------------------------------------------------------

_MARKERS = ("o", "s", "^", "D", "v", "P")


def _draw_synthetic_landscape(runs: list[JSON]):
    def draw(fig) -> None:
        functions = list(dict.fromkeys(r["function"] for r in runs))
        axes = fig.subplots(1, len(functions), squeeze=False)[0]
        for ax, function in zip(axes, functions, strict=True):
            fn = get_function(function)
            grid = torch.linspace(*fn.plot_range, 600, dtype=torch.float64)
            ax.plot(grid, fn.value(grid), color="0.3", lw=1.2, label="f(x)")
            values = fn.value(grid)
            for i, r in enumerate(r for r in runs if r["function"] == function):
                xs = torch.tensor(r["x"], dtype=torch.float64)
                color = f"C{i}"
                ax.plot(xs, fn.value(xs), ".", ms=2, alpha=0.25, color=color)
                ax.plot(
                    [r["final_x"]],
                    [r["final_f"]],
                    _MARKERS[i % len(_MARKERS)],
                    ms=11 - 1.5 * i,
                    mfc="none",
                    mew=1.8,
                    color=color,
                    label=r["method"],
                )
            ax.axvline(fn.global_min_x, color="0.6", ls=":", lw=1)
            span = float(values.max() - values.min())
            ax.set_xlim(*fn.plot_range)
            ax.set_ylim(float(values.min()) - 0.05 * span, float(values.max()) + 0.05 * span)
            ax.set_title(f"{function}: f(x), iterates and final points")
            ax.set_xlabel("x")
        axes[0].legend(fontsize=7)

    return draw


def _draw_synthetic_iterates(runs: list[JSON]):
    def draw(fig) -> None:
        functions = list(dict.fromkeys(r["function"] for r in runs))
        axes = fig.subplots(1, len(functions), squeeze=False)[0]
        for ax, function in zip(axes, functions, strict=True):
            for i, r in enumerate(r for r in runs if r["function"] == function):
                ax.plot(r["x"], lw=1, color=f"C{i}", label=r["method"])
            fn = get_function(function)
            ax.axhline(fn.global_min_x, color="0.4", ls=":", lw=1)
            ax.set_ylim(fn.plot_range[0] - 0.3, fn.plot_range[1] + 0.3)
            ax.set_title(f"{function}: x_t (dotted: global minimum)")
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)

    return draw


def _draw_digits_curves(results: list[JSON]):
    def draw(fig) -> None:
        acc_ax, loss_ax = fig.subplots(1, 2)
        for i, (method, runs) in enumerate(_digits_by_method(results).items()):
            acc = torch.tensor([r["test_acc"] for r in runs], dtype=torch.float64)
            loss = torch.tensor([r["train_loss"] for r in runs], dtype=torch.float64)
            epochs = range(1, acc.shape[1] + 1)
            mean = acc.mean(0)
            std = acc.std(0) if acc.shape[0] > 1 else torch.zeros_like(mean)
            acc_ax.plot(epochs, mean, color=f"C{i}", label=method)
            acc_ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
            loss_ax.plot(epochs, loss.mean(0), color=f"C{i}", label=method)
        acc_ax.set(title="test accuracy (mean ± std over seeds)", xlabel="epoch", ylabel="%")
        loss_ax.set(title="training loss (mean over seeds)", xlabel="epoch", yscale="log")
        acc_ax.legend(fontsize=7)

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    """The synthetic landscapes and iterates, and the digits accuracy/loss curves."""
    specs = []
    runs = _synthetic_runs(results)
    if runs:
        specs.append(
            FigureSpec(
                "synthetic-landscape",
                "diffGrad's functions with every optimizer's iterates (small dots) and final "
                "point (open marker); dotted line: the global minimum. The window is the "
                "paper's range: iterates that leave it (SGDM on F2) are not shown.",
                _draw_synthetic_landscape(runs),
                size=(12.0, 3.4),
            )
        )
        specs.append(
            FigureSpec(
                "synthetic-iterates",
                "x_t over the 300 steps (the window is clipped around the plotted range).",
                _draw_synthetic_iterates(runs),
                size=(12.0, 3.2),
            )
        )
    if _digits_by_method(results):
        specs.append(
            FigureSpec(
                "digits-curves",
                "Digits: test accuracy per epoch (band: ± one std over seeds) and training loss.",
                _draw_digits_curves(results),
                size=(11.0, 3.6),
            )
        )
    return specs
