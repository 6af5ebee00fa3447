"""The compiled exact-top-1 kernel (kernels/_top1.c) against float64 brute force.

Every answer of :meth:`TargetIndex.search_top1` must be the exact argmax of ⟨x, y_i⟩ + h_i
(ties to the lowest index) with the exact score the top-c path gives, for points and lattices,
one or two potentials, one target tile or many, with the AVX2 code and the plain C code.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from dpmot_dist.ot.kernels import cpu_top1
from dpmot_dist.ot.search import TargetIndex
from dpmot_dist.ot.sources import Source

pytestmark = pytest.mark.skipif(not cpu_top1.available(), reason="the kernel is not built")
search_module = importlib.import_module("dpmot_dist.ot.search")  # (the package exports search())


def brute_force(x: torch.Tensor, y: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Exact argmax per row in float64, ties to the lowest index."""
    s = x.double().numpy() @ y.astype(np.float64).T + h
    return (s == s.max(1, keepdims=True)).argmax(1)


def problem(n: int = 700, dim: int = 24, ties: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, dim)).astype(np.float32)
    h = rng.normal(scale=0.5, size=n)
    hs = h + rng.normal(scale=0.05, size=n)
    if ties:  # duplicated targets with equal offsets: exact ties everywhere they win
        y[1::7], h[1::7], hs[1::7] = y[0::7][: len(y[1::7])], h[0::7][: len(h[1::7])], 0.0
    return y, h, hs


@pytest.fixture(params=[True, False], ids=["avx2", "plain"])
def simd(request):
    if request.param and not cpu_top1.simd():
        pytest.skip("no AVX2 + FMA on this CPU")
    cpu_top1.set_simd(request.param)
    yield request.param
    cpu_top1.set_simd(True)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("lattice", [0, 16])
@pytest.mark.parametrize("tile", [None, 1 << 12])  # one target tile, or many
def test_search_top1_is_the_exact_argmax(simd, lattice, ties, tile, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(search_module, "_TOP1_TILE", tile)
    y, h, hs = problem(ties=ties)
    index = TargetIndex(y, offset=5)
    assert index.fused_top1
    batch = Source(lattice=lattice).draw(600, y.shape[1], 0, 1)
    x = batch if lattice == 0 else batch.points()
    values, indices = index.search_top1(batch, [h, hs])
    assert values.shape == indices.shape == (len(x), 2)
    for p, offsets in enumerate((h, hs)):
        np.testing.assert_array_equal(indices[:, p].numpy(), brute_force(x, y, offsets) + 5)
        # the same exact scores as the top-c path with its float64 re-score
        v, i = index._search_topc(x, torch.from_numpy(offsets), 1)
        assert torch.equal(i[:, 0], indices[:, p]) and torch.equal(v[:, 0], values[:, p])
    one_v, one_i = index.search_top1(batch, [hs])
    assert torch.equal(one_i[:, 0], indices[:, 1]) and torch.equal(one_v[:, 0], values[:, 1])


def test_search_k1_takes_the_kernel_and_agrees_with_top_k(simd):
    y, h, _ = problem(n=300, dim=9, seed=3)
    index = TargetIndex(y)
    x = torch.randn(1000, 9)
    v1, i1 = index.search(x, h, 1)  # the kernel
    v4, i4 = index.search(x, h, 4)  # the top-c path
    assert torch.equal(i1[:, 0], i4[:, 0]) and torch.equal(v1[:, 0], v4[:, 0])


def test_certificate_sends_near_ties_to_the_exact_search():
    """Two targets whose fp32 scores differ by less than the error bound: the kernel's gap
    cannot certify the winner, so the point is searched again and the lower index wins."""
    y = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    h = np.array([0.0, 1e-12, -5.0])  # target 1 wins by 1e-12, far below fp32 resolution
    index = TargetIndex(y)
    state = cpu_top1.empty_state(1, 1)
    scores = np.array([[1.0, 1.0, -5.0]], np.float32)
    cpu_top1.top1_rows(scores, None, 0, state)
    assert not cpu_top1.certified(state, np.array([1e-6]))[0, 0]
    v, i = index.search_top1(torch.tensor([[1.0, 0.0]]), [h])
    assert int(i[0, 0]) == 1 and float(v[0, 0]) == 1.0 + 1e-12
