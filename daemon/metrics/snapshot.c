/*
 * metrics/snapshot: one sample of the engine for the exporter, taken on the loop timer. This is
 * where the device is queried (ksm_device_mem_info) and model locks are taken (slot reports,
 * cache counters): at most once per sampling period, whatever the scrape rate.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/errors.h"
#include "metrics/metrics_impl.h"

static int64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void ksm_metrics_snapshot_free(struct ksm_metrics_snapshot *s)
{
    if (s == NULL) return;
    for (size_t i = 0; i < s->n_models; i++) {
        free(s->models[i].slots);
        free(s->models[i].caches);
        free(s->models[i].gates);
    }
    free(s->models);
    free(s->devices);
    free(s);
}

static int take_model(ksm_model *m, struct ksm_metrics_model *out)
{
    if (ksm_model_get_info(m, &out->info) != 0) {
        memset(&out->info, 0, sizeof out->info);
        snprintf(out->info.model_id, sizeof out->info.model_id, "%s", ksm_model_id(m));
    }
    struct ksm_slot_report *rep = calloc(KSM_MAX_SLOTS, sizeof *rep);
    if (rep == NULL) return KSM_ENOMEM;
    size_t n = 0;
    if (ksm_model_slot_reports(m, NULL, rep, KSM_MAX_SLOTS, &n, NULL, 0) != 0) n = 0;
    if (n > KSM_MAX_SLOTS) n = KSM_MAX_SLOTS;
    out->slots = rep;
    out->n_slots = n;
    /* Cache counters: the count first, then exactly that many. */
    size_t nc = 0;
    struct ksm_cache_counters probe[1];
    if (ksm_model_cache_stats(m, probe, 0, &nc) != 0) nc = 0;
    if (nc > 0) {
        out->caches = calloc(nc, sizeof *out->caches);
        if (out->caches == NULL) return KSM_ENOMEM;
        size_t got = 0;
        if (ksm_model_cache_stats(m, out->caches, nc, &got) != 0) got = 0;
        out->n_caches = got < nc ? got : nc;
    }
    ksm_model_run_stats(m, &out->run);
    size_t ng = 0;
    if (ksm_model_last_gates(m, NULL, 0, &ng) != 0) ng = 0;
    if (ng > 0) {
        out->gates = calloc(ng, sizeof *out->gates);
        if (out->gates == NULL) return KSM_ENOMEM;
        size_t got = 0;
        if (ksm_model_last_gates(m, out->gates, ng, &got) != 0) got = 0;
        out->n_gates = got < ng ? got : ng;
    }
    return 0;
}

int ksm_metrics_snapshot_take(ksm_engine *e, struct ksm_metrics_snapshot **out)
{
    int64_t t0 = clock_ns(CLOCK_MONOTONIC);
    struct ksm_metrics_snapshot *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    s->taken_unix_ns = clock_ns(CLOCK_REALTIME);
    s->healthy = ksm_engine_health(e, NULL, 0) == 0;
    int nd = ksm_engine_device_count(e);
    if (nd > 0) {
        s->devices = calloc((size_t)nd, sizeof *s->devices);
        if (s->devices == NULL) goto out_oom;
        for (int i = 0; i < nd; i++) {
            ksm_device *dev = ksm_engine_device(e, i);
            struct ksm_metrics_device *d = &s->devices[s->n_devices++];
            snprintf(d->name, sizeof d->name, "%s", ksm_device_name(dev));
            d->kind = ksm_device_kind(dev) == KSM_DEVICE_CUDA ? "cuda" : "cpu";
            size_t fb = 0, tb = 0;
            ksm_device_mem_info(dev, &fb, &tb);
            d->free_bytes = fb;
            d->total_bytes = tb;
            ksm_allocator *a = ksm_engine_allocator(e, dev);
            if (a != NULL) {
                ksm_alloc_get_stats(a, &d->st);
                d->have_alloc = true;
            }
        }
    }
    ksm_model **list = NULL;
    size_t nm = 0;
    if (ksm_engine_model_list(e, &list, &nm) != 0) nm = 0;
    int rc = 0;
    if (nm > 0) {
        s->models = calloc(nm, sizeof *s->models);
        if (s->models == NULL) rc = KSM_ENOMEM;
    }
    for (size_t i = 0; i < nm; i++) {
        if (rc == 0) {
            rc = take_model(list[i], &s->models[i]);
            s->n_models = i + 1;
        }
        ksm_model_unref(list[i]);
    }
    free(list);
    if (rc != 0) goto out_oom;
    s->duration_s = (double)(clock_ns(CLOCK_MONOTONIC) - t0) * 1e-9;
    *out = s;
    return 0;

out_oom:
    ksm_metrics_snapshot_free(s);
    return KSM_ENOMEM;
}

/* ---- text buffer ---- */

static bool sbuf_reserve(struct ksm_sbuf *b, size_t extra)
{
    if (b->oom) return false;
    if (b->len + extra + 1 <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

void ksm_sbuf_putn(struct ksm_sbuf *b, const char *s, size_t n)
{
    if (!sbuf_reserve(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void ksm_sbuf_puts(struct ksm_sbuf *b, const char *s) { ksm_sbuf_putn(b, s, strlen(s)); }

void ksm_sbuf_printf(struct ksm_sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        ksm_sbuf_putn(b, tmp, (size_t)n);
        return;
    }
    if (!sbuf_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void ksm_sbuf_free(struct ksm_sbuf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}
