/*
 * Training (docs/training.md): esper-lite's process_train_batch on a host with seeds. This file
 * has the step (validation, optimizers, statistics, clipping, SGD), the CNN host and its seeds,
 * and the slots' blends for both topologies; train_tf.c the transformer host and its seeds.
 *
 * One step runs a train-mode forward that keeps every activation the backward needs in a bump
 * arena (the tape is the straight-line code itself: the body enqueues the forward, then the
 * backward in reverse order, reading the saved tensors), so it runs twice the first time like
 * a forward plan: once in measure mode to size the arena, which the training state keeps, then
 * for real. No op writes in place over a tensor the backward reads later (train_impl.h).
 *
 * Not implemented yet (refused up front with KSM_EUNSUPPORTED): devices other than host memory.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/training.h"

#include "kasmina/blueprint_impl.h"
#include "kasmina/errors.h"
#include "kasmina/exec.h"
#include "kasmina/model_impl.h"
#include "kasmina/ops.h"
#include "kasmina/ops_backward.h"
#include "kasmina/ops_backward_nn.h"
#include "kasmina/train_impl.h" /* the training state, optim.h */

#define BN_EPS         1e-5f
#define BN_MOMENTUM    0.1
#define MAX_HOST_P     KSM_TRAIN_MAX_HOST_P
#define MAX_SEED_P     KSM_TRAIN_MAX_SEED_P
#define MAX_TRAIN_ROWS (1 << 20)
/* doubles of gradient-norm scratch after the tape in the arena (one ksm_grad_sumsq at a time) */
#define SQ_SCRATCH (MAX_HOST_P > MAX_SEED_P ? MAX_HOST_P : MAX_SEED_P)

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- configuration ---- */

void ksm_training_config_defaults(struct ksm_training_config *c)
{
    memset(c, 0, sizeof *c);
    c->host = (struct ksm_sgd_settings){.lr = 0.01, .momentum = 0.9, .weight_decay = 5e-4};
    c->seed = (struct ksm_sgd_settings){.lr = 0.01, .momentum = 0.9, .weight_decay = 0.0};
    c->max_grad_norm = 1.0;
    c->gradient_telemetry_stride = 10;
    c->gradient_ratio_ema = 0.9;
    c->vanishing_threshold = 1e-7;
    c->exploding_threshold = 10.0;
}

static struct ksm_sgd_config sgd_cfg(const struct ksm_sgd_settings *s)
{
    return (struct ksm_sgd_config){.lr = s->lr,
                                   .momentum = s->momentum,
                                   .dampening = s->dampening,
                                   .weight_decay = s->weight_decay,
                                   .nesterov = s->nesterov};
}

static int check_sgd(const struct ksm_sgd_settings *s, const char *which, char *err, size_t errlen)
{
    if (!isfinite(s->lr) || !isfinite(s->momentum) || !isfinite(s->weight_decay) ||
        !isfinite(s->dampening))
        return ksm_errf(err, errlen, KSM_EINVAL, "%s SGD settings must be finite", which);
    if (s->lr < 0)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s learning rate is %g; it must be >= 0", which,
                        s->lr);
    if (s->momentum < 0 || s->momentum > 1)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s momentum is %g; it must be in [0, 1]", which,
                        s->momentum);
    if (s->dampening < 0 || s->dampening > 1)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s dampening is %g; it must be in [0, 1]", which,
                        s->dampening);
    if (s->weight_decay < 0)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s weight decay is %g; it must be >= 0", which,
                        s->weight_decay);
    if (s->nesterov && (s->momentum <= 0 || s->dampening != 0))
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "%s nesterov needs a momentum above 0 and zero dampening", which);
    struct ksm_sgd_config c = sgd_cfg(s);
    if (ksm_sgd_config_check(&c) < 0)
        return ksm_errf(err, errlen, KSM_EINVAL, "%s SGD settings are invalid", which);
    return 0;
}

static int check_config(const struct ksm_training_config *c, char *err, size_t errlen)
{
    if (c == NULL) return ksm_errf(err, errlen, KSM_EINVAL, "the training configuration is NULL");
    KSM_TRY(check_sgd(&c->host, "host", err, errlen));
    KSM_TRY(check_sgd(&c->seed, "seed", err, errlen));
    if (!isfinite(c->max_grad_norm) || c->max_grad_norm < 0)
        return ksm_errf(err, errlen, KSM_EINVAL, "max_grad_norm is %g; it must be finite and >= 0",
                        c->max_grad_norm);
    if (!(c->gradient_ratio_ema >= 0 && c->gradient_ratio_ema <= 1))
        return ksm_errf(err, errlen, KSM_EINVAL, "gradient_ratio_ema is %g; it must be in [0, 1]",
                        c->gradient_ratio_ema);
    if (!isfinite(c->vanishing_threshold) || !isfinite(c->exploding_threshold) ||
        c->vanishing_threshold < 0 || c->exploding_threshold < 0)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "the gradient thresholds must be finite and >= 0 (vanishing %g, exploding "
                        "%g)",
                        c->vanishing_threshold, c->exploding_threshold);
    return 0;
}

static struct ksm_train_state *train_state(ksm_model *m)
{
    if (m->train == NULL) {
        m->train = calloc(1, sizeof *m->train);
        if (m->train) ksm_training_config_defaults(&m->train->cfg);
    }
    return m->train;
}

struct ksm_sgd_config ksm_train_sgd_config(const struct ksm_sgd_settings *s) { return sgd_cfg(s); }

int ksm_train_check_config(const struct ksm_training_config *c, char *err, size_t errlen)
{
    return check_config(c, err, errlen);
}

static void drop_opt(ksm_model *m, struct ksm_sgd *o)
{
    ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
    int n = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
    ksm_sgd_destroy(o, users, n);
}

static void reset_opt(ksm_model *m, struct ksm_sgd *o)
{
    ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
    int n = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
    ksm_sgd_reset(o, users, n);
}

void ksm_train_drop_seed(ksm_model *m, int slot)
{
    struct ksm_train_state *t = m->train;
    if (t == NULL || slot < 0 || slot >= KSM_MAX_SLOTS || !t->seeds[slot].live) return;
    drop_opt(m, &t->seeds[slot].opt);
    memset(&t->seeds[slot], 0, sizeof t->seeds[slot]);
}

void ksm_train_state_free(ksm_model *m)
{
    struct ksm_train_state *t = m->train;
    if (t == NULL) return;
    for (int i = 0; i < KSM_MAX_SLOTS; i++) ksm_train_drop_seed(m, i);
    if (t->host_live) drop_opt(m, &t->host);
    if (t->arena) ksm_alloc_free(m->alloc, t->arena);
    free(t->labels);
    free(t->argmax);
    free(t);
    m->train = NULL;
}

static int opt_buffers(struct ksm_sgd *o, ksm_tensor **out, int cap, int n)
{
    for (int i = 0; i < o->n; i++) {
        if (o->buf[i].data == NULL) continue;
        if (out && n < cap) out[n] = &o->buf[i];
        n++;
    }
    return n;
}

int ksm_train_momentum_buffers(ksm_model *m, ksm_tensor **out, int cap)
{
    struct ksm_train_state *t = m->train;
    if (t == NULL) return 0;
    int n = t->host_live ? opt_buffers(&t->host, out, cap, 0) : 0;
    for (int i = 0; i < KSM_MAX_SLOTS; i++)
        if (t->seeds[i].live) n = opt_buffers(&t->seeds[i].opt, out, cap, n);
    return n;
}

void ksm_train_state_moved(ksm_model *m, ksm_allocator *dalloc)
{
    struct ksm_train_state *t = m->train;
    if (t == NULL) return;
    if (t->arena) ksm_alloc_free(m->alloc, t->arena); /* made again by the next step */
    t->arena = NULL;
    t->arena_bytes = 0;
    if (t->host_live) t->host.alloc = dalloc;
    for (int i = 0; i < KSM_MAX_SLOTS; i++)
        if (t->seeds[i].live) t->seeds[i].opt.alloc = dalloc;
}

int ksm_model_update_training(ksm_model *m, ksm_training_merge_fn merge, void *ud,
                              bool reset_optimizer_state, struct ksm_training_config *out,
                              uint64_t *train_step, char *err, size_t errlen)
{
    if (m == NULL || merge == NULL)
        return ksm_errf(err, errlen, KSM_EINVAL, "model and merge function are required");
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    if (m->deleted) {
        rc = ksm_errf(err, errlen, KSM_ENOMODEL, "model \"%s\" was deleted", m->id);
        goto out;
    }
    /* read, merge and write under one hold of the lock: concurrent updates of different fields
     * all stay */
    struct ksm_training_config cur, c;
    if (m->train)
        cur = m->train->cfg;
    else
        ksm_training_config_defaults(&cur);
    c = cur;
    if ((rc = merge(ud, &cur, &c, err, errlen)) < 0 || (rc = check_config(&c, err, errlen)) < 0)
        goto out;
    struct ksm_train_state *t = train_state(m);
    if (t == NULL) {
        rc = ksm_errf(err, errlen, KSM_ENOMEM, "out of host memory");
        goto out;
    }
    struct ksm_sgd_config hc = sgd_cfg(&c.host), sc = sgd_cfg(&c.seed);
    /* A buffer cannot outlive momentum 0 (ksm_op_sgd takes none then). */
    if (t->host_live) {
        if (reset_optimizer_state || hc.momentum == 0) reset_opt(m, &t->host);
        t->host.cfg = hc;
    }
    for (int i = 0; i < KSM_MAX_SLOTS; i++) {
        if (!t->seeds[i].live) continue;
        if (reset_optimizer_state || sc.momentum == 0) reset_opt(m, &t->seeds[i].opt);
        t->seeds[i].opt.cfg = sc;
    }
    t->cfg = c;
    m->generation++;
    if (out) *out = t->cfg;
    if (train_step) *train_step = t->step;
out:
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static int replace_config(void *ud, const struct ksm_training_config *in_force,
                          struct ksm_training_config *next, char *err, size_t errlen)
{
    (void)in_force, (void)err, (void)errlen;
    *next = *(const struct ksm_training_config *)ud;
    return 0;
}

int ksm_model_configure_training(ksm_model *m, const struct ksm_training_config *c,
                                 bool reset_optimizer_state, char *err, size_t errlen)
{
    if (m == NULL) return ksm_errf(err, errlen, KSM_EINVAL, "model is NULL");
    KSM_TRY(check_config(c, err, errlen));
    return ksm_model_update_training(m, replace_config, (void *)c, reset_optimizer_state, NULL,
                                     NULL, err, errlen);
}

uint64_t ksm_model_train_step_locked(const ksm_model *m) { return m->train ? m->train->step : 0; }

double ksm_model_grad_ratio_ema_beta_locked(const ksm_model *m)
{
    return m->train ? m->train->cfg.gradient_ratio_ema : 0.9;
}

int ksm_model_training_config(ksm_model *m, struct ksm_training_config *out, uint64_t *train_step)
{
    if (m == NULL) return KSM_EINVAL;
    pthread_mutex_lock(&m->lock);
    if (m->train) {
        if (out) *out = m->train->cfg;
        if (train_step) *train_step = m->train->step;
    } else {
        if (out) ksm_training_config_defaults(out);
        if (train_step) *train_step = 0;
    }
    pthread_mutex_unlock(&m->lock);
    return 0;
}

int ksm_model_training_momentum_bytes(ksm_model *m, const char *slot_id, size_t *bytes)
{
    if (m == NULL || bytes == NULL) return KSM_EINVAL;
    *bytes = 0;
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    struct ksm_train_state *t = m->train;
    if (slot_id == NULL) {
        if (t && t->host_live) *bytes = ksm_sgd_bytes(&t->host);
    } else {
        struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
        if (ms == NULL)
            rc = KSM_ENOSLOT;
        else if (t && t->seeds[ms - m->slots].live)
            *bytes = ksm_sgd_bytes(&t->seeds[ms - m->slots].opt);
    }
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* ---- parameter lists ---- */

/* Host trainable parameters (no buffer, no tied alias), in declaration order. */
int ksm_train_host_params(const struct ksm_params *ps, int *idx, int cap)
{
    int n = 0;
    for (int i = 0; i < ps->n && n < cap; i++)
        if (!ps->p[i].buffer && ps->p[i].tied_to < 0) idx[n++] = i;
    return n;
}

static int host_trainable(ksm_model *m, int *idx)
{
    return ksm_train_host_params(ksm_host_params(m->host), idx, MAX_HOST_P);
}

/* A seed's trainable parameters: the seed's, then its gate's (SeedSlot.get_parameters). */
int ksm_train_seed_params(struct ksm_params *ps, struct ksm_params *g, struct ksm_param **out,
                          int cap)
{
    int n = 0;
    for (int i = 0; i < ps->n && n < cap; i++)
        if (!ps->p[i].buffer && ps->p[i].tied_to < 0) out[n++] = &ps->p[i];
    for (int i = 0; g != NULL && i < g->n && n < cap; i++) out[n++] = &g->p[i];
    return n;
}

static int seed_trainable(struct ksm_model_slot *ms, ksm_tensor **out)
{
    struct ksm_param *ps[MAX_SEED_P];
    int n = ksm_train_seed_params(ksm_seed_params(ms->s.seed),
                                  ms->s.gate ? ksm_gated_blend_params(ms->s.gate) : NULL, ps,
                                  MAX_SEED_P);
    for (int i = 0; i < n; i++) out[i] = &ps[i]->t;
    return n;
}

static bool has_seed_module(const struct ksm_slot *s)
{
    if (!s->occupied || s->seed == NULL) return false;
    switch (s->state.stage) {
    case KSM_STAGE_GERMINATED:
    case KSM_STAGE_TRAINING:
    case KSM_STAGE_BLENDING:
    case KSM_STAGE_HOLDING:
    case KSM_STAGE_FOSSILIZED: return true;
    default: return false;
    }
}

bool ksm_train_slot_has_seed(const struct ksm_slot *s) { return has_seed_module(s); }

static bool bp_trains(const struct ksm_seed *sd)
{
    switch (sd->bp->index) {
    case KSM_BP_NOOP:
    case KSM_BP_NORM:
    case KSM_BP_CONV_SMALL:
    case KSM_BP_CONV_LIGHT:
    case KSM_BP_ATTENTION:
    case KSM_BP_DEPTHWISE:
    case KSM_BP_BOTTLENECK:
    case KSM_BP_CONV_HEAVY:
    case KSM_BP_LORA:
    case KSM_BP_LORA_LARGE:
    case KSM_BP_MLP_SMALL:
    case KSM_BP_MLP:
    case KSM_BP_FLEX_ATTENTION: return true;
    default: return false;
    }
}

/* ---- the step's tape (train_impl.h) ---- */

#define S(c) ((c)->e->stream)

static const ksm_tensor *HP(struct ksm_train_ctx *c, int i)
{
    return ksm_params_tensor(ksm_host_params(c->m->host), i);
}

static ksm_tensor *HPW(struct ksm_train_ctx *c, int i)
{
    return &ksm_host_params(c->m->host)->p[i].t;
}

static int conv_fwd_g(struct ksm_train_ctx *c, ksm_tensor *y, const ksm_tensor *x,
                      const ksm_tensor *w, int pad, int groups)
{
    struct ksm_exec *e = c->e;
    size_t ws_bytes = ksm_op_conv2d_workspace_size(x, w, pad, pad, groups);
    size_t mk = ksm_exec_mark(e);
    void *ws;
    KSM_TRY(ksm_exec_scratch(e, ws_bytes, &ws));
    KSM_EXEC(e, ksm_op_conv2d(e->stream, y, x, w, NULL, pad, pad, groups, ws, ws_bytes));
    ksm_exec_release(e, mk);
    return 0;
}

static int conv_bwd_g(struct ksm_train_ctx *c, ksm_tensor *dx, ksm_tensor *dw, const ksm_tensor *dy,
                      const ksm_tensor *x, const ksm_tensor *w, int pad, int groups)
{
    struct ksm_exec *e = c->e;
    if (dx == NULL && dw == NULL) return 0;
    size_t ws_bytes = ksm_op_conv2d_backward_workspace_size(x, w, pad, pad, groups);
    size_t mk = ksm_exec_mark(e);
    void *ws;
    KSM_TRY(ksm_exec_scratch(e, ws_bytes, &ws));
    KSM_EXEC(e, ksm_op_conv2d_backward(e->stream, dx, dw, NULL, dy, x, w, pad, pad, groups, ws,
                                       ws_bytes));
    ksm_exec_release(e, mk);
    return 0;
}

static int conv_fwd(struct ksm_train_ctx *c, ksm_tensor *y, const ksm_tensor *x,
                    const ksm_tensor *w, int pad)
{
    return conv_fwd_g(c, y, x, w, pad, 1);
}

static int conv_bwd(struct ksm_train_ctx *c, ksm_tensor *dx, ksm_tensor *dw, const ksm_tensor *dy,
                    const ksm_tensor *x, const ksm_tensor *w, int pad)
{
    return conv_bwd_g(c, dx, dw, dy, x, w, pad, 1);
}

/* A new [B,co,H,W] arena tensor (x's batch and spatial size). */
static int act_like(struct ksm_train_ctx *c, ksm_tensor *t, const ksm_tensor *x, int64_t co)
{
    int64_t shape[4] = {x->shape[0], co, x->shape[2], x->shape[3]};
    return ksm_exec_tensor(c->e, t, KSM_DTYPE_F32, 4, shape);
}

/* ---- host ops ---- */

static int block_fwd(struct ksm_train_ctx *c, int i, const ksm_tensor *x, ksm_tensor *y)
{
    struct ksm_cnn_block_layout L;
    ksm_host_cnn_block_layout(c->m->host, i, &L);
    struct ksm_train_block_tape *bt = &c->blocks[i];
    const ksm_tensor *w = HP(c, L.conv_w);
    int64_t shape[4] = {x->shape[0], w->shape[0], x->shape[2], x->shape[3]};
    int64_t ch = w->shape[0];
    bt->x = *x;
    KSM_TRY(ksm_exec_tensor(c->e, &bt->z, KSM_DTYPE_F32, 4, shape));
    KSM_TRY(ksm_exec_tensor(c->e, &bt->a, KSM_DTYPE_F32, 4, shape));
    KSM_TRY(ksm_exec_tensor(c->e, &bt->mean, KSM_DTYPE_F32, 1, &ch));
    KSM_TRY(ksm_exec_tensor(c->e, &bt->invstd, KSM_DTYPE_F32, 1, &ch));
    KSM_TRY(conv_fwd(c, &bt->z, x, w, (int)(w->shape[2] / 2)));
    KSM_EXEC(c->e, ksm_op_batchnorm_train(S(c), &bt->a, &bt->mean, &bt->invstd, &bt->z,
                                          HP(c, L.bn_w), HP(c, L.bn_b), HPW(c, L.bn_mean),
                                          HPW(c, L.bn_var), BN_MOMENTUM, BN_EPS));
    KSM_EXEC(c->e, ksm_op_relu(S(c), &bt->a, &bt->a));
    *y = bt->a;
    return 0;
}

/* dx (NULL for the network input) from dy, the block's output gradient (overwritten). */
static int block_bwd(struct ksm_train_ctx *c, int i, ksm_tensor *dy, ksm_tensor *dx)
{
    struct ksm_cnn_block_layout L;
    ksm_host_cnn_block_layout(c->m->host, i, &L);
    struct ksm_train_block_tape *bt = &c->blocks[i];
    const ksm_tensor *w = HP(c, L.conv_w);
    ksm_tensor dz;
    size_t mk = ksm_exec_mark(c->e);
    KSM_TRY(ksm_train_like(c, &dz, &bt->z));
    KSM_EXEC(c->e, ksm_op_relu_backward(S(c), dy, dy, &bt->a));
    KSM_EXEC(c->e, ksm_op_batchnorm_backward(S(c), &dz, ksm_train_host_grad(c, L.bn_w),
                                             ksm_train_host_grad(c, L.bn_b), dy, &bt->z,
                                             HP(c, L.bn_w), &bt->mean, &bt->invstd));
    KSM_TRY(
        conv_bwd(c, dx, ksm_train_host_grad(c, L.conv_w), &dz, &bt->x, w, (int)(w->shape[2] / 2)));
    ksm_exec_release(c->e, mk);
    return 0;
}

static int op_fwd(struct ksm_train_ctx *c, int t, const ksm_tensor *x, ksm_tensor *y)
{
    int block;
    bool pool;
    ksm_host_cnn_op(c->m->host, t, &block, &pool);
    c->op_in[t] = *x;
    if (pool) {
        int64_t shape[4] = {x->shape[0], x->shape[1], x->shape[2] / 2, x->shape[3] / 2};
        KSM_TRY(ksm_exec_tensor(c->e, y, KSM_DTYPE_F32, 4, shape));
        KSM_EXEC(c->e, ksm_op_maxpool2(S(c), y, x));
    } else {
        KSM_TRY(block_fwd(c, block, x, y));
    }
    c->op_out[t] = *y;
    return 0;
}

/* dx <- the gradient at op t's input from dy at its output (dy may be overwritten); dx NULL for
 * the network input. dx is allocated here (arena, kept). */
static int op_bwd(struct ksm_train_ctx *c, int t, ksm_tensor *dy, ksm_tensor *dx, bool need_dx)
{
    int block;
    bool pool;
    ksm_host_cnn_op(c->m->host, t, &block, &pool);
    if (need_dx) KSM_TRY(ksm_train_like(c, dx, &c->op_in[t]));
    if (pool) {
        if (need_dx) KSM_EXEC(c->e, ksm_op_maxpool2_backward(S(c), dx, dy, &c->op_in[t]));
        return 0;
    }
    return block_bwd(c, block, dy, need_dx ? dx : NULL);
}

/* ---- seeds ---- */

/* SeedConvBlock k (params k, k+1, k+2): pre <- conv(x), u <- relu(GN(pre)). */
static int sblock_fwd(struct ksm_train_ctx *c, struct ksm_seed *sd, int k, const ksm_tensor *x,
                      ksm_tensor *pre, ksm_tensor *u)
{
    const ksm_tensor *w = ksm_seed_param(sd, k);
    KSM_TRY(ksm_train_like(c, pre, x));
    KSM_TRY(ksm_train_like(c, u, x));
    KSM_TRY(conv_fwd(c, pre, x, w, (int)(w->shape[2] / 2)));
    KSM_EXEC(c->e, ksm_op_groupnorm(S(c), u, pre, sd->groups, ksm_seed_param(sd, k + 1),
                                    ksm_seed_param(sd, k + 2), KSM_NORM_EPS));
    KSM_EXEC(c->e, ksm_op_relu(S(c), u, u));
    return 0;
}

/* Its backward: parameter gradients and dx (may be NULL) from du (read only). */
static int sblock_bwd(struct ksm_train_ctx *c, int slot, int k, const ksm_tensor *du,
                      const ksm_tensor *x, const ksm_tensor *pre, const ksm_tensor *u,
                      ksm_tensor *dx)
{
    struct ksm_seed *sd = c->m->slots[slot].s.seed;
    const ksm_tensor *w = ksm_seed_param(sd, k);
    ksm_tensor dn, dc;
    KSM_TRY(ksm_train_like(c, &dn, x));
    KSM_TRY(ksm_train_like(c, &dc, x));
    KSM_EXEC(c->e, ksm_op_relu_backward(S(c), &dn, du, u));
    KSM_EXEC(c->e, ksm_op_groupnorm_backward(S(c), &dc, ksm_train_seed_grad(c, slot, k + 1),
                                             ksm_train_seed_grad(c, slot, k + 2), &dn, pre,
                                             sd->groups, ksm_seed_param(sd, k + 1), KSM_NORM_EPS));
    return conv_bwd(c, dx, ksm_train_seed_grad(c, slot, k), &dc, x, w, (int)(w->shape[2] / 2));
}

static int seed_fwd(struct ksm_train_ctx *c, int slot, const ksm_tensor *x, ksm_tensor *y)
{
    if (c->m->spec.topology == KSM_TOPOLOGY_TRANSFORMER)
        return ksm_train_tf_seed_fwd(c, slot, x, y);
    struct ksm_seed *sd = c->m->slots[slot].s.seed;
    struct ksm_train_slot_tape *st = &c->slots[slot];
    struct ksm_exec *e = c->e;
    KSM_TRY(ksm_train_like(c, y, x));
    switch (sd->bp->index) {
    case KSM_BP_NOOP: KSM_EXEC(e, ksm_op_copy(S(c), y, x)); return 0;
    case KSM_BP_NORM: /* x + tanh(scale) * (GN(x) - x); c = tanh(scale), u = GN(x) - x */
        KSM_TRY(ksm_train_like(c, &st->u, x));
        KSM_TRY(ksm_exec_tensor(e, &st->c, KSM_DTYPE_F32, 1, (const int64_t[]){1}));
        KSM_EXEC(e, ksm_op_groupnorm(S(c), &st->u, x, sd->groups, ksm_seed_param(sd, 1),
                                     ksm_seed_param(sd, 2), KSM_NORM_EPS));
        KSM_EXEC(e, ksm_op_sub(S(c), &st->u, &st->u, x));
        KSM_EXEC(e, ksm_op_tanh(S(c), &st->c, ksm_seed_param(sd, 0)));
        KSM_EXEC(e, ksm_op_mul(S(c), y, &st->c, &st->u));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, y));
        return 0;
    case KSM_BP_CONV_SMALL:
    case KSM_BP_CONV_LIGHT: { /* x + relu(GN(conv(x))); c = conv(x), u = relu(GN(c)) */
        const ksm_tensor *w = ksm_seed_param(sd, 0);
        KSM_TRY(ksm_train_like(c, &st->c, x));
        KSM_TRY(ksm_train_like(c, &st->u, x));
        KSM_TRY(conv_fwd(c, &st->c, x, w, (int)(w->shape[2] / 2)));
        KSM_EXEC(e, ksm_op_groupnorm(S(c), &st->u, &st->c, sd->groups, ksm_seed_param(sd, 1),
                                     ksm_seed_param(sd, 2), KSM_NORM_EPS));
        KSM_EXEC(e, ksm_op_relu(S(c), &st->u, &st->u));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &st->u));
        return 0;
    }
    case KSM_BP_CONV_HEAVY: /* x + blk2(blk1(x)): v2 = pre1, u1, pre2, u2 */
        KSM_TRY(sblock_fwd(c, sd, 0, x, &st->v2[0], &st->v2[1]));
        KSM_TRY(sblock_fwd(c, sd, 3, &st->v2[1], &st->v2[2], &st->v2[3]));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &st->v2[3]));
        return 0;
    case KSM_BP_ATTENTION: { /* SE: x * sigmoid(fc2(relu(fc0(mean(x))))); v2 = p, h, z */
        int64_t B = x->shape[0], C = x->shape[1];
        KSM_TRY(ksm_exec_tensor(e, &st->v2[0], KSM_DTYPE_F32, 2, (const int64_t[]){B, C}));
        KSM_TRY(ksm_exec_tensor(e, &st->v2[1], KSM_DTYPE_F32, 2, (const int64_t[]){B, sd->hidden}));
        KSM_TRY(ksm_exec_tensor(e, &st->v2[2], KSM_DTYPE_F32, 4, (const int64_t[]){B, C, 1, 1}));
        ksm_tensor z2;
        KSM_TRY(ksm_tensor_reshape(&z2, &st->v2[2], 2, (const int64_t[]){B, C}));
        KSM_EXEC(e, ksm_op_mean(S(c), &st->v2[0], x, 2, 4));
        KSM_EXEC(e, ksm_op_linear(S(c), &st->v2[1], &st->v2[0], ksm_seed_param(sd, 0), NULL));
        KSM_EXEC(e, ksm_op_relu(S(c), &st->v2[1], &st->v2[1]));
        KSM_EXEC(
            e, ksm_op_linear(S(c), &z2, &st->v2[1], ksm_seed_param(sd, 1), ksm_seed_param(sd, 2)));
        KSM_EXEC(e, ksm_op_sigmoid(S(c), &z2, &z2));
        KSM_EXEC(e, ksm_op_mul(S(c), y, x, &st->v2[2]));
        return 0;
    }
    case KSM_BP_DEPTHWISE: { /* x + relu(GN(pw(dw(x)))); v2 = a, b, u */
        const ksm_tensor *w0 = ksm_seed_param(sd, 0);
        for (int i = 0; i < 3; i++) KSM_TRY(ksm_train_like(c, &st->v2[i], x));
        KSM_TRY(conv_fwd_g(c, &st->v2[0], x, w0, (int)(w0->shape[2] / 2), sd->channels));
        KSM_TRY(conv_fwd(c, &st->v2[1], &st->v2[0], ksm_seed_param(sd, 1), 0));
        KSM_EXEC(e, ksm_op_groupnorm(S(c), &st->v2[2], &st->v2[1], sd->groups,
                                     ksm_seed_param(sd, 2), ksm_seed_param(sd, 3), KSM_NORM_EPS));
        KSM_EXEC(e, ksm_op_relu(S(c), &st->v2[2], &st->v2[2]));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &st->v2[2]));
        return 0;
    }
    case KSM_BP_BOTTLENECK: { /* x + GN(up(relu(conv(relu(down(x)))))); v2 = d, c2, u */
        KSM_TRY(act_like(c, &st->v2[0], x, sd->hidden));
        KSM_TRY(act_like(c, &st->v2[1], x, sd->hidden));
        KSM_TRY(ksm_train_like(c, &st->v2[2], x));
        KSM_TRY(ksm_train_like(c, &st->u, x));
        KSM_TRY(conv_fwd(c, &st->v2[0], x, ksm_seed_param(sd, 0), 0));
        KSM_EXEC(e, ksm_op_relu(S(c), &st->v2[0], &st->v2[0]));
        KSM_TRY(conv_fwd(c, &st->v2[1], &st->v2[0], ksm_seed_param(sd, 1),
                         (int)(ksm_seed_param(sd, 1)->shape[2] / 2)));
        KSM_EXEC(e, ksm_op_relu(S(c), &st->v2[1], &st->v2[1]));
        KSM_TRY(conv_fwd(c, &st->v2[2], &st->v2[1], ksm_seed_param(sd, 2), 0));
        KSM_EXEC(e, ksm_op_groupnorm(S(c), &st->u, &st->v2[2], sd->groups, ksm_seed_param(sd, 3),
                                     ksm_seed_param(sd, 4), KSM_NORM_EPS));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &st->u));
        return 0;
    }
    default: return KSM_EUNSUPPORTED;
    }
}

/* Seed backward: parameter gradients (those present) and, when dx is given, the input gradient
 * (allocated here). dy is read only. */
static int seed_bwd(struct ksm_train_ctx *c, int slot, const ksm_tensor *dy, ksm_tensor *dx)
{
    if (c->m->spec.topology == KSM_TOPOLOGY_TRANSFORMER)
        return ksm_train_tf_seed_bwd(c, slot, dy, dx);
    struct ksm_seed *sd = c->m->slots[slot].s.seed;
    struct ksm_train_slot_tape *st = &c->slots[slot];
    struct ksm_exec *e = c->e;
    const ksm_tensor *x = &st->h;
    if (dx) KSM_TRY(ksm_train_like(c, dx, x));
    size_t mk = ksm_exec_mark(e);
    switch (sd->bp->index) {
    case KSM_BP_NOOP:
        if (dx) KSM_EXEC(e, ksm_op_copy(S(c), dx, dy));
        break;
    case KSM_BP_NORM: {
        /* y = x + t*u, u = GN(x) - x: dt = sum(dy*u), du = dy*t; dx = dy - du + GN'(du) */
        ksm_tensor dt, du, dgx;
        KSM_TRY(ksm_exec_tensor(e, &dt, KSM_DTYPE_F32, 1, (const int64_t[]){1}));
        KSM_TRY(ksm_train_like(c, &du, x));
        KSM_EXEC(e, ksm_op_mul_backward(S(c), &dt, &du, dy, &st->c, &st->u));
        ksm_tensor *gs = ksm_train_seed_grad(c, slot, 0);
        if (gs) KSM_EXEC(e, ksm_op_tanh_backward(S(c), gs, &dt, &st->c));
        ksm_tensor *gw = ksm_train_seed_grad(c, slot, 1), *gb = ksm_train_seed_grad(c, slot, 2);
        if (dx) KSM_TRY(ksm_train_like(c, &dgx, x));
        if (dx || gw || gb)
            KSM_EXEC(e, ksm_op_groupnorm_backward(S(c), dx ? &dgx : NULL, gw, gb, &du, x,
                                                  sd->groups, ksm_seed_param(sd, 1), KSM_NORM_EPS));
        if (dx) {
            KSM_EXEC(e, ksm_op_sub(S(c), dx, dy, &du));
            KSM_EXEC(e, ksm_op_add(S(c), dx, dx, &dgx));
        }
        break;
    }
    case KSM_BP_CONV_SMALL:
    case KSM_BP_CONV_LIGHT: {
        const ksm_tensor *w = ksm_seed_param(sd, 0);
        ksm_tensor dn, dc, dcx;
        KSM_TRY(ksm_train_like(c, &dn, x));
        KSM_TRY(ksm_train_like(c, &dc, x));
        KSM_EXEC(e, ksm_op_relu_backward(S(c), &dn, dy, &st->u));
        ksm_tensor *gw = ksm_train_seed_grad(c, slot, 1), *gb = ksm_train_seed_grad(c, slot, 2);
        ksm_tensor *gc = ksm_train_seed_grad(c, slot, 0);
        KSM_EXEC(e, ksm_op_groupnorm_backward(S(c), &dc, gw, gb, &dn, &st->c, sd->groups,
                                              ksm_seed_param(sd, 1), KSM_NORM_EPS));
        if (dx) KSM_TRY(ksm_train_like(c, &dcx, x));
        KSM_TRY(conv_bwd(c, dx ? &dcx : NULL, gc, &dc, x, w, (int)(w->shape[2] / 2)));
        if (dx) KSM_EXEC(e, ksm_op_add(S(c), dx, dy, &dcx));
        break;
    }
    case KSM_BP_CONV_HEAVY: {
        ksm_tensor du1, dcx;
        KSM_TRY(ksm_train_like(c, &du1, x));
        KSM_TRY(sblock_bwd(c, slot, 3, dy, &st->v2[1], &st->v2[2], &st->v2[3], &du1));
        if (dx) KSM_TRY(ksm_train_like(c, &dcx, x));
        KSM_TRY(sblock_bwd(c, slot, 0, &du1, x, &st->v2[0], &st->v2[1], dx ? &dcx : NULL));
        if (dx) KSM_EXEC(e, ksm_op_add(S(c), dx, dy, &dcx));
        break;
    }
    case KSM_BP_ATTENTION: {
        /* y = x * z: dx = dy * z + mean'(fc0'(relu'(fc2'(sigmoid'(sum_hw(dy * x)))))) */
        int64_t B = x->shape[0], C = x->shape[1];
        ksm_tensor dz, dh, dp, dxm, dz2;
        KSM_TRY(ksm_exec_tensor(e, &dz, KSM_DTYPE_F32, 4, (const int64_t[]){B, C, 1, 1}));
        KSM_TRY(ksm_train_like(c, &dh, &st->v2[1]));
        KSM_TRY(ksm_train_like(c, &dp, &st->v2[0]));
        KSM_EXEC(e, ksm_op_mul_backward(S(c), dx, &dz, dy, x, &st->v2[2]));
        KSM_EXEC(e, ksm_op_sigmoid_backward(S(c), &dz, &dz, &st->v2[2]));
        KSM_TRY(ksm_tensor_reshape(&dz2, &dz, 2, (const int64_t[]){B, C}));
        KSM_EXEC(e, ksm_op_linear_backward(S(c), &dh, ksm_train_seed_grad(c, slot, 1),
                                           ksm_train_seed_grad(c, slot, 2), &dz2, &st->v2[1],
                                           ksm_seed_param(sd, 1)));
        KSM_EXEC(e, ksm_op_relu_backward(S(c), &dh, &dh, &st->v2[1]));
        if (dx || ksm_train_seed_grad(c, slot, 0))
            KSM_EXEC(e,
                     ksm_op_linear_backward(S(c), dx ? &dp : NULL, ksm_train_seed_grad(c, slot, 0),
                                            NULL, &dh, &st->v2[0], ksm_seed_param(sd, 0)));
        if (dx) {
            KSM_TRY(ksm_train_like(c, &dxm, x));
            KSM_EXEC(e, ksm_op_mean_backward(S(c), &dxm, &dp, 2, 4));
            KSM_EXEC(e, ksm_op_add(S(c), dx, dx, &dxm));
        }
        break;
    }
    case KSM_BP_DEPTHWISE: {
        const ksm_tensor *w0 = ksm_seed_param(sd, 0);
        ksm_tensor dn, db, da, dcx;
        KSM_TRY(ksm_train_like(c, &dn, x));
        KSM_TRY(ksm_train_like(c, &db, x));
        KSM_TRY(ksm_train_like(c, &da, x));
        KSM_EXEC(e, ksm_op_relu_backward(S(c), &dn, dy, &st->v2[2]));
        KSM_EXEC(e, ksm_op_groupnorm_backward(S(c), &db, ksm_train_seed_grad(c, slot, 2),
                                              ksm_train_seed_grad(c, slot, 3), &dn, &st->v2[1],
                                              sd->groups, ksm_seed_param(sd, 2), KSM_NORM_EPS));
        KSM_TRY(conv_bwd(c, &da, ksm_train_seed_grad(c, slot, 1), &db, &st->v2[0],
                         ksm_seed_param(sd, 1), 0));
        if (dx) KSM_TRY(ksm_train_like(c, &dcx, x));
        KSM_TRY(conv_bwd_g(c, dx ? &dcx : NULL, ksm_train_seed_grad(c, slot, 0), &da, x, w0,
                           (int)(w0->shape[2] / 2), sd->channels));
        if (dx) KSM_EXEC(e, ksm_op_add(S(c), dx, dy, &dcx));
        break;
    }
    case KSM_BP_BOTTLENECK: {
        const ksm_tensor *w1 = ksm_seed_param(sd, 1);
        ksm_tensor du, dc2, dd, dcx;
        KSM_TRY(ksm_train_like(c, &du, x));
        KSM_TRY(ksm_train_like(c, &dc2, &st->v2[1]));
        KSM_TRY(ksm_train_like(c, &dd, &st->v2[0]));
        KSM_EXEC(e, ksm_op_groupnorm_backward(S(c), &du, ksm_train_seed_grad(c, slot, 3),
                                              ksm_train_seed_grad(c, slot, 4), dy, &st->v2[2],
                                              sd->groups, ksm_seed_param(sd, 3), KSM_NORM_EPS));
        KSM_TRY(conv_bwd(c, &dc2, ksm_train_seed_grad(c, slot, 2), &du, &st->v2[1],
                         ksm_seed_param(sd, 2), 0));
        KSM_EXEC(e, ksm_op_relu_backward(S(c), &dc2, &dc2, &st->v2[1]));
        KSM_TRY(conv_bwd(c, &dd, ksm_train_seed_grad(c, slot, 1), &dc2, &st->v2[0], w1,
                         (int)(w1->shape[2] / 2)));
        KSM_EXEC(e, ksm_op_relu_backward(S(c), &dd, &dd, &st->v2[0]));
        if (dx) KSM_TRY(ksm_train_like(c, &dcx, x));
        KSM_TRY(conv_bwd(c, dx ? &dcx : NULL, ksm_train_seed_grad(c, slot, 0), &dd, x,
                         ksm_seed_param(sd, 0), 0));
        if (dx) KSM_EXEC(e, ksm_op_add(S(c), dx, dy, &dcx));
        break;
    }
    default: return KSM_EUNSUPPORTED;
    }
    ksm_exec_release(e, mk);
    return 0;
}

/* ---- slots (docs/blending.md#forward-of-one-slot, in train mode) ---- */

/* GatedBlend's geometry: it pools h over [d0, d1) (H, W of a CNN's [B,C,H,W]; T of a
 * transformer's [B,T,C]) into [B, C] and its per-sample gate has shape b1 ([B,1,1,1] or
 * [B,1,1], ndim *nd). */
static void gate_geometry(const ksm_tensor *h, int *d0, int *d1, int64_t *C, int64_t *b1, int *nd)
{
    bool tf = h->ndim == 3;
    *d0 = tf ? 1 : 2;
    *d1 = tf ? 2 : 4;
    *C = tf ? h->shape[2] : h->shape[1];
    *nd = h->ndim;
    for (int i = 0; i < h->ndim; i++) b1[i] = i == 0 ? h->shape[0] : 1;
}

int ksm_train_slot_fwd(struct ksm_train_ctx *c, int idx, const ksm_tensor *h, ksm_tensor *y)
{
    struct ksm_model_slot *ms = &c->m->slots[idx];
    struct ksm_slot *s = &ms->s;
    struct ksm_train_slot_tape *st = &c->slots[idx];
    struct ksm_exec *e = c->e;
    memset(st, 0, sizeof *st);
    st->runs = ksm_slot_runs_seed(s);
    if (!st->runs) {
        *y = *h;
        return 0;
    }
    st->h = *h;
    st->isolate = s->isolate_gradients;
    st->frozen = s->blend_out_freeze;
    KSM_TRY(seed_fwd(c, idx, h, &st->sx));
    KSM_TRY(ksm_train_like(c, y, h));
    st->ste = s->state.stage == KSM_STAGE_TRAINING && s->state.alpha == 0.0;
    if (st->ste) {
        KSM_EXEC(e, ksm_op_sub(S(c), y, &st->sx, &st->sx));
        KSM_EXEC(e, ksm_op_add(S(c), y, h, y));
        st->y = *y;
        return 0;
    }
    KSM_TRY(ksm_exec_tensor(e, &st->alpha, KSM_DTYPE_F32, 0, NULL));
    KSM_TRY(ksm_exec_tensor(e, &st->ca, KSM_DTYPE_F32, 0, NULL));
    KSM_EXEC(e, ksm_op_fill(S(c), &st->alpha, (double)(float)s->state.alpha));
    KSM_EXEC(e, ksm_op_clamp01(S(c), &st->ca, &st->alpha));
    switch (s->state.alpha_algorithm) {
    case KSM_ALGO_ADD: KSM_EXEC(e, ksm_op_lerp(S(c), y, h, &st->sx, &st->ca)); break;
    case KSM_ALGO_MULTIPLY:
        KSM_TRY(ksm_train_like(c, &st->T, h));
        KSM_TRY(ksm_train_like(c, &st->v, h));
        KSM_EXEC(e, ksm_op_sub(S(c), &st->T, &st->sx, h));
        KSM_EXEC(e, ksm_op_tanh(S(c), &st->T, &st->T));
        KSM_EXEC(e, ksm_op_mul(S(c), &st->v, &st->T, &st->ca));
        KSM_EXEC(e, ksm_op_affine(S(c), &st->v, &st->v, 1.0f, 1.0f));
        KSM_EXEC(e, ksm_op_mul(S(c), y, h, &st->v));
        break;
    case KSM_ALGO_GATE: {
        if (s->gate == NULL) return KSM_ESTAGE;
        const struct ksm_params *gp = ksm_gated_blend_params(s->gate);
        int64_t B = h->shape[0], C, H = ksm_params_tensor(gp, 0)->shape[0], b1[4];
        int d0, d1, nd;
        gate_geometry(h, &d0, &d1, &C, b1, &nd);
        KSM_TRY(ksm_exec_tensor(e, &st->gp, KSM_DTYPE_F32, 2, (const int64_t[]){B, C}));
        KSM_TRY(ksm_exec_tensor(e, &st->gh, KSM_DTYPE_F32, 2, (const int64_t[]){B, H}));
        KSM_TRY(ksm_exec_tensor(e, &st->gz, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_exec_tensor(e, &st->cg, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_exec_tensor(e, &st->prod, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_exec_tensor(e, &st->aeff, KSM_DTYPE_F32, nd, b1));
        ksm_tensor z2;
        KSM_TRY(ksm_tensor_reshape(&z2, &st->gz, 2, (const int64_t[]){B, 1}));
        KSM_EXEC(e, ksm_op_mean(S(c), &st->gp, h, d0, d1));
        KSM_EXEC(e, ksm_op_linear(S(c), &st->gh, &st->gp, ksm_params_tensor(gp, 0),
                                  ksm_params_tensor(gp, 1)));
        KSM_EXEC(e, ksm_op_relu(S(c), &st->gh, &st->gh));
        KSM_EXEC(e, ksm_op_linear(S(c), &z2, &st->gh, ksm_params_tensor(gp, 2),
                                  ksm_params_tensor(gp, 3)));
        KSM_EXEC(e, ksm_op_sigmoid(S(c), &z2, &z2));
        KSM_EXEC(e, ksm_op_clamp01(S(c), &st->cg, &st->gz));
        KSM_EXEC(e, ksm_op_mul(S(c), &st->prod, &st->ca, &st->cg));
        KSM_EXEC(e, ksm_op_clamp01(S(c), &st->aeff, &st->prod));
        KSM_EXEC(e, ksm_op_lerp(S(c), y, h, &st->sx, &st->aeff));
        break;
    }
    default: return KSM_EINTERNAL;
    }
    st->y = *y;
    return 0;
}

/* dh <- the gradient at the slot's input h from dy at its output (a new arena tensor, or dy
 * itself when the seed does not run). */
int ksm_train_slot_bwd(struct ksm_train_ctx *c, int idx, ksm_tensor *dy, ksm_tensor *dh)
{
    struct ksm_train_slot_tape *st = &c->slots[idx];
    struct ksm_exec *e = c->e;
    if (!st->runs) {
        *dh = *dy;
        return 0;
    }
    struct ksm_slot *s = &c->m->slots[idx].s;
    ksm_tensor dsx, dxs;
    KSM_TRY(ksm_train_like(c, dh, &st->h));
    KSM_TRY(ksm_train_like(c, &dsx, &st->h));
    bool flow = !st->isolate; /* the seed input's gradient reaches the host */
    if (st->ste) {
        /* y = h + (s - stopgrad(s)): dh = dy, ds = dy */
        KSM_EXEC(e, ksm_op_copy(S(c), dh, dy));
        KSM_TRY(seed_bwd(c, idx, dy, flow ? &dxs : NULL));
        if (flow) KSM_EXEC(e, ksm_op_add(S(c), dh, dh, &dxs));
        return 0;
    }
    switch (s->state.alpha_algorithm) {
    case KSM_ALGO_ADD:
        KSM_EXEC(e, ksm_op_lerp_backward(S(c), dh, &dsx, NULL, dy, &st->h, &st->sx, &st->ca));
        break;
    case KSM_ALGO_MULTIPLY: {
        /* y = h * v, v = 1 + ca*T, T = tanh(s - ref), ref = the seed input */
        ksm_tensor dv, dT;
        KSM_TRY(ksm_train_like(c, &dv, &st->h));
        KSM_TRY(ksm_train_like(c, &dT, &st->h));
        KSM_EXEC(e, ksm_op_mul_backward(S(c), dh, &dv, dy, &st->h, &st->v));
        KSM_EXEC(e, ksm_op_mul_backward(S(c), NULL, &dT, &dv, &st->ca, &st->T));
        KSM_EXEC(e, ksm_op_tanh_backward(S(c), &dsx, &dT, &st->T));
        if (flow) KSM_EXEC(e, ksm_op_sub(S(c), dh, dh, &dsx)); /* d ref = -d s */
        break;
    }
    case KSM_ALGO_GATE: {
        const struct ksm_params *gp = ksm_gated_blend_params(s->gate);
        int64_t B = st->h.shape[0], C, b1[4];
        int d0, d1, nd;
        gate_geometry(&st->h, &d0, &d1, &C, b1, &nd);
        ksm_tensor daeff, dprod, dcg, dgz, dgh, dgp, dgx;
        KSM_TRY(ksm_exec_tensor(e, &daeff, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_exec_tensor(e, &dprod, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_exec_tensor(e, &dcg, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_exec_tensor(e, &dgz, KSM_DTYPE_F32, nd, b1));
        KSM_TRY(ksm_train_like(c, &dgh, &st->gh));
        KSM_TRY(ksm_train_like(c, &dgp, &st->gp));
        KSM_EXEC(e, ksm_op_lerp_backward(S(c), dh, &dsx, &daeff, dy, &st->h, &st->sx, &st->aeff));
        KSM_EXEC(e, ksm_op_clamp01_backward(S(c), &dprod, &daeff, &st->prod));
        KSM_EXEC(e, ksm_op_mul_backward(S(c), NULL, &dcg, &dprod, &st->ca, &st->cg));
        KSM_EXEC(e, ksm_op_clamp01_backward(S(c), &dgz, &dcg, &st->gz));
        KSM_EXEC(e, ksm_op_sigmoid_backward(S(c), &dgz, &dgz, &st->gz));
        int ns = c->sg[idx].n - 4; /* the gate's four tensors come last */
        ksm_tensor dz2, z2;
        KSM_TRY(ksm_tensor_reshape(&dz2, &dgz, 2, (const int64_t[]){B, 1}));
        KSM_TRY(ksm_tensor_reshape(&z2, &st->gz, 2, (const int64_t[]){B, 1}));
        (void)z2;
        KSM_EXEC(e, ksm_op_linear_backward(S(c), &dgh, ksm_train_seed_grad(c, idx, ns + 2),
                                           ksm_train_seed_grad(c, idx, ns + 3), &dz2, &st->gh,
                                           ksm_params_tensor(gp, 2)));
        KSM_EXEC(e, ksm_op_relu_backward(S(c), &dgh, &dgh, &st->gh));
        if (flow || ksm_train_seed_grad(c, idx, ns) || ksm_train_seed_grad(c, idx, ns + 1))
            KSM_EXEC(e, ksm_op_linear_backward(S(c), flow ? &dgp : NULL,
                                               ksm_train_seed_grad(c, idx, ns),
                                               ksm_train_seed_grad(c, idx, ns + 1), &dgh, &st->gp,
                                               ksm_params_tensor(gp, 0)));
        if (flow) {
            KSM_TRY(ksm_train_like(c, &dgx, &st->h));
            KSM_EXEC(e, ksm_op_mean_backward(S(c), &dgx, &dgp, d0, d1));
            KSM_EXEC(e, ksm_op_add(S(c), dh, dh, &dgx));
        }
        break;
    }
    default: return KSM_EINTERNAL;
    }
    KSM_TRY(seed_bwd(c, idx, &dsx, flow ? &dxs : NULL));
    if (flow) KSM_EXEC(e, ksm_op_add(S(c), dh, dh, &dxs));
    return 0;
}

/* ---- the whole step ---- */

int ksm_train_alloc_grads(struct ksm_train_ctx *c)
{
    for (int i = 0; i < c->n_host; i++)
        KSM_TRY(ksm_train_like(c, &c->host_grad[i], HP(c, c->host_idx[i])));
    for (int i = 0; i < c->m->n_slots; i++) {
        struct ksm_train_seed_grads *g = &c->sg[i];
        for (int k = 0; k < g->n; k++)
            if (g->present[k]) KSM_TRY(ksm_train_like(c, &g->grad[k], g->param[k]));
    }
    return 0;
}

/* The CNN's whole step: forward, loss, backward. */
static int cnn_body(struct ksm_train_ctx *c)
{
    ksm_model *m = c->m;
    struct ksm_exec *e = c->e;
    KSM_TRY(ksm_train_alloc_grads(c)); /* gradient buffers first */
    ksm_tensor x;
    KSM_TRY(ksm_exec_tensor(e, &x, KSM_DTYPE_F32, c->x_host->ndim, c->x_host->shape));
    KSM_TRY(ksm_exec_tensor(e, &c->labels, KSM_DTYPE_I64, 1, &c->B));
    if (!e->measure) {
        KSM_TRY(ksm_stream_memcpy_async(S(c), x.data, c->x_host->data, ksm_tensor_nbytes(&x),
                                        KSM_COPY_H2D));
        KSM_TRY(ksm_stream_memcpy_async(S(c), c->labels.data, c->labels_host,
                                        (size_t)c->B * sizeof(int64_t), KSM_COPY_H2D));
    }
    /* forward: ops in timeline order, each slot right after its boundary */
    int n_ops = ksm_host_n_ops(m->host);
    int slot_after[64];
    for (int t = 0; t < n_ops; t++) slot_after[t] = -1;
    for (int o = 0; o < m->n_slots; o++) {
        int idx = m->exec_order[o];
        slot_after[m->slots[idx].inj->exec_index] = idx;
    }
    ksm_tensor cur = x;
    for (int t = 0; t < n_ops; t++) {
        ksm_tensor y;
        KSM_TRY(op_fwd(c, t, &cur, &y));
        cur = y;
        if (slot_after[t] >= 0) {
            KSM_TRY(ksm_train_slot_fwd(c, slot_after[t], &cur, &y));
            cur = y;
        }
    }
    c->feat = cur;
    int cls_w, cls_b;
    ksm_host_cnn_head_layout(m->host, &cls_w, &cls_b);
    int64_t B = c->B, C = cur.shape[1], K = HP(c, cls_w)->shape[0];
    KSM_TRY(ksm_exec_tensor(e, &c->gpool, KSM_DTYPE_F32, 2, (const int64_t[]){B, C}));
    KSM_TRY(ksm_exec_tensor(e, &c->logits, KSM_DTYPE_F32, 2, (const int64_t[]){B, K}));
    KSM_EXEC(e, ksm_op_mean(S(c), &c->gpool, &cur, 2, 4));
    KSM_EXEC(e, ksm_op_linear(S(c), &c->logits, &c->gpool, HP(c, cls_w), HP(c, cls_b)));
    ksm_tensor rows, loss, amax;
    KSM_TRY(ksm_exec_tensor(e, &rows, KSM_DTYPE_F32, 1, &B));
    KSM_TRY(ksm_exec_tensor(e, &loss, KSM_DTYPE_F32, 0, NULL));
    KSM_TRY(ksm_exec_tensor(e, &amax, KSM_DTYPE_I64, 1, &B));
    KSM_EXEC(e, ksm_op_cross_entropy(S(c), &rows, &c->logits, &c->labels, -100));
    KSM_EXEC(e, ksm_op_mean(S(c), &loss, &rows, 0, 1));
    KSM_EXEC(e, ksm_op_argmax(S(c), &amax, &c->logits));
    if (!e->measure) {
        KSM_TRY(ksm_stream_memcpy_async(S(c), &c->loss, loss.data, sizeof(float), KSM_COPY_D2H));
        KSM_TRY(ksm_stream_memcpy_async(S(c), c->argmax_host, amax.data,
                                        (size_t)B * sizeof(int64_t), KSM_COPY_D2H));
    }
    /* backward */
    ksm_tensor dlogits, dg, dcur;
    KSM_TRY(ksm_train_like(c, &dlogits, &c->logits));
    KSM_TRY(ksm_train_like(c, &dg, &c->gpool));
    KSM_TRY(ksm_train_like(c, &dcur, &c->feat));
    KSM_EXEC(e, ksm_op_cross_entropy_backward(S(c), &dlogits, &c->logits, &c->labels, -100, 1.0f));
    KSM_EXEC(e, ksm_op_linear_backward(S(c), &dg, ksm_train_host_grad(c, cls_w),
                                       ksm_train_host_grad(c, cls_b), &dlogits, &c->gpool,
                                       HP(c, cls_w)));
    KSM_EXEC(e, ksm_op_mean_backward(S(c), &dcur, &dg, 2, 4));
    for (int t = n_ops - 1; t >= 0; t--) {
        if (slot_after[t] >= 0) {
            ksm_tensor dh;
            KSM_TRY(ksm_train_slot_bwd(c, slot_after[t], &dcur, &dh));
            dcur = dh;
        }
        ksm_tensor dx;
        KSM_TRY(op_bwd(c, t, &dcur, &dx, t > 0));
        dcur = dx;
    }
    return 0;
}

/* ---- validation ---- */

static int check_args(ksm_model *m, const struct ksm_train_args *a, char *err, size_t errlen)
{
    if (a == NULL || a->input == NULL || a->input->data == NULL)
        return ksm_errf(err, errlen, KSM_EINVAL, "input is required");
    if (!ksm_tensor_is_contiguous(a->input))
        return ksm_errf(err, errlen, KSM_EINVAL, "input must be contiguous");
    if (a->stream && strlen(a->stream) > KSM_STREAM_KEY_MAX)
        return ksm_errf(err, errlen, KSM_EINVAL, "stream key is longer than %d bytes",
                        KSM_STREAM_KEY_MAX);
    if (a->collect_gradients < -1 || a->collect_gradients > 1)
        return ksm_errf(err, errlen, KSM_EINVAL, "collect_gradients is %d; it must be -1, 0 or 1",
                        a->collect_gradients);
    KSM_TRY(ksm_host_check_input(m->host, a->input, err, errlen));
    int64_t B = a->input->shape[0];
    if (B > MAX_TRAIN_ROWS)
        return ksm_errf(err, errlen, KSM_ELIMIT, "input has %lld rows; at most %d are allowed",
                        (long long)B, MAX_TRAIN_ROWS);
    if (a->n_slots < 0 || (a->n_slots > 0 && a->slots == NULL))
        return ksm_errf(err, errlen, KSM_EINVAL, "slots is NULL or n_slots is negative");
    if (m->spec.topology == KSM_TOPOLOGY_TRANSFORMER)
        return ksm_train_tf_check_targets(m, a->input, a->targets, err, errlen);
    /* BatchNorm in train mode needs more than one value per channel at every block. */
    int64_t shape[4] = {B, a->input->shape[1], a->input->shape[2], a->input->shape[3]};
    for (int t = 0; t < ksm_host_n_ops(m->host); t++) {
        int block;
        bool pool;
        ksm_host_cnn_op(m->host, t, &block, &pool);
        if (pool) {
            shape[2] /= 2;
            shape[3] /= 2;
        } else if (shape[0] * shape[2] * shape[3] <= 1) {
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "BatchNorm of block %d would see one value per channel (batch %lld, "
                            "%lldx%lld); train mode needs more than one",
                            block, (long long)B, (long long)shape[2], (long long)shape[3]);
        }
    }
    const ksm_tensor *t = a->targets;
    if (t == NULL || t->data == NULL)
        return ksm_errf(err, errlen, KSM_EINVAL, "targets are required");
    if (t->dtype != KSM_DTYPE_I64 && t->dtype != KSM_DTYPE_I32)
        return ksm_errf(err, errlen, KSM_EDTYPE, "targets must be I64 or I32 class ids");
    if (t->ndim != 1 || t->shape[0] != B)
        return ksm_errf(err, errlen, KSM_ESHAPE,
                        "targets must have shape [%lld] (one class id per row)", (long long)B);
    if (!ksm_tensor_is_contiguous(t))
        return ksm_errf(err, errlen, KSM_EINVAL, "targets must be contiguous");
    int64_t limit = m->spec.cnn.num_classes;
    for (int64_t i = 0; i < B; i++) {
        int64_t v = t->dtype == KSM_DTYPE_I64 ? ((const int64_t *)t->data)[i]
                                              : ((const int32_t *)t->data)[i];
        if (v < 0 || v >= limit)
            return ksm_errf(err, errlen, KSM_EINVAL, "targets[%lld] = %lld is outside [0, %lld)",
                            (long long)i, (long long)v, (long long)limit);
    }
    return 0;
}

/* Under the lock: slot names, supported seeds. sel[i]: slot i's seed steps. */
static int check_model(ksm_model *m, const struct ksm_train_args *a, bool *sel, char *err,
                       size_t errlen)
{
    for (int i = 0; i < m->n_slots; i++) sel[i] = a->n_slots == 0;
    for (int k = 0; k < a->n_slots; k++) {
        struct ksm_model_slot *ms = ksm_model_find_slot(m, a->slots[k]);
        if (ms == NULL)
            return ksm_errf(err, errlen, KSM_ENOSLOT, "model \"%s\" has no slot \"%s\"", m->id,
                            a->slots[k] ? a->slots[k] : "");
        sel[ms - m->slots] = true;
    }
    for (int i = 0; i < m->n_slots; i++) {
        struct ksm_slot *s = &m->slots[i].s;
        if (!ksm_slot_runs_seed(s)) continue;
        struct ksm_seed *sd = s->seed;
        if (!bp_trains(sd))
            return ksm_errf(err, errlen, KSM_EUNSUPPORTED,
                            "training through blueprint %s (slot %s) is not implemented yet",
                            sd->bp->name, s->id);
        if (s->state.alpha_algorithm == KSM_ALGO_GATE && s->gate == NULL &&
            !(s->state.stage == KSM_STAGE_TRAINING && s->state.alpha == 0.0))
            return ksm_errf(err, errlen, KSM_ESTAGE, "slot %s blends with GATE but has no gate",
                            s->id);
    }
    const struct ksm_params *hp = ksm_host_params(m->host);
    for (int i = 0; i < hp->n; i++)
        if (ksm_params_tensor(hp, i)->data == NULL)
            return ksm_errf(err, errlen, KSM_ENOTREADY, "model \"%s\" has no weights on its device",
                            m->id);
    if (!ksm_device_is_host(m->dev))
        return ksm_errf(err, errlen, KSM_EUNSUPPORTED,
                        "training on %s is not implemented yet (CPU only)",
                        ksm_device_name(m->dev));
    return 0;
}

static int add_nbt(ksm_model *m, ksm_stream *s)
{
    int n_ops = ksm_host_n_ops(m->host);
    for (int t = 0; t < n_ops; t++) {
        int block;
        bool pool;
        ksm_host_cnn_op(m->host, t, &block, &pool);
        if (pool) continue;
        struct ksm_cnn_block_layout L;
        ksm_host_cnn_block_layout(m->host, block, &L);
        if (L.bn_nbt < 0) continue;
        const ksm_tensor *nb = ksm_params_tensor(ksm_host_params(m->host), L.bn_nbt);
        int64_t v;
        KSM_TRY(ksm_stream_memcpy_async(s, &v, nb->data, sizeof v, KSM_COPY_D2H));
        KSM_TRY(ksm_stream_synchronize(s));
        v++;
        /* v lives in this iteration only: the copy must be done before the next one. */
        KSM_TRY(ksm_stream_memcpy_async(s, nb->data, &v, sizeof v, KSM_COPY_H2D));
        KSM_TRY(ksm_stream_synchronize(s));
    }
    return 0;
}

static void seed_stats(const struct ksm_grad_sq *sq, int n, double hn, uint64_t hc,
                       const struct ksm_training_config *cfg, struct ksm_seed_grad_stats *out)
{
    struct ksm_grad_thresholds th = {cfg->vanishing_threshold, cfg->exploding_threshold};
    struct ksm_seed_grad_stats_internal in;
    ksm_grad_seed_stats(sq, n, hn, hc, &th, &in);
    out->grad_norm = in.grad_norm;
    out->param_count = in.param_count;
    out->normalized_ratio = in.normalized_ratio;
    out->gradient_health = in.gradient_health;
    out->has_vanishing = in.has_vanishing;
    out->has_exploding = in.has_exploding;
}

/* A step writes the model's memory in place: BatchNorm's running statistics in the forward, then
 * every parameter it steps. Forwards and evaluates on the model's other streams enqueue under the
 * lock but run (and are synchronised) after releasing it, reading that memory: their work must be
 * done before this stream writes it. (Work enqueued after the step sees its writes: the step
 * synchronises its stream before it unlocks.) A stream's own failure is for its caller to report:
 * once synchronised, it runs nothing. */
static void wait_other_streams(ksm_model *m, const ksm_stream *s)
{
    for (int i = 0; i < m->n_streams; i++)
        if (m->streams[i]->stream != s) (void)ksm_stream_synchronize(m->streams[i]->stream);
}

int ksm_model_train_step(ksm_model *m, const struct ksm_train_args *a, struct ksm_train_result *r,
                         char *err, size_t errlen)
{
    if (r) memset(r, 0, sizeof *r);
    if (m == NULL || r == NULL)
        return ksm_errf(err, errlen, KSM_EINVAL, "model and result are required");
    KSM_TRY(check_args(m, a, err, errlen));
    int64_t t0 = mono_ns();
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    struct ksm_train_ctx *c = NULL;
    if (m->deleted) {
        rc = ksm_errf(err, errlen, KSM_ENOMODEL, "model \"%s\" was deleted", m->id);
        goto out;
    }
    bool sel[KSM_MAX_SLOTS];
    if ((rc = check_model(m, a, sel, err, errlen)) < 0) goto out;
    struct ksm_train_state *t = train_state(m);
    c = calloc(1, sizeof *c);
    int64_t B = a->input->shape[0];
    /* loss rows: one per image, or one per token ([B, T] targets, row-major) */
    int64_t rows = ksm_tensor_numel(a->targets);
    if (t == NULL || c == NULL) {
        rc = ksm_errf(err, errlen, KSM_ENOMEM, "out of host memory");
        goto out;
    }
    if ((size_t)rows > t->cap_rows) {
        int64_t *l = realloc(t->labels, (size_t)rows * sizeof *l);
        if (l) t->labels = l;
        int64_t *am = l ? realloc(t->argmax, (size_t)rows * sizeof *am) : NULL;
        if (am) t->argmax = am;
        if (l == NULL || am == NULL) {
            rc = ksm_errf(err, errlen, KSM_ENOMEM, "out of host memory");
            goto out;
        }
        t->cap_rows = (size_t)rows;
    }
    for (int64_t i = 0; i < rows; i++)
        t->labels[i] = a->targets->dtype == KSM_DTYPE_I64 ? ((const int64_t *)a->targets->data)[i]
                                                          : ((const int32_t *)a->targets->data)[i];
    struct ksm_stream_ctx *ctx;
    if ((rc = ksm_model_stream(m, a->stream, &ctx)) < 0) {
        ksm_errf(err, errlen, 0, "could not get stream \"%s\": %s", a->stream ? a->stream : "",
                 ksm_strerror(rc));
        goto out;
    }
    ksm_stream *s = ctx->stream;
    wait_other_streams(m, s);
    /* optimizers: the host's, then one per live seed of the selection */
    c->m = m;
    c->x_host = a->input;
    c->labels_host = t->labels;
    c->B = B;
    c->rows = rows;
    c->argmax_host = t->argmax;
    c->step = t->step;
    c->n_host = host_trainable(m, c->host_idx);
    if (!t->host_live) {
        struct ksm_sgd_config hc = sgd_cfg(&t->cfg.host);
        if ((rc = ksm_sgd_init(&t->host, &hc, m->alloc, c->n_host)) < 0) goto fail;
        t->host_live = true;
    }
    bool step_seed[KSM_MAX_SLOTS] = {false};
    for (int i = 0; i < m->n_slots; i++) {
        struct ksm_model_slot *ms = &m->slots[i];
        struct ksm_train_seed_grads *g = &c->sg[i];
        bool live = has_seed_module(&ms->s);
        if (!live) {
            ksm_train_drop_seed(m, i); /* emptied, pruned */
            continue;
        }
        g->n = seed_trainable(ms, g->param);
        bool runs = ksm_slot_runs_seed(&ms->s);
        /* the blend-out freeze covers the seed and its gate (kasmina-behaviour.md s2.4) */
        for (int k = 0; k < g->n; k++) g->present[k] = runs && !ms->s.blend_out_freeze;
        /* the STE path does not run the gate: it gets no gradient */
        if (ms->s.gate && ms->s.state.stage == KSM_STAGE_TRAINING && ms->s.state.alpha == 0.0)
            for (int k = g->n - 4; k < g->n; k++) g->present[k] = false;
        if (!sel[i]) continue;
        struct seed_opt *so = &t->seeds[i];
        bool fossil = ms->s.state.stage == KSM_STAGE_FOSSILIZED;
        if (so->live && (so->seed != ms->s.seed || (fossil && !so->fossil) || so->opt.n != g->n))
            ksm_train_drop_seed(m, i);
        if (!so->live) {
            struct ksm_sgd_config sc = sgd_cfg(&t->cfg.seed);
            if ((rc = ksm_sgd_init(&so->opt, &sc, m->alloc, g->n)) < 0) goto fail;
            so->live = true;
            so->seed = ms->s.seed;
            so->fossil = fossil;
        }
        step_seed[i] = true;
    }
    /* the tape: measure, then the real pass on the kept arena */
    int (*body)(struct ksm_train_ctx *) =
        m->spec.topology == KSM_TOPOLOGY_TRANSFORMER ? ksm_train_tf_body : cnn_body;
    struct ksm_exec e;
    c->e = &e;
    ksm_exec_init(&e, s, true, NULL, 0);
    if ((rc = body(c)) < 0) goto fail;
    size_t need = e.high ? e.high : KSM_EXEC_ALIGN;
    /* the gradient norms' scratch follows the tape: a steady-state step allocates nothing */
    const size_t sq_off = (need + KSM_EXEC_ALIGN - 1) / KSM_EXEC_ALIGN * KSM_EXEC_ALIGN;
    need = sq_off + SQ_SCRATCH * sizeof(double);
    if (t->arena_bytes < need) {
        if (t->arena) ksm_alloc_free(m->alloc, t->arena);
        t->arena = NULL;
        t->arena_bytes = 0;
        if ((rc = ksm_alloc_malloc(m->alloc, need, s, &t->arena)) < 0) goto fail;
        t->arena_bytes = need;
    }
    ksm_exec_init(&e, s, false, t->arena, t->arena_bytes);
    if ((rc = body(c)) < 0) goto fail;

    /* statistics on the unclipped gradients */
    bool any_tb = false;
    for (int i = 0; i < m->n_slots; i++) {
        enum ksm_stage st = m->slots[i].s.state.stage;
        if (step_seed[i] && (st == KSM_STAGE_TRAINING || st == KSM_STAGE_BLENDING)) any_tb = true;
    }
    bool collect = a->collect_gradients == 1 ||
                   (a->collect_gradients == -1 && t->cfg.gradient_telemetry_stride > 0 &&
                    t->step % t->cfg.gradient_telemetry_stride == 0);
    collect = collect && any_tb;
    struct ksm_grad_sq hsq[KSM_TRAIN_MAX_HOST_P], ssq[KSM_MAX_SLOTS][KSM_TRAIN_MAX_SEED_P];
    ksm_tensor *hg[KSM_TRAIN_MAX_HOST_P];
    const ksm_tensor *hgc[KSM_TRAIN_MAX_HOST_P];
    for (int i = 0; i < c->n_host; i++) hgc[i] = hg[i] = &c->host_grad[i];
    bool need_sq = collect || t->cfg.max_grad_norm > 0;
    double *sq_dev = (double *)((char *)t->arena + sq_off), sq_host[SQ_SCRATCH];
    if (need_sq && (rc = ksm_grad_sumsq_scratch(s, sq_dev, sq_host, hgc, c->n_host, hsq)) < 0)
        goto fail;
    ksm_tensor *sgp[KSM_MAX_SLOTS][KSM_TRAIN_MAX_SEED_P];
    for (int i = 0; i < m->n_slots; i++) {
        if (!step_seed[i]) continue;
        struct ksm_train_seed_grads *g = &c->sg[i];
        const ksm_tensor *gc[KSM_TRAIN_MAX_SEED_P];
        for (int k = 0; k < g->n; k++) gc[k] = sgp[i][k] = g->present[k] ? &g->grad[k] : NULL;
        if (need_sq && (rc = ksm_grad_sumsq_scratch(s, sq_dev, sq_host, gc, g->n, ssq[i])) < 0)
            goto fail;
    }
    int stats_slot[KSM_MAX_SLOTS];
    if (collect) {
        double hn;
        uint64_t hc;
        ksm_grad_group_norm(hsq, c->n_host, &hn, &hc);
        r->gradients_collected = true;
        r->host_grad_norm = hn;
        r->host_param_count = hc;
        for (int i = 0; i < m->n_slots; i++) {
            enum ksm_stage st = m->slots[i].s.state.stage;
            if (!step_seed[i] || (st != KSM_STAGE_TRAINING && st != KSM_STAGE_BLENDING)) continue;
            struct ksm_seed_grad_stats *o = &r->seeds[r->n_seeds++];
            snprintf(o->slot_id, sizeof o->slot_id, "%s", m->slots[i].s.id);
            seed_stats(ssq[i], c->sg[i].n, hn, hc, &t->cfg, o);
            stats_slot[r->n_seeds - 1] = i;
        }
    }
    /* clipping: the host, then each seed */
    if (t->cfg.max_grad_norm > 0) {
        if ((rc = ksm_clip_grad_norm(s, m->alloc, hg, c->n_host, hsq, t->cfg.max_grad_norm, NULL)) <
            0)
            goto fail;
        for (int i = 0; i < m->n_slots; i++)
            if (step_seed[i] && (rc = ksm_clip_grad_norm(s, m->alloc, sgp[i], c->sg[i].n, ssq[i],
                                                         t->cfg.max_grad_norm, NULL)) < 0)
                goto fail;
    }
    /* SGD: the host's, then each seed's */
    struct ksm_sgd_pair pairs[KSM_TRAIN_MAX_HOST_P];
    for (int i = 0; i < c->n_host; i++)
        pairs[i] = (struct ksm_sgd_pair){HPW(c, c->host_idx[i]), &c->host_grad[i]};
    if ((rc = ksm_sgd_step(&t->host, s, pairs, c->n_host)) < 0) goto fail;
    for (int i = 0; i < m->n_slots; i++) {
        if (!step_seed[i]) continue;
        struct ksm_train_seed_grads *g = &c->sg[i];
        struct ksm_sgd_pair sp[KSM_TRAIN_MAX_SEED_P];
        for (int k = 0; k < g->n; k++)
            sp[k] = (struct ksm_sgd_pair){g->param[k], g->present[k] ? &g->grad[k] : NULL};
        if ((rc = ksm_sgd_step(&t->seeds[i].opt, s, sp, g->n)) < 0) goto fail;
        snprintf(r->stepped[r->n_stepped++], KSM_SLOT_ID_MAX, "%s", m->slots[i].s.id);
    }
    if (m->spec.topology == KSM_TOPOLOGY_CNN && (rc = add_nbt(m, s)) < 0) goto fail;
    if ((rc = ksm_stream_synchronize(s)) < 0) goto fail;
    r->loss = c->loss;
    r->total = (uint64_t)rows;
    for (int64_t i = 0; i < rows; i++) r->correct += t->argmax[i] == t->labels[i];
    /* Each slot keeps the statistics of its last step that collected them (RecordMetrics). */
    for (int k = 0; k < r->n_seeds; k++) {
        struct ksm_slot *sl = &m->slots[stats_slot[k]].s;
        const struct ksm_seed_grad_stats *o = &r->seeds[k];
        sl->has_collected_grads = true;
        sl->collected_grad_norm = o->grad_norm;
        sl->collected_grad_ratio = o->normalized_ratio;
        sl->collected_grad_health = o->gradient_health;
        sl->collected_vanishing = o->has_vanishing;
        sl->collected_exploding = o->has_exploding;
    }
    t->step++;
    m->generation++;
    r->train_step = t->step;
    r->model_generation = m->generation;
    r->compute_ns = (uint64_t)(mono_ns() - t0);
    ksm_model_add_compute_ns(m, KSM_COMPUTE_TRAIN, r->compute_ns);
    goto out;
fail:
    ksm_errf(err, errlen, 0, "train step failed: %s", ksm_strerror(rc));
    r->n_seeds = 0;
    r->gradients_collected = false;
out:
    pthread_mutex_unlock(&m->lock);
    if (c) free(c->tf);
    free(c);
    return rc;
}
