/*
 * kasmina backward ops for normalisation, convolution and attention, plus train-mode BatchNorm.
 *
 * The conventions of kasmina/ops.h hold: every function validates all of its arguments first
 * and returns KSM_EINVAL, KSM_EDTYPE, KSM_ESHAPE or KSM_EUNSUPPORTED without enqueuing anything;
 * 0 means enqueued. All tensors are F32 and contiguous unless stated. Outputs must not overlap
 * each other or any input. An output given as NULL is not computed (at least one output of each
 * call must be given). Gradients are written, not accumulated: a caller that sums gradients
 * from several uses adds them itself. Reductions over the batch accumulate in double; the
 * results agree with PyTorch autograd in F32 to about 1e-6 relative (tests/golden/
 * gen_backward_nn.py).
 */
#pragma once

#include <stddef.h>

#include "kasmina/backend.h"
#include "kasmina/ops.h"
#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---- BatchNorm2d in train mode ----

/* y <- batchnorm(x[N,C,...]) with the batch's mean and biased variance over every dim but 1
 * (double), eps inside the sqrt; save_mean[C] and save_invstd[C] (1 / sqrt(var + eps)) receive
 * the statistics ksm_op_batchnorm_backward takes. running_mean and running_var (both or neither
 * NULL) are updated in place as torch.nn.BatchNorm2d does: r <- (1 - momentum) * r + momentum *
 * stat in double, stat the mean and the unbiased variance var * n / (n - 1); n = N * H * W must
 * exceed 1 (KSM_ESHAPE). num_batches_tracked is the caller's. weight and bias are required. */
int ksm_op_batchnorm_train(ksm_stream *s, ksm_tensor *y, ksm_tensor *save_mean,
                           ksm_tensor *save_invstd, const ksm_tensor *x, const ksm_tensor *weight,
                           const ksm_tensor *bias, ksm_tensor *running_mean,
                           ksm_tensor *running_var, double momentum, float eps);

// ---- Norm backward ----

/* Gradients of ksm_op_batchnorm_train: dx, dweight[C], dbias[C] (each may be NULL) from dy, x,
 * weight (NULL = 1) and the saved mean and invstd. */
int ksm_op_batchnorm_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dweight, ksm_tensor *dbias,
                              const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *weight,
                              const ksm_tensor *save_mean, const ksm_tensor *save_invstd);
/* Gradients of ksm_op_groupnorm (same groups and eps; the statistics are recomputed from x):
 * dx, dweight[C], dbias[C] (each may be NULL); weight NULL = 1. */
int ksm_op_groupnorm_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dweight, ksm_tensor *dbias,
                              const ksm_tensor *dy, const ksm_tensor *x, int groups,
                              const ksm_tensor *weight, float eps);
/* Gradients of ksm_op_layernorm over the last dim D (statistics recomputed): dx, dweight[D],
 * dbias[D] (each may be NULL); weight NULL = 1. */
int ksm_op_layernorm_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dweight, ksm_tensor *dbias,
                              const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *weight,
                              float eps);

// ---- Convolution backward ----

/* Bytes of scratch ksm_op_conv2d_backward needs (a pure function of the shapes; 0 when the
 * size overflows, which the op then refuses). */
size_t ksm_op_conv2d_backward_workspace_size(const ksm_tensor *x, const ksm_tensor *w, int pad_h,
                                             int pad_w, int groups);
/* Gradients of ksm_op_conv2d (stride 1, zero padding, groups, any kernel size): dx[N,Ci,H,W],
 * dw[Co,Ci/groups,kh,kw], db[Co] (each may be NULL) from dy[N,Co,Ho,Wo], x and w. ws: device
 * scratch of at least the workspace size. */
int ksm_op_conv2d_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dw, ksm_tensor *db,
                           const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *w,
                           int pad_h, int pad_w, int groups, void *ws, size_t ws_bytes);

// ---- Attention backward ----

/* Gradients of ksm_op_sdpa with the same causal rule and scale (scale <= 0 means 1/sqrt(hd)):
 * dq[B,H,Tq,hd], dk and dv[B,H,Tk,hd] (all required) from dout[B,H,Tq,hd], q, k, v. Every
 * tensor may be a strided view with stride 1 in the last dim. The attention probabilities are
 * recomputed. */
int ksm_op_sdpa_backward(ksm_stream *s, ksm_tensor *dq, ksm_tensor *dk, ksm_tensor *dv,
                         const ksm_tensor *dout, const ksm_tensor *q, const ksm_tensor *k,
                         const ksm_tensor *v, bool causal, float scale);
/* The same for ksm_op_sdpa_dropout with the same key d (NULL or p 0: ksm_op_sdpa_backward). */
int ksm_op_sdpa_dropout_backward(ksm_stream *s, ksm_tensor *dq, ksm_tensor *dk, ksm_tensor *dv,
                                 const ksm_tensor *dout, const ksm_tensor *q, const ksm_tensor *k,
                                 const ksm_tensor *v, bool causal, float scale,
                                 const struct ksm_dropout *d);

#ifdef __cplusplus
}
#endif
