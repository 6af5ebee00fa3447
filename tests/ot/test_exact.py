"""Exact cell masses checked against independent brute-force answers (argmax over targets)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from dpmot_dist.ot.exact import (
    cell_areas_2d_square,
    cell_masses_1d_gaussian,
    cell_masses_1d_uniform,
    cell_polygons_2d_square,
    optimal_h_1d_gaussian,
    total_variation,
)

# ---------------------------------------------------------------------------------------------
# helpers: small problems and brute-force answers that never look at the cell geometry
# ---------------------------------------------------------------------------------------------


def make_problem(
    N: int, D: int, seed: int, centre: float = 0.0, y_scale: float = 1.0, h_noise: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Targets y = centre + y_scale * N(0, I_D): (N, D); h = -|y|^2 / 2 + h_noise * N(0, 1): (N,).

    h_noise = 0 gives the Voronoi cells of the targets (mostly non-empty); a large h_noise
    leaves many targets off the envelope (empty cells).
    """
    rng = np.random.default_rng(seed)
    y = centre + y_scale * rng.standard_normal((N, D))
    return y, -0.5 * (y**2).sum(axis=1) + h_noise * rng.standard_normal(N)


def argmax_counts(x: np.ndarray, y: np.ndarray, h: np.ndarray, block: int = 250_000) -> np.ndarray:
    """counts_i = #{x_b : i = argmax_j <x_b, y_j> + h_j} (lowest index on ties). x: (B, D)."""
    counts = np.zeros(len(h), dtype=np.int64)
    for start in range(0, len(x), block):
        winner = np.argmax(x[start : start + block] @ y.T + h, axis=1)
        counts += np.bincount(winner, minlength=len(h))
    return counts


def assert_within_mc_error(mu: np.ndarray, counts: np.ndarray, n_sigma: float = 5.0) -> None:
    """|mu_i - counts_i / B| <= n_sigma * sqrt(mu_i (1 - mu_i) / B) for every cell."""
    B = counts.sum()
    se = np.sqrt(mu * (1 - mu) / B)
    np.testing.assert_array_less(np.abs(mu - counts / B), n_sigma * se + 1e-12)


def midpoint_grid(lo: float, hi: float, n: int) -> tuple[np.ndarray, float]:
    """Midpoints of n equal sub-intervals of [lo, hi]: (n,), and their width."""
    dx = (hi - lo) / n
    return lo + dx * (np.arange(n) + 0.5), dx


# ---------------------------------------------------------------------------------------------
# 1-D, Gaussian source
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("N", "seed", "h_noise"), [(1, 0, 1e-3), (5, 1, 1e-3), (40, 2, 3.0)])
def test_gaussian_masses_sum_to_one(N: int, seed: int, h_noise: float) -> None:
    y, h = make_problem(N, 1, seed, h_noise=h_noise)
    mu = cell_masses_1d_gaussian(y, h)
    assert mu.shape == (N,)
    assert (mu >= 0).all()
    assert mu.sum() == pytest.approx(1.0, abs=1e-14)


def test_gaussian_masses_accept_flat_targets() -> None:
    y, h = make_problem(6, 1, 3)
    np.testing.assert_array_equal(
        cell_masses_1d_gaussian(y[:, 0], h), cell_masses_1d_gaussian(y, h)
    )


@pytest.mark.parametrize(("N", "seed", "h_noise"), [(7, 4, 1e-3), (25, 5, 1e-3), (25, 5, 3.0)])
def test_gaussian_masses_match_monte_carlo(N: int, seed: int, h_noise: float) -> None:
    y, h = make_problem(N, 1, seed, h_noise=h_noise)
    x = np.random.default_rng(seed + 100).standard_normal((2_000_000, 1))
    assert_within_mc_error(cell_masses_1d_gaussian(y, h), argmax_counts(x, y, h))


@pytest.mark.parametrize(("N", "seed", "h_noise"), [(7, 6, 1e-3), (30, 7, 1e-3), (30, 7, 3.0)])
def test_gaussian_masses_match_grid_integration(N: int, seed: int, h_noise: float) -> None:
    y, h = make_problem(N, 1, seed, h_noise=h_noise)
    x, dx = midpoint_grid(-9.0, 9.0, 900_000)
    density = np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi) * dx
    winner = np.argmax(np.outer(x, y[:, 0]) + h, axis=1)
    mu_grid = np.bincount(winner, weights=density, minlength=N)
    np.testing.assert_allclose(cell_masses_1d_gaussian(y, h), mu_grid, atol=2e-5, rtol=0)


def test_gaussian_equal_slopes_keep_largest_offset_then_lowest_index() -> None:
    y = np.array([0.5, 0.5, -1.0, 0.5])
    h = np.array([0.0, 1.0, 0.0, 1.0])
    x_star = -2.0 / 3.0  # -x = 0.5 x + 1
    expected = np.array([0.0, 1.0 - ndtr(x_star), ndtr(x_star), 0.0])
    np.testing.assert_allclose(cell_masses_1d_gaussian(y, h), expected, rtol=1e-14, atol=0)


def test_gaussian_identical_targets_give_cell_to_lowest_index() -> None:
    mu = cell_masses_1d_gaussian(np.array([1.0, 1.0, 1.0]), np.array([0.2, 0.2, 0.2]))
    np.testing.assert_array_equal(mu, [1.0, 0.0, 0.0])


def test_gaussian_single_target_gets_all_mass() -> None:
    np.testing.assert_array_equal(cell_masses_1d_gaussian(np.array([3.0]), np.array([-7.0])), [1.0])


def test_gaussian_empty_cell_inside_hull() -> None:
    mu = cell_masses_1d_gaussian(np.array([-1.0, 0.0, 1.0]), np.array([0.0, -10.0, 0.0]))
    assert mu[1] == 0.0
    np.testing.assert_allclose(mu, [0.5, 0.0, 0.5], rtol=1e-15)


def test_gaussian_far_tail_cell_keeps_relative_precision() -> None:
    mu = cell_masses_1d_gaussian(np.array([0.0, 1.0]), np.array([0.0, -10.0]))
    assert mu[1] == pytest.approx(ndtr(-10.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 1-D, uniform source
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(-0.5, 0.5), (-1.0, 2.0)])
def test_uniform_masses_sum_to_one_and_match_monte_carlo(lo: float, hi: float) -> None:
    y, h = make_problem(9, 1, 8, centre=(lo + hi) / 2, y_scale=0.3 * (hi - lo))
    mu = cell_masses_1d_uniform(y, h, lo, hi)
    assert mu.sum() == pytest.approx(1.0, abs=1e-14)
    x = np.random.default_rng(9).uniform(lo, hi, size=(2_000_000, 1))
    assert_within_mc_error(mu, argmax_counts(x, y, h))


@pytest.mark.parametrize(("lo", "hi"), [(-0.5, 0.5), (-1.0, 2.0)])
def test_uniform_masses_match_grid_integration(lo: float, hi: float) -> None:
    y, h = make_problem(12, 1, 10, centre=(lo + hi) / 2, y_scale=0.3 * (hi - lo))
    x, dx = midpoint_grid(lo, hi, 500_000)
    winner = np.argmax(np.outer(x, y[:, 0]) + h, axis=1)
    mu_grid = np.bincount(winner, minlength=len(h)) * dx / (hi - lo)
    np.testing.assert_allclose(cell_masses_1d_uniform(y, h, lo, hi), mu_grid, atol=1e-5, rtol=0)


def test_uniform_cell_outside_interval_is_empty() -> None:
    y, h = np.array([0.0, 10.0]), np.array([0.0, -20.0])  # line 1 wins only for x > 2
    np.testing.assert_array_equal(cell_masses_1d_uniform(y, h), [1.0, 0.0])
    assert cell_masses_1d_gaussian(y, h)[1] == pytest.approx(ndtr(-2.0), rel=1e-12)


def test_uniform_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        cell_masses_1d_uniform(np.array([0.0, 1.0]), np.zeros(2), lo=1.0, hi=0.0)


# ---------------------------------------------------------------------------------------------
# 2-D, uniform source on a square
# ---------------------------------------------------------------------------------------------


def raster_areas(y: np.ndarray, h: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Cell masses from the argmax at the n x n pixel centres (t_c, t_r) of [lo, hi]^2: (N,).

    The score t_c y_i1 + t_r y_i2 + h_i is separable, so it is summed from two (n, N) tables.
    """
    t, _ = midpoint_grid(lo, hi, n)
    across, up = np.outer(t, y[:, 0]), np.outer(t, y[:, 1]) + h
    counts = np.zeros(len(h), dtype=np.int64)
    for rows in np.array_split(up, 40):
        winner = np.argmax(rows[:, None, :] + across[None, :, :], axis=-1)
        counts += np.bincount(winner.ravel(), minlength=len(h))
    return counts / n**2


@pytest.mark.parametrize(("N", "seed", "lo", "hi"), [(1, 11, -0.5, 0.5), (12, 12, -0.5, 0.5)])
def test_square_areas_sum_to_one(N: int, seed: int, lo: float, hi: float) -> None:
    y, h = make_problem(N, 2, seed, centre=(lo + hi) / 2, y_scale=0.3 * (hi - lo))
    mu = cell_areas_2d_square(y, h, lo, hi)
    assert mu.shape == (N,)
    assert (mu >= 0).all()
    assert mu.sum() == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize(("N", "seed", "lo", "hi"), [(8, 13, -0.5, 0.5), (15, 14, -1.0, 2.0)])
def test_square_areas_match_rasterisation(N: int, seed: int, lo: float, hi: float) -> None:
    y, h = make_problem(N, 2, seed, centre=(lo + hi) / 2, y_scale=0.3 * (hi - lo))
    mu = cell_areas_2d_square(y, h, lo, hi)
    np.testing.assert_allclose(mu, raster_areas(y, h, lo, hi, 2000), atol=2e-5, rtol=0)


def test_square_many_cells_sum_to_one() -> None:
    y, h = make_problem(300, 2, 15, y_scale=0.3)
    mu = cell_areas_2d_square(y, h)
    assert mu.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "y",
    [
        np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 0.3,
        np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
    ],
    ids=["corners", "axes"],
)
def test_square_symmetric_targets_split_evenly(y: np.ndarray) -> None:
    np.testing.assert_allclose(cell_areas_2d_square(y, np.zeros(4)), 0.25, rtol=1e-13)


def test_square_polygons_are_quadrants_for_corner_targets() -> None:
    y = np.array([[1.0, 1.0], [-1.0, -1.0]])
    polygons = cell_polygons_2d_square(y, np.zeros(2), lo=-1.0, hi=1.0)
    upper = {tuple(v) for v in np.round(polygons[0], 12)}
    assert upper == {(1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)}
    for P in polygons:
        assert P.shape[1] == 2
        signed = 0.5 * np.sum(P[:, 0] * np.roll(P[:, 1], -1) - np.roll(P[:, 0], -1) * P[:, 1])
        assert signed > 0  # counter-clockwise


def test_square_empty_cell_inside_hull() -> None:
    y = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])
    h = np.array([0.0, 0.0, 0.0, 0.0, -10.0])
    mu = cell_areas_2d_square(y, h)
    assert mu[4] == 0.0
    assert cell_polygons_2d_square(y, h)[4].shape == (0, 2)
    np.testing.assert_allclose(mu[:4], 0.25, rtol=1e-13)


def test_square_identical_targets_give_cell_to_lowest_index() -> None:
    y = np.array([[0.3, 0.1], [-0.2, 0.4], [0.3, 0.1]])
    h = np.array([0.05, 0.0, 0.05])
    mu = cell_areas_2d_square(y, h)
    assert mu[2] == 0.0
    # one straight edge: the raster error is up to about edge length * pixel width
    np.testing.assert_allclose(mu, raster_areas(y, h, -0.5, 0.5, 1000), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# total variation and the closed-form 1-D optimum
# ---------------------------------------------------------------------------------------------


def test_total_variation_known_values() -> None:
    assert total_variation(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0.0
    assert total_variation(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0
    assert total_variation(np.array([0.2, 0.3, 0.5]), np.array([0.3, 0.3, 0.4])) == pytest.approx(
        0.1, abs=1e-15
    )
    with pytest.raises(ValueError, match="same shape"):
        total_variation(np.ones(2) / 2, np.ones(3) / 3)


@pytest.mark.parametrize("N", [1, 2, 10, 200])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform_nu", "dirichlet_nu"])
def test_optimal_h_1d_gaussian_equalises_masses(N: int, uniform: bool) -> None:
    rng = np.random.default_rng(N)
    y = rng.permutation(np.linspace(-3.0, 3.0, N) + 0.01 * rng.standard_normal(N))
    nu = None if uniform else rng.dirichlet(np.ones(N))
    h = optimal_h_1d_gaussian(y, nu)
    assert h.shape == (N,)
    assert abs(h.mean()) < 1e-12
    want = np.full(N, 1.0 / N) if nu is None else nu
    np.testing.assert_allclose(cell_masses_1d_gaussian(y, h), want, atol=1e-9, rtol=0)


def test_optimal_h_1d_gaussian_matches_monte_carlo() -> None:
    rng = np.random.default_rng(16)
    y, nu = rng.standard_normal(6), rng.dirichlet(np.ones(6))
    h = optimal_h_1d_gaussian(y, nu)
    x = rng.standard_normal((2_000_000, 1))
    assert_within_mc_error(nu, argmax_counts(x, y[:, None], h))


def test_optimal_h_1d_gaussian_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="distinct"):
        optimal_h_1d_gaussian(np.array([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        optimal_h_1d_gaussian(np.array([0.0, 1.0]), np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="positive"):
        optimal_h_1d_gaussian(np.array([0.0, 1.0]), np.array([1.0, 0.0]))
