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

static void check_add(char (*list)[KSM_CHECK_MAX], int *n, const char *fmt, ...)
{
    if (*n >= KSM_GATE_MAX_CHECKS) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(list[*n], KSM_CHECK_MAX, fmt, ap);
    va_end(ap);
    (*n)++;
}

void ksm_gate_result_failed(struct ksm_gate_result *r, enum ksm_gate_level g, const char *check)
{
    gate_init(r, g);
    check_add(r->checks_failed, &r->n_failed, "%s", check);
}

#define PASS(r, ...) check_add((r)->checks_passed, &(r)->n_passed, __VA_ARGS__)
#define FAIL(r, ...) check_add((r)->checks_failed, &(r)->n_failed, __VA_ARGS__)

/* Check strings are esper's f-strings; Python's "{x:.2f}" and C's "%.2f" both round the exact
 * binary value half-to-even, so they agree digit for digit. */

static void gate_g0(const struct ksm_seed_state *st, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G0);
    if (st->seed_id[0])
        PASS(r, "seed_id_present");
    else
        FAIL(r, "seed_id_missing");
    if (st->blueprint_id[0])
        PASS(r, "blueprint_id_present");
    else
        FAIL(r, "blueprint_id_missing");
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
        PASS(r, "germinated");
    else
        FAIL(r, "not_germinated");
    ksm_utf8_copy(r->message, sizeof r->message,
                  r->passed ? "Ready for training" : "Not germinated");
}

static void gate_g2(const struct ksm_seed_state *st, bool perm, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G2);
    const struct ksm_seed_metrics *m = &st->metrics;
    double improvement = ksm_metrics_improvement_since_stage_start(m);
    r->score = improvement > 0 ? fmin(1.0, improvement / 5.0) : 0.0;

    if (perm) {
        bool epochs_ok = m->epochs_in_current_stage >= MIN_BLENDING_EPOCHS;
        if (epochs_ok)
            PASS(r, "trained_%u_epochs", m->epochs_in_current_stage);
        else
            FAIL(r, "insufficient_training_%u_of_%u", m->epochs_in_current_stage,
                 MIN_BLENDING_EPOCHS);
        /* KTS-001: unmeasured gradient health is not healthy. */
        bool safe_ok = false;
        const struct ksm_seed_telemetry *t = &st->telemetry;
        if (!t->has_gradient_health) {
            FAIL(r, "gradient_health_not_measured");
        } else if (t->has_exploding_flag && t->has_exploding) {
            FAIL(r, "exploding_gradients");
        } else {
            PASS(r, "no_exploding_gradients");
            if (t->gradient_health >= MIN_GRADIENT_HEALTH) {
                PASS(r, "gradient_health_%.2f", t->gradient_health);
                safe_ok = true;
            } else {
                FAIL(r, "gradient_health_low_%.2f_need_%.2f", t->gradient_health,
                     MIN_GRADIENT_HEALTH);
            }
        }
        r->passed = epochs_ok && safe_ok;
        snprintf(r->message, sizeof r->message, "Permissive G2 Safety: %s",
                 r->passed ? "PASS" : "FAIL");
        return;
    }

    bool perf_ok = improvement >= MIN_TRAINING_IMPROVEMENT;
    if (perf_ok)
        PASS(r, "global_improvement_%.2f%%", improvement);
    else
        FAIL(r, "global_improvement_insufficient_%.2f%%", improvement);
    bool seed_ok = m->epochs_in_current_stage >= MIN_BLENDING_EPOCHS;
    if (seed_ok)
        PASS(r, "seed_ready");
    else
        FAIL(r, "seed_not_ready");
    bool grad_ok = false;
    if (!m->has_grad_ratio) {
        FAIL(r, "gradient_stats_never_measured");
    } else if (m->seed_gradient_norm_ratio >= GRADIENT_RATIO_THRESHOLD) {
        PASS(r, "seed_gradient_active_%.2f", m->seed_gradient_norm_ratio);
        grad_ok = true;
    } else {
        FAIL(r, "seed_gradient_low_%.2f", m->seed_gradient_norm_ratio);
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
        PASS(r, "alpha_target_full");
    else
        FAIL(r, "alpha_target_not_full_%.2f", c->alpha_target);
    bool reached_ok = c->mode == KSM_ALPHA_HOLD && fabs(c->alpha - c->alpha_target) <= eps;
    if (reached_ok)
        PASS(r, "alpha_target_reached");
    else
        FAIL(r, "alpha_not_at_target_%.2f_target_%.2f_mode_%s", c->alpha, c->alpha_target,
             ksm_alpha_mode_name(c->mode));
    if (perm) {
        r->passed = target_ok && reached_ok;
        ksm_utf8_copy(r->message, sizeof r->message, "Permissive G3: alpha completion only");
        return;
    }
    if (st->metrics.epochs_in_current_stage >= MIN_BLENDING_EPOCHS)
        PASS(r, "blending_complete");
    else
        FAIL(r, "blending_incomplete_%u", st->metrics.epochs_in_current_stage);
    r->passed = r->n_failed == 0;
}

static void gate_g5(const struct ksm_seed_state *st, bool perm, struct ksm_gate_result *r)
{
    gate_init(r, KSM_GATE_G5);
    if (!st->metrics.has_counterfactual) {
        FAIL(r, "counterfactual_not_available");
        return;
    }
    double c = st->metrics.counterfactual_contribution;
    r->score = c > 0 ? fmin(1.0, c / 10.0) : 0.0;
    PASS(r, "counterfactual_available_%.2f%%", c);
    bool health_ok = st->is_healthy;
    if (health_ok)
        PASS(r, "healthy");
    else
        FAIL(r, "unhealthy");
    if (perm) {
        r->passed = health_ok;
        snprintf(r->message, sizeof r->message, "Permissive G5: %.2f%% contribution (no threshold)",
                 c);
        return;
    }
    /* f"..._below_{DEFAULT_MIN_FOSSILIZE_CONTRIBUTION}%": Python prints the float 1.0 as "1.0". */
    if (c >= MIN_FOSSILIZE_CONTRIB)
        PASS(r, "sufficient_contribution_%.2f%%", c);
    else
        FAIL(r, "insufficient_contribution_%.2f%%_below_1.0%%", c);
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
        gate_init(r, KSM_GATE_G0);
        FAIL(r, s->occupied ? "no_gate_for_target" : "no_active_seed");
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
