/*
 * CUDA backend: train-mode BatchNorm and the backward of BatchNorm, GroupNorm and LayerNorm, the
 * counterparts of cpu_norm_backward.c.
 *
 * Statistics and every reduction (per-channel or per-group sums of dy and dy * (x - mean)) are
 * accumulated in double with two passes (the mean first), one block per channel, group or row,
 * then a fixed-order block reduction; the per-channel sums over the batch of GroupNorm and
 * LayerNorm (dweight, dbias) run in a second kernel over per-(image, channel) partials or rows in
 * a fixed order. No float atomics: results are deterministic. The float epilogues use the CPU's
 * expressions with __fmul_rn / __fadd_rn (no contraction). Tensors are contiguous, as the CPU
 * kernels assume. Outputs with data == NULL are not computed.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int NB_BLOCK = 256;

static unsigned rows_grid(int64_t rows)
{
    const int64_t max_grid = (int64_t)1 << 30;
    return (unsigned)(rows < 1 ? 1 : rows > max_grid ? max_grid : rows);
}

/* dy * a + (x - m) * b + c in float, as cpu_norm_backward.c's affine3. */
__device__ __forceinline__ float affine3(float dy, float x, float m, float a, float b, float c)
{
    return __fadd_rn(__fadd_rn(__fmul_rn(dy, a), __fmul_rn(__fsub_rn(x, m), b)), c);
}

/* ---- BATCHNORM_TRAIN: one block per channel of x[N, C, inner] ---- */

__global__ void bn_train_k(float *y, const float *x, const float *wt, const float *bs, float *rm,
                           float *rv, float *sm, float *si, int64_t nb, int64_t c, int64_t inner,
                           double mom, float eps)
{
    __shared__ double sh[32];
    const int64_t cnt = nb * inner;
    const double n = (double)cnt;
    for (int64_t ch = blockIdx.x; ch < c; ch += gridDim.x) {
        double s = 0.0;
        for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
            const int64_t i = t / inner;
            s += x[(i * c + ch) * inner + (t - i * inner)];
        }
        const double mean = block_sum_d(s, sh) / n;
        double q = 0.0;
        for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
            const int64_t i = t / inner;
            const double d = (double)x[(i * c + ch) * inner + (t - i * inner)] - mean;
            q += d * d;
        }
        q = block_sum_d(q, sh);
        const double var = q / n, invstd = 1.0 / sqrt(var + (double)eps);
        if (threadIdx.x == 0) {
            sm[ch] = (float)mean;
            si[ch] = (float)invstd;
            if (rm != nullptr) {
                rm[ch] = (float)(mom * mean + (1.0 - mom) * (double)rm[ch]);
                rv[ch] = (float)(mom * (q / (n - 1.0)) + (1.0 - mom) * (double)rv[ch]);
            }
        }
        if (y != nullptr) {
            const float a = (float)(invstd * (wt != nullptr ? (double)wt[ch] : 1.0));
            const float b = bs != nullptr ? bs[ch] : 0.0f, fm = (float)mean;
            for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
                const int64_t i = t / inner, off = (i * c + ch) * inner + (t - i * inner);
                y[off] = __fadd_rn(__fmul_rn(__fsub_rn(x[off], fm), a), b);
            }
        }
    }
}

static int op_batchnorm_train(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    const int64_t nb = xt->shape[0], c = xt->shape[1];
    if (c == 0 || numel(xt) == 0) return 0;
    const int64_t inner = numel(xt) / (nb * c);
    bn_train_k<<<rows_grid(c), NB_BLOCK, 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)xt->data, (const float *)op->src[1].data,
        (const float *)op->src[2].data, (float *)op->src[3].data, (float *)op->src[4].data,
        (float *)op->src[5].data, (float *)op->src[6].data, nb, c, inner, op->p.bn_train.momentum,
        op->p.bn_train.eps);
    KSM_CUDA_LAUNCH_CHECK(sc, "batchnorm_train");
    return 0;
}

/* ---- BATCHNORM_BACKWARD: one block per channel ---- */

__global__ void bn_backward_k(float *dx, float *dw, float *db, const float *dy, const float *x,
                              const float *wt, const float *sm, const float *si, int64_t nb,
                              int64_t c, int64_t inner)
{
    __shared__ double sh[32];
    const int64_t cnt = nb * inner;
    const double n = (double)cnt;
    for (int64_t ch = blockIdx.x; ch < c; ch += gridDim.x) {
        const double mean = sm[ch], invstd = si[ch], w = wt != nullptr ? wt[ch] : 1.0;
        double a = 0.0, d = 0.0;
        for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
            const int64_t i = t / inner, off = (i * c + ch) * inner + (t - i * inner);
            a += dy[off];
            d += (double)dy[off] * ((double)x[off] - mean);
        }
        const double sdy = block_sum_d(a, sh);
        const double sdx = block_sum_d(d, sh);
        if (threadIdx.x == 0) {
            if (dw != nullptr) dw[ch] = (float)(sdx * invstd);
            if (db != nullptr) db[ch] = (float)sdy;
        }
        if (dx != nullptr) {
            const double sa = invstd * w;
            const float fb = (float)(-sdx * invstd * invstd / n * sa), fc = (float)(-sdy / n * sa);
            const float fa = (float)sa, fm = (float)mean;
            for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
                const int64_t i = t / inner, off = (i * c + ch) * inner + (t - i * inner);
                dx[off] = affine3(dy[off], x[off], fm, fa, fb, fc);
            }
        }
    }
}

static int op_batchnorm_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t nb = xt->shape[0], c = xt->shape[1];
    if (c == 0) return 0;
    const int64_t inner = nb > 0 ? numel(xt) / (nb * c) : 0; /* empty batch: zero dw, db */
    bn_backward_k<<<rows_grid(c), NB_BLOCK, 0, sc->stream>>>(
        (float *)op->dst.data, (float *)op->src[5].data, (float *)op->src[6].data,
        (const float *)op->src[0].data, (const float *)xt->data, (const float *)op->src[2].data,
        (const float *)op->src[3].data, (const float *)op->src[4].data, nb, c, inner);
    KSM_CUDA_LAUNCH_CHECK(sc, "batchnorm_backward");
    return 0;
}

/* ---- GROUPNORM_BACKWARD ----
 * Kernel 1: one block per (image, group) q: statistics, per-channel sums sdy/sdx [N*C] and
 * rstd [N*G] into scratch, then dx. Kernel 2: one thread per channel sums over the images in
 * order (the CPU's order). */

__global__ void gn_backward_k(float *dx, const float *dy, const float *x, const float *wt,
                              double *rstd, double *sdy, double *sdx, int64_t ngroups, int64_t c,
                              int64_t g, int64_t inner, float eps)
{
    __shared__ double sh[32];
    const int64_t cg = c / g, len = cg * inner;
    const double m = (double)len;
    for (int64_t q = blockIdx.x; q < ngroups; q += gridDim.x) {
        const int64_t gi = q % g, ni = q / g;
        const float *xp = x + q * len, *dyp = dy + q * len;
        double s = 0.0;
        for (int64_t t = threadIdx.x; t < len; t += blockDim.x) s += xp[t];
        s = block_sum_d(s, sh);
        const double mean = m > 0 ? s / m : 0.0;
        double v = 0.0;
        for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
            const double d = (double)xp[t] - mean;
            v += d * d;
        }
        v = block_sum_d(v, sh);
        const double var = m > 0 ? v / m : 0.0;
        const double r = 1.0 / sqrt(var + (double)eps);
        double swdy = 0.0, swdx = 0.0;
        for (int64_t cc = 0; cc < cg; ++cc) {
            const int64_t ch = gi * cg + cc;
            double a = 0.0, d = 0.0;
            for (int64_t t = threadIdx.x; t < inner; t += blockDim.x) {
                const int64_t off = cc * inner + t;
                a += dyp[off];
                d += (double)dyp[off] * ((double)xp[off] - mean);
            }
            a = block_sum_d(a, sh);
            d = block_sum_d(d, sh);
            if (threadIdx.x == 0) {
                sdy[ni * c + ch] = a;
                sdx[ni * c + ch] = d;
            }
            const double w = wt != nullptr ? wt[ch] : 1.0;
            swdy += w * a;
            swdx += w * d;
        }
        if (threadIdx.x == 0) rstd[q] = r;
        if (dx == nullptr) continue;
        const float fb = (float)(-r * r * r * swdx / m), fc = (float)(-r * swdy / m);
        const float fm = (float)mean;
        for (int64_t t = threadIdx.x; t < len; t += blockDim.x) {
            const int64_t ch = gi * cg + t / inner;
            const float a = (float)(r * (wt != nullptr ? (double)wt[ch] : 1.0));
            dx[q * len + t] = affine3(dyp[t], xp[t], fm, a, fb, fc);
        }
    }
}

__global__ void gn_backward_params_k(float *dw, float *db, const double *rstd, const double *sdy,
                                     const double *sdx, int64_t nb, int64_t c, int64_t g)
{
    for (int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; ch < c;
         ch += (int64_t)gridDim.x * blockDim.x) {
        double sw = 0.0, sb = 0.0;
        for (int64_t ni = 0; ni < nb; ++ni) {
            sw += sdx[ni * c + ch] * rstd[ni * g + ch / (c / g)];
            sb += sdy[ni * c + ch];
        }
        if (dw != nullptr) dw[ch] = (float)sw;
        if (db != nullptr) db[ch] = (float)sb;
    }
}

static int op_groupnorm_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t nb = xt->shape[0], c = xt->shape[1], g = op->p.norm.groups;
    if (c == 0 || g < 1) return 0;
    const int64_t inner = nb > 0 ? numel(xt) / (nb * c) : 0;
    float *dw = (float *)op->src[3].data, *db = (float *)op->src[4].data;
    void *scratch = nullptr;
    int rc = scratch_alloc(sc, sizeof(double) * (size_t)(nb * g + 2 * nb * c), &scratch);
    if (rc != 0) return rc;
    double *rstd = (double *)scratch, *sdy = rstd + nb * g, *sdx = sdy + nb * c;
    if (nb > 0) {
        gn_backward_k<<<rows_grid(nb * g), NB_BLOCK, 0, sc->stream>>>(
            (float *)op->dst.data, (const float *)op->src[0].data, (const float *)xt->data,
            (const float *)op->src[2].data, rstd, sdy, sdx, nb * g, c, g, inner, op->p.norm.eps);
        KSM_CUDA_LAUNCH_CHECK(sc, "groupnorm_backward");
    }
    if (dw != nullptr || db != nullptr) {
        gn_backward_params_k<<<grid_for(c, NB_BLOCK), NB_BLOCK, 0, sc->stream>>>(
            dw, db, rstd, sdy, sdx, nb, c, g);
        KSM_CUDA_LAUNCH_CHECK(sc, "groupnorm_backward");
    }
    return scratch_free(sc, scratch);
}

/* ---- LAYERNORM_BACKWARD ----
 * Kernel 1: one block per row: statistics (kept in scratch) and dx, in double as the CPU.
 * Kernel 2: dweight/dbias column sums over the rows in double, 32 columns x 8 row phases per
 * block, the 8 partials added in order. */

__global__ void ln_backward_k(float *dx, const float *dy, const float *x, const float *wt,
                              double *mean_o, double *rstd_o, int64_t rows, int64_t d, float eps)
{
    __shared__ double sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + r * d, *dyr = dy + r * d;
        double s = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
        const double mean = block_sum_d(s, sh) / (double)d;
        double q = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const double t = (double)xr[i] - mean;
            q += t * t;
        }
        const double rs = 1.0 / sqrt(block_sum_d(q, sh) / (double)d + (double)eps);
        if (threadIdx.x == 0) {
            mean_o[r] = mean;
            rstd_o[r] = rs;
        }
        if (dx == nullptr) continue;
        double sg = 0.0, sgx = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const double gi = (double)dyr[i] * (wt != nullptr ? (double)wt[i] : 1.0);
            sg += gi;
            sgx += gi * ((double)xr[i] - mean);
        }
        sg = block_sum_d(sg, sh);
        sgx = block_sum_d(sgx, sh);
        const double cb = -rs * rs * rs * sgx / (double)d, cc = -rs * sg / (double)d;
        float *dxr = dx + r * d;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            const double gi = (double)dyr[i] * (wt != nullptr ? (double)wt[i] : 1.0);
            dxr[i] = (float)(rs * gi + ((double)xr[i] - mean) * cb + cc);
        }
    }
}

__global__ void ln_backward_cols_k(float *dw, float *db, const float *dy, const float *x,
                                   const double *mean, const double *rstd, int64_t rows, int64_t d)
{
    __shared__ double shw[8][33], shb[8][33];
    const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
    double sw = 0.0, sb = 0.0;
    if (c < d)
        for (int64_t r = threadIdx.y; r < rows; r += 8) {
            const double g = dy[r * d + c];
            sw += g * (((double)x[r * d + c] - mean[r]) * rstd[r]);
            sb += g;
        }
    shw[threadIdx.y][threadIdx.x] = sw;
    shb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        double tw = 0.0, tb = 0.0;
        for (int k = 0; k < 8; ++k) {
            tw += shw[k][threadIdx.x];
            tb += shb[k][threadIdx.x];
        }
        if (dw != nullptr) dw[c] = (float)tw;
        if (db != nullptr) db[c] = (float)tb;
    }
}

static int op_layernorm_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t d = xt->shape[xt->ndim - 1];
    if (d == 0) return 0;
    const int64_t rows = numel(xt) / d;
    float *dw = (float *)op->src[3].data, *db = (float *)op->src[4].data;
    if ((d + 31) / 32 > INT32_MAX) return KSM_EUNSUPPORTED;
    void *scratch = nullptr;
    int rc = scratch_alloc(sc, sizeof(double) * (size_t)(2 * rows), &scratch);
    if (rc != 0) return rc;
    double *mean = (double *)scratch, *rstd = mean + rows;
    if (rows > 0) {
        ln_backward_k<<<rows_grid(rows), NB_BLOCK, 0, sc->stream>>>(
            (float *)op->dst.data, (const float *)op->src[0].data, (const float *)xt->data,
            (const float *)op->src[2].data, mean, rstd, rows, d, op->p.norm.eps);
        KSM_CUDA_LAUNCH_CHECK(sc, "layernorm_backward");
    }
    if (dw != nullptr || db != nullptr) {
        ln_backward_cols_k<<<(unsigned)((d + 31) / 32), dim3(32, 8), 0, sc->stream>>>(
            dw, db, (const float *)op->src[0].data, (const float *)xt->data, mean, rstd, rows, d);
        KSM_CUDA_LAUNCH_CHECK(sc, "layernorm_backward");
    }
    return scratch_free(sc, scratch);
}

int launch_norm_backward(stream_ctx *sc, const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_BATCHNORM_TRAIN: return op_batchnorm_train(sc, op);
    case KSM_OP_BATCHNORM_BACKWARD: return op_batchnorm_backward(sc, op);
    case KSM_OP_GROUPNORM_BACKWARD: return op_groupnorm_backward(sc, op);
    case KSM_OP_LAYERNORM_BACKWARD: return op_layernorm_backward(sc, op);
    default: return KSM_EUNSUPPORTED;
    }
}

} // namespace ksm_cuda
