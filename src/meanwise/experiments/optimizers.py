"""Experiment `optimizers`: AdaBelief, diffGrad and AdaHessian against SGD/Adam/AdamW.

Two parts, both run for every seed:

(a) diffGrad's synthetic 1-D functions F1-F3: each optimizer starts at x0 = -1.0 and takes 300
    steps with lr 0.1, beta1 0.95, beta2 0.999, eps 1e-8 (the paper's settings) on a float64
    scalar whose gradient is the analytic one. SGDM is `torch.optim.SGD(lr=0.1, momentum=0.9)`,
    plain heavy-ball momentum (beta1 = 0.95 as heavy-ball momentum makes the effective step 20x
    the learning rate and diverges on F2). AdaBelief runs its Algorithm 1 (`rectify=False`),
    like Adam without warm-up. These runs have no randomness: every seed gives the same numbers.
(b) the 8x8 digits with a small ResNet (4 residual blocks, BatchNorm, about 43k parameters):
    six optimizers, each with its published CIFAR recipe (see `RECIPES`), one shared cosine
    schedule, the same initial weights and batch order for every optimizer of a seed (so the
    comparison is paired), test accuracy after every epoch.

The report side (claim, published numbers, tables, figures, verdict) is in `optimizers_report`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanwise.data import NUM_CLASSES, get_function, load_digits
from meanwise.experiments.base import cached_stage, progress, seeded, torch_threads
from meanwise.optim import AdaBelief, AdaHessian, DiffGrad

__all__ = [
    "OptimizersConfig",
    "OptimizersResult",
    "TrajectoryResult",
    "TrainingResult",
    "Recipe",
    "RECIPES",
    "SYNTHETIC_METHODS",
    "SmallResNet",
    "run",
    "run_synthetic",
    "train_digits",
]

SYNTHETIC_METHODS: tuple[str, ...] = ("SGDM", "Adam", "AMSGrad", "AdaBelief", "diffGrad")
DIGITS_METHODS: tuple[str, ...] = ("SGD", "Adam", "AdamW", "AdaBelief", "diffGrad", "AdaHessian")


@dataclass(frozen=True)
class OptimizersConfig:
    """Settings of both parts; `quick()` fits in about 3 minutes on 2 cores for 3 seeds."""

    seeds: int = 3
    # (a) synthetic functions, the diffGrad paper's settings
    functions: tuple[str, ...] = ("F1", "F2", "F3")
    synthetic_methods: tuple[str, ...] = SYNTHETIC_METHODS
    x0: float = -1.0
    synthetic_steps: int = 300
    synthetic_lr: float = 0.1
    synthetic_betas: tuple[float, float] = (0.95, 0.999)
    synthetic_eps: float = 1e-8
    sgdm_momentum: float = 0.9
    # (b) digits
    methods: tuple[str, ...] = DIGITS_METHODS
    epochs: int = 50
    batch_size: int = 64
    width: int = 16
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "step" (x0.1 at 50% and 75%) | "constant"
    split_seed: int = 0
    test_fraction: float = 0.25
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
        if self.epochs < 1 or self.batch_size < 1 or self.seeds < 1:
            raise ValueError("epochs, batch_size and seeds must be >= 1")

    @classmethod
    def quick(cls) -> OptimizersConfig:
        """8 epochs: every optimizer reaches 95-98%; separating them needs `full()`."""
        return cls(epochs=8)

    @classmethod
    def full(cls) -> OptimizersConfig:
        """50 epochs (about 15 minutes on 2 cores for 3 seeds)."""
        return cls(epochs=50)


@dataclass
class TrajectoryResult:
    """One optimizer on one synthetic function: x_0..x_T and where it ended."""

    function: str
    method: str
    x: list[float]
    final_x: float
    final_f: float


@dataclass
class TrainingResult:
    """One optimizer on digits: per-epoch curves and the final test accuracy (in %).

    `seconds` (wall-clock training time) is the one field that differs between identical runs.
    """

    method: str
    test_acc: list[float]
    test_loss: list[float]
    train_loss: list[float]
    final_test_acc: float
    best_test_acc: float
    seconds: float


@dataclass
class OptimizersResult:
    """One seed of both parts; the digits setup is repeated here for the report's captions."""

    seed: int
    num_parameters: int = 0
    epochs: int = 0
    weight_decay: float = 0.0
    synthetic: list[TrajectoryResult] = field(default_factory=list)
    digits: list[TrainingResult] = field(default_factory=list)


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


# --- (b) digits -------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet-style net for 8x8 inputs: stem, 2 blocks at 8x8, 2 at 4x4, pooling, linear.

    CIFAR ResNets have the same ingredients (3x3 convs, BatchNorm, identity and 1x1 shortcuts)
    that make AdaHessian's spatial averaging and the optimizers' weight decay matter; width 16
    gives about 43k parameters.
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            _BasicBlock(width, width, 1),
            _BasicBlock(width, width, 1),
            _BasicBlock(width, 2 * width, 2),
            _BasicBlock(2 * width, 2 * width, 1),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


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


def _evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(images)
        loss = float(F.cross_entropy(logits, labels))
        acc = 100.0 * float((logits.argmax(dim=1) == labels).double().mean())
    return acc, loss


def train_digits(method: str, config: OptimizersConfig, seed: int) -> TrainingResult:
    """Train SmallResNet on digits with `method`'s recipe; test accuracy after every epoch.

    The seed fixes the initial weights and the batch order, identically for every method;
    AdaHessian's Rademacher probes draw from their own generator so they do not shift the
    batch order.
    """
    data = load_digits(config.split_seed, config.test_fraction)
    n = len(data.train_labels)
    batches = math.ceil(n / config.batch_size)
    if config.max_batches_per_epoch:
        batches = min(batches, config.max_batches_per_epoch)
    total_steps = config.epochs * batches
    start = time.perf_counter()
    with seeded(seed) as order_generator, warnings.catch_warnings():
        # AdaHessian's create_graph backward warns about a grad<->param cycle; the optimizer
        # breaks it by detaching the gradients in step(), and zero_grad drops them.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        model = SmallResNet(config.width)
        probe_generator = torch.Generator().manual_seed(10_000 + seed)
        opt = RECIPES[method].make(model.parameters(), config.weight_decay, probe_generator)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: _lr_factor(config.schedule, step, total_steps)
        )
        hessian = isinstance(opt, AdaHessian)
        test_acc, test_loss, train_loss = [], [], []
        for _ in progress(range(config.epochs), desc=f"seed {seed} {method}"):
            model.train()
            order = torch.randperm(n, generator=order_generator)
            running, seen = 0.0, 0
            for b in range(batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                loss = F.cross_entropy(model(data.train_images[idx]), data.train_labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward(create_graph=hessian and opt.hessian_due)
                opt.step()
                schedule.step()
                running += float(loss.detach()) * len(idx)
                seen += len(idx)
            train_loss.append(running / seen)
            acc, loss_value = _evaluate(model, data.test_images, data.test_labels)
            test_acc.append(acc)
            test_loss.append(loss_value)
    return TrainingResult(
        method=method,
        test_acc=test_acc,
        test_loss=test_loss,
        train_loss=train_loss,
        final_test_acc=test_acc[-1],
        best_test_acc=max(test_acc),
        seconds=time.perf_counter() - start,
    )


# --- the experiment -----------------------------------------------------------------------------


def _num_parameters(width: int) -> int:
    with seeded(0):  # building a module draws from the global generator; keep it untouched
        return sum(p.numel() for p in SmallResNet(width).parameters())


def run(config: OptimizersConfig, seed: int) -> OptimizersResult:
    """Both parts for one seed; the synthetic part and each digits run are resumable stages."""
    result = OptimizersResult(
        seed=seed,
        num_parameters=_num_parameters(config.width),
        epochs=config.epochs,
        weight_decay=config.weight_decay,
    )
    with torch_threads(config.num_threads):
        synthetic = cached_stage(
            "synthetic",
            lambda: {
                "runs": [
                    asdict(run_synthetic(function, method, config))
                    for function in config.functions
                    for method in config.synthetic_methods
                ]
            },
        )
        result.synthetic = [TrajectoryResult(**r) for r in synthetic["runs"]]
        for method in progress(config.methods, desc=f"seed {seed} digits"):
            stage = cached_stage(
                f"digits-{method}", lambda m=method: asdict(train_digits(m, config, seed))
            )
            result.digits.append(TrainingResult(**stage))
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
