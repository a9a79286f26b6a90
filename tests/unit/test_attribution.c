/*
 * Evaluate's attribution arithmetic (kasmina/attribution.h) against tests/golden/attribution.json
 * (gen_attribution.py): CPython's random.Random (outputs and shuffles for 64-bit seeds), esper's
 * own CounterfactualEngine (planned coalitions in order, Shapley mean/std/n_samples), exact
 * Shapley values as the mean over all n! orderings, marginals and interactions; and the plan's
 * refusals.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/attribution.h"
#include "kasmina/errors.h"

static json_t *golden(void)
{
    json_error_t e;
    json_t *j = json_load_file(KSM_GOLDEN_DIR "/attribution.json", 0, &e);
    cr_assert_not_null(j, "attribution.json: %s", e.text);
    return j;
}

static uint64_t u64_of(json_t *s) { return strtoull(json_string_value(s), NULL, 0); }

static bool close_to(double a, double b) { return fabs(a - b) <= 1e-9 * fmax(1.0, fabs(b)); }

static const char *const IDS[64] = {
    "s0",  "s1",  "s2",  "s3",  "s4",  "s5",  "s6",  "s7",  "s8",  "s9",  "s10", "s11", "s12",
    "s13", "s14", "s15", "s16", "s17", "s18", "s19", "s20", "s21", "s22", "s23", "s24", "s25",
    "s26", "s27", "s28", "s29", "s30", "s31", "s32", "s33", "s34", "s35", "s36", "s37", "s38",
    "s39", "s40", "s41", "s42", "s43", "s44", "s45", "s46", "s47", "s48", "s49", "s50", "s51",
    "s52", "s53", "s54", "s55", "s56", "s57", "s58", "s59", "s60", "s61", "s62", "s63"};

TestSuite(attribution, .timeout = 30);

Test(attribution, python_random_outputs_and_shuffles_match_cpython)
{
    json_t *g = golden();
    json_t *cases = json_object_get(g, "rng"), *c;
    size_t i;
    cr_assert_gt(json_array_size(cases), 0);
    json_array_foreach(cases, i, c)
    {
        uint64_t seed = u64_of(json_object_get(c, "seed"));
        struct ksm_pyrandom r;
        ksm_pyrandom_seed(&r, seed);
        json_t *u32 = json_object_get(c, "u32");
        for (size_t k = 0; k < json_array_size(u32); k++)
            cr_expect_eq(ksm_pyrandom_u32(&r), (uint32_t)json_integer_value(json_array_get(u32, k)),
                         "seed %llu output %zu", (unsigned long long)seed, k);
        ksm_pyrandom_seed(&r, seed);
        json_t *perms = json_object_get(c, "perms"), *p;
        size_t q;
        json_array_foreach(perms, q, p)
        {
            int n = (int)json_array_size(p), x[64];
            for (int j = 0; j < n; j++) x[j] = j;
            ksm_pyrandom_shuffle(&r, x, n);
            for (int j = 0; j < n; j++)
                cr_expect_eq(x[j], json_integer_value(json_array_get(p, (size_t)j)),
                             "seed %llu, shuffle of %d, position %d", (unsigned long long)seed, n,
                             j);
        }
    }
    json_decref(g);
}

Test(attribution, permutation_matches_esper_counterfactual_engine)
{
    json_t *g = golden();
    json_t *cases = json_object_get(g, "permutation"), *c;
    size_t i;
    cr_assert_gt(json_array_size(cases), 0);
    json_array_foreach(cases, i, c)
    {
        int n = (int)json_integer_value(json_object_get(c, "n"));
        uint32_t samples = (uint32_t)json_integer_value(json_object_get(c, "samples"));
        uint64_t seed = u64_of(json_object_get(c, "seed"));
        json_t *coal = json_object_get(c, "coalitions"), *vals = json_object_get(c, "values");
        struct ksm_attribution at;
        char err[256] = "";
        cr_assert_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_PERMUTATION, n, samples, seed,
                                          KSM_EVALUATE_MAX_CONFIGS, err, sizeof err),
                     0, "%s", err);
        cr_assert_eq(at.mode, KSM_ATTRIBUTION_PERMUTATION);
        cr_assert_eq(at.n_coalitions, json_array_size(coal), "n=%d samples=%u: %zu coalitions", n,
                     samples, at.n_coalitions);
        double *v = malloc(at.n_coalitions * sizeof *v);
        for (size_t k = 0; k < at.n_coalitions; k++) {
            uint64_t want = strtoull(json_string_value(json_array_get(coal, k)), NULL, 16);
            cr_expect_eq(at.coalitions[k], want, "n=%d: coalition %zu", n, k);
            v[k] = json_real_value(json_array_get(vals, k));
        }
        struct ksm_evaluate_result r = {0};
        cr_assert_eq(ksm_attribution_estimate(&at, v, IDS, &r), 0);
        cr_assert_eq(r.n_shapley, (size_t)n);
        cr_expect_eq(r.n_interactions, 0);
        for (int j = 0; j < n; j++) {
            const struct ksm_shapley_estimate *e = &r.shapley[j];
            double mean = json_real_value(json_array_get(json_object_get(c, "mean"), (size_t)j));
            double sd = json_real_value(json_array_get(json_object_get(c, "std"), (size_t)j));
            double mg = json_real_value(json_array_get(json_object_get(c, "marginal"), (size_t)j));
            json_int_t ns =
                json_integer_value(json_array_get(json_object_get(c, "n_samples"), (size_t)j));
            cr_expect_str_eq(e->slot_id, IDS[j]);
            cr_expect_str_eq(e->algorithm, "permutation_antithetic");
            cr_expect_eq(e->n_samples, (uint32_t)ns, "n=%d seed %d: n_samples %u vs %lld", n, j,
                         e->n_samples, (long long)ns);
            cr_expect(close_to(e->mean, mean), "n=%d seed %d: mean %.17g vs esper %.17g", n, j,
                      e->mean, mean);
            cr_expect(close_to(e->std, sd), "n=%d seed %d: std %.17g vs esper %.17g", n, j, e->std,
                      sd);
            cr_expect(close_to(e->marginal, mg), "n=%d seed %d: marginal", n, j);
        }
        ksm_evaluate_result_free(&r);
        free(v);
        ksm_attribution_fini(&at);
    }
    json_decref(g);
}

Test(attribution, exact_matches_the_mean_over_all_orderings)
{
    json_t *g = golden();
    json_t *cases = json_object_get(g, "exact"), *c;
    size_t i;
    cr_assert_gt(json_array_size(cases), 0);
    json_array_foreach(cases, i, c)
    {
        int n = (int)json_integer_value(json_object_get(c, "n"));
        struct ksm_attribution at;
        char err[256] = "";
        /* AUTO resolves to EXACT up to 8 live seeds. */
        cr_assert_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_AUTO, n, 0, 0,
                                          KSM_EVALUATE_MAX_CONFIGS, err, sizeof err),
                     0, "%s", err);
        cr_assert_eq(at.mode, KSM_ATTRIBUTION_EXACT);
        cr_assert_eq(at.n_coalitions, (size_t)1 << n);
        json_t *vals = json_object_get(c, "values");
        double *v = malloc(at.n_coalitions * sizeof *v);
        for (size_t k = 0; k < at.n_coalitions; k++) {
            cr_expect_eq(at.coalitions[k], k, "esper's full factorial order");
            v[k] = json_real_value(json_array_get(vals, k));
        }
        struct ksm_evaluate_result r = {0};
        cr_assert_eq(ksm_attribution_estimate(&at, v, IDS, &r), 0);
        cr_assert_eq(r.n_shapley, (size_t)n);
        double sum = 0;
        for (int j = 0; j < n; j++) {
            const struct ksm_shapley_estimate *e = &r.shapley[j];
            double phi = json_real_value(json_array_get(json_object_get(c, "shapley"), (size_t)j));
            double mg = json_real_value(json_array_get(json_object_get(c, "marginal"), (size_t)j));
            cr_expect(close_to(e->mean, phi), "n=%d seed %d: %.17g vs %.17g", n, j, e->mean, phi);
            cr_expect_eq(e->std, 0.0);
            cr_expect_eq(e->n_samples,
                         (uint32_t)json_integer_value(json_object_get(c, "n_samples")));
            cr_expect_str_eq(e->algorithm, "exact");
            cr_expect(close_to(e->marginal, mg), "n=%d seed %d: marginal", n, j);
            sum += e->mean;
        }
        /* Efficiency: the values add up to v(all) - v({}). */
        cr_expect(close_to(sum, v[at.n_coalitions - 1] - v[0]), "n=%d: efficiency", n);
        json_t *it = json_object_get(c, "interactions");
        cr_assert_eq(r.n_interactions, json_array_size(it));
        size_t q = 0;
        for (int a = 0; a < n; a++)
            for (int b = a + 1; b < n; b++, q++) {
                cr_expect_str_eq(r.interactions[q].slot_a, IDS[a]);
                cr_expect_str_eq(r.interactions[q].slot_b, IDS[b]);
                cr_expect(
                    close_to(r.interactions[q].interaction, json_real_value(json_array_get(it, q))),
                    "n=%d pair (%d,%d)", n, a, b);
            }
        ksm_evaluate_result_free(&r);
        free(v);
        ksm_attribution_fini(&at);
    }
    json_decref(g);
}

Test(attribution, plan_refuses_what_it_cannot_do)
{
    struct ksm_attribution at;
    char err[256];
    cr_expect_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_EXACT, 0, 0, 0, 4096, err, sizeof err),
                 KSM_ENOSEED);
    cr_expect(strstr(err, "live seed") != NULL, "%s", err);
    cr_expect_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_EXACT, 9, 0, 0, 4096, err, sizeof err),
                 KSM_ELIMIT);
    cr_expect(strstr(err, "at most 8 live seeds") != NULL, "%s", err);
    cr_expect_eq(
        ksm_attribution_plan(&at, KSM_ATTRIBUTION_PERMUTATION, 3, 1001, 0, 4096, err, sizeof err),
        KSM_EINVAL);
    cr_expect(strstr(err, "shapley_samples") != NULL, "%s", err);
    cr_expect_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_NONE, 3, 0, 0, 4096, err, sizeof err),
                 KSM_EINVAL);
    /* 2^8 coalitions do not fit in 255 configs. */
    cr_expect_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_EXACT, 8, 0, 0, 255, err, sizeof err),
                 KSM_ELIMIT);
    cr_expect(strstr(err, "255") != NULL, "%s", err);
    /* AUTO over 9 seeds samples; 0 samples means esper's default of 20: n + 2 ablation configs
     * and 10 permutation pairs, each direction adding at most its n - 2 inner prefixes. */
    cr_assert_eq(ksm_attribution_plan(&at, KSM_ATTRIBUTION_AUTO, 9, 0, 1, 4096, err, sizeof err), 0,
                 "%s", err);
    cr_expect_eq(at.mode, KSM_ATTRIBUTION_PERMUTATION);
    cr_expect_eq(at.samples, 20);
    cr_expect_leq(at.n_coalitions, 11 + 10 * 2 * 7);
    cr_expect_gt(at.n_coalitions, 11);
    ksm_attribution_fini(&at);
}
