/*
 * Vectorisable elementary functions for the CPU backend (CPU only: the CUDA plugin keeps the
 * device's own expf/erff/tanhf through nn/kmath.h).
 *
 * Branch-free: every path is computed and the result selected, so gcc vectorises loops that
 * call these (after inlining) without -ffast-math. Only IEEE add/sub/mul/div, comparisons,
 * selects and integer bit tricks: no libm calls, no FMA (the build is ISO C, so the compiler
 * does not contract either), hence a vector lane and the scalar remainder compute bit-identical
 * results, on any x86-64 and whatever the vector width.
 *
 * Accuracy against the correctly rounded result (tests/unit/test_cpu_math.c: every 127th float
 * bit pattern plus every float of the hard ranges, against libm in double):
 *   ksm_cpu_expf     float reduction and polynomial: max 0.99 ulp over all 2^32 floats
 *   ksm_cpu_erff     float polynomials and the float exp: max 1.32 ulp over all 2^32 floats
 *   ksm_cpu_tanhf    evaluated in double and rounded once: max 0.5001 ulp
 *   ksm_cpu_sigmoidf 1 / (1 + e^-x) in double, rounded once: max 0.5000 ulp
 * Special values: exp(-inf) = +0, exp(+inf) = +inf, overflow to +inf above 88.72284,
 * underflow through the subnormals to +0; erf(+-inf) = +-1, tanh(+-inf) = +-1, erf(-0) = -0,
 * tanh(-0) = -0; NaN in, NaN out.
 */
#pragma once

#include <stdint.h>
#include <string.h>

static inline uint32_t ksm_cm_fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float ksm_cm_bitsf(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint64_t ksm_cm_dbits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static inline double ksm_cm_bitsd(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* A signed integer whose order is the order of the floats (NaNs beyond the infinities). Its own
 * inverse. Clamping these with integer min/max keeps the code free of floating-point selects,
 * which gcc would otherwise turn into branches it cannot vectorise under -ftrapping-math. */
static inline int32_t ksm_cm_key(uint32_t b)
{
    const int32_t i = (int32_t)b;
    return i ^ (int32_t)((uint32_t)(i >> 31) >> 1);
}

static inline float ksm_cm_clampf(float x, float lo, float hi)
{
    int32_t k = ksm_cm_key(ksm_cm_fbits(x));
    const int32_t kl = ksm_cm_key(ksm_cm_fbits(lo)), kh = ksm_cm_key(ksm_cm_fbits(hi));
    k = k < kl ? kl : k;
    k = k > kh ? kh : k;
    return ksm_cm_bitsf((uint32_t)ksm_cm_key((uint32_t)k));
}

/* The bits of r, or of x where x is a NaN (r is then meaningless). */
static inline uint32_t ksm_cm_nan_from(uint32_t rb, uint32_t xb)
{
    const uint32_t m = 0u - (uint32_t)((xb & 0x7fffffffu) > 0x7f800000u);
    return (rb & ~m) | (xb & m);
}

/* a where mask m is all ones, b where it is 0: a blend, which gcc keeps branch-free. */
static inline uint32_t ksm_cm_blend(uint32_t m, uint32_t a, uint32_t b)
{
    return (a & m) | (b & ~m);
}

/* Largest float whose e^x is finite in float. */
#define KSM_CM_EXPF_MAX 0x1.62e42ep+6f

/* e^x in float. x = n ln2 + r, |r| <= ln2/2 (Cody-Waite: n * 0.693359375 is exact), e^r by a
 * degree-7 polynomial (Cephes' coefficients), then 2^n applied in two halves of normal range so
 * that a subnormal result is rounded once. x is clamped to [-104, KSM_CM_EXPF_MAX] (below, the
 * result rounds to 0); above it the result is +inf, and a NaN is returned as is. */
static inline float ksm_cpu_expf(float x)
{
    const uint32_t xb = ksm_cm_fbits(x);
    const float xc = ksm_cm_clampf(x, -104.0f, KSM_CM_EXPF_MAX);
    const float shift = 0x1.8p23f; /* adding it rounds to an integer, kept in the low bits */
    const float t = xc * 0x1.715476p+0f + shift; /* log2(e) */
    const float fn = t - shift;
    float r = xc - fn * 0x1.63p-1f; /* 0.693359375 */
    r = r - fn * -0x1.bd0106p-13f;  /* ln2 - 0.693359375 */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    /* n in [-150, 128]; its halves in [-75, 64] give normal powers of two */
    const int32_t n = (int32_t)(ksm_cm_fbits(t) - ksm_cm_fbits(shift));
    const int32_t n1 = n / 2, n2 = n - n1;
    const float s1 = ksm_cm_bitsf((uint32_t)(n1 + 127) << 23);
    const float s2 = ksm_cm_bitsf((uint32_t)(n2 + 127) << 23);
    uint32_t rb = ksm_cm_fbits((p * s1) * s2); /* +0 .. FLT_MAX */
    const uint32_t inf =
        ksm_cm_key(xb) > ksm_cm_key(ksm_cm_fbits(KSM_CM_EXPF_MAX)) ? 0x7f800000u : 0u;
    rb = rb > inf ? rb : inf;
    return ksm_cm_bitsf(ksm_cm_nan_from(rb, xb));
}

/* e^x for x in [-87.33654, 0] (from about ln FLT_MIN: normal results), equal to
 * ksm_cpu_expf(x) bit for bit there: the same reduction and polynomial, with 2^n (n in
 * [-126, 0]) applied in one step, exact where the result is normal. No clamping and no special
 * values: callers clamp x into the range first (cross-entropy to [-80, 0], attention to
 * [-87.33654, 0]); about half the work of ksm_cpu_expf. */
static inline float ksm_cpu_expf_normal(float x)
{
    const float shift = 0x1.8p23f;
    const float t = x * 0x1.715476p+0f + shift;
    const float fn = t - shift;
    float r = x - fn * 0x1.63p-1f;
    r = r - fn * -0x1.bd0106p-13f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t n = (int32_t)(ksm_cm_fbits(t) - ksm_cm_fbits(shift));
    return p * ksm_cm_bitsf((uint32_t)(n + 127) << 23);
}

/* e^y in double for finite y in [-700, 700] (callers clamp), relative error < 1e-12: the
 * internal exp of the functions below, which evaluate in double and round once. */
static inline double ksm_cpu_exp_d(double y)
{
    const double shift = 0x1.8p52;
    const double t = y * 0x1.71547652b82fep+0 + shift;
    const double fn = t - shift;
    double r = y - fn * 0x1.62e42feep-1; /* ln2 high part: n * hi is exact */
    r = r - fn * 0x1.a39ef35793c76p-33;  /* ln2 - hi */
    double p = 1.0 / 3628800.0;          /* Taylor to degree 10: |r| <= 0.3466 */
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const uint64_t e =
        ksm_cm_dbits(t) - ksm_cm_dbits(shift) + 1023u; /* n + bias, n in [-1443, 1443] */
    return p * ksm_cm_bitsd(e << 52);
}

/* e^y in double for y <= 0 (NaN stays NaN): y below -700 is taken as -700, whose e^y (about
 * 1e-304) vanishes in any sum that also holds e^0. The clamp compares the ordered integer keys of
 * the bits, as ksm_cm_clampf, so loops calling this vectorise (a floating-point select would not
 * be if-converted under the default -ftrapping-math). */
static inline double ksm_cpu_exp_d_neg(double y)
{
    int64_t k = (int64_t)ksm_cm_dbits(y);
    k ^= (int64_t)((uint64_t)(k >> 63) >> 1);
    int64_t kl = (int64_t)ksm_cm_dbits(-700.0);
    kl ^= (int64_t)((uint64_t)(kl >> 63) >> 1);
    k = k < kl ? kl : k;
    k ^= (int64_t)((uint64_t)(k >> 63) >> 1);
    return ksm_cpu_exp_d(ksm_cm_bitsd((uint64_t)k));
}

/* erf(x) in float, within 1.32 ulp (every float checked against libm's double erf).
 * |x| < 1: x + x * y(x^2), y = erf(x)/x - 1 by a degree-6 polynomial (relative error 1.2e-9;
 * the leading term x is exact, so the rounding errors are those of the 0.13x..-0.16x
 * correction and of the final sum).
 * |x| >= 1: 1 - e^(-x^2) * G(t), t = 1 / (1 + |x|), G = erfc(x) e^(x^2) by a degree-7
 * polynomial in t (relative error 8e-9 on [1, 4]); erfc(x) <= 0.16 there, so its relative
 * error weighs at most a sixth. |x| is clamped at 4, where erf rounds to 1 in float.
 * (The coefficients are least-squares fits with Lawson's minimax weights, against mpmath.) */
static inline float ksm_cpu_erff(float x)
{
    const uint32_t xb = ksm_cm_fbits(x), ab = xb & 0x7fffffffu;
    const uint32_t one = 0x3f800000u;
    const float s = x * x;
    float y = 0x1.496a1cp-14f;
    y = y * s + -0x1.a3f6f8p-11f;
    y = y * s + 0x1.5405b0p-8f;
    y = y * s + -0x1.b7f90cp-6f;
    y = y * s + 0x1.ce2cf8p-4f;
    y = y * s + -0x1.81273ep-2f;
    y = y * s + 0x1.06eba8p-3f;
    const uint32_t small = ksm_cm_fbits(x + x * y);

    const float ac = ksm_cm_clampf(ksm_cm_bitsf(ab), 1.0f, 4.0f); /* a NaN gives 4 */
    const float t = 1.0f / (1.0f + ac);
    float g = -0x1.4b17acp-1f;
    g = g * t + 0x1.687386p+0f;
    g = g * t + -0x1.72f228p-1f;
    g = g * t + -0x1.2459f4p-1f;
    g = g * t + 0x1.a1c7ecp-2f;
    g = g * t + 0x1.13cd18p-1f;
    g = g * t + 0x1.223578p-1f;
    g = g * t + -0x1.d01ad0p-14f;
    const uint32_t large = ksm_cm_fbits(1.0f - ksm_cpu_expf(-(ac * ac)) * g) | (xb & 0x80000000u);
    return ksm_cm_bitsf(ksm_cm_nan_from(ksm_cm_blend(0u - (uint32_t)(ab < one), small, large), xb));
}

/* tanh(x), evaluated in double and rounded once.
 * |x| < 0.625: x * P(x^2), degree 7 (relative error 6e-12); otherwise 1 - 2 / (e^(2|x|) + 1)
 * with |x| clamped at 20 (tanh rounds to 1 in double there). */
static inline float ksm_cpu_tanhf(float x)
{
    const uint32_t xb = ksm_cm_fbits(x), ab = xb & 0x7fffffffu;
    const uint32_t lo = 0x3f200000u /* 0.625f */, hi = 0x41a00000u /* 20.0f */;
    const double xd = (double)x;
    const double s = xd * xd;
    double ps = -0x1.a374e52e344f4p-11;
    ps = ps * s + 0x1.a6979e2cd7344p-9;
    ps = ps * s + -0x1.1eada28e2e716p-7;
    ps = ps * s + 0x1.65fa4abc22124p-6;
    ps = ps * s + -0x1.ba177e020080bp-5;
    ps = ps * s + 0x1.11110449accc9p-3;
    ps = ps * s + -0x1.5555553719189p-2;
    ps = ps * s + 0x1.fffffffff4343p-1;
    const uint32_t small = ksm_cm_fbits((float)(xd * ps));
    const double ac = (double)ksm_cm_bitsf(ab > hi ? hi : ab);
    const uint32_t large =
        ksm_cm_fbits((float)(1.0 - 2.0 / (ksm_cpu_exp_d(2.0 * ac) + 1.0))) | (xb & 0x80000000u);
    return ksm_cm_bitsf(ksm_cm_nan_from(ksm_cm_blend(0u - (uint32_t)(ab < lo), small, large), xb));
}

/* 1 / (1 + e^-x), evaluated in double and rounded once; |x| clamped at 104, beyond which the
 * result rounds to 0 or 1. */
static inline float ksm_cpu_sigmoidf(float x)
{
    const uint32_t xb = ksm_cm_fbits(x), ab = xb & 0x7fffffffu, hi = 0x42d00000u /* 104.0f */;
    const double xc = (double)ksm_cm_bitsf((ab > hi ? hi : ab) | (xb & 0x80000000u));
    const float r = (float)(1.0 / (1.0 + ksm_cpu_exp_d(-xc)));
    return ksm_cm_bitsf(ksm_cm_nan_from(ksm_cm_fbits(r), xb));
}

/* Exact GELU as nn/kmath.h's ksm_gelu, with this file's erf. */
static inline float ksm_cpu_gelu(float x)
{
    return x * 0.5f * (1.0f + ksm_cpu_erff(x * 0.70710678118654752440f));
}
