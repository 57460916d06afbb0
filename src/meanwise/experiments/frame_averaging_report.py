"""What the report says about experiment `frame-averaging`: claim, published numbers, our tables,
figures, the claims (each with a 95 % interval over seeds) and the protocol table. The public
functions take results in their JSON form (lists of dicts), so a report can be rebuilt from cached
results, and read them through the typed records of `frame_averaging_results`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from meanwise.experiments.base import FigureSpec, Table, format_mean_std, from_json, mean_std
from meanwise.experiments.claims import (
    Claim,
    ProtocolRow,
    paired_claim,
    protocol_table,
    threshold_claim,
)
from meanwise.experiments.frame_averaging_results import (
    FrameAveragingResult,
    NBodyRun,
    NormalsRun,
)

__all__ = ["PAPER", "CLAIM", "PUBLISHED", "PUBLISHED_MSE", "summarize", "metrics", "figures",
           "claims", "protocol"]  # fmt: skip

JSON = dict[str, Any]
Run = TypeVar("Run", NBodyRun, NormalsRun)

if TYPE_CHECKING:
    from meanwise.experiments.frame_averaging import FrameAveragingConfig

PAPER = "Puny et al., Frame Averaging for Invariant and Equivariant Network Design, ICLR 2022"

PUBLISHED_MSE: dict[str, float] = {
    "Linear": 0.0819,
    "SE(3)-Transformer": 0.0244,
    "TFN": 0.0155,
    "GNN": 0.0107,
    "Radial Field": 0.0104,
    "EGNN": 0.0071,
    "FA-GNN": 0.0057,
}

CLAIM = (
    "Frame averaging makes any backbone exactly invariant or equivariant at the cost of |F| "
    "backbone evaluations. On the charged-particle n-body task, a plain message-passing GNN "
    "with frame averaging inside every layer (FA-GNN) reaches test MSE .0057, below EGNN "
    "(.0071), the plain GNN (.0107) and the Linear baseline (.0819). Here: EGNN's published "
    "systems (replayed from its generator's seed) integrated by our batched simulator, FA-GNN, "
    "GNN and Linear as the authors' code builds them, with fewer epochs than the paper's "
    "10,000; and a normal-estimation check in the spirit of the paper's aligned-train / "
    "rotated-test setting: a frame-averaged point network is unaffected by rotations it never "
    "saw in training, the plain one degrades."
)

PUBLISHED = [
    Table(
        columns=["Method", "test MSE"],
        rows=[[name, f"{mse:.4f}"] for name, mse in PUBLISHED_MSE.items()],
        caption="n-body (nbody_small: 5 charged particles, 3,000 training systems), Frame "
        "Averaging paper, Table 3. FA-GNN: 60 hidden features, lr 1e-3, batch 100, up to "
        "10,000 epochs, validation every 5, test MSE at the best validation epoch.",
    )
]


def _typed(results: list[JSON]) -> list[FrameAveragingResult]:
    return [FrameAveragingResult.from_json(r) for r in results]


def _config(config: JSON):
    """The config that ran, typed (imported here: `frame_averaging` imports this module to
    register)."""
    from meanwise.experiments.frame_averaging import FrameAveragingConfig

    return from_json(FrameAveragingConfig, config)


def _nbody_by_model(results: list[FrameAveragingResult]) -> dict[str, list[NBodyRun]]:
    by_model: dict[str, list[NBodyRun]] = {}
    for result in results:
        for run in result.nbody:
            by_model.setdefault(run.model, []).append(run)
    return by_model


def _normals_by_model(results: list[FrameAveragingResult]) -> dict[str, list[NormalsRun]]:
    by_model: dict[str, list[NormalsRun]] = {}
    for result in results:
        for run in result.normals:
            by_model.setdefault(run.model, []).append(run)
    return by_model


def _mean(values: list[float]) -> float:
    return mean_std(values)[0]


def _format_sci(values: list[float]) -> str:
    """'mean ± std' in scientific notation: errors span 1e-8 (exact) to 1 (none)."""
    mean, std = mean_std(values)
    return f"{mean:.1e}" if len(values) == 1 else f"{mean:.1e} ± {std:.1e}"


def summarize(results: list[JSON]) -> list[Table]:
    """Our n-body table beside the published MSE, and the normal-estimation table."""
    results = _typed(results)
    tables = []
    by_model = _nbody_by_model(results)
    if by_model:
        first = results[0]
        ranking = sorted(by_model, key=lambda m: _mean([r.test_mse for r in by_model[m]]))
        rows = []
        for model, runs in by_model.items():
            published = PUBLISHED_MSE.get(model)
            rows.append(
                [
                    model,
                    format_mean_std([r.test_mse for r in runs], 4),
                    "" if published is None else f"{published:.4f}",
                    str(ranking.index(model) + 1),
                    _format_sci([r.equivariance_error for r in runs]),
                    ", ".join(f"{r.best_epoch + 1}/{r.epochs_run}" for r in runs),
                    str(runs[0].parameters),
                    f"{_mean([r.seconds for r in runs]):.0f}",
                ]
            )
        tables.append(
            Table(
                columns=[
                    "Model",
                    "test MSE (ours)",
                    "test MSE (paper)",
                    "rank",
                    "equivariance error",
                    "best epoch / epochs run",
                    "parameters",
                    "seconds / run",
                ],
                rows=rows,
                caption=f"n-body, {first.train_size} training systems, at most "
                f"{first.epochs_cap} epochs (the paper: 3,000 and up to 10,000); "
                "test MSE at the best validation epoch; mean ± std over "
                f"{len(results)} seed(s). Equivariance error: ‖f(Qx+b) − (Q f(x)+b)‖/‖f(x)‖ "
                "over test systems, Q random in O(3), float32. "
                f"{100 * first.degenerate_test_fraction:.1f}% of the test systems "
                "have a relative eigengap below 0.01 (their 5-point PCA frame is nearly "
                "degenerate, so float32 rounding shows up as equivariance error there).",
            )  # fmt: skip
        )
    normals = _normals_by_model(results)
    if normals:
        rows = [
            [
                model,
                format_mean_std([r.aligned_error_deg for r in runs], 2),
                format_mean_std([r.rotated_error_deg for r in runs], 2),
                _format_sci([r.equivariance_error for r in runs]),
                f"{_mean([r.seconds for r in runs]):.0f}",
            ]
            for model, runs in normals.items()
        ]
        tables.append(
            Table(
                columns=[
                    "Model",
                    "angle error, aligned (°)",
                    "angle error, rotated (°)",
                    "equivariance error",
                    "seconds / run",
                ],
                rows=rows,
                caption="Normal estimation on spheres, ellipsoids and tori (256 points each), "
                "trained on axis-aligned shapes only, tested on held-out shapes aligned and "
                "under random O(3) rotations + translations; mean unoriented angle error. "
                "FA-PointNet: the same network wrapped in FrameAveraging('E3', 'vector'), one "
                "sampled frame element per shape while training, all 8 at test time.",
            )  # fmt: skip
        )
    return tables


def metrics(results: list[JSON]) -> dict[str, float]:
    """Headline numbers, flat, for scripts that read results.json."""
    results = _typed(results)
    out: dict[str, float] = {}
    for model, runs in _nbody_by_model(results).items():
        mean, std = mean_std([r.test_mse for r in runs])
        out[f"nbody.{model}.test_mse.mean"] = mean
        out[f"nbody.{model}.test_mse.std"] = std
        out[f"nbody.{model}.equivariance_error"] = _mean([r.equivariance_error for r in runs])
        out[f"nbody.{model}.epochs_run"] = _mean([r.epochs_run for r in runs])
    for model, runs in _normals_by_model(results).items():
        out[f"normals.{model}.aligned_error_deg"] = _mean([r.aligned_error_deg for r in runs])
        out[f"normals.{model}.rotated_error_deg"] = _mean([r.rotated_error_deg for r in runs])
    return out


# --- claims and protocol -----------------------------------------------------------------------

# The paper's level for FA-GNN: .0057, with the old report's 5 % tolerance
FA_GNN_LEVEL = 0.0060
# float32 rounding bound for a relative equivariance error (the library's tests use the same)
EQUIVARIANCE_TOLERANCE = 1e-5
# a rotation-invariant normal estimator's error may differ between aligned and rotated copies
# of a shape by rounding only; half a degree is far above that and far below a real effect
ROTATION_TOLERANCE_DEG = 0.5

# What the row-by-row comparison with EGNN's code found about the GNN's gap (see `protocol`)
# (checked once, seed 0, full data; the numbers are from those runs, not from this run)
GNN_BUDGET_FINDING_OURS = (
    "every setting above is EGNN's for its GNN (architecture, inputs [x, v], edge attribute "
    "q_i q_j, SiLU, MSE, Adam lr 1e-3, weight decay 1e-12, batch 100, validation every 5, test "
    "at the best validation epoch), and so is the generator. On a fresh draw (data_seed 0, "
    "the old default) the GNN's best validation epoch was 85, test .0152; trained on past "
    "the early stop to epoch 275, its training MSE fell from .009 to .0009 while validation "
    "rose to .017: no better epoch. On EGNN's own systems (data_draw 'egnn', now the "
    "default): best epoch 80, test .0135, then the same overfitting (training .0044, "
    "validation .0157 at epoch 125)"
)
GNN_BUDGET_FINDING_WHY = (
    "about 40 % of the gap was the data draw: our fresh draw was a hard one (Linear .0907 "
    "there, .0849 on EGNN's systems); the test draw alone moves the GNN's MSE by ±5 % (six "
    "2,000-system test draws: .0152-.0171). The rest (.0135 vs .0107) is not explained by "
    "any setting: our GNN overfits 3,000 systems from epoch ~80 on, and the paper's number "
    "is one unseeded run after 10,000 epochs (not run here: ~8 CPU-hours at ~3 s an "
    "epoch); a late second descent, or that run's luck, cannot be excluded. Listed, not "
    "fixed"
)


def _runs_by_seed(runs: list[tuple[int, list[Run]]]) -> dict[str, dict[int, Run]]:
    """{model: {seed: run}} from (seed, that seed's runs of one part)."""
    out: dict[str, dict[int, Run]] = {}
    for seed, part in runs:
        for run in part:
            out.setdefault(run.model, {})[seed] = run
    return out


def _paired(arms: dict[str, dict[int, Run]], a: str, b: str) -> list[int]:
    """The seeds both arms ran, in order (pairing by seed)."""
    if a not in arms or b not in arms:
        return []
    return sorted(set(arms[a]) & set(arms[b]))


def _scale(results: list[FrameAveragingResult]) -> str:
    first = results[0]
    return (
        f"{first.train_size} training systems, at most "
        f"{first.epochs_cap} epochs (the paper: 3,000 and up to 10,000)"
    )


def claims(results: list[JSON]) -> list[Claim]:
    """Each claim this experiment tests, with a 95 % interval over seeds (paired by seed)."""
    results = _typed(results)
    out: list[Claim] = []
    if not results:
        return out
    nbody = _runs_by_seed([(r.seed, r.nbody) for r in results])
    scale = _scale(results)
    for method, baseline in (("FA-GNN", "GNN"), ("GNN", "Linear")):
        seeds = _paired(nbody, method, baseline)
        if not seeds:
            continue
        out.append(
            paired_claim(
                f"{method} has a lower n-body test MSE than {baseline}",
                [nbody[method][s].test_mse for s in seeds],
                [nbody[baseline][s].test_mse for s in seeds],
                paper_effect=PUBLISHED_MSE[method] - PUBLISHED_MSE[baseline],
                direction="less",
                unit="MSE",
                detail=f"Test MSE at the best validation epoch, {method} minus {baseline}, "
                f"paired by seed (seed = initialisation and batch order; the data are the "
                f"same for every seed); {scale}.",
            )
        )
    if "FA-GNN" in nbody:
        fa = nbody["FA-GNN"]
        seeds = sorted(fa)
        out.append(
            threshold_claim(
                "FA-GNN is E(3)-equivariant up to float32 rounding",
                [fa[s].equivariance_error for s in seeds],
                threshold=EQUIVARIANCE_TOLERANCE,
                paper_effect=None,
                direction="less",
                unit="",
                detail="Relative error ‖f(Qx+b, Qv) − (Q f(x, v) + b)‖ / ‖f(x, v)‖ over test "
                "systems, Q random in O(3), b random, float32, after training; the paper "
                f"states exactness by construction (no number). Threshold "
                f"{EQUIVARIANCE_TOLERANCE:g}: float32 rounding, amplified on nearly "
                "degenerate 5-point frames.",
            )
        )
        if min(r.train_size for r in results) >= 3000:
            # the level is only comparable on the paper's data size; the quick preset's 500
            # systems and few epochs cannot test it (see the protocol table)
            out.append(
                threshold_claim(
                    "FA-GNN reaches the published n-body test MSE (.0057)",
                    [fa[s].test_mse for s in seeds],
                    threshold=FA_GNN_LEVEL,
                    paper_effect=PUBLISHED_MSE["FA-GNN"],
                    direction="less",
                    unit="MSE",
                    detail=f"FA-GNN test MSE at the best validation epoch against "
                    f"{FA_GNN_LEVEL} (the paper's .0057 + 5 %); {scale}.",
                )
            )
    normals = _runs_by_seed([(r.seed, r.normals) for r in results])
    if "FA-PointNet" in normals:
        fa = normals["FA-PointNet"]
        seeds = sorted(fa)
        out.append(
            threshold_claim(
                "FA-PointNet's normal error on unseen rotations equals its aligned error",
                [abs(fa[s].rotated_error_deg - fa[s].aligned_error_deg) for s in seeds],
                threshold=ROTATION_TOLERANCE_DEG,
                paper_effect=None,
                direction="less",
                unit="°",
                detail="|angle error on randomly rotated and translated test shapes − angle "
                "error on the same shapes axis-aligned| per seed, trained on aligned shapes "
                "only; our synthetic-shape check of the invariance the paper proves (no "
                f"published number). Threshold {ROTATION_TOLERANCE_DEG}°.",
            )
        )
    seeds = _paired(normals, "FA-PointNet", "PointNet")
    if seeds:

        def degradation(run: NormalsRun) -> float:
            return run.rotated_error_deg - run.aligned_error_deg

        out.append(
            paired_claim(
                "Frame averaging removes the plain network's degradation under unseen rotations",
                [degradation(normals["FA-PointNet"][s]) for s in seeds],
                [degradation(normals["PointNet"][s]) for s in seeds],
                paper_effect=None,
                direction="less",
                unit="°",
                detail="(rotated − aligned angle error) of FA-PointNet minus that of PointNet, "
                "paired by seed; both trained on axis-aligned shapes only.",
            )
        )
    return out


def _lr(config: FrameAveragingConfig, model: str) -> str:
    rates = dict(config.lr)
    return "?" if model not in rates else f"{rates[model]:g}"


def _data_draw_row(c: FrameAveragingConfig) -> ProtocolRow:
    paper = (
        "the published files: 10,000 training systems (the first 3,000 used), 2,000 "
        "validation, 2,000 test, drawn by np.random.seed(43); Linear reaches .0819"
    )
    if c.data_draw == "egnn":
        return ProtocolRow(
            "data draw",
            paper,
            "the same systems: their initial states replayed from the generator's NumPy "
            "stream (the charges equal the published charges_*.npy, all 70,000), then "
            "integrated here",
            "the position files are not available offline. Close encounters are chaotic: "
            "~5 % of the systems end > 1e-3 from the reference arithmetic at frame 40 (from "
            "the same initial state), enough to move a 2,000-system MSE by ~3 %: the "
            "least-squares Linear model reaches .0849 on the 2,000 test systems, .0847 with the "
            "reference arithmetic, against the paper's .0819",
        )
    return ProtocolRow(
        "data draw",
        paper,
        f"fresh systems of the same distribution (data_seed {c.data_seed})",
        "a different draw: the least-squares Linear model's test MSE over data seeds 0-5 is "
        ".0864-.0911 (standard error of one 2,000-system test mean ≈ .003, heavy-tailed)",
    )


def protocol(config: JSON) -> Table:
    """The paper's (EGNN's) n-body protocol against the config that ran, row by row."""
    c = _config(config)
    patience_epochs = c.patience * c.eval_every
    early_stop = (
        "none"
        if c.patience * c.eval_every >= c.epochs
        else f"after {c.patience} evaluations ({patience_epochs} epochs) without a better "
        "validation MSE"
    )
    rows = [
        ProtocolRow(
            "n-body simulator",
            "EGNN's nbody_small generator (from NRI / SE(3)-Transformer): 5 particles, charges "
            "±1 (p = ½), x ~ N(0, 1) per coordinate, |v| = 0.5 in a uniform direction, "
            "interaction strength 1, F_i = Σ q_i q_j (x_i − x_j)/r³ clipped to ±100 per "
            "component, semi-implicit Euler dt = 1e-3, 5,000 steps recorded every 100 (49 "
            "frames); no box during the integration (the reflection at walls ±5 is applied "
            "once, to the initial state)",
            "the same equations re-implemented in batched float64 torch, the initial "
            "reflection included (tests: against a per-system loop of the reference "
            "integration, momentum and energy)",
            "the NumPy generator takes ~0.2 s per system; same arithmetic up to float rounding",
        ),
        ProtocolRow(
            "task",
            "inputs: positions and velocities at frame 30, charges; target: positions at "
            "frame 40 (1,000 integration steps later)",
            "frame 30 → frame 40",
        ),
        ProtocolRow(
            "data size",
            "3,000 training systems (the first 3,000 of 10,000 generated with NumPy seed 43), "
            "2,000 validation, 2,000 test",
            f"{c.train_size:,} / {c.val_size:,} / {c.test_size:,} ("
            + (
                "the first of EGNN's systems"
                if c.data_draw == "egnn"
                else f"data_seed {c.data_seed}"
            )
            + ", the same for every seed)",
            "same as the paper"
            if (c.train_size, c.val_size, c.test_size) == (3000, 2000, 2000)
            else "quick preset: CPU time on 2 shared cores; fewer systems raise every "
            "learned model's MSE, the plain GNN's most (no symmetry to share data across "
            "orientations)",
        ),
        _data_draw_row(c),
        ProtocolRow(
            "FA-GNN",
            "4 residual message-passing layers (SiLU), 60 hidden channels read as 20 "
            "3-vectors, edge features [q_i q_j, ‖x_i − x_j‖²], frame averaging (8 E(3) PCA "
            "frame elements) inside every layer",
            f"{c.layers} layers, {c.fa_hidden} hidden",
            "same as the paper" if (c.layers, c.fa_hidden) == (4, 60) else "smaller, for time",
        ),
        ProtocolRow(
            "GNN baseline",
            "EGNN's GNN: embedding Linear(6, 64) of [x, v], 4 residual GCL layers (edge MLP "
            "on [h_i, h_j, q_i q_j], sum over neighbours, node MLP), SiLU, decoder "
            "64 → 64 → 3 predicting positions directly",
            f"the same, {c.layers} layers, {c.gnn_hidden} hidden",
            "same as the paper" if (c.layers, c.gnn_hidden) == (4, 64) else "smaller, for time",
        ),
        ProtocolRow(
            "Linear baseline",
            "x̂ = x + t·v, one learned scalar t (initial 0.7)",
            "the same",
        ),
        ProtocolRow(
            "optimizer",
            "Adam, weight decay 1e-12, batch 100; lr FA-GNN 1e-3, GNN 1e-3 (EGNN README), "
            "Linear 5e-4 (EGNN default); constant lr, MSE loss on positions",
            f"Adam, weight decay {c.weight_decay:g}, batch {c.batch_size}; lr FA-GNN "
            f"{_lr(c, 'FA-GNN')}, GNN {_lr(c, 'GNN')}, Linear {_lr(c, 'Linear')}",
            (
                "same as the paper"
                if c.batch_size == 100
                else "quick preset: batch 50 "
                "gives twice the updates for the same CPU time on a small training set; "
            )
            + " Linear's lr only sets how fast the convex 1-D fit converges (it converges "
            "within the budget either way)",
        ),
        ProtocolRow(
            "training budget",
            "up to 10,000 epochs, validation every 5, test MSE at the best validation epoch; "
            "no early stopping",
            f"at most {c.epochs} epochs, validation every {c.eval_every}, test MSE at "
            f"the best validation epoch; early stop: {early_stop}",
            "CPU time: one FA-GNN epoch on 3,000 systems takes ~8 s on one core (10,000 "
            "epochs ≈ 22 h per seed). Fewer epochs can only raise the MSE of a model whose "
            "validation MSE is still improving; see the GNN row below",
        ),
        ProtocolRow(
            "GNN level (.0152 in the first full run vs .0107)",
            "GNN .0107 after 10,000 epochs",
            GNN_BUDGET_FINDING_OURS,
            GNN_BUDGET_FINDING_WHY,
        ),
        ProtocolRow(
            "runs",
            "one run per model, no interval",
            f"{c.seeds} seed(s) per model (initialisation and batch order); claims from a "
            "95 % t interval over seeds, paired by seed",
            "the contract of this report; the paper's numbers carry no seed spread",
        ),
        ProtocolRow(
            "metric",
            "MSE of predicted positions, mean over systems, particles and coordinates",
            "the same",
        ),
        ProtocolRow(
            "equivariance",
            "exact by construction (no measured number)",
            f"measured: relative error under random O(3) rotations + translations on "
            f"{c.equivariance_systems} test systems, float32",
            "an empirical check of the theorem; float32 rounding, amplified on nearly "
            "degenerate 5-point frames, is the expected residue",
        ),
        ProtocolRow(
            "normal estimation",
            "normal estimation on ABC CAD shapes (PointNet and DGCNN backbones; aligned or "
            "rotated training, aligned or rotated test)",
            f"synthetic spheres, ellipsoids and tori ({c.normal_train_shapes} training / "
            f"{c.normal_test_shapes} test shapes, {c.normal_points} points), a "
            f"PointNet-style network of width {c.normal_width} and its FrameAveraging "
            f"('E3', 'vector', stochastic frames while training) version, {c.normal_epochs}"
            " epochs, trained on axis-aligned shapes only",
            "no ABC data offline; this tests only the aligned-train / rotated-test "
            "invariance, not the paper's error levels",
        ),
        ProtocolRow(
            "hardware",
            "GPU",
            f"CPU, {c.num_threads} thread(s)",
            "the machine here; results are deterministic per seed on one machine",
        ),
    ]
    return protocol_table(
        rows, "n-body: the protocol of the paper (EGNN's code, which FA follows) against ours."
    )


def _draw_curves(results: list[FrameAveragingResult]):
    def draw(fig) -> None:
        val_ax, train_ax = fig.subplots(1, 2)
        for i, (model, runs) in enumerate(_nbody_by_model(results).items()):
            run = runs[0]
            epochs = [e + 1 for e in run.eval_epochs]
            val_ax.plot(epochs, run.val_mse, color=f"C{i}", label=f"{model} (ours)")
            train_ax.plot(epochs, run.train_mse, color=f"C{i}", label=model)
            if model in PUBLISHED_MSE:
                val_ax.axhline(PUBLISHED_MSE[model], color=f"C{i}", ls=":", lw=1)
        val_ax.set(title="validation MSE (dotted: paper's test MSE)", xlabel="epoch",
                   yscale="log")  # fmt: skip
        train_ax.set(title="training MSE", xlabel="epoch", yscale="log")
        val_ax.legend(fontsize=7)

    return draw


def _draw_normals(results: list[FrameAveragingResult]):
    def draw(fig) -> None:
        ax = fig.subplots(1, 1)
        normals = _normals_by_model(results)
        names = list(normals)
        aligned = [_mean([r.aligned_error_deg for r in normals[m]]) for m in names]
        rotated = [_mean([r.rotated_error_deg for r in normals[m]]) for m in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], aligned, width=0.4, label="aligned (as trained)")
        ax.bar([x + 0.2 for x in xs], rotated, width=0.4, label="randomly rotated")
        ax.set_xticks(list(xs), names)
        ax.set(ylabel="mean angle error (°)", title="normal estimation")
        ax.legend(fontsize=7)

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    """n-body learning curves (first seed) and the normal-estimation bars."""
    results = _typed(results)
    specs = []
    if _nbody_by_model(results):
        specs.append(
            FigureSpec(
                "nbody-curves",
                "n-body: validation and training MSE per evaluation (first seed); dotted "
                "lines: the paper's test MSE for the same model.",
                _draw_curves(results),
                size=(11.0, 3.6),
            )
        )
    if _normals_by_model(results):
        specs.append(
            FigureSpec(
                "normals",
                "Normal estimation: angle error on aligned and on randomly rotated test shapes.",
                _draw_normals(results),
                size=(6.0, 3.4),
            )
        )
    return specs
