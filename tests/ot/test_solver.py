"""The SDOT solver against exact answers (DESIGN §6): cell masses of the final h are computed
in closed form (1-D Gaussian source) or by exact polygon clipping (2-D uniform square)."""

from __future__ import annotations

import numpy as np
import pytest

from dpmot_dist.ot import exact
from dpmot_dist.ot.assign import LocalAssigner
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.solver import EVAL_STREAM, SDOTSolver, SolverState
from dpmot_dist.ot.sources import Source, default_qmc

FAST = {"max_iters": 300, "patience": 20}


def assigner(y, kind="gaussian", seed=0, chunk=65536, qmc=None):
    """The solver's default source for y's dimension (Sobol for D ≤ 16) unless ``qmc``."""
    y = np.asarray(y, np.float32)
    qmc = default_qmc(y.shape[1]) if qmc is None else qmc
    return LocalAssigner(TargetIndex(y), Source(kind=kind, qmc=qmc), seed=seed, chunk=chunk)


@pytest.mark.parametrize("seed", [1, 3])
def test_1d_gaussian_reaches_exact_tv(seed):
    y = np.random.default_rng(seed).normal(size=(16, 1))
    result = SDOTSolver(**FAST).solve(assigner(y))
    mu = exact.cell_masses_1d_gaussian(y[:, 0].astype(np.float32).astype(float), result.h)
    assert exact.total_variation(mu, np.full(16, 1 / 16)) <= 0.01
    assert np.abs(mu * 16 - 1).max() <= 0.05  # every cell, not only on average
    assert abs(result.h.mean()) < 1e-12


@pytest.mark.parametrize("weighted", [False, True])
def test_2d_uniform_square_reaches_exact_tv(weighted):
    rng = np.random.default_rng(1)
    y = rng.uniform(-0.5, 0.5, size=(32, 2)).astype(np.float32)
    nu = rng.uniform(0.5, 1.5, 32) if weighted else np.ones(32)
    nu /= nu.sum()
    result = SDOTSolver(**FAST).solve(assigner(y, "uniform"), nu)
    mu = exact.cell_areas_2d_square(y.astype(float), result.h)
    assert exact.total_variation(mu, nu) <= 0.02
    assert np.abs(mu / nu - 1).max() <= 0.10  # the worst cell, corners included


def test_symmetric_targets_have_zero_potential():
    y = np.concatenate([np.eye(4), -np.eye(4)])  # ±e_k: h = 0 is optimal by symmetry
    result = SDOTSolver(max_iters=150, patience=20).solve(assigner(y))
    assert np.abs(result.h).max() < 0.02
    start = SDOTSolver(max_iters=150, patience=20, lr=0.05)
    h = start.solve(assigner(y)).h
    assert np.abs(h).max() < 0.02


def test_solver_reduces_energy_and_tv():
    y = np.random.default_rng(5).normal(size=(200, 8))
    result = SDOTSolver(max_iters=100, eval_samples=200_000, log_every=1).solve(assigner(y))
    energies = [m["energy"] for m in result.metrics]
    assert energies[-1] < energies[0]
    assert result.evaluation["tv"] < result.metrics[0]["tv"] / 3
    keys = {"iter", "energy", "grad_l2", "tv", "max_rel_err", "empty_frac", "samples", "seconds"}
    assert keys <= set(result.metrics[0])


def test_resume_from_serialised_state_is_identical():
    y = np.random.default_rng(6).normal(size=(50, 3))
    solver = SDOTSolver(max_iters=40, patience=5)
    full = solver.solve(assigner(y))
    states = []
    half = SDOTSolver(max_iters=20, patience=5)
    half.solve(assigner(y), callback=lambda s, r: states.append(s))
    state = SolverState.from_bytes(states[-1].to_bytes())
    resumed = solver.solve(assigner(y), state=state)
    assert np.array_equal(full.h, resumed.h)
    assert np.array_equal(full.h_last, resumed.h_last)


def test_stall_grows_batch_and_decays_lr():
    y = np.random.default_rng(7).normal(size=(8, 2))
    result = SDOTSolver(max_iters=200, patience=5, max_growths=2, log_every=1).solve(assigner(y))
    lrs = sorted({m["lr"] for m in result.metrics}, reverse=True)
    batches = sorted({m["batch"] for m in result.metrics})
    assert len(lrs) == 3 and lrs[1] == pytest.approx(lrs[0] * 0.5)
    assert batches == [1024, 2048, 4096]


def test_tolerance_stops_early():
    y = np.concatenate([np.eye(2), -np.eye(2)])
    result = SDOTSolver(max_iters=500, tol_tv=0.05).solve(assigner(y))
    assert result.converged and result.iterations < 500


def test_qmc_source_is_more_accurate_than_mc():
    y = np.random.default_rng(8).normal(size=(10, 2))
    h = np.zeros(10)
    tvs = {}
    for qmc in (False, True):
        a = assigner(y, qmc=qmc, chunk=4096)
        mu_ref = a.assign(h, (EVAL_STREAM, 99), 1 << 20).cell_mass()
        errs = [
            np.abs(a.assign(h, (EVAL_STREAM, r), 4096).cell_mass() - mu_ref).sum() for r in range(8)
        ]
        tvs[qmc] = np.mean(errs)
    assert tvs[True] < tvs[False]


def test_averaging_options():
    y = np.random.default_rng(9).normal(size=(20, 2))
    for averaging in ("tail", "samples", "ema", "none"):
        r = SDOTSolver(max_iters=30, averaging=averaging).solve(assigner(y))
        assert np.isfinite(r.h).all() and abs(r.h.mean()) < 1e-12
    with pytest.raises(ValueError, match="averaging"):
        SDOTSolver(averaging="polyak")


def corner_problem(n: int = 32, weighted: bool = False):
    """Targets uniform in [−0.4, 0.4]² for the uniform source on [−½, ½]²: at h = 0 the
    corner cells hold many times their mass (the transient that outlasts Adam's memory)."""
    rng = np.random.default_rng(0)
    y = rng.uniform(-0.4, 0.4, size=(n, 2))
    nu = rng.uniform(0.5, 2.0, n) if weighted else np.ones(n)
    return y, nu / nu.sum()


def test_tol_rel_err_stops_when_every_cell_is_within_it():
    y, nu = corner_problem()
    result = SDOTSolver(tol_rel_err=0.05, check_every=25).solve(assigner(y, "uniform"), nu)
    assert result.converged and result.stop_reason == "tolerance"
    checks = [m["check"] for m in result.metrics if "check" in m]
    assert checks and checks[-1]["met"] and checks[-1]["max_rel_err"] <= 0.05
    mu = exact.cell_areas_2d_square(y, result.h)
    assert np.abs(mu / nu - 1).max() <= 0.08  # exact; the check measures with 4σ ≤ 5%


def test_default_fit_stops_by_itself_and_says_why():
    y, nu = corner_problem(weighted=True)
    result = SDOTSolver(eval_samples=1 << 16).solve(assigner(y, "uniform"), nu)
    assert result.converged and result.stop_reason == "converged" and result.iterations < 1000
    mu = exact.cell_areas_2d_square(y, result.h)
    assert exact.total_variation(mu, nu) <= 0.003 and np.abs(mu / nu - 1).max() <= 0.05
    capped = SDOTSolver(max_iters=20).solve(assigner(y, "uniform"), nu)
    assert not capped.converged and capped.stop_reason == "iteration cap"


def test_adam_forgets_the_transient_at_schedule_changes():
    """Without the reset the corner cell's step stays tiny (its second moment remembers the
    start): the reset fit ends with every cell closer to its mass than the one without."""
    y, nu = corner_problem()
    worst = {}
    for reset in ("phase", "none"):
        solver = SDOTSolver(adam_reset=reset, max_iters=500, patience=15, stop="cap")
        mu = exact.cell_areas_2d_square(y, solver.solve(assigner(y, "uniform"), nu).h)
        worst[reset] = np.abs(mu / nu - 1).max()
    assert worst["phase"] < 0.5 * worst["none"]


def test_evaluation_reports_the_worst_cell_and_grows_its_sample():
    y, nu = corner_problem()
    result = SDOTSolver(max_iters=300, eval_samples=4096).solve(assigner(y, "uniform"), nu)
    ev = result.evaluation
    assert ev["samples"] > 4096  # grown until its floor is at most a third of the TV
    assert ev["tv_noise_floor"] <= ev["tv"] / 3 or ev["tv_upper_bound"]
    assert 0 <= ev["worst_cell"] < 32 and ev["worst_cell_target"] == nu[ev["worst_cell"]]
    rel = ev["worst_cell_mass"] / ev["worst_cell_target"] - 1
    assert abs(rel) == pytest.approx(ev["max_rel_err"])


def test_control_variate_steps_aside_when_it_needs_too_many_searches():
    y = np.random.default_rng(4).normal(size=(40, 3))
    solver = SDOTSolver(max_iters=12, log_every=1, cv_refresh=1e-9, cv_research_max=1e-9)
    records = solver.solve(assigner(y)).metrics
    assert "cv_researched_share" in records[0]
    assert "cv_changed" not in records[-1]  # snapshots used up at once: it stepped aside
