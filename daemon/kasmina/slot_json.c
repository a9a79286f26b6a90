/*
 * The slot's extra state (docs/weights.md#extra-state, schema version 1; esper SeedSlot
 * get_extra_state / set_extra_state, SeedState / SeedMetrics (schema 2) / SeedTelemetry
 * (schema 1) / AlphaController to_dict / from_dict) as JSON.
 *
 * Writing follows esper's key order. Reals are printed with 17 significant digits so that
 * parse(write(x)) == x; timestamps as Python's datetime.isoformat() of an aware UTC time
 * ("2026-06-21T10:00:00.123456+00:00", no fraction when the microseconds are 0), so they keep
 * microseconds, not nanoseconds.
 *
 * Parsing is stricter than esper: every key esper writes is required (esper's own optional
 * metrics keys counterfactual_contribution, _prev_contribution, contribution_velocity may be
 * missing), with its type (an int where esper writes an int, a number or null for floats),
 * and values must lie in their ranges. Two kasmina additions that esper ignores keep a slot's
 * round trip exact: metrics.auto_pruned / auto_prune_reason and the top-level
 * _kasmina_pending_prune_reason / _kasmina_pending_prune_initiator (written when set). A third
 * keeps RecordMetrics' gradient ratio EMA across a restart: _kasmina_gradient_ratio_ema, a number
 * (written when not 0.0) or null (the EMA was removed with the last seed); absent = 0.0 as at
 * creation (none for a seed in cooldown). A fourth keeps a slot's own auto-forward gates
 * (ConfigureSlot): _kasmina_auto_forward_gates, a list of gate levels (1, 2, 3), written when it
 * differs from the model's default; absent = the model's default.
 */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/slot.h"

#define EXTRA_STATE_VERSION      1
#define METRICS_SCHEMA_VERSION   2
#define TELEMETRY_SCHEMA_VERSION 1

/* ---- ISO-8601 timestamps ---- */

static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, int *m, int *d)
{
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

static void format_iso(int64_t ns, char out[40])
{
    int64_t q = ns / 1000000000, r = ns % 1000000000;
    if (r < 0) {
        q--;
        r += 1000000000;
    }
    int64_t days = q / 86400, sod = q % 86400;
    if (sod < 0) {
        days--;
        sod += 86400;
    }
    int64_t y;
    int m, d;
    civil_from_days(days, &y, &m, &d);
    int us = (int)(r / 1000);
    int n = snprintf(out, 40, "%04" PRId64 "-%02d-%02dT%02d:%02d:%02d", y, m, d, (int)(sod / 3600),
                     (int)(sod / 60 % 60), (int)(sod % 60));
    if (us) n += snprintf(out + n, 40 - (size_t)n, ".%06d", us);
    snprintf(out + n, 40 - (size_t)n, "+00:00");
}

static bool digits(const char *s, int n, int *v)
{
    int x = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        x = x * 10 + (s[i] - '0');
    }
    *v = x;
    return true;
}

/* YYYY-MM-DD(T| )HH:MM:SS[.f{1,9}][Z|+HH:MM|-HH:MM|+HHMM|-HHMM]; no offset = UTC. */
static bool parse_iso(const char *s, int64_t *out)
{
    int y, mo, d, h, mi, sec;
    if (strlen(s) < 19 || !digits(s, 4, &y) || s[4] != '-' || !digits(s + 5, 2, &mo) ||
        s[7] != '-' || !digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != ' ') ||
        !digits(s + 11, 2, &h) || s[13] != ':' || !digits(s + 14, 2, &mi) || s[16] != ':' ||
        !digits(s + 17, 2, &sec))
        return false;
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59 || sec > 59) return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[mo - 1] + (mo == 2 && leap)) return false;
    const char *p = s + 19;
    int64_t frac = 0;
    if (*p == '.') {
        p++;
        int nd = 0;
        while (*p >= '0' && *p <= '9') {
            if (++nd > 9) return false;
            frac = frac * 10 + (*p++ - '0');
        }
        if (nd == 0) return false;
        for (int i = nd; i < 9; i++) frac *= 10;
    }
    int64_t off = 0;
    if (*p == 'Z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p == '-' ? -1 : 1, oh, om;
        p++;
        if (!digits(p, 2, &oh)) return false;
        p += 2;
        if (*p == ':') p++;
        if (!digits(p, 2, &om)) return false;
        p += 2;
        if (oh > 23 || om > 59) return false;
        off = sign * (int64_t)(oh * 3600 + om * 60);
    }
    if (*p) return false;
    int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - off;
    if (secs > INT64_MAX / 1000000000 - 1 || secs < INT64_MIN / 1000000000 + 1) return false;
    *out = secs * 1000000000 + frac;
    return true;
}

/* ---- writing ---- */

static json_t *jstr_or_null(const char *s) { return (s && s[0]) ? json_string(s) : json_null(); }

static json_t *jtime(int64_t ns)
{
    char b[40];
    format_iso(ns, b);
    return json_string(b);
}

static json_t *controller_json(const struct ksm_alpha_controller *c)
{
    json_t *o = json_object();
    json_object_set_new(o, "alpha", json_real(c->alpha));
    json_object_set_new(o, "alpha_start", json_real(c->alpha_start));
    json_object_set_new(o, "alpha_target", json_real(c->alpha_target));
    json_object_set_new(o, "alpha_mode", json_integer(c->mode));
    json_object_set_new(o, "alpha_curve", json_integer(c->curve));
    json_object_set_new(o, "alpha_steepness", json_real(c->steepness));
    json_object_set_new(o, "alpha_steps_total", json_integer(c->steps_total));
    json_object_set_new(o, "alpha_steps_done", json_integer(c->steps_done));
    return o;
}

static json_t *metrics_json(const struct ksm_seed_metrics *m)
{
    json_t *o = json_object();
    json_object_set_new(o, "_schema_version", json_integer(METRICS_SCHEMA_VERSION));
    json_object_set_new(o, "epochs_total", json_integer(m->epochs_total));
    json_object_set_new(o, "epochs_in_current_stage", json_integer(m->epochs_in_current_stage));
    json_object_set_new(o, "initial_val_accuracy", json_real(m->initial_val_accuracy));
    json_object_set_new(o, "current_val_accuracy", json_real(m->current_val_accuracy));
    json_object_set_new(o, "best_val_accuracy", json_real(m->best_val_accuracy));
    json_object_set_new(o, "accuracy_at_stage_start", json_real(m->accuracy_at_stage_start));
    json_object_set_new(o, "accuracy_at_blending_start", json_real(m->accuracy_at_blending_start));
    json_object_set_new(o, "gradient_norm_avg", json_real(m->gradient_norm_avg));
    json_object_set_new(o, "current_alpha", json_real(m->current_alpha));
    json_object_set_new(o, "alpha_ramp_step", json_integer(m->alpha_ramp_step));
    json_object_set_new(o, "counterfactual_contribution",
                        m->has_counterfactual ? json_real(m->counterfactual_contribution)
                                              : json_null());
    json_object_set_new(o, "_prev_contribution",
                        m->has_prev_contribution ? json_real(m->prev_contribution) : json_null());
    json_object_set_new(o, "contribution_velocity", json_real(m->contribution_velocity));
    json_object_set_new(o, "_blending_started", json_boolean(m->blending_started));
    json_object_set_new(o, "seed_gradient_norm_ratio",
                        m->has_grad_ratio ? json_real(m->seed_gradient_norm_ratio) : json_null());
    json_object_set_new(o, "host_param_count", json_integer((json_int_t)m->host_param_count));
    json_object_set_new(o, "seed_param_count", json_integer((json_int_t)m->seed_param_count));
    json_object_set_new(o, "interaction_sum", json_real(m->interaction_sum));
    json_object_set_new(o, "boost_received", json_real(m->boost_received));
    json_object_set_new(o, "upstream_alpha_sum", json_real(m->upstream_alpha_sum));
    json_object_set_new(o, "downstream_alpha_sum", json_real(m->downstream_alpha_sum));
    json_object_set_new(o, "auto_pruned", json_boolean(m->auto_pruned));
    json_object_set_new(o, "auto_prune_reason", json_string(m->auto_prune_reason));
    return o;
}

static json_t *telemetry_json(const struct ksm_seed_telemetry *t,
                              const struct ksm_telemetry_sync *y)
{
    json_t *o = json_object();
    json_object_set_new(o, "schema_version", json_integer(TELEMETRY_SCHEMA_VERSION));
    json_object_set_new(o, "seed_id", json_string(y->seed_id));
    json_object_set_new(o, "blueprint_id", json_string(y->blueprint_id));
    json_object_set_new(o, "layer_id", json_string(y->layer_id));
    json_object_set_new(o, "gradient_norm",
                        t->has_gradient_norm ? json_real(t->gradient_norm) : json_null());
    json_object_set_new(o, "gradient_health",
                        t->has_gradient_health ? json_real(t->gradient_health) : json_null());
    json_object_set_new(o, "has_vanishing",
                        t->has_vanishing_flag ? json_boolean(t->has_vanishing) : json_null());
    json_object_set_new(o, "has_exploding",
                        t->has_exploding_flag ? json_boolean(t->has_exploding) : json_null());
    json_object_set_new(o, "accuracy", json_real(y->accuracy));
    json_object_set_new(o, "accuracy_delta", json_real(y->accuracy_delta));
    json_object_set_new(o, "epochs_in_stage", json_integer(y->epochs_in_stage));
    json_object_set_new(o, "stage", json_integer(y->stage));
    json_object_set_new(o, "alpha", json_real(y->alpha));
    json_object_set_new(o, "alpha_target", json_real(y->alpha_target));
    json_object_set_new(o, "alpha_mode", json_integer(y->alpha_mode));
    json_object_set_new(o, "alpha_steps_total", json_integer(y->alpha_steps_total));
    json_object_set_new(o, "alpha_steps_done", json_integer(y->alpha_steps_done));
    json_object_set_new(o, "time_to_target", json_integer(y->time_to_target));
    json_object_set_new(o, "alpha_velocity", json_real(y->alpha_velocity));
    json_object_set_new(o, "alpha_algorithm", json_integer(y->alpha_algorithm));
    json_object_set_new(o, "epoch", json_integer(t->epoch));
    json_object_set_new(o, "max_epochs", json_integer(t->max_epochs));
    json_object_set_new(o, "captured_at", jtime(y->captured_at_ns));
    json_object_set_new(o, "blend_tempo_epochs", json_integer(y->blend_tempo_epochs));
    json_object_set_new(o, "blending_velocity", json_real(y->blending_velocity));
    json_object_set_new(o, "alpha_curve", json_string(y->alpha_curve));
    return o;
}

static json_t *seed_state_json(const struct ksm_slot *s)
{
    const struct ksm_seed_state *st = &s->state;
    json_t *o = json_object();
    json_object_set_new(o, "seed_id", json_string(st->seed_id));
    json_object_set_new(o, "blueprint_id", json_string(st->blueprint_id));
    json_object_set_new(o, "slot_id", json_string(s->id));
    json_object_set_new(o, "stage", json_integer(st->stage));
    json_object_set_new(o, "previous_stage", json_integer(st->previous_stage));
    json_object_set_new(o, "stage_entered_at", jtime(st->stage_entered_at_ns));
    json_object_set_new(o, "alpha", json_real(st->alpha));
    json_t *h = json_array();
    for (int i = 0; i < st->history_len; i++) {
        json_t *e = json_array();
        json_array_append_new(e, json_integer(st->history[i].stage));
        json_array_append_new(e, jtime(st->history[i].at_ns));
        json_array_append_new(h, e);
    }
    json_object_set_new(o, "stage_history", h);
    json_object_set_new(o, "metrics", metrics_json(&st->metrics));
    json_object_set_new(o, "telemetry", telemetry_json(&st->telemetry, &st->tel_sync));
    json_object_set_new(o, "alpha_controller", controller_json(&st->controller));
    json_object_set_new(o, "alpha_algorithm", json_integer(st->alpha_algorithm));
    json_object_set_new(o, "blend_tempo_epochs", json_integer(st->blend_tempo_epochs));
    json_object_set_new(o, "is_healthy", json_boolean(st->is_healthy));
    json_object_set_new(o, "is_paused", json_boolean(st->is_paused));
    json_object_set_new(o, "previous_epochs_in_stage", json_integer(st->previous_epochs_in_stage));
    return o;
}

char *ksm_slot_extra_state_json(const struct ksm_slot *s)
{
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "_extra_state_version", json_integer(EXTRA_STATE_VERSION));
    json_object_set_new(o, "isolate_gradients", json_boolean(s->isolate_gradients));
    json_object_set_new(o, "blend_algorithm_id", jstr_or_null(s->blend_algorithm_id));
    json_object_set_new(o, "blend_tempo_epochs",
                        s->has_blend_tempo ? json_integer(s->blend_tempo_epochs) : json_null());
    json_object_set_new(o, "blend_alpha_target",
                        s->has_blend_alpha_target ? json_real(s->blend_alpha_target) : json_null());
    enum ksm_topology topo = s->env ? s->env->topology : KSM_TOPOLOGY_CNN;
    json_object_set_new(o, "resolved_topology",
                        s->has_resolved_topology ? json_string(ksm_topology_name(topo))
                                                 : json_null());
    json_object_set_new(o, "seed_state", s->occupied ? seed_state_json(s) : json_null());
    json_t *cfg = json_null();
    if (s->gate) {
        cfg = json_object();
        json_object_set_new(cfg, "algorithm_id", json_string("gated"));
        json_object_set_new(cfg, "total_steps", json_integer(s->gate_total_steps));
        json_object_set_new(cfg, "current_step", json_integer(s->gate_current_step));
    }
    json_object_set_new(o, "alpha_schedule_config", cfg);
    if (s->pending_prune_reason[0])
        json_object_set_new(o, "_kasmina_pending_prune_reason",
                            json_string(s->pending_prune_reason));
    if (s->pending_prune_initiator[0])
        json_object_set_new(o, "_kasmina_pending_prune_initiator",
                            json_string(s->pending_prune_initiator));
    if (!s->has_grad_ratio_ema)
        json_object_set_new(o, "_kasmina_gradient_ratio_ema", json_null());
    else if (s->grad_ratio_ema != 0.0)
        json_object_set_new(o, "_kasmina_gradient_ratio_ema", json_real(s->grad_ratio_ema));
    if (s->auto_forward != (s->env ? s->env->auto_forward : 0u)) {
        json_t *g = json_array();
        for (int lvl = KSM_GATE_G1; lvl <= KSM_GATE_G3; lvl++)
            if (s->auto_forward & (1u << lvl)) json_array_append_new(g, json_integer(lvl));
        json_object_set_new(o, "_kasmina_auto_forward_gates", g);
    }
    char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(o);
    return text;
}

/* ---- parsing ---- */

struct pctx {
    char *err;
    size_t errlen;
    const char *path; /* "", "seed_state.", "seed_state.metrics.", ... */
};

static int perr(struct pctx *c, const char *key, const char *fmt, ...)
{
    if (c->err && c->errlen) {
        int n = snprintf(c->err, c->errlen, "extra state %s%s: ", c->path, key);
        if (n >= 0 && (size_t)n < c->errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(c->err + n, c->errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return KSM_EFORMAT;
}

static int need(struct pctx *c, json_t *o, const char *key, json_t **v)
{
    *v = json_object_get(o, key);
    if (!*v) return perr(c, key, "missing");
    return 0;
}

static int get_int(struct pctx *c, json_t *o, const char *key, int64_t lo, int64_t hi,
                   bool allow_null, bool *is_null, int64_t *out)
{
    json_t *v;
    int rc = need(c, o, key, &v);
    if (rc) return rc;
    if (is_null) *is_null = false;
    if (allow_null && json_is_null(v)) {
        *is_null = true;
        *out = 0;
        return 0;
    }
    if (!json_is_integer(v))
        return perr(c, key, "must be an integer%s", allow_null ? " or null" : "");
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return perr(c, key, "%" PRId64 " is outside [%" PRId64 ", %" PRId64 "]", (int64_t)x, lo,
                    hi);
    *out = x;
    return 0;
}

static int get_u32(struct pctx *c, json_t *o, const char *key, uint32_t *out)
{
    int64_t x = 0;
    int rc = get_int(c, o, key, 0, UINT32_MAX, false, NULL, &x);
    if (!rc) *out = (uint32_t)x;
    return rc;
}

static int get_num(struct pctx *c, json_t *o, const char *key, double lo, double hi,
                   bool allow_null, bool *is_null, double *out)
{
    json_t *v;
    int rc = need(c, o, key, &v);
    if (rc) return rc;
    if (is_null) *is_null = false;
    if (allow_null && json_is_null(v)) {
        *is_null = true;
        *out = 0.0;
        return 0;
    }
    if (!json_is_number(v)) return perr(c, key, "must be a number%s", allow_null ? " or null" : "");
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi) return perr(c, key, "%g is outside [%g, %g]", x, lo, hi);
    *out = x;
    return 0;
}

static int get_real(struct pctx *c, json_t *o, const char *key, double *out)
{
    return get_num(c, o, key, -HUGE_VAL, HUGE_VAL, false, NULL, out);
}

static int get_bool(struct pctx *c, json_t *o, const char *key, bool allow_null, bool *is_null,
                    bool *out)
{
    json_t *v;
    int rc = need(c, o, key, &v);
    if (rc) return rc;
    if (is_null) *is_null = false;
    if (allow_null && json_is_null(v)) {
        *is_null = true;
        *out = false;
        return 0;
    }
    if (!json_is_boolean(v))
        return perr(c, key, "must be a boolean%s", allow_null ? " or null" : "");
    *out = json_is_true(v);
    return 0;
}

static int get_str(struct pctx *c, json_t *o, const char *key, char *buf, size_t cap,
                   bool allow_null, bool *is_null)
{
    json_t *v;
    int rc = need(c, o, key, &v);
    if (rc) return rc;
    if (is_null) *is_null = false;
    if (allow_null && json_is_null(v)) {
        *is_null = true;
        buf[0] = '\0';
        return 0;
    }
    if (!json_is_string(v)) return perr(c, key, "must be a string%s", allow_null ? " or null" : "");
    const char *x = json_string_value(v);
    if (json_string_length(v) != strlen(x)) return perr(c, key, "contains a NUL character");
    if (strlen(x) >= cap) return perr(c, key, "is longer than %zu characters", cap - 1);
    memcpy(buf, x, strlen(x) + 1);
    return 0;
}

static int get_time(struct pctx *c, json_t *o, const char *key, int64_t *out)
{
    char b[64];
    int rc = get_str(c, o, key, b, sizeof b, false, NULL);
    if (rc) return rc;
    if (!parse_iso(b, out)) return perr(c, key, "'%s' is not an ISO-8601 time", b);
    return 0;
}

static int get_obj(struct pctx *c, json_t *o, const char *key, json_t **out)
{
    int rc = need(c, o, key, out);
    if (rc) return rc;
    if (!json_is_object(*out)) return perr(c, key, "must be an object");
    return 0;
}

static bool stage_value_ok(int64_t v) { return v >= 0 && v <= 10 && ksm_stage_valid((int)v); }

static int get_stage(struct pctx *c, json_t *o, const char *key, bool allow_null, int *out)
{
    int64_t v = 0;
    bool is_null;
    int rc = get_int(c, o, key, INT32_MIN, INT32_MAX, allow_null, &is_null, &v);
    if (rc) return rc;
    if (is_null) v = KSM_STAGE_UNKNOWN;
    if (!stage_value_ok(v))
        return perr(c, key, "%" PRId64 " is not a stage%s", v, v == 5 ? " (5 is retired)" : "");
    *out = (int)v;
    return 0;
}

static int parse_controller(struct pctx *c, json_t *o, struct ksm_alpha_controller *k)
{
    int64_t v;
    KSM_TRY(get_num(c, o, "alpha", 0, 1, false, NULL, &k->alpha));
    KSM_TRY(get_num(c, o, "alpha_start", 0, 1, false, NULL, &k->alpha_start));
    KSM_TRY(get_num(c, o, "alpha_target", 0, 1, false, NULL, &k->alpha_target));
    KSM_TRY(get_int(c, o, "alpha_mode", KSM_ALPHA_HOLD, KSM_ALPHA_DOWN, false, NULL, &v));
    k->mode = (enum ksm_alpha_mode)v;
    KSM_TRY(get_int(c, o, "alpha_curve", KSM_CURVE_LINEAR, KSM_CURVE_SIGMOID, false, NULL, &v));
    k->curve = (enum ksm_alpha_curve)v;
    KSM_TRY(get_num(c, o, "alpha_steepness", 0.1, HUGE_VAL, false, NULL, &k->steepness));
    KSM_TRY(get_u32(c, o, "alpha_steps_total", &k->steps_total));
    KSM_TRY(get_u32(c, o, "alpha_steps_done", &k->steps_done));
    if (k->steps_done > k->steps_total)
        return perr(c, "alpha_steps_done", "%u exceeds alpha_steps_total %u", k->steps_done,
                    k->steps_total);
    return 0;
}

/* esper's optional metrics keys: absent reads as None / 0.0. */
static int get_opt_num(struct pctx *c, json_t *o, const char *key, bool *has, double *out)
{
    if (!json_object_get(o, key)) {
        *has = false;
        *out = 0.0;
        return 0;
    }
    bool is_null;
    KSM_TRY(get_num(c, o, key, -HUGE_VAL, HUGE_VAL, true, &is_null, out));
    *has = !is_null;
    return 0;
}

static int parse_metrics(struct pctx *c, json_t *o, struct ksm_seed_metrics *m)
{
    int64_t v;
    bool is_null;
    KSM_TRY(get_int(c, o, "_schema_version", INT64_MIN, INT64_MAX, false, NULL, &v));
    if (v != METRICS_SCHEMA_VERSION)
        return perr(c, "_schema_version", "expected %d, got %" PRId64, METRICS_SCHEMA_VERSION, v);
    KSM_TRY(get_u32(c, o, "epochs_total", &m->epochs_total));
    KSM_TRY(get_u32(c, o, "epochs_in_current_stage", &m->epochs_in_current_stage));
    KSM_TRY(get_real(c, o, "initial_val_accuracy", &m->initial_val_accuracy));
    KSM_TRY(get_real(c, o, "current_val_accuracy", &m->current_val_accuracy));
    KSM_TRY(get_real(c, o, "best_val_accuracy", &m->best_val_accuracy));
    KSM_TRY(get_real(c, o, "accuracy_at_stage_start", &m->accuracy_at_stage_start));
    KSM_TRY(get_real(c, o, "accuracy_at_blending_start", &m->accuracy_at_blending_start));
    KSM_TRY(get_num(c, o, "gradient_norm_avg", 0, HUGE_VAL, false, NULL, &m->gradient_norm_avg));
    KSM_TRY(get_num(c, o, "current_alpha", 0, 1, false, NULL, &m->current_alpha));
    KSM_TRY(get_u32(c, o, "alpha_ramp_step", &m->alpha_ramp_step));
    KSM_TRY(get_opt_num(c, o, "counterfactual_contribution", &m->has_counterfactual,
                        &m->counterfactual_contribution));
    KSM_TRY(
        get_opt_num(c, o, "_prev_contribution", &m->has_prev_contribution, &m->prev_contribution));
    bool has_vel;
    KSM_TRY(get_opt_num(c, o, "contribution_velocity", &has_vel, &m->contribution_velocity));
    KSM_TRY(get_bool(c, o, "_blending_started", false, NULL, &m->blending_started));
    KSM_TRY(get_num(c, o, "seed_gradient_norm_ratio", 0, HUGE_VAL, true, &is_null,
                    &m->seed_gradient_norm_ratio));
    m->has_grad_ratio = !is_null;
    KSM_TRY(get_int(c, o, "host_param_count", 0, INT64_MAX, false, NULL, &v));
    m->host_param_count = (uint64_t)v;
    KSM_TRY(get_int(c, o, "seed_param_count", 0, INT64_MAX, false, NULL, &v));
    m->seed_param_count = (uint64_t)v;
    KSM_TRY(get_real(c, o, "interaction_sum", &m->interaction_sum));
    KSM_TRY(get_real(c, o, "boost_received", &m->boost_received));
    KSM_TRY(get_real(c, o, "upstream_alpha_sum", &m->upstream_alpha_sum));
    KSM_TRY(get_real(c, o, "downstream_alpha_sum", &m->downstream_alpha_sum));
    if (json_object_get(o, "auto_pruned"))
        KSM_TRY(get_bool(c, o, "auto_pruned", false, NULL, &m->auto_pruned));
    if (json_object_get(o, "auto_prune_reason"))
        KSM_TRY(get_str(c, o, "auto_prune_reason", m->auto_prune_reason,
                        sizeof m->auto_prune_reason, false, NULL));
    return 0;
}

static int parse_telemetry(struct pctx *c, json_t *o, struct ksm_seed_telemetry *t,
                           struct ksm_telemetry_sync *y)
{
    int64_t v;
    bool is_null;
    KSM_TRY(get_int(c, o, "schema_version", INT64_MIN, INT64_MAX, false, NULL, &v));
    if (v != TELEMETRY_SCHEMA_VERSION)
        return perr(c, "schema_version", "expected %d, got %" PRId64, TELEMETRY_SCHEMA_VERSION, v);
    KSM_TRY(get_str(c, o, "seed_id", y->seed_id, sizeof y->seed_id, false, NULL));
    KSM_TRY(get_str(c, o, "blueprint_id", y->blueprint_id, sizeof y->blueprint_id, false, NULL));
    KSM_TRY(get_str(c, o, "layer_id", y->layer_id, sizeof y->layer_id, false, NULL));
    KSM_TRY(get_num(c, o, "gradient_norm", 0, HUGE_VAL, true, &is_null, &t->gradient_norm));
    t->has_gradient_norm = !is_null;
    KSM_TRY(get_num(c, o, "gradient_health", 0, 1, true, &is_null, &t->gradient_health));
    t->has_gradient_health = !is_null;
    KSM_TRY(get_bool(c, o, "has_vanishing", true, &is_null, &t->has_vanishing));
    t->has_vanishing_flag = !is_null;
    KSM_TRY(get_bool(c, o, "has_exploding", true, &is_null, &t->has_exploding));
    t->has_exploding_flag = !is_null;
    KSM_TRY(get_real(c, o, "accuracy", &y->accuracy));
    KSM_TRY(get_real(c, o, "accuracy_delta", &y->accuracy_delta));
    KSM_TRY(get_u32(c, o, "epochs_in_stage", &y->epochs_in_stage));
    int stage;
    KSM_TRY(get_stage(c, o, "stage", false, &stage));
    y->stage = stage;
    KSM_TRY(get_num(c, o, "alpha", 0, 1, false, NULL, &y->alpha));
    KSM_TRY(get_num(c, o, "alpha_target", 0, 1, false, NULL, &y->alpha_target));
    KSM_TRY(get_int(c, o, "alpha_mode", KSM_ALPHA_HOLD, KSM_ALPHA_DOWN, false, NULL, &v));
    y->alpha_mode = (int)v;
    KSM_TRY(get_u32(c, o, "alpha_steps_total", &y->alpha_steps_total));
    KSM_TRY(get_u32(c, o, "alpha_steps_done", &y->alpha_steps_done));
    KSM_TRY(get_u32(c, o, "time_to_target", &y->time_to_target));
    KSM_TRY(get_real(c, o, "alpha_velocity", &y->alpha_velocity));
    KSM_TRY(get_int(c, o, "alpha_algorithm", KSM_ALGO_ADD, KSM_ALGO_GATE, false, NULL, &v));
    y->alpha_algorithm = (int)v;
    KSM_TRY(get_u32(c, o, "epoch", &t->epoch));
    KSM_TRY(get_u32(c, o, "max_epochs", &t->max_epochs));
    KSM_TRY(get_time(c, o, "captured_at", &y->captured_at_ns));
    KSM_TRY(get_u32(c, o, "blend_tempo_epochs", &y->blend_tempo_epochs));
    KSM_TRY(get_real(c, o, "blending_velocity", &y->blending_velocity));
    KSM_TRY(get_str(c, o, "alpha_curve", y->alpha_curve, sizeof y->alpha_curve, false, NULL));
    return 0;
}

static int parse_seed_state(struct pctx *c, json_t *o, struct ksm_slot *s)
{
    struct ksm_seed_state *st = &s->state;
    memset(st, 0, sizeof *st);
    char slot_id[KSM_SLOT_ID_MAX];
    int stage;
    int64_t v;
    KSM_TRY(get_str(c, o, "seed_id", st->seed_id, sizeof st->seed_id, false, NULL));
    KSM_TRY(get_str(c, o, "blueprint_id", st->blueprint_id, sizeof st->blueprint_id, false, NULL));
    if (!st->seed_id[0]) return perr(c, "seed_id", "is empty");
    if (!st->blueprint_id[0]) return perr(c, "blueprint_id", "is empty");
    KSM_TRY(get_str(c, o, "slot_id", slot_id, sizeof slot_id, false, NULL));
    if (strcmp(slot_id, s->id))
        return perr(c, "slot_id", "'%s' is not this slot (%s)", slot_id, s->id);
    KSM_TRY(get_stage(c, o, "stage", false, &stage));
    if (stage == KSM_STAGE_UNKNOWN || stage == KSM_STAGE_DORMANT)
        return perr(c, "stage", "%s is not a stage a seed can be restored in",
                    ksm_stage_name(stage));
    st->stage = (enum ksm_stage)stage;
    KSM_TRY(get_stage(c, o, "previous_stage", true, &stage));
    st->previous_stage = (enum ksm_stage)stage;
    KSM_TRY(get_time(c, o, "stage_entered_at", &st->stage_entered_at_ns));
    KSM_TRY(get_num(c, o, "alpha", 0, 1, false, NULL, &st->alpha));

    json_t *h;
    KSM_TRY(need(c, o, "stage_history", &h));
    if (!json_is_array(h)) return perr(c, "stage_history", "must be a list");
    size_t n = json_array_size(h);
    size_t first = n > KSM_STAGE_HISTORY_MAX ? n - KSM_STAGE_HISTORY_MAX : 0; /* deque maxlen */
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(h, i);
        json_t *es = json_array_get(e, 0), *et = json_array_get(e, 1);
        if (!json_is_array(e) || json_array_size(e) != 2 || !json_is_integer(es) ||
            !json_is_string(et))
            return perr(c, "stage_history", "entry %zu must be [stage, time]", i);
        int64_t at;
        if (!stage_value_ok(json_integer_value(es)))
            return perr(c, "stage_history", "entry %zu has no valid stage", i);
        if (!parse_iso(json_string_value(et), &at))
            return perr(c, "stage_history", "entry %zu has no ISO-8601 time", i);
        if (i < first) continue;
        st->history[st->history_len].stage = (enum ksm_stage)json_integer_value(es);
        st->history[st->history_len].at_ns = at;
        st->history_len++;
    }

    json_t *sub;
    const char *path = c->path;
    KSM_TRY(get_obj(c, o, "metrics", &sub));
    c->path = "seed_state.metrics.";
    KSM_TRY(parse_metrics(c, sub, &st->metrics));
    c->path = path;
    KSM_TRY(get_obj(c, o, "telemetry", &sub));
    c->path = "seed_state.telemetry.";
    KSM_TRY(parse_telemetry(c, sub, &st->telemetry, &st->tel_sync));
    c->path = path;
    KSM_TRY(get_obj(c, o, "alpha_controller", &sub));
    c->path = "seed_state.alpha_controller.";
    KSM_TRY(parse_controller(c, sub, &st->controller));
    c->path = path;
    st->controller.alpha = st->alpha; /* state.alpha is the source of truth */

    KSM_TRY(get_int(c, o, "alpha_algorithm", KSM_ALGO_ADD, KSM_ALGO_GATE, false, NULL, &v));
    st->alpha_algorithm = (enum ksm_alpha_algorithm)v;
    KSM_TRY(get_u32(c, o, "blend_tempo_epochs", &st->blend_tempo_epochs));
    KSM_TRY(get_bool(c, o, "is_healthy", false, NULL, &st->is_healthy));
    KSM_TRY(get_bool(c, o, "is_paused", false, NULL, &st->is_paused));
    KSM_TRY(get_u32(c, o, "previous_epochs_in_stage", &st->previous_epochs_in_stage));
    return 0;
}

static bool stage_has_seed(enum ksm_stage s)
{
    return s == KSM_STAGE_GERMINATED || s == KSM_STAGE_TRAINING || s == KSM_STAGE_BLENDING ||
           s == KSM_STAGE_HOLDING || s == KSM_STAGE_FOSSILIZED;
}

static int parse_extra_state(struct pctx *c, json_t *root, struct ksm_slot *t, bool *needs_gate)
{
    int64_t v = 0;
    bool is_null;
    if (!json_is_object(root)) return perr(c, "", "must be an object");
    KSM_TRY(get_int(c, root, "_extra_state_version", INT64_MIN, INT64_MAX, false, NULL, &v));
    if (v != EXTRA_STATE_VERSION)
        return perr(c, "_extra_state_version", "expected %d, got %" PRId64, EXTRA_STATE_VERSION, v);
    KSM_TRY(get_bool(c, root, "isolate_gradients", false, NULL, &t->isolate_gradients));
    KSM_TRY(get_str(c, root, "blend_algorithm_id", t->blend_algorithm_id,
                    sizeof t->blend_algorithm_id, true, &is_null));
    if (!is_null && strcmp(t->blend_algorithm_id, "linear") &&
        strcmp(t->blend_algorithm_id, "sigmoid") && strcmp(t->blend_algorithm_id, "gated"))
        return perr(c, "blend_algorithm_id", "'%s' is not linear, sigmoid or gated",
                    t->blend_algorithm_id);
    if (!is_null && !t->blend_algorithm_id[0]) return perr(c, "blend_algorithm_id", "is empty");
    KSM_TRY(get_int(c, root, "blend_tempo_epochs", 0, UINT32_MAX, true, &is_null, &v));
    t->has_blend_tempo = !is_null;
    t->blend_tempo_epochs = (uint32_t)v;
    KSM_TRY(get_num(c, root, "blend_alpha_target", 0, 1, true, &is_null, &t->blend_alpha_target));
    t->has_blend_alpha_target = !is_null;
    if (!is_null && !(t->blend_alpha_target > 0))
        return perr(c, "blend_alpha_target", "must be within (0, 1]");
    char topo[16];
    KSM_TRY(get_str(c, root, "resolved_topology", topo, sizeof topo, true, &is_null));
    t->has_resolved_topology = !is_null;
    if (!is_null) {
        enum ksm_topology want = t->env ? t->env->topology : KSM_TOPOLOGY_CNN;
        if (strcmp(topo, "cnn") && strcmp(topo, "transformer"))
            return perr(c, "resolved_topology", "'%s' is not cnn or transformer", topo);
        if (strcmp(topo, ksm_topology_name(want)))
            return perr(c, "resolved_topology", "'%s' does not match this model (%s)", topo,
                        ksm_topology_name(want));
    }

    json_t *ss;
    KSM_TRY(need(c, root, "seed_state", &ss));
    t->occupied = false;
    memset(&t->state, 0, sizeof t->state);
    if (!json_is_null(ss)) {
        if (!json_is_object(ss)) return perr(c, "seed_state", "must be an object or null");
        c->path = "seed_state.";
        KSM_TRY(parse_seed_state(c, ss, t));
        c->path = "";
        t->occupied = true;
    }

    json_t *cfg;
    KSM_TRY(need(c, root, "alpha_schedule_config", &cfg));
    *needs_gate = false;
    if (!json_is_null(cfg)) {
        if (!json_is_object(cfg))
            return perr(c, "alpha_schedule_config", "must be an object or null");
        if (!t->occupied)
            return perr(c, "alpha_schedule_config", "is set but seed_state is missing");
        char algo[16];
        c->path = "alpha_schedule_config.";
        KSM_TRY(get_str(c, cfg, "algorithm_id", algo, sizeof algo, false, NULL));
        if (strcmp(algo, "gated"))
            return perr(c, "algorithm_id", "'%s' is not supported (only 'gated')", algo);
        KSM_TRY(get_int(c, cfg, "total_steps", 0, UINT32_MAX, false, NULL, &v));
        t->gate_total_steps = (uint32_t)v;
        KSM_TRY(get_int(c, cfg, "current_step", 0, UINT32_MAX, false, NULL, &v));
        t->gate_current_step = (uint32_t)v;
        c->path = "";
        if (t->state.alpha_algorithm != KSM_ALGO_GATE)
            return perr(c, "alpha_schedule_config", "is set but alpha_algorithm is %s",
                        ksm_alpha_algorithm_name(t->state.alpha_algorithm));
        /* esper restores through start_blending with the "gated" id. */
        snprintf(t->blend_algorithm_id, sizeof t->blend_algorithm_id, "gated");
        *needs_gate = true;
    } else if (t->occupied && t->state.alpha_algorithm == KSM_ALGO_GATE &&
               (t->state.stage == KSM_STAGE_BLENDING || t->state.stage == KSM_STAGE_HOLDING ||
                t->state.stage == KSM_STAGE_FOSSILIZED)) {
        return perr(c, "alpha_schedule_config", "is missing for a GATE seed in %s",
                    ksm_stage_name(t->state.stage));
    }
    if (t->occupied && t->state.alpha_algorithm == KSM_ALGO_GATE &&
        (t->state.stage == KSM_STAGE_GERMINATED || t->state.stage == KSM_STAGE_TRAINING) &&
        strcmp(t->blend_algorithm_id, "gated"))
        return perr(c, "blend_algorithm_id", "must be 'gated' for a GATE seed in %s",
                    ksm_stage_name(t->state.stage));

    t->pending_prune_reason[0] = t->pending_prune_initiator[0] = '\0';
    if (json_object_get(root, "_kasmina_pending_prune_reason"))
        KSM_TRY(get_str(c, root, "_kasmina_pending_prune_reason", t->pending_prune_reason,
                        sizeof t->pending_prune_reason, false, NULL));
    if (json_object_get(root, "_kasmina_pending_prune_initiator"))
        KSM_TRY(get_str(c, root, "_kasmina_pending_prune_initiator", t->pending_prune_initiator,
                        sizeof t->pending_prune_initiator, false, NULL));
    /* absent: 0.0 as at creation, or none for a seed in cooldown (older states) */
    t->has_grad_ratio_ema = !(t->occupied && (t->state.stage == KSM_STAGE_PRUNED ||
                                              t->state.stage == KSM_STAGE_EMBARGOED ||
                                              t->state.stage == KSM_STAGE_RESETTING));
    t->grad_ratio_ema = 0.0;
    if (json_object_get(root, "_kasmina_gradient_ratio_ema")) {
        KSM_TRY(get_num(c, root, "_kasmina_gradient_ratio_ema", 0, HUGE_VAL, true, &is_null,
                        &t->grad_ratio_ema));
        t->has_grad_ratio_ema = !is_null;
    }
    t->auto_forward = t->env ? t->env->auto_forward : 0u; /* absent: the model's default */
    json_t *afg = json_object_get(root, "_kasmina_auto_forward_gates");
    if (afg != NULL) {
        if (!json_is_array(afg))
            return perr(c, "_kasmina_auto_forward_gates", "must be a list of gate levels");
        t->auto_forward = 0;
        size_t i;
        json_t *g;
        json_array_foreach(afg, i, g)
        {
            json_int_t lvl = json_is_integer(g) ? json_integer_value(g) : -1;
            if (lvl != KSM_GATE_G1 && lvl != KSM_GATE_G2 && lvl != KSM_GATE_G3)
                return perr(c, "_kasmina_auto_forward_gates", "may only hold 1, 2 and 3");
            t->auto_forward |= 1u << lvl;
        }
    }
    t->has_collected_grads = false; /* memory only: the next TrainStep collects again */
    return 0;
}

int ksm_slot_extra_state_parse(const struct ksm_slot *s, const char *json, struct ksm_slot *out,
                               bool *needs_seed, bool *needs_gate, char *err, size_t errlen)
{
    struct pctx c = {.err = err, .errlen = errlen, .path = ""};
    if (!json) return perr(&c, "", "is missing");
    json_error_t je;
    json_t *root = json_loads(json, JSON_REJECT_DUPLICATES, &je);
    if (!root) return perr(&c, "", "is not JSON (%s at line %d)", je.text, je.line);

    struct ksm_slot t = *s;
    t.seed = NULL;
    t.gate = NULL;
    t.gate_total_steps = t.gate_current_step = 0;
    bool gate = false;
    int rc = parse_extra_state(&c, root, &t, &gate);
    json_decref(root);
    if (rc) return rc;
    t.blend_out_freeze = t.occupied && t.state.controller.mode == KSM_ALPHA_DOWN;
    *out = t;
    if (needs_seed) *needs_seed = t.occupied && stage_has_seed(t.state.stage);
    if (needs_gate) *needs_gate = gate;
    return 0;
}
