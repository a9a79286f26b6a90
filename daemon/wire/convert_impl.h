/*
 * wire/convert_impl: what the conversion files (convert_*.c, pb_arena.c) share: the error
 * sentence helper, string helpers and the arena and early-return macros.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/errors.h"
#include "wire/convert.h"

/* model_id (required) and slot_id (required when slot_required) of a lifecycle call. */
int ksm_wire_check_target(const char *model_id, const char *slot_id, bool slot_required, char *err,
                          size_t errlen);

/* Strings the engine stores in fixed buffers; pb strings are never NULL after unpack, but
 * messages built by hand may carry NULL. */
static inline const char *str_or_empty(const char *s) { return s != NULL ? s : ""; }
static inline char *pbstr(const char *s) { return (char *)(s != NULL ? s : ""); }

static inline void copy_str(char *dst, size_t cap, const char *src)
{
    if (cap == 0) return;
    src = str_or_empty(src);
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

#define ANEW(a, type) ((type *)ksm_pb_arena_alloc((a), sizeof(type)))
#define ANEWN(a, type, n)                                                                          \
    ((n) > SIZE_MAX / sizeof(type) ? NULL : (type *)ksm_pb_arena_alloc((a), (n) * sizeof(type)))
