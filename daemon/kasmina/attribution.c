/* Seed attribution for Evaluate (attribution.h, docs/evaluate.md#attribution). PERMUTATION is
 * esper's CounterfactualEngine (simic/attribution/counterfactual.py) on one fresh engine seeded
 * with attribution_seed: _generate_shapley_configs, then compute_shapley_values drawing from the
 * same random.Random. */
#include "kasmina/attribution.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"

/* ---- CPython's random.Random ---- */

enum { MT_N = 624, MT_M = 397 };

static void mt_init_genrand(struct ksm_pyrandom *r, uint32_t s)
{
    r->mt[0] = s;
    for (int i = 1; i < MT_N; i++)
        r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
    r->mti = MT_N;
}

static void mt_init_by_array(struct ksm_pyrandom *r, const uint32_t *key, size_t len)
{
    uint32_t *mt = r->mt;
    mt_init_genrand(r, 19650218u);
    size_t i = 1, j = 0;
    for (size_t k = MT_N > len ? MT_N : len; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525u)) + key[j] + (uint32_t)j;
        i++;
        j++;
        if (i >= MT_N) {
            mt[0] = mt[MT_N - 1];
            i = 1;
        }
        if (j >= len) j = 0;
    }
    for (size_t k = MT_N - 1; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941u)) - (uint32_t)i;
        i++;
        if (i >= MT_N) {
            mt[0] = mt[MT_N - 1];
            i = 1;
        }
    }
    mt[0] = 0x80000000u;
}

void ksm_pyrandom_seed(struct ksm_pyrandom *r, uint64_t seed)
{
    /* random_seed(): abs(seed) as 32-bit words, least significant first; 0 -> one word. */
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    mt_init_by_array(r, key, key[1] != 0 ? 2 : 1);
}

uint32_t ksm_pyrandom_u32(struct ksm_pyrandom *r)
{
    static const uint32_t mag01[2] = {0u, 0x9908b0dfu};
    uint32_t *mt = r->mt, y;
    if (r->mti >= MT_N) {
        int kk;
        for (kk = 0; kk < MT_N - MT_M; kk++) {
            y = (mt[kk] & 0x80000000u) | (mt[kk + 1] & 0x7fffffffu);
            mt[kk] = mt[kk + MT_M] ^ (y >> 1) ^ mag01[y & 1u];
        }
        for (; kk < MT_N - 1; kk++) {
            y = (mt[kk] & 0x80000000u) | (mt[kk + 1] & 0x7fffffffu);
            mt[kk] = mt[kk + (MT_M - MT_N)] ^ (y >> 1) ^ mag01[y & 1u];
        }
        y = (mt[MT_N - 1] & 0x80000000u) | (mt[0] & 0x7fffffffu);
        mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> 1) ^ mag01[y & 1u];
        r->mti = 0;
    }
    y = mt[r->mti++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint32_t ksm_pyrandom_below(struct ksm_pyrandom *r, uint32_t n)
{
    int k = 0; /* n.bit_length() */
    for (uint32_t v = n; v; v >>= 1) k++;
    uint32_t x;
    do x = ksm_pyrandom_u32(r) >> (32 - k); /* getrandbits(k) */
    while (x >= n);
    return x;
}

void ksm_pyrandom_shuffle(struct ksm_pyrandom *r, int *x, int n)
{
    for (int i = n - 1; i >= 1; i--) {
        int j = (int)ksm_pyrandom_below(r, (uint32_t)i + 1);
        int t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

/* ---- the coalition set ---- */

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static long set_find(const struct ksm_attribution *p, uint64_t key)
{
    for (size_t h = mix64(key) & (p->cap - 1);; h = (h + 1) & (p->cap - 1)) {
        if (p->idx[h] < 0) return -1;
        if (p->keys[h] == key) return p->idx[h];
    }
}

/* Appends key unless present; KSM_ELIMIT once there would be more than max. */
static int set_add(struct ksm_attribution *p, uint64_t key, size_t max)
{
    size_t h = mix64(key) & (p->cap - 1);
    for (; p->idx[h] >= 0; h = (h + 1) & (p->cap - 1))
        if (p->keys[h] == key) return 0;
    if (p->n_coalitions >= max) return KSM_ELIMIT;
    p->keys[h] = key;
    p->idx[h] = (int32_t)p->n_coalitions;
    p->coalitions[p->n_coalitions++] = key;
    return 0;
}

static uint64_t all_on(int n) { return n >= 64 ? ~0ull : (1ull << n) - 1; }

/* esper's _generate_ablation_configs then the antithetic permutation prefixes. */
static int plan_permutation(struct ksm_attribution *p, size_t max)
{
    int n = p->n;
    uint64_t all = all_on(n);
    KSM_TRY(set_add(p, all, max));
    for (int i = 0; i < n; i++) KSM_TRY(set_add(p, all & ~(1ull << i), max));
    KSM_TRY(set_add(p, 0, max));
    int perm[KSM_MAX_SLOTS];
    for (uint32_t s = 0; s < p->samples / 2; s++) {
        for (int i = 0; i < n; i++) perm[i] = i;
        ksm_pyrandom_shuffle(&p->rng, perm, n);
        uint64_t c = 0; /* perm[:k], k = 0..n */
        KSM_TRY(set_add(p, c, max));
        for (int k = 0; k < n; k++) KSM_TRY(set_add(p, c |= 1ull << perm[k], max));
        c = 0; /* perm[::-1][:k] */
        KSM_TRY(set_add(p, c, max));
        for (int k = n - 1; k >= 0; k--) KSM_TRY(set_add(p, c |= 1ull << perm[k], max));
    }
    return 0;
}

int ksm_attribution_plan(struct ksm_attribution *p, enum ksm_attribution_mode mode, int n,
                         uint32_t samples, uint64_t seed, size_t max_coalitions, char *err,
                         size_t errlen)
{
    memset(p, 0, sizeof *p);
    if (mode < KSM_ATTRIBUTION_AUTO || mode > KSM_ATTRIBUTION_PERMUTATION)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "attribution mode %d is not one of AUTO, EXACT, "
                        "PERMUTATION",
                        (int)mode);
    if (samples > KSM_SHAPLEY_SAMPLES_MAX)
        return ksm_errf(err, errlen, KSM_EINVAL, "shapley_samples is %u; at most %d are allowed",
                        samples, KSM_SHAPLEY_SAMPLES_MAX);
    if (n <= 0)
        return ksm_errf(err, errlen, KSM_ENOSEED,
                        "attribution needs at least one live seed (a seed in TRAINING, BLENDING "
                        "or HOLDING with alpha > 0); the model has none");
    if (n > KSM_MAX_SLOTS) return KSM_EINTERNAL;
    if (mode == KSM_ATTRIBUTION_AUTO)
        mode = n <= KSM_ATTRIBUTION_EXACT_MAX_SEEDS ? KSM_ATTRIBUTION_EXACT
                                                    : KSM_ATTRIBUTION_PERMUTATION;
    if (mode == KSM_ATTRIBUTION_EXACT && n > KSM_ATTRIBUTION_EXACT_MAX_SEEDS)
        return ksm_errf(err, errlen, KSM_ELIMIT,
                        "ATTRIBUTION_EXACT takes at most %d live seeds (%d coalitions); the model "
                        "has %d: use ATTRIBUTION_PERMUTATION or ATTRIBUTION_AUTO",
                        KSM_ATTRIBUTION_EXACT_MAX_SEEDS, 1 << KSM_ATTRIBUTION_EXACT_MAX_SEEDS, n);
    p->mode = mode;
    p->n = n;
    p->samples = samples ? samples : KSM_SHAPLEY_SAMPLES_DEFAULT;
    ksm_pyrandom_seed(&p->rng, seed);
    /* Every candidate fits: 2^n, or n + 2 plus (n + 1) per permutation prefix list. */
    size_t most = mode == KSM_ATTRIBUTION_EXACT
                      ? (size_t)1 << n
                      : (size_t)n + 2 + (size_t)(p->samples / 2) * 2 * (size_t)(n + 1);
    if (most > max_coalitions + 1) most = max_coalitions + 1;
    p->cap = 16;
    while (p->cap < 2 * most) p->cap *= 2;
    p->coalitions = malloc(most * sizeof *p->coalitions);
    p->keys = malloc(p->cap * sizeof *p->keys);
    p->idx = malloc(p->cap * sizeof *p->idx);
    if (!p->coalitions || !p->keys || !p->idx) {
        ksm_attribution_fini(p);
        return KSM_ENOMEM;
    }
    memset(p->idx, 0xff, p->cap * sizeof *p->idx);
    int rc = 0;
    if (mode == KSM_ATTRIBUTION_EXACT) {
        /* esper's _generate_full_factorial: config i has seed j on iff bit j of i. */
        for (uint64_t c = 0; c < ((uint64_t)1 << n) && rc == 0; c++)
            rc = set_add(p, c, max_coalitions);
    } else {
        rc = plan_permutation(p, max_coalitions);
    }
    if (rc == KSM_ELIMIT)
        ksm_errf(err, errlen, 0,
                 "attribution over %d live seeds (%s) needs more than %zu coalitions: with "
                 "the configs asked for, an Evaluate runs at most %d configs",
                 n, mode == KSM_ATTRIBUTION_EXACT ? "EXACT" : "PERMUTATION", max_coalitions,
                 KSM_EVALUATE_MAX_CONFIGS);
    if (rc < 0) ksm_attribution_fini(p);
    return rc;
}

void ksm_attribution_fini(struct ksm_attribution *p)
{
    free(p->coalitions);
    free(p->keys);
    free(p->idx);
    p->coalitions = NULL;
    p->keys = NULL;
    p->idx = NULL;
    p->n_coalitions = 0;
}

/* ---- the estimates ---- */

static double value_of(const struct ksm_attribution *p, const double *values, uint64_t c,
                       bool *found)
{
    long i = set_find(p, c);
    *found = i >= 0;
    return i >= 0 ? values[i] : 0.0;
}

static void estimate_exact(const struct ksm_attribution *p, const double *values,
                           struct ksm_shapley_estimate *est)
{
    int n = p->n;
    /* Coalitions are 0 .. 2^n - 1 in order, so values[c] = v(c). Weight of a coalition S not
     * holding i: |S|! (n - |S| - 1)! / n!. */
    double fact[KSM_ATTRIBUTION_EXACT_MAX_SEEDS + 1];
    fact[0] = 1;
    for (int i = 1; i <= n; i++) fact[i] = fact[i - 1] * i;
    uint64_t all = all_on(n);
    for (int i = 0; i < n; i++) {
        uint64_t bit = 1ull << i;
        double phi = 0;
        for (uint64_t s = 0; s <= all; s++) {
            if (s & bit) continue;
            int size = __builtin_popcountll(s);
            phi += fact[size] * fact[n - size - 1] / fact[n] * (values[s | bit] - values[s]);
        }
        est[i].mean = phi;
        est[i].std = 0;
        est[i].n_samples = (uint32_t)fact[n];
        snprintf(est[i].algorithm, sizeof est[i].algorithm, "exact");
        est[i].marginal = values[all] - values[all & ~bit];
    }
}

/* compute_shapley_values: min(100, samples) fresh permutations from the same generator; a
 * marginal counts when both prefixes were evaluated; mean, std with ddof 1 (0 for one sample),
 * summed in order as Python's sum() does. */
static int estimate_permutation(struct ksm_attribution *p, const double *values,
                                struct ksm_shapley_estimate *est)
{
    int n = p->n;
    uint32_t n_perms =
        p->samples < KSM_SHAPLEY_ESTIMATOR_MAX_PERMS ? p->samples : KSM_SHAPLEY_ESTIMATOR_MAX_PERMS;
    double *samples = malloc((size_t)n * (n_perms ? n_perms : 1) * sizeof *samples);
    if (samples == NULL) return KSM_ENOMEM;
    uint32_t count[KSM_MAX_SLOTS] = {0};
    int perm[KSM_MAX_SLOTS];
    for (uint32_t q = 0; q < n_perms; q++) {
        for (int i = 0; i < n; i++) perm[i] = i;
        ksm_pyrandom_shuffle(&p->rng, perm, n);
        uint64_t before = 0;
        for (int i = 0; i < n; i++) {
            uint64_t after = before | 1ull << perm[i];
            bool fb, fa;
            double vb = value_of(p, values, before, &fb), va = value_of(p, values, after, &fa);
            if (fb && fa) samples[(size_t)perm[i] * n_perms + count[perm[i]]++] = va - vb;
            before = after;
        }
    }
    uint64_t all = all_on(n);
    for (int i = 0; i < n; i++) {
        const double *v = samples + (size_t)i * n_perms;
        uint32_t c = count[i];
        double mean = 0, var = 0;
        if (c > 0) {
            for (uint32_t k = 0; k < c; k++) mean += v[k];
            mean /= c;
            if (c > 1) {
                for (uint32_t k = 0; k < c; k++) var += (v[k] - mean) * (v[k] - mean);
                var /= (double)(c - 1);
            }
        }
        est[i].mean = mean;
        est[i].std = pow(var, 0.5); /* variance ** 0.5 */
        est[i].n_samples = c;
        snprintf(est[i].algorithm, sizeof est[i].algorithm, "permutation_antithetic");
        bool f1, f2; /* the ablation configs are always planned */
        est[i].marginal =
            value_of(p, values, all, &f1) - value_of(p, values, all & ~(1ull << i), &f2);
    }
    free(samples);
    return 0;
}

int ksm_attribution_estimate(struct ksm_attribution *p, const double *values,
                             const char *const *ids, struct ksm_evaluate_result *r)
{
    int n = p->n;
    struct ksm_shapley_estimate *est = calloc((size_t)n, sizeof *est);
    if (est == NULL) return KSM_ENOMEM;
    for (int i = 0; i < n; i++) snprintf(est[i].slot_id, sizeof est[i].slot_id, "%s", ids[i]);
    if (p->mode == KSM_ATTRIBUTION_EXACT) {
        estimate_exact(p, values, est);
    } else {
        int rc = estimate_permutation(p, values, est);
        if (rc < 0) {
            free(est);
            return rc;
        }
    }
    struct ksm_interaction_term *it = NULL;
    size_t n_it = 0;
    if (p->mode == KSM_ATTRIBUTION_EXACT && n >= 2) {
        it = calloc((size_t)(n * (n - 1) / 2), sizeof *it);
        if (it == NULL) {
            free(est);
            return KSM_ENOMEM;
        }
        for (int a = 0; a < n; a++)
            for (int b = a + 1; b < n; b++) {
                struct ksm_interaction_term *t = &it[n_it++];
                snprintf(t->slot_a, sizeof t->slot_a, "%s", ids[a]);
                snprintf(t->slot_b, sizeof t->slot_b, "%s", ids[b]);
                uint64_t ca = 1ull << a, cb = 1ull << b;
                t->interaction = values[ca | cb] - values[ca] - values[cb] + values[0];
            }
    }
    r->shapley = est;
    r->n_shapley = (size_t)n;
    r->interactions = it;
    r->n_interactions = n_it;
    return 0;
}
