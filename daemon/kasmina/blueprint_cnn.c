/*
 * CNN blueprint forwards (docs/models.md#cnn-blueprints) on x [B,C,H,W]. Every temporary comes from
 * the execution arena and every op goes through KSM_EXEC, so a measure pass enqueues nothing. The
 * output y is allocated first and the temporaries after it are released stack-wise at the end.
 */
#include <stdint.h>

#include "kasmina/blueprint_impl.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

int ksm_bp_like(struct ksm_exec *e, ksm_tensor *t, const ksm_tensor *x)
{
    return ksm_exec_tensor(e, t, x->dtype, x->ndim, x->shape);
}

/* y[B,Co,H,W] <- conv2d(x, w) with "same" padding (k // 2), no bias; the workspace is arena
 * scratch released right after the op (the stream runs in order). */
static int conv(struct ksm_exec *e, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                int groups)
{
    int pad = (int)(w->shape[2] / 2);
    size_t ws_bytes = ksm_op_conv2d_workspace_size(x, w, pad, pad, groups);
    size_t m = ksm_exec_mark(e);
    void *ws;
    KSM_TRY(ksm_exec_scratch(e, ws_bytes, &ws));
    KSM_EXEC(e, ksm_op_conv2d(e->stream, y, x, w, NULL, pad, pad, groups, ws, ws_bytes));
    ksm_exec_release(e, m);
    return 0;
}

/* A new [B,co,H,W] arena tensor. */
static int act(struct ksm_exec *e, ksm_tensor *t, const ksm_tensor *x, int64_t co)
{
    int64_t shape[4] = {x->shape[0], co, x->shape[2], x->shape[3]};
    return ksm_exec_tensor(e, t, KSM_DTYPE_F32, 4, shape);
}

/* SeedConvBlock: u <- relu(GN(conv(x, w), gw, gb)) (u: a new arena tensor). */
static int conv_block(struct ksm_seed *s, struct ksm_exec *e, ksm_tensor *u, const ksm_tensor *x,
                      int k_conv)
{
    KSM_TRY(ksm_bp_like(e, u, x));
    KSM_TRY(conv(e, u, x, ksm_seed_param(s, k_conv), 1));
    KSM_EXEC(e, ksm_op_groupnorm(e->stream, u, u, s->groups, ksm_seed_param(s, k_conv + 1),
                                 ksm_seed_param(s, k_conv + 2), KSM_NORM_EPS));
    KSM_EXEC(e, ksm_op_relu(e->stream, u, u));
    return 0;
}

/* x + tanh(scale) * (GN(x) - x) */
static int fwd_norm(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
{
    ksm_tensor d, t;
    KSM_TRY(ksm_bp_like(e, &d, x));
    KSM_TRY(ksm_exec_tensor(e, &t, KSM_DTYPE_F32, 1, (const int64_t[]){1}));
    KSM_EXEC(e, ksm_op_groupnorm(e->stream, &d, x, s->groups, ksm_seed_param(s, 1),
                                 ksm_seed_param(s, 2), KSM_NORM_EPS));
    KSM_EXEC(e, ksm_op_sub(e->stream, &d, &d, x));
    KSM_EXEC(e, ksm_op_tanh(e->stream, &t, ksm_seed_param(s, 0)));
    KSM_EXEC(e, ksm_op_mul(e->stream, &d, &t, &d));
    KSM_EXEC(e, ksm_op_add(e->stream, y, x, &d));
    return 0;
}

/* SE: x * sigmoid(fc2(relu(fc0(mean_hw(x))))) per channel. */
static int fwd_se(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
{
    int64_t B = x->shape[0], C = x->shape[1];
    ksm_tensor p, h, z, zv;
    KSM_TRY(ksm_exec_tensor(e, &p, KSM_DTYPE_F32, 2, (const int64_t[]){B, C}));
    KSM_TRY(ksm_exec_tensor(e, &h, KSM_DTYPE_F32, 2, (const int64_t[]){B, s->hidden}));
    KSM_TRY(ksm_exec_tensor(e, &z, KSM_DTYPE_F32, 2, (const int64_t[]){B, C}));
    KSM_TRY(ksm_tensor_reshape(&zv, &z, 4, (const int64_t[]){B, C, 1, 1}));
    KSM_EXEC(e, ksm_op_mean(e->stream, &p, x, 2, 4));
    KSM_EXEC(e, ksm_op_linear(e->stream, &h, &p, ksm_seed_param(s, 0), NULL));
    KSM_EXEC(e, ksm_op_relu(e->stream, &h, &h));
    KSM_EXEC(e, ksm_op_linear(e->stream, &z, &h, ksm_seed_param(s, 1), ksm_seed_param(s, 2)));
    KSM_EXEC(e, ksm_op_sigmoid(e->stream, &z, &z));
    KSM_EXEC(e, ksm_op_mul(e->stream, y, x, &zv));
    return 0;
}

/* x + relu(GN(pw(dw(x)))) */
static int fwd_depthwise(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
{
    ksm_tensor a, b;
    KSM_TRY(ksm_bp_like(e, &a, x));
    KSM_TRY(ksm_bp_like(e, &b, x));
    KSM_TRY(conv(e, &a, x, ksm_seed_param(s, 0), s->channels));
    KSM_TRY(conv(e, &b, &a, ksm_seed_param(s, 1), 1));
    KSM_EXEC(e, ksm_op_groupnorm(e->stream, &b, &b, s->groups, ksm_seed_param(s, 2),
                                 ksm_seed_param(s, 3), KSM_NORM_EPS));
    KSM_EXEC(e, ksm_op_relu(e->stream, &b, &b));
    KSM_EXEC(e, ksm_op_add(e->stream, y, x, &b));
    return 0;
}

/* x + GN(up(relu(conv(relu(down(x)))))) */
static int fwd_bottleneck(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x,
                          ksm_tensor *y)
{
    ksm_tensor d, c, u;
    KSM_TRY(act(e, &d, x, s->hidden));
    KSM_TRY(act(e, &c, x, s->hidden));
    KSM_TRY(ksm_bp_like(e, &u, x));
    KSM_TRY(conv(e, &d, x, ksm_seed_param(s, 0), 1));
    KSM_EXEC(e, ksm_op_relu(e->stream, &d, &d));
    KSM_TRY(conv(e, &c, &d, ksm_seed_param(s, 1), 1));
    KSM_EXEC(e, ksm_op_relu(e->stream, &c, &c));
    KSM_TRY(conv(e, &u, &c, ksm_seed_param(s, 2), 1));
    KSM_EXEC(e, ksm_op_groupnorm(e->stream, &u, &u, s->groups, ksm_seed_param(s, 3),
                                 ksm_seed_param(s, 4), KSM_NORM_EPS));
    KSM_EXEC(e, ksm_op_add(e->stream, y, x, &u));
    return 0;
}

int ksm_seed_forward_cnn(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
{
    KSM_TRY(ksm_bp_like(e, y, x));
    size_t m = ksm_exec_mark(e);
    int rc;
    switch (s->bp->index) {
    case KSM_BP_NOOP: {
        KSM_EXEC(e, ksm_op_copy(e->stream, y, x));
        rc = 0;
        break;
    }
    case KSM_BP_NORM: rc = fwd_norm(s, e, x, y); break;
    case KSM_BP_ATTENTION: rc = fwd_se(s, e, x, y); break;
    case KSM_BP_DEPTHWISE: rc = fwd_depthwise(s, e, x, y); break;
    case KSM_BP_BOTTLENECK: rc = fwd_bottleneck(s, e, x, y); break;
    case KSM_BP_CONV_SMALL:
    case KSM_BP_CONV_LIGHT: {
        /* x + relu(GN(conv(x))): 1x1 for conv_small, 3x3 for conv_light */
        ksm_tensor u;
        rc = conv_block(s, e, &u, x, 0);
        if (rc == 0) KSM_EXEC(e, ksm_op_add(e->stream, y, x, &u));
        break;
    }
    case KSM_BP_CONV_HEAVY: {
        /* x + blk2(blk1(x)) */
        ksm_tensor u1, u2;
        rc = conv_block(s, e, &u1, x, 0);
        if (rc == 0) rc = conv_block(s, e, &u2, &u1, 3);
        if (rc == 0) KSM_EXEC(e, ksm_op_add(e->stream, y, x, &u2));
        break;
    }
    default: rc = KSM_EINTERNAL; break;
    }
    ksm_exec_release(e, m);
    return rc;
}
