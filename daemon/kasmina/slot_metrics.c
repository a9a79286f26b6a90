/*
 * Seed slot metrics (esper K/slot.py SeedMetrics, record_metrics, sync_telemetry) and the slot
 * report (slot.h): RecordMetrics validated before anything changes, the accuracy and
 * counterfactual bookkeeping, the telemetry copy, and the report of a slot.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/slot.h"
#include "kasmina/text.h"

static void record_accuracy(struct ksm_seed_metrics *m, double acc)
{
    if (m->epochs_total == 0) {
        m->initial_val_accuracy = acc;
        m->accuracy_at_stage_start = acc;
    }
    m->current_val_accuracy = acc;
    m->best_val_accuracy = fmax(m->best_val_accuracy, acc);
    m->epochs_total++;
    m->epochs_in_current_stage++;
}

/* ---- metrics (docs/gates.md#recordmetrics, docs/evaluate.md#from-results-to-recordmetrics,
 * docs/gates.md#recordmetrics) ---- */

static bool finite_nonneg(double v) { return isfinite(v) && v >= 0.0; }

/* sync_telemetry's copy of metrics and controller state. */
static void sync_telemetry(struct ksm_seed_state *st, int64_t now)
{
    struct ksm_telemetry_sync *t = &st->tel_sync;
    const struct ksm_alpha_controller *c = &st->controller;
    t->accuracy = st->metrics.current_val_accuracy;
    if (st->stage == KSM_STAGE_TRAINING || st->stage == KSM_STAGE_GERMINATED ||
        st->stage == KSM_STAGE_DORMANT)
        t->accuracy_delta = 0.0;
    else
        t->accuracy_delta = ksm_metrics_improvement_since_stage_start(&st->metrics);
    t->epochs_in_stage = st->metrics.epochs_in_current_stage;
    t->stage = (int)st->stage;
    t->alpha = st->alpha;
    t->alpha_target = c->alpha_target;
    t->alpha_mode = (int)c->mode;
    t->alpha_steps_total = c->steps_total;
    t->alpha_steps_done = c->steps_done;
    t->time_to_target = c->steps_total > c->steps_done ? c->steps_total - c->steps_done : 0;
    t->alpha_velocity = (c->mode == KSM_ALPHA_HOLD || c->steps_total == 0)
                            ? 0.0
                            : (c->alpha_target - c->alpha_start) / c->steps_total;
    t->alpha_algorithm = (int)st->alpha_algorithm;
    t->captured_at_ns = now;
    t->blend_tempo_epochs = st->blend_tempo_epochs;
    if (st->stage == KSM_STAGE_BLENDING && st->metrics.epochs_in_current_stage > 0)
        t->blending_velocity = st->alpha / st->metrics.epochs_in_current_stage;
    else
        t->blending_velocity = 0.0;
}

int ksm_slot_record_metrics(struct ksm_slot *s, const struct ksm_metrics_update *u, char *err,
                            size_t errlen)
{
    return ksm_slot_record_metrics_beta(s, u, 0.9, err, errlen);
}

int ksm_slot_record_metrics_beta(struct ksm_slot *s, const struct ksm_metrics_update *u,
                                 double ema_beta, char *err, size_t errlen)
{
    if (!u) {
        ksm_errf(err, errlen, 0, "record_metrics needs an update");
        return KSM_EINVAL;
    }
    if (u->has_val_accuracy &&
        !(isfinite(u->val_accuracy) && u->val_accuracy >= 0.0 && u->val_accuracy <= 100.0)) {
        ksm_errf(err, errlen, 0, "val_accuracy must be a percentage in [0, 100], got %g",
                 u->val_accuracy);
        return KSM_EINVAL;
    }
    if (u->has_counterfactual && !isfinite(u->counterfactual)) {
        ksm_errf(err, errlen, 0, "counterfactual must be finite, got %g", u->counterfactual);
        return KSM_EINVAL;
    }
    if (u->has_gradient_health && !(u->gradient_health >= 0.0 && u->gradient_health <= 1.0)) {
        ksm_errf(err, errlen, 0, "gradient_health must be within [0, 1], got %g",
                 u->gradient_health);
        return KSM_EINVAL;
    }
    if (u->has_gradient_norm && !finite_nonneg(u->gradient_norm)) {
        ksm_errf(err, errlen, 0, "gradient_norm must be finite and >= 0, got %g", u->gradient_norm);
        return KSM_EINVAL;
    }
    if (u->has_grad_ratio && !finite_nonneg(u->seed_gradient_norm_ratio)) {
        ksm_errf(err, errlen, 0, "seed_gradient_norm_ratio must be finite and >= 0, got %g",
                 u->seed_gradient_norm_ratio);
        return KSM_EINVAL;
    }
    const struct {
        bool has;
        double v;
        const char *name;
    } sums[] = {{u->has_interaction_sum, u->interaction_sum, "interaction_sum"},
                {u->has_boost_received, u->boost_received, "boost_received"},
                {u->has_upstream_alpha_sum, u->upstream_alpha_sum, "upstream_alpha_sum"},
                {u->has_downstream_alpha_sum, u->downstream_alpha_sum, "downstream_alpha_sum"}};
    for (size_t i = 0; i < sizeof sums / sizeof sums[0]; i++)
        if (sums[i].has && !isfinite(sums[i].v))
            return ksm_errf(err, errlen, KSM_EINVAL, "%s must be finite, got %g", sums[i].name,
                            sums[i].v);
    if (!s->occupied) {
        ksm_errf(err, errlen, 0, "slot %s has no seed", s->id);
        return KSM_ENOSEED;
    }

    struct ksm_seed_state *st = &s->state;
    struct ksm_seed_metrics *m = &st->metrics;
    /* Finite inputs can still overflow the velocity EMA (1.7e308 then -1.7e308 gives -inf), which
     * the state's JSON cannot hold: refuse the update rather than store what a restart loses. */
    if (u->has_counterfactual && m->has_prev_contribution &&
        !isfinite(0.7 * m->contribution_velocity +
                  0.3 * (u->counterfactual - m->prev_contribution))) {
        ksm_errf(err, errlen, 0,
                 "counterfactual %g after %g would make contribution_velocity non-finite",
                 u->counterfactual, m->prev_contribution);
        return KSM_EINVAL;
    }
    /* Nothing to fold: no TrainStep has collected gradient statistics for this seed. */
    if (u->use_collected_gradients && !s->has_collected_grads)
        return ksm_errf(err, errlen, KSM_ESTAGE,
                        "use_collected_gradients: no TrainStep has collected gradient statistics "
                        "for slot %s since its seed was germinated",
                        s->id);
    if (u->has_val_accuracy) record_accuracy(m, u->val_accuracy);
    /* esper's epoch-end fold (docs/training.md#gradient-statistics), after val_accuracy: the
     * ratio EMA, then the seed's telemetry; explicit fields of the same update come after. */
    if (u->use_collected_gradients) {
        double r = s->collected_grad_ratio;
        s->grad_ratio_ema =
            s->has_grad_ratio_ema ? ema_beta * s->grad_ratio_ema + (1.0 - ema_beta) * r : r;
        s->has_grad_ratio_ema = true;
        m->has_grad_ratio = true;
        m->seed_gradient_norm_ratio = s->grad_ratio_ema;
        struct ksm_seed_telemetry *ct = &st->telemetry;
        ct->has_gradient_norm = true;
        ct->gradient_norm = s->collected_grad_norm;
        ct->has_gradient_health = true;
        ct->gradient_health = s->collected_grad_health;
        ct->has_vanishing_flag = true;
        ct->has_vanishing = s->collected_vanishing;
        ct->has_exploding_flag = true;
        ct->has_exploding = s->collected_exploding;
    }
    if (u->has_counterfactual) {
        double v = u->counterfactual;
        if (m->has_prev_contribution)
            m->contribution_velocity =
                0.7 * m->contribution_velocity + 0.3 * (v - m->prev_contribution);
        m->has_prev_contribution = true;
        m->prev_contribution = v;
        m->has_counterfactual = true;
        m->counterfactual_contribution = v;
    }
    /* Gradient fields are updated only when given, never reset (KTS-001). */
    struct ksm_seed_telemetry *t = &st->telemetry;
    if (u->has_gradient_norm) {
        t->has_gradient_norm = true;
        t->gradient_norm = u->gradient_norm;
    }
    if (u->has_gradient_health) {
        t->has_gradient_health = true;
        t->gradient_health = u->gradient_health;
    }
    if (u->has_vanishing) {
        t->has_vanishing_flag = true;
        t->has_vanishing = u->vanishing;
    }
    if (u->has_exploding) {
        t->has_exploding_flag = true;
        t->has_exploding = u->exploding;
    }
    if (u->has_grad_ratio) {
        m->has_grad_ratio = true;
        m->seed_gradient_norm_ratio = u->seed_gradient_norm_ratio;
    }
    if (u->has_epoch) t->epoch = u->epoch;
    if (u->has_max_epochs) t->max_epochs = u->max_epochs;
    if (u->has_interaction_sum) m->interaction_sum = u->interaction_sum;
    if (u->has_boost_received) m->boost_received = u->boost_received;
    if (u->has_upstream_alpha_sum) m->upstream_alpha_sum = u->upstream_alpha_sum;
    if (u->has_downstream_alpha_sum) m->downstream_alpha_sum = u->downstream_alpha_sum;
    if (u->clear_auto_pruned) m->auto_pruned = false;
    int64_t now = ksm_slot_wall_now_ns();
    sync_telemetry(st, now - now % 1000); /* captured_at persists microseconds */
    return 0;
}

/* ---- report (docs/lifecycle.md#slot-reports) ---- */

void ksm_slot_report(const struct ksm_slot *s, struct ksm_slot_report *r)
{
    memset(r, 0, sizeof *r);
    ksm_utf8_copy(r->slot_id, sizeof r->slot_id, s->id);
    r->blueprint_index = -1;
    r->isolate_gradients = s->isolate_gradients; /* settings: also for an empty slot */
    r->auto_forward_gates = s->auto_forward;
    if (!s->occupied) return;
    const struct ksm_seed_state *st = &s->state;
    const struct ksm_alpha_controller *c = &st->controller;
    r->occupied = true;
    ksm_utf8_copy(r->seed_id, sizeof r->seed_id, st->seed_id);
    ksm_utf8_copy(r->blueprint_id, sizeof r->blueprint_id, st->blueprint_id);
    r->stage = st->stage;
    r->previous_stage = st->previous_stage;
    r->previous_epochs_in_stage = st->previous_epochs_in_stage;
    r->stage_entered_at_ns = st->stage_entered_at_ns;
    r->alpha_algorithm = st->alpha_algorithm;
    r->controller = *c;
    r->time_to_target = c->steps_total > c->steps_done ? c->steps_total - c->steps_done : 0;
    r->alpha_velocity = (c->mode == KSM_ALPHA_HOLD || c->steps_total == 0)
                            ? 0.0
                            : (c->alpha_target - c->alpha_start) / c->steps_total;
    r->blend_tempo_epochs = st->blend_tempo_epochs;
    ksm_utf8_copy(r->blend_algorithm_id, sizeof r->blend_algorithm_id, s->blend_algorithm_id);
    r->blend_alpha_target = s->has_blend_alpha_target ? s->blend_alpha_target : 0.0;
    r->metrics = st->metrics;
    r->total_improvement = ksm_metrics_total_improvement(&st->metrics);
    r->improvement_since_stage_start = ksm_metrics_improvement_since_stage_start(&st->metrics);
    r->telemetry = st->telemetry;
    r->isolate_gradients = s->isolate_gradients;
    r->is_healthy = st->is_healthy;
    r->is_improving = r->improvement_since_stage_start > 0;
    r->needs_attention = !st->is_healthy;
    r->has_gate = s->gate != NULL;
    r->seed_params = s->seed ? st->metrics.seed_param_count : 0;
}
