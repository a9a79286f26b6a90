/*
 * kasmina optimizer ops: one torch.optim.SGD step of a parameter, the sum of squares of a
 * gradient (for norms and clipping) and an in-place scale (clip_grad_norm_'s multiply).
 *
 * Same contract as include/kasmina/ops.h: every argument is validated first (KSM_EINVAL,
 * KSM_EDTYPE, KSM_ESHAPE) and nothing is enqueued when a check fails; 0 means enqueued. Every
 * tensor must be on the stream's device, F32 unless stated, contiguous, and stay valid until
 * the stream has run the op. daemon/nn/op.h gives the exact arithmetic of each op.
 */
#pragma once

#include <stdbool.h>

#include "kasmina/backend.h"
#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* torch.optim.SGD's hyper-parameters (api SgdConfig). Valid: all finite, lr, momentum,
 * dampening and weight_decay >= 0; nesterov needs momentum > 0 and dampening == 0 (torch
 * raises otherwise). */
struct ksm_sgd_config {
    double lr;           /* esper default 0.01 */
    double momentum;     /* 0.9 */
    double dampening;    /* 0 */
    double weight_decay; /* host 5e-4, seeds 0 */
    bool nesterov;       /* false */
};

/* 0 when cfg is valid, else KSM_EINVAL. */
int ksm_sgd_config_check(const struct ksm_sgd_config *cfg);

/* One SGD step of param with grad, in place. buf: the parameter's momentum buffer (same shape;
 * read and written), NULL exactly when cfg->momentum == 0. first: the buffer's first step
 * (torch creates it as a copy of the decayed gradient; its old contents are not read). param,
 * grad and buf must not overlap. */
int ksm_op_sgd(ksm_stream *s, ksm_tensor *param, const ksm_tensor *grad, ksm_tensor *buf,
               const struct ksm_sgd_config *cfg, bool first);

/* out <- sum of x's squared elements, accumulated in double: out is an I64 tensor of exactly
 * one element (e.g. a one-element view into an [n] buffer) that receives the 8 bytes of the
 * IEEE double; read it back with memcpy into a double. Inf and NaN propagate. */
int ksm_op_sumsq(ksm_stream *s, ksm_tensor *out, const ksm_tensor *x);

/* x <- x * (float)factor, in place. */
int ksm_op_scale(ksm_stream *s, ksm_tensor *x, double factor);

#ifdef __cplusplus
}
#endif
