/*
 * Internals of ksm_engine and ksm_model (engine.c, model.c, forward.c, weights.c).
 *
 * Locking: engine->lock guards the registry; model->lock guards everything in a model (slots,
 * modules, streams, plans, caches). Compute holds model->lock only while it enqueues.
 */
#pragma once

#include <pthread.h>
#include <stdatomic.h>

#include "kasmina/alloc.h"
#include "kasmina/blueprint.h"
#include "kasmina/host.h"
#include "kasmina/kasmina.h"
#include "kasmina/params.h"
#include "kasmina/slot.h"

#define KSM_MAX_STREAMS_PER_MODEL 64
#define KSM_PLAN_CAPACITY         8
#define KSM_STREAM_KEY_MAX        64

struct ksm_engine {
    ksm_backend *cpu, *cuda;
    int n_devices;
    ksm_device *devices[64];
    ksm_allocator *allocators[64];
    ksm_device *default_device;
    uint32_t max_models;
    uint32_t max_seeds_per_model; /* 0 = no limit */

    pthread_mutex_t lock; /* registry */
    ksm_model **models;
    size_t n_models, cap_models;
    uint64_t next_model_number;

    ksm_lifecycle_cb event_cb;
    void *event_ud;

    atomic_bool failed; /* a device reported an asynchronous error */
    char failed_why[256];
};

/* An execution plan: the arena of every temporary of one forward shape (exec.h). */
struct ksm_plan {
    uint64_t topo_gen;
    int kind; /* 0 forward, 1 fused, 2 evaluate */
    uint64_t override_mask;
    int ndim;
    int64_t shape[KSM_MAX_DIMS];
    int64_t aux; /* evaluate: K */
    void *arena;
    size_t arena_bytes;
    uint64_t last_used;
};

struct ksm_cache_stat {
    uint64_t hits, misses, evictions, invalidations, recompiles;
};

/* One persistent stream of a model, chosen by a client key (esper: one stream per env). */
struct ksm_stream_ctx {
    char key[KSM_STREAM_KEY_MAX + 1];
    atomic_int refs;      /* the model's + one per compute call syncing it */
    ksm_allocator *alloc; /* of the stream's device */
    ksm_stream *stream;
    struct ksm_plan plans[KSM_PLAN_CAPACITY];
    int n_plans;
    uint64_t plan_clock;
    /* persistent device alpha scalars, one per slot (a block of KSM_MAX_SLOTS floats) */
    float *alpha_dev;
    uint64_t alpha_gen[KSM_MAX_SLOTS]; /* generation materialised on this stream; 0 = none */
};

/* Per-slot module state the model owns (struct ksm_slot holds the lifecycle). */
struct ksm_model_slot {
    struct ksm_slot s; /* s.seed is a ksm_seed *, s.gate a ksm_gated_blend * */
    const struct ksm_injection *inj;
    uint64_t alpha_gen; /* bumped on every alpha change (never 0) */
    struct ksm_cache_stat alpha_stat;
    /* germination shape probe (esper _shape_probe_cache), keyed by (topology, channels) */
    void *probe;
    size_t probe_bytes;
    struct ksm_cache_stat probe_stat;
};

struct ksm_model {
    ksm_engine *engine;
    atomic_int refs;
    bool deleted;
    char id[KSM_ID_MAX + 1];
    pthread_mutex_t lock;

    struct ksm_model_spec spec; /* resolved; slots pointer not kept */
    ksm_host *host;
    ksm_device *dev;
    ksm_allocator *alloc;
    enum ksm_dtype dtype;

    int n_slots;                                /* registered */
    struct ksm_model_slot slots[KSM_MAX_SLOTS]; /* row-major */
    int exec_order[KSM_MAX_SLOTS];              /* indices into slots[], execution order */
    struct ksm_slot_env env;

    uint64_t generation; /* every successful mutation */
    uint64_t topo_gen;   /* changes of what a forward computes (not alpha) */
    uint64_t topo_sig;

    struct ksm_stream_ctx *streams[KSM_MAX_STREAMS_PER_MODEL];
    int n_streams;
    struct ksm_cache_stat plan_stat;

    struct ksm_train_state *train; /* train.c; NULL until configured or first stepped */
    uint64_t checkpoint_step;      /* train_step of the snapshot last restored or written */
};

/* train.c: the steps applied (0 before any), with the model's lock held. */
uint64_t ksm_model_train_step_locked(const ksm_model *m);
/* The training config's gradient_ratio_ema (esper's 0.9 before any configuration). */
double ksm_model_grad_ratio_ema_beta_locked(const ksm_model *m);
/* train.c: drops slot's seed optimizer (momentum included); frees the training state. */
void ksm_train_drop_seed(ksm_model *m, int slot);
void ksm_train_state_free(ksm_model *m);
/* model_move.c: the momentum buffers that hold memory (every optimizer's; out NULL counts them),
 * which a move replaces by copies on the new device. Then ksm_train_state_moved frees the step
 * arena (from m->alloc, still the old device's) and makes the optimizers allocate from dalloc. */
int ksm_train_momentum_buffers(ksm_model *m, ksm_tensor **out, int cap);
void ksm_train_state_moved(ksm_model *m, ksm_allocator *dalloc);

/* model.c */
int ksm_model_new_internal(ksm_engine *e, const char *id, const struct ksm_model_spec *spec,
                           ksm_model **out, char *err, size_t errlen);
void ksm_model_destroy(ksm_model *m);
struct ksm_model_slot *ksm_model_find_slot(ksm_model *m, const char *slot_id);
/* Streams that may read the model's memory (for ksm_params_release). */
int ksm_model_users(ksm_model *m, ksm_stream **users, int cap);
/* Releases a seed's / gate's memory and frees the module. */
void ksm_model_free_seed(ksm_model *m, struct ksm_model_slot *ms);
void ksm_model_free_gate(ksm_model *m, struct ksm_model_slot *ms);
/* Frees a slot's shape probe (a blend-path cache), counting an invalidation. */
void ksm_model_drop_probe(ksm_model *m, struct ksm_model_slot *ms);
/* Releases a parameter set's device memory (after the model's streams are done with it). */
void ksm_model_release_params(ksm_model *m, struct ksm_params *ps);
/* The stream context of key, found or created (on adopt when given, else on a new stream). */
int ksm_model_stream_ctx_new(ksm_model *m, const char *key, ksm_stream *adopt,
                             struct ksm_stream_ctx **out);
/* Recomputes the topology signature after a mutation; bumps topo_gen when it changed. */
void ksm_model_touch(ksm_model *m);
/* Drops every plan, alpha scalar and probe (move, load). Synchronises the streams. */
void ksm_model_invalidate_caches(ksm_model *m);
/* Drops a reference; the last one synchronises the stream and frees its plans. */
void ksm_stream_ctx_unref(struct ksm_stream_ctx *ctx);
/* The model's stream of key ("" = default), created on demand. */
int ksm_model_stream(ksm_model *m, const char *key, struct ksm_stream_ctx **out);
int64_t ksm_now_ns(void);
