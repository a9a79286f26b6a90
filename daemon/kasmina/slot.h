/*
 * Seed slots and their lifecycle (docs/lifecycle.md#seed-lifecycle): stages, transitions, quality
 * gates G0-G5 in strict and permissive modes with esper's check strings, germinate / advance /
 * prune / schedule_prune / set_alpha_target / set_alpha / step_epoch / record metrics, lifecycle
 * events (docs/lifecycle.md#events) and reports (docs/lifecycle.md#slot-reports), and the slot's
 * extra state (docs/weights.md#extra-state) as JSON.
 *
 * The slot layer owns no device memory. Everything that touches modules goes through the
 * callbacks in struct ksm_slot_env, provided by the model (model.c):
 *   - free_seed: release the seed module and its caches (prune, RESETTING cleanup);
 *   - create_gate / drop_gate: the GatedBlend module (entering BLENDING with "gated", switching
 *     algorithm in set_alpha_target, prune);
 *   - alpha_changed: the slot's alpha changed (the model bumps its alpha-scalar generation).
 * Every operation validates completely (including creating a gate it will need, the only step
 * that can fail for lack of memory) before it mutates anything or emits an event.
 *
 * Callback contract (all optional; env and any slot may be NULL):
 *   - free_seed frees s->seed; the slot layer then sets s->seed = NULL.
 *   - create_gate builds a fresh GatedBlend and stores it in s->gate, replacing (and freeing)
 *     any gate already there only once the new one exists; on failure it returns a negative
 *     KSM_E* code and leaves s->gate as it was. The slot layer then sets gate_total_steps and
 *     gate_current_step = 0.
 *   - drop_gate frees s->gate; the slot layer then sets s->gate = NULL.
 *   - emit receives each lifecycle event (model_id is left empty for the model to fill).
 *   - alpha_changed is called after state.alpha took a new value.
 * Reports leave blueprint_index = -1, seed_params = the seed's count and model_generation = 0
 * for the model to complete.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "kasmina/kasmina.h"

struct ksm_slot;

struct ksm_slot_env {
    void *ud;
    bool permissive;       /* QualityGates(permissive=...) */
    unsigned auto_forward; /* bits (1 << KSM_GATE_Gn): the model's default for its slots */
    enum ksm_topology topology;
    void (*emit)(void *ud, struct ksm_slot *s, struct ksm_lifecycle_event *ev);
    void (*free_seed)(void *ud, struct ksm_slot *s);
    int (*create_gate)(void *ud, struct ksm_slot *s, uint32_t total_steps);
    void (*drop_gate)(void *ud, struct ksm_slot *s);
    void (*alpha_changed)(void *ud, struct ksm_slot *s);
};

#define KSM_STAGE_HISTORY_MAX 100

/* The rest of esper's SeedTelemetry (docs/gates.md#recordmetrics), as last copied by sync_telemetry
 * (record_metrics); the gradient fields and epoch/max_epochs are in struct ksm_seed_telemetry.
 * Persisted in the extra state's seed_state.telemetry. */
struct ksm_telemetry_sync {
    char seed_id[KSM_SEED_ID_MAX];
    char blueprint_id[KSM_NAME_MAX];
    char layer_id[KSM_NAME_MAX];
    double accuracy, accuracy_delta;
    uint32_t epochs_in_stage;
    int stage; /* SeedStage value, 1 (DORMANT) until the first sync */
    double alpha, alpha_target;
    int alpha_mode;
    uint32_t alpha_steps_total, alpha_steps_done, time_to_target;
    double alpha_velocity;
    int alpha_algorithm;
    int64_t captured_at_ns;
    uint32_t blend_tempo_epochs;
    double blending_velocity;
    char alpha_curve[16]; /* "LINEAR" unless restored otherwise */
};

/* SeedState (docs/lifecycle.md#transitions, docs/lifecycle.md#slot-reports). */
struct ksm_seed_state {
    char seed_id[KSM_SEED_ID_MAX];
    char blueprint_id[KSM_NAME_MAX];
    enum ksm_stage stage, previous_stage;
    uint32_t previous_epochs_in_stage;
    int64_t stage_entered_at_ns;
    double alpha; /* runtime source of truth; == controller.alpha */
    struct ksm_alpha_controller controller;
    enum ksm_alpha_algorithm alpha_algorithm;
    uint32_t blend_tempo_epochs;
    struct ksm_seed_metrics metrics;
    struct ksm_seed_telemetry telemetry;
    bool is_healthy, is_paused;
    /* stage_history ring (bounded deque maxlen 100) */
    struct {
        enum ksm_stage stage;
        int64_t at_ns;
    } history[KSM_STAGE_HISTORY_MAX];
    int history_len; /* oldest first from history[0] */
    struct ksm_telemetry_sync tel_sync;
};

struct ksm_slot {
    char id[KSM_SLOT_ID_MAX];
    int channels;
    const struct ksm_slot_env *env;

    bool occupied; /* state != None */
    struct ksm_seed_state state;

    /* slot settings (germinate) */
    char blend_algorithm_id[16]; /* "" = None */
    bool has_blend_tempo;
    uint32_t blend_tempo_epochs;
    bool has_blend_alpha_target;
    double blend_alpha_target;
    bool isolate_gradients;
    bool has_resolved_topology;
    /* esper SeedSlot.auto_forward_gates: bits (1 << KSM_GATE_Gn), G1..G3. ksm_slot_init takes
     * env->auto_forward; ConfigureSlot changes it. Kept in the extra state as
     * _kasmina_auto_forward_gates when it differs from env->auto_forward. */
    unsigned auto_forward;

    /* modules, owned by the model layer (opaque here; non-NULL = exists) */
    void *seed;
    void *gate;
    uint32_t gate_total_steps, gate_current_step;

    bool blend_out_freeze;
    char pending_prune_reason[KSM_REASON_MAX];
    char pending_prune_initiator[KSM_NAME_MAX];

    /* Gradient statistics of the last TrainStep that collected them for this slot's seed
     * (docs/training.md#gradient-statistics): stored by the training step under the model's
     * lock, folded by RecordMetrics(use_collected_gradients). Memory only; cleared at germinate
     * and once the seed is no longer live (pruned, cooling down, empty). */
    bool has_collected_grads;
    double collected_grad_norm, collected_grad_ratio, collected_grad_health;
    bool collected_vanishing, collected_exploding;
    /* The seed_gradient_norm_ratio EMA: present with 0.0 from ksm_slot_init (esper resets it per
     * episode), removed with the collected statistics once the seed is no longer live, so the
     * next seed's first ratio is taken as is. Persisted in the extra state's
     * "gradient_ratio_ema" (null = removed). */
    bool has_grad_ratio_ema;
    double grad_ratio_ema;
};

void ksm_slot_init(struct ksm_slot *s, const char *id, int channels,
                   const struct ksm_slot_env *env);

/* Germination in two phases so the model can build the seed in between:
 * check validates args against the slot (availability, alpha_target range, gated <=> GATE,
 * blend id) without mutating; commit takes ownership of `seed` (non-NULL) and records
 * everything (docs/lifecycle.md germinate steps 1, 8-12). seed_params/host_params: trainable
 * counts. */
int ksm_slot_germinate_check(const struct ksm_slot *s, const struct ksm_germinate_args *a,
                             char *err, size_t errlen);
int ksm_slot_germinate_commit(struct ksm_slot *s, const struct ksm_germinate_args *a, void *seed,
                              uint64_t seed_params, uint64_t host_params, int64_t now_ns);

int ksm_slot_advance(struct ksm_slot *s, enum ksm_stage target, struct ksm_gate_result *gate,
                     int64_t now_ns, char *err, size_t errlen);
int ksm_slot_prune(struct ksm_slot *s, const char *reason, const char *initiator, bool *accepted,
                   int64_t now_ns);
int ksm_slot_schedule_prune(struct ksm_slot *s, uint32_t steps, enum ksm_alpha_curve curve,
                            double steepness, const char *reason, const char *initiator,
                            bool *accepted, int64_t now_ns, char *err, size_t errlen);
int ksm_slot_set_alpha_target(struct ksm_slot *s, double target, uint32_t steps,
                              enum ksm_alpha_curve curve, double steepness,
                              enum ksm_alpha_algorithm algorithm, int64_t now_ns, char *err,
                              size_t errlen);
/* set_alpha (docs/lifecycle.md): clamps; no-op without state. NaN is KSM_EINVAL. */
int ksm_slot_set_alpha(struct ksm_slot *s, double alpha, char *err, size_t errlen);
int ksm_slot_step_epoch(struct ksm_slot *s, int64_t now_ns);
int ksm_slot_record_metrics(struct ksm_slot *s, const struct ksm_metrics_update *u, char *err,
                            size_t errlen);
/* record_metrics with ema_beta (the training config's gradient_ratio_ema, in [0, 1]) for the
 * fold of use_collected_gradients; ksm_slot_record_metrics uses esper's 0.9. */
int ksm_slot_record_metrics_beta(struct ksm_slot *s, const struct ksm_metrics_update *u,
                                 double ema_beta, char *err, size_t errlen);
/* Drops the collected gradient statistics and the ratio EMA when the slot holds no live seed
 * (empty, PRUNED, EMBARGOED, RESETTING). */
void ksm_slot_forget_dead_gradients(struct ksm_slot *s);

/* Stage active in the forward (TRAINING, BLENDING, HOLDING, FOSSILIZED) with a seed. */
bool ksm_slot_runs_seed(const struct ksm_slot *s);
void ksm_slot_report(const struct ksm_slot *s, struct ksm_slot_report *r);

/* QualityGates thresholds (docs/gates.md#quality-gates, L/__init__.py). */
#define MIN_TRAINING_IMPROVEMENT 0.5
#define MIN_BLENDING_EPOCHS      10u
#define MIN_GRADIENT_HEALTH      0.7
#define GRADIENT_RATIO_THRESHOLD 0.10
#define MIN_FOSSILIZE_CONTRIB    1.0

static inline double ksm_metrics_total_improvement(const struct ksm_seed_metrics *m)
{
    return m->current_val_accuracy - m->initial_val_accuracy;
}

static inline double ksm_metrics_improvement_since_stage_start(const struct ksm_seed_metrics *m)
{
    return m->current_val_accuracy - m->accuracy_at_stage_start;
}

/* Gate evaluation alone (tests). */
/* Now in the precision the extra state keeps (microseconds), so a restored slot reports the same
 * instants as before a restart. */
int64_t ksm_slot_wall_now_ns(void);
/* r = a result of gate g with the one failed check (a refusal before any gate ran). */
void ksm_gate_result_failed(struct ksm_gate_result *r, enum ksm_gate_level g, const char *check);
void ksm_slot_check_gate(const struct ksm_slot *s, enum ksm_stage target,
                         struct ksm_gate_result *r);

/* The slot's extra state (docs/weights.md#extra-state, schema version 1) as a JSON string
 * (malloc'd) / parsed into a fresh slot value. from_json validates everything and fills *out
 * (a copy of s with the parsed state; s itself is not touched); needs_seed/needs_gate tell the
 * model which modules the state requires. */
char *ksm_slot_extra_state_json(const struct ksm_slot *s);
int ksm_slot_extra_state_parse(const struct ksm_slot *s, const char *json, struct ksm_slot *out,
                               bool *needs_seed, bool *needs_gate, char *err, size_t errlen);
