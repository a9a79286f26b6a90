/*
 * Internals of the blueprint modules (blueprint.c: registry, declarations, block-mask LRU;
 * blueprint_cnn.c / blueprint_tf.c: forwards; gated_blend.c: GatedBlend).
 */
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/blueprint.h"

#define KSM_SEED_MAX_PARAMS 8
#define KSM_NORM_EPS        1e-5f
#define KSM_ATTN_HEADS      4

/* Block-causal schedule of one sequence length (FlexAttention's BlockMask, dense form): for
 * q-block i, kv_num[i] partial (diagonal) kv blocks listed in kv_idx[i * n_kv ...] and
 * full_num[i] full kv blocks listed in full_idx[i * n_kv ...]. One malloc'd chunk of `bytes`. */
struct ksm_block_mask {
    int64_t seq_len;
    const ksm_device *dev;
    enum ksm_dtype dtype;
    int n_q, n_kv;
    int32_t *kv_num, *kv_idx, *full_num, *full_idx;
    size_t bytes;
};

struct ksm_seed {
    const struct ksm_blueprint *bp;
    int channels;
    int groups; /* GroupNorm groups (CNN) */
    int hidden; /* SE r, bottleneck b, LoRA rank, MLP width */
    struct ksm_params params;
    int p[KSM_SEED_MAX_PARAMS]; /* parameter indices in declaration order */
    int n_p;
    int last_w, last_b; /* last Linear/Conv in registration order (-1: none) */

    /* flex_attention only: LRU of block masks, [0] least recently used. */
    pthread_mutex_t mask_lock;
    struct ksm_block_mask *masks[KSM_BLOCK_MASK_CAPACITY];
    int n_masks;
    struct ksm_lru_stats mask_stats;
};

/* The tensor of the seed's k-th declared parameter. */
static inline const ksm_tensor *ksm_seed_param(const struct ksm_seed *s, int k)
{
    return ksm_params_tensor(&s->params, s->p[k]);
}

/* Builds the block-causal schedule of seq_len (malloc'd; free()). NULL when out of memory. */
struct ksm_block_mask *ksm_block_mask_build(int64_t seq_len, const ksm_device *dev,
                                            enum ksm_dtype dtype);

/* Enqueues causal attention out = sdpa(q, k, v) through the seed's block mask for T = q's
 * length: one SDPA per q-block over the kv blocks its schedule lists. q/k/v/out: [B,H,T,hd]
 * views. Measure mode leaves the cache and its counters alone. */
int ksm_seed_flex_sdpa(struct ksm_seed *s, struct ksm_exec *e, ksm_tensor *out, const ksm_tensor *q,
                       const ksm_tensor *k, const ksm_tensor *v);

/* BlueprintAction indices the forwards dispatch on (with the topology). */
enum {
    KSM_BP_NOOP = 0,
    KSM_BP_CONV_LIGHT = 1,
    KSM_BP_ATTENTION = 2,
    KSM_BP_NORM = 3,
    KSM_BP_DEPTHWISE = 4,
    KSM_BP_BOTTLENECK = 5,
    KSM_BP_CONV_SMALL = 6,
    KSM_BP_CONV_HEAVY = 7,
    KSM_BP_LORA = 8,
    KSM_BP_LORA_LARGE = 9,
    KSM_BP_MLP_SMALL = 10,
    KSM_BP_MLP = 11,
    KSM_BP_FLEX_ATTENTION = 12,
};

int ksm_seed_forward_cnn(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x,
                         ksm_tensor *y);
int ksm_seed_forward_tf(struct ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y);

/* Shared forward helpers (blueprint_cnn.c). */
/* A new arena tensor with x's dtype and shape. */
int ksm_bp_like(struct ksm_exec *e, ksm_tensor *t, const ksm_tensor *x);
