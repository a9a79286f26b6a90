/*
 * CUDA backend: the backward of scaled dot-product attention (KSM_OP_SDPA's causal rule and
 * scale), the counterpart of cpu_attention_backward.c, in double like it.
 *
 * Kernel 1, one warp per query row i (lanes over the head dims, hd <= 256 = 8 per lane): the
 * scores s_j = scale q_i . k_j over the visible keys, their maximum m_i and sum_i of exp(s_j -
 * m_i), D_i = sum_j p_j dp_j with dp_j = dout_i . v_j, and dq_i = scale sum_j p_j (dp_j - D_i) k_j;
 * (m_i, sum_i, D_i) go to scratch. Kernel 2, one warp per key j: dk_j = scale sum_i ds_ij q_i and
 * dv_j = sum_i p_ij dout_i over the rows that see j, in row order, with p and ds recomputed from
 * the row statistics. Every sum has a fixed order (no atomics); a key no row sees gets 0.
 * Attention dropout (p.sdpa.drop): f_ij (kmath.h) scales p_ij where it weights v_j, so
 * dp_ij = f_ij dout_i . v_j (in D_i and ds_ij) and dv_j gathers p_ij f_ij dout_i.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int AB_WARPS = 4;
static constexpr int AB_PER_LANE = KSM_SDPA_MAX_HEAD_DIM / 32;

struct sdpa_bw_args {
    const float *dout, *q, *k, *v;
    float *dq, *dk, *dv;
    int64_t s_do[3], s_q[3], s_k[3], s_v[3], s_dq[3], s_dk[3], s_dv[3]; /* b, h, t strides */
    int64_t nh, tq, tk, hd, nrows_q, nrows_k;
    double scale;
    int causal;
    double *stats; /* [B * H * Tq][3]: m, sum, D */
    /* attention dropout: f_ij scales p_ij where it weights v_j (1 without dropout) */
    int has_drop;
    struct ksm_op_dropout drop;
    uint32_t drop_thr;
    float drop_scale;
};

/* The dropout factor of weight (bh, i, j). */
__device__ __forceinline__ double drop_f(const sdpa_bw_args &a, int64_t bh, int64_t i, int64_t j)
{
    if (!a.has_drop) return 1.0;
    return (double)ksm_dropout_factor(a.drop.seed, a.drop.step, a.drop.site,
                                      (uint64_t)((bh * a.tq + i) * a.tk + j), a.drop_thr,
                                      a.drop_scale);
}

__device__ __forceinline__ double warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ const float *row_at(const float *base, const int64_t *st, int64_t b,
                                               int64_t h, int64_t i)
{
    return base + b * st[0] + h * st[1] + i * st[2];
}

/* dot of a lane's registers with row r (lanes over dims), in double, summed over the warp */
__device__ __forceinline__ double dot_row(const float *reg, const float *r, int lane, int64_t hd)
{
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) {
        const int64_t d = lane + 32 * k;
        if (d < hd) s += (double)reg[k] * (double)r[d];
    }
    return warp_sum_d(s);
}

__global__ void sdpa_bw_rows_k(sdpa_bw_args a)
{
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * AB_WARPS + (threadIdx.x >> 5);
    if (row >= a.nrows_q) return; /* whole warps leave together */
    const int64_t i = row % a.tq, bh = row / a.tq, b = bh / a.nh, h = bh % a.nh;
    float qi[AB_PER_LANE], doi[AB_PER_LANE];
    const float *qr = row_at(a.q, a.s_q, b, h, i), *dor = row_at(a.dout, a.s_do, b, h, i);
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) {
        const int64_t d = lane + 32 * k;
        qi[k] = d < a.hd ? qr[d] : 0.0f;
        doi[k] = d < a.hd ? dor[d] : 0.0f;
    }
    const int64_t last = a.causal ? i + a.tk - a.tq : a.tk - 1; /* inclusive */
    double m = -INFINITY;
    for (int64_t j = 0; j <= last; ++j) {
        const double s = dot_row(qi, row_at(a.k, a.s_k, b, h, j), lane, a.hd) * a.scale;
        if (s > m) m = s;
    }
    double sum = 0.0;
    for (int64_t j = 0; j <= last; ++j)
        sum += exp(dot_row(qi, row_at(a.k, a.s_k, b, h, j), lane, a.hd) * a.scale - m);
    double dsum = 0.0;
    for (int64_t j = 0; j <= last; ++j) {
        const double p =
            exp(dot_row(qi, row_at(a.k, a.s_k, b, h, j), lane, a.hd) * a.scale - m) / sum;
        dsum += p * drop_f(a, bh, i, j) * dot_row(doi, row_at(a.v, a.s_v, b, h, j), lane, a.hd);
    }
    double dq[AB_PER_LANE];
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) dq[k] = 0.0;
    for (int64_t j = 0; j <= last; ++j) {
        const float *kj = row_at(a.k, a.s_k, b, h, j);
        const double p = exp(dot_row(qi, kj, lane, a.hd) * a.scale - m) / sum;
        const double ds =
            p *
            (drop_f(a, bh, i, j) * dot_row(doi, row_at(a.v, a.s_v, b, h, j), lane, a.hd) - dsum) *
            a.scale;
#pragma unroll
        for (int k = 0; k < AB_PER_LANE; ++k) {
            const int64_t d = lane + 32 * k;
            if (d < a.hd) dq[k] += ds * kj[d];
        }
    }
    float *dqr = (float *)row_at(a.dq, a.s_dq, b, h, i);
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) {
        const int64_t d = lane + 32 * k;
        if (d < a.hd) dqr[d] = (float)dq[k];
    }
    if (lane == 0) {
        a.stats[row * 3 + 0] = m;
        a.stats[row * 3 + 1] = sum;
        a.stats[row * 3 + 2] = dsum;
    }
}

__global__ void sdpa_bw_keys_k(sdpa_bw_args a)
{
    const int lane = threadIdx.x & 31;
    const int64_t key = (int64_t)blockIdx.x * AB_WARPS + (threadIdx.x >> 5);
    if (key >= a.nrows_k) return;
    const int64_t j = key % a.tk, bh = key / a.tk, b = bh / a.nh, h = bh % a.nh;
    float kj[AB_PER_LANE], vj[AB_PER_LANE];
    const float *kr = row_at(a.k, a.s_k, b, h, j), *vr = row_at(a.v, a.s_v, b, h, j);
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) {
        const int64_t d = lane + 32 * k;
        kj[k] = d < a.hd ? kr[d] : 0.0f;
        vj[k] = d < a.hd ? vr[d] : 0.0f;
    }
    double dk[AB_PER_LANE], dv[AB_PER_LANE];
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) dk[k] = dv[k] = 0.0;
    /* rows that see j: all, or (causal) i + tk - tq >= j */
    int64_t i0 = a.causal ? j - a.tk + a.tq : 0;
    if (i0 < 0) i0 = 0;
    for (int64_t i = i0; i < a.tq; ++i) {
        const float *qi = row_at(a.q, a.s_q, b, h, i), *doi = row_at(a.dout, a.s_do, b, h, i);
        const double *st = a.stats + (bh * a.tq + i) * 3;
        const double p = exp(dot_row(kj, qi, lane, a.hd) * a.scale - st[0]) / st[1];
        const double f = drop_f(a, bh, i, j);
        const double ds = p * (f * dot_row(vj, doi, lane, a.hd) - st[2]) * a.scale;
        const double pf = p * f;
#pragma unroll
        for (int k = 0; k < AB_PER_LANE; ++k) {
            const int64_t d = lane + 32 * k;
            if (d < a.hd) {
                dk[k] += ds * qi[d];
                dv[k] += pf * doi[d];
            }
        }
    }
    float *dkr = (float *)row_at(a.dk, a.s_dk, b, h, j),
          *dvr = (float *)row_at(a.dv, a.s_dv, b, h, j);
#pragma unroll
    for (int k = 0; k < AB_PER_LANE; ++k) {
        const int64_t d = lane + 32 * k;
        if (d < a.hd) {
            dkr[d] = (float)dk[k];
            dvr[d] = (float)dv[k];
        }
    }
}

static void strides3(int64_t *out, const ksm_tensor *t)
{
    for (int d = 0; d < 3; ++d) out[d] = t->stride[d];
}

static unsigned warps_grid(int64_t n) { return (unsigned)((n + AB_WARPS - 1) / AB_WARPS); }

int launch_attention_backward(stream_ctx *sc, const struct ksm_op *op)
{
    if (op->type != KSM_OP_SDPA_BACKWARD) return KSM_EUNSUPPORTED;
    const ksm_tensor *qt = &op->src[1], *kt = &op->src[2];
    sdpa_bw_args a;
    memset(&a, 0, sizeof a);
    a.dout = (const float *)op->src[0].data;
    a.q = (const float *)qt->data;
    a.k = (const float *)kt->data;
    a.v = (const float *)op->src[3].data;
    a.dq = (float *)op->dst.data;
    a.dk = (float *)op->src[4].data;
    a.dv = (float *)op->src[5].data;
    strides3(a.s_do, &op->src[0]);
    strides3(a.s_q, qt);
    strides3(a.s_k, kt);
    strides3(a.s_v, &op->src[3]);
    strides3(a.s_dq, &op->dst);
    strides3(a.s_dk, &op->src[4]);
    strides3(a.s_dv, &op->src[5]);
    a.nh = qt->shape[1];
    a.tq = qt->shape[2];
    a.tk = kt->shape[2];
    a.hd = qt->shape[3];
    const int64_t bh = qt->shape[0] * qt->shape[1];
    a.nrows_q = bh * a.tq;
    a.nrows_k = bh * a.tk;
    a.scale = op->p.sdpa.scale;
    a.causal = op->p.sdpa.causal;
    a.drop = op->p.sdpa.drop;
    a.has_drop = a.drop.p > 0.0;
    a.drop_thr = ksm_dropout_threshold(a.drop.p);
    a.drop_scale = ksm_dropout_scale(a.drop.p);
    if (bh == 0 || a.tk == 0) return 0;
    if (a.hd > KSM_SDPA_MAX_HEAD_DIM) return KSM_EUNSUPPORTED;
    if ((a.nrows_q + AB_WARPS - 1) / AB_WARPS > INT32_MAX ||
        (a.nrows_k + AB_WARPS - 1) / AB_WARPS > INT32_MAX)
        return KSM_EUNSUPPORTED;
    void *scratch = nullptr;
    int rc = scratch_alloc(sc, sizeof(double) * 3 * (size_t)a.nrows_q, &scratch);
    if (rc != 0) return rc;
    a.stats = (double *)scratch;
    if (a.nrows_q > 0) {
        sdpa_bw_rows_k<<<warps_grid(a.nrows_q), AB_WARPS * 32, 0, sc->stream>>>(a);
        KSM_CUDA_LAUNCH_CHECK(sc, "sdpa_backward");
    }
    sdpa_bw_keys_k<<<warps_grid(a.nrows_k), AB_WARPS * 32, 0, sc->stream>>>(a);
    KSM_CUDA_LAUNCH_CHECK(sc, "sdpa_backward");
    return scratch_free(sc, scratch);
}

} // namespace ksm_cuda
