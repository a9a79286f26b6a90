/*
 * kasmina engine: morphogenetic models (a host network with seed slots) on a device.
 *
 * This is the plain C API that kasminad's gRPC layer translates and that programs can embed
 * (link libkasmina). Semantics are esper-lite's Kasmina, documented in docs/ (lifecycle.md,
 * gates.md, blending.md, evaluate.md, models.md; weight names in weights.md).
 *
 *     ksm_engine *e;
 *     struct ksm_engine_config cfg = {.cpu_devices = 1};
 *     ksm_engine_new(&cfg, &e, err, sizeof err);
 *     struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN};     // 0 fields = defaults
 *     ksm_model *m;
 *     ksm_engine_model_create(e, "m1", &spec, &m, err, sizeof err);
 *     struct ksm_germinate_args g = {.blueprint_id = "conv_light"};
 *     ksm_model_germinate(m, "r0c1", &g, &report, err, sizeof err);
 *     ksm_model_advance(m, "r0c1", KSM_STAGE_UNKNOWN, &gate, &report, err, sizeof err);
 *     ksm_model_forward(m, &(struct ksm_forward_args){.input = &x}, &out, err, sizeof err);
 *     ksm_model_unref(m);
 *     ksm_engine_free(e);
 *
 * Conventions:
 * - Every function returns 0 or a negative KSM_E* code (errors.h). Functions with an
 *   (err, errlen) pair write one sentence naming the offending field there on failure (err may
 *   be NULL). A failed call changes nothing: everything is validated before any mutation.
 * - Mutations of one model are serialised (each is atomic and linearizable); every successful
 *   mutation bumps the model's generation. Compute runs on a persistent stream per stream key
 *   and holds the model only while it enqueues work.
 * - Strings in structs are NUL-terminated and truncated to their buffer.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ksm_engine ksm_engine;
typedef struct ksm_model ksm_model;

#define KSM_MAX_SLOTS       64
#define KSM_ID_MAX          64 /* model ids: [A-Za-z0-9_][A-Za-z0-9._-]{0,63} (kasmina/text.h) */
#define KSM_SLOT_ID_MAX     16
#define KSM_SEED_ID_MAX     96
#define KSM_NAME_MAX        32 /* blueprint ids, initiators, curve names */
#define KSM_REASON_MAX      64
#define KSM_GATE_MAX_CHECKS 6
#define KSM_CHECK_MAX       64  /* one gate check string */
#define KSM_GATE_DETAIL_MAX 128 /* one gate check's detail line */

/* ======================= enums (values match esper-lite and kasmina.proto) ============== */

enum ksm_topology {
    KSM_TOPOLOGY_UNSPECIFIED = 0,
    KSM_TOPOLOGY_CNN = 1,
    KSM_TOPOLOGY_TRANSFORMER = 2
};

enum ksm_stage {
    KSM_STAGE_UNKNOWN = 0,
    KSM_STAGE_DORMANT = 1,
    KSM_STAGE_GERMINATED = 2,
    KSM_STAGE_TRAINING = 3,
    KSM_STAGE_BLENDING = 4,
    /* 5 is retired (SHADOWING) and rejected everywhere */
    KSM_STAGE_HOLDING = 6,
    KSM_STAGE_FOSSILIZED = 7,
    KSM_STAGE_PRUNED = 8,
    KSM_STAGE_EMBARGOED = 9,
    KSM_STAGE_RESETTING = 10,
};

enum ksm_alpha_mode { KSM_ALPHA_HOLD = 0, KSM_ALPHA_UP = 1, KSM_ALPHA_DOWN = 2 };

/* 0 = unspecified: "keep the current curve" where that applies. */
enum ksm_alpha_curve {
    KSM_CURVE_UNSPECIFIED = 0,
    KSM_CURVE_LINEAR = 1,
    KSM_CURVE_COSINE = 2,
    KSM_CURVE_SIGMOID = 3
};

/* 0 = unspecified: ADD at germination, "keep" in set_alpha_target. */
enum ksm_alpha_algorithm {
    KSM_ALGO_UNSPECIFIED = 0,
    KSM_ALGO_ADD = 1,
    KSM_ALGO_MULTIPLY = 2,
    KSM_ALGO_GATE = 3
};

enum ksm_gate_level {
    KSM_GATE_G0 = 0,
    KSM_GATE_G1 = 1,
    KSM_GATE_G2 = 2,
    KSM_GATE_G3 = 3,
    KSM_GATE_G5 = 5
};

enum ksm_lifecycle_type {
    KSM_EV_SEED_GERMINATED = 0,
    KSM_EV_SEED_GATE_EVALUATED,
    KSM_EV_SEED_STAGE_CHANGED,
    KSM_EV_SEED_FOSSILIZED,
    KSM_EV_SEED_PRUNED,
    KSM_EV_COUNT
};

/* "TRAINING", ...; "UNKNOWN" for values outside the enum. */
const char *ksm_stage_name(enum ksm_stage s);
/* true for the values of enum ksm_stage (5 is not one). */
bool ksm_stage_valid(int value);
const char *ksm_alpha_mode_name(enum ksm_alpha_mode m);   /* "HOLD", "UP", "DOWN" */
const char *ksm_alpha_curve_name(enum ksm_alpha_curve c); /* "LINEAR", "COSINE", "SIGMOID" */
const char *ksm_alpha_algorithm_name(enum ksm_alpha_algorithm a); /* "ADD", "MULTIPLY", "GATE" */
const char *ksm_gate_level_name(enum ksm_gate_level g);           /* "G0", ... */
const char *ksm_lifecycle_type_name(enum ksm_lifecycle_type t);   /* "SEED_GERMINATED", ... */
const char *ksm_topology_name(enum ksm_topology t);               /* "cnn", "transformer" */

/* ======================= lifecycle value types ======================= */

/* AlphaController (docs/blending.md). */
struct ksm_alpha_controller {
    double alpha, alpha_start, alpha_target;
    enum ksm_alpha_mode mode;
    enum ksm_alpha_curve curve; /* default LINEAR */
    double steepness;           /* default 12, >= 0.1 */
    uint32_t steps_total, steps_done;
};

/* One check of a gate with the numbers behind it (docs/gates.md#check-details). name is esper's
 * check string, the same as in checks_passed or checks_failed. */
struct ksm_gate_check {
    char name[KSM_CHECK_MAX];
    bool passed;
    char quantity[32]; /* the seed field the check reads ("epochs_in_current_stage") */
    char op[4];        /* what passes: value op threshold (">="); "" for presence/state checks */
    double threshold;
    bool has_value; /* false: the field was never measured, or the check reads no number */
    double value;
    char detail[KSM_GATE_DETAIL_MAX]; /* one line for people: "epochs_in_current_stage 3 < 10" */
};

/* GateResult (docs/gates.md#quality-gates). checks_passed / checks_failed are esper's strings;
 * checks holds every one of them, in the order the gate made them, with its numbers. */
struct ksm_gate_result {
    enum ksm_gate_level gate;
    bool passed;
    double score;
    int n_passed, n_failed;
    char checks_passed[KSM_GATE_MAX_CHECKS][KSM_CHECK_MAX];
    char checks_failed[KSM_GATE_MAX_CHECKS][KSM_CHECK_MAX];
    char message[128];
    int n_checks;
    struct ksm_gate_check checks[KSM_GATE_MAX_CHECKS];
};

/* SeedMetrics (docs/gates.md#recordmetrics, docs/lifecycle.md#slot-reports). has_* flags are "not
 * None". */
struct ksm_seed_metrics {
    uint32_t epochs_total, epochs_in_current_stage;
    double initial_val_accuracy, current_val_accuracy, best_val_accuracy;
    double accuracy_at_stage_start, accuracy_at_blending_start;
    bool blending_started;
    bool has_counterfactual;
    double counterfactual_contribution;
    bool has_prev_contribution;
    double prev_contribution, contribution_velocity;
    double interaction_sum, boost_received, upstream_alpha_sum, downstream_alpha_sum;
    bool has_grad_ratio;
    double seed_gradient_norm_ratio;
    uint64_t seed_param_count, host_param_count;
    double gradient_norm_avg;
    double current_alpha;
    uint32_t alpha_ramp_step;
    bool auto_pruned;
    char auto_prune_reason[KSM_REASON_MAX];
};

/* SeedTelemetry gradient fields and epochs (docs/gates.md#recordmetrics); unset = not measured. */
struct ksm_seed_telemetry {
    bool has_gradient_norm, has_gradient_health, has_vanishing_flag, has_exploding_flag;
    double gradient_norm, gradient_health;
    bool has_vanishing, has_exploding;
    uint32_t epoch, max_epochs;
};

/* RecordMetrics: each has_* field present is applied, in this order (docs/gates.md#recordmetrics,
 * docs/evaluate.md#from-results-to-recordmetrics, docs/gates.md#recordmetrics): val_accuracy
 * (record_accuracy), counterfactual (contribution + velocity), gradients (sync_telemetry),
 * epoch/max_epochs. */
struct ksm_metrics_update {
    bool has_val_accuracy;
    double val_accuracy; /* percent, 0..100 */
    bool has_counterfactual;
    double counterfactual; /* percentage points */
    bool has_gradient_norm, has_gradient_health, has_vanishing, has_exploding, has_grad_ratio;
    double gradient_norm, gradient_health; /* health in [0,1], norm >= 0 */
    bool vanishing, exploding;
    double seed_gradient_norm_ratio; /* >= 0 */
    bool has_epoch, has_max_epochs;
    uint32_t epoch, max_epochs;
    /* Fold the gradient statistics the last collecting TrainStep measured for the slot
     * (docs/training.md); none collected since the seed was germinated: KSM_ESTAGE. */
    bool use_collected_gradients;
    /* Attribution sums the controller computed, stored as given (finite). */
    bool has_interaction_sum, has_boost_received, has_upstream_alpha_sum, has_downstream_alpha_sum;
    double interaction_sum, boost_received, upstream_alpha_sum, downstream_alpha_sum;
    /* Clear the one-shot auto_pruned flag (esper's action execution, after each epoch). */
    bool clear_auto_pruned;
};

/* SeedStateReport (docs/lifecycle.md#slot-reports) plus the slot settings the daemon reports
 * (isolate_gradients and auto_forward_gates also for an empty slot). */
struct ksm_slot_report {
    char slot_id[KSM_SLOT_ID_MAX];
    bool occupied; /* false: empty slot (no seed state); the rest is zero */
    char seed_id[KSM_SEED_ID_MAX];
    char blueprint_id[KSM_NAME_MAX];
    int blueprint_index;
    enum ksm_stage stage, previous_stage;
    uint32_t previous_epochs_in_stage;
    int64_t stage_entered_at_ns; /* unix ns */
    enum ksm_alpha_algorithm alpha_algorithm;
    struct ksm_alpha_controller controller;
    uint32_t time_to_target;
    double alpha_velocity;
    uint32_t blend_tempo_epochs;
    char blend_algorithm_id[16];
    double blend_alpha_target;
    struct ksm_seed_metrics metrics;
    double total_improvement, improvement_since_stage_start;
    struct ksm_seed_telemetry telemetry;
    bool isolate_gradients, is_healthy, is_improving, needs_attention;
    bool has_gate;        /* a GatedBlend module exists */
    uint64_t seed_params; /* live seed + gate parameters */
    uint64_t model_generation;
    /* The slot's auto-forward gates (ConfigureSlot): bit (1 << KSM_GATE_Gn) for G1, G2, G3. */
    unsigned auto_forward_gates;
};

/* A lifecycle event (docs/lifecycle.md#events). values holds the remaining numeric payload fields.
 */
struct ksm_lifecycle_event {
    enum ksm_lifecycle_type type;
    char model_id[KSM_ID_MAX + 1];
    char slot_id[KSM_SLOT_ID_MAX];
    char seed_id[KSM_SEED_ID_MAX];
    char blueprint_id[KSM_NAME_MAX];
    int64_t timestamp_ns;
    enum ksm_stage from_stage, to_stage; /* STAGE_CHANGED; to = DORMANT when a slot clears */
    enum ksm_stage target_stage;         /* GATE_EVALUATED */
    double alpha;
    struct ksm_gate_result gate; /* GATE_EVALUATED */
    char reason[KSM_REASON_MAX]; /* PRUNED */
    char initiator[KSM_NAME_MAX];
    char alpha_curve[KSM_NAME_MAX];
    int n_values;
    struct {
        const char *key; /* static string */
        double value;
    } values[12];
};

typedef void (*ksm_lifecycle_cb)(void *ud, const struct ksm_lifecycle_event *ev);

/* ======================= engine ======================= */

struct ksm_engine_config {
    int cpu_devices;         /* logical CPU devices cpu:0..; 0 = 1 */
    bool enable_cuda;        /* try the CUDA plugin; fall back to the CPU with a log line */
    const char *cuda_plugin; /* path of libkasmina_cuda.so; NULL = next to the binary / default */
    size_t memory_cap;       /* per-device allocator cap, 0 = none */
    const char *default_device;   /* NULL = cuda:0 if loaded, else cpu:0 */
    uint32_t max_models;          /* 0 = 1024; one more is KSM_EMAXMODELS */
    uint32_t max_seeds_per_model; /* live seeds (occupied, not PRUNED, EMBARGOED or RESETTING)
                                   * per model; 0 = no limit; one more is KSM_EMAXSEEDS */
    ksm_backend *backend;         /* optional extra backend (borrowed, must outlive the engine): its
                                   * devices come first and the first is the default. Tests use it
                                   * for fault injection; embedders for their own devices. */
};

int ksm_engine_new(const struct ksm_engine_config *cfg, ksm_engine **out, char *err, size_t errlen);
/* Frees every model (waiting for their streams) and the devices. */
void ksm_engine_free(ksm_engine *e);

int ksm_engine_device_count(const ksm_engine *e);
ksm_device *ksm_engine_device(const ksm_engine *e, int i);
ksm_device *ksm_engine_find_device(const ksm_engine *e, const char *name); /* NULL if none */
ksm_device *ksm_engine_default_device(const ksm_engine *e);
ksm_allocator *ksm_engine_allocator(const ksm_engine *e, const ksm_device *d);

/* The sink receives every lifecycle event of every model, in emission order, on the thread
 * that made the mutation, while that model's lock is held: it must be quick and must not call
 * back into the model. NULL disables. */
void ksm_engine_set_event_sink(ksm_engine *e, ksm_lifecycle_cb cb, void *ud);

/* 0 while every device works; KSM_EDEVICE (with the first failure in why) once a stream reported
 * an asynchronous device error: the daemon then reports NOT_SERVING. */
int ksm_engine_health(ksm_engine *e, char *why, size_t whylen);
/* Marks the engine failed (the first reason is kept). */
void ksm_engine_mark_failed(ksm_engine *e, const char *why);

/* Blueprint names of a topology in esper's registry order ((param estimate, name)). */
int ksm_engine_blueprints(enum ksm_topology t, const char *const **names, int *n);

/* ======================= models ======================= */

/* Zero fields take esper's defaults (docs/models.md#cnnhost, docs/models.md). */
struct ksm_cnn_spec {
    uint32_t num_classes;   /* 10 */
    uint32_t n_blocks;      /* 3, >= 2 */
    uint32_t base_channels; /* 32 */
    int32_t pool_layers;    /* -1 = n_blocks (0 is a valid value: no pooling) */
    uint32_t kernel_size;   /* 3, odd */
    uint32_t in_channels;   /* 3 */
};

struct ksm_transformer_spec {
    uint32_t vocab_size;   /* 50257 */
    uint32_t n_embd;       /* 384 */
    uint32_t n_head;       /* 6; n_embd % n_head == 0 */
    uint32_t n_layer;      /* 6 */
    uint32_t block_size;   /* 256 */
    uint32_t num_segments; /* 3; n_layer % num_segments == 0 */
    double dropout;        /* 0.1 unless dropout_set; in [0, 1); applied by TrainStep only */
    bool dropout_set;      /* dropout was given (0 is a valid value) */
};

struct ksm_model_spec {
    enum ksm_topology topology;
    struct ksm_cnn_spec cnn; /* when topology is CNN; pool_layers 0 means n_blocks
                              * unless pool_layers_set */
    bool pool_layers_set;
    struct ksm_transformer_spec transformer;
    const char *const *slots; /* slot ids to register; n_slots 0 = every injection point */
    int n_slots;
    const char *device;   /* NULL/"" = engine default */
    enum ksm_dtype dtype; /* compute dtype; F32 (the only one the CPU backend runs) */
    uint64_t init_seed;   /* deterministic host initialisation */
    bool permissive_gates;
    unsigned auto_forward_gates; /* bit (1 << KSM_GATE_Gn) for G1, G2, G3 */
};

struct ksm_slot_info {
    char slot_id[KSM_SLOT_ID_MAX];
    uint32_t row, col, channels;
    uint32_t order;      /* execution order index */
    const char *surface; /* "pre_pool", "post_pool", "block_end" */
};

struct ksm_model_info {
    char model_id[KSM_ID_MAX + 1];
    enum ksm_topology topology;
    struct ksm_cnn_spec cnn;                 /* defaults resolved */
    struct ksm_transformer_spec transformer; /* defaults resolved */
    char device[32];
    enum ksm_dtype dtype;
    int n_slots;
    struct ksm_slot_info slots[KSM_MAX_SLOTS]; /* registered slots, row-major */
    uint64_t host_params;                      /* tied weights counted once */
    uint64_t seed_params;                      /* live seeds + gates */
    uint64_t generation;
    uint64_t resident_bytes;  /* device bytes owned by the model (weights, plans, scalars) */
    uint64_t train_step;      /* TrainSteps applied (kasmina/training.h) */
    uint64_t checkpoint_step; /* train_step of the last durable checkpoint */
    bool permissive_gates;
    unsigned auto_forward_gates;
};

/* id NULL or "" = the engine assigns "model-N". Returns a reference (ksm_model_unref).
 * KSM_EEXIST id taken, KSM_ELIMIT too many models, KSM_EINVAL bad spec, KSM_ENODEVICE. */
int ksm_engine_model_create(ksm_engine *e, const char *id, const struct ksm_model_spec *spec,
                            ksm_model **out, char *err, size_t errlen);
/* A new reference, or KSM_ENOMODEL. */
int ksm_engine_model_get(ksm_engine *e, const char *id, ksm_model **out);
/* Removes the model from the registry; its memory goes once the last reference is dropped
 * and its streams are idle. *freed_bytes (may be NULL) = its resident bytes. */
int ksm_engine_model_delete(ksm_engine *e, const char *id, uint64_t *freed_bytes);
/* References to every model in creation order; release each and free(*out). */
int ksm_engine_model_list(ksm_engine *e, ksm_model ***out, size_t *n);

void ksm_model_ref(ksm_model *m);
void ksm_model_unref(ksm_model *m);
const char *ksm_model_id(const ksm_model *m);
int ksm_model_get_info(ksm_model *m, struct ksm_model_info *out);
uint64_t ksm_model_generation(ksm_model *m);

/* ---- lifecycle (docs/lifecycle.md#seed-lifecycle) ---- */

struct ksm_germinate_args {
    const char *blueprint_id;       /* required */
    const char *seed_id;            /* NULL/"" = "{slot_id}-{blueprint_id}" */
    const char *blend_algorithm_id; /* "linear" | "sigmoid" | "gated"; NULL/"" = "sigmoid" */
    uint32_t blend_tempo_epochs;    /* 0 = 5 */
    enum ksm_alpha_algorithm alpha_algorithm; /* 0 = ADD; "gated" <=> GATE */
    bool has_alpha_target;
    double alpha_target; /* (0, 1], default 1 */
    uint64_t init_seed;  /* deterministic seed weights */
};

/* report (may be NULL) receives the slot's report after the call. */
int ksm_model_germinate(ksm_model *m, const char *slot_id, const struct ksm_germinate_args *a,
                        struct ksm_slot_report *report, char *err, size_t errlen);
/* target KSM_STAGE_UNKNOWN = the first non-failure transition. A gate that fails is not an
 * error: *gate says so. Failure targets and illegal pairs are KSM_EINVAL / KSM_ESTAGE. */
int ksm_model_advance(ksm_model *m, const char *slot_id, enum ksm_stage target,
                      struct ksm_gate_result *gate, struct ksm_slot_report *report, char *err,
                      size_t errlen);
/* *accepted false = nothing to do (empty, fossilized, already in cooldown), not an error. */
int ksm_model_prune(ksm_model *m, const char *slot_id, const char *reason, const char *initiator,
                    bool *accepted, struct ksm_slot_report *report, char *err, size_t errlen);
/* curve 0 keeps the current curve; has_steepness false = 12. */
int ksm_model_schedule_prune(ksm_model *m, const char *slot_id, uint32_t steps,
                             enum ksm_alpha_curve curve, bool has_steepness, double steepness,
                             const char *reason, const char *initiator, bool *accepted,
                             struct ksm_slot_report *report, char *err, size_t errlen);
int ksm_model_set_alpha_target(ksm_model *m, const char *slot_id, double alpha_target,
                               uint32_t steps, enum ksm_alpha_curve curve, bool has_steepness,
                               double steepness, enum ksm_alpha_algorithm algorithm,
                               struct ksm_slot_report *report, char *err, size_t errlen);
/* Clamped to [0, 1]; NaN is KSM_EINVAL. */
int ksm_model_set_alpha(ksm_model *m, const char *slot_id, double alpha,
                        struct ksm_slot_report *report, char *err, size_t errlen);
/* slot_id NULL/"" = every registered slot in execution order. reports (may be NULL, cap
 * entries) receive the reports of the slots ticked, row-major. */
int ksm_model_step_epoch(ksm_model *m, const char *slot_id, struct ksm_slot_report *reports,
                         size_t cap, size_t *n, char *err, size_t errlen);
int ksm_model_record_metrics(ksm_model *m, const char *slot_id, const struct ksm_metrics_update *u,
                             struct ksm_slot_report *report, char *err, size_t errlen);
/* Per-slot settings esper changes at run time (SeedSlot attributes). A setting whose set_ flag is
 * false keeps its value. */
struct ksm_slot_settings {
    bool set_isolate_gradients;
    bool isolate_gradients;
    bool set_auto_forward_gates;
    unsigned auto_forward_gates; /* bit (1 << KSM_GATE_Gn); only G1, G2, G3 (else KSM_EINVAL) */
};
/* slot_id NULL/"" = every registered slot. reports (may be NULL, cap entries) receive the reports
 * of the slots configured, row-major. */
int ksm_model_configure_slot(ksm_model *m, const char *slot_id, const struct ksm_slot_settings *s,
                             struct ksm_slot_report *reports, size_t cap, size_t *n, char *err,
                             size_t errlen);
/* slot_id NULL/"" = every registered slot, row-major. */
int ksm_model_slot_reports(ksm_model *m, const char *slot_id, struct ksm_slot_report *reports,
                           size_t cap, size_t *n, char *err, size_t errlen);

/* ---- compute (docs/evaluate.md#forward-fusedforward-and-evaluate) ---- */

/* Per-row alphas of one slot for a fused forward: n must equal the input's rows. */
struct ksm_alpha_override {
    const char *slot_id;
    const float *alpha;
    size_t n;
};

struct ksm_forward_args {
    const ksm_tensor *input; /* host memory (dev NULL), contiguous. CNN [B,C,H,W] F32;
                              * transformer [B,T] I64/I32 */
    const char *stream;      /* stream key; NULL/"" = the model's default stream */
    const struct ksm_alpha_override *overrides; /* fused forward when n_overrides > 0 */
    size_t n_overrides;
    bool fused;          /* validate as a fused forward even with no overrides */
    void *output_buffer; /* optional host buffer for the logits (reused across calls, so
                          * a large output is not faulted in again): used when
                          * output_capacity suffices; the engine never frees it. On the
                          * CPU the model's head writes into it directly (no copy), so
                          * after a failed forward its contents are unspecified */
    size_t output_capacity;
};

/* A host tensor the engine allocated: free(t.data) (ksm_host_tensor_free). */
void ksm_host_tensor_free(ksm_tensor *t);

struct ksm_forward_result {
    ksm_tensor output; /* host F32: CNN [B,classes]; transformer [B,T,V]; malloc'd (free with
                        * ksm_host_tensor_free) unless it is the caller's output_buffer */
    uint64_t model_generation;
    uint64_t compute_ns;
};

int ksm_model_forward(ksm_model *m, const struct ksm_forward_args *a, struct ksm_forward_result *r,
                      char *err, size_t errlen);

/* One counterfactual config: the listed slots are forced to the given alphas. */
struct ksm_alpha_config {
    const char *name;
    const char *const *slot_ids;
    const float *alpha;
    size_t n;
};

/* Seed attribution over the live seeds, from the same fused pass (docs/evaluate.md#attribution;
 * esper: simic/attribution/counterfactual.py). The value of a coalition is its accuracy in
 * percent with its seeds at alpha 1.0 and the other live seeds at 0.0. */
enum ksm_attribution_mode {
    KSM_ATTRIBUTION_NONE = 0,
    KSM_ATTRIBUTION_AUTO = 1,        /* EXACT with at most 8 live seeds, else PERMUTATION */
    KSM_ATTRIBUTION_EXACT = 2,       /* all 2^n coalitions, exact Shapley values */
    KSM_ATTRIBUTION_PERMUTATION = 3, /* esper's ablation configs + antithetic permutations */
};
#define KSM_ATTRIBUTION_EXACT_MAX_SEEDS 8    /* 2^8 = 256 coalitions */
#define KSM_SHAPLEY_SAMPLES_DEFAULT     20   /* esper's CounterfactualConfig.shapley_samples */
#define KSM_SHAPLEY_SAMPLES_MAX         1000
#define KSM_EVALUATE_MAX_CONFIGS        4096 /* requested + attribution configs in one pass */

struct ksm_evaluate_args {
    const ksm_tensor *input;   /* host, B rows (as for forward) */
    const ksm_tensor *targets; /* host I64/I32: CNN [B]; transformer [B,T] */
    const char *stream;
    const struct ksm_alpha_config *configs; /* explicit configs ... */
    size_t n_configs;
    bool generate_standard; /* ... or esper's standard set (docs/evaluate.md#standard-configs) when
                               n_configs == 0 */
    bool shapley;           /* with generate_standard: add the 2^n factorial (n <= 4) */
    bool return_logits;
    /* Attribution: its coalitions run in the same pass but are not listed in results; with
     * attribution, configs may be empty without generate_standard. */
    enum ksm_attribution_mode attribution;
    uint32_t shapley_samples;  /* PERMUTATION: permutations; 0 = KSM_SHAPLEY_SAMPLES_DEFAULT */
    uint64_t attribution_seed; /* PERMUTATION: seed of esper's random.Random(seed) */
};

struct ksm_config_result {
    char name[64];
    double loss;     /* mean cross-entropy over rows (tokens for the transformer) */
    double accuracy; /* percent */
    uint64_t correct, total;
    ksm_tensor logits; /* only with return_logits (malloc'd) */
};

/* One live seed's attribution (accuracy points). */
struct ksm_shapley_estimate {
    char slot_id[KSM_SLOT_ID_MAX];
    double mean;        /* Shapley value */
    double std;         /* sample std (ddof 1) of the permutation marginals; 0 for exact */
    uint32_t n_samples; /* marginals averaged: n! for exact */
    char algorithm[24]; /* "exact" | "permutation_antithetic" */
    double marginal;    /* v(all) - v(all without this seed) */
};

/* v({a,b}) - v({a}) - v({b}) + v({}), a before b in row-major order. */
struct ksm_interaction_term {
    char slot_a[KSM_SLOT_ID_MAX];
    char slot_b[KSM_SLOT_ID_MAX];
    double interaction;
};

struct ksm_evaluate_result {
    struct ksm_config_result *results; /* malloc'd; ksm_evaluate_result_free */
    size_t n;
    uint64_t model_generation;
    uint64_t compute_ns;
    struct ksm_shapley_estimate *shapley; /* with attribution: one per live seed, row-major */
    size_t n_shapley;
    struct ksm_interaction_term *interactions; /* EXACT: every pair of live seeds */
    size_t n_interactions;
};
void ksm_evaluate_result_free(struct ksm_evaluate_result *r);

int ksm_model_evaluate(ksm_model *m, const struct ksm_evaluate_args *a,
                       struct ksm_evaluate_result *r, char *err, size_t errlen);

/* ---- weights ---- */

struct ksm_load_result {
    char **loaded, **missing, **unexpected; /* malloc'd names; ksm_load_result_free */
    size_t n_loaded, n_missing, n_unexpected;
};
void ksm_load_result_free(struct ksm_load_result *r);

/* A safetensors blob with esper state_dict names (+ __metadata__ extra states). */
int ksm_model_load_weights(ksm_model *m, const void *buf, size_t len, bool strict,
                           struct ksm_load_result *r, char *err, size_t errlen);
/* *buf is malloc'd. */
int ksm_model_export_weights(ksm_model *m, void **buf, size_t *len, char *err, size_t errlen);
/* A partial export (esper's Governor snapshots): only the listed slots' tensors and _extra_state,
 * plus the host's tensors when include_host; no kasmina.* metadata, so it loads like any esper
 * file (strict = false). n_slot_ids 0 is ksm_model_export_weights (everything; include_host is
 * then ignored). KSM_ENOSLOT names an unknown slot, KSM_EINVAL one listed twice. */
int ksm_model_export_weights_subset(ksm_model *m, const char *const *slot_ids, int n_slot_ids,
                                    bool include_host, void **buf, size_t *len, char *err,
                                    size_t errlen);

/* ---- persistence (daemon/io/persist.c) ----
 *
 * The state of a model as one safetensors blob that ksm_model_restore_state() installs
 * atomically. slot_ids NULL: a snapshot (every host tensor, every slot's seed/gate tensors and
 * _extra_state, and the training state: kasmina.train_step, kasmina.training and the momentum
 * buffers _kasmina_optim.<parameter>.momentum_buffer, docs/training.md#durability-and-
 * checkpoints); else only the listed slots' _extra_state and seed/gate tensors. Both carry
 * __metadata__ kasmina.generation (the model generation), kasmina.kind ("snapshot" | "slots")
 * and kasmina.device. *buf is malloc'd; *generation (may be NULL) = the generation exported.
 * KSM_ENOSLOT names an unknown slot. */
int ksm_model_export_state(ksm_model *m, const char *const *slot_ids, int n_slot_ids, void **buf,
                           size_t *len, uint64_t *generation, char *err, size_t errlen);
/* ksm_model_export_state(m, NULL, ...), also giving the train_step the snapshot carries. */
int ksm_model_export_snapshot(ksm_model *m, void **buf, size_t *len, uint64_t *generation,
                              uint64_t *train_step, char *err, size_t errlen);
/* Installs a blob of ksm_model_export_state atomically, with the generation it names (not a
 * bump); emits no events.
 * - A snapshot (strictly: every tensor is required) replaces every slot and module, the host
 *   tensors and the training state (configuration, train_step, momentum buffers; none in the
 *   blob: none, train_step 0), and makes its train_step the model's checkpoint_step.
 * - A "slots" record installs the slots it carries; slots it does not carry are untouched. A
 *   slot whose seed (and gate) module the model already holds -- the same blueprint and seed id
 *   -- keeps that module, its tensors and its optimizer (dropped when the record fossilizes the
 *   seed): the record's copies are ignored, so that a journal replayed over a checkpoint gives
 *   the checkpoint's weights and a seed germinated after it its initial ones. */
int ksm_model_restore_state(ksm_model *m, const void *buf, size_t len, char *err, size_t errlen);
/* The train_step of the model's last checkpoint (Model.checkpoint_step): of the snapshot last
 * restored, or as set by ksm_model_set_checkpoint_step once a snapshot is durable. */
uint64_t ksm_model_checkpoint_step(ksm_model *m);
void ksm_model_set_checkpoint_step(ksm_model *m, uint64_t step);

/* device NULL/"" = keep; dtype -1 = keep. Invalidates every cache of the model. */
int ksm_model_move(ksm_model *m, const char *device, int dtype, char *err, size_t errlen);

/* ---- statistics ---- */

struct ksm_cache_counters {
    char cache[16];                /* "alpha_scalar", "plan", "block_mask", "shape_probe" */
    char slot_id[KSM_SLOT_ID_MAX]; /* "" for model-level caches */
    uint64_t hits, misses, evictions, invalidations, entries, capacity, bytes;
    uint64_t recompiles; /* plans: builds after the first */
};

/* Fills up to cap entries; *n = the number available. */
int ksm_model_cache_stats(ksm_model *m, struct ksm_cache_counters *out, size_t cap, size_t *n);

#ifdef __cplusplus
}
#endif
