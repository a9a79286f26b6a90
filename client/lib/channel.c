/*
 * libkasmina-client transport: the channel, unary calls, server streams and the mapping of a
 * gRPC status back to KSM_E* codes.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "client_impl.h"
#include "wire/pbgather.h"
#include "wire/status.h"

// ---- Errors ----

void ksmc_strlcpy(char *dst, const char *src, size_t n)
{
    if (n == 0) return;
    if (!src) src = "";
    size_t l = strlen(src);
    if (l >= n) l = n - 1;
    memcpy(dst, src, l);
    dst[l] = '\0';
}

void ksmc_ok(struct ksm_client_error *err)
{
    if (!err) return;
    err->code = 0;
    err->grpc_status = 0;
    err->message[0] = '\0';
    err->warnings[0] = '\0';
}

int ksmc_fail(struct ksm_client_error *err, int code, int grpc_status, const char *fmt, ...)
{
    if (err) {
        err->code = code;
        err->grpc_status = grpc_status;
        err->warnings[0] = '\0';
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return code;
}

static const char *const status_names[] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};

/* Both directions are the server's own table (daemon/wire/status.c). */
int ksm_client_code_from_grpc(int grpc_status)
{
    return ksm_rpc_err_from_status((grpc_status_code)grpc_status);
}

int ksm_client_grpc_from_code(int code) { return (int)ksm_rpc_status_from_err(code); }

const char *ksm_client_grpc_status_name(int grpc_status)
{
    if (grpc_status < 0 || grpc_status >= (int)(sizeof status_names / sizeof status_names[0]))
        return "UNKNOWN";
    return status_names[grpc_status];
}

/* Finds the KSM_E* name the server attached: the trailing metadata entry KSM_RPC_ERROR_MD
 * ("kasmina-error"; any key ending in "error" is accepted), or a "KSM_E...: " prefix of the details
 * (which is then skipped in *msg). */
static int code_from_status(grpc_status_code status, const grpc_metadata_array *trail,
                            const char **msg)
{
    int code;
    for (size_t i = 0; i < trail->count; i++) {
        grpc_slice k = trail->metadata[i].key;
        size_t kl = GRPC_SLICE_LENGTH(k);
        if (kl < 5 || memcmp(GRPC_SLICE_START_PTR(k) + kl - 5, "error", 5) != 0) continue;
        grpc_slice v = trail->metadata[i].value;
        char name[64];
        size_t vl = GRPC_SLICE_LENGTH(v);
        if (vl == 0 || vl >= sizeof name) continue;
        memcpy(name, GRPC_SLICE_START_PTR(v), vl);
        name[vl] = '\0';
        if (ksm_err_from_name(name, &code) == 0 && code != 0) return code;
    }
    const char *d = *msg;
    if (strncmp(d, "KSM_E", 5) == 0) {
        size_t n = 5;
        while (d[n] >= 'A' && d[n] <= 'Z') n++;
        if (d[n] == ':' || d[n] == ' ' || d[n] == '\0') {
            char name[64];
            if (n < sizeof name) {
                memcpy(name, d, n);
                name[n] = '\0';
                if (ksm_err_from_name(name, &code) == 0 && code != 0) {
                    d += n;
                    while (*d == ':' || *d == ' ') d++;
                    *msg = d;
                    return code;
                }
            }
        }
    }
    return ksm_client_code_from_grpc(status);
}

/* The KSM_RPC_WARNING_MD entries of a successful call, one per line, into out. */
static void collect_warnings(const grpc_metadata_array *trail, char *out, size_t outlen)
{
    size_t used = 0;
    const size_t kl = strlen(KSM_RPC_WARNING_MD);
    for (size_t i = 0; i < trail->count && used + 1 < outlen; i++) {
        grpc_slice k = trail->metadata[i].key;
        if (GRPC_SLICE_LENGTH(k) != kl || memcmp(GRPC_SLICE_START_PTR(k), KSM_RPC_WARNING_MD, kl))
            continue;
        grpc_slice v = trail->metadata[i].value;
        int n = snprintf(out + used, outlen - used, "%s%.*s", used ? "\n" : "",
                         (int)GRPC_SLICE_LENGTH(v), (const char *)GRPC_SLICE_START_PTR(v));
        if (n < 0) break;
        used += (size_t)n < outlen - used ? (size_t)n : outlen - used - 1;
    }
}

static int status_to_err(grpc_status_code status, grpc_slice details, const char *error_string,
                         const grpc_metadata_array *trail, const char *method,
                         struct ksm_client_error *err)
{
    if (status == GRPC_STATUS_OK) {
        ksmc_ok(err);
        if (err) collect_warnings(trail, err->warnings, sizeof err->warnings);
        return 0;
    }
    char *d = grpc_slice_to_c_string(details);
    const char *msg = d ? d : "";
    int code = code_from_status(status, trail, &msg);
    if (!*msg) msg = error_string && *error_string ? error_string : ksm_strerror(code);
    unsigned long got = 0, lim = 0;
    if (status == GRPC_STATUS_RESOURCE_EXHAUSTED &&
        sscanf(msg, "Received message larger than max (%lu vs. %lu)", &got, &lim) == 2) {
        /* gRPC's own words when a reply passes the client's limit: name the option. */
        bool weights = strstr(method, "/ExportWeights") != NULL;
        ksmc_fail(err, code, (int)status,
                  "The reply is %lu bytes, over the client's max message size %lu "
                  "(ksm_client_options.max_message_bytes, kasminactl --max-message-bytes)%s",
                  got, lim,
                  weights ? "; ExportWeightsStream moves weights of any size "
                            "(KSM_CLIENT_STREAM_AUTO, kasminactl export-weights --stream)"
                          : "");
        gpr_free(d);
        return code;
    }
    ksmc_fail(err, code, (int)status, "%s", msg);
    gpr_free(d);
    return code;
}

// ---- Connection ----

static char *read_file(const char *path, int *rc)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        *rc = -errno;
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (n + 1 < cap) break;
        char *nb = realloc(buf, cap * 2);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    fclose(f);
    if (!buf) {
        *rc = KSM_ENOMEM;
        return NULL;
    }
    buf[n] = '\0';
    *rc = 0;
    return buf;
}

static grpc_channel_credentials *make_creds(const struct ksm_client_options *o,
                                            struct ksm_client_error *err, int *rc)
{
    *rc = 0;
    if (!o || !o->tls) return grpc_insecure_credentials_create();
    char *ca = NULL, *cert = NULL, *key = NULL;
    if (o->tls_ca_file && !(ca = read_file(o->tls_ca_file, rc))) goto out_fail;
    if ((o->tls_cert_file != NULL) != (o->tls_key_file != NULL)) {
        *rc = ksmc_fail(err, KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT,
                        "tls_cert_file and tls_key_file must be given together");
        goto out_free;
    }
    if (o->tls_cert_file && !(cert = read_file(o->tls_cert_file, rc))) goto out_fail;
    if (o->tls_key_file && !(key = read_file(o->tls_key_file, rc))) goto out_fail;
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    grpc_channel_credentials *creds =
        grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
    free(ca);
    free(cert);
    free(key);
    if (!creds)
        *rc = ksmc_fail(err, KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT,
                        "the TLS credentials could not be created");
    return creds;
out_fail:
    ksmc_fail(err, *rc, GRPC_STATUS_INVALID_ARGUMENT, "cannot read a TLS file: %s", strerror(-*rc));
out_free:
    free(ca);
    free(cert);
    free(key);
    return NULL;
}

int ksm_client_connect(const char *target, const struct ksm_client_options *opts, ksm_client **out,
                       struct ksm_client_error *err)
{
    if (!out) return ksmc_fail(err, KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (!target || !*target)
        return ksmc_fail(err, KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT, "target is empty");
    if (opts && opts->bearer_token && strpbrk(opts->bearer_token, "\r\n"))
        return ksmc_fail(err, KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT,
                         "bearer_token must not contain line breaks");
    ksm_client *c = calloc(1, sizeof *c);
    if (!c) return ksmc_fail(err, KSM_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    c->target = strdup(target);
    c->connect_deadline_ms =
        opts && opts->deadline_ms ? opts->deadline_ms : KSM_CLIENT_DEFAULT_DEADLINE_MS;
    atomic_init(&c->deadline_ms, c->connect_deadline_ms);
    c->max_message =
        opts && opts->max_message_bytes ? opts->max_message_bytes : KSM_CLIENT_DEFAULT_MAX_MESSAGE;
    if (c->max_message > INT_MAX) c->max_message = INT_MAX;
    c->wait_for_ready = opts && opts->wait_for_ready;
    if (opts && opts->bearer_token && *opts->bearer_token) {
        size_t l = strlen(opts->bearer_token) + 8;
        c->authorization = malloc(l);
        if (c->authorization) snprintf(c->authorization, l, "Bearer %s", opts->bearer_token);
    }
    if (!c->target || (opts && opts->bearer_token && *opts->bearer_token && !c->authorization)) {
        free(c->target);
        free(c->authorization);
        free(c);
        return ksmc_fail(err, KSM_ENOMEM, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }

    grpc_init();
    int rc;
    grpc_channel_credentials *creds = make_creds(opts, err, &rc);
    if (!creds) {
        grpc_shutdown();
        free(c->target);
        free(c->authorization);
        free(c);
        return rc ? rc : KSM_EINVAL;
    }
    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)c->max_message;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)c->max_message;
    args[2].type = GRPC_ARG_STRING;
    args[2].key = GRPC_ARG_PRIMARY_USER_AGENT_STRING;
    args[2].value.string = "kasmina-client/" KSM_CLIENT_VERSION;
    grpc_channel_args ca = {.num_args = 3, .args = args};
    c->channel = grpc_channel_create(target, creds, &ca);
    grpc_channel_credentials_release(creds);
    if (!c->channel) {
        grpc_shutdown();
        free(c->target);
        free(c->authorization);
        free(c);
        return ksmc_fail(err, KSM_EINVAL, GRPC_STATUS_INVALID_ARGUMENT,
                         "target '%s' is not a valid gRPC address", target);
    }
    *out = c;
    ksmc_ok(err);
    return 0;
}

void ksm_client_close(ksm_client *c)
{
    if (!c) return;
    grpc_channel_destroy(c->channel);
    grpc_shutdown();
    free(c->target);
    free(c->authorization);
    free(c);
}

void ksm_client_set_deadline(ksm_client *c, uint32_t deadline_ms)
{
    atomic_store(&c->deadline_ms, deadline_ms ? deadline_ms : c->connect_deadline_ms);
}

const char *ksm_client_target(const ksm_client *c) { return c->target; }

const char *ksm_client_default_target(char *buf, size_t len)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    if (geteuid() != 0 && xdg && *xdg)
        snprintf(buf, len, "unix:%s/kasmina/kasminad.sock", xdg);
    else
        snprintf(buf, len, "unix:/run/kasmina/kasminad.sock");
    return buf;
}

// ---- Calls ----

static int pack_request(const ProtobufCMessage *req, grpc_byte_buffer **out)
{
    size_t len = protobuf_c_message_get_packed_size(req);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(req, GRPC_SLICE_START_PTR(s));
    *out = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return 0;
}

/* Unpacks a reply from the byte buffer's slices in place: tensors and other big bytes fields are
 * copied once, into buffers the message owns (wire/pbgather), which the calls then take over
 * (ksm_wire_tensor_from_pb_take) instead of copying them again. Unpacked with protobuf-c's
 * default allocator: its bytes fields are malloc'd. */
static ProtobufCMessage *unpack_reply(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return NULL;
    struct ksm_pb_piece one[8], *p = one;
    size_t n = 0, cap = sizeof one / sizeof one[0];
    grpc_slice *sl;
    ProtobufCMessage *m = NULL;
    while (grpc_byte_buffer_reader_peek(&r, &sl) != 0) {
        if (n == cap) {
            cap *= 2;
            struct ksm_pb_piece *np =
                p == one ? malloc(cap * sizeof *np) : realloc(p, cap * sizeof *np);
            if (np == NULL) goto out;
            if (p == one) memcpy(np, one, sizeof one);
            p = np;
        }
        p[n++] = (struct ksm_pb_piece){GRPC_SLICE_START_PTR(*sl), GRPC_SLICE_LENGTH(*sl)};
    }
    m = ksm_pb_unpack_pieces(d, p, n, KSM_PB_GATHER_MIN, NULL);
out:
    if (p != one) free(p);
    grpc_byte_buffer_reader_destroy(&r);
    return m;
}

static void fill_metadata(ksm_client *c, grpc_metadata *md, size_t *n)
{
    *n = 0;
    if (c->authorization) {
        md[0].key = grpc_slice_from_static_string("authorization");
        md[0].value = grpc_slice_from_static_string(c->authorization);
        *n = 1;
    }
}

static grpc_call *start_call(ksm_client *c, grpc_completion_queue *cq, const char *method,
                             gpr_timespec deadline)
{
    return grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                    grpc_slice_from_static_string(method), NULL, deadline, NULL);
}

static void drain_cq(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
}

int ksmc_unary(ksm_client *c, const char *method, const ProtobufCMessage *req,
               const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
               struct ksm_client_error *err)
{
    *reply = NULL;
    size_t req_len = protobuf_c_message_get_packed_size(req);
    if (req_len > c->max_message)
        return ksmc_fail(err, KSM_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED,
                         "The request is %zu bytes, over the client's max message size %zu "
                         "(ksm_client_options.max_message_bytes, kasminactl "
                         "--max-message-bytes)%s",
                         req_len, c->max_message,
                         strstr(method, "/LoadWeights") != NULL
                             ? "; LoadWeightsStream moves weights of any size "
                               "(KSM_CLIENT_STREAM_AUTO, kasminactl load-weights --stream)"
                             : "");
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    uint32_t ms = atomic_load(&c->deadline_ms);
    gpr_timespec deadline =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis((int64_t)ms, GPR_TIMESPAN));
    grpc_call *call = start_call(c, cq, method, deadline);
    if (!call) {
        drain_cq(cq);
        return ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "cannot create a call");
    }
    grpc_byte_buffer *send_bb;
    pack_request(req, &send_bb);
    grpc_byte_buffer *recv_bb = NULL;
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_metadata md[1];
    size_t n_md;
    fill_metadata(c, md, &n_md);

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = n_md ? md : NULL;
    ops[0].flags = c->wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv_bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    ops[5].data.recv_status_on_client.error_string = &error_string;

    int rc;
    grpc_call_error ce = grpc_call_start_batch(call, ops, 6, (void *)1, NULL);
    if (ce != GRPC_CALL_OK) {
        rc = ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "grpc_call_start_batch: %d",
                       (int)ce);
    } else {
        grpc_event ev =
            grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE) {
            rc = ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "the call did not complete");
        } else {
            rc = status_to_err(status, details, error_string, &trail_md, method, err);
            if (rc == 0) {
                if (!recv_bb) {
                    rc = ksmc_fail(err, KSM_EFORMAT, GRPC_STATUS_INTERNAL,
                                   "the server sent no reply message");
                } else if (!(*reply = unpack_reply(recv_bb, reply_desc))) {
                    rc = ksmc_fail(err, KSM_EFORMAT, GRPC_STATUS_INTERNAL,
                                   "the server's reply is not a valid %s", reply_desc->name);
                }
            }
        }
    }
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_byte_buffer_destroy(send_bb);
    if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
    grpc_call_unref(call);
    drain_cq(cq);
    return rc;
}

static gpr_timespec call_deadline(ksm_client *c)
{
    uint32_t ms = atomic_load(&c->deadline_ms);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis((int64_t)ms, GPR_TIMESPAN));
}

int ksmc_server_stream(ksm_client *c, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *reply_desc, uint32_t idle_ms,
                       bool with_deadline, ksmc_stream_cb msg_cb, void *ud,
                       struct ksm_client_error *err)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call *call = start_call(
        c, cq, method, with_deadline ? call_deadline(c) : gpr_inf_future(GPR_CLOCK_REALTIME));
    if (!call) {
        drain_cq(cq);
        return ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "cannot create a call");
    }
    grpc_byte_buffer *send_bb;
    pack_request(req, &send_bb);
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_metadata md[1];
    size_t n_md;
    fill_metadata(c, md, &n_md);

    void *const tag_send = (void *)1, *const tag_status = (void *)2, *const tag_recv = (void *)3;
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = n_md ? md : NULL;
    ops[0].flags = c->wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    int rc = 0, cb_rc = 0;
    bool status_started = false, cancelled = false;
    if (grpc_call_start_batch(call, ops, 4, tag_send, NULL) != GRPC_CALL_OK) {
        rc = ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "grpc_call_start_batch failed");
        goto out;
    }
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[0].data.recv_status_on_client.status = &status;
    ops[0].data.recv_status_on_client.status_details = &details;
    ops[0].data.recv_status_on_client.error_string = &error_string;
    if (grpc_call_start_batch(call, ops, 1, tag_status, NULL) != GRPC_CALL_OK) {
        grpc_call_cancel(call, NULL);
        grpc_completion_queue_pluck(cq, tag_send, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        rc = ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "grpc_call_start_batch failed");
        goto out;
    }
    status_started = true;
    grpc_completion_queue_pluck(cq, tag_send, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);

    for (;;) {
        grpc_byte_buffer *bb = NULL;
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &bb;
        if (grpc_call_start_batch(call, ops, 1, tag_recv, NULL) != GRPC_CALL_OK) break;
        gpr_timespec dl = idle_ms ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                                 gpr_time_from_millis(idle_ms, GPR_TIMESPAN))
                                  : gpr_inf_future(GPR_CLOCK_REALTIME);
        grpc_event ev = grpc_completion_queue_pluck(cq, tag_recv, dl, NULL);
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            grpc_call_cancel(call, NULL);
            cancelled = true;
            grpc_completion_queue_pluck(cq, tag_recv, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            if (bb) grpc_byte_buffer_destroy(bb);
            break;
        }
        if (!ev.success || !bb) break; /* the stream ended: the status says how */
        ProtobufCMessage *m = unpack_reply(bb, reply_desc);
        grpc_byte_buffer_destroy(bb);
        if (!m) {
            grpc_call_cancel(call, NULL);
            cancelled = true;
            cb_rc = ksmc_fail(err, KSM_EFORMAT, GRPC_STATUS_INTERNAL,
                              "the server sent a message that is not a valid %s", reply_desc->name);
            break;
        }
        cb_rc = msg_cb(ud, m);
        protobuf_c_message_free_unpacked(m, NULL);
        if (cb_rc != 0) {
            grpc_call_cancel(call, NULL);
            cancelled = true;
            break;
        }
    }
out:
    if (status_started) {
        grpc_completion_queue_pluck(cq, tag_status, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (cb_rc != 0)
            rc = cb_rc; /* err is filled for negative codes; positive ones are the caller's */
        else if (cancelled)
            rc = 0;
        else
            rc = status_to_err(status, details, error_string, &trail_md, method, err);
    }
    if (rc > 0 || (rc == 0 && status_started)) ksmc_ok(err);
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_byte_buffer_destroy(send_bb);
    grpc_call_unref(call);
    drain_cq(cq);
    return rc;
}

int ksmc_client_stream(ksm_client *c, const char *method, ksmc_next_cb next_cb, void *ud,
                       const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **reply,
                       struct ksm_client_error *err)
{
    *reply = NULL;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    grpc_call *call = start_call(c, cq, method, call_deadline(c));
    if (!call) {
        drain_cq(cq);
        return ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "cannot create a call");
    }
    grpc_byte_buffer *recv_bb = NULL;
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    const char *error_string = NULL;
    grpc_metadata md[1];
    size_t n_md;
    fill_metadata(c, md, &n_md);
    void *const tag_send = (void *)1, *const tag_status = (void *)2;
    int rc = 0, cb_rc = 0;
    bool status_started = false;

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = n_md ? md : NULL;
    ops[0].flags = c->wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0;
    if (grpc_call_start_batch(call, ops, 1, tag_send, NULL) != GRPC_CALL_OK) {
        rc = ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "grpc_call_start_batch failed");
        goto out;
    }
    grpc_completion_queue_pluck(cq, tag_send, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    /* The reply and the status, whenever the server sends them (early, on an error). */
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[0].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &recv_bb;
    ops[2].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[2].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[2].data.recv_status_on_client.status = &status;
    ops[2].data.recv_status_on_client.status_details = &details;
    ops[2].data.recv_status_on_client.error_string = &error_string;
    if (grpc_call_start_batch(call, ops, 3, tag_status, NULL) != GRPC_CALL_OK) {
        grpc_call_cancel(call, NULL);
        rc = ksmc_fail(err, KSM_EINTERNAL, GRPC_STATUS_INTERNAL, "grpc_call_start_batch failed");
        goto out;
    }
    status_started = true;
    for (;;) {
        grpc_byte_buffer *bb = NULL;
        int more = next_cb(ud, &bb);
        if (more != 1) {
            if (bb) grpc_byte_buffer_destroy(bb);
            if (more != 0) {
                cb_rc = more;
                grpc_call_cancel(call, NULL);
            }
            break;
        }
        if (grpc_byte_buffer_length(bb) > c->max_message) {
            cb_rc = ksmc_fail(err, KSM_ELIMIT, GRPC_STATUS_RESOURCE_EXHAUSTED,
                              "A chunk of %zu bytes is over the client's max message size %zu "
                              "(ksm_client_options.max_message_bytes): send smaller chunks",
                              grpc_byte_buffer_length(bb), c->max_message);
            grpc_byte_buffer_destroy(bb);
            grpc_call_cancel(call, NULL);
            break;
        }
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_SEND_MESSAGE;
        ops[0].data.send_message.send_message = bb;
        bool sent = grpc_call_start_batch(call, ops, 1, tag_send, NULL) == GRPC_CALL_OK;
        if (sent) {
            grpc_event ev =
                grpc_completion_queue_pluck(cq, tag_send, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            sent = ev.success != 0;
        }
        grpc_byte_buffer_destroy(bb);
        if (!sent) break; /* the call ended: its status says why */
    }
    if (cb_rc == 0) {
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        if (grpc_call_start_batch(call, ops, 1, tag_send, NULL) == GRPC_CALL_OK)
            grpc_completion_queue_pluck(cq, tag_send, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    }
out:
    if (status_started) {
        grpc_completion_queue_pluck(cq, tag_status, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (cb_rc != 0) {
            rc = cb_rc; /* err is filled for negative codes; positive ones are the caller's */
            if (rc > 0) ksmc_ok(err);
        } else {
            rc = status_to_err(status, details, error_string, &trail_md, method, err);
            if (rc == 0) {
                if (!recv_bb)
                    rc = ksmc_fail(err, KSM_EFORMAT, GRPC_STATUS_INTERNAL,
                                   "the server sent no reply message");
                else if (!(*reply = unpack_reply(recv_bb, reply_desc)))
                    rc = ksmc_fail(err, KSM_EFORMAT, GRPC_STATUS_INTERNAL,
                                   "the server's reply is not a valid %s", reply_desc->name);
            }
        }
    }
    grpc_slice_unref(details);
    gpr_free((void *)error_string);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    if (recv_bb) grpc_byte_buffer_destroy(recv_bb);
    grpc_call_unref(call);
    drain_cq(cq);
    return rc;
}
