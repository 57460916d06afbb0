"""Batched 2-D Gaussian-mixture fits by EM, one independent mixture per cell, in torch.

AMD/AMV fit a mixture to the K predicted samples of every (time step, pedestrian) cell and pick
the number of components by BIC. The paper's code runs one scikit-learn fit per cell (about
30 ms each, hours for a dataset); here all cells of a chunk run together and reproduce
scikit-learn's `GaussianMixture` defaults: full covariances, `reg_covar` added to the diagonal,
k-means initialisation (k-means++ seeding with 2 + ln k local trials, then Lloyd), tolerance on
the change of the mean log-likelihood, at most `max_iter` EM steps.

Speed. The log-density of a 2-D Gaussian plus its log-weight is linear in the features
phi(x) = [x^2, xy, y^2, x, y, 1], so the E-step is one batched matmul phi @ theta, and the
M-step's sufficient statistics (sum r, sum r x, sum r xx^T) are one more, resp^T @ phi. Each
cell's data are centred first, which keeps E[xx^T] - mu mu^T accurate in float64 (the
regularisation 1e-6 is far above the remaining rounding). k = 1 has a closed form. Cells whose
fit converged leave the batch (the batch is compacted when a third of it is done), and in the
BIC search cells whose BIC stopped improving leave too, so most work goes to the few cells that
need 3 or 4 components.

Everything runs in float64: with float32 the exponentials in AMD underflow and the
E[xx^T] - mu mu^T covariances lose their digits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["GaussianMixtures", "fit_gaussian_mixtures", "select_gaussian_mixtures"]

_EPS = torch.finfo(torch.float64).eps
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class GaussianMixtures:
    """C independent 2-D mixtures, padded to M components (unused ones have weight 0).

    weights [C, M], means [C, M, 2], covariances [C, M, 2, 2] (unused: identity),
    n_components [C], score [C] (mean log-likelihood of the cell's samples), bic [C],
    n_iter [C] (EM steps; 0 for the closed-form k = 1), converged [C].
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor
    n_components: Tensor
    score: Tensor
    bic: Tensor
    n_iter: Tensor
    converged: Tensor


def _features(x: Tensor) -> Tensor:
    """[C, K, 2] -> [C, 6, K]: x^2, xy, y^2, x, y, 1 (feature-major, so that reductions over
    components and features run along contiguous sample rows)."""
    px, py = x[..., 0], x[..., 1]
    return torch.stack([px * px, px * py, py * py, px, py, torch.ones_like(px)], dim=1)


def _m_step(phi: Tensor, resp: Tensor, reg_covar: float) -> Tensor:
    """Mixture parameters from responsibilities [C, k, K], as scikit-learn's M-step.

    Returns packed parameters [C, k, 6]: weight, mean x, mean y, cov xx, cov xy, cov yy.
    """
    stats = torch.bmm(resp, phi.transpose(1, 2))  # [C, k, 6]
    nk = stats[..., 5] + 10 * _EPS
    mx, my = stats[..., 3] / nk, stats[..., 4] / nk
    cxx = stats[..., 0] / nk - mx * mx + reg_covar
    cxy = stats[..., 1] / nk - mx * my
    cyy = stats[..., 2] / nk - my * my + reg_covar
    weights = nk / nk.sum(dim=-1, keepdim=True)
    return torch.stack([weights, mx, my, cxx, cxy, cyy], dim=-1)


def _theta(params: Tensor) -> Tensor:
    """Packed parameters [C, k, 6] -> coefficients [C, k, 6]: theta @ phi = log w + log N."""
    w, mx, my, a, b, c = params.unbind(-1)
    det = a * c - b * b
    p11, p12, p22 = c / det, -b / det, a / det  # the precision, closed-form 2x2 inverse
    pmx, pmy = p11 * mx + p12 * my, p12 * mx + p22 * my
    const = torch.log(w) - _LOG_2PI - 0.5 * torch.log(det) - 0.5 * (mx * pmx + my * pmy)
    return torch.stack([-0.5 * p11, -p12, -0.5 * p22, pmx, pmy, const], dim=-1)


def _e_step(phi: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """(mean log-likelihood [C], responsibilities [C, k, K])."""
    log_joint = torch.bmm(_theta(params), phi)  # [C, k, K]
    peak = log_joint.amax(dim=1, keepdim=True)
    joint = torch.exp_(log_joint.sub_(peak))
    total = joint.sum(dim=1, keepdim=True)
    norm = peak + torch.log(total)  # log-sum-exp over components, [C, 1, K]
    return norm.mean(dim=(1, 2)), joint.div_(total)


def _score(phi: Tensor, params: Tensor) -> Tensor:
    return torch.logsumexp(torch.bmm(_theta(params), phi), dim=1).mean(dim=-1)


def _sq_dist(x_aug: Tensor, x_sq: Tensor, centers: Tensor) -> Tensor:
    """Squared distances [C, k, K] from [x, y, 1] rows [C, 3, K], |x|^2 [C, 1, K], centres
    [C, k, 2], as |c|^2 - 2 c.x + |x|^2 in one matmul (scikit-learn's k-means does the same)."""
    c_aug = torch.cat([-2 * centers, (centers * centers).sum(-1, keepdim=True)], dim=-1)
    return torch.bmm(c_aug, x_aug).add_(x_sq).clamp_(min=0)


def _argmin_components(dist: Tensor) -> Tensor:
    """argmin over dim 1 of [C, k, K] (first on ties), as k - 1 elementwise comparisons:
    torch's argmin over a non-innermost axis is an order of magnitude slower."""
    best, labels = dist[:, 0], torch.zeros(dist.shape[0], dist.shape[2], dtype=torch.long)
    for j in range(1, dist.shape[1]):
        closer = dist[:, j] < best
        best = torch.where(closer, dist[:, j], best)
        labels.masked_fill_(closer, j)
    return labels


def _kmeans_plusplus(
    x_aug: Tensor, x_sq: Tensor, k: int, generator: torch.Generator | None
) -> Tensor:
    """scikit-learn's greedy k-means++ seeding, batched over cells: centres [C, k, 2]."""
    cells, _, n = x_aug.shape
    points = x_aug[:, :2].transpose(1, 2)  # [C, K, 2]
    rows = torch.arange(cells)
    trials = 2 + int(math.log(k))
    first = (torch.rand(cells, generator=generator, dtype=x_aug.dtype) * n).long()
    centers = [points[rows, first.clamp_(max=n - 1)]]
    closest = _sq_dist(x_aug, x_sq, centers[0].unsqueeze(1)).squeeze(1)  # [C, K]
    potential = closest.sum(-1)
    for _ in range(1, k):
        draws = torch.rand(cells, trials, generator=generator, dtype=x_aug.dtype)
        ids = torch.searchsorted(closest.cumsum(-1), draws * potential[:, None])
        candidates = points[rows[:, None], ids.clamp_(max=n - 1)]  # [C, trials, 2]
        dist = torch.minimum(_sq_dist(x_aug, x_sq, candidates), closest.unsqueeze(1))
        pots = dist.sum(-1)  # [C, trials]
        best = pots.argmin(-1)
        potential, closest = pots[rows, best], dist[rows, best]
        centers.append(candidates[rows, best])
    return torch.stack(centers, dim=1)


def _lloyd_step(x_aug: Tensor, x_sq: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """One Lloyd step: (label indicators of components 1..k-1 [C, k-1, K], new centres)."""
    k = centers.shape[1]
    if k == 2:
        # closer to c1 than to c0 exactly when 2 (c1 - c0).x > |c1|^2 - |c0|^2: one matmul
        diff = centers[:, 1] - centers[:, 0]
        bias = (centers[:, 1] ** 2).sum(-1) - (centers[:, 0] ** 2).sum(-1)
        coef = torch.cat([2 * diff, -bias.unsqueeze(-1)], dim=-1).unsqueeze(1)  # [C, 1, 3]
        member = (torch.bmm(coef, x_aug) > 0).to(x_aug.dtype)  # [C, 1, K]
    else:
        labels = _argmin_components(_sq_dist(x_aug, x_sq, centers))
        member = (labels.unsqueeze(1) == torch.arange(1, k).view(1, k - 1, 1)).to(x_aug.dtype)
    sums = torch.bmm(member, x_aug.transpose(1, 2))  # [C, k-1, 3]: sum x, sum y, count
    total = x_aug.sum(-1).unsqueeze(1)  # [C, 1, 3]; component 0 holds the rest
    sums = torch.cat([total - sums.sum(1, keepdim=True), sums], dim=1)
    counts = sums[..., 2:]
    moved = torch.where(counts > 0, sums[..., :2] / counts.clamp(min=1), centers)
    return member, moved


def _kmeans_labels(
    phi: Tensor, k: int, generator: torch.Generator | None, max_iter: int = 300, tol: float = 1e-4
) -> Tensor:
    """Lloyd's k-means from k-means++ seeds, batched; one-hot labels [C, k, K] (in phi's dtype)
    of the final centres.

    As in scikit-learn, a cell stops when the squared centre shift falls to `tol` times the mean
    per-coordinate variance (unchanged labels give a zero shift, so this covers its "strict"
    convergence too). An emptied cluster keeps its centre (scikit-learn relocates it; with
    K >> k samples this only happens in degenerate cells, where BIC keeps fewer components
    anyway). Finished cells stay in the batch, frozen, until a third of it is done; then the
    batch is compacted.

    k-means only seeds EM, so it runs in float32 on the centred data (half the memory traffic
    of the dominant passes); the mixture itself is fitted in float64.
    """
    x_aug = phi[:, 3:].float()  # [C, 3, K]: x, y, 1
    x_sq = x_aug[:, 0:1] ** 2 + x_aug[:, 1:2] ** 2
    centers = _kmeans_plusplus(x_aug, x_sq, k, generator)
    # data are centred, so the mean per-coordinate variance is mean(x^2 + y^2) / 2
    threshold = tol * x_sq.mean(dim=(1, 2)) / 2
    ids = torch.arange(phi.shape[0])
    xa, sq, ca, limit = x_aug, x_sq, centers, threshold
    done = torch.zeros(phi.shape[0], dtype=torch.bool)
    for _ in range(max_iter):
        _, moved = _lloyd_step(xa, sq, ca)
        shift = ((moved - ca) ** 2).sum((-1, -2))
        ca = torch.where(done[:, None, None], ca, moved)
        done = done | (shift <= limit)
        if bool(done.all()):
            break
        if int(done.sum()) * 3 >= done.numel():
            centers[ids[done]] = ca[done]
            keep = ~done
            ids, xa, sq, ca, limit, done = (
                ids[keep],
                xa[keep],
                sq[keep],
                ca[keep],
                limit[keep],
                done[keep],
            )
    centers[ids] = ca
    member, _ = _lloyd_step(x_aug, x_sq, centers)
    return torch.cat([1 - member.sum(1, keepdim=True), member], dim=1).to(phi.dtype)


def _sum_log_unit(values: Tensor) -> Tensor:
    """sum(log(values), -1) for values in [0.5, 1], [C, K] -> [C].

    torch's float64 log is not vectorised (about 40 ns a value here, more than the rest of an
    EM step), so the values are multiplied in blocks of 64 first (a block's product is at least
    2^-64, far from underflow) and only the block products go through log.
    """
    cells, n = values.shape
    pad = (-n) % 64
    if pad:
        values = torch.cat([values, values.new_ones(cells, pad)], dim=1)
    return torch.log(values.view(cells, -1, 64).prod(-1)).sum(-1)


def _two_component_terms(phi: Tensor, phi_mean: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """For k = 2: (mean log-likelihood [C], responsibilities [C, 2, K]) in few passes.

    With d = log-joint(1) - log-joint(0) per sample, log-sum-exp = log-joint(0) + softplus(d),
    softplus(d) = relu(d) - log(sigmoid(|d|)), and the responsibilities are sigmoid(-d, d);
    sigmoid(|d|) is the larger responsibility. The mean of log-joint(0) comes from the mean
    features, without a pass over the samples.
    """
    theta = _theta(params)
    d = torch.bmm((theta[:, 1] - theta[:, 0]).unsqueeze(1), phi)  # [C, 1, K]
    resp = torch.sigmoid(torch.cat([-d, d], dim=1))
    n = phi.shape[-1]
    log_larger = _sum_log_unit(torch.maximum(resp[:, 0], resp[:, 1])) / n
    mean_joint0 = (theta[:, 0] * phi_mean).sum(-1)
    return mean_joint0 + d.clamp(min=0).mean((1, 2)) - log_larger, resp


def _em(
    phi: Tensor,
    k: int,
    tol: float,
    reg_covar: float,
    max_iter: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """EM for k components on every cell: (params [C, k, 6], n_iter [C], converged [C])."""
    cells = phi.shape[0]
    params = _m_step(phi, _kmeans_labels(phi, k, generator), reg_covar)
    n_iter = torch.zeros(cells, dtype=torch.long)
    converged = torch.zeros(cells, dtype=torch.bool)
    # the batch: original cell ids, their features, params and last lower bound
    ids = torch.arange(cells)
    phi_b, params_b = phi, params.clone()
    mean_b = phi.mean(-1)
    previous = torch.full((cells,), -math.inf, dtype=phi.dtype)
    done = torch.zeros(cells, dtype=torch.bool)
    for iteration in range(1, max_iter + 1):
        if k == 2:
            lower_bound, resp = _two_component_terms(phi_b, mean_b, params_b)
        else:
            lower_bound, resp = _e_step(phi_b, params_b)
        updated = _m_step(phi_b, resp, reg_covar)
        newly = ~done & ((lower_bound - previous).abs() < tol)
        # cells already done keep their parameters; the others take the M-step, as sklearn
        # does on the iteration it detects convergence
        params_b = torch.where(done[:, None, None], params_b, updated)
        previous = torch.where(done, previous, lower_bound)
        n_iter[ids[~done]] = iteration
        converged[ids[newly]] = True
        done = done | newly
        if bool(done.all()):
            break
        if int(done.sum()) * 3 >= done.numel():
            params[ids[done]] = params_b[done]
            keep = ~done
            ids, phi_b, params_b, mean_b = ids[keep], phi_b[keep], params_b[keep], mean_b[keep]
            previous, done = previous[keep], done[keep]
    params[ids] = params_b
    return params, n_iter, converged


def _center(samples: Tensor) -> tuple[Tensor, Tensor]:
    if samples.dim() != 3 or samples.shape[-1] != 2:
        raise ValueError(f"samples must be [C, K, 2]; got shape {tuple(samples.shape)}")
    if samples.shape[1] < 2:
        raise ValueError(f"samples needs K >= 2 samples per cell; got {samples.shape[1]}")
    x = samples.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("samples must be finite")
    offset = x.mean(dim=1, keepdim=True)
    return x - offset, offset


def _pack(
    params: Tensor, offset: Tensor, score: Tensor, n_iter: Tensor, converged: Tensor, m: int
) -> GaussianMixtures:
    cells, k, _ = params.shape
    weights = params.new_zeros(cells, m)
    means = params.new_zeros(cells, m, 2)
    cov = torch.eye(2, dtype=params.dtype).repeat(cells, m, 1, 1)
    weights[:, :k] = params[..., 0]
    means[:, :k] = params[..., 1:3] + offset
    cov[:, :k, 0, 0], cov[:, :k, 1, 1] = params[..., 3], params[..., 5]
    cov[:, :k, 0, 1] = cov[:, :k, 1, 0] = params[..., 4]
    n_components = torch.full((cells,), k, dtype=torch.long)
    return GaussianMixtures(
        weights, means, cov, n_components, score, score.new_zeros(cells), n_iter, converged
    )


def _check_options(n_components: int, tol: float, reg_covar: float, max_iter: int) -> None:
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1; got {n_components}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol}")
    if not reg_covar >= 0:
        raise ValueError(f"reg_covar must be >= 0; got {reg_covar}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")


def _fit_centered(
    x: Tensor,
    phi: Tensor,
    k: int,
    tol: float,
    reg_covar: float,
    max_iter: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(params [C, k, 6], score [C], n_iter [C], converged [C]) on centred data."""
    cells, n, _ = x.shape
    if k == 1:
        # closed form: the sample mean and biased covariance are EM's fixed point; the mean
        # log-likelihood is -ln 2pi - ln|S + rI|/2 - tr((S + rI)^-1 S)/2
        sxx, sxy, syy = phi[:, :3].mean(dim=-1).unbind(-1)  # data are centred
        a, b, c = sxx + reg_covar, sxy, syy + reg_covar
        det = a * c - b * b
        trace = (c * sxx - 2 * b * sxy + a * syy) / det
        score = -_LOG_2PI - 0.5 * torch.log(det) - 0.5 * trace
        ones, zeros = torch.ones_like(a), torch.zeros_like(a)
        params = torch.stack([ones, zeros, zeros, a, b, c], dim=-1).unsqueeze(1)
        return (
            params,
            score,
            torch.zeros(cells, dtype=torch.long),
            torch.ones_like(a, dtype=torch.bool),
        )
    if n < k:
        raise ValueError(f"samples has K = {n} per cell, fewer than n_components = {k}")
    params, n_iter, converged = _em(phi, k, tol, reg_covar, max_iter, generator)
    if k == 2:
        score = _two_component_terms(phi, phi.mean(-1), params)[0]
    else:
        score = _score(phi, params)
    return params, score, n_iter, converged


def _bic(score: Tensor, k: int, n: int) -> Tensor:
    # free parameters of a k-component full-covariance 2-D mixture: 3k + 2k + (k - 1)
    return -2.0 * score * n + (6 * k - 1) * math.log(n)


def _cat(parts: list[GaussianMixtures]) -> GaussianMixtures:
    return GaussianMixtures(
        *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(GaussianMixtures))
    )


def _chunks(samples: Tensor, chunk_cells: int) -> list[Tensor]:
    if chunk_cells < 1:
        raise ValueError(f"chunk_cells must be >= 1; got {chunk_cells}")
    return list(samples.split(chunk_cells)) if samples.shape[0] else [samples]


def fit_gaussian_mixtures(
    samples: Tensor,
    n_components: int,
    *,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    chunk_cells: int = 256,
) -> GaussianMixtures:
    """Fit one `n_components` mixture to each cell's samples [C, K, 2] (in float64).

    Cells run `chunk_cells` at a time: a chunk's features then stay in cache across the EM
    passes, which is faster than one batch of all cells.
    """
    _check_options(n_components, tol, reg_covar, max_iter)
    parts = []
    for chunk in _chunks(samples, chunk_cells):
        x, offset = _center(chunk)
        params, score, n_iter, converged = _fit_centered(
            x, _features(x), n_components, tol, reg_covar, max_iter, generator
        )
        fit = _pack(params, offset, score, n_iter, converged, n_components)
        fit.bic = _bic(score, n_components, x.shape[1])
        parts.append(fit)
    return _cat(parts)


def select_gaussian_mixtures(
    samples: Tensor,
    max_components: int = 4,
    *,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    chunk_cells: int = 256,
) -> GaussianMixtures:
    """Per cell, the mixture chosen by BIC with early stopping, as the paper's `get_best_gmm2`:
    fit 1, 2, ... components and stop at the first count that does not lower BIC (at most
    `max_components`); BIC = -2 log-likelihood + (6k - 1) ln K. Cells whose BIC stopped
    improving leave the search, so only the few multi-modal cells pay for 3 or 4 components.
    """
    _check_options(max_components, tol, reg_covar, max_iter)
    return _cat(
        [
            _select_chunk(chunk, max_components, tol, reg_covar, max_iter, generator)
            for chunk in _chunks(samples, chunk_cells)
        ]
    )


def _select_chunk(
    samples: Tensor,
    max_components: int,
    tol: float,
    reg_covar: float,
    max_iter: int,
    generator: torch.Generator | None,
) -> GaussianMixtures:
    x, offset = _center(samples)
    phi = _features(x)
    n = x.shape[1]
    params, score, n_iter, converged = _fit_centered(x, phi, 1, tol, reg_covar, max_iter, None)
    best = _pack(params, offset, score, n_iter, converged, max_components)
    best.bic = _bic(score, 1, n)
    ids = torch.arange(x.shape[0])
    for k in range(2, min(max_components, n) + 1):
        if ids.numel() == 0:
            break
        params, score, n_iter, converged = _fit_centered(
            x[ids], phi[ids], k, tol, reg_covar, max_iter, generator
        )
        bic = _bic(score, k, n)
        better = bic < best.bic[ids]
        ids, params = ids[better], params[better]
        if ids.numel() == 0:
            break
        fit = _pack(
            params, offset[ids], score[better], n_iter[better], converged[better], max_components
        )
        best.weights[ids], best.means[ids], best.covariances[ids] = (
            fit.weights,
            fit.means,
            fit.covariances,
        )
        best.n_components[ids], best.score[ids], best.bic[ids] = k, fit.score, bic[better]
        best.n_iter[ids], best.converged[ids] = fit.n_iter, fit.converged
    return best
