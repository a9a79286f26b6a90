/*
 * rpc/events: the event hub behind WatchEvents, and Health/Watch.
 *
 * The events themselves are the service's event log (service/service.h: numbered, the last
 * event_ring kept); its listener only counts the event and signals. One event thread feeds
 * every stream: it
 * keeps at most one write in flight per stream, skips events of other models, and ends a
 * subscriber with RESOURCE_EXHAUSTED when more than cfg.subscriber_buffer events arrived since
 * its position (or its subscription) that it has not taken yet, or when the ring overwrote an
 * event it still needed. The engine never waits for a subscriber.
 *
 * A listed stream is removed (its handling reference dropped) by the event thread once its
 * close batch completed and no write is in flight; completions only set flags and signal.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"
#include "wire/status.h"
#include "service/service.h"

struct rpc_hub {
    ksm_rpc_server *s;
    struct ksm_event_log *log;
    pthread_mutex_t lock; /* recursive: a failed start_batch completes inline */
    pthread_cond_t cond, empty;
    pthread_t thread;
    bool stop, kicked, end_all;
    struct rpc_call *subs;
};

/* The event log's listener: after every published event, outside the log's lock. */
static void on_event(void *ud, const struct ksm_lifecycle_event *ev, uint64_t sequence)
{
    struct rpc_hub *h = ud;
    (void)sequence;
    rpc_stats_event(h->s, ev);
    pthread_mutex_lock(&h->lock);
    if (h->subs != NULL) {
        h->kicked = true;
        pthread_cond_signal(&h->cond);
    }
    pthread_mutex_unlock(&h->lock);
}

uint64_t rpc_hub_last_sequence(struct rpc_hub *h)
{
    uint64_t oldest, last;
    ksm_event_log_window(h->log, &oldest, &last);
    return last;
}

void rpc_hub_kick(struct rpc_hub *h)
{
    pthread_mutex_lock(&h->lock);
    h->kicked = true;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
}

void rpc_hub_end_all(struct rpc_hub *h)
{
    pthread_mutex_lock(&h->lock);
    h->end_all = true;
    h->kicked = true;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
}

bool rpc_hub_wait_empty(struct rpc_hub *h, int timeout_ms)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&h->lock);
    int rc = 0;
    while (h->subs != NULL && rc == 0) rc = pthread_cond_timedwait(&h->empty, &h->lock, &until);
    bool empty = h->subs == NULL;
    pthread_mutex_unlock(&h->lock);
    return empty;
}

static void send_msg(struct rpc_call *c, const ProtobufCMessage *msg)
{
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!c->started) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->started = true;
    }
    if (c->reply != NULL) grpc_byte_buffer_destroy(c->reply);
    c->reply = NULL;
    if (msg != NULL) {
        c->reply = rpc_pack(msg);
        if (c->reply == NULL) {
            c->finishing = true;
            grpc_call_cancel_with_status(c->gc, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                         "The server ran out of memory encoding an event.", NULL);
            if (n == 0) return;
        } else {
            ops[n].op = GRPC_OP_SEND_MESSAGE;
            ops[n].data.send_message.send_message = c->reply;
            n++;
        }
    }
    c->writing = true;
    grpc_call *gc = c->gc; /* read before the release (rpc/tsan.h) */
    KSM_TSAN_RELEASE(&c->send_tag);
    if (grpc_call_start_batch(gc, ops, n, &c->send_tag, NULL) != GRPC_CALL_OK) {
        c->writing = false;
        c->finishing = true;
    }
}

/* Ends a listed stream with a status. A stream with a write in flight is cancelled with that
 * status when it is stuck behind flow control (slow subscriber), or ends after the write when
 * the server shuts down (gentle: the last health change still reaches the client). */
static void end_stream(struct rpc_call *c, int err, grpc_status_code code, const char *msg,
                       bool gentle)
{
    if (c->finishing) return;
    if (c->writing) {
        if (gentle) {
            c->end_pending = true;
            return;
        }
        c->finishing = true;
        grpc_call_cancel_with_status(c->gc, code, msg, NULL);
        return;
    }
    c->finishing = true;
    c->writing = true;
    rpc_call_finish(c, NULL, err, msg, code);
}

static bool event_matches(const struct rpc_call *c, const struct ksm_lifecycle_event *ev)
{
    return c->model_filter[0] == '\0' || strcmp(c->model_filter, ev->model_id) == 0;
}

static void feed_events(struct rpc_hub *h, struct rpc_call *c)
{
    size_t buf = h->s->cfg.subscriber_buffer;
    uint64_t oldest, last;
    ksm_event_log_window(h->log, &oldest, &last);
    if (c->next_seq > last) return;
    if (c->next_seq < oldest) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "The subscriber fell behind: event %llu left the event-ring (%zu events) before "
                 "it was sent.",
                 (unsigned long long)c->next_seq, ksm_event_log_capacity(h->log));
        end_stream(c, KSM_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED, msg, false);
        return;
    }
    /* Events newer than both the subscriber's position and its subscription point. */
    uint64_t base = c->next_seq - 1 > c->subscribed_at ? c->next_seq - 1 : c->subscribed_at;
    if (last > base && last - base > buf) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "The subscriber fell more than subscriber-buffer = %zu events behind and was "
                 "disconnected.",
                 buf);
        end_stream(c, KSM_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED, msg, false);
        return;
    }
    while (c->next_seq <= last) {
        uint64_t q = c->next_seq++;
        struct ksm_lifecycle_event ev;
        if (ksm_event_log_get(h->log, q, &ev) != 0) { /* overwritten since the window was read */
            c->next_seq = q;
            h->kicked = true;
            return;
        }
        if (!event_matches(c, &ev)) continue;
        struct ksm_pb_arena a;
        ksm_pb_arena_init(&a);
        Kasmina__V1__LifecycleEvent pb;
        if (ksm_wire_event_to_pb(q, &ev, &a, &pb) == 0)
            send_msg(c, &pb.base);
        else
            end_stream(c, KSM_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED,
                       "The server ran out of memory encoding an event.", false);
        ksm_pb_arena_fini(&a);
        return;
    }
}

static void feed_health(struct rpc_hub *h, struct rpc_call *c)
{
    int st = c->health_known
                 ? rpc_health_status(h->s, "")
                 : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    if (st == c->health_sent) return;
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
    c->health_sent = st;
    send_msg(c, &r.base);
}

static void *hub_main(void *arg)
{
    struct rpc_hub *h = arg;
    pthread_mutex_lock(&h->lock);
    while (!h->stop) {
        h->kicked = false;
        struct rpc_call **pp = &h->subs;
        while (*pp != NULL) {
            struct rpc_call *c = *pp;
            if (atomic_load(&c->closed) && !c->writing) {
                *pp = c->next;
                c->listed = false;
                rpc_call_unref(c);
                continue;
            }
            pp = &c->next;
            if ((h->end_all || c->end_pending) && !c->finishing && !c->writing) {
                /* Health watchers get the last status change before the end. */
                if (c->m->kind == RPC_HEALTH_WATCH && !atomic_load(&c->closed)) feed_health(h, c);
                if (!c->writing)
                    end_stream(c, KSM_ESHUTDOWN, GRPC_STATUS_UNAVAILABLE,
                               "The server is shutting down.", true);
            }
            if (c->writing || c->finishing || atomic_load(&c->closed)) continue;
            if (c->m->kind == RPC_EVENTS)
                feed_events(h, c);
            else
                feed_health(h, c);
        }
        if (h->subs == NULL) pthread_cond_broadcast(&h->empty);
        if (!h->kicked) pthread_cond_wait(&h->cond, &h->lock);
    }
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

int rpc_hub_new(ksm_rpc_server *s, struct rpc_hub **out)
{
    struct rpc_hub *h = calloc(1, sizeof *h);
    if (h == NULL) return KSM_ENOMEM;
    h->s = s;
    h->log = ksm_service_events(s->service);
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&h->lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_cond_init(&h->cond, NULL);
    pthread_cond_init(&h->empty, NULL);
    if (pthread_create(&h->thread, NULL, hub_main, h) != 0) {
        pthread_cond_destroy(&h->cond);
        pthread_mutex_destroy(&h->lock);
        free(h);
        return KSM_ENOMEM;
    }
    ksm_event_log_set_listener(h->log, on_event, h);
    *out = h;
    return 0;
}

void rpc_hub_free(struct rpc_hub *h)
{
    if (h == NULL) return;
    ksm_event_log_set_listener(h->log, NULL, NULL);
    pthread_mutex_lock(&h->lock);
    h->stop = true;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
    pthread_join(h->thread, NULL);
    pthread_cond_destroy(&h->cond);
    pthread_cond_destroy(&h->empty);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

static void list_stream(struct rpc_hub *h, struct rpc_call *c)
{
    c->listed = true;
    c->next = h->subs;
    h->subs = c;
    /* Initial metadata now, so a client that waits for it knows it is subscribed. */
    send_msg(c, NULL);
    h->kicked = true;
    pthread_cond_signal(&h->cond);
}

void rpc_hub_watch_events(ksm_rpc_server *s, struct rpc_call *c, const ProtobufCMessage *req)
{
    struct rpc_hub *h = s->hub;
    const Kasmina__V1__WatchEventsRequest *r = (const Kasmina__V1__WatchEventsRequest *)req;
    char err[192] = "";
    if (ksm_wire_check_model_id(r->model_id, "model_id", false, err, sizeof err) != 0) {
        rpc_call_finish(c, NULL, KSM_EINVAL, err, 0);
        return;
    }
    pthread_mutex_lock(&h->lock);
    uint64_t oldest, last;
    ksm_event_log_window(h->log, &oldest, &last);
    if (r->after_sequence > last) {
        snprintf(err, sizeof err,
                 "after_sequence %llu is ahead of the last event %llu (sequences restart with "
                 "each server run).",
                 (unsigned long long)r->after_sequence, (unsigned long long)last);
        pthread_mutex_unlock(&h->lock);
        rpc_call_finish(c, NULL, KSM_ERANGE, err, GRPC_STATUS_OUT_OF_RANGE);
        return;
    }
    if (r->after_sequence > 0 && r->after_sequence + 1 < oldest) {
        snprintf(err, sizeof err, "Events after %llu are no longer kept; the oldest kept is %llu.",
                 (unsigned long long)r->after_sequence, (unsigned long long)oldest);
        pthread_mutex_unlock(&h->lock);
        rpc_call_finish(c, NULL, KSM_ERANGE, err, GRPC_STATUS_OUT_OF_RANGE);
        return;
    }
    c->next_seq = r->after_sequence > 0 ? r->after_sequence + 1 : oldest;
    c->subscribed_at = last;
    snprintf(c->model_filter, sizeof c->model_filter, "%s", r->model_id ? r->model_id : "");
    list_stream(h, c);
    pthread_mutex_unlock(&h->lock);
}

void rpc_hub_watch_health(ksm_rpc_server *s, struct rpc_call *c, const ProtobufCMessage *req)
{
    struct rpc_hub *h = s->hub;
    const Grpc__Health__V1__HealthCheckRequest *r =
        (const Grpc__Health__V1__HealthCheckRequest *)req;
    pthread_mutex_lock(&h->lock);
    c->health_known = rpc_health_status(s, r->service) >= 0;
    c->health_sent = -1;
    list_stream(h, c);
    pthread_mutex_unlock(&h->lock);
}

void rpc_hub_stream_sent(struct rpc_call *c, bool ok)
{
    if (!c->listed) { /* an error status before the stream was listed */
        rpc_call_unref(c);
        return;
    }
    struct rpc_hub *h = c->srv->hub;
    pthread_mutex_lock(&h->lock);
    c->writing = false;
    if (!ok) c->finishing = true;
    h->kicked = true;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
}

void rpc_hub_stream_closed(struct rpc_call *c)
{
    struct rpc_hub *h = c->srv->hub;
    pthread_mutex_lock(&h->lock);
    h->kicked = true;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
}
