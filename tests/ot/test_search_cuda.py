"""The search on a GPU (marked ``cuda``: skipped where torch sees none): the fused Triton
kernel, the torch backend in bf16/fp16 and faiss-gpu against float64 brute force."""

from __future__ import annotations

import pytest
import torch

from dpmot_dist.ot.search import TargetIndex, faiss_available, merge_topk, triton_available
from dpmot_dist.ot.sources import Source

pytestmark = pytest.mark.cuda
DEVICE = "cuda"

LOW_PRECISION = ("bfloat16", "float16")


def problem(b: int, n: int, d: int, seed: int = 0):
    """Gaussian queries, targets and float64 offsets, drawn on the CPU, moved to the GPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    y = torch.randn(n, d, generator=g)
    h = torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(DEVICE), y.to(DEVICE), h.to(DEVICE)


def brute_force(x, y, h, k: int):
    """Exact top-k by float64 scores on the GPU, ties to the lowest index (stable sort)."""
    s = x.double() @ y.double().T + h.double()
    order = torch.argsort(-s, dim=1, stable=True)[:, :k]
    return s.gather(1, order), order


@pytest.fixture
def compiled_triton():
    """Skip unless the Triton kernels run compiled on the GPU (not in the interpreter)."""
    if not triton_available(DEVICE):
        pytest.skip("triton cannot run on this GPU")
    from dpmot_dist.ot.kernels import triton_search as ts

    if ts.interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels would run in the interpreter")
    return ts


@pytest.mark.parametrize("dtype", ["float32", *LOW_PRECISION])
def test_triton_winners_equal_brute_force(compiled_triton, dtype):
    x, y, h = problem(4096, 20000, 256)
    index = TargetIndex(y, backend="triton", storage_dtype=dtype, device=DEVICE)
    values, indices = index.search(x, h, 1)
    v_ref, i_ref = brute_force(x, y, h, 1)
    assert indices.device.type == DEVICE and indices.dtype == torch.int64
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(values, v_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_search_topk_equals_brute_force(compiled_triton, dtype):
    ts = compiled_triton
    x, y, h = problem(1000, 7001, 300, seed=1)  # partial tiles in every dimension
    values, indices = ts.fused_search(x, y.to(dtype), h.float(), k=4, candidates=32, y_exact=y)
    v_ref, i_ref = brute_force(x, y, h.float(), 4)
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(values, v_ref.float(), rtol=1e-6, atol=1e-5)


def test_triton_lattice_equals_its_explicit_points(compiled_triton):
    _, y, h = problem(1, 5000, 64, seed=2)
    lattice = Source(lattice=64).draw(300, 64, 7, 0, device=DEVICE)
    fused = TargetIndex(y, backend="triton", storage_dtype="bfloat16", device=DEVICE)
    exact = TargetIndex(y, backend="torch", device=DEVICE)
    v, i = fused.search_lattice(lattice, h, 2)
    v_ref, i_ref = exact.search(lattice.points(), h, 2)
    assert i.shape == (len(lattice), 2)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float32", *LOW_PRECISION])
def test_torch_backend_on_cuda_equals_brute_force(dtype):
    x, y, h = problem(2048, 30000, 128, seed=3)
    values, indices = TargetIndex(y, backend="torch", storage_dtype=dtype, device=DEVICE).search(
        x, h, 3
    )
    v_ref, i_ref = brute_force(x, y, h, 3)
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(values, v_ref, rtol=0, atol=1e-9)


def test_faiss_gpu_knn_equals_brute_force():
    if not faiss_available(DEVICE):
        pytest.skip("faiss has no GPU support here (faiss-gpu not installed, or no GPU)")
    x, y, h = problem(2048, 30000, 128, seed=4)
    values, indices = TargetIndex(y, backend="faiss", device=DEVICE).search(x, h, 2)
    v_ref, i_ref = brute_force(x, y, h, 2)
    assert torch.equal(indices.to(i_ref.device), i_ref)
    torch.testing.assert_close(values.to(v_ref.device), v_ref, rtol=0, atol=1e-9)


def test_sharded_search_on_cuda_equals_single():
    x, y, h = problem(512, 9000, 96, seed=5)
    backend = "triton" if triton_available(DEVICE) else "torch"
    single = TargetIndex(y, backend=backend, storage_dtype="bfloat16", device=DEVICE)
    parts = []
    for start, stop in ((0, 4000), (4000, 9000)):
        shard = TargetIndex(
            y[start:stop], backend=backend, storage_dtype="bfloat16", device=DEVICE, offset=start
        )
        parts.append(shard.search(x, h[start:stop], 4))
    v, i = merge_topk(parts, 4)
    v_ref, i_ref = single.search(x, h, 4)
    assert torch.equal(i, i_ref)
    assert torch.equal(v, v_ref)
