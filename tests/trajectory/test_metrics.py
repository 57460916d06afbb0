"""Metrics against independent oracles: ADE/FDE and the AMD integral written out by hand,
scikit-learn's GaussianMixture for the batched EM, scipy's gaussian_kde for KDE-NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import gaussian_kde
from sklearn.mixture import GaussianMixture

from meanwise.trajectory.gmm import (
    GaussianMixtures,
    fit_gaussian_mixtures,
    select_gaussian_mixtures,
)
from meanwise.trajectory.metrics import (
    DistributionMetrics,
    ade_fde,
    amd_amv,
    kde_log_density_cells,
    kde_nll,
    mahalanobis_cells,
)

# --- ADE / FDE ---------------------------------------------------------------------------------


def test_ade_fde_both_reductions_by_hand():
    gt = torch.zeros(2, 2, 2, dtype=torch.float64)  # T = 2, N = 2, everyone at the origin
    pred = torch.zeros(2, 2, 2, 2, dtype=torch.float64)  # K = 2
    pred[0, :, 0] = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # sample 0, ped 0: errors 5, 1
    pred[0, :, 1] = torch.tensor([[0.0, 0.0], [0.0, 9.0]])  # sample 0, ped 1: errors 0, 9
    pred[1, :, 0] = torch.tensor([[0.0, 2.0], [0.0, 2.0]])  # sample 1, ped 0: errors 2, 2
    pred[1, :, 1] = torch.tensor([[6.0, 8.0], [0.0, 0.0]])  # sample 1, ped 1: errors 10, 0
    # per pedestrian, ADE and FDE minimised independently:
    # ped 0: ADE min(3, 2) = 2, FDE min(1, 2) = 1; ped 1: ADE min(4.5, 5) = 4.5, FDE min(9, 0) = 0
    ade, fde = ade_fde(pred, gt)
    assert ade.item() == pytest.approx((2 + 4.5) / 2) and fde.item() == pytest.approx(0.5)
    per_ped = ade_fde(pred, gt, reduce="none")
    assert per_ped[0].tolist() == [2.0, 4.5] and per_ped[1].tolist() == [1.0, 0.0]
    # per scene (Social-GAN): sample 0 sums ADE 3 + 4.5, sample 1 2 + 5; FDE 1 + 9 vs 2 + 0
    ade_s, fde_s = ade_fde(pred, gt, reduce="scene")
    assert ade_s.item() == pytest.approx(7.0 / 2) and fde_s.item() == pytest.approx(2.0 / 2)


def test_ade_fde_rejects_bad_input():
    with pytest.raises(ValueError, match="pred must be"):
        ade_fde(torch.zeros(3, 12, 2), torch.zeros(12, 2, 2))
    with pytest.raises(ValueError, match="does not match gt"):
        ade_fde(torch.zeros(3, 12, 2, 2), torch.zeros(12, 3, 2))
    with pytest.raises(ValueError, match="finite"):
        ade_fde(torch.full((3, 12, 2, 2), math.nan), torch.zeros(12, 2, 2))
    with pytest.raises(ValueError, match="reduce"):
        ade_fde(torch.zeros(3, 12, 2, 2), torch.zeros(12, 2, 2), reduce="mean")


# --- the AMD distance, from its definition -----------------------------------------------------


def _amd_cell_by_quadrature(weights, means, covs, y):
    """The paper's definition with p_k as the integral of component k's unnormalised density
    exp(-(x - mu)'P(x - mu)/2) along the segment x = y + t (c - y), t in [0, 1] (scipy quad)."""
    center = (weights[:, None] * means).sum(0)
    v = center - y
    num, den = np.zeros((2, 2)), 0.0
    for w, mu, cov in zip(weights, means, covs, strict=True):
        precision = np.linalg.pinv(cov)

        def density(t, precision=precision, mu=mu):
            d = y + t * v - mu
            return math.exp(-0.5 * d @ precision @ d)

        p = integrate.quad(density, 0.0, 1.0, epsabs=0, epsrel=1e-12)[0]
        num += w * p * precision
        den += w * p
    return math.sqrt(v @ (num / den) @ v)


def _mixture(weights, means, covs) -> GaussianMixtures:
    m = len(weights)
    pad = 4 - m
    w = torch.tensor(list(weights) + [0.0] * pad, dtype=torch.float64)[None]
    mu = torch.tensor(np.concatenate([means, np.zeros((pad, 2))]), dtype=torch.float64)[None]
    cov = torch.tensor(np.concatenate([covs, np.tile(np.eye(2), (pad, 1, 1))]))[None]
    zeros = torch.zeros(1)
    return GaussianMixtures(w, mu, cov, torch.tensor([m]), zeros, zeros, zeros, zeros.bool())


@pytest.mark.parametrize("case", range(4))
def test_amd_distance_equals_the_segment_integral(case):
    rng = np.random.default_rng(case)
    m = 1 + case % 3
    weights = rng.dirichlet(np.ones(m))
    means = rng.normal(size=(m, 2)) * 2
    a = rng.normal(size=(m, 2, 2))
    covs = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(2)
    y = rng.normal(size=2) * 3
    dist, total = mahalanobis_cells(_mixture(weights, means, covs), torch.tensor(y)[None])
    assert dist.item() == pytest.approx(_amd_cell_by_quadrature(weights, means, covs, y), rel=1e-9)
    center = (weights[:, None] * means).sum(0)
    spread = means - center
    expected_total = (weights[:, None, None] * (covs + spread[:, :, None] * spread[:, None])).sum(0)
    assert np.allclose(total[0].numpy(), expected_total)
    if m == 1:  # one component: G = P, the plain Mahalanobis distance of the mean
        v = means[0] - y
        assert dist.item() == pytest.approx(math.sqrt(v @ np.linalg.inv(covs[0]) @ v))


def test_amd_distance_is_zero_when_undefined():
    # the ground truth at the centre (v = 0) -> 0, as the paper's code returns
    means, covs = np.array([[1.0, 2.0]]), np.eye(2)[None]
    dist, _ = mahalanobis_cells(_mixture([1.0], means, covs), torch.tensor([[1.0, 2.0]]))
    assert dist.item() == 0.0


# --- batched EM against scikit-learn -----------------------------------------------------------


def _blobs(seed: int, k: int, n: int = 400) -> np.ndarray:
    """Well-separated Gaussian blobs: a cell where every EM initialisation finds one optimum."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, 2)) * 0.5 + 8.0 * np.stack([np.arange(k), np.arange(k) % 2], 1)
    labels = rng.integers(0, k, size=n)
    scales = rng.uniform(0.2, 0.6, size=(k, 2, 2)) * np.array([[1, 0.5], [0.5, 1]])
    return centers[labels] + np.einsum("nij,nj->ni", scales[labels], rng.normal(size=(n, 2))) + 30


def _sklearn_bic_choice(x: np.ndarray) -> GaussianMixture:
    """BIC with early stopping as the issue states it: 1, 2, ... until BIC stops falling (<= 4)."""
    best, best_bic = None, math.inf
    for k in range(1, 5):
        gm = GaussianMixture(n_components=k, random_state=0).fit(x)
        bic = gm.bic(x)
        if bic >= best_bic:
            break
        best, best_bic = gm, bic
    return best


def _sorted_components(weights, means, covs, k):
    order = np.lexsort((means[:k, 1], means[:k, 0]))
    return weights[:k][order], means[:k][order], covs[:k][order]


def test_bic_selection_and_parameters_match_sklearn_on_stable_cells():
    cells = [_blobs(seed, 1 + seed % 3) for seed in range(9)]
    fit = select_gaussian_mixtures(
        torch.tensor(np.stack(cells)), generator=torch.Generator().manual_seed(0), chunk_cells=4
    )
    for c, x in enumerate(cells):
        reference = _sklearn_bic_choice(x)
        k = reference.n_components
        assert fit.n_components[c].item() == k == 1 + c % 3
        ours = _sorted_components(
            fit.weights[c].numpy(), fit.means[c].numpy(), fit.covariances[c].numpy(), k
        )
        theirs = _sorted_components(reference.weights_, reference.means_, reference.covariances_, k)
        for a, b in zip(ours, theirs, strict=True):
            assert np.allclose(a, b, rtol=1e-4, atol=1e-6)
        assert fit.bic[c].item() == pytest.approx(reference.bic(x), rel=1e-6)
        assert fit.weights[c, k:].eq(0).all()


def test_one_component_closed_form_equals_sklearn_and_degenerate_cells_stay_finite():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 300, 2)) * np.array([0.3, 2.0]) + 5.0
    x[1] = 7.25  # identical samples: the covariance is the 1e-6 regularisation alone
    fit = fit_gaussian_mixtures(torch.tensor(x), 1)
    for c in range(2):
        reference = GaussianMixture(1).fit(x[c])
        assert np.allclose(fit.covariances[c, 0].numpy(), reference.covariances_[0], rtol=1e-9)
        assert fit.score[c].item() == pytest.approx(reference.score(x[c]), rel=1e-9)
    chosen = select_gaussian_mixtures(torch.tensor(x), generator=torch.Generator().manual_seed(1))
    assert chosen.n_components.tolist() == [1, 1]
    assert torch.isfinite(chosen.bic).all()


def test_fixed_k_em_matches_sklearn_likelihood_and_is_seeded():
    cells = np.stack([_blobs(20 + s, 2) for s in range(6)])
    generator = torch.Generator().manual_seed(7)
    fit = fit_gaussian_mixtures(torch.tensor(cells), 2, generator=generator)
    again = fit_gaussian_mixtures(
        torch.tensor(cells), 2, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(fit.means, again.means)
    for c, x in enumerate(cells):
        reference = GaussianMixture(2, random_state=0).fit(x)
        assert fit.score[c].item() == pytest.approx(reference.score(x), abs=1e-4)
        assert fit.converged[c] and 1 <= fit.n_iter[c].item() <= 100


def test_amd_amv_scene_against_sklearn_and_the_integral():
    """AMD/AMV of a scene (T = 2, N = 3, K = 400) from our batched fits equal the definition
    evaluated on scikit-learn's per-cell fits: mean distance and largest eigenvalue."""
    t, n = 2, 3
    cells = [_blobs(40 + i, 1 + i % 3) for i in range(t * n)]
    pred = torch.tensor(np.stack(cells)).reshape(t, n, -1, 2).permute(2, 0, 1, 3)  # [K, T, N, 2]
    rng = np.random.default_rng(9)
    gt = torch.tensor(rng.normal(size=(t, n, 2)) + 31.0)
    amd, amv = amd_amv(pred, gt, generator=torch.Generator().manual_seed(0))
    dists, totals = [], []
    for i, x in enumerate(cells):
        gm = _sklearn_bic_choice(x)
        y = gt.reshape(-1, 2)[i].numpy()
        dists.append(_amd_cell_by_quadrature(gm.weights_, gm.means_, gm.covariances_, y))
        center = gm.weights_ @ gm.means_
        spread = gm.means_ - center
        totals.append(
            (
                gm.weights_[:, None, None]
                * (gm.covariances_ + spread[:, :, None] * spread[:, None])
            ).sum(0)
        )
    assert amd.item() == pytest.approx(np.mean(dists), rel=1e-5)
    assert amv.item() == pytest.approx(
        np.abs(np.linalg.eigvals(np.mean(totals, 0))).max(), rel=1e-5
    )


# --- KDE-NLL against scipy ---------------------------------------------------------------------


def test_kde_log_density_matches_scipy_gaussian_kde():
    rng = np.random.default_rng(11)
    samples = rng.normal(size=(5, 50, 2)) * rng.uniform(0.1, 3.0, size=(5, 1, 2)) + 4.0
    gt = rng.normal(size=(5, 2)) + 4.0
    log_density, usable = kde_log_density_cells(torch.tensor(samples), torch.tensor(gt))
    assert usable.all()
    for c in range(5):
        expected = gaussian_kde(samples[c].T).logpdf(gt[c][:, None])[0]
        assert log_density[c].item() == pytest.approx(expected, rel=1e-10)


def test_kde_nll_of_a_scene_skips_degenerate_cells_but_counts_them():
    rng = np.random.default_rng(12)
    k, t, n = 40, 3, 2
    pred = rng.normal(size=(k, t, n, 2)) * 0.5
    pred[:, 0, 0] = 1.0  # one distinct point: skipped
    pred[:, 1, 1] = np.where(np.arange(k)[:, None] % 2 == 0, 0.0, 3.0)  # two distinct: skipped
    pred[:, 2, 0] = rng.normal(size=(k, 2)) * 1e-3 + 50.0  # far from the truth: clipped at -20
    gt = rng.normal(size=(t, n, 2)) * 0.5
    total = 0.0
    for ti in range(t):
        for ni in range(n):
            cell = pred[:, ti, ni]
            if len(np.unique(cell, axis=0)) > 2:
                total += max(gaussian_kde(cell.T).logpdf(gt[ti, ni][:, None])[0], -20.0)
    expected = -total / (t * n)
    assert kde_nll(torch.tensor(pred), torch.tensor(gt)).item() == pytest.approx(expected, rel=1e-9)


# --- the dataset accumulator -------------------------------------------------------------------


def test_streaming_over_scenes_equals_per_scene_values():
    """Unimodal cells (one component by BIC, a closed form: no random initialisation), so a
    scene's values cannot depend on how scenes are packed into chunks."""
    rng = np.random.default_rng(5)
    scenes = []
    for n in (2, 5, 1, 3):
        pred = torch.tensor(rng.normal(size=(300, 12, n, 2)) * 0.3 + rng.normal(size=(1, 12, n, 2)))
        scenes.append((pred, torch.tensor(rng.normal(size=(12, n, 2)))))
    metrics = DistributionMetrics(chunk_cells=7, seed=1)
    for pred, gt in scenes:
        metrics.update(pred, gt)
    per_scene = metrics.per_scene()
    for i, (pred, gt) in enumerate(scenes):
        amd, amv = amd_amv(pred, gt)
        assert per_scene["amd"][i].item() == pytest.approx(amd.item(), rel=1e-12)
        assert per_scene["amv"][i].item() == pytest.approx(amv.item(), rel=1e-12)
        assert per_scene["kde_nll"][i].item() == pytest.approx(kde_nll(pred, gt).item(), rel=1e-12)
    totals = metrics.compute()
    assert totals["amd"] == pytest.approx(per_scene["amd"].mean().item())
    with pytest.raises(ValueError, match="at least one update"):
        DistributionMetrics().compute()


# --- float32 EM against float64 on the released weights' predictions ---------------------------


def _predicted_cells(checkpoints_root, data_root, split: str, cells_wanted: int):
    """K = 1000 predictions of the released weights on test scenes spread over the split:
    (cells [C, 1000, 2], ground truth [C, 2], cells per scene)."""
    from meanwise.trajectory.data import load_split
    from meanwise.trajectory.metrics import _cells
    from meanwise.trajectory.social_implicit import SocialImplicit

    model = SocialImplicit.from_official_checkpoint(checkpoints_root / split)
    scenes = load_split(split, "test", data_root)
    per_scene = sum(12 * s.num_pedestrians for s in scenes) / len(scenes)
    chosen = scenes[:: max(1, int(len(scenes) * per_scene / cells_wanted))]
    generator = torch.Generator().manual_seed(0)
    cells, gts, sizes = [], [], []
    with torch.no_grad():
        for scene in chosen:
            cells.append(_cells(model.predict(scene.observed, 1000, generator=generator)))
            gts.append(scene.future.reshape(-1, 2))
            sizes.append(cells[-1].shape[0])
    return torch.cat(cells), torch.cat(gts), sizes


@pytest.mark.slow
@pytest.mark.parametrize("split", ["eth", "hotel", "univ", "zara1", "zara2"])
def test_float32_em_keeps_the_float64_choice_on_the_five_test_splits(
    checkpoints_root, data_root, split
):
    """float32 EM only rejects component counts (winners and near-winners are refitted in
    float64), so on real predictions the chosen counts equal the float64 path's and AMD/AMV
    agree to rounding; and float32 and float64 fits of the same k end far closer in BIC than
    the margin that sends a fit to float64 (10 K tol = 10 at K = 1000)."""
    cells, gt, sizes = _predicted_cells(checkpoints_root, data_root, split, 1500)
    fast = select_gaussian_mixtures(cells, generator=torch.Generator().manual_seed(1))
    exact = select_gaussian_mixtures(
        cells, generator=torch.Generator().manual_seed(1), em_dtype=torch.float64
    )
    assert torch.equal(fast.n_components, exact.n_components)
    dist_fast, total_fast = mahalanobis_cells(fast, gt)
    dist_exact, total_exact = mahalanobis_cells(exact, gt)
    for a, b in ((dist_fast, dist_exact), (total_fast, total_exact)):
        per_scene_a = torch.stack([p.sum(0) for p in a.split(sizes)])
        per_scene_b = torch.stack([p.sum(0) for p in b.split(sizes)])
        assert torch.allclose(per_scene_a, per_scene_b, rtol=1e-9, atol=1e-12)
    margin = 10 * cells.shape[1] * 1e-3
    for k in (2, 3):
        fits = [
            fit_gaussian_mixtures(
                cells, k, generator=torch.Generator().manual_seed(2), em_dtype=dtype
            )
            for dtype in (torch.float32, torch.float64)
        ]
        gap = (fits[0].bic - fits[1].bic).abs().max().item()
        assert gap < margin / 4, f"k = {k}: float32 and float64 BIC {gap:.3g} apart"


def test_amd_amv_takes_samples_that_carry_autograd_history():
    """Predictions straight from a model require grad; the metric must not care."""
    from meanwise.trajectory.metrics import amd_amv

    g = torch.Generator().manual_seed(0)
    future = torch.randn(12, 3, 2, generator=g, dtype=torch.float64)
    pred = torch.randn(20, 12, 3, 2, generator=g, dtype=torch.float64)
    with_grad = pred.clone().requires_grad_(True)
    ours = amd_amv(with_grad, future, generator=torch.Generator().manual_seed(1))
    assert ours == amd_amv(pred, future, generator=torch.Generator().manual_seed(1))


def test_distribution_metrics_take_predictions_that_carry_a_graph():
    # a model's raw output (requires grad) gives the same numbers as its detached copy
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(50, 4, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
    gt = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    amd, amv = amd_amv(pred * 1.0, gt, generator=torch.Generator().manual_seed(0))
    ref = amd_amv(pred.detach(), gt, generator=torch.Generator().manual_seed(0))
    assert (amd.item(), amv.item()) == (ref[0].item(), ref[1].item())
    assert kde_nll(pred * 1.0, gt).item() == kde_nll(pred.detach(), gt).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_distribution_metrics_of_cuda_predictions_equal_the_cpu_ones():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(200, 4, 3, 2, generator=g, dtype=torch.float64)
    gt = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    cpu = DistributionMetrics(seed=0)
    cpu.update(pred, gt)
    cuda = DistributionMetrics(seed=0)
    cuda.update(pred.cuda(), gt.cuda())
    assert cuda.compute() == cpu.compute()
