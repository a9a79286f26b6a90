/*
 * Blueprints and GatedBlend (daemon/kasmina/blueprint*.c, gated_blend.c).
 * (Over 900 lines on purpose: the 16 blueprints share one registry, one parameter-count table
 * and one golden walk; split, each half would repeat them.)
 *
 * blueprint_registry: esper's order, BlueprintAction indices, GroupNorm groups (docs/models.md).
 * blueprint_params: exact parameter counts, names and shapes (docs/models.md#cnn-blueprints,
 * docs/models.md#transformer-blueprints; esper-state-dict docs/models.md#blueprints).
 * blueprint_birth: identity at birth, SE's 0.9526·x, MULTIPLY zero-init
 * (docs/models.md#multiply-zero-init). blueprint_golden: every case of
 * tests/golden/blueprints_*.safetensors (gen_blueprints.py, built from the spec in PyTorch with
 * every weight randomised) within max|Δ|/max|ref| <= 1e-5. blueprint_flex: flex_attention equals
 * attention; the block-mask LRU and its counters. blueprint_shapes: shape preservation for odd
 * widths and any resolution; fused == sequential.
 *
 * Every forward runs twice as a model runs it: a measure pass (nothing enqueued, arena sized),
 * then a real pass on an arena of exactly the measured size.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/blueprint.h"
#include "kasmina/errors.h"
#include "kasmina/safetensors.h"
#include "kasmina/tensor.h"
#include "kt.h"

#define GOLDEN_TOL 1e-5

struct env {
    ksm_backend *cpu;
    ksm_device *dev;
    ksm_stream *s;
    ksm_allocator *a;
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
    ksm_stream_synchronize(e->s);
    ksm_allocator_destroy(e->a);
    ksm_stream_free(e->s);
    ksm_backend_free(e->cpu);
}

static int64_t numel(int ndim, const int64_t *shape)
{
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

/* Deterministic host data in [-1, 1). */
static void fill_rand(float *p, int64_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int64_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (float)((double)(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
}

/* A seed of topology t / blueprint name, materialised with init seed 7. */
static ksm_seed *make_seed(struct env *e, enum ksm_topology t, const char *name, int c, bool zero)
{
    const struct ksm_blueprint *bp = ksm_blueprint_find(t, name);
    cr_assert_not_null(bp, "%s", name);
    ksm_seed *s;
    char err[128] = "";
    cr_assert_eq(ksm_seed_new(bp, c, &s, err, sizeof err), 0, "%s: %s", name, err);
    if (zero) ksm_seed_zero_final_layer(s);
    cr_assert_eq(ksm_params_materialise(ksm_seed_params(s), e->a, e->s, 7, "seed_slots.r0c0.seed."),
                 0);
    return s;
}

static void free_seed(struct env *e, ksm_seed *s)
{
    ksm_params_release(ksm_seed_params(s), e->a, NULL, 0);
    ksm_seed_free(s);
}

/* Uploads host floats into parameter `name` of ps. */
static void set_param(struct env *e, struct ksm_params *ps, const char *name, const float *v,
                      int64_t n)
{
    int i = ksm_params_find(ps, name);
    cr_assert_geq(i, 0, "no parameter %s", name);
    const ksm_tensor *t = ksm_params_tensor(ps, i);
    cr_assert_eq(ksm_tensor_numel(t), n, "%s", name);
    cr_assert_eq(ksm_stream_memcpy_async(e->s, t->data, v, (size_t)n * 4, KSM_COPY_H2D), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
}

/* Randomises every parameter of ps (seeded). */
static void randomise_params(struct env *e, struct ksm_params *ps, uint64_t seed)
{
    for (int i = 0; i < ps->n; i++) {
        int64_t n = ksm_tensor_numel(&ps->p[i].t);
        float *v = malloc((size_t)(n ? n : 1) * 4);
        fill_rand(v, n, seed + (uint64_t)i);
        for (int64_t j = 0; j < n; j++) v[j] *= 0.5f;
        set_param(e, ps, ps->p[i].name, v, n);
        free(v);
    }
}

enum fwd_kind { FWD_SEED, FWD_GATE };

/* Runs a seed (or gate) on host x: measure pass, then the real pass on an arena of exactly the
 * measured size. Returns the host output (malloc'd) and its shape in *yt. */
static float *run_fwd(struct env *e, enum fwd_kind kind, void *mod, const float *x, int ndim,
                      const int64_t *shape, ksm_tensor *yt)
{
    int64_t n = numel(ndim, shape);
    void *xd;
    cr_assert_eq(ksm_alloc_malloc(e->a, (size_t)(n ? n : 1) * 4, e->s, &xd), 0);
    cr_assert_eq(ksm_stream_memcpy_async(e->s, xd, x, (size_t)n * 4, KSM_COPY_H2D), 0);
    ksm_tensor xt;
    cr_assert_eq(ksm_tensor_init(&xt, e->dev, xd, KSM_DTYPE_F32, ndim, shape), 0);

    struct ksm_exec ex;
    ksm_tensor y;
    ksm_exec_init(&ex, e->s, true, NULL, 0);
    int rc = kind == FWD_SEED ? ksm_seed_forward(mod, &ex, &xt, &y)
                              : ksm_gated_blend_forward(mod, &ex, &xt, &y);
    cr_assert_eq(rc, 0, "measure: %s", ksm_err_name(rc));
    cr_assert_eq(ex.off, (ksm_tensor_nbytes(&y) + 63) & ~(size_t)63, "only y stays allocated");
    size_t need = ex.high;
    void *arena = NULL;
    cr_assert_eq(ksm_alloc_malloc(e->a, need ? need : 1, e->s, &arena), 0);
    ksm_exec_init(&ex, e->s, false, arena, need);
    rc = kind == FWD_SEED ? ksm_seed_forward(mod, &ex, &xt, &y)
                          : ksm_gated_blend_forward(mod, &ex, &xt, &y);
    cr_assert_eq(rc, 0, "forward: %s", ksm_err_name(rc));
    cr_assert_eq(ex.high, need, "real pass uses the measured arena");
    int64_t ny = ksm_tensor_numel(&y);
    float *out = malloc((size_t)(ny ? ny : 1) * 4);
    cr_assert_eq(ksm_stream_memcpy_async(e->s, out, y.data, (size_t)ny * 4, KSM_COPY_D2H), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    *yt = y;
    ksm_alloc_free(e->a, arena);
    ksm_alloc_free(e->a, xd);
    return out;
}

static float *run_seed(struct env *e, ksm_seed *s, const float *x, int ndim, const int64_t *shape)
{
    ksm_tensor y;
    float *out = run_fwd(e, FWD_SEED, s, x, ndim, shape, &y);
    cr_assert_eq(y.ndim, ndim);
    for (int i = 0; i < ndim; i++) cr_assert_eq(y.shape[i], shape[i]);
    return out;
}

/* ======================= registry ======================= */

TestSuite(blueprint_registry, .timeout = 30);

Test(blueprint_registry, lists_each_topology_in_esper_order)
{
    static const char *cnn[] = {"noop",       "norm",      "attention",  "conv_small",
                                "bottleneck", "depthwise", "conv_light", "conv_heavy"};
    static const char *tf[] = {"noop",      "norm",           "lora",      "lora_large",
                               "attention", "flex_attention", "mlp_small", "mlp"};
    int n;
    const struct ksm_blueprint *const *l = ksm_blueprint_list(KSM_TOPOLOGY_CNN, &n);
    cr_assert_eq(n, 8);
    for (int i = 0; i < n; i++) {
        cr_expect_str_eq(l[i]->name, cnn[i]);
        cr_expect_eq(l[i]->topology, KSM_TOPOLOGY_CNN);
        if (i > 0) cr_expect_leq(l[i - 1]->param_estimate, l[i]->param_estimate);
    }
    l = ksm_blueprint_list(KSM_TOPOLOGY_TRANSFORMER, &n);
    cr_assert_eq(n, 8);
    for (int i = 0; i < n; i++) {
        cr_expect_str_eq(l[i]->name, tf[i]);
        cr_expect_eq(l[i]->topology, KSM_TOPOLOGY_TRANSFORMER);
    }
    l = ksm_blueprint_list(KSM_TOPOLOGY_UNSPECIFIED, &n);
    cr_expect_eq(n, 0);
}

Test(blueprint_registry, estimates_and_indices)
{
    struct {
        enum ksm_topology t;
        const char *name;
        int index;
        int64_t est;
    } want[] = {
        {KSM_TOPOLOGY_CNN, "noop", 0, 0},
        {KSM_TOPOLOGY_CNN, "norm", 3, 130},
        {KSM_TOPOLOGY_CNN, "attention", 2, 2000},
        {KSM_TOPOLOGY_CNN, "depthwise", 4, 4800},
        {KSM_TOPOLOGY_CNN, "bottleneck", 5, 4500},
        {KSM_TOPOLOGY_CNN, "conv_small", 6, 4200},
        {KSM_TOPOLOGY_CNN, "conv_light", 1, 37000},
        {KSM_TOPOLOGY_CNN, "conv_heavy", 7, 74000},
        {KSM_TOPOLOGY_TRANSFORMER, "noop", 0, 0},
        {KSM_TOPOLOGY_TRANSFORMER, "norm", 3, 800},
        {KSM_TOPOLOGY_TRANSFORMER, "lora", 8, 6000},
        {KSM_TOPOLOGY_TRANSFORMER, "lora_large", 9, 25000},
        {KSM_TOPOLOGY_TRANSFORMER, "attention", 2, 591000},
        {KSM_TOPOLOGY_TRANSFORMER, "mlp_small", 10, 591000},
        {KSM_TOPOLOGY_TRANSFORMER, "mlp", 11, 1200000},
        {KSM_TOPOLOGY_TRANSFORMER, "flex_attention", 12, 591000},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const struct ksm_blueprint *bp = ksm_blueprint_find(want[i].t, want[i].name);
        cr_assert_not_null(bp, "%s", want[i].name);
        cr_expect_eq(bp->index, want[i].index, "%s", want[i].name);
        cr_expect_eq(bp->param_estimate, want[i].est, "%s", want[i].name);
        cr_expect_eq(ksm_blueprint_index(want[i].name), want[i].index);
    }
    cr_expect_null(ksm_blueprint_find(KSM_TOPOLOGY_CNN, "lora"));
    cr_expect_null(ksm_blueprint_find(KSM_TOPOLOGY_TRANSFORMER, "conv_light"));
    cr_expect_null(ksm_blueprint_find(KSM_TOPOLOGY_CNN, "gated"));
    cr_expect_null(ksm_blueprint_find(KSM_TOPOLOGY_CNN, NULL));
    cr_expect_eq(ksm_blueprint_index("shadowing"), -1);
    cr_expect_eq(ksm_blueprint_index(NULL), -1);
}

Test(blueprint_registry, group_norm_groups)
{
    static const int c[] = {8, 16, 32, 64, 128, 256, 384, 512, 1, 3, 5, 7, 12, 48, 96};
    static const int g[] = {8, 1, 2, 4, 8, 16, 16, 32, 1, 1, 1, 1, 4, 2, 4};
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        cr_expect_eq(ksm_num_groups(c[i]), g[i], "C=%d", c[i]);
}

/* ======================= parameters ======================= */

TestSuite(blueprint_params, .timeout = 30);

static int64_t count_of(enum ksm_topology t, const char *name, int c)
{
    ksm_seed *s;
    cr_assert_eq(ksm_seed_new(ksm_blueprint_find(t, name), c, &s, NULL, 0), 0, "%s C=%d", name, c);
    int64_t n = ksm_params_count(ksm_seed_params(s));
    ksm_seed_free(s);
    return n;
}

Test(blueprint_params, cnn_counts_match_the_tables)
{
    static const int cs[] = {8, 16, 32, 64, 128};
    static const char *names[] = {"norm",       "attention",  "depthwise", "bottleneck",
                                  "conv_small", "conv_light", "conv_heavy"};
    static const int64_t want[7][5] = {
        {17, 33, 65, 129, 257},
        {40, 144, 544, 2112, 8320},
        {152, 432, 1376, 4800, 17792},
        {720, 864, 1152, 4480, 17664},
        {80, 288, 1088, 4224, 16640},
        {592, 2336, 9280, 36992, 147712},
        {1184, 4672, 18560, 73984, 295424},
    };
    for (int b = 0; b < 7; b++)
        for (int i = 0; i < 5; i++)
            cr_expect_eq(count_of(KSM_TOPOLOGY_CNN, names[b], cs[i]), want[b][i], "%s C=%d",
                         names[b], cs[i]);
    cr_expect_eq(count_of(KSM_TOPOLOGY_CNN, "noop", 64), 0);
}

Test(blueprint_params, transformer_counts_match_the_tables)
{
    static const char *names[] = {"noop",      "norm",           "lora",      "lora_large",
                                  "attention", "flex_attention", "mlp_small", "mlp"};
    static const int64_t d48[] = {0, 97, 768, 3072, 9408, 9408, 9360, 18672};
    static const int64_t d384[] = {0, 769, 6144, 24576, 591360, 591360, 590976, 1181568};
    for (int b = 0; b < 8; b++) {
        cr_expect_eq(count_of(KSM_TOPOLOGY_TRANSFORMER, names[b], 48), d48[b], "%s", names[b]);
        cr_expect_eq(count_of(KSM_TOPOLOGY_TRANSFORMER, names[b], 384), d384[b], "%s", names[b]);
    }
}

struct decl {
    const char *name;
    int ndim;
    int64_t shape[4];
};

static void expect_decls(enum ksm_topology t, const char *bp, int c, const struct decl *d, int n)
{
    ksm_seed *s;
    cr_assert_eq(ksm_seed_new(ksm_blueprint_find(t, bp), c, &s, NULL, 0), 0);
    struct ksm_params *ps = ksm_seed_params(s);
    cr_expect_eq(ps->n, n, "%s: %d parameters", bp, ps->n);
    for (int i = 0; i < n && i < ps->n; i++) {
        cr_expect_str_eq(ps->p[i].name, d[i].name, "%s", bp);
        cr_expect_eq(ps->p[i].t.dtype, KSM_DTYPE_F32);
        cr_expect_eq(ps->p[i].t.ndim, d[i].ndim, "%s %s", bp, d[i].name);
        for (int k = 0; k < d[i].ndim; k++)
            cr_expect_eq(ps->p[i].t.shape[k], d[i].shape[k], "%s %s dim %d", bp, d[i].name, k);
        cr_expect_not(ps->p[i].buffer);
    }
    ksm_seed_free(s);
}

#define DECLS(t, bp, c, ...)                                                                       \
    do {                                                                                           \
        static const struct decl d_[] = {__VA_ARGS__};                                             \
        expect_decls(t, bp, c, d_, (int)(sizeof d_ / sizeof d_[0]));                               \
    } while (0)

Test(blueprint_params, cnn_names_and_shapes)
{
    enum ksm_topology T = KSM_TOPOLOGY_CNN;
    expect_decls(T, "noop", 8, NULL, 0);
    DECLS(T, "norm", 8, {"scale", 1, {1}}, {"norm.weight", 1, {8}}, {"norm.bias", 1, {8}});
    DECLS(T, "attention", 8, {"fc.0.weight", 2, {2, 8}}, {"fc.2.weight", 2, {8, 2}},
          {"fc.2.bias", 1, {8}});
    DECLS(T, "attention", 3, {"fc.0.weight", 2, {1, 3}}, {"fc.2.weight", 2, {3, 1}},
          {"fc.2.bias", 1, {3}});
    DECLS(T, "depthwise", 16, {"depthwise.weight", 4, {16, 1, 3, 3}},
          {"pointwise.weight", 4, {16, 16, 1, 1}}, {"gn.weight", 1, {16}}, {"gn.bias", 1, {16}});
    DECLS(T, "bottleneck", 64, {"down.weight", 4, {16, 64, 1, 1}},
          {"conv.weight", 4, {16, 16, 3, 3}}, {"up.weight", 4, {64, 16, 1, 1}},
          {"gn.weight", 1, {64}}, {"gn.bias", 1, {64}});
    DECLS(T, "bottleneck", 8, {"down.weight", 4, {8, 8, 1, 1}}, {"conv.weight", 4, {8, 8, 3, 3}},
          {"up.weight", 4, {8, 8, 1, 1}}, {"gn.weight", 1, {8}}, {"gn.bias", 1, {8}});
    DECLS(T, "conv_small", 8, {"conv.weight", 4, {8, 8, 1, 1}}, {"gn.weight", 1, {8}},
          {"gn.bias", 1, {8}});
    DECLS(T, "conv_light", 8, {"enhance.conv.weight", 4, {8, 8, 3, 3}},
          {"enhance.gn.weight", 1, {8}}, {"enhance.gn.bias", 1, {8}});
    DECLS(T, "conv_heavy", 8, {"enhance.0.conv.weight", 4, {8, 8, 3, 3}},
          {"enhance.0.gn.weight", 1, {8}}, {"enhance.0.gn.bias", 1, {8}},
          {"enhance.1.conv.weight", 4, {8, 8, 3, 3}}, {"enhance.1.gn.weight", 1, {8}},
          {"enhance.1.gn.bias", 1, {8}});
}

Test(blueprint_params, transformer_names_and_shapes)
{
    enum ksm_topology T = KSM_TOPOLOGY_TRANSFORMER;
    expect_decls(T, "noop", 48, NULL, 0);
    DECLS(T, "norm", 48, {"scale", 1, {1}}, {"norm.weight", 1, {48}}, {"norm.bias", 1, {48}});
    DECLS(T, "lora", 48, {"down.weight", 2, {8, 48}}, {"up.weight", 2, {48, 8}});
    DECLS(T, "lora_large", 48, {"down.weight", 2, {32, 48}}, {"up.weight", 2, {48, 32}});
    DECLS(T, "attention", 48, {"qkv.weight", 2, {144, 48}}, {"qkv.bias", 1, {144}},
          {"proj.weight", 2, {48, 48}}, {"proj.bias", 1, {48}});
    DECLS(T, "flex_attention", 48, {"qkv.weight", 2, {144, 48}}, {"qkv.bias", 1, {144}},
          {"proj.weight", 2, {48, 48}}, {"proj.bias", 1, {48}});
    DECLS(T, "mlp_small", 48, {"fc1.weight", 2, {96, 48}}, {"fc1.bias", 1, {96}},
          {"fc2.weight", 2, {48, 96}}, {"fc2.bias", 1, {48}});
    DECLS(T, "mlp", 48, {"fc1.weight", 2, {192, 48}}, {"fc1.bias", 1, {192}},
          {"fc2.weight", 2, {48, 192}}, {"fc2.bias", 1, {48}});
}

Test(blueprint_params, initialisation_follows_pytorch_and_esper)
{
    ksm_seed *s;
    cr_assert_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_CNN, "attention"), 64, &s, NULL, 0),
                 0);
    struct ksm_params *ps = ksm_seed_params(s);
    cr_expect_eq(ps->p[0].init, KSM_INIT_UNIFORM);
    cr_expect_float_eq(ps->p[0].init_a, 0.125f, 1e-7);
    cr_expect_eq(ps->p[1].init, KSM_INIT_ZERO);
    cr_expect_eq(ps->p[2].init, KSM_INIT_CONST);
    cr_expect_float_eq(ps->p[2].init_a, 3.0f, 0);
    ksm_seed_zero_final_layer(s); /* fc.2 weight AND bias */
    cr_expect_eq(ps->p[1].init, KSM_INIT_ZERO);
    cr_expect_eq(ps->p[2].init, KSM_INIT_ZERO);
    cr_expect_eq(ps->p[0].init, KSM_INIT_UNIFORM);
    ksm_seed_free(s);

    cr_assert_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_CNN, "conv_heavy"), 16, &s, NULL, 0),
                 0);
    ps = ksm_seed_params(s);
    cr_expect_float_eq(ps->p[0].init_a, (float)(1.0 / 12.0), 1e-7); /* fan_in 9*16 */
    cr_expect_eq(ps->p[1].init, KSM_INIT_ONE);
    cr_expect_eq(ps->p[2].init, KSM_INIT_ZERO);
    ksm_seed_zero_final_layer(s); /* enhance.1.conv only */
    cr_expect_eq(ps->p[0].init, KSM_INIT_UNIFORM);
    cr_expect_eq(ps->p[3].init, KSM_INIT_ZERO);
    cr_expect_eq(ps->p[4].init, KSM_INIT_ONE);
    ksm_seed_free(s);

    cr_assert_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_CNN, "depthwise"), 16, &s, NULL, 0),
                 0);
    ps = ksm_seed_params(s);
    cr_expect_float_eq(ps->p[0].init_a, (float)(1.0 / 3.0), 1e-7); /* fan_in 1*9 */
    ksm_seed_zero_final_layer(s);                                  /* pointwise */
    cr_expect_eq(ps->p[0].init, KSM_INIT_UNIFORM);
    cr_expect_eq(ps->p[1].init, KSM_INIT_ZERO);
    ksm_seed_free(s);

    cr_assert_eq(
        ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_TRANSFORMER, "norm"), 48, &s, NULL, 0), 0);
    ps = ksm_seed_params(s);
    ksm_seed_zero_final_layer(s); /* no affine layer: untouched */
    cr_expect_eq(ps->p[0].init, KSM_INIT_ZERO);
    cr_expect_eq(ps->p[1].init, KSM_INIT_ONE);
    ksm_seed_free(s);

    cr_assert_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_TRANSFORMER, "mlp"), 48, &s, NULL, 0),
                 0);
    ps = ksm_seed_params(s);
    cr_expect_eq(ps->p[0].init, KSM_INIT_UNIFORM);
    cr_expect_float_eq(ps->p[1].init_a, (float)(1.0 / sqrt(48.0)), 1e-7);
    cr_expect_eq(ps->p[2].init, KSM_INIT_ZERO);
    cr_expect_eq(ps->p[3].init, KSM_INIT_ZERO);
    ksm_seed_free(s);
}

Test(blueprint_params, gate_names_shapes_and_counts)
{
    static const int cs[] = {8, 16, 32, 64, 128, 48, 384};
    static const int64_t want[] = {81, 145, 273, 1057, 4161, 601, 37057};
    for (int i = 0; i < 7; i++) {
        ksm_gated_blend *g;
        enum ksm_topology t = i < 5 ? KSM_TOPOLOGY_CNN : KSM_TOPOLOGY_TRANSFORMER;
        cr_assert_eq(ksm_gated_blend_new(cs[i], t, &g, NULL, 0), 0);
        struct ksm_params *ps = ksm_gated_blend_params(g);
        cr_expect_eq(ksm_params_count(ps), want[i], "C=%d", cs[i]);
        int64_t h = cs[i] / 4 > 8 ? cs[i] / 4 : 8;
        cr_assert_eq(ps->n, 4);
        cr_expect_str_eq(ps->p[0].name, "gate.0.weight");
        cr_expect(ps->p[0].t.shape[0] == h && ps->p[0].t.shape[1] == cs[i]);
        cr_expect_str_eq(ps->p[1].name, "gate.0.bias");
        cr_expect(ps->p[1].t.ndim == 1 && ps->p[1].t.shape[0] == h);
        cr_expect_str_eq(ps->p[2].name, "gate.2.weight");
        cr_expect(ps->p[2].t.shape[0] == 1 && ps->p[2].t.shape[1] == h);
        cr_expect_str_eq(ps->p[3].name, "gate.2.bias");
        cr_expect(ps->p[3].t.ndim == 1 && ps->p[3].t.shape[0] == 1);
        cr_expect_eq(ps->p[0].init, KSM_INIT_UNIFORM);
        cr_expect_float_eq(ps->p[0].init_a, (float)(1.0 / sqrt(cs[i])), 1e-7);
        cr_expect_float_eq(ps->p[3].init_a, (float)(1.0 / sqrt((double)h)), 1e-7);
        ksm_gated_blend_free(g);
    }
}

Test(blueprint_params, rejects_bad_arguments)
{
    ksm_seed *s = (ksm_seed *)1;
    char err[128] = "";
    cr_expect_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_CNN, "norm"), 0, &s, err, sizeof err),
                 KSM_EINVAL);
    cr_expect_null(s);
    cr_expect_neq(err[0], 0);
    err[0] = 0;
    cr_expect_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_TRANSFORMER, "attention"), 6, &s, err,
                              sizeof err),
                 KSM_EINVAL);
    cr_expect(strstr(err, "4") != NULL, "%s", err);
    cr_expect_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_TRANSFORMER, "flex_attention"), 10,
                              &s, NULL, 0),
                 KSM_EINVAL);
    cr_expect_eq(ksm_seed_new(NULL, 8, &s, NULL, 0), KSM_EINVAL);
    struct ksm_blueprint fake = {.name = "norm", .index = 3, .topology = KSM_TOPOLOGY_CNN};
    cr_expect_eq(ksm_seed_new(&fake, 8, &s, NULL, 0), KSM_EINVAL);
    /* odd widths are fine where the blueprint has no head constraint */
    cr_expect_eq(ksm_seed_new(ksm_blueprint_find(KSM_TOPOLOGY_TRANSFORMER, "mlp"), 5, &s, NULL, 0),
                 0);
    ksm_seed_free(s);
    ksm_gated_blend *g = (ksm_gated_blend *)1;
    cr_expect_eq(ksm_gated_blend_new(0, KSM_TOPOLOGY_CNN, &g, err, sizeof err), KSM_EINVAL);
    cr_expect_null(g);
    cr_expect_eq(ksm_gated_blend_new(8, KSM_TOPOLOGY_UNSPECIFIED, &g, err, sizeof err), KSM_EINVAL);
    ksm_seed_free(NULL);
    ksm_gated_blend_free(NULL);
}

Test(blueprint_params, forward_validates_its_input)
{
    struct env e;
    env_init(&e);
    ksm_seed *s = make_seed(&e, KSM_TOPOLOGY_CNN, "conv_light", 8, false);
    struct ksm_exec ex;
    ksm_exec_init(&ex, e.s, true, NULL, 0);
    ksm_tensor x, y;
    float dummy[16];
    cr_assert_eq(ksm_tensor_init(&x, e.dev, dummy, KSM_DTYPE_F32, 4, (int64_t[]){1, 4, 2, 2}), 0);
    cr_expect_eq(ksm_seed_forward(s, &ex, &x, &y), KSM_ESHAPE); /* 4 channels, seed has 8 */
    cr_assert_eq(ksm_tensor_init(&x, e.dev, dummy, KSM_DTYPE_F32, 3, (int64_t[]){1, 8, 2}), 0);
    cr_expect_eq(ksm_seed_forward(s, &ex, &x, &y), KSM_ESHAPE);
    cr_assert_eq(ksm_tensor_init(&x, e.dev, dummy, KSM_DTYPE_I32, 4, (int64_t[]){1, 8, 1, 2}), 0);
    cr_expect_eq(ksm_seed_forward(s, &ex, &x, &y), KSM_EDTYPE);
    cr_assert_eq(ksm_tensor_init(&x, NULL, dummy, KSM_DTYPE_F32, 4, (int64_t[]){1, 8, 1, 2}), 0);
    cr_expect_eq(ksm_seed_forward(s, &ex, &x, &y), KSM_EINVAL); /* not on the device */
    free_seed(&e, s);
    ksm_gated_blend *g;
    cr_assert_eq(ksm_gated_blend_new(8, KSM_TOPOLOGY_TRANSFORMER, &g, NULL, 0), 0);
    cr_assert_eq(ksm_tensor_init(&x, e.dev, dummy, KSM_DTYPE_F32, 4, (int64_t[]){1, 8, 1, 2}), 0);
    cr_expect_eq(ksm_gated_blend_forward(g, &ex, &x, &y), KSM_ESHAPE);
    ksm_gated_blend_free(g);
    env_fini(&e);
}

Test(blueprint_params, measure_pass_enqueues_nothing)
{
    /* A stream-less measure pass over unmaterialised parameters: any op that were called would
     * fail (NULL stream), so success means nothing was enqueued. */
    for (int topo = 1; topo <= 2; topo++) {
        int n;
        const struct ksm_blueprint *const *l = ksm_blueprint_list(topo, &n);
        for (int i = 0; i < n; i++) {
            ksm_seed *s;
            cr_assert_eq(ksm_seed_new(l[i], 8, &s, NULL, 0), 0);
            struct ksm_exec ex;
            ksm_exec_init(&ex, NULL, true, NULL, 0);
            ksm_tensor x, y;
            int64_t shape[4] = {2, 8, 5, 5}, tshape[3] = {2, 130, 8};
            cr_assert_eq(ksm_tensor_init(&x, NULL, (void *)(uintptr_t)4096, KSM_DTYPE_F32,
                                         topo == 1 ? 4 : 3, topo == 1 ? shape : tshape),
                         0);
            cr_expect_eq(ksm_seed_forward(s, &ex, &x, &y), 0, "%s", l[i]->name);
            cr_expect_gt(ex.high, 0);
            cr_expect_eq(ex.off, (ksm_tensor_nbytes(&x) + 63) & ~(size_t)63, "%s", l[i]->name);
            struct ksm_lru_stats st;
            if (ksm_seed_block_mask_stats(s, &st)) cr_expect_eq(st.misses + st.entries, 0);
            ksm_seed_free(s);
        }
    }
}

/* ======================= identity at birth ======================= */

TestSuite(blueprint_birth, .timeout = 60);

static void check_birth(enum ksm_topology t, const char *name, bool zero, float factor)
{
    struct env e;
    env_init(&e);
    int c = t == KSM_TOPOLOGY_CNN ? 16 : 48;
    ksm_seed *s = make_seed(&e, t, name, c, zero);
    int64_t cshape[4] = {3, c, 5, 4}, tshape[3] = {2, 9, c};
    int ndim = t == KSM_TOPOLOGY_CNN ? 4 : 3;
    const int64_t *shape = t == KSM_TOPOLOGY_CNN ? cshape : tshape;
    int64_t n = numel(ndim, shape);
    float *x = malloc((size_t)n * 4);
    fill_rand(x, n, 42);
    for (int64_t i = 0; i < n; i++) x[i] *= 3.0f;
    float *y = run_seed(&e, s, x, ndim, shape);
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double want = factor == 1.0f ? (double)x[i] : (double)factor * x[i];
        double d = fabs((double)y[i] - want);
        if (d > worst) worst = d;
        if (factor == 1.0f) cr_assert(y[i] == x[i], "%s[%ld]: %g != %g", name, (long)i, y[i], x[i]);
    }
    cr_expect_leq(worst, 1e-6 * 3, "%s: %g", name, worst);
    free(x);
    free(y);
    free_seed(&e, s);
    env_fini(&e);
}

Test(blueprint_birth, identity_seeds_return_their_input_bit_exactly)
{
    static const char *cnn[] = {"noop", "norm", "bottleneck", "conv_small"};
    static const char *tf[] = {"noop",      "norm",           "lora", "lora_large",
                               "attention", "flex_attention", "mlp",  "mlp_small"};
    for (int i = 0; i < 4; i++) check_birth(KSM_TOPOLOGY_CNN, cnn[i], false, 1.0f);
    for (int i = 0; i < 8; i++) check_birth(KSM_TOPOLOGY_TRANSFORMER, tf[i], false, 1.0f);
}

Test(blueprint_birth, se_scales_by_sigmoid_of_three)
{
    check_birth(KSM_TOPOLOGY_CNN, "attention", false, (float)(1.0 / (1.0 + exp(-3.0))));
}

Test(blueprint_birth, multiply_zero_init_makes_cnn_seeds_identities_and_se_half)
{
    static const char *cnn[] = {"noop",       "norm",       "depthwise", "bottleneck",
                                "conv_small", "conv_light", "conv_heavy"};
    for (int i = 0; i < 7; i++) check_birth(KSM_TOPOLOGY_CNN, cnn[i], true, 1.0f);
    check_birth(KSM_TOPOLOGY_CNN, "attention", true, 0.5f);
    static const char *tf[] = {"noop",      "norm",           "lora", "lora_large",
                               "attention", "flex_attention", "mlp",  "mlp_small"};
    for (int i = 0; i < 8; i++) check_birth(KSM_TOPOLOGY_TRANSFORMER, tf[i], true, 1.0f);
}

Test(blueprint_birth, random_seeds_are_not_identities)
{
    static const char *cnn[] = {"depthwise", "conv_light", "conv_heavy"};
    struct env e;
    env_init(&e);
    for (int b = 0; b < 3; b++) {
        ksm_seed *s = make_seed(&e, KSM_TOPOLOGY_CNN, cnn[b], 8, false);
        int64_t shape[4] = {1, 8, 4, 4};
        float x[128];
        fill_rand(x, 128, 3);
        float *y = run_seed(&e, s, x, 4, shape);
        int diff = 0;
        for (int i = 0; i < 128; i++) diff += y[i] != x[i];
        cr_expect_gt(diff, 0, "%s", cnn[b]);
        free(y);
        free_seed(&e, s);
    }
    env_fini(&e);
}

/* ======================= golden ======================= */

TestSuite(blueprint_golden, .timeout = 120);

static const char *meta_get(const char *desc, const char *key, char *buf, size_t len)
{
    size_t kl = strlen(key);
    for (const char *p = desc; p && *p;) {
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
            const char *v = p + kl + 1;
            size_t n = strcspn(v, " ");
            if (n >= len) n = len - 1;
            memcpy(buf, v, n);
            buf[n] = 0;
            return buf;
        }
        p = strchr(p, ' ');
        if (p) p++;
    }
    return NULL;
}

static double run_golden_case(struct env *e, ksm_st_file *f, const char *cname)
{
    const char *desc = ksm_st_metadata(f, cname);
    cr_assert_not_null(desc, "%s", cname);
    char op[16], topo[16], bp[32], ch[16];
    cr_assert_not_null(meta_get(desc, "op", op, sizeof op));
    cr_assert_not_null(meta_get(desc, "topology", topo, sizeof topo));
    cr_assert_not_null(meta_get(desc, "blueprint", bp, sizeof bp));
    cr_assert_not_null(meta_get(desc, "channels", ch, sizeof ch));
    enum ksm_topology t = strcmp(topo, "cnn") == 0 ? KSM_TOPOLOGY_CNN : KSM_TOPOLOGY_TRANSFORMER;
    int c = atoi(ch);
    bool gate = strcmp(op, "gate") == 0;
    ksm_seed *s = NULL;
    ksm_gated_blend *g = NULL;
    struct ksm_params *ps;
    if (gate) {
        cr_assert_eq(ksm_gated_blend_new(c, t, &g, NULL, 0), 0);
        ps = ksm_gated_blend_params(g);
    } else {
        cr_assert_eq(ksm_seed_new(ksm_blueprint_find(t, bp), c, &s, NULL, 0), 0, "%s", cname);
        ps = ksm_seed_params(s);
    }
    cr_assert_eq(ksm_params_materialise(ps, e->a, e->s, 1, "x."), 0);

    /* The fixture's parameters are exactly the declared ones (names and shapes). */
    char key[160];
    int n_file = 0;
    size_t plen = strlen(cname) + 3;
    for (size_t i = 0; i < ksm_st_count(f); i++) {
        const struct ksm_st_tensor *st = ksm_st_get(f, i);
        snprintf(key, sizeof key, "%s.p.", cname);
        if (strncmp(st->name, key, plen) != 0) continue;
        n_file++;
        const char *pname = st->name + plen;
        int k = ksm_params_find(ps, pname);
        cr_assert_geq(k, 0, "%s: %s not declared", cname, pname);
        const ksm_tensor *pt = ksm_params_tensor(ps, k);
        cr_assert_eq(pt->ndim, st->ndim, "%s: %s", cname, pname);
        for (int d = 0; d < st->ndim; d++)
            cr_assert_eq(pt->shape[d], st->shape[d], "%s: %s", cname, pname);
        float *v = kt_golden_floats(st);
        set_param(e, ps, pname, v, ksm_tensor_numel(pt));
        free(v);
    }
    cr_assert_eq(n_file, ps->n, "%s: %d file parameters, %d declared", cname, n_file, ps->n);

    snprintf(key, sizeof key, "%s.x", cname);
    const struct ksm_st_tensor *xs = ksm_st_find(f, key);
    snprintf(key, sizeof key, "%s.y", cname);
    const struct ksm_st_tensor *ys = ksm_st_find(f, key);
    cr_assert(xs && ys, "%s", cname);
    float *x = kt_golden_floats(xs), *yref = kt_golden_floats(ys);
    ksm_tensor yt;
    float *y = run_fwd(e, gate ? FWD_GATE : FWD_SEED, gate ? (void *)g : (void *)s, x, xs->ndim,
                       xs->shape, &yt);
    cr_assert_eq(yt.ndim, ys->ndim, "%s", cname);
    for (int d = 0; d < ys->ndim; d++) cr_assert_eq(yt.shape[d], ys->shape[d], "%s", cname);
    double rel = kt_golden_expect_f32(cname, y, yref, ksm_tensor_numel(&yt), GOLDEN_TOL);
    fprintf(stderr, "blueprint_golden %s: rel %.3g\n", cname, rel);
    free(x);
    free(y);
    free(yref);
    ksm_params_release(ps, e->a, NULL, 0);
    ksm_seed_free(s);
    ksm_gated_blend_free(g);
    return rel;
}

static const char *const GOLDEN_CNN[] = {"blueprints_cnn.safetensors", NULL};
static const char *const GOLDEN_TF[] = {"blueprints_tf.safetensors", NULL};
static const char *const GOLDEN_ALL[] = {"blueprints_cnn.safetensors", "blueprints_tf.safetensors",
                                         NULL};

/* One test per case of both fixture files (seeds and gates, CNN and transformer). */
ParameterizedTestParameters(blueprint_golden, matches_pytorch)
{
    return kt_golden_cases(GOLDEN_ALL);
}

ParameterizedTest(struct kt_golden_case *c, blueprint_golden, matches_pytorch)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open(c->file);
    run_golden_case(&e, f, c->name);
    ksm_st_close(f);
    env_fini(&e);
}

Test(blueprint_golden, cnn_file_has_at_least_19_cases)
{
    cr_expect_geq(kt_golden_count(GOLDEN_CNN, NULL), 19);
}

Test(blueprint_golden, transformer_file_has_at_least_12_cases)
{
    cr_expect_geq(kt_golden_count(GOLDEN_TF, NULL), 12);
}

/* ======================= flex_attention ======================= */

TestSuite(blueprint_flex, .timeout = 120);

static float *run_tf(struct env *e, ksm_seed *s, int64_t B, int64_t T, int64_t D, uint64_t seed)
{
    int64_t shape[3] = {B, T, D};
    int64_t n = B * T * D;
    float *x = malloc((size_t)n * 4);
    fill_rand(x, n, seed);
    float *y = run_seed(e, s, x, 3, shape);
    free(x);
    return y;
}

Test(blueprint_flex, equals_causal_attention_with_the_same_weights)
{
    struct env e;
    env_init(&e);
    const int D = 32;
    ksm_seed *a = make_seed(&e, KSM_TOPOLOGY_TRANSFORMER, "attention", D, false);
    ksm_seed *f = make_seed(&e, KSM_TOPOLOGY_TRANSFORMER, "flex_attention", D, false);
    randomise_params(&e, ksm_seed_params(a), 99);
    randomise_params(&e, ksm_seed_params(f), 99);
    static const int64_t Ts[] = {7, 130, 300, 128, 256, 1};
    for (int i = 0; i < 6; i++) {
        int64_t T = Ts[i];
        float *ya = run_tf(&e, a, 2, T, D, (uint64_t)T);
        float *yf = run_tf(&e, f, 2, T, D, (uint64_t)T);
        double md = 0, mx = 0;
        for (int64_t k = 0; k < 2 * T * D; k++) {
            double d = fabs((double)ya[k] - yf[k]);
            if (!(d <= md)) md = d;
            if (fabs(ya[k]) > mx) mx = fabs(ya[k]);
        }
        cr_expect_leq(md, 1e-6, "T=%ld: max|d| %g", (long)T, md);
        cr_expect_gt(mx, 0.1);
        free(ya);
        free(yf);
    }
    free_seed(&e, a);
    free_seed(&e, f);
    env_fini(&e);
}

Test(blueprint_flex, block_mask_schedule_is_block_causal)
{
    struct ksm_lru_stats st;
    struct env e;
    env_init(&e);
    ksm_seed *f = make_seed(&e, KSM_TOPOLOGY_TRANSFORMER, "flex_attention", 8, false);
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.capacity, KSM_BLOCK_MASK_CAPACITY);
    cr_expect_eq(st.entries + st.hits + st.misses + st.bytes, 0);
    float *y = run_tf(&e, f, 1, 300, 8, 1);
    free(y);
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.misses, 1);
    cr_expect_eq(st.entries, 1);
    /* 3 q-blocks x 3 kv-blocks: a header and four int32 arrays (2*3 + 2*9 entries) */
    cr_expect_geq(st.bytes, 24 * sizeof(int32_t));
    cr_expect_lt(st.bytes, 24 * sizeof(int32_t) + 256);
    free_seed(&e, f);
    env_fini(&e);
}

Test(blueprint_flex, lru_counts_hits_misses_evictions_and_invalidations)
{
    struct env e;
    env_init(&e);
    ksm_seed *f = make_seed(&e, KSM_TOPOLOGY_TRANSFORMER, "flex_attention", 8, false);
    struct ksm_lru_stats st;
    for (int64_t T = 1; T <= 9; T++) free(run_tf(&e, f, 1, T, 8, (uint64_t)T));
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.misses, 9);
    cr_expect_eq(st.hits, 0);
    cr_expect_eq(st.evictions, 1);
    cr_expect_eq(st.entries, 8);
    cr_expect_eq(st.capacity, 8);
    cr_expect_gt(st.bytes, 0);
    uint64_t bytes8 = st.bytes;
    /* T = 9 is cached: a hit (measure passes leave the counters alone) */
    free(run_tf(&e, f, 2, 9, 8, 5));
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.hits, 1);
    cr_expect_eq(st.misses, 9);
    /* T = 2 is now the least recently used; touching it makes T = 3 the LRU */
    free(run_tf(&e, f, 1, 2, 8, 6));
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.hits, 2);
    /* T = 1 was evicted: a miss that evicts T = 3 */
    free(run_tf(&e, f, 1, 1, 8, 7));
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.misses, 10);
    cr_expect_eq(st.evictions, 2);
    cr_expect_eq(st.entries, 8);
    cr_expect_eq(st.bytes, bytes8);
    free(run_tf(&e, f, 1, 2, 8, 8)); /* still cached */
    free(run_tf(&e, f, 1, 3, 8, 9)); /* evicted */
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.hits, 3);
    cr_expect_eq(st.misses, 11);
    cr_expect_eq(st.evictions, 3);
    ksm_seed_invalidate_caches(f);
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.invalidations, 8);
    cr_expect_eq(st.entries, 0);
    cr_expect_eq(st.bytes, 0);
    free(run_tf(&e, f, 1, 2, 8, 10));
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.misses, 12);
    cr_expect_eq(st.entries, 1);
    ksm_seed_invalidate_caches(f);
    cr_assert(ksm_seed_block_mask_stats(f, &st));
    cr_expect_eq(st.invalidations, 9);
    free_seed(&e, f);

    ksm_seed *a = make_seed(&e, KSM_TOPOLOGY_TRANSFORMER, "attention", 8, false);
    cr_expect_not(ksm_seed_block_mask_stats(a, &st));
    ksm_seed_invalidate_caches(a);
    free_seed(&e, a);
    env_fini(&e);
}

/* ======================= shapes and per-sample ======================= */

TestSuite(blueprint_shapes, .timeout = 240);

static bool all_finite(const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(y[i])) return false;
    return true;
}

Test(blueprint_shapes, cnn_seeds_preserve_shape_for_odd_channels_and_any_resolution)
{
    struct env e;
    env_init(&e);
    static const int cs[] = {1, 3, 5, 7};
    int n;
    const struct ksm_blueprint *const *l = ksm_blueprint_list(KSM_TOPOLOGY_CNN, &n);
    for (int b = 0; b < n; b++)
        for (int ci = 0; ci < 4; ci++) {
            ksm_seed *s = make_seed(&e, KSM_TOPOLOGY_CNN, l[b]->name, cs[ci], false);
            randomise_params(&e, ksm_seed_params(s), 3);
            for (int h = 1; h <= 9; h++)
                for (int w = 1; w <= 9; w++) {
                    int64_t shape[4] = {2, cs[ci], h, w};
                    int64_t m = numel(4, shape);
                    float *x = malloc((size_t)m * 4);
                    fill_rand(x, m, (uint64_t)(h * 10 + w));
                    float *y = run_seed(&e, s, x, 4, shape);
                    cr_expect(all_finite(y, m), "%s C=%d %dx%d", l[b]->name, cs[ci], h, w);
                    free(x);
                    free(y);
                }
            free_seed(&e, s);
        }
    env_fini(&e);
}

Test(blueprint_shapes, transformer_seeds_preserve_shape_for_small_widths_and_any_length)
{
    struct env e;
    env_init(&e);
    static const int ds[] = {4, 8};
    int n;
    const struct ksm_blueprint *const *l = ksm_blueprint_list(KSM_TOPOLOGY_TRANSFORMER, &n);
    for (int b = 0; b < n; b++)
        for (int di = 0; di < 2; di++) {
            ksm_seed *s = make_seed(&e, KSM_TOPOLOGY_TRANSFORMER, l[b]->name, ds[di], false);
            randomise_params(&e, ksm_seed_params(s), 4);
            for (int t = 1; t <= 9; t++) {
                float *y = run_tf(&e, s, 2, t, ds[di], (uint64_t)t);
                cr_expect(all_finite(y, 2 * t * ds[di]), "%s D=%d T=%d", l[b]->name, ds[di], t);
                free(y);
            }
            free_seed(&e, s);
        }
    env_fini(&e);
}

/* Each row of a batched forward equals the forward of that row alone. */
static void check_per_sample(struct env *e, void *mod, bool gate, int ndim, const int64_t *shape,
                             const char *what)
{
    int64_t n = numel(ndim, shape), B = shape[0], row = n / B;
    float *x = malloc((size_t)n * 4);
    fill_rand(x, n, 77);
    ksm_tensor yt;
    float *y = run_fwd(e, gate ? FWD_GATE : FWD_SEED, mod, x, ndim, shape, &yt);
    int64_t yrow = ksm_tensor_numel(&yt) / B;
    int64_t one[KSM_MAX_DIMS];
    memcpy(one, shape, (size_t)ndim * sizeof *one);
    one[0] = 1;
    for (int64_t b = 0; b < B; b++) {
        float *yb = run_fwd(e, gate ? FWD_GATE : FWD_SEED, mod, x + b * row, ndim, one, &yt);
        double md = 0;
        for (int64_t i = 0; i < yrow; i++) {
            double d = fabs((double)yb[i] - y[b * yrow + i]);
            if (!(d <= md)) md = d;
        }
        cr_expect_leq(md, 1e-6, "%s row %ld: %g", what, (long)b, md);
        free(yb);
    }
    free(x);
    free(y);
}

Test(blueprint_shapes, fused_equals_sequential)
{
    struct env e;
    env_init(&e);
    for (int topo = 1; topo <= 2; topo++) {
        int n;
        const struct ksm_blueprint *const *l = ksm_blueprint_list(topo, &n);
        int c = topo == 1 ? 8 : 16;
        int64_t cshape[4] = {3, c, 5, 6}, tshape[3] = {3, 11, c};
        for (int b = 0; b < n; b++) {
            ksm_seed *s = make_seed(&e, topo, l[b]->name, c, false);
            randomise_params(&e, ksm_seed_params(s), 5);
            check_per_sample(&e, s, false, topo == 1 ? 4 : 3, topo == 1 ? cshape : tshape,
                             l[b]->name);
            free_seed(&e, s);
        }
        ksm_gated_blend *g;
        cr_assert_eq(ksm_gated_blend_new(c, topo, &g, NULL, 0), 0);
        cr_assert_eq(ksm_params_materialise(ksm_gated_blend_params(g), e.a, e.s, 3, "g."), 0);
        check_per_sample(&e, g, true, topo == 1 ? 4 : 3, topo == 1 ? cshape : tshape, "gate");
        ksm_params_release(ksm_gated_blend_params(g), e.a, NULL, 0);
        ksm_gated_blend_free(g);
    }
    env_fini(&e);
}

Test(blueprint_shapes, gate_output_shape_and_range)
{
    struct env e;
    env_init(&e);
    for (int topo = 1; topo <= 2; topo++) {
        ksm_gated_blend *g;
        cr_assert_eq(ksm_gated_blend_new(12, topo, &g, NULL, 0), 0);
        cr_assert_eq(ksm_params_materialise(ksm_gated_blend_params(g), e.a, e.s, 3, "g."), 0);
        int64_t cshape[4] = {4, 12, 3, 2}, tshape[3] = {4, 5, 12};
        int ndim = topo == 1 ? 4 : 3;
        int64_t m = numel(ndim, topo == 1 ? cshape : tshape);
        float *x = malloc((size_t)m * 4);
        fill_rand(x, m, 9);
        ksm_tensor yt;
        float *y = run_fwd(&e, FWD_GATE, g, x, ndim, topo == 1 ? cshape : tshape, &yt);
        cr_expect_eq(yt.ndim, ndim);
        cr_expect_eq(yt.shape[0], 4);
        for (int d = 1; d < ndim; d++) cr_expect_eq(yt.shape[d], 1);
        for (int i = 0; i < 4; i++) cr_expect(y[i] > 0 && y[i] < 1, "%g", y[i]);
        free(x);
        free(y);
        ksm_params_release(ksm_gated_blend_params(g), e.a, NULL, 0);
        ksm_gated_blend_free(g);
    }
    env_fini(&e);
}
