/*
 * rpc/convert: protobuf-c messages <-> engine structs (see convert.h for the conventions).
 */
#include "rpc/convert.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/text.h"

/* ---- Arena ---- */

struct ksm_pb_arena_chunk {
    struct ksm_pb_arena_chunk *next;
    size_t size, used;
    _Alignas(16) unsigned char mem[];
};

#define ARENA_CHUNK 4096u

void ksm_pb_arena_init(struct ksm_pb_arena *a) { memset(a, 0, sizeof *a); }

void ksm_pb_arena_fini(struct ksm_pb_arena *a)
{
    struct ksm_pb_arena_chunk *c = a->head;
    while (c != NULL) {
        struct ksm_pb_arena_chunk *next = c->next;
        free(c);
        c = next;
    }
    a->head = NULL;
    a->bytes = 0;
}

void *ksm_pb_arena_alloc(struct ksm_pb_arena *a, size_t n)
{
    size_t need = (n + 15u) & ~(size_t)15u;
    if (need < n) return NULL;
    if (need == 0) need = 16;
    struct ksm_pb_arena_chunk *c = a->head;
    if (c == NULL || c->size - c->used < need) {
        size_t size = need > ARENA_CHUNK / 2 ? need : ARENA_CHUNK;
        if (size > SIZE_MAX - sizeof *c) return NULL;
        struct ksm_pb_arena_chunk *nc = malloc(sizeof *nc + size);
        if (nc == NULL) return NULL;
        nc->size = size;
        nc->used = 0;
        if (c != NULL && size != ARENA_CHUNK) {
            /* A big one-off block goes behind the current chunk so its free space stays usable. */
            nc->next = c->next;
            c->next = nc;
        } else {
            nc->next = c;
            a->head = nc;
        }
        c = nc;
    }
    void *p = c->mem + c->used;
    c->used += need;
    a->bytes += need;
    memset(p, 0, need);
    return p;
}

char *ksm_pb_arena_strdup(struct ksm_pb_arena *a, const char *s)
{
    if (s == NULL) s = "";
    size_t n = strlen(s);
    char *p = ksm_pb_arena_alloc(a, n + 1);
    if (p != NULL) memcpy(p, s, n + 1);
    return p;
}

#define ANEW(a, type) ((type *)ksm_pb_arena_alloc((a), sizeof(type)))
#define ANEWN(a, type, n)                                                                          \
    ((n) > SIZE_MAX / sizeof(type) ? NULL : (type *)ksm_pb_arena_alloc((a), (n) * sizeof(type)))

/* ---- Errors ---- */

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int
fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return KSM_EINVAL;
}

/* Strings the engine stores in fixed buffers; pb strings are never NULL after unpack, but
 * messages built by hand may carry NULL. */
static const char *str_or_empty(const char *s) { return s != NULL ? s : ""; }
static char *pbstr(const char *s) { return (char *)(s != NULL ? s : ""); }

static void copy_str(char *dst, size_t cap, const char *src)
{
    if (cap == 0) return;
    src = str_or_empty(src);
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* ---- Enums ---- */

int ksm_conv_dtype_from_pb(int v, const char *field, enum ksm_dtype *out, char *err, size_t errlen)
{
    switch (v) {
    case KASMINA__V1__DTYPE__DTYPE_F32: *out = KSM_DTYPE_F32; return 0;
    case KASMINA__V1__DTYPE__DTYPE_F16: *out = KSM_DTYPE_F16; return 0;
    case KASMINA__V1__DTYPE__DTYPE_BF16: *out = KSM_DTYPE_BF16; return 0;
    case KASMINA__V1__DTYPE__DTYPE_I64: *out = KSM_DTYPE_I64; return 0;
    case KASMINA__V1__DTYPE__DTYPE_I32: *out = KSM_DTYPE_I32; return 0;
    case KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED:
        return fail(err, errlen,
                    "%s must be set (DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I64 or "
                    "DTYPE_I32).",
                    field);
    default: return fail(err, errlen, "%s has an unknown DType value %d.", field, v);
    }
}

Kasmina__V1__DType ksm_conv_dtype_to_pb(enum ksm_dtype d)
{
    switch (d) {
    case KSM_DTYPE_F32: return KASMINA__V1__DTYPE__DTYPE_F32;
    case KSM_DTYPE_F16: return KASMINA__V1__DTYPE__DTYPE_F16;
    case KSM_DTYPE_BF16: return KASMINA__V1__DTYPE__DTYPE_BF16;
    case KSM_DTYPE_I64: return KASMINA__V1__DTYPE__DTYPE_I64;
    case KSM_DTYPE_I32: return KASMINA__V1__DTYPE__DTYPE_I32;
    default: return KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED;
    }
}

static bool stage_valid(int v) { return v >= 0 && v <= 10 && v != 5; }

int ksm_conv_stage_from_pb(int v, const char *field, enum ksm_stage *out, char *err, size_t errlen)
{
    if (v == 5) return fail(err, errlen, "%s 5 (SHADOWING) is retired and not accepted.", field);
    if (!stage_valid(v)) return fail(err, errlen, "%s has an unknown Stage value %d.", field, v);
    *out = (enum ksm_stage)v;
    return 0;
}

int ksm_conv_curve_from_pb(int v, const char *field, enum ksm_alpha_curve *out, char *err,
                           size_t errlen)
{
    if (v < 0 || v > 3)
        return fail(err, errlen, "%s has an unknown AlphaCurve value %d.", field, v);
    *out = (enum ksm_alpha_curve)v;
    return 0;
}

int ksm_conv_algorithm_from_pb(int v, const char *field, enum ksm_alpha_algorithm *out, char *err,
                               size_t errlen)
{
    if (v < 0 || v > 3)
        return fail(err, errlen, "%s has an unknown AlphaAlgorithm value %d.", field, v);
    *out = (enum ksm_alpha_algorithm)v;
    return 0;
}

int ksm_conv_gate_level_from_pb(int v, const char *field, enum ksm_gate_level *out, char *err,
                                size_t errlen)
{
    if (v < 0 || v > 5 || v == 4)
        return fail(err, errlen, "%s has an unknown GateLevel value %d.", field, v);
    *out = (enum ksm_gate_level)v;
    return 0;
}

/* ---- Identifiers and scalars ---- */

/* An id (kasmina/text.h's grammar) of at most max bytes, named field in the sentence. */
static int check_id(const char *s, const char *field, bool required, size_t max, char *err,
                    size_t errlen)
{
    s = str_or_empty(s);
    size_t n = strlen(s), bad = 0;
    if (n == 0) return required ? fail(err, errlen, "%s must not be empty.", field) : 0;
    if (n > max)
        return fail(err, errlen, "%s is %zu bytes long; at most %zu are allowed.", field, n, max);
    if (!ksm_id_valid(s, max, &bad))
        return fail(err, errlen,
                    "%s must match [A-Za-z0-9_][A-Za-z0-9._-]{0,%zu} (bad byte at offset %zu).",
                    field, max - 1, bad);
    return 0;
}

int ksm_conv_check_model_id(const char *s, const char *field, bool required, char *err,
                            size_t errlen)
{
    return check_id(s, field, required, KSM_ID_MAX, err, errlen);
}

int ksm_conv_check_string(const char *s, const char *field, bool required, size_t max, char *err,
                          size_t errlen)
{
    s = str_or_empty(s);
    size_t n = strlen(s), bad = 0;
    if (n == 0) return required ? fail(err, errlen, "%s must not be empty.", field) : 0;
    if (n > max)
        return fail(err, errlen, "%s is %zu bytes long; at most %zu are allowed.", field, n, max);
    if (!ksm_utf8_valid(s, n, &bad))
        return fail(err, errlen, "%s is not valid UTF-8 (byte %zu).", field, bad);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return fail(err, errlen, "%s contains a control character at offset %zu.", field, i);
    return 0;
}

int ksm_conv_check_slot_id(const char *s, const char *field, bool required, char *err,
                           size_t errlen)
{
    return check_id(s, field, required, KSM_SLOT_ID_MAX - 1, err, errlen);
}

int ksm_conv_check_number(double v, const char *field, bool allow_inf, char *err, size_t errlen)
{
    if (isnan(v)) return fail(err, errlen, "%s must not be NaN.", field);
    if (!allow_inf && isinf(v)) return fail(err, errlen, "%s must be finite.", field);
    return 0;
}

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        int rc_ = (expr);                                                                          \
        if (rc_ != 0) return rc_;                                                                  \
    } while (0)

/* ---- Tensor ---- */

static size_t dtype_size(enum ksm_dtype d)
{
    switch (d) {
    case KSM_DTYPE_F32: return 4;
    case KSM_DTYPE_F16: return 2;
    case KSM_DTYPE_BF16: return 2;
    case KSM_DTYPE_I64: return 8;
    case KSM_DTYPE_I32: return 4;
    default: return 0;
    }
}

/* Validates pb's header fields and fills everything of *out but data. */
static int tensor_header(const Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                         size_t *nbytes, char *err, size_t errlen)
{
    if (pb == NULL) return fail(err, errlen, "%s must be set.", field);
    char f[96];
    snprintf(f, sizeof f, "%s.dtype", field);
    memset(out, 0, sizeof *out);
    TRY(ksm_conv_dtype_from_pb((int)pb->dtype, f, &out->dtype, err, errlen));
    if (pb->n_shape > KSM_MAX_DIMS)
        return fail(err, errlen, "%s.shape has %zu dimensions; at most %d are allowed.", field,
                    pb->n_shape, KSM_MAX_DIMS);
    size_t esz = dtype_size(out->dtype);
    uint64_t limit = (uint64_t)INT64_MAX / esz;
    uint64_t numel = 1;
    for (size_t i = 0; i < pb->n_shape; i++) {
        int64_t d = pb->shape[i];
        if (d < 0)
            return fail(err, errlen, "%s.shape[%zu] is %lld; dimensions must be >= 0.", field, i,
                        (long long)d);
        if (d != 0 && numel > limit / (uint64_t)d)
            return fail(err, errlen, "%s.shape overflows: the element count is too large.", field);
        numel *= (uint64_t)d;
        out->shape[i] = d;
    }
    out->ndim = (int)pb->n_shape;
    int64_t st = 1;
    for (int i = out->ndim - 1; i >= 0; i--) {
        out->stride[i] = st;
        st *= out->shape[i] > 0 ? out->shape[i] : 1;
    }
    uint64_t want = numel * esz;
    if ((uint64_t)pb->data.len != want)
        return fail(err, errlen,
                    "%s.data has %zu bytes but dtype and shape need %llu (numel %llu x %zu).",
                    field, pb->data.len, (unsigned long long)want, (unsigned long long)numel, esz);
    *nbytes = (size_t)want;
    return 0;
}

static _Alignas(16) unsigned char empty_tensor_data[16];

int ksm_conv_tensor_from_pb(const Kasmina__V1__Tensor *pb, const char *field,
                            struct ksm_pb_arena *a, ksm_tensor *out, char *err, size_t errlen)
{
    size_t nbytes;
    TRY(tensor_header(pb, field, out, &nbytes, err, errlen));
    if (nbytes == 0) {
        out->data = empty_tensor_data;
        return 0;
    }
    size_t esz = dtype_size(out->dtype);
    if (((uintptr_t)pb->data.data % esz) == 0) {
        out->data = pb->data.data;
        return 0;
    }
    void *copy = ksm_pb_arena_alloc(a, nbytes);
    if (copy == NULL) return KSM_ENOMEM;
    memcpy(copy, pb->data.data, nbytes);
    out->data = copy;
    return 0;
}

int ksm_conv_tensor_from_pb_copy(const Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                                 char *err, size_t errlen)
{
    size_t nbytes;
    TRY(tensor_header(pb, field, out, &nbytes, err, errlen));
    out->data = malloc(nbytes > 0 ? nbytes : 1);
    if (out->data == NULL) return KSM_ENOMEM;
    if (nbytes > 0) memcpy(out->data, pb->data.data, nbytes);
    return 0;
}

int ksm_conv_tensor_from_pb_take(Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                                 char *err, size_t errlen)
{
    size_t nbytes;
    TRY(tensor_header(pb, field, out, &nbytes, err, errlen));
    if (nbytes == 0 || ((uintptr_t)pb->data.data % dtype_size(out->dtype)) != 0)
        return ksm_conv_tensor_from_pb_copy(pb, field, out, err, errlen);
    out->data = pb->data.data;
    pb->data.data = NULL;
    pb->data.len = 0;
    return 0;
}

static bool contiguous(const ksm_tensor *t)
{
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->stride[i] != st) return false;
        st *= t->shape[i];
    }
    return true;
}

static uint64_t numel_of(const ksm_tensor *t)
{
    uint64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= (uint64_t)(t->shape[i] > 0 ? t->shape[i] : 0);
    return n;
}

static int tensor_shape_to_pb(const ksm_tensor *t, struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb)
{
    kasmina__v1__tensor__init(pb);
    if (t->ndim < 0 || t->ndim > KSM_MAX_DIMS || dtype_size(t->dtype) == 0) return KSM_EINVAL;
    pb->n_shape = (size_t)t->ndim;
    if (t->ndim > 0) {
        pb->shape = ANEWN(a, int64_t, (size_t)t->ndim);
        if (pb->shape == NULL) return KSM_ENOMEM;
        memcpy(pb->shape, t->shape, (size_t)t->ndim * sizeof(int64_t));
    }
    return 0;
}

int ksm_conv_tensor_to_pb(const ksm_tensor *t, struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb)
{
    TRY(tensor_shape_to_pb(t, a, pb));
    if (!contiguous(t)) return KSM_EINVAL;
    pb->dtype = ksm_conv_dtype_to_pb(t->dtype);
    pb->data.len = (size_t)(numel_of(t) * dtype_size(t->dtype));
    pb->data.data = pb->data.len > 0 ? t->data : NULL;
    return 0;
}

static uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static uint16_t f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow (after rounding) */
    if (absu < 0x38800000u) {                                   /* subnormal or zero */
        if (absu < 0x33000000u) return (uint16_t)sign;          /* < half the min subnormal */
        uint32_t e = absu >> 23, m = (absu & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14 + (113 - e) - 1 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = absu - 0x38000000u; /* rebias 127 -> 15 */
    uint32_t h = r >> 13, rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

int ksm_conv_tensor_to_pb_as(const ksm_tensor *t, int dtype, const char *field,
                             struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb, char *err,
                             size_t errlen)
{
    if (dtype == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED || dtype == KASMINA__V1__DTYPE__DTYPE_F32 ||
        t->dtype != KSM_DTYPE_F32) {
        if (dtype != KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED &&
            (int)ksm_conv_dtype_to_pb(t->dtype) != dtype)
            return fail(err, errlen, "%s %d cannot be produced from a %s result.", field, dtype,
                        t->dtype == KSM_DTYPE_F32 ? "F32" : "non-F32");
        return ksm_conv_tensor_to_pb(t, a, pb);
    }
    if (dtype != KASMINA__V1__DTYPE__DTYPE_F16 && dtype != KASMINA__V1__DTYPE__DTYPE_BF16)
        return fail(err, errlen, "%s must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16.", field);
    TRY(tensor_shape_to_pb(t, a, pb));
    if (!contiguous(t)) return KSM_EINVAL;
    uint64_t n = numel_of(t);
    uint16_t *dst = ANEWN(a, uint16_t, (size_t)n);
    if (dst == NULL) return KSM_ENOMEM;
    const float *src = t->data;
    bool bf = dtype == KASMINA__V1__DTYPE__DTYPE_BF16;
    for (uint64_t i = 0; i < n; i++) dst[i] = bf ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
    pb->dtype = (Kasmina__V1__DType)dtype;
    pb->data.len = (size_t)n * 2;
    pb->data.data = n > 0 ? (uint8_t *)dst : NULL;
    return 0;
}

/* ---- Models ---- */

void ksm_conv_cnn_spec_from_pb(const Kasmina__V1__CnnHostSpec *pb, struct ksm_cnn_spec *out,
                               bool *pool_layers_set)
{
    memset(out, 0, sizeof *out);
    *pool_layers_set = false;
    out->pool_layers = -1;
    if (pb == NULL) return;
    out->num_classes = pb->num_classes;
    out->n_blocks = pb->n_blocks;
    out->base_channels = pb->base_channels;
    out->kernel_size = pb->kernel_size;
    out->in_channels = pb->in_channels;
    if (pb->opt_pool_layers_case == KASMINA__V1__CNN_HOST_SPEC__OPT_POOL_LAYERS_POOL_LAYERS) {
        *pool_layers_set = true;
        out->pool_layers = pb->pool_layers > INT32_MAX ? INT32_MAX : (int32_t)pb->pool_layers;
    }
}

void ksm_conv_transformer_spec_from_pb(const Kasmina__V1__TransformerHostSpec *pb,
                                       struct ksm_transformer_spec *out)
{
    memset(out, 0, sizeof *out);
    if (pb == NULL) return;
    out->vocab_size = pb->vocab_size;
    out->n_embd = pb->n_embd;
    out->n_head = pb->n_head;
    out->n_layer = pb->n_layer;
    out->block_size = pb->block_size;
    out->num_segments = pb->num_segments;
}

int ksm_conv_model_spec_from_pb(const Kasmina__V1__CreateModelRequest *pb,
                                struct ksm_model_spec *spec, char *err, size_t errlen)
{
    memset(spec, 0, sizeof *spec);
    TRY(ksm_conv_check_model_id(pb->model_id, "model_id", false, err, errlen));
    switch (pb->host_case) {
    case KASMINA__V1__CREATE_MODEL_REQUEST__HOST__NOT_SET:
    case KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN:
        spec->topology = KSM_TOPOLOGY_CNN;
        ksm_conv_cnn_spec_from_pb(
            pb->host_case == KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN ? pb->cnn : NULL,
            &spec->cnn, &spec->pool_layers_set);
        break;
    case KASMINA__V1__CREATE_MODEL_REQUEST__HOST_TRANSFORMER:
        spec->topology = KSM_TOPOLOGY_TRANSFORMER;
        ksm_conv_transformer_spec_from_pb(pb->transformer, &spec->transformer);
        spec->cnn.pool_layers = -1;
        break;
    default: return fail(err, errlen, "host has an unknown case %d.", (int)pb->host_case);
    }
    if (pb->n_slots > KSM_MAX_SLOTS)
        return fail(err, errlen, "slots lists %zu slots; at most %d are allowed.", pb->n_slots,
                    KSM_MAX_SLOTS);
    for (size_t i = 0; i < pb->n_slots; i++) {
        char f[96];
        snprintf(f, sizeof f, "slots[%zu]", i);
        TRY(ksm_conv_check_slot_id(pb->slots[i], f, true, err, errlen));
        for (size_t j = 0; j < i; j++)
            if (strcmp(pb->slots[i], pb->slots[j]) == 0)
                return fail(err, errlen, "slots[%zu] repeats slot '%s'.", i, pb->slots[i]);
    }
    spec->slots = (const char *const *)pb->slots;
    spec->n_slots = (int)pb->n_slots;
    TRY(ksm_conv_check_string(pb->device, "device", false, 31, err, errlen));
    spec->device = str_or_empty(pb->device);
    if (pb->dtype == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED)
        spec->dtype = KSM_DTYPE_F32;
    else
        TRY(ksm_conv_dtype_from_pb((int)pb->dtype, "dtype", &spec->dtype, err, errlen));
    if (spec->dtype == KSM_DTYPE_I64 || spec->dtype == KSM_DTYPE_I32)
        return fail(err, errlen, "dtype must be a floating-point compute dtype.");
    spec->init_seed = pb->init_seed;
    spec->permissive_gates = pb->permissive_gates;
    for (size_t i = 0; i < pb->n_auto_forward_gates; i++) {
        char f[96];
        snprintf(f, sizeof f, "auto_forward_gates[%zu]", i);
        enum ksm_gate_level g = KSM_GATE_G0;
        TRY(ksm_conv_gate_level_from_pb((int)pb->auto_forward_gates[i], f, &g, err, errlen));
        if (g != KSM_GATE_G1 && g != KSM_GATE_G2 && g != KSM_GATE_G3)
            return fail(err, errlen, "%s must be GATE_G1, GATE_G2 or GATE_G3.", f);
        spec->auto_forward_gates |= 1u << g;
    }
    return 0;
}

static int cnn_to_pb(const struct ksm_cnn_spec *c, bool pool_set, struct ksm_pb_arena *a,
                     Kasmina__V1__CnnHostSpec **out)
{
    Kasmina__V1__CnnHostSpec *pb = ANEW(a, Kasmina__V1__CnnHostSpec);
    if (pb == NULL) return KSM_ENOMEM;
    kasmina__v1__cnn_host_spec__init(pb);
    pb->num_classes = c->num_classes;
    pb->n_blocks = c->n_blocks;
    pb->base_channels = c->base_channels;
    pb->kernel_size = c->kernel_size;
    pb->in_channels = c->in_channels;
    if (pool_set && c->pool_layers >= 0) {
        pb->opt_pool_layers_case = KASMINA__V1__CNN_HOST_SPEC__OPT_POOL_LAYERS_POOL_LAYERS;
        pb->pool_layers = (uint32_t)c->pool_layers;
    }
    *out = pb;
    return 0;
}

static int transformer_to_pb(const struct ksm_transformer_spec *t, struct ksm_pb_arena *a,
                             Kasmina__V1__TransformerHostSpec **out)
{
    Kasmina__V1__TransformerHostSpec *pb = ANEW(a, Kasmina__V1__TransformerHostSpec);
    if (pb == NULL) return KSM_ENOMEM;
    kasmina__v1__transformer_host_spec__init(pb);
    pb->vocab_size = t->vocab_size;
    pb->n_embd = t->n_embd;
    pb->n_head = t->n_head;
    pb->n_layer = t->n_layer;
    pb->block_size = t->block_size;
    pb->num_segments = t->num_segments;
    *out = pb;
    return 0;
}

int ksm_conv_model_spec_to_pb(const char *model_id, const struct ksm_model_spec *spec,
                              struct ksm_pb_arena *a, Kasmina__V1__CreateModelRequest *pb)
{
    kasmina__v1__create_model_request__init(pb);
    pb->model_id = pbstr(model_id);
    if (spec->topology == KSM_TOPOLOGY_TRANSFORMER) {
        pb->host_case = KASMINA__V1__CREATE_MODEL_REQUEST__HOST_TRANSFORMER;
        TRY(transformer_to_pb(&spec->transformer, a, &pb->transformer));
    } else {
        pb->host_case = KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN;
        TRY(cnn_to_pb(&spec->cnn, spec->pool_layers_set, a, &pb->cnn));
    }
    if (spec->n_slots > 0) {
        pb->slots = ANEWN(a, char *, (size_t)spec->n_slots);
        if (pb->slots == NULL) return KSM_ENOMEM;
        for (int i = 0; i < spec->n_slots; i++) pb->slots[i] = pbstr(spec->slots[i]);
        pb->n_slots = (size_t)spec->n_slots;
    }
    pb->device = pbstr(spec->device);
    pb->dtype = ksm_conv_dtype_to_pb(spec->dtype);
    pb->init_seed = spec->init_seed;
    pb->permissive_gates = spec->permissive_gates;
    size_t n = 0;
    Kasmina__V1__GateLevel *g = ANEWN(a, Kasmina__V1__GateLevel, 8);
    if (g == NULL) return KSM_ENOMEM;
    for (int lvl = 0; lvl <= 5; lvl++)
        if (spec->auto_forward_gates & (1u << lvl)) g[n++] = (Kasmina__V1__GateLevel)lvl;
    pb->auto_forward_gates = g;
    pb->n_auto_forward_gates = n;
    return 0;
}

int ksm_conv_model_to_pb(const struct ksm_model_info *info, struct ksm_pb_arena *a,
                         Kasmina__V1__Model *pb)
{
    kasmina__v1__model__init(pb);
    pb->model_id = (char *)info->model_id;
    pb->topology = (Kasmina__V1__Topology)info->topology;
    if (info->topology == KSM_TOPOLOGY_TRANSFORMER) {
        pb->host_case = KASMINA__V1__MODEL__HOST_TRANSFORMER;
        TRY(transformer_to_pb(&info->transformer, a, &pb->transformer));
    } else if (info->topology == KSM_TOPOLOGY_CNN) {
        pb->host_case = KASMINA__V1__MODEL__HOST_CNN;
        TRY(cnn_to_pb(&info->cnn, true, a, &pb->cnn));
    }
    pb->device = (char *)info->device;
    pb->dtype = ksm_conv_dtype_to_pb(info->dtype);
    int n = info->n_slots < 0 ? 0 : info->n_slots > KSM_MAX_SLOTS ? KSM_MAX_SLOTS : info->n_slots;
    if (n > 0) {
        pb->slots = ANEWN(a, Kasmina__V1__SlotInfo *, (size_t)n);
        Kasmina__V1__SlotInfo *s = ANEWN(a, Kasmina__V1__SlotInfo, (size_t)n);
        if (pb->slots == NULL || s == NULL) return KSM_ENOMEM;
        for (int i = 0; i < n; i++) {
            kasmina__v1__slot_info__init(&s[i]);
            s[i].slot_id = (char *)info->slots[i].slot_id;
            s[i].channels = info->slots[i].channels;
            s[i].order = info->slots[i].order;
            s[i].surface = pbstr(info->slots[i].surface);
            pb->slots[i] = &s[i];
        }
        pb->n_slots = (size_t)n;
    }
    pb->host_params = info->host_params;
    pb->seed_params = info->seed_params;
    pb->generation = info->generation;
    pb->resident_bytes = info->resident_bytes;
    return 0;
}

static const char *surface_intern(const char *s)
{
    static const char *const known[] = {"pre_pool", "post_pool", "block_end"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (s != NULL && strcmp(s, known[i]) == 0) return known[i];
    return "";
}

int ksm_conv_model_from_pb(const Kasmina__V1__Model *pb, struct ksm_model_info *info, char *err,
                           size_t errlen)
{
    memset(info, 0, sizeof *info);
    copy_str(info->model_id, sizeof info->model_id, pb->model_id);
    if (pb->topology < 0 || pb->topology > 2)
        return fail(err, errlen, "topology has an unknown value %d.", (int)pb->topology);
    info->topology = (enum ksm_topology)pb->topology;
    bool pool_set;
    ksm_conv_cnn_spec_from_pb(pb->host_case == KASMINA__V1__MODEL__HOST_CNN ? pb->cnn : NULL,
                              &info->cnn, &pool_set);
    ksm_conv_transformer_spec_from_pb(
        pb->host_case == KASMINA__V1__MODEL__HOST_TRANSFORMER ? pb->transformer : NULL,
        &info->transformer);
    copy_str(info->device, sizeof info->device, pb->device);
    if (pb->dtype != KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED)
        TRY(ksm_conv_dtype_from_pb((int)pb->dtype, "dtype", &info->dtype, err, errlen));
    if (pb->n_slots > KSM_MAX_SLOTS)
        return fail(err, errlen, "slots lists %zu slots; at most %d are allowed.", pb->n_slots,
                    KSM_MAX_SLOTS);
    for (size_t i = 0; i < pb->n_slots; i++) {
        struct ksm_slot_info *s = &info->slots[i];
        const Kasmina__V1__SlotInfo *p = pb->slots[i];
        copy_str(s->slot_id, sizeof s->slot_id, p->slot_id);
        unsigned r, c;
        if (sscanf(s->slot_id, "r%uc%u", &r, &c) == 2) {
            s->row = r;
            s->col = c;
        }
        s->channels = p->channels;
        s->order = p->order;
        s->surface = surface_intern(p->surface);
    }
    info->n_slots = (int)pb->n_slots;
    info->host_params = pb->host_params;
    info->seed_params = pb->seed_params;
    info->generation = pb->generation;
    info->resident_bytes = pb->resident_bytes;
    return 0;
}

/* ---- Lifecycle ---- */

static int check_target(const char *model_id, const char *slot_id, bool slot_required, char *err,
                        size_t errlen)
{
    TRY(ksm_conv_check_model_id(model_id, "model_id", true, err, errlen));
    return ksm_conv_check_slot_id(slot_id, "slot_id", slot_required, err, errlen);
}

int ksm_conv_germinate_from_pb(const Kasmina__V1__GerminateRequest *pb,
                               struct ksm_germinate_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    TRY(ksm_conv_check_string(pb->blueprint_id, "blueprint_id", true, KSM_NAME_MAX - 1, err,
                              errlen));
    TRY(ksm_conv_check_string(pb->seed_id, "seed_id", false, KSM_SEED_ID_MAX - 1, err, errlen));
    TRY(ksm_conv_check_string(pb->blend_algorithm_id, "blend_algorithm_id", false, 15, err,
                              errlen));
    TRY(ksm_conv_algorithm_from_pb((int)pb->alpha_algorithm, "alpha_algorithm",
                                   &out->alpha_algorithm, err, errlen));
    if (pb->opt_alpha_target_case ==
        KASMINA__V1__GERMINATE_REQUEST__OPT_ALPHA_TARGET_ALPHA_TARGET) {
        double t = pb->alpha_target;
        TRY(ksm_conv_check_number(t, "alpha_target", false, err, errlen));
        if (!(t > 0.0 && t <= 1.0))
            return fail(err, errlen, "alpha_target must be in (0, 1], got %g.", t);
        out->has_alpha_target = true;
        out->alpha_target = t;
    }
    out->blueprint_id = pb->blueprint_id;
    out->seed_id = str_or_empty(pb->seed_id);
    out->blend_algorithm_id = str_or_empty(pb->blend_algorithm_id);
    out->blend_tempo_epochs = pb->blend_tempo_epochs;
    out->init_seed = pb->init_seed;
    return 0;
}

int ksm_conv_germinate_to_pb(const char *model_id, const char *slot_id,
                             const struct ksm_germinate_args *args, struct ksm_pb_arena *a,
                             Kasmina__V1__GerminateRequest *pb)
{
    (void)a;
    kasmina__v1__germinate_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = pbstr(slot_id);
    pb->blueprint_id = pbstr(args->blueprint_id);
    pb->seed_id = pbstr(args->seed_id);
    pb->blend_algorithm_id = pbstr(args->blend_algorithm_id);
    pb->blend_tempo_epochs = args->blend_tempo_epochs;
    pb->alpha_algorithm = (Kasmina__V1__AlphaAlgorithm)args->alpha_algorithm;
    if (args->has_alpha_target) {
        pb->opt_alpha_target_case = KASMINA__V1__GERMINATE_REQUEST__OPT_ALPHA_TARGET_ALPHA_TARGET;
        pb->alpha_target = (float)args->alpha_target;
    }
    pb->init_seed = args->init_seed;
    return 0;
}

int ksm_conv_advance_from_pb(const Kasmina__V1__AdvanceStageRequest *pb,
                             struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    TRY(ksm_conv_stage_from_pb((int)pb->target, "target", &out->target, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    return 0;
}

static int reason_initiator(const char *reason, const char *initiator,
                            struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    TRY(ksm_conv_check_string(reason, "reason", false, KSM_REASON_MAX - 1, err, errlen));
    TRY(ksm_conv_check_string(initiator, "initiator", false, KSM_NAME_MAX - 1, err, errlen));
    out->reason = str_or_empty(reason);
    out->initiator = str_or_empty(initiator);
    return 0;
}

static int steepness(bool set, float v, struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    if (!set) return 0;
    TRY(ksm_conv_check_number(v, "steepness", false, err, errlen));
    if (!(v > 0.0f)) return fail(err, errlen, "steepness must be > 0, got %g.", (double)v);
    out->has_steepness = true;
    out->steepness = v;
    return 0;
}

int ksm_conv_prune_from_pb(const Kasmina__V1__PruneRequest *pb, struct ksm_lifecycle_args *out,
                           char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    TRY(reason_initiator(pb->reason, pb->initiator, out, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    return 0;
}

int ksm_conv_schedule_prune_from_pb(const Kasmina__V1__SchedulePruneRequest *pb,
                                    struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    TRY(ksm_conv_curve_from_pb((int)pb->curve, "curve", &out->curve, err, errlen));
    TRY(steepness(pb->opt_steepness_case ==
                      KASMINA__V1__SCHEDULE_PRUNE_REQUEST__OPT_STEEPNESS_STEEPNESS,
                  pb->steepness, out, err, errlen));
    TRY(reason_initiator(pb->reason, pb->initiator, out, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    out->steps = pb->steps;
    return 0;
}

int ksm_conv_set_alpha_target_from_pb(const Kasmina__V1__SetAlphaTargetRequest *pb,
                                      struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    double t = pb->alpha_target;
    TRY(ksm_conv_check_number(t, "alpha_target", false, err, errlen));
    if (!(t > 0.0 && t <= 1.0))
        return fail(err, errlen, "alpha_target must be in (0, 1], got %g.", t);
    TRY(ksm_conv_curve_from_pb((int)pb->curve, "curve", &out->curve, err, errlen));
    TRY(steepness(pb->opt_steepness_case ==
                      KASMINA__V1__SET_ALPHA_TARGET_REQUEST__OPT_STEEPNESS_STEEPNESS,
                  pb->steepness, out, err, errlen));
    TRY(ksm_conv_algorithm_from_pb((int)pb->alpha_algorithm, "alpha_algorithm", &out->algorithm,
                                   err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    out->alpha = t;
    out->steps = pb->steps;
    return 0;
}

int ksm_conv_set_alpha_from_pb(const Kasmina__V1__SetAlphaRequest *pb,
                               struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    TRY(ksm_conv_check_number(pb->alpha, "alpha", true, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    out->alpha = pb->alpha;
    return 0;
}

void ksm_conv_advance_to_pb(const struct ksm_lifecycle_args *l,
                            Kasmina__V1__AdvanceStageRequest *pb)
{
    kasmina__v1__advance_stage_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->target = (Kasmina__V1__Stage)l->target;
}

void ksm_conv_prune_to_pb(const struct ksm_lifecycle_args *l, Kasmina__V1__PruneRequest *pb)
{
    kasmina__v1__prune_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->reason = pbstr(l->reason);
    pb->initiator = pbstr(l->initiator);
}

void ksm_conv_schedule_prune_to_pb(const struct ksm_lifecycle_args *l,
                                   Kasmina__V1__SchedulePruneRequest *pb)
{
    kasmina__v1__schedule_prune_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->steps = l->steps;
    pb->curve = (Kasmina__V1__AlphaCurve)l->curve;
    if (l->has_steepness) {
        pb->opt_steepness_case = KASMINA__V1__SCHEDULE_PRUNE_REQUEST__OPT_STEEPNESS_STEEPNESS;
        pb->steepness = (float)l->steepness;
    }
    pb->reason = pbstr(l->reason);
    pb->initiator = pbstr(l->initiator);
}

void ksm_conv_set_alpha_target_to_pb(const struct ksm_lifecycle_args *l,
                                     Kasmina__V1__SetAlphaTargetRequest *pb)
{
    kasmina__v1__set_alpha_target_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->alpha_target = (float)l->alpha;
    pb->steps = l->steps;
    pb->curve = (Kasmina__V1__AlphaCurve)l->curve;
    if (l->has_steepness) {
        pb->opt_steepness_case = KASMINA__V1__SET_ALPHA_TARGET_REQUEST__OPT_STEEPNESS_STEEPNESS;
        pb->steepness = (float)l->steepness;
    }
    pb->alpha_algorithm = (Kasmina__V1__AlphaAlgorithm)l->algorithm;
}

void ksm_conv_set_alpha_to_pb(const struct ksm_lifecycle_args *l, Kasmina__V1__SetAlphaRequest *pb)
{
    kasmina__v1__set_alpha_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->alpha = (float)l->alpha;
}

/* ---- Gate, slot report, event ---- */

static int strv_to_pb(char (*src)[KSM_CHECK_MAX], int n, struct ksm_pb_arena *a, char ***out,
                      size_t *nout)
{
    if (n < 0) n = 0;
    if (n > KSM_GATE_MAX_CHECKS) n = KSM_GATE_MAX_CHECKS;
    *out = NULL;
    *nout = 0;
    if (n == 0) return 0;
    char **v = ANEWN(a, char *, (size_t)n);
    if (v == NULL) return KSM_ENOMEM;
    for (int i = 0; i < n; i++) v[i] = src[i];
    *out = v;
    *nout = (size_t)n;
    return 0;
}

int ksm_conv_gate_to_pb(const struct ksm_gate_result *g, struct ksm_pb_arena *a,
                        Kasmina__V1__GateResult *pb)
{
    kasmina__v1__gate_result__init(pb);
    pb->gate = (Kasmina__V1__GateLevel)g->gate;
    pb->passed = g->passed;
    pb->score = g->score;
    struct ksm_gate_result *mg = (struct ksm_gate_result *)g;
    TRY(strv_to_pb(mg->checks_passed, g->n_passed, a, &pb->checks_passed, &pb->n_checks_passed));
    TRY(strv_to_pb(mg->checks_failed, g->n_failed, a, &pb->checks_failed, &pb->n_checks_failed));
    pb->message = (char *)g->message;
    return 0;
}

int ksm_conv_gate_from_pb(const Kasmina__V1__GateResult *pb, struct ksm_gate_result *g, char *err,
                          size_t errlen)
{
    memset(g, 0, sizeof *g);
    if (pb == NULL) return 0;
    TRY(ksm_conv_gate_level_from_pb((int)pb->gate, "gate.gate", &g->gate, err, errlen));
    g->passed = pb->passed;
    g->score = pb->score;
    size_t np =
        pb->n_checks_passed < KSM_GATE_MAX_CHECKS ? pb->n_checks_passed : KSM_GATE_MAX_CHECKS;
    size_t nf =
        pb->n_checks_failed < KSM_GATE_MAX_CHECKS ? pb->n_checks_failed : KSM_GATE_MAX_CHECKS;
    for (size_t i = 0; i < np; i++)
        copy_str(g->checks_passed[i], KSM_CHECK_MAX, pb->checks_passed[i]);
    for (size_t i = 0; i < nf; i++)
        copy_str(g->checks_failed[i], KSM_CHECK_MAX, pb->checks_failed[i]);
    g->n_passed = (int)np;
    g->n_failed = (int)nf;
    copy_str(g->message, sizeof g->message, pb->message);
    return 0;
}

static int gradients_to_pb(const struct ksm_seed_telemetry *t, const struct ksm_seed_metrics *m,
                           struct ksm_pb_arena *a, Kasmina__V1__GradientStats **out)
{
    Kasmina__V1__GradientStats *g = ANEW(a, Kasmina__V1__GradientStats);
    if (g == NULL) return KSM_ENOMEM;
    kasmina__v1__gradient_stats__init(g);
    if (t->has_gradient_norm) {
        g->opt_gradient_norm_case = KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM;
        g->gradient_norm = t->gradient_norm;
    }
    if (t->has_gradient_health) {
        g->opt_gradient_health_case =
            KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
        g->gradient_health = t->gradient_health;
    }
    if (t->has_vanishing_flag) {
        g->opt_has_vanishing_case = KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING;
        g->has_vanishing = t->has_vanishing;
    }
    if (t->has_exploding_flag) {
        g->opt_has_exploding_case = KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
        g->has_exploding = t->has_exploding;
    }
    if (m != NULL && m->has_grad_ratio) {
        g->opt_seed_gradient_norm_ratio_case =
            KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
        g->seed_gradient_norm_ratio = m->seed_gradient_norm_ratio;
    }
    *out = g;
    return 0;
}

int ksm_conv_slot_report_to_pb(const char *model_id, const struct ksm_slot_report *r,
                               struct ksm_pb_arena *a, Kasmina__V1__SlotReport *pb)
{
    kasmina__v1__slot_report__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = (char *)r->slot_id;
    pb->occupied = r->occupied;
    pb->seed_id = (char *)r->seed_id;
    pb->blueprint_id = (char *)r->blueprint_id;
    pb->stage = (Kasmina__V1__Stage)r->stage;
    pb->previous_stage = (Kasmina__V1__Stage)r->previous_stage;
    pb->alpha_algorithm = (Kasmina__V1__AlphaAlgorithm)r->alpha_algorithm;
    Kasmina__V1__AlphaController *c = ANEW(a, Kasmina__V1__AlphaController);
    Kasmina__V1__SeedMetrics *m = ANEW(a, Kasmina__V1__SeedMetrics);
    if (c == NULL || m == NULL) return KSM_ENOMEM;
    kasmina__v1__alpha_controller__init(c);
    c->alpha = (float)r->controller.alpha;
    c->alpha_start = (float)r->controller.alpha_start;
    c->alpha_target = (float)r->controller.alpha_target;
    c->mode = (Kasmina__V1__AlphaMode)r->controller.mode;
    c->curve = (Kasmina__V1__AlphaCurve)r->controller.curve;
    c->steepness = (float)r->controller.steepness;
    c->steps_total = r->controller.steps_total;
    c->steps_done = r->controller.steps_done;
    pb->controller = c;
    pb->blend_tempo_epochs = r->blend_tempo_epochs;
    kasmina__v1__seed_metrics__init(m);
    const struct ksm_seed_metrics *sm = &r->metrics;
    m->epochs_total = sm->epochs_total;
    m->epochs_in_current_stage = sm->epochs_in_current_stage;
    m->initial_val_accuracy = sm->initial_val_accuracy;
    m->current_val_accuracy = sm->current_val_accuracy;
    m->best_val_accuracy = sm->best_val_accuracy;
    m->accuracy_at_stage_start = sm->accuracy_at_stage_start;
    m->total_improvement = r->total_improvement;
    m->improvement_since_stage_start = r->improvement_since_stage_start;
    if (sm->has_counterfactual) {
        m->opt_counterfactual_contribution_case =
            KASMINA__V1__SEED_METRICS__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION;
        m->counterfactual_contribution = sm->counterfactual_contribution;
    }
    m->contribution_velocity = sm->contribution_velocity;
    if (sm->has_grad_ratio) {
        m->opt_seed_gradient_norm_ratio_case =
            KASMINA__V1__SEED_METRICS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
        m->seed_gradient_norm_ratio = sm->seed_gradient_norm_ratio;
    }
    m->seed_param_count = sm->seed_param_count;
    m->host_param_count = sm->host_param_count;
    m->gradient_norm_avg = sm->gradient_norm_avg;
    m->current_alpha = sm->current_alpha;
    m->alpha_ramp_step = sm->alpha_ramp_step;
    pb->metrics = m;
    TRY(gradients_to_pb(&r->telemetry, sm, a, &pb->gradients));
    pb->isolate_gradients = r->isolate_gradients;
    pb->is_healthy = r->is_healthy;
    pb->seed_params = r->seed_params;
    pb->model_generation = r->model_generation;
    return 0;
}

int ksm_conv_slot_report_from_pb(const Kasmina__V1__SlotReport *pb, struct ksm_slot_report *r,
                                 char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    copy_str(r->slot_id, sizeof r->slot_id, pb->slot_id);
    r->occupied = pb->occupied;
    copy_str(r->seed_id, sizeof r->seed_id, pb->seed_id);
    copy_str(r->blueprint_id, sizeof r->blueprint_id, pb->blueprint_id);
    TRY(ksm_conv_stage_from_pb((int)pb->stage, "stage", &r->stage, err, errlen));
    TRY(ksm_conv_stage_from_pb((int)pb->previous_stage, "previous_stage", &r->previous_stage, err,
                               errlen));
    TRY(ksm_conv_algorithm_from_pb((int)pb->alpha_algorithm, "alpha_algorithm", &r->alpha_algorithm,
                                   err, errlen));
    if (pb->controller != NULL) {
        const Kasmina__V1__AlphaController *c = pb->controller;
        r->controller.alpha = c->alpha;
        r->controller.alpha_start = c->alpha_start;
        r->controller.alpha_target = c->alpha_target;
        if (c->mode < 0 || c->mode > 2)
            return fail(err, errlen, "controller.mode has an unknown value %d.", (int)c->mode);
        r->controller.mode = (enum ksm_alpha_mode)c->mode;
        TRY(ksm_conv_curve_from_pb((int)c->curve, "controller.curve", &r->controller.curve, err,
                                   errlen));
        r->controller.steepness = c->steepness;
        r->controller.steps_total = c->steps_total;
        r->controller.steps_done = c->steps_done;
    }
    r->blend_tempo_epochs = pb->blend_tempo_epochs;
    if (pb->metrics != NULL) {
        const Kasmina__V1__SeedMetrics *m = pb->metrics;
        struct ksm_seed_metrics *sm = &r->metrics;
        sm->epochs_total = m->epochs_total;
        sm->epochs_in_current_stage = m->epochs_in_current_stage;
        sm->initial_val_accuracy = m->initial_val_accuracy;
        sm->current_val_accuracy = m->current_val_accuracy;
        sm->best_val_accuracy = m->best_val_accuracy;
        sm->accuracy_at_stage_start = m->accuracy_at_stage_start;
        r->total_improvement = m->total_improvement;
        r->improvement_since_stage_start = m->improvement_since_stage_start;
        sm->has_counterfactual =
            m->opt_counterfactual_contribution_case ==
            KASMINA__V1__SEED_METRICS__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION;
        if (sm->has_counterfactual)
            sm->counterfactual_contribution = m->counterfactual_contribution;
        sm->contribution_velocity = m->contribution_velocity;
        sm->has_grad_ratio =
            m->opt_seed_gradient_norm_ratio_case ==
            KASMINA__V1__SEED_METRICS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
        if (sm->has_grad_ratio) sm->seed_gradient_norm_ratio = m->seed_gradient_norm_ratio;
        sm->seed_param_count = m->seed_param_count;
        sm->host_param_count = m->host_param_count;
        sm->gradient_norm_avg = m->gradient_norm_avg;
        sm->current_alpha = m->current_alpha;
        sm->alpha_ramp_step = m->alpha_ramp_step;
    }
    if (pb->gradients != NULL) {
        const Kasmina__V1__GradientStats *g = pb->gradients;
        struct ksm_seed_telemetry *t = &r->telemetry;
        t->has_gradient_norm = g->opt_gradient_norm_case ==
                               KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM;
        if (t->has_gradient_norm) t->gradient_norm = g->gradient_norm;
        t->has_gradient_health = g->opt_gradient_health_case ==
                                 KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
        if (t->has_gradient_health) t->gradient_health = g->gradient_health;
        t->has_vanishing_flag = g->opt_has_vanishing_case ==
                                KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING;
        if (t->has_vanishing_flag) t->has_vanishing = g->has_vanishing;
        t->has_exploding_flag = g->opt_has_exploding_case ==
                                KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
        if (t->has_exploding_flag) t->has_exploding = g->has_exploding;
        if (g->opt_seed_gradient_norm_ratio_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO) {
            r->metrics.has_grad_ratio = true;
            r->metrics.seed_gradient_norm_ratio = g->seed_gradient_norm_ratio;
        }
    }
    r->isolate_gradients = pb->isolate_gradients;
    r->is_healthy = pb->is_healthy;
    r->seed_params = pb->seed_params;
    r->model_generation = pb->model_generation;
    return 0;
}

static const char *const event_names[KSM_EV_COUNT] = {
    [KSM_EV_SEED_GERMINATED] = "SEED_GERMINATED",
    [KSM_EV_SEED_GATE_EVALUATED] = "SEED_GATE_EVALUATED",
    [KSM_EV_SEED_STAGE_CHANGED] = "SEED_STAGE_CHANGED",
    [KSM_EV_SEED_FOSSILIZED] = "SEED_FOSSILIZED",
    [KSM_EV_SEED_PRUNED] = "SEED_PRUNED",
};

int ksm_conv_event_type_parse(const char *s, enum ksm_event_type *out)
{
    for (int i = 0; i < KSM_EV_COUNT; i++)
        if (s != NULL && strcmp(s, event_names[i]) == 0) {
            *out = (enum ksm_event_type)i;
            return 0;
        }
    return KSM_EINVAL;
}

int ksm_conv_event_to_pb(uint64_t sequence, const struct ksm_lifecycle_event *ev,
                         struct ksm_pb_arena *a, Kasmina__V1__LifecycleEvent *pb)
{
    kasmina__v1__lifecycle_event__init(pb);
    pb->sequence = sequence;
    pb->event_type =
        (char *)((unsigned)ev->type < KSM_EV_COUNT ? event_names[ev->type] : "UNKNOWN");
    pb->model_id = (char *)ev->model_id;
    pb->slot_id = (char *)ev->slot_id;
    pb->seed_id = (char *)ev->seed_id;
    pb->timestamp_unix_ns = ev->timestamp_ns;
    pb->from_stage = (Kasmina__V1__Stage)ev->from_stage;
    pb->to_stage = (Kasmina__V1__Stage)ev->to_stage;
    pb->alpha = (float)ev->alpha;
    if (ev->type == KSM_EV_SEED_GATE_EVALUATED) {
        pb->gate = ANEW(a, Kasmina__V1__GateResult);
        if (pb->gate == NULL) return KSM_ENOMEM;
        TRY(ksm_conv_gate_to_pb(&ev->gate, a, pb->gate));
        if (ev->from_stage == KSM_STAGE_UNKNOWN && ev->target_stage != KSM_STAGE_UNKNOWN)
            pb->to_stage = (Kasmina__V1__Stage)ev->target_stage;
    }
    pb->reason = (char *)ev->reason;
    pb->initiator = (char *)ev->initiator;
    int n = ev->n_values < 0 ? 0 : ev->n_values > 12 ? 12 : ev->n_values;
    size_t extra = ev->type == KSM_EV_SEED_GATE_EVALUATED ? 1 : 0; /* target_stage */
    if (n + extra > 0) {
        pb->values = ANEWN(a, Kasmina__V1__LifecycleEvent__ValuesEntry *, (size_t)n + extra);
        Kasmina__V1__LifecycleEvent__ValuesEntry *e =
            ANEWN(a, Kasmina__V1__LifecycleEvent__ValuesEntry, (size_t)n + extra);
        if (pb->values == NULL || e == NULL) return KSM_ENOMEM;
        size_t k = 0;
        for (int i = 0; i < n; i++) {
            if (ev->values[i].key == NULL) continue;
            kasmina__v1__lifecycle_event__values_entry__init(&e[k]);
            e[k].key = (char *)ev->values[i].key;
            e[k].value = ev->values[i].value;
            pb->values[k] = &e[k];
            k++;
        }
        if (extra) {
            kasmina__v1__lifecycle_event__values_entry__init(&e[k]);
            e[k].key = "target_stage";
            e[k].value = (double)ev->target_stage;
            pb->values[k] = &e[k];
            k++;
        }
        pb->n_values = k;
    }
    return 0;
}

int ksm_conv_event_from_pb(const Kasmina__V1__LifecycleEvent *pb, uint64_t *sequence,
                           struct ksm_lifecycle_event *ev, char *err, size_t errlen)
{
    memset(ev, 0, sizeof *ev);
    *sequence = pb->sequence;
    if (ksm_conv_event_type_parse(pb->event_type, &ev->type) != 0)
        return fail(err, errlen, "event_type '%s' is not a known event type.",
                    str_or_empty(pb->event_type));
    copy_str(ev->model_id, sizeof ev->model_id, pb->model_id);
    copy_str(ev->slot_id, sizeof ev->slot_id, pb->slot_id);
    copy_str(ev->seed_id, sizeof ev->seed_id, pb->seed_id);
    ev->timestamp_ns = pb->timestamp_unix_ns;
    TRY(ksm_conv_stage_from_pb((int)pb->from_stage, "from_stage", &ev->from_stage, err, errlen));
    TRY(ksm_conv_stage_from_pb((int)pb->to_stage, "to_stage", &ev->to_stage, err, errlen));
    ev->alpha = pb->alpha;
    if (pb->gate != NULL) TRY(ksm_conv_gate_from_pb(pb->gate, &ev->gate, err, errlen));
    copy_str(ev->reason, sizeof ev->reason, pb->reason);
    copy_str(ev->initiator, sizeof ev->initiator, pb->initiator);
    int n = 0;
    for (size_t i = 0; i < pb->n_values; i++) {
        const Kasmina__V1__LifecycleEvent__ValuesEntry *e = pb->values[i];
        if (ev->type == KSM_EV_SEED_GATE_EVALUATED && e->key != NULL &&
            strcmp(e->key, "target_stage") == 0) {
            int v = (int)e->value;
            if (stage_valid(v)) ev->target_stage = (enum ksm_stage)v;
            continue;
        }
        if (n == 12) break;
        ev->values[n].key = e->key;
        ev->values[n].value = e->value;
        n++;
    }
    ev->n_values = n;
    return 0;
}

int ksm_conv_metrics_from_pb(const Kasmina__V1__RecordMetricsRequest *pb,
                             struct ksm_metrics_update *u, char *err, size_t errlen)
{
    memset(u, 0, sizeof *u);
    TRY(check_target(pb->model_id, pb->slot_id, true, err, errlen));
    if (pb->opt_val_accuracy_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_VAL_ACCURACY_VAL_ACCURACY) {
        TRY(ksm_conv_check_number(pb->val_accuracy, "val_accuracy", false, err, errlen));
        if (pb->val_accuracy < 0.0 || pb->val_accuracy > 100.0)
            return fail(err, errlen, "val_accuracy must be a percentage in [0, 100], got %g.",
                        pb->val_accuracy);
        u->has_val_accuracy = true;
        u->val_accuracy = pb->val_accuracy;
    }
    if (pb->opt_counterfactual_contribution_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION) {
        TRY(ksm_conv_check_number(pb->counterfactual_contribution, "counterfactual_contribution",
                                  false, err, errlen));
        u->has_counterfactual = true;
        u->counterfactual = pb->counterfactual_contribution;
    }
    const Kasmina__V1__GradientStats *g = pb->gradients;
    if (g != NULL) {
        if (g->opt_gradient_norm_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM) {
            TRY(ksm_conv_check_number(g->gradient_norm, "gradients.gradient_norm", false, err,
                                      errlen));
            if (g->gradient_norm < 0)
                return fail(err, errlen, "gradients.gradient_norm must be >= 0, got %g.",
                            g->gradient_norm);
            u->has_gradient_norm = true;
            u->gradient_norm = g->gradient_norm;
        }
        if (g->opt_gradient_health_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH) {
            TRY(ksm_conv_check_number(g->gradient_health, "gradients.gradient_health", false, err,
                                      errlen));
            if (g->gradient_health < 0 || g->gradient_health > 1)
                return fail(err, errlen, "gradients.gradient_health must be in [0, 1], got %g.",
                            g->gradient_health);
            u->has_gradient_health = true;
            u->gradient_health = g->gradient_health;
        }
        if (g->opt_has_vanishing_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING) {
            u->has_vanishing = true;
            u->vanishing = g->has_vanishing;
        }
        if (g->opt_has_exploding_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING) {
            u->has_exploding = true;
            u->exploding = g->has_exploding;
        }
        if (g->opt_seed_gradient_norm_ratio_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO) {
            TRY(ksm_conv_check_number(g->seed_gradient_norm_ratio,
                                      "gradients.seed_gradient_norm_ratio", false, err, errlen));
            if (g->seed_gradient_norm_ratio < 0)
                return fail(err, errlen, "gradients.seed_gradient_norm_ratio must be >= 0, got %g.",
                            g->seed_gradient_norm_ratio);
            u->has_grad_ratio = true;
            u->seed_gradient_norm_ratio = g->seed_gradient_norm_ratio;
        }
    }
    if (pb->opt_epoch_case == KASMINA__V1__RECORD_METRICS_REQUEST__OPT_EPOCH_EPOCH) {
        u->has_epoch = true;
        u->epoch = pb->epoch;
    }
    if (pb->opt_max_epochs_case == KASMINA__V1__RECORD_METRICS_REQUEST__OPT_MAX_EPOCHS_MAX_EPOCHS) {
        u->has_max_epochs = true;
        u->max_epochs = pb->max_epochs;
    }
    return 0;
}

int ksm_conv_metrics_to_pb(const char *model_id, const char *slot_id,
                           const struct ksm_metrics_update *u, struct ksm_pb_arena *a,
                           Kasmina__V1__RecordMetricsRequest *pb)
{
    kasmina__v1__record_metrics_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = pbstr(slot_id);
    if (u->has_val_accuracy) {
        pb->opt_val_accuracy_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_VAL_ACCURACY_VAL_ACCURACY;
        pb->val_accuracy = u->val_accuracy;
    }
    if (u->has_counterfactual) {
        pb->opt_counterfactual_contribution_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION;
        pb->counterfactual_contribution = u->counterfactual;
    }
    if (u->has_gradient_norm || u->has_gradient_health || u->has_vanishing || u->has_exploding ||
        u->has_grad_ratio) {
        Kasmina__V1__GradientStats *g = ANEW(a, Kasmina__V1__GradientStats);
        if (g == NULL) return KSM_ENOMEM;
        kasmina__v1__gradient_stats__init(g);
        if (u->has_gradient_norm) {
            g->opt_gradient_norm_case =
                KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM;
            g->gradient_norm = u->gradient_norm;
        }
        if (u->has_gradient_health) {
            g->opt_gradient_health_case =
                KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
            g->gradient_health = u->gradient_health;
        }
        if (u->has_vanishing) {
            g->opt_has_vanishing_case =
                KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING;
            g->has_vanishing = u->vanishing;
        }
        if (u->has_exploding) {
            g->opt_has_exploding_case =
                KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
            g->has_exploding = u->exploding;
        }
        if (u->has_grad_ratio) {
            g->opt_seed_gradient_norm_ratio_case =
                KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
            g->seed_gradient_norm_ratio = u->seed_gradient_norm_ratio;
        }
        pb->gradients = g;
    }
    if (u->has_epoch) {
        pb->opt_epoch_case = KASMINA__V1__RECORD_METRICS_REQUEST__OPT_EPOCH_EPOCH;
        pb->epoch = u->epoch;
    }
    if (u->has_max_epochs) {
        pb->opt_max_epochs_case = KASMINA__V1__RECORD_METRICS_REQUEST__OPT_MAX_EPOCHS_MAX_EPOCHS;
        pb->max_epochs = u->max_epochs;
    }
    return 0;
}

/* ---- Compute ---- */

static int output_dtype_check(int v, int *out, char *err, size_t errlen)
{
    if (v == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED || v == KASMINA__V1__DTYPE__DTYPE_F32 ||
        v == KASMINA__V1__DTYPE__DTYPE_F16 || v == KASMINA__V1__DTYPE__DTYPE_BF16) {
        *out = v == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED ? KASMINA__V1__DTYPE__DTYPE_F32 : v;
        return 0;
    }
    return fail(err, errlen, "output_dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got %d.", v);
}

static int input_tensor(const Kasmina__V1__Tensor *pb, const char *field, struct ksm_pb_arena *a,
                        const ksm_tensor **out, char *err, size_t errlen)
{
    ksm_tensor *t = ANEW(a, ksm_tensor);
    if (t == NULL) return KSM_ENOMEM;
    TRY(ksm_conv_tensor_from_pb(pb, field, a, t, err, errlen));
    *out = t;
    return 0;
}

int ksm_conv_forward_from_pb(const Kasmina__V1__ForwardRequest *pb, struct ksm_pb_arena *a,
                             struct ksm_forward_args *out, int *output_dtype, char *err,
                             size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(ksm_conv_check_model_id(pb->model_id, "model_id", true, err, errlen));
    TRY(input_tensor(pb->input, "input", a, &out->input, err, errlen));
    TRY(ksm_conv_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    TRY(output_dtype_check((int)pb->output_dtype, output_dtype, err, errlen));
    out->stream = str_or_empty(pb->stream);
    return 0;
}

int ksm_conv_fused_forward_from_pb(const Kasmina__V1__FusedForwardRequest *pb,
                                   struct ksm_pb_arena *a, struct ksm_forward_args *out,
                                   int *output_dtype, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(ksm_conv_check_model_id(pb->model_id, "model_id", true, err, errlen));
    TRY(input_tensor(pb->input, "input", a, &out->input, err, errlen));
    TRY(ksm_conv_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    TRY(output_dtype_check((int)pb->output_dtype, output_dtype, err, errlen));
    out->stream = str_or_empty(pb->stream);
    out->fused = true;
    if (pb->n_overrides > KSM_MAX_SLOTS)
        return fail(err, errlen, "overrides has %zu entries; at most %d are allowed.",
                    pb->n_overrides, KSM_MAX_SLOTS);
    if (out->input->ndim < 1)
        return fail(err, errlen, "input must have a batch dimension for a fused forward.");
    size_t rows = (size_t)out->input->shape[0];
    struct ksm_alpha_override *ov = ANEWN(a, struct ksm_alpha_override, pb->n_overrides);
    if (ov == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_overrides; i++) {
        const Kasmina__V1__AlphaOverride *o = pb->overrides[i];
        char f[96];
        snprintf(f, sizeof f, "overrides[%zu].slot_id", i);
        TRY(ksm_conv_check_slot_id(o->slot_id, f, true, err, errlen));
        for (size_t j = 0; j < i; j++)
            if (strcmp(o->slot_id, pb->overrides[j]->slot_id) == 0)
                return fail(err, errlen, "overrides[%zu] repeats slot '%s'.", i, o->slot_id);
        if (o->n_alpha != rows)
            return fail(err, errlen, "overrides[%zu].alpha has %zu values; the input has %zu rows.",
                        i, o->n_alpha, rows);
        for (size_t k = 0; k < o->n_alpha; k++)
            if (isnan(o->alpha[k]))
                return fail(err, errlen, "overrides[%zu].alpha[%zu] must not be NaN.", i, k);
        ov[i].slot_id = o->slot_id;
        ov[i].alpha = o->alpha;
        ov[i].n = o->n_alpha;
    }
    out->overrides = ov;
    out->n_overrides = pb->n_overrides;
    return 0;
}

static int input_to_pb(const ksm_tensor *t, struct ksm_pb_arena *a, Kasmina__V1__Tensor **out)
{
    *out = NULL;
    if (t == NULL) return 0;
    Kasmina__V1__Tensor *pb = ANEW(a, Kasmina__V1__Tensor);
    if (pb == NULL) return KSM_ENOMEM;
    TRY(ksm_conv_tensor_to_pb(t, a, pb));
    *out = pb;
    return 0;
}

int ksm_conv_forward_to_pb(const char *model_id, const struct ksm_forward_args *args,
                           int output_dtype, struct ksm_pb_arena *a,
                           Kasmina__V1__ForwardRequest *pb)
{
    kasmina__v1__forward_request__init(pb);
    pb->model_id = pbstr(model_id);
    TRY(input_to_pb(args->input, a, &pb->input));
    pb->stream = pbstr(args->stream);
    pb->output_dtype = (Kasmina__V1__DType)output_dtype;
    return 0;
}

int ksm_conv_fused_forward_to_pb(const char *model_id, const struct ksm_forward_args *args,
                                 int output_dtype, struct ksm_pb_arena *a,
                                 Kasmina__V1__FusedForwardRequest *pb)
{
    kasmina__v1__fused_forward_request__init(pb);
    pb->model_id = pbstr(model_id);
    TRY(input_to_pb(args->input, a, &pb->input));
    pb->stream = pbstr(args->stream);
    pb->output_dtype = (Kasmina__V1__DType)output_dtype;
    if (args->n_overrides > 0) {
        pb->overrides = ANEWN(a, Kasmina__V1__AlphaOverride *, args->n_overrides);
        Kasmina__V1__AlphaOverride *o = ANEWN(a, Kasmina__V1__AlphaOverride, args->n_overrides);
        if (pb->overrides == NULL || o == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < args->n_overrides; i++) {
            kasmina__v1__alpha_override__init(&o[i]);
            o[i].slot_id = pbstr(args->overrides[i].slot_id);
            o[i].alpha = (float *)args->overrides[i].alpha;
            o[i].n_alpha = args->overrides[i].n;
            pb->overrides[i] = &o[i];
        }
        pb->n_overrides = args->n_overrides;
    }
    return 0;
}

int ksm_conv_forward_result_to_pb(const struct ksm_forward_result *r, int output_dtype,
                                  struct ksm_pb_arena *a, Kasmina__V1__ForwardResponse *pb,
                                  char *err, size_t errlen)
{
    kasmina__v1__forward_response__init(pb);
    pb->output = ANEW(a, Kasmina__V1__Tensor);
    if (pb->output == NULL) return KSM_ENOMEM;
    TRY(ksm_conv_tensor_to_pb_as(&r->output, output_dtype, "output_dtype", a, pb->output, err,
                                 errlen));
    pb->model_generation = r->model_generation;
    pb->compute_ns = r->compute_ns;
    return 0;
}

static int forward_result_from_pb(const Kasmina__V1__ForwardResponse *pb, bool take,
                                  struct ksm_forward_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    if (take)
        TRY(ksm_conv_tensor_from_pb_take(pb->output, "output", &r->output, err, errlen));
    else
        TRY(ksm_conv_tensor_from_pb_copy(pb->output, "output", &r->output, err, errlen));
    r->model_generation = pb->model_generation;
    r->compute_ns = pb->compute_ns;
    return 0;
}

int ksm_conv_forward_result_from_pb(const Kasmina__V1__ForwardResponse *pb,
                                    struct ksm_forward_result *r, char *err, size_t errlen)
{
    return forward_result_from_pb(pb, false, r, err, errlen);
}

int ksm_conv_forward_result_take_pb(Kasmina__V1__ForwardResponse *pb, struct ksm_forward_result *r,
                                    char *err, size_t errlen)
{
    return forward_result_from_pb(pb, true, r, err, errlen);
}

int ksm_conv_alpha_config_from_pb(const Kasmina__V1__AlphaConfig *pb, size_t index,
                                  struct ksm_pb_arena *a, struct ksm_alpha_config *out, char *err,
                                  size_t errlen)
{
    memset(out, 0, sizeof *out);
    char f[96];
    snprintf(f, sizeof f, "configs[%zu].name", index);
    TRY(ksm_conv_check_string(pb->name, f, true, 63, err, errlen));
    if (pb->n_alpha > KSM_MAX_SLOTS)
        return fail(err, errlen, "configs[%zu].alpha has %zu entries; at most %d are allowed.",
                    index, pb->n_alpha, KSM_MAX_SLOTS);
    const char **ids = ANEWN(a, const char *, pb->n_alpha);
    float *al = ANEWN(a, float, pb->n_alpha);
    if (ids == NULL || al == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_alpha; i++) {
        const Kasmina__V1__AlphaConfig__AlphaEntry *e = pb->alpha[i];
        snprintf(f, sizeof f, "configs[%zu].alpha key", index);
        TRY(ksm_conv_check_slot_id(e->key, f, true, err, errlen));
        if (isnan(e->value))
            return fail(err, errlen, "configs[%zu].alpha['%s'] must not be NaN.", index, e->key);
        for (size_t j = 0; j < i; j++)
            if (strcmp(ids[j], e->key) == 0)
                return fail(err, errlen, "configs[%zu].alpha repeats slot '%s'.", index, e->key);
        ids[i] = e->key;
        al[i] = e->value;
    }
    out->name = pb->name;
    out->slot_ids = ids;
    out->alpha = al;
    out->n = pb->n_alpha;
    return 0;
}

int ksm_conv_alpha_config_to_pb(const struct ksm_alpha_config *c, struct ksm_pb_arena *a,
                                Kasmina__V1__AlphaConfig *pb)
{
    kasmina__v1__alpha_config__init(pb);
    pb->name = pbstr(c->name);
    if (c->n > 0) {
        pb->alpha = ANEWN(a, Kasmina__V1__AlphaConfig__AlphaEntry *, c->n);
        Kasmina__V1__AlphaConfig__AlphaEntry *e =
            ANEWN(a, Kasmina__V1__AlphaConfig__AlphaEntry, c->n);
        if (pb->alpha == NULL || e == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < c->n; i++) {
            kasmina__v1__alpha_config__alpha_entry__init(&e[i]);
            e[i].key = pbstr(c->slot_ids[i]);
            e[i].value = c->alpha[i];
            pb->alpha[i] = &e[i];
        }
        pb->n_alpha = c->n;
    }
    return 0;
}

int ksm_conv_evaluate_from_pb(const Kasmina__V1__EvaluateRequest *pb, struct ksm_pb_arena *a,
                              struct ksm_evaluate_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    TRY(ksm_conv_check_model_id(pb->model_id, "model_id", true, err, errlen));
    TRY(input_tensor(pb->input, "input", a, &out->input, err, errlen));
    TRY(input_tensor(pb->targets, "targets", a, &out->targets, err, errlen));
    if (out->targets->dtype != KSM_DTYPE_I64 && out->targets->dtype != KSM_DTYPE_I32)
        return fail(err, errlen, "targets.dtype must be DTYPE_I64 or DTYPE_I32.");
    TRY(ksm_conv_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    out->stream = str_or_empty(pb->stream);
    if (pb->n_configs == 0 && !pb->generate_standard)
        return fail(err, errlen, "configs must not be empty unless generate_standard is set.");
    if (pb->n_configs > 256)
        return fail(err, errlen, "configs has %zu entries; at most 256 are allowed.",
                    pb->n_configs);
    struct ksm_alpha_config *c = ANEWN(a, struct ksm_alpha_config, pb->n_configs);
    if (c == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_configs; i++) {
        TRY(ksm_conv_alpha_config_from_pb(pb->configs[i], i, a, &c[i], err, errlen));
        for (size_t j = 0; j < i; j++)
            if (strcmp(c[i].name, c[j].name) == 0)
                return fail(err, errlen, "configs[%zu].name repeats '%s'.", i, c[i].name);
    }
    out->configs = c;
    out->n_configs = pb->n_configs;
    out->generate_standard = pb->generate_standard;
    out->return_logits = pb->return_logits;
    return 0;
}

int ksm_conv_evaluate_to_pb(const char *model_id, const struct ksm_evaluate_args *args,
                            struct ksm_pb_arena *a, Kasmina__V1__EvaluateRequest *pb)
{
    kasmina__v1__evaluate_request__init(pb);
    pb->model_id = pbstr(model_id);
    TRY(input_to_pb(args->input, a, &pb->input));
    TRY(input_to_pb(args->targets, a, &pb->targets));
    if (args->n_configs > 0) {
        pb->configs = ANEWN(a, Kasmina__V1__AlphaConfig *, args->n_configs);
        Kasmina__V1__AlphaConfig *c = ANEWN(a, Kasmina__V1__AlphaConfig, args->n_configs);
        if (pb->configs == NULL || c == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < args->n_configs; i++) {
            TRY(ksm_conv_alpha_config_to_pb(&args->configs[i], a, &c[i]));
            pb->configs[i] = &c[i];
        }
        pb->n_configs = args->n_configs;
    }
    pb->generate_standard = args->generate_standard;
    pb->return_logits = args->return_logits;
    pb->stream = pbstr(args->stream);
    return 0;
}

int ksm_conv_config_result_to_pb(const struct ksm_config_result *c, struct ksm_pb_arena *a,
                                 Kasmina__V1__ConfigResult *pb)
{
    kasmina__v1__config_result__init(pb);
    pb->name = (char *)c->name;
    pb->loss = c->loss;
    pb->accuracy = c->accuracy;
    pb->correct = c->correct;
    pb->total = c->total;
    if (c->logits.data != NULL) TRY(input_to_pb(&c->logits, a, &pb->logits));
    return 0;
}

static int config_result_from_pb(const Kasmina__V1__ConfigResult *pb, bool take,
                                 struct ksm_config_result *c, char *err, size_t errlen)
{
    memset(c, 0, sizeof *c);
    copy_str(c->name, sizeof c->name, pb->name);
    c->loss = pb->loss;
    c->accuracy = pb->accuracy;
    c->correct = pb->correct;
    c->total = pb->total;
    if (pb->logits != NULL && take)
        TRY(ksm_conv_tensor_from_pb_take(pb->logits, "logits", &c->logits, err, errlen));
    else if (pb->logits != NULL)
        TRY(ksm_conv_tensor_from_pb_copy(pb->logits, "logits", &c->logits, err, errlen));
    return 0;
}

int ksm_conv_config_result_from_pb(const Kasmina__V1__ConfigResult *pb, struct ksm_config_result *c,
                                   char *err, size_t errlen)
{
    return config_result_from_pb(pb, false, c, err, errlen);
}

int ksm_conv_evaluate_result_to_pb(const struct ksm_evaluate_result *r, struct ksm_pb_arena *a,
                                   Kasmina__V1__EvaluateResponse *pb)
{
    kasmina__v1__evaluate_response__init(pb);
    if (r->n > 0) {
        pb->results = ANEWN(a, Kasmina__V1__ConfigResult *, r->n);
        Kasmina__V1__ConfigResult *c = ANEWN(a, Kasmina__V1__ConfigResult, r->n);
        if (pb->results == NULL || c == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < r->n; i++) {
            TRY(ksm_conv_config_result_to_pb(&r->results[i], a, &c[i]));
            pb->results[i] = &c[i];
        }
        pb->n_results = r->n;
    }
    pb->model_generation = r->model_generation;
    pb->compute_ns = r->compute_ns;
    return 0;
}

static int evaluate_result_from_pb(const Kasmina__V1__EvaluateResponse *pb, bool take,
                                   struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    r->model_generation = pb->model_generation;
    r->compute_ns = pb->compute_ns;
    if (pb->n_results == 0) return 0;
    r->results = calloc(pb->n_results, sizeof *r->results);
    if (r->results == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_results; i++) {
        int rc = config_result_from_pb(pb->results[i], take, &r->results[i], err, errlen);
        r->n = i + 1;
        if (rc != 0) return rc; /* the caller frees what was converted */
    }
    return 0;
}

int ksm_conv_evaluate_result_from_pb(const Kasmina__V1__EvaluateResponse *pb,
                                     struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    return evaluate_result_from_pb(pb, false, r, err, errlen);
}

int ksm_conv_evaluate_result_take_pb(Kasmina__V1__EvaluateResponse *pb,
                                     struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    return evaluate_result_from_pb(pb, true, r, err, errlen);
}

/* ---- Weights ---- */

static int names_to_pb(char **names, size_t n, struct ksm_pb_arena *a, char ***out, size_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (n == 0) return 0;
    char **v = ANEWN(a, char *, n);
    if (v == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < n; i++) v[i] = pbstr(names[i]);
    *out = v;
    *nout = n;
    return 0;
}

int ksm_conv_load_result_to_pb(const struct ksm_load_result *r, struct ksm_pb_arena *a,
                               Kasmina__V1__LoadWeightsResponse *pb)
{
    kasmina__v1__load_weights_response__init(pb);
    TRY(names_to_pb(r->loaded, r->n_loaded, a, &pb->loaded, &pb->n_loaded));
    TRY(names_to_pb(r->missing, r->n_missing, a, &pb->missing, &pb->n_missing));
    TRY(names_to_pb(r->unexpected, r->n_unexpected, a, &pb->unexpected, &pb->n_unexpected));
    return 0;
}

static int names_from_pb(char **src, size_t n, char ***out, size_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (n == 0) return 0;
    char **v = calloc(n, sizeof *v);
    if (v == NULL) return KSM_ENOMEM;
    *out = v;
    for (size_t i = 0; i < n; i++) {
        v[i] = strdup(str_or_empty(src[i]));
        if (v[i] == NULL) return KSM_ENOMEM;
        *nout = i + 1;
    }
    return 0;
}

int ksm_conv_load_result_from_pb(const Kasmina__V1__LoadWeightsResponse *pb,
                                 struct ksm_load_result *r)
{
    memset(r, 0, sizeof *r);
    TRY(names_from_pb(pb->loaded, pb->n_loaded, &r->loaded, &r->n_loaded));
    TRY(names_from_pb(pb->missing, pb->n_missing, &r->missing, &r->n_missing));
    TRY(names_from_pb(pb->unexpected, pb->n_unexpected, &r->unexpected, &r->n_unexpected));
    return 0;
}

/* ---- Statistics ---- */

static Kasmina__V1__StatTriple *stat_to_pb(const struct ksm_stat *s, struct ksm_pb_arena *a)
{
    Kasmina__V1__StatTriple *t = ANEW(a, Kasmina__V1__StatTriple);
    if (t == NULL) return NULL;
    kasmina__v1__stat_triple__init(t);
    t->current = s->current;
    t->peak = s->peak;
    t->allocated = s->allocated;
    t->freed = s->freed;
    return t;
}

static int pool_to_pb(const struct ksm_pool_stats *p, struct ksm_pb_arena *a,
                      Kasmina__V1__PoolStats **out)
{
    Kasmina__V1__PoolStats *pb = ANEW(a, Kasmina__V1__PoolStats);
    if (pb == NULL) return KSM_ENOMEM;
    kasmina__v1__pool_stats__init(pb);
    pb->allocated_bytes = stat_to_pb(&p->allocated_bytes, a);
    pb->reserved_bytes = stat_to_pb(&p->reserved_bytes, a);
    pb->active_bytes = stat_to_pb(&p->active_bytes, a);
    pb->inactive_split_bytes = stat_to_pb(&p->inactive_split_bytes, a);
    pb->allocation = stat_to_pb(&p->allocation, a);
    pb->segment = stat_to_pb(&p->segment, a);
    pb->active = stat_to_pb(&p->active, a);
    pb->inactive_split = stat_to_pb(&p->inactive_split, a);
    if (!pb->allocated_bytes || !pb->reserved_bytes || !pb->active_bytes ||
        !pb->inactive_split_bytes || !pb->allocation || !pb->segment || !pb->active ||
        !pb->inactive_split)
        return KSM_ENOMEM;
    *out = pb;
    return 0;
}

int ksm_conv_mem_stats_to_pb(const char *device, const struct ksm_mem_stats *s,
                             const char *const *model_ids, const uint64_t *model_bytes, size_t n,
                             struct ksm_pb_arena *a, Kasmina__V1__DeviceMemoryStats *pb)
{
    kasmina__v1__device_memory_stats__init(pb);
    pb->device = pbstr(device);
    TRY(pool_to_pb(&s->pool[KSM_POOL_ALL], a, &pb->all));
    TRY(pool_to_pb(&s->pool[KSM_POOL_SMALL], a, &pb->small_pool));
    TRY(pool_to_pb(&s->pool[KSM_POOL_LARGE], a, &pb->large_pool));
    pb->num_alloc_retries = s->num_alloc_retries;
    pb->num_ooms = s->num_ooms;
    pb->num_device_alloc = s->num_device_alloc;
    pb->num_device_free = s->num_device_free;
    pb->num_sync_all_streams = s->num_sync_all_streams;
    pb->cache_hits = s->cache_hits;
    pb->deferred_frees = s->deferred_frees;
    pb->memory_cap_bytes = s->memory_cap_bytes;
    pb->total_bytes = s->total_bytes;
    if (n > 0) {
        pb->per_model_bytes = ANEWN(a, Kasmina__V1__DeviceMemoryStats__PerModelBytesEntry *, n);
        Kasmina__V1__DeviceMemoryStats__PerModelBytesEntry *e =
            ANEWN(a, Kasmina__V1__DeviceMemoryStats__PerModelBytesEntry, n);
        if (pb->per_model_bytes == NULL || e == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < n; i++) {
            kasmina__v1__device_memory_stats__per_model_bytes_entry__init(&e[i]);
            e[i].key = pbstr(model_ids[i]);
            e[i].value = model_bytes[i];
            pb->per_model_bytes[i] = &e[i];
        }
        pb->n_per_model_bytes = n;
    }
    return 0;
}

static void stat_from_pb(const Kasmina__V1__StatTriple *t, struct ksm_stat *s)
{
    if (t == NULL) return;
    s->current = t->current;
    s->peak = t->peak;
    s->allocated = t->allocated;
    s->freed = t->freed;
}

static void pool_from_pb(const Kasmina__V1__PoolStats *pb, struct ksm_pool_stats *p)
{
    if (pb == NULL) return;
    stat_from_pb(pb->allocated_bytes, &p->allocated_bytes);
    stat_from_pb(pb->reserved_bytes, &p->reserved_bytes);
    stat_from_pb(pb->active_bytes, &p->active_bytes);
    stat_from_pb(pb->inactive_split_bytes, &p->inactive_split_bytes);
    stat_from_pb(pb->allocation, &p->allocation);
    stat_from_pb(pb->segment, &p->segment);
    stat_from_pb(pb->active, &p->active);
    stat_from_pb(pb->inactive_split, &p->inactive_split);
}

void ksm_conv_mem_stats_from_pb(const Kasmina__V1__DeviceMemoryStats *pb, char *device,
                                size_t devlen, struct ksm_mem_stats *s)
{
    memset(s, 0, sizeof *s);
    if (device != NULL) copy_str(device, devlen, pb->device);
    pool_from_pb(pb->all, &s->pool[KSM_POOL_ALL]);
    pool_from_pb(pb->small_pool, &s->pool[KSM_POOL_SMALL]);
    pool_from_pb(pb->large_pool, &s->pool[KSM_POOL_LARGE]);
    s->num_alloc_retries = pb->num_alloc_retries;
    s->num_ooms = pb->num_ooms;
    s->num_device_alloc = pb->num_device_alloc;
    s->num_device_free = pb->num_device_free;
    s->num_sync_all_streams = pb->num_sync_all_streams;
    s->cache_hits = pb->cache_hits;
    s->deferred_frees = pb->deferred_frees;
    s->memory_cap_bytes = pb->memory_cap_bytes;
    s->total_bytes = pb->total_bytes;
}

int ksm_conv_cache_counters_to_pb(const char *model_id, const struct ksm_cache_counters *c,
                                  struct ksm_pb_arena *a, Kasmina__V1__CacheCounters *pb)
{
    (void)a;
    kasmina__v1__cache_counters__init(pb);
    pb->cache = (char *)c->cache;
    pb->model_id = pbstr(model_id);
    pb->slot_id = (char *)c->slot_id;
    pb->hits = c->hits;
    pb->misses = c->misses;
    pb->evictions = c->evictions;
    pb->invalidations = c->invalidations;
    pb->entries = c->entries;
    pb->capacity = c->capacity;
    pb->bytes = c->bytes;
    return 0;
}

void ksm_conv_cache_counters_from_pb(const Kasmina__V1__CacheCounters *pb, char *model_id,
                                     struct ksm_cache_counters *c)
{
    memset(c, 0, sizeof *c);
    copy_str(c->cache, sizeof c->cache, pb->cache);
    if (model_id != NULL) copy_str(model_id, KSM_ID_MAX + 1, pb->model_id);
    copy_str(c->slot_id, sizeof c->slot_id, pb->slot_id);
    c->hits = pb->hits;
    c->misses = pb->misses;
    c->evictions = pb->evictions;
    c->invalidations = pb->invalidations;
    c->entries = pb->entries;
    c->capacity = pb->capacity;
    c->bytes = pb->bytes;
}
