/* service: durable, published daemon operations over the engine (service.h). */
#include "service/service.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"

struct ksm_service {
    struct ksm_service_config cfg;
    ksm_engine *engine;
    ksm_persist *persist;
    struct ksm_event_log *events;
};

int ksm_service_new(const struct ksm_service_config *cfg, ksm_service **out)
{
    if (cfg == NULL || cfg->engine == NULL) return KSM_EINVAL;
    ksm_service *s = calloc(1, sizeof *s);
    if (s == NULL) return KSM_ENOMEM;
    s->cfg = *cfg;
    s->engine = cfg->engine;
    s->persist = cfg->persist;
    int rc = ksm_event_log_new(cfg->event_ring ? cfg->event_ring : 4096, &s->events);
    if (rc != 0) {
        free(s);
        return rc;
    }
    ksm_engine_set_event_sink(s->engine, ksm_event_log_engine_sink, s->events);
    *out = s;
    return 0;
}

void ksm_service_free(ksm_service *s)
{
    if (s == NULL) return;
    ksm_engine_set_event_sink(s->engine, NULL, NULL);
    ksm_event_log_free(s->events);
    free(s);
}

ksm_engine *ksm_service_engine(ksm_service *s) { return s->engine; }
bool ksm_service_persists(const ksm_service *s) { return s->persist != NULL; }
struct ksm_event_log *ksm_service_events(ksm_service *s) { return s->events; }

static int no_model(const char *id, char *err, size_t errlen)
{
    if (err != NULL && errlen > 0) snprintf(err, errlen, "model_id '%s' does not exist.", id);
    return KSM_ENOMODEL;
}

void ksm_service_explain(const ksm_service *s, int rc, char *err, size_t errlen)
{
    if (err == NULL || errlen == 0) return;
    if (rc == KSM_EMAXMODELS && s->cfg.max_models != 0) {
        snprintf(err, errlen, "The daemon already holds max-models = %u models; delete one first.",
                 s->cfg.max_models);
    } else if (rc == KSM_EMAXSEEDS && s->cfg.max_seeds_per_model != 0) {
        /* The engine's sentence names its field; the daemon's names its option. */
        char *p = strstr(err, "max_seeds_per_model");
        if (p != NULL && (size_t)(p - err) + 40 < errlen)
            snprintf(p, errlen - (size_t)(p - err), "max-seeds-per-model = %u.",
                     s->cfg.max_seeds_per_model);
    } else if (rc == KSM_EDEVMEM && s->cfg.memory_cap != 0) {
        char was[512];
        snprintf(was, sizeof was, "%s", err[0] ? err : ksm_strerror(rc));
        if (!err[0] && was[0] >= 'a' && was[0] <= 'z') was[0] = (char)(was[0] - 'a' + 'A');
        size_t n = strlen(was);
        while (n > 0 && was[n - 1] == '.') was[--n] = '\0';
        snprintf(err, errlen, "%s; memory-cap = %zu bytes per device.", was, s->cfg.memory_cap);
    }
}

// ---- Models ----

/* "model m1 created: cnn host, 3 slots, 5.2M host parameters, on cpu:0 (F32), strict gates". */
static void log_model(ksm_model *m, const char *what)
{
    if (ksm_log_get_level() < KSM_LOG_INFO) return;
    struct ksm_model_info *i = malloc(sizeof *i);
    if (i == NULL || ksm_model_get_info(m, i) != 0) {
        KSM_LOGI("service", "model %s %s", ksm_model_id(m), what);
        free(i);
        return;
    }
    KSM_LOGI("service",
             "model %s %s: %s host, %d slot(s), %" PRIu64 " host parameters, on %s (%s), %s gates",
             i->model_id, what, ksm_topology_name(i->topology), i->n_slots, i->host_params,
             i->device, ksm_dtype_name(i->dtype), i->permissive_gates ? "permissive" : "strict");
    free(i);
}

int ksm_service_model_get(ksm_service *s, const char *id, ksm_model **out, char *err, size_t errlen)
{
    int rc = ksm_engine_model_get(s->engine, id, out);
    if (rc == KSM_ENOMODEL) return no_model(id, err, errlen);
    return rc;
}

int ksm_service_model_create(ksm_service *s, const char *id, const struct ksm_model_spec *spec,
                             ksm_model **out, char *err, size_t errlen)
{
    ksm_model *m = NULL;
    ksm_persist_create_begin(s->persist);
    int rc = ksm_engine_model_create(s->engine, id, spec, &m, err, errlen);
    if (rc == 0 && (rc = ksm_persist_created(s->persist, m, spec, err, errlen)) != 0) {
        ksm_engine_model_delete(s->engine, ksm_model_id(m), NULL);
        ksm_model_unref(m);
        m = NULL;
    }
    ksm_persist_create_end(s->persist);
    if (rc != 0) return rc;
    log_model(m, "created");
    *out = m;
    return 0;
}

int ksm_service_model_delete(ksm_service *s, const char *id, uint64_t *freed_bytes, char *err,
                             size_t errlen)
{
    ksm_persist_model *pm = NULL;
    int rc = ksm_persist_lock(s->persist, id, &pm);
    if (rc != 0) return rc;
    rc = ksm_persist_delete_begin(pm, err, errlen);
    if (rc == 0) {
        rc = ksm_engine_model_delete(s->engine, id, freed_bytes);
        ksm_persist_delete_end(pm, rc == 0);
    }
    ksm_persist_unlock(pm);
    if (rc == KSM_ENOMODEL) return no_model(id, err, errlen);
    if (rc == 0)
        KSM_LOGI("service", "model %s deleted (%" PRIu64 " bytes freed)", id,
                 freed_bytes != NULL ? *freed_bytes : 0);
    return rc;
}

const struct ksm_persist_quarantine *ksm_service_quarantined(ksm_service *s, size_t *n)
{
    return ksm_persist_quarantined(s->persist, n);
}

// ---- The mutation protocol ----

/* What a mutation journals: its slot (NULL/"" = every slot), or a whole new snapshot. */
#define SNAPSHOT ((const char *)1)

struct mutation {
    ksm_persist_model *pm;
};

static int mutation_begin(ksm_service *s, ksm_model *m, struct mutation *mu, char *err,
                          size_t errlen)
{
    int rc = ksm_persist_lock(s->persist, ksm_model_id(m), &mu->pm);
    if (rc != 0) return rc;
    if (!ksm_persist_model_exists(mu->pm)) { /* deleted since it was looked up */
        ksm_persist_unlock(mu->pm);
        return no_model(ksm_model_id(m), err, errlen);
    }
    ksm_event_log_hold();
    return 0;
}

/* rc: the engine call's. The record is written only when it succeeded (a failed call changed
 * nothing); the held events are published once the record is durable, dropped when its write
 * failed (the model was rolled back). */
static int mutation_end(ksm_service *s, struct mutation *mu, ksm_model *m, const char *what, int rc,
                        char *err, size_t errlen)
{
    int wrc = 0;
    if (rc == 0)
        rc = wrc = what == SNAPSHOT ? ksm_persist_log_snapshot(mu->pm, m, err, errlen)
                                    : ksm_persist_log_slots(mu->pm, m, what, err, errlen);
    ksm_event_log_release(s->events, wrc == 0);
    ksm_persist_unlock(mu->pm);
    return rc;
}

/* A mutation that is not journalled (training: durable at checkpoints): its events are
 * published, the lock released. */
static int mutation_end_in_memory(ksm_service *s, struct mutation *mu, int rc)
{
    ksm_event_log_release(s->events, true);
    ksm_persist_unlock(mu->pm);
    return rc;
}

int ksm_service_configure_training(ksm_service *s, ksm_model *m, ksm_training_merge_fn merge,
                                   void *ud, bool reset_optimizer_state,
                                   struct ksm_training_config *out, uint64_t *train_step, char *err,
                                   size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_update_training(m, merge, ud, reset_optimizer_state, out, train_step, err,
                                   errlen);
    return mutation_end_in_memory(s, &mu, rc);
}

int ksm_service_train_step(ksm_service *s, ksm_model *m, const struct ksm_train_args *a,
                           struct ksm_train_result *r, char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_train_step(m, a, r, err, errlen);
    uint64_t every = s->cfg.checkpoint_interval;
    if (rc == 0 && every != 0 && s->persist != NULL && r->train_step % every == 0) {
        char why[1024];
        if (ksm_persist_checkpoint(mu.pm, m, NULL, why, sizeof why) != 0)
            KSM_LOGE("service",
                     "model %s: the checkpoint after train_step %llu (--checkpoint-interval %llu) "
                     "failed: %s",
                     ksm_model_id(m), (unsigned long long)r->train_step, (unsigned long long)every,
                     why);
    }
    return mutation_end_in_memory(s, &mu, rc);
}

int ksm_service_checkpoint(ksm_service *s, ksm_model *m, uint64_t *train_step, char *err,
                           size_t errlen)
{
    if (s->persist == NULL)
        return ksm_errf(err, errlen, KSM_ESTAGE,
                        "kasminad runs with --no-persist: it keeps no state on disk, so there is "
                        "nothing to checkpoint to.");
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_persist_checkpoint(mu.pm, m, train_step, err, errlen);
    return mutation_end_in_memory(s, &mu, rc);
}

int ksm_service_load_weights(ksm_service *s, ksm_model *m, const void *buf, size_t len, bool strict,
                             struct ksm_load_result *res, char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_load_weights(m, buf, len, strict, res, err, errlen);
    rc = mutation_end(s, &mu, m, SNAPSHOT, rc, err, errlen);
    if (rc == 0)
        KSM_LOGI("service",
                 "model %s: weights loaded (%zu bytes, %s): %zu tensors loaded, %zu missing, %zu "
                 "unexpected",
                 ksm_model_id(m), len, strict ? "strict" : "not strict", res->n_loaded,
                 res->n_missing, res->n_unexpected);
    return rc;
}

int ksm_service_move(ksm_service *s, ksm_model *m, const char *device, int dtype, char *err,
                     size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_move(m, device, dtype, err, errlen);
    rc = mutation_end(s, &mu, m, SNAPSHOT, rc, err, errlen);
    if (rc == 0) log_model(m, "moved");
    return rc;
}

int ksm_service_germinate(ksm_service *s, ksm_model *m, const char *slot_id,
                          const struct ksm_germinate_args *a, struct ksm_slot_report *report,
                          char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_germinate(m, slot_id, a, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_advance(ksm_service *s, ksm_model *m, const char *slot_id, enum ksm_stage target,
                        struct ksm_gate_result *gate, struct ksm_slot_report *report, char *err,
                        size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_advance(m, slot_id, target, gate, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_prune(ksm_service *s, ksm_model *m, const char *slot_id, const char *reason,
                      const char *initiator, bool *accepted, struct ksm_slot_report *report,
                      char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_prune(m, slot_id, reason, initiator, accepted, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_schedule_prune(ksm_service *s, ksm_model *m, const char *slot_id, uint32_t steps,
                               enum ksm_alpha_curve curve, bool has_steepness, double steepness,
                               const char *reason, const char *initiator, bool *accepted,
                               struct ksm_slot_report *report, char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_schedule_prune(m, slot_id, steps, curve, has_steepness, steepness, reason,
                                  initiator, accepted, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_set_alpha_target(ksm_service *s, ksm_model *m, const char *slot_id,
                                 double alpha_target, uint32_t steps, enum ksm_alpha_curve curve,
                                 bool has_steepness, double steepness,
                                 enum ksm_alpha_algorithm algorithm, struct ksm_slot_report *report,
                                 char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_set_alpha_target(m, slot_id, alpha_target, steps, curve, has_steepness,
                                    steepness, algorithm, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_set_alpha(ksm_service *s, ksm_model *m, const char *slot_id, double alpha,
                          struct ksm_slot_report *report, char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_set_alpha(m, slot_id, alpha, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_step_epoch(ksm_service *s, ksm_model *m, const char *slot_id,
                           struct ksm_slot_report *reports, size_t cap, size_t *n, char *err,
                           size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_step_epoch(m, slot_id, reports, cap, n, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_record_metrics(ksm_service *s, ksm_model *m, const char *slot_id,
                               const struct ksm_metrics_update *u, struct ksm_slot_report *report,
                               char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_record_metrics(m, slot_id, u, report, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}

int ksm_service_configure_slot(ksm_service *s, ksm_model *m, const char *slot_id,
                               const struct ksm_slot_settings *set, struct ksm_slot_report *reports,
                               size_t cap, size_t *n, char *err, size_t errlen)
{
    struct mutation mu;
    int rc = mutation_begin(s, m, &mu, err, errlen);
    if (rc != 0) return rc;
    rc = ksm_model_configure_slot(m, slot_id, set, reports, cap, n, err, errlen);
    return mutation_end(s, &mu, m, slot_id, rc, err, errlen);
}
