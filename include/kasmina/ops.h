/*
 * kasmina ops: typed, validating wrappers that enqueue one op on a stream.
 *
 * Every function validates all of its arguments first (devices equal to the stream's device,
 * dtypes, shapes, contiguity, parameter ranges) and returns KSM_EINVAL, KSM_EDTYPE, KSM_ESHAPE
 * or KSM_EUNSUPPORTED without enqueuing anything; 0 means the op was enqueued, not that it has
 * run. Results are visible after the stream (or an event recorded after the op) synchronizes.
 * Memory of every tensor must stay valid until then. Output tensors must not overlap inputs
 * unless stated (elementwise ops allow dst == src exactly).
 *
 * Float ops compute in F32. The math of each element is in daemon/nn/kmath.h, shared by the
 * CPU backend and the CUDA plugin. See daemon/nn/op.h for the exact contract of each op.
 */
#pragma once

#include "kasmina/backend.h"
#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

enum ksm_unary_fn;
enum ksm_binary_fn;

/* dst <- src (same shape; src any strides). Casts F32/F16/BF16 and I64/I32. */
int ksm_op_copy(ksm_stream *s, ksm_tensor *dst, const ksm_tensor *src);
/* Every element of dst <- value. */
int ksm_op_fill(ksm_stream *s, ksm_tensor *dst, double value);

/* Elementwise; x broadcasts to y's shape (NumPy rules). */
int ksm_op_relu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);
int ksm_op_gelu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);
int ksm_op_sigmoid(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);
int ksm_op_tanh(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);
int ksm_op_clamp01(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);
/* y <- a * x + b */
int ksm_op_affine(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, float a, float b);

/* y <- a op b; a and b broadcast to y's shape (NumPy rules). */
int ksm_op_add(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b);
int ksm_op_sub(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b);
int ksm_op_mul(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b);

/* y <- lerp(a, b, w), PyTorch's two-branch formula: w = 0 gives a and w = 1 gives b bit-exactly
 * for finite inputs; a NaN/Inf in b still propagates at w = 0. w broadcasts (a 0-d device
 * scalar, or [N,1,1,1] per sample). */
int ksm_op_lerp(ksm_stream *s, ksm_tensor *y, const ksm_tensor *a, const ksm_tensor *b,
                const ksm_tensor *w);

/* c <- alpha * op(a) @ op(b) + beta * c; 2-D, or 3-D batched (a or b may have batch stride 0).
 * Matrices need stride 1 in the last dim. */
int ksm_op_gemm(ksm_stream *s, ksm_tensor *c, const ksm_tensor *a, const ksm_tensor *b,
                bool trans_a, bool trans_b, float alpha, float beta);
/* y[..., N] <- x[..., K] @ w[N, K]^T + bias[N] (bias may be NULL). */
int ksm_op_linear(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                  const ksm_tensor *bias);

/* Bytes of scratch ksm_op_conv2d needs for these arguments, a pure function of the shapes (0
 * for 1x1 without padding and for depthwise convolutions): at least one image's im2col matrix,
 * more for the CPU backend's per-thread column buffers. */
size_t ksm_op_conv2d_workspace_size(const ksm_tensor *x, const ksm_tensor *w, int pad_h, int pad_w,
                                    int groups);
/* y[N,Co,Ho,Wo] <- conv2d(x[N,Ci,H,W], w[Co,Ci/groups,kh,kw]) + bias[Co] (bias may be NULL);
 * stride 1, zero padding. ws: device scratch of at least the workspace size (may be NULL when
 * that is 0). */
int ksm_op_conv2d(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                  const ksm_tensor *bias, int pad_h, int pad_w, int groups, void *ws,
                  size_t ws_bytes);

/* relu(batchnorm(conv2d(x))): ksm_op_conv2d followed by an eval-mode BatchNorm over the output
 * channels and a ReLU, with the same values as ksm_op_conv2d then ksm_op_batchnorm_relu on y;
 * the CPU backend applies the normalisation to each output tile while it is still in cache, a
 * backend without the fused form runs the two ops. */
int ksm_op_conv2d_bn_relu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *w,
                          const ksm_tensor *bias, int pad_h, int pad_w, int groups, void *ws,
                          size_t ws_bytes, const ksm_tensor *mean, const ksm_tensor *var,
                          const ksm_tensor *weight, const ksm_tensor *bn_bias, float eps);

/* Eval-mode BatchNorm2d (running statistics) over dim 1. */
int ksm_op_batchnorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *mean,
                     const ksm_tensor *var, const ksm_tensor *weight, const ksm_tensor *bias,
                     float eps);
/* relu(batchnorm(x)) in one pass: the same values as ksm_op_batchnorm then ksm_op_relu. */
int ksm_op_batchnorm_relu(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *mean,
                          const ksm_tensor *var, const ksm_tensor *weight, const ksm_tensor *bias,
                          float eps);
/* GroupNorm over dim 1 in groups; weight/bias may be NULL (1 and 0). */
int ksm_op_groupnorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, int groups,
                     const ksm_tensor *weight, const ksm_tensor *bias, float eps);
/* LayerNorm over the last dim; weight/bias may be NULL. */
int ksm_op_layernorm(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const ksm_tensor *weight,
                     const ksm_tensor *bias, float eps);
/* Softmax over the last dim. */
int ksm_op_softmax(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);

/* out[B,H,Tq,hd] <- softmax(q k^T * scale + causal mask) v. scale <= 0 means 1/sqrt(hd).
 * q, k, v, out may be strided views (stride 1 in the last dim). */
int ksm_op_sdpa(ksm_stream *s, ksm_tensor *out, const ksm_tensor *q, const ksm_tensor *k,
                const ksm_tensor *v, bool causal, float scale);

/* ---- Dropout (training) ----
 *
 * A dropout mask is a pure function of its key: element n of a tensor is kept with
 * probability 1 - p and then multiplied by (float)(1 / (1 - p)), or set to 0, as decided by
 * Philox4x32-10 of (seed, step, site, n) (docs/training.md#dropout-masks has the exact
 * definition; daemon/nn/kmath.h the code both backends share). So the CPU and CUDA backends
 * draw the same masks, and the backward regenerates the forward's mask from the key. */
struct ksm_dropout {
    double p;      /* drop probability in [0, 1); 0 = no dropout */
    uint64_t seed; /* the model's init_seed */
    uint64_t step; /* the model's train_step */
    uint32_t site; /* which dropout of the network (< 65536) */
};

/* y <- dropout(x): y and x F32, contiguous, one shape (y may be x exactly); n counts the
 * elements in row-major order (fewer than 2^50). Dropout is linear, so the same call on dy
 * with the same key is its backward. */
int ksm_op_dropout(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, const struct ksm_dropout *d);

/* ksm_op_sdpa with dropout on the attention weights (softmax(q k^T * scale + mask), torch's
 * F.scaled_dot_product_attention(dropout_p=p)): weight (b, h, i, j) is element
 * n = ((b * H + h) * Tq + i) * Tk + j of the mask. d NULL or d->p 0: ksm_op_sdpa. */
int ksm_op_sdpa_dropout(ksm_stream *s, ksm_tensor *out, const ksm_tensor *q, const ksm_tensor *k,
                        const ksm_tensor *v, bool causal, float scale, const struct ksm_dropout *d);

/* y[..., D] <- weight[V, D][idx[...]]; idx I64 or I32. Out-of-range indices give NaN rows:
 * validate ids on the host first. */
int ksm_op_embedding(ksm_stream *s, ksm_tensor *y, const ksm_tensor *weight, const ksm_tensor *idx);
/* Mean over dims [dim_begin, dim_end) of contiguous x: [N,C,H,W] over (2,4) gives [N,C];
 * [B,T,D] over (1,2) gives [B,D]. y holds the remaining dims (contiguous). */
int ksm_op_mean(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x, int dim_begin, int dim_end);
/* 2x2, stride-2 max pool of NCHW x. */
int ksm_op_maxpool2(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x);

/* loss[N] <- cross_entropy(logits[N,C], labels[N] I64), reduction none; ignore_index -> 0. */
int ksm_op_cross_entropy(ksm_stream *s, ksm_tensor *loss, const ksm_tensor *logits,
                         const ksm_tensor *labels, int64_t ignore_index);
/* idx[N] I64 <- argmax over the last dim of x[N,C]. */
int ksm_op_argmax(ksm_stream *s, ksm_tensor *idx, const ksm_tensor *x);

#ifdef __cplusplus
}
#endif
