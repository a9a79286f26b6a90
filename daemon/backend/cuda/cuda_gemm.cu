/*
 * CUDA backend: GEMM, LINEAR and CONV2D through cuBLAS (plain FP32 SGEMM, no TF32).
 *
 * Row-major to cuBLAS (column-major): a row-major matrix X[r, c] with row stride ld is the
 * column-major matrix X^T[c, r] with leading dimension ld. So C = op(A) op(B) (row-major) is
 * computed as C^T = op(B)^T op(A)^T, i.e. cublasSgemm(opB, opA, N, M, K, B, ldb, A, lda, C, ldc)
 * with the same transpose flags; no data moves.
 *
 * CONV2D (stride 1, zero padding, groups):
 *   - Ci/groups == 1 (depthwise, any channel multiplier): a direct kernel, no workspace;
 *   - 1x1 without padding: per group one strided-batched GEMM over the images, no workspace;
 *   - otherwise: im2col of one group of as many images as op->ws holds (at least one, which is
 *     what ksm_op_conv2d_workspace_size asks for) followed by a strided-batched GEMM.
 * Bias is added by a separate kernel (after the GEMM, as the CPU backend does).
 */
#include "cuda_common.cuh"

#include <limits.h>

namespace ksm_cuda
{

static constexpr int GM_BLOCK = 256;

static bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

/* C[b] <- beta * C[b] for M x N row-major matrices (used when K == 0). beta 0 writes zeros
 * without reading C (BLAS semantics). */
__global__ void scale_k(float *c, int64_t ldc, int64_t sc, int64_t M, int64_t N, float beta,
                        int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t col = i % N, t = i / N, row = t % M, b = t / M;
        float *p = c + b * sc + row * ldc + col;
        *p = beta == 0.0f ? 0.0f : beta * *p;
    }
}

/* y[i] += bias[((i / inner) % C) * bstride] over contiguous y. */
__global__ void add_bias_k(float *y, const float *bias, int64_t bstride, int64_t inner, int64_t C,
                           int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += bias[((i / inner) % C) * bstride];
}

struct gemm_args {
    bool ta, tb;
    int64_t M, N, K, batch;
    float alpha, beta;
    const float *A;
    int64_t lda, sA;
    const float *B;
    int64_t ldb, sB;
    float *C;
    int64_t ldc, sC;
};

/* Checks the sizes cuBLAS' 32-bit API takes and repairs leading dimensions that are irrelevant
 * (a single row may carry any stride). Returns 0 or KSM_EUNSUPPORTED. Enqueues nothing. */
static int gemm_prepare(gemm_args *g)
{
    int64_t a_row = g->ta ? g->M : g->K, a_rows = g->ta ? g->K : g->M;
    int64_t b_row = g->tb ? g->K : g->N, b_rows = g->tb ? g->N : g->K;
    if (a_rows <= 1 || g->lda < a_row) g->lda = a_row > g->lda ? a_row : g->lda;
    if (b_rows <= 1 || g->ldb < b_row) g->ldb = b_row > g->ldb ? b_row : g->ldb;
    if (g->M <= 1 || g->ldc < g->N) g->ldc = g->N > g->ldc ? g->N : g->ldc;
    if (g->lda < 1) g->lda = 1;
    if (g->ldb < 1) g->ldb = 1;
    if (g->ldc < 1) g->ldc = 1;
    if (!fits_int(g->M) || !fits_int(g->N) || !fits_int(g->K) || !fits_int(g->batch) ||
        !fits_int(g->lda) || !fits_int(g->ldb) || !fits_int(g->ldc))
        return KSM_EUNSUPPORTED;
    return 0;
}

/* Enqueues one (batched) GEMM. Caller holds sc->blas_mu and has called gemm_prepare. */
static int gemm_run(stream_ctx *sc, cublasHandle_t h, const gemm_args &g)
{
    if (g.M == 0 || g.N == 0 || g.batch == 0) return 0;
    /* K == 0, or alpha == 0: C <- beta * C without reading A or B (BLAS semantics, as the
     * CPU oracle; cuBLAS would still form 0 * A @ B, turning Inf/NaN in A or B into NaN). */
    if (g.K == 0 || g.alpha == 0.0f) {
        int64_t n = g.batch * g.M * g.N;
        scale_k<<<grid_for(n, GM_BLOCK), GM_BLOCK, 0, sc->stream>>>(g.C, g.ldc, g.sC, g.M, g.N,
                                                                    g.beta, n);
        KSM_CUDA_LAUNCH_CHECK(sc, "scale");
        return 0;
    }
    cublasOperation_t opA = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t opB = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (g.batch == 1) {
        KSM_CUBLAS_TRY(sc, cublasSgemm(h, opB, opA, (int)g.N, (int)g.M, (int)g.K, &g.alpha, g.B,
                                       (int)g.ldb, g.A, (int)g.lda, &g.beta, g.C, (int)g.ldc));
    } else {
        KSM_CUBLAS_TRY(sc, cublasSgemmStridedBatched(h, opB, opA, (int)g.N, (int)g.M, (int)g.K,
                                                     &g.alpha, g.B, (int)g.ldb, (long long)g.sB,
                                                     g.A, (int)g.lda, (long long)g.sA, &g.beta, g.C,
                                                     (int)g.ldc, (long long)g.sC, (int)g.batch));
    }
    return 0;
}

static int add_bias(stream_ctx *sc, float *y, const ksm_tensor *bias, int64_t inner, int64_t C,
                    int64_t n)
{
    if (bias->data == nullptr || n == 0) return 0;
    int64_t bs = bias->ndim > 0 ? bias->stride[0] : 0;
    add_bias_k<<<grid_for(n, GM_BLOCK), GM_BLOCK, 0, sc->stream>>>(y, (const float *)bias->data, bs,
                                                                   inner, C, n);
    KSM_CUDA_LAUNCH_CHECK(sc, "bias");
    return 0;
}

/* ---- GEMM ---- */

static int op_gemm(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *a = &op->src[0], *b = &op->src[1], *c = &op->dst;
    int nd = c->ndim;
    gemm_args g;
    g.ta = op->p.gemm.trans_a != 0;
    g.tb = op->p.gemm.trans_b != 0;
    g.batch = nd == 3 ? c->shape[0] : 1;
    g.M = c->shape[nd - 2];
    g.N = c->shape[nd - 1];
    g.K = g.ta ? a->shape[nd - 2] : a->shape[nd - 1];
    g.alpha = op->p.gemm.alpha;
    g.beta = op->p.gemm.beta;
    g.A = (const float *)a->data;
    g.B = (const float *)b->data;
    g.C = (float *)c->data;
    g.lda = a->stride[nd - 2];
    g.ldb = b->stride[nd - 2];
    g.ldc = c->stride[nd - 2];
    g.sA = (nd == 3 && a->shape[0] != 1) ? a->stride[0] : 0;
    g.sB = (nd == 3 && b->shape[0] != 1) ? b->stride[0] : 0;
    g.sC = nd == 3 ? c->stride[0] : 0;
    int rc = gemm_prepare(&g);
    if (rc != 0) return rc;
    std::lock_guard<std::mutex> lock(sc->blas_mu);
    cublasHandle_t h;
    rc = blas_handle(sc, &h);
    if (rc != 0) return rc;
    return gemm_run(sc, h, g);
}

/* ---- LINEAR ---- */

static int op_linear(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *w = &op->src[1], *c = &op->dst;
    gemm_args g;
    g.ta = false;
    g.tb = true;
    g.K = x->shape[x->ndim - 1];
    g.N = w->shape[0];
    g.M = g.K > 0 ? numel(x) / g.K : numel(c) / (g.N > 0 ? g.N : 1);
    g.batch = 1;
    g.alpha = 1.0f;
    g.beta = 0.0f;
    g.A = (const float *)x->data;
    g.lda = g.K;
    g.sA = 0;
    g.B = (const float *)w->data;
    g.ldb = w->ndim == 2 ? w->stride[0] : g.K;
    g.sB = 0;
    g.C = (float *)c->data;
    g.ldc = g.N;
    g.sC = 0;
    int rc = gemm_prepare(&g);
    if (rc != 0) return rc;
    {
        std::lock_guard<std::mutex> lock(sc->blas_mu);
        cublasHandle_t h;
        rc = blas_handle(sc, &h);
        if (rc != 0) return rc;
        rc = gemm_run(sc, h, g);
        if (rc != 0) return rc;
    }
    return add_bias(sc, g.C, &op->src[2], 1, g.N, g.M * g.N);
}

/* ---- CONV2D ---- */

struct conv_shape {
    int64_t N, Ci, H, W, Co, kh, kw, Ho, Wo, ph, pw, groups, Cig, Cog;
};

/* col[nn][c][ki][kj][oh][ow] for images n0.., group gi (zero padding). */
__global__ void im2col_k(float *col, const float *x, conv_shape s, int64_t n0, int64_t gi,
                         int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i;
        int64_t ow = t % s.Wo;
        t /= s.Wo;
        int64_t oh = t % s.Ho;
        t /= s.Ho;
        int64_t kj = t % s.kw;
        t /= s.kw;
        int64_t ki = t % s.kh;
        t /= s.kh;
        int64_t c = t % s.Cig;
        int64_t nn = t / s.Cig;
        int64_t ih = oh + ki - s.ph, iw = ow + kj - s.pw;
        float v = 0.0f;
        if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W)
            v = x[(((n0 + nn) * s.Ci + gi * s.Cig + c) * s.H + ih) * s.W + iw];
        col[i] = v;
    }
}

/* One input channel per group (Cig == 1): direct convolution, bias included. */
__global__ void conv_direct_k(float *y, const float *x, const float *w, const float *bias,
                              int64_t bstride, conv_shape s, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i;
        int64_t ow = t % s.Wo;
        t /= s.Wo;
        int64_t oh = t % s.Ho;
        t /= s.Ho;
        int64_t co = t % s.Co;
        int64_t nn = t / s.Co;
        int64_t ci = co / s.Cog; /* the group's only input channel */
        const float *xp = x + (nn * s.Ci + ci) * s.H * s.W;
        const float *wp = w + co * s.kh * s.kw;
        float acc = 0.0f;
        for (int64_t ki = 0; ki < s.kh; ++ki) {
            int64_t ih = oh + ki - s.ph;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t kj = 0; kj < s.kw; ++kj) {
                int64_t iw = ow + kj - s.pw;
                if (iw < 0 || iw >= s.W) continue;
                acc += xp[ih * s.W + iw] * wp[ki * s.kw + kj];
            }
        }
        if (bias != nullptr) acc += bias[co * bstride];
        y[i] = acc;
    }
}

static int op_conv2d(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *w = &op->src[1], *bias = &op->src[2], *y = &op->dst;
    conv_shape s;
    s.N = x->shape[0];
    s.Ci = x->shape[1];
    s.H = x->shape[2];
    s.W = x->shape[3];
    s.Co = w->shape[0];
    s.kh = w->shape[2];
    s.kw = w->shape[3];
    s.Ho = y->shape[2];
    s.Wo = y->shape[3];
    s.ph = op->p.conv2d.pad_h;
    s.pw = op->p.conv2d.pad_w;
    s.groups = op->p.conv2d.groups > 0 ? op->p.conv2d.groups : 1;
    s.Cig = s.Ci / s.groups;
    s.Cog = s.Co / s.groups;
    int64_t HoWo = s.Ho * s.Wo;
    int64_t ny = numel(y);
    const float *xd = (const float *)x->data, *wd = (const float *)w->data;
    float *yd = (float *)y->data;

    if (s.Cig == 1) {
        int64_t bs = bias->ndim > 0 ? bias->stride[0] : 0;
        conv_direct_k<<<grid_for(ny, GM_BLOCK), GM_BLOCK, 0, sc->stream>>>(
            yd, xd, wd, (const float *)bias->data, bs, s, ny);
        KSM_CUDA_LAUNCH_CHECK(sc, "conv_direct");
        return 0;
    }

    bool pointwise = s.kh == 1 && s.kw == 1 && s.ph == 0 && s.pw == 0;
    int64_t Kdim = s.Cig * s.kh * s.kw;
    int64_t col_elems = Kdim * HoWo; /* one image, one group */
    int64_t chunk = s.N;
    /* No input channels (Kdim 0): the GEMMs only zero y (K == 0) and ops.c passes no
     * workspace, so neither im2col nor ws is needed (and col_bytes would divide by 0). */
    if (!pointwise && col_elems > 0) {
        size_t col_bytes = (size_t)col_elems * sizeof(float);
        if (op->ws == nullptr || op->ws_bytes < col_bytes) return KSM_EINVAL;
        chunk = (int64_t)(op->ws_bytes / col_bytes);
        if (chunk > s.N) chunk = s.N;
    }

    /* Validate every GEMM's sizes before enqueuing anything. */
    gemm_args g;
    g.ta = false;
    g.tb = false;
    g.M = s.Cog;
    g.N = HoWo;
    g.K = pointwise ? s.Cig : Kdim;
    g.batch = chunk;
    g.alpha = 1.0f;
    g.beta = 0.0f;
    g.lda = g.K;
    g.sA = 0;
    g.ldb = HoWo;
    g.sB = pointwise ? s.Ci * s.H * s.W : col_elems;
    g.ldc = HoWo;
    g.sC = s.Co * HoWo;
    int rc = gemm_prepare(&g);
    if (rc != 0) return rc;

    {
        std::lock_guard<std::mutex> lock(sc->blas_mu);
        cublasHandle_t h;
        rc = blas_handle(sc, &h);
        if (rc != 0) return rc;
        for (int64_t gi = 0; gi < s.groups; ++gi) {
            g.A = wd + gi * s.Cog * Kdim;
            if (pointwise) {
                g.B = xd + gi * s.Cig * s.H * s.W;
                g.C = yd + gi * s.Cog * HoWo;
                g.batch = s.N;
                rc = gemm_run(sc, h, g);
                if (rc != 0) return rc;
                continue;
            }
            for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
                int64_t nb = s.N - n0 < chunk ? s.N - n0 : chunk;
                int64_t ncol = nb * col_elems;
                if (ncol > 0) {
                    im2col_k<<<grid_for(ncol, GM_BLOCK), GM_BLOCK, 0, sc->stream>>>(
                        (float *)op->ws, xd, s, n0, gi, ncol);
                    KSM_CUDA_LAUNCH_CHECK(sc, "im2col");
                }
                g.B = (const float *)op->ws;
                g.C = yd + n0 * s.Co * HoWo + gi * s.Cog * HoWo;
                g.batch = nb;
                rc = gemm_run(sc, h, g);
                if (rc != 0) return rc;
            }
        }
    }
    return add_bias(sc, yd, bias, HoWo, s.Co, ny);
}

int launch_gemm(stream_ctx *sc, const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_GEMM: return op_gemm(sc, op);
    case KSM_OP_LINEAR: return op_linear(sc, op);
    case KSM_OP_CONV2D: return op_conv2d(sc, op);
    default: return KSM_EUNSUPPORTED;
    }
}

} // namespace ksm_cuda
