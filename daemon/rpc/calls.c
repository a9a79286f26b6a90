/*
 * rpc/calls: one handler per kasmina.v1.Kasmina method. Each runs on a worker thread (or the
 * completion-queue thread, rpc/server.c) with the decoded request, translates it (wire/convert),
 * calls the service (mutations: durable and published, service/service.h) or the engine (reads
 * of a model the service handed out) and fills the reply in the call's arena. Returns 0 or a
 * KSM_E* code with one sentence in cx->err. Nothing here decides anything the service or the
 * engine decides.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"

#define ALLOC(var, type, init)                                                                     \
    type *var = ksm_pb_arena_alloc(&cx->arena, sizeof(type));                                      \
    if (var == NULL) return KSM_ENOMEM;                                                            \
    init(var)

static void unref_model(void *p) { ksm_model_unref(p); }
static void free_tensor(void *p) { ksm_host_tensor_free(p); }
static void free_eval(void *p) { ksm_evaluate_result_free(p); }
static void free_load(void *p) { ksm_load_result_free(p); }

/* A reference to the model (released after the reply is sent). */
static int get_model(ksm_rpc_server *s, const char *id, struct rpc_ctx *cx, ksm_model **out)
{
    KSM_TRY(ksm_wire_check_model_id(id, "model_id", true, cx->err, sizeof cx->err));
    KSM_TRY(ksm_service_model_get(s->service, id, out, cx->err, sizeof cx->err));
    rpc_defer(cx, unref_model, *out);
    return 0;
}

static int model_reply(ksm_model *m, struct rpc_ctx *cx, ProtobufCMessage **reply)
{
    struct ksm_model_info *info = ksm_pb_arena_alloc(&cx->arena, sizeof *info);
    if (info == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_model_get_info(m, info));
    ALLOC(out, Kasmina__V1__Model, kasmina__v1__model__init);
    KSM_TRY(ksm_wire_model_to_pb(info, &cx->arena, out));
    *reply = &out->base;
    return 0;
}

static int slot_report_reply(const char *model_id, const struct ksm_slot_report *r,
                             struct rpc_ctx *cx, Kasmina__V1__SlotReport **out)
{
    Kasmina__V1__SlotReport *pb = ksm_pb_arena_alloc(&cx->arena, sizeof *pb);
    if (pb == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_slot_report_to_pb(model_id, r, &cx->arena, pb));
    *out = pb;
    return 0;
}

static struct ksm_slot_report *new_report(struct rpc_ctx *cx)
{
    return ksm_pb_arena_alloc(&cx->arena, sizeof(struct ksm_slot_report));
}

/* Room for the reports of slot_id (NULL/"" = every slot): as many as the model has slots (fixed
 * at its creation), not KSM_MAX_SLOTS: 64 zeroed reports were 38 KB to allocate and clear on
 * every call, a third of a GetSlotReports' CPU. */
static struct ksm_slot_report *new_reports(ksm_model *m, const char *slot_id, struct rpc_ctx *cx,
                                           size_t *cap)
{
    size_t n = 1;
    if (slot_id == NULL || slot_id[0] == '\0') {
        char e[64];
        if (ksm_model_slot_reports(m, NULL, NULL, 0, &n, e, sizeof e) != 0 || n == 0) n = 1;
        if (n > KSM_MAX_SLOTS) n = KSM_MAX_SLOTS;
    }
    *cap = n;
    return ksm_pb_arena_alloc(&cx->arena, n * sizeof(struct ksm_slot_report));
}

/* ---- server ---- */

static int h_get_server_info(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                             ProtobufCMessage **reply)
{
    static char *extensions[] = {"seed_lifecycle", "fused_forward",  "counterfactual_evaluate",
                                 "watch_events",   "weights_esper",  "memory_stats",
                                 "cache_stats",    "grpc_health_v1", "weights_stream",
                                 "configure_slot"};
    ALLOC(out, Kasmina__V1__ServerInfo, kasmina__v1__server_info__init);
    out->name = "kasminad";
    out->version = (char *)s->cfg.version;
    out->extensions = extensions;
    out->n_extensions = sizeof extensions / sizeof extensions[0];
    int n = ksm_engine_device_count(s->engine);
    if (n > 0) {
        out->devices = ksm_pb_arena_alloc(&cx->arena, (size_t)n * sizeof *out->devices);
        Kasmina__V1__Device *d = ksm_pb_arena_alloc(&cx->arena, (size_t)n * sizeof *d);
        if (out->devices == NULL || d == NULL) return KSM_ENOMEM;
        for (int i = 0; i < n; i++) {
            ksm_device *dev = ksm_engine_device(s->engine, i);
            kasmina__v1__device__init(&d[i]);
            d[i].name = (char *)ksm_device_name(dev);
            bool cuda = ksm_device_kind(dev) == KSM_DEVICE_CUDA;
            d[i].kind = cuda ? "cuda" : "cpu";
            d[i].description = cuda ? "CUDA device" : "CPU (reference backend, OpenBLAS GEMM)";
            const char *core = cuda ? NULL : ksm_cpu_backend_blas_core();
            if (core != NULL) {
                char desc[128];
                snprintf(desc, sizeof desc, "CPU (reference backend, OpenBLAS GEMM: %s kernels)",
                         core);
                d[i].description = ksm_pb_arena_strdup(&cx->arena, desc);
                if (d[i].description == NULL) return KSM_ENOMEM;
            }
            size_t fb = 0, tb = 0;
            ksm_device_mem_info(dev, &fb, &tb);
            d[i].total_bytes = tb;
            ksm_allocator *a = ksm_engine_allocator(s->engine, dev);
            if (a != NULL) {
                struct ksm_mem_stats st;
                ksm_alloc_get_stats(a, &st);
                d[i].memory_cap_bytes = st.memory_cap_bytes;
            }
            out->devices[i] = &d[i];
        }
        out->n_devices = (size_t)n;
    }
    const char *const *names;
    int nb;
    if (ksm_engine_blueprints(KSM_TOPOLOGY_CNN, &names, &nb) == 0) {
        out->cnn_blueprints = (char **)names;
        out->n_cnn_blueprints = (size_t)nb;
    }
    if (ksm_engine_blueprints(KSM_TOPOLOGY_TRANSFORMER, &names, &nb) == 0) {
        out->transformer_blueprints = (char **)names;
        out->n_transformer_blueprints = (size_t)nb;
    }
    out->ready = rpc_health_status(s, "") ==
                 GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    *reply = &out->base;
    return 0;
}

/* ---- models ---- */

static int h_create_model(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                          ProtobufCMessage **reply)
{
    const Kasmina__V1__CreateModelRequest *r = (const void *)req;
    struct ksm_model_spec spec;
    KSM_TRY(ksm_wire_model_spec_from_pb(r, &spec, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(ksm_service_model_create(s->service, r->model_id, &spec, &m, cx->err, sizeof cx->err));
    rpc_defer(cx, unref_model, m);
    struct ksm_model_info *info = ksm_pb_arena_alloc(&cx->arena, sizeof *info);
    if (info != NULL && ksm_model_get_info(m, info) == 0)
        ksm_advise_model_created(&spec, info, &cx->advice);
    return model_reply(m, cx, reply);
}

static int h_get_model(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                       ProtobufCMessage **reply)
{
    const Kasmina__V1__GetModelRequest *r = (const void *)req;
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    return model_reply(m, cx, reply);
}

static void free_model_list(void *p) { free(p); /* references were released already */ }

static int h_list_models(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                         ProtobufCMessage **reply)
{
    ksm_model **list = NULL;
    size_t n = 0;
    KSM_TRY(ksm_engine_model_list(s->engine, &list, &n));
    rpc_defer(cx, free_model_list, list);
    ALLOC(out, Kasmina__V1__ListModelsResponse, kasmina__v1__list_models_response__init);
    out->models = ksm_pb_arena_alloc(&cx->arena, n * sizeof *out->models);
    int rc = out->models == NULL ? KSM_ENOMEM : 0;
    for (size_t i = 0; i < n; i++) {
        if (rc == 0) {
            struct ksm_model_info *info = ksm_pb_arena_alloc(&cx->arena, sizeof *info);
            Kasmina__V1__Model *pb = ksm_pb_arena_alloc(&cx->arena, sizeof *pb);
            if (info == NULL || pb == NULL)
                rc = KSM_ENOMEM;
            else if ((rc = ksm_model_get_info(list[i], info)) == 0 &&
                     (rc = ksm_wire_model_to_pb(info, &cx->arena, pb)) == 0)
                out->models[out->n_models++] = pb;
        }
        ksm_model_unref(list[i]);
    }
    if (rc != 0) return rc;
    /* Quarantined at start-up (io/persist.h): immutable once serving, borrowed until exit. */
    size_t nq = 0;
    const struct ksm_persist_quarantine *q = ksm_service_quarantined(s->service, &nq);
    if (nq > 0 &&
        (out->quarantined = ksm_pb_arena_alloc(&cx->arena, nq * sizeof *out->quarantined)) == NULL)
        return KSM_ENOMEM;
    for (size_t i = 0; i < nq; i++) {
        Kasmina__V1__QuarantinedModel *pb = ksm_pb_arena_alloc(&cx->arena, sizeof *pb);
        if (pb == NULL) return KSM_ENOMEM;
        kasmina__v1__quarantined_model__init(pb);
        pb->model_id = (char *)q[i].id;
        pb->reason = (char *)q[i].reason;
        pb->moved_to = (char *)q[i].moved_to;
        out->quarantined[out->n_quarantined++] = pb;
    }
    *reply = &out->base;
    return 0;
}

static int h_delete_model(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                          ProtobufCMessage **reply)
{
    const Kasmina__V1__DeleteModelRequest *r = (const void *)req;
    KSM_TRY(ksm_wire_check_model_id(r->model_id, "model_id", true, cx->err, sizeof cx->err));
    uint64_t freed = 0;
    KSM_TRY(ksm_service_model_delete(s->service, r->model_id, &freed, cx->err, sizeof cx->err));
    ALLOC(out, Kasmina__V1__DeleteModelResponse, kasmina__v1__delete_model_response__init);
    out->freed_bytes = freed;
    *reply = &out->base;
    return 0;
}

static int h_load_weights(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                          ProtobufCMessage **reply)
{
    const Kasmina__V1__LoadWeightsRequest *r = (const void *)req;
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    if (r->safetensors.len == 0) {
        snprintf(cx->err, sizeof cx->err, "safetensors must not be empty.");
        return KSM_EINVAL;
    }
    struct ksm_load_result *lr = ksm_pb_arena_alloc(&cx->arena, sizeof *lr);
    if (lr == NULL) return KSM_ENOMEM;
    /* Freed whatever the load returns: a load that succeeded and whose snapshot then failed to
     * be written (rolled back, the call fails) has filled lr too. */
    memset(lr, 0, sizeof *lr);
    rpc_defer(cx, free_load, lr);
    KSM_TRY(ksm_service_load_weights(s->service, m, r->safetensors.data, r->safetensors.len,
                                     r->strict, lr, cx->err, sizeof cx->err));
    ALLOC(out, Kasmina__V1__LoadWeightsResponse, kasmina__v1__load_weights_response__init);
    KSM_TRY(ksm_wire_load_result_to_pb(lr, &cx->arena, out));
    *reply = &out->base;
    return 0;
}

static int h_export_weights(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                            ProtobufCMessage **reply)
{
    const Kasmina__V1__ExportWeightsRequest *r = (const void *)req;
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    for (size_t i = 0; i < r->n_slots; i++) {
        char f[32];
        snprintf(f, sizeof f, "slots[%zu]", i);
        KSM_TRY(ksm_wire_check_slot_id(r->slots[i], f, true, cx->err, sizeof cx->err));
    }
    if (r->n_slots > KSM_MAX_SLOTS)
        return ksm_errf(cx->err, sizeof cx->err, KSM_EINVAL,
                        "slots lists %zu slots; a model has at most %d.", r->n_slots,
                        KSM_MAX_SLOTS);
    KSM_TRY(rpc_limit_reply_export(s, m, r->n_slots == 0 || r->include_host, cx));
    void *buf = NULL;
    size_t len = 0;
    KSM_TRY(ksm_model_export_weights_subset(m, (const char *const *)r->slots, (int)r->n_slots,
                                            r->include_host, &buf, &len, cx->err, sizeof cx->err));
    rpc_defer(cx, free, buf);
    /* The prediction counts a tied weight once; the blob holds it twice. */
    KSM_TRY(rpc_limit_reply_weights(s, (uint64_t)len + 16, cx));
    ALLOC(out, Kasmina__V1__ExportWeightsResponse, kasmina__v1__export_weights_response__init);
    out->safetensors.data = buf;
    out->safetensors.len = len;
    *reply = &out->base;
    return 0;
}

static int h_move_model(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                        ProtobufCMessage **reply)
{
    const Kasmina__V1__MoveModelRequest *r = (const void *)req;
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    KSM_TRY(ksm_wire_check_string(r->device, "device", false, 31, cx->err, sizeof cx->err));
    int dtype = -1;
    if (r->dtype != KASMINA__V1__DTYPE__DTYPE_UNSPECIFIED) {
        enum ksm_dtype d;
        KSM_TRY(ksm_wire_dtype_from_pb((int)r->dtype, "dtype", &d, cx->err, sizeof cx->err));
        dtype = (int)d;
    }
    KSM_TRY(ksm_service_move(s->service, m, r->device, dtype, cx->err, sizeof cx->err));
    return model_reply(m, cx, reply);
}

/* ---- lifecycle ---- */

static int h_germinate(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                       ProtobufCMessage **reply)
{
    const Kasmina__V1__GerminateRequest *r = (const void *)req;
    struct ksm_germinate_args g;
    KSM_TRY(ksm_wire_germinate_from_pb(r, &g, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    if (rep == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_service_germinate(s->service, m, r->slot_id, &g, rep, cx->err, sizeof cx->err));
    Kasmina__V1__SlotReport *out;
    KSM_TRY(slot_report_reply(r->model_id, rep, cx, &out));
    *reply = &out->base;
    return 0;
}

static int h_advance(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                     ProtobufCMessage **reply)
{
    const Kasmina__V1__AdvanceStageRequest *r = (const void *)req;
    struct ksm_lifecycle_args l;
    KSM_TRY(ksm_wire_advance_from_pb(r, &l, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    struct ksm_gate_result *gate = ksm_pb_arena_alloc(&cx->arena, sizeof *gate);
    if (rep == NULL || gate == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_service_advance(s->service, m, l.slot_id, l.target, gate, rep, cx->err,
                                sizeof cx->err));
    ALLOC(out, Kasmina__V1__AdvanceStageResponse, kasmina__v1__advance_stage_response__init);
    out->gate = ksm_pb_arena_alloc(&cx->arena, sizeof *out->gate);
    if (out->gate == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_wire_gate_to_pb(gate, &cx->arena, out->gate));
    KSM_TRY(slot_report_reply(r->model_id, rep, cx, &out->slot));
    *reply = &out->base;
    return 0;
}

static int prune_reply(const char *model_id, bool accepted, const struct ksm_slot_report *rep,
                       struct rpc_ctx *cx, ProtobufCMessage **reply)
{
    ALLOC(out, Kasmina__V1__PruneResponse, kasmina__v1__prune_response__init);
    out->accepted = accepted;
    KSM_TRY(slot_report_reply(model_id, rep, cx, &out->slot));
    *reply = &out->base;
    return 0;
}

static int h_prune(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                   ProtobufCMessage **reply)
{
    const Kasmina__V1__PruneRequest *r = (const void *)req;
    struct ksm_lifecycle_args l;
    KSM_TRY(ksm_wire_prune_from_pb(r, &l, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    if (rep == NULL) return KSM_ENOMEM;
    bool accepted = false;
    KSM_TRY(ksm_service_prune(s->service, m, l.slot_id, l.reason, l.initiator, &accepted, rep,
                              cx->err, sizeof cx->err));
    return prune_reply(r->model_id, accepted, rep, cx, reply);
}

static int h_schedule_prune(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                            ProtobufCMessage **reply)
{
    const Kasmina__V1__SchedulePruneRequest *r = (const void *)req;
    struct ksm_lifecycle_args l;
    KSM_TRY(ksm_wire_schedule_prune_from_pb(r, &l, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    if (rep == NULL) return KSM_ENOMEM;
    bool accepted = false;
    KSM_TRY(ksm_service_schedule_prune(s->service, m, l.slot_id, l.steps, l.curve, l.has_steepness,
                                       l.steepness, l.reason, l.initiator, &accepted, rep, cx->err,
                                       sizeof cx->err));
    return prune_reply(r->model_id, accepted, rep, cx, reply);
}

static int h_set_alpha_target(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                              ProtobufCMessage **reply)
{
    const Kasmina__V1__SetAlphaTargetRequest *r = (const void *)req;
    struct ksm_lifecycle_args l;
    KSM_TRY(ksm_wire_set_alpha_target_from_pb(r, &l, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    if (rep == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_service_set_alpha_target(s->service, m, l.slot_id, l.alpha, l.steps, l.curve,
                                         l.has_steepness, l.steepness, l.algorithm, rep, cx->err,
                                         sizeof cx->err));
    ALLOC(out, Kasmina__V1__SetAlphaTargetResponse, kasmina__v1__set_alpha_target_response__init);
    out->accepted = true;
    KSM_TRY(slot_report_reply(r->model_id, rep, cx, &out->slot));
    *reply = &out->base;
    return 0;
}

static int h_set_alpha(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                       ProtobufCMessage **reply)
{
    const Kasmina__V1__SetAlphaRequest *r = (const void *)req;
    struct ksm_lifecycle_args l;
    KSM_TRY(ksm_wire_set_alpha_from_pb(r, &l, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    if (rep == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_service_set_alpha(s->service, m, l.slot_id, l.alpha, rep, cx->err, sizeof cx->err));
    Kasmina__V1__SlotReport *out;
    KSM_TRY(slot_report_reply(r->model_id, rep, cx, &out));
    *reply = &out->base;
    return 0;
}

static int reports_reply(const char *model_id, const struct ksm_slot_report *reps, size_t n,
                         struct rpc_ctx *cx, Kasmina__V1__SlotReport ***slots, size_t *n_slots)
{
    *slots = ksm_pb_arena_alloc(&cx->arena, n * sizeof **slots);
    if (*slots == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < n; i++) KSM_TRY(slot_report_reply(model_id, &reps[i], cx, &(*slots)[i]));
    *n_slots = n;
    return 0;
}

static int h_step_epoch(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                        ProtobufCMessage **reply)
{
    const Kasmina__V1__StepEpochRequest *r = (const void *)req;
    KSM_TRY(ksm_wire_check_slot_id(r->slot_id, "slot_id", false, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    size_t cap;
    struct ksm_slot_report *reps = new_reports(m, r->slot_id, cx, &cap);
    if (reps == NULL) return KSM_ENOMEM;
    size_t n = 0;
    KSM_TRY(
        ksm_service_step_epoch(s->service, m, r->slot_id, reps, cap, &n, cx->err, sizeof cx->err));
    if (n > cap) n = cap;
    ALLOC(out, Kasmina__V1__StepEpochResponse, kasmina__v1__step_epoch_response__init);
    KSM_TRY(reports_reply(r->model_id, reps, n, cx, &out->slots, &out->n_slots));
    *reply = &out->base;
    return 0;
}

static int h_record_metrics(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                            ProtobufCMessage **reply)
{
    const Kasmina__V1__RecordMetricsRequest *r = (const void *)req;
    struct ksm_metrics_update u;
    KSM_TRY(ksm_wire_metrics_from_pb(r, &u, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_slot_report *rep = new_report(cx);
    if (rep == NULL) return KSM_ENOMEM;
    KSM_TRY(
        ksm_service_record_metrics(s->service, m, r->slot_id, &u, rep, cx->err, sizeof cx->err));
    ksm_advise_metrics(&u, &cx->advice);
    Kasmina__V1__SlotReport *out;
    KSM_TRY(slot_report_reply(r->model_id, rep, cx, &out));
    *reply = &out->base;
    return 0;
}

static int h_get_slot_reports(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                              ProtobufCMessage **reply)
{
    const Kasmina__V1__GetSlotReportsRequest *r = (const void *)req;
    KSM_TRY(ksm_wire_check_slot_id(r->slot_id, "slot_id", false, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    size_t cap;
    struct ksm_slot_report *reps = new_reports(m, r->slot_id, cx, &cap);
    if (reps == NULL) return KSM_ENOMEM;
    size_t n = 0;
    KSM_TRY(ksm_model_slot_reports(m, r->slot_id, reps, cap, &n, cx->err, sizeof cx->err));
    if (n > cap) n = cap;
    ALLOC(out, Kasmina__V1__SlotReports, kasmina__v1__slot_reports__init);
    KSM_TRY(reports_reply(r->model_id, reps, n, cx, &out->slots, &out->n_slots));
    *reply = &out->base;
    return 0;
}

static int h_configure_slot(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                            ProtobufCMessage **reply)
{
    const Kasmina__V1__ConfigureSlotRequest *r = (const void *)req;
    struct ksm_slot_settings set;
    KSM_TRY(ksm_wire_configure_slot_from_pb(r, &set, cx->err, sizeof cx->err));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    size_t cap;
    struct ksm_slot_report *reps = new_reports(m, r->slot_id, cx, &cap);
    if (reps == NULL) return KSM_ENOMEM;
    size_t n = 0;
    KSM_TRY(ksm_service_configure_slot(s->service, m, r->slot_id, &set, reps, cap, &n, cx->err,
                                       sizeof cx->err));
    if (n > cap) n = cap;
    ALLOC(out, Kasmina__V1__SlotReports, kasmina__v1__slot_reports__init);
    KSM_TRY(reports_reply(r->model_id, reps, n, cx, &out->slots, &out->n_slots));
    *reply = &out->base;
    return 0;
}

/* ---- compute ---- */

static int forward_common(ksm_rpc_server *s, const char *model_id,
                          const struct ksm_forward_args *fa, int out_dtype, struct rpc_ctx *cx,
                          ProtobufCMessage **reply)
{
    KSM_TRY(rpc_limit_input(s, fa->input, cx));
    ksm_model *m;
    KSM_TRY(get_model(s, model_id, cx, &m));
    KSM_TRY(rpc_limit_reply_logits(s, m, fa->input, out_dtype, 1, cx));
    KSM_TRY(rpc_limit_stream_enter(s, model_id, fa->stream, cx));
    struct ksm_forward_result *res = ksm_pb_arena_alloc(&cx->arena, sizeof *res);
    if (res == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_model_forward(m, fa, res, cx->err, sizeof cx->err));
    rpc_defer(cx, free_tensor, &res->output);
    ALLOC(out, Kasmina__V1__ForwardResponse, kasmina__v1__forward_response__init);
    KSM_TRY(
        ksm_wire_forward_result_to_pb(res, out_dtype, &cx->arena, out, cx->err, sizeof cx->err));
    *reply = &out->base;
    return 0;
}

static int h_forward(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                     ProtobufCMessage **reply)
{
    const Kasmina__V1__ForwardRequest *r = (const void *)req;
    struct ksm_forward_args fa;
    int od;
    KSM_TRY(ksm_wire_forward_from_pb(r, &cx->arena, &fa, &od, cx->err, sizeof cx->err));
    return forward_common(s, r->model_id, &fa, od, cx, reply);
}

static int h_fused_forward(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                           ProtobufCMessage **reply)
{
    const Kasmina__V1__FusedForwardRequest *r = (const void *)req;
    struct ksm_forward_args fa;
    int od;
    KSM_TRY(ksm_wire_fused_forward_from_pb(r, &cx->arena, &fa, &od, cx->err, sizeof cx->err));
    return forward_common(s, r->model_id, &fa, od, cx, reply);
}

static int h_evaluate(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                      ProtobufCMessage **reply)
{
    const Kasmina__V1__EvaluateRequest *r = (const void *)req;
    struct ksm_evaluate_args ea;
    KSM_TRY(ksm_wire_evaluate_from_pb(r, &cx->arena, &ea, cx->err, sizeof cx->err));
    KSM_TRY(rpc_limit_input(s, ea.input, cx));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    KSM_TRY(rpc_limit_reply_evaluate(s, m, &ea, cx));
    KSM_TRY(rpc_limit_stream_enter(s, r->model_id, ea.stream, cx));
    struct ksm_evaluate_result *res = ksm_pb_arena_alloc(&cx->arena, sizeof *res);
    if (res == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_model_evaluate(m, &ea, res, cx->err, sizeof cx->err));
    rpc_defer(cx, free_eval, res);
    ALLOC(out, Kasmina__V1__EvaluateResponse, kasmina__v1__evaluate_response__init);
    KSM_TRY(ksm_wire_evaluate_result_to_pb(res, &cx->arena, out));
    *reply = &out->base;
    return 0;
}

/* ---- statistics ---- */

static int memory_stats(ksm_rpc_server *s, const char *device, bool empty, struct rpc_ctx *cx,
                        ProtobufCMessage **reply)
{
    KSM_TRY(ksm_wire_check_string(device, "device", false, 31, cx->err, sizeof cx->err));
    if (device != NULL && device[0] != '\0' && ksm_engine_find_device(s->engine, device) == NULL) {
        snprintf(cx->err, sizeof cx->err, "device '%s' does not exist.", device);
        return KSM_ENODEVICE;
    }
    /* Per-model resident bytes, grouped by device below. */
    ksm_model **list = NULL;
    size_t nm = 0;
    KSM_TRY(ksm_engine_model_list(s->engine, &list, &nm));
    struct ksm_model_info *infos = ksm_pb_arena_alloc(&cx->arena, nm * sizeof *infos);
    for (size_t i = 0; i < nm; i++) {
        if (infos != NULL && ksm_model_get_info(list[i], &infos[i]) != 0) infos[i].device[0] = 0;
        ksm_model_unref(list[i]);
    }
    free(list);
    if (infos == NULL) return KSM_ENOMEM;
    int n = ksm_engine_device_count(s->engine);
    ALLOC(out, Kasmina__V1__MemoryStats, kasmina__v1__memory_stats__init);
    out->devices = ksm_pb_arena_alloc(&cx->arena, (size_t)n * sizeof *out->devices);
    const char **ids = ksm_pb_arena_alloc(&cx->arena, nm * sizeof *ids);
    uint64_t *bytes = ksm_pb_arena_alloc(&cx->arena, nm * sizeof *bytes);
    if (out->devices == NULL || ids == NULL || bytes == NULL) return KSM_ENOMEM;
    for (int i = 0; i < n; i++) {
        ksm_device *dev = ksm_engine_device(s->engine, i);
        const char *name = ksm_device_name(dev);
        if (device != NULL && device[0] != '\0' && strcmp(device, name) != 0) continue;
        ksm_allocator *a = ksm_engine_allocator(s->engine, dev);
        if (a == NULL) continue;
        if (empty) KSM_TRY(ksm_alloc_empty_cache(a));
        struct ksm_mem_stats st;
        ksm_alloc_get_stats(a, &st);
        size_t k = 0;
        for (size_t j = 0; j < nm; j++)
            if (strcmp(infos[j].device, name) == 0) {
                ids[k] = infos[j].model_id;
                bytes[k] = infos[j].resident_bytes;
                k++;
            }
        Kasmina__V1__DeviceMemoryStats *pb = ksm_pb_arena_alloc(&cx->arena, sizeof *pb);
        if (pb == NULL) return KSM_ENOMEM;
        const char **idc = ksm_pb_arena_alloc(&cx->arena, k * sizeof *idc);
        uint64_t *bc = ksm_pb_arena_alloc(&cx->arena, k * sizeof *bc);
        if (idc == NULL || bc == NULL) return KSM_ENOMEM;
        memcpy(idc, ids, k * sizeof *idc);
        memcpy(bc, bytes, k * sizeof *bc);
        KSM_TRY(ksm_wire_mem_stats_to_pb(name, &st, idc, bc, k, &cx->arena, pb));
        out->devices[out->n_devices++] = pb;
    }
    *reply = &out->base;
    return 0;
}

/* ---- training (docs/training.md) ---- */

/* The request's fields over the configuration in force (the rest kept), under the model's lock:
 * two clients changing different fields at once both keep theirs. */
static int merge_training_pb(void *ud, const struct ksm_training_config *in_force,
                             struct ksm_training_config *next, char *err, size_t errlen)
{
    bool reset;
    return ksm_wire_training_config_from_pb(ud, in_force, next, &reset, err, errlen);
}

static int h_configure_training(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                                ProtobufCMessage **reply)
{
    const Kasmina__V1__ConfigureTrainingRequest *r = (const void *)req;
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    struct ksm_training_config cur;
    uint64_t step = 0;
    KSM_TRY(ksm_service_configure_training(s->service, m, merge_training_pb, (void *)r,
                                           r->reset_optimizer_state, &cur, &step, cx->err,
                                           sizeof cx->err));
    ALLOC(out, Kasmina__V1__TrainingConfig, kasmina__v1__training_config__init);
    KSM_TRY(ksm_wire_training_config_to_pb(r->model_id, &cur, step, &cx->arena, out));
    *reply = &out->base;
    return 0;
}

static int h_train_step(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                        ProtobufCMessage **reply)
{
    const Kasmina__V1__TrainStepRequest *r = (const void *)req;
    struct ksm_train_args ta;
    KSM_TRY(ksm_wire_train_args_from_pb(r, &cx->arena, &ta, cx->err, sizeof cx->err));
    KSM_TRY(rpc_limit_input(s, ta.input, cx));
    ksm_model *m;
    KSM_TRY(get_model(s, r->model_id, cx, &m));
    KSM_TRY(rpc_limit_stream_enter(s, r->model_id, ta.stream, cx));
    struct ksm_train_result *res = ksm_pb_arena_alloc(&cx->arena, sizeof *res);
    if (res == NULL) return KSM_ENOMEM;
    KSM_TRY(ksm_service_train_step(s->service, m, &ta, res, cx->err, sizeof cx->err));
    ALLOC(out, Kasmina__V1__TrainStepResponse, kasmina__v1__train_step_response__init);
    KSM_TRY(ksm_wire_train_result_to_pb(res, &cx->arena, out));
    *reply = &out->base;
    return 0;
}

/* One model's entry of a CheckpointResponse. */
static int checkpoint_one(ksm_rpc_server *s, ksm_model *m, struct rpc_ctx *cx,
                          Kasmina__V1__CheckpointResponse *out)
{
    uint64_t step = 0;
    KSM_TRY(ksm_service_checkpoint(s->service, m, &step, cx->err, sizeof cx->err));
    Kasmina__V1__CheckpointResponse__CheckpointStepEntry *e =
        ksm_pb_arena_alloc(&cx->arena, sizeof *e);
    char *id = ksm_pb_arena_strdup(&cx->arena, ksm_model_id(m));
    if (e == NULL || id == NULL) return KSM_ENOMEM;
    kasmina__v1__checkpoint_response__checkpoint_step_entry__init(e);
    e->key = id;
    e->value = step;
    out->checkpoint_step[out->n_checkpoint_step++] = e;
    return 0;
}

static int h_checkpoint(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                        ProtobufCMessage **reply)
{
    const Kasmina__V1__CheckpointRequest *r = (const void *)req;
    KSM_TRY(ksm_wire_check_model_id(r->model_id, "model_id", false, cx->err, sizeof cx->err));
    if (!ksm_service_persists(s->service))
        return ksm_errf(cx->err, sizeof cx->err, KSM_ESTAGE,
                        "kasminad runs with --no-persist: it keeps no state on disk, so there is "
                        "nothing to checkpoint to.");
    ALLOC(out, Kasmina__V1__CheckpointResponse, kasmina__v1__checkpoint_response__init);
    if (r->model_id != NULL && r->model_id[0] != '\0') {
        ksm_model *m;
        KSM_TRY(get_model(s, r->model_id, cx, &m));
        out->checkpoint_step = ksm_pb_arena_alloc(&cx->arena, sizeof *out->checkpoint_step);
        if (out->checkpoint_step == NULL) return KSM_ENOMEM;
        KSM_TRY(checkpoint_one(s, m, cx, out));
    } else {
        /* Every model, one after the other, each under its own lock. A model deleted meanwhile
         * is left out; the first failure ends the call (those before it stay checkpointed). */
        ksm_model **list = NULL;
        size_t n = 0;
        KSM_TRY(ksm_engine_model_list(s->engine, &list, &n));
        int rc = 0;
        out->checkpoint_step =
            ksm_pb_arena_alloc(&cx->arena, (n ? n : 1) * sizeof *out->checkpoint_step);
        if (out->checkpoint_step == NULL) rc = KSM_ENOMEM;
        for (size_t i = 0; i < n; i++) {
            if (rc == 0) {
                rc = checkpoint_one(s, list[i], cx, out);
                if (rc == KSM_ENOMODEL) {
                    rc = 0;
                    cx->err[0] = '\0';
                }
            }
            ksm_model_unref(list[i]);
        }
        free(list);
        if (rc != 0) return rc;
    }
    *reply = &out->base;
    return 0;
}

static int h_get_memory_stats(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                              ProtobufCMessage **reply)
{
    return memory_stats(s, ((const Kasmina__V1__GetMemoryStatsRequest *)req)->device, false, cx,
                        reply);
}

static int h_empty_cache(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                         ProtobufCMessage **reply)
{
    return memory_stats(s, ((const Kasmina__V1__EmptyCacheRequest *)req)->device, true, cx, reply);
}

static int cache_stats_of(ksm_model *m, struct rpc_ctx *cx, Kasmina__V1__CacheStats *out,
                          size_t *cap)
{
    struct ksm_cache_counters tmp[64];
    size_t n = 0;
    KSM_TRY(ksm_model_cache_stats(m, tmp, 64, &n));
    if (n > 64) n = 64;
    if (out->n_caches + n > *cap) {
        size_t ncap = (*cap + n) * 2;
        Kasmina__V1__CacheCounters **nv = ksm_pb_arena_alloc(&cx->arena, ncap * sizeof *nv);
        if (nv == NULL) return KSM_ENOMEM;
        if (out->n_caches > 0) memcpy(nv, out->caches, out->n_caches * sizeof *nv);
        out->caches = nv;
        *cap = ncap;
    }
    struct ksm_cache_counters *cc = ksm_pb_arena_alloc(&cx->arena, n * sizeof *cc);
    char *id = ksm_pb_arena_strdup(&cx->arena, ksm_model_id(m));
    if (cc == NULL || id == NULL) return KSM_ENOMEM;
    memcpy(cc, tmp, n * sizeof *cc);
    for (size_t i = 0; i < n; i++) {
        Kasmina__V1__CacheCounters *pb = ksm_pb_arena_alloc(&cx->arena, sizeof *pb);
        if (pb == NULL) return KSM_ENOMEM;
        KSM_TRY(ksm_wire_cache_counters_to_pb(id, &cc[i], &cx->arena, pb));
        out->caches[out->n_caches++] = pb;
    }
    return 0;
}

static int h_get_cache_stats(ksm_rpc_server *s, const ProtobufCMessage *req, struct rpc_ctx *cx,
                             ProtobufCMessage **reply)
{
    const Kasmina__V1__GetCacheStatsRequest *r = (const void *)req;
    ALLOC(out, Kasmina__V1__CacheStats, kasmina__v1__cache_stats__init);
    size_t cap = 0;
    if (r->model_id != NULL && r->model_id[0] != '\0') {
        ksm_model *m;
        KSM_TRY(get_model(s, r->model_id, cx, &m));
        KSM_TRY(cache_stats_of(m, cx, out, &cap));
    } else {
        ksm_model **list = NULL;
        size_t n = 0;
        KSM_TRY(ksm_engine_model_list(s->engine, &list, &n));
        int rc = 0;
        for (size_t i = 0; i < n; i++) {
            if (rc == 0) rc = cache_stats_of(list[i], cx, out, &cap);
            ksm_model_unref(list[i]);
        }
        free(list);
        if (rc != 0) return rc;
    }
    *reply = &out->base;
    return 0;
}

/* ---- the method table ---- */

#define K(name, desc, fn)                                                                          \
    {                                                                                              \
        "/kasmina.v1.Kasmina/" name, RPC_UNARY, &kasmina__v1__##desc##__descriptor, fn, NULL       \
    }

struct rpc_method rpc_methods[] = {
    K("GetServerInfo", get_server_info_request, h_get_server_info),
    K("CreateModel", create_model_request, h_create_model),
    K("GetModel", get_model_request, h_get_model),
    K("ListModels", list_models_request, h_list_models),
    K("DeleteModel", delete_model_request, h_delete_model),
    K("LoadWeights", load_weights_request, h_load_weights),
    K("ExportWeights", export_weights_request, h_export_weights),
    K("MoveModel", move_model_request, h_move_model),
    K("Germinate", germinate_request, h_germinate),
    K("AdvanceStage", advance_stage_request, h_advance),
    K("Prune", prune_request, h_prune),
    K("SchedulePrune", schedule_prune_request, h_schedule_prune),
    K("SetAlphaTarget", set_alpha_target_request, h_set_alpha_target),
    K("SetAlpha", set_alpha_request, h_set_alpha),
    K("StepEpoch", step_epoch_request, h_step_epoch),
    K("RecordMetrics", record_metrics_request, h_record_metrics),
    K("GetSlotReports", get_slot_reports_request, h_get_slot_reports),
    {"/kasmina.v1.Kasmina/WatchEvents", RPC_EVENTS, &kasmina__v1__watch_events_request__descriptor,
     NULL, NULL},
    K("Forward", forward_request, h_forward),
    K("FusedForward", fused_forward_request, h_fused_forward),
    K("Evaluate", evaluate_request, h_evaluate),
    K("ConfigureTraining", configure_training_request, h_configure_training),
    K("TrainStep", train_step_request, h_train_step),
    K("Checkpoint", checkpoint_request, h_checkpoint),
    K("GetMemoryStats", get_memory_stats_request, h_get_memory_stats),
    K("GetCacheStats", get_cache_stats_request, h_get_cache_stats),
    K("EmptyCache", empty_cache_request, h_empty_cache),
    {"/grpc.health.v1.Health/Check", RPC_HEALTH_CHECK,
     &grpc__health__v1__health_check_request__descriptor, NULL, NULL},
    {"/grpc.health.v1.Health/Watch", RPC_HEALTH_WATCH,
     &grpc__health__v1__health_check_request__descriptor, NULL, NULL},
    /* Appended: the fuzzers' seeds name methods by their index in this table. */
    {"/kasmina.v1.Kasmina/ExportWeightsStream", RPC_WEIGHTS_EXPORT,
     &kasmina__v1__export_weights_request__descriptor, NULL, NULL},
    {"/kasmina.v1.Kasmina/LoadWeightsStream", RPC_WEIGHTS_LOAD,
     &kasmina__v1__weights_chunk__descriptor, NULL, NULL},
    K("ConfigureSlot", configure_slot_request, h_configure_slot),
};
const size_t rpc_n_methods = sizeof rpc_methods / sizeof rpc_methods[0];
