/*
 * The training state in a snapshot (docs/training.md#durability-and-checkpoints): a snapshot
 * restored into a fresh model gives back its configuration, train_step and momentum buffers, so
 * that training continues bit for bit (and without the momentum it does not); a journal record
 * ("slots") restored over a snapshot keeps the modules the model holds and installs those it does
 * not; a malformed training state is refused with nothing changed.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/safetensors.h"
#include "kasmina/training.h"
#include "kt.h"

static ksm_model *cnn(ksm_engine *e, const char *id)
{
    static const char *slots[] = {"r0c1", "r1c0"};
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .init_seed = 5};
    spec.cnn = (struct ksm_cnn_spec){.num_classes = 10,
                                     .n_blocks = 3,
                                     .base_channels = 8,
                                     .pool_layers = 3,
                                     .kernel_size = 3,
                                     .in_channels = 3};
    spec.pool_layers_set = true;
    spec.slots = slots;
    spec.n_slots = 2;
    return kt_model_new(e, id, spec);
}

struct batch {
    float xs[4 * 3 * 8 * 8];
    int64_t ys[4];
    ksm_tensor x, y;
};

static void batch_init(struct batch *b, int k)
{
    for (int i = 0; i < 4 * 3 * 8 * 8; i++)
        b->xs[i] = (float)(((i + 13 * k) * 37) % 11) / 11.0f - 0.5f;
    for (int i = 0; i < 4; i++) b->ys[i] = (i + k) % 10;
    ksm_tensor_init(&b->x, NULL, b->xs, KSM_DTYPE_F32, 4, (const int64_t[]){4, 3, 8, 8});
    ksm_tensor_init(&b->y, NULL, b->ys, KSM_DTYPE_I64, 1, (const int64_t[]){4});
}

static double step(ksm_model *m, int k)
{
    struct batch b;
    batch_init(&b, k);
    struct ksm_train_args a = {.input = &b.x, .targets = &b.y, .collect_gradients = -1};
    struct ksm_train_result r;
    char err[256];
    cr_assert_eq(ksm_model_train_step(m, &a, &r, err, sizeof err), 0, "%s", err);
    return r.loss;
}

/* ExportWeights' bytes (malloc'd) and their length. */
static void *weights(ksm_model *m, size_t *len)
{
    void *b = NULL;
    char err[256];
    cr_assert_eq(ksm_model_export_weights(m, &b, len, err, sizeof err), 0, "%s", err);
    return b;
}

/* Every tensor of a's ExportWeights equals b's, byte for byte, and they have the same names (the
 * slots' extra state, which carries timestamps, is not compared). */
static bool same_weights(ksm_model *a, ksm_model *b)
{
    size_t na, nb;
    void *wa = weights(a, &na), *wb = weights(b, &nb);
    ksm_st_file *fa = NULL, *fb = NULL;
    cr_assert_eq(ksm_st_parse(wa, na, &fa, NULL, 0), 0);
    cr_assert_eq(ksm_st_parse(wb, nb, &fb, NULL, 0), 0);
    bool same = ksm_st_count(fa) == ksm_st_count(fb);
    for (size_t i = 0; same && i < ksm_st_count(fa); i++) {
        const struct ksm_st_tensor *x = ksm_st_get(fa, i), *y = ksm_st_find(fb, x->name);
        same = y != NULL && x->nbytes == y->nbytes && memcmp(x->data, y->data, x->nbytes) == 0;
    }
    ksm_st_close(fa);
    ksm_st_close(fb);
    free(wa);
    free(wb);
    return same;
}

static size_t momentum(ksm_model *m, const char *slot)
{
    size_t n = 0;
    cr_assert_eq(ksm_model_training_momentum_bytes(m, slot, &n), 0);
    return n;
}

/* A: a seed in TRAINING, a configuration of its own, 3 steps: host and seed momentum. */
static ksm_model *trained(ksm_engine *e, const char *id)
{
    ksm_model *m = cnn(e, id);
    char err[256];
    struct ksm_training_config c;
    ksm_training_config_defaults(&c);
    c.host.lr = 0.05;
    c.seed.momentum = 0.8;
    c.max_grad_norm = 0.5;
    cr_assert_eq(ksm_model_configure_training(m, &c, false, err, sizeof err), 0, "%s", err);
    struct ksm_germinate_args g = {.blueprint_id = "conv_light", .init_seed = 3};
    cr_assert_eq(ksm_model_germinate(m, "r0c1", &g, NULL, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_advance(m, "r0c1", KSM_STAGE_TRAINING, NULL, NULL, err, sizeof err), 0,
                 "%s", err);
    for (int k = 0; k < 3; k++) step(m, k);
    cr_assert_gt(momentum(m, NULL), 0);
    cr_assert_gt(momentum(m, "r0c1"), 0);
    return m;
}

static void *snapshot(ksm_model *m, size_t *len, uint64_t *train_step)
{
    void *b = NULL;
    char err[256];
    cr_assert_eq(ksm_model_export_snapshot(m, &b, len, NULL, train_step, err, sizeof err), 0, "%s",
                 err);
    return b;
}

Test(train_state, snapshot_round_trip_continues_bit_for_bit)
{
    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *a = trained(e, "a");
    size_t n;
    uint64_t ts = 0;
    void *snap = snapshot(a, &n, &ts);
    cr_expect_eq(ts, 3);
    ksm_st_file *f = NULL;
    cr_assert_eq(ksm_st_parse(snap, n, &f, NULL, 0), 0);
    cr_expect_str_eq(ksm_st_metadata(f, "kasmina.train_step"), "3");
    cr_expect_not_null(ksm_st_find(f, "_kasmina_optim.host.blocks.0.conv.weight.momentum_buffer"));
    cr_expect_not_null(ksm_st_find(f, "_kasmina_optim.host.classifier.bias.momentum_buffer"));
    /* a buffer is its parameter's F32 shape */
    const struct ksm_st_tensor *p = ksm_st_find(f, "host.blocks.1.conv.weight"),
                               *q = ksm_st_find(f, "_kasmina_optim.host.blocks.1.conv.weight."
                                                   "momentum_buffer");
    cr_assert(p && q);
    cr_expect(q->dtype == KSM_DTYPE_F32 && q->ndim == p->ndim &&
              memcmp(q->shape, p->shape, sizeof p->shape) == 0);
    bool seed_buf = false;
    for (size_t i = 0; i < ksm_st_count(f); i++)
        seed_buf |=
            strncmp(ksm_st_get(f, i)->name, "_kasmina_optim.seed_slots.r0c1.seed.", 36) == 0;
    cr_expect(seed_buf, "no momentum buffer of the seed");
    ksm_st_close(f);

    char err[256];
    ksm_model *b = cnn(e, "b"), *c = cnn(e, "c");
    cr_assert_eq(ksm_model_restore_state(b, snap, n, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_restore_state(c, snap, n, err, sizeof err), 0, "%s", err);
    struct ksm_training_config ca, cb;
    uint64_t sa, sb;
    cr_assert_eq(ksm_model_training_config(a, &ca, &sa), 0);
    cr_assert_eq(ksm_model_training_config(b, &cb, &sb), 0);
    cr_expect(memcmp(&ca, &cb, sizeof ca) == 0, "the configuration did not come back");
    cr_expect_eq(sb, 3);
    cr_expect_eq(ksm_model_checkpoint_step(b), 3);
    cr_expect_eq(ksm_model_checkpoint_step(a), 0); /* a's snapshot is not durable anywhere */
    cr_expect_eq(momentum(b, NULL), momentum(a, NULL));
    cr_expect_eq(momentum(b, "r0c1"), momentum(a, "r0c1"));
    cr_expect(same_weights(a, b));
    /* the same batches: bit-identical losses and weights */
    for (int k = 3; k < 6; k++) {
        double la = step(a, k), lb = step(b, k);
        cr_expect_eq(la, lb, "step %d: %.9g vs %.9g", k, la, lb);
    }
    cr_expect(same_weights(a, b), "the restored model trained to other weights");
    /* the control: the momentum dropped, the same batches give other weights */
    cr_assert_eq(ksm_model_configure_training(c, &ca, true, err, sizeof err), 0, "%s", err);
    for (int k = 3; k < 6; k++) step(c, k);
    cr_expect(!same_weights(a, c), "without its momentum the model trained the same");
    free(snap);
    ksm_model_unref(a);
    ksm_model_unref(b);
    ksm_model_unref(c);
    ksm_engine_free(e);
}

Test(train_state, a_record_keeps_the_modules_the_model_holds)
{
    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *a = trained(e, "a");
    size_t n, rn, gn;
    uint64_t ts;
    void *snap = snapshot(a, &n, &ts);
    char err[256];
    for (int k = 3; k < 5; k++) step(a, k); /* the seed trains past the snapshot */
    const char *ids[] = {"r0c1"}, *ids2[] = {"r1c0"};
    void *rec = NULL, *grec = NULL;
    cr_assert_eq(ksm_model_export_state(a, ids, 1, &rec, &rn, NULL, err, sizeof err), 0, "%s", err);
    struct ksm_germinate_args g = {.blueprint_id = "norm", .init_seed = 8};
    cr_assert_eq(ksm_model_germinate(a, "r1c0", &g, NULL, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_export_state(a, ids2, 1, &grec, &gn, NULL, err, sizeof err), 0, "%s",
                 err);
    /* b: the snapshot, then the records; c: the snapshot alone, then the germination */
    ksm_model *b = cnn(e, "b"), *c = cnn(e, "c");
    cr_assert_eq(ksm_model_restore_state(b, snap, n, err, sizeof err), 0, "%s", err);
    size_t mom = momentum(b, "r0c1");
    cr_assert_eq(ksm_model_restore_state(b, rec, rn, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_restore_state(b, grec, gn, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_restore_state(c, snap, n, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_germinate(c, "r1c0", &g, NULL, err, sizeof err), 0, "%s", err);
    cr_expect(same_weights(b, c), "the record's trained seed tensors were installed");
    cr_expect_eq(momentum(b, "r0c1"), mom, "the kept seed lost its optimizer");
    cr_expect_eq(ksm_model_generation(b), ksm_model_generation(a));
    /* and both continue alike */
    for (int k = 10; k < 12; k++) cr_expect_eq(step(b, k), step(c, k));
    cr_expect(same_weights(b, c));
    free(snap);
    free(rec);
    free(grec);
    ksm_model_unref(a);
    ksm_model_unref(b);
    ksm_model_unref(c);
    ksm_engine_free(e);
}

/* snap re-serialised with one change: tensor `rename` (if non-NULL) renamed to `to` (to NULL:
 * flattened to 2 dimensions instead), metadata `key` set to `val` (val NULL: removed). */
static void *altered(const void *snap, size_t n, const char *rename, const char *to,
                     const char *key, const char *val, size_t *out_len)
{
    ksm_st_file *f = NULL;
    cr_assert_eq(ksm_st_parse(snap, n, &f, NULL, 0), 0);
    size_t nt = ksm_st_count(f);
    struct ksm_st_tensor *ts = calloc(nt, sizeof *ts);
    for (size_t i = 0; i < nt; i++) {
        ts[i] = *ksm_st_get(f, i);
        if (rename && strcmp(ts[i].name, rename) == 0) {
            if (to != NULL) {
                ts[i].name = to;
            } else {
                int64_t all = 1;
                for (int d = 0; d < ts[i].ndim; d++) all *= ts[i].shape[d];
                ts[i].shape[1] = all / ts[i].shape[0];
                ts[i].ndim = 2;
            }
        }
    }
    const char *meta[64];
    size_t nm = 0;
    const char *k;
    bool set = false;
    for (size_t i = 0; (k = ksm_st_metadata_key(f, i)) != NULL && nm < 31; i++) {
        if (key && strcmp(k, key) == 0) {
            set = true;
            if (val == NULL) continue;
            meta[2 * nm] = k;
            meta[2 * nm + 1] = val;
        } else {
            meta[2 * nm] = k;
            meta[2 * nm + 1] = ksm_st_metadata(f, k);
        }
        nm++;
    }
    if (key && !set && val) {
        meta[2 * nm] = key;
        meta[2 * nm + 1] = val;
        nm++;
    }
    void *out = NULL;
    cr_assert_eq(ksm_st_serialize(ts, nt, meta, nm, &out, out_len), 0);
    free(ts);
    ksm_st_close(f);
    return out;
}

Test(train_state, a_malformed_training_state_changes_nothing)
{
    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *a = trained(e, "a");
    size_t n;
    uint64_t ts;
    void *snap = snapshot(a, &n, &ts);
    ksm_model *b = trained(e, "b");
    for (int k = 3; k < 5; k++) step(b, k);
    static const struct {
        const char *rename, *to, *key, *val, *word;
    } cases[] = {
        {"_kasmina_optim.host.blocks.0.conv.weight.momentum_buffer",
         "_kasmina_optim.host.nope.momentum_buffer", NULL, NULL, "nope"},
        {"_kasmina_optim.host.blocks.0.conv.weight.momentum_buffer",
         "_kasmina_optim.host.blocks.1.conv.weight.momentum_buffer_x", NULL, NULL, "momentum"},
        {"_kasmina_optim.host.blocks.0.conv.weight.momentum_buffer", NULL, NULL, NULL, "shape"},
        {"_kasmina_optim.host.blocks.0.conv.weight.momentum_buffer",
         "_kasmina_optim.host.blocks.0.bn.running_mean.momentum_buffer", NULL, NULL,
         "running_mean"},
        {NULL, NULL, "kasmina.training", "{not json", "JSON"},
        {NULL, NULL, "kasmina.training", NULL, "kasmina.training"},
        {NULL, NULL, "kasmina.train_step", "-1", "train_step"},
        {NULL, NULL, "kasmina.training",
         "{\"config\":{\"host\":{\"lr\":0.01,\"momentum\":0.9,\"weight_decay\":0,\"dampening\":0,"
         "\"nesterov\":false},\"seed\":{\"lr\":0.01,\"momentum\":0.9,\"weight_decay\":0,"
         "\"dampening\":0,\"nesterov\":false},\"max_grad_norm\":1,\"gradient_telemetry_stride\":"
         "10,\"gradient_ratio_ema\":0.9,\"vanishing_threshold\":1e-7,\"exploding_threshold\":10},"
         "\"host_optimizer\":true,\"seed_optimizers\":{\"r1c0\":{\"fossilized\":false}}}",
         "r1c0"},
        {NULL, NULL, "kasmina.training",
         "{\"config\":{\"host\":{\"lr\":-1,\"momentum\":0.9,\"weight_decay\":0,\"dampening\":0,"
         "\"nesterov\":false},\"seed\":{\"lr\":0.01,\"momentum\":0.9,\"weight_decay\":0,"
         "\"dampening\":0,\"nesterov\":false},\"max_grad_norm\":1,\"gradient_telemetry_stride\":"
         "10,\"gradient_ratio_ema\":0.9,\"vanishing_threshold\":1e-7,\"exploding_threshold\":10},"
         "\"host_optimizer\":true,\"seed_optimizers\":{}}",
         "learning rate"},
    };
    size_t wn0;
    void *w0 = weights(b, &wn0);
    size_t hm = momentum(b, NULL), sm = momentum(b, "r0c1");
    uint64_t gen = ksm_model_generation(b), step0;
    cr_assert_eq(ksm_model_training_config(b, NULL, &step0), 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len;
        void *bad =
            altered(snap, n, cases[i].rename, cases[i].to, cases[i].key, cases[i].val, &len);
        char err[512] = "";
        cr_expect_eq(ksm_model_restore_state(b, bad, len, err, sizeof err), KSM_EFORMAT,
                     "case %zu restored (%s)", i, err);
        cr_expect(strstr(err, cases[i].word) != NULL, "case %zu: %s", i, err);
        free(bad);
        size_t wn;
        void *w = weights(b, &wn);
        uint64_t s;
        cr_assert_eq(ksm_model_training_config(b, NULL, &s), 0);
        cr_expect(wn == wn0 && memcmp(w, w0, wn) == 0 && s == step0 && momentum(b, NULL) == hm &&
                      momentum(b, "r0c1") == sm && ksm_model_generation(b) == gen,
                  "case %zu changed the model", i);
        free(w);
    }
    free(w0);
    free(snap);
    ksm_model_unref(a);
    ksm_model_unref(b);
    ksm_engine_free(e);
}
