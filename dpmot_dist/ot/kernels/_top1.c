/*
 * Fused exact-top-1 candidate pass on the CPU: every point's best fp32 score under one or two
 * offset vectors, its target, and the second-best score that certifies it.
 *
 * The SDOT solver needs, per source point, the argmax of <x, y_t> + h_t (and, with the snapshot
 * control variate, of <x, y_t> + hs_t): one winner per potential, nothing more. For each point
 * and potential the kernel keeps a running (best, idx, second) over the tiles of targets; one
 * vectorised pass over a block of scores updates it (AVX2 + FMA where the CPU has them, plain
 * C otherwise): every lane keeps its own best, the best's position and its second best, and
 * the lanes are reduced once per block. Ties keep the first (lowest) target and make the
 * second equal to the best.
 *
 * The caller certifies a point when second < best - thr, thr being twice the rigorous bound on
 * |s~ - s| of the fp32 scores (search.py: error_bound, lattice_error_bound): then no other
 * target can score, exactly, as high as the best one. Other points are searched again exactly
 * (ties then go to the lowest index). No score matrix is written for lattice points, and a
 * GEMM tile of scores (independent points) is read once.
 *
 * Lattice points (sources.py: Lattice) are scored from their subspace's m = 2 or 3 projections
 * a_j(t) = <q_j, y_t>: s~ = c0*a0 + c1*a1 (+ c2*a2) + off_t, fused multiply-adds, 2m + 1 flops.
 *
 * Called through ctypes (the GIL is released during the call). Points run in parallel on the
 * OpenMP threads: built with -fopenmp, the extension binds to the libgomp that torch has
 * already loaded (same soname), so the kernel and torch's GEMMs share one thread team (a
 * second runtime's threads would compete with torch's spinning ones for the cores). Built at
 * install time as an optional extension (pyproject.toml); without it the search falls back to
 * the numba top-c kernels.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DPMOT_X86 1
#endif

#define BT 1024             /* targets per block: a subspace's block of projections stays in L1 */
#define POINTS_PER_TASK 32  /* points per parallel task */
#define PARALLEL_WORK (1 << 16) /* scores from which a call runs on the OpenMP threads */

/* Merge a block's (mx at position t0 + at, second sec) into a point's running state. */
static inline void merge(float mx, int64_t at, float sec, float *best, int64_t *idx,
                         float *second) {
    if (mx > *best) {
        *second = *best > sec ? *best : sec;
        *best = mx;
        *idx = at;
    } else if (mx > *second) {
        *second = mx;
    }
}

/* ---- plain C ------------------------------------------------------------------------- */

/* Top-2 of scores v[t] (+ o[t] when o) for t < n: best, its position, second. */
static inline void top2_plain(const float *v, const float *o, int64_t n, float *mx,
                              int64_t *at, float *sec) {
    float m1 = -INFINITY, m2 = -INFINITY;
    int64_t i1 = 0;
    for (int64_t t = 0; t < n; t++) {
        float s = o ? v[t] + o[t] : v[t];
        if (s > m1) {
            m2 = m1;
            m1 = s;
            i1 = t;
        } else if (s > m2) {
            m2 = s;
        }
    }
    *mx = m1, *at = i1, *sec = m2;
}

static void rows_plain(const float *s, int64_t ld, int64_t r0, int64_t r1, int64_t width,
                       const float *offs, int64_t ldo, int64_t P, int64_t t0, float *best,
                       int64_t *idx, float *second) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t p = 0; p < P; p++) {
            float mx, sec;
            int64_t at, k = r * P + p;
            top2_plain(s + r * ld, offs ? offs + p * ldo : NULL, width, &mx, &at, &sec);
            merge(mx, t0 + at, sec, best + k, idx + k, second + k);
        }
    }
}

static void lattice_plain(const float *a, int64_t m, int64_t T, const float *coef, int64_t G,
                          int64_t s0, int64_t s1, const float *offs, int64_t ldo, int64_t P,
                          int64_t t0, float *best, int64_t *idx, float *second) {
    float base[BT];
    for (int64_t s = s0; s < s1; s++) {
        const float *a0 = a + s * m * T, *a1 = a0 + T, *a2 = m == 3 ? a1 + T : a1;
        for (int64_t b0 = 0; b0 < T; b0 += BT) {
            int64_t n = T - b0 < BT ? T - b0 : BT;
            for (int64_t g = 0; g < G; g++) {
                int64_t pt = s * G + g;
                const float *c = coef + pt * m;
                float c2 = m == 3 ? c[2] : 0.0f;
                for (int64_t t = 0; t < n; t++)
                    base[t] = fmaf(c2, a2[b0 + t], fmaf(c[1], a1[b0 + t], c[0] * a0[b0 + t]));
                for (int64_t p = 0; p < P; p++) {
                    float mx, sec;
                    int64_t at, k = pt * P + p;
                    top2_plain(base, offs + p * ldo + b0, n, &mx, &at, &sec);
                    merge(mx, t0 + b0 + at, sec, best + k, idx + k, second + k);
                }
            }
        }
    }
}

/* ---- AVX2 + FMA ---------------------------------------------------------------------- */

#ifdef DPMOT_X86
#define AVX2 __attribute__((target("avx2,fma")))

/* Eight lanes of running top-2: best m1 at position i1 (int32 lanes), second m2. */
typedef struct {
    __m256 m1, m2;
    __m256i i1;
} lanes;

AVX2 static inline lanes lanes_init(void) {
    lanes l = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    return l;
}

/* Scores v of positions tv: a lane's old best or v, whichever loses, competes for second. */
AVX2 static inline void lanes_update(lanes *l, __m256 v, __m256i tv) {
    __m256 gt = _mm256_cmp_ps(v, l->m1, _CMP_GT_OQ);
    l->m2 = _mm256_max_ps(l->m2, _mm256_min_ps(v, l->m1));
    l->m1 = _mm256_max_ps(l->m1, v);
    l->i1 = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(l->i1), _mm256_castsi256_ps(tv), gt));
}

/* Reduce the lanes (and a scalar tail's top-2) to the block's best, its position, second. */
AVX2 static inline void lanes_reduce(const lanes *l, float tm1, int64_t ti1, float tm2,
                                     float *mx, int64_t *at, float *sec) {
    float m1[8], m2[8];
    int32_t i1[8];
    _mm256_storeu_ps(m1, l->m1);
    _mm256_storeu_ps(m2, l->m2);
    _mm256_storeu_si256((__m256i *)i1, l->i1);
    float b = tm1, s = tm2;
    int64_t i = ti1;
    for (int k = 0; k < 8; k++) {
        s = m2[k] > s ? m2[k] : s;
        if (m1[k] > b || (m1[k] == b && i1[k] < i)) {
            s = b > s ? b : s;
            b = m1[k];
            i = i1[k];
        } else {
            s = m1[k] > s ? m1[k] : s;
        }
    }
    *mx = b, *at = i, *sec = s;
}

/* Top-2 of v[t] (+ o[t] when o) for t < n in one vectorised pass. */
AVX2 static inline void top2_avx2(const float *v, const float *o, int64_t n, float *mx,
                                  int64_t *at, float *sec) {
    lanes l = lanes_init();
    __m256i tv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), eight = _mm256_set1_epi32(8);
    int64_t t = 0;
    if (o) {
        for (; t + 8 <= n; t += 8) {
            lanes_update(&l, _mm256_add_ps(_mm256_loadu_ps(v + t), _mm256_loadu_ps(o + t)), tv);
            tv = _mm256_add_epi32(tv, eight);
        }
    } else {
        for (; t + 8 <= n; t += 8) {
            lanes_update(&l, _mm256_loadu_ps(v + t), tv);
            tv = _mm256_add_epi32(tv, eight);
        }
    }
    float tm1, tm2;
    int64_t ti1;
    top2_plain(v + t, o ? o + t : NULL, n - t, &tm1, &ti1, &tm2);
    lanes_reduce(&l, tm1, t + ti1, tm2, mx, at, sec);
}

AVX2 static void rows_avx2(const float *s, int64_t ld, int64_t r0, int64_t r1, int64_t width,
                           const float *offs, int64_t ldo, int64_t P, int64_t t0, float *best,
                           int64_t *idx, float *second) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t p = 0; p < P; p++) {
            float mx, sec;
            int64_t at, k = r * P + p;
            top2_avx2(s + r * ld, offs ? offs + p * ldo : NULL, width, &mx, &at, &sec);
            merge(mx, t0 + at, sec, best + k, idx + k, second + k);
        }
    }
}

AVX2 static void lattice_avx2(const float *a, int64_t m, int64_t T, const float *coef,
                              int64_t G, int64_t s0, int64_t s1, const float *offs,
                              int64_t ldo, int64_t P, int64_t t0, float *best, int64_t *idx,
                              float *second) {
    __m256i eight = _mm256_set1_epi32(8);
    for (int64_t s = s0; s < s1; s++) {
        const float *a0 = a + s * m * T, *a1 = a0 + T, *a2 = m == 3 ? a1 + T : a1;
        for (int64_t b0 = 0; b0 < T; b0 += BT) {
            int64_t n = T - b0 < BT ? T - b0 : BT, n8 = n & ~(int64_t)7;
            const float *x0 = a0 + b0, *x1 = a1 + b0, *x2 = a2 + b0;
            const float *o0 = offs + b0, *o1 = offs + (P > 1 ? ldo : 0) + b0;
            for (int64_t g = 0; g < G; g++) {
                int64_t pt = s * G + g;
                const float *c = coef + pt * m;
                float c2s = m == 3 ? c[2] : 0.0f;
                __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]);
                __m256 c2 = _mm256_set1_ps(c2s);
                __m256i tv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                lanes l0 = lanes_init(), l1 = lanes_init();
                for (int64_t t = 0; t < n8; t += 8) {
                    __m256 v = _mm256_mul_ps(c0, _mm256_loadu_ps(x0 + t));
                    v = _mm256_fmadd_ps(c1, _mm256_loadu_ps(x1 + t), v);
                    v = _mm256_fmadd_ps(c2, _mm256_loadu_ps(x2 + t), v);
                    lanes_update(&l0, _mm256_add_ps(v, _mm256_loadu_ps(o0 + t)), tv);
                    if (P > 1) lanes_update(&l1, _mm256_add_ps(v, _mm256_loadu_ps(o1 + t)), tv);
                    tv = _mm256_add_epi32(tv, eight);
                }
                for (int64_t p = 0; p < P; p++) {
                    const float *o = p ? o1 : o0;
                    float tm1 = -INFINITY, tm2 = -INFINITY, mx, sec;
                    int64_t ti1 = 0, at, k = pt * P + p;
                    for (int64_t t = n8; t < n; t++) {
                        float v = fmaf(c2s, x2[t], fmaf(c[1], x1[t], c[0] * x0[t])) + o[t];
                        if (v > tm1) {
                            tm2 = tm1, tm1 = v, ti1 = t;
                        } else if (v > tm2) {
                            tm2 = v;
                        }
                    }
                    lanes_reduce(p ? &l1 : &l0, tm1, ti1, tm2, &mx, &at, &sec);
                    merge(mx, t0 + b0 + at, sec, best + k, idx + k, second + k);
                }
            }
        }
    }
}

static int simd_allowed = 1; /* dpmot_top1_set_simd(0): the plain C code (tests) */

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached && simd_allowed;
}
#else
static int simd_allowed = 0;

static int have_avx2(void) { return 0; }
#endif

/* ---- entry points (ctypes) ----------------------------------------------------------- */

/* Rows r0..r1 of the (rows, width) score tile s (leading dimension ld) of targets
 * t0..t0+width, under P offset vectors offs (P, width; leading dimension ldo) added to every
 * row, or offs NULL when s already holds the full scores (P = 1). best, idx, second:
 * (rows, P) running state (-inf, -1, -inf before the first tile). Returns whether the AVX2
 * code ran. */
int dpmot_top1_rows(const float *s, int64_t ld, int64_t r0, int64_t r1, int64_t width,
                    const float *offs, int64_t ldo, int64_t P, int64_t t0, float *best,
                    int64_t *idx, float *second) {
    int simd = have_avx2();
    int64_t step = POINTS_PER_TASK;
    int parallel = (r1 - r0) * width * P >= PARALLEL_WORK && r1 - r0 > step;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t u = r0; u < r1; u += step) {
        int64_t v = u + step < r1 ? u + step : r1;
#ifdef DPMOT_X86
        if (simd) {
            rows_avx2(s, ld, u, v, width, offs, ldo, P, t0, best, idx, second);
            continue;
        }
#endif
        rows_plain(s, ld, u, v, width, offs, ldo, P, t0, best, idx, second);
    }
    return simd;
}

/* Subspaces s0..s1 of a lattice batch: a (S, m, T) projections of targets t0..t0+T, coef
 * (S, G, m) point coordinates, offs (P, T) offsets (leading dimension ldo), P = 1 or 2;
 * best/idx/second: (S*G, P) running state, point s*G + g. */
int dpmot_top1_lattice(const float *a, int64_t m, int64_t T, const float *coef, int64_t G,
                       int64_t s0, int64_t s1, const float *offs, int64_t ldo, int64_t P,
                       int64_t t0, float *best, int64_t *idx, float *second) {
    int simd = have_avx2();
    int64_t step = (POINTS_PER_TASK + G - 1) / G;
    int parallel = (s1 - s0) * G * T * P >= PARALLEL_WORK && s1 - s0 > step;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t u = s0; u < s1; u += step) {
        int64_t v = u + step < s1 ? u + step : s1;
#ifdef DPMOT_X86
        if (simd) {
            lattice_avx2(a, m, T, coef, G, u, v, offs, ldo, P, t0, best, idx, second);
            continue;
        }
#endif
        lattice_plain(a, m, T, coef, G, u, v, offs, ldo, P, t0, best, idx, second);
    }
    return simd;
}

int dpmot_top1_simd(void) { return have_avx2(); }

/* Allow (1) or forbid (0) the AVX2 code; returns whether it now runs. */
int dpmot_top1_set_simd(int allow) {
    simd_allowed = allow;
    return have_avx2();
}

/* ---- exact scores of the winners ------------------------------------------------------ */
/* Float64 scores <x, y_i> + h[p, i] of each point's winner i = idx[b, p], summed in the order
 * of the numba re-score (cpu_search.rescore_rows: acc += x_d * y_id, then + h_i; -std=c11
 * keeps the compiler from contracting it), so every path gives the same bits. */

static inline double dot_exact(const float *x, const float *y, int64_t D) {
    double acc = 0.0;
    for (int64_t d = 0; d < D; d++) acc += (double)x[d] * (double)y[d];
    return acc;
}

/* x (B, D) float32, y (N, D) float32, h (P, N) float64, idx/out (B, P). */
void dpmot_exact_rows(const float *x, int64_t B, int64_t D, const float *y, const double *h,
                      int64_t N, const int64_t *idx, int64_t P, double *out) {
    int parallel = B * D * P >= PARALLEL_WORK / 4;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t p = 0; p < P; p++) {
            int64_t i = idx[b * P + p];
            out[b * P + p] = dot_exact(x + b * D, y + i * D, D) + h[p * N + i];
        }
    }
}

/* Lattice points x_sg formed in fp32 in Lattice.points' order (x = c0 q0, then x + cj qj),
 * q (S, m, D), coef (S, G, m); idx/out (S*G, P). */
void dpmot_exact_lattice(const float *q, int64_t S, int64_t m, int64_t D, const float *coef,
                         int64_t G, const float *y, const double *h, int64_t N,
                         const int64_t *idx, int64_t P, double *out) {
    int parallel = S * G * D * (m + P) >= PARALLEL_WORK / 4;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t s = 0; s < S; s++) {
        float x[D > 0 ? D : 1];
        const float *qs = q + s * m * D;
        for (int64_t g = 0; g < G; g++) {
            int64_t pt = s * G + g;
            const float *c = coef + pt * m;
            for (int64_t d = 0; d < D; d++) x[d] = c[0] * qs[d];
            for (int64_t j = 1; j < m; j++) {
                float cj = c[j];
                const float *qj = qs + j * D;
                for (int64_t d = 0; d < D; d++) {
                    float t = cj * qj[d];
                    x[d] = x[d] + t;
                }
            }
            for (int64_t p = 0; p < P; p++) {
                int64_t i = idx[pt * P + p];
                out[pt * P + p] = dot_exact(x, y + i * D, D) + h[p * N + i];
            }
        }
    }
}

/* A module object so that the file is an importable extension (setuptools builds it as one);
 * the functions above are reached through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_top1", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__top1(void) { return PyModule_Create(&module); }
