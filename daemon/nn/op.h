/*
 * The op descriptor: what a backend executes.
 *
 * ops.c (the typed wrappers of include/kasmina/ops.h) validates every argument, normalises the
 * tensors (sources of elementwise ops are expanded to the destination's shape, stride 0 where
 * broadcast) and fills one struct ksm_op, which the stream copies. Backends may therefore rely
 * on the invariants listed per op below and must not re-validate user input. This header is
 * also compiled as C++ by the CUDA plugin.
 *
 * Unless stated otherwise: float tensors are F32, dst is contiguous, and an absent optional
 * source has data == NULL.
 */
#pragma once

#include "kasmina/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KSM_OP_MAX_SRC        7
#define KSM_SDPA_MAX_HEAD_DIM 256

/* Convolution workspace layout (a pure function of the shapes; ops.c sizes the workspace with
 * it and the CPU backend slices it). The output pixels of each image are cut into column tiles
 * of ksm_conv2d_tile_cols() pixels (several per image only for small batches, so batch 1 still
 * has work for every thread); each tile is an im2col of its pixels into a slice of the
 * workspace followed by one sgemm. ksm_conv2d_slices() threads (at most KSM_CPU_MAX_THREADS)
 * each own one slice of kdim * tile_cols floats. The CUDA plugin only needs one image's
 * kdim * Ho * Wo floats, which the workspace always holds. */
#define KSM_CPU_MAX_THREADS 16

static inline int64_t ksm_conv2d_tile_cols(int64_t n, int64_t howo)
{
    if (n < 1 || howo < 1) return howo > 0 ? howo : 1;
    int64_t want = (2 * KSM_CPU_MAX_THREADS + n - 1) / n; /* tiles per image */
    int64_t most = howo / 64;                             /* no tile under 64 pixels */
    if (want > most) want = most;
    if (want <= 1) return howo;
    int64_t cols = (howo + want - 1) / want;
    cols = (cols + 15) / 16 * 16;
    return cols < howo ? cols : howo;
}

static inline int64_t ksm_conv2d_slices(int64_t n, int64_t howo)
{
    int64_t tc = ksm_conv2d_tile_cols(n, howo);
    int64_t tiles = n * ((howo + tc - 1) / tc);
    return tiles < KSM_CPU_MAX_THREADS ? (tiles > 0 ? tiles : 1) : KSM_CPU_MAX_THREADS;
}

/* 3x3 convolutions with padding 1, one group and at least KSM_WINO_MIN_CH input and output
 * channels run on the CPU as Winograd F(2x2, 3x3): each 4x4 input tile and each 3x3 filter are
 * transformed into 16 points, the channel reduction becomes 16 GEMMs [Co x Ci] x [Ci x tiles],
 * and each 4x4 result is transformed back into a 2x2 output tile (2.25x fewer multiplications
 * than the direct form; the transforms use only the constants 0, +-1 and 1/2, so rounding stays
 * that of a short sum). Tiles are numbered across the whole batch (image, tile row, tile column)
 * and cut into chunks of ksm_wino_chunk() tiles, a pure function of the shapes. The workspace
 * holds the transformed filters (16 Co Ci floats) and one slice per thread of 16 (Ci + Co)
 * chunk floats (transformed inputs, then the GEMM results). */
#define KSM_WINO_MIN_CH 16

static inline int ksm_conv2d_winograd(int64_t ci, int64_t co, int64_t kh, int64_t kw, int64_t ph,
                                      int64_t pw, int64_t groups)
{
    return groups == 1 && kh == 3 && kw == 3 && ph == 1 && pw == 1 && ci >= KSM_WINO_MIN_CH &&
           co >= KSM_WINO_MIN_CH;
}

/* Tiles per chunk: a chunk's transformed inputs and results (16 (Ci + Co) chunk floats) stay
 * within about 1 MiB, so they are still in the core's L2 cache between the three stages. */
static inline int64_t ksm_wino_chunk(int64_t ci, int64_t co)
{
    int64_t t = 16384 / (ci + co);
    t = t / 16 * 16;
    return t < 16 ? 16 : (t > 256 ? 256 : t);
}

/* Floats of workspace for n images of ho x wo outputs (0 on overflow). */
static inline int64_t ksm_wino_workspace_floats(int64_t n, int64_t ci, int64_t co, int64_t ho,
                                                int64_t wo)
{
    int64_t tiles, u, slice, chunks, all;
    if (__builtin_mul_overflow(n, ((ho + 1) / 2) * ((wo + 1) / 2), &tiles) ||
        __builtin_mul_overflow(16 * co, ci, &u) ||
        __builtin_mul_overflow(16 * (ci + co), ksm_wino_chunk(ci, co), &slice))
        return 0;
    chunks = (tiles + ksm_wino_chunk(ci, co) - 1) / ksm_wino_chunk(ci, co);
    if (chunks > KSM_CPU_MAX_THREADS) chunks = KSM_CPU_MAX_THREADS;
    if (chunks < 1) chunks = 1;
    if (__builtin_mul_overflow(slice, chunks, &all) || __builtin_add_overflow(all, u, &all))
        return 0;
    return all;
}

/* Floats of scratch KSM_OP_CONV2D_BACKWARD needs: one group-image column matrix (Ci/g * kh * kw
 * x Ho * Wo), 0 on overflow. */
static inline int64_t ksm_conv2d_backward_ws_floats(int64_t ci, int64_t groups, int64_t kh,
                                                    int64_t kw, int64_t ho, int64_t wo)
{
    int64_t kdim, all;
    if (groups < 1 || __builtin_mul_overflow(ci / groups, kh * kw, &kdim) ||
        __builtin_mul_overflow(kdim, ho * wo, &all))
        return 0;
    return all;
}

enum ksm_op_type {
    /* dst <- src0, same shape, src0 any strides. Converts F32/F16/BF16 among themselves and
     * I64/I32 between themselves; otherwise dtypes are equal. */
    KSM_OP_COPY = 0,
    /* dst <- p.fill.value (any dtype). */
    KSM_OP_FILL,
    /* dst <- f(src0); src0 expanded to dst's shape (any strides). */
    KSM_OP_UNARY,
    /* dst <- src0 (fn) src1; both expanded to dst's shape (any strides, 0 = broadcast). */
    KSM_OP_BINARY,
    /* dst <- lerp(src0, src1, src2) with PyTorch's two-branch formula (ksm_lerp in kmath.h);
     * all three expanded to dst's shape. The weight is used as given (no clamp). */
    KSM_OP_LERP,
    /* dst[b] <- alpha * op(src0[b]) @ op(src1[b]) + beta * dst[b]. All three have ndim 2 or 3
     * (same ndim); matrices have stride 1 in the last dim and row stride >= the row length;
     * batch stride of src0/src1 may be 0 (broadcast). op() transposes when trans_a/trans_b.
     * dst is [.., M, N] with stride 1 in its last dim (row stride may exceed N). */
    KSM_OP_GEMM,
    /* dst[M,N] <- src0[M,K] @ src1[N,K]^T + src2[N] (src2 optional). src0/dst contiguous,
     * flattened over leading dims: M = numel / K. src1 contiguous. */
    KSM_OP_LINEAR,
    /* dst[N,Co,Ho,Wo] <- conv(src0[N,Ci,H,W], src1[Co,Ci/g,kh,kw]) + src2[Co] (optional).
     * Stride 1, dilation 1, zero padding pad_h/pad_w, groups g. Ho = H + 2 pad_h - kh + 1.
     * All contiguous. ws/ws_bytes: scratch of at least ksm_op_conv2d_workspace_size().
     * With p.conv2d.bn_relu, each output is then replaced by relu((y - m) * a + b) per channel,
     * a = weight / sqrt(var + eps) in double rounded to float (src3..src6 = running mean, running
     * var, weight, bias): the values ksm_op_batchnorm_relu computes, while y is in cache. */
    KSM_OP_CONV2D,
    /* Eval-mode BatchNorm over dim 1 of src0[N,C,...]: src1 running_mean[C], src2
     * running_var[C], src3 weight[C], src4 bias[C]; y = (x - m) / sqrt(v + eps) * w + b,
     * followed by ksm_relu (kmath.h) when p.norm.relu is set. */
    KSM_OP_BATCHNORM,
    /* GroupNorm of src0[N,C,...] with p.norm.groups groups; src1 weight[C], src2 bias[C]
     * (both optional: absent = 1 and 0). Biased variance, eps inside the sqrt. */
    KSM_OP_GROUPNORM,
    /* LayerNorm over the last dim D of src0[..., D]; src1 weight[D], src2 bias[D]
     * (optional). */
    KSM_OP_LAYERNORM,
    /* Softmax over the last dim of src0 (contiguous). */
    KSM_OP_SOFTMAX,
    /* Scaled dot-product attention. src0 q[B,H,Tq,hd], src1 k[B,H,Tk,hd], src2 v[B,H,Tk,hd],
     * dst [B,H,Tq,hd]; all four may have any strides with stride 1 in the last dim (so q/k/v
     * can be views into a fused qkv projection and dst a view into [B,T,H,hd]).
     * hd <= KSM_SDPA_MAX_HEAD_DIM. causal: query i attends keys j <= i (+ Tk - Tq offset: 0
     * when Tq == Tk, as in PyTorch's is_causal with equal lengths). scale > 0.
     * With p.sdpa.drop.p > 0 (training: attention-weight dropout), each probability p_ij (the
     * softmax over the visible keys, whose sum uses every term) is multiplied by the dropout
     * factor of element n = ((b * H + h) * Tq + i) * Tk + j (kmath.h) before it weights v_j. */
    KSM_OP_SDPA,
    /* dst[..., D] <- src0[V, D][src1[...]]; src1 I64 or I32 indices. An index outside [0, V)
     * writes NaN for its row: callers validate token ids before they upload them. */
    KSM_OP_EMBEDDING,
    /* Mean of contiguous src0 over dims [dim_begin, dim_end): src0 viewed as
     * [outer, reduce, inner]; dst (contiguous) holds outer * inner elements. */
    KSM_OP_MEAN,
    /* 2x2 max pool with stride 2 of src0[N,C,H,W] -> dst[N,C,H/2,W/2] (floor). NaN wins, as in
     * PyTorch. */
    KSM_OP_MAXPOOL2,
    /* Per-row cross-entropy: dst[N] F32 <- logsumexp(src0[N,C]) - src0[n, src1[n]]; src1 [N]
     * I64 labels. A label equal to p.xent.ignore_index gives 0; any other label outside [0, C)
     * gives NaN. */
    KSM_OP_CROSS_ENTROPY,
    /* dst[N] I64 <- index of the first maximum of each row of src0[N,C] (NaN counts as the
     * maximum, as in PyTorch). */
    KSM_OP_ARGMAX,
    /* ---- optimizer ---- */
    /* One torch.optim.SGD step of one parameter, in place: dst param (read and written), src0
     * grad, src1 momentum buffer (read and written; absent when p.sgd.momentum == 0); all F32,
     * contiguous, the same shape, pairwise disjoint. In F32 with the hyper-parameters rounded
     * to float as PyTorch does (alpha = (float)(1 - dampening), (float)-lr):
     *   d = g + wd * p (wd != 0);  buf = first ? d : momentum * buf + (1 - dampening) * d;
     *   d = nesterov ? d + momentum * buf : buf (momentum != 0);  p = p + (-lr) * d. */
    KSM_OP_SGD,
    /* Sum of squares of src0 (F32, contiguous, any shape), accumulated in double, written as
     * the 8 bytes of one IEEE double into dst: an I64 tensor of one element (the project has no
     * F64 dtype; the element is a carrier, read back with memcpy). Non-finite values propagate.
     * The result does not depend on the thread count. */
    KSM_OP_SUMSQ,
    /* dst <- dst * (float)p.scale.value, in place (F32, contiguous). */
    KSM_OP_SCALE,
    /* ---- backward: elementwise, linear, reductions, losses ---- */
    /* dst (dx) <- d f(x)/dx * src0 (dy), f = p.unary.fn (RELU, GELU, SIGMOID, TANH, CLAMP01);
     * src1 is the forward input x for RELU, GELU and CLAMP01 and the forward output y for
     * SIGMOID and TANH (kmath.h's ksm_*_grad). dst, src0, src1 contiguous, one shape; dst may
     * equal src0 exactly. */
    KSM_OP_UNARY_BACKWARD,
    /* dst <- f(src0 (dy), src1, src2, src3) summed over the dims where dst broadcasts to dy's
     * shape (f = p.bgrad.fn, kmath.h's ksm_bgrad). src0 contiguous with the full shape F;
     * src1..src3 expanded to F (stride 0 where broadcast); dst contiguous, ndim <= F's,
     * right-aligned, each dim equal to F's or 1. Sums accumulate in double, in index order. */
    KSM_OP_BROADCAST_GRAD,
    /* dst[N] <- sum over the rows of contiguous src0[M, N], in double (a linear layer's bias
     * gradient). */
    KSM_OP_SUM_ROWS,
    /* dst (x's shape, contiguous) <- src0 / count broadcast over dims [dim_begin, dim_end)
     * (p.mean): src0 contiguous with outer * inner elements, count = the reduced elements. */
    KSM_OP_MEAN_BACKWARD,
    /* dst[N,C,H,W] <- the gradient of KSM_OP_MAXPOOL2: src0 dy[N,C,H/2,W/2], src1 x[N,C,H,W].
     * Each window's gradient goes to the first maximum in window order, or to the last NaN
     * when the window has one (PyTorch's CPU kernel); rows and columns left out by the floor
     * get 0. */
    KSM_OP_MAXPOOL2_BACKWARD,
    /* dst[V, D] <- 0, then dst[src1[r]] += src0[r] for every index r in order (src0 dy
     * [R, D], src1 I64/I32 [R]); an index outside [0, V) is skipped. */
    KSM_OP_EMBEDDING_BACKWARD,
    /* dst[N, C] <- (softmax(src0[N, C]) - onehot(src1[N])) * p.xent_bw.scale / count, count =
     * the rows whose label is not p.xent_bw.ignore_index (mean cross-entropy, as PyTorch);
     * ignored rows get 0, a row with another label outside [0, C) or a non-finite maximum gets
     * NaN. src1 I64. */
    KSM_OP_CROSS_ENTROPY_BACKWARD,
    /* ---- backward: norms, convolution, attention ---- */
    /* Ops with several results write dst and the sources marked (out); an absent (out) or an
     * absent dst (data == NULL, its shape still given) is not computed. Outputs never overlap
     * each other or an input. Reductions over the batch accumulate in double. */
    /* Train-mode BatchNorm over dim 1 of src0 x[N,C,...] (n = N * inner > 1 values per channel):
     * dst y = (x - mean) * invstd * w + b with the batch mean and biased variance in double,
     * invstd = 1 / sqrt(var + eps); src1 weight[C], src2 bias[C]; src3 running_mean[C] and src4
     * running_var[C] (in/out, both or neither) become (1 - momentum) * r + momentum * stat in
     * double, stat = mean and var * n / (n - 1) (as PyTorch); src5 save_mean[C] and src6
     * save_invstd[C] (out, required): what KSM_OP_BATCHNORM_BACKWARD takes. */
    KSM_OP_BATCHNORM_TRAIN,
    /* dst dx[N,C,...] of train-mode BatchNorm from src0 dy, src1 x, src2 weight[C] (optional:
     * 1), src3 save_mean[C], src4 save_invstd[C]; src5 dweight[C] (out), src6 dbias[C] (out). */
    KSM_OP_BATCHNORM_BACKWARD,
    /* dst dx[N,C,...] of KSM_OP_GROUPNORM (p.norm.groups, p.norm.eps; statistics recomputed in
     * double) from src0 dy, src1 x, src2 weight[C] (optional); src3 dweight[C] (out), src4
     * dbias[C] (out). */
    KSM_OP_GROUPNORM_BACKWARD,
    /* dst dx[..., D] of KSM_OP_LAYERNORM (p.norm.eps; statistics recomputed) from src0 dy, src1
     * x, src2 weight[D] (optional); src3 dweight[D] (out), src4 dbias[D] (out). */
    KSM_OP_LAYERNORM_BACKWARD,
    /* dst dx[N,Ci,H,W] of KSM_OP_CONV2D (p.conv2d pad_h, pad_w, groups; bn_relu unset) from
     * src0 dy[N,Co,Ho,Wo], src1 x, src2 w[Co,Ci/g,kh,kw]; src3 dw (out), src4 db[Co] (out). All
     * contiguous. ws: at least ksm_conv2d_backward_ws_floats() floats. */
    KSM_OP_CONV2D_BACKWARD,
    /* dst dq[B,H,Tq,hd] of KSM_OP_SDPA (p.sdpa causal and scale, the forward's rule) from src0
     * dout[B,H,Tq,hd], src1 q, src2 k[B,H,Tk,hd], src3 v; src4 dk (out), src5 dv (out), all
     * required. Any strides with stride 1 in the last dim; probabilities are recomputed.
     * p.sdpa.drop as the forward's: the same factors scale p_ij in dv and dp_ij. */
    KSM_OP_SDPA_BACKWARD,
    /* ---- training ---- */
    /* dst <- src0 * f(n) for each element n in row-major order, f the dropout factor of
     * p.dropout (kmath.h: (float)(1 / (1 - p)) kept, 0 dropped); dst and src0 F32,
     * contiguous, one shape, dst == src0 exactly or disjoint. Dropout is linear: the same op
     * with the same key is its backward. */
    KSM_OP_DROPOUT,
    KSM_OP_COUNT
};

enum ksm_unary_fn {
    KSM_UNARY_RELU = 0,
    KSM_UNARY_GELU, /* exact erf form */
    KSM_UNARY_SIGMOID,
    KSM_UNARY_TANH,
    KSM_UNARY_CLAMP01, /* min(max(x, 0), 1); NaN stays NaN */
    KSM_UNARY_AFFINE,  /* a * x + b */
    KSM_UNARY_COUNT
};

enum ksm_binary_fn { KSM_BINARY_ADD = 0, KSM_BINARY_SUB, KSM_BINARY_MUL, KSM_BINARY_COUNT };

/* KSM_OP_BROADCAST_GRAD's per-element function of g = src0 and the sources s1..s3. */
enum ksm_bgrad_fn {
    KSM_BGRAD_SUM = 0, /* g (add: sum_to_size) */
    KSM_BGRAD_MUL,     /* g * s1 (mul: the other factor) */
    KSM_BGRAD_LERP_A,  /* g * (1 - s3), sources (a, b, w) */
    KSM_BGRAD_LERP_B,  /* g * s3 */
    KSM_BGRAD_LERP_W,  /* g * (s2 - s1) */
    KSM_BGRAD_COUNT
};

/* A dropout mask (kmath.h, docs/training.md#dropout-masks): drop probability p in [0, 1)
 * (0 = none) and the key (seed, step, site < 2^16). */
struct ksm_op_dropout {
    double p;
    uint64_t seed, step;
    uint32_t site;
};

struct ksm_op {
    enum ksm_op_type type;
    int n_src;
    ksm_tensor dst;
    ksm_tensor src[KSM_OP_MAX_SRC];
    void *ws; /* device scratch (only KSM_OP_CONV2D uses it) */
    size_t ws_bytes;
    union {
        struct {
            enum ksm_unary_fn fn;
            float a, b;
        } unary;
        struct {
            enum ksm_binary_fn fn;
        } binary;
        struct {
            int trans_a, trans_b;
            float alpha, beta;
        } gemm;
        struct {
            int pad_h, pad_w, groups;
            int bn_relu; /* epilogue relu(batchnorm(y)) with src3..6 = mean, var, weight, bias */
            float bn_eps;
        } conv2d;
        struct {
            float eps;
            int groups;
            int relu; /* BATCHNORM: ReLU epilogue */
        } norm;
        struct {
            int causal;
            float scale;
            struct ksm_op_dropout drop; /* p 0: none */
        } sdpa;
        struct ksm_op_dropout dropout; /* KSM_OP_DROPOUT */
        struct {
            int dim_begin, dim_end;
        } mean;
        struct {
            int64_t ignore_index;
        } xent;
        struct {
            double value;
        } fill;
        struct {
            double lr, momentum, dampening, weight_decay;
            int nesterov;
            int first; /* the buffer's first step: buf = d, as torch when it creates it */
        } sgd;
        struct {
            double value;
        } scale;
        struct {
            enum ksm_bgrad_fn fn;
        } bgrad;
        struct {
            int64_t ignore_index;
            float scale; /* d loss (1 for the loss itself) */
        } xent_bw;
        struct {
            double momentum;
            float eps;
        } bn_train; /* KSM_OP_BATCHNORM_TRAIN */
    } p;
};

/* Name of an op type ("conv2d"), for logs and conformance reports. */
const char *ksm_op_name(enum ksm_op_type type);

#ifdef __cplusplus
}
#endif
