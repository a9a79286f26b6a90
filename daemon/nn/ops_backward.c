/*
 * Validating wrappers of the backward ops (include/kasmina/ops_backward.h).
 *
 * As in ops.c: every argument is checked before anything is enqueued, the tensors are put into
 * the form daemon/nn/op.h promises the backends (canonical strides; sources of the broadcast
 * gradient expanded to dy's shape with stride 0 where broadcast), and one struct ksm_op per
 * output goes to ksm_stream_launch(). A function with several outputs validates all of them,
 * then launches. The linear layer's dx and dw are plain GEMMs (ksm_op_gemm, which validates
 * its 2-D views again).
 *
 * Error codes, in the order the checks run: KSM_EINVAL (NULL stream or tensor, another device,
 * NULL data with elements, a layout that is not contiguous, outputs overlapping inputs or each
 * other, dims out of range), KSM_EDTYPE, KSM_ESHAPE.
 *
 * The tensor helpers repeat ops.c's (they are static there), so that this file's invariants
 * are exactly the documented ones.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"
#include "kasmina/ops_backward.h"
#include "nn/op.h"

/* ---- Tensor helpers (as in ops.c) ---- */

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

/* Byte ranges of contiguous tensors; empty tensors overlap nothing. */
static bool overlaps(const ksm_tensor *a, const ksm_tensor *b)
{
    int64_t na = numel_of(a), nb = numel_of(b);
    if (na == 0 || nb == 0) return false;
    uintptr_t alo = (uintptr_t)a->data, ahi = alo + (uintptr_t)na * ksm_dtype_size(a->dtype);
    uintptr_t blo = (uintptr_t)b->data, bhi = blo + (uintptr_t)nb * ksm_dtype_size(b->dtype);
    return alo < bhi && blo < ahi;
}

/* Present, on the stream's device, valid dtype/ndim/dims, data unless empty, contiguous. */
static int check_tensor(ksm_stream *s, const ksm_tensor *t)
{
    if (t == NULL) return KSM_EINVAL;
    if (t->dev != ksm_stream_device(s)) return KSM_EINVAL;
    if (t->ndim < 0 || t->ndim > KSM_MAX_DIMS) return KSM_ESHAPE;
    if ((int)t->dtype < 0 || (int)t->dtype >= (int)KSM_DTYPE_COUNT) return KSM_EDTYPE;
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0) return KSM_ESHAPE;
        if (t->stride[i] < 0) return KSM_EINVAL;
        if (__builtin_mul_overflow(n, t->shape[i], &n)) return KSM_EINVAL;
    }
    if (n > INT64_MAX / 8) return KSM_EINVAL;
    if (n > 0 && t->data == NULL) return KSM_EINVAL;
    if (!contiguous(t)) return KSM_EINVAL;
    return 0;
}

static int check_f32(ksm_stream *s, const ksm_tensor *t)
{
    int rc = check_tensor(s, t);
    if (rc) return rc;
    return t->dtype == KSM_DTYPE_F32 ? 0 : KSM_EDTYPE;
}

static bool is_int(enum ksm_dtype dt) { return dt == KSM_DTYPE_I64 || dt == KSM_DTYPE_I32; }

static bool same_shape(const ksm_tensor *a, const ksm_tensor *b)
{
    if (a->ndim != b->ndim) return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i]) return false;
    return true;
}

/* src expanded to the shape of full (NumPy rules), strides canonical first. */
static int expand_to(ksm_tensor *out, const ksm_tensor *src, const ksm_tensor *full)
{
    if (src->ndim > full->ndim) return KSM_ESHAPE;
    ksm_tensor c = *src, e = *src;
    canon_strides(&c);
    int off = full->ndim - src->ndim;
    e.ndim = full->ndim;
    for (int i = 0; i < full->ndim; i++) {
        int64_t sd = i < off ? 1 : c.shape[i - off];
        if (sd == full->shape[i]) {
            e.shape[i] = sd;
            e.stride[i] = sd == 1 ? 0 : c.stride[i - off];
        } else if (sd == 1) {
            e.shape[i] = full->shape[i];
            e.stride[i] = 0;
        } else {
            return KSM_ESHAPE;
        }
    }
    *out = e;
    return 0;
}

/* dy's shape is exactly the broadcast of the n inputs' shapes. */
static int check_broadcast_result(const ksm_tensor *dy, const ksm_tensor *const *in, int n)
{
    int nd = 0;
    for (int k = 0; k < n; k++) nd = in[k]->ndim > nd ? in[k]->ndim : nd;
    if (dy->ndim != nd) return KSM_ESHAPE;
    for (int i = 0; i < nd; i++) {
        int64_t want = 1;
        for (int k = 0; k < n; k++) {
            int j = i - (nd - in[k]->ndim);
            if (j < 0) continue;
            int64_t d = in[k]->shape[j];
            if (d != 1 && want != 1 && d != want) return KSM_ESHAPE;
            if (d != 1) want = d;
        }
        if (dy->shape[i] != want) return KSM_ESHAPE;
    }
    return 0;
}

/* An output must not overlap any input nor an earlier output. */
static bool outputs_disjoint(const ksm_tensor *const *outs, int n_out, const ksm_tensor *const *in,
                             int n_in)
{
    for (int i = 0; i < n_out; i++) {
        if (!outs[i]) continue;
        for (int k = 0; k < n_in; k++)
            if (in[k] && overlaps(outs[i], in[k])) return false;
        for (int j = 0; j < i; j++)
            if (outs[j] && overlaps(outs[i], outs[j])) return false;
    }
    return true;
}

static void op_init(struct ksm_op *op, enum ksm_op_type type, const ksm_tensor *dst, int n_src)
{
    memset(op, 0, sizeof *op);
    op->type = type;
    op->n_src = n_src;
    op->dst = *dst;
    canon_strides(&op->dst);
}

static void op_src(struct ksm_op *op, int i, const ksm_tensor *t)
{
    op->src[i] = *t;
    canon_strides(&op->src[i]);
}

/* ---- Elementwise ---- */

static int unary_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *xy,
                          enum ksm_unary_fn fn)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_f32(s, dx)) || (rc = check_f32(s, dy)) || (rc = check_f32(s, xy))) return rc;
    if (!same_shape(dx, dy) || !same_shape(dx, xy)) return KSM_ESHAPE;
    /* dx may be dy exactly (each element is read before it is written), never x/y partly */
    if (overlaps(dx, dy) && dx->data != dy->data) return KSM_EINVAL;
    if (overlaps(dx, xy)) return KSM_EINVAL;
    struct ksm_op op;
    op_init(&op, KSM_OP_UNARY_BACKWARD, dx, 2);
    op_src(&op, 0, dy);
    op_src(&op, 1, xy);
    op.p.unary.fn = fn;
    return ksm_stream_launch(s, &op);
}

int ksm_op_relu_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *x)
{
    return unary_backward(s, dx, dy, x, KSM_UNARY_RELU);
}

int ksm_op_gelu_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *x)
{
    return unary_backward(s, dx, dy, x, KSM_UNARY_GELU);
}

int ksm_op_clamp01_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy,
                            const ksm_tensor *x)
{
    return unary_backward(s, dx, dy, x, KSM_UNARY_CLAMP01);
}

int ksm_op_sigmoid_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy,
                            const ksm_tensor *y)
{
    return unary_backward(s, dx, dy, y, KSM_UNARY_SIGMOID);
}

int ksm_op_tanh_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *y)
{
    return unary_backward(s, dx, dy, y, KSM_UNARY_TANH);
}

/* Validates the broadcast-gradient outputs outs[i] (shape of ins[i] each, NULL skipped) against
 * dy and the n inputs, then fills ops[i]: sources dy and the inputs expanded to dy's shape. */
static int prep_bgrad(ksm_stream *s, struct ksm_op *ops, ksm_tensor *const *outs,
                      const ksm_tensor *dy, const ksm_tensor *const *ins, int n)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    for (int i = 0; i < n; i++)
        if (outs[i] && (rc = check_f32(s, outs[i]))) return rc;
    if ((rc = check_f32(s, dy))) return rc;
    for (int i = 0; i < n; i++)
        if ((rc = check_f32(s, ins[i]))) return rc;
    if ((rc = check_broadcast_result(dy, ins, n))) return rc;
    for (int i = 0; i < n; i++)
        if (outs[i] && !same_shape(outs[i], ins[i])) return KSM_ESHAPE;
    const ksm_tensor *all_in[4] = {dy, ins[0], ins[1], n > 2 ? ins[2] : NULL};
    const ksm_tensor *const *o = (const ksm_tensor *const *)outs;
    if (!outputs_disjoint(o, n, all_in, 1 + n)) return KSM_EINVAL;
    for (int i = 0; i < n; i++) {
        if (!outs[i]) continue;
        op_init(&ops[i], KSM_OP_BROADCAST_GRAD, outs[i], 1 + n);
        op_src(&ops[i], 0, dy);
        for (int k = 0; k < n; k++)
            if ((rc = expand_to(&ops[i].src[1 + k], ins[k], dy))) return rc;
    }
    return 0;
}

int ksm_op_mul_backward(ksm_stream *s, ksm_tensor *da, ksm_tensor *db, const ksm_tensor *dy,
                        const ksm_tensor *a, const ksm_tensor *b)
{
    struct ksm_op ops[2];
    ksm_tensor *outs[2] = {da, db};
    const ksm_tensor *ins[2] = {a, b};
    int rc = prep_bgrad(s, ops, outs, dy, ins, 2);
    if (rc) return rc;
    /* da = dy * b: the "other" factor is source 1 */
    if (da) {
        ops[0].src[1] = ops[0].src[2];
        ops[0].n_src = 2;
        ops[0].p.bgrad.fn = KSM_BGRAD_MUL;
        if ((rc = ksm_stream_launch(s, &ops[0]))) return rc;
    }
    if (db) {
        ops[1].n_src = 2;
        ops[1].p.bgrad.fn = KSM_BGRAD_MUL;
        if ((rc = ksm_stream_launch(s, &ops[1]))) return rc;
    }
    return 0;
}

int ksm_op_add_backward(ksm_stream *s, ksm_tensor *da, ksm_tensor *db, const ksm_tensor *dy,
                        const ksm_tensor *a, const ksm_tensor *b)
{
    struct ksm_op ops[2];
    ksm_tensor *outs[2] = {da, db};
    const ksm_tensor *ins[2] = {a, b};
    int rc = prep_bgrad(s, ops, outs, dy, ins, 2);
    if (rc) return rc;
    for (int i = 0; i < 2; i++) {
        if (!outs[i]) continue;
        ops[i].n_src = 1; /* dy alone */
        ops[i].p.bgrad.fn = KSM_BGRAD_SUM;
        if ((rc = ksm_stream_launch(s, &ops[i]))) return rc;
    }
    return 0;
}

int ksm_op_lerp_backward(ksm_stream *s, ksm_tensor *da, ksm_tensor *db, ksm_tensor *dw,
                         const ksm_tensor *dy, const ksm_tensor *a, const ksm_tensor *b,
                         const ksm_tensor *w)
{
    struct ksm_op ops[3];
    ksm_tensor *outs[3] = {da, db, dw};
    const ksm_tensor *ins[3] = {a, b, w};
    static const enum ksm_bgrad_fn fns[3] = {KSM_BGRAD_LERP_A, KSM_BGRAD_LERP_B, KSM_BGRAD_LERP_W};
    int rc = prep_bgrad(s, ops, outs, dy, ins, 3);
    if (rc) return rc;
    for (int i = 0; i < 3; i++) {
        if (!outs[i]) continue;
        ops[i].p.bgrad.fn = fns[i];
        if ((rc = ksm_stream_launch(s, &ops[i]))) return rc;
    }
    return 0;
}

/* ---- Linear ---- */

/* A 2-D [rows, cols] view of contiguous t. */
static ksm_tensor view2(const ksm_tensor *t, int64_t rows, int64_t cols)
{
    ksm_tensor v = *t;
    v.ndim = 2;
    v.shape[0] = rows;
    v.shape[1] = cols;
    v.stride[0] = cols;
    v.stride[1] = 1;
    return v;
}

int ksm_op_linear_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dw, ksm_tensor *db,
                           const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *w)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((dx && (rc = check_f32(s, dx))) || (dw && (rc = check_f32(s, dw))) ||
        (db && (rc = check_f32(s, db))))
        return rc;
    if ((rc = check_f32(s, dy)) || (rc = check_f32(s, x)) || (rc = check_f32(s, w))) return rc;
    if (w->ndim != 2 || x->ndim < 1 || dy->ndim != x->ndim) return KSM_ESHAPE;
    const int64_t n = w->shape[0], k = w->shape[1];
    if (x->shape[x->ndim - 1] != k || dy->shape[dy->ndim - 1] != n) return KSM_ESHAPE;
    for (int i = 0; i < x->ndim - 1; i++)
        if (dy->shape[i] != x->shape[i]) return KSM_ESHAPE;
    if (dx && !same_shape(dx, x)) return KSM_ESHAPE;
    if (dw && !same_shape(dw, w)) return KSM_ESHAPE;
    if (db && (db->ndim != 1 || db->shape[0] != n)) return KSM_ESHAPE;
    const ksm_tensor *outs[3] = {dx, dw, db}, *ins[3] = {dy, x, w};
    if (!outputs_disjoint(outs, 3, ins, 3)) return KSM_EINVAL;
    const int64_t m = k > 0 ? numel_of(x) / k : numel_of(dy) / (n > 0 ? n : 1);
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) return KSM_EINVAL;
    ksm_tensor dy2 = view2(dy, m, n), x2 = view2(x, m, k);
    if (dx) {
        ksm_tensor dx2 = view2(dx, m, k);
        if ((rc = ksm_op_gemm(s, &dx2, &dy2, w, false, false, 1.0f, 0.0f))) return rc;
    }
    if (dw && (rc = ksm_op_gemm(s, dw, &dy2, &x2, true, false, 1.0f, 0.0f))) return rc;
    if (db) {
        struct ksm_op op;
        op_init(&op, KSM_OP_SUM_ROWS, db, 1);
        op_src(&op, 0, &dy2);
        if ((rc = ksm_stream_launch(s, &op))) return rc;
    }
    return 0;
}

/* ---- Reductions, pooling, embedding, losses ---- */

int ksm_op_mean_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, int dim_begin,
                         int dim_end)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_f32(s, dx)) || (rc = check_f32(s, dy))) return rc;
    if (dim_begin < 0 || dim_end > dx->ndim || dim_begin >= dim_end) return KSM_EINVAL;
    const int nred = dim_end - dim_begin;
    if (dy->ndim == dx->ndim - nred) {
        for (int i = 0, j = 0; i < dx->ndim; i++) {
            if (i >= dim_begin && i < dim_end) continue;
            if (dy->shape[j++] != dx->shape[i]) return KSM_ESHAPE;
        }
    } else if (dy->ndim == dx->ndim) {
        for (int i = 0; i < dx->ndim; i++) {
            int64_t want = (i >= dim_begin && i < dim_end) ? 1 : dx->shape[i];
            if (dy->shape[i] != want) return KSM_ESHAPE;
        }
    } else {
        return KSM_ESHAPE;
    }
    if (overlaps(dx, dy)) return KSM_EINVAL;
    struct ksm_op op;
    op_init(&op, KSM_OP_MEAN_BACKWARD, dx, 1);
    op_src(&op, 0, dy);
    op.p.mean.dim_begin = dim_begin;
    op.p.mean.dim_end = dim_end;
    return ksm_stream_launch(s, &op);
}

int ksm_op_maxpool2_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy,
                             const ksm_tensor *x)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_f32(s, dx)) || (rc = check_f32(s, dy)) || (rc = check_f32(s, x))) return rc;
    if (x->ndim != 4 || !same_shape(dx, x) || dy->ndim != 4) return KSM_ESHAPE;
    if (dy->shape[0] != x->shape[0] || dy->shape[1] != x->shape[1] ||
        dy->shape[2] != x->shape[2] / 2 || dy->shape[3] != x->shape[3] / 2)
        return KSM_ESHAPE;
    if (overlaps(dx, dy) || overlaps(dx, x)) return KSM_EINVAL;
    struct ksm_op op;
    op_init(&op, KSM_OP_MAXPOOL2_BACKWARD, dx, 2);
    op_src(&op, 0, dy);
    op_src(&op, 1, x);
    return ksm_stream_launch(s, &op);
}

int ksm_op_embedding_backward(ksm_stream *s, ksm_tensor *dw, const ksm_tensor *dy,
                              const ksm_tensor *idx)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_f32(s, dw)) || (rc = check_f32(s, dy)) || (rc = check_tensor(s, idx)))
        return rc;
    if (!is_int(idx->dtype)) return KSM_EDTYPE;
    if (dw->ndim != 2 || dy->ndim != idx->ndim + 1) return KSM_ESHAPE;
    for (int i = 0; i < idx->ndim; i++)
        if (dy->shape[i] != idx->shape[i]) return KSM_ESHAPE;
    if (dy->shape[dy->ndim - 1] != dw->shape[1]) return KSM_ESHAPE;
    if (overlaps(dw, dy) || overlaps(dw, idx)) return KSM_EINVAL;
    const int64_t r = numel_of(idx), d = dw->shape[1];
    struct ksm_op op;
    op_init(&op, KSM_OP_EMBEDDING_BACKWARD, dw, 2);
    ksm_tensor dy2 = view2(dy, r, d), idx1 = *idx;
    idx1.ndim = 1;
    idx1.shape[0] = r;
    op_src(&op, 0, &dy2);
    op_src(&op, 1, &idx1);
    return ksm_stream_launch(s, &op);
}

int ksm_op_cross_entropy_backward(ksm_stream *s, ksm_tensor *dlogits, const ksm_tensor *logits,
                                  const ksm_tensor *labels, int64_t ignore_index, float dloss)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_f32(s, dlogits)) || (rc = check_f32(s, logits)) ||
        (rc = check_tensor(s, labels)))
        return rc;
    if (labels->dtype != KSM_DTYPE_I64) return KSM_EDTYPE;
    if (logits->ndim != 2 || labels->ndim != 1 || !same_shape(dlogits, logits)) return KSM_ESHAPE;
    if (labels->shape[0] != logits->shape[0] || logits->shape[1] < 1) return KSM_ESHAPE;
    if (!isfinite(dloss)) return KSM_EINVAL;
    if (overlaps(dlogits, logits) || overlaps(dlogits, labels)) return KSM_EINVAL;
    struct ksm_op op;
    op_init(&op, KSM_OP_CROSS_ENTROPY_BACKWARD, dlogits, 2);
    op_src(&op, 0, logits);
    op_src(&op, 1, labels);
    op.p.xent_bw.ignore_index = ignore_index;
    op.p.xent_bw.scale = dloss;
    return ksm_stream_launch(s, &op);
}
