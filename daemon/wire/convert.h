/*
 * wire/convert: pure functions between the kasmina.v1 protobuf-c messages and the engine structs
 * of include/kasmina/kasmina.h, in both directions. The server decodes requests (pb -> engine)
 * and encodes replies (engine -> pb); libkasmina-client does the opposite with the same
 * functions. Nothing here touches the network, the engine's state or a global.
 *
 * Conventions:
 * - X_from_pb(pb, ..., err, errlen) validates what belongs to the wire (enum ranges, stage 5,
 *   NaN scalars, empty required ids, string lengths, tensor shape/size consistency) and returns
 *   0 or KSM_EINVAL with one sentence naming the field in err (err may be NULL). Semantic checks
 *   (unknown slot, illegal transition, ...) are the engine's.
 * - Strings and arrays in the engine structs that from_pb fills are BORROWED from the pb message
 *   (or from the arena, when a copy or a new array was needed): keep both alive while the struct
 *   is used. The exceptions say so (results the engine would have malloc'd are malloc'd).
 * - X_to_pb(..., arena, pb) fills a caller-provided message (initialised by the caller with its
 *   INIT macro or by the function: every to_pb function initialises *pb itself). Sub-messages,
 *   repeated fields and strings are allocated in the arena or borrowed from the engine struct;
 *   tensor data is borrowed. Pack the message, then ksm_pb_arena_fini(). Never call protobuf-c's
 *   __free_unpacked on a message built here. Returns 0 or KSM_ENOMEM (or KSM_EINVAL where
 *   stated).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kasmina/kasmina.h"
#include "kasmina/training.h"
#include "kasmina/v1/kasmina.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Arena: every allocation of one message conversion, freed at once ---- */

struct ksm_pb_arena_chunk;
struct ksm_pb_arena {
    struct ksm_pb_arena_chunk *head;
    size_t bytes; /* total allocated, for limits and tests */
};

void ksm_pb_arena_init(struct ksm_pb_arena *a);
/* Frees every allocation. A zeroed arena is valid (fini is a no-op). */
void ksm_pb_arena_fini(struct ksm_pb_arena *a);
/* Zeroed, 16-byte aligned memory, or NULL on OOM. n 0 gives a valid unique pointer. */
void *ksm_pb_arena_alloc(struct ksm_pb_arena *a, size_t n);
/* A copy of s (NULL gives ""), or NULL on OOM. */
char *ksm_pb_arena_strdup(struct ksm_pb_arena *a, const char *s);

/* ---- Enums ---- */

/* DTYPE_F32.. -> KSM_DTYPE_*; DTYPE_UNSPECIFIED and unknown values are KSM_EINVAL. */
int ksm_wire_dtype_from_pb(int v, const char *field, enum ksm_dtype *out, char *err, size_t errlen);
Kasmina__V1__DType ksm_wire_dtype_to_pb(enum ksm_dtype d);
/* Values of enum ksm_stage (0 = UNKNOWN allowed, 5 rejected). */
int ksm_wire_stage_from_pb(int v, const char *field, enum ksm_stage *out, char *err, size_t errlen);
int ksm_wire_curve_from_pb(int v, const char *field, enum ksm_alpha_curve *out, char *err,
                           size_t errlen);
int ksm_wire_algorithm_from_pb(int v, const char *field, enum ksm_alpha_algorithm *out, char *err,
                               size_t errlen);
int ksm_wire_gate_level_from_pb(int v, const char *field, enum ksm_gate_level *out, char *err,
                                size_t errlen);

/* ---- Identifiers and scalars ---- */

/* A model id: kasmina/text.h's id grammar, 1..KSM_ID_MAX bytes. Empty is accepted only when
 * !required. */
int ksm_wire_check_model_id(const char *s, const char *field, bool required, char *err,
                            size_t errlen);
/* A slot id: the same grammar, 1..KSM_SLOT_ID_MAX-1 bytes. Empty is accepted only when
 * !required. */
int ksm_wire_check_slot_id(const char *s, const char *field, bool required, char *err,
                           size_t errlen);
/* A free-form string of at most max bytes (max excludes the NUL): strict UTF-8, no control
 * characters. */
int ksm_wire_check_string(const char *s, const char *field, bool required, size_t max, char *err,
                          size_t errlen);
/* NaN (and, with !allow_inf, +-Inf) is KSM_EINVAL. */
int ksm_wire_check_number(double v, const char *field, bool allow_inf, char *err, size_t errlen);

/* ---- Tensor ---- */

/* Validates pb (dtype set and known, ndim <= KSM_MAX_DIMS, dims >= 0, overflow-safe element
 * count, len(data) == numel * dtype size exactly) and makes *out a contiguous host view of its
 * bytes (dev NULL). Bytes not aligned to the element size are copied into the arena. field
 * names the message field in errors ("input"). */
int ksm_wire_tensor_from_pb(const Kasmina__V1__Tensor *pb, const char *field,
                            struct ksm_pb_arena *a, ksm_tensor *out, char *err, size_t errlen);
/* As from_pb, but the data is copied into a malloc'd buffer owned by *out
 * (ksm_host_tensor_free): for results a client keeps. */
int ksm_wire_tensor_from_pb_copy(const Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                                 char *err, size_t errlen);
/* As from_pb_copy, but *out takes pb's data buffer instead of a copy when it is aligned to the
 * element size (pb->data is then emptied). pb must have been unpacked with protobuf-c's default
 * allocator (protobuf_c_message_unpack(d, NULL, ...) or ksm_pb_unpack_pieces): its bytes are
 * then malloc'd, and free() (ksm_host_tensor_free) releases them. */
int ksm_wire_tensor_from_pb_take(Kasmina__V1__Tensor *pb, const char *field, ksm_tensor *out,
                                 char *err, size_t errlen);
/* Fills pb from a contiguous host tensor; the data is borrowed. KSM_EINVAL for a
 * non-contiguous tensor or a bad dtype. */
int ksm_wire_tensor_to_pb(const ksm_tensor *t, struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb);
/* Fills pb with t (F32) converted to dtype: UNSPECIFIED/F32 borrow t's data, F16 and BF16 are
 * rounded to nearest even into the arena. Integer dtypes are KSM_EINVAL naming field. */
int ksm_wire_tensor_to_pb_as(const ksm_tensor *t, int dtype, const char *field,
                             struct ksm_pb_arena *a, Kasmina__V1__Tensor *pb, char *err,
                             size_t errlen);

/* ---- Models ---- */

/* CreateModelRequest -> spec (slots borrowed from pb). No host = CNN with defaults. Also checks
 * model_id (may be empty: the server assigns one). */
int ksm_wire_model_spec_from_pb(const Kasmina__V1__CreateModelRequest *pb,
                                struct ksm_model_spec *spec, char *err, size_t errlen);
int ksm_wire_model_spec_to_pb(const char *model_id, const struct ksm_model_spec *spec,
                              struct ksm_pb_arena *a, Kasmina__V1__CreateModelRequest *pb);
void ksm_wire_cnn_spec_from_pb(const Kasmina__V1__CnnHostSpec *pb, struct ksm_cnn_spec *out,
                               bool *pool_layers_set);
void ksm_wire_transformer_spec_from_pb(const Kasmina__V1__TransformerHostSpec *pb,
                                       struct ksm_transformer_spec *out);

int ksm_wire_model_to_pb(const struct ksm_model_info *info, struct ksm_pb_arena *a,
                         Kasmina__V1__Model *pb);
/* Slot surfaces are mapped back to the engine's static strings ("" when unknown). */
int ksm_wire_model_from_pb(const Kasmina__V1__Model *pb, struct ksm_model_info *info, char *err,
                           size_t errlen);

/* ---- Lifecycle ---- */

/* Also checks model_id, slot_id (required) and blueprint_id (required). */
int ksm_wire_germinate_from_pb(const Kasmina__V1__GerminateRequest *pb,
                               struct ksm_germinate_args *out, char *err, size_t errlen);
int ksm_wire_germinate_to_pb(const char *model_id, const char *slot_id,
                             const struct ksm_germinate_args *args, struct ksm_pb_arena *a,
                             Kasmina__V1__GerminateRequest *pb);

/* The scalar arguments of the lifecycle calls (strings borrowed). */
struct ksm_lifecycle_args {
    const char *model_id, *slot_id;
    enum ksm_stage target;              /* AdvanceStage */
    const char *reason, *initiator;     /* Prune, SchedulePrune */
    uint32_t steps;                     /* SchedulePrune, SetAlphaTarget */
    enum ksm_alpha_curve curve;         /* SchedulePrune, SetAlphaTarget */
    bool has_steepness;                 /* SchedulePrune, SetAlphaTarget */
    double steepness;                   /* finite, > 0 */
    double alpha;                       /* SetAlpha (NaN rejected) / SetAlphaTarget (0, 1] */
    enum ksm_alpha_algorithm algorithm; /* SetAlphaTarget */
};
int ksm_wire_advance_from_pb(const Kasmina__V1__AdvanceStageRequest *pb,
                             struct ksm_lifecycle_args *out, char *err, size_t errlen);
int ksm_wire_prune_from_pb(const Kasmina__V1__PruneRequest *pb, struct ksm_lifecycle_args *out,
                           char *err, size_t errlen);
int ksm_wire_schedule_prune_from_pb(const Kasmina__V1__SchedulePruneRequest *pb,
                                    struct ksm_lifecycle_args *out, char *err, size_t errlen);
int ksm_wire_set_alpha_target_from_pb(const Kasmina__V1__SetAlphaTargetRequest *pb,
                                      struct ksm_lifecycle_args *out, char *err, size_t errlen);
int ksm_wire_set_alpha_from_pb(const Kasmina__V1__SetAlphaRequest *pb,
                               struct ksm_lifecycle_args *out, char *err, size_t errlen);
void ksm_wire_advance_to_pb(const struct ksm_lifecycle_args *l,
                            Kasmina__V1__AdvanceStageRequest *pb);
void ksm_wire_prune_to_pb(const struct ksm_lifecycle_args *l, Kasmina__V1__PruneRequest *pb);
void ksm_wire_schedule_prune_to_pb(const struct ksm_lifecycle_args *l,
                                   Kasmina__V1__SchedulePruneRequest *pb);
void ksm_wire_set_alpha_target_to_pb(const struct ksm_lifecycle_args *l,
                                     Kasmina__V1__SetAlphaTargetRequest *pb);
void ksm_wire_set_alpha_to_pb(const struct ksm_lifecycle_args *l, Kasmina__V1__SetAlphaRequest *pb);

/* ConfigureSlotRequest -> settings (checks model_id; slot_id may be empty: every slot). */
int ksm_wire_configure_slot_from_pb(const Kasmina__V1__ConfigureSlotRequest *pb,
                                    struct ksm_slot_settings *out, char *err, size_t errlen);
int ksm_wire_configure_slot_to_pb(const char *model_id, const char *slot_id,
                                  const struct ksm_slot_settings *s, struct ksm_pb_arena *a,
                                  Kasmina__V1__ConfigureSlotRequest *pb);
/* Gate bits (1 << KSM_GATE_Gn) <-> repeated GateLevel (G1..G3 only; field names the list). */
int ksm_wire_gate_levels_from_pb(const Kasmina__V1__GateLevel *v, size_t n, const char *field,
                                 unsigned *out, char *err, size_t errlen);
int ksm_wire_gate_levels_to_pb(unsigned bits, struct ksm_pb_arena *a, Kasmina__V1__GateLevel **v,
                               size_t *n);

int ksm_wire_gate_to_pb(const struct ksm_gate_result *g, struct ksm_pb_arena *a,
                        Kasmina__V1__GateResult *pb);
int ksm_wire_gate_from_pb(const Kasmina__V1__GateResult *pb, struct ksm_gate_result *g, char *err,
                          size_t errlen);

/* model_id is not part of ksm_slot_report: it is passed in (to_pb) and ignored (from_pb). */
int ksm_wire_slot_report_to_pb(const char *model_id, const struct ksm_slot_report *r,
                               struct ksm_pb_arena *a, Kasmina__V1__SlotReport *pb);
int ksm_wire_slot_report_from_pb(const Kasmina__V1__SlotReport *pb, struct ksm_slot_report *r,
                                 char *err, size_t errlen);

/* Event values' keys are borrowed from pb in from_pb (the engine's are static strings). */
int ksm_wire_event_to_pb(uint64_t sequence, const struct ksm_lifecycle_event *ev,
                         struct ksm_pb_arena *a, Kasmina__V1__LifecycleEvent *pb);
int ksm_wire_event_from_pb(const Kasmina__V1__LifecycleEvent *pb, uint64_t *sequence,
                           struct ksm_lifecycle_event *ev, char *err, size_t errlen);
/* "SEED_GERMINATED" -> KSM_EV_SEED_GERMINATED; KSM_EINVAL when unknown. */
int ksm_wire_lifecycle_type_parse(const char *s, enum ksm_lifecycle_type *out);

/* Also checks model_id and slot_id (required). */
int ksm_wire_metrics_from_pb(const Kasmina__V1__RecordMetricsRequest *pb,
                             struct ksm_metrics_update *u, char *err, size_t errlen);
int ksm_wire_metrics_to_pb(const char *model_id, const char *slot_id,
                           const struct ksm_metrics_update *u, struct ksm_pb_arena *a,
                           Kasmina__V1__RecordMetricsRequest *pb);

/* ---- Compute ---- */

/* ForwardRequest -> args (input tensor and strings in the arena / borrowed). *output_dtype is
 * the validated output dtype (UNSPECIFIED = F32; F32, F16, BF16 allowed). */
int ksm_wire_forward_from_pb(const Kasmina__V1__ForwardRequest *pb, struct ksm_pb_arena *a,
                             struct ksm_forward_args *out, int *output_dtype, char *err,
                             size_t errlen);
/* FusedForwardRequest -> args with fused = true and one override per entry: slot ids required
 * and distinct, no NaN, exactly one alpha per input row. */
int ksm_wire_fused_forward_from_pb(const Kasmina__V1__FusedForwardRequest *pb,
                                   struct ksm_pb_arena *a, struct ksm_forward_args *out,
                                   int *output_dtype, char *err, size_t errlen);
int ksm_wire_forward_to_pb(const char *model_id, const struct ksm_forward_args *args,
                           int output_dtype, struct ksm_pb_arena *a,
                           Kasmina__V1__ForwardRequest *pb);
int ksm_wire_fused_forward_to_pb(const char *model_id, const struct ksm_forward_args *args,
                                 int output_dtype, struct ksm_pb_arena *a,
                                 Kasmina__V1__FusedForwardRequest *pb);
int ksm_wire_forward_result_to_pb(const struct ksm_forward_result *r, int output_dtype,
                                  struct ksm_pb_arena *a, Kasmina__V1__ForwardResponse *pb,
                                  char *err, size_t errlen);
/* The output is copied into malloc'd memory (ksm_host_tensor_free). */
int ksm_wire_forward_result_from_pb(const Kasmina__V1__ForwardResponse *pb,
                                    struct ksm_forward_result *r, char *err, size_t errlen);
/* The same, taking the output's buffer from pb (ksm_wire_tensor_from_pb_take). */
int ksm_wire_forward_result_take_pb(Kasmina__V1__ForwardResponse *pb, struct ksm_forward_result *r,
                                    char *err, size_t errlen);

/* AlphaConfig -> one ksm_alpha_config (arrays in the arena). */
int ksm_wire_alpha_config_from_pb(const Kasmina__V1__AlphaConfig *pb, size_t index,
                                  struct ksm_pb_arena *a, struct ksm_alpha_config *out, char *err,
                                  size_t errlen);
int ksm_wire_alpha_config_to_pb(const struct ksm_alpha_config *c, struct ksm_pb_arena *a,
                                Kasmina__V1__AlphaConfig *pb);
int ksm_wire_evaluate_from_pb(const Kasmina__V1__EvaluateRequest *pb, struct ksm_pb_arena *a,
                              struct ksm_evaluate_args *out, char *err, size_t errlen);
int ksm_wire_evaluate_to_pb(const char *model_id, const struct ksm_evaluate_args *args,
                            struct ksm_pb_arena *a, Kasmina__V1__EvaluateRequest *pb);
int ksm_wire_config_result_to_pb(const struct ksm_config_result *c, struct ksm_pb_arena *a,
                                 Kasmina__V1__ConfigResult *pb);
/* Logits (if any) are copied into malloc'd memory. */
int ksm_wire_config_result_from_pb(const Kasmina__V1__ConfigResult *pb, struct ksm_config_result *c,
                                   char *err, size_t errlen);
int ksm_wire_evaluate_result_to_pb(const struct ksm_evaluate_result *r, struct ksm_pb_arena *a,
                                   Kasmina__V1__EvaluateResponse *pb);
/* r->results is malloc'd (ksm_evaluate_result_free). */
int ksm_wire_evaluate_result_from_pb(const Kasmina__V1__EvaluateResponse *pb,
                                     struct ksm_evaluate_result *r, char *err, size_t errlen);
/* The same, taking the logits' buffers from pb (ksm_wire_tensor_from_pb_take). */
int ksm_wire_evaluate_result_take_pb(Kasmina__V1__EvaluateResponse *pb,
                                     struct ksm_evaluate_result *r, char *err, size_t errlen);

/* ---- Weights ---- */

int ksm_wire_load_result_to_pb(const struct ksm_load_result *r, struct ksm_pb_arena *a,
                               Kasmina__V1__LoadWeightsResponse *pb);
/* Names are malloc'd (ksm_load_result_free). */
int ksm_wire_load_result_from_pb(const Kasmina__V1__LoadWeightsResponse *pb,
                                 struct ksm_load_result *r);

/* ---- Statistics ---- */

/* per-model bytes: n entries of (model_ids[i], model_bytes[i]); may be 0. */
int ksm_wire_mem_stats_to_pb(const char *device, const struct ksm_mem_stats *s,
                             const char *const *model_ids, const uint64_t *model_bytes, size_t n,
                             struct ksm_pb_arena *a, Kasmina__V1__DeviceMemoryStats *pb);
/* device receives the name (truncated to devlen); missing sub-messages read as zero. */
void ksm_wire_mem_stats_from_pb(const Kasmina__V1__DeviceMemoryStats *pb, char *device,
                                size_t devlen, struct ksm_mem_stats *s);

int ksm_wire_cache_counters_to_pb(const char *model_id, const struct ksm_cache_counters *c,
                                  struct ksm_pb_arena *a, Kasmina__V1__CacheCounters *pb);
/* model_id (may be NULL) receives the model id, at least KSM_ID_MAX + 1 bytes. */
void ksm_wire_cache_counters_from_pb(const Kasmina__V1__CacheCounters *pb, char *model_id,
                                     struct ksm_cache_counters *c);

/* ---- Training (docs/training.md) ---- */

/* ConfigureTraining onto current: unset fields keep their value. *reset = reset_optimizer_state. */
int ksm_wire_training_config_from_pb(const Kasmina__V1__ConfigureTrainingRequest *pb,
                                     const struct ksm_training_config *current,
                                     struct ksm_training_config *out, bool *reset, char *err,
                                     size_t errlen);
/* TrainingConfig with every field set. */
int ksm_wire_training_config_to_pb(const char *model_id, const struct ksm_training_config *c,
                                   uint64_t train_step, struct ksm_pb_arena *a,
                                   Kasmina__V1__TrainingConfig *pb);
/* TrainStep: input and targets (I64) borrowed from pb, slots checked as ids. */
int ksm_wire_train_args_from_pb(const Kasmina__V1__TrainStepRequest *pb, struct ksm_pb_arena *a,
                                struct ksm_train_args *out, char *err, size_t errlen);
int ksm_wire_train_result_to_pb(const struct ksm_train_result *r, struct ksm_pb_arena *a,
                                Kasmina__V1__TrainStepResponse *pb);
/* The client's direction. c NULL: a request that changes nothing (reads the configuration). */
int ksm_wire_configure_training_to_pb(const char *model_id, const struct ksm_training_config *c,
                                      bool reset, struct ksm_pb_arena *a,
                                      Kasmina__V1__ConfigureTrainingRequest *pb);
void ksm_wire_training_config_from_reply(const Kasmina__V1__TrainingConfig *pb,
                                         struct ksm_training_config *c, uint64_t *train_step);
int ksm_wire_train_args_to_pb(const char *model_id, const struct ksm_train_args *t,
                              struct ksm_pb_arena *a, Kasmina__V1__TrainStepRequest *pb);
void ksm_wire_train_result_from_pb(const Kasmina__V1__TrainStepResponse *pb,
                                   struct ksm_train_result *r);

#ifdef __cplusplus
}
#endif
