/*
 * Validating wrappers of the norm, convolution and attention backward ops and of train-mode
 * BatchNorm (include/kasmina/ops_backward_nn.h; op contracts in nn/op.h).
 *
 * The checks and error codes are those of ops.c, in the same order (KSM_EINVAL for NULL or
 * misplaced tensors, bad strides and parameters and overlapping outputs; KSM_EDTYPE; KSM_ESHAPE).
 * These ops have several outputs: dst carries the first, and the others travel in source slots
 * marked (out) in op.h. An output the caller does not want is absent (data NULL).
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops_backward_nn.h"
#include "nn/kmath.h"
#include "nn/op.h"

// ---- Tensor helpers (as in ops.c) ----

static int64_t numel_of(const ksm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static bool contiguous(const ksm_tensor *t)
{
    int64_t want = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] == 0) return true;
        if (t->shape[i] != 1 && t->stride[i] != want) return false;
        want *= t->shape[i];
    }
    return true;
}

static void canon_strides(ksm_tensor *t)
{
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->stride[i] = st;
        st *= t->shape[i] > 0 ? t->shape[i] : 1;
    }
}

static void byte_range(const ksm_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    if (t->data == NULL || numel_of(t) == 0) {
        *lo = *hi = 0;
        return;
    }
    int64_t last = 0;
    for (int i = 0; i < t->ndim; i++) last += (t->shape[i] - 1) * t->stride[i];
    *lo = (uintptr_t)t->data;
    *hi = *lo + (uintptr_t)(last + 1) * ksm_dtype_size(t->dtype);
}

static bool overlaps(const ksm_tensor *a, const ksm_tensor *b)
{
    uintptr_t alo, ahi, blo, bhi;
    byte_range(a, &alo, &ahi);
    byte_range(b, &blo, &bhi);
    if (alo == ahi || blo == bhi) return false;
    return alo < bhi && blo < ahi;
}

/* No two index tuples of t address the same element. */
static bool no_self_overlap(const ksm_tensor *t)
{
    int idx[KSM_MAX_DIMS], n = 0;
    if (numel_of(t) == 0) return true;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] > 1) idx[n++] = i;
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && t->stride[idx[j]] < t->stride[idx[j - 1]]; j--) {
            int tmp = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = tmp;
        }
    int64_t extent = 1;
    for (int i = 0; i < n; i++) {
        int d = idx[i];
        if (t->stride[d] < extent) return false;
        extent = t->stride[d] * (t->shape[d] - 1) + extent;
    }
    return true;
}

static int check_tensor(ksm_stream *s, const ksm_tensor *t)
{
    if (t == NULL) return KSM_EINVAL;
    if (t->dev != ksm_stream_device(s)) return KSM_EINVAL;
    if (t->ndim < 0 || t->ndim > KSM_MAX_DIMS) return KSM_ESHAPE;
    if ((int)t->dtype < 0 || (int)t->dtype >= (int)KSM_DTYPE_COUNT) return KSM_EDTYPE;
    int64_t n = 1, span = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0) return KSM_ESHAPE;
        if (t->stride[i] < 0) return KSM_EINVAL;
        if (__builtin_mul_overflow(n, t->shape[i], &n)) return KSM_EINVAL;
    }
    if (n > 0) {
        for (int i = 0; i < t->ndim; i++) {
            int64_t ext;
            if (__builtin_mul_overflow(t->shape[i] - 1, t->stride[i], &ext)) return KSM_EINVAL;
            if (__builtin_add_overflow(span, ext, &span)) return KSM_EINVAL;
        }
        if (span > INT64_MAX / 8) return KSM_EINVAL;
        if (t->data == NULL) return KSM_EINVAL;
    }
    return 0;
}

static bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

static bool eps_ok(float eps) { return isfinite(eps) && eps > 0.0f; }

/* A contiguous F32 vector [n]. */
static int check_vec(ksm_stream *s, const ksm_tensor *t, int64_t n)
{
    int rc = check_tensor(s, t);
    if (rc) return rc;
    if (t->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (t->ndim != 1 || t->shape[0] != n) return KSM_ESHAPE;
    if (!contiguous(t)) return KSM_EINVAL;
    return 0;
}

/* t: a contiguous F32 tensor of ref's shape. */
static int check_like(ksm_stream *s, const ksm_tensor *t, const ksm_tensor *ref)
{
    int rc = check_tensor(s, t);
    if (rc) return rc;
    if (t->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (t->ndim != ref->ndim) return KSM_ESHAPE;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] != ref->shape[i]) return KSM_ESHAPE;
    if (!contiguous(t)) return KSM_EINVAL;
    return 0;
}

/* Outputs (dst and the sources flagged in out_mask) may overlap neither each other nor any
 * input. */
static int check_overlaps(const struct ksm_op *op, unsigned out_mask)
{
    const ksm_tensor *all[KSM_OP_MAX_SRC + 1];
    bool out[KSM_OP_MAX_SRC + 1];
    all[0] = &op->dst;
    out[0] = true;
    for (int i = 0; i < op->n_src; i++) {
        all[i + 1] = &op->src[i];
        out[i + 1] = (out_mask >> i) & 1u;
    }
    for (int i = 0; i <= op->n_src; i++) {
        if (!out[i]) continue;
        for (int j = 0; j <= op->n_src; j++)
            if (j != i && (j > i || !out[j]) && overlaps(all[i], all[j])) return KSM_EINVAL;
    }
    return 0;
}

/* Fills op with dst (absent: data NULL, shape of like) and the n sources (NULL = absent), with
 * canonical strides (every tensor is contiguous here). */
static void pack(struct ksm_op *op, enum ksm_op_type type, const ksm_tensor *dst,
                 const ksm_tensor *like, const ksm_tensor *const *srcs, int n)
{
    memset(op, 0, sizeof *op);
    op->type = type;
    op->n_src = n;
    op->dst = dst ? *dst : *like;
    if (!dst) op->dst.data = NULL;
    op->dst.dtype = KSM_DTYPE_F32;
    canon_strides(&op->dst);
    for (int i = 0; i < n; i++) {
        if (srcs[i] == NULL) continue;
        op->src[i] = *srcs[i];
        canon_strides(&op->src[i]);
    }
}

// ---- BatchNorm2d in train mode ----

int ksm_op_batchnorm_train(ksm_stream *s, ksm_tensor *y, ksm_tensor *save_mean,
                           ksm_tensor *save_invstd, const ksm_tensor *x, const ksm_tensor *weight,
                           const ksm_tensor *bias, ksm_tensor *running_mean,
                           ksm_tensor *running_var, double momentum, float eps)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, x))) return rc;
    if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->ndim < 2) return KSM_ESHAPE;
    if (!contiguous(x)) return KSM_EINVAL;
    const int64_t c = x->shape[1];
    if ((rc = check_like(s, y, x)) || (rc = check_vec(s, save_mean, c)) ||
        (rc = check_vec(s, save_invstd, c)) || (rc = check_vec(s, weight, c)) ||
        (rc = check_vec(s, bias, c)))
        return rc;
    if ((running_mean == NULL) != (running_var == NULL)) return KSM_EINVAL;
    if (running_mean &&
        ((rc = check_vec(s, running_mean, c)) || (rc = check_vec(s, running_var, c))))
        return rc;
    if (!eps_ok(eps) || !isfinite(momentum) || momentum < 0.0 || momentum > 1.0) return KSM_EINVAL;
    if (c > 0 && numel_of(x) / c <= 1) return KSM_ESHAPE; /* one value per channel */
    struct ksm_op op;
    const ksm_tensor *srcs[7] = {x,           weight,    bias,       running_mean,
                                 running_var, save_mean, save_invstd};
    pack(&op, KSM_OP_BATCHNORM_TRAIN, y, x, srcs, 7);
    if ((rc = check_overlaps(&op, 1u << 3 | 1u << 4 | 1u << 5 | 1u << 6))) return rc;
    op.p.bn_train.momentum = momentum;
    op.p.bn_train.eps = eps;
    return ksm_stream_launch(s, &op);
}

// ---- Norm backward ----

/* The shared checks of the three norm backwards: dy and x alike (ndim >= min_ndim), dx like x,
 * weight/dweight/dbias vectors of length pc (weight optional), at least one output. */
static int check_norm_bw(ksm_stream *s, const ksm_tensor *dx, const ksm_tensor *dweight,
                         const ksm_tensor *dbias, const ksm_tensor *dy, const ksm_tensor *x,
                         const ksm_tensor *weight, int min_ndim, int pc_dim)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, x))) return rc;
    if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->ndim < min_ndim) return KSM_ESHAPE;
    if (!contiguous(x)) return KSM_EINVAL;
    if ((rc = check_like(s, dy, x))) return rc;
    if (dx && (rc = check_like(s, dx, x))) return rc;
    const int64_t pc = x->shape[pc_dim < 0 ? x->ndim - 1 : pc_dim];
    if ((weight && (rc = check_vec(s, weight, pc))) ||
        (dweight && (rc = check_vec(s, dweight, pc))) || (dbias && (rc = check_vec(s, dbias, pc))))
        return rc;
    if (!dx && !dweight && !dbias) return KSM_EINVAL;
    return 0;
}

int ksm_op_batchnorm_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dweight, ksm_tensor *dbias,
                              const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *weight,
                              const ksm_tensor *save_mean, const ksm_tensor *save_invstd)
{
    int rc = check_norm_bw(s, dx, dweight, dbias, dy, x, weight, 2, 1);
    if (rc) return rc;
    if ((rc = check_vec(s, save_mean, x->shape[1])) ||
        (rc = check_vec(s, save_invstd, x->shape[1])))
        return rc;
    struct ksm_op op;
    const ksm_tensor *srcs[7] = {dy, x, weight, save_mean, save_invstd, dweight, dbias};
    pack(&op, KSM_OP_BATCHNORM_BACKWARD, dx, x, srcs, 7);
    if ((rc = check_overlaps(&op, 1u << 5 | 1u << 6))) return rc;
    return ksm_stream_launch(s, &op);
}

int ksm_op_groupnorm_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dweight, ksm_tensor *dbias,
                              const ksm_tensor *dy, const ksm_tensor *x, int groups,
                              const ksm_tensor *weight, float eps)
{
    int rc = check_norm_bw(s, dx, dweight, dbias, dy, x, weight, 2, 1);
    if (rc) return rc;
    if (groups < 1 || x->shape[1] % groups != 0 || !eps_ok(eps)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[5] = {dy, x, weight, dweight, dbias};
    pack(&op, KSM_OP_GROUPNORM_BACKWARD, dx, x, srcs, 5);
    if ((rc = check_overlaps(&op, 1u << 3 | 1u << 4))) return rc;
    op.p.norm.eps = eps;
    op.p.norm.groups = groups;
    return ksm_stream_launch(s, &op);
}

int ksm_op_layernorm_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dweight, ksm_tensor *dbias,
                              const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *weight,
                              float eps)
{
    int rc = check_norm_bw(s, dx, dweight, dbias, dy, x, weight, 1, -1);
    if (rc) return rc;
    if (!eps_ok(eps)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[5] = {dy, x, weight, dweight, dbias};
    pack(&op, KSM_OP_LAYERNORM_BACKWARD, dx, x, srcs, 5);
    if ((rc = check_overlaps(&op, 1u << 3 | 1u << 4))) return rc;
    op.p.norm.eps = eps;
    return ksm_stream_launch(s, &op);
}

// ---- Convolution backward ----

size_t ksm_op_conv2d_backward_workspace_size(const ksm_tensor *x, const ksm_tensor *w, int pad_h,
                                             int pad_w, int groups)
{
    if (x == NULL || w == NULL || x->ndim != 4 || w->ndim != 4 || groups < 1) return 0;
    const int64_t ho = x->shape[2] + 2 * (int64_t)pad_h - w->shape[2] + 1;
    const int64_t wo = x->shape[3] + 2 * (int64_t)pad_w - w->shape[3] + 1;
    if (ho < 1 || wo < 1) return 0;
    const int64_t f =
        ksm_conv2d_backward_ws_floats(x->shape[1], groups, w->shape[2], w->shape[3], ho, wo);
    if (f <= 0 || (uint64_t)f > SIZE_MAX / sizeof(float)) return 0;
    return (size_t)f * sizeof(float);
}

int ksm_op_conv2d_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dw, ksm_tensor *db,
                           const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *w,
                           int pad_h, int pad_w, int groups, void *ws, size_t ws_bytes)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, dy)) || (rc = check_tensor(s, x)) || (rc = check_tensor(s, w)))
        return rc;
    if (dy->dtype != KSM_DTYPE_F32 || x->dtype != KSM_DTYPE_F32 || w->dtype != KSM_DTYPE_F32)
        return KSM_EDTYPE;
    if (dy->ndim != 4 || x->ndim != 4 || w->ndim != 4) return KSM_ESHAPE;
    if (groups < 1 || pad_h < 0 || pad_w < 0 || pad_h > (1 << 20) || pad_w > (1 << 20))
        return KSM_EINVAL;
    const int64_t n = x->shape[0], ci = x->shape[1], co = w->shape[0];
    const int64_t kh = w->shape[2], kw = w->shape[3];
    if (ci % groups != 0 || co % groups != 0) return KSM_EINVAL;
    if (w->shape[1] != ci / groups || kh < 1 || kw < 1) return KSM_ESHAPE;
    const int64_t ho = x->shape[2] + 2 * (int64_t)pad_h - kh + 1;
    const int64_t wo = x->shape[3] + 2 * (int64_t)pad_w - kw + 1;
    if (ho < 1 || wo < 1) return KSM_ESHAPE;
    if (dy->shape[0] != n || dy->shape[1] != co || dy->shape[2] != ho || dy->shape[3] != wo)
        return KSM_ESHAPE;
    if ((dx && (rc = check_like(s, dx, x))) || (dw && (rc = check_like(s, dw, w))) ||
        (db && (rc = check_vec(s, db, co))))
        return rc;
    if (!dx && !dw && !db) return KSM_EINVAL;
    if (!contiguous(dy) || !contiguous(x) || !contiguous(w)) return KSM_EINVAL;
    if (!fits_int(ci / groups * kh * kw) || !fits_int(ho * wo) || !fits_int(co) ||
        !fits_int(x->shape[2] * x->shape[3]))
        return KSM_EINVAL;
    const size_t need = ksm_op_conv2d_backward_workspace_size(x, w, pad_h, pad_w, groups);
    if (need == 0 && n > 0 && ci > 0) return KSM_EINVAL;
    if (ws_bytes < need || (need > 0 && ws == NULL)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[5] = {dy, x, w, dw, db};
    pack(&op, KSM_OP_CONV2D_BACKWARD, dx, x, srcs, 5);
    if ((rc = check_overlaps(&op, 1u << 3 | 1u << 4))) return rc;
    if (need > 0) {
        const uintptr_t lo = (uintptr_t)ws, hi = lo + need;
        for (int i = -1; i < op.n_src; i++) {
            const ksm_tensor *t = i < 0 ? &op.dst : &op.src[i];
            uintptr_t tlo, thi;
            byte_range(t, &tlo, &thi);
            if (tlo < thi && tlo < hi && lo < thi) return KSM_EINVAL;
        }
    }
    op.ws = need > 0 ? ws : NULL;
    op.ws_bytes = need > 0 ? ws_bytes : 0;
    op.p.conv2d.pad_h = pad_h;
    op.p.conv2d.pad_w = pad_w;
    op.p.conv2d.groups = groups;
    return ksm_stream_launch(s, &op);
}

// ---- Attention backward ----

static int sdpa_backward(ksm_stream *s, ksm_tensor *dq, ksm_tensor *dk, ksm_tensor *dv,
                         const ksm_tensor *dout, const ksm_tensor *q, const ksm_tensor *k,
                         const ksm_tensor *v, bool causal, float scale,
                         const struct ksm_dropout *key)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    const ksm_tensor *all[7] = {dq, dout, q, k, v, dk, dv};
    for (int i = 0; i < 7; i++)
        if ((rc = check_tensor(s, all[i]))) return rc;
    for (int i = 0; i < 7; i++)
        if (all[i]->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    for (int i = 0; i < 7; i++)
        if (all[i]->ndim != 4) return KSM_ESHAPE;
    const int64_t b = q->shape[0], h = q->shape[1], tq = q->shape[2], hd = q->shape[3];
    const int64_t tk = k->shape[2];
    const int64_t qs[4] = {b, h, tq, hd}, ks[4] = {b, h, tk, hd};
    for (int i = 0; i < 7; i++) {
        const int64_t *want = (i == 3 || i == 4 || i == 5 || i == 6) ? ks : qs;
        for (int d = 0; d < 4; d++)
            if (all[i]->shape[d] != want[d]) return KSM_ESHAPE;
    }
    if (hd < 1 || hd > KSM_SDPA_MAX_HEAD_DIM) return KSM_EINVAL;
    if (tk < 1 && tq > 0) return KSM_ESHAPE;
    if (causal && tq > tk) return KSM_ESHAPE;
    if (!isfinite(scale)) return KSM_EINVAL;
    if (scale <= 0.0f) scale = 1.0f / sqrtf((float)hd);
    struct ksm_op_dropout drop;
    memset(&drop, 0, sizeof drop);
    if (key != NULL) {
        if (!(key->p >= 0.0 && key->p < 1.0) || key->site > KSM_DROPOUT_MAX_SITE) return KSM_EINVAL;
        if (key->p > 0.0 && tk > 0 && b * h * tq > KSM_DROPOUT_MAX_NUMEL / tk) return KSM_EINVAL;
        drop = (struct ksm_op_dropout){
            .p = key->p, .seed = key->seed, .step = key->step, .site = key->site};
    }
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_SDPA_BACKWARD;
    op.n_src = 6;
    op.dst = *dq;
    for (int i = 0; i < 6; i++) op.src[i] = *all[i + 1];
    for (int i = -1; i < 6; i++) {
        ksm_tensor *t = i < 0 ? &op.dst : &op.src[i];
        if (t->shape[3] == 1) t->stride[3] = 1;
        if (t->stride[3] != 1) return KSM_EINVAL;
    }
    if (!no_self_overlap(&op.dst) || !no_self_overlap(&op.src[4]) || !no_self_overlap(&op.src[5]))
        return KSM_EINVAL;
    if ((rc = check_overlaps(&op, 1u << 4 | 1u << 5))) return rc;
    op.p.sdpa.causal = causal;
    op.p.sdpa.scale = scale;
    op.p.sdpa.drop = drop;
    return ksm_stream_launch(s, &op);
}

int ksm_op_sdpa_backward(ksm_stream *s, ksm_tensor *dq, ksm_tensor *dk, ksm_tensor *dv,
                         const ksm_tensor *dout, const ksm_tensor *q, const ksm_tensor *k,
                         const ksm_tensor *v, bool causal, float scale)
{
    return sdpa_backward(s, dq, dk, dv, dout, q, k, v, causal, scale, NULL);
}

int ksm_op_sdpa_dropout_backward(ksm_stream *s, ksm_tensor *dq, ksm_tensor *dk, ksm_tensor *dv,
                                 const ksm_tensor *dout, const ksm_tensor *q, const ksm_tensor *k,
                                 const ksm_tensor *v, bool causal, float scale,
                                 const struct ksm_dropout *d)
{
    return sdpa_backward(s, dq, dk, dv, dout, q, k, v, causal, scale, d);
}
