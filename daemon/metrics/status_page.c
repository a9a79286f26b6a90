/*
 * metrics/status: /status.json, the document the status page polls. Same snapshot as /metrics;
 * built with jansson so every string is escaped correctly.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "metrics/metrics_impl.h"
#include "rpc/stats.h"

static json_t *device_json(const struct ksm_metrics_device *d)
{
    const struct ksm_pool_stats *p = &d->st.pool[KSM_POOL_ALL];
    return json_pack("{s:s, s:s, s:I, s:I, s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, "
                     "s:I, s:I}",
                     "name", d->name, "kind", d->kind, "total_bytes", (json_int_t)d->total_bytes,
                     "free_bytes", (json_int_t)d->free_bytes, "allocator", d->have_alloc,
                     "allocated_bytes", (json_int_t)p->allocated_bytes.current,
                     "allocated_peak_bytes", (json_int_t)p->allocated_bytes.peak, "reserved_bytes",
                     (json_int_t)p->reserved_bytes.current, "reserved_peak_bytes",
                     (json_int_t)p->reserved_bytes.peak, "active_bytes",
                     (json_int_t)p->active_bytes.current, "cap_bytes",
                     (json_int_t)d->st.memory_cap_bytes, "allocations",
                     (json_int_t)p->allocation.allocated, "ooms", (json_int_t)d->st.num_ooms,
                     "alloc_retries", (json_int_t)d->st.num_alloc_retries, "cache_hits",
                     (json_int_t)d->st.cache_hits, "deferred_frees",
                     (json_int_t)d->st.deferred_frees, "segments", (json_int_t)p->segment.current);
}

static json_t *slot_json(const struct ksm_slot_report *r)
{
    return json_pack("{s:s, s:b, s:i, s:s, s:f, s:f, s:s, s:s, s:s, s:I, s:f, s:i}", "slot",
                     r->slot_id, "occupied", r->occupied, "stage", (int)r->stage, "stage_name",
                     r->occupied ? ksm_stage_name(r->stage) : "EMPTY", "alpha", r->controller.alpha,
                     "alpha_target", r->controller.alpha_target, "seed", r->seed_id, "blueprint",
                     r->blueprint_id, "alpha_mode", ksm_alpha_mode_name(r->controller.mode),
                     "seed_params", (json_int_t)r->seed_params, "val_accuracy",
                     isfinite(r->metrics.current_val_accuracy) ? r->metrics.current_val_accuracy
                                                               : 0.0,
                     "epochs_in_stage", (int)r->metrics.epochs_in_current_stage);
}

static json_t *cache_json(const char *model, const struct ksm_cache_counters *c)
{
    return json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "cache", c->cache,
                     "model", model, "slot", c->slot_id, "hits", (json_int_t)c->hits, "misses",
                     (json_int_t)c->misses, "evictions", (json_int_t)c->evictions, "invalidations",
                     (json_int_t)c->invalidations, "recompiles", (json_int_t)c->recompiles,
                     "entries", (json_int_t)c->entries, "capacity", (json_int_t)c->capacity,
                     "bytes", (json_int_t)c->bytes);
}

static json_t *gate_json(const struct ksm_slot_gate *g)
{
    const struct ksm_gate_result *r = &g->result;
    json_t *failed = json_array();
    for (int i = 0; failed != NULL && i < r->n_checks; i++) {
        const struct ksm_gate_check *c = &r->checks[i];
        if (c->passed) continue;
        json_array_append_new(failed, json_pack("{s:s, s:s}", "name", c->name, "detail",
                                                c->detail[0] ? c->detail : c->name));
    }
    return json_pack("{s:s, s:s, s:b, s:f, s:s, s:f, s:o*}", "slot", g->slot_id, "gate",
                     ksm_gate_level_name(r->gate), "passed", r->passed, "score", r->score,
                     "target_stage", ksm_stage_name(g->target_stage), "time",
                     (double)g->timestamp_ns * 1e-9, "failed_checks", failed);
}

static json_t *event_json(const struct ksm_lifecycle_event *ev, uint64_t seq)
{
    char text[256] = "";
    switch (ev->type) {
    case KSM_EV_SEED_GERMINATED: snprintf(text, sizeof text, "%s", ev->blueprint_id); break;
    case KSM_EV_SEED_STAGE_CHANGED:
        snprintf(text, sizeof text, "%s -> %s", ksm_stage_name(ev->from_stage),
                 ksm_stage_name(ev->to_stage));
        break;
    case KSM_EV_SEED_GATE_EVALUATED: {
        size_t n = (size_t)snprintf(
            text, sizeof text, "%s for %s: %s", ksm_gate_level_name(ev->gate.gate),
            ksm_stage_name(ev->target_stage), ev->gate.passed ? "passed" : "failed");
        for (int i = 0; i < ev->gate.n_checks && n < sizeof text; i++) {
            const struct ksm_gate_check *c = &ev->gate.checks[i];
            if (c->passed) continue;
            n += (size_t)snprintf(text + n, sizeof text - n, "; %s",
                                  c->detail[0] ? c->detail : c->name);
        }
        break;
    }
    case KSM_EV_SEED_PRUNED: snprintf(text, sizeof text, "%s", ev->reason); break;
    default: break;
    }
    return json_pack("{s:I, s:f, s:s, s:s, s:s, s:s}", "seq", (json_int_t)seq, "time",
                     (double)ev->timestamp_ns * 1e-9, "type", ksm_lifecycle_type_name(ev->type),
                     "model", ev->model_id, "slot", ev->slot_id, "text", text);
}

#define STATUS_EVENTS 50 /* events in /status.json */

/* json_array_append_new / json_object_set_new that remember a failure. */
static void add(json_t *arr, json_t *v, bool *ok)
{
    if (v == NULL || json_array_append_new(arr, v) != 0) *ok = false;
}
static void set(json_t *obj, const char *k, json_t *v, bool *ok)
{
    if (v == NULL || json_object_set_new(obj, k, v) != 0) *ok = false;
}

static json_t *rpc_json(ksm_rpc_server *rpc, bool *ok)
{
    json_t *o = json_object(), *methods = json_array();
    if (o == NULL || methods == NULL) {
        json_decref(o);
        json_decref(methods);
        *ok = false;
        return NULL;
    }
    uint64_t total = 0, errors = 0;
    struct ksm_rpc_method_stats st;
    for (size_t i = 0; i < ksm_rpc_server_method_count(rpc); i++) {
        ksm_rpc_server_method_stats(rpc, i, &st);
        uint64_t n = 0;
        for (int k = 0; k < KSM_RPC_CODES; k++) n += st.calls[k];
        total += n;
        errors += n - st.calls[0];
        if (n == 0) continue;
        double mean = st.latency_count ? (double)st.latency_sum_ns * 1e-9 / st.latency_count : 0;
        add(methods,
            json_pack("{s:s, s:s, s:I, s:I, s:f}", "service", st.service, "method", st.method,
                      "calls", (json_int_t)n, "errors", (json_int_t)(n - st.calls[0]),
                      "mean_latency_s", mean),
            ok);
    }
    set(o, "inflight", json_integer(ksm_rpc_server_inflight(rpc)), ok);
    set(o, "calls", json_integer((json_int_t)total), ok);
    set(o, "errors", json_integer((json_int_t)errors), ok);
    set(o, "methods", methods, ok);
    uint64_t ev[KSM_EV_COUNT];
    ksm_rpc_server_event_counts(rpc, ev);
    json_t *evs = json_object();
    for (int t = 0; evs != NULL && t < KSM_EV_COUNT; t++)
        set(evs, ksm_lifecycle_type_name((enum ksm_lifecycle_type)t),
            json_integer((json_int_t)ev[t]), ok);
    set(o, "events", evs, ok);
    struct ksm_lifecycle_event *recent = calloc(STATUS_EVENTS, sizeof *recent);
    uint64_t seqs[STATUS_EVENTS];
    json_t *log = json_array();
    if (recent != NULL && log != NULL) {
        size_t n = ksm_rpc_server_recent_events(rpc, recent, seqs, STATUS_EVENTS);
        for (size_t i = 0; i < n; i++) add(log, event_json(&recent[i], seqs[i]), ok);
    }
    free(recent);
    set(o, "event_log", log, ok);
    return o;
}

int ksm_metrics_render_status(const struct ksm_metrics_snapshot *s, ksm_rpc_server *rpc,
                              const struct ksm_metrics_build *bi, struct ksm_sbuf *out)
{
    bool ok = true;
    json_t *root = json_object();
    if (root == NULL) return KSM_ENOMEM;
    set(root, "version", json_string(bi->version ? bi->version : ""), &ok);
    set(root, "commit", json_string(bi->commit ? bi->commit : ""), &ok);
    set(root, "start_time", json_real((double)bi->start_unix_ns * 1e-9), &ok);
    json_t *devs = json_array(), *models = json_array(), *caches = json_array();
    set(root, "devices", devs, &ok);
    set(root, "models", models, &ok);
    set(root, "caches", caches, &ok);
    if (s != NULL && ok) {
        set(root, "sampled_at", json_real((double)s->taken_unix_ns * 1e-9), &ok);
        set(root, "healthy", json_boolean(s->healthy), &ok);
        for (int i = 0; i < s->n_devices; i++) add(devs, device_json(&s->devices[i]), &ok);
        for (size_t i = 0; i < s->n_models; i++) {
            const struct ksm_metrics_model *m = &s->models[i];
            json_t *slots = json_array();
            for (size_t j = 0; slots != NULL && j < m->n_slots; j++)
                add(slots, slot_json(&m->slots[j]), &ok);
            json_t *gates = json_array();
            for (size_t j = 0; gates != NULL && j < m->n_gates; j++)
                add(gates, gate_json(&m->gates[j]), &ok);
            json_t *mo = json_pack(
                "{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:o*, s:o*}", "id", m->info.model_id,
                "topology", ksm_topology_name(m->info.topology), "device", m->info.device, "dtype",
                ksm_dtype_name(m->info.dtype), "generation", (json_int_t)m->info.generation,
                "resident_bytes", (json_int_t)m->info.resident_bytes, "host_params",
                (json_int_t)m->info.host_params, "seed_params", (json_int_t)m->info.seed_params,
                "slots", slots, "last_gates", gates);
            add(models, mo, &ok);
            for (size_t j = 0; j < m->n_caches; j++)
                add(caches, cache_json(m->info.model_id, &m->caches[j]), &ok);
        }
    }
    if (rpc != NULL && ok) set(root, "rpc", rpc_json(rpc, &ok), &ok);
    char *txt = ok ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (txt == NULL) return KSM_ENOMEM;
    ksm_sbuf_puts(out, txt);
    free(txt);
    return out->oom ? KSM_ENOMEM : 0;
}
