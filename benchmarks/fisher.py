"""Diagonal Fisher speed and accuracy: meanwise's `diagonal_fisher` beside its peers.

A ~100k-parameter MLP (128-256-256-10) over 256 examples, float32, one thread. For each mode
(exact / sampled / empirical), interleaved rounds (every candidate takes one turn per round) and
medians of:

- meanwise: per-layer closed forms, one batched backward for the C classes;
- per-example loop: one backward per example (and per class for exact), the definition;
- torch.func (naive): vmap over examples of the Jacobian of the log-probabilities, squared;
- FusionBench-style (exact mode only): per batch of 32, the gradient of
  Σ_n Σ_c √p_nc·log p_nc (√p detached), squared, summed over batches, divided by the number of
  examples -- it squares a sum over examples and classes, so it is not the diagonal Fisher.

Every candidate's result is compared with the loop's (relative L2 error over all parameters),
so "faster" is always "faster for the same numbers". The issue's target: meanwise >= 10x
faster than the per-example loop.

    python benchmarks/fisher.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from _timing import time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.atomic_io import atomic_write_json
from meanwise.merging import diagonal_fisher

Fisher = dict[str, Tensor]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def loop_fisher(model: nn.Module, x: Tensor, labels: Tensor | None, mode: str) -> Fisher:
    """The definition: one autograd call per example (and class, or drawn label)."""
    params = dict(model.named_parameters())
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(x.shape[0]):
        log_p = torch.log_softmax(model(x[n : n + 1])[0], -1)
        if mode == "exact":
            p = log_p.exp().detach()
            terms = [(p[c], log_p[c]) for c in range(log_p.shape[0])]
        else:  # labels [N, S]: the drawn (sampled) or true (empirical, S = 1) labels
            terms = [(1.0 / labels.shape[1], log_p[y]) for y in labels[n]]
        for weight, objective in terms:
            grads = torch.autograd.grad(objective, list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                fisher[name].add_(g.square(), alpha=float(weight))
    return {k: v / x.shape[0] for k, v in fisher.items()}


def func_fisher(model: nn.Module, x: Tensor, labels: Tensor | None, mode: str) -> Fisher:
    """A naive torch.func version: vmap over examples of jacrev of the log-probabilities."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_probs(p: Fisher, xn: Tensor) -> Tensor:
        return torch.log_softmax(functional_call(model, p, (xn.unsqueeze(0),))[0], -1)

    # {name: [N, C, *shape]}; chunks of 32 examples keep the intermediate Jacobians ~130 MB
    jac = vmap(jacrev(log_probs), in_dims=(None, 0), chunk_size=32)(params, x)
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    if mode == "exact":
        weights = probs  # [N, C]
    else:
        weights = torch.zeros_like(probs)
        for s in range(labels.shape[1]):
            weights[torch.arange(x.shape[0]), labels[:, s]] += 1.0 / labels.shape[1]
    out = {}
    for name, j in jac.items():
        w = weights.reshape(*weights.shape, *([1] * (j.dim() - 2)))
        out[name] = (w * j.square()).sum((0, 1)) / x.shape[0]
    return out


def fusionbench_fisher(model: nn.Module, x: Tensor, batch_size: int = 32) -> Fisher:
    """FusionBench's estimator as its `fisher_merging` method describes it (see the docstring)."""
    params = dict(model.named_parameters())
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        probs = torch.softmax(logits, -1).detach()
        log_probs = torch.log_softmax(logits, -1)
        objective = (probs.sqrt() * log_probs).sum()
        grads = torch.autograd.grad(objective, list(params.values()))
        for name, g in zip(params, grads, strict=True):
            fisher[name] += g.square()
    return {k: v / x.shape[0] for k, v in fisher.items()}


def relative_error(estimate: Fisher, reference: Fisher) -> float:
    num = sum(float((estimate[k] - reference[k]).double().square().sum()) for k in reference)
    den = sum(float(reference[k].double().square().sum()) for k in reference)
    return (num / den) ** 0.5


def bench_mode(model: nn.Module, x: Tensor, y: Tensor, mode: str, rounds: int) -> list[dict]:
    seed = 1234
    labels = None
    if mode == "sampled":
        # the draws diagonal_fisher makes for one chunk: multinomial(p, S) with this generator
        with torch.no_grad():
            probs = torch.softmax(model(x), -1).float()
        labels = torch.multinomial(probs, 1, replacement=True,
                                   generator=torch.Generator().manual_seed(seed))  # fmt: skip
    elif mode == "empirical":
        labels = y.unsqueeze(1)
    turns: dict[str, Callable[[], Fisher]] = {
        "meanwise": lambda: diagonal_fisher(
            model,
            [(x, y)],
            mode=mode,
            chunk_size=x.shape[0],
            generator=torch.Generator().manual_seed(seed),
        ),  # fmt: skip
        "per-example loop": lambda: loop_fisher(model, x, labels, mode),
        "torch.func vmap(jacrev) (naive)": lambda: func_fisher(model, x, labels, mode),
    }
    if mode == "exact":
        turns["FusionBench-style (batch 32)"] = lambda: fusionbench_fisher(model, x)
    timings = time_interleaved(turns, rounds)
    medians, results = timings.wall, timings.results
    reference = results["per-example loop"]
    base = medians["meanwise"]
    rows = []
    print(f"\n{mode} Fisher, {x.shape[0]} examples")
    print(f"  {'candidate':34s} {'median':>10s} {'vs meanwise':>12s} {'rel. error vs loop':>19s}")
    for name, seconds in medians.items():
        error = relative_error(results[name], reference)
        print(f"  {name:34s} {seconds * 1e3:8.1f}ms {seconds / base:11.1f}x {error:19.2e}")
        rows.append({"candidate": name, "median_ms": seconds * 1e3, "ratio": seconds / base,
                     "relative_error_vs_loop": error})  # fmt: skip
    speedup = medians["per-example loop"] / base
    print(f"  meanwise is {speedup:.1f}x faster than the loop (target >= 10x: "
          f"{'ok' if speedup >= 10 else 'MISSED'})")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 11
    torch.manual_seed(0)
    model = mlp().eval()
    x, y = torch.randn(256, 128), torch.randint(0, 10, (256,))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} interleaved rounds, "
          f"MLP 128-256-256-10 ({n_params:,} parameters)")  # fmt: skip
    results = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                    "platform": platform.platform(), "threads": args.threads},
        "quick": args.quick, "parameters": n_params,
    }  # fmt: skip
    for mode in ("exact", "sampled", "empirical"):
        results[mode] = bench_mode(model, x, y, mode, rounds)
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
