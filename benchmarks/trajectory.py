"""Trajectory speed: batched AMD/AMV against a per-cell scikit-learn loop, and Social-Implicit
inference against a per-zone, per-convolution forward like the released code's.

1. ``amd_amv``: AMD/AMV (and KDE-NLL) of the released UNIV weights on the UNIV test set with
   K = 1000 samples (24,334 pedestrian-windows x 12 steps = 292,008 cells), streamed through
   `DistributionMetrics`; only the metric time is counted (sampling is reported apart). The
   peer is the paper's approach, one scikit-learn `GaussianMixture` fit per cell and component
   count, timed on a sample of cells and extrapolated to all of them. Target: <= 300 s.
2. ``inference``: scenes per second at K = 20, one scene per call, 1 thread, float64 and
   float32, over the ZARA1 test scenes; interleaved rounds, medians. The peer runs the same
   weights the way the released code does (a loop over the four zones with masked writes, each
   Social-Cell as eight separate convolutions). Targets: >= the peer and >= 580 scenes/s (the
   paper's claim).

``--quick`` uses every 10th UNIV scene for (1) (extrapolated by cell count) and fewer rounds.

    python benchmarks/trajectory.py [--quick] [--json PATH] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from _timing import time_interleaved  # benchmarks/_timing.py, the shared timing loop
from _trajectory_train import bench_train, train_main  # training speed (issue 11)
from meanwise.atomic_io import atomic_write_json
from meanwise.trajectory.data import load_split, resolve_data_dir
from meanwise.trajectory.metrics import DistributionMetrics
from meanwise.trajectory.social_implicit import SocialImplicit

AMD_TARGET_SECONDS = 300.0
PAPER_SCENES_PER_SECOND = 580.0


# --- the peers ---------------------------------------------------------------------------------


def sklearn_cell(samples: np.ndarray, gt: np.ndarray, seed: int = 0) -> tuple[float, np.ndarray]:
    """One cell the paper's way: scikit-learn fits of 1, 2, ... components until BIC stops
    falling (at most 4), then the AMD distance and the total covariance."""
    from scipy.special import erf
    from sklearn.mixture import GaussianMixture

    best, best_bic = None, math.inf
    for k in range(1, 5):
        gm = GaussianMixture(n_components=k, random_state=seed).fit(samples)
        bic = gm.bic(samples)
        if bic >= best_bic:
            break
        best, best_bic = gm, bic
    w, mu, cov = best.weights_, best.means_, best.covariances_
    center = w @ mu
    v = center - gt
    num, den = np.zeros((2, 2)), 0.0
    for wk, mk, ck in zip(w, mu, cov, strict=True):
        p = np.linalg.pinv(ck)
        u = mk - gt
        b2 = 1.0 / (v @ p @ v)
        a = b2 * (v @ p @ u)
        z = u @ p @ u - b2 * (v @ p @ u) ** 2
        s = math.sqrt(2 * b2)
        pk = math.sqrt(math.pi * b2 / 2) * math.exp(-z / 2) * (erf((1 - a) / s) - erf(-a / s))
        num, den = num + wk * pk * p, den + wk * pk
    dist = math.sqrt(v @ (num / den) @ v)
    spread = mu - center
    total = (w[:, None, None] * (cov + spread[:, :, None] * spread[:, None])).sum(0)
    return (0.0 if math.isnan(dist) else dist), total


class ReleasedStyleForward:
    """The released forward's structure on the same weights: a zeros output, a loop over the
    four zones with masked reads and writes, and each Social-Cell as eight convolutions."""

    def __init__(self, model: SocialImplicit) -> None:
        self.params = {k: v for k, v in model.state_dict().items()}
        self.bins = model.bins.to(next(iter(self.params.values())).dtype)
        self.factors = model.noise_factors

    def cell(self, i: int, v: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        def p(name: str) -> torch.Tensor:
            return self.params[f"implicit_cells.{i}.{name}"]

        v = v + p("noise_w") * self.factors[i] * noise
        k, c, t, n = v.shape
        w = v.permute(0, 3, 1, 2).reshape(k * n, c, t)
        res = F.conv1d(w, p("ped.highway_input.weight"), p("ped.highway_input.bias"))
        w = F.relu(F.conv1d(w, p("ped.feat.weight"), p("ped.feat.bias"), padding=1)) + res
        w = w.permute(0, 2, 1)
        res = F.conv1d(w, p("ped.highway.weight"), p("ped.highway.bias"))
        w = F.conv1d(w, p("ped.tpcnn.weight"), p("ped.tpcnn.bias"), padding=1) + res
        local = w.permute(0, 2, 1).reshape(k, n, c, 12).permute(0, 2, 3, 1)
        res = F.conv2d(v, p("highway_input.weight"), p("highway_input.bias"))
        v = F.relu(F.conv2d(v, p("feat.weight"), p("feat.bias"), padding=1)) + res
        v = v.permute(0, 2, 1, 3)
        res = F.conv2d(v, p("highway.weight"), p("highway.bias"))
        v = (F.conv2d(v, p("tpcnn.weight"), p("tpcnn.bias"), padding=1) + res).permute(0, 2, 1, 3)
        return p("global_w") * v + p("local_w") * local

    def __call__(self, rel: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        v = rel.permute(2, 0, 1).unsqueeze(0)  # [1, 2, 8, N]
        noise = torch.randn(k, 2, generator=generator, dtype=v.dtype).view(k, 2, 1, 1)
        zone = torch.bucketize(rel[0].abs().amax(-1), self.bins, right=True) - 1
        out = v.new_zeros(k, 2, 12, v.shape[-1])
        for i in range(len(self.bins)):
            select = zone == i
            if torch.any(select):
                out[..., select] = self.cell(i, v[..., select].contiguous(), noise)
        return out


# --- measurements ------------------------------------------------------------------------------


def bench_inference(checkpoints, data_dir, rounds: int) -> list[dict]:
    scenes = load_split("zara1", "test", data_dir)
    turns: dict[str, Callable[[], None]] = {}
    for dtype, label in ((torch.float64, "float64"), (torch.float32, "float32")):
        model = SocialImplicit.from_official_checkpoint(checkpoints / "zara1").to(dtype)
        rels = [s.observed_displacements().to(dtype) for s in scenes]
        peer = ReleasedStyleForward(model)

        def ours(model=model, rels=rels):
            g = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                for rel in rels:
                    model(rel, 20, generator=g)

        def theirs(peer=peer, rels=rels):
            g = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                for rel in rels:
                    peer(rel, 20, g)

        turns[f"Social-Implicit (meanwise, {label})"] = ours
        turns[f"released-style forward ({label})"] = theirs
    timings = time_interleaved(turns, rounds)
    medians, cpu = timings.wall, timings.cpu
    rows = []
    print(f"\ninference, K = 20, one scene per call, ZARA1 test ({len(scenes)} scenes), 1 thread")
    print(f"  {'candidate':44s} {'scenes/s':>9s} {'(CPU time)':>11s} {'vs peer':>8s}  target")
    for label in ("float64", "float32"):
        peer_rate = len(scenes) / medians[f"released-style forward ({label})"]
        for name in (f"Social-Implicit (meanwise, {label})", f"released-style forward ({label})"):
            rate, cpu_rate = len(scenes) / medians[name], len(scenes) / cpu[name]
            ratio = rate / peer_rate
            mark = ""
            if "meanwise" in name:
                ok = rate >= PAPER_SCENES_PER_SECOND and ratio >= 1.0
                mark = f">= {PAPER_SCENES_PER_SECOND:.0f}/s and >= peer " + (
                    "ok" if ok else "MISSED"
                )
            print(f"  {name:44s} {rate:9.0f} {cpu_rate:11.0f} {ratio:7.2f}x  {mark}")
            rows.append(
                {
                    "candidate": name,
                    "scenes_per_second": rate,
                    "scenes_per_cpu_second": cpu_rate,
                    "ratio_to_peer": ratio,
                }
            )
    return rows


def bench_amd_amv(checkpoints, data_dir, quick: bool, peer_cells: int) -> dict:
    model = SocialImplicit.from_official_checkpoint(checkpoints / "univ")
    scenes = load_split("univ", "test", data_dir)
    full_cells = sum(12 * s.num_pedestrians for s in scenes)
    used = scenes[::10] if quick else scenes
    cells = sum(12 * s.num_pedestrians for s in used)
    metrics = DistributionMetrics(seed=0)
    generator = torch.Generator().manual_seed(0)
    sampling = metric = metric_cpu = 0.0
    rng = np.random.default_rng(0)
    sample_every = max(1, cells // peer_cells)
    peer_seconds, peer_dist, our_cells = 0.0, [], []
    seen = 0
    with torch.inference_mode():
        for scene in used:
            start = time.perf_counter()
            pred = model.predict(scene.observed, 1000, generator=generator)
            sampling += time.perf_counter() - start
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics.update(pred, scene.future)
            metric += time.perf_counter() - start
            metric_cpu += time.process_time() - start_cpu
            # the peer on every `sample_every`-th cell of the same predictions
            flat = pred.permute(1, 2, 0, 3).reshape(-1, 1000, 2).numpy()
            gt = scene.future.reshape(-1, 2).numpy()
            for c in range(flat.shape[0]):
                if (seen + c) % sample_every == 0 and len(peer_dist) < peer_cells:
                    start = time.perf_counter()
                    dist, _ = sklearn_cell(flat[c], gt[c], seed=int(rng.integers(1 << 30)))
                    peer_seconds += time.perf_counter() - start
                    peer_dist.append(dist)
                    our_cells.append((flat[c], gt[c]))
            seen += flat.shape[0]
    start, start_cpu = time.perf_counter(), time.process_time()
    values = metrics.compute()
    metric += time.perf_counter() - start
    metric_cpu += time.process_time() - start_cpu
    # our distances on the peer's cells, for agreement (same fits, one batch)
    sample = DistributionMetrics(seed=0, kde=False, chunk_cells=1)
    mine = []
    for samples, gt in our_cells:
        sample.update(torch.from_numpy(samples)[:, None, None], torch.from_numpy(gt)[None, None])
    mine = sample.per_scene()["amd"].tolist()
    scale = full_cells / cells
    ours_full = metric * scale
    peer_full = peer_seconds / max(len(peer_dist), 1) * full_cells
    print(
        f"\nAMD/AMV + KDE-NLL, UNIV test, K = 1000: {len(used)} scenes, {cells:,} cells"
        + (f" (extrapolated x{scale:.1f} to {full_cells:,} cells)" if quick else "")
    )
    print(f"  {'candidate':44s} {'total':>10s} {'per cell':>10s} {'vs ours':>8s}")
    print(
        f"  {'batched torch EM (meanwise)':44s} {ours_full:9.1f}s {metric / cells * 1e3:8.3f}ms"
        f" {1.0:7.2f}x  <= {AMD_TARGET_SECONDS:.0f}s "
        + ("ok" if ours_full <= AMD_TARGET_SECONDS else "MISSED")
    )
    print(
        f"  {'scikit-learn per cell (' + str(len(peer_dist)) + ' cells, extrapolated)':44s}"
        f" {peer_full:9.1f}s {peer_full / full_cells * 1e3:8.3f}ms {peer_full / ours_full:7.2f}x"
    )
    print(
        f"  (batched EM process CPU time: {metric_cpu * scale:.1f}s for all cells; the wall time"
        " above includes waiting for a core on a shared machine)"
    )
    print(f"  sampling the predictions (not counted): {sampling:.1f}s")
    diff = np.abs(np.array(mine) - np.array(peer_dist))
    print(
        f"  agreement on the peer's cells: max |AMD cell difference| {diff.max():.2e}, "
        f"cells differing by > 1e-6: {(diff > 1e-6).sum()}/{len(diff)}"
    )
    print(f"  values: {', '.join(f'{k} {v:.4f}' for k, v in values.items())}")
    return {
        "scenes": len(used),
        "cells": cells,
        "full_cells": full_cells,
        "metric_seconds": metric,
        "metric_cpu_seconds": metric_cpu,
        "metric_cpu_seconds_full_extrapolated": metric_cpu * scale,
        "metric_seconds_full_extrapolated": ours_full,
        "sampling_seconds": sampling,
        "peer_cells": len(peer_dist),
        "peer_seconds_per_cell": peer_seconds / max(len(peer_dist), 1),
        "peer_seconds_full_extrapolated": peer_full,
        "speedup": peer_full / ours_full,
        "max_abs_cell_difference": float(diff.max()),
        "values": values,
        "target_seconds": AMD_TARGET_SECONDS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of UNIV, fewer rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--data-dir", default=None, metavar="DIR")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--only",
        choices=("amd_amv", "inference", "train"),
        default=None,
        help="run one measurement",
    )
    args = parser.parse_args(argv)
    if args.only == "train":  # needs no released weights
        return train_main(args)
    torch.set_num_threads(args.threads)
    root = resolve_data_dir(args.data_dir)
    if root is None or not (root / "social_implicit_checkpoints").is_dir():
        print("benchmark needs the data folder (--data-dir or $MEANWISE_DATA_DIR)", file=sys.stderr)
        return 2
    checkpoints = root / "social_implicit_checkpoints"
    results: dict = {
        "machine": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": args.threads,
        },
        "quick": args.quick,
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.only in (None, "inference"):
        results["inference"] = bench_inference(checkpoints, root, rounds=5 if args.quick else 15)
    if args.only in (None, "amd_amv"):
        results["amd_amv"] = bench_amd_amv(
            checkpoints, root, args.quick, peer_cells=20 if args.quick else 100
        )
    if args.only is None:
        results["train"] = bench_train(root, args.quick)
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
