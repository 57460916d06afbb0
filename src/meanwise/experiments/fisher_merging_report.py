"""What the report says about experiment `fisher-merging`: the paper's claims with intervals over
seeds, our tables, the protocol comparison and the WiSE-FT figure. Everything reads results in
their JSON form (lists of dicts, one per seed), read through the typed records of
`fisher_merging_results`.
"""

from __future__ import annotations

from typing import Any

from meanwise.experiments.base import FigureSpec, Table, format_mean_std, from_json, mean_std
from meanwise.experiments.claims import (
    Claim,
    ProtocolRow,
    paired_claim,
    protocol_table,
    t_interval,
)
from meanwise.experiments.fisher_merging_results import EnsemblingCell, FisherMergingResult

__all__ = [
    "PAPER",
    "CLAIM",
    "PUBLISHED",
    "summarize",
    "metrics",
    "claims",
    "protocol",
    "figures",
    "frontier_mean",
]

JSON = dict[str, Any]

PAPER = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022"

CLAIM = (
    "Merging models by a Fisher-weighted average of their parameters beats plain (isotropic) "
    "averaging where averaging was already in use: ensembling models fine-tuned on the same task "
    "from one pre-trained model, and robust fine-tuning (WiSE-FT: interpolating a pre-trained "
    "model with its fine-tune, scored in distribution and under distribution shift). Here: digits "
    "MLPs pre-trained on a broad (rotated / translated / noisy) distribution and fine-tuned on "
    "clean digits; merge coefficients chosen on validation as the authors do."
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
                "floor max(F, 1e-6) (optionally only on the target), optional normalization of "
                "each Fisher by its L2 norm; the shared body merged, the target's head kept",
            ],
            [
                "Coefficients",
                "chosen on 4096 held-out examples: 51-point grid for two models, Dirichlet(1) "
                "samples for more",
            ],
            [
                "Ensembling (BERT-base, five fine-tuned checkpoints each of RTE, MRPC, SST-2)",
                "Fisher merging beats isotropic merging and approaches the output ensemble with "
                "one model's cost (the paper's Fig. 2; numbers only in the figure)",
            ],
            [
                "Robust fine-tuning (WiSE-FT's zero-shot and ImageNet fine-tuned CLIP)",
                "Fisher merging of the pre-trained and fine-tuned models gives better accuracy "
                "under distribution shift than isotropic interpolation",
            ],
            [
                "Intermediate-task transfer, domain-adaptive pre-training",
                "Fisher merging beats isotropic merging; competitive with gradient-based transfer "
                "(not tested here)",
            ],
        ],
        caption="The paper's setup and qualitative findings. It reports its ensembling and "
        "robust fine-tuning results in figures, so no paper effect sizes are quoted in the "
        "claims below (paper_effect is None).",
    )
]

ARMS = (
    "target (copy 1)",
    "individual (mean)",
    "output ensemble",
    "plain (equal λ)",
    "fisher (equal λ)",
    "plain (λ searched)",
    "fisher (λ searched)",
)
SHIFTS = ("rotated", "translated", "noisy")


# --- grouping ----------------------------------------------------------------------------------


def _typed(results: list[JSON]) -> list[FisherMergingResult]:
    return [FisherMergingResult.from_json(r) for r in results]


def _config(config: JSON):
    """The config that ran, typed (imported here: `fisher_merging` imports this module to
    register)."""
    from meanwise.experiments.fisher_merging import FisherMergingConfig

    return from_json(FisherMergingConfig, config)


def _cells(results: list[FisherMergingResult]) -> list[tuple[str, int]]:
    """(head setting, N) in the order of the first seed's records."""
    if not results:
        return []
    return [(c.head, c.n_models) for c in results[0].ensembling]


def _cell(result: FisherMergingResult, head: str, n: int) -> EnsemblingCell | None:
    for c in result.ensembling:
        if c.head == head and c.n_models == n:
            return c
    return None


def _arm(results: list[FisherMergingResult], head: str, n: int, arm: str) -> list[float]:
    """Per-seed test accuracy of one arm (seeds lacking the cell are skipped together)."""
    cells = [_cell(r, head, n) for r in results]
    return [c.test_acc[arm] for c in cells if c is not None]


def _robust_at(results: list[FisherMergingResult], method: str, key: str) -> list[float]:
    return [r.robust.at_chosen[method][key] for r in results if r.robust]


def _best_shift(result: FisherMergingResult, method: str) -> tuple[float, float, float]:
    """The oracle point of a curve: highest shifted test accuracy, its λ and its ID accuracy."""
    curve = result.robust.curves[method]
    i = max(range(len(curve["shift_test"])), key=lambda j: curve["shift_test"][j])
    return curve["shift_test"][i], result.robust.lambdas[i], curve["id_test"][i]


def frontier_mean(
    clean: list[float], shifted: list[float], lo: float, hi: float, points: int = 101
) -> float:
    """The mean, over `points` clean-accuracy levels c from `lo` to `hi`, of the best shifted
    accuracy among the path's points with clean accuracy ≥ c: the height of the path's
    trade-off frontier, independent of how λ parametrizes the path."""  # fmt: skip
    levels = [lo + (hi - lo) * i / (points - 1) for i in range(points)] if hi > lo else [lo]
    heights = []
    for level in levels:
        reachable = [s for c, s in zip(clean, shifted, strict=True) if c >= level - 1e-9]
        heights.append(max(reachable) if reachable else min(shifted))
    return sum(heights) / len(heights)


def _frontier(result: FisherMergingResult, method: str) -> float:
    """`frontier_mean` between the two shared endpoints: the pre-trained (λ = 0) and the
    fine-tuned (λ = 1) model's clean accuracy."""
    curves = result.robust.curves
    ends = [curves["plain"]["id_test"][0], curves["plain"]["id_test"][-1]]
    curve = curves[method]
    return frontier_mean(curve["id_test"], curve["shift_test"], min(ends), max(ends))


def _diff_text(method: list[float], baseline: list[float]) -> str:
    """'mean [lo, hi]' of the paired difference (t interval), or the mean for one seed."""
    diffs = [a - b for a, b in zip(method, baseline, strict=True)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    lo, hi = t_interval(diffs)
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] ({wins}↑ {losses}↓)"


# --- tables --------------------------------------------------------------------------------------


def summarize(results: list[JSON]) -> list[Table]:
    """(a) ensembling, (b) robust fine-tuning at the chosen λ and along the path, the sampled
    Fisher check, and the extra multi-task merge with its confidence analysis."""
    results = _typed(results)
    if not results:
        return []
    n_seeds = len(results)
    tables = [_ensembling_table(results, n_seeds)]
    if all(r.robust for r in results):
        tables += _robust_tables(results, n_seeds)
    if all(r.sampled_fisher for r in results):
        tables.append(_sampled_table(results))
    if all(r.multitask for r in results):
        tables += _multitask_tables(results, n_seeds)
    return tables


def _ensembling_table(results: list[FisherMergingResult], n_seeds: int) -> Table:
    rows = []
    for head, n in _cells(results):
        cells = [f"{head}, N = {n}"]
        cells += [format_mean_std(_arm(results, head, n, arm)) for arm in ARMS]
        for kind in ("λ searched", "equal λ"):
            cells.append(
                _diff_text(
                    _arm(results, head, n, f"fisher ({kind})"),
                    _arm(results, head, n, f"plain ({kind})"),
                )
            )
        weights = [
            _cell(r, head, n).chosen_lambda[m][0] for m in ("fisher", "plain") for r in results
        ]
        cells.append(f"{sum(weights) / len(weights):.2f}")
        disagree = [_cell(r, head, n).disagreement for r in results]
        cells.append(format_mean_std(disagree))
        rows.append(cells)
    first = results[0]
    return Table(
        columns=[
            "heads, N",
            *[f"{a} (%)" for a in ARMS],
            "Fisher − plain, λ searched",
            "Fisher − plain, equal λ",
            "target's λ (mean)",
            "copies disagree with copy 1 (% of test)",
        ],  # fmt: skip
        rows=rows,
        caption=f"(a) Ensembling: N MLPs ({first.num_parameters} parameters) fine-"
        "tuned on the same clean 10-way task from one pre-trained model with different batch "
        "orders; 'fresh': body pre-trained on digit mod 5, a new head per copy; 'shared': the "
        "pre-trained 10-way model, head included. Merges: body merged, copy 1's head kept; Fisher "
        "with the authors' preset. Test accuracy, mean ± std over "
        f"{n_seeds} seed(s); differences: mean [95 % t interval] (seeds up ↑ / down ↓). The "
        "search picks by validation accuracy (ties: lower validation loss); 'target's λ' is the "
        "mean weight it gave copy 1 (1/N = equal); the last column says how different the copies "
        "are (test images where a copy's prediction differs from copy 1's).",
    )


def _robust_tables(results: list[FisherMergingResult], n_seeds: int) -> list[Table]:
    keys = ("id_test", "shift_test", *SHIFTS)

    def endpoint(index: int) -> list[str]:
        curve = [r.robust.curves["plain"] for r in results]
        return [format_mean_std([c[k][index] for c in curve]) for k in keys]

    lam = {m: [r.robust.chosen_lambda[m] for r in results] for m in ("plain", "fisher")}
    rows = [
        ["pre-trained (λ = 0)", "0", *endpoint(0)],
        ["fine-tuned (λ = 1)", "1", *endpoint(-1)],
        *[
            [f"{m} interpolation, λ on ID validation", format_mean_std(lam[m]),
             *[format_mean_std(_robust_at(results, m, k)) for k in keys]]
            for m in ("plain", "fisher")
        ],
        ["Fisher − plain", "", *[_diff_text(_robust_at(results, "fisher", k),
                                            _robust_at(results, "plain", k)) for k in keys]],
    ]  # fmt: skip
    chosen = Table(
        columns=[
            "model",
            "λ (fine-tuned weight)",
            "clean test (%)",
            "shifted, mean (%)",
            *[f"{s} (%)" for s in SHIFTS],
        ],  # fmt: skip
        rows=rows,
        caption="(b) Robust fine-tuning (WiSE-FT): λ·fine-tuned + (1 − λ)·pre-trained, plainly "
        "and Fisher-weighted (authors' preset, fine-tuned model as target), λ chosen per seed "
        "on clean validation accuracy from the 51-point grid, then scored on the clean test set "
        f"and on three shifted copies of it. Mean ± std over {n_seeds} seed(s); Fisher − plain: "
        "mean [95 % t interval].",
    )
    oracle_rows = []
    best = {m: [_best_shift(r, m) for r in results] for m in ("plain", "fisher")}
    for m in ("plain", "fisher"):
        shift, lams, ids = zip(*best[m], strict=True)
        oracle_rows.append(
            [m, format_mean_std(list(shift)), format_mean_std(list(lams)),
             format_mean_std(list(ids))]
        )  # fmt: skip
    oracle_rows.append(
        ["Fisher − plain", _diff_text([b[0] for b in best["fisher"]],
                                      [b[0] for b in best["plain"]]), "", ""]
    )  # fmt: skip
    frontier = {m: [_frontier(r, m) for r in results] for m in ("plain", "fisher")}
    for m in ("plain", "fisher"):
        oracle_rows.append([f"{m}: trade-off frontier height", format_mean_std(frontier[m]),
                            "", ""])  # fmt: skip
    oracle_rows.append(["Fisher − plain (frontier)",
                        _diff_text(frontier["fisher"], frontier["plain"]), "", ""])  # fmt: skip
    oracle = Table(
        columns=["path", "best shifted test acc (%)", "at λ", "clean test acc there (%)"],
        rows=oracle_rows,
        caption="(b) The whole curve: the best mean shifted accuracy anywhere on each path "
        "(an oracle choice of λ on the test shift, the same for both paths), and the height of "
        "each path's trade-off frontier (best shifted accuracy at clean accuracy ≥ c, averaged "
        "over c from the pre-trained to the fine-tuned model's clean accuracy). The figure draws "
        "both paths.",
    )
    return [chosen, oracle]


def _sampled_table(results: list[FisherMergingResult]) -> Table:
    rows = []
    for model, first in results[0].sampled_fisher.items():
        records = [r.sampled_fisher[model] for r in results]
        for i, draws in enumerate(first.draws):
            errors = [rec.relative_error[i] for rec in records]
            within = sum(e <= 0.10 for e in errors)
            rows.append([model, str(draws), format_mean_std(errors, 3), f"{max(errors):.3f}",
                         f"{within} of {len(errors)}"])  # fmt: skip
        examples = first.examples
    return Table(
        columns=[
            "model (parameters)",
            "draws per example",
            "relative L2 error vs exact",
            "max over seeds",
            "seeds within 10 %",
        ],  # fmt: skip
        rows=rows,
        caption="The sampled Fisher (labels drawn from the model) against the exact Fisher on the "
        f"same {examples} fine-tuning examples, over the parameters each merge weights. The "
        "error falls as 1/√draws; the merges above use the exact Fisher, as the authors do.",
    )


def _multitask_tables(results: list[FisherMergingResult], n_seeds: int) -> list[Table]:
    first = results[0].multitask
    tasks = first.tasks
    rows = []
    for name in first.scored:
        runs = [r.multitask.scored[name] for r in results]
        rows.append([name, *[format_mean_std([run.task_acc[i] for run in runs])
                             for i in range(len(tasks))],
                     format_mean_std([run.union_acc for run in runs])])  # fmt: skip
    ensemble = [r.multitask.output_ensemble_union_acc for r in results]
    rows.append(["output ensemble", *[""] * len(tasks), format_mean_std(ensemble)])
    scores = Table(
        columns=[
            "model",
            *[f"task {i + 1} {tuple(t)} (%)" for i, t in enumerate(tasks)],
            "all classes (%)",
        ],  # fmt: skip
        rows=rows,
        caption="Extra — multi-task merge, NOT an experiment of the paper: one model per "
        "disjoint class group, each fine-tuned from the shared pre-trained model, merged with "
        "equal weights (all parameters, one shared head); 10-way test accuracy. Mean ± std over "
        f"{n_seeds} seed(s).",
    )
    conf_rows = []
    plain = "plain average"
    fisher = "Fisher (exact)"
    for i, task in enumerate(tasks):
        conf = [r.multitask.confidence[i] for r in results]
        total = [r.multitask.fisher_total[i] for r in results]
        delta = [r.multitask.scored[fisher].task_acc[i]
                 - r.multitask.scored[plain].task_acc[i] for r in results]  # fmt: skip
        conf_rows.append([f"task {i + 1} {tuple(task)}", format_mean_std(conf),
                          format_mean_std(total, 3),
                          _diff_text(delta, [0.0] * len(delta))])  # fmt: skip
    agree = sum(
        r.multitask.fisher_total.index(max(r.multitask.fisher_total))
        == r.multitask.confidence.index(min(r.multitask.confidence))
        for r in results
    )
    analysis = Table(
        columns=[
            "model",
            "confidence: mean max-probability (%)",
            "Σ exact Fisher",
            "Fisher − plain on its task (points)",
        ],  # fmt: skip
        rows=conf_rows,
        caption="Why Fisher weighting loses in the multi-task merge: the exact Fisher is "
        "Σ_c p_c (∂ log p_c/∂θ)², and its logit part diag(p) − ppᵀ has trace 1 − Σ p_c², so it is "
        "largest for the least confident model; that model's parameters dominate the weighted "
        "average and the merge moves toward it (its task gains, the others lose). The least "
        f"confident model had the largest Fisher in {agree} of {len(results)} seeds.",
    )
    return [scores, analysis]


# --- metrics -------------------------------------------------------------------------------------


def metrics(results: list[JSON]) -> dict[str, float]:
    results = _typed(results)
    out: dict[str, float] = {}
    for head, n in _cells(results):
        for arm in ARMS:
            mean, std = mean_std(_arm(results, head, n, arm))
            key = f"ensembling.{head}.N{n}.{arm.replace(' ', '_')}"
            out[f"{key}.mean"], out[f"{key}.std"] = mean, std
    if results and all(r.robust for r in results):
        for m in ("plain", "fisher"):
            for k in ("id_test", "shift_test"):
                out[f"robust.{m}.{k}.mean"] = mean_std(_robust_at(results, m, k))[0]
            out[f"robust.{m}.lambda.mean"] = mean_std([r.robust.chosen_lambda[m] for r in results])[
                0
            ]
    if results and all(r.sampled_fisher for r in results):
        for i, model in enumerate(results[0].sampled_fisher):
            errors = [r.sampled_fisher[model].relative_error[-1] for r in results]
            out[f"sampled_fisher.{'ab'[i]}.relative_error.mean"] = mean_std(errors)[0]
            draws = results[0].sampled_fisher[model].draws[-1]
            out[f"sampled_fisher.{'ab'[i]}.draws"] = float(draws)
    return out


# --- claims --------------------------------------------------------------------------------------


def claims(results: list[JSON]) -> list[Claim]:
    """The paper's claim, Fisher merging ≥ plain averaging, in each setting we reproduce: per
    head setting and N for ensembling (coefficients searched as the authors do, and equal), and
    in and out of distribution and over the whole path for robust fine-tuning.
    All arms share the seed's splits, models and candidates, so every claim is paired by seed.
    The multi-task extra is not a claim of the paper and is not listed."""
    results = _typed(results)
    out: list[Claim] = []
    for head, n in _cells(results):
        if not _arm(results, head, n, "fisher (λ searched)"):
            continue
        heads = (
            "fresh head per copy (body pre-trained on digit mod 5)"
            if head == "fresh"
            else "shared pre-trained head"
        )
        cells = [c for c in (_cell(r, head, n) for r in results) if c is not None]
        disagree = sum(c.disagreement for c in cells) / len(cells)
        target = sum(c.chosen_lambda["fisher"][0] for c in cells) / len(cells)
        setting = (
            f"{n} copies fine-tuned on the same task, {heads}; they disagree with copy 1 on "
            f"{disagree:.2f} % of the test images."
        )
        coefficients = {
            "λ searched": "each with its coefficients searched on validation over the same "
            "candidates (51-point grid for N = 2, Dirichlet samples otherwise; the Fisher "
            f"search gave copy 1 a mean weight of {target:.2f}, 1/N = {1 / n:.2f})",
            "equal λ": "both with equal coefficients 1/N (no search)",
        }
        for kind, how in coefficients.items():
            out.append(
                paired_claim(
                    f"Ensembling, N = {n}, {head} heads, {kind}: Fisher merge ≥ plain average",
                    _arm(results, head, n, f"fisher ({kind})"),
                    _arm(results, head, n, f"plain ({kind})"),
                    paper_effect=None,
                    unit="points",
                    detail="Test accuracy (%) of the Fisher merge (authors' preset: normalized "
                    "exact Fishers, floor on the target only, body merged, copy 1's head kept) "
                    f"minus the plain average (same head handling), {how}; {setting}",
                )
            )
    robust = [r for r in results if r.robust]
    if robust:
        settings = (
            ("shift_test", "under input shift", "mean accuracy (%) over the rotated, translated "
             "and noisy test sets"),
            ("id_test", "in distribution", "clean test accuracy (%)"),
        )  # fmt: skip
        for key, where, metric in settings:
            out.append(
                paired_claim(
                    f"Robust fine-tuning (WiSE-FT), λ on ID validation: Fisher interpolation ≥ "
                    f"plain, {where}",
                    _robust_at(robust, "fisher", key),
                    _robust_at(robust, "plain", key),
                    paper_effect=None,
                    unit="points",
                    detail=f"{metric[0].upper() + metric[1:]} of λ·fine-tuned + (1 − λ)·pre-"
                    "trained, Fisher-weighted (authors' preset, fine-tuned model as target) minus "
                    "plain, each at the λ its own path scores best on clean validation (51-point "
                    "grid).",
                )
            )
        out.append(
            paired_claim(
                "Robust fine-tuning (WiSE-FT), whole curve: Fisher path's clean-vs-shifted "
                "trade-off ≥ plain path's",
                [_frontier(r, "fisher") for r in robust],
                [_frontier(r, "plain") for r in robust],
                paper_effect=None,
                unit="points",
                detail="Height of each path's trade-off frontier: the best mean shifted test "
                "accuracy (%) reachable at clean test accuracy ≥ c, averaged over 101 levels c "
                "from the pre-trained to the fine-tuned model's clean accuracy (the paths share "
                "both endpoints), Fisher minus plain. It compares the whole curves in accuracy "
                "space, as the paper's robust fine-tuning figure does, not one choice of λ.",
            )
        )
    return out


# --- protocol ------------------------------------------------------------------------------------


def protocol(config: JSON) -> Table:
    """The paper's protocol against the config that ran, row by row."""
    c = _config(config)
    hidden = c.hidden
    sizes = ", ".join(str(n) for n in c.ensemble_sizes)
    lo, hi = c.shift_degrees
    rows = [
        ProtocolRow(
            "model",
            "BERT-base (ensembling); CLIP ViT (robust fine-tuning)",
            f"MLP 64-{hidden}-{hidden}-10, tanh",
            "2 CPU cores and no pre-trained checkpoints offline. A small MLP has a far flatter "
            "loss surface around its fine-tunes than a transformer, and its Fisher is estimated "
            "on hundreds, not thousands, of examples; effect sizes need not transfer.",
        ),
        ProtocolRow(
            "pre-training",
            "the public BERT / CLIP checkpoints (web-scale data)",
            f"{c.pretrain_epochs} epochs of Adam on {c.pretrain_fraction:.0%} of the "
            f"digits training images, each epoch redrawn with rotations ±{c.augment_degrees:g}"
            f"°, translations ±{c.augment_shift:g} px and noise sd ≤ {c.augment_noise:g} "
            "(the 'broad' distribution); 10-way, and digit mod 5 for the fresh-head body",
            "a stand-in for a model pre-trained on a broader distribution than its fine-tuning "
            "data, as WiSE-FT requires; its in-distribution accuracy is lower than CLIP's "
            "zero-shot is relative to its fine-tune, so the two ends of the WiSE-FT path are "
            "further apart here.",
        ),
        ProtocolRow(
            "data",
            "GLUE RTE, MRPC, SST-2 (ensembling); ImageNet and its shifted test sets (WiSE-FT)",
            f"scikit-learn digits 8×8 (fixed test split, {c.test_fraction:.0%}); fine-tuning "
            f"on the clean remaining images, {c.validation_fraction:.0%} held out for "
            f"validation; shifted test sets: rotated {lo:g}–{hi:g}°, translated "
            f"{c.shift_pixels:g} px diagonally, Gaussian noise sd {c.shift_noise:g}",
            "offline and fast; the shifts are synthetic input shifts (the labels are unchanged), "
            "not natural distribution shifts such as ImageNet-R/Sketch.",
        ),
        ProtocolRow(
            "budget",
            "the checkpoints' own fine-tuning runs (BERT: five community checkpoints per task "
            "from the Hugging Face hub; CLIP: WiSE-FT's ImageNet fine-tune, 10 epochs)",
            f"pre-training {c.pretrain_epochs} epochs, fine-tuning {c.finetune_epochs} "
            f"epochs; {max(c.ensemble_sizes)} copies per head setting differing in batch "
            "order (and, with fresh heads, in head initialization)",
            "time on 2 CPU cores; the copies differ less than independently fine-tuned BERT "
            "checkpoints, which leaves less for any merge to gain over one model.",
        ),
        ProtocolRow(
            "optimizer and schedule",
            "as the checkpoints were trained (BERT's usual AdamW with warm-up and linear decay; "
            "WiSE-FT: AdamW with a cosine schedule)",
            f"Adam, lr {c.lr:g}, batch {c.batch_size}, constant, no weight decay",
            "a small MLP trains stably without a schedule; the merge methods do not depend on "
            "how the endpoints were trained, only on where they end up.",
        ),
        ProtocolRow(
            "ensembles and heads",
            "five checkpoints per task, each with its own classification head",
            f"N ∈ {{{sizes}}} (prefixes of the same copies); 'fresh' heads (the paper's case) "
            "and a 'shared' pre-trained head",
            "the shared-head setting is added because it is where merging from one pre-trained "
            "head is easiest; both are reported.",
        ),
        ProtocolRow(
            "Fisher",
            "exact diagonal Fisher on 4096 training examples per model, inference mode",
            f"exact Fisher on up to {c.fisher_examples} examples (all fine-tuning images; "
            "for the pre-trained model of (b), draws from its broad distribution), eval mode; "
            f"a sampled Fisher ({c.sampled_draws} draws per example) is only checked "
            "against it",
            "our fine-tuning split is smaller than 4096 images; the estimate is exact in the "
            "label sum, so only the examples limit it.",
        ),
        ProtocolRow(
            "merge options",
            "floor max(F, 1e-6) on the target only, normalized Fishers, body merged and "
            "target's head kept",
            f'the same (`preset="authors"`, floor {c.floor:g}, `keep_target=["head"]` '
            "in (a); in (b) the head is shared and merged, the fine-tuned model is the target)",
            "same as the paper",
        ),
        ProtocolRow(
            "coefficients",
            "searched on 4096 held-out examples: 51-point grid (2 models), Dirichlet samples "
            "(more); the plain average gets the same search",
            f"validation split (≈ {round(1347 * c.validation_fraction)} images): "
            f"{c.grid_points}-point grid for N = 2, {c.dirichlet_samples} Dirichlet(1) "
            "samples otherwise, the same candidates for both methods; ties in accuracy broken "
            "by validation loss. Equal weights reported beside. (b): λ on a "
            f"{c.lambdas}-point grid by clean validation accuracy",
            "a smaller validation set makes the chosen coefficients noisier (accuracy moves in "
            "steps of one image); the loss tie-break keeps the grid's first point from winning "
            "ties by position.",
        ),
        ProtocolRow(
            "runs / seeds",
            "one run per setting (public checkpoints)",
            f"{c.seeds} seeds; a seed draws the pre-training / fine-tuning / validation split, "
            "the initial weights and the batch orders; every claim is paired by seed",
            "cheap models allow an interval over seeds instead of a single run.",
        ),
        ProtocolRow(
            "metric",
            "validation accuracy / F1 (GLUE); ImageNet and shifted top-1 accuracy",
            "test accuracy (%) of the merged model; in (b) clean and mean shifted test accuracy",
            "the GLUE tasks' own metrics do not apply to digits.",
        ),
    ]
    return protocol_table(rows, "Matena & Raffel's protocol against ours, row by row.")


# --- figures -------------------------------------------------------------------------------------


def _draw_curves(results: list[FisherMergingResult]):
    def draw(fig) -> None:
        import numpy as np

        id_ax, shift_ax, tradeoff_ax = fig.subplots(1, 3)
        lambdas = results[0].robust.lambdas
        for i, method in enumerate(("plain", "fisher")):
            label = {"plain": "plain interpolation", "fisher": "Fisher (authors' preset)"}[method]
            clean = np.array([r.robust.curves[method]["id_test"] for r in results])
            shifted = np.array([r.robust.curves[method]["shift_test"] for r in results])
            for ax, values in ((id_ax, clean), (shift_ax, shifted)):
                mean = values.mean(0)
                std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
                ax.plot(lambdas, mean, color=f"C{i}", label=label)
                ax.fill_between(lambdas, mean - std, mean + std, color=f"C{i}", alpha=0.2)
            chosen = float(np.mean([r.robust.chosen_lambda[method] for r in results]))
            for ax in (id_ax, shift_ax):
                ax.axvline(chosen, color=f"C{i}", ls=":", lw=1)
            tradeoff_ax.plot(clean.mean(0), shifted.mean(0), color=f"C{i}", marker="o", ms=2,
                             label=label)  # fmt: skip
        for ax, title in ((id_ax, "clean (in-distribution) test"), (shift_ax, "shifted test")):
            ax.set(title=title, xlabel="λ (weight of the fine-tuned model)", ylabel="accuracy %")
        tradeoff_ax.set(title="trade-off (λ = 0 … 1)", xlabel="clean test %",
                        ylabel="shifted test %")  # fmt: skip
        id_ax.legend(fontsize=7)

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    results = _typed(results)
    if not results or not all(r.robust for r in results):
        return []
    n = len(results)
    return [
        FigureSpec(
            "wise-ft-curve",
            "(b) WiSE-FT: interpolating the broad pre-trained model (λ = 0) and its clean "
            "fine-tune (λ = 1), plainly and Fisher-weighted. Clean and shifted (mean of rotated, "
            f"translated, noisy) test accuracy over λ; band ± one std over {n} seed(s), dotted: "
            "the mean λ chosen on clean validation. Right: the same paths in accuracy space.",
            _draw_curves(results),
            size=(12.0, 3.4),
        )
    ]
