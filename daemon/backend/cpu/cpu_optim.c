/*
 * CPU kernels of the optimizer ops: SGD step, sum of squares, in-place scale. Shared
 * conventions: cpu_ops_impl.h. SGD and scale are elementwise in F32 (each PyTorch operation
 * rounded to float, no contraction); the sum of squares accumulates in double over fixed chunks
 * whose partial sums are added in chunk order, so the result does not depend on the threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"

/* ---- SGD ---- */

struct sgd_job {
    float *p, *buf;
    const float *g;
    float wd, mom, damp1, neg_lr;
    int nesterov, first;
};

KSM_VEC_CLONES
static void sgd_range(void *ctx, int64_t b, int64_t e)
{
    const struct sgd_job *j = ctx;
    float *KSM_RESTRICT p = j->p;
    float *KSM_RESTRICT buf = j->buf;
    const float *KSM_RESTRICT g = j->g;
    for (int64_t i = b; i < e; i++) {
        float d = g[i];
        if (j->wd != 0.0f) d = d + j->wd * p[i]; /* d_p.add(param, alpha=weight_decay) */
        if (buf) {
            /* buf = clone(d_p), or buf.mul_(momentum).add_(d_p, alpha=1 - dampening) */
            float m = j->first ? d : j->mom * buf[i] + j->damp1 * d;
            buf[i] = m;
            d = j->nesterov ? d + j->mom * m : m;
        }
        p[i] = p[i] + j->neg_lr * d; /* param.add_(d_p, alpha=-lr) */
    }
}

int ksm_cpu_exec_sgd(const struct ksm_op *op)
{
    struct sgd_job j = {
        .p = (float *)op->dst.data,
        .buf = op->p.sgd.momentum != 0.0 ? (float *)op->src[1].data : NULL,
        .g = (const float *)op->src[0].data,
        .wd = (float)op->p.sgd.weight_decay,
        .mom = (float)op->p.sgd.momentum,
        .damp1 = (float)(1.0 - op->p.sgd.dampening),
        .neg_lr = (float)-op->p.sgd.lr,
        .nesterov = op->p.sgd.nesterov,
        .first = op->p.sgd.first,
    };
    ksm_cpu_parallel_for(ksm_cpu_numel(&op->dst), PAR_GRAIN, sgd_range, &j);
    return 0;
}

/* ---- Sum of squares ---- */

/* At most SUMSQ_PARTS chunks of at least SUMSQ_MIN elements: a pure function of the size. */
enum { SUMSQ_PARTS = 256, SUMSQ_MIN = 16384 };

struct sumsq_job {
    const float *x;
    int64_t n, chunk;
    double part[SUMSQ_PARTS];
};

KSM_VEC_CLONES
static void sumsq_range(void *ctx, int64_t b, int64_t e)
{
    struct sumsq_job *j = ctx;
    for (int64_t c = b; c < e; c++) {
        const int64_t lo = c * j->chunk, hi = lo + j->chunk < j->n ? lo + j->chunk : j->n;
        const float *KSM_RESTRICT x = j->x;
        /* four accumulators (a fixed order per chunk) so the loop pipelines */
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
            double v0 = x[i], v1 = x[i + 1], v2 = x[i + 2], v3 = x[i + 3];
            a0 += v0 * v0;
            a1 += v1 * v1;
            a2 += v2 * v2;
            a3 += v3 * v3;
        }
        for (; i < hi; i++) a0 += (double)x[i] * (double)x[i];
        j->part[c] = (a0 + a1) + (a2 + a3);
    }
}

int ksm_cpu_exec_sumsq(const struct ksm_op *op)
{
    struct sumsq_job j;
    j.x = (const float *)op->src[0].data;
    j.n = ksm_cpu_numel(&op->src[0]);
    j.chunk = (j.n + SUMSQ_PARTS - 1) / SUMSQ_PARTS;
    if (j.chunk < SUMSQ_MIN) j.chunk = SUMSQ_MIN;
    const int64_t parts = (j.n + j.chunk - 1) / j.chunk;
    ksm_cpu_parallel_for(parts, 1, sumsq_range, &j);
    double total = 0.0;
    for (int64_t c = 0; c < parts; c++) total += j.part[c];
    memcpy(op->dst.data, &total, sizeof total);
    return 0;
}

/* ---- Scale ---- */

struct scale_job {
    float *x;
    float f;
};

KSM_VEC_CLONES
static void scale_range(void *ctx, int64_t b, int64_t e)
{
    const struct scale_job *j = ctx;
    float *KSM_RESTRICT x = j->x;
    for (int64_t i = b; i < e; i++) x[i] = x[i] * j->f;
}

int ksm_cpu_exec_scale(const struct ksm_op *op)
{
    struct scale_job j = {(float *)op->dst.data, (float)op->p.scale.value};
    ksm_cpu_parallel_for(ksm_cpu_numel(&op->dst), PAR_GRAIN, scale_range, &j);
    return 0;
}
