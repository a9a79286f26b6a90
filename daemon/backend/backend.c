/*
 * The public face of backend.h: argument checks and defaults, then one call through the vtable.
 * Also the CUDA plugin loader.
 */
#include <dlfcn.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend_impl.h"

static atomic_uint_fast64_t next_stream_id = 1;

uint64_t ksm_backend_next_stream_id(void) { return (uint64_t)atomic_fetch_add(&next_stream_id, 1); }

/* ---- Backends ---- */

void ksm_backend_free(ksm_backend *b)
{
    if (b != NULL) b->iface->free(b);
}

const char *ksm_backend_name(const ksm_backend *b) { return b ? b->name : ""; }

int ksm_backend_device_count(const ksm_backend *b) { return b ? b->n_devices : 0; }

ksm_device *ksm_backend_device(const ksm_backend *b, int i)
{
    if (b == NULL || i < 0 || i >= b->n_devices) return NULL;
    return b->devices[i];
}

/* ---- Devices ---- */

const char *ksm_device_name(const ksm_device *d) { return d ? d->name : ""; }
enum ksm_device_kind ksm_device_kind(const ksm_device *d) { return d->kind; }
int ksm_device_index(const ksm_device *d) { return d->index; }
bool ksm_device_is_host(const ksm_device *d) { return d != NULL && d->is_host; }

int ksm_device_mem_info(ksm_device *d, size_t *free_bytes, size_t *total_bytes)
{
    if (d == NULL || free_bytes == NULL || total_bytes == NULL) return KSM_EINVAL;
    return d->iface->mem_info(d, free_bytes, total_bytes);
}

int ksm_device_synchronize(ksm_device *d)
{
    if (d == NULL) return KSM_EINVAL;
    return d->iface->synchronize(d);
}

int ksm_device_malloc(ksm_device *d, size_t size, void **out)
{
    if (d == NULL || out == NULL || size == 0) return KSM_EINVAL;
    return d->iface->malloc(d, size, out);
}

void ksm_device_free(ksm_device *d, void *ptr)
{
    if (d != NULL && ptr != NULL) d->iface->free(d, ptr);
}

/* ---- Streams ---- */

int ksm_stream_new(ksm_device *d, ksm_stream **out)
{
    if (d == NULL || out == NULL) return KSM_EINVAL;
    return d->iface->stream_new(d, out);
}

void ksm_stream_free(ksm_stream *s)
{
    if (s != NULL) s->iface->free(s);
}

ksm_device *ksm_stream_device(const ksm_stream *s) { return s ? s->dev : NULL; }
uint64_t ksm_stream_id(const ksm_stream *s) { return s ? s->id : 0; }

int ksm_stream_synchronize(ksm_stream *s)
{
    if (s == NULL) return KSM_EINVAL;
    return s->iface->synchronize(s);
}

int ksm_stream_query(ksm_stream *s)
{
    if (s == NULL) return KSM_EINVAL;
    return s->iface->query(s);
}

int ksm_stream_memcpy_async(ksm_stream *s, void *dst, const void *src, size_t n,
                            enum ksm_copy_kind kind)
{
    if (s == NULL || (unsigned)kind > KSM_COPY_D2D) return KSM_EINVAL;
    if (n == 0) return 0;
    if (dst == NULL || src == NULL) return KSM_EINVAL;
    return s->iface->memcpy_async(s, dst, src, n, kind);
}

int ksm_stream_memset_async(ksm_stream *s, void *dst, int value, size_t n)
{
    if (s == NULL) return KSM_EINVAL;
    if (n == 0) return 0;
    if (dst == NULL) return KSM_EINVAL;
    return s->iface->memset_async(s, dst, value, n);
}

int ksm_stream_launch_host_fn(ksm_stream *s, ksm_host_fn fn, void *arg)
{
    if (s == NULL || fn == NULL) return KSM_EINVAL;
    return s->iface->host_fn(s, fn, arg);
}

int ksm_stream_launch(ksm_stream *s, const struct ksm_op *op)
{
    if (s == NULL || op == NULL || (unsigned)op->type >= KSM_OP_COUNT) return KSM_EINVAL;
    if (s->dev->iface->supports_op != NULL) {
        int rc = s->dev->iface->supports_op(s->dev, op);
        if (rc != 0) return rc;
    }
    return s->iface->launch(s, op);
}

int ksm_stream_wait_event(ksm_stream *s, ksm_event *ev)
{
    if (s == NULL || ev == NULL) return KSM_EINVAL;
    if (ev->dev != s->dev) return KSM_EINVAL;
    return s->iface->wait_event(s, ev);
}

/* ---- Events ---- */

int ksm_event_new(ksm_device *d, ksm_event **out)
{
    if (d == NULL || out == NULL) return KSM_EINVAL;
    return d->iface->event_new(d, out);
}

void ksm_event_free(ksm_event *ev)
{
    if (ev != NULL) ev->iface->free(ev);
}

int ksm_event_record(ksm_event *ev, ksm_stream *s)
{
    if (ev == NULL || s == NULL || ev->dev != s->dev) return KSM_EINVAL;
    return ev->iface->record(ev, s);
}

int ksm_event_query(ksm_event *ev)
{
    if (ev == NULL) return KSM_EINVAL;
    return ev->iface->query(ev);
}

int ksm_event_synchronize(ksm_event *ev)
{
    if (ev == NULL) return KSM_EINVAL;
    return ev->iface->synchronize(ev);
}

/* ---- The CUDA plugin loader ---- */

#define PLUGIN_NAME "libkasmina_cuda.so"

static void plugin_log_write(enum ksm_log_level level, const char *module, const char *msg)
{
    ksm_log_write(level, module, "%s", msg);
}

static const struct ksm_host_api host_api = {
    .api_version = KSM_BACKEND_API_VERSION,
    .log_write = plugin_log_write,
    .log_get_level = ksm_log_get_level,
    .next_stream_id = ksm_backend_next_stream_id,
};

/* Tries one candidate; returns the dlopen handle or NULL (and keeps the last dlerror). */
static void *try_open(const char *path, char *why, size_t whylen)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        const char *e = dlerror();
        snprintf(why, whylen, "%s", e ? e : "dlopen failed");
    }
    return h;
}

int ksm_cuda_backend_load(const char *path, ksm_backend **out, char *errbuf, size_t errlen)
{
    if (out == NULL) return KSM_EINVAL;
    *out = NULL;
    char why[512] = "";
    void *h = NULL;
    if (path != NULL) {
        h = try_open(path, why, sizeof why);
    } else {
        const char *env = getenv("KASMINA_CUDA_PLUGIN");
        if (env != NULL && env[0] != '\0') {
            h = try_open(env, why, sizeof why);
        } else {
            char exe[PATH_MAX];
            ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
            if (n > 0) {
                exe[n] = '\0';
                char *slash = strrchr(exe, '/');
                if (slash != NULL) *slash = '\0';
                char cand[PATH_MAX + 64];
                snprintf(cand, sizeof cand, "%s/" PLUGIN_NAME, exe);
                if (access(cand, F_OK) == 0) h = try_open(cand, why, sizeof why);
                if (h == NULL) {
                    snprintf(cand, sizeof cand, "%s/../lib/kasmina/" PLUGIN_NAME, exe);
                    if (access(cand, F_OK) == 0) h = try_open(cand, why, sizeof why);
                }
            }
            if (h == NULL && why[0] == '\0') h = try_open(PLUGIN_NAME, why, sizeof why);
        }
    }
    if (h == NULL) {
        ksm_errf(errbuf, errlen, 0, "CUDA backend plugin could not be loaded: %s%s", why, "");
        return KSM_ENOPLUGIN;
    }
    ksm_backend_plugin_fn entry;
    *(void **)&entry = dlsym(h, KSM_BACKEND_PLUGIN_ENTRY);
    if (entry == NULL) {
        ksm_errf(errbuf, errlen, 0, "CUDA backend plugin has no entry point %s%s",
                 KSM_BACKEND_PLUGIN_ENTRY, "");
        dlclose(h);
        return KSM_ENOPLUGIN;
    }
    char perr[512] = "";
    ksm_backend *b = NULL;
    int rc = entry(&host_api, &b, perr, sizeof perr);
    if (rc != 0 || b == NULL) {
        ksm_errf(errbuf, errlen, 0, "no usable CUDA device: %s%s",
                 perr[0] ? perr : ksm_strerror(rc ? rc : KSM_EINTERNAL), "");
        /* The plugin stays loaded: unloading CUDA runtimes is not reliably safe. */
        return rc != 0 ? rc : KSM_EINTERNAL;
    }
    if (b->api_version != KSM_BACKEND_API_VERSION) {
        if (errbuf != NULL && errlen > 0)
            snprintf(errbuf, errlen, "CUDA backend plugin has API version %d, expected %d",
                     b->api_version, KSM_BACKEND_API_VERSION);
        b->iface->free(b);
        return KSM_ENOPLUGIN;
    }
    *out = b;
    return 0;
}
