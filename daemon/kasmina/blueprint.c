/*
 * Blueprints (docs/models.md#blueprints): registry, parameter declarations (esper's state_dict
 * names, PyTorch default init plus esper's explicit zero/const inits), MULTIPLY zero-init
 * (docs/models.md#multiply-zero-init) and the flex_attention block-mask LRU. Forwards are in
 * blueprint_cnn.c and blueprint_tf.c.
 */
#include "kasmina/blueprint.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/blueprint_impl.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

/* ---- Registry (docs/models.md) ---- */

#define BP(n, i, t, est)                                                                           \
    {                                                                                              \
        .name = n, .index = i, .topology = KSM_TOPOLOGY_##t, .param_estimate = est                 \
    }

static const struct ksm_blueprint cnn_noop = BP("noop", 0, CNN, 0);
static const struct ksm_blueprint cnn_norm = BP("norm", 3, CNN, 130);
static const struct ksm_blueprint cnn_attention = BP("attention", 2, CNN, 2000);
static const struct ksm_blueprint cnn_conv_small = BP("conv_small", 6, CNN, 4200);
static const struct ksm_blueprint cnn_bottleneck = BP("bottleneck", 5, CNN, 4500);
static const struct ksm_blueprint cnn_depthwise = BP("depthwise", 4, CNN, 4800);
static const struct ksm_blueprint cnn_conv_light = BP("conv_light", 1, CNN, 37000);
static const struct ksm_blueprint cnn_conv_heavy = BP("conv_heavy", 7, CNN, 74000);

static const struct ksm_blueprint tf_noop = BP("noop", 0, TRANSFORMER, 0);
static const struct ksm_blueprint tf_norm = BP("norm", 3, TRANSFORMER, 800);
static const struct ksm_blueprint tf_lora = BP("lora", 8, TRANSFORMER, 6000);
static const struct ksm_blueprint tf_lora_large = BP("lora_large", 9, TRANSFORMER, 25000);
static const struct ksm_blueprint tf_attention = BP("attention", 2, TRANSFORMER, 591000);
static const struct ksm_blueprint tf_flex = BP("flex_attention", 12, TRANSFORMER, 591000);
static const struct ksm_blueprint tf_mlp_small = BP("mlp_small", 10, TRANSFORMER, 591000);
static const struct ksm_blueprint tf_mlp = BP("mlp", 11, TRANSFORMER, 1200000);

/* Sorted by (param_estimate, name), as esper's list_for_topology. */
static const struct ksm_blueprint *const cnn_list[] = {
    &cnn_noop,       &cnn_norm,      &cnn_attention,  &cnn_conv_small,
    &cnn_bottleneck, &cnn_depthwise, &cnn_conv_light, &cnn_conv_heavy,
};
static const struct ksm_blueprint *const tf_list[] = {
    &tf_noop, &tf_norm, &tf_lora, &tf_lora_large, &tf_attention, &tf_flex, &tf_mlp_small, &tf_mlp,
};

/* BlueprintAction (L/factored_actions.py). */
static const char *const action_names[] = {
    "noop",       "conv_light", "attention",      "norm", "depthwise",
    "bottleneck", "conv_small", "conv_heavy",     "lora", "lora_large",
    "mlp_small",  "mlp",        "flex_attention",
};

const struct ksm_blueprint *const *ksm_blueprint_list(enum ksm_topology t, int *n)
{
    switch (t) {
    case KSM_TOPOLOGY_CNN: *n = (int)(sizeof cnn_list / sizeof cnn_list[0]); return cnn_list;
    case KSM_TOPOLOGY_TRANSFORMER: *n = (int)(sizeof tf_list / sizeof tf_list[0]); return tf_list;
    default: *n = 0; return NULL;
    }
}

const struct ksm_blueprint *ksm_blueprint_find(enum ksm_topology t, const char *name)
{
    int n;
    const struct ksm_blueprint *const *l = ksm_blueprint_list(t, &n);
    if (name == NULL) return NULL;
    for (int i = 0; i < n; i++)
        if (strcmp(l[i]->name, name) == 0) return l[i];
    return NULL;
}

int ksm_blueprint_index(const char *name)
{
    if (name == NULL) return -1;
    for (int i = 0; i < (int)(sizeof action_names / sizeof action_names[0]); i++)
        if (strcmp(action_names[i], name) == 0) return i;
    return -1;
}

int ksm_num_groups(int channels)
{
    static const int cand[] = {32, 16, 8, 4, 2, 1};
    if (channels < 1) return 1;
    for (int i = 0; i < 6; i++)
        if (channels % cand[i] == 0 && channels / cand[i] >= 16) return cand[i];
    for (int i = 0; i < 6; i++)
        if (channels % cand[i] == 0) return cand[i];
    return 1;
}

/* ---- Declarations ---- */

static bool is_bp(const struct ksm_seed *s, const struct ksm_blueprint *bp) { return s->bp == bp; }

/* Declares one F32 parameter; `layer` marks a Linear/Conv weight (1) or bias (2) for
 * docs/models.md#multiply-zero-init. */
static int decl(struct ksm_seed *s, const char *name, int ndim, const int64_t *shape,
                enum ksm_init init, float a, int layer)
{
    if (s->n_p >= KSM_SEED_MAX_PARAMS) return KSM_EINTERNAL;
    int i = ksm_params_add(&s->params, name, KSM_DTYPE_F32, ndim, shape, init, a, false);
    if (i < 0) return i;
    s->p[s->n_p++] = i;
    if (layer == 1) {
        s->last_w = i;
        s->last_b = -1;
    } else if (layer == 2) {
        s->last_b = i;
    }
    return 0;
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})
#define NDIM(...)  ((int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)))
#define DECL(name, init, a, layer, ...)                                                            \
    do {                                                                                           \
        int rc_ = decl(s, name, NDIM(__VA_ARGS__), SHAPE(__VA_ARGS__), init, a, layer);            \
        if (rc_ < 0) return rc_;                                                                   \
    } while (0)

/* PyTorch's default Linear/Conv bound (kaiming-uniform a=sqrt(5)): 1/sqrt(fan_in). */
static float kaiming(int64_t fan_in) { return (float)(1.0 / sqrt((double)fan_in)); }

static int declare_cnn(struct ksm_seed *s)
{
    int64_t C = s->channels;
    s->groups = ksm_num_groups(s->channels);
    if (is_bp(s, &cnn_noop)) return 0;
    if (is_bp(s, &cnn_norm)) {
        DECL("scale", KSM_INIT_ZERO, 0, 0, 1);
        DECL("norm.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("norm.bias", KSM_INIT_ZERO, 0, 0, C);
        return 0;
    }
    if (is_bp(s, &cnn_attention)) {
        int64_t r = C / 4 > 1 ? C / 4 : 1;
        s->hidden = (int)r;
        DECL("fc.0.weight", KSM_INIT_UNIFORM, kaiming(C), 1, r, C);
        DECL("fc.2.weight", KSM_INIT_ZERO, 0, 1, C, r);
        DECL("fc.2.bias", KSM_INIT_CONST, 3.0f, 2, C);
        return 0;
    }
    if (is_bp(s, &cnn_depthwise)) {
        DECL("depthwise.weight", KSM_INIT_UNIFORM, kaiming(9), 1, C, 1, 3, 3);
        DECL("pointwise.weight", KSM_INIT_UNIFORM, kaiming(C), 1, C, C, 1, 1);
        DECL("gn.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("gn.bias", KSM_INIT_ZERO, 0, 0, C);
        return 0;
    }
    if (is_bp(s, &cnn_bottleneck)) {
        int64_t b = C / 4 > 8 ? C / 4 : 8;
        s->hidden = (int)b;
        DECL("down.weight", KSM_INIT_UNIFORM, kaiming(C), 1, b, C, 1, 1);
        DECL("conv.weight", KSM_INIT_UNIFORM, kaiming(9 * b), 1, b, b, 3, 3);
        DECL("up.weight", KSM_INIT_ZERO, 0, 1, C, b, 1, 1);
        DECL("gn.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("gn.bias", KSM_INIT_ZERO, 0, 0, C);
        return 0;
    }
    if (is_bp(s, &cnn_conv_small)) {
        DECL("conv.weight", KSM_INIT_ZERO, 0, 1, C, C, 1, 1);
        DECL("gn.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("gn.bias", KSM_INIT_ZERO, 0, 0, C);
        return 0;
    }
    if (is_bp(s, &cnn_conv_light)) {
        DECL("enhance.conv.weight", KSM_INIT_UNIFORM, kaiming(9 * C), 1, C, C, 3, 3);
        DECL("enhance.gn.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("enhance.gn.bias", KSM_INIT_ZERO, 0, 0, C);
        return 0;
    }
    if (is_bp(s, &cnn_conv_heavy)) {
        DECL("enhance.0.conv.weight", KSM_INIT_UNIFORM, kaiming(9 * C), 1, C, C, 3, 3);
        DECL("enhance.0.gn.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("enhance.0.gn.bias", KSM_INIT_ZERO, 0, 0, C);
        DECL("enhance.1.conv.weight", KSM_INIT_UNIFORM, kaiming(9 * C), 1, C, C, 3, 3);
        DECL("enhance.1.gn.weight", KSM_INIT_ONE, 0, 0, C);
        DECL("enhance.1.gn.bias", KSM_INIT_ZERO, 0, 0, C);
        return 0;
    }
    return KSM_EINTERNAL;
}

static int declare_tf(struct ksm_seed *s)
{
    int64_t D = s->channels;
    if (is_bp(s, &tf_noop)) return 0;
    if (is_bp(s, &tf_norm)) {
        DECL("scale", KSM_INIT_ZERO, 0, 0, 1);
        DECL("norm.weight", KSM_INIT_ONE, 0, 0, D);
        DECL("norm.bias", KSM_INIT_ZERO, 0, 0, D);
        return 0;
    }
    if (is_bp(s, &tf_lora) || is_bp(s, &tf_lora_large)) {
        int64_t r = is_bp(s, &tf_lora) ? 8 : 32;
        s->hidden = (int)r;
        DECL("down.weight", KSM_INIT_UNIFORM, kaiming(D), 1, r, D);
        DECL("up.weight", KSM_INIT_ZERO, 0, 1, D, r);
        return 0;
    }
    if (is_bp(s, &tf_attention) || is_bp(s, &tf_flex)) {
        DECL("qkv.weight", KSM_INIT_UNIFORM, kaiming(D), 1, 3 * D, D);
        DECL("qkv.bias", KSM_INIT_UNIFORM, kaiming(D), 2, 3 * D);
        DECL("proj.weight", KSM_INIT_ZERO, 0, 1, D, D);
        DECL("proj.bias", KSM_INIT_ZERO, 0, 2, D);
        return 0;
    }
    if (is_bp(s, &tf_mlp_small) || is_bp(s, &tf_mlp)) {
        int64_t F = (is_bp(s, &tf_mlp) ? 4 : 2) * D;
        s->hidden = (int)F;
        DECL("fc1.weight", KSM_INIT_UNIFORM, kaiming(D), 1, F, D);
        DECL("fc1.bias", KSM_INIT_UNIFORM, kaiming(D), 2, F);
        DECL("fc2.weight", KSM_INIT_ZERO, 0, 1, D, F);
        DECL("fc2.bias", KSM_INIT_ZERO, 0, 2, D);
        return 0;
    }
    return KSM_EINTERNAL;
}

static bool known_bp(const struct ksm_blueprint *bp)
{
    int n;
    const struct ksm_blueprint *const *l = ksm_blueprint_list(bp->topology, &n);
    for (int i = 0; i < n; i++)
        if (l[i] == bp) return true;
    return false;
}

int ksm_seed_new(const struct ksm_blueprint *bp, int channels, ksm_seed **out, char *err,
                 size_t errlen)
{
    *out = NULL;
    if (bp == NULL || !known_bp(bp)) {
        if (err) snprintf(err, errlen, "blueprint is not one of the registry's");
        return KSM_EINVAL;
    }
    if (channels < 1) {
        if (err)
            snprintf(err, errlen, "blueprint %s needs channels >= 1, got %d", bp->name, channels);
        return KSM_EINVAL;
    }
    bool attn = bp == &tf_attention || bp == &tf_flex;
    if (attn && channels % KSM_ATTN_HEADS != 0) {
        if (err)
            snprintf(err, errlen, "blueprint %s needs the width %d to be a multiple of %d heads",
                     bp->name, channels, KSM_ATTN_HEADS);
        return KSM_EINVAL;
    }
    if (attn && channels / KSM_ATTN_HEADS > 256) {
        if (err)
            snprintf(err, errlen, "blueprint %s supports head dims up to 256 (width %d)", bp->name,
                     channels);
        return KSM_EINVAL;
    }
    struct ksm_seed *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    s->bp = bp;
    s->channels = channels;
    s->groups = 1;
    s->last_w = s->last_b = -1;
    int rc = bp->topology == KSM_TOPOLOGY_CNN ? declare_cnn(s) : declare_tf(s);
    if (rc < 0) {
        if (err) snprintf(err, errlen, "cannot declare the parameters of blueprint %s", bp->name);
        ksm_params_destroy(&s->params);
        free(s);
        return rc;
    }
    if (pthread_mutex_init(&s->mask_lock, NULL) != 0) {
        ksm_params_destroy(&s->params);
        free(s);
        return KSM_ENOMEM;
    }
    if (bp == &tf_flex) s->mask_stats.capacity = KSM_BLOCK_MASK_CAPACITY;
    *out = s;
    return 0;
}

void ksm_seed_free(ksm_seed *s)
{
    if (s == NULL) return;
    for (int i = 0; i < s->n_masks; i++) free(s->masks[i]);
    pthread_mutex_destroy(&s->mask_lock);
    ksm_params_destroy(&s->params);
    free(s);
}

const struct ksm_blueprint *ksm_seed_blueprint(const ksm_seed *s) { return s->bp; }
int ksm_seed_channels(const ksm_seed *s) { return s->channels; }
struct ksm_params *ksm_seed_params(ksm_seed *s) { return &s->params; }

void ksm_seed_zero_final_layer(ksm_seed *s)
{
    if (s->last_w >= 0) {
        s->params.p[s->last_w].init = KSM_INIT_ZERO;
        s->params.p[s->last_w].init_a = 0.0f;
    }
    if (s->last_b >= 0) {
        s->params.p[s->last_b].init = KSM_INIT_ZERO;
        s->params.p[s->last_b].init_a = 0.0f;
    }
}

/* ---- Forward dispatch ---- */

int ksm_seed_forward(ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y)
{
    if (s == NULL || e == NULL || x == NULL || y == NULL) return KSM_EINVAL;
    if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->dev != e->dev || !ksm_tensor_is_contiguous(x)) return KSM_EINVAL;
    if (s->bp->topology == KSM_TOPOLOGY_CNN) {
        if (x->ndim != 4 || x->shape[1] != s->channels) return KSM_ESHAPE;
        return ksm_seed_forward_cnn(s, e, x, y);
    }
    if (x->ndim != 3 || x->shape[2] != s->channels) return KSM_ESHAPE;
    return ksm_seed_forward_tf(s, e, x, y);
}

/* ---- Block masks (docs/models.md#transformer-blueprints FlexAttention) ---- */

struct ksm_block_mask *ksm_block_mask_build(int64_t seq_len, const ksm_device *dev,
                                            enum ksm_dtype dtype)
{
    const int64_t B = KSM_BLOCK_MASK_BLOCK;
    int64_t nb = (seq_len + B - 1) / B;
    if (seq_len < 0 || nb > 1 << 15) return NULL;
    size_t n = (size_t)nb;
    size_t head = (sizeof(struct ksm_block_mask) + 7) & ~(size_t)7;
    size_t bytes = head + (2 * n + 2 * n * n) * sizeof(int32_t);
    struct ksm_block_mask *m = calloc(1, bytes);
    if (m == NULL) return NULL;
    int32_t *a = (int32_t *)((char *)m + head);
    m->seq_len = seq_len;
    m->dev = dev;
    m->dtype = dtype;
    m->n_q = m->n_kv = (int)nb;
    m->kv_num = a;
    m->full_num = a + n;
    m->kv_idx = a + 2 * n;
    m->full_idx = a + 2 * n + n * n;
    m->bytes = bytes;
    /* mask_mod: q_idx >= kv_idx. A block is full when every (q, kv) pair passes, partial when
     * some do, and skipped otherwise. */
    for (int64_t i = 0; i < nb; i++) {
        int64_t q_lo = i * B, q_hi = (i + 1) * B < seq_len ? (i + 1) * B - 1 : seq_len - 1;
        for (int64_t j = 0; j < nb; j++) {
            int64_t k_lo = j * B, k_hi = (j + 1) * B < seq_len ? (j + 1) * B - 1 : seq_len - 1;
            if (q_lo >= k_hi)
                m->full_idx[i * nb + m->full_num[i]++] = (int32_t)j;
            else if (q_hi >= k_lo)
                m->kv_idx[i * nb + m->kv_num[i]++] = (int32_t)j;
        }
    }
    return m;
}

/* LRU lookup (caller holds mask_lock). Hit: most recent. Miss: evict the least recently used when
 * full, build, insert. NULL when out of memory. */
static struct ksm_block_mask *mask_lookup(struct ksm_seed *s, int64_t seq_len,
                                          const ksm_device *dev, enum ksm_dtype dtype)
{
    for (int i = 0; i < s->n_masks; i++) {
        struct ksm_block_mask *m = s->masks[i];
        if (m->seq_len == seq_len && m->dev == dev && m->dtype == dtype) {
            memmove(&s->masks[i], &s->masks[i + 1], (size_t)(s->n_masks - i - 1) * sizeof m);
            s->masks[s->n_masks - 1] = m;
            s->mask_stats.hits++;
            return m;
        }
    }
    struct ksm_block_mask *m = ksm_block_mask_build(seq_len, dev, dtype);
    if (m == NULL) return NULL;
    s->mask_stats.misses++;
    if (s->n_masks >= KSM_BLOCK_MASK_CAPACITY) {
        s->mask_stats.bytes -= s->masks[0]->bytes;
        free(s->masks[0]);
        memmove(&s->masks[0], &s->masks[1], (size_t)(s->n_masks - 1) * sizeof m);
        s->n_masks--;
        s->mask_stats.evictions++;
    }
    s->masks[s->n_masks++] = m;
    s->mask_stats.entries = (uint64_t)s->n_masks;
    s->mask_stats.bytes += m->bytes;
    return m;
}

static int flex_run(struct ksm_exec *e, const struct ksm_block_mask *m, ksm_tensor *out,
                    const ksm_tensor *q, const ksm_tensor *k, const ksm_tensor *v)
{
    const int64_t B = KSM_BLOCK_MASK_BLOCK, T = m->seq_len;
    for (int i = 0; i < m->n_q; i++) {
        int64_t q0 = i * B, q1 = q0 + B < T ? q0 + B : T;
        int lo = m->n_kv, hi = -1;
        for (int c = 0; c < m->full_num[i]; c++) {
            int j = m->full_idx[i * m->n_kv + c];
            lo = j < lo ? j : lo;
            hi = j > hi ? j : hi;
        }
        int diag = -1;
        for (int c = 0; c < m->kv_num[i]; c++) {
            int j = m->kv_idx[i * m->n_kv + c];
            if (diag >= 0) return KSM_EINTERNAL; /* causal: one partial block per row */
            diag = j;
            lo = j < lo ? j : lo;
            hi = j > hi ? j : hi;
        }
        if (hi < 0) return KSM_EINTERNAL; /* causal: every query sees itself */
        int64_t k0 = lo * B, k1 = (hi + 1) * B < T ? (hi + 1) * B : T;
        /* The kv blocks must form one range; a partial block must be the diagonal, whose causal
         * bound is sdpa's bottom-right alignment when the range ends with the q-block. */
        if (hi - lo + 1 != m->full_num[i] + m->kv_num[i]) return KSM_EINTERNAL;
        if (diag >= 0 && (diag != hi || k1 != q1)) return KSM_EINTERNAL;
        ksm_tensor qv, kv, vv, ov;
        KSM_TRY(ksm_tensor_narrow(&qv, q, 2, q0, q1 - q0));
        KSM_TRY(ksm_tensor_narrow(&ov, out, 2, q0, q1 - q0));
        KSM_TRY(ksm_tensor_narrow(&kv, k, 2, k0, k1 - k0));
        KSM_TRY(ksm_tensor_narrow(&vv, v, 2, k0, k1 - k0));
        KSM_EXEC(e, ksm_op_sdpa(e->stream, &ov, &qv, &kv, &vv, diag >= 0, 0.0f));
    }
    return 0;
}

int ksm_seed_flex_sdpa(struct ksm_seed *s, struct ksm_exec *e, ksm_tensor *out, const ksm_tensor *q,
                       const ksm_tensor *k, const ksm_tensor *v)
{
    int64_t T = q->shape[2];
    if (e->measure) {
        struct ksm_block_mask *m = ksm_block_mask_build(T, e->dev, q->dtype);
        if (m == NULL) return KSM_ENOMEM;
        int rc = flex_run(e, m, out, q, k, v);
        free(m);
        return rc;
    }
    pthread_mutex_lock(&s->mask_lock);
    struct ksm_block_mask *m = mask_lookup(s, T, e->dev, q->dtype);
    int rc = m ? flex_run(e, m, out, q, k, v) : KSM_ENOMEM;
    pthread_mutex_unlock(&s->mask_lock);
    return rc;
}

bool ksm_seed_block_mask_stats(const ksm_seed *s, struct ksm_lru_stats *out)
{
    if (s->bp != &tf_flex) {
        memset(out, 0, sizeof *out);
        return false;
    }
    pthread_mutex_lock((pthread_mutex_t *)&s->mask_lock);
    *out = s->mask_stats;
    pthread_mutex_unlock((pthread_mutex_t *)&s->mask_lock);
    return true;
}

void ksm_seed_invalidate_caches(ksm_seed *s)
{
    if (s == NULL) return;
    pthread_mutex_lock(&s->mask_lock);
    for (int i = 0; i < s->n_masks; i++) free(s->masks[i]);
    s->mask_stats.invalidations += (uint64_t)s->n_masks;
    s->n_masks = 0;
    s->mask_stats.entries = 0;
    s->mask_stats.bytes = 0;
    pthread_mutex_unlock(&s->mask_lock);
}
