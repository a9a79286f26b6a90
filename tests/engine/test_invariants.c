/*
 * Model-level invariants of docs/README.md#invariants that hold through the forward: inactive
 * stages never change the host stream (3), the TRAINING straight-through value is the host exactly
 * (4), blend-op contracts at alpha 0 and 1 and NaN propagation (6), multi-slot independence (16),
 * and no leak over repeated germinate/prune cycles (18).
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/kasmina.h"
#include "kt.h"

static ksm_engine *eng;
static char err[512];

static void setup(void) { eng = kt_engine_cpu(1); }

static void teardown(void) { ksm_engine_free(eng); }

TestSuite(invariants, .init = setup, .fini = teardown);

static ksm_model *cnn(const char *id, uint64_t seed)
{
    return kt_model_new(eng, id, KT_CNN(.cnn = {.base_channels = 8}, .init_seed = seed));
}

static ksm_tensor batch(int64_t b, uint32_t seed)
{
    int64_t shape[4] = {b, 3, 16, 16};
    ksm_tensor t;
    float *d = malloc((size_t)(b * 3 * 256) * sizeof *d);
    for (int64_t i = 0; i < b * 3 * 256; i++) {
        seed = seed * 1664525u + 1013904223u;
        d[i] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
    }
    ksm_tensor_init(&t, NULL, d, KSM_DTYPE_F32, 4, shape);
    return t;
}

static float *fwd(ksm_model *m, const ksm_tensor *x, const struct ksm_alpha_override *ov,
                  size_t nov)
{
    struct ksm_forward_result r;
    struct ksm_forward_args a = {.input = x, .overrides = ov, .n_overrides = nov};
    cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
    return r.output.data;
}

static void germ(ksm_model *m, const char *slot, const char *bp, enum ksm_alpha_algorithm a,
                 uint64_t seed)
{
    struct ksm_germinate_args g = {.blueprint_id = bp,
                                   .alpha_algorithm = a,
                                   .blend_algorithm_id = a == KSM_ALGO_GATE ? "gated" : "sigmoid",
                                   .init_seed = seed};
    cr_assert_eq(ksm_model_germinate(m, slot, &g, NULL, err, sizeof err), 0, "%s", err);
}

static void to_training(ksm_model *m, const char *slot)
{
    struct ksm_gate_result g;
    cr_assert_eq(ksm_model_advance(m, slot, KSM_STAGE_TRAINING, &g, NULL, err, sizeof err), 0);
    cr_assert(g.passed);
}

#define NOUT (4 * 10)

/* 3: GERMINATED and PRUNED slots (and overrides on them) leave the output bit-identical to a
 * model without seeds. */
Test(invariants, inactive_stages_are_identity)
{
    ksm_model *plain = cnn("plain", 5), *m = cnn("m", 5);
    ksm_tensor x = batch(4, 1);
    float *ref = fwd(plain, &x, NULL, 0);
    germ(m, "r0c0", "conv_heavy", KSM_ALGO_ADD, 1);
    float *y = fwd(m, &x, NULL, 0);
    cr_expect_eq(memcmp(ref, y, NOUT * sizeof(float)), 0, "GERMINATED changed the output");
    free(y);
    float ov[4] = {1, 1, 1, 1};
    struct ksm_alpha_override o = {"r0c0", ov, 4};
    y = fwd(m, &x, &o, 1);
    cr_expect_eq(memcmp(ref, y, NOUT * sizeof(float)), 0, "override on GERMINATED was applied");
    free(y);
    bool acc;
    cr_assert_eq(ksm_model_prune(m, "r0c0", "test", NULL, &acc, NULL, err, sizeof err), 0);
    cr_assert(acc);
    y = fwd(m, &x, NULL, 0);
    cr_expect_eq(memcmp(ref, y, NOUT * sizeof(float)), 0, "PRUNED changed the output");
    free(y);
    free(ref);
    free(x.data);
    ksm_model_unref(plain);
    ksm_model_unref(m);
}

/* 4 and 6: TRAINING at alpha 0 (STE) equals the host exactly for ADD, MULTIPLY and GATE; an
 * override of 0 on the blend path too (lerp at w = 0 is a bit-exact identity). */
Test(invariants, training_ste_and_alpha_zero_are_exact)
{
    ksm_model *plain = cnn("plain", 6), *m = cnn("m", 6);
    ksm_tensor x = batch(4, 2);
    float *ref = fwd(plain, &x, NULL, 0);
    germ(m, "r0c0", "conv_light", KSM_ALGO_ADD, 2);
    germ(m, "r1c1", "depthwise", KSM_ALGO_MULTIPLY, 3);
    germ(m, "r0c2", "conv_small", KSM_ALGO_GATE, 4);
    to_training(m, "r0c0");
    to_training(m, "r1c1");
    to_training(m, "r0c2");
    float *y = fwd(m, &x, NULL, 0);
    cr_expect_eq(memcmp(ref, y, NOUT * sizeof(float)), 0, "STE output differs from the host");
    free(y);
    float z[4] = {0, 0, 0, 0};
    struct ksm_alpha_override o[2] = {{"r0c0", z, 4}, {"r1c1", z, 4}};
    y = fwd(m, &x, o, 2);
    cr_expect_eq(memcmp(ref, y, NOUT * sizeof(float)), 0, "alpha-0 blend is not the identity");
    free(y);
    /* alpha 1 on ADD changes the output (the seed is random, not an identity) */
    float one[4] = {1, 1, 1, 1};
    struct ksm_alpha_override o1 = {"r0c0", one, 4};
    y = fwd(m, &x, &o1, 1);
    cr_expect_neq(memcmp(ref, y, NOUT * sizeof(float)), 0);
    free(y);
    free(ref);
    free(x.data);
    ksm_model_unref(plain);
    ksm_model_unref(m);
}

/* 6: a non-finite seed poisons the output even at alpha 0 (no short-circuit), on the STE path
 * and on the blend path with an override of 0. */
Test(invariants, nan_in_seed_propagates_at_alpha_zero)
{
    ksm_model *m = cnn("nan", 7);
    germ(m, "r0c1", "norm", KSM_ALGO_ADD, 5);
    to_training(m, "r0c1");
    void *blob;
    size_t len;
    cr_assert_eq(ksm_model_export_weights(m, &blob, &len, err, sizeof err), 0, "%s", err);
    /* norm.weight := NaN in the blob: GN(x) is NaN, so the seed output is NaN. The tensor's
     * bytes are at 8 + header length + data_offsets[0]. */
    uint64_t hlen;
    memcpy(&hlen, blob, 8);
    json_error_t je;
    json_t *h = json_loadb((const char *)blob + 8, (size_t)hlen, 0, &je);
    cr_assert(h != NULL);
    json_t *ent = json_object_get(h, "seed_slots.r0c1.seed.norm.weight");
    cr_assert(ent != NULL);
    json_t *offs = json_object_get(ent, "data_offsets");
    size_t begin = (size_t)json_integer_value(json_array_get(offs, 0));
    size_t end = (size_t)json_integer_value(json_array_get(offs, 1));
    json_decref(h);
    float nan = NAN;
    for (size_t o = begin; o < end; o += sizeof(float))
        memcpy((char *)blob + 8 + hlen + o, &nan, sizeof nan);
    cr_assert_eq(ksm_model_load_weights(m, blob, len, true, NULL, err, sizeof err), 0, "%s", err);
    free(blob);
    ksm_tensor x = batch(4, 3);
    float *y = fwd(m, &x, NULL, 0);
    for (int i = 0; i < NOUT; i++) cr_expect(isnan(y[i]), "STE: output %d is finite", i);
    free(y);
    float z[4] = {0, 0, 0, 0};
    struct ksm_alpha_override o = {"r0c1", z, 4};
    y = fwd(m, &x, &o, 1);
    for (int i = 0; i < NOUT; i++)
        cr_expect(isnan(y[i]), "blend at alpha 0: output %d is finite", i);
    free(y);
    free(x.data);
    ksm_model_unref(m);
}

/* 16: alpha, metrics and pruning of one slot do not touch another. */
Test(invariants, slots_are_independent)
{
    ksm_model *m = cnn("ind", 8);
    germ(m, "r0c0", "conv_light", KSM_ALGO_ADD, 1);
    germ(m, "r0c1", "attention", KSM_ALGO_ADD, 2);
    to_training(m, "r0c0");
    to_training(m, "r0c1");
    struct ksm_slot_report a0, a1, b1;
    ksm_model_slot_reports(m, "r0c1", &a1, 1, NULL, err, sizeof err);
    cr_assert_eq(ksm_model_set_alpha(m, "r0c0", 0.8, &a0, err, sizeof err), 0);
    struct ksm_metrics_update u = {.has_val_accuracy = true, .val_accuracy = 42};
    cr_assert_eq(ksm_model_record_metrics(m, "r0c0", &u, NULL, err, sizeof err), 0);
    bool acc;
    cr_assert_eq(ksm_model_prune(m, "r0c0", "", NULL, &acc, NULL, err, sizeof err), 0);
    ksm_model_slot_reports(m, "r0c1", &b1, 1, NULL, err, sizeof err);
    a1.model_generation = b1.model_generation = 0;
    cr_expect_eq(memcmp(&a1, &b1, sizeof a1), 0, "r0c1 changed");
    ksm_model_unref(m);
}

/* 18: repeated germinate/prune/cooldown cycles return every byte to the allocator's pool. */
Test(invariants, germinate_prune_cycles_do_not_leak)
{
    ksm_model *m = cnn("cyc", 9);
    ksm_tensor x = batch(2, 4);
    ksm_allocator *al = ksm_engine_allocator(eng, ksm_engine_device(eng, 0));
    struct ksm_mem_stats s0, s1;
    int64_t base = 0;
    for (int cycle = 0; cycle < 6; cycle++) {
        germ(m, "r1c0", "bottleneck", KSM_ALGO_ADD, (uint64_t)cycle);
        to_training(m, "r1c0");
        free(fwd(m, &x, NULL, 0));
        bool acc;
        cr_assert_eq(ksm_model_prune(m, "r1c0", "", NULL, &acc, NULL, err, sizeof err), 0);
        for (int t = 0; t < 7; t++)
            cr_assert_eq(ksm_model_step_epoch(m, "r1c0", NULL, 0, NULL, err, sizeof err), 0);
        struct ksm_slot_report r;
        ksm_model_slot_reports(m, "r1c0", &r, 1, NULL, err, sizeof err);
        cr_assert(!r.occupied, "cycle %d: slot not empty after 7 ticks", cycle);
        ksm_alloc_get_stats(al, cycle == 1 ? &s0 : &s1);
        if (cycle == 1) base = s0.pool[0].allocated_bytes.current;
    }
    cr_expect_eq(s1.pool[0].allocated_bytes.current, base, "allocated bytes grew: %lld -> %lld",
                 (long long)base, (long long)s1.pool[0].allocated_bytes.current);
    cr_expect_eq(s1.pool[0].reserved_bytes.current, s0.pool[0].reserved_bytes.current);
    free(x.data);
    ksm_model_unref(m);
}

/* Blocks are cached per stream and stream ids are never reused: deleting a model must give its
 * streams' cached segments back, or a daemon that creates and deletes models grows forever. */
Test(invariants, deleted_models_return_their_memory)
{
    ksm_allocator *al = ksm_engine_allocator(eng, ksm_engine_device(eng, 0));
    ksm_tensor x = batch(2, 5);
    struct ksm_mem_stats s;
    int64_t reserved[12];
    for (int i = 0; i < 12; i++) {
        char id[16];
        snprintf(id, sizeof id, "tmp%d", i);
        ksm_model *m = cnn(id, (uint64_t)i);
        germ(m, "r0c1", "conv_light", KSM_ALGO_ADD, 1);
        to_training(m, "r0c1");
        struct ksm_forward_result r;
        struct ksm_forward_args a = {.input = &x, .stream = "env"};
        cr_assert_eq(ksm_model_forward(m, &a, &r, err, sizeof err), 0, "%s", err);
        ksm_host_tensor_free(&r.output);
        ksm_model_unref(m);
        cr_assert_eq(ksm_engine_model_delete(eng, id, NULL), 0);
        ksm_alloc_get_stats(al, &s);
        reserved[i] = s.pool[0].reserved_bytes.current;
    }
    cr_expect_eq(s.pool[0].allocated_bytes.current, 0, "%lld bytes still allocated",
                 (long long)s.pool[0].allocated_bytes.current);
    cr_expect_eq(reserved[11], reserved[2], "reserved grew from %lld to %lld bytes",
                 (long long)reserved[2], (long long)reserved[11]);
    free(x.data);
}
