/*
 * Training the transformer host (docs/training.md): esper's TransformerHost in train mode with
 * its seeds, through the slots of train.c.
 *
 *   h0 = dropout_0(tok_emb[ids] + pos_emb[0:T])
 *   layer l: r1 = x + dropout_{2+3l}(c_proj(sdpa_{1+3l}(c_attn(ln1(x)))))     (pre-norm)
 *            y  = r1 + dropout_{3+3l}(mlp.c_proj(gelu(mlp.c_fc(ln2(r1)))))
 *   logits = ln_f(h_L) @ tok_emb^T (the head is tied to the embedding), viewed as [B*T, V]
 *   loss = mean cross-entropy over the B*T tokens
 *
 * sdpa_{1+3l} is causal attention with dropout on its weights (torch's dropout_p); the
 * subscripts are the dropout sites of the masks (docs/training.md#dropout-masks), keyed with the
 * model's init_seed and the step's train_step. With p = 0 no dropout op runs at all. The tied
 * weight has one gradient: the head's (written first) plus the embedding's scatter-add.
 *
 * Attention's q, k and v are head views of the fused projection [B, T, 3D] (channel
 * s*D + h*hd + d); their gradients come back as three separate [B, T, D] buffers (the backward
 * op's outputs may not interleave), so the projection's backward runs as three linear backwards
 * on the weight's row blocks and sums the three input gradients.
 */
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/ops.h"
#include "kasmina/ops_backward.h"
#include "kasmina/ops_backward_nn.h"
#include "kasmina/train_impl.h"

#define LN_EPS 1e-5f

#define S(c) ksm_train_stream(c)

struct tf_layer_tape {
    ksm_tensor x, a1, qkv, o, r1, a2, f, g;
};

struct ksm_train_tf_tape {
    struct ksm_tf_layout L;
    ksm_tensor ids, h0, hL, af;
    struct tf_layer_tape layer[]; /* L.n_layer */
};

/* A new [B, T, n] arena tensor (x's batch and length). */
static int act(struct ksm_train_ctx *c, ksm_tensor *t, const ksm_tensor *x, int64_t n)
{
    int64_t shape[3] = {x->shape[0], x->shape[1], n};
    return ksm_exec_tensor(c->e, t, KSM_DTYPE_F32, 3, shape);
}

/* The dropout key of a site of this step (p from the host spec). */
static struct ksm_dropout key_of(struct ksm_train_ctx *c, uint32_t site)
{
    return (struct ksm_dropout){
        .p = c->tf->L.dropout, .seed = c->m->spec.init_seed, .step = c->step, .site = site};
}

static bool dropping(const struct ksm_train_ctx *c) { return c->tf->L.dropout > 0.0; }

/* y <- dropout of x at a site (x itself when p is 0: y must then be x). */
static int drop(struct ksm_train_ctx *c, ksm_tensor *y, const ksm_tensor *x, uint32_t site)
{
    if (!dropping(c)) return 0;
    struct ksm_dropout d = key_of(c, site);
    KSM_EXEC(c->e, ksm_op_dropout(S(c), y, x, &d));
    return 0;
}

/* A [B,H,T,hd] view of heads inside a [B,T,row] buffer, starting at element col. */
static void head_view(ksm_tensor *v, const ksm_tensor *buf, int64_t col, int64_t H, int64_t hd)
{
    int64_t B = buf->shape[0], T = buf->shape[1], row = buf->shape[2];
    *v = *buf;
    v->data = (float *)buf->data + col;
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

/* Rows [r0, r0 + n) of a contiguous tensor (a block of a weight or bias), or NULL's NULL. */
static ksm_tensor *rows_of(ksm_tensor *out, const ksm_tensor *t, int64_t r0, int64_t n)
{
    if (t == NULL) return NULL;
    if (ksm_tensor_narrow(out, t, 0, r0, n) < 0) return NULL;
    return out;
}

/* ---- causal self-attention on a fused projection ---- */

/* o [B,T,D] <- causal attention of the heads of qkv [B,T,3D]; site: the weights' dropout
 * (-1: none, as in every seed). flex: a flex_attention seed (through its block mask). */
static int attn_fwd(struct ksm_train_ctx *c, ksm_tensor *o, const ksm_tensor *qkv, int64_t H,
                    int site, struct ksm_seed *flex)
{
    int64_t D = o->shape[2], hd = D / H;
    ksm_tensor q, k, v, oh;
    head_view(&q, qkv, 0, H, hd);
    head_view(&k, qkv, D, H, hd);
    head_view(&v, qkv, 2 * D, H, hd);
    head_view(&oh, o, 0, H, hd);
    if (flex) return ksm_seed_flex_sdpa(flex, c->e, &oh, &q, &k, &v);
    if (site >= 0 && dropping(c)) {
        struct ksm_dropout d = key_of(c, (uint32_t)site);
        KSM_EXEC(c->e, ksm_op_sdpa_dropout(S(c), &oh, &q, &k, &v, true, 0.0f, &d));
    } else {
        KSM_EXEC(c->e, ksm_op_sdpa(S(c), &oh, &q, &k, &v, true, 0.0f));
    }
    return 0;
}

/* From do [B,T,D] (the gradient at o): the fused projection qkv = a @ W^T + b's gradients dW
 * [3D, D], db [3D] (each may be NULL) and, when da is given, da [B,T,D] (allocated by the
 * caller). Temporaries are released. */
static int attn_bwd(struct ksm_train_ctx *c, const ksm_tensor *dout, const ksm_tensor *qkv,
                    const ksm_tensor *a, const ksm_tensor *W, ksm_tensor *dW, ksm_tensor *db,
                    ksm_tensor *da, int64_t H, int site)
{
    struct ksm_exec *e = c->e;
    int64_t D = dout->shape[2], hd = D / H;
    size_t mk = ksm_exec_mark(e);
    ksm_tensor g[3], gh[3], q, k, v, doh, part;
    for (int i = 0; i < 3; i++) {
        KSM_TRY(ksm_train_like(c, &g[i], dout));
        head_view(&gh[i], &g[i], 0, H, hd);
    }
    head_view(&q, qkv, 0, H, hd);
    head_view(&k, qkv, D, H, hd);
    head_view(&v, qkv, 2 * D, H, hd);
    head_view(&doh, dout, 0, H, hd);
    if (site >= 0 && dropping(c)) {
        struct ksm_dropout d = key_of(c, (uint32_t)site);
        KSM_EXEC(e, ksm_op_sdpa_dropout_backward(S(c), &gh[0], &gh[1], &gh[2], &doh, &q, &k, &v,
                                                 true, 0.0f, &d));
    } else {
        KSM_EXEC(e,
                 ksm_op_sdpa_backward(S(c), &gh[0], &gh[1], &gh[2], &doh, &q, &k, &v, true, 0.0f));
    }
    if (da) KSM_TRY(ksm_train_like(c, &part, dout));
    for (int i = 0; i < 3; i++) {
        ksm_tensor wv, dwv, dbv;
        KSM_TRY(ksm_tensor_narrow(&wv, W, 0, i * D, D));
        ksm_tensor *dwp = rows_of(&dwv, dW, i * D, D), *dbp = rows_of(&dbv, db, i * D, D);
        ksm_tensor *dap = da == NULL ? NULL : (i == 0 ? da : &part);
        if (dap == NULL && dwp == NULL && dbp == NULL) continue;
        KSM_EXEC(e, ksm_op_linear_backward(S(c), dap, dwp, dbp, &g[i], a, &wv));
        if (dap == &part) KSM_EXEC(e, ksm_op_add(S(c), da, da, &part));
    }
    ksm_exec_release(e, mk);
    return 0;
}

/* ---- host layers ---- */

static int layer_fwd(struct ksm_train_ctx *c, int l, const ksm_tensor *x, ksm_tensor *y)
{
    struct ksm_exec *e = c->e;
    struct tf_layer_tape *lt = &c->tf->layer[l];
    struct ksm_tf_layer_layout P;
    ksm_host_tf_layer_layout(c->m->host, l, &P);
    const struct ksm_tf_layout *L = &c->tf->L;
    int64_t D = L->n_embd;
    lt->x = *x;
    KSM_TRY(act(c, &lt->a1, x, D));
    KSM_TRY(act(c, &lt->qkv, x, 3 * D));
    KSM_TRY(act(c, &lt->o, x, D));
    KSM_TRY(act(c, &lt->r1, x, D));
    KSM_TRY(act(c, &lt->a2, x, D));
    KSM_TRY(act(c, &lt->f, x, 4 * D));
    KSM_TRY(act(c, &lt->g, x, 4 * D));
    KSM_TRY(act(c, y, x, D));
    size_t mk = ksm_exec_mark(e);
    ksm_tensor u;
    KSM_TRY(act(c, &u, x, D));
    KSM_EXEC(e, ksm_op_layernorm(S(c), &lt->a1, x, ksm_train_hp(c, P.ln1_w),
                                 ksm_train_hp(c, P.ln1_b), LN_EPS));
    KSM_EXEC(e, ksm_op_linear(S(c), &lt->qkv, &lt->a1, ksm_train_hp(c, P.attn_w),
                              ksm_train_hp(c, P.attn_b)));
    KSM_TRY(attn_fwd(c, &lt->o, &lt->qkv, L->n_head, 1 + 3 * l, NULL));
    KSM_EXEC(e,
             ksm_op_linear(S(c), &u, &lt->o, ksm_train_hp(c, P.proj_w), ksm_train_hp(c, P.proj_b)));
    KSM_TRY(drop(c, &u, &u, 2 + 3 * (uint32_t)l));
    KSM_EXEC(e, ksm_op_add(S(c), &lt->r1, x, &u));
    KSM_EXEC(e, ksm_op_layernorm(S(c), &lt->a2, &lt->r1, ksm_train_hp(c, P.ln2_w),
                                 ksm_train_hp(c, P.ln2_b), LN_EPS));
    KSM_EXEC(
        e, ksm_op_linear(S(c), &lt->f, &lt->a2, ksm_train_hp(c, P.fc_w), ksm_train_hp(c, P.fc_b)));
    KSM_EXEC(e, ksm_op_gelu(S(c), &lt->g, &lt->f));
    KSM_EXEC(e,
             ksm_op_linear(S(c), &u, &lt->g, ksm_train_hp(c, P.mlp_w), ksm_train_hp(c, P.mlp_b)));
    KSM_TRY(drop(c, &u, &u, 3 + 3 * (uint32_t)l));
    KSM_EXEC(e, ksm_op_add(S(c), y, &lt->r1, &u));
    ksm_exec_release(e, mk);
    return 0;
}

/* dx (a new arena tensor) from dy, the gradient at the layer's output (overwritten). */
static int layer_bwd(struct ksm_train_ctx *c, int l, ksm_tensor *dy, ksm_tensor *dx)
{
    struct ksm_exec *e = c->e;
    struct tf_layer_tape *lt = &c->tf->layer[l];
    struct ksm_tf_layer_layout P;
    ksm_host_tf_layer_layout(c->m->host, l, &P);
    int64_t D = c->tf->L.n_embd;
#define G(i) ksm_train_host_grad(c, P.i)
    KSM_TRY(ksm_train_like(c, dx, &lt->x));
    size_t mk = ksm_exec_mark(e);
    ksm_tensor du, dg, da2, dr1, dout, da1;
    KSM_TRY(act(c, &du, dy, D));
    KSM_TRY(ksm_train_like(c, &dg, &lt->g));
    KSM_TRY(ksm_train_like(c, &da2, &lt->a2));
    KSM_TRY(ksm_train_like(c, &dr1, &lt->r1));
    KSM_TRY(ksm_train_like(c, &dout, &lt->o));
    KSM_TRY(ksm_train_like(c, &da1, &lt->a1));
    /* y = r1 + drop(mlp(ln2(r1))) */
    const ksm_tensor *dm = dy;
    if (dropping(c)) {
        KSM_TRY(drop(c, &du, dy, 3 + 3 * (uint32_t)l));
        dm = &du;
    }
    KSM_EXEC(e, ksm_op_linear_backward(S(c), &dg, G(mlp_w), G(mlp_b), dm, &lt->g,
                                       ksm_train_hp(c, P.mlp_w)));
    KSM_EXEC(e, ksm_op_gelu_backward(S(c), &dg, &dg, &lt->f));
    KSM_EXEC(e, ksm_op_linear_backward(S(c), &da2, G(fc_w), G(fc_b), &dg, &lt->a2,
                                       ksm_train_hp(c, P.fc_w)));
    KSM_EXEC(e, ksm_op_layernorm_backward(S(c), &dr1, G(ln2_w), G(ln2_b), &da2, &lt->r1,
                                          ksm_train_hp(c, P.ln2_w), LN_EPS));
    KSM_EXEC(e, ksm_op_add(S(c), &dr1, &dr1, dy));
    /* r1 = x + drop(c_proj(attn(ln1(x)))) */
    const ksm_tensor *dp = &dr1;
    if (dropping(c)) {
        KSM_TRY(drop(c, &du, &dr1, 2 + 3 * (uint32_t)l));
        dp = &du;
    }
    KSM_EXEC(e, ksm_op_linear_backward(S(c), &dout, G(proj_w), G(proj_b), dp, &lt->o,
                                       ksm_train_hp(c, P.proj_w)));
    KSM_TRY(attn_bwd(c, &dout, &lt->qkv, &lt->a1, ksm_train_hp(c, P.attn_w), G(attn_w), G(attn_b),
                     &da1, c->tf->L.n_head, 1 + 3 * l));
    KSM_EXEC(e, ksm_op_layernorm_backward(S(c), dx, G(ln1_w), G(ln1_b), &da1, &lt->x,
                                          ksm_train_hp(c, P.ln1_w), LN_EPS));
    KSM_EXEC(e, ksm_op_add(S(c), dx, dx, &dr1));
#undef G
    ksm_exec_release(e, mk);
    return 0;
}

/* ---- the step ---- */

int ksm_train_tf_body(struct ksm_train_ctx *c)
{
    ksm_model *m = c->m;
    struct ksm_exec *e = c->e;
    if (c->tf == NULL) { /* kept for the real pass after the measuring one */
        struct ksm_tf_layout L;
        ksm_host_tf_layout(m->host, &L);
        c->tf = calloc(1, sizeof *c->tf + (size_t)L.n_layer * sizeof(struct tf_layer_tape));
        if (c->tf == NULL) return KSM_ENOMEM;
        c->tf->L = L;
    }
    struct ksm_train_tf_tape *tp = c->tf;
    const struct ksm_tf_layout *L = &tp->L;
    KSM_TRY(ksm_train_alloc_grads(c));
    int64_t B = c->B, T = c->x_host->shape[1], D = L->n_embd, V = L->vocab, rows = c->rows;
    KSM_TRY(ksm_exec_tensor(e, &tp->ids, c->x_host->dtype, 2, c->x_host->shape));
    KSM_TRY(ksm_exec_tensor(e, &c->labels, KSM_DTYPE_I64, 1, &rows));
    if (!e->measure) {
        KSM_TRY(ksm_stream_memcpy_async(S(c), tp->ids.data, c->x_host->data,
                                        ksm_tensor_nbytes(&tp->ids), KSM_COPY_H2D));
        KSM_TRY(ksm_stream_memcpy_async(S(c), c->labels.data, c->labels_host,
                                        (size_t)rows * sizeof(int64_t), KSM_COPY_H2D));
    }
    /* forward: the embedding (op 0), layers (op l + 1), each slot right after its boundary */
    int n_ops = L->n_layer + 1;
    int slot_after[KSM_TRAIN_MAX_HOST_P];
    for (int t = 0; t < n_ops; t++) slot_after[t] = -1;
    for (int o = 0; o < m->n_slots; o++) {
        int idx = m->exec_order[o];
        slot_after[ksm_host_boundary_op(m->host, m->slots[idx].inj->exec_index)] = idx;
    }
    ksm_tensor pos;
    KSM_TRY(ksm_tensor_narrow(&pos, ksm_train_hp(c, L->pos_emb), 0, 0, T));
    KSM_TRY(ksm_exec_tensor(e, &tp->h0, KSM_DTYPE_F32, 3, (const int64_t[]){B, T, D}));
    KSM_EXEC(e, ksm_op_embedding(S(c), &tp->h0, ksm_train_hp(c, L->tok_emb), &tp->ids));
    KSM_EXEC(e, ksm_op_add(S(c), &tp->h0, &tp->h0, &pos));
    KSM_TRY(drop(c, &tp->h0, &tp->h0, 0));
    ksm_tensor cur = tp->h0;
    if (slot_after[0] >= 0) { /* not a boundary today; kept general */
        ksm_tensor y;
        KSM_TRY(ksm_train_slot_fwd(c, slot_after[0], &cur, &y));
        cur = y;
    }
    for (int t = 1; t < n_ops; t++) {
        ksm_tensor y;
        KSM_TRY(layer_fwd(c, t - 1, &cur, &y));
        cur = y;
        if (slot_after[t] >= 0) {
            KSM_TRY(ksm_train_slot_fwd(c, slot_after[t], &cur, &y));
            cur = y;
        }
    }
    tp->hL = cur;
    KSM_TRY(ksm_train_like(c, &tp->af, &cur));
    KSM_TRY(ksm_exec_tensor(e, &c->logits, KSM_DTYPE_F32, 3, (const int64_t[]){B, T, V}));
    KSM_EXEC(e, ksm_op_layernorm(S(c), &tp->af, &cur, ksm_train_hp(c, L->lnf_w),
                                 ksm_train_hp(c, L->lnf_b), LN_EPS));
    KSM_EXEC(e, ksm_op_linear(S(c), &c->logits, &tp->af, ksm_train_hp(c, L->tok_emb), NULL));
    ksm_tensor lg2, lrows, loss, amax;
    KSM_TRY(ksm_tensor_reshape(&lg2, &c->logits, 2, (const int64_t[]){rows, V}));
    KSM_TRY(ksm_exec_tensor(e, &lrows, KSM_DTYPE_F32, 1, &rows));
    KSM_TRY(ksm_exec_tensor(e, &loss, KSM_DTYPE_F32, 0, NULL));
    KSM_TRY(ksm_exec_tensor(e, &amax, KSM_DTYPE_I64, 1, &rows));
    KSM_EXEC(e, ksm_op_cross_entropy(S(c), &lrows, &lg2, &c->labels, -100));
    KSM_EXEC(e, ksm_op_mean(S(c), &loss, &lrows, 0, 1));
    KSM_EXEC(e, ksm_op_argmax(S(c), &amax, &lg2));
    if (!e->measure) {
        KSM_TRY(ksm_stream_memcpy_async(S(c), &c->loss, loss.data, sizeof(float), KSM_COPY_D2H));
        KSM_TRY(ksm_stream_memcpy_async(S(c), c->argmax_host, amax.data,
                                        (size_t)rows * sizeof(int64_t), KSM_COPY_D2H));
    }
    /* backward: the loss, the tied head (its gradient first), ln_f */
    ksm_tensor *gtok = ksm_train_host_grad(c, L->tok_emb);
    ksm_tensor dlogits, dl3, daf, dcur;
    KSM_TRY(ksm_train_like(c, &dlogits, &lg2));
    KSM_TRY(ksm_tensor_reshape(&dl3, &dlogits, 3, (const int64_t[]){B, T, V}));
    KSM_TRY(ksm_train_like(c, &daf, &tp->af));
    KSM_TRY(ksm_train_like(c, &dcur, &cur));
    KSM_EXEC(e, ksm_op_cross_entropy_backward(S(c), &dlogits, &lg2, &c->labels, -100, 1.0f));
    KSM_EXEC(e, ksm_op_linear_backward(S(c), &daf, gtok, NULL, &dl3, &tp->af,
                                       ksm_train_hp(c, L->tok_emb)));
    KSM_EXEC(e, ksm_op_layernorm_backward(S(c), &dcur, ksm_train_host_grad(c, L->lnf_w),
                                          ksm_train_host_grad(c, L->lnf_b), &daf, &tp->hL,
                                          ksm_train_hp(c, L->lnf_w), LN_EPS));
    for (int t = n_ops - 1; t >= 1; t--) {
        if (slot_after[t] >= 0) {
            ksm_tensor dh;
            KSM_TRY(ksm_train_slot_bwd(c, slot_after[t], &dcur, &dh));
            dcur = dh;
        }
        ksm_tensor dx;
        KSM_TRY(layer_bwd(c, t - 1, &dcur, &dx));
        dcur = dx;
    }
    if (slot_after[0] >= 0) {
        ksm_tensor dh;
        KSM_TRY(ksm_train_slot_bwd(c, slot_after[0], &dcur, &dh));
        dcur = dh;
    }
    /* the embeddings: dropout's mask, tok_emb's scatter-add summed into the head's gradient,
     * pos_emb's rows [0, T) the batch sum (the other rows 0, as an embedding's dense grad) */
    KSM_TRY(drop(c, &dcur, &dcur, 0));
    size_t mk = ksm_exec_mark(e);
    ksm_tensor demb, gpos;
    KSM_TRY(ksm_train_like(c, &demb, gtok));
    KSM_EXEC(e, ksm_op_embedding_backward(S(c), &demb, &dcur, &tp->ids));
    KSM_EXEC(e, ksm_op_add(S(c), gtok, gtok, &demb));
    ksm_tensor *gp = ksm_train_host_grad(c, L->pos_emb);
    KSM_EXEC(e, ksm_op_fill(S(c), gp, 0.0));
    KSM_TRY(ksm_tensor_narrow(&gpos, gp, 0, 0, T));
    KSM_EXEC(e, ksm_op_add_backward(S(c), NULL, &gpos, &dcur, &dcur, &pos));
    ksm_exec_release(e, mk);
    return 0;
}

/* ---- seeds (kasmina-behaviour.md s4.3), x [B,T,D] ---- */

int ksm_train_tf_seed_fwd(struct ksm_train_ctx *c, int slot, const ksm_tensor *x, ksm_tensor *y)
{
    struct ksm_seed *sd = c->m->slots[slot].s.seed;
    struct ksm_train_slot_tape *st = &c->slots[slot];
    struct ksm_exec *e = c->e;
    KSM_TRY(ksm_train_like(c, y, x));
    switch (sd->bp->index) {
    case KSM_BP_NOOP: KSM_EXEC(e, ksm_op_copy(S(c), y, x)); return 0;
    case KSM_BP_NORM: /* x + tanh(scale) * (LN(x) - x); c = tanh(scale), u = LN(x) - x */
        KSM_TRY(ksm_train_like(c, &st->u, x));
        KSM_TRY(ksm_exec_tensor(e, &st->c, KSM_DTYPE_F32, 1, (const int64_t[]){1}));
        KSM_EXEC(e, ksm_op_layernorm(S(c), &st->u, x, ksm_seed_param(sd, 1), ksm_seed_param(sd, 2),
                                     KSM_NORM_EPS));
        KSM_EXEC(e, ksm_op_sub(S(c), &st->u, &st->u, x));
        KSM_EXEC(e, ksm_op_tanh(S(c), &st->c, ksm_seed_param(sd, 0)));
        KSM_EXEC(e, ksm_op_mul(S(c), y, &st->c, &st->u));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, y));
        return 0;
    case KSM_BP_LORA:
    case KSM_BP_LORA_LARGE: { /* x + up(down(x)); v2[0] = down(x) */
        size_t mk;
        ksm_tensor u;
        KSM_TRY(act(c, &st->v2[0], x, sd->hidden));
        mk = ksm_exec_mark(e);
        KSM_TRY(ksm_train_like(c, &u, x));
        KSM_EXEC(e, ksm_op_linear(S(c), &st->v2[0], x, ksm_seed_param(sd, 0), NULL));
        KSM_EXEC(e, ksm_op_linear(S(c), &u, &st->v2[0], ksm_seed_param(sd, 1), NULL));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &u));
        ksm_exec_release(e, mk);
        return 0;
    }
    case KSM_BP_MLP_SMALL:
    case KSM_BP_MLP: { /* x + fc2(gelu(fc1(x))); v2[0] = fc1(x), v2[1] = gelu */
        size_t mk;
        ksm_tensor u;
        KSM_TRY(act(c, &st->v2[0], x, sd->hidden));
        KSM_TRY(act(c, &st->v2[1], x, sd->hidden));
        mk = ksm_exec_mark(e);
        KSM_TRY(ksm_train_like(c, &u, x));
        KSM_EXEC(e,
                 ksm_op_linear(S(c), &st->v2[0], x, ksm_seed_param(sd, 0), ksm_seed_param(sd, 1)));
        KSM_EXEC(e, ksm_op_gelu(S(c), &st->v2[1], &st->v2[0]));
        KSM_EXEC(e,
                 ksm_op_linear(S(c), &u, &st->v2[1], ksm_seed_param(sd, 2), ksm_seed_param(sd, 3)));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &u));
        ksm_exec_release(e, mk);
        return 0;
    }
    case KSM_BP_ATTENTION:
    case KSM_BP_FLEX_ATTENTION: { /* x + proj(causal attention); v2[0] = qkv, v2[1] = o */
        size_t mk;
        ksm_tensor u;
        int64_t D = x->shape[2];
        KSM_TRY(act(c, &st->v2[0], x, 3 * D));
        KSM_TRY(act(c, &st->v2[1], x, D));
        mk = ksm_exec_mark(e);
        KSM_TRY(ksm_train_like(c, &u, x));
        KSM_EXEC(e,
                 ksm_op_linear(S(c), &st->v2[0], x, ksm_seed_param(sd, 0), ksm_seed_param(sd, 1)));
        KSM_TRY(attn_fwd(c, &st->v2[1], &st->v2[0], KSM_ATTN_HEADS, -1,
                         sd->bp->index == KSM_BP_FLEX_ATTENTION ? sd : NULL));
        KSM_EXEC(e,
                 ksm_op_linear(S(c), &u, &st->v2[1], ksm_seed_param(sd, 2), ksm_seed_param(sd, 3)));
        KSM_EXEC(e, ksm_op_add(S(c), y, x, &u));
        ksm_exec_release(e, mk);
        return 0;
    }
    default: return KSM_EUNSUPPORTED;
    }
}

int ksm_train_tf_seed_bwd(struct ksm_train_ctx *c, int slot, const ksm_tensor *dy, ksm_tensor *dx)
{
    struct ksm_seed *sd = c->m->slots[slot].s.seed;
    struct ksm_train_slot_tape *st = &c->slots[slot];
    struct ksm_exec *e = c->e;
    const ksm_tensor *x = &st->h;
#define SG(k) ksm_train_seed_grad(c, slot, k)
    if (dx) KSM_TRY(ksm_train_like(c, dx, x));
    size_t mk = ksm_exec_mark(e);
    ksm_tensor dxs; /* the seed branch's input gradient (residual seeds: dx = dy + dxs) */
    if (dx) KSM_TRY(ksm_train_like(c, &dxs, x));
    ksm_tensor *pdx = dx ? &dxs : NULL;
    switch (sd->bp->index) {
    case KSM_BP_NOOP:
        if (dx) KSM_EXEC(e, ksm_op_copy(S(c), dx, dy));
        ksm_exec_release(e, mk);
        return 0;
    case KSM_BP_NORM: {
        /* y = x + t*u, u = LN(x) - x: dt = sum(dy*u), du = dy*t; dx = dy - du + LN'(du) */
        ksm_tensor dt, du;
        KSM_TRY(ksm_exec_tensor(e, &dt, KSM_DTYPE_F32, 1, (const int64_t[]){1}));
        KSM_TRY(ksm_train_like(c, &du, x));
        KSM_EXEC(e, ksm_op_mul_backward(S(c), &dt, &du, dy, &st->c, &st->u));
        if (SG(0)) KSM_EXEC(e, ksm_op_tanh_backward(S(c), SG(0), &dt, &st->c));
        if (pdx || SG(1) || SG(2))
            KSM_EXEC(e, ksm_op_layernorm_backward(S(c), pdx, SG(1), SG(2), &du, x,
                                                  ksm_seed_param(sd, 1), KSM_NORM_EPS));
        if (dx) {
            KSM_EXEC(e, ksm_op_sub(S(c), dx, dy, &du));
            KSM_EXEC(e, ksm_op_add(S(c), dx, dx, &dxs));
        }
        ksm_exec_release(e, mk);
        return 0;
    }
    case KSM_BP_LORA:
    case KSM_BP_LORA_LARGE: {
        ksm_tensor dh;
        KSM_TRY(ksm_train_like(c, &dh, &st->v2[0]));
        KSM_EXEC(e, ksm_op_linear_backward(S(c), &dh, SG(1), NULL, dy, &st->v2[0],
                                           ksm_seed_param(sd, 1)));
        if (pdx || SG(0))
            KSM_EXEC(e,
                     ksm_op_linear_backward(S(c), pdx, SG(0), NULL, &dh, x, ksm_seed_param(sd, 0)));
        break;
    }
    case KSM_BP_MLP_SMALL:
    case KSM_BP_MLP: {
        ksm_tensor dg;
        KSM_TRY(ksm_train_like(c, &dg, &st->v2[1]));
        KSM_EXEC(e, ksm_op_linear_backward(S(c), &dg, SG(2), SG(3), dy, &st->v2[1],
                                           ksm_seed_param(sd, 2)));
        KSM_EXEC(e, ksm_op_gelu_backward(S(c), &dg, &dg, &st->v2[0]));
        if (pdx || SG(0) || SG(1))
            KSM_EXEC(
                e, ksm_op_linear_backward(S(c), pdx, SG(0), SG(1), &dg, x, ksm_seed_param(sd, 0)));
        break;
    }
    case KSM_BP_ATTENTION:
    case KSM_BP_FLEX_ATTENTION: { /* flex_attention's output is causal SDPA's: same backward */
        ksm_tensor dout;
        KSM_TRY(ksm_train_like(c, &dout, &st->v2[1]));
        KSM_EXEC(e, ksm_op_linear_backward(S(c), &dout, SG(2), SG(3), dy, &st->v2[1],
                                           ksm_seed_param(sd, 2)));
        if (pdx || SG(0) || SG(1))
            KSM_TRY(attn_bwd(c, &dout, &st->v2[0], x, ksm_seed_param(sd, 0), SG(0), SG(1), pdx,
                             KSM_ATTN_HEADS, -1));
        break;
    }
    default: return KSM_EUNSUPPORTED;
    }
#undef SG
    if (dx) KSM_EXEC(e, ksm_op_add(S(c), dx, dy, &dxs));
    ksm_exec_release(e, mk);
    return 0;
}

/* ---- validation ---- */

int ksm_train_tf_check_targets(ksm_model *m, const ksm_tensor *x, const ksm_tensor *t, char *err,
                               size_t errlen)
{
    int64_t B = x->shape[0], T = x->shape[1];
    if (t == NULL || t->data == NULL)
        return ksm_errf(err, errlen, KSM_EINVAL, "targets are required");
    if (t->dtype != KSM_DTYPE_I64 && t->dtype != KSM_DTYPE_I32)
        return ksm_errf(err, errlen, KSM_EDTYPE, "targets must be I64 or I32 token ids");
    if (t->ndim != 2 || t->shape[0] != B || t->shape[1] != T)
        return ksm_errf(err, errlen, KSM_ESHAPE,
                        "targets must have shape [%lld, %lld] (one token id per input position)",
                        (long long)B, (long long)T);
    if (!ksm_tensor_is_contiguous(t))
        return ksm_errf(err, errlen, KSM_EINVAL, "targets must be contiguous");
    int64_t limit = m->spec.transformer.vocab_size;
    for (int64_t i = 0; i < B * T; i++) {
        int64_t v = t->dtype == KSM_DTYPE_I64 ? ((const int64_t *)t->data)[i]
                                              : ((const int32_t *)t->data)[i];
        if (v < 0 || v >= limit)
            return ksm_errf(err, errlen, KSM_EINVAL,
                            "targets[%lld][%lld] = %lld is outside the vocabulary [0, %lld)",
                            (long long)(i / T), (long long)(i % T), (long long)v, (long long)limit);
    }
    return 0;
}
