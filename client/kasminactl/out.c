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
    json_t *checks = json_array();
    for (int i = 0; i < g->n_checks && i < KSM_GATE_MAX_CHECKS; i++) {
        const struct ksm_gate_check *c = &g->checks[i];
        json_t *jc = json_pack("{s:s, s:b, s:s, s:s, s:s}", "name", c->name, "passed", c->passed,
                               "quantity", c->quantity, "op", c->op, "detail", c->detail);
        if (c->op[0]) json_object_set_new(jc, "threshold", jreal(c->threshold));
        if (c->has_value) json_object_set_new(jc, "value", jreal(c->value));
        json_array_append_new(checks, jc);
    }
    return json_pack("{s:s, s:b, s:o, s:o, s:o, s:s, s:o}", "gate", ksm_gate_level_name(g->gate),
                     "passed", g->passed, "score", jreal(g->score), "checks_passed", pass,
                     "checks_failed", fail, "message", g->message, "checks", checks);
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
        host = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:f}", "vocab_size", (int)t->vocab_size,
                         "n_embd", (int)t->n_embd, "n_head", (int)t->n_head, "n_layer",
                         (int)t->n_layer, "block_size", (int)t->block_size, "num_segments",
                         (int)t->num_segments, "dropout", t->dropout);
    } else {
        const struct ksm_cnn_spec *c = &m->cnn;
        host = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i}", "num_classes", (int)c->num_classes,
                         "n_blocks", (int)c->n_blocks, "base_channels", (int)c->base_channels,
                         "pool_layers", (int)c->pool_layers, "kernel_size", (int)c->kernel_size,
                         "in_channels", (int)c->in_channels);
    }
    const char *dt = ksm_dtype_name(m->dtype);
    return json_pack("{s:s, s:s, s:o, s:s, s:s, s:o, s:I, s:I, s:I, s:I, s:I, s:I}", "model_id",
                     m->model_id, "topology", ksm_topology_name(m->topology),
                     m->topology == KSM_TOPOLOGY_TRANSFORMER ? "transformer" : "cnn", host,
                     "device", m->device, "dtype", dt ? dt : "?", "slots", slots, "host_params",
                     (json_int_t)m->host_params, "seed_params", (json_int_t)m->seed_params,
                     "generation", (json_int_t)m->generation, "resident_bytes",
                     (json_int_t)m->resident_bytes, "train_step", (json_int_t)m->train_step,
                     "checkpoint_step", (json_int_t)m->checkpoint_step);
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

void ctl_print_gate_checks(const struct ksm_gate_result *g, const char *indent, FILE *f)
{
    if (g->n_checks > 0) {
        /* In the gate's order, each with the numbers behind it. */
        for (int i = 0; i < g->n_checks && i < KSM_GATE_MAX_CHECKS; i++) {
            const struct ksm_gate_check *c = &g->checks[i];
            fprintf(f, "%s%c %s%s%s\n", indent, c->passed ? '+' : '-', c->name,
                    c->detail[0] ? ": " : "", c->detail);
        }
        return;
    }
    /* A server without the details: esper's strings alone. */
    for (int i = 0; i < g->n_passed && i < KSM_GATE_MAX_CHECKS; i++)
        fprintf(f, "%s+ %s\n", indent, g->checks_passed[i]);
    for (int i = 0; i < g->n_failed && i < KSM_GATE_MAX_CHECKS; i++)
        fprintf(f, "%s- %s\n", indent, g->checks_failed[i]);
}

void ctl_print_gate(const struct ksm_gate_result *g, FILE *f)
{
    fprintf(f, "gate %s: %s (score %.4f)%s%s\n", ksm_gate_level_name(g->gate),
            g->passed ? "passed" : "FAILED", g->score, g->message[0] ? " - " : "", g->message);
    ctl_print_gate_checks(g, "  ", f);
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
    if (e->type == KSM_EV_SEED_GATE_EVALUATED) ctl_print_gate_checks(&e->gate, "        ", f);
}

// ---- Call results: JSON with --json, else tables and lines ----

void ctl_show_slot_report(bool json, const struct ksm_slot_report *r, FILE *f)
{
    if (json)
        ctl_json_print(ctl_json_slot_report(r), f);
    else
        ctl_print_slot_reports(r, 1, f);
}

void ctl_show_slot_reports(bool json, const struct ksm_slot_report *r, size_t n, FILE *f)
{
    if (json) {
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++) json_array_append_new(a, ctl_json_slot_report(&r[i]));
        ctl_json_print(json_pack("{s:o}", "slots", a), f);
    } else {
        ctl_print_slot_reports(r, n, f);
    }
}

void ctl_show_accepted(bool json, bool accepted, const struct ksm_slot_report *r, FILE *f)
{
    if (json) {
        ctl_json_print(
            json_pack("{s:b, s:o}", "accepted", accepted, "slot", ctl_json_slot_report(r)), f);
    } else {
        fprintf(f, "accepted: %s\n", accepted ? "yes" : "no (nothing to do)");
        ctl_print_slot_reports(r, 1, f);
    }
}

void ctl_show_advance(bool json, const struct ksm_gate_result *g, const struct ksm_slot_report *r,
                      FILE *f)
{
    if (json) {
        ctl_json_print(
            json_pack("{s:o, s:o}", "gate", ctl_json_gate(g), "slot", ctl_json_slot_report(r)), f);
    } else {
        ctl_print_gate(g, f);
        ctl_print_slot_reports(r, 1, f);
    }
}

void ctl_show_event(bool json, uint64_t sequence, const struct ksm_lifecycle_event *e, FILE *f)
{
    if (json) {
        json_t *j = ctl_json_event(sequence, e);
        json_dumpf(j, f, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
        fputc('\n', f);
        json_decref(j);
    } else {
        ctl_print_event(sequence, e, f);
    }
}

/* The model's row, then its slots. */
static void print_model_detail(const struct ksm_model_info *m, FILE *f)
{
    ctl_print_models(m, 1, f);
    fprintf(f, "\n");
    static const char *const h[] = {"SLOT", "ORDER", "CHANNELS", "SURFACE"};
    struct ctl_table *t = ctl_table_new(4, h);
    ctl_table_right(t, 1);
    ctl_table_right(t, 2);
    for (int i = 0; i < m->n_slots && i < KSM_MAX_SLOTS; i++) {
        ctl_table_row(t);
        ctl_table_cell(t, "%s", m->slots[i].slot_id);
        ctl_table_cell(t, "%u", m->slots[i].order);
        ctl_table_cell(t, "%u", m->slots[i].channels);
        ctl_table_cell(t, "%s", m->slots[i].surface ? m->slots[i].surface : "");
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_show_model(bool json, const struct ksm_model_info *m, FILE *f)
{
    if (json)
        ctl_json_print(ctl_json_model(m), f);
    else
        print_model_detail(m, f);
}

void ctl_show_models(bool json, const struct ksm_model_info *m, size_t n, FILE *f)
{
    if (json) {
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++) json_array_append_new(a, ctl_json_model(&m[i]));
        ctl_json_print(json_pack("{s:o}", "models", a), f);
    } else {
        ctl_print_models(m, n, f);
    }
}

static json_t *json_strings(char *const *v, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_string(v[i]));
    return a;
}

void ctl_show_server_info(bool json, const struct ksm_client_server_info *s, const char *target,
                          FILE *f)
{
    if (json) {
        json_t *dev = json_array();
        for (size_t i = 0; i < s->n_devices; i++) {
            const struct ksm_client_device *d = &s->devices[i];
            json_array_append_new(dev,
                                  json_pack("{s:s, s:s, s:s, s:I, s:I}", "name", d->name, "kind",
                                            d->kind, "description", d->description, "total_bytes",
                                            (json_int_t)d->total_bytes, "memory_cap_bytes",
                                            (json_int_t)d->memory_cap_bytes));
        }
        ctl_json_print(
            json_pack("{s:s, s:s, s:b, s:o, s:o, s:o, s:o}", "name", s->name, "version", s->version,
                      "ready", s->ready, "extensions", json_strings(s->extensions, s->n_extensions),
                      "devices", dev, "cnn_blueprints",
                      json_strings(s->cnn_blueprints, s->n_cnn_blueprints),
                      "transformer_blueprints",
                      json_strings(s->transformer_blueprints, s->n_transformer_blueprints)),
            f);
        return;
    }
    fprintf(f, "server      %s %s (%s)\n", s->name, s->version, s->ready ? "ready" : "not ready");
    fprintf(f, "target      %s\n", target);
    fprintf(f, "extensions ");
    for (size_t i = 0; i < s->n_extensions; i++) fprintf(f, " %s", s->extensions[i]);
    fprintf(f, "\ncnn         ");
    for (size_t i = 0; i < s->n_cnn_blueprints; i++)
        fprintf(f, "%s%s", i ? " " : "", s->cnn_blueprints[i]);
    fprintf(f, "\ntransformer ");
    for (size_t i = 0; i < s->n_transformer_blueprints; i++)
        fprintf(f, "%s%s", i ? " " : "", s->transformer_blueprints[i]);
    fprintf(f, "\n\n");
    static const char *const h[] = {"DEVICE", "KIND", "TOTAL", "CAP", "DESCRIPTION"};
    struct ctl_table *t = ctl_table_new(5, h);
    ctl_table_right(t, 2);
    ctl_table_right(t, 3);
    for (size_t i = 0; i < s->n_devices; i++) {
        const struct ksm_client_device *d = &s->devices[i];
        char b1[32], b2[32];
        ctl_table_row(t);
        ctl_table_cell(t, "%s", d->name);
        ctl_table_cell(t, "%s", d->kind);
        ctl_table_cell(t, "%s", ctl_bytes(d->total_bytes, b1, sizeof b1));
        ctl_table_cell(t, "%s",
                       d->memory_cap_bytes ? ctl_bytes(d->memory_cap_bytes, b2, sizeof b2) : "-");
        ctl_table_cell(t, "%s", d->description);
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_show_load_result(bool json, const char *model_id, const struct ksm_load_result *r, FILE *f)
{
    if (json) {
        ctl_json_print(json_pack("{s:o, s:o, s:o}", "loaded", json_strings(r->loaded, r->n_loaded),
                                 "missing", json_strings(r->missing, r->n_missing), "unexpected",
                                 json_strings(r->unexpected, r->n_unexpected)),
                       f);
        return;
    }
    fprintf(f, "loaded %zu tensors into %s; %zu missing, %zu unexpected\n", r->n_loaded, model_id,
            r->n_missing, r->n_unexpected);
    for (size_t i = 0; i < r->n_missing; i++) fprintf(f, "  missing    %s\n", r->missing[i]);
    for (size_t i = 0; i < r->n_unexpected; i++) fprintf(f, "  unexpected %s\n", r->unexpected[i]);
}

/* The tensor's description, then per row (at most 16) its argmax and first values. */
static void print_tensor_rows(const ksm_tensor *t, FILE *f)
{
    char d[64];
    fprintf(f, "output %s", ksm_tensor_describe(t, d, sizeof d));
    if (t->ndim < 1) {
        fputc('\n', f);
        return;
    }
    int64_t rows = t->shape[0], cols = rows ? ksm_tensor_numel(t) / rows : 0;
    fputc('\n', f);
    for (int64_t r = 0; r < rows && r < 16; r++) {
        int64_t best = 0;
        for (int64_t c = 1; c < cols; c++)
            if (ctl_tensor_get(t, r * cols + c) > ctl_tensor_get(t, r * cols + best)) best = c;
        fprintf(f, "  row %" PRId64 ": argmax %" PRId64 " [", r, best);
        for (int64_t c = 0; c < cols && c < 8; c++)
            fprintf(f, "%s%.5g", c ? ", " : "", ctl_tensor_get(t, r * cols + c));
        fprintf(f, "%s]\n", cols > 8 ? ", ..." : "");
    }
    if (rows > 16) fprintf(f, "  ... %" PRId64 " more rows\n", rows - 16);
}

void ctl_show_forward(bool json, const struct ksm_forward_result *r, const char *output_file,
                      FILE *f)
{
    if (json) {
        json_t *j = json_pack("{s:I, s:I}", "model_generation", (json_int_t)r->model_generation,
                              "compute_ns", (json_int_t)r->compute_ns);
        if (output_file)
            json_object_set_new(j, "output_file", json_string(output_file));
        else
            json_object_set_new(j, "output", ctl_json_tensor(&r->output));
        ctl_json_print(j, f);
        return;
    }
    fprintf(f, "generation %" PRIu64 ", compute %.3f ms\n", r->model_generation,
            (double)r->compute_ns / 1e6);
    if (output_file) {
        char d[64];
        fprintf(f, "wrote %s to %s\n", ksm_tensor_describe(&r->output, d, sizeof d), output_file);
    } else {
        print_tensor_rows(&r->output, f);
    }
}

void ctl_show_evaluate(bool json, const struct ksm_evaluate_result *r, FILE *f)
{
    if (json) {
        json_t *res = json_array();
        for (size_t i = 0; i < r->n; i++) {
            const struct ksm_config_result *c = &r->results[i];
            json_array_append_new(res,
                                  json_pack("{s:s, s:f, s:f, s:I, s:I}", "name", c->name, "loss",
                                            c->loss, "accuracy", c->accuracy, "correct",
                                            (json_int_t)c->correct, "total", (json_int_t)c->total));
        }
        json_t *o =
            json_pack("{s:o, s:I, s:I}", "results", res, "model_generation",
                      (json_int_t)r->model_generation, "compute_ns", (json_int_t)r->compute_ns);
        if (r->n_shapley > 0) {
            json_t *sh = json_array(), *it = json_array();
            for (size_t i = 0; i < r->n_shapley; i++) {
                const struct ksm_shapley_estimate *e = &r->shapley[i];
                json_array_append_new(
                    sh, json_pack("{s:s, s:f, s:f, s:I, s:s, s:f}", "slot_id", e->slot_id, "mean",
                                  e->mean, "std", e->std, "n_samples", (json_int_t)e->n_samples,
                                  "algorithm", e->algorithm, "marginal", e->marginal));
            }
            for (size_t i = 0; i < r->n_interactions; i++)
                json_array_append_new(it, json_pack("{s:s, s:s, s:f}", "slot_a",
                                                    r->interactions[i].slot_a, "slot_b",
                                                    r->interactions[i].slot_b, "interaction",
                                                    r->interactions[i].interaction));
            json_object_set_new(o, "shapley", sh);
            json_object_set_new(o, "interactions", it);
        }
        ctl_json_print(o, f);
        return;
    }
    static const char *const h[] = {"CONFIG", "LOSS", "ACCURACY", "CORRECT", "TOTAL"};
    struct ctl_table *t = ctl_table_new(5, h);
    for (int c = 1; c < 5; c++) ctl_table_right(t, c);
    for (size_t i = 0; i < r->n; i++) {
        ctl_table_row(t);
        ctl_table_cell(t, "%s", r->results[i].name);
        ctl_table_cell(t, "%.6f", r->results[i].loss);
        ctl_table_cell(t, "%.2f%%", r->results[i].accuracy);
        ctl_table_cell(t, "%" PRIu64, r->results[i].correct);
        ctl_table_cell(t, "%" PRIu64, r->results[i].total);
    }
    if (r->n > 0) ctl_table_print(t, f);
    ctl_table_free(t);
    if (r->n_shapley > 0) {
        /* Attribution: accuracy points (docs/evaluate.md#attribution). */
        static const char *const hs[] = {"SEED",    "SHAPLEY",  "STD",
                                         "SAMPLES", "MARGINAL", "ALGORITHM"};
        t = ctl_table_new(6, hs);
        for (int c = 1; c < 5; c++) ctl_table_right(t, c);
        for (size_t i = 0; i < r->n_shapley; i++) {
            const struct ksm_shapley_estimate *e = &r->shapley[i];
            ctl_table_row(t);
            ctl_table_cell(t, "%s", e->slot_id);
            ctl_table_cell(t, "%+.4f", e->mean);
            ctl_table_cell(t, "%.4f", e->std);
            ctl_table_cell(t, "%u", e->n_samples);
            ctl_table_cell(t, "%+.4f", e->marginal);
            ctl_table_cell(t, "%s", e->algorithm);
        }
        ctl_table_print(t, f);
        ctl_table_free(t);
    }
    if (r->n_interactions > 0) {
        static const char *const hi[] = {"PAIR", "INTERACTION"};
        t = ctl_table_new(2, hi);
        ctl_table_right(t, 1);
        for (size_t i = 0; i < r->n_interactions; i++) {
            ctl_table_row(t);
            ctl_table_cell(t, "%s+%s", r->interactions[i].slot_a, r->interactions[i].slot_b);
            ctl_table_cell(t, "%+.4f", r->interactions[i].interaction);
        }
        ctl_table_print(t, f);
        ctl_table_free(t);
    }
    fprintf(f, "generation %" PRIu64 ", compute %.3f ms\n", r->model_generation,
            (double)r->compute_ns / 1e6);
}

void ctl_show_memory(bool json, const struct ksm_client_memory_stats *s, FILE *f)
{
    if (json) {
        json_t *a = json_array();
        for (size_t i = 0; i < s->n; i++) {
            json_t *d = ctl_json_mem_stats(&s->devices[i].stats);
            json_object_set_new(d, "device", json_string(s->devices[i].device));
            json_t *pm = json_object();
            for (size_t k = 0; k < s->devices[i].n_per_model; k++)
                json_object_set_new(pm, s->devices[i].per_model[k].model_id,
                                    json_integer((json_int_t)s->devices[i].per_model[k].bytes));
            json_object_set_new(d, "per_model_bytes", pm);
            json_array_append_new(a, d);
        }
        ctl_json_print(json_pack("{s:o}", "devices", a), f);
        return;
    }
    static const char *const h[] = {"DEVICE",   "ALLOCATED", "PEAK",       "RESERVED", "ACTIVE",
                                    "SEGMENTS", "ALLOCS",    "CACHE_HITS", "OOMS",     "CAP"};
    struct ctl_table *t = ctl_table_new(10, h);
    for (int c = 1; c < 10; c++) ctl_table_right(t, c);
    bool any_model = false;
    for (size_t i = 0; i < s->n; i++) {
        const struct ksm_mem_stats *m = &s->devices[i].stats;
        const struct ksm_pool_stats *a = &m->pool[KSM_POOL_ALL];
        char b1[32], b2[32], b3[32], b4[32], b5[32];
        ctl_table_row(t);
        ctl_table_cell(t, "%s", s->devices[i].device);
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->allocated_bytes.current, b1, sizeof b1));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->allocated_bytes.peak, b2, sizeof b2));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->reserved_bytes.current, b3, sizeof b3));
        ctl_table_cell(t, "%s", ctl_bytes((uint64_t)a->active_bytes.current, b4, sizeof b4));
        ctl_table_cell(t, "%" PRId64, a->segment.current);
        ctl_table_cell(t, "%" PRId64, a->allocation.current);
        ctl_table_cell(t, "%" PRIu64, m->cache_hits);
        ctl_table_cell(t, "%" PRIu64, m->num_ooms);
        ctl_table_cell(t, "%s",
                       m->memory_cap_bytes ? ctl_bytes(m->memory_cap_bytes, b5, sizeof b5) : "-");
        any_model |= s->devices[i].n_per_model > 0;
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
    if (!any_model) return;
    fprintf(f, "\n");
    static const char *const h2[] = {"DEVICE", "MODEL", "BYTES"};
    t = ctl_table_new(3, h2);
    ctl_table_right(t, 2);
    for (size_t i = 0; i < s->n; i++)
        for (size_t k = 0; k < s->devices[i].n_per_model; k++) {
            char b[32];
            ctl_table_row(t);
            ctl_table_cell(t, "%s", s->devices[i].device);
            ctl_table_cell(t, "%s", s->devices[i].per_model[k].model_id);
            ctl_table_cell(t, "%s", ctl_bytes(s->devices[i].per_model[k].bytes, b, sizeof b));
        }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_show_caches(bool json, const struct ksm_client_cache_counters *v, size_t n, FILE *f)
{
    if (json) {
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++)
            json_array_append_new(a, ctl_json_cache_counters(v[i].model_id, &v[i].c));
        ctl_json_print(json_pack("{s:o}", "caches", a), f);
        return;
    }
    static const char *const h[] = {"CACHE",     "MODEL",   "SLOT",    "HITS",     "MISSES",
                                    "EVICTIONS", "INVALID", "ENTRIES", "CAPACITY", "BYTES"};
    struct ctl_table *t = ctl_table_new(10, h);
    for (int c = 3; c < 10; c++) ctl_table_right(t, c);
    for (size_t i = 0; i < n; i++) {
        const struct ksm_cache_counters *c = &v[i].c;
        char b[32];
        ctl_table_row(t);
        ctl_table_cell(t, "%s", c->cache);
        ctl_table_cell(t, "%s", v[i].model_id);
        ctl_table_cell(t, "%s", c->slot_id[0] ? c->slot_id : "-");
        ctl_table_cell(t, "%" PRIu64, c->hits);
        ctl_table_cell(t, "%" PRIu64, c->misses);
        ctl_table_cell(t, "%" PRIu64, c->evictions);
        ctl_table_cell(t, "%" PRIu64, c->invalidations);
        ctl_table_cell(t, "%" PRIu64, c->entries);
        if (c->capacity)
            ctl_table_cell(t, "%" PRIu64, c->capacity);
        else
            ctl_table_cell(t, "-");
        ctl_table_cell(t, "%s", ctl_bytes(c->bytes, b, sizeof b));
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_show_train_step(bool json, uint32_t epoch, const struct ksm_train_result *r, FILE *f)
{
    if (json) {
        json_t *seeds = json_array();
        for (int i = 0; i < r->n_seeds; i++) {
            const struct ksm_seed_grad_stats *s = &r->seeds[i];
            json_array_append_new(seeds,
                                  json_pack("{s:s, s:f, s:I, s:f, s:f, s:b, s:b}", "slot_id",
                                            s->slot_id, "grad_norm", s->grad_norm, "param_count",
                                            (json_int_t)s->param_count, "normalized_ratio",
                                            s->normalized_ratio, "gradient_health",
                                            s->gradient_health, "has_vanishing", s->has_vanishing,
                                            "has_exploding", s->has_exploding));
        }
        ctl_json_print(
            json_pack("{s:I, s:I, s:f, s:I, s:I, s:b, s:f, s:o}", "epoch", (json_int_t)epoch,
                      "train_step", (json_int_t)r->train_step, "loss", r->loss, "correct",
                      (json_int_t)r->correct, "total", (json_int_t)r->total, "gradients_collected",
                      r->gradients_collected, "host_grad_norm", r->host_grad_norm, "seeds", seeds),
            f);
        return;
    }
    fprintf(f, "epoch %" PRIu32 "  step %" PRIu64 "  loss %.6f  correct %" PRIu64 "/%" PRIu64,
            epoch, r->train_step, r->loss, r->correct, r->total);
    if (r->gradients_collected) fprintf(f, "  host |g| %.4g", r->host_grad_norm);
    for (int i = 0; i < r->n_seeds; i++)
        fprintf(f, "  %s |g| %.4g ratio %.3g health %.2f", r->seeds[i].slot_id,
                r->seeds[i].grad_norm, r->seeds[i].normalized_ratio, r->seeds[i].gradient_health);
    fputc('\n', f);
}

void ctl_show_checkpoint(bool json, const struct ksm_client_checkpoint *v, size_t n, FILE *f)
{
    if (json) {
        json_t *o = json_object();
        for (size_t i = 0; i < n; i++) json_object_set_new(o, v[i].model_id, ju64(v[i].train_step));
        ctl_json_print(json_pack("{s:o}", "checkpoint_step", o), f);
        return;
    }
    static const char *const h[] = {"MODEL", "CHECKPOINT_STEP"};
    struct ctl_table *t = ctl_table_new(2, h);
    ctl_table_right(t, 1);
    for (size_t i = 0; i < n; i++) {
        ctl_table_row(t);
        ctl_table_cell(t, "%s", v[i].model_id);
        ctl_table_cell(t, "%" PRIu64, v[i].train_step);
    }
    ctl_table_print(t, f);
    ctl_table_free(t);
}

void ctl_show_training(bool json, const char *model_id, const struct ksm_training_config *c,
                       uint64_t train_step, FILE *f)
{
    if (json) {
        ctl_json_print(
            json_pack("{s:s, s:{s:f, s:f, s:f, s:f, s:b}, s:{s:f, s:f, s:f, s:f, s:b}, s:f, s:I, "
                      "s:f, s:f, s:f, s:I}",
                      "model_id", model_id, "host", "lr", c->host.lr, "momentum", c->host.momentum,
                      "weight_decay", c->host.weight_decay, "dampening", c->host.dampening,
                      "nesterov", c->host.nesterov, "seed", "lr", c->seed.lr, "momentum",
                      c->seed.momentum, "weight_decay", c->seed.weight_decay, "dampening",
                      c->seed.dampening, "nesterov", c->seed.nesterov, "max_grad_norm",
                      c->max_grad_norm, "gradient_telemetry_stride",
                      (json_int_t)c->gradient_telemetry_stride, "gradient_ratio_ema",
                      c->gradient_ratio_ema, "vanishing_threshold", c->vanishing_threshold,
                      "exploding_threshold", c->exploding_threshold, "train_step",
                      (json_int_t)train_step),
            f);
        return;
    }
    fprintf(f, "model %s: %" PRIu64 " steps\n", model_id, train_step);
    const struct ksm_sgd_settings *s[2] = {&c->host, &c->seed};
    for (int i = 0; i < 2; i++)
        fprintf(f, "  %-5s SGD lr %g momentum %g weight_decay %g dampening %g nesterov %s\n",
                i ? "seeds" : "host", s[i]->lr, s[i]->momentum, s[i]->weight_decay, s[i]->dampening,
                s[i]->nesterov ? "yes" : "no");
    fprintf(f, "  max_grad_norm %g  gradient statistics every %" PRIu32 " steps  ratio EMA %g\n",
            c->max_grad_norm, c->gradient_telemetry_stride, c->gradient_ratio_ema);
    fprintf(f, "  thresholds: vanishing %g, exploding %g\n", c->vanishing_threshold,
            c->exploding_threshold);
}
