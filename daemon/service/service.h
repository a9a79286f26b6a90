/*
 * service: the daemon's core between its front ends (rpc/) and the engine (kasmina.h).
 *
 * The service owns what makes an engine call a daemon operation: durability (io/persist: the
 * model's journal or snapshot is written before the operation answers), publication (the event
 * log behind WatchEvents: a mutation's lifecycle events are published only once it is durable)
 * and the daemon's own words for the engine's limits. Each mutation is one function that
 *
 *     validates (the engine validates everything before it changes anything),
 *     takes the model's persist lock (so journal order is mutation order),
 *     refuses a model deleted since it was looked up (NOT_FOUND, nothing changes),
 *     holds the events the engine raises on this thread, calls the engine,
 *     writes the record, then publishes the events -- or, when the write fails, rolls the model
 *     back to its durable state and drops them.
 *
 * Reads (forward, evaluate, export, reports, statistics) need neither durability nor
 * publication: front ends get the model from ksm_service_model_get and call the engine.
 * Limits about one model (live seeds) or the registry (model count) are the engine's, checked
 * under the engine's own locks, so operations on different models never serialise here.
 *
 * Thread-safety: every function may be called from any thread.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/persist.h"
#include "kasmina/kasmina.h"
#include "kasmina/training.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---- The event log ----

struct ksm_event_log;
/* Called after each event is published, with its sequence number, outside the log's lock. */
typedef void (*ksm_event_listener_fn)(void *ud, const struct ksm_lifecycle_event *ev,
                                      uint64_t sequence);

int ksm_event_log_new(size_t capacity, struct ksm_event_log **out);
void ksm_event_log_free(struct ksm_event_log *l);
/* Replaces the listener; returns once no call of the previous one is running. Not from within a
 * listener call. */
void ksm_event_log_set_listener(struct ksm_event_log *l, ksm_event_listener_fn fn, void *ud);
/* The engine's event sink (ksm_engine_set_event_sink, ud = the log). */
void ksm_event_log_engine_sink(void *ud, const struct ksm_lifecycle_event *ev);
/* Between hold and release on one thread the engine's events are held back; release publishes
 * them (publish true) or drops them. */
void ksm_event_log_hold(void);
void ksm_event_log_release(struct ksm_event_log *l, bool publish);
/* The kept window: events oldest..last (last 0: none yet; oldest > last when empty). */
void ksm_event_log_window(struct ksm_event_log *l, uint64_t *oldest, uint64_t *last);
size_t ksm_event_log_capacity(const struct ksm_event_log *l);
/* Copies event q: 0, or KSM_ERANGE when it is not kept (yet or any more). */
int ksm_event_log_get(struct ksm_event_log *l, uint64_t q, struct ksm_lifecycle_event *ev);

// ---- The service ----

typedef struct ksm_service ksm_service;

struct ksm_service_config {
    ksm_engine *engine;   /* not owned */
    ksm_persist *persist; /* not owned; NULL: nothing is kept on disk */
    size_t event_ring;    /* events kept for WatchEvents resumption; 0 = 4096 */
    /* The daemon's option values, for its sentences about the engine's limits (0 = unset). */
    uint32_t max_models;
    uint32_t max_seeds_per_model;
    size_t memory_cap;
    /* --checkpoint-interval: checkpoint a model after each TrainStep that makes its train_step a
     * multiple of this (0 = never; needs persist). */
    uint64_t checkpoint_interval;
};

int ksm_service_new(const struct ksm_service_config *cfg, ksm_service **out);
/* Detaches the event log from the engine. NULL is a no-op. */
void ksm_service_free(ksm_service *s);
ksm_engine *ksm_service_engine(ksm_service *s);
/* Whether mutations are written to disk (a persist directory was given). */
bool ksm_service_persists(const ksm_service *s);
struct ksm_event_log *ksm_service_events(ksm_service *s);

/* Every function below returns 0 or a KSM_E* code with one sentence in err. */

// ---- Models ----

/* A reference (ksm_model_unref) to model id. KSM_ENOMODEL: "model_id 'x' does not exist." */
int ksm_service_model_get(ksm_service *s, const char *id, ksm_model **out, char *err,
                          size_t errlen);
/* Creates the model and its state directory (both or neither). *out: a reference. */
int ksm_service_model_create(ksm_service *s, const char *id, const struct ksm_model_spec *spec,
                             ksm_model **out, char *err, size_t errlen);
int ksm_service_model_delete(ksm_service *s, const char *id, uint64_t *freed_bytes, char *err,
                             size_t errlen);
/* *res is filled (and must be freed with ksm_load_result_free) even when the call fails after
 * the engine load, e.g. because the new snapshot could not be written. */
int ksm_service_load_weights(ksm_service *s, ksm_model *m, const void *buf, size_t len, bool strict,
                             struct ksm_load_result *res, char *err, size_t errlen);
/* The models quarantined when the state directory was restored (io/persist.h). */
const struct ksm_persist_quarantine *ksm_service_quarantined(ksm_service *s, size_t *n);
int ksm_service_move(ksm_service *s, ksm_model *m, const char *device, int dtype, char *err,
                     size_t errlen);

// ---- The lifecycle (the engine's functions of the same names, made durable) ----

int ksm_service_germinate(ksm_service *s, ksm_model *m, const char *slot_id,
                          const struct ksm_germinate_args *a, struct ksm_slot_report *report,
                          char *err, size_t errlen);
int ksm_service_advance(ksm_service *s, ksm_model *m, const char *slot_id, enum ksm_stage target,
                        struct ksm_gate_result *gate, struct ksm_slot_report *report, char *err,
                        size_t errlen);
int ksm_service_prune(ksm_service *s, ksm_model *m, const char *slot_id, const char *reason,
                      const char *initiator, bool *accepted, struct ksm_slot_report *report,
                      char *err, size_t errlen);
int ksm_service_schedule_prune(ksm_service *s, ksm_model *m, const char *slot_id, uint32_t steps,
                               enum ksm_alpha_curve curve, bool has_steepness, double steepness,
                               const char *reason, const char *initiator, bool *accepted,
                               struct ksm_slot_report *report, char *err, size_t errlen);
int ksm_service_set_alpha_target(ksm_service *s, ksm_model *m, const char *slot_id,
                                 double alpha_target, uint32_t steps, enum ksm_alpha_curve curve,
                                 bool has_steepness, double steepness,
                                 enum ksm_alpha_algorithm algorithm, struct ksm_slot_report *report,
                                 char *err, size_t errlen);
int ksm_service_set_alpha(ksm_service *s, ksm_model *m, const char *slot_id, double alpha,
                          struct ksm_slot_report *report, char *err, size_t errlen);
int ksm_service_step_epoch(ksm_service *s, ksm_model *m, const char *slot_id,
                           struct ksm_slot_report *reports, size_t cap, size_t *n, char *err,
                           size_t errlen);
int ksm_service_record_metrics(ksm_service *s, ksm_model *m, const char *slot_id,
                               const struct ksm_metrics_update *u, struct ksm_slot_report *report,
                               char *err, size_t errlen);
int ksm_service_configure_slot(ksm_service *s, ksm_model *m, const char *slot_id,
                               const struct ksm_slot_settings *set, struct ksm_slot_report *reports,
                               size_t cap, size_t *n, char *err, size_t errlen);

// ---- Training (docs/training.md) ----

/* The model's training configuration, updated by merge (ksm_model_update_training: the read,
 * the merge and the write are one step, so concurrent partial updates all stay); a mutation in
 * memory (not journalled: training state is made durable by checkpoints), refused for a model
 * deleted since its lookup. out / train_step (may be NULL): as this call left them. */
int ksm_service_configure_training(ksm_service *s, ksm_model *m, ksm_training_merge_fn merge,
                                   void *ud, bool reset_optimizer_state,
                                   struct ksm_training_config *out, uint64_t *train_step, char *err,
                                   size_t errlen);
/* One TrainStep, under the same rules. With a checkpoint_interval, a step that makes train_step a
 * multiple of it is followed by a checkpoint before this returns, under the same lock; if that
 * checkpoint cannot be written the step still succeeds (it was applied), the failure is logged
 * and the model's checkpoint_step stays where it was. */
int ksm_service_train_step(ksm_service *s, ksm_model *m, const struct ksm_train_args *a,
                           struct ksm_train_result *r, char *err, size_t errlen);
/* Checkpoint: the model's training progress made durable (ksm_persist_checkpoint) under its
 * lock, so that it never races a TrainStep; *train_step (may be NULL) = the step now durable.
 * KSM_ESTAGE ("...--no-persist...") when the service keeps nothing on disk; KSM_ENOMODEL for a
 * model deleted since its lookup; KSM_ENOSPC / KSM_EIO when the write fails (the previous
 * checkpoint stays). */
int ksm_service_checkpoint(ksm_service *s, ksm_model *m, uint64_t *train_step, char *err,
                           size_t errlen);

/* The daemon's sentence for an engine limit: rewrites err for KSM_EMAXMODELS, KSM_EMAXSEEDS
 * and (with a memory cap) KSM_EDEVMEM so that it names the option; other codes are unchanged.
 * Front ends call it once on any failed call's sentence (a read can hit the memory cap too). */
void ksm_service_explain(const ksm_service *s, int rc, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
