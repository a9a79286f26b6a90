/* Models: the lifecycle entry points (germinate, advance, prune, schedule prune, alpha, epochs,
 * metrics, reports): validate, lock the model, act on the slot, bump the generation
 * (kasmina.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/errors.h"
#include "kasmina/log.h"
#include "kasmina/model_impl.h"
#include "kasmina/ops.h"
#include "kasmina/text.h"

/* ---- lifecycle ---- */

static void report_locked(ksm_model *m, struct ksm_model_slot *ms, struct ksm_slot_report *r)
{
    if (r == NULL) return;
    ksm_slot_report(&ms->s, r);
    r->blueprint_index = r->occupied ? ksm_blueprint_index(r->blueprint_id) : -1;
    r->seed_params = 0;
    if (ms->s.seed) r->seed_params += (uint64_t)ksm_params_count(ksm_seed_params(ms->s.seed));
    if (ms->s.gate)
        r->seed_params += (uint64_t)ksm_params_count(ksm_gated_blend_params(ms->s.gate));
    r->model_generation = m->generation;
}

static int lock_slot(ksm_model *m, const char *slot_id, struct ksm_model_slot **out, char *err,
                     size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    if (m->deleted) {
        pthread_mutex_unlock(&m->lock);
        ksm_errf(err, errlen, 0, "model \"%s\" was deleted", m->id);
        return KSM_ENOMODEL;
    }
    struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
    if (ms == NULL) {
        pthread_mutex_unlock(&m->lock);
        ksm_errf(err, errlen, 0, "slot_id \"%s\" is not a registered slot of model \"%s\"",
                 slot_id ? slot_id : "", m->id);
        return KSM_ENOSLOT;
    }
    *out = ms;
    return 0;
}

static void mutated(ksm_model *m)
{
    m->generation++;
    ksm_model_touch(m);
}

/* Germination smoke test (docs/lifecycle.md step 7): the seed on a cached random probe keeps its
 * shape. */
static int smoke_test(ksm_model *m, struct ksm_model_slot *ms, ksm_seed *seed)
{
    struct ksm_stream_ctx *ctx;
    int rc = ksm_model_stream(m, "", &ctx);
    if (rc < 0) return rc;
    int64_t shape[4];
    int ndim;
    if (m->spec.topology == KSM_TOPOLOGY_CNN) {
        ndim = 4;
        shape[0] = 1, shape[1] = ms->s.channels, shape[2] = 32, shape[3] = 32;
    } else {
        ndim = 3;
        shape[0] = 2, shape[1] = 8, shape[2] = ms->s.channels;
    }
    ksm_tensor x;
    ksm_tensor_init(&x, m->dev, NULL, KSM_DTYPE_F32, ndim, shape);
    size_t nb = ksm_tensor_nbytes(&x);
    if (ms->probe == NULL) {
        ms->probe_stat.misses++;
        float *host = malloc(nb);
        if (host == NULL) return KSM_ENOMEM;
        int64_t n = ksm_tensor_numel(&x);
        for (int64_t i = 0; i < n; i++) /* randn-like: sum of uniforms, deterministic */
            host[i] =
                (float)((ksm_rand_uniform(0x70726f6265ull, (uint64_t)ms->s.channels, (uint64_t)i) -
                         0.5) *
                        3.4641016151377544);
        void *p;
        rc = ksm_alloc_malloc(m->alloc, nb, ctx->stream, &p);
        if (rc == 0) rc = ksm_stream_memcpy_async(ctx->stream, p, host, nb, KSM_COPY_H2D);
        if (rc == 0) rc = ksm_stream_synchronize(ctx->stream);
        free(host);
        if (rc < 0) return rc;
        ms->probe = p;
        ms->probe_bytes = nb;
    } else {
        ms->probe_stat.hits++;
    }
    x.data = ms->probe;

    struct ksm_exec e;
    ksm_tensor y;
    ksm_exec_init(&e, ctx->stream, true, NULL, 0);
    rc = ksm_seed_forward(seed, &e, &x, &y);
    if (rc < 0) return rc;
    void *arena = NULL;
    size_t need = e.high;
    if (need && (rc = ksm_alloc_malloc(m->alloc, need, ctx->stream, &arena)) < 0) return rc;
    ksm_exec_init(&e, ctx->stream, false, arena, need);
    rc = ksm_seed_forward(seed, &e, &x, &y);
    int rc2 = ksm_stream_synchronize(ctx->stream);
    if (arena) ksm_alloc_free(m->alloc, arena);
    if (rc == 0) rc = rc2;
    if (rc == 0 && !ksm_tensor_same_shape(&x, &y)) rc = KSM_ESHAPE;
    return rc;
}

/* The engine's max_seeds_per_model, counted under the model's lock (so two germinations of one
 * model cannot overshoot it, and germinations of different models never wait on each other). */
static int check_seed_limit(ksm_model *m, char *err, size_t errlen)
{
    uint32_t max = m->engine->max_seeds_per_model;
    if (max == 0) return 0;
    uint32_t live = 0;
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_slot *s = &m->slots[i].s;
        live += s->occupied && s->state.stage != KSM_STAGE_PRUNED &&
                s->state.stage != KSM_STAGE_EMBARGOED && s->state.stage != KSM_STAGE_RESETTING;
    }
    if (live < max) return 0;
    ksm_errf(err, errlen, 0, "model '%s' already has %u live seeds; max_seeds_per_model = %u",
             m->id, live, max);
    return KSM_EMAXSEEDS;
}

int ksm_model_germinate(ksm_model *m, const char *slot_id, const struct ksm_germinate_args *a,
                        struct ksm_slot_report *report, char *err, size_t errlen)
{
    if (a == NULL || a->blueprint_id == NULL || a->blueprint_id[0] == '\0') {
        ksm_errf(err, errlen, 0, "blueprint_id is required");
        return KSM_EINVAL;
    }
    struct ksm_model_slot *ms;
    int rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    rc = ksm_slot_germinate_check(&ms->s, a, err, errlen);
    if (rc < 0) goto out;
    if ((rc = check_seed_limit(m, err, errlen)) < 0) goto out;
    const struct ksm_blueprint *bp = ksm_blueprint_find(m->spec.topology, a->blueprint_id);
    if (bp == NULL) {
        const char *const *names;
        int n;
        char list[256] = "";
        ksm_engine_blueprints(m->spec.topology, &names, &n);
        for (int i = 0; i < n; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                     names[i]);
        ksm_errf(err, errlen, 0, "blueprint_id \"%s\" is not a %s blueprint (available: %s)",
                 a->blueprint_id, ksm_topology_name(m->spec.topology), list);
        rc = KSM_ENOBLUEPRINT;
        goto out;
    }
    ksm_seed *seed;
    rc = ksm_seed_new(bp, ms->s.channels, &seed, err, errlen);
    if (rc < 0) goto out;
    if (a->alpha_algorithm == KSM_ALGO_MULTIPLY) ksm_seed_zero_final_layer(seed);
    struct ksm_stream_ctx *ctx;
    rc = ksm_model_stream(m, "", &ctx);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "seed_slots.%s.seed.", ms->s.id);
    if (rc == 0)
        rc = ksm_params_materialise(ksm_seed_params(seed), m->alloc, ctx->stream, a->init_seed,
                                    prefix);
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "could not allocate seed %s on %s: %s", a->blueprint_id,
                 ksm_device_name(m->dev), ksm_strerror(rc));
        ksm_seed_free(seed);
        goto out;
    }
    rc = smoke_test(m, ms, seed);
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "seed %s failed the germination shape test: %s", a->blueprint_id,
                 ksm_strerror(rc));
        ksm_model_release_params(m, ksm_seed_params(seed));
        ksm_seed_free(seed);
        goto out;
    }
    rc = ksm_slot_germinate_commit(
        &ms->s, a, seed, (uint64_t)ksm_params_count(ksm_seed_params(seed)),
        (uint64_t)ksm_params_count(ksm_host_params(m->host)), ksm_now_ns());
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "germination of %s in slot %s failed: %s", a->blueprint_id,
                 ms->s.id, ksm_strerror(rc));
        ksm_model_release_params(m, ksm_seed_params(seed));
        ksm_seed_free(seed);
        goto out;
    }
    ksm_train_drop_seed(m, (int)(ms - m->slots)); /* a new seed gets a fresh optimizer */
    mutated(m);
out:
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_advance(ksm_model *m, const char *slot_id, enum ksm_stage target,
                      struct ksm_gate_result *gate, struct ksm_slot_report *report, char *err,
                      size_t errlen)
{
    struct ksm_model_slot *ms;
    struct ksm_gate_result g;
    int rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    memset(&g, 0, sizeof g);
    rc = ksm_slot_advance(&ms->s, target, &g, ksm_now_ns(), err, errlen);
    /* esper pops the seed's optimizer when it fossilizes; the next step makes a fresh one */
    if (rc == 0 && g.passed && ms->s.state.stage == KSM_STAGE_FOSSILIZED)
        ksm_train_drop_seed(m, (int)(ms - m->slots));
    if (rc == 0 && g.passed) mutated(m);
    if (gate) *gate = g;
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static const char *or_default(const char *s, const char *d) { return s && *s ? s : d; }

/* A prune's reason and initiator are stored, journalled and sent in events: strict UTF-8 that
 * fits its buffer (kasmina/text.h), checked before anything changes. */
static int check_prune_text(const char *reason, const char *initiator, char *err, size_t errlen)
{
    const char *v[2] = {reason ? reason : "", initiator ? initiator : ""};
    const char *name[2] = {"reason", "initiator"};
    const size_t cap[2] = {KSM_REASON_MAX, KSM_NAME_MAX};
    for (int i = 0; i < 2; i++) {
        size_t n = strlen(v[i]), bad;
        if (n >= cap[i]) {
            ksm_errf(err, errlen, 0, "%s is %zu bytes long; at most %zu are allowed", name[i], n,
                     cap[i] - 1);
            return KSM_EINVAL;
        }
        if (!ksm_utf8_valid(v[i], n, &bad)) {
            ksm_errf(err, errlen, 0, "%s is not valid UTF-8 (byte %zu)", name[i], bad);
            return KSM_EINVAL;
        }
    }
    return 0;
}

int ksm_model_prune(ksm_model *m, const char *slot_id, const char *reason, const char *initiator,
                    bool *accepted, struct ksm_slot_report *report, char *err, size_t errlen)
{
    int rc = check_prune_text(reason, initiator, err, errlen);
    if (rc < 0) return rc;
    struct ksm_model_slot *ms;
    rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    bool acc = false;
    rc = ksm_slot_prune(&ms->s, reason ? reason : "", or_default(initiator, "policy"), &acc,
                        ksm_now_ns());
    if (rc == 0 && acc) mutated(m);
    if (accepted) *accepted = acc;
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

static int check_steepness(bool has, double *st, char *err, size_t errlen)
{
    if (!has) {
        *st = 12.0;
        return 0;
    }
    if (!isfinite(*st) || *st <= 0) {
        ksm_errf(err, errlen, 0, "steepness must be a positive finite number, got %g", *st);
        return KSM_EINVAL;
    }
    return 0;
}

static int check_curve(enum ksm_alpha_curve c, char *err, size_t errlen)
{
    if ((int)c < 0 || (int)c > KSM_CURVE_SIGMOID) {
        ksm_errf(err, errlen, 0, "curve must be LINEAR, COSINE or SIGMOID, got %d", (int)c);
        return KSM_EINVAL;
    }
    return 0;
}

#define KSM_MAX_STEPS 100000

int ksm_model_schedule_prune(ksm_model *m, const char *slot_id, uint32_t steps,
                             enum ksm_alpha_curve curve, bool has_steepness, double steepness,
                             const char *reason, const char *initiator, bool *accepted,
                             struct ksm_slot_report *report, char *err, size_t errlen)
{
    int rc = check_steepness(has_steepness, &steepness, err, errlen);
    if (rc == 0) rc = check_curve(curve, err, errlen);
    if (rc == 0) rc = check_prune_text(reason, initiator, err, errlen);
    if (rc == 0 && steps > KSM_MAX_STEPS) {
        ksm_errf(err, errlen, 0, "steps must be at most %d, got %u", KSM_MAX_STEPS, steps);
        rc = KSM_EINVAL;
    }
    if (rc < 0) return rc;
    struct ksm_model_slot *ms;
    rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    bool acc = false;
    rc = ksm_slot_schedule_prune(&ms->s, steps, curve, steepness, reason ? reason : "",
                                 initiator ? initiator : "", &acc, ksm_now_ns(), err, errlen);
    if (rc == 0 && acc) mutated(m);
    if (accepted) *accepted = acc;
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_set_alpha_target(ksm_model *m, const char *slot_id, double alpha_target,
                               uint32_t steps, enum ksm_alpha_curve curve, bool has_steepness,
                               double steepness, enum ksm_alpha_algorithm algorithm,
                               struct ksm_slot_report *report, char *err, size_t errlen)
{
    int rc = check_steepness(has_steepness, &steepness, err, errlen);
    if (rc == 0) rc = check_curve(curve, err, errlen);
    if (rc == 0 && steps > KSM_MAX_STEPS) {
        ksm_errf(err, errlen, 0, "steps must be at most %d, got %u", KSM_MAX_STEPS, steps);
        rc = KSM_EINVAL;
    }
    if (rc == 0 && ((int)algorithm < 0 || (int)algorithm > KSM_ALGO_GATE)) {
        ksm_errf(err, errlen, 0, "alpha_algorithm must be ADD, MULTIPLY or GATE, got %d",
                 (int)algorithm);
        rc = KSM_EINVAL;
    }
    if (rc < 0) return rc;
    struct ksm_model_slot *ms;
    rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    rc = ksm_slot_set_alpha_target(&ms->s, alpha_target, steps, curve, steepness, algorithm,
                                   ksm_now_ns(), err, errlen);
    if (rc == 0) mutated(m);
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_set_alpha(ksm_model *m, const char *slot_id, double alpha,
                        struct ksm_slot_report *report, char *err, size_t errlen)
{
    if (isnan(alpha)) {
        ksm_errf(err, errlen, 0, "alpha must be a number in [0, 1], got NaN");
        return KSM_EINVAL;
    }
    struct ksm_model_slot *ms;
    int rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    uint64_t before = ms->alpha_gen;
    rc = ksm_slot_set_alpha(&ms->s, alpha, err, errlen);
    if (rc == 0 && ms->alpha_gen != before)
        m->generation++; /* alpha is not topology: plans stay valid */
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_step_epoch(ksm_model *m, const char *slot_id, struct ksm_slot_report *reports,
                         size_t cap, size_t *n, char *err, size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    size_t k = 0;
    bool ticked[KSM_MAX_SLOTS] = {0};
    if (m->deleted) {
        /* A caller that looked the model up before a DeleteModel: nothing changes. */
        ksm_errf(err, errlen, 0, "model \"%s\" was deleted", m->id);
        rc = KSM_ENOMODEL;
        goto out;
    }
    if (slot_id && *slot_id) {
        struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
        if (ms == NULL) {
            ksm_errf(err, errlen, 0, "slot_id \"%s\" is not a registered slot of model \"%s\"",
                     slot_id, m->id);
            rc = KSM_ENOSLOT;
            goto out;
        }
        ticked[ms - m->slots] = true;
    } else {
        for (int i = 0; i < m->n_slots; i++) ticked[i] = true;
    }
    bool any = false;
    for (int o = 0; o < m->n_slots; o++) {
        int i = m->exec_order[o];
        if (!ticked[i]) continue;
        any |= m->slots[i].s.occupied;
        int r = ksm_slot_step_epoch(&m->slots[i].s, ksm_now_ns());
        if (r < 0 && rc == 0) {
            rc = r;
            ksm_errf(err, errlen, 0, "step_epoch of slot %s failed: %s", m->slots[i].s.id,
                     ksm_strerror(r));
        }
    }
    if (any) mutated(m);
    for (int i = 0; i < m->n_slots; i++) {
        if (!ticked[i]) continue;
        if (reports && k < cap) report_locked(m, &m->slots[i], &reports[k]);
        k++;
    }
out:
    if (n) *n = k;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_record_metrics(ksm_model *m, const char *slot_id, const struct ksm_metrics_update *u,
                             struct ksm_slot_report *report, char *err, size_t errlen)
{
    if (u == NULL) {
        ksm_errf(err, errlen, 0, "a metrics update is required");
        return KSM_EINVAL;
    }
    struct ksm_model_slot *ms;
    int rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    double beta = ksm_model_grad_ratio_ema_beta_locked(m);
    rc = ksm_slot_record_metrics_beta(&ms->s, u, beta, err, errlen);
    if (rc == 0) m->generation++;
    report_locked(m, ms, report);
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_configure_slot(ksm_model *m, const char *slot_id, const struct ksm_slot_settings *set,
                             struct ksm_slot_report *reports, size_t cap, size_t *n, char *err,
                             size_t errlen)
{
    if (n) *n = 0;
    if (set == NULL) return ksm_errf(err, errlen, KSM_EINVAL, "slot settings are required");
    const unsigned gates = (1u << KSM_GATE_G1) | (1u << KSM_GATE_G2) | (1u << KSM_GATE_G3);
    if (set->set_auto_forward_gates && (set->auto_forward_gates & ~gates) != 0)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "auto_forward_gates may only hold G1, G2 and G3 (esper auto-advances "
                        "through no other gate)");
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    size_t k = 0;
    bool pick[KSM_MAX_SLOTS] = {0};
    if (m->deleted) {
        ksm_errf(err, errlen, 0, "model \"%s\" was deleted", m->id);
        rc = KSM_ENOMODEL;
        goto out;
    }
    if (slot_id && *slot_id) {
        struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
        if (ms == NULL) {
            ksm_errf(err, errlen, 0, "slot_id \"%s\" is not a registered slot of model \"%s\"",
                     slot_id, m->id);
            rc = KSM_ENOSLOT;
            goto out;
        }
        pick[ms - m->slots] = true;
    } else {
        for (int i = 0; i < m->n_slots; i++) pick[i] = true;
    }
    for (int i = 0; i < m->n_slots; i++) {
        if (!pick[i]) continue;
        if (set->set_isolate_gradients) m->slots[i].s.isolate_gradients = set->isolate_gradients;
        if (set->set_auto_forward_gates) m->slots[i].s.auto_forward = set->auto_forward_gates;
    }
    /* Settings are not topology: plans stay valid. */
    if (set->set_isolate_gradients || set->set_auto_forward_gates) m->generation++;
    for (int i = 0; i < m->n_slots; i++) {
        if (!pick[i]) continue;
        if (reports && k < cap) report_locked(m, &m->slots[i], &reports[k]);
        k++;
    }
out:
    if (n) *n = k;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

int ksm_model_slot_reports(ksm_model *m, const char *slot_id, struct ksm_slot_report *reports,
                           size_t cap, size_t *n, char *err, size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    size_t k = 0;
    int rc = 0;
    if (slot_id && *slot_id) {
        struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
        if (ms == NULL) {
            ksm_errf(err, errlen, 0, "slot_id \"%s\" is not a registered slot of model \"%s\"",
                     slot_id, m->id);
            rc = KSM_ENOSLOT;
        } else {
            if (reports && cap > 0) report_locked(m, ms, &reports[0]);
            k = 1;
        }
    } else {
        for (int i = 0; i < m->n_slots; i++) {
            if (reports && k < cap) report_locked(m, &m->slots[i], &reports[k]);
            k++;
        }
    }
    if (n) *n = k;
    pthread_mutex_unlock(&m->lock);
    return rc;
}
