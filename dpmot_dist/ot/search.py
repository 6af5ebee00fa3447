"""Maximum inner-product search with offsets: the argmax behind the Brenier map.

For query rows x (B×D), targets y (N×D) and offsets h (N,), find for every row

.. math::
    u_h(x) = \\max_i \\langle x, y_i \\rangle + h_i, \\qquad g(x) = \\arg\\max_i (\\cdots)

and its top-k variant, without materialising the B×N score matrix.

Every backend works in two stages:

1. *Candidates*: a fast, possibly low-precision pass keeps the C best indices of each
   row (C = k + a margin). Backends: ``faiss`` (``faiss.knn`` on CPU, ``knn_gpu`` on
   CUDA, over the augmented vectors [x, 1]·[y_i, h_i]), ``torch`` (tiled ``addmm``
   plus a running top-C, any device, fp32/bf16/fp16 storage) and ``triton`` (the
   fused GPU kernel of :mod:`dpmot_dist.ot.kernels.triton_search`).
2. *Exact re-score*: the C candidates are scored again as ⟨x, y_i⟩ + h_i in float64
   from the fp32 targets, and the top-k is taken with ties broken by the lowest index.

Stage 2 makes the answer independent of the backend, of the summation order of the
GEMM and of how the targets are split into shards: on fp32 inputs every backend
returns the same indices, and a sharded search reduced by :func:`merge_topk` equals
the single-process search. It fails only when more than C − k targets score within
the stage-1 rounding error of the k-th best, which on fp32 inputs needs near-exact
ties (e.g. duplicated targets).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from dpmot_dist.ot.kernels import cpu_search, cpu_top1

log = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "torch", "triton"]
BACKENDS = ("faiss", "torch", "triton")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RESCORE_ROWS = 256
_RESCORE_ELEMENTS = 1 << 21  # float64 candidate coordinates gathered per re-score pass
_LATTICE_POINTS = 4096  # lattice points scored per pass (bounds the score tile's memory)
_TRITON_LATTICE_POINTS = 1 << 14  # lattice points per chunk of the Triton path
_TOP1_ROWS = 1024  # GEMM rows (points, or lattice projections) per chunk of the top-1 path
_TOP1_TILE = 1 << 19  # scores per GEMM tile of the top-1 path (2 MiB: stays in L2/L3)


def faiss_available(device: torch.device | str = "cpu") -> bool:
    """Whether the ``faiss`` backend can run on ``device``."""
    try:
        import faiss
    except ImportError:
        return False
    if torch.device(device).type == "cuda":
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    return True


def triton_available(device: torch.device | str = "cpu") -> bool:
    """Whether the fused Triton kernel can run on ``device`` (CUDA, or the interpreter)."""
    try:
        from dpmot_dist.ot.kernels import triton_search
    except ImportError:
        return False
    on_cuda = torch.device(device).type == "cuda"
    return triton_search.is_available() and (on_cuda or triton_search.interpreting())


def default_backend(device: torch.device | str = "cpu") -> str:
    """The fastest backend available on ``device``: triton on CUDA; on the CPU torch when the
    fused numba kernels are there (tiled BLAS GEMM + a one-pass running top-c: 0.85 of the
    matmul rate at N = 20,000, D = 1,024, B = 1,024, against faiss's 0.62 in the same run of
    ``dpmot bench search``), else faiss, else torch."""
    if torch.device(device).type == "cuda" and triton_available(device):
        return "triton"
    if torch.device(device).type == "cpu" and cpu_search.available():
        return "torch"
    return "faiss" if faiss_available(device) else "torch"


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn ``auto`` into a concrete backend and check that the named one can run."""
    if backend == "auto":
        return default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {BACKENDS}")
    if backend == "faiss" and not faiss_available(device):
        raise ValueError(f"search backend 'faiss' is not available on {device}")
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"search backend 'triton' is not available on {device}")
    return backend


class TargetIndex:
    """Targets y (N×D) held on one device, searched with per-call offsets h.

    ``offset`` is added to every returned index, so that a shard holding global rows
    [offset, offset + N) answers in global indices. ``storage_dtype`` (float32,
    bfloat16, float16) is the dtype of the copy the candidate pass reads; an fp32 copy
    is kept for the exact re-score.
    """

    def __init__(
        self,
        y: torch.Tensor | np.ndarray,
        *,
        backend: str = "auto",
        storage_dtype: str = "float32",
        device: torch.device | str = "cpu",
        tile: int = 8192,
        margin: int | None = None,
        offset: int = 0,
    ) -> None:
        y = torch.as_tensor(y)
        if y.ndim != 2 or y.shape[0] == 0 or y.shape[1] == 0:
            raise ValueError(f"targets must be a non-empty N×D array, got shape {tuple(y.shape)}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}")
        self.device = torch.device(device)
        self.backend = resolve_backend(backend, self.device)
        self.y = y.to(self.device, torch.float32).contiguous()
        if not torch.isfinite(self.y).all():
            raise ValueError("targets contain NaN or Inf values")
        self.dtype = STORAGE_DTYPES[storage_dtype]
        self.y_low = self.y if self.dtype == torch.float32 else self.y.to(self.dtype)
        self.n, self.dim = self.y.shape
        self.tile = tile
        self.offset = offset
        self.margin = margin if margin is not None else (3 if self.dtype == torch.float32 else 12)
        self._augmented: np.ndarray | None = None
        self._y_norm: float | None = None
        self._gpu_res = None
        # On CPU the running top-c and the exact re-score run in the fused numba kernels of
        # kernels/cpu_search.py (torch elsewhere, or without numba)
        self._fused_cpu = self.device.type == "cpu" and cpu_search.available()
        self._work: torch.Tensor | None = None

    @property
    def fused_top1(self) -> bool:
        """Whether the exact top-1 of points and lattices (the solver's hot path) runs in the
        compiled kernel of kernels/_top1.c: one pass per GEMM tile, no top-c lists, one exact
        score per winner (the torch backend on the CPU, fp32 storage, with the fused CPU
        kernels)."""
        return (
            self._fused_cpu
            and self.backend == "torch"
            and self.dtype == torch.float32
            and cpu_top1.available()
        )

    def search(self, x: torch.Tensor, h: torch.Tensor | np.ndarray, k: int = 1):
        """Top-k of ⟨x, y_i⟩ + h_i per row.

        Args:
            x: (B, D) queries. h: (N,) offsets (float64 keeps the re-score exact).
        Returns:
            values (B, k) float64 exact scores, indices (B, k) int64 global indices,
            sorted by decreasing value, ties by increasing index.
        """
        x, h = self._check(x, h, k)
        if k == 1 and self.fused_top1:
            return self._top1_points(x, [h])
        return self._search_topc(x, h, k)

    def _search_topc(self, x: torch.Tensor, h: torch.Tensor, k: int):
        """:meth:`search` by the candidate pass (top-c) and the exact re-score."""
        k = min(k, self.n)
        c = min(self.n, k + self.margin)
        scores, cand = self.candidates(x, h, c)
        if self._fused_cpu:
            return self._cpu_rescore(x, h, scores, cand, k)
        return self._rescore(x, h, scores, cand, k)

    def search_batch(self, batch, h: torch.Tensor | np.ndarray, k: int = 1):
        """:meth:`search` for a tensor of points, :meth:`search_lattice` for a Lattice."""
        if isinstance(batch, torch.Tensor):
            return self.search(batch, h, k)
        return self.search_lattice(batch, h, k)

    def search_top1(self, batch, offsets: list):
        """Exact top-1 of every point of ``batch`` (points or a Lattice) under each of the
        P offset vectors ``offsets`` (the potential h, and the control variate's snapshot h_s).

        Returns (values (B, P) float64, indices (B, P) int64 global), ties to the lowest index,
        column p the same as ``search_batch(batch, offsets[p], 1)``. With the compiled kernel
        (:attr:`fused_top1`; P ≤ 2) one GEMM serves every potential, else one search each.
        """
        hs = [self._check(torch.zeros(1, self.dim), h, 1)[1] for h in offsets]
        if self.fused_top1 and len(hs) <= 2:
            if isinstance(batch, torch.Tensor):
                return self._top1_points(self._check(batch, hs[0], 1)[0], hs)
            return self._top1_lattice(batch, hs)
        parts = [self.search_batch(batch, h, 1) for h in hs]
        return torch.cat([v for v, _ in parts], 1), torch.cat([i for _, i in parts], 1)

    # -- the compiled top-1 path (kernels/_top1.c) -------------------------------------------

    def _workspace(self, rows: int, cols: int) -> torch.Tensor:
        """A reused (rows, cols) fp32 buffer for GEMM tiles (no fresh pages per tile)."""
        if self._work is None or self._work.numel() < rows * cols:
            self._work = torch.empty(rows * cols)
        return self._work[: rows * cols].view(rows, cols)

    def _top1_tiles(self, a: torch.Tensor, h32: torch.Tensor | None, merge) -> None:
        """GEMM tiles a·y[t0:t1]ᵀ (+ h32[t0:t1] when given) of at most _TOP1_TILE scores,
        each handed to ``merge(tile (rows, t1 − t0) numpy, t0)``."""
        cols = max(256, min(self.n, _TOP1_TILE // max(1, len(a))))
        for t0 in range(0, self.n, cols):
            t1 = min(self.n, t0 + cols)
            out = self._workspace(len(a), t1 - t0)
            if h32 is None:
                torch.mm(a, self.y[t0:t1].T, out=out)
            else:
                torch.addmm(h32[t0:t1], a, self.y[t0:t1].T, out=out)
            merge(out.numpy(), t0)

    def _top1_finish(self, state, thr, exact, points, hs):
        """Exact values of the certified winners (``exact(idx)``), an exact top-c search
        of the others (``points(rows)`` forms them), global indices."""
        best, idx, _ = state
        sure = cpu_top1.certified(state, thr)
        values = exact(np.where(sure, idx, 0))
        for p, h in enumerate(hs):
            rows = np.flatnonzero(~sure[:, p])
            if len(rows):
                v, i = self._search_topc(points(torch.from_numpy(rows)), h, 1)
                values[rows, p], idx[rows, p] = v[:, 0].numpy(), i[:, 0].numpy() - self.offset
        return torch.from_numpy(values), torch.from_numpy(idx + self.offset)

    def _top1_points(self, x: torch.Tensor, hs: list[torch.Tensor]):
        """:meth:`search_top1` of points x (B, D) by the compiled kernel."""
        state = cpu_top1.empty_state(len(x), len(hs))
        h64 = torch.stack(hs).numpy()
        offsets = None if len(hs) == 1 else h64.astype(np.float32)
        h32 = hs[0].to(torch.float32) if len(hs) == 1 else None
        for r0 in range(0, len(x), _TOP1_ROWS):
            r1 = min(len(x), r0 + _TOP1_ROWS)
            part = tuple(s[r0:r1] for s in state)
            self._top1_tiles(
                x[r0:r1],
                h32,
                lambda tile, t0, part=part: cpu_top1.top1_rows(
                    tile, None if offsets is None else offsets[:, t0 : t0 + tile.shape[1]],
                    t0, part,
                ),
            )  # fmt: skip
        thr = 2 * self.error_bound(x, torch.from_numpy(np.abs(h64).max(0)))
        x_np, y_np = x.numpy(), self.y.numpy()
        return self._top1_finish(
            state,
            thr.numpy(),
            lambda idx: cpu_top1.exact_rows(x_np, y_np, h64, idx),
            lambda rows: x[rows],
            hs,
        )

    def _top1_lattice(self, lattice, hs: list[torch.Tensor]):
        """:meth:`search_top1` of a Lattice by the compiled kernel: the projections A = Q·yᵀ
        by GEMM tiles, every point's scores formed and reduced in one pass over each tile."""
        q = lattice.q.to(torch.float32).contiguous()
        coef = lattice.coef.to(torch.float32).contiguous()
        s, m, d = q.shape
        g_pts = coef.shape[1]
        state = cpu_top1.empty_state(s * g_pts, len(hs))
        h64 = torch.stack(hs).numpy()
        offsets = h64.astype(np.float32)
        coef_np = coef.numpy()
        per = max(1, _TOP1_ROWS // m)  # subspaces per chunk
        for s0 in range(0, s, per):
            s1 = min(s, s0 + per)
            part = tuple(z[s0 * g_pts : s1 * g_pts] for z in state)
            cf = coef_np[s0:s1]

            def merge(tile, t0, part=part, cf=cf, s0=s0, s1=s1):
                a = tile.reshape(s1 - s0, m, tile.shape[1])
                cpu_top1.top1_lattice(a, cf, offsets[:, t0 : t0 + a.shape[2]], t0, part)

            self._top1_tiles(q[s0:s1].reshape(-1, d), None, merge)
        hmax = torch.from_numpy(np.abs(h64).max(0))
        thr = 2 * self.lattice_error_bound(coef.reshape(-1, m), hmax)
        q_np, y_np = q.numpy(), self.y.numpy()
        return self._top1_finish(
            state,
            thr.numpy(),
            lambda idx: cpu_top1.exact_lattice(q_np, coef_np, y_np, h64, idx),
            lambda rows: lattice_points_at(q, coef, rows),
            hs,
        )

    def search_lattice(self, lattice, h: torch.Tensor | np.ndarray, k: int = 1):
        """Top-k of every point of a :class:`~dpmot_dist.ot.sources.Lattice`, in point order.

        Stage 1 scores the points from the subspaces' projections, A = Q·yᵀ (m rows per
        subspace, the only O(D) work), as coef·A + h (2m + 1 flops per point and target),
        with a running top-c over target tiles; stage 2 re-scores the c candidates in float64
        from the explicit points, as :meth:`search` does. Any backend runs stage 1 in torch.
        """
        h = self._check(lattice.q[0, :1], h, k)[1]
        if k == 1 and self.fused_top1:
            return self._top1_lattice(lattice, [h])
        k = min(k, self.n)
        c = min(self.n, k + self.margin)
        if self.backend == "triton":
            return self._triton_search_lattice(lattice, h, k, c)
        if self._fused_cpu:
            return self._cpu_search_lattice(lattice, h, k, c)
        q = lattice.q.to(self.device, torch.float32)
        coef = lattice.coef.to(self.device, torch.float32)
        lattice = type(lattice)(q, coef)
        per = max(1, _LATTICE_POINTS // coef.shape[1])  # subspaces per pass
        out_v, out_i = [], []
        for s0 in range(0, q.shape[0], per):
            qs, cs = q[s0 : s0 + per], coef[s0 : s0 + per]
            scores, cand = self._lattice_candidates(qs, cs, h, c)
            x = lattice.points(s0, s0 + per)
            bound = self.lattice_error_bound(cs.reshape(-1, cs.shape[2]), h)
            v, i = self._rescore(x, h, scores, cand, k, bound)
            out_v.append(v)
            out_i.append(i)
        return torch.cat(out_v), torch.cat(out_i)

    def _triton_search_lattice(self, lattice, h: torch.Tensor, k: int, c: int):
        """:meth:`search_lattice` with the on-chip merge of
        :func:`~dpmot_dist.ot.kernels.triton_search.lattice_candidates`: per chunk of points,
        the projections of each target tile by one GEMM, the points' scores and running top-c
        in registers, then the exact re-score of the chunk's explicit points."""
        from dpmot_dist.ot.kernels import triton_search as ts

        q = lattice.q.to(self.device, torch.float32)
        coef = lattice.coef.to(self.device, torch.float32)
        lattice = type(lattice)(q, coef)
        s, m, d = q.shape
        h32 = h.to(torch.float32)
        per = max(1, _TRITON_LATTICE_POINTS // coef.shape[1])  # subspaces per chunk
        out_v, out_i = [], []
        for s0 in range(0, s, per):
            qs, cs = q[s0 : s0 + per], coef[s0 : s0 + per]
            q_low = qs.reshape(-1, d).to(self.dtype)
            best = None
            for start in range(0, self.n, self.tile):
                stop = min(start + self.tile, self.n)
                a = (q_low @ self.y_low[start:stop].T).float().reshape(len(qs), m, -1)
                best = ts.lattice_candidates(a, cs, h32[start:stop], start, best, c)
            scores, cand = ts.lattice_topc(best, c)
            bound = self.lattice_error_bound(cs.reshape(-1, m), h)
            x = lattice.points(s0, s0 + per)
            v, i = self._rescore(x, h, scores, cand, k, bound)
            out_v.append(v)
            out_i.append(i)
        return torch.cat(out_v), torch.cat(out_i)

    def lattice_error_bound(self, coef: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(P,) bound on |s̃ − s| of :meth:`_lattice_candidates`' scores, lattice points P.

        s̃ = Σ_j c_j ã_j + h in fp32 with ã_j = ⟨q_j, y⟩ from the storage dtype (‖q_j‖ = 1:
        error ≤ (2u_s + u_s² + γ_D)·max‖y‖), summed with error ≤ γ_{m+1}(Σ|c_j ã_j| + |h|);
        the point re-scored is the fp32 x = Σ c_j q_j, within γ_m Σ|c_j|·max‖y‖ of ⟨x, y⟩
        exact. All told ≤ (2u_s + u_s² + γ_{D+2m+1})·(‖c‖₁·max‖y‖ + max|h|); doubled.
        """
        if self._y_norm is None:
            self._y_norm = float(self.y.norm(dim=1).max())
        u_s = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[self.dtype]
        gamma = (self.dim + 2 * coef.shape[1] + 1) * 2.0**-24
        scale = coef.abs().sum(1).double() * self._y_norm + float(h.abs().max())
        return 2 * (2 * u_s + u_s * u_s + gamma) * scale

    def _lattice_candidates(self, q, coef, h, c: int):
        """(S·G, c) best scores coef·(Q·yᵀ) + h (fp32) and their local indices, by tiles."""
        s, m, d = q.shape
        h32 = h.to(torch.float32)
        qs = q.reshape(s * m, d).to(self.dtype)

        def tile(start: int, stop: int) -> torch.Tensor:
            a = (qs @ self.y_low[start:stop].T).float().reshape(s, m, stop - start)
            sc = torch.baddbmm(h32[start:stop].expand(s, 1, -1), coef, a)
            return sc.reshape(-1, stop - start)

        return self._running_topc(tile, c)

    def _running_topc(self, tile, c: int):
        """Best c (scores, local indices) per row over ``tile(start, stop)``, the (rows,
        stop − start) scores of targets [start, stop), taken tile by tile."""
        best_v = best_i = None
        for start in range(0, self.n, self.tile):
            stop = min(start + self.tile, self.n)
            v, i = tile(start, stop).topk(min(c, stop - start), dim=1)
            i += start
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(c, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        return best_v, best_i

    def candidates(self, x: torch.Tensor, h: torch.Tensor, c: int):
        """The c best rows under the backend's own arithmetic.

        Returns (scores (B, c) float32 or None, local indices (B, c) int64), best first.
        """
        if self.backend == "faiss":
            return self._faiss_candidates(x, h, c)
        if self.backend == "triton":
            from dpmot_dist.ot.kernels.triton_search import fused_candidates

            return None, fused_candidates(x, self.y_low, h.float(), c)
        return self._torch_candidates(x, h, c)

    def _check(self, x, h, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(x)
        h = torch.as_tensor(h)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queries must be B×{self.dim}, got shape {tuple(x.shape)}")
        if h.shape != (self.n,):
            raise ValueError(f"offsets h must have shape ({self.n},), got {tuple(h.shape)}")
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        x = x.to(self.device, torch.float32).contiguous()
        h = h.to(self.device, torch.float64)
        return x, h

    def _torch_candidates(self, x: torch.Tensor, h: torch.Tensor, c: int) -> torch.Tensor:
        """Tiled ``addmm`` (scores in the storage dtype, + fp32 h) and a running top-c."""
        h32 = h.to(torch.float32)
        xs = x.to(self.dtype)

        def tile(start: int, stop: int) -> torch.Tensor:
            if self.dtype == torch.float32:
                return torch.addmm(h32[start:stop], xs, self.y_low[start:stop].T)
            return (xs @ self.y_low[start:stop].T).float().add_(h32[start:stop])

        if self._fused_cpu:
            return self._cpu_running_topc(
                lambda a, b: tile(a, b).numpy(), x.shape[0], c, cpu_search.topc_rows
            )
        return self._running_topc(tile, c)

    # -- the fused CPU path (kernels/cpu_search.py) -----------------------------------------

    def _cpu_tile(self, rows: int) -> int:
        """Targets per GEMM tile on the CPU: about 16 MiB of fp32 scores or projections."""
        return max(256, min(self.n, (1 << 22) // max(1, rows)))

    def _cpu_running_topc(self, tile, rows: int, c: int, kernel, gemm_rows: int | None = None):
        """The c best (scores, local indices) of each of ``rows`` rows, the tiles of
        ``tile(start, stop)`` (a GEMM of ``gemm_rows`` rows, default ``rows``) merged by the
        numba ``kernel`` as they come: no rows × N temporary."""
        best_v, best_i = cpu_search.empty_topc(rows, c)
        step = self._cpu_tile(gemm_rows or rows)
        for start in range(0, self.n, step):
            stop = min(start + step, self.n)
            kernel(tile(start, stop), start, best_v, best_i)
        return torch.from_numpy(best_v), torch.from_numpy(best_i)

    def _cpu_search_lattice(self, lattice, h: torch.Tensor, k: int, c: int):
        """:meth:`search_lattice` by the fused CPU kernels: the projections A = Q·yᵀ by tiles
        of targets (BLAS), each tile scored for every point and merged into its running
        top-c (numba), then the exact re-score of the points formed on the fly."""
        q = lattice.q.to(torch.float32).contiguous()
        coef = lattice.coef.to(torch.float32).contiguous()
        s, m, d = q.shape
        qs = q.reshape(s * m, d).to(self.dtype)
        coef_np, h32 = coef.numpy(), h.to(torch.float32).numpy()

        def tile(start: int, stop: int):
            a = (qs @ self.y_low[start:stop].T).float().reshape(s, m, stop - start)
            return a.numpy(), coef_np, h32[start:stop]

        def kernel(args, start, best_v, best_i):
            a, coef_tile, h_tile = args
            cpu_search.topc_lattice(a, coef_tile, h_tile, start, best_v, best_i)

        points = s * coef.shape[1]
        best_v, best_i = self._cpu_running_topc(tile, points, c, kernel, gemm_rows=s * m)
        bound = self.lattice_error_bound(coef.reshape(-1, m), h).numpy()
        out_v = np.empty((len(best_i), k), np.float64)
        out_i = np.empty((len(best_i), k), np.int64)
        cpu_search.rescore_lattice(
            q.numpy(), coef_np, self.y.numpy(), h.numpy(), best_v.numpy(), best_i.numpy(),
            bound, k, self.offset, out_v, out_i,
        )  # fmt: skip
        return torch.from_numpy(out_v), torch.from_numpy(out_i)

    def _cpu_rescore(self, x, h, scores, cand, k: int):
        """:meth:`_rescore` by the fused CPU kernel (candidate scores known, else all c)."""
        cand = cand.long().numpy()
        if scores is None or cand.shape[1] <= k:
            scores_np = np.zeros(cand.shape, np.float32)
            bound = np.full(len(cand), np.inf)
        else:
            scores_np = scores.float().numpy()
            bound = self.error_bound(x, h).numpy()
        out_v = np.empty((len(cand), k), np.float64)
        out_i = np.empty((len(cand), k), np.int64)
        cpu_search.rescore_rows(
            x.numpy(), self.y.numpy(), h.numpy(), scores_np, cand, bound, k, self.offset,
            out_v, out_i,
        )  # fmt: skip
        return torch.from_numpy(out_v), torch.from_numpy(out_i)

    def _faiss_candidates(self, x: torch.Tensor, h: torch.Tensor, c: int) -> torch.Tensor:
        """``faiss.knn`` inner-product search over [x, 1] and [y_i, h_i]."""
        import faiss

        if self.device.type == "cuda":
            return self._faiss_gpu_candidates(x, h, c)
        if self._augmented is None:
            self._augmented = np.empty((self.n, self.dim + 1), np.float32)
            self._augmented[:, :-1] = self.y.numpy()
        self._augmented[:, -1] = h.numpy()
        xa = np.empty((x.shape[0], self.dim + 1), np.float32)
        xa[:, :-1] = x.numpy()
        xa[:, -1] = 1.0
        scores, idx = faiss.knn(xa, self._augmented, c, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(idx)

    def _faiss_gpu_candidates(self, x: torch.Tensor, h: torch.Tensor, c: int) -> torch.Tensor:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch tensors)

        if self._gpu_res is None:
            self._gpu_res = faiss.StandardGpuResources()
        ya = torch.cat([self.y, h.to(torch.float32)[:, None]], 1)
        xa = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        scores, idx = faiss.knn_gpu(self._gpu_res, xa, ya, c, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, idx.long()

    def error_bound(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(B,) bound δ on |s̃_i − s_i| of the candidate pass's scores, any i.

        Rounding x and y to the storage dtype (unit roundoff u_s, 0 for fp32) and an fp32
        dot product of length D + 1 in any order (γ ≈ (D + 2)·2⁻²⁴, Higham 2002, §3.1) give
        |s̃ − s| ≤ (2u_s + u_s² + γ)·‖x‖₂·max‖y_i‖₂ + γ·max|h_i|; doubled as a margin.
        """
        if self._y_norm is None:
            self._y_norm = float(self.y.norm(dim=1).max())
        u_s = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[self.dtype]
        gamma = (self.dim + 2) * 2.0**-24
        hmax = float(h.abs().max())
        return 2 * (
            (2 * u_s + u_s * u_s + gamma) * x.norm(dim=1).double() * self._y_norm + gamma * hmax
        )

    def _rescore(self, x, h, scores, cand, k: int, bound: torch.Tensor | None = None):
        """Exact float64 scores; top-k with ties to the lowest index.

        Rows whose candidate-pass gap between the k-th and (k+1)-th score exceeds twice
        the candidate pass's error bound (``bound``, else :meth:`error_bound`) already have
        the exact top-k set: only those k are re-scored. The others (near-ties) re-score all
        c candidates.
        """
        cand = cand.to(self.device).long()
        sure = self.certified(x, h, scores, cand.shape, k, bound)
        values = torch.full(cand.shape, -torch.inf, dtype=torch.float64, device=self.device)
        values[sure, :k] = self._exact(x[sure], h, cand[sure, :k])
        values[~sure] = self._exact(x[~sure], h, cand[~sure])
        return topk_lowest_index(values, cand + self.offset, k)

    def certified(self, x, h, scores, shape, k: int, bound: torch.Tensor | None = None):
        """(B,) bool: rows whose candidate pass already has the exact top-k set, its gap
        between the k-th and (k+1)-th score above twice the pass's error bound (none when the
        pass returns no scores or only k candidates of ``shape`` = (B, c))."""
        if scores is None or shape[1] <= k:
            return torch.zeros(shape[0], dtype=torch.bool, device=self.device)
        scores = scores.to(self.device).double()
        bound = self.error_bound(x, h) if bound is None else bound.to(self.device)
        return (scores[:, k - 1] - scores[:, k]) > 2 * bound

    def _exact(self, x: torch.Tensor, h: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """⟨x_b, y_c⟩ + h_c in float64 for candidates cand (B, c), row by row."""
        out = torch.empty(cand.shape, dtype=torch.float64, device=self.device)
        step = max(_RESCORE_ROWS, _RESCORE_ELEMENTS // max(1, cand.shape[1] * self.dim))
        for r in range(0, x.shape[0], step):
            rows = slice(r, r + step)
            yc = self.y[cand[rows]].double()
            out[rows] = (x[rows, None, :].double() * yc).sum(-1) + h[cand[rows]]
        return out


def lattice_points_at(q: torch.Tensor, coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The lattice points number ``rows`` (point s·G + g) of the batch (q (S, m, D), coef
    (S, G, m)), with the bits of :meth:`~dpmot_dist.ot.sources.Lattice.points`."""
    g_pts = coef.shape[1]
    qs, c = q[rows // g_pts], coef[rows // g_pts, rows % g_pts]
    x = c[:, 0, None] * qs[:, 0]
    for j in range(1, q.shape[1]):
        x = x + c[:, j, None] * qs[:, j]
    return x


def topk_lowest_index(values: torch.Tensor, indices: torch.Tensor, k: int):
    """Top-k of each row by value, ties broken by the lowest index.

    Args: values (B, C), indices (B, C) with no repeats within a row.
    Returns: (values (B, k), indices (B, k)).
    """
    order = torch.argsort(indices, dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    top = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, top), indices.gather(1, top)


def merge_topk(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int):
    """Merge per-shard exact top-k answers into the global top-k (ties: lowest index)."""
    values = torch.cat([_tensor(v) for v, _ in parts], 1)
    indices = torch.cat([_tensor(i) for _, i in parts], 1)
    return topk_lowest_index(values, indices, min(k, values.shape[1]))


def search(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    h: torch.Tensor | np.ndarray,
    k: int = 1,
    *,
    backend: str = "auto",
    storage_dtype: str = "float32",
    device: torch.device | str = "cpu",
):
    """Top-k of ⟨x, y_i⟩ + h_i for every row of x; see :class:`TargetIndex`.

    Returns (values (B, k) float64, indices (B, k) int64).
    """
    index = TargetIndex(y, backend=backend, storage_dtype=storage_dtype, device=device)
    return index.search(x, h, k)


def _tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor view of ``a`` (numpy arrays from Ray's object store are read-only: copied)."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    return a
