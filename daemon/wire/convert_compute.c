/*
 * wire/convert_compute: Forward, FusedForward and Evaluate requests and results (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

/* ---- Compute ---- */

static int output_dtype_check(int v, int *out, char *err, size_t errlen)
{
    if (v == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED || v == KASMINA__V1__DTYPE__DTYPE_F32 ||
        v == KASMINA__V1__DTYPE__DTYPE_F16 || v == KASMINA__V1__DTYPE__DTYPE_BF16) {
        *out = v == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED ? KASMINA__V1__DTYPE__DTYPE_F32 : v;
        return 0;
    }
    return ksm_errf(err, errlen, KSM_EINVAL,
                    "output_dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got %d.", v);
}

static int input_tensor(const Kasmina__V1__Tensor *pb, const char *field, struct ksm_pb_arena *a,
                        const ksm_tensor **out, char *err, size_t errlen)
{
    ksm_tensor *t = ANEW(a, ksm_tensor);
    if (t == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_tensor_from_pb(pb, field, a, t, err, errlen));
    *out = t;
    return 0;
}

int ksm_wire_forward_from_pb(const Kasmina__V1__ForwardRequest *pb, struct ksm_pb_arena *a,
                             struct ksm_forward_args *out, int *output_dtype, char *err,
                             size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_model_id(pb->model_id, "model_id", true, err, errlen));
    KSM_TRY(input_tensor(pb->input, "input", a, &out->input, err, errlen));
    KSM_TRY(ksm_wire_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    KSM_TRY(output_dtype_check((int)pb->output_dtype, output_dtype, err, errlen));
    out->stream = str_or_empty(pb->stream);
    return 0;
}

int ksm_wire_fused_forward_from_pb(const Kasmina__V1__FusedForwardRequest *pb,
                                   struct ksm_pb_arena *a, struct ksm_forward_args *out,
                                   int *output_dtype, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_model_id(pb->model_id, "model_id", true, err, errlen));
    KSM_TRY(input_tensor(pb->input, "input", a, &out->input, err, errlen));
    KSM_TRY(ksm_wire_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    KSM_TRY(output_dtype_check((int)pb->output_dtype, output_dtype, err, errlen));
    out->stream = str_or_empty(pb->stream);
    out->fused = true;
    if (pb->n_overrides > KSM_MAX_SLOTS)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "overrides has %zu entries; at most %d are allowed.", pb->n_overrides,
                        KSM_MAX_SLOTS);
    if (out->input->ndim < 1)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "input must have a batch dimension for a fused forward.");
    size_t rows = (size_t)out->input->shape[0];
    struct ksm_alpha_override *ov = ANEWN(a, struct ksm_alpha_override, pb->n_overrides);
    if (ov == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_overrides; i++) {
        const Kasmina__V1__AlphaOverride *o = pb->overrides[i];
        char f[96];
        snprintf(f, sizeof f, "overrides[%zu].slot_id", i);
        KSM_TRY(ksm_wire_check_slot_id(o->slot_id, f, true, err, errlen));
        for (size_t j = 0; j < i; j++)
            if (strcmp(o->slot_id, pb->overrides[j]->slot_id) == 0)
                return ksm_errf(err, errlen, KSM_EINVAL, "overrides[%zu] repeats slot '%s'.", i,
                                o->slot_id);
        if (o->n_alpha != rows)
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "overrides[%zu].alpha has %zu values; the input has %zu rows.", i,
                            o->n_alpha, rows);
        for (size_t k = 0; k < o->n_alpha; k++)
            if (isnan(o->alpha[k]))
                return ksm_errf(err, errlen, KSM_EINVAL,
                                "overrides[%zu].alpha[%zu] must not be NaN.", i, k);
        ov[i].slot_id = o->slot_id;
        ov[i].alpha = o->alpha;
        ov[i].n = o->n_alpha;
    }
    out->overrides = ov;
    out->n_overrides = pb->n_overrides;
    return 0;
}

static int input_to_pb(const ksm_tensor *t, struct ksm_pb_arena *a, Kasmina__V1__Tensor **out)
{
    *out = NULL;
    if (t == NULL) return 0;
    Kasmina__V1__Tensor *pb = ANEW(a, Kasmina__V1__Tensor);
    if (pb == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_tensor_to_pb(t, a, pb));
    *out = pb;
    return 0;
}

int ksm_wire_forward_to_pb(const char *model_id, const struct ksm_forward_args *args,
                           int output_dtype, struct ksm_pb_arena *a,
                           Kasmina__V1__ForwardRequest *pb)
{
    kasmina__v1__forward_request__init(pb);
    pb->model_id = pbstr(model_id);
    KSM_TRY(input_to_pb(args->input, a, &pb->input));
    pb->stream = pbstr(args->stream);
    pb->output_dtype = (Kasmina__V1__DType)output_dtype;
    return 0;
}

int ksm_wire_fused_forward_to_pb(const char *model_id, const struct ksm_forward_args *args,
                                 int output_dtype, struct ksm_pb_arena *a,
                                 Kasmina__V1__FusedForwardRequest *pb)
{
    kasmina__v1__fused_forward_request__init(pb);
    pb->model_id = pbstr(model_id);
    KSM_TRY(input_to_pb(args->input, a, &pb->input));
    pb->stream = pbstr(args->stream);
    pb->output_dtype = (Kasmina__V1__DType)output_dtype;
    if (args->n_overrides > 0) {
        pb->overrides = ANEWN(a, Kasmina__V1__AlphaOverride *, args->n_overrides);
        Kasmina__V1__AlphaOverride *o = ANEWN(a, Kasmina__V1__AlphaOverride, args->n_overrides);
        if (pb->overrides == NULL || o == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < args->n_overrides; i++) {
            kasmina__v1__alpha_override__init(&o[i]);
            o[i].slot_id = pbstr(args->overrides[i].slot_id);
            o[i].alpha = (float *)args->overrides[i].alpha;
            o[i].n_alpha = args->overrides[i].n;
            pb->overrides[i] = &o[i];
        }
        pb->n_overrides = args->n_overrides;
    }
    return 0;
}

int ksm_wire_forward_result_to_pb(const struct ksm_forward_result *r, int output_dtype,
                                  struct ksm_pb_arena *a, Kasmina__V1__ForwardResponse *pb,
                                  char *err, size_t errlen)
{
    kasmina__v1__forward_response__init(pb);
    pb->output = ANEW(a, Kasmina__V1__Tensor);
    if (pb->output == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_tensor_to_pb_as(&r->output, output_dtype, "output_dtype", a, pb->output, err,
                                     errlen));
    pb->model_generation = r->model_generation;
    pb->compute_ns = r->compute_ns;
    return 0;
}

static int forward_result_from_pb(const Kasmina__V1__ForwardResponse *pb, bool take,
                                  struct ksm_forward_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    if (take)
        KSM_TRY(ksm_wire_tensor_from_pb_take(pb->output, "output", &r->output, err, errlen));
    else
        KSM_TRY(ksm_wire_tensor_from_pb_copy(pb->output, "output", &r->output, err, errlen));
    r->model_generation = pb->model_generation;
    r->compute_ns = pb->compute_ns;
    return 0;
}

int ksm_wire_forward_result_from_pb(const Kasmina__V1__ForwardResponse *pb,
                                    struct ksm_forward_result *r, char *err, size_t errlen)
{
    return forward_result_from_pb(pb, false, r, err, errlen);
}

int ksm_wire_forward_result_take_pb(Kasmina__V1__ForwardResponse *pb, struct ksm_forward_result *r,
                                    char *err, size_t errlen)
{
    return forward_result_from_pb(pb, true, r, err, errlen);
}

int ksm_wire_alpha_config_from_pb(const Kasmina__V1__AlphaConfig *pb, size_t index,
                                  struct ksm_pb_arena *a, struct ksm_alpha_config *out, char *err,
                                  size_t errlen)
{
    memset(out, 0, sizeof *out);
    char f[96];
    snprintf(f, sizeof f, "configs[%zu].name", index);
    KSM_TRY(ksm_wire_check_string(pb->name, f, true, 63, err, errlen));
    if (pb->n_alpha > KSM_MAX_SLOTS)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "configs[%zu].alpha has %zu entries; at most %d are allowed.", index,
                        pb->n_alpha, KSM_MAX_SLOTS);
    const char **ids = ANEWN(a, const char *, pb->n_alpha);
    float *al = ANEWN(a, float, pb->n_alpha);
    if (ids == NULL || al == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_alpha; i++) {
        const Kasmina__V1__AlphaConfig__AlphaEntry *e = pb->alpha[i];
        snprintf(f, sizeof f, "configs[%zu].alpha key", index);
        KSM_TRY(ksm_wire_check_slot_id(e->key, f, true, err, errlen));
        if (isnan(e->value))
            return ksm_errf(err, errlen, KSM_EINVAL, "configs[%zu].alpha['%s'] must not be NaN.",
                            index, e->key);
        for (size_t j = 0; j < i; j++)
            if (strcmp(ids[j], e->key) == 0)
                return ksm_errf(err, errlen, KSM_EINVAL, "configs[%zu].alpha repeats slot '%s'.",
                                index, e->key);
        ids[i] = e->key;
        al[i] = e->value;
    }
    out->name = pb->name;
    out->slot_ids = ids;
    out->alpha = al;
    out->n = pb->n_alpha;
    return 0;
}

int ksm_wire_alpha_config_to_pb(const struct ksm_alpha_config *c, struct ksm_pb_arena *a,
                                Kasmina__V1__AlphaConfig *pb)
{
    kasmina__v1__alpha_config__init(pb);
    pb->name = pbstr(c->name);
    if (c->n > 0) {
        pb->alpha = ANEWN(a, Kasmina__V1__AlphaConfig__AlphaEntry *, c->n);
        Kasmina__V1__AlphaConfig__AlphaEntry *e =
            ANEWN(a, Kasmina__V1__AlphaConfig__AlphaEntry, c->n);
        if (pb->alpha == NULL || e == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < c->n; i++) {
            kasmina__v1__alpha_config__alpha_entry__init(&e[i]);
            e[i].key = pbstr(c->slot_ids[i]);
            e[i].value = c->alpha[i];
            pb->alpha[i] = &e[i];
        }
        pb->n_alpha = c->n;
    }
    return 0;
}

int ksm_wire_evaluate_from_pb(const Kasmina__V1__EvaluateRequest *pb, struct ksm_pb_arena *a,
                              struct ksm_evaluate_args *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    KSM_TRY(ksm_wire_check_model_id(pb->model_id, "model_id", true, err, errlen));
    KSM_TRY(input_tensor(pb->input, "input", a, &out->input, err, errlen));
    KSM_TRY(input_tensor(pb->targets, "targets", a, &out->targets, err, errlen));
    if (out->targets->dtype != KSM_DTYPE_I64 && out->targets->dtype != KSM_DTYPE_I32)
        return ksm_errf(err, errlen, KSM_EINVAL, "targets.dtype must be DTYPE_I64 or DTYPE_I32.");
    KSM_TRY(ksm_wire_check_string(pb->stream, "stream", false, KSM_ID_MAX, err, errlen));
    out->stream = str_or_empty(pb->stream);
    int mode = (int)pb->attribution;
    if (mode < KASMINA__V1__ATTRIBUTION_MODE__ATTRIBUTION_NONE ||
        mode > KASMINA__V1__ATTRIBUTION_MODE__ATTRIBUTION_PERMUTATION)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "attribution must be ATTRIBUTION_NONE, ATTRIBUTION_AUTO, "
                        "ATTRIBUTION_EXACT or ATTRIBUTION_PERMUTATION, got %d.",
                        mode);
    if (pb->shapley_samples > KSM_SHAPLEY_SAMPLES_MAX)
        return ksm_errf(err, errlen, KSM_EINVAL, "shapley_samples is %u; at most %d are allowed.",
                        pb->shapley_samples, KSM_SHAPLEY_SAMPLES_MAX);
    if (pb->n_configs == 0 && !pb->generate_standard &&
        mode == KASMINA__V1__ATTRIBUTION_MODE__ATTRIBUTION_NONE)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "configs must not be empty unless generate_standard or attribution is "
                        "set.");
    if (pb->n_configs > 256)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "configs has %zu entries; at most 256 are allowed.", pb->n_configs);
    struct ksm_alpha_config *c = ANEWN(a, struct ksm_alpha_config, pb->n_configs);
    if (c == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_configs; i++) {
        KSM_TRY(ksm_wire_alpha_config_from_pb(pb->configs[i], i, a, &c[i], err, errlen));
        for (size_t j = 0; j < i; j++)
            if (strcmp(c[i].name, c[j].name) == 0)
                return ksm_errf(err, errlen, KSM_EINVAL, "configs[%zu].name repeats '%s'.", i,
                                c[i].name);
    }
    out->configs = c;
    out->n_configs = pb->n_configs;
    out->generate_standard = pb->generate_standard;
    out->return_logits = pb->return_logits;
    out->attribution = (enum ksm_attribution_mode)mode;
    out->shapley_samples = pb->shapley_samples;
    out->attribution_seed = pb->attribution_seed;
    return 0;
}

int ksm_wire_evaluate_to_pb(const char *model_id, const struct ksm_evaluate_args *args,
                            struct ksm_pb_arena *a, Kasmina__V1__EvaluateRequest *pb)
{
    kasmina__v1__evaluate_request__init(pb);
    pb->model_id = pbstr(model_id);
    KSM_TRY(input_to_pb(args->input, a, &pb->input));
    KSM_TRY(input_to_pb(args->targets, a, &pb->targets));
    if (args->n_configs > 0) {
        pb->configs = ANEWN(a, Kasmina__V1__AlphaConfig *, args->n_configs);
        Kasmina__V1__AlphaConfig *c = ANEWN(a, Kasmina__V1__AlphaConfig, args->n_configs);
        if (pb->configs == NULL || c == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < args->n_configs; i++) {
            KSM_TRY(ksm_wire_alpha_config_to_pb(&args->configs[i], a, &c[i]));
            pb->configs[i] = &c[i];
        }
        pb->n_configs = args->n_configs;
    }
    pb->generate_standard = args->generate_standard;
    pb->return_logits = args->return_logits;
    pb->stream = pbstr(args->stream);
    pb->attribution = (Kasmina__V1__AttributionMode)args->attribution;
    pb->shapley_samples = args->shapley_samples;
    pb->attribution_seed = args->attribution_seed;
    return 0;
}

int ksm_wire_config_result_to_pb(const struct ksm_config_result *c, struct ksm_pb_arena *a,
                                 Kasmina__V1__ConfigResult *pb)
{
    kasmina__v1__config_result__init(pb);
    pb->name = (char *)c->name;
    pb->loss = c->loss;
    pb->accuracy = c->accuracy;
    pb->correct = c->correct;
    pb->total = c->total;
    if (c->logits.data != NULL) KSM_TRY(input_to_pb(&c->logits, a, &pb->logits));
    return 0;
}

static int config_result_from_pb(const Kasmina__V1__ConfigResult *pb, bool take,
                                 struct ksm_config_result *c, char *err, size_t errlen)
{
    memset(c, 0, sizeof *c);
    copy_str(c->name, sizeof c->name, pb->name);
    c->loss = pb->loss;
    c->accuracy = pb->accuracy;
    c->correct = pb->correct;
    c->total = pb->total;
    if (pb->logits != NULL && take)
        KSM_TRY(ksm_wire_tensor_from_pb_take(pb->logits, "logits", &c->logits, err, errlen));
    else if (pb->logits != NULL)
        KSM_TRY(ksm_wire_tensor_from_pb_copy(pb->logits, "logits", &c->logits, err, errlen));
    return 0;
}

int ksm_wire_config_result_from_pb(const Kasmina__V1__ConfigResult *pb, struct ksm_config_result *c,
                                   char *err, size_t errlen)
{
    return config_result_from_pb(pb, false, c, err, errlen);
}

int ksm_wire_evaluate_result_to_pb(const struct ksm_evaluate_result *r, struct ksm_pb_arena *a,
                                   Kasmina__V1__EvaluateResponse *pb)
{
    kasmina__v1__evaluate_response__init(pb);
    if (r->n > 0) {
        pb->results = ANEWN(a, Kasmina__V1__ConfigResult *, r->n);
        Kasmina__V1__ConfigResult *c = ANEWN(a, Kasmina__V1__ConfigResult, r->n);
        if (pb->results == NULL || c == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < r->n; i++) {
            KSM_TRY(ksm_wire_config_result_to_pb(&r->results[i], a, &c[i]));
            pb->results[i] = &c[i];
        }
        pb->n_results = r->n;
    }
    pb->model_generation = r->model_generation;
    pb->compute_ns = r->compute_ns;
    if (r->n_shapley > 0) {
        pb->shapley = ANEWN(a, Kasmina__V1__ShapleyEstimate *, r->n_shapley);
        Kasmina__V1__ShapleyEstimate *e = ANEWN(a, Kasmina__V1__ShapleyEstimate, r->n_shapley);
        if (pb->shapley == NULL || e == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < r->n_shapley; i++) {
            const struct ksm_shapley_estimate *s = &r->shapley[i];
            kasmina__v1__shapley_estimate__init(&e[i]);
            e[i].slot_id = (char *)s->slot_id;
            e[i].mean = s->mean;
            e[i].std = s->std;
            e[i].n_samples = s->n_samples;
            e[i].algorithm = (char *)s->algorithm;
            e[i].marginal = s->marginal;
            pb->shapley[i] = &e[i];
        }
        pb->n_shapley = r->n_shapley;
    }
    if (r->n_interactions > 0) {
        pb->interactions = ANEWN(a, Kasmina__V1__InteractionTerm *, r->n_interactions);
        Kasmina__V1__InteractionTerm *t = ANEWN(a, Kasmina__V1__InteractionTerm, r->n_interactions);
        if (pb->interactions == NULL || t == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < r->n_interactions; i++) {
            kasmina__v1__interaction_term__init(&t[i]);
            t[i].slot_a = (char *)r->interactions[i].slot_a;
            t[i].slot_b = (char *)r->interactions[i].slot_b;
            t[i].interaction = r->interactions[i].interaction;
            pb->interactions[i] = &t[i];
        }
        pb->n_interactions = r->n_interactions;
    }
    return 0;
}

static int evaluate_result_from_pb(const Kasmina__V1__EvaluateResponse *pb, bool take,
                                   struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    r->model_generation = pb->model_generation;
    r->compute_ns = pb->compute_ns;
    if (pb->n_shapley > 0) {
        r->shapley = calloc(pb->n_shapley, sizeof *r->shapley);
        if (r->shapley == NULL) return KSM_ENOMEM;
        r->n_shapley = pb->n_shapley;
        for (size_t i = 0; i < pb->n_shapley; i++) {
            const Kasmina__V1__ShapleyEstimate *e = pb->shapley[i];
            struct ksm_shapley_estimate *s = &r->shapley[i];
            copy_str(s->slot_id, sizeof s->slot_id, e->slot_id);
            s->mean = e->mean;
            s->std = e->std;
            s->n_samples = e->n_samples;
            copy_str(s->algorithm, sizeof s->algorithm, e->algorithm);
            s->marginal = e->marginal;
        }
    }
    if (pb->n_interactions > 0) {
        r->interactions = calloc(pb->n_interactions, sizeof *r->interactions);
        if (r->interactions == NULL) return KSM_ENOMEM; /* the caller frees what was converted */
        r->n_interactions = pb->n_interactions;
        for (size_t i = 0; i < pb->n_interactions; i++) {
            const Kasmina__V1__InteractionTerm *t = pb->interactions[i];
            copy_str(r->interactions[i].slot_a, sizeof r->interactions[i].slot_a, t->slot_a);
            copy_str(r->interactions[i].slot_b, sizeof r->interactions[i].slot_b, t->slot_b);
            r->interactions[i].interaction = t->interaction;
        }
    }
    if (pb->n_results == 0) return 0;
    r->results = calloc(pb->n_results, sizeof *r->results);
    if (r->results == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < pb->n_results; i++) {
        int rc = config_result_from_pb(pb->results[i], take, &r->results[i], err, errlen);
        r->n = i + 1;
        if (rc != 0) return rc; /* the caller frees what was converted */
    }
    return 0;
}

int ksm_wire_evaluate_result_from_pb(const Kasmina__V1__EvaluateResponse *pb,
                                     struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    return evaluate_result_from_pb(pb, false, r, err, errlen);
}

int ksm_wire_evaluate_result_take_pb(Kasmina__V1__EvaluateResponse *pb,
                                     struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    return evaluate_result_from_pb(pb, true, r, err, errlen);
}
