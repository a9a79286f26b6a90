/*
 * Internals of training shared by train.c (the step) and train_state.c (the optimizer state of a
 * checkpoint, docs/training.md#durability-and-checkpoints).
 *
 * Locking: everything here is used with the model's lock held.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/blueprint_impl.h"
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

// ---- train.c ----

/* The most parameters the host optimizer and a seed optimizer step. */
#define KSM_TRAIN_MAX_HOST_P 64
#define KSM_TRAIN_MAX_SEED_P (KSM_SEED_MAX_PARAMS + 4)

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
