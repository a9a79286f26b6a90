/*
 * rpc/dispatch: the request path of one unary Kasmina call, from request bytes to reply bytes,
 * with no network: protobuf-c unpack (big bytes fields copied once, wire/pbgather), the method's
 * handler (rpc/calls: convert, validate, engine call, reply in the call's arena), pack, then the
 * deferred frees. The server's workers call it for every unary call; the fuzzers (tests/fuzz/)
 * call it directly, so both run the same code.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "wire/pbgather.h"
#include "rpc/server_impl.h"

int rpc_method_index(const char *path)
{
    for (size_t i = 0; i < rpc_n_methods; i++)
        if (strcmp(rpc_methods[i].path, path) == 0) return (int)i;
    return -1;
}

size_t rpc_gather_min = KSM_PB_GATHER_MIN;

int rpc_dispatch_bytes(ksm_rpc_server *s, size_t method_index, const uint8_t *req, size_t len,
                       uint8_t **reply, size_t *reply_len, char *err, size_t errlen)
{
    struct ksm_pb_piece p = {req, len};
    return rpc_dispatch_pieces(s, method_index, &p, 1, reply, reply_len, err, errlen);
}

int rpc_dispatch_pieces(ksm_rpc_server *s, size_t method_index, const struct ksm_pb_piece *req,
                        size_t n, uint8_t **reply, size_t *reply_len, char *err, size_t errlen)
{
    return rpc_dispatch_call(s, method_index, req, n, reply, reply_len, NULL, err, errlen);
}

int rpc_dispatch_call(ksm_rpc_server *s, size_t method_index, const struct ksm_pb_piece *req,
                      size_t n, uint8_t **reply, size_t *reply_len, struct ksm_advice *advice,
                      char *err, size_t errlen)
{
    if (advice != NULL) memset(advice, 0, sizeof *advice);
    *reply = NULL;
    *reply_len = 0;
    if (errlen > 0) err[0] = '\0';
    if (method_index >= rpc_n_methods || rpc_methods[method_index].kind != RPC_UNARY) {
        snprintf(err, errlen, "The method is not a unary Kasmina method.");
        return KSM_ENOSYS;
    }
    const struct rpc_method *m = &rpc_methods[method_index];
    /* Text first: protobuf-c accepts any bytes in a string field. */
    int trc = ksm_pb_check_text(m->req, req, n, err, errlen);
    if (trc != 0) return trc;
    /* A tensor's bytes land, aligned, in a buffer of their own: ksm_wire_tensor_from_pb then
     * borrows them (no copy) as the engine's host input. */
    ProtobufCMessage *msg = ksm_pb_unpack_pieces(m->req, req, n, rpc_gather_min, NULL);
    if (msg == NULL) {
        snprintf(err, errlen, "The request is not a valid %s message.", m->req->name);
        return KSM_EINVAL;
    }
    struct rpc_ctx cx;
    memset(&cx, 0, sizeof cx);
    ksm_pb_arena_init(&cx.arena);
    ProtobufCMessage *out = NULL;
    int rc = m->fn(s, msg, &cx, &out);
    if (rc != 0) ksm_service_explain(s->service, rc, cx.err, sizeof cx.err);
    if (rc == 0 && out != NULL) {
        /* Packed before the deferred frees: the reply borrows engine results. */
        size_t len = protobuf_c_message_get_packed_size(out);
        uint8_t *buf = NULL;
        if ((rc = rpc_limit_reply(s, len, "reply", &cx)) != 0) {
            /* the reply that nothing predicted (rpc_limit_reply_*) is not encoded */
        } else if ((buf = malloc(len > 0 ? len : 1)) == NULL) {
            rc = KSM_ENOMEM;
            snprintf(cx.err, sizeof cx.err, "The reply could not be encoded: out of host memory.");
        } else {
            protobuf_c_message_pack(out, buf);
            *reply = buf;
            *reply_len = len;
        }
    }
    if (rc != 0 && errlen > 0) snprintf(err, errlen, "%s", cx.err);
    if (rc == 0 && advice != NULL) *advice = cx.advice;
    for (int i = cx.n_defer - 1; i >= 0; i--) cx.defer[i].fn(cx.defer[i].p);
    ksm_pb_arena_fini(&cx.arena);
    protobuf_c_message_free_unpacked(msg, NULL);
    return rc;
}

int rpc_server_offline_new(ksm_engine *e, const struct ksm_rpc_server_config *cfg,
                           ksm_rpc_server **out)
{
    ksm_rpc_server *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    struct ksm_service_config sc = {.engine = e};
    int rc = ksm_service_new(&sc, &s->service);
    if (rc != 0) {
        free(s);
        return rc;
    }
    s->owns_service = true;
    s->engine = e;
    if (cfg != NULL) s->cfg = *cfg;
    s->cfg.listen = NULL;
    s->cfg.n_listen = 0;
    rpc_config_defaults(&s->cfg);
    pthread_mutex_init(&s->lock, NULL);
    pthread_mutex_init(&s->limits_lock, NULL);
    pthread_cond_init(&s->q_cond, NULL);
    pthread_cond_init(&s->idle_cond, NULL);
    atomic_store(&s->serving, true);
    *out = s;
    return 0;
}

void rpc_server_offline_free(ksm_rpc_server *s)
{
    if (s == NULL) return;
    rpc_limits_fini(s);
    if (s->owns_service) ksm_service_free(s->service);
    pthread_cond_destroy(&s->q_cond);
    pthread_cond_destroy(&s->idle_cond);
    pthread_mutex_destroy(&s->limits_lock);
    pthread_mutex_destroy(&s->lock);
    free(s);
}
