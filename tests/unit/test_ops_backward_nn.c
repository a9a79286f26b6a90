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

static const char *const GOLDEN_FILES[] = {"backward_nn_norm.safetensors",
                                           "backward_nn_conv.safetensors",
                                           "backward_nn_attn.safetensors", NULL};

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
    else
        cr_assert_fail("%s: unknown op %s", c->name, c->op);
    ksm_st_close(f);
    env_fini(&e);
}

Test(backward_nn_golden, every_op_has_its_cases)
{
    static const char *const ops[] = {"batchnorm_train", "groupnorm_backward", "layernorm_backward",
                                      "conv2d_backward", "sdpa_backward"};
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
