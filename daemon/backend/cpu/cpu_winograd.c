/*
 * CPU kernels: Winograd F(2x2, 3x3) for 3x3 pad-1 convolutions (portable and AVX-512 tile
 * transforms and point GEMMs). Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"
#include "backend/cpu/cpu_blas.h"

/* ---- Winograd F(2x2, 3x3) (see ksm_conv2d_winograd in nn/op.h) ----
 * With B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
 * and A^T = [1 1 1 0; 0 1 -1 -1]: U = G g G^T, V = B^T d B, Y = A^T (sum_c U .* V) A. */
struct wino_job {
    const float *x, *w, *bias;
    float *y, *u, *ws;
    int64_t n, ci, co, h, wd, th, tw, tiles, chunk, slice;
    const float *bn_m, *bn_a, *bn_b; /* BatchNorm + ReLU epilogue, or NULL */
};

/* Filters [b, e) of the Co x Ci pairs into U[16][Co][Ci]. */
static void wino_filters(void *ctx, int64_t b, int64_t e)
{
    const struct wino_job *j = ctx;
    const int64_t cc = j->co * j->ci;
    for (int64_t p = b; p < e; p++) {
        const float *g = j->w + p * 9;
        float t[4][3]; /* G g */
        for (int k = 0; k < 3; k++) {
            const float g0 = g[k], g1 = g[3 + k], g2 = g[6 + k];
            t[0][k] = g0;
            t[1][k] = 0.5f * (g0 + g1 + g2);
            t[2][k] = 0.5f * (g0 - g1 + g2);
            t[3][k] = g2;
        }
        for (int r = 0; r < 4; r++) { /* (G g) G^T */
            const float a = t[r][0], m = t[r][1], c = t[r][2];
            j->u[(r * 4 + 0) * cc + p] = a;
            j->u[(r * 4 + 1) * cc + p] = 0.5f * (a + m + c);
            j->u[(r * 4 + 2) * cc + p] = 0.5f * (a - m + c);
            j->u[(r * 4 + 3) * cc + p] = c;
        }
    }
}

/* V[16][Ci][chunk] of tiles [t0, t0 + nt), one tile at a time (rows wider than
 * WINO_MAX_TW tiles). */
static void wino_inputs_scalar(const struct wino_job *j, int64_t t0, int64_t nt, float *v)
{
    const int64_t h = j->h, wd = j->wd, per_img = j->th * j->tw, ci = j->ci, ch = j->chunk;
    for (int64_t q = 0; q < nt; q++) {
        const int64_t t = t0 + q, n = t / per_img, r = t % per_img;
        const int64_t y0 = 2 * (r / j->tw) - 1, x0 = 2 * (r % j->tw) - 1;
        const bool inside = y0 >= 0 && x0 >= 0 && y0 + 4 <= h && x0 + 4 <= wd;
        const float *xn = j->x + n * ci * h * wd;
        for (int64_t c = 0; c < ci; c++) {
            const float *xc = xn + c * h * wd;
            float d[4][4];
            if (inside) {
                for (int a = 0; a < 4; a++)
                    for (int b = 0; b < 4; b++) d[a][b] = xc[(y0 + a) * wd + x0 + b];
            } else {
                for (int a = 0; a < 4; a++)
                    for (int b = 0; b < 4; b++) {
                        const int64_t yy = y0 + a, xx = x0 + b;
                        d[a][b] =
                            (yy >= 0 && yy < h && xx >= 0 && xx < wd) ? xc[yy * wd + xx] : 0.0f;
                    }
            }
            float s[4][4]; /* B^T d */
            for (int b = 0; b < 4; b++) {
                s[0][b] = d[0][b] - d[2][b];
                s[1][b] = d[1][b] + d[2][b];
                s[2][b] = d[2][b] - d[1][b];
                s[3][b] = d[1][b] - d[3][b];
            }
            float *vc = v + c * ch + q;
            const int64_t ps = ci * ch;   /* stride between points */
            for (int a = 0; a < 4; a++) { /* (B^T d) B */
                vc[(a * 4 + 0) * ps] = s[a][0] - s[a][2];
                vc[(a * 4 + 1) * ps] = s[a][1] + s[a][2];
                vc[(a * 4 + 2) * ps] = s[a][2] - s[a][1];
                vc[(a * 4 + 3) * ps] = s[a][1] - s[a][3];
            }
        }
    }
}

/* Y tiles from M[16][Co][chunk] of tiles [t0, t0 + nt), one tile at a time. */
static void wino_outputs_scalar(const struct wino_job *j, int64_t t0, int64_t nt, const float *m)
{
    const int64_t h = j->h, wd = j->wd, per_img = j->th * j->tw, co = j->co, ch = j->chunk;
    const int64_t ps = co * ch;
    for (int64_t q = 0; q < nt; q++) {
        const int64_t t = t0 + q, n = t / per_img, r = t % per_img;
        const int64_t y0 = 2 * (r / j->tw), x0 = 2 * (r % j->tw);
        float *yn = j->y + n * co * h * wd;
        for (int64_t o = 0; o < co; o++) {
            const float *mo = m + o * ch + q;
            float s[2][4]; /* A^T m */
            for (int b = 0; b < 4; b++) {
                const float m0 = mo[(0 * 4 + b) * ps], m1 = mo[(1 * 4 + b) * ps];
                const float m2 = mo[(2 * 4 + b) * ps], m3 = mo[(3 * 4 + b) * ps];
                s[0][b] = m0 + m1 + m2;
                s[1][b] = m1 - m2 - m3;
            }
            const float bias = j->bias ? j->bias[o] : 0.0f;
            float *yo = yn + o * h * wd;
            for (int a = 0; a < 2; a++) { /* (A^T m) A */
                if (y0 + a >= h) break;
                const float v0 = s[a][0] + s[a][1] + s[a][2], v1 = s[a][1] - s[a][2] - s[a][3];
                float *yr = yo + (y0 + a) * wd + x0;
                float r0 = j->bias ? v0 + bias : v0, r1 = j->bias ? v1 + bias : v1;
                if (j->bn_a) {
                    r0 = ksm_relu((r0 - j->bn_m[o]) * j->bn_a[o] + j->bn_b[o]);
                    r1 = ksm_relu((r1 - j->bn_m[o]) * j->bn_a[o] + j->bn_b[o]);
                }
                yr[0] = r0;
                if (x0 + 1 < wd) yr[1] = r1;
            }
        }
    }
}

/* The 16 point GEMMs M_p[Co][nt] = U_p[Co][Ci] V_p[Ci][nt] are small (K = Ci as low as 16) and
 * their operands are already in the layout a register-blocked kernel wants (rows of V
 * contiguous across tiles), so on AVX-512 a kernel of 8 output channels x 32 tiles accumulates
 * in 16 registers with no packing: per input channel, two loads of V, eight broadcasts of U and
 * sixteen FMAs. Other CPUs take OpenBLAS. */
#if defined(__x86_64__) && defined(__GNUC__)
#define WINO_AVX512 1
#include <immintrin.h>

#define WINO_ROWS 8

__attribute__((target("avx512f"))) static void wino_gemm_avx512(const float *u, const float *v,
                                                                float *m, int64_t co, int64_t ci,
                                                                int64_t nt, int64_t ld)
{
    for (int64_t t = 0; t < nt; t += 32) {
        const int64_t rem = nt - t;
        const __mmask16 k0 = rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1);
        const __mmask16 k1 = rem >= 32  ? (__mmask16)0xFFFF
                             : rem > 16 ? (__mmask16)((1u << (rem - 16)) - 1)
                                        : (__mmask16)0;
        const float *vt = v + t;
        int64_t o = 0;
        for (; o + WINO_ROWS <= co; o += WINO_ROWS) {
            __m512 c[WINO_ROWS][2];
            for (int r = 0; r < WINO_ROWS; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
            const float *uo = u + o * ci;
            for (int64_t k = 0; k < ci; k++) {
                const __m512 b0 = _mm512_maskz_loadu_ps(k0, vt + k * ld);
                const __m512 b1 = _mm512_maskz_loadu_ps(k1, vt + k * ld + 16);
                for (int r = 0; r < WINO_ROWS; r++) {
                    const __m512 a = _mm512_set1_ps(uo[r * ci + k]);
                    c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
                    c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
                }
            }
            for (int r = 0; r < WINO_ROWS; r++) {
                _mm512_mask_storeu_ps(m + (o + r) * ld + t, k0, c[r][0]);
                _mm512_mask_storeu_ps(m + (o + r) * ld + t + 16, k1, c[r][1]);
            }
        }
        for (; o < co; o++) {
            __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
            for (int64_t k = 0; k < ci; k++) {
                const __m512 a = _mm512_set1_ps(u[o * ci + k]);
                c0 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(k0, vt + k * ld), c0);
                c1 = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(k1, vt + k * ld + 16), c1);
            }
            _mm512_mask_storeu_ps(m + o * ld + t, k0, c0);
            _mm512_mask_storeu_ps(m + o * ld + t + 16, k1, c1);
        }
    }
}
#endif

#ifdef WINO_AVX512
/* Lanes [0, 16) of a load or store at element s of a row of wd elements that fall inside it. */
static inline __mmask16 wino_row_mask(int64_t s, int64_t wd, int64_t lanes)
{
    int64_t lo = s < 0 ? -s : 0, hi = wd - s < lanes ? wd - s : lanes;
    if (hi > 16) hi = 16;
    if (hi <= lo) return 0;
    return (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
}

/* wino_input_run with explicit AVX-512: 16 tiles per vector, each row's 4x4 patch columns
 * gathered by two masked loads and a permute (no padded copy of the row). Same operations in
 * the same order as the portable version. */
__attribute__((target("avx512f"))) static void wino_input_run_avx512(const struct wino_job *j,
                                                                     int64_t n, int64_t ty,
                                                                     int64_t txa, int64_t len,
                                                                     float *v, int64_t ps)
{
    const int64_t h = j->h, wd = j->wd, ch = j->chunk;
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd =
        _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int64_t kb = 0; kb < len; kb += 16) {
        const int64_t nl = len - kb < 16 ? len - kb : 16;
        const __mmask16 sm = (__mmask16)((1u << nl) - 1);
        const int64_t s0 = 2 * (txa + kb) - 1; /* first input column of the block */
        const __mmask16 mA = wino_row_mask(s0, wd, 16), mB = wino_row_mask(s0 + 16, wd, 16);
        const __mmask16 mA2 = wino_row_mask(s0 + 2, wd, 16), mB2 = wino_row_mask(s0 + 18, wd, 16);
        for (int64_t c = 0; c < j->ci; c++) {
            const float *xc = j->x + (n * j->ci + c) * h * wd;
            __m512 col[4][4];
            for (int a = 0; a < 4; a++) {
                const int64_t yy = 2 * ty - 1 + a;
                if (yy < 0 || yy >= h) {
                    col[a][0] = col[a][1] = col[a][2] = col[a][3] = _mm512_setzero_ps();
                    continue;
                }
                const float *row = xc + yy * wd + s0;
                const __m512 A = _mm512_maskz_loadu_ps(mA, row);
                const __m512 B = _mm512_maskz_loadu_ps(mB, row + 16);
                const __m512 A2 = _mm512_maskz_loadu_ps(mA2, row + 2);
                const __m512 B2 = _mm512_maskz_loadu_ps(mB2, row + 18);
                const __m512 d0 = _mm512_permutex2var_ps(A, even, B);
                const __m512 d1 = _mm512_permutex2var_ps(A, odd, B);
                const __m512 d2 = _mm512_permutex2var_ps(A2, even, B2);
                const __m512 d3 = _mm512_permutex2var_ps(A2, odd, B2);
                col[a][0] = _mm512_sub_ps(d0, d2);
                col[a][1] = _mm512_add_ps(d1, d2);
                col[a][2] = _mm512_sub_ps(d2, d1);
                col[a][3] = _mm512_sub_ps(d1, d3);
            }
            float *vc = v + c * ch + kb;
            for (int b = 0; b < 4; b++) {
                _mm512_mask_storeu_ps(vc + (0 + b) * ps, sm, _mm512_sub_ps(col[0][b], col[2][b]));
                _mm512_mask_storeu_ps(vc + (4 + b) * ps, sm, _mm512_add_ps(col[1][b], col[2][b]));
                _mm512_mask_storeu_ps(vc + (8 + b) * ps, sm, _mm512_sub_ps(col[2][b], col[1][b]));
                _mm512_mask_storeu_ps(vc + (12 + b) * ps, sm, _mm512_sub_ps(col[1][b], col[3][b]));
            }
        }
    }
}

/* wino_output_run with explicit AVX-512: 16 tiles per vector, the two output columns of each
 * tile interleaved by permutes into 32 consecutive pixels, stored with masks at the edges. */
__attribute__((target("avx512f"))) static void wino_output_run_avx512(const struct wino_job *j,
                                                                      int64_t n, int64_t ty,
                                                                      int64_t txa, int64_t len,
                                                                      const float *m, int64_t ps)
{
    const int64_t h = j->h, wd = j->wd, ch = j->chunk;
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const int rows = 2 * ty + 1 < h ? 2 : 1;
    for (int64_t kb = 0; kb < len; kb += 16) {
        const int64_t nl = len - kb < 16 ? len - kb : 16;
        const __mmask16 lm = (__mmask16)((1u << nl) - 1);
        const int64_t x0 = 2 * (txa + kb);
        const __mmask16 m0 = wino_row_mask(x0, wd, 2 * nl),
                        m1 = wino_row_mask(x0 + 16, wd, 2 * nl - 16 > 0 ? 2 * nl - 16 : 0);
        for (int64_t o = 0; o < j->co; o++) {
            const float *mo = m + o * ch + kb;
            __m512 s[2][4];
            for (int b = 0; b < 4; b++) {
                const __m512 q0 = _mm512_maskz_loadu_ps(lm, mo + b * ps);
                const __m512 q1 = _mm512_maskz_loadu_ps(lm, mo + (4 + b) * ps);
                const __m512 q2 = _mm512_maskz_loadu_ps(lm, mo + (8 + b) * ps);
                const __m512 q3 = _mm512_maskz_loadu_ps(lm, mo + (12 + b) * ps);
                s[0][b] = _mm512_add_ps(_mm512_add_ps(q0, q1), q2);
                s[1][b] = _mm512_sub_ps(_mm512_sub_ps(q1, q2), q3);
            }
            float *yo = j->y + (n * j->co + o) * h * wd + 2 * ty * wd + x0;
            for (int a = 0; a < rows; a++) {
                const __m512 e0 = _mm512_add_ps(_mm512_add_ps(s[a][0], s[a][1]), s[a][2]);
                const __m512 e1 = _mm512_sub_ps(_mm512_sub_ps(s[a][1], s[a][2]), s[a][3]);
                __m512 p0 = _mm512_permutex2var_ps(e0, lo, e1);
                __m512 p1 = _mm512_permutex2var_ps(e0, hi, e1);
                if (j->bias) {
                    const __m512 bv = _mm512_set1_ps(j->bias[o]);
                    p0 = _mm512_add_ps(p0, bv);
                    p1 = _mm512_add_ps(p1, bv);
                }
                if (j->bn_a) { /* relu((y - m) * a + b): v <= 0 (false for NaN) gives +0 */
                    const __m512 bm = _mm512_set1_ps(j->bn_m[o]), ba = _mm512_set1_ps(j->bn_a[o]);
                    const __m512 bb = _mm512_set1_ps(j->bn_b[o]), z = _mm512_setzero_ps();
                    p0 = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(p0, bm), ba), bb);
                    p1 = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(p1, bm), ba), bb);
                    p0 = _mm512_mask_mov_ps(p0, _mm512_cmp_ps_mask(p0, z, _CMP_LE_OQ), z);
                    p1 = _mm512_mask_mov_ps(p1, _mm512_cmp_ps_mask(p1, z, _CMP_LE_OQ), z);
                }
                _mm512_mask_storeu_ps(yo + a * wd, m0, p0);
                _mm512_mask_storeu_ps(yo + a * wd + 16, m1, p1);
            }
        }
    }
}

static int wino_have_avx512(void)
{
    static int avx512 = -1; /* racing first calls store the same value */
    int have = __atomic_load_n(&avx512, __ATOMIC_RELAXED);
    if (have < 0) {
        /* KASMINA_CPU_NO_AVX512=1 takes the portable paths (their tests run that way) */
        const char *off = getenv("KASMINA_CPU_NO_AVX512");
        have = __builtin_cpu_supports("avx512f") && !(off && *off && *off != '0') ? 1 : 0;
        __atomic_store_n(&avx512, have, __ATOMIC_RELAXED);
    }
    return have;
}
#endif

/* The vectorised transforms work on runs of tiles along one tile row, vectors across the run's
 * tiles; rows of more than WINO_MAX_TW tiles take the scalar path. */
#define WINO_MAX_TW 128

/* Tiles [txa, txa + len) of tile row ty of image n, channel by channel, into v (the run's first
 * tile's column of V; stride between points ps). */
KSM_VEC_CLONES
static void wino_input_run(const struct wino_job *j, int64_t n, int64_t ty, int64_t txa,
                           int64_t len, float *v, int64_t ps)
{
    const int64_t h = j->h, wd = j->wd, ch = j->chunk;
    float e[4][2 * WINO_MAX_TW + 4];        /* input rows 2ty-1 .. 2ty+2, e[i] = x[i - 1] */
    float col[4][4][WINO_MAX_TW];           /* d B of each row: [row][point][tile] */
    const int64_t ne = 2 * (txa + len) + 2; /* e indices used: 2 txa .. 2 (txa + len) + 1 */
    for (int64_t c = 0; c < j->ci; c++) {
        const float *xc = j->x + (n * j->ci + c) * h * wd;
        for (int a = 0; a < 4; a++) {
            const int64_t yy = 2 * ty - 1 + a;
            float *ea = e[a];
            if (yy < 0 || yy >= h) {
                for (int64_t i = 2 * txa; i < ne; i++) ea[i] = 0.0f;
            } else {
                const float *row = xc + yy * wd;
                for (int64_t i = 2 * txa; i < ne; i++)
                    ea[i] = (i >= 1 && i <= wd) ? row[i - 1] : 0.0f;
            }
            const float *eb = ea + 2 * txa;
            for (int64_t k = 0; k < len; k++) {
                const float d0 = eb[2 * k], d1 = eb[2 * k + 1], d2 = eb[2 * k + 2],
                            d3 = eb[2 * k + 3];
                col[a][0][k] = d0 - d2;
                col[a][1][k] = d1 + d2;
                col[a][2][k] = d2 - d1;
                col[a][3][k] = d1 - d3;
            }
        }
        float *vc = v + c * ch;
        for (int b = 0; b < 4; b++) {
            float *v0 = vc + (0 + b) * ps, *v1 = vc + (4 + b) * ps;
            float *v2 = vc + (8 + b) * ps, *v3 = vc + (12 + b) * ps;
            for (int64_t k = 0; k < len; k++) {
                v0[k] = col[0][b][k] - col[2][b][k];
                v1[k] = col[1][b][k] + col[2][b][k];
                v2[k] = col[2][b][k] - col[1][b][k];
                v3[k] = col[1][b][k] - col[3][b][k];
            }
        }
    }
}

static void wino_inputs(const struct wino_job *j, int64_t t0, int64_t nt, float *v)
{
    if (j->tw > WINO_MAX_TW) {
        wino_inputs_scalar(j, t0, nt, v);
        return;
    }
    const int64_t per_img = j->th * j->tw;
    for (int64_t q = 0; q < nt;) {
        const int64_t t = t0 + q, r = t % per_img, txa = r % j->tw;
        const int64_t len = j->tw - txa < nt - q ? j->tw - txa : nt - q;
#ifdef WINO_AVX512
        if (wino_have_avx512())
            wino_input_run_avx512(j, t / per_img, r / j->tw, txa, len, v + q, j->ci * j->chunk);
        else
#endif
            wino_input_run(j, t / per_img, r / j->tw, txa, len, v + q, j->ci * j->chunk);
        q += len;
    }
}

/* Output tiles [txa, txa + len) of tile row ty of image n from m (the run's first tile's
 * column of M; stride between points ps). */
KSM_VEC_CLONES
static void wino_output_run(const struct wino_job *j, int64_t n, int64_t ty, int64_t txa,
                            int64_t len, const float *m, int64_t ps)
{
    const int64_t h = j->h, wd = j->wd, ch = j->chunk;
    float out[2][2 * WINO_MAX_TW];
    const int64_t x0 = 2 * txa, xn = (2 * (txa + len) < wd ? 2 * (txa + len) : wd) - x0;
    const int rows = 2 * ty + 1 < h ? 2 : 1;
    for (int64_t o = 0; o < j->co; o++) {
        const float *mo = m + o * ch;
        const float bias = j->bias ? j->bias[o] : 0.0f;
        for (int64_t k = 0; k < len; k++) {
            float s0[4], s1[4]; /* A^T m */
            for (int b = 0; b < 4; b++) {
                const float m0 = mo[b * ps + k], m1 = mo[(4 + b) * ps + k];
                const float m2 = mo[(8 + b) * ps + k], m3 = mo[(12 + b) * ps + k];
                s0[b] = m0 + m1 + m2;
                s1[b] = m1 - m2 - m3;
            }
            out[0][2 * k] = s0[0] + s0[1] + s0[2];
            out[0][2 * k + 1] = s0[1] - s0[2] - s0[3];
            out[1][2 * k] = s1[0] + s1[1] + s1[2];
            out[1][2 * k + 1] = s1[1] - s1[2] - s1[3];
        }
        float *yo = j->y + (n * j->co + o) * h * wd + 2 * ty * wd + x0;
        for (int a = 0; a < rows; a++) {
            float *yr = yo + a * wd;
            if (j->bias)
                for (int64_t i = 0; i < xn; i++) yr[i] = out[a][i] + bias;
            else
                for (int64_t i = 0; i < xn; i++) yr[i] = out[a][i];
            if (j->bn_a) ksm_cpu_shift_scale_relu(yr, yr, xn, j->bn_m[o], j->bn_a[o], j->bn_b[o]);
        }
    }
}

static void wino_outputs(const struct wino_job *j, int64_t t0, int64_t nt, const float *m)
{
    if (j->tw > WINO_MAX_TW) {
        wino_outputs_scalar(j, t0, nt, m);
        return;
    }
    const int64_t per_img = j->th * j->tw;
    for (int64_t q = 0; q < nt;) {
        const int64_t t = t0 + q, r = t % per_img, txa = r % j->tw;
        const int64_t len = j->tw - txa < nt - q ? j->tw - txa : nt - q;
#ifdef WINO_AVX512
        if (wino_have_avx512())
            wino_output_run_avx512(j, t / per_img, r / j->tw, txa, len, m + q, j->co * j->chunk);
        else
#endif
            wino_output_run(j, t / per_img, r / j->tw, txa, len, m + q, j->co * j->chunk);
        q += len;
    }
}

static void wino_gemm(const float *u, const float *v, float *m, int64_t co, int64_t ci, int64_t nt,
                      int64_t ld)
{
#ifdef WINO_AVX512
    if (wino_have_avx512()) {
        wino_gemm_avx512(u, v, m, co, ci, nt, ld);
        return;
    }
#endif
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)co, (int)nt, (int)ci, 1.0f, u,
                (int)ci, v, (int)ld, 0.0f, m, (int)ld);
}

/* Chunks [b, e): transform the chunk's input tiles, 16 GEMMs, transform back. */
static void wino_chunks(void *ctx, int slot, int64_t b, int64_t e)
{
    const struct wino_job *j = ctx;
    float *v = j->ws + slot * j->slice, *m = v + 16 * j->ci * j->chunk;
    const int64_t cc = j->co * j->ci;
    for (int64_t c = b; c < e; c++) {
        const int64_t t0 = c * j->chunk;
        const int64_t nt = j->tiles - t0 < j->chunk ? j->tiles - t0 : j->chunk;
        wino_inputs(j, t0, nt, v);
        for (int p = 0; p < 16; p++)
            wino_gemm(j->u + p * cc, v + p * j->ci * j->chunk, m + p * j->co * j->chunk, j->co,
                      j->ci, nt, j->chunk);
        wino_outputs(j, t0, nt, m);
    }
}

int ksm_cpu_conv2d_winograd(const struct ksm_op *op, int64_t nb, int64_t ci, int64_t h, int64_t wd,
                            int64_t co, const float *bn_a)
{
    struct wino_job j = {.x = (const float *)op->src[0].data,
                         .w = (const float *)op->src[1].data,
                         .bias = (const float *)op->src[2].data,
                         .y = (float *)op->dst.data,
                         .n = nb,
                         .ci = ci,
                         .co = co,
                         .h = h,
                         .wd = wd,
                         .th = (h + 1) / 2,
                         .tw = (wd + 1) / 2,
                         .chunk = ksm_wino_chunk(ci, co)};
    j.tiles = nb * j.th * j.tw;
    if (bn_a) {
        j.bn_m = (const float *)op->src[3].data;
        j.bn_a = bn_a;
        j.bn_b = (const float *)op->src[6].data;
    }
    j.slice = 16 * (ci + co) * j.chunk;
    const int64_t need = ksm_wino_workspace_floats(nb, ci, co, h, wd);
    if (need == 0 || op->ws == NULL || op->ws_bytes < (size_t)need * sizeof(float))
        return KSM_EINTERNAL;
    j.u = (float *)op->ws;
    j.ws = j.u + 16 * co * ci;
    const int64_t chunks = (j.tiles + j.chunk - 1) / j.chunk;
    const int64_t fit = (int64_t)(op->ws_bytes / sizeof(float) - (size_t)(16 * co * ci)) / j.slice;
    ksm_cpu_parallel_for(co * ci, ksm_cpu_grain(36), wino_filters, &j);
    ksm_cpu_parallel_for_slots(
        chunks, 1, (int)(fit < KSM_CPU_MAX_THREADS ? fit : KSM_CPU_MAX_THREADS), wino_chunks, &j);
    return 0;
}
