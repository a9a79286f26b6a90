/*
 * GatedBlend (docs/blending.md#blend-operators): g =
 * sigmoid(Linear(h,1)(relu(Linear(C,h)(pool(x))))), h = max(8, C // 4), pool = per-sample mean over
 * H,W (CNN) or T (transformer); PyTorch default init.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kasmina/blueprint.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

struct ksm_gated_blend {
    enum ksm_topology topology;
    int channels, hidden;
    struct ksm_params params; /* gate.0.weight, gate.0.bias, gate.2.weight, gate.2.bias */
};

int ksm_gated_blend_new(int channels, enum ksm_topology t, ksm_gated_blend **out, char *err,
                        size_t errlen)
{
    *out = NULL;
    if (channels < 1) {
        if (err) snprintf(err, errlen, "gated blend needs channels >= 1, got %d", channels);
        return KSM_EINVAL;
    }
    if (t != KSM_TOPOLOGY_CNN && t != KSM_TOPOLOGY_TRANSFORMER) {
        if (err) snprintf(err, errlen, "gated blend needs topology cnn or transformer");
        return KSM_EINVAL;
    }
    struct ksm_gated_blend *g = calloc(1, sizeof *g);
    if (g == NULL) return KSM_ENOMEM;
    g->topology = t;
    g->channels = channels;
    g->hidden = channels / 4 > 8 ? channels / 4 : 8;
    int64_t C = channels, h = g->hidden;
    float a0 = (float)(1.0 / sqrt((double)C)), a2 = (float)(1.0 / sqrt((double)h));
    int rc;
    if ((rc = ksm_params_add(&g->params, "gate.0.weight", KSM_DTYPE_F32, 2, (const int64_t[]){h, C},
                             KSM_INIT_UNIFORM, a0, false)) < 0 ||
        (rc = ksm_params_add(&g->params, "gate.0.bias", KSM_DTYPE_F32, 1, (const int64_t[]){h},
                             KSM_INIT_UNIFORM, a0, false)) < 0 ||
        (rc = ksm_params_add(&g->params, "gate.2.weight", KSM_DTYPE_F32, 2, (const int64_t[]){1, h},
                             KSM_INIT_UNIFORM, a2, false)) < 0 ||
        (rc = ksm_params_add(&g->params, "gate.2.bias", KSM_DTYPE_F32, 1, (const int64_t[]){1},
                             KSM_INIT_UNIFORM, a2, false)) < 0) {
        ksm_params_destroy(&g->params);
        free(g);
        return rc;
    }
    *out = g;
    return 0;
}

void ksm_gated_blend_free(ksm_gated_blend *g)
{
    if (g == NULL) return;
    ksm_params_destroy(&g->params);
    free(g);
}

struct ksm_params *ksm_gated_blend_params(ksm_gated_blend *g) { return &g->params; }

int ksm_gated_blend_forward(ksm_gated_blend *g, struct ksm_exec *e, const ksm_tensor *x,
                            ksm_tensor *g_out)
{
    if (g == NULL || e == NULL || x == NULL || g_out == NULL) return KSM_EINVAL;
    if (x->dtype != KSM_DTYPE_F32) return KSM_EDTYPE;
    if (x->dev != e->dev || !ksm_tensor_is_contiguous(x)) return KSM_EINVAL;
    bool cnn = g->topology == KSM_TOPOLOGY_CNN;
    if (cnn ? x->ndim != 4 || x->shape[1] != g->channels
            : x->ndim != 3 || x->shape[2] != g->channels)
        return KSM_ESHAPE;
    int64_t B = x->shape[0];
    KSM_TRY(ksm_exec_tensor(e, g_out, KSM_DTYPE_F32, cnn ? 4 : 3, (const int64_t[]){B, 1, 1, 1}));
    size_t m = ksm_exec_mark(e);
    ksm_tensor p, h, z;
    KSM_TRY(ksm_exec_tensor(e, &p, KSM_DTYPE_F32, 2, (const int64_t[]){B, g->channels}));
    KSM_TRY(ksm_exec_tensor(e, &h, KSM_DTYPE_F32, 2, (const int64_t[]){B, g->hidden}));
    KSM_TRY(ksm_tensor_reshape(&z, g_out, 2, (const int64_t[]){B, 1}));
    const struct ksm_params *ps = &g->params;
    KSM_EXEC(e, ksm_op_mean(e->stream, &p, x, cnn ? 2 : 1, cnn ? 4 : 2));
    KSM_EXEC(e,
             ksm_op_linear(e->stream, &h, &p, ksm_params_tensor(ps, 0), ksm_params_tensor(ps, 1)));
    KSM_EXEC(e, ksm_op_relu(e->stream, &h, &h));
    KSM_EXEC(e,
             ksm_op_linear(e->stream, &z, &h, ksm_params_tensor(ps, 2), ksm_params_tensor(ps, 3)));
    KSM_EXEC(e, ksm_op_sigmoid(e->stream, &z, &z));
    ksm_exec_release(e, m);
    return 0;
}
