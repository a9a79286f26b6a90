/*
 * kasmina/attribution: seed attribution for Evaluate (docs/evaluate.md#attribution), after esper's
 * simic/attribution/counterfactual.py. The coalitions to evaluate are planned first (bit j of a
 * coalition = live seed j on); Evaluate runs them in its fused pass and hands their accuracies
 * back for the estimates.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "kasmina/kasmina.h"

/* CPython's random.Random (Modules/_randommodule.c, Lib/random.py), so a seed gives esper's
 * permutations: MT19937 seeded as random.Random(seed) for a non-negative int (init_by_array over
 * the seed's 32-bit words, least significant first; 0 is one zero word), getrandbits(k) for
 * k <= 32 (the top k bits of one output), _randbelow (rejection on bit_length(n) bits) and
 * shuffle (Fisher-Yates from the end). */
struct ksm_pyrandom {
    uint32_t mt[624];
    int mti;
};

void ksm_pyrandom_seed(struct ksm_pyrandom *r, uint64_t seed);
uint32_t ksm_pyrandom_u32(struct ksm_pyrandom *r);
/* A uniform integer in [0, n), n >= 1 (random._randbelow_with_getrandbits). */
uint32_t ksm_pyrandom_below(struct ksm_pyrandom *r, uint32_t n);
/* random.shuffle(x) of x[0..n). */
void ksm_pyrandom_shuffle(struct ksm_pyrandom *r, int *x, int n);

/* esper's CounterfactualConfig.shapley_samples is capped at this many permutations in
 * compute_shapley_values (max_perms). */
#define KSM_SHAPLEY_ESTIMATOR_MAX_PERMS 100

struct ksm_attribution {
    enum ksm_attribution_mode mode; /* resolved: EXACT or PERMUTATION */
    int n;                          /* live seeds, 1..KSM_MAX_SLOTS */
    uint32_t samples;               /* PERMUTATION: shapley_samples (0 replaced by 20) */
    struct ksm_pyrandom rng;        /* after the plan; the estimate goes on drawing from it */
    uint64_t *coalitions;           /* to evaluate, unique, in esper's order */
    size_t n_coalitions;
    uint64_t *keys; /* open-addressing set: coalition -> its index (slot empty: idx -1) */
    int32_t *idx;
    size_t cap;
};

/* Plans the coalitions of n live seeds. AUTO resolves to EXACT for n <= 8. Errors (with a
 * sentence in err): n == 0 (KSM_ENOSEED), EXACT with n > 8 or more than max_coalitions
 * coalitions (KSM_ELIMIT), samples over KSM_SHAPLEY_SAMPLES_MAX (KSM_EINVAL). */
int ksm_attribution_plan(struct ksm_attribution *p, enum ksm_attribution_mode mode, int n,
                         uint32_t samples, uint64_t seed, size_t max_coalitions, char *err,
                         size_t errlen);

/* values[i] = v(coalitions[i]) (accuracy in percent). Fills r->shapley (n entries, ids[j] the
 * slot of live seed j) and, for EXACT, r->interactions (every pair). */
int ksm_attribution_estimate(struct ksm_attribution *p, const double *values,
                             const char *const *ids, struct ksm_evaluate_result *r);

void ksm_attribution_fini(struct ksm_attribution *p);
