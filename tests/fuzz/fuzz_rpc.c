/*
 * fuzz_rpc: the request path of every kasmina.v1.Kasmina method (and grpc.health.v1 Check),
 * as the server runs it, without a network: bytes -> protobuf-c unpack -> wire/convert ->
 * validation -> the engine on a CPU backend -> reply packed (rpc_dispatch_pieces, the function
 * the server's workers call, with the request cut in three pieces as a gRPC byte buffer's slices
 * would be, and every bytes field taking wire/pbgather's copy-once path: rpc_gather_min = 1).
 *
 * Input: up to 16 records, each [method index: 1 byte][length: u16 LE][request bytes]; the method
 * is rpc_methods[index % rpc_n_methods] and a length past the end takes the rest. A sequence
 * lets the fuzzer reach deep lifecycle states (germinate -> advance -> forward).
 *
 * State: one engine (cpu:0 and cpu:1, a memory cap, max 4 models) per process with two small
 * models, "cnn" (CNN, base_channels 4) and "tf" (a tiny transformer). Before each input, models
 * a previous input created are deleted and "cnn"/"tf" are recreated when an input deleted,
 * moved or mutated them, so an input replays the same way alone (regressions/) as in a run.
 *
 * Oracles: no sanitizer report; every error is a KSM_E* code with a status-table row and a
 * message; a successful reply unpacks as the method's response type; the piecewise unpack of
 * the request gives the message protobuf-c's unpack gives (packed, byte for byte), or both
 * fail.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "wire/pbgather.h"
#include "rpc/server_impl.h"
#include "wire/status.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static ksm_engine *engine;
static ksm_rpc_server *server;
static uint64_t events_seen;

struct fixed_model {
    const char *id;
    uint64_t generation; /* after creation; anything else means "recreate" */
};
static struct fixed_model fixed[2] = {{"cnn", 0}, {"tf", 0}};

static void on_event(void *ud, const struct ksm_lifecycle_event *ev)
{
    (void)ud;
    events_seen += (uint64_t)ev->type + strlen(ev->model_id) + strlen(ev->slot_id);
}

static void die(const char *what, int rc, const char *err)
{
    fprintf(stderr, "fuzz_rpc: %s: %s (%s)\n", what, ksm_err_name(rc), err ? err : "");
    abort();
}

static void create_fixed(struct fixed_model *f)
{
    struct ksm_model_spec spec;
    memset(&spec, 0, sizeof spec);
    if (strcmp(f->id, "cnn") == 0) {
        spec.topology = KSM_TOPOLOGY_CNN;
        spec.cnn.base_channels = 4;
        spec.cnn.num_classes = 5;
    } else {
        spec.topology = KSM_TOPOLOGY_TRANSFORMER;
        spec.transformer = (struct ksm_transformer_spec){.vocab_size = 16,
                                                         .n_embd = 8,
                                                         .n_head = 2,
                                                         .n_layer = 2,
                                                         .block_size = 8,
                                                         .num_segments = 2};
    }
    spec.init_seed = 7;
    spec.device = "cpu:0";
    char err[256] = "";
    ksm_model *m;
    int rc = ksm_engine_model_create(engine, f->id, &spec, &m, err, sizeof err);
    if (rc != 0) die("cannot create a fixed model", rc, err);
    f->generation = ksm_model_generation(m);
    ksm_model_unref(m);
}

/* Back to the state after LLVMFuzzerInitialize (cheap when the last input changed nothing). */
static void reset_models(void)
{
    ksm_model **list = NULL;
    size_t n = 0;
    if (ksm_engine_model_list(engine, &list, &n) != 0) die("model list", KSM_ENOMEM, NULL);
    bool ok[2] = {false, false};
    for (size_t i = 0; i < n; i++) {
        const char *id = ksm_model_id(list[i]);
        int k = strcmp(id, "cnn") == 0 ? 0 : strcmp(id, "tf") == 0 ? 1 : -1;
        if (k >= 0 && ksm_model_generation(list[i]) == fixed[k].generation) {
            struct ksm_model_info info;
            if (ksm_model_get_info(list[i], &info) == 0 && strcmp(info.device, "cpu:0") == 0 &&
                info.dtype == KSM_DTYPE_F32)
                ok[k] = true;
        }
        if (k < 0 || !ok[k]) ksm_engine_model_delete(engine, id, NULL);
        ksm_model_unref(list[i]);
    }
    free(list);
    for (int k = 0; k < 2; k++)
        if (!ok[k]) create_fixed(&fixed[k]);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    ksm_log_set_level(KSM_LOG_ERROR);
    rpc_gather_min = 1;
    char err[256] = "";
    struct ksm_engine_config ec = {
        .cpu_devices = 2,
        .enable_cuda = false,
        .memory_cap = 64u << 20,
        .max_models = 4,
    };
    int rc = ksm_engine_new(&ec, &engine, err, sizeof err);
    if (rc != 0) die("engine", rc, err);
    struct ksm_rpc_server_config cfg = {.version = "fuzz"};
    rc = rpc_server_offline_new(engine, &cfg, &server);
    if (rc != 0) die("server", rc, NULL);
    /* After the server's service attached its event log: every event reaches this sink. */
    ksm_engine_set_event_sink(engine, on_event, NULL);
    for (int k = 0; k < 2; k++) create_fixed(&fixed[k]);
    return 0;
}

static const ProtobufCMessageDescriptor *response_type(const char *path)
{
    const char *name = strrchr(path, '/') + 1;
    const ProtobufCServiceDescriptor *sd = &kasmina__v1__kasmina__descriptor;
    for (unsigned i = 0; i < sd->n_methods; i++)
        if (strcmp(sd->methods[i].name, name) == 0) return sd->methods[i].output;
    return NULL;
}

static void check_error(const struct rpc_method *m, int rc, const char *err)
{
    if (rc >= 0 || !ksm_rpc_status_has_row(rc)) {
        fprintf(stderr, "fuzz_rpc: %s returned %d, not a KSM_E* code\n", m->path, rc);
        abort();
    }
    char msg[320];
    ksm_rpc_status_message(rc, err, msg, sizeof msg);
    if (msg[0] == '\0') {
        fprintf(stderr, "fuzz_rpc: %s failed (%s) with no message\n", m->path, ksm_err_name(rc));
        abort();
    }
}

/* The streaming methods are served by the event hub; their request path up to the hub is the
 * same unpack and the checks of rpc/events.c and rpc/server.c. */
static void other_method(const struct rpc_method *m, const uint8_t *p, size_t n)
{
    ProtobufCMessage *req = protobuf_c_message_unpack(m->req, NULL, n, p);
    if (req == NULL) return;
    char err[192] = "";
    if (m->kind == RPC_EVENTS) {
        const Kasmina__V1__WatchEventsRequest *r = (const void *)req;
        (void)ksm_wire_check_model_id(r->model_id, "model_id", false, err, sizeof err);
    } else if (RPC_KIND_WEIGHTS(m->kind)) {
        /* Weight streams need a call (rpc/weights.c): their messages only unpack here. */
    } else {
        const char *svc = ((Grpc__Health__V1__HealthCheckRequest *)req)->service;
        int st = rpc_health_status(server, svc);
        if (st >= 0) {
            Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
            r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
            uint8_t buf[16];
            if (protobuf_c_message_get_packed_size(&r.base) > sizeof buf) abort();
            protobuf_c_message_pack(&r.base, buf);
        }
    }
    protobuf_c_message_free_unpacked(req, NULL);
}

static uint8_t *pack_all(const ProtobufCMessage *m, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(*len ? *len : 1);
    if (b == NULL) abort();
    protobuf_c_message_pack(m, b);
    return b;
}

/* wire/pbgather against protobuf-c: the same message (packed equal), or both fail. */
static void check_pbgather(const ProtobufCMessageDescriptor *d, const struct ksm_pb_piece *pc,
                           const uint8_t *p, size_t n)
{
    ProtobufCMessage *ref = protobuf_c_message_unpack(d, NULL, n, p);
    ProtobufCMessage *got = ksm_pb_unpack_pieces(d, pc, 3, 1, NULL);
    if ((ref == NULL) != (got == NULL)) {
        fprintf(stderr, "fuzz_rpc: %s: protobuf-c %s, the piecewise unpack %s\n", d->name,
                ref ? "unpacks" : "fails", got ? "unpacks" : "fails");
        abort();
    }
    if (ref == NULL) return;
    size_t lr, lg;
    uint8_t *br = pack_all(ref, &lr), *bg = pack_all(got, &lg);
    if (lr != lg || memcmp(br, bg, lr) != 0) {
        fprintf(stderr, "fuzz_rpc: %s: the piecewise unpack differs from protobuf-c's\n", d->name);
        abort();
    }
    free(br);
    free(bg);
    protobuf_c_message_free_unpacked(ref, NULL);
    protobuf_c_message_free_unpacked(got, NULL);
}

static void one_call(size_t index, const uint8_t *p, size_t n)
{
    const struct rpc_method *m = &rpc_methods[index];
    if (m->kind != RPC_UNARY) {
        other_method(m, p, n);
        return;
    }
    /* Three pieces, as a byte buffer's slices (cut at a third and two thirds). */
    struct ksm_pb_piece pc[3] = {
        {p, n / 3}, {p + n / 3, 2 * n / 3 - n / 3}, {p + 2 * n / 3, n - 2 * n / 3}};
    check_pbgather(m->req, pc, p, n);
    uint8_t *reply = NULL;
    size_t reply_len = 0;
    char err[256];
    int rc = rpc_dispatch_pieces(server, index, pc, 3, &reply, &reply_len, err, sizeof err);
    if (rc != 0) {
        if (reply != NULL) abort();
        check_error(m, rc, err);
        return;
    }
    const ProtobufCMessageDescriptor *out = response_type(m->path);
    if (out == NULL) abort();
    ProtobufCMessage *back = protobuf_c_message_unpack(out, NULL, reply_len, reply);
    if (back == NULL) {
        fprintf(stderr, "fuzz_rpc: the %s reply (%zu bytes) does not unpack\n", m->path, reply_len);
        abort();
    }
    protobuf_c_message_free_unpacked(back, NULL);
    free(reply);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reset_models();
    for (int rec = 0; rec < 16 && size >= 3; rec++) {
        size_t index = data[0] % rpc_n_methods;
        size_t len = (size_t)data[1] | (size_t)data[2] << 8;
        data += 3;
        size -= 3;
        if (len > size) len = size;
        one_call(index, data, len);
        data += len;
        size -= len;
    }
    return 0;
}
