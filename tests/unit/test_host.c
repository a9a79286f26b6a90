/*
 * Host networks (daemon/kasmina/host.c): CNNHost (docs/models.md#cnnhost) and TransformerHost
 * (docs/models.md).
 * (One file over 900 lines on purpose: both hosts share the spec, routing and golden helpers,
 * and a reader checks a host against docs/models.md in one place.)
 *
 * host_params: names, shapes and counts against docs/weights.md#host-tensors.
 * host_slots: injection points (ids, row-major vs execution order, channels, spatial sizes).
 * host_spec: default resolution and validation sentences.
 * host_golden: logits and injection-point features against tests/golden/hosts_*.safetensors
 *   (tests/golden/gen_hosts.py: the hosts written in PyTorch from the spec), max|out - ref| /
 *   max|ref| <= 1e-5; each case prints "host_golden <case>: rel <err>" to stderr.
 * host_route: forward_to + forward_from chains equal the full forward; routing errors.
 * host_input: ksm_host_check_input's table.
 *
 * Every forward runs as the model runs it: a measure pass, then a real pass on an arena of
 * exactly the measured size from the caching allocator (filled with NaN bytes first, so a read
 * of memory nobody wrote shows up).
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kasmina/alloc.h"
#include "kasmina/backend.h"
#include "kasmina/errors.h"
#include "kasmina/exec.h"
#include "kasmina/host.h"
#include "kasmina/ops.h"
#include "kasmina/params.h"
#include "kasmina/safetensors.h"
#include "kt.h"

#define GOLDEN_TOL 1e-5

/* ---- environment ---- */

struct env {
    ksm_backend *cpu;
    ksm_device *dev;
    ksm_stream *s;
    ksm_allocator *a;
    ksm_host *h;
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
    if (e->h) {
        ksm_params_release(ksm_host_params(e->h), e->a, NULL, 0);
        ksm_host_free(e->h);
    }
    ksm_allocator_destroy(e->a);
    ksm_stream_free(e->s);
    ksm_backend_free(e->cpu);
}

static ksm_host *cnn_host(const struct ksm_cnn_spec *in, bool pool_set)
{
    struct ksm_cnn_spec s = *in;
    char err[256] = "";
    ksm_host *h = NULL;
    cr_assert_eq(ksm_host_resolve_cnn(&s, pool_set, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_host_new_cnn(&s, &h, err, sizeof err), 0, "%s", err);
    return h;
}

static ksm_host *tf_host(const struct ksm_transformer_spec *in)
{
    struct ksm_transformer_spec s = *in;
    char err[256] = "";
    ksm_host *h = NULL;
    cr_assert_eq(ksm_host_resolve_transformer(&s, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ksm_host_new_transformer(&s, &h, err, sizeof err), 0, "%s", err);
    return h;
}

static void materialise(struct env *e, ksm_host *h)
{
    e->h = h;
    cr_assert_eq(ksm_params_materialise(ksm_host_params(h), e->a, e->s, 7, "host."), 0);
}

/* A device copy of host data (allocator memory, freed by the caller with ksm_alloc_free). */
static ksm_tensor upload(struct env *e, enum ksm_dtype dt, int ndim, const int64_t *shape,
                         const void *data)
{
    ksm_tensor t;
    cr_assert_eq(ksm_tensor_init(&t, e->dev, NULL, dt, ndim, shape), 0);
    size_t n = ksm_tensor_nbytes(&t);
    cr_assert_eq(ksm_alloc_malloc(e->a, n, e->s, &t.data), 0);
    cr_assert_eq(ksm_stream_memcpy_async(e->s, t.data, data, n, KSM_COPY_H2D), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return t;
}

static float *download(struct env *e, const ksm_tensor *t)
{
    size_t n = ksm_tensor_nbytes(t);
    float *out = malloc(n ? n : 1);
    cr_assert_not_null(out);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    cr_assert_eq(ksm_stream_memcpy_async(e->s, out, t->data, n, KSM_COPY_D2H), 0);
    cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    return out;
}

/* Random deterministic parameters (a different seed from materialise's default init would not
 * exercise BN running stats, which start at 0 and 1): overwrite every float with U(-a, a). */
static void randomise(struct env *e, ksm_host *h, uint64_t seed)
{
    struct ksm_params *ps = ksm_host_params(h);
    for (int i = 0; i < ps->n; i++) {
        struct ksm_param *p = &ps->p[i];
        if (p->tied_to >= 0 || p->t.dtype != KSM_DTYPE_F32) continue;
        int64_t n = ksm_tensor_numel(&p->t);
        float *v = malloc((size_t)n * sizeof *v + 1);
        bool var = strstr(p->name, "running_var") != NULL;
        for (int64_t j = 0; j < n; j++) {
            double u = ksm_rand_uniform(seed, (uint64_t)i, (uint64_t)j);
            v[j] = var ? (float)(0.5 + u) : (float)(0.6 * (2 * u - 1));
        }
        cr_assert_eq(
            ksm_stream_memcpy_async(e->s, p->t.data, v, (size_t)n * sizeof *v, KSM_COPY_H2D), 0);
        cr_assert_eq(ksm_stream_synchronize(e->s), 0);
        free(v);
    }
}

/*
 * Runs x through the host along boundaries chain[0..n) (each forward_to from the previous one,
 * starting at the network input), then forward_from the last one: measure pass, then real pass.
 * Returns the logits (malloc'd) and the arena size in *arena_bytes. With feat_k >= 0 runs
 * forward_to(-1, feat_k) alone instead and returns those features.
 */
static float *run_chain(struct env *e, ksm_host *h, const ksm_tensor *x, const int *chain, int n,
                        int feat_k, size_t *arena_bytes, ksm_tensor *out_t)
{
    struct ksm_exec ex;
    size_t cap = 0;
    void *arena = NULL;
    ksm_tensor y = {0};
    for (int pass = 0; pass < 2; pass++) {
        bool measure = pass == 0;
        ksm_exec_init(&ex, e->s, measure, arena, cap);
        if (feat_k >= 0) {
            cr_assert_eq(ksm_host_forward_to(h, &ex, -1, feat_k, x, &y), 0);
        } else {
            ksm_tensor cur = *x;
            int prev = -1;
            for (int i = 0; i < n; i++) {
                ksm_tensor nx;
                cr_assert_eq(ksm_host_forward_to(h, &ex, prev, chain[i], &cur, &nx), 0,
                             "forward_to(%d, %d)", prev, chain[i]);
                cur = nx;
                prev = chain[i];
            }
            cr_assert_eq(ksm_host_forward_from(h, &ex, prev, &cur, &y), 0, "forward_from(%d)",
                         prev);
        }
        if (measure) {
            cap = ex.high;
            cr_assert_eq(ksm_alloc_malloc(e->a, cap, e->s, &arena), 0);
            cr_assert_eq(ksm_stream_memset_async(e->s, arena, 0xff, cap), 0);
        }
    }
    cr_assert_leq(ex.high, cap);
    float *out = download(e, &y);
    if (out_t) *out_t = y;
    ksm_alloc_free(e->a, arena);
    if (arena_bytes) *arena_bytes = cap;
    return out;
}

static float *run_full(struct env *e, ksm_host *h, const ksm_tensor *x, ksm_tensor *out_t)
{
    return run_chain(e, h, x, NULL, 0, -1, NULL, out_t);
}

/* ---- host_params ---- */

struct key {
    const char *name;
    int ndim;
    int64_t shape[4];
    bool buffer;
};

static void expect_keys(ksm_host *h, const struct key *keys, int n)
{
    struct ksm_params *ps = ksm_host_params(h);
    cr_assert_eq(ps->n, n);
    for (int i = 0; i < n; i++) {
        const struct ksm_param *p = &ps->p[i];
        cr_expect_str_eq(p->name, keys[i].name);
        cr_expect_eq(p->t.ndim, keys[i].ndim, "%s", keys[i].name);
        for (int d = 0; d < keys[i].ndim; d++)
            cr_expect_eq(p->t.shape[d], keys[i].shape[d], "%s dim %d", keys[i].name, d);
        cr_expect_eq(p->buffer, keys[i].buffer, "%s", keys[i].name);
    }
}

static int64_t buffer_elems(const struct ksm_params *ps)
{
    int64_t n = 0;
    for (int i = 0; i < ps->n; i++)
        if (ps->p[i].buffer) n += ksm_tensor_numel(&ps->p[i].t);
    return n;
}

static void cnn_table(uint32_t base, int64_t params, int64_t buffers)
{
    struct ksm_cnn_spec s = {.base_channels = base};
    ksm_host *h = cnn_host(&s, false);
    int64_t c0 = base, c1 = 2 * base, c2 = 4 * base;
    /* clang-format off */
    struct key keys[] = {
        {"blocks.0.conv.weight", 4, {c0, 3, 3, 3}, false},
        {"blocks.0.bn.weight", 1, {c0}, false},
        {"blocks.0.bn.bias", 1, {c0}, false},
        {"blocks.0.bn.running_mean", 1, {c0}, true},
        {"blocks.0.bn.running_var", 1, {c0}, true},
        {"blocks.0.bn.num_batches_tracked", 0, {0}, true},
        {"blocks.1.conv.weight", 4, {c1, c0, 3, 3}, false},
        {"blocks.1.bn.weight", 1, {c1}, false},
        {"blocks.1.bn.bias", 1, {c1}, false},
        {"blocks.1.bn.running_mean", 1, {c1}, true},
        {"blocks.1.bn.running_var", 1, {c1}, true},
        {"blocks.1.bn.num_batches_tracked", 0, {0}, true},
        {"blocks.2.conv.weight", 4, {c2, c1, 3, 3}, false},
        {"blocks.2.bn.weight", 1, {c2}, false},
        {"blocks.2.bn.bias", 1, {c2}, false},
        {"blocks.2.bn.running_mean", 1, {c2}, true},
        {"blocks.2.bn.running_var", 1, {c2}, true},
        {"blocks.2.bn.num_batches_tracked", 0, {0}, true},
        {"classifier.weight", 2, {10, c2}, false},
        {"classifier.bias", 1, {10}, false},
    };
    /* clang-format on */
    expect_keys(h, keys, 20);
    struct ksm_params *ps = ksm_host_params(h);
    cr_expect_eq(ksm_params_count(ps), params);
    cr_expect_eq(buffer_elems(ps), buffers);
    int nbt = ksm_params_find(ps, "blocks.1.bn.num_batches_tracked");
    cr_expect_eq(ps->p[nbt].t.dtype, KSM_DTYPE_I64);
    cr_expect_eq(ps->p[nbt].init, KSM_INIT_ZERO);
    int var = ksm_params_find(ps, "blocks.0.bn.running_var");
    cr_expect_eq(ps->p[var].init, KSM_INIT_ONE);
    int w = ksm_params_find(ps, "blocks.1.conv.weight");
    cr_expect_eq(ps->p[w].init, KSM_INIT_UNIFORM);
    cr_expect_float_eq(ps->p[w].init_a, 1.0 / sqrt(9.0 * c0), 1e-7);
    ksm_host_free(h);
}

Test(host_params, cnn_base8_matches_the_state_dict_table) { cnn_table(8, 6418, 115); }
Test(host_params, cnn_base32_matches_the_state_dict_table) { cnn_table(32, 94762, 451); }

Test(host_params, small_transformer_has_41_keys_and_91104_params)
{
    struct ksm_transformer_spec s = {
        .vocab_size = 97, .n_embd = 48, .n_head = 6, .n_layer = 3, .block_size = 32};
    ksm_host *h = tf_host(&s);
    struct ksm_params *ps = ksm_host_params(h);
    cr_expect_eq(ps->n, 41);
    cr_expect_eq(ksm_params_count(ps), 91104);
    const char *names[] = {"tok_emb.weight", "pos_emb.weight"};
    for (int i = 0; i < 2; i++) cr_expect_str_eq(ps->p[i].name, names[i]);
    /* clang-format off */
    struct key layer[] = {
        {"layers.1.ln1.weight", 1, {48}, false}, {"layers.1.ln1.bias", 1, {48}, false},
        {"layers.1.attn.c_attn.weight", 2, {144, 48}, false},
        {"layers.1.attn.c_attn.bias", 1, {144}, false},
        {"layers.1.attn.c_proj.weight", 2, {48, 48}, false},
        {"layers.1.attn.c_proj.bias", 1, {48}, false},
        {"layers.1.ln2.weight", 1, {48}, false}, {"layers.1.ln2.bias", 1, {48}, false},
        {"layers.1.mlp.c_fc.weight", 2, {192, 48}, false},
        {"layers.1.mlp.c_fc.bias", 1, {192}, false},
        {"layers.1.mlp.c_proj.weight", 2, {48, 192}, false},
        {"layers.1.mlp.c_proj.bias", 1, {48}, false},
    };
    /* clang-format on */
    for (int i = 0; i < 12; i++) {
        const struct ksm_param *p = &ps->p[2 + 12 + i];
        cr_expect_str_eq(p->name, layer[i].name);
        for (int d = 0; d < layer[i].ndim; d++) cr_expect_eq(p->t.shape[d], layer[i].shape[d]);
    }
    cr_expect_str_eq(ps->p[38].name, "ln_f.weight");
    cr_expect_str_eq(ps->p[39].name, "ln_f.bias");
    cr_expect_str_eq(ps->p[40].name, "head.weight");
    cr_expect_eq(ps->p[40].tied_to, 0);
    cr_expect_eq(ps->p[40].t.shape[0], 97);
    cr_expect_eq(ps->p[40].t.shape[1], 48);
    cr_expect_eq(ps->p[0].init, KSM_INIT_NORMAL);
    cr_expect_eq(ps->p[1].init, KSM_INIT_NORMAL);
    ksm_host_free(h);
}

Test(host_params, tinystories_default_declares_30044544_params)
{
    struct ksm_transformer_spec s = {0};
    ksm_host *h = tf_host(&s);
    struct ksm_params *ps = ksm_host_params(h);
    cr_expect_eq(ps->n, 77);
    cr_expect_eq(ksm_params_count(ps), 30044544);
    struct {
        const char *name;
        int64_t r, c;
    } k[] = {{"tok_emb.weight", 50257, 384},
             {"head.weight", 50257, 384},
             {"pos_emb.weight", 256, 384},
             {"layers.5.attn.c_attn.weight", 1152, 384},
             {"layers.5.mlp.c_fc.weight", 1536, 384},
             {"layers.5.mlp.c_proj.weight", 384, 1536}};
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        int j = ksm_params_find(ps, k[i].name);
        cr_assert_geq(j, 0, "%s", k[i].name);
        cr_expect_eq(ps->p[j].t.shape[0], k[i].r, "%s", k[i].name);
        cr_expect_eq(ps->p[j].t.shape[1], k[i].c, "%s", k[i].name);
        cr_expect_null(ps->p[j].t.data);
    }
    ksm_host_free(h);
}

/* ---- host_slots ---- */

Test(host_slots, cnn_default_row_major_and_execution_order)
{
    struct ksm_cnn_spec s = {0};
    ksm_host *h = cnn_host(&s, false);
    cr_assert_eq(ksm_host_topology(h), KSM_TOPOLOGY_CNN);
    cr_assert_eq(ksm_host_injection_count(h), 6);
    const char *ids[] = {"r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2"};
    int exec[] = {0, 2, 4, 1, 3, 5}, ch[] = {32, 64, 128, 32, 64, 128};
    int64_t side[] = {32, 16, 8, 16, 8, 4};
    int64_t in_shape[4] = {2, 3, 32, 32};
    ksm_tensor x;
    cr_assert_eq(ksm_tensor_init(&x, NULL, NULL, KSM_DTYPE_F32, 4, in_shape), 0);
    for (int i = 0; i < 6; i++) {
        const struct ksm_injection *j = ksm_host_injection(h, i);
        cr_expect_str_eq(j->slot_id, ids[i]);
        cr_expect_eq(j->row, i / 3);
        cr_expect_eq(j->col, i % 3);
        cr_expect_eq(j->order, i);
        cr_expect_eq(j->exec_index, exec[i]);
        cr_expect_eq(j->channels, ch[i]);
        cr_expect_eq(j->surface, i < 3 ? KSM_SURFACE_PRE_POOL : KSM_SURFACE_POST_POOL);
        int c = i % 3;
        cr_expect_float_eq(j->position, i < 3 ? (2.0 * c + 1) / 6 : (2.0 * c + 2) / 6, 1e-12);
        cr_expect_eq(j->layer_start, c);
        cr_expect_eq(j->layer_end, c + 1);
        cr_expect_eq(ksm_host_find_injection(h, ids[i]), j);
        int nd;
        int64_t sh[KSM_MAX_DIMS];
        ksm_host_boundary_shape(h, &x, j->exec_index, &nd, sh);
        cr_expect_eq(nd, 4);
        cr_expect_eq(sh[0], 2);
        cr_expect_eq(sh[1], ch[i], "%s", ids[i]);
        cr_expect_eq(sh[2], side[i], "%s", ids[i]);
        cr_expect_eq(sh[3], side[i], "%s", ids[i]);
    }
    cr_expect_null(ksm_host_find_injection(h, "r1c3"));
    cr_expect_null(ksm_host_find_injection(h, "r2c0"));
    cr_expect_null(ksm_host_injection(h, 6));
    int nd;
    int64_t sh[KSM_MAX_DIMS];
    ksm_host_output_shape(h, &x, &nd, sh);
    cr_expect_eq(nd, 2);
    cr_expect_eq(sh[0], 2);
    cr_expect_eq(sh[1], 10);
    ksm_host_free(h);
}

Test(host_slots, cifar_minimal_has_no_row_1)
{
    struct ksm_cnn_spec s = {.base_channels = 2, .kernel_size = 1, .pool_layers = 0};
    ksm_host *h = cnn_host(&s, true);
    cr_assert_eq(ksm_host_injection_count(h), 3);
    int64_t in_shape[4] = {1, 3, 32, 32};
    ksm_tensor x;
    cr_assert_eq(ksm_tensor_init(&x, NULL, NULL, KSM_DTYPE_F32, 4, in_shape), 0);
    for (int i = 0; i < 3; i++) {
        const struct ksm_injection *j = ksm_host_injection(h, i);
        char id[8];
        snprintf(id, sizeof id, "r0c%d", i);
        cr_expect_str_eq(j->slot_id, id);
        cr_expect_eq(j->exec_index, i);
        cr_expect_eq(j->channels, 2 << i);
        int nd;
        int64_t sh[KSM_MAX_DIMS];
        ksm_host_boundary_shape(h, &x, i, &nd, sh);
        cr_expect_eq(sh[2], 32);
        cr_expect_eq(sh[3], 32);
    }
    cr_expect_null(ksm_host_find_injection(h, "r1c0"));
    ksm_host_free(h);
}

Test(host_slots, transformer_segments)
{
    struct ksm_transformer_spec s = {0};
    ksm_host *h = tf_host(&s);
    cr_assert_eq(ksm_host_topology(h), KSM_TOPOLOGY_TRANSFORMER);
    cr_assert_eq(ksm_host_injection_count(h), 3);
    for (int i = 0; i < 3; i++) {
        const struct ksm_injection *j = ksm_host_injection(h, i);
        char id[8];
        snprintf(id, sizeof id, "r0c%d", i);
        cr_expect_str_eq(j->slot_id, id);
        cr_expect_eq(j->row, 0);
        cr_expect_eq(j->col, i);
        cr_expect_eq(j->order, i);
        cr_expect_eq(j->exec_index, i);
        cr_expect_eq(j->channels, 384);
        cr_expect_eq(j->surface, KSM_SURFACE_BLOCK_END);
        cr_expect_eq(j->layer_start, 2 * i);
        cr_expect_eq(j->layer_end, 2 * i + 2);
        cr_expect_float_eq(j->position, (i + 1) / 3.0, 1e-12);
    }
    int64_t in_shape[2] = {4, 17};
    ksm_tensor x;
    cr_assert_eq(ksm_tensor_init(&x, NULL, NULL, KSM_DTYPE_I64, 2, in_shape), 0);
    int nd;
    int64_t sh[KSM_MAX_DIMS];
    ksm_host_boundary_shape(h, &x, 1, &nd, sh);
    cr_expect_eq(nd, 3);
    cr_expect_eq(sh[0], 4);
    cr_expect_eq(sh[1], 17);
    cr_expect_eq(sh[2], 384);
    ksm_host_output_shape(h, &x, &nd, sh);
    cr_expect_eq(nd, 3);
    cr_expect_eq(sh[2], 50257);
    ksm_host_free(h);
}

/* ---- host_spec ---- */

Test(host_spec, zero_fields_take_esper_defaults)
{
    char err[256];
    struct ksm_cnn_spec c = {0};
    cr_assert_eq(ksm_host_resolve_cnn(&c, false, err, sizeof err), 0);
    cr_expect_eq(c.num_classes, 10);
    cr_expect_eq(c.n_blocks, 3);
    cr_expect_eq(c.base_channels, 32);
    cr_expect_eq(c.pool_layers, 3);
    cr_expect_eq(c.kernel_size, 3);
    cr_expect_eq(c.in_channels, 3);
    struct ksm_cnn_spec c0 = {.n_blocks = 5, .pool_layers = 0};
    cr_assert_eq(ksm_host_resolve_cnn(&c0, true, err, sizeof err), 0);
    cr_expect_eq(c0.pool_layers, 0);
    struct ksm_cnn_spec cm = {.n_blocks = 5, .pool_layers = -1};
    cr_assert_eq(ksm_host_resolve_cnn(&cm, true, err, sizeof err), 0);
    cr_expect_eq(cm.pool_layers, 5);
    struct ksm_cnn_spec c2 = {.pool_layers = 2};
    cr_assert_eq(ksm_host_resolve_cnn(&c2, false, err, sizeof err), 0);
    cr_expect_eq(c2.pool_layers, 2);
    struct ksm_transformer_spec t = {0};
    cr_assert_eq(ksm_host_resolve_transformer(&t, err, sizeof err), 0);
    cr_expect_eq(t.vocab_size, 50257);
    cr_expect_eq(t.n_embd, 384);
    cr_expect_eq(t.n_head, 6);
    cr_expect_eq(t.n_layer, 6);
    cr_expect_eq(t.block_size, 256);
    cr_expect_eq(t.num_segments, 3);
}

Test(host_spec, bad_specs_name_the_field)
{
    struct {
        struct ksm_cnn_spec s;
        bool set;
        const char *field;
    } cnn[] = {
        {{.n_blocks = 1}, false, "n_blocks"},
        {{.n_blocks = 17}, false, "n_blocks"},
        {{.base_channels = 2048}, false, "base_channels"},
        {{.n_blocks = 16, .base_channels = 1}, false, "base_channels"},
        {{.num_classes = (1u << 20) + 1}, false, "num_classes"},
        {{.kernel_size = 4}, false, "kernel_size"},
        {{.kernel_size = 17}, false, "kernel_size"},
        {{.pool_layers = 4}, true, "pool_layers"},
        {{.pool_layers = -2}, true, "pool_layers"},
        {{.in_channels = 5000}, false, "in_channels"},
    };
    for (size_t i = 0; i < sizeof cnn / sizeof cnn[0]; i++) {
        char err[256] = "";
        struct ksm_cnn_spec s = cnn[i].s, before = s;
        cr_expect_eq(ksm_host_resolve_cnn(&s, cnn[i].set, err, sizeof err), KSM_EINVAL, "%zu", i);
        cr_expect_not_null(strstr(err, cnn[i].field), "case %zu: %s", i, err);
        cr_expect_eq(memcmp(&s, &before, sizeof s), 0, "a failed resolve changed the spec");
        ksm_host *h = (ksm_host *)&s;
        cr_expect_eq(ksm_host_new_cnn(&s, &h, NULL, 0), KSM_EINVAL);
        cr_expect_null(h);
    }
    struct {
        struct ksm_transformer_spec s;
        const char *field;
    } tf[] = {
        {{.vocab_size = (1u << 20) + 1}, "vocab_size"},
        {{.n_embd = 100}, "n_head"},
        {{.n_embd = 5000}, "n_embd"},
        {{.n_embd = 600, .n_head = 2}, "n_head"}, /* head size 300 > 256 */
        {{.n_layer = 65}, "n_layer"},
        {{.n_layer = 4}, "num_segments"},
        {{.block_size = 8193}, "block_size"},
    };
    for (size_t i = 0; i < sizeof tf / sizeof tf[0]; i++) {
        char err[256] = "";
        struct ksm_transformer_spec s = tf[i].s;
        cr_expect_eq(ksm_host_resolve_transformer(&s, err, sizeof err), KSM_EINVAL, "%zu", i);
        cr_expect_not_null(strstr(err, tf[i].field), "case %zu: %s", i, err);
    }
    /* every field within range but too many parameters in all */
    char err[256] = "";
    struct ksm_transformer_spec big = {.vocab_size = 1u << 20, .n_embd = 4096, .n_head = 32};
    ksm_host *h = NULL;
    cr_expect_eq(ksm_host_new_transformer(&big, &h, err, sizeof err), KSM_EINVAL);
    cr_expect_not_null(strstr(err, "parameters"), "%s", err);
    cr_expect_null(h);
}

/* ---- host_golden ---- */

/* Loads every host tensor of the fixture by its esper name; the names must match both ways. */
static void load_weights(struct env *e, ksm_host *h, ksm_st_file *f)
{
    struct ksm_params *ps = ksm_host_params(h);
    int n_host = 0;
    for (size_t i = 0; i < ksm_st_count(f); i++)
        if (strncmp(ksm_st_get(f, i)->name, "host.", 5) == 0) n_host++;
    cr_expect_eq(n_host, ps->n, "fixture has %d host tensors, the host declares %d", n_host, ps->n);
    for (int i = 0; i < ps->n; i++) {
        struct ksm_param *p = &ps->p[i];
        char name[128];
        snprintf(name, sizeof name, "host.%s", p->name);
        const struct ksm_st_tensor *st = kt_golden_need(f, name);
        cr_assert_eq(st->dtype, p->t.dtype, "%s", name);
        cr_assert_eq(st->ndim, p->t.ndim, "%s", name);
        for (int d = 0; d < st->ndim; d++) cr_assert_eq(st->shape[d], p->t.shape[d], "%s", name);
        cr_assert_eq(st->nbytes, ksm_tensor_nbytes(&p->t));
        if (p->tied_to >= 0) continue; /* same bytes as its target in a torch state_dict */
        cr_assert_eq(ksm_stream_memcpy_async(e->s, p->t.data, st->data, st->nbytes, KSM_COPY_H2D),
                     0);
        cr_assert_eq(ksm_stream_synchronize(e->s), 0);
    }
}

static ksm_tensor upload_st(struct env *e, const struct ksm_st_tensor *st)
{
    return upload(e, st->dtype, st->ndim, st->shape, st->data);
}

static double worst_rel;

static double compare(const char *cs, const float *out, const ksm_tensor *shape_of_out,
                      const struct ksm_st_tensor *ref)
{
    cr_assert_eq(shape_of_out->ndim, ref->ndim, "%s", cs);
    for (int d = 0; d < ref->ndim; d++)
        cr_assert_eq(shape_of_out->shape[d], ref->shape[d], "%s dim %d", cs, d);
    float *r = kt_golden_floats(ref);
    double rel =
        kt_golden_expect_f32(cs, out, r, (int64_t)(ref->nbytes / sizeof(float)), GOLDEN_TOL);
    fprintf(stderr, "host_golden %s: rel %.1e\n", cs, rel);
    free(r);
    if (rel > worst_rel) worst_rel = rel;
    return rel;
}

TestSuite(host_golden, .timeout = 120);

Test(host_golden, cnn_logits_and_features_match_pytorch)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open("hosts_cnn.safetensors");
    const char *xs[] = {"x16", "x12"};
    int pools[] = {3, 1};
    for (int p = 0; p < 2; p++) {
        struct ksm_cnn_spec s = {.base_channels = 8, .pool_layers = pools[p]};
        ksm_host *h = cnn_host(&s, true);
        materialise(&e, h);
        load_weights(&e, h, f);
        for (int i = 0; i < 2; i++) {
            const struct ksm_st_tensor *xst = kt_golden_need(f, xs[i]);
            ksm_tensor x = upload_st(&e, xst);
            char cs[64];
            snprintf(cs, sizeof cs, "logits.%s.p%d", xs[i], pools[p]);
            ksm_tensor yt;
            float *y = run_full(&e, h, &x, &yt);
            compare(cs, y, &yt, kt_golden_need(f, cs));
            free(y);
            if (p == 0 && i == 0) {
                for (int k = 0; k < ksm_host_injection_count(h); k++) {
                    const struct ksm_injection *j = ksm_host_injection(h, k);
                    snprintf(cs, sizeof cs, "feat.x16.p3.%s", j->slot_id);
                    float *ft = run_chain(&e, h, &x, NULL, 0, j->exec_index, NULL, &yt);
                    compare(cs, ft, &yt, kt_golden_need(f, cs));
                    free(ft);
                }
            }
            ksm_alloc_free(e.a, x.data);
        }
        ksm_params_release(ksm_host_params(h), e.a, NULL, 0);
        ksm_host_free(h);
        e.h = NULL;
    }
    fprintf(stderr, "host_golden cnn worst: rel %.1e\n", worst_rel);
    ksm_st_close(f);
    env_fini(&e);
}

Test(host_golden, transformer_logits_and_features_match_pytorch)
{
    struct env e;
    env_init(&e);
    ksm_st_file *f = kt_golden_open("hosts_tf.safetensors");
    struct ksm_transformer_spec s = {
        .vocab_size = 97, .n_embd = 48, .n_head = 6, .n_layer = 3, .block_size = 32};
    ksm_host *h = tf_host(&s);
    materialise(&e, h);
    load_weights(&e, h, f);
    const char *ts[] = {"t7", "t32"};
    for (int i = 0; i < 2; i++) {
        const struct ksm_st_tensor *xst = kt_golden_need(f, ts[i]);
        char cs[64], err[256] = "";
        /* the host-side check passes on the fixture's ids */
        void *ids = malloc(xst->nbytes);
        memcpy(ids, xst->data, xst->nbytes);
        ksm_tensor hx;
        cr_assert_eq(ksm_tensor_init(&hx, NULL, ids, xst->dtype, xst->ndim, xst->shape), 0);
        cr_expect_eq(ksm_host_check_input(h, &hx, err, sizeof err), 0, "%s", err);
        ksm_tensor x = upload_st(&e, xst);
        snprintf(cs, sizeof cs, "logits.%s", ts[i]);
        ksm_tensor yt;
        float *y = run_full(&e, h, &x, &yt);
        compare(cs, y, &yt, kt_golden_need(f, cs));
        free(y);
        if (i == 0) {
            for (int k = 0; k < 3; k++) {
                snprintf(cs, sizeof cs, "feat.t7.r0c%d", k);
                float *ft = run_chain(&e, h, &x, NULL, 0, k, NULL, &yt);
                compare(cs, ft, &yt, kt_golden_need(f, cs));
                free(ft);
            }
            /* I32 ids give the same logits */
            int32_t *i32 = malloc((size_t)ksm_tensor_numel(&hx) * sizeof *i32);
            for (int64_t j = 0; j < ksm_tensor_numel(&hx); j++)
                i32[j] = (int32_t)((int64_t *)ids)[j];
            ksm_tensor x32 = upload(&e, KSM_DTYPE_I32, 2, xst->shape, i32);
            y = run_full(&e, h, &x32, &yt);
            compare("logits.t7.i32", y, &yt, kt_golden_need(f, "logits.t7"));
            free(y);
            free(i32);
            ksm_alloc_free(e.a, x32.data);
        }
        free(ids);
        ksm_alloc_free(e.a, x.data);
    }
    fprintf(stderr, "host_golden transformer worst: rel %.1e\n", worst_rel);
    ksm_st_close(f);
    env_fini(&e);
}

/* ---- host_route ---- */

TestSuite(host_route, .timeout = 120);

/* Every subset of boundaries, as a chain, gives the full forward's logits bit for bit. */
static void check_all_chains(struct env *e, ksm_host *h, const ksm_tensor *x)
{
    ksm_tensor yt;
    size_t full_arena = 0;
    float *ref = run_chain(e, h, x, NULL, 0, -1, &full_arena, &yt);
    int64_t n = ksm_tensor_numel(&yt);
    int nb = ksm_host_injection_count(h);
    for (unsigned mask = 1; mask < (1u << nb); mask++) {
        int chain[KSM_MAX_SLOTS], n_chain = 0;
        for (int k = 0; k < nb; k++)
            if (mask & (1u << k)) chain[n_chain++] = k;
        float *y = run_chain(e, h, x, chain, n_chain, -1, NULL, &yt);
        cr_assert_eq(ksm_tensor_numel(&yt), n);
        cr_expect_eq(memcmp(y, ref, (size_t)n * sizeof *y), 0, "chain mask 0x%x differs", mask);
        free(y);
    }
    free(ref);
}

Test(host_route, cnn_chains_equal_the_full_forward)
{
    struct env e;
    env_init(&e);
    int pools[] = {3, 1, 0};
    for (int p = 0; p < 3; p++) {
        struct ksm_cnn_spec s = {.base_channels = 4, .pool_layers = pools[p]};
        ksm_host *h = cnn_host(&s, true);
        materialise(&e, h);
        randomise(&e, h, 11);
        float data[2 * 3 * 12 * 10];
        for (size_t i = 0; i < sizeof data / sizeof data[0]; i++)
            data[i] = (float)sin(0.37 * (double)i);
        int64_t shape[4] = {2, 3, 12, 10};
        ksm_tensor x = upload(&e, KSM_DTYPE_F32, 4, shape, data);
        check_all_chains(&e, h, &x);
        ksm_alloc_free(e.a, x.data);
        ksm_params_release(ksm_host_params(h), e.a, NULL, 0);
        ksm_host_free(h);
        e.h = NULL;
    }
    env_fini(&e);
}

Test(host_route, transformer_chains_equal_the_full_forward)
{
    struct env e;
    env_init(&e);
    int segs[] = {3, 1, 6};
    for (int i = 0; i < 3; i++) {
        struct ksm_transformer_spec s = {.vocab_size = 31,
                                         .n_embd = 16,
                                         .n_head = 4,
                                         .n_layer = 6,
                                         .block_size = 12,
                                         .num_segments = (uint32_t)segs[i]};
        ksm_host *h = tf_host(&s);
        materialise(&e, h);
        int64_t ids[2 * 9];
        for (int j = 0; j < 18; j++) ids[j] = (j * 7 + 3) % 31;
        int64_t shape[2] = {2, 9};
        ksm_tensor x = upload(&e, KSM_DTYPE_I64, 2, shape, ids);
        check_all_chains(&e, h, &x);
        ksm_alloc_free(e.a, x.data);
        ksm_params_release(ksm_host_params(h), e.a, NULL, 0);
        ksm_host_free(h);
        e.h = NULL;
    }
    env_fini(&e);
}

Test(host_route, backwards_same_and_unknown_boundaries_are_errors)
{
    struct env e;
    env_init(&e);
    struct ksm_cnn_spec s = {.base_channels = 4};
    ksm_host *h = cnn_host(&s, false);
    materialise(&e, h);
    int64_t shape[4] = {1, 3, 8, 8};
    ksm_tensor x;
    cr_assert_eq(ksm_tensor_init(&x, e.dev, (void *)64, KSM_DTYPE_F32, 4, shape), 0);
    struct ksm_exec ex;
    ksm_exec_init(&ex, e.s, true, NULL, 0);
    ksm_tensor y;
    int bad[][2] = {{2, 1}, {3, 3}, {-1, -1}, {-2, 1}, {0, 6}, {5, 7}, {-1, 6}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_expect_eq(ksm_host_forward_to(h, &ex, bad[i][0], bad[i][1], &x, &y), KSM_EINVAL,
                     "(%d, %d)", bad[i][0], bad[i][1]);
    cr_expect_eq(ksm_host_forward_from(h, &ex, 6, &x, &y), KSM_EINVAL);
    cr_expect_eq(ksm_host_forward_from(h, &ex, -2, &x, &y), KSM_EINVAL);
    /* a real pass before the parameters exist */
    ksm_host *bare = cnn_host(&s, false);
    ksm_exec_init(&ex, e.s, false, (void *)64, 1 << 20);
    cr_expect_eq(ksm_host_forward_to(bare, &ex, -1, 0, &x, &y), KSM_ENOTREADY);
    cr_expect_eq(ksm_host_forward_from(bare, &ex, -1, &x, &y), KSM_ENOTREADY);
    cr_expect_eq(ex.off, 0);
    ksm_host_free(bare);
    ksm_exec_init(&ex, e.s, true, NULL, 0);
    /* features of the wrong shape for the boundary */
    cr_expect_eq(ksm_host_forward_to(h, &ex, 0, 2, &x, &y), KSM_ESHAPE);
    cr_expect_eq(ksm_host_forward_to(h, &ex, -1, 0, &x, &y), 0);
    /* the output stays allocated, the temporaries above it are released */
    cr_expect_eq(ex.off,
                 (ksm_tensor_nbytes(&y) + KSM_EXEC_ALIGN - 1) / KSM_EXEC_ALIGN * KSM_EXEC_ALIGN);
    cr_expect_gt(ex.high, ex.off);
    env_fini(&e);
}

/* The arena of a full forward holds a few activations, not all of them. */
Test(host_route, arena_peak_stays_near_a_few_activations)
{
    struct env e;
    env_init(&e);
    struct ksm_cnn_spec s = {.base_channels = 8, .n_blocks = 5, .pool_layers = 2};
    ksm_host *h = cnn_host(&s, true);
    materialise(&e, h);
    int64_t shape[4] = {4, 3, 32, 32};
    ksm_tensor x;
    cr_assert_eq(ksm_tensor_init(&x, e.dev, (void *)64, KSM_DTYPE_F32, 4, shape), 0);
    size_t sum = 0, maxact = 0, ws = 0;
    ksm_tensor in = x;
    struct ksm_params *ps = ksm_host_params(h);
    for (int k = 0; k < ksm_host_injection_count(h); k++) {
        int nd;
        int64_t sh[KSM_MAX_DIMS];
        ksm_host_boundary_shape(h, &x, k, &nd, sh);
        size_t b = (size_t)(sh[0] * sh[1] * sh[2] * sh[3]) * 4;
        sum += b;
        if (b > maxact) maxact = b;
        if (sh[1] != in.shape[1]) { /* a block: its conv's workspace */
            char name[64];
            snprintf(name, sizeof name, "blocks.%d.conv.weight", (int)log2((double)sh[1] / 8));
            int w = ksm_params_find(ps, name);
            cr_assert_geq(w, 0, "%s", name);
            size_t n = ksm_op_conv2d_workspace_size(&in, ksm_params_tensor(ps, w), 1, 1, 1);
            if (n > ws) ws = n;
        }
        cr_assert_eq(ksm_tensor_init(&in, e.dev, (void *)64, KSM_DTYPE_F32, 4, sh), 0);
    }
    struct ksm_exec ex;
    ksm_exec_init(&ex, e.s, true, NULL, 0);
    ksm_tensor y;
    cr_assert_eq(ksm_host_forward_from(h, &ex, -1, &x, &y), 0);
    fprintf(stderr, "host_route arena %zu bytes: activations sum %zu, max %zu, conv ws %zu\n",
            ex.high, sum, maxact, ws);
    cr_expect_lt(ex.high - ws, sum); /* ws: the convolution's per-thread im2col columns */
    /* two ping-pong activations, one conv workspace, the pooled features and the logits */
    cr_expect_leq(ex.high, 2 * maxact + ws + 4096);
    env_fini(&e);
}

/* ---- host_input ---- */

Test(host_input, cnn_table)
{
    struct ksm_cnn_spec s = {.base_channels = 4};
    ksm_host *h = cnn_host(&s, false);
    float buf[1];
    struct {
        enum ksm_dtype dt;
        int ndim;
        int64_t shape[4];
        int rc;
        const char *word;
    } cases[] = {
        {KSM_DTYPE_F32, 4, {2, 3, 8, 8}, 0, NULL},
        {KSM_DTYPE_F32, 4, {1, 3, 8, 9}, 0, NULL},
        {KSM_DTYPE_F32, 3, {3, 8, 8}, KSM_ESHAPE, "[B, 3, H, W]"},
        {KSM_DTYPE_F32, 4, {2, 4, 8, 8}, KSM_ESHAPE, "channels"},
        {KSM_DTYPE_I64, 4, {2, 3, 8, 8}, KSM_EDTYPE, "I64"},
        {KSM_DTYPE_F32, 4, {2, 3, 7, 8}, KSM_ESHAPE, "at least 8"},
        {KSM_DTYPE_F32, 4, {2, 3, 8, 4}, KSM_ESHAPE, "at least 8"},
        {KSM_DTYPE_F32, 4, {0, 3, 8, 8}, KSM_ESHAPE, "batch"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ksm_tensor x;
        cr_assert_eq(ksm_tensor_init(&x, NULL, buf, cases[i].dt, cases[i].ndim, cases[i].shape), 0);
        char err[256] = "";
        cr_expect_eq(ksm_host_check_input(h, &x, err, sizeof err), cases[i].rc, "case %zu: %s", i,
                     err);
        if (cases[i].word) cr_expect_not_null(strstr(err, cases[i].word), "case %zu: %s", i, err);
    }
    ksm_host_free(h);
}

Test(host_input, transformer_table)
{
    struct ksm_transformer_spec s = {
        .vocab_size = 97, .n_embd = 48, .n_head = 6, .n_layer = 3, .block_size = 32};
    ksm_host *h = tf_host(&s);
    int64_t ok[2 * 4] = {0, 1, 96, 5, 7, 8, 9, 10};
    int64_t big[2 * 4] = {0, 1, 97, 5, 7, 8, 9, 10};
    int64_t neg[2 * 4] = {0, 1, 2, 5, 7, -1, 9, 10};
    int32_t ok32[4] = {0, 96, 3, 4}, big32[4] = {0, 1, 3, 1000};
    float f[8] = {0};
    static int64_t many[33];
    struct {
        const void *data;
        enum ksm_dtype dt;
        int ndim;
        int64_t shape[3];
        int rc;
        const char *word;
    } cases[] = {
        {ok, KSM_DTYPE_I64, 2, {2, 4}, 0, NULL},
        {ok32, KSM_DTYPE_I32, 2, {1, 4}, 0, NULL},
        {ok, KSM_DTYPE_I64, 1, {8}, KSM_ESHAPE, "[B, T]"},
        {ok, KSM_DTYPE_I64, 3, {2, 2, 2}, KSM_ESHAPE, "[B, T]"},
        {f, KSM_DTYPE_F32, 2, {2, 4}, KSM_EDTYPE, "F32"},
        {many, KSM_DTYPE_I64, 2, {1, 33}, KSM_ESHAPE, "block_size"},
        {big, KSM_DTYPE_I64, 2, {2, 4}, KSM_EINVAL, "97 at [0, 2]"},
        {neg, KSM_DTYPE_I64, 2, {2, 4}, KSM_EINVAL, "-1 at [1, 1]"},
        {big32, KSM_DTYPE_I32, 2, {1, 4}, KSM_EINVAL, "1000"},
        {ok, KSM_DTYPE_I64, 2, {0, 4}, KSM_ESHAPE, "empty"},
        {ok, KSM_DTYPE_I64, 2, {2, 0}, KSM_ESHAPE, "empty"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ksm_tensor x;
        cr_assert_eq(ksm_tensor_init(&x, NULL, (void *)cases[i].data, cases[i].dt, cases[i].ndim,
                                     cases[i].shape),
                     0);
        char err[256] = "";
        cr_expect_eq(ksm_host_check_input(h, &x, err, sizeof err), cases[i].rc, "case %zu: %s", i,
                     err);
        if (cases[i].word) cr_expect_not_null(strstr(err, cases[i].word), "case %zu: %s", i, err);
    }
    /* a strided (transposed) view is scanned through its strides */
    ksm_tensor x, xt;
    int64_t sh[2] = {4, 2};
    cr_assert_eq(ksm_tensor_init(&x, NULL, neg, KSM_DTYPE_I64, 2, sh), 0);
    int perm[2] = {1, 0};
    cr_assert_eq(ksm_tensor_permute(&xt, &x, perm), 0);
    char err[256] = "";
    cr_expect_eq(ksm_host_check_input(h, &xt, err, sizeof err), KSM_EINVAL);
    cr_expect_not_null(strstr(err, "-1 at [1, 2]"), "%s", err);
    ksm_host_free(h);
}
