/*
 * The caching allocator under a repeated forward: a small CNN (conv3x3 -> batchnorm -> relu ->
 * maxpool -> conv3x3 -> groupnorm -> gelu -> mean over HW -> linear -> cross-entropy) whose
 * activations and conv workspaces are allocated from the allocator on the forward's stream and
 * freed when the forward ends, as eager PyTorch does. Reports, after a warm-up forward:
 *   - the share of allocations served from the cache (no device allocation) in steady state,
 *   - device allocations made in steady state,
 *   - peak reserved bytes / peak allocated bytes (allocated: the blocks handed out, rounded by
 *     the allocator), and / peak requested bytes (the sizes asked for, live at once).
 * Usage: bench_alloc [forwards] [batch]   (defaults 50, 32)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"
#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

struct ctx {
    ksm_device *dev;
    ksm_allocator *al;
    ksm_stream *s;
    void *live[64];
    size_t live_size[64];
    int n_live;
    size_t requested, peak_requested; /* bytes asked for and not yet freed */
};

static void *take(struct ctx *c, size_t n)
{
    void *p;
    CHECK(ksm_alloc_malloc(c->al, n, c->s, &p));
    c->live[c->n_live] = p;
    c->live_size[c->n_live++] = n;
    c->requested += n;
    if (c->requested > c->peak_requested) c->peak_requested = c->requested;
    return p;
}

static ksm_tensor tensor(struct ctx *c, enum ksm_dtype dt, int ndim, const int64_t *shape)
{
    ksm_tensor t;
    CHECK(ksm_tensor_init(&t, c->dev, NULL, dt, ndim, shape));
    t.data = take(c, ksm_tensor_nbytes(&t));
    return t;
}

static void *scratch(struct ctx *c, size_t n)
{
    if (n == 0) return NULL;
    return take(c, n);
}

static void release_all(struct ctx *c)
{
    for (int i = 0; i < c->n_live; i++) {
        CHECK(ksm_alloc_free(c->al, c->live[i]));
        c->requested -= c->live_size[i];
    }
    c->n_live = 0;
}

struct weights {
    ksm_tensor w1, bn_m, bn_v, bn_w, bn_b, w2, gn_w, gn_b, fc_w, fc_b, x, labels;
};

static ksm_tensor param(struct ctx *c, int ndim, const int64_t *shape, uint64_t seed, float scale,
                        float shift)
{
    ksm_tensor t = tensor(c, KSM_DTYPE_F32, ndim, shape);
    size_t n = (size_t)ksm_tensor_numel(&t);
    float *h = malloc(n * sizeof *h);
    bench_fill(h, n, seed);
    for (size_t i = 0; i < n; i++) h[i] = h[i] * scale + shift;
    CHECK(ksm_stream_memcpy_async(c->s, t.data, h, n * sizeof *h, KSM_COPY_H2D));
    CHECK(ksm_stream_synchronize(c->s));
    free(h);
    return t;
}

static void forward(struct ctx *c, const struct weights *w, int64_t B)
{
    int64_t s1[] = {B, 32, 32, 32};
    ksm_tensor h1 = tensor(c, KSM_DTYPE_F32, 4, s1);
    size_t ws1 = ksm_op_conv2d_workspace_size(&w->x, &w->w1, 1, 1, 1);
    CHECK(ksm_op_conv2d(c->s, &h1, &w->x, &w->w1, NULL, 1, 1, 1, scratch(c, ws1), ws1));
    ksm_tensor h2 = tensor(c, KSM_DTYPE_F32, 4, s1);
    CHECK(ksm_op_batchnorm(c->s, &h2, &h1, &w->bn_m, &w->bn_v, &w->bn_w, &w->bn_b, 1e-5f));
    CHECK(ksm_op_relu(c->s, &h2, &h2));
    int64_t s2[] = {B, 32, 16, 16};
    ksm_tensor h3 = tensor(c, KSM_DTYPE_F32, 4, s2);
    CHECK(ksm_op_maxpool2(c->s, &h3, &h2));
    int64_t s3[] = {B, 64, 16, 16};
    ksm_tensor h4 = tensor(c, KSM_DTYPE_F32, 4, s3);
    size_t ws2 = ksm_op_conv2d_workspace_size(&h3, &w->w2, 1, 1, 1);
    CHECK(ksm_op_conv2d(c->s, &h4, &h3, &w->w2, NULL, 1, 1, 1, scratch(c, ws2), ws2));
    ksm_tensor h5 = tensor(c, KSM_DTYPE_F32, 4, s3);
    CHECK(ksm_op_groupnorm(c->s, &h5, &h4, 4, &w->gn_w, &w->gn_b, 1e-5f));
    CHECK(ksm_op_gelu(c->s, &h5, &h5));
    int64_t s4[] = {B, 64};
    ksm_tensor h6 = tensor(c, KSM_DTYPE_F32, 2, s4);
    CHECK(ksm_op_mean(c->s, &h6, &h5, 2, 4));
    int64_t s5[] = {B, 10};
    ksm_tensor logits = tensor(c, KSM_DTYPE_F32, 2, s5);
    CHECK(ksm_op_linear(c->s, &logits, &h6, &w->fc_w, &w->fc_b));
    int64_t s6[] = {B};
    ksm_tensor loss = tensor(c, KSM_DTYPE_F32, 1, s6);
    CHECK(ksm_op_cross_entropy(c->s, &loss, &logits, &w->labels, -100));
    float host_loss[4096];
    CHECK(ksm_stream_memcpy_async(c->s, host_loss, loss.data, (size_t)B * sizeof(float),
                                  KSM_COPY_D2H));
    CHECK(ksm_stream_synchronize(c->s));
    release_all(c);
}

int main(int argc, char **argv)
{
    int forwards = argc > 1 ? atoi(argv[1]) : 50;
    int64_t B = argc > 2 ? atoll(argv[2]) : 32;
    if (forwards < 2 || B < 1 || B > 4096) {
        fprintf(stderr, "usage: bench_alloc [forwards>=2] [batch 1..4096]\n");
        return 2;
    }
    ksm_backend *cpu;
    CHECK(ksm_cpu_backend_new(1, &cpu));
    struct ctx c = {.dev = ksm_backend_device(cpu, 0)};
    CHECK(ksm_allocator_new(c.dev, NULL, &c.al));
    CHECK(ksm_stream_new(c.dev, &c.s));

    struct weights w;
    int64_t sw1[] = {32, 3, 3, 3}, sc[] = {32}, sw2[] = {64, 32, 3, 3}, sg[] = {64},
            sfc[] = {10, 64}, sfb[] = {10}, sx[] = {B, 3, 32, 32}, sl[] = {B};
    w.w1 = param(&c, 4, sw1, 1, 0.3f, 0);
    w.bn_m = param(&c, 1, sc, 2, 0.1f, 0);
    w.bn_v = param(&c, 1, sc, 3, 0.2f, 1.0f);
    w.bn_w = param(&c, 1, sc, 4, 0.1f, 1.0f);
    w.bn_b = param(&c, 1, sc, 5, 0.1f, 0);
    w.w2 = param(&c, 4, sw2, 6, 0.05f, 0);
    w.gn_w = param(&c, 1, sg, 7, 0.1f, 1.0f);
    w.gn_b = param(&c, 1, sg, 8, 0.1f, 0);
    w.fc_w = param(&c, 2, sfc, 9, 0.1f, 0);
    w.fc_b = param(&c, 1, sfb, 10, 0.1f, 0);
    w.x = param(&c, 4, sx, 11, 1.0f, 0);
    w.labels = tensor(&c, KSM_DTYPE_I64, 1, sl);
    int64_t *lab = malloc((size_t)B * sizeof *lab);
    for (int64_t i = 0; i < B; i++) lab[i] = i % 10;
    CHECK(ksm_stream_memcpy_async(c.s, w.labels.data, lab, (size_t)B * 8, KSM_COPY_H2D));
    CHECK(ksm_stream_synchronize(c.s));
    free(lab);
    /* The weights stay allocated for the whole run. */
    void *weights_mem[64];
    int n_weights = c.n_live;
    memcpy(weights_mem, c.live, sizeof(void *) * (size_t)n_weights);
    c.n_live = 0; /* (their bytes stay counted in c.requested) */

    struct ksm_mem_stats st0, st1;
    forward(&c, &w, B); /* warm-up: the first forward at this shape may allocate */
    ksm_alloc_get_stats(c.al, &st0);
    double t0 = bench_now();
    for (int i = 1; i < forwards; i++) forward(&c, &w, B);
    double dt = bench_now() - t0;
    ksm_alloc_get_stats(c.al, &st1);

    const struct ksm_pool_stats *a0 = &st0.pool[KSM_POOL_ALL], *a1 = &st1.pool[KSM_POOL_ALL];
    int64_t allocs = a1->allocation.allocated - a0->allocation.allocated;
    uint64_t hits = st1.cache_hits - st0.cache_hits;
    uint64_t dev_allocs = st1.num_device_alloc - st0.num_device_alloc;
    printf("alloc forwards=%d batch=%lld steady_allocations=%lld cache_served=%llu "
           "cache_served_pct=%.2f steady_device_allocs=%llu\n",
           forwards - 1, (long long)B, (long long)allocs, (unsigned long long)hits,
           allocs ? 100.0 * (double)hits / (double)allocs : 0.0, (unsigned long long)dev_allocs);
    printf("alloc peak_reserved=%lld peak_allocated=%lld reserved_over_allocated=%.3f "
           "peak_requested=%zu reserved_over_requested=%.3f forward_ms=%.2f\n",
           (long long)a1->reserved_bytes.peak, (long long)a1->allocated_bytes.peak,
           (double)a1->reserved_bytes.peak / (double)a1->allocated_bytes.peak, c.peak_requested,
           (double)a1->reserved_bytes.peak / (double)c.peak_requested, dt * 1e3 / (forwards - 1));
    for (int i = 0; i < n_weights; i++) CHECK(ksm_alloc_free(c.al, weights_mem[i]));
    ksm_stream_free(c.s);
    ksm_allocator_destroy(c.al);
    ksm_backend_free(cpu);
    return 0;
}
