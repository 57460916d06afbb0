"""Trajectory speed: batched AMD/AMV against the authors' per-cell scikit-learn code, and
Social-Implicit inference against a per-zone, per-convolution forward like the released code's.

1. ``amd_amv``: AMD/AMV of the released UNIV weights' K = 1000 predictions. (a) Side by side:
   meanwise's `DistributionMetrics` and the authors' `calc_amd_amv` (transcribed in
   `AuthorsMetrics`, or their own file with ``--authors-code``) take turns on the same few
   hundred cells, warm (their scipy/scikit-learn imports and one call of each side happen before
   the timed rounds), medians; per-cell times and the ratio are printed. Targets: <= 0.2 ms per
   cell and >= 100x. (b) meanwise alone on the whole UNIV test set (24,334 pedestrian-windows x
   12 steps = 292,008 cells), streamed; only the metric time is counted (sampling apart).
2. ``inference``: scenes per second at K = 20, one scene per call, 1 thread, float64 and
   float32, over the ZARA1 test scenes; interleaved rounds, medians. The peer runs the same
   weights the way the released code does (a loop over the four zones with masked writes, each
   Social-Cell as eight separate convolutions). Targets: >= the peer and >= 580 scenes/s (the
   paper's claim).
3. ``train`` (benchmarks/_trajectory_train.py): batched against per-scene training steps.

``--quick``: fewer side-by-side cells and rounds, every 10th UNIV scene for (1b) (extrapolated
by cell count).

    python benchmarks/trajectory.py [--quick] [--json PATH] [--data-dir DIR] [--only amd_amv]
        [--authors-code PATH/TO/Social-Implicit/amd_amv_kde_metrics.py]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
from _trajectory_train import bench_train, train_main  # training speed (issue 11)
from meanwise.atomic_io import atomic_write_json
from meanwise.trajectory.data import load_split, resolve_data_dir
from meanwise.trajectory.metrics import DistributionMetrics
from meanwise.trajectory.social_implicit import SocialImplicit

OUR_TARGET_MS = 0.2  # AMD/AMV per cell at K = 1000, one thread
RATIO_TARGET = 100.0  # against the authors' code, same cells, warm
PAPER_SCENES_PER_SECOND = 580.0


# --- the peers ---------------------------------------------------------------------------------


class AuthorsMetrics:
    """The authors' AMD/AMV code (Social-Implicit's amd_amv_kde_metrics.py: `calc_amd_amv`,
    `get_best_gmm2`, `mahalanobis_d`), transcribed call for call: per scene a loop over the
    (time step, pedestrian) cells, per cell scikit-learn `GaussianMixture` fits of 1, 2, ...
    components until BIC stops falling (at most 4; `random_state=None`, so seed numpy's global
    generator for repeatable fits), the segment-integral distance with `np.linalg.pinv` and
    scalar `erf`, and the mixture's total covariance.

    With ``path`` (their file, e.g. a clone's amd_amv_kde_metrics.py) their own functions run
    instead; numpy 2 removed ``np.infty``, which that file uses, so it is restored first. The
    scipy/scikit-learn imports happen here, outside any timed region."""

    def __init__(self, path: str | None = None) -> None:
        from scipy.special import erf
        from sklearn.mixture import GaussianMixture

        self.erf, self.GaussianMixture, self.source = erf, GaussianMixture, "transcribed"
        self.module = None
        if path is not None:
            import importlib.util

            if not hasattr(np, "infty"):
                setattr(np, "infty", np.inf)  # noqa: B010 (their file reads np.infty)
            spec = importlib.util.spec_from_file_location("authors_amd_amv", path)
            if spec is None or spec.loader is None:
                raise SystemExit(f"--authors-code {path}: not a Python file")
            self.module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.module)
            self.source = path

    def best_gmm(self, x: np.ndarray):
        best, lowest = None, math.inf
        n_components, misses = 1, 0
        while misses < 1 and n_components < 5:
            gmm = self.GaussianMixture(n_components=n_components, covariance_type="full")
            gmm.fit(x)
            bic = gmm.bic(x)
            if bic < lowest:
                best, lowest, misses = gmm, bic, 0
            else:
                misses += 1
            n_components += 1
        return best

    def mahalanobis(self, x, y, n_clusters, ccov, cmeans, cluster_p) -> float:
        erf = self.erf
        v = np.array(x - y)
        g_num, g_den = 0, 0
        for i in range(n_clusters):
            ck = np.linalg.pinv(ccov[i])
            u = np.array(cmeans[i] - y)
            b2 = 1 / (v.T @ ck @ v)
            a = b2 * v.T @ ck @ u
            z = u.T @ ck @ u - b2 * (v.T @ ck @ u) ** 2
            pxk = (
                math.sqrt(np.pi * b2 / 2)
                * math.exp(-z / 2)
                * (erf((1 - a) / math.sqrt(2 * b2)) - erf(-a / math.sqrt(2 * b2)))
            )
            g_num = g_num + ck * cluster_p[i] * pxk
            g_den = g_den + cluster_p[i] * pxk
        dist = math.sqrt(v.T @ (g_num / g_den) @ v)
        return 0.0 if np.isnan(dist) else dist

    def amd_amv(self, gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
        """gt [T, N, 2], pred [T, N, K, 2] (the authors' layout) -> (AMD, AMV) of the scene."""
        if self.module is not None:
            amd, _, _, _, amv = self.module.calc_amd_amv(gt, pred)
            return float(amd), float(amv)
        total, cov_all = 0.0, 0
        for i in range(pred.shape[0]):
            for j in range(pred.shape[1]):
                gmm = self.best_gmm(pred[i, j])
                w, mu, cov = gmm.weights_, gmm.means_, gmm.covariances_
                center = np.sum(mu * w[:, None], axis=0)
                spread = 0
                for c in range(len(mu)):
                    d = (mu[c] - center)[..., None]
                    spread = spread + w[c] * d @ d.T
                cov_all = cov_all + np.sum(w[:, None, None] * cov, axis=0) + spread
                total += self.mahalanobis(center, gt[i, j], len(w), cov, mu, w)
        cells = pred.shape[0] * pred.shape[1]
        return total / cells, float(np.abs(np.linalg.eigvals(cov_all / cells)).max())


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


def _side_by_side_scenes(model, scenes, cells_wanted: int, generator) -> list:
    """Scenes spread over the test set, each at most half the budget (else the smallest ones),
    until about `cells_wanted` cells, with their K = 1000 predictions."""
    small = [s for s in scenes if 12 * s.num_pedestrians <= cells_wanted // 2]
    small = small or sorted(scenes, key=lambda s: s.num_pedestrians)[:4]
    sizes = sorted(12 * s.num_pedestrians for s in small)
    stride = max(1, len(small) * sizes[len(sizes) // 2] // cells_wanted)
    chosen, cells = [], 0
    with torch.inference_mode():
        for scene in small[::stride]:
            if cells >= cells_wanted:
                break
            chosen.append((model.predict(scene.observed, 1000, generator=generator), scene.future))
            cells += 12 * scene.num_pedestrians
    return chosen


def bench_amd_amv(
    checkpoints, data_dir, quick: bool, peer_cells: int, rounds: int, authors_code: str | None
) -> dict:
    """AMD/AMV at K = 1000 on UNIV: (a) meanwise and the authors' code interleaved on the same
    cells, warm; (b) meanwise alone on the whole test set (a tenth with --quick)."""
    model = SocialImplicit.from_official_checkpoint(checkpoints / "univ")
    scenes = load_split("univ", "test", data_dir)
    peer = AuthorsMetrics(authors_code)  # scipy / scikit-learn imported here, not timed
    generator = torch.Generator().manual_seed(0)
    chosen = _side_by_side_scenes(model, scenes, peer_cells, generator)
    cells = sum(p.shape[1] * p.shape[2] for p, _ in chosen)
    # the authors' layout [T, N, K, 2], converted outside the timed region
    theirs_inputs = [(gt.numpy(), pred.permute(1, 2, 0, 3).numpy()) for pred, gt in chosen]

    def ours():
        metrics = DistributionMetrics(seed=0, kde=False)
        for pred, gt in chosen:
            metrics.update(pred, gt)
        return metrics.per_scene()

    def theirs():
        # their GaussianMixture(random_state=None) draws from numpy's legacy global generator
        np.random.seed(0)  # noqa: NPY002
        return [peer.amd_amv(gt, pred) for gt, pred in theirs_inputs]

    timings = time_interleaved({"meanwise": ours, "authors": theirs}, rounds)  # 1 warm-up each
    mine, peers = timings.results["meanwise"], timings.results["authors"]
    amd_rel = max(
        abs(a - b[0]) / max(abs(b[0]), 1e-12)
        for a, b in zip(mine["amd"].tolist(), peers, strict=True)
    )
    amv_rel = max(
        abs(a - b[1]) / max(abs(b[1]), 1e-12)
        for a, b in zip(mine["amv"].tolist(), peers, strict=True)
    )
    ours_ms = timings.wall["meanwise"] / cells * 1e3
    theirs_ms = timings.wall["authors"] / cells * 1e3
    ours_cpu_ms = timings.cpu["meanwise"] / cells * 1e3
    theirs_cpu_ms = timings.cpu["authors"] / cells * 1e3
    ratio, cpu_ratio = theirs_ms / ours_ms, theirs_cpu_ms / ours_cpu_ms
    print(
        f"\nAMD/AMV, UNIV test, K = 1000, 1 thread: the same {len(chosen)} scenes "
        f"({cells:,} cells), interleaved, {rounds} rounds after a warm-up, medians"
    )
    print(f"  peer: the authors' code ({peer.source}); imports and a warm-up call not timed")
    print(f"  {'candidate':36s} {'per cell':>10s} {'(CPU)':>10s} {'speed-up':>9s}")
    print(
        f"  {'batched torch EM (meanwise)':36s} {ours_ms:8.3f}ms {ours_cpu_ms:8.3f}ms {ratio:8.1f}x"
    )
    print(
        f"  {'authors (scikit-learn per cell)':36s} {theirs_ms:8.3f}ms {theirs_cpu_ms:8.3f}ms"
        f" {1.0:8.1f}x"
    )
    print(f"  speed-up in CPU time on these cells: {cpu_ratio:.1f}x")
    print(
        f"  agreement per scene (EM initialisations differ): max relative AMD difference "
        f"{amd_rel:.2e}, AMV {amv_rel:.2e}"
    )
    # (b) the whole test set, streamed; only the metric is timed (sampling reported apart)
    used = scenes[::10] if quick else scenes
    full_cells = sum(12 * s.num_pedestrians for s in scenes)
    used_cells = sum(12 * s.num_pedestrians for s in used)
    metrics = DistributionMetrics(seed=0, kde=False)
    sampling = metric = metric_cpu = 0.0
    with torch.inference_mode():
        for scene in used:
            start = time.perf_counter()
            pred = model.predict(scene.observed, 1000, generator=generator)
            sampling += time.perf_counter() - start
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics.update(pred, scene.future)
            metric += time.perf_counter() - start
            metric_cpu += time.process_time() - start_cpu
    start, start_cpu = time.perf_counter(), time.process_time()
    values = metrics.compute()
    metric += time.perf_counter() - start
    metric_cpu += time.process_time() - start_cpu
    scale = full_cells / used_cells
    dataset_cpu_ms = metric_cpu / used_cells * 1e3
    dataset_ratio = theirs_cpu_ms / dataset_cpu_ms
    print(
        f"  meanwise on {'every 10th scene of ' if quick else ''}the UNIV test set: "
        f"{len(used)} scenes, {used_cells:,} cells in {metric:.1f} s wall, {metric_cpu:.1f} s "
        f"CPU ({metric / used_cells * 1e3:.3f} ms/cell wall, {dataset_cpu_ms:.3f} CPU)"
        + (f"; all {full_cells:,} cells: ~{metric * scale:.0f} s" if quick else "")
    )
    ok = dataset_cpu_ms <= OUR_TARGET_MS and dataset_ratio >= RATIO_TARGET
    print(
        f"  per cell at dataset scale against the authors' per-cell CPU time: "
        f"{dataset_ratio:.1f}x; targets <= {OUR_TARGET_MS} ms/cell and >= {RATIO_TARGET:.0f}x: "
        + ("ok" if ok else "MISSED")
    )
    print(
        f"  the authors' code on all {full_cells:,} cells at its per-cell time: "
        f"~{theirs_ms * full_cells / 3.6e6:.1f} h wall"
    )
    print(f"  sampling the predictions (not counted): {sampling:.1f} s")
    print(f"  values: AMD {values['amd']:.4f}, AMV {values['amv']:.4f}")
    return {
        "side_by_side": {
            "scenes": len(chosen),
            "cells": cells,
            "rounds": rounds,
            "peer": peer.source,
            "meanwise_ms_per_cell": ours_ms,
            "meanwise_cpu_ms_per_cell": ours_cpu_ms,
            "authors_ms_per_cell": theirs_ms,
            "authors_cpu_ms_per_cell": theirs_cpu_ms,
            "speedup": ratio,
            "speedup_cpu": cpu_ratio,
            "max_rel_amd_difference": amd_rel,
            "max_rel_amv_difference": amv_rel,
        },
        "test_set": {
            "scenes": len(used),
            "cells": used_cells,
            "full_cells": full_cells,
            "metric_seconds": metric,
            "metric_cpu_seconds": metric_cpu,
            "ms_per_cell": metric / used_cells * 1e3,
            "cpu_ms_per_cell": dataset_cpu_ms,
            "speedup_cpu_vs_authors_per_cell": dataset_ratio,
            "metric_seconds_full_extrapolated": metric * scale,
            "sampling_seconds": sampling,
            "values": values,
        },
        "targets": {"ms_per_cell": OUR_TARGET_MS, "speedup": RATIO_TARGET},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of UNIV, fewer rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--data-dir", default=None, metavar="DIR")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--authors-code",
        default=None,
        metavar="PATH",
        help="the authors' amd_amv_kde_metrics.py to run as the AMD/AMV peer (default: the "
        "transcription in this file)",
    )
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
        "machine": machine_info(threads=args.threads),
        "quick": args.quick,
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.only in (None, "inference"):
        results["inference"] = bench_inference(checkpoints, root, rounds=5 if args.quick else 15)
    if args.only in (None, "amd_amv"):
        results["amd_amv"] = bench_amd_amv(
            checkpoints,
            root,
            args.quick,
            peer_cells=96 if args.quick else 480,
            rounds=2 if args.quick else 3,
            authors_code=args.authors_code,
        )
    if args.only is None:
        results["train"] = bench_train(root, args.quick)
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
