/*
 * CUDA backend: elementwise ops (COPY, FILL, UNARY, BINARY, LERP, EMBEDDING, BATCHNORM).
 *
 * Sources are strided (ops.c has expanded them to dst's shape; stride 0 = broadcast) and dst is
 * contiguous. The host side coalesces dimensions that are contiguous in every tensor and drops
 * size-1 dimensions, so the common cases become 1-d; when every source is then unit-stride the
 * kernel indexes linearly, otherwise it unravels the linear index (64-bit) per source.
 * Per-element math comes from nn/kmath.h, shared with the CPU oracle.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int EW_BLOCK = 256;

/* ---- dtype access ---- */

template <int DT> __device__ __forceinline__ float load_f(const void *p, int64_t i);
template <> __device__ __forceinline__ float load_f<KSM_DTYPE_F32>(const void *p, int64_t i)
{
    return ((const float *)p)[i];
}
template <> __device__ __forceinline__ float load_f<KSM_DTYPE_F16>(const void *p, int64_t i)
{
    return ksm_f16_to_f32(((const uint16_t *)p)[i]);
}
template <> __device__ __forceinline__ float load_f<KSM_DTYPE_BF16>(const void *p, int64_t i)
{
    return ksm_bf16_to_f32(((const uint16_t *)p)[i]);
}

template <int DT> __device__ __forceinline__ void store_f(void *p, int64_t i, float v);
template <> __device__ __forceinline__ void store_f<KSM_DTYPE_F32>(void *p, int64_t i, float v)
{
    ((float *)p)[i] = v;
}
template <> __device__ __forceinline__ void store_f<KSM_DTYPE_F16>(void *p, int64_t i, float v)
{
    ((uint16_t *)p)[i] = ksm_f32_to_f16(v);
}
template <> __device__ __forceinline__ void store_f<KSM_DTYPE_BF16>(void *p, int64_t i, float v)
{
    ((uint16_t *)p)[i] = ksm_f32_to_bf16(v);
}

/* ---- Dimension coalescing ---- */

/* vs[0..nv) share the shape of vs[0]. Drops size-1 dims and merges adjacent dims that are
 * contiguous in every view. Leaves ndim 0 for a single element. */
static void coalesce(view *vs, int nv)
{
    int nd = vs[0].ndim;
    int keep[KSM_MAX_DIMS];
    int nk = 0;
    for (int d = 0; d < nd; ++d)
        if (vs[0].shape[d] != 1) keep[nk++] = d;
    int64_t shape[KSM_MAX_DIMS];
    int64_t stride[4][KSM_MAX_DIMS];
    int out = 0;
    for (int k = 0; k < nk; ++k) {
        int d = keep[k];
        int64_t n = vs[0].shape[d];
        if (out > 0) {
            bool merge = true;
            for (int t = 0; t < nv; ++t)
                if (stride[t][out - 1] != vs[t].stride[d] * n) merge = false;
            if (merge) {
                shape[out - 1] *= n;
                for (int t = 0; t < nv; ++t) stride[t][out - 1] = vs[t].stride[d];
                continue;
            }
        }
        shape[out] = n;
        for (int t = 0; t < nv; ++t) stride[t][out] = vs[t].stride[d];
        ++out;
    }
    for (int t = 0; t < nv; ++t) {
        vs[t].ndim = out;
        for (int d = 0; d < KSM_MAX_DIMS; ++d) {
            vs[t].shape[d] = d < out ? shape[d] : 1;
            vs[t].stride[d] = d < out ? stride[t][d] : 0;
        }
    }
}

/* True when the (coalesced) view addresses element i at offset i. */
static bool linear(const view &v) { return v.ndim == 0 || (v.ndim == 1 && v.stride[0] == 1); }

/* A source view aligned to dst's shape (right-aligned; missing leading dims broadcast). */
static view src_view(const ksm_tensor *dst, const ksm_tensor *src)
{
    view v;
    v.ndim = dst->ndim;
    int shift = dst->ndim - src->ndim;
    for (int d = 0; d < KSM_MAX_DIMS; ++d) {
        v.shape[d] = d < dst->ndim ? dst->shape[d] : 1;
        int sd = d - shift;
        v.stride[d] = (d < dst->ndim && sd >= 0 && sd < src->ndim && src->shape[sd] != 1)
                          ? src->stride[sd]
                          : 0;
    }
    return v;
}

/* ---- COPY ---- */

template <int SD, int DD, bool LIN>
__global__ void copy_float_k(void *dst, const void *src, view sv, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t off = LIN ? i : sv.offset(i);
        store_f<DD>(dst, i, load_f<SD>(src, off));
    }
}

template <typename ST, typename DT, bool LIN>
__global__ void copy_cast_k(DT *dst, const ST *src, view sv, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t off = LIN ? i : sv.offset(i);
        dst[i] = (DT)src[off];
    }
}

template <int SD, int DD>
static void launch_copy_float(stream_ctx *sc, void *dst, const void *src, const view &sv, int64_t n,
                              bool lin)
{
    unsigned g = grid_for(n, EW_BLOCK);
    if (lin)
        copy_float_k<SD, DD, true><<<g, EW_BLOCK, 0, sc->stream>>>(dst, src, sv, n);
    else
        copy_float_k<SD, DD, false><<<g, EW_BLOCK, 0, sc->stream>>>(dst, src, sv, n);
}

template <typename ST, typename DT>
static void launch_copy_cast(stream_ctx *sc, void *dst, const void *src, const view &sv, int64_t n,
                             bool lin)
{
    unsigned g = grid_for(n, EW_BLOCK);
    if (lin)
        copy_cast_k<ST, DT, true>
            <<<g, EW_BLOCK, 0, sc->stream>>>((DT *)dst, (const ST *)src, sv, n);
    else
        copy_cast_k<ST, DT, false>
            <<<g, EW_BLOCK, 0, sc->stream>>>((DT *)dst, (const ST *)src, sv, n);
}

static int op_copy(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *dst = &op->dst, *src = &op->src[0];
    int64_t n = numel(dst);
    view vs[2] = {make_view(dst), src_view(dst, src)};
    coalesce(vs, 2);
    bool lin = linear(vs[1]);
    enum ksm_dtype sd = src->dtype, dd = dst->dtype;
    if (sd == dd) {
        size_t es = sd == KSM_DTYPE_F32 || sd == KSM_DTYPE_I32 ? 4 : sd == KSM_DTYPE_I64 ? 8 : 2;
        if (lin) {
            if (dst->data == src->data) return 0; /* in place: nothing to do */
            KSM_CUDA_TRY(sc, cudaMemcpyAsync(dst->data, src->data, (size_t)n * es,
                                             cudaMemcpyDeviceToDevice, sc->stream));
            return 0;
        }
        /* Bit copies: NaN payloads and -0 survive unchanged. */
        if (es == 8)
            launch_copy_cast<uint64_t, uint64_t>(sc, dst->data, src->data, vs[1], n, false);
        else if (es == 4)
            launch_copy_cast<uint32_t, uint32_t>(sc, dst->data, src->data, vs[1], n, false);
        else
            launch_copy_cast<uint16_t, uint16_t>(sc, dst->data, src->data, vs[1], n, false);
    } else if (sd == KSM_DTYPE_I64 && dd == KSM_DTYPE_I32) {
        launch_copy_cast<int64_t, int32_t>(sc, dst->data, src->data, vs[1], n, lin);
    } else if (sd == KSM_DTYPE_I32 && dd == KSM_DTYPE_I64) {
        launch_copy_cast<int32_t, int64_t>(sc, dst->data, src->data, vs[1], n, lin);
    } else {
#define KSM_COPY_CASE(S, D)                                                                        \
    if (sd == S && dd == D) launch_copy_float<S, D>(sc, dst->data, src->data, vs[1], n, lin)
        KSM_COPY_CASE(KSM_DTYPE_F32, KSM_DTYPE_F16);
        else KSM_COPY_CASE(KSM_DTYPE_F32, KSM_DTYPE_BF16);
        else KSM_COPY_CASE(KSM_DTYPE_F16, KSM_DTYPE_F32);
        else KSM_COPY_CASE(KSM_DTYPE_F16, KSM_DTYPE_BF16);
        else KSM_COPY_CASE(KSM_DTYPE_BF16, KSM_DTYPE_F32);
        else KSM_COPY_CASE(KSM_DTYPE_BF16, KSM_DTYPE_F16);
        else return KSM_EUNSUPPORTED;
#undef KSM_COPY_CASE
    }
    KSM_CUDA_LAUNCH_CHECK(sc, "copy");
    return 0;
}

/* ---- FILL ---- */

template <typename T> __global__ void fill_k(T *dst, T v, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = v;
}

/* double -> integer without undefined behaviour (NaN gives 0, saturates at the limits). */
template <typename T> static T to_int(double v, double lo, double hi)
{
    if (!(v == v)) return 0;
    if (v <= lo) return (T)lo;
    if (v >= hi) return (T)hi;
    return (T)v;
}

static int op_fill(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *dst = &op->dst;
    int64_t n = numel(dst);
    double value = op->p.fill.value;
    unsigned g = grid_for(n, EW_BLOCK);
    switch (dst->dtype) {
    case KSM_DTYPE_F32: {
        float f = (float)value;
        uint32_t bits = ksm_f32_bits(f);
        if (bits == 0) {
            KSM_CUDA_TRY(sc, cudaMemsetAsync(dst->data, 0, (size_t)n * 4, sc->stream));
            return 0;
        }
        fill_k<uint32_t><<<g, EW_BLOCK, 0, sc->stream>>>((uint32_t *)dst->data, bits, n);
        break;
    }
    case KSM_DTYPE_F16:
        fill_k<uint16_t><<<g, EW_BLOCK, 0, sc->stream>>>((uint16_t *)dst->data,
                                                         ksm_f32_to_f16((float)value), n);
        break;
    case KSM_DTYPE_BF16:
        fill_k<uint16_t><<<g, EW_BLOCK, 0, sc->stream>>>((uint16_t *)dst->data,
                                                         ksm_f32_to_bf16((float)value), n);
        break;
    case KSM_DTYPE_I64:
        fill_k<int64_t><<<g, EW_BLOCK, 0, sc->stream>>>(
            (int64_t *)dst->data,
            to_int<int64_t>(value, -9223372036854775808.0, 9223372036854774784.0), n);
        break;
    case KSM_DTYPE_I32:
        fill_k<int32_t><<<g, EW_BLOCK, 0, sc->stream>>>(
            (int32_t *)dst->data, to_int<int32_t>(value, -2147483648.0, 2147483647.0), n);
        break;
    default: return KSM_EUNSUPPORTED;
    }
    KSM_CUDA_LAUNCH_CHECK(sc, "fill");
    return 0;
}

/* ---- UNARY / BINARY / LERP ---- */

struct unary_f {
    int fn;
    float a, b;
    __device__ __forceinline__ float operator()(float x) const
    {
        switch (fn) {
        case KSM_UNARY_RELU: return ksm_relu(x);
        case KSM_UNARY_GELU: return ksm_gelu(x);
        case KSM_UNARY_SIGMOID: return ksm_sigmoid(x);
        case KSM_UNARY_TANH: return ksm_tanh(x);
        case KSM_UNARY_CLAMP01: return ksm_clamp01(x);
        default: return a * x + b; /* KSM_UNARY_AFFINE */
        }
    }
};

struct binary_f {
    int fn;
    __device__ __forceinline__ float operator()(float x, float y) const
    {
        switch (fn) {
        case KSM_BINARY_ADD: return x + y;
        case KSM_BINARY_SUB: return x - y;
        default: return x * y; /* KSM_BINARY_MUL */
        }
    }
};

struct lerp_f {
    __device__ __forceinline__ float operator()(float x, float y, float w) const
    {
        return ksm_lerp(x, y, w);
    }
};

template <int NS, bool LIN, class F>
__global__ void ew_k(float *dst, const float *s0, const float *s1, const float *s2, view v0,
                     view v1, view v2, int64_t n, F f)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float r;
        if constexpr (NS == 1) {
            r = f(s0[LIN ? i : v0.offset(i)]);
        } else if constexpr (NS == 2) {
            r = f(s0[LIN ? i : v0.offset(i)], s1[LIN ? i : v1.offset(i)]);
        } else {
            r = f(s0[LIN ? i : v0.offset(i)], s1[LIN ? i : v1.offset(i)],
                  s2[LIN ? i : v2.offset(i)]);
        }
        dst[i] = r;
    }
}

template <int NS, class F> static int launch_ew(stream_ctx *sc, const struct ksm_op *op, F f)
{
    const ksm_tensor *dst = &op->dst;
    int64_t n = numel(dst);
    view vs[4];
    vs[0] = make_view(dst);
    for (int k = 0; k < NS; ++k) vs[k + 1] = src_view(dst, &op->src[k]);
    coalesce(vs, NS + 1);
    bool lin = true;
    for (int k = 0; k < NS; ++k) lin = lin && linear(vs[k + 1]);
    const float *s0 = (const float *)op->src[0].data;
    const float *s1 = NS > 1 ? (const float *)op->src[1].data : nullptr;
    const float *s2 = NS > 2 ? (const float *)op->src[2].data : nullptr;
    view v1 = vs[1], v2 = NS > 1 ? vs[2] : vs[1], v3 = NS > 2 ? vs[3] : vs[1];
    unsigned g = grid_for(n, EW_BLOCK);
    if (lin)
        ew_k<NS, true, F>
            <<<g, EW_BLOCK, 0, sc->stream>>>((float *)dst->data, s0, s1, s2, v1, v2, v3, n, f);
    else
        ew_k<NS, false, F>
            <<<g, EW_BLOCK, 0, sc->stream>>>((float *)dst->data, s0, s1, s2, v1, v2, v3, n, f);
    KSM_CUDA_LAUNCH_CHECK(sc, "elementwise");
    return 0;
}

/* ---- EMBEDDING ---- */

template <typename IT>
__global__ void embedding_k(float *dst, const float *w, int64_t ws0, int64_t ws1, int64_t V,
                            int64_t D, const IT *idx, view iv, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t row = i / D, col = i - row * D;
        int64_t id = (int64_t)idx[iv.offset(row)];
        dst[i] = (id >= 0 && id < V) ? w[id * ws0 + col * ws1] : qnan_f32();
    }
}

static int op_embedding(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *dst = &op->dst, *w = &op->src[0], *idx = &op->src[1];
    int64_t n = numel(dst);
    int64_t V = w->shape[0], D = w->shape[1];
    if (D <= 0) return 0;
    view iv = make_view(idx);
    coalesce(&iv, 1);
    unsigned g = grid_for(n, EW_BLOCK);
    if (idx->dtype == KSM_DTYPE_I64)
        embedding_k<int64_t><<<g, EW_BLOCK, 0, sc->stream>>>(
            (float *)dst->data, (const float *)w->data, w->stride[0], w->stride[1], V, D,
            (const int64_t *)idx->data, iv, n);
    else
        embedding_k<int32_t><<<g, EW_BLOCK, 0, sc->stream>>>(
            (float *)dst->data, (const float *)w->data, w->stride[0], w->stride[1], V, D,
            (const int32_t *)idx->data, iv, n);
    KSM_CUDA_LAUNCH_CHECK(sc, "embedding");
    return 0;
}

/* ---- BATCHNORM (eval) ---- */

struct bn_params {
    const float *mean, *var, *weight, *bias;
    int64_t sm, sv, sw, sb;
};

template <bool LIN, bool RELU>
__global__ void batchnorm_k(float *dst, const float *x, view xv, int64_t C, int64_t inner,
                            bn_params p, float eps, int64_t n)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t c = (i / inner) % C;
        float v = x[LIN ? i : xv.offset(i)];
        /* Same structure as the CPU oracle: a = w / sqrt(var + eps); y = (x - m) * a + b. */
        const float a = p.weight[c * p.sw] / sqrtf(p.var[c * p.sv] + eps);
        const float y = (v - p.mean[c * p.sm]) * a + p.bias[c * p.sb];
        dst[i] = RELU ? ksm_relu(y) : y;
    }
}

static int op_batchnorm(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *dst = &op->dst, *x = &op->src[0];
    int64_t n = numel(dst);
    int64_t C = dst->ndim >= 2 ? dst->shape[1] : 1;
    int64_t inner = 1;
    for (int d = 2; d < dst->ndim; ++d) inner *= dst->shape[d];
    bn_params p;
    p.mean = (const float *)op->src[1].data;
    p.var = (const float *)op->src[2].data;
    p.weight = (const float *)op->src[3].data;
    p.bias = (const float *)op->src[4].data;
    p.sm = op->src[1].ndim > 0 ? op->src[1].stride[0] : 0;
    p.sv = op->src[2].ndim > 0 ? op->src[2].stride[0] : 0;
    p.sw = op->src[3].ndim > 0 ? op->src[3].stride[0] : 0;
    p.sb = op->src[4].ndim > 0 ? op->src[4].stride[0] : 0;
    view xv = make_view(x);
    bool lin = is_contiguous(x);
    unsigned g = grid_for(n, EW_BLOCK);
    float *yd = (float *)dst->data;
    const float *xd = (const float *)x->data;
    const float eps = op->p.norm.eps;
    if (op->p.norm.relu) {
        if (lin)
            batchnorm_k<true, true>
                <<<g, EW_BLOCK, 0, sc->stream>>>(yd, xd, xv, C, inner, p, eps, n);
        else
            batchnorm_k<false, true>
                <<<g, EW_BLOCK, 0, sc->stream>>>(yd, xd, xv, C, inner, p, eps, n);
    } else {
        if (lin)
            batchnorm_k<true, false>
                <<<g, EW_BLOCK, 0, sc->stream>>>(yd, xd, xv, C, inner, p, eps, n);
        else
            batchnorm_k<false, false>
                <<<g, EW_BLOCK, 0, sc->stream>>>(yd, xd, xv, C, inner, p, eps, n);
    }
    KSM_CUDA_LAUNCH_CHECK(sc, "batchnorm");
    return 0;
}

/* ---- DROPOUT: one thread per block of four elements (one Philox call, kmath.h) ---- */

__global__ void dropout_k(float *y, const float *x, int64_t n, struct ksm_op_dropout d,
                          uint32_t thr, float scale)
{
    const int64_t nblk = (n + 3) / 4;
    for (int64_t blk = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; blk < nblk;
         blk += (int64_t)gridDim.x * blockDim.x) {
        uint32_t w[4];
        ksm_dropout_words(d.seed, d.step, d.site, (uint64_t)blk, w);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int64_t i = 4 * blk + k;
            if (i < n) y[i] = x[i] * ((w[k] >> 8) >= thr ? scale : 0.0f);
        }
    }
}

static int op_dropout(stream_ctx *sc, const struct ksm_op *op)
{
    const int64_t n = numel(&op->dst);
    if (n == 0) return 0;
    float *y = (float *)op->dst.data;
    const float *x = (const float *)op->src[0].data;
    const struct ksm_op_dropout d = op->p.dropout;
    dropout_k<<<grid_for((n + 3) / 4, EW_BLOCK), EW_BLOCK, 0, sc->stream>>>(
        y, x, n, d, ksm_dropout_threshold(d.p), ksm_dropout_scale(d.p));
    KSM_CUDA_LAUNCH_CHECK(sc, "dropout");
    return 0;
}

int launch_elementwise(stream_ctx *sc, const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_COPY: return op_copy(sc, op);
    case KSM_OP_FILL: return op_fill(sc, op);
    case KSM_OP_UNARY: {
        unary_f f{(int)op->p.unary.fn, op->p.unary.a, op->p.unary.b};
        return launch_ew<1>(sc, op, f);
    }
    case KSM_OP_BINARY: {
        binary_f f{(int)op->p.binary.fn};
        return launch_ew<2>(sc, op, f);
    }
    case KSM_OP_LERP: return launch_ew<3>(sc, op, lerp_f{});
    case KSM_OP_EMBEDDING: return op_embedding(sc, op);
    case KSM_OP_BATCHNORM: return op_batchnorm(sc, op);
    case KSM_OP_DROPOUT: return op_dropout(sc, op);
    default: return KSM_EUNSUPPORTED;
    }
}

} // namespace ksm_cuda
