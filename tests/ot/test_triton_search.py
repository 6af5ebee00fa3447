"""Fused Triton search (run on CPU under the Triton interpreter) against fp64 brute force.

Where torch sees a GPU the interpreter stays off, so that the other tests of the session run
the compiled kernels: this module then skips, and tests/ot/test_search_cuda.py runs the
kernels on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

pytest.importorskip("triton")

from dpmot_dist.ot.kernels import triton_search as ts  # noqa: E402

if not ts.interpreting():  # the tests run CPU tensors through the interpreter
    pytest.skip(
        "the Triton interpreter is off (a GPU is visible, or triton was imported before "
        "TRITON_INTERPRET=1 was set)",
        allow_module_level=True,
    )

SMALL = {"block_b": 16, "block_n": 32, "block_d": 16}  # many partial tiles: exercises masks
LARGE = {"block_b": 64, "block_n": 128, "block_d": 64}  # fewer interpreter steps
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _problem(b: int, n: int, d: int, seed: int = 0):
    """Gaussian queries and targets, offsets h ~ N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    y = torch.randn(n, d, generator=g)
    h = 0.5 * torch.randn(n, generator=g)
    return x, y, h


def _exact_scores(x, y, h) -> torch.Tensor:
    """(B, N) float64 scores ⟨x, y_i⟩ + h_i."""
    return x.double() @ y.double().T + h.double()


def _brute_force(x, y, h, k: int):
    """fp64 top-k by (−value, index): a stable descending sort keeps ties in index order."""
    values, indices = torch.sort(_exact_scores(x, y, h), dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def test_available_under_interpreter():
    assert ts.interpreting()
    assert ts.is_available()


@pytest.mark.parametrize(("b", "n", "d"), [(37, 301, 45), (5, 70, 17), (1, 33, 3), (20, 16, 16)])
def test_fp32_winner_equals_brute_force(b, n, d):
    x, y, h = _problem(b, n, d)
    values, indices = ts.fused_search(x, y, h, **SMALL)
    ref_values, ref_indices = _brute_force(x, y, h, 1)
    assert indices.shape == (b, 1) and indices.dtype == torch.int64
    assert values.dtype == torch.float32
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values.float(), rtol=1e-6, atol=1e-6)


def test_fp32_topk_equals_brute_force():
    x, y, h = _problem(37, 301, 45, seed=1)
    values, indices = ts.fused_search(x, y, h, k=4, **SMALL)
    ref_values, ref_indices = _brute_force(x, y, h, 4)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values.float(), rtol=1e-6, atol=1e-6)
    assert (values[:, :-1] >= values[:, 1:]).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("candidates", [None, 2])
def test_low_precision_winner_exact_beyond_bound(dtype, candidates):
    x, y, h = _problem(256, 301, 45, seed=2)
    c = ts.candidate_count(1, candidates)
    _, indices = ts.fused_search(x, y.to(dtype), h, candidates=candidates, y_exact=y, **LARGE)
    ordered = torch.sort(_exact_scores(x, y, h), dim=1, descending=True).values
    gap = ordered[:, 0] - ordered[:, c]  # best minus (c+1)-th best: the sharp condition
    safe = gap > 2 * ts.score_error_bound(x, y, dtype, h)
    wrong = indices[:, 0] != _brute_force(x, y, h, 1)[1][:, 0]
    rate = wrong[~safe].double().mean().item() if (~safe).any() else 0.0
    print(
        f"{dtype} c={c}: {int(safe.sum())}/{len(safe)} rows within the guarantee, "
        f"disagreement on the others {rate:.4f}"
    )
    assert safe.any()
    assert not wrong[safe].any()
    assert rate <= 0.02


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_score_error_bound_holds(dtype):
    x, y, h = _problem(64, 200, 45, seed=3)
    rounded = x.to(dtype).float() @ y.to(dtype).float().T + h  # fp32 accumulation
    error = (rounded.double() - _exact_scores(x, y, h)).abs().amax(dim=1)
    bound = ts.score_error_bound(x, y, dtype, h)
    assert (error <= bound).all()
    assert (bound <= 20 * error).all()  # not vacuous


def test_offsets_stay_fp32_in_low_precision():
    """y = 0: scores are h alone, separated by far less than a bfloat16 ulp."""
    x = torch.randn(8, 16)
    y = torch.zeros(40, 16, dtype=torch.bfloat16)
    h = 1.0 + 1e-6 * torch.arange(40, dtype=torch.float32)
    _, indices = ts.fused_search(x, y, h, candidates=1, **SMALL)
    assert (indices == 39).all()


@pytest.mark.parametrize("dtype", (torch.float32, *LOW_PRECISION))
def test_ties_go_to_lowest_index(dtype):
    x, y, h = _problem(10, 64, 16, seed=4)
    y[[9, 21, 50]] = y[21].clone()
    h[[9, 21, 50]] = 10.0
    x[:5] = 3 * y[21]  # rows 0..4 are won by the three duplicates
    _, indices = ts.fused_search(x, y.to(dtype), h, k=3, y_exact=y, **SMALL)
    assert indices[:5].tolist() == [[9, 21, 50]] * 5
    _, flat = ts.fused_search(x, torch.zeros_like(y, dtype=dtype), torch.zeros(64), k=4, **SMALL)
    assert flat.tolist() == [[0, 1, 2, 3]] * 10


def test_fewer_targets_than_candidates():
    x, y, h = _problem(9, 3, 20, seed=5)
    values, indices = ts.fused_search(x, y, h, k=5, **SMALL)
    ref_values, ref_indices = _brute_force(x, y, h, 3)
    assert indices.shape == (9, 3)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values.float(), rtol=1e-6, atol=1e-6)
    cand = ts.fused_candidates(x, y, h, 8, **SMALL)
    assert torch.equal(cand[:, :3], ref_indices)
    assert (cand[:, 3:] == -1).all()


def test_single_target():
    x, y, h = _problem(6, 1, 7, seed=6)
    values, indices = ts.fused_search(x, y, h, k=2, **SMALL)
    assert indices.tolist() == [[0]] * 6
    torch.testing.assert_close(values, _exact_scores(x, y, h).float(), rtol=1e-6, atol=1e-6)


def test_candidates_are_sorted_by_low_precision_score():
    x, y, h = _problem(20, 100, 32, seed=7)
    cand = ts.fused_candidates(x, y, h, 5, **LARGE)
    assert cand.shape == (20, 5) and cand.dtype == torch.int64
    assert torch.equal(cand, _brute_force(x, y, h, 5)[1])


def test_empty_batch():
    _, y, h = _problem(1, 10, 4)
    values, indices = ts.fused_search(torch.zeros(0, 4), y, h, k=2, **SMALL)
    assert values.shape == indices.shape == (0, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(4)}, "2-D"),
        ({"x": torch.zeros(3, 5)}, "share D"),
        ({"h": torch.zeros(9)}, "h must have shape"),
        ({"k": 0}, "k must be"),
        ({"k": 3, "candidates": 2}, "candidates must be"),
        ({"y": torch.zeros(10, 4, dtype=torch.float64)}, "stored as"),
        ({"block_n": 24}, "powers of two"),
        ({"y_exact": torch.zeros(10, 3)}, "y_exact"),
        ({"x": torch.full((2, 4), 1e5), "y": torch.zeros(10, 4, dtype=torch.float16)}, "range"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    args = {"x": torch.zeros(2, 4), "y": torch.zeros(10, 4), "h": torch.zeros(10), "k": 1}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ts.fused_search(**args)


@pytest.mark.parametrize("rank, k", [(3, 1), (2, 3)])
def test_lattice_kernel_equals_search_of_explicit_points(rank, k):
    from dpmot_dist.ot.search import TargetIndex
    from dpmot_dist.ot.sources import Source

    g = torch.Generator().manual_seed(7)
    y = torch.randn(150, 12, generator=g)
    h = 0.3 * torch.randn(150, generator=g, dtype=torch.float64)
    lat = Source(lattice=8, lattice_rank=rank).draw(12, 12, 0, 1)
    index = TargetIndex(y, backend="triton", tile=64)
    values, indices = index.search_lattice(lat, h, k)
    ref_values, ref_indices = _brute_force(lat.points(), y, h, k)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-12)


def test_lattice_keys_decode_to_scores_and_indices():
    from dpmot_dist.ot.sources import Source

    g = torch.Generator().manual_seed(8)
    y = torch.randn(40, 6, generator=g)
    h = torch.randn(40, generator=g)
    lat = Source(lattice=4).draw(6, 6, 0, 2)
    s, m, _ = lat.q.shape
    a = (lat.q.reshape(s * m, -1) @ y.T).reshape(s, m, -1)
    best = ts.lattice_candidates(a[:, :, :25], lat.coef, h[:25], 0, None, 5)
    best = ts.lattice_candidates(a[:, :, 25:], lat.coef, h[25:], 25, best, 5)
    scores, cand = ts.lattice_topc(best, 5)
    ref = torch.einsum("sgm,smt->sgt", lat.coef, a).reshape(s * 4, -1) + h
    top = torch.sort(ref, dim=1, descending=True, stable=True)
    assert torch.equal(cand, top.indices[:, :5])
    torch.testing.assert_close(scores, top.values[:, :5], rtol=1e-6, atol=1e-6)
