/* Models: moving a model's parameters to another device, atomically (kasmina.h). */
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

/* ---- move ---- */

/* D2H through a host staging buffer, H2D on the destination (works across backends): *np
 * receives t's copy in a block of dalloc (which the caller frees, also on failure). */
static int copy_tensor_to(const ksm_tensor *t, ksm_allocator *dalloc, ksm_stream *ds,
                          ksm_stream *ss, void **np)
{
    size_t nb = ksm_tensor_nbytes(t);
    void *host = malloc(nb ? nb : 1);
    if (host == NULL) return KSM_ENOMEM;
    int rc = ksm_alloc_malloc(dalloc, nb ? nb : 1, ds, np);
    if (rc == 0 && nb) rc = ksm_stream_memcpy_async(ss, host, t->data, nb, KSM_COPY_D2H);
    if (rc == 0) rc = ksm_stream_synchronize(ss);
    if (rc == 0 && nb) rc = ksm_stream_memcpy_async(ds, *np, host, nb, KSM_COPY_H2D);
    if (rc == 0) rc = ksm_stream_synchronize(ds);
    free(host);
    return rc;
}

/* Copies of the n tensors ts[i] that hold memory (tied aliases and empty ones are NULL in ts):
 * *newptrs (malloc'd, n entries) on success; nothing is left allocated on failure. */
static int copy_tensors_to(ksm_tensor *const *ts, int n, ksm_allocator *dalloc, ksm_stream *ds,
                           ksm_stream *ss, void ***newptrs)
{
    void **np = calloc((size_t)(n ? n : 1), sizeof *np);
    if (np == NULL) return KSM_ENOMEM;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++)
        if (ts[i] && ts[i]->data) rc = copy_tensor_to(ts[i], dalloc, ds, ss, &np[i]);
    if (rc < 0) {
        for (int i = 0; i < n; i++)
            if (np[i]) ksm_alloc_free(dalloc, np[i]);
        free(np);
        return rc;
    }
    *newptrs = np;
    return 0;
}

static int copy_params_to(struct ksm_params *ps, ksm_allocator *dalloc, ksm_stream *ds,
                          ksm_stream *ss, void ***newptrs)
{
    ksm_tensor **ts = calloc((size_t)(ps->n ? ps->n : 1), sizeof *ts);
    if (ts == NULL) return KSM_ENOMEM;
    for (int i = 0; i < ps->n; i++) ts[i] = ps->p[i].tied_to >= 0 ? NULL : &ps->p[i].t;
    int rc = copy_tensors_to(ts, ps->n, dalloc, ds, ss, newptrs);
    free(ts);
    return rc;
}

static void adopt_params(ksm_model *m, struct ksm_params *ps, void **np, ksm_device *dst)
{
    ksm_model_release_params(m, ps);
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
        ksm_errf(err, errlen, 0, "dtype %s is not supported: models compute in F32", dn ? dn : "?");
        return (dtype >= 0 && dtype < KSM_DTYPE_COUNT) ? KSM_EUNSUPPORTED : KSM_EINVAL;
    }
    pthread_mutex_lock(&m->lock);
    int rc = 0;
    ksm_device *dst = m->dev;
    if (m->deleted) {
        ksm_errf(err, errlen, 0, "model \"%s\" was deleted", m->id);
        rc = KSM_ENOMODEL;
        goto out;
    }
    if (device && *device) {
        dst = ksm_engine_find_device(m->engine, device);
        if (dst == NULL) {
            ksm_errf(err, errlen, 0, "device \"%s\" does not exist", device);
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
        if (m->slots[i].s.gate) sets[ns++] = ksm_gated_blend_params(m->slots[i].s.gate);
    }
    int k;
    for (k = 0; k < ns; k++) {
        rc = copy_params_to(sets[k], dalloc, ds, sctx->stream, &np[k]);
        if (rc < 0) break;
    }
    /* The optimizers' momentum buffers follow the parameters (train.c). */
    ksm_tensor **mt = NULL;
    void **mnp = NULL;
    int nmt = rc == 0 ? ksm_train_momentum_buffers(m, NULL, 0) : 0;
    if (nmt > 0) {
        if ((mt = calloc((size_t)nmt, sizeof *mt)) == NULL)
            rc = KSM_ENOMEM;
        else
            ksm_train_momentum_buffers(m, mt, nmt);
        if (rc == 0) rc = copy_tensors_to(mt, nmt, dalloc, ds, sctx->stream, &mnp);
    }
    if (rc < 0) {
        free(mt);
        for (int j = 0; j < k; j++) {
            for (int i = 0; i < sets[j]->n; i++)
                if (np[j][i]) ksm_alloc_free(dalloc, np[j][i]);
            free(np[j]);
        }
        ksm_stream_synchronize(ds);
        ksm_stream_free(ds);
        ksm_errf(err, errlen, 0, "could not move model \"%s\" to %s: %s", m->id,
                 ksm_device_name(dst), ksm_strerror(rc));
        goto out;
    }
    ksm_stream_synchronize(ds);
    for (k = 0; k < ns; k++) adopt_params(m, sets[k], np[k], dst);
    if (nmt > 0) {
        ksm_stream *users[KSM_MAX_STREAMS_PER_MODEL];
        int nu = ksm_model_users(m, users, KSM_MAX_STREAMS_PER_MODEL);
        for (int i = 0; i < nmt; i++) {
            for (int u = 0; u < nu; u++) ksm_alloc_record_stream(m->alloc, mt[i]->data, users[u]);
            ksm_alloc_free(m->alloc, mt[i]->data);
            mt[i]->data = mnp[i];
            mt[i]->dev = dst;
        }
        free(mt);
        free(mnp);
    }
    ksm_train_state_moved(m, dalloc);
    ksm_model_invalidate_caches(m);
    m->dev = dst;
    m->alloc = dalloc;
    /* The new blocks belong to ds: it becomes the model's default stream on dst. */
    struct ksm_stream_ctx *nctx;
    if (ksm_model_stream_ctx_new(m, "", ds, &nctx) < 0)
        ksm_stream_free(ds); /* the default stream is re-created on demand */
    m->topo_gen++;
    m->generation++;
out:
    pthread_mutex_unlock(&m->lock);
    return rc;
}
