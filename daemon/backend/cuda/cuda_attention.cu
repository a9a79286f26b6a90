/*
 * CUDA backend: scaled dot-product attention (KSM_OP_SDPA).
 *
 * One warp per query row (b, h, i); a block holds SDPA_WARPS consecutive queries of the same
 * (b, h) and walks the keys in tiles that the whole block stages in shared memory. Within a
 * tile each lane scores one key (a sequential dot product over head_dim, like the CPU), the
 * warp takes the tile maximum and sum with shuffles, and the running output (each lane owns
 * head_dim/32 of its dimensions, in registers) is rescaled with the online-softmax correction
 * exp(m_old - m_new). The result is acc / l. head_dim <= 256 (KSM_SDPA_MAX_HEAD_DIM).
 *
 * Causal: query i sees keys j <= i + (Tk - Tq). A block stops loading tiles after the last key
 * its last query can see. A query that sees no key gets 0/0 = NaN, as PyTorch.
 * q, k, v and dst are strided (stride 1 in the last dim), so views into a fused QKV projection
 * and a [B, T, H, hd] output need no copies. Attention dropout (p.sdpa.drop) scales each weight
 * by its mask factor (kmath.h) once it has joined the softmax sum, as the CPU kernel does.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int SDPA_WARPS = 8;
static constexpr int SDPA_MAX_PER_LANE = KSM_SDPA_MAX_HEAD_DIM / 32;

struct sdpa_args {
    const float *q, *k, *v;
    float *o;
    int64_t qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2, os0, os1, os2;
    int64_t B, H, Tq, Tk;
    int hd, hdp, kt, causal;
    float scale;
    /* attention dropout (drop.p > 0): the weight of key j in row (b, h, i) is scaled by the
     * factor of mask element ((b * H + h) * Tq + i) * Tk + j after it joined the sum l */
    int has_drop;
    struct ksm_op_dropout drop;
    uint32_t drop_thr;
    float drop_scale;
};

__global__ void __launch_bounds__(SDPA_WARPS * 32) sdpa_k(sdpa_args a)
{
    extern __shared__ float smem[];
    float *ks = smem;                   /* [kt][hdp] (padded: conflict-free dots) */
    float *vs = ks + a.kt * a.hdp;      /* [kt][hd] */
    float *qs = vs + a.kt * a.hd;       /* [SDPA_WARPS][hd] */
    float *ps = qs + SDPA_WARPS * a.hd; /* [SDPA_WARPS][32] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hd = a.hd;
    const int64_t qblocks = (a.Tq + SDPA_WARPS - 1) / SDPA_WARPS;
    const int64_t nblk = a.B * a.H * qblocks;
    const int64_t koff = a.Tk - a.Tq;

    for (int64_t blk = blockIdx.x; blk < nblk; blk += gridDim.x) {
        const int64_t qb = blk % qblocks, bh = blk / qblocks;
        const int64_t h = bh % a.H, b = bh / a.H;
        const int64_t i = qb * SDPA_WARPS + warp;
        const bool active = i < a.Tq;
        const int64_t lim = a.causal ? i + koff : a.Tk - 1; /* last key this query sees */
        int64_t ilast = qb * SDPA_WARPS + SDPA_WARPS - 1;
        if (ilast > a.Tq - 1) ilast = a.Tq - 1;
        int64_t kend = a.causal ? ilast + koff + 1 : a.Tk;
        if (kend > a.Tk) kend = a.Tk;

        __syncthreads(); /* the previous iteration is done with shared memory */
        if (active) {
            const float *qp = a.q + b * a.qs0 + h * a.qs1 + i * a.qs2;
            for (int d = lane; d < hd; d += 32) qs[warp * hd + d] = qp[d];
        }
        const float *kb = a.k + b * a.ks0 + h * a.ks1;
        const float *vb = a.v + b * a.vs0 + h * a.vs1;

        float m = -INFINITY, l = 0.0f;
        float acc[SDPA_MAX_PER_LANE];
#pragma unroll
        for (int t = 0; t < SDPA_MAX_PER_LANE; ++t) acc[t] = 0.0f;

        for (int64_t t0 = 0; t0 < kend; t0 += a.kt) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < a.kt * hd; idx += blockDim.x) {
                int j = idx / hd, d = idx - j * hd;
                int64_t key = t0 + j;
                float kv = 0.0f, vv = 0.0f;
                if (key < a.Tk) {
                    kv = kb[key * a.ks2 + d];
                    vv = vb[key * a.vs2 + d];
                }
                ks[j * a.hdp + d] = kv;
                vs[j * hd + d] = vv;
            }
            __syncthreads();
            if (!active || t0 > lim) continue; /* warp-uniform; no barrier below */

            /* Keys t0 .. t0 + nvis - 1 of this tile are visible to this query (nvis >= 1
             * here: t0 <= lim <= Tk - 1). The others must not be touched at all: 0 * V of a
             * masked key is NaN when V holds Inf/NaN there, and the CPU never reads it. */
            const int64_t vis = lim - t0 + 1;
            const int nvis = vis < a.kt ? (int)vis : a.kt;
            const bool valid = lane < nvis;
            float s = -INFINITY;
            if (valid) {
                const float *kr = ks + lane * a.hdp;
                const float *qr = qs + warp * hd;
                float dot = 0.0f;
                for (int d = 0; d < hd; ++d) dot += qr[d] * kr[d];
                s = dot * a.scale;
            }
            /* No "all -inf: skip the tile" shortcut: fmaxf drops NaN, so a tile whose visible
             * scores are all NaN would be skipped, while on the CPU a NaN score poisons the
             * row (here: p = NaN, or corr = NaN when m and tmax are both -inf). */
            const float tmax = warp_max(s);
            const float mn = fmaxf(m, tmax);
            const float corr = expf(m - mn); /* m = -inf on the first tile: 0 */
            const float p = valid ? expf(s - mn) : 0.0f;
            l = l * corr + warp_sum(p);
            float pw_l = p;
            if (a.has_drop && valid)
                pw_l *= ksm_dropout_factor(a.drop.seed, a.drop.step, a.drop.site,
                                           (uint64_t)((bh * a.Tq + i) * a.Tk + t0 + lane),
                                           a.drop_thr, a.drop_scale);
            ps[warp * 32 + lane] = pw_l;
            __syncwarp();
            const float *pw = ps + warp * 32;
#pragma unroll
            for (int t = 0; t < SDPA_MAX_PER_LANE; ++t) {
                const int d = lane + 32 * t;
                if (d < hd) {
                    float o = acc[t] * corr;
                    for (int jj = 0; jj < nvis; ++jj) o += pw[jj] * vs[jj * hd + d];
                    acc[t] = o;
                }
            }
            __syncwarp();
            m = mn;
        }

        if (active) {
            float *op = a.o + b * a.os0 + h * a.os1 + i * a.os2;
#pragma unroll
            for (int t = 0; t < SDPA_MAX_PER_LANE; ++t) {
                const int d = lane + 32 * t;
                if (d < hd) op[d] = acc[t] / l;
            }
        }
    }
}

int launch_attention(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2], *o = &op->dst;
    if (o->ndim != 4) return KSM_EUNSUPPORTED;
    sdpa_args a;
    a.q = (const float *)q->data;
    a.k = (const float *)k->data;
    a.v = (const float *)v->data;
    a.o = (float *)o->data;
    a.qs0 = q->stride[0], a.qs1 = q->stride[1], a.qs2 = q->stride[2];
    a.ks0 = k->stride[0], a.ks1 = k->stride[1], a.ks2 = k->stride[2];
    a.vs0 = v->stride[0], a.vs1 = v->stride[1], a.vs2 = v->stride[2];
    a.os0 = o->stride[0], a.os1 = o->stride[1], a.os2 = o->stride[2];
    a.B = o->shape[0];
    a.H = o->shape[1];
    a.Tq = q->shape[2];
    a.Tk = k->shape[2];
    a.hd = (int)q->shape[3];
    if (a.hd <= 0 || a.hd > KSM_SDPA_MAX_HEAD_DIM) return KSM_EUNSUPPORTED;
    a.hdp = (a.hd % 2 == 0) ? a.hd + 1 : a.hd;
    a.kt = a.hd <= 128 ? 32 : 16;
    a.causal = op->p.sdpa.causal != 0;
    a.scale = op->p.sdpa.scale > 0.0f ? op->p.sdpa.scale : 1.0f / sqrtf((float)a.hd);
    a.drop = op->p.sdpa.drop;
    a.has_drop = a.drop.p > 0.0;
    a.drop_thr = ksm_dropout_threshold(a.drop.p);
    a.drop_scale = ksm_dropout_scale(a.drop.p);
    size_t smem = sizeof(float) * ((size_t)a.kt * a.hdp + (size_t)a.kt * a.hd +
                                   (size_t)SDPA_WARPS * a.hd + (size_t)SDPA_WARPS * 32);
    int64_t qblocks = (a.Tq + SDPA_WARPS - 1) / SDPA_WARPS;
    int64_t nblk = a.B * a.H * qblocks;
    if (nblk <= 0) return 0;
    unsigned grid = (unsigned)(nblk > ((int64_t)1 << 30) ? ((int64_t)1 << 30) : nblk);
    sdpa_k<<<grid, SDPA_WARPS * 32, smem, sc->stream>>>(a);
    KSM_CUDA_LAUNCH_CHECK(sc, "sdpa");
    return 0;
}

} // namespace ksm_cuda
