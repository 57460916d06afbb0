"""Experiment `optimizers`: AdaBelief, diffGrad and AdaHessian against SGD/Adam/AdamW.

Two parts:

(a) diffGrad's synthetic 1-D functions F1-F3: each optimizer starts at x0 = -1.0 and takes 300
    steps with lr 0.1, beta1 0.95, beta2 0.999, eps 1e-8 (the paper's settings) on a float64
    scalar whose gradient is the analytic one. SGDM is `torch.optim.SGD(lr=0.1, momentum=0.9)`,
    plain heavy-ball momentum (beta1 = 0.95 as heavy-ball momentum makes the effective step 20x
    the learning rate and diverges on F2). AdaBelief runs its Algorithm 1 (`rectify=False`),
    like Adam without warm-up. These runs have no randomness: every seed gives the same numbers.
(b) few-shot digits (`meanwise.data.few_shot_digits`): 20 training images per class, the
    other ~1,600 images as test set, random 1-pixel shifts, a small ResNet (2 residual blocks,
    BatchNorm, about 20k parameters). On the full digits split every optimizer ends at 97-98 %
    and nothing is resolvable; on this task SGD-momentum and Adam are separated by more than
    their seed spread (the AdaBelief paper's premise; the pilot is in the report). Six
    optimizers, each with its published CIFAR recipe (see `RECIPES`), one cosine schedule.
    A runner seed trains `replicates` independent runs at once as one grouped network
    (`StackedResNet`); run seed `seed * replicates + r` fixes replicate r's training images,
    initial weights, batch order and shifts, the same for every optimizer (paired by run seed).

The report side (claims, protocol, published numbers, tables, figures) is in
`optimizers_report`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data import NUM_CLASSES, get_function
from meanwise.data.digits_task import few_shot_digits, random_shift
from meanwise.experiments.base import cached_stage, progress, seeded, torch_threads
from meanwise.experiments.optimizers_results import (
    OptimizersResult,
    TrainingResult,
    TrajectoryResult,
)
from meanwise.optim import AdaBelief, AdaHessian, DiffGrad

__all__ = [
    "OptimizersConfig",
    "OptimizersResult",
    "TrajectoryResult",
    "TrainingResult",
    "Recipe",
    "RECIPES",
    "SYNTHETIC_METHODS",
    "StackedResNet",
    "build_model",
    "replicate_seeds",
    "run",
    "run_synthetic",
    "train_digits",
]

SYNTHETIC_METHODS: tuple[str, ...] = ("SGDM", "Adam", "AMSGrad", "AdaBelief", "diffGrad")
DIGITS_METHODS: tuple[str, ...] = ("SGD", "Adam", "AdamW", "AdaBelief", "diffGrad", "AdaHessian")


@dataclass(frozen=True)
class OptimizersConfig:
    """Settings of both parts. `seeds` counts runner seeds; each trains `replicates` runs per
    optimizer, so the claims see `seeds * replicates` paired runs."""

    seeds: int = 1
    replicates: int = 8
    # (a) synthetic functions, the diffGrad paper's settings
    functions: tuple[str, ...] = ("F1", "F2", "F3")
    synthetic_methods: tuple[str, ...] = SYNTHETIC_METHODS
    x0: float = -1.0
    synthetic_steps: int = 300
    synthetic_lr: float = 0.1
    synthetic_betas: tuple[float, float] = (0.95, 0.999)
    synthetic_eps: float = 1e-8
    sgdm_momentum: float = 0.9
    # (b) few-shot digits
    methods: tuple[str, ...] = DIGITS_METHODS
    per_class: int = 20
    label_noise: float = 0.0
    max_shift: int = 1
    epochs: int = 60
    batch_size: int = 32
    width: int = 16
    blocks: tuple[int, ...] = (1, 1)
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "step" (x0.1 at 50% and 75%) | "constant"
    # epochs between test-accuracy curve points: one evaluation of ~1,600 test images costs
    # about 2.5 training epochs of 200 images, so the curve is coarse
    eval_every: int = 20
    max_batches_per_epoch: int = 0  # 0: all; tests use a few
    # One intra-op thread: this net is too small to gain much from more, and on a busy machine
    # OpenMP threads waiting at barriers for a preempted sibling made steps 10-50x slower.
    num_threads: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in RECIPES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected some of {list(RECIPES)}")
        unknown = [m for m in self.synthetic_methods if m not in SYNTHETIC_METHODS]
        if unknown:
            raise ValueError(
                f"unknown synthetic_methods {unknown}; expected some of {list(SYNTHETIC_METHODS)}"
            )
        for name in self.functions:
            get_function(name)
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'step' or 'constant'; got {self.schedule!r}"
            )
        for name in ("epochs", "batch_size", "seeds", "replicates", "width", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.blocks or min(self.blocks) < 1:
            raise ValueError(f"blocks must be a non-empty tuple of ints >= 1; got {self.blocks}")
        if self.per_class < 1 or self.max_shift < 0 or not 0.0 <= self.label_noise < 1.0:
            raise ValueError(
                "per_class must be >= 1, max_shift >= 0 and label_noise in [0, 1); got "
                f"{self.per_class}, {self.max_shift}, {self.label_noise}"
            )

    @classmethod
    def quick(cls) -> OptimizersConfig:
        """One runner seed of 8 stacked replicates (about 225 CPU seconds on one thread,
        under 4 minutes alone): its minimum detectable effect (~0.5-1 point) is below the
        paper's gaps over Adam (1.6-2.4 points) but not always below the 0.8-point ones."""
        return cls(seeds=1, replicates=8)

    @classmethod
    def full(cls) -> OptimizersConfig:
        """4 runner seeds x 8 replicates = 32 paired runs per optimizer on the same task
        (about 15 CPU minutes; its seed 0 is the quick preset's, the cache is shared)."""
        return cls(seeds=4, replicates=8)


# --- (a) synthetic functions ------------------------------------------------------------------


def _synthetic_optimizer(method: str, params: list[Tensor], c: OptimizersConfig):
    lr, betas, eps = c.synthetic_lr, c.synthetic_betas, c.synthetic_eps
    if method == "SGDM":
        return torch.optim.SGD(params, lr=lr, momentum=c.sgdm_momentum)
    if method == "Adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    if method == "AMSGrad":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, amsgrad=True)
    if method == "AdaBelief":
        return AdaBelief(params, lr=lr, betas=betas, eps=eps, rectify=False)
    if method == "diffGrad":
        return DiffGrad(params, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown synthetic method {method!r}; expected one of {SYNTHETIC_METHODS}")


def run_synthetic(function: str, method: str, config: OptimizersConfig) -> TrajectoryResult:
    """`method` on `function` from x0 with the analytic gradient fed into `p.grad`."""
    fn = get_function(function)
    x = torch.tensor([config.x0], dtype=torch.float64, requires_grad=True)
    opt = _synthetic_optimizer(method, [x], config)
    trajectory = [float(x.detach())]
    for _ in range(config.synthetic_steps):
        opt.zero_grad(set_to_none=True)
        x.grad = fn.grad(x.detach().clone())
        opt.step()
        trajectory.append(float(x.detach()))
    final = x.detach()
    return TrajectoryResult(function, method, trajectory, float(final), float(fn.value(final)))


# --- (b) few-shot digits, replicates stacked into one grouped network --------------------------


def _grouped_conv(replicates: int, cin: int, cout: int, kernel: int = 3, stride: int = 1):
    # groups=replicates: replicate r's output channels see only replicate r's input channels
    return nn.Conv2d(
        replicates * cin, replicates * cout, kernel, stride, kernel // 2, groups=replicates,
        bias=False,
    )  # fmt: skip


class _StackedBlock(nn.Module):
    def __init__(self, replicates: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        r = replicates
        self.conv1 = _grouped_conv(r, cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(r * cout)
        self.conv2 = _grouped_conv(r, cout, cout)
        self.bn2 = nn.BatchNorm2d(r * cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                _grouped_conv(r, cin, cout, 1, stride), nn.BatchNorm2d(r * cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class StackedResNet(nn.Module):
    """`replicates` independent small ResNets for 8x8 digits, computed as one grouped network.

    Replicate r owns slice r of every parameter's first dimension (grouped convolutions,
    per-channel BatchNorm, a grouped 1x1 head), so no value ever crosses replicates: the
    forward pass, the gradient of the summed per-replicate losses, and any elementwise
    optimizer (SGD, Adam, AdamW, AdaBelief, diffGrad; AdaHessian's Hutchinson diagonal too,
    since the Hessian of a sum of independent losses is block diagonal) act on each replicate
    exactly as on a network of its own. One grouped step is much cheaper on a CPU than
    `replicates` small ones, whose cost is per-op overhead.

    Input [B, replicates, 8, 8] (each replicate its own images), output [B, replicates, 10].
    The architecture per replicate: a 3x3 stem, `blocks[0]` residual blocks at 8x8 and width
    `width`, `blocks[1]` at 4x4 and width 2 * `width`, global average pooling, a linear head.
    """

    def __init__(self, replicates: int, width: int = 16, blocks: tuple[int, ...] = (1, 1)) -> None:
        super().__init__()
        if replicates < 1 or width < 1 or not blocks or min(blocks) < 1:
            raise ValueError(
                f"replicates, width and every blocks entry must be >= 1; got {replicates}, "
                f"{width}, {blocks}"
            )
        r = replicates
        self.replicates = r
        self.stem = nn.Sequential(_grouped_conv(r, 1, width), nn.BatchNorm2d(r * width), nn.ReLU())
        layers, channels = [], width
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(_StackedBlock(r, channels, out, stride))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(r * channels, r * NUM_CLASSES, 1, groups=r)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.replicates:
            raise ValueError(f"input must be [B, {self.replicates}, H, W]; got {tuple(x.shape)}")
        pooled = self.blocks(self.stem(x)).mean(dim=(2, 3), keepdim=True)
        return self.head(pooled).view(x.shape[0], self.replicates, NUM_CLASSES)

    def load_replicate(self, index: int, single: StackedResNet) -> None:
        """Copy a one-replicate network's parameters and buffers into replicate `index`."""
        if single.replicates != 1:
            raise ValueError(f"single must have 1 replicate; got {single.replicates}")
        mine = dict(self.named_parameters()) | dict(self.named_buffers())
        theirs = dict(single.named_parameters()) | dict(single.named_buffers())
        with torch.no_grad():
            for name, value in theirs.items():
                if value.dim() == 0:  # BatchNorm's step counter, unused with momentum set
                    continue
                mine[name].view(self.replicates, *value.shape)[index].copy_(value)

    def replicate(self, index: int) -> StackedResNet:
        """A one-replicate copy of replicate `index` (for tests and inspection)."""
        with torch.random.fork_rng(devices=[]):
            single = StackedResNet(1, self._width(), self._blocks())
        mine = dict(self.named_parameters()) | dict(self.named_buffers())
        with torch.no_grad():
            for name, value in (
                dict(single.named_parameters()) | dict(single.named_buffers())
            ).items():
                if value.dim() == 0:
                    continue
                value.copy_(mine[name].view(self.replicates, *value.shape)[index])
        single.train(self.training)
        return single

    def _width(self) -> int:
        return self.stem[0].out_channels // self.replicates

    def _blocks(self) -> tuple[int, ...]:
        counts: list[int] = []
        for block in self.blocks:
            if block.conv1.stride[0] == 2 or not counts:
                counts.append(0)
            counts[-1] += 1
        return tuple(counts)


@dataclass(frozen=True)
class Recipe:
    """A method's published CIFAR hyperparameters, and how to build the optimizer from them."""

    description: str
    make: Callable[[Iterable[Tensor], float, torch.Generator], torch.optim.Optimizer]


RECIPES: dict[str, Recipe] = {
    "SGD": Recipe(
        "lr 0.1, momentum 0.9, L2 weight decay wd",
        lambda p, wd, g: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=wd),
    ),
    "Adam": Recipe(
        "lr 1e-3, betas (0.9, 0.999), eps 1e-8, L2 weight decay wd",
        lambda p, wd, g: torch.optim.Adam(p, lr=1e-3, weight_decay=wd),
    ),
    "AdamW": Recipe(
        "lr 1e-2, decoupled weight decay wd in torch's convention (p -= lr*wd*p per step)",
        lambda p, wd, g: torch.optim.AdamW(p, lr=1e-2, weight_decay=wd),
    ),
    "AdaBelief": Recipe(
        "lr 1e-3, eps 1e-8, L2 weight decay wd, weight_decouple=False, rectify=False",
        lambda p, wd, g: AdaBelief(
            p, lr=1e-3, eps=1e-8, weight_decay=wd, weight_decouple=False, rectify=False
        ),
    ),
    "diffGrad": Recipe(
        "lr 1e-3, eps 1e-8, L2 weight decay wd",
        lambda p, wd, g: DiffGrad(p, lr=1e-3, weight_decay=wd),
    ),
    "AdaHessian": Recipe(
        "lr 0.15, eps 1e-4, Hessian power 1, 1 probe per step, spatial averaging, decoupled "
        "weight decay wd (p -= lr*wd*p, as in the authors' code)",
        lambda p, wd, g: AdaHessian(p, lr=0.15, eps=1e-4, weight_decay=wd, generator=g),
    ),
}


def _lr_factor(schedule: str, step: int, total: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    if schedule == "step":
        return 0.1 ** (int(step >= total // 2) + int(step >= (3 * total) // 4))
    return 1.0


def replicate_seeds(config: OptimizersConfig, seed: int) -> list[int]:
    """The run seeds trained together under runner seed `seed` (disjoint across seeds)."""
    return [seed * config.replicates + r for r in range(config.replicates)]


@dataclass(frozen=True)
class _StackedTask:
    """Each replicate's own few-shot split, stacked on dim 1: images [N, R, 8, 8], labels [N, R]."""

    train_images: Tensor
    train_labels: Tensor
    clean_train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    background: list[float]


def _stacked_task(config: OptimizersConfig, run_seeds: list[int]) -> _StackedTask:
    splits = [few_shot_digits(config.per_class, s, config.label_noise) for s in run_seeds]

    def stack(name: str) -> Tensor:
        values = [getattr(split, name) for split in splits]
        if values[0].dim() == 4:
            values = [v[:, 0] for v in values]  # drop the channel dim: replicates take its place
        return torch.stack(values, dim=1)

    return _StackedTask(
        train_images=stack("train_images"),
        train_labels=stack("train_labels"),
        clean_train_labels=stack("clean_train_labels"),
        test_images=stack("test_images"),
        test_labels=stack("test_labels"),
        background=[split.background for split in splits],
    )


def build_model(config: OptimizersConfig, run_seeds: list[int]) -> StackedResNet:
    """The stacked network; replicate r is initialised from `run_seeds[r]` alone, exactly as a
    one-replicate network built after `torch.manual_seed(run_seeds[r])`."""
    with torch.random.fork_rng(devices=[]):
        model = StackedResNet(len(run_seeds), config.width, config.blocks)
    for r, run_seed in enumerate(run_seeds):
        with seeded(run_seed):
            model.load_replicate(r, StackedResNet(1, config.width, config.blocks))
    return model


def _accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[list[float], list[float]]:
    """Per-replicate accuracy (%) and mean cross-entropy, in eval mode, in chunks."""
    model.eval()
    correct = torch.zeros(labels.shape[1], dtype=torch.float64)
    loss = torch.zeros(labels.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(labels), 512):
            logits = model(images[start : start + 512])
            y = labels[start : start + 512]
            correct += (logits.argmax(dim=-1) == y).double().sum(0)
            loss += F.cross_entropy(logits.transpose(1, 2), y, reduction="none").double().sum(0)
    n = len(labels)
    return (100.0 * correct / n).tolist(), (loss / n).tolist()


def train_digits(method: str, config: OptimizersConfig, seed: int) -> TrainingResult:
    """Train `config.replicates` stacked ResNets on their few-shot digits with `method`.

    Replicate r (run seed `seed * replicates + r`) has its own training images, initial
    weights, batch order and shifts, identical for every method (so methods pair by run seed).
    AdaHessian's probes draw from their own generator so they shift nothing else.
    """
    run_seeds = replicate_seeds(config, seed)
    task = _stacked_task(config, run_seeds)
    n, replicates = task.train_labels.shape
    batches = math.ceil(n / config.batch_size)
    if config.max_batches_per_epoch:
        batches = min(batches, config.max_batches_per_epoch)
    total_steps = config.epochs * batches
    wall, cpu = time.perf_counter(), time.process_time()
    generators = [torch.Generator().manual_seed(s) for s in run_seeds]
    with warnings.catch_warnings():
        # AdaHessian's create_graph backward warns about a grad<->param cycle; the optimizer
        # breaks it by detaching the gradients in step(), and zero_grad drops them.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        model = build_model(config, run_seeds)
        probe_generator = torch.Generator().manual_seed(10_000 + seed)
        opt = RECIPES[method].make(model.parameters(), config.weight_decay, probe_generator)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: _lr_factor(config.schedule, step, total_steps)
        )
        hessian = isinstance(opt, AdaHessian)
        curve_epochs, test_curve, train_loss = [], [], []
        for epoch in progress(range(config.epochs), desc=f"seed {seed} {method}"):
            model.train()
            order = torch.stack([torch.randperm(n, generator=g) for g in generators], dim=1)
            running = torch.zeros(replicates, dtype=torch.float64)
            seen = 0
            for b in range(batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]  # [B, R]
                images = torch.gather(
                    task.train_images, 0, idx[:, :, None, None].expand(-1, -1, 8, 8)
                )
                if config.max_shift:
                    images = torch.stack(
                        [
                            random_shift(images[:, r], config.max_shift, g, task.background[r])
                            for r, g in enumerate(generators)
                        ],
                        dim=1,
                    )
                labels = torch.gather(task.train_labels, 0, idx)
                per_replicate = F.cross_entropy(
                    model(images).transpose(1, 2), labels, reduction="none"
                ).mean(0)
                # the sum, not the mean: each replicate gets the gradient of its own loss
                loss = per_replicate.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward(create_graph=hessian and opt.hessian_due)
                opt.step()
                schedule.step()
                running += per_replicate.detach().double() * len(idx)
                seen += len(idx)
            train_loss.append(float(running.mean()) / seen)
            if (epoch + 1) % config.eval_every == 0 and epoch + 1 < config.epochs:
                acc, _ = _accuracy(model, task.test_images, task.test_labels)
                curve_epochs.append(epoch + 1)
                test_curve.append(sum(acc) / len(acc))
    test_acc, test_loss = _accuracy(model, task.test_images, task.test_labels)
    curve_epochs.append(config.epochs)
    test_curve.append(sum(test_acc) / len(test_acc))
    train_acc, _ = _accuracy(model, task.train_images, task.train_labels)
    return TrainingResult(
        method=method,
        run_seeds=run_seeds,
        final_test_acc=test_acc,
        final_test_loss=test_loss,
        final_train_acc=train_acc,
        curve_epochs=curve_epochs,
        test_acc_curve=test_curve,
        train_loss_curve=train_loss,
        seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
    )


# --- the experiment -----------------------------------------------------------------------------


def _num_parameters(config: OptimizersConfig) -> int:
    with seeded(0):  # building a module draws from the global generator; keep it untouched
        model = StackedResNet(1, config.width, config.blocks)
        return sum(p.numel() for p in model.parameters())


def run(config: OptimizersConfig, seed: int) -> OptimizersResult:
    """Both parts for one runner seed (= `replicates` training runs per method); the synthetic
    part and each method's digits runs are resumable stages."""
    result = OptimizersResult(
        seed=seed,
        run_seeds=replicate_seeds(config, seed),
        num_parameters=_num_parameters(config),
        epochs=config.epochs,
        weight_decay=config.weight_decay,
        per_class=config.per_class,
        label_noise=config.label_noise,
        max_shift=config.max_shift,
    )
    with torch_threads(config.num_threads):
        synthetic = cached_stage(
            "synthetic",
            lambda: {
                "runs": [
                    run_synthetic(function, method, config).to_json()
                    for function in config.functions
                    for method in config.synthetic_methods
                ]
            },
        )
        result.synthetic = [TrajectoryResult.from_json(r) for r in synthetic["runs"]]
        for method in progress(config.methods, desc=f"seed {seed} digits"):
            stage = cached_stage(
                f"digits-{method}", lambda m=method: train_digits(m, config, seed).to_json()
            )
            result.digits.append(TrainingResult.from_json(stage))
    return result


def _register() -> None:
    from meanwise.experiments import optimizers_report as report
    from meanwise.experiments.registry import register_reproduction

    register_reproduction(
        "optimizers",
        "Optimizers: AdaBelief, diffGrad and AdaHessian vs SGD, Adam, AdamW",
        OptimizersConfig,
        run,
        report,
    )


_register()
