r"""Fused CPU search kernels (numba): running top-c and exact re-score without B×N temporaries.

The CPU counterpart of :mod:`dpmot_dist.ot.kernels.triton_search`. The O(D) work stays a BLAS
GEMM (``torch.addmm`` on a tile of targets, multi-threaded); these kernels do the rest in one
pass over each tile, rows in parallel:

- :func:`topc_rows`: merge a (B, T) tile of candidate scores s̃ into each row's running list
  of the c best (value, index). A row's tile is skipped after one vectorised max when it holds
  nothing above the row's current c-th best, so after the first tiles the cost is one compare
  per score.
- :func:`topc_lattice`: the same for lattice points (:class:`~dpmot_dist.ot.sources.Lattice`)
  scored from their subspace's m projections: for subspace s, point g and target t,

  .. math:: \tilde s_{sgt} = \tilde h_t + \sum_{j<m} c_{sgj} a_{sjt},
            \qquad a_{sjt} = \langle q_{sj}, y_t \rangle,

  2m + 1 flops per point and target, computed in L1-sized blocks of targets and merged into
  the running top-c at once: no (points × N) score matrix is ever written.
- :func:`rescore_rows` / :func:`rescore_lattice`: stage 2 of the search (see
  :mod:`dpmot_dist.ot.search`): the exact float64 scores ⟨x, y_c⟩ + h_c of a row's candidates
  and its top-k with ties to the lowest index. Rows whose candidate-pass gap between the k-th
  and (k+1)-th score exceeds twice their error bound re-score only k candidates. Lattice
  points are formed on the fly in fp32 in the same order as
  :meth:`~dpmot_dist.ot.sources.Lattice.points` (x = c₀q₀, then x + c_j q_j, each product and
  sum rounded to fp32), so the result is bit for bit that of searching the explicit points.

Numba compiles each kernel on first use (cached on disk next to this file when writable). The
package works without numba: :func:`available` says whether these kernels can run, and the
search falls back to torch.
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # the search falls back to torch
    numba = None
else:
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool: its OpenMP layer would load a second libgomp beside
        # torch's and faiss's, and the two crash each other
        numba.config.THREADING_LAYER = "workqueue"

BLOCK = 1024  # targets scored per block in topc_lattice (its rows stay in L1)
SPAN = 64  # scores per span whose maximum decides whether the span is scanned
ROWS = 64  # rows of a score tile per parallel task (their scratch space allocated once)
PARALLEL_WORK = 1 << 21  # scores (or multiply-adds) from which a kernel call runs in parallel


def available() -> bool:
    """Whether numba is importable (the kernels compile on first use)."""
    return numba is not None


def empty_topc(rows: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty running lists: values −inf (float32), indices −1 (int64), each (rows, c)."""
    return np.full((rows, c), -np.inf, np.float32), np.full((rows, c), -1, np.int64)


def _parallel_or_serial(work, **options):
    """Compile the kernel twice, its ``prange`` loops parallel and serial, and call the serial
    one when ``work(*args)`` (its multiply-adds or scores) is under PARALLEL_WORK: starting
    numba's thread pool costs ~0.2 ms a call, more than a small search takes."""

    def wrap(fn):
        parallel = njit(parallel=True, cache=True, **options)(fn)
        serial = njit(cache=True, **options)(fn)

        def call(*args):
            return (parallel if work(*args) >= PARALLEL_WORK else serial)(*args)

        call.__name__, call.__doc__ = fn.__name__, fn.__doc__
        call.parallel, call.serial = parallel, serial
        return call

    return wrap


if numba is not None:

    @njit(inline="always")
    def _insert(bv, bi, v, idx):
        """Insert (v, idx), which beats the last entry, into the sorted list (bv, bi); equal
        values keep the earlier (lower-index) entry first."""
        q = bv.shape[0] - 1
        while q > 0 and bv[q - 1] < v:
            bv[q] = bv[q - 1]
            bi[q] = bi[q - 1]
            q -= 1
        bv[q] = v
        bi[q] = idx

    @njit(inline="always")
    def _ordered(bits):
        """The int32 bits of a float32 mapped to an int32 of the same order (an involution:
        applied twice it gives the bits back)."""
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @njit(inline="always")
    def _span_maxima(bits, n, maxima):
        """maxima[s] = the order key of max(scores[s·SPAN : (s+1)·SPAN]) for the n scores whose
        float32 bits are ``bits``: an integer max, which the compiler vectorises (a float max
        reduction it does not)."""
        spans = (n + SPAN - 1) // SPAN
        for s in range(spans):
            span = bits[s * SPAN : min(n, (s + 1) * SPAN)]
            mx = np.int32(-(2**31))
            for t in range(len(span)):
                mx = max(mx, _ordered(span[t]))
            maxima[s] = mx
        return spans

    @njit(inline="always")
    def _scan(buf, n, maxima, spans, t0, bv, bi, top, keyf, keyi):
        """Merge scores buf[:n] of targets t0.. into the running list (bv, bi), given the order
        keys of their spans' maxima: only the spans that can hold a winner are scanned, those
        reaching both the list's last value and the c-th largest span maximum (the c largest
        maxima are c distinct scores, so the block's own top c are all that large). ``top``
        (c int32), ``keyf`` (one float32) and ``keyi`` (its int32 view) are scratch space."""
        c = bv.shape[0]
        top[:] = -(2**31)  # the c largest span maxima, descending
        for s in range(spans):
            mx = maxima[s]
            if mx > top[c - 1]:
                q = c - 1
                while q > 0 and top[q - 1] < mx:
                    top[q] = top[q - 1]
                    q -= 1
                top[q] = mx
        keyf[0] = bv[c - 1]
        floor = max(_ordered(keyi[0]), top[c - 1])
        keyi[0] = _ordered(floor)  # the floor's score: no score below it can be a winner
        least = keyf[0]
        thr = bv[c - 1]
        for s in range(spans):
            if maxima[s] < floor:
                continue
            lo = s * SPAN
            span = buf[lo : min(n, lo + SPAN)]
            for t in range(len(span)):
                v = span[t]
                if v > thr and v >= least:
                    _insert(bv, bi, v, t0 + lo + t)
                    thr = bv[c - 1]

    @_parallel_or_serial(lambda s, *_: s.size)
    def topc_rows(s, t0, best_v, best_i):
        """Merge the (B, T) score tile of targets t0..t0+T into the (B, c) running lists
        (rows in parallel, in groups of ROWS so that scratch space is allocated per group)."""
        n_rows, width = s.shape
        bits = s.view(np.int32)
        for grp in prange((n_rows + ROWS - 1) // ROWS):
            maxima = np.empty(BLOCK // SPAN + 1, np.int32)
            top = np.empty(best_v.shape[1], np.int32)
            keyf = np.empty(1, np.float32)
            keyi = keyf.view(np.int32)
            for b in range(grp * ROWS, min(n_rows, (grp + 1) * ROWS)):
                for b0 in range(0, width, BLOCK):
                    n = min(BLOCK, width - b0)
                    spans = _span_maxima(bits[b, b0 : b0 + n], n, maxima)
                    row = s[b, b0 : b0 + n]
                    _scan(row, n, maxima, spans, t0 + b0, best_v[b], best_i[b], top, keyf, keyi)

    @_parallel_or_serial(lambda a, coef, *_: a.size // a.shape[1] * coef.shape[1])
    def topc_lattice(a, coef, h, t0, best_v, best_i):
        """Running top-c of lattice points over the targets t0..t0+T of one tile.

        a: (S, m, T) float32 projections ⟨q_sj, y_t⟩ (m = 2 or 3); coef: (S, G, m) float32;
        h: (T,) float32 offsets of the tile; best_v, best_i: (S·G, c) running lists (point
        s·G + g). Per block of targets and point, one vectorised loop forms the scores (IEEE
        fp32, in a fixed order), one takes their spans' maxima, and :func:`_scan` reads only
        the spans that matter.
        """
        n_sub, m, width = a.shape
        g_pts = coef.shape[1]
        for s in prange(n_sub):
            buf = np.empty(BLOCK, np.float32)
            bits = buf.view(np.int32)
            maxima = np.empty(BLOCK // SPAN + 1, np.int32)
            top = np.empty(best_v.shape[1], np.int32)
            keyf = np.empty(1, np.float32)
            keyi = keyf.view(np.int32)
            a0, a1, a2 = a[s, 0], a[s, 1], a[s, m - 1]
            for b0 in range(0, width, BLOCK):
                n = min(BLOCK, width - b0)
                # slices indexed by range() variables: no negative-index wraparound test in
                # the loops, so they vectorise
                hb, a0b, a1b, a2b = (
                    h[b0 : b0 + n],
                    a0[b0 : b0 + n],
                    a1[b0 : b0 + n],
                    a2[b0 : b0 + n],
                )
                for g in range(g_pts):
                    c0, c1 = coef[s, g, 0], coef[s, g, 1]
                    if m == 3:
                        c2 = coef[s, g, 2]
                        for t in range(n):
                            buf[t] = ((hb[t] + c0 * a0b[t]) + c1 * a1b[t]) + c2 * a2b[t]
                    else:
                        for t in range(n):
                            buf[t] = (hb[t] + c0 * a0b[t]) + c1 * a1b[t]
                    spans = _span_maxima(bits, n, maxima)
                    p = s * g_pts + g
                    _scan(buf, n, maxima, spans, t0 + b0, best_v[p], best_i[p], top, keyf, keyi)

    @njit(inline="always")
    def _select_topk(vals, idx, r, k, out_v, out_i):
        """Top-k of (vals[:r], idx[:r]) by (−value, index) into out_v, out_i (length k)."""
        for q in range(k):
            out_v[q] = -np.inf
            out_i[q] = -1
        for j in range(r):
            v, i = vals[j], idx[j]
            if i < 0:
                continue
            q = k
            while q > 0 and (
                out_i[q - 1] < 0 or v > out_v[q - 1] or (v == out_v[q - 1] and i < out_i[q - 1])
            ):
                q -= 1
            if q < k:
                for z in range(k - 1, q, -1):
                    out_v[z] = out_v[z - 1]
                    out_i[z] = out_i[z - 1]
                out_v[q] = v
                out_i[q] = i

    @njit(inline="always")
    def _rescored_count(cand_v, b, k, bound):
        """Candidates of row b to re-score: k when the gap certifies them, else all c."""
        c = cand_v.shape[1]
        if c > k and cand_v[b, k - 1] - cand_v[b, k] > 2.0 * bound[b]:
            return k
        return c

    @_parallel_or_serial(lambda x, y, h, cand_v, *_: x.size * cand_v.shape[1])
    def rescore_rows(x, y, h, cand_v, cand_i, bound, k, offset, out_v, out_i):
        """Exact top-k of every row of x from its candidates (see the module docstring).

        x: (B, D) float32; y: (N, D) float32; h: (N,) float64; cand_v, cand_i: (B, c)
        candidate-pass scores and local indices (−1: none); bound: (B,) float64 error bounds;
        offset: added to the returned indices; out_v (B, k) float64, out_i (B, k) int64.
        """
        c = cand_i.shape[1]
        for b in prange(x.shape[0]):
            r = _rescored_count(cand_v, b, k, bound)
            vals = np.empty(c, np.float64)
            for j in range(r):
                i = cand_i[b, j]
                if i < 0:
                    vals[j] = -np.inf
                    continue
                acc = 0.0
                for d in range(x.shape[1]):
                    acc += np.float64(x[b, d]) * np.float64(y[i, d])
                vals[j] = acc + h[i]
            _select_topk(vals, cand_i[b], r, k, out_v[b], out_i[b])
            for q in range(k):
                if out_i[b, q] >= 0:
                    out_i[b, q] += offset

    @_parallel_or_serial(lambda q, coef, y, h, cand_v, *_: cand_v.size * q.shape[2])
    def rescore_lattice(q, coef, y, h, cand_v, cand_i, bound, k, offset, out_v, out_i):
        """:func:`rescore_rows` for lattice points x_sg = Σ_j coef[s, g, j] q[s, j], formed in
        fp32 in :meth:`Lattice.points`' order (q: (S, m, D), coef: (S, G, m) float32)."""
        n_sub, m, dim = q.shape
        g_pts = coef.shape[1]
        c = cand_i.shape[1]
        for p in prange(n_sub * g_pts):
            s, g = p // g_pts, p % g_pts
            x = np.empty(dim, np.float32)
            for d in range(dim):
                x[d] = coef[s, g, 0] * q[s, 0, d]
            for j in range(1, m):
                cj = coef[s, g, j]
                for d in range(dim):
                    x[d] = x[d] + np.float32(cj * q[s, j, d])
            r = _rescored_count(cand_v, p, k, bound)
            vals = np.empty(c, np.float64)
            for j in range(r):
                i = cand_i[p, j]
                if i < 0:
                    vals[j] = -np.inf
                    continue
                acc = 0.0
                for d in range(dim):
                    acc += np.float64(x[d]) * np.float64(y[i, d])
                vals[j] = acc + h[i]
            _select_topk(vals, cand_i[p], r, k, out_v[p], out_i[p])
            for z in range(k):
                if out_i[p, z] >= 0:
                    out_i[p, z] += offset


# -- exact top-1 under one or two offset vectors (the solver's hot path) -------------------------
#
# The solver needs every point's argmax at h and, with the snapshot control variate, at the
# snapshot h_s too: one exact winner per potential, nothing more. The kernels below keep, per
# point and potential, the fp32 best score, its target and the second-best score: the gap
# best − second certifies the winner against the candidate pass's rounding (see
# :meth:`~dpmot_dist.ot.search.TargetIndex.search_top1`). A block's winner is found from its
# spans' maxima: only the span holding the largest one is scanned, the second-largest span
# maximum bounds the block's runner-up from below; a tie anywhere makes the gap 0, so the
# point goes to the exact fallback, which breaks ties by the lowest index.


def empty_top1(rows: int, potentials: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty running winners: best and second −inf (float32), index −1, each (rows, P)."""
    best = np.full((rows, potentials), -np.inf, np.float32)
    return best, np.full((rows, potentials), -1, np.int64), best.copy()


if numba is not None:

    @njit(inline="always")
    def _block_top1(buf, bits, n, maxima, t0, bv, bi, bs, p, keyf, keyi):
        """Merge the block's scores buf[:n] (targets t0..t0+n) into the running (best bv[p],
        index bi[p], second bs[p]) of one point."""
        spans = _span_maxima(bits, n, maxima)
        m1 = np.int32(-(2**31))
        m2 = np.int32(-(2**31))
        s1 = 0
        for s in range(spans):
            mx = maxima[s]
            if mx > m1:
                m2 = m1
                m1 = mx
                s1 = s
            elif mx > m2:
                m2 = mx
        lo = s1 * SPAN
        span = buf[lo : min(n, lo + SPAN)]
        best = np.float32(-np.inf)
        second = np.float32(-np.inf)
        idx = 0
        for t in range(len(span)):
            v = span[t]
            if v > best:
                second = best
                best = v
                idx = t
            elif v > second:
                second = v
        keyi[0] = _ordered(m2)
        second = max(second, keyf[0])  # the other spans' best
        if best > bv[p]:
            bs[p] = max(bv[p], second)
            bv[p] = best
            bi[p] = t0 + lo + idx
        else:
            bs[p] = max(bs[p], best)

    @_parallel_or_serial(lambda s, *_: s.size)
    def top1_rows(s, offsets, t0, best_v, best_i, second_v):
        """Merge the (B, T) tile s = x·yᵀ of targets t0..t0+T into the running winners of each
        row under P offset vectors: the scores s[b, t] + offsets[p, t] (fp32), rows in
        parallel. best_v, best_i, second_v: (B, P) running best, its target, second best."""
        n_rows, width = s.shape
        n_pot = offsets.shape[0]
        for grp in prange((n_rows + ROWS - 1) // ROWS):
            buf = np.empty(BLOCK, np.float32)
            bits = buf.view(np.int32)
            maxima = np.empty(BLOCK // SPAN + 1, np.int32)
            keyi = np.empty(1, np.int32)
            keyf = keyi.view(np.float32)
            for b in range(grp * ROWS, min(n_rows, (grp + 1) * ROWS)):
                for b0 in range(0, width, BLOCK):
                    n = min(BLOCK, width - b0)
                    row = s[b, b0 : b0 + n]
                    for p in range(n_pot):
                        off = offsets[p, b0 : b0 + n]
                        for t in range(n):
                            buf[t] = row[t] + off[t]
                        _block_top1(
                            buf, bits, n, maxima, t0 + b0, best_v[b], best_i[b], second_v[b],
                            p, keyf, keyi,
                        )  # fmt: skip

    @_parallel_or_serial(
        lambda a, coef, *_: a.size // a.shape[1] * coef.shape[1], fastmath={"contract"}
    )
    def top1_lattice(a, coef, offsets, t0, best_v, best_i, second_v):
        """:func:`top1_rows` for lattice points scored from their subspace's projections:
        s̃ = offsets[p, t] + Σ_j coef[s, g, j]·a[s, j, t] (fp32, fused multiply-adds allowed).

        a: (S, m, T) float32; coef: (S, G, m); offsets: (P, T); best_v, best_i, second_v:
        (S·G, P), point s·G + g.
        """
        n_sub, m, width = a.shape
        g_pts = coef.shape[1]
        n_pot = offsets.shape[0]
        for s in prange(n_sub):
            base = np.empty(BLOCK, np.float32)
            buf = np.empty(BLOCK, np.float32)
            bits = buf.view(np.int32)
            maxima = np.empty(BLOCK // SPAN + 1, np.int32)
            keyi = np.empty(1, np.int32)
            keyf = keyi.view(np.float32)
            a0, a1, a2 = a[s, 0], a[s, 1], a[s, m - 1]
            for b0 in range(0, width, BLOCK):
                n = min(BLOCK, width - b0)
                a0b, a1b, a2b = a0[b0 : b0 + n], a1[b0 : b0 + n], a2[b0 : b0 + n]
                for g in range(g_pts):
                    c0, c1 = coef[s, g, 0], coef[s, g, 1]
                    c2 = coef[s, g, 2] if m == 3 else np.float32(0.0)
                    for t in range(n):
                        base[t] = c0 * a0b[t] + c1 * a1b[t] + c2 * a2b[t]
                    p0 = s * g_pts + g
                    for p in range(n_pot):
                        off = offsets[p, b0 : b0 + n]
                        for t in range(n):
                            buf[t] = base[t] + off[t]
                        _block_top1(
                            buf, bits, n, maxima, t0 + b0, best_v[p0], best_i[p0], second_v[p0],
                            p, keyf, keyi,
                        )  # fmt: skip

    @_parallel_or_serial(lambda x, y, h, idx, *_: idx.size * x.shape[1])
    def exact_rows(x, y, h, idx, out):
        """out[b, p] = ⟨x_b, y_i⟩ + h[p, i] in float64 for i = idx[b, p]: each potential's
        winner scored exactly (x (B, D) float32, y (N, D) float32, h (P, N) float64, idx
        (B, P) local indices, out (B, P))."""
        for b in prange(x.shape[0]):
            for z in range(idx.shape[1]):
                i = idx[b, z]
                acc = 0.0
                for d in range(x.shape[1]):
                    acc += np.float64(x[b, d]) * np.float64(y[i, d])
                out[b, z] = acc + h[z, i]

    @_parallel_or_serial(lambda q, coef, y, h, idx, *_: idx.size * q.shape[2] * (1 + q.shape[1]))
    def exact_lattice(q, coef, y, h, idx, out):
        """:func:`exact_rows` for lattice points x_sg formed in fp32 in
        :meth:`~dpmot_dist.ot.sources.Lattice.points`' order (q (S, m, D), coef (S, G, m)
        float32); idx, out: (S·G, P), point s·G + g."""
        n_sub, m, dim = q.shape
        g_pts = coef.shape[1]
        for p in prange(n_sub * g_pts):
            s, g = p // g_pts, p % g_pts
            x = np.empty(dim, np.float32)
            for d in range(dim):
                x[d] = coef[s, g, 0] * q[s, 0, d]
            for j in range(1, m):
                cj = coef[s, g, j]
                for d in range(dim):
                    x[d] = x[d] + np.float32(cj * q[s, j, d])
            for z in range(idx.shape[1]):
                i = idx[p, z]
                acc = 0.0
                for d in range(dim):
                    acc += np.float64(x[d]) * np.float64(y[i, d])
                out[p, z] = acc + h[z, i]
