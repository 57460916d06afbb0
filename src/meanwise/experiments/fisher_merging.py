"""Experiment `fisher-merging`: the paper's two settings where plain averaging was already in use,
at digits scale, plus one explicitly labelled extra.

Pre-training is on a *broad* distribution: the pre-training split with random rotations,
translations and noise redrawn every epoch. Fine-tuning is on the *narrow* one: clean images of
a separate fine-tuning split. Merge coefficients are chosen on a clean validation split; the test
split is fixed (split seed 0).

(a) Ensembling (the paper's GLUE experiment): one pre-trained model, 5 copies fine-tuned on the
    SAME 10-way task with different data orders, and the first N ∈ {2, 3, 5} merged. Two head
    settings: "fresh" (the body pre-trained on a related task, digit mod 5, and every copy given
    a freshly initialised 10-way head, as BERT gets one per fine-tune) and "shared" (every copy
    starts from the pre-trained 10-way model, head included). Plain averaging and Fisher merging
    with the authors' options (`MergeOptions.from_preset("authors")`: normalized exact Fishers
    over up to 4096 fine-tuning examples, floor on the target only, body merged, the target's
    head kept) each get the paper's coefficient search on validation (a 51-point grid for two
    models, Dirichlet samples for more; the same candidates for both), then are scored on the
    test set beside the output ensemble (mean of the N softmaxes) and the individual models.
(b) Robust fine-tuning (WiSE-FT): the broad pre-trained model and its fine-tune on the clean
    split, interpolated as (λ fine-tuned + (1 − λ) pre-trained), plainly and Fisher-weighted
    (authors' preset, the fine-tuned model as target; each model's Fisher on its own training
    distribution), on the λ grid. Clean (in-distribution) and shifted (rotated / translated /
    noisy test images) accuracy for every λ; λ is chosen on clean validation accuracy.
Extra, not in the paper: the multi-task merge of models fine-tuned on disjoint class groups,
    with the confidence analysis that explains why Fisher weighting loses there.

The report side is in `fisher_merging_report`; the model, data and trainer in
`fisher_merging_models`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meanwise.data import NUM_CLASSES
from meanwise.experiments.base import progress, seeded, torch_threads
from meanwise.experiments.fisher_merging_models import (
    BODY_KEYS,
    MLP,
    Pair,
    Splits,
    State,
    accuracy,
    accuracy_and_nll,
    as_module,
    broad_augment,
    logits,
    make_splits,
    shifted_test_sets,
    subset,
    train_copies,
)
from meanwise.experiments.fisher_merging_results import (
    EnsemblingCell,
    FisherMergingResult,
    MultitaskResult,
    RobustResult,
    SampledFisher,
    TaskScores,
)
from meanwise.merging import (
    MergeOptions,
    average_merge,
    candidate_coefficients,
    diagonal_fisher,
    fisher_merge,
)

__all__ = ["FisherMergingConfig", "FisherMergingResult", "run", "HEADS", "SHIFTS"]

HEADS: tuple[str, ...] = ("fresh", "shared")
SHIFTS: tuple[str, ...] = ("rotated", "translated", "noisy")
RELATED_CLASSES = 5  # the related pre-training task of the "fresh" setting: digit mod 5


@dataclass(frozen=True)
class FisherMergingConfig:
    """Settings of all parts; `quick()` is sized for the demo (2 cores), `full()` for the report."""

    seeds: int = 8
    hidden: int = 64
    pretrain_fraction: float = 0.4  # of the training images; the rest minus validation fine-tunes
    validation_fraction: float = 0.2
    pretrain_epochs: int = 25  # on the broad (augmented) distribution
    finetune_epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    # the broad pre-training distribution: uniform in ± these
    augment_degrees: float = 30.0
    augment_shift: float = 1.0
    augment_noise: float = 0.8
    # the shifted test sets of (b)
    shift_degrees: tuple[float, float] = (15.0, 30.0)
    shift_pixels: float = 1.0
    shift_noise: float = 0.8
    # (a)
    ensemble_sizes: tuple[int, ...] = (2, 3, 5)
    grid_points: int = 51  # coefficient candidates for two models (the authors' grid)
    dirichlet_samples: int = 30  # candidates for more than two models (full preset: 50)
    fisher_examples: int = 4096  # the authors' number (our splits are smaller, so all of them)
    floor: float = 1e-6
    sampled_draws: int = 128  # draws per example of the sampled-Fisher check (error < 10 %)
    # (b)
    lambdas: int = 51
    # the extra multi-task merge
    multitask_tasks: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    multitask: bool = True
    split_seed: int = 0
    test_fraction: float = 0.25
    num_threads: int = 1

    def __post_init__(self) -> None:
        fractions = (self.pretrain_fraction, self.validation_fraction)
        if min(fractions) <= 0 or sum(fractions) >= 1:
            raise ValueError(
                f"pretrain_fraction and validation_fraction must be > 0 with a sum < 1 (the "
                f"rest fine-tunes); got {fractions}"
            )
        positive = {
            "seeds": self.seeds, "hidden": self.hidden, "batch_size": self.batch_size,
            "pretrain_epochs": self.pretrain_epochs, "finetune_epochs": self.finetune_epochs,
            "dirichlet_samples": self.dirichlet_samples, "fisher_examples": self.fisher_examples,
            "sampled_draws": self.sampled_draws,
        }  # fmt: skip
        bad = {k: v for k, v in positive.items() if not (isinstance(v, int) and v >= 1)}
        if bad:
            raise ValueError(f"these settings must be integers >= 1: {bad}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        sizes = self.ensemble_sizes
        if not sizes or any(n < 2 for n in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"ensemble_sizes must be increasing integers >= 2; got {sizes}")
        if self.grid_points < 2 or self.lambdas < 2:
            raise ValueError(
                f"grid_points and lambdas must be >= 2; got {self.grid_points}, {self.lambdas}"
            )
        if self.floor < 0:
            raise ValueError(f"floor must be >= 0; got {self.floor}")
        low, high = self.shift_degrees
        if not 0 <= low <= high:
            raise ValueError(f"shift_degrees must be (low, high) with 0 <= low <= high; got "
                             f"{self.shift_degrees}")  # fmt: skip
        if min(self.augment_degrees, self.augment_shift, self.augment_noise) < 0:
            raise ValueError("augment_degrees, augment_shift and augment_noise must be >= 0")
        if min(self.shift_pixels, self.shift_noise) < 0:
            raise ValueError("shift_pixels and shift_noise must be >= 0")
        tasks = self.multitask_tasks
        flat = [c for task in tasks for c in task]
        if (
            len(tasks) < 2
            or len(set(flat)) != len(flat)
            or not all(0 <= c < NUM_CLASSES for c in flat)
        ):
            raise ValueError(
                f"multitask_tasks must be at least two disjoint groups of classes 0-9; got {tasks}"
            )

    @property
    def copies(self) -> int:
        """Fine-tuned copies per head setting (the largest ensemble; smaller ones are prefixes)."""
        return max(self.ensemble_sizes)

    @classmethod
    def quick(cls) -> FisherMergingConfig:
        return cls()

    @classmethod
    def full(cls) -> FisherMergingConfig:
        """More seeds, and twice the fine-tuning."""
        return cls(seeds=20, finetune_epochs=20, dirichlet_samples=50)


# --- helpers -----------------------------------------------------------------------------------


def _fisher(
    state: State,
    data: Pair,
    config: FisherMergingConfig,
    keys: tuple[str, ...] | None = None,
    mode: str = "exact",
    draws: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    return diagonal_fisher(
        as_module(state, config.hidden),
        [data],
        mode=mode,
        n_samples=draws,
        max_examples=config.fisher_examples,
        params=keys,
        generator=generator,
    )


def relative_error(estimate: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """‖estimate − exact‖₂ / ‖exact‖₂ over all entries of all tensors."""
    num = sum(float((estimate[k] - exact[k]).double().square().sum()) for k in exact)
    den = sum(float(exact[k].double().square().sum()) for k in exact)
    return (num / den) ** 0.5


def _search(
    merge: Callable[[list[float]], State],
    candidates: list[list[float]],
    validation: Pair,
) -> tuple[list[float], State]:
    """The candidate with the best validation accuracy; ties (accuracy moves in steps of one
    example) go to the lower validation loss, not to the first candidate of the grid."""
    best_key, best = None, None
    for lam in candidates:
        state = merge(lam)
        acc, loss = accuracy_and_nll(state, validation)
        key = (acc, -loss)
        if best_key is None or key > best_key:
            best_key, best = key, (lam, state)
    assert best is not None
    return best


def _pretrain(config: FisherMergingConfig, splits: Splits, generator) -> dict[str, State]:
    """Two MLPs trained side by side on the broad (augmented) pre-training distribution: on the
    10-way task ("shared": its head is fine-tuned further) and on digit mod 5 ("fresh": only
    its body is used; its 10-logit head sees labels 0-4 only and is discarded)."""

    def augment(x: torch.Tensor) -> torch.Tensor:
        return broad_augment(
            x, generator, splits.background, config.augment_degrees, config.augment_shift,
            config.augment_noise,
        )  # fmt: skip

    inits = [MLP(config.hidden).state_dict() for _ in HEADS]
    fresh, shared = train_copies(
        inits, splits.pretrain, config.pretrain_epochs, config.batch_size, config.lr, generator,
        augment=augment, label_maps=[lambda y: y % RELATED_CLASSES, None],
    )  # fmt: skip
    return {"fresh": fresh, "shared": shared}


def _broad_sample(config: FisherMergingConfig, splits: Splits, generator) -> Pair:
    """Up to `fisher_examples` draws from the broad pre-training distribution."""
    x, y = splits.pretrain
    repeats = max(1, -(-config.fisher_examples // x.shape[0]))
    xs, ys = x.repeat(repeats, 1, 1, 1), y.repeat(repeats)
    augmented = broad_augment(
        xs, generator, splits.background, config.augment_degrees, config.augment_shift,
        config.augment_noise,
    )  # fmt: skip
    return augmented[: config.fisher_examples], ys[: config.fisher_examples]


# --- (a) ensembling ------------------------------------------------------------------------------


def _copies(
    config: FisherMergingConfig, splits: Splits, pretrained: State, head: str, generator
) -> list[State]:
    """`config.copies` fine-tunes of `pretrained` on the clean 10-way task."""
    inits = []
    for _ in range(config.copies):
        fresh = MLP(config.hidden).state_dict()  # a new 10-way head per copy ("fresh")
        init = {k: pretrained[k].clone() for k in BODY_KEYS}
        for k in ("head.weight", "head.bias"):
            init[k] = fresh[k] if head == "fresh" else pretrained[k].clone()
        inits.append(init)
    return train_copies(
        inits, splits.finetune, config.finetune_epochs, config.batch_size, config.lr, generator
    )


def _ensemble_accuracy(states: list[State], data: Pair) -> float:
    """The output ensemble: the mean of the members' predicted probabilities."""
    x, y = data
    with torch.no_grad():
        probs = torch.stack([F.softmax(logits(s, x), 1) for s in states]).mean(0)
    return 100.0 * float((probs.argmax(1) == y).double().mean())


def _authors(config) -> MergeOptions:
    """The authors' Fisher options (max floor on the target only, normalized) at the config's
    floor."""
    return MergeOptions.from_preset("authors", floor=config.floor)


def _ensembling(config, splits, generator, result: FisherMergingResult) -> dict[str, list[State]]:
    pretrained = _pretrain(config, splits, generator)
    result.pretrained_test_acc["shared"] = accuracy(pretrained["shared"], splits.test)
    copies: dict[str, list[State]] = {}
    for head in progress(HEADS, desc=f"seed {result.seed} ensembling"):
        states = _copies(config, splits, pretrained[head], head, generator)
        copies[head] = states
        fishers = [_fisher(s, splits.finetune, config, BODY_KEYS) for s in states]
        if head == "fresh":
            result.sampled_fisher["(a) fresh-head copy 1, body"] = _sampled_check(
                config, states[0], fishers[0], splits, generator, BODY_KEYS
            )
        for n in config.ensemble_sizes:
            members, member_fishers = states[:n], fishers[:n]
            candidates = candidate_coefficients(
                n, config.grid_points, config.dirichlet_samples, generator
            )
            merges = {
                "plain": lambda lam, m=members: average_merge(m, lam, keep_target=["head"]),
                "fisher": lambda lam, m=members, f=member_fishers: fisher_merge(
                    m, f, lam, options=_authors(config), keep_target=["head"]
                ),
            }
            test: dict[str, float] = {}
            chosen: dict[str, list[float]] = {}
            for method, merge in merges.items():
                lam, state = _search(merge, candidates, splits.validation)
                chosen[method] = lam
                test[f"{method} (λ searched)"] = accuracy(state, splits.test)
                test[f"{method} (equal λ)"] = accuracy(merge([1.0 / n] * n), splits.test)
            individual = [accuracy(s, splits.test) for s in members]
            with torch.no_grad():
                predictions = [logits(s, splits.test[0]).argmax(1) for s in members]
            # how different the members are: % of test images where copy k ≠ copy 1
            disagreement = [
                100.0 * float((p != predictions[0]).double().mean()) for p in predictions[1:]
            ]
            test["output ensemble"] = _ensemble_accuracy(members, splits.test)
            test["target (copy 1)"] = individual[0]
            test["individual (mean)"] = sum(individual) / n
            test["individual (best)"] = max(individual)
            result.ensembling.append(
                EnsemblingCell(
                    head=head,
                    n_models=n,
                    test_acc=test,
                    individual_test_acc=individual,
                    chosen_lambda=chosen,
                    candidates=len(candidates),
                    disagreement=sum(disagreement) / len(disagreement),
                )
            )
    return {"pretrained_shared": [pretrained["shared"]], **copies}


def _sampled_check(
    config, state: State, exact, splits: Splits, generator, keys: tuple[str, ...] | None
) -> SampledFisher:
    """The sampled Fisher of one fine-tuned model against its exact Fisher (same examples).

    Its labels come from a generator of its own (derived from the seed's), so the check does not
    shift the random stream of the experiment: changing `sampled_draws` changes no merge."""
    own = torch.Generator().manual_seed(generator.initial_seed() + 7919 * (1 + (keys is None)))
    draws = sorted({1, config.sampled_draws})
    errors = []
    for s in draws:
        sampled = _fisher(state, splits.finetune, config, keys, "sampled", s, own)
        errors.append(relative_error(sampled, exact))
    examples = min(config.fisher_examples, splits.finetune[1].shape[0])
    return SampledFisher(draws=draws, relative_error=errors, examples=examples)


# --- (b) robust fine-tuning ----------------------------------------------------------------------


def _robust(
    config, splits, generator, pretrained: State, finetuned: State
) -> tuple[RobustResult, SampledFisher]:
    """The λ curves of both rules and the sampled-Fisher check of the fine-tuned model."""
    shifted = shifted_test_sets(
        splits.test, splits.background, config.shift_degrees, config.shift_pixels,
        config.shift_noise, seed=config.split_seed + 1,
    )  # fmt: skip
    # each model's Fisher on its own training distribution; the fine-tuned model is the target
    fishers = [
        _fisher(finetuned, splits.finetune, config),
        _fisher(pretrained, _broad_sample(config, splits, generator), config),
    ]
    sampled = _sampled_check(config, finetuned, fishers[0], splits, generator, None)
    states = [finetuned, pretrained]
    grid = [i / (config.lambdas - 1) for i in range(config.lambdas)]
    merges = {
        "plain": lambda lam: average_merge(states, [lam, 1 - lam]),
        "fisher": lambda lam: fisher_merge(
            states, fishers, [lam, 1 - lam], options=_authors(config)
        ),
    }
    out = RobustResult(lambdas=grid, curves={}, chosen_lambda={}, at_chosen={})
    for method, merge in merges.items():
        curve: dict[str, list[float]] = {"val": [], "val_nll": [], "id_test": []}
        curve.update({name: [] for name in SHIFTS})
        for lam in grid:
            state = merge(lam)  # at λ = 0 and 1 both rules return one model (tested)
            acc, loss = accuracy_and_nll(state, splits.validation)
            curve["val"].append(acc)
            curve["val_nll"].append(loss)
            curve["id_test"].append(accuracy(state, splits.test))
            for name, data in shifted.items():
                curve[name].append(accuracy(state, data))
        per_shift = zip(*(curve[s] for s in SHIFTS), strict=True)
        curve["shift_test"] = [sum(v) / len(SHIFTS) for v in per_shift]
        best = max(range(len(grid)), key=lambda i: (curve["val"][i], -curve["val_nll"][i]))
        out.curves[method] = curve
        out.chosen_lambda[method] = grid[best]
        out.at_chosen[method] = {k: curve[k][best] for k in ("id_test", "shift_test", *SHIFTS)}
    return out, sampled


# --- extra: the multi-task merge -----------------------------------------------------------------


def _multitask(config, splits, generator, pretrained: State) -> MultitaskResult:
    """One model per disjoint class group, all from the shared pre-trained model and its head,
    merged with equal weights; 10-way accuracy per group. Not an experiment of the paper."""
    tasks = config.multitask_tasks
    states, fishers, confidence, fisher_total = [], [], [], []
    for task in tasks:
        data = subset(splits.finetune, task)
        (state,) = train_copies(
            [pretrained], data, config.finetune_epochs, config.batch_size, config.lr, generator
        )
        fisher = _fisher(state, data, config)
        with torch.no_grad():
            probs = F.softmax(logits(state, data[0]), 1)
        states.append(state)
        fishers.append(fisher)
        confidence.append(100.0 * float(probs.max(1).values.mean()))
        fisher_total.append(sum(float(f.sum()) for f in fishers[-1].values()))
    merges = {
        "plain average": average_merge(states),
        "Fisher (exact)": fisher_merge(states, fishers, options=MergeOptions(floor=config.floor)),
        "Fisher (authors' preset)": fisher_merge(states, fishers, options=_authors(config)),
    }  # fmt: skip
    scored = {
        name: TaskScores(task_acc=[accuracy(s, subset(splits.test, t)) for t in tasks],
                         union_acc=accuracy(s, splits.test))
        for name, s in {**{f"task {i + 1} model": s for i, s in enumerate(states)},
                        **merges}.items()
    }  # fmt: skip
    return MultitaskResult(
        tasks=[list(t) for t in tasks],
        scored=scored,
        output_ensemble_union_acc=_ensemble_accuracy(states, splits.test),
        confidence=confidence,  # mean max-probability on each model's own Fisher data (%)
        fisher_total=fisher_total,  # Σ of each model's exact Fisher over all parameters
    )


# --- the run -------------------------------------------------------------------------------------


def run(config: FisherMergingConfig, seed: int) -> FisherMergingResult:
    """All parts for one seed (a few seconds on one core)."""
    start = time.perf_counter()
    result = FisherMergingResult(seed=seed)
    with torch_threads(config.num_threads), seeded(seed) as generator:
        splits = make_splits(
            config.pretrain_fraction, config.validation_fraction, config.split_seed,
            config.test_fraction, generator,
        )  # fmt: skip
        result.num_parameters = sum(p.numel() for p in MLP(config.hidden).parameters())
        models = _ensembling(config, splits, generator, result)
        pretrained = models["pretrained_shared"][0]
        # (b) reuses the shared setting's first copy: the pre-trained 10-way model fine-tuned
        result.robust, sampled = _robust(config, splits, generator, pretrained, models["shared"][0])
        result.sampled_fisher["(b) fine-tuned model, all parameters"] = sampled
        if config.multitask:
            result.multitask = _multitask(config, splits, generator, pretrained)
    result.seconds = time.perf_counter() - start
    return result


def _register() -> None:
    from meanwise.experiments import fisher_merging_report as report
    from meanwise.experiments.registry import register_reproduction

    register_reproduction(
        "fisher-merging",
        "Fisher merging: ensembling and robust fine-tuning, Fisher-weighted vs plain averaging",
        FisherMergingConfig,
        run,
        report,
    )


_register()
