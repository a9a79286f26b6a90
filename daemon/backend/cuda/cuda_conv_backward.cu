/*
 * CUDA backend: the backward of conv2d (stride 1, zero padding, groups), the counterpart of
 * cpu_conv_backward.c, with the same algorithm: for each image and group one column matrix of
 * kdim = Ci/g * kh * kw rows by Ho * Wo columns lives in the op's workspace; dW_g += dy_g @
 * im2col(x_g)^T (cuBLAS, images in order, so dW is the float sum over images the CPU forms), then
 * the same buffer receives W_g^T @ dy_g, which a col2im gather (one thread per dx element, the
 * kernel taps in (i, j) order: the CPU's additions) writes into dx_g. db is the per-channel sum
 * of dy in double (one block per channel). Everything is on the op's stream, so reusing the one
 * workspace buffer between images is ordered.
 */
#include "cuda_common.cuh"

namespace ksm_cuda
{

static constexpr int CB_BLOCK = 256;

__global__ void conv_db_k(float *db, const float *dy, int64_t nb, int64_t co, int64_t howo)
{
    __shared__ double sh[32];
    const int64_t cnt = nb * howo;
    for (int64_t c = blockIdx.x; c < co; c += gridDim.x) {
        double s = 0.0;
        for (int64_t t = threadIdx.x; t < cnt; t += blockDim.x) {
            const int64_t n = t / howo;
            s += dy[(n * co + c) * howo + (t - n * howo)];
        }
        s = block_sum_d(s, sh);
        if (threadIdx.x == 0) db[c] = (float)s;
    }
}

/* col[(c * kh + i) * kw + j][oh * wo + ow] <- x[c][oh + i - ph][ow + j - pw] (0 outside). */
__global__ void im2col_k(float *col, const float *x, int64_t h, int64_t w, int64_t kh, int64_t kw,
                         int64_t ph, int64_t pw, int64_t ho, int64_t wo, int64_t n)
{
    const int64_t howo = ho * wo;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = t / howo, pix = t - row * howo;
        const int64_t j = row % kw, i = (row / kw) % kh, c = row / (kw * kh);
        const int64_t oh = pix / wo, ow = pix - oh * wo;
        const int64_t ih = oh + i - ph, iw = ow + j - pw;
        col[t] = (ih >= 0 && ih < h && iw >= 0 && iw < w) ? x[(c * h + ih) * w + iw] : 0.0f;
    }
}

/* dx[c][ih][iw] <- sum over the taps (i, j), in order, of col[(c * kh + i) * kw + j][oh, ow]
 * with oh = ih - i + ph, ow = iw - j + pw inside the output. */
__global__ void col2im_k(float *dx, const float *col, int64_t h, int64_t w, int64_t kh, int64_t kw,
                         int64_t ph, int64_t pw, int64_t ho, int64_t wo, int64_t n)
{
    const int64_t howo = ho * wo;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < n;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t / (h * w), rem = t - c * h * w, ih = rem / w, iw = rem - ih * w;
        float acc = 0.0f;
        for (int64_t i = 0; i < kh; ++i) {
            const int64_t oh = ih - i + ph;
            if (oh < 0 || oh >= ho) continue;
            for (int64_t j = 0; j < kw; ++j) {
                const int64_t ow = iw - j + pw;
                if (ow < 0 || ow >= wo) continue;
                acc += col[((c * kh + i) * kw + j) * howo + oh * wo + ow];
            }
        }
        dx[t] = acc;
    }
}

static int op_conv2d_backward(stream_ctx *sc, const struct ksm_op *op)
{
    const ksm_tensor *dyt = &op->src[0], *xt = &op->src[1], *wt = &op->src[2];
    const float *dy = (const float *)dyt->data, *x = (const float *)xt->data;
    const float *w = (const float *)wt->data;
    float *dx = (float *)op->dst.data, *dw = (float *)op->src[3].data;
    float *db = (float *)op->src[4].data, *col = (float *)op->ws;
    const int64_t nb = xt->shape[0], ci = xt->shape[1], h = xt->shape[2], wd = xt->shape[3];
    const int64_t co = wt->shape[0], kh = wt->shape[2], kw = wt->shape[3];
    const int64_t ho = dyt->shape[2], wo = dyt->shape[3], howo = ho * wo;
    const int64_t g = op->p.conv2d.groups, cig = ci / g, cog = co / g, kdim = cig * kh * kw;
    const int64_t ph = op->p.conv2d.pad_h, pw = op->p.conv2d.pad_w;
    if (kdim > INT32_MAX || howo > INT32_MAX || cog > INT32_MAX) return KSM_EUNSUPPORTED;
    if ((dw != nullptr || dx != nullptr) && kdim > 0 && cog > 0 && howo > 0 &&
        (col == nullptr || op->ws_bytes < sizeof(float) * (size_t)(kdim * howo)))
        return KSM_EINVAL;
    if (db != nullptr && co > 0) {
        conv_db_k<<<(unsigned)(co < ((int64_t)1 << 30) ? co : ((int64_t)1 << 30)), CB_BLOCK, 0,
                    sc->stream>>>(db, dy, nb, co, howo);
        KSM_CUDA_LAUNCH_CHECK(sc, "conv2d_backward");
    }
    if (dw != nullptr) KSM_CUDA_TRY(sc, cudaMemsetAsync(dw, 0, sizeof(float) * (size_t)(co * kdim),
                                                        sc->stream));
    if (kdim == 0 || cog == 0 || howo == 0) {
        if (dx != nullptr)
            KSM_CUDA_TRY(sc, cudaMemsetAsync(dx, 0, sizeof(float) * (size_t)(nb * ci * h * wd),
                                             sc->stream));
        return 0;
    }
    if (dw == nullptr && dx == nullptr) return 0;
    std::lock_guard<std::mutex> lock(sc->blas_mu);
    cublasHandle_t hb;
    int rc = blas_handle(sc, &hb);
    if (rc != 0) return rc;
    const float one = 1.0f, zero = 0.0f;
    const int m_kdim = (int)kdim, m_howo = (int)howo, m_cog = (int)cog;
    const int64_t ncol = kdim * howo, nimg = cig * h * wd;
    for (int64_t n = 0; n < nb; ++n)
        for (int64_t gi = 0; gi < g; ++gi) {
            const float *dyg = dy + (n * co + gi * cog) * howo;
            if (dw != nullptr) {
                im2col_k<<<grid_for(ncol, CB_BLOCK), CB_BLOCK, 0, sc->stream>>>(
                    col, x + (n * ci + gi * cig) * h * wd, h, wd, kh, kw, ph, pw, ho, wo, ncol);
                KSM_CUDA_LAUNCH_CHECK(sc, "conv2d_backward");
                /* row-major dW_g[cog, kdim] += dy_g[cog, howo] @ col[kdim, howo]^T */
                KSM_CUBLAS_TRY(sc, cublasSgemm(hb, CUBLAS_OP_T, CUBLAS_OP_N, m_kdim, m_cog, m_howo,
                                               &one, col, m_howo, dyg, m_howo, &one,
                                               dw + gi * cog * kdim, m_kdim));
            }
            if (dx != nullptr) {
                /* row-major col[kdim, howo] = W_g[cog, kdim]^T @ dy_g[cog, howo] */
                KSM_CUBLAS_TRY(sc, cublasSgemm(hb, CUBLAS_OP_N, CUBLAS_OP_T, m_howo, m_kdim, m_cog,
                                               &one, dyg, m_howo, w + gi * cog * kdim, m_kdim,
                                               &zero, col, m_howo));
                col2im_k<<<grid_for(nimg, CB_BLOCK), CB_BLOCK, 0, sc->stream>>>(
                    dx + (n * ci + gi * cig) * h * wd, col, h, wd, kh, kw, ph, pw, ho, wo, nimg);
                KSM_CUDA_LAUNCH_CHECK(sc, "conv2d_backward");
            }
        }
    return 0;
}

int launch_conv_backward(stream_ctx *sc, const struct ksm_op *op)
{
    if (op->type != KSM_OP_CONV2D_BACKWARD || op->p.conv2d.groups < 1) return KSM_EUNSUPPORTED;
    return op_conv2d_backward(sc, op);
}

} // namespace ksm_cuda
