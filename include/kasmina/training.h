/*
 * kasmina/training: training a model in the engine, with esper-lite's semantics
 * (docs/training.md): a train-mode forward (BatchNorm batch statistics, dropout), mean
 * cross-entropy, backward with esper's gradient isolation and straight-through estimator,
 * clipping of the host and of each seed separately, and torch.optim.SGD steps for the host and
 * one optimizer per live seed.
 *
 *     struct ksm_training_config c;
 *     ksm_training_config_defaults(&c);             // esper's defaults
 *     ksm_model_configure_training(m, &c, false, err, sizeof err);
 *     struct ksm_train_args a = {.input = &x, .targets = &y, .collect_gradients = -1};
 *     struct ksm_train_result r;
 *     ksm_model_train_step(m, &a, &r, err, sizeof err);   // r.loss, r.correct, r.total
 *
 * Every function validates everything before it changes anything: a refused call leaves the
 * weights, buffers, momentum, train_step and generation as they were.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/kasmina.h"

#ifdef __cplusplus
extern "C" {
#endif

/* torch.optim.SGD's hyper-parameters. */
struct ksm_sgd_settings {
    double lr, momentum, weight_decay, dampening;
    bool nesterov;
};

struct ksm_training_config {
    struct ksm_sgd_settings host; /* the host's parameters (no seed, no gate); tied weight once */
    struct ksm_sgd_settings seed; /* one optimizer per live seed (its gate included) */
    double max_grad_norm;         /* clip_grad_norm_ of the host and of each seed; 0 = none */
    uint32_t gradient_telemetry_stride; /* statistics when train_step % stride == 0; 0 = never */
    double gradient_ratio_ema;          /* beta of the ratio EMA folded by RecordMetrics */
    double vanishing_threshold, exploding_threshold;
};

/* esper's defaults: host lr 0.01, momentum 0.9, weight decay 5e-4; seeds lr 0.01, momentum
 * 0.9, weight decay 0; dampening 0, no nesterov; max_grad_norm 1.0; stride 10; EMA 0.9;
 * thresholds 1e-7 and 10. */
void ksm_training_config_defaults(struct ksm_training_config *c);

/* Replaces the model's training configuration (validated whole first: finite, lr >= 0,
 * momentum and dampening in [0, 1], weight decay >= 0, nesterov only with momentum > 0 and
 * dampening 0, as torch). reset_optimizer_state drops every momentum buffer. */
int ksm_model_configure_training(ksm_model *m, const struct ksm_training_config *c,
                                 bool reset_optimizer_state, char *err, size_t errlen);
/* A partial update (ConfigureTraining with some fields): merge fills next, a copy of the
 * configuration in force, and returns 0 or a negative code (with a sentence in err) that refuses
 * the call. It runs under the model's lock, so updates of different fields from concurrent
 * callers never undo each other; it must not call back into the model. next is then validated and
 * applied as by ksm_model_configure_training. out and train_step (may be NULL) receive the
 * configuration and the step count as this call left them. */
typedef int (*ksm_training_merge_fn)(void *ud, const struct ksm_training_config *in_force,
                                     struct ksm_training_config *next, char *err, size_t errlen);
int ksm_model_update_training(ksm_model *m, ksm_training_merge_fn merge, void *ud,
                              bool reset_optimizer_state, struct ksm_training_config *out,
                              uint64_t *train_step, char *err, size_t errlen);
/* The configuration in force and the number of steps applied. */
int ksm_model_training_config(ksm_model *m, struct ksm_training_config *out, uint64_t *train_step);

struct ksm_train_args {
    const ksm_tensor *input;   /* host memory: as ksm_forward_args.input */
    const ksm_tensor *targets; /* I64: CNN [B] class ids; transformer [B, T] token ids */
    const char *stream;        /* NULL/"" = the default stream */
    const char *const *slots;  /* the slots whose seeds train; n_slots 0 = every slot */
    int n_slots;
    int collect_gradients; /* -1: the stride decides; 0: no; 1: yes */
};

struct ksm_seed_grad_stats {
    char slot_id[KSM_SLOT_ID_MAX];
    double grad_norm;        /* L2 over the seed's (and gate's) gradients, before clipping */
    uint64_t param_count;    /* elements that have a gradient */
    double normalized_ratio; /* (grad_norm/sqrt(count)) / (host_norm/sqrt(host_count) + 1e-8) */
    double gradient_health;  /* 1 - 0.5 vanishing share - 0.8 exploding share, clamped */
    bool has_vanishing, has_exploding;
};

struct ksm_train_result {
    double loss;             /* mean cross-entropy of the batch, before the step */
    uint64_t correct, total; /* argmax == target (tokens for the transformer) */
    uint64_t train_step;     /* after this step */
    bool gradients_collected;
    double host_grad_norm; /* when collected; before clipping */
    uint64_t host_param_count;
    int n_seeds; /* when collected: seeds in TRAINING or BLENDING */
    struct ksm_seed_grad_stats seeds[KSM_MAX_SLOTS];
    int n_stepped; /* slots whose seed optimizer stepped */
    char stepped[KSM_MAX_SLOTS][KSM_SLOT_ID_MAX];
    uint64_t model_generation;
    uint64_t compute_ns;
};

/* Device bytes of momentum buffers held by the host optimizer (slot_id NULL) or by the seed
 * optimizer of slot_id (0 when that slot has none: never stepped, or dropped on germinate,
 * fossilize, prune or empty). KSM_ENOSLOT for an unknown slot. */
int ksm_model_training_momentum_bytes(ksm_model *m, const char *slot_id, size_t *bytes);

/* One optimisation step on one batch (esper's process_train_batch). */
int ksm_model_train_step(ksm_model *m, const struct ksm_train_args *a, struct ksm_train_result *r,
                         char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
