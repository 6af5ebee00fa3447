r"""Fused Triton search: top-k of ⟨x, y_i⟩ + h_i without materialising the B×N scores.

For queries x (B×D, float32), targets y (N×D, stored float32, float16 or bfloat16) and
offsets h (N,, always float32) we want, for every row b,

.. math::
    s_{bi} = \langle x_b, y_i \rangle + h_i, \qquad
    \mathrm{top}_k(s_{b\cdot}) \text{ sorted by } (-s_{bi}, i)

(ties go to the lowest index). This is the argmax behind the Brenier map (DESIGN.md §2,
the augmented-vector trick ⟨[x, 1], [y_i, h_i]⟩ with the h column kept in fp32).

Algorithm (two stages, DESIGN.md §3):

1. *Candidates, on chip.* Program p owns the rows [p·BLOCK_B, (p+1)·BLOCK_B) and sweeps
   every target tile of BLOCK_N rows. The score tile is one ``tl.dot`` in y's dtype
   (x is rounded to that dtype on the host, accumulation in fp32; fp32 storage uses an
   IEEE fp32 dot, or TF32 with ``tf32=True``), plus h in fp32. Each score is packed with
   its index into one int64 *key*,

   .. math:: \kappa_{bi} = \mathrm{ord}(\tilde s_{bi}) \cdot 2^{32} + (2^{32} - 1 - i),

   where ord maps fp32 bits to an order-preserving int32, so that ``max`` over keys is the
   best score with ties to the lowest index. A running list of the C' best keys per row
   (C' = c rounded up to a power of two) is kept in registers; each tile is merged into
   it by repeated extraction (take the tile max, overwrite the list min if beaten, mask
   the taken key out), a loop that stops as soon as no row of the block gains, so it runs
   at most C' and usually 0–2 times per tile. At the end the list is sorted and the first
   c indices are written: the kernel's only output is B×c int32 indices.
2. *Exact re-score, in torch.* The candidates' fp32 rows (``y_exact``, or y itself when
   it is fp32) are gathered and scored in float64 (fp32×fp32 products are exact there;
   the sum is deterministic), and the top-k is taken with ties to the lowest index.

Error bound (:func:`score_error_bound`). Let u be the unit roundoff of the storage
format (2⁻⁸ bfloat16, 2⁻¹¹ float16, 2⁻¹⁰ for TF32 truncation, 0 for fp32) and η its
underflow half-spacing (2⁻²⁵ for float16, negligible otherwise). Rounding x and y_i gives
per-coordinate product errors ≤ (2u + u²)|x_d||y_id| + η(1 + u)(|x_d| + |y_id|) + η²;
the products of the rounded values are exact in fp32, and the fp32 accumulation of the
D products plus h_i adds at most γ_{D+1}(Σ_d|x̃_d ỹ_id| + |h_i|), γ_n = n·v/(1 − n·v) with
v = 2⁻²³ (twice the fp32 unit roundoff, a margin for tensor-core accumulation). With
Σ_d|x_d||y_id| ≤ ‖x‖₂·max_i‖y_i‖₂ this gives a per-row δ_b with |s̃_bi − s_bi| ≤ δ_b for
all i (no overflow assumed; fp16 inputs are checked against its range).

Guarantee. Sort row b's exact scores s_(1) ≥ s_(2) ≥ …. A target j displaces a true
top-k target i from the candidates only if s̃_j ≥ s̃_i, hence s_j ≥ s_i − 2δ_b. So if

.. math:: s_{(k)} - s_{(c+1)} > 2\delta_b,

fewer than c targets can outrank any true top-k target, all of the true top-k are among
the c candidates, and the exact re-score returns exactly the float64 brute-force top-k.
In particular the winner (k = 1) is exact whenever s_(1) − s_(c+1) > 2δ_b. On fp32
storage δ_b is ~D·2⁻²³ relative, so only near-exact ties can be missed.

The kernel runs on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set *before* triton is imported): slow, for tests on small
shapes. The interpreter multiplies bfloat16 blocks incorrectly (it keeps them as raw
uint16), so there the bfloat16 tiles are widened to fp32 before ``tl.dot``; products of
bfloat16 values are exact in fp32, so the result is the same.
"""

from __future__ import annotations

import math

import torch

from dpmot_dist.errors import DpmotError

try:
    import triton
    import triton.language as tl
except ImportError:  # the rest of the package works without triton
    triton = None
    tl = None

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACC_ROUNDOFF = 2.0**-23  # fp32 accumulation: twice the unit roundoff, for tensor cores
_INPUT_ROUNDING = {  # storage dtype -> (unit roundoff u, underflow half-spacing η)
    torch.float32: (0.0, 0.0),
    torch.float16: (2.0**-11, 2.0**-25),
    torch.bfloat16: (2.0**-8, 2.0**-134),
}
_TF32_ROUNDING = (2.0**-10, 0.0)  # TF32 may truncate: a full ulp of a 10-bit mantissa
_RESCORE_ELEMS = 1 << 24  # float64 elements gathered per re-score chunk (128 MiB)


def interpreting() -> bool:
    """Whether the kernel was built by the Triton interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_search_kernel, InterpretedFunction)


def is_available() -> bool:
    """Whether :func:`fused_search` can run: triton importable, and CUDA or the interpreter."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def candidate_count(k: int, candidates: int | None = None) -> int:
    """Number c of candidates kept per row: ``candidates``, or max(2k, 8) by default."""
    if k < 1:
        raise DpmotError(f"k must be ≥ 1, got {k}")
    if candidates is None:
        return max(2 * k, 8)
    if candidates < k:
        raise DpmotError(f"candidates must be ≥ k = {k}, got {candidates}")
    return candidates


def score_error_bound(
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
    h: torch.Tensor | None = None,
    *,
    tf32: bool = False,
) -> torch.Tensor:
    r"""Per-row bound δ_b ≥ max_i |s̃_bi − s_bi| on the kernel's low-precision scores.

    .. math::
        \delta_b = E_b + \gamma_{D+1}\,(A_b + E_b + \max_i |h_i|), \quad
        A_b = \|x_b\|_2 \max_i \|y_i\|_2, \quad
        E_b = (2u + u^2) A_b + \eta (1 + u)(\|x_b\|_1 + \max_i \|y_i\|_1) + D\eta^2

    (see the module docstring for u, η, γ and the derivation).

    Args:
        x: (B, D) queries. y: (N, D) exact (fp32) targets. dtype: the storage dtype of
        the copy the kernel reads. h: optional (N,) offsets. tf32: fp32 storage scored
        with a TF32 dot.
    Returns:
        (B,) float64 bounds.
    """
    if dtype not in _INPUT_ROUNDING:
        raise DpmotError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype}")
    u, eta = _TF32_ROUNDING if (tf32 and dtype == torch.float32) else _INPUT_ROUNDING[dtype]
    x64, y64 = x.double(), y.double()
    d = x.shape[1]
    gamma = (d + 1) * _ACC_ROUNDOFF / (1 - (d + 1) * _ACC_ROUNDOFF)
    a = x64.norm(dim=1) * y64.norm(dim=1).max()
    l1 = x64.abs().sum(1) + y64.abs().sum(1).max()
    e = (2 * u + u * u) * a + eta * (1 + u) * l1 + d * eta * eta
    h_max = 0.0 if h is None else float(h.double().abs().max())
    return e + gamma * (a + e + h_max)


def fused_candidates(
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    c: int,
    *,
    tf32: bool = False,
    block_b: int = 64,
    block_n: int = 64,
    block_d: int = 32,
) -> torch.Tensor:
    """Stage 1 alone: the c best targets of each row under the kernel's own arithmetic.

    Args:
        x: (B, D) queries. y: (N, D) float32/float16/bfloat16 targets. h: (N,) offsets
        (used in fp32). c: candidates per row (≥ 1).
    Returns:
        (B, c) int64 indices, best first by the low-precision score s̃ (ties: lowest
        index); -1 pads rows when N < c.
    """
    x, y, h = _check_inputs(x, y, h, (block_b, block_n, block_d))
    if c < 1:
        raise DpmotError(f"the candidate count c must be ≥ 1, got {c}")
    return _launch(x, y, h, c, tf32, (block_b, block_n, block_d)).long()


def fused_search(
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    k: int = 1,
    candidates: int | None = None,
    *,
    y_exact: torch.Tensor | None = None,
    tf32: bool = False,
    block_b: int = 64,
    block_n: int = 64,
    block_d: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Top-k of s_bi = ⟨x_b, y_i⟩ + h_i per row: fused low-precision pass + exact re-score.

    Args:
        x: (B, D) queries (cast to float32). y: (N, D) targets as searched, float32,
        float16 or bfloat16. h: (N,) offsets (float32). k: results per row, clamped to N.
        candidates: c, candidates kept per row (default max(2k, 8)); the result is exact
        whenever s_(k) − s_(c+1) > 2·:func:`score_error_bound`. y_exact: (N, D) float32
        targets for the re-score (default: y itself, widened to float32). tf32: score
        fp32 storage with a TF32 dot. block_b, block_n, block_d: tile sizes, powers of
        two ≥ 16.
    Returns:
        values (B, k) float32 and indices (B, k) int64, sorted by decreasing value, ties
        by increasing index.
    """
    x, y, h = _check_inputs(x, y, h, (block_b, block_n, block_d))
    c = candidate_count(k, candidates)
    y_exact = _exact_targets(y, y_exact)
    cand = _launch(x, y, h, c, tf32, (block_b, block_n, block_d))
    values, indices = _rescore(x, y_exact, h, cand, min(k, y.shape[0]))
    return values.to(x.device, torch.float32), indices.to(x.device)


def _check_inputs(
    x: torch.Tensor, y: torch.Tensor, h: torch.Tensor, blocks: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes, dtypes, devices and tiles once; return contiguous x (fp32), y, h (fp32)."""
    if not is_available():
        raise RuntimeError(
            "the fused Triton search needs triton and a CUDA device (or TRITON_INTERPRET=1 "
            "set before triton is imported, for CPU debugging)"
        )
    x, y, h = torch.as_tensor(x), torch.as_tensor(y), torch.as_tensor(h)
    if x.ndim != 2 or y.ndim != 2:
        raise DpmotError(f"x and y must be 2-D, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1] or y.shape[0] == 0 or y.shape[1] == 0:
        raise DpmotError(
            f"x (B×D) and y (N×D) must share D ≥ 1 and have N ≥ 1, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if h.shape != (y.shape[0],):
        raise DpmotError(f"h must have shape ({y.shape[0]},), got {tuple(h.shape)}")
    if y.dtype not in STORAGE_DTYPES:
        raise DpmotError(f"y must be stored as one of {STORAGE_DTYPES}, got {y.dtype}")
    if not (x.device == y.device == h.device):
        raise DpmotError(f"x, y, h must be on one device, got {x.device}, {y.device}, {h.device}")
    if x.device.type != "cuda" and not interpreting():
        raise DpmotError(f"fused_search needs CUDA tensors, got {x.device}")
    if any(b < 16 or b & (b - 1) for b in blocks):
        raise DpmotError(f"block sizes must be powers of two ≥ 16, got {blocks}")
    x = x.to(torch.float32).contiguous()
    _check_range(x, y.dtype)
    return x, y.contiguous(), h.to(torch.float32).contiguous()


def _check_range(x: torch.Tensor, dtype: torch.dtype) -> None:
    """Queries must be finite in the storage dtype (float16 overflows above 65504)."""
    if x.numel() and float(x.abs().max()) > torch.finfo(dtype).max:
        raise DpmotError(f"|x| exceeds the range of {dtype}; store y as bfloat16 or float32")


def _exact_targets(y: torch.Tensor, y_exact: torch.Tensor | None) -> torch.Tensor:
    """The fp32 targets the re-score reads: ``y_exact``, else y widened to float32."""
    if y_exact is None:
        return y.to(torch.float32)
    y_exact = torch.as_tensor(y_exact)
    if y_exact.shape != y.shape:
        raise DpmotError(
            f"y_exact must have y's shape {tuple(y.shape)}, got {tuple(y_exact.shape)}"
        )
    return y_exact.to(torch.float32)


def _launch(
    x: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    c: int,
    tf32: bool,
    blocks: tuple[int, int, int],
) -> torch.Tensor:
    """Run the kernel: (B, c) int32 candidate indices, best first, -1 where N < c."""
    (b, d), n = x.shape, y.shape[0]
    out = torch.full((b, c), -1, dtype=torch.int32, device=x.device)
    if b == 0:
        return out
    xs = x.to(y.dtype)  # round-to-nearest-even on the host, as the bound assumes
    grid = (triton.cdiv(b, blocks[0]),)
    _search_kernel[grid](
        xs,
        y,
        h,
        out,
        b,
        n,
        d,
        xs.stride(0),
        y.stride(0),
        out.stride(0),
        c,
        C=max(2, 1 << (c - 1).bit_length()),
        BLOCK_B=blocks[0],
        BLOCK_N=blocks[1],
        BLOCK_D=blocks[2],
        PRECISION="tf32" if tf32 else "ieee",
        UPCAST=interpreting() and y.dtype == torch.bfloat16,
    )
    return out


def _rescore(
    x: torch.Tensor, y_exact: torch.Tensor, h: torch.Tensor, cand: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores ⟨x_b, y_c⟩ + h_c (float64) of the (B, c) candidates, then their top-k."""
    dev = y_exact.device
    cand = cand.to(dev, torch.int64)
    safe = cand.clamp_min(0)
    x64, h64 = x.to(dev, torch.float64), h.to(dev, torch.float64)
    values = torch.empty(cand.shape, dtype=torch.float64, device=dev)
    step = max(1, _RESCORE_ELEMS // (cand.shape[1] * x.shape[1]))
    for r in range(0, x.shape[0], step):
        rows = slice(r, r + step)
        y_c = y_exact[safe[rows]].double()  # (b, c, D)
        values[rows] = (x64[rows, None, :] * y_c).sum(-1) + h64[safe[rows]]
    values = values.masked_fill(cand < 0, -math.inf)
    return _topk_lowest_index(values, cand, k, y_exact.shape[0])


def _topk_lowest_index(
    values: torch.Tensor, indices: torch.Tensor, k: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of (B, c) values by (−value, index); padding (-1) sorts last."""
    order = torch.argsort(torch.where(indices < 0, n, indices), dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    top = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, top), indices.gather(1, top)


if triton is not None:
    _KEY_NONE = tl.constexpr(-(2**63))  # below every key: masked targets, empty slots
    _LOW = tl.constexpr(2**32 - 1)
    _INT32_MIN = tl.constexpr(-(2**31))

    @triton.jit
    def _pack_keys(s, cols, valid):
        """κ = ord(s)·2³² + (2³² − 1 − col) for the (BB, BN) scores; invalid → KEY_NONE."""
        bits = s.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # fp32 order as signed int32 order
        key = (ordered.to(tl.int64) << 32) | (_LOW - cols.to(tl.int64))
        return tl.where(valid, key, _KEY_NONE)

    @triton.jit
    def _unpack_index(best):
        """Index of each (BB, C') key; -1 for slots that never received a target."""
        index = _LOW - (best & _LOW)
        return tl.where((best >> 32) > _INT32_MIN, index, -1).to(tl.int32)

    @triton.jit
    def _merge_tile(best, key):
        """Merge the (BB, BN) tile keys into the running (BB, C') best keys of each row."""
        top = tl.max(key, axis=1)
        worst = tl.min(best, axis=1)
        while tl.max((top > worst).to(tl.int32), axis=0) > 0:
            gain = (top > worst)[:, None]
            best = tl.where(gain & (best == worst[:, None]), top[:, None], best)
            key = tl.where(key == top[:, None], _KEY_NONE, key)
            top = tl.max(key, axis=1)
            worst = tl.min(best, axis=1)
        return best

    @triton.jit
    def _score_tile(
        x_ptr,
        y_ptr,
        h_ptr,
        rows,
        cols,
        B,
        N,
        D,
        stride_x,
        stride_y,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """(BB, BN) scores s̃ = x·yᵀ (storage dtype, fp32 accumulate) + h (fp32)."""
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
        y_cols = y_ptr + cols.to(tl.int64)[None, :] * stride_y
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            xa = tl.load(
                x_rows + dd[None, :], mask=(rows[:, None] < B) & (dd[None, :] < D), other=0.0
            )
            yb = tl.load(
                y_cols + dd[:, None], mask=(dd[:, None] < D) & (cols[None, :] < N), other=0.0
            )
            if UPCAST:
                xa = xa.to(tl.float32)
                yb = yb.to(tl.float32)
            acc = tl.dot(xa, yb, acc, input_precision=PRECISION)
        h = tl.load(h_ptr + cols, mask=cols < N, other=0.0)
        return acc + h[None, :]

    @triton.jit
    def _search_kernel(
        x_ptr,
        y_ptr,
        h_ptr,
        out_ptr,
        B,
        N,
        D,
        stride_x,
        stride_y,
        stride_out,
        n_out,
        C: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """One program: BLOCK_B query rows against all N targets; writes n_out indices/row."""
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        slots = tl.arange(0, C)
        best = tl.zeros([BLOCK_B, C], dtype=tl.int64) + slots[None, :].to(tl.int64)
        best = best + (_KEY_NONE + 1)  # distinct empty keys, each above KEY_NONE
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            s = _score_tile(
                x_ptr,
                y_ptr,
                h_ptr,
                rows,
                cols,
                B,
                N,
                D,
                stride_x,
                stride_y,
                BLOCK_B,
                BLOCK_N,
                BLOCK_D,
                PRECISION,
                UPCAST,
            )
            best = _merge_tile(best, _pack_keys(s, cols[None, :], (cols < N)[None, :]))
        best = tl.sort(best, dim=1, descending=True)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + slots[None, :]
        tl.store(out, _unpack_index(best), mask=(rows[:, None] < B) & (slots[None, :] < n_out))


# ---------------------------------------------------------------------------------------------
# Lattice points: scores from their subspace's projections, merged on chip


def lattice_candidates(
    a: torch.Tensor,
    coef: torch.Tensor,
    h: torch.Tensor,
    start: int,
    best: torch.Tensor | None,
    c: int,
    *,
    block_p: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    r"""Merge one tile of targets into the running top-c of every lattice point, on chip.

    For subspace s with projections a_{sjt} = ⟨q_sj, y_t⟩ of the tile's targets t (computed
    beforehand by one GEMM), point g of s scores

    .. math:: \tilde s_{sgt} = \tilde h_t + \sum_{j<m} c_{sgj}\, a_{sjt}

    (fp32, 2m + 1 flops): the kernel forms these scores tile by tile in registers and merges
    them into each point's running list of packed (score, index) keys, as
    :func:`fused_candidates` does for plain rows; no (points × N) score matrix is written.

    Args:
        a: (S, m, T) float32 projections of targets start..start+T. coef: (S, G, m) float32.
        h: (T,) float32 offsets of the tile. start: global index of the tile's first target.
        best: (S·G, C') int64 running keys from the previous tiles, or None for the first.
        c: candidates wanted (C' = c rounded up to a power of two).
    Returns:
        The updated (S·G, C') keys; :func:`lattice_topc` turns them into indices.
    """
    s, m, t = a.shape
    g = coef.shape[1]
    width = max(2, 1 << (c - 1).bit_length())
    if best is None:
        slots = torch.arange(width, device=a.device, dtype=torch.int64)
        best = (slots + (-(2**63) + 1)).expand(s * g, width).contiguous()
    grid = (triton.cdiv(s * g, block_p),)
    _lattice_kernel[grid](
        a.contiguous(),
        coef.contiguous(),
        h.contiguous(),
        best,
        s * g,
        g,
        t,
        start,
        M=m,
        C=width,
        BLOCK_P=block_p,
        BLOCK_N=block_n,
    )
    return best


def lattice_topc(best: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, c) float32 scores s̃ and int64 indices of :func:`lattice_candidates`' keys, best
    first (ties: lowest index); empty slots have index −1 and score −inf."""
    keys = torch.sort(best, dim=1, descending=True).values[:, :c]
    low = 2**32 - 1
    filled = (keys >> 32) > -(2**31)
    index = torch.where(filled, low - (keys & low), torch.full_like(keys, -1))
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)  # the key's order map is an involution
    scores = torch.where(
        filled, bits.view(torch.float32), torch.full_like(bits, 0).float() - math.inf
    )
    return scores, index


if triton is not None:

    @triton.jit
    def _lattice_kernel(
        a_ptr,
        coef_ptr,
        h_ptr,
        best_ptr,
        P,
        G,
        T,
        start,
        M: tl.constexpr,
        C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One program: BLOCK_P lattice points against the T targets of one tile."""
        points = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        live = points < P
        sub = points // G  # each point's subspace
        slots = tl.arange(0, C)
        keys = best_ptr + points.to(tl.int64)[:, None] * C + slots[None, :]
        best = tl.load(keys, mask=live[:, None], other=_KEY_NONE)
        rows = a_ptr + (sub.to(tl.int64) * M)[:, None] * T
        for n0 in range(0, T, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            valid = live[:, None] & (cols < T)[None, :]
            s = tl.load(h_ptr + cols, mask=cols < T, other=0.0)[None, :] + tl.zeros(
                [BLOCK_P, BLOCK_N], dtype=tl.float32
            )
            for j in range(M):
                cj = tl.load(coef_ptr + points.to(tl.int64) * M + j, mask=live, other=0.0)
                aj = tl.load(rows + j * T + cols[None, :], mask=valid, other=0.0)
                s += cj[:, None] * aj
            best = _merge_tile(best, _pack_keys(s, start + cols[None, :], valid))
        tl.store(keys, best, mask=live[:, None])
