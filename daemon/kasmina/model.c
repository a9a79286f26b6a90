/* Models: host + registered slots, lifecycle entry points, streams, caches (kasmina.h). */
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
    ksm_event_cb cb = m->engine->event_cb;
    if (cb) cb(m->engine->event_ud, ev);
}

int ksm_model_users(ksm_model *m, ksm_stream **users, int cap)
{
    int n = 0;
    for (int i = 0; i < m->n_streams && n < cap; i++) users[n++] = m->streams[i]->stream;
    return n;
}

static void release_params(ksm_model *m, struct ksm_params *ps)
{
    ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
    int n = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
    ksm_params_release(ps, m->alloc, users, n);
}

static void drop_probe(ksm_model *m, struct ksm_model_slot *ms)
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
    if (seed) {
        release_params(m, ksm_seed_params(seed));
        ksm_seed_free(seed);
        ms->s.seed = NULL;
    }
    drop_probe(m, ms);
}

void ksm_model_free_gate(ksm_model *m, struct ksm_model_slot *ms)
{
    ksm_gate *g = ms->s.gate;
    if (g) {
        release_params(m, ksm_gate_params(g));
        ksm_gate_free(g);
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
    ksm_gate *g;
    char why[160];
    int rc = ksm_gate_new(s->channels, m->spec.topology, &g, why, sizeof why);
    if (rc < 0) return rc;
    struct ksm_stream_ctx *ctx;
    rc = ksm_model_stream(m, "", &ctx);
    if (rc == 0) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "seed_slots.%s.alpha_schedule.", s->id);
        /* Deterministic from the model seed, the slot and the generation of the request. */
        rc = ksm_params_materialise(ksm_gate_params(g), m->alloc, ctx->stream,
                                    m->spec.init_seed ^ (m->generation * 0x9e3779b97f4a7c15ull),
                                    prefix);
    }
    if (rc < 0) {
        ksm_gate_free(g);
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

/* ---- streams, caches ---- */

void ksm_stream_ctx_unref(struct ksm_stream_ctx *ctx)
{
    if (atomic_fetch_sub(&ctx->refs, 1) != 1) return;
    ksm_stream_synchronize(ctx->stream);
    for (int i = 0; i < ctx->n_plans; i++)
        if (ctx->plans[i].arena) ksm_alloc_free(ctx->alloc, ctx->plans[i].arena);
    if (ctx->alpha_dev) ksm_alloc_free(ctx->alloc, ctx->alpha_dev);
    ksm_alloc_release_stream(ctx->alloc, ctx->stream);
    ksm_stream_free(ctx->stream);
    free(ctx);
}

static void stream_ctx_free(ksm_model *m, struct ksm_stream_ctx *ctx)
{
    (void)m;
    ksm_stream_ctx_unref(ctx);
}

static int stream_ctx_new(ksm_model *m, const char *key, ksm_stream *adopt,
                          struct ksm_stream_ctx **out);

int ksm_model_stream(ksm_model *m, const char *key, struct ksm_stream_ctx **out)
{
    return stream_ctx_new(m, key, NULL, out);
}

/* Finds the stream of key, or creates it (on adopt when given, else a new stream). */
static int stream_ctx_new(ksm_model *m, const char *key, ksm_stream *adopt,
                          struct ksm_stream_ctx **out)
{
    if (key == NULL) key = "";
    for (int i = 0; i < m->n_streams; i++) {
        if (strcmp(m->streams[i]->key, key) == 0) {
            *out = m->streams[i];
            return 0;
        }
    }
    if (strlen(key) > KSM_STREAM_KEY_MAX) return KSM_EINVAL;
    if (m->n_streams == KSM_MAX_STREAMS_PER_MODEL) return KSM_ELIMIT;
    struct ksm_stream_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) return KSM_ENOMEM;
    snprintf(ctx->key, sizeof ctx->key, "%s", key);
    atomic_init(&ctx->refs, 1);
    ctx->alloc = m->alloc;
    int rc = 0;
    if (adopt)
        ctx->stream = adopt;
    else
        rc = ksm_stream_new(m->dev, &ctx->stream);
    if (rc < 0) {
        free(ctx);
        return rc;
    }
    void *p;
    rc = ksm_alloc_malloc(m->alloc, KSM_MAX_SLOTS * sizeof(float), ctx->stream, &p);
    if (rc < 0) {
        if (!adopt) ksm_stream_free(ctx->stream);
        free(ctx);
        return rc;
    }
    ctx->alpha_dev = p;
    m->streams[m->n_streams++] = ctx;
    *out = ctx;
    return 0;
}

void ksm_model_invalidate_caches(ksm_model *m)
{
    for (int i = 0; i < m->n_streams; i++) {
        struct ksm_stream_ctx *ctx = m->streams[i];
        m->plan_stat.invalidations += (uint64_t)ctx->n_plans;
        for (int s = 0; s < m->n_slots; s++)
            if (ctx->alpha_gen[s] != 0) m->slots[s].alpha_stat.invalidations++;
        stream_ctx_free(m, ctx);
    }
    m->n_streams = 0;
    for (int s = 0; s < m->n_slots; s++) {
        struct ksm_model_slot *ms = &m->slots[s];
        drop_probe(m, ms);
        if (ms->s.seed) ksm_seed_invalidate_caches(ms->s.seed);
    }
}

static uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}

void ksm_model_touch(ksm_model *m)
{
    uint64_t h = 0x6b736d;
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_slot *s = &m->slots[i].s;
        h = mix(h, (uint64_t)(uintptr_t)s->seed);
        h = mix(h, (uint64_t)(uintptr_t)s->gate);
        h = mix(h, ksm_slot_runs_seed(s));
        h = mix(h, s->occupied ? (uint64_t)s->st.alpha_algorithm : 0);
    }
    if (h != m->topo_sig) {
        m->topo_sig = h;
        m->topo_gen++;
    }
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
        KSM_ERR(err, errlen, "topology must be cnn or transformer");
        return KSM_EINVAL;
    }
    if (rc < 0) return rc;
    if (spec.dtype != KSM_DTYPE_F32) {
        KSM_ERR(err, errlen, "dtype %s is not supported: models compute in F32",
                ksm_dtype_name(spec.dtype) ? ksm_dtype_name(spec.dtype) : "?");
        ksm_host_free(host);
        return KSM_EUNSUPPORTED;
    }
    ksm_device *dev = (spec.device && *spec.device) ? ksm_engine_find_device(e, spec.device)
                                                    : ksm_engine_default_device(e);
    if (dev == NULL) {
        KSM_ERR(err, errlen, "device \"%s\" does not exist", spec.device);
        ksm_host_free(host);
        return KSM_ENODEVICE;
    }

    /* Slots: validate every id before building anything. */
    int n_inj = ksm_host_injection_count(host);
    bool want[KSM_MAX_SLOTS] = {0};
    if (spec.n_slots < 0 || spec.n_slots > KSM_MAX_SLOTS) {
        KSM_ERR(err, errlen, "slots must list at most %d slot ids", KSM_MAX_SLOTS);
        ksm_host_free(host);
        return KSM_EINVAL;
    }
    if (spec.n_slots == 0) {
        for (int i = 0; i < n_inj && i < KSM_MAX_SLOTS; i++) want[i] = true;
    }
    for (int k = 0; k < spec.n_slots; k++) {
        const char *sid = spec.slots[k];
        if (sid == NULL || !slot_id_syntax(sid)) {
            KSM_ERR(err, errlen, "slots[%d] \"%s\" is not a slot id of the form r{row}c{col}", k,
                    sid ? sid : "");
            ksm_host_free(host);
            return KSM_EINVAL;
        }
        int idx = -1;
        for (int i = 0; i < n_inj; i++)
            if (strcmp(ksm_host_injection(host, i)->slot_id, sid) == 0) idx = i;
        if (idx < 0 || idx >= KSM_MAX_SLOTS) {
            KSM_ERR(err, errlen, "slots[%d] \"%s\" is not an injection point of this host", k, sid);
            ksm_host_free(host);
            return KSM_ENOSLOT;
        }
        if (want[idx]) {
            KSM_ERR(err, errlen, "slots[%d] \"%s\" is listed twice", k, sid);
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
        KSM_ERR(err, errlen, "could not allocate the model on %s: %s", ksm_device_name(dev),
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
    for (int i = 0; i < m->n_slots; i++) {
        ksm_model_free_gate(m, &m->slots[i]);
        ksm_model_free_seed(m, &m->slots[i]);
    }
    if (m->host) {
        release_params(m, ksm_host_params(m->host));
        ksm_host_free(m->host);
    }
    for (int i = 0; i < m->n_streams; i++) stream_ctx_free(m, m->streams[i]);
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
        if (s->gate) n += (uint64_t)ksm_params_count(ksm_gate_params(s->gate));
    }
    return n;
}

static uint64_t resident_locked(ksm_model *m)
{
    uint64_t b = ksm_params_bytes(ksm_host_params(m->host));
    for (int i = 0; i < m->n_slots; i++) {
        const struct ksm_model_slot *ms = &m->slots[i];
        if (ms->s.seed) b += ksm_params_bytes(ksm_seed_params(ms->s.seed));
        if (ms->s.gate) b += ksm_params_bytes(ksm_gate_params(ms->s.gate));
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
    out->permissive_gates = m->spec.permissive_gates;
    out->auto_forward_gates = m->spec.auto_forward_gates;
    pthread_mutex_unlock(&m->lock);
    return 0;
}

/* ---- lifecycle ---- */

static void report_locked(ksm_model *m, struct ksm_model_slot *ms, struct ksm_slot_report *r)
{
    if (r == NULL) return;
    ksm_slot_report(&ms->s, r);
    r->blueprint_index = r->occupied ? ksm_blueprint_index(r->blueprint_id) : -1;
    r->seed_params = 0;
    if (ms->s.seed) r->seed_params += (uint64_t)ksm_params_count(ksm_seed_params(ms->s.seed));
    if (ms->s.gate) r->seed_params += (uint64_t)ksm_params_count(ksm_gate_params(ms->s.gate));
    r->model_generation = m->generation;
}

static int lock_slot(ksm_model *m, const char *slot_id, struct ksm_model_slot **out, char *err,
                     size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    if (m->deleted) {
        pthread_mutex_unlock(&m->lock);
        KSM_ERR(err, errlen, "model \"%s\" was deleted", m->id);
        return KSM_ENOMODEL;
    }
    struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
    if (ms == NULL) {
        pthread_mutex_unlock(&m->lock);
        KSM_ERR(err, errlen, "slot_id \"%s\" is not a registered slot of model \"%s\"",
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

/* Germination smoke test (§1.4 step 7): the seed on a cached random probe keeps its shape. */
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

int ksm_model_germinate(ksm_model *m, const char *slot_id, const struct ksm_germinate_args *a,
                        struct ksm_slot_report *report, char *err, size_t errlen)
{
    if (a == NULL || a->blueprint_id == NULL || a->blueprint_id[0] == '\0') {
        KSM_ERR(err, errlen, "blueprint_id is required");
        return KSM_EINVAL;
    }
    struct ksm_model_slot *ms;
    int rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    rc = ksm_slot_germinate_check(&ms->s, a, err, errlen);
    if (rc < 0) goto out;
    const struct ksm_blueprint *bp = ksm_blueprint_find(m->spec.topology, a->blueprint_id);
    if (bp == NULL) {
        const char *const *names;
        int n;
        char list[256] = "";
        ksm_engine_blueprints(m->spec.topology, &names, &n);
        for (int i = 0; i < n; i++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                     names[i]);
        KSM_ERR(err, errlen, "blueprint_id \"%s\" is not a %s blueprint (available: %s)",
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
        KSM_ERR(err, errlen, "could not allocate seed %s on %s: %s", a->blueprint_id,
                ksm_device_name(m->dev), ksm_strerror(rc));
        ksm_seed_free(seed);
        goto out;
    }
    rc = smoke_test(m, ms, seed);
    if (rc < 0) {
        KSM_ERR(err, errlen, "seed %s failed the germination shape test: %s", a->blueprint_id,
                ksm_strerror(rc));
        release_params(m, ksm_seed_params(seed));
        ksm_seed_free(seed);
        goto out;
    }
    rc = ksm_slot_germinate_commit(
        &ms->s, a, seed, (uint64_t)ksm_params_count(ksm_seed_params(seed)),
        (uint64_t)ksm_params_count(ksm_host_params(m->host)), ksm_now_ns());
    if (rc < 0) {
        KSM_ERR(err, errlen, "germination of %s in slot %s failed: %s", a->blueprint_id, ms->s.id,
                ksm_strerror(rc));
        release_params(m, ksm_seed_params(seed));
        ksm_seed_free(seed);
        goto out;
    }
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
            KSM_ERR(err, errlen, "%s is %zu bytes long; at most %zu are allowed", name[i], n,
                    cap[i] - 1);
            return KSM_EINVAL;
        }
        if (!ksm_utf8_valid(v[i], n, &bad)) {
            KSM_ERR(err, errlen, "%s is not valid UTF-8 (byte %zu)", name[i], bad);
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
        KSM_ERR(err, errlen, "steepness must be a positive finite number, got %g", *st);
        return KSM_EINVAL;
    }
    return 0;
}

static int check_curve(enum ksm_alpha_curve c, char *err, size_t errlen)
{
    if ((int)c < 0 || (int)c > KSM_CURVE_SIGMOID) {
        KSM_ERR(err, errlen, "curve must be LINEAR, COSINE or SIGMOID, got %d", (int)c);
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
        KSM_ERR(err, errlen, "steps must be at most %d, got %u", KSM_MAX_STEPS, steps);
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
        KSM_ERR(err, errlen, "steps must be at most %d, got %u", KSM_MAX_STEPS, steps);
        rc = KSM_EINVAL;
    }
    if (rc == 0 && ((int)algorithm < 0 || (int)algorithm > KSM_ALGO_GATE)) {
        KSM_ERR(err, errlen, "alpha_algorithm must be ADD, MULTIPLY or GATE, got %d",
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
        KSM_ERR(err, errlen, "alpha must be a number in [0, 1], got NaN");
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
        KSM_ERR(err, errlen, "model \"%s\" was deleted", m->id);
        rc = KSM_ENOMODEL;
        goto out;
    }
    if (slot_id && *slot_id) {
        struct ksm_model_slot *ms = ksm_model_find_slot(m, slot_id);
        if (ms == NULL) {
            KSM_ERR(err, errlen, "slot_id \"%s\" is not a registered slot of model \"%s\"", slot_id,
                    m->id);
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
            KSM_ERR(err, errlen, "step_epoch of slot %s failed: %s", m->slots[i].s.id,
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
        KSM_ERR(err, errlen, "a metrics update is required");
        return KSM_EINVAL;
    }
    struct ksm_model_slot *ms;
    int rc = lock_slot(m, slot_id, &ms, err, errlen);
    if (rc < 0) return rc;
    rc = ksm_slot_record_metrics(&ms->s, u, err, errlen);
    if (rc == 0) m->generation++;
    report_locked(m, ms, report);
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
            KSM_ERR(err, errlen, "slot_id \"%s\" is not a registered slot of model \"%s\"", slot_id,
                    m->id);
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

/* ---- move ---- */

static int copy_params_to(ksm_model *m, struct ksm_params *ps, ksm_device *dst,
                          ksm_allocator *dalloc, ksm_stream *ds, ksm_stream *ss, void ***newptrs)
{
    /* D2H through a host staging buffer, H2D on the destination (works across backends). */
    void **np = calloc((size_t)(ps->n ? ps->n : 1), sizeof *np);
    if (np == NULL) return KSM_ENOMEM;
    int rc = 0;
    for (int i = 0; i < ps->n && rc == 0; i++) {
        struct ksm_param *p = &ps->p[i];
        if (p->tied_to >= 0 || p->t.data == NULL) continue;
        size_t nb = ksm_tensor_nbytes(&p->t);
        void *host = malloc(nb ? nb : 1);
        if (host == NULL) {
            rc = KSM_ENOMEM;
            break;
        }
        rc = ksm_alloc_malloc(dalloc, nb ? nb : 1, ds, &np[i]);
        if (rc == 0 && nb) rc = ksm_stream_memcpy_async(ss, host, p->t.data, nb, KSM_COPY_D2H);
        if (rc == 0) rc = ksm_stream_synchronize(ss);
        if (rc == 0 && nb) rc = ksm_stream_memcpy_async(ds, np[i], host, nb, KSM_COPY_H2D);
        if (rc == 0) rc = ksm_stream_synchronize(ds);
        free(host);
    }
    if (rc < 0) {
        for (int i = 0; i < ps->n; i++)
            if (np[i]) ksm_alloc_free(dalloc, np[i]);
        free(np);
        return rc;
    }
    (void)dst;
    (void)m;
    *newptrs = np;
    return 0;
}

static void adopt_params(ksm_model *m, struct ksm_params *ps, void **np, ksm_device *dst)
{
    release_params(m, ps);
    for (int i = 0; i < ps->n; i++) {
        if (ps->p[i].tied_to >= 0) continue;
        ps->p[i].t.data = np[i];
        ps->p[i].t.dev = dst;
    }
    for (int i = 0; i < ps->n; i++)
        if (ps->p[i].tied_to >= 0) ps->p[i].t = ps->p[ps->p[i].tied_to].t;
    free(np);
}

int ksm_model_move(ksm_model *m, const char *device, int dtype, char *err, size_t errlen)
{
    if (dtype != -1 && dtype != KSM_DTYPE_F32) {
        const char *dn = ksm_dtype_name((enum ksm_dtype)dtype);
        KSM_ERR(err, errlen, "dtype %s is not supported: models compute in F32", dn ? dn : "?");
        return (dtype >= 0 && dtype < KSM_DTYPE_COUNT) ? KSM_EUNSUPPORTED : KSM_EINVAL;
    }
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    ksm_device *dst = m->dev;
    if (m->deleted) {
        KSM_ERR(err, errlen, "model \"%s\" was deleted", m->id);
        rc = KSM_ENOMODEL;
        goto out;
    }
    if (device && *device) {
        dst = ksm_engine_find_device(m->engine, device);
        if (dst == NULL) {
            KSM_ERR(err, errlen, "device \"%s\" does not exist", device);
            rc = KSM_ENODEVICE;
            goto out;
        }
    }
    if (dst == m->dev) goto out;
    ksm_allocator *dalloc = ksm_engine_allocator(m->engine, dst);
    ksm_stream *ds;
    rc = ksm_stream_new(dst, &ds);
    if (rc < 0) goto out;
    struct ksm_stream_ctx *sctx;
    rc = ksm_model_stream(m, "", &sctx);
    if (rc < 0) {
        ksm_stream_free(ds);
        goto out;
    }
    for (int i = 0; i < m->n_streams; i++) ksm_stream_synchronize(m->streams[i]->stream);
    /* Copy everything first; adopt only when every copy succeeded (atomic). */
    struct ksm_params *sets[2 * KSM_MAX_SLOTS + 1];
    void **np[2 * KSM_MAX_SLOTS + 1];
    int ns = 0;
    sets[ns++] = ksm_host_params(m->host);
    for (int i = 0; i < m->n_slots; i++) {
        if (m->slots[i].s.seed) sets[ns++] = ksm_seed_params(m->slots[i].s.seed);
        if (m->slots[i].s.gate) sets[ns++] = ksm_gate_params(m->slots[i].s.gate);
    }
    int k;
    for (k = 0; k < ns; k++) {
        rc = copy_params_to(m, sets[k], dst, dalloc, ds, sctx->stream, &np[k]);
        if (rc < 0) break;
    }
    if (rc < 0) {
        for (int j = 0; j < k; j++) {
            for (int i = 0; i < sets[j]->n; i++)
                if (np[j][i]) ksm_alloc_free(dalloc, np[j][i]);
            free(np[j]);
        }
        ksm_stream_synchronize(ds);
        ksm_stream_free(ds);
        KSM_ERR(err, errlen, "could not move model \"%s\" to %s: %s", m->id, ksm_device_name(dst),
                ksm_strerror(rc));
        goto out;
    }
    ksm_stream_synchronize(ds);
    for (k = 0; k < ns; k++) adopt_params(m, sets[k], np[k], dst);
    ksm_model_invalidate_caches(m);
    m->dev = dst;
    m->alloc = dalloc;
    /* The new blocks belong to ds: it becomes the model's default stream on dst. */
    struct ksm_stream_ctx *nctx;
    if (stream_ctx_new(m, "", ds, &nctx) < 0)
        ksm_stream_free(ds); /* the default stream is re-created on demand */
    m->topo_gen++;
    m->generation++;
out:
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* ---- statistics ---- */

static void put_counter(struct ksm_cache_counters *out, size_t cap, size_t *k, const char *cache,
                        const char *slot, const struct ksm_cache_stat *st, uint64_t entries,
                        uint64_t capacity, uint64_t bytes)
{
    if (out && *k < cap) {
        struct ksm_cache_counters *c = &out[*k];
        memset(c, 0, sizeof *c);
        snprintf(c->cache, sizeof c->cache, "%s", cache);
        snprintf(c->slot_id, sizeof c->slot_id, "%s", slot);
        c->hits = st->hits;
        c->misses = st->misses;
        c->evictions = st->evictions;
        c->invalidations = st->invalidations;
        c->recompiles = st->recompiles;
        c->entries = entries;
        c->capacity = capacity;
        c->bytes = bytes;
    }
    (*k)++;
}

int ksm_model_cache_stats(ksm_model *m, struct ksm_cache_counters *out, size_t cap, size_t *n)
{
    pthread_mutex_lock(&m->lock);
    size_t k = 0;
    uint64_t plans = 0, plan_bytes = 0;
    for (int i = 0; i < m->n_streams; i++) {
        plans += (uint64_t)m->streams[i]->n_plans;
        for (int p = 0; p < m->streams[i]->n_plans; p++)
            plan_bytes += m->streams[i]->plans[p].arena_bytes;
    }
    put_counter(out, cap, &k, "plan", "", &m->plan_stat, plans,
                (uint64_t)KSM_PLAN_CAPACITY * (uint64_t)(m->n_streams ? m->n_streams : 1),
                plan_bytes);
    for (int i = 0; i < m->n_slots; i++) {
        struct ksm_model_slot *ms = &m->slots[i];
        uint64_t entries = 0;
        for (int s = 0; s < m->n_streams; s++) entries += m->streams[s]->alpha_gen[i] != 0;
        put_counter(out, cap, &k, "alpha_scalar", ms->s.id, &ms->alpha_stat, entries, 0,
                    entries * sizeof(float));
        put_counter(out, cap, &k, "shape_probe", ms->s.id, &ms->probe_stat, ms->probe != NULL, 1,
                    ms->probe_bytes);
        struct ksm_lru_stats ls;
        if (ms->s.seed && ksm_seed_block_mask_stats(ms->s.seed, &ls)) {
            struct ksm_cache_stat st = {.hits = ls.hits,
                                        .misses = ls.misses,
                                        .evictions = ls.evictions,
                                        .invalidations = ls.invalidations};
            put_counter(out, cap, &k, "block_mask", ms->s.id, &st, ls.entries, ls.capacity,
                        ls.bytes);
        }
    }
    if (n) *n = k;
    pthread_mutex_unlock(&m->lock);
    return 0;
}
