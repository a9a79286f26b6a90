/*
 * AlphaController (docs/blending.md): the reference progress table, exact snap, INSTANT retargets,
 * HOLD-only retargeting, monotonicity and extreme steepness (docs/README.md#invariants item 7).
 */
#include <criterion/criterion.h>
#include <math.h>

#include "kasmina/alpha.h"
#include "kasmina/errors.h"
#include "kasmina/kasmina.h"

TestSuite(alpha, .timeout = 10);

struct ref_row {
    int n;
    enum ksm_alpha_curve curve;
    double k;
    double p[7];
};

/* docs/blending.md "Reference values of p at interior ticks i/n". */
static const struct ref_row ref_rows[] = {
    {3, KSM_CURVE_LINEAR, 12, {0.333333, 0.666667}},
    {3, KSM_CURVE_SIGMOID, 12, {0.117310, 0.882690}},
    {5, KSM_CURVE_LINEAR, 12, {0.2, 0.4, 0.6, 0.8}},
    {5, KSM_CURVE_COSINE, 12, {0.095492, 0.345492, 0.654508, 0.904508}},
    {5, KSM_CURVE_SIGMOID, 6, {0.104320, 0.339080, 0.660920, 0.895680}},
    {5, KSM_CURVE_SIGMOID, 12, {0.024244, 0.230141, 0.769859, 0.975756}},
    {5, KSM_CURVE_SIGMOID, 24, {0.000740, 0.083168, 0.916832, 0.999260}},
    {8, KSM_CURVE_SIGMOID, 12, {0.008557, 0.045177, 0.180847, 0.5, 0.819153, 0.954823, 0.991443}},
};

Test(alpha, curve_progress_matches_the_reference_table)
{
    for (size_t r = 0; r < sizeof ref_rows / sizeof ref_rows[0]; r++) {
        const struct ref_row *row = &ref_rows[r];
        for (int i = 1; i < row->n; i++) {
            double p = ksm_alpha_curve_progress((double)i / row->n, row->curve, row->k);
            cr_expect(fabs(p - row->p[i - 1]) <= 1e-6, "row %zu i=%d: %.9f vs %.6f", r, i, p,
                      row->p[i - 1]);
        }
    }
}

Test(alpha, controller_ramp_follows_the_reference_table_and_snaps)
{
    for (size_t r = 0; r < sizeof ref_rows / sizeof ref_rows[0]; r++) {
        const struct ref_row *row = &ref_rows[r];
        struct ksm_alpha_controller c;
        ksm_alpha_init(&c, 0.0);
        cr_assert_eq(ksm_alpha_retarget(&c, 1.0, row->n, row->curve, row->k), 0);
        cr_expect_eq(c.mode, KSM_ALPHA_UP);
        for (int i = 1; i < row->n; i++) {
            cr_expect_not(ksm_alpha_step(&c));
            cr_expect(fabs(c.alpha - row->p[i - 1]) <= 1e-6, "row %zu tick %d: %.9f", r, i,
                      c.alpha);
            cr_expect_eq(c.steps_done, (uint32_t)i);
        }
        cr_expect(ksm_alpha_step(&c));
        cr_expect_eq(c.alpha, 1.0); /* exact */
        cr_expect_eq(c.mode, KSM_ALPHA_HOLD);
        cr_expect_eq(c.steps_done, c.steps_total);
        cr_expect_not(ksm_alpha_step(&c));
        cr_expect_eq(c.alpha, 1.0);
    }
}

Test(alpha, down_ramp_mirrors_and_snaps_to_exact_target)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 0.7);
    cr_assert_eq(ksm_alpha_retarget(&c, 0.3, 3, KSM_CURVE_COSINE, NAN), 0);
    cr_expect_eq(c.mode, KSM_ALPHA_DOWN);
    double prev = c.alpha;
    for (int i = 0; i < 2; i++) {
        cr_expect_not(ksm_alpha_step(&c));
        cr_expect(c.alpha <= prev && c.alpha >= 0.3);
        prev = c.alpha;
    }
    cr_expect(ksm_alpha_step(&c));
    cr_expect_eq(c.alpha, 0.3);
}

Test(alpha, zero_steps_is_instant_hold)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 0.2);
    cr_assert_eq(ksm_alpha_retarget(&c, 0.9, 0, KSM_CURVE_SIGMOID, 12), 0);
    cr_expect_eq(c.alpha, 0.9);
    cr_expect_eq(c.mode, KSM_ALPHA_HOLD);
    cr_expect_eq(c.steps_total, 0u);
    cr_expect_not(ksm_alpha_step(&c));
    cr_expect_eq(c.alpha, 0.9);
    /* negative steps count as 0 */
    cr_assert_eq(ksm_alpha_retarget(&c, 0.1, -4, KSM_CURVE_UNSPECIFIED, NAN), 0);
    cr_expect_eq(c.alpha, 0.1);
    cr_expect_eq(c.mode, KSM_ALPHA_HOLD);
}

Test(alpha, retarget_to_current_value_holds)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 0.5);
    cr_assert_eq(ksm_alpha_retarget(&c, 0.5, 5, KSM_CURVE_LINEAR, 12), 0);
    cr_expect_eq(c.mode, KSM_ALPHA_HOLD);
    cr_expect_eq(c.steps_total, 5u);
    cr_expect_not(ksm_alpha_step(&c));
    cr_expect_eq(c.steps_done, 0u);
}

Test(alpha, retarget_only_from_hold)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 0.0);
    cr_assert_eq(ksm_alpha_retarget(&c, 1.0, 4, KSM_CURVE_LINEAR, 12), 0);
    ksm_alpha_step(&c);
    struct ksm_alpha_controller before = c;
    cr_expect_eq(ksm_alpha_retarget(&c, 0.0, 2, KSM_CURVE_LINEAR, 12), KSM_ESTAGE);
    cr_expect_eq(memcmp(&before, &c, sizeof c), 0);
}

Test(alpha, retarget_keeps_curve_and_steepness_when_unspecified_and_floors_steepness)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 0.0);
    cr_assert_eq(ksm_alpha_retarget(&c, 1.0, 0, KSM_CURVE_SIGMOID, 24), 0);
    cr_assert_eq(ksm_alpha_retarget(&c, 0.0, 0, KSM_CURVE_UNSPECIFIED, NAN), 0);
    cr_expect_eq(c.curve, KSM_CURVE_SIGMOID);
    cr_expect_eq(c.steepness, 24.0);
    cr_assert_eq(ksm_alpha_retarget(&c, 1.0, 0, KSM_CURVE_COSINE, 0.001), 0);
    cr_expect_eq(c.curve, KSM_CURVE_COSINE);
    cr_expect_eq(c.steepness, KSM_MIN_STEEPNESS);
}

Test(alpha, targets_are_clamped)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 3.0);
    cr_expect_eq(c.alpha, 1.0);
    cr_expect_eq(c.alpha_target, 1.0);
    cr_assert_eq(ksm_alpha_retarget(&c, -2.0, 2, KSM_CURVE_LINEAR, 12), 0);
    cr_expect_eq(c.alpha_target, 0.0);
    cr_expect_eq(c.mode, KSM_ALPHA_DOWN);
}

Test(alpha, monotone_without_overshoot_for_every_curve)
{
    const enum ksm_alpha_curve curves[] = {KSM_CURVE_LINEAR, KSM_CURVE_COSINE, KSM_CURVE_SIGMOID};
    const double ks[] = {0.1, 1, 6, 12, 24, 100, 1e6};
    const double ends[][2] = {{0, 1}, {0.2, 0.7}, {1, 0}, {0.9, 0.1}, {0.5, 0.5001}};
    for (size_t ci = 0; ci < 3; ci++)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
            for (size_t e = 0; e < sizeof ends / sizeof ends[0]; e++)
                for (int n = 1; n <= 13; n += 3) {
                    struct ksm_alpha_controller c;
                    ksm_alpha_init(&c, ends[e][0]);
                    ksm_alpha_retarget(&c, ends[e][1], n, curves[ci], ks[ki]);
                    bool up = ends[e][1] > ends[e][0];
                    double lo = up ? ends[e][0] : ends[e][1], hi = up ? ends[e][1] : ends[e][0];
                    double prev = c.alpha;
                    for (int i = 1; i <= n; i++) {
                        bool snapped = ksm_alpha_step(&c);
                        cr_assert_eq(snapped, i == n);
                        cr_assert(isfinite(c.alpha));
                        cr_assert(c.alpha >= lo && c.alpha <= hi);
                        cr_assert(up ? c.alpha >= prev : c.alpha <= prev);
                        prev = c.alpha;
                    }
                    cr_assert_eq(c.alpha, ends[e][1]);
                }
}

Test(alpha, extreme_steepness_stays_finite_and_in_unit_interval)
{
    const double ks[] = {1e6, 1e300, 0.1, 1e-9};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++)
        for (int j = -2; j <= 102; j++) {
            double p = ksm_alpha_curve_progress(j / 100.0, KSM_CURVE_SIGMOID, ks[i]);
            cr_assert(isfinite(p), "k=%g t=%g", ks[i], j / 100.0);
            cr_assert(p >= 0.0 && p <= 1.0, "k=%g t=%g p=%g", ks[i], j / 100.0, p);
        }
    /* the steepness at the floor still gives a usable ramp */
    cr_expect(fabs(ksm_alpha_curve_progress(0.5, KSM_CURVE_SIGMOID, 0.1) - 0.5) < 1e-12);
    cr_expect_eq(ksm_alpha_curve_progress(0.0, KSM_CURVE_SIGMOID, 1e6), 0.0);
    cr_expect_eq(ksm_alpha_curve_progress(1.0, KSM_CURVE_SIGMOID, 1e6), 1.0);
}

Test(alpha, linear_ten_step_blend_gives_tenths)
{
    struct ksm_alpha_controller c;
    ksm_alpha_init(&c, 0.0);
    ksm_alpha_retarget(&c, 1.0, 10, KSM_CURVE_LINEAR, 12);
    for (int i = 1; i <= 10; i++) {
        ksm_alpha_step(&c);
        cr_expect(fabs(c.alpha - i / 10.0) < 1e-12, "tick %d: %.17g", i, c.alpha);
    }
    cr_expect_eq(c.alpha, 1.0);
}

Test(alpha, names)
{
    cr_expect_str_eq(ksm_stage_name(KSM_STAGE_HOLDING), "HOLDING");
    cr_expect_str_eq(ksm_stage_name((enum ksm_stage)5), "UNKNOWN");
    cr_expect_str_eq(ksm_stage_name((enum ksm_stage)77), "UNKNOWN");
    cr_expect(ksm_stage_valid(0) && ksm_stage_valid(4) && ksm_stage_valid(6) &&
              ksm_stage_valid(10));
    cr_expect(!ksm_stage_valid(5) && !ksm_stage_valid(11) && !ksm_stage_valid(-1));
    cr_expect_str_eq(ksm_alpha_mode_name(KSM_ALPHA_DOWN), "DOWN");
    cr_expect_str_eq(ksm_alpha_curve_name(KSM_CURVE_COSINE), "COSINE");
    cr_expect_str_eq(ksm_alpha_algorithm_name(KSM_ALGO_MULTIPLY), "MULTIPLY");
    cr_expect_str_eq(ksm_gate_level_name(KSM_GATE_G5), "G5");
    cr_expect_str_eq(ksm_lifecycle_type_name(KSM_EV_SEED_GATE_EVALUATED), "SEED_GATE_EVALUATED");
    cr_expect_str_eq(ksm_topology_name(KSM_TOPOLOGY_TRANSFORMER), "transformer");
}
