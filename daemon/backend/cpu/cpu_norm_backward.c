/*
 * CPU kernels: train-mode BatchNorm and the backward of BatchNorm, GroupNorm and LayerNorm.
 *
 * Statistics and every reduction (per-channel or per-group sums of dy and dy * (x - mean)) are
 * accumulated in double, two passes (the mean first); GroupNorm and LayerNorm recompute their
 * statistics from x, BatchNorm's backward takes the mean and invstd its forward saved. Each
 * parallel range writes disjoint outputs; sums over the batch run in a fixed order, so the
 * results do not depend on the number of threads. Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "backend/cpu/cpu_ops_impl.h"

static double sum_d(const float *x, int64_t n)
{
    double s8[8] = {0}, s = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) s8[k] += x[i + k];
    for (; i < n; i++) s += x[i];
    return ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7])) + s;
}

/* Sum of (x - m)^2 in double. */
static double sqdev_d(const float *x, int64_t n, double m)
{
    double s8[8] = {0}, s = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            const double d = (double)x[i + k] - m;
            s8[k] += d * d;
        }
    for (; i < n; i++) s += ((double)x[i] - m) * ((double)x[i] - m);
    return ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7])) + s;
}

/* Sum of dy and of dy * (x - m) in double. */
static void dy_sums(const float *dy, const float *x, int64_t n, double m, double *sdy, double *sdx)
{
    double a8[8] = {0}, b8[8] = {0}, a = 0.0, b = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) {
            a8[k] += dy[i + k];
            b8[k] += (double)dy[i + k] * ((double)x[i + k] - m);
        }
    for (; i < n; i++) {
        a += dy[i];
        b += (double)dy[i] * ((double)x[i] - m);
    }
    *sdy = ((a8[0] + a8[4]) + (a8[1] + a8[5])) + ((a8[2] + a8[6]) + (a8[3] + a8[7])) + a;
    *sdx = ((b8[0] + b8[4]) + (b8[1] + b8[5])) + ((b8[2] + b8[6]) + (b8[3] + b8[7])) + b;
}

/* dx[i] <- dy[i] * a + (x[i] - m) * b + c. */
KSM_VEC_CLONES
static void affine3(float *KSM_RESTRICT dx, const float *KSM_RESTRICT dy,
                    const float *KSM_RESTRICT x, int64_t n, float m, float a, float b, float c)
{
    for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * a + (x[i] - m) * b + c;
}

// ---- BatchNorm, train mode ----

/* Channels [b, e) of x[N, C, inner]. */
static void bn_train_channels(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const float *x = (const float *)xt->data;
    const float *wt = (const float *)op->src[1].data, *bs = (const float *)op->src[2].data;
    float *rm = (float *)op->src[3].data, *rv = (float *)op->src[4].data;
    float *sm = (float *)op->src[5].data, *si = (float *)op->src[6].data;
    float *y = (float *)op->dst.data;
    const int64_t nb = xt->shape[0], c = xt->shape[1], inner = ksm_cpu_numel(xt) / (nb * c);
    const double n = (double)(nb * inner), mom = op->p.bn_train.momentum;
    for (int64_t ch = b; ch < e; ch++) {
        double s = 0.0;
        for (int64_t i = 0; i < nb; i++) s += sum_d(x + (i * c + ch) * inner, inner);
        const double mean = s / n;
        double q = 0.0;
        for (int64_t i = 0; i < nb; i++) q += sqdev_d(x + (i * c + ch) * inner, inner, mean);
        const double var = q / n, invstd = 1.0 / sqrt(var + (double)op->p.bn_train.eps);
        sm[ch] = (float)mean;
        si[ch] = (float)invstd;
        if (rm) {
            rm[ch] = (float)(mom * mean + (1.0 - mom) * (double)rm[ch]);
            rv[ch] = (float)(mom * (q / (n - 1.0)) + (1.0 - mom) * (double)rv[ch]);
        }
        if (y) {
            const float a = (float)(invstd * (double)wt[ch]);
            for (int64_t i = 0; i < nb; i++)
                ksm_cpu_shift_scale(y + (i * c + ch) * inner, x + (i * c + ch) * inner, inner,
                                    (float)mean, a, bs[ch]);
        }
    }
}

int ksm_cpu_exec_batchnorm_train(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    const int64_t c = xt->shape[1];
    if (c == 0 || ksm_cpu_numel(xt) == 0) return 0;
    ksm_cpu_parallel_for(c, ksm_cpu_grain(ksm_cpu_numel(xt) / c), bn_train_channels, (void *)op);
    return 0;
}

// ---- BatchNorm backward ----

static void bn_backward_channels(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[1];
    const float *dy = (const float *)op->src[0].data, *x = (const float *)xt->data;
    const float *wt = (const float *)op->src[2].data;
    const float *sm = (const float *)op->src[3].data, *si = (const float *)op->src[4].data;
    float *dw = (float *)op->src[5].data, *db = (float *)op->src[6].data;
    float *dx = (float *)op->dst.data;
    const int64_t nb = xt->shape[0], c = xt->shape[1], inner = ksm_cpu_numel(xt) / (nb * c);
    const double n = (double)(nb * inner);
    for (int64_t ch = b; ch < e; ch++) {
        const double mean = sm[ch], invstd = si[ch], w = wt ? wt[ch] : 1.0;
        double sdy = 0.0, sdx = 0.0;
        for (int64_t i = 0; i < nb; i++) {
            double a, d;
            dy_sums(dy + (i * c + ch) * inner, x + (i * c + ch) * inner, inner, mean, &a, &d);
            sdy += a;
            sdx += d;
        }
        if (dw) dw[ch] = (float)(sdx * invstd);
        if (db) db[ch] = (float)sdy;
        if (dx) {
            const double a = invstd * w;
            const float fb = (float)(-sdx * invstd * invstd / n * a), fc = (float)(-sdy / n * a);
            for (int64_t i = 0; i < nb; i++) {
                const int64_t off = (i * c + ch) * inner;
                affine3(dx + off, dy + off, x + off, inner, (float)mean, (float)a, fb, fc);
            }
        }
    }
}

int ksm_cpu_exec_batchnorm_backward(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t c = xt->shape[1];
    if (c == 0) return 0;
    if (ksm_cpu_numel(xt) == 0) { /* empty batch: zero gradients */
        for (int i = 5; i <= 6; i++)
            if (op->src[i].data)
                for (int64_t ch = 0; ch < c; ch++) ((float *)op->src[i].data)[ch] = 0.0f;
        return 0;
    }
    ksm_cpu_parallel_for(c, ksm_cpu_grain(2 * ksm_cpu_numel(xt) / c), bn_backward_channels,
                         (void *)op);
    return 0;
}

// ---- GroupNorm backward ----

struct gn_job {
    const struct ksm_op *op;
    double *rstd;      /* [N * G] */
    double *mean;      /* [N * G] */
    double *sdy, *sdx; /* [N * C]: sums of dy and dy * (x - mean) per channel */
};

/* Groups [b, e), q = n * G + g: statistics, per-channel sums, dx. */
static void gn_backward_groups(void *ctx, int64_t b, int64_t e)
{
    const struct gn_job *j = ctx;
    const struct ksm_op *op = j->op;
    const ksm_tensor *xt = &op->src[1];
    const float *dy = (const float *)op->src[0].data, *x = (const float *)xt->data;
    const float *wt = (const float *)op->src[2].data;
    float *dx = (float *)op->dst.data;
    const int64_t c = xt->shape[1], g = op->p.norm.groups, cg = c / g;
    const int64_t inner = ksm_cpu_numel(xt) / (xt->shape[0] * c);
    const double m = (double)(cg * inner);
    for (int64_t q = b; q < e; q++) {
        const int64_t gi = q % g, ni = q / g;
        const float *xp = x + q * cg * inner, *dyp = dy + q * cg * inner;
        const double mean = m > 0 ? sum_d(xp, cg * inner) / m : 0.0;
        const double var = m > 0 ? sqdev_d(xp, cg * inner, mean) / m : 0.0;
        const double r = 1.0 / sqrt(var + (double)op->p.norm.eps);
        j->mean[q] = mean;
        j->rstd[q] = r;
        double swdy = 0.0, swdx = 0.0;
        for (int64_t cc = 0; cc < cg; cc++) {
            const int64_t ch = gi * cg + cc;
            double a, d;
            dy_sums(dyp + cc * inner, xp + cc * inner, inner, mean, &a, &d);
            j->sdy[ni * c + ch] = a;
            j->sdx[ni * c + ch] = d;
            const double w = wt ? wt[ch] : 1.0;
            swdy += w * a;
            swdx += w * d;
        }
        if (!dx) continue;
        /* dx = r w dy - (x - mean) r^3 sum(w dy (x - mean)) / M - r sum(w dy) / M */
        const float fb = (float)(-r * r * r * swdx / m), fc = (float)(-r * swdy / m);
        for (int64_t cc = 0; cc < cg; cc++) {
            const int64_t ch = gi * cg + cc;
            const float a = (float)(r * (wt ? wt[ch] : 1.0));
            affine3(dx + (q * cg + cc) * inner, dyp + cc * inner, xp + cc * inner, inner,
                    (float)mean, a, fb, fc);
        }
    }
}

int ksm_cpu_exec_groupnorm_backward(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t nb = xt->shape[0], c = xt->shape[1], g = op->p.norm.groups;
    float *dw = (float *)op->src[3].data, *db = (float *)op->src[4].data;
    if (c == 0) return 0;
    struct gn_job j = {.op = op};
    const size_t ng = (size_t)(nb * g), nc = (size_t)(nb * c);
    double *buf = malloc(sizeof(double) * (2 * ng + 2 * nc + 1));
    if (!buf) return KSM_ENOMEM;
    j.mean = buf;
    j.rstd = buf + ng;
    j.sdy = buf + 2 * ng;
    j.sdx = buf + 2 * ng + nc;
    if (nb > 0)
        ksm_cpu_parallel_for(nb * g, ksm_cpu_grain(2 * ksm_cpu_numel(xt) / (nb * g)),
                             gn_backward_groups, &j);
    /* dweight[c] = sum_n sdx[n, c] * rstd[n, g], dbias[c] = sum_n sdy[n, c] (fixed order) */
    for (int64_t ch = 0; ch < c; ch++) {
        double sw = 0.0, sb = 0.0;
        for (int64_t ni = 0; ni < nb; ni++) {
            sw += j.sdx[ni * c + ch] * j.rstd[ni * g + ch / (c / g)];
            sb += j.sdy[ni * c + ch];
        }
        if (dw) dw[ch] = (float)sw;
        if (db) db[ch] = (float)sb;
    }
    free(buf);
    return 0;
}

// ---- LayerNorm backward ----

struct ln_job {
    const struct ksm_op *op;
    int64_t d;
    double *mean, *rstd; /* [rows] */
};

/* Rows [b, e): statistics and dx. */
static void ln_backward_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ln_job *j = ctx;
    const struct ksm_op *op = j->op;
    const float *dy = (const float *)op->src[0].data, *x = (const float *)op->src[1].data;
    const float *wt = (const float *)op->src[2].data;
    float *dx = (float *)op->dst.data;
    const int64_t d = j->d;
    for (int64_t r = b; r < e; r++) {
        const float *xr = x + r * d, *dyr = dy + r * d;
        const double mean = sum_d(xr, d) / (double)d;
        const double rs = 1.0 / sqrt(sqdev_d(xr, d, mean) / (double)d + (double)op->p.norm.eps);
        j->mean[r] = mean;
        j->rstd[r] = rs;
        if (!dx) continue;
        double sg = 0.0, sgx = 0.0;
        for (int64_t i = 0; i < d; i++) {
            const double gi = (double)dyr[i] * (wt ? wt[i] : 1.0);
            sg += gi;
            sgx += gi * ((double)xr[i] - mean);
        }
        /* dx = rs (g - mean(g) - xhat mean(g xhat)), xhat = (x - mean) rs */
        const double cb = -rs * rs * rs * sgx / (double)d, cc = -rs * sg / (double)d;
        float *dxr = dx + r * d;
        for (int64_t i = 0; i < d; i++) {
            const double gi = (double)dyr[i] * (wt ? wt[i] : 1.0);
            dxr[i] = (float)(rs * gi + ((double)xr[i] - mean) * cb + cc);
        }
    }
}

/* Columns [b, e) of dweight and dbias: sums over the rows in row order. */
static void ln_backward_cols(void *ctx, int64_t b, int64_t e)
{
    const struct ln_job *j = ctx;
    const struct ksm_op *op = j->op;
    const float *dy = (const float *)op->src[0].data, *x = (const float *)op->src[1].data;
    float *dw = (float *)op->src[3].data, *db = (float *)op->src[4].data;
    const int64_t d = j->d, rows = ksm_cpu_numel(&op->src[1]) / d;
    enum { W = 64 };
    for (int64_t c0 = b; c0 < e; c0 += W) {
        const int64_t c1 = c0 + W < e ? c0 + W : e;
        double sw[W] = {0}, sb[W] = {0};
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * d, *dyr = dy + r * d;
            const double mean = j->mean[r], rs = j->rstd[r];
            for (int64_t i = c0; i < c1; i++) {
                sw[i - c0] += (double)dyr[i] * (((double)xr[i] - mean) * rs);
                sb[i - c0] += dyr[i];
            }
        }
        for (int64_t i = c0; i < c1; i++) {
            if (dw) dw[i] = (float)sw[i - c0];
            if (db) db[i] = (float)sb[i - c0];
        }
    }
}

int ksm_cpu_exec_layernorm_backward(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t d = xt->shape[xt->ndim - 1];
    if (d == 0) return 0;
    const int64_t rows = ksm_cpu_numel(xt) / d;
    struct ln_job j = {.op = op, .d = d};
    double *buf = malloc(sizeof(double) * (size_t)(2 * rows + 1));
    if (!buf) return KSM_ENOMEM;
    j.mean = buf;
    j.rstd = buf + rows;
    if (rows > 0) ksm_cpu_parallel_for(rows, ksm_cpu_grain(3 * d), ln_backward_rows, &j);
    if (op->src[3].data || op->src[4].data)
        ksm_cpu_parallel_for(d, ksm_cpu_grain(2 * (rows > 0 ? rows : 1)), ln_backward_cols, &j);
    free(buf);
    return 0;
}
