/*
 * SGD, gradient clipping and gradient statistics (optim.h; docs/training.md steps 6-8).
 */
#include "kasmina/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/errors.h"
#include "kasmina/ops_optim.h"

// ---- SGD ----

int ksm_sgd_init(struct ksm_sgd *o, const struct ksm_sgd_config *cfg, ksm_allocator *a, int n)
{
    memset(o, 0, sizeof *o);
    if (a == NULL || n < 0 || ksm_sgd_config_check(cfg)) return KSM_EINVAL;
    o->cfg = *cfg;
    o->alloc = a;
    o->n = n;
    if (n > 0) {
        o->buf = calloc((size_t)n, sizeof *o->buf);
        if (o->buf == NULL) return KSM_ENOMEM;
    }
    return 0;
}

static void free_buf(struct ksm_sgd *o, int i, ksm_stream *const *users, int n_users)
{
    if (o->buf[i].data == NULL) return;
    for (int u = 0; u < n_users; u++) ksm_alloc_record_stream(o->alloc, o->buf[i].data, users[u]);
    ksm_alloc_free(o->alloc, o->buf[i].data);
    o->buf[i].data = NULL;
}

int ksm_sgd_step(struct ksm_sgd *o, ksm_stream *s, const struct ksm_sgd_pair *pairs, int n)
{
    if (o == NULL || s == NULL || (pairs == NULL && n > 0) || n != o->n) return KSM_EINVAL;
    for (int i = 0; i < n; i++)
        if (pairs[i].param == NULL) return KSM_EINVAL;
    const bool mom = o->cfg.momentum != 0.0;
    bool *fresh = NULL;
    if (mom && n > 0 && (fresh = calloc((size_t)n, sizeof *fresh)) == NULL) return KSM_ENOMEM;
    int rc = 0;
    /* 1. every buffer this step creates, or none */
    for (int i = 0; mom && i < n; i++) {
        if (pairs[i].grad == NULL || o->buf[i].data != NULL) continue;
        const ksm_tensor *p = pairs[i].param;
        void *d = NULL;
        size_t nb = ksm_tensor_nbytes(p);
        if ((rc = ksm_alloc_malloc(o->alloc, nb ? nb : 1, s, &d))) goto undo_fresh;
        if ((rc = ksm_tensor_init(&o->buf[i], p->dev, d, KSM_DTYPE_F32, p->ndim, p->shape))) {
            ksm_alloc_free(o->alloc, d);
            o->buf[i].data = NULL;
            goto undo_fresh;
        }
        fresh[i] = true;
    }
    /* 2. the updates */
    int i = 0;
    for (; i < n; i++) {
        if (pairs[i].grad == NULL) continue;
        rc = ksm_op_sgd(s, pairs[i].param, pairs[i].grad, mom ? &o->buf[i] : NULL, &o->cfg,
                        mom && fresh[i]);
        if (rc) break;
    }
    /* a refused op: the parameters before i have stepped (their buffers stay), the rest not */
    for (int k = i; rc && mom && k < n; k++)
        if (fresh[k]) free_buf(o, k, &s, 1);
    free(fresh);
    return rc;

undo_fresh:
    for (int k = 0; mom && k < n; k++)
        if (fresh[k]) free_buf(o, k, &s, 1);
    free(fresh);
    return rc;
}

void ksm_sgd_reset(struct ksm_sgd *o, ksm_stream *const *users, int n_users)
{
    if (o == NULL || o->buf == NULL) return;
    for (int i = 0; i < o->n; i++) free_buf(o, i, users, n_users);
}

void ksm_sgd_destroy(struct ksm_sgd *o, ksm_stream *const *users, int n_users)
{
    if (o == NULL) return;
    ksm_sgd_reset(o, users, n_users);
    free(o->buf);
    memset(o, 0, sizeof *o);
}

size_t ksm_sgd_bytes(const struct ksm_sgd *o)
{
    size_t b = 0;
    for (int i = 0; o && i < o->n; i++)
        if (o->buf[i].data) b += ksm_alloc_block_size(o->alloc, o->buf[i].data);
    return b;
}

// ---- Gradient norms ----

int ksm_grad_sumsq_scratch(ksm_stream *s, double *dev, double *host, const ksm_tensor *const *grads,
                           int n, struct ksm_grad_sq *out)
{
    if (s == NULL || n < 0 ||
        (n > 0 && (grads == NULL || out == NULL || dev == NULL || host == NULL)))
        return KSM_EINVAL;
    memset(out, 0, (size_t)n * sizeof *out);
    if (n == 0) return 0;
    int rc = 0;
    for (int i = 0; i < n; i++) {
        if (grads[i] == NULL) continue;
        ksm_tensor cell;
        const int64_t one = 1;
        ksm_tensor_init(&cell, ksm_stream_device(s), dev + i, KSM_DTYPE_I64, 1, &one);
        if ((rc = ksm_op_sumsq(s, &cell, grads[i]))) goto out;
        out[i].numel = ksm_tensor_numel(grads[i]);
        out[i].present = true;
    }
    if ((rc = ksm_stream_memcpy_async(s, host, dev, (size_t)n * sizeof(double), KSM_COPY_D2H)))
        goto out;
    rc = ksm_stream_synchronize(s);
    for (int i = 0; i < n && rc == 0; i++)
        if (out[i].present) out[i].sumsq = host[i];
out:
    if (rc) {
        ksm_stream_synchronize(s); /* ops already enqueued still write dev */
        memset(out, 0, (size_t)n * sizeof *out);
    }
    return rc;
}

int ksm_grad_sumsq(ksm_stream *s, ksm_allocator *a, const ksm_tensor *const *grads, int n,
                   struct ksm_grad_sq *out)
{
    if (s == NULL || a == NULL || n < 0 || (n > 0 && (grads == NULL || out == NULL)))
        return KSM_EINVAL;
    memset(out, 0, (size_t)n * sizeof *out);
    if (n == 0) return 0;
    double *host = calloc((size_t)n, sizeof *host);
    if (host == NULL) return KSM_ENOMEM;
    void *dev = NULL;
    int rc = ksm_alloc_malloc(a, (size_t)n * sizeof(double), s, &dev);
    if (rc == 0) {
        rc = ksm_grad_sumsq_scratch(s, dev, host, grads, n, out);
        ksm_alloc_free(a, dev);
    }
    free(host);
    return rc;
}

int ksm_clip_grad_norm(ksm_stream *s, ksm_allocator *a, ksm_tensor *const *grads, int n,
                       const struct ksm_grad_sq *sq, double max_norm, double *total)
{
    if (s == NULL || n < 0 || (n > 0 && grads == NULL) || !(max_norm > 0.0)) return KSM_EINVAL;
    struct ksm_grad_sq *own = NULL;
    int rc = 0;
    if (sq == NULL && n > 0) {
        if ((own = calloc((size_t)n, sizeof *own)) == NULL) return KSM_ENOMEM;
        if ((rc = ksm_grad_sumsq(s, a, (const ksm_tensor *const *)grads, n, own))) goto out;
        sq = own;
    }
    double norm = 0.0;
    uint64_t count = 0;
    ksm_grad_group_norm(sq, n, &norm, &count);
    double coef = max_norm / (norm + 1e-6);
    if (coef > 1.0) coef = 1.0; /* torch.clamp(max=1): NaN stays NaN */
    for (int i = 0; i < n; i++) {
        if (grads[i] == NULL) continue;
        if ((rc = ksm_op_scale(s, grads[i], coef))) goto out;
    }
    if (total) *total = norm;
out:
    free(own);
    return rc;
}

// ---- Statistics ----

void ksm_grad_group_norm(const struct ksm_grad_sq *sq, int n, double *norm, uint64_t *count)
{
    double acc = 0.0;
    uint64_t c = 0;
    for (int i = 0; i < n; i++) {
        if (!sq[i].present) continue;
        acc += sq[i].sumsq;
        c += (uint64_t)sq[i].numel;
    }
    *norm = sqrt(acc);
    *count = c;
}

void ksm_grad_seed_stats(const struct ksm_grad_sq *sq, int n, double host_norm, uint64_t host_count,
                         const struct ksm_grad_thresholds *th, struct ksm_seed_grad_stats *out)
{
    memset(out, 0, sizeof *out);
    ksm_grad_group_norm(sq, n, &out->grad_norm, &out->param_count);
    /* DualGradientStats.normalized_ratio */
    if (out->grad_norm < 1e-8 || host_norm < 1e-8 || out->param_count == 0 || host_count == 0) {
        out->normalized_ratio = 0.0;
    } else {
        double seed_rms = out->grad_norm / sqrt((double)out->param_count);
        double host_rms = host_norm / sqrt((double)host_count);
        out->normalized_ratio = seed_rms / (host_rms + 1e-8);
    }
    /* SeedGradientCollector: per-parameter norms */
    int vanishing = 0, exploding = 0, present = 0;
    for (int i = 0; i < n; i++) {
        if (!sq[i].present) continue;
        double ni = sqrt(sq[i].sumsq);
        present++;
        if (ni < th->vanishing) vanishing++;
        if (ni > th->exploding || !isfinite(ni)) exploding++;
    }
    if (present == 0) {
        out->gradient_health = 1.0;
        return;
    }
    double h = 1.0 - 0.5 * vanishing / present - 0.8 * exploding / present;
    out->gradient_health = h < 0.0 ? 0.0 : (h > 1.0 ? 1.0 : h);
    if (!isfinite(out->grad_norm)) out->gradient_health = 0.0;
    out->has_vanishing = vanishing > 0;
    out->has_exploding = exploding > 0;
}

double ksm_grad_ema_fold(bool has_ema, double ema, double r, double beta)
{
    return has_ema ? beta * ema + (1.0 - beta) * r : r;
}
