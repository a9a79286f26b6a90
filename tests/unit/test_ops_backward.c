/*
 * Backward ops (include/kasmina/ops_backward.h, daemon/nn/ops_backward.c,
 * daemon/backend/cpu/cpu_backward.c).
 *
 * backward_golden: every case of tests/golden/backward_*.safetensors (PyTorch autograd, made by
 * tests/golden/gen_backward.py) runs through the public wrappers on a CPU-backend stream; each
 * expected gradient "ref_<name>" is compared with max|out - ref| / max|ref| <= 1e-5 (NaN where
 * the reference has NaN). Each output prints "backward_golden <case>.<name>: rel <err>".
 *
 * backward: hand-written properties (NaN rules, in place, all rows ignored, thread count
 * independence) and the argument checks: a rejected call returns its code and writes nothing.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_pool.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops_backward.h"
#include "kasmina/safetensors.h"
#include "kasmina/tensor.h"
#include "kt.h"
#include "nn/kmath.h"
#include "nn/op.h"

#define GOLDEN_TOL 1e-5

/* ---- A CPU device, device buffers, uploads (as in test_ops.c) ---- */

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

/* A contiguous device tensor filled with 0xff bytes (NaN for floats): an element a kernel
 * forgets to write, or a rejected call that wrote anyway, shows up. */
static ksm_tensor dev_empty(struct env *e, enum ksm_dtype dt, int ndim, const int64_t *shape)
{
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, e->dev, NULL, dt, ndim, shape), 0);
    size_t n = ksm_tensor_nbytes(&t);
    void *p = NULL;
    cr_assert_lt(e->n_bufs, MAX_BUFS);
    cr_assert_eq(ksm_device_malloc(e->dev, n > 0 ? n : 1, &p), 0);
    e->bufs[e->n_bufs++] = p;
    t.data = p;
    cr_assert_eq(ksm_stream_memset_async(e->s, t.data, 0xff, n), 0);
    return t;
}

static ksm_tensor dev_upload_raw(struct env *e, enum ksm_dtype dt, int ndim, const int64_t *shape,
                                 const void *host)
{
    ksm_tensor t = dev_empty(e, dt, ndim, shape);
    size_t n = ksm_tensor_nbytes(&t);
    if (n > 0) cr_assert_eq(ksm_stream_memcpy_async(e->s, t.data, host, n, KSM_COPY_H2D), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return t;
}

static ksm_tensor dev_f32(struct env *e, int ndim, const int64_t *shape, const float *host)
{
    return dev_upload_raw(e, KSM_DTYPE_F32, ndim, shape, host);
}

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

/* Every byte of t is still 0xff (nothing was written). */
static void expect_untouched(struct env *e, const ksm_tensor *t, const char *what)
{
    unsigned char *h = download(e, t);
    size_t n = ksm_tensor_nbytes(t), bad = 0;
    for (size_t i = 0; i < n; i++) bad += h[i] != 0xff;
    cr_expect_eq(bad, 0, "%s: %zu bytes written by a rejected call", what, bad);
    free(h);
}

/* ---- Golden cases ---- */

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
    return dev_upload_raw(e, t->dtype, t->ndim, t->shape, t->data);
}

/* An output shaped like ref_<role>, or absent (*present false) when the case has none. */
static ksm_tensor out_for(struct env *e, ksm_st_file *f, const char *cs, const char *role,
                          bool *present)
{
    char name[64];
    snprintf(name, sizeof name, "ref_%s", role);
    const struct ksm_st_tensor *t = maybe(f, cs, name);
    ksm_tensor d;
    memset(&d, 0, sizeof d);
    *present = t != NULL;
    if (t) d = dev_empty(e, t->dtype, t->ndim, t->shape);
    return d;
}

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

static void check(struct env *e, ksm_st_file *f, const char *cs, const char *role,
                  const ksm_tensor *out)
{
    char name[64];
    snprintf(name, sizeof name, "ref_%s", role);
    const struct ksm_st_tensor *ref = need(f, cs, name);
    cr_assert_eq(ksm_tensor_nbytes(out), ref->nbytes, "%s.%s: size", cs, role);
    float *got = download(e, out), *want = kt_golden_floats(ref);
    char what[160];
    snprintf(what, sizeof what, "%s.%s", cs, role);
    double rel = kt_golden_expect_f32(what, got, want, ksm_tensor_numel(out), GOLDEN_TOL);
    fprintf(stderr, "backward_golden %s: rel %.1e\n", what, rel);
    free(got);
    free(want);
}

static void run_case(struct env *e, ksm_st_file *f, const char *cs, const char *op,
                     const char *desc)
{
    char buf[64];
    int rc = KSM_EINTERNAL;
    bool h0, h1, h2;
    if (strcmp(op, "unary_backward") == 0) {
        cr_assert_not_null(param(desc, "fn", buf, sizeof buf));
        ksm_tensor x = up(e, f, cs, "x"), y = up(e, f, cs, "y"), dy = up(e, f, cs, "dy");
        ksm_tensor dx = out_for(e, f, cs, "dx", &h0);
        if (strcmp(buf, "relu") == 0)
            rc = ksm_op_relu_backward(e->s, &dx, &dy, &x);
        else if (strcmp(buf, "gelu") == 0)
            rc = ksm_op_gelu_backward(e->s, &dx, &dy, &x);
        else if (strcmp(buf, "clamp01") == 0)
            rc = ksm_op_clamp01_backward(e->s, &dx, &dy, &x);
        else if (strcmp(buf, "sigmoid") == 0)
            rc = ksm_op_sigmoid_backward(e->s, &dx, &dy, &y);
        else if (strcmp(buf, "tanh") == 0)
            rc = ksm_op_tanh_backward(e->s, &dx, &dy, &y);
        else
            cr_assert_fail("unknown fn %s", buf);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "dx", &dx);
    } else if (strcmp(op, "mul_backward") == 0) {
        ksm_tensor a = up(e, f, cs, "a"), b = up(e, f, cs, "b"), dy = up(e, f, cs, "dy");
        ksm_tensor da = out_for(e, f, cs, "da", &h0), db = out_for(e, f, cs, "db", &h1);
        rc = ksm_op_mul_backward(e->s, &da, &db, &dy, &a, &b);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "da", &da);
        check(e, f, cs, "db", &db);
    } else if (strcmp(op, "add_backward") == 0) {
        ksm_tensor a = up(e, f, cs, "a"), b = up(e, f, cs, "b"), dy = up(e, f, cs, "dy");
        ksm_tensor da = out_for(e, f, cs, "da", &h0), db = out_for(e, f, cs, "db", &h1);
        rc = ksm_op_add_backward(e->s, &da, &db, &dy, &a, &b);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "da", &da);
        check(e, f, cs, "db", &db);
    } else if (strcmp(op, "lerp_backward") == 0) {
        ksm_tensor a = up(e, f, cs, "a"), b = up(e, f, cs, "b"), w = up(e, f, cs, "w");
        ksm_tensor dy = up(e, f, cs, "dy");
        ksm_tensor da = out_for(e, f, cs, "da", &h0), db = out_for(e, f, cs, "db", &h1);
        ksm_tensor dw = out_for(e, f, cs, "dw", &h2);
        rc = ksm_op_lerp_backward(e->s, &da, &db, &dw, &dy, &a, &b, &w);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "da", &da);
        check(e, f, cs, "db", &db);
        check(e, f, cs, "dw", &dw);
    } else if (strcmp(op, "linear_backward") == 0) {
        ksm_tensor x = up(e, f, cs, "x"), w = up(e, f, cs, "w"), dy = up(e, f, cs, "dy");
        ksm_tensor dx = out_for(e, f, cs, "dx", &h0), dw = out_for(e, f, cs, "dw", &h1);
        ksm_tensor db = out_for(e, f, cs, "db", &h2);
        rc = ksm_op_linear_backward(e->s, &dx, &dw, h2 ? &db : NULL, &dy, &x, &w);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "dx", &dx);
        check(e, f, cs, "dw", &dw);
        if (h2) check(e, f, cs, "db", &db);
    } else if (strcmp(op, "mean_backward") == 0) {
        ksm_tensor dy = up(e, f, cs, "dy"), dx = out_for(e, f, cs, "dx", &h0);
        rc = ksm_op_mean_backward(e->s, &dx, &dy, (int)param_num(desc, "begin"),
                                  (int)param_num(desc, "end"));
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "dx", &dx);
    } else if (strcmp(op, "maxpool2_backward") == 0) {
        ksm_tensor x = up(e, f, cs, "x"), dy = up(e, f, cs, "dy");
        ksm_tensor dx = out_for(e, f, cs, "dx", &h0);
        rc = ksm_op_maxpool2_backward(e->s, &dx, &dy, &x);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "dx", &dx);
    } else if (strcmp(op, "embedding_backward") == 0) {
        ksm_tensor idx = up(e, f, cs, "idx"), dy = up(e, f, cs, "dy");
        ksm_tensor dw = out_for(e, f, cs, "dw", &h0);
        rc = ksm_op_embedding_backward(e->s, &dw, &dy, &idx);
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "dw", &dw);
    } else if (strcmp(op, "cross_entropy_backward") == 0) {
        ksm_tensor x = up(e, f, cs, "x"), lab = up(e, f, cs, "labels");
        ksm_tensor dx = out_for(e, f, cs, "dx", &h0);
        rc = ksm_op_cross_entropy_backward(e->s, &dx, &x, &lab,
                                           (int64_t)param_num(desc, "ignore_index"),
                                           (float)param_num(desc, "dloss"));
        cr_assert_eq(rc, 0, "%s: %s", cs, ksm_err_name(rc));
        check(e, f, cs, "dx", &dx);
    } else {
        cr_assert_fail("%s: unknown op %s", cs, op);
    }
}

static const char *const GOLDEN_FILES[] = {"backward_elem.safetensors", "backward_misc.safetensors",
                                           NULL};

TestSuite(backward_golden, .timeout = 120);

ParameterizedTestParameters(backward_golden, matches_autograd)
{
    return kt_golden_cases(GOLDEN_FILES);
}

ParameterizedTest(struct kt_golden_case *c, backward_golden, matches_autograd)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open(c->file);
    const char *desc = ksm_st_metadata(f, c->name);
    cr_assert_not_null(desc, "%s: case %s has no description", c->file, c->name);
    run_case(&e, f, c->name, c->op, desc);
    ksm_st_close(f);
    env_fini(&e);
}

Test(backward_golden, every_op_has_its_cases)
{
    static const struct {
        const char *file, *op;
        int min;
    } want[] = {
        {"backward_elem.safetensors", "unary_backward", 15},
        {"backward_elem.safetensors", "mul_backward", 4},
        {"backward_elem.safetensors", "lerp_backward", 4},
        {"backward_misc.safetensors", "linear_backward", 4},
        {"backward_misc.safetensors", "mean_backward", 4},
        {"backward_misc.safetensors", "maxpool2_backward", 3},
        {"backward_misc.safetensors", "embedding_backward", 3},
        {"backward_misc.safetensors", "cross_entropy_backward", 4},
        {"backward_misc.safetensors", "add_backward", 4},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const char *files[] = {want[i].file, NULL};
        int n = kt_golden_count(files, want[i].op);
        cr_expect_geq(n, want[i].min, "%s: only %d %s cases", want[i].file, n, want[i].op);
    }
}

/* ---- Properties ---- */

TestSuite(backward, .timeout = 60);

Test(backward, op_names)
{
    cr_expect_str_eq(ksm_op_name(KSM_OP_UNARY_BACKWARD), "unary_backward");
    cr_expect_str_eq(ksm_op_name(KSM_OP_BROADCAST_GRAD), "broadcast_grad");
    cr_expect_str_eq(ksm_op_name(KSM_OP_SUM_ROWS), "sum_rows");
    cr_expect_str_eq(ksm_op_name(KSM_OP_MEAN_BACKWARD), "mean_backward");
    cr_expect_str_eq(ksm_op_name(KSM_OP_MAXPOOL2_BACKWARD), "maxpool2_backward");
    cr_expect_str_eq(ksm_op_name(KSM_OP_EMBEDDING_BACKWARD), "embedding_backward");
    cr_expect_str_eq(ksm_op_name(KSM_OP_CROSS_ENTROPY_BACKWARD), "cross_entropy_backward");
}

/* NaN rules, element by element, as PyTorch: relu passes dy for a NaN input, clamp gives 0,
 * and a NaN dy propagates wherever the gradient passes. */
Test(backward, nan_rules)
{
    struct env e;
    env_init(&e);
    const int64_t sh[1] = {5};
    const float x[5] = {NAN, 0.0f, 1.0f, 2.0f, 0.5f};
    const float g[5] = {3.0f, 4.0f, 5.0f, 6.0f, NAN};
    ksm_tensor tx = dev_f32(&e, 1, sh, x), tg = dev_f32(&e, 1, sh, g);
    ksm_tensor dr = dev_empty(&e, KSM_DTYPE_F32, 1, sh), dc = dev_empty(&e, KSM_DTYPE_F32, 1, sh);
    cr_assert_eq(ksm_op_relu_backward(e.s, &dr, &tg, &tx), 0);
    cr_assert_eq(ksm_op_clamp01_backward(e.s, &dc, &tg, &tx), 0);
    float *r = download(&e, &dr), *c = download(&e, &dc);
    cr_expect_eq(r[0], 3.0f);
    cr_expect_eq(r[1], 0.0f);
    cr_expect_eq(r[2], 5.0f);
    cr_expect_eq(r[3], 6.0f);
    cr_expect(isnan(r[4]));
    cr_expect_eq(c[0], 0.0f);
    cr_expect_eq(c[1], 4.0f); /* the bounds are inside */
    cr_expect_eq(c[2], 5.0f);
    cr_expect_eq(c[3], 0.0f);
    cr_expect(isnan(c[4]));
    free(r);
    free(c);
    env_fini(&e);
}

Test(backward, in_place_dx_is_dy)
{
    struct env e;
    env_init(&e);
    const int64_t sh[2] = {3, 7};
    float x[21], g[21];
    for (int i = 0; i < 21; i++) {
        x[i] = (float)(i - 10) * 0.3f;
        g[i] = 1.0f + (float)i;
    }
    ksm_tensor tx = dev_f32(&e, 2, sh, x), tg = dev_f32(&e, 2, sh, g);
    cr_assert_eq(ksm_op_gelu_backward(e.s, &tg, &tg, &tx), 0);
    float *got = download(&e, &tg);
    for (int i = 0; i < 21; i++) cr_expect_eq(got[i], ksm_gelu_grad(g[i], x[i]), "element %d", i);
    free(got);
    env_fini(&e);
}

/* Every label ignored: PyTorch's gradient is all zeros (nothing to divide). */
Test(backward, cross_entropy_all_ignored)
{
    struct env e;
    env_init(&e);
    const int64_t sh[2] = {2, 3}, ln[1] = {2};
    const float x[6] = {1, 2, 3, 4, 5, 6};
    const int64_t lab[2] = {-100, -100};
    ksm_tensor tx = dev_f32(&e, 2, sh, x), tl = dev_upload_raw(&e, KSM_DTYPE_I64, 1, ln, lab);
    ksm_tensor dx = dev_empty(&e, KSM_DTYPE_F32, 2, sh);
    cr_assert_eq(ksm_op_cross_entropy_backward(e.s, &dx, &tx, &tl, -100, 1.0f), 0);
    float *got = download(&e, &dx);
    for (int i = 0; i < 6; i++) cr_expect_eq(got[i], 0.0f);
    free(got);
    env_fini(&e);
}

/* No rows: the weight and bias gradients are zeros (empty sums), dx is empty. */
Test(backward, linear_no_rows)
{
    struct env e;
    env_init(&e);
    const int64_t sx[2] = {0, 5}, sw[2] = {3, 5}, sy[2] = {0, 3}, sb[1] = {3};
    const float w[15] = {0};
    ksm_tensor tx = dev_empty(&e, KSM_DTYPE_F32, 2, sx), tw = dev_f32(&e, 2, sw, w);
    ksm_tensor tdy = dev_empty(&e, KSM_DTYPE_F32, 2, sy), dx = dev_empty(&e, KSM_DTYPE_F32, 2, sx);
    ksm_tensor dw = dev_empty(&e, KSM_DTYPE_F32, 2, sw), db = dev_empty(&e, KSM_DTYPE_F32, 1, sb);
    cr_assert_eq(ksm_op_linear_backward(e.s, &dx, &dw, &db, &tdy, &tx, &tw), 0);
    float *gw = download(&e, &dw), *gb = download(&e, &db);
    for (int i = 0; i < 15; i++) cr_expect_eq(gw[i], 0.0f, "dw[%d]", i);
    for (int i = 0; i < 3; i++) cr_expect_eq(gb[i], 0.0f, "db[%d]", i);
    free(gw);
    free(gb);
    env_fini(&e);
}

/* The broadcast reductions and the bias sums do not depend on the number of threads. */
Test(backward, thread_count_independent)
{
    struct env e;
    env_init(&e);
    const int64_t sa[3] = {64, 1, 300}, sb[2] = {50, 1}, sy[3] = {64, 50, 300};
    const int64_t n = 64 * 50 * 300;
    float *a = malloc(64 * 300 * sizeof(float)), *b = malloc(50 * sizeof(float));
    float *g = malloc((size_t)n * sizeof(float));
    cr_assert(a && b && g);
    uint64_t st = 12345;
    for (int64_t i = 0; i < n; i++) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        g[i] = (float)((double)(st >> 11) / 9007199254740992.0 - 0.5);
        if (i < 64 * 300) a[i] = g[i] * 3.0f;
        if (i < 50) b[i] = g[i] * 5.0f;
    }
    ksm_tensor ta = dev_f32(&e, 3, sa, a), tb = dev_f32(&e, 2, sb, b), tg = dev_f32(&e, 3, sy, g);
    float *got[2][2];
    int old = ksm_cpu_pool_set_max_threads(1);
    for (int run = 0; run < 2; run++) {
        if (run == 1) ksm_cpu_pool_set_max_threads(old);
        ksm_tensor da = dev_empty(&e, KSM_DTYPE_F32, 3, sa),
                   db = dev_empty(&e, KSM_DTYPE_F32, 2, sb);
        cr_assert_eq(ksm_op_mul_backward(e.s, &da, &db, &tg, &ta, &tb), 0);
        got[run][0] = download(&e, &da);
        got[run][1] = download(&e, &db);
    }
    cr_expect_eq(memcmp(got[0][0], got[1][0], 64 * 300 * sizeof(float)), 0);
    cr_expect_eq(memcmp(got[0][1], got[1][1], 50 * sizeof(float)), 0);
    for (int r = 0; r < 2; r++)
        for (int k = 0; k < 2; k++) free(got[r][k]);
    free(a);
    free(b);
    free(g);
    env_fini(&e);
}

/* ---- Argument checks: the code, and nothing written ---- */

Test(backward, rejects_bad_shapes_and_dtypes)
{
    struct env e;
    env_init(&e);
    const int64_t s37[2] = {3, 7}, s73[2] = {7, 3}, s7[1] = {7}, s4[1] = {4}, s3[1] = {3};
    static const float buf[160] = {0};
    ksm_tensor x = dev_f32(&e, 2, s37, buf), g = dev_f32(&e, 2, s37, buf);
    ksm_tensor bad = dev_f32(&e, 2, s73, buf);
    ksm_tensor dx = dev_empty(&e, KSM_DTYPE_F32, 2, s37);
    ksm_tensor ix = dev_empty(&e, KSM_DTYPE_I64, 2, s37);

    /* elementwise */
    cr_expect_eq(ksm_op_relu_backward(e.s, &dx, &g, &bad), KSM_ESHAPE);
    cr_expect_eq(ksm_op_tanh_backward(e.s, &dx, &bad, &x), KSM_ESHAPE);
    cr_expect_eq(ksm_op_gelu_backward(e.s, &dx, &g, &ix), KSM_EDTYPE);
    cr_expect_eq(ksm_op_sigmoid_backward(e.s, &ix, &g, &x), KSM_EDTYPE);
    cr_expect_eq(ksm_op_relu_backward(NULL, &dx, &g, &x), KSM_EINVAL);
    cr_expect_eq(ksm_op_relu_backward(e.s, &dx, &g, &dx), KSM_EINVAL); /* dx is x */

    /* mul / lerp: one bad output stops both */
    ksm_tensor a = dev_f32(&e, 2, s37, buf), b7 = dev_f32(&e, 1, s7, buf);
    ksm_tensor b4 = dev_f32(&e, 1, s4, buf);
    ksm_tensor da = dev_empty(&e, KSM_DTYPE_F32, 2, s37), db = dev_empty(&e, KSM_DTYPE_F32, 1, s7);
    ksm_tensor db_bad = dev_empty(&e, KSM_DTYPE_F32, 1, s3);
    cr_expect_eq(ksm_op_mul_backward(e.s, &da, &db_bad, &g, &a, &b7), KSM_ESHAPE);
    cr_expect_eq(ksm_op_mul_backward(e.s, &da, &db, &g, &a, &b4), KSM_ESHAPE);
    cr_expect_eq(ksm_op_mul_backward(e.s, &da, &db, &bad, &a, &b7), KSM_ESHAPE);
    cr_expect_eq(ksm_op_lerp_backward(e.s, &da, &db, &db_bad, &g, &a, &b7, &b7), KSM_ESHAPE);
    cr_expect_eq(ksm_op_lerp_backward(e.s, &da, NULL, NULL, &g, &a, &b7, &ix), KSM_EDTYPE);

    /* linear: x [3,7], w [4,7] -> dy [3,4] */
    const int64_t s47[2] = {4, 7}, s34[2] = {3, 4};
    ksm_tensor w = dev_f32(&e, 2, s47, buf), dy = dev_f32(&e, 2, s34, buf);
    ksm_tensor dw = dev_empty(&e, KSM_DTYPE_F32, 2, s47),
               dbias = dev_empty(&e, KSM_DTYPE_F32, 1, s3);
    cr_expect_eq(ksm_op_linear_backward(e.s, &dx, &dw, &dbias, &dy, &x, &w), KSM_ESHAPE);
    cr_expect_eq(ksm_op_linear_backward(e.s, &dx, &dw, NULL, &g, &x, &w), KSM_ESHAPE);
    cr_expect_eq(ksm_op_linear_backward(e.s, &ix, &dw, NULL, &dy, &x, &w), KSM_EDTYPE);

    /* mean, maxpool, embedding, cross-entropy */
    cr_expect_eq(ksm_op_mean_backward(e.s, &dx, &b4, 1, 2), KSM_ESHAPE);
    cr_expect_eq(ksm_op_mean_backward(e.s, &dx, &b4, 1, 3), KSM_EINVAL);
    const int64_t s1377[4] = {1, 3, 7, 7}, s1333[4] = {1, 3, 3, 4};
    ksm_tensor px = dev_f32(&e, 4, s1377, buf);
    ksm_tensor pg = dev_f32(&e, 4, s1333, buf);
    ksm_tensor pdx = dev_empty(&e, KSM_DTYPE_F32, 4, s1377);
    cr_expect_eq(ksm_op_maxpool2_backward(e.s, &pdx, &pg, &px), KSM_ESHAPE);
    ksm_tensor fidx = dev_f32(&e, 1, s3, buf);
    cr_expect_eq(ksm_op_embedding_backward(e.s, &dw, &dx, &fidx), KSM_EDTYPE);
    ksm_tensor idx4 = dev_empty(&e, KSM_DTYPE_I64, 1, s4);
    cr_expect_eq(ksm_op_embedding_backward(e.s, &dw, &dx, &idx4), KSM_ESHAPE);
    ksm_tensor lab3 = dev_empty(&e, KSM_DTYPE_I64, 1, s3),
               lab4 = dev_empty(&e, KSM_DTYPE_I64, 1, s4);
    ksm_tensor lab32 = dev_empty(&e, KSM_DTYPE_I32, 1, s3);
    cr_expect_eq(ksm_op_cross_entropy_backward(e.s, &dx, &x, &lab4, -100, 1.0f), KSM_ESHAPE);
    cr_expect_eq(ksm_op_cross_entropy_backward(e.s, &dx, &x, &lab32, -100, 1.0f), KSM_EDTYPE);
    cr_expect_eq(ksm_op_cross_entropy_backward(e.s, &dx, &x, &lab3, -100, NAN), KSM_EINVAL);
    cr_expect_eq(ksm_op_cross_entropy_backward(e.s, &bad, &x, &lab3, -100, 1.0f), KSM_ESHAPE);

    expect_untouched(&e, &dx, "dx");
    expect_untouched(&e, &da, "da");
    expect_untouched(&e, &db, "db");
    expect_untouched(&e, &db_bad, "db_bad");
    expect_untouched(&e, &dw, "dw");
    expect_untouched(&e, &dbias, "dbias");
    expect_untouched(&e, &pdx, "pdx");
    expect_untouched(&e, &ix, "ix");
    env_fini(&e);
}
