/*
 * CUDA backend: backward ops of elementwise functions, reductions and losses (UNARY_BACKWARD,
 * BROADCAST_GRAD, SUM_ROWS, MEAN_BACKWARD, MAXPOOL2_BACKWARD, EMBEDDING_BACKWARD,
 * CROSS_ENTROPY_BACKWARD), the counterparts of cpu_backward.c.
 *
 * Per-element derivatives come from nn/kmath.h (shared with the CPU oracle). Every output
 * element is computed by one thread or one block in a fixed order (no float atomics), so the
 * results are deterministic: reductions accumulate in double like the CPU's (BROADCAST_GRAD's
 * thread-per-output path even in the CPU's order); the embedding gradient adds the rows in index
 * order in float, the order of PyTorch's CPU kernel, so it matches bit for bit.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int BW_BLOCK = 256;

static unsigned rows_grid(int64_t rows)
{
    const int64_t max_grid = (int64_t)1 << 30;
    return (unsigned)(rows < 1 ? 1 : rows > max_grid ? max_grid : rows);
}

/* ---- UNARY_BACKWARD ---- */

template <int FN>
__global__ void unary_bw_k(float *dx, const float *g, const float *v, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float gi = g[i], vi = v[i]; /* dx may be g exactly: read before the write */
        float r;
        switch (FN) {
        case KSM_UNARY_RELU: r = ksm_relu_grad(gi, vi); break;
        case KSM_UNARY_GELU: r = ksm_gelu_grad(gi, vi); break;
        case KSM_UNARY_SIGMOID: r = ksm_sigmoid_grad(gi, vi); break;
        case KSM_UNARY_TANH: r = ksm_tanh_grad(gi, vi); break;
        default: r = ksm_clamp01_grad(gi, vi); break;
        }
        dx[i] = r;
    }
}

static int op_unary_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const int64_t n = numel(&op->dst);
    float *dx = (float *)op->dst.data;
    const float *g = (const float *)op->src[0].data, *v = (const float *)op->src[1].data;
    const unsigned grid = grid_for(n, BW_BLOCK);
    switch (op->p.unary.fn) {
    case KSM_UNARY_RELU:
        unary_bw_k<KSM_UNARY_RELU><<<grid, BW_BLOCK, 0, sc->stream>>>(dx, g, v, n);
        break;
    case KSM_UNARY_GELU:
        unary_bw_k<KSM_UNARY_GELU><<<grid, BW_BLOCK, 0, sc->stream>>>(dx, g, v, n);
        break;
    case KSM_UNARY_SIGMOID:
        unary_bw_k<KSM_UNARY_SIGMOID><<<grid, BW_BLOCK, 0, sc->stream>>>(dx, g, v, n);
        break;
    case KSM_UNARY_TANH:
        unary_bw_k<KSM_UNARY_TANH><<<grid, BW_BLOCK, 0, sc->stream>>>(dx, g, v, n);
        break;
    case KSM_UNARY_CLAMP01:
        unary_bw_k<KSM_UNARY_CLAMP01><<<grid, BW_BLOCK, 0, sc->stream>>>(dx, g, v, n);
        break;
    default: return KSM_EUNSUPPORTED;
    }
    KSM_CUDA_LAUNCH_CHECK(sc, "unary_backward");
    return 0;
}

/* ---- BROADCAST_GRAD ----
 *
 * dy's shape splits into kept dims (dst has F's size) and reduced dims (as cpu_backward.c).
 * Many outputs: one thread per output walks the reduced space in row-major order (the CPU's
 * order). Few outputs with a long reduction: one block per output, each thread a strided share
 * of the reduced index space, then a fixed-order block reduction. Both sum in double. */

#define BG_SRC 4

struct bg_args {
    const float *src[BG_SRC];
    int ns, fn, nk, nr;
    int64_t kshape[KSM_MAX_DIMS], rshape[KSM_MAX_DIMS];
    int64_t kst[BG_SRC][KSM_MAX_DIMS], rst[BG_SRC][KSM_MAX_DIMS];
    int64_t nred, nout;
};

__device__ __forceinline__ void bg_base(const bg_args &a, int64_t o, int64_t *base)
{
    for (int k = 0; k < BG_SRC; ++k) base[k] = 0;
    for (int d = a.nk - 1; d >= 0; --d) {
        const int64_t i = o % a.kshape[d];
        o /= a.kshape[d];
        for (int k = 0; k < a.ns; ++k) base[k] += i * a.kst[k][d];
    }
}

__device__ __forceinline__ float bg_elem(const bg_args &a, const int64_t *off)
{
    float v[BG_SRC] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < a.ns; ++k) v[k] = a.src[k][off[k]];
    return ksm_bgrad(a.fn, v[0], v[1], v[2], v[3]);
}

__global__ void bgrad_thread_k(float *dst, bg_args a)
{
    for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < a.nout;
         o += (int64_t)gridDim.x * blockDim.x) {
        int64_t off[BG_SRC];
        bg_base(a, o, off);
        int64_t idx[KSM_MAX_DIMS];
        for (int d = 0; d < KSM_MAX_DIMS; ++d) idx[d] = 0;
        double acc = 0.0;
        for (int64_t r = 0; r < a.nred; ++r) {
            acc += (double)bg_elem(a, off);
            for (int d = a.nr - 1; d >= 0; --d) { /* next reduced index */
                for (int k = 0; k < a.ns; ++k) off[k] += a.rst[k][d];
                if (++idx[d] < a.rshape[d]) break;
                for (int k = 0; k < a.ns; ++k) off[k] -= a.rst[k][d] * a.rshape[d];
                idx[d] = 0;
            }
        }
        dst[o] = (float)acc;
    }
}

__global__ void bgrad_block_k(float *dst, bg_args a)
{
    __shared__ double sh[32];
    for (int64_t o = blockIdx.x; o < a.nout; o += gridDim.x) {
        int64_t base[BG_SRC];
        bg_base(a, o, base);
        double acc = 0.0;
        for (int64_t r = threadIdx.x; r < a.nred; r += blockDim.x) {
            int64_t off[BG_SRC];
            for (int k = 0; k < BG_SRC; ++k) off[k] = base[k];
            int64_t rem = r;
            for (int d = a.nr - 1; d >= 0; --d) {
                const int64_t i = rem % a.rshape[d];
                rem /= a.rshape[d];
                for (int k = 0; k < a.ns; ++k) off[k] += i * a.rst[k][d];
            }
            acc += (double)bg_elem(a, off);
        }
        acc = block_sum_d(acc, sh);
        if (threadIdx.x == 0) dst[o] = (float)acc;
    }
}

static int op_broadcast_grad(stream_ctx *sc, const struct ksm_op *op)
{
    if ((int)op->p.bgrad.fn < 0 || op->p.bgrad.fn >= KSM_BGRAD_COUNT || op->n_src > BG_SRC ||
        op->n_src < 1)
        return KSM_EUNSUPPORTED;
    const ksm_tensor *g = &op->src[0];
    bg_args a;
    memset(&a, 0, sizeof a);
    a.ns = op->n_src;
    a.fn = (int)op->p.bgrad.fn;
    a.nred = 1;
    for (int k = 0; k < a.ns; ++k) a.src[k] = (const float *)op->src[k].data;
    const int off = g->ndim - op->dst.ndim;
    for (int d = 0; d < g->ndim; ++d) {
        const int64_t ds = d < off ? 1 : op->dst.shape[d - off];
        if (g->shape[d] == 1) continue;
        const bool keep = ds == g->shape[d];
        const int at = keep ? a.nk++ : a.nr++;
        (keep ? a.kshape : a.rshape)[at] = g->shape[d];
        for (int k = 0; k < a.ns; ++k) (keep ? a.kst : a.rst)[k][at] = op->src[k].stride[d];
        if (!keep) a.nred *= g->shape[d];
    }
    a.nout = numel(&op->dst);
    if (a.nout == 0) return 0;
    float *dst = (float *)op->dst.data;
    if (a.nout >= 2048 || a.nred < 4096)
        bgrad_thread_k<<<grid_for(a.nout, BW_BLOCK), BW_BLOCK, 0, sc->stream>>>(dst, a);
    else
        bgrad_block_k<<<rows_grid(a.nout), BW_BLOCK, 0, sc->stream>>>(dst, a);
    KSM_CUDA_LAUNCH_CHECK(sc, "broadcast_grad");
    return 0;
}

/* ---- SUM_ROWS: dst[N] <- column sums of x[M, N] in double ----
 * Block (32, 8): 32 columns, 8 row phases; the 8 partials are added in order. */

__global__ void sum_rows_k(float *y, const float *x, int64_t m, int64_t n)
{
    __shared__ double sh[8][33];
    const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
    double s = 0.0;
    if (c < n)
        for (int64_t r = threadIdx.y; r < m; r += 8) s += x[r * n + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < n) {
        double t = 0.0;
        for (int k = 0; k < 8; ++k) t += sh[k][threadIdx.x];
        y[c] = (float)t;
    }
}

static int op_sum_rows(stream_ctx *sc, const struct ksm_op *op)
{
    const int64_t m = op->src[0].shape[0], n = op->src[0].shape[1];
    if (n == 0) return 0;
    const int64_t blocks = (n + 31) / 32;
    if (blocks > INT32_MAX) return KSM_EUNSUPPORTED;
    sum_rows_k<<<(unsigned)blocks, dim3(32, 8), 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)op->src[0].data, m, n);
    KSM_CUDA_LAUNCH_CHECK(sc, "sum_rows");
    return 0;
}

/* ---- MEAN_BACKWARD ---- */

__global__ void mean_bw_k(float *dx, const float *g, int64_t red, int64_t inner, int64_t n,
                          float count)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / inner, o = t / red;
        dx[i] = __fdiv_rn(g[o * inner + (i - t * inner)], count);
    }
}

static int op_mean_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->dst;
    int64_t outer = 1, red = 1, inner = 1;
    for (int i = 0; i < xt->ndim; ++i) {
        if (i < op->p.mean.dim_begin)
            outer *= xt->shape[i];
        else if (i < op->p.mean.dim_end)
            red *= xt->shape[i];
        else
            inner *= xt->shape[i];
    }
    const int64_t n = outer * red * inner;
    if (n == 0) return 0;
    mean_bw_k<<<grid_for(n, BW_BLOCK), BW_BLOCK, 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)op->src[0].data, red, inner, n, (float)red);
    KSM_CUDA_LAUNCH_CHECK(sc, "mean_backward");
    return 0;
}

/* ---- MAXPOOL2_BACKWARD: one thread per element of dx, which recomputes its window's winner
 * (window order, "v > max || isnan(v)", as the CPU). ---- */

__global__ void maxpool2_bw_k(float *dx, const float *dy, const float *x, int64_t h, int64_t w,
                              int64_t ho, int64_t wo, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t p = i / (h * w), rem = i - p * h * w, ih = rem / w, iw = rem - ih * w;
        const int64_t oh = ih >> 1, ow = iw >> 1;
        float r = 0.0f;
        if (oh < ho && ow < wo) {
            const float *xp = x + p * h * w;
            const int64_t i0 = 2 * oh * w + 2 * ow;
            const int64_t at[4] = {i0, i0 + 1, i0 + w, i0 + w + 1};
            int64_t best = at[0];
            float m = -INFINITY;
            for (int k = 0; k < 4; ++k) {
                const float v = xp[at[k]];
                if (v > m || v != v) {
                    m = v;
                    best = at[k];
                }
            }
            if (best == rem) r = dy[p * ho * wo + oh * wo + ow];
        }
        dx[i] = r;
    }
}

static int op_maxpool2_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1], *gt = &op->src[0];
    const int64_t n = numel(&op->dst);
    maxpool2_bw_k<<<grid_for(n, BW_BLOCK), BW_BLOCK, 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)gt->data, (const float *)xt->data, xt->shape[2],
        xt->shape[3], gt->shape[2], gt->shape[3], n);
    KSM_CUDA_LAUNCH_CHECK(sc, "maxpool2_backward");
    return 0;
}

/* ---- EMBEDDING_BACKWARD ----
 * Thread t owns column d = t % D of the vocabulary rows [v0, v1) of slice t / D: it zeroes them,
 * then walks every index in order and adds the rows that fall in its range (float, the CPU's
 * order: bit-identical). */

__global__ void embedding_bw_k(float *dw, const float *g, const void *idx, int idx_i64,
                               int64_t is, int64_t vocab, int64_t d, int64_t r, int64_t vs,
                               int64_t nthreads)
{
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < nthreads;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % d, slice = t / d;
        const int64_t v0 = slice * vs, v1 = v0 + vs < vocab ? v0 + vs : vocab;
        for (int64_t v = v0; v < v1; ++v) dw[v * d + c] = 0.0f;
        for (int64_t i = 0; i < r; ++i) {
            const int64_t id =
                idx_i64 ? ((const int64_t *)idx)[i * is] : (int64_t)((const int32_t *)idx)[i * is];
            if (id < v0 || id >= v1) continue;
            dw[id * d + c] += g[i * d + c];
        }
    }
}

static int op_embedding_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *it = &op->src[1];
    const int64_t vocab = op->dst.shape[0], d = op->dst.shape[1];
    const int64_t r = it->ndim > 0 ? it->shape[0] : 1;
    if (vocab == 0 || d == 0) return 0;
    int64_t slices = 65536 / d;
    if (slices < 1) slices = 1;
    if (slices > vocab) slices = vocab;
    const int64_t vs = (vocab + slices - 1) / slices;
    slices = (vocab + vs - 1) / vs;
    const int64_t nthreads = slices * d;
    embedding_bw_k<<<grid_for(nthreads, BW_BLOCK), BW_BLOCK, 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)op->src[0].data, it->data,
        it->dtype == KSM_DTYPE_I64, it->ndim > 0 ? it->stride[0] : 0, vocab, d, r, vs, nthreads);
    KSM_CUDA_LAUNCH_CHECK(sc, "embedding_backward");
    return 0;
}

/* ---- CROSS_ENTROPY_BACKWARD ---- */

/* *scale <- dloss / (float)count, count = labels other than ignore (one block). */
__global__ void xent_bw_count_k(float *scale, const int64_t *labels, int64_t ls, int64_t rows,
                                int64_t ignore, float dloss)
{
    __shared__ double sh[32];
    double c = 0.0;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) c += labels[r * ls] != ignore;
    c = block_sum_d(c, sh);
    if (threadIdx.x == 0) *scale = c > 0.0 ? dloss / (float)(int64_t)c : 0.0f;
}

__device__ __forceinline__ float nan_max(float a, float b)
{
    if (a != a) return a;
    if (b != b) return b;
    return fmaxf(a, b);
}

__global__ void xent_bw_k(float *dx, const float *x, int64_t xs0, int64_t xs1, int64_t c,
                          const int64_t *labels, int64_t ls, int64_t ignore, int64_t rows,
                          const float *scale_p)
{
    __shared__ float shf[32];
    __shared__ double shd[32];
    const float scale = *scale_p;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const float *xr = x + r * xs0;
        float *dr = dx + r * c;
        const int64_t lab = labels[r * ls];
        if (lab == ignore) {
            for (int64_t i = threadIdx.x; i < c; i += blockDim.x) dr[i] = 0.0f;
            continue;
        }
        float m = -INFINITY;
        for (int64_t i = threadIdx.x; i < c; i += blockDim.x) m = nan_max(m, xr[i * xs1]);
        /* block max with NaN winning */
        {
            const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
            for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
            __syncthreads();
            if (lane == 0) shf[wid] = m;
            __syncthreads();
            m = lane < nw ? shf[lane] : -INFINITY;
            for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
        }
        if (lab < 0 || lab >= c || !(m > -INFINITY && m < INFINITY)) {
            for (int64_t i = threadIdx.x; i < c; i += blockDim.x) dr[i] = qnan_f32();
            continue;
        }
        double s = 0.0;
        for (int64_t i = threadIdx.x; i < c; i += blockDim.x)
            s += exp((double)xr[i * xs1] - (double)m);
        const double inv = 1.0 / block_sum_d(s, shd);
        for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
            const float p = (float)(exp((double)xr[i * xs1] - (double)m) * inv);
            dr[i] = __fmul_rn(__fsub_rn(p, i == lab ? 1.0f : 0.0f), scale);
        }
    }
}

static int row_block(int64_t D)
{
    if (D <= 32) return 32;
    if (D <= 64) return 64;
    if (D <= 128) return 128;
    return 256;
}

static int op_cross_entropy_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *x = &op->src[0], *l = &op->src[1];
    const int64_t rows = x->shape[0], c = x->shape[1];
    if (l->dtype != KSM_DTYPE_I64) return KSM_EUNSUPPORTED;
    const int64_t ls = l->ndim > 0 ? l->stride[0] : 0;
    void *scratch = nullptr;
    int rc = scratch_alloc(sc, sizeof(float), &scratch);
    if (rc != 0) return rc;
    float *scale = (float *)scratch;
    xent_bw_count_k<<<1, 1024, 0, sc->stream>>>(scale, (const int64_t *)l->data, ls, rows,
                                                op->p.xent_bw.ignore_index, op->p.xent_bw.scale);
    KSM_CUDA_LAUNCH_CHECK(sc, "cross_entropy_backward");
    xent_bw_k<<<rows_grid(rows), row_block(c), 0, sc->stream>>>(
        (float *)op->dst.data, (const float *)x->data, x->stride[0], x->stride[1], c,
        (const int64_t *)l->data, ls, op->p.xent_bw.ignore_index, rows, scale);
    KSM_CUDA_LAUNCH_CHECK(sc, "cross_entropy_backward");
    return scratch_free(sc, scratch);
}

int launch_backward(stream_ctx *sc, const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_UNARY_BACKWARD: return op_unary_backward(sc, op);
    case KSM_OP_BROADCAST_GRAD: return op_broadcast_grad(sc, op);
    case KSM_OP_SUM_ROWS: return op_sum_rows(sc, op);
    case KSM_OP_MEAN_BACKWARD: return op_mean_backward(sc, op);
    case KSM_OP_MAXPOOL2_BACKWARD: return op_maxpool2_backward(sc, op);
    case KSM_OP_EMBEDDING_BACKWARD: return op_embedding_backward(sc, op);
    case KSM_OP_CROSS_ENTROPY_BACKWARD: return op_cross_entropy_backward(sc, op);
    default: return KSM_EUNSUPPORTED;
    }
}

} // namespace ksm_cuda
