/*
 * metrics internals: the engine snapshot (snapshot.c), a growable text buffer, and the renderers
 * (prom.c: Prometheus text format; status.c: status JSON). Renderers are pure functions of a
 * snapshot and the rpc counters, unit-tested without a loop or a socket.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/alloc.h"
#include "kasmina/kasmina.h"
#include "rpc/server.h"

struct ksm_metrics_device {
    char name[32];
    const char *kind;                 /* "cpu", "cuda" */
    uint64_t free_bytes, total_bytes; /* ksm_device_mem_info (a device query) */
    bool have_alloc;
    struct ksm_mem_stats st; /* ksm_alloc_get_stats */
};

struct ksm_metrics_model {
    struct ksm_model_info info;
    size_t n_slots;
    struct ksm_slot_report *slots; /* every registered slot, row-major */
    size_t n_caches;
    struct ksm_cache_counters *caches;
    struct ksm_model_run_stats run; /* gate evaluations, compute time */
    size_t n_gates;
    struct ksm_slot_gate *gates; /* each slot's last gate evaluation (slots that had one) */
};

struct ksm_metrics_snapshot {
    int64_t taken_unix_ns;
    double duration_s; /* how long sampling took */
    bool healthy;      /* ksm_engine_health() == 0 */
    int n_devices;
    struct ksm_metrics_device *devices;
    size_t n_models;
    struct ksm_metrics_model *models;
};

/* Samples the engine. Returns 0 or KSM_ENOMEM. */
int ksm_metrics_snapshot_take(ksm_engine *e, struct ksm_metrics_snapshot **out);
void ksm_metrics_snapshot_free(struct ksm_metrics_snapshot *s);

/* A growable NUL-terminated buffer; after an allocation failure oom is set and appends stop. */
struct ksm_sbuf {
    char *p;
    size_t len, cap;
    bool oom;
};
void ksm_sbuf_putn(struct ksm_sbuf *b, const char *s, size_t n);
void ksm_sbuf_puts(struct ksm_sbuf *b, const char *s);
void ksm_sbuf_printf(struct ksm_sbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void ksm_sbuf_free(struct ksm_sbuf *b);

/* Appends a Prometheus label value with \\, \" and \n escaped (exposition format 0.0.4). */
void ksm_prom_escape_label(struct ksm_sbuf *b, const char *v);
/* Appends a sample value: integers exactly, NaN as NaN, infinities as +Inf/-Inf. */
void ksm_prom_value(struct ksm_sbuf *b, double v);

struct ksm_metrics_build {
    const char *version, *commit;
    int64_t start_unix_ns;
};

/* The whole /metrics document. snap and rpc may be NULL. Returns 0 or KSM_ENOMEM. */
int ksm_metrics_render_prom(const struct ksm_metrics_snapshot *snap, ksm_rpc_server *rpc,
                            const struct ksm_metrics_build *bi, struct ksm_sbuf *out);
/* The /status.json document. Returns 0 or KSM_ENOMEM. */
int ksm_metrics_render_status(const struct ksm_metrics_snapshot *snap, ksm_rpc_server *rpc,
                              const struct ksm_metrics_build *bi, struct ksm_sbuf *out);

/* The status page (status.html, embedded at build time). */
extern const char ksm_metrics_status_html[];
extern const size_t ksm_metrics_status_html_len;
