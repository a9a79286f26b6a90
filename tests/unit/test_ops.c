/*
 * Op kernels and wrappers (daemon/nn/ops.c, daemon/backend/cpu/cpu_*.c).
 * (Over 900 lines on purpose: the golden cases of every op family run through one parameterised
 * test and one set of tensor helpers; the per-op edge cases follow, in the kernels' order.)
 *
 * ops_golden: every case of the committed PyTorch fixtures tests/golden/ops_*.safetensors (made
 * by tests/golden/gen_ops.py) runs through the public wrappers on a CPU-backend stream, and is
 * compared with max|out - ref| / max|ref| <= 1e-5 for F32 (NaN where the reference has NaN;
 * bit-exact for casts and indices). Each case prints "ops_golden <case>: rel <err>" to stderr.
 * Each fixture case is described by a "__metadata__" entry "op=<op> key=value ...".
 *
 * ops: hand-written properties (lerp bit-exactness and NaN propagation, strided and in-place
 * elementwise, beta = 0, out-of-range labels and ids).
 *
 * ops_validate: every wrapper's argument checks, on a counting stream of a dummy device whose
 * launch records the op without running it, so "nothing was enqueued" is observable.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend_impl.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops.h"
#include "kasmina/safetensors.h"
#include "kasmina/tensor.h"
#include "kt.h"
#include "nn/op.h"

#define GOLDEN_TOL 1e-5

/* Criterion 2.4.1's parent process leaks one 48-byte object when tests with many assertions run
 * in parallel with others (reproduced with a Criterion-only program: 18 sleeping tests plus 5
 * tests of 300 cr_expect each, --jobs=2; never with --jobs=1). Under AddressSanitizer this suite
 * therefore runs one job at a time by default (--jobs still overrides), so LeakSanitizer keeps
 * checking our own code without a suppression. */
#if defined(__SANITIZE_ADDRESS__)
int main(int argc, char *argv[])
{
    struct criterion_test_set *tests = criterion_initialize();
    criterion_options.jobs = 1;
    int result = 0;
    if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    return result;
}
#endif

/* ---- A CPU device, device buffers, uploads ---- */

#define MAX_BUFS 64

struct env {
    ksm_backend *cpu;
    ksm_device *dev;
    ksm_stream *s;
    void *bufs[MAX_BUFS];
    int n_bufs;
};

static void env_init(struct env *e)
{
    memset(e, 0, sizeof *e);
    cr_assert_eq(ksm_cpu_backend_new(1, &e->cpu), 0);
    e->dev = ksm_backend_device(e->cpu, 0);
    cr_assert_not_null(e->dev);
    cr_assert_eq(ksm_stream_new(e->dev, &e->s), 0);
}

static void env_release_bufs(struct env *e)
{
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    for (int i = 0; i < e->n_bufs; i++) ksm_device_free(e->dev, e->bufs[i]);
    e->n_bufs = 0;
}

static void env_fini(struct env *e)
{
    env_release_bufs(e);
    ksm_stream_free(e->s);
    ksm_backend_free(e->cpu);
}

static void *dev_alloc(struct env *e, size_t n)
{
    void *p = NULL;
    cr_assert_lt(e->n_bufs, MAX_BUFS);
    cr_assert_eq(ksm_device_malloc(e->dev, n > 0 ? n : 1, &p), 0);
    e->bufs[e->n_bufs++] = p;
    return p;
}

/* A contiguous device tensor of the given shape, filled with 0xff bytes (NaN for floats) so an
 * element a kernel forgets to write shows up. */
static ksm_tensor dev_empty(struct env *e, enum ksm_dtype dt, int ndim, const int64_t *shape)
{
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, e->dev, NULL, dt, ndim, shape), 0);
    size_t n = ksm_tensor_nbytes(&t);
    t.data = dev_alloc(e, n);
    cr_assert_eq(ksm_stream_memset_async(e->s, t.data, 0xff, n), 0);
    return t;
}

static ksm_tensor dev_upload_raw(struct env *e, enum ksm_dtype dt, int ndim, const int64_t *shape,
                                 const void *host)
{
    ksm_tensor t = dev_empty(e, dt, ndim, shape);
    size_t n = ksm_tensor_nbytes(&t);
    if (n > 0) cr_assert_eq(ksm_stream_memcpy_async(e->s, t.data, host, n, KSM_COPY_H2D), 0);
    /* the host buffer may go away: make the copy complete */
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return t;
}

static ksm_tensor dev_upload(struct env *e, const struct ksm_st_tensor *st)
{
    return dev_upload_raw(e, st->dtype, st->ndim, st->shape, st->data);
}

/* Synchronizes and copies t (contiguous) into a malloc'd host buffer. */
static void *download(struct env *e, const ksm_tensor *t)
{
    size_t n = ksm_tensor_nbytes(t);
    void *h = malloc(n > 0 ? n : 1);
    cr_assert_not_null(h);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    if (n > 0) cr_assert_eq(ksm_stream_memcpy_async(e->s, h, t->data, n, KSM_COPY_D2H), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return h;
}

/* ---- Fixtures ---- */

static const struct ksm_st_tensor *need(ksm_st_file *f, const char *cs, const char *role)
{
    char name[256];
    snprintf(name, sizeof name, "%s.%s", cs, role);
    const struct ksm_st_tensor *t = ksm_st_find(f, name);
    cr_assert_not_null(t, "fixture tensor %s missing", name);
    return t;
}

static const struct ksm_st_tensor *maybe(ksm_st_file *f, const char *cs, const char *role)
{
    char name[256];
    snprintf(name, sizeof name, "%s.%s", cs, role);
    return ksm_st_find(f, name);
}

/* The value of key in a "op=conv2d pad=1 groups=2" description, copied into buf (NULL if
 * absent). */
static const char *param(const char *desc, const char *key, char *buf, size_t len)
{
    size_t kl = strlen(key);
    for (const char *p = desc; p && *p;) {
        while (*p == ' ') p++;
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
            const char *v = p + kl + 1;
            size_t n = strcspn(v, " ");
            if (n >= len) n = len - 1;
            memcpy(buf, v, n);
            buf[n] = '\0';
            return buf;
        }
        p = strchr(p, ' ');
    }
    return NULL;
}

static double param_num(const char *desc, const char *key)
{
    char buf[64];
    cr_assert_not_null(param(desc, key, buf, sizeof buf), "parameter %s missing in '%s'", key,
                       desc);
    return strtod(buf, NULL);
}

/* Compares out (device tensor, contiguous) with the reference; returns the relative error, or
 * 0 for exact matches of non-float dtypes; asserts the tolerance. */
static double check_output(struct env *e, const char *cs, const ksm_tensor *out,
                           const struct ksm_st_tensor *ref)
{
    cr_assert_eq(out->dtype, ref->dtype, "%s: dtype", cs);
    cr_assert_eq(ksm_tensor_numel(out) * (int64_t)ksm_dtype_size(out->dtype), (int64_t)ref->nbytes,
                 "%s: size", cs);
    void *h = download(e, out);
    size_t n = (size_t)ksm_tensor_numel(out);
    double rel = 0.0;
    if (out->dtype == KSM_DTYPE_F32) {
        float *want = kt_golden_floats(ref);
        rel = kt_golden_expect_f32(cs, h, want, (int64_t)n, GOLDEN_TOL);
        free(want);
    } else if (out->dtype == KSM_DTYPE_F16 || out->dtype == KSM_DTYPE_BF16) {
        /* bit-exact, except that any NaN matches any NaN */
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            uint16_t o, r;
            memcpy(&o, (const char *)h + 2 * i, 2);
            memcpy(&r, (const char *)ref->data + 2 * i, 2);
            bool on, rn;
            if (out->dtype == KSM_DTYPE_F16) {
                on = (o & 0x7c00) == 0x7c00 && (o & 0x3ff);
                rn = (r & 0x7c00) == 0x7c00 && (r & 0x3ff);
            } else {
                on = (o & 0x7f80) == 0x7f80 && (o & 0x7f);
                rn = (r & 0x7f80) == 0x7f80 && (r & 0x7f);
            }
            if (on && rn) continue;
            if (o != r) {
                if (bad < 5) cr_log_error("%s[%zu]: got 0x%04x want 0x%04x", cs, i, o, r);
                bad++;
            }
        }
        cr_expect_eq(bad, 0, "%s: %zu elements differ", cs, bad);
    } else {
        cr_expect_eq(memcmp(h, ref->data, ref->nbytes), 0, "%s: integers differ", cs);
    }
    free(h);
    fprintf(stderr, "ops_golden %s: rel %.1e\n", cs, rel);
    return rel;
}

/* ---- One fixture case ---- */

static ksm_tensor up_opt(struct env *e, ksm_st_file *f, const char *cs, const char *role,
                         bool *present)
{
    const struct ksm_st_tensor *t = maybe(f, cs, role);
    ksm_tensor d;
    memset(&d, 0, sizeof d);
    *present = t != NULL;
    if (t) d = dev_upload(e, t);
    return d;
}

static ksm_tensor out_like(struct env *e, const struct ksm_st_tensor *ref)
{
    return dev_empty(e, ref->dtype, ref->ndim, ref->shape);
}

static enum ksm_unary_fn unary_fn(const char *name)
{
    static const char *const names[] = {"relu", "gelu", "sigmoid", "tanh", "clamp01", "affine"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++)
        if (strcmp(name, names[i]) == 0) return (enum ksm_unary_fn)i;
    cr_assert_fail("unknown unary fn %s", name);
    return KSM_UNARY_COUNT;
}

static void run_case(struct env *e, ksm_st_file *f, const char *cs, const char *op,
                     const char *desc)
{
    char buf[64];
    const struct ksm_st_tensor *ref = need(f, cs, "y");
    ksm_tensor y = out_like(e, ref);
    ksm_tensor x, w, b, a;
    bool hw, hb;
    int rc = KSM_EINTERNAL;

    if (strcmp(op, "conv2d") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        w = dev_upload(e, need(f, cs, "w"));
        b = up_opt(e, f, cs, "b", &hb);
        int pad = (int)param_num(desc, "pad"), groups = (int)param_num(desc, "groups");
        size_t ws_bytes = ksm_op_conv2d_workspace_size(&x, &w, pad, pad, groups);
        void *ws = ws_bytes ? dev_alloc(e, ws_bytes) : NULL;
        bool is_1x1 = w.shape[2] == 1 && w.shape[3] == 1 && pad == 0;
        bool is_dw = groups == x.shape[1] && groups == w.shape[0];
        cr_expect_eq(ws_bytes == 0, is_1x1 || is_dw, "%s: workspace %zu", cs, ws_bytes);
        if (ws_bytes) { /* one image's columns, or a column tile per CPU thread (nn/op.h) */
            const int64_t kdim = x.shape[1] / groups * w.shape[2] * w.shape[3];
            const int64_t howo = y.shape[2] * y.shape[3];
            int64_t cols =
                ksm_conv2d_slices(x.shape[0], howo) * ksm_conv2d_tile_cols(x.shape[0], howo);
            if (cols < howo) cols = howo;
            int64_t want = kdim * cols;
            /* CPU Winograd: transformed filters + one slice per thread (nn/op.h) */
            if (ksm_conv2d_winograd(x.shape[1], w.shape[0], 3, 3, pad, pad, groups) &&
                w.shape[2] == 3 && w.shape[3] == 3) {
                const int64_t ci = x.shape[1], co = w.shape[0];
                const int64_t tiles = x.shape[0] * ((y.shape[2] + 1) / 2) * ((y.shape[3] + 1) / 2);
                const int64_t chunk = ksm_wino_chunk(ci, co);
                int64_t slices = (tiles + chunk - 1) / chunk;
                if (slices > KSM_CPU_MAX_THREADS) slices = KSM_CPU_MAX_THREADS;
                const int64_t wino = 16 * co * ci + slices * 16 * (ci + co) * chunk;
                if (wino > want) want = wino;
            }
            cr_expect_eq(ws_bytes, (size_t)want * sizeof(float), "%s", cs);
        }
        rc = ksm_op_conv2d(e->s, &y, &x, &w, hb ? &b : NULL, pad, pad, groups, ws, ws_bytes);
    } else if (strcmp(op, "batchnorm") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        ksm_tensor m = dev_upload(e, need(f, cs, "mean")), v = dev_upload(e, need(f, cs, "var"));
        w = dev_upload(e, need(f, cs, "w"));
        b = dev_upload(e, need(f, cs, "b"));
        rc = ksm_op_batchnorm(e->s, &y, &x, &m, &v, &w, &b, (float)param_num(desc, "eps"));
    } else if (strcmp(op, "groupnorm") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        w = up_opt(e, f, cs, "w", &hw);
        b = up_opt(e, f, cs, "b", &hb);
        rc = ksm_op_groupnorm(e->s, &y, &x, (int)param_num(desc, "groups"), hw ? &w : NULL,
                              hb ? &b : NULL, (float)param_num(desc, "eps"));
    } else if (strcmp(op, "layernorm") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        w = up_opt(e, f, cs, "w", &hw);
        b = up_opt(e, f, cs, "b", &hb);
        rc = ksm_op_layernorm(e->s, &y, &x, hw ? &w : NULL, hb ? &b : NULL,
                              (float)param_num(desc, "eps"));
    } else if (strcmp(op, "softmax") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        rc = ksm_op_softmax(e->s, &y, &x);
    } else if (strcmp(op, "sdpa") == 0) {
        ksm_tensor q = dev_upload(e, need(f, cs, "q")), k = dev_upload(e, need(f, cs, "k"));
        ksm_tensor v = dev_upload(e, need(f, cs, "v"));
        rc = ksm_op_sdpa(e->s, &y, &q, &k, &v, param_num(desc, "causal") != 0,
                         (float)param_num(desc, "scale"));
    } else if (strcmp(op, "sdpa_fused") == 0) {
        /* q/k/v: strided views [B,H,T,hd] of qkv [B,T,3D]; out: a view [B,H,T,hd] of y
         * [B,T,H,hd]. */
        ksm_tensor qkv = dev_upload(e, need(f, cs, "qkv"));
        int64_t nb = qkv.shape[0], t = qkv.shape[1], d = qkv.shape[2] / 3;
        int64_t nh = (int64_t)param_num(desc, "heads"), hd = d / nh;
        ksm_tensor v3[3];
        for (int i = 0; i < 3; i++) {
            ksm_tensor *vt = &v3[i];
            *vt = qkv;
            vt->data = (float *)qkv.data + i * d;
            vt->ndim = 4;
            int64_t shape[4] = {nb, nh, t, hd}, stride[4] = {t * 3 * d, hd, 3 * d, 1};
            memcpy(vt->shape, shape, sizeof shape);
            memcpy(vt->stride, stride, sizeof stride);
        }
        ksm_tensor ov = y;
        int64_t oshape[4] = {nb, nh, t, hd}, ostride[4] = {t * nh * hd, hd, nh * hd, 1};
        memcpy(ov.shape, oshape, sizeof oshape);
        memcpy(ov.stride, ostride, sizeof ostride);
        rc = ksm_op_sdpa(e->s, &ov, &v3[0], &v3[1], &v3[2], param_num(desc, "causal") != 0, 0.0f);
    } else if (strcmp(op, "unary") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        cr_assert_not_null(param(desc, "fn", buf, sizeof buf));
        enum ksm_unary_fn fn = unary_fn(buf);
        switch (fn) {
        case KSM_UNARY_RELU: rc = ksm_op_relu(e->s, &y, &x); break;
        case KSM_UNARY_GELU: rc = ksm_op_gelu(e->s, &y, &x); break;
        case KSM_UNARY_SIGMOID: rc = ksm_op_sigmoid(e->s, &y, &x); break;
        case KSM_UNARY_TANH: rc = ksm_op_tanh(e->s, &y, &x); break;
        case KSM_UNARY_CLAMP01: rc = ksm_op_clamp01(e->s, &y, &x); break;
        case KSM_UNARY_AFFINE:
            rc = ksm_op_affine(e->s, &y, &x, (float)param_num(desc, "a"),
                               (float)param_num(desc, "b"));
            break;
        default: break;
        }
    } else if (strcmp(op, "binary") == 0) {
        a = dev_upload(e, need(f, cs, "a"));
        b = dev_upload(e, need(f, cs, "b"));
        cr_assert_not_null(param(desc, "fn", buf, sizeof buf));
        if (strcmp(buf, "add") == 0)
            rc = ksm_op_add(e->s, &y, &a, &b);
        else if (strcmp(buf, "sub") == 0)
            rc = ksm_op_sub(e->s, &y, &a, &b);
        else if (strcmp(buf, "mul") == 0)
            rc = ksm_op_mul(e->s, &y, &a, &b);
        else
            cr_assert_fail("unknown binary fn %s", buf);
    } else if (strcmp(op, "lerp") == 0) {
        a = dev_upload(e, need(f, cs, "a"));
        b = dev_upload(e, need(f, cs, "b"));
        w = dev_upload(e, need(f, cs, "w"));
        rc = ksm_op_lerp(e->s, &y, &a, &b, &w);
    } else if (strcmp(op, "copy") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        rc = ksm_op_copy(e->s, &y, &x);
    } else if (strcmp(op, "gemm") == 0) {
        a = dev_upload(e, need(f, cs, "a"));
        b = dev_upload(e, need(f, cs, "b"));
        y = dev_upload(e, need(f, cs, "c")); /* c is read (beta) and written */
        rc = ksm_op_gemm(e->s, &y, &a, &b, param_num(desc, "ta") != 0, param_num(desc, "tb") != 0,
                         (float)param_num(desc, "alpha"), (float)param_num(desc, "beta"));
    } else if (strcmp(op, "linear") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        w = dev_upload(e, need(f, cs, "w"));
        b = up_opt(e, f, cs, "b", &hb);
        rc = ksm_op_linear(e->s, &y, &x, &w, hb ? &b : NULL);
    } else if (strcmp(op, "embedding") == 0) {
        w = dev_upload(e, need(f, cs, "w"));
        ksm_tensor idx = dev_upload(e, need(f, cs, "idx"));
        rc = ksm_op_embedding(e->s, &y, &w, &idx);
    } else if (strcmp(op, "mean") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        rc = ksm_op_mean(e->s, &y, &x, (int)param_num(desc, "begin"), (int)param_num(desc, "end"));
    } else if (strcmp(op, "maxpool2") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        rc = ksm_op_maxpool2(e->s, &y, &x);
    } else if (strcmp(op, "cross_entropy") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        ksm_tensor lab = dev_upload(e, need(f, cs, "labels"));
        rc = ksm_op_cross_entropy(e->s, &y, &x, &lab, (int64_t)param_num(desc, "ignore_index"));
    } else if (strcmp(op, "argmax") == 0) {
        x = dev_upload(e, need(f, cs, "x"));
        rc = ksm_op_argmax(e->s, &y, &x);
    } else {
        cr_assert_fail("%s: unknown op %s", cs, op);
    }
    cr_assert_eq(rc, 0, "%s: %s returned %s", cs, op, ksm_err_name(rc));
    check_output(e, cs, &y, ref);
}

static const char *const GOLDEN_FILES[] = {"ops_conv.safetensors", "ops_norm.safetensors",
                                           "ops_attn.safetensors", "ops_elem.safetensors",
                                           "ops_misc.safetensors", NULL};

TestSuite(ops_golden, .timeout = 120);

/* One test per case of every ops fixture file. */
ParameterizedTestParameters(ops_golden, matches_pytorch) { return kt_golden_cases(GOLDEN_FILES); }

ParameterizedTest(struct kt_golden_case *c, ops_golden, matches_pytorch)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open(c->file);
    const char *desc = ksm_st_metadata(f, c->name);
    cr_assert_not_null(desc, "%s: case %s has no description", c->file, c->name);
    cr_assert(c->op[0] != '\0', "%s: case %s has no op", c->file, c->name);
    run_case(&e, f, c->name, c->op, desc);
    ksm_st_close(f);
    env_fini(&e);
}

/* Each op has at least its number of cases in its file. */
Test(ops_golden, every_op_has_its_cases)
{
    static const struct {
        const char *file, *op;
        int min;
    } want[] = {
        {"ops_conv.safetensors", "conv2d", 12},       {"ops_norm.safetensors", "batchnorm", 2},
        {"ops_norm.safetensors", "groupnorm", 5},     {"ops_norm.safetensors", "layernorm", 3},
        {"ops_norm.safetensors", "softmax", 3},       {"ops_attn.safetensors", "sdpa", 8},
        {"ops_attn.safetensors", "sdpa_fused", 2},    {"ops_elem.safetensors", "unary", 7},
        {"ops_elem.safetensors", "binary", 6},        {"ops_elem.safetensors", "lerp", 5},
        {"ops_elem.safetensors", "copy", 7},          {"ops_misc.safetensors", "gemm", 6},
        {"ops_misc.safetensors", "linear", 3},        {"ops_misc.safetensors", "embedding", 2},
        {"ops_misc.safetensors", "mean", 3},          {"ops_misc.safetensors", "maxpool2", 2},
        {"ops_misc.safetensors", "cross_entropy", 2}, {"ops_misc.safetensors", "argmax", 2},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const char *files[] = {want[i].file, NULL};
        int n = kt_golden_count(files, want[i].op);
        cr_expect_geq(n, want[i].min, "%s: only %d %s cases", want[i].file, n, want[i].op);
    }
}

/* ---- Properties ---- */

TestSuite(ops, .timeout = 60);

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double urand(void) /* splitmix64 -> [0, 1) */
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

/* Random finite floats over many magnitudes (1e-30 .. 1e30, both signs, some zeros). */
static void fill_wild(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        double mag = pow(10.0, urand() * 60.0 - 30.0);
        p[i] = (float)((urand() < 0.5 ? -1.0 : 1.0) * mag);
        if (urand() < 0.05) p[i] = 0.0f;
    }
}

Test(ops, lerp_is_bit_exact_at_weight_0_and_1)
{
    struct env e;
    env_init(&e);
    enum { N = 3, C = 4, H = 5, W = 7, NUM = N * C * H * W };
    static float ha[NUM], hb[NUM];
    fill_wild(ha, NUM);
    fill_wild(hb, NUM);
    int64_t shape[4] = {N, C, H, W}, wshape[4] = {N, 1, 1, 1};
    ksm_tensor a = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, ha);
    ksm_tensor b = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hb);
    const float zero = 0.0f, one = 1.0f;
    ksm_tensor w0 = dev_upload_raw(&e, KSM_DTYPE_F32, 0, NULL, &zero);
    ksm_tensor w1 = dev_upload_raw(&e, KSM_DTYPE_F32, 0, NULL, &one);
    ksm_tensor y = dev_empty(&e, KSM_DTYPE_F32, 4, shape);

    cr_assert_eq(ksm_op_lerp(e.s, &y, &a, &b, &w0), 0);
    float *out = download(&e, &y);
    cr_expect_eq(memcmp(out, ha, sizeof ha), 0, "lerp(a, b, 0) is not a bit-exactly");
    free(out);

    cr_assert_eq(ksm_op_lerp(e.s, &y, &a, &b, &w1), 0);
    out = download(&e, &y);
    cr_expect_eq(memcmp(out, hb, sizeof hb), 0, "lerp(a, b, 1) is not b bit-exactly");
    free(out);

    /* per-sample weights: sample 0 -> a, sample 1 -> b, sample 2 -> a */
    const float wv[N] = {0.0f, 1.0f, 0.0f};
    ksm_tensor ws = dev_upload_raw(&e, KSM_DTYPE_F32, 4, wshape, wv);
    cr_assert_eq(ksm_op_lerp(e.s, &y, &a, &b, &ws), 0);
    out = download(&e, &y);
    size_t per = C * H * W;
    cr_expect_eq(memcmp(out, ha, per * 4), 0);
    cr_expect_eq(memcmp(out + per, hb + per, per * 4), 0);
    cr_expect_eq(memcmp(out + 2 * per, ha + 2 * per, per * 4), 0);
    free(out);

    /* in place (y == a), as the blend path writes into the host stream */
    cr_assert_eq(ksm_op_lerp(e.s, &a, &a, &b, &w1), 0);
    out = download(&e, &a);
    cr_expect_eq(memcmp(out, hb, sizeof hb), 0);
    free(out);
    env_fini(&e);
}

Test(ops, lerp_propagates_nan_and_inf_of_b_at_weight_0)
{
    struct env e;
    env_init(&e);
    enum { NUM = 64 };
    float ha[NUM], hb[NUM];
    fill_wild(ha, NUM);
    for (int i = 0; i < NUM; i++) hb[i] = (float)(urand() * 2.0 - 1.0);
    hb[3] = NAN;
    hb[10] = INFINITY;
    hb[41] = -INFINITY;
    int64_t shape[1] = {NUM};
    ksm_tensor a = dev_upload_raw(&e, KSM_DTYPE_F32, 1, shape, ha);
    ksm_tensor b = dev_upload_raw(&e, KSM_DTYPE_F32, 1, shape, hb);
    const float zero = 0.0f;
    ksm_tensor w0 = dev_upload_raw(&e, KSM_DTYPE_F32, 0, NULL, &zero);
    ksm_tensor y = dev_empty(&e, KSM_DTYPE_F32, 1, shape);
    cr_assert_eq(ksm_op_lerp(e.s, &y, &a, &b, &w0), 0);
    float *out = download(&e, &y);
    for (int i = 0; i < NUM; i++) {
        if (i == 3 || i == 10 || i == 41)
            cr_expect(isnan(out[i]), "out[%d] = %g, want NaN (0 * non-finite)", i, out[i]);
        else
            cr_expect_eq(memcmp(&out[i], &ha[i], 4), 0, "out[%d] = %g, want a = %g", i, out[i],
                         ha[i]);
    }
    free(out);
    env_fini(&e);
}

Test(ops, elementwise_on_strided_and_in_place_operands)
{
    struct env e;
    env_init(&e);
    /* x [3,4] transposed view -> y [4,3] via relu and copy; in-place add of a row broadcast. */
    float hx[12];
    for (int i = 0; i < 12; i++) hx[i] = (float)(i - 6);
    int64_t s34[2] = {3, 4}, s43[2] = {4, 3}, s3[1] = {3};
    ksm_tensor x = dev_upload_raw(&e, KSM_DTYPE_F32, 2, s34, hx);
    ksm_tensor xt;
    const int perm[2] = {1, 0};
    cr_assert_eq(ksm_tensor_permute(&xt, &x, perm), 0);
    ksm_tensor y = dev_empty(&e, KSM_DTYPE_F32, 2, s43);
    cr_assert_eq(ksm_op_copy(e.s, &y, &xt), 0);
    float *out = download(&e, &y);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++) cr_expect_eq(out[i * 3 + j], hx[j * 4 + i]);
    free(out);
    cr_assert_eq(ksm_op_relu(e.s, &y, &xt), 0);
    out = download(&e, &y);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++) cr_expect_eq(out[i * 3 + j], fmaxf(hx[j * 4 + i], 0.0f));
    free(out);
    const float hr[3] = {100.0f, 200.0f, 300.0f};
    ksm_tensor r = dev_upload_raw(&e, KSM_DTYPE_F32, 1, s3, hr);
    cr_assert_eq(ksm_op_add(e.s, &y, &y, &r), 0); /* y += r (broadcast over rows) */
    out = download(&e, &y);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 3; j++)
            cr_expect_eq(out[i * 3 + j], fmaxf(hx[j * 4 + i], 0.0f) + hr[j]);
    free(out);
    env_fini(&e);
}

Test(ops, fill_writes_every_dtype)
{
    struct env e;
    env_init(&e);
    int64_t shape[2] = {3, 5};
    ksm_tensor t32 = dev_empty(&e, KSM_DTYPE_F32, 2, shape);
    ksm_tensor t16 = dev_empty(&e, KSM_DTYPE_F16, 2, shape);
    ksm_tensor tb = dev_empty(&e, KSM_DTYPE_BF16, 2, shape);
    ksm_tensor ti64 = dev_empty(&e, KSM_DTYPE_I64, 2, shape);
    ksm_tensor ti32 = dev_empty(&e, KSM_DTYPE_I32, 2, shape);
    cr_assert_eq(ksm_op_fill(e.s, &t32, -1.5), 0);
    cr_assert_eq(ksm_op_fill(e.s, &t16, -1.5), 0);
    cr_assert_eq(ksm_op_fill(e.s, &tb, -1.5), 0);
    cr_assert_eq(ksm_op_fill(e.s, &ti64, -7.0), 0);
    cr_assert_eq(ksm_op_fill(e.s, &ti32, 123.0), 0);
    cr_expect_eq(ksm_op_fill(e.s, &ti32, 1.5), KSM_EINVAL);
    cr_expect_eq(ksm_op_fill(e.s, &ti32, 3e9), KSM_EINVAL);
    cr_expect_eq(ksm_op_fill(e.s, &ti64, NAN), KSM_EINVAL);
    float *f = download(&e, &t32);
    uint16_t *h = download(&e, &t16), *hb = download(&e, &tb);
    int64_t *i64 = download(&e, &ti64);
    int32_t *i32 = download(&e, &ti32);
    for (int i = 0; i < 15; i++) {
        cr_expect_eq(f[i], -1.5f);
        cr_expect_eq(h[i], 0xbe00);  /* -1.5 in binary16 */
        cr_expect_eq(hb[i], 0xbfc0); /* -1.5 in bfloat16 */
        cr_expect_eq(i64[i], -7);
        cr_expect_eq(i32[i], 123);
    }
    free(f);
    free(h);
    free(hb);
    free(i64);
    free(i32);
    env_fini(&e);
}

Test(ops, gemm_beta_zero_ignores_nan_in_c_and_handles_row_strides)
{
    struct env e;
    env_init(&e);
    /* c is a [2,3] view with row stride 5 into a [2,5] NaN-filled buffer. */
    const float ha[4] = {1, 2, 3, 4};           /* [2,2] */
    const float hb[6] = {1, 0, -1, 2, 1, 0.5f}; /* [2,3] */
    int64_t s22[2] = {2, 2}, s23[2] = {2, 3}, s25[2] = {2, 5};
    ksm_tensor a = dev_upload_raw(&e, KSM_DTYPE_F32, 2, s22, ha);
    ksm_tensor b = dev_upload_raw(&e, KSM_DTYPE_F32, 2, s23, hb);
    ksm_tensor cbuf = dev_empty(&e, KSM_DTYPE_F32, 2, s25); /* 0xff bytes: NaN */
    ksm_tensor c;
    cr_assert_eq(ksm_tensor_narrow(&c, &cbuf, 1, 1, 3), 0);
    cr_assert_eq(ksm_op_gemm(e.s, &c, &a, &b, false, false, 1.0f, 0.0f), 0);
    float *out = download(&e, &cbuf);
    const float want[2][3] = {{5, 2, 0}, {11, 4, -1}};
    for (int i = 0; i < 2; i++) {
        cr_expect(isnan(out[i * 5]) && isnan(out[i * 5 + 4]), "row %d: outside the view changed",
                  i);
        for (int j = 0; j < 3; j++) cr_expect_eq(out[i * 5 + 1 + j], want[i][j]);
    }
    free(out);
    (void)s23;
    env_fini(&e);
}

/* The fused BatchNorm + ReLU equals BatchNorm then ReLU bit for bit (NaN and -0 included). */
Test(ops, batchnorm_relu_equals_batchnorm_then_relu)
{
    struct env e;
    env_init(&e);
    enum { N = 3, C = 5, HW = 37 };
    static float hx[N * C * HW];
    for (int i = 0; i < N * C * HW; i++) hx[i] = (float)((i * 37) % 101 - 50) / 7.0f;
    hx[3] = NAN;
    hx[10] = -0.0f;
    hx[11] = INFINITY;
    const float hm[C] = {0.5f, -1, 0, 2, 0.25f}, hv[C] = {1, 0.5f, 2, 0.1f, 3};
    const float hw[C] = {1, -2, 0.5f, 1.5f, -0.25f}, hb[C] = {0, 0.5f, -1, 0.1f, 2};
    int64_t sx[3] = {N, C, HW}, sc[1] = {C};
    ksm_tensor x = dev_upload_raw(&e, KSM_DTYPE_F32, 3, sx, hx);
    ksm_tensor m = dev_upload_raw(&e, KSM_DTYPE_F32, 1, sc, hm);
    ksm_tensor v = dev_upload_raw(&e, KSM_DTYPE_F32, 1, sc, hv);
    ksm_tensor w = dev_upload_raw(&e, KSM_DTYPE_F32, 1, sc, hw);
    ksm_tensor b = dev_upload_raw(&e, KSM_DTYPE_F32, 1, sc, hb);
    ksm_tensor y1 = dev_empty(&e, KSM_DTYPE_F32, 3, sx), y2 = dev_empty(&e, KSM_DTYPE_F32, 3, sx);
    cr_assert_eq(ksm_op_batchnorm(e.s, &y1, &x, &m, &v, &w, &b, 1e-5f), 0);
    cr_assert_eq(ksm_op_relu(e.s, &y1, &y1), 0);
    cr_assert_eq(ksm_op_batchnorm_relu(e.s, &y2, &x, &m, &v, &w, &b, 1e-5f), 0);
    float *o1 = download(&e, &y1), *o2 = download(&e, &y2);
    cr_expect_eq(memcmp(o1, o2, sizeof hx), 0);
    cr_expect(isnan(o2[3]));
    /* in place, as the CNN host runs it */
    cr_assert_eq(ksm_op_batchnorm_relu(e.s, &x, &x, &m, &v, &w, &b, 1e-5f), 0);
    float *o3 = download(&e, &x);
    cr_expect_eq(memcmp(o1, o3, sizeof hx), 0);
    free(o1);
    free(o2);
    free(o3);
    env_fini(&e);
}

Test(ops, out_of_range_labels_and_ids_give_nan)
{
    struct env e;
    env_init(&e);
    const float hl[6] = {1, 2, 3, 0, 0, 0};
    const int64_t lab[2] = {5, -1};
    int64_t s23[2] = {2, 3}, s2[1] = {2};
    ksm_tensor logits = dev_upload_raw(&e, KSM_DTYPE_F32, 2, s23, hl);
    ksm_tensor labels = dev_upload_raw(&e, KSM_DTYPE_I64, 1, s2, lab);
    ksm_tensor loss = dev_empty(&e, KSM_DTYPE_F32, 1, s2);
    cr_assert_eq(ksm_op_cross_entropy(e.s, &loss, &logits, &labels, -100), 0);
    float *out = download(&e, &loss);
    cr_expect(isnan(out[0]) && isnan(out[1]));
    free(out);
    /* ignore_index = -1 makes the second row 0 */
    cr_assert_eq(ksm_op_cross_entropy(e.s, &loss, &logits, &labels, -1), 0);
    out = download(&e, &loss);
    cr_expect(isnan(out[0]));
    cr_expect_eq(out[1], 0.0f);
    free(out);

    const int32_t ids[3] = {1, 7, -2};
    int64_t s3[1] = {3}, s32[2] = {3, 2};
    ksm_tensor wemb = dev_upload_raw(&e, KSM_DTYPE_F32, 2, s23, hl); /* V = 2, D = 3 ... */
    ksm_tensor idx = dev_upload_raw(&e, KSM_DTYPE_I32, 1, s3, ids);
    int64_t s33[2] = {3, 3};
    ksm_tensor emb = dev_empty(&e, KSM_DTYPE_F32, 2, s33);
    cr_assert_eq(ksm_op_embedding(e.s, &emb, &wemb, &idx), 0);
    out = download(&e, &emb);
    for (int j = 0; j < 3; j++) {
        cr_expect_eq(out[j], hl[3 + j]);
        cr_expect(isnan(out[3 + j]) && isnan(out[6 + j]));
    }
    free(out);
    (void)s32;
    env_fini(&e);
}

/* Causal attention never reads a key a query does not see (op.h: query i attends keys j <= i):
 * a NaN value or key at position P leaves queries 0..P-1 finite and makes P.. NaN, also when
 * P falls inside a block of queries that are processed together (here P = 100 of T = 150). */
Test(ops, causal_sdpa_keeps_masked_nan_keys_and_values_out_of_earlier_queries)
{
    struct env e;
    env_init(&e);
    enum { T = 150, HD = 16, P = 100 };
    static float hq[T * HD], hk[T * HD], hv[T * HD];
    for (int i = 0; i < T * HD; i++) {
        hq[i] = (float)(urand() * 2 - 1);
        hk[i] = (float)(urand() * 2 - 1);
        hv[i] = (float)(urand() * 2 - 1);
    }
    int64_t shape[4] = {1, 1, T, HD};
    for (int which = 0; which < 2; which++) {
        float *poisoned = which ? hk : hv;
        float keep[HD];
        memcpy(keep, poisoned + P * HD, sizeof keep);
        for (int d = 0; d < HD; d++) poisoned[P * HD + d] = NAN;
        ksm_tensor q = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hq);
        ksm_tensor k = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hk);
        ksm_tensor v = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hv);
        ksm_tensor o = dev_empty(&e, KSM_DTYPE_F32, 4, shape);
        cr_assert_eq(ksm_op_sdpa(e.s, &o, &q, &k, &v, true, 0.0f), 0);
        float *out = download(&e, &o);
        for (int i = 0; i < T; i++)
            for (int d = 0; d < HD; d++) {
                const float y = out[i * HD + d];
                if (i < P)
                    cr_expect(isfinite(y), "%s NaN at key %d: query %d, dim %d is %g",
                              which ? "K" : "V", P, i, d, y);
                else
                    cr_expect(isnan(y), "%s NaN at key %d: query %d, dim %d is %g",
                              which ? "K" : "V", P, i, d, y);
            }
        free(out);
        memcpy(poisoned + P * HD, keep, sizeof keep);
        env_release_bufs(&e);
    }
    env_fini(&e);
}

/* A query view with row stride 0 (one query broadcast to T rows) cannot be an sgemm operand; it
 * gives what its contiguous copy gives, causal and not. */
Test(ops, sdpa_of_a_broadcast_query_equals_its_contiguous_copy)
{
    struct env e;
    env_init(&e);
    enum { T = 70, HD = 8 };
    static float hq[HD], hqf[T * HD], hk[T * HD], hv[T * HD];
    for (int d = 0; d < HD; d++) hq[d] = (float)(urand() * 4 - 2);
    for (int i = 0; i < T * HD; i++) {
        hqf[i] = hq[i % HD];
        hk[i] = (float)(urand() * 2 - 1);
        hv[i] = (float)(urand() * 2 - 1);
    }
    int64_t shape[4] = {1, 1, T, HD}, one[4] = {1, 1, 1, HD};
    ksm_tensor q1 = dev_upload_raw(&e, KSM_DTYPE_F32, 4, one, hq);
    ksm_tensor qb = q1;
    qb.shape[2] = T;
    qb.stride[2] = 0;
    ksm_tensor qf = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hqf);
    ksm_tensor k = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hk);
    ksm_tensor v = dev_upload_raw(&e, KSM_DTYPE_F32, 4, shape, hv);
    ksm_tensor ob = dev_empty(&e, KSM_DTYPE_F32, 4, shape),
               of = dev_empty(&e, KSM_DTYPE_F32, 4, shape);
    for (int causal = 0; causal < 2; causal++) {
        cr_assert_eq(ksm_op_sdpa(e.s, &ob, &qb, &k, &v, causal, 0.0f), 0);
        cr_assert_eq(ksm_op_sdpa(e.s, &of, &qf, &k, &v, causal, 0.0f), 0);
        float *yb = download(&e, &ob), *yf = download(&e, &of);
        for (int i = 0; i < T * HD; i++)
            cr_expect(fabsf(yb[i] - yf[i]) <= 1e-6f * (1.0f + fabsf(yf[i])),
                      "causal %d, element %d: %g vs %g", causal, i, yb[i], yf[i]);
        free(yb);
        free(yf);
    }
    env_fini(&e);
}

/* argmax is the index a serial scan with > gives (the first of tied maxima, -0 equal to +0, the
 * first NaN if any), for every row length up to 70 (vector blocks and remainders) and values
 * drawn from a few (many ties, infinities). */
Test(ops, argmax_is_the_first_maximum_of_a_serial_scan)
{
    struct env e;
    env_init(&e);
    enum { ROWS = 40 };
    const float vals[] = {-INFINITY, -1.0f, -0.0f, 0.0f, 1.0f, 2.0f, INFINITY};
    for (int64_t n = 1; n <= 70; n++) {
        float *h = malloc((size_t)(ROWS * n) * sizeof *h);
        int64_t want[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *x = h + r * n;
            const int nv[4] = {4, 6, 7, 3}; /* maxima of 0 (either sign), 2, inf, -0 */
            for (int64_t i = 0; i < n; i++) x[i] = vals[(int)(urand() * nv[r % 4])];
            if (r % 5 == 4) x[(int64_t)(urand() * (double)n)] = NAN;
            int64_t at = 0;
            for (int64_t i = 0; i < n; i++) {
                if (isnan(x[i])) {
                    at = i;
                    break;
                }
                if (x[i] > x[at]) at = i;
            }
            want[r] = at;
        }
        int64_t sx[2] = {ROWS, n}, sr[1] = {ROWS};
        ksm_tensor xt = dev_upload_raw(&e, KSM_DTYPE_F32, 2, sx, h);
        ksm_tensor it = dev_empty(&e, KSM_DTYPE_I64, 1, sr);
        cr_assert_eq(ksm_op_argmax(e.s, &it, &xt), 0);
        int64_t *got = download(&e, &it);
        for (int r = 0; r < ROWS; r++)
            cr_expect_eq(got[r], want[r], "n %lld, row %d: %lld, expected %lld", (long long)n, r,
                         (long long)got[r], (long long)want[r]);
        free(got);
        free(h);
        env_release_bufs(&e);
    }
    env_fini(&e);
}

Test(ops, conv2d_without_input_channels_gives_the_bias)
{
    /* Ci = 0 with a 3x3 kernel and padding: the wrappers accept it with no workspace (its size is
     * 0), so the kernel must not fail for want of one; PyTorch gives the bias (or zeros). */
    struct env e;
    env_init(&e);
    int64_t sx[4] = {1, 0, 4, 4}, sw[4] = {2, 0, 3, 3}, sy[4] = {1, 2, 4, 4}, s2[1] = {2};
    const float hb[2] = {1.5f, -2.0f};
    ksm_tensor x = dev_empty(&e, KSM_DTYPE_F32, 4, sx);
    ksm_tensor w = dev_empty(&e, KSM_DTYPE_F32, 4, sw);
    ksm_tensor b = dev_upload_raw(&e, KSM_DTYPE_F32, 1, s2, hb);
    ksm_tensor y = dev_empty(&e, KSM_DTYPE_F32, 4, sy);
    for (int groups = 1; groups <= 2; groups++) {
        cr_assert_eq(ksm_op_conv2d_workspace_size(&x, &w, 1, 1, groups), 0);
        cr_assert_eq(ksm_op_conv2d(e.s, &y, &x, &w, &b, 1, 1, groups, NULL, 0), 0);
        cr_assert_eq(ksm_stream_synchronize(e.s), 0, "groups %d: the kernel failed", groups);
        float *out = download(&e, &y);
        for (int i = 0; i < 32; i++)
            cr_expect_eq(out[i], hb[i / 16], "groups %d: y[%d]", groups, i);
        free(out);
    }
    cr_assert_eq(ksm_op_conv2d(e.s, &y, &x, &w, NULL, 1, 1, 1, NULL, 0), 0);
    cr_assert_eq(ksm_stream_synchronize(e.s), 0, "no bias: the kernel failed");
    float *out = download(&e, &y);
    for (int i = 0; i < 32; i++) cr_expect_eq(out[i], 0.0f, "no bias: y[%d]", i);
    free(out);
    env_fini(&e);
}

Test(ops, op_names_cover_every_type)
{
    for (int t = 0; t < KSM_OP_COUNT; t++)
        cr_expect_neq(strcmp(ksm_op_name((enum ksm_op_type)t), "unknown"), 0, "type %d", t);
    cr_expect_str_eq(ksm_op_name(KSM_OP_CONV2D), "conv2d");
    cr_expect_str_eq(ksm_op_name(KSM_OP_COUNT), "unknown");
}

/* ---- Validation on a counting stream ---- */

static uint64_t g_launches;
static struct ksm_op g_last_op;

static int count_launch(ksm_stream *s, const struct ksm_op *op)
{
    (void)s;
    g_launches++;
    g_last_op = *op;
    return 0;
}

static const struct ksm_device_i count_dev_iface = {0}; /* supports_op NULL: every op */
static const struct ksm_stream_i count_stream_iface = {.launch = count_launch};
static struct ksm_device count_dev = {.iface = &count_dev_iface, .name = "count:0"};
static struct ksm_device other_dev = {.iface = &count_dev_iface, .name = "count:1", .index = 1};
static struct ksm_stream count_stream = {.iface = &count_stream_iface, .dev = &count_dev};

/* Host arrays stand in for device memory: the counting stream never runs an op. */
static float pool[1 << 16];
static size_t pool_used;

static ksm_tensor T(enum ksm_dtype dt, int ndim, ...)
{
    int64_t shape[KSM_MAX_DIMS] = {0};
    va_list ap;
    va_start(ap, ndim);
    for (int i = 0; i < ndim; i++) shape[i] = va_arg(ap, int64_t);
    va_end(ap);
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, &count_dev, NULL, dt, ndim, shape), 0);
    size_t n = (ksm_tensor_nbytes(&t) + 7) / 4 + 2; /* floats, 8-byte aligned */
    n = (n + 1) & ~(size_t)1;
    cr_assert_leq(pool_used + n, sizeof pool / sizeof pool[0]);
    t.data = pool + pool_used;
    pool_used += n;
    return t;
}

#define F32    KSM_DTYPE_F32
#define I64    KSM_DTYPE_I64
#define D(...) ((int64_t)(__VA_ARGS__))

/* Runs call; checks the code and that nothing (on failure) / exactly one op (on success) was
 * enqueued. */
#define EXPECT_RC(want, call)                                                                      \
    do {                                                                                           \
        uint64_t before_ = g_launches;                                                             \
        int rc_ = (call);                                                                          \
        cr_expect_eq(rc_, (want), "%s: got %s, want %s", #call, ksm_err_name(rc_),                 \
                     ksm_err_name(want));                                                          \
        cr_expect_eq(g_launches - before_, (want) == 0 ? 1u : 0u, "%s: %llu ops enqueued", #call,  \
                     (unsigned long long)(g_launches - before_));                                  \
    } while (0)

TestSuite(ops_validate, .timeout = 30);

Test(ops_validate, elementwise_checks_and_broadcast_views)
{
    ksm_stream *s = &count_stream;
    ksm_tensor y = T(F32, 4, D(2), D(3), D(4), D(5)), x = T(F32, 4, D(2), D(3), D(4), D(5));
    ksm_tensor row = T(F32, 1, D(5)), chan = T(F32, 3, D(3), D(1), D(1));
    ksm_tensor bad = T(F32, 1, D(4)), big = T(F32, 5, D(2), D(2), D(3), D(4), D(5));
    ksm_tensor xi = T(I64, 4, D(2), D(3), D(4), D(5));

    EXPECT_RC(0, ksm_op_relu(s, &y, &x));
    EXPECT_RC(0, ksm_op_add(s, &y, &x, &row));
    /* the op carries expanded sources of y's ndim, stride 0 where broadcast */
    cr_expect_eq(g_last_op.type, KSM_OP_BINARY);
    cr_expect_eq(g_last_op.src[1].ndim, 4);
    cr_expect_eq(g_last_op.src[1].stride[0], 0);
    cr_expect_eq(g_last_op.src[1].stride[2], 0);
    cr_expect_eq(g_last_op.src[1].stride[3], 1);
    cr_expect_eq(g_last_op.src[1].shape[0], 2);
    EXPECT_RC(0, ksm_op_mul(s, &y, &chan, &x));
    cr_expect_eq(g_last_op.src[0].stride[1], 1);
    cr_expect_eq(g_last_op.src[0].stride[3], 0);
    EXPECT_RC(0, ksm_op_add(s, &y, &y, &x)); /* in place, exact alias */

    EXPECT_RC(KSM_EINVAL, ksm_op_relu(NULL, &y, &x));
    EXPECT_RC(KSM_EINVAL, ksm_op_relu(s, &y, NULL));
    ksm_tensor wrongdev = x;
    wrongdev.dev = &other_dev;
    EXPECT_RC(KSM_EINVAL, ksm_op_relu(s, &y, &wrongdev));
    ksm_tensor hostx = x;
    hostx.dev = NULL;
    EXPECT_RC(KSM_EINVAL, ksm_op_add(s, &y, &hostx, &x));
    EXPECT_RC(KSM_EDTYPE, ksm_op_relu(s, &y, &xi));
    EXPECT_RC(KSM_EDTYPE, ksm_op_add(s, &xi, &x, &x));
    EXPECT_RC(KSM_ESHAPE, ksm_op_add(s, &y, &x, &bad));
    EXPECT_RC(KSM_ESHAPE, ksm_op_relu(s, &y, &big));
    ksm_tensor ybad = y;
    ybad.dtype = (enum ksm_dtype)42;
    EXPECT_RC(KSM_EDTYPE, ksm_op_relu(s, &ybad, &x));
    ksm_tensor neg = x;
    neg.shape[1] = -3;
    EXPECT_RC(KSM_ESHAPE, ksm_op_relu(s, &y, &neg));
    ksm_tensor nodata = x;
    nodata.data = NULL;
    EXPECT_RC(KSM_EINVAL, ksm_op_relu(s, &y, &nodata));
    /* non-contiguous destination */
    ksm_tensor yt;
    const int perm[4] = {0, 1, 3, 2};
    ksm_tensor y2 = T(F32, 4, D(2), D(3), D(5), D(4));
    cr_assert_eq(ksm_tensor_permute(&yt, &y2, perm), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_relu(s, &yt, &x));
    /* partial overlap of source and destination */
    ksm_tensor shifted = x;
    shifted.data = (float *)y.data + 1;
    EXPECT_RC(KSM_EINVAL, ksm_op_relu(s, &y, &shifted));
    /* a broadcast read of the destination itself */
    ksm_tensor yrow;
    cr_assert_eq(ksm_tensor_narrow(&yrow, &y, 0, 0, 1), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_add(s, &y, &yrow, &x));
    /* lerp */
    ksm_tensor w0 = T(F32, 0), wn = T(F32, 4, D(2), D(1), D(1), D(1)), wbad = T(F32, 1, D(3));
    EXPECT_RC(0, ksm_op_lerp(s, &y, &x, &y, &w0));
    EXPECT_RC(0, ksm_op_lerp(s, &y, &x, &y, &wn));
    EXPECT_RC(KSM_ESHAPE, ksm_op_lerp(s, &y, &x, &y, &wbad));
    /* copy: float <-> float and int <-> int only */
    ksm_tensor h16 = T(KSM_DTYPE_F16, 4, D(2), D(3), D(4), D(5));
    ksm_tensor i32 = T(KSM_DTYPE_I32, 4, D(2), D(3), D(4), D(5));
    EXPECT_RC(0, ksm_op_copy(s, &h16, &x));
    EXPECT_RC(0, ksm_op_copy(s, &i32, &xi));
    EXPECT_RC(KSM_EDTYPE, ksm_op_copy(s, &i32, &x));
    EXPECT_RC(KSM_ESHAPE, ksm_op_copy(s, &y, &row)); /* copy does not broadcast */
}

Test(ops_validate, conv2d_checks)
{
    ksm_stream *s = &count_stream;
    ksm_tensor x = T(F32, 4, D(2), D(8), D(6), D(6));
    ksm_tensor w = T(F32, 4, D(4), D(4), D(3), D(3)); /* groups 2 */
    ksm_tensor b = T(F32, 1, D(4));
    ksm_tensor y = T(F32, 4, D(2), D(4), D(6), D(6));
    size_t need = ksm_op_conv2d_workspace_size(&x, &w, 1, 1, 2);
    /* one image's 4*3*3 x 6*6 columns per CPU thread, at most one per image (nn/op.h) */
    cr_expect_eq(need, (size_t)(2 * 4 * 3 * 3 * 6 * 6) * sizeof(float));
    ksm_tensor wsbuf = T(F32, 1, D(2 * 4 * 9 * 36));
    void *ws = wsbuf.data;

    EXPECT_RC(0, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 2, ws, need));
    cr_expect_eq(g_last_op.p.conv2d.groups, 2);
    EXPECT_RC(0, ksm_op_conv2d(s, &y, &x, &w, NULL, 1, 1, 2, ws, need + 100));
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 2, ws, need - 4)); /* ws small */
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 2, NULL, need));
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 3, ws, need)); /* 3 ∤ 8 */
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 0, ws, need));
    EXPECT_RC(KSM_ESHAPE, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 1, ws, 1 << 20)); /* Ci/g */
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &x, &w, &b, -1, 1, 2, ws, need));
    EXPECT_RC(KSM_ESHAPE, ksm_op_conv2d(s, &y, &x, &w, &b, 0, 0, 2, ws, need)); /* Ho 4 != 6 */
    ksm_tensor b5 = T(F32, 1, D(5));
    EXPECT_RC(KSM_ESHAPE, ksm_op_conv2d(s, &y, &x, &w, &b5, 1, 1, 2, ws, need));
    ksm_tensor xi = x;
    xi.dtype = I64;
    EXPECT_RC(KSM_EDTYPE, ksm_op_conv2d(s, &y, &xi, &w, &b, 1, 1, 2, ws, need));
    ksm_tensor xd = x;
    xd.dev = &other_dev;
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &xd, &w, &b, 1, 1, 2, ws, need));
    ksm_tensor xnc; /* channels-last-like permuted input: not contiguous */
    ksm_tensor xcl = T(F32, 4, D(2), D(6), D(6), D(8));
    const int perm[4] = {0, 3, 1, 2};
    cr_assert_eq(ksm_tensor_permute(&xnc, &xcl, perm), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &xnc, &w, &b, 1, 1, 2, ws, need));
    /* workspace overlapping the output */
    EXPECT_RC(KSM_EINVAL, ksm_op_conv2d(s, &y, &x, &w, &b, 1, 1, 2, y.data, need));
    /* 1x1 without padding and depthwise need no workspace */
    ksm_tensor w1 = T(F32, 4, D(4), D(8), D(1), D(1)), wdw = T(F32, 4, D(8), D(1), D(3), D(3));
    ksm_tensor y8 = T(F32, 4, D(2), D(8), D(6), D(6));
    cr_expect_eq(ksm_op_conv2d_workspace_size(&x, &w1, 0, 0, 1), 0);
    cr_expect_eq(ksm_op_conv2d_workspace_size(&x, &wdw, 1, 1, 8), 0);
    cr_expect_gt(ksm_op_conv2d_workspace_size(&x, &w1, 1, 1, 1), 0);
    EXPECT_RC(0, ksm_op_conv2d(s, &y8, &x, &wdw, NULL, 1, 1, 8, NULL, 0));
}

Test(ops_validate, norm_checks)
{
    ksm_stream *s = &count_stream;
    ksm_tensor x = T(F32, 4, D(2), D(32), D(4), D(4)), y = T(F32, 4, D(2), D(32), D(4), D(4));
    ksm_tensor c = T(F32, 1, D(32)), c2 = T(F32, 1, D(16));
    EXPECT_RC(0, ksm_op_groupnorm(s, &y, &x, 2, &c, &c, 1e-5f));
    EXPECT_RC(0, ksm_op_groupnorm(s, &y, &x, 32, NULL, NULL, 1e-5f));
    EXPECT_RC(0, ksm_op_groupnorm(s, &x, &x, 2, &c, &c, 1e-5f)); /* in place */
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 3, &c, &c, 1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 0, &c, &c, 1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 64, &c, &c, 1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 2, &c, &c, 0.0f));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 2, &c, &c, -1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 2, &c, &c, NAN));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &y, &x, 2, &c, &c, INFINITY));
    EXPECT_RC(KSM_ESHAPE, ksm_op_groupnorm(s, &y, &x, 2, &c2, &c, 1e-5f));
    EXPECT_RC(0, ksm_op_batchnorm(s, &y, &x, &c, &c, &c, &c, 1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_batchnorm(s, &y, &x, &c, &c, NULL, &c, 1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_batchnorm(s, &y, &x, &c, &c, &c, &c, 0.0f));
    EXPECT_RC(KSM_ESHAPE, ksm_op_batchnorm(s, &y, &x, &c2, &c, &c, &c, 1e-5f));
    ksm_tensor ci = c;
    ci.dtype = I64;
    EXPECT_RC(KSM_EDTYPE, ksm_op_batchnorm(s, &y, &x, &c, &ci, &c, &c, 1e-5f));
    ksm_tensor xt;
    const int perm[4] = {0, 1, 3, 2};
    cr_assert_eq(ksm_tensor_permute(&xt, &x, perm), 0);
    ksm_tensor yt = T(F32, 4, D(2), D(32), D(4), D(4));
    EXPECT_RC(KSM_EINVAL, ksm_op_groupnorm(s, &yt, &xt, 2, &c, &c, 1e-5f));
    ksm_tensor l = T(F32, 3, D(2), D(5), D(16)), ly = T(F32, 3, D(2), D(5), D(16));
    ksm_tensor d16 = T(F32, 1, D(16));
    EXPECT_RC(0, ksm_op_layernorm(s, &ly, &l, &d16, &d16, 1e-5f));
    EXPECT_RC(KSM_ESHAPE, ksm_op_layernorm(s, &ly, &l, &c, NULL, 1e-5f));
    EXPECT_RC(KSM_EINVAL, ksm_op_layernorm(s, &ly, &l, NULL, NULL, 0.0f));
    ksm_tensor ly2 = T(F32, 3, D(2), D(6), D(16));
    EXPECT_RC(KSM_ESHAPE, ksm_op_layernorm(s, &ly2, &l, NULL, NULL, 1e-5f));
    EXPECT_RC(0, ksm_op_softmax(s, &ly, &l));
    EXPECT_RC(KSM_ESHAPE, ksm_op_softmax(s, &ly2, &l));
    ksm_tensor lv, lv2; /* narrowed (non-contiguous) sources */
    cr_assert_eq(ksm_tensor_narrow(&lv, &ly2, 1, 0, 5), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_softmax(s, &ly, &lv));
    ksm_tensor wide = T(F32, 3, D(2), D(5), D(20));
    cr_assert_eq(ksm_tensor_narrow(&lv2, &wide, 2, 0, 16), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_softmax(s, &ly, &lv2));
}

Test(ops_validate, gemm_linear_sdpa_checks)
{
    ksm_stream *s = &count_stream;
    ksm_tensor a = T(F32, 2, D(5), D(7)), b = T(F32, 2, D(7), D(6)), c = T(F32, 2, D(5), D(6));
    ksm_tensor bt = T(F32, 2, D(6), D(7));
    EXPECT_RC(0, ksm_op_gemm(s, &c, &a, &b, false, false, 1.0f, 0.0f));
    EXPECT_RC(0, ksm_op_gemm(s, &c, &a, &bt, false, true, 1.0f, 1.0f));
    EXPECT_RC(KSM_ESHAPE, ksm_op_gemm(s, &c, &a, &bt, false, false, 1.0f, 0.0f));
    EXPECT_RC(KSM_EINVAL, ksm_op_gemm(s, &c, &a, &b, false, false, NAN, 0.0f));
    ksm_tensor at; /* a transposed view: stride 1 not in the last dim */
    ksm_tensor a75 = T(F32, 2, D(7), D(5));
    const int perm[2] = {1, 0};
    cr_assert_eq(ksm_tensor_permute(&at, &a75, perm), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_gemm(s, &c, &at, &b, false, false, 1.0f, 0.0f));
    EXPECT_RC(0, ksm_op_gemm(s, &c, &a75, &b, true, false, 1.0f, 0.0f)); /* say it instead */
    ksm_tensor b66 = T(F32, 2, D(6), D(6));
    EXPECT_RC(KSM_EINVAL, ksm_op_gemm(s, &c, &c, &b66, false, false, 1.0f, 0.0f)); /* c is a */
    ksm_tensor a3 = T(F32, 3, D(3), D(5), D(7)), b3 = T(F32, 3, D(1), D(7), D(6));
    ksm_tensor c3 = T(F32, 3, D(3), D(5), D(6)), b3bad = T(F32, 3, D(2), D(7), D(6));
    EXPECT_RC(0, ksm_op_gemm(s, &c3, &a3, &b3, false, false, 1.0f, 0.0f));
    cr_expect_eq(g_last_op.src[1].stride[0], 0);
    cr_expect_eq(g_last_op.src[1].shape[0], 3);
    EXPECT_RC(KSM_ESHAPE, ksm_op_gemm(s, &c3, &a3, &b3bad, false, false, 1.0f, 0.0f));
    EXPECT_RC(KSM_ESHAPE, ksm_op_gemm(s, &c3, &a, &b, false, false, 1.0f, 0.0f));

    ksm_tensor x = T(F32, 3, D(2), D(5), D(12)), w = T(F32, 2, D(7), D(12));
    ksm_tensor bias = T(F32, 1, D(7)), y = T(F32, 3, D(2), D(5), D(7));
    EXPECT_RC(0, ksm_op_linear(s, &y, &x, &w, &bias));
    EXPECT_RC(0, ksm_op_linear(s, &y, &x, &w, NULL));
    ksm_tensor y2 = T(F32, 3, D(2), D(4), D(7));
    EXPECT_RC(KSM_ESHAPE, ksm_op_linear(s, &y2, &x, &w, NULL));
    EXPECT_RC(KSM_ESHAPE, ksm_op_linear(s, &y, &x, &w, &x));

    ksm_tensor q = T(F32, 4, D(2), D(3), D(5), D(8)), o = T(F32, 4, D(2), D(3), D(5), D(8));
    ksm_tensor k = T(F32, 4, D(2), D(3), D(9), D(8)), v = T(F32, 4, D(2), D(3), D(9), D(8));
    EXPECT_RC(0, ksm_op_sdpa(s, &o, &q, &q, &q, true, 0.0f));
    cr_expect_float_eq(g_last_op.p.sdpa.scale, 1.0f / sqrtf(8.0f), 1e-7f);
    EXPECT_RC(0, ksm_op_sdpa(s, &o, &q, &k, &v, true, 0.5f)); /* Tq < Tk, bottom-right */
    ksm_tensor o9 = T(F32, 4, D(2), D(3), D(9), D(8));
    EXPECT_RC(0, ksm_op_sdpa(s, &o9, &k, &q, &q, false, 0.0f));
    EXPECT_RC(KSM_ESHAPE, ksm_op_sdpa(s, &o9, &k, &q, &q, true, 0.0f)); /* causal Tq > Tk */
    EXPECT_RC(KSM_ESHAPE, ksm_op_sdpa(s, &o, &q, &k, &q, false, 0.0f)); /* v length */
    EXPECT_RC(KSM_EINVAL, ksm_op_sdpa(s, &o, &q, &k, &v, false, NAN));
    ksm_tensor qbig = T(F32, 4, D(1), D(1), D(2), D(KSM_SDPA_MAX_HEAD_DIM + 1));
    ksm_tensor obig = T(F32, 4, D(1), D(1), D(2), D(KSM_SDPA_MAX_HEAD_DIM + 1));
    EXPECT_RC(KSM_EINVAL, ksm_op_sdpa(s, &obig, &qbig, &qbig, &qbig, false, 0.0f));
    ksm_tensor qt; /* hd not the unit-stride dim */
    const int p4[4] = {0, 1, 3, 2};
    ksm_tensor q85 = T(F32, 4, D(2), D(3), D(8), D(5));
    cr_assert_eq(ksm_tensor_permute(&qt, &q85, p4), 0);
    EXPECT_RC(KSM_EINVAL, ksm_op_sdpa(s, &o, &qt, &q, &q, false, 0.0f));
    ksm_tensor oself = o; /* an output whose heads overlap each other */
    oself.stride[1] = 1;
    EXPECT_RC(KSM_EINVAL, ksm_op_sdpa(s, &oself, &q, &q, &q, false, 0.0f));
    EXPECT_RC(KSM_EINVAL, ksm_op_sdpa(s, &q, &q, &q, &q, false, 0.0f)); /* out aliases q */
}

Test(ops_validate, reduction_and_index_checks)
{
    ksm_stream *s = &count_stream;
    ksm_tensor x = T(F32, 4, D(2), D(6), D(5), D(4)), m = T(F32, 2, D(2), D(6));
    ksm_tensor mk = T(F32, 4, D(2), D(6), D(1), D(1));
    EXPECT_RC(0, ksm_op_mean(s, &m, &x, 2, 4));
    EXPECT_RC(0, ksm_op_mean(s, &mk, &x, 2, 4)); /* keepdim form */
    EXPECT_RC(KSM_EINVAL, ksm_op_mean(s, &m, &x, 2, 5));
    EXPECT_RC(KSM_EINVAL, ksm_op_mean(s, &m, &x, 3, 3));
    EXPECT_RC(KSM_EINVAL, ksm_op_mean(s, &m, &x, -1, 2));
    EXPECT_RC(KSM_ESHAPE, ksm_op_mean(s, &m, &x, 1, 3));

    ksm_tensor p = T(F32, 4, D(2), D(6), D(2), D(2)), pbad = T(F32, 4, D(2), D(6), D(3), D(2));
    EXPECT_RC(0, ksm_op_maxpool2(s, &p, &x));
    EXPECT_RC(KSM_ESHAPE, ksm_op_maxpool2(s, &pbad, &x));

    ksm_tensor lg = T(F32, 2, D(4), D(10)), lab = T(I64, 1, D(4)), loss = T(F32, 1, D(4));
    ksm_tensor lab32 = T(KSM_DTYPE_I32, 1, D(4)), lab3 = T(I64, 1, D(3));
    EXPECT_RC(0, ksm_op_cross_entropy(s, &loss, &lg, &lab, -100));
    EXPECT_RC(KSM_EDTYPE, ksm_op_cross_entropy(s, &loss, &lg, &lab32, -100));
    EXPECT_RC(KSM_ESHAPE, ksm_op_cross_entropy(s, &loss, &lg, &lab3, -100));

    ksm_tensor am = T(I64, 1, D(4));
    EXPECT_RC(0, ksm_op_argmax(s, &am, &lg));
    EXPECT_RC(KSM_EDTYPE, ksm_op_argmax(s, &loss, &lg));
    EXPECT_RC(KSM_ESHAPE, ksm_op_argmax(s, &lab3, &lg));

    ksm_tensor wemb = T(F32, 2, D(11), D(6)), idx = T(I64, 2, D(2), D(5));
    ksm_tensor e = T(F32, 3, D(2), D(5), D(6)), ebad = T(F32, 3, D(2), D(5), D(7));
    EXPECT_RC(0, ksm_op_embedding(s, &e, &wemb, &idx));
    EXPECT_RC(KSM_ESHAPE, ksm_op_embedding(s, &ebad, &wemb, &idx));
    EXPECT_RC(KSM_EDTYPE, ksm_op_embedding(s, &e, &wemb, &e));
    ksm_tensor idxd = idx;
    idxd.dev = &other_dev;
    EXPECT_RC(KSM_EINVAL, ksm_op_embedding(s, &e, &wemb, &idxd));
}

/* ksm_op_conv2d_bn_relu gives, bit for bit, what ksm_op_conv2d then ksm_op_batchnorm_relu give,
 * on every convolution path: Winograd (3x3 pad 1, >= 16 channels; partial tiles; several
 * chunks), im2col (3 input channels; pad 0), 1x1 without im2col, depthwise and grouped. */
Test(ops, conv2d_bn_relu_equals_conv_then_batchnorm_relu)
{
    static const struct {
        int n, ci, h, w, co, k, pad, g;
        bool bias;
    } cases[] = {
        {3, 16, 7, 9, 24, 3, 1, 1, false}, {5, 16, 16, 16, 32, 3, 1, 1, true},
        {2, 3, 8, 8, 16, 3, 1, 1, false},  {2, 8, 6, 5, 12, 3, 0, 1, true},
        {2, 16, 5, 5, 20, 1, 0, 1, false}, {2, 8, 6, 6, 8, 3, 1, 8, true},
        {1, 8, 6, 6, 8, 3, 1, 2, false},
    };
    struct env e;
    env_init(&e);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int64_t xs[4] = {cases[c].n, cases[c].ci, cases[c].h, cases[c].w};
        const int64_t ws_[4] = {cases[c].co, cases[c].ci / cases[c].g, cases[c].k, cases[c].k};
        const int64_t ho = cases[c].h + 2 * cases[c].pad - cases[c].k + 1;
        const int64_t wo = cases[c].w + 2 * cases[c].pad - cases[c].k + 1;
        const int64_t ys[4] = {cases[c].n, cases[c].co, ho, wo}, vs[1] = {cases[c].co};
        const size_t nx = (size_t)(xs[0] * xs[1] * xs[2] * xs[3]);
        const size_t nw = (size_t)(ws_[0] * ws_[1] * ws_[2] * ws_[3]), nc = (size_t)cases[c].co;
        float *hx = malloc(sizeof(float) * nx), *hw = malloc(sizeof(float) * nw);
        float *hv[5];
        for (int i = 0; i < 5; i++) hv[i] = malloc(sizeof(float) * nc);
        for (size_t i = 0; i < nx; i++) hx[i] = (float)(urand() * 2.0 - 1.0);
        for (size_t i = 0; i < nw; i++) hw[i] = (float)(urand() * 0.6 - 0.3);
        for (size_t i = 0; i < nc; i++) {
            hv[0][i] = (float)(urand() - 0.5);       /* conv bias */
            hv[1][i] = (float)(urand() * 0.4 - 0.2); /* running mean */
            hv[2][i] = (float)(urand() + 0.1);       /* running var */
            hv[3][i] = (float)(urand() * 2.0 - 1.0); /* weight (some negative) */
            hv[4][i] = (float)(urand() - 0.5);       /* bias */
        }
        ksm_tensor x = dev_upload_raw(&e, KSM_DTYPE_F32, 4, xs, hx);
        ksm_tensor w = dev_upload_raw(&e, KSM_DTYPE_F32, 4, ws_, hw);
        ksm_tensor v[5];
        for (int i = 0; i < 5; i++) v[i] = dev_upload_raw(&e, KSM_DTYPE_F32, 1, vs, hv[i]);
        ksm_tensor y1 = dev_empty(&e, KSM_DTYPE_F32, 4, ys),
                   y2 = dev_empty(&e, KSM_DTYPE_F32, 4, ys);
        const int pad = cases[c].pad, g = cases[c].g;
        size_t wsb = ksm_op_conv2d_workspace_size(&x, &w, pad, pad, g);
        void *ws = wsb ? dev_alloc(&e, wsb) : NULL;
        const ksm_tensor *bias = cases[c].bias ? &v[0] : NULL;
        cr_assert_eq(ksm_op_conv2d(e.s, &y1, &x, &w, bias, pad, pad, g, ws, wsb), 0, "case %zu", c);
        cr_assert_eq(ksm_op_batchnorm_relu(e.s, &y1, &y1, &v[1], &v[2], &v[3], &v[4], 1e-5f), 0);
        /* invalid epilogues fail before anything runs: y2 keeps its NaN fill */
        const int64_t short_shape[1] = {cases[c].co - 1};
        ksm_tensor shortv = v[1];
        ksm_tensor_init(&shortv, e.dev, v[1].data, KSM_DTYPE_F32, 1, short_shape);
        cr_assert_neq(ksm_op_conv2d_bn_relu(e.s, &y2, &x, &w, bias, pad, pad, g, ws, wsb, &shortv,
                                            &v[2], &v[3], &v[4], 1e-5f),
                      0);
        cr_assert_eq(ksm_op_conv2d_bn_relu(e.s, &y2, &x, &w, bias, pad, pad, g, ws, wsb, &v[1],
                                           &v[2], &v[3], &v[4], 0.0f),
                     KSM_EINVAL);
        float *untouched = download(&e, &y2);
        cr_assert(isnan(untouched[0]));
        free(untouched);
        cr_assert_eq(ksm_op_conv2d_bn_relu(e.s, &y2, &x, &w, bias, pad, pad, g, ws, wsb, &v[1],
                                           &v[2], &v[3], &v[4], 1e-5f),
                     0, "case %zu", c);
        const size_t ny = (size_t)(ys[0] * ys[1] * ys[2] * ys[3]);
        float *r1 = download(&e, &y1), *r2 = download(&e, &y2);
        size_t zeros = 0, pos = 0;
        for (size_t i = 0; i < ny; i++) {
            zeros += r1[i] == 0.0f;
            pos += r1[i] > 0.0f;
        }
        cr_expect(zeros > 0 && pos > 0, "case %zu: the ReLU should clip some outputs, not all", c);
        cr_expect_eq(memcmp(r1, r2, sizeof(float) * ny), 0, "case %zu: fused != two ops", c);
        free(r1);
        free(r2);
        free(hx);
        free(hw);
        for (int i = 0; i < 5; i++) free(hv[i]);
        env_release_bufs(&e);
    }
    env_fini(&e);
}
