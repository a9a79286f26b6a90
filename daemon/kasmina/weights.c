/* Load and export weights by esper state_dict names (esper-state-dict.md), atomically. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/model_impl.h"
#include "kasmina/safetensors.h"
#include "kasmina/train_impl.h"

static int push(char ***v, size_t *n, const char *s)
{
    char **nv = realloc(*v, (*n + 1) * sizeof **v);
    if (nv == NULL) return KSM_ENOMEM;
    *v = nv;
    if ((nv[*n] = strdup(s)) == NULL) return KSM_ENOMEM;
    (*n)++;
    return 0;
}

/* One module's parameters with the prefix of their full names. */
struct modset {
    struct ksm_params *ps;
    char prefix[64];
    int slot;  /* index into m->slots, -1 for the host */
    bool gate; /* a slot's gate (else its seed) */
};

static int collect(ksm_model *m, struct modset *sets, int cap, ksm_seed *const *seeds,
                   ksm_gated_blend *const *gates)
{
    int n = 0;
    sets[n].slot = -1;
    sets[n].gate = false;
    sets[n].ps = ksm_host_params(m->host);
    snprintf(sets[n++].prefix, sizeof sets[0].prefix, "host.");
    for (int i = 0; i < m->n_slots && n + 2 <= cap; i++) {
        const char *id = m->slots[i].s.id;
        if (seeds[i]) {
            sets[n].slot = i;
            sets[n].gate = false;
            sets[n].ps = ksm_seed_params(seeds[i]);
            snprintf(sets[n++].prefix, sizeof sets[0].prefix, "seed_slots.%s.seed.", id);
        }
        if (gates[i]) {
            sets[n].slot = i;
            sets[n].gate = true;
            sets[n].ps = ksm_gated_blend_params(gates[i]);
            snprintf(sets[n++].prefix, sizeof sets[0].prefix, "seed_slots.%s.alpha_schedule.", id);
        }
    }
    return n;
}

/* ---- export ---- */

/* The export behind ksm_model_export_weights (want NULL: everything), its subset form (want[i]:
 * slot i is exported; host tensors only when with_host) and, with state, ksm_model_export_state
 * and ksm_model_export_snapshot (the kasmina.* keys and the seal; a snapshot, all slots with the
 * host, also carries the training state: it is a checkpoint). */
static int export_common(ksm_model *m, const bool *want, bool with_host, bool state, void **buf,
                         size_t *len, uint64_t *generation, uint64_t *train_step, char *err,
                         size_t errlen)
{
    /* A snapshot also carries the training state (train_impl.h): it is a checkpoint. */
    bool snapshot = state && want != NULL && with_host;
    struct ksm_train_export tx = {0};
    pthread_mutex_lock(&m->lock);
    ksm_seed *seeds[KSM_MAX_SLOTS];
    ksm_gated_blend *gates[KSM_MAX_SLOTS];
    for (int i = 0; i < m->n_slots; i++) {
        seeds[i] = m->slots[i].s.seed;
        gates[i] = m->slots[i].s.gate;
    }
    struct modset sets[2 * KSM_MAX_SLOTS + 1];
    int ns0 = collect(m, sets, 2 * KSM_MAX_SLOTS + 1, seeds, gates), ns = 0;
    for (int k = 0; k < ns0; k++) {
        bool keep =
            sets[k].slot < 0 ? (want == NULL || with_host) : (want == NULL || want[sets[k].slot]);
        if (keep) sets[ns++] = sets[k];
    }
    char genbuf[32], devbuf[40];
    uint64_t gen = m->generation;
    size_t nt = 0, total = 0;
    for (int k = 0; k < ns; k++)
        for (int i = 0; i < sets[k].ps->n; i++) {
            nt++;
            total += ksm_tensor_nbytes(&sets[k].ps->p[i].t);
        }
    struct ksm_st_tensor *ts = calloc(nt ? nt : 1, sizeof *ts);
    char(*names)[160] = calloc(nt ? nt : 1, sizeof *names);
    char *host = malloc(total ? total : 1);
    const char **meta = calloc((size_t)(2 * m->n_slots + 12), sizeof *meta);
    char **json = calloc((size_t)(m->n_slots + 1), sizeof *json);
    char(*mkeys)[96] = calloc((size_t)(m->n_slots + 1), sizeof *mkeys);
    int rc = 0;
    if (!ts || !names || !host || !meta || !json || !mkeys) {
        rc = KSM_ENOMEM;
        goto out;
    }
    struct ksm_stream_ctx *ctx;
    if ((rc = ksm_model_stream(m, "", &ctx)) < 0) goto out;
    /* Order: host.*, then each slot's seed.* and alpha_schedule.* (registration order). */
    size_t t = 0, off = 0;
    for (int k = 0; k < ns; k++) {
        struct ksm_params *ps = sets[k].ps;
        for (int i = 0; i < ps->n; i++) {
            const ksm_tensor *src = ksm_params_tensor(ps, i);
            size_t nb = ksm_tensor_nbytes(src);
            snprintf(names[t], sizeof names[t], "%s%s", sets[k].prefix, ps->p[i].name);
            ts[t].name = names[t];
            ts[t].dtype = src->dtype;
            ts[t].ndim = src->ndim;
            memcpy(ts[t].shape, src->shape, sizeof ts[t].shape);
            ts[t].data = host + off;
            ts[t].nbytes = nb;
            if (nb && (rc = ksm_stream_memcpy_async(ctx->stream, host + off, src->data, nb,
                                                    KSM_COPY_D2H)) < 0)
                goto out;
            off += nb;
            t++;
        }
    }
    if (snapshot && (rc = ksm_train_export_begin(m, ctx->stream, &tx)) < 0) goto out;
    if ((rc = ksm_stream_synchronize(ctx->stream)) < 0) goto out;
    if (tx.n > 0) {
        struct ksm_st_tensor *all = realloc(ts, (nt + tx.n) * sizeof *ts);
        if (all == NULL) {
            rc = KSM_ENOMEM;
            goto out;
        }
        ts = all;
        memcpy(ts + nt, tx.ts, tx.n * sizeof *ts);
    }
    size_t nm = 0;
    for (int i = 0; i < m->n_slots; i++) {
        if (want != NULL && !want[i]) continue;
        json[i] = ksm_slot_extra_state_json(&m->slots[i].s);
        if (json[i] == NULL) {
            rc = KSM_ENOMEM;
            goto out;
        }
        snprintf(mkeys[i], sizeof mkeys[i], "seed_slots.%s._extra_state", m->slots[i].s.id);
        meta[2 * nm] = mkeys[i];
        meta[2 * nm + 1] = json[i];
        nm++;
    }
    if (state) {
        snprintf(genbuf, sizeof genbuf, "%llu", (unsigned long long)gen);
        snprintf(devbuf, sizeof devbuf, "%s", ksm_device_name(m->dev));
        meta[2 * nm] = "kasmina.generation";
        meta[2 * nm + 1] = genbuf;
        meta[2 * nm + 2] = "kasmina.kind";
        meta[2 * nm + 3] = with_host ? "snapshot" : "slots";
        meta[2 * nm + 4] = "kasmina.device";
        meta[2 * nm + 5] = devbuf;
        /* Sealed below: the CRC32C of the whole blob (io/persist checks snapshots with it). */
        meta[2 * nm + 6] = "kasmina.crc32c";
        meta[2 * nm + 7] = KSM_ST_CRC_PLACEHOLDER;
        nm += 4;
        if (tx.json != NULL) {
            meta[2 * nm] = "kasmina.train_step";
            meta[2 * nm + 1] = tx.step;
            meta[2 * nm + 2] = "kasmina.training";
            meta[2 * nm + 3] = tx.json;
            nm += 2;
        }
    }
    rc = ksm_st_serialize(ts, nt + tx.n, meta, nm, buf, len);
    if (rc == 0 && state && (rc = ksm_st_crc32c_seal(*buf, *len, "kasmina.crc32c")) != 0) {
        free(*buf);
        *buf = NULL;
        *len = 0;
    }
    if (rc == 0 && generation != NULL) *generation = gen;
    if (rc == 0 && train_step != NULL) *train_step = snapshot && m->train ? m->train->step : 0;
out:
    pthread_mutex_unlock(&m->lock);
    ksm_train_export_free(&tx);
    if (rc < 0)
        ksm_errf(err, errlen, 0, "could not export model \"%s\": %s", m->id, ksm_strerror(rc));
    if (json)
        for (int i = 0; i < m->n_slots; i++) free(json[i]);
    free(json);
    free(mkeys);
    free(meta);
    free(host);
    free(names);
    free(ts);
    return rc;
}

int ksm_model_export_weights(ksm_model *m, void **buf, size_t *len, char *err, size_t errlen)
{
    return export_common(m, NULL, true, false, buf, len, NULL, NULL, err, errlen);
}

/* want[i] for each slot named in slot_ids; KSM_ENOSLOT for a name the model lacks, KSM_EINVAL for
 * one named twice when !dup_ok. */
static int want_slots(ksm_model *m, const char *const *slot_ids, int n_slot_ids, bool dup_ok,
                      bool want[KSM_MAX_SLOTS], char *err, size_t errlen)
{
    pthread_mutex_lock(&m->lock);
    int n_slots = m->n_slots;
    int bad = -1, twice = -1;
    for (int k = 0; slot_ids != NULL && k < n_slot_ids && bad < 0 && twice < 0; k++) {
        bad = k;
        for (int i = 0; i < n_slots; i++)
            if (slot_ids[k] != NULL && strcmp(m->slots[i].s.id, slot_ids[k]) == 0) {
                if (want[i] && !dup_ok) twice = k;
                want[i] = true;
                bad = -1;
            }
    }
    pthread_mutex_unlock(&m->lock);
    if (bad >= 0)
        return ksm_errf(err, errlen, KSM_ENOSLOT, "slot \"%s\" is not a slot of model \"%s\"",
                        slot_ids[bad] ? slot_ids[bad] : "", m->id);
    if (twice >= 0)
        return ksm_errf(err, errlen, KSM_EINVAL, "slots[%d] \"%s\" is listed twice", twice,
                        slot_ids[twice]);
    if (slot_ids == NULL)
        for (int i = 0; i < n_slots; i++) want[i] = true;
    return 0;
}

int ksm_model_export_weights_subset(ksm_model *m, const char *const *slot_ids, int n_slot_ids,
                                    bool include_host, void **buf, size_t *len, char *err,
                                    size_t errlen)
{
    if (slot_ids == NULL || n_slot_ids <= 0)
        return ksm_model_export_weights(m, buf, len, err, errlen);
    bool want[KSM_MAX_SLOTS] = {0};
    KSM_TRY(want_slots(m, slot_ids, n_slot_ids, false, want, err, errlen));
    return export_common(m, want, include_host, false, buf, len, NULL, NULL, err, errlen);
}

int ksm_model_export_state(ksm_model *m, const char *const *slot_ids, int n_slot_ids, void **buf,
                           size_t *len, uint64_t *generation, char *err, size_t errlen)
{
    bool want[KSM_MAX_SLOTS] = {0};
    KSM_TRY(want_slots(m, slot_ids, n_slot_ids, true, want, err, errlen));
    return export_common(m, want, slot_ids == NULL, true, buf, len, generation, NULL, err, errlen);
}

int ksm_model_export_snapshot(ksm_model *m, void **buf, size_t *len, uint64_t *generation,
                              uint64_t *train_step, char *err, size_t errlen)
{
    bool want[KSM_MAX_SLOTS];
    for (int i = 0; i < KSM_MAX_SLOTS; i++) want[i] = true;
    return export_common(m, want, true, true, buf, len, generation, train_step, err, errlen);
}

uint64_t ksm_model_checkpoint_step(ksm_model *m)
{
    pthread_mutex_lock(&m->lock);
    uint64_t s = m->checkpoint_step;
    pthread_mutex_unlock(&m->lock);
    return s;
}

void ksm_model_set_checkpoint_step(ksm_model *m, uint64_t step)
{
    pthread_mutex_lock(&m->lock);
    m->checkpoint_step = step;
    pthread_mutex_unlock(&m->lock);
}

/* ---- load ---- */

struct pending {
    struct ksm_param *p; /* destination declaration */
    const struct ksm_st_tensor *src;
    void *buf; /* new device memory */
};

static bool shape_eq(const ksm_tensor *t, const struct ksm_st_tensor *s)
{
    if (t->ndim != s->ndim) return false;
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] != s->shape[i]) return false;
    return true;
}

static void describe_shape(char *b, size_t n, int ndim, const int64_t *shape)
{
    size_t k = (size_t)snprintf(b, n, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(b + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(b + k, n - k, "]");
}

/* restore: a blob of ksm_model_export_state. Slots without state in it keep their modules (and
 * their tensors are not looked for), and the generation is the blob's kasmina.generation. */
static int load_common(ksm_model *m, const void *blob, size_t len, bool strict, bool restore,
                       struct ksm_load_result *res, char *err, size_t errlen)
{
    struct ksm_load_result r = {0};
    ksm_st_file *f = NULL;
    char why[256];
    int rc = ksm_st_parse(blob, len, &f, why, sizeof why);
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "safetensors is not a valid safetensors file: %s", why);
        return rc == KSM_EDTYPE ? KSM_EDTYPE : KSM_EFORMAT;
    }
    uint64_t restored_gen = 0;
    if (restore) {
        const char *g = ksm_st_metadata(f, "kasmina.generation");
        const char *kind = ksm_st_metadata(f, "kasmina.kind");
        char *end = NULL;
        if (g != NULL) restored_gen = strtoull(g, &end, 10);
        if (g == NULL || end == g || *end != '\0' || restored_gen == 0 || kind == NULL ||
            (strcmp(kind, "snapshot") != 0 && strcmp(kind, "slots") != 0)) {
            ksm_errf(err, errlen, 0,
                     "the state blob lacks a valid kasmina.generation or kasmina.kind");
            ksm_st_close(f);
            return KSM_EFORMAT;
        }
        strict = strcmp(kind, "snapshot") == 0;
    }
    pthread_mutex_lock(&m->lock);
    struct ksm_slot *newst = calloc((size_t)KSM_MAX_SLOTS, sizeof *newst);
    bool has_state[KSM_MAX_SLOTS] = {0};
    ksm_seed *seeds[KSM_MAX_SLOTS] = {0};
    ksm_gated_blend *gates[KSM_MAX_SLOTS] = {0};
    bool new_seed[KSM_MAX_SLOTS] = {0}, new_gate[KSM_MAX_SLOTS] = {0};
    /* A journal record ("slots") keeps a slot's modules when they are the ones it had:
     * training changed their tensors since the record was written (see below). */
    bool keep_seed[KSM_MAX_SLOTS] = {0}, keep_gate[KSM_MAX_SLOTS] = {0};
    bool snapshot_restore = restore && strict;
    struct ksm_train_import *imp = NULL;
    struct pending *pend = NULL;
    bool *used = calloc(ksm_st_count(f) + 1, sizeof *used);
    size_t n_pend = 0;
    struct ksm_stream_ctx *ctx = NULL;
    if (newst == NULL || used == NULL) {
        rc = KSM_ENOMEM;
        goto fail;
    }
    if (m->deleted) {
        ksm_errf(err, errlen, 0, "model \"%s\" was deleted", m->id);
        rc = KSM_ENOMODEL;
        goto fail;
    }
    if ((rc = ksm_model_stream(m, "", &ctx)) < 0) goto fail;

    /* 0. A strict load names every slot it carries state for: state for a slot this model does
     * not have is a file meant for another model (esper's load_state_dict(strict=True) refuses
     * unexpected keys the same way). */
    if (strict && !restore) {
        const char *key;
        for (size_t i = 0; (key = ksm_st_metadata_key(f, i)) != NULL; i++) {
            static const char pre[] = "seed_slots.", post[] = "._extra_state";
            size_t kl = strlen(key), pl = sizeof pre - 1, ql = sizeof post - 1;
            if (kl <= pl + ql || strncmp(key, pre, pl) != 0 || strcmp(key + kl - ql, post) != 0)
                continue;
            char sid[KSM_SLOT_ID_MAX + 1];
            size_t sl = kl - pl - ql;
            bool known = false;
            if (sl < sizeof sid) {
                memcpy(sid, key + pl, sl);
                sid[sl] = '\0';
                known = ksm_model_find_slot(m, sid) != NULL;
            }
            if (!known) {
                ksm_errf(err, errlen, 0,
                         "__metadata__ %s is state for slot \"%.*s\", which model \"%s\" does not "
                         "have (a strict load refuses it)",
                         key, (int)(sl < 32 ? sl : 32), key + pl, m->id);
                rc = KSM_EINVAL;
                goto fail;
            }
        }
    }

    /* 1. Slot states from __metadata__, and the modules they require. */
    for (int i = 0; i < m->n_slots; i++) {
        struct ksm_model_slot *ms = &m->slots[i];
        seeds[i] = ms->s.seed;
        gates[i] = ms->s.gate;
        char key[96];
        snprintf(key, sizeof key, "seed_slots.%s._extra_state", ms->s.id);
        const char *js = ksm_st_metadata(f, key);
        if (js == NULL) continue;
        bool need_seed = false, need_gate = false;
        rc = ksm_slot_extra_state_parse(&ms->s, js, &newst[i], &need_seed, &need_gate, why,
                                        sizeof why);
        if (rc < 0) {
            ksm_errf(err, errlen, 0, "__metadata__ %s is invalid: %s", key, why);
            goto fail;
        }
        has_state[i] = true;
        seeds[i] = NULL;
        gates[i] = NULL;
        /* A record of a slot whose seed module this model already holds is about that same
         * module: a seed is only made by Germinate, into a slot that holds none, and a gate only
         * for a slot that holds none, each by a journalled call; so between two records of a
         * slot (or its snapshot and a record) its modules cannot have been replaced unseen. The
         * record's copies of their tensors are as of the record, trained past the last
         * checkpoint when TrainSteps ran in between; the module's own are the checkpoint's (or
         * the germination's, for a seed germinated after it), which is what a restore must give
         * (docs/training.md#durability-and-checkpoints). The seed's identity (blueprint and
         * seed id) is checked as well before it is kept. */
        if (restore && !strict && need_seed && ms->s.seed != NULL && ms->s.occupied &&
            strcmp(ms->s.state.blueprint_id, newst[i].state.blueprint_id) == 0 &&
            strcmp(ms->s.state.seed_id, newst[i].state.seed_id) == 0) {
            keep_seed[i] = true;
            seeds[i] = ms->s.seed;
            need_seed = false;
            if (need_gate && ms->s.gate != NULL) {
                keep_gate[i] = true;
                gates[i] = ms->s.gate;
                need_gate = false;
            }
        }
        if (need_seed) {
            const struct ksm_blueprint *bp =
                ksm_blueprint_find(m->spec.topology, newst[i].state.blueprint_id);
            if (bp == NULL) {
                ksm_errf(err, errlen, 0,
                         "__metadata__ %s names blueprint \"%s\", which is not a %s "
                         "blueprint",
                         key, newst[i].state.blueprint_id, ksm_topology_name(m->spec.topology));
                rc = KSM_ENOBLUEPRINT;
                goto fail;
            }
            if ((rc = ksm_seed_new(bp, ms->s.channels, &seeds[i], why, sizeof why)) < 0) {
                ksm_errf(err, errlen, 0, "slot %s: %s", ms->s.id, why);
                goto fail;
            }
            new_seed[i] = true;
        }
        if (need_gate) {
            if ((rc = ksm_gated_blend_new(ms->s.channels, m->spec.topology, &gates[i], why,
                                          sizeof why)) < 0) {
                ksm_errf(err, errlen, 0, "slot %s: %s", ms->s.id, why);
                goto fail;
            }
            new_gate[i] = true;
        }
    }

    /* 1b. A snapshot's training state, validated and uploaded (nothing installed yet). */
    if (snapshot_restore && (rc = ksm_train_import_prepare(m, f, seeds, gates, newst, used,
                                                           ctx->stream, &imp, err, errlen)) < 0)
        goto fail;

    /* 2. Match names: every declared tensor of the resulting model against the file. */
    struct modset sets[2 * KSM_MAX_SLOTS + 1];
    int ns = collect(m, sets, 2 * KSM_MAX_SLOTS + 1, seeds, gates);
    size_t n_decl = 0;
    for (int k = 0; k < ns; k++) n_decl += (size_t)sets[k].ps->n;
    pend = calloc(n_decl + 1, sizeof *pend);
    if (pend == NULL) {
        rc = KSM_ENOMEM;
        goto fail;
    }
    char full[192], incomplete[192] = "";
    size_t n_incomplete = 0;
    for (int k = 0; k < ns; k++) {
        struct ksm_params *ps = sets[k].ps;
        if (restore && sets[k].slot >= 0 && !has_state[sets[k].slot]) continue;
        if (sets[k].slot >= 0 && (sets[k].gate ? keep_gate : keep_seed)[sets[k].slot]) {
            /* kept: the record's copies of its tensors are not loaded */
            for (int i = 0; i < ps->n; i++) {
                snprintf(full, sizeof full, "%s%s", sets[k].prefix, ps->p[i].name);
                const struct ksm_st_tensor *st = ksm_st_find(f, full);
                if (st != NULL) used[st - ksm_st_get(f, 0)] = true;
            }
            continue;
        }
        for (int i = 0; i < ps->n; i++) {
            struct ksm_param *p = &ps->p[i];
            snprintf(full, sizeof full, "%s%s", sets[k].prefix, p->name);
            const struct ksm_st_tensor *st = ksm_st_find(f, full);
            if (p->tied_to >= 0) {
                /* An alias (host.head.weight): optional; loads the target when the target's
                 * own name is absent, and must agree in shape when present. */
                if (st == NULL) continue;
                used[st - ksm_st_get(f, 0)] = true;
                char tname[192];
                snprintf(tname, sizeof tname, "%s%s", sets[k].prefix, ps->p[p->tied_to].name);
                if (ksm_st_find(f, tname) != NULL) continue;
                p = &ps->p[p->tied_to];
            }
            if (st == NULL) {
                /* A module the file restores (its slot has an _extra_state entry) must be
                 * complete; one it does not keeps its tensors, like the host. */
                if (sets[k].slot >= 0 && has_state[sets[k].slot] && n_incomplete++ == 0)
                    snprintf(incomplete, sizeof incomplete, "%s", full);
                if ((rc = push(&r.missing, &r.n_missing, full)) < 0) goto fail;
                continue;
            }
            used[st - ksm_st_get(f, 0)] = true;
            if (st->dtype != p->t.dtype) {
                ksm_errf(err, errlen, 0, "tensor %s has dtype %s; expected %s", full,
                         ksm_dtype_name(st->dtype), ksm_dtype_name(p->t.dtype));
                rc = KSM_EDTYPE;
                goto fail;
            }
            if (!shape_eq(&p->t, st)) {
                char a[64], b[64];
                describe_shape(a, sizeof a, st->ndim, st->shape);
                describe_shape(b, sizeof b, p->t.ndim, p->t.shape);
                ksm_errf(err, errlen, 0, "tensor %s has shape %s; expected %s", full, a, b);
                rc = KSM_ESHAPE;
                goto fail;
            }
            pend[n_pend].p = p;
            pend[n_pend].src = st;
            n_pend++;
            if ((rc = push(&r.loaded, &r.n_loaded, full)) < 0) goto fail;
        }
    }
    for (size_t i = 0; i < ksm_st_count(f); i++)
        if (!used[i] && (rc = push(&r.unexpected, &r.n_unexpected, ksm_st_get(f, i)->name)) < 0)
            goto fail;
    /* New modules must be complete: a seed without its weights cannot run. */
    if (r.n_missing > 0 && (strict || n_incomplete > 0)) {
        ksm_errf(err, errlen, 0, "tensor %s is missing%s (%zu missing in all)",
                 strict ? r.missing[0] : incomplete,
                 strict ? " and the load is strict" : " and its seed or gate is restored",
                 r.n_missing);
        rc = KSM_EINVAL;
        goto fail;
    }
    if (strict && r.n_unexpected > 0) {
        ksm_errf(err, errlen, 0,
                 "tensor %s is not a tensor of this model and the load is strict "
                 "(%zu unexpected in all)",
                 r.unexpected[0], r.n_unexpected);
        rc = KSM_EINVAL;
        goto fail;
    }

    /* 3. Upload into fresh device memory; nothing of the model changes until all succeeded. */
    for (size_t i = 0; i < n_pend; i++) {
        size_t nb = pend[i].src->nbytes;
        if ((rc = ksm_alloc_malloc(m->alloc, nb ? nb : 1, ctx->stream, &pend[i].buf)) < 0) break;
        if (nb && (rc = ksm_stream_memcpy_async(ctx->stream, pend[i].buf, pend[i].src->data, nb,
                                                KSM_COPY_H2D)) < 0)
            break;
    }
    int rc2 = ksm_stream_synchronize(ctx->stream);
    if (rc == 0) rc = rc2;
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "could not upload the weights to %s: %s", ksm_device_name(m->dev),
                 ksm_strerror(rc));
        goto fail;
    }
    /* New modules not covered by the file (non-strict) would be uninitialised: materialise
     * them first (deterministic init), then overwrite what the file has. */
    for (int i = 0; i < m->n_slots; i++) {
        char prefix[64];
        if (new_seed[i]) {
            snprintf(prefix, sizeof prefix, "seed_slots.%s.seed.", m->slots[i].s.id);
            if ((rc = ksm_params_materialise(ksm_seed_params(seeds[i]), m->alloc, ctx->stream, 0,
                                             prefix)) < 0)
                break;
        }
        if (new_gate[i]) {
            snprintf(prefix, sizeof prefix, "seed_slots.%s.alpha_schedule.", m->slots[i].s.id);
            if ((rc = ksm_params_materialise(ksm_gated_blend_params(gates[i]), m->alloc,
                                             ctx->stream, 0, prefix)) < 0)
                break;
        }
    }
    if (rc < 0) {
        ksm_errf(err, errlen, 0, "could not allocate restored seeds: %s", ksm_strerror(rc));
        goto fail;
    }

    /* 4. Commit: swap buffers, install slot states and modules. */
    ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
    int nu = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
    for (size_t i = 0; i < n_pend; i++) {
        struct ksm_param *p = pend[i].p;
        if (p->t.data) {
            for (int u = 0; u < nu; u++) ksm_alloc_record_stream(m->alloc, p->t.data, users[u]);
            ksm_alloc_free(m->alloc, p->t.data);
        }
        p->t.data = pend[i].buf;
        p->t.dev = m->dev;
        pend[i].buf = NULL;
    }
    for (int k = 0; k < ns; k++) /* refresh aliases */
        for (int i = 0; i < sets[k].ps->n; i++)
            if (sets[k].ps->p[i].tied_to >= 0)
                sets[k].ps->p[i].t = sets[k].ps->p[sets[k].ps->p[i].tied_to].t;
    for (int i = 0; i < m->n_slots; i++) {
        if (!has_state[i]) continue;
        struct ksm_model_slot *ms = &m->slots[i];
        if (!keep_gate[i]) ksm_model_free_gate(m, ms);
        if (!keep_seed[i]) ksm_model_free_seed(m, ms);
        enum ksm_stage was = ms->s.state.stage;
        const struct ksm_slot_env *env = ms->s.env;
        ms->s = newst[i];
        ms->s.env = env;
        ms->s.seed = seeds[i];
        ms->s.gate = gates[i];
        ms->alpha_gen++;
        ms->alpha_stat.invalidations++;
        /* A kept seed that fossilized since loses its optimizer, as ksm_model_advance drops it
         * (a dropped optimizer is never brought back by a later record). */
        if (keep_seed[i] && ms->s.state.stage == KSM_STAGE_FOSSILIZED &&
            was != KSM_STAGE_FOSSILIZED)
            ksm_train_drop_seed(m, i);
    }
    if (snapshot_restore) {
        /* The snapshot is the model's last checkpoint: its training state replaces the
         * model's (none in it: none, train_step 0). */
        ksm_train_import_commit(m, imp);
        imp = NULL;
        m->checkpoint_step = ksm_model_train_step_locked(m);
    }
    m->topo_gen++;
    if (restore)
        m->generation = restored_gen;
    else
        m->generation++;
    ksm_model_touch(m);
    pthread_mutex_unlock(&m->lock);
    free(pend);
    free(used);
    free(newst);
    ksm_st_close(f);
    if (res)
        *res = r;
    else
        ksm_load_result_free(&r);
    return 0;

fail:
    ksm_train_import_abort(m, imp);
    if (pend)
        for (size_t i = 0; i < n_pend; i++)
            if (pend[i].buf) ksm_alloc_free(m->alloc, pend[i].buf);
    for (int i = 0; i < m->n_slots; i++) {
        if (new_seed[i] && seeds[i]) {
            ksm_params_release(ksm_seed_params(seeds[i]), m->alloc, NULL, 0);
            ksm_seed_free(seeds[i]);
        }
        if (new_gate[i] && gates[i]) {
            ksm_params_release(ksm_gated_blend_params(gates[i]), m->alloc, NULL, 0);
            ksm_gated_blend_free(gates[i]);
        }
    }
    pthread_mutex_unlock(&m->lock);
    free(pend);
    free(used);
    free(newst);
    ksm_st_close(f);
    ksm_load_result_free(&r);
    return rc;
}

int ksm_model_load_weights(ksm_model *m, const void *blob, size_t len, bool strict,
                           struct ksm_load_result *res, char *err, size_t errlen)
{
    return load_common(m, blob, len, strict, false, res, err, errlen);
}

int ksm_model_restore_state(ksm_model *m, const void *blob, size_t len, char *err, size_t errlen)
{
    return load_common(m, blob, len, false, true, NULL, err, errlen);
}
