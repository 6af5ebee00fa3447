"""Search backends against float64 brute force, ties, shards and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmot_dist.ot.search import TargetIndex, merge_topk, search

CPU_BACKENDS = ["faiss", "torch"]


def brute_force(x, y, h, k):
    """Exact top-k by float64 scores, ties to the lowest index (stable sort of -score)."""
    s = x.double() @ y.double().T + torch.as_tensor(h).double()
    order = torch.argsort(-s, dim=1, stable=True)[:, :k]
    return s.gather(1, order), order


def problem(b, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=g),
        torch.randn(n, d, generator=g),
        torch.randn(n, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("b", "n", "d", "k"), [(64, 500, 7, 1), (33, 1001, 64, 3), (5, 3, 2, 3)])
def test_backend_matches_brute_force(backend, b, n, d, k):
    x, y, h = problem(b, n, d)
    values, indices = search(x, y, h, k, backend=backend)
    v_ref, i_ref = brute_force(x, y, h, k)
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(values, v_ref, rtol=0, atol=1e-9)


def test_backends_identical_indices_on_fp32():
    x, y, h = problem(256, 3000, 32, seed=1)
    answers = [search(x, y, h, 2, backend=be) for be in CPU_BACKENDS]
    for v, i in answers[1:]:
        assert torch.equal(i, answers[0][1])
        assert torch.equal(v, answers[0][0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lowest_index(backend):
    x, y, h = problem(40, 50, 6, seed=2)
    y[30] = y[7]
    y[45] = y[7]
    h[30] = h[45] = h[7] = 100.0  # cells 7, 30, 45 tie and beat everything
    _, indices = search(x, y, h, 3, backend=backend)
    assert (indices == torch.tensor([7, 30, 45])).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_returns_fp32_winner(dtype):
    x, y, h = problem(200, 2000, 48, seed=3)
    values, indices = search(x, y, h, 1, backend="torch", storage_dtype=dtype)
    v_ref, i_ref = brute_force(x, y, h, 1)
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(values, v_ref, rtol=0, atol=1e-9)


def test_sharded_search_equals_single():
    x, y, h = problem(100, 997, 16, seed=4)
    bounds = [(0, 300), (300, 301), (301, 997)]
    parts = [TargetIndex(y[a:b], offset=a).search(x, h[a:b], 4) for a, b in bounds]
    merged = merge_topk(parts, 4)
    single = TargetIndex(y).search(x, h, 4)
    assert torch.equal(merged[1], single[1])
    assert torch.equal(merged[0], single[0])


def test_k_larger_than_n_is_clamped():
    x, y, h = problem(3, 2, 4)
    values, indices = search(x, y, h, 5)
    assert indices.shape == (3, 2)


def test_numpy_inputs_accepted():
    x, y, h = problem(10, 20, 3)
    _, i1 = search(x.numpy(), y.numpy(), h.numpy())
    _, i2 = search(x, y, h)
    assert torch.equal(i1, i2)


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "h_len", "msg"),
    [
        ((4, 3), (5, 2), 5, "queries must be"),
        ((4, 3), (5, 3), 4, "offsets h"),
        ((4, 3), (0, 3), 0, "non-empty"),
        ((4,), (5, 4), 5, "queries must be"),
    ],
)
def test_bad_shapes(x_shape, y_shape, h_len, msg):
    with pytest.raises(ValueError, match=msg):
        search(torch.zeros(x_shape), torch.zeros(y_shape), torch.zeros(h_len))


def test_nan_targets_rejected():
    y = np.ones((4, 2), np.float32)
    y[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        TargetIndex(y)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown search backend"):
        TargetIndex(np.ones((2, 2)), backend="gpu-magic")


def test_triton_backend_through_the_search_interface():
    pytest.importorskip("triton")
    from dpmot_dist.ot.search import triton_available

    if not triton_available("cpu"):
        pytest.skip("Triton interpreter not active in this process")
    x, y, h = problem(24, 150, 20, seed=5)
    for dtype in ("float32", "float16"):
        values, indices = search(x, y, h, 2, backend="triton", storage_dtype=dtype)
        v_ref, i_ref = brute_force(x, y, h, 2)
        assert torch.equal(indices, i_ref)
        torch.testing.assert_close(values, v_ref, rtol=0, atol=1e-9)


def test_bench_search_report_rates_every_backend_and_the_lattice():
    from dpmot_dist.benchmarks.search import run

    r = run(n=600, dim=16, batch=96, device="cpu", repeat=1, lattice=16)
    assert r["matmul_gflops"] > 0 and r["default"] in r["backends"]
    assert all(b["disagree"] == 0.0 for k, b in r["backends"].items() if k != "reference")
    lat = r["lattice"]
    assert lat["rank"] == 3 and lat["points_per_projection"] == 16 / 3 and lat["ratio"] > 0
    assert lat["backend"] == r["default"]


def test_bench_search_dtypes_rescore_fractions_and_unavailable_backends():
    from dpmot_dist.benchmarks.search import parse_backends, run

    pairs = parse_backends("torch,faiss:float32,triton:bfloat16", "float32,bfloat16")
    assert pairs == [
        ("torch", "float32"),
        ("torch", "bfloat16"),
        ("faiss", "float32"),
        ("triton", "bfloat16"),
    ]
    with pytest.raises(ValueError, match="storage dtype"):
        parse_backends("torch:float64")
    r = run(600, 16, 96, "cpu", 1, lattice=0, backends="torch,faiss", dtypes="float32,bfloat16")
    assert set(r["backends"]) == {"torch", "torch:bfloat16", "faiss", "reference"}
    assert r["unavailable"] == {"faiss:bfloat16": "faiss scores in float32 only"}
    low = r["backends"]["torch:bfloat16"]
    assert low["storage_dtype"] == "bfloat16" and low["disagree"] == 0.0
    for name in ("torch", "torch:bfloat16", "faiss"):
        b = r["backends"][name]
        assert 0 <= b["winner_changed"] <= b["rescored_rows"] <= 1
    assert r["backends"]["torch"]["rescored_rows"] < 0.05  # fp32: only near-ties re-scored
    assert "lattice" not in r
