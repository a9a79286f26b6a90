/*
 * CPU kernel: the backward of conv2d (stride 1, zero padding, groups, any kernel size).
 *
 * For each image and group, one column matrix of kdim = Ci/g * kh * kw rows by Ho * Wo columns
 * lives in the op's workspace: dW_g += dy_g [Co/g x HoWo] @ im2col(x_g)^T (one sgemm, images in
 * order, so dW is the float sum over images that a sequential PyTorch would form), then the same
 * buffer receives W_g^T @ dy_g, which col2im adds into dx_g. db is the per-channel sum of dy in
 * double. The Winograd forward is not mirrored. One image and group at a time (the workspace
 * is one slice), its im2col / col2im split over channels and its sgemms over fixed column blocks
 * (single-threaded sgemm each) on the compute pool. Shared conventions: cpu_ops_impl.h.
 */
#include <stdint.h>
#include <string.h>

#include "backend/cpu/cpu_blas.h" /* cblas_sgemm: the OpenBLAS the backend loaded */
#include "backend/cpu/cpu_ops_impl.h"

/* The output columns ow in [ow_lo, ow_hi) read input column iw = ow + j - pw inside [0, w). */
static inline int64_t ow_lo(int64_t j, int64_t pw, int64_t wo)
{
    const int64_t lo = pw - j;
    return lo < 0 ? 0 : lo > wo ? wo : lo;
}

static inline int64_t ow_hi(int64_t j, int64_t pw, int64_t w, int64_t wo)
{
    const int64_t hi = w - j + pw;
    return hi < 0 ? 0 : hi > wo ? wo : hi;
}

/* col[(c * kh + i) * kw + j][oh * wo + ow] <- x[c][oh + i - ph][ow + j - pw] (0 outside). */
static void im2col(float *col, const float *x, int64_t c0, int64_t c1, int64_t h, int64_t w,
                   int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t ho, int64_t wo)
{
    for (int64_t c = c0; c < c1; c++)
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++) {
                float *row = col + ((c * kh + i) * kw + j) * ho * wo;
                for (int64_t oh = 0; oh < ho; oh++) {
                    const int64_t ih = oh + i - ph;
                    float *r = row + oh * wo;
                    if (ih < 0 || ih >= h) {
                        memset(r, 0, sizeof(float) * (size_t)wo);
                        continue;
                    }
                    const float *xr = x + (c * h + ih) * w;
                    const int64_t lo = ow_lo(j, pw, wo), hi = ow_hi(j, pw, w, wo);
                    for (int64_t ow = 0; ow < lo; ow++) r[ow] = 0.0f;
                    if (hi > lo)
                        memcpy(r + lo, xr + lo + j - pw, sizeof(float) * (size_t)(hi - lo));
                    for (int64_t ow = hi > lo ? hi : lo; ow < wo; ow++) r[ow] = 0.0f;
                }
            }
}

/* dx[c][oh + i - ph][ow + j - pw] += col[(c * kh + i) * kw + j][oh * wo + ow], in (i, j) order. */
static void col2im(float *dx, const float *col, int64_t c0, int64_t c1, int64_t h, int64_t w,
                   int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t ho, int64_t wo)
{
    for (int64_t c = c0; c < c1; c++)
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++) {
                const float *row = col + ((c * kh + i) * kw + j) * ho * wo;
                for (int64_t oh = 0; oh < ho; oh++) {
                    const int64_t ih = oh + i - ph;
                    if (ih < 0 || ih >= h) continue;
                    float *xr = dx + (c * h + ih) * w;
                    const float *r = row + oh * wo;
                    const int64_t lo = ow_lo(j, pw, wo), hi = ow_hi(j, pw, w, wo);
                    const int64_t d = j - pw; /* iw = ow + d */
                    for (int64_t ow = lo; ow < hi; ow++) xr[ow + d] += r[ow];
                }
            }
}

/* One image and group of the backward, spread over the compute pool: the channels of im2col and
 * col2im (disjoint rows and planes) and fixed column blocks of each sgemm (every element of C is
 * one single-threaded sgemm over the whole K), so results do not depend on the thread count. */
enum { GEMM_COLS = 128 };

struct cbw_job {
    float *col, *dx, *dw;
    const float *x, *dy, *w;
    int64_t cig, cog, kdim, h, wd, kh, kw, ph, pw, ho, wo;
};

static void im2col_run(void *ctx, int64_t b, int64_t e)
{
    const struct cbw_job *j = ctx;
    im2col(j->col, j->x, b, e, j->h, j->wd, j->kh, j->kw, j->ph, j->pw, j->ho, j->wo);
}

static void col2im_run(void *ctx, int64_t b, int64_t e)
{
    const struct cbw_job *j = ctx;
    col2im(j->dx, j->col, b, e, j->h, j->wd, j->kh, j->kw, j->ph, j->pw, j->ho, j->wo);
}

/* dW_g[:, cols] += dy_g @ col[cols, :]^T */
static void dw_run(void *ctx, int64_t b, int64_t e)
{
    const struct cbw_job *j = ctx;
    const int64_t howo = j->ho * j->wo;
    for (int64_t t = b; t < e; t++) {
        const int64_t c0 = t * GEMM_COLS, c1 = c0 + GEMM_COLS < j->kdim ? c0 + GEMM_COLS : j->kdim;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)j->cog, (int)(c1 - c0), (int)howo,
                    1.0f, j->dy, (int)howo, j->col + c0 * howo, (int)howo, 1.0f, j->dw + c0,
                    (int)j->kdim);
    }
}

/* col[:, cols] = W_g^T @ dy_g[:, cols] */
static void dcol_run(void *ctx, int64_t b, int64_t e)
{
    const struct cbw_job *j = ctx;
    const int64_t howo = j->ho * j->wo;
    for (int64_t t = b; t < e; t++) {
        const int64_t c0 = t * GEMM_COLS, c1 = c0 + GEMM_COLS < howo ? c0 + GEMM_COLS : howo;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)j->kdim, (int)(c1 - c0),
                    (int)j->cog, 1.0f, j->w, (int)j->kdim, j->dy + c0, (int)howo, 0.0f, j->col + c0,
                    (int)howo);
    }
}

int ksm_cpu_exec_conv2d_backward(const struct ksm_op *op)
{
    const ksm_tensor *dyt = &op->src[0], *xt = &op->src[1], *wt = &op->src[2];
    const float *dy = (const float *)dyt->data, *x = (const float *)xt->data;
    const float *w = (const float *)wt->data;
    float *dx = (float *)op->dst.data, *dw = (float *)op->src[3].data;
    float *db = (float *)op->src[4].data, *col = (float *)op->ws;
    const int64_t nb = xt->shape[0], ci = xt->shape[1], h = xt->shape[2], wd = xt->shape[3];
    const int64_t co = wt->shape[0], kh = wt->shape[2], kw = wt->shape[3];
    const int64_t ho = dyt->shape[2], wo = dyt->shape[3], howo = ho * wo;
    const int64_t g = op->p.conv2d.groups, cig = ci / g, cog = co / g, kdim = cig * kh * kw;
    const int64_t ph = op->p.conv2d.pad_h, pw = op->p.conv2d.pad_w;
    if (db)
        for (int64_t c = 0; c < co; c++) {
            double s = 0.0;
            for (int64_t n = 0; n < nb; n++) {
                const float *p = dy + (n * co + c) * howo;
                for (int64_t i = 0; i < howo; i++) s += p[i];
            }
            db[c] = (float)s;
        }
    if (dw) memset(dw, 0, sizeof(float) * (size_t)(co * kdim));
    if (dx) memset(dx, 0, sizeof(float) * (size_t)(nb * ci * h * wd));
    if (kdim == 0 || cog == 0) return 0;
    const int64_t per_ch = kh * kw * howo;
    for (int64_t n = 0; n < nb; n++)
        for (int64_t gi = 0; gi < g; gi++) {
            struct cbw_job j = {.col = col,
                                .dx = dx ? dx + (n * ci + gi * cig) * h * wd : NULL,
                                .dw = dw ? dw + gi * cog * kdim : NULL,
                                .x = x + (n * ci + gi * cig) * h * wd,
                                .dy = dy + (n * co + gi * cog) * howo,
                                .w = w + gi * cog * kdim,
                                .cig = cig,
                                .cog = cog,
                                .kdim = kdim,
                                .h = h,
                                .wd = wd,
                                .kh = kh,
                                .kw = kw,
                                .ph = ph,
                                .pw = pw,
                                .ho = ho,
                                .wo = wo};
            if (dw) {
                ksm_cpu_parallel_for(cig, ksm_cpu_grain(per_ch), im2col_run, &j);
                ksm_cpu_parallel_for((kdim + GEMM_COLS - 1) / GEMM_COLS, 1, dw_run, &j);
            }
            if (dx) {
                ksm_cpu_parallel_for((howo + GEMM_COLS - 1) / GEMM_COLS, 1, dcol_run, &j);
                ksm_cpu_parallel_for(cig, ksm_cpu_grain(per_ch), col2im_run, &j);
            }
        }
    return 0;
}
