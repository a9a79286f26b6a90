/*
 * rpc/server: completion queue, the per-call state machine, the worker pool and the listeners.
 *
 * A call's life: a request slot is posted per method (and one catch-all for unknown methods).
 * When a call arrives (request_tag), the slot is re-posted, a RECV_CLOSE_ON_SERVER batch is
 * started (close_tag: it completes when the call is over, early when the client cancels), and
 * the call is dispatched: unary Kasmina calls go to the workers (decode, validate, engine call,
 * encode, one send batch on send_tag), health checks and unknown methods are answered on the CQ
 * thread, streams go to the event hub. A call holds one reference for its handling and one for
 * its close batch; the last one frees it. A call answered on the CQ thread itself (cheap unary
 * calls, health checks, refusals) has no separate close batch: its send batch also receives the
 * close, and it holds the one reference.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "wire/pbgather.h"
#include "rpc/server_impl.h"
#include "wire/status.h"

#define container_of(p, type, member) ((type *)((char *)(p)-offsetof(type, member)))

static void on_request(struct rpc_tag *t, bool ok);
static void on_close(struct rpc_tag *t, bool ok);
static void on_send(struct rpc_tag *t, bool ok);

/* ---- Calls ---- */

static void call_free(struct rpc_call *c)
{
    ksm_rpc_server *s = c->srv;
    if (c->gc != NULL) grpc_call_unref(c->gc);
    grpc_metadata_array_destroy(&c->md);
    if (c->m == NULL) grpc_call_details_destroy(&c->details);
    if (c->payload != NULL) grpc_byte_buffer_destroy(c->payload);
    if (c->reply != NULL) grpc_byte_buffer_destroy(c->reply);
    if (c->have_details) grpc_slice_unref(c->status_details);
    for (int i = 0; i < c->n_warn_md; i++) grpc_slice_unref(c->warn_md[i].value);
    rpc_weights_free(c);
    free(c);
    /* Only ksm_rpc_server_free waits for the count, after setting shutting_down: a call that
     * ends while serving wakes nobody (the workers wait on their own condition). */
    atomic_fetch_sub(&s->live_calls, 1);
    if (atomic_load(&s->shutting_down)) {
        pthread_mutex_lock(&s->lock);
        pthread_cond_broadcast(&s->idle_cond);
        pthread_mutex_unlock(&s->lock);
    }
}

void rpc_call_unref(struct rpc_call *c)
{
    if (atomic_fetch_sub(&c->refs, 1) == 1) call_free(c);
}

static int post_request(ksm_rpc_server *s, struct rpc_method *m)
{
    struct rpc_call *c = calloc(1, sizeof *c);
    if (c == NULL) return KSM_ENOMEM;
    c->srv = s;
    c->m = m;
    c->request_tag.done = on_request;
    c->close_tag.done = on_close;
    c->send_tag.done = on_send;
    c->health_sent = -1;
    grpc_metadata_array_init(&c->md);
    atomic_fetch_add(&s->live_calls, 1);
    grpc_call_error e;
    if (m == NULL) {
        grpc_call_details_init(&c->details);
        KSM_TSAN_RELEASE(&c->request_tag);
        e = grpc_server_request_call(s->server, &c->gc, &c->details, &c->md, s->cq, s->cq,
                                     &c->request_tag);
    } else {
        KSM_TSAN_RELEASE(&c->request_tag);
        e = grpc_server_request_registered_call(s->server, m->handle, &c->gc, &c->deadline, &c->md,
                                                &c->payload, s->cq, s->cq, &c->request_tag);
    }
    if (e != GRPC_CALL_OK) {
        KSM_LOGE("rpc", "cannot post a call slot for %s: error %d", m ? m->path : "*", (int)e);
        c->gc = NULL;
        call_free(c);
        return KSM_EINTERNAL;
    }
    return 0;
}

bool rpc_deadline_passed(const struct rpc_call *c)
{
    if (c->m == NULL) return false;
    gpr_timespec now = gpr_now(c->deadline.clock_type);
    return gpr_time_cmp(c->deadline, now) <= 0;
}

grpc_byte_buffer *rpc_pack(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n > 0 ? n : 1);
    if (buf == NULL) return NULL;
    protobuf_c_message_pack(msg, buf);
    grpc_slice sl = grpc_slice_new(buf, n, free);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

void rpc_call_finish(struct rpc_call *c, const ProtobufCMessage *reply, int err, const char *errmsg,
                     grpc_status_code code_override)
{
    uint8_t *buf = NULL;
    size_t n = 0;
    grpc_status_code code =
        code_override != GRPC_STATUS_OK ? code_override : ksm_rpc_status_from_err(err);
    if (code == GRPC_STATUS_OK && reply != NULL) {
        n = protobuf_c_message_get_packed_size(reply);
        buf = malloc(n > 0 ? n : 1);
        if (buf == NULL) {
            err = KSM_ENOMEM;
            code_override = GRPC_STATUS_RESOURCE_EXHAUSTED;
            errmsg = "The reply could not be encoded: out of host memory.";
        } else {
            protobuf_c_message_pack(reply, buf);
        }
    }
    rpc_call_finish_bytes(c, buf, n, err, errmsg, code_override);
}

void rpc_call_finish_bytes(struct rpc_call *c, uint8_t *buf, size_t len, int err,
                           const char *errmsg, grpc_status_code code_override)
{
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    grpc_status_code code =
        code_override != GRPC_STATUS_OK ? code_override : ksm_rpc_status_from_err(err);
    if (c->close_in_send) {
        ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        ops[n].data.recv_close_on_server.cancelled = &c->cancelled;
        n++;
    }
    if (!c->started) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->started = true;
    }
    if (code != GRPC_STATUS_OK) free(buf);
    if (code == GRPC_STATUS_OK && buf != NULL) {
        grpc_slice sl = grpc_slice_new(buf, len, free);
        c->reply = grpc_raw_byte_buffer_create(&sl, 1);
        grpc_slice_unref(sl);
        if (c->reply == NULL) {
            code = GRPC_STATUS_RESOURCE_EXHAUSTED;
            err = KSM_ENOMEM;
            errmsg = "The reply could not be encoded: out of host memory.";
        } else {
            ops[n].op = GRPC_OP_SEND_MESSAGE;
            ops[n].data.send_message.send_message = c->reply;
            n++;
        }
    }
    rpc_stats_call_end(c, code);
    char msg[320] = "";
    if (code != GRPC_STATUS_OK) ksm_rpc_status_message(err, errmsg, msg, sizeof msg);
    rpc_log_call(c, code, err, msg);
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    if (code == GRPC_STATUS_OK && c->advice.n > 0 && c->n_warn_md == 0) {
        /* The handler's advice rides on the OK status: one entry per sentence. */
        for (int i = 0; i < c->advice.n && i < KSM_ADVICE_MAX; i++) {
            c->warn_md[i].key = grpc_slice_from_static_string(KSM_RPC_WARNING_MD);
            c->warn_md[i].value = grpc_slice_from_copied_string(c->advice.item[i].text);
            c->n_warn_md++;
        }
        ops[n].data.send_status_from_server.trailing_metadata = c->warn_md;
        ops[n].data.send_status_from_server.trailing_metadata_count = (size_t)c->n_warn_md;
    }
    if (code != GRPC_STATUS_OK) {
        c->status_details = grpc_slice_from_copied_string(msg);
        c->have_details = true;
        ops[n].data.send_status_from_server.status_details = &c->status_details;
        if (err != 0) {
            c->trailing.key = grpc_slice_from_static_string(KSM_RPC_ERROR_MD);
            c->trailing.value = grpc_slice_from_static_string(ksm_err_name(err));
            ops[n].data.send_status_from_server.trailing_metadata = &c->trailing;
            ops[n].data.send_status_from_server.trailing_metadata_count = 1;
        }
    }
    n++;
    grpc_call *gc = c->gc; /* read before the release: the call may be freed once handed over */
    KSM_TSAN_RELEASE(&c->send_tag);
    grpc_call_error e = grpc_call_start_batch(gc, ops, n, &c->send_tag, NULL);
    if (e != GRPC_CALL_OK) {
        KSM_LOGW("rpc", "%s: cannot send the status: error %d", c->m ? c->m->path : "*", (int)e);
        c->send_tag.done(&c->send_tag, false);
    }
}

/* Reads the request payload into *all (grpc_slice_unref it); false with *why set when it is
 * missing or unreadable. */
static bool read_payload(struct rpc_call *c, const ProtobufCMessageDescriptor *d, grpc_slice *all,
                         char *why, size_t whylen)
{
    if (c->payload == NULL) {
        snprintf(why, whylen, "The request carries no %s message.", d->name);
        return false;
    }
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, c->payload)) {
        snprintf(why, whylen, "The request could not be read (bad compression?).");
        return false;
    }
    *all = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    return true;
}

/* The request payload as pieces: the byte buffer's slices, read in place (no copy). */
struct payload {
    grpc_byte_buffer_reader r;
    struct ksm_pb_piece *p;
    size_t n;
};

/* false with *why set when the payload is missing or unreadable (or memory ran out). On true,
 * payload_close() releases the reader, whose slices the pieces point into. */
static bool payload_open(struct rpc_call *c, const ProtobufCMessageDescriptor *d,
                         struct payload *pl, char *why, size_t whylen)
{
    pl->p = NULL;
    pl->n = 0;
    if (c->payload == NULL) {
        snprintf(why, whylen, "The request carries no %s message.", d->name);
        return false;
    }
    if (!grpc_byte_buffer_reader_init(&pl->r, c->payload)) {
        snprintf(why, whylen, "The request could not be read (bad compression?).");
        return false;
    }
    size_t cap = 0;
    grpc_slice *sl;
    while (grpc_byte_buffer_reader_peek(&pl->r, &sl) != 0) {
        if (pl->n == cap) {
            cap = cap ? 2 * cap : 64;
            struct ksm_pb_piece *np = realloc(pl->p, cap * sizeof *np);
            if (np == NULL) {
                free(pl->p);
                grpc_byte_buffer_reader_destroy(&pl->r);
                snprintf(why, whylen, "The request could not be read: out of host memory.");
                return false;
            }
            pl->p = np;
        }
        pl->p[pl->n++] = (struct ksm_pb_piece){GRPC_SLICE_START_PTR(*sl), GRPC_SLICE_LENGTH(*sl)};
    }
    return true;
}

static void payload_close(struct payload *pl)
{
    free(pl->p);
    grpc_byte_buffer_reader_destroy(&pl->r);
}

/* Reads the request message; NULL with *why set when it is missing or malformed. */
static ProtobufCMessage *decode(struct rpc_call *c, const ProtobufCMessageDescriptor *d, char *why,
                                size_t whylen)
{
    grpc_slice all;
    if (!read_payload(c, d, &all, why, whylen)) return NULL;
    struct ksm_pb_piece piece = {GRPC_SLICE_START_PTR(all), GRPC_SLICE_LENGTH(all)};
    if (ksm_pb_check_text(d, &piece, 1, why, whylen) != 0) {
        grpc_slice_unref(all);
        return NULL;
    }
    ProtobufCMessage *msg =
        protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
    grpc_slice_unref(all);
    if (msg == NULL) snprintf(why, whylen, "The request is not a valid %s message.", d->name);
    return msg;
}

void rpc_defer(struct rpc_ctx *cx, void (*fn)(void *), void *p)
{
    if (cx->n_defer < (int)(sizeof cx->defer / sizeof cx->defer[0])) {
        cx->defer[cx->n_defer].fn = fn;
        cx->defer[cx->n_defer].p = p;
        cx->n_defer++;
    } else {
        KSM_ASSERT(!"rpc_defer: too many deferred frees");
    }
}

/* Worker: the whole unary call. */
static void run_unary(ksm_rpc_server *s, struct rpc_call *c)
{
    if (atomic_load(&c->closed)) {
        rpc_call_finish(c, NULL, KSM_ECANCELED, "The client cancelled the call.", 0);
        return;
    }
    if (rpc_deadline_passed(c)) {
        rpc_call_finish(c, NULL, KSM_ETIMEDOUT, "The call's deadline passed before it ran.", 0);
        return;
    }
    if (s->workers_stop) {
        rpc_call_finish(c, NULL, KSM_ESHUTDOWN, "The server is shutting down.", 0);
        return;
    }
    char why[256];
    int zrc = rpc_payload_inflate(s, c, s->cfg.max_message_bytes, why, sizeof why);
    if (zrc != 0) {
        rpc_call_finish(c, NULL, zrc, why, 0);
        return;
    }
    struct payload pl;
    if (!payload_open(c, c->m->req, &pl, why, sizeof why)) {
        rpc_call_finish(c, NULL, KSM_EINVAL, why, 0);
        return;
    }
    /* The whole request path (unpack, convert, validate, engine, pack) is rpc/dispatch; the
     * request is read from the transport's slices in place, its tensors copied once. */
    uint8_t *reply = NULL;
    size_t reply_len = 0;
    int rc = rpc_dispatch_call(s, (size_t)(c->m - rpc_methods), pl.p, pl.n, &reply, &reply_len,
                               &c->advice, why, sizeof why);
    payload_close(&pl);
    if (rc == 0 && atomic_load(&c->closed))
        KSM_LOGI("rpc", "%s: the client cancelled the call while it ran", c->m->path);
    rpc_call_finish_bytes(c, reply, reply_len, rc, why, 0);
}

static void *worker_main(void *arg)
{
    ksm_rpc_server *s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (s->q_head == NULL && !s->workers_stop) pthread_cond_wait(&s->q_cond, &s->lock);
        struct rpc_call *c = s->q_head;
        if (c == NULL) break; /* stopping and nothing left */
        s->q_head = c->next;
        if (s->q_head == NULL) s->q_tail = NULL;
        pthread_mutex_unlock(&s->lock);
        if (RPC_KIND_WEIGHTS(c->m->kind))
            rpc_weights_run(s, c);
        else
            run_unary(s, c);
        pthread_mutex_lock(&s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Cheap calls that only take a model's lock briefly and never wait on a device or a disk run on
 * the completion-queue thread: the two thread hand-offs through the worker pool (a futex wake
 * each way) cost more CPU and latency than such a call's own work, slot reports of every slot
 * included (a few microseconds to encode). SetAlpha writes the journal (an fsync) when state
 * persists, so it goes to the workers then. Decided once per server (rpc_server_start). */
static bool method_runs_inline(const ksm_rpc_server *s, const struct rpc_method *m)
{
    if (m->kind != RPC_UNARY) return false;
    if (strcmp(m->path, "/kasmina.v1.Kasmina/GetModel") == 0 ||
        strcmp(m->path, "/kasmina.v1.Kasmina/GetServerInfo") == 0 ||
        strcmp(m->path, "/kasmina.v1.Kasmina/GetSlotReports") == 0)
        return true;
    return !ksm_service_persists(s->service) &&
           strcmp(m->path, "/kasmina.v1.Kasmina/SetAlpha") == 0;
}

static bool run_inline(const ksm_rpc_server *s, const struct rpc_method *m)
{
    size_t i = (size_t)(m - rpc_methods);
    return i < KSM_RPC_STATS_METHODS && s->inline_call[i];
}

bool rpc_enqueue(ksm_rpc_server *s, struct rpc_call *c)
{
    pthread_mutex_lock(&s->lock);
    if (s->workers_stop) { /* the workers may have exited: nobody would take the call */
        pthread_mutex_unlock(&s->lock);
        return false;
    }
    c->next = NULL;
    if (s->q_tail != NULL)
        s->q_tail->next = c;
    else
        s->q_head = c;
    s->q_tail = c;
    pthread_cond_signal(&s->q_cond);
    pthread_mutex_unlock(&s->lock);
    return true;
}

int rpc_health_status(ksm_rpc_server *s, const char *service)
{
    if (service != NULL && service[0] != '\0' && strcmp(service, "kasmina.v1.Kasmina") != 0)
        return -1;
    return atomic_load(&s->serving) && !atomic_load(&s->draining) &&
                   ksm_engine_health(s->engine, NULL, 0) == 0
               ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
               : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

static void health_check(ksm_rpc_server *s, struct rpc_call *c)
{
    char why[192];
    ProtobufCMessage *req =
        decode(c, &grpc__health__v1__health_check_request__descriptor, why, sizeof why);
    if (req == NULL) {
        rpc_call_finish(c, NULL, KSM_EINVAL, why, 0);
        return;
    }
    const char *svc = ((Grpc__Health__V1__HealthCheckRequest *)req)->service;
    int st = rpc_health_status(s, svc);
    if (st < 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "The service '%.100s' is not known to this server.", svc);
        rpc_call_finish(c, NULL, KSM_ENOENT, msg, GRPC_STATUS_NOT_FOUND);
    } else {
        Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
        rpc_call_finish(c, &r.base, 0, NULL, 0);
    }
    protobuf_c_message_free_unpacked(req, NULL);
}

/* A request over max-message-bytes (gRPC read it: its own limit is off). */
static void too_big(ksm_rpc_server *s, struct rpc_call *c)
{
    char msg[320];
    const char *name = strrchr(c->m->path, '/') + 1;
    size_t n = grpc_byte_buffer_length(c->payload);
    if (strcmp(name, "LoadWeights") == 0)
        snprintf(msg, sizeof msg,
                 "The LoadWeights request is %zu bytes, over max-message-bytes = %zu: send the "
                 "weights with LoadWeightsStream (kasminactl load-weights --stream), which moves "
                 "any size in chunks, or raise kasminad's --max-message-bytes.",
                 n, s->cfg.max_message_bytes);
    else
        snprintf(msg, sizeof msg,
                 "The %s request is %zu bytes; max-message-bytes = %zu (raise kasminad's "
                 "--max-message-bytes).",
                 name, n, s->cfg.max_message_bytes);
    rpc_call_finish(c, NULL, KSM_ELIMIT, msg, 0);
}

static void on_request(struct rpc_tag *t, bool ok)
{
    struct rpc_call *c = container_of(t, struct rpc_call, request_tag);
    ksm_rpc_server *s = c->srv;
    if (!ok) { /* the server is shutting down: the slot was never used */
        if (c->gc != NULL) {
            grpc_call_unref(c->gc);
            c->gc = NULL;
        }
        call_free(c);
        return;
    }
    rpc_stats_call_start(c);
    if (!atomic_load(&s->shutting_down)) post_request(s, c->m);
    /* A call handed to a worker or to the event hub starts its close batch now, so that a
     * cancellation is seen while it waits or streams. A call answered here on the CQ thread
     * (inline unary calls, health checks, unknown methods, refusals) receives the close in its
     * one send batch instead: one batch and one completion fewer per call. */
    /* A compressed unary request is inflated (up to max-message-bytes) on a worker, never
     * here: the completion-queue thread serves every other call meanwhile. */
    bool zipped = rpc_payload_compressed(c);
    bool handoff = c->m != NULL && (c->m->kind == RPC_EVENTS || c->m->kind == RPC_HEALTH_WATCH ||
                                    RPC_KIND_WEIGHTS(c->m->kind) ||
                                    (c->m->kind == RPC_UNARY && (zipped || !run_inline(s, c->m))));
    if (handoff) {
        atomic_store(&c->refs, 2); /* handling + close batch */
        grpc_op op;
        memset(&op, 0, sizeof op);
        op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        op.data.recv_close_on_server.cancelled = &c->cancelled;
        grpc_call *gc = c->gc;
        KSM_TSAN_RELEASE(&c->close_tag);
        if (grpc_call_start_batch(gc, &op, 1, &c->close_tag, NULL) != GRPC_CALL_OK) {
            atomic_store(&c->closed, true);
            atomic_fetch_sub(&c->refs, 1);
        }
    } else {
        atomic_store(&c->refs, 1); /* handling, with the close in the send batch */
        c->close_in_send = true;
    }
    if (!rpc_authorize(s, c)) return;
    if (c->m == NULL) {
        char *method = grpc_slice_to_c_string(c->details.method);
        char msg[256];
        snprintf(msg, sizeof msg, "The method %.200s is not implemented by kasminad.", method);
        gpr_free(method);
        rpc_call_finish(c, NULL, KSM_ENOSYS, msg, GRPC_STATUS_UNIMPLEMENTED);
        return;
    }
    /* gRPC's receive limit is off (it reads a whole message before refusing it, in words that
     * do not name the option): the message is refused here, naming it. */
    if (c->payload != NULL && grpc_byte_buffer_length(c->payload) > s->cfg.max_message_bytes) {
        too_big(s, c);
        return;
    }
    /* Authorised (or a health check): a compressed request is refused now, before it is queued,
     * unless allowed; a health or event-stream request (a few bytes) is inflated here, capped. */
    if (zipped && (!s->cfg.allow_compressed_requests ||
                   (c->m->kind != RPC_UNARY && !RPC_KIND_WEIGHTS(c->m->kind)))) {
        char why[256];
        int zrc = rpc_payload_inflate(s, c, RPC_SMALL_REQUEST_MAX, why, sizeof why);
        if (zrc != 0) {
            rpc_call_finish(c, NULL, zrc, why, 0);
            return;
        }
    }
    switch (c->m->kind) {
    case RPC_HEALTH_CHECK: health_check(s, c); return;
    case RPC_EVENTS:
    case RPC_HEALTH_WATCH: {
        char why[192];
        ProtobufCMessage *req = decode(c, c->m->req, why, sizeof why);
        if (req == NULL) {
            rpc_call_finish(c, NULL, KSM_EINVAL, why, 0);
            return;
        }
        if (c->m->kind == RPC_EVENTS && atomic_load(&s->draining))
            rpc_call_finish(c, NULL, KSM_ESHUTDOWN, "The server is draining for shutdown.", 0);
        else if (c->m->kind == RPC_EVENTS)
            rpc_hub_watch_events(s, c, req);
        else
            rpc_hub_watch_health(s, c, req);
        protobuf_c_message_free_unpacked(req, NULL);
        return;
    }
    default: break;
    }
    if (atomic_load(&s->draining)) {
        rpc_call_finish(c, NULL, KSM_ESHUTDOWN, "The server is draining for shutdown.", 0);
        return;
    }
    if (rpc_deadline_passed(c)) {
        rpc_call_finish(c, NULL, KSM_ETIMEDOUT, "The call's deadline had passed on arrival.", 0);
        return;
    }
    if (atomic_fetch_add(&s->inflight, 1) >= s->cfg.max_concurrent_calls) {
        atomic_fetch_sub(&s->inflight, 1);
        char msg[128];
        snprintf(msg, sizeof msg,
                 "Too many calls in flight: max-concurrent-calls = %d; retry later.",
                 s->cfg.max_concurrent_calls);
        rpc_call_finish(c, NULL, KSM_ELIMIT, msg, 0);
        return;
    }
    c->counted = true;
    if (run_inline(s, c->m) && !zipped) {
        run_unary(s, c);
        return;
    }
    if (!rpc_enqueue(s, c))
        rpc_call_finish(c, NULL, KSM_ESHUTDOWN, "The server is shutting down.", 0);
}

static void on_close(struct rpc_tag *t, bool ok)
{
    struct rpc_call *c = container_of(t, struct rpc_call, close_tag);
    atomic_store(&c->closed, true);
    if (c->m != NULL && (c->m->kind == RPC_EVENTS || c->m->kind == RPC_HEALTH_WATCH))
        rpc_hub_stream_closed(c);
    rpc_call_unref(c);
}

static void on_send(struct rpc_tag *t, bool ok)
{
    struct rpc_call *c = container_of(t, struct rpc_call, send_tag);
    if (c->close_in_send) atomic_store(&c->closed, true);
    if (c->m != NULL && (c->m->kind == RPC_EVENTS || c->m->kind == RPC_HEALTH_WATCH)) {
        rpc_hub_stream_sent(c, ok);
        return;
    }
    if (c->ws != NULL && rpc_weights_sent(c, ok)) return;
    if (c->counted) {
        c->counted = false;
        atomic_fetch_sub(&c->srv->inflight, 1);
    }
    rpc_call_unref(c);
}

static void on_shutdown(struct rpc_tag *t, bool ok)
{
    ksm_rpc_server *s = container_of(t, ksm_rpc_server, shutdown_tag);
    pthread_mutex_lock(&s->lock);
    atomic_store(&s->shutdown_seen, true);
    pthread_cond_broadcast(&s->idle_cond);
    pthread_mutex_unlock(&s->lock);
}

static void *cq_main(void *arg)
{
    ksm_rpc_server *s = arg;
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        struct rpc_tag *t = ev.tag;
        KSM_TSAN_ACQUIRE(t); /* pairs with the KSM_TSAN_RELEASE before gRPC was given t */
        t->done(t, ev.success != 0);
    }
    return NULL;
}

/* ---- Server ---- */

/* gRPC's own lines (transport errors, by default nothing below GPR_LOG_SEVERITY_ERROR) go
 * through kasmina's log, so that --log-format json stays one object per line. */
static void grpc_log(gpr_log_func_args *a)
{
    enum ksm_log_level lv = a->severity == GPR_LOG_SEVERITY_ERROR  ? KSM_LOG_ERROR
                            : a->severity == GPR_LOG_SEVERITY_INFO ? KSM_LOG_INFO
                                                                   : KSM_LOG_DEBUG;
    const char *file = a->file != NULL ? strrchr(a->file, '/') : NULL;
    KSM_LOG(lv, "grpc", "%s (%s:%d)", a->message != NULL ? a->message : "",
            file != NULL ? file + 1 : (a->file != NULL ? a->file : "?"), a->line);
}

void ksm_rpc_runtime_init(void)
{
    gpr_set_log_function(grpc_log);
    /* absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore): kIgnore is 0 and the
     * enum is passed as an int. The inline namespace differs between builds of abseil. */
    static const char *const names[] = {
        "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
        "_ZN4absl12lts_2022062329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE",
        "_ZN4absl29SetMutexDeadlockDetectionModeENS_15OnDeadlockCycleE",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *sym = dlsym(RTLD_DEFAULT, names[i]);
        if (sym != NULL) {
            void (*set_mode)(int);
            memcpy(&set_mode, &sym, sizeof set_mode);
            set_mode(0);
            return;
        }
    }
}

void ksm_rpc_server_set_serving(ksm_rpc_server *s, bool serving)
{
    atomic_store(&s->serving, serving);
    if (s->hub != NULL) rpc_hub_kick(s->hub);
}

void ksm_rpc_server_drain_begin(ksm_rpc_server *s)
{
    if (atomic_exchange(&s->draining, true)) return;
    KSM_LOGI("rpc", "draining: health NOT_SERVING, %d call(s) in flight",
             atomic_load(&s->inflight));
    if (s->hub != NULL) rpc_hub_kick(s->hub);
}

int ksm_rpc_server_inflight(ksm_rpc_server *s) { return atomic_load(&s->inflight); }

void rpc_config_defaults(struct ksm_rpc_server_config *cfg)
{
    if (cfg->max_message_bytes == 0) cfg->max_message_bytes = 64u << 20;
    if (cfg->max_message_bytes > INT_MAX) cfg->max_message_bytes = INT_MAX;
    if (cfg->max_reply_bytes == 0) cfg->max_reply_bytes = 64u << 20;
    if (cfg->max_weights_bytes == 0) cfg->max_weights_bytes = (size_t)1 << 30;
    if (cfg->workers <= 0) cfg->workers = 4;
    if (cfg->max_concurrent_calls <= 0) cfg->max_concurrent_calls = 256;
    if (cfg->subscriber_buffer == 0) cfg->subscriber_buffer = 1024;
    if (cfg->version == NULL) cfg->version = "0.0.0";
}

int ksm_rpc_server_start(ksm_service *svc, const struct ksm_rpc_server_config *cfg,
                         ksm_rpc_server **out, char *err, size_t errlen)
{
    char dummy[8];
    if (err == NULL || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = '\0';
    if (cfg->n_listen == 0) {
        snprintf(err, errlen, "at least one listen address is needed");
        return KSM_EINVAL;
    }
    ksm_rpc_server *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    s->service = svc;
    s->engine = ksm_service_engine(svc);
    s->cfg = *cfg;
    rpc_config_defaults(&s->cfg);
    /* A subscriber cannot lag by more than the event log keeps. */
    size_t ring = ksm_event_log_capacity(ksm_service_events(svc));
    if (s->cfg.subscriber_buffer > ring) s->cfg.subscriber_buffer = ring;
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->limits_lock, NULL);
    pthread_cond_init(&s->q_cond, NULL);
    pthread_cond_init(&s->idle_cond, NULL);
    atomic_store(&s->serving, true);
    s->shutdown_tag.done = on_shutdown;
    s->unix_paths = calloc(cfg->n_listen, sizeof *s->unix_paths);
    s->lock_fds = calloc(cfg->n_listen, sizeof *s->lock_fds);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    s->started_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    int rc = KSM_ENOMEM;
    if (s->unix_paths == NULL || s->lock_fds == NULL) goto out_free;
    if ((rc = rpc_security_init(s, err, errlen)) != 0) goto out_free;

    grpc_init();
    grpc_arg args[4];
    memset(args, 0, sizeof args);
    /* max-message-bytes is checked by kasminad (on_request, rpc/weights.c), in a sentence that
     * names it: gRPC 1.51 reads a whole message before its own limit refuses it anyway. */
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = -1;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = -1;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_ALLOW_REUSEPORT; /* a second daemon must not share a TCP port */
    args[2].value.integer = 0;
    /* gRPC would inflate a compressed request in full before any check: rpc/inflate does it,
     * after authorisation and up to max-message-bytes, or refuses it. */
    args[3].type = GRPC_ARG_INTEGER;
    args[3].key = GRPC_ARG_ENABLE_PER_MESSAGE_DECOMPRESSION;
    args[3].value.integer = 0;
    grpc_channel_args ca = {.num_args = 4, .args = args};
    s->server = grpc_server_create(&ca, NULL);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->cq, NULL);
    for (size_t i = 0; i < rpc_n_methods; i++) {
        if (i < KSM_RPC_STATS_METHODS) s->inline_call[i] = method_runs_inline(s, &rpc_methods[i]);
        rpc_methods[i].handle = grpc_server_register_method(
            s->server, rpc_methods[i].path, NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        if (rpc_methods[i].handle == NULL) {
            snprintf(err, errlen, "cannot register %s", rpc_methods[i].path);
            rc = KSM_EINTERNAL;
            goto out_grpc;
        }
    }
    for (size_t i = 0; i < cfg->n_listen; i++)
        if ((rc = rpc_add_listener(s, cfg->listen[i], err, errlen)) != 0) goto out_grpc;
    if ((rc = rpc_hub_new(s, &s->hub)) != 0) {
        snprintf(err, errlen, "cannot start the event hub: %s", ksm_strerror(rc));
        goto out_grpc;
    }
    grpc_server_start(s->server);
    if (pthread_create(&s->cq_thread, NULL, cq_main, s) != 0) {
        rc = KSM_ENOMEM;
        snprintf(err, errlen, "cannot start the completion-queue thread");
        goto out_started;
    }
    s->cq_started = true;
    s->workers = calloc((size_t)s->cfg.workers, sizeof *s->workers);
    for (int i = 0; s->workers != NULL && i < s->cfg.workers; i++) {
        if (pthread_create(&s->workers[i], NULL, worker_main, s) != 0) break;
        s->n_workers++;
    }
    if (s->n_workers == 0) {
        rc = KSM_ENOMEM;
        snprintf(err, errlen, "cannot start the worker threads");
        goto out_started;
    }
    for (size_t i = 0; i < rpc_n_methods; i++)
        for (int k = 0; k < 2; k++) post_request(s, &rpc_methods[i]);
    post_request(s, NULL);
    *out = s;
    return 0;

out_started:
    ksm_rpc_server_free(s);
    return rc;
out_grpc:
    rpc_hub_free(s->hub);
    KSM_TSAN_RELEASE(&s->shutdown_tag);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    grpc_server_cancel_all_calls(s->server);
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    grpc_shutdown();
out_free:
    for (size_t i = 0; i < s->n_unix; i++) {
        close(s->lock_fds[i]);
        free(s->unix_paths[i]);
    }
    free(s->unix_paths);
    free(s->lock_fds);
    rpc_security_fini(s);
    rpc_limits_fini(s);
    pthread_cond_destroy(&s->q_cond);
    pthread_cond_destroy(&s->idle_cond);
    pthread_mutex_destroy(&s->limits_lock);
    pthread_mutex_destroy(&s->lock);
    free(s);
    return rc;
}

void ksm_rpc_server_free(ksm_rpc_server *s)
{
    if (s == NULL) return;
    atomic_store(&s->draining, true);
    atomic_store(&s->serving, false);
    if (s->hub != NULL) {
        rpc_hub_end_all(s->hub);
        if (!rpc_hub_wait_empty(s->hub, 1000))
            KSM_LOGW("rpc", "shutdown: streams still open after 1 s are cancelled");
    }
    atomic_store(&s->shutting_down, true);
    KSM_TSAN_RELEASE(&s->shutdown_tag);
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
    grpc_server_cancel_all_calls(s->server);

    pthread_mutex_lock(&s->lock);
    s->workers_stop = true;
    pthread_cond_broadcast(&s->q_cond);
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < s->n_workers; i++) pthread_join(s->workers[i], NULL);
    free(s->workers);

    if (s->cq_started) {
        pthread_mutex_lock(&s->lock);
        while (!atomic_load(&s->shutdown_seen) || atomic_load(&s->live_calls) > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 5;
            if (pthread_cond_timedwait(&s->idle_cond, &s->lock, &ts) != 0)
                KSM_LOGW("rpc", "shutdown: waiting for %d call(s) to end",
                         atomic_load(&s->live_calls));
        }
        pthread_mutex_unlock(&s->lock);
    }
    rpc_hub_free(s->hub);
    grpc_completion_queue_shutdown(s->cq);
    if (s->cq_started)
        pthread_join(s->cq_thread, NULL);
    else
        while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    grpc_shutdown();
    for (size_t i = 0; i < s->n_unix; i++) {
        unlink(s->unix_paths[i]); /* ours: we hold its lock */
        close(s->lock_fds[i]);
        free(s->unix_paths[i]);
    }
    free(s->unix_paths);
    free(s->lock_fds);
    rpc_security_fini(s);
    rpc_limits_fini(s);
    pthread_cond_destroy(&s->q_cond);
    pthread_cond_destroy(&s->idle_cond);
    pthread_mutex_destroy(&s->limits_lock);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
