"""Batched 2-D Gaussian-mixture fits by EM, one independent mixture per cell, in torch.

AMD/AMV fit a mixture to the K predicted samples of every (time step, pedestrian) cell and pick
the number of components by BIC. The paper's code runs one scikit-learn fit per cell and
component count (20-25 ms of CPU a cell at K = 1000 here, warm; hours for UNIV's 292,008
cells); here all cells of a chunk run together and reproduce scikit-learn's `GaussianMixture`
defaults: full covariances, `reg_covar` added to the diagonal, k-means initialisation
(k-means++ seeding with 2 + ln k local trials, then Lloyd to convergence), tolerance on the
change of the mean log-likelihood, at most `max_iter` EM steps.

Speed. The log-density of a 2-D Gaussian plus its log-weight is linear in the features
phi(x) = [x^2, xy, y^2, x, y, 1], so the E-step is one batched matmul phi @ theta, and the
M-step's sufficient statistics (sum r, sum r x, sum r xx^T) are one more, resp^T @ phi; for
k = 2 only component 1's responsibilities are formed (component 0's statistics are the totals
minus component 1's). Each cell's data are centred first. k = 1 has a closed form. Cells whose
fit converged leave the batch (the batch is compacted when a third of it is done), and in the
BIC search cells whose BIC stopped improving leave too, so most work goes to k = 2, which
almost every cell of a real predictor needs only to reject.

Precision. k-means, which only seeds EM, runs in float32. In `select_gaussian_mixtures` the EM
passes over the samples run in float32 by default while parameters, their 2x2 algebra, lower
bounds and BICs stay float64; a float32 fit can only *reject* a component count: any fit whose
float32 BIC beats the best so far or comes within a margin of it (10 K tol, i.e. 10 at K = 1000)
is fitted again in float64 from the same k-means labels, and that fit decides. Float32 and
float64 EM from the same labels end at most 1.4 BIC apart on the released Social-Implicit
weights' predictions (UNIV, K = 1000; almost always < 1e-3, the larger gaps are cells where one
of them takes one EM step more), and the test suite checks on all five ETH/UCY test splits that
the chosen counts, AMD and AMV equal the float64 path's. `em_dtype=torch.float64` gives the
float64 path.

Measured (one thread, the 2-core development machine shared with other jobs, so CPU times;
`python benchmarks/trajectory.py --only amd_amv`): on the same 516 UNIV cells at K = 1000, warm
and interleaved, 0.41-0.49 ms per cell against 25.5-26.4 ms for the authors' code (54-62x);
over the whole UNIV test set (292,008 cells) 0.385-0.389 ms per cell, 112-114 s (66-68x the
authors' per-cell time). The issue's target, <= 0.2 ms per cell and >= 100x, is not reached.
Where the time goes (profiled on 3,072 UNIV cells, all of which keep one component): k-means
for k = 2 about 0.16-0.20 ms per cell (about 17 Lloyd steps per cell counting cells frozen
until the batch compacts; with scikit-learn's tolerance a third of a batch has converged only
after about 11 steps) plus
0.03 ms of k-means++ seeding, EM for k = 2 about 0.12 ms (8 steps per cell), the features
0.04 ms. Each Lloyd or EM step is a few batched matmuls and elementwise passes over the
samples that already run at about 0.5 ns per float read, memory-bound; elementwise
replacements for the small matmuls measured slower, and eager torch cannot fuse the passes.
The float64 refits are rare (none of those 3,072 cells).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["GaussianMixtures", "fit_gaussian_mixtures", "select_gaussian_mixtures"]

_EPS = torch.finfo(torch.float64).eps
DEFAULT_CHUNK_CELLS = 256
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


def _features(xt: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Centred rows xt [C, 2, K] -> [C, 6, K] in `dtype`: x^2, xy, y^2, x, y, 1 (feature-major,
    so that reductions over components and features run along contiguous sample rows; written
    in place, row by row, from contiguous x and y rows)."""
    xt = xt.to(dtype)
    px, py = xt[:, 0], xt[:, 1]
    phi = xt.new_empty(xt.shape[0], 6, xt.shape[2])
    torch.mul(px, px, out=phi[:, 0])
    torch.mul(px, py, out=phi[:, 1])
    torch.mul(py, py, out=phi[:, 2])
    phi[:, 3:5] = xt
    phi[:, 5] = 1.0
    return phi


def _params_from_stats(stats: Tensor, reg_covar: float) -> Tensor:
    """Packed parameters [C, k, 6] (weight, mean x, mean y, cov xx, cov xy, cov yy) from the
    sufficient statistics [C, k, 6] (sum r phi), float64, as scikit-learn's M-step."""
    nk = stats[..., 5].clamp(min=0) + 10 * _EPS
    mx, my = stats[..., 3] / nk, stats[..., 4] / nk
    cxx = stats[..., 0] / nk - mx * mx + reg_covar
    cxy = stats[..., 1] / nk - mx * my
    cyy = stats[..., 2] / nk - my * my + reg_covar
    weights = nk / nk.sum(dim=-1, keepdim=True)
    return torch.stack([weights, mx, my, cxx, cxy, cyy], dim=-1)


def _m_step(phi: Tensor, resp: Tensor, reg_covar: float) -> Tensor:
    """Parameters [C, k, 6] (float64) from responsibilities [C, k, K]; the pass over the
    samples runs in phi's dtype."""
    return _params_from_stats(torch.bmm(resp, phi.transpose(1, 2)).double(), reg_covar)


def _m_step_two(phi: Tensor, r1: Tensor, total: Tensor, reg_covar: float) -> Tensor:
    """k = 2 from component 1's responsibilities [C, 1, K] alone: component 0's statistics are
    the totals [C, 6] (float64) minus component 1's, so one pass over the samples, not two."""
    s1 = torch.bmm(r1, phi.transpose(1, 2)).double()  # [C, 1, 6]
    return _params_from_stats(torch.cat([total.unsqueeze(1) - s1, s1], dim=1), reg_covar)


def _theta(params: Tensor) -> Tensor:
    """Packed parameters [C, k, 6] -> coefficients [C, k, 6]: theta @ phi = log w + log N."""
    w, mx, my, a, b, c = params.unbind(-1)
    det = a * c - b * b
    p11, p12, p22 = c / det, -b / det, a / det  # the precision, closed-form 2x2 inverse
    pmx, pmy = p11 * mx + p12 * my, p12 * mx + p22 * my
    const = torch.log(w) - _LOG_2PI - 0.5 * torch.log(det) - 0.5 * (mx * pmx + my * pmy)
    return torch.stack([-0.5 * p11, -p12, -0.5 * p22, pmx, pmy, const], dim=-1)


def _e_step(phi: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """(mean log-likelihood [C] (float64), responsibilities [C, k, K] in phi's dtype)."""
    log_joint = torch.bmm(_theta(params).to(phi.dtype), phi)  # [C, k, K]
    peak = log_joint.amax(dim=1, keepdim=True)
    joint = torch.exp_(log_joint.sub_(peak))
    total = joint.sum(dim=1, keepdim=True)
    norm = peak + torch.log(total)  # log-sum-exp over components, [C, 1, K]
    return norm.mean(dim=(1, 2)).double(), joint.div_(total)


def _score(phi: Tensor, params: Tensor) -> Tensor:
    log_joint = torch.bmm(_theta(params).to(phi.dtype), phi)
    return torch.logsumexp(log_joint, dim=1).mean(dim=-1).double()


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


def _lloyd_step(
    x_aug: Tensor, x_sq: Tensor, centers: Tensor, total: Tensor
) -> tuple[Tensor, Tensor]:
    """One Lloyd step: (label indicators of components 1..k-1 [C, k-1, K], new centres).

    `total` [C, 1, 3] is x_aug summed over samples (sum x, sum y, count): component 0's sums
    are the total minus the others', so only k - 1 indicator rows are formed. The indicators
    are written by a comparison with a float `out` (converting a bool tensor costs ten times
    as much)."""
    k = centers.shape[1]
    if k == 2:
        # closer to c1 than to c0 exactly when 2 (c1 - c0).x > |c1|^2 - |c0|^2: one matmul
        diff = centers[:, 1] - centers[:, 0]
        bias = (centers[:, 1] ** 2).sum(-1) - (centers[:, 0] ** 2).sum(-1)
        coef = torch.cat([2 * diff, -bias.unsqueeze(-1)], dim=-1).unsqueeze(1)  # [C, 1, 3]
        projection = torch.bmm(coef, x_aug)  # [C, 1, K]
        member = torch.gt(projection, 0, out=torch.empty_like(projection))
    else:
        labels = _argmin_components(_sq_dist(x_aug, x_sq, centers)).unsqueeze(1)
        ids = torch.arange(1, k).view(1, k - 1, 1)
        member = x_aug.new_empty(x_aug.shape[0], k - 1, x_aug.shape[2])
        torch.eq(labels, ids, out=member)
    sums = torch.bmm(member, x_aug.transpose(1, 2))  # [C, k-1, 3]: sum x, sum y, count
    sums = torch.cat([total - sums.sum(1, keepdim=True), sums], dim=1)
    counts = sums[..., 2:]
    moved = torch.where(counts > 0, sums[..., :2] / counts.clamp(min=1), centers)
    return member, moved


def _kmeans_labels(
    x_aug: Tensor,
    k: int,
    generator: torch.Generator | None,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> Tensor:
    """Lloyd's k-means from k-means++ seeds, batched over cells of centred float32 rows
    x_aug [C, 3, K] (x, y, 1); one-hot labels [C, k, K] (float32) of the final centres.

    As in scikit-learn, a cell stops when the squared centre shift falls to `tol` times the mean
    per-coordinate variance (unchanged labels give a zero shift, so this covers its "strict"
    convergence too). An emptied cluster keeps its centre (scikit-learn relocates it; with
    K >> k samples this only happens in degenerate cells, where BIC keeps fewer components
    anyway). Finished cells stay in the batch, frozen, until a third of it is done; then the
    batch is compacted.

    k-means only seeds EM, so it always runs in float32 on the centred data (half the memory
    traffic of the dominant passes), whatever the precision of the EM that follows.
    """
    x_sq = x_aug[:, 0:1] ** 2 + x_aug[:, 1:2] ** 2
    centers = _kmeans_plusplus(x_aug, x_sq, k, generator)
    # data are centred, so the mean per-coordinate variance is mean(x^2 + y^2) / 2
    threshold = tol * x_sq.mean(dim=(1, 2)) / 2
    total = x_aug.sum(-1).unsqueeze(1)  # [C, 1, 3]
    ids = torch.arange(x_aug.shape[0])
    xa, sq, ca, limit, tot = x_aug, x_sq, centers, threshold, total
    done = torch.zeros(x_aug.shape[0], dtype=torch.bool)
    for _ in range(max_iter):
        _, moved = _lloyd_step(xa, sq, ca, tot)
        shift = ((moved - ca) ** 2).sum((-1, -2))
        ca = torch.where(done[:, None, None], ca, moved)
        done = done | (shift <= limit)
        if bool(done.all()):
            break
        if int(done.sum()) * 3 >= done.numel():
            centers[ids[done]] = ca[done]
            keep = ~done
            ids, xa, sq, ca, limit, tot, done = (
                ids[keep],
                xa[keep],
                sq[keep],
                ca[keep],
                limit[keep],
                tot[keep],
                done[keep],
            )
    centers[ids] = ca
    member, _ = _lloyd_step(x_aug, x_sq, centers, total)
    return torch.cat([1 - member.sum(1, keepdim=True), member], dim=1)


def _sum_log_unit(values: Tensor) -> Tensor:
    """sum(log(values), -1) for values in [0.5, 1], [C, K] -> [C].

    torch's float64 log is not vectorised (about 40 ns a value here, more than the rest of an
    EM step), so the values are multiplied in blocks of at most 64 first (a block's product is
    at least 2^-64, far from underflow in float32 too) and only the block products go through
    log. The block is a divisor of K when one lies in [16, 64], else K is padded with ones.
    """
    cells, n = values.shape
    block = next((b for b in range(64, 15, -1) if n % b == 0), 64)
    pad = (-n) % block
    if pad:
        values = torch.cat([values, values.new_ones(cells, pad)], dim=1)
    return torch.log(values.view(cells, -1, block).prod(-1)).sum(-1)


def _two_component_terms(phi: Tensor, phi_mean: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """For k = 2: (mean log-likelihood [C] (float64), component 1's responsibilities
    [C, 1, K] in phi's dtype) in few passes.

    With d = log-joint(1) - log-joint(0) per sample, log-sum-exp = log-joint(0) + softplus(d),
    softplus(d) = relu(d) - log(sigmoid(|d|)); the responsibilities are sigmoid(d) and
    1 - sigmoid(d), and sigmoid(|d|) is the larger of the two. The mean of log-joint(0) comes
    from the mean features phi_mean [C, 6] (float64), without a pass over the samples.
    """
    theta = _theta(params)
    d = torch.bmm((theta[:, 1] - theta[:, 0]).unsqueeze(1).to(phi.dtype), phi)  # [C, 1, K]
    r1 = torch.sigmoid(d)
    larger = torch.maximum(r1, 1 - r1)[:, 0]
    log_larger = _sum_log_unit(larger).double() / phi.shape[-1]
    mean_joint0 = (theta[:, 0] * phi_mean).sum(-1)
    return mean_joint0 + d.clamp(min=0).mean((1, 2)).double() - log_larger, r1


def _em(
    phi: Tensor, total: Tensor, resp: Tensor, tol: float, reg_covar: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """EM on every cell from initial responsibilities [C, k, K] (the k-means labels), with the
    cells' feature sums `total` [C, 6] (float64): (params [C, k, 6], n_iter [C], converged
    [C]). The passes over the samples (the E-step's matmul and exponentials, the M-step's
    matmul) run in phi's dtype; parameters, their 2x2 algebra and the lower bounds are
    float64."""
    cells, k = phi.shape[0], resp.shape[1]
    params = _m_step(phi, resp.to(phi.dtype), reg_covar)
    n_iter = torch.zeros(cells, dtype=torch.long)
    converged = torch.zeros(cells, dtype=torch.bool)
    # the batch: original cell ids, their features, params, feature sums and last lower bound
    ids = torch.arange(cells)
    phi_b, params_b = phi, params.clone()
    total_b = total
    previous = torch.full((cells,), -math.inf, dtype=torch.float64)
    done = torch.zeros(cells, dtype=torch.bool)
    for iteration in range(1, max_iter + 1):
        if k == 2:
            lower_bound, r1 = _two_component_terms(phi_b, total_b / phi.shape[-1], params_b)
            updated = _m_step_two(phi_b, r1, total_b, reg_covar)
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
            ids, phi_b, params_b, total_b = ids[keep], phi_b[keep], params_b[keep], total_b[keep]
            previous, done = previous[keep], done[keep]
    params[ids] = params_b
    return params, n_iter, converged


def _final_score(phi: Tensor, total: Tensor, params: Tensor) -> Tensor:
    """Mean log-likelihood [C] (float64) of each cell's samples under its fitted mixture."""
    if params.shape[1] == 2:
        return _two_component_terms(phi, total / phi.shape[-1], params)[0]
    return _score(phi, params)


def _center(samples: Tensor) -> tuple[Tensor, Tensor]:
    """samples [C, K, 2] -> (centred float64 rows xt [C, 2, K], the cell means [C, 1, 2])."""
    if samples.dim() != 3 or samples.shape[-1] != 2:
        raise ValueError(f"samples must be [C, K, 2]; got shape {tuple(samples.shape)}")
    if samples.shape[1] < 2:
        raise ValueError(f"samples needs K >= 2 samples per cell; got {samples.shape[1]}")
    # a metric, not a loss: samples straight from a model may carry autograd history, which
    # the in-place (out=) EM passes cannot take
    samples = samples.detach()
    x = samples.to(torch.float64)
    offset = x.mean(dim=1, keepdim=True)
    # a nan or inf sample makes its cell's mean non-finite: one check per cell, not per value
    if not torch.isfinite(offset).all():
        raise ValueError("samples must be finite")
    xt = torch.empty(x.shape[0], 2, x.shape[1], dtype=torch.float64)
    torch.sub(x.transpose(1, 2), offset.transpose(1, 2), out=xt)
    return xt, offset


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


def _one_component(xt: Tensor, reg_covar: float) -> tuple[Tensor, Tensor]:
    """k = 1 in closed form on centred float64 rows xt [C, 2, K]: (params [C, 1, 6], score [C]).

    The sample mean and biased covariance are EM's fixed point; the mean log-likelihood is
    -ln 2pi - ln|S + rI|/2 - tr((S + rI)^-1 S)/2."""
    second = torch.bmm(xt, xt.transpose(1, 2)) / xt.shape[2]  # [C, 2, 2]: E[x x^T]
    sxx, sxy, syy = second[:, 0, 0], second[:, 0, 1], second[:, 1, 1]
    a, b, c = sxx + reg_covar, sxy, syy + reg_covar
    det = a * c - b * b
    trace = (c * sxx - 2 * b * sxy + a * syy) / det
    score = -_LOG_2PI - 0.5 * torch.log(det) - 0.5 * trace
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([ones, zeros, zeros, a, b, c], dim=-1).unsqueeze(1), score


def _feature_sums(xt: Tensor) -> Tensor:
    """Centred float64 rows xt [C, 2, K] -> the sums over samples of the features [C, 6]
    (x^2, xy, y^2, x, y, 1), in float64 whatever the EM's precision."""
    second = torch.bmm(xt, xt.transpose(1, 2))
    first = xt.sum(-1)
    count = xt.new_full((xt.shape[0], 1), float(xt.shape[2]))
    return torch.cat([second[:, 0, :], second[:, 1, 1:], first, count], dim=-1)


def _kmeans_input(xt: Tensor, phi: Tensor) -> Tensor:
    """The k-means rows [C, 3, K] (x, y, 1) in float32: a view of phi when it is float32."""
    if phi.dtype == torch.float32:
        return phi[:, 3:]
    return _features(xt, torch.float32)[:, 3:]


@dataclass
class _Fits:
    """Fits of one component count k on a batch of cells (float64 params)."""

    params: Tensor  # [C, k, 6]
    score: Tensor  # [C]
    n_iter: Tensor
    converged: Tensor


def _fit_k(
    x: Tensor,
    phi: Tensor,
    total: Tensor,
    labels: Tensor,
    tol: float,
    reg_covar: float,
    max_iter: int,
    beat: Tensor | None = None,
    margin: float = 0.0,
) -> tuple[_Fits, Tensor]:
    """EM for k = labels.shape[1] components from the k-means labels, in phi's dtype:
    (fits, BIC [C]). With a float32 phi and `beat` [C] (the BIC each cell has so far), the
    cells whose float32 BIC is below beat + margin are fitted again in float64 from the same
    labels, so their fits are the float64 path's exactly."""
    k, n = labels.shape[1], x.shape[2]
    params, n_iter, converged = _em(phi, total, labels, tol, reg_covar, max_iter)
    fits = _Fits(params, _final_score(phi, total, params), n_iter, converged)
    bic = _bic(fits.score, k, n)
    if beat is not None and phi.dtype != torch.float64:
        # a float32 fit that went non-finite (a component emptied to rounding) is redone too
        rows = ((bic < beat + margin) | ~torch.isfinite(bic)).nonzero().squeeze(1)
        if rows.numel():
            phi64 = _features(x[rows])  # x: centred float64 rows [C, 2, K]
            p64, it64, conv64 = _em(phi64, total[rows], labels[rows], tol, reg_covar, max_iter)
            fits.params[rows], fits.score[rows] = p64, _final_score(phi64, total[rows], p64)
            fits.n_iter[rows], fits.converged[rows] = it64, conv64
            bic[rows] = _bic(fits.score[rows], k, n)
    return fits, bic


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


def _check_dtype(em_dtype: torch.dtype) -> None:
    if em_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"em_dtype must be torch.float32 or torch.float64; got {em_dtype}")


def fit_gaussian_mixtures(
    samples: Tensor,
    n_components: int,
    *,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    em_dtype: torch.dtype = torch.float64,
) -> GaussianMixtures:
    """Fit one `n_components` mixture to each cell's samples [C, K, 2].

    The returned mixtures are float64; `em_dtype=torch.float32` runs the EM itself in float32
    (its passes over the samples move half the bytes; the parameters then carry float32
    rounding, so it is not the default here). Cells run `chunk_cells` at a time.
    """
    _check_options(n_components, tol, reg_covar, max_iter)
    _check_dtype(em_dtype)
    parts = []
    for chunk in _chunks(samples, chunk_cells):
        x, offset = _center(chunk)
        cells, n = x.shape[0], x.shape[2]
        if n_components == 1:
            params, score = _one_component(x, reg_covar)
            n_iter = torch.zeros(cells, dtype=torch.long)
            converged = torch.ones(cells, dtype=torch.bool)
        else:
            if n < n_components:
                raise ValueError(
                    f"samples has K = {n} per cell, fewer than n_components = {n_components}"
                )
            phi = _features(x, em_dtype)
            labels = _kmeans_labels(_kmeans_input(x, phi), n_components, generator)
            fits, _ = _fit_k(x, phi, _feature_sums(x), labels, tol, reg_covar, max_iter)
            params, score, n_iter, converged = fits.params, fits.score, fits.n_iter, fits.converged
        fit = _pack(params, offset, score, n_iter, converged, n_components)
        fit.bic = _bic(score, n_components, n)
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
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    em_dtype: torch.dtype = torch.float32,
    bic_margin: float | None = None,
) -> GaussianMixtures:
    """Per cell, the mixture chosen by BIC with early stopping, as the paper's `get_best_gmm2`:
    fit 1, 2, ... components and stop at the first count that does not lower BIC (at most
    `max_components`); BIC = -2 log-likelihood + (6k - 1) ln K. Cells whose BIC stopped
    improving leave the search, so only the few multi-modal cells pay for 3 or 4 components.

    With `em_dtype=torch.float32` (the default) float32 EM only ever *rejects* a component
    count: a fit whose float32 BIC is lower than the best so far, or within `bic_margin` of
    it (default 10 K tol, five times the 2 K tol that one EM step more or less can move a
    BIC), is fitted again in float64 from the same k-means labels, and that float64 fit
    decides. So every chosen mixture is exactly the float64 path's, and a choice can differ
    from the float64 path's only where float32 and float64 EM end more than `bic_margin`
    apart in BIC (see the module docstring for how far apart they were measured to end).
    `em_dtype=torch.float64` runs everything in float64.
    """
    _check_options(max_components, tol, reg_covar, max_iter)
    _check_dtype(em_dtype)
    if bic_margin is None:
        bic_margin = 10.0 * samples.shape[1] * tol if samples.dim() == 3 else 0.0
    if not bic_margin >= 0:
        raise ValueError(f"bic_margin must be >= 0; got {bic_margin}")
    return _cat(
        [
            _select_chunk(
                chunk, max_components, tol, reg_covar, max_iter, generator, em_dtype, bic_margin
            )
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
    em_dtype: torch.dtype,
    bic_margin: float,
) -> GaussianMixtures:
    x, offset = _center(samples)
    cells, n = x.shape[0], x.shape[2]
    params, score = _one_component(x, reg_covar)
    best = _pack(
        params,
        offset,
        score,
        torch.zeros(cells, dtype=torch.long),
        torch.ones(cells, dtype=torch.bool),
        max_components,
    )
    best.bic = _bic(score, 1, n)
    phi = _features(x, em_dtype)
    x_aug = _kmeans_input(x, phi)
    total = _feature_sums(x)
    ids = torch.arange(cells)
    for k in range(2, min(max_components, n) + 1):
        if ids.numel() == 0:
            break
        whole = ids.numel() == cells  # index only once cells have left (a copy otherwise)
        labels = _kmeans_labels(x_aug if whole else x_aug[ids], k, generator)
        xs, phis, totals = (x, phi, total) if whole else (x[ids], phi[ids], total[ids])
        # float32 EM only rejects: winners and near-winners are refitted in float64
        fits, bic = _fit_k(
            xs, phis, totals, labels, tol, reg_covar, max_iter, best.bic[ids], bic_margin
        )
        better = bic < best.bic[ids]
        ids = ids[better]
        if ids.numel() == 0:
            break
        fit = _pack(
            fits.params[better],
            offset[ids],
            fits.score[better],
            fits.n_iter[better],
            fits.converged[better],
            max_components,
        )
        best.weights[ids], best.means[ids], best.covariances[ids] = (
            fit.weights,
            fit.means,
            fit.covariances,
        )
        best.n_components[ids], best.score[ids], best.bic[ids] = k, fit.score, bic[better]
        best.n_iter[ids], best.converged[ids] = fit.n_iter, fit.converged
    return best
