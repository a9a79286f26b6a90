/*
 * service/event_log: the numbered record of lifecycle events behind WatchEvents (service.h).
 *
 * The engine's sink (called with a model lock held) only numbers the event and copies it into a
 * ring of the last `capacity` events, then tells the listener (the rpc layer's event thread),
 * outside the log's lock. Inside a mutation (between ksm_event_log_hold and
 * ksm_event_log_release on the same thread) the events are held on the thread instead, and are
 * published only once the mutation is durable; a rolled-back mutation's events are dropped.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "service/service.h"

struct ksm_event_log {
    pthread_mutex_t lock;
    struct ksm_lifecycle_event *ring;
    size_t cap;
    uint64_t last_seq; /* 0: none yet; event q lives in ring[(q - 1) % cap] */
    ksm_event_listener_fn listener;
    void *listener_ud;
    unsigned calling;    /* listener calls in progress (outside the lock) */
    pthread_cond_t idle; /* calling reached 0 */
};

/* Events held back on this thread (ksm_event_log_hold). */
static _Thread_local struct {
    bool on;
    size_t n, cap;
    struct ksm_lifecycle_event *ev;
} held;

int ksm_event_log_new(size_t capacity, struct ksm_event_log **out)
{
    struct ksm_event_log *l = calloc(1, sizeof *l);
    if (l == NULL) return KSM_ENOMEM;
    l->cap = capacity ? capacity : 1;
    l->ring = calloc(l->cap, sizeof *l->ring);
    if (l->ring == NULL) {
        free(l);
        return KSM_ENOMEM;
    }
    pthread_mutex_init(&l->lock, NULL);
    pthread_cond_init(&l->idle, NULL);
    *out = l;
    return 0;
}

void ksm_event_log_free(struct ksm_event_log *l)
{
    if (l == NULL) return;
    pthread_cond_destroy(&l->idle);
    pthread_mutex_destroy(&l->lock);
    free(l->ring);
    free(l);
}

void ksm_event_log_set_listener(struct ksm_event_log *l, ksm_event_listener_fn fn, void *ud)
{
    pthread_mutex_lock(&l->lock);
    l->listener = fn;
    l->listener_ud = ud;
    /* Once this returns the previous listener is never called again nor still running, so its
     * owner may free what ud points to. */
    while (l->calling > 0) pthread_cond_wait(&l->idle, &l->lock);
    pthread_mutex_unlock(&l->lock);
}

/* The log line of a published event (docs/logging.md#lifecycle): every stage transition at info
 * (germination, each STAGE_CHANGED, a prune with its reason), gate evaluations at debug with
 * their failed checks. Published events only: a rolled-back mutation's never happened. */
static void log_event(const struct ksm_lifecycle_event *ev)
{
    enum ksm_log_level lv = ksm_log_get_level();
    switch (ev->type) {
    case KSM_EV_SEED_GERMINATED:
        KSM_LOGI("lifecycle", "model %s slot %s: seed %s germinated (blueprint %s)", ev->model_id,
                 ev->slot_id, ev->seed_id, ev->blueprint_id);
        break;
    case KSM_EV_SEED_STAGE_CHANGED:
        KSM_LOGI("lifecycle", "model %s slot %s: seed %s %s -> %s (alpha %.4g)", ev->model_id,
                 ev->slot_id, ev->seed_id, ksm_stage_name(ev->from_stage),
                 ksm_stage_name(ev->to_stage), ev->alpha);
        break;
    case KSM_EV_SEED_PRUNED:
        KSM_LOGI("lifecycle", "model %s slot %s: seed %s pruned by %s: %s", ev->model_id,
                 ev->slot_id, ev->seed_id, ev->initiator[0] ? ev->initiator : "-",
                 ev->reason[0] ? ev->reason : "(no reason)");
        break;
    case KSM_EV_SEED_GATE_EVALUATED: {
        if (lv < KSM_LOG_DEBUG) break;
        char why[512] = "";
        size_t n = 0;
        for (int i = 0; i < ev->gate.n_checks && i < KSM_GATE_MAX_CHECKS && n < sizeof why; i++) {
            const struct ksm_gate_check *c = &ev->gate.checks[i];
            if (c->passed) continue;
            int w =
                snprintf(why + n, sizeof why - n, "%s%s: %s", n ? "; " : "", c->name, c->detail);
            if (w < 0) break;
            n += (size_t)w;
        }
        KSM_LOG(KSM_LOG_DEBUG, "lifecycle", "model %s slot %s: gate %s for %s %s%s%s", ev->model_id,
                ev->slot_id, ksm_gate_level_name(ev->gate.gate), ksm_stage_name(ev->target_stage),
                ev->gate.passed ? "passed" : "failed", why[0] ? ": " : "", why);
        break;
    }
    default: break;
    }
}

static void publish(struct ksm_event_log *l, const struct ksm_lifecycle_event *ev)
{
    log_event(ev);
    pthread_mutex_lock(&l->lock);
    uint64_t q = ++l->last_seq;
    l->ring[(q - 1) % l->cap] = *ev;
    ksm_event_listener_fn fn = l->listener;
    void *ud = l->listener_ud;
    if (fn != NULL) l->calling++;
    pthread_mutex_unlock(&l->lock);
    if (fn == NULL) return;
    fn(ud, ev, q);
    pthread_mutex_lock(&l->lock);
    if (--l->calling == 0) pthread_cond_broadcast(&l->idle);
    pthread_mutex_unlock(&l->lock);
}

void ksm_event_log_engine_sink(void *ud, const struct ksm_lifecycle_event *ev)
{
    struct ksm_event_log *l = ud;
    if (held.on) {
        if (held.n == held.cap) {
            size_t cap = held.cap ? 2 * held.cap : 4;
            struct ksm_lifecycle_event *p = realloc(held.ev, cap * sizeof *p);
            if (p == NULL) { /* cannot hold it: publish now rather than lose it */
                publish(l, ev);
                return;
            }
            held.ev = p;
            held.cap = cap;
        }
        held.ev[held.n++] = *ev;
        return;
    }
    publish(l, ev);
}

void ksm_event_log_hold(void)
{
    held.on = true;
    held.n = 0;
}

void ksm_event_log_release(struct ksm_event_log *l, bool publish_them)
{
    held.on = false;
    if (publish_them && l != NULL)
        for (size_t i = 0; i < held.n; i++) publish(l, &held.ev[i]);
    held.n = 0;
    /* freed every time: a thread's buffer must not outlive it (worker threads end at shutdown) */
    free(held.ev);
    held.ev = NULL;
    held.cap = 0;
}

void ksm_event_log_window(struct ksm_event_log *l, uint64_t *oldest, uint64_t *last)
{
    pthread_mutex_lock(&l->lock);
    *last = l->last_seq;
    *oldest = l->last_seq > l->cap ? l->last_seq - l->cap + 1 : 1;
    pthread_mutex_unlock(&l->lock);
}

size_t ksm_event_log_capacity(const struct ksm_event_log *l) { return l->cap; }

int ksm_event_log_get(struct ksm_event_log *l, uint64_t q, struct ksm_lifecycle_event *ev)
{
    pthread_mutex_lock(&l->lock);
    uint64_t oldest = l->last_seq > l->cap ? l->last_seq - l->cap + 1 : 1;
    int rc = (q == 0 || q > l->last_seq || q < oldest) ? KSM_ERANGE : 0;
    if (rc == 0) *ev = l->ring[(q - 1) % l->cap];
    pthread_mutex_unlock(&l->lock);
    return rc;
}
