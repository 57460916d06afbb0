"""Checkpoint merge memory and time on a GPT-2-shaped checkpoint, beside mergekit's `linear`.

Three random float32 checkpoints with GPT-2 small's tensor names and shapes (12 layers, the
50257 × 768 token embedding the largest tensor; ``--quick``: 2 layers, the same embedding) are
written as Hugging Face sharded safetensors folders (``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json`` + ``config.json``, the tied ``lm_head.weight`` absent as in
HF's checkpoints), each with a Fisher file of the same tensors. Then, each in a fresh child
process:

- meanwise average: ``merge_checkpoints(models, None, ...)``, weights 1, 1, 1;
- meanwise Fisher: ``merge_checkpoints(models, fishers, ...)``, default options;
- mergekit linear: ``mergekit-yaml`` (weights 1, 1, 1, float32) when found (``--mergekit
  PATH`` or on PATH), else its rows are skipped with a message;
- baselines: a child of each tool that only imports what its merge imports (torch and
  meanwise; torch, transformers and mergekit), subtracted in the "net" columns.

Peak RSS is each child's own VmHWM from /proc/self/status, written when it exits: ru_maxrss
would inherit the parent's high-water mark through fork and exec. CPU time is the child's
(RUSAGE_CHILDREN), steadier than wall time on a shared machine.

Runs are interleaved over rounds and medians reported. The claim checked is the issue's bound:
net peak RSS <= (number of models + 2) × the largest tensor. The outputs are compared tensor
by tensor: meanwise's average with mergekit's, and both merges with an independent float64
formula read with ``safetensors.safe_open`` (max abs difference). Temporary files are removed.

    python benchmarks/merge.py [--quick] [--json PATH] [--mergekit PATH] [--rounds N] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _timing import machine_info  # benchmarks/_timing.py
from meanwise.atomic_io import atomic_write_json

N_MODELS = 3
WEIGHTS = [1.0] * N_MODELS  # as mergekit's YAML says it (it normalizes by their sum)
VOCAB, POSITIONS, WIDTH = 50257, 1024, 768


def gpt2_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """GPT-2 small's tensors in HF's names (GPT2LMHeadModel; lm_head is tied, not stored)."""
    shapes = {
        "transformer.wte.weight": (VOCAB, WIDTH),
        "transformer.wpe.weight": (POSITIONS, WIDTH),
    }
    for i in range(layers):
        h = f"transformer.h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (WIDTH,), f"{h}.ln_1.bias": (WIDTH,),
            f"{h}.attn.c_attn.weight": (WIDTH, 3 * WIDTH), f"{h}.attn.c_attn.bias": (3 * WIDTH,),
            f"{h}.attn.c_proj.weight": (WIDTH, WIDTH), f"{h}.attn.c_proj.bias": (WIDTH,),
            f"{h}.ln_2.weight": (WIDTH,), f"{h}.ln_2.bias": (WIDTH,),
            f"{h}.mlp.c_fc.weight": (WIDTH, 4 * WIDTH), f"{h}.mlp.c_fc.bias": (4 * WIDTH,),
            f"{h}.mlp.c_proj.weight": (4 * WIDTH, WIDTH), f"{h}.mlp.c_proj.bias": (WIDTH,),
        }  # fmt: skip
    return shapes | {"transformer.ln_f.weight": (WIDTH,), "transformer.ln_f.bias": (WIDTH,)}


def gpt2_config(layers: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": layers,
        "n_embd": WIDTH, "n_head": 12, "n_positions": POSITIONS, "n_ctx": POSITIONS,
        "vocab_size": VOCAB, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 50256,
        "eos_token_id": 50256,
    }  # fmt: skip


def make_inputs(folder: Path, layers: int, shard_bytes: int) -> dict[str, tuple[int, ...]]:
    """N_MODELS sharded model folders and N_MODELS Fisher files, one tensor at a time."""
    from meanwise.merging.checkpoints import SafetensorsWriter, TensorSpec, plan_shards

    shapes = gpt2_shapes(layers)
    specs = {k: TensorSpec(torch.float32, s) for k, s in shapes.items()}
    shards = plan_shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    g = torch.Generator().manual_seed(0)
    for m in range(N_MODELS):
        model = folder / f"model{m}"
        model.mkdir()
        weight_map = {}
        for name, shard in zip(names, shards, strict=True):
            with SafetensorsWriter(model / name, {k: specs[k] for k in shard}) as writer:
                for key in shard:
                    writer.write(key, torch.randn(shapes[key], generator=g) * 0.02)
                    weight_map[key] = name
        total = sum(s.nbytes for s in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (model / "config.json").write_text(json.dumps(gpt2_config(layers), indent=2))
        with SafetensorsWriter(folder / f"fisher{m}.safetensors", specs) as writer:
            for key in specs:
                writer.write(key, torch.rand(shapes[key], generator=g).square_())
    return shapes


def _models(folder: Path) -> list[Path]:
    return [folder / f"model{m}" for m in range(N_MODELS)]


def _fishers(folder: Path) -> list[Path]:
    return [folder / f"fisher{m}.safetensors" for m in range(N_MODELS)]


def child(method: str, folder: Path, out: Path) -> None:
    """One merge in this process (run as a child by the parent; imports inside on purpose)."""
    torch.set_num_threads(1)
    from meanwise.merging import merge_checkpoints

    if method == "average":
        merge_checkpoints(_models(folder), None, out, WEIGHTS, overwrite=True)
    elif method == "fisher":
        merge_checkpoints(_models(folder), _fishers(folder), out, WEIGHTS, overwrite=True)
    # "baseline": the imports alone


# Runs a Python script (argv[1]) as __main__ and, however it ends, writes the process's own
# peak RSS (VmHWM, KiB) to the file $MEANWISE_BENCH_HWM. VmHWM belongs to the address space
# that exec creates, so unlike ru_maxrss it does not inherit the (large) parent's high-water
# mark through fork/exec.
_MEASURED = """\
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["MEANWISE_BENCH_HWM"], "w") as out:
        out.write(hwm)
"""


def measured(interpreter: str, script: str, *args: str) -> list[str]:
    return [interpreter, "-c", _MEASURED, script, *args]


def run_child(command: list[str], env: dict, hwm_file: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of one child process."""
    hwm_file.unlink(missing_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**env, "MEANWISE_BENCH_HWM": str(hwm_file)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, err = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        text = err.decode(errors="replace")
        raise RuntimeError(f"{command[3]} failed with exit code {process.returncode}: "
                           f"{text[-2000:]}")  # fmt: skip
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - _cpu_so_far[0]
    _cpu_so_far[0] = usage.ru_utime + usage.ru_stime
    return seconds, cpu, int(hwm_file.read_text()) / 1024


_cpu_so_far = [0.0]  # RUSAGE_CHILDREN is cumulative over the waited-for children


def mergekit_config(folder: Path) -> Path:
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for model in _models(folder):
        lines += [f"  - model: {model}", "    parameters: {weight: 1.0}"]
    path = folder / "mergekit.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def find_mergekit(given: str | None) -> tuple[str, str] | None:
    """(its Python interpreter, the mergekit-yaml script), from --mergekit or PATH."""
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / "mergekit-yaml"
        found = str(path) if path.is_file() else None
    else:
        found = shutil.which("mergekit-yaml")
    if found is None:
        return None
    first = Path(found).read_bytes()[:200].split(b"\n")[0].decode(errors="replace")
    if not first.startswith("#!") or "python" not in first:
        return None  # not a Python console script: cannot measure it from the inside
    return first[2:].strip().split()[0], found


def _write_mergekit_baseline(folder: Path) -> Path:
    path = folder / "mergekit_imports.py"
    path.write_text("import torch, transformers, mergekit.merge, mergekit.scripts.run_yaml\n")
    return path


def compare(folder: Path, outputs: dict[str, Path]) -> dict:
    """Tensor-by-tensor max abs differences: each output vs the float64 formula, and meanwise's
    average vs mergekit's."""
    from safetensors import safe_open

    from meanwise.merging import open_checkpoint

    models = [open_checkpoint(p) for p in _models(folder)]
    fishers = [open_checkpoint(p) for p in _fishers(folder)]
    opened = {name: safe_open_folder(path, safe_open) for name, path in outputs.items()}
    keys = models[0].keys()
    result: dict = {name: {"max_abs_vs_float64": 0.0, "tensors": 0} for name in outputs}
    pair = "mergekit linear" in outputs and "meanwise average" in outputs
    if pair:
        result["meanwise average vs mergekit linear"] = {"max_abs": 0.0, "identical": 0}
    for name, tensors in opened.items():
        result[name]["keys_missing"] = sorted(set(keys) - set(tensors))[:5]
        result[name]["keys_extra"] = sorted(set(tensors) - set(keys))[:5]
    for key in keys:
        x = torch.stack([m.get(key).double() for m in models])
        average = x.mean(0)
        f = torch.stack([fi.get(key).double() for fi in fishers]).clamp_min(1e-6)
        fisher = (f * x).sum(0) / f.sum(0)
        got = {}
        for name, tensors in opened.items():
            if key not in tensors:
                continue
            got[name] = tensors[key]()
            oracle = fisher if "Fisher" in name else average
            diff = float((got[name].double() - oracle).abs().max())
            result[name]["max_abs_vs_float64"] = max(result[name]["max_abs_vs_float64"], diff)
            result[name]["tensors"] += 1
        if pair and "mergekit linear" in got and "meanwise average" in got:
            a, b = got["meanwise average"], got["mergekit linear"]
            entry = result["meanwise average vs mergekit linear"]
            entry["max_abs"] = max(entry["max_abs"], float((a.double() - b.double()).abs().max()))
            entry["identical"] += bool(torch.equal(a, b))
    for checkpoint in models + fishers:
        checkpoint.close()
    return result


def safe_open_folder(path: Path, safe_open) -> dict:
    """{tensor name: loader} over every safetensors file of an output folder."""
    loaders = {}
    for file in sorted(path.glob("*.safetensors")):
        handle = safe_open(str(file), framework="pt")
        for key in handle.keys():
            loaders[key] = lambda h=handle, k=key: h.get_tensor(k)
    return loaders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 12")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--tmp", metavar="DIR", help="where to put the temporary checkpoints")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mergekit", metavar="PATH", help="mergekit-yaml (or its bin folder)")
    parser.add_argument("--child", choices=("baseline", "average", "fisher"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.tmp), Path(args.out))
        return 0

    layers = 2 if args.quick else 12
    mergekit = find_mergekit(args.mergekit)
    folder = Path(tempfile.mkdtemp(prefix="meanwise-merge-bench-", dir=args.tmp))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        start = time.perf_counter()
        shapes = make_inputs(folder, layers, shard_bytes=200 * 10**6)
        numel = {k: int(torch.Size(s).numel()) for k, s in shapes.items()}
        model_bytes = 4 * sum(numel.values())
        largest_key = max(numel, key=numel.__getitem__)
        largest = 4 * numel[largest_key]
        print(f"wrote {N_MODELS} GPT-2-shaped models ({layers} layers, "
              f"{model_bytes / 2**20:.0f} MiB each, sharded) + Fishers in "
              f"{time.perf_counter() - start:.1f}s; largest tensor {largest_key} "
              f"{list(shapes[largest_key])} = {largest / 2**20:.1f} MiB")  # fmt: skip
        me = measured(sys.executable, __file__, "--tmp", str(folder))
        commands = {
            "meanwise baseline": [*me, "--child", "baseline", "--out", str(folder / "none")],
            "meanwise average": [*me, "--child", "average", "--out", str(folder / "average")],
            "meanwise Fisher": [*me, "--child", "fisher", "--out", str(folder / "fisher")],
        }
        if mergekit is None:
            print("mergekit: not found (pass --mergekit PATH or put mergekit-yaml on PATH); "
                  "its rows are skipped")  # fmt: skip
        else:
            interpreter, script = mergekit
            config = mergekit_config(folder)
            # its baseline imports what its merge imports (mergekit, torch, transformers)
            baseline = _write_mergekit_baseline(folder)
            commands["mergekit baseline"] = measured(interpreter, str(baseline))
            commands["mergekit linear"] = measured(
                interpreter, script, str(config), str(folder / "mergekit"), "--quiet",
                "--no-cuda", "-j", "1",
            )  # fmt: skip
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        hwm = folder / "hwm.txt"
        for _ in range(args.rounds):
            for name, command in commands.items():
                if name == "mergekit linear":
                    shutil.rmtree(folder / "mergekit", ignore_errors=True)
                samples[name].append(run_child(command, env, hwm))
        outputs = {"meanwise average": folder / "average", "meanwise Fisher": folder / "fisher"}
        if mergekit is not None:
            outputs["mergekit linear"] = folder / "mergekit"
        comparison = compare(folder, outputs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    medians = {
        name: tuple(statistics.median(run[i] for run in runs) for i in range(3))
        for name, runs in samples.items()
    }
    bound = (N_MODELS + 2) * largest
    print(f"\nmerge of {N_MODELS} models, {args.rounds} interleaved rounds, medians; net = "
          "minus the baseline child of the same tool (its imports); peak RSS = the child's "
          "VmHWM")  # fmt: skip
    print(f"  bound checked: net peak RSS <= (models + 2) x largest = {bound / 2**20:.0f} MiB")
    print(f"  {'run':18s} {'wall':>8s} {'CPU':>8s} {'net CPU':>8s} {'peak RSS':>10s} "
          f"{'net RSS':>9s} {'net/largest':>12s} {'within bound':>13s}")  # fmt: skip
    rows = []
    for name, (seconds, cpu, rss) in medians.items():
        tool = name.split()[0]
        _, base_cpu, base_rss = medians[f"{tool} baseline"]
        net_cpu, net_rss = cpu - base_cpu, rss - base_rss
        baseline = name.endswith("baseline")
        ratio = net_rss * 2**20 / largest
        within = "" if baseline else ("yes" if net_rss * 2**20 <= bound else "NO")
        shown = "" if baseline else f"{ratio:.2f}x"
        print(f"  {name:18s} {seconds:7.2f}s {cpu:7.2f}s {net_cpu:7.2f}s {rss:8.0f}MiB "
              f"{net_rss:7.0f}MiB {shown:>12s} {within:>13s}")  # fmt: skip
        rows.append({"run": name, "wall_seconds": seconds, "cpu_seconds": cpu,
                     "net_cpu_seconds": net_cpu, "peak_rss_mib": rss,
                     "net_peak_rss_mib": net_rss, "net_rss_over_largest_tensor": ratio,
                     "within_bound": None if baseline else within == "yes"})  # fmt: skip
    ratios = {}
    if mergekit is not None:
        ours, theirs = medians["meanwise average"], medians["mergekit linear"]
        base_ours, base_theirs = medians["meanwise baseline"], medians["mergekit baseline"]
        ratios = {
            "wall_mergekit_over_meanwise": theirs[0] / ours[0],
            "cpu_mergekit_over_meanwise": theirs[1] / ours[1],
            "net_cpu_mergekit_over_meanwise": (theirs[1] - base_theirs[1])
            / max(ours[1] - base_ours[1], 1e-9),
            "peak_rss_mergekit_over_meanwise": theirs[2] / ours[2],
            "net_rss_mergekit_over_meanwise": (theirs[2] - base_theirs[2])
            / max(ours[2] - base_ours[2], 1e-9),
        }
        print("  mergekit linear / meanwise average: wall {wall_mergekit_over_meanwise:.2f}x, CPU "
              "{cpu_mergekit_over_meanwise:.2f}x (net {net_cpu_mergekit_over_meanwise:.2f}x), "
              "peak RSS {peak_rss_mergekit_over_meanwise:.2f}x (net "
              "{net_rss_mergekit_over_meanwise:.2f}x)".format(**ratios))  # fmt: skip
    print("\noutputs, tensor by tensor:")
    for name, entry in comparison.items():
        print(f"  {name}: {entry}")
    ok = all(r["within_bound"] is not False for r in rows)
    if args.json:
        results = {
            "machine": machine_info(cpus=os.cpu_count()),
            "quick": args.quick, "layers": layers, "models": N_MODELS,
            "model_bytes": model_bytes, "largest_tensor": largest_key,
            "largest_tensor_bytes": largest, "bound_bytes": bound, "rounds": args.rounds,
            "mergekit": mergekit, "results": rows, "ratios": ratios, "comparison": comparison,
        }  # fmt: skip
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
