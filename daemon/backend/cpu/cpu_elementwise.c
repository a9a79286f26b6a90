/*
 * CPU kernels: strided elementwise ops (unary, binary, lerp, copy with conversions) and fill.
 * Shared conventions: cpu_ops_impl.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops_impl.h"

/* ---- Strided elementwise iteration ----
 *
 * dst (contiguous) and up to three sources expanded to dst's shape. Size-1 dims are dropped and
 * adjacent dims merged wherever every tensor is linear across them, so the common cases
 * (everything contiguous; a per-sample or per-channel broadcast) become one or two loops. The
 * row function then sees n elements with one element stride per tensor; dst's is always 1.
 */

#define EW_MAX 4

struct ew_iter {
    int nd, nt;
    int64_t shape[KSM_MAX_DIMS];
    int64_t st[EW_MAX][KSM_MAX_DIMS]; /* element strides; [0] is dst */
    char *base[EW_MAX];
    size_t esz[EW_MAX];
};

typedef void (*ew_row_fn)(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                          const int64_t st[EW_MAX]);

static void ew_init(struct ew_iter *it, const struct ksm_op *op, int n_src)
{
    const ksm_tensor *t[EW_MAX] = {&op->dst, &op->src[0], &op->src[1], &op->src[2]};
    it->nt = 1 + n_src;
    it->nd = 0;
    for (int k = 0; k < it->nt; k++) {
        it->base[k] = (char *)t[k]->data;
        it->esz[k] = ksm_dtype_size(t[k]->dtype);
    }
    for (int d = 0; d < op->dst.ndim; d++) {
        if (op->dst.shape[d] == 1) continue;
        int j = it->nd;
        if (j > 0) {
            /* merge into the previous (outer) dim when linear for every tensor */
            bool linear = true;
            for (int k = 0; k < it->nt; k++)
                if (it->st[k][j - 1] != t[k]->stride[d] * op->dst.shape[d]) linear = false;
            if (linear) {
                it->shape[j - 1] *= op->dst.shape[d];
                for (int k = 0; k < it->nt; k++) it->st[k][j - 1] = t[k]->stride[d];
                continue;
            }
        }
        it->shape[j] = op->dst.shape[d];
        for (int k = 0; k < it->nt; k++) it->st[k][j] = t[k]->stride[d];
        it->nd++;
    }
}

struct ew_job {
    const struct ew_iter *it;
    const struct ksm_op *op;
    ew_row_fn fn;
};

/* Rows [b, e) of the outer dims (all dims but the innermost), each a call of fn. */
static void ew_rows(void *ctx, int64_t b, int64_t e)
{
    const struct ew_job *j = ctx;
    const struct ew_iter *it = j->it;
    const int nd = it->nd;
    char *p[EW_MAX] = {0};
    int64_t st[EW_MAX] = {0};
    const int64_t n = it->shape[nd - 1];
    for (int k = 0; k < it->nt; k++) st[k] = it->st[k][nd - 1];
    int64_t idx[KSM_MAX_DIMS] = {0};
    int64_t off[EW_MAX] = {0}; /* element offsets of the current row */
    int64_t r = b;
    for (int d = nd - 2; d >= 0; d--) {
        idx[d] = r % it->shape[d];
        r /= it->shape[d];
        for (int k = 0; k < it->nt; k++) off[k] += idx[d] * it->st[k][d];
    }
    for (int64_t o = b; o < e; o++) {
        for (int k = 0; k < it->nt; k++) p[k] = it->base[k] + off[k] * (int64_t)it->esz[k];
        j->fn(j->op, n, p, st);
        for (int d = nd - 2; d >= 0; d--) {
            for (int k = 0; k < it->nt; k++) off[k] += it->st[k][d];
            if (++idx[d] < it->shape[d]) break;
            for (int k = 0; k < it->nt; k++) off[k] -= it->st[k][d] * it->shape[d];
            idx[d] = 0;
        }
    }
}

/* Elements [b, e) of a single merged dim. */
static void ew_span(void *ctx, int64_t b, int64_t e)
{
    const struct ew_job *j = ctx;
    const struct ew_iter *it = j->it;
    char *p[EW_MAX] = {0};
    int64_t st[EW_MAX] = {0};
    for (int k = 0; k < it->nt; k++) {
        st[k] = it->st[k][0];
        p[k] = it->base[k] + b * st[k] * (int64_t)it->esz[k];
    }
    j->fn(j->op, e - b, p, st);
}

static void ew_run(const struct ew_iter *it, const struct ksm_op *op, ew_row_fn fn)
{
    if (it->nd == 0) { /* a single element (scalar, or all dims of size 1) */
        char *p[EW_MAX] = {0};
        int64_t st[EW_MAX] = {0};
        for (int k = 0; k < it->nt; k++) p[k] = it->base[k];
        fn(op, 1, p, st);
        return;
    }
    for (int d = 0; d < it->nd; d++)
        if (it->shape[d] == 0) return;
    struct ew_job job = {it, op, fn};
    const int64_t n = it->shape[it->nd - 1];
    if (it->nd == 1) {
        ksm_cpu_parallel_for(n, PAR_GRAIN, ew_span, &job);
        return;
    }
    int64_t outer = 1;
    for (int d = 0; d < it->nd - 1; d++) outer *= it->shape[d];
    ksm_cpu_parallel_for(outer, ksm_cpu_grain(n), ew_rows, &job);
}

static void ew_exec(const struct ksm_op *op, int n_src, ew_row_fn fn)
{
    struct ew_iter it;
    ew_init(&it, op, n_src);
    ew_run(&it, op, fn);
}

/* Loops with a unit-stride specialisation so the common case vectorises. */
#define EW_LOOP1(N, SX, BODY)                                                                      \
    do {                                                                                           \
        if ((SX) == 1) {                                                                           \
            for (int64_t i = 0; i < (N); i++) {                                                    \
                const int64_t ix = i;                                                              \
                BODY;                                                                              \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t i = 0; i < (N); i++) {                                                    \
                const int64_t ix = i * (SX);                                                       \
                BODY;                                                                              \
            }                                                                                      \
        }                                                                                          \
    } while (0)

KSM_VEC_CLONES
static void row_unary(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                      const int64_t st[EW_MAX])
{
    float *y = (float *)p[0]; /* may alias x exactly (in place) */
    const float *x = (const float *)p[1];
    const int64_t sx = st[1];
    switch (op->p.unary.fn) {
    case KSM_UNARY_RELU: EW_LOOP1(n, sx, y[i] = ksm_relu(x[ix])); break;
    case KSM_UNARY_GELU: EW_LOOP1(n, sx, y[i] = ksm_cpu_gelu(x[ix])); break;
    case KSM_UNARY_SIGMOID: EW_LOOP1(n, sx, y[i] = ksm_cpu_sigmoidf(x[ix])); break;
    case KSM_UNARY_TANH: EW_LOOP1(n, sx, y[i] = ksm_cpu_tanhf(x[ix])); break;
    case KSM_UNARY_CLAMP01: EW_LOOP1(n, sx, y[i] = ksm_clamp01(x[ix])); break;
    case KSM_UNARY_AFFINE: {
        const float a = op->p.unary.a, b = op->p.unary.b;
        EW_LOOP1(n, sx, y[i] = a * x[ix] + b);
        break;
    }
    default: break;
    }
}

KSM_VEC_CLONES
static void row_binary(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                       const int64_t st[EW_MAX])
{
    float *y = (float *)p[0];
    const float *a = (const float *)p[1], *b = (const float *)p[2];
    const int64_t sa = st[1], sb = st[2];
    if (sa == 1 && sb == 1) {
        switch (op->p.binary.fn) {
        case KSM_BINARY_ADD:
            for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
            break;
        case KSM_BINARY_SUB:
            for (int64_t i = 0; i < n; i++) y[i] = a[i] - b[i];
            break;
        case KSM_BINARY_MUL:
            for (int64_t i = 0; i < n; i++) y[i] = a[i] * b[i];
            break;
        default: break;
        }
        return;
    }
    switch (op->p.binary.fn) {
    case KSM_BINARY_ADD:
        for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] + b[i * sb];
        break;
    case KSM_BINARY_SUB:
        for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] - b[i * sb];
        break;
    case KSM_BINARY_MUL:
        for (int64_t i = 0; i < n; i++) y[i] = a[i * sa] * b[i * sb];
        break;
    default: break;
    }
}

KSM_VEC_CLONES
static void row_lerp(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                     const int64_t st[EW_MAX])
{
    float *y = (float *)p[0];
    const float *a = (const float *)p[1], *b = (const float *)p[2], *w = (const float *)p[3];
    const int64_t sa = st[1], sb = st[2], sw = st[3];
    (void)op;
    if (sa == 1 && sb == 1 && sw == 0) {
        const float wv = w[0];
        for (int64_t i = 0; i < n; i++) y[i] = ksm_lerp(a[i], b[i], wv);
        return;
    }
    for (int64_t i = 0; i < n; i++) y[i] = ksm_lerp(a[i * sa], b[i * sb], w[i * sw]);
}

/* ---- Copy (with conversions) and fill ---- */

static float load_float(const char *p, enum ksm_dtype dt)
{
    uint16_t h;
    float f;
    switch (dt) {
    case KSM_DTYPE_F16: memcpy(&h, p, 2); return ksm_f16_to_f32(h);
    case KSM_DTYPE_BF16: memcpy(&h, p, 2); return ksm_bf16_to_f32(h);
    default: memcpy(&f, p, 4); return f;
    }
}

static void store_float(char *p, enum ksm_dtype dt, float f)
{
    uint16_t h;
    switch (dt) {
    case KSM_DTYPE_F16:
        h = ksm_f32_to_f16(f);
        memcpy(p, &h, 2);
        break;
    case KSM_DTYPE_BF16:
        h = ksm_f32_to_bf16(f);
        memcpy(p, &h, 2);
        break;
    default: memcpy(p, &f, 4); break;
    }
}

static int64_t load_int(const char *p, enum ksm_dtype dt)
{
    if (dt == KSM_DTYPE_I32) {
        int32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

static void store_int(char *p, enum ksm_dtype dt, int64_t v)
{
    if (dt == KSM_DTYPE_I32) {
        int32_t w = (int32_t)(uint32_t)(uint64_t)v; /* wraps, as torch's .to(int32) */
        memcpy(p, &w, 4);
    } else {
        memcpy(p, &v, 8);
    }
}

static void row_copy(const struct ksm_op *op, int64_t n, char *const p[EW_MAX],
                     const int64_t st[EW_MAX])
{
    enum ksm_dtype dd = op->dst.dtype, sd = op->src[0].dtype;
    char *y = p[0];
    const char *x = p[1];
    size_t dz = ksm_dtype_size(dd), sz = ksm_dtype_size(sd);
    int64_t sx = st[1] * (int64_t)sz; /* byte stride of the source */
    if (dd == sd) {
        if (st[1] == 1) {
            if (y != x) memcpy(y, x, (size_t)n * dz);
        } else {
            for (int64_t i = 0; i < n; i++) memcpy(y + i * (int64_t)dz, x + i * sx, dz);
        }
    } else if (dd == KSM_DTYPE_I64 || dd == KSM_DTYPE_I32) {
        for (int64_t i = 0; i < n; i++)
            store_int(y + i * (int64_t)dz, dd, load_int(x + i * sx, sd));
    } else {
        for (int64_t i = 0; i < n; i++)
            store_float(y + i * (int64_t)dz, dd, load_float(x + i * sx, sd));
    }
}

static int exec_fill(const struct ksm_op *op)
{
    int64_t n = ksm_cpu_numel(&op->dst);
    double v = op->p.fill.value;
    switch (op->dst.dtype) {
    case KSM_DTYPE_F32: {
        float *y = (float *)op->dst.data;
        const float f = (float)v;
        for (int64_t i = 0; i < n; i++) y[i] = f;
        break;
    }
    case KSM_DTYPE_F16:
    case KSM_DTYPE_BF16: {
        uint16_t *y = (uint16_t *)op->dst.data;
        const uint16_t h =
            op->dst.dtype == KSM_DTYPE_F16 ? ksm_f32_to_f16((float)v) : ksm_f32_to_bf16((float)v);
        for (int64_t i = 0; i < n; i++) y[i] = h;
        break;
    }
    case KSM_DTYPE_I64: {
        int64_t *y = (int64_t *)op->dst.data;
        const int64_t k = (int64_t)v;
        for (int64_t i = 0; i < n; i++) y[i] = k;
        break;
    }
    case KSM_DTYPE_I32: {
        int32_t *y = (int32_t *)op->dst.data;
        const int32_t k = (int32_t)v;
        for (int64_t i = 0; i < n; i++) y[i] = k;
        break;
    }
    default: return KSM_EUNSUPPORTED;
    }
    return 0;
}

/* ---- Dropout: y = x * factor(n), four elements per Philox call (kmath.h) ---- */

static void dropout_blocks(void *ctx, int64_t b, int64_t e)
{
    const struct ksm_op *op = ctx;
    const struct ksm_op_dropout *d = &op->p.dropout;
    const int64_t n = ksm_cpu_numel(&op->dst);
    const float *x = (const float *)op->src[0].data;
    float *y = (float *)op->dst.data;
    const uint32_t thr = ksm_dropout_threshold(d->p);
    const float scale = ksm_dropout_scale(d->p);
    for (int64_t blk = b; blk < e; blk++) {
        uint32_t w[4];
        ksm_dropout_words(d->seed, d->step, d->site, (uint64_t)blk, w);
        for (int k = 0; k < 4; k++) {
            const int64_t i = 4 * blk + k;
            if (i >= n) break;
            y[i] = x[i] * ((w[k] >> 8) >= thr ? scale : 0.0f);
        }
    }
}

int ksm_cpu_exec_dropout(const struct ksm_op *op)
{
    const int64_t n = ksm_cpu_numel(&op->dst);
    if (n == 0) return 0;
    if (op->p.dropout.p == 0.0) { /* the identity (factor 1 everywhere) */
        if (op->dst.data != op->src[0].data)
            memcpy(op->dst.data, op->src[0].data, (size_t)n * sizeof(float));
        return 0;
    }
    ksm_cpu_parallel_for((n + 3) / 4, ksm_cpu_grain(64), dropout_blocks, (void *)op);
    return 0;
}

int ksm_cpu_exec_elementwise(const struct ksm_op *op)
{
    switch (op->type) {
    case KSM_OP_COPY: ew_exec(op, 1, row_copy); return 0;
    case KSM_OP_FILL: return exec_fill(op);
    case KSM_OP_UNARY: ew_exec(op, 1, row_unary); return 0;
    case KSM_OP_BINARY: ew_exec(op, 2, row_binary); return 0;
    case KSM_OP_LERP: ew_exec(op, 3, row_lerp); return 0;
    default: return KSM_EUNSUPPORTED;
    }
}
