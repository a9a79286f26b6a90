/*
 * Transformer blueprint forwards (docs/models.md#transformer-blueprints) on x [B,T,D]. Same arena
 * discipline as blueprint_cnn.c.
 */
#include <stdint.h>

#include "kasmina/blueprint_impl.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

/* A new [B,T,n] arena tensor. */
static int act(struct ksm_exec *e, ksm_tensor *t, const ksm_tensor *x, int64_t n)
{
    int64_t shape[3] = {x->shape[0], x->shape[1], n};
    return ksm_exec_tensor(e, t, KSM_DTYPE_F32, 3, shape);
}

/* x + tanh(scale) * (LN(x) - x) */
static int fwd_norm(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
{
    ksm_tensor d, t;
    KSM_TRY(ksm_bp_like(e, &d, x));
    KSM_TRY(ksm_exec_tensor(e, &t, KSM_DTYPE_F32, 1, (const int64_t[]){1}));
    KSM_EXEC(e, ksm_op_layernorm(e->stream, &d, x, ksm_seed_param(s, 1), ksm_seed_param(s, 2),
                                 KSM_NORM_EPS));
    KSM_EXEC(e, ksm_op_sub(e->stream, &d, &d, x));
    KSM_EXEC(e, ksm_op_tanh(e->stream, &t, ksm_seed_param(s, 0)));
    KSM_EXEC(e, ksm_op_mul(e->stream, &d, &t, &d));
    KSM_EXEC(e, ksm_op_add(e->stream, y, x, &d));
    return 0;
}

/* lora: x + up(down(x)); mlp: x + fc2(gelu(fc1(x))). Params: w1 [, b1], w2 [, b2]. */
static int fwd_two_linear(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x,
                          ksm_tensor *y, bool biased, bool gelu)
{
    ksm_tensor h, u;
    KSM_TRY(act(e, &h, x, s->hidden));
    KSM_TRY(ksm_bp_like(e, &u, x));
    const ksm_tensor *w1 = ksm_seed_param(s, 0), *b1 = biased ? ksm_seed_param(s, 1) : NULL;
    const ksm_tensor *w2 = ksm_seed_param(s, biased ? 2 : 1);
    const ksm_tensor *b2 = biased ? ksm_seed_param(s, 3) : NULL;
    KSM_EXEC(e, ksm_op_linear(e->stream, &h, x, w1, b1));
    if (gelu) KSM_EXEC(e, ksm_op_gelu(e->stream, &h, &h));
    KSM_EXEC(e, ksm_op_linear(e->stream, &u, &h, w2, b2));
    KSM_EXEC(e, ksm_op_add(e->stream, y, x, &u));
    return 0;
}

/* A [B,H,T,hd] view of heads inside a [B,T,row] buffer starting at element col. */
static void head_view(ksm_tensor *v, const ksm_tensor *buf, int64_t col, int64_t H, int64_t hd)
{
    int64_t B = buf->shape[0], T = buf->shape[1], row = buf->shape[2];
    *v = *buf;
    v->data = (char *)buf->data + col * (int64_t)ksm_dtype_size(buf->dtype);
    v->ndim = 4;
    v->shape[0] = B;
    v->shape[1] = H;
    v->shape[2] = T;
    v->shape[3] = hd;
    v->stride[0] = T * row;
    v->stride[1] = hd;
    v->stride[2] = row;
    v->stride[3] = 1;
}

/* x + proj(causal_sdpa(split_heads(qkv(x)))); 4 heads; flex goes through the block mask. */
static int fwd_attention(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y,
                         bool flex)
{
    int64_t D = s->channels, H = KSM_ATTN_HEADS, hd = D / H;
    ksm_tensor qkv, o, u, q, k, v, ov;
    KSM_TRY(act(e, &qkv, x, 3 * D));
    KSM_TRY(ksm_bp_like(e, &o, x));
    KSM_TRY(ksm_bp_like(e, &u, x));
    KSM_EXEC(e, ksm_op_linear(e->stream, &qkv, x, ksm_seed_param(s, 0), ksm_seed_param(s, 1)));
    /* qkv.view(B,T,3,H,hd): channel s*D + h*hd + d */
    head_view(&q, &qkv, 0, H, hd);
    head_view(&k, &qkv, D, H, hd);
    head_view(&v, &qkv, 2 * D, H, hd);
    head_view(&ov, &o, 0, H, hd); /* o [B,T,H,hd] = merged heads [B,T,D] */
    if (x->shape[1] > 0) {
        if (flex)
            KSM_TRY(ksm_seed_flex_sdpa(s, e, &ov, &q, &k, &v));
        else
            KSM_EXEC(e, ksm_op_sdpa(e->stream, &ov, &q, &k, &v, true, 0.0f));
    }
    KSM_EXEC(e, ksm_op_linear(e->stream, &u, &o, ksm_seed_param(s, 2), ksm_seed_param(s, 3)));
    KSM_EXEC(e, ksm_op_add(e->stream, y, x, &u));
    return 0;
}

int ksm_seed_forward_tf(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
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
    case KSM_BP_LORA:
    case KSM_BP_LORA_LARGE: rc = fwd_two_linear(s, e, x, y, false, false); break;
    case KSM_BP_MLP_SMALL:
    case KSM_BP_MLP: rc = fwd_two_linear(s, e, x, y, true, true); break;
    case KSM_BP_ATTENTION: rc = fwd_attention(s, e, x, y, false); break;
    case KSM_BP_FLEX_ATTENTION: rc = fwd_attention(s, e, x, y, true); break;
    default: rc = KSM_EINTERNAL; break;
    }
    ksm_exec_release(e, m);
    return rc;
}
