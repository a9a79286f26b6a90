/*
 * wire/convert_stats: LoadWeights results, memory and cache statistics (convert.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire/convert_impl.h"

/* ---- Weights ---- */

static int names_to_pb(char **names, size_t n, struct ksm_pb_arena *a, char ***out, size_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (n == 0) return 0;
    char **v = ANEWN(a, char *, n);
    if (v == NULL) return KSM_ENOMEM;
    for (size_t i = 0; i < n; i++) v[i] = pbstr(names[i]);
    *out = v;
    *nout = n;
    return 0;
}

int ksm_wire_load_result_to_pb(const struct ksm_load_result *r, struct ksm_pb_arena *a,
                               Kasmina__V1__LoadWeightsResponse *pb)
{
    kasmina__v1__load_weights_response__init(pb);
    KSM_TRY(names_to_pb(r->loaded, r->n_loaded, a, &pb->loaded, &pb->n_loaded));
    KSM_TRY(names_to_pb(r->missing, r->n_missing, a, &pb->missing, &pb->n_missing));
    KSM_TRY(names_to_pb(r->unexpected, r->n_unexpected, a, &pb->unexpected, &pb->n_unexpected));
    return 0;
}

static int names_from_pb(char **src, size_t n, char ***out, size_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (n == 0) return 0;
    char **v = calloc(n, sizeof *v);
    if (v == NULL) return KSM_ENOMEM;
    *out = v;
    for (size_t i = 0; i < n; i++) {
        v[i] = strdup(str_or_empty(src[i]));
        if (v[i] == NULL) return KSM_ENOMEM;
        *nout = i + 1;
    }
    return 0;
}

int ksm_wire_load_result_from_pb(const Kasmina__V1__LoadWeightsResponse *pb,
                                 struct ksm_load_result *r)
{
    memset(r, 0, sizeof *r);
    KSM_TRY(names_from_pb(pb->loaded, pb->n_loaded, &r->loaded, &r->n_loaded));
    KSM_TRY(names_from_pb(pb->missing, pb->n_missing, &r->missing, &r->n_missing));
    KSM_TRY(names_from_pb(pb->unexpected, pb->n_unexpected, &r->unexpected, &r->n_unexpected));
    return 0;
}

/* ---- Statistics ---- */

static Kasmina__V1__StatTriple *stat_to_pb(const struct ksm_stat *s, struct ksm_pb_arena *a)
{
    Kasmina__V1__StatTriple *t = ANEW(a, Kasmina__V1__StatTriple);
    if (t == NULL) return NULL;
    kasmina__v1__stat_triple__init(t);
    t->current = s->current;
    t->peak = s->peak;
    t->allocated = s->allocated;
    t->freed = s->freed;
    return t;
}

static int pool_to_pb(const struct ksm_pool_stats *p, struct ksm_pb_arena *a,
                      Kasmina__V1__PoolStats **out)
{
    Kasmina__V1__PoolStats *pb = ANEW(a, Kasmina__V1__PoolStats);
    if (pb == NULL) return KSM_ENOMEM;
    kasmina__v1__pool_stats__init(pb);
    pb->allocated_bytes = stat_to_pb(&p->allocated_bytes, a);
    pb->reserved_bytes = stat_to_pb(&p->reserved_bytes, a);
    pb->active_bytes = stat_to_pb(&p->active_bytes, a);
    pb->inactive_split_bytes = stat_to_pb(&p->inactive_split_bytes, a);
    pb->allocation = stat_to_pb(&p->allocation, a);
    pb->segment = stat_to_pb(&p->segment, a);
    pb->active = stat_to_pb(&p->active, a);
    pb->inactive_split = stat_to_pb(&p->inactive_split, a);
    if (!pb->allocated_bytes || !pb->reserved_bytes || !pb->active_bytes ||
        !pb->inactive_split_bytes || !pb->allocation || !pb->segment || !pb->active ||
        !pb->inactive_split)
        return KSM_ENOMEM;
    *out = pb;
    return 0;
}

int ksm_wire_mem_stats_to_pb(const char *device, const struct ksm_mem_stats *s,
                             const char *const *model_ids, const uint64_t *model_bytes, size_t n,
                             struct ksm_pb_arena *a, Kasmina__V1__DeviceMemoryStats *pb)
{
    kasmina__v1__device_memory_stats__init(pb);
    pb->device = pbstr(device);
    KSM_TRY(pool_to_pb(&s->pool[KSM_POOL_ALL], a, &pb->all));
    KSM_TRY(pool_to_pb(&s->pool[KSM_POOL_SMALL], a, &pb->small_pool));
    KSM_TRY(pool_to_pb(&s->pool[KSM_POOL_LARGE], a, &pb->large_pool));
    pb->num_alloc_retries = s->num_alloc_retries;
    pb->num_ooms = s->num_ooms;
    pb->num_device_alloc = s->num_device_alloc;
    pb->num_device_free = s->num_device_free;
    pb->num_sync_all_streams = s->num_sync_all_streams;
    pb->cache_hits = s->cache_hits;
    pb->deferred_frees = s->deferred_frees;
    pb->memory_cap_bytes = s->memory_cap_bytes;
    pb->total_bytes = s->total_bytes;
    if (n > 0) {
        pb->per_model_bytes = ANEWN(a, Kasmina__V1__DeviceMemoryStats__PerModelBytesEntry *, n);
        Kasmina__V1__DeviceMemoryStats__PerModelBytesEntry *e =
            ANEWN(a, Kasmina__V1__DeviceMemoryStats__PerModelBytesEntry, n);
        if (pb->per_model_bytes == NULL || e == NULL) return KSM_ENOMEM;
        for (size_t i = 0; i < n; i++) {
            kasmina__v1__device_memory_stats__per_model_bytes_entry__init(&e[i]);
            e[i].key = pbstr(model_ids[i]);
            e[i].value = model_bytes[i];
            pb->per_model_bytes[i] = &e[i];
        }
        pb->n_per_model_bytes = n;
    }
    return 0;
}

static void stat_from_pb(const Kasmina__V1__StatTriple *t, struct ksm_stat *s)
{
    if (t == NULL) return;
    s->current = t->current;
    s->peak = t->peak;
    s->allocated = t->allocated;
    s->freed = t->freed;
}

static void pool_from_pb(const Kasmina__V1__PoolStats *pb, struct ksm_pool_stats *p)
{
    if (pb == NULL) return;
    stat_from_pb(pb->allocated_bytes, &p->allocated_bytes);
    stat_from_pb(pb->reserved_bytes, &p->reserved_bytes);
    stat_from_pb(pb->active_bytes, &p->active_bytes);
    stat_from_pb(pb->inactive_split_bytes, &p->inactive_split_bytes);
    stat_from_pb(pb->allocation, &p->allocation);
    stat_from_pb(pb->segment, &p->segment);
    stat_from_pb(pb->active, &p->active);
    stat_from_pb(pb->inactive_split, &p->inactive_split);
}

void ksm_wire_mem_stats_from_pb(const Kasmina__V1__DeviceMemoryStats *pb, char *device,
                                size_t devlen, struct ksm_mem_stats *s)
{
    memset(s, 0, sizeof *s);
    if (device != NULL) copy_str(device, devlen, pb->device);
    pool_from_pb(pb->all, &s->pool[KSM_POOL_ALL]);
    pool_from_pb(pb->small_pool, &s->pool[KSM_POOL_SMALL]);
    pool_from_pb(pb->large_pool, &s->pool[KSM_POOL_LARGE]);
    s->num_alloc_retries = pb->num_alloc_retries;
    s->num_ooms = pb->num_ooms;
    s->num_device_alloc = pb->num_device_alloc;
    s->num_device_free = pb->num_device_free;
    s->num_sync_all_streams = pb->num_sync_all_streams;
    s->cache_hits = pb->cache_hits;
    s->deferred_frees = pb->deferred_frees;
    s->memory_cap_bytes = pb->memory_cap_bytes;
    s->total_bytes = pb->total_bytes;
}

int ksm_wire_cache_counters_to_pb(const char *model_id, const struct ksm_cache_counters *c,
                                  struct ksm_pb_arena *a, Kasmina__V1__CacheCounters *pb)
{
    (void)a;
    kasmina__v1__cache_counters__init(pb);
    pb->cache = (char *)c->cache;
    pb->model_id = pbstr(model_id);
    pb->slot_id = (char *)c->slot_id;
    pb->hits = c->hits;
    pb->misses = c->misses;
    pb->evictions = c->evictions;
    pb->invalidations = c->invalidations;
    pb->entries = c->entries;
    pb->capacity = c->capacity;
    pb->bytes = c->bytes;
    return 0;
}

void ksm_wire_cache_counters_from_pb(const Kasmina__V1__CacheCounters *pb, char *model_id,
                                     struct ksm_cache_counters *c)
{
    memset(c, 0, sizeof *c);
    copy_str(c->cache, sizeof c->cache, pb->cache);
    if (model_id != NULL) copy_str(model_id, KSM_ID_MAX + 1, pb->model_id);
    copy_str(c->slot_id, sizeof c->slot_id, pb->slot_id);
    c->hits = pb->hits;
    c->misses = pb->misses;
    c->evictions = pb->evictions;
    c->invalidations = pb->invalidations;
    c->entries = pb->entries;
    c->capacity = pb->capacity;
    c->bytes = pb->bytes;
}
