/*
 * rpc/limits: the per-request limits of kasminad (deploy/kasminad.conf documents each). A request
 * over one gets RESOURCE_EXHAUSTED (KSM_ELIMIT) with one sentence naming the option and its value;
 * nothing has changed and the daemon goes on serving the others. Limits whose state lives in the
 * engine (max-models, max-seeds-per-model, memory-cap) are enforced there, under the engine's
 * own locks; ksm_service_explain() names their options.
 *
 * max-reply-bytes bounds what one call makes the daemon build: where the reply's size follows
 * from the request (logits: rows x T x classes x element size; exported weights: parameters x
 * element size) it is checked before the engine runs, so a 100-byte request cannot make it
 * compute and hold gigabytes; every reply is checked again before it is encoded (rpc/dispatch).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/alloc.h"
#include "kasmina/errors.h"
#include "rpc/server_impl.h"

/* One (model, stream) key with compute calls queued or running; freed at zero. */
struct rpc_stream_use {
    struct rpc_stream_use *next;
    ksm_rpc_server *srv;
    unsigned n;
    size_t key_len;
    char key[]; /* model_id '\0' stream */
};

int rpc_limit_input(ksm_rpc_server *s, const ksm_tensor *input, struct rpc_ctx *cx)
{
    if (input == NULL || input->ndim < 1) return 0; /* the engine names the problem */
    uint32_t rows = s->cfg.max_batch_rows, seq = s->cfg.max_sequence_length;
    if (rows != 0 && input->shape[0] > (int64_t)rows) {
        snprintf(cx->err, sizeof cx->err, "input has %lld rows; max-batch-rows = %u.",
                 (long long)input->shape[0], rows);
        return KSM_ELIMIT;
    }
    /* Token ids [B, T] (a CNN input is [B, C, H, W]). */
    if (seq != 0 && input->ndim == 2 && input->shape[1] > (int64_t)seq) {
        snprintf(cx->err, sizeof cx->err,
                 "input has sequence length %lld; max-sequence-length = %u.",
                 (long long)input->shape[1], seq);
        return KSM_ELIMIT;
    }
    return 0;
}

/* a * b, saturating at UINT64_MAX. */
static uint64_t mul_sat(uint64_t a, uint64_t b)
{
    return b != 0 && a > UINT64_MAX / b ? UINT64_MAX : a * b;
}

int rpc_limit_reply(ksm_rpc_server *s, uint64_t bytes, const char *what, struct rpc_ctx *cx)
{
    size_t max = s->cfg.max_reply_bytes;
    if (max == 0 || bytes <= max) return 0;
    snprintf(cx->err, sizeof cx->err,
             "The reply would hold %llu bytes of %s; max-reply-bytes = %zu.",
             (unsigned long long)bytes, what, max);
    return KSM_ELIMIT;
}

int rpc_limit_reply_logits(ksm_rpc_server *s, ksm_model *m, const ksm_tensor *input, int out_dtype,
                           size_t copies, struct rpc_ctx *cx)
{
    if (input == NULL || input->ndim < 1 || copies == 0) return 0; /* the engine names it */
    struct ksm_model_info *info = ksm_pb_arena_alloc(&cx->arena, sizeof *info);
    if (info == NULL) return KSM_ENOMEM;
    if (ksm_model_get_info(m, info) != 0) return 0;
    /* CNN logits [B, classes]; transformer logits [B, T, vocab] for token ids [B, T]. */
    uint64_t n = input->shape[0] > 0 ? (uint64_t)input->shape[0] : 0;
    if (info->topology == KSM_TOPOLOGY_TRANSFORMER) {
        if (input->ndim >= 2 && input->shape[1] > 0) n = mul_sat(n, (uint64_t)input->shape[1]);
        n = mul_sat(n, info->transformer.vocab_size);
    } else {
        n = mul_sat(n, info->cnn.num_classes);
    }
    uint64_t elem =
        out_dtype == KASMINA__V1__DTYPE__DTYPE_F16 || out_dtype == KASMINA__V1__DTYPE__DTYPE_BF16
            ? 2
            : 4;
    return rpc_limit_reply(s, mul_sat(mul_sat(n, elem), copies), "logits", cx);
}

int rpc_limit_reply_evaluate(ksm_rpc_server *s, ksm_model *m, const struct ksm_evaluate_args *ea,
                             struct rpc_ctx *cx)
{
    if (!ea->return_logits) return 0;
    /* Explicit configs are counted; the standard set has at least one (the rest is checked
     * before encoding). */
    size_t copies = ea->n_configs > 0 ? ea->n_configs : 1;
    return rpc_limit_reply_logits(s, m, ea->input, KASMINA__V1__DTYPE__DTYPE_F32, copies, cx);
}

int rpc_limit_reply_export(ksm_rpc_server *s, ksm_model *m, bool with_host, struct rpc_ctx *cx)
{
    struct ksm_model_info *info = ksm_pb_arena_alloc(&cx->arena, sizeof *info);
    if (info == NULL) return KSM_ENOMEM;
    if (ksm_model_get_info(m, info) != 0) return 0;
    size_t elem = ksm_dtype_size(info->dtype);
    uint64_t params = (with_host ? info->host_params : 0) + info->seed_params;
    /* host_params counts the tied LM head once; the file holds it twice (as torch does). */
    if (with_host && info->topology == KSM_TOPOLOGY_TRANSFORMER)
        params += mul_sat(info->transformer.vocab_size, info->transformer.n_embd);
    return rpc_limit_reply_weights(s, mul_sat(params, elem ? elem : 4), cx);
}

int rpc_limit_reply_weights(ksm_rpc_server *s, uint64_t bytes, struct rpc_ctx *cx)
{
    size_t max = s->cfg.max_reply_bytes;
    if (max == 0 || bytes <= max) return 0;
    snprintf(cx->err, sizeof cx->err,
             "The reply would hold %llu bytes of weights; max-reply-bytes = %zu (use "
             "ExportWeightsStream, kasminactl export-weights --stream, which moves any size in "
             "chunks, or raise kasminad's --max-reply-bytes).",
             (unsigned long long)bytes, max);
    return KSM_ELIMIT;
}

static void stream_leave(void *p)
{
    struct rpc_stream_use *u = p;
    ksm_rpc_server *s = u->srv;
    pthread_mutex_lock(&s->limits_lock);
    if (--u->n == 0) {
        for (struct rpc_stream_use **pp = &s->stream_uses; *pp; pp = &(*pp)->next)
            if (*pp == u) {
                *pp = u->next;
                break;
            }
        free(u);
    }
    pthread_mutex_unlock(&s->limits_lock);
}

int rpc_limit_stream_enter(ksm_rpc_server *s, const char *model_id, const char *stream,
                           struct rpc_ctx *cx)
{
    uint32_t max = s->cfg.max_queued_per_stream;
    if (max == 0) return 0;
    if (model_id == NULL) model_id = "";
    if (stream == NULL) stream = "";
    size_t ml = strlen(model_id), sl = strlen(stream), kl = ml + 1 + sl;
    pthread_mutex_lock(&s->limits_lock);
    struct rpc_stream_use *u = s->stream_uses;
    while (u != NULL && !(u->key_len == kl && memcmp(u->key, model_id, ml + 1) == 0 &&
                          memcmp(u->key + ml + 1, stream, sl) == 0))
        u = u->next;
    if (u != NULL && u->n >= max) {
        pthread_mutex_unlock(&s->limits_lock);
        snprintf(cx->err, sizeof cx->err,
                 "model '%s' stream '%s' already has %u calls queued or running; "
                 "max-queued-per-stream = %u.",
                 model_id, stream[0] ? stream : "default", max, max);
        return KSM_ELIMIT;
    }
    if (u == NULL) {
        u = malloc(sizeof *u + kl + 1);
        if (u == NULL) {
            pthread_mutex_unlock(&s->limits_lock);
            return KSM_ENOMEM;
        }
        u->srv = s;
        u->n = 0;
        u->key_len = kl;
        memcpy(u->key, model_id, ml + 1);
        memcpy(u->key + ml + 1, stream, sl + 1);
        u->next = s->stream_uses;
        s->stream_uses = u;
    }
    u->n++;
    pthread_mutex_unlock(&s->limits_lock);
    rpc_defer(cx, stream_leave, u);
    return 0;
}

void rpc_limits_fini(ksm_rpc_server *s)
{
    while (s->stream_uses != NULL) {
        struct rpc_stream_use *u = s->stream_uses;
        s->stream_uses = u->next;
        free(u);
    }
}
