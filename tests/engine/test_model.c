/*
 * Engine behaviour through the public API (kasmina.h): lifecycle through a model with events,
 * blend-path caches (plans, alpha scalars, block masks, shape probes), MoveModel, Evaluate
 * against sequential forwards, weights round trip, and bad input leaving the model unchanged.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kt.h"

static ksm_engine *eng;
static char err[512];

#define MAX_EVENTS 256
static struct ksm_lifecycle_event events[MAX_EVENTS];
static int n_events;

static void sink(void *ud, const struct ksm_lifecycle_event *ev)
{
    (void)ud;
    if (n_events < MAX_EVENTS) events[n_events++] = *ev;
}

static void setup(void)
{
    eng = kt_engine_cpu(2);
    ksm_engine_set_event_sink(eng, sink, NULL);
    n_events = 0;
}

static void teardown(void) { ksm_engine_free(eng); }

TestSuite(model, .init = setup, .fini = teardown);

static ksm_model *small_cnn(const char *id, bool permissive)
{
    return kt_model_new(
        eng, id,
        KT_CNN(.cnn = {.base_channels = 8}, .init_seed = 7, .permissive_gates = permissive));
}

static ksm_model *small_tf(const char *id)
{
    return kt_model_new(eng, id, KT_TF(.transformer = KT_SMALL_TF, .init_seed = 3));
}

static ksm_tensor image_batch(int64_t b, int hw, uint32_t seed)
{
    int64_t shape[4] = {b, 3, hw, hw};
    ksm_tensor t;
    float *d = malloc((size_t)(b * 3 * hw * hw) * sizeof *d);
    for (int64_t i = 0; i < b * 3 * hw * hw; i++) {
        seed = seed * 1664525u + 1013904223u;
        d[i] = (float)((seed >> 8) & 0xffff) / 65536.0f - 0.5f;
    }
    ksm_tensor_init(&t, NULL, d, KSM_DTYPE_F32, 4, shape);
    return t;
}

static ksm_tensor tokens(int64_t b, int64_t t, uint32_t seed)
{
    int64_t shape[2] = {b, t};
    ksm_tensor x;
    int64_t *d = malloc((size_t)(b * t) * sizeof *d);
    for (int64_t i = 0; i < b * t; i++) {
        seed = seed * 1664525u + 1013904223u;
        d[i] = (seed >> 8) % 97;
    }
    ksm_tensor_init(&x, NULL, d, KSM_DTYPE_I64, 2, shape);
    return x;
}

static void germinate(ksm_model *m, const char *slot, const char *bp, enum ksm_alpha_algorithm a)
{
    struct ksm_germinate_args g = {.blueprint_id = bp,
                                   .alpha_algorithm = a,
                                   .blend_algorithm_id = a == KSM_ALGO_GATE ? "gated" : "linear",
                                   .init_seed = 11};
    cr_assert_eq(ksm_model_germinate(m, slot, &g, NULL, err, sizeof err), 0, "%s", err);
}

static void advance_ok(ksm_model *m, const char *slot, enum ksm_stage expect)
{
    struct ksm_gate_result g;
    struct ksm_slot_report r;
    cr_assert_eq(ksm_model_advance(m, slot, KSM_STAGE_UNKNOWN, &g, &r, err, sizeof err), 0, "%s",
                 err);
    cr_assert(g.passed, "gate %s failed: %s", ksm_gate_level_name(g.gate),
              g.n_failed ? g.checks_failed[0] : "");
    cr_assert_eq(r.stage, expect);
}

static float *forward(ksm_model *m, const ksm_tensor *x)
{
    struct ksm_forward_result r;
    struct ksm_forward_args a = {.input = x};
    cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
    return r.output.data;
}

static const struct ksm_cache_counters *find_cache(struct ksm_cache_counters *c, size_t n,
                                                   const char *cache, const char *slot)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(c[i].cache, cache) == 0 && strcmp(c[i].slot_id, slot) == 0) return &c[i];
    return NULL;
}

/* The tested happy path (docs/lifecycle.md#events): GERMINATED, (GATE_EVALUATED, STAGE_CHANGED) x
 * 4, FOSSILIZED. */
Test(model, lifecycle_happy_path_events)
{
    ksm_model *m = small_cnn("life", true);
    germinate(m, "r0c1", "conv_light", KSM_ALGO_ADD);
    advance_ok(m, "r0c1", KSM_STAGE_TRAINING);
    struct ksm_metrics_update u = {.has_val_accuracy = true,
                                   .val_accuracy = 50,
                                   .has_gradient_health = true,
                                   .gradient_health = 0.9,
                                   .has_exploding = true,
                                   .exploding = false};
    for (int i = 0; i < 10; i++)
        cr_assert_eq(ksm_model_record_metrics(m, "r0c1", &u, NULL, err, sizeof err), 0, "%s", err);
    advance_ok(m, "r0c1", KSM_STAGE_BLENDING);
    struct ksm_slot_report r;
    for (int i = 0; i < 5; i++)
        cr_assert_eq(ksm_model_step_epoch(m, "r0c1", &r, 1, NULL, err, sizeof err), 0);
    cr_assert_float_eq(r.controller.alpha, 1.0, 1e-12);
    advance_ok(m, "r0c1", KSM_STAGE_HOLDING);
    struct ksm_metrics_update cf = {.has_counterfactual = true, .counterfactual = 2.0};
    cr_assert_eq(ksm_model_record_metrics(m, "r0c1", &cf, NULL, err, sizeof err), 0);
    advance_ok(m, "r0c1", KSM_STAGE_FOSSILIZED);
    enum ksm_lifecycle_type want[] = {KSM_EV_SEED_GERMINATED,    KSM_EV_SEED_GATE_EVALUATED,
                                      KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_GATE_EVALUATED,
                                      KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_GATE_EVALUATED,
                                      KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_GATE_EVALUATED,
                                      KSM_EV_SEED_STAGE_CHANGED, KSM_EV_SEED_FOSSILIZED};
    cr_assert_eq(n_events, 10);
    for (int i = 0; i < 10; i++) {
        cr_expect_eq(events[i].type, want[i], "event %d is %s", i,
                     ksm_lifecycle_type_name(events[i].type));
        cr_expect_str_eq(events[i].model_id, "life");
        cr_expect_str_eq(events[i].slot_id, "r0c1");
    }
    ksm_model_unref(m);
}

/* docs/evaluate.md#streams-plans-and-caches / issue: 10,000 set_alpha calls between forwards
 * recompile nothing and allocate nothing; the output still follows alpha. */
Test(model, alpha_changes_reuse_plan_without_allocating)
{
    ksm_model *m = small_cnn("alpha", false);
    germinate(m, "r0c1", "conv_light", KSM_ALGO_ADD);
    advance_ok(m, "r0c1", KSM_STAGE_TRAINING);
    ksm_tensor x = image_batch(2, 16, 1);
    cr_assert_eq(ksm_model_set_alpha(m, "r0c1", 0.25, NULL, err, sizeof err), 0);
    float *y0 = forward(m, &x);
    struct ksm_mem_stats before, after;
    ksm_alloc_get_stats(ksm_engine_allocator(eng, ksm_engine_device(eng, 0)), &before);
    float *y = NULL;
    for (int i = 0; i < 10000; i++) {
        cr_assert_eq(ksm_model_set_alpha(m, "r0c1", (i % 97 + 1) / 97.0, NULL, err, sizeof err), 0);
        if (i % 100 == 99) {
            free(y);
            y = forward(m, &x);
        }
    }
    ksm_alloc_get_stats(ksm_engine_allocator(eng, ksm_engine_device(eng, 0)), &after);
    cr_expect_eq(after.num_device_alloc, before.num_device_alloc);
    cr_expect_eq(
        after.pool[0].allocation.allocated, before.pool[0].allocation.allocated,
        "%lld allocations in steady state",
        (long long)(after.pool[0].allocation.allocated - before.pool[0].allocation.allocated));
    struct ksm_cache_counters c[32];
    size_t n;
    ksm_model_cache_stats(m, c, 32, &n);
    const struct ksm_cache_counters *plan = find_cache(c, n, "plan", "");
    cr_assert(plan != NULL);
    cr_expect_eq(plan->recompiles, 0);
    cr_expect_eq(plan->misses, 1);
    cr_expect_eq(plan->hits, 100);
    const struct ksm_cache_counters *as = find_cache(c, n, "alpha_scalar", "r0c1");
    cr_assert(as != NULL);
    cr_expect_eq(as->misses, 101, "alpha misses %llu hits %llu", (unsigned long long)as->misses,
                 (unsigned long long)as->hits);
    cr_expect_geq(as->invalidations, 10000 - 10000 / 97);
    /* alpha 0.25 vs the last alpha: outputs differ */
    cr_expect_neq(memcmp(y0, y, 2 * 10 * sizeof(float)), 0);
    free(y0);
    free(y);
    free(x.data);
    ksm_model_unref(m);
}

Test(model, move_between_devices_is_bit_identical_and_invalidates)
{
    ksm_model *m = small_cnn("move", false);
    germinate(m, "r0c0", "attention", KSM_ALGO_ADD);
    germinate(m, "r1c1", "depthwise", KSM_ALGO_MULTIPLY);
    advance_ok(m, "r0c0", KSM_STAGE_TRAINING);
    advance_ok(m, "r1c1", KSM_STAGE_TRAINING);
    cr_assert_eq(ksm_model_set_alpha(m, "r0c0", 0.6, NULL, err, sizeof err), 0);
    cr_assert_eq(ksm_model_set_alpha(m, "r1c1", 0.3, NULL, err, sizeof err), 0);
    ksm_tensor x = image_batch(3, 16, 2);
    float *y0 = forward(m, &x);
    struct ksm_cache_counters c[32];
    size_t n;
    ksm_model_cache_stats(m, c, 32, &n);
    uint64_t inval0 = find_cache(c, n, "plan", "")->invalidations;
    cr_assert_eq(ksm_model_move(m, "cpu:1", -1, err, sizeof err), 0, "%s", err);
    struct ksm_model_info info;
    ksm_model_get_info(m, &info);
    cr_expect_str_eq(info.device, "cpu:1");
    ksm_model_cache_stats(m, c, 32, &n);
    cr_expect_eq(find_cache(c, n, "plan", "")->entries, 0);
    cr_expect_gt(find_cache(c, n, "plan", "")->invalidations, inval0);
    cr_expect_eq(find_cache(c, n, "alpha_scalar", "r0c0")->entries, 0);
    cr_expect_eq(find_cache(c, n, "shape_probe", "r0c0")->entries, 0);
    float *y1 = forward(m, &x);
    cr_expect_eq(memcmp(y0, y1, 3 * 10 * sizeof(float)), 0, "cpu:1 output differs");
    cr_assert_eq(ksm_model_move(m, "cpu:0", -1, err, sizeof err), 0, "%s", err);
    float *y2 = forward(m, &x);
    cr_expect_eq(memcmp(y0, y2, 3 * 10 * sizeof(float)), 0, "back on cpu:0 output differs");
    /* Nothing of the model is left on cpu:1. */
    struct ksm_mem_stats s1;
    ksm_alloc_get_stats(ksm_engine_allocator(eng, ksm_engine_device(eng, 1)), &s1);
    cr_expect_eq(s1.pool[0].allocated_bytes.current, 0);
    cr_expect_eq(ksm_model_move(m, "cpu:9", -1, err, sizeof err), KSM_ENODEVICE);
    cr_expect_eq(ksm_model_move(m, NULL, KSM_DTYPE_BF16, err, sizeof err), KSM_EUNSUPPORTED);
    free(y0);
    free(y1);
    free(y2);
    free(x.data);
    ksm_model_unref(m);
}

Test(model, flex_attention_block_masks_lru)
{
    ksm_model *m = small_tf("flex");
    germinate(m, "r0c0", "flex_attention", KSM_ALGO_ADD);
    advance_ok(m, "r0c0", KSM_STAGE_TRAINING);
    for (int t = 1; t <= 9; t++) {
        ksm_tensor x = tokens(1, t, (uint32_t)t);
        free(forward(m, &x));
        free(x.data);
    }
    ksm_tensor x = tokens(1, 9, 9);
    free(forward(m, &x)); /* most recent length: a hit */
    free(x.data);
    struct ksm_cache_counters c[32];
    size_t n;
    ksm_model_cache_stats(m, c, 32, &n);
    const struct ksm_cache_counters *bm = find_cache(c, n, "block_mask", "r0c0");
    cr_assert(bm != NULL);
    cr_expect_eq(bm->misses, 9);
    cr_expect_eq(bm->evictions, 1);
    cr_expect_eq(bm->entries, 8);
    cr_expect_eq(bm->capacity, 8);
    cr_expect_geq(bm->hits, 1);
    ksm_model_unref(m);
}

/* Evaluate = one fused pass; each config equals a sequential forward with forced alphas. */
Test(model, evaluate_standard_configs_equal_sequential_forwards)
{
    ksm_model *m = small_cnn("eval", false);
    germinate(m, "r0c1", "conv_small", KSM_ALGO_ADD);
    germinate(m, "r1c1", "bottleneck", KSM_ALGO_MULTIPLY);
    advance_ok(m, "r0c1", KSM_STAGE_TRAINING);
    advance_ok(m, "r1c1", KSM_STAGE_TRAINING);
    cr_assert_eq(ksm_model_set_alpha(m, "r0c1", 0.7, NULL, err, sizeof err), 0);
    cr_assert_eq(ksm_model_set_alpha(m, "r1c1", 0.4, NULL, err, sizeof err), 0);
    int64_t B = 4;
    ksm_tensor x = image_batch(B, 16, 5);
    int64_t lab[4] = {1, 7, 3, 3}, ls = 4;
    ksm_tensor t;
    ksm_tensor_init(&t, NULL, lab, KSM_DTYPE_I64, 1, &ls);
    struct ksm_evaluate_args ea = {
        .input = &x, .targets = &t, .generate_standard = true, .stream = "env-0"};
    struct ksm_evaluate_result er;
    cr_assert_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), 0, "%s", err);
    const char *names[] = {"main",         "solo:r0c1", "solo:r1c1", "solo_on:r0c1",
                           "solo_on:r1c1", "all_off",   "committed"};
    cr_assert_eq(er.n, 7);
    for (size_t i = 0; i < er.n; i++) cr_expect_str_eq(er.results[i].name, names[i]);
    /* Sequential reference for each config through set_alpha + forward. */
    double alphas[7][2] = {{0.7, 0.4}, {0, 0.4}, {0.7, 0}, {0.7, 0}, {0, 0.4}, {0, 0}, {0, 0}};
    for (int c = 0; c < 7; c++) {
        ksm_model_set_alpha(m, "r0c1", alphas[c][0], NULL, err, sizeof err);
        ksm_model_set_alpha(m, "r1c1", alphas[c][1], NULL, err, sizeof err);
        float *y = forward(m, &x);
        double loss = 0;
        uint64_t correct = 0;
        for (int64_t b = 0; b < B; b++) {
            const float *row = y + b * 10;
            double mx = row[0];
            int am = 0;
            for (int k = 1; k < 10; k++)
                if (row[k] > mx) mx = row[k], am = k;
            double s = 0;
            for (int k = 0; k < 10; k++) s += exp(row[k] - mx);
            loss += log(s) + mx - row[lab[b]];
            correct += am == lab[b];
        }
        loss /= (double)B;
        cr_expect(fabs(er.results[c].loss - loss) <= 1e-5 * fmax(1, fabs(loss)),
                  "%s: loss %.7f vs sequential %.7f", names[c], er.results[c].loss, loss);
        cr_expect_eq(er.results[c].correct, correct, "%s", names[c]);
        cr_expect_eq(er.results[c].total, (uint64_t)B);
        free(y);
    }
    ksm_evaluate_result_free(&er);
    /* Shapley factorial on request: 2^2 more. */
    ksm_model_set_alpha(m, "r0c1", 0.7, NULL, err, sizeof err);
    ksm_model_set_alpha(m, "r1c1", 0.4, NULL, err, sizeof err);
    ea.shapley = true;
    cr_assert_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), 0, "%s", err);
    cr_expect_eq(er.n, 11);
    cr_expect_str_eq(er.results[7].name, "shapley:00");
    ksm_evaluate_result_free(&er);
    free(x.data);
    ksm_model_unref(m);
}

Test(model, weights_round_trip)
{
    ksm_model *a = small_cnn("wa", false);
    germinate(a, "r0c2", "conv_heavy", KSM_ALGO_ADD);
    germinate(a, "r1c0", "norm", KSM_ALGO_GATE);
    advance_ok(a, "r0c2", KSM_STAGE_TRAINING);
    advance_ok(a, "r1c0", KSM_STAGE_TRAINING);
    cr_assert_eq(ksm_model_set_alpha(a, "r0c2", 0.5, NULL, err, sizeof err), 0);
    void *blob;
    size_t len;
    cr_assert_eq(ksm_model_export_weights(a, &blob, &len, err, sizeof err), 0, "%s", err);
    struct ksm_model_spec spec = {
        .topology = KSM_TOPOLOGY_CNN, .cnn = {.base_channels = 8}, .init_seed = 99};
    ksm_model *b;
    cr_assert_eq(ksm_engine_model_create(eng, "wb", &spec, &b, err, sizeof err), 0);
    struct ksm_load_result lr;
    cr_assert_eq(ksm_model_load_weights(b, blob, len, true, &lr, err, sizeof err), 0, "%s", err);
    cr_expect_eq(lr.n_missing, 0);
    cr_expect_eq(lr.n_unexpected, 0);
    ksm_load_result_free(&lr);
    ksm_tensor x = image_batch(2, 12, 9);
    float *ya = forward(a, &x), *yb = forward(b, &x);
    cr_expect_eq(memcmp(ya, yb, 2 * 10 * sizeof(float)), 0);
    struct ksm_slot_report ra[8], rb[8];
    size_t na, nb;
    ksm_model_slot_reports(a, NULL, ra, 8, &na, err, sizeof err);
    ksm_model_slot_reports(b, NULL, rb, 8, &nb, err, sizeof err);
    cr_assert_eq(na, nb);
    for (size_t i = 0; i < na; i++) {
        cr_expect_eq(ra[i].stage, rb[i].stage);
        cr_expect_float_eq(ra[i].controller.alpha, rb[i].controller.alpha, 0);
        cr_expect_str_eq(ra[i].seed_id, rb[i].seed_id);
    }
    /* A truncated blob and a strict load with an unknown tensor change nothing. */
    uint64_t gen = ksm_model_generation(b);
    cr_expect_eq(ksm_model_load_weights(b, blob, len / 2, true, NULL, err, sizeof err),
                 KSM_EFORMAT);
    cr_expect_eq(ksm_model_generation(b), gen);
    free(ya);
    free(yb);
    free(blob);
    free(x.data);
    ksm_model_unref(a);
    ksm_model_unref(b);
}

/* Bad input: each returns a specific error; the generation and the reports are unchanged. */
Test(model, bad_input_changes_nothing)
{
    ksm_model *m = small_cnn("bad", false);
    germinate(m, "r0c1", "conv_light", KSM_ALGO_ADD);
    struct ksm_slot_report before[8], after[8];
    size_t n;
    ksm_model_slot_reports(m, NULL, before, 8, &n, err, sizeof err);
    uint64_t gen = ksm_model_generation(m);
    struct ksm_germinate_args g = {.blueprint_id = "no_such"};
    cr_expect_eq(ksm_model_germinate(m, "r0c0", &g, NULL, err, sizeof err), KSM_ENOBLUEPRINT);
    g.blueprint_id = "lora"; /* a transformer blueprint */
    cr_expect_eq(ksm_model_germinate(m, "r0c0", &g, NULL, err, sizeof err), KSM_ENOBLUEPRINT);
    g.blueprint_id = "norm";
    cr_expect_eq(ksm_model_germinate(m, "r9c9", &g, NULL, err, sizeof err), KSM_ENOSLOT);
    cr_expect_eq(ksm_model_germinate(m, "r0c1", &g, NULL, err, sizeof err), KSM_ESTAGE);
    g.has_alpha_target = true;
    g.alpha_target = NAN;
    cr_expect_eq(ksm_model_germinate(m, "r0c0", &g, NULL, err, sizeof err), KSM_EINVAL);
    g.alpha_target = 0;
    cr_expect_eq(ksm_model_germinate(m, "r0c0", &g, NULL, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(ksm_model_set_alpha(m, "r0c1", NAN, NULL, err, sizeof err), KSM_EINVAL);
    cr_expect_eq(ksm_model_advance(m, "r0c1", KSM_STAGE_HOLDING, NULL, NULL, err, sizeof err),
                 KSM_ESTAGE);
    cr_expect_eq(ksm_model_advance(m, "r0c1", KSM_STAGE_PRUNED, NULL, NULL, err, sizeof err),
                 KSM_EINVAL);
    cr_expect_eq(ksm_model_advance(m, "r0c1", (enum ksm_stage)5, NULL, NULL, err, sizeof err),
                 KSM_EINVAL);
    cr_expect_eq(ksm_model_set_alpha_target(m, "r0c1", 0.5, 3, KSM_CURVE_LINEAR, false, 0, 0, NULL,
                                            err, sizeof err),
                 KSM_ESTAGE);
    cr_expect_eq(
        ksm_model_set_alpha_target(m, "r0c1", NAN, 3, 0, false, 0, 0, NULL, err, sizeof err),
        KSM_EINVAL);
    cr_expect_eq(
        ksm_model_schedule_prune(m, "r0c1", 3, 0, true, NAN, "", "", NULL, NULL, err, sizeof err),
        KSM_EINVAL);
    cr_expect_eq(ksm_model_schedule_prune(m, "r0c1", 3, (enum ksm_alpha_curve)9, false, 0, "", "",
                                          NULL, NULL, err, sizeof err),
                 KSM_EINVAL);
    cr_expect_eq(ksm_model_schedule_prune(m, "r0c1", 1u << 30, 0, false, 0, "", "", NULL, NULL, err,
                                          sizeof err),
                 KSM_EINVAL);
    struct ksm_metrics_update u = {.has_val_accuracy = true, .val_accuracy = NAN};
    cr_expect_eq(ksm_model_record_metrics(m, "r0c1", &u, NULL, err, sizeof err), KSM_EINVAL);
    /* forward: wrong channels, wrong dtype, override length, unknown override slot */
    ksm_tensor x = image_batch(2, 16, 3);
    ksm_tensor bad = x;
    bad.shape[1] = 4;
    ksm_tensor_init(&bad, NULL, x.data, KSM_DTYPE_F32, 4, (int64_t[]){1, 4, 16, 16});
    struct ksm_forward_result fr;
    struct ksm_forward_args fa = {.input = &bad};
    cr_expect_eq(ksm_model_forward(m, &fa, &fr, err, sizeof err), KSM_ESHAPE);
    ksm_tensor_init(&bad, NULL, x.data, KSM_DTYPE_I32, 4, (int64_t[]){2, 3, 16, 16});
    cr_expect_eq(ksm_model_forward(m, &fa, &fr, err, sizeof err), KSM_EDTYPE);
    float ov[3] = {0, 1, 0};
    struct ksm_alpha_override o = {"r0c1", ov, 3};
    fa = (struct ksm_forward_args){.input = &x, .overrides = &o, .n_overrides = 1};
    cr_expect_eq(ksm_model_forward(m, &fa, &fr, err, sizeof err), KSM_ESHAPE);
    o.slot_id = "r7c7";
    o.n = 2;
    cr_expect_eq(ksm_model_forward(m, &fa, &fr, err, sizeof err), KSM_ENOSLOT);
    o.slot_id = "r0c1";
    ov[1] = NAN;
    cr_expect_eq(ksm_model_forward(m, &fa, &fr, err, sizeof err), KSM_EINVAL);

    cr_expect_eq(ksm_model_generation(m), gen);
    ksm_model_slot_reports(m, NULL, after, 8, &n, err, sizeof err);
    for (size_t i = 0; i < n; i++)
        cr_expect_eq(memcmp(&before[i], &after[i], sizeof before[i]), 0, "slot %s changed",
                     before[i].slot_id);
    ksm_model *none;
    cr_expect_eq(ksm_engine_model_get(eng, "nope", &none), KSM_ENOMODEL);
    struct ksm_model_spec dup = {.topology = KSM_TOPOLOGY_CNN, .cnn = {.base_channels = 8}};
    cr_expect_eq(ksm_engine_model_create(eng, "bad", &dup, NULL, err, sizeof err), KSM_EEXIST);
    cr_expect_eq(ksm_engine_model_create(eng, "b@d", &dup, NULL, err, sizeof err), KSM_EINVAL);
    free(x.data);
    ksm_model_unref(m);
}

/* Fused forward (docs/evaluate.md#fusedforward): rows of config k equal a sequential forward with
 * those alphas, and a TRAINING slot without an override keeps the STE path (output == host). */
Test(model, fused_equals_sequential_transformer)
{
    ksm_model *m = small_tf("fusedtf");
    germinate(m, "r0c0", "lora", KSM_ALGO_ADD);
    germinate(m, "r0c2", "mlp_small", KSM_ALGO_MULTIPLY);
    advance_ok(m, "r0c0", KSM_STAGE_TRAINING);
    advance_ok(m, "r0c2", KSM_STAGE_TRAINING);
    int64_t B = 2, T = 11, V = 97;
    ksm_tensor x = tokens(B, T, 4);
    int64_t K = 3;
    ksm_tensor xt;
    int64_t *d = malloc((size_t)(K * B * T) * sizeof *d);
    for (int k = 0; k < K; k++) memcpy(d + k * B * T, x.data, (size_t)(B * T) * sizeof *d);
    ksm_tensor_init(&xt, NULL, d, KSM_DTYPE_I64, 2, (int64_t[]){K * B, T});
    float a0[6] = {0, 0, 0.5f, 0.5f, 1, 1};
    struct ksm_alpha_override o = {"r0c0", a0, 6};
    struct ksm_forward_args fa = {.input = &xt, .overrides = &o, .n_overrides = 1};
    struct ksm_forward_result fr;
    cr_assert_eq(ksm_model_forward(m, &fa, &fr, err, sizeof err), 0, "%s", err);
    float *fused = fr.output.data;
    float vals[3] = {0, 0.5f, 1};
    for (int k = 0; k < K; k++) {
        cr_assert_eq(ksm_model_set_alpha(m, "r0c0", vals[k], NULL, err, sizeof err), 0);
        /* alpha 0 in TRAINING takes the STE path: identical values to the blend at 0 */
        float *y = forward(m, &x);
        double maxd = 0, maxr = 0;
        for (int64_t i = 0; i < B * T * V; i++) {
            maxd = fmax(maxd, fabs(y[i] - fused[k * B * T * V + i]));
            maxr = fmax(maxr, fabs(y[i]));
        }
        cr_expect(maxd <= 1e-5 * maxr, "config %d: %.3g", k, maxd / maxr);
        free(y);
    }
    free(fused);
    free(d);
    free(x.data);
    ksm_model_unref(m);
}

/* Evaluate shares the prefix before the first overridden running slot; when no overridden slot
 * runs its seed, every config is the same single pass. */
Test(model, evaluate_configs_on_inactive_slots_equal_main)
{
    ksm_model *m = small_cnn("evalin", false);
    germinate(m, "r0c2", "conv_light", KSM_ALGO_ADD); /* GERMINATED: never runs */
    ksm_tensor x = image_batch(3, 16, 8);
    int64_t lab[3] = {0, 4, 9}, ls = 3;
    ksm_tensor t;
    ksm_tensor_init(&t, NULL, lab, KSM_DTYPE_I64, 1, &ls);
    const char *ids[1] = {"r0c2"};
    float one = 1.0f, zero = 0.0f;
    struct ksm_alpha_config cfgs[3] = {
        {"main", NULL, NULL, 0}, {"on", ids, &one, 1}, {"off", ids, &zero, 1}};
    struct ksm_evaluate_args ea = {
        .input = &x, .targets = &t, .configs = cfgs, .n_configs = 3, .return_logits = true};
    struct ksm_evaluate_result er;
    cr_assert_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), 0, "%s", err);
    cr_assert_eq(er.n, 3);
    float *y = forward(m, &x);
    for (size_t c = 0; c < 3; c++) {
        cr_expect_eq(memcmp(er.results[c].logits.data, y, 3 * 10 * sizeof(float)), 0,
                     "config %zu differs from the forward", c);
        cr_expect_float_eq(er.results[c].loss, er.results[0].loss, 0);
    }
    free(y);
    ksm_evaluate_result_free(&er);
    free(x.data);
    ksm_model_unref(m);
}

Test(model, forward_into_caller_buffer)
{
    ksm_model *m = small_cnn("outbuf", false);
    ksm_tensor x = image_batch(2, 16, 3);
    float *ref = forward(m, &x);
    float buf[20], small[5];
    struct ksm_forward_result r;
    struct ksm_forward_args a = {.input = &x, .output_buffer = buf, .output_capacity = sizeof buf};
    cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect(r.output.data == (void *)buf);
    cr_expect_eq(memcmp(buf, ref, sizeof buf), 0);
    a.output_buffer = small; /* too small: the engine allocates */
    a.output_capacity = sizeof small;
    cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect(r.output.data != (void *)small);
    cr_expect_eq(memcmp(r.output.data, ref, sizeof buf), 0);
    ksm_host_tensor_free(&r.output);
    free(ref);
    free(x.data);
    ksm_model_unref(m);
}

/* The transformer's logits in a caller buffer (the CPU head writes them there directly): the
 * same values as an engine-allocated result, plain and fused, and nothing written past them. */
Test(model, transformer_forward_into_caller_buffer)
{
    ksm_model *m = small_tf("outbuf_tf");
    germinate(m, "r0c0", "lora", KSM_ALGO_ADD);
    advance_ok(m, "r0c0", KSM_STAGE_TRAINING);
    const int64_t B = 2, T = 9, V = 97, n = B * T * V;
    ksm_tensor x = tokens(B, T, 5);
    float *ref = forward(m, &x);
    float *buf = malloc((size_t)(n + 7) * sizeof *buf);
    for (int64_t i = 0; i < n + 7; i++) buf[i] = -12345.0f;
    struct ksm_forward_result r;
    struct ksm_forward_args a = {
        .input = &x, .output_buffer = buf, .output_capacity = (size_t)(n + 7) * sizeof *buf};
    cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
    cr_expect(r.output.data == (void *)buf);
    cr_expect_eq(memcmp(buf, ref, (size_t)n * sizeof *buf), 0);
    for (int64_t i = n; i < n + 7; i++)
        cr_expect_eq(buf[i], -12345.0f, "element %lld", (long long)i);

    float alpha[2] = {0.25f, 1.0f};
    struct ksm_alpha_override o = {"r0c0", alpha, 2};
    struct ksm_forward_args fa = {.input = &x, .overrides = &o, .n_overrides = 1};
    cr_assert_eq(ksm_model_forward(m, &fa, &r, err, sizeof err), 0, "%s", err);
    float *fused = r.output.data;
    fa.output_buffer = buf;
    fa.output_capacity = (size_t)n * sizeof *buf;
    cr_assert_eq(ksm_model_forward(m, &fa, &r, err, sizeof err), 0, "%s", err);
    cr_expect(r.output.data == (void *)buf);
    cr_expect_eq(memcmp(buf, fused, (size_t)n * sizeof *buf), 0);
    free(fused);
    free(buf);
    free(ref);
    free(x.data);
    ksm_model_unref(m);
}
