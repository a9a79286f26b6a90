/* Models: per-client streams, the plan and alpha caches' invalidation and their counters
 * (kasmina.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/model_impl.h"
#include "kasmina/ops.h"
#include "kasmina/text.h"

/* ---- streams, caches ---- */

void ksm_stream_ctx_unref(struct ksm_stream_ctx *ctx)
{
    if (atomic_fetch_sub(&ctx->refs, 1) != 1) return;
    ksm_stream_synchronize(ctx->stream);
    for (int i = 0; i < ctx->n_plans; i++)
        if (ctx->plans[i].arena) ksm_alloc_free(ctx->alloc, ctx->plans[i].arena);
    if (ctx->alpha_dev) ksm_alloc_free(ctx->alloc, ctx->alpha_dev);
    ksm_alloc_release_stream(ctx->alloc, ctx->stream);
    ksm_stream_free(ctx->stream);
    free(ctx);
}

int ksm_model_stream(ksm_model *m, const char *key, struct ksm_stream_ctx **out)
{
    return ksm_model_stream_ctx_new(m, key, NULL, out);
}

/* Finds the stream of key, or creates it (on adopt when given, else a new stream). */
int ksm_model_stream_ctx_new(ksm_model *m, const char *key, ksm_stream *adopt,
                             struct ksm_stream_ctx **out)
{
    if (key == NULL) key = "";
    for (int i = 0; i < m->n_streams; i++) {
        if (strcmp(m->streams[i]->key, key) == 0) {
            *out = m->streams[i];
            return 0;
        }
    }
    if (strlen(key) > KSM_STREAM_KEY_MAX) return KSM_EINVAL;
    if (m->n_streams == KSM_MAX_STREAMS_PER_MODEL) return KSM_ELIMIT;
    struct ksm_stream_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) return KSM_ENOMEM;
    snprintf(ctx->key, sizeof ctx->key, "%s", key);
    atomic_init(&ctx->refs, 1);
    ctx->alloc = m->alloc;
    int rc = 0;
    if (adopt)
        ctx->stream = adopt;
    else
        rc = ksm_stream_new(m->dev, &ctx->stream);
    if (rc < 0) {
        free(ctx);
        return rc;
    }
    void *p;
    rc = ksm_alloc_malloc(m->alloc, KSM_MAX_SLOTS * sizeof(float), ctx->stream, &p);
    if (rc < 0) {
        if (!adopt) ksm_stream_free(ctx->stream);
        free(ctx);
        return rc;
    }
    ctx->alpha_dev = p;
    m->streams[m->n_streams++] = ctx;
    *out = ctx;
    return 0;
}

void ksm_model_invalidate_caches(ksm_model *m)
{
    for (int i = 0; i < m->n_streams; i++) {
        struct ksm_stream_ctx *ctx = m->streams[i];
        m->plan_stat.invalidations += (uint64_t)ctx->n_plans;
        for (int s = 0; s < m->n_slots; s++)
            if (ctx->alpha_gen[s] != 0) m->slots[s].alpha_stat.invalidations++;
        ksm_stream_ctx_unref(ctx);
    }
    m->n_streams = 0;
    for (int s = 0; s < m->n_slots; s++) {
        struct ksm_model_slot *ms = &m->slots[s];
        ksm_model_drop_probe(m, ms);
        if (ms->s.seed) ksm_seed_invalidate_caches(ms->s.seed);
    }
}

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}

void ksm_model_touch(ksm_model *m)
{
    uint64_t h = 0x6b736d;
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_slot *s = &m->slots[i].s;
        h = mix(h, (uint64_t)(uintptr_t)s->seed);
        h = mix(h, (uint64_t)(uintptr_t)s->gate);
        h = mix(h, ksm_slot_runs_seed(s));
        h = mix(h, s->occupied ? (uint64_t)s->state.alpha_algorithm : 0);
    }
    if (h != m->topo_sig) {
        m->topo_sig = h;
        m->topo_gen++;
    }
}

/* ---- statistics ---- */

static void put_counter(struct ksm_cache_counters *out, size_t cap, size_t *k, const char *cache,
                        const char *slot, const struct ksm_cache_stat *st, uint64_t entries,
                        uint64_t capacity, uint64_t bytes)
{
    if (out && *k < cap) {
        struct ksm_cache_counters *c = &out[*k];
        memset(c, 0, sizeof *c);
        snprintf(c->cache, sizeof c->cache, "%s", cache);
        snprintf(c->slot_id, sizeof c->slot_id, "%s", slot);
        c->hits = st->hits;
        c->misses = st->misses;
        c->evictions = st->evictions;
        c->invalidations = st->invalidations;
        c->recompiles = st->recompiles;
        c->entries = entries;
        c->capacity = capacity;
        c->bytes = bytes;
    }
    (*k)++;
}

int ksm_model_cache_stats(ksm_model *m, struct ksm_cache_counters *out, size_t cap, size_t *n)
{
    pthread_mutex_lock(&m->lock);
    size_t k = 0;
    uint64_t plans = 0, plan_bytes = 0;
    for (int i = 0; i < m->n_streams; i++) {
        plans += (uint64_t)m->streams[i]->n_plans;
        for (int p = 0; p < m->streams[i]->n_plans; p++)
            plan_bytes += m->streams[i]->plans[p].arena_bytes;
    }
    put_counter(out, cap, &k, "plan", "", &m->plan_stat, plans,
                (uint64_t)KSM_PLAN_CAPACITY * (uint64_t)(m->n_streams ? m->n_streams : 1),
                plan_bytes);
    for (int i = 0; i < m->n_slots; i++) {
        struct ksm_model_slot *ms = &m->slots[i];
        uint64_t entries = 0;
        for (int s = 0; s < m->n_streams; s++) entries += m->streams[s]->alpha_gen[i] != 0;
        put_counter(out, cap, &k, "alpha_scalar", ms->s.id, &ms->alpha_stat, entries, 0,
                    entries * sizeof(float));
        put_counter(out, cap, &k, "shape_probe", ms->s.id, &ms->probe_stat, ms->probe != NULL, 1,
                    ms->probe_bytes);
        struct ksm_lru_stats ls;
        if (ms->s.seed && ksm_seed_block_mask_stats(ms->s.seed, &ls)) {
            struct ksm_cache_stat st = {.hits = ls.hits,
                                        .misses = ls.misses,
                                        .evictions = ls.evictions,
                                        .invalidations = ls.invalidations};
            put_counter(out, cap, &k, "block_mask", ms->s.id, &st, ls.entries, ls.capacity,
                        ls.bytes);
        }
    }
    if (n) *n = k;
    pthread_mutex_unlock(&m->lock);
    return 0;
}
