/*
 * rpc/weights: LoadWeightsStream (client streaming) and ExportWeightsStream (server streaming),
 * the weights of any model the daemon can hold, in WeightsChunk messages of a few MiB
 * (docs/weights.md#streaming).
 *
 * Both run on the server's machinery (rpc/server.c): the call is admitted like a unary call
 * (authorised, counted in max-concurrent-calls, drained at shutdown) and handed to a worker, and
 * at most one operation of the stream is in flight at a time, so no lock guards its state:
 *
 *   export: a worker decodes the request, exports the blob (the engine's copy) and starts the
 *     first chunk's send batch; each completion (on the completion-queue thread) starts the next
 *     one -- a header of a few bytes plus a slice that points into the blob, no copy -- and the
 *     last one the OK status. A slow reader only holds its own blob; the workers never wait.
 *   load: a worker checks a chunk (order, bounds, CRC-32) and copies it into the blob, then
 *     starts the receive of the next one; its completion hands the call to a worker again. The
 *     chunk that completes total_bytes has the blob's CRC-32 checked, then the blob is loaded
 *     through the service (ksm_service_load_weights: validated before anything changes,
 *     journalled). An error, a cancellation or an early end answers with a status and drops the
 *     blob: the model was never touched.
 *
 * Memory: the blobs of all weight streams in flight count against one budget, max-weights-bytes,
 * reserved before the memory is allocated (RESOURCE_EXHAUSTED naming the option). gRPC's own
 * receive limit is off (it reads a whole message before refusing it, in words that do not name
 * the daemon's option): every message is checked against max-message-bytes here and in
 * rpc/server.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <zlib.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"
#include "wire/pbgather.h"

/* The data of one ExportWeightsStream chunk: by default 2 MiB, below gRPC's default 4 MiB
 * receive limit (a client that set none still reads it); ExportWeightsRequest.chunk_bytes asks
 * for another size in [CHUNK_MIN, CHUNK_MAX]. */
#define CHUNK_DEFAULT ((size_t)2 << 20)
#define CHUNK_MIN     ((size_t)4096)
#define CHUNK_MAX     ((size_t)64 << 20)

/* An exported blob shared by the chunk slices that point into it: freed with the last. */
struct wblob {
    atomic_int refs;
    void *data;
    size_t len;
};

static void wblob_unref(void *p)
{
    struct wblob *b = p;
    if (b != NULL && atomic_fetch_sub(&b->refs, 1) == 1) {
        free(b->data);
        free(b);
    }
}

enum wphase { W_START, W_RUNNING, W_DONE };

struct rpc_wstream {
    enum wphase phase;
    size_t reserved; /* bytes counted in srv->weights_bytes */
    /* export */
    struct wblob *blob;
    size_t sent, chunk;
    uint32_t blob_crc;
    char model_id[KSM_ID_MAX + 1];
    grpc_byte_buffer *out; /* the chunk in flight */
    /* load */
    uint8_t *buf;
    uint64_t total;
    size_t have;
    uint32_t crc; /* running CRC-32 of buf[0..have) */
    size_t n_chunks;
    bool strict;
    grpc_byte_buffer *in; /* the RECV_MESSAGE target */
};

/* ---- The budget (max-weights-bytes) ---- */

/* Grows the stream's reservation to total bytes; what starts the sentence ("The export holds"). */
static int reserve(ksm_rpc_server *s, struct rpc_wstream *w, size_t total, const char *what,
                   char *err, size_t errlen)
{
    size_t max = s->cfg.max_weights_bytes;
    if (total > max)
        return ksm_errf(err, errlen, KSM_ELIMIT,
                        "%s %zu bytes; max-weights-bytes = %zu (raise kasminad's "
                        "--max-weights-bytes).",
                        what, total, max);
    if (total <= w->reserved) return 0;
    size_t more = total - w->reserved, cur = atomic_load(&s->weights_bytes);
    do {
        if (cur > max - more)
            return ksm_errf(err, errlen, KSM_ELIMIT,
                            "%s %zu bytes while the weight streams in flight hold %zu; "
                            "max-weights-bytes = %zu bounds them together (retry when they end).",
                            what, total, cur - w->reserved, max);
    } while (!atomic_compare_exchange_weak(&s->weights_bytes, &cur, cur + more));
    w->reserved = total;
    return 0;
}

static void release(ksm_rpc_server *s, struct rpc_wstream *w)
{
    if (w->reserved > 0) atomic_fetch_sub(&s->weights_bytes, w->reserved);
    w->reserved = 0;
}

void rpc_weights_free(struct rpc_call *c)
{
    struct rpc_wstream *w = c->ws;
    if (w == NULL) return;
    release(c->srv, w);
    wblob_unref(w->blob);
    if (w->out != NULL) grpc_byte_buffer_destroy(w->out);
    if (w->in != NULL) grpc_byte_buffer_destroy(w->in);
    free(w->buf);
    free(w);
    c->ws = NULL;
}

/* Ends the call with a status (and reply); the send batch's completion finishes it (on_send). */
static void finish(struct rpc_call *c, const ProtobufCMessage *reply, int err, const char *msg)
{
    c->ws->phase = W_DONE;
    /* What the call no longer needs goes now, not when the client reads the status. */
    free(c->ws->buf);
    c->ws->buf = NULL;
    wblob_unref(c->ws->blob);
    c->ws->blob = NULL;
    release(c->srv, c->ws);
    rpc_call_finish(c, reply, err, msg, 0);
}

/* Unpacks the message in c->payload from the pieces of its slices: 0, or a KSM_E* code with
 * the sentence in err. */
static int payload_unpack(ksm_rpc_server *s, struct rpc_call *c,
                          const ProtobufCMessageDescriptor *d, ProtobufCMessage **out, char *err,
                          size_t errlen)
{
    *out = NULL;
    if (c->payload == NULL)
        return ksm_errf(err, errlen, KSM_EINVAL, "The stream carries no %s message.", d->name);
    int zrc = rpc_payload_inflate(s, c, s->cfg.max_message_bytes, err, errlen);
    if (zrc != 0) return zrc;
    size_t n = grpc_byte_buffer_length(c->payload);
    if (n > s->cfg.max_message_bytes)
        return ksm_errf(err, errlen, KSM_ELIMIT,
                        "A %s message of %zu bytes is over max-message-bytes = %zu (send smaller "
                        "chunks, or raise kasminad's --max-message-bytes).",
                        d->name, n, s->cfg.max_message_bytes);
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, c->payload))
        return ksm_errf(err, errlen, KSM_EINVAL, "The %s message could not be read.", d->name);
    struct ksm_pb_piece one[16], *p = one;
    size_t np = 0, cap = sizeof one / sizeof one[0];
    grpc_slice *sl;
    bool ok = true;
    while (ok && grpc_byte_buffer_reader_peek(&r, &sl) != 0) {
        if (np == cap) {
            cap *= 2;
            struct ksm_pb_piece *q =
                p == one ? malloc(cap * sizeof *q) : realloc(p, cap * sizeof *q);
            if (q == NULL) {
                ok = false;
                break;
            }
            if (p == one) memcpy(q, one, sizeof one);
            p = q;
        }
        p[np++] = (struct ksm_pb_piece){GRPC_SLICE_START_PTR(*sl), GRPC_SLICE_LENGTH(*sl)};
    }
    int rc = 0;
    if (!ok)
        rc = ksm_errf(err, errlen, KSM_ENOMEM,
                      "The %s message could not be read: out of host "
                      "memory.",
                      d->name);
    else if ((rc = ksm_pb_check_text(d, p, np, err, errlen)) != 0) {
    } else if ((*out = ksm_pb_unpack_pieces(d, p, np, KSM_PB_GATHER_MIN, NULL)) == NULL)
        rc = ksm_errf(err, errlen, KSM_EINVAL, "The request is not a valid %s message.", d->name);
    if (p != one) free(p);
    grpc_byte_buffer_reader_destroy(&r);
    return rc;
}

/* ---- ExportWeightsStream ---- */

/* Protobuf varint into b; returns its length. */
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

/* Starts the send of the next chunk: its header fields, then field 3 (data) as a slice of the
 * blob. Protobuf parsers accept fields in any order. */
static void send_chunk(struct rpc_call *c)
{
    struct rpc_wstream *w = c->ws;
    size_t off = w->sent, n = w->blob->len - off;
    if (n > w->chunk) n = w->chunk;
    const uint8_t *data = (const uint8_t *)w->blob->data + off;
    Kasmina__V1__WeightsChunk h = KASMINA__V1__WEIGHTS_CHUNK__INIT;
    h.model_id = off == 0 ? w->model_id : (char *)"";
    h.offset = off;
    h.total_bytes = w->blob->len;
    h.crc32 = (uint32_t)crc32(0L, data, (uInt)n);
    h.blob_crc32 = off + n == w->blob->len ? w->blob_crc : 0;
    uint8_t hdr[KSM_ID_MAX + 96];
    size_t hl = protobuf_c_message_pack(&h.base, hdr);
    hdr[hl++] = (3 << 3) | 2; /* data: field 3, length-delimited */
    hl += put_varint(hdr + hl, n);
    grpc_slice parts[2];
    parts[0] = grpc_slice_from_copied_buffer((const char *)hdr, hl);
    atomic_fetch_add(&w->blob->refs, 1);
    parts[1] = grpc_slice_new_with_user_data((void *)data, n, wblob_unref, w->blob);
    w->out = grpc_raw_byte_buffer_create(parts, 2);
    grpc_slice_unref(parts[0]);
    grpc_slice_unref(parts[1]);
    w->sent = off + n;

    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t k = 0;
    if (!c->started) {
        ops[k++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->started = true;
    }
    ops[k].op = GRPC_OP_SEND_MESSAGE;
    ops[k].data.send_message.send_message = w->out;
    k++;
    grpc_call *gc = c->gc; /* read before the release (rpc/tsan.h) */
    KSM_TSAN_RELEASE(&c->send_tag);
    if (grpc_call_start_batch(gc, ops, k, &c->send_tag, NULL) != GRPC_CALL_OK)
        finish(c, NULL, KSM_EINTERNAL, "The server could not send a weights chunk.");
}

/* The size an export will have, from the model's parameter counts (the file holds the tied LM
 * head twice; headers and extra state are checked with the real size). */
static uint64_t predict_export(ksm_model *m, bool partial, bool include_host)
{
    struct ksm_model_info *info = malloc(sizeof *info);
    uint64_t bytes = 0;
    if (info != NULL && ksm_model_get_info(m, info) == 0) {
        size_t elem = ksm_dtype_size(info->dtype);
        bool host = !partial || include_host;
        uint64_t params = info->seed_params + (host ? info->host_params : 0);
        if (host && info->topology == KSM_TOPOLOGY_TRANSFORMER)
            params += (uint64_t)info->transformer.vocab_size * info->transformer.n_embd;
        bytes = params * (elem ? elem : 4);
    }
    free(info);
    return bytes;
}

static void export_start(ksm_rpc_server *s, struct rpc_call *c)
{
    struct rpc_wstream *w = c->ws;
    char err[256] = "";
    ProtobufCMessage *msg;
    int rc = payload_unpack(s, c, &kasmina__v1__export_weights_request__descriptor, &msg, err,
                            sizeof err);
    if (rc != 0) {
        finish(c, NULL, rc, err);
        return;
    }
    const Kasmina__V1__ExportWeightsRequest *r = (const void *)msg;
    ksm_model *m = NULL;
    rc = ksm_wire_check_model_id(r->model_id, "model_id", true, err, sizeof err);
    for (size_t i = 0; rc == 0 && i < r->n_slots; i++) {
        char f[32];
        snprintf(f, sizeof f, "slots[%zu]", i);
        rc = ksm_wire_check_slot_id(r->slots[i], f, true, err, sizeof err);
    }
    if (rc == 0 && r->chunk_bytes != 0 &&
        (r->chunk_bytes < CHUNK_MIN || r->chunk_bytes > CHUNK_MAX))
        rc = ksm_errf(err, sizeof err, KSM_EINVAL,
                      "chunk_bytes must be 0 (2 MiB) or in [%zu, %zu], got %u.", CHUNK_MIN,
                      CHUNK_MAX, r->chunk_bytes);
    w->chunk = r->chunk_bytes ? r->chunk_bytes : CHUNK_DEFAULT;
    if (rc == 0 && r->n_slots > KSM_MAX_SLOTS)
        rc = ksm_errf(err, sizeof err, KSM_EINVAL, "slots lists %zu slots; a model has at most %d.",
                      r->n_slots, KSM_MAX_SLOTS);
    if (rc == 0) rc = ksm_service_model_get(s->service, r->model_id, &m, err, sizeof err);
    if (rc == 0) {
        uint64_t predicted = predict_export(m, r->n_slots > 0, r->include_host);
        rc = reserve(s, w, (size_t)predicted, "The export would hold", err, sizeof err);
    }
    void *buf = NULL;
    size_t len = 0;
    if (rc == 0)
        rc = ksm_model_export_weights_subset(m, (const char *const *)r->slots, (int)r->n_slots,
                                             r->include_host, &buf, &len, err, sizeof err);
    if (rc == 0) rc = reserve(s, w, len, "The export holds", err, sizeof err);
    if (rc == 0 && len < w->reserved) { /* the prediction was high: keep what the file holds */
        atomic_fetch_sub(&s->weights_bytes, w->reserved - len);
        w->reserved = len;
    }
    if (rc == 0 && (w->blob = calloc(1, sizeof *w->blob)) == NULL) rc = KSM_ENOMEM;
    if (rc != 0) {
        free(buf);
        if (m != NULL) ksm_model_unref(m);
        protobuf_c_message_free_unpacked(msg, NULL);
        ksm_service_explain(s->service, rc, err, sizeof err);
        finish(c, NULL, rc, err);
        return;
    }
    atomic_init(&w->blob->refs, 1);
    w->blob->data = buf;
    w->blob->len = len;
    w->blob_crc = (uint32_t)crc32(0L, buf, (uInt)0);
    for (size_t off = 0; off < len;) { /* zlib's length is 32-bit */
        size_t n = len - off > ((size_t)1 << 30) ? (size_t)1 << 30 : len - off;
        w->blob_crc = (uint32_t)crc32(w->blob_crc, (const Bytef *)buf + off, (uInt)n);
        off += n;
    }
    snprintf(w->model_id, sizeof w->model_id, "%s", r->model_id);
    ksm_model_unref(m);
    protobuf_c_message_free_unpacked(msg, NULL);
    w->phase = W_RUNNING;
    send_chunk(c);
}

/* ---- LoadWeightsStream ---- */

static void on_recv(struct rpc_tag *t, bool ok);

static void recv_next(struct rpc_call *c)
{
    struct rpc_wstream *w = c->ws;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &w->in;
    w->in = NULL;
    grpc_call *gc = c->gc;
    KSM_TSAN_RELEASE(&c->recv_tag);
    if (grpc_call_start_batch(gc, &op, 1, &c->recv_tag, NULL) != GRPC_CALL_OK)
        finish(c, NULL, KSM_EINTERNAL, "The server could not receive the next weights chunk.");
}

/* The chunk in c->payload: 0 when the stream goes on, 1 when the blob is complete and checked,
 * or an error with its sentence in err. */
static int take_chunk(ksm_rpc_server *s, struct rpc_call *c, char *err, size_t errlen)
{
    struct rpc_wstream *w = c->ws;
    ProtobufCMessage *msg;
    int rc = payload_unpack(s, c, &kasmina__v1__weights_chunk__descriptor, &msg, err, errlen);
    if (rc != 0) return rc;
    const Kasmina__V1__WeightsChunk *k = (const void *)msg;
    size_t i = w->n_chunks;
    if (i == 0) {
        rc = ksm_wire_check_model_id(k->model_id, "model_id", true, err, errlen);
        ksm_model *m = NULL;
        if (rc == 0) rc = ksm_service_model_get(s->service, k->model_id, &m, err, errlen);
        if (m != NULL) ksm_model_unref(m);
        if (rc == 0 && k->total_bytes == 0)
            rc = ksm_errf(err, errlen, KSM_EINVAL,
                          "The first chunk must give total_bytes, the blob's size (> 0).");
        if (rc == 0 && k->total_bytes > (uint64_t)SIZE_MAX / 2)
            rc = ksm_errf(err, errlen, KSM_ELIMIT, "total_bytes %llu is too large.",
                          (unsigned long long)k->total_bytes);
        if (rc == 0)
            rc = reserve(s, w, (size_t)k->total_bytes, "The stream declares total_bytes", err,
                         errlen);
        if (rc == 0 && (w->buf = malloc((size_t)k->total_bytes)) == NULL)
            rc = ksm_errf(err, errlen, KSM_ENOMEM,
                          "The server has no %llu bytes of host memory for the blob.",
                          (unsigned long long)k->total_bytes);
        if (rc == 0) {
            snprintf(w->model_id, sizeof w->model_id, "%s", k->model_id);
            w->total = k->total_bytes;
            w->strict = k->strict;
            w->crc = (uint32_t)crc32(0L, NULL, 0);
        }
    } else if (k->model_id != NULL && k->model_id[0] != '\0' &&
               strcmp(k->model_id, w->model_id) != 0) {
        rc = ksm_errf(err, errlen, KSM_EINVAL,
                      "Chunk %zu names model_id '%s'; the stream loads '%s'.", i, k->model_id,
                      w->model_id);
    } else if (k->total_bytes != 0 && k->total_bytes != w->total) {
        rc = ksm_errf(err, errlen, KSM_EINVAL,
                      "Chunk %zu gives total_bytes %llu; the first chunk gave %llu.", i,
                      (unsigned long long)k->total_bytes, (unsigned long long)w->total);
    }
    if (rc == 0 && k->offset != w->have)
        rc = ksm_errf(err, errlen, KSM_EINVAL,
                      "Chunk %zu has offset %llu where %zu was expected (chunks come in order, "
                      "without gaps or overlaps), so nothing was loaded.",
                      i, (unsigned long long)k->offset, w->have);
    if (rc == 0 && k->data.len == 0)
        rc = ksm_errf(err, errlen, KSM_EINVAL, "Chunk %zu carries no data.", i);
    if (rc == 0 && k->data.len > w->total - w->have)
        rc = ksm_errf(err, errlen, KSM_EINVAL,
                      "Chunk %zu ends at byte %llu, past total_bytes %llu, so nothing was loaded.",
                      i, (unsigned long long)(w->have + k->data.len), (unsigned long long)w->total);
    if (rc == 0) {
        uint32_t got = (uint32_t)crc32(0L, k->data.data, (uInt)k->data.len);
        if (got != k->crc32)
            rc = ksm_errf(err, errlen, KSM_EBADMSG,
                          "Chunk %zu (bytes %zu..%zu) has CRC-32 %08x where its crc32 says %08x: "
                          "it was corrupted in transit, and nothing was loaded.",
                          i, w->have, w->have + k->data.len, got, k->crc32);
    }
    if (rc == 0) {
        memcpy(w->buf + w->have, k->data.data, k->data.len);
        w->crc = (uint32_t)crc32(w->crc, k->data.data, (uInt)k->data.len);
        w->have += k->data.len;
        w->n_chunks++;
        if (w->have == w->total) {
            rc = 1;
            if (w->crc != k->blob_crc32)
                rc = ksm_errf(err, errlen, KSM_EBADMSG,
                              "The blob of %zu bytes has CRC-32 %08x where the last chunk's "
                              "blob_crc32 says %08x, so nothing was loaded.",
                              w->have, w->crc, k->blob_crc32);
        }
    }
    protobuf_c_message_free_unpacked(msg, NULL);
    return rc;
}

static void free_load(void *p) { ksm_load_result_free(p); }

/* The blob is complete and checked: the same load as LoadWeights. */
static void load_apply(ksm_rpc_server *s, struct rpc_call *c)
{
    struct rpc_wstream *w = c->ws;
    struct rpc_ctx cx;
    memset(&cx, 0, sizeof cx);
    ksm_pb_arena_init(&cx.arena);
    ksm_model *m = NULL;
    struct ksm_load_result lr;
    memset(&lr, 0, sizeof lr);
    Kasmina__V1__LoadWeightsResponse out = KASMINA__V1__LOAD_WEIGHTS_RESPONSE__INIT;
    int rc = ksm_service_model_get(s->service, w->model_id, &m, cx.err, sizeof cx.err);
    if (rc == 0)
        rc = ksm_service_load_weights(s->service, m, w->buf, w->have, w->strict, &lr, cx.err,
                                      sizeof cx.err);
    /* The blob is no longer needed: release it before the reply is encoded. */
    free(w->buf);
    w->buf = NULL;
    release(s, w);
    if (rc == 0) rc = ksm_wire_load_result_to_pb(&lr, &cx.arena, &out);
    if (m != NULL) ksm_model_unref(m);
    if (rc != 0) ksm_service_explain(s->service, rc, cx.err, sizeof cx.err);
    if (rc == 0 && atomic_load(&c->closed))
        KSM_LOGI("rpc", "LoadWeightsStream: the client cancelled the call after its last chunk");
    finish(c, rc == 0 ? &out.base : NULL, rc, cx.err);
    free_load(&lr);
    ksm_pb_arena_fini(&cx.arena);
}

static void load_step(ksm_rpc_server *s, struct rpc_call *c)
{
    char err[256] = "";
    int rc = take_chunk(s, c, err, sizeof err);
    if (rc < 0) {
        finish(c, NULL, rc, err);
        return;
    }
    if (rc == 1) {
        load_apply(s, c);
        return;
    }
    recv_next(c);
}

/* Completion of a RECV_MESSAGE (completion-queue thread): a chunk goes to a worker; the end of
 * the stream or a failure is answered here. */
static void on_recv(struct rpc_tag *t, bool ok)
{
    struct rpc_call *c = (struct rpc_call *)((char *)t - offsetof(struct rpc_call, recv_tag));
    struct rpc_wstream *w = c->ws;
    char msg[256];
    if (!ok || atomic_load(&c->closed)) {
        finish(c, NULL, KSM_ECANCELED,
               "The stream was cancelled before its last chunk; nothing was loaded.");
        return;
    }
    if (w->in == NULL) { /* the client half-closed */
        snprintf(msg, sizeof msg,
                 "The stream ended after %zu of its %llu bytes (total_bytes); nothing was loaded.",
                 w->have, (unsigned long long)w->total);
        finish(c, NULL, KSM_EINVAL, msg);
        return;
    }
    if (c->payload != NULL) grpc_byte_buffer_destroy(c->payload);
    c->payload = w->in;
    w->in = NULL;
    if (!rpc_enqueue(c->srv, c))
        finish(c, NULL, KSM_ESHUTDOWN, "The server is shutting down; nothing was loaded.");
}

/* ---- Worker entry and send completions ---- */

void rpc_weights_run(ksm_rpc_server *s, struct rpc_call *c)
{
    if (c->ws == NULL) {
        if ((c->ws = calloc(1, sizeof *c->ws)) == NULL) {
            rpc_call_finish(c, NULL, KSM_ENOMEM, "The stream could not start: out of host memory.",
                            0);
            return;
        }
        c->recv_tag.done = on_recv;
    }
    if (atomic_load(&c->closed)) {
        finish(c, NULL, KSM_ECANCELED, "The client cancelled the call.");
        return;
    }
    if (s->workers_stop) {
        finish(c, NULL, KSM_ESHUTDOWN, "The server is shutting down.");
        return;
    }
    if (c->m->kind == RPC_WEIGHTS_EXPORT) {
        export_start(s, c);
        return;
    }
    c->ws->phase = W_RUNNING;
    load_step(s, c);
}

bool rpc_weights_sent(struct rpc_call *c, bool ok)
{
    struct rpc_wstream *w = c->ws;
    if (w->phase != W_RUNNING || c->m->kind != RPC_WEIGHTS_EXPORT) return false; /* the status */
    if (w->out != NULL) grpc_byte_buffer_destroy(w->out);
    w->out = NULL;
    if (!ok)
        finish(c, NULL, KSM_ECANCELED, "The client went away before the export was sent.");
    else if (w->sent < w->blob->len)
        send_chunk(c);
    else
        finish(c, NULL, 0, NULL);
    return true;
}
