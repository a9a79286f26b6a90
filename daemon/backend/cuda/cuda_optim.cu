/*
 * CUDA backend: optimizer ops (SGD, SUMSQ, SCALE), the counterparts of cpu_optim.c.
 *
 * SGD and SCALE are elementwise in F32 with each PyTorch operation rounded to float: the
 * products and sums use __fmul_rn / __fadd_rn so nvcc does not contract them into FMAs (the CPU
 * oracle does not either). SUMSQ accumulates in double: a fixed grid of SUMSQ_PARTS blocks each
 * writes one partial sum (threads over a grid-stride range, then a fixed-order block
 * reduction), and one block adds the partials in order, so the result does not depend on the
 * device (only the summation order differs from the CPU's, in double).
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int OPT_BLOCK = 256;
static constexpr int SUMSQ_PARTS = 256;

/* ---- SGD ---- */

__global__ void sgd_k(float *p, float *buf, const float *g, int64_t n, float wd, float mom,
                      float damp1, float neg_lr, int nesterov, int first)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float d = g[i];
        if (wd != 0.0f) d = __fadd_rn(d, __fmul_rn(wd, p[i]));
        if (buf != nullptr) {
            float m = first ? d : __fadd_rn(__fmul_rn(mom, buf[i]), __fmul_rn(damp1, d));
            buf[i] = m;
            d = nesterov ? __fadd_rn(d, __fmul_rn(mom, m)) : m;
        }
        p[i] = __fadd_rn(p[i], __fmul_rn(neg_lr, d));
    }
}

static int op_sgd(stream_ctx *sc, const struct ksm_op *op)
{
    const int64_t n = numel(&op->dst);
    float *buf = op->p.sgd.momentum != 0.0 ? (float *)op->src[1].data : nullptr;
    sgd_k<<<grid_for(n, OPT_BLOCK), OPT_BLOCK, 0, sc->stream>>>(
        (float *)op->dst.data, buf, (const float *)op->src[0].data, n,
        (float)op->p.sgd.weight_decay, (float)op->p.sgd.momentum,
        (float)(1.0 - op->p.sgd.dampening), (float)-op->p.sgd.lr, op->p.sgd.nesterov,
        op->p.sgd.first);
    KSM_CUDA_LAUNCH_CHECK(sc, "sgd");
    return 0;
}

/* ---- SUMSQ ---- */

__global__ void sumsq_parts_k(double *part, const float *x, int64_t n)
{
    __shared__ double sh[32];
    double s = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const double v = x[i];
        s += v * v;
    }
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void sumsq_final_k(double *out, const double *part, int nparts)
{
    __shared__ double sh[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += part[i];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) *out = s;
}

static int op_sumsq(stream_ctx *sc, const struct ksm_op *op)
{
    const int64_t n = numel(&op->src[0]);
    void *scratch = nullptr;
    int rc = scratch_alloc(sc, sizeof(double) * SUMSQ_PARTS, &scratch);
    if (rc != 0) return rc;
    double *part = (double *)scratch;
    sumsq_parts_k<<<SUMSQ_PARTS, OPT_BLOCK, 0, sc->stream>>>(part, (const float *)op->src[0].data,
                                                             n);
    KSM_CUDA_LAUNCH_CHECK(sc, "sumsq");
    sumsq_final_k<<<1, OPT_BLOCK, 0, sc->stream>>>((double *)op->dst.data, part, SUMSQ_PARTS);
    KSM_CUDA_LAUNCH_CHECK(sc, "sumsq");
    return scratch_free(sc, scratch);
}

/* ---- SCALE ---- */

__global__ void scale_k(float *x, int64_t n, float f)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], f);
}

static int op_scale(stream_ctx *sc, const struct ksm_op *op)
{
    const int64_t n = numel(&op->dst);
    scale_k<<<grid_for(n, OPT_BLOCK), OPT_BLOCK, 0, sc->stream>>>((float *)op->dst.data, n,
                                                                  (float)op->p.scale.value);
    KSM_CUDA_LAUNCH_CHECK(sc, "scale");
    return 0;
}

int launch_optim(stream_ctx *sc, const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_SGD: return op_sgd(sc, op);
    case KSM_OP_SUMSQ: return op_sumsq(sc, op);
    case KSM_OP_SCALE: return op_scale(sc, op);
    default: return KSM_EUNSUPPORTED;
    }
}

} // namespace ksm_cuda
