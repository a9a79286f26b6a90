/*
 * wire/convert_tensor: Tensor <-> ksm_tensor, borrowed, copied or taken; output dtypes
 * (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

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
    if (pb == NULL) return ksm_errf(err, errlen, KSM_EINVAL, "%s must be set.", field);
    char f[96];
    snprintf(f, sizeof f, "%s.dtype", field);
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_dtype_from_pb((int)pb->dtype, f, &out->dtype, err, errlen));
    if (pb->n_shape > KSM_MAX_DIMS)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "%s.shape has %zu dimensions; at most %d are allowed.", field, pb->n_shape,
                        KSM_MAX_DIMS);
    size_t esz = dtype_size(out->dtype);
    uint64_t limit = (uint64_t)INT64_MAX / esz;
    uint64_t numel = 1;
    for (size_t i = 0; i < pb->n_shape; i++) {
        int64_t d = pb->shape[i];
        if (d < 0)
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "%s.shape[%zu] is %lld; dimensions must be >= 0.", field, i,
                            (long long)d);
        if (d != 0 && numel > limit / (uint64_t)d)
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "%s.shape overflows: the element count is too large.", field);
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
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "%s.data has %zu bytes but dtype and shape need %llu (numel %llu x %zu).",
                        field, pb->data.len, (unsigned long long)want, (unsigned long long)numel,
                        esz);
    *nbytes = (size_t)want;
    return 0;
}

static _Alignas(16) unsigned char empty_tensor_data[16];

int ksm_wire_tensor_from_pb(const Kasmina__V1__Tensor *pb, const char *field,
                            struct ksm_pb_arena *a, ksm_tensor *out, char *err, size_t errlen)
{
    size_t nbytes;
    KSM_TRY(tensor_header(pb, field, out, &nbytes, err, errlen));
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

int ksm_wire_tensor_from_pb_copy(const Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                                 char *err, size_t errlen)
{
    size_t nbytes;
    KSM_TRY(tensor_header(pb, field, out, &nbytes, err, errlen));
    out->data = malloc(nbytes > 0 ? nbytes : 1);
    if (out->data == NULL) return KSM_ENOMEM;
    if (nbytes > 0) memcpy(out->data, pb->data.data, nbytes);
    return 0;
}

int ksm_wire_tensor_from_pb_take(Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                                 char *err, size_t errlen)
{
    size_t nbytes;
    KSM_TRY(tensor_header(pb, field, out, &nbytes, err, errlen));
    if (nbytes == 0 || ((uintptr_t)pb->data.data % dtype_size(out->dtype)) != 0)
        return ksm_wire_tensor_from_pb_copy(pb, field, out, err, errlen);
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

int ksm_wire_tensor_to_pb(const ksm_tensor *t, struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb)
{
    KSM_TRY(tensor_shape_to_pb(t, a, pb));
    if (!contiguous(t)) return KSM_EINVAL;
    pb->dtype = ksm_wire_dtype_to_pb(t->dtype);
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

int ksm_wire_tensor_to_pb_as(const ksm_tensor *t, int dtype, const char *field,
                             struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb, char *err,
                             size_t errlen)
{
    if (dtype == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED || dtype == KASMINA__V1__DTYPE__DTYPE_F32 ||
        t->dtype != KSM_DTYPE_F32) {
        if (dtype != KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED &&
            (int)ksm_wire_dtype_to_pb(t->dtype) != dtype)
            return ksm_errf(err, errlen, KSM_EINVAL, "%s %d cannot be produced from a %s result.",
                            field, dtype, t->dtype == KSM_DTYPE_F32 ? "F32" : "non-F32");
        return ksm_wire_tensor_to_pb(t, a, pb);
    }
    if (dtype != KASMINA__V1__DTYPE__DTYPE_F16 && dtype != KASMINA__V1__DTYPE__DTYPE_BF16)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16.",
                        field);
    KSM_TRY(tensor_shape_to_pb(t, a, pb));
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
