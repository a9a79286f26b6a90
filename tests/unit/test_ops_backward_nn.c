/*
 * Backward kernels of norms, convolution and attention, and train-mode BatchNorm
 * (daemon/nn/ops_backward_nn.c, daemon/backend/cpu/cpu_*_backward.c).
 *
 * backward_nn_golden: every case of tests/golden/backward_nn_*.safetensors (made by
 * tests/golden/gen_backward_nn.py from PyTorch autograd in float32) runs through the public
 * wrappers on a CPU-backend stream; each result is compared with max|out - ref| / max|ref| <=
 * 1e-5 and printed as "backward_nn_golden <case>.<role>: rel <err>" on stderr.
 *
 * backward_nn_edge: argument checks (bad dtypes, shapes, overlaps, missing outputs are refused
 * and nothing is written) and the running-statistics update.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops_backward_nn.h"
#include "kasmina/safetensors.h"
#include "kasmina/tensor.h"
#include "kt.h"

#define GOLDEN_TOL 1e-5

// ---- A CPU device and device buffers ----

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

static void env_fini(struct env *e)
{
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    for (int i = 0; i < e->n_bufs; i++) ksm_device_free(e->dev, e->bufs[i]);
    ksm_stream_free(e->s);
    ksm_backend_free(e->cpu);
}

/* A contiguous F32 device tensor, filled with 0xff bytes (NaN) so an unwritten element shows. */
static ksm_tensor dev_empty(struct env *e, int ndim, const int64_t *shape)
{
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, e->dev, NULL, KSM_DTYPE_F32, ndim, shape), 0);
    size_t n = ksm_tensor_nbytes(&t);
    cr_assert_lt(e->n_bufs, MAX_BUFS);
    cr_assert_eq(ksm_device_malloc(e->dev, n > 0 ? n : 1, &t.data), 0);
    e->bufs[e->n_bufs++] = t.data;
    cr_assert_eq(ksm_stream_memset_async(e->s, t.data, 0xff, n), 0);
    return t;
}

static ksm_tensor dev_from(struct env *e, int ndim, const int64_t *shape, const float *host)
{
    ksm_tensor t = dev_empty(e, ndim, shape);
    size_t n = ksm_tensor_nbytes(&t);
    if (n > 0) cr_assert_eq(ksm_stream_memcpy_async(e->s, t.data, host, n, KSM_COPY_H2D), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return t;
}

static ksm_tensor dev_like(struct env *e, const ksm_tensor *t)
{
    return dev_empty(e, t->ndim, t->shape);
}

/* Synchronizes and copies t into a malloc'd host buffer. */
static float *download(struct env *e, const ksm_tensor *t)
{
    size_t n = ksm_tensor_nbytes(t);
    float *h = malloc(n > 0 ? n : 1);
    cr_assert_not_null(h);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    if (n > 0) cr_assert_eq(ksm_stream_memcpy_async(e->s, h, t->data, n, KSM_COPY_D2H), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return h;
}

// ---- Fixtures ----

static const struct ksm_st_tensor *maybe(ksm_st_file *f, const char *cs, const char *role)
{
    char name[256];
    snprintf(name, sizeof name, "%s.%s", cs, role);
    return ksm_st_find(f, name);
}

static const struct ksm_st_tensor *need(ksm_st_file *f, const char *cs, const char *role)
{
    const struct ksm_st_tensor *t = maybe(f, cs, role);
    cr_assert_not_null(t, "fixture tensor %s.%s missing", cs, role);
    return t;
}

static ksm_tensor up(struct env *e, ksm_st_file *f, const char *cs, const char *role)
{
    const struct ksm_st_tensor *t = need(f, cs, role);
    cr_assert_eq(t->dtype, KSM_DTYPE_F32);
    return dev_from(e, t->ndim, t->shape, (const float *)t->data);
}

/* The number after "key=" in a "op=x key=value" description. */
static double param_num(const char *desc, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, " %s=", key);
    const char *p = strstr(desc, pat);
    cr_assert_not_null(p, "parameter %s missing in '%s'", key, desc);
    return strtod(p + strlen(pat), NULL);
}

/* A 64-bit unsigned "key=value" (seeds and steps do not fit a double). */
static uint64_t param_u64(const char *desc, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, " %s=", key);
    const char *p = strstr(desc, pat);
    cr_assert_not_null(p, "parameter %s missing in '%s'", key, desc);
    return strtoull(p + strlen(pat), NULL, 10);
}

static struct ksm_dropout dropout_of(const char *desc)
{
    return (struct ksm_dropout){.p = param_num(desc, "p"),
                                .seed = param_u64(desc, "seed"),
                                .step = param_u64(desc, "step"),
                                .site = (uint32_t)param_u64(desc, "site")};
}

/* The result t against the fixture's role; returns the relative error. */
static double check(struct env *e, ksm_st_file *f, const char *cs, const char *role,
                    const ksm_tensor *t)
{
    const struct ksm_st_tensor *ref = need(f, cs, role);
    cr_assert_eq((int64_t)ref->nbytes, ksm_tensor_numel(t) * 4, "%s.%s: size", cs, role);
    float *got = download(e, t), *want = kt_golden_floats(ref);
    char what[160];
    snprintf(what, sizeof what, "%s.%s", cs, role);
    double rel = kt_golden_expect_f32(what, got, want, ksm_tensor_numel(t), GOLDEN_TOL);
    fprintf(stderr, "backward_nn_golden %s: rel %.1e\n", what, rel);
    free(got);
    free(want);
    return rel;
}

static void run_batchnorm_train(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    ksm_tensor x = up(e, f, cs, "x"), w = up(e, f, cs, "w"), b = up(e, f, cs, "b");
    ksm_tensor rm = up(e, f, cs, "rm"), rv = up(e, f, cs, "rv"), dy = up(e, f, cs, "dy");
    ksm_tensor y = dev_like(e, &x), mean = dev_like(e, &w), invstd = dev_like(e, &w);
    cr_assert_eq(ksm_op_batchnorm_train(e->s, &y, &mean, &invstd, &x, &w, &b, &rm, &rv,
                                        param_num(desc, "momentum"), (float)param_num(desc, "eps")),
                 0);
    check(e, f, cs, "y", &y);
    check(e, f, cs, "mean", &mean);
    check(e, f, cs, "invstd", &invstd);
    check(e, f, cs, "rm_out", &rm);
    check(e, f, cs, "rv_out", &rv);
    ksm_tensor dx = dev_like(e, &x), dw = dev_like(e, &w), db = dev_like(e, &w);
    cr_assert_eq(ksm_op_batchnorm_backward(e->s, &dx, &dw, &db, &dy, &x, &w, &mean, &invstd), 0);
    check(e, f, cs, "dx", &dx);
    check(e, f, cs, "dw", &dw);
    check(e, f, cs, "db", &db);
}

static void run_norm_backward(struct env *e, ksm_st_file *f, const char *cs, const char *desc,
                              bool group)
{
    ksm_tensor x = up(e, f, cs, "x"), dy = up(e, f, cs, "dy"), dx = dev_like(e, &x);
    const bool affine = maybe(f, cs, "w") != NULL;
    ksm_tensor w, dw, db;
    if (affine) {
        w = up(e, f, cs, "w");
        dw = dev_like(e, &w);
        db = dev_like(e, &w);
    }
    const float eps = (float)param_num(desc, "eps");
    int rc = group ? ksm_op_groupnorm_backward(e->s, &dx, affine ? &dw : NULL, affine ? &db : NULL,
                                               &dy, &x, (int)param_num(desc, "groups"),
                                               affine ? &w : NULL, eps)
                   : ksm_op_layernorm_backward(e->s, &dx, affine ? &dw : NULL, affine ? &db : NULL,
                                               &dy, &x, affine ? &w : NULL, eps);
    cr_assert_eq(rc, 0);
    check(e, f, cs, "dx", &dx);
    if (affine) {
        check(e, f, cs, "dw", &dw);
        check(e, f, cs, "db", &db);
    }
}

static void run_conv_backward(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    ksm_tensor x = up(e, f, cs, "x"), w = up(e, f, cs, "w"), dy = up(e, f, cs, "dy");
    ksm_tensor dx = dev_like(e, &x), dw = dev_like(e, &w);
    const bool bias = maybe(f, cs, "db") != NULL;
    int64_t co = w.shape[0];
    ksm_tensor db = dev_empty(e, 1, &co);
    const int ph = (int)param_num(desc, "pad_h"), pw = (int)param_num(desc, "pad_w");
    const int g = (int)param_num(desc, "groups");
    size_t wsb = ksm_op_conv2d_backward_workspace_size(&x, &w, ph, pw, g);
    cr_assert_gt(wsb, 0);
    void *ws = NULL;
    cr_assert_eq(ksm_device_malloc(e->dev, wsb, &ws), 0);
    e->bufs[e->n_bufs++] = ws;
    cr_assert_eq(
        ksm_op_conv2d_backward(e->s, &dx, &dw, bias ? &db : NULL, &dy, &x, &w, ph, pw, g, ws, wsb),
        0);
    check(e, f, cs, "dx", &dx);
    check(e, f, cs, "dw", &dw);
    if (bias) check(e, f, cs, "db", &db);
}

static void run_sdpa_backward(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    ksm_tensor q = up(e, f, cs, "q"), k = up(e, f, cs, "k"), v = up(e, f, cs, "v");
    ksm_tensor dout = up(e, f, cs, "dout");
    ksm_tensor dq = dev_like(e, &q), dk = dev_like(e, &k), dv = dev_like(e, &v);
    cr_assert_eq(ksm_op_sdpa_backward(e->s, &dq, &dk, &dv, &dout, &q, &k, &v,
                                      param_num(desc, "causal") != 0,
                                      (float)param_num(desc, "scale")),
                 0);
    check(e, f, cs, "dq", &dq);
    check(e, f, cs, "dk", &dk);
    check(e, f, cs, "dv", &dv);
}

/* Dropout with kasmina's masks (the fixture's from tests/golden/philox.py): forward, and the
 * backward as the same op on dy. */
static void run_dropout(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    ksm_tensor x = up(e, f, cs, "x"), dy = up(e, f, cs, "dy");
    ksm_tensor y = dev_like(e, &x), dx = dev_like(e, &dy);
    struct ksm_dropout d = dropout_of(desc);
    cr_assert_eq(ksm_op_dropout(e->s, &y, &x, &d), 0);
    cr_assert_eq(ksm_op_dropout(e->s, &dx, &dy, &d), 0);
    check(e, f, cs, "y", &y);
    check(e, f, cs, "dx", &dx);
    /* in place gives the same values */
    cr_assert_eq(ksm_op_dropout(e->s, &x, &x, &d), 0);
    check(e, f, cs, "y", &x);
}

static void run_sdpa_dropout(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    ksm_tensor q = up(e, f, cs, "q"), k = up(e, f, cs, "k"), v = up(e, f, cs, "v");
    ksm_tensor dout = up(e, f, cs, "dout"), out = dev_like(e, &q);
    ksm_tensor dq = dev_like(e, &q), dk = dev_like(e, &k), dv = dev_like(e, &v);
    struct ksm_dropout d = dropout_of(desc);
    bool causal = param_num(desc, "causal") != 0;
    cr_assert_eq(ksm_op_sdpa_dropout(e->s, &out, &q, &k, &v, causal, 0.0f, &d), 0);
    check(e, f, cs, "out", &out);
    cr_assert_eq(
        ksm_op_sdpa_dropout_backward(e->s, &dq, &dk, &dv, &dout, &q, &k, &v, causal, 0.0f, &d), 0);
    check(e, f, cs, "dq", &dq);
    check(e, f, cs, "dk", &dk);
    check(e, f, cs, "dv", &dv);
    /* the output as a strided [B, T, H, hd] view gives the same values */
    int64_t b = q.shape[0], h = q.shape[1], tq = q.shape[2], hd = q.shape[3];
    ksm_tensor o2 = dev_empty(e, 4, (const int64_t[]){b, tq, h, hd});
    ksm_tensor ov = o2;
    ov.shape[1] = h, ov.shape[2] = tq;
    ov.stride[0] = tq * h * hd, ov.stride[1] = hd, ov.stride[2] = h * hd, ov.stride[3] = 1;
    cr_assert_eq(ksm_op_sdpa_dropout(e->s, &ov, &q, &k, &v, causal, 0.0f, &d), 0);
    float *got = download(e, &o2), *want = kt_golden_floats(need(f, cs, "out"));
    double worst = 0, top = 0;
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t hi = 0; hi < h; hi++)
            for (int64_t i = 0; i < tq; i++)
                for (int64_t dd = 0; dd < hd; dd++) {
                    float g = got[((bi * tq + i) * h + hi) * hd + dd];
                    float w = want[((bi * h + hi) * tq + i) * hd + dd];
                    worst = fmax(worst, fabs((double)g - w));
                    top = fmax(top, fabs((double)w));
                }
    cr_expect_leq(worst, GOLDEN_TOL * top, "%s: strided out differs by %g", cs, worst);
    free(got);
    free(want);
}

static const char *const GOLDEN_FILES[] = {
    "backward_nn_norm.safetensors", "backward_nn_conv.safetensors", "backward_nn_attn.safetensors",
    "backward_nn_dropout.safetensors", NULL};

TestSuite(backward_nn_golden, .timeout = 120);

ParameterizedTestParameters(backward_nn_golden, matches_pytorch)
{
    return kt_golden_cases(GOLDEN_FILES);
}

ParameterizedTest(struct kt_golden_case *c, backward_nn_golden, matches_pytorch)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open(c->file);
    const char *desc = ksm_st_metadata(f, c->name);
    cr_assert_not_null(desc, "%s: no description", c->name);
    char d[512];
    snprintf(d, sizeof d, " %s", desc); /* param_num looks for " key=" */
    if (strcmp(c->op, "batchnorm_train") == 0)
        run_batchnorm_train(&e, f, c->name, d);
    else if (strcmp(c->op, "groupnorm_backward") == 0)
        run_norm_backward(&e, f, c->name, d, true);
    else if (strcmp(c->op, "layernorm_backward") == 0)
        run_norm_backward(&e, f, c->name, d, false);
    else if (strcmp(c->op, "conv2d_backward") == 0)
        run_conv_backward(&e, f, c->name, d);
    else if (strcmp(c->op, "sdpa_backward") == 0)
        run_sdpa_backward(&e, f, c->name, d);
    else if (strcmp(c->op, "dropout") == 0)
        run_dropout(&e, f, c->name, d);
    else if (strcmp(c->op, "sdpa_dropout") == 0)
        run_sdpa_dropout(&e, f, c->name, d);
    else
        cr_assert_fail("%s: unknown op %s", c->name, c->op);
    ksm_st_close(f);
    env_fini(&e);
}

Test(backward_nn_golden, every_op_has_its_cases)
{
    static const char *const ops[] = {"batchnorm_train", "groupnorm_backward", "layernorm_backward",
                                      "conv2d_backward", "sdpa_backward",      "dropout",
                                      "sdpa_dropout"};
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        cr_expect_geq(kt_golden_count(GOLDEN_FILES, ops[i]), 4, "%s", ops[i]);
}

// ---- Edge cases ----

TestSuite(backward_nn_edge, .timeout = 30);

/* Every element of t still holds the 0xff fill (nothing was written). */
static void expect_untouched(struct env *e, const ksm_tensor *t, const char *what)
{
    uint32_t *h = (uint32_t *)download(e, t);
    for (int64_t i = 0; i < ksm_tensor_numel(t); i++)
        if (h[i] != 0xffffffffu) {
            cr_expect_fail("%s[%lld] was written", what, (long long)i);
            break;
        }
    free(h);
}

Test(backward_nn_edge, running_stats_update_as_pytorch)
{
    struct env e;
    env_init(&e);
    const int64_t xs[4] = {2, 1, 1, 2}, c = 1;
    const float xv[4] = {1.0f, 2.0f, 3.0f, 4.0f}, one = 1.0f, zero = 0.0f;
    const float rm0 = 0.5f, rv0 = 2.0f;
    ksm_tensor x = dev_from(&e, 4, xs, xv), w = dev_from(&e, 1, &c, &one);
    ksm_tensor b = dev_from(&e, 1, &c, &zero), rm = dev_from(&e, 1, &c, &rm0);
    ksm_tensor rv = dev_from(&e, 1, &c, &rv0), y = dev_like(&e, &x);
    ksm_tensor mean = dev_like(&e, &w), invstd = dev_like(&e, &w);
    cr_assert_eq(ksm_op_batchnorm_train(e.s, &y, &mean, &invstd, &x, &w, &b, &rm, &rv, 0.1, 1e-5f),
                 0);
    float *got_m = download(&e, &rm), *got_v = download(&e, &rv), *got_mean = download(&e, &mean);
    /* torch: r = momentum * stat + (1 - momentum) * r in double; var unbiased (n / (n - 1)) */
    cr_expect_eq(*got_m, (float)(0.1 * 2.5 + 0.9 * (double)rm0));
    cr_expect_eq(*got_v, (float)(0.1 * (5.0 / 3.0) + 0.9 * (double)rv0));
    cr_expect_eq(*got_mean, 2.5f);
    free(got_m);
    free(got_v);
    free(got_mean);
    /* without running statistics: nothing to update, the rest as before */
    cr_assert_eq(
        ksm_op_batchnorm_train(e.s, &y, &mean, &invstd, &x, &w, &b, NULL, NULL, 0.1, 1e-5f), 0);
    float *yh = download(&e, &y);
    cr_expect_float_eq(yh[0], (float)(-1.5 / sqrt(1.25 + 1e-5)), 1e-6f);
    free(yh);
    env_fini(&e);
}

Test(backward_nn_edge, batchnorm_train_rejects_bad_arguments)
{
    struct env e;
    env_init(&e);
    const int64_t xs[4] = {2, 3, 2, 2}, one_px[4] = {1, 3, 1, 1}, c = 3, c2 = 2;
    ksm_tensor x = dev_empty(&e, 4, xs), y = dev_empty(&e, 4, xs), x1 = dev_empty(&e, 4, one_px);
    ksm_tensor y1 = dev_empty(&e, 4, one_px);
    ksm_tensor w = dev_empty(&e, 1, &c), b = dev_empty(&e, 1, &c), rm = dev_empty(&e, 1, &c);
    ksm_tensor rv = dev_empty(&e, 1, &c), sm = dev_empty(&e, 1, &c), si = dev_empty(&e, 1, &c);
    ksm_tensor short_v = dev_empty(&e, 1, &c2), wi = w;
    wi.dtype = KSM_DTYPE_I32;
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y, &sm, &si, &x, &w, &b, &rm, &short_v, 0.1, 1e-5f),
                 KSM_ESHAPE);
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y, &sm, &si, &x, &wi, &b, &rm, &rv, 0.1, 1e-5f),
                 KSM_EDTYPE);
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y1, &sm, &si, &x1, &w, &b, &rm, &rv, 0.1, 1e-5f),
                 KSM_ESHAPE); /* one value per channel */
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y, &sm, &si, &x, &w, &b, &rm, NULL, 0.1, 1e-5f),
                 KSM_EINVAL);
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y, &sm, &sm, &x, &w, &b, &rm, &rv, 0.1, 1e-5f),
                 KSM_EINVAL); /* outputs overlap */
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y, &sm, &si, &x, &w, &b, &rm, &rv, 0.1, 0.0f),
                 KSM_EINVAL);
    cr_expect_eq(ksm_op_batchnorm_train(e.s, &y, &sm, &si, &x, &w, &b, &rm, &rv, 1.5, 1e-5f),
                 KSM_EINVAL);
    expect_untouched(&e, &y, "y");
    expect_untouched(&e, &rm, "running_mean");
    expect_untouched(&e, &rv, "running_var");
    expect_untouched(&e, &sm, "save_mean");
    env_fini(&e);
}

Test(backward_nn_edge, norm_backward_rejects_bad_arguments)
{
    struct env e;
    env_init(&e);
    const int64_t xs[4] = {2, 4, 3, 3}, c = 4, c3 = 3;
    ksm_tensor x = dev_empty(&e, 4, xs), dy = dev_empty(&e, 4, xs), dx = dev_empty(&e, 4, xs);
    ksm_tensor dw = dev_empty(&e, 1, &c), dw3 = dev_empty(&e, 1, &c3);
    ksm_tensor m = dev_empty(&e, 1, &c), is = dev_empty(&e, 1, &c);
    cr_expect_eq(ksm_op_groupnorm_backward(e.s, &dx, &dw3, NULL, &dy, &x, 2, NULL, 1e-5f),
                 KSM_ESHAPE);
    cr_expect_eq(ksm_op_groupnorm_backward(e.s, &dx, NULL, NULL, &dy, &x, 3, NULL, 1e-5f),
                 KSM_EINVAL); /* groups do not divide C */
    cr_expect_eq(ksm_op_groupnorm_backward(e.s, NULL, NULL, NULL, &dy, &x, 2, NULL, 1e-5f),
                 KSM_EINVAL); /* no output */
    cr_expect_eq(ksm_op_layernorm_backward(e.s, &dx, &dw, NULL, &dy, &x, NULL, 1e-5f),
                 KSM_ESHAPE); /* dweight over D = 3 */
    cr_expect_eq(ksm_op_layernorm_backward(e.s, &dy, NULL, NULL, &dy, &x, NULL, 1e-5f),
                 KSM_EINVAL); /* dx is dy */
    ksm_tensor xi = x;
    xi.dtype = KSM_DTYPE_F16;
    cr_expect_eq(ksm_op_batchnorm_backward(e.s, &dx, NULL, NULL, &dy, &xi, NULL, &m, &is),
                 KSM_EDTYPE);
    cr_expect_eq(ksm_op_batchnorm_backward(e.s, &dx, NULL, NULL, &dy, &x, NULL, &m, &dw3),
                 KSM_ESHAPE);
    expect_untouched(&e, &dx, "dx");
    expect_untouched(&e, &dw, "dweight");
    env_fini(&e);
}

Test(backward_nn_edge, conv2d_backward_rejects_bad_arguments)
{
    struct env e;
    env_init(&e);
    const int64_t xs[4] = {1, 4, 5, 5}, ws_[4] = {6, 2, 3, 3}, ys[4] = {1, 6, 5, 5};
    const int64_t bad_ys[4] = {1, 6, 3, 3}, co = 6;
    ksm_tensor x = dev_empty(&e, 4, xs), w = dev_empty(&e, 4, ws_), dy = dev_empty(&e, 4, ys);
    ksm_tensor dyb = dev_empty(&e, 4, bad_ys), dx = dev_empty(&e, 4, xs);
    ksm_tensor dw = dev_empty(&e, 4, ws_), db = dev_empty(&e, 1, &co);
    size_t wsb = ksm_op_conv2d_backward_workspace_size(&x, &w, 1, 1, 2);
    cr_assert_eq(wsb, sizeof(float) * 2 * 9 * 25);
    void *ws = NULL;
    cr_assert_eq(ksm_device_malloc(e.dev, wsb, &ws), 0);
    e.bufs[e.n_bufs++] = ws;
    cr_expect_eq(ksm_op_conv2d_backward(e.s, &dx, &dw, &db, &dyb, &x, &w, 1, 1, 2, ws, wsb),
                 KSM_ESHAPE);
    cr_expect_eq(ksm_op_conv2d_backward(e.s, &dx, &dw, &db, &dy, &x, &w, 1, 1, 2, ws, wsb - 4),
                 KSM_EINVAL);
    cr_expect_eq(ksm_op_conv2d_backward(e.s, NULL, NULL, NULL, &dy, &x, &w, 1, 1, 2, ws, wsb),
                 KSM_EINVAL);
    cr_expect_eq(ksm_op_conv2d_backward(e.s, &dx, &dw, &db, &dy, &x, &w, 1, 1, 3, ws, wsb),
                 KSM_EINVAL); /* groups */
    cr_expect_eq(ksm_op_conv2d_backward(e.s, &dx, &dw, &db, &dy, &x, &w, 1, 1, 1, ws, wsb),
                 KSM_ESHAPE); /* w's Ci/g */
    cr_expect_eq(ksm_op_conv2d_backward(e.s, &dx, &dx, NULL, &dy, &x, &w, 1, 1, 2, ws, wsb),
                 KSM_ESHAPE); /* dw shaped like x */
    ksm_tensor dyh = dy;
    dyh.dtype = KSM_DTYPE_BF16;
    cr_expect_eq(ksm_op_conv2d_backward(e.s, &dx, &dw, &db, &dyh, &x, &w, 1, 1, 2, ws, wsb),
                 KSM_EDTYPE);
    expect_untouched(&e, &dx, "dx");
    expect_untouched(&e, &dw, "dw");
    expect_untouched(&e, &db, "db");
    env_fini(&e);
}

Test(backward_nn_edge, sdpa_backward_rejects_bad_arguments)
{
    struct env e;
    env_init(&e);
    const int64_t qs[4] = {1, 2, 7, 8}, ks[4] = {1, 2, 5, 8};
    ksm_tensor q = dev_empty(&e, 4, qs), k = dev_empty(&e, 4, ks), v = dev_empty(&e, 4, ks);
    ksm_tensor dout = dev_empty(&e, 4, qs), dq = dev_empty(&e, 4, qs);
    ksm_tensor dk = dev_empty(&e, 4, ks), dv = dev_empty(&e, 4, ks);
    cr_expect_eq(ksm_op_sdpa_backward(e.s, &dq, &dk, &dv, &dout, &q, &k, &v, true, 0.0f),
                 KSM_ESHAPE); /* causal with Tq > Tk */
    cr_expect_eq(ksm_op_sdpa_backward(e.s, &dq, &dk, &dk, &dout, &q, &k, &v, false, 0.0f),
                 KSM_EINVAL); /* dk and dv overlap */
    cr_expect_eq(ksm_op_sdpa_backward(e.s, &dq, &dk, &dv, &dout, &q, &k, &v, false, NAN),
                 KSM_EINVAL);
    cr_expect_eq(ksm_op_sdpa_backward(e.s, &dq, &dk, &dv, &dout, &q, &k, &dq, false, 0.0f),
                 KSM_ESHAPE); /* v shaped like q */
    cr_expect_eq(ksm_op_sdpa_backward(e.s, &dq, NULL, &dv, &dout, &q, &k, &v, false, 0.0f),
                 KSM_EINVAL);
    expect_untouched(&e, &dq, "dq");
    expect_untouched(&e, &dk, "dk");
    expect_untouched(&e, &dv, "dv");
    env_fini(&e);
}

// ---- Dropout masks: statistics, determinism, the backward's mask, argument checks ----

TestSuite(dropout, .timeout = 60);

static float *run_dropout_host(struct env *e, const ksm_tensor *x, const struct ksm_dropout *d)
{
    ksm_tensor y = dev_like(e, x);
    cr_assert_eq(ksm_op_dropout(e->s, &y, x, d), 0);
    return download(e, &y);
}

/* 2^20 ones: the kept share is 1 - p within 6 standard deviations, kept values are exactly
 * (float)(1 / (1 - p)), the rest exactly 0; the same key gives the same mask bit for bit, and
 * another step, site or seed a different one. */
Test(dropout, masks_keep_one_minus_p_and_follow_their_key)
{
    struct env e;
    env_init(&e);
    const int64_t n = 1 << 20;
    float *ones = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) ones[i] = 1.0f;
    ksm_tensor x = dev_from(&e, 1, &n, ones);
    const double ps[3] = {0.1, 0.5, 0.9};
    for (int k = 0; k < 3; k++) {
        struct ksm_dropout d = {.p = ps[k], .seed = 0x9E3779B97F4A7C15ull, .step = 17, .site = 5};
        float *y = run_dropout_host(&e, &x, &d);
        const float scale = (float)(1.0 / (1.0 - ps[k]));
        int64_t kept = 0, bad = 0;
        for (int64_t i = 0; i < n; i++) {
            if (y[i] == scale)
                kept++;
            else if (y[i] != 0.0f)
                bad++;
        }
        cr_expect_eq(bad, 0, "p %g: %lld values neither 0 nor the scale", ps[k], (long long)bad);
        double share = (double)kept / (double)n, sd = sqrt(ps[k] * (1 - ps[k]) / (double)n);
        cr_expect_leq(fabs(share - (1 - ps[k])), 6 * sd, "p %g: kept %.5f", ps[k], share);
        /* the same key again: identical */
        float *y2 = run_dropout_host(&e, &x, &d);
        cr_expect_eq(memcmp(y, y2, sizeof(float) * (size_t)n), 0, "p %g: not deterministic", ps[k]);
        free(y2);
        /* another step, site, seed: about p^2 + (1-p)^2 of the elements agree, not all */
        struct ksm_dropout other[3] = {d, d, d};
        other[0].step++;
        other[1].site++;
        other[2].seed ^= 1ull << 40;
        for (int o = 0; o < 3; o++) {
            float *z = run_dropout_host(&e, &x, &other[o]);
            int64_t same = 0;
            for (int64_t i = 0; i < n; i++) same += (z[i] == 0.0f) == (y[i] == 0.0f);
            double agree = (double)same / (double)n;
            double want = ps[k] * ps[k] + (1 - ps[k]) * (1 - ps[k]);
            cr_expect_leq(fabs(agree - want), 0.01, "p %g, key change %d: agreement %.4f", ps[k], o,
                          agree);
            free(z);
        }
        free(y);
    }
    free(ones);
    env_fini(&e);
}

/* The backward (the same op on dy) zeroes exactly what the forward dropped and scales the rest
 * alike; p 0 is the identity bit for bit. */
Test(dropout, backward_uses_the_forward_mask)
{
    struct env e;
    env_init(&e);
    const int64_t shape[3] = {3, 7, 13}, n = 3 * 7 * 13;
    float xs[3 * 7 * 13], gs[3 * 7 * 13];
    for (int64_t i = 0; i < n; i++) {
        xs[i] = (float)((i * 37) % 23) / 7.0f + 0.25f; /* no zeros */
        gs[i] = (float)((i * 11) % 19) / 5.0f - 1.7f;
    }
    ksm_tensor x = dev_from(&e, 3, shape, xs), dy = dev_from(&e, 3, shape, gs);
    struct ksm_dropout d = {.p = 0.3, .seed = 7, .step = (1ull << 32) + 2, .site = 4};
    float *y = run_dropout_host(&e, &x, &d), *dx = run_dropout_host(&e, &dy, &d);
    const float scale = (float)(1.0 / 0.7);
    int dropped = 0;
    for (int64_t i = 0; i < n; i++) {
        bool kept = y[i] != 0.0f;
        dropped += !kept;
        cr_expect_eq(y[i], kept ? xs[i] * scale : 0.0f);
        cr_expect_eq(dx[i], kept ? gs[i] * scale : 0.0f, "dx[%lld] under another mask",
                     (long long)i);
    }
    cr_expect_gt(dropped, 0);
    cr_expect_lt(dropped, n);
    free(y);
    free(dx);
    d.p = 0.0;
    float *id = run_dropout_host(&e, &x, &d);
    cr_expect_eq(memcmp(id, xs, sizeof xs), 0, "p 0 is not the identity");
    free(id);
    env_fini(&e);
}

/* The row path of the attention (views whose rows an sgemm cannot take: overlapping rows) and
 * the block path draw the same attention-weight mask. */
Test(dropout, sdpa_row_path_matches_block_path)
{
    struct env e;
    env_init(&e);
    const int64_t b = 2, h = 2, t = 9, hd = 8;
    const int64_t big = b * h * t * hd;
    float *buf = malloc(sizeof(float) * (size_t)(big + 8)); /* v reads from buf + 5 */
    for (int64_t i = 0; i < big + 8; i++) buf[i] = (float)((i * 29) % 17) / 8.0f - 1.0f;
    ksm_tensor base = dev_from(&e, 1, &big, buf);
    /* q: rows 3 floats apart (overlapping), k and v contiguous */
    ksm_tensor q = base;
    q.ndim = 4;
    q.shape[0] = b, q.shape[1] = h, q.shape[2] = t, q.shape[3] = hd;
    q.stride[0] = h * t * 3 + hd, q.stride[1] = t * 3 + hd, q.stride[2] = 3, q.stride[3] = 1;
    const int64_t qs[4] = {b, h, t, hd};
    float *qh = malloc(sizeof(float) * (size_t)(b * h * t * hd));
    for (int64_t i0 = 0; i0 < b; i0++)
        for (int64_t i1 = 0; i1 < h; i1++)
            for (int64_t i2 = 0; i2 < t; i2++)
                for (int64_t i3 = 0; i3 < hd; i3++)
                    qh[((i0 * h + i1) * t + i2) * hd + i3] =
                        buf[i0 * q.stride[0] + i1 * q.stride[1] + i2 * 3 + i3];
    ksm_tensor qc = dev_from(&e, 4, qs, qh);
    ksm_tensor k = dev_from(&e, 4, qs, buf), v = dev_from(&e, 4, qs, buf + 5);
    ksm_tensor o1 = dev_empty(&e, 4, qs), o2 = dev_empty(&e, 4, qs);
    struct ksm_dropout d = {.p = 0.4, .seed = 99, .step = 3, .site = 2};
    cr_assert_eq(ksm_op_sdpa_dropout(e.s, &o1, &q, &k, &v, true, 0.0f, &d), 0);
    cr_assert_eq(ksm_op_sdpa_dropout(e.s, &o2, &qc, &k, &v, true, 0.0f, &d), 0);
    float *a = download(&e, &o1), *c = download(&e, &o2);
    double worst = 0;
    for (int64_t i = 0; i < b * h * t * hd; i++) worst = fmax(worst, fabs((double)a[i] - c[i]));
    cr_expect_leq(worst, 1e-5, "row path vs block path: %g", worst);
    /* and dropout changed the result */
    cr_assert_eq(ksm_op_sdpa(e.s, &o1, &qc, &k, &v, true, 0.0f), 0);
    float *z = download(&e, &o1);
    double diff = 0;
    for (int64_t i = 0; i < b * h * t * hd; i++) diff = fmax(diff, fabs((double)z[i] - c[i]));
    cr_expect_gt(diff, 1e-3);
    free(a);
    free(c);
    free(z);
    free(qh);
    free(buf);
    env_fini(&e);
}

Test(dropout, rejects_bad_keys)
{
    struct env e;
    env_init(&e);
    const int64_t shape[2] = {3, 5}, qs[4] = {1, 1, 4, 4};
    ksm_tensor x = dev_empty(&e, 2, shape), y = dev_empty(&e, 2, shape);
    const double bad_p[4] = {1.0, -0.1, NAN, 2.0};
    for (int i = 0; i < 4; i++) {
        struct ksm_dropout d = {.p = bad_p[i]};
        cr_expect_eq(ksm_op_dropout(e.s, &y, &x, &d), KSM_EINVAL, "p %g", bad_p[i]);
    }
    struct ksm_dropout site = {.p = 0.5, .site = 65536};
    cr_expect_eq(ksm_op_dropout(e.s, &y, &x, &site), KSM_EINVAL);
    cr_expect_eq(ksm_op_dropout(e.s, &y, &x, NULL), KSM_EINVAL);
    ksm_tensor q = dev_empty(&e, 4, qs), o = dev_empty(&e, 4, qs);
    struct ksm_dropout one = {.p = 1.0};
    cr_expect_eq(ksm_op_sdpa_dropout(e.s, &o, &q, &q, &q, true, 0.0f, &one), KSM_EINVAL);
    ksm_tensor dq = dev_empty(&e, 4, qs), dk = dev_empty(&e, 4, qs), dv = dev_empty(&e, 4, qs);
    cr_expect_eq(
        ksm_op_sdpa_dropout_backward(e.s, &dq, &dk, &dv, &o, &q, &q, &q, true, 0.0f, &site),
        KSM_EINVAL);
    expect_untouched(&e, &y, "y");
    expect_untouched(&e, &o, "o");
    expect_untouched(&e, &dq, "dq");
    env_fini(&e);
}
