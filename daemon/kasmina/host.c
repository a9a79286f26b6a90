/*
 * Host networks (host.h): CNNHost (docs/models.md#cnnhost) and TransformerHost (docs/models.md) in
 * eval mode.
 *
 * Both hosts are a timeline of ops, each of which maps one activation to the next:
 *   CNN:         block 0, pool 0, block 1, pool 1, ..., block P, block P+1, ... (P = pool_layers)
 *   transformer: embed, layer 0, layer 1, ..., layer L-1
 * Boundary k (an injection point's exec_index) sits right after timeline op bpos(k): CNN
 * bpos(k) = k (every op ends at an injection point); transformer bpos(k) = (k+1)·L/S. Routing
 * from boundary a to boundary b runs ops bpos(a)+1 .. bpos(b); bpos(-1) = -1.
 *
 * Memory: the output of a range is allocated first (exact shape), then intermediates ping-pong
 * between two arena buffers (CNN; the transformer updates one buffer in place) and the
 * temporaries of each op are released as soon as it is enqueued. So the arena peak is the
 * output plus about two activations plus one op's temporaries, independent of depth.
 */
#include "kasmina/host.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/ops.h"

#define BN_EPS 1e-5f
#define LN_EPS 1e-5f

/* Upper bounds that keep a bad spec from declaring absurd amounts of memory. */
#define CNN_MAX_BLOCKS   16
#define CNN_MAX_CHANNELS 4096
#define CNN_MAX_KERNEL   15
#define MAX_CLASSES      (1u << 20)
#define TF_MAX_VOCAB     (1u << 20)
#define TF_MAX_EMBD      4096
#define TF_MAX_LAYERS    64
#define TF_MAX_BLOCK     8192
#define HOST_MAX_PARAMS  (INT64_C(1) << 31) /* elements (8 GiB of F32) */
#define HEAD_DIM_MAX     256                /* KSM_SDPA_MAX_HEAD_DIM */

struct cnn_block_params {
    int conv_w, bn_w, bn_b, bn_mean, bn_var;
};

struct tf_layer_params {
    int ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mlp_w, mlp_b;
};

struct ksm_host {
    enum ksm_topology topology;
    struct ksm_cnn_spec cnn;
    struct ksm_transformer_spec tf;
    struct ksm_params params;
    int n_inj;
    struct ksm_injection inj[KSM_MAX_SLOTS];
    int n_ops; /* timeline length */
    /* CNN */
    struct cnn_block_params blocks[CNN_MAX_BLOCKS];
    int cls_w, cls_b;
    /* transformer */
    struct tf_layer_params *layers;
    int tok_emb, pos_emb, lnf_w, lnf_b, head_w;
};

/* ======================= spec resolution ======================= */

int ksm_host_resolve_cnn(struct ksm_cnn_spec *s, bool pool_layers_set, char *err, size_t errlen)
{
    struct ksm_cnn_spec r = *s;
    if (r.num_classes == 0) r.num_classes = 10;
    if (r.n_blocks == 0) r.n_blocks = 3;
    if (r.base_channels == 0) r.base_channels = 32;
    if (r.kernel_size == 0) r.kernel_size = 3;
    if (r.in_channels == 0) r.in_channels = 3;
    /* -1 always means n_blocks; an unset 0 is "not given" (an explicit 0 means no pooling). */
    if (r.pool_layers == -1 || (!pool_layers_set && r.pool_layers == 0))
        r.pool_layers = (int32_t)r.n_blocks;

    if (r.n_blocks < 2 || r.n_blocks > CNN_MAX_BLOCKS) {
        ksm_errf(err, errlen, 0, "cnn.n_blocks is %u; it must be between 2 and %d.", r.n_blocks,
                 CNN_MAX_BLOCKS);
        return KSM_EINVAL;
    }
    if (r.base_channels < 1 ||
        (uint64_t)r.base_channels << (r.n_blocks - 1) > (uint64_t)CNN_MAX_CHANNELS) {
        ksm_errf(
            err, errlen, 0,
            "cnn.base_channels is %u; it must be at least 1 and base_channels * 2^(n_blocks-1) "
            "(the last block's channels) at most %d.",
            r.base_channels, CNN_MAX_CHANNELS);
        return KSM_EINVAL;
    }
    if (r.num_classes < 1 || r.num_classes > MAX_CLASSES) {
        ksm_errf(err, errlen, 0, "cnn.num_classes is %u; it must be between 1 and %u.",
                 r.num_classes, MAX_CLASSES);
        return KSM_EINVAL;
    }
    if (r.kernel_size % 2 == 0 || r.kernel_size > CNN_MAX_KERNEL) {
        ksm_errf(err, errlen, 0, "cnn.kernel_size is %u; it must be odd and between 1 and %d.",
                 r.kernel_size, CNN_MAX_KERNEL);
        return KSM_EINVAL;
    }
    if (r.pool_layers < 0 || r.pool_layers > (int32_t)r.n_blocks) {
        ksm_errf(err, errlen, 0,
                 "cnn.pool_layers is %d; it must be between 0 and n_blocks (%u), or -1 for "
                 "n_blocks.",
                 (int)r.pool_layers, r.n_blocks);
        return KSM_EINVAL;
    }
    if (r.in_channels < 1 || r.in_channels > CNN_MAX_CHANNELS) {
        ksm_errf(err, errlen, 0, "cnn.in_channels is %u; it must be between 1 and %d.",
                 r.in_channels, CNN_MAX_CHANNELS);
        return KSM_EINVAL;
    }
    *s = r;
    return 0;
}

int ksm_host_resolve_transformer(struct ksm_transformer_spec *s, char *err, size_t errlen)
{
    struct ksm_transformer_spec r = *s;
    if (r.vocab_size == 0) r.vocab_size = 50257;
    if (r.n_embd == 0) r.n_embd = 384;
    if (r.n_head == 0) r.n_head = 6;
    if (r.n_layer == 0) r.n_layer = 6;
    if (r.block_size == 0) r.block_size = 256;
    if (r.num_segments == 0) r.num_segments = 3;
    if (!r.dropout_set) r.dropout = 0.1; /* esper's TransformerHost(dropout=0.1) */
    r.dropout_set = true;

    if (r.vocab_size < 1 || r.vocab_size > TF_MAX_VOCAB) {
        ksm_errf(err, errlen, 0, "transformer.vocab_size is %u; it must be between 1 and %u.",
                 r.vocab_size, TF_MAX_VOCAB);
        return KSM_EINVAL;
    }
    if (r.n_embd < 1 || r.n_embd > TF_MAX_EMBD) {
        ksm_errf(err, errlen, 0, "transformer.n_embd is %u; it must be between 1 and %d.", r.n_embd,
                 TF_MAX_EMBD);
        return KSM_EINVAL;
    }
    if (r.n_head < 1 || r.n_head > r.n_embd || r.n_embd % r.n_head != 0 ||
        r.n_embd / r.n_head > HEAD_DIM_MAX) {
        ksm_errf(err, errlen, 0,
                 "transformer.n_head is %u; it must divide n_embd (%u) with a head size "
                 "n_embd/n_head of at most %d.",
                 r.n_head, r.n_embd, HEAD_DIM_MAX);
        return KSM_EINVAL;
    }
    if (r.n_layer < 1 || r.n_layer > TF_MAX_LAYERS) {
        ksm_errf(err, errlen, 0, "transformer.n_layer is %u; it must be between 1 and %d.",
                 r.n_layer, TF_MAX_LAYERS);
        return KSM_EINVAL;
    }
    if (r.num_segments < 1 || r.n_layer % r.num_segments != 0) {
        ksm_errf(err, errlen, 0,
                 "transformer.num_segments is %u; it must be at least 1 and divide n_layer (%u).",
                 r.num_segments, r.n_layer);
        return KSM_EINVAL;
    }
    if (r.block_size < 1 || r.block_size > TF_MAX_BLOCK) {
        ksm_errf(err, errlen, 0, "transformer.block_size is %u; it must be between 1 and %d.",
                 r.block_size, TF_MAX_BLOCK);
        return KSM_EINVAL;
    }
    if (!(r.dropout >= 0.0 && r.dropout < 1.0)) {
        ksm_errf(err, errlen, 0, "transformer.dropout is %g; it must be in [0, 1).", r.dropout);
        return KSM_EINVAL;
    }
    *s = r;
    return 0;
}

/* ======================= construction ======================= */

static int add_param(ksm_host *h, int *idx, enum ksm_init init, float a, bool buffer, int ndim,
                     const int64_t *shape, const char *fmt, ...)
    __attribute__((format(printf, 8, 9)));

static int add_param(ksm_host *h, int *idx, enum ksm_init init, float a, bool buffer, int ndim,
                     const int64_t *shape, const char *fmt, ...)
{
    char name[KSM_PARAM_NAME_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    int rc = ksm_params_add(&h->params, name, KSM_DTYPE_F32, ndim, shape, init, a, buffer);
    if (rc < 0) return rc;
    if (idx) *idx = rc;
    return 0;
}

static void add_injection(ksm_host *h, int row, int col, int channels, int order, int exec_index,
                          enum ksm_surface surface, double position, int layer_start, int layer_end)
{
    struct ksm_injection *j = &h->inj[h->n_inj++];
    memset(j, 0, sizeof *j);
    snprintf(j->slot_id, sizeof j->slot_id, "r%dc%d", row, col);
    j->row = row;
    j->col = col;
    j->channels = channels;
    j->order = order;
    j->exec_index = exec_index;
    j->surface = surface;
    j->position = position;
    j->layer_start = layer_start;
    j->layer_end = layer_end;
}

static int64_t cnn_channels(const ksm_host *h, int block)
{
    return (int64_t)h->cnn.base_channels << block;
}

/* Timeline op t of the CNN: *block = the block index, *pool = whether it is a pool. */
static void cnn_op(const ksm_host *h, int t, int *block, bool *pool)
{
    int p = h->cnn.pool_layers;
    if (t < 2 * p) {
        *block = t / 2;
        *pool = t % 2 == 1;
    } else {
        *block = p + (t - 2 * p);
        *pool = false;
    }
}

static int cnn_declare(ksm_host *h)
{
    int n = (int)h->cnn.n_blocks, k = (int)h->cnn.kernel_size;
    int64_t cin = h->cnn.in_channels;
    for (int i = 0; i < n; i++) {
        int64_t c = cnn_channels(h, i);
        struct cnn_block_params *b = &h->blocks[i];
        int64_t wshape[4] = {c, cin, k, k};
        int64_t vshape[1] = {c};
        float bound = (float)(1.0 / sqrt((double)(cin * k * k)));
        KSM_TRY(add_param(h, &b->conv_w, KSM_INIT_UNIFORM, bound, false, 4, wshape,
                          "blocks.%d.conv.weight", i));
        KSM_TRY(
            add_param(h, &b->bn_w, KSM_INIT_ONE, 0, false, 1, vshape, "blocks.%d.bn.weight", i));
        KSM_TRY(add_param(h, &b->bn_b, KSM_INIT_ZERO, 0, false, 1, vshape, "blocks.%d.bn.bias", i));
        KSM_TRY(add_param(h, &b->bn_mean, KSM_INIT_ZERO, 0, true, 1, vshape,
                          "blocks.%d.bn.running_mean", i));
        KSM_TRY(add_param(h, &b->bn_var, KSM_INIT_ONE, 0, true, 1, vshape,
                          "blocks.%d.bn.running_var", i));
        char name[KSM_PARAM_NAME_MAX];
        snprintf(name, sizeof name, "blocks.%d.bn.num_batches_tracked", i);
        int rc = ksm_params_add(&h->params, name, KSM_DTYPE_I64, 0, NULL, KSM_INIT_ZERO, 0, true);
        if (rc < 0) return rc;
        cin = c;
    }
    int64_t cls[2] = {h->cnn.num_classes, cin};
    float bound = (float)(1.0 / sqrt((double)cin));
    KSM_TRY(add_param(h, &h->cls_w, KSM_INIT_UNIFORM, bound, false, 2, cls, "classifier.weight"));
    KSM_TRY(add_param(h, &h->cls_b, KSM_INIT_UNIFORM, bound, false, 1, cls, "classifier.bias"));

    /* docs/models.md#cnnhost: row 0 pre-pool after every block, row 1 post-pool after every pooled
     * block. */
    int p = h->cnn.pool_layers;
    for (int i = 0; i < n; i++)
        add_injection(h, 0, i, (int)cnn_channels(h, i), i, i < p ? 2 * i : p + i,
                      KSM_SURFACE_PRE_POOL, (2.0 * i + 1) / (2.0 * n), i, i + 1);
    for (int i = 0; i < p; i++)
        add_injection(h, 1, i, (int)cnn_channels(h, i), n + i, 2 * i + 1, KSM_SURFACE_POST_POOL,
                      (2.0 * i + 2) / (2.0 * n), i, i + 1);
    h->n_ops = n + p;
    return 0;
}

static int tf_declare(ksm_host *h)
{
    int64_t V = h->tf.vocab_size, D = h->tf.n_embd, L = h->tf.n_layer, S = h->tf.num_segments;
    int64_t vd[2] = {V, D}, bd[2] = {h->tf.block_size, D}, d1[1] = {D};
    int64_t attn_w[2] = {3 * D, D}, attn_b[1] = {3 * D}, dd[2] = {D, D};
    int64_t fc_w[2] = {4 * D, D}, fc_b[1] = {4 * D}, mlp_w[2] = {D, 4 * D};
    float bd_d = (float)(1.0 / sqrt((double)D)), bd_4d = (float)(1.0 / sqrt((double)(4 * D)));

    h->layers = calloc((size_t)L, sizeof *h->layers);
    if (h->layers == NULL) return KSM_ENOMEM;
    KSM_TRY(add_param(h, &h->tok_emb, KSM_INIT_NORMAL, 0, false, 2, vd, "tok_emb.weight"));
    KSM_TRY(add_param(h, &h->pos_emb, KSM_INIT_NORMAL, 0, false, 2, bd, "pos_emb.weight"));
    for (int l = 0; l < L; l++) {
        struct tf_layer_params *p = &h->layers[l];
        KSM_TRY(add_param(h, &p->ln1_w, KSM_INIT_ONE, 0, false, 1, d1, "layers.%d.ln1.weight", l));
        KSM_TRY(add_param(h, &p->ln1_b, KSM_INIT_ZERO, 0, false, 1, d1, "layers.%d.ln1.bias", l));
        KSM_TRY(add_param(h, &p->attn_w, KSM_INIT_UNIFORM, bd_d, false, 2, attn_w,
                          "layers.%d.attn.c_attn.weight", l));
        KSM_TRY(add_param(h, &p->attn_b, KSM_INIT_UNIFORM, bd_d, false, 1, attn_b,
                          "layers.%d.attn.c_attn.bias", l));
        KSM_TRY(add_param(h, &p->proj_w, KSM_INIT_UNIFORM, bd_d, false, 2, dd,
                          "layers.%d.attn.c_proj.weight", l));
        KSM_TRY(add_param(h, &p->proj_b, KSM_INIT_UNIFORM, bd_d, false, 1, d1,
                          "layers.%d.attn.c_proj.bias", l));
        KSM_TRY(add_param(h, &p->ln2_w, KSM_INIT_ONE, 0, false, 1, d1, "layers.%d.ln2.weight", l));
        KSM_TRY(add_param(h, &p->ln2_b, KSM_INIT_ZERO, 0, false, 1, d1, "layers.%d.ln2.bias", l));
        KSM_TRY(add_param(h, &p->fc_w, KSM_INIT_UNIFORM, bd_d, false, 2, fc_w,
                          "layers.%d.mlp.c_fc.weight", l));
        KSM_TRY(add_param(h, &p->fc_b, KSM_INIT_UNIFORM, bd_d, false, 1, fc_b,
                          "layers.%d.mlp.c_fc.bias", l));
        KSM_TRY(add_param(h, &p->mlp_w, KSM_INIT_UNIFORM, bd_4d, false, 2, mlp_w,
                          "layers.%d.mlp.c_proj.weight", l));
        KSM_TRY(add_param(h, &p->mlp_b, KSM_INIT_UNIFORM, bd_4d, false, 1, d1,
                          "layers.%d.mlp.c_proj.bias", l));
    }
    KSM_TRY(add_param(h, &h->lnf_w, KSM_INIT_ONE, 0, false, 1, d1, "ln_f.weight"));
    KSM_TRY(add_param(h, &h->lnf_b, KSM_INIT_ZERO, 0, false, 1, d1, "ln_f.bias"));
    int rc = ksm_params_add_tied(&h->params, "head.weight", h->tok_emb);
    if (rc < 0) return rc;
    h->head_w = rc;

    /* docs/models.md: one BLOCK_END point per segment, after layer (i+1)·L/S - 1. */
    int64_t per = L / S;
    for (int i = 0; i < S; i++)
        add_injection(h, 0, i, (int)D, i, i, KSM_SURFACE_BLOCK_END, (double)(i + 1) / (double)S,
                      (int)(i * per), (int)((i + 1) * per));
    h->n_ops = (int)L + 1;
    return 0;
}

static int host_new(ksm_host *h, ksm_host **out, char *err, size_t errlen)
{
    int rc = h->topology == KSM_TOPOLOGY_CNN ? cnn_declare(h) : tf_declare(h);
    if (rc == 0 && ksm_params_count(&h->params) > HOST_MAX_PARAMS) {
        ksm_errf(err, errlen, 0,
                 "the host would have %lld parameters; at most %lld are allowed (reduce the "
                 "widths or the vocabulary).",
                 (long long)ksm_params_count(&h->params), (long long)HOST_MAX_PARAMS);
        rc = KSM_EINVAL;
    } else if (rc < 0) {
        ksm_errf(err, errlen, 0, "declaring the host's parameters failed (%s).", ksm_strerror(rc));
    }
    if (rc < 0) {
        ksm_host_free(h);
        return rc;
    }
    *out = h;
    return 0;
}

int ksm_host_new_cnn(const struct ksm_cnn_spec *s, ksm_host **out, char *err, size_t errlen)
{
    *out = NULL;
    struct ksm_cnn_spec r = *s;
    /* Idempotent on a resolved spec; a zero pool_layers here means "no pooling". */
    int rc = ksm_host_resolve_cnn(&r, true, err, errlen);
    if (rc < 0) return rc;
    ksm_host *h = calloc(1, sizeof *h);
    if (h == NULL) return KSM_ENOMEM;
    h->topology = KSM_TOPOLOGY_CNN;
    h->cnn = r;
    return host_new(h, out, err, errlen);
}

int ksm_host_new_transformer(const struct ksm_transformer_spec *s, ksm_host **out, char *err,
                             size_t errlen)
{
    *out = NULL;
    struct ksm_transformer_spec r = *s;
    int rc = ksm_host_resolve_transformer(&r, err, errlen);
    if (rc < 0) return rc;
    ksm_host *h = calloc(1, sizeof *h);
    if (h == NULL) return KSM_ENOMEM;
    h->topology = KSM_TOPOLOGY_TRANSFORMER;
    h->tf = r;
    return host_new(h, out, err, errlen);
}

void ksm_host_free(ksm_host *h)
{
    if (h == NULL) return;
    ksm_params_destroy(&h->params);
    free(h->layers);
    free(h);
}

enum ksm_topology ksm_host_topology(const ksm_host *h) { return h->topology; }

struct ksm_params *ksm_host_params(ksm_host *h) { return &h->params; }

int ksm_host_injection_count(const ksm_host *h) { return h->n_inj; }

const struct ksm_injection *ksm_host_injection(const ksm_host *h, int i)
{
    return i >= 0 && i < h->n_inj ? &h->inj[i] : NULL;
}

const struct ksm_injection *ksm_host_find_injection(const ksm_host *h, const char *slot_id)
{
    if (slot_id == NULL) return NULL;
    for (int i = 0; i < h->n_inj; i++)
        if (strcmp(h->inj[i].slot_id, slot_id) == 0) return &h->inj[i];
    return NULL;
}

/* ======================= shapes and input checks ======================= */

static const char *dtype_str(enum ksm_dtype d)
{
    const char *s = ksm_dtype_name(d);
    return s ? s : "an invalid dtype";
}

static int64_t load_id(const ksm_tensor *x, int64_t off)
{
    return x->dtype == KSM_DTYPE_I64 ? ((const int64_t *)x->data)[off]
                                     : (int64_t)((const int32_t *)x->data)[off];
}

int ksm_host_check_input(const ksm_host *h, const ksm_tensor *x, char *err, size_t errlen)
{
    if (x == NULL) {
        ksm_errf(err, errlen, 0, "the input tensor is missing.");
        return KSM_EINVAL;
    }
    char desc[96];
    ksm_tensor_describe(x, desc, sizeof desc);
    if (h->topology == KSM_TOPOLOGY_CNN) {
        if (x->ndim != 4) {
            ksm_errf(err, errlen, 0, "the input is %s; a CNN host takes [B, %u, H, W].", desc,
                     h->cnn.in_channels);
            return KSM_ESHAPE;
        }
        if (x->dtype != KSM_DTYPE_F32) {
            ksm_errf(err, errlen, 0, "the input has dtype %s; a CNN host takes F32 images.",
                     dtype_str(x->dtype));
            return KSM_EDTYPE;
        }
        if (x->shape[0] < 1) {
            ksm_errf(err, errlen, 0, "the input %s has an empty batch; B must be at least 1.",
                     desc);
            return KSM_ESHAPE;
        }
        if (x->shape[1] != (int64_t)h->cnn.in_channels) {
            ksm_errf(err, errlen, 0, "the input %s has %lld channels; this CNN host takes %u.",
                     desc, (long long)x->shape[1], h->cnn.in_channels);
            return KSM_ESHAPE;
        }
        int64_t min = INT64_C(1) << h->cnn.pool_layers;
        if (x->shape[2] < min || x->shape[3] < min) {
            ksm_errf(err, errlen, 0,
                     "the input %s is too small: with %d pooling layers H and W must be at "
                     "least %lld.",
                     desc, (int)h->cnn.pool_layers, (long long)min);
            return KSM_ESHAPE;
        }
        return 0;
    }
    if (x->ndim != 2) {
        ksm_errf(err, errlen, 0, "the input is %s; a transformer host takes token ids [B, T].",
                 desc);
        return KSM_ESHAPE;
    }
    if (x->dtype != KSM_DTYPE_I64 && x->dtype != KSM_DTYPE_I32) {
        ksm_errf(err, errlen, 0, "the input has dtype %s; token ids must be I64 or I32.",
                 dtype_str(x->dtype));
        return KSM_EDTYPE;
    }
    if (x->shape[0] < 1 || x->shape[1] < 1) {
        ksm_errf(err, errlen, 0, "the input %s is empty; B and T must be at least 1.", desc);
        return KSM_ESHAPE;
    }
    if (x->shape[1] > (int64_t)h->tf.block_size) {
        ksm_errf(err, errlen, 0, "the input has T = %lld tokens; block_size allows at most %u.",
                 (long long)x->shape[1], h->tf.block_size);
        return KSM_ESHAPE;
    }
    if (x->data == NULL || (x->dev != NULL && !ksm_device_is_host(x->dev))) {
        ksm_errf(err, errlen, 0, "the input token ids must be in host memory to be checked.");
        return KSM_EINVAL;
    }
    for (int64_t b = 0; b < x->shape[0]; b++)
        for (int64_t t = 0; t < x->shape[1]; t++) {
            int64_t id = load_id(x, b * x->stride[0] + t * x->stride[1]);
            if (id < 0 || id >= (int64_t)h->tf.vocab_size) {
                ksm_errf(err, errlen, 0,
                         "token id %lld at [%lld, %lld] is outside the vocabulary [0, %u).",
                         (long long)id, (long long)b, (long long)t, h->tf.vocab_size);
                return KSM_EINVAL;
            }
        }
    return 0;
}

void ksm_host_output_shape(const ksm_host *h, const ksm_tensor *x, int *ndim, int64_t *shape)
{
    if (h->topology == KSM_TOPOLOGY_CNN) {
        *ndim = 2;
        shape[0] = x->shape[0];
        shape[1] = h->cnn.num_classes;
    } else {
        *ndim = 3;
        shape[0] = x->shape[0];
        shape[1] = x->shape[1];
        shape[2] = h->tf.vocab_size;
    }
}

/* Shape after timeline op t given the shape before it (CNN: [B,C,H,W]; transformer [B,T,D]). */
static void op_out_shape(const ksm_host *h, int t, int64_t *shape)
{
    if (h->topology == KSM_TOPOLOGY_CNN) {
        int block;
        bool pool;
        cnn_op(h, t, &block, &pool);
        if (pool) {
            shape[2] /= 2;
            shape[3] /= 2;
        } else {
            shape[1] = cnn_channels(h, block);
        }
    } else if (t == 0) {
        shape[2] = h->tf.n_embd; /* [B,T] ids -> [B,T,D] (ndim set by the caller) */
    }
}

/* Timeline position of boundary k (-1: before the first op). */
static int bpos(const ksm_host *h, int k)
{
    if (k < 0 || h->topology == KSM_TOPOLOGY_CNN) return k;
    return (k + 1) * (int)(h->tf.n_layer / h->tf.num_segments);
}

void ksm_host_boundary_shape(const ksm_host *h, const ksm_tensor *x, int k, int *ndim,
                             int64_t *shape)
{
    if (k >= h->n_inj) k = h->n_inj - 1; /* not a boundary: the caller's bug; stay in range */
    if (h->topology == KSM_TOPOLOGY_CNN) {
        *ndim = 4;
        for (int i = 0; i < 4; i++) shape[i] = x->shape[i];
        for (int t = 0; t <= bpos(h, k); t++) op_out_shape(h, t, shape);
        return;
    }
    if (k < 0) {
        *ndim = 2;
        shape[0] = x->shape[0];
        shape[1] = x->shape[1];
        return;
    }
    *ndim = 3;
    shape[0] = x->shape[0];
    shape[1] = x->shape[1];
    shape[2] = h->tf.n_embd;
}

/* ======================= forward ======================= */

static const ksm_tensor *P(const ksm_host *h, int i) { return ksm_params_tensor(&h->params, i); }

/* A view of base's memory with the given shape (contiguous). */
static ksm_tensor view_as(const ksm_tensor *base, int ndim, const int64_t *shape)
{
    ksm_tensor t;
    ksm_tensor_init(&t, base->dev, base->data, base->dtype, ndim, shape);
    return t;
}

/* CNN block: y <- relu(bn(conv(x))) (BatchNorm and ReLU applied to each output tile in cache). */
static int cnn_block(ksm_host *h, struct ksm_exec *e, int i, const ksm_tensor *x, ksm_tensor *y)
{
    const struct cnn_block_params *b = &h->blocks[i];
    const ksm_tensor *w = P(h, b->conv_w);
    int pad = (int)h->cnn.kernel_size / 2;
    size_t mark = ksm_exec_mark(e);
    size_t ws_bytes = ksm_op_conv2d_workspace_size(x, w, pad, pad, 1);
    void *ws;
    KSM_TRY(ksm_exec_scratch(e, ws_bytes, &ws));
    KSM_EXEC(e, ksm_op_conv2d_bn_relu(e->stream, y, x, w, NULL, pad, pad, 1, ws, ws_bytes,
                                      P(h, b->bn_mean), P(h, b->bn_var), P(h, b->bn_w),
                                      P(h, b->bn_b), BN_EPS));
    ksm_exec_release(e, mark);
    return 0;
}

/* Pre-norm transformer block: y <- x + attn(ln1(x)); y <- y + mlp(ln2(y)). y may be x. */
static int tf_layer(ksm_host *h, struct ksm_exec *e, int l, const ksm_tensor *x, ksm_tensor *y)
{
    const struct tf_layer_params *p = &h->layers[l];
    ksm_stream *s = e->stream;
    int64_t B = x->shape[0], T = x->shape[1], D = h->tf.n_embd, H = h->tf.n_head, hd = D / H;
    int64_t bt_d[3] = {B, T, D}, bt_3d[3] = {B, T, 3 * D}, bt_4d[3] = {B, T, 4 * D};
    ksm_tensor a, qkv, o, f;

    size_t mark = ksm_exec_mark(e);
    KSM_TRY(ksm_exec_tensor(e, &a, KSM_DTYPE_F32, 3, bt_d));
    KSM_TRY(ksm_exec_tensor(e, &qkv, KSM_DTYPE_F32, 3, bt_3d));
    KSM_TRY(ksm_exec_tensor(e, &o, KSM_DTYPE_F32, 3, bt_d));
    KSM_EXEC(e, ksm_op_layernorm(s, &a, x, P(h, p->ln1_w), P(h, p->ln1_b), LN_EPS));
    KSM_EXEC(e, ksm_op_linear(s, &qkv, &a, P(h, p->attn_w), P(h, p->attn_b)));
    /* heads [B,H,T,hd] as strided views of qkv [B,T,3D] (q | k | v) and of o [B,T,D] */
    ksm_tensor q, k, v, oh;
    memset(&q, 0, sizeof q);
    q.dev = o.dev;
    q.dtype = KSM_DTYPE_F32;
    q.ndim = 4;
    q.shape[0] = B;
    q.shape[1] = H;
    q.shape[2] = T;
    q.shape[3] = hd;
    q.stride[0] = T * 3 * D;
    q.stride[1] = hd;
    q.stride[2] = 3 * D;
    q.stride[3] = 1;
    q.data = qkv.data;
    k = q;
    k.data = (float *)qkv.data + D;
    v = q;
    v.data = (float *)qkv.data + 2 * D;
    oh = q;
    oh.data = o.data;
    oh.stride[0] = T * D;
    oh.stride[2] = D;
    KSM_EXEC(e, ksm_op_sdpa(s, &oh, &q, &k, &v, true, 0.0f));
    KSM_EXEC(e, ksm_op_linear(s, &a, &o, P(h, p->proj_w), P(h, p->proj_b))); /* a is free */
    KSM_EXEC(e, ksm_op_add(s, y, x, &a));
    ksm_exec_release(e, mark);

    KSM_TRY(ksm_exec_tensor(e, &a, KSM_DTYPE_F32, 3, bt_d));
    KSM_TRY(ksm_exec_tensor(e, &f, KSM_DTYPE_F32, 3, bt_4d));
    KSM_EXEC(e, ksm_op_layernorm(s, &a, y, P(h, p->ln2_w), P(h, p->ln2_b), LN_EPS));
    KSM_EXEC(e, ksm_op_linear(s, &f, &a, P(h, p->fc_w), P(h, p->fc_b)));
    KSM_EXEC(e, ksm_op_gelu(s, &f, &f));
    KSM_EXEC(e, ksm_op_linear(s, &a, &f, P(h, p->mlp_w), P(h, p->mlp_b)));
    KSM_EXEC(e, ksm_op_add(s, y, y, &a));
    ksm_exec_release(e, mark);
    return 0;
}

/* tok_emb(ids) + pos_emb(arange(T)) into y [B,T,D]. */
static int tf_embed(ksm_host *h, struct ksm_exec *e, const ksm_tensor *ids, ksm_tensor *y)
{
    ksm_tensor pos;
    KSM_TRY(ksm_tensor_narrow(&pos, P(h, h->pos_emb), 0, 0, ids->shape[1]));
    KSM_EXEC(e, ksm_op_embedding(e->stream, y, P(h, h->tok_emb), ids));
    KSM_EXEC(e, ksm_op_add(e->stream, y, y, &pos));
    return 0;
}

static int run_op(ksm_host *h, struct ksm_exec *e, int t, const ksm_tensor *x, ksm_tensor *y)
{
    if (h->topology == KSM_TOPOLOGY_TRANSFORMER)
        return t == 0 ? tf_embed(h, e, x, y) : tf_layer(h, e, t - 1, x, y);
    int block;
    bool pool;
    cnn_op(h, t, &block, &pool);
    if (pool) {
        KSM_EXEC(e, ksm_op_maxpool2(e->stream, y, x));
        return 0;
    }
    return cnn_block(h, e, block, x, y);
}

/* Checks the features x entering timeline op first (device tensor; shapes only). */
static int check_features(const ksm_host *h, int first, const ksm_tensor *x, int last)
{
    if (x == NULL) return KSM_EINVAL;
    if (h->topology == KSM_TOPOLOGY_TRANSFORMER) {
        if (first == 0) {
            if (x->ndim != 2) return KSM_ESHAPE;
            if (x->dtype != KSM_DTYPE_I64 && x->dtype != KSM_DTYPE_I32) return KSM_EDTYPE;
        } else {
            if (x->ndim != 3 || x->shape[2] != (int64_t)h->tf.n_embd) return KSM_ESHAPE;
            if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
        }
        if (x->shape[0] < 1 || x->shape[1] < 1 || x->shape[1] > (int64_t)h->tf.block_size)
            return KSM_ESHAPE;
        return 0;
    }
    if (x->ndim != 4 || x->shape[0] < 1) return KSM_ESHAPE;
    if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    int64_t c = h->cnn.in_channels;
    if (first > 0) {
        int block;
        bool pool;
        cnn_op(h, first - 1, &block, &pool);
        c = cnn_channels(h, block);
    }
    if (x->shape[1] != c) return KSM_ESHAPE;
    int64_t hh = x->shape[2], ww = x->shape[3];
    for (int t = first; t <= last; t++) {
        int block;
        bool pool;
        cnn_op(h, t, &block, &pool);
        if (!pool) continue;
        if (hh < 2 || ww < 2) return KSM_ESHAPE;
        hh /= 2;
        ww /= 2;
    }
    return hh >= 1 && ww >= 1 ? 0 : KSM_ESHAPE;
}

static int shape_of(const ksm_host *h, const ksm_tensor *x, int first, int t, int64_t *shape,
                    int *ndim)
{
    *ndim = h->topology == KSM_TOPOLOGY_CNN ? 4 : 3;
    for (int i = 0; i < x->ndim; i++) shape[i] = x->shape[i];
    for (int i = first; i <= t; i++) op_out_shape(h, i, shape);
    return 0;
}

/*
 * Runs timeline ops first..last on x. With dst, the last op writes into dst (which the caller
 * allocated with the right shape) and every intermediate is released. Without dst, *out is the
 * result in arena memory that stays allocated (the caller releases it with its own mark).
 */
static int run_ops(ksm_host *h, struct ksm_exec *e, int first, int last, const ksm_tensor *x,
                   ksm_tensor *dst, ksm_tensor *out)
{
    bool inplace = h->topology == KSM_TOPOLOGY_TRANSFORMER;
    /* ops whose output is an intermediate (the transformer updates dst itself in place) */
    int n_tmp = dst ? (inplace ? 0 : last - first) : last - first + 1;
    int64_t shape[KSM_MAX_DIMS];
    int ndim;
    size_t mark = ksm_exec_mark(e);
    ksm_tensor buf[2];
    if (n_tmp > 0) {
        int64_t maxel = 0;
        for (int t = first; t < first + n_tmp; t++) {
            shape_of(h, x, first, t, shape, &ndim);
            int64_t n = 1;
            for (int i = 0; i < ndim; i++) n *= shape[i];
            if (n > maxel) maxel = n;
        }
        int n_buf = inplace || n_tmp == 1 ? 1 : 2;
        for (int i = 0; i < n_buf; i++)
            KSM_TRY(ksm_exec_tensor(e, &buf[i], KSM_DTYPE_F32, 1, &maxel));
    }
    const ksm_tensor *cur = x;
    ksm_tensor y;
    int which = 0;
    for (int t = first; t <= last; t++) {
        shape_of(h, x, first, t, shape, &ndim);
        if (dst && (t == last || inplace)) {
            y = *dst;
        } else {
            y = view_as(&buf[which], ndim, shape);
            if (!inplace) which ^= 1;
        }
        KSM_TRY(run_op(h, e, t, cur, &y));
        out[0] = y;
        cur = &out[0];
    }
    if (dst) ksm_exec_release(e, mark);
    return 0;
}

static int params_ready(const ksm_host *h, const struct ksm_exec *e)
{
    if (e->measure) return 0;
    for (int i = 0; i < h->params.n; i++)
        if (ksm_params_tensor(&h->params, i)->data == NULL) return KSM_ENOTREADY;
    return 0;
}

int ksm_host_forward_to(ksm_host *h, struct ksm_exec *e, int from, int to, const ksm_tensor *x,
                        ksm_tensor *y)
{
    int nb = h->n_inj;
    if (from < -1 || from >= nb || to < 0 || to >= nb || from >= to || x == NULL || y == NULL)
        return KSM_EINVAL;
    int first = bpos(h, from) + 1, last = bpos(h, to);
    KSM_TRY(check_features(h, first, x, last));
    KSM_TRY(params_ready(h, e));
    int64_t shape[KSM_MAX_DIMS];
    int ndim;
    shape_of(h, x, first, last, shape, &ndim);
    ksm_tensor out;
    KSM_TRY(ksm_exec_tensor(e, &out, KSM_DTYPE_F32, ndim, shape));
    ksm_tensor res;
    KSM_TRY(run_ops(h, e, first, last, x, &out, &res));
    *y = out;
    return 0;
}

int ksm_host_forward_from(ksm_host *h, struct ksm_exec *e, int from, const ksm_tensor *x,
                          ksm_tensor *logits)
{
    int nb = h->n_inj;
    if (from < -1 || from >= nb || x == NULL || logits == NULL) return KSM_EINVAL;
    int first = bpos(h, from) + 1, last = h->n_ops - 1;
    KSM_TRY(check_features(h, first, x, last));
    KSM_TRY(params_ready(h, e));
    int64_t oshape[KSM_MAX_DIMS];
    int ondim;
    ksm_host_output_shape(h, x, &ondim, oshape);
    ksm_tensor out;
    KSM_TRY(ksm_exec_tensor(e, &out, KSM_DTYPE_F32, ondim, oshape));
    if (e->logits_dst != NULL && !e->measure) out.data = e->logits_dst; /* exec.h */
    size_t mark = ksm_exec_mark(e);
    ksm_tensor feat = *x;
    if (first <= last) KSM_TRY(run_ops(h, e, first, last, x, NULL, &feat));
    ksm_stream *s = e->stream;
    if (h->topology == KSM_TOPOLOGY_CNN) {
        ksm_tensor g;
        int64_t gs[2] = {feat.shape[0], feat.shape[1]};
        KSM_TRY(ksm_exec_tensor(e, &g, KSM_DTYPE_F32, 2, gs));
        KSM_EXEC(e, ksm_op_mean(s, &g, &feat, 2, 4));
        KSM_EXEC(e, ksm_op_linear(s, &out, &g, P(h, h->cls_w), P(h, h->cls_b)));
    } else {
        ksm_tensor a;
        KSM_TRY(ksm_exec_tensor(e, &a, KSM_DTYPE_F32, 3, feat.shape));
        KSM_EXEC(e, ksm_op_layernorm(s, &a, &feat, P(h, h->lnf_w), P(h, h->lnf_b), LN_EPS));
        KSM_EXEC(e, ksm_op_linear(s, &out, &a, P(h, h->head_w), NULL));
    }
    ksm_exec_release(e, mark);
    *logits = out;
    return 0;
}

/* ======================= training layout (host.h) ======================= */

int ksm_host_n_ops(const ksm_host *h) { return h->n_ops; }

void ksm_host_cnn_op(const ksm_host *h, int t, int *block, bool *pool)
{
    cnn_op(h, t, block, pool);
}

void ksm_host_cnn_block_layout(const ksm_host *h, int block, struct ksm_cnn_block_layout *out)
{
    const struct cnn_block_params *b = &h->blocks[block];
    char name[KSM_PARAM_NAME_MAX];
    snprintf(name, sizeof name, "blocks.%d.bn.num_batches_tracked", block);
    *out = (struct ksm_cnn_block_layout){.conv_w = b->conv_w,
                                         .bn_w = b->bn_w,
                                         .bn_b = b->bn_b,
                                         .bn_mean = b->bn_mean,
                                         .bn_var = b->bn_var,
                                         .bn_nbt = ksm_params_find(&h->params, name)};
}

void ksm_host_cnn_head_layout(const ksm_host *h, int *w, int *b)
{
    *w = h->cls_w;
    *b = h->cls_b;
}

void ksm_host_tf_layout(const ksm_host *h, struct ksm_tf_layout *out)
{
    *out = (struct ksm_tf_layout){.tok_emb = h->tok_emb,
                                  .pos_emb = h->pos_emb,
                                  .lnf_w = h->lnf_w,
                                  .lnf_b = h->lnf_b,
                                  .head_w = h->head_w,
                                  .vocab = (int)h->tf.vocab_size,
                                  .n_embd = (int)h->tf.n_embd,
                                  .n_head = (int)h->tf.n_head,
                                  .n_layer = (int)h->tf.n_layer,
                                  .block_size = (int)h->tf.block_size,
                                  .dropout = h->tf.dropout};
}

void ksm_host_tf_layer_layout(const ksm_host *h, int layer, struct ksm_tf_layer_layout *out)
{
    const struct tf_layer_params *p = &h->layers[layer];
    *out = (struct ksm_tf_layer_layout){.ln1_w = p->ln1_w,
                                        .ln1_b = p->ln1_b,
                                        .attn_w = p->attn_w,
                                        .attn_b = p->attn_b,
                                        .proj_w = p->proj_w,
                                        .proj_b = p->proj_b,
                                        .ln2_w = p->ln2_w,
                                        .ln2_b = p->ln2_b,
                                        .fc_w = p->fc_w,
                                        .fc_b = p->fc_b,
                                        .mlp_w = p->mlp_w,
                                        .mlp_b = p->mlp_b};
}

int ksm_host_boundary_op(const ksm_host *h, int k) { return bpos(h, k); }
