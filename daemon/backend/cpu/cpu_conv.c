/*
 * CPU kernels: GEMM and linear layers (OpenBLAS sgemm in tiles), convolutions (im2col + sgemm,
 * depthwise, direct 1x1; 3x3 pad-1 ones go to cpu_winograd.c) with the fused BatchNorm+ReLU
 * epilogue. Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"
#include "backend/cpu/cpu_blas.h" /* cblas_sgemm: the OpenBLAS the backend loaded */

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

int ksm_cpu_exec_gemm(const struct ksm_op *op)
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

int ksm_cpu_exec_linear(const struct ksm_op *op)
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

struct conv_job {
    const float *x, *w, *bias;
    float *y, *ws;
    int64_t ci, h, wd, co, kh, kw, ph, pw, g, ho, wo;
    int64_t cig, cog, kdim, howo;
    int64_t tile_cols, tiles_per_image, slice; /* slice: floats per thread */
    bool direct;                               /* 1x1 without padding: no im2col */
    const float *bn_m, *bn_a, *bn_b;           /* BatchNorm + ReLU epilogue, or NULL */
};

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
                    ksm_cpu_shift_scale_relu(yg + c * howo, yg + c * howo, cols, j->bn_m[ch],
                                             j->bn_a[ch], j->bn_b[ch]);
                }
        }
    }
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
        ksm_cpu_shift_scale_relu(j->y + p * j->inner, j->y + p * j->inner, j->inner, j->m[ch],
                                 j->a[ch], j->b[ch]);
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
        ksm_cpu_parallel_for(nb * co, ksm_cpu_grain(howo * kh * kw), depthwise_planes, &job);
        if (bn_a) {
            struct bn_planes_job bj = {y, bn_m, bn_a, bn_b, co, howo};
            ksm_cpu_parallel_for(nb * co, ksm_cpu_grain(howo), bn_relu_planes, &bj);
        }
        return 0;
    }

    if (ksm_conv2d_winograd(ci, co, kh, kw, ph, pw, g) && ho == h && wo == wd)
        return ksm_cpu_conv2d_winograd(op, nb, ci, h, wd, co, bn_a);

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

int ksm_cpu_exec_conv2d(const struct ksm_op *op)
{
    if (!op->p.conv2d.bn_relu) return conv2d_impl(op, NULL);
    const int64_t co = op->dst.shape[1];
    float stack[512] = {0}, *a = co <= 512 ? stack : malloc(sizeof(float) * (size_t)co);
    if (a == NULL) return KSM_EDEVMEM;
    ksm_cpu_bn_scales(op, co, a);
    int rc = conv2d_impl(op, a);
    if (a != stack) free(a);
    return rc;
}
