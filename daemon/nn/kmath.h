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

/* ---- Dropout masks (docs/training.md#dropout-masks) ----
 *
 * Counter-based, so a mask is a pure function of (seed, step, site, element index) and the CPU
 * backend and the CUDA plugin draw the same one without sharing any state: Philox4x32-10
 * (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123's
 * philox4x32 with 10 rounds) with key (k0, k1) = (low, high 32 bits of seed) and counter
 * (c0, c1, c2, c3) = (low 32 bits of b, site + 2^16 (b >> 32), low, high 32 bits of step) for
 * the block b = n >> 2 (site < 2^16, n < 2^50); element n takes output word n & 3. Its 24 high bits
 * r = word >> 8 keep the element when r >= ceil(p * 2^24), so the keep probability is 1 - p (to
 * 2^-24); a kept element is multiplied by (float)(1 / (1 - p)) (in double, then rounded, as torch's
 * native_dropout), a dropped one becomes 0. */

#define KSM_PHILOX_M0         0xD2511F53u
#define KSM_PHILOX_M1         0xCD9E8D57u
#define KSM_PHILOX_W0         0x9E3779B9u
#define KSM_PHILOX_W1         0xBB67AE85u
#define KSM_DROPOUT_MAX_SITE  0xFFFFu
#define KSM_DROPOUT_MAX_NUMEL (INT64_C(1) << 50)

/* Philox4x32-10 of counter c under key (k0, k1), in place. */
KSM_HD void ksm_philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += KSM_PHILOX_W0;
            k1 += KSM_PHILOX_W1;
        }
        const uint64_t p0 = (uint64_t)KSM_PHILOX_M0 * c[0];
        const uint64_t p1 = (uint64_t)KSM_PHILOX_M1 * c[2];
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (uint32_t)p1;
        c[2] = n2;
        c[3] = (uint32_t)p0;
    }
}

/* The four words of counter block `block` (elements 4 block .. 4 block + 3). */
KSM_HD void ksm_dropout_words(uint64_t seed, uint64_t step, uint32_t site, uint64_t block,
                              uint32_t w[4])
{
    w[0] = (uint32_t)block;
    w[1] = site | (uint32_t)(block >> 32) << 16;
    w[2] = (uint32_t)step;
    w[3] = (uint32_t)(step >> 32);
    ksm_philox4x32_10(w, (uint32_t)seed, (uint32_t)(seed >> 32));
}

/* The keep threshold of drop probability p in [0, 1): ceil(p * 2^24). */
KSM_HD uint32_t ksm_dropout_threshold(double p) { return (uint32_t)ceil(p * 16777216.0); }

/* The factor of a kept element: (float)(1 / (1 - p)). */
KSM_HD float ksm_dropout_scale(double p) { return (float)(1.0 / (1.0 - p)); }

/* The factor of element n: scale when kept, 0 when dropped (one Philox call; loops over
 * consecutive elements use ksm_dropout_words once per four). */
KSM_HD float ksm_dropout_factor(uint64_t seed, uint64_t step, uint32_t site, uint64_t n,
                                uint32_t thr, float scale)
{
    uint32_t w[4];
    ksm_dropout_words(seed, step, site, n >> 2, w);
    return (w[n & 3] >> 8) >= thr ? scale : 0.0f;
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
