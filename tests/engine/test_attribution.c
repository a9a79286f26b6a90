/*
 * Evaluate's attribution through the public API (docs/evaluate.md#attribution): a model with three
 * live seeds (and a TRAINING seed at alpha 0, which is not live), whose coalition values the test
 * measures itself with sequential forwards (set_alpha 1.0 / 0.0, argmax, accuracy in percent) and
 * turns into Shapley values over all 3! orderings, marginals and interactions; PERMUTATION's
 * bounds; the refusals (no live seed, EXACT over 9, the row limit).
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

static void setup(void) { eng = kt_engine_cpu(2); }
static void teardown(void) { ksm_engine_free(eng); }

TestSuite(attribution, .init = setup, .fini = teardown, .timeout = 120);

static void germinate(ksm_model *m, const char *slot, const char *bp, enum ksm_alpha_algorithm a)
{
    struct ksm_germinate_args g = {.blueprint_id = bp,
                                   .alpha_algorithm = a,
                                   .blend_algorithm_id = a == KSM_ALGO_GATE ? "gated" : "linear",
                                   .init_seed = 11};
    cr_assert_eq(ksm_model_germinate(m, slot, &g, NULL, err, sizeof err), 0, "%s", err);
    struct ksm_gate_result gr;
    cr_assert_eq(ksm_model_advance(m, slot, KSM_STAGE_TRAINING, &gr, NULL, err, sizeof err), 0,
                 "%s", err);
    cr_assert(gr.passed);
}

static void set_alpha(ksm_model *m, const char *slot, double a)
{
    cr_assert_eq(ksm_model_set_alpha(m, slot, a, NULL, err, sizeof err), 0, "%s", err);
}

static ksm_tensor image_batch(int64_t b, int c, int hw, uint32_t seed)
{
    int64_t shape[4] = {b, c, hw, hw};
    ksm_tensor t;
    int64_t n = b * c * hw * hw;
    float *d = malloc((size_t)n * sizeof *d);
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        int64_t row = i / (c * hw * hw), ch = i / (hw * hw) % c;
        /* Noise on a per-row, per-channel level, so the rows' predictions differ. */
        d[i] = (float)((seed >> 8) & 0xffff) / 65536.0f - 0.5f +
               2.0f * sinf(0.7f * (float)row + 1.9f * (float)ch);
    }
    ksm_tensor_init(&t, NULL, d, KSM_DTYPE_F32, 4, shape);
    return t;
}

static int argmax10(const float *row)
{
    int am = 0;
    for (int k = 1; k < 10; k++)
        if (row[k] > row[am]) am = k;
    return am;
}

/* Seeds start close to the identity; noise on every seed weight and bias (through
 * export/load) makes each one change the predictions. */
static void perturb_seeds(ksm_model *m)
{
    void *blob;
    size_t len;
    cr_assert_eq(ksm_model_export_weights(m, &blob, &len, err, sizeof err), 0, "%s", err);
    uint64_t hlen;
    memcpy(&hlen, blob, 8);
    json_error_t je;
    json_t *h = json_loadb((const char *)blob + 8, (size_t)hlen, 0, &je), *ent;
    cr_assert_not_null(h);
    const char *name;
    uint32_t seed = 99;
    json_object_foreach(h, name, ent)
    {
        size_t nl = strlen(name);
        const char *dt = json_string_value(json_object_get(ent, "dtype"));
        if (dt == NULL || strcmp(dt, "F32") != 0 ||
            !((nl > 7 && strcmp(name + nl - 7, ".weight") == 0) ||
              (nl > 5 && strcmp(name + nl - 5, ".bias") == 0)))
            continue;
        json_t *offs = json_object_get(ent, "data_offsets");
        size_t begin = (size_t)json_integer_value(json_array_get(offs, 0));
        size_t end = (size_t)json_integer_value(json_array_get(offs, 1));
        for (size_t o = begin; o < end; o += sizeof(float)) {
            float w;
            memcpy(&w, (char *)blob + 8 + hlen + o, sizeof w);
            seed = seed * 1664525u + 1013904223u;
            w += 4.0f * ((float)((seed >> 8) & 0xffff) / 65536.0f - 0.5f);
            memcpy((char *)blob + 8 + hlen + o, &w, sizeof w);
        }
    }
    json_decref(h);
    cr_assert_eq(ksm_model_load_weights(m, blob, len, true, NULL, err, sizeof err), 0, "%s", err);
    free(blob);
}

/* Three live seeds in row-major order, their alphas, and r1c0 in TRAINING at alpha 0. */
static const char *const LIVE[3] = {"r0c0", "r0c1", "r1c1"};
static const double ALPHA[3] = {0.7, 0.55, 0.4};
#define B 32

struct fixture {
    ksm_model *m;
    ksm_tensor x, t;
    int64_t lab[B];
    double v[8]; /* v[c]: accuracy with live seed j at 1.0 iff bit j of c */
};

static void fixture_init(struct fixture *f)
{
    f->m = kt_model_new(eng, "attr", KT_CNN(.cnn = {.base_channels = 8}, .init_seed = 7));
    germinate(f->m, "r0c1", "conv_small", KSM_ALGO_ADD);
    germinate(f->m, "r0c0", "conv_light", KSM_ALGO_ADD);
    germinate(f->m, "r1c1", "bottleneck", KSM_ALGO_MULTIPLY);
    germinate(f->m, "r1c0", "norm", KSM_ALGO_ADD); /* TRAINING, alpha 0: not live */
    perturb_seeds(f->m);
    f->x = image_batch(B, 3, 16, 5);
    /* Each coalition's predictions, by sequential forwards. */
    static float logits[8][B * 10];
    for (int c = 0; c < 8; c++) {
        for (int j = 0; j < 3; j++) set_alpha(f->m, LIVE[j], (c >> j) & 1 ? 1.0 : 0.0);
        struct ksm_forward_result r;
        struct ksm_forward_args a = {.input = &f->x};
        cr_assert_eq(ksm_model_forward(f->m, &a, &r, err, sizeof err), 0, "%s", err);
        memcpy(logits[c], r.output.data, sizeof logits[c]);
        ksm_host_tensor_free(&r.output);
    }
    /* Labels that make the coalitions differ: row b is labelled by coalition b % 8. */
    for (int b = 0; b < B; b++) f->lab[b] = argmax10(&logits[b % 8][b * 10]);
    for (int c = 0; c < 8; c++) {
        int correct = 0;
        for (int b = 0; b < B; b++) correct += argmax10(&logits[c][b * 10]) == f->lab[b];
        f->v[c] = 100.0 * correct / B;
    }
    /* Every seed changes some coalition's value (or the test would prove little). */
    for (int j = 0; j < 3; j++) {
        bool moves = false;
        for (int c = 0; c < 8; c++) moves |= f->v[c | 1 << j] != f->v[c];
        cr_assert(moves, "seed %s changes no coalition's accuracy", LIVE[j]);
    }
    for (int j = 0; j < 3; j++) set_alpha(f->m, LIVE[j], ALPHA[j]);
    int64_t ls = B;
    ksm_tensor_init(&f->t, NULL, f->lab, KSM_DTYPE_I64, 1, &ls);
}

static void fixture_fini(struct fixture *f)
{
    free(f->x.data);
    ksm_model_unref(f->m);
}

/* Shapley values as the mean over every ordering of the three seeds. */
static void shapley_by_orderings(const double *v, double *phi)
{
    static const int orders[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2},
                                     {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    for (int j = 0; j < 3; j++) phi[j] = 0;
    for (int o = 0; o < 6; o++) {
        int s = 0;
        for (int k = 0; k < 3; k++) {
            int j = orders[o][k];
            phi[j] += v[s | 1 << j] - v[s];
            s |= 1 << j;
        }
    }
    for (int j = 0; j < 3; j++) phi[j] /= 6;
}

Test(attribution, exact_equals_direct_computation_from_sequential_forwards)
{
    struct fixture f;
    fixture_init(&f);
    struct ksm_evaluate_args ea = {.input = &f.x,
                                   .targets = &f.t,
                                   .generate_standard = true,
                                   .stream = "env-0",
                                   .attribution = KSM_ATTRIBUTION_EXACT};
    struct ksm_evaluate_result er, plain;
    cr_assert_eq(ksm_model_evaluate(f.m, &ea, &er, err, sizeof err), 0, "%s", err);
    /* The standard configs, unchanged by the coalitions in the same pass. */
    ea.attribution = KSM_ATTRIBUTION_NONE;
    cr_assert_eq(ksm_model_evaluate(f.m, &ea, &plain, err, sizeof err), 0, "%s", err);
    cr_assert_eq(er.n, 12, "main, 3 solo, 3 solo_on, all_off, 3 pairs, committed");
    cr_assert_eq(plain.n, er.n);
    for (size_t i = 0; i < er.n; i++) {
        cr_expect_str_eq(er.results[i].name, plain.results[i].name);
        cr_expect_eq(er.results[i].correct, plain.results[i].correct, "%s", er.results[i].name);
        cr_expect(fabs(er.results[i].loss - plain.results[i].loss) <= 1e-5, "%s",
                  er.results[i].name);
    }
    cr_expect_eq(plain.n_shapley, 0);
    cr_expect_eq(plain.n_interactions, 0);
    double phi[3];
    shapley_by_orderings(f.v, phi);
    cr_assert_eq(er.n_shapley, 3);
    for (int j = 0; j < 3; j++) {
        const struct ksm_shapley_estimate *e = &er.shapley[j];
        cr_expect_str_eq(e->slot_id, LIVE[j]);
        cr_expect(fabs(e->mean - phi[j]) <= 1e-9, "%s: %.12f vs %.12f", LIVE[j], e->mean, phi[j]);
        cr_expect_eq(e->std, 0.0);
        cr_expect_eq(e->n_samples, 6);
        cr_expect_str_eq(e->algorithm, "exact");
        double marginal = f.v[7] - f.v[7 & ~(1 << j)];
        cr_expect(fabs(e->marginal - marginal) <= 1e-9, "%s: marginal %.6f vs %.6f", LIVE[j],
                  e->marginal, marginal);
    }
    cr_assert_eq(er.n_interactions, 3);
    static const int pairs[3][2] = {{0, 1}, {0, 2}, {1, 2}};
    for (int q = 0; q < 3; q++) {
        int a = pairs[q][0], b = pairs[q][1];
        double want = f.v[(1 << a) | (1 << b)] - f.v[1 << a] - f.v[1 << b] + f.v[0];
        cr_expect_str_eq(er.interactions[q].slot_a, LIVE[a]);
        cr_expect_str_eq(er.interactions[q].slot_b, LIVE[b]);
        cr_expect(fabs(er.interactions[q].interaction - want) <= 1e-9, "%s+%s: %.6f vs %.6f",
                  LIVE[a], LIVE[b], er.interactions[q].interaction, want);
    }
    /* The seeds keep their alphas. */
    struct ksm_slot_report rep;
    size_t nr;
    for (int j = 0; j < 3; j++) {
        cr_assert_eq(ksm_model_slot_reports(f.m, LIVE[j], &rep, 1, &nr, err, sizeof err), 0, "%s",
                     err);
        cr_expect_float_eq(rep.controller.alpha, ALPHA[j], 1e-12);
    }
    ksm_evaluate_result_free(&er);
    ksm_evaluate_result_free(&plain);
    fixture_fini(&f);
}

Test(attribution, alone_or_with_logits_returns_only_the_configs_asked_for)
{
    struct fixture f;
    fixture_init(&f);
    /* No configs: the coalitions only; AUTO is EXACT for three seeds. */
    struct ksm_evaluate_args ea = {
        .input = &f.x, .targets = &f.t, .attribution = KSM_ATTRIBUTION_AUTO};
    struct ksm_evaluate_result er;
    cr_assert_eq(ksm_model_evaluate(f.m, &ea, &er, err, sizeof err), 0, "%s", err);
    cr_expect_eq(er.n, 0);
    cr_assert_eq(er.n_shapley, 3);
    double phi[3];
    shapley_by_orderings(f.v, phi);
    for (int j = 0; j < 3; j++) {
        cr_expect_str_eq(er.shapley[j].algorithm, "exact");
        cr_expect(fabs(er.shapley[j].mean - phi[j]) <= 1e-9);
    }
    ksm_evaluate_result_free(&er);
    /* One explicit config with logits: one logits tensor, that config's. */
    const char *ids[1] = {"r0c1"};
    float zero[1] = {0.0f};
    struct ksm_alpha_config cfg = {.name = "no_r0c1", .slot_ids = ids, .alpha = zero, .n = 1};
    ea.configs = &cfg;
    ea.n_configs = 1;
    ea.return_logits = true;
    cr_assert_eq(ksm_model_evaluate(f.m, &ea, &er, err, sizeof err), 0, "%s", err);
    cr_assert_eq(er.n, 1);
    cr_expect_str_eq(er.results[0].name, "no_r0c1");
    cr_assert_not_null(er.results[0].logits.data);
    cr_expect_eq(er.results[0].logits.shape[0], B);
    cr_expect_eq(er.n_shapley, 3);
    cr_expect_eq(er.n_interactions, 3);
    /* Its logits are r0c1 off, the others at their alphas: a sequential forward. */
    set_alpha(f.m, "r0c1", 0.0);
    struct ksm_forward_result fr;
    struct ksm_forward_args fa = {.input = &f.x};
    cr_assert_eq(ksm_model_forward(f.m, &fa, &fr, err, sizeof err), 0, "%s", err);
    const float *got = er.results[0].logits.data, *ref = fr.output.data;
    for (int i = 0; i < B * 10; i++)
        cr_expect(fabsf(got[i] - ref[i]) <= 1e-5f * fmaxf(1.0f, fabsf(ref[i])), "logit %d", i);
    ksm_host_tensor_free(&fr.output);
    ksm_evaluate_result_free(&er);
    fixture_fini(&f);
}

Test(attribution, permutation_is_seeded_and_bounded_by_the_coalition_values)
{
    struct fixture f;
    fixture_init(&f);
    struct ksm_evaluate_args ea = {.input = &f.x,
                                   .targets = &f.t,
                                   .attribution = KSM_ATTRIBUTION_PERMUTATION,
                                   .attribution_seed = 5};
    struct ksm_evaluate_result a, b;
    cr_assert_eq(ksm_model_evaluate(f.m, &ea, &a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_model_evaluate(f.m, &ea, &b, err, sizeof err), 0, "%s", err);
    cr_assert_eq(a.n_shapley, 3);
    cr_expect_eq(a.n_interactions, 0, "PERMUTATION reports no interactions");
    for (int j = 0; j < 3; j++) {
        const struct ksm_shapley_estimate *e = &a.shapley[j];
        cr_expect_str_eq(e->algorithm, "permutation_antithetic");
        cr_expect_eq(memcmp(e, &b.shapley[j], sizeof *e), 0, "same seed, same estimate");
        cr_expect(e->n_samples >= 1 && e->n_samples <= 20, "%u", e->n_samples);
        /* The mean of marginals v(S + j) - v(S) lies within their range. */
        double lo = INFINITY, hi = -INFINITY;
        for (int s = 0; s < 8; s++) {
            if (s & 1 << j) continue;
            double d = f.v[s | 1 << j] - f.v[s];
            lo = fmin(lo, d);
            hi = fmax(hi, d);
        }
        cr_expect(e->mean >= lo - 1e-9 && e->mean <= hi + 1e-9, "%s: %.6f outside [%.6f, %.6f]",
                  LIVE[j], e->mean, lo, hi);
        cr_expect(fabs(e->marginal - (f.v[7] - f.v[7 & ~(1 << j)])) <= 1e-9);
    }
    ksm_evaluate_result_free(&a);
    ksm_evaluate_result_free(&b);
    fixture_fini(&f);
}

Test(attribution, refusals_name_the_problem)
{
    ksm_model *m = kt_model_new(
        eng, "few", KT_CNN(.cnn = {.base_channels = 1, .pool_layers = 0}, .pool_layers_set = true));
    int64_t lab[2] = {1, 2}, ls = 2;
    ksm_tensor x = image_batch(2, 3, 1, 3), t;
    ksm_tensor_init(&t, NULL, lab, KSM_DTYPE_I64, 1, &ls);
    struct ksm_evaluate_args ea = {
        .input = &x, .targets = &t, .attribution = KSM_ATTRIBUTION_EXACT};
    struct ksm_evaluate_result er;
    /* No live seed (empty slots, then a TRAINING seed at alpha 0). One base channel: odd
     * parameter sizes, so an I64 buffer follows an odd count of F32 values when staged. */
    cr_expect_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), KSM_ENOSEED);
    cr_expect(strstr(err, "live seed") != NULL, "%s", err);
    germinate(m, "r0c0", "conv_light", KSM_ALGO_ADD);
    cr_expect_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), KSM_ENOSEED);
    ea.attribution = 7;
    cr_expect_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), KSM_EINVAL);
    ea.attribution = KSM_ATTRIBUTION_PERMUTATION;
    ea.shapley_samples = KSM_SHAPLEY_SAMPLES_MAX + 1;
    cr_expect_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), KSM_EINVAL);
    cr_expect(strstr(err, "shapley_samples") != NULL, "%s", err);
    /* One live seed: 2 coalitions x (2^19 + 1) rows is over the 2^20-row limit. */
    set_alpha(m, "r0c0", 0.5);
    free(x.data);
    int64_t rows = (1 << 19) + 1;
    x = image_batch(rows, 3, 1, 3);
    int64_t *big = calloc((size_t)rows, sizeof *big);
    ksm_tensor_init(&t, NULL, big, KSM_DTYPE_I64, 1, &rows);
    ea.attribution = KSM_ATTRIBUTION_EXACT;
    ea.shapley_samples = 0;
    cr_expect_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), KSM_ELIMIT);
    cr_expect(strstr(err, "2 attribution coalitions") != NULL && strstr(err, "1048576") != NULL,
              "%s", err);
    free(big);
    free(x.data);
    ksm_model_unref(m);

    /* Nine live seeds: EXACT is refused, AUTO samples. */
    m = kt_model_new(eng, "many", KT_CNN(.cnn = {.base_channels = 4, .n_blocks = 5}));
    struct ksm_slot_report reps[16];
    size_t n = 0;
    cr_assert_eq(ksm_model_slot_reports(m, NULL, reps, 16, &n, err, sizeof err), 0, "%s", err);
    int live = 0;
    for (size_t i = 0; i < n && live < 9; i++, live++) {
        germinate(m, reps[i].slot_id, "conv_light", KSM_ALGO_ADD);
        set_alpha(m, reps[i].slot_id, 0.5);
    }
    cr_assert_eq(live, 9, "the model has %zu slots", n);
    x = image_batch(2, 3, 32, 3);
    ksm_tensor_init(&t, NULL, lab, KSM_DTYPE_I64, 1, &ls);
    ea.input = &x;
    cr_expect_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), KSM_ELIMIT);
    cr_expect(strstr(err, "at most 8 live seeds") != NULL && strstr(err, "has 9") != NULL, "%s",
              err);
    ea.attribution = KSM_ATTRIBUTION_AUTO;
    cr_assert_eq(ksm_model_evaluate(m, &ea, &er, err, sizeof err), 0, "%s", err);
    cr_expect_eq(er.n_shapley, 9);
    cr_expect_str_eq(er.shapley[0].algorithm, "permutation_antithetic");
    ksm_evaluate_result_free(&er);
    free(x.data);
    ksm_model_unref(m);
}
