"""What the report says about experiment `social-implicit`: claim, published numbers, our tables,
figures, the claims (each with its status from a 95 % interval over seeds) and the "paper
protocol vs ours" table. The public functions take results in their JSON form (lists of dicts),
so a report can be rebuilt from cached results, and read them through the typed records of
`social_implicit_results`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from meanwise.experiments.base import FigureSpec, Table, format_mean_std, from_json, mean_std
from meanwise.experiments.claims import (
    Claim,
    ProtocolRow,
    deterministic_claim,
    paired_claim,
    protocol_table,
    threshold_claim,
)
from meanwise.experiments.social_implicit_results import (
    ShiftPoint,
    SocialImplicitResult,
    SplitResult,
)

__all__ = [
    "PAPER",
    "CLAIM",
    "PUBLISHED",
    "PUBLISHED_ADE_FDE",
    "RELEASED_ADE_FDE",
    "APPROACH_TOLERANCE",
    "summarize",
    "metrics",
    "figures",
    "claims",
    "protocol",
    "PAPER_TRAINING",
]

JSON = dict[str, Any]

if TYPE_CHECKING:
    from meanwise.experiments.social_implicit import SocialImplicitConfig

PAPER = (
    "Mohamed et al., Social-Implicit: Rethinking Trajectory Prediction Evaluation and The "
    "Effectiveness of Implicit Maximum Likelihood Estimation, ECCV 2022"
)

CLAIM = (
    "A 5.8K-parameter implicit sampler trained with IMLE (the nearest of 20 samples pulled toward "
    "the truth) matches far larger models on ETH/UCY best-of-20 ADE/FDE (average 0.33/0.67 m), "
    "and best-of-N ADE/FDE is a poor judge of a predicted distribution: it barely notices a "
    "distribution that has moved away from the truth as long as one sample still lands near it, "
    "whereas the proposed AMD (Mahalanobis distance of the truth to a mixture fitted to the "
    "samples) and AMV (the mixture's spread) judge the whole distribution."
)

# (ADE, FDE) in metres, best of 20 per pedestrian, from the paper's table
PUBLISHED_ADE_FDE: dict[str, tuple[float, float]] = {
    "eth": (0.66, 1.44),
    "hotel": (0.20, 0.36),
    "univ": (0.31, 0.60),
    "zara1": (0.25, 0.50),
    "zara2": (0.22, 0.43),
}
# what the authors' released weights give with this library's evaluation (issue 7, README)
RELEASED_ADE_FDE: dict[str, tuple[float, float]] = {
    "eth": (0.67, 1.48),
    "hotel": (0.20, 0.36),
    "univ": (0.31, 0.60),
    "zara1": (0.26, 0.51),
    "zara2": (0.22, 0.44),
}
# "reproduces" / "reaches" = both ADE and FDE within this fraction of the published value (the
# earlier report's "approaches" margin, kept so that it was not tuned to these runs)
APPROACH_TOLERANCE = 0.10

PUBLISHED = [
    Table(
        columns=["Model", "ETH", "HOTEL", "UNIV", "ZARA1", "ZARA2", "AVG"],
        rows=[
            ["Social-Implicit", ".66/1.44", ".20/.36", ".31/.60", ".25/.50", ".22/.43", ".33/.67"],
            ["Social-STGCNN", "", "", "", "", "", ".44/.75"],
            ["Social-GAN", "", "", "", "", "", ".61/1.21"],
            ["Trajectron++", "", "", "", "", "", ".31/.52"],
        ],
        caption="Published best-of-20 ADE/FDE (metres), leave-one-out ETH/UCY; the baselines' "
        "averages as quoted beside Social-Implicit in the paper. Social-Implicit has 5.8K "
        "parameters (Social-STGCNN 7.6K).",
    ),
    Table(
        columns=["Split", "ETH", "HOTEL", "UNIV", "ZARA1", "ZARA2"],
        rows=[
            ["released weights, ADE/FDE", ".67/1.48", ".20/.36", ".31/.60", ".26/.51", ".22/.44"],
            [
                "released weights, AMD / AMV / KDE-NLL (K=1000)",
                "3.06 / 0.127 / 5.03",
                "0.615 / 0.411 / 0.584",
                "",
                "",
                "",
            ],
        ],  # fmt: skip
        caption="The authors' released weights, measured with their code (ADE/FDE: seed spread "
        "0.653-0.670 / 1.440-1.478 on ETH; AMD/AMV/KDE-NLL at K = 1000 for ETH and HOTEL).",
    ),
]

_METRICS = ("ade", "fde", "amd", "amv", "kde_nll")
_SHIFT_METRICS = ("ade", "fde", "amd", "amv")
_SHIFT_MODEL = {"released": "the authors' released weights", "trained": "our trained model"}


# --- helpers -------------------------------------------------------------------------------------


def _typed(results: list[JSON]) -> list[SocialImplicitResult]:
    return [SocialImplicitResult.from_json(r) for r in results]


def _config(config: JSON):
    """The config that ran, typed (imported here: `social_implicit` imports this module to
    register)."""
    from meanwise.experiments.social_implicit import SocialImplicitConfig

    return from_json(SocialImplicitConfig, config)


def _by_split(results: list[SocialImplicitResult]) -> dict[str, list[SplitResult]]:
    out: dict[str, list[SplitResult]] = {}
    for result in results:
        for split in result.splits:
            out.setdefault(split.split, []).append(split)
    return out


def _metrics_of(run: SplitResult, predictor: str) -> dict[str, float] | None:
    """One predictor's test metrics: "trained", "constant_velocity" or "released" (None
    where the released weights were not evaluated)."""
    if predictor == "trained":
        return run.trained
    if predictor == "constant_velocity":
        return run.constant_velocity
    if predictor == "released":
        return run.released
    raise ValueError(f"unknown predictor {predictor!r}")


def _values(runs: list[SplitResult], predictor: str, metric: str) -> list[float]:
    metrics = [_metrics_of(r, predictor) for r in runs]
    return [m[metric] for m in metrics if m is not None]


def _mean(runs: list[SplitResult], predictor: str, metric: str) -> float | None:
    values = _values(runs, predictor, metric)
    return mean_std(values)[0] if values else None


def _cell(runs: list[SplitResult], predictor: str, metric: str, digits: int = 3) -> str:
    values = _values(runs, predictor, metric)
    return format_mean_std(values, digits) if values else "n/a"


def _probes(runs: list[SplitResult]) -> list[list[ShiftPoint]]:
    """Every shift probe of these runs (one per sampling seed of every seed), each a list of
    points, one per offset."""
    return [points for r in runs for points in r.shift if points]


def _metric(point: ShiftPoint, metric: str) -> float:
    """`point`'s "ade", "fde", "amd" or "amv" (the probe's tables loop over the four)."""
    return {"ade": point.ade, "fde": point.fde, "amd": point.amd, "amv": point.amv}[metric]


def _shift_mean(runs: list[SplitResult]) -> list[ShiftPoint]:
    """The shift probe averaged over its sampling seeds and seeds, point by point."""
    probes = _probes(runs)
    if not probes:
        return []
    out = []
    for i, first in enumerate(probes[0]):
        mean = {m: mean_std([_metric(p[i], m) for p in probes])[0] for m in _SHIFT_METRICS}
        out.append(ShiftPoint(offset=first.offset, **mean))
    return out


def _ratio(points: list[ShiftPoint], index: int, metric: str) -> float:
    base = _metric(points[0], metric)
    return _metric(points[index], metric) / base if base else float("inf")


# --- tables and metrics --------------------------------------------------------------------------


def summarize(results: list[JSON]) -> list[Table]:
    """Per split: every predictor's test metrics; the shift probe; the training runs."""
    results = _typed(results)
    tables = []
    seeds = len(results)
    k = results[0].samples if results else 20
    kd = results[0].distribution_samples if results else "?"
    if any(split.data_missing for r in results for split in r.splits):
        from meanwise.experiments.social_implicit import MISSING_DATA

        tables.append(
            Table(
                columns=["ETH/UCY data"],
                rows=[[MISSING_DATA[0].upper() + MISSING_DATA[1:] + "."]],
                caption="This run did not see the paper's data: every number below is on the "
                "synthetic crowd.",
            )
        )
    for split, runs in _by_split(results).items():
        first = runs[0]
        rows = [
            [f"Social-Implicit, ours ({first.epochs} epochs)"]
            + [_cell(runs, "trained", m) for m in _METRICS],
        ]
        if any(r.released for r in runs):
            rows.append(
                ["Social-Implicit, released weights"]
                + [_cell(runs, "released", m) for m in _METRICS]
            )
        rows.append(["constant velocity"] + [_cell(runs, "constant_velocity", m) for m in _METRICS])
        if split in PUBLISHED_ADE_FDE:
            ade, fde = PUBLISHED_ADE_FDE[split]
            rows.append(["Social-Implicit, published", f"{ade:.2f}", f"{fde:.2f}", "", "", ""])
        data = (
            "ETH/UCY leave-one-out"
            if first.data == "eth_ucy"
            else "the synthetic crowd (social-force pedestrians"
            + (
                ", no ETH/UCY folder found: `meanwise trajectory fetch-data` downloads it)"
                if first.data_missing
                else ")"
            )
        )
        tables.append(
            Table(
                columns=["Predictor", "ADE", "FDE", f"AMD (K={kd})", f"AMV (K={kd})", "KDE-NLL"],
                rows=rows,
                caption=f"{split}: {data}; test {first.test_scenes} scenes / "
                f"{first.test_pedestrians} pedestrians. ADE/FDE best of {k} per pedestrian "
                f"(metres); AMD/AMV/KDE-NLL from {kd} samples per scene (the paper uses 1000, "
                f"so these are not comparable with its AMD/AMV). Mean ± std over {seeds} "
                "seed(s). Constant velocity: the last observed step repeated; "
                "its 20 samples are identical, so its AMD explodes (the covariance is the 1e-6 "
                "regularisation) and KDE-NLL skips every cell (counted as 0).",
            )
        )
        points = _shift_mean(runs)
        if points:
            tables.append(
                Table(
                    columns=[
                        "offset (m)",
                        "ADE",
                        "FDE",
                        "AMD",
                        "AMV",
                        "ADE ×",
                        "FDE ×",
                        "AMD ×",
                        "AMV ×",
                    ],
                    rows=[
                        [f"{p.offset:.2f}"]
                        + [f"{_metric(p, m):.3f}" for m in _SHIFT_METRICS]
                        + [f"{_ratio(points, i, m):.2f}" for m in ("ade", "fde", "amd", "amv")]
                        for i, p in enumerate(points)
                    ],
                    caption=f"{split}: shift probe on "
                    f"{_SHIFT_MODEL.get(first.shift_model, 'our trained model')}, first "
                    f"{first.shift_scenes} test scenes; every sample moved by the offset "
                    "along the diagonal (same draws at every offset); mean over "
                    f"{len(_probes(runs))} sampling seed(s); × = relative to offset 0.",
                )
            )
        tables.append(
            Table(
                columns=["seed", "train scenes", "scenes / epoch", "epochs", "best epoch",
                         "best val ADE", "train s"],
                rows=[
                    [str(seed), str(r.train_scenes), str(r.scenes_per_epoch),
                     str(r.epochs), str(r.best_epoch + 1), f"{min(r.val_ade):.3f}",
                     f"{r.train_seconds:.0f}"]
                    for seed, r in zip((res.seed for res in results), runs, strict=False)
                ],
                caption=f"{split}: training (IMLE, K = 20, SGD lr 1.0, StepLR(45, 0.1), "
                f"{first.accumulate} scenes per step (the paper: 128), the seven "
                f"augmentations, {first.dtype}, batched steps); val "
                f"{first.val_scenes} scenes"
                + (
                    f"; the released weights' val ADE/FDE {first.released_val_ade:.3f}/"
                    f"{first.released_val_fde:.3f} (same protocol)."
                    if first.released_val_ade is not None
                    else "."
                ),
            )
        )  # fmt: skip
    return tables


def metrics(results: list[JSON]) -> dict[str, float]:
    """Headline numbers, flat, for scripts that read results.json."""
    out: dict[str, float] = {}
    for split, runs in _by_split(_typed(results)).items():
        for predictor in ("trained", "released", "constant_velocity"):
            for m in _METRICS:
                value = _mean(runs, predictor, m)
                if value is not None:
                    out[f"{split}.{predictor}.{m}"] = value
        points = _shift_mean(runs)
        if len(points) > 1:
            for m in ("ade", "fde", "amd", "amv"):
                out[f"{split}.shift.{m}_ratio_at_{points[-1].offset:g}m"] = _ratio(points, -1, m)
    return out


# --- claims --------------------------------------------------------------------------------------

#: the paper's training recipe: the budget a run must use before a shortfall from the published
#: numbers can count against the paper (anything shorter only checks our shortened training)
PAPER_TRAINING = {"epochs": 50, "max_train_scenes": 0, "accumulate": 128}
PUBLISHED_PARAMETERS = 5800  # "5.8K parameters"


def _data_text(first: SplitResult) -> str:
    if first.data == "eth_ucy":
        return f"ETH/UCY {first.split.upper()} leave-one-out test set"
    return (
        "the synthetic social-force crowd (no ETH/UCY folder was found on this machine, so "
        "nothing here is about the paper's data)"
    )


def _rel_gap_percent(ade: float, fde: float, split: str) -> float:
    """The larger of |ADE / published − 1| and |FDE / published − 1|, in percent."""
    pub_ade, pub_fde = PUBLISHED_ADE_FDE[split]
    return 100 * max(abs(ade / pub_ade - 1), abs(fde / pub_fde - 1))


def _is_paper_training(first: SplitResult) -> bool:
    return (
        first.epochs >= PAPER_TRAINING["epochs"]
        and first.scenes_per_epoch >= first.train_scenes
        and first.accumulate == PAPER_TRAINING["accumulate"]
    )


def _split_claims(split: str, runs: list[SplitResult], samples: int, kd: Any) -> list[Claim]:
    first = runs[0]
    n = len(runs)
    data = _data_text(first)
    training = (
        f"{first.epochs} epochs of {first.scenes_per_epoch} of {first.train_scenes} "
        f"training scenes, {first.accumulate} scenes per SGD step"
    )
    out: list[Claim] = []
    for metric in ("ade", "fde"):
        trained = _values(runs, "trained", metric)
        cv = _values(runs, "constant_velocity", metric)
        out.append(
            paired_claim(
                f"{split}: IMLE-trained Social-Implicit has a lower best-of-{samples} "
                f"{metric.upper()} than constant velocity",
                trained,
                cv,
                paper_effect=None,
                direction="less",
                unit="m",
                detail=f"Per training seed: our trained model's {metric.upper()} minus constant "
                f"velocity's (the last observed step repeated; deterministic, so the same in "
                f"every seed) on {data}; ours trained {training}. Constant velocity is not in "
                "the paper's table: it is a yardstick any trained predictor should beat.",
            )
        )
    if split in PUBLISHED_ADE_FDE:
        pub_ade, pub_fde = PUBLISHED_ADE_FDE[split]
        sampling = [x for r in runs for x in r.released_sampling]
        if sampling:
            gaps = [_rel_gap_percent(x.ade, x.fde, split) for x in sampling]
            mean_ade = sum(x.ade for x in sampling) / len(sampling)
            mean_fde = sum(x.fde for x in sampling) / len(sampling)
            out.append(
                threshold_claim(
                    f"{split}: the authors' released weights reproduce the published ADE/FDE "
                    f"{pub_ade:.2f}/{pub_fde:.2f} within {100 * APPROACH_TOLERANCE:.0f} %",
                    gaps,
                    threshold=100 * APPROACH_TOLERANCE,
                    paper_effect=0.0,
                    direction="less",
                    unit="%",
                    detail=f"Per sampling seed ({len(sampling)} in all; the weights are fixed, "
                    "so sampling is their only randomness): the larger of |ADE/published − 1| "
                    f"and |FDE/published − 1|, best of {samples} per pedestrian, on {data}. "
                    f"Mean ADE/FDE {mean_ade:.3f}/{mean_fde:.3f}. The tolerance is the earlier "
                    "report's 'approaches' margin (10 %), kept so it was not tuned to these "
                    "runs; the published numbers are rounded to 0.01 m, and the authors' own "
                    "evaluation of these weights gives about the same gap (REFERENCES.md).",
                )
            )
        gaps = [_rel_gap_percent(r.trained["ade"], r.trained["fde"], split) for r in runs]
        claim = threshold_claim(
            f"{split}: Social-Implicit trained with the paper's recipe reaches the published "
            f"ADE/FDE {pub_ade:.2f}/{pub_fde:.2f} within {100 * APPROACH_TOLERANCE:.0f} %",
            gaps,
            threshold=100 * APPROACH_TOLERANCE,
            paper_effect=0.0,
            direction="less",
            unit="%",
            detail=f"Per training seed: the larger of |ADE/published − 1| and "
            f"|FDE/published − 1| of our trained model on {data}; ours trained {training} "
            f"(the paper: {PAPER_TRAINING['epochs']} epochs over every scene, "
            f"{PAPER_TRAINING['accumulate']} scenes per step). Mean ADE/FDE "
            f"{mean_std(_values(runs, 'trained', 'ade'))[0]:.3f}/"
            f"{mean_std(_values(runs, 'trained', 'fde'))[0]:.3f} over {n} seed(s).",
        )
        if not _is_paper_training(first) and claim.status != "supported":
            claim = replace(
                claim,
                status="unresolved",
                detail=claim.detail + " This run's training is shorter than the paper's, so a "
                "gap to the published numbers checks our shortened training, not the paper: "
                "it can neither contradict nor (short of reaching them) support the claim. "
                "Only the full preset's training budget can decide it.",
            )
        out.append(claim)

    probes = _probes(runs)
    if probes and len(probes[0]) > 1:
        who = _SHIFT_MODEL.get(first.shift_model, "our trained model")
        offset = probes[0][-1].offset
        amd = [p[-1].amd / p[0].amd for p in probes]
        best = [max(p[-1].ade / p[0].ade, p[-1].fde / p[0].fde) for p in probes]
        out.append(
            paired_claim(
                f"{split}: AMD reacts more than best-of-{samples} ADE/FDE to a predicted "
                f"distribution shifted {offset:g} m away from the truth",
                amd,
                best,
                paper_effect=None,
                direction="greater",
                unit="× (ratio to no shift)",
                detail=f"Per sampling seed ({len(probes)} in all, paired: the same draws at "
                f"every offset): AMD at a {offset:g} m shift over AMD unshifted, minus the "
                f"larger of the same ratios for ADE and FDE. Probed model: {who}; the first "
                f"{first.shift_scenes} scenes of {data}; AMD from {kd} samples per scene. "
                f"Means: AMD ×{sum(amd) / len(amd):.2f}, max(ADE, FDE) "
                f"×{sum(best) / len(best):.2f}. The paper argues this point; the constant-offset "
                "probe is ours.",
            )
        )
        amv_change = max(abs(point.amv / p[0].amv - 1) for p in probes for point in p)
        out.append(
            deterministic_claim(
                f"{split}: AMV measures the predicted spread only: a constant shift leaves it "
                "unchanged",
                amv_change,
                holds=amv_change < 1e-6,
                paper_effect=0.0,
                detail=f"The largest |AMV(shifted) / AMV(unshifted) − 1| over every offset and "
                f"sampling seed of the probe ({who}, {data}); a constant offset moves the "
                "fitted mixture without changing its covariances, so anything above float "
                "round-off (1e-6) would be an error in the metric.",
            )
        )
    return out


def claims(results: list[JSON]) -> list[Claim]:
    """Per split: trained vs constant velocity (ADE, FDE), the released weights and our
    training vs the published numbers (ETH/UCY only), AMD vs ADE/FDE under a shift, AMV's
    shift invariance; and the model's parameter count."""
    results = _typed(results)
    if not results:
        return []
    samples = results[0].samples
    kd = results[0].distribution_samples
    out: list[Claim] = []
    parameters = results[0].num_parameters
    if parameters:
        out.append(
            deterministic_claim(
                "Social-Implicit has about 5.8K parameters",
                parameters,
                holds=round(parameters, -2) == PUBLISHED_PARAMETERS,
                paper_effect=float(PUBLISHED_PARAMETERS),
                detail=f"Our model's parameter count ({parameters:,}: four Social-Cells of "
                f"{parameters // 4:,}), rounded to hundreds, against the paper's '5.8K'.",
            )
        )
    for split, runs in _by_split(results).items():
        out.extend(_split_claims(split, runs, samples, kd))
    return out


# --- protocol ------------------------------------------------------------------------------------


def _data_that_runs(config: SocialImplicitConfig) -> str:
    """Which data a run with `config` uses on this machine (the claims' details say which data
    each split actually ran on)."""
    from meanwise.experiments.social_implicit import eth_ucy_root

    if config.data == "synthetic":
        return "the synthetic social-force crowd (data='synthetic')"
    try:
        root = eth_ucy_root(config)
    except ValueError as error:  # a data_dir that is not a folder here
        return f"not found on this machine ({error})"
    if root is not None:
        return f"ETH/UCY from {root} (the authors' copy of the standard leave-one-out splits)"
    return (
        "the synthetic social-force crowd: no ETH/UCY folder was found on this machine "
        "(data='auto'), so no claim here is about the paper's data; `meanwise trajectory "
        "fetch-data` downloads it"
    )


def protocol(config: JSON) -> Table:
    """The paper's protocol against the config that ran, row by row, with why each differs."""
    c = _config(config)
    splits = ", ".join(s.upper() for s in c.splits)
    short = (
        c.epochs < PAPER_TRAINING["epochs"]
        or c.max_train_scenes != 0
        or c.accumulate != PAPER_TRAINING["accumulate"]
    )
    scenes = "every scene" if not c.max_train_scenes else f"at most {c.max_train_scenes} scenes"
    rows = [
        ProtocolRow(
            "data",
            "ETH/UCY, leave-one-out over ETH, HOTEL, UNIV, ZARA1, ZARA2 (8 observed + 12 "
            "predicted steps at 2.5 Hz)",
            f"{_data_that_runs(c)}; splits {splits}",
            "same as the paper where ETH/UCY is found; the quick preset runs ZARA1 only (CPU "
            "time). Without the data folder the synthetic crowd stands in: it exercises the "
            "pipeline, and no published number applies to it.",
        ),
        ProtocolRow(
            "model",
            "Social-Implicit, 4 Social-Cells, 5.8K parameters; the released code routes every "
            "pedestrian to zone 0 (its speed is read from the first, always-zero, step)",
            "the same cells; our training routes pedestrians to the four zones by their top "
            "observed speed; the released weights are evaluated in compatibility mode "
            "(zone 0 for all, float64)",
            "the released code's zone choice is a bug (REFERENCES.md); real zones use all four "
            "cells, which the paper describes. It may change our trained numbers slightly, not "
            "the released weights'.",
        ),
        ProtocolRow(
            "training budget",
            "50 epochs over every training scene, gradients accumulated over 128 scenes, the "
            "learning rate x0.1 after 45 epochs",
            f"{c.epochs} epochs over {scenes} per epoch, {c.accumulate} scenes per step, "
            f"x0.1 after {c.lr_step_epochs} epochs",
            (
                "CPU time (the quick preset fits in ~5 minutes of 2 cores). Fewer epochs can "
                "leave our model short of the published numbers; a shortfall then checks our "
                "shortened training, not the paper (its claim stays unresolved unless reached); "
                "smaller steps give the few epochs more updates."
            )
            if short
            else "same as the paper",
        ),
        ProtocolRow(
            "batching",
            "one scene per forward, gradients accumulated over the 128 scenes of a step",
            "the scenes of a step packed side by side in one forward and backward (an empty "
            "column between scenes), each scene's nearest sample and loss terms its own",
            "speed only: the gradient equals the per-scene one (a float64 test, 1e-10, with the "
            "augmentations and all four zones).",
        ),
        ProtocolRow(
            "optimizer and schedule",
            "SGD lr 1.0, StepLR(45 epochs, ×0.1); IMLE with K = 20 (the nearest sample of the "
            "scene); L1 + weighted distance / angle / triplet terms; seven augmentations",
            f"the same (meanwise.trajectory.train), {c.dtype}; the angle "
            "term as atan2 clamped to the reference's range (the same values, finite "
            "gradients in float32); the best epoch on validation ADE is kept (the reference: "
            "validation loss, 5 % threshold)",
            "same as the paper"
            if c.dtype == "float64"
            else "float32 for CPU time (~2x faster); a test checks that float32 and float64 "
            "training follow each other (1e-4 over six steps)",
        ),
        ProtocolRow(
            "runs / seeds",
            "one trained model per split (the released weights); no seeds or intervals "
            "recorded in REFERENCES.md",
            f"{c.seeds} training seed(s) per split; {c.probe_seeds} sampling seeds per "
            "run for the fixed predictors (the released weights, the shift probe)",
            "claims on our training need ≥ 2 training seeds for an interval"
            + (
                " (the quick preset trains one, for time: those claims stay unresolved)"
                if c.seeds < 2
                else ""
            )
            + "; a fixed model's only randomness is its sampling, so its claims' intervals are "
            "over sampling seeds.",
        ),
        ProtocolRow(
            "metrics",
            "best-of-20 ADE/FDE per pedestrian (metres); AMD / AMV / KDE-NLL from 1000 samples",
            f"best-of-{c.samples} ADE/FDE per pedestrian; AMD / AMV / KDE-NLL from "
            f"{c.distribution_samples} samples per scene",
            "same as the paper"
            if c.distribution_samples >= 1000
            else "CPU time (a mixture fit per step and pedestrian): AMD/AMV at fewer samples "
            "are noisier and not comparable with the paper's values; the shift probe compares "
            "them only with themselves.",
        ),
        ProtocolRow(
            "comparisons",
            "published numbers of Social-STGCNN, Social-GAN, Trajectron++ and others",
            "the released weights, constant velocity, the published Social-Implicit numbers",
            "the other models are not implemented here; their published averages are shown "
            "for reference, not tested.",
        ),
        ProtocolRow(
            "AMD/AMV argument",
            "best-of-N ADE/FDE barely notices a distribution that has moved away from the "
            "truth; AMD / AMV judge the whole distribution (argued in the paper)",
            f"a probe: every sample moved by {', '.join(f'{o:g}' for o in c.shift_offsets)} "
            f"m along the diagonal on the first {c.shift_scenes or 'all'} test scenes, the "
            "same draws at every offset; on the released weights (our trained model on the "
            "synthetic crowd)",
            "our test of the paper's argument: a constant offset is the simplest moved "
            "distribution; it cannot probe shapes a shift leaves alone.",
        ),
    ]
    return protocol_table(rows, caption="Mohamed et al. (ECCV 2022) against the config that ran.")


# --- figures -------------------------------------------------------------------------------------


def _draw_shift(split: str, points: list[ShiftPoint]):
    def draw(fig) -> None:
        best, dist, rel = fig.subplots(1, 3)
        offsets = [p.offset for p in points]
        for i, m in enumerate(("ade", "fde")):
            best.plot(
                offsets, [_metric(p, m) for p in points], "o-", color=f"C{i}", label=m.upper()
            )
        for i, m in enumerate(("amd", "amv")):
            dist.plot(
                offsets, [_metric(p, m) for p in points], "s-", color=f"C{i + 2}", label=m.upper()
            )
        for i, m in enumerate(("ade", "fde", "amd", "amv")):
            rel.plot(
                offsets,
                [_ratio(points, j, m) for j in range(len(points))],
                ("o-" if i < 2 else "s-"),
                color=f"C{i}",
                label=m.upper(),
            )
        best.set(title=f"{split}: best-of-N ADE/FDE", xlabel="shift (m)", ylabel="m")
        dist.set(title="AMD / AMV", xlabel="shift (m)")
        rel.set(title="relative to no shift", xlabel="shift (m)", ylabel="×")
        for ax in (best, dist, rel):
            ax.legend(fontsize=7)

    return draw


def _draw_training(by_split: dict[str, list[SplitResult]]):
    def draw(fig) -> None:
        loss_ax, ade_ax = fig.subplots(1, 2)
        for i, (split, runs) in enumerate(by_split.items()):
            for j, r in enumerate(runs):
                epochs = range(1, len(r.train_loss) + 1)
                label = split if j == 0 else None
                loss_ax.plot(epochs, r.train_loss, ".-", color=f"C{i}", label=label)
                ade_ax.plot(epochs, r.val_ade, ".-", color=f"C{i}", label=label)
            released = runs[0].released_val_ade
            if released is not None:
                ade_ax.axhline(
                    released,
                    color=f"C{i}",
                    linestyle="--",
                    linewidth=1,
                    label=f"{split}: released weights",
                )
        loss_ax.set(title="IMLE training loss (mean per scene)", xlabel="epoch")
        ade_ax.set(title="validation best-of-20 ADE (m)", xlabel="epoch")
        loss_ax.legend(fontsize=7)
        ade_ax.legend(fontsize=7)

    return draw


def figures(config: JSON, results: list[JSON]) -> list[FigureSpec]:
    """The shift probe per split, and the training curves."""
    results = _typed(results)
    specs = []
    by_split = _by_split(results)
    for split, runs in by_split.items():
        points = _shift_mean(runs)
        if len(points) > 1:
            specs.append(
                FigureSpec(
                    f"shift-{split}",
                    f"{split}: every sample of "
                    f"{_SHIFT_MODEL.get(runs[0].shift_model, 'our trained model')} moved "
                    "by a constant offset (mean over sampling seeds). "
                    "Left, best-of-N ADE/FDE; middle, AMD/AMV; right, each relative to the "
                    "unshifted value.",
                    _draw_shift(split, points),
                    size=(12.0, 3.4),
                )
            )
    if by_split:
        specs.append(
            FigureSpec(
                "training",
                "Training loss and validation best-of-20 ADE per epoch (one line per split and "
                "seed); dashed: the authors' released weights on the same validation scenes "
                "and draws.",
                _draw_training(by_split),
                size=(10.0, 3.2),
            )
        )
    return specs
