/*
 * Validating op wrappers (include/kasmina/ops.h).
 *
 * Each wrapper checks all of its arguments, normalises the tensors into the form daemon/nn/op.h
 * promises to the backends (elementwise sources expanded to the destination's shape with stride
 * 0 where broadcast; the strides of size-1 dimensions rewritten to canonical values), fills one
 * struct ksm_op and hands it to ksm_stream_launch(). Nothing is enqueued when a check fails.
 *
 * Error codes, in the order the checks run:
 *   KSM_EINVAL  NULL stream or tensor, a tensor not on the stream's device, NULL data with
 *               elements, negative strides, a layout the op requires to be contiguous (or with
 *               stride 1 in the last dim) that is not, outputs overlapping inputs, parameters
 *               out of range (groups, eps, scale, dims, padding, workspace too small, sizes
 *               that BLAS cannot index with 32-bit ints).
 *   KSM_EDTYPE  a dtype the op does not take (or an invalid dtype value).
 *   KSM_ESHAPE  wrong ndim, mismatched or non-broadcastable shapes, negative dims.
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"
#include "nn/kmath.h"
#include "nn/op.h"

/* ---- Tensor helpers (local so that the invariants here are exactly the ones documented) ---- */

static int64_t numel_of(const ksm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static bool is_float(enum ksm_dtype dt)
{
    return dt == KSM_DTYPE_F32 || dt == KSM_DTYPE_F16 || dt == KSM_DTYPE_BF16;
}

static bool is_int(enum ksm_dtype dt) { return dt == KSM_DTYPE_I64 || dt == KSM_DTYPE_I32; }

/* Row-major strides of the shape, size-1 dims ignored. Empty tensors count as contiguous. */
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

/* Rewrites the strides of t to the row-major ones (t is known to be contiguous). */
static void canon_strides(ksm_tensor *t)
{
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->stride[i] = st;
        st *= t->shape[i] > 0 ? t->shape[i] : 1;
    }
}

/* The first and one-past-last byte a tensor can touch; [0,0) when empty. */
static void byte_range(const ksm_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    if (numel_of(t) == 0) {
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

/* For elementwise ops: src may alias dst only exactly (same start, same strides wherever the
 * dimension has more than one element), so every element is read before it is written. */
static bool aliases_ok(const ksm_tensor *dst, const ksm_tensor *src)
{
    if (!overlaps(dst, src)) return true;
    if (src->data != dst->data || ksm_dtype_size(src->dtype) != ksm_dtype_size(dst->dtype))
        return false;
    for (int i = 0; i < dst->ndim; i++)
        if (dst->shape[i] > 1 && src->stride[i] != dst->stride[i]) return false;
    return true;
}

/* No two index tuples of t address the same element (needed of strided destinations). Sorts
 * the non-trivial dims by stride and requires each stride to clear the extent of the smaller
 * ones. */
static bool no_self_overlap(const ksm_tensor *t)
{
    int idx[KSM_MAX_DIMS], n = 0;
    if (numel_of(t) == 0) return true;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] > 1) idx[n++] = i;
    for (int i = 1; i < n; i++) /* insertion sort by stride */
        for (int j = i; j > 0 && t->stride[idx[j]] < t->stride[idx[j - 1]]; j--) {
            int tmp = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = tmp;
        }
    int64_t extent = 1; /* elements spanned by the dims so far */
    for (int i = 0; i < n; i++) {
        int d = idx[i];
        if (t->stride[d] < extent) return false;
        extent = t->stride[d] * (t->shape[d] - 1) + extent;
    }
    return true;
}

/* Checks that every tensor argument shares: present, on the stream's device, a valid dtype and
 * ndim, non-negative dims and strides, an addressable span, data unless empty. */
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

/* An optional tensor: NULL means absent. */
static int check_opt(ksm_stream *s, const ksm_tensor *t)
{
    return t == NULL ? 0 : check_tensor(s, t);
}

static bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

/* src expanded to dst's shape (NumPy rules: align right, size-1 dims broadcast). */
static int expand_to(ksm_tensor *out, const ksm_tensor *src, const ksm_tensor *dst)
{
    if (src->ndim > dst->ndim) return KSM_ESHAPE;
    ksm_tensor e = *src;
    int off = dst->ndim - src->ndim;
    e.ndim = dst->ndim;
    for (int i = 0; i < dst->ndim; i++) {
        if (i < off) {
            e.shape[i] = dst->shape[i];
            e.stride[i] = 0;
            continue;
        }
        int64_t sd = src->shape[i - off];
        if (sd == dst->shape[i]) {
            e.shape[i] = sd;
            e.stride[i] = sd == 1 ? 0 : src->stride[i - off];
        } else if (sd == 1) {
            e.shape[i] = dst->shape[i];
            e.stride[i] = 0;
        } else {
            return KSM_ESHAPE;
        }
    }
    *out = e;
    return 0;
}

/* A vector [n] (any contiguous 1-D F32 tensor of that length). */
static int check_vec(ksm_stream *s, const ksm_tensor *t, int64_t n)
{
    int rc = check_tensor(s, t);
    if (rc) return rc;
    if (t->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (t->ndim != 1 || t->shape[0] != n) return KSM_ESHAPE;
    if (!contiguous(t)) return KSM_EINVAL;
    return 0;
}

static bool eps_ok(float eps) { return isfinite(eps) && eps > 0.0f; }

static int launch(ksm_stream *s, struct ksm_op *op) { return ksm_stream_launch(s, op); }

/* Fills *op after the checks: type, the n sources (NULL ones stay absent), dst and sources with
 * canonical strides (all are contiguous here), and refuses a dst that overlaps a source. With
 * alias0, dst may equal src0 exactly (row-wise ops read each row completely before they write
 * it); the other sources must never overlap dst. */
static int pack_op(struct ksm_op *op, enum ksm_op_type type, ksm_tensor *y,
                   const ksm_tensor *const *srcs, int n, bool alias0)
{
    memset(op, 0, sizeof *op);
    op->type = type;
    op->n_src = n;
    op->dst = *y;
    canon_strides(&op->dst);
    for (int i = 0; i < n; i++) {
        if (srcs[i] == NULL) continue;
        op->src[i] = *srcs[i];
        canon_strides(&op->src[i]);
        if (i == 0 && alias0 ? !aliases_ok(&op->dst, &op->src[0]) : overlaps(&op->dst, &op->src[i]))
            return KSM_EINVAL;
    }
    return 0;
}

/* ---- Copy and fill ---- */

int ksm_op_copy(ksm_stream *s, ksm_tensor *dst, const ksm_tensor *src)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, dst)) || (rc = check_tensor(s, src))) return rc;
    bool ok = dst->dtype == src->dtype || (is_float(dst->dtype) && is_float(src->dtype)) ||
              (is_int(dst->dtype) && is_int(src->dtype));
    if (!ok) return KSM_EDTYPE;
    if (dst->ndim != src->ndim) return KSM_ESHAPE;
    for (int i = 0; i < dst->ndim; i++)
        if (dst->shape[i] != src->shape[i]) return KSM_ESHAPE;
    if (!contiguous(dst)) return KSM_EINVAL;
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_COPY;
    op.n_src = 1;
    op.dst = *dst;
    canon_strides(&op.dst);
    if ((rc = expand_to(&op.src[0], src, dst))) return rc;
    if (!aliases_ok(&op.dst, &op.src[0])) return KSM_EINVAL;
    return launch(s, &op);
}

int ksm_op_fill(ksm_stream *s, ksm_tensor *dst, double value)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, dst))) return rc;
    if (!contiguous(dst)) return KSM_EINVAL;
    if (dst->dtype == KSM_DTYPE_I64) {
        if (!(value >= -9223372036854775808.0 && value < 9223372036854775808.0) ||
            value != floor(value))
            return KSM_EINVAL;
    } else if (dst->dtype == KSM_DTYPE_I32) {
        if (!(value >= INT32_MIN && value <= INT32_MAX) || value != floor(value)) return KSM_EINVAL;
    }
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_FILL;
    op.n_src = 0;
    op.dst = *dst;
    canon_strides(&op.dst);
    op.p.fill.value = value;
    return launch(s, &op);
}

/* ---- Elementwise ---- */

/* Checks an F32 destination and up to three F32 sources that broadcast to it, and fills the
 * op's dst/src (dst contiguous; sources expanded). */
static int prep_elementwise(ksm_stream *s, struct ksm_op *op, enum ksm_op_type type,
                            ksm_tensor *dst, const ksm_tensor *const *srcs, int n)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, dst))) return rc;
    for (int i = 0; i < n; i++)
        if ((rc = check_tensor(s, srcs[i]))) return rc;
    if (dst->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    for (int i = 0; i < n; i++)
        if (srcs[i]->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    memset(op, 0, sizeof *op);
    op->type = type;
    op->n_src = n;
    op->dst = *dst;
    for (int i = 0; i < n; i++)
        if ((rc = expand_to(&op->src[i], srcs[i], dst))) return rc;
    if (!contiguous(dst)) return KSM_EINVAL;
    canon_strides(&op->dst);
    for (int i = 0; i < n; i++)
        if (!aliases_ok(&op->dst, &op->src[i])) return KSM_EINVAL;
    return 0;
}

static int unary(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, enum ksm_unary_fn fn, float a,
                 float b)
{
    struct ksm_op op;
    const ksm_tensor *srcs[1] = {x};
    int rc = prep_elementwise(s, &op, KSM_OP_UNARY, y, srcs, 1);
    if (rc) return rc;
    op.p.unary.fn = fn;
    op.p.unary.a = a;
    op.p.unary.b = b;
    return launch(s, &op);
}

int ksm_op_relu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    return unary(s, y, x, KSM_UNARY_RELU, 0.0f, 0.0f);
}

int ksm_op_gelu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    return unary(s, y, x, KSM_UNARY_GELU, 0.0f, 0.0f);
}

int ksm_op_sigmoid(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    return unary(s, y, x, KSM_UNARY_SIGMOID, 0.0f, 0.0f);
}

int ksm_op_tanh(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    return unary(s, y, x, KSM_UNARY_TANH, 0.0f, 0.0f);
}

int ksm_op_clamp01(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    return unary(s, y, x, KSM_UNARY_CLAMP01, 0.0f, 0.0f);
}

int ksm_op_affine(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, float a, float b)
{
    return unary(s, y, x, KSM_UNARY_AFFINE, a, b);
}

static int binary(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b,
                  enum ksm_binary_fn fn)
{
    struct ksm_op op;
    const ksm_tensor *srcs[2] = {a, b};
    int rc = prep_elementwise(s, &op, KSM_OP_BINARY, y, srcs, 2);
    if (rc) return rc;
    op.p.binary.fn = fn;
    return launch(s, &op);
}

int ksm_op_add(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b)
{
    return binary(s, y, a, b, KSM_BINARY_ADD);
}

int ksm_op_sub(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b)
{
    return binary(s, y, a, b, KSM_BINARY_SUB);
}

int ksm_op_mul(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b)
{
    return binary(s, y, a, b, KSM_BINARY_MUL);
}

int ksm_op_lerp(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b,
                const ksm_tensor *w)
{
    struct ksm_op op;
    const ksm_tensor *srcs[3] = {a, b, w};
    int rc = prep_elementwise(s, &op, KSM_OP_LERP, y, srcs, 3);
    if (rc) return rc;
    return launch(s, &op);
}

/* ---- GEMM and linear ---- */

/* Canonicalises a 2-D/3-D matrix operand: stride 1 in the last dim, row stride >= the row
 * length (rewritten when the dims are trivial). Returns 0 or KSM_EINVAL. */
static int prep_matrix(ksm_tensor *m)
{
    int r = m->ndim - 2, c = m->ndim - 1;
    if (m->shape[c] <= 1) m->stride[c] = 1;
    if (m->stride[c] != 1) return KSM_EINVAL;
    int64_t row_len = m->shape[c] > 1 ? m->shape[c] : 1;
    if (m->shape[r] <= 1) m->stride[r] = row_len;
    if (m->stride[r] < row_len) return KSM_EINVAL;
    if (!fits_int(m->shape[r]) || !fits_int(m->shape[c]) || !fits_int(m->stride[r]))
        return KSM_EINVAL;
    return 0;
}

int ksm_op_gemm(ksm_stream *s, ksm_tensor *c, const ksm_tensor *a, const ksm_tensor *b,
                bool trans_a, bool trans_b, float alpha, float beta)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, c)) || (rc = check_tensor(s, a)) || (rc = check_tensor(s, b)))
        return rc;
    if (c->dtype != KSM_DTYPE_F32 || a->dtype != KSM_DTYPE_F32 || b->dtype != KSM_DTYPE_F32)
        return KSM_EDTYPE;
    int nd = c->ndim;
    if ((nd != 2 && nd != 3) || a->ndim != nd || b->ndim != nd) return KSM_ESHAPE;
    int64_t M = c->shape[nd - 2], N = c->shape[nd - 1];
    int64_t am = a->shape[nd - 2], ak = a->shape[nd - 1];
    if (trans_a) {
        int64_t t = am;
        am = ak;
        ak = t;
    }
    int64_t bk = b->shape[nd - 2], bn = b->shape[nd - 1];
    if (trans_b) {
        int64_t t = bk;
        bk = bn;
        bn = t;
    }
    if (am != M || bn != N || ak != bk) return KSM_ESHAPE;
    int64_t batch = nd == 3 ? c->shape[0] : 1;
    if (nd == 3) {
        if (a->shape[0] != batch && a->shape[0] != 1) return KSM_ESHAPE;
        if (b->shape[0] != batch && b->shape[0] != 1) return KSM_ESHAPE;
    }
    if (!isfinite(alpha) || !isfinite(beta)) return KSM_EINVAL;

    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_GEMM;
    op.n_src = 2;
    op.dst = *c;
    op.src[0] = *a;
    op.src[1] = *b;
    if ((rc = prep_matrix(&op.dst)) || (rc = prep_matrix(&op.src[0])) ||
        (rc = prep_matrix(&op.src[1])))
        return rc;
    if (!fits_int(ak)) return KSM_EINVAL;
    if (nd == 3) {
        for (int i = 0; i < 2; i++)
            if (op.src[i].shape[0] == 1) {
                op.src[i].shape[0] = batch;
                op.src[i].stride[0] = 0;
            }
        if (batch <= 1)
            op.dst.stride[0] = 0;
        else if (M > 0 && N > 0 && op.dst.stride[0] < (M - 1) * op.dst.stride[1] + N)
            return KSM_EINVAL; /* batches of c would overlap */
    }
    if (overlaps(&op.dst, &op.src[0]) || overlaps(&op.dst, &op.src[1])) return KSM_EINVAL;
    op.p.gemm.trans_a = trans_a;
    op.p.gemm.trans_b = trans_b;
    op.p.gemm.alpha = alpha;
    op.p.gemm.beta = beta;
    return launch(s, &op);
}

int ksm_op_linear(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                  const ksm_tensor *bias)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, y)) || (rc = check_tensor(s, x)) || (rc = check_tensor(s, w)) ||
        (rc = check_opt(s, bias)))
        return rc;
    if (y->dtype != KSM_DTYPE_F32 || x->dtype != KSM_DTYPE_F32 || w->dtype != KSM_DTYPE_F32 ||
        (bias && bias->dtype != KSM_DTYPE_F32))
        return KSM_EDTYPE;
    if (w->ndim != 2 || x->ndim < 1 || y->ndim != x->ndim) return KSM_ESHAPE;
    int64_t N = w->shape[0], K = w->shape[1];
    if (x->shape[x->ndim - 1] != K || y->shape[y->ndim - 1] != N) return KSM_ESHAPE;
    for (int i = 0; i < x->ndim - 1; i++)
        if (x->shape[i] != y->shape[i]) return KSM_ESHAPE;
    if (bias && (rc = check_vec(s, bias, N))) return rc;
    if (!contiguous(y) || !contiguous(x) || !contiguous(w)) return KSM_EINVAL;
    int64_t M = 1;
    for (int i = 0; i < x->ndim - 1; i++) M *= x->shape[i];
    if (!fits_int(M) || !fits_int(N) || !fits_int(K)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {x, w, bias};
    if ((rc = pack_op(&op, KSM_OP_LINEAR, y, srcs, 3, false))) return rc;
    return launch(s, &op);
}

/* ---- Convolution ---- */

/*
 * Workspace of KSM_OP_CONV2D, shared by the CPU backend and the CUDA plugin: im2col columns of
 * one group, kdim = (Ci / groups) * kh * kw rows, either
 *     kdim * Ho * Wo floats (ONE image: what the CUDA plugin needs, always available), or
 *     ksm_conv2d_slices() * kdim * ksm_conv2d_tile_cols() floats when that is more
 * (one slice per CPU compute thread, each the columns of one tile of output pixels; see
 * nn/op.h). A pure function of the shapes. It is 0 when no im2col is needed:
 * 1x1 kernels without padding (the image itself is the matrix) and depthwise convolutions
 * (groups == Ci == Co, a direct kernel). Invalid arguments give 0 (ksm_op_conv2d rejects them).
 */
static bool conv_needs_im2col(int64_t ci, int64_t co, int64_t kh, int64_t kw, int pad_h, int pad_w,
                              int groups)
{
    if (kh == 1 && kw == 1 && pad_h == 0 && pad_w == 0) return false;
    if (groups == ci && groups == co) return false;
    return true;
}

size_t ksm_op_conv2d_workspace_size(const ksm_tensor *x, const ksm_tensor *w, int pad_h, int pad_w,
                                    int groups)
{
    if (x == NULL || w == NULL || x->ndim != 4 || w->ndim != 4) return 0;
    if (groups < 1 || pad_h < 0 || pad_w < 0) return 0;
    int64_t ci = x->shape[1], co = w->shape[0], kh = w->shape[2], kw = w->shape[3];
    if (ci < 0 || ci % groups != 0 || kh < 1 || kw < 1) return 0;
    int64_t ho = x->shape[2] + 2 * (int64_t)pad_h - kh + 1;
    int64_t wo = x->shape[3] + 2 * (int64_t)pad_w - kw + 1;
    if (ho <= 0 || wo <= 0) return 0;
    if (!conv_needs_im2col(ci, co, kh, kw, pad_h, pad_w, groups)) return 0;
    /* One image's columns (what the CUDA plugin needs), or one slice per CPU thread when
     * that is more (see ksm_conv2d_tile_cols in nn/op.h). */
    int64_t kdim, howo, one, slices, all;
    if (__builtin_mul_overflow(ci / groups, kh * kw, &kdim) ||
        __builtin_mul_overflow(ho, wo, &howo) || __builtin_mul_overflow(kdim, howo, &one))
        return 0;
    slices = ksm_conv2d_slices(x->shape[0], howo);
    if (__builtin_mul_overflow(kdim, ksm_conv2d_tile_cols(x->shape[0], howo), &all) ||
        __builtin_mul_overflow(all, slices, &all))
        return 0;
    if (all < one) all = one;
    if (ksm_conv2d_winograd(ci, co, kh, kw, pad_h, pad_w, groups)) {
        int64_t wino = ksm_wino_workspace_floats(x->shape[0], ci, co, ho, wo);
        if (wino == 0) return 0;
        if (all < wino) all = wino;
    }
    if (__builtin_mul_overflow(all, (int64_t)sizeof(float), &all)) return 0;
    return (size_t)all;
}

/* bn: NULL, or the four BatchNorm vectors (mean, var, weight, bias) of a fused epilogue. */
static int conv2d(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                  const ksm_tensor *bias, int pad_h, int pad_w, int groups, void *ws,
                  size_t ws_bytes, const ksm_tensor *const *bn, float eps)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, y)) || (rc = check_tensor(s, x)) || (rc = check_tensor(s, w)) ||
        (rc = check_opt(s, bias)))
        return rc;
    if (y->dtype != KSM_DTYPE_F32 || x->dtype != KSM_DTYPE_F32 || w->dtype != KSM_DTYPE_F32 ||
        (bias && bias->dtype != KSM_DTYPE_F32))
        return KSM_EDTYPE;
    if (x->ndim != 4 || w->ndim != 4 || y->ndim != 4) return KSM_ESHAPE;
    if (groups < 1 || pad_h < 0 || pad_w < 0 || pad_h > (1 << 20) || pad_w > (1 << 20))
        return KSM_EINVAL;
    int64_t n = x->shape[0], ci = x->shape[1], co = w->shape[0];
    int64_t kh = w->shape[2], kw = w->shape[3];
    if (ci % groups != 0 || co % groups != 0) return KSM_EINVAL;
    if (w->shape[1] != ci / groups || kh < 1 || kw < 1) return KSM_ESHAPE;
    int64_t ho = x->shape[2] + 2 * (int64_t)pad_h - kh + 1;
    int64_t wo = x->shape[3] + 2 * (int64_t)pad_w - kw + 1;
    if (ho < 1 || wo < 1) return KSM_ESHAPE;
    if (y->shape[0] != n || y->shape[1] != co || y->shape[2] != ho || y->shape[3] != wo)
        return KSM_ESHAPE;
    if (bias && (rc = check_vec(s, bias, co))) return rc;
    if (bn != NULL) {
        for (int i = 0; i < 4; i++)
            if ((rc = check_vec(s, bn[i], co))) return rc;
        if (!eps_ok(eps)) return KSM_EINVAL;
    }
    if (!contiguous(y) || !contiguous(x) || !contiguous(w)) return KSM_EINVAL;
    /* BLAS indexes with int: the per-image matrices must fit. */
    if (!fits_int(ci / groups * kh * kw) || !fits_int(ho * wo) || !fits_int(co) ||
        !fits_int(x->shape[2] * x->shape[3]))
        return KSM_EINVAL;
    size_t need = ksm_op_conv2d_workspace_size(x, w, pad_h, pad_w, groups);
    /* A workspace size that overflowed reads as 0: such a convolution cannot be addressed. */
    if (need == 0 && ci > 0 && conv_needs_im2col(ci, co, kh, kw, pad_h, pad_w, groups))
        return KSM_EINVAL;
    if (ws_bytes < need || (need > 0 && ws == NULL)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {
        x, w, bias, bn ? bn[0] : NULL, bn ? bn[1] : NULL, bn ? bn[2] : NULL, bn ? bn[3] : NULL};
    if ((rc = pack_op(&op, KSM_OP_CONV2D, y, srcs, bn ? 7 : 3, false))) return rc;
    if (need > 0) {
        uintptr_t lo = (uintptr_t)ws, hi = lo + need;
        for (int i = -1; i < op.n_src; i++) {
            const ksm_tensor *t = i < 0 ? &op.dst : &op.src[i];
            uintptr_t tlo, thi;
            if (!t->data) continue;
            byte_range(t, &tlo, &thi);
            if (tlo < thi && tlo < hi && lo < thi) return KSM_EINVAL;
        }
    }
    op.ws = need > 0 ? ws : NULL;
    op.ws_bytes = need > 0 ? ws_bytes : 0;
    op.p.conv2d.pad_h = pad_h;
    op.p.conv2d.pad_w = pad_w;
    op.p.conv2d.groups = groups;
    op.p.conv2d.bn_relu = bn != NULL;
    op.p.conv2d.bn_eps = eps;
    return launch(s, &op);
}

int ksm_op_conv2d(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                  const ksm_tensor *bias, int pad_h, int pad_w, int groups, void *ws,
                  size_t ws_bytes)
{
    return conv2d(s, y, x, w, bias, pad_h, pad_w, groups, ws, ws_bytes, NULL, 0.0f);
}

int ksm_op_conv2d_bn_relu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                          const ksm_tensor *bias, int pad_h, int pad_w, int groups, void *ws,
                          size_t ws_bytes, const ksm_tensor *mean, const ksm_tensor *var,
                          const ksm_tensor *weight, const ksm_tensor *bn_bias, float eps)
{
    const ksm_tensor *bn[4] = {mean, var, weight, bn_bias};
    int rc = conv2d(s, y, x, w, bias, pad_h, pad_w, groups, ws, ws_bytes, bn, eps);
    if (rc != KSM_EUNSUPPORTED) return rc;
    /* the backend has no fused form: the two ops (they validate again) */
    if ((rc = ksm_op_conv2d(s, y, x, w, bias, pad_h, pad_w, groups, ws, ws_bytes))) return rc;
    return ksm_op_batchnorm_relu(s, y, y, mean, var, weight, bn_bias, eps);
}

/* ---- Normalisation and softmax ---- */

/* y and x contiguous F32 of the same shape, ndim >= min_ndim. */
static int check_same_f32(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, int min_ndim)
{
    int rc;
    if ((rc = check_tensor(s, y)) || (rc = check_tensor(s, x))) return rc;
    if (y->dtype != KSM_DTYPE_F32 || x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->ndim < min_ndim || y->ndim != x->ndim) return KSM_ESHAPE;
    for (int i = 0; i < x->ndim; i++)
        if (y->shape[i] != x->shape[i]) return KSM_ESHAPE;
    if (!contiguous(y) || !contiguous(x)) return KSM_EINVAL;
    return 0;
}

static int batchnorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *mean,
                     const ksm_tensor *var, const ksm_tensor *weight, const ksm_tensor *bias,
                     float eps, bool relu)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_same_f32(s, y, x, 2))) return rc;
    int64_t c = x->shape[1];
    if ((rc = check_vec(s, mean, c)) || (rc = check_vec(s, var, c)) ||
        (rc = check_vec(s, weight, c)) || (rc = check_vec(s, bias, c)))
        return rc;
    if (!eps_ok(eps)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[5] = {x, mean, var, weight, bias};
    if ((rc = pack_op(&op, KSM_OP_BATCHNORM, y, srcs, 5, true))) return rc;
    op.p.norm.eps = eps;
    op.p.norm.relu = relu;
    return launch(s, &op);
}

int ksm_op_batchnorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *mean,
                     const ksm_tensor *var, const ksm_tensor *weight, const ksm_tensor *bias,
                     float eps)
{
    return batchnorm(s, y, x, mean, var, weight, bias, eps, false);
}

int ksm_op_batchnorm_relu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *mean,
                          const ksm_tensor *var, const ksm_tensor *weight, const ksm_tensor *bias,
                          float eps)
{
    return batchnorm(s, y, x, mean, var, weight, bias, eps, true);
}

int ksm_op_groupnorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, int groups,
                     const ksm_tensor *weight, const ksm_tensor *bias, float eps)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_same_f32(s, y, x, 2))) return rc;
    int64_t c = x->shape[1];
    if ((weight && (rc = check_vec(s, weight, c))) || (bias && (rc = check_vec(s, bias, c))))
        return rc;
    if (groups < 1 || c % groups != 0 || !eps_ok(eps)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[3] = {x, weight, bias};
    if ((rc = pack_op(&op, KSM_OP_GROUPNORM, y, srcs, 3, true))) return rc;
    op.p.norm.eps = eps;
    op.p.norm.groups = groups;
    return launch(s, &op);
}

int ksm_op_layernorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *weight,
                     const ksm_tensor *bias, float eps)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_same_f32(s, y, x, 1))) return rc;
    int64_t d = x->shape[x->ndim - 1];
    if ((weight && (rc = check_vec(s, weight, d))) || (bias && (rc = check_vec(s, bias, d))))
        return rc;
    if (!eps_ok(eps)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[3] = {x, weight, bias};
    if ((rc = pack_op(&op, KSM_OP_LAYERNORM, y, srcs, 3, true))) return rc;
    op.p.norm.eps = eps;
    return launch(s, &op);
}

int ksm_op_softmax(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_same_f32(s, y, x, 1))) return rc;
    struct ksm_op op;
    const ksm_tensor *srcs[1] = {x};
    if ((rc = pack_op(&op, KSM_OP_SOFTMAX, y, srcs, 1, true))) return rc;
    return launch(s, &op);
}

/* ---- Attention ---- */

/* A dropout key's fields: p in [0, 1), site < 2^16. Copies it into *o (p 0 when d is NULL). */
static int dropout_key(const struct ksm_dropout *d, struct ksm_op_dropout *o)
{
    memset(o, 0, sizeof *o);
    if (d == NULL) return 0;
    if (!(d->p >= 0.0 && d->p < 1.0) || d->site > KSM_DROPOUT_MAX_SITE) return KSM_EINVAL;
    o->p = d->p;
    o->seed = d->seed;
    o->step = d->step;
    o->site = d->site;
    return 0;
}

static int sdpa_launch(ksm_stream *s, ksm_tensor *out, const ksm_tensor *q, const ksm_tensor *k,
                       const ksm_tensor *v, bool causal, float scale, const struct ksm_dropout *d)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, out)) || (rc = check_tensor(s, q)) || (rc = check_tensor(s, k)) ||
        (rc = check_tensor(s, v)))
        return rc;
    if (out->dtype != KSM_DTYPE_F32 || q->dtype != KSM_DTYPE_F32 || k->dtype != KSM_DTYPE_F32 ||
        v->dtype != KSM_DTYPE_F32)
        return KSM_EDTYPE;
    if (out->ndim != 4 || q->ndim != 4 || k->ndim != 4 || v->ndim != 4) return KSM_ESHAPE;
    int64_t b = q->shape[0], h = q->shape[1], tq = q->shape[2], hd = q->shape[3];
    int64_t tk = k->shape[2];
    if (k->shape[0] != b || k->shape[1] != h || k->shape[3] != hd) return KSM_ESHAPE;
    if (v->shape[0] != b || v->shape[1] != h || v->shape[2] != tk || v->shape[3] != hd)
        return KSM_ESHAPE;
    if (out->shape[0] != b || out->shape[1] != h || out->shape[2] != tq || out->shape[3] != hd)
        return KSM_ESHAPE;
    if (hd < 1 || hd > KSM_SDPA_MAX_HEAD_DIM) return KSM_EINVAL;
    if (tk < 1 && tq > 0) return KSM_ESHAPE;
    if (causal && tq > tk) return KSM_ESHAPE; /* the first rows would have no key */
    if (!isfinite(scale)) return KSM_EINVAL;
    if (scale <= 0.0f) scale = 1.0f / sqrtf((float)hd);
    struct ksm_op_dropout drop;
    if ((rc = dropout_key(d, &drop))) return rc;
    if (drop.p > 0.0 && (tk > 0 && b * h * tq > KSM_DROPOUT_MAX_NUMEL / tk)) return KSM_EINVAL;
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_SDPA;
    op.n_src = 3;
    op.dst = *out;
    op.src[0] = *q;
    op.src[1] = *k;
    op.src[2] = *v;
    for (int i = -1; i < 3; i++) {
        ksm_tensor *t = i < 0 ? &op.dst : &op.src[i];
        if (t->shape[3] == 1) t->stride[3] = 1;
        if (t->stride[3] != 1) return KSM_EINVAL;
    }
    if (!no_self_overlap(&op.dst)) return KSM_EINVAL;
    for (int i = 0; i < 3; i++)
        if (overlaps(&op.dst, &op.src[i])) return KSM_EINVAL;
    op.p.sdpa.causal = causal;
    op.p.sdpa.scale = scale;
    op.p.sdpa.drop = drop;
    return launch(s, &op);
}

int ksm_op_sdpa(ksm_stream *s, ksm_tensor *out, const ksm_tensor *q, const ksm_tensor *k,
                const ksm_tensor *v, bool causal, float scale)
{
    return sdpa_launch(s, out, q, k, v, causal, scale, NULL);
}

int ksm_op_sdpa_dropout(ksm_stream *s, ksm_tensor *out, const ksm_tensor *q, const ksm_tensor *k,
                        const ksm_tensor *v, bool causal, float scale, const struct ksm_dropout *d)
{
    return sdpa_launch(s, out, q, k, v, causal, scale, d);
}

/* ---- Dropout ---- */

int ksm_op_dropout(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const struct ksm_dropout *d)
{
    int rc;
    if (s == NULL || d == NULL) return KSM_EINVAL;
    if ((rc = check_same_f32(s, y, x, 0))) return rc;
    struct ksm_op_dropout drop;
    if ((rc = dropout_key(d, &drop))) return rc;
    if (numel_of(x) > KSM_DROPOUT_MAX_NUMEL) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[1] = {x};
    if ((rc = pack_op(&op, KSM_OP_DROPOUT, y, srcs, 1, true))) return rc;
    op.p.dropout = drop;
    return launch(s, &op);
}

/* ---- Embedding, reductions, pooling, losses ---- */

int ksm_op_embedding(ksm_stream *s, ksm_tensor *y, const ksm_tensor *weight, const ksm_tensor *idx)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, y)) || (rc = check_tensor(s, weight)) || (rc = check_tensor(s, idx)))
        return rc;
    if (y->dtype != KSM_DTYPE_F32 || weight->dtype != KSM_DTYPE_F32 || !is_int(idx->dtype))
        return KSM_EDTYPE;
    if (weight->ndim != 2 || y->ndim != idx->ndim + 1) return KSM_ESHAPE;
    for (int i = 0; i < idx->ndim; i++)
        if (y->shape[i] != idx->shape[i]) return KSM_ESHAPE;
    if (y->shape[y->ndim - 1] != weight->shape[1]) return KSM_ESHAPE;
    if (!contiguous(y) || !contiguous(weight) || !contiguous(idx)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {weight, idx};
    if ((rc = pack_op(&op, KSM_OP_EMBEDDING, y, srcs, 2, false))) return rc;
    return launch(s, &op);
}

int ksm_op_mean(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, int dim_begin, int dim_end)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, y)) || (rc = check_tensor(s, x))) return rc;
    if (y->dtype != KSM_DTYPE_F32 || x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (dim_begin < 0 || dim_end > x->ndim || dim_begin >= dim_end) return KSM_EINVAL;
    /* y is either the remaining dims, or keeps the reduced dims with size 1. */
    int nred = dim_end - dim_begin;
    if (y->ndim == x->ndim - nred) {
        for (int i = 0, j = 0; i < x->ndim; i++) {
            if (i >= dim_begin && i < dim_end) continue;
            if (y->shape[j++] != x->shape[i]) return KSM_ESHAPE;
        }
    } else if (y->ndim == x->ndim && nred > 0) {
        for (int i = 0; i < x->ndim; i++) {
            int64_t want = (i >= dim_begin && i < dim_end) ? 1 : x->shape[i];
            if (y->shape[i] != want) return KSM_ESHAPE;
        }
    } else {
        return KSM_ESHAPE;
    }
    if (!contiguous(y) || !contiguous(x)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {x};
    if ((rc = pack_op(&op, KSM_OP_MEAN, y, srcs, 1, false))) return rc;
    op.p.mean.dim_begin = dim_begin;
    op.p.mean.dim_end = dim_end;
    return launch(s, &op);
}

int ksm_op_maxpool2(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, y)) || (rc = check_tensor(s, x))) return rc;
    if (y->dtype != KSM_DTYPE_F32 || x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->ndim != 4 || y->ndim != 4) return KSM_ESHAPE;
    if (y->shape[0] != x->shape[0] || y->shape[1] != x->shape[1] ||
        y->shape[2] != x->shape[2] / 2 || y->shape[3] != x->shape[3] / 2)
        return KSM_ESHAPE;
    if (!contiguous(y) || !contiguous(x)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {x};
    if ((rc = pack_op(&op, KSM_OP_MAXPOOL2, y, srcs, 1, false))) return rc;
    return launch(s, &op);
}

int ksm_op_cross_entropy(ksm_stream *s, ksm_tensor *loss, const ksm_tensor *logits,
                         const ksm_tensor *labels, int64_t ignore_index)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, loss)) || (rc = check_tensor(s, logits)) ||
        (rc = check_tensor(s, labels)))
        return rc;
    if (loss->dtype != KSM_DTYPE_F32 || logits->dtype != KSM_DTYPE_F32 ||
        labels->dtype != KSM_DTYPE_I64)
        return KSM_EDTYPE;
    if (logits->ndim != 2 || labels->ndim != 1 || loss->ndim != 1) return KSM_ESHAPE;
    int64_t n = logits->shape[0];
    if (labels->shape[0] != n || loss->shape[0] != n || logits->shape[1] < 1) return KSM_ESHAPE;
    if (!contiguous(loss) || !contiguous(logits) || !contiguous(labels)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {logits, labels};
    if ((rc = pack_op(&op, KSM_OP_CROSS_ENTROPY, loss, srcs, 2, false))) return rc;
    op.p.xent.ignore_index = ignore_index;
    return launch(s, &op);
}

int ksm_op_argmax(ksm_stream *s, ksm_tensor *idx, const ksm_tensor *x)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_tensor(s, idx)) || (rc = check_tensor(s, x))) return rc;
    if (idx->dtype != KSM_DTYPE_I64 || x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->ndim != 2 || idx->ndim != 1) return KSM_ESHAPE;
    if (idx->shape[0] != x->shape[0] || x->shape[1] < 1) return KSM_ESHAPE;
    if (!contiguous(idx) || !contiguous(x)) return KSM_EINVAL;
    struct ksm_op op;
    const ksm_tensor *srcs[] = {x};
    if ((rc = pack_op(&op, KSM_OP_ARGMAX, idx, srcs, 1, false))) return rc;
    return launch(s, &op);
}

/* ---- Names ---- */

const char *ksm_op_name(enum ksm_op_type type)
{
    static const char *const names[KSM_OP_COUNT] = {
        [KSM_OP_COPY] = "copy",
        [KSM_OP_FILL] = "fill",
        [KSM_OP_UNARY] = "unary",
        [KSM_OP_BINARY] = "binary",
        [KSM_OP_LERP] = "lerp",
        [KSM_OP_GEMM] = "gemm",
        [KSM_OP_LINEAR] = "linear",
        [KSM_OP_CONV2D] = "conv2d",
        [KSM_OP_BATCHNORM] = "batchnorm",
        [KSM_OP_GROUPNORM] = "groupnorm",
        [KSM_OP_LAYERNORM] = "layernorm",
        [KSM_OP_SOFTMAX] = "softmax",
        [KSM_OP_SDPA] = "sdpa",
        [KSM_OP_EMBEDDING] = "embedding",
        [KSM_OP_MEAN] = "mean",
        [KSM_OP_MAXPOOL2] = "maxpool2",
        [KSM_OP_CROSS_ENTROPY] = "cross_entropy",
        [KSM_OP_ARGMAX] = "argmax",
        /* ---- optimizer ---- */
        [KSM_OP_SGD] = "sgd",
        [KSM_OP_SUMSQ] = "sumsq",
        [KSM_OP_SCALE] = "scale",
        /* ---- backward: elementwise, linear, reductions, losses ---- */
        [KSM_OP_UNARY_BACKWARD] = "unary_backward",
        [KSM_OP_BROADCAST_GRAD] = "broadcast_grad",
        [KSM_OP_SUM_ROWS] = "sum_rows",
        [KSM_OP_MEAN_BACKWARD] = "mean_backward",
        [KSM_OP_MAXPOOL2_BACKWARD] = "maxpool2_backward",
        [KSM_OP_EMBEDDING_BACKWARD] = "embedding_backward",
        [KSM_OP_CROSS_ENTROPY_BACKWARD] = "cross_entropy_backward",
        /* ---- backward: norms, convolution, attention ---- */
        [KSM_OP_BATCHNORM_TRAIN] = "batchnorm_train",
        [KSM_OP_BATCHNORM_BACKWARD] = "batchnorm_backward",
        [KSM_OP_GROUPNORM_BACKWARD] = "groupnorm_backward",
        [KSM_OP_LAYERNORM_BACKWARD] = "layernorm_backward",
        [KSM_OP_CONV2D_BACKWARD] = "conv2d_backward",
        [KSM_OP_SDPA_BACKWARD] = "sdpa_backward",
        [KSM_OP_DROPOUT] = "dropout",
    };
    if ((int)type < 0 || (int)type >= (int)KSM_OP_COUNT || names[type] == NULL) return "unknown";
    return names[type];
}
