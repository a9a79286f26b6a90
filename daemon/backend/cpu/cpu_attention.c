/*
 * CPU kernels: scaled dot-product attention (blocks of queries on sgemm with an online softmax
 * over key chunks; a row path for small problems). Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"
#include "backend/cpu/cpu_blas.h"

/* ---- Attention ----
 *
 * Blocks of SDPA_QB query rows of one (batch, head), each a task, with an online softmax
 * (flash-style) over chunks of SDPA_KC keys: the chunk's scores S = scale * Q K^T by one sgemm
 * into a stack buffer, per row the chunk maximum, one rescale of the running sum l (double) and
 * of the output rows accumulated so far, P = e^(S - m) in place, then O += P V by one sgemm
 * over the keys every row of the block sees. Under the causal mask the block's last SDPA_QB - 1
 * keys are seen by some rows only: their scores are computed but never used, and their values
 * are accumulated row by row, so a masked key's value (even a NaN) never reaches a row that
 * does not see it. The output rows are the accumulator; no workspace. The blocking is a pure
 * function of the shapes, so results do not depend on the number of threads.
 *
 * With attention dropout (p.sdpa.drop) each term, once it has joined its row's sum l, is
 * multiplied by its dropout factor before it weights v (kmath.h; nn/op.h).
 *
 * Views whose row strides an sgemm cannot take (a row stride below the head dim) go one query
 * row at a time instead (sdpa_row: online softmax over blocks of SDPA_KEY_BLOCK keys, dot
 * products with eight partial sums).
 */
enum { SDPA_KEY_BLOCK = 64, SDPA_QB = 64, SDPA_KC = 256 };

static float dot_f32(const float *KSM_RESTRICT a, const float *KSM_RESTRICT b, int64_t n)
{
    float s[8] = {0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int k = 0; k < 8; k++) s[k] += a[d + k] * b[d + k];
    float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; d < n; d++) r += a[d] * b[d];
    return r;
}

/* One query row; drop (NULL: none) scales each term after it joined the softmax sum, n0 the
 * mask element of key 0 of this row. */
static void sdpa_row(const float *KSM_RESTRICT qr, const float *kb, int64_t ks, const float *vb,
                     int64_t vs, int64_t nkeys, int64_t hd, float scale, float *KSM_RESTRICT out,
                     const struct ksm_op_dropout *drop, uint64_t n0)
{
    float acc[KSM_SDPA_MAX_HEAD_DIM];
    float sc[SDPA_KEY_BLOCK];
    float m = -INFINITY;
    double l = 0.0;
    for (int64_t d = 0; d < hd; d++) acc[d] = 0.0f;
    for (int64_t j0 = 0; j0 < nkeys; j0 += SDPA_KEY_BLOCK) {
        int64_t nb = nkeys - j0 < SDPA_KEY_BLOCK ? nkeys - j0 : SDPA_KEY_BLOCK;
        float bm = -INFINITY;
        for (int64_t j = 0; j < nb; j++) {
            sc[j] = dot_f32(qr, kb + (j0 + j) * ks, hd) * scale;
            if (sc[j] > bm) bm = sc[j]; /* a NaN score never wins here but poisons its p below */
        }
        if (bm > m) { /* rescale what was accumulated under the old maximum (0 at first) */
            const float corr = ksm_cpu_expf(m - bm);
            l *= corr;
            for (int64_t d = 0; d < hd; d++) acc[d] *= corr;
            m = bm;
        }
        for (int64_t j = 0; j < nb; j++) sc[j] = ksm_cpu_expf(sc[j] - m);
        for (int64_t j = 0; j < nb; j++) l += sc[j];
        if (drop) ksm_cpu_dropout_apply(sc, nb, drop, n0 + (uint64_t)j0);
        for (int64_t j = 0; j < nb; j++) {
            const float p = sc[j];
            const float *KSM_RESTRICT vr = vb + (j0 + j) * vs;
            int64_t d = 0;
            for (; d + 8 <= hd; d += 8) /* fixed-width blocks vectorise at -O2 */
                for (int k = 0; k < 8; k++) acc[d + k] += p * vr[d + k];
            for (; d < hd; d++) acc[d] += p * vr[d];
        }
    }
    const float inv = (float)(1.0 / l);
    for (int64_t d = 0; d < hd; d++) out[d] = acc[d] * inv;
}

/* Query rows [b, e) of all (batch, head) pairs, row r = (b * H + h) * Tq + i. */
static void sdpa_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2], *o = &op->dst;
    const int64_t nh = q->shape[1], tq = q->shape[2], hd = q->shape[3], tk = k->shape[2];
    for (int64_t r = b; r < e; r++) {
        const int64_t i = r % tq, h = r / tq % nh, bi = r / tq / nh;
        const float *qb = (const float *)q->data + bi * q->stride[0] + h * q->stride[1];
        const float *kb = (const float *)k->data + bi * k->stride[0] + h * k->stride[1];
        const float *vb = (const float *)v->data + bi * v->stride[0] + h * v->stride[1];
        float *ob = (float *)o->data + bi * o->stride[0] + h * o->stride[1];
        int64_t nkeys = op->p.sdpa.causal ? i + (tk - tq) + 1 : tk;
        if (nkeys > tk) nkeys = tk;
        const struct ksm_op_dropout *drop = op->p.sdpa.drop.p > 0.0 ? &op->p.sdpa.drop : NULL;
        sdpa_row(qb + i * q->stride[2], kb, k->stride[2], vb, v->stride[2], nkeys, hd,
                 op->p.sdpa.scale, ob + i * o->stride[2], drop, (uint64_t)(r * tk));
    }
}

/* Row stride of t[.., T, hd] for an sgemm: its stride of dim 2, any value >= hd when T is 1;
 * 0 when an sgemm cannot use it (below hd). */
static int64_t sdpa_ld(const ksm_tensor *t)
{
    const int64_t hd = t->shape[3];
    const int64_t ld = t->shape[2] > 1 ? t->stride[2] : hd;
    return ld >= hd && ld <= INT32_MAX ? ld : 0;
}

/* Exponents below this give subnormal floats, which cost a microcode assist each: such terms
 * (< 1.2e-38 of the row maximum's) are flushed to 0 instead. */
#define SDPA_EXP_FLUSH (-87.33654f)

/* e^t of a score minus the row maximum: 0 below SDPA_EXP_FLUSH (-inf included), NaN for a
 * NaN. */
static inline float sdpa_term(float t)
{
    uint32_t p = ksm_cm_fbits(ksm_cpu_expf_normal(ksm_cm_clampf(t, SDPA_EXP_FLUSH, 0.0f)));
    p &= 0u - (uint32_t) !(t < SDPA_EXP_FLUSH);
    return ksm_cm_bitsf(ksm_cm_nan_from(p, ksm_cm_fbits(t)));
}

/* e^(x[j] - m) in place for j < n (-inf scores give 0); returns their sum in double. A NaN
 * score gives a NaN term. */
KSM_VEC_CLONES
static double sdpa_exp_row(float *KSM_RESTRICT x, int64_t n, float m)
{
    double s16[16] = {0}, s = 0.0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++) {
            const float t = x[j + k] - m;
            const float p = sdpa_term(t);
            x[j + k] = p;
            s16[k] += (double)p;
        }
    for (; j < n; j++) {
        const float t = x[j] - m;
        x[j] = sdpa_term(t);
        s += (double)x[j];
    }
    for (int k = 0; k < 16; k++) s += s16[k];
    return s;
}

/* y[0, n) += sum over j < nj of p[j] * (row j of x, row stride ldx), j in order, 64 columns at
 * a time kept in registers. */
KSM_VEC_CLONES
static void axpy_rows(float *KSM_RESTRICT y, const float *KSM_RESTRICT x, int64_t ldx,
                      const float *KSM_RESTRICT p, int64_t nj, int64_t n)
{
    int64_t d = 0;
    for (; d + 64 <= n; d += 64) {
        float acc[64];
        for (int k = 0; k < 64; k++) acc[k] = y[d + k];
        for (int64_t j = 0; j < nj; j++) {
            const float pj = p[j];
            const float *xr = x + j * ldx + d;
            for (int k = 0; k < 64; k++) acc[k] += pj * xr[k];
        }
        for (int k = 0; k < 64; k++) y[d + k] = acc[k];
    }
    for (; d < n; d++) {
        float a = y[d];
        for (int64_t j = 0; j < nj; j++) a += p[j] * x[j * ldx + d];
        y[d] = a;
    }
}

/* y[0, n) *= a. */
static void scale_f32(float *y, int64_t n, float a)
{
    for (int64_t d = 0; d < n; d++) y[d] *= a;
}

struct sdpa_job {
    const struct ksm_op *op;
    int64_t nblk;               /* query blocks per (batch, head) */
    int64_t ldq, ldk, ldv, ldo; /* row strides */
};

/* Tasks [b, e): task = (bi * H + h) * nblk + block. */
KSM_VEC_CLONES
static void sdpa_blocks(void *ctx, int64_t b, int64_t e)
{
    const struct sdpa_job *j = ctx;
    const struct ksm_op *op = j->op;
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2], *o = &op->dst;
    const int64_t nh = q->shape[1], tq = q->shape[2], hd = q->shape[3], tk = k->shape[2];
    const bool causal = op->p.sdpa.causal;
    const struct ksm_op_dropout *drop = op->p.sdpa.drop.p > 0.0 ? &op->p.sdpa.drop : NULL;
    const int64_t off = causal ? tk - tq : 0; /* row i sees keys j <= i + off */
    float sbuf[SDPA_QB * SDPA_KC];
    float m[SDPA_QB];
    double l[SDPA_QB];
    for (int64_t t = b; t < e; t++) {
        const int64_t blk = t % j->nblk, bh = t / j->nblk, h = bh % nh, bi = bh / nh;
        const int64_t i0 = blk * SDPA_QB, mb = tq - i0 < SDPA_QB ? tq - i0 : SDPA_QB;
        const float *qb =
            (const float *)q->data + bi * q->stride[0] + h * q->stride[1] + i0 * j->ldq;
        const float *kb = (const float *)k->data + bi * k->stride[0] + h * k->stride[1];
        const float *vb = (const float *)v->data + bi * v->stride[0] + h * v->stride[1];
        float *ob = (float *)o->data + bi * o->stride[0] + h * o->stride[1] + i0 * j->ldo;
        /* keys the block's last row sees, and those every row sees */
        const int64_t nk = causal ? i0 + mb + off : tk, full = causal ? i0 + 1 + off : tk;
        for (int64_t r = 0; r < mb; r++) {
            m[r] = -INFINITY;
            l[r] = 0.0;
            memset(ob + r * j->ldo, 0, (size_t)hd * sizeof(float));
        }
        for (int64_t c0 = 0; c0 < nk; c0 += SDPA_KC) {
            const int64_t kn = nk - c0 < SDPA_KC ? nk - c0 : SDPA_KC;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)mb, (int)kn, (int)hd,
                        op->p.sdpa.scale, qb, (int)j->ldq, kb + c0 * j->ldk, (int)j->ldk, 0.0f,
                        sbuf, SDPA_KC);
            for (int64_t r = 0; r < mb; r++) {
                float *sr = sbuf + r * SDPA_KC;
                int64_t n = causal ? i0 + r + off + 1 - c0 : kn; /* keys of the chunk row r sees */
                n = n < kn ? n : kn;
                if (n <= 0) { /* none in this chunk */
                    memset(sr, 0, (size_t)kn * sizeof(float));
                    continue;
                }
                /* masked scores: -inf (a NaN key there must not poison the row), so every row
                 * of the block runs the same vector loops */
                for (int64_t jj = n; jj < kn; jj++) sr[jj] = -INFINITY;
                /* a NaN maximum (ksm_cpu_row_max returns the first NaN) poisons the row, as the NaN
                 * score's own term would */
                const float bm = ksm_cpu_row_max(sr, n);
                if (bm > m[r]) {
                    if (m[r] > -INFINITY) { /* rescale what the old maximum accumulated */
                        const float corr = ksm_cpu_expf(m[r] - bm);
                        l[r] *= corr;
                        scale_f32(ob + r * j->ldo, hd, corr);
                    }
                    m[r] = bm;
                }
                l[r] += sdpa_exp_row(sr, kn, m[r]);
                if (drop) /* after the sum: dropout scales the normalised weights */
                    ksm_cpu_dropout_apply(sr, n, drop, (uint64_t)((bh * tq + i0 + r) * tk + c0));
            }
            /* keys [c0, c0 + kf) are seen by every row: one sgemm; the rest row by row */
            const int64_t kf = full - c0 < kn ? (full - c0 > 0 ? full - c0 : 0) : kn;
            if (kf > 0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)mb, (int)hd, (int)kf,
                            1.0f, sbuf, SDPA_KC, vb + c0 * j->ldv, (int)j->ldv, 1.0f, ob,
                            (int)j->ldo);
            for (int64_t r = 0; r < mb && kf < kn; r++) {
                int64_t n = causal ? i0 + r + off + 1 - c0 : kn;
                n = n < kn ? n : kn;
                if (n > kf)
                    axpy_rows(ob + r * j->ldo, vb + (c0 + kf) * j->ldv, j->ldv,
                              sbuf + r * SDPA_KC + kf, n - kf, hd);
            }
        }
        for (int64_t r = 0; r < mb; r++) scale_f32(ob + r * j->ldo, hd, (float)(1.0 / l[r]));
    }
}

int ksm_cpu_exec_sdpa(const struct ksm_op *op)
{
    const ksm_tensor *q = &op->src[0], *k = &op->src[1], *v = &op->src[2];
    const int64_t bh = q->shape[0] * q->shape[1], tq = q->shape[2], hd = q->shape[3];
    const int64_t tk = k->shape[2];
    if (bh == 0 || tq == 0) return 0;
    struct sdpa_job j = {.op = op, .nblk = (tq + SDPA_QB - 1) / SDPA_QB};
    j.ldq = sdpa_ld(q);
    j.ldk = sdpa_ld(k);
    j.ldv = sdpa_ld(v);
    j.ldo = sdpa_ld(&op->dst);
    if (j.ldq == 0 || j.ldk == 0 || j.ldv == 0 || j.ldo == 0) {
        ksm_cpu_parallel_for(bh * tq, ksm_cpu_grain(2 * tk * hd), sdpa_rows, (void *)op);
        return 0;
    }
    ksm_cpu_parallel_for(bh * j.nblk, 1, sdpa_blocks, &j);
    return 0;
}
