/*
 * wire/pb_arena: the call arena that replies and converted requests are built in (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

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
