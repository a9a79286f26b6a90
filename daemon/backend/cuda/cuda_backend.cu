/*
 * CUDA backend plugin: entry point and the backend/device/stream/event vtables.
 *
 * libkasmina dlopens libkasmina_cuda.so and calls ksm_backend_plugin_init (the only exported
 * symbol). The plugin links cudart statically and cuBLAS dynamically; it links nothing of
 * libkasmina and reaches the host only through struct ksm_host_api (logging, stream ids).
 *
 * Threading: every vtable function may be called from any thread, so each one selects its
 * device with cudaSetDevice first (the current device is per host thread). A stream's cuBLAS
 * handle is created lazily and used under the stream's mutex.
 *
 * Sticky errors: the first failure of work enqueued on a stream (a failed launch or copy, or an
 * error reported by cudaStreamSynchronize/Query) is stored in the stream and returned by every
 * later call on it; it is also the device's first error (ksm_device_synchronize). Argument
 * problems found before anything is enqueued (KSM_EUNSUPPORTED, KSM_EINVAL) and KSM_EDEVMEM are
 * returned without making the stream sticky: the stream's state did not change.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

const struct ksm_host_api *g_host = nullptr;

void log_msg(enum ksm_log_level level, const char *fmt, ...)
{
    const struct ksm_host_api *h = g_host;
    if (h == nullptr || h->log_write == nullptr) return;
    if (h->log_get_level != nullptr && (int)level > (int)h->log_get_level()) return;
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    h->log_write(level, "cuda", buf);
}

/* Errors after which the CUDA context is unusable: every later call of the process on the
 * device returns them again. */
static bool is_sticky_error(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorAssert: return true;
    default: return false;
    }
}

int check_cuda(cudaError_t err, device_ctx *dctx, int ordinal, const char *func, const char *stmt,
               const char *file, int line)
{
    if (err == cudaSuccess) return 0;
    if (err == cudaErrorNotReady) {
        /* Not an error; make sure it does not linger as the thread's last error. */
        if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
        return KSM_ENOTREADY;
    }
    if (err == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError(); /* recoverable: clear it so later checks do not see it */
        log_msg(KSM_LOG_DEBUG, "cuda:%d: %s: %s: out of device memory", ordinal, func, stmt);
        return KSM_EDEVMEM;
    }
    bool sticky = is_sticky_error(err);
    if (!sticky) (void)cudaGetLastError();
    if (sticky && dctx != nullptr) dctx->failed.store(true);
    log_msg(KSM_LOG_ERROR, "cuda:%d: %s: %s failed: %s (%s)%s [%s:%d]", ordinal, func, stmt,
            cudaGetErrorName(err), cudaGetErrorString(err),
            sticky ? "; the device context is lost, device marked failed" : "", file, line);
    return KSM_EDEVICE;
}

int check_cublas(cublasStatus_t st, device_ctx *dctx, int ordinal, const char *func,
                 const char *stmt, const char *file, int line)
{
    switch (st) {
    case CUBLAS_STATUS_SUCCESS: return 0;
    case CUBLAS_STATUS_ALLOC_FAILED:
        log_msg(KSM_LOG_DEBUG, "cuda:%d: %s: %s: cuBLAS could not allocate", ordinal, func, stmt);
        return KSM_EDEVMEM;
    default: break;
    }
    /* An execution failure usually comes with a sticky CUDA error; surface it if so. */
    cudaError_t ce = cudaPeekAtLastError();
    if (ce != cudaSuccess && is_sticky_error(ce) && dctx != nullptr) dctx->failed.store(true);
    if (ce != cudaSuccess && !is_sticky_error(ce)) (void)cudaGetLastError();
    log_msg(KSM_LOG_ERROR, "cuda:%d: %s: %s failed: %s (%s) [%s:%d]", ordinal, func, stmt,
            cublasGetStatusName(st), cublasGetStatusString(st), file, line);
    return st == CUBLAS_STATUS_NOT_SUPPORTED ? KSM_EUNSUPPORTED : KSM_EDEVICE;
}

int stream_fail(stream_ctx *sc, int err)
{
    int expected = 0;
    sc->sticky.compare_exchange_strong(expected, err);
    expected = 0;
    sc->dctx->first_error.compare_exchange_strong(expected, err);
    return sc->sticky.load();
}

int blas_handle(stream_ctx *sc, cublasHandle_t *out)
{
    if (sc->blas == nullptr) {
        cublasHandle_t h = nullptr;
        KSM_CUBLAS_TRY(sc, cublasCreate(&h));
        int rc = check_cublas(cublasSetStream(h, sc->stream), sc->dctx, sc->ordinal, __func__,
                              "cublasSetStream(h, sc->stream)", __FILE__, __LINE__);
        /* Plain FP32: CUBLAS_DEFAULT_MATH never uses TF32 tensor cores for SGEMM, so results
         * agree with the CPU oracle to FP32 rounding. */
        if (rc == 0)
            rc = check_cublas(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), sc->dctx, sc->ordinal,
                              __func__, "cublasSetMathMode(h, CUBLAS_DEFAULT_MATH)", __FILE__,
                              __LINE__);
        if (rc != 0) {
            cublasDestroy(h);
            return rc;
        }
        sc->blas = h;
    }
    *out = sc->blas;
    return 0;
}

/* ---- Op support ---- */

static bool is_float(enum ksm_dtype t)
{
    return t == KSM_DTYPE_F32 || t == KSM_DTYPE_F16 || t == KSM_DTYPE_BF16;
}

static bool is_int(enum ksm_dtype t) { return t == KSM_DTYPE_I64 || t == KSM_DTYPE_I32; }

int op_supported(const struct ksm_op *op)
{
    const ksm_tensor *s = op->src;
    const int F32 = KSM_DTYPE_F32;
    bool ok = false;
    switch (op->type) {
    case KSM_OP_COPY:
        ok = (is_float(op->dst.dtype) && is_float(s[0].dtype)) ||
             (is_int(op->dst.dtype) && is_int(s[0].dtype));
        break;
    case KSM_OP_FILL: ok = (int)op->dst.dtype >= 0 && op->dst.dtype < KSM_DTYPE_COUNT; break;
    case KSM_OP_UNARY:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && (int)op->p.unary.fn >= 0 &&
             op->p.unary.fn < KSM_UNARY_COUNT;
        break;
    case KSM_OP_BINARY:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == F32 &&
             (int)op->p.binary.fn >= 0 && op->p.binary.fn < KSM_BINARY_COUNT;
        break;
    case KSM_OP_LERP:
    case KSM_OP_SDPA:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == F32 && s[2].dtype == F32;
        if (op->type == KSM_OP_SDPA)
            ok = ok && op->dst.ndim == 4 && s[0].shape[3] <= KSM_SDPA_MAX_HEAD_DIM;
        break;
    case KSM_OP_GEMM: ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == F32; break;
    case KSM_OP_LINEAR:
    case KSM_OP_CONV2D:
    case KSM_OP_GROUPNORM:
    case KSM_OP_LAYERNORM:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == F32;
        if (s[1].data == nullptr) ok = op->dst.dtype == F32 && s[0].dtype == F32;
        if (s[2].data != nullptr) ok = ok && s[2].dtype == F32;
        /* no fused BatchNorm epilogue yet: ksm_op_conv2d_bn_relu then runs the two ops */
        if (op->type == KSM_OP_CONV2D && op->p.conv2d.bn_relu) ok = false;
        break;
    case KSM_OP_BATCHNORM:
        ok = op->dst.dtype == F32;
        for (int i = 0; i < 5; ++i) ok = ok && s[i].dtype == F32;
        break;
    case KSM_OP_SOFTMAX:
    case KSM_OP_MEAN:
    case KSM_OP_MAXPOOL2: ok = op->dst.dtype == F32 && s[0].dtype == F32; break;
    case KSM_OP_EMBEDDING:
    case KSM_OP_CROSS_ENTROPY:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && is_int(s[1].dtype);
        break;
    case KSM_OP_ARGMAX: ok = op->dst.dtype == KSM_DTYPE_I64 && s[0].dtype == F32; break;
    case KSM_OP_SGD:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 &&
             (op->p.sgd.momentum == 0.0 || s[1].dtype == F32);
        break;
    case KSM_OP_SUMSQ: ok = op->dst.dtype == KSM_DTYPE_I64 && s[0].dtype == F32; break;
    case KSM_OP_SCALE: ok = op->dst.dtype == F32; break;
    case KSM_OP_UNARY_BACKWARD:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == F32 &&
             (op->p.unary.fn == KSM_UNARY_RELU || op->p.unary.fn == KSM_UNARY_GELU ||
              op->p.unary.fn == KSM_UNARY_SIGMOID || op->p.unary.fn == KSM_UNARY_TANH ||
              op->p.unary.fn == KSM_UNARY_CLAMP01);
        break;
    case KSM_OP_BROADCAST_GRAD:
        ok = op->dst.dtype == F32 && op->n_src >= 1 && op->n_src <= 4 && (int)op->p.bgrad.fn >= 0 &&
             op->p.bgrad.fn < KSM_BGRAD_COUNT;
        for (int i = 0; i < op->n_src; ++i) ok = ok && s[i].dtype == F32;
        break;
    case KSM_OP_SUM_ROWS:
    case KSM_OP_MEAN_BACKWARD: ok = op->dst.dtype == F32 && s[0].dtype == F32; break;
    case KSM_OP_MAXPOOL2_BACKWARD:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == F32;
        break;
    case KSM_OP_EMBEDDING_BACKWARD:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && is_int(s[1].dtype);
        break;
    case KSM_OP_CROSS_ENTROPY_BACKWARD:
        ok = op->dst.dtype == F32 && s[0].dtype == F32 && s[1].dtype == KSM_DTYPE_I64;
        break;
    case KSM_OP_BATCHNORM_TRAIN:
    case KSM_OP_BATCHNORM_BACKWARD:
    case KSM_OP_GROUPNORM_BACKWARD:
    case KSM_OP_LAYERNORM_BACKWARD:
    case KSM_OP_CONV2D_BACKWARD:
        /* every present tensor is F32 (dst may be absent: data NULL) */
        ok = op->dst.data == nullptr || op->dst.dtype == F32;
        for (int i = 0; i < op->n_src && i < KSM_OP_MAX_SRC; ++i)
            ok = ok && (s[i].data == nullptr || s[i].dtype == F32);
        break;
    case KSM_OP_SDPA_BACKWARD:
        ok = op->dst.dtype == F32 && op->dst.ndim == 4 && s[1].shape[3] <= KSM_SDPA_MAX_HEAD_DIM;
        for (int i = 0; i < 6; ++i) ok = ok && s[i].dtype == F32;
        break;
    case KSM_OP_DROPOUT: ok = op->dst.dtype == F32 && s[0].dtype == F32; break;
    default: ok = false; break;
    }
    return ok ? 0 : KSM_EUNSUPPORTED;
}

/* ---- Events ---- */

#define KSM_CUDA_TRY_E(ec, expr)                                                                   \
    do {                                                                                           \
        int ksm_rc_ =                                                                              \
            check_cuda((expr), (ec)->dctx, (ec)->ordinal, __func__, #expr, __FILE__, __LINE__);    \
        if (ksm_rc_ != 0) return ksm_rc_;                                                          \
    } while (0)

static void ev_free(ksm_event *ev)
{
    event_ctx *ec = (event_ctx *)ev->ctx;
    if (cudaSetDevice(ec->ordinal) == cudaSuccess) {
        check_cuda(cudaEventDestroy(ec->event), ec->dctx, ec->ordinal, __func__,
                   "cudaEventDestroy(ec->event)", __FILE__, __LINE__);
    }
    delete ec;
    free(ev);
}

static int ev_record(ksm_event *ev, ksm_stream *s)
{
    event_ctx *ec = (event_ctx *)ev->ctx;
    stream_ctx *sc = (stream_ctx *)s->ctx;
    int sticky = sc->sticky.load();
    if (sticky != 0) return sticky;
    KSM_CUDA_TRY_E(ec, cudaSetDevice(ec->ordinal));
    int rc = KSM_CUDA_CHECK(sc, cudaEventRecord(ec->event, sc->stream));
    return rc == 0 ? 0 : stream_fail(sc, rc);
}

static int ev_query(ksm_event *ev)
{
    event_ctx *ec = (event_ctx *)ev->ctx;
    KSM_CUDA_TRY_E(ec, cudaSetDevice(ec->ordinal));
    KSM_CUDA_TRY_E(ec, cudaEventQuery(ec->event));
    return 0;
}

static int ev_synchronize(ksm_event *ev)
{
    event_ctx *ec = (event_ctx *)ev->ctx;
    KSM_CUDA_TRY_E(ec, cudaSetDevice(ec->ordinal));
    KSM_CUDA_TRY_E(ec, cudaEventSynchronize(ec->event));
    return 0;
}

static const struct ksm_event_i event_iface = {
    /* .free        = */ ev_free,
    /* .record      = */ ev_record,
    /* .query       = */ ev_query,
    /* .synchronize = */ ev_synchronize,
};

/* ---- Streams ---- */

static void st_free(ksm_stream *s)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    if (cudaSetDevice(sc->ordinal) == cudaSuccess) {
        (void)KSM_CUDA_CHECK(sc, cudaStreamSynchronize(sc->stream));
        if (sc->blas != nullptr) cublasDestroy(sc->blas);
        (void)KSM_CUDA_CHECK(sc, cudaStreamDestroy(sc->stream));
    }
    delete sc;
    free(s);
}

static int st_synchronize(ksm_stream *s)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    int sticky = sc->sticky.load();
    if (sticky != 0) return sticky;
    KSM_CUDA_TRY(sc, cudaSetDevice(sc->ordinal));
    int rc = KSM_CUDA_CHECK(sc, cudaStreamSynchronize(sc->stream));
    return rc == 0 ? 0 : stream_fail(sc, rc);
}

static int st_query(ksm_stream *s)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    int sticky = sc->sticky.load();
    if (sticky != 0) return sticky;
    KSM_CUDA_TRY(sc, cudaSetDevice(sc->ordinal));
    int rc = KSM_CUDA_CHECK(sc, cudaStreamQuery(sc->stream));
    if (rc == 0 || rc == KSM_ENOTREADY) return rc;
    return stream_fail(sc, rc);
}

/* Common prologue of the enqueueing functions: refuse work on a failed stream. */
#define STREAM_ENTER(sc)                                                                           \
    do {                                                                                           \
        int ksm_sticky_ = (sc)->sticky.load();                                                     \
        if (ksm_sticky_ != 0) return ksm_sticky_;                                                  \
        KSM_CUDA_TRY(sc, cudaSetDevice((sc)->ordinal));                                            \
    } while (0)

/* Common epilogue: rc of an enqueue; CUDA failures become the stream's sticky error. */
static int stream_leave(stream_ctx *sc, int rc)
{
    if (rc == 0 || rc == KSM_EUNSUPPORTED || rc == KSM_EINVAL || rc == KSM_EDEVMEM) return rc;
    return stream_fail(sc, rc);
}

static int st_memcpy_async(ksm_stream *s, void *dst, const void *src, size_t n,
                           enum ksm_copy_kind kind)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    STREAM_ENTER(sc);
    if (n == 0) return 0;
    cudaMemcpyKind k = kind == KSM_COPY_H2D   ? cudaMemcpyHostToDevice
                       : kind == KSM_COPY_D2H ? cudaMemcpyDeviceToHost
                                              : cudaMemcpyDeviceToDevice;
    return stream_leave(sc, KSM_CUDA_CHECK(sc, cudaMemcpyAsync(dst, src, n, k, sc->stream)));
}

static int st_memset_async(ksm_stream *s, void *dst, int value, size_t n)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    STREAM_ENTER(sc);
    if (n == 0) return 0;
    return stream_leave(sc, KSM_CUDA_CHECK(sc, cudaMemsetAsync(dst, value, n, sc->stream)));
}

static int st_host_fn(ksm_stream *s, ksm_host_fn fn, void *arg)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    STREAM_ENTER(sc);
    return stream_leave(sc,
                        KSM_CUDA_CHECK(sc, cudaLaunchHostFunc(sc->stream, (cudaHostFn_t)fn, arg)));
}

static bool has_side_outputs(enum ksm_op_type t)
{
    return t == KSM_OP_BATCHNORM_BACKWARD || t == KSM_OP_GROUPNORM_BACKWARD ||
           t == KSM_OP_LAYERNORM_BACKWARD || t == KSM_OP_CONV2D_BACKWARD ||
           t == KSM_OP_SDPA_BACKWARD;
}

static int st_launch(ksm_stream *s, const struct ksm_op *op)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    int rc = op_supported(op);
    if (rc != 0) return rc;
    STREAM_ENTER(sc);
    /* Ops with (out) sources still owe those outputs (zero gradients) when dst is empty. */
    if (numel(&op->dst) == 0 && !has_side_outputs(op->type)) return 0;
    switch (op->type) {
    case KSM_OP_COPY:
    case KSM_OP_FILL:
    case KSM_OP_UNARY:
    case KSM_OP_BINARY:
    case KSM_OP_LERP:
    case KSM_OP_EMBEDDING:
    case KSM_OP_BATCHNORM:
    case KSM_OP_DROPOUT: rc = launch_elementwise(sc, op); break;
    case KSM_OP_GEMM:
    case KSM_OP_LINEAR:
    case KSM_OP_CONV2D: rc = launch_gemm(sc, op); break;
    case KSM_OP_GROUPNORM:
    case KSM_OP_LAYERNORM:
    case KSM_OP_SOFTMAX:
    case KSM_OP_MEAN:
    case KSM_OP_MAXPOOL2:
    case KSM_OP_CROSS_ENTROPY:
    case KSM_OP_ARGMAX: rc = launch_reduce(sc, op); break;
    case KSM_OP_SDPA: rc = launch_attention(sc, op); break;
    case KSM_OP_SGD:
    case KSM_OP_SUMSQ:
    case KSM_OP_SCALE: rc = launch_optim(sc, op); break;
    case KSM_OP_UNARY_BACKWARD:
    case KSM_OP_BROADCAST_GRAD:
    case KSM_OP_SUM_ROWS:
    case KSM_OP_MEAN_BACKWARD:
    case KSM_OP_MAXPOOL2_BACKWARD:
    case KSM_OP_EMBEDDING_BACKWARD:
    case KSM_OP_CROSS_ENTROPY_BACKWARD: rc = launch_backward(sc, op); break;
    case KSM_OP_BATCHNORM_TRAIN:
    case KSM_OP_BATCHNORM_BACKWARD:
    case KSM_OP_GROUPNORM_BACKWARD:
    case KSM_OP_LAYERNORM_BACKWARD: rc = launch_norm_backward(sc, op); break;
    case KSM_OP_CONV2D_BACKWARD: rc = launch_conv_backward(sc, op); break;
    case KSM_OP_SDPA_BACKWARD: rc = launch_attention_backward(sc, op); break;
    default: rc = KSM_EUNSUPPORTED; break;
    }
    return stream_leave(sc, rc);
}

static int st_wait_event(ksm_stream *s, ksm_event *ev)
{
    stream_ctx *sc = (stream_ctx *)s->ctx;
    event_ctx *ec = (event_ctx *)ev->ctx;
    STREAM_ENTER(sc);
    return stream_leave(sc, KSM_CUDA_CHECK(sc, cudaStreamWaitEvent(sc->stream, ec->event, 0)));
}

static const struct ksm_stream_i stream_iface = {
    /* .free         = */ st_free,
    /* .synchronize  = */ st_synchronize,
    /* .query        = */ st_query,
    /* .memcpy_async = */ st_memcpy_async,
    /* .memset_async = */ st_memset_async,
    /* .host_fn      = */ st_host_fn,
    /* .launch       = */ st_launch,
    /* .wait_event   = */ st_wait_event,
};

/* ---- Devices ---- */

#define KSM_CUDA_TRY_D(dc, expr)                                                                   \
    do {                                                                                           \
        int ksm_rc_ =                                                                              \
            check_cuda((expr), (dc), (dc)->ordinal, __func__, #expr, __FILE__, __LINE__);          \
        if (ksm_rc_ != 0) return ksm_rc_;                                                          \
    } while (0)

static std::atomic<uint64_t> g_local_stream_id{1};

static int dev_malloc(ksm_device *d, size_t size, void **out)
{
    device_ctx *dc = (device_ctx *)d->ctx;
    KSM_CUDA_TRY_D(dc, cudaSetDevice(dc->ordinal));
    void *p = nullptr;
    /* cudaMalloc(0) gives NULL; hand out a real (unique, 256-byte aligned) block instead. */
    KSM_CUDA_TRY_D(dc, cudaMalloc(&p, size > 0 ? size : 1));
    *out = p;
    return 0;
}

static void dev_free(ksm_device *d, void *ptr)
{
    device_ctx *dc = (device_ctx *)d->ctx;
    if (ptr == nullptr) return;
    if (check_cuda(cudaSetDevice(dc->ordinal), dc, dc->ordinal, __func__, "cudaSetDevice", __FILE__,
                   __LINE__) != 0)
        return;
    (void)check_cuda(cudaFree(ptr), dc, dc->ordinal, __func__, "cudaFree(ptr)", __FILE__, __LINE__);
}

static int dev_mem_info(ksm_device *d, size_t *free_bytes, size_t *total_bytes)
{
    device_ctx *dc = (device_ctx *)d->ctx;
    KSM_CUDA_TRY_D(dc, cudaSetDevice(dc->ordinal));
    size_t f = 0, t = 0;
    KSM_CUDA_TRY_D(dc, cudaMemGetInfo(&f, &t));
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return 0;
}

static int dev_synchronize(ksm_device *d)
{
    device_ctx *dc = (device_ctx *)d->ctx;
    KSM_CUDA_TRY_D(dc, cudaSetDevice(dc->ordinal));
    int rc = check_cuda(cudaDeviceSynchronize(), dc, dc->ordinal, __func__,
                        "cudaDeviceSynchronize()", __FILE__, __LINE__);
    if (rc != 0) {
        int expected = 0;
        dc->first_error.compare_exchange_strong(expected, rc);
    }
    return dc->first_error.load();
}

static int dev_stream_new(ksm_device *d, ksm_stream **out)
{
    device_ctx *dc = (device_ctx *)d->ctx;
    KSM_CUDA_TRY_D(dc, cudaSetDevice(dc->ordinal));
    ksm_stream *s = (ksm_stream *)calloc(1, sizeof *s);
    stream_ctx *sc = new (std::nothrow) stream_ctx();
    if (s == nullptr || sc == nullptr) {
        free(s);
        delete sc;
        return KSM_ENOMEM;
    }
    sc->ordinal = dc->ordinal;
    sc->dctx = dc;
    sc->sticky.store(0);
    sc->blas = nullptr;
    int rc = check_cuda(cudaStreamCreateWithFlags(&sc->stream, cudaStreamNonBlocking), dc,
                        dc->ordinal, __func__, "cudaStreamCreateWithFlags", __FILE__, __LINE__);
    if (rc != 0) {
        free(s);
        delete sc;
        return rc;
    }
    s->iface = &stream_iface;
    s->ctx = sc;
    s->dev = d;
    s->id = (g_host != nullptr && g_host->next_stream_id != nullptr) ? g_host->next_stream_id()
                                                                     : g_local_stream_id++;
    *out = s;
    return 0;
}

static int dev_event_new(ksm_device *d, ksm_event **out)
{
    device_ctx *dc = (device_ctx *)d->ctx;
    KSM_CUDA_TRY_D(dc, cudaSetDevice(dc->ordinal));
    ksm_event *ev = (ksm_event *)calloc(1, sizeof *ev);
    event_ctx *ec = new (std::nothrow) event_ctx();
    if (ev == nullptr || ec == nullptr) {
        free(ev);
        delete ec;
        return KSM_ENOMEM;
    }
    ec->ordinal = dc->ordinal;
    ec->dctx = dc;
    int rc = check_cuda(cudaEventCreateWithFlags(&ec->event, cudaEventDisableTiming), dc,
                        dc->ordinal, __func__, "cudaEventCreateWithFlags", __FILE__, __LINE__);
    if (rc != 0) {
        free(ev);
        delete ec;
        return rc;
    }
    ev->iface = &event_iface;
    ev->ctx = ec;
    ev->dev = d;
    *out = ev;
    return 0;
}

static int dev_supports_op(ksm_device *d, const struct ksm_op *op) { return op_supported(op); }

static const struct ksm_device_i device_iface = {
    /* .malloc      = */ dev_malloc,
    /* .free        = */ dev_free,
    /* .mem_info    = */ dev_mem_info,
    /* .synchronize = */ dev_synchronize,
    /* .stream_new  = */ dev_stream_new,
    /* .event_new   = */ dev_event_new,
    /* .supports_op = */ dev_supports_op,
};

/* ---- Backend ---- */

static void backend_destroy(ksm_backend *b)
{
    if (b == nullptr) return;
    for (int i = 0; i < b->n_devices; ++i) {
        ksm_device *d = b->devices[i];
        if (d == nullptr) continue;
        device_ctx *dc = (device_ctx *)d->ctx;
        if (dc != nullptr && cudaSetDevice(dc->ordinal) == cudaSuccess)
            (void)check_cuda(cudaDeviceSynchronize(), dc, dc->ordinal, __func__,
                             "cudaDeviceSynchronize()", __FILE__, __LINE__);
        delete dc;
        free(d);
    }
    free(b->devices);
    free(b);
}

/* Frees the devices and the backend object itself (it was allocated by the plugin). */
static void backend_free(ksm_backend *b) { backend_destroy(b); }

static const struct ksm_backend_i backend_iface = {
    /* .free = */ backend_free,
};

static void set_err(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (errbuf == nullptr || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

static int plugin_init(const struct ksm_host_api *host, ksm_backend **out, char *errbuf,
                       size_t errlen)
{
    if (out == nullptr) {
        set_err(errbuf, errlen, "The CUDA plugin was called without an output pointer.");
        return KSM_EINVAL;
    }
    *out = nullptr;
    if (host == nullptr || host->api_version != KSM_BACKEND_API_VERSION) {
        set_err(errbuf, errlen,
                "The CUDA plugin implements backend API version %d but the host offers %d.",
                KSM_BACKEND_API_VERSION, host != nullptr ? host->api_version : -1);
        return KSM_ENOPLUGIN;
    }
    g_host = host;

    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        set_err(errbuf, errlen, "cudaGetDeviceCount failed: %s (%s).", cudaGetErrorString(err),
                cudaGetErrorName(err));
        return KSM_ENODEVICE;
    }
    if (count <= 0) {
        set_err(errbuf, errlen, "cudaGetDeviceCount found no CUDA device.");
        return KSM_ENODEVICE;
    }

    ksm_backend *b = (ksm_backend *)calloc(1, sizeof *b);
    ksm_device **devs = (ksm_device **)calloc((size_t)count, sizeof *devs);
    if (b == nullptr || devs == nullptr) {
        free(b);
        free(devs);
        set_err(errbuf, errlen, "Out of host memory while creating the CUDA backend.");
        return KSM_ENOMEM;
    }
    b->iface = &backend_iface;
    b->ctx = nullptr;
    b->api_version = KSM_BACKEND_API_VERSION;
    snprintf(b->name, sizeof b->name, "%s", "cuda");
    b->devices = devs;
    b->n_devices = 0;

    char why[384] = "";
    for (int ord = 0; ord < count; ++ord) {
        cudaDeviceProp prop;
        err = cudaGetDeviceProperties(&prop, ord);
        if (err == cudaSuccess && prop.major < 8) {
            log_msg(KSM_LOG_WARN,
                    "CUDA device %d (%s) has compute capability %d.%d; the plugin needs 8.0 or "
                    "newer: skipped",
                    ord, prop.name, prop.major, prop.minor);
            snprintf(why, sizeof why, "device %d (%.200s) has compute capability %d.%d < 8.0", ord,
                     prop.name, prop.major, prop.minor);
            continue;
        }
        /* Create the primary context now, so an unusable device (exclusive mode, driver
         * trouble) is skipped here rather than failing later. */
        if (err == cudaSuccess) err = cudaSetDevice(ord);
        if (err == cudaSuccess) err = cudaFree(nullptr);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            log_msg(KSM_LOG_WARN, "CUDA device %d is not usable: %s (%s): skipped", ord,
                    cudaGetErrorString(err), cudaGetErrorName(err));
            snprintf(why, sizeof why, "device %d: %s (%s)", ord, cudaGetErrorString(err),
                     cudaGetErrorName(err));
            continue;
        }
        int optin = 0;
        if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ord) !=
            cudaSuccess) {
            (void)cudaGetLastError();
            optin = 48 * 1024;
        }
        ksm_device *d = (ksm_device *)calloc(1, sizeof *d);
        device_ctx *dc = new (std::nothrow) device_ctx();
        if (d == nullptr || dc == nullptr) {
            free(d);
            delete dc;
            backend_destroy(b);
            set_err(errbuf, errlen, "Out of host memory while creating the CUDA backend.");
            return KSM_ENOMEM;
        }
        dc->ordinal = ord;
        dc->first_error.store(0);
        dc->failed.store(false);
        dc->sm_count = prop.multiProcessorCount;
        dc->max_smem_optin = (size_t)optin;
        int idx = b->n_devices;
        d->iface = &device_iface;
        d->ctx = dc;
        d->backend = b;
        d->kind = KSM_DEVICE_CUDA;
        d->index = idx;
        d->is_host = false;
        snprintf(d->name, sizeof d->name, "cuda:%d", idx);
        devs[idx] = d;
        b->n_devices = idx + 1;
        log_msg(KSM_LOG_INFO, "%s: %s (CUDA device %d), compute capability %d.%d, %d SMs, %.1f GiB",
                d->name, prop.name, ord, prop.major, prop.minor, prop.multiProcessorCount,
                (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    }
    if (b->n_devices == 0) {
        backend_destroy(b);
        set_err(errbuf, errlen, "none of the %d CUDA devices is usable (%s).", count, why);
        return KSM_ENODEVICE;
    }
    *out = b;
    return 0;
}

} // namespace ksm_cuda

extern "C" __attribute__((visibility("default"))) int
ksm_backend_plugin_init(const struct ksm_host_api *host, ksm_backend **out, char *errbuf,
                        size_t errlen)
{
    /* Never let a C++ exception cross into C. */
    try {
        return ksm_cuda::plugin_init(host, out, errbuf, errlen);
    } catch (...) {
        if (errbuf != nullptr && errlen > 0)
            snprintf(errbuf, errlen, "The CUDA plugin failed to initialise (C++ exception).");
        return KSM_EDEVICE;
    }
}

/* The entry point must have the type the host expects. */
static_assert(std::is_same<decltype(&ksm_backend_plugin_init), ksm_backend_plugin_fn>::value,
              "ksm_backend_plugin_init must have the type ksm_backend_plugin_fn");
