/*
 * libkasmina-client: one function per RPC. Requests are built and replies decoded with the rpc
 * layer's conversions (daemon/wire/convert.h); what only a client needs (server info, health,
 * the small request messages) is here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client_impl.h"
#include "grpc/health/v1/health.pb-c.h"
#include "kasmina/v1/kasmina.pb-c.h"
#include "wire/convert.h"

#define METHOD(name) "/kasmina.v1.Kasmina/" name
#define S(x)         ((char *)((x) ? (x) : ""))
#define UNARY(m, req, reply_type, reply, err)                                                      \
    ksmc_unary(c, METHOD(m), &(req).base, &reply_type##__descriptor,                               \
               (ProtobufCMessage **)&(reply), err)

static void free_reply(void *m)
{
    if (m) protobuf_c_message_free_unpacked(m, NULL);
}

/* A conversion of a reply failed: the server sent something this client cannot read. */
static int bad_reply(struct ksm_client_error *err, int rc, const char *msg)
{
    return ksmc_fail(err, rc ? rc : KSM_EFORMAT, 13 /* INTERNAL */, "bad reply from the server: %s",
                     msg);
}

static int encode_failed(struct ksm_client_error *err, int rc)
{
    if (rc == KSM_ENOMEM) return ksmc_fail(err, rc, 8, "out of memory building the request");
    return ksmc_fail(err, rc, 3, "the request could not be encoded: %s", ksm_strerror(rc));
}

static bool need(struct ksm_client_error *err, const void *p, const char *name, int *rc)
{
    if (p) return true;
    *rc = ksmc_fail(err, KSM_EINVAL, 3, "%s must not be NULL", name);
    return false;
}

static char **copy_strings(char **src, size_t n)
{
    char **v = calloc(n ? n : 1, sizeof *v);
    if (!v) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (!(v[i] = strdup(src[i] ? src[i] : ""))) {
            for (size_t j = 0; j < i; j++) free(v[j]);
            free(v);
            return NULL;
        }
    }
    return v;
}

static void free_strings(char **v, size_t n)
{
    if (!v) return;
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

// ---- Server ----

void ksm_client_server_info_free(struct ksm_client_server_info *info)
{
    if (!info) return;
    free_strings(info->extensions, info->n_extensions);
    free_strings(info->cnn_blueprints, info->n_cnn_blueprints);
    free_strings(info->transformer_blueprints, info->n_transformer_blueprints);
    free(info->devices);
    memset(info, 0, sizeof *info);
}

int ksm_client_server_info(ksm_client *c, struct ksm_client_server_info *out,
                           struct ksm_client_error *err)
{
    int rc;
    if (!need(err, out, "out", &rc)) return rc;
    memset(out, 0, sizeof *out);
    Kasmina__V1__GetServerInfoRequest req = KASMINA__V1__GET_SERVER_INFO_REQUEST__INIT;
    Kasmina__V1__ServerInfo *rep;
    if ((rc = UNARY("GetServerInfo", req, kasmina__v1__server_info, rep, err))) return rc;
    ksmc_strlcpy(out->name, rep->name, sizeof out->name);
    ksmc_strlcpy(out->version, rep->version, sizeof out->version);
    out->ready = rep->ready;
    out->extensions = copy_strings(rep->extensions, rep->n_extensions);
    out->n_extensions = rep->n_extensions;
    out->cnn_blueprints = copy_strings(rep->cnn_blueprints, rep->n_cnn_blueprints);
    out->n_cnn_blueprints = rep->n_cnn_blueprints;
    out->transformer_blueprints =
        copy_strings(rep->transformer_blueprints, rep->n_transformer_blueprints);
    out->n_transformer_blueprints = rep->n_transformer_blueprints;
    out->devices = calloc(rep->n_devices ? rep->n_devices : 1, sizeof *out->devices);
    out->n_devices = rep->n_devices;
    if (!out->extensions || !out->cnn_blueprints || !out->transformer_blueprints || !out->devices) {
        free_reply(rep);
        ksm_client_server_info_free(out);
        return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    }
    for (size_t i = 0; i < rep->n_devices; i++) {
        const Kasmina__V1__Device *d = rep->devices[i];
        struct ksm_client_device *o = &out->devices[i];
        ksmc_strlcpy(o->name, d->name, sizeof o->name);
        ksmc_strlcpy(o->kind, d->kind, sizeof o->kind);
        ksmc_strlcpy(o->description, d->description, sizeof o->description);
        o->total_bytes = d->total_bytes;
        o->memory_cap_bytes = d->memory_cap_bytes;
    }
    free_reply(rep);
    return 0;
}

const char *ksm_health_status_name(enum ksm_health_status s)
{
    switch (s) {
    case KSM_HEALTH_SERVING: return "SERVING";
    case KSM_HEALTH_NOT_SERVING: return "NOT_SERVING";
    case KSM_HEALTH_SERVICE_UNKNOWN: return "SERVICE_UNKNOWN";
    default: return "UNKNOWN";
    }
}

int ksm_client_health(ksm_client *c, const char *service, enum ksm_health_status *out,
                      struct ksm_client_error *err)
{
    int rc;
    if (!need(err, out, "out", &rc)) return rc;
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = S(service);
    Grpc__Health__V1__HealthCheckResponse *rep;
    rc = ksmc_unary(c, "/grpc.health.v1.Health/Check", &req.base,
                    &grpc__health__v1__health_check_response__descriptor, (ProtobufCMessage **)&rep,
                    err);
    if (rc) return rc;
    *out = (enum ksm_health_status)rep->status;
    free_reply(rep);
    return 0;
}

// ---- Models ----

static int model_reply(Kasmina__V1__Model *rep, struct ksm_model_info *out,
                       struct ksm_client_error *err)
{
    char msg[256] = "";
    int rc = out ? ksm_wire_model_from_pb(rep, out, msg, sizeof msg) : 0;
    free_reply(rep);
    return rc ? bad_reply(err, rc, msg) : 0;
}

int ksm_client_model_create(ksm_client *c, const char *model_id, const struct ksm_model_spec *spec,
                            struct ksm_model_info *out, struct ksm_client_error *err)
{
    int rc;
    if (!need(err, spec, "spec", &rc)) return rc;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__CreateModelRequest req;
    if ((rc = ksm_wire_model_spec_to_pb(model_id, spec, &a, &req))) {
        ksm_pb_arena_fini(&a);
        return encode_failed(err, rc);
    }
    Kasmina__V1__Model *rep;
    rc = UNARY("CreateModel", req, kasmina__v1__model, rep, err);
    ksm_pb_arena_fini(&a);
    return rc ? rc : model_reply(rep, out, err);
}

int ksm_client_model_get(ksm_client *c, const char *model_id, struct ksm_model_info *out,
                         struct ksm_client_error *err)
{
    Kasmina__V1__GetModelRequest req = KASMINA__V1__GET_MODEL_REQUEST__INIT;
    req.model_id = S(model_id);
    Kasmina__V1__Model *rep;
    int rc = UNARY("GetModel", req, kasmina__v1__model, rep, err);
    return rc ? rc : model_reply(rep, out, err);
}

int ksm_client_model_list(ksm_client *c, struct ksm_model_info **out, size_t *n,
                          struct ksm_client_error *err)
{
    int rc;
    if (!need(err, out, "out", &rc) || !need(err, n, "n", &rc)) return rc;
    *out = NULL;
    *n = 0;
    Kasmina__V1__ListModelsRequest req = KASMINA__V1__LIST_MODELS_REQUEST__INIT;
    Kasmina__V1__ListModelsResponse *rep;
    if ((rc = UNARY("ListModels", req, kasmina__v1__list_models_response, rep, err))) return rc;
    struct ksm_model_info *v = calloc(rep->n_models ? rep->n_models : 1, sizeof *v);
    if (!v) {
        free_reply(rep);
        return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    }
    char msg[256] = "";
    for (size_t i = 0; i < rep->n_models; i++) {
        if ((rc = ksm_wire_model_from_pb(rep->models[i], &v[i], msg, sizeof msg))) {
            free(v);
            free_reply(rep);
            return bad_reply(err, rc, msg);
        }
    }
    *out = v;
    *n = rep->n_models;
    free_reply(rep);
    return 0;
}

int ksm_client_model_delete(ksm_client *c, const char *model_id, uint64_t *freed_bytes,
                            struct ksm_client_error *err)
{
    Kasmina__V1__DeleteModelRequest req = KASMINA__V1__DELETE_MODEL_REQUEST__INIT;
    req.model_id = S(model_id);
    Kasmina__V1__DeleteModelResponse *rep;
    int rc = UNARY("DeleteModel", req, kasmina__v1__delete_model_response, rep, err);
    if (rc) return rc;
    if (freed_bytes) *freed_bytes = rep->freed_bytes;
    free_reply(rep);
    return 0;
}

/* The unary LoadWeights and ExportWeights (client/lib/weights.c chooses them or the streams). */
int ksmc_load_weights_unary(ksm_client *c, const char *model_id, const void *buf, size_t len,
                            bool strict, struct ksm_load_result *r, struct ksm_client_error *err)
{
    if (r) memset(r, 0, sizeof *r);
    Kasmina__V1__LoadWeightsRequest req = KASMINA__V1__LOAD_WEIGHTS_REQUEST__INIT;
    req.model_id = S(model_id);
    req.safetensors.data = (uint8_t *)buf;
    req.safetensors.len = buf ? len : 0;
    req.strict = strict;
    Kasmina__V1__LoadWeightsResponse *rep;
    int rc = UNARY("LoadWeights", req, kasmina__v1__load_weights_response, rep, err);
    if (rc) return rc;
    if (r && (rc = ksm_wire_load_result_from_pb(rep, r))) {
        free_reply(rep);
        return ksmc_fail(err, rc, 8, "out of memory");
    }
    free_reply(rep);
    return 0;
}

int ksmc_export_weights_unary(ksm_client *c, const char *model_id, const char *const *slots,
                              size_t n_slots, bool include_host, void **buf, size_t *len,
                              struct ksm_client_error *err)
{
    int rc;
    if (!need(err, buf, "buf", &rc) || !need(err, len, "len", &rc)) return rc;
    *buf = NULL;
    *len = 0;
    Kasmina__V1__ExportWeightsRequest req = KASMINA__V1__EXPORT_WEIGHTS_REQUEST__INIT;
    req.model_id = S(model_id);
    req.slots = (char **)slots;
    req.n_slots = slots ? n_slots : 0;
    req.include_host = include_host;
    Kasmina__V1__ExportWeightsResponse *rep;
    if ((rc = UNARY("ExportWeights", req, kasmina__v1__export_weights_response, rep, err)))
        return rc;
    /* The reply's bytes are malloc'd (ksmc_unary unpacks with the default allocator): take
     * them rather than copy the whole file again. */
    void *b = rep->safetensors.data;
    if (!b && !(b = malloc(1))) {
        free_reply(rep);
        return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    }
    *buf = b;
    *len = rep->safetensors.len;
    rep->safetensors.data = NULL;
    rep->safetensors.len = 0;
    free_reply(rep);
    return 0;
}

int ksm_client_model_move(ksm_client *c, const char *model_id, const char *device, int dtype,
                          struct ksm_model_info *out, struct ksm_client_error *err)
{
    Kasmina__V1__MoveModelRequest req = KASMINA__V1__MOVE_MODEL_REQUEST__INIT;
    req.model_id = S(model_id);
    req.device = S(device);
    if (dtype >= 0) {
        if (dtype >= KSM_DTYPE_COUNT)
            return ksmc_fail(err, KSM_EINVAL, 3, "dtype %d is not a kasmina dtype", dtype);
        req.dtype = ksm_wire_dtype_to_pb((enum ksm_dtype)dtype);
    }
    Kasmina__V1__Model *rep;
    int rc = UNARY("MoveModel", req, kasmina__v1__model, rep, err);
    return rc ? rc : model_reply(rep, out, err);
}

// ---- Lifecycle ----

static int report_reply(const Kasmina__V1__SlotReport *pb, struct ksm_slot_report *r,
                        struct ksm_client_error *err)
{
    if (!r) return 0;
    if (!pb) {
        memset(r, 0, sizeof *r);
        return bad_reply(err, KSM_EFORMAT, "the reply carries no slot report");
    }
    char msg[256] = "";
    int rc = ksm_wire_slot_report_from_pb(pb, r, msg, sizeof msg);
    return rc ? bad_reply(err, rc, msg) : 0;
}

int ksm_client_germinate(ksm_client *c, const char *model_id, const char *slot_id,
                         const struct ksm_germinate_args *a, struct ksm_slot_report *report,
                         struct ksm_client_error *err)
{
    int rc;
    if (!need(err, a, "args", &rc)) return rc;
    struct ksm_pb_arena ar;
    ksm_pb_arena_init(&ar);
    Kasmina__V1__GerminateRequest req;
    if ((rc = ksm_wire_germinate_to_pb(model_id, slot_id, a, &ar, &req))) {
        ksm_pb_arena_fini(&ar);
        return encode_failed(err, rc);
    }
    Kasmina__V1__SlotReport *rep;
    rc = UNARY("Germinate", req, kasmina__v1__slot_report, rep, err);
    ksm_pb_arena_fini(&ar);
    if (rc) return rc;
    rc = report_reply(rep, report, err);
    free_reply(rep);
    return rc;
}

int ksm_client_advance(ksm_client *c, const char *model_id, const char *slot_id,
                       enum ksm_stage target, struct ksm_gate_result *gate,
                       struct ksm_slot_report *report, struct ksm_client_error *err)
{
    struct ksm_lifecycle_args l = {.model_id = model_id, .slot_id = slot_id, .target = target};
    Kasmina__V1__AdvanceStageRequest req;
    ksm_wire_advance_to_pb(&l, &req);
    Kasmina__V1__AdvanceStageResponse *rep;
    int rc = UNARY("AdvanceStage", req, kasmina__v1__advance_stage_response, rep, err);
    if (rc) return rc;
    char msg[256] = "";
    if (gate) {
        memset(gate, 0, sizeof *gate);
        if (rep->gate && (rc = ksm_wire_gate_from_pb(rep->gate, gate, msg, sizeof msg))) {
            free_reply(rep);
            return bad_reply(err, rc, msg);
        }
    }
    rc = report_reply(rep->slot, report, err);
    free_reply(rep);
    return rc;
}

int ksm_client_prune(ksm_client *c, const char *model_id, const char *slot_id, const char *reason,
                     const char *initiator, bool *accepted, struct ksm_slot_report *report,
                     struct ksm_client_error *err)
{
    struct ksm_lifecycle_args l = {
        .model_id = model_id, .slot_id = slot_id, .reason = reason, .initiator = initiator};
    Kasmina__V1__PruneRequest req;
    ksm_wire_prune_to_pb(&l, &req);
    Kasmina__V1__PruneResponse *rep;
    int rc = UNARY("Prune", req, kasmina__v1__prune_response, rep, err);
    if (rc) return rc;
    if (accepted) *accepted = rep->accepted;
    rc = report_reply(rep->slot, report, err);
    free_reply(rep);
    return rc;
}

int ksm_client_schedule_prune(ksm_client *c, const char *model_id, const char *slot_id,
                              uint32_t steps, enum ksm_alpha_curve curve, bool has_steepness,
                              double steepness, const char *reason, const char *initiator,
                              bool *accepted, struct ksm_slot_report *report,
                              struct ksm_client_error *err)
{
    struct ksm_lifecycle_args l = {.model_id = model_id,
                                   .slot_id = slot_id,
                                   .steps = steps,
                                   .curve = curve,
                                   .has_steepness = has_steepness,
                                   .steepness = steepness,
                                   .reason = reason,
                                   .initiator = initiator};
    Kasmina__V1__SchedulePruneRequest req;
    ksm_wire_schedule_prune_to_pb(&l, &req);
    Kasmina__V1__PruneResponse *rep;
    int rc = UNARY("SchedulePrune", req, kasmina__v1__prune_response, rep, err);
    if (rc) return rc;
    if (accepted) *accepted = rep->accepted;
    rc = report_reply(rep->slot, report, err);
    free_reply(rep);
    return rc;
}

int ksm_client_set_alpha_target(ksm_client *c, const char *model_id, const char *slot_id,
                                double alpha_target, uint32_t steps, enum ksm_alpha_curve curve,
                                bool has_steepness, double steepness,
                                enum ksm_alpha_algorithm algorithm, bool *accepted,
                                struct ksm_slot_report *report, struct ksm_client_error *err)
{
    struct ksm_lifecycle_args l = {.model_id = model_id,
                                   .slot_id = slot_id,
                                   .alpha = alpha_target,
                                   .steps = steps,
                                   .curve = curve,
                                   .has_steepness = has_steepness,
                                   .steepness = steepness,
                                   .algorithm = algorithm};
    Kasmina__V1__SetAlphaTargetRequest req;
    ksm_wire_set_alpha_target_to_pb(&l, &req);
    Kasmina__V1__SetAlphaTargetResponse *rep;
    int rc = UNARY("SetAlphaTarget", req, kasmina__v1__set_alpha_target_response, rep, err);
    if (rc) return rc;
    if (accepted) *accepted = rep->accepted;
    rc = report_reply(rep->slot, report, err);
    free_reply(rep);
    return rc;
}

int ksm_client_set_alpha(ksm_client *c, const char *model_id, const char *slot_id, double alpha,
                         struct ksm_slot_report *report, struct ksm_client_error *err)
{
    struct ksm_lifecycle_args l = {.model_id = model_id, .slot_id = slot_id, .alpha = alpha};
    Kasmina__V1__SetAlphaRequest req;
    ksm_wire_set_alpha_to_pb(&l, &req);
    Kasmina__V1__SlotReport *rep;
    int rc = UNARY("SetAlpha", req, kasmina__v1__slot_report, rep, err);
    if (rc) return rc;
    rc = report_reply(rep, report, err);
    free_reply(rep);
    return rc;
}

static int reports_reply(Kasmina__V1__SlotReport **pb, size_t n_pb, struct ksm_slot_report *reports,
                         size_t cap, size_t *n, struct ksm_client_error *err)
{
    if (n) *n = n_pb;
    for (size_t i = 0; reports && i < n_pb && i < cap; i++) {
        int rc = report_reply(pb[i], &reports[i], err);
        if (rc) return rc;
    }
    return 0;
}

int ksm_client_step_epoch(ksm_client *c, const char *model_id, const char *slot_id,
                          struct ksm_slot_report *reports, size_t cap, size_t *n,
                          struct ksm_client_error *err)
{
    Kasmina__V1__StepEpochRequest req = KASMINA__V1__STEP_EPOCH_REQUEST__INIT;
    req.model_id = S(model_id);
    req.slot_id = S(slot_id);
    Kasmina__V1__StepEpochResponse *rep;
    int rc = UNARY("StepEpoch", req, kasmina__v1__step_epoch_response, rep, err);
    if (rc) return rc;
    rc = reports_reply(rep->slots, rep->n_slots, reports, cap, n, err);
    free_reply(rep);
    return rc;
}

int ksm_client_record_metrics(ksm_client *c, const char *model_id, const char *slot_id,
                              const struct ksm_metrics_update *u, struct ksm_slot_report *report,
                              struct ksm_client_error *err)
{
    int rc;
    if (!need(err, u, "update", &rc)) return rc;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__RecordMetricsRequest req;
    if ((rc = ksm_wire_metrics_to_pb(model_id, slot_id, u, &a, &req))) {
        ksm_pb_arena_fini(&a);
        return encode_failed(err, rc);
    }
    Kasmina__V1__SlotReport *rep;
    rc = UNARY("RecordMetrics", req, kasmina__v1__slot_report, rep, err);
    ksm_pb_arena_fini(&a);
    if (rc) return rc;
    rc = report_reply(rep, report, err);
    free_reply(rep);
    return rc;
}

int ksm_client_configure_slot(ksm_client *c, const char *model_id, const char *slot_id,
                              const struct ksm_slot_settings *s, struct ksm_slot_report *reports,
                              size_t cap, size_t *n, struct ksm_client_error *err)
{
    int rc;
    if (!need(err, s, "s", &rc)) return rc;
    struct ksm_pb_arena a;
    ksm_pb_arena_init(&a);
    Kasmina__V1__ConfigureSlotRequest req;
    if (ksm_wire_configure_slot_to_pb(model_id, slot_id, s, &a, &req) != 0) {
        ksm_pb_arena_fini(&a);
        return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    }
    Kasmina__V1__SlotReports *rep;
    rc = UNARY("ConfigureSlot", req, kasmina__v1__slot_reports, rep, err);
    ksm_pb_arena_fini(&a);
    if (rc) return rc;
    rc = reports_reply(rep->slots, rep->n_slots, reports, cap, n, err);
    free_reply(rep);
    return rc;
}

int ksm_client_slot_reports(ksm_client *c, const char *model_id, const char *slot_id,
                            struct ksm_slot_report *reports, size_t cap, size_t *n,
                            struct ksm_client_error *err)
{
    Kasmina__V1__GetSlotReportsRequest req = KASMINA__V1__GET_SLOT_REPORTS_REQUEST__INIT;
    req.model_id = S(model_id);
    req.slot_id = S(slot_id);
    Kasmina__V1__SlotReports *rep;
    int rc = UNARY("GetSlotReports", req, kasmina__v1__slot_reports, rep, err);
    if (rc) return rc;
    rc = reports_reply(rep->slots, rep->n_slots, reports, cap, n, err);
    free_reply(rep);
    return rc;
}

struct watch_ctx {
    ksm_client_event_cb cb;
    void *ud;
    struct ksm_client_error *err;
};

static int on_event(void *ud, const ProtobufCMessage *msg)
{
    struct watch_ctx *w = ud;
    struct ksm_lifecycle_event ev;
    uint64_t seq = 0;
    char m[256] = "";
    int rc =
        ksm_wire_event_from_pb((const Kasmina__V1__LifecycleEvent *)msg, &seq, &ev, m, sizeof m);
    if (rc) return bad_reply(w->err, rc, m);
    return w->cb(w->ud, seq, &ev);
}

int ksm_client_watch_events(ksm_client *c, const char *model_id, uint64_t after_sequence,
                            uint32_t idle_ms, ksm_client_event_cb cb, void *ud,
                            struct ksm_client_error *err)
{
    int rc;
    if (!need(err, cb, "cb", &rc)) return rc;
    Kasmina__V1__WatchEventsRequest req = KASMINA__V1__WATCH_EVENTS_REQUEST__INIT;
    req.model_id = S(model_id);
    req.after_sequence = after_sequence;
    struct watch_ctx w = {cb, ud, err};
    return ksmc_server_stream(c, METHOD("WatchEvents"), &req.base,
                              &kasmina__v1__lifecycle_event__descriptor, idle_ms, false, on_event,
                              &w, err);
}

// ---- Compute ----

int ksm_client_forward(ksm_client *c, const char *model_id, const struct ksm_forward_args *a,
                       struct ksm_forward_result *r, struct ksm_client_error *err)
{
    int rc;
    if (!need(err, a, "args", &rc) || !need(err, r, "result", &rc)) return rc;
    memset(r, 0, sizeof *r);
    if (!a->input) return ksmc_fail(err, KSM_EINVAL, 3, "input must not be NULL");
    struct ksm_pb_arena ar;
    ksm_pb_arena_init(&ar);
    Kasmina__V1__ForwardResponse *rep;
    if (a->fused || a->n_overrides > 0) {
        Kasmina__V1__FusedForwardRequest req;
        if ((rc = ksm_wire_fused_forward_to_pb(model_id, a, 0, &ar, &req))) {
            ksm_pb_arena_fini(&ar);
            return encode_failed(err, rc);
        }
        rc = UNARY("FusedForward", req, kasmina__v1__forward_response, rep, err);
    } else {
        Kasmina__V1__ForwardRequest req;
        if ((rc = ksm_wire_forward_to_pb(model_id, a, 0, &ar, &req))) {
            ksm_pb_arena_fini(&ar);
            return encode_failed(err, rc);
        }
        rc = UNARY("Forward", req, kasmina__v1__forward_response, rep, err);
    }
    ksm_pb_arena_fini(&ar);
    if (rc) return rc;
    char msg[256] = "";
    rc = ksm_wire_forward_result_take_pb(rep, r, msg, sizeof msg); /* no copy of the output */
    free_reply(rep);
    return rc ? bad_reply(err, rc, msg) : 0;
}

int ksm_client_configure_training(ksm_client *c, const char *model_id,
                                  const struct ksm_training_config *cfg, bool reset_optimizer_state,
                                  struct ksm_training_config *out, uint64_t *train_step,
                                  struct ksm_client_error *err)
{
    struct ksm_pb_arena ar;
    ksm_pb_arena_init(&ar);
    Kasmina__V1__ConfigureTrainingRequest req;
    int rc = ksm_wire_configure_training_to_pb(model_id, cfg, reset_optimizer_state, &ar, &req);
    if (rc) {
        ksm_pb_arena_fini(&ar);
        return encode_failed(err, rc);
    }
    Kasmina__V1__TrainingConfig *rep;
    rc = UNARY("ConfigureTraining", req, kasmina__v1__training_config, rep, err);
    ksm_pb_arena_fini(&ar);
    if (rc) return rc;
    struct ksm_training_config got;
    ksm_wire_training_config_from_reply(rep, &got, train_step);
    if (out != NULL) *out = got;
    free_reply(rep);
    return 0;
}

int ksm_client_train_step(ksm_client *c, const char *model_id, const struct ksm_train_args *a,
                          struct ksm_train_result *r, struct ksm_client_error *err)
{
    int rc;
    if (!need(err, a, "args", &rc) || !need(err, r, "result", &rc)) return rc;
    memset(r, 0, sizeof *r);
    if (!a->input || !a->targets)
        return ksmc_fail(err, KSM_EINVAL, 3, "input and targets must not be NULL");
    struct ksm_pb_arena ar;
    ksm_pb_arena_init(&ar);
    Kasmina__V1__TrainStepRequest req;
    if ((rc = ksm_wire_train_args_to_pb(model_id, a, &ar, &req))) {
        ksm_pb_arena_fini(&ar);
        return encode_failed(err, rc);
    }
    Kasmina__V1__TrainStepResponse *rep;
    rc = UNARY("TrainStep", req, kasmina__v1__train_step_response, rep, err);
    ksm_pb_arena_fini(&ar);
    if (rc) return rc;
    ksm_wire_train_result_from_pb(rep, r);
    free_reply(rep);
    return 0;
}

int ksm_client_checkpoint(ksm_client *c, const char *model_id, struct ksm_client_checkpoint **out,
                          size_t *n, struct ksm_client_error *err)
{
    int rc;
    if (!need(err, out, "out", &rc) || !need(err, n, "n", &rc)) return rc;
    *out = NULL;
    *n = 0;
    Kasmina__V1__CheckpointRequest req = KASMINA__V1__CHECKPOINT_REQUEST__INIT;
    req.model_id = S(model_id);
    Kasmina__V1__CheckpointResponse *rep;
    if ((rc = UNARY("Checkpoint", req, kasmina__v1__checkpoint_response, rep, err))) return rc;
    size_t k = rep->n_checkpoint_step;
    struct ksm_client_checkpoint *v = calloc(k ? k : 1, sizeof *v);
    if (!v) {
        free_reply(rep);
        return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    }
    for (size_t i = 0; i < k; i++) {
        const Kasmina__V1__CheckpointResponse__CheckpointStepEntry *e = rep->checkpoint_step[i];
        snprintf(v[i].model_id, sizeof v[i].model_id, "%s", e->key ? e->key : "");
        v[i].train_step = e->value;
    }
    *out = v;
    *n = k;
    free_reply(rep);
    return 0;
}

int ksm_client_evaluate(ksm_client *c, const char *model_id, const struct ksm_evaluate_args *a,
                        struct ksm_evaluate_result *r, struct ksm_client_error *err)
{
    int rc;
    if (!need(err, a, "args", &rc) || !need(err, r, "result", &rc)) return rc;
    memset(r, 0, sizeof *r);
    if (a->shapley)
        return ksmc_fail(err, KSM_EINVAL, 3, "shapley is not available over kasmina.v1");
    if (!a->input || !a->targets)
        return ksmc_fail(err, KSM_EINVAL, 3, "input and targets must not be NULL");
    struct ksm_pb_arena ar;
    ksm_pb_arena_init(&ar);
    Kasmina__V1__EvaluateRequest req;
    if ((rc = ksm_wire_evaluate_to_pb(model_id, a, &ar, &req))) {
        ksm_pb_arena_fini(&ar);
        return encode_failed(err, rc);
    }
    Kasmina__V1__EvaluateResponse *rep;
    rc = UNARY("Evaluate", req, kasmina__v1__evaluate_response, rep, err);
    ksm_pb_arena_fini(&ar);
    if (rc) return rc;
    char msg[256] = "";
    rc = ksm_wire_evaluate_result_take_pb(rep, r, msg, sizeof msg);
    free_reply(rep);
    return rc ? bad_reply(err, rc, msg) : 0;
}

// ---- Statistics ----

void ksm_client_memory_stats_free(struct ksm_client_memory_stats *s)
{
    if (!s) return;
    for (size_t i = 0; s->devices && i < s->n; i++) free(s->devices[i].per_model);
    free(s->devices);
    memset(s, 0, sizeof *s);
}

static int memory_reply(Kasmina__V1__MemoryStats *rep, struct ksm_client_memory_stats *out,
                        struct ksm_client_error *err)
{
    if (!out) return 0;
    memset(out, 0, sizeof *out);
    out->devices = calloc(rep->n_devices ? rep->n_devices : 1, sizeof *out->devices);
    if (!out->devices) return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    out->n = rep->n_devices;
    for (size_t i = 0; i < rep->n_devices; i++) {
        const Kasmina__V1__DeviceMemoryStats *d = rep->devices[i];
        struct ksm_client_device_memory *o = &out->devices[i];
        ksm_wire_mem_stats_from_pb(d, o->device, sizeof o->device, &o->stats);
        if (d->n_per_model_bytes == 0) continue;
        o->per_model = calloc(d->n_per_model_bytes, sizeof *o->per_model);
        if (!o->per_model) {
            ksm_client_memory_stats_free(out);
            return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
        }
        o->n_per_model = d->n_per_model_bytes;
        for (size_t k = 0; k < d->n_per_model_bytes; k++) {
            ksmc_strlcpy(o->per_model[k].model_id, d->per_model_bytes[k]->key,
                         sizeof o->per_model[k].model_id);
            o->per_model[k].bytes = d->per_model_bytes[k]->value;
        }
    }
    return 0;
}

int ksm_client_memory_stats(ksm_client *c, const char *device, struct ksm_client_memory_stats *out,
                            struct ksm_client_error *err)
{
    Kasmina__V1__GetMemoryStatsRequest req = KASMINA__V1__GET_MEMORY_STATS_REQUEST__INIT;
    req.device = S(device);
    Kasmina__V1__MemoryStats *rep;
    int rc = UNARY("GetMemoryStats", req, kasmina__v1__memory_stats, rep, err);
    if (rc) return rc;
    rc = memory_reply(rep, out, err);
    free_reply(rep);
    return rc;
}

int ksm_client_empty_cache(ksm_client *c, const char *device, struct ksm_client_memory_stats *out,
                           struct ksm_client_error *err)
{
    Kasmina__V1__EmptyCacheRequest req = KASMINA__V1__EMPTY_CACHE_REQUEST__INIT;
    req.device = S(device);
    Kasmina__V1__MemoryStats *rep;
    int rc = UNARY("EmptyCache", req, kasmina__v1__memory_stats, rep, err);
    if (rc) return rc;
    rc = memory_reply(rep, out, err);
    free_reply(rep);
    return rc;
}

int ksm_client_cache_stats(ksm_client *c, const char *model_id,
                           struct ksm_client_cache_counters **out, size_t *n,
                           struct ksm_client_error *err)
{
    int rc;
    if (!need(err, out, "out", &rc) || !need(err, n, "n", &rc)) return rc;
    *out = NULL;
    *n = 0;
    Kasmina__V1__GetCacheStatsRequest req = KASMINA__V1__GET_CACHE_STATS_REQUEST__INIT;
    req.model_id = S(model_id);
    Kasmina__V1__CacheStats *rep;
    if ((rc = UNARY("GetCacheStats", req, kasmina__v1__cache_stats, rep, err))) return rc;
    struct ksm_client_cache_counters *v = calloc(rep->n_caches ? rep->n_caches : 1, sizeof *v);
    if (!v) {
        free_reply(rep);
        return ksmc_fail(err, KSM_ENOMEM, 8, "out of memory");
    }
    for (size_t i = 0; i < rep->n_caches; i++)
        ksm_wire_cache_counters_from_pb(rep->caches[i], v[i].model_id, &v[i].c);
    *out = v;
    *n = rep->n_caches;
    free_reply(rep);
    return 0;
}
