/*
 * Internals of training (docs/training.md) shared by train.c (the step: validation, optimizers,
 * statistics, clipping, SGD; the CNN host and seeds; the slots' blends) and train_tf.c (the
 * transformer host and its seeds, dropout).
 *
 * One step's tape is the straight-line code itself: a body enqueues the train-mode forward,
 * keeping every activation the backward reads in the step's arena, then the backward in reverse
 * order. It runs twice the first time at a shape: in measure mode to size the arena, then for
 * real. No op writes in place over a tensor the backward reads later.
 *
 * train_state.c: the optimizer state of a checkpoint (docs/training.md#durability-and-checkpoints).
 * Locking: everything here is used with the model's lock held.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/blueprint_impl.h"
#include "kasmina/exec.h"
#include "kasmina/model_impl.h"
#include "kasmina/safetensors.h"
#include "kasmina/training.h"
/* optim.h has an internal struct of the same name as training.h's public one. */
#define ksm_seed_grad_stats ksm_seed_grad_stats_internal
#include "kasmina/optim.h"
#undef ksm_seed_grad_stats

#ifdef __cplusplus
extern "C" {
#endif

/* Host parameters: the CNN's few, the transformer's 12 per layer (64 layers at most) plus the
 * embeddings and the final norm. */
#define KSM_TRAIN_MAX_HOST_P (12 * 64 + 8)
#define KSM_TRAIN_MAX_SEED_P (KSM_SEED_MAX_PARAMS + 4)

/* The optimizer of one slot's seed (its parameters, then its gate's: ksm_train_seed_params). */
struct seed_opt {
    bool live;
    const void *seed; /* the module the optimizer was made for */
    bool fossil;      /* made while FOSSILIZED (fossilizing drops the earlier one) */
    struct ksm_sgd opt;
};

struct ksm_train_state {
    struct ksm_training_config cfg;
    uint64_t step;
    bool host_live;
    struct ksm_sgd host; /* over ksm_train_host_params, in that order */
    struct seed_opt seeds[KSM_MAX_SLOTS];
    /* the arena of the last shape (reused while big enough) */
    void *arena;
    size_t arena_bytes;
    /* host-side buffers of one step */
    int64_t *labels, *argmax;
    size_t cap_rows;
};

struct ksm_train_seed_grads {
    int n;
    ksm_tensor *param[KSM_TRAIN_MAX_SEED_P];
    ksm_tensor grad[KSM_TRAIN_MAX_SEED_P];
    bool present[KSM_TRAIN_MAX_SEED_P];
};

struct ksm_train_slot_tape {
    bool runs;
    bool ste, isolate, frozen;
    ksm_tensor h, sx, y;
    /* seed internals */
    ksm_tensor c, u;       /* conv_light/small: conv output, relu output; norm: t, d */
    ksm_tensor ca;         /* clamp01(alpha) */
    ksm_tensor T, v;       /* MULTIPLY: tanh, 1 + ca*T */
    ksm_tensor gp, gh, gz; /* GATE: pooled, hidden (relu out), sigmoid out (= g) */
    ksm_tensor cg, prod, aeff;
    ksm_tensor alpha; /* the raw alpha scalar */
    ksm_tensor v2[6]; /* more seed internals (SE, depthwise, bottleneck, conv_heavy; the
                       * transformer seeds' hidden activations) */
};

struct ksm_train_block_tape {
    ksm_tensor x, z, mean, invstd, a;
};

struct ksm_train_tf_tape; /* train_tf.c */

struct ksm_train_ctx {
    ksm_model *m;
    struct ksm_exec *e;
    const ksm_tensor *x_host;
    const int64_t *labels_host;
    int64_t B;    /* batch rows */
    int64_t rows; /* loss rows: B (CNN) or B * T (transformer) */
    /* outputs of the real pass */
    float loss;
    int64_t *argmax_host; /* rows */
    uint64_t step;        /* train_step of this step (the dropout masks' key) */
    /* tape */
    struct ksm_train_block_tape blocks[64];
    ksm_tensor pool_in[64], pool_out[64];
    ksm_tensor op_in[64], op_out[64];
    struct ksm_train_slot_tape slots[KSM_MAX_SLOTS];
    ksm_tensor feat, gpool, logits, labels;
    struct ksm_train_tf_tape *tf; /* the transformer's layers (NULL for a CNN) */
    /* gradients */
    int n_host;
    int host_idx[KSM_TRAIN_MAX_HOST_P];
    ksm_tensor host_grad[KSM_TRAIN_MAX_HOST_P];
    struct ksm_train_seed_grads sg[KSM_MAX_SLOTS];
};

static inline ksm_stream *ksm_train_stream(const struct ksm_train_ctx *c) { return c->e->stream; }

/* Host parameter i's tensor (read) and its writable tensor. */
static inline const ksm_tensor *ksm_train_hp(struct ksm_train_ctx *c, int i)
{
    return ksm_params_tensor(ksm_host_params(c->m->host), i);
}

/* A new arena tensor shaped like x. */
static inline int ksm_train_like(struct ksm_train_ctx *c, ksm_tensor *t, const ksm_tensor *x)
{
    return ksm_exec_tensor(c->e, t, KSM_DTYPE_F32, x->ndim, x->shape);
}

/* The gradient tensor of host parameter p (allocated at the start of the pass), NULL if p does
 * not train. */
static inline ksm_tensor *ksm_train_host_grad(struct ksm_train_ctx *c, int p)
{
    for (int i = 0; i < c->n_host; i++)
        if (c->host_idx[i] == p) return &c->host_grad[i];
    return NULL;
}

/* The gradient of slot's seed tensor k (seed_trainable order: the seed's, then its gate's), or
 * NULL when it gets none (frozen, not run). */
static inline ksm_tensor *ksm_train_seed_grad(struct ksm_train_ctx *c, int slot, int k)
{
    struct ksm_train_seed_grads *g = &c->sg[slot];
    if (k >= g->n || !g->present[k]) return NULL;
    return &g->grad[k];
}

// ---- train.c ----

/* Validates a configuration as ConfigureTraining does (KSM_EINVAL with one sentence). */
int ksm_train_check_config(const struct ksm_training_config *c, char *err, size_t errlen);
/* torch.optim.SGD's settings as the optimizer's. */
struct ksm_sgd_config ksm_train_sgd_config(const struct ksm_sgd_settings *s);
/* The parameters the host optimizer steps (no buffer, no tied alias), in its order: their
 * indices into ps. Returns how many (at most cap). */
int ksm_train_host_params(const struct ksm_params *ps, int *idx, int cap);
/* The parameters a seed optimizer steps: the seed's (no buffer, no tied alias), then every one of
 * its gate's (gate may be NULL), in its order. Returns how many (at most cap). */
int ksm_train_seed_params(struct ksm_params *seed, struct ksm_params *gate, struct ksm_param **out,
                          int cap);
/* Whether the slot holds a seed module that trains (GERMINATED .. FOSSILIZED). */
bool ksm_train_slot_has_seed(const struct ksm_slot *s);

/* Allocates every gradient buffer of the step (the host's trainable parameters, the present seed
 * tensors) at the start of a body, before any activation. */
int ksm_train_alloc_grads(struct ksm_train_ctx *c);

/* The slot's train-mode forward (docs/blending.md#forward-of-one-slot): y from the host
 * features h (y is h itself when the seed does not run); and its backward: dh from dy (a new
 * arena tensor, or dy itself when the seed does not run). Both topologies. */
int ksm_train_slot_fwd(struct ksm_train_ctx *c, int idx, const ksm_tensor *h, ksm_tensor *y);
int ksm_train_slot_bwd(struct ksm_train_ctx *c, int idx, ksm_tensor *dy, ksm_tensor *dh);

// ---- train_tf.c ----

/* The transformer's whole step (forward, loss, backward) on the context's batch. */
int ksm_train_tf_body(struct ksm_train_ctx *c);
/* The transformer seeds: forward y (new arena tensor) from x, keeping what the backward needs in
 * the slot's tape; backward: parameter gradients and, when dx is given, the input gradient
 * (allocated here); dy is read only. */
int ksm_train_tf_seed_fwd(struct ksm_train_ctx *c, int slot, const ksm_tensor *x, ksm_tensor *y);
int ksm_train_tf_seed_bwd(struct ksm_train_ctx *c, int slot, const ksm_tensor *dy, ksm_tensor *dx);
/* Validates the transformer's targets: [B, T] ids below the vocabulary (KSM_E* + a sentence
 * naming "targets"). */
int ksm_train_tf_check_targets(ksm_model *m, const ksm_tensor *x, const ksm_tensor *t, char *err,
                               size_t errlen);

// ---- train_state.c: the optimizer state in a snapshot ----
//
// A snapshot (ksm_model_export_state of every slot) carries the model's training state:
//
//     __metadata__ kasmina.train_step   the steps applied (decimal)
//     __metadata__ kasmina.training     JSON {"train_step", "config": {...}, "host_optimizer",
//                                       "seed_optimizers": {slot: {"fossilized"}}}
//     _kasmina_optim.<parameter's state_dict name>.momentum_buffer   F32, the parameter's shape
//
// Both keys are absent for a model that never trained nor was configured. A parameter that has
// no momentum buffer yet (no gradient seen since its optimizer was made, or momentum 0) has no
// tensor: the next step creates it as torch.optim.SGD does.

#define KSM_OPTIM_PREFIX "_kasmina_optim."
#define KSM_OPTIM_SUFFIX ".momentum_buffer"

/* What a snapshot exports of the training state: n tensors whose data are host copies (in
 * bytes), enqueued on s by ksm_train_export_begin (valid once s is synchronised), and the two
 * metadata values (json NULL: no training state). */
struct ksm_train_export {
    size_t n;
    struct ksm_st_tensor *ts;
    char (*names)[192];
    void *bytes;
    char *json;
    char step[24];
};

/* Fills x (zeroed first) from m's training state and enqueues the D2H copies on s. Model lock
 * held. On failure x holds nothing to free. */
int ksm_train_export_begin(ksm_model *m, ksm_stream *s, struct ksm_train_export *x);
void ksm_train_export_free(struct ksm_train_export *x);

/* A snapshot's training state, validated and uploaded, not yet installed. */
struct ksm_train_import;

/* Validates f's training state against the modules the snapshot installs (seeds[i], gates[i] and
 * states[i] of slot i: the new modules and slot states) and uploads every momentum buffer into
 * fresh device memory on s (synchronised before it returns). Marks the tensors it consumes in
 * used (indexed as ksm_st_get). *out NULL when f has no training state. Model lock held; nothing
 * of the model changes. KSM_EFORMAT (err: one sentence naming the key) for a malformed state. */
int ksm_train_import_prepare(ksm_model *m, const ksm_st_file *f, ksm_seed *const *seeds,
                             ksm_gated_blend *const *gates, const struct ksm_slot *states,
                             bool *used, ksm_stream *s, struct ksm_train_import **out, char *err,
                             size_t errlen);
/* Replaces m's training state by imp's (imp NULL: by none, i.e. train_step 0 and the default
 * configuration), binding each seed optimizer to its slot's module as now installed. Frees imp.
 * Model lock held. */
void ksm_train_import_commit(ksm_model *m, struct ksm_train_import *imp);
/* Frees imp and its device memory (NULL is a no-op). */
void ksm_train_import_abort(ksm_model *m, struct ksm_train_import *imp);

#ifdef __cplusplus
}
#endif
