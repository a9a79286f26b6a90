/*
 * CPU kernel: the backward of scaled dot-product attention (KSM_OP_SDPA's causal rule and
 * scale).
 *
 * Per (batch, head), one query row at a time: the scores s_j = scale q_i . k_j over the visible
 * keys, p = softmax(s) (maximum subtracted, sum in double), dp_j = dout_i . v_j,
 * D = sum_j p_j dp_j, ds_j = p_j (dp_j - D); then dq_i = scale sum_j ds_j k_j, and dk_j, dv_j
 * gather scale ds_j q_i and p_j dout_i in double accumulators over the rows, written once at the
 * end. With attention dropout (p.sdpa.drop), each p_j is scaled by its factor f_j where it
 * weights v_j: dp_j = f_j dout_i . v_j and dv_j gathers p_j f_j dout_i. Keys a causal row cannot
 * see get no contribution (dk, dv of a key no row sees are 0). (batch, head) pairs are split over
 * the compute pool, each thread with its own scratch. Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "backend/cpu/cpu_ops_impl.h"

struct sdpa_bw_job {
    const struct ksm_op *op;
    double *scratch;  /* per slot: dk, dv [tk * hd], p, dp [tk], dq [hd], then tk float factors */
    int64_t per_slot; /* doubles */
};

static const float *at(const ksm_tensor *t, int64_t b, int64_t h, int64_t i)
{
    return (const float *)t->data + b * t->stride[0] + h * t->stride[1] + i * t->stride[2];
}

KSM_VEC_CLONES
static void sdpa_bw_heads(void *ctx, int slot, int64_t begin, int64_t end)
{
    const struct sdpa_bw_job *j = ctx;
    const struct ksm_op *op = j->op;
    const ksm_tensor *dot = &op->src[0], *qt = &op->src[1], *kt = &op->src[2], *vt = &op->src[3];
    const ksm_tensor *dqt = &op->dst, *dkt = &op->src[4], *dvt = &op->src[5];
    const int64_t nh = qt->shape[1], tq = qt->shape[2], hd = qt->shape[3], tk = kt->shape[2];
    const double scale = op->p.sdpa.scale;
    double *dk = j->scratch + slot * j->per_slot, *dv = dk + tk * hd, *p = dv + tk * hd;
    double *dp = p + tk, *dq = dp + tk;
    float *fac = (float *)(dq + hd); /* dropout factors of the row's keys (1 without dropout) */
    const struct ksm_op_dropout *drop = op->p.sdpa.drop.p > 0.0 ? &op->p.sdpa.drop : NULL;
    for (int64_t jj = 0; jj < tk; jj++) fac[jj] = 1.0f;
    for (int64_t bh = begin; bh < end; bh++) {
        const int64_t b = bh / nh, h = bh % nh;
        for (int64_t i = 0; i < tk * hd; i++) dk[i] = dv[i] = 0.0;
        for (int64_t i = 0; i < tq; i++) {
            const float *qi = at(qt, b, h, i), *doi = at(dot, b, h, i);
            const int64_t last = op->p.sdpa.causal ? i + tk - tq : tk - 1; /* inclusive */
            double m = -INFINITY;
            for (int64_t jj = 0; jj <= last; jj++) {
                const float *kj = at(kt, b, h, jj);
                double s = 0.0;
                for (int64_t d = 0; d < hd; d++) s += (double)qi[d] * kj[d];
                p[jj] = s * scale;
                if (p[jj] > m) m = p[jj];
            }
            /* e^(s - m) in double (cpu_math.h; terms below e^-700 vanish in the sum), a loop
             * the compiler vectorises, then summed in key order */
            for (int64_t jj = 0; jj <= last; jj++) p[jj] = ksm_cpu_exp_d_neg(p[jj] - m);
            double sum = 0.0;
            for (int64_t jj = 0; jj <= last; jj++) sum += p[jj];
            if (drop) {
                for (int64_t jj = 0; jj <= last; jj++) fac[jj] = 1.0f;
                ksm_cpu_dropout_apply(fac, last + 1, drop, (uint64_t)((bh * tq + i) * tk));
            }
            /* out_i = sum_j p_j f_j v_j: dp_j = f_j (dout_i . v_j) */
            double dsum = 0.0;
            for (int64_t jj = 0; jj <= last; jj++) {
                const float *vj = at(vt, b, h, jj);
                double s = 0.0;
                for (int64_t d = 0; d < hd; d++) s += (double)doi[d] * vj[d];
                p[jj] /= sum;
                dp[jj] = s * fac[jj];
                dsum += p[jj] * dp[jj];
            }
            for (int64_t d = 0; d < hd; d++) dq[d] = 0.0;
            for (int64_t jj = 0; jj <= last; jj++) {
                const double ds = p[jj] * (dp[jj] - dsum) * scale;
                const double pf = p[jj] * fac[jj];
                const float *kj = at(kt, b, h, jj);
                double *dkj = dk + jj * hd, *dvj = dv + jj * hd;
                for (int64_t d = 0; d < hd; d++) {
                    dq[d] += ds * kj[d];
                    dkj[d] += ds * qi[d];
                    dvj[d] += pf * doi[d];
                }
            }
            float *dqi = (float *)at(dqt, b, h, i);
            for (int64_t d = 0; d < hd; d++) dqi[d] = (float)dq[d];
        }
        for (int64_t jj = 0; jj < tk; jj++) {
            float *dkj = (float *)at(dkt, b, h, jj), *dvj = (float *)at(dvt, b, h, jj);
            for (int64_t d = 0; d < hd; d++) {
                dkj[d] = (float)dk[jj * hd + d];
                dvj[d] = (float)dv[jj * hd + d];
            }
        }
    }
}

int ksm_cpu_exec_sdpa_backward(const struct ksm_op *op)
{
    const ksm_tensor *qt = &op->src[1], *kt = &op->src[2];
    const int64_t bh = qt->shape[0] * qt->shape[1], tk = kt->shape[2], hd = qt->shape[3];
    if (bh == 0 || tk == 0) return 0; /* tk == 0 only with tq == 0 (ops checked) */
    /* the factors' tk floats take (tk + 1) / 2 doubles */
    struct sdpa_bw_job j = {.op = op, .per_slot = 2 * tk * hd + 2 * tk + hd + (tk + 1) / 2};
    int slots = ksm_cpu_pool_threads();
    if (slots > KSM_CPU_MAX_THREADS) slots = KSM_CPU_MAX_THREADS;
    if (slots > bh) slots = (int)bh;
    if (slots < 1) slots = 1;
    j.scratch = malloc(sizeof(double) * (size_t)(j.per_slot * slots));
    if (!j.scratch) return KSM_ENOMEM;
    ksm_cpu_parallel_for_slots(bh, 1, slots, sdpa_bw_heads, &j);
    free(j.scratch);
    return 0;
}
