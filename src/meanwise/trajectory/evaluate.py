"""Evaluate a sampler on a list of scenes: best-of-K ADE/FDE and, optionally, AMD/AMV/KDE-NLL.

The protocol of the paper's tables: one forward per scene with K samples, per-pedestrian
best-of-K ADE/FDE averaged over all pedestrians of the split; the distribution metrics average
per-scene values over scenes (`DistributionMetrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from meanwise.average import weighted_average
from meanwise.trajectory.data import Scene
from meanwise.trajectory.metrics import DistributionMetrics, ade_fde

__all__ = ["evaluate_scenes"]

# (observed positions [8, N, 2], K, generator) -> sampled futures [K, 12, N, 2]
Sampler = Callable[[Tensor, int, torch.Generator], Tensor]


def evaluate_scenes(
    sample: Sampler,
    scenes: Sequence[Scene],
    *,
    samples: int = 20,
    seed: int = 0,
    distribution_metrics: bool = False,
    distribution_samples: int | None = None,
    shift: Sequence[float] = (0.0, 0.0),
) -> dict[str, Any]:
    """Metrics of `sample` on `scenes`.

    Args:
        sample: the sampler, e.g. `model.predict` of a `SocialImplicit`.
        samples: K for best-of-K ADE/FDE.
        seed: seeds the sampler's generator (and the mixture fits' initialisation).
        distribution_metrics: also compute AMD, AMV and KDE-NLL.
        distribution_samples: K for those (default: `samples`); drawn in a separate pass.
            Only with `distribution_metrics` (a ValueError otherwise, not a silent no-op).
        shift: a constant offset (metres) added to every predicted position — the paper's
            robustness probe: a shifted distribution barely moves best-of-K errors but
            AMD/AMV react.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1; got {samples}")
    if distribution_samples is not None and not distribution_metrics:
        raise ValueError(
            "distribution_samples needs distribution_metrics=True (it sets K for "
            "AMD/AMV/KDE-NLL, which are computed only then)"
        )
    if not scenes:
        raise ValueError("scenes is empty")
    if len(shift) != 2:
        raise ValueError(f"shift must be (dx, dy); got {shift}")
    offset = torch.tensor([float(shift[0]), float(shift[1])], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    ades, fdes, counts = [], [], []
    with torch.no_grad():
        for scene in scenes:
            pred = sample(scene.observed, samples, generator).to(torch.float64) + offset
            ade, fde = ade_fde(pred, scene.future)
            ades.append(ade)
            fdes.append(fde)
            counts.append(scene.num_pedestrians)
    weights = torch.tensor(counts, dtype=torch.float64)
    result: dict[str, Any] = {
        # per-pedestrian mean over the split = per-scene means weighted by pedestrians
        "ade": float(weighted_average(torch.stack(ades), weights)),
        "fde": float(weighted_average(torch.stack(fdes), weights)),
        "samples": samples,
        "seed": seed,
        "scenes": len(scenes),
        "pedestrians": int(sum(counts)),
    }
    if distribution_metrics:
        k = distribution_samples or samples
        if k < 3:
            raise ValueError(f"distribution metrics need at least 3 samples; got {k}")
        metrics = DistributionMetrics(seed=seed)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for scene in scenes:
                pred = sample(scene.observed, k, generator).to(torch.float64) + offset
                metrics.update(pred, scene.future)
        result.update(metrics.compute())
        result["distribution_samples"] = k
    return result
