/*
 * CPU kernels: the backward ops (elementwise derivatives, broadcast-gradient reductions, bias
 * and mean gradients, max-pool routing, embedding scatter-add, cross-entropy). Shared
 * conventions: cpu_ops_impl.h; the contracts: the KSM_OP_*_BACKWARD entries of nn/op.h.
 *
 * Every kernel splits its outputs over the compute pool in disjoint ranges and sums each output
 * element in one fixed order, so results do not depend on the number of threads.
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"

/* ---- Elementwise derivatives ---- */

KSM_VEC_CLONES
static void unary_bw_span(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    float *dx = (float *)op->dst.data + b; /* may be dy exactly */
    const float *g = (const float *)op->src[0].data + b, *v = (const float *)op->src[1].data + b;
    const int64_t n = e - b;
    switch (op->p.unary.fn) {
    case KSM_UNARY_RELU:
        for (int64_t i = 0; i < n; i++) dx[i] = ksm_relu_grad(g[i], v[i]);
        break;
    case KSM_UNARY_GELU:
        for (int64_t i = 0; i < n; i++) dx[i] = ksm_gelu_grad(g[i], v[i]);
        break;
    case KSM_UNARY_SIGMOID:
        for (int64_t i = 0; i < n; i++) dx[i] = ksm_sigmoid_grad(g[i], v[i]);
        break;
    case KSM_UNARY_TANH:
        for (int64_t i = 0; i < n; i++) dx[i] = ksm_tanh_grad(g[i], v[i]);
        break;
    case KSM_UNARY_CLAMP01:
        for (int64_t i = 0; i < n; i++) dx[i] = ksm_clamp01_grad(g[i], v[i]);
        break;
    default: break;
    }
}

static int exec_unary_backward(const struct ksm_op *op)
{
    switch (op->p.unary.fn) {
    case KSM_UNARY_RELU:
    case KSM_UNARY_GELU:
    case KSM_UNARY_SIGMOID:
    case KSM_UNARY_TANH:
    case KSM_UNARY_CLAMP01: break;
    default: return KSM_EUNSUPPORTED;
    }
    ksm_cpu_parallel_for(ksm_cpu_numel(&op->dst), PAR_GRAIN, unary_bw_span, (void *)op);
    return 0;
}

/* ---- Broadcast gradients ----
 *
 * dy's shape F splits into kept dims (where dst has F's size) and reduced dims (where dst has
 * size 1 or no dim while F's is larger). Output element o (row-major over the kept dims, which
 * is dst's contiguous order) is the double sum, over the reduced index space in row-major
 * order, of ksm_bgrad() of the sources at that position. */

#define BG_SRC 4

struct bgrad_job {
    const struct ksm_op *op;
    int nk, nr; /* kept and reduced dims */
    int64_t kshape[KSM_MAX_DIMS], rshape[KSM_MAX_DIMS];
    int64_t kst[BG_SRC][KSM_MAX_DIMS], rst[BG_SRC][KSM_MAX_DIMS]; /* element strides */
    int64_t nred;
};

/* One source value set at offsets off[] (sources beyond ns read as 0). */
#define BG_TERM(fn, ns, src, off)                                                                  \
    ksm_bgrad(fn, (src)[0][(off)[0]], (ns) > 1 ? (src)[1][(off)[1]] : 0.0f,                        \
              (ns) > 2 ? (src)[2][(off)[2]] : 0.0f, (ns) > 3 ? (src)[3][(off)[3]] : 0.0f)

static void bgrad_outputs(void *ctx, int64_t b, int64_t e)
{
    const struct bgrad_job *j = ctx;
    const struct ksm_op *op = j->op;
    const int ns = op->n_src, fn = (int)op->p.bgrad.fn;
    const float *src[BG_SRC] = {0};
    for (int k = 0; k < ns; k++) src[k] = (const float *)op->src[k].data;
    float *dst = (float *)op->dst.data;
    for (int64_t o = b; o < e; o++) {
        int64_t base[BG_SRC] = {0}, rem = o;
        for (int d = j->nk - 1; d >= 0; d--) {
            const int64_t i = rem % j->kshape[d];
            rem /= j->kshape[d];
            for (int k = 0; k < ns; k++) base[k] += i * j->kst[k][d];
        }
        int64_t off[BG_SRC] = {0};
        for (int k = 0; k < ns; k++) off[k] = base[k];
        double acc = 0.0;
        if (j->nr == 1) { /* one (collapsed) reduced dim: a strided walk */
            const int64_t n = j->rshape[0];
            for (int64_t r = 0; r < n; r++) {
                acc += (double)BG_TERM(fn, ns, src, off);
                for (int k = 0; k < ns; k++) off[k] += j->rst[k][0];
            }
            dst[o] = (float)acc;
            continue;
        }
        int64_t idx[KSM_MAX_DIMS] = {0};
        for (int64_t r = 0; r < j->nred; r++) {
            acc += (double)BG_TERM(fn, ns, src, off);
            for (int d = j->nr - 1; d >= 0; d--) { /* next reduced index */
                for (int k = 0; k < ns; k++) off[k] += j->rst[k][d];
                if (++idx[d] < j->rshape[d]) break;
                for (int k = 0; k < ns; k++) off[k] -= j->rst[k][d] * j->rshape[d];
                idx[d] = 0;
            }
        }
        dst[o] = (float)acc;
    }
}

/* No reduced dim and one (collapsed) kept dim: dst[o] is the term at o (0.0 + (double)t rounds
 * back to t exactly, so this equals the general path bit for bit). */
static void bgrad_elementwise(void *ctx, int64_t b, int64_t e)
{
    const struct bgrad_job *j = ctx;
    const struct ksm_op *op = j->op;
    const int ns = op->n_src, fn = (int)op->p.bgrad.fn;
    const float *src[BG_SRC] = {0};
    int64_t st[BG_SRC] = {0};
    for (int k = 0; k < ns; k++) {
        src[k] = (const float *)op->src[k].data;
        st[k] = j->nk ? j->kst[k][0] : 0;
    }
    float *dst = (float *)op->dst.data;
    bool unit = true;
    for (int k = 0; k < ns; k++) unit = unit && st[k] == 1;
    if (unit && fn == 0) {
        memcpy(dst + b, src[0] + b, (size_t)(e - b) * sizeof *dst);
        return;
    }
    if (unit) {
        for (int64_t o = b; o < e; o++) {
            const int64_t off[BG_SRC] = {o, o, o, o};
            dst[o] = BG_TERM(fn, ns, src, off);
        }
        return;
    }
    for (int64_t o = b; o < e; o++) {
        const int64_t off[BG_SRC] = {o * st[0], o * st[1], o * st[2], o * st[3]};
        dst[o] = BG_TERM(fn, ns, src, off);
    }
}

static int exec_broadcast_grad(const struct ksm_op *op)
{
    if ((int)op->p.bgrad.fn < 0 || op->p.bgrad.fn >= KSM_BGRAD_COUNT || op->n_src > BG_SRC ||
        op->n_src < 1)
        return KSM_EUNSUPPORTED;
    const ksm_tensor *g = &op->src[0];
    struct bgrad_job j = {.op = op, .nred = 1};
    const int off = g->ndim - op->dst.ndim;
    int last = -1; /* 0: the previous dim was kept, 1: reduced, -1: none yet */
    for (int d = 0; d < g->ndim; d++) {
        const int64_t ds = d < off ? 1 : op->dst.shape[d - off];
        if (g->shape[d] == 1) continue; /* contributes nothing either way */
        const bool keep = ds == g->shape[d];
        int64_t *shape = keep ? j.kshape : j.rshape;
        int64_t(*st)[KSM_MAX_DIMS] = keep ? j.kst : j.rst;
        int *count = keep ? &j.nk : &j.nr;
        /* Adjacent dims of the same kind whose strides chain in every source are one dim
         * (same element order, fewer index steps). */
        bool merge = last == (keep ? 0 : 1) && *count > 0;
        for (int k = 0; merge && k < op->n_src; k++)
            merge = st[k][*count - 1] == op->src[k].stride[d] * g->shape[d];
        if (merge) {
            shape[*count - 1] *= g->shape[d];
            for (int k = 0; k < op->n_src; k++) st[k][*count - 1] = op->src[k].stride[d];
        } else {
            shape[*count] = g->shape[d];
            for (int k = 0; k < op->n_src; k++) st[k][*count] = op->src[k].stride[d];
            (*count)++;
        }
        last = keep ? 0 : 1;
        if (!keep) j.nred *= g->shape[d];
    }
    const int64_t n = ksm_cpu_numel(&op->dst);
    if (n == 0) return 0;
    if (j.nr == 0 && j.nk <= 1)
        ksm_cpu_parallel_for(n, PAR_GRAIN, bgrad_elementwise, &j);
    else
        ksm_cpu_parallel_for(n, ksm_cpu_grain(j.nred), bgrad_outputs, &j);
    return 0;
}

/* ---- Bias gradient: column sums ---- */

enum { COL_CHUNK = 256 };

struct rows_job {
    const float *x;
    float *y;
    int64_t m, n;
};

static void sum_rows_chunks(void *ctx, int64_t b, int64_t e)
{
    const struct rows_job *j = ctx;
    double acc[COL_CHUNK];
    for (int64_t c = b; c < e; c++) {
        const int64_t c0 = c * COL_CHUNK, len = j->n - c0 < COL_CHUNK ? j->n - c0 : COL_CHUNK;
        for (int64_t i = 0; i < len; i++) acc[i] = 0.0;
        for (int64_t r = 0; r < j->m; r++) {
            const float *xr = j->x + r * j->n + c0;
            for (int64_t i = 0; i < len; i++) acc[i] += xr[i];
        }
        for (int64_t i = 0; i < len; i++) j->y[c0 + i] = (float)acc[i];
    }
}

static int exec_sum_rows(const struct ksm_op *op)
{
    struct rows_job j = {(const float *)op->src[0].data, (float *)op->dst.data, op->src[0].shape[0],
                         op->src[0].shape[1]};
    const int64_t chunks = (j.n + COL_CHUNK - 1) / COL_CHUNK;
    ksm_cpu_parallel_for(chunks, ksm_cpu_grain(j.m * COL_CHUNK), sum_rows_chunks, &j);
    return 0;
}

/* ---- Mean gradient ---- */

struct mean_bw_job {
    const float *g;
    float *dx;
    int64_t red, inner;
    float count;
};

static void mean_bw_rows(void *ctx, int64_t b, int64_t e)
{
    const struct mean_bw_job *j = ctx;
    for (int64_t t = b; t < e; t++) { /* t = o * red + r: one row of inner elements */
        const int64_t o = t / j->red;
        const float *g = j->g + o * j->inner;
        float *dx = j->dx + t * j->inner;
        for (int64_t i = 0; i < j->inner; i++) dx[i] = g[i] / j->count;
    }
}

static int exec_mean_backward(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->dst;
    int64_t outer = 1, red = 1, inner = 1;
    for (int i = 0; i < xt->ndim; i++) {
        if (i < op->p.mean.dim_begin)
            outer *= xt->shape[i];
        else if (i < op->p.mean.dim_end)
            red *= xt->shape[i];
        else
            inner *= xt->shape[i];
    }
    if (outer == 0 || red == 0 || inner == 0) return 0;
    /* PyTorch divides the float gradient by the count (an integer scalar, here a float) */
    struct mean_bw_job j = {(const float *)op->src[0].data, (float *)op->dst.data, red, inner,
                            (float)red};
    ksm_cpu_parallel_for(outer * red, ksm_cpu_grain(inner), mean_bw_rows, &j);
    return 0;
}

/* ---- Max-pool gradient ---- */

static void maxpool_bw_planes(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[1];
    const int64_t h = xt->shape[2], w = xt->shape[3];
    const int64_t ho = op->src[0].shape[2], wo = op->src[0].shape[3];
    for (int64_t p = b; p < e; p++) {
        const float *xp = (const float *)xt->data + p * h * w;
        const float *gp = (const float *)op->src[0].data + p * ho * wo;
        float *dp = (float *)op->dst.data + p * h * w;
        memset(dp, 0, (size_t)(h * w) * sizeof(float));
        for (int64_t oh = 0; oh < ho; oh++)
            for (int64_t ow = 0; ow < wo; ow++) {
                /* PyTorch's cpu_max_pool: window order, "val > max || isnan(val)" */
                const int64_t i0 = 2 * oh * w + 2 * ow;
                const int64_t at[4] = {i0, i0 + 1, i0 + w, i0 + w + 1};
                int64_t best = at[0];
                float m = -INFINITY;
                for (int k = 0; k < 4; k++) {
                    const float v = xp[at[k]];
                    if (v > m || v != v) {
                        m = v;
                        best = at[k];
                    }
                }
                dp[best] = gp[oh * wo + ow];
            }
    }
}

static int exec_maxpool2_backward(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[1];
    const int64_t planes = xt->shape[0] * xt->shape[1];
    ksm_cpu_parallel_for(planes, ksm_cpu_grain(xt->shape[2] * xt->shape[3]), maxpool_bw_planes,
                         (void *)op);
    return 0;
}

/* ---- Embedding gradient ----
 *
 * Column chunks of dW run in parallel; within a chunk the indices are added in order, in
 * float, the order (and so the rounding) of PyTorch's CPU embedding_dense_backward. */

static void embedding_bw_chunks(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *it = &op->src[1];
    const int64_t vocab = op->dst.shape[0], d = op->dst.shape[1], r = it->shape[0];
    const float *g = (const float *)op->src[0].data;
    float *dw = (float *)op->dst.data;
    for (int64_t c = b; c < e; c++) {
        const int64_t c0 = c * COL_CHUNK, len = d - c0 < COL_CHUNK ? d - c0 : COL_CHUNK;
        for (int64_t v = 0; v < vocab; v++) memset(dw + v * d + c0, 0, (size_t)len * sizeof(float));
        for (int64_t i = 0; i < r; i++) {
            const int64_t id = it->dtype == KSM_DTYPE_I32 ? ((const int32_t *)it->data)[i]
                                                          : ((const int64_t *)it->data)[i];
            if (id < 0 || id >= vocab) continue;
            float *row = dw + id * d + c0;
            const float *gr = g + i * d + c0;
            for (int64_t k = 0; k < len; k++) row[k] += gr[k];
        }
    }
}

static int exec_embedding_backward(const struct ksm_op *op)
{
    const int64_t d = op->dst.shape[1];
    const int64_t chunks = (d + COL_CHUNK - 1) / COL_CHUNK;
    const int64_t per = (op->src[1].shape[0] + op->dst.shape[0]) * COL_CHUNK;
    ksm_cpu_parallel_for(chunks, ksm_cpu_grain(per), embedding_bw_chunks, (void *)op);
    return 0;
}

/* ---- Cross-entropy gradient ---- */

struct xent_bw_job {
    const struct ksm_op *op;
    float scale; /* dloss / count */
};

enum { XENT_CHUNK = 256 };

static inline double xent_exp(float x, float m)
{
    return ksm_cpu_exp_d_neg((double)x - (double)m); /* <= 0; -inf for x = -inf */
}

KSM_VEC_CLONES
static void xent_bw_rows(void *ctx, int64_t b, int64_t e)
{
    const struct xent_bw_job *j = ctx;
    const struct ksm_op *op = j->op;
    const int64_t c = op->src[0].shape[1];
    const int64_t *labels = (const int64_t *)op->src[1].data;
    for (int64_t r = b; r < e; r++) {
        const float *x = (const float *)op->src[0].data + r * c;
        float *dx = (float *)op->dst.data + r * c;
        const int64_t lab = labels[r];
        if (lab == op->p.xent_bw.ignore_index) {
            memset(dx, 0, (size_t)c * sizeof(float));
            continue;
        }
        const float m = ksm_cpu_row_max(x, c);
        if (lab < 0 || lab >= c || !(m > -INFINITY && m < INFINITY)) {
            for (int64_t i = 0; i < c; i++) dx[i] = NAN;
            continue;
        }
        /* e^(x - m) in double (cpu_math.h, relative error < 1e-12; below e^-700 a term is far
         * under the sum's rounding), a chunk at a time into a buffer the compiler vectorises,
         * summed in index order. */
        double sum = 0.0, buf[XENT_CHUNK];
        for (int64_t i0 = 0; i0 < c; i0 += XENT_CHUNK) {
            const int64_t n = c - i0 < XENT_CHUNK ? c - i0 : XENT_CHUNK;
            for (int64_t i = 0; i < n; i++) buf[i] = xent_exp(x[i0 + i], m);
            for (int64_t i = 0; i < n; i++) sum += buf[i];
        }
        const double inv = 1.0 / sum;
        const float sc = j->scale;
        for (int64_t i = 0; i < c; i++) dx[i] = (float)(xent_exp(x[i], m) * inv) * sc;
        dx[lab] = ((float)(xent_exp(x[lab], m) * inv) - 1.0f) * sc;
    }
}

static int exec_cross_entropy_backward(const struct ksm_op *op)
{
    const int64_t n = op->src[0].shape[0];
    const int64_t *labels = (const int64_t *)op->src[1].data;
    int64_t count = 0;
    for (int64_t r = 0; r < n; r++) count += labels[r] != op->p.xent_bw.ignore_index;
    struct xent_bw_job j = {op, count > 0 ? op->p.xent_bw.scale / (float)count : 0.0f};
    ksm_cpu_parallel_for(n, ksm_cpu_grain(2 * op->src[0].shape[1]), xent_bw_rows, &j);
    return 0;
}

int ksm_cpu_exec_backward(const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_UNARY_BACKWARD: return exec_unary_backward(op);
    case KSM_OP_BROADCAST_GRAD: return exec_broadcast_grad(op);
    case KSM_OP_SUM_ROWS: return exec_sum_rows(op);
    case KSM_OP_MEAN_BACKWARD: return exec_mean_backward(op);
    case KSM_OP_MAXPOOL2_BACKWARD: return exec_maxpool2_backward(op);
    case KSM_OP_EMBEDDING_BACKWARD: return exec_embedding_backward(op);
    case KSM_OP_CROSS_ENTROPY_BACKWARD: return exec_cross_entropy_backward(op);
    default: return KSM_EUNSUPPORTED;
    }
}
