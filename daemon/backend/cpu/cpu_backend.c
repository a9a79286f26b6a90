/*
 * The CPU backend: the reference implementation of the device runtime, asynchronous like CUDA.
 *
 * Each stream owns a worker thread and a growable ring of tasks (copies, memsets, host
 * functions, op launches, event records and waits) that the worker runs in order. Device memory
 * is host memory from posix_memalign, kept mapped until the caching allocator gives it back.
 * See cpu_backend_impl.h for the event and sticky-error model.
 *
 * Locks: event->mu is a leaf lock; stream->mu may be held while taking it (an enqueue of a
 * record or wait, and a worker completing a record), never the reverse. A worker never holds its
 * stream's lock while it runs any other task. device->mu guards the device's list of live
 * streams and their dev_refs (how many device synchronizations are using a stream right now).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/cpu/cpu_backend_impl.h"
#include "backend/cpu/cpu_blas.h"
#include "backend/cpu/cpu_ops.h"

#define CPU_MAX_DEVICES  64
#define CPU_RING_INITIAL 16
#define CPU_ALIGN_SMALL  256
#define CPU_ALIGN_PAGE   4096

// ---- Objects ----

struct cpu_event {
    struct ksm_event base;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t recorded; /* sequence number of the last record */
    /* Sequence numbers of records whose task has not run yet. Records on different streams
     * complete in any order, so "#n has completed" is "n is not pending", not "a record >= n
     * has completed". */
    uint64_t *pending;
    size_t n_pending, cap_pending;
    int refs; /* 1 for the owner (until ksm_event_free) + 1 per queued task */
};

enum cpu_task_kind {
    TASK_MEMCPY = 0,
    TASK_MEMSET,
    TASK_HOST_FN,
    TASK_OP,
    TASK_RECORD,
    TASK_WAIT,
    TASK_FAIL,
};

struct cpu_task {
    enum cpu_task_kind kind;
    union {
        struct {
            void *dst;
            const void *src;
            size_t n;
        } copy;
        struct {
            void *dst;
            int value;
            size_t n;
        } set;
        struct {
            ksm_host_fn fn;
            void *arg;
        } host;
        struct {
            struct cpu_event *ev;
            uint64_t seq;
        } event;
        int err;
        struct ksm_op op;
    } u;
};

/* Every task but an op fits in the first TASK_SMALL_BYTES of the union: copy only those. */
#define TASK_SMALL_BYTES sizeof(((struct cpu_task *)0)->u.copy)
_Static_assert(sizeof(((struct cpu_task *)0)->u.set) <= TASK_SMALL_BYTES, "set task");
_Static_assert(sizeof(((struct cpu_task *)0)->u.host) <= TASK_SMALL_BYTES, "host task");
_Static_assert(sizeof(((struct cpu_task *)0)->u.event) <= TASK_SMALL_BYTES, "event task");
_Static_assert(sizeof(((struct cpu_task *)0)->u.err) <= TASK_SMALL_BYTES, "fail task");

struct cpu_device;

struct cpu_stream {
    struct ksm_stream base;
    struct cpu_device *cdev;
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* worker: tasks arrived or stop requested */
    pthread_cond_t done_cv; /* synchronizers: a task completed */
    struct cpu_task *ring;
    size_t cap, head, count;
    uint64_t enqueued, completed;
    int sticky;
    bool stop;
    pthread_t thread;
    /* Guarded by cdev->mu. */
    struct cpu_stream *prev, *next;
    int dev_refs;
};

struct cpu_device {
    struct ksm_device base;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* a stream's dev_refs dropped to 0 */
    struct cpu_stream *streams;
    int n_streams;
};

struct cpu_backend {
    struct ksm_backend base;
    struct cpu_device *devs;
    ksm_device **ptrs;
};

static const struct ksm_stream_i cpu_stream_iface;
static const struct ksm_event_i cpu_event_iface;

static struct cpu_stream *to_stream(ksm_stream *s) { return (struct cpu_stream *)s; }
static struct cpu_event *to_event(ksm_event *e) { return (struct cpu_event *)e; }
static struct cpu_device *to_device(ksm_device *d) { return (struct cpu_device *)d; }

// ---- Events ----

/* True when record #seq has not completed yet (#0, "never recorded", never is). Caller holds
 * ev->mu. */
static bool event_pending(const struct cpu_event *ev, uint64_t seq)
{
    for (size_t i = 0; i < ev->n_pending; i++)
        if (ev->pending[i] == seq) return true;
    return false;
}

/* Marks record #seq complete. Caller holds ev->mu. */
static void event_complete(struct cpu_event *ev, uint64_t seq)
{
    for (size_t i = 0; i < ev->n_pending; i++)
        if (ev->pending[i] == seq) {
            ev->pending[i] = ev->pending[--ev->n_pending];
            break;
        }
    pthread_cond_broadcast(&ev->cv);
}

static void event_unref(struct cpu_event *ev)
{
    pthread_mutex_lock(&ev->mu);
    int left = --ev->refs;
    pthread_mutex_unlock(&ev->mu);
    if (left == 0) {
        pthread_cond_destroy(&ev->cv);
        pthread_mutex_destroy(&ev->mu);
        free(ev->pending);
        free(ev);
    }
}

static int cpu_event_new(ksm_device *d, ksm_event **out)
{
    struct cpu_event *ev = calloc(1, sizeof *ev);
    if (ev == NULL) return KSM_ENOMEM;
    if (pthread_mutex_init(&ev->mu, NULL) != 0) {
        free(ev);
        return KSM_ENOMEM;
    }
    if (pthread_cond_init(&ev->cv, NULL) != 0) {
        pthread_mutex_destroy(&ev->mu);
        free(ev);
        return KSM_ENOMEM;
    }
    ev->base.iface = &cpu_event_iface;
    ev->base.ctx = ev;
    ev->base.dev = d;
    ev->refs = 1;
    *out = &ev->base;
    return 0;
}

/* Queued record tasks hold references, so the memory lives until they have run. */
static void cpu_event_free(ksm_event *e) { event_unref(to_event(e)); }

static int cpu_event_query(ksm_event *e)
{
    struct cpu_event *ev = to_event(e);
    pthread_mutex_lock(&ev->mu);
    int rc = event_pending(ev, ev->recorded) ? KSM_ENOTREADY : 0;
    pthread_mutex_unlock(&ev->mu);
    return rc;
}

static int cpu_event_synchronize(ksm_event *e)
{
    struct cpu_event *ev = to_event(e);
    pthread_mutex_lock(&ev->mu);
    uint64_t target = ev->recorded;
    while (event_pending(ev, target)) pthread_cond_wait(&ev->cv, &ev->mu);
    pthread_mutex_unlock(&ev->mu);
    return 0;
}

// ---- Streams: the queue ----

/* Makes room for one more task. Caller holds s->mu. Returns 0, the sticky error or ENOMEM. */
static int stream_reserve(struct cpu_stream *s)
{
    if (s->sticky != 0) return s->sticky;
    if (s->count < s->cap) return 0;
    size_t ncap = s->cap ? s->cap * 2 : CPU_RING_INITIAL;
    struct cpu_task *ring = malloc(ncap * sizeof *ring);
    if (ring == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < s->count; i++) ring[i] = s->ring[(s->head + i) % s->cap];
    free(s->ring);
    s->ring = ring;
    s->cap = ncap;
    s->head = 0;
    return 0;
}

/* Appends t after stream_reserve() succeeded. Caller holds s->mu. */
static void stream_push_reserved(struct cpu_stream *s, const struct cpu_task *t)
{
    struct cpu_task *slot = &s->ring[(s->head + s->count) % s->cap];
    if (t->kind == TASK_OP) {
        *slot = *t;
    } else {
        slot->kind = t->kind;
        memcpy(&slot->u, &t->u, TASK_SMALL_BYTES);
    }
    s->count++;
    s->enqueued++;
    pthread_cond_signal(&s->work_cv);
}

static int stream_push(struct cpu_stream *s, const struct cpu_task *t)
{
    pthread_mutex_lock(&s->mu);
    int rc = stream_reserve(s);
    if (rc == 0) stream_push_reserved(s, t);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* Runs one task on the worker thread. sticky is the stream's error when the task started. */
static int task_run(struct cpu_task *t, int sticky)
{
    switch (t->kind) {
    case TASK_MEMCPY:
        if (sticky == 0) memmove(t->u.copy.dst, t->u.copy.src, t->u.copy.n);
        return 0;
    case TASK_MEMSET:
        if (sticky == 0) memset(t->u.set.dst, t->u.set.value, t->u.set.n);
        return 0;
    case TASK_HOST_FN: t->u.host.fn(t->u.host.arg); return 0;
    case TASK_OP:
        if (sticky != 0) return 0;
        return ksm_cpu_op_exec(&t->u.op);
    case TASK_RECORD: /* run by stream_worker itself */ return KSM_EINTERNAL;
    case TASK_WAIT: {
        struct cpu_event *ev = t->u.event.ev;
        pthread_mutex_lock(&ev->mu);
        while (event_pending(ev, t->u.event.seq)) pthread_cond_wait(&ev->cv, &ev->mu);
        pthread_mutex_unlock(&ev->mu);
        event_unref(ev);
        return 0;
    }
    case TASK_FAIL: return t->u.err;
    }
    return KSM_EINTERNAL;
}

static void *stream_worker(void *arg)
{
    struct cpu_stream *s = arg;
    struct cpu_task t;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->count == 0 && !s->stop) pthread_cond_wait(&s->work_cv, &s->mu);
        if (s->count == 0) break; /* stop requested and the queue is drained */
        const struct cpu_task *src = &s->ring[s->head];
        if (src->kind == TASK_RECORD) {
            /* Run records under the stream lock (order: stream, then event), so that once an
             * event is complete, a query of the stream that recorded it last sees the record
             * counted too. */
            struct cpu_event *ev = src->u.event.ev;
            uint64_t seq = src->u.event.seq;
            s->head = (s->head + 1) % s->cap;
            s->count--;
            s->completed++;
            pthread_cond_broadcast(&s->done_cv);
            pthread_mutex_lock(&ev->mu);
            event_complete(ev, seq);
            pthread_mutex_unlock(&ev->mu);
            event_unref(ev);
            continue;
        }
        if (src->kind == TASK_OP) {
            t = *src;
        } else {
            t.kind = src->kind;
            memcpy(&t.u, &src->u, TASK_SMALL_BYTES);
        }
        s->head = (s->head + 1) % s->cap;
        s->count--;
        int sticky = s->sticky;
        pthread_mutex_unlock(&s->mu);

        int rc = task_run(&t, sticky);

        pthread_mutex_lock(&s->mu);
        if (rc != 0 && s->sticky == 0) {
            s->sticky = rc;
            KSM_LOGE("backend", "stream %" PRIu64 " on %s failed: %s", s->base.id,
                     s->base.dev->name, ksm_strerror(rc));
        }
        s->completed++;
        pthread_cond_broadcast(&s->done_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

// ---- Streams: the interface ----

static int cpu_stream_new(ksm_device *d, ksm_stream **out)
{
    struct cpu_device *cd = to_device(d);
    struct cpu_stream *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    s->base.iface = &cpu_stream_iface;
    s->base.ctx = s;
    s->base.dev = d;
    s->base.id = ksm_backend_next_stream_id();
    s->cdev = cd;
    int rc = KSM_ENOMEM;
    if (pthread_mutex_init(&s->mu, NULL) != 0) goto out_free;
    if (pthread_cond_init(&s->work_cv, NULL) != 0) goto out_destroy_mu;
    if (pthread_cond_init(&s->done_cv, NULL) != 0) goto out_destroy_work;
    s->ring = malloc(CPU_RING_INITIAL * sizeof *s->ring);
    if (s->ring == NULL) goto out_destroy_done;
    s->cap = CPU_RING_INITIAL;
    int err = pthread_create(&s->thread, NULL, stream_worker, s);
    if (err != 0) {
        rc = err == EAGAIN ? KSM_EAGAIN : -err;
        goto out_free_ring;
    }
    pthread_mutex_lock(&cd->mu);
    s->next = cd->streams;
    if (cd->streams != NULL) cd->streams->prev = s;
    cd->streams = s;
    cd->n_streams++;
    pthread_mutex_unlock(&cd->mu);
    *out = &s->base;
    return 0;

out_free_ring:
    free(s->ring);
out_destroy_done:
    pthread_cond_destroy(&s->done_cv);
out_destroy_work:
    pthread_cond_destroy(&s->work_cv);
out_destroy_mu:
    pthread_mutex_destroy(&s->mu);
out_free:
    free(s);
    return rc;
}

static void cpu_stream_free(ksm_stream *st)
{
    struct cpu_stream *s = to_stream(st);
    struct cpu_device *cd = s->cdev;

    pthread_mutex_lock(&cd->mu);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        cd->streams = s->next;
    if (s->next != NULL) s->next->prev = s->prev;
    cd->n_streams--;
    while (s->dev_refs > 0) pthread_cond_wait(&cd->cv, &cd->mu);
    pthread_mutex_unlock(&cd->mu);

    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_signal(&s->work_cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL); /* the worker drains the queue before it exits */

    free(s->ring);
    pthread_cond_destroy(&s->done_cv);
    pthread_cond_destroy(&s->work_cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

static int cpu_stream_synchronize(ksm_stream *st)
{
    struct cpu_stream *s = to_stream(st);
    pthread_mutex_lock(&s->mu);
    uint64_t target = s->enqueued;
    while (s->completed < target) pthread_cond_wait(&s->done_cv, &s->mu);
    int rc = s->sticky;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int cpu_stream_query(ksm_stream *st)
{
    struct cpu_stream *s = to_stream(st);
    pthread_mutex_lock(&s->mu);
    int rc = s->sticky != 0 ? s->sticky : s->completed < s->enqueued ? KSM_ENOTREADY : 0;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int cpu_stream_memcpy(ksm_stream *st, void *dst, const void *src, size_t n,
                             enum ksm_copy_kind kind)
{
    struct cpu_task t = {.kind = TASK_MEMCPY};
    t.u.copy.dst = dst;
    t.u.copy.src = src;
    t.u.copy.n = n;
    return stream_push(to_stream(st), &t);
}

static int cpu_stream_memset(ksm_stream *st, void *dst, int value, size_t n)
{
    struct cpu_task t = {.kind = TASK_MEMSET};
    t.u.set.dst = dst;
    t.u.set.value = value;
    t.u.set.n = n;
    return stream_push(to_stream(st), &t);
}

static int cpu_stream_host_fn(ksm_stream *st, ksm_host_fn fn, void *arg)
{
    struct cpu_task t = {.kind = TASK_HOST_FN};
    t.u.host.fn = fn;
    t.u.host.arg = arg;
    return stream_push(to_stream(st), &t);
}

static int cpu_stream_launch(ksm_stream *st, const struct ksm_op *op)
{
    struct cpu_stream *s = to_stream(st);
    pthread_mutex_lock(&s->mu);
    int rc = stream_reserve(s);
    if (rc == 0) {
        /* Build the task in its ring slot: avoids a second copy of the descriptor. */
        struct cpu_task *slot = &s->ring[(s->head + s->count) % s->cap];
        slot->kind = TASK_OP;
        slot->u.op = *op;
        s->count++;
        s->enqueued++;
        pthread_cond_signal(&s->work_cv);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int cpu_stream_wait_event(ksm_stream *st, ksm_event *e)
{
    struct cpu_stream *s = to_stream(st);
    struct cpu_event *ev = to_event(e);
    if (e->iface != &cpu_event_iface) return KSM_EINVAL;
    pthread_mutex_lock(&s->mu);
    int rc = stream_reserve(s);
    if (rc == 0) {
        pthread_mutex_lock(&ev->mu);
        uint64_t seq = ev->recorded;
        bool needed = event_pending(ev, seq); /* never recorded, or complete: a no-op */
        if (needed) ev->refs++;
        pthread_mutex_unlock(&ev->mu);
        if (needed) {
            struct cpu_task t = {.kind = TASK_WAIT};
            t.u.event.ev = ev;
            t.u.event.seq = seq;
            stream_push_reserved(s, &t);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

static int cpu_event_record(ksm_event *e, ksm_stream *st)
{
    if (st->iface != &cpu_stream_iface) return KSM_EINVAL;
    struct cpu_stream *s = to_stream(st);
    struct cpu_event *ev = to_event(e);
    pthread_mutex_lock(&s->mu);
    int rc = stream_reserve(s);
    if (rc == 0) {
        pthread_mutex_lock(&ev->mu);
        if (ev->n_pending == ev->cap_pending) {
            size_t ncap = ev->cap_pending ? ev->cap_pending * 2 : 4;
            uint64_t *v = realloc(ev->pending, ncap * sizeof *v);
            if (v == NULL) {
                rc = KSM_ENOMEM;
            } else {
                ev->pending = v;
                ev->cap_pending = ncap;
            }
        }
        uint64_t seq = 0;
        if (rc == 0) {
            seq = ++ev->recorded;
            ev->pending[ev->n_pending++] = seq;
            ev->refs++;
        }
        pthread_mutex_unlock(&ev->mu);
        if (rc == 0) {
            struct cpu_task t = {.kind = TASK_RECORD};
            t.u.event.ev = ev;
            t.u.event.seq = seq;
            stream_push_reserved(s, &t);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

const char *ksm_cpu_backend_blas_core(void) { return ksm_cpu_blas_core(); }

bool ksm_cpu_stream_is_cpu(const ksm_stream *s)
{
    return s != NULL && s->iface == &cpu_stream_iface;
}

int ksm_cpu_stream_inject_error(ksm_stream *st, int err)
{
    if (!ksm_cpu_stream_is_cpu(st) || err >= 0) return KSM_EINVAL;
    struct cpu_task t = {.kind = TASK_FAIL};
    t.u.err = err;
    return stream_push(to_stream(st), &t);
}

static const struct ksm_stream_i cpu_stream_iface = {
    /* .free         = */ cpu_stream_free,
    /* .synchronize  = */ cpu_stream_synchronize,
    /* .query        = */ cpu_stream_query,
    /* .memcpy_async = */ cpu_stream_memcpy,
    /* .memset_async = */ cpu_stream_memset,
    /* .host_fn      = */ cpu_stream_host_fn,
    /* .launch       = */ cpu_stream_launch,
    /* .wait_event   = */ cpu_stream_wait_event,
};

static const struct ksm_event_i cpu_event_iface = {
    /* .free        = */ cpu_event_free,
    /* .record      = */ cpu_event_record,
    /* .query       = */ cpu_event_query,
    /* .synchronize = */ cpu_event_synchronize,
};

// ---- Devices ----

static int cpu_device_malloc(ksm_device *d, size_t size, void **out)
{
    /* Page alignment for anything page-sized or larger keeps big buffers on their own pages. */
    size_t align = size >= CPU_ALIGN_PAGE ? CPU_ALIGN_PAGE : CPU_ALIGN_SMALL;
    void *p = NULL;
    if (posix_memalign(&p, align, size) != 0) return KSM_EDEVMEM;
    *out = p;
    return 0;
}

static void cpu_device_free(ksm_device *d, void *ptr) { free(ptr); }

/* Reads "<key>: <n> kB" from /proc/meminfo. Returns 0 when found. */
static int meminfo_read(const char *key, size_t *out)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (f == NULL) return -1;
    char line[256];
    size_t klen = strlen(key);
    int rc = -1;
    while (fgets(line, sizeof line, f) != NULL) {
        unsigned long long kb;
        if (strncmp(line, key, klen) == 0 && line[klen] == ':' &&
            sscanf(line + klen + 1, "%llu", &kb) == 1) {
            *out = (size_t)kb * 1024;
            rc = 0;
            break;
        }
    }
    fclose(f);
    return rc;
}

static int cpu_device_mem_info(ksm_device *d, size_t *free_bytes, size_t *total_bytes)
{
    long page = sysconf(_SC_PAGESIZE);
    if (meminfo_read("MemTotal", total_bytes) != 0) {
        long n = sysconf(_SC_PHYS_PAGES);
        if (n <= 0 || page <= 0) return KSM_EIO;
        *total_bytes = (size_t)n * (size_t)page;
    }
    if (meminfo_read("MemAvailable", free_bytes) != 0) {
        long n = sysconf(_SC_AVPHYS_PAGES);
        if (n < 0 || page <= 0) return KSM_EIO;
        *free_bytes = (size_t)n * (size_t)page;
    }
    return 0;
}

static int cpu_device_synchronize(ksm_device *d)
{
    struct cpu_device *cd = to_device(d);
    int first = 0;
    pthread_mutex_lock(&cd->mu);
    int n = cd->n_streams;
    struct cpu_stream **list = n > 0 ? malloc((size_t)n * sizeof *list) : NULL;
    if (n > 0 && list == NULL) {
        /* Out of host memory: synchronize under the lock instead (streams cannot come or go). */
        for (struct cpu_stream *s = cd->streams; s != NULL; s = s->next) {
            int rc = cpu_stream_synchronize(&s->base);
            if (rc != 0 && first == 0) first = rc;
        }
        pthread_mutex_unlock(&cd->mu);
        return first;
    }
    int i = 0;
    for (struct cpu_stream *s = cd->streams; s != NULL; s = s->next) {
        s->dev_refs++;
        list[i++] = s;
    }
    pthread_mutex_unlock(&cd->mu);

    /* The list is newest first; report the error of the oldest failing stream. */
    for (int j = n - 1; j >= 0; j--) {
        int rc = cpu_stream_synchronize(&list[j]->base);
        if (rc != 0 && first == 0) first = rc;
    }

    pthread_mutex_lock(&cd->mu);
    bool wake = false;
    for (int j = 0; j < n; j++)
        if (--list[j]->dev_refs == 0) wake = true;
    if (wake) pthread_cond_broadcast(&cd->cv);
    pthread_mutex_unlock(&cd->mu);
    free(list);
    return first;
}

static const struct ksm_device_i cpu_device_iface = {
    /* .malloc      = */ cpu_device_malloc,
    /* .free        = */ cpu_device_free,
    /* .mem_info    = */ cpu_device_mem_info,
    /* .synchronize = */ cpu_device_synchronize,
    /* .stream_new  = */ cpu_stream_new,
    /* .event_new   = */ cpu_event_new,
    /* .supports_op = */ NULL,
};

// ---- Backend ----

static void cpu_backend_free(ksm_backend *b)
{
    struct cpu_backend *cb = (struct cpu_backend *)b;
    for (int i = 0; i < b->n_devices; i++) {
        struct cpu_device *cd = &cb->devs[i];
        cpu_device_synchronize(&cd->base);
        pthread_mutex_lock(&cd->mu);
        int left = cd->n_streams;
        pthread_mutex_unlock(&cd->mu);
        if (left != 0)
            KSM_LOGE("backend", "%s freed with %d live stream(s); they are leaked", cd->base.name,
                     left);
        else {
            pthread_cond_destroy(&cd->cv);
            pthread_mutex_destroy(&cd->mu);
        }
    }
    free(cb->ptrs);
    free(cb->devs);
    free(cb);
}

static const struct ksm_backend_i cpu_backend_iface = {
    /* .free = */ cpu_backend_free,
};

int ksm_cpu_backend_new(int n_devices, ksm_backend **out)
{
    if (out == NULL || n_devices < 1 || n_devices > CPU_MAX_DEVICES) return KSM_EINVAL;
    int rc = ksm_cpu_blas_load(); /* logs why it failed */
    if (rc < 0) return rc;
    struct cpu_backend *cb = calloc(1, sizeof *cb);
    if (cb == NULL) return KSM_ENOMEM;
    cb->devs = calloc((size_t)n_devices, sizeof *cb->devs);
    cb->ptrs = calloc((size_t)n_devices, sizeof *cb->ptrs);
    if (cb->devs == NULL || cb->ptrs == NULL) goto out_free;
    int i;
    for (i = 0; i < n_devices; i++) {
        struct cpu_device *cd = &cb->devs[i];
        if (pthread_mutex_init(&cd->mu, NULL) != 0) goto out_destroy_devices;
        if (pthread_cond_init(&cd->cv, NULL) != 0) {
            pthread_mutex_destroy(&cd->mu);
            goto out_destroy_devices;
        }
        cd->base.iface = &cpu_device_iface;
        cd->base.ctx = cd;
        cd->base.backend = &cb->base;
        cd->base.kind = KSM_DEVICE_CPU;
        cd->base.index = i;
        cd->base.is_host = true;
        snprintf(cd->base.name, sizeof cd->base.name, "cpu:%d", i);
        cb->ptrs[i] = &cd->base;
    }
    cb->base.iface = &cpu_backend_iface;
    cb->base.ctx = cb;
    cb->base.api_version = KSM_BACKEND_API_VERSION;
    snprintf(cb->base.name, sizeof cb->base.name, "cpu");
    cb->base.n_devices = n_devices;
    cb->base.devices = cb->ptrs;
    *out = &cb->base;
    return 0;

out_destroy_devices:
    while (i-- > 0) {
        pthread_cond_destroy(&cb->devs[i].cv);
        pthread_mutex_destroy(&cb->devs[i].mu);
    }
out_free:
    free(cb->ptrs);
    free(cb->devs);
    free(cb);
    return KSM_ENOMEM;
}
