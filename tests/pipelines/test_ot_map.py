"""The OT map: copy = brute-force argmax; interp never crosses a singularity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpmot_dist.diffusion.samplers import prior_points
from dpmot_dist.io import datasets, storage
from dpmot_dist.ot.sources import Source
from dpmot_dist.pipelines.ot_map import (
    MapPlan,
    TargetRows,
    choose_partners,
    mapped_points,
    normal_cosines,
    plan_map,
)
from dpmot_dist.pipelines.shards import ShardPool


def write_npy(tmp_path, y: np.ndarray) -> str:
    uri = str(tmp_path / "targets.npy")
    storage.save_npy(uri, y.astype(np.float32))
    return uri


def two_clusters(rng, n: int = 200, d: int = 4, gap: float = 10.0) -> np.ndarray:
    """n targets, half around +gap·e_1 and half around −gap·e_1 (spread 0.3)."""
    centre = np.zeros(d)
    centre[0] = gap
    y = rng.normal(scale=0.3, size=(n, d))
    y[: n // 2] += centre
    y[n // 2 :] -= centre
    return y


@pytest.mark.parametrize("source", ["gaussian", "uniform"])
def test_copy_is_the_bruteforce_argmax(tmp_path, rng, source):
    y = rng.normal(size=(300, 5)).astype(np.float32)
    h = rng.normal(scale=0.5, size=300)
    pool = ShardPool.create(write_npy(tmp_path, y), workers=0, backend="torch")
    ids = np.arange(500)
    plan, rows = plan_map(pool, h, ids, seed=3, mode="copy", source=Source(kind=source), batch=128)
    x = prior_points(Source(kind=source), 3, ids, 5).double().numpy()
    np.testing.assert_array_equal(plan.ot_index, np.argmax(x @ y.T.astype(np.float64) + h, 1))
    assert rows is None and (plan.partner == -1).all() and (plan.weight == 0).all()


def test_interp_never_mixes_well_separated_modes(tmp_path, rng):
    y = two_clusters(rng)
    uri = write_npy(tmp_path, y)
    pool = ShardPool.create(uri, workers=0, backend="torch")
    plan, rows = plan_map(
        pool,
        np.zeros(len(y)),
        np.arange(2000),
        seed=0,
        mode="interp",
        k=8,
        angle=20.0,
        targets_uri=uri,
    )
    x = mapped_points(plan, rows)
    centre = np.array([10.0, 0.0, 0.0, 0.0])
    dist = np.minimum(np.linalg.norm(x - centre, axis=1), np.linalg.norm(x + centre, axis=1))
    assert dist.max() < 2.0  # every output sits in one cluster (the gap is 20)
    side = np.sign(x[:, 0])
    np.testing.assert_array_equal(side, np.sign(y[plan.ot_index, 0]))
    mixed = plan.partner >= 0
    assert mixed.mean() > 0.5  # the map did interpolate, inside the clusters
    np.testing.assert_array_equal(np.sign(y[plan.partner[mixed], 0]), side[mixed])
    assert (plan.weight[mixed] > 0).all() and (plan.weight <= 0.5).all()
    # Near the singularity between the clusters the top-k holds both; none is ever paired.
    assert (np.sign(y[plan.ot_index, 0]) != np.sign(y[plan.partner.clip(0), 0]))[mixed].sum() == 0


def test_interp_without_admissible_neighbour_copies(tmp_path, rng):
    y = two_clusters(rng, n=20)
    uri = write_npy(tmp_path, y)
    pool = ShardPool.create(uri, workers=0, backend="torch")
    plan, rows = plan_map(
        pool,
        np.zeros(20),
        np.arange(50),
        seed=0,
        mode="interp",
        k=4,
        angle=1e-3,
        targets_uri=uri,
    )
    assert (plan.partner == -1).all()
    np.testing.assert_array_equal(mapped_points(plan, rows), y[plan.ot_index].astype(np.float32))


def test_normal_cosines_and_partner_choice():
    y_win = np.array([[1.0, 0.0], [0.0, 2.0]])
    y_nb = np.array([[[1.0, 0.1], [-1.0, 0.0]], [[0.0, 2.0], [3.0, 0.0]]])
    n = lambda v: np.append(v, -1.0) / np.linalg.norm(np.append(v, -1.0))  # noqa: E731
    expect = [[n(y_win[b]) @ n(y_nb[b, j]) for j in range(2)] for b in range(2)]
    cos = normal_cosines(y_win, y_nb)
    np.testing.assert_allclose(cos, expect, atol=1e-12)
    neighbours = np.array([[5, 6], [7, 8]])
    partner, weight = choose_partners(
        cos, neighbours, 30.0, np.array([0.99, 0.2]), np.array([0.5, 0.5]), 0.4
    )
    assert cos[0, 1] < math.cos(math.radians(30)) < cos[0, 0]
    np.testing.assert_array_equal(partner, [5, 7])
    np.testing.assert_allclose(weight, [0.2, 0.2])


def test_plan_is_a_function_of_seed_and_sample_id(tmp_path, rng):
    y = two_clusters(rng, n=60)
    uri = write_npy(tmp_path, y)
    pool = ShardPool.create(uri, workers=0, backend="torch")
    kw = {"seed": 5, "mode": "interp", "k": 6, "angle": 30.0, "targets_uri": uri}
    full, _ = plan_map(pool, np.zeros(60), np.arange(1500), batch=700, **kw)
    part, _ = plan_map(pool, np.zeros(60), np.arange(1100, 1300), **kw)
    for name in ("ot_index", "partner", "weight"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name)[1100:1300])


def test_gather_reads_rows_across_parts(tmp_path, rng):
    y = rng.normal(size=(97, 3)).astype(np.float32)
    uri = str(tmp_path / "targets")
    datasets.write_targets(uri, y, rows_per_part=10)
    idx = np.array([96, 0, 11, 11, 50, 9, 10])
    rows = TargetRows.gather(uri, idx)
    np.testing.assert_array_equal(rows.take(idx), y[idx])
    np.testing.assert_array_equal(rows.index, np.unique(idx))
    plan = MapPlan(np.array([0, 96]), np.array([50, -1]), np.array([0.25, 0.0], np.float32))
    x = mapped_points(plan, rows)
    np.testing.assert_allclose(x, [0.75 * y[0] + 0.25 * y[50], y[96]], rtol=1e-6)


def test_sharded_map_equals_single_process(tmp_path, rng, ray_local):
    y = two_clusters(rng, n=90)
    uri = write_npy(tmp_path, y)
    h = rng.normal(scale=0.3, size=90)
    kw = {"seed": 1, "mode": "interp", "k": 5, "angle": 30.0, "targets_uri": uri}
    single = ShardPool.create(uri, workers=0, backend="torch")
    sharded = ShardPool.create(uri, workers=2, backend="torch")
    try:
        a, _ = plan_map(single, h, np.arange(400), **kw)
        b, _ = plan_map(sharded, h, np.arange(400), **kw)
    finally:
        sharded.close()
    for name in ("ot_index", "partner", "weight"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
