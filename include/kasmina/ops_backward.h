/*
 * kasmina backward ops: the gradients of the forward ops of kasmina/ops.h, for training.
 *
 * The conventions of kasmina/ops.h hold: every function validates all of its arguments first
 * (KSM_EINVAL, KSM_EDTYPE, KSM_ESHAPE) and enqueues nothing when one fails; 0 means enqueued.
 * All tensors are F32 (indices and labels excepted) and contiguous. Gradient outputs are
 * overwritten, never accumulated into. Where a function takes several optional outputs (NULL
 * skips one), it validates every one of them before it enqueues anything; it then enqueues one
 * op per output.
 *
 * Naming: dy is the gradient of the forward output, dx (da, db, dw, ...) the gradient of the
 * forward input of that name. Values agree with PyTorch autograd in float32 to about 1e-5
 * relative; sums over many elements (broadcast reductions, bias and mean gradients) accumulate
 * in double. See daemon/nn/op.h (the KSM_OP_*_BACKWARD entries) for the exact contracts.
 */
#pragma once

#include <stdint.h>

#include "kasmina/backend.h"
#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---- Elementwise ----

/* dx <- dy * f'(x), dx, dy and x of one shape; dx may be dy (in place). relu: 0 where
 * x <= 0; gelu: the exact (erf) form; clamp01: dy where 0 <= x <= 1 inclusive, else 0 (NaN x
 * gives 0), as torch.clamp's backward. */
int ksm_op_relu_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *x);
int ksm_op_gelu_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *x);
int ksm_op_clamp01_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy,
                            const ksm_tensor *x);
/* sigmoid and tanh take the forward OUTPUT y (as PyTorch does): dy * y * (1 - y), dy * (1 - y^2).
 */
int ksm_op_sigmoid_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy,
                            const ksm_tensor *y);
int ksm_op_tanh_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, const ksm_tensor *y);

/* y = a * b (broadcast): da <- sum_to(dy * b, a's shape), db <- sum_to(dy * a, b's shape).
 * dy has the broadcast shape of a and b; da has a's shape, db b's; either may be NULL. */
int ksm_op_mul_backward(ksm_stream *s, ksm_tensor *da, ksm_tensor *db, const ksm_tensor *dy,
                        const ksm_tensor *a, const ksm_tensor *b);
/* y = a + b (broadcast): da <- sum_to(dy, a's shape), db <- sum_to(dy, b's shape) (double
 * sums); either may be NULL. */
int ksm_op_add_backward(ksm_stream *s, ksm_tensor *da, ksm_tensor *db, const ksm_tensor *dy,
                        const ksm_tensor *a, const ksm_tensor *b);
/* y = lerp(a, b, w) (broadcast): da <- sum_to(dy * (1 - w)), db <- sum_to(dy * w),
 * dw <- sum_to(dy * (b - a)), each to its input's shape (w: a 0-d scalar, [N,1,1,1], ...).
 * Any of da, db, dw may be NULL. */
int ksm_op_lerp_backward(ksm_stream *s, ksm_tensor *da, ksm_tensor *db, ksm_tensor *dw,
                         const ksm_tensor *dy, const ksm_tensor *a, const ksm_tensor *b,
                         const ksm_tensor *w);

// ---- Linear ----

/* y[..., N] = x[..., K] @ w[N, K]^T + bias: dx[..., K] <- dy @ w, dw[N, K] <- dy^T @ x (two
 * sgemm calls, F32 accumulation), db[N] <- the column sums of dy (double). Any of dx, dw, db
 * may be NULL. */
int ksm_op_linear_backward(ksm_stream *s, ksm_tensor *dx, ksm_tensor *dw, ksm_tensor *db,
                           const ksm_tensor *dy, const ksm_tensor *x, const ksm_tensor *w);

// ---- Reductions, pooling, embedding, losses ----

/* y = mean of x over dims [dim_begin, dim_end) (ksm_op_mean): dx (x's shape) <- dy / count,
 * broadcast. dy has ksm_op_mean's output shape (reduced dims dropped or kept as 1). */
int ksm_op_mean_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy, int dim_begin,
                         int dim_end);
/* y = ksm_op_maxpool2(x): dx[N,C,H,W] <- dy[N,C,H/2,W/2] routed to the first maximum of each
 * window (the last NaN when it has one, as PyTorch's CPU kernel); other elements 0. */
int ksm_op_maxpool2_backward(ksm_stream *s, ksm_tensor *dx, const ksm_tensor *dy,
                             const ksm_tensor *x);
/* y[..., D] = weight[V, D][idx[...]]: dw[V, D] <- 0, then dw[idx[r]] += dy[r] for every index
 * in order (deterministic; repeats sum). Indices outside [0, V) are skipped: validate ids on
 * the host first. idx I64 or I32. */
int ksm_op_embedding_backward(ksm_stream *s, ksm_tensor *dw, const ksm_tensor *dy,
                              const ksm_tensor *idx);
/* loss = mean cross-entropy of logits[N, C] against labels[N] (I64):
 * dlogits <- (softmax(logits) - onehot(label)) * dloss / count, count = the rows whose label is
 * not ignore_index (PyTorch's mean); ignored rows get 0. dloss is the gradient of the loss
 * (1 for the loss itself; finite). */
int ksm_op_cross_entropy_backward(ksm_stream *s, ksm_tensor *dlogits, const ksm_tensor *logits,
                                  const ksm_tensor *labels, int64_t ignore_index, float dloss);

#ifdef __cplusplus
}
#endif
