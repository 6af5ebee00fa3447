"""Soft (entropic) assignments and iterate averaging (issue: sample-efficient SDOT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmot_dist.ot import exact
from dpmot_dist.ot.assign import LocalAssigner, assignment_from_topk
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.solver import SDOTSolver
from dpmot_dist.ot.sources import Source


def scores(b=500, n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    h = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    return x, y, h, x.double() @ y.double().T + h


def test_soft_gradient_tends_to_hard_as_epsilon_goes_to_zero():
    x, y, h, s = scores()
    v, i = TargetIndex(y).search(x, h, 8)
    hard = assignment_from_topk(v, i, 40, 4096, 0.0)
    errors = [
        np.abs(assignment_from_topk(v, i, 40, 4096, eps).counts - hard.counts).sum()
        for eps in (1.0, 0.1, 0.01, 1e-4)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-2 * errors[0] and errors[-1] < 1.0  # under one sample of 500
    u_hard = float(s.max(1).values.sum())
    u_soft = assignment_from_topk(v, i, 40, 4096, 1e-6).u_sum
    assert u_soft == pytest.approx(u_hard, abs=1e-3)


def test_topk_soft_equals_full_softmax_when_k_is_n():
    x, y, h, s = scores(n=12)
    eps = 0.5
    v, i = TargetIndex(y).search(x, h, 12)
    a = assignment_from_topk(v, i, 12, 4096, eps)
    full = torch.softmax(s / eps, dim=1).sum(0).numpy()
    np.testing.assert_allclose(a.counts, full, rtol=1e-10)
    u_full = float((eps * torch.logsumexp(s / eps, 1)).sum())
    assert a.u_sum == pytest.approx(u_full, rel=1e-12)
    assert a.dropped == 0.0


def test_truncation_reports_dropped_mass():
    x, y, h, _ = scores(n=200)
    v, i = TargetIndex(y).search(x, h, 4)
    a = assignment_from_topk(v, i, 200, 4096, 10.0)  # very soft: the top-4 drops a lot
    assert a.dropped > 0.1
    assert a.counts.sum() == pytest.approx(500)


@pytest.mark.parametrize("averaging", ["tail", "samples", "ema", "none"])
def test_averaging_keeps_the_exact_1d_optimum(averaging):
    y = np.random.default_rng(1).normal(size=(8, 1)).astype(np.float32)
    h_star = exact.optimal_h_1d_gaussian(y[:, 0].astype(float))
    asg = LocalAssigner(
        TargetIndex(y), Source(qmc=True), seed=0, chunk=65536
    )  # D = 1: default Sobol
    result = SDOTSolver(max_iters=300, patience=20, averaging=averaging).solve(asg)
    assert np.abs(result.h - h_star).max() < 0.1
    mu = exact.cell_masses_1d_gaussian(y[:, 0].astype(float), result.h)
    assert exact.total_variation(mu, np.full(8, 1 / 8)) < 0.02


def test_soft_solver_reaches_exact_1d_optimum():
    y = np.random.default_rng(1).normal(size=(8, 1)).astype(np.float32)
    asg = LocalAssigner(
        TargetIndex(y), Source(qmc=True), seed=0, chunk=65536
    )  # D = 1: default Sobol
    # Sobol batches keep ‖ĝ‖ improving for longer, so the stall rule (which ends the soft
    # phases) fires later than with Monte Carlo batches: 600 iterations
    result = SDOTSolver(max_iters=600, patience=20, epsilon=0.3, soft_k=4).solve(asg)
    assert result.metrics[0]["epsilon"] > 0 and result.metrics[-1]["epsilon"] == 0
    mu = exact.cell_masses_1d_gaussian(y[:, 0].astype(float), result.h)
    assert exact.total_variation(mu, np.full(8, 1 / 8)) < 0.02


def _direct_counts(assigner, h, key, samples):
    _, idx = assigner.stream_topk(h, key, samples, 1)
    return np.bincount(idx[:, 0].numpy(), minlength=assigner.n)


@pytest.mark.parametrize("pair", [True, False])
@pytest.mark.parametrize("lattice", [0, 16])
@pytest.mark.parametrize("shift", [0.01, 0.5])
def test_snapshot_counts_equal_a_direct_search_at_the_snapshot(shift, lattice, pair):
    """Both ways to the snapshot's cells agree with a direct search at h_s: the winners under
    h and h_s in one search (the compiled top-1 kernel), or the top-4 at h with the rows it
    cannot certify searched again."""
    rng = np.random.default_rng(2)
    y = rng.normal(size=(300, 6)).astype(np.float32)
    a = LocalAssigner(TargetIndex(y), Source(lattice=lattice), seed=4, chunk=1000)
    if pair and not a.top1_pair:
        pytest.skip("the compiled top-1 kernel is not built")
    a.top1_pair = pair
    h = rng.normal(scale=0.3, size=300)
    h_snap = h + rng.normal(scale=shift, size=300)
    r = a.assign_snapshot(h, h_snap, (0, 3), 5000, k=4)
    np.testing.assert_array_equal(r.counts, _direct_counts(a, h, (0, 3), 5000))
    np.testing.assert_array_equal(r.snap_counts, _direct_counts(a, h_snap, (0, 3), 5000))
    assert 0 < r.changed < 1
    if shift > 0.1 and not pair:
        assert r.researched > 0  # rows the top-4 could not certify were searched again


@pytest.mark.parametrize("pair", [True, False])
def test_snapshot_counts_on_ray_shards_equal_single_process(tmp_path, ray_local, pair):
    """Two shards and their reducer: from the shards' winners under h and h_s (``pair``), or
    from their top-k at h with the uncertified rows searched again on the shards."""
    from dpmot_dist.pipelines.shards import ShardPool

    rng = np.random.default_rng(3)
    y = rng.normal(size=(120, 5)).astype(np.float32)
    np.save(tmp_path / "y.npy", y)
    h, h_snap = rng.normal(scale=0.3, size=120), rng.normal(scale=0.3, size=120)
    single = LocalAssigner(TargetIndex(y), Source(), seed=1, chunk=512)
    pool = ShardPool.create(str(tmp_path / "y.npy"), workers=2, seed=1, chunk=512)
    try:
        if pair and not pool.top1_pair:
            pytest.skip("the compiled top-1 kernel is not built")
        pool._top1_pair = pair
        r = pool.assign_snapshot(h, h_snap, (0, 9), 3000, k=3)
    finally:
        pool.close()
    assert (r.researched > 0) != pair  # only the top-k path searches rows again
    np.testing.assert_array_equal(r.counts, _direct_counts(single, h, (0, 9), 3000))
    np.testing.assert_array_equal(r.snap_counts, _direct_counts(single, h_snap, (0, 9), 3000))
    direct = single.assign(h, (0, 9), 3000)
    assert r.u_sum == direct.u_sum  # the same exact scores, summed in the same order


@pytest.mark.parametrize("control_variate", ["snapshot", "none"])
def test_control_variate_keeps_the_exact_1d_optimum(control_variate):
    y = np.random.default_rng(1).normal(size=(16, 1))
    solver = SDOTSolver(max_iters=300, patience=20, control_variate=control_variate)
    asg = LocalAssigner(TargetIndex(y.astype(np.float32)), Source(qmc=True), 0, 65536)
    h = solver.solve(asg).h
    mu = exact.cell_masses_1d_gaussian(y[:, 0].astype(np.float32).astype(float), h)
    assert exact.total_variation(mu, np.full(16, 1 / 16)) <= 0.01
