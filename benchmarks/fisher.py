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

Second section (``--section vocab``): a causal LM with GPT-2's 50,257-token vocabulary and tiny
layers (2 layers, width 32, tied embedding), the per-token Fisher of issue 13. Exact mode needs
T·V output cotangents per sequence, each pulled back through the network, so at V = 50,257 it
is not run to the end: a child runs it with ``class_chunk_size`` K, reporting the cotangents
done after every chunk, while the parent reads the child's VmHWM for a fixed window (every
chunk has the same size, so the first chunks reach the steady peak) and then stops it; the
rate gives the projected time. Sampled mode (one label drawn per token) runs to the end at
V = 50,257 (time, VmHWM), and its relative error against exact is measured on a small
vocabulary, for 1 and 8 draws per token.

    python benchmarks/fisher.py [--quick] [--json PATH] [--section {mlp,vocab,all}]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
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


# --- the 50k-vocabulary causal LM ---------------------------------------------------------------

GPT2_VOCAB = 50257


def tiny_gpt2(vocab: int):
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def lm_batches(vocab: int, sequences: int, length: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (sequences, length), generator=g)
    mask = torch.ones(sequences, length, dtype=torch.long)
    return [{"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}
            for i in range(sequences)]  # fmt: skip


def vocab_child(spec: dict) -> None:
    """One Fisher run in this process; prints a JSON line (seconds, VmHWM MiB) at the end.

    With ``spec["progress"]`` (a file name) every chunk of output cotangents rewrites that file
    with "rows-done rows-total seconds-since-start", so that the parent can measure the rate of
    a run it will not wait for."""
    torch.set_num_threads(1)
    model = tiny_gpt2(spec["vocab"])
    data = lm_batches(spec["vocab"], spec["sequences"], spec["length"])
    start = time.perf_counter()
    if spec.get("progress"):
        from meanwise.merging import fisher as fisher_module

        original = fisher_module._Categorical.rows
        progress = Path(spec["progress"])

        def rows(self, first: int, stop: int) -> Tensor:
            # called as chunk [first, stop) starts: rows [0, first) are done
            progress.write_text(f"{first} {self.count} {time.perf_counter() - start}")
            return original(self, first, stop)

        fisher_module._Categorical.rows = rows
    diagonal_fisher(model, data, mode=spec["mode"], n_samples=spec.get("n_samples", 1),
                    class_chunk_size=spec.get("chunk"),
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "vmhwm_mib": _vmhwm_mib(os.getpid())}))


def _vmhwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_vocab_child(spec: dict, window: float | None = None) -> dict:
    """Run `vocab_child` in a fresh process; with `window`, stop it after that many seconds and
    report the VmHWM read from outside (the run itself would take hours)."""
    command = [sys.executable, __file__, "--vocab-child", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env, text=True)  # fmt: skip
    try:
        if window is None:
            out, _ = process.communicate(timeout=3600)
            if process.returncode != 0:
                raise RuntimeError(f"Fisher child {spec} failed ({process.returncode})")
            return json.loads(out.strip().splitlines()[-1])
        # the window starts with the first chunk (imports and model set-up take a while here)
        progress = Path(spec["progress"])
        deadline = time.perf_counter() + 600
        while not progress.exists():
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"Fisher child {spec} did not start its first chunk")
            time.sleep(0.2)
        peak, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < window and process.poll() is None:
            peak = max(peak, _vmhwm_mib(process.pid))
            time.sleep(0.5)
        done, total, seconds = progress.read_text().split()
        rate = int(done) / float(seconds) if int(done) else None
        return {"vmhwm_mib": peak, "window_s": window, "rows_done": int(done),
                "rows_total": int(total), "rows_per_second": rate,
                "projected_seconds": int(total) / rate if rate else None}  # fmt: skip
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def vocab_section(quick: bool) -> dict:
    """Exact vs sampled per-token Fisher of a causal LM as the vocabulary grows to GPT-2's."""
    length = 8
    print("\ncausal LM per-token Fisher (GPT-2 layout: 2 layers, width 32, tied embedding), "
          f"sequences of {length} tokens, 1 thread; each run a fresh child, VmHWM = its peak "
          "RSS")  # fmt: skip
    baseline = run_vocab_child({"vocab": 50, "sequences": 1, "length": 2, "mode": "sampled"})
    print(f"  baseline child (imports + a 50-token model): {baseline['vmhwm_mib']:.0f} MiB")
    result: dict = {"length": length, "baseline_vmhwm_mib": baseline["vmhwm_mib"]}
    # exact at 50k: peak memory and rate per chunk size, in a bounded window
    window = 40.0 if quick else 90.0
    exact_big = []
    # (K = 256 would hold ~8 GB here: ~32 MB per cotangent row at this vocabulary)
    for chunk in [4, 16] if quick else [4, 16, 64]:
        progress = Path(tempfile.mkdtemp(prefix="meanwise-fisher-bench-")) / "progress.txt"
        try:
            run = run_vocab_child({"vocab": GPT2_VOCAB, "sequences": 1, "length": length,
                                   "mode": "exact", "chunk": chunk, "progress": str(progress)},
                                  window=window)  # fmt: skip
        finally:
            shutil.rmtree(progress.parent, ignore_errors=True)
        exact_big.append({"chunk": chunk, **run})
        projected = run["projected_seconds"]
        shown = "n/a" if projected is None else f"{projected / 3600:.1f} h"
        print(f"  exact, V={GPT2_VOCAB}, K={chunk:3d}: VmHWM {run['vmhwm_mib']:.0f} MiB; "
              f"{run['rows_done']} of {run['rows_total']} cotangents in {window:.0f}s (stopped) "
              f"-> {shown} per sequence of {length} tokens")  # fmt: skip
    result["exact_gpt2_vocab"] = exact_big
    # sampled at 50k, to the end
    sequences = 4 if quick else 16
    run = run_vocab_child({"vocab": GPT2_VOCAB, "sequences": sequences, "length": length,
                           "mode": "sampled", "n_samples": 1})  # fmt: skip
    print(f"  sampled (1 draw per token), V={GPT2_VOCAB}: {run['seconds']:.1f}s for "
          f"{sequences} sequences ({run['seconds'] / sequences:.2f}s each), VmHWM "
          f"{run['vmhwm_mib']:.0f} MiB")  # fmt: skip
    result["sampled_gpt2_vocab"] = {"sequences": sequences, **run}
    # sampled vs exact on a small vocabulary, in process
    vocab, sequences = 100, (4 if quick else 16)
    model = tiny_gpt2(vocab)
    data = lm_batches(vocab, sequences, length)
    exact = diagonal_fisher(model, data, mode="exact", class_chunk_size=256)
    errors = []
    for draws in (1, 8):
        estimate = diagonal_fisher(model, data, mode="sampled", n_samples=draws,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        error = relative_error(estimate, exact)
        errors.append({"n_samples": draws, "relative_error": error})
        print(f"  sampled vs exact, V={vocab}, {sequences} x {length} tokens, {draws} draw(s) per "
              f"token: relative L2 error {error:.3f}")  # fmt: skip
    result["sampled_vs_exact"] = {"vocab": vocab, "sequences": sequences, "errors": errors}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--section", choices=("mlp", "vocab", "all"), default="all")
    parser.add_argument("--vocab-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vocab_child:
        vocab_child(json.loads(args.vocab_child))
        return 0
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 11
    torch.manual_seed(0)
    model = mlp().eval()
    x, y = torch.randn(256, 128), torch.randint(0, 10, (256,))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} interleaved rounds, "
          f"MLP 128-256-256-10 ({n_params:,} parameters)")  # fmt: skip
    results = {
        "machine": machine_info(threads=args.threads),
        "quick": args.quick, "parameters": n_params,
    }  # fmt: skip
    if args.section in ("mlp", "all"):
        for mode in ("exact", "sampled", "empirical"):
            results[mode] = bench_mode(model, x, y, mode, rounds)
    if args.section in ("vocab", "all"):
        results["causal_lm_vocab"] = vocab_section(args.quick)
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
