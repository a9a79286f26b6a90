/*
 * wire/convert_report: gate results, slot reports, lifecycle events and metrics updates
 * (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

/* ---- Gate, slot report, event ---- */

static int strv_to_pb(char (*src)[KSM_CHECK_MAX], int n, struct ksm_pb_arena *a, char ***out,
                      size_t *nout)
{
    if (n < 0) n = 0;
    if (n > KSM_GATE_MAX_CHECKS) n = KSM_GATE_MAX_CHECKS;
    *out = NULL;
    *nout = 0;
    if (n == 0) return 0;
    char **v = ANEWN(a, char *, (size_t)n);
    if (v == NULL) return KSM_ENOMEM;
    for (int i = 0; i < n; i++) v[i] = src[i];
    *out = v;
    *nout = (size_t)n;
    return 0;
}

int ksm_wire_gate_to_pb(const struct ksm_gate_result *g, struct ksm_pb_arena *a,
                        Kasmina__V1__GateResult *pb)
{
    kasmina__v1__gate_result__init(pb);
    pb->gate = (Kasmina__V1__GateLevel)g->gate;
    pb->passed = g->passed;
    pb->score = g->score;
    struct ksm_gate_result *mg = (struct ksm_gate_result *)g;
    KSM_TRY(
        strv_to_pb(mg->checks_passed, g->n_passed, a, &pb->checks_passed, &pb->n_checks_passed));
    KSM_TRY(
        strv_to_pb(mg->checks_failed, g->n_failed, a, &pb->checks_failed, &pb->n_checks_failed));
    pb->message = (char *)g->message;
    int n = g->n_checks < 0                     ? 0
            : g->n_checks > KSM_GATE_MAX_CHECKS ? KSM_GATE_MAX_CHECKS
                                                : g->n_checks;
    if (n == 0) return 0;
    pb->checks = ANEWN(a, Kasmina__V1__GateCheck *, (size_t)n);
    Kasmina__V1__GateCheck *v = ANEWN(a, Kasmina__V1__GateCheck, (size_t)n);
    if (pb->checks == NULL || v == NULL) return KSM_ENOMEM;
    for (int i = 0; i < n; i++) {
        const struct ksm_gate_check *c = &g->checks[i];
        kasmina__v1__gate_check__init(&v[i]);
        v[i].name = (char *)c->name;
        v[i].passed = c->passed;
        v[i].quantity = (char *)c->quantity;
        v[i].op = (char *)c->op;
        v[i].threshold = c->threshold;
        if (c->has_value) {
            v[i].opt_value_case = KASMINA__V1__GATE_CHECK__OPT_VALUE_VALUE;
            v[i].value = c->value;
        }
        v[i].detail = (char *)c->detail;
        pb->checks[i] = &v[i];
    }
    pb->n_checks = (size_t)n;
    return 0;
}

int ksm_wire_gate_from_pb(const Kasmina__V1__GateResult *pb, struct ksm_gate_result *g, char *err,
                          size_t errlen)
{
    memset(g, 0, sizeof *g);
    if (pb == NULL) return 0;
    KSM_TRY(ksm_wire_gate_level_from_pb((int)pb->gate, "gate.gate", &g->gate, err, errlen));
    g->passed = pb->passed;
    g->score = pb->score;
    size_t np =
        pb->n_checks_passed < KSM_GATE_MAX_CHECKS ? pb->n_checks_passed : KSM_GATE_MAX_CHECKS;
    size_t nf =
        pb->n_checks_failed < KSM_GATE_MAX_CHECKS ? pb->n_checks_failed : KSM_GATE_MAX_CHECKS;
    for (size_t i = 0; i < np; i++)
        copy_str(g->checks_passed[i], KSM_CHECK_MAX, pb->checks_passed[i]);
    for (size_t i = 0; i < nf; i++)
        copy_str(g->checks_failed[i], KSM_CHECK_MAX, pb->checks_failed[i]);
    g->n_passed = (int)np;
    g->n_failed = (int)nf;
    copy_str(g->message, sizeof g->message, pb->message);
    size_t nc = pb->n_checks < KSM_GATE_MAX_CHECKS ? pb->n_checks : KSM_GATE_MAX_CHECKS;
    for (size_t i = 0; i < nc; i++) {
        const Kasmina__V1__GateCheck *p = pb->checks[i];
        struct ksm_gate_check *c = &g->checks[i];
        copy_str(c->name, sizeof c->name, p->name);
        c->passed = p->passed;
        copy_str(c->quantity, sizeof c->quantity, p->quantity);
        copy_str(c->op, sizeof c->op, p->op);
        c->threshold = p->threshold;
        c->has_value = p->opt_value_case == KASMINA__V1__GATE_CHECK__OPT_VALUE_VALUE;
        c->value = c->has_value ? p->value : 0.0;
        copy_str(c->detail, sizeof c->detail, p->detail);
    }
    g->n_checks = (int)nc;
    return 0;
}

static int gradients_to_pb(const struct ksm_seed_telemetry *t, const struct ksm_seed_metrics *m,
                           struct ksm_pb_arena *a, Kasmina__V1__GradientStats **out)
{
    Kasmina__V1__GradientStats *g = ANEW(a, Kasmina__V1__GradientStats);
    if (g == NULL) return KSM_ENOMEM;
    kasmina__v1__gradient_stats__init(g);
    if (t->has_gradient_norm) {
        g->opt_gradient_norm_case = KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM;
        g->gradient_norm = t->gradient_norm;
    }
    if (t->has_gradient_health) {
        g->opt_gradient_health_case =
            KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
        g->gradient_health = t->gradient_health;
    }
    if (t->has_vanishing_flag) {
        g->opt_has_vanishing_case = KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING;
        g->has_vanishing = t->has_vanishing;
    }
    if (t->has_exploding_flag) {
        g->opt_has_exploding_case = KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
        g->has_exploding = t->has_exploding;
    }
    if (m != NULL && m->has_grad_ratio) {
        g->opt_seed_gradient_norm_ratio_case =
            KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
        g->seed_gradient_norm_ratio = m->seed_gradient_norm_ratio;
    }
    *out = g;
    return 0;
}

int ksm_wire_slot_report_to_pb(const char *model_id, const struct ksm_slot_report *r,
                               struct ksm_pb_arena *a, Kasmina__V1__SlotReport *pb)
{
    kasmina__v1__slot_report__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = (char *)r->slot_id;
    pb->occupied = r->occupied;
    pb->seed_id = (char *)r->seed_id;
    pb->blueprint_id = (char *)r->blueprint_id;
    pb->stage = (Kasmina__V1__Stage)r->stage;
    pb->previous_stage = (Kasmina__V1__Stage)r->previous_stage;
    pb->alpha_algorithm = (Kasmina__V1__AlphaAlgorithm)r->alpha_algorithm;
    Kasmina__V1__AlphaController *c = ANEW(a, Kasmina__V1__AlphaController);
    Kasmina__V1__SeedMetrics *m = ANEW(a, Kasmina__V1__SeedMetrics);
    if (c == NULL || m == NULL) return KSM_ENOMEM;
    kasmina__v1__alpha_controller__init(c);
    c->alpha = (float)r->controller.alpha;
    c->alpha_start = (float)r->controller.alpha_start;
    c->alpha_target = (float)r->controller.alpha_target;
    c->mode = (Kasmina__V1__AlphaMode)r->controller.mode;
    c->curve = (Kasmina__V1__AlphaCurve)r->controller.curve;
    c->steepness = (float)r->controller.steepness;
    c->steps_total = r->controller.steps_total;
    c->steps_done = r->controller.steps_done;
    pb->controller = c;
    pb->blend_tempo_epochs = r->blend_tempo_epochs;
    kasmina__v1__seed_metrics__init(m);
    const struct ksm_seed_metrics *sm = &r->metrics;
    m->epochs_total = sm->epochs_total;
    m->epochs_in_current_stage = sm->epochs_in_current_stage;
    m->initial_val_accuracy = sm->initial_val_accuracy;
    m->current_val_accuracy = sm->current_val_accuracy;
    m->best_val_accuracy = sm->best_val_accuracy;
    m->accuracy_at_stage_start = sm->accuracy_at_stage_start;
    m->total_improvement = r->total_improvement;
    m->improvement_since_stage_start = r->improvement_since_stage_start;
    if (sm->has_counterfactual) {
        m->opt_counterfactual_contribution_case =
            KASMINA__V1__SEED_METRICS__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION;
        m->counterfactual_contribution = sm->counterfactual_contribution;
    }
    m->contribution_velocity = sm->contribution_velocity;
    if (sm->has_grad_ratio) {
        m->opt_seed_gradient_norm_ratio_case =
            KASMINA__V1__SEED_METRICS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
        m->seed_gradient_norm_ratio = sm->seed_gradient_norm_ratio;
    }
    m->seed_param_count = sm->seed_param_count;
    m->host_param_count = sm->host_param_count;
    m->gradient_norm_avg = sm->gradient_norm_avg;
    m->current_alpha = sm->current_alpha;
    m->alpha_ramp_step = sm->alpha_ramp_step;
    m->accuracy_at_blending_start = sm->accuracy_at_blending_start;
    m->auto_pruned = sm->auto_pruned;
    m->auto_prune_reason = (char *)sm->auto_prune_reason;
    m->interaction_sum = sm->interaction_sum;
    m->boost_received = sm->boost_received;
    m->upstream_alpha_sum = sm->upstream_alpha_sum;
    m->downstream_alpha_sum = sm->downstream_alpha_sum;
    pb->metrics = m;
    KSM_TRY(gradients_to_pb(&r->telemetry, sm, a, &pb->gradients));
    pb->isolate_gradients = r->isolate_gradients;
    KSM_TRY(ksm_wire_gate_levels_to_pb(r->auto_forward_gates, a, &pb->auto_forward_gates,
                                       &pb->n_auto_forward_gates));
    pb->is_healthy = r->is_healthy;
    pb->seed_params = r->seed_params;
    pb->model_generation = r->model_generation;
    pb->previous_epochs_in_stage = r->previous_epochs_in_stage;
    pb->stage_entered_at_unix_ns = r->stage_entered_at_ns;
    return 0;
}

int ksm_wire_slot_report_from_pb(const Kasmina__V1__SlotReport *pb, struct ksm_slot_report *r,
                                 char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    copy_str(r->slot_id, sizeof r->slot_id, pb->slot_id);
    r->occupied = pb->occupied;
    copy_str(r->seed_id, sizeof r->seed_id, pb->seed_id);
    copy_str(r->blueprint_id, sizeof r->blueprint_id, pb->blueprint_id);
    KSM_TRY(ksm_wire_stage_from_pb((int)pb->stage, "stage", &r->stage, err, errlen));
    KSM_TRY(ksm_wire_stage_from_pb((int)pb->previous_stage, "previous_stage", &r->previous_stage,
                                   err, errlen));
    KSM_TRY(ksm_wire_algorithm_from_pb((int)pb->alpha_algorithm, "alpha_algorithm",
                                       &r->alpha_algorithm, err, errlen));
    if (pb->controller != NULL) {
        const Kasmina__V1__AlphaController *c = pb->controller;
        r->controller.alpha = c->alpha;
        r->controller.alpha_start = c->alpha_start;
        r->controller.alpha_target = c->alpha_target;
        if (c->mode < 0 || c->mode > 2)
            return ksm_errf(err, errlen, KSM_EINVAL, "controller.mode has an unknown value %d.",
                            (int)c->mode);
        r->controller.mode = (enum ksm_alpha_mode)c->mode;
        KSM_TRY(ksm_wire_curve_from_pb((int)c->curve, "controller.curve", &r->controller.curve, err,
                                       errlen));
        r->controller.steepness = c->steepness;
        r->controller.steps_total = c->steps_total;
        r->controller.steps_done = c->steps_done;
    }
    r->blend_tempo_epochs = pb->blend_tempo_epochs;
    if (pb->metrics != NULL) {
        const Kasmina__V1__SeedMetrics *m = pb->metrics;
        struct ksm_seed_metrics *sm = &r->metrics;
        sm->epochs_total = m->epochs_total;
        sm->epochs_in_current_stage = m->epochs_in_current_stage;
        sm->initial_val_accuracy = m->initial_val_accuracy;
        sm->current_val_accuracy = m->current_val_accuracy;
        sm->best_val_accuracy = m->best_val_accuracy;
        sm->accuracy_at_stage_start = m->accuracy_at_stage_start;
        r->total_improvement = m->total_improvement;
        r->improvement_since_stage_start = m->improvement_since_stage_start;
        sm->has_counterfactual =
            m->opt_counterfactual_contribution_case ==
            KASMINA__V1__SEED_METRICS__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION;
        if (sm->has_counterfactual)
            sm->counterfactual_contribution = m->counterfactual_contribution;
        sm->contribution_velocity = m->contribution_velocity;
        sm->has_grad_ratio =
            m->opt_seed_gradient_norm_ratio_case ==
            KASMINA__V1__SEED_METRICS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
        if (sm->has_grad_ratio) sm->seed_gradient_norm_ratio = m->seed_gradient_norm_ratio;
        sm->seed_param_count = m->seed_param_count;
        sm->host_param_count = m->host_param_count;
        sm->gradient_norm_avg = m->gradient_norm_avg;
        sm->current_alpha = m->current_alpha;
        sm->alpha_ramp_step = m->alpha_ramp_step;
        sm->accuracy_at_blending_start = m->accuracy_at_blending_start;
        sm->auto_pruned = m->auto_pruned;
        copy_str(sm->auto_prune_reason, sizeof sm->auto_prune_reason, m->auto_prune_reason);
        sm->interaction_sum = m->interaction_sum;
        sm->boost_received = m->boost_received;
        sm->upstream_alpha_sum = m->upstream_alpha_sum;
        sm->downstream_alpha_sum = m->downstream_alpha_sum;
    }
    if (pb->gradients != NULL) {
        const Kasmina__V1__GradientStats *g = pb->gradients;
        struct ksm_seed_telemetry *t = &r->telemetry;
        t->has_gradient_norm = g->opt_gradient_norm_case ==
                               KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM;
        if (t->has_gradient_norm) t->gradient_norm = g->gradient_norm;
        t->has_gradient_health = g->opt_gradient_health_case ==
                                 KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
        if (t->has_gradient_health) t->gradient_health = g->gradient_health;
        t->has_vanishing_flag = g->opt_has_vanishing_case ==
                                KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING;
        if (t->has_vanishing_flag) t->has_vanishing = g->has_vanishing;
        t->has_exploding_flag = g->opt_has_exploding_case ==
                                KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
        if (t->has_exploding_flag) t->has_exploding = g->has_exploding;
        if (g->opt_seed_gradient_norm_ratio_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO) {
            r->metrics.has_grad_ratio = true;
            r->metrics.seed_gradient_norm_ratio = g->seed_gradient_norm_ratio;
        }
    }
    r->isolate_gradients = pb->isolate_gradients;
    for (size_t i = 0; i < pb->n_auto_forward_gates; i++)
        if ((int)pb->auto_forward_gates[i] >= 0 && (int)pb->auto_forward_gates[i] <= 5)
            r->auto_forward_gates |= 1u << (int)pb->auto_forward_gates[i];
    r->is_healthy = pb->is_healthy;
    r->seed_params = pb->seed_params;
    r->model_generation = pb->model_generation;
    r->previous_epochs_in_stage = pb->previous_epochs_in_stage;
    r->stage_entered_at_ns = pb->stage_entered_at_unix_ns;
    return 0;
}

static const char *const event_names[KSM_EV_COUNT] = {
    [KSM_EV_SEED_GERMINATED] = "SEED_GERMINATED",
    [KSM_EV_SEED_GATE_EVALUATED] = "SEED_GATE_EVALUATED",
    [KSM_EV_SEED_STAGE_CHANGED] = "SEED_STAGE_CHANGED",
    [KSM_EV_SEED_FOSSILIZED] = "SEED_FOSSILIZED",
    [KSM_EV_SEED_PRUNED] = "SEED_PRUNED",
};

int ksm_wire_lifecycle_type_parse(const char *s, enum ksm_lifecycle_type *out)
{
    for (int i = 0; i < KSM_EV_COUNT; i++)
        if (s != NULL && strcmp(s, event_names[i]) == 0) {
            *out = (enum ksm_lifecycle_type)i;
            return 0;
        }
    return KSM_EINVAL;
}

int ksm_wire_event_to_pb(uint64_t sequence, const struct ksm_lifecycle_event *ev,
                         struct ksm_pb_arena *a, Kasmina__V1__LifecycleEvent *pb)
{
    kasmina__v1__lifecycle_event__init(pb);
    pb->sequence = sequence;
    pb->event_type =
        (char *)((unsigned)ev->type < KSM_EV_COUNT ? event_names[ev->type] : "UNKNOWN");
    pb->model_id = (char *)ev->model_id;
    pb->slot_id = (char *)ev->slot_id;
    pb->seed_id = (char *)ev->seed_id;
    pb->timestamp_unix_ns = ev->timestamp_ns;
    pb->from_stage = (Kasmina__V1__Stage)ev->from_stage;
    pb->to_stage = (Kasmina__V1__Stage)ev->to_stage;
    pb->alpha = (float)ev->alpha;
    if (ev->type == KSM_EV_SEED_GATE_EVALUATED) {
        pb->gate = ANEW(a, Kasmina__V1__GateResult);
        if (pb->gate == NULL) return KSM_ENOMEM;
        KSM_TRY(ksm_wire_gate_to_pb(&ev->gate, a, pb->gate));
        if (ev->from_stage == KSM_STAGE_UNKNOWN && ev->target_stage != KSM_STAGE_UNKNOWN)
            pb->to_stage = (Kasmina__V1__Stage)ev->target_stage;
    }
    pb->reason = (char *)ev->reason;
    pb->initiator = (char *)ev->initiator;
    int n = ev->n_values < 0 ? 0 : ev->n_values > 12 ? 12 : ev->n_values;
    size_t extra = ev->type == KSM_EV_SEED_GATE_EVALUATED ? 1 : 0; /* target_stage */
    if (n + extra > 0) {
        pb->values = ANEWN(a, Kasmina__V1__LifecycleEvent__ValuesEntry *, (size_t)n + extra);
        Kasmina__V1__LifecycleEvent__ValuesEntry *e =
            ANEWN(a, Kasmina__V1__LifecycleEvent__ValuesEntry, (size_t)n + extra);
        if (pb->values == NULL || e == NULL) return KSM_ENOMEM;
        size_t k = 0;
        for (int i = 0; i < n; i++) {
            if (ev->values[i].key == NULL) continue;
            kasmina__v1__lifecycle_event__values_entry__init(&e[k]);
            e[k].key = (char *)ev->values[i].key;
            e[k].value = ev->values[i].value;
            pb->values[k] = &e[k];
            k++;
        }
        if (extra) {
            kasmina__v1__lifecycle_event__values_entry__init(&e[k]);
            e[k].key = "target_stage";
            e[k].value = (double)ev->target_stage;
            pb->values[k] = &e[k];
            k++;
        }
        pb->n_values = k;
    }
    return 0;
}

int ksm_wire_event_from_pb(const Kasmina__V1__LifecycleEvent *pb, uint64_t *sequence,
                           struct ksm_lifecycle_event *ev, char *err, size_t errlen)
{
    memset(ev, 0, sizeof *ev);
    *sequence = pb->sequence;
    if (ksm_wire_lifecycle_type_parse(pb->event_type, &ev->type) != 0)
        return ksm_errf(err, errlen, KSM_EINVAL, "event_type '%s' is not a known event type.",
                        str_or_empty(pb->event_type));
    copy_str(ev->model_id, sizeof ev->model_id, pb->model_id);
    copy_str(ev->slot_id, sizeof ev->slot_id, pb->slot_id);
    copy_str(ev->seed_id, sizeof ev->seed_id, pb->seed_id);
    ev->timestamp_ns = pb->timestamp_unix_ns;
    KSM_TRY(
        ksm_wire_stage_from_pb((int)pb->from_stage, "from_stage", &ev->from_stage, err, errlen));
    KSM_TRY(ksm_wire_stage_from_pb((int)pb->to_stage, "to_stage", &ev->to_stage, err, errlen));
    ev->alpha = pb->alpha;
    if (pb->gate != NULL) KSM_TRY(ksm_wire_gate_from_pb(pb->gate, &ev->gate, err, errlen));
    copy_str(ev->reason, sizeof ev->reason, pb->reason);
    copy_str(ev->initiator, sizeof ev->initiator, pb->initiator);
    int n = 0;
    for (size_t i = 0; i < pb->n_values; i++) {
        const Kasmina__V1__LifecycleEvent__ValuesEntry *e = pb->values[i];
        if (ev->type == KSM_EV_SEED_GATE_EVALUATED && e->key != NULL &&
            strcmp(e->key, "target_stage") == 0) {
            int v = (int)e->value;
            if (ksm_stage_valid(v)) ev->target_stage = (enum ksm_stage)v;
            continue;
        }
        if (n == 12) break;
        ev->values[n].key = e->key;
        ev->values[n].value = e->value;
        n++;
    }
    ev->n_values = n;
    return 0;
}

int ksm_wire_metrics_from_pb(const Kasmina__V1__RecordMetricsRequest *pb,
                             struct ksm_metrics_update *u, char *err, size_t errlen)
{
    memset(u, 0, sizeof *u);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    if (pb->opt_val_accuracy_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_VAL_ACCURACY_VAL_ACCURACY) {
        KSM_TRY(ksm_wire_check_number(pb->val_accuracy, "val_accuracy", false, err, errlen));
        if (pb->val_accuracy < 0.0 || pb->val_accuracy > 100.0)
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "val_accuracy must be a percentage in [0, 100], got %g.",
                            pb->val_accuracy);
        u->has_val_accuracy = true;
        u->val_accuracy = pb->val_accuracy;
    }
    if (pb->opt_counterfactual_contribution_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION) {
        KSM_TRY(ksm_wire_check_number(pb->counterfactual_contribution,
                                      "counterfactual_contribution", false, err, errlen));
        u->has_counterfactual = true;
        u->counterfactual = pb->counterfactual_contribution;
    }
    const Kasmina__V1__GradientStats *g = pb->gradients;
    if (g != NULL) {
        if (g->opt_gradient_norm_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM) {
            KSM_TRY(ksm_wire_check_number(g->gradient_norm, "gradients.gradient_norm", false, err,
                                          errlen));
            if (g->gradient_norm < 0)
                return ksm_errf(err, errlen, KSM_EINVAL,
                                "gradients.gradient_norm must be >= 0, got %g.", g->gradient_norm);
            u->has_gradient_norm = true;
            u->gradient_norm = g->gradient_norm;
        }
        if (g->opt_gradient_health_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH) {
            KSM_TRY(ksm_wire_check_number(g->gradient_health, "gradients.gradient_health", false,
                                          err, errlen));
            if (g->gradient_health < 0 || g->gradient_health > 1)
                return ksm_errf(err, errlen, KSM_EINVAL,
                                "gradients.gradient_health must be in [0, 1], got %g.",
                                g->gradient_health);
            u->has_gradient_health = true;
            u->gradient_health = g->gradient_health;
        }
        if (g->opt_has_vanishing_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING) {
            u->has_vanishing = true;
            u->vanishing = g->has_vanishing;
        }
        if (g->opt_has_exploding_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING) {
            u->has_exploding = true;
            u->exploding = g->has_exploding;
        }
        if (g->opt_seed_gradient_norm_ratio_case ==
            KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO) {
            KSM_TRY(ksm_wire_check_number(g->seed_gradient_norm_ratio,
                                          "gradients.seed_gradient_norm_ratio", false, err,
                                          errlen));
            if (g->seed_gradient_norm_ratio < 0)
                return ksm_errf(err, errlen, KSM_EINVAL,
                                "gradients.seed_gradient_norm_ratio must be >= 0, got %g.",
                                g->seed_gradient_norm_ratio);
            u->has_grad_ratio = true;
            u->seed_gradient_norm_ratio = g->seed_gradient_norm_ratio;
        }
    }
    if (pb->opt_epoch_case == KASMINA__V1__RECORD_METRICS_REQUEST__OPT_EPOCH_EPOCH) {
        u->has_epoch = true;
        u->epoch = pb->epoch;
    }
    if (pb->opt_max_epochs_case == KASMINA__V1__RECORD_METRICS_REQUEST__OPT_MAX_EPOCHS_MAX_EPOCHS) {
        u->has_max_epochs = true;
        u->max_epochs = pb->max_epochs;
    }
    u->use_collected_gradients = pb->use_collected_gradients;
    u->clear_auto_pruned = pb->clear_auto_pruned;
    if (pb->opt_interaction_sum_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_INTERACTION_SUM_INTERACTION_SUM) {
        KSM_TRY(ksm_wire_check_number(pb->interaction_sum, "interaction_sum", false, err, errlen));
        u->has_interaction_sum = true;
        u->interaction_sum = pb->interaction_sum;
    }
    if (pb->opt_boost_received_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_BOOST_RECEIVED_BOOST_RECEIVED) {
        KSM_TRY(ksm_wire_check_number(pb->boost_received, "boost_received", false, err, errlen));
        u->has_boost_received = true;
        u->boost_received = pb->boost_received;
    }
    if (pb->opt_upstream_alpha_sum_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_UPSTREAM_ALPHA_SUM_UPSTREAM_ALPHA_SUM) {
        KSM_TRY(ksm_wire_check_number(pb->upstream_alpha_sum, "upstream_alpha_sum", false, err,
                                      errlen));
        u->has_upstream_alpha_sum = true;
        u->upstream_alpha_sum = pb->upstream_alpha_sum;
    }
    if (pb->opt_downstream_alpha_sum_case ==
        KASMINA__V1__RECORD_METRICS_REQUEST__OPT_DOWNSTREAM_ALPHA_SUM_DOWNSTREAM_ALPHA_SUM) {
        KSM_TRY(ksm_wire_check_number(pb->downstream_alpha_sum, "downstream_alpha_sum", false, err,
                                      errlen));
        u->has_downstream_alpha_sum = true;
        u->downstream_alpha_sum = pb->downstream_alpha_sum;
    }
    return 0;
}

int ksm_wire_metrics_to_pb(const char *model_id, const char *slot_id,
                           const struct ksm_metrics_update *u, struct ksm_pb_arena *a,
                           Kasmina__V1__RecordMetricsRequest *pb)
{
    kasmina__v1__record_metrics_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = pbstr(slot_id);
    if (u->has_val_accuracy) {
        pb->opt_val_accuracy_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_VAL_ACCURACY_VAL_ACCURACY;
        pb->val_accuracy = u->val_accuracy;
    }
    if (u->has_counterfactual) {
        pb->opt_counterfactual_contribution_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_COUNTERFACTUAL_CONTRIBUTION_COUNTERFACTUAL_CONTRIBUTION;
        pb->counterfactual_contribution = u->counterfactual;
    }
    if (u->has_gradient_norm || u->has_gradient_health || u->has_vanishing || u->has_exploding ||
        u->has_grad_ratio) {
        Kasmina__V1__GradientStats *g = ANEW(a, Kasmina__V1__GradientStats);
        if (g == NULL) return KSM_ENOMEM;
        kasmina__v1__gradient_stats__init(g);
        if (u->has_gradient_norm) {
            g->opt_gradient_norm_case =
                KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_NORM_GRADIENT_NORM;
            g->gradient_norm = u->gradient_norm;
        }
        if (u->has_gradient_health) {
            g->opt_gradient_health_case =
                KASMINA__V1__GRADIENT_STATS__OPT_GRADIENT_HEALTH_GRADIENT_HEALTH;
            g->gradient_health = u->gradient_health;
        }
        if (u->has_vanishing) {
            g->opt_has_vanishing_case =
                KASMINA__V1__GRADIENT_STATS__OPT_HAS_VANISHING_HAS_VANISHING;
            g->has_vanishing = u->vanishing;
        }
        if (u->has_exploding) {
            g->opt_has_exploding_case =
                KASMINA__V1__GRADIENT_STATS__OPT_HAS_EXPLODING_HAS_EXPLODING;
            g->has_exploding = u->exploding;
        }
        if (u->has_grad_ratio) {
            g->opt_seed_gradient_norm_ratio_case =
                KASMINA__V1__GRADIENT_STATS__OPT_SEED_GRADIENT_NORM_RATIO_SEED_GRADIENT_NORM_RATIO;
            g->seed_gradient_norm_ratio = u->seed_gradient_norm_ratio;
        }
        pb->gradients = g;
    }
    if (u->has_epoch) {
        pb->opt_epoch_case = KASMINA__V1__RECORD_METRICS_REQUEST__OPT_EPOCH_EPOCH;
        pb->epoch = u->epoch;
    }
    if (u->has_max_epochs) {
        pb->opt_max_epochs_case = KASMINA__V1__RECORD_METRICS_REQUEST__OPT_MAX_EPOCHS_MAX_EPOCHS;
        pb->max_epochs = u->max_epochs;
    }
    pb->use_collected_gradients = u->use_collected_gradients;
    pb->clear_auto_pruned = u->clear_auto_pruned;
    if (u->has_interaction_sum) {
        pb->opt_interaction_sum_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_INTERACTION_SUM_INTERACTION_SUM;
        pb->interaction_sum = u->interaction_sum;
    }
    if (u->has_boost_received) {
        pb->opt_boost_received_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_BOOST_RECEIVED_BOOST_RECEIVED;
        pb->boost_received = u->boost_received;
    }
    if (u->has_upstream_alpha_sum) {
        pb->opt_upstream_alpha_sum_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_UPSTREAM_ALPHA_SUM_UPSTREAM_ALPHA_SUM;
        pb->upstream_alpha_sum = u->upstream_alpha_sum;
    }
    if (u->has_downstream_alpha_sum) {
        pb->opt_downstream_alpha_sum_case =
            KASMINA__V1__RECORD_METRICS_REQUEST__OPT_DOWNSTREAM_ALPHA_SUM_DOWNSTREAM_ALPHA_SUM;
        pb->downstream_alpha_sum = u->downstream_alpha_sum;
    }
    return 0;
}
