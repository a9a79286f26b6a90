/*
 * wire/convert_lifecycle: the lifecycle requests, each from_pb beside its to_pb (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

/* ---- Lifecycle ---- */

int ksm_wire_check_target(const char *model_id, const char *slot_id, bool slot_required, char *err,
                          size_t errlen)
{
    KSM_TRY(ksm_wire_check_model_id(model_id, "model_id", true, err, errlen));
    return ksm_wire_check_slot_id(slot_id, "slot_id", slot_required, err, errlen);
}

static int reason_initiator(const char *reason, const char *initiator,
                            struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    KSM_TRY(ksm_wire_check_string(reason, "reason", false, KSM_REASON_MAX - 1, err, errlen));
    KSM_TRY(ksm_wire_check_string(initiator, "initiator", false, KSM_NAME_MAX - 1, err, errlen));
    out->reason = str_or_empty(reason);
    out->initiator = str_or_empty(initiator);
    return 0;
}

static int steepness(bool set, float v, struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    if (!set) return 0;
    KSM_TRY(ksm_wire_check_number(v, "steepness", false, err, errlen));
    if (!(v > 0.0f))
        return ksm_errf(err, errlen, KSM_EINVAL, "steepness must be > 0, got %g.", (double)v);
    out->has_steepness = true;
    out->steepness = v;
    return 0;
}

int ksm_wire_germinate_from_pb(const Kasmina__V1__GerminateRequest *pb,
                               struct ksm_germinate_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    KSM_TRY(ksm_wire_check_string(pb->blueprint_id, "blueprint_id", true, KSM_NAME_MAX - 1, err,
                                  errlen));
    KSM_TRY(ksm_wire_check_string(pb->seed_id, "seed_id", false, KSM_SEED_ID_MAX - 1, err, errlen));
    KSM_TRY(ksm_wire_check_string(pb->blend_algorithm_id, "blend_algorithm_id", false, 15, err,
                                  errlen));
    KSM_TRY(ksm_wire_algorithm_from_pb((int)pb->alpha_algorithm, "alpha_algorithm",
                                       &out->alpha_algorithm, err, errlen));
    if (pb->opt_alpha_target_case ==
        KASMINA__V1__GERMINATE_REQUEST__OPT_ALPHA_TARGET_ALPHA_TARGET) {
        double t = pb->alpha_target;
        KSM_TRY(ksm_wire_check_number(t, "alpha_target", false, err, errlen));
        if (!(t > 0.0 && t <= 1.0))
            return ksm_errf(err, errlen, KSM_EINVAL, "alpha_target must be in (0, 1], got %g.", t);
        out->has_alpha_target = true;
        out->alpha_target = t;
    }
    out->blueprint_id = pb->blueprint_id;
    out->seed_id = str_or_empty(pb->seed_id);
    out->blend_algorithm_id = str_or_empty(pb->blend_algorithm_id);
    out->blend_tempo_epochs = pb->blend_tempo_epochs;
    out->init_seed = pb->init_seed;
    return 0;
}

int ksm_wire_germinate_to_pb(const char *model_id, const char *slot_id,
                             const struct ksm_germinate_args *args, struct ksm_pb_arena *a,
                             Kasmina__V1__GerminateRequest *pb)
{
    (void)a;
    kasmina__v1__germinate_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = pbstr(slot_id);
    pb->blueprint_id = pbstr(args->blueprint_id);
    pb->seed_id = pbstr(args->seed_id);
    pb->blend_algorithm_id = pbstr(args->blend_algorithm_id);
    pb->blend_tempo_epochs = args->blend_tempo_epochs;
    pb->alpha_algorithm = (Kasmina__V1__AlphaAlgorithm)args->alpha_algorithm;
    if (args->has_alpha_target) {
        pb->opt_alpha_target_case = KASMINA__V1__GERMINATE_REQUEST__OPT_ALPHA_TARGET_ALPHA_TARGET;
        pb->alpha_target = (float)args->alpha_target;
    }
    pb->init_seed = args->init_seed;
    return 0;
}

int ksm_wire_advance_from_pb(const Kasmina__V1__AdvanceStageRequest *pb,
                             struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    KSM_TRY(ksm_wire_stage_from_pb((int)pb->target, "target", &out->target, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    return 0;
}

void ksm_wire_advance_to_pb(const struct ksm_lifecycle_args *l,
                            Kasmina__V1__AdvanceStageRequest *pb)
{
    kasmina__v1__advance_stage_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->target = (Kasmina__V1__Stage)l->target;
}

int ksm_wire_prune_from_pb(const Kasmina__V1__PruneRequest *pb, struct ksm_lifecycle_args *out,
                           char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    KSM_TRY(reason_initiator(pb->reason, pb->initiator, out, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    return 0;
}

void ksm_wire_prune_to_pb(const struct ksm_lifecycle_args *l, Kasmina__V1__PruneRequest *pb)
{
    kasmina__v1__prune_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->reason = pbstr(l->reason);
    pb->initiator = pbstr(l->initiator);
}

int ksm_wire_schedule_prune_from_pb(const Kasmina__V1__SchedulePruneRequest *pb,
                                    struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    KSM_TRY(ksm_wire_curve_from_pb((int)pb->curve, "curve", &out->curve, err, errlen));
    KSM_TRY(steepness(pb->opt_steepness_case ==
                          KASMINA__V1__SCHEDULE_PRUNE_REQUEST__OPT_STEEPNESS_STEEPNESS,
                      pb->steepness, out, err, errlen));
    KSM_TRY(reason_initiator(pb->reason, pb->initiator, out, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    out->steps = pb->steps;
    return 0;
}

void ksm_wire_schedule_prune_to_pb(const struct ksm_lifecycle_args *l,
                                   Kasmina__V1__SchedulePruneRequest *pb)
{
    kasmina__v1__schedule_prune_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->steps = l->steps;
    pb->curve = (Kasmina__V1__AlphaCurve)l->curve;
    if (l->has_steepness) {
        pb->opt_steepness_case = KASMINA__V1__SCHEDULE_PRUNE_REQUEST__OPT_STEEPNESS_STEEPNESS;
        pb->steepness = (float)l->steepness;
    }
    pb->reason = pbstr(l->reason);
    pb->initiator = pbstr(l->initiator);
}

int ksm_wire_set_alpha_target_from_pb(const Kasmina__V1__SetAlphaTargetRequest *pb,
                                      struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    double t = pb->alpha_target;
    KSM_TRY(ksm_wire_check_number(t, "alpha_target", false, err, errlen));
    if (!(t > 0.0 && t <= 1.0))
        return ksm_errf(err, errlen, KSM_EINVAL, "alpha_target must be in (0, 1], got %g.", t);
    KSM_TRY(ksm_wire_curve_from_pb((int)pb->curve, "curve", &out->curve, err, errlen));
    KSM_TRY(steepness(pb->opt_steepness_case ==
                          KASMINA__V1__SET_ALPHA_TARGET_REQUEST__OPT_STEEPNESS_STEEPNESS,
                      pb->steepness, out, err, errlen));
    KSM_TRY(ksm_wire_algorithm_from_pb((int)pb->alpha_algorithm, "alpha_algorithm", &out->algorithm,
                                       err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    out->alpha = t;
    out->steps = pb->steps;
    return 0;
}

void ksm_wire_set_alpha_target_to_pb(const struct ksm_lifecycle_args *l,
                                     Kasmina__V1__SetAlphaTargetRequest *pb)
{
    kasmina__v1__set_alpha_target_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->alpha_target = (float)l->alpha;
    pb->steps = l->steps;
    pb->curve = (Kasmina__V1__AlphaCurve)l->curve;
    if (l->has_steepness) {
        pb->opt_steepness_case = KASMINA__V1__SET_ALPHA_TARGET_REQUEST__OPT_STEEPNESS_STEEPNESS;
        pb->steepness = (float)l->steepness;
    }
    pb->alpha_algorithm = (Kasmina__V1__AlphaAlgorithm)l->algorithm;
}

int ksm_wire_set_alpha_from_pb(const Kasmina__V1__SetAlphaRequest *pb,
                               struct ksm_lifecycle_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, true, err, errlen));
    KSM_TRY(ksm_wire_check_number(pb->alpha, "alpha", true, err, errlen));
    out->model_id = pb->model_id;
    out->slot_id = pb->slot_id;
    out->alpha = pb->alpha;
    return 0;
}

void ksm_wire_set_alpha_to_pb(const struct ksm_lifecycle_args *l, Kasmina__V1__SetAlphaRequest *pb)
{
    kasmina__v1__set_alpha_request__init(pb);
    pb->model_id = pbstr(l->model_id);
    pb->slot_id = pbstr(l->slot_id);
    pb->alpha = (float)l->alpha;
}

int ksm_wire_gate_levels_from_pb(const Kasmina__V1__GateLevel *v, size_t n, const char *field,
                                 unsigned *out, char *err, size_t errlen)
{
    unsigned bits = 0;
    for (size_t i = 0; i < n; i++) {
        char f[96];
        snprintf(f, sizeof f, "%s[%zu]", field, i);
        enum ksm_gate_level g = KSM_GATE_G0;
        KSM_TRY(ksm_wire_gate_level_from_pb((int)v[i], f, &g, err, errlen));
        if (g != KSM_GATE_G1 && g != KSM_GATE_G2 && g != KSM_GATE_G3)
            return ksm_errf(err, errlen, KSM_EINVAL, "%s must be GATE_G1, GATE_G2 or GATE_G3.", f);
        bits |= 1u << g;
    }
    *out = bits;
    return 0;
}

int ksm_wire_gate_levels_to_pb(unsigned bits, struct ksm_pb_arena *a, Kasmina__V1__GateLevel **v,
                               size_t *n)
{
    Kasmina__V1__GateLevel *g = ANEWN(a, Kasmina__V1__GateLevel, 8);
    if (g == NULL) return KSM_ENOMEM;
    size_t k = 0;
    for (int lvl = 0; lvl <= 5; lvl++)
        if (bits & (1u << lvl)) g[k++] = (Kasmina__V1__GateLevel)lvl;
    *v = g;
    *n = k;
    return 0;
}

int ksm_wire_configure_slot_from_pb(const Kasmina__V1__ConfigureSlotRequest *pb,
                                    struct ksm_slot_settings *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_target(pb->model_id, pb->slot_id, false, err, errlen));
    if (pb->opt_isolate_gradients_case ==
        KASMINA__V1__CONFIGURE_SLOT_REQUEST__OPT_ISOLATE_GRADIENTS_ISOLATE_GRADIENTS) {
        out->set_isolate_gradients = true;
        out->isolate_gradients = pb->isolate_gradients;
    }
    if (pb->auto_forward_gates != NULL) {
        out->set_auto_forward_gates = true;
        KSM_TRY(ksm_wire_gate_levels_from_pb(
            pb->auto_forward_gates->gates, pb->auto_forward_gates->n_gates,
            "auto_forward_gates.gates", &out->auto_forward_gates, err, errlen));
    }
    return 0;
}

int ksm_wire_configure_slot_to_pb(const char *model_id, const char *slot_id,
                                  const struct ksm_slot_settings *s, struct ksm_pb_arena *a,
                                  Kasmina__V1__ConfigureSlotRequest *pb)
{
    kasmina__v1__configure_slot_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->slot_id = pbstr(slot_id);
    if (s->set_isolate_gradients) {
        pb->opt_isolate_gradients_case =
            KASMINA__V1__CONFIGURE_SLOT_REQUEST__OPT_ISOLATE_GRADIENTS_ISOLATE_GRADIENTS;
        pb->isolate_gradients = s->isolate_gradients;
    }
    if (s->set_auto_forward_gates) {
        Kasmina__V1__GateLevels *g = ANEW(a, Kasmina__V1__GateLevels);
        if (g == NULL) return KSM_ENOMEM;
        kasmina__v1__gate_levels__init(g);
        KSM_TRY(ksm_wire_gate_levels_to_pb(s->auto_forward_gates, a, &g->gates, &g->n_gates));
        pb->auto_forward_gates = g;
    }
    return 0;
}
