/*
 * The training state in a snapshot (train_impl.h; docs/training.md#durability-and-checkpoints):
 * the configuration, train_step, and every momentum buffer of the host optimizer and of each
 * seed optimizer, as raw F32 bytes, so that a model restored from a checkpoint continues exactly
 * as the model it was taken from.
 *
 * An optimizer that the next TrainStep would throw away unused (made for a module no longer in
 * its slot, for a seed that fossilized since, or over another parameter count) is left out: it
 * is as good as gone, and a restored model that lacks it behaves the same.
 */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/train_impl.h"

/* Parameter names are bounded (KSM_PARAM_NAME_MAX, slot ids) and every buffer has room for
 * them. */
#pragma GCC diagnostic ignored "-Wformat-truncation"

#define HOST_PREFIX "host."

/* The module prefix of a seed optimizer's parameter k: "seed_slots.<id>.seed." for the seed's
 * own (the first n_seed), "seed_slots.<id>.alpha_schedule." for its gate's. */
static void seed_prefix(char *buf, size_t n, const char *slot_id, bool gate)
{
    snprintf(buf, n, "seed_slots.%s.%s.", slot_id, gate ? "alpha_schedule" : "seed");
}

/* The optimizer of slot i, if the next step would use it: live, made for the module in the
 * slot, not from before a fossilization, over the slot's parameter count. */
static bool seed_opt_current(ksm_model *m, const struct ksm_train_state *t, int i,
                             struct ksm_param **ps, int *n, int *n_seed)
{
    const struct ksm_model_slot *ms = &m->slots[i];
    const struct seed_opt *so = &t->seeds[i];
    if (!so->live || !ksm_train_slot_has_seed(&ms->s) || so->seed != ms->s.seed) return false;
    if (ms->s.state.stage == KSM_STAGE_FOSSILIZED && !so->fossil) return false;
    struct ksm_params *sp = ksm_seed_params(ms->s.seed);
    *n_seed = ksm_train_seed_params(sp, NULL, ps, KSM_TRAIN_MAX_SEED_P);
    *n = ksm_train_seed_params(sp, ms->s.gate ? ksm_gated_blend_params(ms->s.gate) : NULL, ps,
                               KSM_TRAIN_MAX_SEED_P);
    return so->opt.n == *n;
}

// ---- export ----

static json_t *sgd_json(const struct ksm_sgd_settings *s)
{
    return json_pack("{s:f, s:f, s:f, s:f, s:b}", "lr", s->lr, "momentum", s->momentum,
                     "weight_decay", s->weight_decay, "dampening", s->dampening, "nesterov",
                     s->nesterov);
}

static char *state_json(ksm_model *m, const struct ksm_train_state *t, const bool *seed_live)
{
    const struct ksm_training_config *c = &t->cfg;
    json_t *seeds = json_object();
    for (int i = 0; seeds != NULL && i < m->n_slots; i++)
        if (seed_live[i])
            json_object_set_new(seeds, m->slots[i].s.id,
                                json_pack("{s:b}", "fossilized", t->seeds[i].fossil));
    json_t *o = json_pack(
        "{s:{s:o, s:o, s:f, s:I, s:f, s:f, s:f}, s:b, s:o}", "config", "host", sgd_json(&c->host),
        "seed", sgd_json(&c->seed), "max_grad_norm", c->max_grad_norm, "gradient_telemetry_stride",
        (json_int_t)c->gradient_telemetry_stride, "gradient_ratio_ema", c->gradient_ratio_ema,
        "vanishing_threshold", c->vanishing_threshold, "exploding_threshold",
        c->exploding_threshold, "host_optimizer", t->host_live, "seed_optimizers", seeds);
    if (o == NULL) return NULL;
    /* 17 significant digits: every double reads back as the same double. */
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(o);
    return s;
}

/* One momentum buffer of parameter `full` into x (room for it was counted). */
static int export_buf(struct ksm_train_export *x, ksm_stream *s, const char *full,
                      const ksm_tensor *buf, size_t *off)
{
    size_t nb = ksm_tensor_nbytes(buf), k = x->n;
    snprintf(x->names[k], sizeof x->names[k], KSM_OPTIM_PREFIX "%s" KSM_OPTIM_SUFFIX, full);
    struct ksm_st_tensor *st = &x->ts[k];
    st->name = x->names[k];
    st->dtype = buf->dtype;
    st->ndim = buf->ndim;
    memcpy(st->shape, buf->shape, sizeof st->shape);
    st->data = (char *)x->bytes + *off;
    st->nbytes = nb;
    /* A buffer in host memory is read directly: a model moved after it trained keeps its
     * buffers where they were made (only host memory: TrainStep runs there alone), which need
     * not be the device of s. Nothing writes them: TrainStep synchronises before it returns and
     * the model's lock is held. */
    if (nb && buf->dev != NULL && ksm_device_is_host(buf->dev))
        memcpy((char *)x->bytes + *off, buf->data, nb);
    else if (nb)
        KSM_TRY(ksm_stream_memcpy_async(s, (char *)x->bytes + *off, buf->data, nb, KSM_COPY_D2H));
    *off += nb;
    x->n++;
    return 0;
}

int ksm_train_export_begin(ksm_model *m, ksm_stream *s, struct ksm_train_export *x)
{
    memset(x, 0, sizeof *x);
    const struct ksm_train_state *t = m->train;
    if (t == NULL) return 0;
    struct ksm_params *hp = ksm_host_params(m->host);
    int hidx[KSM_TRAIN_MAX_HOST_P];
    int nh = ksm_train_host_params(hp, hidx, KSM_TRAIN_MAX_HOST_P);
    bool seed_live[KSM_MAX_SLOTS] = {false};
    struct ksm_param *ps[KSM_TRAIN_MAX_SEED_P];
    int n, n_seed;
    /* Count, then copy. */
    size_t count = 0, bytes = 0;
    for (int i = 0; t->host_live && i < nh && i < t->host.n; i++)
        if (t->host.buf[i].data) {
            count++;
            bytes += ksm_tensor_nbytes(&t->host.buf[i]);
        }
    for (int i = 0; i < m->n_slots; i++) {
        if (!(seed_live[i] = seed_opt_current(m, t, i, ps, &n, &n_seed))) continue;
        for (int k = 0; k < n; k++)
            if (t->seeds[i].opt.buf[k].data) {
                count++;
                bytes += ksm_tensor_nbytes(&t->seeds[i].opt.buf[k]);
            }
    }
    int rc = KSM_ENOMEM;
    x->json = state_json(m, t, seed_live);
    x->ts = calloc(count ? count : 1, sizeof *x->ts);
    x->names = calloc(count ? count : 1, sizeof *x->names);
    x->bytes = malloc(bytes ? bytes : 1);
    snprintf(x->step, sizeof x->step, "%llu", (unsigned long long)t->step);
    if (x->json == NULL || x->ts == NULL || x->names == NULL || x->bytes == NULL) goto fail;
    size_t off = 0;
    char full[192], pre[96];
    for (int i = 0; t->host_live && i < nh && i < t->host.n; i++) {
        if (t->host.buf[i].data == NULL) continue;
        snprintf(full, sizeof full, HOST_PREFIX "%s", hp->p[hidx[i]].name);
        if ((rc = export_buf(x, s, full, &t->host.buf[i], &off)) < 0) goto fail;
    }
    for (int i = 0; i < m->n_slots; i++) {
        if (!seed_live[i]) continue;
        seed_opt_current(m, t, i, ps, &n, &n_seed);
        for (int k = 0; k < n; k++) {
            const ksm_tensor *b = &t->seeds[i].opt.buf[k];
            if (b->data == NULL) continue;
            seed_prefix(pre, sizeof pre, m->slots[i].s.id, k >= n_seed);
            snprintf(full, sizeof full, "%s%s", pre, ps[k]->name);
            if ((rc = export_buf(x, s, full, b, &off)) < 0) goto fail;
        }
    }
    return 0;
fail:
    /* Copies already enqueued write into x->bytes: wait for them before it goes. */
    ksm_stream_synchronize(s);
    ksm_train_export_free(x);
    return rc;
}

void ksm_train_export_free(struct ksm_train_export *x)
{
    free(x->ts);
    free(x->names);
    free(x->bytes);
    free(x->json);
    memset(x, 0, sizeof *x);
}

// ---- import ----

struct ksm_train_import {
    struct ksm_train_state *state; /* made here: installing it cannot fail */
    struct ksm_param *seed_ps[KSM_MAX_SLOTS][KSM_TRAIN_MAX_SEED_P];
    int seed_n[KSM_MAX_SLOTS], seed_n_seed[KSM_MAX_SLOTS];
};

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int
bad(char *err, size_t errlen, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ksm_errf(err, errlen, KSM_EFORMAT, "the training state is invalid: %s", msg);
}

static int parse_sgd(json_t *o, const char *which, struct ksm_sgd_settings *s, char *err,
                     size_t errlen)
{
    json_error_t je;
    int nest = 0;
    if (json_unpack_ex(o, &je, JSON_STRICT, "{s:F, s:F, s:F, s:F, s:b}", "lr", &s->lr, "momentum",
                       &s->momentum, "weight_decay", &s->weight_decay, "dampening", &s->dampening,
                       "nesterov", &nest) != 0)
        return bad(err, errlen, "kasmina.training config.%s: %s", which, je.text);
    s->nesterov = nest != 0;
    return 0;
}

static int parse_config(json_t *c, struct ksm_training_config *cfg, char *err, size_t errlen)
{
    json_error_t je;
    json_t *host = NULL, *seed = NULL;
    json_int_t stride = 0;
    memset(cfg, 0, sizeof *cfg);
    if (json_unpack_ex(c, &je, JSON_STRICT, "{s:o, s:o, s:F, s:I, s:F, s:F, s:F}", "host", &host,
                       "seed", &seed, "max_grad_norm", &cfg->max_grad_norm,
                       "gradient_telemetry_stride", &stride, "gradient_ratio_ema",
                       &cfg->gradient_ratio_ema, "vanishing_threshold", &cfg->vanishing_threshold,
                       "exploding_threshold", &cfg->exploding_threshold) != 0)
        return bad(err, errlen, "kasmina.training config: %s", je.text);
    if (stride < 0 || stride > (json_int_t)UINT32_MAX)
        return bad(err, errlen,
                   "kasmina.training config.gradient_telemetry_stride is out of range");
    cfg->gradient_telemetry_stride = (uint32_t)stride;
    KSM_TRY(parse_sgd(host, "host", &cfg->host, err, errlen));
    KSM_TRY(parse_sgd(seed, "seed", &cfg->seed, err, errlen));
    char why[256];
    if (ksm_train_check_config(cfg, why, sizeof why) < 0)
        return bad(err, errlen, "kasmina.training config: %s", why);
    return 0;
}

static int parse_u64(const char *s, uint64_t *out)
{
    if (s == NULL || *s < '0' || *s > '9' || (s[0] == '0' && s[1] != '\0')) return KSM_EFORMAT;
    uint64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
            return KSM_EFORMAT;
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *out = v;
    return 0;
}

static void free_state(struct ksm_train_state *t)
{
    if (t == NULL) return;
    if (t->host_live) ksm_sgd_destroy(&t->host, NULL, 0);
    for (int i = 0; i < KSM_MAX_SLOTS; i++)
        if (t->seeds[i].live) ksm_sgd_destroy(&t->seeds[i].opt, NULL, 0);
    free(t);
}

void ksm_train_import_abort(ksm_model *m, struct ksm_train_import *imp)
{
    (void)m;
    if (imp == NULL) return;
    free_state(imp->state);
    free(imp);
}

/* The optimizer and parameter that momentum-buffer name `full` (a parameter's state_dict name)
 * belongs to, or NULL. */
static struct ksm_param *find_param(ksm_model *m, struct ksm_train_import *imp, const char *full,
                                    struct ksm_sgd **opt, int *index)
{
    struct ksm_train_state *t = imp->state;
    struct ksm_params *hp = ksm_host_params(m->host);
    size_t hl = strlen(HOST_PREFIX);
    if (t->host_live && strncmp(full, HOST_PREFIX, hl) == 0) {
        int hidx[KSM_TRAIN_MAX_HOST_P];
        int nh = ksm_train_host_params(hp, hidx, KSM_TRAIN_MAX_HOST_P);
        for (int i = 0; i < nh; i++)
            if (strcmp(full + hl, hp->p[hidx[i]].name) == 0) {
                *opt = &t->host;
                *index = i;
                return &hp->p[hidx[i]];
            }
        return NULL;
    }
    char pre[96];
    for (int i = 0; i < m->n_slots; i++) {
        if (!t->seeds[i].live) continue;
        for (int k = 0; k < imp->seed_n[i]; k++) {
            seed_prefix(pre, sizeof pre, m->slots[i].s.id, k >= imp->seed_n_seed[i]);
            size_t pl = strlen(pre);
            if (strncmp(full, pre, pl) == 0 && strcmp(full + pl, imp->seed_ps[i][k]->name) == 0) {
                *opt = &t->seeds[i].opt;
                *index = k;
                return imp->seed_ps[i][k];
            }
        }
    }
    return NULL;
}

static bool shape_eq(const ksm_tensor *t, const struct ksm_st_tensor *s)
{
    if (t->ndim != s->ndim) return false;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] != s->shape[i]) return false;
    return true;
}

/* The optimizers f declares (kasmina.training), made empty in imp->state. */
static int declare_optimizers(ksm_model *m, json_t *root, ksm_seed *const *seeds,
                              ksm_gated_blend *const *gates, const struct ksm_slot *states,
                              struct ksm_train_import *imp, char *err, size_t errlen)
{
    struct ksm_train_state *t = imp->state;
    json_error_t je;
    json_t *cfg = NULL, *so = NULL;
    int host = 0;
    if (json_unpack_ex(root, &je, JSON_STRICT, "{s:o, s:b, s:o}", "config", &cfg, "host_optimizer",
                       &host, "seed_optimizers", &so) != 0 ||
        !json_is_object(so))
        return bad(err, errlen, "kasmina.training: %s",
                   json_is_object(so) || so == NULL ? je.text : "seed_optimizers is not an object");
    KSM_TRY(parse_config(cfg, &t->cfg, err, errlen));
    if (host) {
        int hidx[KSM_TRAIN_MAX_HOST_P];
        int nh = ksm_train_host_params(ksm_host_params(m->host), hidx, KSM_TRAIN_MAX_HOST_P);
        struct ksm_sgd_config hc = ksm_train_sgd_config(&t->cfg.host);
        KSM_TRY(ksm_sgd_init(&t->host, &hc, m->alloc, nh));
        t->host_live = true;
    }
    const char *slot;
    json_t *v;
    json_object_foreach(so, slot, v)
    {
        int i = 0;
        while (i < m->n_slots && strcmp(m->slots[i].s.id, slot) != 0) i++;
        if (i == m->n_slots)
            return bad(err, errlen,
                       "kasmina.training names slot \"%.64s\", which the model does not have",
                       slot);
        struct ksm_slot sl = states[i];
        sl.seed = seeds[i];
        if (!ksm_train_slot_has_seed(&sl))
            return bad(err, errlen,
                       "kasmina.training has a seed optimizer for slot %s, which holds no seed "
                       "that trains",
                       slot);
        int fossil = 0;
        if (json_unpack_ex(v, &je, JSON_STRICT, "{s:b}", "fossilized", &fossil) != 0)
            return bad(err, errlen, "kasmina.training seed_optimizers.%s: %s", slot, je.text);
        if (sl.state.stage == KSM_STAGE_FOSSILIZED && !fossil)
            return bad(err, errlen,
                       "kasmina.training seed_optimizers.%s was made before the seed fossilized "
                       "(fossilizing drops it)",
                       slot);
        struct ksm_params *sp = ksm_seed_params(seeds[i]);
        imp->seed_n_seed[i] =
            ksm_train_seed_params(sp, NULL, imp->seed_ps[i], KSM_TRAIN_MAX_SEED_P);
        imp->seed_n[i] =
            ksm_train_seed_params(sp, gates[i] ? ksm_gated_blend_params(gates[i]) : NULL,
                                  imp->seed_ps[i], KSM_TRAIN_MAX_SEED_P);
        struct ksm_sgd_config sc = ksm_train_sgd_config(&t->cfg.seed);
        KSM_TRY(ksm_sgd_init(&t->seeds[i].opt, &sc, m->alloc, imp->seed_n[i]));
        t->seeds[i].live = true;
        t->seeds[i].fossil = fossil != 0;
    }
    return 0;
}

/* Every _kasmina_optim.* tensor of f: checked against its parameter and uploaded on s. */
static int upload_buffers(ksm_model *m, const ksm_st_file *f, struct ksm_train_import *imp,
                          bool *used, ksm_stream *s, char *err, size_t errlen)
{
    size_t pl = strlen(KSM_OPTIM_PREFIX), sl = strlen(KSM_OPTIM_SUFFIX);
    for (size_t i = 0; i < ksm_st_count(f); i++) {
        const struct ksm_st_tensor *st = ksm_st_get(f, i);
        size_t n = strlen(st->name);
        if (strncmp(st->name, KSM_OPTIM_PREFIX, pl) != 0) continue;
        used[i] = true;
        char full[192];
        if (n <= pl + sl || strcmp(st->name + n - sl, KSM_OPTIM_SUFFIX) != 0 ||
            n - pl - sl >= sizeof full)
            return bad(err, errlen, "tensor %.160s is not <parameter>%s", st->name,
                       KSM_OPTIM_SUFFIX);
        memcpy(full, st->name + pl, n - pl - sl);
        full[n - pl - sl] = '\0';
        struct ksm_sgd *o = NULL;
        int k = -1;
        struct ksm_param *p = find_param(m, imp, full, &o, &k);
        if (p == NULL)
            return bad(err, errlen,
                       "tensor %.160s is the momentum of no parameter that a declared "
                       "optimizer steps",
                       st->name);
        if (st->dtype != KSM_DTYPE_F32 || !shape_eq(&p->t, st))
            return bad(err, errlen, "tensor %.160s does not have its parameter's F32 shape",
                       st->name);
        if (o->cfg.momentum == 0.0)
            return bad(err, errlen, "tensor %.160s is a momentum buffer under momentum 0",
                       st->name);
        void *d = NULL;
        size_t nb = st->nbytes;
        int rc = ksm_alloc_malloc(m->alloc, nb ? nb : 1, s, &d);
        if (rc == 0 && nb) rc = ksm_stream_memcpy_async(s, d, st->data, nb, KSM_COPY_H2D);
        if (rc == 0)
            rc = ksm_tensor_init(&o->buf[k], m->dev, d, KSM_DTYPE_F32, p->t.ndim, p->t.shape);
        if (rc != 0) {
            if (d != NULL) {
                ksm_stream_synchronize(s);
                ksm_alloc_free(m->alloc, d);
            }
            o->buf[k].data = NULL;
            return ksm_errf(err, errlen, rc, "could not upload momentum buffer %.160s: %s",
                            st->name, ksm_strerror(rc));
        }
    }
    return 0;
}

int ksm_train_import_prepare(ksm_model *m, const ksm_st_file *f, ksm_seed *const *seeds,
                             ksm_gated_blend *const *gates, const struct ksm_slot *states,
                             bool *used, ksm_stream *s, struct ksm_train_import **out, char *err,
                             size_t errlen)
{
    *out = NULL;
    const char *js = ksm_st_metadata(f, "kasmina.training");
    const char *step = ksm_st_metadata(f, "kasmina.train_step");
    if (js == NULL && step == NULL) {
        for (size_t i = 0; i < ksm_st_count(f); i++)
            if (strncmp(ksm_st_get(f, i)->name, KSM_OPTIM_PREFIX, strlen(KSM_OPTIM_PREFIX)) == 0)
                return bad(err, errlen, "tensor %.160s comes without kasmina.training",
                           ksm_st_get(f, i)->name);
        return 0; /* no training state */
    }
    if (js == NULL || step == NULL)
        return bad(err, errlen, "it has %s but not %s",
                   js ? "kasmina.training" : "kasmina.train_step",
                   js ? "kasmina.train_step" : "kasmina.training");
    struct ksm_train_import *imp = calloc(1, sizeof *imp);
    if (imp == NULL || (imp->state = calloc(1, sizeof *imp->state)) == NULL) {
        free(imp);
        return ksm_errf(err, errlen, KSM_ENOMEM, "out of host memory");
    }
    int rc = parse_u64(step, &imp->state->step);
    if (rc != 0) rc = bad(err, errlen, "kasmina.train_step \"%.32s\" is not a step count", step);
    json_error_t je;
    json_t *root = rc == 0 ? json_loads(js, JSON_REJECT_DUPLICATES, &je) : NULL;
    if (rc == 0 && root == NULL) rc = bad(err, errlen, "kasmina.training is not JSON: %s", je.text);
    if (rc == 0) rc = declare_optimizers(m, root, seeds, gates, states, imp, err, errlen);
    json_decref(root);
    if (rc == 0) rc = upload_buffers(m, f, imp, used, s, err, errlen);
    int rc2 = ksm_stream_synchronize(s);
    if (rc == 0 && rc2 < 0)
        rc = ksm_errf(err, errlen, rc2, "could not upload the momentum buffers: %s",
                      ksm_strerror(rc2));
    if (rc != 0) {
        ksm_train_import_abort(m, imp);
        return rc;
    }
    *out = imp;
    return 0;
}

void ksm_train_import_commit(ksm_model *m, struct ksm_train_import *imp)
{
    ksm_train_state_free(m);
    if (imp == NULL) return;
    struct ksm_train_state *t = imp->state;
    for (int i = 0; i < m->n_slots; i++)
        if (t->seeds[i].live) t->seeds[i].seed = m->slots[i].s.seed;
    m->train = t;
    free(imp);
}
