"""Shard workers and the fit on a GPU (marked ``cuda``: skipped where torch sees none): in
process, and as Ray actors holding ``num_gpus=1`` each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmot_dist.io import storage
from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.shards import ShardPool

pytestmark = pytest.mark.cuda


@pytest.fixture
def targets(tmp_path) -> str:
    """3,000 Gaussian targets in D = 32, as a .npy."""
    y = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    uri = str(tmp_path / "y.npy")
    storage.save_npy(uri, y)
    return uri


def brute_force(x: np.ndarray, y: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Float64 winners, ties to the lowest index."""
    s = torch.from_numpy(x).double() @ torch.from_numpy(y).double().T + torch.from_numpy(h)
    return torch.argsort(-s, dim=1, stable=True)[:, 0].numpy()


def fit_cfg(targets: str, out, **kw) -> FitConfig:
    base = {
        "targets": targets,
        "out": str(out),
        "iters": 5,
        "eval_samples": 0,
        "chunk": 4096,
        "lattice": 0,
        "calibrate": "off",
        "device": "cuda",
        "storage_dtype": "bfloat16",
        "log_every": 1,
    }
    return FitConfig(**{**base, **kw})


def _search_matches(pool: ShardPool, targets: str) -> None:
    y = np.load(targets)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, y.shape[1])).astype(np.float32)
    h = rng.normal(scale=0.5, size=len(y))
    _, idx = pool.search(x, h, 1)
    assert np.array_equal(np.asarray(idx)[:, 0], brute_force(x, y, h))


def test_in_process_worker_on_cuda_finds_exact_winners(targets):
    pool = ShardPool.create(targets, workers=0, device="cuda", storage_dtype="bfloat16")
    try:
        assert pool.groups[0][0].index.device.type == "cuda"
        _search_matches(pool, targets)
    finally:
        pool.close()


def test_shard_actor_holds_a_gpu_and_finds_exact_winners(ray_gpu, targets):
    pool = ShardPool.create(targets, workers=1, device="cuda", storage_dtype="bfloat16")
    try:
        (actor,) = pool.handles
        device = ray_gpu.get(actor.__ray_call__.remote(lambda w: str(w.index.device)))
        assert device == "cuda"
        _search_matches(pool, targets)
    finally:
        pool.close()


def test_fit_on_one_gpu_in_process_and_in_an_actor_give_the_same_h(ray_gpu, targets, tmp_path):
    local = run_fit(fit_cfg(targets, tmp_path / "local"))
    actor = run_fit(fit_cfg(targets, tmp_path / "actor", workers=1))
    assert local.iterations == actor.iterations == 5
    assert np.isfinite(local.h).all()
    assert np.array_equal(
        np.load(tmp_path / "local" / "h.npy"), np.load(tmp_path / "actor" / "h.npy")
    )
    assert all(r["t_search"] > 0 for r in local.metrics)
