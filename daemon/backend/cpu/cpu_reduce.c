/*
 * CPU kernels: embedding lookup, means, 2x2 max-pooling, cross-entropy and argmax.
 * Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"

/* ---- Embedding, reductions, pooling, losses ---- */

static void embedding_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *wt = &op->src[0], *it = &op->src[1];
    const int64_t vocab = wt->shape[0], d = wt->shape[1];
    for (int64_t r = b; r < e; r++) {
        int64_t id = it->dtype == KSM_DTYPE_I32 ? ((const int32_t *)it->data)[r]
                                                : ((const int64_t *)it->data)[r];
        float *yr = (float *)op->dst.data + r * d;
        if (id >= 0 && id < vocab)
            memcpy(yr, (const float *)wt->data + id * d, (size_t)d * sizeof(float));
        else
            for (int64_t i = 0; i < d; i++) yr[i] = NAN;
    }
}

int ksm_cpu_exec_embedding(const struct ksm_op *op)
{
    ksm_cpu_parallel_for(ksm_cpu_numel(&op->src[1]), ksm_cpu_grain(op->src[0].shape[1]),
                         embedding_rows, (void *)op);
    return 0;
}

struct mean_job {
    const struct ksm_op *op;
    int64_t outer, red, inner;
};

/* Outputs [b, e) in chunks of the inner dim: task t = o * nchunks + chunk. */
enum { MEAN_CHUNK = 256 };

KSM_VEC_CLONES
static void mean_tasks(void *ctx, int64_t b, int64_t e)
{
    const struct mean_job *j = ctx;
    const float *x = (const float *)j->op->src[0].data;
    float *y = (float *)j->op->dst.data;
    const int64_t red = j->red, inner = j->inner;
    const int64_t nchunks = (inner + MEAN_CHUNK - 1) / MEAN_CHUNK;
    double acc[MEAN_CHUNK];
    for (int64_t t = b; t < e; t++) {
        const int64_t o = t / nchunks, i0 = t % nchunks * MEAN_CHUNK;
        const int64_t len = inner - i0 < MEAN_CHUNK ? inner - i0 : MEAN_CHUNK;
        for (int64_t i = 0; i < len; i++) acc[i] = 0.0;
        for (int64_t r = 0; r < red; r++) {
            const float *xr = x + (o * red + r) * inner + i0;
            for (int64_t i = 0; i < len; i++) acc[i] += xr[i];
        }
        for (int64_t i = 0; i < len; i++)
            y[o * inner + i0 + i] = (float)(acc[i] / (double)red); /* red 0: NaN */
    }
}

int ksm_cpu_exec_mean(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    struct mean_job j = {op, 1, 1, 1};
    for (int i = 0; i < xt->ndim; i++) {
        if (i < op->p.mean.dim_begin)
            j.outer *= xt->shape[i];
        else if (i < op->p.mean.dim_end)
            j.red *= xt->shape[i];
        else
            j.inner *= xt->shape[i];
    }
    if (j.outer == 0 || j.inner == 0) return 0;
    const int64_t nchunks = (j.inner + MEAN_CHUNK - 1) / MEAN_CHUNK;
    const int64_t per = j.red * (j.inner < MEAN_CHUNK ? j.inner : MEAN_CHUNK);
    ksm_cpu_parallel_for(j.outer * nchunks, ksm_cpu_grain(per), mean_tasks, &j);
    return 0;
}

KSM_VEC_CLONES
static void maxpool_planes(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const int64_t h = xt->shape[2], w = xt->shape[3];
    const int64_t ho = op->dst.shape[2], wo = op->dst.shape[3];
    for (int64_t p = b; p < e; p++) {
        const float *xp = (const float *)xt->data + p * h * w;
        float *yp = (float *)op->dst.data + p * ho * wo;
        for (int64_t oh = 0; oh < ho; oh++) {
            const float *r0 = xp + 2 * oh * w, *r1 = r0 + w;
            for (int64_t ow = 0; ow < wo; ow++) {
                const float v[4] = {r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1]};
                float m = v[0];
                for (int k = 1; k < 4; k++) /* NaN wins (PyTorch) */
                    m = (v[k] > m || v[k] != v[k]) ? v[k] : m;
                yp[oh * wo + ow] = m;
            }
        }
    }
}

int ksm_cpu_exec_maxpool2(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    const int64_t planes = xt->shape[0] * xt->shape[1];
    ksm_cpu_parallel_for(planes, ksm_cpu_grain(xt->shape[2] * xt->shape[3]), maxpool_planes,
                         (void *)op);
    return 0;
}

/* Sum of e^(x[i] - m) over a row in double: cpu_math.h's float exp (<= 1 ulp), sixteen
 * partial sums (a fixed order, vectorisable). m is the row's maximum, so the sum is >= 1 and a
 * term below e^-80 (< 2e-35; all of them together < 1e-29) cannot change it: exponents are
 * clamped at -80, which keeps every term a normal float. Subnormal results cost a microcode
 * assist each (about 5x the time of the whole row on this machine's Xeon when most logits lie
 * more than 87 below the maximum). */
#define XENT_EXP_FLOOR (-80.0f)

/* e^t for t = x - m <= 0 (never NaN: the row has none when m is finite), t clamped at
 * XENT_EXP_FLOOR by an unsigned minimum of the bits (a more negative float has larger bits;
 * -inf included, +-0 kept). */
static inline float xent_term(float t)
{
    const uint32_t b = ksm_cm_fbits(t), lo = ksm_cm_fbits(XENT_EXP_FLOOR);
    return ksm_cpu_expf_normal(ksm_cm_bitsf(b > lo ? lo : b));
}

KSM_VEC_CLONES
static double sum_exp_shifted(const float *KSM_RESTRICT x, int64_t n, float m)
{
    double s16[16] = {0}, s = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) s16[k] += (double)xent_term(x[i + k] - m);
    for (; i < n; i++) s += (double)xent_term(x[i] - m);
    for (int k = 0; k < 16; k++) s += s16[k];
    return s;
}

static void cross_entropy_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *lt = &op->src[0];
    const int64_t c = lt->shape[1];
    const int64_t *labels = (const int64_t *)op->src[1].data;
    float *loss = (float *)op->dst.data;
    for (int64_t r = b; r < e; r++) {
        const float *x = (const float *)lt->data + r * c;
        int64_t lab = labels[r];
        if (lab == op->p.xent.ignore_index) {
            loss[r] = 0.0f;
            continue;
        }
        if (lab < 0 || lab >= c) {
            loss[r] = NAN;
            continue;
        }
        /* log-sum-exp shifted by the row maximum; a NaN or infinite maximum gives NaN (the
         * maximum's own term would be e^(inf - inf)) */
        const float m = ksm_cpu_row_max(x, c);
        if (!(m > -INFINITY && m < INFINITY)) {
            loss[r] = NAN;
            continue;
        }
        loss[r] = (float)((double)m + log(sum_exp_shifted(x, c, m)) - (double)x[lab]);
    }
}

int ksm_cpu_exec_cross_entropy(const struct ksm_op *op)
{
    const ksm_tensor *lt = &op->src[0];
    ksm_cpu_parallel_for(lt->shape[0], ksm_cpu_grain(4 * lt->shape[1]), cross_entropy_rows,
                         (void *)op);
    return 0;
}

/* Index of the first element of x[0, n) equal to v (v not NaN), or of the first NaN when v is
 * NaN; n when none. Blocks of 16 are tested with a vectorisable any-of before the scan. */
static int64_t first_index_of(const float *x, int64_t n, float v)
{
    const bool nan = v != v;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        int hit = 0;
        for (int k = 0; k < 16; k++) hit |= nan ? x[i + k] != x[i + k] : x[i + k] == v;
        if (hit) break;
    }
    for (; i < n; i++)
        if (nan ? x[i] != x[i] : x[i] == v) return i;
    return n;
}

/* Index of the first maximum of x[0, n) in one pass, as a serial scan with > would give (-0 and
 * +0 equal; the first NaN wins); 0 for an empty row. Each of 16 lanes keeps the largest order
 * key it has seen (ksm_cm_key, -0 mapped to +0) and the first index where it saw it; the
 * result is the smallest index among the lanes holding the largest key. */
KSM_VEC_CLONES
static int64_t row_argmax(const float *x, int64_t n)
{
    int32_t k16[16], i16[16];
    uint32_t nan16[16];
    for (int k = 0; k < 16; k++) {
        k16[k] = INT32_MIN;
        i16[k] = 0;
        nan16[k] = 0;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) {
            uint32_t b = ksm_cm_fbits(x[i + k]);
            b &= ~(0u - (uint32_t)(b == 0x80000000u)); /* -0 -> +0 */
            const int32_t key = ksm_cm_key(b);
            const bool gt = key > k16[k];
            k16[k] = gt ? key : k16[k];
            i16[k] = gt ? (int32_t)(i + k) : i16[k];
            nan16[k] |= (uint32_t)((b & 0x7fffffffu) > 0x7f800000u);
        }
    int32_t best = INT32_MIN;
    int64_t at = 0;
    uint32_t nan = 0;
    for (int k = 0; k < 16; k++) {
        if (k16[k] > best || (k16[k] == best && i16[k] < at)) {
            best = k16[k];
            at = i16[k];
        }
        nan |= nan16[k];
    }
    for (; i < n; i++) {
        uint32_t b = ksm_cm_fbits(x[i]);
        b &= ~(0u - (uint32_t)(b == 0x80000000u));
        const int32_t key = ksm_cm_key(b);
        if (key > best) {
            best = key;
            at = i;
        }
        nan |= (uint32_t)((b & 0x7fffffffu) > 0x7f800000u);
    }
    if (nan)
        for (i = 0; i < n; i++)
            if (x[i] != x[i]) return i;
    return at;
}

static void argmax_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *xt = &op->src[0];
    const int64_t c = xt->shape[1];
    int64_t *out = (int64_t *)op->dst.data;
    for (int64_t r = b; r < e; r++) {
        const float *x = (const float *)xt->data + r * c;
        /* rows too long for 32-bit lane indices: the maximum, then its first index */
        const int64_t i =
            c <= INT32_MAX ? row_argmax(x, c) : first_index_of(x, c, ksm_cpu_row_max(x, c));
        out[r] = i < c ? i : 0;
    }
}

int ksm_cpu_exec_argmax(const struct ksm_op *op)
{
    const ksm_tensor *xt = &op->src[0];
    ksm_cpu_parallel_for(xt->shape[0], ksm_cpu_grain(xt->shape[1]), argmax_rows, (void *)op);
    return 0;
}
