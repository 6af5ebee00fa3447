"""The compiled exact-top-1 CPU kernel (``_top1.c``), through ctypes.

:func:`top1_rows` and :func:`top1_lattice` merge a GEMM tile into every point's running
(best fp32 score, its target, second-best score) under P ≤ 2 offset vectors; see ``_top1.c`` for
the two vectorised passes and the certificate. The kernel runs its points on torch's OpenMP
threads (it binds to the libgomp torch loaded: torch is imported first), so
``dpmot_dist.runtime.set_threads`` sets its thread count too.

The kernel is an optional extension built at install (``pyproject.toml``): :func:`available`
says whether it loaded.
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import torch  # noqa: F401  (loads torch's libgomp before the kernel binds to it)

_i64 = ctypes.c_int64


def _load():
    try:
        spec = importlib.util.find_spec("dpmot_dist.ot.kernels._top1")
    except ImportError:
        return None
    if spec is None or not spec.origin or not spec.origin.endswith((".so", ".pyd")):
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
        _declare(lib)
    except (OSError, AttributeError):  # unloadable, or a stale build missing a symbol
        return None
    return lib


def _declare(lib) -> None:
    """The argument and result types of the library's functions."""
    ptr = ctypes.c_void_p
    lib.dpmot_top1_rows.argtypes = [ptr, _i64, _i64, _i64, _i64, ptr, _i64, _i64, _i64]
    lib.dpmot_top1_rows.argtypes += [ptr, ptr, ptr]
    lib.dpmot_top1_lattice.argtypes = [ptr, _i64, _i64, ptr, _i64, _i64, _i64, ptr, _i64, _i64]
    lib.dpmot_top1_lattice.argtypes += [_i64, ptr, ptr, ptr]
    lib.dpmot_top1_rows.restype = lib.dpmot_top1_lattice.restype = ctypes.c_int
    lib.dpmot_top1_simd.restype = lib.dpmot_top1_set_simd.restype = ctypes.c_int
    lib.dpmot_top1_set_simd.argtypes = [ctypes.c_int]
    lib.dpmot_exact_rows.argtypes = [ptr, _i64, _i64, ptr, ptr, _i64, ptr, _i64, ptr]
    lib.dpmot_exact_lattice.argtypes = [ptr, _i64, _i64, _i64, ptr, _i64, ptr, ptr, _i64]
    lib.dpmot_exact_lattice.argtypes += [ptr, _i64, ptr]
    lib.dpmot_exact_rows.restype = lib.dpmot_exact_lattice.restype = None


_LIB = _load()


def available() -> bool:
    """Whether the compiled kernel loaded."""
    return _LIB is not None


def simd() -> bool:
    """Whether the kernel runs its AVX2 + FMA code on this CPU (else plain C)."""
    return bool(_LIB is not None and _LIB.dpmot_top1_simd())


def set_simd(allow: bool) -> bool:
    """Allow or forbid the AVX2 code (tests run both); returns whether it now runs."""
    return bool(_LIB.dpmot_top1_set_simd(int(allow)))


def empty_state(points: int, potentials: int):
    """Running (best, index, second) before the first tile: −inf, −1, −inf; each (points, P)."""
    best = np.full((points, potentials), -np.inf, np.float32)
    return best, np.full((points, potentials), -1, np.int64), best.copy()


def certified(state, thr: np.ndarray) -> np.ndarray:
    """(points, P) bool: the best target is the exact winner, its second-best fp32 score below
    best − thr (thr (points,): twice the bound on the fp32 scores' error), the difference
    rounded down so that rounding never certifies."""
    best, _, second = state
    thr = np.nextafter(np.asarray(thr, np.float32), np.float32(np.inf))[:, None]  # ≥ thr
    return second < np.nextafter(best - thr, np.float32(-np.inf))


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def _state_ok(state, points: int, potentials: int) -> None:
    best, idx, second = state
    assert best.shape == idx.shape == second.shape == (points, potentials)
    assert best.dtype == second.dtype == np.float32 and idx.dtype == np.int64
    assert all(a.flags.c_contiguous for a in state)


def top1_rows(s: np.ndarray, offsets: np.ndarray | None, t0: int, state):
    """Merge the (B, T) tile s of targets t0..t0+T into the running state (B, P).

    s: float32 rows (contiguous within a row); offsets: (P, T) float32 added to s (None: s
    holds the full scores, P = 1).
    """
    rows, width = s.shape
    assert s.dtype == np.float32 and s.strides[1] == 4
    p = 1 if offsets is None else offsets.shape[0]
    _state_ok(state, rows, p)
    if offsets is not None:
        assert offsets.dtype == np.float32 and offsets.shape[1] == width
        assert offsets.strides[1] == 4
    ld, ldo = s.strides[0] // 4, 0 if offsets is None else offsets.strides[0] // 4
    best, idx, second = state
    _LIB.dpmot_top1_rows(
        _ptr(s), ld, 0, rows, width, _ptr(offsets), ldo, p, t0, _ptr(best), _ptr(idx),
        _ptr(second),
    )  # fmt: skip


def top1_lattice(a: np.ndarray, coef: np.ndarray, offsets: np.ndarray, t0: int, state):
    """Merge the projections a (S, m, T) of targets t0..t0+T into the running state of the
    S·G lattice points (coef (S, G, m)) under the P offset vectors (P, T)."""
    n_sub, m, width = a.shape
    g_pts = coef.shape[1]
    p = offsets.shape[0]
    assert a.dtype == coef.dtype == offsets.dtype == np.float32 and p in (1, 2)
    assert a.flags.c_contiguous and coef.flags.c_contiguous and offsets.strides[1] == 4
    assert coef.shape == (n_sub, g_pts, m) and m in (2, 3) and offsets.shape[1] == width
    _state_ok(state, n_sub * g_pts, p)
    best, idx, second = state
    ldo = offsets.strides[0] // 4
    _LIB.dpmot_top1_lattice(
        _ptr(a), m, width, _ptr(coef), g_pts, 0, n_sub, _ptr(offsets), ldo, p, t0,
        _ptr(best), _ptr(idx), _ptr(second),
    )  # fmt: skip


def _c(a: np.ndarray, dtype) -> np.ndarray:
    assert a.dtype == dtype and a.flags.c_contiguous, (a.dtype, a.flags)
    return a


def exact_rows(x: np.ndarray, y: np.ndarray, h: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(B, P) float64 scores ⟨x_b, y_i⟩ + h[p, i] of i = idx[b, p] (x (B, D), y (N, D) float32,
    h (P, N) float64), summed as the numba re-score sums them (the same bits)."""
    out = np.empty(idx.shape, np.float64)
    _c(x, np.float32), _c(y, np.float32), _c(h, np.float64), _c(idx, np.int64)
    b, d = x.shape
    _LIB.dpmot_exact_rows(
        _ptr(x), b, d, _ptr(y), _ptr(h), y.shape[0], _ptr(idx), idx.shape[1], _ptr(out)
    )
    return out


def exact_lattice(q, coef, y: np.ndarray, h: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """:func:`exact_rows` for lattice points formed from q (S, m, D) and coef (S, G, m)
    float32 in :meth:`~dpmot_dist.ot.sources.Lattice.points`' order; idx (S·G, P)."""
    out = np.empty(idx.shape, np.float64)
    _c(q, np.float32), _c(coef, np.float32), _c(y, np.float32), _c(h, np.float64)
    _c(idx, np.int64)
    s, m, d = q.shape
    _LIB.dpmot_exact_lattice(
        _ptr(q), s, m, d, _ptr(coef), coef.shape[1], _ptr(y), _ptr(h), y.shape[0], _ptr(idx),
        idx.shape[1], _ptr(out),
    )  # fmt: skip
    return out
