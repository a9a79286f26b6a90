/*
 * (Over 900 lines on purpose: one conformance suite, every op against one oracle with one set
 * of random-input and comparison helpers, mirroring test_ops.c.)
 * GPU conformance: every op on cuda:0 against the CPU backend (the oracle) on cpu:0, through
 * the public ops.h wrappers, with random inputs, broadcasts, strided views and the op variants
 * (conv paths, causal attention, ...). Float results must satisfy max|d| / max|ref| <= 1e-5;
 * copies, fills, argmax, embedding and max pooling must be exact (NaN matches NaN).
 *
 * Each test loads the CUDA plugin itself (a CUDA context does not survive Criterion's fork) and
 * skips when there is no plugin or no device. The gpu_loader suite runs everywhere: on a
 * machine without a GPU it checks that the loader fails cleanly and the process goes on.
 * Run with --jobs=1.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"
#include "kasmina/ops_backward.h"
#include "kasmina/ops_backward_nn.h"
#include "kasmina/ops_optim.h"
#include "kasmina/tensor.h"

#ifndef KSM_BUILD_DIR
#define KSM_BUILD_DIR "."
#endif

#define PLUGIN_PATH KSM_BUILD_DIR "/libkasmina_cuda.so"
#define TOL         1e-5

// ---- Fixture ----

struct env {
    ksm_backend *cpu, *gpu;
    ksm_device *dc, *dg;
    ksm_stream *sc, *sg;
};
static struct env E;

#define MAX_BUFS 512
static struct {
    ksm_device *d;
    void *p;
} g_bufs[MAX_BUFS];
static int g_nbufs;

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static void gpu_end(void)
{
    if (E.sg) ksm_stream_synchronize(E.sg);
    if (E.sc) ksm_stream_synchronize(E.sc);
    for (int i = 0; i < g_nbufs; i++) ksm_device_free(g_bufs[i].d, g_bufs[i].p);
    g_nbufs = 0;
    ksm_stream_free(E.sg);
    ksm_stream_free(E.sc);
    ksm_backend_free(E.gpu);
    ksm_backend_free(E.cpu);
    memset(&E, 0, sizeof E);
}

/* Loads the plugin (or skips the test) and creates cpu:0 and cuda:0 with one stream each. */
static void gpu_begin(uint64_t seed)
{
    char err[512] = "";
    setenv("KASMINA_CUDA_PLUGIN", PLUGIN_PATH, 0);
    memset(&E, 0, sizeof E);
    g_rng = 0x9e3779b97f4a7c15ull ^ (seed * 0xbf58476d1ce4e5b9ull);
    int rc = ksm_cuda_backend_load(NULL, &E.gpu, err, sizeof err);
    if (rc != 0) cr_skip_test("no CUDA backend (%s): %s", ksm_err_name(rc), err);
    cr_assert_eq(ksm_cpu_backend_new(1, &E.cpu), 0);
    E.dc = ksm_backend_device(E.cpu, 0);
    E.dg = ksm_backend_device(E.gpu, 0);
    cr_assert_not_null(E.dg);
    cr_assert_eq(ksm_stream_new(E.dc, &E.sc), 0);
    cr_assert_eq(ksm_stream_new(E.dg, &E.sg), 0);
}

TestSuite(gpu_ops, .timeout = 120, .fini = gpu_end);
TestSuite(gpu_loader, .timeout = 60);

// ---- Helpers ----

static double urand(void) /* splitmix64 -> [0, 1) */
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

/* n floats uniform in [lo, hi); caller frees. */
static float *frand(int64_t n, float lo, float hi)
{
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof *p);
    cr_assert_not_null(p);
    for (int64_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * (float)urand();
    return p;
}

static void *dalloc(ksm_device *d, size_t n)
{
    void *p = NULL;
    cr_assert_lt(g_nbufs, MAX_BUFS);
    cr_assert_eq(ksm_device_malloc(d, n > 0 ? n : 1, &p), 0, "malloc on %s", ksm_device_name(d));
    g_bufs[g_nbufs].d = d;
    g_bufs[g_nbufs].p = p;
    g_nbufs++;
    return p;
}

/* The same tensor on both devices. */
typedef struct {
    ksm_tensor c, g;
} tpair;

static void sync_both(void)
{
    int rc = ksm_stream_synchronize(E.sc);
    cr_assert_eq(rc, 0, "cpu stream: %s", ksm_err_name(rc));
    rc = ksm_stream_synchronize(E.sg);
    cr_assert_eq(rc, 0, "cuda stream: %s", ksm_err_name(rc));
}

/* A contiguous tensor on both devices, initialised from host (or to all-ones bytes: NaN for
 * floats, -1 for integers, so unwritten outputs show). */
static tpair tp_new(enum ksm_dtype dt, int ndim, const int64_t *shape, const void *host)
{
    tpair t;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    size_t bytes = (size_t)n * ksm_dtype_size(dt);
    void *pc = dalloc(E.dc, bytes), *pg = dalloc(E.dg, bytes);
    cr_assert_eq(ksm_tensor_init(&t.c, E.dc, pc, dt, ndim, shape), 0);
    cr_assert_eq(ksm_tensor_init(&t.g, E.dg, pg, dt, ndim, shape), 0);
    if (bytes > 0) {
        if (host != NULL) {
            cr_assert_eq(ksm_stream_memcpy_async(E.sc, pc, host, bytes, KSM_COPY_H2D), 0);
            cr_assert_eq(ksm_stream_memcpy_async(E.sg, pg, host, bytes, KSM_COPY_H2D), 0);
        } else {
            cr_assert_eq(ksm_stream_memset_async(E.sc, pc, 0xff, bytes), 0);
            cr_assert_eq(ksm_stream_memset_async(E.sg, pg, 0xff, bytes), 0);
        }
        sync_both(); /* host may be freed after this */
    }
    return t;
}

/* F32 tensor with uniform random values in [lo, hi). */
static tpair tp_rand(int ndim, const int64_t *shape, float lo, float hi)
{
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    float *h = frand(n, lo, hi);
    tpair t = tp_new(KSM_DTYPE_F32, ndim, shape, h);
    free(h);
    return t;
}

static tpair tp_out(enum ksm_dtype dt, int ndim, const int64_t *shape)
{
    return tp_new(dt, ndim, shape, NULL);
}

static tpair tp_permute(tpair t, const int *perm)
{
    tpair r;
    cr_assert_eq(ksm_tensor_permute(&r.c, &t.c, perm), 0);
    cr_assert_eq(ksm_tensor_permute(&r.g, &t.g, perm), 0);
    return r;
}

static tpair tp_narrow(tpair t, int dim, int64_t start, int64_t len)
{
    tpair r;
    cr_assert_eq(ksm_tensor_narrow(&r.c, &t.c, dim, start, len), 0);
    cr_assert_eq(ksm_tensor_narrow(&r.g, &t.g, dim, start, len), 0);
    return r;
}

static tpair tp_expand(tpair t, int ndim, const int64_t *shape)
{
    tpair r;
    cr_assert_eq(ksm_tensor_expand(&r.c, &t.c, ndim, shape), 0);
    cr_assert_eq(ksm_tensor_expand(&r.g, &t.g, ndim, shape), 0);
    return r;
}

/* A hand-made strided F32 view of base (offset in elements). */
static tpair tp_view(tpair base, int64_t offset, int ndim, const int64_t *shape,
                     const int64_t *stride)
{
    tpair r = base;
    r.c.data = (float *)base.c.data + offset;
    r.g.data = (float *)base.g.data + offset;
    r.c.ndim = r.g.ndim = ndim;
    for (int i = 0; i < ndim; i++) {
        r.c.shape[i] = r.g.shape[i] = shape[i];
        r.c.stride[i] = r.g.stride[i] = stride[i];
    }
    return r;
}

/* Runs expr once per device: S is the stream, T(p) the side's tensor, W(c, g) the side's
 * pointer. */
#define T(p)      (side_ ? &(p).g : &(p).c)
#define W(pc, pg) (side_ ? (pg) : (pc))
#define BOTH(expr)                                                                                 \
    do {                                                                                           \
        for (int side_ = 0; side_ < 2; side_++) {                                                  \
            ksm_stream *S = side_ ? E.sg : E.sc;                                                   \
            int rc_ = (expr);                                                                      \
            cr_assert_eq(rc_, 0, "%s: %s returned %s", side_ ? "cuda" : "cpu", #expr,              \
                         ksm_err_name(rc_));                                                       \
        }                                                                                          \
    } while (0)

/* Copies a contiguous tensor pair to host: *hc (cpu result) and *hg (cuda result). */
static size_t download(tpair t, void **hc, void **hg)
{
    size_t bytes = (size_t)ksm_tensor_numel(&t.c) * ksm_dtype_size(t.c.dtype);
    *hc = malloc(bytes ? bytes : 1);
    *hg = malloc(bytes ? bytes : 1);
    cr_assert(*hc && *hg);
    if (bytes > 0) {
        cr_assert_eq(ksm_stream_memcpy_async(E.sc, *hc, t.c.data, bytes, KSM_COPY_D2H), 0);
        cr_assert_eq(ksm_stream_memcpy_async(E.sg, *hg, t.g.data, bytes, KSM_COPY_D2H), 0);
    }
    sync_both();
    return bytes;
}

static bool f16_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
static bool bf16_nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

/* F32: max|d| / max|ref| <= tol; a NaN must match a NaN. */
static void expect_close(tpair t, double tol, const char *what)
{
    cr_assert_eq(t.c.dtype, KSM_DTYPE_F32);
    void *vc, *vg;
    size_t bytes = download(t, &vc, &vg);
    const float *c = vc, *g = vg;
    int64_t n = (int64_t)(bytes / sizeof(float));
    double maxref = 0.0, maxd = 0.0;
    int64_t at = -1, nan_bad = 0, first_nan_bad = -1;
    for (int64_t i = 0; i < n; i++) {
        bool cn = isnan(c[i]), gn = isnan(g[i]);
        if (cn || gn) {
            if (cn != gn) {
                if (nan_bad++ == 0) first_nan_bad = i;
            }
            continue;
        }
        double r = fabs((double)c[i]);
        if (r > maxref) maxref = r;
        double d = fabs((double)c[i] - (double)g[i]);
        if (d > maxd || at < 0) {
            maxd = d > maxd ? d : maxd;
            at = i;
        }
    }
    double rel = maxd / (maxref > 0.0 ? maxref : 1.0);
    cr_expect_eq(nan_bad, 0, "%s: %lld NaN mismatches (first at %lld: cpu %g cuda %g)", what,
                 (long long)nan_bad, (long long)first_nan_bad,
                 first_nan_bad >= 0 ? c[first_nan_bad] : 0.0,
                 first_nan_bad >= 0 ? g[first_nan_bad] : 0.0);
    cr_expect_leq(rel, tol, "%s: max|d|/max|ref| = %.3g > %.1g (at %lld: cpu %.9g cuda %.9g)", what,
                  rel, tol, (long long)at, at >= 0 ? c[at] : 0.0, at >= 0 ? g[at] : 0.0);
    free(vc);
    free(vg);
}

/* Bit-exact, except that any NaN matches any NaN of the same dtype. */
static void expect_exact(tpair t, const char *what)
{
    void *vc, *vg;
    size_t bytes = download(t, &vc, &vg);
    size_t es = ksm_dtype_size(t.c.dtype);
    int64_t n = (int64_t)(bytes / es), bad = 0, first = -1;
    for (int64_t i = 0; i < n; i++) {
        const char *pc = (const char *)vc + i * es, *pg = (const char *)vg + i * es;
        if (memcmp(pc, pg, es) == 0) continue;
        bool both_nan = false;
        if (t.c.dtype == KSM_DTYPE_F32) {
            float a, b;
            memcpy(&a, pc, 4);
            memcpy(&b, pg, 4);
            both_nan = isnan(a) && isnan(b);
        } else if (t.c.dtype == KSM_DTYPE_F16 || t.c.dtype == KSM_DTYPE_BF16) {
            uint16_t a, b;
            memcpy(&a, pc, 2);
            memcpy(&b, pg, 2);
            both_nan =
                t.c.dtype == KSM_DTYPE_F16 ? f16_nan(a) && f16_nan(b) : bf16_nan(a) && bf16_nan(b);
        }
        if (!both_nan && bad++ == 0) first = i;
    }
    char desc[64] = "";
    if (first >= 0) {
        if (t.c.dtype == KSM_DTYPE_F32)
            snprintf(desc, sizeof desc, "cpu %.9g cuda %.9g", ((float *)vc)[first],
                     ((float *)vg)[first]);
        else if (t.c.dtype == KSM_DTYPE_I64)
            snprintf(desc, sizeof desc, "cpu %lld cuda %lld", (long long)((int64_t *)vc)[first],
                     (long long)((int64_t *)vg)[first]);
        else if (t.c.dtype == KSM_DTYPE_I32)
            snprintf(desc, sizeof desc, "cpu %d cuda %d", ((int32_t *)vc)[first],
                     ((int32_t *)vg)[first]);
        else
            snprintf(desc, sizeof desc, "cpu 0x%04x cuda 0x%04x", ((uint16_t *)vc)[first],
                     ((uint16_t *)vg)[first]);
    }
    cr_expect_eq(bad, 0, "%s: %lld of %lld elements differ (first at %lld: %s)", what,
                 (long long)bad, (long long)n, (long long)first, desc);
    free(vc);
    free(vg);
}

#define SHAPE(...) ((const int64_t[]){__VA_ARGS__})

// ---- COPY / FILL ----

Test(gpu_ops, copy_matches_cpu)
{
    gpu_begin(1);
    tpair x = tp_rand(3, SHAPE(4, 5, 6), -3.0f, 3.0f);

    tpair y = tp_out(KSM_DTYPE_F32, 3, SHAPE(4, 5, 6));
    BOTH(ksm_op_copy(S, T(y), T(x)));
    expect_exact(y, "copy contiguous");

    tpair xp = tp_permute(x, (const int[]){2, 0, 1}); /* [6,4,5] */
    tpair yp = tp_out(KSM_DTYPE_F32, 3, SHAPE(6, 4, 5));
    BOTH(ksm_op_copy(S, T(yp), T(xp)));
    expect_exact(yp, "copy permuted");

    tpair xn = tp_narrow(x, 2, 1, 4); /* [4,5,4], row stride 6 */
    tpair yn = tp_out(KSM_DTYPE_F32, 3, SHAPE(4, 5, 4));
    BOTH(ksm_op_copy(S, T(yn), T(xn)));
    expect_exact(yn, "copy narrowed");

    tpair r = tp_rand(2, SHAPE(1, 7), -1.0f, 1.0f);
    tpair re = tp_expand(r, 3, SHAPE(3, 5, 7));
    tpair ye = tp_out(KSM_DTYPE_F32, 3, SHAPE(3, 5, 7));
    BOTH(ksm_op_copy(S, T(ye), T(re)));
    expect_exact(ye, "copy broadcast");

    /* Conversions from strided sources; values include ties, tiny and huge numbers. */
    float special[16] = {0.0f,     -0.0f,   1.0f,    -1.5f,          65504.0f,      70000.0f,
                         1e-8f,    6.1e-5f, 3.0e-7f, 1.00048828125f, 1.0009765625f, 3.4e38f,
                         -2.5e-6f, 0.1f,    NAN,     INFINITY};
    tpair sp = tp_new(KSM_DTYPE_F32, 2, SHAPE(4, 4), special);
    tpair spt = tp_permute(sp, (const int[]){1, 0});
    tpair h16 = tp_out(KSM_DTYPE_F16, 2, SHAPE(4, 4));
    tpair hb16 = tp_out(KSM_DTYPE_BF16, 2, SHAPE(4, 4));
    BOTH(ksm_op_copy(S, T(h16), T(spt)));
    BOTH(ksm_op_copy(S, T(hb16), T(spt)));
    expect_exact(h16, "copy f32->f16");
    expect_exact(hb16, "copy f32->bf16");
    tpair xpf16 = tp_out(KSM_DTYPE_F16, 3, SHAPE(6, 4, 5));
    BOTH(ksm_op_copy(S, T(xpf16), T(xp)));
    expect_exact(xpf16, "copy f32 permuted->f16");
    tpair back = tp_out(KSM_DTYPE_F32, 2, SHAPE(4, 4));
    tpair h16t = tp_permute(h16, (const int[]){1, 0});
    BOTH(ksm_op_copy(S, T(back), T(h16t)));
    expect_exact(back, "copy f16->f32");
    tpair b2h = tp_out(KSM_DTYPE_F16, 2, SHAPE(4, 4));
    BOTH(ksm_op_copy(S, T(b2h), T(hb16)));
    expect_exact(b2h, "copy bf16->f16");
    tpair h2b = tp_out(KSM_DTYPE_BF16, 2, SHAPE(4, 4));
    BOTH(ksm_op_copy(S, T(h2b), T(h16t)));
    expect_exact(h2b, "copy f16->bf16 (strided)");
    tpair bf = tp_out(KSM_DTYPE_F32, 2, SHAPE(4, 4));
    BOTH(ksm_op_copy(S, T(bf), T(hb16)));
    expect_exact(bf, "copy bf16->f32");

    int64_t iv[12] = {
        0,         1,         -1, 2147483647, 2147483648ll,  -2147483649ll, 4294967296ll + 5,
        INT64_MAX, INT64_MIN, 42, -42,        123456789012ll};
    tpair i64 = tp_new(KSM_DTYPE_I64, 2, SHAPE(3, 4), iv);
    tpair i64t = tp_permute(i64, (const int[]){1, 0});
    tpair i32 = tp_out(KSM_DTYPE_I32, 2, SHAPE(4, 3));
    BOTH(ksm_op_copy(S, T(i32), T(i64t)));
    expect_exact(i32, "copy i64->i32 (wraps)");
    tpair i64b = tp_out(KSM_DTYPE_I64, 2, SHAPE(4, 3));
    BOTH(ksm_op_copy(S, T(i64b), T(i32)));
    expect_exact(i64b, "copy i32->i64");
    tpair i64c = tp_out(KSM_DTYPE_I64, 2, SHAPE(4, 3));
    BOTH(ksm_op_copy(S, T(i64c), T(i64t)));
    expect_exact(i64c, "copy i64 strided");
}

Test(gpu_ops, fill_matches_cpu)
{
    gpu_begin(2);
    const double vals[] = {0.0, 1.5, -3.25, 1e-6, 70000.0, -123456.0};
    const enum ksm_dtype dts[] = {KSM_DTYPE_F32, KSM_DTYPE_F16, KSM_DTYPE_BF16, KSM_DTYPE_I64,
                                  KSM_DTYPE_I32};
    for (size_t d = 0; d < sizeof dts / sizeof dts[0]; d++)
        for (size_t v = 0; v < sizeof vals / sizeof vals[0]; v++) {
            /* ksm_op_fill rejects a non-integral value for an integer dtype (KSM_EINVAL). */
            bool is_int = dts[d] == KSM_DTYPE_I64 || dts[d] == KSM_DTYPE_I32;
            if (is_int && vals[v] != floor(vals[v])) continue;
            tpair y = tp_out(dts[d], 2, SHAPE(37, 29));
            BOTH(ksm_op_fill(S, T(y), vals[v]));
            char what[64];
            snprintf(what, sizeof what, "fill %s %g", ksm_dtype_name(dts[d]), vals[v]);
            expect_exact(y, what);
        }
    tpair big = tp_out(KSM_DTYPE_F32, 1, SHAPE((1 << 20) + 3));
    BOTH(ksm_op_fill(S, T(big), 0.25));
    expect_exact(big, "fill large");
}

// ---- Elementwise ----

typedef int (*unary_op_fn)(ksm_stream *, ksm_tensor *, const ksm_tensor *);

static int affine_op(ksm_stream *s, ksm_tensor *y, const ksm_tensor *x)
{
    return ksm_op_affine(s, y, x, -1.75f, 0.5f);
}

Test(gpu_ops, unary_matches_cpu)
{
    gpu_begin(3);
    const unary_op_fn fns[] = {ksm_op_relu, ksm_op_gelu,    ksm_op_sigmoid,
                               ksm_op_tanh, ksm_op_clamp01, affine_op};
    const char *names[] = {"relu", "gelu", "sigmoid", "tanh", "clamp01", "affine"};
    tpair x = tp_rand(3, SHAPE(3, 5, 7), -4.0f, 4.0f);
    tpair xp = tp_permute(tp_rand(3, SHAPE(7, 3, 5), -4.0f, 4.0f), (const int[]){1, 2, 0});
    tpair xb = tp_expand(tp_rand(2, SHAPE(5, 1), -4.0f, 4.0f), 3, SHAPE(3, 5, 7));
    tpair big = tp_rand(1, SHAPE((1 << 20) + 3), -6.0f, 6.0f);
    for (int f = 0; f < 6; f++) {
        char what[64];
        tpair y = tp_out(KSM_DTYPE_F32, 3, SHAPE(3, 5, 7));
        BOTH(fns[f](S, T(y), T(x)));
        snprintf(what, sizeof what, "%s contiguous", names[f]);
        expect_close(y, TOL, what);
        BOTH(fns[f](S, T(y), T(xp)));
        snprintf(what, sizeof what, "%s permuted", names[f]);
        expect_close(y, TOL, what);
        BOTH(fns[f](S, T(y), T(xb)));
        snprintf(what, sizeof what, "%s broadcast", names[f]);
        expect_close(y, TOL, what);
        tpair yb = tp_out(KSM_DTYPE_F32, 1, SHAPE((1 << 20) + 3));
        BOTH(fns[f](S, T(yb), T(big)));
        snprintf(what, sizeof what, "%s large", names[f]);
        expect_close(yb, TOL, what);
    }
    /* In place. */
    tpair z = tp_rand(2, SHAPE(33, 65), -2.0f, 2.0f);
    BOTH(ksm_op_gelu(S, T(z), T(z)));
    expect_close(z, TOL, "gelu in place");
}

Test(gpu_ops, binary_matches_cpu)
{
    gpu_begin(4);
    tpair a = tp_rand(3, SHAPE(4, 1, 6), -2.0f, 2.0f);
    tpair b = tp_rand(2, SHAPE(3, 1), -2.0f, 2.0f);
    tpair at = tp_permute(tp_rand(3, SHAPE(6, 3, 4), -2.0f, 2.0f), (const int[]){2, 1, 0});
    tpair c = tp_rand(3, SHAPE(4, 3, 6), -2.0f, 2.0f);
    typedef int (*bin_fn)(ksm_stream *, ksm_tensor *, const ksm_tensor *, const ksm_tensor *);
    const bin_fn fns[] = {ksm_op_add, ksm_op_sub, ksm_op_mul};
    const char *names[] = {"add", "sub", "mul"};
    for (int f = 0; f < 3; f++) {
        char what[64];
        tpair y = tp_out(KSM_DTYPE_F32, 3, SHAPE(4, 3, 6));
        BOTH(fns[f](S, T(y), T(a), T(b)));
        snprintf(what, sizeof what, "%s broadcast", names[f]);
        expect_close(y, TOL, what);
        BOTH(fns[f](S, T(y), T(at), T(c)));
        snprintf(what, sizeof what, "%s transposed", names[f]);
        expect_close(y, TOL, what);
        BOTH(fns[f](S, T(y), T(c), T(at)));
        snprintf(what, sizeof what, "%s transposed rhs", names[f]);
        expect_close(y, TOL, what);
    }
    tpair big_a = tp_rand(2, SHAPE(1000, 1027), -1.0f, 1.0f);
    tpair big_b = tp_rand(1, SHAPE(1027), -1.0f, 1.0f);
    tpair y = tp_out(KSM_DTYPE_F32, 2, SHAPE(1000, 1027));
    BOTH(ksm_op_mul(S, T(y), T(big_a), T(big_b)));
    expect_close(y, TOL, "mul row broadcast (large)");
    BOTH(ksm_op_add(S, T(big_a), T(big_a), T(big_b)));
    expect_close(big_a, TOL, "add in place");
}

Test(gpu_ops, lerp_matches_cpu)
{
    gpu_begin(5);
    tpair a = tp_rand(4, SHAPE(4, 3, 8, 8), -5.0f, 5.0f);
    tpair b = tp_rand(4, SHAPE(4, 3, 8, 8), -5.0f, 5.0f);
    /* Per-sample weights 0 and 1 must give a and b bit-exactly on both devices. */
    float w01[4] = {0.0f, 1.0f, 0.0f, 1.0f};
    tpair w = tp_new(KSM_DTYPE_F32, 4, SHAPE(4, 1, 1, 1), w01);
    tpair y = tp_out(KSM_DTYPE_F32, 4, SHAPE(4, 3, 8, 8));
    BOTH(ksm_op_lerp(S, T(y), T(a), T(b), T(w)));
    expect_exact(y, "lerp w in {0,1}");
    float wv[4] = {0.3f, 0.7f, -0.25f, 1.5f};
    tpair w2 = tp_new(KSM_DTYPE_F32, 4, SHAPE(4, 1, 1, 1), wv);
    BOTH(ksm_op_lerp(S, T(y), T(a), T(b), T(w2)));
    expect_close(y, TOL, "lerp per-sample w");
    float ws = 0.4f;
    tpair w3 = tp_new(KSM_DTYPE_F32, 0, SHAPE(1), &ws);
    BOTH(ksm_op_lerp(S, T(y), T(a), T(b), T(w3)));
    expect_close(y, TOL, "lerp scalar w");
    tpair wfull = tp_rand(4, SHAPE(4, 3, 8, 8), -0.5f, 1.5f);
    tpair bt = tp_permute(tp_rand(4, SHAPE(4, 3, 8, 8), -5.0f, 5.0f), (const int[]){0, 1, 3, 2});
    BOTH(ksm_op_lerp(S, T(y), T(a), T(bt), T(wfull)));
    expect_close(y, TOL, "lerp elementwise w, transposed b");
}

// ---- GEMM / LINEAR / CONV2D ----

Test(gpu_ops, gemm_matches_cpu)
{
    gpu_begin(6);
    const int64_t M = 33, N = 47, K = 29;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            char what[96];
            /* A and B are narrowed views of wider buffers: row stride > row length. */
            tpair abuf = ta ? tp_rand(2, SHAPE(K, M + 3), -1.0f, 1.0f)
                            : tp_rand(2, SHAPE(M, K + 3), -1.0f, 1.0f);
            tpair a = tp_narrow(abuf, 1, 2, ta ? M : K);
            tpair bbuf = tb ? tp_rand(2, SHAPE(N, K + 5), -1.0f, 1.0f)
                            : tp_rand(2, SHAPE(K, N + 5), -1.0f, 1.0f);
            tpair b = tp_narrow(bbuf, 1, 1, tb ? K : N);
            tpair c = tp_out(KSM_DTYPE_F32, 2, SHAPE(M, N));
            BOTH(ksm_op_gemm(S, T(c), T(a), T(b), ta, tb, 1.25f, 0.0f));
            snprintf(what, sizeof what, "gemm ta=%d tb=%d beta=0", ta, tb);
            expect_close(c, TOL, what);

            /* beta != 0 into a view with row stride > N. */
            tpair cbuf = tp_rand(2, SHAPE(M, N + 4), -1.0f, 1.0f);
            tpair cv = tp_narrow(cbuf, 1, 3, N);
            BOTH(ksm_op_gemm(S, T(cv), T(a), T(b), ta, tb, 0.5f, 0.75f));
            snprintf(what, sizeof what, "gemm ta=%d tb=%d beta=0.75 strided c", ta, tb);
            expect_close(cbuf, TOL, what);
        }
    /* Batched, A broadcast over the batch (batch stride 0). */
    const int64_t Bt = 3;
    tpair a1 = tp_rand(3, SHAPE(1, M, K), -1.0f, 1.0f);
    tpair ab = tp_expand(a1, 3, SHAPE(Bt, M, K));
    tpair bb = tp_rand(3, SHAPE(Bt, K, N), -1.0f, 1.0f);
    tpair cb = tp_out(KSM_DTYPE_F32, 3, SHAPE(Bt, M, N));
    BOTH(ksm_op_gemm(S, T(cb), T(ab), T(bb), false, false, 1.0f, 0.0f));
    expect_close(cb, TOL, "gemm batched, A broadcast");
    tpair bbt = tp_rand(3, SHAPE(Bt, N, K), -1.0f, 1.0f);
    BOTH(ksm_op_gemm(S, T(cb), T(ab), T(bbt), false, true, 1.0f, 0.0f));
    expect_close(cb, TOL, "gemm batched, B transposed");
    /* alpha = 0: C <- beta * C, A and B are not read (BLAS), so Inf/NaN in them do not
     * show. */
    float *hna = frand(M * K, -1.0f, 1.0f);
    hna[0] = NAN;
    hna[5] = INFINITY;
    tpair na = tp_new(KSM_DTYPE_F32, 2, SHAPE(M, K), hna);
    free(hna);
    tpair nb = tp_rand(2, SHAPE(K, N), -1.0f, 1.0f);
    tpair nc = tp_rand(2, SHAPE(M, N), -1.0f, 1.0f);
    BOTH(ksm_op_gemm(S, T(nc), T(na), T(nb), false, false, 0.0f, 0.5f));
    expect_close(nc, TOL, "gemm alpha=0 with Inf/NaN in A");
    /* Larger square case. */
    tpair la = tp_rand(2, SHAPE(256, 512), -1.0f, 1.0f);
    tpair lb = tp_rand(2, SHAPE(512, 320), -1.0f, 1.0f);
    tpair lc = tp_out(KSM_DTYPE_F32, 2, SHAPE(256, 320));
    BOTH(ksm_op_gemm(S, T(lc), T(la), T(lb), false, false, 1.0f, 0.0f));
    expect_close(lc, TOL, "gemm 256x320x512");
}

Test(gpu_ops, linear_matches_cpu)
{
    gpu_begin(7);
    tpair x = tp_rand(3, SHAPE(2, 5, 48), -1.0f, 1.0f);
    tpair w = tp_rand(2, SHAPE(40, 48), -0.5f, 0.5f);
    tpair bias = tp_rand(1, SHAPE(40), -1.0f, 1.0f);
    tpair y = tp_out(KSM_DTYPE_F32, 3, SHAPE(2, 5, 40));
    BOTH(ksm_op_linear(S, T(y), T(x), T(w), T(bias)));
    expect_close(y, TOL, "linear with bias");
    BOTH(ksm_op_linear(S, T(y), T(x), T(w), NULL));
    expect_close(y, TOL, "linear without bias");
    tpair x2 = tp_rand(2, SHAPE(300, 257), -1.0f, 1.0f);
    tpair w2 = tp_rand(2, SHAPE(130, 257), -0.5f, 0.5f);
    tpair b2 = tp_rand(1, SHAPE(130), -1.0f, 1.0f);
    tpair y2 = tp_out(KSM_DTYPE_F32, 2, SHAPE(300, 130));
    BOTH(ksm_op_linear(S, T(y2), T(x2), T(w2), T(b2)));
    expect_close(y2, TOL, "linear 300x130x257");
}

struct conv_case {
    int64_t n, ci, h, w, co, kh, kw;
    int ph, pw, groups, bias, ws_mult;
    const char *what;
};

Test(gpu_ops, conv2d_matches_cpu)
{
    gpu_begin(8);
    const struct conv_case cases[] = {
        {2, 3, 9, 8, 4, 3, 3, 1, 1, 1, 1, 1, "3x3 pad 1"},
        {2, 4, 7, 7, 6, 3, 3, 0, 0, 2, 1, 1, "3x3 no pad, 2 groups"},
        {2, 8, 6, 5, 8, 1, 1, 0, 0, 1, 0, 1, "1x1 pointwise, no bias"},
        {3, 6, 5, 5, 4, 1, 1, 0, 0, 2, 1, 1, "1x1 pointwise, 2 groups"},
        {2, 3, 6, 6, 5, 1, 1, 1, 1, 1, 1, 1, "1x1 with padding (im2col)"},
        {2, 6, 7, 9, 6, 3, 3, 1, 1, 6, 1, 1, "depthwise 3x3"},
        {2, 6, 7, 9, 6, 3, 3, 1, 1, 6, 0, 1, "depthwise 3x3, no bias"},
        {1, 4, 8, 8, 8, 3, 3, 1, 1, 4, 1, 1, "one input channel per group, multiplier 2"},
        {2, 3, 10, 7, 4, 5, 3, 2, 1, 1, 1, 1, "5x3 asymmetric padding"},
        {1, 1, 12, 12, 4, 3, 3, 1, 1, 1, 0, 1, "single input channel"},
        {3, 4, 6, 6, 5, 3, 3, 1, 1, 1, 1, 2, "workspace for two images (chunks 2+1)"},
        {5, 4, 6, 6, 6, 3, 3, 1, 1, 2, 1, 8, "workspace for all images, 2 groups"},
        {2, 16, 16, 16, 32, 3, 3, 1, 1, 1, 1, 1, "16->32 channels 16x16"},
        /* Ci = 0: no workspace (its size is 0), y is the bias or zeros. */
        {2, 0, 5, 5, 4, 3, 3, 1, 1, 2, 1, 1, "no input channels, 2 groups"},
        {1, 0, 4, 4, 3, 3, 3, 1, 1, 1, 0, 1, "no input channels, no bias"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const struct conv_case *cc = &cases[k];
        int64_t ho = cc->h + 2 * cc->ph - cc->kh + 1, wo = cc->w + 2 * cc->pw - cc->kw + 1;
        tpair x = tp_rand(4, SHAPE(cc->n, cc->ci, cc->h, cc->w), -1.0f, 1.0f);
        tpair w = tp_rand(4, SHAPE(cc->co, cc->ci / cc->groups, cc->kh, cc->kw), -0.5f, 0.5f);
        tpair b = tp_rand(1, SHAPE(cc->co), -1.0f, 1.0f);
        tpair y = tp_out(KSM_DTYPE_F32, 4, SHAPE(cc->n, cc->co, ho, wo));
        size_t need_c = ksm_op_conv2d_workspace_size(&x.c, &w.c, cc->ph, cc->pw, cc->groups);
        size_t need_g = ksm_op_conv2d_workspace_size(&x.g, &w.g, cc->ph, cc->pw, cc->groups);
        cr_assert_eq(need_c, need_g);
        size_t ws_bytes = need_c * (size_t)cc->ws_mult;
        void *wsc = ws_bytes ? dalloc(E.dc, ws_bytes) : NULL;
        void *wsg = ws_bytes ? dalloc(E.dg, ws_bytes) : NULL;
        BOTH(ksm_op_conv2d(S, T(y), T(x), T(w), cc->bias ? T(b) : NULL, cc->ph, cc->pw, cc->groups,
                           W(wsc, wsg), ws_bytes));
        char what[128];
        snprintf(what, sizeof what, "conv2d %s", cc->what);
        expect_close(y, TOL, what);
    }
}

// ---- Norms, softmax ----

Test(gpu_ops, batchnorm_matches_cpu)
{
    gpu_begin(9);
    tpair x = tp_rand(4, SHAPE(4, 6, 5, 5), -2.0f, 3.0f);
    tpair mean = tp_rand(1, SHAPE(6), -1.0f, 1.0f);
    tpair var = tp_rand(1, SHAPE(6), 0.1f, 2.0f);
    tpair w = tp_rand(1, SHAPE(6), 0.5f, 1.5f);
    tpair b = tp_rand(1, SHAPE(6), -1.0f, 1.0f);
    tpair y = tp_out(KSM_DTYPE_F32, 4, SHAPE(4, 6, 5, 5));
    BOTH(ksm_op_batchnorm(S, T(y), T(x), T(mean), T(var), T(w), T(b), 1e-5f));
    expect_close(y, TOL, "batchnorm 4d");
    tpair x2 = tp_rand(2, SHAPE(9, 6), -2.0f, 3.0f);
    tpair y2 = tp_out(KSM_DTYPE_F32, 2, SHAPE(9, 6));
    BOTH(ksm_op_batchnorm(S, T(y2), T(x2), T(mean), T(var), T(w), T(b), 1e-3f));
    expect_close(y2, TOL, "batchnorm 2d");
    tpair y3 = tp_out(KSM_DTYPE_F32, 4, SHAPE(4, 6, 5, 5));
    BOTH(ksm_op_batchnorm_relu(S, T(y3), T(x), T(mean), T(var), T(w), T(b), 1e-5f));
    expect_close(y3, TOL, "batchnorm + relu");
}

Test(gpu_ops, groupnorm_matches_cpu)
{
    gpu_begin(10);
    tpair x = tp_rand(4, SHAPE(3, 8, 5, 7), -1.0f, 1.0f);
    tpair xo = tp_rand(4, SHAPE(3, 8, 5, 7), 9.0f, 11.0f); /* large mean: two passes matter */
    tpair w = tp_rand(1, SHAPE(8), 0.5f, 1.5f);
    tpair b = tp_rand(1, SHAPE(8), -1.0f, 1.0f);
    tpair y = tp_out(KSM_DTYPE_F32, 4, SHAPE(3, 8, 5, 7));
    const int groups[] = {1, 2, 4, 8};
    for (int g = 0; g < 4; g++) {
        char what[64];
        BOTH(ksm_op_groupnorm(S, T(y), T(x), groups[g], T(w), T(b), 1e-5f));
        snprintf(what, sizeof what, "groupnorm g=%d", groups[g]);
        expect_close(y, TOL, what);
        BOTH(ksm_op_groupnorm(S, T(y), T(xo), groups[g], NULL, NULL, 1e-5f));
        snprintf(what, sizeof what, "groupnorm g=%d offset, no affine", groups[g]);
        expect_close(y, TOL, what);
    }
    tpair xl = tp_rand(4, SHAPE(2, 64, 32, 32), -1.0f, 1.0f);
    tpair wl = tp_rand(1, SHAPE(64), 0.5f, 1.5f);
    tpair bl = tp_rand(1, SHAPE(64), -1.0f, 1.0f);
    tpair yl = tp_out(KSM_DTYPE_F32, 4, SHAPE(2, 64, 32, 32));
    BOTH(ksm_op_groupnorm(S, T(yl), T(xl), 32, T(wl), T(bl), 1e-5f));
    expect_close(yl, TOL, "groupnorm 64ch 32 groups 32x32");
    tpair x3 = tp_rand(3, SHAPE(4, 6, 10), -1.0f, 1.0f);
    tpair y3 = tp_out(KSM_DTYPE_F32, 3, SHAPE(4, 6, 10));
    BOTH(ksm_op_groupnorm(S, T(y3), T(x3), 3, NULL, NULL, 1e-5f));
    expect_close(y3, TOL, "groupnorm 3d");
}

Test(gpu_ops, layernorm_matches_cpu)
{
    gpu_begin(11);
    struct {
        int64_t rows, d;
        float lo, hi;
        int affine;
    } cases[] = {{42, 96, -1.0f, 1.0f, 1}, {4, 1000, -1.0f, 1.0f, 0}, {3, 5000, 9.0f, 11.0f, 1},
                 {17, 7, -3.0f, 3.0f, 1},  {1, 1, -1.0f, 1.0f, 1},    {64, 768, 99.0f, 101.0f, 1}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        tpair x = tp_rand(2, SHAPE(cases[k].rows, cases[k].d), cases[k].lo, cases[k].hi);
        tpair w = tp_rand(1, SHAPE(cases[k].d), 0.5f, 1.5f);
        tpair b = tp_rand(1, SHAPE(cases[k].d), -1.0f, 1.0f);
        tpair y = tp_out(KSM_DTYPE_F32, 2, SHAPE(cases[k].rows, cases[k].d));
        BOTH(ksm_op_layernorm(S, T(y), T(x), cases[k].affine ? T(w) : NULL,
                              cases[k].affine ? T(b) : NULL, 1e-5f));
        char what[64];
        snprintf(what, sizeof what, "layernorm %lldx%lld", (long long)cases[k].rows,
                 (long long)cases[k].d);
        expect_close(y, TOL, what);
    }
    tpair x3 = tp_rand(3, SHAPE(2, 7, 96), -1.0f, 1.0f);
    tpair w3 = tp_rand(1, SHAPE(96), 0.5f, 1.5f);
    tpair y3 = tp_out(KSM_DTYPE_F32, 3, SHAPE(2, 7, 96));
    BOTH(ksm_op_layernorm(S, T(y3), T(x3), T(w3), NULL, 1e-6f));
    expect_close(y3, TOL, "layernorm 3d, weight only");
}

Test(gpu_ops, softmax_matches_cpu)
{
    gpu_begin(12);
    struct {
        int64_t rows, d;
        float scale;
    } cases[] = {{5, 17, 1.0f}, {3, 2000, 20.0f}, {6, 33, 5.0f}, {2, 100000, 3.0f}, {1, 1, 1.0f}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        tpair x = tp_rand(2, SHAPE(cases[k].rows, cases[k].d), -cases[k].scale, cases[k].scale);
        tpair y = tp_out(KSM_DTYPE_F32, 2, SHAPE(cases[k].rows, cases[k].d));
        BOTH(ksm_op_softmax(S, T(y), T(x)));
        char what[64];
        snprintf(what, sizeof what, "softmax %lldx%lld", (long long)cases[k].rows,
                 (long long)cases[k].d);
        expect_close(y, TOL, what);
    }
}

// ---- Attention ----

struct sdpa_case {
    int64_t b, h, tq, tk, hd;
    int causal;
    float scale;
    const char *what;
};

Test(gpu_ops, sdpa_matches_cpu)
{
    gpu_begin(13);
    const struct sdpa_case cases[] = {
        {2, 3, 37, 37, 64, 0, 0.0f, "hd 64"},
        {2, 3, 37, 37, 64, 1, 0.0f, "hd 64 causal"},
        {1, 2, 5, 37, 32, 1, 0.0f, "causal Tq < Tk (bottom-right aligned)"},
        {1, 2, 19, 19, 256, 1, 0.0f, "hd 256 causal"},
        {2, 1, 40, 23, 24, 0, 0.3f, "hd 24, Tq > Tk, explicit scale"},
        {1, 1, 70, 70, 128, 1, 0.0f, "hd 128 causal"},
        {1, 2, 1, 300, 80, 0, 0.0f, "one query, long keys"},
        {1, 1, 9, 9, 1, 1, 0.0f, "hd 1"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const struct sdpa_case *c = &cases[k];
        tpair q = tp_rand(4, SHAPE(c->b, c->h, c->tq, c->hd), -1.0f, 1.0f);
        tpair kk = tp_rand(4, SHAPE(c->b, c->h, c->tk, c->hd), -1.0f, 1.0f);
        tpair v = tp_rand(4, SHAPE(c->b, c->h, c->tk, c->hd), -1.0f, 1.0f);
        tpair o = tp_out(KSM_DTYPE_F32, 4, SHAPE(c->b, c->h, c->tq, c->hd));
        BOTH(ksm_op_sdpa(S, T(o), T(q), T(kk), T(v), c->causal, c->scale));
        char what[128];
        snprintf(what, sizeof what, "sdpa %s", c->what);
        expect_close(o, TOL, what);
    }
    /* Strided: q, k, v are views into a fused [B, T, 3, H, hd] projection and the output a view
     * into [B, T, H, hd], as a transformer block uses them. */
    const int64_t B = 2, Tt = 45, H = 4, hd = 48;
    tpair qkv = tp_rand(5, SHAPE(B, Tt, 3, H, hd), -1.5f, 1.5f);
    const int64_t st[4] = {Tt * 3 * H * hd, hd, 3 * H * hd, 1};
    const int64_t sh[4] = {B, H, Tt, hd};
    tpair q = tp_view(qkv, 0, 4, sh, st);
    tpair kk = tp_view(qkv, H * hd, 4, sh, st);
    tpair v = tp_view(qkv, 2 * H * hd, 4, sh, st);
    for (int causal = 0; causal < 2; causal++) {
        tpair obuf = tp_out(KSM_DTYPE_F32, 4, SHAPE(B, Tt, H, hd));
        const int64_t ost[4] = {Tt * H * hd, hd, H * hd, 1};
        tpair o = tp_view(obuf, 0, 4, sh, ost);
        BOTH(ksm_op_sdpa(S, T(o), T(q), T(kk), T(v), causal, 0.0f));
        expect_close(obuf, TOL, causal ? "sdpa strided qkv causal" : "sdpa strided qkv");
    }
}

Test(gpu_ops, sdpa_nonfinite_matches_cpu)
{
    gpu_begin(22);
    /* Causal: V of key 13 is NaN. Queries 0..12 never see it and must stay finite, although
     * they share a key tile (and a block) with it; queries 13.. are NaN on both devices. */
    {
        const int64_t Tn = 20, hd = 16;
        tpair q = tp_rand(4, SHAPE(1, 1, Tn, hd), -1.0f, 1.0f);
        tpair kk = tp_rand(4, SHAPE(1, 1, Tn, hd), -1.0f, 1.0f);
        float *hv = frand(Tn * hd, -1.0f, 1.0f);
        for (int64_t d = 0; d < hd; d++) hv[13 * hd + d] = NAN;
        tpair v = tp_new(KSM_DTYPE_F32, 4, SHAPE(1, 1, Tn, hd), hv);
        free(hv);
        tpair o = tp_out(KSM_DTYPE_F32, 4, SHAPE(1, 1, Tn, hd));
        BOTH(ksm_op_sdpa(S, T(o), T(q), T(kk), T(v), true, 0.0f));
        expect_close(o, TOL, "sdpa causal, NaN values at masked keys");
    }
    /* Non-causal, 33 keys: the last key tile holds only key 32, whose K row is NaN. Its NaN
     * score poisons every row (as on the CPU), not skipped as an all -inf tile. */
    {
        const int64_t Tq = 3, Tk = 33, hd = 16;
        tpair q = tp_rand(4, SHAPE(1, 1, Tq, hd), -1.0f, 1.0f);
        float *hk = frand(Tk * hd, -1.0f, 1.0f);
        for (int64_t d = 0; d < hd; d++) hk[32 * hd + d] = NAN;
        tpair kk = tp_new(KSM_DTYPE_F32, 4, SHAPE(1, 1, Tk, hd), hk);
        free(hk);
        tpair v = tp_rand(4, SHAPE(1, 1, Tk, hd), -1.0f, 1.0f);
        tpair o = tp_out(KSM_DTYPE_F32, 4, SHAPE(1, 1, Tq, hd));
        BOTH(ksm_op_sdpa(S, T(o), T(q), T(kk), T(v), false, 0.0f));
        expect_close(o, TOL, "sdpa, a key tile of NaN scores only");
    }
}

// ---- Embedding, mean, pooling, losses, argmax ----

Test(gpu_ops, embedding_matches_cpu)
{
    gpu_begin(14);
    tpair w = tp_rand(2, SHAPE(50, 33), -1.0f, 1.0f);
    int64_t ids[28];
    for (int i = 0; i < 28; i++) ids[i] = (int64_t)(urand() * 50.0);
    ids[3] = -1;
    ids[10] = 50;
    ids[20] = 1000;
    ids[27] = 49;
    tpair idx = tp_new(KSM_DTYPE_I64, 2, SHAPE(4, 7), ids);
    tpair y = tp_out(KSM_DTYPE_F32, 3, SHAPE(4, 7, 33));
    BOTH(ksm_op_embedding(S, T(y), T(w), T(idx)));
    expect_exact(y, "embedding i64 (out-of-range rows are NaN)");
    int32_t ids32[9] = {0, 49, 7, -3, 12, 12, 51, 1, 30};
    tpair idx32 = tp_new(KSM_DTYPE_I32, 1, SHAPE(9), ids32);
    tpair y32 = tp_out(KSM_DTYPE_F32, 2, SHAPE(9, 33));
    BOTH(ksm_op_embedding(S, T(y32), T(w), T(idx32)));
    expect_exact(y32, "embedding i32");
}

Test(gpu_ops, mean_matches_cpu)
{
    gpu_begin(15);
    struct {
        int ndim;
        int64_t shape[4];
        int db, de;
        int64_t out[4];
        int out_ndim;
    } cases[] = {
        {4, {4, 6, 5, 5}, 2, 4, {4, 6}, 2},   {3, {3, 9, 17}, 1, 2, {3, 17}, 2},
        {3, {7, 3, 5}, 0, 1, {3, 5}, 2},      {3, {2, 300, 7}, 1, 2, {2, 7}, 2},
        {2, {5, 4096}, 1, 2, {5}, 1},         {3, {2, 3, 4}, 0, 3, {1}, 1},
        {4, {2, 64, 8, 8}, 2, 4, {2, 64}, 2},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        tpair x = tp_rand(cases[k].ndim, cases[k].shape, -1.0f, 2.0f);
        tpair y = tp_out(KSM_DTYPE_F32, cases[k].out_ndim, cases[k].out);
        if (cases[k].db == 0 && cases[k].de == cases[k].ndim) {
            /* full reduction: a 0-d result */
            y.c.ndim = y.g.ndim = 0;
        }
        BOTH(ksm_op_mean(S, T(y), T(x), cases[k].db, cases[k].de));
        char what[64];
        snprintf(what, sizeof what, "mean case %zu over [%d,%d)", k, cases[k].db, cases[k].de);
        expect_close(y, TOL, what);
    }
}

Test(gpu_ops, maxpool2_matches_cpu)
{
    gpu_begin(16);
    int64_t n = 2 * 3 * 9 * 8;
    float *h = frand(n, -1.0f, 1.0f);
    h[0] = NAN;
    h[17] = NAN;
    h[100] = NAN;
    h[101] = -INFINITY;
    h[200] = INFINITY;
    tpair x = tp_new(KSM_DTYPE_F32, 4, SHAPE(2, 3, 9, 8), h);
    free(h);
    tpair y = tp_out(KSM_DTYPE_F32, 4, SHAPE(2, 3, 4, 4));
    BOTH(ksm_op_maxpool2(S, T(y), T(x)));
    expect_exact(y, "maxpool2 (odd height, NaN wins)");
    tpair x2 = tp_rand(4, SHAPE(4, 16, 32, 32), -1.0f, 1.0f);
    tpair y2 = tp_out(KSM_DTYPE_F32, 4, SHAPE(4, 16, 16, 16));
    BOTH(ksm_op_maxpool2(S, T(y2), T(x2)));
    expect_exact(y2, "maxpool2 32x32");
}

Test(gpu_ops, cross_entropy_matches_cpu)
{
    gpu_begin(17);
    tpair logits = tp_rand(2, SHAPE(9, 13), -5.0f, 5.0f);
    int64_t lab[9] = {0, 12, 5, -100, 13, -5, 7, 7, 3};
    tpair labels = tp_new(KSM_DTYPE_I64, 1, SHAPE(9), lab);
    tpair loss = tp_out(KSM_DTYPE_F32, 1, SHAPE(9));
    BOTH(ksm_op_cross_entropy(S, T(loss), T(logits), T(labels), -100));
    expect_close(loss, TOL, "cross_entropy (ignore -> 0, out of range -> NaN)");
    tpair wide = tp_rand(2, SHAPE(4, 3000), -20.0f, 20.0f);
    int64_t lab2[4] = {0, 2999, 1234, 7};
    tpair labels2 = tp_new(KSM_DTYPE_I64, 1, SHAPE(4), lab2);
    tpair loss2 = tp_out(KSM_DTYPE_F32, 1, SHAPE(4));
    BOTH(ksm_op_cross_entropy(S, T(loss2), T(wide), T(labels2), 7));
    expect_close(loss2, TOL, "cross_entropy wide rows, ignore_index in range");
}

Test(gpu_ops, argmax_matches_cpu)
{
    gpu_begin(18);
    const int64_t R = 8, C = 300;
    float *h = frand(R * C, -2.0f, 2.0f);
    for (int64_t i = 0; i < R * C; i++) h[i] = floorf(h[i] * 4.0f); /* many ties */
    h[1 * C + 10] = NAN;
    h[1 * C + 200] = NAN;
    for (int64_t j = 0; j < C; j++) h[2 * C + j] = 1.0f; /* constant row */
    h[3 * C + 0] = NAN;                                  /* NaN first */
    h[4 * C + C - 1] = 100.0f;                           /* max last */
    h[5 * C + 0] = -0.0f;
    for (int64_t j = 0; j < C; j++) h[6 * C + j] = -INFINITY;
    tpair x = tp_new(KSM_DTYPE_F32, 2, SHAPE(R, C), h);
    free(h);
    tpair y = tp_out(KSM_DTYPE_I64, 1, SHAPE(R));
    BOTH(ksm_op_argmax(S, T(y), T(x)));
    expect_exact(y, "argmax (first max, NaN is max)");
    tpair x2 = tp_rand(2, SHAPE(1000, 3), -1.0f, 1.0f);
    tpair y2 = tp_out(KSM_DTYPE_I64, 1, SHAPE(1000));
    BOTH(ksm_op_argmax(S, T(y2), T(x2)));
    expect_exact(y2, "argmax narrow rows");
    tpair x3 = tp_rand(2, SHAPE(3, 50000), -1.0f, 1.0f);
    tpair y3 = tp_out(KSM_DTYPE_I64, 1, SHAPE(3));
    BOTH(ksm_op_argmax(S, T(y3), T(x3)));
    expect_exact(y3, "argmax wide rows");
}

// ---- Streams, events, sticky errors on the device ----

static void count_fn(void *arg)
{
    int *p = arg;
    (*p)++;
}

Test(gpu_ops, streams_events_and_host_fns)
{
    gpu_begin(19);
    ksm_stream *s2 = NULL;
    ksm_event *ev = NULL;
    cr_assert_eq(ksm_stream_new(E.dg, &s2), 0);
    cr_assert_eq(ksm_event_new(E.dg, &ev), 0);
    cr_expect_eq(ksm_event_query(ev), 0, "a never-recorded event is complete");
    cr_expect_eq(ksm_stream_wait_event(s2, ev), 0, "waiting on a never-recorded event");

    const size_t n = 1 << 22;
    void *a = dalloc(E.dg, n), *b = dalloc(E.dg, n);
    unsigned char *h = malloc(n);
    cr_assert_not_null(h);
    cr_assert_eq(ksm_stream_memset_async(E.sg, a, 0x5a, n), 0);
    cr_assert_eq(ksm_event_record(ev, E.sg), 0);
    cr_assert_eq(ksm_stream_wait_event(s2, ev), 0);
    cr_assert_eq(ksm_stream_memcpy_async(s2, b, a, n, KSM_COPY_D2D), 0);
    int calls = 0;
    cr_assert_eq(ksm_stream_launch_host_fn(s2, count_fn, &calls), 0);
    cr_assert_eq(ksm_stream_memcpy_async(s2, h, b, n, KSM_COPY_D2H), 0);
    cr_assert_eq(ksm_stream_synchronize(s2), 0);
    cr_expect_eq(calls, 1);
    cr_expect_eq(ksm_stream_query(s2), 0);
    cr_expect_eq(ksm_event_synchronize(ev), 0);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += h[i] != 0x5a;
    cr_expect_eq(bad, 0, "cross-stream copy saw %zu wrong bytes", bad);

    size_t fr = 0, tot = 0;
    cr_expect_eq(ksm_device_mem_info(E.dg, &fr, &tot), 0);
    cr_expect_gt(tot, 0);
    cr_expect_leq(fr, tot);
    cr_expect_eq(ksm_device_synchronize(E.dg), 0);
    cr_expect_str_eq(ksm_device_name(E.dg), "cuda:0");
    cr_expect_eq(ksm_device_kind(E.dg), KSM_DEVICE_CUDA);
    cr_expect(!ksm_device_is_host(E.dg));
    free(h);
    ksm_event_free(ev);
    ksm_stream_free(s2);
}

Test(gpu_ops, device_oom_is_edevmem)
{
    gpu_begin(20);
    size_t fr = 0, tot = 0;
    cr_assert_eq(ksm_device_mem_info(E.dg, &fr, &tot), 0);
    void *p = NULL;
    int rc = ksm_device_malloc(E.dg, tot * 4, &p);
    cr_expect_eq(rc, KSM_EDEVMEM, "malloc of 4x the device: %s", ksm_err_name(rc));
    /* The failure is not sticky: the device keeps working. */
    tpair y = tp_out(KSM_DTYPE_F32, 1, SHAPE(1000));
    BOTH(ksm_op_fill(S, T(y), 2.0));
    expect_exact(y, "fill after an OOM");
}

Test(gpu_ops, sticky_error_is_reported_again)
{
    gpu_begin(21);
    /* A kernel reading an unmapped address: the context is lost (cudaErrorIllegalAddress). */
    tpair y = tp_out(KSM_DTYPE_F32, 1, SHAPE(1 << 16));
    ksm_tensor bogus = y.g;
    bogus.data = (void *)(uintptr_t)0x10000; /* never a valid device allocation */
    int rc = ksm_op_relu(E.sg, &y.g, &bogus);
    cr_assert_eq(rc, 0, "the launch itself is asynchronous: %s", ksm_err_name(rc));
    rc = ksm_stream_synchronize(E.sg);
    cr_expect_eq(rc, KSM_EDEVICE, "synchronize: %s", ksm_err_name(rc));
    cr_expect_eq(ksm_stream_synchronize(E.sg), rc, "reported again");
    cr_expect_eq(ksm_stream_query(E.sg), rc, "query reports it too");
    cr_expect_eq(ksm_op_relu(E.sg, &y.g, &y.g), rc, "later launches are refused");
    cr_expect_eq(ksm_device_synchronize(E.dg), rc, "the device reports the stream's error");
    /* Teardown must not crash; drop the stream so gpu_end does not assert on it. */
    g_nbufs = 0;
    ksm_stream_free(E.sg);
    E.sg = NULL;
}

// ---- The loader (runs everywhere) ----

Test(gpu_loader, loads_or_fails_cleanly)
{
    setenv("KASMINA_CUDA_PLUGIN", PLUGIN_PATH, 0);
    ksm_backend *b = (ksm_backend *)(uintptr_t)1;
    char err[512] = "";
    int rc = ksm_cuda_backend_load(NULL, &b, err, sizeof err);
    if (rc == 0) {
        cr_assert_not_null(b);
        cr_expect_str_eq(ksm_backend_name(b), "cuda");
        cr_expect_gt(ksm_backend_device_count(b), 0);
        ksm_device *d = ksm_backend_device(b, 0);
        cr_assert_not_null(d);
        cr_expect_str_eq(ksm_device_name(d), "cuda:0");
        cr_expect_eq(ksm_device_kind(d), KSM_DEVICE_CUDA);
        cr_expect(!ksm_device_is_host(d));
        ksm_backend_free(b);
    } else {
        cr_expect(rc == KSM_ENOPLUGIN || rc == KSM_ENODEVICE, "load returned %s: %s",
                  ksm_err_name(rc), err);
        cr_expect_null(b);
        cr_expect_gt(strlen(err), 0, "the loader explains why");
        cr_log_info("CUDA backend unavailable (%s): %s", ksm_err_name(rc), err);
    }
    /* The process goes on, and the CPU backend works. */
    ksm_backend *cpu = NULL;
    cr_assert_eq(ksm_cpu_backend_new(1, &cpu), 0);
    ksm_device *dc = ksm_backend_device(cpu, 0);
    ksm_stream *s = NULL;
    cr_assert_eq(ksm_stream_new(dc, &s), 0);
    void *p = NULL;
    cr_assert_eq(ksm_device_malloc(dc, 64 * sizeof(float), &p), 0);
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, dc, p, KSM_DTYPE_F32, 1, (const int64_t[]){64}), 0);
    cr_assert_eq(ksm_op_fill(s, &t, 3.0), 0);
    cr_assert_eq(ksm_stream_synchronize(s), 0);
    cr_expect_eq(((float *)p)[63], 3.0f);
    ksm_device_free(dc, p);
    ksm_stream_free(s);
    ksm_backend_free(cpu);
}

Test(gpu_loader, missing_plugin_is_enoplugin)
{
    ksm_backend *b = NULL;
    char err[512] = "";
    int rc = ksm_cuda_backend_load("/nonexistent/dir/libkasmina_cuda.so", &b, err, sizeof err);
    cr_expect_eq(rc, KSM_ENOPLUGIN, "got %s", ksm_err_name(rc));
    cr_expect_null(b);
    cr_expect_gt(strlen(err), 0);
}

// ---- Optimizer and backward ops ----

Test(gpu_ops, optim_matches_cpu)
{
    gpu_begin(101);
    const int64_t n = 100003; /* odd, several blocks */
    tpair p = tp_rand(1, SHAPE(n), -1.0f, 1.0f), g = tp_rand(1, SHAPE(n), -1.0f, 1.0f);
    tpair buf = tp_rand(1, SHAPE(n), -1.0f, 1.0f);
    struct ksm_sgd_config cfg = {
        .lr = 0.1, .momentum = 0.9, .dampening = 0.0, .weight_decay = 1e-4, .nesterov = true};
    BOTH(ksm_op_sgd(S, T(p), T(g), T(buf), &cfg, true));
    BOTH(ksm_op_sgd(S, T(p), T(g), T(buf), &cfg, false));
    expect_close(p, TOL, "sgd nesterov param");
    expect_close(buf, TOL, "sgd nesterov buffer");
    struct ksm_sgd_config plain = {.lr = 0.05};
    BOTH(ksm_op_sgd(S, T(p), T(g), NULL, &plain, false));
    expect_close(p, TOL, "sgd plain");
    BOTH(ksm_op_scale(S, T(p), 0.37));
    expect_close(p, TOL, "scale");
    /* sum of squares: a double; the summation orders differ, so 1e-12 relative */
    tpair out = tp_out(KSM_DTYPE_I64, 1, SHAPE(1));
    BOTH(ksm_op_sumsq(S, T(out), T(p)));
    void *vc, *vg;
    download(out, &vc, &vg);
    double dc, dg;
    memcpy(&dc, vc, 8);
    memcpy(&dg, vg, 8);
    cr_expect_leq(fabs(dc - dg), 1e-12 * fabs(dc), "sumsq: cpu %.17g cuda %.17g", dc, dg);
    free(vc);
    free(vg);
}

typedef int (*unary_bw_fn)(ksm_stream *, ksm_tensor *, const ksm_tensor *, const ksm_tensor *);

Test(gpu_ops, elementwise_backward_matches_cpu)
{
    gpu_begin(102);
    const unary_bw_fn fns[] = {ksm_op_relu_backward, ksm_op_gelu_backward, ksm_op_sigmoid_backward,
                               ksm_op_tanh_backward, ksm_op_clamp01_backward};
    tpair dy = tp_rand(3, SHAPE(3, 5, 77), -2.0f, 2.0f), x = tp_rand(3, SHAPE(3, 5, 77), -2, 2);
    for (int f = 0; f < 5; f++) {
        tpair dx = tp_out(KSM_DTYPE_F32, 3, SHAPE(3, 5, 77));
        BOTH(fns[f](S, T(dx), T(dy), T(x)));
        expect_close(dx, TOL, "unary backward");
    }
    /* broadcast gradients (double sums): b [5, 1] and a scalar-like w [1] */
    tpair a = tp_rand(3, SHAPE(3, 5, 77), -2, 2), b = tp_rand(2, SHAPE(5, 1), -2, 2);
    tpair w = tp_rand(1, SHAPE(1), 0, 1);
    tpair da = tp_out(KSM_DTYPE_F32, 3, SHAPE(3, 5, 77)),
          db = tp_out(KSM_DTYPE_F32, 2, SHAPE(5, 1));
    BOTH(ksm_op_mul_backward(S, T(da), T(db), T(dy), T(a), T(b)));
    expect_close(da, TOL, "mul backward da");
    expect_close(db, TOL, "mul backward db");
    tpair lb = tp_rand(3, SHAPE(3, 5, 77), -2, 2), dl = tp_out(KSM_DTYPE_F32, 3, SHAPE(3, 5, 77));
    tpair dw = tp_out(KSM_DTYPE_F32, 1, SHAPE(1));
    BOTH(ksm_op_lerp_backward(S, T(da), T(dl), T(dw), T(dy), T(a), T(lb), T(w)));
    expect_close(da, TOL, "lerp backward da");
    expect_close(dl, TOL, "lerp backward db");
    expect_close(dw, TOL, "lerp backward dw (one output, block path)");
    /* linear: GEMMs and the bias sum over rows */
    tpair ly = tp_rand(2, SHAPE(37, 19), -1, 1), lx = tp_rand(2, SHAPE(37, 23), -1, 1);
    tpair lw = tp_rand(2, SHAPE(19, 23), -1, 1);
    tpair ldx = tp_out(KSM_DTYPE_F32, 2, SHAPE(37, 23)),
          ldw = tp_out(KSM_DTYPE_F32, 2, SHAPE(19, 23));
    tpair ldb = tp_out(KSM_DTYPE_F32, 1, SHAPE(19));
    BOTH(ksm_op_linear_backward(S, T(ldx), T(ldw), T(ldb), T(ly), T(lx), T(lw)));
    expect_close(ldx, TOL, "linear backward dx");
    expect_close(ldw, TOL, "linear backward dw");
    expect_close(ldb, TOL, "linear backward db");
    /* mean, max pool (odd H, W: floor rows get 0), embedding, cross-entropy */
    tpair mg = tp_rand(2, SHAPE(3, 7), -1, 1), mdx = tp_out(KSM_DTYPE_F32, 3, SHAPE(3, 5, 7));
    BOTH(ksm_op_mean_backward(S, T(mdx), T(mg), 1, 2));
    expect_close(mdx, TOL, "mean backward");
    tpair px = tp_rand(4, SHAPE(2, 3, 9, 11), -1, 1), pg = tp_rand(4, SHAPE(2, 3, 4, 5), -1, 1);
    tpair pdx = tp_out(KSM_DTYPE_F32, 4, SHAPE(2, 3, 9, 11));
    BOTH(ksm_op_maxpool2_backward(S, T(pdx), T(pg), T(px)));
    expect_exact(pdx, "maxpool2 backward");
    int64_t ids[29];
    for (int i = 0; i < 29; i++) ids[i] = (int64_t)(urand() * 13) - (i == 5 ? 20 : 0);
    tpair idx = tp_new(KSM_DTYPE_I64, 1, SHAPE(29), ids), eg = tp_rand(2, SHAPE(29, 33), -1, 1);
    tpair edw = tp_out(KSM_DTYPE_F32, 2, SHAPE(13, 33));
    BOTH(ksm_op_embedding_backward(S, T(edw), T(eg), T(idx)));
    expect_exact(edw, "embedding backward");
    int64_t labs[17];
    for (int i = 0; i < 17; i++) labs[i] = i == 3 ? -100 : (int64_t)(urand() * 301);
    tpair lab = tp_new(KSM_DTYPE_I64, 1, SHAPE(17), labs), lg = tp_rand(2, SHAPE(17, 301), -5, 5);
    tpair ldl = tp_out(KSM_DTYPE_F32, 2, SHAPE(17, 301));
    BOTH(ksm_op_cross_entropy_backward(S, T(ldl), T(lg), T(lab), -100, 0.5f));
    expect_close(ldl, TOL, "cross_entropy backward");
}

Test(gpu_ops, norm_backward_matches_cpu)
{
    gpu_begin(103);
    const int64_t xs[] = {3, 6, 5, 7};
    tpair x = tp_rand(4, xs, -2, 3), dy = tp_rand(4, xs, -1, 1);
    tpair wt = tp_rand(1, SHAPE(6), 0.5f, 1.5f), bs = tp_rand(1, SHAPE(6), -1, 1);
    tpair rm = tp_rand(1, SHAPE(6), -1, 1), rv = tp_rand(1, SHAPE(6), 0.5f, 2);
    tpair sm = tp_out(KSM_DTYPE_F32, 1, SHAPE(6)), si = tp_out(KSM_DTYPE_F32, 1, SHAPE(6));
    tpair y = tp_out(KSM_DTYPE_F32, 4, xs), dx = tp_out(KSM_DTYPE_F32, 4, xs);
    tpair dw = tp_out(KSM_DTYPE_F32, 1, SHAPE(6)), db = tp_out(KSM_DTYPE_F32, 1, SHAPE(6));
    BOTH(ksm_op_batchnorm_train(S, T(y), T(sm), T(si), T(x), T(wt), T(bs), T(rm), T(rv), 0.1,
                                1e-5f));
    expect_close(y, TOL, "batchnorm train y");
    expect_close(sm, TOL, "batchnorm train save_mean");
    expect_close(si, TOL, "batchnorm train save_invstd");
    expect_close(rm, TOL, "batchnorm train running_mean");
    expect_close(rv, TOL, "batchnorm train running_var");
    BOTH(ksm_op_batchnorm_backward(S, T(dx), T(dw), T(db), T(dy), T(x), T(wt), T(sm), T(si)));
    expect_close(dx, TOL, "batchnorm backward dx");
    expect_close(dw, TOL, "batchnorm backward dweight");
    expect_close(db, TOL, "batchnorm backward dbias");
    BOTH(ksm_op_groupnorm_backward(S, T(dx), T(dw), T(db), T(dy), T(x), 3, T(wt), 1e-5f));
    expect_close(dx, TOL, "groupnorm backward dx");
    expect_close(dw, TOL, "groupnorm backward dweight");
    expect_close(db, TOL, "groupnorm backward dbias");
    tpair lw = tp_rand(1, SHAPE(7), 0.5f, 1.5f);
    tpair ldw = tp_out(KSM_DTYPE_F32, 1, SHAPE(7)), ldb = tp_out(KSM_DTYPE_F32, 1, SHAPE(7));
    BOTH(ksm_op_layernorm_backward(S, T(dx), T(ldw), T(ldb), T(dy), T(x), T(lw), 1e-5f));
    expect_close(dx, TOL, "layernorm backward dx");
    expect_close(ldw, TOL, "layernorm backward dweight");
    expect_close(ldb, TOL, "layernorm backward dbias");
}

Test(gpu_ops, conv_attention_backward_matches_cpu)
{
    gpu_begin(104);
    for (int groups = 1; groups <= 2; groups++) {
        tpair x = tp_rand(4, SHAPE(2, 4, 9, 7), -1, 1),
              w = tp_rand(4, SHAPE(6, 4 / groups, 3, 2), -1, 1);
        tpair dy = tp_rand(4, SHAPE(2, 6, 9, 8), -1, 1); /* pad 1, 1: Ho 9, Wo 8 */
        size_t ws = ksm_op_conv2d_backward_workspace_size(&x.c, &w.c, 1, 1, groups);
        void *wc = dalloc(E.dc, ws), *wg = dalloc(E.dg, ws);
        tpair dx = tp_out(KSM_DTYPE_F32, 4, SHAPE(2, 4, 9, 7));
        tpair dw = tp_out(KSM_DTYPE_F32, 4, SHAPE(6, 4 / groups, 3, 2));
        tpair db = tp_out(KSM_DTYPE_F32, 1, SHAPE(6));
        BOTH(ksm_op_conv2d_backward(S, T(dx), T(dw), T(db), T(dy), T(x), T(w), 1, 1, groups,
                                    W(wc, wg), ws));
        expect_close(dx, TOL, "conv2d backward dx");
        expect_close(dw, TOL, "conv2d backward dw");
        expect_close(db, TOL, "conv2d backward db");
    }
    for (int causal = 0; causal < 2; causal++) {
        const int64_t qs[] = {2, 3, 13, 40}, ks[] = {2, 3, 17, 40};
        tpair q = tp_rand(4, qs, -1, 1), k = tp_rand(4, ks, -1, 1), v = tp_rand(4, ks, -1, 1);
        tpair dout = tp_rand(4, qs, -1, 1);
        tpair dq = tp_out(KSM_DTYPE_F32, 4, qs), dk = tp_out(KSM_DTYPE_F32, 4, ks);
        tpair dv = tp_out(KSM_DTYPE_F32, 4, ks);
        BOTH(ksm_op_sdpa_backward(S, T(dq), T(dk), T(dv), T(dout), T(q), T(k), T(v), causal,
                                  0.158f));
        expect_close(dq, TOL, "sdpa backward dq");
        expect_close(dk, TOL, "sdpa backward dk");
        expect_close(dv, TOL, "sdpa backward dv");
    }
}

/* Dropout masks are a pure function of their key (kmath.h): the CUDA kernels must drop exactly
 * the CPU's elements, in the plain op (values bit-exact: one multiply each) and inside the
 * attention, forward and backward. */
Test(gpu_ops, dropout_masks_match_cpu)
{
    gpu_begin(105);
    const double ps[3] = {0.1, 0.5, 0.9};
    for (int k = 0; k < 3; k++) {
        struct ksm_dropout d = {
            .p = ps[k], .seed = 0xC0FFEE1234567ull, .step = (1ull << 32) + k, .site = 3u + k};
        tpair x = tp_rand(3, SHAPE(5, 13, 37), -2, 2),
              y = tp_out(KSM_DTYPE_F32, 3, SHAPE(5, 13, 37));
        BOTH(ksm_op_dropout(S, T(y), T(x), &d));
        expect_exact(y, "dropout");
        BOTH(ksm_op_dropout(S, T(x), T(x), &d)); /* in place */
        expect_exact(x, "dropout in place");
    }
    for (int causal = 0; causal < 2; causal++) {
        const int64_t qs[] = {2, 3, 13, 40}, ks[] = {2, 3, 17, 40};
        struct ksm_dropout d = {.p = 0.25, .seed = 77, .step = 5, .site = 11};
        tpair q = tp_rand(4, qs, -1, 1), k = tp_rand(4, ks, -1, 1), v = tp_rand(4, ks, -1, 1);
        tpair o = tp_out(KSM_DTYPE_F32, 4, qs), dout = tp_rand(4, qs, -1, 1);
        tpair dq = tp_out(KSM_DTYPE_F32, 4, qs), dk = tp_out(KSM_DTYPE_F32, 4, ks);
        tpair dv = tp_out(KSM_DTYPE_F32, 4, ks);
        BOTH(ksm_op_sdpa_dropout(S, T(o), T(q), T(k), T(v), causal, 0.0f, &d));
        expect_close(o, TOL, "sdpa dropout");
        BOTH(ksm_op_sdpa_dropout_backward(S, T(dq), T(dk), T(dv), T(dout), T(q), T(k), T(v), causal,
                                          0.158f, &d));
        expect_close(dq, TOL, "sdpa dropout backward dq");
        expect_close(dk, TOL, "sdpa dropout backward dk");
        expect_close(dv, TOL, "sdpa dropout backward dv");
    }
}
