/*
 * Blueprints (docs/models.md#blueprints): the seed modules grown in slots, and GatedBlend
 * (docs/blending.md#blend-operators), the per-sample gate of the GATE algorithm. A module declares
 * its parameters (params.h) by esper's state_dict names relative to "seed_slots.<id>.seed." /
 * "seed_slots.<id>.alpha_schedule.", and enqueues its forward on an execution context (exec.h).
 * Modules know nothing about slots, alpha or lifecycle.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "kasmina/kasmina.h"
#include "kasmina/tensor.h"
#include "kasmina/exec.h"
#include "kasmina/params.h"

struct ksm_blueprint {
    const char *name;
    int index; /* BlueprintAction index (docs/models.md): noop 0 ... flex_attention 12 */
    enum ksm_topology topology;
    int64_t param_estimate;
};

/* Registry of a topology in esper's order ((param_estimate, name)); *n entries. */
const struct ksm_blueprint *const *ksm_blueprint_list(enum ksm_topology t, int *n);
/* NULL when the topology has no blueprint of that name. */
const struct ksm_blueprint *ksm_blueprint_find(enum ksm_topology t, const char *name);
/* BlueprintAction index of a name (any topology), or -1. */
int ksm_blueprint_index(const char *name);
/* GroupNorm groups for C channels (docs/models.md get_num_groups). */
int ksm_num_groups(int channels);

typedef struct ksm_seed ksm_seed;

/* Declares a seed of blueprint bp for `channels` (C or D). Memory is not allocated here
 * (ksm_params_materialise on ksm_seed_params). KSM_EINVAL with a sentence when channels does
 * not suit the blueprint (channels < 1; attention seeds need D % 4 == 0). */
int ksm_seed_new(const struct ksm_blueprint *bp, int channels, ksm_seed **out, char *err,
                 size_t errlen);
/* Frees the declarations and caches (release device memory first). */
void ksm_seed_free(ksm_seed *s);
const struct ksm_blueprint *ksm_seed_blueprint(const ksm_seed *s);
int ksm_seed_channels(const ksm_seed *s);
struct ksm_params *ksm_seed_params(ksm_seed *s);
/* MULTIPLY germination (docs/models.md#multiply-zero-init): the last Linear/Conv in registration
 * order gets zero weight and bias. Changes the declared init; call before materialising. */
void ksm_seed_zero_final_layer(ksm_seed *s);

/* y <- seed(x). x: contiguous F32 [B,C,H,W] (CNN) or [B,T,D] (transformer) on e's device; y is
 * a new arena tensor of the same shape. Every op is per-sample (fused == sequential). */
int ksm_seed_forward(ksm_seed *s, struct ksm_exec *e, const ksm_tensor *x, ksm_tensor *y);

/* LRU statistics (flex_attention block masks; cache.h conventions). */
struct ksm_lru_stats {
    uint64_t hits, misses, evictions, invalidations, entries, capacity, bytes;
};
/* false when the seed has no block-mask cache (every blueprint but flex_attention). */
bool ksm_seed_block_mask_stats(const ksm_seed *s, struct ksm_lru_stats *out);
/* Drops cached block masks (device/dtype move); counts one invalidation per entry dropped. */
void ksm_seed_invalidate_caches(ksm_seed *s);

#define KSM_BLOCK_MASK_CAPACITY 8
#define KSM_BLOCK_MASK_BLOCK    128

/* ---- GatedBlend (docs/blending.md#blend-operators): gate = Linear(C,h) -> ReLU -> Linear(h,1) ->
 * Sigmoid, h = max(8,C/4), of the per-sample mean over H,W (CNN) or T (transformer). Names
 * "gate.0.weight", "gate.0.bias", "gate.2.weight", "gate.2.bias". ---- */
typedef struct ksm_gated_blend ksm_gated_blend;

int ksm_gated_blend_new(int channels, enum ksm_topology t, ksm_gated_blend **out, char *err,
                        size_t errlen);
void ksm_gated_blend_free(ksm_gated_blend *g);
struct ksm_params *ksm_gated_blend_params(ksm_gated_blend *g);
/* g_out: new arena tensor [B,1,1,1] (CNN) or [B,1,1] (transformer) in (0,1). */
int ksm_gated_blend_forward(ksm_gated_blend *g, struct ksm_exec *e, const ksm_tensor *x,
                            ksm_tensor *g_out);
