"""Best-of-K displacement errors, and the distribution metrics AMD/AMV and KDE-NLL.

All functions take one scene: predictions `[K, T, N, 2]` (K samples, T steps, N pedestrians,
absolute world coordinates) and the ground truth `[T, N, 2]`.

Best-of-K ADE/FDE only asks whether *one* of K samples lands near the truth, so a predictor can
improve it by spraying samples; the paper's AMD/AMV (`gmm_metrics.py`) and KDE-NLL
(`kde_nll`, below) judge the whole predicted distribution instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["ade_fde", "check_prediction"]


def check_prediction(pred: Tensor, gt: Tensor) -> None:
    """Raise a ValueError naming `pred`/`gt` unless they are [K, T, N, 2] / [T, N, 2], finite."""
    if not isinstance(pred, Tensor) or not isinstance(gt, Tensor):
        raise TypeError(
            f"pred and gt must be tensors; got {type(pred).__name__}, {type(gt).__name__}"
        )
    if pred.dim() != 4 or pred.shape[-1] != 2:
        raise ValueError(f"pred must be [K, T, N, 2]; got shape {tuple(pred.shape)}")
    if gt.dim() != 3 or gt.shape[-1] != 2:
        raise ValueError(f"gt must be [T, N, 2]; got shape {tuple(gt.shape)}")
    if pred.shape[1:] != gt.shape:
        raise ValueError(
            f"pred [K, T, N, 2] = {tuple(pred.shape)} does not match gt [T, N, 2] = "
            f"{tuple(gt.shape)}"
        )
    if min(pred.shape[:3]) == 0:
        raise ValueError(f"pred must have K, T, N >= 1; got shape {tuple(pred.shape)}")
    if not (torch.isfinite(pred).all() and torch.isfinite(gt).all()):
        raise ValueError("pred and gt must be finite")


def ade_fde(
    pred: Tensor,
    gt: Tensor,
    reduce: Literal["pedestrian", "scene", "none"] = "pedestrian",
) -> tuple[Tensor, Tensor]:
    """Best-of-K average and final displacement errors of one scene.

    - "pedestrian" (the Social-STGCNN / Social-Implicit tables): per pedestrian the minimum
      over samples, ADE and FDE minimised independently, then the mean over pedestrians.
    - "scene" (Social-GAN's): the minimum over samples of the error summed over the scene's
      pedestrians, divided by the number of pedestrians.
    - "none": the per-pedestrian minima [N] of the "pedestrian" reduction.

    For both reductions the dataset value is the mean of the per-scene values weighted by each
    scene's number of pedestrians (`meanwise.average.weighted_average(values, n_peds)`).
    """
    check_prediction(pred, gt)
    err = torch.linalg.vector_norm(pred - gt, dim=-1)  # [K, T, N]
    ade_k, fde_k = err.mean(dim=1), err[:, -1]  # [K, N]
    if reduce == "scene":
        n = err.shape[-1]
        return ade_k.sum(-1).amin() / n, fde_k.sum(-1).amin() / n
    ade, fde = ade_k.amin(dim=0), fde_k.amin(dim=0)
    if reduce == "none":
        return ade, fde
    if reduce == "pedestrian":
        return ade.mean(), fde.mean()
    raise ValueError(f"reduce must be 'pedestrian', 'scene' or 'none'; got {reduce!r}")
