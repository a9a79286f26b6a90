/*
 * CPU op kernels (the reference implementation; the GPU conformance suite's oracle), split by op
 * family like the CUDA plugin: cpu_elementwise.c, cpu_conv.c (GEMM, linear, convolution),
 * cpu_winograd.c, cpu_norm.c (norms, softmax and shared row helpers), cpu_attention.c,
 * cpu_reduce.c (embedding, means, pooling, losses, argmax), cpu_optim.c (SGD, sums of squares,
 * scaling), cpu_backward.c (the backward ops);
 * cpu_ops.c dispatches.
 *
 * Every kernel runs on the calling thread (a stream worker) on host memory and trusts the
 * invariants ops.c established (see nn/op.h). F32 math; per-element functions come from
 * nn/kmath.h so that the CUDA plugin computes the same functions, except exp, erf (GELU), tanh
 * and sigmoid, which come from cpu_math.h's vectorisable versions (within 1.32 ulp of the true
 * value; CUDA's are within 2). Reductions (norm statistics, softmax sums, means, attention's
 * softmax sums) accumulate in double. GEMM, linear layers, convolutions and attention's
 * products go through OpenBLAS' cblas_sgemm, single-threaded, in tiles that the pool runs in
 * parallel; everything else splits its rows, planes or groups over the backend's compute pool
 * (cpu_pool.h) with contiguous inner loops. Each range writes disjoint outputs, so results do
 * not depend on the number of threads.
 */
#pragma once

#include <stdint.h>

#include "backend/cpu/cpu_math.h"
#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/cpu_pool.h"
#include "kasmina/errors.h"
#include "nn/kmath.h"
#include "nn/op.h"

/* Hot loops are compiled for AVX-512 and AVX2 as well as baseline x86-64, picked at load time.
 * The clones compute bit-identical results: no FMA contraction (ISO C build), no
 * reassociation, and cpu_math.h's functions use only IEEE-exact operations. */
/* Not under ThreadSanitizer: the clones' ifunc resolvers run during relocation, before the TSan
 * runtime is up, and crash in their instrumentation. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) &&       \
    !defined(__SANITIZE_THREAD__)
#define KSM_VEC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KSM_VEC_CLONES
#endif

static inline int64_t ksm_cpu_numel(const ksm_tensor *t)
{
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* Elements of work per parallel range below which a thread hand-off costs more than it saves. */
enum { PAR_GRAIN = 16384 };

/* Ranges of `items` items of `per_item` elements each, at least PAR_GRAIN elements per range. */
static inline int64_t ksm_cpu_grain(int64_t per_item)
{
    return per_item >= PAR_GRAIN ? 1 : PAR_GRAIN / (per_item > 0 ? per_item : 1);
}

// ---- Row helpers shared by the families (cpu_norm.c) ----

/* y[i] <- (x[i] - m) * a + b; y may equal x. */
void ksm_cpu_shift_scale(float *y, const float *x, int64_t n, float m, float a, float b);
/* y[i] <- relu((x[i] - m) * a + b); y may equal x. */
void ksm_cpu_shift_scale_relu(float *y, const float *x, int64_t n, float m, float a, float b);
/* The fused conv epilogue's per-channel BatchNorm scale, as the BatchNorm kernel computes it. */
void ksm_cpu_bn_scales(const struct ksm_op *op, int64_t co, float *a);
/* The maximum of x[0..n), the first NaN if there is one. */
float ksm_cpu_row_max(const float *x, int64_t n);

/* x[j] <- x[j] * the dropout factor of element n0 + j (kmath.h), j < n: four elements per
 * Philox call. A dropped element becomes x * 0 (NaN stays NaN, as torch's x * mask). */
static inline void ksm_cpu_dropout_apply(float *x, int64_t n, const struct ksm_op_dropout *d,
                                         uint64_t n0)
{
    const uint32_t thr = ksm_dropout_threshold(d->p);
    const float scale = ksm_dropout_scale(d->p);
    uint32_t w[4] = {0, 0, 0, 0};
    uint64_t have = UINT64_MAX;
    for (int64_t j = 0; j < n; j++) {
        const uint64_t e = n0 + (uint64_t)j;
        if ((e >> 2) != have) {
            have = e >> 2;
            ksm_dropout_words(d->seed, d->step, d->site, have, w);
        }
        x[j] *= (w[e & 3] >> 8) >= thr ? scale : 0.0f;
    }
}

// ---- Families (each returns 0 or KSM_EUNSUPPORTED) ----

int ksm_cpu_exec_elementwise(const struct ksm_op *op); /* COPY, FILL, UNARY, BINARY, LERP */
int ksm_cpu_exec_gemm(const struct ksm_op *op);
int ksm_cpu_exec_linear(const struct ksm_op *op);
int ksm_cpu_exec_conv2d(const struct ksm_op *op);
/* 3x3 pad-1 stride-1 convolution by Winograd F(2x2, 3x3); bn_a: the fused epilogue's scales or
 * NULL. */
int ksm_cpu_conv2d_winograd(const struct ksm_op *op, int64_t nb, int64_t ci, int64_t h, int64_t wd,
                            int64_t co, const float *bn_a);
int ksm_cpu_exec_batchnorm(const struct ksm_op *op);
int ksm_cpu_exec_groupnorm(const struct ksm_op *op);
int ksm_cpu_exec_layernorm(const struct ksm_op *op);
int ksm_cpu_exec_softmax(const struct ksm_op *op);
int ksm_cpu_exec_sdpa(const struct ksm_op *op);
int ksm_cpu_exec_dropout(const struct ksm_op *op); /* cpu_elementwise.c */
int ksm_cpu_exec_embedding(const struct ksm_op *op);
int ksm_cpu_exec_mean(const struct ksm_op *op);
int ksm_cpu_exec_maxpool2(const struct ksm_op *op);
int ksm_cpu_exec_cross_entropy(const struct ksm_op *op);
int ksm_cpu_exec_argmax(const struct ksm_op *op);
int ksm_cpu_exec_sgd(const struct ksm_op *op);   /* cpu_optim.c */
int ksm_cpu_exec_sumsq(const struct ksm_op *op); /* cpu_optim.c */
int ksm_cpu_exec_scale(const struct ksm_op *op); /* cpu_optim.c */
/* cpu_backward.c: UNARY_BACKWARD, BROADCAST_GRAD, SUM_ROWS, MEAN_BACKWARD, MAXPOOL2_BACKWARD,
 * EMBEDDING_BACKWARD, CROSS_ENTROPY_BACKWARD. */
int ksm_cpu_exec_backward(const struct ksm_op *op);

// ---- Backward: norms, convolution, attention (each returns 0 or KSM_ENOMEM) ----

int ksm_cpu_exec_batchnorm_train(const struct ksm_op *op);    /* cpu_norm_backward.c */
int ksm_cpu_exec_batchnorm_backward(const struct ksm_op *op); /* cpu_norm_backward.c */
int ksm_cpu_exec_groupnorm_backward(const struct ksm_op *op); /* cpu_norm_backward.c */
int ksm_cpu_exec_layernorm_backward(const struct ksm_op *op); /* cpu_norm_backward.c */
int ksm_cpu_exec_conv2d_backward(const struct ksm_op *op);    /* cpu_conv_backward.c */
int ksm_cpu_exec_sdpa_backward(const struct ksm_op *op);      /* cpu_attention_backward.c */
