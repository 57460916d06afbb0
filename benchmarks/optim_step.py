"""Optimizer speed: meanwise's AdaBelief, DiffGrad and AdaHessian beside torch Adam and peers.

Two measurements, each interleaved (every candidate takes one turn per round, so drifts of this
noisy machine hit all of them alike) and reported as medians and ratios to Adam(foreach):

1. ``step``: one ``opt.step()`` on fixed random gradients, for a ~5M-parameter MLP and a ~0.3M
   CNN: torch Adam (foreach, fused), ours, adabelief-pytorch, torch-optimizer,
   pytorch-optimizer.
2. ``iteration``: a whole training iteration (forward, backward, step) for AdaHessian --
   ``backward(create_graph=True)`` on Hessian steps -- against an Adam iteration, with
   ``update_each`` 1 and 4, beside torch-optimizer's and pytorch-optimizer's AdaHessian.

Targets from the issue: AdaBelief step <= 1.0x, DiffGrad step <= 1.2x; AdaHessian iteration
<= 2.6x (update_each=1) and <= 1.3x (update_each=4).

    python benchmarks/optim_step.py [--quick] [--json PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch
from torch import nn

from _timing import time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.atomic_io import atomic_write_json
from meanwise.optim import AdaBelief, AdaHessian, DiffGrad


def mlp() -> nn.Module:
    # 1024*2048 + 2048*1280 + 1280*512 weights: ~5.4M parameters
    return nn.Sequential(
        nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1280), nn.ReLU(), nn.Linear(1280, 512)
    )


def cnn() -> nn.Module:
    # ~0.3M parameters in 14 tensors: small kernels, the shape of a CIFAR-style ResNet stage
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 10),
    )  # fmt: skip


def peers() -> dict[str, Callable]:
    """Peer optimizers that are installed (the [dev] extra); absent ones are skipped."""
    found: dict[str, Callable] = {}
    try:
        import adabelief_pytorch

        found["AdaBelief (adabelief-pytorch)"] = lambda ps: adabelief_pytorch.AdaBelief(
            ps, print_change_log=False
        )
    except ImportError:
        pass
    try:
        import torch_optimizer

        found["DiffGrad (torch-optimizer)"] = lambda ps: torch_optimizer.DiffGrad(ps)
        found["AdaBelief (torch-optimizer)"] = lambda ps: torch_optimizer.AdaBelief(ps)
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        found["AdaBelief (pytorch-optimizer)"] = lambda ps: pytorch_optimizer.AdaBelief(ps)
        found["DiffGrad (pytorch-optimizer)"] = lambda ps: pytorch_optimizer.DiffGrad(ps)
    except ImportError:
        pass
    return found


def step_candidates() -> dict[str, Callable]:
    candidates = {
        "Adam (foreach)": lambda ps: torch.optim.Adam(ps, foreach=True),
        "Adam (fused)": lambda ps: torch.optim.Adam(ps, fused=True),
        "AdaBelief (meanwise)": lambda ps: AdaBelief(ps),
        "AdaBelief (meanwise, CIFAR recipe)": lambda ps: AdaBelief(
            ps, eps=1e-8, weight_decay=5e-4, weight_decouple=False, rectify=False
        ),
        "DiffGrad (meanwise)": lambda ps: DiffGrad(ps),
    }
    candidates.update(peers())
    return candidates


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(model_fn: Callable[[], nn.Module], rounds: int) -> dict[str, float]:
    turns = {}
    for name, make in step_candidates().items():
        torch.manual_seed(0)
        model = model_fn().to(DEVICE)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        opt = make(model.parameters())
        turns[name] = opt.step
    return time_interleaved(turns, rounds, warmup=3, sync=_sync).wall


def bench_iterations(model_fn, batch, rounds: int) -> dict[str, float]:
    x, y = (t.to(DEVICE) for t in batch)
    loss_fn = nn.CrossEntropyLoss()

    def plain(opt, model):
        def turn():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return turn

    def hessian(opt, model, due: Callable[[], bool]):
        def turn():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward(create_graph=due())
            opt.step()

        return turn

    builders: dict[str, Callable] = {
        "Adam (foreach)": lambda m: plain(torch.optim.Adam(m.parameters(), foreach=True), m),
    }

    def ours(k):
        def build(m):
            opt = AdaHessian(m.parameters(), update_each=k)
            return hessian(opt, m, lambda: opt.hessian_due)

        return build

    builders["AdaHessian (meanwise, update_each=1)"] = ours(1)
    builders["AdaHessian (meanwise, update_each=4)"] = ours(4)
    try:
        import torch_optimizer

        builders["AdaHessian (torch-optimizer)"] = lambda m: hessian(
            torch_optimizer.Adahessian(m.parameters(), hessian_power=1.0), m, lambda: True
        )
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        def theirs(k):
            def build(m):
                opt = pytorch_optimizer.AdaHessian(m.parameters(), update_period=k)
                counter = {"t": 0}

                def due():
                    counter["t"] += 1
                    return (counter["t"] - 1) % k == 0

                return hessian(opt, m, due)

            return build

        builders["AdaHessian (pytorch-optimizer, update_period=1)"] = theirs(1)
        builders["AdaHessian (pytorch-optimizer, update_period=4)"] = theirs(4)
    except ImportError:
        pass
    turns = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        iteration = build(model_fn().to(DEVICE))

        def period(iteration=iteration):
            # A turn is 4 iterations, one whole update_each=4 period: a median over single
            # iterations would hide the Hessian steps' cost.
            for _ in range(4):
                iteration()

        turns[name] = period
    medians = time_interleaved(turns, rounds=rounds, warmup=1, sync=_sync).wall
    return {name: seconds / 4 for name, seconds in medians.items()}


def table(title: str, medians: dict[str, float], baseline: str, targets: dict[str, float]):
    base = medians[baseline]
    rows = []
    print(f"\n{title}")
    print(f"  {'candidate':52s} {'median':>10s} {'vs ' + baseline:>20s}  target")
    for name, seconds in medians.items():
        ratio = seconds / base
        target = targets.get(name)
        mark = ""
        if target is not None:
            mark = f"<= {target:.1f}x " + ("ok" if ratio <= target else "MISSED")
        print(f"  {name:52s} {seconds * 1e3:8.2f}ms {ratio:19.2f}x  {mark}")
        rows.append({"candidate": name, "median_ms": seconds * 1e3, "ratio": ratio,
                     "target": target})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    rounds = 10 if args.quick else 40
    step_targets = {"AdaBelief (meanwise)": 1.0, "DiffGrad (meanwise)": 1.2}
    iteration_targets = {
        "AdaHessian (meanwise, update_each=1)": 2.6,
        "AdaHessian (meanwise, update_each=4)": 1.3,
    }
    results = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": args.threads,
            "device": str(DEVICE),
        },
        "quick": args.quick,
    }
    print(
        f"torch {torch.__version__} on {DEVICE}, {args.threads} thread(s), "
        f"{rounds} interleaved rounds"
    )
    for label, model_fn in (("MLP ~5.4M params", mlp), ("CNN ~0.3M params", cnn)):
        n = sum(p.numel() for p in model_fn().parameters())
        medians = bench_steps(model_fn, rounds)
        results[f"step/{label}"] = table(
            f"optimizer step, {label} ({n:,} parameters)", medians, "Adam (foreach)", step_targets
        )
    g = torch.Generator().manual_seed(0)
    iteration_models = (
        ("MLP ~5.4M params, batch 64", mlp, (torch.randn(64, 1024, generator=g),
                                             torch.randint(0, 512, (64,), generator=g))),
        ("CNN ~0.3M params, batch 32 of 3x32x32", cnn, (torch.randn(32, 3, 32, 32, generator=g),
                                                        torch.randint(0, 10, (32,), generator=g))),
    )  # fmt: skip
    for label, model_fn, batch in iteration_models:
        medians = bench_iterations(model_fn, batch, max(3, rounds // 4))
        results[f"iteration/{label}"] = table(
            f"training iteration, {label}", medians, "Adam (foreach)", iteration_targets
        )
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
