/*
 * The CPU backend's compute pool: every index is covered exactly once, nested and concurrent
 * regions complete, the thread limit holds; and every op whose kernel splits work over the pool
 * gives bit-identical results in parallel and serially (the serial run is the oracle; the golden
 * suite checks the serial math against PyTorch).
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_pool.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"

static void force_four_threads(void) { setenv("KASMINA_CPU_THREADS", "4", 1); }

TestSuite(cpu_pool, .timeout = 60, .init = force_four_threads);

struct cover {
    atomic_int *hits;
    int64_t n;
    atomic_int calls;
};

static void mark(void *ctx, int64_t b, int64_t e)
{
    struct cover *c = ctx;
    cr_assert(b >= 0 && b < e && e <= c->n, "bad range [%lld, %lld)", (long long)b, (long long)e);
    for (int64_t i = b; i < e; i++) atomic_fetch_add(&c->hits[i], 1);
    atomic_fetch_add(&c->calls, 1);
}

Test(cpu_pool, the_env_var_sizes_the_pool) { cr_expect_eq(ksm_cpu_pool_threads(), 4); }

Test(cpu_pool, every_index_is_covered_exactly_once)
{
    const int64_t ns[] = {1, 7, 1000, 100003};
    const int64_t grains[] = {1, 10, 50000};
    for (size_t a = 0; a < 4; a++)
        for (size_t g = 0; g < 3; g++) {
            struct cover c = {calloc((size_t)ns[a], sizeof(atomic_int)), ns[a], 0};
            ksm_cpu_parallel_for(ns[a], grains[g], mark, &c);
            for (int64_t i = 0; i < ns[a]; i++)
                cr_assert_eq(atomic_load(&c.hits[i]), 1, "n=%lld grain=%lld index %lld",
                             (long long)ns[a], (long long)grains[g], (long long)i);
            if (ns[a] <= grains[g]) cr_expect_eq(atomic_load(&c.calls), 1);
            free(c.hits);
        }
    ksm_cpu_parallel_for(0, 1, mark, NULL); /* n = 0 never calls fn */
}

static void nested(void *ctx, int64_t b, int64_t e)
{
    struct cover *c = ctx;
    for (int64_t i = b; i < e; i++) {
        struct cover inner = {c->hits + i * 100, 100, 0};
        ksm_cpu_parallel_for(100, 1, mark, &inner);
    }
}

Test(cpu_pool, nested_regions_complete)
{
    struct cover c = {calloc(64 * 100, sizeof(atomic_int)), 64 * 100, 0};
    ksm_cpu_parallel_for(64, 1, nested, &c);
    for (int64_t i = 0; i < 64 * 100; i++) cr_assert_eq(atomic_load(&c.hits[i]), 1);
    free(c.hits);
}

static void *hammer(void *arg)
{
    atomic_int *hits = calloc(5000, sizeof(atomic_int));
    for (int r = 0; r < 200; r++) {
        struct cover c = {hits, 5000, 0};
        ksm_cpu_parallel_for(5000, 16, mark, &c);
    }
    int ok = 1;
    for (int i = 0; i < 5000; i++) ok &= atomic_load(&hits[i]) == 200;
    free(hits);
    *(int *)arg = ok;
    return NULL;
}

Test(cpu_pool, concurrent_callers_all_complete)
{
    pthread_t t[4];
    int ok[4] = {0};
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, hammer, &ok[i]);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        cr_expect_eq(ok[i], 1, "caller %d lost or repeated work", i);
    }
}

struct who {
    pthread_t caller;
    atomic_int foreign;
};

static void record_thread(void *ctx, int64_t b, int64_t e)
{
    struct who *w = ctx;
    if (!pthread_equal(pthread_self(), w->caller)) atomic_fetch_add(&w->foreign, 1);
    volatile double x = 0;
    for (int64_t i = b; i < e; i++) x += (double)i; /* enough work for workers to join */
}

Test(cpu_pool, a_limit_of_one_keeps_work_on_the_caller)
{
    struct who w = {pthread_self(), 0};
    ksm_cpu_pool_set_max_threads(1);
    ksm_cpu_parallel_for(1 << 22, 1, record_thread, &w);
    cr_expect_eq(atomic_load(&w.foreign), 0);
    ksm_cpu_pool_set_max_threads(64);
    for (int r = 0; r < 20 && atomic_load(&w.foreign) == 0; r++)
        ksm_cpu_parallel_for(1 << 22, 1, record_thread, &w);
    cr_expect_gt(atomic_load(&w.foreign), 0, "no worker ever joined a region");
}

/* ---- Ops: parallel == serial, bit for bit ---- */

static ksm_backend *cpu;
static ksm_device *dev;
static ksm_stream *st;

static void setup(void)
{
    force_four_threads();
    cr_assert_eq(ksm_cpu_backend_new(1, &cpu), 0);
    dev = ksm_backend_device(cpu, 0);
    cr_assert_eq(ksm_stream_new(dev, &st), 0);
}

static void teardown(void)
{
    ksm_stream_free(st);
    ksm_backend_free(cpu);
}

static ksm_tensor make(enum ksm_dtype dt, int ndim, const int64_t *shape, unsigned seed)
{
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, dev, NULL, dt, ndim, shape), 0);
    size_t nb = ksm_tensor_nbytes(&t);
    cr_assert_eq(ksm_device_malloc(dev, nb ? nb : 16, &t.data), 0);
    int64_t n = ksm_tensor_numel(&t);
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t i = 0; i < n; i++) {
        x ^= x >> 12, x ^= x << 25, x ^= x >> 27;
        uint64_t r = x * 0x2545F4914F6CDD1Dull;
        if (dt == KSM_DTYPE_F32)
            ((float *)t.data)[i] = (float)((double)(r >> 11) / 9007199254740992.0) * 4 - 2;
        else
            ((int64_t *)t.data)[i] = (int64_t)(r >> 33) % 97;
    }
    return t;
}

typedef int (*op_fn)(const ksm_tensor *out, const ksm_tensor *in, void *p);

/* Runs the same op serially and with four threads into two outputs; they must be identical. */
static void expect_same(const char *name, ksm_tensor *out, int (*run)(ksm_tensor *out))
{
    size_t nb = ksm_tensor_nbytes(out);
    void *serial = malloc(nb);
    ksm_cpu_pool_set_max_threads(1);
    memset(out->data, 0xAB, nb);
    cr_assert_eq(run(out), 0, "%s", name);
    cr_assert_eq(ksm_stream_synchronize(st), 0, "%s", name);
    memcpy(serial, out->data, nb);
    ksm_cpu_pool_set_max_threads(4);
    memset(out->data, 0xCD, nb);
    cr_assert_eq(run(out), 0, "%s", name);
    cr_assert_eq(ksm_stream_synchronize(st), 0, "%s", name);
    cr_expect_eq(memcmp(serial, out->data, nb), 0, "%s: parallel differs from serial", name);
    free(serial);
}

static ksm_tensor A, B, W, X, Y, Z;

static int run_gelu(ksm_tensor *o) { return ksm_op_gelu(st, o, &A); }
static int run_add_bcast(ksm_tensor *o) { return ksm_op_add(st, o, &A, &B); }
static int run_lerp_rows(ksm_tensor *o) { return ksm_op_lerp(st, o, &A, &X, &W); }
static int run_copy_perm(ksm_tensor *o) { return ksm_op_copy(st, o, &Y); }

Test(cpu_pool, elementwise_ops_parallel_equal_serial, .init = setup, .fini = teardown)
{
    int64_t s2[] = {64, 4096}, s1[] = {4096}, sw[] = {64, 1};
    A = make(KSM_DTYPE_F32, 2, s2, 1);
    B = make(KSM_DTYPE_F32, 1, s1, 2);
    X = make(KSM_DTYPE_F32, 2, s2, 3);
    W = make(KSM_DTYPE_F32, 2, sw, 4);
    ksm_tensor o = make(KSM_DTYPE_F32, 2, s2, 5);
    expect_same("gelu", &o, run_gelu);
    expect_same("add broadcast", &o, run_add_bcast);
    expect_same("lerp per row", &o, run_lerp_rows);
    int64_t s3[] = {64, 64, 64};
    ksm_tensor base = make(KSM_DTYPE_F32, 3, s3, 6);
    int perm[] = {2, 0, 1};
    ksm_tensor_permute(&Y, &base, perm);
    ksm_tensor o3 = make(KSM_DTYPE_F32, 3, s3, 7);
    expect_same("strided copy", &o3, run_copy_perm);
}

static void *ws;
static size_t ws_bytes;
static int run_dw(ksm_tensor *o) { return ksm_op_conv2d(st, o, &A, &W, &B, 1, 1, 64, NULL, 0); }
static int run_conv(ksm_tensor *o)
{
    return ksm_op_conv2d(st, o, &A, &W, NULL, 1, 1, 1, ws, ws_bytes);
}
static int run_bn(ksm_tensor *o) { return ksm_op_batchnorm(st, o, &A, &B, &X, &Y, &Z, 1e-5f); }
static int run_gn(ksm_tensor *o) { return ksm_op_groupnorm(st, o, &A, 4, &B, &X, 1e-5f); }
static int run_maxpool(ksm_tensor *o) { return ksm_op_maxpool2(st, o, &A); }
static int run_mean_hw(ksm_tensor *o) { return ksm_op_mean(st, o, &A, 2, 4); }

Test(cpu_pool, cnn_ops_parallel_equal_serial, .init = setup, .fini = teardown)
{
    int64_t sx[] = {2, 64, 32, 32}, sw[] = {64, 1, 3, 3}, sc[] = {64};
    A = make(KSM_DTYPE_F32, 4, sx, 11);
    W = make(KSM_DTYPE_F32, 4, sw, 12);
    B = make(KSM_DTYPE_F32, 1, sc, 13);
    ksm_tensor o = make(KSM_DTYPE_F32, 4, sx, 14);
    expect_same("depthwise conv", &o, run_dw);

    int64_t sw2[] = {64, 64, 3, 3};
    W = make(KSM_DTYPE_F32, 4, sw2, 15);
    ws_bytes = ksm_op_conv2d_workspace_size(&A, &W, 1, 1, 1);
    cr_assert_gt(ws_bytes, 0);
    cr_assert_eq(ksm_device_malloc(dev, ws_bytes, &ws), 0);
    expect_same("conv3x3 im2col", &o, run_conv);

    X = make(KSM_DTYPE_F32, 1, sc, 16);
    Y = make(KSM_DTYPE_F32, 1, sc, 17);
    Z = make(KSM_DTYPE_F32, 1, sc, 18);
    for (int i = 0; i < 64; i++)
        ((float *)X.data)[i] = ((float *)X.data)[i] * ((float *)X.data)[i] + 0.5f;
    expect_same("batchnorm", &o, run_bn);
    expect_same("groupnorm", &o, run_gn);

    int64_t sp[] = {2, 64, 16, 16}, sm[] = {2, 64};
    ksm_tensor op = make(KSM_DTYPE_F32, 4, sp, 19);
    expect_same("maxpool", &op, run_maxpool);
    ksm_tensor om = make(KSM_DTYPE_F32, 2, sm, 20);
    expect_same("mean over HW", &om, run_mean_hw);
}

static ksm_tensor Q, K, V;
static int run_ln(ksm_tensor *o) { return ksm_op_layernorm(st, o, &A, &B, &X, 1e-5f); }
static int run_softmax(ksm_tensor *o) { return ksm_op_softmax(st, o, &A); }
static int run_sdpa(ksm_tensor *o) { return ksm_op_sdpa(st, o, &Q, &K, &V, true, 0.0f); }
static int run_emb(ksm_tensor *o) { return ksm_op_embedding(st, o, &W, &Y); }
static int run_mean_t(ksm_tensor *o) { return ksm_op_mean(st, o, &Z, 1, 2); }
static int run_xent(ksm_tensor *o) { return ksm_op_cross_entropy(st, o, &A, &Y, -100); }
static int run_argmax(ksm_tensor *o) { return ksm_op_argmax(st, o, &A); }

Test(cpu_pool, transformer_ops_parallel_equal_serial, .init = setup, .fini = teardown)
{
    int64_t sa[] = {512, 384}, sd[] = {384};
    A = make(KSM_DTYPE_F32, 2, sa, 21);
    B = make(KSM_DTYPE_F32, 1, sd, 22);
    X = make(KSM_DTYPE_F32, 1, sd, 23);
    ksm_tensor o = make(KSM_DTYPE_F32, 2, sa, 24);
    expect_same("layernorm", &o, run_ln);
    expect_same("softmax", &o, run_softmax);

    int64_t sq[] = {2, 4, 128, 32};
    Q = make(KSM_DTYPE_F32, 4, sq, 25);
    K = make(KSM_DTYPE_F32, 4, sq, 26);
    V = make(KSM_DTYPE_F32, 4, sq, 27);
    ksm_tensor oq = make(KSM_DTYPE_F32, 4, sq, 28);
    expect_same("causal sdpa", &oq, run_sdpa);

    int64_t sv[] = {97, 64}, si[] = {4096}, se[] = {4096, 64};
    W = make(KSM_DTYPE_F32, 2, sv, 29);
    Y = make(KSM_DTYPE_I64, 1, si, 30);
    ksm_tensor oe = make(KSM_DTYPE_F32, 2, se, 31);
    expect_same("embedding", &oe, run_emb);

    int64_t sz[] = {8, 128, 384}, sm[] = {8, 384};
    Z = make(KSM_DTYPE_F32, 3, sz, 32);
    ksm_tensor om = make(KSM_DTYPE_F32, 2, sm, 33);
    expect_same("mean over T", &om, run_mean_t);

    int64_t sl[] = {4096, 97}, sn[] = {4096};
    A = make(KSM_DTYPE_F32, 2, sl, 34);
    ksm_tensor ol = make(KSM_DTYPE_F32, 1, sn, 35);
    expect_same("cross entropy", &ol, run_xent);
    ksm_tensor oa = make(KSM_DTYPE_I64, 1, sn, 36);
    expect_same("argmax", &oa, run_argmax);
}
