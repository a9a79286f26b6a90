/*
 * Training step pieces (docs/training.md, steps 6-8): torch.optim.SGD over a fixed parameter
 * list, clip_grad_norm_, and esper's gradient statistics with the ratio EMA.
 *
 *   struct ksm_sgd o;
 *   ksm_sgd_init(&o, &cfg, alloc, n);        // n parameters, no buffer yet
 *   ksm_sgd_step(&o, s, pairs, n);           // per step: (param, grad or NULL) in the same order
 *   ksm_sgd_reset(&o, users, n_users);       // drop every momentum buffer (germinate, rollback)
 *   ksm_sgd_destroy(&o, users, n_users);
 *
 * Not thread-safe: one optimizer belongs to one model and is used under its lock.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/ops_optim.h"
#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---- SGD ----

struct ksm_sgd {
    struct ksm_sgd_config cfg;
    ksm_allocator *alloc; /* the model's; buffers come from it */
    int n;                /* parameters */
    ksm_tensor *buf;      /* [n]: momentum buffer of parameter i, data NULL until the first step
                           * that sees a gradient for it (never with momentum 0) */
};

/* One parameter of a step: grad NULL means "no gradient this step" (skipped entirely). */
struct ksm_sgd_pair {
    ksm_tensor *param;
    const ksm_tensor *grad;
};

/* An optimizer over n >= 0 parameters with cfg (ksm_sgd_config_check). Returns 0, KSM_EINVAL,
 * KSM_ENOMEM. */
int ksm_sgd_init(struct ksm_sgd *o, const struct ksm_sgd_config *cfg, ksm_allocator *a, int n);
/* One step on stream s: pairs[i] is parameter i (n == o->n). Buffers that this step creates are
 * allocated first (from o->alloc, on s); if one cannot be, those of this call are freed and
 * KSM_EDEVMEM (or the allocator's code) comes back with nothing enqueued. Then one SGD op per
 * parameter with a gradient, in order. Asynchronous: the results are there when s has run. An op
 * refused at parameter i (bad tensors) returns its code with parameters before i stepped. */
int ksm_sgd_step(struct ksm_sgd *o, ksm_stream *s, const struct ksm_sgd_pair *pairs, int n);
/* Frees every momentum buffer (the next step starts fresh, as a new torch optimizer). users: the
 * streams that may still use them (recorded first, see ksm_alloc_record_stream). */
void ksm_sgd_reset(struct ksm_sgd *o, ksm_stream *const *users, int n_users);
/* ksm_sgd_reset, then frees the table. */
void ksm_sgd_destroy(struct ksm_sgd *o, ksm_stream *const *users, int n_users);
/* Device bytes of momentum buffers held. */
size_t ksm_sgd_bytes(const struct ksm_sgd *o);

// ---- Gradient norms ----

/* The squared L2 norm of one parameter's gradient (float64) and its element count; present
 * false for a parameter without a gradient. */
struct ksm_grad_sq {
    double sumsq;
    int64_t numel;
    bool present;
};

/* out[i] for each grads[i] (NULL: not present), with one KSM_OP_SUMSQ per gradient into a
 * scratch buffer from a, one copy back and one synchronisation of s. */
int ksm_grad_sumsq(ksm_stream *s, ksm_allocator *a, const ksm_tensor *const *grads, int n,
                   struct ksm_grad_sq *out);
/* The same with the caller's scratch, allocating nothing: dev holds n doubles of device memory
 * of s's device that nothing else touches until the call returns (it synchronises s), host n
 * doubles (the training step passes a region of its kept arena: no allocation per step). */
int ksm_grad_sumsq_scratch(ksm_stream *s, double *dev, double *host, const ksm_tensor *const *grads,
                           int n, struct ksm_grad_sq *out);

/* clip_grad_norm_(max_norm) over the present gradients: total = sqrt(sum sumsq) (float64),
 * coef = min(1, max_norm / (total + 1e-6)) (NaN stays NaN, as torch.clamp), and every present
 * gradient multiplied by (float)coef, also when it is 1. sq: their squared norms (from
 * ksm_grad_sumsq, e.g. those the statistics used), or NULL to compute them here. *total (may be
 * NULL) receives the total. The scaling is enqueued on s. max_norm must be > 0 (KSM_EINVAL). */
int ksm_clip_grad_norm(ksm_stream *s, ksm_allocator *a, ksm_tensor *const *grads, int n,
                       const struct ksm_grad_sq *sq, double max_norm, double *total);

// ---- Statistics (pure functions of the squared norms) ----

/* api GradientStatistics' thresholds: vanishing 1e-7, exploding 10 by default. */
struct ksm_grad_thresholds {
    double vanishing, exploding;
};

/* The statistics of one seed (api SeedGradientStats). */
struct ksm_seed_grad_stats {
    double grad_norm;
    uint64_t param_count;
    double normalized_ratio;
    double gradient_health;
    bool has_vanishing, has_exploding;
};

/* sqrt(sum sumsq) and the element count over the present entries of sq[0..n). */
void ksm_grad_group_norm(const struct ksm_grad_sq *sq, int n, double *norm, uint64_t *count);
/* A seed's statistics from its parameters' squared norms and the host's norm and count. */
void ksm_grad_seed_stats(const struct ksm_grad_sq *sq, int n, double host_norm, uint64_t host_count,
                         const struct ksm_grad_thresholds *th, struct ksm_seed_grad_stats *out);
/* The ratio EMA fold: r when the slot has no EMA yet, else beta * ema + (1 - beta) * r. */
double ksm_grad_ema_fold(bool has_ema, double ema, double r, double beta);

#ifdef __cplusplus
}
#endif
