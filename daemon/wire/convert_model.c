/*
 * wire/convert_model: model specs and Model (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

/* ---- Models ---- */

void ksm_wire_cnn_spec_from_pb(const Kasmina__V1__CnnHostSpec *pb, struct ksm_cnn_spec *out,
                               bool *pool_layers_set)
{
    memset(out, 0, sizeof *out);
    *pool_layers_set = false;
    out->pool_layers = -1;
    if (pb == NULL) return;
    out->num_classes = pb->num_classes;
    out->n_blocks = pb->n_blocks;
    out->base_channels = pb->base_channels;
    out->kernel_size = pb->kernel_size;
    out->in_channels = pb->in_channels;
    if (pb->opt_pool_layers_case == KASMINA__V1__CNN_HOST_SPEC__OPT_POOL_LAYERS_POOL_LAYERS) {
        *pool_layers_set = true;
        out->pool_layers = pb->pool_layers > INT32_MAX ? INT32_MAX : (int32_t)pb->pool_layers;
    }
}

/* The double nearest to the shortest decimal that reads back as f (a client's 0.1 arrives as the
 * float 0.100000001; the engine then uses 0.1, what the client meant and what esper uses). */
static double float_as_decimal(float f)
{
    char buf[32];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if ((float)strtod(buf, NULL) == f) return strtod(buf, NULL);
    }
    return (double)f;
}

void ksm_wire_transformer_spec_from_pb(const Kasmina__V1__TransformerHostSpec *pb,
                                       struct ksm_transformer_spec *out)
{
    memset(out, 0, sizeof *out);
    if (pb == NULL) return;
    out->vocab_size = pb->vocab_size;
    out->n_embd = pb->n_embd;
    out->n_head = pb->n_head;
    out->n_layer = pb->n_layer;
    out->block_size = pb->block_size;
    out->num_segments = pb->num_segments;
    if (pb->opt_dropout_case == KASMINA__V1__TRANSFORMER_HOST_SPEC__OPT_DROPOUT_DROPOUT) {
        out->dropout = float_as_decimal(pb->dropout); /* the range is the engine's check */
        out->dropout_set = true;
    }
}

int ksm_wire_model_spec_from_pb(const Kasmina__V1__CreateModelRequest *pb,
                                struct ksm_model_spec *spec, char *err, size_t errlen)
{
    memset(spec, 0, sizeof *spec);
    KSM_TRY(ksm_wire_check_model_id(pb->model_id, "model_id", false, err, errlen));
    switch (pb->host_case) {
    case KASMINA__V1__CREATE_MODEL_REQUEST__HOST__NOT_SET:
    case KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN:
        spec->topology = KSM_TOPOLOGY_CNN;
        ksm_wire_cnn_spec_from_pb(
            pb->host_case == KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN ? pb->cnn : NULL,
            &spec->cnn, &spec->pool_layers_set);
        break;
    case KASMINA__V1__CREATE_MODEL_REQUEST__HOST_TRANSFORMER:
        spec->topology = KSM_TOPOLOGY_TRANSFORMER;
        ksm_wire_transformer_spec_from_pb(pb->transformer, &spec->transformer);
        spec->cnn.pool_layers = -1;
        break;
    default:
        return ksm_errf(err, errlen, KSM_EINVAL, "host has an unknown case %d.",
                        (int)pb->host_case);
    }
    if (pb->n_slots > KSM_MAX_SLOTS)
        return ksm_errf(err, errlen, KSM_EINVAL, "slots lists %zu slots; at most %d are allowed.",
                        pb->n_slots, KSM_MAX_SLOTS);
    for (size_t i = 0; i < pb->n_slots; i++) {
        char f[96];
        snprintf(f, sizeof f, "slots[%zu]", i);
        KSM_TRY(ksm_wire_check_slot_id(pb->slots[i], f, true, err, errlen));
        for (size_t j = 0; j < i; j++)
            if (strcmp(pb->slots[i], pb->slots[j]) == 0)
                return ksm_errf(err, errlen, KSM_EINVAL, "slots[%zu] repeats slot '%s'.", i,
                                pb->slots[i]);
    }
    spec->slots = (const char *const *)pb->slots;
    spec->n_slots = (int)pb->n_slots;
    KSM_TRY(ksm_wire_check_string(pb->device, "device", false, 31, err, errlen));
    spec->device = str_or_empty(pb->device);
    if (pb->dtype == KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED)
        spec->dtype = KSM_DTYPE_F32;
    else
        KSM_TRY(ksm_wire_dtype_from_pb((int)pb->dtype, "dtype", &spec->dtype, err, errlen));
    if (spec->dtype == KSM_DTYPE_I64 || spec->dtype == KSM_DTYPE_I32)
        return ksm_errf(err, errlen, KSM_EINVAL, "dtype must be a floating-point compute dtype.");
    spec->init_seed = pb->init_seed;
    spec->permissive_gates = pb->permissive_gates;
    for (size_t i = 0; i < pb->n_auto_forward_gates; i++) {
        char f[96];
        snprintf(f, sizeof f, "auto_forward_gates[%zu]", i);
        enum ksm_gate_level g = KSM_GATE_G0;
        KSM_TRY(ksm_wire_gate_level_from_pb((int)pb->auto_forward_gates[i], f, &g, err, errlen));
        if (g != KSM_GATE_G1 && g != KSM_GATE_G2 && g != KSM_GATE_G3)
            return ksm_errf(err, errlen, KSM_EINVAL, "%s must be GATE_G1, GATE_G2 or GATE_G3.", f);
        spec->auto_forward_gates |= 1u << g;
    }
    return 0;
}

static int cnn_to_pb(const struct ksm_cnn_spec *c, bool pool_set, struct ksm_pb_arena *a,
                     Kasmina__V1__CnnHostSpec **out)
{
    Kasmina__V1__CnnHostSpec *pb = ANEW(a, Kasmina__V1__CnnHostSpec);
    if (pb == NULL) return KSM_ENOMEM;
    kasmina__v1__cnn_host_spec__init(pb);
    pb->num_classes = c->num_classes;
    pb->n_blocks = c->n_blocks;
    pb->base_channels = c->base_channels;
    pb->kernel_size = c->kernel_size;
    pb->in_channels = c->in_channels;
    if (pool_set && c->pool_layers >= 0) {
        pb->opt_pool_layers_case = KASMINA__V1__CNN_HOST_SPEC__OPT_POOL_LAYERS_POOL_LAYERS;
        pb->pool_layers = (uint32_t)c->pool_layers;
    }
    *out = pb;
    return 0;
}

static int transformer_to_pb(const struct ksm_transformer_spec *t, struct ksm_pb_arena *a,
                             Kasmina__V1__TransformerHostSpec **out)
{
    Kasmina__V1__TransformerHostSpec *pb = ANEW(a, Kasmina__V1__TransformerHostSpec);
    if (pb == NULL) return KSM_ENOMEM;
    kasmina__v1__transformer_host_spec__init(pb);
    pb->vocab_size = t->vocab_size;
    pb->n_embd = t->n_embd;
    pb->n_head = t->n_head;
    pb->n_layer = t->n_layer;
    pb->block_size = t->block_size;
    pb->num_segments = t->num_segments;
    if (t->dropout_set) {
        pb->opt_dropout_case = KASMINA__V1__TRANSFORMER_HOST_SPEC__OPT_DROPOUT_DROPOUT;
        pb->dropout = (float)t->dropout;
    }
    *out = pb;
    return 0;
}

int ksm_wire_model_spec_to_pb(const char *model_id, const struct ksm_model_spec *spec,
                              struct ksm_pb_arena *a, Kasmina__V1__CreateModelRequest *pb)
{
    kasmina__v1__create_model_request__init(pb);
    pb->model_id = pbstr(model_id);
    if (spec->topology == KSM_TOPOLOGY_TRANSFORMER) {
        pb->host_case = KASMINA__V1__CREATE_MODEL_REQUEST__HOST_TRANSFORMER;
        KSM_TRY(transformer_to_pb(&spec->transformer, a, &pb->transformer));
    } else {
        pb->host_case = KASMINA__V1__CREATE_MODEL_REQUEST__HOST_CNN;
        KSM_TRY(cnn_to_pb(&spec->cnn, spec->pool_layers_set, a, &pb->cnn));
    }
    if (spec->n_slots > 0) {
        pb->slots = ANEWN(a, char *, (size_t)spec->n_slots);
        if (pb->slots == NULL) return KSM_ENOMEM;
        for (int i = 0; i < spec->n_slots; i++) pb->slots[i] = pbstr(spec->slots[i]);
        pb->n_slots = (size_t)spec->n_slots;
    }
    pb->device = pbstr(spec->device);
    pb->dtype = ksm_wire_dtype_to_pb(spec->dtype);
    pb->init_seed = spec->init_seed;
    pb->permissive_gates = spec->permissive_gates;
    size_t n = 0;
    Kasmina__V1__GateLevel *g = ANEWN(a, Kasmina__V1__GateLevel, 8);
    if (g == NULL) return KSM_ENOMEM;
    for (int lvl = 0; lvl <= 5; lvl++)
        if (spec->auto_forward_gates & (1u << lvl)) g[n++] = (Kasmina__V1__GateLevel)lvl;
    pb->auto_forward_gates = g;
    pb->n_auto_forward_gates = n;
    return 0;
}

int ksm_wire_model_to_pb(const struct ksm_model_info *info, struct ksm_pb_arena *a,
                         Kasmina__V1__Model *pb)
{
    kasmina__v1__model__init(pb);
    pb->model_id = (char *)info->model_id;
    pb->topology = (Kasmina__V1__Topology)info->topology;
    if (info->topology == KSM_TOPOLOGY_TRANSFORMER) {
        pb->host_case = KASMINA__V1__MODEL__HOST_TRANSFORMER;
        KSM_TRY(transformer_to_pb(&info->transformer, a, &pb->transformer));
    } else if (info->topology == KSM_TOPOLOGY_CNN) {
        pb->host_case = KASMINA__V1__MODEL__HOST_CNN;
        KSM_TRY(cnn_to_pb(&info->cnn, true, a, &pb->cnn));
    }
    pb->device = (char *)info->device;
    pb->dtype = ksm_wire_dtype_to_pb(info->dtype);
    int n = info->n_slots < 0 ? 0 : info->n_slots > KSM_MAX_SLOTS ? KSM_MAX_SLOTS : info->n_slots;
    if (n > 0) {
        pb->slots = ANEWN(a, Kasmina__V1__SlotInfo *, (size_t)n);
        Kasmina__V1__SlotInfo *s = ANEWN(a, Kasmina__V1__SlotInfo, (size_t)n);
        if (pb->slots == NULL || s == NULL) return KSM_ENOMEM;
        for (int i = 0; i < n; i++) {
            kasmina__v1__slot_info__init(&s[i]);
            s[i].slot_id = (char *)info->slots[i].slot_id;
            s[i].channels = info->slots[i].channels;
            s[i].order = info->slots[i].order;
            s[i].surface = pbstr(info->slots[i].surface);
            pb->slots[i] = &s[i];
        }
        pb->n_slots = (size_t)n;
    }
    pb->host_params = info->host_params;
    pb->seed_params = info->seed_params;
    pb->generation = info->generation;
    pb->resident_bytes = info->resident_bytes;
    pb->train_step = info->train_step;
    pb->checkpoint_step = info->checkpoint_step;
    return 0;
}

static const char *surface_intern(const char *s)
{
    static const char *const known[] = {"pre_pool", "post_pool", "block_end"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (s != NULL && strcmp(s, known[i]) == 0) return known[i];
    return "";
}

int ksm_wire_model_from_pb(const Kasmina__V1__Model *pb, struct ksm_model_info *info, char *err,
                           size_t errlen)
{
    memset(info, 0, sizeof *info);
    copy_str(info->model_id, sizeof info->model_id, pb->model_id);
    if (pb->topology < 0 || pb->topology > 2)
        return ksm_errf(err, errlen, KSM_EINVAL, "topology has an unknown value %d.",
                        (int)pb->topology);
    info->topology = (enum ksm_topology)pb->topology;
    bool pool_set;
    ksm_wire_cnn_spec_from_pb(pb->host_case == KASMINA__V1__MODEL__HOST_CNN ? pb->cnn : NULL,
                              &info->cnn, &pool_set);
    ksm_wire_transformer_spec_from_pb(
        pb->host_case == KASMINA__V1__MODEL__HOST_TRANSFORMER ? pb->transformer : NULL,
        &info->transformer);
    copy_str(info->device, sizeof info->device, pb->device);
    if (pb->dtype != KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED)
        KSM_TRY(ksm_wire_dtype_from_pb((int)pb->dtype, "dtype", &info->dtype, err, errlen));
    if (pb->n_slots > KSM_MAX_SLOTS)
        return ksm_errf(err, errlen, KSM_EINVAL, "slots lists %zu slots; at most %d are allowed.",
                        pb->n_slots, KSM_MAX_SLOTS);
    for (size_t i = 0; i < pb->n_slots; i++) {
        struct ksm_slot_info *s = &info->slots[i];
        const Kasmina__V1__SlotInfo *p = pb->slots[i];
        copy_str(s->slot_id, sizeof s->slot_id, p->slot_id);
        unsigned r, c;
        if (sscanf(s->slot_id, "r%uc%u", &r, &c) == 2) {
            s->row = r;
            s->col = c;
        }
        s->channels = p->channels;
        s->order = p->order;
        s->surface = surface_intern(p->surface);
    }
    info->n_slots = (int)pb->n_slots;
    info->host_params = pb->host_params;
    info->seed_params = pb->seed_params;
    info->generation = pb->generation;
    info->resident_bytes = pb->resident_bytes;
    info->train_step = pb->train_step;
    info->checkpoint_step = pb->checkpoint_step;
    return 0;
}
