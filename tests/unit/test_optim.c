/*
 * The optimizer (daemon/kasmina/optim.c, include/kasmina/ops_optim.h) on a CPU-backend stream.
 *
 * optim_golden: every case of the committed fixtures tests/golden/optim_*.safetensors (made by
 * tests/golden/gen_optim.py from torch 1.13): torch.optim.SGD over 5 steps (parameters and
 * momentum buffers after each step within 1e-6 relative; no buffer where torch has none),
 * clip_grad_norm_ (total within 1e-6 of torch's float32 total, scaled gradients within 1e-6),
 * and the gradient statistics / ratio EMA within 1e-12 of the float64 reference (non-finite
 * values equal). Each case prints "optim_golden <case>: rel <err>" to stderr.
 *
 * optim: hand-written properties (validation, thread-count independence of the sums, reset).
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_pool.h"
#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/ops_optim.h"
#include "kasmina/optim.h"
#include "kasmina/safetensors.h"
#include "kasmina/tensor.h"
#include "kt.h"

#define SGD_TOL   1e-6
#define STATS_TOL 1e-12
#define MAX_T     64

/* ---- A CPU device with an allocator ---- */

struct env {
    ksm_backend *cpu;
    ksm_device *dev;
    ksm_stream *s;
    ksm_allocator *a;
    void *bufs[MAX_T];
    int n_bufs;
};

static void env_init(struct env *e)
{
    memset(e, 0, sizeof *e);
    cr_assert_eq(ksm_cpu_backend_new(1, &e->cpu), 0);
    e->dev = ksm_backend_device(e->cpu, 0);
    cr_assert_eq(ksm_stream_new(e->dev, &e->s), 0);
    cr_assert_eq(ksm_allocator_new(e->dev, NULL, &e->a), 0);
}

static void env_fini(struct env *e)
{
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    for (int i = 0; i < e->n_bufs; i++) ksm_alloc_free(e->a, e->bufs[i]);
    ksm_allocator_destroy(e->a);
    ksm_stream_free(e->s);
    ksm_backend_free(e->cpu);
}

static ksm_tensor upload(struct env *e, const struct ksm_st_tensor *st)
{
    ksm_tensor t;
    void *d = NULL;
    cr_assert_lt(e->n_bufs, MAX_T);
    cr_assert_eq(ksm_alloc_malloc(e->a, st->nbytes ? st->nbytes : 1, e->s, &d), 0);
    e->bufs[e->n_bufs++] = d;
    cr_assert_eq(ksm_tensor_init(&t, e->dev, d, st->dtype, st->ndim, st->shape), 0);
    if (st->nbytes)
        cr_assert_eq(ksm_stream_memcpy_async(e->s, d, st->data, st->nbytes, KSM_COPY_H2D), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return t;
}

static float *download(struct env *e, const ksm_tensor *t)
{
    size_t n = ksm_tensor_nbytes(t);
    float *h = malloc(n ? n : 1);
    cr_assert_not_null(h);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    if (n) cr_assert_eq(ksm_stream_memcpy_async(e->s, h, t->data, n, KSM_COPY_D2H), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return h;
}

/* ---- Fixture access ---- */

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

/* The value of key in "op=sgd lr=0.01 ..." (asserted present). */
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
    cr_assert_fail("parameter %s missing in '%s'", key, desc);
    return NULL;
}

static double num(const char *desc, const char *key)
{
    char buf[512];
    return strtod(param(desc, key, buf, sizeof buf), NULL); /* "nan", "inf" parse too */
}

/* |got - want| <= tol * max(|want|, 1e-300), non-finite values equal (NaN matches NaN). */
static double expect_close(const char *what, double got, double want, double tol)
{
    if (!isfinite(want) || !isfinite(got)) {
        bool same = (isnan(want) && isnan(got)) || got == want;
        cr_expect(same, "%s: got %.17g want %.17g", what, got, want);
        return same ? 0.0 : INFINITY;
    }
    double d = fabs(got - want), m = fabs(want);
    double rel = m > 0.0 ? d / m : d;
    cr_expect(rel <= tol, "%s: got %.17g want %.17g (rel %.2e)", what, got, want, rel);
    return rel;
}

/* ---- Cases ---- */

#define MAX_P 8

static double run_sgd(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    struct ksm_sgd_config cfg = {
        .lr = num(desc, "lr"),
        .momentum = num(desc, "momentum"),
        .dampening = num(desc, "dampening"),
        .weight_decay = num(desc, "weight_decay"),
        .nesterov = num(desc, "nesterov") != 0.0,
    };
    int np = (int)num(desc, "params"), steps = (int)num(desc, "steps");
    cr_assert(np > 0 && np <= MAX_P);
    ksm_tensor p[MAX_P];
    char role[64];
    for (int k = 0; k < np; k++) {
        snprintf(role, sizeof role, "p%d", k);
        p[k] = upload(e, need(f, cs, role));
    }
    struct ksm_sgd o;
    cr_assert_eq(ksm_sgd_init(&o, &cfg, e->a, np), 0);
    double worst = 0.0;
    for (int t = 0; t < steps; t++) {
        struct ksm_sgd_pair pairs[MAX_P];
        ksm_tensor g[MAX_P];
        for (int k = 0; k < np; k++) {
            snprintf(role, sizeof role, "s%d.g%d", t, k);
            const struct ksm_st_tensor *gt = maybe(f, cs, role);
            pairs[k].param = &p[k];
            pairs[k].grad = NULL;
            if (gt) {
                g[k] = upload(e, gt);
                pairs[k].grad = &g[k];
            }
        }
        cr_assert_eq(ksm_sgd_step(&o, e->s, pairs, np), 0, "%s: step %d", cs, t);
        for (int k = 0; k < np; k++) {
            char what[256];
            snprintf(role, sizeof role, "s%d.p%d", t, k);
            const struct ksm_st_tensor *ref = need(f, cs, role);
            float *got = download(e, &p[k]), *want = kt_golden_floats(ref);
            snprintf(what, sizeof what, "%s %s", cs, role);
            double r = kt_golden_expect_f32(what, got, want, ksm_tensor_numel(&p[k]), SGD_TOL);
            worst = r > worst ? r : worst;
            free(got);
            free(want);
            snprintf(role, sizeof role, "s%d.b%d", t, k);
            ref = maybe(f, cs, role);
            cr_expect_eq(ref != NULL, o.buf[k].data != NULL, "%s %s: buffer %s", cs, role,
                         ref ? "missing" : "created without a gradient");
            if (ref && o.buf[k].data) {
                got = download(e, &o.buf[k]);
                want = kt_golden_floats(ref);
                snprintf(what, sizeof what, "%s %s", cs, role);
                r = kt_golden_expect_f32(what, got, want, ksm_tensor_numel(&p[k]), SGD_TOL);
                worst = r > worst ? r : worst;
                free(got);
                free(want);
            }
        }
        /* the step's gradients are no longer needed: give their memory back */
        cr_assert_eq(ksm_stream_synchronize(e->s), 0);
        for (int k = np - 1; k >= 0; k--)
            if (pairs[k].grad) ksm_alloc_free(e->a, e->bufs[--e->n_bufs]);
    }
    ksm_sgd_destroy(&o, &e->s, 1);
    return worst;
}

static double run_clip(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    int n = (int)num(desc, "n");
    cr_assert(n > 0 && n <= MAX_P);
    ksm_tensor g[MAX_P], *gp[MAX_P];
    char role[32];
    for (int k = 0; k < n; k++) {
        snprintf(role, sizeof role, "g%d", k);
        const struct ksm_st_tensor *t = maybe(f, cs, role);
        gp[k] = NULL;
        if (t) {
            g[k] = upload(e, t);
            gp[k] = &g[k];
        }
    }
    double total = -1.0;
    cr_assert_eq(ksm_clip_grad_norm(e->s, e->a, gp, n, NULL, num(desc, "max_norm"), &total), 0);
    float *want_total = kt_golden_floats(need(f, cs, "total"));
    char what[256];
    snprintf(what, sizeof what, "%s total", cs);
    double worst = expect_close(what, total, want_total[0], SGD_TOL);
    free(want_total);
    for (int k = 0; k < n; k++) {
        if (!gp[k]) continue;
        snprintf(role, sizeof role, "out%d", k);
        float *got = download(e, gp[k]), *want = kt_golden_floats(need(f, cs, role));
        snprintf(what, sizeof what, "%s %s", cs, role);
        double r = kt_golden_expect_f32(what, got, want, ksm_tensor_numel(gp[k]), SGD_TOL);
        worst = r > worst ? r : worst;
        free(got);
        free(want);
    }
    return worst;
}

static double run_stats(struct env *e, ksm_st_file *f, const char *cs, const char *desc)
{
    int nh = (int)num(desc, "nh"), ns = (int)num(desc, "ns");
    cr_assert(nh >= 0 && nh <= MAX_P && ns >= 0 && ns <= MAX_P);
    ksm_tensor h[MAX_P], s[MAX_P];
    const ksm_tensor *hp[MAX_P], *sp[MAX_P];
    char role[32];
    for (int k = 0; k < nh; k++) {
        snprintf(role, sizeof role, "h%d", k);
        const struct ksm_st_tensor *t = maybe(f, cs, role);
        hp[k] = t ? (h[k] = upload(e, t), &h[k]) : NULL;
    }
    for (int k = 0; k < ns; k++) {
        snprintf(role, sizeof role, "s%d", k);
        const struct ksm_st_tensor *t = maybe(f, cs, role);
        sp[k] = t ? (s[k] = upload(e, t), &s[k]) : NULL;
    }
    struct ksm_grad_sq hq[MAX_P], sq[MAX_P];
    cr_assert_eq(ksm_grad_sumsq(e->s, e->a, hp, nh, hq), 0);
    cr_assert_eq(ksm_grad_sumsq(e->s, e->a, sp, ns, sq), 0);
    double host_norm;
    uint64_t host_count;
    ksm_grad_group_norm(hq, nh, &host_norm, &host_count);
    struct ksm_grad_thresholds th = {num(desc, "vth"), num(desc, "eth")};
    struct ksm_seed_grad_stats st;
    ksm_grad_seed_stats(sq, ns, host_norm, host_count, &th, &st);
    char what[256];
    double worst = 0.0, r;
#define CLOSE(field, got, key)                                                                     \
    do {                                                                                           \
        snprintf(what, sizeof what, "%s %s", cs, field);                                           \
        r = expect_close(what, got, num(desc, key), STATS_TOL);                                    \
        worst = r > worst ? r : worst;                                                             \
    } while (0)
    CLOSE("host_grad_norm", host_norm, "host_norm");
    CLOSE("grad_norm", st.grad_norm, "grad_norm");
    CLOSE("normalized_ratio", st.normalized_ratio, "ratio");
    CLOSE("gradient_health", st.gradient_health, "health");
#undef CLOSE
    cr_expect_eq(host_count, (uint64_t)num(desc, "host_count"), "%s host_param_count", cs);
    cr_expect_eq(st.param_count, (uint64_t)num(desc, "param_count"), "%s param_count", cs);
    cr_expect_eq(st.has_vanishing, num(desc, "vanishing") != 0.0, "%s has_vanishing", cs);
    cr_expect_eq(st.has_exploding, num(desc, "exploding") != 0.0, "%s has_exploding", cs);
    return worst;
}

static double run_ema(const char *cs, const char *desc)
{
    char rb[512], eb[512], what[256];
    double beta = num(desc, "beta"), ema = 0.0, worst = 0.0;
    param(desc, "r", rb, sizeof rb);
    param(desc, "ema", eb, sizeof eb);
    char *rp = rb, *ep = eb;
    for (int i = 0; *rp; i++) {
        double r = strtod(rp, &rp), want = strtod(ep, &ep);
        ema = ksm_grad_ema_fold(i > 0, ema, r, beta);
        snprintf(what, sizeof what, "%s [%d]", cs, i);
        double d = expect_close(what, ema, want, STATS_TOL);
        worst = d > worst ? d : worst;
        if (*rp == ',') rp++;
        if (*ep == ',') ep++;
    }
    return worst;
}

static const char *const GOLDEN_FILES[] = {"optim_sgd.safetensors", "optim_clip.safetensors",
                                           "optim_stats.safetensors", NULL};

TestSuite(optim_golden, .timeout = 60);

ParameterizedTestParameters(optim_golden, matches_pytorch) { return kt_golden_cases(GOLDEN_FILES); }

ParameterizedTest(struct kt_golden_case *c, optim_golden, matches_pytorch)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open(c->file);
    const char *desc = ksm_st_metadata(f, c->name);
    cr_assert_not_null(desc, "%s: case %s has no description", c->file, c->name);
    double rel;
    if (strcmp(c->op, "sgd") == 0)
        rel = run_sgd(&e, f, c->name, desc);
    else if (strcmp(c->op, "clip") == 0)
        rel = run_clip(&e, f, c->name, desc);
    else if (strcmp(c->op, "stats") == 0)
        rel = run_stats(&e, f, c->name, desc);
    else if (strcmp(c->op, "ema") == 0)
        rel = run_ema(c->name, desc);
    else
        cr_assert_fail("%s: unknown op %s", c->name, c->op);
    fprintf(stderr, "optim_golden %s: rel %.1e\n", c->name, rel);
    ksm_st_close(f);
    env_fini(&e);
}

Test(optim_golden, every_op_has_its_cases)
{
    static const struct {
        const char *file, *op;
        int min;
    } want[] = {
        {"optim_sgd.safetensors", "sgd", 9},
        {"optim_clip.safetensors", "clip", 5},
        {"optim_stats.safetensors", "stats", 12},
        {"optim_stats.safetensors", "ema", 2},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const char *files[] = {want[i].file, NULL};
        int n = kt_golden_count(files, want[i].op);
        cr_expect_geq(n, want[i].min, "%s: only %d %s cases", want[i].file, n, want[i].op);
    }
}

/* ---- Properties ---- */

TestSuite(optim, .timeout = 60);

static ksm_tensor dev_f32(struct env *e, int64_t n, float v)
{
    struct ksm_st_tensor st = {.dtype = KSM_DTYPE_F32, .ndim = 1, .shape = {n}};
    float *h = malloc((size_t)n * sizeof *h);
    cr_assert_not_null(h);
    for (int64_t i = 0; i < n; i++) h[i] = v * (float)((i % 97) - 48) / 48.0f;
    st.data = h;
    st.nbytes = (size_t)n * sizeof *h;
    ksm_tensor t = upload(e, &st);
    free(h);
    return t;
}

/* Bad arguments are refused with the documented codes and nothing runs. */
Test(optim, validation)
{
    struct env e;
    env_init(&e);
    ksm_tensor p = dev_f32(&e, 8, 1.0f), g = dev_f32(&e, 8, 1.0f), b = dev_f32(&e, 8, 1.0f);
    ksm_tensor g7 = dev_f32(&e, 7, 1.0f);
    struct ksm_sgd_config mom = {.lr = 0.1, .momentum = 0.9}, plain = {.lr = 0.1};
    cr_expect_eq(ksm_op_sgd(e.s, &p, &g, NULL, &mom, true), KSM_EINVAL);
    cr_expect_eq(ksm_op_sgd(e.s, &p, &g, &b, &plain, true), KSM_EINVAL);
    cr_expect_eq(ksm_op_sgd(e.s, &p, &g7, &b, &mom, true), KSM_ESHAPE);
    cr_expect_eq(ksm_op_sgd(e.s, &p, &p, &b, &mom, true), KSM_EINVAL); /* overlap */
    struct ksm_sgd_config bad[] = {
        {.lr = -1.0},
        {.lr = NAN},
        {.lr = 0.1, .nesterov = true},
        {.lr = 0.1, .momentum = 0.9, .dampening = 0.1, .nesterov = true},
        {.lr = 0.1, .weight_decay = -1e-4},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_expect_eq(ksm_sgd_config_check(&bad[i]), KSM_EINVAL, "config %zu", i);
    cr_expect_eq(ksm_op_sumsq(e.s, &p, &g), KSM_EDTYPE); /* F32 out */
    cr_expect_eq(ksm_op_scale(e.s, NULL, 1.0), KSM_EINVAL);
    ksm_tensor strided = p;
    strided.shape[0] = 4;
    strided.stride[0] = 2;
    cr_expect_eq(ksm_op_scale(e.s, &strided, 2.0), KSM_EINVAL);
    float *h = download(&e, &p);
    cr_expect_eq(h[0], -1.0f, "p changed by a refused op");
    free(h);
    env_fini(&e);
}

/* The sum of squares is the same with one thread and with the pool (chunks are fixed). */
Test(optim, sumsq_thread_independent)
{
    struct env e;
    env_init(&e);
    ksm_tensor x = dev_f32(&e, 1000003, 0.37f);
    const ksm_tensor *xs[] = {&x};
    struct ksm_grad_sq one, many;
    int prev = ksm_cpu_pool_set_max_threads(1);
    cr_assert_eq(ksm_grad_sumsq(e.s, e.a, xs, 1, &one), 0);
    ksm_cpu_pool_set_max_threads(prev);
    cr_assert_eq(ksm_grad_sumsq(e.s, e.a, xs, 1, &many), 0);
    cr_expect_eq(memcmp(&one.sumsq, &many.sumsq, sizeof(double)), 0, "%.17g vs %.17g", one.sumsq,
                 many.sumsq);
    cr_expect_eq(one.numel, 1000003);
    env_fini(&e);
}

/* Reset drops every buffer; the next step starts them again as copies of the gradient. */
Test(optim, reset_drops_buffers)
{
    struct env e;
    env_init(&e);
    ksm_tensor p = dev_f32(&e, 16, 1.0f), g = dev_f32(&e, 16, 0.5f);
    struct ksm_sgd_config cfg = {.lr = 0.1, .momentum = 0.9};
    struct ksm_sgd o;
    cr_assert_eq(ksm_sgd_init(&o, &cfg, e.a, 2), 0);
    ksm_tensor q = dev_f32(&e, 4, 1.0f);
    struct ksm_sgd_pair pairs[] = {{&p, &g}, {&q, NULL}};
    cr_assert_eq(ksm_sgd_step(&o, e.s, pairs, 2), 0);
    cr_assert_eq(ksm_sgd_step(&o, e.s, pairs, 2), 0);
    cr_expect_not_null(o.buf[0].data);
    cr_expect_null(o.buf[1].data, "a parameter without a gradient got a buffer");
    cr_expect_gt(ksm_sgd_bytes(&o), 0);
    ksm_sgd_reset(&o, &e.s, 1);
    cr_expect_eq(ksm_sgd_bytes(&o), 0);
    cr_assert_eq(ksm_sgd_step(&o, e.s, pairs, 2), 0);
    float *b = download(&e, &o.buf[0]), *gh = download(&e, &g);
    cr_expect_eq(memcmp(b, gh, 16 * sizeof(float)), 0, "fresh buffer != gradient");
    free(b);
    free(gh);
    cr_expect_eq(ksm_sgd_step(&o, e.s, pairs, 1), KSM_EINVAL); /* wrong count */
    ksm_sgd_destroy(&o, &e.s, 1);
    env_fini(&e);
}
