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
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
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

static void publish(struct ksm_event_log *l, const struct ksm_lifecycle_event *ev)
{
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
