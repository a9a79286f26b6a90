/*
 * rpc/reflection: gRPC server reflection, grpc.reflection.v1alpha.ServerReflection and
 * grpc.reflection.v1.ServerReflection (the same messages on the wire), so that grpcurl,
 * grpc_cli and Postman list and call kasminad's methods without the .proto files. gRPC C core
 * has no reflection service of its own (it lives in grpc++).
 *
 * What is described: the FileDescriptorProtos of every served .proto (kasmina.v1, grpc.health.v1
 * and the two reflection files), which the build embeds as one FileDescriptorSet
 * (ksm_proto_descriptor_set, proto/CMakeLists.txt). The set is indexed once: per file its name,
 * its dependencies and every symbol it declares (messages, nested ones, enums, services and
 * service methods, package-qualified).
 *
 * ServerReflectionInfo is a bidirectional stream answered request by request, on the
 * completion-queue thread (each answer is a lookup and a copy of a few KiB): the request that
 * came with the call is answered, then the next one is received, until the client half-closes
 * (status OK) or cancels. At most one operation of the stream is in flight, so no lock guards
 * its state (struct rpc_call's refl_* fields).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>

#include "grpc/reflection/v1alpha/reflection.pb-c.h"
#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "rpc/server_impl.h"

extern const char ksm_proto_descriptor_set[];
extern const size_t ksm_proto_descriptor_set_len;

#define REFL_MAX_FILES 16
#define REFL_MAX_DEPS  8

struct refl_file {
    char *name, *package;
    const uint8_t *bytes; /* the serialized FileDescriptorProto, inside the embedded set */
    size_t len;
    int n_deps;
    char *deps[REFL_MAX_DEPS];
};

static struct {
    int n_files;
    struct refl_file files[REFL_MAX_FILES];
    size_t n_symbols, cap_symbols;
    struct refl_symbol {
        char *name; /* "kasmina.v1.ForwardRequest" */
        int file;
        bool message, service;
    } * symbols;
    size_t n_services;
    char *services[REFL_MAX_FILES * 2];
    bool ok;
} idx;
static pthread_once_t idx_once = PTHREAD_ONCE_INIT;

/* ---- A minimal protobuf wire reader (descriptor.proto is not compiled into the daemon) ---- */

struct wire {
    const uint8_t *p, *end;
};

static bool wire_varint(struct wire *w, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64 && w->p < w->end; shift += 7) {
        uint8_t b = *w->p++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

/* The next field: its number, and for a length-delimited one its bytes (other wire types are
 * skipped over and reported with sub->p == NULL). False at the end or on malformed input. */
static bool wire_next(struct wire *w, uint32_t *field, struct wire *sub)
{
    uint64_t key, v;
    if (w->p >= w->end || !wire_varint(w, &key)) return false;
    *field = (uint32_t)(key >> 3);
    sub->p = sub->end = NULL;
    switch (key & 7) {
    case 0: return wire_varint(w, &v);
    case 1:
        if (w->end - w->p < 8) return false;
        w->p += 8;
        return true;
    case 5:
        if (w->end - w->p < 4) return false;
        w->p += 4;
        return true;
    case 2:
        if (!wire_varint(w, &v) || v > (uint64_t)(w->end - w->p)) return false;
        sub->p = w->p;
        sub->end = w->p + v;
        w->p += v;
        return true;
    default: return false;
    }
}

static char *wire_str(const struct wire *s)
{
    size_t n = (size_t)(s->end - s->p);
    char *r = malloc(n + 1);
    if (r != NULL) {
        memcpy(r, s->p, n);
        r[n] = '\0';
    }
    return r;
}

/* The name (field 1) of a DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto ... */
static char *wire_name(struct wire m)
{
    uint32_t f;
    struct wire sub;
    while (wire_next(&m, &f, &sub))
        if (f == 1 && sub.p != NULL) return wire_str(&sub);
    return NULL;
}

static char *qualify(const char *scope, const char *name)
{
    size_t n = strlen(scope) + strlen(name) + 2;
    char *r = malloc(n);
    if (r != NULL) snprintf(r, n, "%s%s%s", scope, scope[0] ? "." : "", name);
    return r;
}

static bool add_symbol(char *name, int file, bool message, bool service)
{
    if (name == NULL) return false;
    if (idx.n_symbols == idx.cap_symbols) {
        size_t cap = idx.cap_symbols ? idx.cap_symbols * 2 : 256;
        struct refl_symbol *p = realloc(idx.symbols, cap * sizeof *p);
        if (p == NULL) {
            free(name);
            return false;
        }
        idx.symbols = p;
        idx.cap_symbols = cap;
    }
    idx.symbols[idx.n_symbols++] = (struct refl_symbol){name, file, message, service};
    return true;
}

/* A DescriptorProto in scope: its name, nested messages (3) and enums (4). */
static bool index_message(struct wire m, const char *scope, int file, int depth)
{
    char *name = wire_name(m);
    char *full = name != NULL ? qualify(scope, name) : NULL;
    free(name);
    if (full == NULL || !add_symbol(full, file, true, false)) return false;
    uint32_t f;
    struct wire sub;
    while (wire_next(&m, &f, &sub)) {
        if (sub.p == NULL) continue;
        if (f == 3 && depth < 32 && !index_message(sub, full, file, depth + 1)) return false;
        if (f == 4) {
            char *en = wire_name(sub);
            bool ok = en != NULL && add_symbol(qualify(full, en), file, false, false);
            free(en);
            if (!ok) return false;
        }
    }
    return true;
}

static bool index_file(struct wire fd, int file)
{
    struct refl_file *rf = &idx.files[file];
    rf->bytes = fd.p;
    rf->len = (size_t)(fd.end - fd.p);
    uint32_t f;
    struct wire sub, w = fd;
    while (wire_next(&w, &f, &sub)) { /* name and package first: symbols need the package */
        if (sub.p == NULL) continue;
        if (f == 1) rf->name = wire_str(&sub);
        if (f == 2) rf->package = wire_str(&sub);
        if (f == 3 && rf->n_deps < REFL_MAX_DEPS) rf->deps[rf->n_deps++] = wire_str(&sub);
    }
    if (rf->name == NULL) return false;
    if (rf->package == NULL) rf->package = calloc(1, 1);
    if (rf->package == NULL) return false;
    w = fd;
    while (wire_next(&w, &f, &sub)) {
        if (sub.p == NULL) continue;
        if (f == 4 && !index_message(sub, rf->package, file, 0)) return false;
        if (f == 5) {
            char *en = wire_name(sub);
            bool ok = en != NULL && add_symbol(qualify(rf->package, en), file, false, false);
            free(en);
            if (!ok) return false;
        }
        if (f == 6) { /* ServiceDescriptorProto: name (1), methods (2) */
            char *sn = wire_name(sub);
            char *full = sn != NULL ? qualify(rf->package, sn) : NULL;
            free(sn);
            if (full == NULL || !add_symbol(full, file, false, true)) return false;
            if (idx.n_services < sizeof idx.services / sizeof idx.services[0])
                idx.services[idx.n_services++] = full;
            uint32_t mf;
            struct wire ms, sw = sub;
            while (wire_next(&sw, &mf, &ms)) {
                if (mf != 2 || ms.p == NULL) continue;
                char *mn = wire_name(ms);
                bool ok = mn != NULL && add_symbol(qualify(full, mn), file, false, false);
                free(mn);
                if (!ok) return false;
            }
        }
    }
    return true;
}

static void index_build(void)
{
    struct wire set = {(const uint8_t *)ksm_proto_descriptor_set,
                       (const uint8_t *)ksm_proto_descriptor_set + ksm_proto_descriptor_set_len};
    uint32_t f;
    struct wire sub;
    idx.ok = true;
    while (idx.ok && wire_next(&set, &f, &sub)) {
        if (f != 1 || sub.p == NULL) continue;
        if (idx.n_files == REFL_MAX_FILES || !index_file(sub, idx.n_files)) {
            idx.ok = false;
            break;
        }
        idx.n_files++;
    }
    if (!idx.ok) KSM_LOGE("rpc", "server reflection: the embedded descriptor set is unreadable");
}

static int find_file(const char *name)
{
    for (int i = 0; i < idx.n_files; i++)
        if (strcmp(idx.files[i].name, name) == 0) return i;
    return -1;
}

static const struct refl_symbol *find_symbol(const char *name)
{
    if (name[0] == '.') name++; /* ".kasmina.v1.Tensor", as type references spell it */
    for (size_t i = 0; i < idx.n_symbols; i++)
        if (strcmp(idx.symbols[i].name, name) == 0) return &idx.symbols[i];
    return NULL;
}

/* ---- Answers ---- */

/* The file and, after it, every file it needs that is not listed yet (the protocol lets the
 * server send the dependencies with the file; clients ask for any that are missing). */
static void add_with_deps(int file, bool *listed, ProtobufCBinaryData *out, size_t *n)
{
    if (listed[file]) return;
    listed[file] = true;
    out[(*n)++] = (ProtobufCBinaryData){idx.files[file].len, (uint8_t *)idx.files[file].bytes};
    for (int d = 0; d < idx.files[file].n_deps; d++) {
        int k = find_file(idx.files[file].deps[d]);
        if (k >= 0) add_with_deps(k, listed, out, n);
    }
}

/* Packs the answer to req into a byte buffer (NULL on OOM). */
static grpc_byte_buffer *answer(Grpc__Reflection__V1alpha__ServerReflectionRequest *req)
{
    Grpc__Reflection__V1alpha__ServerReflectionResponse r =
        GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__FileDescriptorResponse fdr =
        GRPC__REFLECTION__V1ALPHA__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ListServiceResponse lsr =
        GRPC__REFLECTION__V1ALPHA__LIST_SERVICE_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ExtensionNumberResponse enr =
        GRPC__REFLECTION__V1ALPHA__EXTENSION_NUMBER_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ErrorResponse er = GRPC__REFLECTION__V1ALPHA__ERROR_RESPONSE__INIT;
    Grpc__Reflection__V1alpha__ServiceResponse svc[REFL_MAX_FILES * 2];
    Grpc__Reflection__V1alpha__ServiceResponse *svcp[REFL_MAX_FILES * 2];
    ProtobufCBinaryData files[REFL_MAX_FILES];
    bool listed[REFL_MAX_FILES] = {false};
    char msg[512];
    r.valid_host = req->host;
    r.original_request = req;

    int file = -1;
    switch (req->message_request_case) {
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        for (size_t i = 0; i < idx.n_services; i++) {
            grpc__reflection__v1alpha__service_response__init(&svc[i]);
            svc[i].name = idx.services[i];
            svcp[i] = &svc[i];
        }
        lsr.n_service = idx.n_services;
        lsr.service = svcp;
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        r.list_services_response = &lsr;
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        file = find_file(req->file_by_filename);
        if (file < 0)
            snprintf(msg, sizeof msg, "No file named '%.200s' (kasminad serves %s and %s).",
                     req->file_by_filename, idx.n_files > 0 ? idx.files[0].name : "",
                     idx.n_files > 1 ? idx.files[1].name : "");
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL: {
        const struct refl_symbol *sym = find_symbol(req->file_containing_symbol);
        if (sym != NULL)
            file = sym->file;
        else
            snprintf(msg, sizeof msg, "No symbol named '%.200s'.", req->file_containing_symbol);
        break;
    }
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
        snprintf(msg, sizeof msg, "No extension %d of '%.200s': kasminad's protos declare none.",
                 req->file_containing_extension ? req->file_containing_extension->extension_number
                                                : 0,
                 req->file_containing_extension && req->file_containing_extension->containing_type
                     ? req->file_containing_extension->containing_type
                     : "");
        break;
    case GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE: {
        const struct refl_symbol *sym = find_symbol(req->all_extension_numbers_of_type);
        if (sym != NULL && sym->message) {
            enr.base_type_name = sym->name;
            r.message_response_case =
                GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
            r.all_extension_numbers_response = &enr;
        } else {
            snprintf(msg, sizeof msg, "No message type named '%.200s'.",
                     req->all_extension_numbers_of_type);
        }
        break;
    }
    default:
        er.error_code = GRPC_STATUS_INVALID_ARGUMENT;
        er.error_message = (char *)"The ServerReflectionRequest sets no message_request.";
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        r.error_response = &er;
        break;
    }
    if (file >= 0) {
        size_t n = 0;
        add_with_deps(file, listed, files, &n);
        fdr.n_file_descriptor_proto = n;
        fdr.file_descriptor_proto = files;
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
        r.file_descriptor_response = &fdr;
    } else if (r.message_response_case ==
               GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE__NOT_SET) {
        er.error_code = GRPC_STATUS_NOT_FOUND;
        er.error_message = msg;
        r.message_response_case =
            GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        r.error_response = &er;
    }
    return rpc_pack(&r.base);
}

/* ---- The stream ---- */

static void refl_finish(struct rpc_call *c, int err, const char *msg)
{
    c->refl_running = false;
    rpc_call_finish(c, NULL, err, msg, 0);
}

static void on_refl_recv(struct rpc_tag *t, bool ok);

static void recv_next(struct rpc_call *c)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &c->refl_in;
    c->refl_in = NULL;
    grpc_call *gc = c->gc;
    KSM_TSAN_RELEASE(&c->recv_tag);
    if (grpc_call_start_batch(gc, &op, 1, &c->recv_tag, NULL) != GRPC_CALL_OK)
        refl_finish(c, KSM_EINTERNAL, "The server could not receive the next reflection request.");
}

/* Answers the request in c->payload (NULL: the client sent none and half-closed). */
static void answer_payload(ksm_rpc_server *s, struct rpc_call *c)
{
    if (c->payload == NULL) {
        refl_finish(c, 0, NULL);
        return;
    }
    char why[256];
    if (grpc_byte_buffer_length(c->payload) > RPC_SMALL_REQUEST_MAX) {
        snprintf(why, sizeof why, "A ServerReflectionRequest over %zu bytes is refused.",
                 (size_t)RPC_SMALL_REQUEST_MAX);
        refl_finish(c, KSM_ELIMIT, why);
        return;
    }
    int zrc = rpc_payload_inflate(s, c, RPC_SMALL_REQUEST_MAX, why, sizeof why);
    if (zrc != 0) {
        refl_finish(c, zrc, why);
        return;
    }
    ProtobufCMessage *req = rpc_decode(
        c, &grpc__reflection__v1alpha__server_reflection_request__descriptor, why, sizeof why);
    if (req == NULL) {
        refl_finish(c, KSM_EINVAL, why);
        return;
    }
    if (!idx.ok) {
        protobuf_c_message_free_unpacked(req, NULL);
        refl_finish(c, KSM_EINTERNAL, "Server reflection is unavailable: no descriptors.");
        return;
    }
    c->refl_out = answer((Grpc__Reflection__V1alpha__ServerReflectionRequest *)req);
    protobuf_c_message_free_unpacked(req, NULL);
    if (c->refl_out == NULL) {
        refl_finish(c, KSM_ENOMEM, "The reflection answer could not be built: out of memory.");
        return;
    }
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t k = 0;
    if (!c->started) {
        ops[k++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->started = true;
    }
    ops[k].op = GRPC_OP_SEND_MESSAGE;
    ops[k].data.send_message.send_message = c->refl_out;
    k++;
    c->refl_running = true;
    grpc_call *gc = c->gc;
    KSM_TSAN_RELEASE(&c->send_tag);
    if (grpc_call_start_batch(gc, ops, k, &c->send_tag, NULL) != GRPC_CALL_OK)
        refl_finish(c, KSM_EINTERNAL, "The server could not send a reflection answer.");
}

void rpc_reflection_start(ksm_rpc_server *s, struct rpc_call *c)
{
    pthread_once(&idx_once, index_build);
    c->recv_tag.done = on_refl_recv;
    answer_payload(s, c);
}

static void on_refl_recv(struct rpc_tag *t, bool ok)
{
    struct rpc_call *c = (struct rpc_call *)((char *)t - offsetof(struct rpc_call, recv_tag));
    if (!ok || atomic_load(&c->closed)) {
        refl_finish(c, KSM_ECANCELED, "The reflection stream was cancelled.");
        return;
    }
    if (c->payload != NULL) grpc_byte_buffer_destroy(c->payload);
    c->payload = c->refl_in; /* NULL: the client half-closed, the stream ends with OK */
    c->refl_in = NULL;
    answer_payload(c->srv, c);
}

bool rpc_reflection_sent(struct rpc_call *c, bool ok)
{
    if (!c->refl_running) return false; /* the status batch */
    if (c->refl_out != NULL) grpc_byte_buffer_destroy(c->refl_out);
    c->refl_out = NULL;
    if (!ok || atomic_load(&c->closed))
        refl_finish(c, KSM_ECANCELED, "The client went away during the reflection stream.");
    else if (atomic_load(&c->srv->shutting_down))
        refl_finish(c, KSM_ESHUTDOWN, "The server is shutting down.");
    else
        recv_next(c);
    return true;
}

void rpc_reflection_free(struct rpc_call *c)
{
    if (c->refl_out != NULL) grpc_byte_buffer_destroy(c->refl_out);
    if (c->refl_in != NULL) grpc_byte_buffer_destroy(c->refl_in);
    c->refl_out = c->refl_in = NULL;
}
