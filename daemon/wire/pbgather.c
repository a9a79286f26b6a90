/*
 * wire/pbgather: unpack with big bytes fields copied once (pbgather.h).
 *
 * Pass 1 (scan) walks the wire format over the pieces with a cursor, one message level per
 * recursion, and records "events" at increasing absolute offsets:
 *   - FIXUP: a length varint to rewrite (same width, smaller value): the length of a big bytes
 *     field (to 0) and of each message that contains one (minus the bytes removed inside);
 *   - PAYLOAD: the bytes of a big field, which go to their own buffer instead of the output.
 * and, per big field, the path to it: (field, occurrence) per message level.
 * Pass 2 (emit) copies the pieces into the small buffer, applying the events in order, and each
 * payload into its aligned buffer. protobuf-c then unpacks the small buffer and the big buffers
 * are attached along their paths.
 *
 * protobuf-c reads a length prefix of up to 5 varint bytes and does not require the minimal
 * encoding, so a smaller length written with the original width parses as that length: no other
 * offset moves but by the payloads removed.
 */
#include "wire/pbgather.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/text.h"

#define MAX_EVENTS 64
#define MAX_BIG    16
#define MAX_DEPTH  16
#define MAX_FIELDS 128 /* per message descriptor: occurrence counts live on the stack */
#define ALIGN      64

// ---- Cursor over the pieces ----

struct cursor {
    const struct ksm_pb_piece *p;
    size_t n;
    size_t i;   /* current piece */
    size_t off; /* offset in it */
    size_t pos; /* absolute offset */
};

static void cur_init(struct cursor *c, const struct ksm_pb_piece *p, size_t n)
{
    *c = (struct cursor){.p = p, .n = n};
    while (c->i < c->n && c->p[c->i].len == 0) c->i++;
}

static bool cur_byte(struct cursor *c, uint8_t *b)
{
    if (c->i >= c->n) return false;
    *b = c->p[c->i].data[c->off++];
    c->pos++;
    if (c->off == c->p[c->i].len) {
        c->off = 0;
        do c->i++;
        while (c->i < c->n && c->p[c->i].len == 0);
    }
    return true;
}

/* Copies (dst != NULL) or skips n bytes. */
static bool cur_take(struct cursor *c, uint8_t *dst, size_t n)
{
    while (n > 0) {
        if (c->i >= c->n) return false;
        size_t k = c->p[c->i].len - c->off;
        if (k > n) k = n;
        if (dst != NULL) {
            memcpy(dst, c->p[c->i].data + c->off, k);
            dst += k;
        }
        c->off += k;
        c->pos += k;
        n -= k;
        if (c->off == c->p[c->i].len) {
            c->off = 0;
            do c->i++;
            while (c->i < c->n && c->p[c->i].len == 0);
        }
    }
    return true;
}

/* A varint of at most max_width bytes; *width = its byte count. */
static bool cur_varint(struct cursor *c, uint64_t *v, unsigned *width, unsigned max_width)
{
    uint64_t x = 0;
    for (unsigned i = 0; i < max_width; i++) {
        uint8_t b;
        if (!cur_byte(c, &b)) return false;
        x |= (uint64_t)(b & 0x7f) << (7 * i);
        if ((b & 0x80) == 0) {
            *v = x;
            *width = i + 1;
            return true;
        }
    }
    return false;
}

// ---- Pass 1: scan ----

enum ev_kind { EV_FIXUP, EV_PAYLOAD };

struct event {
    enum ev_kind kind;
    size_t pos;     /* absolute offset of the varint or of the payload */
    unsigned width; /* FIXUP: varint bytes */
    uint64_t value; /* FIXUP: the new length */
    size_t len;     /* PAYLOAD: bytes */
    int big;        /* PAYLOAD: index into scan.big */
};

struct step {
    const ProtobufCFieldDescriptor *f;
    size_t index; /* occurrence of f in its message (the element, for a repeated field) */
};

struct big_field {
    struct step path[MAX_DEPTH + 1]; /* message fields, then the bytes field */
    int depth;                       /* number of steps */
    size_t len;
    uint8_t *buf;
};

struct scan {
    size_t big_min;
    struct event ev[MAX_EVENTS];
    int n_ev;
    struct big_field big[MAX_BIG];
    int n_big;
    struct step path[MAX_DEPTH];
    int depth;
};

static struct event *add_event(struct scan *s)
{
    if (s->n_ev == MAX_EVENTS) return NULL;
    struct event *e = &s->ev[s->n_ev++];
    memset(e, 0, sizeof *e);
    return e;
}

/* Scans one message of type d from c up to absolute offset end. Returns false to give up (the
 * plain way); *removed = payload bytes taken out of this message (its fields and below). */
static bool scan_message(struct scan *s, struct cursor *c, const ProtobufCMessageDescriptor *d,
                         size_t end, size_t *removed)
{
    if (d->n_fields > MAX_FIELDS) return false;
    uint32_t seen[MAX_FIELDS];
    memset(seen, 0, sizeof seen);
    size_t rm = 0;
    while (c->pos < end) {
        uint64_t tag, v;
        unsigned w;
        if (!cur_varint(c, &tag, &w, 5)) return false;
        uint32_t number = (uint32_t)(tag >> 3);
        if (number == 0) return false;
        switch (tag & 7) {
        case PROTOBUF_C_WIRE_TYPE_VARINT:
            if (!cur_varint(c, &v, &w, 10)) return false;
            continue;
        case PROTOBUF_C_WIRE_TYPE_64BIT:
            if (!cur_take(c, NULL, 8)) return false;
            continue;
        case PROTOBUF_C_WIRE_TYPE_32BIT:
            if (!cur_take(c, NULL, 4)) return false;
            continue;
        case PROTOBUF_C_WIRE_TYPE_LENGTH_PREFIXED: break;
        default: return false; /* groups: protobuf-c rejects them; let it say so */
        }
        size_t len_pos = c->pos;
        unsigned width;
        uint64_t len;
        if (!cur_varint(c, &len, &width, 5) || len > (uint64_t)INT32_MAX) return false;
        size_t payload = c->pos;
        if (payload > end || len > end - payload) return false;
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(d, number);
        bool plain = f == NULL || (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) != 0;
        size_t idx = f != NULL ? (size_t)(f - d->fields) : 0;
        if (!plain && f->type == PROTOBUF_C_TYPE_BYTES && f->label != PROTOBUF_C_LABEL_REPEATED) {
            if (seen[idx]++ > 0) return false; /* the last one would win */
            if (s->big_min > 0 && len >= s->big_min) {
                if (s->n_big == MAX_BIG) return false;
                struct event *fx = add_event(s), *pl = fx ? add_event(s) : NULL;
                if (pl == NULL) return false;
                *fx = (struct event){.kind = EV_FIXUP, .pos = len_pos, .width = width, .value = 0};
                *pl =
                    (struct event){.kind = EV_PAYLOAD, .pos = payload, .len = len, .big = s->n_big};
                struct big_field *b = &s->big[s->n_big++];
                memcpy(b->path, s->path, (size_t)s->depth * sizeof *s->path);
                b->path[s->depth] = (struct step){.f = f, .index = 0};
                b->depth = s->depth + 1;
                b->len = len;
                b->buf = NULL;
                rm += len;
            }
            if (!cur_take(c, NULL, len)) return false;
            continue;
        }
        if (!plain && f->type == PROTOBUF_C_TYPE_MESSAGE) {
            size_t occ = seen[idx]++;
            if (f->label != PROTOBUF_C_LABEL_REPEATED && occ > 0) return false; /* merged */
            if (s->depth == MAX_DEPTH) return false;
            int slot = s->n_ev;
            struct event *fx = add_event(s);
            if (fx == NULL) return false;
            *fx = (struct event){.kind = EV_FIXUP, .pos = len_pos, .width = width};
            s->path[s->depth++] = (struct step){.f = f, .index = occ};
            size_t sub = 0;
            bool ok = scan_message(s, c, f->descriptor, payload + (size_t)len, &sub);
            s->depth--;
            if (!ok) return false;
            if (sub == 0) {
                /* nothing removed inside (so nothing recorded): drop its fixup, the last event */
                if (s->n_ev != slot + 1) return false;
                s->n_ev--;
            } else {
                s->ev[slot].value = len - sub;
                rm += sub;
            }
            continue;
        }
        if (!cur_take(c, NULL, len)) return false;
    }
    if (c->pos != end) return false;
    *removed = rm;
    return true;
}

// ---- Pass 2: emit, unpack, attach ----

static void put_varint(uint8_t *dst, uint64_t v, unsigned width)
{
    for (unsigned i = 0; i < width; i++) {
        dst[i] = (uint8_t)(v & 0x7f) | (i + 1 < width ? 0x80 : 0);
        v >>= 7;
    }
}

static bool emit(struct scan *s, const struct ksm_pb_piece *p, size_t n, size_t total, uint8_t *out)
{
    struct cursor c;
    cur_init(&c, p, n);
    for (int k = 0; k < s->n_ev; k++) {
        struct event *e = &s->ev[k];
        size_t gap = e->pos - c.pos;
        if (!cur_take(&c, out, gap)) return false;
        out += gap;
        if (e->kind == EV_FIXUP) {
            if (!cur_take(&c, NULL, e->width)) return false;
            put_varint(out, e->value, e->width);
            out += e->width;
        } else if (!cur_take(&c, s->big[e->big].buf, e->len)) {
            return false;
        }
    }
    return cur_take(&c, out, total - c.pos);
}

/* The bytes field at the end of b's path in m, or NULL when the message does not have the shape
 * the scan saw (which would be a bug: the caller then takes the plain way). */
static ProtobufCBinaryData *field_at(ProtobufCMessage *m, const struct big_field *b)
{
    for (int i = 0; i < b->depth; i++) {
        const ProtobufCFieldDescriptor *f = b->path[i].f;
        if (m == NULL) return NULL;
        char *member = (char *)m + f->offset;
        if (i == b->depth - 1) {
            ProtobufCBinaryData *bd = (ProtobufCBinaryData *)(void *)member;
            return bd->len == 0 ? bd : NULL;
        }
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t count = *(size_t *)(void *)((char *)m + f->quantifier_offset);
            if (b->path[i].index >= count) return NULL;
            m = (*(ProtobufCMessage ***)(void *)member)[b->path[i].index];
        } else {
            m = *(ProtobufCMessage **)(void *)member;
        }
    }
    return NULL;
}

static ProtobufCMessage *unpack_plain(const ProtobufCMessageDescriptor *d,
                                      const struct ksm_pb_piece *p, size_t n, size_t total)
{
    size_t nonempty = 0, at = 0;
    for (size_t i = 0; i < n; i++)
        if (p[i].len > 0) {
            nonempty++;
            at = i;
        }
    if (nonempty <= 1) /* already contiguous */
        return protobuf_c_message_unpack(d, NULL, total, nonempty ? p[at].data : NULL);
    uint8_t *all = malloc(total);
    if (all == NULL) return NULL;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i].len > 0) memcpy(all + off, p[i].data, p[i].len);
        off += p[i].len;
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, total, all);
    free(all);
    return m;
}

ProtobufCMessage *ksm_pb_unpack_pieces(const ProtobufCMessageDescriptor *d,
                                       const struct ksm_pb_piece *p, size_t n, size_t big,
                                       size_t *n_direct)
{
    if (n_direct != NULL) *n_direct = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i].len > SIZE_MAX - total) return NULL;
        total += p[i].len;
    }
    if (big == 0 || total < big) return unpack_plain(d, p, n, total);

    struct scan *s = calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->big_min = big;
    struct cursor c;
    cur_init(&c, p, n);
    size_t removed = 0;
    ProtobufCMessage *m = NULL;
    uint8_t *small = NULL;
    if (!scan_message(s, &c, d, total, &removed) || s->n_big == 0) goto plain;
    for (int i = 0; i < s->n_big; i++) {
        size_t len = s->big[i].len;
        s->big[i].buf = aligned_alloc(ALIGN, (len + ALIGN - 1) / ALIGN * ALIGN);
        if (s->big[i].buf == NULL) goto plain;
    }
    size_t small_len = total - removed;
    small = malloc(small_len > 0 ? small_len : 1);
    if (small == NULL || !emit(s, p, n, total, small)) goto plain;
    m = protobuf_c_message_unpack(d, NULL, small_len, small);
    if (m == NULL) goto plain;
    ProtobufCBinaryData *at[MAX_BIG];
    for (int i = 0; i < s->n_big; i++)
        if ((at[i] = field_at(m, &s->big[i])) == NULL) goto plain;
    for (int i = 0; i < s->n_big; i++) {
        at[i]->data = s->big[i].buf; /* the message owns it now */
        at[i]->len = s->big[i].len;
        s->big[i].buf = NULL;
    }
    if (n_direct != NULL) *n_direct = (size_t)s->n_big;
    free(small);
    free(s);
    return m;

plain:
    if (m != NULL) protobuf_c_message_free_unpacked(m, NULL);
    free(small);
    for (int i = 0; i < s->n_big; i++) free(s->big[i].buf);
    free(s);
    return unpack_plain(d, p, n, total);
}

// ---- Text check ----

struct text_walk {
    char path[256]; /* "overrides[1].slot_id" of the field being read */
    char *err;
    size_t errlen;
};

/* Checks the string fields of one message of type d from c up to offset end. Returns 0 (all
 * text valid, or the input is malformed: the unpack names that), or KSM_EINVAL with err set. */
static int text_message(struct text_walk *w, struct cursor *c, const ProtobufCMessageDescriptor *d,
                        size_t end, int depth)
{
    uint32_t seen[MAX_FIELDS];
    memset(seen, 0, sizeof seen);
    size_t base = strlen(w->path);
    while (c->pos < end) {
        uint64_t tag, v;
        unsigned width;
        if (!cur_varint(c, &tag, &width, 5)) return 0;
        switch (tag & 7) {
        case PROTOBUF_C_WIRE_TYPE_VARINT:
            if (!cur_varint(c, &v, &width, 10)) return 0;
            continue;
        case PROTOBUF_C_WIRE_TYPE_64BIT:
            if (!cur_take(c, NULL, 8)) return 0;
            continue;
        case PROTOBUF_C_WIRE_TYPE_32BIT:
            if (!cur_take(c, NULL, 4)) return 0;
            continue;
        case PROTOBUF_C_WIRE_TYPE_LENGTH_PREFIXED: break;
        default: return 0;
        }
        uint64_t len;
        if (!cur_varint(c, &len, &width, 5) || c->pos > end || len > end - c->pos) return 0;
        const ProtobufCFieldDescriptor *f =
            protobuf_c_message_descriptor_get_field(d, (unsigned)(tag >> 3));
        if (f == NULL ||
            (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)) {
            if (!cur_take(c, NULL, (size_t)len)) return 0;
            continue;
        }
        size_t idx = (size_t)(f - d->fields);
        uint32_t occ = idx < MAX_FIELDS ? seen[idx]++ : 0;
        if (f->label == PROTOBUF_C_LABEL_REPEATED)
            snprintf(w->path + base, sizeof w->path - base, "%s%s[%u]", base ? "." : "", f->name,
                     occ);
        else
            snprintf(w->path + base, sizeof w->path - base, "%s%s", base ? "." : "", f->name);
        if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            if (depth >= MAX_DEPTH) {
                snprintf(w->err, w->errlen, "%s is nested more than %d messages deep.", w->path,
                         MAX_DEPTH);
                return KSM_EINVAL;
            }
            int rc = text_message(w, c, f->descriptor, c->pos + (size_t)len, depth + 1);
            if (rc != 0) return rc;
        } else {
            struct ksm_utf8_state st = {0};
            size_t lead = 0;
            for (uint64_t i = 0; i < len; i++) {
                uint8_t b;
                if (!cur_byte(c, &b)) return 0;
                if (ksm_utf8_done(&st)) lead = (size_t)i;
                if (!ksm_utf8_feed(&st, b)) {
                    if (b == 0)
                        snprintf(w->err, w->errlen, "%s contains a NUL byte at offset %llu.",
                                 w->path, (unsigned long long)i);
                    else
                        snprintf(w->err, w->errlen, "%s is not valid UTF-8 (byte %llu).", w->path,
                                 (unsigned long long)i);
                    return KSM_EINVAL;
                }
            }
            if (!ksm_utf8_done(&st)) {
                snprintf(w->err, w->errlen, "%s is not valid UTF-8 (byte %zu).", w->path, lead);
                return KSM_EINVAL;
            }
        }
        w->path[base] = '\0';
    }
    return 0;
}

int ksm_pb_check_text(const ProtobufCMessageDescriptor *d, const struct ksm_pb_piece *p, size_t n,
                      char *err, size_t errlen)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += p[i].len;
    struct text_walk w = {.err = err, .errlen = errlen};
    struct cursor c;
    cur_init(&c, p, n);
    return text_message(&w, &c, d, total, 0);
}
