/*
 * CPU kernels: BatchNorm (eval), GroupNorm, LayerNorm, softmax, and the per-row helpers other
 * families share (shift-scale with or without ReLU, the BatchNorm scale, the row maximum).
 * Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"

/* y[i] <- (x[i] - m) * a + b; y may equal x. */
KSM_VEC_CLONES
void ksm_cpu_shift_scale(float *y, const float *x, int64_t n, float m, float a, float b)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] = (x[i + k] - m) * a + b;
    for (; i < n; i++) y[i] = (x[i] - m) * a + b;
}

/* y[i] <- relu((x[i] - m) * a + b); y may equal x. */
KSM_VEC_CLONES
void ksm_cpu_shift_scale_relu(float *y, const float *x, int64_t n, float m, float a, float b)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) y[i + k] = ksm_relu((x[i + k] - m) * a + b);
    for (; i < n; i++) y[i] = ksm_relu((x[i] - m) * a + b);
}

/* The fused epilogue's per-channel scale, as batchnorm_planes computes it. */
void ksm_cpu_bn_scales(const struct ksm_op *op, int64_t co, float *a)
{
    const float *var = (const float *)op->src[4].data, *wt = (const float *)op->src[5].data;
    for (int64_t c = 0; c < co; c++)
        a[c] = (float)((double)wt[c] / sqrt((double)var[c] + (double)op->p.conv2d.bn_eps));
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
    const int64_t c = xt->shape[1], inner = ksm_cpu_numel(xt) / (xt->shape[0] * c);
    for (int64_t pl = b; pl < e; pl++) {
        const int64_t ch = pl % c;
        const float a = (float)((double)wt[ch] / sqrt((double)var[ch] + (double)op->p.norm.eps));
        (op->p.norm.relu ? ksm_cpu_shift_scale_relu : ksm_cpu_shift_scale)(
            (float *)op->dst.data + pl * inner, (const float *)xt->data + pl * inner, inner,
            mean[ch], a, bs[ch]);
    }
}

int ksm_cpu_exec_batchnorm(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    int64_t planes = xt->shape[0] * xt->shape[1];
    if (planes == 0) return 0;
    ksm_cpu_parallel_for(planes, ksm_cpu_grain(ksm_cpu_numel(xt) / planes), batchnorm_planes,
                         (void *)op);
    return 0;
}

/* Groups [b, e), group q = n * G + g. */
static void groupnorm_groups(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const float *wt = (const float *)op->src[1].data, *bs = (const float *)op->src[2].data;
    const int64_t c = xt->shape[1], g = op->p.norm.groups, cg = c / g;
    const int64_t inner = ksm_cpu_numel(xt) / (xt->shape[0] * c);
    for (int64_t q = b; q < e; q++) {
        const int64_t gi = q % g;
        const float *xp = (const float *)xt->data + q * cg * inner;
        float *yp = (float *)op->dst.data + q * cg * inner;
        float mean, rstd;
        moments(xp, cg * inner, op->p.norm.eps, &mean, &rstd);
        for (int64_t cc = 0; cc < cg; cc++) {
            const int64_t ch = gi * cg + cc;
            const float a = rstd * (wt ? wt[ch] : 1.0f), bb = bs ? bs[ch] : 0.0f;
            ksm_cpu_shift_scale(yp + cc * inner, xp + cc * inner, inner, mean, a, bb);
        }
    }
}

int ksm_cpu_exec_groupnorm(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    const int64_t groups = xt->shape[0] * op->p.norm.groups;
    if (groups == 0 || ksm_cpu_numel(xt) == 0) return 0;
    ksm_cpu_parallel_for(groups, ksm_cpu_grain(ksm_cpu_numel(xt) / groups), groupnorm_groups,
                         (void *)op);
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

int ksm_cpu_exec_layernorm(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    int64_t d = xt->shape[xt->ndim - 1];
    if (d == 0) return 0;
    ksm_cpu_parallel_for(ksm_cpu_numel(xt) / d, ksm_cpu_grain(d), layernorm_rows, (void *)op);
    return 0;
}

/* Maximum of a row with NaN winning (so a NaN row poisons its softmax, as in PyTorch), in the
 * integer domain so that it vectorises: the maximum of the floats' order keys (ksm_cm_key; max
 * is exact, so the order does not matter; +0 ranks above -0, which every caller treats alike)
 * and a NaN flag from the bits; the first NaN is returned as a serial scan would. */
KSM_VEC_CLONES
float ksm_cpu_row_max(const float *x, int64_t n)
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
        const float m = ksm_cpu_row_max(xr, d);
        for (int64_t i = 0; i < d; i++) yr[i] = ksm_cpu_expf(xr[i] - m);
        const float inv = (float)(1.0 / sum_f64(yr, d));
        for (int64_t i = 0; i < d; i++) yr[i] *= inv;
    }
}

int ksm_cpu_exec_softmax(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    int64_t d = xt->shape[xt->ndim - 1];
    if (d == 0) return 0;
    ksm_cpu_parallel_for(ksm_cpu_numel(xt) / d, ksm_cpu_grain(d), softmax_rows, (void *)op);
    return 0;
}
