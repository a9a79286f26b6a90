/*
 * CUDA backend plugin: shared internals (C++ / CUDA only; never included by C code).
 *
 * Files of the plugin:
 *   cuda_backend.cu     plugin entry point; backend, device, stream and event vtables
 *   cuda_elementwise.cu COPY, FILL, UNARY, BINARY, LERP, EMBEDDING, BATCHNORM, DROPOUT
 *   cuda_gemm.cu        GEMM, LINEAR, CONV2D (cuBLAS + im2col / depthwise kernels)
 *   cuda_reduce.cu      GROUPNORM, LAYERNORM, SOFTMAX, MEAN, MAXPOOL2, CROSS_ENTROPY, ARGMAX
 *   cuda_attention.cu   SDPA (tiled online softmax)
 *   cuda_optim.cu       SGD, SUMSQ, SCALE
 *   cuda_backward.cu    UNARY_BACKWARD, BROADCAST_GRAD, SUM_ROWS, MEAN_BACKWARD,
 *                       MAXPOOL2_BACKWARD, EMBEDDING_BACKWARD, CROSS_ENTROPY_BACKWARD
 *   cuda_norm_backward.cu   BATCHNORM_TRAIN, BATCHNORM_BACKWARD, GROUPNORM_BACKWARD,
 *                           LAYERNORM_BACKWARD
 *   cuda_conv_backward.cu   CONV2D_BACKWARD (im2col / col2im + cuBLAS)
 *   cuda_attention_backward.cu  SDPA_BACKWARD (recomputed probabilities, double sums)
 *
 * Everything here has hidden visibility: the plugin exports only ksm_backend_plugin_init.
 *
 * Error rule (style.md B6): every CUDA/cuBLAS call goes through KSM_CUDA_TRY / KSM_CUBLAS_TRY,
 * which map the status to a KSM_E* code. cudaErrorMemoryAllocation becomes KSM_EDEVMEM (the
 * error is cleared), cudaErrorNotReady KSM_ENOTREADY; anything else is KSM_EDEVICE and is
 * logged with device, function and statement. A context-corrupting ("sticky") error also marks
 * the device failed. Nothing in the plugin aborts.
 */
#pragma once

/* System and CUDA headers first: their functions live in other libraries (cuBLAS, libstdc++)
 * and must keep default visibility, or the link fails. */
#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <atomic>
#include <math.h>
#include <mutex>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>

/* Hidden by default for the rest of the including translation unit (include this header
 * before any other plugin code). */
#pragma GCC visibility push(hidden)

#include "backend/backend_impl.h"
#include "nn/kmath.h"
#include "nn/op.h"

namespace ksm_cuda
{

/* ---- Logging (through the host's sink) ---- */

/* Set once by the plugin entry point; NULL before (then logging is dropped). */
extern const struct ksm_host_api *g_host;

void log_msg(enum ksm_log_level level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- Objects ---- */

struct device_ctx {
    int ordinal;                  /* CUDA device ordinal */
    std::atomic<int> first_error; /* first sticky error of any stream of the device (or 0) */
    std::atomic<bool> failed;     /* a context-corrupting error was seen */
    int sm_count;
    size_t max_smem_optin; /* cudaDevAttrMaxSharedMemoryPerBlockOptin */
};

struct stream_ctx {
    cudaStream_t stream;
    int ordinal;
    device_ctx *dctx;
    std::atomic<int> sticky; /* first failure of an enqueued operation (or 0) */
    std::mutex blas_mu;      /* guards the lazily created handle and its use */
    cublasHandle_t blas;     /* NULL until the first GEMM-based op */
};

struct event_ctx {
    cudaEvent_t event;
    int ordinal;
    device_ctx *dctx;
};

/* ---- Error mapping ---- */

/* Maps err (logging as described above). dctx may be NULL. Returns 0 for cudaSuccess. */
int check_cuda(cudaError_t err, device_ctx *dctx, int ordinal, const char *func, const char *stmt,
               const char *file, int line);
int check_cublas(cublasStatus_t st, device_ctx *dctx, int ordinal, const char *func,
                 const char *stmt, const char *file, int line);

/* Records err as the stream's sticky error (first wins) and as the device's. Returns err. */
int stream_fail(stream_ctx *sc, int err);

/* Returns the first error among the arguments (they are evaluated in order by the caller). */
#define KSM_CUDA_CHECK(sc, expr)                                                                   \
    ::ksm_cuda::check_cuda((expr), (sc)->dctx, (sc)->ordinal, __func__, #expr, __FILE__, __LINE__)

/* Evaluates a CUDA runtime call in a function returning int; on failure returns the mapped code
 * (sc: the stream_ctx whose device is concerned). */
#define KSM_CUDA_TRY(sc, expr)                                                                     \
    do {                                                                                           \
        int ksm_rc_ = KSM_CUDA_CHECK(sc, expr);                                                    \
        if (ksm_rc_ != 0) return ksm_rc_;                                                          \
    } while (0)

#define KSM_CUBLAS_TRY(sc, expr)                                                                   \
    do {                                                                                           \
        int ksm_rc_ = ::ksm_cuda::check_cublas((expr), (sc)->dctx, (sc)->ordinal, __func__, #expr, \
                                               __FILE__, __LINE__);                                \
        if (ksm_rc_ != 0) return ksm_rc_;                                                          \
    } while (0)

/* After a kernel launch: cudaGetLastError mapped like KSM_CUDA_TRY. */
#define KSM_CUDA_LAUNCH_CHECK(sc, what) KSM_CUDA_TRY(sc, (cudaGetLastError()))

/* Returns the stream's cuBLAS handle, creating it on first use (bound to the stream, plain
 * FP32 math: no TF32). Caller holds sc->blas_mu. */
int blas_handle(stream_ctx *sc, cublasHandle_t *out);

/* ---- Op dispatch (one function per file) ---- */

/* Each returns 0 when every kernel of the op was enqueued, KSM_EUNSUPPORTED when the op/dtype
 * combination has no kernel (nothing enqueued), or a mapped CUDA error. */
int launch_elementwise(stream_ctx *sc, const struct ksm_op *op);
int launch_gemm(stream_ctx *sc, const struct ksm_op *op);
int launch_reduce(stream_ctx *sc, const struct ksm_op *op);
int launch_attention(stream_ctx *sc, const struct ksm_op *op);
int launch_optim(stream_ctx *sc, const struct ksm_op *op);
int launch_backward(stream_ctx *sc, const struct ksm_op *op);
int launch_norm_backward(stream_ctx *sc, const struct ksm_op *op);
int launch_conv_backward(stream_ctx *sc, const struct ksm_op *op);
int launch_attention_backward(stream_ctx *sc, const struct ksm_op *op);

/* 0 when the op can run on this backend, KSM_EUNSUPPORTED otherwise (pure check). */
int op_supported(const struct ksm_op *op);

/* ---- Stream-ordered scratch ---- */

/* bytes of device scratch usable by work enqueued on sc after this call (cudaMallocAsync);
 * release with scratch_free after the last kernel that uses it (stream order keeps it alive). */
static inline int scratch_alloc(stream_ctx *sc, size_t bytes, void **out)
{
    *out = nullptr;
    KSM_CUDA_TRY(sc, cudaMallocAsync(out, bytes > 0 ? bytes : 1, sc->stream));
    return 0;
}

static inline int scratch_free(stream_ctx *sc, void *p)
{
    if (p == nullptr) return 0;
    KSM_CUDA_TRY(sc, cudaFreeAsync(p, sc->stream));
    return 0;
}

/* ---- Shared kernel helpers ---- */

/* A strided view passed by value to kernels: element offset of a row-major linear index. */
struct view {
    int ndim;
    int64_t shape[KSM_MAX_DIMS];
    int64_t stride[KSM_MAX_DIMS];

    __host__ __device__ __forceinline__ int64_t offset(int64_t lin) const
    {
        int64_t off = 0;
        for (int d = ndim - 1; d >= 0; --d) {
            int64_t n = shape[d];
            int64_t q = lin / n;
            off += (lin - q * n) * stride[d];
            lin = q;
        }
        return off;
    }
};

static inline view make_view(const ksm_tensor *t)
{
    view v;
    v.ndim = t->ndim;
    for (int d = 0; d < KSM_MAX_DIMS; ++d) {
        v.shape[d] = d < t->ndim ? t->shape[d] : 1;
        v.stride[d] = d < t->ndim ? t->stride[d] : 0;
    }
    return v;
}

static inline int64_t numel(const ksm_tensor *t)
{
    int64_t n = 1;
    for (int d = 0; d < t->ndim; ++d) n *= t->shape[d];
    return n;
}

/* True when t's strides are row-major for its shape (size-1 dims ignored). */
static inline bool is_contiguous(const ksm_tensor *t)
{
    int64_t expect = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        if (t->shape[d] != 1 && t->stride[d] != expect) return false;
        expect *= t->shape[d];
    }
    return true;
}

/* Grid size for a grid-stride loop over n items with block threads. */
static inline unsigned grid_for(int64_t n, int block)
{
    int64_t g = (n + block - 1) / block;
    if (g < 1) g = 1;
    if (g > (int64_t)1 << 20) g = (int64_t)1 << 20;
    return (unsigned)g;
}

__device__ __forceinline__ float qnan_f32() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, <= 1024). Every thread gets the result.
 * sh: 32 floats of shared memory; the function synchronizes so sh can be reused after. */
__device__ __forceinline__ float block_sum(float v, float *sh)
{
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}

/* block_sum in double (the CPU oracle accumulates norm statistics in double; float sums of
 * values far from 0, e.g. LayerNorm rows around 100, lose ~1e-5 of the mean). */
__device__ __forceinline__ double block_sum_d(double v, double *sh)
{
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float block_max(float v, float *sh)
{
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

} // namespace ksm_cuda

/* No "visibility pop": the whole translation unit that includes this header stays hidden. */
