/*
 * The quality gates G0..G5 of the seed lifecycle (esper K/slot.py QualityGates): each check a
 * gate makes, with esper's check strings, for AdvanceStage and auto-forwarding (slot.c).
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kasmina/alpha.h"
#include "kasmina/slot.h"
#include "kasmina/text.h"

/* ---- quality gates (docs/gates.md#quality-gates, K/slot.py QualityGates) ---- */

static void gate_init(struct ksm_gate_result *r, enum ksm_gate_level g)
{
    memset(r, 0, sizeof *r);
    r->gate = g;
}

/* Adds check `name` (esper's string, printf'd) to checks_passed or checks_failed and to checks;
 * returns its entry in checks for the numbers (NULL when the result is full). */
static struct ksm_gate_check *check_add(struct ksm_gate_result *r, bool passed, const char *fmt,
                                        ...) __attribute__((format(printf, 3, 4)));
static struct ksm_gate_check *check_add(struct ksm_gate_result *r, bool passed, const char *fmt,
                                        ...)
{
    int *n = passed ? &r->n_passed : &r->n_failed;
    if (*n >= KSM_GATE_MAX_CHECKS || r->n_checks >= KSM_GATE_MAX_CHECKS) return NULL;
    char *name = passed ? r->checks_passed[*n] : r->checks_failed[*n];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, KSM_CHECK_MAX, fmt, ap);
    va_end(ap);
    (*n)++;
    struct ksm_gate_check *c = &r->checks[r->n_checks++];
    memset(c, 0, sizeof *c);
    memcpy(c->name, name, KSM_CHECK_MAX);
    c->passed = passed;
    return c;
}

/* The relation that holds when a check of op did not pass. */
static const char *negated(const char *op)
{
    if (strcmp(op, ">=") == 0) return "<";
    if (strcmp(op, "<=") == 0) return ">";
    return "!";
}

/* A check `value op threshold`: "epochs_in_current_stage 3 < 10". */
static void num(struct ksm_gate_check *c, const char *quantity, double value, const char *op,
                double threshold)
{
    if (c == NULL) return;
    ksm_utf8_copy(c->quantity, sizeof c->quantity, quantity);
    ksm_utf8_copy(c->op, sizeof c->op, op);
    c->threshold = threshold;
    c->has_value = true;
    c->value = value;
    snprintf(c->detail, sizeof c->detail, "%s %.10g %s %.10g", quantity, value,
             c->passed ? op : negated(op), threshold);
}

/* A threshold check whose quantity was never measured. */
static void unmeasured(struct ksm_gate_check *c, const char *quantity, const char *op,
                       double threshold, const char *set_by)
{
    if (c == NULL) return;
    ksm_utf8_copy(c->quantity, sizeof c->quantity, quantity);
    ksm_utf8_copy(c->op, sizeof c->op, op);
    c->threshold = threshold;
    snprintf(c->detail, sizeof c->detail, "%s never measured (needs %s %.10g; set by %s)", quantity,
             op, threshold, set_by);
}

/* A presence or state check: the detail says what was found. */
static void state(struct ksm_gate_check *c, const char *quantity, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void state(struct ksm_gate_check *c, const char *quantity, const char *fmt, ...)
{
    if (c == NULL) return;
    ksm_utf8_copy(c->quantity, sizeof c->quantity, quantity);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->detail, sizeof c->detail, fmt, ap);
    va_end(ap);
}

void ksm_gate_result_failed(struct ksm_gate_result *r, enum ksm_gate_level g, const char *check)
{
    gate_init(r, g);
    struct ksm_gate_check *c = check_add(r, false, "%s", check);
    if (strcmp(check, "no_active_seed") == 0)
        state(c, "stage", "the slot holds no active seed");
    else if (strcmp(check, "no_valid_transition") == 0)
        state(c, "stage", "the seed's stage has no forward transition");
    else if (strcmp(check, "no_gate_for_target") == 0)
        state(c, "stage", "no gate leads into the target stage");
}

/* Check strings are esper's f-strings; Python's "{x:.2f}" and C's "%.2f" both round the exact
 * binary value half-to-even, so they agree digit for digit. The details print numbers with
 * "%.10g" (the exact operands to ten digits: 0.49999 never reads as 0.50). */

static void gate_g0(const struct ksm_seed_state *st, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G0);
    if (st->seed_id[0])
        state(check_add(r, true, "seed_id_present"), "seed_id", "seed_id '%s'", st->seed_id);
    else
        state(check_add(r, false, "seed_id_missing"), "seed_id", "seed_id is empty");
    if (st->blueprint_id[0])
        state(check_add(r, true, "blueprint_id_present"), "blueprint_id", "blueprint_id '%s'",
              st->blueprint_id);
    else
        state(check_add(r, false, "blueprint_id_missing"), "blueprint_id", "blueprint_id is empty");
    r->passed = r->n_failed == 0;
    r->score = r->passed ? 1.0 : 0.0;
    ksm_utf8_copy(r->message, sizeof r->message,
                  r->passed ? "Germination gate" : "Missing required fields");
}

static void gate_g1(const struct ksm_seed_state *st, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G1);
    r->passed = st->stage == KSM_STAGE_GERMINATED;
    r->score = r->passed ? 1.0 : 0.0;
    if (r->passed)
        state(check_add(r, true, "germinated"), "stage", "stage GERMINATED");
    else
        state(check_add(r, false, "not_germinated"), "stage", "stage %s, needs GERMINATED",
              ksm_stage_name(st->stage));
    ksm_utf8_copy(r->message, sizeof r->message,
                  r->passed ? "Ready for training" : "Not germinated");
}

static void gate_g2(const struct ksm_seed_state *st, bool perm, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G2);
    const struct ksm_seed_metrics *m = &st->metrics;
    double improvement = ksm_metrics_improvement_since_stage_start(m);
    r->score = improvement > 0 ? fmin(1.0, improvement / 5.0) : 0.0;
    uint32_t epochs = m->epochs_in_current_stage;

    if (perm) {
        bool epochs_ok = epochs >= MIN_BLENDING_EPOCHS;
        struct ksm_gate_check *c;
        if (epochs_ok)
            c = check_add(r, true, "trained_%u_epochs", epochs);
        else
            c = check_add(r, false, "insufficient_training_%u_of_%u", epochs, MIN_BLENDING_EPOCHS);
        num(c, "epochs_in_current_stage", epochs, ">=", MIN_BLENDING_EPOCHS);
        /* KTS-001: unmeasured gradient health is not healthy. */
        bool safe_ok = false;
        const struct ksm_seed_telemetry *t = &st->telemetry;
        if (!t->has_gradient_health) {
            unmeasured(check_add(r, false, "gradient_health_not_measured"), "gradient_health",
                       ">=", MIN_GRADIENT_HEALTH, "RecordMetrics gradients.gradient_health");
        } else if (t->has_exploding_flag && t->has_exploding) {
            state(check_add(r, false, "exploding_gradients"), "has_exploding",
                  "has_exploding is true (needs false)");
        } else {
            state(check_add(r, true, "no_exploding_gradients"), "has_exploding",
                  t->has_exploding_flag ? "has_exploding is false" : "has_exploding never set");
            double h = t->gradient_health;
            if (h >= MIN_GRADIENT_HEALTH) {
                num(check_add(r, true, "gradient_health_%.2f", h), "gradient_health", h,
                    ">=", MIN_GRADIENT_HEALTH);
                safe_ok = true;
            } else {
                num(check_add(r, false, "gradient_health_low_%.2f_need_%.2f", h,
                              MIN_GRADIENT_HEALTH),
                    "gradient_health", h, ">=", MIN_GRADIENT_HEALTH);
            }
        }
        r->passed = epochs_ok && safe_ok;
        snprintf(r->message, sizeof r->message, "Permissive G2 Safety: %s",
                 r->passed ? "PASS" : "FAIL");
        return;
    }

    bool perf_ok = improvement >= MIN_TRAINING_IMPROVEMENT;
    struct ksm_gate_check *c;
    if (perf_ok)
        c = check_add(r, true, "global_improvement_%.2f%%", improvement);
    else
        c = check_add(r, false, "global_improvement_insufficient_%.2f%%", improvement);
    num(c, "improvement_since_stage_start", improvement, ">=", MIN_TRAINING_IMPROVEMENT);
    bool seed_ok = epochs >= MIN_BLENDING_EPOCHS;
    num(check_add(r, seed_ok, seed_ok ? "seed_ready" : "seed_not_ready"), "epochs_in_current_stage",
        epochs, ">=", MIN_BLENDING_EPOCHS);
    bool grad_ok = false;
    double ratio = m->seed_gradient_norm_ratio;
    if (!m->has_grad_ratio) {
        unmeasured(check_add(r, false, "gradient_stats_never_measured"), "seed_gradient_norm_ratio",
                   ">=", GRADIENT_RATIO_THRESHOLD,
                   "RecordMetrics gradients or use_collected_gradients");
    } else if (ratio >= GRADIENT_RATIO_THRESHOLD) {
        num(check_add(r, true, "seed_gradient_active_%.2f", ratio), "seed_gradient_norm_ratio",
            ratio, ">=", GRADIENT_RATIO_THRESHOLD);
        grad_ok = true;
    } else {
        num(check_add(r, false, "seed_gradient_low_%.2f", ratio), "seed_gradient_norm_ratio", ratio,
            ">=", GRADIENT_RATIO_THRESHOLD);
    }
    r->passed = perf_ok && seed_ok && grad_ok;
    snprintf(r->message, sizeof r->message, "Improvement: %.2f%%", improvement);
}

static void gate_g3(const struct ksm_seed_state *st, bool perm, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G3);
    const struct ksm_alpha_controller *c = &st->controller;
    const double eps = KSM_ALPHA_EPS;
    r->score = c->alpha;
    bool target_ok = c->alpha_target >= 1.0 - eps;
    if (target_ok)
        num(check_add(r, true, "alpha_target_full"), "alpha_target", c->alpha_target,
            ">=", 1.0 - eps);
    else
        num(check_add(r, false, "alpha_target_not_full_%.2f", c->alpha_target), "alpha_target",
            c->alpha_target, ">=", 1.0 - eps);
    bool reached_ok = c->mode == KSM_ALPHA_HOLD && fabs(c->alpha - c->alpha_target) <= eps;
    struct ksm_gate_check *k;
    if (reached_ok)
        k = check_add(r, true, "alpha_target_reached");
    else
        k = check_add(r, false, "alpha_not_at_target_%.2f_target_%.2f_mode_%s", c->alpha,
                      c->alpha_target, ksm_alpha_mode_name(c->mode));
    state(k, "alpha", "alpha %.10g, alpha_target %.10g, mode %s%s", c->alpha, c->alpha_target,
          ksm_alpha_mode_name(c->mode),
          reached_ok ? "" : " (needs mode HOLD with alpha within 1e-06 of alpha_target)");
    if (k != NULL) {
        k->has_value = true;
        k->value = c->alpha;
    }
    if (perm) {
        r->passed = target_ok && reached_ok;
        ksm_utf8_copy(r->message, sizeof r->message, "Permissive G3: alpha completion only");
        return;
    }
    uint32_t epochs = st->metrics.epochs_in_current_stage;
    if (epochs >= MIN_BLENDING_EPOCHS)
        k = check_add(r, true, "blending_complete");
    else
        k = check_add(r, false, "blending_incomplete_%u", epochs);
    num(k, "epochs_in_current_stage", epochs, ">=", MIN_BLENDING_EPOCHS);
    r->passed = r->n_failed == 0;
}

static void gate_g5(const struct ksm_seed_state *st, bool perm, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G5);
    if (!st->metrics.has_counterfactual) {
        state(check_add(r, false, "counterfactual_not_available"), "counterfactual_contribution",
              "counterfactual_contribution never measured (set by RecordMetrics "
              "counterfactual_contribution)");
        return;
    }
    double c = st->metrics.counterfactual_contribution;
    r->score = c > 0 ? fmin(1.0, c / 10.0) : 0.0;
    struct ksm_gate_check *k = check_add(r, true, "counterfactual_available_%.2f%%", c);
    state(k, "counterfactual_contribution", "counterfactual_contribution %.10g", c);
    if (k != NULL) {
        k->has_value = true;
        k->value = c;
    }
    bool health_ok = st->is_healthy;
    if (health_ok)
        state(check_add(r, true, "healthy"), "is_healthy", "is_healthy is true");
    else
        state(check_add(r, false, "unhealthy"), "is_healthy", "is_healthy is false (needs true)");
    if (perm) {
        r->passed = health_ok;
        snprintf(r->message, sizeof r->message, "Permissive G5: %.2f%% contribution (no threshold)",
                 c);
        return;
    }
    /* f"..._below_{DEFAULT_MIN_FOSSILIZE_CONTRIBUTION}%": Python prints the float 1.0 as "1.0". */
    if (c >= MIN_FOSSILIZE_CONTRIB)
        k = check_add(r, true, "sufficient_contribution_%.2f%%", c);
    else
        k = check_add(r, false, "insufficient_contribution_%.2f%%_below_1.0%%", c);
    num(k, "counterfactual_contribution", c, ">=", MIN_FOSSILIZE_CONTRIB);
    r->passed = r->n_failed == 0;
}

static bool gate_for_target(enum ksm_stage target, enum ksm_gate_level *g)
{
    switch (target) {
    case KSM_STAGE_GERMINATED: *g = KSM_GATE_G0; return true;
    case KSM_STAGE_TRAINING: *g = KSM_GATE_G1; return true;
    case KSM_STAGE_BLENDING: *g = KSM_GATE_G2; return true;
    case KSM_STAGE_HOLDING: *g = KSM_GATE_G3; return true;
    case KSM_STAGE_FOSSILIZED: *g = KSM_GATE_G5; return true;
    default: return false;
    }
}

void ksm_slot_check_gate(const struct ksm_slot *s, enum ksm_stage target, struct ksm_gate_result *r)
{
    enum ksm_gate_level g;
    if (!s->occupied || !gate_for_target(target, &g)) {
        /* esper raises "No gate defined for target stage ..."; this test helper says so. */
        ksm_gate_result_failed(r, KSM_GATE_G0,
                               s->occupied ? "no_gate_for_target" : "no_active_seed");
        return;
    }
    bool perm = (s->env && s->env->permissive);
    switch (g) {
    case KSM_GATE_G0: gate_g0(&s->state, r); break;
    case KSM_GATE_G1: gate_g1(&s->state, r); break;
    case KSM_GATE_G2: gate_g2(&s->state, perm, r); break;
    case KSM_GATE_G3: gate_g3(&s->state, perm, r); break;
    case KSM_GATE_G5: gate_g5(&s->state, perm, r); break;
    }
}
