"""Best-of-K displacement errors, and the distribution metrics AMD/AMV and KDE-NLL.

All functions take one scene: predictions `[K, T, N, 2]` (K samples, T steps, N pedestrians,
absolute world coordinates) and the ground truth `[T, N, 2]`.

Best-of-K ADE/FDE only asks whether *one* of K samples lands near the truth, so a predictor can
improve it by spraying samples; the paper's AMD/AMV (`gmm_metrics.py`) and KDE-NLL
(`kde_nll`, below) judge the whole predicted distribution instead.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from meanwise.average import weighted_average
from meanwise.trajectory.gmm import (
    DEFAULT_CHUNK_CELLS,
    GaussianMixtures,
    select_gaussian_mixtures,
)

__all__ = [
    "ade_fde",
    "amd_amv",
    "kde_nll",
    "DistributionMetrics",
    "check_prediction",
    "mahalanobis_cells",
    "kde_log_density_cells",
]

KDE_LOG_FLOOR = -20.0


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


# --- AMD / AMV ---------------------------------------------------------------------------------


def _on_host(x: Tensor) -> Tensor:
    """The distribution metrics run on the CPU whatever device the predictions are on: a cell's
    mixture fit is a few 2x2 matrices per EM step with per-cell convergence decisions, which a
    GPU would spend in launches and host syncs. Copied once here (and detached) so a CUDA
    prediction works as is; the results are CPU float64."""
    return x.detach().cpu()


def _cells(pred: Tensor) -> Tensor:
    """[K, T, N, 2] -> [T*N, K, 2] float64, cells ordered (t, n) as the paper loops them."""
    k, t, n, _ = pred.shape
    return pred.to(torch.float64).permute(1, 2, 0, 3).reshape(t * n, k, 2)


def _inverse2(cov: Tensor) -> Tensor:
    """Closed-form inverse of [..., 2, 2] (the covariances carry reg_covar, so pinv = inv)."""
    a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    det = a * c - b * b
    return (
        torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]
    )


def mahalanobis_cells(fit: GaussianMixtures, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Per cell, the paper's distance from the ground truth [C, 2] to the fitted mixture, and
    the mixture's total covariance [C, 2, 2].

    With centre c = sum w_k mu_k, v = c - y, u = mu_k - y, P_k = Sigma_k^-1:
    b2 = 1/(v'P v), a = b2 v'P u, Z = u'P u - b2 (v'P u)^2,
    p_k = sqrt(pi b2 / 2) exp(-Z/2) [erf((1 - a)/sqrt(2 b2)) - erf(-a/sqrt(2 b2))]
    (component k's density integrated along the segment from y to c), G = sum w p P / sum w p,
    distance sqrt(v'G v), and 0 where that is undefined (v = 0, or every p_k underflows), as
    the paper's code returns.
    """
    w, mu, cov = fit.weights, fit.means, fit.covariances
    precision = _inverse2(cov)  # [C, M, 2, 2]
    center = (w.unsqueeze(-1) * mu).sum(1)  # [C, 2]
    v = center - gt
    u = mu - gt.unsqueeze(1)  # [C, M, 2]
    pv = (precision @ v[:, None, :, None]).squeeze(-1)  # [C, M, 2]
    vpv = (pv * v.unsqueeze(1)).sum(-1)
    vpu = (pv * u).sum(-1)
    upu = (u * (precision @ u.unsqueeze(-1)).squeeze(-1)).sum(-1)
    b2 = 1.0 / vpv
    a = b2 * vpu
    z = upu - b2 * vpu**2
    scale = torch.sqrt(2.0 * b2)
    p = (
        torch.sqrt(math.pi * b2 / 2.0)
        * torch.exp(-z / 2.0)
        * (torch.special.erf((1.0 - a) / scale) - torch.special.erf(-a / scale))
    )
    wp = w * p  # padded components have w = 0 (and identity covariance, so p is finite)
    g = (wp[..., None, None] * precision).sum(1) / wp.sum(1)[:, None, None]
    dist = torch.sqrt((v.unsqueeze(1) @ g @ v.unsqueeze(-1)).reshape(-1))
    dist = torch.nan_to_num(dist, nan=0.0)
    spread = mu - center.unsqueeze(1)
    total = (w[..., None, None] * (cov + spread.unsqueeze(-1) * spread.unsqueeze(-2))).sum(1)
    return dist, total


def _largest_abs_eigenvalue(sym: Tensor) -> Tensor:
    """Largest |eigenvalue| of symmetric [..., 2, 2], in closed form."""
    a, b, c = sym[..., 0, 0], sym[..., 0, 1], sym[..., 1, 1]
    half_trace, radius = (a + c) / 2, torch.sqrt(((a - c) / 2) ** 2 + b * b)
    return torch.maximum((half_trace + radius).abs(), (half_trace - radius).abs())


def amd_amv(
    pred: Tensor,
    gt: Tensor,
    *,
    max_components: int = 4,
    generator: torch.Generator | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    em_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """AMD and AMV of one scene (Mohamed et al., ECCV 2022), float64 results.

    Per cell (t, n) a Gaussian mixture is fitted to the K samples (BIC-selected, see
    `meanwise.trajectory.gmm`: float32 EM rejects component counts, every chosen mixture is a
    float64 fit; `em_dtype=torch.float64` for float64 throughout); AMD is the mean over cells
    of the distance in `mahalanobis_cells`, AMV the largest |eigenvalue| of the mean over
    cells of each mixture's total covariance. Dataset values average the per-scene values
    (`DistributionMetrics`).
    """
    check_prediction(pred, gt)
    pred, gt = _on_host(pred), _on_host(gt)
    fit = select_gaussian_mixtures(
        _cells(pred),
        max_components,
        generator=generator,
        chunk_cells=chunk_cells,
        em_dtype=em_dtype,
    )
    dist, total = mahalanobis_cells(fit, gt.to(torch.float64).reshape(-1, 2))
    return dist.mean(), _largest_abs_eigenvalue(total.mean(0))


# --- KDE-NLL -----------------------------------------------------------------------------------


def _more_than_two_distinct(x: Tensor) -> Tensor:
    """[C, K, 2] -> [C] whether a cell holds more than two distinct points."""
    other = (x != x[:, :1]).any(-1)  # [C, K]: differs from the first sample
    second = x[torch.arange(x.shape[0]), other.to(torch.uint8).argmax(-1)]
    return (other & (x != second.unsqueeze(1)).any(-1)).any(-1)


def kde_log_density_cells(samples: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Per cell, the log-density at gt [C, 2] of a Gaussian KDE of the samples [C, K, 2] with
    Scott's bandwidth (scipy.stats.gaussian_kde: the unbiased sample covariance times
    K^(-1/3) in 2-D), and whether the cell counts: more than two distinct samples and a
    non-singular covariance (scipy raises on a singular one)."""
    x = samples.to(torch.float64)
    n = x.shape[1]
    usable = _more_than_two_distinct(x)
    centred = x - x.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1) * n ** (-1.0 / 3.0)
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
    usable &= det > 0
    safe_cov = torch.where(usable[:, None, None], cov, torch.eye(2, dtype=x.dtype))
    precision = _inverse2(safe_cov)
    diff = gt.to(torch.float64).unsqueeze(1) - x  # [C, K, 2]
    quad = (diff * (diff @ precision)).sum(-1)
    log_det = torch.log(safe_cov[:, 0, 0] * safe_cov[:, 1, 1] - safe_cov[:, 0, 1] ** 2)
    log_density = (
        torch.logsumexp(-0.5 * quad, dim=1) - math.log(n) - math.log(2 * math.pi) - 0.5 * log_det
    )
    return log_density, usable


def kde_nll(pred: Tensor, gt: Tensor) -> Tensor:
    """KDE-NLL of one scene: per cell the KDE log-density of the ground truth, clipped below at
    -20; cells with at most two distinct samples (or a singular covariance) are skipped but
    counted; minus the sum over cells divided by the number of cells (0 if all are skipped, as
    the paper's code returns)."""
    check_prediction(pred, gt)
    pred, gt = _on_host(pred), _on_host(gt)
    log_density, usable = kde_log_density_cells(_cells(pred), gt.reshape(-1, 2))
    clipped = torch.where(usable, log_density.clamp(min=KDE_LOG_FLOOR), 0.0)
    return -clipped.sum() / clipped.numel()


# --- streaming over a dataset ------------------------------------------------------------------


class DistributionMetrics:
    """AMD, AMV and KDE-NLL over many scenes, with the mixture fits batched across scenes.

    `update(pred, gt)` queues a scene's cells; full chunks of `chunk_cells` are fitted as they
    fill (scenes may straddle chunks: per-scene sums are kept), `compute()` fits the rest and
    returns the dataset values: the plain mean over scenes of the per-scene values, as the
    paper reports them. Deterministic for a seed and the same sequence of updates.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        max_components: int = 4,
        chunk_cells: int = DEFAULT_CHUNK_CELLS,
        kde: bool = True,
        em_dtype: torch.dtype = torch.float32,
    ) -> None:
        if chunk_cells < 1:
            raise ValueError(f"chunk_cells must be >= 1; got {chunk_cells}")
        self.generator = torch.Generator().manual_seed(seed)
        self.max_components, self.chunk_cells, self.kde = max_components, chunk_cells, kde
        self.em_dtype = em_dtype
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # (cells, gt, scene ids)
        self._pending_count = 0
        self._dist: list[float] = []
        self._cov: list[Tensor] = []
        self._kde: list[float] = []
        self._cells: list[int] = []

    @property
    def num_scenes(self) -> int:
        return len(self._cells)

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add one scene: pred [K, T, N, 2], gt [T, N, 2]."""
        check_prediction(pred, gt)
        pred, gt = _on_host(pred), _on_host(gt)
        cells = _cells(pred)
        scene = len(self._cells)
        self._cells.append(cells.shape[0])
        self._dist.append(0.0)
        self._cov.append(torch.zeros(2, 2, dtype=torch.float64))
        self._kde.append(0.0)
        ids = torch.full((cells.shape[0],), scene, dtype=torch.long)
        self._pending.append((cells, gt.to(torch.float64).reshape(-1, 2), ids))
        self._pending_count += cells.shape[0]
        if self._pending_count >= self.chunk_cells:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        cells = torch.cat([p[0] for p in self._pending])
        gt = torch.cat([p[1] for p in self._pending])
        ids = torch.cat([p[2] for p in self._pending])
        usable = cells.shape[0] if final else cells.shape[0] // self.chunk_cells * self.chunk_cells
        self._pending = (
            [(cells[usable:], gt[usable:], ids[usable:])] if usable < cells.shape[0] else []
        )
        self._pending_count = cells.shape[0] - usable
        if usable == 0:
            return
        cells, gt, ids = cells[:usable], gt[:usable], ids[:usable]
        fit = select_gaussian_mixtures(
            cells,
            self.max_components,
            generator=self.generator,
            chunk_cells=self.chunk_cells,
            em_dtype=self.em_dtype,
        )
        dist, total = mahalanobis_cells(fit, gt)
        first = int(ids[0])
        scenes = int(ids[-1]) - first + 1
        local = ids - first
        dist_sum = torch.zeros(scenes, dtype=torch.float64).index_add_(0, local, dist)
        cov_sum = torch.zeros(scenes, 2, 2, dtype=torch.float64).index_add_(0, local, total)
        if self.kde:
            log_density, ok = kde_log_density_cells(cells, gt)
            clipped = torch.where(ok, log_density.clamp(min=KDE_LOG_FLOOR), 0.0)
            kde_sum = torch.zeros(scenes, dtype=torch.float64).index_add_(0, local, clipped)
        for j in range(scenes):
            self._dist[first + j] += float(dist_sum[j])
            self._cov[first + j] = self._cov[first + j] + cov_sum[j]  # inference-mode safe
            if self.kde:
                self._kde[first + j] += float(kde_sum[j])

    def per_scene(self) -> dict[str, Tensor]:
        """Per-scene AMD, AMV and KDE-NLL (after fitting everything queued)."""
        self._flush(final=True)
        counts = torch.tensor(self._cells, dtype=torch.float64)
        amd = torch.tensor(self._dist, dtype=torch.float64) / counts
        mean_cov = torch.stack(self._cov) / counts[:, None, None]
        out = {"amd": amd, "amv": _largest_abs_eigenvalue(mean_cov)}
        if self.kde:
            out["kde_nll"] = -torch.tensor(self._kde, dtype=torch.float64) / counts
        return out

    def compute(self) -> dict[str, float]:
        """Dataset values: the mean over scenes of the per-scene values."""
        if not self._cells:
            raise ValueError("DistributionMetrics.compute() needs at least one update()")
        return {name: float(weighted_average(values)) for name, values in self.per_scene().items()}
