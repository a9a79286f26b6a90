/*
 * CPU kernel: the backward of conv2d (stride 1, zero padding, groups, any kernel size).
 *
 * For each image and group, one column matrix of kdim = Ci/g * kh * kw rows by Ho * Wo columns
 * lives in the op's workspace: dW_g += dy_g [Co/g x HoWo] @ im2col(x_g)^T (one sgemm, images in
 * order, so dW is the float sum over images that a sequential PyTorch would form), then the same
 * buffer receives W_g^T @ dy_g, which col2im adds into dx_g. db is the per-channel sum of dy in
 * double. The Winograd forward is not mirrored. The kernel runs on the calling thread (sgemm
 * single-threaded): the workspace is one slice. Shared conventions: cpu_ops_impl.h.
 */
#include <stdint.h>
#include <string.h>

#include "backend/cpu/cpu_blas.h" /* cblas_sgemm: the OpenBLAS the backend loaded */
#include "backend/cpu/cpu_ops_impl.h"

/* col[(c * kh + i) * kw + j][oh * wo + ow] <- x[c][oh + i - ph][ow + j - pw] (0 outside). */
static void im2col(float *col, const float *x, int64_t cg, int64_t h, int64_t w, int64_t kh,
                   int64_t kw, int64_t ph, int64_t pw, int64_t ho, int64_t wo)
{
    for (int64_t c = 0; c < cg; c++)
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
                    for (int64_t ow = 0; ow < wo; ow++) {
                        const int64_t iw = ow + j - pw;
                        r[ow] = iw >= 0 && iw < w ? xr[iw] : 0.0f;
                    }
                }
            }
}

/* dx[c][oh + i - ph][ow + j - pw] += col[(c * kh + i) * kw + j][oh * wo + ow], in (i, j) order. */
static void col2im(float *dx, const float *col, int64_t cg, int64_t h, int64_t w, int64_t kh,
                   int64_t kw, int64_t ph, int64_t pw, int64_t ho, int64_t wo)
{
    for (int64_t c = 0; c < cg; c++)
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++) {
                const float *row = col + ((c * kh + i) * kw + j) * ho * wo;
                for (int64_t oh = 0; oh < ho; oh++) {
                    const int64_t ih = oh + i - ph;
                    if (ih < 0 || ih >= h) continue;
                    float *xr = dx + (c * h + ih) * w;
                    const float *r = row + oh * wo;
                    for (int64_t ow = 0; ow < wo; ow++) {
                        const int64_t iw = ow + j - pw;
                        if (iw >= 0 && iw < w) xr[iw] += r[ow];
                    }
                }
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
    for (int64_t n = 0; n < nb; n++)
        for (int64_t gi = 0; gi < g; gi++) {
            const float *dyg = dy + (n * co + gi * cog) * howo;
            if (dw) {
                im2col(col, x + (n * ci + gi * cig) * h * wd, cig, h, wd, kh, kw, ph, pw, ho, wo);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)cog, (int)kdim, (int)howo,
                            1.0f, dyg, (int)howo, col, (int)howo, 1.0f, dw + gi * cog * kdim,
                            (int)kdim);
            }
            if (dx) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)kdim, (int)howo, (int)cog,
                            1.0f, w + gi * cog * kdim, (int)kdim, dyg, (int)howo, 0.0f, col,
                            (int)howo);
                col2im(dx + (n * ci + gi * cig) * h * wd, col, cig, h, wd, kh, kw, ph, pw, ho, wo);
            }
        }
    return 0;
}
