/*
 * Per-op latency of the CPU backend at the sizes of kasmina's hosts (CNN base 32 at 32x32,
 * batch 32; the TinyStories transformer, batch 8 x 256 tokens). Each op is enqueued and its
 * stream synchronized per iteration, as eager PyTorch runs. Prints one line per op:
 *     op name=conv3x3_c32 median_ms=1.234
 * The same ops, shapes and line format come from tests/bench/torch_ops.py.
 * Usage: bench_ops [reps]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

static ksm_device *dev;
static ksm_stream *st;

static ksm_tensor make(int ndim, const int64_t *shape, uint64_t seed, enum ksm_dtype dt)
{
    ksm_tensor t;
    CHECK(ksm_tensor_init(&t, dev, NULL, dt, ndim, shape));
    CHECK(ksm_device_malloc(dev, ksm_tensor_nbytes(&t) + 64, &t.data));
    if (dt == KSM_DTYPE_F32)
        bench_fill(t.data, (size_t)ksm_tensor_numel(&t), seed);
    else
        for (int64_t i = 0; i < ksm_tensor_numel(&t); i++) ((int64_t *)t.data)[i] = i % 50257;
    return t;
}

struct args {
    ksm_tensor a, b, c, d, e, y;
    void *ws;
    size_t ws_bytes;
};

typedef int (*run_fn)(struct args *g);

static void bench(const char *name, run_fn fn, struct args *g, int reps)
{
    CHECK(fn(g));
    CHECK(ksm_stream_synchronize(st));
    double t0 = bench_now();
    CHECK(fn(g));
    CHECK(ksm_stream_synchronize(st));
    double one = bench_now() - t0;
    int inner = one > 0.02 ? 1 : (int)(0.02 / (one > 1e-7 ? one : 1e-7)) + 1;
    double *ms = calloc((size_t)reps, sizeof *ms);
    for (int r = 0; r < reps; r++) {
        t0 = bench_now();
        for (int i = 0; i < inner; i++) {
            CHECK(fn(g));
            CHECK(ksm_stream_synchronize(st));
        }
        ms[r] = (bench_now() - t0) * 1e3 / inner;
    }
    printf("op name=%s median_ms=%.4f\n", name, bench_median(ms, reps));
    fflush(stdout);
    free(ms);
}

static int r_conv(struct args *g)
{
    return ksm_op_conv2d(st, &g->y, &g->a, &g->b, NULL, 1, 1, 1, g->ws, g->ws_bytes);
}
static int r_dw(struct args *g)
{
    return ksm_op_conv2d(st, &g->y, &g->a, &g->b, NULL, 1, 1, (int)g->a.shape[1], NULL, 0);
}
static int r_bn(struct args *g)
{
    return ksm_op_batchnorm(st, &g->y, &g->a, &g->b, &g->c, &g->d, &g->e, 1e-5f);
}
static int r_gn(struct args *g)
{
    return ksm_op_groupnorm(st, &g->y, &g->a, 2, &g->b, &g->c, 1e-5f);
}
static int r_relu(struct args *g) { return ksm_op_relu(st, &g->y, &g->a); }
static int r_pool(struct args *g) { return ksm_op_maxpool2(st, &g->y, &g->a); }
static int r_lerp(struct args *g) { return ksm_op_lerp(st, &g->y, &g->a, &g->b, &g->c); }
static int r_ln(struct args *g) { return ksm_op_layernorm(st, &g->y, &g->a, &g->b, &g->c, 1e-5f); }
static int r_linear(struct args *g) { return ksm_op_linear(st, &g->y, &g->a, &g->b, &g->c); }
static int r_gelu(struct args *g) { return ksm_op_gelu(st, &g->y, &g->a); }
static int r_sdpa(struct args *g) { return ksm_op_sdpa(st, &g->y, &g->a, &g->b, &g->c, true, 0); }
static int r_softmax(struct args *g) { return ksm_op_softmax(st, &g->y, &g->a); }
static int r_emb(struct args *g) { return ksm_op_embedding(st, &g->y, &g->a, &g->b); }

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 7;
    if (reps < 1) reps = 1;
    ksm_backend *cpu;
    CHECK(ksm_cpu_backend_new(1, &cpu));
    dev = ksm_backend_device(cpu, 0);
    CHECK(ksm_stream_new(dev, &st));
    struct args g;

    /* CNN: batch 32, 32 channels at 32x32 */
    int64_t x4[] = {32, 32, 32, 32}, w3[] = {32, 32, 3, 3}, wd[] = {32, 1, 3, 3}, c1[] = {32};
    memset(&g, 0, sizeof g);
    g.a = make(4, x4, 1, KSM_DTYPE_F32);
    g.b = make(4, w3, 2, KSM_DTYPE_F32);
    g.y = make(4, x4, 3, KSM_DTYPE_F32);
    g.ws_bytes = ksm_op_conv2d_workspace_size(&g.a, &g.b, 1, 1, 1);
    CHECK(ksm_device_malloc(dev, g.ws_bytes, &g.ws));
    bench("conv3x3_b32_c32_32x32", r_conv, &g, reps);
    g.b = make(4, wd, 4, KSM_DTYPE_F32);
    bench("depthwise3x3_b32_c32_32x32", r_dw, &g, reps);
    g.b = make(1, c1, 5, KSM_DTYPE_F32);
    g.c = make(1, c1, 6, KSM_DTYPE_F32);
    for (int i = 0; i < 32; i++) ((float *)g.c.data)[i] += 2.0f; /* variance > 0 */
    g.d = make(1, c1, 7, KSM_DTYPE_F32);
    g.e = make(1, c1, 8, KSM_DTYPE_F32);
    bench("batchnorm_b32_c32_32x32", r_bn, &g, reps);
    bench("groupnorm_g2_b32_c32_32x32", r_gn, &g, reps);
    bench("relu_b32_c32_32x32", r_relu, &g, reps);
    int64_t h4[] = {32, 32, 16, 16};
    ksm_tensor full = g.y;
    g.y = make(4, h4, 9, KSM_DTYPE_F32);
    bench("maxpool2_b32_c32_32x32", r_pool, &g, reps);
    g.y = full;
    int64_t w1[] = {32, 1, 1, 1};
    g.b = make(4, x4, 10, KSM_DTYPE_F32);
    g.c = make(4, w1, 11, KSM_DTYPE_F32);
    bench("lerp_per_sample_b32_c32_32x32", r_lerp, &g, reps);

    /* Transformer: 8 x 256 tokens, D 384, 6 heads */
    int64_t td[] = {8, 256, 384}, d1[] = {384}, tf[] = {8, 256, 1536}, wf[] = {1536, 384},
            f1[] = {1536};
    memset(&g, 0, sizeof g);
    g.a = make(3, td, 12, KSM_DTYPE_F32);
    g.b = make(1, d1, 13, KSM_DTYPE_F32);
    g.c = make(1, d1, 14, KSM_DTYPE_F32);
    g.y = make(3, td, 15, KSM_DTYPE_F32);
    bench("layernorm_8x256_d384", r_ln, &g, reps);
    g.b = make(2, wf, 16, KSM_DTYPE_F32);
    g.c = make(1, f1, 17, KSM_DTYPE_F32);
    g.y = make(3, tf, 18, KSM_DTYPE_F32);
    bench("linear_8x256_384to1536", r_linear, &g, reps);
    g.a = make(3, tf, 19, KSM_DTYPE_F32);
    bench("gelu_8x256x1536", r_gelu, &g, reps);
    int64_t qh[] = {8, 6, 256, 64};
    g.a = make(4, qh, 20, KSM_DTYPE_F32);
    g.b = make(4, qh, 21, KSM_DTYPE_F32);
    g.c = make(4, qh, 22, KSM_DTYPE_F32);
    g.y = make(4, qh, 23, KSM_DTYPE_F32);
    bench("sdpa_causal_8x6x256x64", r_sdpa, &g, reps);
    int64_t sm[] = {8, 6, 256, 256};
    g.a = make(4, sm, 24, KSM_DTYPE_F32);
    g.y = make(4, sm, 25, KSM_DTYPE_F32);
    bench("softmax_8x6x256x256", r_softmax, &g, reps);
    int64_t ve[] = {50257, 384}, ti[] = {8, 256};
    g.a = make(2, ve, 26, KSM_DTYPE_F32);
    g.b = make(2, ti, 27, KSM_DTYPE_I64);
    g.y = make(3, td, 28, KSM_DTYPE_F32);
    bench("embedding_8x256_v50257_d384", r_emb, &g, reps);
    /* Memory is left to the process exit: this is a benchmark. */
    return 0;
}
