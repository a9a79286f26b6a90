/*
 * The fault-injecting fake backend (see fake_backend.h).
 */
#include "fake_backend.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_impl.h"

/* Live allocations, so that free can subtract their size. */
struct fake_alloc {
    void *ptr;
    size_t size;
    struct fake_alloc *next;
};

struct fake_device {
    struct ksm_device base;
    ksm_device *inner;
    pthread_mutex_t mu;
    uint64_t fail_countdown; /* 0 = disarmed; 1 = the next malloc fails */
    size_t mem_limit;
    int sticky;
    uint64_t sticky_countdown; /* 0 = disarmed; 1 = the next launch turns the device sticky */
    int sticky_armed_err;
    struct ksm_fake_counters counters;
    struct fake_alloc *allocs;
};

struct fake_backend {
    struct ksm_backend base;
    struct fake_device dev;
    ksm_device *devices[1];
};

struct fake_stream {
    struct ksm_stream base;
    ksm_stream *inner;
};

struct fake_event {
    struct ksm_event base;
    ksm_event *inner;
};

static const struct ksm_stream_i fake_stream_iface;

static struct fake_device *fdev(ksm_device *d) { return (struct fake_device *)d; }

static int sticky_of(ksm_device *d)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    int err = fd->sticky;
    pthread_mutex_unlock(&fd->mu);
    return err;
}

// ---- Device ----

static int fake_malloc(ksm_device *d, size_t size, void **out)
{
    struct fake_device *fd = fdev(d);
    struct fake_alloc *rec = malloc(sizeof *rec);
    if (rec == NULL) return KSM_EDEVMEM;
    pthread_mutex_lock(&fd->mu);
    fd->counters.malloc_calls++;
    int rc = 0;
    if (fd->sticky != 0) {
        rc = fd->sticky;
    } else if (fd->fail_countdown != 0 && --fd->fail_countdown == 0) {
        rc = KSM_EDEVMEM;
    } else if (fd->mem_limit != 0 &&
               (size > fd->mem_limit || fd->counters.live_bytes > fd->mem_limit - size)) {
        rc = KSM_EDEVMEM;
    }
    if (rc == 0) rc = ksm_device_malloc(fd->inner, size, out);
    if (rc == 0) {
        rec->ptr = *out;
        rec->size = size;
        rec->next = fd->allocs;
        fd->allocs = rec;
        fd->counters.live_bytes += size;
    } else {
        fd->counters.malloc_failed++;
        free(rec);
    }
    pthread_mutex_unlock(&fd->mu);
    return rc;
}

static void fake_free(ksm_device *d, void *ptr)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    fd->counters.free_calls++;
    for (struct fake_alloc **pp = &fd->allocs; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->ptr == ptr) {
            struct fake_alloc *rec = *pp;
            *pp = rec->next;
            fd->counters.live_bytes -= rec->size;
            free(rec);
            break;
        }
    }
    pthread_mutex_unlock(&fd->mu);
    ksm_device_free(fd->inner, ptr);
}

static int fake_mem_info(ksm_device *d, size_t *free_bytes, size_t *total_bytes)
{
    struct fake_device *fd = fdev(d);
    int rc = ksm_device_mem_info(fd->inner, free_bytes, total_bytes);
    if (rc != 0) return rc;
    pthread_mutex_lock(&fd->mu);
    if (fd->mem_limit != 0) {
        *total_bytes = fd->mem_limit;
        *free_bytes = fd->mem_limit - fd->counters.live_bytes;
    }
    pthread_mutex_unlock(&fd->mu);
    return 0;
}

static int fake_synchronize(ksm_device *d)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    fd->counters.sync_calls++;
    pthread_mutex_unlock(&fd->mu);
    int rc = ksm_device_synchronize(fd->inner); /* always wait, so teardown is safe */
    int err = sticky_of(d);
    return err != 0 ? err : rc;
}

static int fake_stream_new(ksm_device *d, ksm_stream **out)
{
    struct fake_stream *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    int rc = ksm_stream_new(fdev(d)->inner, &s->inner);
    if (rc != 0) {
        free(s);
        return rc;
    }
    s->base.iface = &fake_stream_iface;
    s->base.ctx = s;
    s->base.dev = d;
    s->base.id = ksm_stream_id(s->inner);
    *out = &s->base;
    return 0;
}

static const struct ksm_event_i fake_event_iface;

static int fake_event_new(ksm_device *d, ksm_event **out)
{
    struct fake_event *ev = calloc(1, sizeof *ev);
    if (ev == NULL) return KSM_ENOMEM;
    int rc = ksm_event_new(fdev(d)->inner, &ev->inner);
    if (rc != 0) {
        free(ev);
        return rc;
    }
    ev->base.iface = &fake_event_iface;
    ev->base.ctx = ev;
    ev->base.dev = d;
    *out = &ev->base;
    return 0;
}

static int fake_supports_op(ksm_device *d, const struct ksm_op *op)
{
    ksm_device *inner = fdev(d)->inner;
    if (inner->iface->supports_op == NULL) return 0;
    return inner->iface->supports_op(inner, op);
}

static const struct ksm_device_i fake_device_iface = {
    /* .malloc      = */ fake_malloc,
    /* .free        = */ fake_free,
    /* .mem_info    = */ fake_mem_info,
    /* .synchronize = */ fake_synchronize,
    /* .stream_new  = */ fake_stream_new,
    /* .event_new   = */ fake_event_new,
    /* .supports_op = */ fake_supports_op,
};

// ---- Streams ----

static ksm_stream *inner_of(ksm_stream *s) { return ((struct fake_stream *)s)->inner; }

static void fake_stream_free(ksm_stream *s)
{
    ksm_stream_free(inner_of(s));
    free(s);
}

static int fake_stream_synchronize(ksm_stream *s)
{
    int rc = ksm_stream_synchronize(inner_of(s));
    int err = sticky_of(s->dev);
    return err != 0 ? err : rc;
}

static int fake_stream_query(ksm_stream *s)
{
    int err = sticky_of(s->dev);
    return err != 0 ? err : ksm_stream_query(inner_of(s));
}

static int fake_memcpy(ksm_stream *s, void *dst, const void *src, size_t n, enum ksm_copy_kind kind)
{
    int err = sticky_of(s->dev);
    return err != 0 ? err : ksm_stream_memcpy_async(inner_of(s), dst, src, n, kind);
}

static int fake_memset(ksm_stream *s, void *dst, int value, size_t n)
{
    int err = sticky_of(s->dev);
    return err != 0 ? err : ksm_stream_memset_async(inner_of(s), dst, value, n);
}

static int fake_host_fn(ksm_stream *s, ksm_host_fn fn, void *arg)
{
    int err = sticky_of(s->dev);
    return err != 0 ? err : ksm_stream_launch_host_fn(inner_of(s), fn, arg);
}

static int fake_launch(ksm_stream *s, const struct ksm_op *op)
{
    struct fake_device *fd = fdev(s->dev);
    pthread_mutex_lock(&fd->mu);
    if (fd->sticky_countdown > 0 && --fd->sticky_countdown == 0) fd->sticky = fd->sticky_armed_err;
    pthread_mutex_unlock(&fd->mu);
    int err = sticky_of(s->dev);
    return err != 0 ? err : ksm_stream_launch(inner_of(s), op);
}

static int fake_wait_event(ksm_stream *s, ksm_event *ev)
{
    int err = sticky_of(s->dev);
    if (err != 0) return err;
    return ksm_stream_wait_event(inner_of(s), ((struct fake_event *)ev)->inner);
}

static const struct ksm_stream_i fake_stream_iface = {
    /* .free         = */ fake_stream_free,
    /* .synchronize  = */ fake_stream_synchronize,
    /* .query        = */ fake_stream_query,
    /* .memcpy_async = */ fake_memcpy,
    /* .memset_async = */ fake_memset,
    /* .host_fn      = */ fake_host_fn,
    /* .launch       = */ fake_launch,
    /* .wait_event   = */ fake_wait_event,
};

ksm_stream *ksm_fake_stream_inner(ksm_stream *s)
{
    return s != NULL && s->iface == &fake_stream_iface ? inner_of(s) : NULL;
}

// ---- Events ----

static void fake_event_free(ksm_event *ev)
{
    ksm_event_free(((struct fake_event *)ev)->inner);
    free(ev);
}

static int fake_event_record(ksm_event *ev, ksm_stream *s)
{
    int err = sticky_of(s->dev);
    if (err != 0) return err;
    return ksm_event_record(((struct fake_event *)ev)->inner, inner_of(s));
}

static int fake_event_query(ksm_event *ev)
{
    return ksm_event_query(((struct fake_event *)ev)->inner);
}

static int fake_event_synchronize(ksm_event *ev)
{
    return ksm_event_synchronize(((struct fake_event *)ev)->inner);
}

static const struct ksm_event_i fake_event_iface = {
    /* .free        = */ fake_event_free,
    /* .record      = */ fake_event_record,
    /* .query       = */ fake_event_query,
    /* .synchronize = */ fake_event_synchronize,
};

// ---- Backend and controls ----

static void fake_backend_free(ksm_backend *b)
{
    struct fake_backend *fb = (struct fake_backend *)b;
    struct fake_device *fd = &fb->dev;
    (void)ksm_device_synchronize(fd->inner);
    while (fd->allocs != NULL) {
        struct fake_alloc *rec = fd->allocs;
        fd->allocs = rec->next;
        free(rec);
    }
    pthread_mutex_destroy(&fd->mu);
    free(fb);
}

static const struct ksm_backend_i fake_backend_iface = {
    /* .free = */ fake_backend_free,
};

int ksm_fake_backend_new(ksm_device *inner, ksm_backend **out)
{
    if (inner == NULL || out == NULL) return KSM_EINVAL;
    struct fake_backend *fb = calloc(1, sizeof *fb);
    if (fb == NULL) return KSM_ENOMEM;
    struct fake_device *fd = &fb->dev;
    if (pthread_mutex_init(&fd->mu, NULL) != 0) {
        free(fb);
        return KSM_ENOMEM;
    }
    fd->inner = inner;
    fd->base.iface = &fake_device_iface;
    fd->base.ctx = fd;
    fd->base.backend = &fb->base;
    fd->base.kind = KSM_DEVICE_FAKE;
    fd->base.index = 0;
    fd->base.is_host = inner->is_host;
    snprintf(fd->base.name, sizeof fd->base.name, "fake:0");
    fb->devices[0] = &fd->base;
    fb->base.iface = &fake_backend_iface;
    fb->base.ctx = fb;
    fb->base.api_version = KSM_BACKEND_API_VERSION;
    snprintf(fb->base.name, sizeof fb->base.name, "fake");
    fb->base.n_devices = 1;
    fb->base.devices = fb->devices;
    *out = &fb->base;
    return 0;
}

void ksm_fake_fail_malloc_nth(ksm_device *d, uint64_t n)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    fd->fail_countdown = n;
    pthread_mutex_unlock(&fd->mu);
}

void ksm_fake_set_mem_limit(ksm_device *d, size_t limit)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    fd->mem_limit = limit;
    pthread_mutex_unlock(&fd->mu);
}

void ksm_fake_set_sticky_error(ksm_device *d, int err)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    fd->sticky = err;
    pthread_mutex_unlock(&fd->mu);
}

void ksm_fake_set_sticky_after_launches(ksm_device *d, uint64_t n, int err)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    fd->sticky_countdown = n;
    fd->sticky_armed_err = err;
    pthread_mutex_unlock(&fd->mu);
}

void ksm_fake_get_counters(ksm_device *d, struct ksm_fake_counters *out)
{
    struct fake_device *fd = fdev(d);
    pthread_mutex_lock(&fd->mu);
    *out = fd->counters;
    pthread_mutex_unlock(&fd->mu);
}
