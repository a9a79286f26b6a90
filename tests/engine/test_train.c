/*
 * Training (docs/training.md): the configuration, whole 5-step trajectories against the PyTorch
 * reference of esper's process_train_batch (tests/golden/train/: CNNs from gen_train.py,
 * transformers tf_* from gen_train_tf.py with esper's own TransformerHost and seeds), refused
 * requests that change nothing, dropout's keyed masks, and eval-mode forwards after a step.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/alloc.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kasmina/safetensors.h"
#include "kasmina/training.h"
#include "kt.h"

#define GDIR KSM_GOLDEN_DIR "/train"

/* ---- configuration ---- */

static ksm_model *small_cnn(ksm_engine *e, const char *id)
{
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN};
    spec.cnn = (struct ksm_cnn_spec){.num_classes = 10,
                                     .n_blocks = 3,
                                     .base_channels = 8,
                                     .pool_layers = 3,
                                     .kernel_size = 3,
                                     .in_channels = 3};
    spec.pool_layers_set = true;
    static const char *slots[] = {"r0c1", "r1c0"};
    spec.slots = slots;
    spec.n_slots = 2;
    ksm_model *m;
    char err[256];
    cr_assert_eq(ksm_engine_model_create(e, id, &spec, &m, err, sizeof err), 0, "%s", err);
    return m;
}

Test(train, config_defaults_and_validation)
{
    struct ksm_training_config c;
    ksm_training_config_defaults(&c);
    cr_expect_eq(c.host.lr, 0.01);
    cr_expect_eq(c.host.momentum, 0.9);
    cr_expect_eq(c.host.weight_decay, 5e-4);
    cr_expect_eq(c.seed.weight_decay, 0.0);
    cr_expect_eq(c.max_grad_norm, 1.0);
    cr_expect_eq(c.gradient_telemetry_stride, 10);
    cr_expect_eq(c.gradient_ratio_ema, 0.9);
    cr_expect_eq(c.vanishing_threshold, 1e-7);
    cr_expect_eq(c.exploding_threshold, 10.0);

    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *m = small_cnn(e, "cfg");
    struct ksm_training_config got;
    uint64_t step = 99;
    cr_assert_eq(ksm_model_training_config(m, &got, &step), 0);
    cr_expect_eq(step, 0);
    cr_expect_eq(memcmp(&got, &c, sizeof c), 0);
    char err[256] = "";
    uint64_t gen = ksm_model_generation(m);
    struct ksm_training_config bad[6];
    for (int i = 0; i < 6; i++) bad[i] = c;
    bad[0].host.lr = -1;
    bad[1].seed.momentum = 1.5;
    bad[2].host.nesterov = true, bad[2].host.dampening = 0.1;
    bad[3].max_grad_norm = NAN;
    bad[4].gradient_ratio_ema = 2;
    bad[5].seed.weight_decay = INFINITY;
    for (int i = 0; i < 6; i++) {
        err[0] = '\0';
        cr_expect_eq(ksm_model_configure_training(m, &bad[i], false, err, sizeof err), KSM_EINVAL,
                     "bad config %d accepted", i);
        cr_expect(err[0] != '\0', "bad config %d: no sentence", i);
    }
    cr_expect_eq(ksm_model_generation(m), gen);
    cr_assert_eq(ksm_model_training_config(m, &got, NULL), 0);
    cr_expect_eq(memcmp(&got, &c, sizeof c), 0);
    struct ksm_training_config ok = c;
    ok.host.lr = 0.1;
    ok.seed.nesterov = true;
    ok.gradient_telemetry_stride = 0;
    cr_assert_eq(ksm_model_configure_training(m, &ok, true, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_training_config(m, &got, &step), 0);
    cr_expect_eq(got.host.lr, 0.1);
    cr_expect(got.seed.nesterov);
    cr_expect_eq(got.gradient_telemetry_stride, 0);
    ksm_model_unref(m);
    ksm_engine_free(e);
}

/* ConfigureTraining with some fields: the merge starts from the configuration in force, a refused
 * merge or an invalid result changes nothing, and the caller gets what its call left. */
static int set_stride(void *ud, const struct ksm_training_config *in_force,
                      struct ksm_training_config *next, char *err, size_t errlen)
{
    cr_expect_eq(memcmp(in_force, next, sizeof *next), 0, "next is not the config in force");
    int v = *(int *)ud;
    if (v < 0) return ksm_errf(err, errlen, KSM_EINVAL, "stride %d is negative", v);
    next->gradient_telemetry_stride = (uint32_t)v;
    next->host.lr = v == 7 ? -1.0 : next->host.lr; /* 7: an invalid result */
    return 0;
}

static int set_ema(void *ud, const struct ksm_training_config *in_force,
                   struct ksm_training_config *next, char *err, size_t errlen)
{
    (void)in_force, (void)err, (void)errlen;
    next->gradient_ratio_ema = *(double *)ud;
    return 0;
}

Test(train, partial_update_merges_the_config_in_force)
{
    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *m = small_cnn(e, "upd");
    char err[256] = "";
    struct ksm_training_config got, def;
    ksm_training_config_defaults(&def);
    uint64_t step = 99;
    int v = 3;
    cr_assert_eq(ksm_model_update_training(m, set_stride, &v, false, &got, &step, err, sizeof err),
                 0, "%s", err);
    cr_expect_eq(step, 0);
    cr_expect_eq(got.gradient_telemetry_stride, 3);
    cr_expect_eq(got.host.lr, def.host.lr);
    double ema = 0.5;
    cr_assert_eq(ksm_model_update_training(m, set_ema, &ema, false, &got, NULL, err, sizeof err), 0,
                 "%s", err);
    cr_expect_eq(got.gradient_telemetry_stride, 3, "the second update undid the first");
    cr_expect_eq(got.gradient_ratio_ema, 0.5);
    /* refused by the merge, or invalid once merged: nothing changes */
    uint64_t gen = ksm_model_generation(m);
    int bad[] = {-2, 7};
    for (int i = 0; i < 2; i++) {
        err[0] = '\0';
        cr_expect_eq(
            ksm_model_update_training(m, set_stride, &bad[i], true, NULL, NULL, err, sizeof err),
            KSM_EINVAL);
        cr_expect(err[0] != '\0', "refusal %d has no sentence", i);
    }
    cr_expect_eq(ksm_model_generation(m), gen);
    cr_assert_eq(ksm_model_training_config(m, &got, NULL), 0);
    cr_expect_eq(got.gradient_telemetry_stride, 3);
    cr_expect_eq(got.gradient_ratio_ema, 0.5);
    cr_expect_eq(got.host.lr, def.host.lr);
    ksm_model_unref(m);
    ksm_engine_free(e);
}

/* A seed's optimizer is made at its first step and dropped (momentum lost) when the slot is
 * pruned / emptied or germinated again. */
Test(train, seed_optimizer_follows_the_lifecycle)
{
    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *m = small_cnn(e, "life");
    char err[256];
    struct ksm_slot_report rep;
    struct ksm_germinate_args g = {.blueprint_id = "conv_light", .init_seed = 3};
    cr_assert_eq(ksm_model_germinate(m, "r0c1", &g, &rep, err, sizeof err), 0, "%s", err);
    float xs[4 * 3 * 8 * 8];
    for (int i = 0; i < 4 * 3 * 8 * 8; i++) xs[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
    int64_t ys[4] = {1, 2, 3, 4};
    ksm_tensor x, y;
    ksm_tensor_init(&x, NULL, xs, KSM_DTYPE_F32, 4, (const int64_t[]){4, 3, 8, 8});
    ksm_tensor_init(&y, NULL, ys, KSM_DTYPE_I64, 1, (const int64_t[]){4});
    struct ksm_train_args a = {.input = &x, .targets = &y, .collect_gradients = -1};
    struct ksm_train_result r;
    size_t hb, sb;
    /* GERMINATED: stepped (a no-op: no gradient, no buffer), nothing collected */
    cr_assert_eq(ksm_model_train_step(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect_eq(r.n_stepped, 1);
    cr_expect_str_eq(r.stepped[0], "r0c1");
    cr_expect(!r.gradients_collected);
    cr_assert_eq(ksm_model_training_momentum_bytes(m, NULL, &hb), 0);
    cr_assert_eq(ksm_model_training_momentum_bytes(m, "r0c1", &sb), 0);
    cr_expect_gt(hb, 0);
    cr_expect_eq(sb, 0);
    /* TRAINING: the STE path trains the seed; stride 10 collects at train_step 0 mod 10 only */
    cr_assert_eq(ksm_model_advance(m, "r0c1", KSM_STAGE_TRAINING, NULL, &rep, err, sizeof err), 0,
                 "%s", err);
    cr_assert_eq(ksm_model_train_step(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect(!r.gradients_collected); /* train_step 1 */
    cr_expect_eq(r.train_step, 2);
    cr_assert_eq(ksm_model_training_momentum_bytes(m, "r0c1", &sb), 0);
    cr_expect_gt(sb, 0);
    a.collect_gradients = 1;
    cr_assert_eq(ksm_model_train_step(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect(r.gradients_collected);
    cr_expect_eq(r.n_seeds, 1);
    cr_expect_gt(r.seeds[0].grad_norm, 0);
    cr_expect_gt(r.host_grad_norm, 0);
    /* a step on another slot only leaves r0c1's optimizer alone */
    const char *only[] = {"r1c0"};
    a.slots = only;
    a.n_slots = 1;
    cr_assert_eq(ksm_model_train_step(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect_eq(r.n_stepped, 0);
    cr_expect(!r.gradients_collected);
    size_t sb2;
    cr_assert_eq(ksm_model_training_momentum_bytes(m, "r0c1", &sb2), 0);
    cr_expect_eq(sb2, sb);
    cr_expect_eq(ksm_model_training_momentum_bytes(m, "r7c7", &sb2), KSM_ENOSLOT);
    /* prune frees the seed: the optimizer goes with it */
    bool accepted = false;
    cr_assert_eq(ksm_model_prune(m, "r0c1", "test", "test", &accepted, &rep, err, sizeof err), 0,
                 "%s", err);
    cr_expect(accepted);
    cr_assert_eq(ksm_model_training_momentum_bytes(m, "r0c1", &sb), 0);
    cr_expect_eq(sb, 0);
    ksm_model_unref(m);
    ksm_engine_free(e);
}

/* ---- RecordMetrics(use_collected_gradients): esper's epoch-end fold ---- */

static ksm_model *fold_cnn(ksm_engine *e, const char *id, bool permissive)
{
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN, .permissive_gates = permissive};
    spec.cnn = (struct ksm_cnn_spec){.num_classes = 10,
                                     .n_blocks = 3,
                                     .base_channels = 8,
                                     .pool_layers = 3,
                                     .kernel_size = 3,
                                     .in_channels = 3};
    spec.pool_layers_set = true;
    static const char *slots[] = {"r0c1", "r1c0"};
    spec.slots = slots;
    spec.n_slots = 2;
    ksm_model *m;
    char err[256];
    cr_assert_eq(ksm_engine_model_create(e, id, &spec, &m, err, sizeof err), 0, "%s", err);
    return m;
}

struct fold_batch {
    float xs[4 * 3 * 8 * 8];
    int64_t ys[4];
    ksm_tensor x, y;
};

static void fold_batch_init(struct fold_batch *b)
{
    for (int i = 0; i < 4 * 3 * 8 * 8; i++) b->xs[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
    for (int i = 0; i < 4; i++) b->ys[i] = i + 1;
    ksm_tensor_init(&b->x, NULL, b->xs, KSM_DTYPE_F32, 4, (const int64_t[]){4, 3, 8, 8});
    ksm_tensor_init(&b->y, NULL, b->ys, KSM_DTYPE_I64, 1, (const int64_t[]){4});
}

/* One step on r0c1 only; collect 1 or 0. */
static void fold_step(ksm_model *m, struct fold_batch *b, int collect, struct ksm_train_result *r)
{
    static const char *only[] = {"r0c1"};
    struct ksm_train_args a = {.input = &b->x,
                               .targets = &b->y,
                               .slots = only,
                               .n_slots = 1,
                               .collect_gradients = collect};
    char err[256];
    cr_assert_eq(ksm_model_train_step(m, &a, r, err, sizeof err), 0, "%s", err);
    cr_assert_eq(r->gradients_collected, collect == 1);
    if (collect) {
        cr_assert_eq(r->n_seeds, 1);
        cr_assert_str_eq(r->seeds[0].slot_id, "r0c1");
    }
}

static void germinate_training(ksm_model *m, const char *seed_id)
{
    char err[256];
    struct ksm_germinate_args g = {
        .blueprint_id = "conv_light", .init_seed = 3, .seed_id = seed_id};
    cr_assert_eq(ksm_model_germinate(m, "r0c1", &g, NULL, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_advance(m, "r0c1", KSM_STAGE_TRAINING, NULL, NULL, err, sizeof err), 0,
                 "%s", err);
}

static int fold(ksm_model *m, double acc, struct ksm_slot_report *rep, char *err, size_t errlen)
{
    struct ksm_metrics_update u = {
        .has_val_accuracy = true, .val_accuracy = acc, .use_collected_gradients = true};
    return ksm_model_record_metrics(m, "r0c1", &u, rep, err, errlen);
}

static void expect_telemetry_of(const struct ksm_slot_report *rep,
                                const struct ksm_seed_grad_stats *s)
{
    cr_expect(rep->telemetry.has_gradient_norm);
    cr_expect_eq(rep->telemetry.gradient_norm, s->grad_norm);
    cr_expect(rep->telemetry.has_gradient_health);
    cr_expect_eq(rep->telemetry.gradient_health, s->gradient_health);
    cr_expect(rep->telemetry.has_vanishing_flag);
    cr_expect_eq(rep->telemetry.has_vanishing, s->has_vanishing);
    cr_expect(rep->telemetry.has_exploding_flag);
    cr_expect_eq(rep->telemetry.has_exploding, s->has_exploding);
}

Test(train, record_metrics_folds_the_collected_gradients)
{
    ksm_engine *e = kt_engine_cpu(1);
    ksm_model *m = fold_cnn(e, "fold", false);
    char err[256];
    struct ksm_slot_report rep;
    struct fold_batch b;
    fold_batch_init(&b);
    struct ksm_train_result r1, r2, r3, rn;
    germinate_training(m, "s1");
    /* nothing collected since germinate: refused, nothing changed (not even val_accuracy) */
    uint64_t gen = ksm_model_generation(m);
    cr_expect_eq(fold(m, 40.0, &rep, err, sizeof err), KSM_ESTAGE);
    cr_expect_eq(rep.metrics.epochs_total, 0);
    cr_expect_eq(ksm_model_generation(m), gen);
    fold_step(m, &b, 0, &rn); /* a step that does not collect changes nothing */
    cr_expect_eq(fold(m, 40.0, &rep, err, sizeof err), KSM_ESTAGE);

    /* first fold of the model's first seed: the EMA starts at 0.0 (beta 0.9, the default) */
    fold_step(m, &b, 1, &r1);
    double q1 = r1.seeds[0].normalized_ratio;
    cr_assert_gt(q1, 0.0);
    cr_assert_eq(fold(m, 40.0, &rep, err, sizeof err), 0, "%s", err);
    double ema = 0.1 * q1;
    cr_expect(rep.metrics.has_grad_ratio);
    cr_expect_float_eq(rep.metrics.seed_gradient_norm_ratio, ema, 1e-15 * fmax(1.0, ema));
    cr_expect_eq(rep.metrics.current_val_accuracy, 40.0); /* val_accuracy applied too */
    expect_telemetry_of(&rep, &r1.seeds[0]);

    /* a second collecting step: the EMA with beta, the telemetry of that step */
    fold_step(m, &b, 1, &r2);
    double q2 = r2.seeds[0].normalized_ratio;
    cr_assert_eq(fold(m, 41.0, &rep, err, sizeof err), 0, "%s", err);
    ema = 0.9 * ema + 0.1 * q2;
    cr_expect_float_eq(rep.metrics.seed_gradient_norm_ratio, ema, 1e-15 * fmax(1.0, ema));
    expect_telemetry_of(&rep, &r2.seeds[0]);
    /* folding again without a new step folds the same (last) statistics once more */
    cr_assert_eq(fold(m, 41.0, &rep, err, sizeof err), 0, "%s", err);
    ema = 0.9 * ema + 0.1 * q2;
    cr_expect_float_eq(rep.metrics.seed_gradient_norm_ratio, ema, 1e-15 * fmax(1.0, ema));

    /* beta comes from the training configuration */
    struct ksm_training_config c;
    cr_assert_eq(ksm_model_training_config(m, &c, NULL), 0);
    c.gradient_ratio_ema = 0.5;
    cr_assert_eq(ksm_model_configure_training(m, &c, false, err, sizeof err), 0, "%s", err);
    fold_step(m, &b, 1, &r3);
    cr_assert_eq(fold(m, 42.0, &rep, err, sizeof err), 0, "%s", err);
    ema = 0.5 * ema + 0.5 * r3.seeds[0].normalized_ratio;
    cr_expect_float_eq(rep.metrics.seed_gradient_norm_ratio, ema, 1e-15 * fmax(1.0, ema));
    expect_telemetry_of(&rep, &r3.seeds[0]);

    /* prune, cool down to empty, germinate again: the statistics went with the seed, and the
     * next seed's first ratio is taken as is */
    bool accepted = false;
    cr_assert_eq(ksm_model_prune(m, "r0c1", "test", "test", &accepted, NULL, err, sizeof err), 0,
                 "%s", err);
    cr_assert(accepted);
    for (int i = 0; i < 20; i++) {
        struct ksm_slot_report rr[2];
        size_t n = 0;
        cr_assert_eq(ksm_model_step_epoch(m, "r0c1", rr, 2, &n, err, sizeof err), 0, "%s", err);
        if (n == 1 && !rr[0].occupied) break;
    }
    germinate_training(m, "s2");
    cr_expect_eq(fold(m, 40.0, &rep, err, sizeof err), KSM_ESTAGE);
    fold_step(m, &b, 1, &r1);
    cr_assert_eq(fold(m, 40.0, &rep, err, sizeof err), 0, "%s", err);
    cr_expect_eq(rep.metrics.seed_gradient_norm_ratio, r1.seeds[0].normalized_ratio);
    expect_telemetry_of(&rep, &r1.seeds[0]);
    ksm_model_unref(m);
    ksm_engine_free(e);
}

static bool has_check(const char (*checks)[KSM_CHECK_MAX], int n, const char *prefix)
{
    for (int i = 0; i < n; i++)
        if (!strncmp(checks[i], prefix, strlen(prefix))) return true;
    return false;
}

/* G2 decided from folded gradients, strict (ratio EMA >= 0.10) and permissive (health >= 0.7,
 * no exploding flag); expectations computed here from the returned statistics. */
Test(train, g2_from_collected_gradients)
{
    ksm_engine *e = kt_engine_cpu(1);
    for (int mode = 0; mode < 2; mode++) {
        bool permissive = mode == 1;
        ksm_model *m = fold_cnn(e, permissive ? "g2p" : "g2s", permissive);
        char err[256];
        struct ksm_slot_report rep;
        struct fold_batch b;
        fold_batch_init(&b);
        struct ksm_train_result r;
        germinate_training(m, "g2");
        /* not enough epochs yet, but the gradient checks already read the fold */
        double ema = 0.0, beta = 0.9;
        struct ksm_seed_grad_stats last = {0};
        for (int k = 0; k < 10; k++) {
            fold_step(m, &b, 1, &r);
            last = r.seeds[0];
            ema = beta * ema + (1 - beta) * last.normalized_ratio;
            cr_assert_eq(fold(m, 40.0 + k, &rep, err, sizeof err), 0, "%s", err);
        }
        cr_expect_float_eq(rep.metrics.seed_gradient_norm_ratio, ema, 1e-12 * fmax(1.0, ema));
        cr_expect_eq(rep.metrics.epochs_in_current_stage, 10);
        struct ksm_gate_result g;
        cr_assert_eq(ksm_model_advance(m, "r0c1", KSM_STAGE_BLENDING, &g, &rep, err, sizeof err), 0,
                     "%s", err);
        cr_expect_eq(g.gate, KSM_GATE_G2);
        bool want;
        if (permissive) {
            want = !last.has_exploding && last.gradient_health >= 0.7;
            cr_expect(!has_check(g.checks_failed, g.n_failed, "gradient_health_not_measured"));
            if (last.has_exploding)
                cr_expect(has_check(g.checks_failed, g.n_failed, "exploding_gradients"));
            else
                cr_expect(has_check(want ? g.checks_passed : g.checks_failed,
                                    want ? g.n_passed : g.n_failed,
                                    want ? "gradient_health_" : "gradient_health_low_"));
        } else {
            want = ema >= 0.10; /* improvement 9 points >= 0.5, 10 epochs */
            cr_expect(!has_check(g.checks_failed, g.n_failed, "gradient_stats_never_measured"));
            cr_expect(has_check(want ? g.checks_passed : g.checks_failed,
                                want ? g.n_passed : g.n_failed,
                                want ? "seed_gradient_active_" : "seed_gradient_low_"));
        }
        cr_expect_eq(g.passed, want, "%s G2: passed %d, ratio ema %g, health %g, exploding %d",
                     permissive ? "permissive" : "strict", g.passed, ema, last.gradient_health,
                     last.has_exploding);
        cr_expect_eq(rep.stage, want ? KSM_STAGE_BLENDING : KSM_STAGE_TRAINING);
        ksm_model_unref(m);
    }
    ksm_engine_free(e);
}

/* ---- golden trajectories ---- */

static void spec_from_json(json_t *j, struct ksm_model_spec *spec, const char **slots, int *n)
{
    memset(spec, 0, sizeof *spec);
    json_t *sl = json_object_get(j, "slots");
    *n = (int)json_array_size(sl);
    for (int i = 0; i < *n; i++) slots[i] = json_string_value(json_array_get(sl, (size_t)i));
    spec->slots = slots;
    spec->n_slots = *n;
    json_t *seed = json_object_get(j, "init_seed");
    if (seed) spec->init_seed = strtoull(json_string_value(seed), NULL, 10);
    json_t *tf = json_object_get(j, "transformer");
    if (tf) {
        spec->topology = KSM_TOPOLOGY_TRANSFORMER;
        struct ksm_transformer_spec *t = &spec->transformer;
        t->vocab_size = (uint32_t)json_integer_value(json_object_get(tf, "vocab_size"));
        t->n_embd = (uint32_t)json_integer_value(json_object_get(tf, "n_embd"));
        t->n_head = (uint32_t)json_integer_value(json_object_get(tf, "n_head"));
        t->n_layer = (uint32_t)json_integer_value(json_object_get(tf, "n_layer"));
        t->block_size = (uint32_t)json_integer_value(json_object_get(tf, "block_size"));
        t->num_segments = (uint32_t)json_integer_value(json_object_get(tf, "num_segments"));
        t->dropout = json_number_value(json_object_get(tf, "dropout"));
        t->dropout_set = true;
        return;
    }
    json_t *c = json_object_get(j, "cnn");
    spec->topology = KSM_TOPOLOGY_CNN;
    spec->cnn.num_classes = (uint32_t)json_integer_value(json_object_get(c, "num_classes"));
    spec->cnn.n_blocks = (uint32_t)json_integer_value(json_object_get(c, "n_blocks"));
    spec->cnn.base_channels = (uint32_t)json_integer_value(json_object_get(c, "base_channels"));
    spec->cnn.pool_layers = (int32_t)json_integer_value(json_object_get(c, "pool_layers"));
    spec->pool_layers_set = true;
    spec->cnn.kernel_size = (uint32_t)json_integer_value(json_object_get(c, "kernel_size"));
    spec->cnn.in_channels = (uint32_t)json_integer_value(json_object_get(c, "in_channels"));
}

struct loaded {
    ksm_st_file *io;
    json_t *spec_json;
    ksm_model *m;
    int steps;
    double lr, max_grad_norm;
};

static void load_case(ksm_engine *e, const char *name, const char *id, struct loaded *L)
{
    char path[512], err[512] = "";
    snprintf(path, sizeof path, GDIR "/%s.io.safetensors", name);
    cr_assert_eq(ksm_st_open(path, &L->io, err, sizeof err), 0, "%s: %s", path, err);
    json_error_t je;
    L->spec_json = json_loads(ksm_st_metadata(L->io, "spec"), 0, &je);
    json_t *cfg = json_loads(ksm_st_metadata(L->io, "config"), 0, &je);
    cr_assert(L->spec_json && cfg);
    L->lr = json_number_value(json_object_get(cfg, "lr"));
    L->max_grad_norm = json_number_value(json_object_get(cfg, "max_grad_norm"));
    json_decref(cfg);
    L->steps = atoi(ksm_st_metadata(L->io, "steps"));
    struct ksm_model_spec spec;
    static const char *slots[KSM_MAX_SLOTS];
    int n_slots;
    spec_from_json(L->spec_json, &spec, slots, &n_slots);
    int rc = ksm_engine_model_create(e, id, &spec, &L->m, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: create: %s", name, err);
    size_t wlen;
    snprintf(path, sizeof path, GDIR "/%s.weights.safetensors", name);
    void *w = kt_read_file(path, &wlen);
    struct ksm_load_result lr;
    rc = ksm_model_load_weights(L->m, w, wlen, n_slots > 0, &lr, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: load: %s (%s)", name, err, ksm_err_name(rc));
    ksm_load_result_free(&lr);
    free(w);
    struct ksm_training_config c;
    ksm_training_config_defaults(&c);
    c.host.lr = c.seed.lr = L->lr;
    c.max_grad_norm = L->max_grad_norm;
    cr_assert_eq(ksm_model_configure_training(L->m, &c, false, err, sizeof err), 0, "%s", err);
}

static void unload(struct loaded *L)
{
    json_decref(L->spec_json);
    ksm_st_close(L->io);
}

static int step_k(struct loaded *L, int k, struct ksm_train_result *r, char *err, size_t errlen)
{
    char nx[32], ny[32];
    snprintf(nx, sizeof nx, "x.%d", k);
    snprintf(ny, sizeof ny, "y.%d", k);
    ksm_tensor x, y;
    kt_golden_host_tensor(kt_golden_need(L->io, nx), &x);
    kt_golden_host_tensor(kt_golden_need(L->io, ny), &y);
    struct ksm_train_args a = {.input = &x, .targets = &y, .collect_gradients = 1};
    int rc = ksm_model_train_step(L->m, &a, r, err, errlen);
    free(x.data);
    free(y.data);
    return rc;
}

/* Every final.* tensor of the fixture against the model's export. Returns the worst rel. */
static double compare_final(struct loaded *L, const char *name, double tol)
{
    void *buf;
    size_t len;
    char err[256];
    cr_assert_eq(ksm_model_export_weights(L->m, &buf, &len, err, sizeof err), 0, "%s", err);
    ksm_st_file *ex;
    cr_assert_eq(ksm_st_parse(buf, len, &ex, err, sizeof err), 0, "%s", err);
    double worst = 0;
    int n = 0;
    for (size_t i = 0; i < ksm_st_count(L->io); i++) {
        const struct ksm_st_tensor *ref = ksm_st_get(L->io, i);
        if (strncmp(ref->name, "final.", 6) != 0) continue;
        const struct ksm_st_tensor *got = ksm_st_find(ex, ref->name + 6);
        cr_assert(got != NULL, "%s: export lacks %s", name, ref->name + 6);
        cr_assert_eq(got->nbytes, ref->nbytes, "%s: %s size", name, ref->name);
        n++;
        if (strstr(ref->name, "num_batches_tracked")) {
            int64_t a, b;
            memcpy(&a, got->data, 8);
            memcpy(&b, ref->data, 8);
            cr_expect_eq(a, b, "%s: %s = %lld, expected %lld", name, ref->name, (long long)a,
                         (long long)b);
            continue;
        }
        char what[160];
        snprintf(what, sizeof what, "%s: %s", name, ref->name);
        float *g = kt_golden_floats(got), *r = kt_golden_floats(ref);
        double rel = kt_golden_expect_f32(what, g, r, (int64_t)(ref->nbytes / 4), tol);
        if (rel > worst) worst = rel;
        free(g);
        free(r);
    }
    cr_expect_gt(n, 0);
    ksm_st_close(ex);
    free(buf);
    return worst;
}

static double relerr(double got, double ref) { return fabs(got - ref) / fmax(fabs(ref), 1e-12); }

ParameterizedTestParameters(train, golden)
{
    return kt_golden_dir_cases("train", ".io.safetensors");
}

ParameterizedTest(struct kt_golden_case *gc, train, golden)
{
    ksm_engine *e = kt_engine_cpu(1);
    struct loaded L;
    load_case(e, gc->name, gc->name, &L);
    float *loss = kt_golden_floats(kt_golden_need(L.io, "loss"));
    float *hn = kt_golden_floats(kt_golden_need(L.io, "host_grad_norm"));
    const struct ksm_st_tensor *ct = kt_golden_need(L.io, "correct");
    const struct ksm_st_tensor *y0 = kt_golden_need(L.io, "y.0");
    uint64_t rows = 1; /* loss rows: images, or B * T tokens */
    for (int d = 0; d < y0->ndim; d++) rows *= (uint64_t)y0->shape[d];
    double worst_loss = 0, worst_norm = 0;
    char err[512];
    for (int k = 0; k < L.steps; k++) {
        struct ksm_train_result r;
        int rc = step_k(&L, k, &r, err, sizeof err);
        cr_assert_eq(rc, 0, "%s step %d: %s (%s)", gc->name, k, err, ksm_err_name(rc));
        double le = relerr(r.loss, loss[k]);
        if (le > worst_loss) worst_loss = le;
        cr_expect_leq(le, 1e-5, "%s step %d: loss %.9g, expected %.9g", gc->name, k, r.loss,
                      (double)loss[k]);
        int64_t corr;
        memcpy(&corr, (const char *)ct->data + 8 * k, 8);
        cr_expect_eq(r.correct, (uint64_t)corr, "%s step %d: correct", gc->name, k);
        cr_expect_eq(r.total, rows);
        cr_expect_eq(r.train_step, (uint64_t)k + 1);
        if (r.gradients_collected) {
            double ne = relerr(r.host_grad_norm, hn[k]);
            if (ne > worst_norm) worst_norm = ne;
            cr_expect_leq(ne, 1e-4, "%s step %d: host grad norm %.9g, expected %.9g", gc->name, k,
                          r.host_grad_norm, (double)hn[k]);
            for (int s = 0; s < r.n_seeds; s++) {
                char nm[64];
                snprintf(nm, sizeof nm, "seed_grad_norm.%s", r.seeds[s].slot_id);
                const struct ksm_st_tensor *t = ksm_st_find(L.io, nm);
                cr_assert(t != NULL, "%s: stats for %s, not a TRAINING/BLENDING seed", gc->name,
                          r.seeds[s].slot_id);
                float ref;
                memcpy(&ref, (const char *)t->data + 4 * k, 4);
                double se = relerr(r.seeds[s].grad_norm, ref);
                if (se > worst_norm) worst_norm = se;
                cr_expect_leq(se, 1e-4, "%s step %d: %s grad norm %.9g, expected %.9g", gc->name, k,
                              r.seeds[s].slot_id, r.seeds[s].grad_norm, (double)ref);
            }
        }
    }
    double wp = compare_final(&L, gc->name, 1e-4);
    fprintf(stderr, "train %-18s loss rel %.2g, grad norm rel %.2g, final params rel %.2g\n",
            gc->name, worst_loss, worst_norm, wp);
    free(loss);
    free(hn);
    unload(&L);
    ksm_model_unref(L.m);
    ksm_engine_free(e);
}

Test(train, at_least_21_fixtures)
{
    /* 12 CNN, 9 transformer (tf_*) */
    cr_expect_geq(kt_golden_dir_count("train", ".io.safetensors"), 21);
}

/* ---- refused requests change nothing ---- */

static void *export_all(ksm_model *m, size_t *len)
{
    void *buf;
    char err[256];
    cr_assert_eq(ksm_model_export_weights(m, &buf, len, err, sizeof err), 0, "%s", err);
    return buf;
}

Test(train, refused_requests_change_nothing)
{
    ksm_engine *e = kt_engine_cpu(1);
    struct loaded L;
    load_case(e, "add", "bad", &L);
    char err[512];
    struct ksm_train_result r;
    /* one good step so that momentum buffers exist */
    cr_assert_eq(step_k(&L, 0, &r, err, sizeof err), 0, "%s", err);
    size_t len0;
    void *w0 = export_all(L.m, &len0);
    uint64_t gen0 = ksm_model_generation(L.m), step0;
    ksm_model_training_config(L.m, NULL, &step0);

    ksm_tensor x, y;
    kt_golden_host_tensor(kt_golden_need(L.io, "x.1"), &x);
    kt_golden_host_tensor(kt_golden_need(L.io, "y.1"), &y);
    int64_t *yv = y.data;
    struct ksm_train_args a = {.input = &x, .targets = &y, .collect_gradients = 1};
    /* target out of range */
    int64_t keep = yv[3];
    yv[3] = 10;
    cr_expect_eq(ksm_model_train_step(L.m, &a, &r, err, sizeof err), KSM_EINVAL);
    yv[3] = -1;
    cr_expect_eq(ksm_model_train_step(L.m, &a, &r, err, sizeof err), KSM_EINVAL);
    yv[3] = keep;
    /* wrong target shape and dtype */
    ksm_tensor y2 = y;
    y2.shape[0] = 7;
    cr_expect_eq(ksm_model_train_step(L.m, &(struct ksm_train_args){.input = &x, .targets = &y2},
                                      &r, err, sizeof err),
                 KSM_ESHAPE);
    y2 = y;
    y2.dtype = KSM_DTYPE_F32;
    cr_expect_eq(ksm_model_train_step(L.m, &(struct ksm_train_args){.input = &x, .targets = &y2},
                                      &r, err, sizeof err),
                 KSM_EDTYPE);
    /* no targets, unknown slot, bad collect flag */
    cr_expect_eq(
        ksm_model_train_step(L.m, &(struct ksm_train_args){.input = &x}, &r, err, sizeof err),
        KSM_EINVAL);
    const char *nope[] = {"r9c9"};
    cr_expect_eq(
        ksm_model_train_step(
            L.m, &(struct ksm_train_args){.input = &x, .targets = &y, .slots = nope, .n_slots = 1},
            &r, err, sizeof err),
        KSM_ENOSLOT);
    cr_expect_eq(ksm_model_train_step(
                     L.m,
                     &(struct ksm_train_args){.input = &x, .targets = &y, .collect_gradients = 2},
                     &r, err, sizeof err),
                 KSM_EINVAL);
    size_t len1;
    void *w1 = export_all(L.m, &len1);
    cr_expect_eq(len0, len1);
    cr_expect_eq(memcmp(w0, w1, len0), 0, "a refused step changed the weights or buffers");
    uint64_t step1;
    ksm_model_training_config(L.m, NULL, &step1);
    cr_expect_eq(step1, step0);
    cr_expect_eq(ksm_model_generation(L.m), gen0);
    free(w1);

    /* momentum intact: the next good steps still follow the reference */
    for (int k = 1; k < L.steps; k++)
        cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "%s", err);
    compare_final(&L, "add after refusals", 1e-4);
    free(w0);
    free(x.data);
    free(y.data);
    unload(&L);
    ksm_model_unref(L.m);
    ksm_engine_free(e);
}

Test(train, batchnorm_needs_two_values_per_channel)
{
    /* pool_layers 2 of 3 blocks: a 4x4 input reaches the last block at 1x1 */
    ksm_engine *e = kt_engine_cpu(1);
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN};
    spec.cnn = (struct ksm_cnn_spec){.num_classes = 10,
                                     .n_blocks = 3,
                                     .base_channels = 4,
                                     .pool_layers = 2,
                                     .kernel_size = 3,
                                     .in_channels = 3};
    spec.pool_layers_set = true;
    ksm_model *m;
    char err[256];
    cr_assert_eq(ksm_engine_model_create(e, "bn1", &spec, &m, err, sizeof err), 0, "%s", err);
    float xs[2 * 3 * 4 * 4] = {0};
    int64_t ys[2] = {1, 2};
    ksm_tensor x, y;
    ksm_tensor_init(&x, NULL, xs, KSM_DTYPE_F32, 4, (const int64_t[]){1, 3, 4, 4});
    ksm_tensor_init(&y, NULL, ys, KSM_DTYPE_I64, 1, (const int64_t[]){1});
    struct ksm_train_result r;
    uint64_t gen = ksm_model_generation(m);
    err[0] = '\0';
    cr_expect_eq(ksm_model_train_step(m, &(struct ksm_train_args){.input = &x, .targets = &y}, &r,
                                      err, sizeof err),
                 KSM_EINVAL);
    cr_expect(strstr(err, "BatchNorm") != NULL, "%s", err);
    cr_expect_eq(ksm_model_generation(m), gen);
    /* two rows are enough */
    ksm_tensor_init(&x, NULL, xs, KSM_DTYPE_F32, 4, (const int64_t[]){2, 3, 4, 4});
    ksm_tensor_init(&y, NULL, ys, KSM_DTYPE_I64, 1, (const int64_t[]){2});
    cr_expect_eq(ksm_model_train_step(m, &(struct ksm_train_args){.input = &x, .targets = &y}, &r,
                                      err, sizeof err),
                 0, "%s", err);
    cr_expect_eq(r.train_step, 1);
    cr_expect(!r.gradients_collected); /* no seed in TRAINING or BLENDING */
    ksm_model_unref(m);
    ksm_engine_free(e);
}

/* ---- eval-mode forward after training ---- */

Test(train, forward_after_step_equals_fresh_model)
{
    ksm_engine *e = kt_engine_cpu(1);
    const char *cases[] = {"host_clip", "add", "tf_gate", "tf_dropout"};
    for (int ci = 0; ci < 4; ci++) {
        struct loaded L;
        char id[32];
        snprintf(id, sizeof id, "trained-%d", ci);
        load_case(e, cases[ci], id, &L);
        ksm_tensor x;
        kt_golden_host_tensor(kt_golden_need(L.io, "x.0"), &x);
        struct ksm_forward_args fa = {.input = &x};
        struct ksm_forward_result before, after, fresh;
        char err[512];
        /* a forward first, so that its plan exists before the steps */
        cr_assert_eq(ksm_model_forward(L.m, &fa, &before, err, sizeof err), 0, "%s", err);
        struct ksm_train_result r;
        for (int k = 0; k < L.steps; k++)
            cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "%s", err);
        cr_assert_eq(ksm_model_forward(L.m, &fa, &after, err, sizeof err), 0, "%s", err);
        cr_expect_neq(
            memcmp(before.output.data, after.output.data, ksm_tensor_nbytes(&after.output)), 0,
            "the forward did not see the trained weights");
        /* a fresh model with the trained weights (and the same slots) */
        void *w;
        size_t len;
        cr_assert_eq(ksm_model_export_weights(L.m, &w, &len, err, sizeof err), 0, "%s", err);
        struct ksm_model_spec spec;
        const char *slots[KSM_MAX_SLOTS];
        int n_slots;
        spec_from_json(L.spec_json, &spec, slots, &n_slots);
        ksm_model *m2;
        snprintf(id, sizeof id, "fresh-%d", ci);
        cr_assert_eq(ksm_engine_model_create(e, id, &spec, &m2, err, sizeof err), 0, "%s", err);
        struct ksm_load_result lr;
        cr_assert_eq(ksm_model_load_weights(m2, w, len, n_slots > 0, &lr, err, sizeof err), 0, "%s",
                     err);
        ksm_load_result_free(&lr);
        cr_assert_eq(ksm_model_forward(m2, &fa, &fresh, err, sizeof err), 0, "%s", err);
        cr_expect_eq(memcmp(fresh.output.data, after.output.data, ksm_tensor_nbytes(&after.output)),
                     0, "%s: forward after training differs from a fresh model", cases[ci]);
        ksm_host_tensor_free(&before.output);
        ksm_host_tensor_free(&after.output);
        ksm_host_tensor_free(&fresh.output);
        free(w);
        free(x.data);
        unload(&L);
        ksm_model_unref(L.m);
        ksm_model_unref(m2);
    }
    ksm_engine_free(e);
}

/* ---- the transformer host ---- */

/* Targets of a transformer are [B, T] token ids below the vocabulary; anything else is refused
 * with a sentence naming them, and nothing changes. */
Test(train, transformer_targets_are_validated)
{
    ksm_engine *e = kt_engine_cpu(1);
    struct loaded L;
    load_case(e, "tf_add", "tfbad", &L);
    char err[512];
    struct ksm_train_result r;
    cr_assert_eq(step_k(&L, 0, &r, err, sizeof err), 0, "%s", err);
    cr_expect_eq(r.total, 21);
    size_t len0;
    void *w0 = export_all(L.m, &len0);
    uint64_t gen0 = ksm_model_generation(L.m), step0;
    ksm_model_training_config(L.m, NULL, &step0);
    ksm_tensor x, y;
    kt_golden_host_tensor(kt_golden_need(L.io, "x.1"), &x);
    kt_golden_host_tensor(kt_golden_need(L.io, "y.1"), &y);
    int64_t *yv = y.data;
    struct ksm_train_args a = {.input = &x, .targets = &y, .collect_gradients = 1};
    struct {
        int64_t value;
        const char *what;
    } bad[] = {{17, "vocabulary"}, {-1, "vocabulary"}, {1 << 20, "vocabulary"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t keep = yv[9];
        yv[9] = bad[i].value;
        err[0] = '\0';
        cr_expect_eq(ksm_model_train_step(L.m, &a, &r, err, sizeof err), KSM_EINVAL);
        cr_expect(strstr(err, "targets[1][2]") && strstr(err, bad[i].what), "%s", err);
        yv[9] = keep;
    }
    ksm_tensor y2 = y; /* one id per row: a CNN's targets */
    y2.ndim = 1;
    y2.shape[0] = 3;
    err[0] = '\0';
    cr_expect_eq(ksm_model_train_step(L.m, &(struct ksm_train_args){.input = &x, .targets = &y2},
                                      &r, err, sizeof err),
                 KSM_ESHAPE);
    cr_expect(strstr(err, "targets") && strstr(err, "[3, 7]"), "%s", err);
    y2 = y;
    y2.shape[1] = 6;
    cr_expect_eq(ksm_model_train_step(L.m, &(struct ksm_train_args){.input = &x, .targets = &y2},
                                      &r, err, sizeof err),
                 KSM_ESHAPE);
    y2 = y;
    y2.dtype = KSM_DTYPE_F32;
    cr_expect_eq(ksm_model_train_step(L.m, &(struct ksm_train_args){.input = &x, .targets = &y2},
                                      &r, err, sizeof err),
                 KSM_EDTYPE);
    size_t len1;
    void *w1 = export_all(L.m, &len1);
    cr_expect(len0 == len1 && memcmp(w0, w1, len0) == 0, "a refused step changed the model");
    uint64_t step1;
    ksm_model_training_config(L.m, NULL, &step1);
    cr_expect_eq(step1, step0);
    cr_expect_eq(ksm_model_generation(L.m), gen0);
    /* the momentum is intact: the rest of the trajectory still follows PyTorch */
    for (int k = 1; k < L.steps; k++)
        cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "%s", err);
    compare_final(&L, "tf_add after refusals", 1e-4);
    free(w0);
    free(w1);
    free(x.data);
    free(y.data);
    unload(&L);
    ksm_model_unref(L.m);
    ksm_engine_free(e);
}

/* A small transformer with dropout p: a fresh model with the given init_seed and the weights
 * of tf_host_clip; returns the losses of three steps on the fixture's batches. */
static void dropout_run(ksm_engine *e, const char *id, double p, uint64_t init_seed, double *losses)
{
    struct loaded L;
    load_case(e, "tf_host_clip", id, &L);
    ksm_model_unref(L.m);
    struct ksm_model_spec spec;
    const char *slots[KSM_MAX_SLOTS];
    int n_slots;
    spec_from_json(L.spec_json, &spec, slots, &n_slots);
    spec.transformer.dropout = p;
    spec.init_seed = init_seed;
    char err[512], id2[64];
    snprintf(id2, sizeof id2, "%s-2", id);
    cr_assert_eq(ksm_engine_model_create(e, id2, &spec, &L.m, err, sizeof err), 0, "%s", err);
    size_t wlen;
    void *w = kt_read_file(GDIR "/tf_host_clip.weights.safetensors", &wlen);
    struct ksm_load_result lr;
    cr_assert_eq(ksm_model_load_weights(L.m, w, wlen, true, &lr, err, sizeof err), 0, "%s", err);
    ksm_load_result_free(&lr);
    free(w);
    struct ksm_training_config tc;
    ksm_training_config_defaults(&tc);
    tc.host.lr = tc.seed.lr = L.lr;
    tc.max_grad_norm = L.max_grad_norm;
    cr_assert_eq(ksm_model_configure_training(L.m, &tc, false, err, sizeof err), 0, "%s", err);
    struct ksm_model_info info;
    cr_assert_eq(ksm_model_get_info(L.m, &info), 0);
    cr_expect_eq(info.transformer.dropout, p);
    for (int k = 0; k < 3; k++) {
        struct ksm_train_result r;
        cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "%s", err);
        losses[k] = r.loss;
    }
    unload(&L);
    ksm_model_unref(L.m);
}

/* Dropout is deterministic: the masks are keyed by (init_seed, train_step, site, element), so
 * the same model trains the same way twice; another init_seed or p draws other masks; p 0 is
 * the reference (tf_host_clip's PyTorch losses). */
Test(train, transformer_dropout_is_keyed_by_init_seed_and_step)
{
    ksm_engine *e = kt_engine_cpu(1);
    double a[3], b[3], c[3], z[3];
    dropout_run(e, "da", 0.3, 11, a);
    dropout_run(e, "db", 0.3, 11, b);
    dropout_run(e, "dc", 0.3, 12, c);
    dropout_run(e, "dz", 0.0, 11, z);
    for (int k = 0; k < 3; k++) {
        cr_expect_eq(a[k], b[k], "step %d: %.9g vs %.9g with the same key", k, a[k], b[k]);
        cr_expect_neq(a[k], c[k], "step %d: another init_seed gave the same loss", k);
        cr_expect_neq(a[k], z[k], "step %d: dropout 0.3 changed nothing", k);
    }
    struct ksm_st_file *io;
    char err[256];
    cr_assert_eq(ksm_st_open(GDIR "/tf_host_clip.io.safetensors", &io, err, sizeof err), 0);
    float *ref = kt_golden_floats(kt_golden_need(io, "loss"));
    for (int k = 0; k < 3; k++) cr_expect_leq(relerr(z[k], ref[k]), 1e-5, "p 0, step %d", k);
    free(ref);
    ksm_st_close(io);
    ksm_engine_free(e);
}

/* The default dropout is esper's 0.1; a value outside [0, 1) is refused at creation. */
Test(train, transformer_dropout_spec)
{
    ksm_engine *e = kt_engine_cpu(1);
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_TRANSFORMER};
    spec.transformer = (struct ksm_transformer_spec){.vocab_size = 17,
                                                     .n_embd = 16,
                                                     .n_head = 2,
                                                     .n_layer = 2,
                                                     .block_size = 8,
                                                     .num_segments = 2};
    ksm_model *m;
    char err[256];
    cr_assert_eq(ksm_engine_model_create(e, "d0", &spec, &m, err, sizeof err), 0, "%s", err);
    struct ksm_model_info info;
    cr_assert_eq(ksm_model_get_info(m, &info), 0);
    cr_expect_eq(info.transformer.dropout, 0.1);
    ksm_model_unref(m);
    const double bad[] = {1.0, -0.5, NAN};
    for (int i = 0; i < 3; i++) {
        spec.transformer.dropout = bad[i];
        spec.transformer.dropout_set = true;
        err[0] = '\0';
        cr_expect_eq(ksm_engine_model_create(e, "d1", &spec, &m, err, sizeof err), KSM_EINVAL);
        cr_expect(strstr(err, "transformer.dropout") != NULL, "%s", err);
    }
    ksm_engine_free(e);
}

/* Steady state: after the first steps (arena sized, momentum buffers made) a step makes no
 * request to the caching allocator (the gradient norms' scratch lives in the step's arena), takes
 * no new device segment and leaves no block allocated: a CNN with three blueprints, transformers
 * with dropout and with a flex_attention seed. */
Test(train, steady_state_allocations)
{
    const char *cases[] = {"blueprints_a", "tf_dropout", "tf_gate"};
    for (int ci = 0; ci < 3; ci++) {
        ksm_engine *e = kt_engine_cpu(1);
        struct loaded L;
        load_case(e, cases[ci], "alloc", &L);
        ksm_allocator *al = ksm_engine_allocator(e, ksm_engine_default_device(e));
        cr_assert(al != NULL);
        char err[512];
        struct ksm_train_result r;
        for (int k = 0; k < 2; k++) cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "%s", err);
        struct ksm_mem_stats s0, s1;
        ksm_alloc_get_stats(al, &s0);
        for (int k = 2; k < L.steps; k++)
            cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "%s", err);
        ksm_alloc_get_stats(al, &s1);
        const struct ksm_pool_stats *a = &s0.pool[KSM_POOL_ALL], *b = &s1.pool[KSM_POOL_ALL];
        int n = L.steps - 2;
        fprintf(stderr,
                "train steady state %s: %.1f block handouts/step (cached), %lld new segments, "
                "%lld blocks still allocated\n",
                cases[ci], (double)(b->allocation.allocated - a->allocation.allocated) / n,
                (long long)(b->segment.allocated - a->segment.allocated),
                (long long)(b->allocation.current - a->allocation.current));
        cr_expect_eq(b->allocation.allocated, a->allocation.allocated,
                     "%s: a steady-state step asked the allocator for a block", cases[ci]);
        cr_expect_eq(b->segment.allocated, a->segment.allocated,
                     "%s: a step took a new device segment", cases[ci]);
        cr_expect_eq(b->allocation.current, a->allocation.current, "%s: a step leaked a block",
                     cases[ci]);
        unload(&L);
        ksm_model_unref(L.m);
        ksm_engine_free(e);
    }
}

/* A move between steps is invisible to training: the momentum buffers follow the parameters (the
 * trajectory still ends on PyTorch's), and nothing the training state held stays behind on the
 * device the model left. */
Test(train, momentum_follows_a_move)
{
    ksm_engine *e = kt_engine_cpu(2);
    ksm_allocator *a0 = ksm_engine_allocator(e, ksm_engine_find_device(e, "cpu:0"));
    ksm_allocator *a1 = ksm_engine_allocator(e, ksm_engine_find_device(e, "cpu:1"));
    cr_assert(a0 != NULL && a1 != NULL);
    struct loaded L;
    load_case(e, "blueprints_a", "moved", &L);
    char err[512];
    struct ksm_train_result r;
    for (int k = 0; k < L.steps; k++) {
        if (k == 2 || k == 3) {
            const char *to = k == 2 ? "cpu:1" : "cpu:0";
            cr_assert_eq(ksm_model_move(L.m, to, -1, err, sizeof err), 0, "%s", err);
        }
        cr_assert_eq(step_k(&L, k, &r, err, sizeof err), 0, "step %d: %s", k, err);
        cr_expect_eq(r.train_step, (uint64_t)k + 1);
    }
    compare_final(&L, "blueprints_a moved twice", 1e-4);
    /* on cpu:1 after the last steps: cpu:0 keeps no block of the model */
    cr_assert_eq(ksm_model_move(L.m, "cpu:1", -1, err, sizeof err), 0, "%s", err);
    size_t hb;
    cr_assert_eq(ksm_model_training_momentum_bytes(L.m, NULL, &hb), 0);
    cr_expect_gt(hb, 0, "the host's momentum was dropped by the move");
    struct ksm_mem_stats s0;
    ksm_alloc_get_stats(a0, &s0);
    cr_expect_eq(s0.pool[KSM_POOL_ALL].allocation.current, 0,
                 "%lld blocks left on cpu:0 after the model moved away",
                 (long long)s0.pool[KSM_POOL_ALL].allocation.current);
    unload(&L);
    ksm_model_unref(L.m);
    ksm_engine_free(e);
}
