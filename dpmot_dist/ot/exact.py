"""Exact cell masses and optimal potentials for the check models of DESIGN.md section 6.

Conventions (DESIGN.md section 2): targets ``y`` (N, D), offsets ``h`` (N,), Brenier potential
u_h(x) = max_i (<x, y_i> + h_i), cell W_i = {x : i attains the max} (ties: lowest index, a
measure-zero set except for identical (y_i, h_i) pairs), cell mass mu_i = mu(W_i).

- 1-D: the cells are the intervals of the upper envelope of the lines x y_i + h_i, so their
  masses are differences of the source CDF (Gaussian or uniform).
- 2-D, uniform source on a square: the cells are convex polygons, the square clipped by the
  half-planes <x, y_i - y_j> + h_i - h_j >= 0 (Sutherland-Hodgman), with areas by the
  shoelace formula.

Everything is numpy float64 and exact up to float rounding.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from dpmot_dist.errors import DpmotError

__all__ = [
    "cell_areas_2d_square",
    "cell_masses_1d_gaussian",
    "cell_masses_1d_uniform",
    "cell_polygons_2d_square",
    "optimal_h_1d_gaussian",
    "total_variation",
]


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _as_points(y: np.ndarray, D: int) -> np.ndarray:
    """Check and convert targets ``y`` to a finite float64 (N, D) array, N >= 1."""
    y = np.asarray(y, dtype=np.float64)
    if D == 1 and y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != D or y.shape[0] == 0:
        want = "(N,) or (N, 1)" if D == 1 else f"(N, {D})"
        raise DpmotError(f"targets y must have shape {want} with N >= 1, got {y.shape}")
    if not np.isfinite(y).all():
        raise DpmotError("targets y must be finite (no nan or inf)")
    return y


def _as_targets(y: np.ndarray, h: np.ndarray, D: int) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert ``y`` to (N, D) and ``h`` to (N,) finite float64 arrays."""
    y = _as_points(y, D)
    h = np.asarray(h, dtype=np.float64)
    if h.shape != (y.shape[0],):
        raise DpmotError(f"offsets h must have shape ({y.shape[0]},) to match y, got {h.shape}")
    if not np.isfinite(h).all():
        raise DpmotError("offsets h must be finite (no nan or inf)")
    return y, h


def _check_interval(lo: float, hi: float) -> None:
    """Raise unless ``lo < hi`` are finite."""
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise DpmotError(f"source interval needs finite lo < hi, got lo={lo}, hi={hi}")


# ---------------------------------------------------------------------------------------------
# 1-D: intervals of the upper envelope
# ---------------------------------------------------------------------------------------------


def _is_hidden(s: np.ndarray, c: np.ndarray, l: int, m: int, r: int) -> bool:
    """Whether line m (slope s_l < s_m < s_r) never strictly tops lines l and r.

    With x_lm = (c_l - c_m) / (s_m - s_l) the crossing of lines l and m, line m is hidden iff
    x_lm >= x_mr, written without division:
    (c_l - c_m)(s_r - s_m) >= (c_m - c_r)(s_m - s_l).
    """
    return (c[l] - c[m]) * (s[r] - s[m]) >= (c[m] - c[r]) * (s[m] - s[l])


def _upper_envelope(s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Indices of the lines x s_k + c_k on the upper envelope, for strictly increasing ``s``.

    The monotone-stack ("convex hull trick") scan: O(K) after sorting. Returns hull indices
    in increasing slope order, which is also the left-to-right order of their intervals.
    """
    hull: list[int] = []
    for k in range(len(s)):
        while len(hull) >= 2 and _is_hidden(s, c, hull[-2], hull[-1], k):
            hull.pop()
        hull.append(k)
    return np.asarray(hull, dtype=np.intp)


def _envelope_intervals_1d(y: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells [a_i, b_i] of the lines x y_i + h_i on the whole real line.

    y, h: (N,). Returns a, b: (N,), with a_i <= b_i, -inf / +inf at the ends, and
    a_i = b_i = 0 for lines that never attain the max (empty cells). Among equal slopes only
    the largest h can win, and among equal (y_i, h_i) only the lowest index.
    """
    N = len(y)
    order = np.lexsort((np.arange(N), -h, y))
    first = np.r_[True, np.diff(y[order]) != 0]
    kept = order[first]
    hull = kept[_upper_envelope(y[kept], h[kept])]
    x = (h[hull[:-1]] - h[hull[1:]]) / (y[hull[1:]] - y[hull[:-1]])
    x = np.maximum.accumulate(x)
    a = np.zeros(N)
    b = np.zeros(N)
    a[hull] = np.r_[-np.inf, x]
    b[hull] = np.r_[x, np.inf]
    return a, b


def _gaussian_interval_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Phi(b) - Phi(a) for a <= b, taken in the upper tail when a > 0 to keep precision."""
    upper = ndtr(-a) - ndtr(-b)
    lower = ndtr(b) - ndtr(a)
    return np.where(a > 0, upper, lower)


def cell_masses_1d_gaussian(y: np.ndarray, h: np.ndarray) -> np.ndarray:
    r"""Exact cell masses mu_i = Phi(b_i) - Phi(a_i) for the source N(0, 1).

    .. math:: \mu_i = \mu(W_i), \quad W_i = [a_i, b_i] = \{x : i = \arg\max_j x y_j + h_j\}

    y: (N,) or (N, 1) targets; h: (N,) offsets. Returns mu: (N,) float64, summing to 1;
    empty cells get exactly 0.
    """
    y, h = _as_targets(y, h, D=1)
    a, b = _envelope_intervals_1d(y[:, 0], h)
    return _gaussian_interval_mass(a, b)


def cell_masses_1d_uniform(
    y: np.ndarray, h: np.ndarray, lo: float = -0.5, hi: float = 0.5
) -> np.ndarray:
    r"""Exact cell masses for the uniform source on [lo, hi].

    .. math:: \mu_i = |[a_i, b_i] \cap [lo, hi]| / (hi - lo)

    y: (N,) or (N, 1) targets; h: (N,) offsets. Returns mu: (N,) float64, summing to 1.
    """
    y, h = _as_targets(y, h, D=1)
    _check_interval(lo, hi)
    a, b = _envelope_intervals_1d(y[:, 0], h)
    return (np.clip(b, lo, hi) - np.clip(a, lo, hi)) / (hi - lo)


# ---------------------------------------------------------------------------------------------
# 2-D: convex polygons clipped to the square
# ---------------------------------------------------------------------------------------------


def _clip_polygon(P: np.ndarray, s: np.ndarray) -> np.ndarray:
    """One Sutherland-Hodgman step: keep the part of convex polygon P where the affine s >= 0.

    P: (V, 2) vertices in order; s: (V,) values of the affine function at them. Each edge
    P_k -> P_{k+1} emits P_k if s_k >= 0, then the crossing P_k + t (P_{k+1} - P_k),
    t = s_k / (s_k - s_{k+1}), if the edge changes side. Returns (V', 2).
    """
    inside = s >= 0
    s_next = np.roll(s, -1)
    crosses = inside != np.roll(inside, -1)
    t = s / np.where(crosses, s - s_next, 1.0)
    X = P + t[:, None] * (np.roll(P, -1, axis=0) - P)
    candidates = np.stack([P, X], axis=1).reshape(-1, 2)
    keep = np.stack([inside, crosses], axis=1).reshape(-1)
    return candidates[keep]


def _power_cell(A: np.ndarray, c: np.ndarray, square: np.ndarray) -> np.ndarray:
    """The square clipped by the half-planes <x, A_j> + c_j >= 0, j = 1..M.

    A: (M, 2), c: (M,), square: (4, 2). Clips first by the most violated half-plane, and uses
    each half-plane at most once, so the loop ends after at most M steps; the half-planes
    that never cut the polygon cost one matrix product. Returns (V, 2), or (0, 2) when the
    cell is empty.
    """
    P = square
    unused = np.ones(len(c), dtype=bool)
    while len(P) >= 3 and unused.any():
        S = P @ A.T + c
        worst = np.where(unused, S.min(axis=0), np.inf)
        j = int(np.argmin(worst))
        if worst[j] >= 0:
            break
        P = _clip_polygon(P, S[:, j])
        unused[j] = False
    return P if len(P) >= 3 else np.empty((0, 2))


def _shoelace_area(P: np.ndarray) -> float:
    """Area of a simple polygon: 1/2 |sum_k x_k y_{k+1} - x_{k+1} y_k|. P: (V, 2)."""
    if len(P) < 3:
        return 0.0
    x, y = P[:, 0], P[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def cell_polygons_2d_square(
    y: np.ndarray, h: np.ndarray, lo: float = -0.5, hi: float = 0.5
) -> list[np.ndarray]:
    r"""Vertices of every cell W_i clipped to the square [lo, hi]^2.

    .. math:: W_i = [lo, hi]^2 \cap \bigcap_{j \ne i}
              \{x : \langle x, y_i - y_j \rangle + h_i - h_j \ge 0\}

    y: (N, 2) targets; h: (N,) offsets. Returns N arrays of shape (V_i, 2), counter-clockwise,
    (0, 2) for empty cells. A repeated (y_i, h_i) pair gives its cell to the lowest index.
    O(N^2) work.
    """
    y, h = _as_targets(y, h, D=2)
    _check_interval(lo, hi)
    square = np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]])
    polygons = []
    for i in range(len(h)):
        others = np.arange(len(h)) != i
        A, c = y[i] - y[others], h[i] - h[others]
        twin = (A == 0).all(axis=1) & (c == 0) & (np.flatnonzero(others) < i)
        polygons.append(np.empty((0, 2)) if twin.any() else _power_cell(A, c, square))
    return polygons


def cell_areas_2d_square(
    y: np.ndarray, h: np.ndarray, lo: float = -0.5, hi: float = 0.5
) -> np.ndarray:
    r"""Exact cell masses for the uniform source on the square [lo, hi]^2.

    .. math:: \mu_i = \operatorname{area}(W_i \cap [lo, hi]^2) / (hi - lo)^2

    y: (N, 2) targets; h: (N,) offsets. Returns mu: (N,) float64, summing to 1.
    """
    polygons = cell_polygons_2d_square(y, h, lo, hi)
    return np.array([_shoelace_area(P) for P in polygons]) / (hi - lo) ** 2


# ---------------------------------------------------------------------------------------------
# progress measure and closed-form optimum
# ---------------------------------------------------------------------------------------------


def total_variation(mu: np.ndarray, nu: np.ndarray) -> float:
    """TV = 1/2 sum_i |mu_i - nu_i|, the fraction of mass in the wrong cell. mu, nu: (N,)."""
    mu = np.asarray(mu, dtype=np.float64)
    nu = np.asarray(nu, dtype=np.float64)
    if mu.shape != nu.shape:
        raise DpmotError(f"mu and nu must have the same shape, got {mu.shape} and {nu.shape}")
    return 0.5 * float(np.abs(mu - nu).sum())


def _target_weights(nu: np.ndarray | None, N: int, tol: float) -> np.ndarray:
    """Check nu: (N,) positive with |sum nu - 1| <= tol (default uniform 1/N); renormalise."""
    if nu is None:
        return np.full(N, 1.0 / N)
    nu = np.asarray(nu, dtype=np.float64)
    if nu.shape != (N,):
        raise DpmotError(f"weights nu must have shape ({N},) to match y, got {nu.shape}")
    if not (np.isfinite(nu).all() and (nu > 0).all()):
        raise DpmotError("weights nu must be finite and strictly positive")
    if abs(nu.sum() - 1.0) > tol:
        raise DpmotError(f"weights nu must sum to 1 within tol={tol}, got sum {nu.sum()!r}")
    return nu / nu.sum()


def _gaussian_breakpoints(nu: np.ndarray) -> np.ndarray:
    """b_k = Phi^{-1}(nu_1 + ... + nu_k), k = 1..N-1, via the upper tail when past 1/2.

    nu: (N,) weights in target order. Returns b: (N-1,) non-decreasing.
    """
    below = np.cumsum(nu)[:-1]
    above = np.cumsum(nu[::-1])[::-1][1:]
    return np.where(below <= 0.5, ndtri(below), -ndtri(above))


def optimal_h_1d_gaussian(
    y: np.ndarray, nu: np.ndarray | None = None, tol: float = 1e-12
) -> np.ndarray:
    """The exact optimal potential h for the source N(0, 1): mu(W_i(h)) = nu_i for all i.

    With the targets sorted, y_(1) < ... < y_(N), the optimal cells are consecutive intervals
    with breakpoints b_k = Phi^{-1}(nu_(1) + ... + nu_(k)); continuity of u_h at b_k gives

    .. math:: h_{(k+1)} = h_{(k)} + b_k (y_{(k)} - y_{(k+1)}),

    and h is then centred, mean(h) = 0.

    y: (N,) or (N, 1) distinct targets; nu: (N,) positive weights summing to 1 within ``tol``
    (default uniform 1/N). Returns h: (N,) float64 in the original order of y.
    Raises ValueError (DpmotError) for repeated y values or bad weights.
    """
    y = _as_points(y, D=1)[:, 0]
    nu = _target_weights(nu, len(y), tol)
    order = np.argsort(y, kind="stable")
    y_sorted = y[order]
    if (np.diff(y_sorted) == 0).any():
        raise DpmotError("targets y must be distinct; merge repeated targets and add weights")
    b = _gaussian_breakpoints(nu[order])
    h_sorted = np.r_[0.0, np.cumsum(b * -np.diff(y_sorted))]
    h = np.empty_like(h_sorted)
    h[order] = h_sorted
    return h - h.mean()
