/* Models: construction, the slots' environment callbacks, references and info (kasmina.h).
 * The lifecycle entry points are in model_lifecycle.c, device moves in model_move.c, streams and
 * cache bookkeeping in model_streams.c. */
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

int64_t ksm_now_ns(void)
{
    /* Microseconds: the precision the extra state keeps, so a restored slot reports the same
     * instants as before the restart. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec / 1000 * 1000;
}

static struct ksm_model_slot *ms_of(struct ksm_slot *s)
{
    return (struct ksm_model_slot *)((char *)s - offsetof(struct ksm_model_slot, s));
}

/* ---- slot environment callbacks ---- */

static void env_emit(void *ud, struct ksm_slot *s, struct ksm_lifecycle_event *ev)
{
    ksm_model *m = ud;
    snprintf(ev->model_id, sizeof ev->model_id, "%s", m->id);
    if (ev->slot_id[0] == '\0') snprintf(ev->slot_id, sizeof ev->slot_id, "%s", s->id);
    if (ev->timestamp_ns == 0) ev->timestamp_ns = ksm_now_ns();
    ksm_lifecycle_cb cb = m->engine->event_cb;
    if (cb) cb(m->engine->event_ud, ev);
}

int ksm_model_users(ksm_model *m, ksm_stream **users, int cap)
{
    int n = 0;
    for (int i = 0; i < m->n_streams && n < cap; i++) users[n++] = m->streams[i]->stream;
    return n;
}

void ksm_model_release_params(ksm_model *m, struct ksm_params *ps)
{
    ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
    int n = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
    ksm_params_release(ps, m->alloc, users, n);
}

void ksm_model_drop_probe(ksm_model *m, struct ksm_model_slot *ms)
{
    if (ms->probe) {
        ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
        int n = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
        for (int i = 0; i < n; i++) ksm_alloc_record_stream(m->alloc, ms->probe, users[i]);
        ksm_alloc_free(m->alloc, ms->probe);
        ms->probe = NULL;
        ms->probe_bytes = 0;
        ms->probe_stat.invalidations++;
    }
}

void ksm_model_free_seed(ksm_model *m, struct ksm_model_slot *ms)
{
    ksm_seed *seed = ms->s.seed;
    ksm_train_drop_seed(m, (int)(ms - m->slots));
    if (seed) {
        ksm_model_release_params(m, ksm_seed_params(seed));
        ksm_seed_free(seed);
        ms->s.seed = NULL;
    }
    ksm_model_drop_probe(m, ms);
}

void ksm_model_free_gate(ksm_model *m, struct ksm_model_slot *ms)
{
    ksm_gated_blend *g = ms->s.gate;
    if (g) {
        ksm_model_release_params(m, ksm_gated_blend_params(g));
        ksm_gated_blend_free(g);
        ms->s.gate = NULL;
    }
}

static void env_free_seed(void *ud, struct ksm_slot *s) { ksm_model_free_seed(ud, ms_of(s)); }

static void env_drop_gate(void *ud, struct ksm_slot *s) { ksm_model_free_gate(ud, ms_of(s)); }

static int env_create_gate(void *ud, struct ksm_slot *s, uint32_t total_steps)
{
    ksm_model *m = ud;
    struct ksm_model_slot *ms = ms_of(s);
    if (s->gate != NULL) return 0;
    ksm_gated_blend *g;
    char why[160];
    int rc = ksm_gated_blend_new(s->channels, m->spec.topology, &g, why, sizeof why);
    if (rc < 0) return rc;
    struct ksm_stream_ctx *ctx;
    rc = ksm_model_stream(m, "", &ctx);
    if (rc == 0) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "seed_slots.%s.alpha_schedule.", s->id);
        /* Deterministic from the model seed, the slot and the generation of the request. */
        rc = ksm_params_materialise(ksm_gated_blend_params(g), m->alloc, ctx->stream,
                                    m->spec.init_seed ^ (m->generation * 0x9e3779b97f4a7c15ull),
                                    prefix);
    }
    if (rc < 0) {
        ksm_gated_blend_free(g);
        return rc;
    }
    s->gate = g;
    s->gate_total_steps = total_steps;
    s->gate_current_step = 0;
    (void)ms;
    return 0;
}

static void env_alpha_changed(void *ud, struct ksm_slot *s)
{
    (void)ud;
    struct ksm_model_slot *ms = ms_of(s);
    ms->alpha_gen++;
    ms->alpha_stat.invalidations++;
}

/* ---- construction ---- */

static bool slot_id_syntax(const char *id)
{
    unsigned r, c;
    int n = 0;
    if (id[0] != 'r' || sscanf(id, "r%uc%u%n", &r, &c, &n) != 2 || id[n] != '\0') return false;
    return true;
}

int ksm_model_new_internal(ksm_engine *e, const char *id, const struct ksm_model_spec *spec_in,
                           ksm_model **out, char *err, size_t errlen)
{
    struct ksm_model_spec spec = *spec_in;
    int rc;
    ksm_host *host = NULL;
    if (spec.topology == KSM_TOPOLOGY_CNN) {
        rc = ksm_host_resolve_cnn(&spec.cnn, spec.pool_layers_set, err, errlen);
        if (rc == 0) rc = ksm_host_new_cnn(&spec.cnn, &host, err, errlen);
    } else if (spec.topology == KSM_TOPOLOGY_TRANSFORMER) {
        rc = ksm_host_resolve_transformer(&spec.transformer, err, errlen);
        if (rc == 0) rc = ksm_host_new_transformer(&spec.transformer, &host, err, errlen);
    } else {
        ksm_errf(err, errlen, 0, "topology must be cnn or transformer");
        return KSM_EINVAL;
    }
    if (rc < 0) return rc;
    if (spec.dtype != KSM_DTYPE_F32) {
        ksm_errf(err, errlen, 0, "dtype %s is not supported: models compute in F32",
                 ksm_dtype_name(spec.dtype) ? ksm_dtype_name(spec.dtype) : "?");
        ksm_host_free(host);
        return KSM_EUNSUPPORTED;
    }
    ksm_device *dev = (spec.device && *spec.device) ? ksm_engine_find_device(e, spec.device)
                                                    : ksm_engine_default_device(e);
    if (dev == NULL) {
        ksm_errf(err, errlen, 0, "device \"%s\" does not exist", spec.device);
        ksm_host_free(host);
        return KSM_ENODEVICE;
    }

    /* Slots: validate every id before building anything. */
    int n_inj = ksm_host_injection_count(host);
    bool want[KSM_MAX_SLOTS] = {0};
    if (spec.n_slots < 0 || spec.n_slots > KSM_MAX_SLOTS) {
        ksm_errf(err, errlen, 0, "slots must list at most %d slot ids", KSM_MAX_SLOTS);
        ksm_host_free(host);
        return KSM_EINVAL;
    }
    if (spec.n_slots == 0) {
        for (int i = 0; i < n_inj && i < KSM_MAX_SLOTS; i++) want[i] = true;
    }
    for (int k = 0; k < spec.n_slots; k++) {
        const char *sid = spec.slots[k];
        if (sid == NULL || !slot_id_syntax(sid)) {
            ksm_errf(err, errlen, 0, "slots[%d] \"%s\" is not a slot id of the form r{row}c{col}",
                     k, sid ? sid : "");
            ksm_host_free(host);
            return KSM_EINVAL;
        }
        int idx = -1;
        for (int i = 0; i < n_inj; i++)
            if (strcmp(ksm_host_injection(host, i)->slot_id, sid) == 0) idx = i;
        if (idx < 0 || idx >= KSM_MAX_SLOTS) {
            ksm_errf(err, errlen, 0, "slots[%d] \"%s\" is not an injection point of this host", k,
                     sid);
            ksm_host_free(host);
            return KSM_ENOSLOT;
        }
        if (want[idx]) {
            ksm_errf(err, errlen, 0, "slots[%d] \"%s\" is listed twice", k, sid);
            ksm_host_free(host);
            return KSM_EINVAL;
        }
        want[idx] = true;
    }

    ksm_model *m = calloc(1, sizeof *m);
    if (m == NULL) {
        ksm_host_free(host);
        return KSM_ENOMEM;
    }
    m->engine = e;
    atomic_init(&m->refs, 1);
    snprintf(m->id, sizeof m->id, "%s", id);
    pthread_mutex_init(&m->lock, NULL);
    m->spec = spec;
    m->spec.slots = NULL;
    m->spec.device = NULL;
    m->host = host;
    m->dev = dev;
    m->alloc = ksm_engine_allocator(e, dev);
    m->dtype = KSM_DTYPE_F32;
    m->generation = 1;
    m->env = (struct ksm_slot_env){
        .ud = m,
        .permissive = spec.permissive_gates,
        .auto_forward = spec.auto_forward_gates,
        .topology = spec.topology,
        .emit = env_emit,
        .free_seed = env_free_seed,
        .create_gate = env_create_gate,
        .drop_gate = env_drop_gate,
        .alpha_changed = env_alpha_changed,
    };
    for (int i = 0; i < n_inj && i < KSM_MAX_SLOTS; i++) {
        if (!want[i]) continue;
        const struct ksm_injection *inj = ksm_host_injection(host, i);
        struct ksm_model_slot *ms = &m->slots[m->n_slots++];
        ms->inj = inj;
        ms->alpha_gen = 1;
        ksm_slot_init(&ms->s, inj->slot_id, inj->channels, &m->env);
    }
    /* Execution order: by boundary index. */
    for (int i = 0; i < m->n_slots; i++) m->exec_order[i] = i;
    for (int i = 1; i < m->n_slots; i++)
        for (int j = i; j > 0 && m->slots[m->exec_order[j]].inj->exec_index <
                                     m->slots[m->exec_order[j - 1]].inj->exec_index;
             j--) {
            int t = m->exec_order[j];
            m->exec_order[j] = m->exec_order[j - 1];
            m->exec_order[j - 1] = t;
        }

    struct ksm_stream_ctx *ctx;
    rc = ksm_model_stream(m, "", &ctx);
    if (rc == 0)
        rc = ksm_params_materialise(ksm_host_params(host), m->alloc, ctx->stream, spec.init_seed,
                                    "host.");
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "could not allocate the model on %s: %s", ksm_device_name(dev),
                 ksm_strerror(rc));
        ksm_model_destroy(m);
        return rc;
    }
    ksm_model_touch(m);
    *out = m;
    return 0;
}

void ksm_model_destroy(ksm_model *m)
{
    for (int i = 0; i < m->n_streams; i++) ksm_stream_synchronize(m->streams[i]->stream);
    ksm_train_state_free(m);
    for (int i = 0; i < m->n_slots; i++) {
        ksm_model_free_gate(m, &m->slots[i]);
        ksm_model_free_seed(m, &m->slots[i]);
    }
    if (m->host) {
        ksm_model_release_params(m, ksm_host_params(m->host));
        ksm_host_free(m->host);
    }
    for (int i = 0; i < m->n_streams; i++) ksm_stream_ctx_unref(m->streams[i]);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void ksm_model_ref(ksm_model *m) { atomic_fetch_add(&m->refs, 1); }

void ksm_model_unref(ksm_model *m)
{
    if (m && atomic_fetch_sub(&m->refs, 1) == 1) ksm_model_destroy(m);
}

const char *ksm_model_id(const ksm_model *m) { return m->id; }

uint64_t ksm_model_generation(ksm_model *m)
{
    pthread_mutex_lock(&m->lock);
    uint64_t g = m->generation;
    pthread_mutex_unlock(&m->lock);
    return g;
}

struct ksm_model_slot *ksm_model_find_slot(ksm_model *m, const char *slot_id)
{
    if (slot_id == NULL) return NULL;
    for (int i = 0; i < m->n_slots; i++)
        if (strcmp(m->slots[i].s.id, slot_id) == 0) return &m->slots[i];
    return NULL;
}

static const char *surface_name(enum ksm_surface s)
{
    switch (s) {
    case KSM_SURFACE_PRE_POOL: return "pre_pool";
    case KSM_SURFACE_POST_POOL: return "post_pool";
    default: return "block_end";
    }
}

static uint64_t seed_params_locked(ksm_model *m)
{
    uint64_t n = 0;
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_slot *s = &m->slots[i].s;
        if (s->seed) n += (uint64_t)ksm_params_count(ksm_seed_params(s->seed));
        if (s->gate) n += (uint64_t)ksm_params_count(ksm_gated_blend_params(s->gate));
    }
    return n;
}

static uint64_t resident_locked(ksm_model *m)
{
    uint64_t b = ksm_params_bytes(ksm_host_params(m->host));
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_model_slot *ms = &m->slots[i];
        if (ms->s.seed) b += ksm_params_bytes(ksm_seed_params(ms->s.seed));
        if (ms->s.gate) b += ksm_params_bytes(ksm_gated_blend_params(ms->s.gate));
        if (ms->probe) b += ksm_alloc_block_size(m->alloc, ms->probe);
    }
    for (int i = 0; i < m->n_streams; i++) {
        const struct ksm_stream_ctx *ctx = m->streams[i];
        b += ksm_alloc_block_size(m->alloc, ctx->alpha_dev);
        for (int p = 0; p < ctx->n_plans; p++)
            b += ksm_alloc_block_size(m->alloc, ctx->plans[p].arena);
    }
    return b;
}

int ksm_model_get_info(ksm_model *m, struct ksm_model_info *out)
{
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&m->lock);
    snprintf(out->model_id, sizeof out->model_id, "%s", m->id);
    out->topology = m->spec.topology;
    out->cnn = m->spec.cnn;
    out->transformer = m->spec.transformer;
    snprintf(out->device, sizeof out->device, "%s", ksm_device_name(m->dev));
    out->dtype = m->dtype;
    out->n_slots = m->n_slots;
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_injection *inj = m->slots[i].inj;
        struct ksm_slot_info *si = &out->slots[i];
        snprintf(si->slot_id, sizeof si->slot_id, "%s", inj->slot_id);
        si->row = (uint32_t)inj->row;
        si->col = (uint32_t)inj->col;
        si->channels = (uint32_t)inj->channels;
        si->order = (uint32_t)inj->exec_index;
        si->surface = surface_name(inj->surface);
    }
    out->host_params = (uint64_t)ksm_params_count(ksm_host_params(m->host));
    out->seed_params = seed_params_locked(m);
    out->generation = m->generation;
    out->resident_bytes = resident_locked(m);
    out->train_step = ksm_model_train_step_locked(m);
    out->checkpoint_step = m->checkpoint_step;
    out->permissive_gates = m->spec.permissive_gates;
    out->auto_forward_gates = m->spec.auto_forward_gates;
    pthread_mutex_unlock(&m->lock);
    return 0;
}
