/*
 * Validating wrappers of the optimizer ops (include/kasmina/ops_optim.h): SGD, sum of squares,
 * scale. Checks, in order: KSM_EINVAL (NULL stream or tensor, another device, NULL data with
 * elements, non-contiguous tensors, overlapping tensors, invalid hyper-parameters), KSM_EDTYPE,
 * KSM_ESHAPE. The tensor checks are local copies of ops.c's (static there), restricted to the
 * contiguous tensors these ops take.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops_optim.h"
#include "nn/op.h"

/* Present, on the stream's device, a valid dtype and ndim, non-negative dims, contiguous (size-1
 * dims ignored), data unless empty. Rewrites nothing: see canon(). */
static int check_contig(ksm_stream *s, const ksm_tensor *t)
{
    if (t == NULL) return KSM_EINVAL;
    if (t->dev != ksm_stream_device(s)) return KSM_EINVAL;
    if (t->ndim < 0 || t->ndim > KSM_MAX_DIMS) return KSM_ESHAPE;
    if ((int)t->dtype < 0 || (int)t->dtype >= (int)KSM_DTYPE_COUNT) return KSM_EDTYPE;
    int64_t n = 1, want = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0) return KSM_ESHAPE;
        if (__builtin_mul_overflow(n, t->shape[i], &n)) return KSM_EINVAL;
    }
    if (n == 0) return 0;
    if (n > INT64_MAX / 8) return KSM_EINVAL;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->stride[i] != want) return KSM_EINVAL;
        want *= t->shape[i];
    }
    if (t->data == NULL) return KSM_EINVAL;
    return 0;
}

/* Row-major strides (t is contiguous). */
static void canon(ksm_tensor *t)
{
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        t->stride[i] = st;
        st *= t->shape[i] > 0 ? t->shape[i] : 1;
    }
}

static bool disjoint(const ksm_tensor *a, const ksm_tensor *b)
{
    size_t na = ksm_tensor_nbytes(a), nb = ksm_tensor_nbytes(b);
    if (na == 0 || nb == 0) return true;
    uintptr_t alo = (uintptr_t)a->data, blo = (uintptr_t)b->data;
    return alo + na <= blo || blo + nb <= alo;
}

int ksm_sgd_config_check(const struct ksm_sgd_config *cfg)
{
    if (cfg == NULL) return KSM_EINVAL;
    const double v[] = {cfg->lr, cfg->momentum, cfg->dampening, cfg->weight_decay};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (!isfinite(v[i]) || v[i] < 0.0) return KSM_EINVAL;
    if (cfg->nesterov && (cfg->momentum <= 0.0 || cfg->dampening != 0.0)) return KSM_EINVAL;
    return 0;
}

int ksm_op_sgd(ksm_stream *s, ksm_tensor *param, const ksm_tensor *grad, ksm_tensor *buf,
               const struct ksm_sgd_config *cfg, bool first)
{
    int rc;
    if (s == NULL || (rc = ksm_sgd_config_check(cfg))) return KSM_EINVAL;
    if ((buf == NULL) != (cfg->momentum == 0.0)) return KSM_EINVAL;
    if ((rc = check_contig(s, param)) || (rc = check_contig(s, grad))) return rc;
    if (buf && (rc = check_contig(s, buf))) return rc;
    if (param->dtype != KSM_DTYPE_F32 || grad->dtype != KSM_DTYPE_F32 ||
        (buf && buf->dtype != KSM_DTYPE_F32))
        return KSM_EDTYPE;
    if (!ksm_tensor_same_shape(param, grad) || (buf && !ksm_tensor_same_shape(param, buf)))
        return KSM_ESHAPE;
    if (!disjoint(param, grad) || (buf && (!disjoint(param, buf) || !disjoint(grad, buf))))
        return KSM_EINVAL;
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_SGD;
    op.n_src = 2;
    op.dst = *param;
    canon(&op.dst);
    op.src[0] = *grad;
    canon(&op.src[0]);
    if (buf) {
        op.src[1] = *buf;
        canon(&op.src[1]);
    }
    op.p.sgd.lr = cfg->lr;
    op.p.sgd.momentum = cfg->momentum;
    op.p.sgd.dampening = cfg->dampening;
    op.p.sgd.weight_decay = cfg->weight_decay;
    op.p.sgd.nesterov = cfg->nesterov;
    op.p.sgd.first = first;
    return ksm_stream_launch(s, &op);
}

int ksm_op_sumsq(ksm_stream *s, ksm_tensor *out, const ksm_tensor *x)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_contig(s, out)) || (rc = check_contig(s, x))) return rc;
    if (out->dtype != KSM_DTYPE_I64 || x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (ksm_tensor_numel(out) != 1) return KSM_ESHAPE;
    if (!disjoint(out, x)) return KSM_EINVAL;
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_SUMSQ;
    op.n_src = 1;
    op.dst = *out;
    canon(&op.dst);
    op.src[0] = *x;
    canon(&op.src[0]);
    return ksm_stream_launch(s, &op);
}

int ksm_op_scale(ksm_stream *s, ksm_tensor *x, double factor)
{
    int rc;
    if (s == NULL) return KSM_EINVAL;
    if ((rc = check_contig(s, x))) return rc;
    if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    struct ksm_op op;
    memset(&op, 0, sizeof op);
    op.type = KSM_OP_SCALE;
    op.n_src = 0;
    op.dst = *x;
    canon(&op.dst);
    op.p.scale.value = factor;
    return ksm_stream_launch(s, &op);
}
