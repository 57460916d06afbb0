"""Optimizer speed: meanwise's AdaBelief, DiffGrad and AdaHessian beside torch Adam and peers.

Three measurements, each interleaved (every candidate takes one turn per round, so drifts of
this noisy machine hit all of them alike) and reported as medians and ratios:

1. ``step``: one ``opt.step()`` on fixed random gradients, for a ~5M-parameter MLP and a ~0.3M
   CNN: torch Adam (foreach, fused), ours (foreach and ``fused=True``), adabelief-pytorch,
   torch-optimizer, pytorch-optimizer and timm where installed. The fused rows are compiled
   during the untimed warm-up turns.
2. ``iteration``: a whole training iteration (forward, backward, step) for AdaHessian --
   ``backward(create_graph=True)`` on Hessian steps -- against an Adam iteration, with
   ``update_each`` 1 and 4, beside torch-optimizer's, pytorch-optimizer's and timm's AdaHessian.
3. ``hvp``: the Hessian-vector product AdaHessian needs, two ways: double backward (what it
   uses) and forward-over-reverse (``torch.autograd.forward_ad`` through the backward, which
   yields the gradient and H z in one pass), each checked against the other before timing.

Targets from the issue: fused AdaBelief <= 1.0x and fused DiffGrad <= 1.2x Adam(fused); the
foreach AdaBelief <= 1.0x and DiffGrad <= 1.2x Adam(foreach); AdaHessian iteration <= 2.0x
(update_each=1) and <= 1.25x (update_each=4) Adam's.

    python benchmarks/optim_step.py [--quick] [--json PATH] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.atomic_io import atomic_write_json
from meanwise.functional import rademacher_like
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
    timm_optim = _timm_optim()
    if timm_optim is not None:
        found["AdaBelief (timm)"] = lambda ps: timm_optim.AdaBelief(ps)
    return found


def _timm_optim():
    """timm's optimizers, a bench-only optional peer (timm also needs torchvision)."""
    try:
        import timm.optim

        return timm.optim
    except Exception:  # absent, or present without its torchvision dependency
        return None


def step_candidates() -> dict[str, Callable]:
    candidates = {
        "Adam (foreach)": lambda ps: torch.optim.Adam(ps, foreach=True),
        "Adam (fused)": lambda ps: torch.optim.Adam(ps, fused=True),
        "AdaBelief (meanwise)": lambda ps: AdaBelief(ps),
        "AdaBelief (meanwise, CIFAR recipe)": lambda ps: AdaBelief(
            ps, eps=1e-8, weight_decay=5e-4, weight_decouple=False, rectify=False
        ),
        "DiffGrad (meanwise)": lambda ps: DiffGrad(ps),
        "AdaBelief (meanwise, fused)": lambda ps: AdaBelief(ps, fused=True),
        "DiffGrad (meanwise, fused)": lambda ps: DiffGrad(ps, fused=True),
    }
    candidates.update(peers())
    return candidates


DEVICE = torch.device("cpu")
CLOCK = "wall"  # or "cpu": process CPU time, the steadier on a busy shared machine


def _medians(timings) -> dict[str, float]:
    return timings.cpu if CLOCK == "cpu" else timings.wall


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
    return _medians(time_interleaved(turns, rounds, warmup=3, sync=_sync))


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
    timm_optim = _timm_optim()
    if timm_optim is not None:
        builders["AdaHessian (timm)"] = lambda m: hessian(
            timm_optim.Adahessian(m.parameters()), m, lambda: True
        )
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
    medians = _medians(time_interleaved(turns, rounds=rounds, warmup=1, sync=_sync))
    return {name: seconds / 4 for name, seconds in medians.items()}


def bench_hvp(model_fn, batch, rounds: int) -> tuple[dict[str, float], dict[str, str]]:
    """Time one gradient + Hessian-vector product both ways (and a plain forward + backward);
    a way whose H z disagrees with the other's is reported instead of timed."""
    x, y = (t.to(DEVICE) for t in batch)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = model_fn().to(DEVICE)
    params = dict(model.named_parameters())
    probes = [rademacher_like(p) for p in params.values()]

    def plain():
        return torch.autograd.grad(loss_fn(model(x), y), list(params.values()))

    def double_backward():
        ps = list(params.values())
        grads = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True)
        return torch.autograd.grad(grads, ps, grad_outputs=probes)

    def forward_over_reverse():
        with fwad.dual_level():
            duals = {
                name: fwad.make_dual(p.detach().requires_grad_(), z)
                for (name, p), z in zip(params.items(), probes, strict=True)
            }
            loss = loss_fn(functional_call(model, duals, (x,)), y)
            grads = torch.autograd.grad(loss, list(duals.values()))
            return [fwad.unpack_dual(g).tangent for g in grads]

    reference = double_backward()
    got = forward_over_reverse()
    error = max(
        float((a - b).abs().max() / a.abs().max()) for a, b in zip(reference, got, strict=True)
    )
    turns = {
        "forward + backward": plain,
        "gradient + Hz, double backward": double_backward,
    }
    notes = {}
    if error < 1e-3:
        turns["gradient + Hz, forward-over-reverse"] = forward_over_reverse
    else:
        notes["gradient + Hz, forward-over-reverse"] = (
            f"wrong: H z differs from double backward's by {error:.2g} (relative)"
        )
    return _medians(time_interleaved(turns, rounds=rounds, warmup=1, sync=_sync)), notes


def table(title: str, medians: dict[str, float], baselines: list[str], targets: dict):
    """Print medians and ratios to each baseline; ``targets[name] = (baseline, bound)``."""
    rows = []
    print(f"\n{title}")
    header = "".join(f"{'vs ' + b:>22s}" for b in baselines)
    print(f"  {'candidate':44s} {'median':>10s}{header}  target")
    for name, seconds in medians.items():
        ratios = {b: seconds / medians[b] for b in baselines}
        mark = ""
        if name in targets:
            baseline, bound = targets[name]
            ok = ratios[baseline] <= bound
            mark = f"<= {bound:.2f}x {baseline} " + ("ok" if ok else "MISSED")
        cells = "".join(f"{ratios[b]:21.2f}x" for b in baselines)
        print(f"  {name:44s} {seconds * 1e3:8.2f}ms{cells}  {mark}")
        rows.append({"candidate": name, "median_ms": seconds * 1e3,
                     "ratios": ratios, "target": targets.get(name)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default) or process CPU time (steadier when other jobs share the "
        "cores; with --threads 1 on the CPU it is the time the work itself took)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE, CLOCK
    DEVICE = torch.device(args.device)
    CLOCK = args.clock
    if CLOCK == "cpu" and DEVICE.type != "cpu":
        parser.error("--clock cpu measures CPU work only; use --clock wall with --device cuda")
    rounds = 10 if args.quick else 40
    step_targets = {
        "AdaBelief (meanwise)": ("Adam (foreach)", 1.0),
        "DiffGrad (meanwise)": ("Adam (foreach)", 1.2),
        "AdaBelief (meanwise, fused)": ("Adam (fused)", 1.0),
        "DiffGrad (meanwise, fused)": ("Adam (fused)", 1.2),
    }
    iteration_targets = {
        "AdaHessian (meanwise, update_each=1)": ("Adam (foreach)", 2.0),
        "AdaHessian (meanwise, update_each=4)": ("Adam (foreach)", 1.25),
    }
    results = {
        "machine": machine_info(threads=args.threads, device=str(DEVICE), clock=CLOCK),
        "quick": args.quick,
    }
    print(
        f"torch {torch.__version__} on {DEVICE}, {args.threads} thread(s), "
        f"{rounds} interleaved rounds, {CLOCK} clock"
    )
    for label, model_fn in (("MLP ~5.4M params", mlp), ("CNN ~0.3M params", cnn)):
        n = sum(p.numel() for p in model_fn().parameters())
        medians = bench_steps(model_fn, rounds)
        results[f"step/{label}"] = table(
            f"optimizer step, {label} ({n:,} parameters)",
            medians,
            ["Adam (foreach)", "Adam (fused)"],
            step_targets,
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
            f"training iteration, {label}", medians, ["Adam (foreach)"], iteration_targets
        )
    for label, model_fn, batch in iteration_models:
        medians, notes = bench_hvp(model_fn, batch, max(3, rounds // 2))
        results[f"hvp/{label}"] = table(
            f"Hessian-vector product, {label}", medians, ["forward + backward"], {}
        )
        for name, note in notes.items():
            print(f"  {name:44s} {note}")
        results[f"hvp/{label}"] += [{"candidate": k, "note": v} for k, v in notes.items()]
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
