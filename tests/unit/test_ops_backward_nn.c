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
