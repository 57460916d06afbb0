"""Checkpoint merge memory and time: streaming (`merge_checkpoints`) vs loading whole models.

Two synthetic float32 checkpoints of about 1 GB each (``--quick``: 64 MB), each with a Fisher of
the same size, are Fisher-merged into a new safetensors file by

- streaming: ``meanwise.merging.merge_checkpoints`` (one tensor per model and Fisher in memory);
- whole models: ``safetensors.torch.load_file`` of all four files, ``fisher_merge`` in memory,
  ``safetensors.torch.save_file`` -- what one writes without a streaming tool.

Each run is a fresh child process; its peak RSS is the child's own ``ru_maxrss`` as reported by
``os.wait4`` (getrusage of that child). Runs are interleaved over rounds, medians are reported,
and the two outputs are compared tensor by tensor. Temporary files are removed at the end.

    python benchmarks/merge.py [--quick] [--json PATH] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from meanwise.atomic_io import atomic_write_json

TENSOR_SHAPE = (2048, 2048)  # 16 MiB per float32 tensor


def make_inputs(folder: Path, total_bytes: int) -> None:
    """Two models and two Fishers, written tensor by tensor (never a whole model in memory)."""
    from meanwise.merging.checkpoints import SafetensorsWriter, TensorSpec

    per_tensor = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 4
    count = max(1, total_bytes // per_tensor)
    specs = {f"layers.{i}.weight": TensorSpec(torch.float32, TENSOR_SHAPE) for i in range(count)}
    g = torch.Generator().manual_seed(0)
    for name in ("model0", "model1", "fisher0", "fisher1"):
        with SafetensorsWriter(folder / f"{name}.safetensors", specs) as writer:
            for key in specs:
                t = torch.randn(TENSOR_SHAPE, generator=g)
                writer.write(key, t.square_() if name.startswith("fisher") else t)


def child(method: str, folder: Path, out: Path) -> None:
    """One merge in this process (run as a child by the parent)."""
    torch.set_num_threads(1)
    models = [folder / "model0.safetensors", folder / "model1.safetensors"]
    fishers = [folder / "fisher0.safetensors", folder / "fisher1.safetensors"]
    if method == "baseline":
        import safetensors.torch  # noqa: F401

        import meanwise.merging  # noqa: F401 - the imports alone: torch's own footprint
    elif method == "streaming":
        from meanwise.merging import merge_checkpoints

        merge_checkpoints(models, fishers, out, coefficients=[0.5, 0.5], overwrite=True)
    else:
        from safetensors.torch import load_file, save_file

        from meanwise.merging import fisher_merge

        states = [load_file(str(p)) for p in models]
        fisher_states = [load_file(str(p)) for p in fishers]
        merged = fisher_merge(states, fisher_states, [0.5, 0.5])
        out.mkdir(parents=True, exist_ok=True)
        save_file(merged, str(out / "model.safetensors"))


def run_child(method: str, folder: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child merge."""
    command = [sys.executable, __file__, "--child", method, "--tmp", str(folder), "--out",
               str(out)]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{method} merge failed with exit code {process.returncode}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def outputs_equal(a: Path, b: Path) -> bool:
    from meanwise.merging import open_checkpoint

    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        return set(x.keys()) == set(y.keys()) and all(
            torch.equal(x.get(k), y.get(k)) for k in x.keys()
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MB checkpoints instead of 1 GB")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--tmp", metavar="DIR", help="where to put the temporary checkpoints")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--child", choices=("baseline", "streaming", "whole"), help=argparse.SUPPRESS
    )
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, Path(args.tmp), Path(args.out))
        return 0

    size = 64 * 2**20 if args.quick else 2**30
    folder = Path(tempfile.mkdtemp(prefix="meanwise-merge-bench-", dir=args.tmp))
    try:
        start = time.perf_counter()
        make_inputs(folder, size)
        print(f"wrote 2 models + 2 Fishers of {size / 2**20:.0f} MiB each in "
              f"{time.perf_counter() - start:.1f}s to {folder}")  # fmt: skip
        samples: dict[str, list[tuple[float, float]]] = {
            "baseline": [], "streaming": [], "whole": []
        }  # fmt: skip
        for _ in range(args.rounds):
            for method in samples:
                samples[method].append(run_child(method, folder, folder / f"out-{method}"))
        same = outputs_equal(folder / "out-streaming", folder / "out-whole")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    medians = {
        m: (statistics.median(s for s, _ in runs), statistics.median(r for _, r in runs))
        for m, runs in samples.items()
    }
    base_s, base_rss = medians["whole"]
    import_s, import_rss = medians["baseline"]
    print(f"\nFisher merge of two {size / 2**20:.0f} MiB checkpoints (+ Fishers), "
          f"{args.rounds} interleaved rounds, medians")  # fmt: skip
    print("  (baseline: a child that only imports torch and meanwise; 'net' subtracts it)")
    print(f"  {'method':10s} {'time':>8s} {'net time':>9s} {'peak RSS':>10s} {'net RSS':>9s} "
          f"{'net time vs whole':>18s} {'net RSS vs whole':>17s}")  # fmt: skip
    rows = []
    for method, (seconds, rss) in medians.items():
        net_s, net_rss = seconds - import_s, rss - import_rss
        time_ratio = net_s / (base_s - import_s) if method != "baseline" else float("nan")
        rss_ratio = net_rss / (base_rss - import_rss) if method != "baseline" else float("nan")
        print(f"  {method:10s} {seconds:7.2f}s {net_s:8.2f}s {rss:8.0f}MiB {net_rss:7.0f}MiB "
              f"{time_ratio:17.2f}x {rss_ratio:16.2f}x")  # fmt: skip
        rows.append({"method": method, "seconds": seconds, "peak_rss_mib": rss,
                     "net_seconds": net_s, "net_peak_rss_mib": net_rss,
                     "net_time_vs_whole": time_ratio,
                     "net_rss_vs_whole": rss_ratio})  # fmt: skip
    print(f"  outputs identical: {same}")
    if args.json:
        results = {
            "machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "platform": platform.platform()},
            "quick": args.quick, "checkpoint_bytes": size, "rounds": args.rounds,
            "results": rows, "outputs_identical": same,
        }  # fmt: skip
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
