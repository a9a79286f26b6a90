/*
 * wire/convert_check: the validators every conversion uses: errors, enum values, ids, strings
 * and numbers (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

#include <stdarg.h>

#include "kasmina/text.h"

/* ---- Enums ---- */

int ksm_wire_dtype_from_pb(int v, const char *field, enum ksm_dtype *out, char *err, size_t errlen)
{
    switch (v) {
    case KASMINA__V1__DTYPE__DTYPE_F32: *out = KSM_DTYPE_F32; return 0;
    case KASMINA__V1__DTYPE__DTYPE_F16: *out = KSM_DTYPE_F16; return 0;
    case KASMINA__V1__DTYPE__DTYPE_BF16: *out = KSM_DTYPE_BF16; return 0;
    case KASMINA__V1__DTYPE__DTYPE_I64: *out = KSM_DTYPE_I64; return 0;
    case KASMINA__V1__DTYPE__DTYPE_I32: *out = KSM_DTYPE_I32; return 0;
    case KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED:
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "%s must be set (DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I64 or "
                        "DTYPE_I32).",
                        field);
    default:
        return ksm_errf(err, errlen, KSM_EINVAL, "%s has an unknown DType value %d.", field, v);
    }
}

Kasmina__V1__DType ksm_wire_dtype_to_pb(enum ksm_dtype d)
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

int ksm_wire_stage_from_pb(int v, const char *field, enum ksm_stage *out, char *err, size_t errlen)
{
    if (v == 5)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s 5 (SHADOWING) is retired and not accepted.",
                        field);
    if (!ksm_stage_valid(v))
        return ksm_errf(err, errlen, KSM_EINVAL, "%s has an unknown Stage value %d.", field, v);
    *out = (enum ksm_stage)v;
    return 0;
}

int ksm_wire_curve_from_pb(int v, const char *field, enum ksm_alpha_curve *out, char *err,
                           size_t errlen)
{
    if (v < 0 || v > 3)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s has an unknown AlphaCurve value %d.", field,
                        v);
    *out = (enum ksm_alpha_curve)v;
    return 0;
}

int ksm_wire_algorithm_from_pb(int v, const char *field, enum ksm_alpha_algorithm *out, char *err,
                               size_t errlen)
{
    if (v < 0 || v > 3)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s has an unknown AlphaAlgorithm value %d.",
                        field, v);
    *out = (enum ksm_alpha_algorithm)v;
    return 0;
}

int ksm_wire_gate_level_from_pb(int v, const char *field, enum ksm_gate_level *out, char *err,
                                size_t errlen)
{
    if (v < 0 || v > 5 || v == 4)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s has an unknown GateLevel value %d.", field, v);
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
    if (n == 0)
        return required ? ksm_errf(err, errlen, KSM_EINVAL, "%s must not be empty.", field) : 0;
    if (n > max)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s is %zu bytes long; at most %zu are allowed.",
                        field, n, max);
    if (!ksm_id_valid(s, max, &bad))
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "%s must match [A-Za-z0-9_][A-Za-z0-9._-]{0,%zu} (bad byte at offset %zu).",
                        field, max - 1, bad);
    return 0;
}

int ksm_wire_check_model_id(const char *s, const char *field, bool required, char *err,
                            size_t errlen)
{
    return check_id(s, field, required, KSM_ID_MAX, err, errlen);
}

int ksm_wire_check_string(const char *s, const char *field, bool required, size_t max, char *err,
                          size_t errlen)
{
    s = str_or_empty(s);
    size_t n = strlen(s), bad = 0;
    if (n == 0)
        return required ? ksm_errf(err, errlen, KSM_EINVAL, "%s must not be empty.", field) : 0;
    if (n > max)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s is %zu bytes long; at most %zu are allowed.",
                        field, n, max);
    if (!ksm_utf8_valid(s, n, &bad))
        return ksm_errf(err, errlen, KSM_EINVAL, "%s is not valid UTF-8 (byte %zu).", field, bad);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "%s contains a control character at offset %zu.", field, i);
    return 0;
}

int ksm_wire_check_slot_id(const char *s, const char *field, bool required, char *err,
                           size_t errlen)
{
    return check_id(s, field, required, KSM_SLOT_ID_MAX - 1, err, errlen);
}

int ksm_wire_check_number(double v, const char *field, bool allow_inf, char *err, size_t errlen)
{
    if (isnan(v)) return ksm_errf(err, errlen, KSM_EINVAL, "%s must not be NaN.", field);
    if (!allow_inf && isinf(v))
        return ksm_errf(err, errlen, KSM_EINVAL, "%s must be finite.", field);
    return 0;
}
