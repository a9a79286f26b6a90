/*
 * Whole-engine throughput through the public API (include/kasmina/kasmina.h), against
 * tests/bench/torch_model.py running the same models with the same weights.
 *
 *   bench_model export DIR
 *       Builds both models, writes their weights with ksm_model_export_weights to
 *       DIR/cnn.safetensors and DIR/tf.safetensors (esper state_dict names + each slot's
 *       _extra_state), and DIR/io.safetensors: the inputs and targets, and kasmina's outputs
 *       (CNN logits, Evaluate losses/accuracies, transformer logits of row 0) for the
 *       numerics check in torch_model.py.
 *   bench_model serve DIR [TARGET]
 *       Builds both models and loads DIR/{cnn,tf}.safetensors (strict) so the weights are
 *       exactly the exported ones, prints "ready", then answers one command per stdin line,
 *       "<row> <reps>": reps 0 runs one untimed warm-up call (plans, caches) and prints
 *       "ok <row>"; otherwise it prints the median of reps timed calls:
 *           row name=cnn_forward ms=12.3 per_s=10406.5 unit=img/s
 *       Rows: cnn_forward, cnn_eval_k8, tf_forward, tf_eval_k2 (others: "skip <row>").
 *       With TARGET (a kasminad address, "unix:/path/to.sock"), the same CNN model is also built
 *       in that daemon through libkasmina-client (CreateModel, the same lifecycle RPCs,
 *       LoadWeights of DIR/cnn.safetensors), and two more rows run over the wire:
 *         cnn_forward_rpc       ksm_client_forward of the same input; its warm-up call checks
 *                               the logits against the in-process engine's ("check" line)
 *         cnn_forward_rpc_wire  the same Forward request to a model id the daemon does not
 *                               hold: the request's whole way (client encode, 1.5 MB over the
 *                               socket, server decode and convert, the error reply) without
 *                               the engine, i.e. the per-call cost of the wire
 *       The command "mem" prints, per row, the device allocator's figures over that row's
 *       timed calls (steady state: after the warm-up call), then "ok mem":
 *           mem name=cnn_forward device=cpu:0 calls=8 allocs=0 cache_hits=0 device_allocs=0
 *               peak_reserved=... peak_allocated=...
 *       The CNN runs on cpu:0 and the transformer on cpu:1 (two logical CPU devices, one
 *       compute pool), so each model's rows have an allocator of their own; the peaks are the
 *       high-water marks over the row's calls (ksm_alloc_reset_peak_stats before each batch).
 *       The rpc rows' figures are the daemon's allocator, through MemoryStats (no reset over
 *       the wire: the peaks since the daemon started; it holds only this model).
 *       tests/bench/run.sh model drives this and torch_model.py's same protocol call by call,
 *       alternating the two sides (the VM's speed drifts).
 *   Both modes first print "info openblas_core=<core>": the OpenBLAS kernels the engine's CPU
 *   backend runs (run.sh gives PyTorch's best configuration the same).
 *
 * Models (issue 7, a-c):
 *   cnn: base 32, 3 blocks, all 6 slots; conv_light r0c1, attention r1c1, bottleneck r0c2,
 *        ADD, BLENDING (permissive gates) at alpha 0.5; batch 128 at 32x32 F32.
 *        Evaluate: K = 8 explicit configs (every on/off combination of the three seeds,
 *        on = 1, off = 0; config c sets seed j on when bit j of c is set) x 128 rows.
 *   tf:  TinyStories preset (V 50257, D 384, 6 layers, 6 heads, block 256, 3 segments);
 *        lora r0c0 and mlp r0c1, ADD, BLENDING at alpha 0.5; batch 8 x 256 tokens.
 *        Evaluate: K = 2 configs ("main": both 0.5, "all_off": both 0), loss in the engine.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"
#include "kasmina/alloc.h"
#include "kasmina/client.h"
#include "kasmina/kasmina.h"
#include "kasmina/safetensors.h"

#define CNN_B  128
#define CNN_HW 32
#define CNN_K  8
#define TF_B   8
#define TF_T   256
#define TF_V   50257
#define TF_K   2

static char err[512];

#define CHECKE(x)                                                                                  \
    do {                                                                                           \
        int rc_ = (x);                                                                             \
        if (rc_ != 0) {                                                                            \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #x,                  \
                    ksm_strerror(rc_), err);                                                       \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

static const char *const CNN_SEED_SLOTS[3] = {"r0c1", "r1c1", "r0c2"};
static const char *const CNN_SEED_BPS[3] = {"conv_light", "attention", "bottleneck"};
static const char *const TF_SEED_SLOTS[2] = {"r0c0", "r0c1"};
static const char *const TF_SEED_BPS[2] = {"lora", "mlp"};

/* Germinates, advances to BLENDING (permissive gates) and sets alpha 0.5. */
static void grow(ksm_model *m, const char *slot, const char *bp, uint64_t seed)
{
    struct ksm_germinate_args g = {.blueprint_id = bp,
                                   .blend_algorithm_id = "linear",
                                   .alpha_algorithm = KSM_ALGO_ADD,
                                   .init_seed = seed};
    CHECKE(ksm_model_germinate(m, slot, &g, NULL, err, sizeof err));
    struct ksm_gate_result gate;
    struct ksm_slot_report r;
    /* G2 wants 10 recorded epochs of training (the same sequence as tests/engine). */
    struct ksm_metrics_update u = {.has_val_accuracy = true,
                                   .val_accuracy = 50,
                                   .has_gradient_health = true,
                                   .gradient_health = 0.9,
                                   .has_exploding = true,
                                   .exploding = false};
    for (enum ksm_stage want = KSM_STAGE_TRAINING; want <= KSM_STAGE_BLENDING; want++) {
        if (want == KSM_STAGE_BLENDING)
            for (int i = 0; i < 10; i++)
                CHECKE(ksm_model_record_metrics(m, slot, &u, NULL, err, sizeof err));
        CHECKE(ksm_model_advance(m, slot, want, &gate, &r, err, sizeof err));
        if (!gate.passed || r.stage != want) {
            fprintf(stderr, "%s: gate %s to %s failed: %s\n", slot, ksm_gate_level_name(gate.gate),
                    ksm_stage_name(want), gate.n_failed ? gate.checks_failed[0] : "");
            exit(1);
        }
    }
    CHECKE(ksm_model_set_alpha(m, slot, 0.5, &r, err, sizeof err));
    if (r.stage != KSM_STAGE_BLENDING || r.controller.alpha != 0.5) {
        fprintf(stderr, "%s: expected BLENDING at 0.5, got %s at %g\n", slot,
                ksm_stage_name(r.stage), r.controller.alpha);
        exit(1);
    }
}

/* The CPU engine has two logical devices sharing one compute pool: the CNN on cpu:0, the
 * transformer on cpu:1, so that each model's workload has an allocator of its own (the "mem"
 * figures). On another default device (KASMINA_BENCH_DEVICE) both models share it. */
static const char *tf_device;

static ksm_model *make_model(ksm_engine *e, bool tf)
{
    struct ksm_model_spec spec = {
        .permissive_gates = true, .init_seed = tf ? 2 : 1, .device = tf ? tf_device : NULL};
    if (tf)
        spec.topology = KSM_TOPOLOGY_TRANSFORMER; /* zero fields = the TinyStories preset */
    else {
        spec.topology = KSM_TOPOLOGY_CNN;
        spec.cnn.base_channels = 32;
        spec.cnn.n_blocks = 3;
    }
    ksm_model *m;
    CHECKE(ksm_engine_model_create(e, tf ? "tf" : "cnn", &spec, &m, err, sizeof err));
    if (tf)
        for (int i = 0; i < 2; i++) grow(m, TF_SEED_SLOTS[i], TF_SEED_BPS[i], 100 + (uint64_t)i);
    else
        for (int i = 0; i < 3; i++) grow(m, CNN_SEED_SLOTS[i], CNN_SEED_BPS[i], 10 + (uint64_t)i);
    return m;
}

/* ---- inputs (deterministic) ---- */

static uint64_t xs(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1Dull;
}

struct inputs {
    float *cnn_x;
    int64_t *cnn_y, *tf_x, *tf_y;
    ksm_tensor tcnn_x, tcnn_y, ttf_x, ttf_y;
};

static void make_inputs(struct inputs *in)
{
    size_t nx = (size_t)CNN_B * 3 * CNN_HW * CNN_HW, nt = (size_t)TF_B * TF_T;
    in->cnn_x = malloc(nx * sizeof(float));
    in->cnn_y = malloc(CNN_B * sizeof(int64_t));
    in->tf_x = malloc(nt * sizeof(int64_t));
    in->tf_y = malloc(nt * sizeof(int64_t));
    bench_fill(in->cnn_x, nx, 42);
    uint64_t s = 0x1234567ull;
    for (int i = 0; i < CNN_B; i++) in->cnn_y[i] = (int64_t)(xs(&s) % 10);
    for (size_t i = 0; i < nt; i++) in->tf_x[i] = (int64_t)(xs(&s) % TF_V);
    for (int b = 0; b < TF_B; b++)
        for (int t = 0; t < TF_T; t++)
            in->tf_y[b * TF_T + t] =
                t + 1 < TF_T ? in->tf_x[b * TF_T + t + 1] : (int64_t)(xs(&s) % TF_V);
    ksm_tensor_init(&in->tcnn_x, NULL, in->cnn_x, KSM_DTYPE_F32, 4,
                    (const int64_t[]){CNN_B, 3, CNN_HW, CNN_HW});
    ksm_tensor_init(&in->tcnn_y, NULL, in->cnn_y, KSM_DTYPE_I64, 1, (const int64_t[]){CNN_B});
    ksm_tensor_init(&in->ttf_x, NULL, in->tf_x, KSM_DTYPE_I64, 2, (const int64_t[]){TF_B, TF_T});
    ksm_tensor_init(&in->ttf_y, NULL, in->tf_y, KSM_DTYPE_I64, 2, (const int64_t[]){TF_B, TF_T});
}

/* ---- Evaluate configs ---- */

struct configs {
    struct ksm_alpha_config c[CNN_K];
    char names[CNN_K][16];
    float alpha[CNN_K][3];
    size_t n;
};

static void cnn_configs(struct configs *cf)
{
    cf->n = CNN_K;
    for (int c = 0; c < CNN_K; c++) {
        snprintf(cf->names[c], sizeof cf->names[c], "on:%d%d%d", c & 1, (c >> 1) & 1, (c >> 2) & 1);
        for (int j = 0; j < 3; j++) cf->alpha[c][j] = (c >> j) & 1 ? 1.0f : 0.0f;
        cf->c[c] = (struct ksm_alpha_config){
            .name = cf->names[c], .slot_ids = CNN_SEED_SLOTS, .alpha = cf->alpha[c], .n = 3};
    }
}

static void tf_configs(struct configs *cf)
{
    cf->n = TF_K;
    snprintf(cf->names[0], sizeof cf->names[0], "main");
    snprintf(cf->names[1], sizeof cf->names[1], "all_off");
    for (int j = 0; j < 2; j++) {
        cf->alpha[0][j] = 0.5f;
        cf->alpha[1][j] = 0.0f;
    }
    for (int c = 0; c < TF_K; c++)
        cf->c[c] = (struct ksm_alpha_config){
            .name = cf->names[c], .slot_ids = TF_SEED_SLOTS, .alpha = cf->alpha[c], .n = 2};
}

/* ---- timing ---- */

/* Timed calls reuse one output buffer, as an embedding application would (the logits of the
 * transformer row are 411 MB: a fresh buffer per call would be page-faulted in each time). */
static void *out_buf;
static size_t out_cap;

static double time_forward(ksm_model *m, const ksm_tensor *x, ksm_tensor *keep)
{
    struct ksm_forward_args a = {.input = x};
    if (!keep) {
        a.output_buffer = out_buf;
        a.output_capacity = out_cap;
    }
    struct ksm_forward_result r;
    double t0 = bench_now();
    CHECKE(ksm_model_forward(m, &a, &r, err, sizeof err));
    double dt = bench_now() - t0;
    if (keep)
        *keep = r.output;
    else if (r.output.data != out_buf) { /* first call: adopt the buffer for the next ones */
        free(out_buf);
        out_buf = r.output.data;
        out_cap = ksm_tensor_nbytes(&r.output);
    }
    return dt;
}

static double time_evaluate(ksm_model *m, const ksm_tensor *x, const ksm_tensor *y,
                            const struct configs *cf, struct ksm_evaluate_result *keep)
{
    struct ksm_evaluate_args a = {.input = x, .targets = y, .configs = cf->c, .n_configs = cf->n};
    struct ksm_evaluate_result r;
    double t0 = bench_now();
    CHECKE(ksm_model_evaluate(m, &a, &r, err, sizeof err));
    double dt = bench_now() - t0;
    if (r.n != cf->n) {
        fprintf(stderr, "evaluate returned %zu results, expected %zu\n", r.n, cf->n);
        exit(1);
    }
    if (keep)
        *keep = r;
    else
        ksm_evaluate_result_free(&r);
    return dt;
}

static void report(const char *name, double *s, int reps, double items, const char *unit)
{
    double med = bench_median(s, reps);
    printf("row name=%s ms=%.3f per_s=%.1f unit=%s\n", name, med * 1e3, items / med, unit);
    fflush(stdout);
}

static void *read_whole(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "%s: %s (run `bench_model export %s` first)\n", path, strerror(errno), dir);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(*len);
    if (buf == NULL || fread(buf, 1, *len, f) != *len) {
        fprintf(stderr, "%s: short read\n", path);
        exit(1);
    }
    fclose(f);
    return buf;
}

static ksm_model *load_model(ksm_engine *e, const char *dir, bool tf)
{
    ksm_model *m = make_model(e, tf);
    size_t len;
    void *buf = read_whole(dir, tf ? "tf" : "cnn", &len);
    struct ksm_load_result lr;
    CHECKE(ksm_model_load_weights(m, buf, len, true, &lr, err, sizeof err));
    ksm_load_result_free(&lr);
    free(buf);
    return m;
}

/* ---- the same CNN model in a kasminad, through libkasmina-client ---- */

#define RPC_MODEL "cnn"

static struct ksm_client_error cerr;

#define CHECKC(x)                                                                                  \
    do {                                                                                           \
        int rc_ = (x);                                                                             \
        if (rc_ != 0) {                                                                            \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #x,                  \
                    ksm_strerror(rc_), cerr.message);                                              \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* grow() through the RPCs: Germinate, RecordMetrics x 10 before G2, Advance to each stage up to
 * BLENDING, SetAlpha 0.5. */
static void rpc_grow(ksm_client *c, const char *slot, const char *bp, uint64_t seed)
{
    struct ksm_germinate_args g = {.blueprint_id = bp,
                                   .blend_algorithm_id = "linear",
                                   .alpha_algorithm = KSM_ALGO_ADD,
                                   .init_seed = seed};
    CHECKC(ksm_client_germinate(c, RPC_MODEL, slot, &g, NULL, &cerr));
    struct ksm_gate_result gate;
    struct ksm_slot_report r;
    struct ksm_metrics_update u = {.has_val_accuracy = true,
                                   .val_accuracy = 50,
                                   .has_gradient_health = true,
                                   .gradient_health = 0.9,
                                   .has_exploding = true,
                                   .exploding = false};
    for (enum ksm_stage want = KSM_STAGE_TRAINING; want <= KSM_STAGE_BLENDING; want++) {
        if (want == KSM_STAGE_BLENDING)
            for (int i = 0; i < 10; i++)
                CHECKC(ksm_client_record_metrics(c, RPC_MODEL, slot, &u, NULL, &cerr));
        CHECKC(ksm_client_advance(c, RPC_MODEL, slot, want, &gate, &r, &cerr));
        if (!gate.passed || r.stage != want) {
            fprintf(stderr, "rpc %s: gate %s to %s failed: %s\n", slot,
                    ksm_gate_level_name(gate.gate), ksm_stage_name(want),
                    gate.n_failed ? gate.checks_failed[0] : "");
            exit(1);
        }
    }
    CHECKC(ksm_client_set_alpha(c, RPC_MODEL, slot, 0.5, &r, &cerr));
    if (r.stage != KSM_STAGE_BLENDING || r.controller.alpha != 0.5) {
        fprintf(stderr, "rpc %s: expected BLENDING at 0.5, got %s at %g\n", slot,
                ksm_stage_name(r.stage), r.controller.alpha);
        exit(1);
    }
}

static char rpc_device[32]; /* the daemon's device of the model */

static ksm_client *rpc_connect(const char *target, const char *dir)
{
    ksm_client *c;
    /* The client's defaults (30 s deadline, 64 MiB messages); the daemon may still be starting:
     * wait for it (up to the deadline). */
    struct ksm_client_options o = {.wait_for_ready = true};
    CHECKC(ksm_client_connect(target, &o, &c, &cerr));
    struct ksm_model_spec spec = {.topology = KSM_TOPOLOGY_CNN,
                                  .permissive_gates = true,
                                  .init_seed = 1,
                                  .cnn = {.base_channels = 32, .n_blocks = 3}};
    ksm_client_model_delete(c, RPC_MODEL, NULL, NULL); /* one left by an earlier run */
    struct ksm_model_info info;
    CHECKC(ksm_client_model_create(c, RPC_MODEL, &spec, &info, &cerr));
    snprintf(rpc_device, sizeof rpc_device, "%s", info.device);
    for (int i = 0; i < 3; i++) rpc_grow(c, CNN_SEED_SLOTS[i], CNN_SEED_BPS[i], 10 + (uint64_t)i);
    size_t len;
    void *buf = read_whole(dir, "cnn", &len);
    struct ksm_load_result lr;
    CHECKC(ksm_client_load_weights(c, RPC_MODEL, buf, len, true, &lr, &cerr));
    ksm_load_result_free(&lr);
    free(buf);
    return c;
}

/* The rpc row's result is compared with this (the in-process engine's logits). */
static ksm_tensor ref_logits;

static void check_rpc_logits(const ksm_tensor *out)
{
    int64_t n = ksm_tensor_numel(&ref_logits);
    bool same_shape = ksm_tensor_numel(out) == n && out->ndim == ref_logits.ndim;
    double maxd = 0, maxr = 0;
    const float *a = out->data, *b = ref_logits.data;
    for (int64_t i = 0; same_shape && i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= maxd)) maxd = d; /* NaN propagates */
        if (fabs((double)b[i]) > maxr) maxr = fabs((double)b[i]);
    }
    if (!same_shape) maxd = INFINITY;
    printf("check name=cnn_forward_rpc_logits_vs_in_process max_abs_diff=%.3g max_rel_err=%.3g "
           "%s\n",
           maxd, maxr > 0 ? maxd / maxr : maxd, maxd <= 1e-6 * maxr ? "ok" : "FAIL");
}

/* Seconds of one ksm_client_forward of x to model: RPC_MODEL (its logits are checked when check
 * is set: the warm-up call), or for the wire row a model the daemon does not hold. */
static double time_rpc_forward(ksm_client *c, const ksm_tensor *x, const char *model, bool check)
{
    struct ksm_forward_args a = {.input = x};
    struct ksm_forward_result r;
    double t0 = bench_now();
    int rc = ksm_client_forward(c, model, &a, &r, &cerr);
    double dt = bench_now() - t0;
    if (strcmp(model, RPC_MODEL) != 0) {
        /* the wire row: the daemon must have decoded the request and then found no model */
        if (rc != KSM_ENOMODEL) {
            fprintf(stderr, "rpc forward to a missing model: expected KSM_ENOMODEL, got %s: %s\n",
                    ksm_err_name(rc), cerr.message);
            exit(1);
        }
        return dt;
    }
    CHECKC(rc);
    if (check) check_rpc_logits(&r.output);
    ksm_host_tensor_free(&r.output);
    return dt;
}

/* ---- device allocator figures per row ---- */

struct mem_acc {
    bool used;
    int calls;
    int64_t allocs;
    uint64_t hits, dev_allocs;
    int64_t peak_reserved, peak_allocated;
};

static void mem_read(ksm_allocator *al, ksm_client *c, struct ksm_mem_stats *out)
{
    if (al != NULL) {
        ksm_alloc_get_stats(al, out);
        return;
    }
    struct ksm_client_memory_stats ms;
    CHECKC(ksm_client_memory_stats(c, rpc_device, &ms, &cerr));
    if (ms.n != 1) {
        fprintf(stderr, "MemoryStats of %s returned %zu devices\n", rpc_device, ms.n);
        exit(1);
    }
    *out = ms.devices[0].stats;
    ksm_client_memory_stats_free(&ms);
}

/* Before a row's timed calls: the engine's peaks restart from the current level. */
static void mem_before(ksm_allocator *al, ksm_client *c, struct ksm_mem_stats *s0)
{
    if (al != NULL) ksm_alloc_reset_peak_stats(al);
    mem_read(al, c, s0);
}

static void mem_after(ksm_allocator *al, ksm_client *c, const struct ksm_mem_stats *s0, int calls,
                      struct mem_acc *acc)
{
    struct ksm_mem_stats s1;
    mem_read(al, c, &s1);
    const struct ksm_pool_stats *a0 = &s0->pool[KSM_POOL_ALL], *a1 = &s1.pool[KSM_POOL_ALL];
    acc->used = true;
    acc->calls += calls;
    acc->allocs += a1->allocation.allocated - a0->allocation.allocated;
    acc->hits += s1.cache_hits - s0->cache_hits;
    acc->dev_allocs += s1.num_device_alloc - s0->num_device_alloc;
    /* After a reset, peak >= current: the row's own high-water mark over the calls. For the
     * daemon (no reset over the wire) it is the high-water mark since it started. */
    if (a1->reserved_bytes.peak > acc->peak_reserved) acc->peak_reserved = a1->reserved_bytes.peak;
    if (a1->allocated_bytes.peak > acc->peak_allocated)
        acc->peak_allocated = a1->allocated_bytes.peak;
}

/* Answers "<row> <reps>" lines on stdin until EOF or "quit": reps 0 = one untimed warm-up call
 * ("ok <row>"), else the median of reps calls (a "row" line); "mem": the allocator figures. */
static void serve(ksm_engine *e, const char *dir, const char *target)
{
    ksm_model *cnn = load_model(e, dir, false), *tf = load_model(e, dir, true);
    struct ksm_model_info info_cnn, info_tf;
    CHECKE(ksm_model_get_info(cnn, &info_cnn));
    CHECKE(ksm_model_get_info(tf, &info_tf));
    ksm_allocator *al_cnn = ksm_engine_allocator(e, ksm_engine_find_device(e, info_cnn.device));
    ksm_allocator *al_tf = ksm_engine_allocator(e, ksm_engine_find_device(e, info_tf.device));
    struct inputs in;
    make_inputs(&in);
    struct configs ccf, tcf;
    cnn_configs(&ccf);
    tf_configs(&tcf);
    ksm_client *rpc = NULL;
    if (target != NULL) {
        rpc = rpc_connect(target, dir);
        time_forward(cnn, &in.tcnn_x, &ref_logits);
    }
    printf("ready\n");
    fflush(stdout);
    static const struct {
        const char *name, *unit;
        double items;
    } rows[] = {{"cnn_forward", "img/s", CNN_B},
                {"cnn_eval_k8", "rows/s", (double)CNN_K * CNN_B},
                {"tf_forward", "tok/s", (double)TF_B * TF_T},
                {"tf_eval_k2", "tok/s", (double)TF_K * TF_B * TF_T},
                {"cnn_forward_rpc", "img/s", CNN_B},
                {"cnn_forward_rpc_wire", "req/s", 1}};
    /* each row's allocator (NULL: the daemon's, over MemoryStats) and device */
    ksm_allocator *const row_al[] = {al_cnn, al_cnn, al_tf, al_tf, NULL, NULL};
    char dd[48];
    snprintf(dd, sizeof dd, "kasminad:%s", rpc_device);
    const char *const row_dev[] = {
        info_cnn.device, info_cnn.device, info_tf.device, info_tf.device, dd, dd};
    enum { N_ROWS = sizeof rows / sizeof rows[0] };
    struct mem_acc mem[N_ROWS];
    memset(mem, 0, sizeof mem);
    char line[256], name[64];
    int reps;
    while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4) != 0) {
        if (strncmp(line, "mem", 3) == 0 && (line[3] == '\n' || line[3] == '\0')) {
            for (int i = 0; i < N_ROWS; i++)
                if (mem[i].used)
                    printf("mem name=%s device=%s calls=%d allocs=%lld cache_hits=%llu "
                           "device_allocs=%llu peak_reserved=%lld peak_allocated=%lld\n",
                           rows[i].name, row_dev[i], mem[i].calls, (long long)mem[i].allocs,
                           (unsigned long long)mem[i].hits, (unsigned long long)mem[i].dev_allocs,
                           (long long)mem[i].peak_reserved, (long long)mem[i].peak_allocated);
            printf("ok mem\n");
            fflush(stdout);
            continue;
        }
        if (sscanf(line, "%63s %d", name, &reps) != 2 || reps < 0 || reps > 1000) {
            fprintf(stderr, "bad command: %s", line);
            exit(2);
        }
        int w = -1;
        for (int i = 0; i < N_ROWS; i++)
            if (!strcmp(name, rows[i].name)) w = i;
        if (w < 0 || (w >= 4 && rpc == NULL)) {
            printf("skip %s\n", name); /* a row only the PyTorch side has, or no daemon */
            fflush(stdout);
            continue;
        }
        int n = reps > 0 ? reps : 1;
        double *s = calloc((size_t)n, sizeof *s);
        struct ksm_mem_stats s0;
        if (reps > 0) mem_before(row_al[w], rpc, &s0);
        for (int r = 0; r < n; r++) switch (w) {
            case 0: s[r] = time_forward(cnn, &in.tcnn_x, NULL); break;
            case 1: s[r] = time_evaluate(cnn, &in.tcnn_x, &in.tcnn_y, &ccf, NULL); break;
            case 2: s[r] = time_forward(tf, &in.ttf_x, NULL); break;
            case 3: s[r] = time_evaluate(tf, &in.ttf_x, &in.ttf_y, &tcf, NULL); break;
            case 4: s[r] = time_rpc_forward(rpc, &in.tcnn_x, RPC_MODEL, reps == 0); break;
            default: s[r] = time_rpc_forward(rpc, &in.tcnn_x, "no-such-model", false); break;
            }
        if (reps > 0) mem_after(row_al[w], rpc, &s0, reps, &mem[w]);
        if (reps == 0) {
            printf("ok %s\n", name);
            fflush(stdout);
        } else
            report(name, s, reps, rows[w].items, rows[w].unit);
        free(s);
    }
    if (rpc != NULL) {
        ksm_client_model_delete(rpc, RPC_MODEL, NULL, NULL);
        ksm_client_close(rpc);
        ksm_host_tensor_free(&ref_logits);
    }
    ksm_model_unref(cnn);
    ksm_model_unref(tf);
}

/* ---- export ---- */

static void write_file(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(buf, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "%s: write failed: %s\n", path, strerror(errno));
        exit(1);
    }
}

static struct ksm_st_tensor st_tensor(const char *name, enum ksm_dtype dt, const void *data,
                                      int ndim, const int64_t *shape)
{
    struct ksm_st_tensor t = {.name = name, .dtype = dt, .ndim = ndim, .data = data};
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        t.shape[i] = shape[i];
        n *= (size_t)shape[i];
    }
    t.nbytes = n * (dt == KSM_DTYPE_I64 ? 8 : 4);
    return t;
}

static void export(ksm_engine *e, const char *dir)
{
    struct inputs in;
    make_inputs(&in);
    struct st_out {
        float loss[CNN_K], acc[CNN_K];
    } cnn_ev, tf_ev;
    ksm_tensor cnn_logits, tf_logits;
    float *cnn_ev_logits = NULL;
    char path[4096];
    for (int tf = 0; tf < 2; tf++) {
        ksm_model *m = make_model(e, tf);
        void *buf;
        size_t len;
        CHECKE(ksm_model_export_weights(m, &buf, &len, err, sizeof err));
        snprintf(path, sizeof path, "%s/%s.safetensors", dir, tf ? "tf" : "cnn");
        write_file(path, buf, len);
        free(buf);
        struct configs cf;
        struct ksm_evaluate_result r;
        struct st_out *o = tf ? &tf_ev : &cnn_ev;
        if (tf) {
            tf_configs(&cf);
            time_forward(m, &in.ttf_x, &tf_logits);
            time_evaluate(m, &in.ttf_x, &in.ttf_y, &cf, &r);
        } else {
            cnn_configs(&cf);
            time_forward(m, &in.tcnn_x, &cnn_logits);
            struct ksm_evaluate_args a = {.input = &in.tcnn_x,
                                          .targets = &in.tcnn_y,
                                          .configs = cf.c,
                                          .n_configs = cf.n,
                                          .return_logits = true};
            CHECKE(ksm_model_evaluate(m, &a, &r, err, sizeof err));
            cnn_ev_logits = malloc(sizeof(float) * CNN_K * CNN_B * 10);
            for (size_t c = 0; c < r.n; c++)
                memcpy(cnn_ev_logits + c * CNN_B * 10, r.results[c].logits.data,
                       sizeof(float) * CNN_B * 10);
        }
        for (size_t c = 0; c < r.n; c++) {
            o->loss[c] = (float)r.results[c].loss;
            o->acc[c] = (float)r.results[c].accuracy;
        }
        ksm_evaluate_result_free(&r);
        ksm_model_unref(m);
    }
    struct ksm_st_tensor t[] = {
        st_tensor("cnn.x", KSM_DTYPE_F32, in.cnn_x, 4, (const int64_t[]){CNN_B, 3, CNN_HW, CNN_HW}),
        st_tensor("cnn.y", KSM_DTYPE_I64, in.cnn_y, 1, (const int64_t[]){CNN_B}),
        st_tensor("tf.x", KSM_DTYPE_I64, in.tf_x, 2, (const int64_t[]){TF_B, TF_T}),
        st_tensor("tf.y", KSM_DTYPE_I64, in.tf_y, 2, (const int64_t[]){TF_B, TF_T}),
        st_tensor("ksm.cnn.logits", KSM_DTYPE_F32, cnn_logits.data, 2,
                  (const int64_t[]){CNN_B, 10}),
        st_tensor("ksm.cnn.eval_logits", KSM_DTYPE_F32, cnn_ev_logits, 3,
                  (const int64_t[]){CNN_K, CNN_B, 10}),
        st_tensor("ksm.cnn.eval_loss", KSM_DTYPE_F32, cnn_ev.loss, 1, (const int64_t[]){CNN_K}),
        st_tensor("ksm.cnn.eval_acc", KSM_DTYPE_F32, cnn_ev.acc, 1, (const int64_t[]){CNN_K}),
        /* row 0 of [B, T, V] only: 51 MB rather than 411 */
        st_tensor("ksm.tf.logits0", KSM_DTYPE_F32, tf_logits.data, 2,
                  (const int64_t[]){TF_T, TF_V}),
        st_tensor("ksm.tf.eval_loss", KSM_DTYPE_F32, tf_ev.loss, 1, (const int64_t[]){TF_K}),
        st_tensor("ksm.tf.eval_acc", KSM_DTYPE_F32, tf_ev.acc, 1, (const int64_t[]){TF_K}),
    };
    snprintf(path, sizeof path, "%s/io.safetensors", dir);
    CHECKE(ksm_st_write(path, t, sizeof t / sizeof t[0], NULL, 0));
    printf("exported %s/{cnn,tf,io}.safetensors\n", dir);
    ksm_host_tensor_free(&cnn_logits);
    ksm_host_tensor_free(&tf_logits);
    free(cnn_ev_logits);
    free(in.cnn_x);
    free(in.cnn_y);
    free(in.tf_x);
    free(in.tf_y);
}

int main(int argc, char **argv)
{
    if (argc < 3 || (strcmp(argv[1], "export") != 0 && strcmp(argv[1], "serve") != 0)) {
        fprintf(stderr, "usage: bench_model export DIR | bench_model serve DIR [TARGET]\n");
        return 2;
    }
    ksm_engine *e;
    /* KASMINA_BENCH_DEVICE=cuda:0 (tests/bench/gpu.sh) runs the engine side on the GPU through
     * the plugin at KASMINA_CUDA_PLUGIN. */
    const char *dev = getenv("KASMINA_BENCH_DEVICE");
    tf_device = dev == NULL || strcmp(dev, "cpu:0") == 0 ? "cpu:1" : NULL;
    struct ksm_engine_config cfg = {.cpu_devices = 2,
                                    .enable_cuda = dev && strncmp(dev, "cuda", 4) == 0,
                                    .cuda_plugin = getenv("KASMINA_CUDA_PLUGIN"),
                                    .default_device = dev};
    CHECKE(ksm_engine_new(&cfg, &e, err, sizeof err));
    fprintf(stderr, "bench_model: engine on %s\n", ksm_device_name(ksm_engine_default_device(e)));
    /* the OpenBLAS kernels the engine picked (run.sh gives PyTorch the same) */
    const char *core = ksm_cpu_backend_blas_core();
    printf("info openblas_core=%s\n", core ? core : "none");
    if (strcmp(argv[1], "export") == 0)
        export(e, argv[2]);
    else
        serve(e, argv[2], argc > 3 ? argv[3] : NULL);
    ksm_engine_free(e);
    return 0;
}
