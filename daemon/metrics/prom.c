/*
 * metrics/prom: the /metrics document, Prometheus text exposition format 0.0.4. Every family has
 * HELP and TYPE lines and its samples together; names follow the Prometheus conventions (prefix
 * kasmina_, base units, _bytes, _seconds, _total on counters). docs/metrics.md lists them all:
 * keep the two in step (tests/metrics/ checks that every family rendered is documented).
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "metrics/metrics_impl.h"
#include "rpc/stats.h"

void ksm_prom_escape_label(struct ksm_sbuf *b, const char *v)
{
    const char *run = v;
    for (const char *p = v; *p; p++) {
        const char *rep = *p == '\\' ? "\\\\" : *p == '"' ? "\\\"" : *p == '\n' ? "\\n" : NULL;
        if (rep == NULL) continue;
        ksm_sbuf_putn(b, run, (size_t)(p - run));
        ksm_sbuf_puts(b, rep);
        run = p + 1;
    }
    ksm_sbuf_puts(b, run);
}

static void escape_help(struct ksm_sbuf *b, const char *v)
{
    for (const char *p = v; *p; p++) {
        if (*p == '\\')
            ksm_sbuf_puts(b, "\\\\");
        else if (*p == '\n')
            ksm_sbuf_puts(b, "\\n");
        else
            ksm_sbuf_putn(b, p, 1);
    }
}

void ksm_prom_value(struct ksm_sbuf *b, double v)
{
    if (isnan(v))
        ksm_sbuf_puts(b, "NaN");
    else if (isinf(v))
        ksm_sbuf_puts(b, v > 0 ? "+Inf" : "-Inf");
    else if (v == floor(v) && fabs(v) < 9007199254740992.0) /* 2^53: exact as an integer */
        ksm_sbuf_printf(b, "%.0f", v);
    else {
        /* The shortest of %.15g / %.17g that reads back as the same double. */
        char tmp[40];
        snprintf(tmp, sizeof tmp, "%.15g", v);
        if (strtod(tmp, NULL) != v) snprintf(tmp, sizeof tmp, "%.17g", v);
        ksm_sbuf_puts(b, tmp);
    }
}

static void family(struct ksm_sbuf *b, const char *name, const char *type, const char *help)
{
    ksm_sbuf_printf(b, "# HELP %s ", name);
    escape_help(b, help);
    ksm_sbuf_printf(b, "\n# TYPE %s %s\n", name, type);
}

/* name{k1="v1",...} value; lv holds n (key, value) pairs. */
static void sample(struct ksm_sbuf *b, const char *name, const char *const *lv, int n, double v)
{
    ksm_sbuf_puts(b, name);
    if (n > 0) {
        ksm_sbuf_putn(b, "{", 1);
        for (int i = 0; i < n; i++) {
            ksm_sbuf_printf(b, "%s%s=\"", i ? "," : "", lv[2 * i]);
            ksm_prom_escape_label(b, lv[2 * i + 1]);
            ksm_sbuf_putn(b, "\"", 1);
        }
        ksm_sbuf_putn(b, "}", 1);
    }
    ksm_sbuf_putn(b, " ", 1);
    ksm_prom_value(b, v);
    ksm_sbuf_putn(b, "\n", 1);
}

/* ---- devices and allocators ---- */

enum dev_field {
    D_TOTAL,
    D_FREE,
    D_ALLOC,
    D_ALLOC_PEAK,
    D_RES,
    D_RES_PEAK,
    D_ACT,
    D_ACT_PEAK,
    D_INSPLIT,
    D_CAP,
    D_BLOCKS,
    D_SEGMENTS,
    D_ALLOCS,
    D_OOMS,
    D_RETRIES,
    D_HITS,
    D_DEFERRED,
    D_DMALLOC,
    D_DFREE,
    D_SYNCS,
};

static const struct {
    enum dev_field f;
    bool needs_alloc;
    const char *name, *type, *help;
} dev_families[] = {
    {D_TOTAL, false, "kasmina_device_memory_total_bytes", "gauge",
     "Device memory size (sampled from the device)."},
    {D_FREE, false, "kasmina_device_memory_free_bytes", "gauge",
     "Free device memory as the device reports it (sampled)."},
    {D_ALLOC, true, "kasmina_memory_allocated_bytes", "gauge",
     "Bytes of blocks handed out by the caching allocator (rounded sizes)."},
    {D_ALLOC_PEAK, true, "kasmina_memory_allocated_peak_bytes", "gauge",
     "High-water mark of kasmina_memory_allocated_bytes."},
    {D_RES, true, "kasmina_memory_reserved_bytes", "gauge",
     "Bytes of segments the allocator obtained from the device (allocated plus cached)."},
    {D_RES_PEAK, true, "kasmina_memory_reserved_peak_bytes", "gauge",
     "High-water mark of kasmina_memory_reserved_bytes."},
    {D_ACT, true, "kasmina_memory_active_bytes", "gauge",
     "Allocated bytes plus freed bytes still awaiting other streams' events."},
    {D_ACT_PEAK, true, "kasmina_memory_active_peak_bytes", "gauge",
     "High-water mark of kasmina_memory_active_bytes."},
    {D_INSPLIT, true, "kasmina_memory_inactive_split_bytes", "gauge",
     "Free bytes in segments that are split (fragmentation)."},
    {D_CAP, true, "kasmina_memory_cap_bytes", "gauge",
     "The allocator's memory cap; 0 means no cap."},
    {D_BLOCKS, true, "kasmina_memory_blocks", "gauge", "Blocks currently handed out."},
    {D_SEGMENTS, true, "kasmina_memory_segments", "gauge", "Segments currently reserved."},
    {D_ALLOCS, true, "kasmina_memory_allocations_total", "counter",
     "Blocks handed out by the allocator."},
    {D_OOMS, true, "kasmina_memory_ooms_total", "counter",
     "Allocation requests that failed with out-of-memory after the flush-and-retry."},
    {D_RETRIES, true, "kasmina_memory_alloc_retries_total", "counter",
     "Flush-and-retry cycles (cache emptied after a failed device allocation)."},
    {D_HITS, true, "kasmina_memory_cache_hits_total", "counter",
     "Requests served from cached segments without a device allocation."},
    {D_DEFERRED, true, "kasmina_memory_deferred_frees_total", "counter",
     "Frees that waited for other streams' events before reuse."},
    {D_DMALLOC, true, "kasmina_memory_device_allocs_total", "counter",
     "Device allocations (cudaMalloc equivalents) that succeeded."},
    {D_DFREE, true, "kasmina_memory_device_frees_total", "counter",
     "Segments given back to the device."},
    {D_SYNCS, true, "kasmina_memory_device_syncs_total", "counter",
     "Device synchronizations done by the allocator."},
};

static double dev_value(const struct ksm_metrics_device *d, enum dev_field f)
{
    const struct ksm_pool_stats *p = &d->st.pool[KSM_POOL_ALL];
    switch (f) {
    case D_TOTAL: return (double)d->total_bytes;
    case D_FREE: return (double)d->free_bytes;
    case D_ALLOC: return (double)p->allocated_bytes.current;
    case D_ALLOC_PEAK: return (double)p->allocated_bytes.peak;
    case D_RES: return (double)p->reserved_bytes.current;
    case D_RES_PEAK: return (double)p->reserved_bytes.peak;
    case D_ACT: return (double)p->active_bytes.current;
    case D_ACT_PEAK: return (double)p->active_bytes.peak;
    case D_INSPLIT: return (double)p->inactive_split_bytes.current;
    case D_CAP: return (double)d->st.memory_cap_bytes;
    case D_BLOCKS: return (double)p->allocation.current;
    case D_SEGMENTS: return (double)p->segment.current;
    case D_ALLOCS: return (double)p->allocation.allocated;
    case D_OOMS: return (double)d->st.num_ooms;
    case D_RETRIES: return (double)d->st.num_alloc_retries;
    case D_HITS: return (double)d->st.cache_hits;
    case D_DEFERRED: return (double)d->st.deferred_frees;
    case D_DMALLOC: return (double)d->st.num_device_alloc;
    case D_DFREE: return (double)d->st.num_device_free;
    case D_SYNCS: return (double)d->st.num_sync_all_streams;
    }
    return NAN;
}

static void render_devices(struct ksm_sbuf *b, const struct ksm_metrics_snapshot *s)
{
    family(b, "kasmina_device_info", "gauge", "One series per device; the value is 1.");
    for (int i = 0; i < s->n_devices; i++) {
        const char *lv[] = {"device", s->devices[i].name, "kind", s->devices[i].kind};
        sample(b, "kasmina_device_info", lv, 2, 1);
    }
    for (size_t k = 0; k < sizeof dev_families / sizeof dev_families[0]; k++) {
        family(b, dev_families[k].name, dev_families[k].type, dev_families[k].help);
        for (int i = 0; i < s->n_devices; i++) {
            const struct ksm_metrics_device *d = &s->devices[i];
            if (dev_families[k].needs_alloc && !d->have_alloc) continue;
            const char *lv[] = {"device", d->name};
            sample(b, dev_families[k].name, lv, 1, dev_value(d, dev_families[k].f));
        }
    }
}

/* ---- models, slots, caches ---- */

static void render_models(struct ksm_sbuf *b, const struct ksm_metrics_snapshot *s)
{
    family(b, "kasmina_models", "gauge", "Models loaded.");
    sample(b, "kasmina_models", NULL, 0, (double)s->n_models);
    family(b, "kasmina_model_info", "gauge", "One series per model; the value is 1.");
    for (size_t i = 0; i < s->n_models; i++) {
        const struct ksm_model_info *mi = &s->models[i].info;
        const char *lv[] = {"model",  mi->model_id, "topology", ksm_topology_name(mi->topology),
                            "device", mi->device,   "dtype",    ksm_dtype_name(mi->dtype)};
        sample(b, "kasmina_model_info", lv, 4, 1);
    }
    static const struct {
        const char *name, *help;
    } mf[] = {
        {"kasmina_model_resident_bytes",
         "Device bytes owned by the model (weights, plans, scalars)."},
        {"kasmina_model_generation", "The model's generation (bumped by every structural change)."},
        {"kasmina_model_host_params", "Parameters of the host network (tied weights once)."},
        {"kasmina_model_seed_params", "Parameters of live seeds and gates."},
        {"kasmina_model_slots", "Registered slots."},
    };
    for (size_t k = 0; k < sizeof mf / sizeof mf[0]; k++) {
        family(b, mf[k].name, "gauge", mf[k].help);
        for (size_t i = 0; i < s->n_models; i++) {
            const struct ksm_model_info *mi = &s->models[i].info;
            double v = k == 0   ? (double)mi->resident_bytes
                       : k == 1 ? (double)mi->generation
                       : k == 2 ? (double)mi->host_params
                       : k == 3 ? (double)mi->seed_params
                                : (double)s->models[i].n_slots;
            const char *lv[] = {"model", mi->model_id, "device", mi->device};
            sample(b, mf[k].name, lv, k == 0 ? 2 : 1, v);
        }
    }

    static const struct {
        const char *name, *help;
    } sf[] = {
        {"kasmina_slot_stage",
         "Lifecycle stage of the slot's seed as its enum value (0 empty, 1 DORMANT, 2 GERMINATED, "
         "3 TRAINING, 4 BLENDING, 6 HOLDING, 7 FOSSILIZED, 8 PRUNED, 9 EMBARGOED, 10 RESETTING)."},
        {"kasmina_slot_alpha", "Current blend alpha of the slot (0 when empty)."},
        {"kasmina_slot_alpha_target", "Alpha the slot's controller is moving towards."},
        {"kasmina_slot_occupied", "1 when the slot holds a seed, else 0."},
        {"kasmina_slot_seed_params", "Parameters of the slot's seed and gate."},
    };
    for (size_t k = 0; k < sizeof sf / sizeof sf[0]; k++) {
        family(b, sf[k].name, "gauge", sf[k].help);
        for (size_t i = 0; i < s->n_models; i++)
            for (size_t j = 0; j < s->models[i].n_slots; j++) {
                const struct ksm_slot_report *r = &s->models[i].slots[j];
                double v = k == 0   ? (double)r->stage
                           : k == 1 ? r->controller.alpha
                           : k == 2 ? r->controller.alpha_target
                           : k == 3 ? (r->occupied ? 1.0 : 0.0)
                                    : (double)r->seed_params;
                const char *lv[] = {"model", s->models[i].info.model_id, "slot", r->slot_id};
                sample(b, sf[k].name, lv, 2, v);
            }
    }
    /* Run gauges: occupied slots only, and only once the quantity was measured. */
    static const struct {
        const char *name, *help;
    } rf[] = {
        {"kasmina_slot_val_accuracy",
         "Validation accuracy last recorded for the slot's seed (RecordMetrics val_accuracy)."},
        {"kasmina_slot_epochs_in_stage", "Epochs the slot's seed has spent in its current stage."},
        {"kasmina_slot_contribution",
         "Counterfactual contribution of the slot's seed (accuracy points; once measured)."},
        {"kasmina_slot_gradient_health",
         "Gradient health of the slot's seed, 0..1 (once reported by RecordMetrics)."},
        {"kasmina_slot_gradient_ratio",
         "Seed-to-host gradient norm ratio of the slot's seed (once measured)."},
    };
    for (size_t k = 0; k < sizeof rf / sizeof rf[0]; k++) {
        family(b, rf[k].name, "gauge", rf[k].help);
        for (size_t i = 0; i < s->n_models; i++)
            for (size_t j = 0; j < s->models[i].n_slots; j++) {
                const struct ksm_slot_report *r = &s->models[i].slots[j];
                if (!r->occupied) continue;
                const struct ksm_seed_metrics *sm = &r->metrics;
                double v;
                if (k == 0)
                    v = sm->current_val_accuracy;
                else if (k == 1)
                    v = (double)sm->epochs_in_current_stage;
                else if (k == 2) {
                    if (!sm->has_counterfactual) continue;
                    v = sm->counterfactual_contribution;
                } else if (k == 3) {
                    if (!r->telemetry.has_gradient_health) continue;
                    v = r->telemetry.gradient_health;
                } else {
                    if (!sm->has_grad_ratio) continue;
                    v = sm->seed_gradient_norm_ratio;
                }
                const char *lv[] = {"model", s->models[i].info.model_id, "slot", r->slot_id};
                sample(b, rf[k].name, lv, 2, v);
            }
    }
    family(b, "kasmina_slot_last_gate_passed", "gauge",
           "Outcome of the slot's last gate evaluation (1 passed, 0 failed), labelled by gate.");
    for (size_t i = 0; i < s->n_models; i++)
        for (size_t j = 0; j < s->models[i].n_gates; j++) {
            const struct ksm_slot_gate *g = &s->models[i].gates[j];
            const char *lv[] = {"model", s->models[i].info.model_id,         "slot", g->slot_id,
                                "gate",  ksm_gate_level_name(g->result.gate)};
            sample(b, "kasmina_slot_last_gate_passed", lv, 3, g->result.passed ? 1 : 0);
        }
    family(b, "kasmina_gate_evaluations_total", "counter",
           "Gate evaluations (AdvanceStage and auto-forward gates), by gate and outcome.");
    static const enum ksm_gate_level gates[] = {KSM_GATE_G0, KSM_GATE_G1, KSM_GATE_G2, KSM_GATE_G3,
                                                KSM_GATE_G5};
    for (size_t i = 0; i < s->n_models; i++)
        for (size_t g = 0; g < sizeof gates / sizeof gates[0]; g++)
            for (int o = 1; o >= 0; o--) {
                const char *lv[] = {"model",   s->models[i].info.model_id,
                                    "gate",    ksm_gate_level_name(gates[g]),
                                    "outcome", o ? "passed" : "failed"};
                sample(b, "kasmina_gate_evaluations_total", lv, 3,
                       (double)s->models[i].run.gate_evaluations[gates[g]][o]);
            }
    family(b, "kasmina_model_compute_seconds_total", "counter",
           "Compute time of successful Forward, Evaluate and TrainStep calls, by kind.");
    static const char *const kinds[KSM_COMPUTE_KINDS] = {"forward", "evaluate", "train"};
    for (size_t i = 0; i < s->n_models; i++)
        for (int k = 0; k < KSM_COMPUTE_KINDS; k++) {
            const char *lv[] = {"model", s->models[i].info.model_id, "kind", kinds[k]};
            sample(b, "kasmina_model_compute_seconds_total", lv, 2,
                   (double)s->models[i].run.compute_ns[k] * 1e-9);
        }
    family(b, "kasmina_slot_stage_info", "gauge",
           "One series per slot naming its stage and blueprint; the value is 1.");
    for (size_t i = 0; i < s->n_models; i++)
        for (size_t j = 0; j < s->models[i].n_slots; j++) {
            const struct ksm_slot_report *r = &s->models[i].slots[j];
            const char *lv[] = {"model",     s->models[i].info.model_id,
                                "slot",      r->slot_id,
                                "stage",     r->occupied ? ksm_stage_name(r->stage) : "EMPTY",
                                "blueprint", r->blueprint_id};
            sample(b, "kasmina_slot_stage_info", lv, 4, 1);
        }

    static const struct {
        const char *name, *type, *help;
    } cf[] = {
        {"kasmina_cache_hits_total", "counter", "Cache lookups that hit."},
        {"kasmina_cache_misses_total", "counter", "Cache lookups that missed."},
        {"kasmina_cache_evictions_total", "counter", "Entries evicted to make room."},
        {"kasmina_cache_invalidations_total", "counter",
         "Entries dropped because they went stale."},
        {"kasmina_cache_recompiles_total", "counter", "Plans built again after the first build."},
        {"kasmina_cache_entries", "gauge", "Entries held."},
        {"kasmina_cache_capacity", "gauge", "Maximum entries; 0 means unbounded."},
        {"kasmina_cache_bytes", "gauge", "Bytes held by the cache's entries."},
    };
    for (size_t k = 0; k < sizeof cf / sizeof cf[0]; k++) {
        family(b, cf[k].name, cf[k].type, cf[k].help);
        for (size_t i = 0; i < s->n_models; i++)
            for (size_t j = 0; j < s->models[i].n_caches; j++) {
                const struct ksm_cache_counters *c = &s->models[i].caches[j];
                uint64_t v = k == 0   ? c->hits
                             : k == 1 ? c->misses
                             : k == 2 ? c->evictions
                             : k == 3 ? c->invalidations
                             : k == 4 ? c->recompiles
                             : k == 5 ? c->entries
                             : k == 6 ? c->capacity
                                      : c->bytes;
                const char *lv[] = {"cache", c->cache,  "model", s->models[i].info.model_id,
                                    "slot",  c->slot_id};
                sample(b, cf[k].name, lv, 3, (double)v);
            }
    }
}

/* ---- rpc ---- */

static void render_rpc(struct ksm_sbuf *b, ksm_rpc_server *rpc)
{
    size_t nm = ksm_rpc_server_method_count(rpc);
    family(b, "kasmina_rpc_inflight", "gauge", "Unary calls accepted and not yet answered.");
    sample(b, "kasmina_rpc_inflight", NULL, 0, (double)ksm_rpc_server_inflight(rpc));
    family(b, "kasmina_rpc_requests_total", "counter",
           "gRPC calls finished, by method and status code (streams count when they end).");
    struct ksm_rpc_method_stats st;
    for (size_t i = 0; i < nm; i++) {
        ksm_rpc_server_method_stats(rpc, i, &st);
        for (int k = 0; k < KSM_RPC_CODES; k++) {
            /* OK always (a series to rate() from the start); other codes once seen. */
            if (k != 0 && st.calls[k] == 0) continue;
            if (k == 0 && i + 1 == nm && st.calls[k] == 0) continue; /* unknown methods */
            const char *lv[] = {"service", st.service, "method",
                                st.method, "code",     ksm_rpc_code_name(k)};
            sample(b, "kasmina_rpc_requests_total", lv, 3, (double)st.calls[k]);
        }
    }
    family(b, "kasmina_rpc_duration_seconds", "histogram",
           "Latency of unary gRPC calls from arrival to the status being sent.");
    for (size_t i = 0; i < nm; i++) {
        ksm_rpc_server_method_stats(rpc, i, &st);
        if (st.streaming || st.service[0] == '\0') continue;
        uint64_t cum = 0;
        char le[32];
        for (int k = 0; k <= KSM_RPC_LATENCY_BUCKETS; k++) {
            cum += st.buckets[k];
            if (k < KSM_RPC_LATENCY_BUCKETS)
                snprintf(le, sizeof le, "%g", ksm_rpc_latency_bounds[k]);
            else
                snprintf(le, sizeof le, "+Inf");
            const char *lv[] = {"service", st.service, "method", st.method, "le", le};
            sample(b, "kasmina_rpc_duration_seconds_bucket", lv, 3, (double)cum);
        }
        const char *lv[] = {"service", st.service, "method", st.method};
        sample(b, "kasmina_rpc_duration_seconds_sum", lv, 2, (double)st.latency_sum_ns * 1e-9);
        sample(b, "kasmina_rpc_duration_seconds_count", lv, 2, (double)st.latency_count);
    }
    uint64_t ev[KSM_EV_COUNT];
    ksm_rpc_server_event_counts(rpc, ev);
    family(b, "kasmina_lifecycle_events_total", "counter", "Seed lifecycle events, by type.");
    for (int t = 0; t < KSM_EV_COUNT; t++) {
        const char *lv[] = {"type", ksm_lifecycle_type_name((enum ksm_lifecycle_type)t)};
        sample(b, "kasmina_lifecycle_events_total", lv, 1, (double)ev[t]);
    }
}

int ksm_metrics_render_prom(const struct ksm_metrics_snapshot *snap, ksm_rpc_server *rpc,
                            const struct ksm_metrics_build *bi, struct ksm_sbuf *b)
{
    family(b, "kasmina_build_info", "gauge",
           "Build of the running kasminad (version, commit); the value is 1.");
    const char *lv[] = {"version", bi->version ? bi->version : "", "commit",
                        bi->commit ? bi->commit : ""};
    sample(b, "kasmina_build_info", lv, 2, 1);
    family(b, "kasmina_start_time_seconds", "gauge", "Start time of the process (unix seconds).");
    sample(b, "kasmina_start_time_seconds", NULL, 0, (double)(bi->start_unix_ns / 1000000000));
    if (snap != NULL) {
        family(b, "kasmina_engine_healthy", "gauge",
               "1 while every device works; 0 after a device reported an asynchronous error.");
        sample(b, "kasmina_engine_healthy", NULL, 0, snap->healthy ? 1 : 0);
        family(b, "kasmina_metrics_sample_timestamp_seconds", "gauge",
               "When the engine gauges below were sampled (unix seconds).");
        sample(b, "kasmina_metrics_sample_timestamp_seconds", NULL, 0,
               (double)snap->taken_unix_ns * 1e-9);
        family(b, "kasmina_metrics_sample_duration_seconds", "gauge",
               "How long sampling the engine took.");
        sample(b, "kasmina_metrics_sample_duration_seconds", NULL, 0, snap->duration_s);
        render_devices(b, snap);
        render_models(b, snap);
    }
    if (rpc != NULL) render_rpc(b, rpc);
    return b->oom ? KSM_ENOMEM : 0;
}
