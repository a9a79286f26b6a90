/*
 * The CPU backend's vectorisable elementary functions (backend/cpu/cpu_math.h): the error in
 * ulp against libm's double exp/erf/tanh (rounded to float that is within 0.5 ulp + 2^-29 of
 * the true value) over a dense sweep of every float bit pattern and every float of the ranges
 * where rounding is hardest (overflow, the subnormal results, erf's branch points); special
 * values; and the vectorised kernels of the unary ops giving bit-identical results to the scalar
 * functions (the vector lanes, the remainder and every ISA clone compute the same thing).
 */
#include <criterion/criterion.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "backend/cpu/cpu_math.h"
#include "kasmina/backend.h"
#include "kasmina/ops.h"

TestSuite(cpu_math, .timeout = 240);

/* |f - r| in units of the last place of a float at r (subnormal ulp below 2^-126); r beyond
 * the float range must round to an infinity. */
static double ulp_err(float f, double r)
{
    if (isnan(r)) return isnan(f) ? 0.0 : INFINITY;
    if (isnan(f)) return INFINITY;
    if (fabs(r) >= 0x1.ffffffp127) return isinf(f) && (f > 0) == (r > 0) ? 0.0 : INFINITY;
    if (isinf(f)) return INFINITY;
    int e;
    frexp(r, &e); /* |r| in [2^(e-1), 2^e) */
    int ue = e - 24;
    if (ue < -149) ue = -149;
    return fabs((double)f - r) / ldexp(1.0, ue);
}

enum fn { F_EXP, F_ERF, F_TANH, F_SIGMOID };

static float eval(enum fn f, float x)
{
    switch (f) {
    case F_EXP: return ksm_cpu_expf(x);
    case F_ERF: return ksm_cpu_erff(x);
    case F_TANH: return ksm_cpu_tanhf(x);
    default: return ksm_cpu_sigmoidf(x);
    }
}

static double ref(enum fn f, float x)
{
    const double d = x;
    switch (f) {
    case F_EXP: return exp(d);
    case F_ERF: return erf(d);
    case F_TANH: return tanh(d);
    default: return 1.0 / (1.0 + exp(-d));
    }
}

struct worst {
    double ulp;
    float x;
};

/* Bit patterns [lo, hi] (both signs when the pattern is taken as is) with a stride. */
static void sweep(enum fn f, uint64_t lo, uint64_t hi, uint64_t step, struct worst *w)
{
    for (uint64_t u = lo; u <= hi; u += step) {
        const float x = ksm_cm_bitsf((uint32_t)u);
        const double e = ulp_err(eval(f, x), ref(f, x));
        if (!(e <= w->ulp)) { /* NaN error counts as the worst */
            w->ulp = e;
            w->x = x;
        }
    }
}

/* Every float of [a, b] (same sign) with a stride. */
static void sweep_range(enum fn f, float a, float b, uint64_t step, struct worst *w)
{
    uint32_t ua = ksm_cm_fbits(a), ub = ksm_cm_fbits(b);
    if (ua > ub) {
        uint32_t t = ua;
        ua = ub;
        ub = t;
    }
    sweep(f, ua, ub, step, w);
}

static void check(enum fn f, const char *name, double bound, const float (*ranges)[2], int nr)
{
    struct worst w = {0.0, 0.0f};
    sweep(f, 0, 0xffffffffu, 127, &w); /* 33.8 million floats of every exponent */
    for (int i = 0; i < nr; i++) {
        sweep_range(f, ranges[i][0], ranges[i][1], 1, &w);
        sweep_range(f, -ranges[i][0], -ranges[i][1], 1, &w);
    }
    cr_log_info("%s: max error %.4f ulp at %a", name, w.ulp, (double)w.x);
    cr_expect(w.ulp <= bound, "%s: %.4f ulp at %a (bound %.2f)", name, w.ulp, (double)w.x, bound);
}

Test(cpu_math, expf_is_within_one_ulp)
{
    const float r[][2] = {
        {88.0f, 89.0f},         /* overflow threshold */
        {87.0f, 88.0f},         /* the largest results */
        {103.0f, 104.5f},       /* (negated:) the smallest subnormals and underflow to 0 */
        {0x1p-12f, 0x1.2p-12f}, /* near 1 */
        {0.34f, 0.35f},         /* the reduction's boundary at ln2/2 */
    };
    check(F_EXP, "expf", 1.0, r, (int)(sizeof r / sizeof r[0]));
}

/* The reduced-range exp (cross-entropy's and attention's) is ksm_cpu_expf on its range, bit for
 * bit: every 31st float of [-87.33654, 0] and every float near both ends (see below) and
 * cross-entropy's floor at -80. */
Test(cpu_math, expf_normal_equals_expf_on_its_range)
{
    const uint32_t lo = ksm_cm_fbits(-0.0f), hi = ksm_cm_fbits(-87.33654f);
    uint64_t bad = 0, n = 0;
    float first_bad = 0.0f;
    /* near 0: the floats of [-1e-3, -0.999e-3] and every float of magnitude below 1e-38
     * (subnormals included); all of [-1e-3, 0] is a billion floats, too slow under ASan */
    const float dense[][2] = {
        {-87.33654f, -87.2f}, {-80.01f, -79.99f}, {-1e-3f, -0.999e-3f}, {-1e-38f, -0.0f}};
    for (int r = -1; r < 4; r++) {
        uint32_t a = r < 0 ? lo : ksm_cm_fbits(dense[r][1]),
                 b = r < 0 ? hi : ksm_cm_fbits(dense[r][0]);
        for (uint64_t u = a; u <= b; u += r < 0 ? 31 : 1) {
            const float x = ksm_cm_bitsf((uint32_t)u);
            n++;
            if (ksm_cm_fbits(ksm_cpu_expf_normal(x)) != ksm_cm_fbits(ksm_cpu_expf(x)) && bad++ == 0)
                first_bad = x;
        }
    }
    cr_expect_eq(bad, 0, "%llu of %llu differ, the first at %a", (unsigned long long)bad,
                 (unsigned long long)n, (double)first_bad);
    cr_expect_eq(ksm_cpu_expf_normal(0.0f), 1.0f);
    cr_expect(ksm_cpu_expf_normal(-87.33654f) >= FLT_MIN);
}

/* The float erf (GELU's): within 1.35 ulp; every float of [0, 4.5] was checked once offline
 * (max 1.3194 ulp at 0.996785, where the |x| < 1 polynomial ends), here the stride sweep plus
 * the branch point at 1, the region of the worst case and the clamp at 4. */
Test(cpu_math, erff_is_within_one_and_a_third_ulp)
{
    const float r[][2] = {{0.95f, 1.05f}, {3.9f, 4.1f}};
    check(F_ERF, "erff", 1.35, r, (int)(sizeof r / sizeof r[0]));
}

Test(cpu_math, tanhf_is_correctly_rounded_but_for_a_hair)
{
    const float r[][2] = {{0.62f, 0.63f}, {8.0f, 9.5f}};
    check(F_TANH, "tanhf", 0.501, r, (int)(sizeof r / sizeof r[0]));
}

Test(cpu_math, sigmoidf_is_correctly_rounded_but_for_a_hair)
{
    const float r[][2] = {{100.0f, 105.0f}, {16.0f, 18.0f}};
    check(F_SIGMOID, "sigmoidf", 0.501, r, (int)(sizeof r / sizeof r[0]));
}

static int is_neg_zero(float f) { return f == 0.0f && signbit(f); }
static int is_pos_zero(float f) { return f == 0.0f && !signbit(f); }

Test(cpu_math, special_values)
{
    const float inf = INFINITY, nan = NAN;
    cr_expect(is_pos_zero(ksm_cpu_expf(-inf)));
    cr_expect(isinf(ksm_cpu_expf(inf)) && ksm_cpu_expf(inf) > 0);
    cr_expect(isnan(ksm_cpu_expf(nan)) && isnan(ksm_cpu_expf(-nan)));
    cr_expect_eq(ksm_cpu_expf(0.0f), 1.0f);
    cr_expect_eq(ksm_cpu_expf(-0.0f), 1.0f);
    cr_expect_eq(ksm_cpu_expf(KSM_CM_EXPF_MAX), expf(KSM_CM_EXPF_MAX));
    cr_expect(ksm_cpu_expf(KSM_CM_EXPF_MAX) <= FLT_MAX);
    cr_expect(isinf(ksm_cpu_expf(nextafterf(KSM_CM_EXPF_MAX, inf))));
    cr_expect(isinf(ksm_cpu_expf(1e30f)) && isinf(ksm_cpu_expf(FLT_MAX)));
    cr_expect(is_pos_zero(ksm_cpu_expf(-1e30f)) && is_pos_zero(ksm_cpu_expf(-FLT_MAX)));
    cr_expect_eq(ksm_cpu_expf(-103.0f), expf(-103.0f)); /* a subnormal */
    cr_expect(is_pos_zero(ksm_cpu_expf(-104.0f)));

    cr_expect_eq(ksm_cpu_erff(inf), 1.0f);
    cr_expect_eq(ksm_cpu_erff(-inf), -1.0f);
    cr_expect(is_pos_zero(ksm_cpu_erff(0.0f)) && is_neg_zero(ksm_cpu_erff(-0.0f)));
    cr_expect(isnan(ksm_cpu_erff(nan)) && isnan(ksm_cpu_erff(-nan)));
    cr_expect_eq(ksm_cpu_erff(1e30f), 1.0f);
    cr_expect_eq(ksm_cpu_erff(0x1p-149f), 0x1p-149f * 1.0f + 0.0f); /* x * 1.128 rounds to x */

    cr_expect_eq(ksm_cpu_tanhf(inf), 1.0f);
    cr_expect_eq(ksm_cpu_tanhf(-inf), -1.0f);
    cr_expect(is_pos_zero(ksm_cpu_tanhf(0.0f)) && is_neg_zero(ksm_cpu_tanhf(-0.0f)));
    cr_expect(isnan(ksm_cpu_tanhf(nan)));

    cr_expect_eq(ksm_cpu_sigmoidf(inf), 1.0f);
    cr_expect(is_pos_zero(ksm_cpu_sigmoidf(-inf)));
    cr_expect_eq(ksm_cpu_sigmoidf(0.0f), 0.5f);
    cr_expect(isnan(ksm_cpu_sigmoidf(nan)));

    /* GELU keeps the shape of nn/kmath.h's formula */
    cr_expect_eq(ksm_cpu_gelu(inf), inf);
    cr_expect(isnan(ksm_cpu_gelu(-inf))); /* -inf * 0, as torch */
    cr_expect(isnan(ksm_cpu_gelu(nan)));
}

/* The unary ops (vectorised, dispatched to an ISA clone) against the scalar functions, on
 * contiguous and strided views, over a length that leaves vector remainders. */
Test(cpu_math, vector_kernels_match_the_scalar_functions_bit_for_bit)
{
    ksm_backend *cpu;
    cr_assert_eq(ksm_cpu_backend_new(1, &cpu), 0);
    ksm_device *dev = ksm_backend_device(cpu, 0);
    ksm_stream *st;
    cr_assert_eq(ksm_stream_new(dev, &st), 0);
    const int64_t n = 100003;
    int64_t shape[] = {n}, shape2[] = {n / 2};
    ksm_tensor x, y;
    cr_assert_eq(ksm_tensor_init(&x, dev, NULL, KSM_DTYPE_F32, 1, shape), 0);
    cr_assert_eq(ksm_tensor_init(&y, dev, NULL, KSM_DTYPE_F32, 1, shape), 0);
    cr_assert_eq(ksm_device_malloc(dev, ksm_tensor_nbytes(&x), &x.data), 0);
    cr_assert_eq(ksm_device_malloc(dev, ksm_tensor_nbytes(&y), &y.data), 0);
    float *xs = x.data, *ys = y.data;
    uint32_t s = 12345u;
    for (int64_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        xs[i] = ksm_cm_bitsf(s); /* every exponent, NaNs and infinities included */
        if (i % 3 == 0) xs[i] = (float)(int32_t)s * 0x1p-27f; /* and plenty of [-16, 16] */
    }
    xs[0] = INFINITY;
    xs[1] = -INFINITY;
    xs[2] = -0.0f;
    int (*ops[])(ksm_stream *, ksm_tensor *, const ksm_tensor *) = {ksm_op_gelu, ksm_op_sigmoid,
                                                                    ksm_op_tanh};
    float (*fns[])(float) = {ksm_cpu_gelu, ksm_cpu_sigmoidf, ksm_cpu_tanhf};
    for (int k = 0; k < 3; k++) {
        cr_assert_eq(ops[k](st, &y, &x), 0);
        cr_assert_eq(ksm_stream_synchronize(st), 0);
        for (int64_t i = 0; i < n; i++) {
            const uint32_t got = ksm_cm_fbits(ys[i]), want = ksm_cm_fbits(fns[k](xs[i]));
            if (got != want)
                cr_assert_fail("op %d at %lld: x %a gives %a, scalar %a", k, (long long)i,
                               (double)xs[i], (double)ys[i], (double)fns[k](xs[i]));
        }
        /* every other element: the strided loop */
        ksm_tensor xv = x, yv = y;
        cr_assert_eq(ksm_tensor_init(&xv, dev, x.data, KSM_DTYPE_F32, 1, shape2), 0);
        xv.stride[0] = 2;
        cr_assert_eq(ksm_tensor_init(&yv, dev, y.data, KSM_DTYPE_F32, 1, shape2), 0);
        cr_assert_eq(ops[k](st, &yv, &xv), 0);
        cr_assert_eq(ksm_stream_synchronize(st), 0);
        for (int64_t i = 0; i < n / 2; i++)
            cr_assert_eq(ksm_cm_fbits(ys[i]), ksm_cm_fbits(fns[k](xs[2 * i])),
                         "op %d strided at %lld", k, (long long)i);
    }
    ksm_device_free(dev, x.data);
    ksm_device_free(dev, y.data);
    ksm_stream_free(st);
    ksm_backend_free(cpu);
}

/* The double exp of the backward's softmax terms: within 1e-12 of libm's exp on [-700, 0] (3e-13
 * measured), a vanishing positive value below, -inf clamped, NaN kept. */
Test(cpu_math, exp_d_neg_matches_libm_and_clamps)
{
    double worst = 0.0;
    for (int i = 0; i <= 7000000; i++) {
        const double y = -700.0 * (double)i / 7000000.0 - 1e-7 * (i % 7);
        if (y < -700.0) continue;
        const double want = exp(y), got = ksm_cpu_exp_d_neg(y);
        const double rel = fabs(got - want) / want;
        if (rel > worst) worst = rel;
    }
    cr_expect(worst < 1e-12, "max relative error %.3g", worst);
    cr_expect_eq(ksm_cpu_exp_d_neg(0.0), 1.0);
    cr_expect_eq(ksm_cpu_exp_d_neg(-0.0), 1.0);
    const double floor_v = ksm_cpu_exp_d_neg(-700.0);
    cr_expect(floor_v > 0.0 && floor_v < 1e-300, "%g", floor_v);
    cr_expect_eq(ksm_cpu_exp_d_neg(-1e6), floor_v);
    cr_expect_eq(ksm_cpu_exp_d_neg(-INFINITY), floor_v);
    cr_expect(isnan(ksm_cpu_exp_d_neg(NAN)));
}
