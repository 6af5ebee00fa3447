"""Metrics against closed forms and independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmot_dist.diffusion.models import GaussianMixture
from dpmot_dist.evaluation import metrics


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def frechet_by_eigh(mu1, s1, mu2, s2) -> float:
    """Independent form: tr (Σ₁Σ₂)^{1/2} = tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} via eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    m = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr = np.sqrt(np.clip(m, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_matches_eigh_on_random_spd(rng, d):
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_frechet_closed_forms(rng):
    d = 8
    s = random_spd(rng, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    # same covariance: only the means count
    assert metrics.frechet_distance(m1, s, m2, s) == pytest.approx(((m1 - m2) ** 2).sum())
    # diagonal covariances: Σ (σ1 − σ2)² + ‖Δm‖²
    sd1, sd2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = ((sd1 - sd2) ** 2).sum() + ((m1 - m2) ** 2).sum()
    got = metrics.frechet_distance(m1, np.diag(sd1**2), m2, np.diag(sd2**2))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_singular_covariances_are_finite():
    d = 4
    s = np.zeros((d, d))
    s[0, 0] = 1.0
    assert metrics.frechet_distance(np.zeros(d), s, np.ones(d), s) == pytest.approx(d, abs=1e-4)


def test_fid_of_a_set_with_itself_and_a_shifted_copy(rng):
    f = rng.standard_normal((2000, 32)) @ rng.standard_normal((32, 32))
    assert abs(metrics.fid_from_features(f, f)) < 1e-6
    shift = rng.standard_normal(32)
    # a shifted copy has the same covariance: FID = ‖shift‖² exactly
    assert metrics.fid_from_features(f, f + shift) == pytest.approx((shift**2).sum(), rel=1e-6)


def test_feature_statistics_match_numpy(rng):
    f = rng.standard_normal((100, 3))
    mu, sigma = metrics.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.T))


def test_mmd_and_sliced_w2(rng):
    x = rng.standard_normal((500, 4))
    y = rng.standard_normal((500, 4))
    assert abs(metrics.mmd_rbf(x, y)) < 0.01
    assert metrics.mmd_rbf(x, y + 3) > 0.3
    assert metrics.sliced_w2(x, x) == 0.0
    # a shift by v moves every 1-D projection by θᵀv: E (θᵀv)² = ‖v‖²/D for θ uniform
    v = np.array([2.0, 0, 0, 0])
    assert metrics.sliced_w2(x, x + v, projections=4000) == pytest.approx(1.0, rel=0.05)
    assert metrics.sliced_w2(x, y[:300]) < 0.2


def _two_modes() -> GaussianMixture:
    return GaussianMixture(
        means=np.array([[0.0, 0.0], [1.0, 0.0]]), stds=np.array([0.01, 0.01]), weights=[0.5, 0.5]
    )


def test_mode_metrics_known_answers():
    mix = _two_modes()
    x = np.array([[0.0, 0.0], [0.0, 0.001], [1.0, 0.0], [0.5, 0.0]])  # last one between modes
    m = metrics.mode_metrics(x, mix)
    assert m["mode_mixture"] == 0.25
    # non-mixed: 2 in mode 0, 1 in mode 1 → histogram (2/3, 1/3), TV = 1/6
    assert m["mode_weight_err"] == pytest.approx(1 / 6)
    # 99.9% ball in 2-D: radius² = χ²₂(0.999) = −2 ln 0.001 ≈ 13.8, radius ≈ 3.72 stds
    edge = np.array([[0.0, 0.0365], [0.0, 0.0380]])
    assert metrics.mode_metrics(edge, mix)["mode_mixture"] == 0.5
    assert metrics.mode_metrics(np.array([[np.nan, 0.0]]), mix)["mode_mixture"] == 1.0


def test_mode_metrics_of_true_draws_is_small():
    mix = _two_modes()
    x = mix.sample(20000, torch.Generator().manual_seed(0)).numpy()
    m = metrics.mode_metrics(x, mix)
    assert m["mode_mixture"] == pytest.approx(0.001, abs=0.001)
    assert m["mode_weight_err"] < 0.02


def test_nearest_distances_against_brute_force(rng):
    y = rng.standard_normal((300, 5))
    x = rng.standard_normal((50, 5))
    want = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(metrics.nearest_distances(x, y), want, rtol=1e-4, atol=1e-4)
    d = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    loo = metrics.nearest_distances(y, y, exclude_self=True)
    np.testing.assert_allclose(loo, d.min(1), rtol=1e-4, atol=1e-4)


def test_memorisation_known_answers(rng):
    targets = rng.standard_normal((1000, 3))
    fresh = rng.standard_normal((2000, 3))
    copies = targets[:300] + 1e-4  # exact copies are memorised
    novel = rng.standard_normal((700, 3))  # fresh draws: about 1% fall under the 1% quantile
    m = metrics.memorisation_rate(np.concatenate([copies, novel]), targets, fresh)
    assert m["memorisation"] == pytest.approx(0.3 + 0.7 * 0.01, abs=0.01)
    loo = metrics.memorisation_rate(copies, targets)  # leave-one-out reference
    assert loo["memorisation"] == 1.0 and loo["threshold"] > 1e-3


def test_classifier_mixture():
    p = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [0.35, 0.35, 0.3], [1.0, 0.0, 0.0]])
    got = metrics.classifier_mixture(p, (0.1, 0.3, 0.4, 0.5))
    assert got == {"0.1": 0.5, "0.3": 0.5, "0.4": 0.25, "0.5": 0.25}
    logits = torch.log(torch.from_numpy(p).clamp_min(1e-12)).float()
    probs = metrics.classifier_probabilities(lambda x: x, logits)
    np.testing.assert_allclose(probs, p, atol=1e-6)
