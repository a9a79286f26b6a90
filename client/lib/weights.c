/*
 * libkasmina-client: weights over the wire, unary or streamed (LoadWeightsStream,
 * ExportWeightsStream: WeightsChunk messages with a CRC-32 each and one of the whole blob on the
 * last), and the AUTO choice between them (kasmina/client.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <zlib.h>

#include "client_impl.h"
#include "kasmina/v1/kasmina.pb-c.h"
#include "wire/convert.h"

#define METHOD(name)  "/kasmina.v1.Kasmina/" name
#define CHUNK_DEFAULT ((size_t)2 << 20)
/* Room for a chunk's other fields beside its data. */
#define CHUNK_OVERHEAD ((size_t)4096)
/* Room for the request's other fields beside the blob in a unary LoadWeights. */
#define UNARY_OVERHEAD ((size_t)1024)

static uint32_t crc32_of(uint32_t crc, const void *p, size_t n)
{
    const Bytef *b = p;
    while (n > 0) { /* zlib's length is 32-bit */
        uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = (uint32_t)crc32(crc, b, k);
        b += k;
        n -= k;
    }
    return crc;
}

static enum ksm_client_stream_mode mode_of(const struct ksm_client_weights_options *o)
{
    return o ? o->stream : KSM_CLIENT_STREAM_AUTO;
}

/* Copies a local error into the caller's (which may be NULL). */
static int give(struct ksm_client_error *err, const struct ksm_client_error *e, int rc)
{
    if (err) *err = *e;
    return rc;
}

// ---- LoadWeightsStream ----

struct load_src {
    const char *model_id;
    const uint8_t *buf;
    size_t len, off, chunk;
    bool strict;
    uint32_t blob_crc;
    const struct ksm_client_weights_options *o;
};

static size_t put_varint(uint8_t *b, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        b[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    b[n++] = (uint8_t)v;
    return n;
}

static int next_chunk(void *ud, grpc_byte_buffer **bb)
{
    struct load_src *s = ud;
    if (s->off >= s->len) return 0;
    if (s->off > 0 && s->o && s->o->progress) {
        int p = s->o->progress(s->o->progress_ud, s->off, s->len);
        if (p != 0) return p;
    }
    size_t n = s->len - s->off < s->chunk ? s->len - s->off : s->chunk;
    const uint8_t *data = s->buf + s->off;
    Kasmina__V1__WeightsChunk h = KASMINA__V1__WEIGHTS_CHUNK__INIT;
    bool first = s->off == 0, last = s->off + n == s->len;
    h.model_id = first ? (char *)s->model_id : (char *)"";
    h.offset = s->off;
    h.total_bytes = first ? s->len : 0;
    h.crc32 = crc32_of(0, data, n);
    h.blob_crc32 = last ? s->blob_crc : 0;
    h.strict = first && s->strict;
    /* The header fields, then field 3 (data): protobuf accepts fields in any order. */
    size_t hl = protobuf_c_message_get_packed_size(&h.base);
    grpc_slice sl = grpc_slice_malloc(hl + 11 + n);
    uint8_t *p = GRPC_SLICE_START_PTR(sl);
    protobuf_c_message_pack(&h.base, p);
    p[hl++] = (3 << 3) | 2;
    hl += put_varint(p + hl, n);
    memcpy(p + hl, data, n);
    grpc_slice part = grpc_slice_sub(sl, 0, hl + n);
    grpc_slice_unref(sl);
    *bb = grpc_raw_byte_buffer_create(&part, 1);
    grpc_slice_unref(part);
    s->off += n;
    return 1;
}

static int load_stream(ksm_client *c, const char *model_id, const void *buf, size_t len,
                       bool strict, const struct ksm_client_weights_options *o,
                       struct ksm_load_result *r, struct ksm_client_error *err)
{
    if (len == 0) return ksmc_fail(err, KSM_EINVAL, 3, "the safetensors blob must not be empty");
    size_t chunk = o && o->chunk_bytes ? o->chunk_bytes : CHUNK_DEFAULT;
    if (chunk + CHUNK_OVERHEAD > c->max_message && c->max_message > 2 * CHUNK_OVERHEAD)
        chunk = c->max_message - CHUNK_OVERHEAD;
    struct load_src s = {.model_id = model_id ? model_id : "",
                         .buf = buf,
                         .len = len,
                         .chunk = chunk,
                         .strict = strict,
                         .o = o};
    s.blob_crc = crc32_of(0, buf, len);
    ProtobufCMessage *rep = NULL;
    int rc = ksmc_client_stream(c, METHOD("LoadWeightsStream"), next_chunk, &s,
                                &kasmina__v1__load_weights_response__descriptor, &rep, err);
    if (rc) return rc;
    if (o && o->progress) (void)o->progress(o->progress_ud, len, len);
    if (r && (rc = ksm_wire_load_result_from_pb((Kasmina__V1__LoadWeightsResponse *)rep, r))) {
        protobuf_c_message_free_unpacked(rep, NULL);
        return ksmc_fail(err, rc, 8, "out of memory");
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}

int ksm_client_load_weights_ex(ksm_client *c, const char *model_id, const void *buf, size_t len,
                               bool strict, const struct ksm_client_weights_options *o,
                               struct ksm_load_result *r, struct ksm_client_error *err)
{
    if (r) memset(r, 0, sizeof *r);
    if (!buf && len > 0) return ksmc_fail(err, KSM_EINVAL, 3, "buf must not be NULL");
    enum ksm_client_stream_mode mode = mode_of(o);
    if (mode == KSM_CLIENT_STREAM_NEVER)
        return ksmc_load_weights_unary(c, model_id, buf, len, strict, r, err);
    if (mode == KSM_CLIENT_STREAM_ALWAYS || len + UNARY_OVERHEAD > c->max_message)
        return load_stream(c, model_id, buf, len, strict, o, r, err);
    struct ksm_client_error e;
    int rc = ksmc_load_weights_unary(c, model_id, buf, len, strict, r, &e);
    /* The daemon's max-message-bytes is below the client's: the stream moves it. */
    if (rc == KSM_ELIMIT && strstr(e.message, "max-message-bytes") != NULL)
        return load_stream(c, model_id, buf, len, strict, o, r, err);
    return give(err, &e, rc);
}

int ksm_client_load_weights(ksm_client *c, const char *model_id, const void *buf, size_t len,
                            bool strict, struct ksm_load_result *r, struct ksm_client_error *err)
{
    return ksm_client_load_weights_ex(c, model_id, buf, len, strict, NULL, r, err);
}

// ---- ExportWeightsStream ----

struct export_dst {
    uint8_t *buf;
    uint64_t total;
    size_t have, n_chunks;
    uint32_t crc;
    bool done;
    const struct ksm_client_weights_options *o;
    struct ksm_client_error *err;
};

static int on_chunk(void *ud, const ProtobufCMessage *msg)
{
    struct export_dst *d = ud;
    const Kasmina__V1__WeightsChunk *k = (const void *)msg;
    size_t i = d->n_chunks++;
    if (i == 0) {
        if (k->total_bytes == 0 || k->total_bytes > (uint64_t)SIZE_MAX / 2)
            return ksmc_fail(d->err, KSM_EFORMAT, 13,
                             "the export stream's first chunk has total_bytes %llu",
                             (unsigned long long)k->total_bytes);
        if (!(d->buf = malloc((size_t)k->total_bytes)))
            return ksmc_fail(d->err, KSM_ENOMEM, 8, "out of memory for %llu bytes of weights",
                             (unsigned long long)k->total_bytes);
        d->total = k->total_bytes;
    }
    if (d->done || k->offset != d->have || k->data.len == 0 || k->data.len > d->total - d->have)
        return ksmc_fail(d->err, KSM_EFORMAT, 13,
                         "the export stream's chunk %zu (offset %llu, %zu bytes) does not follow "
                         "the %zu of %llu bytes received",
                         i, (unsigned long long)k->offset, k->data.len, d->have,
                         (unsigned long long)d->total);
    if (crc32_of(0, k->data.data, k->data.len) != k->crc32)
        return ksmc_fail(d->err, KSM_EBADMSG, 15,
                         "the export stream's chunk %zu failed its CRC-32: corrupted in transit",
                         i);
    memcpy(d->buf + d->have, k->data.data, k->data.len);
    d->crc = crc32_of(d->crc, k->data.data, k->data.len);
    d->have += k->data.len;
    if (d->have == d->total) {
        d->done = true;
        if (d->crc != k->blob_crc32)
            return ksmc_fail(d->err, KSM_EBADMSG, 15,
                             "the exported blob failed its CRC-32: corrupted in transit");
    }
    if (d->o && d->o->progress) {
        int p = d->o->progress(d->o->progress_ud, d->have, d->total);
        if (p != 0 && !d->done) return p;
    }
    return 0;
}

static int export_stream(ksm_client *c, const char *model_id,
                         const struct ksm_client_weights_options *o, void **buf, size_t *len,
                         struct ksm_client_error *err)
{
    Kasmina__V1__ExportWeightsRequest req = KASMINA__V1__EXPORT_WEIGHTS_REQUEST__INIT;
    req.model_id = (char *)(model_id ? model_id : "");
    if (o && o->slots) {
        req.slots = (char **)o->slots;
        req.n_slots = o->n_slots;
        req.include_host = o->include_host;
    }
    /* Chunks that fit this client's message limit. */
    size_t chunk = o && o->chunk_bytes ? o->chunk_bytes : CHUNK_DEFAULT;
    if (chunk + CHUNK_OVERHEAD > c->max_message && c->max_message > 2 * CHUNK_OVERHEAD)
        chunk = c->max_message - CHUNK_OVERHEAD;
    req.chunk_bytes = (uint32_t)chunk;
    struct export_dst d = {.o = o, .err = err};
    int rc =
        ksmc_server_stream(c, METHOD("ExportWeightsStream"), &req.base,
                           &kasmina__v1__weights_chunk__descriptor, 0, true, on_chunk, &d, err);
    if (rc == 0 && !d.done)
        rc = ksmc_fail(err, KSM_EFORMAT, 13, "the export stream ended after %zu of %llu bytes",
                       d.have, (unsigned long long)d.total);
    if (rc != 0) {
        free(d.buf);
        return rc;
    }
    *buf = d.buf;
    *len = d.have;
    return 0;
}

int ksm_client_export_weights_ex(ksm_client *c, const char *model_id,
                                 const struct ksm_client_weights_options *o, void **buf,
                                 size_t *len, struct ksm_client_error *err)
{
    if (!buf || !len) return ksmc_fail(err, KSM_EINVAL, 3, "buf and len must not be NULL");
    *buf = NULL;
    *len = 0;
    const char *const *slots = o ? o->slots : NULL;
    size_t n_slots = o && o->slots ? o->n_slots : 0;
    bool host = o && o->include_host;
    enum ksm_client_stream_mode mode = mode_of(o);
    if (mode == KSM_CLIENT_STREAM_NEVER)
        return ksmc_export_weights_unary(c, model_id, slots, n_slots, host, buf, len, err);
    if (mode == KSM_CLIENT_STREAM_ALWAYS) return export_stream(c, model_id, o, buf, len, err);
    /* AUTO: the size is known only once the daemon exported, so the stream (one call, chunks
     * whatever the size); the unary call for a daemon without it. */
    struct ksm_client_error e;
    int rc = export_stream(c, model_id, o, buf, len, &e);
    if (rc == KSM_ENOSYS && e.grpc_status == 12 /* UNIMPLEMENTED */)
        return ksmc_export_weights_unary(c, model_id, slots, n_slots, host, buf, len, err);
    return give(err, &e, rc);
}

int ksm_client_export_weights(ksm_client *c, const char *model_id, void **buf, size_t *len,
                              struct ksm_client_error *err)
{
    return ksm_client_export_weights_ex(c, model_id, NULL, buf, len, err);
}
