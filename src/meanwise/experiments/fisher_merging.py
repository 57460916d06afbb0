"""Experiment `fisher-merging`: Fisher-weighted vs plain averaging of fine-tuned MLPs on digits.

One shared "pre-trained" MLP (trained briefly on all ten classes of a pre-training split) is
fine-tuned on narrower tasks from a separate fine-tuning split; then

(a) ensembling-style merging: one model per task (classes {0-3}, {4-6}, {7-9} by default), merged
    with equal coefficients by plain averaging and by Fisher merging (exact and sampled Fisher,
    each model's Fisher on its own task's fine-tuning examples). Every model and merge is scored
    on each task's test examples (10-way argmax) and on the whole test set (the union);
(b) robust fine-tuning (WiSE-FT style): the pre-trained model (Fisher on the pre-training split)
    and a model fine-tuned on the first task (Fisher on its task data), interpolated with
    coefficients (1 - λ, λ) over a grid, plainly and Fisher-weighted. Accuracy on the task and on
    the union is recorded for every λ; as in the paper, λ is chosen on held-out validation data
    (best union accuracy) and the test accuracies at that λ are the headline.

The digits test split is fixed (split seed 0); the seed draws the split of the training images
into pre-training / fine-tuning / validation parts, the initial weights and the batch order.
The report side is in `fisher_merging_report`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data import NUM_CLASSES, load_digits
from meanwise.experiments.base import progress, seeded, torch_threads
from meanwise.merging import average_merge, diagonal_fisher, fisher_merge

__all__ = ["FisherMergingConfig", "FisherMergingResult", "ScoredModel", "MLP", "run"]


@dataclass(frozen=True)
class FisherMergingConfig:
    """Settings of both parts; `quick()` runs in well under a minute on 2 cores for 3 seeds."""

    seeds: int = 3
    tasks: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    hidden: int = 64
    pretrain_fraction: float = 0.4  # of the training images; the rest minus validation fine-tunes
    validation_fraction: float = 0.2
    pretrain_epochs: int = 6
    finetune_epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    fisher_examples: int = 4096  # the authors' number; the splits here are smaller
    sampled_n: int = 1  # draws per example for the sampled Fisher
    floor: float = 1e-6
    normalize: bool = False
    lambdas: int = 11  # grid points for (b), λ = 0, 0.1, ..., 1
    split_seed: int = 0
    test_fraction: float = 0.25
    num_threads: int = 1

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"tasks needs at least two class groups; got {self.tasks}")
        flat = [c for task in self.tasks for c in task]
        if len(set(flat)) != len(flat) or not all(0 <= c < NUM_CLASSES for c in flat):
            raise ValueError(f"tasks must be disjoint groups of classes 0-9; got {self.tasks}")
        fractions = (self.pretrain_fraction, self.validation_fraction)
        if min(fractions) <= 0 or sum(fractions) >= 1:
            raise ValueError(
                f"pretrain_fraction and validation_fraction must be > 0 with a sum < 1 (the "
                f"rest fine-tunes); got {fractions}"
            )
        if min(self.seeds, self.batch_size, self.finetune_epochs, self.hidden) < 1:
            raise ValueError("seeds, batch_size, finetune_epochs and hidden must be >= 1")
        if self.lambdas < 2:
            raise ValueError(f"lambdas (grid points) must be >= 2; got {self.lambdas}")

    @classmethod
    def quick(cls) -> FisherMergingConfig:
        return cls()

    @classmethod
    def full(cls) -> FisherMergingConfig:
        """More seeds, a wider net, a 21-point λ grid."""
        return cls(seeds=5, hidden=128, finetune_epochs=30, lambdas=21)


@dataclass
class ScoredModel:
    """A model or merge: accuracy (%) on each task's test examples and on the whole test set."""

    name: str
    task_acc: list[float]
    union_acc: float


@dataclass
class FisherMergingResult:
    seed: int
    num_parameters: int = 0
    tasks: list[list[int]] = field(default_factory=list)
    ensembling: list[ScoredModel] = field(default_factory=list)
    # (b): the λ grid and, per method, target-task / union test and union validation accuracy
    lambdas: list[float] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    robust: list[ScoredModel] = field(default_factory=list)  # at the λ chosen on validation
    chosen_lambda: dict[str, float] = field(default_factory=dict)
    sampled_vs_exact_error: float = 0.0  # relative L2 error of the sampled Fisher
    seconds: float = 0.0


class MLP(nn.Module):
    """64 pixels -> hidden -> hidden -> 10, tanh: a few thousand parameters, trains in seconds."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class _Splits:
    pretrain: tuple[Tensor, Tensor]
    finetune: tuple[Tensor, Tensor]
    validation: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def _splits(config: FisherMergingConfig, generator: torch.Generator) -> _Splits:
    data = load_digits(config.split_seed, config.test_fraction)
    images, labels = data.train_images, data.train_labels
    parts: dict[str, list[Tensor]] = {"pretrain": [], "finetune": [], "validation": []}
    for c in range(NUM_CLASSES):  # stratified, so every part has every class
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_pre = round(config.pretrain_fraction * len(members))
        n_val = round(config.validation_fraction * len(members))
        parts["pretrain"].append(members[:n_pre])
        parts["validation"].append(members[n_pre : n_pre + n_val])
        parts["finetune"].append(members[n_pre + n_val :])
    picked = {k: torch.cat(v).sort().values for k, v in parts.items()}
    return _Splits(
        **{k: (images[idx], labels[idx]) for k, idx in picked.items()},
        test=(data.test_images, data.test_labels),
    )


def _subset(pair: tuple[Tensor, Tensor], classes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    x, y = pair
    mask = torch.isin(y, torch.tensor(classes))
    return x[mask], y[mask]


def _train(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    epochs: int,
    config: FisherMergingConfig,
    generator: torch.Generator,
) -> None:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def _accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    x, y = data
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).double().mean())


def _score(name: str, model: nn.Module, splits: _Splits, tasks) -> ScoredModel:
    return ScoredModel(
        name=name,
        task_acc=[_accuracy(model, _subset(splits.test, t)) for t in tasks],
        union_acc=_accuracy(model, splits.test),
    )


def _loaded(state: dict[str, Tensor], hidden: int) -> nn.Module:
    model = MLP(hidden)
    model.load_state_dict(state)
    return model.eval()


def _fisher(model: nn.Module, data: tuple[Tensor, Tensor], mode: str, config, generator):
    return diagonal_fisher(
        model,
        [data],
        mode=mode,
        n_samples=config.sampled_n,
        max_examples=config.fisher_examples,
        generator=generator,
    )


def _relative_error(estimate: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    num = sum(float((estimate[k] - exact[k]).double().square().sum()) for k in exact)
    den = sum(float(exact[k].double().square().sum()) for k in exact)
    return (num / den) ** 0.5


def _ensembling(config, splits, pretrained, generator, result) -> None:
    tasks = config.tasks
    models, exact, sampled = [], [], []
    for i, task in enumerate(progress(tasks, desc=f"seed {result.seed} fine-tune")):
        model = _loaded(pretrained.state_dict(), config.hidden)
        _train(model, _subset(splits.finetune, task), config.finetune_epochs, config, generator)
        models.append(model)
        task_data = _subset(splits.finetune, task)
        exact.append(_fisher(model, task_data, "exact", config, generator))
        sampled.append(_fisher(model, task_data, "sampled", config, generator))
        result.ensembling.append(_score(f"fine-tuned on task {i + 1}", model, splits, tasks))
    result.sampled_vs_exact_error = sum(
        _relative_error(s, e) for s, e in zip(sampled, exact, strict=True)
    ) / len(exact)
    states = [m.state_dict() for m in models]
    merges = {
        "plain average": average_merge(states),
        "Fisher merge (exact)": fisher_merge(
            states, exact, floor=config.floor, normalize=config.normalize
        ),
        "Fisher merge (exact, normalized)": fisher_merge(
            states, exact, floor=config.floor, normalize=True
        ),
        "Fisher merge (sampled)": fisher_merge(
            states, sampled, floor=config.floor, normalize=config.normalize
        ),
    }
    result.ensembling.insert(0, _score("pre-trained", pretrained, splits, tasks))
    for name, state in merges.items():
        result.ensembling.append(_score(name, _loaded(state, config.hidden), splits, tasks))


def _robust(config, splits, pretrained, generator, result) -> None:
    task = config.tasks[0]
    finetuned = _loaded(pretrained.state_dict(), config.hidden)
    _train(finetuned, _subset(splits.finetune, task), config.finetune_epochs, config, generator)
    fishers = [
        _fisher(pretrained, splits.pretrain, "exact", config, generator),
        _fisher(finetuned, _subset(splits.finetune, task), "exact", config, generator),
    ]
    states = [pretrained.state_dict(), finetuned.state_dict()]
    grid = [i / (config.lambdas - 1) for i in range(config.lambdas)]
    result.lambdas = grid
    merges = {
        "plain": lambda lam: average_merge(states, [1 - lam, lam]),
        "Fisher": lambda lam: fisher_merge(
            states, fishers, [1 - lam, lam], floor=config.floor, normalize=config.normalize
        ),
    }
    for method, merge in merges.items():
        curve: dict[str, list[float]] = {"target": [], "union": [], "val_union": []}
        for lam in grid:
            model = _loaded(merge(lam), config.hidden)
            curve["target"].append(_accuracy(model, _subset(splits.test, task)))
            curve["union"].append(_accuracy(model, splits.test))
            curve["val_union"].append(_accuracy(model, splits.validation))
        result.curves[method] = curve
        best = max(range(len(grid)), key=lambda i: curve["val_union"][i])  # first on ties
        result.chosen_lambda[method] = grid[best]
        model = _loaded(merge(grid[best]), config.hidden)
        scored = _score(f"{method} at λ={grid[best]:.2f}", model, splits, config.tasks)
        result.robust.append(scored)
    result.robust.insert(0, _score("pre-trained (λ=0)", pretrained, splits, config.tasks))
    result.robust.insert(1, _score("fine-tuned (λ=1)", finetuned, splits, config.tasks))


def run(config: FisherMergingConfig, seed: int) -> FisherMergingResult:
    """Both parts for one seed (a few seconds each)."""
    start = time.perf_counter()
    result = FisherMergingResult(seed=seed, tasks=[list(t) for t in config.tasks])
    with torch_threads(config.num_threads), seeded(seed) as generator:
        splits = _splits(config, generator)
        pretrained = MLP(config.hidden)
        result.num_parameters = sum(p.numel() for p in pretrained.parameters())
        _train(pretrained, splits.pretrain, config.pretrain_epochs, config, generator)
        _ensembling(config, splits, pretrained, generator, result)
        _robust(config, splits, pretrained, generator, result)
    result.seconds = time.perf_counter() - start
    return result


def _register() -> None:
    from meanwise.experiments import fisher_merging_report as report
    from meanwise.experiments.registry import register_reproduction

    register_reproduction(
        "fisher-merging",
        "Fisher merging: Fisher-weighted vs plain averaging of fine-tuned models",
        FisherMergingConfig,
        run,
        report,
    )


_register()
