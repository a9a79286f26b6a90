/* Forward, fused forward and counterfactual evaluation (docs/blending.md#forward-of-one-slot,
 * docs/blending.md#blend-operators, docs/evaluate.md#forward-fusedforward-and-evaluate). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kasmina/attribution.h"
#include "kasmina/errors.h"
#include "kasmina/exec.h"
#include "kasmina/model_impl.h"
#include "kasmina/ops.h"

#define KSM_MAX_CONFIGS 256
#define KSM_MAX_ROWS    (1 << 20)

enum { KIND_FORWARD = 0, KIND_FUSED = 1, KIND_EVAL = 2 };

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- one slot (docs/blending.md#forward-of-one-slot) ---- */

struct fwd {
    ksm_model *m;
    struct ksm_stream_ctx *ctx;
    struct ksm_exec *e;
    const ksm_tensor *ov[KSM_MAX_SLOTS]; /* per-row alpha [N,1,1,1]/[N,1,1] on the device */
};

static int alpha_scalar(struct fwd *f, int idx, ksm_tensor *a)
{
    struct ksm_model_slot *ms = &f->m->slots[idx];
    ksm_tensor_init(a, f->m->dev, &f->ctx->alpha_dev[idx], KSM_DTYPE_F32, 0, NULL);
    if (f->e->measure) return 0;
    if (f->ctx->alpha_gen[idx] == ms->alpha_gen) {
        ms->alpha_stat.hits++;
        return 0;
    }
    /* Re-materialise on this stream: ordered after every earlier forward that read it. */
    int rc = ksm_op_fill(f->ctx->stream, a, (double)(float)ms->s.state.alpha);
    if (rc < 0) return rc;
    ms->alpha_stat.misses++;
    f->ctx->alpha_gen[idx] = ms->alpha_gen;
    return 0;
}

static int slot_forward(struct fwd *f, int idx, const ksm_tensor *h, ksm_tensor *y)
{
    struct ksm_model_slot *ms = &f->m->slots[idx];
    struct ksm_slot *s = &ms->s;
    struct ksm_exec *e = f->e;
    if (!ksm_slot_runs_seed(s)) {
        *y = *h; /* the seed is not evaluated; overrides are ignored */
        return 0;
    }
    KSM_TRY(ksm_exec_tensor(e, y, KSM_DTYPE_F32, h->ndim, h->shape));
    size_t mark = ksm_exec_mark(e);
    ksm_tensor sx;
    KSM_TRY(ksm_seed_forward(s->seed, e, h, &sx));
    const ksm_tensor *ov = f->ov[idx];
    enum ksm_alpha_algorithm algo = s->state.alpha_algorithm;
    bool ste = ov == NULL && s->state.stage == KSM_STAGE_TRAINING && s->state.alpha == 0.0;
    /* The sizing pass takes the blend path, whose temporaries include the STE path's. */
    if (e->measure && (algo != KSM_ALGO_GATE || s->gate != NULL)) ste = false;
    if (ste) {
        /* Incubator: h + (s - stopgrad(s)); equals h for finite s, NaN/Inf propagate. */
        KSM_EXEC(e, ksm_op_sub(e->stream, y, &sx, &sx));
        KSM_EXEC(e, ksm_op_add(e->stream, y, h, y));
        ksm_exec_release(e, mark);
        return 0;
    }
    ksm_tensor a;
    if (ov)
        a = *ov;
    else
        KSM_TRY(alpha_scalar(f, idx, &a));
    ksm_tensor ca;
    KSM_TRY(ksm_exec_tensor(e, &ca, KSM_DTYPE_F32, a.ndim, a.shape));
    KSM_EXEC(e, ksm_op_clamp01(e->stream, &ca, &a));
    switch (algo) {
    case KSM_ALGO_ADD: KSM_EXEC(e, ksm_op_lerp(e->stream, y, h, &sx, &ca)); break;
    case KSM_ALGO_MULTIPLY:
        /* y = h * (1 + clamp(a) * tanh(s - x_ref)), x_ref = the seed input = h */
        KSM_EXEC(e, ksm_op_sub(e->stream, y, &sx, h));
        KSM_EXEC(e, ksm_op_tanh(e->stream, y, y));
        KSM_EXEC(e, ksm_op_mul(e->stream, y, y, &ca));
        KSM_EXEC(e, ksm_op_affine(e->stream, y, y, 1.0f, 1.0f));
        KSM_EXEC(e, ksm_op_mul(e->stream, y, h, y));
        break;
    case KSM_ALGO_GATE: {
        if (s->gate == NULL) return KSM_ESTAGE;
        ksm_tensor g, aeff;
        KSM_TRY(ksm_gated_blend_forward(s->gate, e, h, &g));
        KSM_EXEC(e, ksm_op_clamp01(e->stream, &g, &g));
        KSM_TRY(ksm_exec_tensor(e, &aeff, KSM_DTYPE_F32, g.ndim, g.shape));
        KSM_EXEC(e, ksm_op_mul(e->stream, &aeff, &ca, &g));
        KSM_EXEC(e, ksm_op_clamp01(e->stream, &aeff, &aeff));
        KSM_EXEC(e, ksm_op_lerp(e->stream, y, h, &sx, &aeff));
        break;
    }
    default: return KSM_EINTERNAL;
    }
    ksm_exec_release(e, mark);
    return 0;
}

/* Routing (docs/models.md#routing): registered slots in execution order, then the rest of the host.
 */
static int model_forward(struct fwd *f, const ksm_tensor *x, ksm_tensor *logits)
{
    ksm_model *m = f->m;
    ksm_tensor cur = *x;
    int prev = -1;
    for (int o = 0; o < m->n_slots; o++) {
        int idx = m->exec_order[o];
        int to = m->slots[idx].inj->exec_index;
        ksm_tensor h, y;
        KSM_TRY(ksm_host_forward_to(m->host, f->e, prev, to, &cur, &h));
        KSM_TRY(slot_forward(f, idx, &h, &y));
        cur = y;
        prev = to;
    }
    return ksm_host_forward_from(m->host, f->e, prev, &cur, logits);
}

/* Rows [0, B) of src repeated K times into a new [K*B, ...] arena tensor. */
static int tile_rows(struct fwd *f, const ksm_tensor *src, int64_t K, ksm_tensor *dst)
{
    int64_t shape[KSM_MAX_DIMS];
    memcpy(shape, src->shape, sizeof shape);
    int64_t B = src->shape[0];
    shape[0] = K * B;
    KSM_TRY(ksm_exec_tensor(f->e, dst, src->dtype, src->ndim, shape));
    for (int64_t k = 0; k < K; k++) {
        ksm_tensor v;
        KSM_TRY(ksm_tensor_narrow(&v, dst, 0, k * B, B));
        KSM_EXEC(f->e, ksm_op_copy(f->e->stream, &v, src));
    }
    return 0;
}

/*
 * The fused forward of K configs over one batch x of B rows, without tiling the input: every op
 * is per-sample and no config differs before the first running slot that has an override, so
 * that prefix runs once on B rows and only its output is tiled K times (exactly equal to the
 * fully tiled pass). Overrides are [K*B] per-row alphas.
 */
static int model_forward_configs(struct fwd *f, const ksm_tensor *x, int64_t K, ksm_tensor *logits)
{
    ksm_model *m = f->m;
    ksm_tensor cur = *x;
    int prev = -1;
    bool tiled = false;
    for (int o = 0; o < m->n_slots; o++) {
        int idx = m->exec_order[o];
        int to = m->slots[idx].inj->exec_index;
        ksm_tensor h, y;
        KSM_TRY(ksm_host_forward_to(m->host, f->e, prev, to, &cur, &h));
        if (!tiled && f->ov[idx] != NULL && ksm_slot_runs_seed(&m->slots[idx].s)) {
            ksm_tensor ht;
            KSM_TRY(tile_rows(f, &h, K, &ht));
            h = ht;
            tiled = true;
        }
        const ksm_tensor *saved = f->ov[idx];
        if (!tiled)
            f->ov[idx] = NULL; /* before the split an override is ignored (slot not running) */
        int rc = slot_forward(f, idx, &h, &y);
        f->ov[idx] = saved;
        if (rc < 0) return rc;
        cur = y;
        prev = to;
    }
    if (tiled) return ksm_host_forward_from(m->host, f->e, prev, &cur, logits);
    ksm_tensor l1;
    KSM_TRY(ksm_host_forward_from(m->host, f->e, prev, &cur, &l1));
    return tile_rows(f, &l1, K, logits); /* no config differs: K copies of one pass */
}

/* ---- plans ---- */

struct plan_key {
    int kind;
    uint64_t mask;
    int ndim;
    int64_t shape[KSM_MAX_DIMS];
    int64_t aux;
};

static bool key_eq(const struct ksm_plan *p, const struct plan_key *k)
{
    if (p->kind != k->kind || p->override_mask != k->mask || p->ndim != k->ndim || p->aux != k->aux)
        return false;
    for (int i = 0; i < k->ndim; i++)
        if (p->shape[i] != k->shape[i]) return false;
    return true;
}

typedef int (*body_fn)(struct fwd *f, void *arg);

/* Finds or builds the plan of key, then runs body for real on its arena. */
static int run_planned(ksm_model *m, struct ksm_stream_ctx *ctx, const struct plan_key *k,
                       body_fn body, void *arg, const ksm_tensor *const *ovs)
{
    struct fwd f = {.m = m, .ctx = ctx};
    for (int i = 0; i < m->n_slots; i++) f.ov[i] = ovs ? ovs[i] : NULL;
    struct ksm_exec e;
    f.e = &e;
    struct ksm_plan *p = NULL;
    for (int i = 0; i < ctx->n_plans; i++)
        if (key_eq(&ctx->plans[i], k) && ctx->plans[i].topo_gen == m->topo_gen) p = &ctx->plans[i];
    if (p != NULL) {
        m->plan_stat.hits++;
    } else {
        m->plan_stat.misses++;
        ksm_exec_init(&e, ctx->stream, true, NULL, 0);
        int rc = body(&f, arg);
        if (rc < 0) return rc;
        size_t need = e.high ? e.high : KSM_EXEC_ALIGN;
        /* Replace a stale plan of the same key (topology changed), else the LRU one. */
        struct ksm_plan *slot = NULL;
        for (int i = 0; i < ctx->n_plans; i++)
            if (key_eq(&ctx->plans[i], k)) {
                slot = &ctx->plans[i];
                m->plan_stat.recompiles++;
                m->plan_stat.invalidations++;
            }
        if (slot == NULL && ctx->n_plans < KSM_PLAN_CAPACITY) slot = &ctx->plans[ctx->n_plans++];
        if (slot == NULL) {
            slot = &ctx->plans[0];
            for (int i = 1; i < ctx->n_plans; i++)
                if (ctx->plans[i].last_used < slot->last_used) slot = &ctx->plans[i];
            m->plan_stat.evictions++;
        }
        if (slot->arena) {
            ksm_alloc_free(m->alloc, slot->arena); /* stream-ordered: same stream */
            slot->arena = NULL;
        }
        void *arena;
        rc = ksm_alloc_malloc(m->alloc, need, ctx->stream, &arena);
        if (rc < 0) {
            /* drop the (now empty) slot */
            int at = (int)(slot - ctx->plans);
            memmove(&ctx->plans[at], &ctx->plans[at + 1],
                    (size_t)(ctx->n_plans - at - 1) * sizeof *slot);
            ctx->n_plans--;
            return rc;
        }
        memset(slot, 0, sizeof *slot);
        slot->topo_gen = m->topo_gen;
        slot->kind = k->kind;
        slot->override_mask = k->mask;
        slot->ndim = k->ndim;
        memcpy(slot->shape, k->shape, sizeof slot->shape);
        slot->aux = k->aux;
        slot->arena = arena;
        slot->arena_bytes = need;
        p = slot;
    }
    p->last_used = ++ctx->plan_clock;
    ksm_exec_init(&e, ctx->stream, false, p->arena, p->arena_bytes);
    return body(&f, arg);
}

/* ---- forward / fused forward ---- */

struct forward_arg {
    const ksm_tensor *x_host;
    const float *ov_host[KSM_MAX_SLOTS];
    ksm_tensor ov_dev[KSM_MAX_SLOTS];
    float *out_host;
    ksm_tensor logits;
};

static int upload(struct fwd *f, const ksm_tensor *src, ksm_tensor *dst, enum ksm_dtype dt)
{
    KSM_TRY(ksm_exec_tensor(f->e, dst, dt, src->ndim, src->shape));
    if (!f->e->measure)
        KSM_TRY(ksm_stream_memcpy_async(f->ctx->stream, dst->data, src->data,
                                        ksm_tensor_nbytes(dst), KSM_COPY_H2D));
    return 0;
}

static int forward_body(struct fwd *f, void *argp)
{
    struct forward_arg *a = argp;
    ksm_model *m = f->m;
    ksm_tensor x;
    KSM_TRY(upload(f, a->x_host, &x, a->x_host->dtype));
    int64_t n = a->x_host->shape[0];
    for (int i = 0; i < m->n_slots; i++) {
        if (a->ov_host[i] == NULL) continue;
        int64_t shp[4] = {n, 1, 1, 1};
        ksm_tensor hv;
        ksm_tensor_init(&hv, NULL, (void *)a->ov_host[i], KSM_DTYPE_F32,
                        m->spec.topology == KSM_TOPOLOGY_CNN ? 4 : 3, shp);
        KSM_TRY(upload(f, &hv, &a->ov_dev[i], KSM_DTYPE_F32));
        f->ov[i] = &a->ov_dev[i];
    }
    /* On a host-memory device the head writes the logits straight into the host buffer. */
    if (ksm_device_is_host(m->dev)) f->e->logits_dst = a->out_host;
    KSM_TRY(model_forward(f, &x, &a->logits));
    f->e->logits_dst = NULL;
    if (!f->e->measure && a->logits.data != (void *)a->out_host)
        KSM_TRY(ksm_stream_memcpy_async(f->ctx->stream, a->out_host, a->logits.data,
                                        ksm_tensor_nbytes(&a->logits), KSM_COPY_D2H));
    return 0;
}

/* Called without the model lock: the reference taken under it keeps ctx alive. Returns the
 * stream's sticky error, if any. */
static int sync_ctx(ksm_model *m, struct ksm_stream_ctx *ctx)
{
    int rc = ksm_stream_synchronize(ctx->stream);
    if (rc < 0) {
        char why[200];
        snprintf(why, sizeof why, "stream \"%s\" of model \"%s\" on %s failed: %s", ctx->key, m->id,
                 ksm_device_name(ksm_stream_device(ctx->stream)), ksm_strerror(rc));
        ksm_engine_mark_failed(m->engine, why);
        rc = KSM_EDEVICE;
    }
    ksm_stream_ctx_unref(ctx);
    return rc;
}

static int lock_model(ksm_model *m, char *err, size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    if (m->deleted) {
        pthread_mutex_unlock(&m->lock);
        ksm_errf(err, errlen, 0, "model \"%s\" was deleted", m->id);
        return KSM_ENOMODEL;
    }
    return 0;
}

static int check_stream_key(const char *key, char *err, size_t errlen)
{
    if (key && strlen(key) > KSM_STREAM_KEY_MAX) {
        ksm_errf(err, errlen, 0, "stream key is longer than %d bytes", KSM_STREAM_KEY_MAX);
        return KSM_EINVAL;
    }
    return 0;
}

static int get_stream(ksm_model *m, const char *key, struct ksm_stream_ctx **ctx, char *err,
                      size_t errlen)
{
    int rc = ksm_model_stream(m, key, ctx);
    if (rc == KSM_ELIMIT)
        ksm_errf(err, errlen, 0, "model \"%s\" already has %d streams: reuse stream keys", m->id,
                 KSM_MAX_STREAMS_PER_MODEL);
    else if (rc < 0)
        ksm_errf(err, errlen, 0, "could not create stream \"%s\": %s", key ? key : "",
                 ksm_strerror(rc));
    return rc;
}

int ksm_model_forward(ksm_model *m, const struct ksm_forward_args *a, struct ksm_forward_result *r,
                      char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    if (a == NULL || a->input == NULL || a->input->data == NULL) {
        ksm_errf(err, errlen, 0, "input is required");
        return KSM_EINVAL;
    }
    if (!ksm_tensor_is_contiguous(a->input)) {
        ksm_errf(err, errlen, 0, "input must be contiguous");
        return KSM_EINVAL;
    }
    int rc = check_stream_key(a->stream, err, errlen);
    if (rc < 0) return rc;
    rc = ksm_host_check_input(m->host, a->input, err, errlen);
    if (rc < 0) return rc;
    if (a->input->shape[0] > KSM_MAX_ROWS) {
        ksm_errf(err, errlen, 0, "input has %lld rows; at most %d are allowed",
                 (long long)a->input->shape[0], KSM_MAX_ROWS);
        return KSM_ELIMIT;
    }
    if (a->n_overrides > 0 && a->overrides == NULL) {
        ksm_errf(err, errlen, 0, "overrides is NULL");
        return KSM_EINVAL;
    }
    if ((rc = lock_model(m, err, errlen)) < 0) return rc;

    struct forward_arg fa = {.x_host = a->input};
    struct plan_key k = {.kind = (a->fused || a->n_overrides) ? KIND_FUSED : KIND_FORWARD};
    int64_t rows = a->input->shape[0];
    for (size_t i = 0; i < a->n_overrides; i++) {
        const struct ksm_alpha_override *o = &a->overrides[i];
        struct ksm_model_slot *ms = ksm_model_find_slot(m, o->slot_id);
        if (ms == NULL) {
            ksm_errf(err, errlen, 0, "Unknown alpha_overrides keys: %s",
                     o->slot_id ? o->slot_id : "");
            rc = KSM_ENOSLOT;
            goto out;
        }
        int idx = (int)(ms - m->slots);
        if (fa.ov_host[idx] != NULL) {
            ksm_errf(err, errlen, 0, "alpha_overrides lists slot %s twice", ms->s.id);
            rc = KSM_EINVAL;
            goto out;
        }
        if ((int64_t)o->n != rows || o->alpha == NULL) {
            ksm_errf(err, errlen, 0,
                     "alpha_overrides[%s] must have shape (%lld,%s) for topology %s, got %zu "
                     "values",
                     ms->s.id, (long long)rows,
                     m->spec.topology == KSM_TOPOLOGY_CNN ? "1,1,1" : "1,1",
                     ksm_topology_name(m->spec.topology), o->n);
            rc = KSM_ESHAPE;
            goto out;
        }
        for (size_t j = 0; j < o->n; j++) {
            if (!isfinite(o->alpha[j])) {
                ksm_errf(err, errlen, 0, "alpha_overrides[%s][%zu] is not a finite number",
                         ms->s.id, j);
                rc = KSM_EINVAL;
                goto out;
            }
        }
        fa.ov_host[idx] = o->alpha;
        k.mask |= 1ull << idx;
    }
    struct ksm_stream_ctx *ctx;
    if ((rc = get_stream(m, a->stream, &ctx, err, errlen)) < 0) goto out;
    int ond;
    int64_t oshape[KSM_MAX_DIMS];
    ksm_host_output_shape(m->host, a->input, &ond, oshape);
    ksm_tensor out;
    ksm_tensor_init(&out, NULL, NULL, KSM_DTYPE_F32, ond, oshape);
    bool own_out = a->output_buffer == NULL || a->output_capacity < ksm_tensor_nbytes(&out);
    fa.out_host =
        own_out ? malloc(ksm_tensor_nbytes(&out) ? ksm_tensor_nbytes(&out) : 1) : a->output_buffer;
    if (fa.out_host == NULL) {
        rc = KSM_ENOMEM;
        goto out;
    }
    k.ndim = a->input->ndim;
    memcpy(k.shape, a->input->shape, sizeof k.shape);
    k.aux = a->input->dtype;
    int64_t t0 = mono_ns();
    rc = run_planned(m, ctx, &k, forward_body, &fa, NULL);
    r->model_generation = m->generation;
    atomic_fetch_add(&ctx->refs, 1);
    pthread_mutex_unlock(&m->lock);
    /* The model's memory stays valid: frees are ordered after this stream's work. */
    int rc2 = sync_ctx(m, ctx);
    if (rc == 0) rc = rc2;
    if (rc == KSM_EDEVICE)
        ksm_engine_mark_failed(m->engine, "a forward found its device in an error state");
    if (rc < 0) {
        if (own_out) free(fa.out_host);
        ksm_errf(err, errlen, 0, "forward failed: %s", ksm_strerror(rc));
        return rc;
    }
    r->compute_ns = (uint64_t)(mono_ns() - t0);
    out.data = fa.out_host;
    r->output = out;
    return 0;
out:
    pthread_mutex_unlock(&m->lock);
    return rc;
}

/* ---- evaluate (docs/evaluate.md#standard-configs, docs/evaluate.md#streams-plans-and-caches) ----
 */

struct cfg {
    char name[64];
    bool forced[KSM_MAX_SLOTS];
    float alpha[KSM_MAX_SLOTS];
};

static bool slot_active_for_cf(const struct ksm_slot *s)
{
    return ksm_slot_runs_seed(s) && s->state.alpha > 0 && s->state.stage != KSM_STAGE_FOSSILIZED;
}

static int build_standard(ksm_model *m, bool shapley, struct cfg *cfgs, int *n_out)
{
    int act[KSM_MAX_SLOTS], n = 0, k = 0;
    for (int i = 0; i < m->n_slots; i++)
        if (slot_active_for_cf(&m->slots[i].s)) act[n++] = i;
#define NEWCFG(...)                                                                                \
    do {                                                                                           \
        if (k == KSM_MAX_CONFIGS) return KSM_ELIMIT;                                               \
        memset(&cfgs[k], 0, sizeof cfgs[k]);                                                       \
        snprintf(cfgs[k].name, sizeof cfgs[k].name, __VA_ARGS__);                                  \
        k++;                                                                                       \
    } while (0)
#define FORCE(c, i, v) ((c).forced[i] = true, (c).alpha[i] = (v))
    NEWCFG("main");
    for (int j = 0; j < n; j++) {
        NEWCFG("solo:%s", m->slots[act[j]].s.id);
        FORCE(cfgs[k - 1], act[j], 0.0f);
    }
    for (int j = 0; j < n; j++) {
        NEWCFG("solo_on:%s", m->slots[act[j]].s.id);
        for (int q = 0; q < n; q++)
            if (q != j) FORCE(cfgs[k - 1], act[q], 0.0f);
    }
    if (n >= 2 && n <= 4) {
        NEWCFG("all_off");
        for (int q = 0; q < n; q++) FORCE(cfgs[k - 1], act[q], 0.0f);
    }
    if (n >= 3 && n <= 4) {
        for (int a = 0; a < n; a++)
            for (int b = a + 1; b < n; b++) {
                NEWCFG("pair:%s+%s", m->slots[act[a]].s.id, m->slots[act[b]].s.id);
                for (int q = 0; q < n; q++)
                    if (q != a && q != b) FORCE(cfgs[k - 1], act[q], 0.0f);
            }
    }
    if (n >= 1) { /* every active seed is non-fossilized by construction */
        NEWCFG("committed");
        for (int q = 0; q < n; q++) FORCE(cfgs[k - 1], act[q], 0.0f);
    }
    if (shapley && n >= 1 && n <= 4) {
        for (int i = 0; i < (1 << n); i++) {
            char bits[8] = {0};
            for (int j = 0; j < n; j++) bits[j] = (i >> j) & 1 ? '1' : '0';
            NEWCFG("shapley:%s", bits);
            for (int j = 0; j < n; j++) FORCE(cfgs[k - 1], act[j], ((i >> j) & 1) ? 1.0f : 0.0f);
        }
    }
#undef NEWCFG
#undef FORCE
    *n_out = k;
    return 0;
}

struct eval_arg {
    const ksm_tensor *x_host;
    const int64_t *labels_host; /* [B*T] */
    int64_t K, B, per_row;      /* per_row: labels per input row (1 or T) */
    float *ov_host[KSM_MAX_SLOTS];
    ksm_tensor ov_dev[KSM_MAX_SLOTS];
    float *loss_host;     /* [K] */
    int64_t *argmax_host; /* [K*B*per_row] */
    float *logits_host;   /* optional: the first logits_bytes of the logits */
    size_t logits_bytes;
    ksm_tensor logits;
};

static int eval_body(struct fwd *f, void *argp)
{
    struct eval_arg *a = argp;
    ksm_model *m = f->m;
    struct ksm_exec *e = f->e;
    ksm_tensor x1, lab1, labt;
    KSM_TRY(upload(f, a->x_host, &x1, a->x_host->dtype));
    int64_t nl = a->B * a->per_row;
    ksm_tensor lh;
    ksm_tensor_init(&lh, NULL, (void *)a->labels_host, KSM_DTYPE_I64, 1, &nl);
    KSM_TRY(upload(f, &lh, &lab1, KSM_DTYPE_I64));
    int64_t ntot = a->K * nl;
    KSM_TRY(tile_rows(f, &lab1, a->K, &labt));
    for (int i = 0; i < m->n_slots; i++) {
        if (a->ov_host[i] == NULL) continue;
        int64_t shp[4] = {a->K * a->B, 1, 1, 1};
        ksm_tensor hv;
        ksm_tensor_init(&hv, NULL, a->ov_host[i], KSM_DTYPE_F32,
                        m->spec.topology == KSM_TOPOLOGY_CNN ? 4 : 3, shp);
        KSM_TRY(upload(f, &hv, &a->ov_dev[i], KSM_DTYPE_F32));
        f->ov[i] = &a->ov_dev[i];
    }
    KSM_TRY(model_forward_configs(f, &x1, a->K, &a->logits));
    int64_t C = a->logits.shape[a->logits.ndim - 1];
    int64_t s2[2] = {ntot, C};
    ksm_tensor l2, loss, lossk, amax;
    KSM_TRY(ksm_tensor_reshape(&l2, &a->logits, 2, s2));
    KSM_TRY(ksm_exec_tensor(e, &loss, KSM_DTYPE_F32, 1, &ntot));
    KSM_EXEC(e, ksm_op_cross_entropy(e->stream, &loss, &l2, &labt, -100));
    int64_t sk[2] = {a->K, nl};
    ksm_tensor lossv;
    KSM_TRY(ksm_tensor_reshape(&lossv, &loss, 2, sk));
    KSM_TRY(ksm_exec_tensor(e, &lossk, KSM_DTYPE_F32, 1, &a->K));
    KSM_EXEC(e, ksm_op_mean(e->stream, &lossk, &lossv, 1, 2));
    KSM_TRY(ksm_exec_tensor(e, &amax, KSM_DTYPE_I64, 1, &ntot));
    KSM_EXEC(e, ksm_op_argmax(e->stream, &amax, &l2));
    if (!e->measure) {
        KSM_TRY(ksm_stream_memcpy_async(e->stream, a->loss_host, lossk.data,
                                        (size_t)a->K * sizeof(float), KSM_COPY_D2H));
        KSM_TRY(ksm_stream_memcpy_async(e->stream, a->argmax_host, amax.data,
                                        (size_t)ntot * sizeof(int64_t), KSM_COPY_D2H));
        if (a->logits_host)
            KSM_TRY(ksm_stream_memcpy_async(e->stream, a->logits_host, a->logits.data,
                                            a->logits_bytes, KSM_COPY_D2H));
    }
    return 0;
}

static int check_targets(ksm_model *m, const ksm_tensor *x, const ksm_tensor *t, int64_t *per_row,
                         char *err, size_t errlen)
{
    if (t == NULL || t->data == NULL) {
        ksm_errf(err, errlen, 0, "targets are required");
        return KSM_EINVAL;
    }
    if (t->dtype != KSM_DTYPE_I64 && t->dtype != KSM_DTYPE_I32) {
        ksm_errf(err, errlen, 0, "targets must be I64 or I32 class ids");
        return KSM_EDTYPE;
    }
    int64_t limit;
    if (m->spec.topology == KSM_TOPOLOGY_CNN) {
        if (t->ndim != 1 || t->shape[0] != x->shape[0]) {
            ksm_errf(err, errlen, 0, "targets must have shape [%lld] (one class id per row)",
                     (long long)x->shape[0]);
            return KSM_ESHAPE;
        }
        *per_row = 1;
        limit = m->spec.cnn.num_classes;
    } else {
        if (t->ndim != 2 || t->shape[0] != x->shape[0] || t->shape[1] != x->shape[1]) {
            ksm_errf(err, errlen, 0,
                     "targets must have shape [%lld, %lld] (one token id per position)",
                     (long long)x->shape[0], (long long)x->shape[1]);
            return KSM_ESHAPE;
        }
        *per_row = x->shape[1];
        limit = m->spec.transformer.vocab_size;
    }
    int64_t n = ksm_tensor_numel(t);
    for (int64_t i = 0; i < n; i++) {
        int64_t v = t->dtype == KSM_DTYPE_I64 ? ((const int64_t *)t->data)[i]
                                              : ((const int32_t *)t->data)[i];
        if (v < 0 || v >= limit) {
            ksm_errf(err, errlen, 0, "targets[%lld] = %lld is outside [0, %lld)", (long long)i,
                     (long long)v, (long long)limit);
            return KSM_EINVAL;
        }
    }
    return 0;
}

/* The live seeds of attribution: the active slots of the standard configs, row-major. */
static int live_seeds(ksm_model *m, int *live)
{
    int n = 0;
    for (int i = 0; i < m->n_slots; i++)
        if (slot_active_for_cf(&m->slots[i].s)) live[n++] = i;
    return n;
}

int ksm_model_evaluate(ksm_model *m, const struct ksm_evaluate_args *a,
                       struct ksm_evaluate_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    if (a == NULL || a->input == NULL || a->input->data == NULL) {
        ksm_errf(err, errlen, 0, "input is required");
        return KSM_EINVAL;
    }
    int rc = check_stream_key(a->stream, err, errlen);
    if (rc < 0) return rc;
    if ((rc = ksm_host_check_input(m->host, a->input, err, errlen)) < 0) return rc;
    int64_t per_row;
    if ((rc = check_targets(m, a->input, a->targets, &per_row, err, errlen)) < 0) return rc;
    if (a->attribution > KSM_ATTRIBUTION_PERMUTATION)
        return ksm_errf(err, errlen, KSM_EINVAL,
                        "attribution must be NONE, AUTO, EXACT or PERMUTATION, got %d",
                        (int)a->attribution);
    bool attr = a->attribution != KSM_ATTRIBUTION_NONE;
    if (attr && a->shapley_samples > KSM_SHAPLEY_SAMPLES_MAX)
        return ksm_errf(err, errlen, KSM_EINVAL, "shapley_samples is %u; at most %d are allowed",
                        a->shapley_samples, KSM_SHAPLEY_SAMPLES_MAX);
    if (a->n_configs == 0 && !a->generate_standard && !attr) {
        ksm_errf(err, errlen, 0,
                 "configs is empty, generate_standard is false and attribution is NONE");
        return KSM_EINVAL;
    }
    if (a->n_configs > KSM_MAX_CONFIGS) {
        ksm_errf(err, errlen, 0, "at most %d configs are allowed, got %zu", KSM_MAX_CONFIGS,
                 a->n_configs);
        return KSM_ELIMIT;
    }
    struct cfg *cfgs = calloc(KSM_MAX_CONFIGS, sizeof *cfgs);
    if (cfgs == NULL) return KSM_ENOMEM;
    struct eval_arg ea = {.x_host = a->input};
    int64_t *labels = NULL;
    double *values = NULL;
    struct ksm_attribution at;
    memset(&at, 0, sizeof at);
    char live_ids[KSM_MAX_SLOTS][KSM_SLOT_ID_MAX];
    const char *live_ptr[KSM_MAX_SLOTS];
    if ((rc = lock_model(m, err, errlen)) < 0) {
        free(cfgs);
        return rc;
    }
    int K = 0; /* the configs asked for; attribution's coalitions follow them */
    if (a->n_configs > 0) {
        for (size_t c = 0; c < a->n_configs; c++) {
            const struct ksm_alpha_config *ac = &a->configs[c];
            struct cfg *g = &cfgs[K++];
            if (ac->name == NULL || ac->name[0] == '\0' || strlen(ac->name) >= sizeof g->name) {
                ksm_errf(err, errlen, 0, "configs[%zu].name must be 1 to %zu characters", c,
                         sizeof g->name - 1);
                rc = KSM_EINVAL;
                goto out_locked;
            }
            snprintf(g->name, sizeof g->name, "%s", ac->name);
            for (size_t j = 0; j < ac->n; j++) {
                struct ksm_model_slot *ms = ksm_model_find_slot(m, ac->slot_ids[j]);
                if (ms == NULL) {
                    ksm_errf(err, errlen, 0, "configs[%zu] (%s) names unknown slot \"%s\"", c,
                             g->name, ac->slot_ids[j] ? ac->slot_ids[j] : "");
                    rc = KSM_ENOSLOT;
                    goto out_locked;
                }
                float v = ac->alpha[j];
                if (!(v >= 0.0f && v <= 1.0f)) {
                    ksm_errf(err, errlen, 0, "configs[%zu] (%s) alpha for %s must be in [0, 1]", c,
                             g->name, ms->s.id);
                    rc = KSM_EINVAL;
                    goto out_locked;
                }
                g->forced[ms - m->slots] = true;
                g->alpha[ms - m->slots] = v;
            }
        }
    } else if (a->generate_standard) {
        rc = build_standard(m, a->shapley, cfgs, &K);
        if (rc < 0) {
            ksm_errf(err, errlen, 0, "too many counterfactual configs");
            goto out_locked;
        }
    }
    int K_all = K;
    if (attr) {
        /* docs/evaluate.md#attribution: coalition c has live seed j at alpha 1.0 if bit j of c
         * is set, else 0.0; every other slot keeps its own alpha. */
        int live[KSM_MAX_SLOTS], n_live = live_seeds(m, live);
        rc = ksm_attribution_plan(&at, a->attribution, n_live, a->shapley_samples,
                                  a->attribution_seed, (size_t)(KSM_EVALUATE_MAX_CONFIGS - K), err,
                                  errlen);
        if (rc < 0) goto out_locked;
        K_all = K + (int)at.n_coalitions;
        if (K_all > KSM_MAX_CONFIGS) {
            struct cfg *g = realloc(cfgs, (size_t)K_all * sizeof *cfgs);
            if (g == NULL) {
                rc = KSM_ENOMEM;
                goto out_locked;
            }
            cfgs = g;
        }
        for (int j = 0; j < n_live; j++) {
            snprintf(live_ids[j], sizeof live_ids[j], "%s", m->slots[live[j]].s.id);
            live_ptr[j] = live_ids[j];
        }
        for (size_t c = 0; c < at.n_coalitions; c++) {
            struct cfg *g = &cfgs[K + (int)c];
            memset(g, 0, sizeof *g);
            snprintf(g->name, sizeof g->name, "coalition:%llx",
                     (unsigned long long)at.coalitions[c]);
            for (int j = 0; j < n_live; j++) {
                g->forced[live[j]] = true;
                g->alpha[live[j]] = (at.coalitions[c] >> j) & 1 ? 1.0f : 0.0f;
            }
        }
    }
    int64_t B = a->input->shape[0];
    if ((int64_t)K_all * B > KSM_MAX_ROWS) {
        if (attr)
            ksm_errf(err, errlen, 0,
                     "%d configs (%d asked for + %zu attribution coalitions) x %lld rows exceed "
                     "the limit of %d rows per Evaluate",
                     K_all, K, at.n_coalitions, (long long)B, KSM_MAX_ROWS);
        else
            ksm_errf(err, errlen, 0, "%d configs x %lld rows exceed the limit of %d rows", K,
                     (long long)B, KSM_MAX_ROWS);
        rc = KSM_ELIMIT;
        goto out_locked;
    }
    ea.K = K_all;
    ea.B = B;
    ea.per_row = per_row;
    int64_t nl = B * per_row;
    labels = malloc((size_t)nl * sizeof *labels);
    ea.loss_host = malloc((size_t)K_all * sizeof(float));
    ea.argmax_host = malloc((size_t)(K_all * nl) * sizeof(int64_t));
    if (!labels || !ea.loss_host || !ea.argmax_host) {
        rc = KSM_ENOMEM;
        goto out_locked;
    }
    for (int64_t i = 0; i < nl; i++)
        labels[i] = a->targets->dtype == KSM_DTYPE_I64 ? ((const int64_t *)a->targets->data)[i]
                                                       : ((const int32_t *)a->targets->data)[i];
    ea.labels_host = labels;
    struct plan_key k = {.kind = KIND_EVAL, .aux = (int64_t)K_all * 16 + a->input->dtype};
    /* Overrides: every slot some config mentions, full of its current alpha
     * (docs/evaluate.md#standard-configs). */
    for (int i = 0; i < m->n_slots; i++) {
        bool any = false;
        for (int c = 0; c < K_all; c++) any |= cfgs[c].forced[i];
        if (!any) continue;
        float *v = malloc((size_t)(K_all * B) * sizeof(float));
        if (v == NULL) {
            rc = KSM_ENOMEM;
            goto out_locked;
        }
        for (int c = 0; c < K_all; c++)
            for (int64_t b = 0; b < B; b++)
                v[c * B + b] =
                    cfgs[c].forced[i] ? cfgs[c].alpha[i] : (float)m->slots[i].s.state.alpha;
        ea.ov_host[i] = v;
        k.mask |= 1ull << i;
    }
    struct ksm_stream_ctx *ctx;
    if ((rc = get_stream(m, a->stream, &ctx, err, errlen)) < 0) goto out_locked;
    if (a->return_logits && K > 0) {
        /* Only the configs asked for: they lead the tiled batch. */
        int ond;
        int64_t oshape[KSM_MAX_DIMS];
        ksm_host_output_shape(m->host, a->input, &ond, oshape);
        size_t per = sizeof(float);
        for (int d = 0; d < ond; d++) per *= (size_t)oshape[d];
        ea.logits_bytes = per * (size_t)K;
        ea.logits_host = malloc(ea.logits_bytes);
        if (ea.logits_host == NULL) {
            rc = KSM_ENOMEM;
            goto out_locked;
        }
    }
    k.ndim = a->input->ndim;
    memcpy(k.shape, a->input->shape, sizeof k.shape);
    int64_t t0 = mono_ns();
    rc = run_planned(m, ctx, &k, eval_body, &ea, NULL);
    r->model_generation = m->generation;
    atomic_fetch_add(&ctx->refs, 1);
    pthread_mutex_unlock(&m->lock);
    int rc2 = sync_ctx(m, ctx);
    if (rc == 0) rc = rc2;
    if (rc == KSM_EDEVICE)
        ksm_engine_mark_failed(m->engine, "an evaluate found its device in an error state");
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "evaluate failed: %s", ksm_strerror(rc));
        goto out;
    }
    r->compute_ns = (uint64_t)(mono_ns() - t0);
    if (K > 0) {
        r->results = calloc((size_t)K, sizeof *r->results);
        if (r->results == NULL) {
            rc = KSM_ENOMEM;
            goto out;
        }
    }
    r->n = (size_t)K;
    for (int c = 0; c < K; c++) {
        struct ksm_config_result *cr = &r->results[c];
        snprintf(cr->name, sizeof cr->name, "%s", cfgs[c].name);
        uint64_t correct = 0;
        for (int64_t i = 0; i < nl; i++) correct += ea.argmax_host[c * nl + i] == labels[i];
        cr->correct = correct;
        cr->total = (uint64_t)nl;
        cr->loss = ea.loss_host[c];
        cr->accuracy = 100.0 * (double)correct / (double)nl;
        if (ea.logits_host) {
            int ond;
            int64_t oshape[KSM_MAX_DIMS];
            ksm_host_output_shape(m->host, a->input, &ond, oshape);
            ksm_tensor_init(&cr->logits, NULL, NULL, KSM_DTYPE_F32, ond, oshape);
            size_t nb = ksm_tensor_nbytes(&cr->logits);
            cr->logits.data = malloc(nb);
            if (cr->logits.data == NULL) {
                rc = KSM_ENOMEM;
                ksm_evaluate_result_free(r);
                goto out;
            }
            memcpy(cr->logits.data, (char *)ea.logits_host + nb * (size_t)c, nb);
        }
    }
    if (attr) {
        /* v(coalition) = its accuracy in percent, as the results' (esper's val_accuracy). */
        values = malloc(at.n_coalitions * sizeof *values);
        if (values == NULL) {
            rc = KSM_ENOMEM;
            ksm_evaluate_result_free(r);
            goto out;
        }
        for (size_t j = 0; j < at.n_coalitions; j++) {
            const int64_t *am = ea.argmax_host + (int64_t)(K + (int)j) * nl;
            uint64_t correct = 0;
            for (int64_t i = 0; i < nl; i++) correct += am[i] == labels[i];
            values[j] = 100.0 * (double)correct / (double)nl;
        }
        if ((rc = ksm_attribution_estimate(&at, values, live_ptr, r)) < 0) {
            ksm_evaluate_result_free(r);
            goto out;
        }
    }
    goto out;
out_locked:
    pthread_mutex_unlock(&m->lock);
out:
    for (int i = 0; i < KSM_MAX_SLOTS; i++) free(ea.ov_host[i]);
    free(ea.loss_host);
    free(ea.argmax_host);
    free(ea.logits_host);
    free(labels);
    free(values);
    free(cfgs);
    ksm_attribution_fini(&at);
    return rc;
}
