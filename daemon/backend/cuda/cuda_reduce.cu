/*
 * CUDA backend: reductions (GROUPNORM, LAYERNORM, SOFTMAX, MEAN, MAXPOOL2, CROSS_ENTROPY,
 * ARGMAX).
 *
 * Row-wise ops use one block per row (grid-stride over rows), with the block size matched to the
 * row length, and reduce in float with warp shuffles then one shared-memory step. Norms use two
 * passes (mean, then the mean of squared deviations), never E[x^2] - E[x]^2. A source row may be
 * strided: its base is the offset of the row's first element and its elements are
 * stride[last] apart.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static int row_block(int64_t D)
{
    if (D <= 32) return 32;
    if (D <= 64) return 64;
    if (D <= 128) return 128;
    if (D <= 2048) return 256;
    return 512;
}

static unsigned row_grid(int64_t rows)
{
    const int64_t max_grid = (int64_t)1 << 30;
    return (unsigned)(rows < 1 ? 1 : rows > max_grid ? max_grid : rows);
}

/* ---- LAYERNORM ---- */

__global__ void layernorm_k(float *y, const float *x, view xv, int64_t D, int64_t rows,
                            const float *w, int64_t ws, const float *b, int64_t bs, float eps)
{
    __shared__ double sh[32];
    const int64_t step = xv.ndim > 0 ? xv.stride[xv.ndim - 1] : 1;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + xv.offset(r * D);
        /* Two passes in double, as the CPU oracle's moments(). */
        double s = 0.0;
        for (int64_t j = threadIdx.x; j < D; j += blockDim.x) s += xr[j * step];
        const double meand = block_sum_d(s, sh) / (double)D;
        double q = 0.0;
        for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
            double d = (double)xr[j * step] - meand;
            q += d * d;
        }
        const double var = block_sum_d(q, sh) / (double)D;
        const float mean = (float)meand;
        const float rstd = (float)(1.0 / sqrt(var + (double)eps));
        float *yr = y + r * D;
        for (int64_t j = threadIdx.x; j < D; j += blockDim.x) {
            float v = (xr[j * step] - mean) * rstd;
            if (w != nullptr) v = v * w[j * ws];
            if (b != nullptr) v = v + b[j * bs];
            yr[j] = v;
        }
    }
}

static int op_layernorm(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *w = &op->src[1], *b = &op->src[2];
    int64_t D = x->shape[x->ndim - 1];
    if (D <= 0) return 0;
    int64_t rows = numel(x) / D;
    int bs = row_block(D);
    layernorm_k<<<row_grid(rows), bs, 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)x->data, make_view(x), D, rows,
        (const float *)w->data, w->ndim > 0 ? w->stride[0] : 0, (const float *)b->data,
        b->ndim > 0 ? b->stride[0] : 0, op->p.norm.eps);
    KSM_CUDA_LAUNCH_CHECK(sc, "layernorm");
    return 0;
}

/* ---- GROUPNORM ---- */

template <bool LIN>
__global__ void groupnorm_k(float *y, const float *x, view xv, int64_t C, int64_t inner, int64_t G,
                            int64_t ngroups, const float *w, int64_t ws, const float *b, int64_t bs,
                            float eps)
{
    __shared__ double sh[32];
    const int64_t cpg = C / G, cnt = cpg * inner;
    for (int64_t grp = blockIdx.x; grp < ngroups; grp += gridDim.x) {
        const int64_t n = grp / G, g = grp - n * G;
        const int64_t base = (n * C + g * cpg) * inner;
        /* Two passes in double, as the CPU oracle's moments(). */
        double s = 0.0;
        for (int64_t j = threadIdx.x; j < cnt; j += blockDim.x)
            s += x[LIN ? base + j : xv.offset(base + j)];
        const double meand = block_sum_d(s, sh) / (double)cnt;
        double q = 0.0;
        for (int64_t j = threadIdx.x; j < cnt; j += blockDim.x) {
            double d = (double)x[LIN ? base + j : xv.offset(base + j)] - meand;
            q += d * d;
        }
        const double var = block_sum_d(q, sh) / (double)cnt;
        const float mean = (float)meand;
        const float rstd = (float)(1.0 / sqrt(var + (double)eps));
        for (int64_t j = threadIdx.x; j < cnt; j += blockDim.x) {
            const int64_t c = g * cpg + j / inner;
            /* Same structure as the CPU: a = rstd * w; y = (x - mean) * a + b. */
            const float a = rstd * (w != nullptr ? w[c * ws] : 1.0f);
            const float bb = b != nullptr ? b[c * bs] : 0.0f;
            y[base + j] = (x[LIN ? base + j : xv.offset(base + j)] - mean) * a + bb;
        }
    }
}

static int op_groupnorm(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *w = &op->src[1], *b = &op->src[2];
    int64_t N = x->shape[0], C = x->ndim > 1 ? x->shape[1] : 1;
    int64_t inner = 1;
    for (int d = 2; d < x->ndim; ++d) inner *= x->shape[d];
    int64_t G = op->p.norm.groups > 0 ? op->p.norm.groups : 1;
    int64_t ngroups = N * G;
    if (ngroups <= 0 || C / G * inner <= 0) return 0;
    int bs = row_block(C / G * inner);
    const float *wd = (const float *)w->data, *bd = (const float *)b->data;
    int64_t wst = w->ndim > 0 ? w->stride[0] : 0, bst = b->ndim > 0 ? b->stride[0] : 0;
    if (is_contiguous(x))
        groupnorm_k<true><<<row_grid(ngroups), bs, 0, sc->stream>>>(
            (float *)op->dst.data, (const float *)x->data, make_view(x), C, inner, G, ngroups, wd,
            wst, bd, bst, op->p.norm.eps);
    else
        groupnorm_k<false><<<row_grid(ngroups), bs, 0, sc->stream>>>(
            (float *)op->dst.data, (const float *)x->data, make_view(x), C, inner, G, ngroups, wd,
            wst, bd, bst, op->p.norm.eps);
    KSM_CUDA_LAUNCH_CHECK(sc, "groupnorm");
    return 0;
}

/* ---- SOFTMAX ---- */

__global__ void softmax_k(float *y, const float *x, view xv, int64_t D, int64_t rows)
{
    __shared__ float sh[32];
    const int64_t step = xv.ndim > 0 ? xv.stride[xv.ndim - 1] : 1;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + xv.offset(r * D);
        float m = -INFINITY;
        for (int64_t j = threadIdx.x; j < D; j += blockDim.x) m = fmaxf(m, xr[j * step]);
        m = block_max(m, sh);
        float s = 0.0f;
        for (int64_t j = threadIdx.x; j < D; j += blockDim.x) s += expf(xr[j * step] - m);
        s = block_sum(s, sh);
        float *yr = y + r * D;
        for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = expf(xr[j * step] - m) / s;
    }
}

static int op_softmax(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0];
    int64_t D = x->ndim > 0 ? x->shape[x->ndim - 1] : 1;
    if (D <= 0) return 0;
    int64_t rows = numel(x) / D;
    softmax_k<<<row_grid(rows), row_block(D), 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)x->data, make_view(x), D, rows);
    KSM_CUDA_LAUNCH_CHECK(sc, "softmax");
    return 0;
}

/* ---- MEAN ---- */

/* inner == 1: one block per output, reducing R contiguous elements. */
__global__ void mean_rows_k(float *y, const float *x, int64_t R, int64_t outer)
{
    __shared__ float sh[32];
    for (int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
        const float *xr = x + o * R;
        float s = 0.0f;
        for (int64_t j = threadIdx.x; j < R; j += blockDim.x) s += xr[j];
        s = block_sum(s, sh);
        if (threadIdx.x == 0) y[o] = s / (float)R;
    }
}

/* inner > 1: one thread per output; consecutive threads read consecutive addresses. */
__global__ void mean_cols_k(float *y, const float *x, int64_t R, int64_t inner, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = i / inner, in = i - o * inner;
        const float *xp = x + o * R * inner + in;
        float s = 0.0f;
        for (int64_t r = 0; r < R; ++r) s += xp[r * inner];
        y[i] = s / (float)R;
    }
}

static int op_mean(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0];
    int db = op->p.mean.dim_begin, de = op->p.mean.dim_end;
    int64_t outer = 1, R = 1, inner = 1;
    for (int d = 0; d < x->ndim; ++d) {
        if (d < db)
            outer *= x->shape[d];
        else if (d < de)
            R *= x->shape[d];
        else
            inner *= x->shape[d];
    }
    int64_t n = outer * inner;
    float *y = (float *)op->dst.data;
    /* R == 0 gives 0/0 = NaN, as torch.mean of an empty dimension. */
    if (inner == 1)
        mean_rows_k<<<row_grid(outer), row_block(R), 0, sc->stream>>>(y, (const float *)x->data, R,
                                                                      outer);
    else
        mean_cols_k<<<grid_for(n, 256), 256, 0, sc->stream>>>(y, (const float *)x->data, R, inner,
                                                              n);
    KSM_CUDA_LAUNCH_CHECK(sc, "mean");
    return 0;
}

/* ---- MAXPOOL2 ---- */

__global__ void maxpool2_k(float *y, const float *x, int64_t C, int64_t Ho, int64_t Wo, int64_t s0,
                           int64_t s1, int64_t s2, int64_t s3, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i;
        int64_t ow = t % Wo;
        t /= Wo;
        int64_t oh = t % Ho;
        t /= Ho;
        int64_t c = t % C;
        int64_t nn = t / C;
        const float *xp = x + nn * s0 + c * s1 + (2 * oh) * s2 + (2 * ow) * s3;
        float m = -INFINITY;
        for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
                float v = xp[dy * s2 + dx * s3];
                if (v > m || v != v) m = v; /* NaN wins (PyTorch) */
            }
        y[i] = m;
    }
}

static int op_maxpool2(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *y = &op->dst;
    int64_t n = numel(y);
    maxpool2_k<<<grid_for(n, 256), 256, 0, sc->stream>>>(
        (float *)y->data, (const float *)x->data, y->shape[1], y->shape[2], y->shape[3],
        x->stride[0], x->stride[1], x->stride[2], x->stride[3], n);
    KSM_CUDA_LAUNCH_CHECK(sc, "maxpool2");
    return 0;
}

/* ---- CROSS_ENTROPY ---- */

__global__ void xent_k(float *y, const float *x, int64_t xs0, int64_t xs1, int64_t C,
                       const void *labels, int labels_i64, int64_t ls, int64_t ignore, int64_t rows)
{
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        int64_t label = labels_i64 ? ((const int64_t *)labels)[r * ls]
                                   : (int64_t)((const int32_t *)labels)[r * ls];
        if (label == ignore) { /* uniform across the block */
            if (threadIdx.x == 0) y[r] = 0.0f;
            continue;
        }
        if (label < 0 || label >= C) {
            if (threadIdx.x == 0) y[r] = qnan_f32();
            continue;
        }
        const float *xr = x + r * xs0;
        float m = -INFINITY;
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) m = fmaxf(m, xr[j * xs1]);
        m = block_max(m, sh);
        float s = 0.0f;
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) s += expf(xr[j * xs1] - m);
        s = block_sum(s, sh);
        if (threadIdx.x == 0) y[r] = (m + logf(s)) - xr[label * xs1];
    }
}

static int op_cross_entropy(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *l = &op->src[1];
    int64_t rows = x->shape[0], C = x->shape[1];
    xent_k<<<row_grid(rows), row_block(C), 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)x->data, x->stride[0], x->stride[1], C, l->data,
        l->dtype == KSM_DTYPE_I64, l->ndim > 0 ? l->stride[0] : 0, op->p.xent.ignore_index, rows);
    KSM_CUDA_LAUNCH_CHECK(sc, "cross_entropy");
    return 0;
}

/* ---- ARGMAX ---- */

struct amax {
    float v;
    long long i; /* LLONG_MAX: no element */
};

/* The better of two candidates: NaN beats numbers, larger beats smaller, then the lower index
 * (first occurrence), as torch.argmax. */
__device__ __forceinline__ amax amax_best(amax a, amax b)
{
    const long long none = 0x7fffffffffffffffLL;
    if (a.i == none) return b;
    if (b.i == none) return a;
    bool an = a.v != a.v, bn = b.v != b.v;
    if (an || bn) {
        if (an && bn) return a.i < b.i ? a : b;
        return an ? a : b;
    }
    if (a.v > b.v) return a;
    if (b.v > a.v) return b;
    return a.i < b.i ? a : b;
}

__device__ __forceinline__ amax amax_warp(amax a)
{
    for (int o = 16; o > 0; o >>= 1) {
        amax b;
        b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        a = amax_best(a, b);
    }
    return a;
}

__global__ void argmax_k(int64_t *y, const float *x, int64_t xs0, int64_t xs1, int64_t C,
                         int64_t rows)
{
    __shared__ float shv[32];
    __shared__ long long shi[32];
    const long long none = 0x7fffffffffffffffLL;
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + r * xs0;
        amax best{0.0f, none};
        for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
            amax c{xr[j * xs1], (long long)j};
            best = amax_best(best, c);
        }
        best = amax_warp(best);
        __syncthreads();
        if (lane == 0) {
            shv[wid] = best.v;
            shi[wid] = best.i;
        }
        __syncthreads();
        amax a{0.0f, none};
        if (lane < nw) {
            a.v = shv[lane];
            a.i = shi[lane];
        }
        a = amax_warp(a);
        if (threadIdx.x == 0) y[r] = a.i == none ? 0 : (int64_t)a.i;
    }
}

static int op_argmax(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0];
    int64_t rows = x->shape[0], C = x->shape[1];
    argmax_k<<<row_grid(rows), row_block(C), 0, sc->stream>>>(
        (int64_t *)op->dst.data, (const float *)x->data, x->stride[0], x->stride[1], C, rows);
    KSM_CUDA_LAUNCH_CHECK(sc, "argmax");
    return 0;
}

int launch_reduce(stream_ctx *sc, const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_LAYERNORM: return op_layernorm(sc, op);
    case KSM_OP_GROUPNORM: return op_groupnorm(sc, op);
    case KSM_OP_SOFTMAX: return op_softmax(sc, op);
    case KSM_OP_MEAN: return op_mean(sc, op);
    case KSM_OP_MAXPOOL2: return op_maxpool2(sc, op);
    case KSM_OP_CROSS_ENTROPY: return op_cross_entropy(sc, op);
    case KSM_OP_ARGMAX: return op_argmax(sc, op);
    default: return KSM_EUNSUPPORTED;
    }
}

} // namespace ksm_cuda
