/*
 * Per-element math shared by the CPU backend and the CUDA plugin, so both compute the same
 * function (the CPU backend is the oracle of the GPU conformance suite). Plain C that nvcc also
 * compiles as host+device code.
 */
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define KSM_HD __host__ __device__ __forceinline__
#else
#define KSM_HD static inline
#endif

#if defined(__cplusplus)
#define KSM_RESTRICT __restrict__
#else
#define KSM_RESTRICT restrict
#endif

/* NaN propagates (x <= 0 is false for NaN); -0 and negatives give +0. Written as one select so
 * the CPU loops vectorise (a compare and an and) instead of branching per element. */
KSM_HD float ksm_relu(float x) { return x <= 0.0f ? 0.0f : x; }

/* Exact GELU (PyTorch approximate='none'): x * 0.5 * (1 + erf(x / sqrt(2))). */
KSM_HD float ksm_gelu(float x) { return x * 0.5f * (1.0f + erff(x * 0.70710678118654752440f)); }

KSM_HD float ksm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

KSM_HD float ksm_tanh(float x) { return tanhf(x); }

/* clamp(x, 0, 1) with NaN propagated, as torch.clamp does. */
KSM_HD float ksm_clamp01(float x)
{
    if (x != x) return x;
    return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x);
}

/* PyTorch's two-branch lerp (ATen Lerp.h): |w| < 0.5 ? a + w*(b-a) : b - (b-a)*(1-w).
 * w = 0 returns a and w = 1 returns b bit-exactly for finite a, b; NaN/Inf in b propagate at
 * w = 0 (0 * NaN). Never short-circuit. */
KSM_HD float ksm_lerp(float a, float b, float w)
{
    float diff = b - a;
    return (fabsf(w) < 0.5f) ? a + w * diff : b - diff * (1.0f - w);
}

/* ---- Derivatives (g: the gradient of the output) ---- */

/* threshold_backward: 0 where x <= 0, else g (a NaN x passes g, as PyTorch). */
KSM_HD float ksm_relu_grad(float g, float x) { return x <= 0.0f ? 0.0f : g; }

/* PyTorch's GELU backward: g * (cdf + x * pdf), cdf = 0.5 (1 + erf(x / sqrt 2)),
 * pdf = exp(-x^2 / 2) / sqrt(2 pi). */
KSM_HD float ksm_gelu_grad(float g, float x)
{
    const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
    const float pdf = 0.39894228040143267794f * expf(-0.5f * x * x);
    return g * (cdf + x * pdf);
}

/* From the forward output y = sigmoid(x): g * (1 - y) * y. */
KSM_HD float ksm_sigmoid_grad(float g, float y) { return g * (1.0f - y) * y; }

/* From the forward output y = tanh(x): g * (1 - y^2). */
KSM_HD float ksm_tanh_grad(float g, float y) { return g * (1.0f - y * y); }

/* torch.clamp's backward: g for x inside [0, 1] inclusive, else 0 (NaN x gives 0). */
KSM_HD float ksm_clamp01_grad(float g, float x) { return (x >= 0.0f && x <= 1.0f) ? g : 0.0f; }

/* KSM_OP_BROADCAST_GRAD's element (fn is an enum ksm_bgrad_fn of nn/op.h): SUM g, MUL g * s1,
 * LERP_A g * (1 - s3), LERP_B g * s3, LERP_W g * (s2 - s1) (derivatives.yaml of lerp). */
KSM_HD float ksm_bgrad(int fn, float g, float s1, float s2, float s3)
{
    switch (fn) {
    case 1: return g * s1;
    case 2: return g * (1.0f - s3);
    case 3: return g * s3;
    case 4: return g * (s2 - s1);
    default: return g;
    }
}

/* ---- Conversions (round to nearest even, NaN preserved) ---- */

KSM_HD uint32_t ksm_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

KSM_HD float ksm_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

KSM_HD uint16_t ksm_f32_to_bf16(float f)
{
    uint32_t u = ksm_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

KSM_HD float ksm_bf16_to_f32(uint16_t h) { return ksm_bits_f32((uint32_t)h << 16); }

KSM_HD uint16_t ksm_f32_to_f16(float f)
{
    uint32_t x = ksm_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow (rounds) -> inf */
    if (absx < 0x38800000u) {                                   /* subnormal or zero */
        if (absx < 0x33000000u) return (uint16_t)sign;          /* < 2^-25: rounds to 0 */
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14 + (112 - e) + 1 ... shift into place */
        uint32_t r = m >> (shift - 0u);
        /* round to nearest even on the bits shifted out */
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = absx - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}

KSM_HD float ksm_f16_to_f32(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu;
    uint32_t m = h & 0x3ffu;
    if (e == 0) {
        if (m == 0) return ksm_bits_f32(sign);
        /* subnormal: m * 2^-24 */
        float v = (float)m * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (e == 31) return ksm_bits_f32(sign | 0x7f800000u | (m << 13));
    return ksm_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
