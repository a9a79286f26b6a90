/*
 * rpc/stats: per-method call counters by status code, a latency histogram of unary calls and
 * lifecycle event counters. Relaxed atomics only: a scrape may see a call counted before its
 * latency, which Prometheus tolerates (every series is monotonic on its own).
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "rpc/server_impl.h"
#include "service/service.h"

const double ksm_rpc_latency_bounds[KSM_RPC_LATENCY_BUCKETS] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05,   0.1,     0.25,   0.5,   1.0,    2.5,   5.0,  10.0,
};

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Row of a call: its index in rpc_methods, or the unknown-method row after the table. */
static size_t row_of(const struct rpc_call *c)
{
    return c->m != NULL ? (size_t)(c->m - rpc_methods) : rpc_n_methods;
}

size_t ksm_rpc_server_method_count(const ksm_rpc_server *s)
{
    (void)s;
    size_t n = rpc_n_methods + 1;
    return n < KSM_RPC_STATS_METHODS ? n : KSM_RPC_STATS_METHODS;
}

void rpc_stats_call_start(struct rpc_call *c) { c->start_ns = mono_ns(); }

void rpc_stats_call_end(struct rpc_call *c, grpc_status_code code)
{
    struct rpc_stats *st = &c->srv->stats;
    size_t r = row_of(c);
    if (r >= KSM_RPC_STATS_METHODS) return;
    int k = (int)code >= 0 && (int)code < KSM_RPC_CODES ? (int)code : GRPC_STATUS_UNKNOWN;
    atomic_fetch_add_explicit(&st->calls[r][k], 1, memory_order_relaxed);
    if (c->m == NULL || c->m->kind == RPC_EVENTS || c->m->kind == RPC_HEALTH_WATCH ||
        c->start_ns == 0)
        return;
    int64_t ns = mono_ns() - c->start_ns;
    if (ns < 0) ns = 0;
    double sec = (double)ns * 1e-9;
    int b = 0;
    while (b < KSM_RPC_LATENCY_BUCKETS && sec > ksm_rpc_latency_bounds[b]) b++;
    atomic_fetch_add_explicit(&st->buckets[r][b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&st->latency_sum_ns[r], (uint64_t)ns, memory_order_relaxed);
}

void rpc_stats_event(ksm_rpc_server *s, const struct ksm_lifecycle_event *ev)
{
    if ((int)ev->type >= 0 && ev->type < KSM_EV_COUNT)
        atomic_fetch_add_explicit(&s->stats.events[ev->type], 1, memory_order_relaxed);
}

void ksm_rpc_server_method_stats(ksm_rpc_server *s, size_t i, struct ksm_rpc_method_stats *out)
{
    memset(out, 0, sizeof *out);
    if (i >= ksm_rpc_server_method_count(s)) return;
    if (i < rpc_n_methods) {
        const struct rpc_method *m = &rpc_methods[i];
        const char *path = m->path[0] == '/' ? m->path + 1 : m->path;
        const char *slash = strrchr(path, '/');
        int svc_len = slash != NULL ? (int)(slash - path) : 0;
        snprintf(out->service, sizeof out->service, "%.*s", svc_len, path);
        snprintf(out->method, sizeof out->method, "%s", slash != NULL ? slash + 1 : path);
        out->streaming =
            m->kind == RPC_EVENTS || m->kind == RPC_HEALTH_WATCH || m->kind == RPC_REFLECTION;
    } else {
        snprintf(out->method, sizeof out->method, "unknown");
    }
    struct rpc_stats *st = &s->stats;
    for (int k = 0; k < KSM_RPC_CODES; k++)
        out->calls[k] = atomic_load_explicit(&st->calls[i][k], memory_order_relaxed);
    for (int b = 0; b <= KSM_RPC_LATENCY_BUCKETS; b++) {
        out->buckets[b] = atomic_load_explicit(&st->buckets[i][b], memory_order_relaxed);
        out->latency_count += out->buckets[b];
    }
    out->latency_sum_ns = atomic_load_explicit(&st->latency_sum_ns[i], memory_order_relaxed);
}

void ksm_rpc_server_event_counts(ksm_rpc_server *s, uint64_t out[KSM_EV_COUNT])
{
    for (int t = 0; t < KSM_EV_COUNT; t++)
        out[t] = atomic_load_explicit(&s->stats.events[t], memory_order_relaxed);
}

size_t ksm_rpc_server_recent_events(ksm_rpc_server *s, struct ksm_lifecycle_event *out,
                                    uint64_t *seqs, size_t cap)
{
    struct ksm_event_log *log = ksm_service_events(s->service);
    uint64_t oldest = 0, last = 0;
    ksm_event_log_window(log, &oldest, &last);
    if (last == 0 || oldest > last || cap == 0) return 0;
    uint64_t from = last - oldest + 1 > cap ? last - cap + 1 : oldest;
    size_t n = 0;
    for (uint64_t q = from; q <= last && n < cap; q++) {
        if (ksm_event_log_get(log, q, &out[n]) != 0) continue; /* overwritten meanwhile */
        if (seqs != NULL) seqs[n] = q;
        n++;
    }
    return n;
}

const char *ksm_rpc_code_name(int code)
{
    static const char *const names[KSM_RPC_CODES] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return code >= 0 && code < KSM_RPC_CODES ? names[code] : "UNKNOWN";
}
