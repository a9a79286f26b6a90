/*
 * wire/convert_training: ConfigureTraining, TrainingConfig, TrainStep request and response
 * (convert.h; the semantics: docs/training.md).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

/* An SgdConfig onto s: unset fields keep s's values. */
static int sgd_from_pb(const Kasmina__V1__SgdConfig *pb, const char *field,
                       struct ksm_sgd_settings *s, char *err, size_t errlen)
{
    if (pb == NULL) return 0;
    char f[64];
#define SGD_NUM(name, CASE)                                                                        \
    if (pb->opt_##name##_case == KASMINA__V1__SGD_CONFIG__OPT_##CASE##_##CASE) {                   \
        snprintf(f, sizeof f, "%s." #name, field);                                                 \
        KSM_TRY(ksm_wire_check_number(pb->name, f, false, err, errlen));                           \
        s->name = pb->name;                                                                        \
    }
    SGD_NUM(lr, LR)
    SGD_NUM(momentum, MOMENTUM)
    SGD_NUM(weight_decay, WEIGHT_DECAY)
    SGD_NUM(dampening, DAMPENING)
#undef SGD_NUM
    if (pb->opt_nesterov_case == KASMINA__V1__SGD_CONFIG__OPT_NESTEROV_NESTEROV)
        s->nesterov = pb->nesterov;
    return 0;
}

int ksm_wire_training_config_from_pb(const Kasmina__V1__ConfigureTrainingRequest *pb,
                                     const struct ksm_training_config *current,
                                     struct ksm_training_config *out, bool *reset, char *err,
                                     size_t errlen)
{
    KSM_TRY(ksm_wire_check_model_id(pb->model_id, "model_id", true, err, errlen));
    *out = *current;
    KSM_TRY(sgd_from_pb(pb->host, "host", &out->host, err, errlen));
    KSM_TRY(sgd_from_pb(pb->seed, "seed", &out->seed, err, errlen));
    if (pb->opt_max_grad_norm_case ==
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_MAX_GRAD_NORM_MAX_GRAD_NORM) {
        KSM_TRY(ksm_wire_check_number(pb->max_grad_norm, "max_grad_norm", false, err, errlen));
        out->max_grad_norm = pb->max_grad_norm;
    }
    if (pb->opt_gradient_telemetry_stride_case ==
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_GRADIENT_TELEMETRY_STRIDE_GRADIENT_TELEMETRY_STRIDE)
        out->gradient_telemetry_stride = pb->gradient_telemetry_stride;
    if (pb->opt_gradient_ratio_ema_case ==
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_GRADIENT_RATIO_EMA_GRADIENT_RATIO_EMA) {
        KSM_TRY(ksm_wire_check_number(pb->gradient_ratio_ema, "gradient_ratio_ema", false, err,
                                      errlen));
        out->gradient_ratio_ema = pb->gradient_ratio_ema;
    }
    if (pb->opt_vanishing_threshold_case ==
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_VANISHING_THRESHOLD_VANISHING_THRESHOLD) {
        KSM_TRY(ksm_wire_check_number(pb->vanishing_threshold, "vanishing_threshold", false, err,
                                      errlen));
        out->vanishing_threshold = pb->vanishing_threshold;
    }
    if (pb->opt_exploding_threshold_case ==
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_EXPLODING_THRESHOLD_EXPLODING_THRESHOLD) {
        KSM_TRY(ksm_wire_check_number(pb->exploding_threshold, "exploding_threshold", false, err,
                                      errlen));
        out->exploding_threshold = pb->exploding_threshold;
    }
    *reset = pb->reset_optimizer_state;
    return 0;
}

static Kasmina__V1__SgdConfig *sgd_to_pb(const struct ksm_sgd_settings *s, struct ksm_pb_arena *a)
{
    Kasmina__V1__SgdConfig *pb = ANEW(a, Kasmina__V1__SgdConfig);
    if (pb == NULL) return NULL;
    kasmina__v1__sgd_config__init(pb);
    pb->opt_lr_case = KASMINA__V1__SGD_CONFIG__OPT_LR_LR;
    pb->lr = s->lr;
    pb->opt_momentum_case = KASMINA__V1__SGD_CONFIG__OPT_MOMENTUM_MOMENTUM;
    pb->momentum = s->momentum;
    pb->opt_weight_decay_case = KASMINA__V1__SGD_CONFIG__OPT_WEIGHT_DECAY_WEIGHT_DECAY;
    pb->weight_decay = s->weight_decay;
    pb->opt_dampening_case = KASMINA__V1__SGD_CONFIG__OPT_DAMPENING_DAMPENING;
    pb->dampening = s->dampening;
    pb->opt_nesterov_case = KASMINA__V1__SGD_CONFIG__OPT_NESTEROV_NESTEROV;
    pb->nesterov = s->nesterov;
    return pb;
}

int ksm_wire_training_config_to_pb(const char *model_id, const struct ksm_training_config *c,
                                   uint64_t train_step, struct ksm_pb_arena *a,
                                   Kasmina__V1__TrainingConfig *pb)
{
    kasmina__v1__training_config__init(pb);
    pb->model_id = pbstr(model_id);
    if ((pb->host = sgd_to_pb(&c->host, a)) == NULL) return KSM_ENOMEM;
    if ((pb->seed = sgd_to_pb(&c->seed, a)) == NULL) return KSM_ENOMEM;
    pb->max_grad_norm = c->max_grad_norm;
    pb->gradient_telemetry_stride = c->gradient_telemetry_stride;
    pb->gradient_ratio_ema = c->gradient_ratio_ema;
    pb->vanishing_threshold = c->vanishing_threshold;
    pb->exploding_threshold = c->exploding_threshold;
    pb->train_step = train_step;
    return 0;
}

int ksm_wire_train_args_from_pb(const Kasmina__V1__TrainStepRequest *pb, struct ksm_pb_arena *a,
                                struct ksm_train_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_model_id(pb->model_id, "model_id", true, err, errlen));
    ksm_tensor *x = ANEW(a, ksm_tensor), *y = ANEW(a, ksm_tensor);
    if (x == NULL || y == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_tensor_from_pb(pb->input, "input", a, x, err, errlen));
    KSM_TRY(ksm_wire_tensor_from_pb(pb->targets, "targets", a, y, err, errlen));
    if (y->dtype != KSM_DTYPE_I64)
        return ksm_errf(err, errlen, KSM_EINVAL, "targets must be I64 class or token ids.");
    KSM_TRY(ksm_wire_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    if (pb->n_slots > KSM_MAX_SLOTS)
        return ksm_errf(err, errlen, KSM_EINVAL, "slots lists %zu slots; at most %d are allowed.",
                        pb->n_slots, KSM_MAX_SLOTS);
    for (size_t i = 0; i < pb->n_slots; i++) {
        char f[32];
        snprintf(f, sizeof f, "slots[%zu]", i);
        KSM_TRY(ksm_wire_check_slot_id(pb->slots[i], f, true, err, errlen));
    }
    out->input = x;
    out->targets = y;
    out->stream = str_or_empty(pb->stream);
    out->slots = (const char *const *)pb->slots;
    out->n_slots = (int)pb->n_slots;
    out->collect_gradients =
        pb->opt_collect_gradients_case ==
                KASMINA__V1__TRAIN_STEP_REQUEST__OPT_COLLECT_GRADIENTS_COLLECT_GRADIENTS
            ? (pb->collect_gradients ? 1 : 0)
            : -1;
    return 0;
}

int ksm_wire_train_result_to_pb(const struct ksm_train_result *r, struct ksm_pb_arena *a,
                                Kasmina__V1__TrainStepResponse *pb)
{
    kasmina__v1__train_step_response__init(pb);
    pb->loss = r->loss;
    pb->correct = r->correct;
    pb->total = r->total;
    pb->train_step = r->train_step;
    pb->gradients_collected = r->gradients_collected;
    pb->host_grad_norm = r->host_grad_norm;
    pb->host_param_count = r->host_param_count;
    pb->model_generation = r->model_generation;
    pb->compute_ns = r->compute_ns;
    int ns = r->n_seeds < 0 ? 0 : r->n_seeds > KSM_MAX_SLOTS ? KSM_MAX_SLOTS : r->n_seeds;
    if (ns > 0) {
        pb->seeds = ANEWN(a, Kasmina__V1__SeedGradientStats *, (size_t)ns);
        Kasmina__V1__SeedGradientStats *v = ANEWN(a, Kasmina__V1__SeedGradientStats, (size_t)ns);
        if (pb->seeds == NULL || v == NULL) return KSM_ENOMEM;
        for (int i = 0; i < ns; i++) {
            const struct ksm_seed_grad_stats *s = &r->seeds[i];
            kasmina__v1__seed_gradient_stats__init(&v[i]);
            v[i].slot_id = (char *)s->slot_id;
            v[i].grad_norm = s->grad_norm;
            v[i].param_count = s->param_count;
            v[i].normalized_ratio = s->normalized_ratio;
            v[i].gradient_health = s->gradient_health;
            v[i].has_vanishing = s->has_vanishing;
            v[i].has_exploding = s->has_exploding;
            pb->seeds[i] = &v[i];
        }
        pb->n_seeds = (size_t)ns;
    }
    int nst = r->n_stepped < 0 ? 0 : r->n_stepped > KSM_MAX_SLOTS ? KSM_MAX_SLOTS : r->n_stepped;
    if (nst > 0) {
        pb->stepped_slots = ANEWN(a, char *, (size_t)nst);
        if (pb->stepped_slots == NULL) return KSM_ENOMEM;
        for (int i = 0; i < nst; i++) pb->stepped_slots[i] = (char *)r->stepped[i];
        pb->n_stepped_slots = (size_t)nst;
    }
    return 0;
}

/* ---- the client's direction ---- */

int ksm_wire_configure_training_to_pb(const char *model_id, const struct ksm_training_config *c,
                                      bool reset, struct ksm_pb_arena *a,
                                      Kasmina__V1__ConfigureTrainingRequest *pb)
{
    kasmina__v1__configure_training_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->reset_optimizer_state = reset;
    if (c == NULL) return 0; /* read the configuration in force */
    if ((pb->host = sgd_to_pb(&c->host, a)) == NULL) return KSM_ENOMEM;
    if ((pb->seed = sgd_to_pb(&c->seed, a)) == NULL) return KSM_ENOMEM;
    pb->opt_max_grad_norm_case =
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_MAX_GRAD_NORM_MAX_GRAD_NORM;
    pb->max_grad_norm = c->max_grad_norm;
    pb->opt_gradient_telemetry_stride_case =
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_GRADIENT_TELEMETRY_STRIDE_GRADIENT_TELEMETRY_STRIDE;
    pb->gradient_telemetry_stride = c->gradient_telemetry_stride;
    pb->opt_gradient_ratio_ema_case =
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_GRADIENT_RATIO_EMA_GRADIENT_RATIO_EMA;
    pb->gradient_ratio_ema = c->gradient_ratio_ema;
    pb->opt_vanishing_threshold_case =
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_VANISHING_THRESHOLD_VANISHING_THRESHOLD;
    pb->vanishing_threshold = c->vanishing_threshold;
    pb->opt_exploding_threshold_case =
        KASMINA__V1__CONFIGURE_TRAINING_REQUEST__OPT_EXPLODING_THRESHOLD_EXPLODING_THRESHOLD;
    pb->exploding_threshold = c->exploding_threshold;
    return 0;
}

static void sgd_from_reply(const Kasmina__V1__SgdConfig *pb, struct ksm_sgd_settings *s)
{
    memset(s, 0, sizeof *s);
    if (pb == NULL) return;
    s->lr = pb->lr;
    s->momentum = pb->momentum;
    s->weight_decay = pb->weight_decay;
    s->dampening = pb->dampening;
    s->nesterov = pb->nesterov;
}

void ksm_wire_training_config_from_reply(const Kasmina__V1__TrainingConfig *pb,
                                         struct ksm_training_config *c, uint64_t *train_step)
{
    memset(c, 0, sizeof *c);
    sgd_from_reply(pb->host, &c->host);
    sgd_from_reply(pb->seed, &c->seed);
    c->max_grad_norm = pb->max_grad_norm;
    c->gradient_telemetry_stride = pb->gradient_telemetry_stride;
    c->gradient_ratio_ema = pb->gradient_ratio_ema;
    c->vanishing_threshold = pb->vanishing_threshold;
    c->exploding_threshold = pb->exploding_threshold;
    if (train_step != NULL) *train_step = pb->train_step;
}

int ksm_wire_train_args_to_pb(const char *model_id, const struct ksm_train_args *t,
                              struct ksm_pb_arena *a, Kasmina__V1__TrainStepRequest *pb)
{
    kasmina__v1__train_step_request__init(pb);
    pb->model_id = pbstr(model_id);
    pb->input = ANEW(a, Kasmina__V1__Tensor);
    pb->targets = ANEW(a, Kasmina__V1__Tensor);
    if (pb->input == NULL || pb->targets == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_tensor_to_pb(t->input, a, pb->input));
    KSM_TRY(ksm_wire_tensor_to_pb(t->targets, a, pb->targets));
    pb->stream = pbstr(t->stream);
    if (t->n_slots > 0) {
        pb->slots = (char **)t->slots;
        pb->n_slots = (size_t)t->n_slots;
    }
    if (t->collect_gradients >= 0) {
        pb->opt_collect_gradients_case =
            KASMINA__V1__TRAIN_STEP_REQUEST__OPT_COLLECT_GRADIENTS_COLLECT_GRADIENTS;
        pb->collect_gradients = t->collect_gradients != 0;
    }
    return 0;
}

void ksm_wire_train_result_from_pb(const Kasmina__V1__TrainStepResponse *pb,
                                   struct ksm_train_result *r)
{
    memset(r, 0, sizeof *r);
    r->loss = pb->loss;
    r->correct = pb->correct;
    r->total = pb->total;
    r->train_step = pb->train_step;
    r->gradients_collected = pb->gradients_collected;
    r->host_grad_norm = pb->host_grad_norm;
    r->host_param_count = pb->host_param_count;
    r->model_generation = pb->model_generation;
    r->compute_ns = pb->compute_ns;
    for (size_t i = 0; i < pb->n_seeds && i < KSM_MAX_SLOTS; i++) {
        const Kasmina__V1__SeedGradientStats *s = pb->seeds[i];
        struct ksm_seed_grad_stats *o = &r->seeds[r->n_seeds++];
        copy_str(o->slot_id, sizeof o->slot_id, s->slot_id);
        o->grad_norm = s->grad_norm;
        o->param_count = s->param_count;
        o->normalized_ratio = s->normalized_ratio;
        o->gradient_health = s->gradient_health;
        o->has_vanishing = s->has_vanishing;
        o->has_exploding = s->has_exploding;
    }
    for (size_t i = 0; i < pb->n_stepped_slots && i < KSM_MAX_SLOTS; i++)
        copy_str(r->stepped[r->n_stepped++], KSM_SLOT_ID_MAX, pb->stepped_slots[i]);
}
