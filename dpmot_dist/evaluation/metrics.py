"""Sample-quality metrics: Fréchet distance (FID), MMD, sliced W2, mode mixture, memorisation.

Every function takes plain arrays (rows are samples, flattened to (B, D)) and returns floats
or small dicts, so that ``dpmot eval``, ``dpmot demo`` and ``dpmot bench quality`` share one
definition of each number.

- Fréchet distance between Gaussians (Dowson & Landau 1982; FID, Heusel et al. 2017)
  d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}), computed as pytorch-fid does.
- Mode mixture of a Gaussian mixture Σ π_c N(m_c, s_c² I): a sample is *mixed* when it lies
  outside every component's p-ball {x : ‖x − m_c‖² / s_c² ≤ χ²_D(p)}.
- Memorisation: the fraction of samples whose nearest training point is closer than the
  q-quantile (q = 1%) of the same distance for fresh draws of the data distribution.
- Classifier mode mixture (the DPM-OT paper's measure): a sample is mixed at threshold t when
  two or more classes get probability ≥ t.
- Label fidelity of class-conditional samples: the fraction the classifier assigns to their
  own label.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import linalg
from scipy.stats import chi2

log = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def _rows(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, np.float64)
    return x.reshape(len(x), -1)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ (D,), Σ (D, D)) of features (B, D) in float64: the mean and the unbiased covariance."""
    f = _rows(features)
    if len(f) < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    .. math::
        d^2 = \\|\\mu_1 - \\mu_2\\|^2 + \\operatorname{tr}(\\Sigma_1 + \\Sigma_2
              - 2 (\\Sigma_1 \\Sigma_2)^{1/2})

    As pytorch-fid: ``scipy.linalg.sqrtm`` of Σ₁Σ₂; when that is not finite (singular
    product) both covariances get ``eps`` I added; a complex square root whose diagonal has
    imaginary parts above 1e-3 is an error, smaller ones are dropped.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1, sigma2 = (
        np.atleast_2d(sigma1).astype(np.float64),
        np.atleast_2d(sigma2).astype(np.float64),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1),) * 2:
        raise ValueError(
            f"statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular product; adding %g to the diagonals", eps)
        offset = np.eye(len(mu1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return linalg.sqrtm(a)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (B, D)."""
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# ---------------------------------------------------------------------------------------------
# Distances between sample sets


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD² between samples x (n, D) and y (m, D) with k(a, b) = exp(−‖a−b‖²/(2ℓ²)).

    ℓ defaults to the median heuristic: the median pairwise distance of the pooled samples
    (Gretton et al. 2012).
    """
    x, y = torch.from_numpy(_rows(x)), torch.from_numpy(_rows(y))
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).square_()
    if bandwidth is None:
        iu = torch.triu_indices(len(z), len(z), 1)
        bandwidth = float(d2[iu[0], iu[1]].median().sqrt())
    k = torch.exp(-d2 / (2 * max(bandwidth, 1e-12) ** 2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def sliced_w2(x: np.ndarray, y: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt of the mean over random unit directions θ of
    W₂²(θᵀx, θᵀy), each 1-D W₂ from matched quantiles (Bonneel et al. 2015).

    x (n, D) and y (m, D); with n ≠ m both are compared at max(n, m) quantile levels.
    """
    x, y = _rows(x), _rows(y)
    theta = np.random.default_rng(seed).standard_normal((x.shape[1], projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    px, py = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
    if len(px) != len(py):
        q = (np.arange(max(len(px), len(py))) + 0.5) / max(len(px), len(py))
        px, py = (np.quantile(p, q, axis=0, method="inverted_cdf") for p in (px, py))
    return float(np.sqrt(np.mean((px - py) ** 2)))


# ---------------------------------------------------------------------------------------------
# Modes of a Gaussian mixture


def mahalanobis2(x: np.ndarray, means: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """‖x_b − m_c‖² / s_c² (B, C) for isotropic components."""
    x, means = torch.from_numpy(_rows(x)), torch.from_numpy(np.asarray(means, np.float64))
    d2 = torch.cdist(x, means).square_().numpy()
    return d2 / np.asarray(stds, np.float64)[None] ** 2


def mode_metrics(x: np.ndarray, mixture, p: float = 0.999) -> dict[str, float]:
    """Mode mixture and mode-weight error of samples x (B, D) under a mixture Σ π_c N(m_c, s_c² I).

    ``mode_mixture``: the fraction of samples outside every component's p-ball
    ‖x − m_c‖²/s_c² ≤ χ²_D(p). ``mode_weight_err``: TV = ½ Σ_c |ĥ_c − π_c| between the
    histogram ĥ of the non-mixed samples' nearest components and the weights π.
    ``mixture`` has ``means`` (C, D), ``stds`` (C,), ``weights`` (C,).
    """
    x = _rows(x)
    finite = np.isfinite(x).all(1)
    d2 = mahalanobis2(np.where(finite[:, None], x, 0.0), mixture.means, mixture.stds)
    inside = (d2 <= chi2.ppf(p, x.shape[1])) & finite[:, None]
    mixed = ~inside.any(1)
    nearest = d2.argmin(1)
    weights = np.asarray(mixture.weights, np.float64)
    hist = np.bincount(nearest[~mixed], minlength=len(weights)) / max((~mixed).sum(), 1)
    return {
        "mode_mixture": float(mixed.mean()),
        "mode_weight_err": 0.5 * float(np.abs(hist - weights).sum()),
    }


# ---------------------------------------------------------------------------------------------
# Memorisation


def nearest_distances(
    x: np.ndarray, targets: np.ndarray, *, exclude_self: bool = False, batch: int = 4096
) -> np.ndarray:
    """Euclidean distance of each row of x (B, D) to its nearest target (N, D): (B,) float64.

    Uses the package's search with h_i = −½‖y_i‖², since argmax ⟨x, y_i⟩ − ½‖y_i‖² is the
    nearest neighbour and ‖x − y‖² = ‖x‖² − 2 (⟨x, y⟩ − ½‖y‖²). ``exclude_self`` (x are the
    targets themselves) takes the second best: the leave-one-out distance.
    """
    from dpmot_dist.ot.search import TargetIndex

    x, y = _rows(x), _rows(targets)
    index = TargetIndex(y.astype(np.float32), backend="torch")
    h = -0.5 * (y.astype(np.float32).astype(np.float64) ** 2).sum(1)
    k = 2 if exclude_self else 1
    out = []
    for a in range(0, len(x), batch):
        xb = x[a : a + batch].astype(np.float32)
        values, _ = index.search(torch.from_numpy(xb), h, k=min(k, len(y)))
        best = values[:, -1].cpu().numpy() if exclude_self else values[:, 0].cpu().numpy()
        d2 = (xb.astype(np.float64) ** 2).sum(1) - 2 * best
        out.append(np.sqrt(np.maximum(d2, 0.0)))
    return np.concatenate(out) if out else np.empty(0)


def memorisation_rate(
    samples: np.ndarray,
    targets: np.ndarray,
    fresh: np.ndarray | None = None,
    q: float = 0.01,
) -> dict[str, float]:
    """Fraction of samples closer to their nearest target than the q-quantile of fresh draws'.

    ``fresh`` (M, D) are new draws of the data distribution; when None the targets' own
    leave-one-out nearest distances stand in for them (a held-out point's distance to the
    other N − 1). Returns ``memorisation`` and the ``threshold`` distance.
    """
    reference = (
        nearest_distances(targets, targets, exclude_self=True)
        if fresh is None
        else nearest_distances(fresh, targets)
    )
    threshold = float(np.quantile(reference, q))
    d = nearest_distances(samples, targets)
    return {"memorisation": float((d < threshold).mean()), "threshold": threshold}


# ---------------------------------------------------------------------------------------------
# Classifier mode mixture


def classifier_mixture(
    probs: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> dict[str, float]:
    """For each t: the fraction of rows of class probabilities (B, K) with ≥ 2 entries ≥ t."""
    p = np.asarray(probs, np.float64)
    return {f"{t:g}": float(((p >= t).sum(1) >= 2).mean()) for t in thresholds}


def label_fidelity(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The fraction of samples the classifier assigns to their own label, argmax_k p_k = y,
    overall and per class (keys: the labels present)."""
    hit = np.asarray(probs).argmax(1) == np.asarray(labels)
    per = {str(c): float(hit[labels == c].mean()) for c in np.unique(labels)}
    return {"label_fidelity": float(hit.mean()), "label_fidelity_per_class": per}


def classifier_probabilities(
    classifier, x: torch.Tensor, *, logits: bool = True, batch: int = 512
) -> np.ndarray:
    """Class probabilities (B, K) of a module called as ``classifier(x)``; softmax of its
    output when ``logits``."""
    out = []
    with torch.no_grad():
        for a in range(0, len(x), batch):
            y = classifier(x[a : a + batch]).float()
            out.append((torch.softmax(y, dim=1) if logits else y).cpu().numpy())
    return np.concatenate(out)
