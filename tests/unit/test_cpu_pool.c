/*
 * The CPU backend's compute pool: every index is covered exactly once, nested and concurrent
 * regions complete, the thread limit holds; and every op whose kernel splits work over the pool
 * gives bit-identical results in parallel and serially (the serial run is the oracle; the golden
 * suite checks the serial math against PyTorch).
 */
#include <cblas.h>
#include <criterion/criterion.h>
#include <math.h>
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

/* ---- Slots: distinct among the threads of a region ---- */

struct slots {
    atomic_int owner[8];  /* 1 + thread number holding each slot, 0 when free */
    atomic_int bad, used; /* a slot out of range or held by two threads at once; slots seen */
};

static void hold_slot(void *ctx, int slot, int64_t b, int64_t e)
{
    struct slots *s = ctx;
    if (slot < 0 || slot >= 3) {
        atomic_fetch_add(&s->bad, 1);
        return;
    }
    atomic_fetch_or(&s->used, 1 << slot);
    int expected = 0;
    if (!atomic_compare_exchange_strong(&s->owner[slot], &expected, 1))
        atomic_fetch_add(&s->bad, 1);
    volatile double x = 0;
    for (int64_t i = b; i < e; i++) x += (double)i;
    atomic_store(&s->owner[slot], 0);
}

Test(cpu_pool, slots_are_distinct_and_bounded)
{
    struct slots s;
    memset(&s, 0, sizeof s);
    for (int r = 0; r < 200; r++) ksm_cpu_parallel_for_slots(1 << 16, 64, 3, hold_slot, &s);
    cr_expect_eq(atomic_load(&s.bad), 0, "a slot out of [0, 3) or shared by two threads");
    cr_expect_eq(atomic_load(&s.used) & ~7, 0);
}

/* ---- OpenBLAS, single-threaded, called from several threads at once ----
 *
 * The pool sets OpenBLAS to one thread and runs one sgemm per thread concurrently. Each thread
 * here repeats sgemms of several shapes (small-matrix and blocked paths, both transposes) and
 * compares them bit for bit with the same products computed before the threads started. */

enum { SG_THREADS = 6, SG_SHAPES = 4, SG_REPS = 40 };
static const int sg_shape[SG_SHAPES][3] = {
    {32, 1024, 27}, {64, 256, 288}, {200, 300, 500}, {7, 1000, 96}};
static float *sg_a[SG_SHAPES], *sg_b[SG_SHAPES], *sg_ref[SG_SHAPES];

static void sg_run(int i, float *c)
{
    const int m = sg_shape[i][0], n = sg_shape[i][1], k = sg_shape[i][2];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, i % 2 ? CblasTrans : CblasNoTrans, m, n, k, 1.0f,
                sg_a[i], k, sg_b[i], i % 2 ? k : n, 0.0f, c, n);
}

static void *sg_thread(void *arg)
{
    int *ok = arg;
    *ok = 1;
    for (int r = 0; r < SG_REPS; r++) {
        int i = r % SG_SHAPES;
        size_t nc = (size_t)sg_shape[i][0] * (size_t)sg_shape[i][1];
        float *c = malloc(nc * sizeof(float));
        sg_run(i, c);
        if (memcmp(c, sg_ref[i], nc * sizeof(float)) != 0) *ok = 0;
        free(c);
    }
    return NULL;
}

Test(cpu_pool, concurrent_single_threaded_sgemm_is_safe)
{
    (void)ksm_cpu_pool_threads(); /* creates the pool: OpenBLAS now has one thread */
    cr_assert_eq(openblas_get_num_threads(), 1);
    unsigned x = 12345;
    for (int i = 0; i < SG_SHAPES; i++) {
        size_t na = (size_t)sg_shape[i][0] * sg_shape[i][2];
        size_t nb = (size_t)sg_shape[i][1] * sg_shape[i][2];
        sg_a[i] = malloc(na * sizeof(float));
        sg_b[i] = malloc(nb * sizeof(float));
        sg_ref[i] = malloc((size_t)sg_shape[i][0] * sg_shape[i][1] * sizeof(float));
        for (size_t j = 0; j < na; j++)
            sg_a[i][j] = (float)((x = x * 1103515245u + 12345u) >> 16) / 65536.0f - 0.5f;
        for (size_t j = 0; j < nb; j++)
            sg_b[i][j] = (float)((x = x * 1103515245u + 12345u) >> 16) / 65536.0f - 0.5f;
        sg_run(i, sg_ref[i]);
    }
    pthread_t t[SG_THREADS];
    int ok[SG_THREADS];
    for (int i = 0; i < SG_THREADS; i++) pthread_create(&t[i], NULL, sg_thread, &ok[i]);
    for (int i = 0; i < SG_THREADS; i++) {
        pthread_join(t[i], NULL);
        cr_expect_eq(ok[i], 1, "thread %d: a concurrent sgemm differs from the serial one", i);
    }
    for (int i = 0; i < SG_SHAPES; i++) {
        free(sg_a[i]);
        free(sg_b[i]);
        free(sg_ref[i]);
    }
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

static int run_gemm_nt(ksm_tensor *o)
{
    return ksm_op_gemm(st, o, &A, &B, false, true, 1.0f, 0.0f);
}
static int run_gemm_tn(ksm_tensor *o) { return ksm_op_gemm(st, o, &X, &B, true, true, 0.5f, 0.0f); }
static int run_linear(ksm_tensor *o) { return ksm_op_linear(st, o, &A, &W, &Z); }

Test(cpu_pool, gemm_ops_parallel_equal_serial, .init = setup, .fini = teardown)
{
    /* big enough to be cut into tiles: rows (M >= N) and columns (N > M) */
    int64_t sa[] = {1000, 96}, sb[] = {700, 96}, sc[] = {1000, 700};
    A = make(KSM_DTYPE_F32, 2, sa, 41);
    B = make(KSM_DTYPE_F32, 2, sb, 42);
    ksm_tensor o = make(KSM_DTYPE_F32, 2, sc, 43);
    expect_same("gemm rows", &o, run_gemm_nt);
    int64_t sx[] = {96, 300}, sb2[] = {2000, 96}, sc2[] = {300, 2000};
    X = make(KSM_DTYPE_F32, 2, sx, 44);
    B = make(KSM_DTYPE_F32, 2, sb2, 45);
    ksm_tensor o2 = make(KSM_DTYPE_F32, 2, sc2, 46);
    expect_same("gemm columns, transposed", &o2, run_gemm_tn);
    int64_t sw[] = {1500, 96}, sz[] = {1500}, sy[] = {1000, 1500};
    W = make(KSM_DTYPE_F32, 2, sw, 47);
    Z = make(KSM_DTYPE_F32, 1, sz, 48);
    ksm_tensor o3 = make(KSM_DTYPE_F32, 2, sy, 49);
    expect_same("linear with bias", &o3, run_linear);
}

/* y <- conv2d(x, w) + bias by the definition, in double. */
static void conv_ref(double *y, const float *x, const float *w, const float *bias, int64_t n,
                     int64_t ci, int64_t h, int64_t wd, int64_t co, int64_t kh, int64_t kw,
                     int64_t ph, int64_t pw, int64_t g)
{
    const int64_t ho = h + 2 * ph - kh + 1, wo = wd + 2 * pw - kw + 1, cig = ci / g, cog = co / g;
    for (int64_t b = 0; b < n; b++)
        for (int64_t c = 0; c < co; c++)
            for (int64_t oh = 0; oh < ho; oh++)
                for (int64_t ow = 0; ow < wo; ow++) {
                    double s = bias ? bias[c] : 0.0;
                    const int64_t gi = c / cog;
                    for (int64_t q = 0; q < cig; q++)
                        for (int64_t i = 0; i < kh; i++)
                            for (int64_t j = 0; j < kw; j++) {
                                const int64_t ih = oh + i - ph, iw = ow + j - pw;
                                if (ih < 0 || ih >= h || iw < 0 || iw >= wd) continue;
                                s += (double)w[((c * cig + q) * kh + i) * kw + j] *
                                     x[((b * ci + gi * cig + q) * h + ih) * wd + iw];
                            }
                    y[((b * co + c) * ho + oh) * wo + ow] = s;
                }
}

static int64_t cv[11]; /* n, ci, h, w, co, kh, kw, ph, pw, g, has_bias */
static int run_conv_cv(ksm_tensor *o)
{
    return ksm_op_conv2d(st, o, &A, &W, cv[10] ? &B : NULL, (int)cv[7], (int)cv[8], (int)cv[9], ws,
                         ws_bytes);
}

Test(cpu_pool, conv_tiles_match_the_definition, .init = setup, .fini = teardown)
{
    /* batch 1 and 2 (several pixel tiles per image, tiles starting mid-row), a batch with one
     * tile per image, padding wider than the kernel's half, groups, 1x1, a bias */
    static const int64_t cases[][11] = {
        {1, 3, 32, 32, 8, 3, 3, 1, 1, 1, 0}, {2, 4, 13, 11, 6, 5, 3, 2, 1, 2, 1},
        {1, 5, 20, 19, 4, 1, 1, 0, 0, 1, 1}, {40, 3, 9, 9, 5, 3, 3, 1, 1, 1, 1},
        {1, 2, 17, 23, 3, 3, 3, 3, 2, 1, 0}, {3, 6, 16, 16, 4, 1, 1, 1, 1, 2, 1},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        memcpy(cv, cases[t], sizeof cv);
        const int64_t ho = cv[2] + 2 * cv[7] - cv[5] + 1, wo = cv[3] + 2 * cv[8] - cv[6] + 1;
        int64_t sx[] = {cv[0], cv[1], cv[2], cv[3]}, sw[] = {cv[4], cv[1] / cv[9], cv[5], cv[6]};
        int64_t sb[] = {cv[4]}, sy[] = {cv[0], cv[4], ho, wo};
        A = make(KSM_DTYPE_F32, 4, sx, 60 + (unsigned)t);
        W = make(KSM_DTYPE_F32, 4, sw, 70 + (unsigned)t);
        B = make(KSM_DTYPE_F32, 1, sb, 80 + (unsigned)t);
        ksm_tensor o = make(KSM_DTYPE_F32, 4, sy, 90 + (unsigned)t);
        ws_bytes = ksm_op_conv2d_workspace_size(&A, &W, (int)cv[7], (int)cv[8], (int)cv[9]);
        ws = NULL;
        if (ws_bytes) cr_assert_eq(ksm_device_malloc(dev, ws_bytes, &ws), 0);
        expect_same("conv tiles", &o, run_conv_cv);
        const int64_t ny = ksm_tensor_numel(&o);
        double *ref = malloc((size_t)ny * sizeof(double));
        conv_ref(ref, A.data, W.data, cv[10] ? B.data : NULL, cv[0], cv[1], cv[2], cv[3], cv[4],
                 cv[5], cv[6], cv[7], cv[8], cv[9]);
        double worst = 0;
        for (int64_t i = 0; i < ny; i++) {
            double d = fabs(ref[i] - ((float *)o.data)[i]) / (1.0 + fabs(ref[i]));
            if (d > worst) worst = d;
        }
        cr_expect_lt(worst, 1e-5, "case %zu: conv differs from the definition by %g", t, worst);
        free(ref);
    }
}
