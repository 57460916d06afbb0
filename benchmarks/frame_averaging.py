"""Frame averaging speed: FA with |F| frame elements beside the bare backbone and the peers.

Every candidate takes one turn per round (interleaved, so drifts of this noisy machine hit all
of them alike); the table reports medians and ratios to the bare backbone on the same batch.

1. ``point cloud``: a PointNet-style backbone (per-point MLP, max-pooled context, per-point
   vector output) on B clouds of N points:
   - bare backbone;
   - FrameAveraging E(3) (|F| = 8) and SE(3) (|F| = 4) with the default
     ``chunk_size="auto"`` (backbone calls of about 16k points), E(3) as one backbone call over
     all 8·B canonical clouds, and E(3) with ``chunk_size=B``;
   - the same E(3) average as a Python loop over the 8 frame elements;
   - the authors' reference style (float32 covariance, eigh, einsum over the 8 sign ops,
     loop-free, no degeneracy check);
   - stochastic mode (|F| = 1);
   - frame construction alone (`pca_frames`), as a share of the FA forward;
   - the restore step through `weighted_average` and as one fused einsum.
2. ``n-body``: FA-GNN (reframed inside each of its 4 layers) against the plain GNN, one
   forward and one training step on a batch of 100 systems.

Targets from the issue: FA forward <= 1.1 x |F| x bare; frame construction <= 5% of it.

    python benchmarks/frame_averaging.py [--quick] [--json PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
from torch import nn

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.atomic_io import atomic_write_json
from meanwise.symmetry import FrameAveraging, pca_frames
from meanwise.symmetry.models import FAGNN, GNN


class PointNetBackbone(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.local = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.local(x)
        pooled = h.max(1, keepdim=True).values.expand_as(h)
        return self.head(torch.cat([h, pooled], -1))


def python_loop_fa(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FA as a loop: one backbone call per frame element, then the average."""
    frames = pca_frames(x, "E3", on_degenerate="ignore")
    canonical = frames.canonicalize(x)
    total = torch.zeros_like(x)
    for f in range(frames.size):
        total += backbone(canonical[f]) @ frames.rotations[f].transpose(-1, -2)
    return total / frames.size + frames.centroid.unsqueeze(1)


_SIGN_OPS = torch.tensor(
    [[1, 1, 1], [1, 1, -1], [1, -1, 1], [1, -1, -1], [-1, 1, 1], [-1, 1, -1], [-1, -1, 1],
     [-1, -1, -1]], dtype=torch.float32,
)  # fmt: skip


def authors_style_fa(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference code's recipe: float32 covariance and eigh, 8 sign ops, einsum."""
    center = x.mean(1, keepdim=True)
    centred = x - center
    _, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
    ops = _SIGN_OPS.unsqueeze(1) * vectors.unsqueeze(1)  # [B, 8, 3, 3]
    framed = torch.einsum("boji,bpj->obpi", ops, centred)  # [8, B, N, 3]
    out = backbone(framed.reshape(-1, *x.shape[1:])).reshape(8, *x.shape)
    return torch.einsum("boij,obpj->bpi", ops, out) / 8 + center


def bench_point_cloud(batch: int, points: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    backbone = PointNetBackbone()
    x = torch.randn(batch, points, 3) * torch.tensor([1.0, 1.5, 2.0]) + 1.0
    fa = FrameAveraging(backbone, "E3", "position", on_degenerate="ignore").eval()
    one_call = FrameAveraging(
        backbone, "E3", "position", on_degenerate="ignore", chunk_size=None
    ).eval()
    fa_se3 = FrameAveraging(backbone, "SE3", "position", on_degenerate="ignore").eval()
    chunked = FrameAveraging(
        backbone, "E3", "position", on_degenerate="ignore", chunk_size=batch
    ).eval()
    stochastic = FrameAveraging(
        backbone, "E3", "position", stochastic="always", on_degenerate="ignore"
    )
    frames = pca_frames(x, "E3", on_degenerate="ignore")
    outputs = backbone(frames.canonicalize(x).reshape(-1, points, 3)).reshape(8, batch, points, 3)

    def restore_fused():
        rotated = torch.einsum("fbpj,fbij->bpi", outputs, frames.rotations) / frames.size
        return rotated + frames.centroid.unsqueeze(1)

    # the two restores agree; the table shows whether the shared kernel costs speed
    torch.testing.assert_close(restore_fused(), frames.restore(outputs, translate=True))
    torch.testing.assert_close(python_loop_fa(backbone, x), fa(x), rtol=1e-4, atol=1e-5)
    turns = {
        "bare backbone": lambda: backbone(x),
        "FA E(3), |F|=8 (meanwise)": lambda: fa(x),
        "FA E(3), one backbone call": lambda: one_call(x),
        "FA SE(3), |F|=4 (meanwise)": lambda: fa_se3(x),
        "FA E(3), chunk_size=B (meanwise)": lambda: chunked(x),
        "FA E(3), Python loop over 8 elements": lambda: python_loop_fa(backbone, x),
        "FA E(3), authors' style (no checks)": lambda: authors_style_fa(backbone, x),
        "FA stochastic, |F|=1 (meanwise)": lambda: stochastic(x),
        "frame construction (pca_frames)": lambda: pca_frames(x, "E3", on_degenerate="ignore"),
        "restore via weighted_average": lambda: frames.restore(outputs, translate=True),
        "restore as one fused einsum": restore_fused,
    }
    with torch.no_grad():
        return time_interleaved(turns, rounds, warmup=2).wall


def bench_nbody(rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, v = torch.randn(100, 5, 3), 0.5 * torch.randn(100, 5, 3)
    q = torch.where(torch.rand(100, 5) < 0.5, 1.0, -1.0)
    models = {"FA-GNN": FAGNN(on_degenerate="ignore"), "GNN": GNN()}
    turns: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def forward(model=model):
            with torch.no_grad():
                return model(x, v, q)

        def step(model=model, optimizer=optimizer):
            loss = (model(x, v, q) - x).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        turns[f"{name} forward"] = forward
        turns[f"{name} training step"] = step
    return time_interleaved(turns, rounds, warmup=2).wall


def table(title: str, medians: dict[str, float], baseline: str, notes: dict[str, str]):
    base = medians[baseline]
    rows = []
    print(f"\n{title}")
    print(f"  {'candidate':40s} {'median':>10s} {'vs ' + baseline:>18s}  note")
    for name, seconds in medians.items():
        ratio = seconds / base
        note = notes.get(name, "")
        print(f"  {name:40s} {seconds * 1e3:8.2f}ms {ratio:17.2f}x  {note}")
        rows.append({"candidate": name, "median_ms": seconds * 1e3, "ratio": ratio,
                     "note": note})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 10 if args.quick else 40
    results: dict[str, object] = {
        "machine": machine_info(threads=args.threads),
        "quick": args.quick,
    }
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} interleaved rounds")
    summary = {}
    for batch, points in ((32, 256), (8, 2048)):
        medians = bench_point_cloud(batch, points, rounds)
        fa = medians["FA E(3), |F|=8 (meanwise)"]
        bare = medians["bare backbone"]
        notes = {
            "FA E(3), |F|=8 (meanwise)": f"target <= {1.1 * 8:.1f}x: "
            + ("ok" if fa <= 1.1 * 8 * bare else "MISSED"),
            "FA SE(3), |F|=4 (meanwise)": "target <= 4.4x: "
            + ("ok" if medians["FA SE(3), |F|=4 (meanwise)"] <= 4.4 * bare else "MISSED"),
        }
        share = medians["frame construction (pca_frames)"] / fa
        notes["frame construction (pca_frames)"] = (
            f"{100 * share:.1f}% of the FA forward (target <= 5%): "
            + ("ok" if share <= 0.05 else "MISSED")
        )
        label = f"point cloud, B={batch} clouds x N={points} points, PointNet-style backbone"
        results[label] = table(label, medians, "bare backbone", notes)
        summary[label] = {
            "fa_over_bare_per_element": fa / bare / 8,
            "one_call_over_bare_per_element": medians["FA E(3), one backbone call"] / bare / 8,
            "frame_share": medians["frame construction (pca_frames)"] / fa,
            "loop_over_batched": medians["FA E(3), Python loop over 8 elements"] / fa,
            "chunked_over_bare_per_element": medians["FA E(3), chunk_size=B (meanwise)"] / bare / 8,
            "weighted_average_over_fused_restore": medians["restore via weighted_average"]
            / medians["restore as one fused einsum"],
        }
    medians = bench_nbody(max(3, rounds // 2))
    results["n-body, batch 100"] = table(
        "n-body, batch of 100 systems (5 particles)", medians, "GNN forward", {}
    )
    results["summary"] = summary
    print("\nsummary:", json.dumps(summary, indent=2))
    if args.json:
        atomic_write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
