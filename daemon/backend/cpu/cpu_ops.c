/*
 * CPU op kernels (the reference implementation; the GPU conformance suite's oracle).
 *
 * Every kernel runs on the calling thread (a stream worker) on host memory and trusts the
 * invariants ops.c established (see nn/op.h). F32 math; per-element functions come from
 * nn/kmath.h so that the CUDA plugin computes the same functions, except exp, erf (GELU), tanh
 * and sigmoid, which come from cpu_math.h's vectorisable versions (within 1.32 ulp of the true
 * value; CUDA's are within 2). Reductions (norm statistics, softmax sums, means, attention's
 * softmax sums) accumulate in double. GEMM, linear layers, convolutions and attention's
 * products go through OpenBLAS' cblas_sgemm, single-threaded, in tiles that the pool runs in
 * parallel;
 * everything else splits its rows, planes or groups over the backend's compute pool
 * (cpu_pool.h) with contiguous inner loops.
 * Each range writes disjoint outputs, so results do not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_blas.h" /* cblas_sgemm: the OpenBLAS the backend loaded */
#include "backend/cpu/cpu_math.h"
#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/cpu_pool.h"
#include "kasmina/errors.h"
#include "nn/kmath.h"
#include "nn/op.h"

/* Hot loops are compiled for AVX-512 and AVX2 as well as baseline x86-64, picked at load time.
 * The clones compute bit-identical results: no FMA contraction (ISO C build), no
 * reassociation, and cpu_math.h's functions use only IEEE-exact operations. */
/* Not under ThreadSanitizer: the clones' ifunc resolvers run during relocation, before the TSan
 * runtime is up, and crash in their instrumentation. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) &&       \
    !defined(__SANITIZE_THREAD__)
#define KSM_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KSM_VEC_CLONES
#endif

static int64_t numel_of(const ksm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Elements of work per parallel range below which a thread hand-off costs more than it saves. */
enum { PAR_GRAIN = 16384 };

/* Ranges of `items` items of `per_item` elements each, at least PAR_GRAIN elements per range. */
static int64_t grain_for(int64_t per_item)
{
    return per_item >= PAR_GRAIN ? 1 : PAR_GRAIN / (per_item > 0 ? per_item : 1);
}

/* ---- Strided elementwise iteration ----
 *
 * dst (contiguous) and up to three sources expanded to dst's shape. Size-1 dims are dropped and
 * adjacent dims merged wherever every tensor is linear across them, so the common cases
 * (everything contiguous; a per-sample or per-channel broadcast) become one or two loops. The
 * row function then sees n elements with one element stride per tensor; dst's is always 1.
 */

#define EW_MAX 4

struct ew_iter {
    int nd, nt;
    int64_t shape[KSM_MAX_DIMS];
    int64_t st[EW_MAX][KSM_MAX_DIMS]; /* element strides; [0] is dst */
    char *base[EW_MAX];
    size_t esz[EW_MAX];
};

typedef void (*ew_row_fn)(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                          const int64_t st[EW_MAX]);

static void ew_init(struct ew_iter *it, const struct ksm_op *op, int n_src)
{
    const ksm_tensor *t[EW_MAX] = {&op->dst, &op->src[0], &op->src[1], &op->src[2]};
    it->nt = 1 + n_src;
    it->nd = 0;
    for (int k = 0; k < it->nt; k++) {
        it->base[k] = (char *)t[k]->data;
        it->esz[k] = ksm_dtype_size(t[k]->dtype);
    }
    for (int d = 0; d < op->dst.ndim; d++) {
        if (op->dst.shape[d] == 1) continue;
        int j = it->nd;
        if (j > 0) {
            /* merge into the previous (outer) dim when linear for every tensor */
            bool linear = true;
            for (int k = 0; k < it->nt; k++)
                if (it->st[k][j - 1] != t[k]->stride[d] * op->dst.shape[d]) linear = false;
            if (linear) {
                it->shape[j - 1] *= op->dst.shape[d];
                for (int k = 0; k < it->nt; k++) it->st[k][j - 1] = t[k]->stride[d];
                continue;
            }
        }
        it->shape[j] = op->dst.shape[d];
        for (int k = 0; k < it->nt; k++) it->st[k][j] = t[k]->stride[d];
        it->nd++;
    }
}

struct ew_job {
    const struct ew_iter *it;
    const struct ksm_op *op;
    ew_row_fn fn;
};

/* Rows [b, e) of the outer dims (all dims but the innermost), each a call of fn. */
static void ew_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ew_job *j = ctx;
    const struct ew_iter *it = j->it;
    const int nd = it->nd;
    char *p[EW_MAX] = {0};
    int64_t st[EW_MAX] = {0};
    const int64_t n = it->shape[nd - 1];
    for (int k = 0; k < it->nt; k++) st[k] = it->st[k][nd - 1];
    int64_t idx[KSM_MAX_DIMS] = {0};
    int64_t off[EW_MAX] = {0}; /* element offsets of the current row */
    int64_t r = b;
    for (int d = nd - 2; d >= 0; d--) {
        idx[d] = r % it->shape[d];
        r /= it->shape[d];
        for (int k = 0; k < it->nt; k++) off[k] += idx[d] * it->st[k][d];
    }
    for (int64_t o = b; o < e; o++) {
        for (int k = 0; k < it->nt; k++) p[k] = it->base[k] + off[k] * (int64_t)it->esz[k];
        j->fn(j->op, n, p, st);
        for (int d = nd - 2; d >= 0; d--) {
            for (int k = 0; k < it->nt; k++) off[k] += it->st[k][d];
            if (++idx[d] < it->shape[d]) break;
            for (int k = 0; k < it->nt; k++) off[k] -= it->st[k][d] * it->shape[d];
            idx[d] = 0;
        }
    }
}

/* Elements [b, e) of a single merged dim. */
static void ew_span(void *ctx, int64_t b, int64_t e)
{
    const struct ew_job *j = ctx;
    const struct ew_iter *it = j->it;
    char *p[EW_MAX] = {0};
    int64_t st[EW_MAX] = {0};
    for (int k = 0; k < it->nt; k++) {
        st[k] = it->st[k][0];
        p[k] = it->base[k] + b * st[k] * (int64_t)it->esz[k];
    }
    j->fn(j->op, e - b, p, st);
}

static void ew_run(const struct ew_iter *it, const struct ksm_op *op, ew_row_fn fn)
{
    if (it->nd == 0) { /* a single element (scalar, or all dims of size 1) */
        char *p[EW_MAX] = {0};
        int64_t st[EW_MAX] = {0};
        for (int k = 0; k < it->nt; k++) p[k] = it->base[k];
        fn(op, 1, p, st);
        return;
    }
    for (int d = 0; d < it->nd; d++)
        if (it->shape[d] == 0) return;
    struct ew_job job = {it, op, fn};
    const int64_t n = it->shape[it->nd - 1];
    if (it->nd == 1) {
        ksm_cpu_parallel_for(n, PAR_GRAIN, ew_span, &job);
        return;
    }
    int64_t outer = 1;
    for (int d = 0; d < it->nd - 1; d++) outer *= it->shape[d];
    ksm_cpu_parallel_for(outer, grain_for(n), ew_rows, &job);
}

static void ew_exec(const struct ksm_op *op, int n_src, ew_row_fn fn)
{
    struct ew_iter it;
    ew_init(&it, op, n_src);
    ew_run(&it, op, fn);
}

/* Loops with a unit-stride specialisation so the common case vectorises. */
#define EW_LOOP1(N, SX, BODY)                                                                      \
    do {                                                                                           \
        if ((SX) == 1) {                                                                           \
            for (int64_t i = 0; i < (N); i++) {                                                    \
                const int64_t ix = i;                                                              \
                BODY;                                                                              \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t i = 0; i < (N); i++) {                                                    \
                const int64_t ix = i * (SX);                                                       \
                BODY;                                                                              \
            }                                                                                      \
        }                                                                                          \
    } while (0)

KSM_VEC_CLONES
static void row_unary(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                      const int64_t st[EW_MAX])
{
    float *y = (float *)p[0]; /* may alias x exactly (in place) */
    const float *x = (const float *)p[1];
    const int64_t sx = st[1];
    switch (op->p.unary.fn) {
    case KSM_UNARY_RELU: EW_LOOP1(n, sx, y[i] = ksm_relu(x[ix])); break;
    case KSM_UNARY_GELU: EW_LOOP1(n, sx, y[i] = ksm_cpu_gelu(x[ix])); break;
    case KSM_UNARY_SIGMOID: EW_LOOP1(n, sx, y[i] = ksm_cpu_sigmoidf(x[ix])); break;
    case KSM_UNARY_TANH: EW_LOOP1(n, sx, y[i] = ksm_cpu_tanhf(x[ix])); break;
    case KSM_UNARY_CLAMP01: EW_LOOP1(n, sx, y[i] = ksm_clamp01(x[ix])); break;
    case KSM_UNARY_AFFINE: {
        const float a = op->p.unary.a, b = op->p.unary.b;
        EW_LOOP1(n, sx, y[i] = a * x[ix] + b);
        break;
    }
    default: break;
    }
}

KSM_VEC_CLONES
static void row_binary(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                       const int64_t st[EW_MAX])
{
    float *y = (float *)p[0];
    const float *a = (const float *)p[1], *b = (const float *)p[2];
    const int64_t sa = st[1], sb = st[2];
    if (sa == 1 && sb == 1) {
        switch (op->p.binary.fn) {
        case KSM_BINARY_ADD:
            for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
            break;
        case KSM_BINARY_SUB:
            for (int64_t i = 0; i < n; i++) y[i] = a[i] - b[i];
            break;
        case KSM_BINARY_MUL:
            for (int64_t i = 0; i < n; i++) y[i] = a[i] * b[i];
            break;
        default: break;
        }
        return;
    }
    switch (op->p.binary.fn) {
    case KSM_BINARY_ADD:
        for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] + b[i * sb];
        break;
    case KSM_BINARY_SUB:
        for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] - b[i * sb];
        break;
    case KSM_BINARY_MUL:
        for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] * b[i * sb];
        break;
    default: break;
    }
}

KSM_VEC_CLONES
static void row_lerp(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                     const int64_t st[EW_MAX])
{
    float *y = (float *)p[0];
    const float *a = (const float *)p[1], *b = (const float *)p[2], *w = (const float *)p[3];
    const int64_t sa = st[1], sb = st[2], sw = st[3];
    (void)op;
    if (sa == 1 && sb == 1 && sw == 0) {
        const float wv = w[0];
        for (int64_t i = 0; i < n; i++) y[i] = ksm_lerp(a[i], b[i], wv);
        return;
    }
    for (int64_t i = 0; i < n; i++) y[i] = ksm_lerp(a[i * sa], b[i * sb], w[i * sw]);
}

/* ---- Copy (with conversions) and fill ---- */

static float load_float(const char *p, enum ksm_dtype dt)
{
    uint16_t h;
    float f;
    switch (dt) {
    case KSM_DTYPE_F16: memcpy(&h, p, 2); return ksm_f16_to_f32(h);
    case KSM_DTYPE_BF16: memcpy(&h, p, 2); return ksm_bf16_to_f32(h);
    default: memcpy(&f, p, 4); return f;
    }
}

static void store_float(char *p, enum ksm_dtype dt, float f)
{
    uint16_t h;
    switch (dt) {
    case KSM_DTYPE_F16:
        h = ksm_f32_to_f16(f);
        memcpy(p, &h, 2);
        break;
    case KSM_DTYPE_BF16:
        h = ksm_f32_to_bf16(f);
        memcpy(p, &h, 2);
        break;
    default: memcpy(p, &f, 4); break;
    }
}

static int64_t load_int(const char *p, enum ksm_dtype dt)
{
    if (dt == KSM_DTYPE_I32) {
        int32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

static void store_int(char *p, enum ksm_dtype dt, int64_t v)
{
    if (dt == KSM_DTYPE_I32) {
        int32_t w = (int32_t)(uint32_t)(uint64_t)v; /* wraps, as torch's .to(int32) */
        memcpy(p, &w, 4);
    } else {
        memcpy(p, &v, 8);
    }
}

static void row_copy(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                     const int64_t st[EW_MAX])
{
    enum ksm_dtype dd = op->dst.dtype, sd = op->src[0].dtype;
    char *y = p[0];
    const char *x = p[1];
    size_t dz = ksm_dtype_size(dd), sz = ksm_dtype_size(sd);
    int64_t sx = st[1] * (int64_t)sz; /* byte stride of the source */
    if (dd == sd) {
        if (st[1] == 1) {
            if (y != x) memcpy(y, x, (size_t)n * dz);
        } else {
            for (int64_t i = 0; i < n; i++) memcpy(y + i * (int64_t)dz, x + i * sx, dz);
        }
    } else if (dd == KSM_DTYPE_I64 || dd == KSM_DTYPE_I32) {
        for (int64_t i = 0; i < n; i++)
            store_int(y + i * (int64_t)dz, dd, load_int(x + i * sx, sd));
    } else {
        for (int64_t i = 0; i < n; i++)
            store_float(y + i * (int64_t)dz, dd, load_float(x + i * sx, sd));
    }
}

static int exec_fill(const struct ksm_op *op)
{
    int64_t n = numel_of(&op->dst);
    double v = op->p.fill.value;
    switch (op->dst.dtype) {
    case KSM_DTYPE_F32: {
        float *y = (float *)op->dst.data;
        const float f = (float)v;
        for (int64_t i = 0; i < n; i++) y[i] = f;
        break;
    }
    case KSM_DTYPE_F16:
    case KSM_DTYPE_BF16: {
        uint16_t *y = (uint16_t *)op->dst.data;
        const uint16_t h =
            op->dst.dtype == KSM_DTYPE_F16 ? ksm_f32_to_f16((float)v) : ksm_f32_to_bf16((float)v);
        for (int64_t i = 0; i < n; i++) y[i] = h;
        break;
    }
    case KSM_DTYPE_I64: {
        int64_t *y = (int64_t *)op->dst.data;
        const int64_t k = (int64_t)v;
        for (int64_t i = 0; i < n; i++) y[i] = k;
        break;
    }
    case KSM_DTYPE_I32: {
        int32_t *y = (int32_t *)op->dst.data;
        const int32_t k = (int32_t)v;
        for (int64_t i = 0; i < n; i++) y[i] = k;
        break;
    }
    default: return KSM_EUNSUPPORTED;
    }
    return 0;
}

/* ---- GEMM, linear, convolution ----
 *
 * OpenBLAS runs single-threaded (cpu_pool.c sets it); the parallelism is ours. A GEMM is cut
 * into tiles of whole rows or whole columns of C, a pure function of the shapes (so results do
 * not depend on the number of threads), and each tile is one single-threaded sgemm on a pool
 * thread. Convolutions run one tile of output pixels of one image per task: an im2col of the
 * tile's pixels into the thread's own slice of the workspace, then one sgemm.
 */

/* Floating-point operations below which a GEMM tile is not worth a thread hand-off. */
#define GEMM_TILE_FLOPS (4.0 * 1024 * 1024)

struct gemm_plan {
    int64_t batch, m, n, k;
    int64_t tile_m, tile_n; /* rows / columns of C per tile */
    int64_t tiles_m, tiles_n;
};

/* Tiles of rows (when M >= N: each tile then re-reads all of B, the smaller operand) or of
 * columns, at least 256 rows or 256 columns each (rounded to 16), and at most
 * 2 * KSM_CPU_MAX_THREADS tiles in all. Row tiles whose count falls short are also cut into
 * columns of at least 512 (a layer's [B*T, D] x [D, 3D] GEMM: 256 x 576 tiles). Every tile is
 * one sgemm, which packs its share of both operands: below 256 rows, repacking B for each tile
 * costs 10-20 % (OpenBLAS SkylakeX, K 384). */
static void plan_gemm(struct gemm_plan *p, int64_t batch, int64_t m, int64_t n, int64_t k)
{
    p->batch = batch;
    p->m = m;
    p->n = n;
    p->k = k;
    p->tile_m = m;
    p->tile_n = n;
    double flops = 2.0 * (double)m * (double)n * (double)(k > 0 ? k : 1) * (double)batch;
    double want = flops / GEMM_TILE_FLOPS;
    if (want > 2 * KSM_CPU_MAX_THREADS) want = 2 * KSM_CPU_MAX_THREADS;
    int64_t per = (int64_t)(want / (double)batch); /* tiles per matrix */
    if (per >= 2) {
        const bool rows = m >= n;
        const int64_t dim = rows ? m : n, least = 256;
        int64_t t = (dim + per - 1) / per;
        t = (t + 15) / 16 * 16;
        if (t < least) t = least;
        if (t < dim) {
            if (rows)
                p->tile_m = t;
            else
                p->tile_n = t;
        }
        const int64_t tiles_m = (m + p->tile_m - 1) / p->tile_m;
        if (rows && tiles_m < per) {
            const int64_t cols = (per + tiles_m - 1) / tiles_m;
            int64_t u = (n + cols - 1) / cols;
            u = (u + 15) / 16 * 16;
            if (u < 512) u = 512;
            if (u < n) p->tile_n = u;
        }
    }
    p->tiles_m = p->tile_m > 0 ? (m + p->tile_m - 1) / p->tile_m : 1;
    p->tiles_n = p->tile_n > 0 ? (n + p->tile_n - 1) / p->tile_n : 1;
}

static int64_t gemm_tiles(const struct gemm_plan *p) { return p->batch * p->tiles_m * p->tiles_n; }

/* Tile t of plan p: batch index and the C block [i0, i1) x [j0, j1). */
static void gemm_tile(const struct gemm_plan *p, int64_t t, int64_t *bi, int64_t *i0, int64_t *i1,
                      int64_t *j0, int64_t *j1)
{
    const int64_t per = p->tiles_m * p->tiles_n;
    *bi = t / per;
    const int64_t r = t % per, tm = r / p->tiles_n, tn = r % p->tiles_n;
    *i0 = tm * p->tile_m;
    *i1 = *i0 + p->tile_m < p->m ? *i0 + p->tile_m : p->m;
    *j0 = tn * p->tile_n;
    *j1 = *j0 + p->tile_n < p->n ? *j0 + p->tile_n : p->n;
}

/* c[M,N] (row stride ldc) <- beta * c, with beta == 0 writing zeros (NaN in c ignored), as
 * BLAS does. */
static void scale_rows(float *c, int64_t m, int64_t n, int64_t ldc, float beta)
{
    for (int64_t i = 0; i < m; i++) {
        float *r = c + i * ldc;
        if (beta == 0.0f)
            for (int64_t j = 0; j < n; j++) r[j] = 0.0f;
        else if (beta != 1.0f)
            for (int64_t j = 0; j < n; j++) r[j] *= beta;
    }
}

struct gemm_job {
    const struct ksm_op *op;
    struct gemm_plan plan;
};

static void gemm_tiles_run(void *ctx, int64_t b, int64_t e)
{
    const struct gemm_job *j = ctx;
    const struct ksm_op *op = j->op;
    const ksm_tensor *c = &op->dst, *a = &op->src[0], *bt = &op->src[1];
    const int nd = c->ndim;
    const int ta = op->p.gemm.trans_a, tb = op->p.gemm.trans_b;
    const int64_t lda = a->stride[nd - 2], ldb = bt->stride[nd - 2], ldc = c->stride[nd - 2];
    const int64_t sa = nd == 3 ? a->stride[0] : 0, sb = nd == 3 ? bt->stride[0] : 0;
    const int64_t sc = nd == 3 ? c->stride[0] : 0;
    const int64_t k = j->plan.k;
    for (int64_t t = b; t < e; t++) {
        int64_t bi, i0, i1, j0, j1;
        gemm_tile(&j->plan, t, &bi, &i0, &i1, &j0, &j1);
        float *pc = (float *)c->data + bi * sc + i0 * ldc + j0;
        if (k == 0 || op->p.gemm.alpha == 0.0f) {
            scale_rows(pc, i1 - i0, j1 - j0, ldc, op->p.gemm.beta);
            continue;
        }
        const float *pa = (const float *)a->data + bi * sa + (ta ? i0 : i0 * lda);
        const float *pb = (const float *)bt->data + bi * sb + (tb ? j0 * ldb : j0);
        cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    (int)(i1 - i0), (int)(j1 - j0), (int)k, op->p.gemm.alpha, pa, (int)lda, pb,
                    (int)ldb, op->p.gemm.beta, pc, (int)ldc);
    }
}

static int exec_gemm(const struct ksm_op *op)
{
    const ksm_tensor *c = &op->dst, *a = &op->src[0];
    const int nd = c->ndim;
    const int64_t m = c->shape[nd - 2], n = c->shape[nd - 1];
    const int64_t k = op->p.gemm.trans_a ? a->shape[nd - 2] : a->shape[nd - 1];
    if (m == 0 || n == 0 || (nd == 3 && c->shape[0] == 0)) return 0;
    struct gemm_job j = {.op = op};
    plan_gemm(&j.plan, nd == 3 ? c->shape[0] : 1, m, n, k);
    ksm_cpu_parallel_for(gemm_tiles(&j.plan), 1, gemm_tiles_run, &j);
    return 0;
}

/* Rows of y[.., ldy] restricted to columns [0, n) <- bias (or 0), so the GEMM can accumulate
 * with beta = 1. */
static void fill_rows_bias(float *y, int64_t m, int64_t n, int64_t ldy, const float *bias)
{
    for (int64_t i = 0; i < m; i++) {
        if (bias)
            memcpy(y + i * ldy, bias, (size_t)n * sizeof(float));
        else
            memset(y + i * ldy, 0, (size_t)n * sizeof(float));
    }
}

static void linear_tiles_run(void *ctx, int64_t b, int64_t e)
{
    const struct gemm_job *j = ctx;
    const struct ksm_op *op = j->op;
    const float *x = (const float *)op->src[0].data, *w = (const float *)op->src[1].data;
    const float *bias = (const float *)op->src[2].data;
    float *y = (float *)op->dst.data;
    const int64_t n = j->plan.n, k = j->plan.k;
    for (int64_t t = b; t < e; t++) {
        int64_t bi, i0, i1, j0, j1;
        gemm_tile(&j->plan, t, &bi, &i0, &i1, &j0, &j1);
        float *yt = y + i0 * n + j0;
        if (bias || k == 0) fill_rows_bias(yt, i1 - i0, j1 - j0, n, bias ? bias + j0 : NULL);
        if (k == 0) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(i1 - i0), (int)(j1 - j0), (int)k,
                    1.0f, x + i0 * k, (int)k, w + j0 * k, (int)k, bias ? 1.0f : 0.0f, yt, (int)n);
    }
}

static int exec_linear(const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *w = &op->src[1];
    int64_t n = w->shape[0], k = w->shape[1];
    int64_t m = 1;
    for (int i = 0; i < x->ndim - 1; i++) m *= x->shape[i];
    if (m == 0 || n == 0) return 0;
    struct gemm_job j = {.op = op};
    plan_gemm(&j.plan, 1, m, n, k);
    ksm_cpu_parallel_for(gemm_tiles(&j.plan), 1, linear_tiles_run, &j);
    return 0;
}

/* Columns [lo, hi) of an output row read input columns lo + off .. hi + off - 1 that exist. */
static void valid_cols(int64_t out_w, int64_t in_w, int64_t off, int64_t *lo, int64_t *hi)
{
    int64_t l = -off > 0 ? -off : 0;
    int64_t h = in_w - off < out_w ? in_w - off : out_w;
    if (h < l) h = l;
    *lo = l;
    *hi = h;
}

/* Unrolls output pixels [p0, p1) of channels [0, cin) of one image's group into
 * col[cin*kh*kw, p1 - p0]: row (c, ki, kj) = (c * kh + ki) * kw + kj. */
static void im2col_tile(const float *x, int64_t cin, int64_t h, int64_t w, int64_t kh, int64_t kw,
                        int64_t ph, int64_t pw, int64_t wo, int64_t p0, int64_t p1, float *col)
{
    const int64_t cols = p1 - p0;
    for (int64_t rr = 0; rr < cin * kh * kw; rr++) {
        const int64_t c = rr / (kh * kw), ki = rr / kw % kh, kj = rr % kw;
        int64_t lo, hi, off = kj - pw;
        valid_cols(wo, w, off, &lo, &hi);
        for (int64_t oh = p0 / wo; oh * wo < p1; oh++) {
            /* output columns [b, e) of row oh are in the tile; r[0] is pixel (oh, b) */
            const int64_t b = oh * wo > p0 ? 0 : p0 - oh * wo;
            const int64_t e = (oh + 1) * wo < p1 ? wo : p1 - oh * wo;
            float *r = col + rr * cols + (oh * wo + b - p0);
            const int64_t ih = oh + ki - ph;
            if (ih < 0 || ih >= h) {
                memset(r, 0, (size_t)(e - b) * sizeof(float));
                continue;
            }
            const int64_t l = lo < b ? b : (lo > e ? e : lo), u = hi < l ? l : (hi > e ? e : hi);
            for (int64_t ow = b; ow < l; ow++) r[ow - b] = 0.0f;
            if (u > l)
                memcpy(r + (l - b), x + (c * h + ih) * w + (l + off),
                       (size_t)(u - l) * sizeof(float));
            for (int64_t ow = u; ow < e; ow++) r[ow - b] = 0.0f;
        }
    }
}

struct dw_job {
    const float *x, *w, *bias;
    float *y;
    int64_t c, h, wd, kh, kw, ph, pw, ho, wo;
};

/* Depthwise planes [b, e), plane p = n * C + c. */
static void depthwise_planes(void *ctx, int64_t b, int64_t e)
{
    const struct dw_job *j = ctx;
    const int64_t h = j->h, wd = j->wd, kh = j->kh, kw = j->kw, ph = j->ph, pw = j->pw;
    const int64_t ho = j->ho, wo = j->wo, howo = ho * wo, hw = h * wd;
    for (int64_t pl = b; pl < e; pl++) {
        const int64_t c = pl % j->c;
        const float *xp = j->x + pl * hw;
        float *yp = j->y + pl * howo;
        const float b0 = j->bias ? j->bias[c] : 0.0f;
        for (int64_t i = 0; i < howo; i++) yp[i] = b0;
        for (int64_t ki = 0; ki < kh; ki++)
            for (int64_t kj = 0; kj < kw; kj++) {
                const float wv = j->w[(c * kh + ki) * kw + kj];
                int64_t lo, hi, off = kj - pw;
                valid_cols(wo, wd, off, &lo, &hi);
                for (int64_t oh = 0; oh < ho; oh++) {
                    int64_t ih = oh + ki - ph;
                    if (ih < 0 || ih >= h) continue;
                    const float *xr = xp + ih * wd + off;
                    float *yr = yp + oh * wo;
                    for (int64_t ow = lo; ow < hi; ow++) yr[ow] += wv * xr[ow];
                }
            }
    }
}

/* y[i] <- (x[i] - m) * a + b; y may equal x. */
KSM_VEC_CLONES
static void shift_scale(float *y, const float *x, int64_t n, float m, float a, float b)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] = (x[i + k] - m) * a + b;
    for (; i < n; i++) y[i] = (x[i] - m) * a + b;
}

/* y[i] <- relu((x[i] - m) * a + b); y may equal x. */
KSM_VEC_CLONES
static void shift_scale_relu(float *y, const float *x, int64_t n, float m, float a, float b)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] = ksm_relu((x[i + k] - m) * a + b);
    for (; i < n; i++) y[i] = ksm_relu((x[i] - m) * a + b);
}

struct conv_job {
    const float *x, *w, *bias;
    float *y, *ws;
    int64_t ci, h, wd, co, kh, kw, ph, pw, g, ho, wo;
    int64_t cig, cog, kdim, howo;
    int64_t tile_cols, tiles_per_image, slice; /* slice: floats per thread */
    bool direct;                               /* 1x1 without padding: no im2col */
    const float *bn_m, *bn_a, *bn_b;           /* BatchNorm + ReLU epilogue, or NULL */
};

/* The fused epilogue's per-channel scale, as batchnorm_planes computes it. */
static void bn_scales(const struct ksm_op *op, int64_t co, float *a)
{
    const float *var = (const float *)op->src[4].data, *wt = (const float *)op->src[5].data;
    for (int64_t c = 0; c < co; c++)
        a[c] = (float)((double)wt[c] / sqrt((double)var[c] + (double)op->p.conv2d.bn_eps));
}

/* Tasks [b, e), task = image * tiles_per_image + tile: every group of the tile's pixels. */
static void conv_tiles(void *ctx, int slot, int64_t b, int64_t e)
{
    const struct conv_job *j = ctx;
    float *col = j->ws ? j->ws + slot * j->slice : NULL;
    const int64_t howo = j->howo, kdim = j->kdim, cog = j->cog;
    for (int64_t t = b; t < e; t++) {
        const int64_t n = t / j->tiles_per_image, p0 = t % j->tiles_per_image * j->tile_cols;
        const int64_t p1 = p0 + j->tile_cols < howo ? p0 + j->tile_cols : howo;
        const int64_t cols = p1 - p0;
        float *yn = j->y + n * j->co * howo + p0;
        for (int64_t gi = 0; gi < j->g; gi++) {
            float *yg = yn + gi * cog * howo;
            if (j->bias || kdim == 0)
                for (int64_t c = 0; c < cog; c++) {
                    const float v = j->bias ? j->bias[gi * cog + c] : 0.0f;
                    for (int64_t i = 0; i < cols; i++) yg[c * howo + i] = v;
                }
            if (kdim > 0) {
                const float *xg = j->x + (n * j->ci + gi * j->cig) * j->h * j->wd;
                const float *bmat = xg + p0;
                int64_t ldb = howo;
                if (!j->direct) {
                    im2col_tile(xg, j->cig, j->h, j->wd, j->kh, j->kw, j->ph, j->pw, j->wo, p0, p1,
                                col);
                    bmat = col;
                    ldb = cols;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)cog, (int)cols,
                            (int)kdim, 1.0f, j->w + gi * cog * kdim, (int)kdim, bmat, (int)ldb,
                            j->bias ? 1.0f : 0.0f, yg, (int)howo);
            }
            if (j->bn_a)
                for (int64_t c = 0; c < cog; c++) {
                    const int64_t ch = gi * cog + c;
                    shift_scale_relu(yg + c * howo, yg + c * howo, cols, j->bn_m[ch], j->bn_a[ch],
                                     j->bn_b[ch]);
                }
        }
    }
}

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
            if (j->bn_a) shift_scale_relu(yr, yr, xn, j->bn_m[o], j->bn_a[o], j->bn_b[o]);
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

static int exec_conv2d_winograd(const struct ksm_op *op, int64_t nb, int64_t ci, int64_t h,
                                int64_t wd, int64_t co, const float *bn_a)
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
    ksm_cpu_parallel_for(co * ci, grain_for(36), wino_filters, &j);
    ksm_cpu_parallel_for_slots(
        chunks, 1, (int)(fit < KSM_CPU_MAX_THREADS ? fit : KSM_CPU_MAX_THREADS), wino_chunks, &j);
    return 0;
}

struct bn_planes_job {
    float *y;
    const float *m, *a, *b;
    int64_t c, inner;
};

static void bn_relu_planes(void *ctx, int64_t b, int64_t e)
{
    const struct bn_planes_job *j = ctx;
    for (int64_t p = b; p < e; p++) {
        const int64_t ch = p % j->c;
        shift_scale_relu(j->y + p * j->inner, j->y + p * j->inner, j->inner, j->m[ch], j->a[ch],
                         j->b[ch]);
    }
}

/* bn_a: the BatchNorm epilogue's per-channel scales, or NULL. */
static int conv2d_impl(const struct ksm_op *op, const float *bn_a)
{
    const ksm_tensor *xt = &op->src[0], *wt = &op->src[1];
    const float *x = (const float *)xt->data, *w = (const float *)wt->data;
    const float *bias = (const float *)op->src[2].data;
    float *y = (float *)op->dst.data;
    int64_t nb = xt->shape[0], ci = xt->shape[1], h = xt->shape[2], wd = xt->shape[3];
    int64_t co = wt->shape[0], kh = wt->shape[2], kw = wt->shape[3];
    int64_t ph = op->p.conv2d.pad_h, pw = op->p.conv2d.pad_w, g = op->p.conv2d.groups;
    int64_t ho = op->dst.shape[2], wo = op->dst.shape[3];
    int64_t cig = ci / g, cog = co / g, howo = ho * wo;
    if (nb == 0 || co == 0 || howo == 0) return 0;

    const float *bn_m = (const float *)op->src[3].data, *bn_b = (const float *)op->src[6].data;
    if (g == ci && g == co) { /* depthwise: direct kernel, no workspace */
        struct dw_job job = {x, w, bias, y, co, h, wd, kh, kw, ph, pw, ho, wo};
        ksm_cpu_parallel_for(nb * co, grain_for(howo * kh * kw), depthwise_planes, &job);
        if (bn_a) {
            struct bn_planes_job bj = {y, bn_m, bn_a, bn_b, co, howo};
            ksm_cpu_parallel_for(nb * co, grain_for(howo), bn_relu_planes, &bj);
        }
        return 0;
    }

    if (ksm_conv2d_winograd(ci, co, kh, kw, ph, pw, g) && ho == h && wo == wd)
        return exec_conv2d_winograd(op, nb, ci, h, wd, co, bn_a);

    struct conv_job j = {.x = x,
                         .w = w,
                         .bias = bias,
                         .y = y,
                         .ci = ci,
                         .h = h,
                         .wd = wd,
                         .co = co,
                         .kh = kh,
                         .kw = kw,
                         .ph = ph,
                         .pw = pw,
                         .g = g,
                         .ho = ho,
                         .wo = wo,
                         .cig = cig,
                         .cog = cog,
                         .kdim = cig * kh * kw,
                         .howo = howo,
                         .direct = kh == 1 && kw == 1 && ph == 0 && pw == 0};
    if (bn_a) {
        j.bn_m = bn_m;
        j.bn_a = bn_a;
        j.bn_b = bn_b;
    }
    j.tile_cols = ksm_conv2d_tile_cols(nb, howo);
    j.tiles_per_image = (howo + j.tile_cols - 1) / j.tile_cols;
    int slots = 1;
    if (!j.direct && j.kdim > 0) {
        /* ops.c sized the workspace for ksm_conv2d_slices() slices of one tile's columns; with
         * no input channels (kdim 0) its size is 0 */
        j.slice = j.kdim * j.tile_cols;
        size_t slice_bytes = (size_t)j.slice * sizeof(float);
        if (op->ws == NULL || op->ws_bytes < slice_bytes) return KSM_EINTERNAL;
        j.ws = (float *)op->ws;
        int64_t fit = (int64_t)(op->ws_bytes / slice_bytes);
        slots = (int)(fit < KSM_CPU_MAX_THREADS ? fit : KSM_CPU_MAX_THREADS);
    } else {
        slots = KSM_CPU_MAX_THREADS;
    }
    ksm_cpu_parallel_for_slots(nb * j.tiles_per_image, 1, slots, conv_tiles, &j);
    return 0;
}

static int exec_conv2d(const struct ksm_op *op)
{
    if (!op->p.conv2d.bn_relu) return conv2d_impl(op, NULL);
    const int64_t co = op->dst.shape[1];
    float stack[512] = {0}, *a = co <= 512 ? stack : malloc(sizeof(float) * (size_t)co);
    if (a == NULL) return KSM_EDEVMEM;
    bn_scales(op, co, a);
    int rc = conv2d_impl(op, a);
    if (a != stack) free(a);
    return rc;
}

/* ---- Normalisation and softmax ---- */

/* Mean and 1/sqrt(biased variance + eps) of n contiguous floats: two passes in double, each
 * with eight partial sums (independent chains; fixed-width blocks vectorise at -O2). */
static void moments(const float *KSM_RESTRICT x, int64_t n, double eps, float *mean_out,
                    float *rstd_out)
{
    double s8[8] = {0}, s = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s8[k] += x[i + k];
    for (; i < n; i++) s += x[i];
    for (int k = 0; k < 8; k++) s += s8[k];
    const double mean = n > 0 ? s / (double)n : 0.0;
    double q8[8] = {0}, ss = 0.0;
    for (i = 0; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            const double d = (double)x[i + k] - mean;
            q8[k] += d * d;
        }
    for (; i < n; i++) ss += ((double)x[i] - mean) * ((double)x[i] - mean);
    for (int k = 0; k < 8; k++) ss += q8[k];
    const double var = n > 0 ? ss / (double)n : 0.0;
    *mean_out = (float)mean;
    *rstd_out = (float)(1.0 / sqrt(var + eps));
}

/* Plane p = n * C + c of an [N, C, inner] tensor: y = (x - mean) * a + b per channel. */
static void batchnorm_planes(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const float *mean = (const float *)op->src[1].data, *var = (const float *)op->src[2].data;
    const float *wt = (const float *)op->src[3].data, *bs = (const float *)op->src[4].data;
    const int64_t c = xt->shape[1], inner = numel_of(xt) / (xt->shape[0] * c);
    for (int64_t pl = b; pl < e; pl++) {
        const int64_t ch = pl % c;
        const float a = (float)((double)wt[ch] / sqrt((double)var[ch] + (double)op->p.norm.eps));
        (op->p.norm.relu ? shift_scale_relu : shift_scale)((float *)op->dst.data + pl * inner,
                                                           (const float *)xt->data + pl * inner,
                                                           inner, mean[ch], a, bs[ch]);
    }
}

static int exec_batchnorm(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    int64_t planes = xt->shape[0] * xt->shape[1];
    if (planes == 0) return 0;
    ksm_cpu_parallel_for(planes, grain_for(numel_of(xt) / planes), batchnorm_planes, (void *)op);
    return 0;
}

/* Groups [b, e), group q = n * G + g. */
static void groupnorm_groups(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const float *wt = (const float *)op->src[1].data, *bs = (const float *)op->src[2].data;
    const int64_t c = xt->shape[1], g = op->p.norm.groups, cg = c / g;
    const int64_t inner = numel_of(xt) / (xt->shape[0] * c);
    for (int64_t q = b; q < e; q++) {
        const int64_t gi = q % g;
        const float *xp = (const float *)xt->data + q * cg * inner;
        float *yp = (float *)op->dst.data + q * cg * inner;
        float mean, rstd;
        moments(xp, cg * inner, op->p.norm.eps, &mean, &rstd);
        for (int64_t cc = 0; cc < cg; cc++) {
            const int64_t ch = gi * cg + cc;
            const float a = rstd * (wt ? wt[ch] : 1.0f), bb = bs ? bs[ch] : 0.0f;
            shift_scale(yp + cc * inner, xp + cc * inner, inner, mean, a, bb);
        }
    }
}

static int exec_groupnorm(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    const int64_t groups = xt->shape[0] * op->p.norm.groups;
    if (groups == 0 || numel_of(xt) == 0) return 0;
    ksm_cpu_parallel_for(groups, grain_for(numel_of(xt) / groups), groupnorm_groups, (void *)op);
    return 0;
}

static void layernorm_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const float *x = (const float *)xt->data;
    const float *wt = (const float *)op->src[1].data, *bs = (const float *)op->src[2].data;
    float *y = (float *)op->dst.data;
    const int64_t d = xt->shape[xt->ndim - 1];
    for (int64_t r = b; r < e; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        float mean, rstd;
        moments(xr, d, op->p.norm.eps, &mean, &rstd);
        if (wt && bs) {
            int64_t i = 0;
            for (; i + 8 <= d; i += 8)
                for (int k = 0; k < 8; k++)
                    yr[i + k] = (xr[i + k] - mean) * rstd * wt[i + k] + bs[i + k];
            for (; i < d; i++) yr[i] = (xr[i] - mean) * rstd * wt[i] + bs[i];
        } else {
            for (int64_t i = 0; i < d; i++)
                yr[i] = (xr[i] - mean) * rstd * (wt ? wt[i] : 1.0f) + (bs ? bs[i] : 0.0f);
        }
    }
}

static int exec_layernorm(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    int64_t d = xt->shape[xt->ndim - 1];
    if (d == 0) return 0;
    ksm_cpu_parallel_for(numel_of(xt) / d, grain_for(d), layernorm_rows, (void *)op);
    return 0;
}

/* Maximum of a row with NaN winning (so a NaN row poisons its softmax, as in PyTorch), in the
 * integer domain so that it vectorises: the maximum of the floats' order keys (ksm_cm_key; max
 * is exact, so the order does not matter; +0 ranks above -0, which every caller treats alike)
 * and a NaN flag from the bits; the first NaN is returned as a serial scan would. */
KSM_VEC_CLONES
static float row_max(const float *x, int64_t n)
{
    const int32_t lowest = ksm_cm_key(0xff800000u); /* -inf */
    int32_t k16[16];
    uint32_t nan16[16];
    for (int k = 0; k < 16; k++) {
        k16[k] = lowest;
        nan16[k] = 0;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) {
            const uint32_t b = ksm_cm_fbits(x[i + k]);
            const int32_t key = ksm_cm_key(b);
            k16[k] = key > k16[k] ? key : k16[k];
            nan16[k] |= (uint32_t)((b & 0x7fffffffu) > 0x7f800000u);
        }
    int32_t m = lowest;
    uint32_t nan = 0;
    for (int k = 0; k < 16; k++) {
        m = k16[k] > m ? k16[k] : m;
        nan |= nan16[k];
    }
    for (; i < n; i++) {
        const uint32_t b = ksm_cm_fbits(x[i]);
        const int32_t key = ksm_cm_key(b);
        m = key > m ? key : m;
        nan |= (uint32_t)((b & 0x7fffffffu) > 0x7f800000u);
    }
    if (nan)
        for (i = 0; i < n; i++)
            if (x[i] != x[i]) return x[i];
    return ksm_cm_bitsf((uint32_t)ksm_cm_key((uint32_t)m));
}

/* Sum of n floats in double, eight partial sums (a fixed order, vectorisable). */
static double sum_f64(const float *x, int64_t n)
{
    double s8[8] = {0}, s = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s8[k] += x[i + k];
    for (; i < n; i++) s += x[i];
    return ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7])) + s;
}

KSM_VEC_CLONES
static void softmax_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const int64_t d = xt->shape[xt->ndim - 1];
    for (int64_t r = b; r < e; r++) {
        const float *xr = (const float *)xt->data + r * d;
        float *yr = (float *)op->dst.data + r * d;
        const float m = row_max(xr, d);
        for (int64_t i = 0; i < d; i++) yr[i] = ksm_cpu_expf(xr[i] - m);
        const float inv = (float)(1.0 / sum_f64(yr, d));
        for (int64_t i = 0; i < d; i++) yr[i] *= inv;
    }
}

static int exec_softmax(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    int64_t d = xt->shape[xt->ndim - 1];
    if (d == 0) return 0;
    ksm_cpu_parallel_for(numel_of(xt) / d, grain_for(d), softmax_rows, (void *)op);
    return 0;
}

/* ---- Attention ----
 *
 * Blocks of SDPA_QB query rows of one (batch, head), each a task, with an online softmax
 * (flash-style) over chunks of SDPA_KC keys: the chunk's scores S = scale * Q K^T by one sgemm
 * into a stack buffer, per row the chunk maximum, one rescale of the running sum l (double) and
 * of the output rows accumulated so far, P = e^(S - m) in place, then O += P V by one sgemm
 * over the keys every row of the block sees. Under the causal mask the block's last SDPA_QB - 1
 * keys are seen by some rows only: their scores are computed but never used, and their values
 * are accumulated row by row, so a masked key's value (even a NaN) never reaches a row that
 * does not see it. The output rows are the accumulator; no workspace. The blocking is a pure
 * function of the shapes, so results do not depend on the number of threads.
 *
 * Views whose row strides an sgemm cannot take (a row stride below the head dim) go one query
 * row at a time instead (sdpa_row: online softmax over blocks of SDPA_KEY_BLOCK keys, dot
 * products with eight partial sums).
 */
enum { SDPA_KEY_BLOCK = 64, SDPA_QB = 64, SDPA_KC = 256 };

static float dot_f32(const float *KSM_RESTRICT a, const float *KSM_RESTRICT b, int64_t n)
{
    float s[8] = {0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int k = 0; k < 8; k++) s[k] += a[d + k] * b[d + k];
    float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; d < n; d++) r += a[d] * b[d];
    return r;
}

static void sdpa_row(const float *KSM_RESTRICT qr, const float *kb, int64_t ks, const float *vb,
                     int64_t vs, int64_t nkeys, int64_t hd, float scale, float *KSM_RESTRICT out)
{
    float acc[KSM_SDPA_MAX_HEAD_DIM];
    float sc[SDPA_KEY_BLOCK];
    float m = -INFINITY;
    double l = 0.0;
    for (int64_t d = 0; d < hd; d++) acc[d] = 0.0f;
    for (int64_t j0 = 0; j0 < nkeys; j0 += SDPA_KEY_BLOCK) {
        int64_t nb = nkeys - j0 < SDPA_KEY_BLOCK ? nkeys - j0 : SDPA_KEY_BLOCK;
        float bm = -INFINITY;
        for (int64_t j = 0; j < nb; j++) {
            sc[j] = dot_f32(qr, kb + (j0 + j) * ks, hd) * scale;
            if (sc[j] > bm) bm = sc[j]; /* a NaN score never wins here but poisons its p below */
        }
        if (bm > m) { /* rescale what was accumulated under the old maximum (0 at first) */
            const float corr = ksm_cpu_expf(m - bm);
            l *= corr;
            for (int64_t d = 0; d < hd; d++) acc[d] *= corr;
            m = bm;
        }
        for (int64_t j = 0; j < nb; j++) sc[j] = ksm_cpu_expf(sc[j] - m);
        for (int64_t j = 0; j < nb; j++) {
            const float p = sc[j];
            const float *KSM_RESTRICT vr = vb + (j0 + j) * vs;
            int64_t d = 0;
            l += p;
            for (; d + 8 <= hd; d += 8) /* fixed-width blocks vectorise at -O2 */
                for (int k = 0; k < 8; k++) acc[d + k] += p * vr[d + k];
            for (; d < hd; d++) acc[d] += p * vr[d];
        }
    }
    const float inv = (float)(1.0 / l);
    for (int64_t d = 0; d < hd; d++) out[d] = acc[d] * inv;
}

/* Query rows [b, e) of all (batch, head) pairs, row r = (b * H + h) * Tq + i. */
static void sdpa_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2], *o = &op->dst;
    const int64_t nh = q->shape[1], tq = q->shape[2], hd = q->shape[3], tk = k->shape[2];
    for (int64_t r = b; r < e; r++) {
        const int64_t i = r % tq, h = r / tq % nh, bi = r / tq / nh;
        const float *qb = (const float *)q->data + bi * q->stride[0] + h * q->stride[1];
        const float *kb = (const float *)k->data + bi * k->stride[0] + h * k->stride[1];
        const float *vb = (const float *)v->data + bi * v->stride[0] + h * v->stride[1];
        float *ob = (float *)o->data + bi * o->stride[0] + h * o->stride[1];
        int64_t nkeys = op->p.sdpa.causal ? i + (tk - tq) + 1 : tk;
        if (nkeys > tk) nkeys = tk;
        sdpa_row(qb + i * q->stride[2], kb, k->stride[2], vb, v->stride[2], nkeys, hd,
                 op->p.sdpa.scale, ob + i * o->stride[2]);
    }
}

/* Row stride of t[.., T, hd] for an sgemm: its stride of dim 2, any value >= hd when T is 1;
 * 0 when an sgemm cannot use it (below hd). */
static int64_t sdpa_ld(const ksm_tensor *t)
{
    const int64_t hd = t->shape[3];
    const int64_t ld = t->shape[2] > 1 ? t->stride[2] : hd;
    return ld >= hd && ld <= INT32_MAX ? ld : 0;
}

/* Exponents below this give subnormal floats, which cost a microcode assist each: such terms
 * (< 1.2e-38 of the row maximum's) are flushed to 0 instead. */
#define SDPA_EXP_FLUSH (-87.33654f)

/* e^t of a score minus the row maximum: 0 below SDPA_EXP_FLUSH (-inf included), NaN for a
 * NaN. */
static inline float sdpa_term(float t)
{
    uint32_t p = ksm_cm_fbits(ksm_cpu_expf_normal(ksm_cm_clampf(t, SDPA_EXP_FLUSH, 0.0f)));
    p &= 0u - (uint32_t) !(t < SDPA_EXP_FLUSH);
    return ksm_cm_bitsf(ksm_cm_nan_from(p, ksm_cm_fbits(t)));
}

/* e^(x[j] - m) in place for j < n (-inf scores give 0); returns their sum in double. A NaN
 * score gives a NaN term. */
KSM_VEC_CLONES
static double sdpa_exp_row(float *KSM_RESTRICT x, int64_t n, float m)
{
    double s16[16] = {0}, s = 0.0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++) {
            const float t = x[j + k] - m;
            const float p = sdpa_term(t);
            x[j + k] = p;
            s16[k] += (double)p;
        }
    for (; j < n; j++) {
        const float t = x[j] - m;
        x[j] = sdpa_term(t);
        s += (double)x[j];
    }
    for (int k = 0; k < 16; k++) s += s16[k];
    return s;
}

/* y[0, n) += sum over j < nj of p[j] * (row j of x, row stride ldx), j in order, 64 columns at
 * a time kept in registers. */
KSM_VEC_CLONES
static void axpy_rows(float *KSM_RESTRICT y, const float *KSM_RESTRICT x, int64_t ldx,
                      const float *KSM_RESTRICT p, int64_t nj, int64_t n)
{
    int64_t d = 0;
    for (; d + 64 <= n; d += 64) {
        float acc[64];
        for (int k = 0; k < 64; k++) acc[k] = y[d + k];
        for (int64_t j = 0; j < nj; j++) {
            const float pj = p[j];
            const float *xr = x + j * ldx + d;
            for (int k = 0; k < 64; k++) acc[k] += pj * xr[k];
        }
        for (int k = 0; k < 64; k++) y[d + k] = acc[k];
    }
    for (; d < n; d++) {
        float a = y[d];
        for (int64_t j = 0; j < nj; j++) a += p[j] * x[j * ldx + d];
        y[d] = a;
    }
}

/* y[0, n) *= a. */
static void scale_f32(float *y, int64_t n, float a)
{
    for (int64_t d = 0; d < n; d++) y[d] *= a;
}

struct sdpa_job {
    const struct ksm_op *op;
    int64_t nblk;               /* query blocks per (batch, head) */
    int64_t ldq, ldk, ldv, ldo; /* row strides */
};

/* Tasks [b, e): task = (bi * H + h) * nblk + block. */
KSM_VEC_CLONES
static void sdpa_blocks(void *ctx, int64_t b, int64_t e)
{
    const struct sdpa_job *j = ctx;
    const struct ksm_op *op = j->op;
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2], *o = &op->dst;
    const int64_t nh = q->shape[1], tq = q->shape[2], hd = q->shape[3], tk = k->shape[2];
    const bool causal = op->p.sdpa.causal;
    const int64_t off = causal ? tk - tq : 0; /* row i sees keys j <= i + off */
    float sbuf[SDPA_QB * SDPA_KC];
    float m[SDPA_QB];
    double l[SDPA_QB];
    for (int64_t t = b; t < e; t++) {
        const int64_t blk = t % j->nblk, bh = t / j->nblk, h = bh % nh, bi = bh / nh;
        const int64_t i0 = blk * SDPA_QB, mb = tq - i0 < SDPA_QB ? tq - i0 : SDPA_QB;
        const float *qb =
            (const float *)q->data + bi * q->stride[0] + h * q->stride[1] + i0 * j->ldq;
        const float *kb = (const float *)k->data + bi * k->stride[0] + h * k->stride[1];
        const float *vb = (const float *)v->data + bi * v->stride[0] + h * v->stride[1];
        float *ob = (float *)o->data + bi * o->stride[0] + h * o->stride[1] + i0 * j->ldo;
        /* keys the block's last row sees, and those every row sees */
        const int64_t nk = causal ? i0 + mb + off : tk, full = causal ? i0 + 1 + off : tk;
        for (int64_t r = 0; r < mb; r++) {
            m[r] = -INFINITY;
            l[r] = 0.0;
            memset(ob + r * j->ldo, 0, (size_t)hd * sizeof(float));
        }
        for (int64_t c0 = 0; c0 < nk; c0 += SDPA_KC) {
            const int64_t kn = nk - c0 < SDPA_KC ? nk - c0 : SDPA_KC;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mb, (int)kn, (int)hd,
                        op->p.sdpa.scale, qb, (int)j->ldq, kb + c0 * j->ldk, (int)j->ldk, 0.0f,
                        sbuf, SDPA_KC);
            for (int64_t r = 0; r < mb; r++) {
                float *sr = sbuf + r * SDPA_KC;
                int64_t n = causal ? i0 + r + off + 1 - c0 : kn; /* keys of the chunk row r sees */
                n = n < kn ? n : kn;
                if (n <= 0) { /* none in this chunk */
                    memset(sr, 0, (size_t)kn * sizeof(float));
                    continue;
                }
                /* masked scores: -inf (a NaN key there must not poison the row), so every row
                 * of the block runs the same vector loops */
                for (int64_t jj = n; jj < kn; jj++) sr[jj] = -INFINITY;
                /* a NaN maximum (row_max returns the first NaN) poisons the row, as the NaN
                 * score's own term would */
                const float bm = row_max(sr, n);
                if (bm > m[r]) {
                    if (m[r] > -INFINITY) { /* rescale what the old maximum accumulated */
                        const float corr = ksm_cpu_expf(m[r] - bm);
                        l[r] *= corr;
                        scale_f32(ob + r * j->ldo, hd, corr);
                    }
                    m[r] = bm;
                }
                l[r] += sdpa_exp_row(sr, kn, m[r]);
            }
            /* keys [c0, c0 + kf) are seen by every row: one sgemm; the rest row by row */
            const int64_t kf = full - c0 < kn ? (full - c0 > 0 ? full - c0 : 0) : kn;
            if (kf > 0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mb, (int)hd, (int)kf,
                            1.0f, sbuf, SDPA_KC, vb + c0 * j->ldv, (int)j->ldv, 1.0f, ob,
                            (int)j->ldo);
            for (int64_t r = 0; r < mb && kf < kn; r++) {
                int64_t n = causal ? i0 + r + off + 1 - c0 : kn;
                n = n < kn ? n : kn;
                if (n > kf)
                    axpy_rows(ob + r * j->ldo, vb + (c0 + kf) * j->ldv, j->ldv,
                              sbuf + r * SDPA_KC + kf, n - kf, hd);
            }
        }
        for (int64_t r = 0; r < mb; r++) scale_f32(ob + r * j->ldo, hd, (float)(1.0 / l[r]));
    }
}

static int exec_sdpa(const struct ksm_op *op)
{
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2];
    const int64_t bh = q->shape[0] * q->shape[1], tq = q->shape[2], hd = q->shape[3];
    const int64_t tk = k->shape[2];
    if (bh == 0 || tq == 0) return 0;
    struct sdpa_job j = {.op = op, .nblk = (tq + SDPA_QB - 1) / SDPA_QB};
    j.ldq = sdpa_ld(q);
    j.ldk = sdpa_ld(k);
    j.ldv = sdpa_ld(v);
    j.ldo = sdpa_ld(&op->dst);
    if (j.ldq == 0 || j.ldk == 0 || j.ldv == 0 || j.ldo == 0) {
        ksm_cpu_parallel_for(bh * tq, grain_for(2 * tk * hd), sdpa_rows, (void *)op);
        return 0;
    }
    ksm_cpu_parallel_for(bh * j.nblk, 1, sdpa_blocks, &j);
    return 0;
}

/* ---- Embedding, reductions, pooling, losses ---- */

static void embedding_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *wt = &op->src[0], *it = &op->src[1];
    const int64_t vocab = wt->shape[0], d = wt->shape[1];
    for (int64_t r = b; r < e; r++) {
        int64_t id = it->dtype == KSM_DTYPE_I32 ? ((const int32_t *)it->data)[r]
                                                : ((const int64_t *)it->data)[r];
        float *yr = (float *)op->dst.data + r * d;
        if (id >= 0 && id < vocab)
            memcpy(yr, (const float *)wt->data + id * d, (size_t)d * sizeof(float));
        else
            for (int64_t i = 0; i < d; i++) yr[i] = NAN;
    }
}

static int exec_embedding(const struct ksm_op *op)
{
    ksm_cpu_parallel_for(numel_of(&op->src[1]), grain_for(op->src[0].shape[1]), embedding_rows,
                         (void *)op);
    return 0;
}

struct mean_job {
    const struct ksm_op *op;
    int64_t outer, red, inner;
};

/* Outputs [b, e) in chunks of the inner dim: task t = o * nchunks + chunk. */
enum { MEAN_CHUNK = 256 };

KSM_VEC_CLONES
static void mean_tasks(void *ctx, int64_t b, int64_t e)
{
    const struct mean_job *j = ctx;
    const float *x = (const float *)j->op->src[0].data;
    float *y = (float *)j->op->dst.data;
    const int64_t red = j->red, inner = j->inner;
    const int64_t nchunks = (inner + MEAN_CHUNK - 1) / MEAN_CHUNK;
    double acc[MEAN_CHUNK];
    for (int64_t t = b; t < e; t++) {
        const int64_t o = t / nchunks, i0 = t % nchunks * MEAN_CHUNK;
        const int64_t len = inner - i0 < MEAN_CHUNK ? inner - i0 : MEAN_CHUNK;
        for (int64_t i = 0; i < len; i++) acc[i] = 0.0;
        for (int64_t r = 0; r < red; r++) {
            const float *xr = x + (o * red + r) * inner + i0;
            for (int64_t i = 0; i < len; i++) acc[i] += xr[i];
        }
        for (int64_t i = 0; i < len; i++)
            y[o * inner + i0 + i] = (float)(acc[i] / (double)red); /* red 0: NaN */
    }
}

static int exec_mean(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    struct mean_job j = {op, 1, 1, 1};
    for (int i = 0; i < xt->ndim; i++) {
        if (i < op->p.mean.dim_begin)
            j.outer *= xt->shape[i];
        else if (i < op->p.mean.dim_end)
            j.red *= xt->shape[i];
        else
            j.inner *= xt->shape[i];
    }
    if (j.outer == 0 || j.inner == 0) return 0;
    const int64_t nchunks = (j.inner + MEAN_CHUNK - 1) / MEAN_CHUNK;
    const int64_t per = j.red * (j.inner < MEAN_CHUNK ? j.inner : MEAN_CHUNK);
    ksm_cpu_parallel_for(j.outer * nchunks, grain_for(per), mean_tasks, &j);
    return 0;
}

KSM_VEC_CLONES
static void maxpool_planes(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const int64_t h = xt->shape[2], w = xt->shape[3];
    const int64_t ho = op->dst.shape[2], wo = op->dst.shape[3];
    for (int64_t p = b; p < e; p++) {
        const float *xp = (const float *)xt->data + p * h * w;
        float *yp = (float *)op->dst.data + p * ho * wo;
        for (int64_t oh = 0; oh < ho; oh++) {
            const float *r0 = xp + 2 * oh * w, *r1 = r0 + w;
            for (int64_t ow = 0; ow < wo; ow++) {
                const float v[4] = {r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]};
                float m = v[0];
                for (int k = 1; k < 4; k++) /* NaN wins (PyTorch) */
                    m = (v[k] > m || v[k] != v[k]) ? v[k] : m;
                yp[oh * wo + ow] = m;
            }
        }
    }
}

static int exec_maxpool2(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    const int64_t planes = xt->shape[0] * xt->shape[1];
    ksm_cpu_parallel_for(planes, grain_for(xt->shape[2] * xt->shape[3]), maxpool_planes,
                         (void *)op);
    return 0;
}

/* Sum of e^(x[i] - m) over a row in double: cpu_math.h's float exp (<= 1 ulp), sixteen
 * partial sums (a fixed order, vectorisable). m is the row's maximum, so the sum is >= 1 and a
 * term below e^-80 (< 2e-35; all of them together < 1e-29) cannot change it: exponents are
 * clamped at -80, which keeps every term a normal float. Subnormal results cost a microcode
 * assist each (about 5x the time of the whole row on this machine's Xeon when most logits lie
 * more than 87 below the maximum). */
#define XENT_EXP_FLOOR (-80.0f)

/* e^t for t = x - m <= 0 (never NaN: the row has none when m is finite), t clamped at
 * XENT_EXP_FLOOR by an unsigned minimum of the bits (a more negative float has larger bits;
 * -inf included, +-0 kept). */
static inline float xent_term(float t)
{
    const uint32_t b = ksm_cm_fbits(t), lo = ksm_cm_fbits(XENT_EXP_FLOOR);
    return ksm_cpu_expf_normal(ksm_cm_bitsf(b > lo ? lo : b));
}

KSM_VEC_CLONES
static double sum_exp_shifted(const float *KSM_RESTRICT x, int64_t n, float m)
{
    double s16[16] = {0}, s = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) s16[k] += (double)xent_term(x[i + k] - m);
    for (; i < n; i++) s += (double)xent_term(x[i] - m);
    for (int k = 0; k < 16; k++) s += s16[k];
    return s;
}

static void cross_entropy_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *lt = &op->src[0];
    const int64_t c = lt->shape[1];
    const int64_t *labels = (const int64_t *)op->src[1].data;
    float *loss = (float *)op->dst.data;
    for (int64_t r = b; r < e; r++) {
        const float *x = (const float *)lt->data + r * c;
        int64_t lab = labels[r];
        if (lab == op->p.xent.ignore_index) {
            loss[r] = 0.0f;
            continue;
        }
        if (lab < 0 || lab >= c) {
            loss[r] = NAN;
            continue;
        }
        /* log-sum-exp shifted by the row maximum; a NaN or infinite maximum gives NaN (the
         * maximum's own term would be e^(inf - inf)) */
        const float m = row_max(x, c);
        if (!(m > -INFINITY && m < INFINITY)) {
            loss[r] = NAN;
            continue;
        }
        loss[r] = (float)((double)m + log(sum_exp_shifted(x, c, m)) - (double)x[lab]);
    }
}

static int exec_cross_entropy(const struct ksm_op *op)
{
    const ksm_tensor *lt = &op->src[0];
    ksm_cpu_parallel_for(lt->shape[0], grain_for(4 * lt->shape[1]), cross_entropy_rows, (void *)op);
    return 0;
}

/* Index of the first element of x[0, n) equal to v (v not NaN), or of the first NaN when v is
 * NaN; n when none. Blocks of 16 are tested with a vectorisable any-of before the scan. */
static int64_t first_index_of(const float *x, int64_t n, float v)
{
    const bool nan = v != v;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        int hit = 0;
        for (int k = 0; k < 16; k++) hit |= nan ? x[i + k] != x[i + k] : x[i + k] == v;
        if (hit) break;
    }
    for (; i < n; i++)
        if (nan ? x[i] != x[i] : x[i] == v) return i;
    return n;
}

/* Index of the first maximum of x[0, n) in one pass, as a serial scan with > would give (-0 and
 * +0 equal; the first NaN wins); 0 for an empty row. Each of 16 lanes keeps the largest order
 * key it has seen (ksm_cm_key, -0 mapped to +0) and the first index where it saw it; the
 * result is the smallest index among the lanes holding the largest key. */
KSM_VEC_CLONES
static int64_t row_argmax(const float *x, int64_t n)
{
    int32_t k16[16], i16[16];
    uint32_t nan16[16];
    for (int k = 0; k < 16; k++) {
        k16[k] = INT32_MIN;
        i16[k] = 0;
        nan16[k] = 0;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) {
            uint32_t b = ksm_cm_fbits(x[i + k]);
            b &= ~(0u - (uint32_t)(b == 0x80000000u)); /* -0 -> +0 */
            const int32_t key = ksm_cm_key(b);
            const bool gt = key > k16[k];
            k16[k] = gt ? key : k16[k];
            i16[k] = gt ? (int32_t)(i + k) : i16[k];
            nan16[k] |= (uint32_t)((b & 0x7fffffffu) > 0x7f800000u);
        }
    int32_t best = INT32_MIN;
    int64_t at = 0;
    uint32_t nan = 0;
    for (int k = 0; k < 16; k++) {
        if (k16[k] > best || (k16[k] == best && i16[k] < at)) {
            best = k16[k];
            at = i16[k];
        }
        nan |= nan16[k];
    }
    for (; i < n; i++) {
        uint32_t b = ksm_cm_fbits(x[i]);
        b &= ~(0u - (uint32_t)(b == 0x80000000u));
        const int32_t key = ksm_cm_key(b);
        if (key > best) {
            best = key;
            at = i;
        }
        nan |= (uint32_t)((b & 0x7fffffffu) > 0x7f800000u);
    }
    if (nan)
        for (i = 0; i < n; i++)
            if (x[i] != x[i]) return i;
    return at;
}

static void argmax_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const int64_t c = xt->shape[1];
    int64_t *out = (int64_t *)op->dst.data;
    for (int64_t r = b; r < e; r++) {
        const float *x = (const float *)xt->data + r * c;
        /* rows too long for 32-bit lane indices: the maximum, then its first index */
        const int64_t i = c <= INT32_MAX ? row_argmax(x, c) : first_index_of(x, c, row_max(x, c));
        out[r] = i < c ? i : 0;
    }
}

static int exec_argmax(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    ksm_cpu_parallel_for(xt->shape[0], grain_for(xt->shape[1]), argmax_rows, (void *)op);
    return 0;
}

/* ---- Dispatch ---- */

int ksm_cpu_op_exec(const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_COPY: ew_exec(op, 1, row_copy); return 0;
    case KSM_OP_FILL: return exec_fill(op);
    case KSM_OP_UNARY: ew_exec(op, 1, row_unary); return 0;
    case KSM_OP_BINARY: ew_exec(op, 2, row_binary); return 0;
    case KSM_OP_LERP: ew_exec(op, 3, row_lerp); return 0;
    case KSM_OP_GEMM: return exec_gemm(op);
    case KSM_OP_LINEAR: return exec_linear(op);
    case KSM_OP_CONV2D: return exec_conv2d(op);
    case KSM_OP_BATCHNORM: return exec_batchnorm(op);
    case KSM_OP_GROUPNORM: return exec_groupnorm(op);
    case KSM_OP_LAYERNORM: return exec_layernorm(op);
    case KSM_OP_SOFTMAX: return exec_softmax(op);
    case KSM_OP_SDPA: return exec_sdpa(op);
    case KSM_OP_EMBEDDING: return exec_embedding(op);
    case KSM_OP_MEAN: return exec_mean(op);
    case KSM_OP_MAXPOOL2: return exec_maxpool2(op);
    case KSM_OP_CROSS_ENTROPY: return exec_cross_entropy(op);
    case KSM_OP_ARGMAX: return exec_argmax(op);
    default: return KSM_EUNSUPPORTED;
    }
}
