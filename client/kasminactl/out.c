/*
 * kasminactl output: aligned tables for people, JSON (proto field names) for scripts.
 */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl.h"

// ---- Tables ----

struct ctl_table {
    int ncols;
    size_t nrows, cap; /* rows including the header */
    char **cells;      /* nrows * ncols */
    bool right[32];
    int next_col;
};

struct ctl_table *ctl_table_new(int ncols, const char *const *headers)
{
    if (ncols <= 0 || ncols > 32) return NULL;
    struct ctl_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->ncols = ncols;
    ctl_table_row(t);
    for (int i = 0; i < ncols; i++) ctl_table_cell(t, "%s", headers[i]);
    return t;
}

void ctl_table_right(struct ctl_table *t, int col)
{
    if (t && col >= 0 && col < t->ncols) t->right[col] = true;
}

void ctl_table_row(struct ctl_table *t)
{
    if (!t) return;
    if (t->nrows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 8;
        char **c = realloc(t->cells, cap * (size_t)t->ncols * sizeof *c);
        if (!c) return;
        t->cells = c;
        t->cap = cap;
    }
    memset(t->cells + t->nrows * (size_t)t->ncols, 0, (size_t)t->ncols * sizeof *t->cells);
    t->nrows++;
    t->next_col = 0;
}

void ctl_table_cell(struct ctl_table *t, const char *fmt, ...)
{
    if (!t || t->nrows == 0 || t->next_col >= t->ncols) return;
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) s = NULL;
    va_end(ap);
    t->cells[(t->nrows - 1) * (size_t)t->ncols + (size_t)t->next_col++] = s;
}

void ctl_table_print(const struct ctl_table *t, FILE *f)
{
    if (!t) return;
    size_t w[32] = {0};
    for (size_t r = 0; r < t->nrows; r++)
        for (int c = 0; c < t->ncols; c++) {
            const char *s = t->cells[r * (size_t)t->ncols + (size_t)c];
            size_t l = s ? strlen(s) : 0;
            if (l > w[c]) w[c] = l;
        }
    for (size_t r = 0; r < t->nrows; r++) {
        /* Cells after the last non-empty one are not padded: no trailing blanks. */
        int last = 0;
        for (int c = 0; c < t->ncols; c++) {
            const char *s = t->cells[r * (size_t)t->ncols + (size_t)c];
            if (s && *s) last = c;
        }
        for (int c = 0; c <= last; c++) {
            const char *s = t->cells[r * (size_t)t->ncols + (size_t)c];
            if (!s) s = "";
            if (t->right[c] && r > 0)
                fprintf(f, "%*s", (int)w[c], s);
            else if (c == last)
                fputs(s, f);
            else
                fprintf(f, "%-*s", (int)w[c], s);
            if (c != last) fputs("  ", f);
        }
        fputc('\n', f);
    }
}

void ctl_table_free(struct ctl_table *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->nrows * (size_t)t->ncols; i++) free(t->cells[i]);
    free(t->cells);
    free(t);
}

// ---- Small helpers ----

const char *ctl_bytes(uint64_t n, char *buf, size_t len)
{
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    int u = 0;
    while (v >= 1024 && u < 4) v /= 1024, u++;
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", n);
    else
        snprintf(buf, len, "%.1f %s", v, unit[u]);
    return buf;
}

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            float v = ldexpf((float)man, -24);
            return (h >> 15) ? -v : v;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

double ctl_tensor_get(const ksm_tensor *t, int64_t i)
{
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case KSM_DTYPE_F32: {
        float v;
        memcpy(&v, p + i * 4, 4);
        return v;
    }
    case KSM_DTYPE_F16: {
        uint16_t h;
        memcpy(&h, p + i * 2, 2);
        return half_to_float(h);
    }
    case KSM_DTYPE_BF16: {
        uint16_t h;
        memcpy(&h, p + i * 2, 2);
        uint32_t bits = (uint32_t)h << 16;
        float v;
        memcpy(&v, &bits, 4);
        return v;
    }
    case KSM_DTYPE_I64: {
        int64_t v;
        memcpy(&v, p + i * 8, 8);
        return (double)v;
    }
    case KSM_DTYPE_I32: {
        int32_t v;
        memcpy(&v, p + i * 4, 4);
        return v;
    }
    default: return NAN;
    }
}

/* JSON has no NaN or infinities: they become null. */
static json_t *jreal(double v) { return isfinite(v) ? json_real(v) : json_null(); }
static json_t *ju64(uint64_t v) { return json_integer((json_int_t)v); }

// ---- JSON ----

json_t *ctl_json_gate(const struct ksm_gate_result *g)
{
    json_t *pass = json_array(), *fail = json_array();
    for (int i = 0; i < g->n_passed && i < KSM_GATE_MAX_CHECKS; i++)
        json_array_append_new(pass, json_string(g->checks_passed[i]));
    for (int i = 0; i < g->n_failed && i < KSM_GATE_MAX_CHECKS; i++)
        json_array_append_new(fail, json_string(g->checks_failed[i]));
    return json_pack("{s:s, s:b, s:o, s:o, s:o, s:s}", "gate", ksm_gate_level_name(g->gate),
                     "passed", g->passed, "score", jreal(g->score), "checks_passed", pass,
                     "checks_failed", fail, "message", g->message);
}

json_t *ctl_json_slot_report(const struct ksm_slot_report *r)
{
    json_t *j = json_pack("{s:s, s:b, s:I}", "slot_id", r->slot_id, "occupied", r->occupied,
                          "model_generation", (json_int_t)r->model_generation);
    if (!r->occupied) return j;
    const struct ksm_alpha_controller *c = &r->controller;
    json_t *ctrl = json_pack("{s:o, s:o, s:o, s:s, s:s, s:o, s:i, s:i}", "alpha", jreal(c->alpha),
                             "alpha_start", jreal(c->alpha_start), "alpha_target",
                             jreal(c->alpha_target), "mode", ksm_alpha_mode_name(c->mode), "curve",
                             ksm_alpha_curve_name(c->curve), "steepness", jreal(c->steepness),
                             "steps_total", (int)c->steps_total, "steps_done", (int)c->steps_done);
    const struct ksm_seed_metrics *m = &r->metrics;
    json_t *met = json_pack(
        "{s:i, s:i, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:i}",
        "epochs_total", (int)m->epochs_total, "epochs_in_current_stage",
        (int)m->epochs_in_current_stage, "initial_val_accuracy", jreal(m->initial_val_accuracy),
        "current_val_accuracy", jreal(m->current_val_accuracy), "best_val_accuracy",
        jreal(m->best_val_accuracy), "accuracy_at_stage_start", jreal(m->accuracy_at_stage_start),
        "total_improvement", jreal(r->total_improvement), "improvement_since_stage_start",
        jreal(r->improvement_since_stage_start), "counterfactual_contribution",
        m->has_counterfactual ? jreal(m->counterfactual_contribution) : json_null(),
        "contribution_velocity", jreal(m->contribution_velocity), "seed_gradient_norm_ratio",
        m->has_grad_ratio ? jreal(m->seed_gradient_norm_ratio) : json_null(), "seed_param_count",
        ju64(m->seed_param_count), "host_param_count", ju64(m->host_param_count),
        "gradient_norm_avg", jreal(m->gradient_norm_avg), "current_alpha", jreal(m->current_alpha),
        "alpha_ramp_step", (int)m->alpha_ramp_step);
    const struct ksm_seed_telemetry *t = &r->telemetry;
    json_t *grad = json_object();
    if (t->has_gradient_norm) json_object_set_new(grad, "gradient_norm", jreal(t->gradient_norm));
    if (t->has_gradient_health)
        json_object_set_new(grad, "gradient_health", jreal(t->gradient_health));
    if (t->has_vanishing_flag)
        json_object_set_new(grad, "has_vanishing", json_boolean(t->has_vanishing));
    if (t->has_exploding_flag)
        json_object_set_new(grad, "has_exploding", json_boolean(t->has_exploding));
    if (m->has_grad_ratio)
        json_object_set_new(grad, "seed_gradient_norm_ratio", jreal(m->seed_gradient_norm_ratio));
    json_object_set_new(j, "seed_id", json_string(r->seed_id));
    json_object_set_new(j, "blueprint_id", json_string(r->blueprint_id));
    json_object_set_new(j, "stage", json_string(ksm_stage_name(r->stage)));
    json_object_set_new(j, "previous_stage", json_string(ksm_stage_name(r->previous_stage)));
    json_object_set_new(j, "alpha_algorithm",
                        json_string(ksm_alpha_algorithm_name(r->alpha_algorithm)));
    json_object_set_new(j, "controller", ctrl);
    json_object_set_new(j, "blend_tempo_epochs", json_integer(r->blend_tempo_epochs));
    json_object_set_new(j, "metrics", met);
    json_object_set_new(j, "gradients", grad);
    json_object_set_new(j, "isolate_gradients", json_boolean(r->isolate_gradients));
    json_object_set_new(j, "is_healthy", json_boolean(r->is_healthy));
    json_object_set_new(j, "seed_params", ju64(r->seed_params));
    return j;
}

json_t *ctl_json_model(const struct ksm_model_info *m)
{
    json_t *slots = json_array();
    for (int i = 0; i < m->n_slots && i < KSM_MAX_SLOTS; i++) {
        const struct ksm_slot_info *s = &m->slots[i];
        json_array_append_new(slots, json_pack("{s:s, s:i, s:i, s:s}", "slot_id", s->slot_id,
                                               "channels", (int)s->channels, "order", (int)s->order,
                                               "surface", s->surface ? s->surface : ""));
    }
    json_t *host;
    if (m->topology == KSM_TOPOLOGY_TRANSFORMER) {
        const struct ksm_transformer_spec *t = &m->transformer;
        host =
            json_pack("{s:i, s:i, s:i, s:i, s:i, s:i}", "vocab_size", (int)t->vocab_size, "n_embd",
                      (int)t->n_embd, "n_head", (int)t->n_head, "n_layer", (int)t->n_layer,
                      "block_size", (int)t->block_size, "num_segments", (int)t->num_segments);
    } else {
        const struct ksm_cnn_spec *c = &m->cnn;
        host = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i}", "num_classes", (int)c->num_classes,
                         "n_blocks", (int)c->n_blocks, "base_channels", (int)c->base_channels,
                         "pool_layers", (int)c->pool_layers, "kernel_size", (int)c->kernel_size,
                         "in_channels", (int)c->in_channels);
    }
    const char *dt = ksm_dtype_name(m->dtype);
    return json_pack("{s:s, s:s, s:o, s:s, s:s, s:o, s:I, s:I, s:I, s:I}", "model_id", m->model_id,
                     "topology", ksm_topology_name(m->topology),
                     m->topology == KSM_TOPOLOGY_TRANSFORMER ? "transformer" : "cnn", host,
                     "device", m->device, "dtype", dt ? dt : "?", "slots", slots, "host_params",
                     (json_int_t)m->host_params, "seed_params", (json_int_t)m->seed_params,
                     "generation", (json_int_t)m->generation, "resident_bytes",
                     (json_int_t)m->resident_bytes);
}

json_t *ctl_json_event(uint64_t sequence, const struct ksm_lifecycle_event *e)
{
    json_t *j =
        json_pack("{s:I, s:s, s:s, s:s, s:s, s:I, s:s, s:s, s:o}", "sequence", (json_int_t)sequence,
                  "event_type", ksm_lifecycle_type_name(e->type), "model_id", e->model_id,
                  "slot_id", e->slot_id, "seed_id", e->seed_id, "timestamp_unix_ns",
                  (json_int_t)e->timestamp_ns, "from_stage", ksm_stage_name(e->from_stage),
                  "to_stage", ksm_stage_name(e->to_stage), "alpha", jreal(e->alpha));
    if (e->type == KSM_EV_SEED_GATE_EVALUATED)
        json_object_set_new(j, "gate", ctl_json_gate(&e->gate));
    if (e->reason[0]) json_object_set_new(j, "reason", json_string(e->reason));
    if (e->initiator[0]) json_object_set_new(j, "initiator", json_string(e->initiator));
    json_t *v = json_object();
    for (int i = 0; i < e->n_values && i < 12; i++)
        if (e->values[i].key) json_object_set_new(v, e->values[i].key, jreal(e->values[i].value));
    json_object_set_new(j, "values", v);
    return j;
}

static json_t *json_stat(const struct ksm_stat *s)
{
    return json_pack("{s:I, s:I, s:I, s:I}", "current", (json_int_t)s->current, "peak",
                     (json_int_t)s->peak, "allocated", (json_int_t)s->allocated, "freed",
                     (json_int_t)s->freed);
}

static json_t *json_pool(const struct ksm_pool_stats *p)
{
    return json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "allocated_bytes",
                     json_stat(&p->allocated_bytes), "reserved_bytes",
                     json_stat(&p->reserved_bytes), "active_bytes", json_stat(&p->active_bytes),
                     "inactive_split_bytes", json_stat(&p->inactive_split_bytes), "allocation",
                     json_stat(&p->allocation), "segment", json_stat(&p->segment), "active",
                     json_stat(&p->active), "inactive_split", json_stat(&p->inactive_split));
}

json_t *ctl_json_mem_stats(const struct ksm_mem_stats *s)
{
    return json_pack("{s:o, s:o, s:o, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "all",
                     json_pool(&s->pool[KSM_POOL_ALL]), "small_pool",
                     json_pool(&s->pool[KSM_POOL_SMALL]), "large_pool",
                     json_pool(&s->pool[KSM_POOL_LARGE]), "num_alloc_retries",
                     (json_int_t)s->num_alloc_retries, "num_ooms", (json_int_t)s->num_ooms,
                     "num_device_alloc", (json_int_t)s->num_device_alloc, "num_device_free",
                     (json_int_t)s->num_device_free, "num_sync_all_streams",
                     (json_int_t)s->num_sync_all_streams, "cache_hits", (json_int_t)s->cache_hits,
                     "deferred_frees", (json_int_t)s->deferred_frees, "memory_cap_bytes",
                     (json_int_t)s->memory_cap_bytes, "total_bytes", (json_int_t)s->total_bytes);
}

json_t *ctl_json_cache_counters(const char *model_id, const struct ksm_cache_counters *c)
{
    return json_pack("{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "cache", c->cache,
                     "model_id", model_id ? model_id : "", "slot_id", c->slot_id, "hits",
                     (json_int_t)c->hits, "misses", (json_int_t)c->misses, "evictions",
                     (json_int_t)c->evictions, "invalidations", (json_int_t)c->invalidations,
                     "entries", (json_int_t)c->entries, "capacity", (json_int_t)c->capacity,
                     "bytes", (json_int_t)c->bytes);
}

json_t *ctl_json_tensor(const ksm_tensor *t)
{
    json_t *shape = json_array(), *data = json_array();
    int64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        json_array_append_new(shape, json_integer(t->shape[i]));
        numel *= t->shape[i];
    }
    bool integral = t->dtype == KSM_DTYPE_I64 || t->dtype == KSM_DTYPE_I32;
    for (int64_t i = 0; t->data && i < numel; i++) {
        double v = ctl_tensor_get(t, i);
        json_array_append_new(data, integral ? json_integer((json_int_t)v) : jreal(v));
    }
    const char *dt = ksm_dtype_name(t->dtype);
    return json_pack("{s:s, s:o, s:o}", "dtype", dt ? dt : "?", "shape", shape, "data", data);
}

void ctl_json_print(json_t *j, FILE *f)
{
    if (!j) {
        fputs("null\n", f);
        return;
    }
    json_dumpf(j, f, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
    fputc('\n', f);
    json_decref(j);
}

// ---- Tables of engine structs ----

void ctl_print_slot_reports(const struct ksm_slot_report *r, size_t n, FILE *f)
{
    static const char *const h[] = {"SLOT", "SEED",   "BLUEPRINT", "STAGE", "ALPHA",   "TARGET",
                                    "MODE", "EPOCHS", "ACC",       "CF",    "HEALTHY", "PARAMS"};
    struct ctl_table *t = ctl_table_new(12, h);
    for (int c = 4; c < 12; c++)
        if (c != 6 && c != 10) ctl_table_right(t, c);
    for (size_t i = 0; i < n; i++) {
        ctl_table_row(t);
        ctl_table_cell(t, "%s", r[i].slot_id);
        if (!r[i].occupied) {
            ctl_table_cell(t, "-");
            ctl_table_cell(t, "-");
            ctl_table_cell(t, "EMPTY");
            continue;
        }
        const struct ksm_alpha_controller *c = &r[i].controller;
        ctl_table_cell(t, "%s", r[i].seed_id);
        ctl_table_cell(t, "%s", r[i].blueprint_id);
        ctl_table_cell(t, "%s", ksm_stage_name(r[i].stage));
        ctl_table_cell(t, "%.4f", c->alpha);
        ctl_table_cell(t, "%.4f", c->alpha_target);
        ctl_table_cell(t, "%s", ksm_alpha_mode_name(c->mode));
        ctl_table_cell(t, "%u/%u", r[i].metrics.epochs_in_current_stage, r[i].metrics.epochs_total);
        ctl_table_cell(t, "%.2f", r[i].metrics.current_val_accuracy);
        if (r[i].metrics.has_counterfactual)
            ctl_table_cell(t, "%.2f", r[i].metrics.counterfactual_contribution);
        else
            ctl_table_cell(t, "-");
        ctl_table_cell(t, "%s", r[i].is_healthy ? "yes" : "no");
        ctl_table_cell(t, "%" PRIu64, r[i].seed_params);
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_print_models(const struct ksm_model_info *m, size_t n, FILE *f)
{
    static const char *const h[] = {"MODEL", "TOPOLOGY", "DEVICE", "DTYPE",   "SLOTS",
                                    "HOST",  "SEEDS",    "GEN",    "RESIDENT"};
    struct ctl_table *t = ctl_table_new(9, h);
    for (int c = 4; c < 9; c++) ctl_table_right(t, c);
    for (size_t i = 0; i < n; i++) {
        char b[32];
        const char *dt = ksm_dtype_name(m[i].dtype);
        ctl_table_row(t);
        ctl_table_cell(t, "%s", m[i].model_id);
        ctl_table_cell(t, "%s", ksm_topology_name(m[i].topology));
        ctl_table_cell(t, "%s", m[i].device);
        ctl_table_cell(t, "%s", dt ? dt : "?");
        ctl_table_cell(t, "%d", m[i].n_slots);
        ctl_table_cell(t, "%" PRIu64, m[i].host_params);
        ctl_table_cell(t, "%" PRIu64, m[i].seed_params);
        ctl_table_cell(t, "%" PRIu64, m[i].generation);
        ctl_table_cell(t, "%s", ctl_bytes(m[i].resident_bytes, b, sizeof b));
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_print_gate(const struct ksm_gate_result *g, FILE *f)
{
    fprintf(f, "gate %s: %s (score %.4f)%s%s\n", ksm_gate_level_name(g->gate),
            g->passed ? "passed" : "FAILED", g->score, g->message[0] ? " - " : "", g->message);
    for (int i = 0; i < g->n_passed && i < KSM_GATE_MAX_CHECKS; i++)
        fprintf(f, "  + %s\n", g->checks_passed[i]);
    for (int i = 0; i < g->n_failed && i < KSM_GATE_MAX_CHECKS; i++)
        fprintf(f, "  - %s\n", g->checks_failed[i]);
}

void ctl_print_event(uint64_t sequence, const struct ksm_lifecycle_event *e, FILE *f)
{
    char ts[32] = "-";
    if (e->timestamp_ns > 0) {
        time_t sec = (time_t)(e->timestamp_ns / 1000000000);
        struct tm tm;
        if (localtime_r(&sec, &tm)) {
            size_t l = strftime(ts, sizeof ts, "%H:%M:%S", &tm);
            snprintf(ts + l, sizeof ts - l, ".%03d", (int)(e->timestamp_ns / 1000000 % 1000));
        }
    }
    fprintf(f, "%6" PRIu64 "  %s  %-20s %s/%s %s", sequence, ts, ksm_lifecycle_type_name(e->type),
            e->model_id, e->slot_id, e->seed_id);
    switch (e->type) {
    case KSM_EV_SEED_STAGE_CHANGED:
    case KSM_EV_SEED_FOSSILIZED:
        fprintf(f, " %s -> %s", ksm_stage_name(e->from_stage), ksm_stage_name(e->to_stage));
        break;
    case KSM_EV_SEED_GATE_EVALUATED:
        fprintf(f, " %s %s", ksm_gate_level_name(e->gate.gate),
                e->gate.passed ? "passed" : "failed");
        break;
    case KSM_EV_SEED_PRUNED:
        fprintf(f, " reason=%s initiator=%s", e->reason[0] ? e->reason : "-",
                e->initiator[0] ? e->initiator : "-");
        break;
    default: break;
    }
    fprintf(f, " alpha=%.4f", e->alpha);
    for (int i = 0; i < e->n_values && i < 12; i++)
        if (e->values[i].key) fprintf(f, " %s=%g", e->values[i].key, e->values[i].value);
    fputc('\n', f);
}
