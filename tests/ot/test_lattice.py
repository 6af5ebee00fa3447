"""Lattice points in random subspaces: exact Gaussian marginals, exact search, less variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpmot_dist.benchmarks.solver import clustered
from dpmot_dist.ot.assign import LocalAssigner, stream_points
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.sources import Lattice, Source, sphere_lattice


@pytest.mark.parametrize("rank", [2, 3])
def test_sphere_lattice_is_unit_and_balanced(rank):
    c = sphere_lattice(64, rank)
    assert c.shape == (64, rank)
    assert torch.allclose(c.norm(dim=1), torch.ones(64, dtype=torch.float64))
    assert c.mean(0).abs().max() < 0.02  # evenly spread: centred


@pytest.mark.parametrize("rank", [2, 3])
def test_lattice_points_are_standard_gaussian(rank):
    src = Source(lattice=16, lattice_rank=rank)
    lat = src.draw(3000, 6, 0, 1, 2)
    subspaces = 3000 // rank
    assert isinstance(lat, Lattice) and lat.projections == 3000 and len(lat) == subspaces * 16
    eye = torch.eye(rank).expand(subspaces, -1, -1)
    assert torch.allclose(lat.q @ lat.q.transpose(1, 2), eye, atol=1e-5)
    x = lat.points().double()
    # each point is N(0, I_6): mean 0, covariance I (16,000 correlated points, ≥ 1,000 indep.)
    assert x.mean(0).abs().max() < 0.1
    assert (torch.cov(x.T) - torch.eye(6, dtype=torch.float64)).abs().max() < 0.1
    # the radius is χ_6 and the direction uniform: P(|x|² ≤ 6) = P(χ²_6 ≤ 6) = 0.5768
    assert abs(float((x.pow(2).sum(1) <= 6).double().mean()) - 0.5768) < 0.02
    # the same stream gives the same points; the batch's explicit points are sample()'s
    assert torch.equal(src.sample(3000, 6, 0, 1, 2), lat.points())
    subspaces_of_10 = 4 if rank == 3 else 5
    assert src.projections(10) == subspaces_of_10 * rank
    assert src.points_per_batch(10) == subspaces_of_10 * 16


def test_lattice_options_are_checked():
    with pytest.raises(ValueError, match="Gaussian source without qmc"):
        Source(kind="uniform", lattice=8)
    with pytest.raises(ValueError, match="Gaussian source without qmc"):
        Source(qmc=True, lattice=8)
    with pytest.raises(ValueError, match="rank 2 or 3"):
        Source(lattice=8, lattice_rank=4)
    with pytest.raises(ValueError, match="needs D ≥ 3"):
        Source(lattice=8).draw(10, 2, 0)


@pytest.mark.parametrize(
    "backend, dtype, fused",
    [
        ("torch", "float32", True),
        ("faiss", "float32", True),
        ("torch", "bfloat16", True),
        ("torch", "float32", False),  # the torch path (no numba, or not on a CPU)
        ("torch", "bfloat16", False),
    ],
)
@pytest.mark.parametrize("k", [1, 4])
def test_search_lattice_equals_search_of_explicit_points(backend, dtype, fused, k):
    y = clustered(700, 24, 5, 0)
    h = np.random.default_rng(1).normal(scale=0.5, size=700)
    index = TargetIndex(y, backend=backend, storage_dtype=dtype, tile=256)
    if fused and not index._fused_cpu:
        pytest.skip("numba is not installed")
    index._fused_cpu = fused
    lat = Source(lattice=64).draw(300, 24, 0, 3)
    v1, i1 = index.search_lattice(lat, h, k)
    explicit = TargetIndex(y, backend="torch")
    explicit._fused_cpu = fused
    v2, i2 = explicit.search(lat.points(), h, k)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)


def test_fused_cpu_and_torch_paths_find_the_same_top_k():
    y = clustered(500, 16, 5, 3)
    h = np.random.default_rng(2).normal(scale=0.5, size=500)
    lat = Source(lattice=32).draw(120, 16, 0, 4)
    fused, plain = TargetIndex(y, tile=128), TargetIndex(y, tile=128)
    if not fused._fused_cpu:
        pytest.skip("numba is not installed")
    plain._fused_cpu = False
    for k in (1, 3):
        i1 = fused.search_lattice(lat, h, k)[1]
        assert torch.equal(i1, plain.search_lattice(lat, h, k)[1])
        x = lat.points()
        assert torch.equal(fused.search(x, h, k)[1], plain.search(x, h, k)[1])
        exact = torch.from_numpy(x.double().numpy() @ y.astype(np.float64).T + h)
        assert torch.equal(i1[:, 0], exact.argmax(1))


def test_sharded_lattice_search_merges_to_the_single_index():
    from dpmot_dist.pipelines.shards import merge_shards

    y = clustered(500, 20, 4, 2)
    h = np.random.default_rng(0).normal(scale=0.3, size=500)
    lat = Source(lattice=32, lattice_rank=2).draw(200, 20, 5)
    whole = TargetIndex(y).search_lattice(lat, h, 1)
    parts = [
        tuple(
            t.numpy()
            for t in TargetIndex(y[a:b], offset=a).search_lattice(lat, torch.tensor(h[a:b]), 1)
        )
        for a, b in ((0, 170), (170, 333), (333, 500))
    ]
    v, i = merge_shards(parts, 1)
    assert np.array_equal(i, whole[1].numpy()) and np.array_equal(v, whole[0].numpy())


def test_stream_rows_regenerates_lattice_points():
    y = clustered(100, 16, 3, 0)
    a = LocalAssigner(TargetIndex(y), Source(lattice=8), seed=4, chunk=30)
    key, samples = (0, 7), 100  # micro-batches of 30, 30, 30, 10 projections
    every = torch.cat([b.points() for b in stream_points(a.source, 4, key, samples, 30, 16)])
    assert len(every) == 3 * 10 * 8 + 4 * 8
    rows = torch.tensor([0, 79, 80, 239, 240, len(every) - 1])
    assert torch.equal(a.stream_rows(key, samples, rows), every[rows])


def test_lattice_counts_are_unbiased_with_less_variance():
    """Cell masses of 20 clustered targets in D = 12 at h = 0: the lattice estimate is unbiased
    (its mean matches a large independent sample) and, at equal projections, has several times
    less variance than independent points."""
    y = clustered(20, 12, 4, 3)
    h = np.zeros(20)
    index = TargetIndex(y)
    plain = LocalAssigner(index, Source(), seed=0, chunk=1 << 16)
    truth = plain.assign(h, (9,), 1 << 20).cell_mass()
    lattice = LocalAssigner(index, Source(lattice=64), seed=0, chunk=1 << 16)
    per_rep = 600
    lat = np.stack([lattice.assign(h, (1, r), per_rep).cell_mass() for r in range(60)])
    ind = np.stack([plain.assign(h, (1, r), per_rep).cell_mass() for r in range(60)])
    se = np.sqrt(lat.var(0) / 60 + truth * (1 - truth) / (1 << 20))
    assert np.all(np.abs(lat.mean(0) - truth) < 5 * se + 1e-4)
    gain = ind.var(0).sum() / lat.var(0).sum()
    assert gain > 2.0, gain


def test_solver_with_lattice_source_counts_projections():
    from dpmot_dist.ot.solver import SDOTSolver

    y = clustered(50, 20, 3, 1)
    a = LocalAssigner(TargetIndex(y), Source(lattice=16), seed=0, chunk=4096)
    res = SDOTSolver(max_iters=5, min_batch=300, eval_samples=3000).solve(a)
    rec = res.metrics[0]
    assert rec["batch"] == 300 and rec["points"] == 100 * 16
    assert res.samples == 5 * 300
    # the floor of 3,000 projections: Σ_i sqrt(ν_i (1 − ν_i) / (2π B)), ν_i = 1/50
    floor = 50 * math.sqrt((1 / 50) * (49 / 50) / (2 * math.pi * 3000))
    assert res.evaluation["tv_noise_floor"] == pytest.approx(floor)


def test_default_source_refuses_a_lattice_wider_than_the_targets():
    from dpmot_dist.ot.sources import default_source

    assert default_source("gaussian", 2).lattice == 0  # the default never asks for one
    with pytest.raises(ValueError, match="lattice rank 3 needs D ≥ 3, got D = 2"):
        default_source("gaussian", 2, lattice=64)
