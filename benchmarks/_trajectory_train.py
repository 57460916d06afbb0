"""Social-Implicit training speed: batched SGD steps against the per-scene paths (issue 11).

Scenes per second of IMLE training (forward, the four loss terms, backward; the augmentation
and noise draws are made beforehand and shared, so every candidate computes the same steps),
on steps of 128 scenes drawn from ZARA1's training set (the synthetic crowd, labelled, when no
ETH/UCY folder is found). Candidates, same process, interleaved rounds, medians:

- batched (meanwise, float64 and float32): one packed forward and backward per step
  (`accumulate_gradients`, `TrainConfig.batched=True`);
- per scene (meanwise, float64): the same code one scene per forward (`batched=False`);
- per scene, the authors' loss (float64): one forward per scene and the loss as the released
  train.py writes it (torch.sort, nn.L1Loss means, torch.cdist, acos of the clamped cosine),
  backward per scene: what training cost before batching.

Target: batched float64 >= 10x the authors'-loss per-scene path (wall and CPU time; on a busy
machine the CPU-time ratio is the steadier one).

    python benchmarks/trajectory.py --only train [--quick] [--json PATH] [--data-dir DIR]
"""

from __future__ import annotations

import dataclasses

import torch

from _timing import machine_info, time_interleaved  # benchmarks/_timing.py, the shared timing loop
from meanwise.trajectory.data import load_split
from meanwise.trajectory.synthetic import synthetic_scenes
from meanwise.trajectory.train import (
    TrainConfig,
    accumulate_gradients,
    draw_step,
    full_trajectory,
    split_trajectory,
)

TRAIN_TARGET_RATIO = 10.0
_EPS = 1e-8


def authors_loss(pred, target, w_norm, w_cos, w_trip):
    """The released train.py's `implicit_likelihood_estimation_fast_with_trip_geo`."""

    def cdist_cosine_sim(a, b):
        a_norm = a / torch.clamp(a.norm(dim=1)[:, None], min=_EPS)
        b_norm = b / torch.clamp(b.norm(dim=1)[:, None], min=_EPS)
        return torch.acos(torch.clamp(a_norm @ b_norm.T, min=-1.0 + _EPS, max=1.0 - _EPS))

    indices = torch.sort((pred - target).abs().sum(dim=(1, 2, 3))).indices
    best = pred[indices[0]]
    error = (best - target).abs().mean()
    trip = (best - pred[indices[1]]).abs().mean() - (best - pred[indices[-1]]).abs().mean()
    a, b = best.reshape(-1, 2), target.reshape(-1, 2)
    norm = (torch.cdist(a[None], a[None]) - torch.cdist(b[None], b[None])).abs().mean()
    cos = (cdist_cosine_sim(a, a) - cdist_cosine_sim(b, b)).abs().mean()
    return error + w_norm * norm + w_trip * trip + w_cos * cos


def _authors_step(model, trajectories, noise, config, divisor):
    for traj, draw in zip(trajectories, noise, strict=True):
        observed, target = split_trajectory(traj)
        pred = model(observed, noise.shape[1], noise=draw)
        loss = authors_loss(
            pred, target, config.distance_weight, config.angle_weight, config.triplet_weight
        )
        (loss / divisor).backward()


def _trained_looking_model(config: TrainConfig):
    """Non-zero weights (a fresh model predicts zeros for every sample, an atypical step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = config.build_model()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def bench_train(data_dir, quick: bool) -> dict:
    """Scenes per second of training steps; see the module docstring."""
    try:
        scenes = load_split("zara1", "train", data_dir)
        data = f"ZARA1 training set ({len(scenes)} scenes)"
    except ValueError:
        scenes = synthetic_scenes(600.0, seed=0)["train"]
        data = f"the synthetic crowd ({len(scenes)} scenes; no ETH/UCY folder found)"
    pool = [full_trajectory(s) for s in scenes]
    steps_per_round = 1 if quick else 3
    rounds = 2 if quick else 3
    base = TrainConfig.for_split("zara1")
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(steps_per_round):
        picks = torch.randperm(len(pool), generator=generator)[: base.accumulate].tolist()
        trajectories, noise, _ = draw_step(pool, picks, base, generator)
        steps.append((trajectories, noise))
    scenes_per_round = steps_per_round * base.accumulate
    pedestrians = sum(t.shape[1] for trajectories, _ in steps for t in trajectories)

    def ours(config):
        model = _trained_looking_model(config)

        def turn():
            for trajectories, noise in steps:
                model.zero_grad(set_to_none=True)
                accumulate_gradients(model, trajectories, noise, config, len(trajectories))

        return turn

    def authors():
        model = _trained_looking_model(base)

        def turn():
            for trajectories, noise in steps:
                model.zero_grad(set_to_none=True)
                _authors_step(model, trajectories, noise, base, len(trajectories))

        return turn

    names = {
        "batched (meanwise, float64)": ours(base),
        "batched (meanwise, float32)": ours(dataclasses.replace(base, dtype="float32")),
        "per scene (meanwise, float64)": ours(dataclasses.replace(base, batched=False)),
        "per scene, the authors' loss (float64)": authors(),
    }
    timings = time_interleaved(names, rounds)
    peer = "per scene, the authors' loss (float64)"
    peer_rate = scenes_per_round / timings.wall[peer]
    peer_cpu_rate = scenes_per_round / timings.cpu[peer]
    print(
        f"\ntraining, K = 20, steps of {base.accumulate} scenes with the seven augmentations, "
        f"{data}; {steps_per_round} step(s) ({pedestrians:,} pedestrians with merges) per "
        f"round, {rounds} rounds, 1 thread"
    )
    print(
        f"  {'candidate':44s} {'scenes/s':>9s} {'(CPU time)':>11s} {'vs peer':>8s} "
        f"{'(CPU)':>7s}  target"
    )
    rows = []
    for name in names:
        rate = scenes_per_round / timings.wall[name]
        cpu_rate = scenes_per_round / timings.cpu[name]
        ratio, cpu_ratio = rate / peer_rate, cpu_rate / peer_cpu_rate
        mark = ""
        if name == "batched (meanwise, float64)":
            ok = min(ratio, cpu_ratio) >= TRAIN_TARGET_RATIO
            mark = f">= {TRAIN_TARGET_RATIO:.0f}x " + ("ok" if ok else "MISSED")
        print(f"  {name:44s} {rate:9.1f} {cpu_rate:11.1f} {ratio:7.2f}x {cpu_ratio:6.2f}x  {mark}")
        rows.append(
            {
                "candidate": name,
                "scenes_per_second": rate,
                "scenes_per_cpu_second": cpu_rate,
                "ratio_to_peer": ratio,
                "cpu_ratio_to_peer": cpu_ratio,
            }
        )
    return {"data": data, "pedestrians_per_round": pedestrians, "rows": rows}


def train_main(args) -> int:
    """`benchmarks/trajectory.py --only train`: runs without the released weights (and with the
    synthetic crowd when no ETH/UCY folder is found)."""

    from meanwise.atomic_io import atomic_write_json
    from meanwise.trajectory.data import resolve_data_dir

    torch.set_num_threads(args.threads)
    root = resolve_data_dir(args.data_dir)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    results = {
        "machine": machine_info(threads=args.threads),
        "quick": args.quick,
        "train": bench_train(root, args.quick),
    }
    if args.json:
        atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0
