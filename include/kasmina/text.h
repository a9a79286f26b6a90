/*
 * kasmina/text: the one rule for the strings kasmina accepts, stores and sends.
 *
 * Every string that reaches the engine (ids, seed ids, prune reasons, Evaluate config names, ...)
 * is strict UTF-8 with no NUL byte: proto3 `string` fields must be UTF-8 (a typed client cannot
 * decode a reply or an event that is not), the state directory's JSON must be (jansson refuses
 * anything else, so a stored non-UTF-8 seed id would make the journal unrestorable), and a NUL
 * would silently cut the id the engine sees ("a\0b" acting on "a").
 *
 * Identifiers (model ids, slot ids) follow one grammar on top of that, chosen so an id is always a
 * safe file name in the state directory and never one of its own names (which begin with '.'):
 *
 *     id = [A-Za-z0-9_] [A-Za-z0-9._-]*      (1..max bytes; max = KSM_ID_MAX for models)
 *
 * so ".", "..", ".hidden", "-rf" and "a/b" are refused.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Incremental strict UTF-8 check, for text that arrives in pieces (wire/pbgather walks the wire
 * format across gRPC slices). Start from {0}; feed bytes in order; the text is valid when every
 * ksm_utf8_feed returned true and ksm_utf8_done is true at its end. */
struct ksm_utf8_state {
    unsigned char need;   /* continuation bytes still expected */
    unsigned char lo, hi; /* the range of the next continuation byte */
};
/* false on a byte that cannot come next (NUL included). */
bool ksm_utf8_feed(struct ksm_utf8_state *st, unsigned char b);
/* false when the text stopped inside a character. */
static inline bool ksm_utf8_done(const struct ksm_utf8_state *st) { return st->need == 0; }

/* s[0..n) is strict UTF-8 without NUL. On false, *bad_at (may be NULL) = the offset of the first
 * byte that is wrong (n when the text ends inside a character). */
bool ksm_utf8_valid(const char *s, size_t n, size_t *bad_at);

/* The id grammar above, 1..max bytes. On false, *bad_at (may be NULL) = the offset of the first
 * wrong byte (0 for an empty id, max for a long one). */
bool ksm_id_valid(const char *s, size_t max, size_t *bad_at);

/* Copies the NUL-terminated src into dst[cap] (cap > 0), cut at a character boundary when it is
 * too long, so a truncated UTF-8 string stays valid. Returns the bytes copied. */
size_t ksm_utf8_copy(char *dst, size_t cap, const char *src);

#ifdef __cplusplus
}
#endif
